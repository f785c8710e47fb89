//! The end of a fault test: stop ferry cleanly, let it drain, and compare what its spool
//! accepted with what the subscriber received.
//!
//! [`stop_and_drain`] stops the agent with SIGTERM, reads each stream's `next_seq` from the
//! spool (every seq below it was accepted: durable, to be delivered or counted as lost), then
//! runs the agent again **without collectors**, so nothing new is produced, until its status
//! socket reports the spool empty for those streams and the subscriber has every accepted seq
//! (or the timeout passes), and stops it again. [`Drained`] then holds, per stream, the seqs
//! that never arrived, duplicates, what is left in the spool, evictions and `ferry.loss`
//! records; [`Drained::assert_nothing_lost`] fails the test on any of them. Duplicates are
//! allowed, but every copy of a seq must carry the same record: the subscriber compares them
//! as they arrive and the tally fails on a difference.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tokio::time::Instant;

use super::agent::{Agent, AgentConfig};
use super::subscriber::Subscriber;

/// How often the drain re-asks the agent for its spool's state.
const STATUS_POLL: Duration = Duration::from_millis(200);

/// The tally for one stream.
#[derive(Debug, Clone)]
pub struct StreamTally {
    pub name: String,
    /// Highest seq the spool accepted (`next_seq - 1`).
    pub accepted: u64,
    /// Records received, duplicates included.
    pub received: u64,
    /// Distinct seqs received within `1..=accepted`.
    pub delivered: u64,
    /// Seqs in `1..=accepted` never received.
    pub missing: Vec<u64>,
    /// Seqs received above `accepted` (impossible unless seqs are reused or misreported).
    pub beyond: Vec<u64>,
    /// Records still in the spool after the drain.
    pub left_in_spool: u64,
    /// Records the spool evicted (reported on `ferry.loss`).
    pub evicted: u64,
}

/// What [`stop_and_drain`] found.
#[derive(Debug, Clone)]
pub struct Drained {
    pub streams: Vec<StreamTally>,
    /// The spool emptied and every accepted seq arrived before the timeout.
    pub completed: bool,
    /// `ferry.loss` records the subscriber received.
    pub loss_records: usize,
    /// Later copies of a record the subscriber compared with the first copy of their seq (all
    /// identical, or the tally would have panicked).
    pub duplicates_compared: u64,
}

impl Drained {
    pub fn produced(&self) -> u64 {
        self.streams.iter().map(|s| s.accepted).sum()
    }

    pub fn delivered(&self) -> u64 {
        self.streams.iter().map(|s| s.delivered).sum()
    }

    pub fn lost(&self) -> u64 {
        self.streams.iter().map(|s| s.missing.len() as u64).sum()
    }

    pub fn received(&self) -> u64 {
        self.streams.iter().map(|s| s.received).sum()
    }

    /// Records received more than once.
    pub fn duplicates(&self) -> u64 {
        self.streams
            .iter()
            .map(|s| s.received - s.delivered - s.beyond.len() as u64)
            .sum()
    }

    /// Panics, with `log`, unless every accepted seq of every stream arrived, nothing beyond
    /// arrived, the spool is empty and nothing was evicted or reported lost.
    pub fn assert_nothing_lost(&self, log: &str) {
        let bad: Vec<&StreamTally> = self
            .streams
            .iter()
            .filter(|s| {
                s.accepted == 0
                    || !s.missing.is_empty()
                    || !s.beyond.is_empty()
                    || s.left_in_spool > 0
                    || s.evicted > 0
            })
            .collect();
        if !bad.is_empty() || !self.completed || self.loss_records > 0 {
            let summary: Vec<String> = bad
                .iter()
                .map(|s| {
                    format!(
                        "{}: accepted {}, {} missing (first {:?}), {} beyond, {} left in the spool, {} evicted",
                        s.name,
                        s.accepted,
                        s.missing.len(),
                        &s.missing[..s.missing.len().min(20)],
                        s.beyond.len(),
                        s.left_in_spool,
                        s.evicted
                    )
                })
                .collect();
            panic!(
                "records lost or stuck (drain completed: {}, ferry.loss records: {}):\n{}\nferry log:\n{log}",
                self.completed,
                self.loss_records,
                summary.join("\n")
            );
        }
    }
}

/// The spool's statistics, read from disk. The agent must not be running.
pub fn spool_stats(cfg: &AgentConfig) -> ferry::spool::SpoolStats {
    let config = parse(cfg);
    ferry::spool::Spool::open(&config.spool)
        .unwrap_or_else(|e| panic!("cannot open the spool of {}: {e}", cfg.dir.display()))
        .stats()
}

/// The running agent's status document, or `None` while it does not answer.
pub async fn live_status(cfg: &AgentConfig) -> Option<Value> {
    let socket = parse(cfg).status_socket;
    ferry::lifecycle::status_socket::request_status(&socket)
        .await
        .ok()
}

/// Records of `stream` in the running agent's spool, per its status socket.
pub fn status_records(status: &Value, stream: &str) -> Option<u64> {
    status["spool"]["streams"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == stream)?["records"]
        .as_u64()
}

/// Stops `agent` (SIGTERM), drains its spool through a run without collectors (at most
/// `timeout`), stops it again and tallies `streams` against what `sub` received. The agent's
/// config file is restored afterwards, so it can be started again as before.
pub async fn stop_and_drain(
    agent: &mut Agent,
    cfg: &AgentConfig,
    sub: &Subscriber,
    streams: &[String],
    timeout: Duration,
) -> Drained {
    stop(agent);
    drain_stopped(agent, cfg, sub, streams, timeout).await
}

/// [`stop_and_drain`] for an agent the test has already stopped (e.g. to look at what it did
/// on a clean stop first).
pub async fn drain_stopped(
    agent: &mut Agent,
    cfg: &AgentConfig,
    sub: &Subscriber,
    streams: &[String],
    timeout: Duration,
) -> Drained {
    assert!(
        !agent.is_running(),
        "drain_stopped() on a running agent: use stop_and_drain()"
    );
    let before = spool_stats(cfg);
    let accepted: Vec<(String, u64)> = streams
        .iter()
        .map(|n| (n.clone(), before.stream(n).map_or(0, |s| s.next_seq - 1)))
        .collect();

    let mut drain_cfg = cfg.clone();
    drain_cfg.collectors.clear();
    write_config(agent.config_path(), &drain_cfg);
    agent.start_again();
    let deadline = Instant::now() + timeout;
    let spool_empty = loop {
        if let Some(status) = live_status(cfg).await
            && streams
                .iter()
                .all(|n| status_records(&status, n).is_some_and(|r| r == 0))
        {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
        tokio::time::sleep(STATUS_POLL).await;
    };
    let all_arrived = sub
        .wait_until(deadline.saturating_duration_since(Instant::now()), |s| {
            accepted
                .iter()
                .all(|(n, max)| s.unique_seqs(n).range(1..=*max).count() as u64 == *max)
        })
        .await;
    stop(agent);
    write_config(agent.config_path(), cfg);

    let conflicts = sub.conflicting_copies();
    assert!(
        conflicts.is_empty(),
        "{} duplicate copies carry a different record than the first copy of their seq, e.g. {:?}",
        conflicts.len(),
        conflicts.first()
    );
    let after = spool_stats(cfg);
    let tallies = accepted
        .into_iter()
        .map(|(name, max)| {
            let seqs = sub.seqs(&name);
            let unique: BTreeSet<u64> = seqs.iter().copied().collect();
            let stats = after.stream(&name).cloned().unwrap_or_default();
            assert_eq!(
                stats.next_seq.saturating_sub(1),
                max,
                "{name}: the spool accepted records during a run without collectors"
            );
            StreamTally {
                accepted: max,
                received: seqs.len() as u64,
                delivered: unique.range(1..=max).count() as u64,
                missing: (1..=max).filter(|s| !unique.contains(s)).collect(),
                beyond: unique.range(max + 1..).copied().collect(),
                left_in_spool: stats.records,
                evicted: stats.evicted,
                name,
            }
        })
        .collect();
    Drained {
        streams: tallies,
        completed: spool_empty && all_arrived,
        loss_records: sub.records("ferry.loss").len(),
        duplicates_compared: sub.duplicates_compared(),
    }
}

fn stop(agent: &mut Agent) {
    let status = agent.terminate();
    assert!(
        status.success(),
        "ferry exited with {status} on SIGTERM:\n{}",
        agent.log()
    );
}

/// The agent config as ferry parses it (spool settings, status socket, ...).
pub fn parse(cfg: &AgentConfig) -> ferry::config::Config {
    ferry::config::parse(&cfg.render(), &cfg.dir.join("ferry.yaml"))
        .unwrap_or_else(|e| panic!("the test config does not parse: {e}"))
}

fn write_config(path: &Path, cfg: &AgentConfig) {
    std::fs::write(path, cfg.render())
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}
