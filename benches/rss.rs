//! Idle memory: RSS of the release `ferry` with one system collector sampling every second and
//! no broker reachable (it buffers to disk and retries with backoff), next to trivial
//! processes measured at the same time for scale: `sleep` and an idle `mosquitto_sub`.
//!
//! VmRSS is read from `/proc/<pid>/status` every second for `FERRY_BENCH_IDLE_S` seconds
//! (default 30); the table shows VmRSS at the end, VmHWM (peak), the anonymous/file split and
//! the CPU time used since start.
//! Target: ferry idle VmRSS <= 8 MB. (Peak while draining a backlog is measured by the drain
//! bench.)
//!
//! Run: `cargo build --release && cargo bench --bench rss`. Knobs: `FERRY_BIN`,
//! `FERRY_BENCH_IDLE_S`, `FERRY_BENCH_DIR`.

mod common;

use common::{
    ChildGuard, env_or, ferry_bin, free_port, machine_header, proc_cpu, proc_status_kb, tempdir,
};
use ferry::spool::Spool;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

struct Mem {
    rss: Option<u64>,
    hwm: Option<u64>,
    anon: Option<u64>,
    file: Option<u64>,
    threads: Option<u64>,
    cpu: Option<Duration>,
}

fn mem(pid: u32) -> Mem {
    Mem {
        rss: proc_status_kb(pid, "VmRSS"),
        hwm: proc_status_kb(pid, "VmHWM"),
        anon: proc_status_kb(pid, "RssAnon"),
        file: proc_status_kb(pid, "RssFile"),
        threads: proc_status_kb(pid, "Threads"),
        cpu: proc_cpu(pid),
    }
}

fn mb(kb: Option<u64>) -> String {
    kb.map_or("-".into(), |k| format!("{:.1}", k as f64 / 1024.0))
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

fn main() {
    if common::skip_unless_cargo_bench("rss") {
        return;
    }
    let idle_s: u64 = env_or("FERRY_BENCH_IDLE_S", 30);
    let bin = ferry_bin();
    let broker = common::broker(None);
    let dead_port = free_port(); // nothing listens: every connect is refused

    let dir = tempdir("ferry-bench-rss-");
    let cfg = dir.path().join("ferry.yaml");
    std::fs::write(
        &cfg,
        format!(
            "device_id: bench\nlog_level: info\nspool:\n  dir: spool\nuplink:\n  host: 127.0.0.1\n  \
             port: {dead_port}\ncollectors:\n  - type: system\n    name: system\n    interval_ms: 1000\n"
        ),
    )
    .expect("write the config");
    let config = ferry::config::load(&cfg).unwrap_or_else(|e| panic!("bench config rejected: {e}"));

    println!(
        "rss: idle ferry (system collector every 1 s, broker unreachable) vs trivial processes"
    );
    println!("{}", machine_header());
    println!(
        "ferry: {}; uplink 127.0.0.1:{dead_port} (refused); sampled for {idle_s} s",
        bin.display()
    );

    let mut ferry = common::ferry(&bin, &cfg);
    let mut sleep = ChildGuard::spawn("sleep", quiet(Command::new("sleep").arg("3600")))
        .expect("cannot start sleep");
    let mut sub = ChildGuard::spawn(
        "mosquitto_sub",
        quiet(Command::new("mosquitto_sub").args([
            "-h",
            "127.0.0.1",
            "-p",
            &broker.plain_port().to_string(),
            "-t",
            "ferry/#",
        ])),
    )
    .expect("cannot start mosquitto_sub (apt-get install mosquitto-clients)");

    let start = Instant::now();
    let mut trace = Vec::new();
    for s in 1..=idle_s {
        std::thread::sleep(
            (start + Duration::from_secs(s)).saturating_duration_since(Instant::now()),
        );
        assert!(ferry.is_running(), "ferry exited early:\n{}", ferry.log());
        if s == 1 || s % 5 == 0 || s == idle_s {
            trace.push(format!("{s}s {}", mb(proc_status_kb(ferry.pid(), "VmRSS"))));
        }
    }
    let rows = [
        ("ferry", mem(ferry.pid())),
        ("sleep", mem(sleep.id())),
        ("mosquitto_sub", mem(sub.id())),
        ("mosquitto", mem(broker.pid().expect("the broker runs"))),
    ];
    assert!(!sub.exited(), "mosquitto_sub exited early");

    ferry.terminate_within(Duration::from_secs(15));
    sleep.terminate(Duration::from_secs(1));
    sub.terminate(Duration::from_secs(1));
    let spooled = Spool::open(&config.spool).map(|s| s.stats().records).ok();

    println!("ferry VmRSS over time (MB): {}", trace.join(", "));
    println!();
    println!(
        "{:<14} {:>10} {:>10} {:>9} {:>9} {:>8} {:>7} {:>10}",
        "process", "VmRSS MB", "VmHWM MB", "anon MB", "file MB", "threads", "CPU s", "ferry/this"
    );
    let ferry_rss = rows[0].1.rss.unwrap_or(0) as f64;
    for (name, m) in &rows {
        println!(
            "{name:<14} {:>10} {:>10} {:>9} {:>9} {:>8} {:>7} {:>9.1}x",
            mb(m.rss),
            mb(m.hwm),
            mb(m.anon),
            mb(m.file),
            m.threads.map_or("-".into(), |t| t.to_string()),
            m.cpu
                .map_or("-".into(), |c| format!("{:.2}", c.as_secs_f64())),
            ferry_rss / m.rss.unwrap_or(1) as f64
        );
    }
    let idle = ferry_rss / 1024.0;
    println!();
    println!(
        "ferry idle VmRSS after {idle_s} s: {idle:.1} MB (target <= 8 MB: {}); records buffered in the spool: {}",
        if idle <= 8.0 { "met" } else { "MISSED" },
        spooled.map_or("-".into(), |r| r.to_string())
    );
    drop(broker);
}
