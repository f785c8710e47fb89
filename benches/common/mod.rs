//! Helpers shared by the benchmarks: the sample reading, `/proc` sampling, the machine header,
//! and a registry that kills every child process if the bench is interrupted. The agent, the
//! broker, free ports, the counting subscriber and the process helpers are the integration
//! tests' own (`tests/common`, included as [`harness`]): [`ferry`] and [`broker`] only register
//! what they start, and [`ChildGuard`] (for the baselines' own processes) uses the harness's
//! signal, wait and kill.
//!
//! Every figure a benchmark prints is a ratio against a baseline measured in the same run: the
//! machine is shared and noisy, so absolute numbers only make sense next to their baseline.

// Each benchmark uses a different subset of these helpers.
#![allow(dead_code)]

pub mod baseline;
pub mod suite;

/// The integration tests' harness (broker, ports, subscribers, counter): one copy for both.
#[path = "../../tests/common/mod.rs"]
pub mod harness;

// Like the helpers below, each benchmark uses a different subset of these.
#[allow(unused_imports)]
pub use harness::{
    agent::Agent,
    broker::Broker,
    counter::{Count, Counter, complete},
    ports::free_port,
};

use ferry::record::{Body, Reading, Value};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Base sample time of generated readings (2026-11-25, ms since the epoch).
const BASE_TS_MS: u64 = 1_795_600_000_000;

/// The `i`-th generated reading of `stream`: five numeric fields named like the system
/// collector's, about 100 bytes once encoded by the spool (postcard), about 150 as JSON.
pub fn sample_reading(stream: &str, i: u64) -> Reading {
    let f = |k: &str, v: Value| (k.to_string(), v);
    Reading {
        stream: stream.to_string(),
        ts_ms: BASE_TS_MS + i * 1000,
        body: Body::Fields(vec![
            f("cpu.total_pct", Value::F64((i % 1000) as f64 / 10.0 + 0.05)),
            f("load.1m", Value::F64(0.25 + (i % 7) as f64 / 100.0)),
            f("mem.used_bytes", Value::U64(1_500_000_000 + i * 4096)),
            f("mem.available_bytes", Value::U64(2_500_000_000 - i * 4096)),
            f("uptime_s", Value::U64(86_400 + i)),
        ]),
    }
}

/// True when run by `cargo bench` (which passes `--bench`). `cargo test --all-targets` also
/// runs `harness = false` benches, without it: they then return at once instead of taking
/// minutes.
pub fn skip_unless_cargo_bench(name: &str) -> bool {
    if std::env::args().any(|a| a == "--bench") {
        return false;
    }
    println!("{name}: skipped (not run by `cargo bench`); run `cargo bench --bench {name}`");
    true
}

/// Median of a non-empty list.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let n = s.len();
    if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    }
}

/// A numeric setting from the environment, or its default.
pub fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        Err(_) => default,
    }
}

/// Where benchmarks put their temporary directories: `FERRY_BENCH_DIR`, else the system temp
/// dir. Must be a real disk (not tmpfs), or every fsync is free.
pub fn scratch_base() -> PathBuf {
    std::env::var_os("FERRY_BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
}

/// A fresh directory under [`scratch_base`], removed on drop (and by the signal thread if the
/// bench is interrupted).
pub fn tempdir(prefix: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(scratch_base())
        .expect("cannot create a temp dir under the scratch base");
    live_dirs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(dir.path().to_path_buf());
    dir
}

fn live_dirs() -> &'static Mutex<Vec<PathBuf>> {
    static DIRS: OnceLock<Mutex<Vec<PathBuf>>> = OnceLock::new();
    // Make sure the signal thread exists before anything needs cleaning up.
    let _ = live_children();
    DIRS.get_or_init(|| Mutex::new(Vec::new()))
}

/// Total size of the files under `dir`.
pub fn dir_bytes(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_bytes(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

fn command_output(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// One line describing the machine and the time of the run, printed above every table.
pub fn machine_header() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let debian = std::fs::read_to_string("/etc/debian_version")
        .map(|s| format!("Debian {}", s.trim()))
        .unwrap_or_else(|_| "unknown OS".into());
    let date = command_output("date", &["-u", "+%Y-%m-%dT%H:%M:%SZ"]).unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!(
        "{date} | {debian}, kernel {kernel}, {} | nproc {nproc} | CPU {cpu} | loadavg {load}",
        std::env::consts::ARCH
    )
}

// ---------------------------------------------------------------------------------------------
// Child processes

/// PIDs of live children, killed by the signal thread if the bench is interrupted (Drop guards
/// cover panics; a SIGINT/SIGTERM would otherwise leave mosquitto or ferry running).
fn live_children() -> &'static Mutex<HashSet<u32>> {
    static LIVE: OnceLock<Mutex<HashSet<u32>>> = OnceLock::new();
    LIVE.get_or_init(|| {
        if let Ok(mut signals) = signal_hook::iterator::Signals::new([
            signal_hook::consts::SIGINT,
            signal_hook::consts::SIGTERM,
        ]) {
            std::thread::spawn(move || {
                if signals.forever().next().is_some() {
                    let pids: Vec<u32> = live_children()
                        .lock()
                        .map(|s| s.iter().copied().collect())
                        .unwrap_or_default();
                    for pid in &pids {
                        harness::send_signal(*pid, "KILL");
                    }
                    let dirs: Vec<PathBuf> =
                        live_dirs().lock().map(|d| d.clone()).unwrap_or_default();
                    for d in &dirs {
                        let _ = std::fs::remove_dir_all(d);
                    }
                    eprintln!("interrupted: killed {} child process(es)", pids.len());
                    std::process::exit(130);
                }
            });
        }
        Mutex::new(HashSet::new())
    })
}

/// A child process that is killed and reaped when dropped (also on panic and on SIGINT).
pub struct ChildGuard {
    child: Child,
    name: String,
}

impl ChildGuard {
    pub fn spawn(name: &str, cmd: &mut Command) -> std::io::Result<ChildGuard> {
        let live = live_children();
        let child = cmd.spawn()?;
        live.lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(child.id());
        Ok(ChildGuard {
            child,
            name: name.to_string(),
        })
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    pub fn child_mut(&mut self) -> &mut Child {
        &mut self.child
    }

    /// True once the process has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, then SIGKILL if it is still running after `grace`.
    pub fn terminate(&mut self, grace: Duration) {
        if self.exited() {
            return;
        }
        harness::send_signal(self.child.id(), "TERM");
        if harness::wait_for_exit(&mut self.child, grace).is_none() {
            eprintln!(
                "{} (pid {}) ignored SIGTERM for {grace:?}; killing it",
                self.name,
                self.child.id()
            );
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        harness::kill_and_reap(&mut self.child);
        live_children()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.child.id());
    }
}

/// A field of `/proc/<pid>/status` in kB (e.g. `VmRSS`, `VmHWM`, `RssAnon`).
pub fn proc_status_kb(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    s.lines()
        .find(|l| l.strip_prefix(key).is_some_and(|r| r.starts_with(':')))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A field of `/proc/<pid>/io` in bytes (e.g. `write_bytes`: what the process caused to be
/// written to storage).
pub fn proc_io(pid: u32, key: &str) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/io")).ok()?;
    s.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(": "))?
        .trim()
        .parse()
        .ok()
}

/// User + system CPU time of a process so far (from `/proc/<pid>/stat`, all threads).
pub fn proc_cpu(pid: u32) -> Option<Duration> {
    static TCK: OnceLock<f64> = OnceLock::new();
    let tck = *TCK.get_or_init(|| {
        command_output("getconf", &["CLK_TCK"])
            .and_then(|s| s.parse().ok())
            .unwrap_or(100.0)
    });
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start at field 3 (state).
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / tck))
}

/// Samples a process's VmRSS every `every` on a thread until stopped; keeps the largest value.
pub struct RssSampler {
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl RssSampler {
    pub fn start(pid: u32, every: Duration) -> RssSampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let mut max = 0;
            while !flag.load(Ordering::Relaxed) {
                match proc_status_kb(pid, "VmRSS") {
                    Some(kb) => max = max.max(kb),
                    None => break,
                }
                std::thread::sleep(every);
            }
            max
        });
        RssSampler {
            stop,
            handle: Some(handle),
        }
    }

    /// Largest sampled VmRSS in kB.
    pub fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().unwrap_or(0))
            .unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------
// ferry

/// The release `ferry` binary: `FERRY_BIN`, else the one cargo built for this bench target
/// (same profile settings as `cargo build --release`: the bench profile inherits release).
pub fn ferry_bin() -> PathBuf {
    let p = std::env::var_os("FERRY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(harness::agent::ferry_bin()));
    assert!(
        p.is_file(),
        "ferry binary {} not found: run `cargo build --release` or set FERRY_BIN",
        p.display()
    );
    p
}

/// A running `ferry run --config CONFIG` of `bin`: the integration tests' agent, with its log
/// lines stamped as they arrive ([`Agent::logged`]), killed on drop; the signal thread kills
/// it too if the bench is interrupted.
pub fn ferry(bin: &Path, config: &Path) -> Agent {
    let agent = Agent::start_timed(bin, config);
    live_children()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(agent.pid());
    agent
}

// ---------------------------------------------------------------------------------------------
// Mosquitto

/// A private Mosquitto for a benchmark (tests/common's broker, quietly logging), on `port` if
/// given, killed on drop; the signal thread kills it and removes its directory if the bench
/// is interrupted.
pub fn broker(port: Option<u16>) -> Broker {
    let broker = Broker::start_quiet(port);
    live_dirs()
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(broker.dir().to_path_buf());
    if let Some(pid) = broker.pid() {
        live_children()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(pid);
    }
    broker
}
