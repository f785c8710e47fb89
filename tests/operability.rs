//! What an operator sees: `ferry status`, self-metrics, `ferry spool inspect|export`, loss
//! records for refused commands.

mod common;

use common::agent::{Agent, AgentConfig, ferry_bin};
use common::broker::{Broker, BrokerOpts, mosquitto_pub};
use common::subscriber::Subscriber;
use serde_json::Value;
use std::path::Path;
use std::process::Output;
use std::time::Duration;

fn ferry(args: &[&str], config: &Path) -> Output {
    std::process::Command::new(ferry_bin())
        .args(args)
        .arg("--config")
        .arg(config)
        .output()
        .unwrap()
}

fn text(o: &[u8]) -> String {
    String::from_utf8_lossy(o).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_state_backoff_and_streams_and_says_when_ferry_is_not_running() {
    let mut broker = Broker::start(BrokerOpts::default());
    broker.stop();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.backoff_initial_ms = 2000;
    cfg.backoff_max_ms = 4000;
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    let config = agent.config_path().to_path_buf();
    assert!(
        agent
            .wait_for_log("Cannot connect to the broker", Duration::from_secs(10))
            .await
    );

    let s = agent.status_json().await;
    assert_eq!(s["connection"]["connected"], false, "{s}");
    assert!(
        s["connection"]["last_error"]
            .as_str()
            .unwrap()
            .contains("refused"),
        "{s}"
    );
    assert!(s["connection"]["backoff_ms"].as_u64().is_some(), "{s}");
    assert_eq!(s["device"], "test-gw");
    let human = ferry(&["status"], &config);
    let human = text(&human.stdout);
    assert!(
        human.contains("disconnected") && human.contains("next attempt in"),
        "{human}"
    );
    assert!(human.contains("system"), "{human}");

    broker.start_again();
    let mut connected = false;
    for _ in 0..50 {
        if agent.status_json().await["connection"]["connected"] == true {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        connected,
        "status never showed the connection\n{}",
        agent.log()
    );
    let mut acked = 0;
    for _ in 0..50 {
        let s = agent.status_json().await;
        acked = s["counters"]["acked"].as_u64().unwrap_or(0);
        if acked > 0 {
            let c = &s["counters"];
            assert!(c["committed"].as_u64() >= Some(acked), "{c}");
            assert!(c["collected"].as_u64() >= c["committed"].as_u64(), "{c}");
            assert!(c["published"].as_u64() >= Some(acked), "{c}");
            assert!(c["lost_by_reason"].is_object(), "{c}");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(acked > 0, "no acknowledged records counted");
    let human = text(&ferry(&["status"], &config).stdout);
    assert!(human.contains(" connected"), "{human}");

    assert!(agent.terminate().success());
    let out = ferry(&["status"], &config);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert!(
        text(&out.stderr).contains("ferry is not running"),
        "{}",
        text(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn self_metrics_and_expired_command_losses_reach_the_subscriber() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let yaml = format!("{}self_metrics_interval_ms: 1000\n", cfg.render());
    let mut agent = Agent::spawn(dir.path(), &yaml);
    assert!(
        sub.wait_until(Duration::from_secs(15), |s| !s
            .records("ferry.self")
            .is_empty())
            .await,
        "no ferry.self records\n{}",
        agent.log()
    );
    let r = &sub.records("ferry.self")[0];
    assert!(r["fields"]["connection.connects"].as_u64().is_some(), "{r}");
    assert!(r["fields"]["uptime_s"].as_u64().is_some(), "{r}");

    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(10))
            .await
    );
    let out = mosquitto_pub(
        broker.plain_port(),
        &[
            "-q",
            "1",
            "-t",
            "ferry/test-gw/commands",
            "-m",
            r#"{"id":"old","name":"ping","expires_at":5}"#,
        ],
    );
    assert!(out.status.success());
    assert!(
        sub.wait_until(Duration::from_secs(10), |s| s
            .records("ferry.loss")
            .iter()
            .any(
                |l| l["fields"]["reason"] == "expired_command" && l["fields"]["id"] == "old"
            ))
        .await,
        "no loss record for the expired command\n{}",
        agent.log()
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spool_inspect_and_export_on_a_spool_written_by_a_killed_ferry() {
    let mut broker = Broker::start(BrokerOpts::default());
    broker.stop();
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    tokio::time::sleep(Duration::from_secs(3)).await;
    agent.kill9();
    let config = agent.config_path().to_path_buf();

    let out = ferry(&["spool", "inspect", "--json"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    let system = report["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "system")
        .unwrap_or_else(|| panic!("{report}"))
        .clone();
    let records = system["records"].as_u64().unwrap();
    assert!(records >= 5, "{report}");
    assert_eq!(system["first_seq"], 1);
    assert_eq!(system["last_seq"].as_u64(), Some(records));
    assert!(report["disk_bytes"].as_u64().unwrap() > 0);
    let human = text(&ferry(&["spool", "inspect"], &config).stdout);
    assert!(
        human.contains("system") && human.contains("FIRST SEQ"),
        "{human}"
    );

    let out = ferry(&["spool", "export", "--stream", "system"], &config);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len() as u64, records);
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["seq"].as_u64(), Some(i as u64 + 1));
        assert_eq!(l["stream"], "system");
        assert!(l["fields"]["mem.total_bytes"].as_u64().is_some());
    }

    // While an agent runs, the spool is locked: a clear message, not a hang.
    agent.start_again();
    assert!(
        agent
            .wait_for_log_count("Collectors running", 2, Duration::from_secs(10))
            .await
    );
    let out = ferry(&["spool", "inspect"], &config);
    assert!(
        !out.status.success(),
        "{}\n{}\n{}",
        text(&out.stdout),
        text(&out.stderr),
        agent.log()
    );
    assert!(
        text(&out.stderr).contains("stop the agent first"),
        "{}",
        text(&out.stderr)
    );
    assert!(agent.terminate().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_spool_is_moved_aside_reported_and_ferry_continues() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(sub.wait_for_seq("system", 3, Duration::from_secs(15)).await);
    assert!(agent.terminate().success());

    // Damage the log: sled would silently open it empty and seqs would restart at 1.
    let db = cfg.spool_dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xa5; len]).unwrap();
    // The seq reservation beside the spool is above everything the old spool handed out.
    let old_max = *sub.unique_seqs("system").last().unwrap();
    agent.start_again();
    assert!(
        sub.wait_until(Duration::from_secs(15), |s| s
            .records("ferry.loss")
            .iter()
            .any(|l| l["fields"]["reason"] == "spool_corrupt"))
            .await,
        "no spool_corrupt loss record\n{}",
        agent.log()
    );
    assert!(
        agent.log().contains("The spool is corrupt: moved aside"),
        "{}",
        agent.log()
    );
    assert!(
        sub.wait_until(Duration::from_secs(15), |s| s
            .unique_seqs("system")
            .iter()
            .any(|q| *q > old_max + 1000))
            .await,
        "sampling did not continue above the old seqs\n{}",
        agent.log()
    );
    let aside = std::fs::read_dir(dir.path()).unwrap().flatten().any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with("spool.corrupt-")
    });
    assert!(aside, "the corrupt spool was not kept for forensics");
    assert!(agent.terminate().success());
}

/// Reads `log` from `from` until `needle` appears in what was appended, polling every 200 µs
/// for up to `timeout`; returns whether it appeared and the new end.
fn watch_log(log: &Path, from: u64, needle: &str, timeout: Duration) -> (bool, u64) {
    use std::io::{Read, Seek, SeekFrom};
    let deadline = std::time::Instant::now() + timeout;
    let mut f = std::fs::File::open(log).unwrap();
    let mut seen = Vec::new();
    let mut at = from;
    while std::time::Instant::now() < deadline {
        f.seek(SeekFrom::Start(at)).unwrap();
        let n = f.read_to_end(&mut seen).unwrap() as u64;
        at += n;
        if n > 0 && String::from_utf8_lossy(&seen).contains(needle) {
            return (true, at);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    (false, at)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkill_right_after_the_corrupt_spool_was_moved_aside_loses_no_report_and_reuses_no_seq()
{
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(sub.wait_for_seq("system", 3, Duration::from_secs(15)).await);
    assert!(agent.terminate().success());
    let log = dir.path().join("ferry.log");
    let seq_file = dir.path().join("spool.seq");
    // Up to 5 tries for the kill to land before the fresh spool committed the loss record
    // (the reservation file then still lists the quarantine); every try checks the outcome.
    let mut landed_before_report = 0;
    let mut tries = 0;
    while tries < 5 && landed_before_report == 0 {
        tries += 1;
        let old_max = *sub.unique_seqs("system").last().unwrap();
        let reports_before = corrupt_reports(&sub).len();
        let db = cfg.spool_dir.join("db");
        let len = std::fs::metadata(&db).unwrap().len() as usize;
        std::fs::write(&db, vec![0xa5; len]).unwrap();
        let from = std::fs::metadata(&log).unwrap().len();
        agent.start_again();
        let (moved, _) = watch_log(&log, from, "moved aside", Duration::from_secs(30));
        assert!(moved, "{}", agent.log());
        agent.kill9();
        let seq: Value = serde_json::from_slice(&std::fs::read(&seq_file).unwrap()).unwrap();
        let pending = seq["unreported"].as_array().map_or(0, Vec::len);
        // What the fresh spool holds on ferry.loss (nothing, if it was not created yet).
        let out = ferry(
            &["spool", "export", "--stream", "ferry.loss"],
            agent.config_path(),
        );
        let committed = text(&out.stdout).matches("spool_corrupt").count();
        landed_before_report += u32::from(pending > 0 && committed == 0);
        eprintln!(
            "try {tries}: SIGKILL after 'moved aside'; quarantines noted as unreported: {pending}, spool_corrupt records in the fresh spool: {committed} (export: {:?})",
            out.status.code()
        );

        agent.start_again();
        assert!(
            sub.wait_until(Duration::from_secs(15), |s| corrupt_reports(s).len()
                > reports_before)
                .await,
            "the quarantine was not reported after the SIGKILL\n{}",
            agent.log()
        );
        assert!(
            sub.wait_until(Duration::from_secs(15), |s| s
                .unique_seqs("system")
                .iter()
                .any(|q| *q > old_max))
                .await,
            "sampling did not continue\n{}",
            agent.log()
        );
        // Nothing between the old seqs and the new ones: no seq of the fresh spool is at or
        // below one the old spool handed out.
        let new: Vec<u64> = sub
            .unique_seqs("system")
            .into_iter()
            .filter(|q| *q > old_max)
            .collect();
        assert!(new[0] > old_max + 1000, "{new:?} after {old_max}");
        let moved_to: Vec<String> = corrupt_reports(&sub)[reports_before..]
            .iter()
            .map(|l| l["fields"]["quarantined"].as_str().unwrap().to_string())
            .collect();
        assert!(
            moved_to.iter().all(|m| Path::new(m).exists()),
            "{moved_to:?}"
        );
        assert!(agent.terminate().success());
    }
    eprintln!(
        "{landed_before_report} of {tries} kills landed before the loss record was committed"
    );
}

fn corrupt_reports(s: &Subscriber) -> Vec<Value> {
    s.records("ferry.loss")
        .into_iter()
        .filter(|l| l["fields"]["reason"] == "spool_corrupt")
        .collect()
}
