//! Collectors: plugins that sample something and hand readings to the spool.
//!
//! Kinds: [`system`] (host metrics), [`serial`] (lines from a serial port), [`file`] (tail a
//! file, or poll small files). Serial and file share [`lines`] (framing with a line-length
//! cap) and [`parse`] (raw, json, kv, csv, regex); every kind shares [`common`] (static tags,
//! loss reports for unusable input). docs/COLLECTORS.md documents every option.
//!
//! Each collector kind lives in its own file and implements [`Collector`]. Its only dependency
//! is its [`CollectorContext`]: its name (which becomes the stream name), a sender into the
//! spool, a shutdown token. The closed set of kinds is the [`collector_kinds!`] list below:
//! adding a collector is its own file plus one line there.
//!
//! Invariants:
//! - A collector never retries on its own. When `run` returns an error, the [`supervisor`]
//!   restarts it with backoff and counts the restart.
//! - The channel into the spool is bounded; a collector that outpaces the disk waits on
//!   `send` (back-pressure) instead of growing memory.
//! - A collector stops promptly when the shutdown token is cancelled, after handing over what
//!   it already sampled.

pub mod common;
pub mod deadband;
pub mod file;
pub mod lines;
pub mod parse;
pub mod serial;
pub mod supervisor;
pub mod system;

use crate::config::Issue;
use crate::spool::Intake;
use std::future::Future;
use std::pin::Pin;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Why a collector run ended early; the supervisor logs it and restarts the collector.
#[derive(Debug, thiserror::Error)]
pub enum CollectorError {
    #[error("{0}")]
    Source(String),
    #[error("the spool is no longer accepting readings")]
    SpoolClosed,
}

pub type RunFuture = Pin<Box<dyn Future<Output = Result<(), CollectorError>> + Send>>;

/// One running instance of a collector kind.
pub trait Collector: Send {
    /// Samples until `ctx.shutdown` is cancelled (then returns `Ok`) or the source fails.
    fn run(self: Box<Self>, ctx: CollectorContext) -> RunFuture;
}

/// Everything a collector may use.
#[derive(Clone)]
pub struct CollectorContext {
    pub name: String,
    pub intake: mpsc::Sender<Intake>,
    pub shutdown: CancellationToken,
    /// Positions committed with earlier intakes (see [`crate::spool::Checkpoint`]).
    pub positions: Positions,
    /// Notified when an operator asks for a sample now; periodic collectors take one.
    pub sample_now: std::sync::Arc<tokio::sync::Notify>,
}

impl CollectorContext {
    /// A context whose intake is returned to the test, with a fresh shutdown token and
    /// in-memory positions.
    pub fn new_test(name: &str) -> (CollectorContext, mpsc::Receiver<Intake>) {
        let (tx, rx) = mpsc::channel(64);
        let ctx = CollectorContext {
            name: name.to_string(),
            intake: tx,
            shutdown: CancellationToken::new(),
            positions: Positions::in_memory(),
            sample_now: Default::default(),
        };
        (ctx, rx)
    }

    /// Hands one intake to the spool, waiting while the channel is full. Returns
    /// `SpoolClosed` if the spool writer is gone.
    pub async fn send(&self, intake: Intake) -> Result<(), CollectorError> {
        self.intake
            .send(intake)
            .await
            .map_err(|_| CollectorError::SpoolClosed)
    }
}

/// Read access to the source positions committed in the spool. A re-readable source loads its
/// position when it starts, and sends the new one with the records read up to it.
#[derive(Clone)]
pub struct Positions(PositionSource);

#[derive(Clone)]
enum PositionSource {
    Spool(crate::spool::Spool),
    Memory(std::sync::Arc<std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>>),
}

impl Positions {
    pub fn from_spool(spool: crate::spool::Spool) -> Positions {
        Positions(PositionSource::Spool(spool))
    }

    /// Positions kept in memory, for tests.
    pub fn in_memory() -> Positions {
        Positions(PositionSource::Memory(Default::default()))
    }

    /// Sets a position (in-memory positions only; the spool's change only by commits).
    pub fn set_in_memory(&self, source: &str, position: Vec<u8>) {
        if let PositionSource::Memory(m) = &self.0 {
            m.lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(source.to_string(), position);
        }
    }

    /// The last committed position of `source`.
    pub async fn load(&self, source: &str) -> Result<Option<Vec<u8>>, CollectorError> {
        match &self.0 {
            PositionSource::Spool(spool) => {
                let (spool, source) = (spool.clone(), source.to_string());
                tokio::task::spawn_blocking(move || spool.position(&source))
                    .await
                    .map_err(|e| CollectorError::Source(format!("position read panicked: {e}")))?
                    .map_err(|e| {
                        CollectorError::Source(format!("cannot read the stored position: {e}"))
                    })
            }
            PositionSource::Memory(m) => Ok(m
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(source)
                .cloned()),
        }
    }
}

/// What every collector config has, whatever its kind.
pub trait CollectorSpec {
    fn name(&self) -> &str;
    fn enabled(&self) -> bool;
    /// Checks beyond types (ranges, paths); paths in issues are relative to the item.
    fn validate(&self) -> Vec<Issue>;
    fn build(&self) -> Box<dyn Collector>;
    /// Changes the sampling interval, for collectors that have one; false otherwise.
    fn set_interval_ms(&mut self, _interval_ms: u64) -> bool {
        false
    }
}

macro_rules! collector_kinds {
    ($($kind:literal => $variant:ident($config:ty),)+) => {
        /// The closed set of collector kinds, selected by the `type` key of an item.
        #[derive(Debug, Clone, PartialEq)]
        pub enum CollectorConfig {
            $($variant($config),)+
        }

        impl CollectorConfig {
            fn spec(&self) -> &dyn CollectorSpec {
                match self {
                    $(CollectorConfig::$variant(c) => c,)+
                }
            }

            /// The `type` key of this kind.
            pub fn kind(&self) -> &'static str {
                match self {
                    $(CollectorConfig::$variant(_) => $kind,)+
                }
            }

            fn spec_mut(&mut self) -> &mut dyn CollectorSpec {
                match self {
                    $(CollectorConfig::$variant(c) => c,)+
                }
            }

            /// Parses one `collectors:` item. The `type` key picks the kind; the rest must be
            /// that kind's keys. Issue paths are relative to the item.
            pub fn from_yaml(item: serde_yaml::Value) -> Result<CollectorConfig, Vec<Issue>> {
                const KINDS: &[&str] = &[$($kind),+];
                let serde_yaml::Value::Mapping(mut map) = item else {
                    return Err(vec![Issue::new("", "a collector must be a mapping with a `type` key")]);
                };
                let kind = match map.remove("type") {
                    Some(serde_yaml::Value::String(s)) => s,
                    Some(_) => return Err(vec![Issue::new("type", format!("must be a string, one of {}", KINDS.join(", ")))]),
                    None => return Err(vec![Issue::new("type", format!("missing; expected one of {}", KINDS.join(", ")))]),
                };
                let value = serde_yaml::Value::Mapping(map);
                match kind.as_str() {
                    $($kind => parse_item(value).map(CollectorConfig::$variant),)+
                    other => Err(vec![Issue::new("type", format!("unknown collector type {other:?}; expected one of {}", KINDS.join(", ")))]),
                }
            }
        }
    };
}

collector_kinds! {
    "system" => System(system::SystemConfig),
    "serial" => Serial(serial::SerialConfig),
    "file" => File(file::FileConfig),
}

impl CollectorConfig {
    pub fn name(&self) -> &str {
        self.spec().name()
    }

    pub fn enabled(&self) -> bool {
        self.spec().enabled()
    }

    pub fn validate(&self) -> Vec<Issue> {
        self.spec().validate()
    }

    pub fn build(&self) -> Box<dyn Collector> {
        self.spec().build()
    }

    /// Changes the sampling interval; false if this kind has none.
    pub fn set_interval_ms(&mut self, interval_ms: u64) -> bool {
        self.spec_mut().set_interval_ms(interval_ms)
    }
}

fn parse_item<T: serde::de::DeserializeOwned>(value: serde_yaml::Value) -> Result<T, Vec<Issue>> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let path = if path == "." { String::new() } else { path };
        vec![Issue::new(path, e.into_inner().to_string())]
    })
}
