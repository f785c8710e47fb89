//! Runs every enabled collector and restarts the ones that fail.
//!
//! This is the only place collectors are retried: a failed run is logged with its error,
//! counted, and restarted after an exponential backoff with jitter. A run that lasted
//! [`HEALTHY_RUN`] resets the backoff, so a collector that fails once a day restarts fast.

use super::{CollectorConfig, CollectorContext, Positions};
use crate::backoff::Backoff;
use crate::spool::Intake;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Per-collector restart counters, readable while the agent runs.
#[derive(Debug, Default)]
pub struct CollectorStats {
    pub name: String,
    pub restarts: AtomicU64,
}

/// Starts one supervised task per enabled collector on `tracker`.
pub fn spawn_all(
    configs: &[CollectorConfig],
    intake: &mpsc::Sender<Intake>,
    shutdown: &CancellationToken,
    positions: &Positions,
    tracker: &TaskTracker,
) -> Vec<Arc<CollectorStats>> {
    let mut stats = Vec::new();
    for config in configs.iter().filter(|c| c.enabled()) {
        let ctx = CollectorContext {
            name: config.name().to_string(),
            intake: intake.clone(),
            shutdown: shutdown.clone(),
            positions: positions.clone(),
        };
        let s = Arc::new(CollectorStats {
            name: ctx.name.clone(),
            restarts: AtomicU64::new(0),
        });
        stats.push(s.clone());
        tracker.spawn(supervise(config.clone(), ctx, s));
    }
    stats
}

async fn supervise(config: CollectorConfig, ctx: CollectorContext, stats: Arc<CollectorStats>) {
    let mut backoff = Backoff::new(RESTART_INITIAL, RESTART_MAX);
    info!(collector = %ctx.name, "Collector started.");
    loop {
        let started = Instant::now();
        let result = config.build().run(ctx.clone()).await;
        if ctx.shutdown.is_cancelled() {
            break;
        }
        if started.elapsed() >= HEALTHY_RUN {
            backoff.reset();
        }
        let delay = backoff.next_delay();
        let restarts = stats.restarts.fetch_add(1, Ordering::Relaxed) + 1;
        match result {
            Err(super::CollectorError::SpoolClosed) => break,
            Err(e) => {
                warn!(collector = %ctx.name, error = %e, restarts, retry_in_ms = delay.as_millis() as u64, "Collector failed; restarting.")
            }
            Ok(()) => {
                warn!(collector = %ctx.name, restarts, retry_in_ms = delay.as_millis() as u64, "Collector stopped on its own; restarting.")
            }
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tokio::time::sleep(delay) => {}
        }
    }
    info!(collector = %ctx.name, "Collector stopped.");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A serial collector on a device that does not exist fails at once, every time.
    fn failing() -> CollectorConfig {
        CollectorConfig::from_yaml(
            serde_yaml::from_str("type: serial\nname: gone\npath: /nonexistent/ttyUSB7\n").unwrap(),
        )
        .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_collector_is_restarted_with_backoff_and_counted() {
        let (tx, _rx) = mpsc::channel(8);
        let shutdown = CancellationToken::new();
        let tracker = TaskTracker::new();
        let stats = spawn_all(
            &[failing()],
            &tx,
            &shutdown,
            &Positions::in_memory(),
            &tracker,
        );
        let start = tokio::time::Instant::now();
        // Paused time: each backoff sleep is skipped as soon as everything else is idle.
        while stats[0].restarts.load(Ordering::Relaxed) < 4 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Four restarts: backoff ceilings 1 + 2 + 4 + 8 s at most (full jitter).
        assert!(
            start.elapsed() <= Duration::from_secs(16),
            "{:?}",
            start.elapsed()
        );
        // Backoff, not a busy loop: a minute of virtual time holds only a handful of restarts.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let restarts = stats[0].restarts.load(Ordering::Relaxed);
        assert!((4..50).contains(&restarts), "{restarts} restarts");
        shutdown.cancel();
        tracker.close();
        tracker.wait().await;
    }
}
