//! Drain of a small backlog over a satellite-like link: 600 ms latency each way and 2400 B/s
//! each way, made by the fault proxy of the integration tests (`tests/common/proxy.rs`) between
//! the sender and a local Mosquitto. The subscriber connects to Mosquitto directly.
//!
//! - **ferry:** the release binary, started on a spool pre-filled through the library, with
//!   no collectors, `batch.linger_ms: 0` and `uplink.min_link_bytes_per_s: 2400` (the link's
//!   real rate: ferry keeps its unacknowledged bytes to what 2400 B/s sends in half a
//!   keepalive, 72 kB with the default 60 s keepalive).
//! - **baseline:** the plain rumqttc QoS 1 publisher of `benches/drain.rs`: the same messages
//!   ferry's uplink would cut with no byte budget (`Spool::next_batch` + `payload::encode`), a
//!   window of `uplink.window` messages, ferry's rumqttc options, the same proxy settings.
//!
//! Both are timed from process start (ferry) or client creation (baseline) until the subscriber
//! has seen every seq; records/s and payload bytes/s (what the subscriber received) are
//! printed for each, with the ratio ferry/baseline, and the bytes the proxy carried upwards
//! (wire bytes, MQTT framing and ferry's status and subscribe packets included).
//! Target (the `drain` bench's): ferry/baseline >= 0.8.
//!
//! Run: `cargo build --release && cargo bench --bench drain_satellite` (~2.5 min). Knobs:
//! `FERRY_BIN`, `FERRY_BENCH_RECORDS` (default 900, about 150 kB of JSON),
//! `FERRY_BENCH_REPS` (default 1), `FERRY_BENCH_DIR`.

mod common;

use common::harness::proxy;
use common::suite::{load, prefill, verdict, write_config};
use common::{
    Count, Counter, baseline, complete, env_or, ferry_bin, machine_header, median, tempdir,
};
use ferry::config::Config;
use ferry::spool::Spool;
use ferry::uplink::options::Topics;
use ferry::wire::payload::{self, Origin};
use proxy::{Direction, Proxy};
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM: &str = "sensor";
const LATENCY: Duration = Duration::from_millis(600);
const RATE_BYTES_PER_S: u64 = 2400;
/// Longest a single drain may take before the run counts as failed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);

fn config_at(dir: &Path, port: u16) -> Config {
    load(&write_config(
        dir,
        port,
        &[],
        &[
            &format!("min_link_bytes_per_s: {RATE_BYTES_PER_S}"),
            "batch:",
            "  linger_ms: 0",
        ],
        "[]",
    ))
}

/// The messages the uplink would send for this spool with no byte budget: `next_batch` and
/// `encode` as in `benches/drain.rs`.
fn messages(config: &Config) -> Vec<Vec<u8>> {
    let spool = Spool::open(&config.spool).expect("open the spool");
    let origin = Origin {
        device: config.device_id.clone(),
        boot: "0123456789abcdef".into(),
    };
    let limits = config.uplink.batch;
    let mut cursors = HashMap::new();
    let mut out = Vec::new();
    while let Some(batch) = spool.next_batch(&cursors, &limits).expect("read the spool") {
        let (p, used) = payload::encode(&origin, &batch.stream, &batch.chunks, limits.max_bytes);
        cursors.insert(batch.stream_id, batch.chunks[used - 1].chunk_id);
        out.push(p);
    }
    out
}

struct Drain {
    wall: Duration,
    count: Count,
    start: Instant,
    wire_up: u64,
    wire_down: u64,
    connections: u64,
}

impl Drain {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.wall.as_secs_f64()
    }
    fn payload_rate(&self) -> f64 {
        self.count.payload_bytes as f64 / self.wall.as_secs_f64()
    }
    fn first(&self) -> Duration {
        self.count.first.map_or(Duration::ZERO, |f| f - self.start)
    }
}

/// Waits until the proxy has no connection left, so the next run has the link to itself.
fn link_idle(proxy: &Proxy) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while proxy.open_connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn run_ferry(bin: &Path, proxy: &Proxy, broker: u16, n: u64) -> Drain {
    let dir = tempdir("ferry-bench-sat-");
    let config = config_at(dir.path(), proxy.port());
    {
        let spool = Spool::open(&config.spool).expect("open the spool");
        prefill(&spool, STREAM, 0, n, config.spool.flush_max_records as u64);
    }
    // sled releases its lock when its flusher thread ends (up to a second after the drop).
    std::thread::sleep(Duration::from_millis(1500));
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let counter = Counter::start(broker, &topics.data(STREAM), n, DRAIN_TIMEOUT);
    let (up0, down0, conn0) = (
        proxy.bytes(Direction::Up),
        proxy.bytes(Direction::Down),
        proxy.connections(),
    );
    let mut ferry = common::ferry(bin, &dir.path().join("ferry.yaml"));
    let count = counter.wait_while(|| ferry.is_running());
    let count = complete(count, n, "ferry", DRAIN_TIMEOUT, || ferry.log());
    let d = Drain {
        wall: count.done.expect("complete") - ferry.started(),
        start: ferry.started(),
        count,
        wire_up: proxy.bytes(Direction::Up) - up0,
        wire_down: proxy.bytes(Direction::Down) - down0,
        connections: proxy.connections() - conn0,
    };
    ferry.terminate_within(Duration::from_secs(30));
    let problems = ferry.problems();
    if !problems.is_empty() {
        eprintln!("ferry logged warnings:\n{}", problems.join("\n"));
    }
    drop(ferry);
    link_idle(proxy);
    d
}

fn run_baseline(
    proxy: &Proxy,
    broker: u16,
    n: u64,
    msgs: &Arc<Vec<Vec<u8>>>,
    config: &Arc<Config>,
) -> Drain {
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let counter = Counter::start(broker, &topics.data(STREAM), n, DRAIN_TIMEOUT);
    let (up0, down0, conn0) = (
        proxy.bytes(Direction::Up),
        proxy.bytes(Direction::Down),
        proxy.connections(),
    );
    let (msgs, cfg, topic, port) = (
        msgs.clone(),
        config.clone(),
        topics.data(STREAM),
        proxy.port(),
    );
    let start = Instant::now();
    let publisher = baseline::spawn(port, topic, msgs, cfg, Duration::from_secs(10));
    let count = counter.wait_while(|| !publisher.is_finished());
    let wire_up = proxy.bytes(Direction::Up) - up0;
    let wire_down = proxy.bytes(Direction::Down) - down0;
    let published = publisher
        .join()
        .unwrap_or_else(|_| Err("publisher panicked".into()));
    let count = complete(count, n, "baseline", DRAIN_TIMEOUT, || {
        format!("{published:?}")
    });
    published.expect("baseline publisher");
    link_idle(proxy);
    Drain {
        wall: count.done.expect("complete") - start,
        count,
        start,
        wire_up,
        wire_down,
        connections: proxy.connections() - conn0,
    }
}

fn print_run(side: &str, rep: usize, n: u64, d: &Drain) {
    println!(
        "{side:<9} {rep:>3} {:>7.1} {:>7.2} {:>9.0} {:>7.1} {:>5} {:>5} {:>9} {:>9} {:>9.0} {:>6} {:>5}",
        d.wall.as_secs_f64(),
        d.rate(n),
        d.payload_rate(),
        d.first().as_secs_f64(),
        d.count.messages,
        d.count.duplicates,
        d.count.payload_bytes,
        d.wire_up,
        d.wire_up as f64 / d.wall.as_secs_f64(),
        d.wire_down,
        d.connections,
    );
}

fn main() {
    if common::skip_unless_cargo_bench("drain_satellite") {
        return;
    }
    let n: u64 = env_or("FERRY_BENCH_RECORDS", 900);
    let reps: usize = env_or("FERRY_BENCH_REPS", 1);
    let bin = ferry_bin();
    let broker = common::broker(None);
    let proxy = Proxy::start(broker.plain_port());
    proxy.latency(LATENCY);
    proxy.throttle(Some(RATE_BYTES_PER_S));

    let scratch = tempdir("ferry-bench-sat-msgs-");
    let config = Arc::new(config_at(scratch.path(), proxy.port()));
    {
        let spool = Spool::open(&config.spool).expect("open the spool");
        prefill(&spool, STREAM, 0, n, config.spool.flush_max_records as u64);
    }
    let msgs = Arc::new(messages(&config));
    drop(scratch);
    let bytes: usize = msgs.iter().map(Vec::len).sum();

    println!(
        "drain_satellite: {n}-record backlog through {} ms latency each way and {RATE_BYTES_PER_S} B/s \
         each way -> local Mosquitto; ferry binary vs plain rumqttc publisher",
        LATENCY.as_millis()
    );
    println!("{}", machine_header());
    println!(
        "ferry: {}; min_link_bytes_per_s {RATE_BYTES_PER_S}, keepalive {} s -> in-flight byte budget {} B; \
         window {}; baseline: {} messages, {bytes} B of payload ({:.0} B/message, {:.0} B/record), \
         no byte budget",
        bin.display(),
        config.uplink.keepalive.as_secs(),
        config
            .uplink
            .inflight_bytes
            .map_or("none".into(), |b| b.to_string()),
        config.uplink.window,
        msgs.len(),
        bytes as f64 / msgs.len() as f64,
        bytes as f64 / n as f64,
    );
    println!();
    println!(
        "{:<9} {:>3} {:>7} {:>7} {:>9} {:>7} {:>5} {:>5} {:>9} {:>9} {:>9} {:>6} {:>5}",
        "side",
        "rep",
        "wall s",
        "rec/s",
        "payload/s",
        "1st s",
        "msgs",
        "dups",
        "payload B",
        "wire up B",
        "wire up/s",
        "down B",
        "conns"
    );
    let (mut ferry, mut base) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        for side in 0..2 {
            if (side == 0) == (rep % 2 == 1) {
                let d = run_ferry(&bin, &proxy, broker.plain_port(), n);
                print_run("ferry", rep, n, &d);
                ferry.push(d);
            } else {
                let d = run_baseline(&proxy, broker.plain_port(), n, &msgs, &config);
                print_run("baseline", rep, n, &d);
                base.push(d);
            }
        }
    }
    let med = |v: &[Drain], f: &dyn Fn(&Drain) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let (fr, br) = (med(&ferry, &|d| d.rate(n)), med(&base, &|d| d.rate(n)));
    let (fp, bp) = (
        med(&ferry, &|d| d.payload_rate()),
        med(&base, &|d| d.payload_rate()),
    );
    let (fw, bw) = (
        med(&ferry, &|d| d.wire_up as f64 / d.wall.as_secs_f64()),
        med(&base, &|d| d.wire_up as f64 / d.wall.as_secs_f64()),
    );
    println!();
    println!("median of {reps}         ferry     baseline  ferry/baseline");
    println!(
        "records/s        {fr:>9.2}  {br:>11.2}  {:>13.2}x  (target >= 0.80: {})",
        fr / br,
        verdict(fr / br >= 0.8)
    );
    println!("payload B/s      {fp:>9.0}  {bp:>11.0}  {:>13.2}x", fp / bp);
    println!(
        "wire up B/s      {fw:>9.0}  {bw:>11.0}  {:>13.2}x  (link: {RATE_BYTES_PER_S} B/s; ferry uses {:.0}%, baseline {:.0}%)",
        fw / bw,
        100.0 * fw / RATE_BYTES_PER_S as f64,
        100.0 * bw / RATE_BYTES_PER_S as f64
    );
    println!(
        "columns: wall = exec (ferry) or client creation (baseline) to the last seq at the \
         subscriber; payload = MQTT payload bytes the subscriber received (duplicates included); \
         wire up/down = bytes the proxy forwarded each way during the run; conns = connections \
         the proxy accepted during the run"
    );
    drop(proxy);
    drop(broker);
}
