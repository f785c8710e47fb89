//! The command service's settings. The service owns them; config validation fills them in
//! from the file (names, paths, ranges), so the service never reads the config itself.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub struct CommandSettings {
    pub enabled: bool,
    pub require_signature: bool,
    /// Key id -> file holding the shared secret (read when the command service starts).
    pub keys: Vec<(String, PathBuf)>,
    pub ledger_max_entries: usize,
    pub ledger_max_age: Duration,
    pub actions: Vec<ActionSettings>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActionSettings {
    pub name: String,
    pub program: PathBuf,
    pub args: Vec<String>,
    pub params: Vec<ParamSettings>,
    pub timeout: Duration,
    pub max_output_bytes: usize,
    pub max_concurrent: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ParamSettings {
    pub name: String,
    pub kind: ParamKind,
    pub required: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ParamKind {
    /// Letters, digits and `_ . - : / @ +`, at most 256 characters (no spaces, no shell syntax).
    String,
    Integer,
    Bool,
}
