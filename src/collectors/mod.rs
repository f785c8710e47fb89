//! Collectors: plugins that sample something and hand readings to the spool.
//!
//! Kinds: [`system`] (host metrics), [`serial`] (lines from a serial port), [`file`] (tail a
//! file, or poll small files), [`exec`] (a program's output, periodically), [`listen`] (lines
//! pushed by local applications, confirmed once durable), [`modbus`] (registers polled from
//! Modbus TCP or RTU devices). Serial, file and
//! exec share [`lines`] (framing with a line-length cap) and [`parse`] (raw, json, kv, csv,
//! regex, influx); every kind shares [`common`] (static tags, loss reports for unusable
//! input). docs/COLLECTORS.md documents every option.
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
//! - A collector with a `deadband` has its own readings filtered in [`CollectorContext::send`],
//!   before they reach the spool; the filter's state is kept by the supervisor across restarts
//!   and across reloads that leave the `deadband` config unchanged.

pub mod common;
pub mod deadband;
pub mod exec;
pub mod file;
pub mod lines;
pub mod listen;
pub mod modbus;
pub mod parse;
pub mod serial;
pub mod supervisor;
pub mod system;

use crate::issue::Issue;
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

/// A collector's deadband filter, shared by its runs (see [`deadband`]).
pub type SharedDeadband = std::sync::Arc<std::sync::Mutex<deadband::Deadband>>;

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
    /// Applied by [`CollectorContext::send`] to the readings of this collector's own stream.
    pub deadband: Option<SharedDeadband>,
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
            deadband: None,
        };
        (ctx, rx)
    }

    /// Hands one intake to the spool, waiting while the channel is full. Returns
    /// `SpoolClosed` if the spool writer is gone.
    ///
    /// With a deadband, readings of the collector's own stream are filtered first (loss
    /// reports and other streams pass untouched). An intake left with no reading is not sent
    /// at all, unless it carries a checkpoint or waits for a receipt: a file position still
    /// advances past lines whose values were all suppressed.
    pub async fn send(&self, mut intake: Intake) -> Result<(), CollectorError> {
        if let Some(filter) = &self.deadband
            && !intake.readings.is_empty()
        {
            {
                let mut filter = filter.lock().unwrap_or_else(|p| p.into_inner());
                intake.readings = std::mem::take(&mut intake.readings)
                    .into_iter()
                    .filter_map(|r| {
                        if r.stream == self.name {
                            filter.apply(r)
                        } else {
                            Some(r)
                        }
                    })
                    .collect();
            }
            if intake.readings.is_empty()
                && intake.checkpoint.is_none()
                && intake.committed.is_none()
            {
                return Ok(());
            }
        }
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
    /// The `deadband` key; every kind that can produce fields has one.
    fn deadband(&self) -> Option<&deadband::DeadbandConfig>;
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
    "exec" => Exec(exec::ExecConfig),
    "listen" => Listen(listen::ListenConfig),
    "modbus" => Modbus(modbus::ModbusConfig),
}

impl CollectorConfig {
    pub fn name(&self) -> &str {
        self.spec().name()
    }

    pub fn enabled(&self) -> bool {
        self.spec().enabled()
    }

    /// The kind's own checks, then the keys every kind shares (`deadband`).
    pub fn validate(&self) -> Vec<Issue> {
        let mut issues = self.spec().validate();
        if let Some(d) = self.deadband() {
            issues.extend(d.validate());
        }
        issues
    }

    pub fn deadband(&self) -> Option<&deadband::DeadbandConfig> {
        self.spec().deadband()
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Body, LOSS_STREAM, Reading, Value};
    use crate::spool::Checkpoint;

    fn reading(stream: &str, v: i64) -> Reading {
        Reading::fields(stream, vec![("v".into(), Value::I64(v))])
    }

    fn values(intake: &Intake) -> Vec<(String, Option<i64>)> {
        intake
            .readings
            .iter()
            .map(|r| {
                let v = match &r.body {
                    Body::Fields(f) => f.iter().find_map(|(n, v)| match (n.as_str(), v) {
                        ("v", Value::I64(i)) => Some(*i),
                        _ => None,
                    }),
                    Body::Line(_) => None,
                };
                (r.stream.clone(), v)
            })
            .collect()
    }

    #[tokio::test]
    async fn send_filters_only_the_collectors_own_stream_and_keeps_positions_moving() {
        let (mut ctx, mut rx) = CollectorContext::new_test("temps");
        let config: deadband::DeadbandConfig =
            serde_yaml::from_str("default: 5\nheartbeat: 100\n").unwrap();
        ctx.deadband = Some(std::sync::Arc::new(std::sync::Mutex::new(
            deadband::Deadband::new(&config),
        )));
        let loss = crate::collectors::common::loss_reading(
            "temps",
            common::LossReason::Malformed,
            1,
            b"x",
        );
        ctx.send(Intake {
            readings: vec![reading("temps", 0), reading("temps", 1), loss.clone()],
            ..Intake::default()
        })
        .await
        .unwrap();
        let got = rx.recv().await.unwrap();
        assert_eq!(
            values(&got),
            [("temps".into(), Some(0)), (LOSS_STREAM.into(), None)]
        );
        // Everything suppressed and nothing else to carry: nothing is sent.
        ctx.send(Intake::reading(reading("temps", 2)))
            .await
            .unwrap();
        // Everything suppressed but a position to commit: sent without readings.
        let checkpoint = Checkpoint {
            source: "temps".into(),
            position: vec![7],
        };
        ctx.send(Intake {
            readings: vec![reading("temps", 3)],
            checkpoint: Some(checkpoint.clone()),
            ..Intake::default()
        })
        .await
        .unwrap();
        let got = rx.recv().await.unwrap();
        assert!(got.readings.is_empty());
        assert_eq!(got.checkpoint, Some(checkpoint));
        ctx.send(Intake::reading(reading("temps", 6)))
            .await
            .unwrap();
        assert_eq!(
            values(&rx.recv().await.unwrap()),
            [("temps".into(), Some(6))]
        );
        assert!(rx.try_recv().is_err());
    }

    #[test]
    fn deadband_issues_are_reported_for_every_kind() {
        for kind in [
            "type: system\nname: s\n",
            "type: serial\nname: s\npath: /dev/ttyUSB0\n",
            "type: file\nname: s\npath: /var/log/a.log\n",
            "type: file\nname: s\nmode: poll\npaths: [/sys/x]\n",
            "type: exec\nname: s\ncommand: /bin/true\n",
            "type: listen\nname: s\nsocket: /run/ferry/push.sock\n",
            "type: modbus\nname: s\ntcp: {host: 127.0.0.1}\nregisters: [{field: v, function: holding, address: 0}]\n",
        ] {
            let yaml = format!("{kind}deadband: {{default: -1, heartbeat: 0}}\n");
            let c = CollectorConfig::from_yaml(serde_yaml::from_str(&yaml).unwrap()).unwrap();
            let paths: Vec<String> = c.validate().into_iter().map(|i| i.path).collect();
            assert_eq!(paths, ["deadband.default", "deadband.heartbeat"], "{kind}");
            let unknown = format!("{kind}deadband: {{heartbeat: 1, treshold: 2}}\n");
            let err =
                CollectorConfig::from_yaml(serde_yaml::from_str(&unknown).unwrap()).unwrap_err();
            assert_eq!(err[0].path, "deadband.treshold", "{kind}");
            assert!(err[0].message.contains("treshold"), "{:?}", err[0]);
        }
    }
}
