//! Link economy end to end with the real `ferry` binary and a real Mosquitto: every wire
//! format arrives and decodes (with `ferry decode` and with the Python consumer of
//! docs/WIRE.md) to the values written, and after an outage the high lane drains first while
//! the bulk lane still progresses.

mod common;

use common::agent::{Agent, AgentConfig};
use common::append_lines;
use common::broker::{Broker, BrokerOpts};
use common::subscriber::{Subscriber, assert_contiguous};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
/// The Debian Python, where apt installs paho-mqtt, cbor2 and zstandard (a `python3` earlier
/// on PATH, e.g. pyenv's, would not have them).
const SYSTEM_PYTHON: &str = "/usr/bin/python3";

fn tail_collector(name: &str, path: &Path, format: &str) -> String {
    format!(
        "type: file\nname: {name}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nformat:\n  type: {format}",
        path.display()
    )
}

/// kv lines whose values a test can recompute: `n=<i> x=<i/4> name=s<i> ok=<even>`.
fn kv_lines(count: u64) -> Vec<String> {
    (1..=count)
        .map(|i| format!("n={i} x={} name=s{i} ok={}", i as f64 / 4.0, i % 2 == 0))
        .collect()
}

fn python_consumer_source() -> String {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/docs/WIRE.md"))
        .expect("docs/WIRE.md");
    let start = doc
        .find("```python\n")
        .expect("a python block in docs/WIRE.md")
        + 10;
    let end = start + doc[start..].find("```").expect("the block ends");
    doc[start..end].to_string()
}

/// Records as `ferry decode` prints them, keyed by (stream, seq), without the boot id.
fn by_key(lines: &str) -> BTreeMap<(String, u64), Value> {
    lines
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
            let key = (
                v["stream"].as_str().unwrap().to_string(),
                v["seq"].as_u64().unwrap(),
            );
            (key, v)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_format_decodes_with_ferry_decode_and_the_python_consumer() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();

    // Stream -> (encoding, compression); "lines" carries raw lines in CBOR.
    let streams = [
        ("plain", "json", "none"),
        ("zjson", "json", "zstd"),
        ("packed", "cbor", "none"),
        ("squeezed", "cbor", "zstd"),
        ("lines", "cbor", "zstd"),
    ];
    const PER_STREAM: u64 = 40;
    let total = PER_STREAM * streams.len() as u64;

    let source = dir.path().join("consumer.py");
    std::fs::write(&source, python_consumer_source()).unwrap();
    let python = Command::new(SYSTEM_PYTHON)
        .arg(&source)
        .args([
            "127.0.0.1",
            &broker.plain_port().to_string(),
            "ferry/+/data/#",
        ])
        .arg(total.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3 starts");
    // The Rust subscriber's SUBACK plus the consumer's.
    assert!(
        broker.wait_for_log_count("Sending SUBACK", 2, WAIT),
        "the Python consumer did not subscribe:\n{}",
        broker.log()
    );

    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = streams
        .iter()
        .map(|(name, _, _)| {
            let format = if *name == "lines" { "raw" } else { "kv" };
            tail_collector(name, &dir.path().join(format!("{name}.log")), format)
        })
        .collect();
    cfg.extra = "streams:\n".to_string();
    for (name, encoding, compression) in streams {
        cfg.extra += &format!(
            "  {name}:\n    encoding: {encoding}\n    compression: {compression}\n    zstd_level: 5\n"
        );
    }
    for (name, _, _) in streams {
        let lines = if name == "lines" {
            (1..=PER_STREAM)
                .map(|i| format!("line {i}: \"quoted\" \u{e9}"))
                .collect()
        } else {
            kv_lines(PER_STREAM)
        };
        append_lines(&dir.path().join(format!("{name}.log")), &lines);
    }
    let mut agent = Agent::spawn(dir.path(), &cfg.render());

    for (name, _, _) in streams {
        assert!(
            sub.wait_for_seqs(name, 1, PER_STREAM, WAIT).await,
            "{name}: got {:?}\nlog:\n{}",
            sub.unique_seqs(name),
            agent.log()
        );
        assert_contiguous(&sub.unique_seqs(name), 1, PER_STREAM);
    }
    assert!(agent.terminate().success());

    // The first byte says the format, as configured.
    let mut payload_files = Vec::new();
    for (i, m) in sub.messages().iter().enumerate() {
        let Some(stream) = m.topic.rsplit('/').next() else {
            continue;
        };
        let (_, encoding, compression) = streams.iter().find(|s| s.0 == stream).unwrap();
        let first = m.payload[0];
        match (*encoding, *compression) {
            ("json", "none") => assert_eq!(first, b'{', "{stream}"),
            // zstd is skipped when it would not shrink a message: then the plain form.
            ("json", "zstd") => assert!(first == 0x84 || first == b'{', "{stream}: {first:#x}"),
            ("cbor", "none") => assert_eq!(first, 0x81, "{stream}"),
            _ => assert!(first == 0x85 || first == 0x81, "{stream}: {first:#x}"),
        }
        let path = dir.path().join(format!("msg-{i}.bin"));
        std::fs::write(&path, &m.payload).unwrap();
        payload_files.push(path);
    }
    let compressed = sub
        .messages()
        .iter()
        .filter(|m| m.payload[0] == 0x85)
        .count();
    assert!(compressed > 0, "no message was compressed");

    // ferry decode: the values written, for every format.
    let out = Command::new(common::agent::ferry_bin())
        .arg("decode")
        .args(&payload_files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let decoded = by_key(&String::from_utf8(out.stdout).unwrap());
    for (name, _, _) in streams {
        for i in 1..=PER_STREAM {
            let r = &decoded[&(name.to_string(), i)];
            assert_eq!(r["device"], "test-gw");
            if name == "lines" {
                assert_eq!(r["line"], format!("line {i}: \"quoted\" \u{e9}"));
                continue;
            }
            let f = &r["fields"];
            assert_eq!(f["n"], i, "{name} {i}: {r}");
            assert_eq!(f["x"].as_f64(), Some(i as f64 / 4.0), "{name} {i}: {r}");
            assert_eq!(f["name"], format!("s{i}"));
            assert_eq!(f["ok"], i % 2 == 0);
        }
    }

    // The Python consumer from the docs saw the same records.
    let python = tokio::task::spawn_blocking(move || python.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(
        python.status.success(),
        "python consumer failed: {}",
        String::from_utf8_lossy(&python.stderr)
    );
    let from_python = by_key(&String::from_utf8(python.stdout).unwrap());
    assert_eq!(from_python.len(), decoded.len());
    for (key, want) in &decoded {
        let got = &from_python[key];
        assert_eq!(got, want, "{key:?}");
    }

    // Garbage is refused with a clear error and a non-zero exit, not a panic.
    let bad = dir.path().join("bad.bin");
    std::fs::write(&bad, [0x85, 1, 2, 3]).unwrap();
    let out = Command::new(common::agent::ferry_bin())
        .args(["decode", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(65));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is not a ferry message"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_an_outage_the_high_lane_drains_first_and_bulk_still_progresses() {
    let mut broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    broker.stop();

    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = ["alarm", "normal", "bulk"]
        .iter()
        .map(|name| tail_collector(name, &dir.path().join(format!("{name}.log")), "kv"))
        .collect();
    // Small batches so the order of many messages shows; window 1 so the order of publishes
    // is the order of choice.
    cfg.batch_max_records = 10;
    cfg.uplink_extra = vec![
        "lanes:".into(),
        "  normal_weight: 3".into(),
        "  bulk_weight: 1".into(),
    ];
    cfg.extra = "streams:\n  alarm:\n    lane: high\n  bulk:\n    lane: bulk\n".into();
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    // The backlog: bulk oldest, then normal, then the alarms last.
    for name in ["bulk", "normal", "alarm"] {
        let count = if name == "alarm" { 30 } else { 200 };
        append_lines(&dir.path().join(format!("{name}.log")), &kv_lines(count));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // All of it committed while the broker is down.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let status = agent.status_json().await;
        let stored: u64 = status["spool"]["streams"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|st| ["alarm", "normal", "bulk"].contains(&st["name"].as_str().unwrap_or("")))
            .map(|st| st["records"].as_u64().unwrap_or(0))
            .sum();
        if stored == 430 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "backlog not committed: {status}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    broker.start_again();
    for (name, count) in [("alarm", 30), ("normal", 200), ("bulk", 200)] {
        assert!(
            sub.wait_for_seqs(name, 1, count, WAIT).await,
            "{name}: {:?}\n{}",
            sub.unique_seqs(name),
            agent.log()
        );
    }
    assert!(agent.terminate().success());

    // Order of first arrival of each data message's stream.
    let order: Vec<String> = sub
        .messages()
        .iter()
        .filter_map(|m| m.topic.rsplit('/').next().map(str::to_string))
        .filter(|s| ["alarm", "normal", "bulk"].contains(&s.as_str()))
        .collect();
    let alarms = order.iter().filter(|s| *s == "alarm").count();
    assert!(
        order[..alarms].iter().all(|s| s == "alarm"),
        "the high lane was not first: {order:?}"
    );
    // While normal still had a backlog, bulk got about one message in four.
    let last_normal = order.iter().rposition(|s| s == "normal").unwrap();
    let bulk_before = order[..last_normal].iter().filter(|s| *s == "bulk").count();
    let normal_msgs = order.iter().filter(|s| *s == "normal").count();
    assert!(
        bulk_before * 3 >= normal_msgs - 3,
        "bulk starved: {bulk_before} bulk messages before the last of {normal_msgs} normal ones: {order:?}"
    );
    for name in ["alarm", "normal", "bulk"] {
        let seqs = sub.unique_seqs(name);
        assert_contiguous(&seqs, 1, *seqs.last().unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_self_metrics_show_the_budget_use() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.uplink_extra = vec!["budget:".into(), "  daily_bytes: 1000000".into()];
    cfg.extra = "self_metrics_interval_ms: 1000\n".into();
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        sub.wait_until(WAIT, |s| s.records("ferry.self").len() >= 2)
            .await,
        "no ferry.self records:\n{}",
        agent.log()
    );
    let status = agent.status_json().await;
    let budget = &status["budget"];
    assert_eq!(budget["daily_limit"], 1_000_000, "{status}");
    assert!(budget["daily_used"].as_u64().unwrap() > 0, "{status}");
    assert_eq!(budget["monthly_limit"], Value::Null);
    assert_eq!(budget["spent"], false);

    let out = Command::new(common::agent::ferry_bin())
        .args(["status", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("budget: today ") && text.contains(" of 1000000 bytes"),
        "{text}"
    );

    // The same figures reach the broker on ferry.self (a later one has counted earlier sends).
    let last = sub.records("ferry.self").last().cloned().unwrap();
    assert!(
        last["fields"]["budget.daily_used"].as_u64().unwrap() > 0,
        "{last}"
    );
    assert_eq!(last["fields"]["budget.daily_limit"], 1_000_000);
    assert!(agent.terminate().success());
}
