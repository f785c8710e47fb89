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
//! The page cache is warm (the spool was just written) unless `FERRY_BENCH_DROP_CACHES=1`, which
//! runs `sync` and writes 3 to `/proc/sys/vm/drop_caches` before every run (root only; it
//! affects every process on the machine).
//!
//! Target: READY ("Collectors running.") well within the unit's `TimeoutStartSec=5min`, or
//! systemd kills ferry at boot with a big spool.
//!
//! Run: `cargo build --release && cargo bench --bench first_publish`. Knobs: `FERRY_BIN`,
//! `FERRY_BENCH_SPOOL_BYTES`, `FERRY_BENCH_REPS` (default 3), `FERRY_BENCH_DROP_CACHES`,
//! `FERRY_BENCH_DIR` (needs room for about twice `FERRY_BENCH_SPOOL_BYTES`).

mod common;

use common::suite::{
    FirstMessage, dir_allocated_bytes, kb_as_mib, load, mb, prefill, verdict, write_config,
};
use common::{
    Ferry, Mosquitto, dir_bytes, env_or, ferry_bin, machine_header, median, proc_status_kb, tempdir,
};
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

struct Start {
    first: Duration,
    opened: Option<Duration>,
    connected: Option<Duration>,
    ready: Option<Duration>,
    hwm_kb: Option<u64>,
    first_bytes: usize,
    records_before: u64,
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

fn drop_caches() {
    let _ = std::process::Command::new("sync").status();
    if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3\n") {
        eprintln!("cannot drop the page cache: {e}");
    }
}

fn run(bin: &Path, cfg: &Path, config: &Config, port: u16, cold: bool) -> Start {
    let records_before = Spool::open(&config.spool)
        .expect("open the spool")
        .stats()
        .records;
    // sled releases its lock when its flusher thread ends (up to a second after the drop).
    std::thread::sleep(Duration::from_millis(1500));
    if cold {
        drop_caches();
    }
    let topics = Topics::new(&config.uplink.topic_prefix, &config.device_id);
    let sub = FirstMessage::start(port, &topics.data(STREAM), FIRST_TIMEOUT);
    let mut ferry = Ferry::spawn(bin, cfg);
    let got = sub.wait();
    let hwm_kb = proc_status_kb(ferry.pid(), "VmHWM");
    let (at, first_bytes) =
        got.unwrap_or_else(|e| panic!("no first message: {e}\n{}", ferry.log_text()));
    let start = ferry.started;
    let since = |t: Option<Instant>| t.map(|t| t - start);
    let s = Start {
        first: at - start,
        opened: since(ferry.logged("Spool opened.")),
        connected: since(ferry.logged("Connected to the broker.")),
        ready: since(ferry.logged("Collectors running.")),
        hwm_kb,
        first_bytes,
        records_before,
    };
    ferry.guard.terminate(Duration::from_secs(60));
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
        "{side:<6} {rep:>3} {:>10} {:>7} {:>7} {:>7} {:>8.3} {:>7} {:>7}",
        s.records_before,
        secs(s.opened),
        secs(s.connected),
        secs(s.ready),
        s.first.as_secs_f64(),
        s.first_bytes,
        kb_as_mib(s.hwm_kb),
    );
}

fn main() {
    if common::skip_unless_cargo_bench("first_publish") {
        return;
    }
    let target: u64 = env_or("FERRY_BENCH_SPOOL_BYTES", 1 << 30);
    let reps: usize = env_or("FERRY_BENCH_REPS", 3);
    let cold = env_or("FERRY_BENCH_DROP_CACHES", 0u8) == 1;
    let bin = ferry_bin();
    let broker = Mosquitto::start();
    // Room above the target so a commit never evicts.
    let max_bytes = target + target / 4 + (64 << 20);

    println!(
        "first_publish: exec -> first data message at the subscriber, {} MB spool vs a 1-record spool",
        mb(target)
    );
    println!("{}", machine_header());

    let big_dir = tempdir("ferry-bench-first-big-");
    let (big_cfg, big) = config_at(big_dir.path(), broker.port, max_bytes);
    let small_dir = tempdir("ferry-bench-first-small-");
    let (small_cfg, small) = config_at(small_dir.path(), broker.port, max_bytes);
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
         ({} MB allocated), filled in {:.0} s ({:.0} records/s); page cache {}",
        bin.display(),
        mb(stored),
        mb(apparent),
        mb(allocated),
        fill_time.as_secs_f64(),
        records as f64 / fill_time.as_secs_f64(),
        if cold {
            "dropped before every run"
        } else {
            "warm"
        }
    );
    println!();
    println!(
        "{:<6} {:>3} {:>10} {:>7} {:>7} {:>7} {:>8} {:>7} {:>7}",
        "spool", "rep", "records", "open s", "conn s", "ready s", "first s", "1st B", "HWM MiB"
    );
    let (mut b, mut s) = (Vec::new(), Vec::new());
    for rep in 1..=reps {
        for side in 0..2 {
            if (side == 0) == (rep % 2 == 1) {
                let r = run(&bin, &big_cfg, &big, broker.port, cold);
                print_run("big", rep, &r);
                b.push(r);
            } else {
                let r = run(&bin, &small_cfg, &small, broker.port, cold);
                print_run("small", rep, &r);
                s.push(r);
            }
        }
    }
    let med = |v: &[Start], f: &dyn Fn(&Start) -> f64| median(&v.iter().map(f).collect::<Vec<_>>());
    let opt = |d: Option<Duration>| d.map_or(f64::NAN, |d| d.as_secs_f64());
    let (bf, sf) = (
        med(&b, &|r| r.first.as_secs_f64()),
        med(&s, &|r| r.first.as_secs_f64()),
    );
    let (bo, so) = (med(&b, &|r| opt(r.opened)), med(&s, &|r| opt(r.opened)));
    let (br, sr) = (med(&b, &|r| opt(r.ready)), med(&s, &|r| opt(r.ready)));
    let worst_ready = b.iter().map(|r| opt(r.ready)).fold(0.0, f64::max);
    println!();
    println!("median of {reps}               big      small   big/small");
    println!(
        "exec -> first message  {bf:>8.3}  {sf:>8.3}  {:>9.1}x",
        bf / sf
    );
    println!(
        "exec -> spool opened   {bo:>8.3}  {so:>8.3}  {:>9.1}x",
        bo / so
    );
    println!(
        "exec -> READY          {br:>8.3}  {sr:>8.3}  {:>9.1}x  (target: well within TimeoutStartSec={} s; worst {worst_ready:.3} s: {})",
        br / sr,
        SYSTEMD_START_TIMEOUT.as_secs(),
        verdict(worst_ready < SYSTEMD_START_TIMEOUT.as_secs_f64() / 10.0)
    );
    println!(
        "columns: records = records in the spool before the run; open/conn/ready = s from exec to \
         ferry's 'Spool opened.'/'Connected to the broker.'/'Collectors running.' log lines; \
         first = s from exec to the first data message at the subscriber; 1st B = its payload \
         size; HWM = ferry's VmHWM when it arrived. 'well within' = under a tenth of it."
    );
    drop(broker);
}
