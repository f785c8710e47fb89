//! Hostile or oversize traffic on the command topic against a real Mosquitto: it must never
//! stop the data, every such message is answered at most once and acknowledged, and each
//! refusal is counted in `ferry status` and `ferry.self`. (What junk costs in throughput is a
//! figure, measured by `benches/hostile_commands.rs`, not asserted here.)

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts, mosquitto_pub};
use common::subscriber::{Subscriber, assert_contiguous};
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

const COMMANDS: &str = "ferry/test-gw/commands";
const REPLIES: &str = "ferry/test-gw/replies";
/// Records that must arrive after the junk: data keeps flowing (a sample every 200 ms).
const AFTER_JUNK: u64 = 20;

fn publish(broker: &Broker, args: &[&str]) {
    let mut all = vec!["-q", "1", "-t", COMMANDS];
    all.extend_from_slice(args);
    let out = mosquitto_pub(broker.plain_port(), &all);
    assert!(out.status.success(), "mosquitto_pub failed: {out:?}");
}

/// A JSON ping request of about `size` bytes, padded in its args.
fn big_request(dir: &Path, id: &str, size: usize) -> String {
    let head = format!(r#"{{"id":"{id}","name":"ping","args":{{"pad":""#);
    let mut text = head.clone();
    text.push_str(&"x".repeat(size - head.len() - 3));
    text.push_str(r#""}}"#);
    let path = dir.join(format!("{id}.json"));
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

fn replies_to(sub: &Subscriber, id: Option<&str>) -> Vec<Value> {
    sub.messages_on(REPLIES)
        .into_iter()
        .filter_map(|m| m.json)
        .filter(|j| match id {
            Some(id) => j["id"] == id,
            None => j["id"].is_null(),
        })
        .collect()
}

/// The refusal counters of the status document.
fn refused(status: &Value) -> Value {
    status["commands"]["refused"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn junk_on_the_command_topic_never_stops_the_data() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let data = Subscriber::start(broker.plain_port(), "ferry/test-gw/data/#").await;
    let replies = Subscriber::start(broker.plain_port(), REPLIES).await;
    let dir = tempfile::tempdir().unwrap();
    // Retained before ferry ever subscribed: delivered with the retain flag on subscription.
    publish(&broker, &["-r", "-m", r#"{"id":"ret-1","name":"ping"}"#]);

    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec!["type: system\nname: system\ninterval_ms: 200".into()];
    cfg.extra = "self_metrics_interval_ms: 1000\n".into();
    // MQTT 3.1.1: the broker delivers commands of any size, and each gets an error reply. (With
    // MQTT 5 the broker does not deliver those over uplink.max_packet_bytes at all: tests/mqtt5.rs.)
    cfg.uplink_extra.push("mqtt_version: \"3.1.1\"".into());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(15))
            .await,
        "{}",
        agent.log()
    );
    assert!(
        data.wait_for_seq("system", 20, Duration::from_secs(20))
            .await
    );

    let big = big_request(dir.path(), "big-400k", 400_000);
    let huge = big_request(dir.path(), "big-5m", 5_000_000);
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let junk: Vec<u8> = (0..4096)
        .map(|_| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng as u8
        })
        .collect();
    let junk_path = dir.path().join("junk.bin");
    std::fs::write(&junk_path, &junk).unwrap();
    let bad_utf8 = dir.path().join("bad-utf8.json");
    std::fs::write(&bad_utf8, b"{\"id\":\"bad-utf8\",\"name\":\"p\xffng\"}").unwrap();
    publish(&broker, &["-f", &big]);
    publish(&broker, &["-f", &huge]);
    publish(&broker, &["-f", &junk_path.display().to_string()]);
    publish(&broker, &["-f", &bad_utf8.display().to_string()]);
    publish(
        &broker,
        &["-m", r#"{"id":"exp-1","name":"ping","expires_at":1}"#],
    );
    publish(&broker, &["-m", r#"{"id":"after-junk","name":"ping"}"#]);
    let junk_sent = *data.unique_seqs("system").last().unwrap();
    // Data keeps flowing after the junk.
    assert!(
        data.wait_for_seq("system", junk_sent + AFTER_JUNK, Duration::from_secs(60))
            .await,
        "data stopped after the junk: last seq {:?} (junk sent at {junk_sent})\n{}",
        data.unique_seqs("system").last(),
        agent.log()
    );

    // Each junk message got exactly one error reply, with its id when readable.
    let after = replies_to(&replies, Some("after-junk"));
    assert!(
        replies
            .wait_until(Duration::from_secs(10), |s| {
                !replies_to(s, Some("after-junk")).is_empty()
            })
            .await,
        "no reply after the junk: {after:?}\n{}",
        agent.log()
    );
    for id in ["big-400k", "big-5m", "bad-utf8", "ret-1", "exp-1"] {
        let r = replies_to(&replies, Some(id));
        assert_eq!(r.len(), 1, "replies to {id}: {r:?}");
        assert_eq!(r[0]["status"], "error", "{id}: {r:?}");
    }
    assert!(
        replies_to(&replies, Some("ret-1"))[0]["error"]
            .as_str()
            .unwrap()
            .contains("retained")
    );
    assert_eq!(replies_to(&replies, None).len(), 1, "the binary junk");

    // Each refusal is counted, in `ferry status` and in `ferry.self`.
    let expected = serde_json::json!({
        "malformed": 2, "too_big": 2, "retained": 1, "expired": 1,
        "busy": 0, "replayed": 0, "unsigned": 0,
    });
    let status = agent.status_json().await;
    assert_eq!(refused(&status), expected, "{status}");
    let text = std::process::Command::new(common::agent::ferry_bin())
        .args(["status", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("commands refused: expired 1, malformed 2, retained 1, too_big 2\n"),
        "{text}"
    );
    let counted = |s: &Subscriber| {
        s.records("ferry.self").iter().any(|r| {
            let f = &r["fields"];
            f["commands.refused.too_big"] == 2
                && f["commands.refused.malformed"] == 2
                && f["commands.refused.retained"] == 1
                && f["commands.refused.expired"] == 1
        })
    };
    assert!(
        data.wait_until(Duration::from_secs(15), counted).await,
        "ferry.self never showed the refusals: {:?}",
        data.records("ferry.self").last()
    );
    assert_eq!(
        agent.log().matches("Connected to the broker.").count(),
        1,
        "the junk cost a reconnect:\n{}",
        agent.log()
    );

    // Acknowledged: after a restart (persistent session) nothing is redelivered, so no reply
    // is repeated; the retained command is not delivered again either.
    let replies_before = replies.messages_on(REPLIES).len();
    agent.terminate();
    agent.start_again();
    assert!(
        agent
            .wait_for_log("Connected to the broker.", Duration::from_secs(15))
            .await
    );
    publish(&broker, &["-m", r#"{"id":"marker","name":"ping"}"#]);
    assert!(
        replies
            .wait_until(Duration::from_secs(15), |s| {
                !replies_to(s, Some("marker")).is_empty()
            })
            .await
    );
    assert_eq!(
        replies.messages_on(REPLIES).len(),
        replies_before + 1,
        "a command was redelivered: {:?}",
        replies
            .messages_on(REPLIES)
            .iter()
            .map(|m| m.text())
            .collect::<Vec<_>>()
    );

    let last = *data.unique_seqs("system").last().unwrap();
    agent.terminate();
    assert!(
        data.wait_for_seqs("system", 1, last, Duration::from_secs(10))
            .await
    );
    assert_contiguous(&data.unique_seqs("system"), 1, last);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_command_queue_answers_busy_and_acknowledges() {
    let mut broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    // Mosquitto sends at most 20 unacknowledged messages by default, fewer than ferry's
    // command queue holds; brokers that send more (or a raised limit, as here) fill it.
    broker.stop();
    let conf = broker.dir().join("mosquitto.conf");
    let mut text = std::fs::read_to_string(&conf).unwrap();
    text.push_str("max_inflight_messages 1000\n");
    std::fs::write(&conf, text).unwrap();
    broker.start_again();
    let replies = Subscriber::start(broker.plain_port(), REPLIES).await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = AgentConfig::new(dir.path(), broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent
            .wait_for_log("Subscribed to commands", Duration::from_secs(15))
            .await,
        "{}",
        agent.log()
    );
    // Each command waits for its reply to be committed (a spool flush), so a burst of 100
    // overflows the queue of 32. (Over about 128 refusals at once, rumqttc's request channel
    // is full and the rest stay unacknowledged until a reconnect: a known limit.)
    const N: usize = 100;
    let lines: String = (0..N)
        .map(|i| format!("{{\"id\":\"b{i}\",\"name\":\"ping\"}}\n"))
        .collect();
    let mut child = std::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &broker.plain_port().to_string()])
        .args(["-q", "1", "-t", COMMANDS, "-l"])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    let answered = |s: &Subscriber| {
        (0..N)
            .filter(|i| !replies_to(s, Some(&format!("b{i}"))).is_empty())
            .count()
    };
    assert!(
        replies
            .wait_until(Duration::from_secs(30), |s| answered(s) == N)
            .await,
        "{} of {N} commands answered\n{}",
        answered(&replies),
        agent.log()
    );
    let busy = (0..N)
        .filter(|i| {
            replies_to(&replies, Some(&format!("b{i}")))
                .iter()
                .any(|r| r["error"].as_str().is_some_and(|e| e.starts_with("busy")))
        })
        .count();
    println!("command burst: {busy} of {N} refused as busy");
    assert!(busy > 0, "the queue never filled; the test proves nothing");
    let status = agent.status_json().await;
    assert_eq!(
        refused(&status)["busy"],
        busy as u64,
        "every busy reply is counted: {status}"
    );
    for i in 0..N {
        assert_eq!(
            replies_to(&replies, Some(&format!("b{i}"))).len(),
            1,
            "b{i}"
        );
    }
    assert_eq!(agent.log().matches("Connected to the broker.").count(), 1);

    // All acknowledged: a restart with the session kept redelivers none of them.
    let before = replies.messages_on(REPLIES).len();
    agent.terminate();
    agent.start_again();
    publish(&broker, &["-m", r#"{"id":"marker","name":"ping"}"#]);
    assert!(
        replies
            .wait_until(Duration::from_secs(15), |s| {
                !replies_to(s, Some("marker")).is_empty()
            })
            .await
    );
    assert_eq!(replies.messages_on(REPLIES).len(), before + 1);
    agent.terminate();
}
