//! Start-up order, signals and the shutdown phases.
//!
//! Start: logging, then config (exit 78 on a bad one), then the spool is opened, the writer and
//! the uplink start, then the collectors, then `READY=1` goes to systemd.
//!
//! Shutdown (SIGTERM or SIGINT), in phases with deadlines:
//! 1. collectors stop (their shutdown token is cancelled) and hand over what they sampled;
//! 2. the writer commits everything handed over and ends when the intake channel is drained;
//! 3. the uplink stops sending, waits up to `shutdown_grace_ms` for outstanding PUBACKs,
//!    publishes the retained `offline` status and disconnects;
//! 4. the spool is flushed (including lazy deletions) and the process exits 0.
//!
//! A second SIGTERM/SIGINT exits at once: whatever was committed is already durable.

pub mod logging;
pub mod signals;

use crate::collectors::supervisor;
use crate::config::Config;
use crate::spool::{Spool, writer};
use crate::uplink::Uplink;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

/// How long collectors get to stop before the writer is drained without them.
const COLLECTOR_STOP_DEADLINE: Duration = Duration::from_secs(5);
/// How long the writer gets to commit what was handed over.
const WRITER_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("{0}")]
    Spool(#[from] crate::spool::SpoolError),
    #[error("cannot install signal handlers: {0}")]
    Signals(std::io::Error),
}

/// A new id per start of the agent, carried by every message so consumers can tell restarts.
pub fn boot_id() -> String {
    format!("{:016x}", fastrand::u64(..))
}

/// Runs the agent until a shutdown signal, then shuts down in phases.
pub async fn run(config: Config) -> Result<(), RunError> {
    let shutdown = CancellationToken::new();
    signals::install(shutdown.clone()).map_err(RunError::Signals)?;

    let settings = config.spool.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(&settings))
        .await
        .expect("spool open does not panic")?;
    let stats = spool.stats();
    info!(dir = %config.spool.dir.display(), records = stats.records, bytes = stats.bytes, "Spool opened.");

    let boot = boot_id();
    info!(version = crate::VERSION, device = %config.device_id, boot = %boot, config = %config.source.display(), "ferry starting.");

    let (intake, intake_rx) = writer::channel();
    let writer_task = tokio::spawn(writer::run(
        spool.clone(),
        intake_rx,
        config.spool.flush_interval,
        config.spool.flush_max_records,
    ));

    let uplink_stop = CancellationToken::new();
    let uplink = Uplink::new(
        config.uplink.clone(),
        spool.clone(),
        boot,
        uplink_stop.clone(),
    );
    let uplink_task = tokio::spawn(uplink.run());

    let collectors_stop = shutdown.child_token();
    let tracker = TaskTracker::new();
    let positions = crate::collectors::Positions::from_spool(spool.clone());
    let started = supervisor::spawn_all(
        &config.collectors,
        &intake,
        &collectors_stop,
        &positions,
        &tracker,
    );
    tracker.close();
    info!(collectors = started.len(), "Collectors running.");
    drop(intake);

    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    shutdown.cancelled().await;
    info!("Shutting down.");
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);

    // 1. Collectors.
    collectors_stop.cancel();
    if tokio::time::timeout(COLLECTOR_STOP_DEADLINE, tracker.wait())
        .await
        .is_err()
    {
        warn!("Some collectors did not stop in time.");
    }
    // 2. Writer: ends once every collector's sender is gone and the channel is drained.
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
    let grace = config.uplink.shutdown_grace + Duration::from_secs(5);
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
