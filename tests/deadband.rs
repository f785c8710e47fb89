//! Deadband end to end: the real `ferry` binary tails a file of `key=value` lines with a
//! deadband, and a real Mosquitto subscriber sees only the values that moved past their
//! threshold plus every field on heartbeat records, with contiguous seqs (suppression is not
//! loss). A config reload that leaves the deadband unchanged keeps its state.

mod common;

use common::agent::{Agent, AgentConfig};
use common::append_lines;
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use serde_json::{Value, json};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);

/// temp has threshold 1.0, hum the default 5; every 4th reading is a heartbeat.
fn collector(log: &Path, poll_interval_ms: u64) -> String {
    format!(
        "type: file\nname: tank\npath: {}\nstart_at: beginning\npoll_interval_ms: {poll_interval_ms}\nformat: {{type: kv}}\ndeadband:\n  default: 5\n  fields:\n    temp: 1.0\n  heartbeat: 4",
        log.display()
    )
}

/// The delivered records of `tank` by seq (duplicates collapse), as `seq -> fields`.
fn delivered(sub: &Subscriber) -> BTreeMap<u64, Value> {
    sub.records("tank")
        .into_iter()
        .map(|r| (r["seq"].as_u64().unwrap(), r["fields"].clone()))
        .collect()
}

async fn suppressed(agent: &Agent) -> u64 {
    let s = agent.status_json().await;
    s["collectors"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "tank")
        .unwrap_or_else(|| panic!("no collector tank in {s}"))["suppressed"]
        .as_u64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn suppressed_values_are_absent_until_they_move_or_a_heartbeat_comes() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("tank.log");
    append_lines(
        &log,
        &[
            "temp=20.0 hum=50", // 1: heartbeat, all fields
            "temp=20.4 hum=51", // 2: both within their thresholds: no record
            "temp=20.9 hum=52", // 3: same (temp is 0.9 from the last sent 20.0)
            "temp=21.5 hum=53", // 4: temp drifted 1.5 from 20.0: temp only
            "temp=21.6 hum=53", // 5: heartbeat
            "temp=21.7 hum=60", // 6: hum moved 7: hum only
        ],
    );
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![collector(&log, 100)];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());

    assert!(
        sub.wait_until(WAIT, |s| delivered(s).len() >= 4).await,
        "log:\n{}",
        agent.log()
    );
    let want: BTreeMap<u64, Value> = [
        (1, json!({"temp": 20.0, "hum": 50})),
        (2, json!({"temp": 21.5})),
        (3, json!({"temp": 21.6, "hum": 53})),
        (4, json!({"hum": 60})),
    ]
    .into();
    assert_eq!(delivered(&sub), want);
    assert_eq!(suppressed(&agent).await, 6);

    // Reload with another poll interval: the collector restarts, the deadband (unchanged)
    // goes on counting towards the next heartbeat (reading 9) from the same baselines.
    cfg.collectors = vec![collector(&log, 150)];
    std::fs::write(agent.config_path(), cfg.render()).unwrap();
    agent.sighup();
    assert!(
        agent
            .wait_for_log("collector tank restarted with its new config", WAIT)
            .await,
        "log:\n{}",
        agent.log()
    );
    append_lines(
        &log,
        &[
            "temp=21.8 hum=61", // 7: no record (a fresh filter would send both)
            "temp=23.0 hum=61", // 8: temp is 1.4 from its last sent 21.6: temp only
            "temp=23.1 hum=61", // 9: heartbeat
        ],
    );
    assert!(
        sub.wait_until(WAIT, |s| delivered(s).len() >= 6).await,
        "log:\n{}",
        agent.log()
    );
    let mut want = want;
    want.insert(5, json!({"temp": 23.0}));
    want.insert(6, json!({"temp": 23.1, "hum": 61}));
    assert_eq!(delivered(&sub), want);
    assert_eq!(suppressed(&agent).await, 9);
    // Suppression is not loss: nothing about tank on ferry.loss.
    assert!(
        !sub.records("ferry.loss")
            .iter()
            .any(|r| r["fields"]["stream"] == "tank"),
        "{:?}",
        sub.records("ferry.loss")
    );
}
