//! The record model: what a collector produces, what the spool stores, what the uplink sends.
//!
//! A collector produces a [`Reading`]: a stream name, a sample time and a [`Body`]. The spool
//! turns it into a [`Record`] by assigning the stream's next `seq` when the reading's group is
//! committed. `seq` is strictly increasing per stream, persisted, and never reused (also across
//! restarts and evictions), so a consumer can tell a gap (lost or evicted) from a duplicate
//! (same stream and seq) without any help from the broker.

pub use crate::clock::ClockState;
use crate::clock::now_ms;
use serde::{Deserialize, Serialize};

/// Stream on which the spool reports every record it had to drop, with the reason.
pub const LOSS_STREAM: &str = "ferry.loss";

/// Stream of the agent's own figures (`self_metrics_interval_ms`); on the bulk lane unless
/// configured otherwise.
pub const SELF_STREAM: &str = "ferry.self";

/// Stream of command replies; published one reply per message on the replies topic, ahead of
/// every other stream.
pub const COMMANDS_STREAM: &str = "commands";

/// One named value of a reading. Numbers stay numbers on the wire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Value {
    I64(i64),
    U64(u64),
    F64(f64),
    Bool(bool),
    Str(String),
}

/// What a reading says: named fields, or one raw line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Body {
    Fields(Vec<(String, Value)>),
    Line(String),
}

/// A sample handed from a collector to the spool; it has no `seq` until it is committed.
#[derive(Debug, Clone, PartialEq)]
pub struct Reading {
    pub stream: String,
    /// Sample time, ms since the Unix epoch.
    pub ts_ms: u64,
    pub body: Body,
}

/// A committed reading: the stream is known from where it is stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub seq: u64,
    pub ts_ms: u64,
    /// Whether `ts_ms` came from a synchronised clock (see [`crate::clock`]).
    pub clock: ClockState,
    pub body: Body,
}

impl Reading {
    /// A reading of named fields stamped now.
    pub fn fields(stream: impl Into<String>, fields: Vec<(String, Value)>) -> Reading {
        Reading {
            stream: stream.into(),
            ts_ms: now_ms(),
            body: Body::Fields(fields),
        }
    }
}

/// A chunk of committed records of one stream, read back from the spool (the unit the spool
/// stores and the uplink sends and acknowledges).
#[derive(Debug, Clone)]
pub struct ChunkData {
    pub chunk_id: u64,
    pub committed_ms: u64,
    /// Encoded size in the spool, key included.
    pub stored_bytes: usize,
    pub records: Vec<Record>,
}

/// Whether `name` is usable as a stream name and MQTT topic level: 1-64 characters of
/// `[A-Za-z0-9_.-]`.
pub fn is_valid_stream_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}
