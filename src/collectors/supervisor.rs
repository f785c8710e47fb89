//! Runs every enabled collector and restarts the ones that fail.
//!
//! This is the only place collectors are retried: a failed run is logged with its error,
//! counted, and restarted after an exponential backoff with jitter. A run that lasted
//! [`HEALTHY_RUN`] resets the backoff, so a collector that fails once a day restarts fast.
//!
//! The [`Supervisor`] also applies configuration changes at runtime: a collector whose config
//! changed is stopped and started again with the new one, a removed one is stopped, a new one
//! started. Each collector has its own shutdown token (a child of the agent's), so stopping one
//! does not disturb the others.
//!
//! A collector's [deadband](super::deadband) filter lives here, not in a run: a restarted run,
//! or a collector restarted by a reload (or `set_interval`) whose `deadband` config is
//! unchanged, goes on from the same baselines, heartbeat count and suppressed count. A changed
//! `deadband` config starts a fresh filter (its first reading is a heartbeat); a removed
//! collector's filter is dropped.

use super::deadband::{Deadband, DeadbandConfig};
use super::{CollectorConfig, CollectorContext, Positions, SharedDeadband};
use crate::backoff::Backoff;
use crate::spool::Intake;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

const RESTART_INITIAL: Duration = Duration::from_secs(1);
const RESTART_MAX: Duration = Duration::from_secs(60);
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Per-collector restart counter, readable while the agent runs.
#[derive(Debug, Default)]
pub struct CollectorStats {
    pub restarts: AtomicU64,
}

struct Running {
    config: CollectorConfig,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<()>,
    sample_now: Arc<Notify>,
    stats: Arc<CollectorStats>,
}

/// A collector's deadband filter with the config it was made from.
struct Filter {
    config: DeadbandConfig,
    state: SharedDeadband,
}

/// The running collectors.
pub struct Supervisor {
    intake: mpsc::Sender<Intake>,
    positions: Positions,
    shutdown: CancellationToken,
    tracker: TaskTracker,
    running: BTreeMap<String, Running>,
    /// Deadband filters by collector name; outlive the runs (see the module doc).
    filters: BTreeMap<String, Filter>,
}

/// A collector's state for status reports.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CollectorState {
    pub name: String,
    pub kind: &'static str,
    pub restarts: u64,
    /// Field values its deadband left out (0 without a deadband).
    pub suppressed: u64,
}

impl Supervisor {
    pub fn new(
        intake: mpsc::Sender<Intake>,
        positions: Positions,
        shutdown: CancellationToken,
    ) -> Supervisor {
        Supervisor {
            intake,
            positions,
            shutdown,
            tracker: TaskTracker::new(),
            running: BTreeMap::new(),
            filters: BTreeMap::new(),
        }
    }

    /// Makes the running set match `configs` (enabled ones only); returns what changed.
    pub async fn apply(&mut self, configs: &[CollectorConfig]) -> Vec<String> {
        let wanted: BTreeMap<&str, &CollectorConfig> = configs
            .iter()
            .filter(|c| c.enabled())
            .map(|c| (c.name(), c))
            .collect();
        let mut changes = Vec::new();
        let mut stopped = Vec::new();
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            match wanted.get(name.as_str()) {
                Some(c) if **c == self.running[&name].config => {}
                Some(_) => {
                    stopped.extend(self.stop(&name));
                    changes.push(format!("collector {name} restarted with its new config"));
                }
                None => {
                    stopped.extend(self.stop(&name));
                    self.filters.remove(&name);
                    changes.push(format!("collector {name} stopped"));
                }
            }
        }
        wait_stopped(stopped).await;
        for (name, config) in wanted {
            if !self.running.contains_key(name) {
                if !changes
                    .iter()
                    .any(|c| c.contains(&format!("collector {name} ")))
                {
                    changes.push(format!("collector {name} started"));
                }
                self.start((*config).clone());
            }
        }
        changes
    }

    fn start(&mut self, config: CollectorConfig) {
        let stop = self.shutdown.child_token();
        let sample_now = Arc::new(Notify::new());
        let stats = Arc::new(CollectorStats::default());
        let ctx = CollectorContext {
            name: config.name().to_string(),
            intake: self.intake.clone(),
            shutdown: stop.clone(),
            positions: self.positions.clone(),
            sample_now: sample_now.clone(),
            deadband: self.filter_for(&config),
        };
        let task = self
            .tracker
            .spawn(supervise(config.clone(), ctx, stats.clone()));
        self.running.insert(
            config.name().to_string(),
            Running {
                config,
                stop,
                task,
                sample_now,
                stats,
            },
        );
    }

    /// The collector's deadband filter: the one it had if its deadband config is unchanged.
    fn filter_for(&mut self, config: &CollectorConfig) -> Option<SharedDeadband> {
        let name = config.name();
        let Some(wanted) = config.deadband() else {
            self.filters.remove(name);
            return None;
        };
        let fresh = || Filter {
            config: wanted.clone(),
            state: Arc::new(std::sync::Mutex::new(Deadband::new(wanted))),
        };
        let filter = self
            .filters
            .entry(name.to_string())
            .and_modify(|f| {
                if f.config != *wanted {
                    *f = fresh();
                }
            })
            .or_insert_with(fresh);
        Some(filter.state.clone())
    }

    /// Cancels a collector; the returned task ends once it has handed over what it had.
    fn stop(&mut self, name: &str) -> Option<tokio::task::JoinHandle<()>> {
        let r = self.running.remove(name)?;
        r.stop.cancel();
        Some(r.task)
    }

    /// Restarts one collector with a new interval.
    pub async fn set_interval(&mut self, name: &str, interval_ms: u64) -> Result<(), String> {
        let r = self
            .running
            .get(name)
            .ok_or_else(|| format!("no running collector named {name:?}"))?;
        let mut config = r.config.clone();
        if !config.set_interval_ms(interval_ms) {
            return Err(format!("collector {name:?} has no interval"));
        }
        let issues = config.validate();
        if let Some(i) = issues.first() {
            return Err(format!("{}: {}", i.path, i.message));
        }
        wait_stopped(self.stop(name)).await;
        self.start(config);
        Ok(())
    }

    pub fn sample_now(&self, name: &str) -> Result<(), String> {
        let r = self
            .running
            .get(name)
            .ok_or_else(|| format!("no running collector named {name:?}"))?;
        r.sample_now.notify_one();
        Ok(())
    }

    pub fn states(&self) -> Vec<CollectorState> {
        self.running
            .iter()
            .map(|(name, r)| CollectorState {
                name: name.clone(),
                kind: r.config.kind(),
                restarts: r.stats.restarts.load(Ordering::Relaxed),
                suppressed: self.filters.get(name).map_or(0, |f| {
                    f.state
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .suppressed()
                }),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }

    /// Stops every collector and waits up to `deadline` for them to hand over what they have.
    /// Returns false if some did not stop in time.
    pub async fn stop_all(mut self, deadline: Duration) -> bool {
        let names: Vec<String> = self.running.keys().cloned().collect();
        for name in names {
            self.stop(&name);
        }
        self.tracker.close();
        // Our own intake sender goes with `self`, so the writer can see the channel close.
        let tracker = self.tracker.clone();
        drop(self);
        tokio::time::timeout(deadline, tracker.wait()).await.is_ok()
    }
}

/// How long a restarted collector's old run gets to end before the new run starts anyway.
const OLD_RUN_WAIT: Duration = Duration::from_secs(10);

/// Waits for stopped runs to end, so a new run of the same collector never overlaps the old
/// one (a file tail would read past what the old run had not committed yet; a serial port is
/// opened exclusively).
async fn wait_stopped(tasks: impl IntoIterator<Item = tokio::task::JoinHandle<()>>) {
    for task in tasks {
        if tokio::time::timeout(OLD_RUN_WAIT, task).await.is_err() {
            warn!("A stopped collector did not end in time; its replacement starts anyway.");
        }
    }
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

    fn restarts(s: &Supervisor) -> u64 {
        s.states()[0].restarts
    }

    fn with_deadband(interval: &str, deadband: &str) -> CollectorConfig {
        let yaml = format!(
            "type: file\nname: temps\nmode: poll\npaths: [/nonexistent/t]\ninterval_ms: {interval}\ndeadband: {deadband}\n"
        );
        CollectorConfig::from_yaml(serde_yaml::from_str(&yaml).unwrap()).unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadband_survives_a_reload_that_leaves_it_unchanged() {
        let (tx, _rx) = mpsc::channel(8);
        let mut sup = Supervisor::new(tx, Positions::in_memory(), CancellationToken::new());
        let filter = |s: &Supervisor| s.filters["temps"].state.clone();
        sup.apply(&[with_deadband("1000", "{default: 1, heartbeat: 5}")])
            .await;
        let first = filter(&sup);
        // A reload that changes another key restarts the collector with the same filter.
        let changes = sup
            .apply(&[with_deadband("2000", "{default: 1, heartbeat: 5}")])
            .await;
        assert_eq!(changes, ["collector temps restarted with its new config"]);
        assert!(Arc::ptr_eq(&first, &filter(&sup)));
        sup.set_interval("temps", 3000).await.unwrap();
        assert!(Arc::ptr_eq(&first, &filter(&sup)));
        // A changed deadband starts afresh; no deadband, or no collector, keeps no filter.
        sup.apply(&[with_deadband("3000", "{default: 2, heartbeat: 5}")])
            .await;
        assert!(!Arc::ptr_eq(&first, &filter(&sup)));
        let plain = CollectorConfig::from_yaml(
            serde_yaml::from_str("type: file\nname: temps\nmode: poll\npaths: [/nonexistent/t]\n")
                .unwrap(),
        )
        .unwrap();
        sup.apply(&[plain]).await;
        assert!(sup.filters.is_empty());
        sup.apply(&[with_deadband("1000", "{heartbeat: 5}")]).await;
        sup.apply(&[]).await;
        assert!(sup.filters.is_empty());
        assert!(sup.stop_all(Duration::from_secs(5)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_collector_is_restarted_with_backoff_and_counted() {
        let (tx, _rx) = mpsc::channel(8);
        let mut sup = Supervisor::new(tx, Positions::in_memory(), CancellationToken::new());
        sup.apply(&[failing()]).await;
        let start = tokio::time::Instant::now();
        // Paused time: each backoff sleep is skipped as soon as everything else is idle.
        while restarts(&sup) < 4 {
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
        let n = restarts(&sup);
        assert!((4..50).contains(&n), "{n} restarts");
        assert!(sup.stop_all(Duration::from_secs(5)).await);
    }
}
