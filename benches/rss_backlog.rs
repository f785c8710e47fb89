//! Memory with a large backlog: VmRSS and VmHWM of the release `ferry` idle with
//! `FERRY_BENCH_RECORDS` (default 1 000 000) records in its spool, then while it drains them,
//! against the same ferry idle with an empty spool, measured at the same time in the same run.
//!
//! 1. Two spools: one pre-filled through the library (`Spool::commit` in groups of
//!    `flush_max_records`), one empty. Two ferry processes start together on them, with the
//!    `rss` bench's config (one system collector at `interval_ms: 1000`) and each an uplink to
//!    a loopback port where nothing listens yet (`backoff.max_ms: 1000`, so each retries about
//!    once a second).
//! 2. Both idle for `FERRY_BENCH_IDLE_S` (default 30); then VmRSS, VmHWM, RssAnon and RssFile of
//!    both are read.
//! 3. A Mosquitto starts on the backlog ferry's port; it reconnects and drains. VmRSS is sampled
//!    every 10 ms until a subscriber has seen every seq of the backlog; VmHWM is read then.
//!    The empty-spool ferry keeps idling (its RSS at that moment is printed too).
//!
//! Targets (the `rss` and `drain` benches'): idle VmRSS <= 8 MiB; peak while draining <= 16 MiB.
//!
//! Run: `cargo build --release && cargo bench --bench rss_backlog` (~1.5 min). Knobs:
//! `FERRY_BIN`, `FERRY_BENCH_RECORDS`, `FERRY_BENCH_IDLE_S`, `FERRY_BENCH_DIR`.

mod common;

use common::suite::{kb_as_mib, load, mb, prefill, verdict, write_config};
use common::{
    Counter, RssSampler, dir_bytes, env_or, ferry_bin, free_port, machine_header, proc_cpu,
    proc_status_kb, tempdir,
};
use ferry::spool::Spool;
use ferry::uplink::options::Topics;
use std::time::{Duration, Instant};

const STREAM: &str = "sensor";
const DRAIN_TIMEOUT: Duration = Duration::from_secs(600);
const COLLECTORS: &str = "\n  - type: system\n    name: system\n    interval_ms: 1000";

struct Mem {
    rss: Option<u64>,
    hwm: Option<u64>,
    anon: Option<u64>,
    file: Option<u64>,
}

fn mem(pid: u32) -> Mem {
    Mem {
        rss: proc_status_kb(pid, "VmRSS"),
        hwm: proc_status_kb(pid, "VmHWM"),
        anon: proc_status_kb(pid, "RssAnon"),
        file: proc_status_kb(pid, "RssFile"),
    }
}

fn row(what: &str, m: &Mem, base: &Mem) {
    let ratio = |a: Option<u64>, b: Option<u64>| match (a, b) {
        (Some(a), Some(b)) if b > 0 => format!("{:.2}x", a as f64 / b as f64),
        _ => "-".into(),
    };
    println!(
        "{what:<34} {:>9} {:>9} {:>8} {:>8} {:>10} {:>10}",
        kb_as_mib(m.rss),
        kb_as_mib(m.hwm),
        kb_as_mib(m.anon),
        kb_as_mib(m.file),
        ratio(m.rss, base.rss),
        ratio(m.hwm, base.hwm),
    );
}

fn main() {
    if common::skip_unless_cargo_bench("rss_backlog") {
        return;
    }
    let n: u64 = env_or("FERRY_BENCH_RECORDS", 1_000_000);
    let idle_s: u64 = env_or("FERRY_BENCH_IDLE_S", 30);
    let bin = ferry_bin();
    let (port, empty_port) = (free_port(), free_port());
    let extra = ["backoff:", "  initial_ms: 500", "  max_ms: 1000"];

    let full_dir = tempdir("ferry-bench-rssb-full-");
    let full_cfg = write_config(full_dir.path(), port, &[], &extra, COLLECTORS);
    let full = load(&full_cfg);
    let empty_dir = tempdir("ferry-bench-rssb-empty-");
    let empty_cfg = write_config(empty_dir.path(), empty_port, &[], &extra, COLLECTORS);
    let fill = {
        let spool = Spool::open(&full.spool).expect("open the spool");
        let t = prefill(&spool, STREAM, 0, n, full.spool.flush_max_records as u64);
        (t, spool.stats())
    };
    // sled releases its lock when its flusher thread ends (up to a second after the drop).
    std::thread::sleep(Duration::from_millis(1500));

    println!(
        "rss_backlog: ferry idle with a {n}-record spool, then draining it, vs ferry idle with an empty spool"
    );
    println!("{}", machine_header());
    println!(
        "ferry: {}; backlog {} records, {} MB stored, {} MB on disk, filled in {:.1} s; \
         system collector every 1 s; broker unreachable for {idle_s} s, then started",
        bin.display(),
        fill.1.records,
        mb(fill.1.bytes),
        mb(dir_bytes(&full.spool.dir)),
        fill.0.as_secs_f64()
    );

    let mut with = common::ferry(&bin, &full_cfg);
    let mut without = common::ferry(&bin, &empty_cfg);
    let start = Instant::now();
    let mut trace = Vec::new();
    for s in 1..=idle_s {
        std::thread::sleep(
            (start + Duration::from_secs(s)).saturating_duration_since(Instant::now()),
        );
        for f in [&mut with, &mut without] {
            assert!(f.is_running(), "ferry exited early:\n{}", f.log());
        }
        if s == 1 || s % 10 == 0 || s == idle_s {
            trace.push(format!(
                "{s}s {}/{}",
                kb_as_mib(proc_status_kb(with.pid(), "VmRSS")),
                kb_as_mib(proc_status_kb(without.pid(), "VmRSS"))
            ));
        }
    }
    let idle_with = mem(with.pid());
    let idle_without = mem(without.pid());
    let opened = with
        .logged("Spool opened.")
        .map(|t| (t - with.started()).as_secs_f64());

    let topics = Topics::new(&full.uplink.topic_prefix, &full.device_id);
    let cpu0 = proc_cpu(with.pid());
    let broker = common::broker(Some(port));
    let counter = Counter::start(port, &topics.data(STREAM), n, DRAIN_TIMEOUT);
    let sampler = RssSampler::start(with.pid(), Duration::from_millis(10));
    let t0 = Instant::now();
    let count = counter.wait_while(|| with.is_running());
    let drained = t0.elapsed();
    let drain_hwm = proc_status_kb(with.pid(), "VmHWM");
    let drain_rss = proc_status_kb(with.pid(), "VmRSS");
    let cpu = match (cpu0, proc_cpu(with.pid())) {
        (Some(a), Some(b)) => format!("{:.2}", (b - a).as_secs_f64()),
        _ => "-".into(),
    };
    let sampled = sampler.finish();
    let still_idle = mem(without.pid());
    let count = count.unwrap_or_else(|e| panic!("subscriber failed: {e}\n{}", with.log()));
    assert_eq!(
        count.distinct,
        n,
        "only {} of {n} records arrived\n{}",
        count.distinct,
        with.log()
    );
    with.terminate_within(Duration::from_secs(30));
    without.terminate_within(Duration::from_secs(30));
    for f in [&with, &without] {
        let problems = f.problems();
        if !problems.is_empty() {
            eprintln!("ferry logged warnings:\n{}", problems.join("\n"));
        }
    }

    println!(
        "VmRSS over the idle phase, backlog/empty (MiB): {}",
        trace.join(", ")
    );
    println!();
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>8} {:>10} {:>10}",
        "ferry", "VmRSS", "VmHWM", "anon", "file", "RSS/base", "HWM/base"
    );
    println!(
        "{:<34} {:>9} {:>9} {:>8} {:>8}",
        "", "MiB", "MiB", "MiB", "MiB"
    );
    row(
        &format!("empty spool, idle {idle_s} s (baseline)"),
        &idle_without,
        &idle_without,
    );
    row(
        &format!("{n} records, idle {idle_s} s"),
        &idle_with,
        &idle_without,
    );
    let draining = Mem {
        rss: Some(sampled),
        hwm: drain_hwm,
        anon: None,
        file: None,
    };
    row("same, peak while draining", &draining, &idle_without);
    row(
        "empty spool, still idle at the end",
        &still_idle,
        &idle_without,
    );
    println!(
        "(while draining, VmRSS = largest sample every 10 ms; VmRSS when the last record arrived: {} MiB)",
        kb_as_mib(drain_rss)
    );
    println!();
    let idle_mib = idle_with.rss.unwrap_or(u64::MAX) as f64 / 1024.0;
    let peak_mib = drain_hwm.unwrap_or(u64::MAX) as f64 / 1024.0;
    println!(
        "spool opened {} s after exec; drain of {n} records took {:.2} s from the broker's start \
         ({:.0} records/s, {} messages, {} duplicates, ferry CPU {cpu} s)",
        opened.map_or("-".into(), |o| format!("{o:.2}")),
        drained.as_secs_f64(),
        n as f64 / drained.as_secs_f64(),
        count.messages,
        count.duplicates
    );
    println!(
        "idle VmRSS with the backlog: {idle_mib:.1} MiB (target <= 8 MiB: {}); peak while draining \
         (VmHWM): {peak_mib:.1} MiB (target <= 16 MiB: {})",
        verdict(idle_mib <= 8.0),
        verdict(peak_mib <= 16.0)
    );
    drop(broker);
}
