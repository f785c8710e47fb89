//! Records and packets against a real Mosquitto. A line over `max_line_bytes` is refused at
//! ingest and reported; the largest line validate allows (control characters, six times bigger
//! in JSON) still fits a packet; a big record is sent alone, not refused with the batch around
//! it; and chunks stored before `max_packet_bytes` was lowered disappear only with a
//! `ferry.loss` record (reason `too_big_for_packet`): every accepted seq is delivered or named.

mod common;

use common::agent::{Agent, AgentConfig};
use common::append_lines;
use common::broker::{Broker, BrokerOpts};
use common::subscriber::{Subscriber, assert_contiguous};
use std::collections::BTreeSet;
use std::time::Duration;

const STREAM: &str = "app";
const WAIT: Duration = Duration::from_secs(30);

/// Seqs of `STREAM` delivered, plus those its `oversize` loss records name (each for a
/// message over `packet` bytes).
fn covered(sub: &Subscriber, packet: u64) -> (BTreeSet<u64>, u64) {
    let mut seqs = sub.unique_seqs(STREAM);
    let mut lost = 0;
    for loss in sub.records("ferry.loss") {
        let f = &loss["fields"];
        if f["stream"] == STREAM {
            assert_eq!(f["reason"], "too_big_for_packet", "{loss}");
            assert!(f["bytes"].as_u64().unwrap() > packet - 1024, "{loss}");
            let (a, b) = (
                f["first_seq"].as_u64().unwrap(),
                f["last_seq"].as_u64().unwrap(),
            );
            lost += b - a + 1;
            seqs.extend(a..=b);
        }
    }
    (seqs, lost)
}

/// The largest `max_line_bytes` validate accepts with the test config's 256 KiB packets:
/// (262144 - 2048) / 6.
const LARGEST_LINE: usize = 43_349;

/// A line of `n` control characters: JSON writes each as `\u00XX`, six times bigger (U+0001
/// to U+0007; backspace would be `\b`, two bytes).
fn control_line(n: usize) -> String {
    (0..n).map(|i| char::from(1 + (i % 7) as u8)).collect()
}

fn file_collector(log: &std::path::Path, max_line_bytes: usize) -> String {
    format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nmax_line_bytes: {max_line_bytes}",
        log.display()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_line_over_the_limit_is_refused_at_ingest_and_the_worst_case_line_is_delivered() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![file_collector(&log, LARGEST_LINE)];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent.wait_for_log("Following file.", WAIT).await,
        "{}",
        agent.log()
    );
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    append_lines(&log, &["before 1", "before 2"]);
    pause().await;
    // 300 kB of text: over max_line_bytes, so it never becomes a record.
    append_lines(&log, &["x".repeat(300_000)]);
    pause().await;
    append_lines(&log, &["between"]);
    pause().await;
    // The worst case validate allows: control characters up to max_line_bytes.
    append_lines(&log, &[control_line(LARGEST_LINE)]);
    pause().await;
    append_lines(&log, &["after"]);
    let total = 5;
    assert!(
        sub.wait_for_seqs(STREAM, 1, total, WAIT).await,
        "delivered: {:?}\nlog:\n{}",
        sub.unique_seqs(STREAM),
        agent.log()
    );
    assert!(
        sub.wait_until(WAIT, |s| !s.records("ferry.loss").is_empty())
            .await,
        "the refused line was not reported"
    );
    let losses: Vec<_> = sub
        .records("ferry.loss")
        .into_iter()
        .filter(|l| l["fields"]["stream"] == STREAM)
        .collect();
    println!("oversize at ingest: {total} records delivered, loss records {losses:?}");
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert_eq!(losses[0]["fields"]["reason"], "oversized", "{losses:?}");
    assert_contiguous(&sub.unique_seqs(STREAM), 1, total);
    let biggest = sub
        .messages()
        .iter()
        .filter(|m| m.topic.ends_with(&format!("/data/{STREAM}")))
        .map(|m| m.payload.len())
        .max()
        .unwrap();
    assert!(
        biggest > 6 * LARGEST_LINE,
        "the worst-case line travelled in {biggest} bytes"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_big_record_that_fits_alone_is_sent_alone() {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![file_collector(&log, LARGEST_LINE)];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent.wait_for_log("Following file.", WAIT).await,
        "{}",
        agent.log()
    );
    // Small lines around a record just under the 256 KiB packet, written at once: they are
    // committed and drained together, in one batch far over batch.max_bytes (64 KiB).
    let mut lines: Vec<String> = (0..50).map(|i| format!("small {i}")).collect();
    lines.push(control_line(LARGEST_LINE));
    lines.extend((50..100).map(|i| format!("small {i}")));
    append_lines(&log, &lines);
    assert!(
        sub.wait_for_seqs(STREAM, 1, 101, WAIT).await,
        "delivered: {:?}\nlog:\n{}",
        sub.unique_seqs(STREAM),
        agent.log()
    );
    let drained =
        common::drain::stop_and_drain(&mut agent, &cfg, &sub, &[STREAM.to_string()], WAIT).await;
    drained.assert_nothing_lost(&agent.log());
    // The big record's message carries it alone, and is just under the packet limit.
    let big: Vec<_> = sub
        .messages()
        .into_iter()
        .filter(|m| m.topic.ends_with(&format!("/data/{STREAM}")))
        .filter(|m| m.payload.len() > 65_536)
        .collect();
    assert_eq!(big.len(), 1, "one message over the batch limit");
    let records = big[0].json.as_ref().unwrap()["records"]
        .as_array()
        .unwrap()
        .len();
    let packet = ferry::wire::publish_packet_bytes(big[0].topic.len(), big[0].payload.len());
    println!("big record: one message of {packet} packet bytes with {records} record(s)");
    assert_eq!(records, 1, "the big record shares its message");
    assert!(packet <= 262_144 && packet > 250_000, "{packet}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lowering_max_packet_bytes_with_bigger_chunks_stored_reports_them_lost() {
    let mut broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let mut sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    sub.disconnect().await;
    broker.stop();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.collectors = vec![file_collector(&log, LARGEST_LINE)];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(agent.wait_for_log("Following file.", WAIT).await);
    // Stored while the broker is down: lines of 40,000 control characters (240 kB of JSON)
    // fit the 256 KiB packets of the config...
    let total = 8u64;
    for i in 0..total {
        let line = if i % 2 == 0 {
            format!("small {i}")
        } else {
            control_line(40_000)
        };
        append_lines(&log, &[line]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...but not the 64 KiB packets of the reloaded one.
    let text = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace("max_packet_bytes: 262144", "max_packet_bytes: 65536")
        .replace("max_bytes: 65536", "max_bytes: 32768")
        .replace(
            &format!("max_line_bytes: {LARGEST_LINE}"),
            "max_line_bytes: 10000",
        );
    std::fs::write(agent.config_path(), text).unwrap();
    agent.sighup();
    assert!(
        agent.wait_for_log("Config reloaded", WAIT).await,
        "{}",
        agent.log()
    );
    broker.start_again();
    sub.reconnect().await;
    assert!(
        sub.wait_until(WAIT, |s| covered(s, 65_536).0.range(1..=total).count()
            == total as usize)
            .await,
        "covered: {:?}\nlog:\n{}",
        covered(&sub, 65_536).0,
        agent.log()
    );
    let (seqs, lost) = covered(&sub, 65_536);
    println!(
        "packet limit lowered: {} of {total} records delivered, {lost} reported lost (reason oversize)",
        sub.unique_seqs(STREAM).len()
    );
    assert_contiguous(&seqs, 1, total);
    assert!(lost >= total / 2);
    agent.terminate();
}
