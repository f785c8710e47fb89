//! A validation issue: one problem found in the config, with the key path it concerns.
//!
//! A leaf module: config validation and every collector kind's own checks report [`Issue`]s,
//! so neither has to import the other. Paths are relative to what was checked (a collector
//! item's issues are prefixed with `collectors[i]` by the config loader, which also fills in
//! the [`Position`]).

use std::fmt;

/// 1-based line and column of a key in the source text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub line: usize,
    pub column: usize,
}

/// One problem found in a config file.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    /// Key path such as `uplink.tls.ca_file` or `collectors[0].interval_ms`; empty for the
    /// document as a whole.
    pub path: String,
    pub message: String,
    pub position: Option<Position>,
}

impl Issue {
    pub fn new(path: impl Into<String>, message: impl Into<String>) -> Issue {
        Issue {
            path: path.into(),
            message: message.into(),
            position: None,
        }
    }
}

impl fmt::Display for Issue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}
