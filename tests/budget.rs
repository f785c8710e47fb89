//! The byte budget with an injectable clock: the real spool and uplink (in process, so the
//! test controls the clock) against a real Mosquitto. A tiny daily budget is held to within
//! one message, counted at the subscriber as MQTT packet bytes; the high lane still flows when
//! it is spent; normal traffic resumes when the UTC day rolls over. A budget of a single packet
//! never stalls: messages are cut to what is left, and across day and month rollovers every
//! record the spool accepted arrives.

mod common;

use common::broker::{Broker, BrokerOpts};
use common::subscriber::{Subscriber, assert_contiguous};
use ferry::clock::ManualClock;
use ferry::record::{Reading, Value};
use ferry::spool::{Intake, Spool};
use ferry::uplink::Uplink;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(20);
const DAILY: u64 = 6000;
/// 2026-11-25T12:00:00Z.
const NOON_MS: u64 = 1_795_608_000_000;
const DAY_MS: u64 = 86_400_000;

fn commit(spool: &Spool, stream: &str, count: u64, ts_ms: u64) {
    let intakes: Vec<Intake> = (0..count)
        .map(|i| {
            Intake::reading(Reading {
                stream: stream.into(),
                ts_ms: ts_ms + i,
                body: ferry::record::Body::Fields(vec![
                    ("value".into(), Value::F64(20.0 + i as f64 / 8.0)),
                    ("i".into(), Value::U64(i)),
                ]),
            })
        })
        .collect();
    spool.commit(&intakes).unwrap();
}

/// MQTT packet bytes of the data messages of `stream` received so far.
fn wire_bytes(sub: &Subscriber, stream: &str) -> (u64, u64) {
    let msgs: Vec<_> = sub
        .messages()
        .into_iter()
        .filter(|m| m.topic.ends_with(&format!("/data/{stream}")))
        .collect();
    let total = msgs
        .iter()
        .map(|m| ferry::wire::publish_packet_bytes(m.topic.len(), m.payload.len()) as u64)
        .sum();
    let largest = msgs
        .iter()
        .map(|m| ferry::wire::publish_packet_bytes(m.topic.len(), m.payload.len()) as u64)
        .max()
        .unwrap_or(0);
    (total, largest)
}

/// Waits until the uplink reports its budget spent; false after [`WAIT`].
async fn spent(stats: &ferry::uplink::UplinkStats) -> bool {
    tokio::time::timeout(WAIT, async {
        while !stats.budget.spent.load(Ordering::Relaxed) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .is_ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tiny_daily_budget_holds_lets_the_high_lane_through_and_rolls_over() {
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    let yaml = format!(
        "\
device_id: budget-gw
spool:
  dir: {spool}
uplink:
  host: 127.0.0.1
  port: {port}
  keepalive_s: 5
  max_packet_bytes: 4096
  batch:
    max_records: 10
    max_bytes: 3072
    linger_ms: 0
  backoff:
    initial_ms: 100
    max_ms: 500
  budget:
    daily_bytes: {DAILY}
streams:
  alarm:
    lane: high
collectors: []
",
        spool = dir.path().join("spool").display(),
        port = broker.agent_port(),
    );
    std::fs::write(&path, &yaml).unwrap();
    let config = ferry::config::load(&path).unwrap();
    let spool = Spool::open(&config.spool).unwrap();
    let clock = ManualClock::new(NOON_MS, 1_000, true);
    spool.set_clock(clock.clone());

    // Far more than a day's budget: ~300 records of ~60 bytes of JSON each.
    commit(&spool, "telemetry", 300, NOON_MS);

    let stop = CancellationToken::new();
    let (_settings, settings_rx) = tokio::sync::watch::channel(config.uplink.clone());
    let uplink = Uplink::new(settings_rx, spool.clone(), "b1".into(), stop.clone())
        .with_clock(clock.clone());
    let stats = uplink.stats();
    let task = tokio::spawn(uplink.run());

    // The budget runs out: delivery stops with records still in the spool.
    assert!(
        spent(&stats).await,
        "the budget was never spent; delivered {:?}",
        sub.unique_seqs("telemetry").len()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (used, largest) = wire_bytes(&sub, "telemetry");
    let delivered_day1 = sub.unique_seqs("telemetry").len() as u64;
    assert!(
        used <= DAILY,
        "normal traffic went past the budget: {used} > {DAILY}"
    );
    assert!(
        used + largest > DAILY,
        "more than a message of budget was left unused: {used} of {DAILY}, messages up to {largest}"
    );
    assert!(
        delivered_day1 > 0 && delivered_day1 < 300,
        "{delivered_day1}"
    );
    assert_eq!(
        stats.budget.day_used.load(Ordering::Relaxed),
        used,
        "ferry counts what the subscriber sees"
    );

    // Spent: the high lane still flows, normal does not.
    commit(&spool, "alarm", 3, NOON_MS + 60_000);
    assert!(
        sub.wait_for_seqs("alarm", 1, 3, WAIT).await,
        "alarms held back by a spent budget"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        sub.unique_seqs("telemetry").len() as u64,
        delivered_day1,
        "normal traffic flowed on a spent budget"
    );

    // Next UTC day: normal traffic resumes, within the new day's budget again.
    clock.advance(DAY_MS);
    assert!(
        sub.wait_until(WAIT, |s| s.unique_seqs("telemetry").len() as u64
            > delivered_day1)
            .await,
        "normal traffic did not resume after the rollover"
    );
    assert!(spent(&stats).await, "day 2 should spend its budget too");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (used_total, _) = wire_bytes(&sub, "telemetry");
    assert!(
        used_total - used <= DAILY,
        "day 2 went past the budget: {}",
        used_total - used
    );
    let seqs = sub.unique_seqs("telemetry");
    assert_contiguous(&seqs, 1, *seqs.last().unwrap());

    stop.cancel();
    task.await.unwrap();
}

/// Wire bytes of `stream` at the subscriber once nothing has arrived for 1.5 s.
async fn settled_bytes(sub: &Subscriber, stream: &str) -> u64 {
    let mut last = wire_bytes(sub, stream).0;
    let mut quiet = 0;
    let deadline = tokio::time::Instant::now() + WAIT;
    while quiet < 3 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = wire_bytes(sub, stream).0;
        quiet = if now == last { quiet + 1 } else { 0 };
        last = now;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_of_one_packet_is_used_up_and_never_stalls_across_rollovers() {
    // The smallest budget validate accepts: one packet a day, five a month. Batches are far
    // bigger than what is left of a day after the first message.
    const PACKET: u64 = 4096;
    const MONTHLY: u64 = 5 * PACKET;
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ferry.yaml");
    let yaml = format!(
        "\
device_id: budget-gw
spool:
  dir: {spool}
uplink:
  host: 127.0.0.1
  port: {port}
  keepalive_s: 5
  max_packet_bytes: {PACKET}
  batch:
    max_records: 100
    max_bytes: 3072
    linger_ms: 0
  backoff:
    initial_ms: 100
    max_ms: 500
  budget:
    daily_bytes: {PACKET}
    monthly_bytes: {MONTHLY}
collectors: []
",
        spool = dir.path().join("spool").display(),
        port = broker.agent_port(),
    );
    std::fs::write(&path, &yaml).unwrap();
    let config = ferry::config::load(&path).unwrap();
    let spool = Spool::open(&config.spool).unwrap();
    let clock = ManualClock::new(NOON_MS, 1_000, true);
    spool.set_clock(clock.clone());
    // About 26 kB of JSON: more than November's budget, so December carries the rest.
    commit(&spool, "telemetry", 400, NOON_MS);
    let accepted = spool
        .stats()
        .streams
        .iter()
        .find(|s| s.name == "telemetry")
        .unwrap()
        .next_seq
        - 1;

    let stop = CancellationToken::new();
    let (_settings, settings_rx) = tokio::sync::watch::channel(config.uplink.clone());
    let uplink = Uplink::new(settings_rx, spool.clone(), "b1".into(), stop.clone())
        .with_clock(clock.clone());
    let task = tokio::spawn(uplink.run());

    let mut days = Vec::new();
    let mut total = 0;
    let mut november = 0;
    // 2026-11-25 is day 0; December starts on day 6.
    for day in 0..40u64 {
        let now = settled_bytes(&sub, "telemetry").await;
        let used = now - total;
        total = now;
        days.push(used);
        if day < 6 {
            november += used;
        }
        assert!(used <= PACKET, "day {day} went past the budget: {used}");
        if sub.unique_seqs("telemetry").len() as u64 == accepted {
            break;
        }
        clock.advance(DAY_MS);
    }
    println!("budget of one packet: bytes per day {days:?}, {accepted} records");
    let seqs = sub.unique_seqs("telemetry");
    assert_eq!(
        seqs.len() as u64,
        accepted,
        "records stuck after {} days: {days:?}",
        days.len()
    );
    assert_contiguous(&seqs, 1, accepted);
    assert!(sub.records("ferry.loss").is_empty());
    assert!(
        november <= MONTHLY,
        "November went past the budget: {november}"
    );
    // Cut to fit: the first days leave less than one stored chunk's message unused (a chunk
    // is 512 stored bytes here, about 600 as a JSON message), where whole batches of ~3 kB
    // leave about 1 kB.
    for (day, used) in days.iter().enumerate().take(3) {
        assert!(
            used + 800 > PACKET,
            "day {day} left {} of {PACKET} bytes unused: {days:?}",
            PACKET - used
        );
    }
    assert!(
        days.len() > 6 && days[6..].iter().any(|d| *d > 0),
        "nothing flowed in December: {days:?}"
    );
    stop.cancel();
    task.await.unwrap();
}
