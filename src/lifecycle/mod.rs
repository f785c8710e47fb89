//! Start-up order, runtime control, signals and the shutdown phases.
//!
//! Start: logging, then config (exit 78 on a bad one), then the spool is opened, the writer,
//! the uplink and the command service start, then the collectors, then `READY=1` goes to
//! systemd. The lifecycle loop then serves [`crate::control::Request`]s (remote commands, SIGHUP)
//! until a stop signal.
//!
//! Reload (SIGHUP or `reload_config`): the file is validated first; a bad file changes nothing
//! and its errors are logged and returned. A good one is applied: collectors whose config
//! changed restart, uplink changes reconnect with the new settings, the log level changes.
//! Spool and command settings take effect at the next start (the reload says so).
//!
//! Shutdown (SIGTERM or SIGINT), in phases with deadlines:
//! 1. collectors stop (their shutdown tokens are cancelled) and hand over what they sampled;
//! 2. the command service stops (running actions' process groups are killed and their
//!    `interrupted` replies committed); the writer commits everything handed over and ends when
//!    the intake channel is drained;
//! 3. the uplink stops sending, waits up to `shutdown_grace_ms` for outstanding PUBACKs,
//!    publishes the retained `offline` status and disconnects;
//! 4. the spool is flushed (including lazy deletions) and the process exits 0.
//!
//! A second SIGTERM/SIGINT exits at once: whatever was committed is already durable.

pub mod dry_run;
pub mod logging;
pub mod self_metrics;
pub mod signals;
pub mod status_socket;

use crate::clock::{ClockSource, SystemClock};
use crate::collectors::Positions;
use crate::collectors::supervisor::Supervisor;
use crate::command_link::CommandLink;
use crate::commands::CommandService;
use crate::config::{self, Config};
use crate::control::{Control, Request};
use crate::heartbeat::{self, Heartbeat};
use crate::spool::{Spool, writer};
use crate::uplink::{Uplink, UplinkStats};
use logging::LogHandle;
use sha2::Digest;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// How long collectors get to stop before the writer is drained without them.
const COLLECTOR_STOP_DEADLINE: Duration = Duration::from_secs(5);
/// How long the writer gets to commit what was handed over.
const WRITER_DEADLINE: Duration = Duration::from_secs(10);
/// How often STATUS= is refreshed when systemd's watchdog is off.
const STATUS_PERIOD: Duration = Duration::from_secs(10);
/// Command publishes waiting for the command service; beyond this they are not acknowledged
/// and the broker redelivers them after a reconnect.
const COMMAND_QUEUE: usize = 32;
/// Ids of commands refused as busy (acknowledged already) waiting for their error reply.
const BUSY_QUEUE: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
    #[error("{0}")]
    Commands(#[from] crate::commands::CommandError),
}

/// A new id per start of the agent, carried by every message so consumers can tell restarts.
pub fn boot_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// First 16 hex digits of the SHA-256 of the config file, to tell which config a device runs.
pub fn config_hash(path: &std::path::Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => hex::encode(&sha2::Sha256::digest(&bytes)[..8]),
        Err(_) => "unreadable".into(),
    }
}

/// How often the clock's sync state is checked.
const CLOCK_CHECK: Duration = Duration::from_secs(5);

/// Warns while the clock is not synchronised; once it is, corrects the timestamps of the
/// records stamped before (see [`crate::clock`]).
pub async fn watch_clock(clock: Arc<dyn ClockSource>, spool: Spool, stop: CancellationToken) {
    if clock.synced() {
        return;
    }
    warn!(
        "The system clock is not known to be synchronised; records are flagged \"clock\": \"unsynced\" until it is."
    );
    let mut tick = tokio::time::interval(CLOCK_CHECK);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        if clock.synced() {
            let s = spool.clone();
            match tokio::task::spawn_blocking(move || s.correct_clock()).await {
                Ok(Ok(n)) => info!(
                    corrected = n,
                    "The system clock is synchronised; corrected the timestamps of stored records."
                ),
                Ok(Err(e)) => {
                    error!(error = %e, "Cannot correct stored timestamps; they stay flagged unsynced.")
                }
                Err(e) => error!(error = %e, "Timestamp correction panicked."),
            }
            return;
        }
    }
}

/// The parts the lifecycle loop owns and changes at runtime.
struct Running {
    config: Config,
    config_hash: String,
    log: LogHandle,
    supervisor: Supervisor,
    uplink_settings: watch::Sender<crate::uplink::UplinkSettings>,
    uplink_stats: Arc<UplinkStats>,
    /// Commands refused by reason (all zero when commands are off).
    refused: Arc<crate::commands::RefusedCounts>,
    spool: Spool,
    boot: String,
    started: Instant,
}

/// Runs the agent until a shutdown signal, then shuts down in phases.
pub async fn run(config: Config, log: LogHandle) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    let (control, mut requests) = Control::channel();
    signals::install(shutdown.clone(), control.clone()).map_err(RunError::Signals)?;

    let boot = boot_id();
    info!(version = crate::VERSION, device = %config.device_id, device_id_from = %config.device_id_source, boot = %boot, config = %config.source.display(), "ferry starting.");
    let settings = config.spool.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(&settings))
        .await
        .expect("spool open does not panic")?;
    let stats = spool.stats();
    info!(dir = %config.spool.dir.display(), records = stats.records, bytes = stats.bytes, "Spool opened.");
    let clock: Arc<dyn ClockSource> = Arc::new(SystemClock::new(
        config.clock.sync_marker.clone(),
        config.clock.assume_synced,
    ));
    spool.set_clock(clock.clone());

    let (intake, intake_rx) = writer::channel();
    let writer_beat = Heartbeat::new("spool writer");
    let writer_task = tokio::spawn(writer::run(
        spool.clone(),
        intake_rx,
        config.spool.flush_interval,
        config.spool.flush_max_records,
        writer_beat.clone(),
    ));

    let uplink_stop = CancellationToken::new();
    let (uplink_settings, settings_rx) = watch::channel(config.uplink.clone());
    let mut uplink = Uplink::new(
        settings_rx,
        spool.clone(),
        boot.clone(),
        uplink_stop.clone(),
    );
    uplink = uplink.with_clock(clock.clone());
    let uplink_stats = uplink.stats();
    let commands_stop = CancellationToken::new();
    let mut commands_task = None;
    let mut refused = Arc::default();
    if config.commands.enabled {
        let (deliveries_tx, deliveries) = mpsc::channel(COMMAND_QUEUE);
        let (acks, acks_rx) = mpsc::channel(COMMAND_QUEUE);
        let (busy_tx, busy) = mpsc::channel(BUSY_QUEUE);
        let service = CommandService::new(
            config.commands.clone(),
            spool.open_tree("commands")?,
            // The ledger's entries are durable as commits are (fdatasync), before an action runs.
            {
                let spool = spool.clone();
                Box::new(move || spool.flush())
            },
            intake.clone(),
            control.clone(),
            uplink.flush_handle(),
        )?;
        refused = service.refused();
        commands_task = Some(tokio::spawn(service.run(
            deliveries,
            busy,
            acks,
            commands_stop.clone(),
        )));
        uplink = uplink.with_commands(CommandLink {
            deliveries: deliveries_tx,
            busy: busy_tx,
            acks: acks_rx,
        });
    }
    let heartbeats = vec![writer_beat, uplink.heartbeat()];
    let uplink_task = tokio::spawn(uplink.run());

    let side_stop = CancellationToken::new();
    let mut side_tasks = Vec::new();
    if let Some(listener) = status_socket::bind(&config.status_socket).await {
        side_tasks.push(tokio::spawn(status_socket::serve(
            listener,
            config.status_socket.clone(),
            control.clone(),
            side_stop.clone(),
        )));
    }
    side_tasks.push(tokio::spawn(watch_clock(
        clock,
        spool.clone(),
        side_stop.clone(),
    )));
    if !config.self_metrics_interval.is_zero() {
        side_tasks.push(tokio::spawn(self_metrics::run(
            control.clone(),
            intake.clone(),
            config.self_metrics_interval,
            side_stop.clone(),
        )));
    }

    let mut supervisor = Supervisor::new(
        intake,
        Positions::from_spool(spool.clone()),
        shutdown.child_token(),
    );
    supervisor.apply(&config.collectors).await;
    info!(collectors = supervisor.len(), "Collectors running.");

    let mut running = Running {
        config_hash: config_hash(&config.source),
        config,
        log,
        supervisor,
        uplink_settings,
        uplink_stats,
        refused,
        spool: spool.clone(),
        boot,
        started: Instant::now(),
    };
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    // Ping at half the watchdog period; without a watchdog, refresh STATUS= every 10 s.
    let watchdog = sd_notify::watchdog_enabled();
    let mut ping = tokio::time::interval(watchdog.map_or(STATUS_PERIOD, |w| w / 2));
    let stale_after = watchdog.map_or(STATUS_PERIOD * 3, |w| w / 2);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(req) = requests.recv() => running.serve(req).await,
            _ = ping.tick() => running.notify_alive(&heartbeats, watchdog.is_some(), stale_after),
        }
    }
    info!("Shutting down.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    // 1. Collectors.
    if !running.supervisor.stop_all(COLLECTOR_STOP_DEADLINE).await {
        warn!("Some collectors did not stop in time.");
    }
    // 2. Command service and side tasks, then the writer: it ends once every sender is gone and
    //    the channel is drained.
    side_stop.cancel();
    for task in side_tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }
    commands_stop.cancel();
    if let Some(task) = commands_task {
        let _ = tokio::time::timeout(Duration::from_secs(5), task).await;
    }
    if tokio::time::timeout(WRITER_DEADLINE, writer_task)
        .await
        .is_err()
    {
        error!(
            "The spool writer did not finish in time; readings handed over in the last moments may be lost."
        );
    }
    // 3. Uplink.
    uplink_stop.cancel();
    let grace = running.config.uplink.shutdown_grace + Duration::from_secs(5);
    if tokio::time::timeout(grace, uplink_task).await.is_err() {
        warn!("The uplink did not stop in time.");
    }
    // 4. Spool.
    let s = spool.clone();
    match tokio::task::spawn_blocking(move || s.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => error!(error = %e, "Cannot flush the spool at shutdown."),
        Err(e) => error!(error = %e, "Spool flush panicked."),
    }
    let stats = spool.stats();
    info!(
        records = stats.records,
        bytes = stats.bytes,
        "ferry stopped; records not yet delivered stay in the spool."
    );
    Ok(())
}

impl Running {
    /// Sends STATUS= and, while every critical task is alive, WATCHDOG=1.
    fn notify_alive(&self, beats: &[Heartbeat], watchdog: bool, stale_after: Duration) {
        let stats = self.spool.stats();
        let link = if self.uplink_stats.connected.load(Ordering::Relaxed) {
            "connected"
        } else {
            "disconnected"
        };
        let status = format!(
            "{link} to {}:{}; spool {} records, {} bytes",
            self.config.uplink.host, self.config.uplink.port, stats.records, stats.bytes
        );
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Status(&status)]);
        if !watchdog {
            return;
        }
        match heartbeat::stalled(beats, stale_after) {
            None => {
                let _ = sd_notify::notify(&[sd_notify::NotifyState::Watchdog]);
            }
            Some(b) => error!(
                task = b.name(),
                stalled_s = b.age().as_secs(),
                "A task is stuck; not pinging the watchdog, so systemd restarts ferry."
            ),
        }
    }

    async fn serve(&mut self, req: Request) {
        match req {
            Request::Reload(reply) => {
                let outcome = self.reload().await;
                match &outcome {
                    Ok(changes) if changes.is_empty() => info!("Config reloaded: nothing changed."),
                    Ok(changes) => info!(changes = %changes.join("; "), "Config reloaded."),
                    Err(issues) => {
                        for i in issues {
                            error!("Reload refused, the running config stays: {i}");
                        }
                    }
                }
                let _ = reply.send(outcome);
            }
            Request::SetInterval {
                collector,
                interval_ms,
                reply,
            } => {
                let r = self.supervisor.set_interval(&collector, interval_ms).await;
                if r.is_ok() {
                    info!(%collector, interval_ms, "Collector interval changed until the next reload or restart.");
                }
                let _ = reply.send(r);
            }
            Request::SampleNow { collector, reply } => {
                let _ = reply.send(self.supervisor.sample_now(&collector));
            }
            Request::SetLogLevel { level, reply } => {
                let r = self.log.set_level_now(&level);
                if r.is_ok() {
                    info!(%level, "Log level changed until the next restart.");
                }
                let _ = reply.send(r);
            }
            Request::Status(reply) => {
                let status = self.status().await;
                let _ = reply.send(status);
            }
        }
    }

    async fn reload(&mut self) -> Result<Vec<String>, Vec<String>> {
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Reloading]);
        let result = self.apply_new_config().await;
        let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
        result
    }

    async fn apply_new_config(&mut self) -> Result<Vec<String>, Vec<String>> {
        let mut new = config::load(&self.config.source).map_err(|e| e.issues())?;
        let old = &self.config;
        let mut changes = Vec::new();
        if new.spool != old.spool {
            changes.push("spool settings take effect at the next start".to_string());
            new.spool = old.spool.clone();
        }
        if new.commands != old.commands {
            changes.push("command settings take effect at the next start".to_string());
            new.commands = old.commands.clone();
        }
        if new.uplink != old.uplink {
            changes.push("uplink settings changed; reconnecting".to_string());
            self.uplink_settings.send_replace(new.uplink.clone());
        }
        if new.log_level != old.log_level {
            self.log.set_level(new.log_level.as_deref());
            changes.push(format!(
                "log level {}",
                new.log_level.as_deref().unwrap_or("info")
            ));
        }
        changes.extend(self.supervisor.apply(&new.collectors).await);
        self.config_hash = config_hash(&new.source);
        self.config = new;
        Ok(changes)
    }

    async fn status(&self) -> serde_json::Value {
        let spool = self.spool.clone();
        let (stats, oldest) =
            tokio::task::spawn_blocking(move || (spool.stats(), spool.oldest_committed_ms()))
                .await
                .unwrap_or_default();
        let now = crate::clock::now_ms();
        let u = &self.uplink_stats;
        let s = &self.config.uplink;
        serde_json::json!({
            "version": crate::VERSION,
            "device": self.config.device_id,
            "boot": self.boot,
            "uptime_s": self.started.elapsed().as_secs(),
            "config_hash": self.config_hash,
            "connection": {
                "broker": format!("{}:{}", s.host, s.port),
                "connected": u.connected.load(Ordering::Relaxed),
                "connects": u.connects.load(Ordering::Relaxed),
                "backoff_ms": u.backoff_ms.load(Ordering::Relaxed),
                "last_error": *u.last_error.lock().unwrap_or_else(|p| p.into_inner()),
                "messages_published": u.messages_published.load(Ordering::Relaxed),
                "records_acked": u.records_acked.load(Ordering::Relaxed),
                "mqtt_version": u
                    .protocol
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
                    .unwrap_or_else(|| s.mqtt_version.as_str().to_string()),
                "publishes_refused": u.publishes_refused.load(Ordering::Relaxed),
                "records_refused": u.records_refused.load(Ordering::Relaxed),
                "last_refusal": *u.last_refusal.lock().unwrap_or_else(|p| p.into_inner()),
            },
            "budget": {
                "daily_limit": s.budget.daily_bytes,
                "daily_used": u.budget.day_used.load(Ordering::Relaxed),
                "monthly_limit": s.budget.monthly_bytes,
                "monthly_used": u.budget.month_used.load(Ordering::Relaxed),
                "spent": u.budget.spent.load(Ordering::Relaxed),
            },
            "counters": {
                "collected": stats.counters.collected,
                "committed": stats.counters.committed,
                "published": u.records_published.load(Ordering::Relaxed),
                "acked": u.records_acked.load(Ordering::Relaxed),
                "resent": u.records_resent.load(Ordering::Relaxed),
                "evicted": stats.streams.iter().map(|st| st.evicted).sum::<u64>(),
                "lost_by_reason": stats.counters.lost,
            },
            "spool": {
                "records": stats.records,
                "bytes": stats.bytes,
                "streams": stats.streams.iter().map(|st| serde_json::json!({
                    "name": st.name,
                    "records": st.records,
                    "bytes": st.bytes,
                    "next_seq": st.next_seq,
                    "evicted": st.evicted,
                    "oldest_age_ms": oldest.get(&st.name).map(|t| now.saturating_sub(*t)),
                })).collect::<Vec<_>>(),
            },
            "commands": { "refused": self.refused.to_json() },
            "collectors": self.supervisor.states(),
        })
    }
}
