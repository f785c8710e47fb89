//! Start-up with a large spool: time from `exec` of the release `ferry` until a subscriber sees
//! the first data message, with a spool of `FERRY_BENCH_SPOOL_BYTES` (default 1 GiB of stored
//! keys and values, by the spool's own accounting) against the same start with a spool that
//! holds one record (with an empty spool nothing would be published).
//!
//! The big spool is filled once through the library (`Spool::commit` of 10 000 sample readings
//! per group, `spool.max_bytes` set above the target so nothing is evicted). Every run then
//! starts ferry on it (`collectors: []`, `linger_ms: 0`, a local Mosquitto), waits for the first
//! message on `ferry/bench/data/sensor`, and stops ferry with SIGTERM. Each run sends and
//! deletes a few messages' worth of records, so the big spool shrinks by well under 1% per run.
//! Runs alternate between the two spools; medians are reported with the ratio. The log gives
//! the phases: "Spool opened." (sled recovery plus ferry's counters), "Connected to the
//! broker.", "Collectors running." (ferry tells systemd READY right after it).
//!
//! Each repetition runs both spools twice: with a warm page cache (the spool's files were just
//! written or read) and cold, after the spool's own files were evicted from the page cache
//! (`posix_fadvise(DONTNEED)` on each file: a boot after a power cut reads the spool from the
//! disk; nothing else on the machine is affected). `fincore` checks how much stayed cached.
//! A third start, "crash", is cold too but follows a ferry that was SIGKILLed one second after
//! its first message (mid-drain, deletions not flushed), so sled has to recover its log.
//!
//! Target: READY ("Collectors running.") well within the unit's `TimeoutStartSec=5min`, or
//! systemd kills ferry at boot with a big spool.
//!
//! Run: `cargo build --release && cargo bench --bench first_publish` (~1.5 min). Knobs:
//! `FERRY_BIN`, `FERRY_BENCH_SPOOL_BYTES`, `FERRY_BENCH_REPS` (default 3), `FERRY_BENCH_DIR`
//! (needs room for about 1.5x `FERRY_BENCH_SPOOL_BYTES`).

mod common;

use common::suite::{
    FirstMessage, dir_allocated_bytes, kb_as_mib, load, mb, prefill, verdict, write_config,
};
use common::{dir_bytes, env_or, ferry_bin, machine_header, median, proc_status_kb, tempdir};
use ferry::config::Config;
use ferry::spool::Spool;
use ferry::uplink::options::Topics;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

const STREAM: &str = "sensor";
const GROUP: u64 = 10_000;
const FIRST_TIMEOUT: Duration = Duration::from_secs(600);
/// `TimeoutStartSec` in systemd/ferry.service.
const SYSTEMD_START_TIMEOUT: Duration = Duration::from_secs(300);

/// One figure of a run, in seconds.
type Metric = dyn Fn(&Start) -> f64;

fn opt(d: Option<Duration>) -> f64 {
    d.map_or(f64::NAN, |d| d.as_secs_f64())
}

struct Start {
    first: Duration,
    opened: Option<Duration>,
    connected: Option<Duration>,
    ready: Option<Duration>,
    hwm_kb: Option<u64>,
    first_bytes: usize,
    records_before: u64,
    /// Cold runs: bytes of the spool's files still in the page cache after the eviction.
    cached: Option<u64>,
}

fn config_at(dir: &Path, port: u16, max_bytes: u64) -> (PathBuf, Config) {
    let path = write_config(
        dir,
        port,
        &[&format!("max_bytes: {max_bytes}")],
        &["batch:", "  linger_ms: 0"],
        "[]",
    );
    let config = load(&path);
    (path, config)
}

/// The files under `dir`.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        match e.file_type() {
            Ok(t) if t.is_dir() => out.extend(files(&e.path())),
            Ok(_) => out.push(e.path()),
            Err(_) => {}
        }
    }
    out
}

/// Evicts the (clean) pages of every file under `dir` from the page cache; returns the bytes
/// `fincore` still finds cached afterwards (`None` without `fincore`).
fn evict_from_page_cache(dir: &Path) -> Option<u64> {
    use nix::fcntl::{PosixFadviseAdvice, posix_fadvise};
    use std::os::fd::AsRawFd;
    let files = files(dir);
    for f in &files {
        if let Ok(file) = std::fs::File::open(f) {
            let _ = file.sync_all();
            if let Err(e) = posix_fadvise(
                file.as_raw_fd(),
                0,
                0,
                PosixFadviseAdvice::POSIX_FADV_DONTNEED,
            ) {
                eprintln!("cannot evict {} from the page cache: {e}", f.display());
            }
        }
    }
    let out = std::process::Command::new("fincore")
        .args(["--bytes", "--noheadings", "--output", "RES"])
        .args(&files)
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse::<u64>().ok())
            .sum(),
    )
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Warm,
    Cold,
    /// Cold, after a ferry was SIGKILLed while draining.
    Crash,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Warm => "warm",
            Mode::Cold => "cold",
            Mode::Crash => "crash",
        }
    }
}

/// Puts a record back into a spool a previous run emptied (the small one); returns how many
/// records the spool holds.
fn ensure_data(config: &Config) -> u64 {
    let spool = Spool::open(&config.spool).expect("open the spool");
    if spool.stats().records == 0 {
        prefill(&spool, STREAM, 0, 1, 1);
    }
    spool.stats().records
}

/// Starts ferry, waits for its first message and one more second of draining, SIGKILLs it.
fn crash(bin: &Path, cfg: &Path, config: &Config, port: u16) {
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let sub = FirstMessage::start(port, &topics.data(STREAM), FIRST_TIMEOUT);
    let ferry = common::ferry(bin, cfg);
    if let Err(e) = sub.wait() {
        panic!("no first message before the crash: {e}\n{}", ferry.log());
    }
    std::thread::sleep(Duration::from_secs(1));
    drop(ferry); // SIGKILL
}

fn run(bin: &Path, cfg: &Path, config: &Config, port: u16, mode: Mode) -> Start {
    if mode == Mode::Crash {
        ensure_data(config);
        // sled releases its lock when its flusher thread ends (up to a second after the drop).
        std::thread::sleep(Duration::from_millis(1500));
        crash(bin, cfg, config, port);
    }
    let cold = mode != Mode::Warm;
    let records_before = ensure_data(config);
    // sled releases its lock when its flusher thread ends (up to a second after the drop).
    std::thread::sleep(Duration::from_millis(1500));
    let cached = if cold {
        evict_from_page_cache(&config.spool.dir)
    } else {
        None
    };
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let sub = FirstMessage::start(port, &topics.data(STREAM), FIRST_TIMEOUT);
    let mut ferry = common::ferry(bin, cfg);
    let got = sub.wait();
    let hwm_kb = proc_status_kb(ferry.pid(), "VmHWM");
    let (at, first_bytes) =
        got.unwrap_or_else(|e| panic!("no first message: {e}\n{}", ferry.log()));
    let start = ferry.started();
    let since = |t: Option<Instant>| t.map(|t| t - start);
    let s = Start {
        first: at - start,
        opened: since(ferry.logged("Spool opened.")),
        connected: since(ferry.logged("Connected to the broker.")),
        ready: since(ferry.logged("Collectors running.")),
        hwm_kb,
        first_bytes,
        records_before,
        cached,
    };
    ferry.terminate_within(Duration::from_secs(60));
    let problems = ferry.problems();
    if !problems.is_empty() {
        eprintln!("ferry logged warnings:\n{}", problems.join("\n"));
    }
    s
}

fn secs(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.3}", d.as_secs_f64()))
}

fn print_run(side: &str, rep: usize, s: &Start) {
    println!(
        "{side:<11} {rep:>3} {:>10} {:>7} {:>7} {:>7} {:>8.3} {:>7} {:>7} {:>9}",
        s.records_before,
        secs(s.opened),
        secs(s.connected),
        secs(s.ready),
        s.first.as_secs_f64(),
        s.first_bytes,
        kb_as_mib(s.hwm_kb),
        s.cached.map_or("-".into(), mb),
    );
}

fn main() {
    if common::skip_unless_cargo_bench("first_publish") {
        return;
    }
    let target: u64 = env_or("FERRY_BENCH_SPOOL_BYTES", 1 << 30);
    let reps: usize = env_or("FERRY_BENCH_REPS", 3);
    let bin = ferry_bin();
    let broker = common::broker(None);
    // Room above the target so a commit never evicts.
    let max_bytes = target + target / 4 + (64 << 20);

    println!(
        "first_publish: exec -> first data message at the subscriber, {} MB spool vs a 1-record spool",
        mb(target)
    );
    println!("{}", machine_header());

    let big_dir = tempdir("ferry-bench-first-big-");
    let (big_cfg, big) = config_at(big_dir.path(), broker.plain_port(), max_bytes);
    let small_dir = tempdir("ferry-bench-first-small-");
    let (small_cfg, small) = config_at(small_dir.path(), broker.plain_port(), max_bytes);
    {
        let spool = Spool::open(&small.spool).expect("open the spool");
        prefill(&spool, STREAM, 0, 1, 1);
    }
    let (fill_time, records, stored) = {
        let spool = Spool::open(&big.spool).expect("open the spool");
        let t = Instant::now();
        let mut i = 0;
        while spool.stats().bytes < target {
            prefill(&spool, STREAM, i, GROUP, GROUP);
            i += GROUP;
        }
        spool.flush().expect("flush");
        let st = spool.stats();
        (t.elapsed(), st.records, st.bytes)
    };
    let (apparent, allocated) = (
        dir_bytes(&big.spool.dir),
        dir_allocated_bytes(&big.spool.dir),
    );
    println!(
        "ferry: {}; big spool: {records} records, {} MB stored (spool accounting), {} MB on disk \
         ({} MB allocated), filled in {:.0} s ({:.0} records/s)",
        bin.display(),
        mb(stored),
        mb(apparent),
        mb(allocated),
        fill_time.as_secs_f64(),
        records as f64 / fill_time.as_secs_f64(),
    );
    println!();
    println!(
        "{:<11} {:>3} {:>10} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7} {:>9}",
        "spool",
        "rep",
        "records",
        "open s",
        "conn s",
        "ready s",
        "first s",
        "1st B",
        "HWM MiB",
        "cached MB"
    );
    // [warm, cold, crash] x [big, small]
    let modes = [Mode::Warm, Mode::Cold, Mode::Crash];
    let mut runs: [[Vec<Start>; 2]; 3] = Default::default();
    for rep in 1..=reps {
        for (c, mode) in modes.into_iter().enumerate() {
            for side in 0..2 {
                let big_side = (side == 0) == (rep % 2 == 1);
                let (name, cfg, config) = if big_side {
                    ("big", &big_cfg, &big)
                } else {
                    ("small", &small_cfg, &small)
                };
                let r = run(&bin, cfg, config, broker.plain_port(), mode);
                let label = format!("{name} {}", mode.name());
                print_run(&label, rep, &r);
                runs[c][usize::from(!big_side)].push(r);
            }
        }
    }
    let med = |v: &[Start], f: &dyn Fn(&Start) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    println!();
    println!("median of {reps}                     big      small   big/small");
    let mut worst_ready: f64 = 0.0;
    for (c, mode) in modes.into_iter().enumerate() {
        let cache = mode.name();
        let [b, s] = &runs[c];
        worst_ready = b.iter().map(|r| opt(r.ready)).fold(worst_ready, f64::max);
        let rows: [(&str, &Metric); 3] = [
            ("spool opened", &|r| opt(r.opened)),
            ("READY", &|r| opt(r.ready)),
            ("first message", &|r| r.first.as_secs_f64()),
        ];
        for (what, f) in rows {
            let (bv, sv) = (med(b, f), med(s, f));
            println!(
                "{cache:<5}: exec -> {what:<14} {bv:>8.3}  {sv:>8.3}  {:>9.1}x",
                bv / sv
            );
        }
    }
    println!(
        "worst exec -> READY with the big spool: {worst_ready:.3} s (target: under a tenth of \
         TimeoutStartSec={} s: {})",
        SYSTEMD_START_TIMEOUT.as_secs(),
        verdict(worst_ready < SYSTEMD_START_TIMEOUT.as_secs_f64() / 10.0)
    );
    println!(
        "columns: records = records in the spool before the run; open/conn/ready = s from exec to \
         ferry's 'Spool opened.'/'Connected to the broker.'/'Collectors running.' log lines; \
         first = s from exec to the first data message at the subscriber; 1st B = its payload \
         size; HWM = ferry's VmHWM when it arrived; cached = bytes of the spool's files still in \
         the page cache after the eviction (cold and crash runs, from fincore)"
    );
    drop(broker);
}
