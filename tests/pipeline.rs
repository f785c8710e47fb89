//! The core pipeline against a real Mosquitto, driving the real `ferry` binary: delivery,
//! buffering while the broker is down, broker restarts, SIGKILL of the agent, the byte cap.

mod common;

use common::agent::{Agent, AgentConfig, FullPolicy};
use common::broker::{Broker, BrokerOpts};
use common::drain::{drain_stopped, stop_and_drain};
use common::subscriber::{Subscriber, assert_contiguous};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

const STREAM: &str = "system";
/// How long the final drain of a test may take once the broker is reachable.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

fn streams() -> Vec<String> {
    vec![STREAM.to_string()]
}

fn persistent_broker() -> Broker {
    Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    })
}

/// The spool's own view of what it accepted, read from disk while ferry is not running.
fn accepted(cfg: &AgentConfig, stream: &str) -> (u64, ferry::spool::SpoolStats) {
    let config = ferry::config::parse(&cfg.render(), &cfg.dir.join("ferry.yaml")).unwrap();
    let spool = ferry::spool::Spool::open(&config.spool).unwrap();
    let stats = spool.stats();
    let next = stats.stream(stream).map_or(1, |s| s.next_seq);
    (next - 1, stats)
}

fn dir_size(p: &Path) -> u64 {
    std::fs::read_dir(p)
        .map(|rd| {
            rd.flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_size(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

/// First arrival of each seq, in arrival order.
fn first_arrivals(seqs: &[u64]) -> Vec<u64> {
    let mut seen = BTreeSet::new();
    seqs.iter().copied().filter(|s| seen.insert(*s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn happy_path_delivers_json_with_contiguous_seqs() {
    let broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());

    assert!(
        sub.wait_for_seqs(STREAM, 1, 10, Duration::from_secs(20))
            .await,
        "no records arrived; agent log:\n{}",
        agent.log()
    );
    let records = sub.records(STREAM);
    let r = &records[0];
    assert!(r["ts"].as_u64().unwrap() > 1_600_000_000_000);
    let fields = r["fields"].as_object().unwrap();
    for key in ["cpu.total_pct", "mem.total_bytes", "load.1", "uptime_s"] {
        assert!(fields.contains_key(key), "missing {key} in {r}");
    }
    let cpu = fields["cpu.total_pct"].as_f64().unwrap();
    assert!((0.0..=100.0).contains(&cpu), "first CPU sample {cpu}");
    let msg = sub
        .messages_on("ferry/test-gw/data/system")
        .into_iter()
        .next()
        .unwrap();
    let json = msg.json.unwrap();
    assert_eq!(json["device"], "test-gw");
    assert_eq!(json["stream"], STREAM);
    assert!(!json["boot"].as_str().unwrap().is_empty());
    assert!(
        sub.statuses().iter().any(|s| s["state"] == "online"),
        "no online status"
    );

    assert!(agent.terminate().success(), "log:\n{}", agent.log());
    assert!(
        sub.wait_until(Duration::from_secs(5), |s| s
            .statuses()
            .iter()
            .any(|st| st["state"] == "offline"))
            .await,
        "no offline status after a clean stop"
    );
    let drained = drain_stopped(&mut agent, &cfg, &sub, &streams(), DRAIN_TIMEOUT).await;
    drained.assert_nothing_lost(&agent.log());
    assert_eq!(drained.duplicates(), 0, "duplicates without a fault");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn buffers_while_broker_is_down_at_start_then_delivers_everything_in_order() {
    let mut broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert!(agent.is_running(), "ferry exited:\n{}", agent.log());
    assert!(agent.log().contains("Cannot connect to the broker"));

    broker.start_again();
    // Everything sampled during the 10 s outage (about 50 samples) must arrive.
    assert!(
        sub.wait_for_seqs(STREAM, 1, 45, Duration::from_secs(30))
            .await,
        "buffered records did not arrive; got {:?}\nlog:\n{}",
        sub.unique_seqs(STREAM),
        agent.log()
    );
    let arrivals = first_arrivals(&sub.seqs(STREAM));
    assert!(
        arrivals.windows(2).all(|w| w[0] < w[1]),
        "records arrived out of seq order: {arrivals:?}"
    );
    // Everything the spool accepted, during the outage and after, reaches the subscriber.
    stop_and_drain(&mut agent, &cfg, &sub, &streams(), DRAIN_TIMEOUT)
        .await
        .assert_nothing_lost(&agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_restarted_three_times_leaves_no_gap() {
    let mut broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(sub.wait_for_seq(STREAM, 3, Duration::from_secs(20)).await);

    for round in 0..3 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        broker.stop();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        broker.start_again();
        let before = sub.unique_seqs(STREAM).len();
        assert!(
            sub.wait_until(Duration::from_secs(20), |s| s.unique_seqs(STREAM).len()
                > before)
                .await,
            "nothing arrived after restart {round}; log:\n{}",
            agent.log()
        );
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let reconnects = agent.log().matches("Connected to the broker").count();
    assert!(
        reconnects >= 4,
        "expected 4 connections, log shows {reconnects}"
    );
    // Every seq the spool accepted reaches the subscriber: what was acknowledged before the
    // stop already has, the rest is sent by the drain.
    let drained = stop_and_drain(&mut agent, &cfg, &sub, &streams(), DRAIN_TIMEOUT).await;
    drained.assert_nothing_lost(&agent.log());
    eprintln!(
        "delivered {} records, {} duplicates (all identical to their first copy), {reconnects} connections",
        drained.delivered(),
        drained.duplicates()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_while_broker_is_down_loses_nothing_the_spool_accepted() {
    let mut broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    tokio::time::sleep(Duration::from_secs(4)).await;
    agent.kill9();
    let (accepted_max, stats) = accepted(&cfg, STREAM);
    assert!(
        accepted_max >= 10,
        "only {accepted_max} accepted: {stats:?}"
    );

    agent.start_again();
    tokio::time::sleep(Duration::from_secs(1)).await;
    broker.start_again();
    assert!(
        sub.wait_for_seqs(STREAM, 1, accepted_max + 3, Duration::from_secs(30))
            .await,
        "records accepted before SIGKILL are missing: have {:?}, accepted up to {accepted_max}\nlog:\n{}",
        sub.unique_seqs(STREAM),
        agent.log()
    );
    // Nothing the spool accepted, before the SIGKILL or after, is missing.
    stop_and_drain(&mut agent, &cfg, &sub, &streams(), DRAIN_TIMEOUT)
        .await
        .assert_nothing_lost(&agent.log());
}

/// The distinct boot ids of the data messages received so far, in order of first appearance.
fn boots(sub: &Subscriber) -> Vec<String> {
    let mut seen = Vec::new();
    for m in sub.messages() {
        if !m.topic.contains("/data/") {
            continue;
        }
        let boot = m
            .json
            .as_ref()
            .and_then(|j| j["boot"].as_str())
            .map(str::to_string);
        let boot = boot.unwrap_or_else(|| panic!("data message without a boot id: {}", m.text()));
        if !seen.contains(&boot) {
            seen.push(boot);
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_id_stays_across_reconnects_and_changes_on_restart() {
    let mut broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        sub.wait_for_seq(STREAM, 3, Duration::from_secs(20)).await,
        "{}",
        agent.log()
    );

    // A reconnect (the broker restarts) is the same process: same boot id.
    broker.stop();
    broker.start_again();
    assert!(
        agent
            .wait_for_log_count("Connected to the broker", 2, Duration::from_secs(20))
            .await,
        "no reconnection:\n{}",
        agent.log()
    );
    let before = *sub.unique_seqs(STREAM).last().unwrap();
    assert!(
        sub.wait_for_seq(STREAM, before + 3, Duration::from_secs(20))
            .await,
        "{}",
        agent.log()
    );
    let first = boots(&sub);
    assert_eq!(first.len(), 1, "a reconnect changed the boot id: {first:?}");

    // A restart (after a SIGKILL, and after a clean stop) is a new boot.
    for (round, how) in ["SIGKILL", "SIGTERM"].iter().enumerate() {
        if *how == "SIGKILL" {
            agent.kill9();
        } else {
            assert!(agent.terminate().success(), "{}", agent.log());
        }
        agent.start_again();
        assert!(
            sub.wait_until(Duration::from_secs(20), |s| boots(s).len() == round + 2)
                .await,
            "no message with a new boot id after a restart following {how}: {:?}\n{}",
            boots(&sub),
            agent.log()
        );
        // From its first message on, every message carries the new boot id, also the records
        // the previous process had not delivered.
        let current = boots(&sub)[round + 1].clone();
        let since: Vec<_> = sub
            .messages()
            .into_iter()
            .skip_while(|m| m.json.as_ref().unwrap()["boot"] != current.as_str())
            .collect();
        assert!(
            since
                .iter()
                .all(|m| m.json.as_ref().unwrap()["boot"] == current.as_str()),
            "an older boot id reappeared after the restart following {how}"
        );
    }
    stop_and_drain(&mut agent, &cfg, &sub, &streams(), DRAIN_TIMEOUT)
        .await
        .assert_nothing_lost(&agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn byte_cap_evicts_oldest_counts_and_reports_the_loss() {
    let mut broker = persistent_broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let cap: u64 = 64 << 10;
    cfg.max_bytes = cap;
    cfg.full_policy = FullPolicy::DropOldest;
    // Five busy collectors fill 64 KiB in a few seconds.
    cfg.collectors = (0..5)
        .map(|i| format!("type: system\nname: sys{i}\ninterval_ms: 200\nper_core: true"))
        .collect();
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let mut disk_high = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        disk_high = disk_high.max(dir_size(&cfg.spool_dir));
    }
    assert!(agent.terminate().success(), "log:\n{}", agent.log());

    let (_, stats) = accepted(&cfg, "sys0");
    let evicted: u64 = stats.streams.iter().map(|s| s.evicted).sum();
    let loss_bytes = stats.stream("ferry.loss").map_or(0, |s| s.bytes);
    assert!(evicted > 0, "nothing evicted: {stats:?}");
    assert!(
        stats.bytes - loss_bytes <= cap,
        "stored {} B of records for a cap of {cap} B",
        stats.bytes - loss_bytes
    );
    // sled's files: a fixed base of a few MiB plus its log; see docs/ARCHITECTURE.md.
    eprintln!(
        "cap {cap} B: stored {} B (+{loss_bytes} B loss records), disk high-water {disk_high} B, evicted {evicted} records",
        stats.bytes - loss_bytes
    );
    assert!(
        disk_high <= cap + (2 << 20),
        "spool directory reached {disk_high} B"
    );

    broker.start_again();
    agent.start_again();
    let want: Vec<(String, u64)> = stats
        .streams
        .iter()
        .filter(|s| s.name.starts_with("sys"))
        .map(|s| (s.name.clone(), s.next_seq - 1))
        .collect();
    let done = sub
        .wait_until(Duration::from_secs(30), |s| {
            want.iter()
                .all(|(name, max)| s.unique_seqs(name).contains(max))
                && !s.records("ferry.loss").is_empty()
        })
        .await;
    assert!(done, "log:\n{}", agent.log());
    assert!(agent.terminate().success());

    // Every seq up to what was accepted is either delivered or named by a loss record.
    for (name, max) in &want {
        let mut covered = sub.unique_seqs(name);
        for loss in sub.records("ferry.loss") {
            let f = &loss["fields"];
            if f["stream"] == name.as_str() {
                assert_eq!(f["reason"], "evicted");
                let (a, b) = (
                    f["first_seq"].as_u64().unwrap(),
                    f["last_seq"].as_u64().unwrap(),
                );
                covered.extend(a..=b);
            }
        }
        assert_contiguous(&covered, 1, *max);
    }
}
