//! Records too big for one packet against a real Mosquitto: none disappears silently. Every
//! seq the spool accepted is delivered or named by a `ferry.loss` record (reason `too_big_for_packet`).

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_bigger_than_a_packet_is_reported_lost_not_dropped_silently() {
    const PACKET: u64 = 262_144;
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("app.log");
    std::fs::write(&log, "").unwrap();
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    // max_packet_bytes is 262144 in the test config.
    cfg.collectors = vec![format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nmax_line_bytes: 1048576",
        log.display()
    )];
    let agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(
        agent.wait_for_log("Following file.", WAIT).await,
        "{}",
        agent.log()
    );
    let pause = || tokio::time::sleep(Duration::from_millis(300));
    append_lines(&log, &["before 1", "before 2"]);
    pause().await;
    // 300 kB of text: over the packet on its own.
    append_lines(&log, &["x".repeat(300_000)]);
    pause().await;
    append_lines(&log, &["between"]);
    pause().await;
    // 60 kB of control characters: JSON writes each as \u00XX, six times bigger.
    let control: String = (0..60_000).map(|i| char::from(1 + (i % 8) as u8)).collect();
    append_lines(&log, &[control]);
    pause().await;
    append_lines(&log, &["after"]);
    let total = 6;
    assert!(
        sub.wait_until(WAIT, |s| covered(s, PACKET).0.range(1..=total).count()
            == total as usize)
            .await,
        "covered: {:?}\nlog:\n{}",
        covered(&sub, PACKET).0,
        agent.log()
    );
    let (seqs, lost) = covered(&sub, PACKET);
    println!(
        "oversize: {} of {total} records delivered, {lost} reported lost (reason oversize)",
        sub.unique_seqs(STREAM).len()
    );
    assert_contiguous(&seqs, 1, total);
    assert!(lost >= 2, "both big records are reported");
    assert!(sub.unique_seqs(STREAM).contains(&total));
    assert!(agent.log().contains("reason oversize"));
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
    cfg.collectors = vec![format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nmax_line_bytes: 1048576",
        log.display()
    )];
    let mut agent = Agent::spawn(dir.path(), &cfg.render());
    assert!(agent.wait_for_log("Following file.", WAIT).await);
    // Stored while the broker is down: 100 kB lines fit the 256 KiB packets of the config...
    let total = 8u64;
    for i in 0..total {
        let line = if i % 2 == 0 {
            format!("small {i}")
        } else {
            "y".repeat(100_000)
        };
        append_lines(&log, &[line]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...but not the 64 KiB packets of the reloaded one.
    let text = std::fs::read_to_string(agent.config_path())
        .unwrap()
        .replace("max_packet_bytes: 262144", "max_packet_bytes: 65536")
        .replace("max_bytes: 65536", "max_bytes: 32768");
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
