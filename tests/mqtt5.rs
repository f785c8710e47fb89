//! MQTT 5 against a real Mosquitto: both protocol versions end to end, the Maximum Packet Size
//! and session expiry ferry puts in its CONNECT, PUBACK reason codes (a broker ACL that denies
//! the data topic, then fixed and reloaded), the fallback to 3.1.1 when a broker refuses a
//! version-5 CONNECT, and MQTT 5 message expiry on commands.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts, mosquitto_pub};
use common::drain::stop_and_drain;
use common::replies::{final_reply, replies};
use common::subscriber::{Subscriber, assert_contiguous};
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

const COMMANDS: &str = "ferry/test-gw/commands";
/// Behaviour timeouts: each is 10x or more what the step takes here.
const WAIT: Duration = Duration::from_secs(30);
const DRAIN: Duration = Duration::from_secs(60);

fn config(dir: &std::path::Path, port: u16, version: &str) -> AgentConfig {
    let mut cfg = AgentConfig::new(dir, port);
    cfg.uplink_extra = vec![format!("mqtt_version: {version:?}")];
    cfg
}

fn send_command(port: u16, payload: &str, extra: &[&str]) {
    let mut args = vec!["-q", "1", "-t", COMMANDS, "-m", payload];
    args.extend_from_slice(extra);
    let out = mosquitto_pub(port, &args);
    assert!(out.status.success(), "mosquitto_pub failed: {out:?}");
}

async fn status_until(agent: &Agent, what: &str, cond: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = agent.status_json().await;
        if cond(&status) {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "status never showed {what}: {status}\nlog:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_versions_carry_data_commands_and_replies_and_keep_the_session() {
    for (version, level) in [("5", "p5"), ("3.1.1", "p2")] {
        let broker = Broker::start(BrokerOpts {
            secure: None,
            persistence: true,
        });
        let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), broker.agent_port(), version);
        let mut agent = Agent::spawn(dir.path(), &cfg.render());

        assert!(
            sub.wait_for_seqs("system", 1, 5, WAIT).await,
            "MQTT {version}: no data\n{}",
            agent.log()
        );
        send_command(broker.plain_port(), r#"{"id":"v-ping","name":"ping"}"#, &[]);
        let r = final_reply(&sub, &agent, "v-ping", WAIT).await;
        assert_eq!(r["status"], "ok", "MQTT {version}: {r}");
        let status = agent.status_json().await;
        assert_eq!(status["connection"]["mqtt_version"], version, "{status}");
        assert!(
            broker
                .log()
                .contains(&format!("as ferry-test-gw ({level}, c0,")),
            "MQTT {version}: the broker did not see protocol {level} with a persistent session:\n{}",
            broker.log()
        );

        // The session outlives the connection: a command published while ferry is stopped is
        // queued by the broker and delivered at the next start (MQTT 5: session expiry).
        let stopped = agent.terminate();
        assert!(stopped.success(), "{}", agent.log());
        send_command(
            broker.plain_port(),
            r#"{"id":"v-offline","name":"ping"}"#,
            &[],
        );
        agent.start_again();
        let r = final_reply(&sub, &agent, "v-offline", WAIT).await;
        assert_eq!(r["status"], "ok", "MQTT {version}: {r}");

        let drained = stop_and_drain(&mut agent, &cfg, &sub, &["system".into()], DRAIN).await;
        drained.assert_nothing_lost(&agent.log());
        println!(
            "MQTT {version}: {} records accepted, {} delivered, {} duplicates; both commands answered",
            drained.produced(),
            drained.delivered(),
            drained.duplicates()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_maximum_packet_size_keeps_a_big_command_off_the_link() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), broker.agent_port(), "5");
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        sub.wait_for_seqs("system", 1, 3, WAIT).await,
        "{}",
        agent.log()
    );

    // Over the 262144 bytes of uplink.max_packet_bytes that ferry's CONNECT announced: the
    // broker must not send it at all.
    let big = format!(
        r#"{{"id":"big","name":"ping","args":{{"pad":"{}"}}}}"#,
        "x".repeat(300_000)
    );
    let file = dir.path().join("big.json");
    std::fs::write(&file, &big).unwrap();
    let out = mosquitto_pub(
        broker.plain_port(),
        &["-q", "1", "-t", COMMANDS, "-f", file.to_str().unwrap()],
    );
    assert!(out.status.success(), "{out:?}");
    send_command(broker.plain_port(), r#"{"id":"small","name":"ping"}"#, &[]);
    let r = final_reply(&sub, &agent, "small", WAIT).await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(
        replies(&sub, "big").is_empty(),
        "the big command reached ferry: {:?}",
        replies(&sub, "big")
    );
    assert!(
        !agent.log().contains("\"big\""),
        "ferry saw the big command:\n{}",
        agent.log()
    );
    let status = agent.status_json().await;
    assert_eq!(status["connection"]["connects"], 1, "{status}");
    let before = sub.unique_seqs("system").len();
    assert!(
        sub.wait_until(WAIT, |s| s.unique_seqs("system").len() > before + 3)
            .await,
        "data stopped after the big command\n{}",
        agent.log()
    );
    println!(
        "MQTT 5: a 300 kB command over the 256 KiB Maximum Packet Size was not delivered; 1 connection, data kept flowing"
    );
}

/// Anonymous clients may use status, commands and replies, and read everything; with
/// `deny_data`, publishing data is denied.
fn acl(deny_data: bool) -> String {
    if deny_data {
        "topic readwrite ferry/test-gw/status\n\
         topic readwrite ferry/test-gw/commands\n\
         topic readwrite ferry/test-gw/replies\n\
         topic read #\n"
            .into()
    } else {
        "topic readwrite #\n".into()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_stay_in_the_spool_until_the_broker_accepts_them() {
    refused_until_the_acl_is_fixed(false).await;
}

/// Mosquitto 2.0.11 with `max_queued_messages 0` closes a version-5 connection right after
/// the PUBACK 0x87 of a denied publish: the refusal still holds the data back across the
/// reconnects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_publishes_survive_a_broker_that_disconnects_after_refusing() {
    refused_until_the_acl_is_fixed(true).await;
}

async fn refused_until_the_acl_is_fixed(broker_disconnects: bool) {
    let broker = Broker::start_with_acl(
        BrokerOpts {
            secure: None,
            persistence: true,
        },
        &acl(true),
        !broker_disconnects,
    );
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.agent_port(), "5");
    cfg.backoff_initial_ms = 200;
    cfg.extra = "self_metrics_interval_ms: 1000\n".into();
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent.wait_for_log("Connected to the broker", WAIT).await,
        "{}",
        agent.log()
    );

    // Mosquitto answers each denied QoS 1 publish with PUBACK 0x87.
    let status = status_until(&agent, "a refused publish", |s| {
        s["connection"]["publishes_refused"].as_u64() > Some(0)
    })
    .await;
    assert!(
        broker.log().contains("Denied PUBLISH from ferry-test-gw"),
        "{}",
        broker.log()
    );
    let last = status["connection"]["last_refusal"].as_str().unwrap_or("");
    assert!(last.contains("0x87 not authorized"), "{status}");
    // Watch it refused for a while: nothing is acknowledged (so nothing deleted), and retries
    // wait for their backoff instead of spinning.
    let first = status["connection"]["publishes_refused"].as_u64().unwrap();
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let status = agent.status_json().await;
    let elapsed = started.elapsed();
    let refused = status["connection"]["publishes_refused"].as_u64().unwrap() - first;
    let c = &status["connection"];
    assert_eq!(
        c["records_acked"], 0,
        "records acknowledged while denied: {status}"
    );
    let connects = c["connects"].as_u64().unwrap();
    if !broker_disconnects {
        assert_eq!(
            connects,
            1,
            "a refusal must not cost the connection: {status}\nbroker:\n{}\nferry:\n{}",
            broker.log(),
            agent.log()
        );
    }
    let stored: u64 = status["spool"]["streams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["records"].as_u64().unwrap())
        .sum();
    assert_eq!(
        stored,
        status["counters"]["committed"].as_u64().unwrap(),
        "records left the spool while every publish was refused: {status}"
    );
    // At most one window (4) of publishes per retry, retries at least backoff.initial_ms apart.
    let bound = 4 * (elapsed.as_millis() as u64 / cfg.backoff_initial_ms + 1);
    assert!(
        refused <= bound,
        "{refused} publishes refused in {elapsed:?}: more than {bound}, a retry loop without backoff"
    );
    let text = std::process::Command::new(common::agent::ferry_bin())
        .args(["status", "--config"])
        .arg(agent.config_path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("refused by the broker:") && text.contains("0x87 not authorized"),
        "{text}"
    );
    println!(
        "ACL denies data (broker disconnects after refusing: {broker_disconnects}): {refused} publishes refused in {:.1} s (bound {bound}), {connects} connections, 0 records acknowledged, {stored} kept in the spool",
        elapsed.as_secs_f64()
    );

    // Fix the ACL and reload the broker: everything arrives.
    broker.set_acl(&acl(false));
    assert!(
        sub.wait_until(WAIT, |s| !s.records("ferry.self").is_empty())
            .await,
        "nothing arrived after the ACL was fixed\n{}",
        agent.log()
    );
    let metrics = sub.records("ferry.self");
    assert!(
        metrics
            .iter()
            .any(|m| m["fields"]["connection.publishes_refused"].as_u64() > Some(0)),
        "ferry.self does not count the refusals: {:?}",
        metrics.last()
    );
    let streams = ["system".to_string(), "ferry.self".to_string()];
    let drained = stop_and_drain(&mut agent, &cfg, &sub, &streams, DRAIN).await;
    drained.assert_nothing_lost(&agent.log());
    assert_contiguous(&sub.unique_seqs("system"), 1, drained.streams[0].accepted);
    println!(
        "after the ACL fix: {} records accepted, {} delivered, seqs contiguous, {} duplicates",
        drained.produced(),
        drained.delivered(),
        drained.duplicates()
    );
}

/// A broker that speaks only MQTT 3.1.1, in front of Mosquitto: a version-5 CONNECT gets the
/// 3.1.1 CONNACK "unacceptable protocol version" (0x01) and the connection is closed, as an
/// old broker does; any other connection is passed through. Returns the port and how many
/// version-5 CONNECTs were refused.
async fn v311_only_broker(target: u16) -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let refused = Arc::new(AtomicU64::new(0));
    let count = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let Ok(connect) = read_packet(&mut client).await else {
                    return;
                };
                // CONNECT: fixed header, then "\0\x04MQTT" and the protocol level.
                let body = &connect[header_len(&connect)..];
                if body.get(6) == Some(&5) {
                    count.fetch_add(1, Ordering::SeqCst);
                    let _ = client.write_all(&[0x20, 0x02, 0x00, 0x01]).await;
                    let _ = client.shutdown().await;
                    return;
                }
                let Ok(mut broker) = TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                if broker.write_all(&connect).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut broker).await;
                }
            });
        }
    });
    (port, refused)
}

/// One MQTT packet, fixed header included.
async fn read_packet(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut packet = vec![s.read_u8().await?];
    let mut len = 0usize;
    for shift in [0, 7, 14, 21] {
        let b = s.read_u8().await?;
        packet.push(b);
        len |= ((b & 0x7f) as usize) << shift;
        if b & 0x80 == 0 {
            break;
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).await?;
    packet.extend_from_slice(&body);
    Ok(packet)
}

fn header_len(packet: &[u8]) -> usize {
    1 + packet[1..].iter().take_while(|b| *b & 0x80 != 0).count() + 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_that_refuses_mqtt5_gets_3_1_1_with_a_warning() {
    let broker = Broker::start(BrokerOpts::default());
    let (port, refused) = v311_only_broker(broker.plain_port()).await;
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), port, "5");
    let mut agent = Agent::spawn(dir.path(), &cfg.render());

    assert!(
        agent.wait_for_log("falling back to MQTT 3.1.1", WAIT).await,
        "no fallback warning\n{}",
        agent.log()
    );
    assert!(agent.log().contains("WARN"), "{}", agent.log());
    assert!(
        sub.wait_for_seqs("system", 1, 5, WAIT).await,
        "no data after the fallback\n{}",
        agent.log()
    );
    send_command(
        broker.plain_port(),
        r#"{"id":"fb-ping","name":"ping"}"#,
        &[],
    );
    let r = final_reply(&sub, &agent, "fb-ping", WAIT).await;
    assert_eq!(r["status"], "ok", "{r}");
    let status = agent.status_json().await;
    assert_eq!(
        status["connection"]["mqtt_version"], "3.1.1 (fallback)",
        "{status}"
    );
    let attempts = refused.load(Ordering::SeqCst);
    assert!(
        (1..=2).contains(&attempts),
        "{attempts} version-5 CONNECTs refused; ferry should fall back after at most 2"
    );
    let drained = stop_and_drain(&mut agent, &cfg, &sub, &["system".into()], DRAIN).await;
    drained.assert_nothing_lost(&agent.log());
    println!(
        "3.1.1-only broker: fell back after {attempts} refused MQTT 5 CONNECTs; {} records accepted, {} delivered",
        drained.produced(),
        drained.delivered()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mqtt5_message_expiry_counts_like_expires_at() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = config(dir.path(), broker.agent_port(), "5");
    // Replies are committed in groups every 5 s and nothing else is collected meanwhile, so
    // each command's reply takes that long and the commands behind it wait in ferry's queue.
    cfg.flush_interval_ms = 5000;
    cfg.collectors = vec!["type: system\nname: system\ninterval_ms: 3600000".into()];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(sub.wait_for_seq("system", 1, WAIT).await, "{}", agent.log());
    // Wait until the first group is committed and the writer is idle.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let v5 = ["-V", "mqttv5"];
    send_command(broker.plain_port(), r#"{"id":"slow","name":"ping"}"#, &v5);
    let expiring = [
        "-V",
        "mqttv5",
        "-D",
        "publish",
        "message-expiry-interval",
        "2",
    ];
    send_command(
        broker.plain_port(),
        r#"{"id":"short","name":"ping"}"#,
        &expiring,
    );
    let lasting = [
        "-V",
        "mqttv5",
        "-D",
        "publish",
        "message-expiry-interval",
        "600",
    ];
    send_command(
        broker.plain_port(),
        r#"{"id":"long","name":"ping"}"#,
        &lasting,
    );

    assert_eq!(
        final_reply(&sub, &agent, "slow", WAIT).await["status"],
        "ok"
    );
    let short = final_reply(&sub, &agent, "short", WAIT).await;
    assert_eq!(short["status"], "error", "{short}");
    assert_eq!(short["error"], "expired", "{short}");
    assert_eq!(
        final_reply(&sub, &agent, "long", WAIT).await["status"],
        "ok"
    );
    // The same reply as an expired `expires_at`.
    send_command(
        broker.plain_port(),
        r#"{"id":"old","name":"ping","expires_at":1}"#,
        &[],
    );
    let old = final_reply(&sub, &agent, "old", WAIT).await;
    assert_eq!(
        (&old["status"], &old["error"]),
        (&short["status"], &short["error"])
    );
    println!(
        "message expiry 2 s, waited behind a 5 s reply: {short}; expiry 600 s: ok; expires_at in the past: {old}"
    );
}
