//! The uplink: drains the spool to an MQTT broker at QoS 1 and deletes a record only after the
//! broker's PUBACK for the message that carried it.
//!
//! Invariants:
//! - **The spool is the only source of truth.** rumqttc's in-memory queue is not a delivery
//!   guarantee (it discards pending publishes on reconnect), so nothing is deleted because
//!   `publish()` returned `Ok`, only because of the PUBACK bound to it ([`acks`]).
//! - **One connection epoch = one fresh `AsyncClient` + `EventLoop`.** The event loop is
//!   polled by its own task that forwards events over a bounded channel (`poll()` is not known
//!   to be cancel-safe, so it never sits in a `select!`). When `poll()` fails, the epoch ends:
//!   both are dropped, the in-flight map with them, and after a backoff the next epoch resends
//!   everything unacknowledged from the spool (duplicates allowed, loss not).
//! - **This task alone publishes** and owns the in-flight bookkeeping.
//! - **Window:** at most `window` data messages are unacknowledged at once; rumqttc's own
//!   in-flight limit is set well above it so its packet ids rarely collide.
//! - **Reconnect backoff** lives here (exponential, full jitter, capped, reset after a
//!   connection stayed up for `reset_after`). rumqttc has none of its own.
//! - **MQTT 5 or 3.1.1** ([`link`]): the epoch code is the same for both. With 5, a PUBACK
//!   reason code >= 0x80 deletes nothing: new data waits a backoff delay of its own (the
//!   connection stays up, so commands still flow), then the drain starts again from the
//!   oldest stored chunk. A broker that refuses a version-5 CONNECT makes ferry fall back to
//!   3.1.1 (with a WARN) until the settings change or ferry restarts.

pub mod acks;
pub mod budget;
mod epoch;
mod link;
pub mod options;
mod prepare;
mod settings;

use crate::backoff::Backoff;
use crate::clock::ClockSource;
use crate::command_link::CommandLink;
use crate::heartbeat::Heartbeat;
use crate::spool::Spool;
use crate::wire::payload::Origin;
use budget::{Budget, BudgetStats};
use options::Topics;
pub use settings::{
    AuthSettings, BackoffSettings, BudgetSettings, MqttVersion, StreamSettings, TlsSettings,
    UplinkSettings,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Requests queued in rumqttc's channel: the window plus status, subscribe, command acks,
/// disconnect and slack. Command acks are bounded by how many unacknowledged QoS 1 messages
/// the broker sends at once (Mosquitto: 20 by default), busy refusals included. The window gate keeps it from filling; `try_publish` failing means
/// a bug, and ends the epoch.
const REQUEST_SLACK: usize = 128;
/// Counters and state readable while the agent runs.
#[derive(Debug, Default)]
pub struct UplinkStats {
    pub connected: AtomicBool,
    pub connects: AtomicU64,
    pub messages_published: AtomicU64,
    pub records_published: AtomicU64,
    /// Records published again (after a reconnect, their first PUBACK never came).
    pub records_resent: AtomicU64,
    pub records_acked: AtomicU64,
    /// Delay before the next connection attempt, while disconnected.
    pub backoff_ms: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    pub budget: Arc<BudgetStats>,
    /// Data publishes the broker refused (MQTT 5 PUBACK reason code >= 0x80), and their
    /// records (counted at every refusal: a record refused twice counts twice).
    pub publishes_refused: AtomicU64,
    pub records_refused: AtomicU64,
    /// The last refusal: reason code, name, reason string, stream.
    pub last_refusal: Mutex<Option<String>>,
    /// The protocol of the last connection: `5`, `3.1.1`, or `3.1.1 (fallback)`.
    pub protocol: Mutex<Option<String>>,
}

impl UplinkStats {
    fn set_protocol(&self, version: MqttVersion, fell_back: bool) {
        let text = if fell_back {
            format!("{} (fallback)", version.as_str())
        } else {
            version.as_str().to_string()
        };
        *self.protocol.lock().unwrap_or_else(|p| p.into_inner()) = Some(text);
    }
}

/// The protocol version the next connection uses: the configured one, or 3.1.1 once a broker
/// refused a version-5 CONNECT.
#[derive(Debug)]
struct VersionChoice {
    configured: MqttVersion,
    fell_back: bool,
    /// Version-5 CONNECTs in a row the broker closed without a readable CONNACK.
    early_closes: u32,
}

/// Version-5 CONNECTs in a row closed without a CONNACK before ferry falls back (one could be
/// a broker restarting; a 3.1.1-only broker does it every time).
const EARLY_CLOSES_BEFORE_FALLBACK: u32 = 2;

impl VersionChoice {
    fn new(configured: MqttVersion) -> VersionChoice {
        VersionChoice {
            configured,
            fell_back: false,
            early_closes: 0,
        }
    }

    fn effective(&self) -> MqttVersion {
        if self.fell_back {
            MqttVersion::V311
        } else {
            self.configured
        }
    }

    fn fell_back(&self) -> bool {
        self.fell_back
    }

    fn connected(&mut self) {
        self.early_closes = 0;
    }

    /// Whether this failed CONNECT makes ferry fall back to 3.1.1 now.
    fn should_fall_back(&mut self, refusal: link::VersionRefusal) -> bool {
        if self.effective() != MqttVersion::V5 {
            return false;
        }
        let fall = match refusal {
            link::VersionRefusal::No => {
                self.early_closes = 0;
                false
            }
            link::VersionRefusal::Explicit => true,
            link::VersionRefusal::ClosedBeforeConnack => {
                self.early_closes += 1;
                self.early_closes >= EARLY_CLOSES_BEFORE_FALLBACK
            }
        };
        if fall {
            self.fell_back = true;
        }
        fall
    }
}

/// How a connection epoch ended.
enum EpochEnd {
    Shutdown,
    /// The settings changed: reconnect at once with the new ones.
    Reconfigured,
    /// The broker refused MQTT 5: reconnect at once with 3.1.1.
    FellBack,
    Failed {
        error: String,
        serious: bool,
        was_connected: bool,
    },
}

fn failed(error: impl Into<String>, was_connected: bool) -> EpochEnd {
    EpochEnd::Failed {
        error: error.into(),
        serious: false,
        was_connected,
    }
}

/// What one epoch works with: the settings as they were when it started.
struct EpochCtx {
    s: UplinkSettings,
    topics: Topics,
    commands_topic: String,
    origin: Origin,
    streams: Arc<StreamSettings>,
    epoch: u64,
    /// The protocol version of this epoch's CONNECT.
    version: MqttVersion,
}

pub struct Uplink {
    settings: watch::Receiver<UplinkSettings>,
    spool: Spool,
    boot: String,
    shutdown: CancellationToken,
    stats: Arc<UplinkStats>,
    commands: Option<CommandLink>,
    flush: Arc<Notify>,
    heartbeat: Heartbeat,
    /// Highest chunk id published oldest-first per stream, across epochs: a chunk at or below
    /// it is a resend. (Chunks sent ahead by live-first streams are not tracked: their resends
    /// are not counted.)
    sent_high: HashMap<u32, u64>,
    clock: Arc<dyn ClockSource>,
    /// Opened when `run` starts.
    budget: Option<Budget>,
    /// The command topic the broker confirmed a subscription to (SUBACK), kept across
    /// epochs: with the session present, it is not subscribed again.
    subscribed: Option<String>,
    version: VersionChoice,
    /// Delay before refused data is sent again; grows while the broker keeps refusing, reset
    /// by an accepted data publish. Kept across epochs.
    refusal_backoff: Backoff,
    /// The shortest retry delay after a refusal (`backoff.initial`): full jitter alone could
    /// retry at once.
    refusal_floor: std::time::Duration,
    /// The end of the current refusal delay, kept across epochs: a broker may close the
    /// connection after refusing (Mosquitto 2.0 with persistence does), and the next epoch
    /// must not resend before the delay is over.
    refusal_until: Option<Instant>,
}

impl Uplink {
    pub fn new(
        settings: watch::Receiver<UplinkSettings>,
        spool: Spool,
        boot: String,
        shutdown: CancellationToken,
    ) -> Uplink {
        Uplink {
            settings,
            spool,
            boot,
            shutdown,
            stats: Arc::new(UplinkStats::default()),
            commands: None,
            flush: Arc::new(Notify::new()),
            heartbeat: Heartbeat::new("uplink"),
            sent_high: HashMap::new(),
            clock: Arc::new(crate::clock::SystemClock::new(
                crate::clock::DEFAULT_SYNC_MARKER.into(),
                false,
            )),
            budget: None,
            subscribed: None,
            version: VersionChoice::new(MqttVersion::default()),
            refusal_backoff: Backoff::new(
                std::time::Duration::from_secs(1),
                std::time::Duration::from_secs(60),
            ),
            refusal_floor: std::time::Duration::from_secs(1),
            refusal_until: None,
        }
    }

    /// The clock the byte budget's periods follow.
    pub fn with_clock(mut self, clock: Arc<dyn ClockSource>) -> Uplink {
        self.clock = clock;
        self
    }

    /// The heartbeat this task keeps fresh while it is not stuck.
    pub fn heartbeat(&self) -> Heartbeat {
        self.heartbeat.clone()
    }

    /// Subscribes to the command topic and hands command publishes to `link`.
    pub fn with_commands(mut self, link: CommandLink) -> Uplink {
        self.commands = Some(link);
        self
    }

    pub fn stats(&self) -> Arc<UplinkStats> {
        self.stats.clone()
    }

    /// Notify to send lingering batches now.
    pub fn flush_handle(&self) -> Arc<Notify> {
        self.flush.clone()
    }

    /// Connects, drains, reconnects with backoff, until the shutdown token is cancelled.
    pub async fn run(mut self) {
        let first = self.settings.borrow().clone();
        self.open_budget(&first);
        let mut backoff = Backoff::new(first.backoff.initial, first.backoff.max);
        self.version = VersionChoice::new(first.mqtt_version);
        self.refusal_backoff = Backoff::new(first.backoff.initial, first.backoff.max);
        self.refusal_floor = first.backoff.initial;
        let mut last_error = String::new();
        let mut epoch = 0u64;
        let mut link = self.commands.take();
        loop {
            epoch += 1;
            let ctx = self.epoch_ctx(epoch);
            let started = Instant::now();
            let end = self.epoch(&ctx, link.as_mut()).await;
            self.stats.connected.store(false, Ordering::Relaxed);
            let (error, serious, was_connected) = match end {
                EpochEnd::Shutdown => break,
                EpochEnd::Reconfigured => {
                    let s = self.settings.borrow().clone();
                    backoff = Backoff::new(s.backoff.initial, s.backoff.max);
                    self.refusal_backoff = Backoff::new(s.backoff.initial, s.backoff.max);
                    self.refusal_floor = s.backoff.initial;
                    continue;
                }
                EpochEnd::FellBack => continue,
                EpochEnd::Failed {
                    error,
                    serious,
                    was_connected,
                } => (error, serious, was_connected),
            };
            if was_connected && started.elapsed() >= ctx.s.backoff.reset_after {
                backoff.reset();
            }
            let delay = backoff.next_delay();
            let failure = Failure {
                broker: format!("{}:{}", ctx.s.host, ctx.s.port),
                retry_in_ms: delay.as_millis() as u64,
                attempt: backoff.attempts(),
                serious,
                was_connected,
            };
            self.report_failure(&failure, &error, &last_error);
            last_error = error;
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                _ = self.heartbeat.sleep(delay) => {}
                r = self.settings.changed() => if r.is_ok() { backoff.reset(); },
            }
        }
        info!("Uplink stopped.");
    }

    fn open_budget(&mut self, first: &UplinkSettings) {
        match self.spool.open_tree("budget") {
            Ok(tree) => {
                self.budget = Some(Budget::open(
                    tree,
                    first.budget,
                    self.clock.clone(),
                    self.stats.budget.clone(),
                ));
            }
            Err(e) if first.budget != Default::default() => {
                error!(error = %e, "Cannot open the byte budget's counts; sending without a budget.");
            }
            Err(_) => {}
        }
    }

    /// The settings as they are now, for epoch `epoch`.
    fn epoch_ctx(&mut self, epoch: u64) -> EpochCtx {
        let s = self.settings.borrow_and_update().clone();
        if s.mqtt_version != self.version.configured {
            self.version = VersionChoice::new(s.mqtt_version);
        }
        let topics = Topics::new(&s.topic_prefix, &s.device_id);
        if let Some(b) = self.budget.as_mut() {
            b.set_limits(s.budget);
        }
        EpochCtx {
            commands_topic: topics.commands(),
            topics,
            origin: Origin {
                device: s.device_id.clone(),
                boot: self.boot.clone(),
            },
            streams: Arc::new(s.streams.clone()),
            version: self.version.effective(),
            s,
            epoch,
        }
    }

    /// A CONNECT that failed: falls back to 3.1.1 when the broker refused version 5.
    fn connect_failed(&mut self, ctx: &EpochCtx, f: link::LinkFailure) -> EpochEnd {
        if self.version.should_fall_back(f.version) {
            warn!(broker = %format!("{}:{}", ctx.s.host, ctx.s.port), error = %f.error, "The broker does not accept MQTT 5; falling back to MQTT 3.1.1 (refused publishes cannot be detected; set uplink.mqtt_version: 3.1.1 to skip the attempt).");
            return EpochEnd::FellBack;
        }
        epoch::end_of(f, false)
    }

    /// Records and logs a failed epoch: the error kind once, then every tenth repeat.
    fn report_failure(&self, f: &Failure, error: &str, last_error: &str) {
        let Failure {
            broker,
            retry_in_ms,
            attempt,
            ..
        } = f;
        self.stats.backoff_ms.store(*retry_in_ms, Ordering::Relaxed);
        *self
            .stats
            .last_error
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(error.to_string());
        if error != last_error || attempt.is_multiple_of(10) {
            if f.serious {
                error!(%broker, retry_in_ms, attempt, error = %error, "Cannot connect to the broker; data stays in the spool.");
            } else if f.was_connected {
                warn!(%broker, retry_in_ms, error = %error, "Connection lost; unacknowledged data will be resent.");
            } else {
                warn!(%broker, retry_in_ms, attempt, error = %error, "Cannot connect to the broker; data stays in the spool.");
            }
        } else {
            debug!(%broker, retry_in_ms, attempt, error = %error, "Still cannot connect.");
        }
    }
}

/// A failed epoch, as the reconnect loop reports it.
struct Failure {
    broker: String,
    retry_in_ms: u64,
    attempt: u32,
    serious: bool,
    was_connected: bool,
}

#[cfg(test)]
mod tests {
    use super::link::VersionRefusal;
    use super::*;

    #[test]
    fn an_explicit_refusal_falls_back_at_once() {
        let mut v = VersionChoice::new(MqttVersion::V5);
        assert_eq!(v.effective(), MqttVersion::V5);
        assert!(v.should_fall_back(VersionRefusal::Explicit));
        assert_eq!(v.effective(), MqttVersion::V311);
        assert!(v.fell_back());
        // Already on 3.1.1: nothing more to fall back to.
        assert!(!v.should_fall_back(VersionRefusal::Explicit));
    }

    #[test]
    fn closes_without_connack_fall_back_only_when_repeated() {
        let mut v = VersionChoice::new(MqttVersion::V5);
        assert!(!v.should_fall_back(VersionRefusal::ClosedBeforeConnack));
        // Another kind of failure in between (a broker restarting) starts the count again.
        assert!(!v.should_fall_back(VersionRefusal::No));
        assert!(!v.should_fall_back(VersionRefusal::ClosedBeforeConnack));
        v.connected();
        assert!(!v.should_fall_back(VersionRefusal::ClosedBeforeConnack));
        assert!(v.should_fall_back(VersionRefusal::ClosedBeforeConnack));
        assert_eq!(v.effective(), MqttVersion::V311);
    }

    #[test]
    fn a_configured_3_1_1_never_changes() {
        let mut v = VersionChoice::new(MqttVersion::V311);
        assert!(!v.should_fall_back(VersionRefusal::Explicit));
        assert!(!v.fell_back());
        assert_eq!(v.effective(), MqttVersion::V311);
    }
}
