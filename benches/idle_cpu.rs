//! Idle CPU: CPU seconds per minute (utime + stime from `/proc/<pid>/stat`, all threads) of the
//! release `ferry` with one system collector at `interval_ms: 1000`, measured at the same time
//! as a baseline that does the same sampling and nothing else.
//!
//! Processes, all started together and measured over the same `FERRY_BENCH_IDLE_S` (default
//! 120) seconds, after a 5 s warm-up that leaves out start-up:
//! - **ferry, unreachable:** the uplink points at a closed loopback port (connects refused,
//!   backoff up to the default 5 min).
//! - **ferry, connected:** a local Mosquitto; the readings are published (one message per
//!   `linger_ms`, default 5 s).
//! - **baseline, sampler:** this bench's own binary re-executed in a loop that calls ferry's
//!   system sampler (`collectors::system::Sampler::sample`, the same sysinfo refreshes of the
//!   same /proc and /sys files, same config) once a second and sleeps in between. It is the
//!   floor for "sample the system at 1 Hz": what ferry adds on top of it (tokio runtime, spool
//!   commits and fsyncs, uplink, self-metrics, watchdog timers) is ferry's own overhead.
//! - **`sleep`:** a process that does nothing, to show the measurement's floor (0).
//!
//! Figures are CPU s per minute and the ratio to the sampler. Resolution is one clock tick
//! (`getconf CLK_TCK`, 10 ms here) per reading, so a 120 s window resolves 0.005 s/min.
//! No target is documented for idle CPU; the bench prints the ratios only.
//!
//! Run: `cargo build --release && cargo bench --bench idle_cpu` (~2 min). Knobs: `FERRY_BIN`,
//! `FERRY_BENCH_IDLE_S`, `FERRY_BENCH_DIR`.

mod common;

use common::suite::{load, write_config};
use common::{ChildGuard, env_or, ferry_bin, free_port, machine_header, proc_cpu, tempdir};
use ferry::collectors::system::{Sampler, SystemConfig};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROLE_ENV: &str = "FERRY_BENCH_ROLE";
const WARMUP: Duration = Duration::from_secs(5);
const COLLECTORS: &str = "\n  - type: system\n    name: system\n    interval_ms: 1000";

/// The baseline's body: ferry's system sampler once a second, forever (killed by the bench).
fn sampler_loop() -> ! {
    let config: SystemConfig =
        serde_json::from_str(r#"{"name": "system", "interval_ms": 1000}"#).expect("config");
    let mut sampler = Sampler::new(config).expect("system sampler");
    let start = Instant::now();
    let mut fields = 0;
    for tick in 1u64.. {
        std::thread::sleep(
            (start + Duration::from_secs(tick)).saturating_duration_since(Instant::now()),
        );
        fields += sampler.sample().len();
        // Keep the result alive so the sampling cannot be optimised away.
        std::hint::black_box(fields);
    }
    unreachable!("the loop never ends")
}

fn quiet(cmd: &mut Command) -> &mut Command {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
}

fn main() {
    if std::env::var_os(ROLE_ENV).is_some_and(|r| r == "sampler") {
        sampler_loop();
    }
    if common::skip_unless_cargo_bench("idle_cpu") {
        return;
    }
    let idle_s: u64 = env_or("FERRY_BENCH_IDLE_S", 120);
    let bin = ferry_bin();
    let broker = common::broker(None);
    let dead_port = free_port();
    let dir_off = tempdir("ferry-bench-cpu-off-");
    let cfg_off = write_config(dir_off.path(), dead_port, &[], &[], COLLECTORS);
    let dir_on = tempdir("ferry-bench-cpu-on-");
    let cfg_on = write_config(dir_on.path(), broker.plain_port(), &[], &[], COLLECTORS);
    let config = load(&cfg_on);
    load(&cfg_off);

    println!("idle_cpu: CPU s per minute at 1 Hz system sampling, ferry vs the bare sampler");
    println!("{}", machine_header());
    println!(
        "ferry: {}; self-metrics every {} s; measured over {idle_s} s after a {} s warm-up",
        bin.display(),
        config.self_metrics_interval.as_secs(),
        WARMUP.as_secs()
    );

    let me = std::env::current_exe().expect("current_exe");
    let mut off = common::ferry(&bin, &cfg_off);
    let mut on = common::ferry(&bin, &cfg_on);
    let mut sampler =
        ChildGuard::spawn("sampler", quiet(Command::new(&me).env(ROLE_ENV, "sampler")))
            .expect("cannot re-execute the bench as the sampler");
    let mut sleep = ChildGuard::spawn("sleep", quiet(Command::new("sleep").arg("3600")))
        .expect("cannot start sleep");
    let t0 = Instant::now();
    std::thread::sleep(WARMUP);
    let pids = [
        ("ferry, broker unreachable", off.pid()),
        ("ferry, broker connected", on.pid()),
        ("baseline: bare sampler loop", sampler.id()),
        ("sleep", sleep.id()),
        ("mosquitto (broker)", broker.pid().expect("the broker runs")),
    ];
    let start: Vec<_> = pids.iter().map(|(_, p)| proc_cpu(*p)).collect();
    let t1 = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_s));
    let end: Vec<_> = pids.iter().map(|(_, p)| proc_cpu(*p)).collect();
    let window = t1.elapsed().as_secs_f64();
    for f in [&mut off, &mut on] {
        assert!(f.is_running(), "ferry exited early:\n{}", f.log());
    }
    assert!(!sampler.exited(), "the sampler exited early");
    let total: Vec<_> = pids.iter().map(|(_, p)| proc_cpu(*p)).collect();
    let alive = t0.elapsed().as_secs_f64();
    off.terminate_within(Duration::from_secs(15));
    on.terminate_within(Duration::from_secs(15));
    sampler.terminate(Duration::from_secs(1));
    sleep.terminate(Duration::from_secs(1));
    // The unreachable one warns about every refused connect; only show the connected one's.
    let problems = on.problems();
    if !problems.is_empty() {
        eprintln!(
            "ferry (connected) logged warnings:\n{}",
            problems.join("\n")
        );
    }

    let per_min: Vec<Option<f64>> = start
        .iter()
        .zip(&end)
        .map(|(a, b)| match (a, b) {
            (Some(a), Some(b)) => Some((*b - *a).as_secs_f64() * 60.0 / window),
            _ => None,
        })
        .collect();
    let base = per_min[2];
    println!();
    println!(
        "{:<30} {:>10} {:>12} {:>14} {:>12}",
        "process", "CPU s", "CPU s/min", "vs sampler", "s incl. start"
    );
    for (i, (name, _)) in pids.iter().enumerate() {
        let used = match (start[i], end[i]) {
            (Some(a), Some(b)) => format!("{:.2}", (b - a).as_secs_f64()),
            _ => "-".into(),
        };
        let ratio = match (per_min[i], base) {
            (Some(x), Some(b)) if b > 0.0 => format!("{:.2}x", x / b),
            _ => "-".into(),
        };
        println!(
            "{name:<30} {used:>10} {:>12} {ratio:>14} {:>12}",
            per_min[i].map_or("-".into(), |x| format!("{x:.3}")),
            total[i].map_or("-".into(), |t| format!("{:.2}", t.as_secs_f64())),
        );
    }
    println!();
    println!(
        "window {window:.1} s; 's incl. start' = all CPU since exec ({alive:.0} s alive). No target \
         is documented for idle CPU: ratios only. Share of one core: ferry unreachable {:.3}%, \
         connected {:.3}%",
        per_min[0].map_or(f64::NAN, |x| x / 60.0 * 100.0),
        per_min[1].map_or(f64::NAN, |x| x / 60.0 * 100.0),
    );
    drop(broker);
}
