//! End-to-end drain of a backlog to a local Mosquitto: the real release `ferry` binary vs a
//! plain rumqttc QoS 1 publisher with no spool.
//!
//! - **ferry:** a spool is pre-filled with the backlog through the library (`Spool::commit`, in
//!   groups of `flush_max_records`), then `ferry run` starts with no collectors, `linger_ms: 0`
//!   and the bench's broker. Time runs from process start until a subscriber has seen every
//!   seq. While it drains, its VmRSS is sampled and its VmHWM read at the end.
//! - **baseline:** the same messages, byte for byte except the boot id (the batches ferry sends,
//!   computed with `Spool::next_batch` and `wire::payload::encode` exactly as the uplink does),
//!   published from this process by one rumqttc client with ferry's options (window of
//!   `uplink.window` messages, rumqttc in-flight limit from `uplink::options::rumqttc_inflight`),
//!   to the same subscriber. It has no spool reads, JSON encoding or deletions: it is what MQTT
//!   alone costs. Time runs from creating the client until the subscriber has seen every seq.
//!
//! Runs alternate; medians are reported, and the ratio ferry/baseline (target >= 0.8).
//!
//! Run: `cargo build --release && cargo bench --bench drain`. Knobs: `FERRY_BIN` (default: the
//! binary cargo builds for this bench, with the release profile's settings),
//! `FERRY_BENCH_RECORDS` (default 200000), `FERRY_BENCH_REPS` (default 5), `FERRY_BENCH_DIR`.

mod common;

use common::{
    Count, Counter, RssSampler, baseline, complete, dir_bytes, env_or, ferry_bin, machine_header,
    median, proc_cpu, proc_io, proc_status_kb, suite, tempdir,
};
use ferry::config::Config;
use ferry::spool::Spool;
use ferry::uplink::options::{Topics, rumqttc_inflight};
use ferry::wire::payload::{self, Origin};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

const STREAM: &str = "sensor";
/// Longest a single drain may take before the run counts as failed.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

fn write_config(dir: &Path, port: u16) -> PathBuf {
    suite::write_config(dir, port, &[], &["batch:", "  linger_ms: 0"], "[]")
}

/// Commits `n` readings in groups of `flush_max_records`, as the writer would.
fn prefill(config: &Config, n: u64) {
    let spool = Spool::open(&config.spool).expect("open the spool");
    suite::prefill(&spool, STREAM, 0, n, config.spool.flush_max_records as u64);
    assert_eq!(spool.stats().records, n);
}

/// The messages ferry's uplink sends for this spool in its first connection epoch: the same
/// `next_batch` / `encode` / cursor steps as `Uplink::fill`. Then acks them all, as PUBACKs
/// would. Times each step, single-threaded and without MQTT: where ferry's CPU goes.
fn messages(config: &Config) -> (Vec<Vec<u8>>, Phases) {
    let spool = Spool::open(&config.spool).expect("open the spool");
    let origin = Origin {
        device: config.device_id.clone(),
        boot: "0123456789abcdef".into(), // ferry's boot ids are 16 hex digits too
    };
    let limits = config.uplink.batch;
    let mut cursors = HashMap::new();
    let mut out = Vec::new();
    let mut acks = Vec::new();
    let mut ph = Phases::default();
    loop {
        let t = Instant::now();
        let Some(batch) = spool.next_batch(&cursors, &limits).expect("read the spool") else {
            break;
        };
        ph.read += t.elapsed();
        ph.decoded += batch.record_count() as u64;
        let t = Instant::now();
        let (p, used) = payload::encode(&origin, &batch.stream, &batch.chunks, limits.max_bytes);
        ph.encode += t.elapsed();
        let chunks = &batch.chunks[..used];
        ph.sent += chunks.iter().map(|c| c.records.len() as u64).sum::<u64>();
        cursors.insert(batch.stream_id, chunks[used - 1].chunk_id);
        acks.push((
            batch.stream_id,
            chunks.iter().map(|c| c.chunk_id).collect::<Vec<_>>(),
        ));
        out.push(p);
    }
    let me = std::process::id();
    let written = || proc_io(me, "write_bytes").unwrap_or(0);
    let before = written();
    let t = Instant::now();
    for (sid, ids) in &acks {
        spool.ack(*sid, ids).expect("ack");
    }
    ph.ack = t.elapsed();
    spool.flush().expect("flush");
    ph.ack_written = written().saturating_sub(before);
    assert_eq!(spool.stats().records, 0, "every record acked");
    (out, ph)
}

#[derive(Default)]
struct Phases {
    read: Duration,
    encode: Duration,
    ack: Duration,
    /// Bytes written to storage by the acks (deletions) once flushed.
    ack_written: u64,
    decoded: u64,
    sent: u64,
}

struct Drain {
    wall: Duration,
    count: Count,
    start: Instant,
    /// ferry only: log phases, memory, CPU, what was left in the spool.
    spool_opened: Option<Duration>,
    connected: Option<Duration>,
    hwm_kb: Option<u64>,
    sampled_kb: u64,
    cpu: Option<Duration>,
    disk_write: Option<u64>,
    left: Option<u64>,
}

impl Drain {
    fn rate(&self, n: u64) -> f64 {
        n as f64 / self.wall.as_secs_f64()
    }
    fn first(&self) -> Duration {
        self.count.first.map_or(Duration::ZERO, |f| f - self.start)
    }
    /// Records/s from the first message to the last: the drain without start-up.
    fn steady(&self, n: u64) -> f64 {
        match (self.count.first, self.count.done) {
            (Some(f), Some(d)) if d > f => n as f64 / (d - f).as_secs_f64(),
            _ => f64::NAN,
        }
    }
}

fn run_ferry(bin: &Path, port: u16, n: u64) -> Drain {
    let dir = tempdir("ferry-bench-drain-");
    let cfg_path = write_config(dir.path(), port);
    let config = suite::load(&cfg_path);
    prefill(&config, n);
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let counter = Counter::start(port, &topics.data("#"), n, DRAIN_TIMEOUT);

    let mut ferry = common::ferry(bin, &cfg_path);
    let pid = ferry.pid();
    let sampler = RssSampler::start(pid, Duration::from_millis(10));
    let count = counter.wait_while(|| ferry.is_running());
    let hwm_kb = proc_status_kb(pid, "VmHWM");
    let cpu = proc_cpu(pid);
    let disk_write = proc_io(pid, "write_bytes");
    let sampled_kb = sampler.finish();
    let count = complete(count, n, "ferry", DRAIN_TIMEOUT, || ferry.log());
    let start = ferry.started();
    let since = |t: Option<Instant>| t.map(|t| t - start);
    let spool_opened = since(ferry.logged("Spool opened."));
    let connected = since(ferry.logged("Connected to the broker."));

    let clean = ferry.terminate_within(Duration::from_secs(15));
    if let Some(status) = clean.filter(|s| !s.success()) {
        eprintln!("ferry exited with {status} after SIGTERM");
    }
    let problems = ferry.problems();
    if !problems.is_empty() {
        eprintln!("ferry logged warnings:\n{}", problems.join("\n"));
    }
    let left = clean.map(|_| {
        let spool = Spool::open(&config.spool).expect("reopen the spool after ferry exited");
        spool.stats().records
    });
    Drain {
        wall: count.done.expect("complete") - start,
        count,
        start,
        spool_opened,
        connected,
        hwm_kb,
        sampled_kb,
        cpu,
        disk_write,
        left,
    }
}

fn run_baseline(port: u16, n: u64, msgs: &Arc<Vec<Vec<u8>>>, config: &Arc<Config>) -> Drain {
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let counter = Counter::start(port, &topics.data("#"), n, DRAIN_TIMEOUT);
    let (msgs, cfg, topic) = (msgs.clone(), config.clone(), topics.data(STREAM));
    let start = Instant::now();
    let publisher = baseline::spawn(port, topic, msgs, cfg, Duration::from_secs(2));
    let count = counter.wait_while(|| !publisher.is_finished());
    let published = publisher
        .join()
        .unwrap_or_else(|_| Err("publisher panicked".into()));
    let count = complete(count, n, "baseline", DRAIN_TIMEOUT, || {
        format!("{published:?}")
    });
    published.expect("baseline publisher");
    Drain {
        wall: count.done.expect("complete") - start,
        count,
        start,
        spool_opened: None,
        connected: None,
        hwm_kb: None,
        sampled_kb: 0,
        cpu: None,
        disk_write: None,
        left: None,
    }
}

fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1000.0))
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn print_run(side: &str, rep: usize, n: u64, d: &Drain) {
    println!(
        "{side:<9} {rep:>3} {:>7.2} {:>9.0} {:>9.0} {:>6} {:>6} {:>7} {:>5} {:>5} {:>8} {:>8} {:>6} {:>8} {:>5}",
        d.wall.as_secs_f64(),
        d.rate(n),
        d.steady(n),
        ms(d.spool_opened),
        ms(d.connected),
        ms(Some(d.first())),
        d.count.messages,
        d.count.duplicates,
        mb(d.hwm_kb),
        if d.sampled_kb > 0 {
            mb(Some(d.sampled_kb))
        } else {
            "-".into()
        },
        d.cpu
            .map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64())),
        d.disk_write
            .map_or("-".into(), |b| format!("{:.1}", b as f64 / 1e6)),
        d.left.map_or("-".into(), |l| l.to_string()),
    );
}

fn main() {
    if common::skip_unless_cargo_bench("drain") {
        return;
    }
    let n: u64 = env_or("FERRY_BENCH_RECORDS", 200_000);
    let reps: usize = env_or("FERRY_BENCH_REPS", 5);
    let bin = ferry_bin();
    let broker = common::broker(None);

    // The messages ferry will send, for the baseline (and the spool's size for the header).
    let scratch = tempdir("ferry-bench-drain-msgs-");
    let config = Arc::new(suite::load(&write_config(
        scratch.path(),
        broker.plain_port(),
    )));
    prefill(&config, n);
    let spool_disk = dir_bytes(&config.spool.dir);
    let (msgs, phases) = messages(&config);
    let msgs = Arc::new(msgs);
    drop(scratch);
    let bytes: usize = msgs.iter().map(Vec::len).sum();

    println!("drain: {n}-record backlog -> local ferry binary vs plain rumqttc publisher");
    println!("{}", machine_header());
    println!(
        "ferry: {}; spool {:.1} MB on disk; {} messages, {:.0} B/message avg, {:.0} B/record JSON; \
         window {}, rumqttc inflight {}, QoS 1; mosquitto on 127.0.0.1:{}",
        bin.display(),
        spool_disk as f64 / 1e6,
        msgs.len(),
        bytes as f64 / msgs.len() as f64,
        bytes as f64 / n as f64,
        config.uplink.window,
        rumqttc_inflight(config.uplink.window),
        broker.plain_port()
    );
    let millis = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "in-process, one thread, no MQTT: next_batch {:.0} ms (decoded {:.2}x the records sent), \
         encode {:.0} ms, ack {:.0} ms (sled's background writes not included; the acks made sled \
         write {:.1} MB)",
        millis(phases.read),
        phases.decoded as f64 / phases.sent as f64,
        millis(phases.encode),
        millis(phases.ack),
        phases.ack_written as f64 / 1e6
    );
    println!();
    println!(
        "{:<9} {:>3} {:>7} {:>9} {:>9} {:>6} {:>6} {:>7} {:>5} {:>5} {:>8} {:>8} {:>6} {:>8} {:>5}",
        "side",
        "rep",
        "wall s",
        "rec/s",
        "steady/s",
        "open",
        "conn",
        "1st ms",
        "msgs",
        "dups",
        "HWM MB",
        "RSS MB",
        "CPU s",
        "disk W MB",
        "left"
    );
    let (mut ferry, mut base) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        for side in 0..2 {
            if (side == 0) == (rep % 2 == 1) {
                let d = run_ferry(&bin, broker.plain_port(), n);
                print_run("ferry", rep, n, &d);
                ferry.push(d);
            } else {
                let d = run_baseline(broker.plain_port(), n, &msgs, &config);
                print_run("baseline", rep, n, &d);
                base.push(d);
            }
        }
    }

    let med = |v: &[Drain], f: &dyn Fn(&Drain) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let fr = med(&ferry, &|d| d.rate(n));
    let br = med(&base, &|d| d.rate(n));
    let fs = med(&ferry, &|d| d.steady(n));
    let bs = med(&base, &|d| d.steady(n));
    let hwm = ferry.iter().filter_map(|d| d.hwm_kb).max().unwrap_or(0) as f64 / 1024.0;
    let cpu = med(&ferry, &|d| d.cpu.map_or(f64::NAN, |c| c.as_secs_f64()));
    let fw = med(&ferry, &|d| d.wall.as_secs_f64());
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    println!();
    println!("median of {reps}        ferry rec/s  baseline rec/s  ferry/baseline");
    println!(
        "from process start  {fr:>11.0}  {br:>14.0}  {:>13.2}x  (target >= 0.80: {})",
        fr / br,
        verdict(fr / br >= 0.8)
    );
    println!(
        "first to last msg   {fs:>11.0}  {bs:>14.0}  {:>13.2}x",
        fs / bs
    );
    println!(
        "ferry peak RSS while draining (max VmHWM): {hwm:.1} MB (target <= 16 MB: {}); \
         ferry CPU {cpu:.2} s over {fw:.2} s wall (median)",
        verdict(hwm <= 16.0)
    );
    println!(
        "columns: open/conn = ms from exec to ferry's 'Spool opened.'/'Connected' log lines; 1st ms = first \
         record at the subscriber; HWM = VmHWM at the end of the drain; RSS = largest VmRSS sampled \
         every 10 ms; disk W = /proc/<pid>/io write_bytes; left = records still in the spool after \
         ferry's clean exit"
    );
    drop(broker);
}
