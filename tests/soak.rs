//! The soak run: ferry for a given time under a random, seeded mix of every fault the chaos
//! tests inject one at a time, then one summary. Not part of the normal test run (ignored);
//! `tests/soak.sh [SECONDS]` builds the release binary and runs it.
//!
//! Set-up as in tests/chaos.rs: Mosquitto with persistence, ferry -> fault proxy -> Mosquitto,
//! a subscriber on the broker's own port. Sources: a file that this test appends
//! `SOAK_LINES_PER_S` (default 500; 0: none) numbered lines per second to, tailed by a `file`
//! collector (stream `lines`), and `SOAK_COLLECTORS` (default 8) system collectors at 200 ms. Schedule, for `SOAK_SECS` (default 600) seconds: a SIGKILL of ferry
//! (restarted within 2 s) every 30-90 s, a graceful broker restart (down 0.5-5 s) every
//! 60-120 s, and in between, after a calm 1-5 s each, one of: a cut; a 2-20 s blackhole; 10-30 s
//! of 9600 B/s with 600 ms latency each way; 5-20 s of 100-800 ms latency; 5-20 s of a
//! 2400-50000 B/s throttle. `SOAK_SEED` replays a schedule (the seed is printed).
//!
//! The end: faults off, ferry stopped cleanly and drained without collectors
//! (`common::drain`), and the summary: records produced (the spool's `next_seq - 1` per
//! stream), delivered (distinct seqs at the subscriber), lost (must be 0), duplicates,
//! reconnects ("Connected to the broker" in ferry's log), ferry's maximum RSS (VmHWM sampled
//! every 250 ms and before every SIGKILL, over all its processes) and the spool directory's
//! high-water mark, plus the causes of lost connections and ferry's ERROR lines. For the file
//! source it also checks the far end: once the writer stops, ferry must ingest every line
//! exactly once across all its SIGKILLs, so line n must be the record with seq n. The test
//! fails if anything was lost, a line was skipped or ingested twice, or ferry exited on its
//! own. `SOAK_LOG=path` keeps ferry's log.

mod common;

use std::collections::BTreeMap;
use std::io::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::drain::{live_status, stop_and_drain};
use common::proxy::{Direction, Proxy};
use common::subscriber::Subscriber;
use tokio::time::Instant;

const CONNECTED: &str = "Connected to the broker";
const LOST: &str = "Connection lost";
/// How often RSS and the spool's size are sampled.
const SAMPLE: Duration = Duration::from_millis(250);
/// How long the final drain may take (a throttled phase can leave a large backlog).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(300);
/// The file source's stream.
const LINES: &str = "lines";
/// How long ferry may take to ingest the file's last lines once the writer stopped.
const INGEST_TIMEOUT: Duration = Duration::from_secs(120);

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a whole number")),
        Err(_) => default,
    }
}

fn ms(ms: u64) -> Duration {
    Duration::from_millis(ms)
}

#[derive(Debug, Default)]
struct Tally {
    cuts: u32,
    blackholes: u32,
    blackhole: Duration,
    satellite: u32,
    satellite_time: Duration,
    latency: u32,
    throttle: u32,
    kills: u32,
    broker_restarts: u32,
    processes: u32,
    unexpected_exits: u32,
    max_hwm_kib: u64,
    disk_high: u64,
    disk_high_apparent: u64,
}

struct Soak {
    agent: Agent,
    sub: Subscriber,
    proxy: Proxy,
    broker: Broker,
    cfg: AgentConfig,
    streams: Vec<String>,
    rng: fastrand::Rng,
    t: Tally,
}

impl Soak {
    /// Samples ferry's peak RSS and the spool's size; restarts ferry (and counts it) if it
    /// exited without being killed.
    fn sample(&mut self) {
        if self.agent.is_running() {
            if let Some(kib) = vm_hwm_kib(self.agent.pid()) {
                self.t.max_hwm_kib = self.t.max_hwm_kib.max(kib);
            }
        } else {
            self.t.unexpected_exits += 1;
            eprintln!("!!! ferry exited on its own; restarting it");
            self.agent.start_again();
            self.t.processes += 1;
        }
        let (allocated, apparent) = dir_size(&self.cfg.spool_dir);
        self.t.disk_high = self.t.disk_high.max(allocated);
        self.t.disk_high_apparent = self.t.disk_high_apparent.max(apparent);
    }

    /// Waits `d`, sampling as it goes.
    async fn hold(&mut self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            self.sample();
            let now = Instant::now();
            if now >= end {
                return;
            }
            tokio::time::sleep((end - now).min(SAMPLE)).await;
        }
    }

    async fn sigkill(&mut self) {
        self.sample();
        self.agent.kill9();
        self.t.kills += 1;
        tokio::time::sleep(ms(self.rng.u64(0..=2000))).await;
        self.agent.start_again();
        self.t.processes += 1;
    }

    async fn restart_broker(&mut self) {
        self.broker.stop();
        self.t.broker_restarts += 1;
        let down = ms(self.rng.u64(500..=5000));
        self.hold(down).await;
        self.broker.start_again();
    }

    /// One network fault, chosen at random.
    async fn network_fault(&mut self) {
        let roll = self.rng.u32(0..100);
        match roll {
            0..35 => {
                self.proxy.cut();
                self.t.cuts += 1;
            }
            35..50 => {
                let d = ms(self.rng.u64(2000..=20_000));
                self.proxy.blackhole(true);
                self.hold(d).await;
                self.proxy.blackhole(false);
                self.t.blackholes += 1;
                self.t.blackhole += d;
            }
            50..70 => {
                let d = ms(self.rng.u64(10_000..=30_000));
                self.proxy.throttle(Some(9600));
                self.proxy.latency(ms(600));
                self.hold(d).await;
                self.proxy.clear();
                self.t.satellite += 1;
                self.t.satellite_time += d;
            }
            70..85 => {
                let d = ms(self.rng.u64(5000..=20_000));
                self.proxy.latency(ms(self.rng.u64(100..=800)));
                self.hold(d).await;
                self.proxy.clear();
                self.t.latency += 1;
            }
            _ => {
                let d = ms(self.rng.u64(5000..=20_000));
                self.proxy.throttle(Some(self.rng.u64(2400..=50_000)));
                self.hold(d).await;
                self.proxy.clear();
                self.t.throttle += 1;
            }
        }
    }

    fn received(&self) -> usize {
        self.streams.iter().map(|n| self.sub.seqs(n).len()).sum()
    }
}

/// Peak resident set of a process (VmHWM), in KiB.
fn vm_hwm_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// (allocated, apparent) bytes of the files under `p`.
fn dir_size(p: &Path) -> (u64, u64) {
    let Ok(entries) = std::fs::read_dir(p) else {
        return (0, 0);
    };
    entries
        .flatten()
        .fold((0, 0), |(a, b), e| match e.metadata() {
            Ok(m) if m.is_dir() => {
                let (x, y) = dir_size(&e.path());
                (a + x, b + y)
            }
            Ok(m) => (a + m.blocks() * 512, b + m.len()),
            Err(_) => (a, b),
        })
}

/// "Connection lost" lines of ferry's log by error (digits masked), most frequent first.
fn losses_by_error(log: &str) -> Vec<(usize, String)> {
    let mut kinds: BTreeMap<String, usize> = BTreeMap::new();
    for line in log.lines().filter(|l| l.contains(LOST)) {
        let error = line.split(" error=").nth(1).unwrap_or("?");
        let kind: String = error
            .chars()
            .map(|c| if c.is_ascii_digit() { '#' } else { c })
            .take(90)
            .collect();
        *kinds.entry(kind).or_default() += 1;
    }
    let mut v: Vec<(usize, String)> = kinds.into_iter().map(|(k, n)| (n, k)).collect();
    v.sort_by(|a, b| b.cmp(a));
    v
}

/// Appends lines `1`, `2`, ... to `path` at `per_s` lines per second until `stop`; returns how
/// many it wrote. Writes every 10 ms, like a busy application's log.
fn spawn_writer(
    path: std::path::PathBuf,
    per_s: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
        let start = std::time::Instant::now();
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let due = (start.elapsed().as_secs_f64() * per_s as f64) as u64;
            let mut buf = String::new();
            while n < due {
                n += 1;
                buf.push_str(&n.to_string());
                buf.push('\n');
            }
            f.write_all(buf.as_bytes())
                .unwrap_or_else(|e| panic!("cannot append to {}: {e}", path.display()));
            std::thread::sleep(ms(10));
        }
        n
    })
}

/// Records of the `lines` stream at the subscriber whose line is not their seq.
fn misnumbered_lines(sub: &Subscriber) -> Vec<(u64, String)> {
    sub.records(LINES)
        .iter()
        .filter_map(|r| {
            let seq = r["seq"].as_u64()?;
            let line = r["line"].as_str().unwrap_or("<no line>");
            (line != seq.to_string()).then(|| (seq, line.to_owned()))
        })
        .collect()
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "soak run of several minutes: tests/soak.sh [SECONDS]"]
async fn soak() {
    let secs = env_u64("SOAK_SECS", 600);
    let collectors = env_u64("SOAK_COLLECTORS", 8);
    let lines_per_s = env_u64("SOAK_LINES_PER_S", 500);
    let seed = env_u64(
        "SOAK_SEED",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("the clock is after 1970")
            .as_secs(),
    );
    let sources = format!(
        "a file tailed at {lines_per_s} lines/s and {collectors} system collectors at 200 ms"
    );
    eprintln!(
        "soak: {secs} s, {sources}, SOAK_SEED={seed}, ferry {}",
        common::agent::ferry_bin()
    );

    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let proxy = Proxy::start(broker.agent_port());
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = AgentConfig::new(dir.path(), proxy.port());
    let mut streams: Vec<String> = (0..collectors).map(|i| format!("sys{i}")).collect();
    cfg.collectors = streams
        .iter()
        .map(|name| format!("type: system\nname: {name}\ninterval_ms: 200"))
        .collect();
    let source = dir.path().join("source.log");
    let stop_writer = Arc::new(AtomicBool::new(false));
    let writer = (lines_per_s > 0).then(|| {
        cfg.collectors.push(format!(
            "type: file\nname: {LINES}\npath: {}\nstart_at: beginning\npoll_interval_ms: 100",
            source.display()
        ));
        streams.push(LINES.to_owned());
        spawn_writer(source.clone(), lines_per_s, Arc::clone(&stop_writer))
    });
    let agent = Agent::spawn(dir.path(), &cfg.render());
    let mut s = Soak {
        agent,
        sub,
        proxy,
        broker,
        cfg,
        streams,
        rng: fastrand::Rng::with_seed(seed),
        t: Tally {
            processes: 1,
            ..Tally::default()
        },
    };

    let start = Instant::now();
    let end = start + Duration::from_secs(secs);
    let mut next_kill = start + ms(s.rng.u64(30_000..=90_000));
    let mut next_restart = start + ms(s.rng.u64(60_000..=120_000));
    let mut next_report = start + Duration::from_secs(60);
    while Instant::now() < end {
        let calm = ms(s.rng.u64(1000..=5000));
        s.hold(calm).await;
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_kill {
            s.sigkill().await;
            next_kill = Instant::now() + ms(s.rng.u64(30_000..=90_000));
        } else if now >= next_restart {
            s.restart_broker().await;
            next_restart = Instant::now() + ms(s.rng.u64(60_000..=120_000));
        } else {
            s.network_fault().await;
        }
        if Instant::now() >= next_report {
            next_report += Duration::from_secs(60);
            eprintln!(
                "soak: {:>4} s, {} records received, {} B up through the proxy, {:?}",
                start.elapsed().as_secs(),
                s.received(),
                s.proxy.bytes(Direction::Up),
                s.t
            );
        }
    }
    let faults_for = start.elapsed();

    // The end: a healthy link, the writer stopped and its last lines ingested, a clean stop, a
    // drain without collectors.
    s.proxy.clear();
    stop_writer.store(true, Ordering::Relaxed);
    let written = writer.map(|w| w.join().expect("the file writer panicked"));
    if let Some(written) = written {
        let deadline = Instant::now() + INGEST_TIMEOUT;
        loop {
            let ingested = live_status(&s.cfg).await.and_then(|st| {
                st["spool"]["streams"]
                    .as_array()?
                    .iter()
                    .find(|x| x["name"] == LINES)?["next_seq"]
                    .as_u64()
            });
            if ingested.is_some_and(|next| next > written) || Instant::now() >= deadline {
                break;
            }
            s.hold(ms(200)).await;
        }
    }
    s.sample();
    let drain_start = Instant::now();
    let drained = stop_and_drain(&mut s.agent, &s.cfg, &s.sub, &s.streams, DRAIN_TIMEOUT).await;
    let drain_took = drain_start.elapsed();
    let log = s.agent.log();
    if let Ok(path) = std::env::var("SOAK_LOG") {
        std::fs::write(&path, &log).unwrap_or_else(|e| panic!("cannot write {path}: {e}"));
    }
    let reconnects = log.matches(CONNECTED).count();
    let losses: Vec<String> = losses_by_error(&log)
        .into_iter()
        .map(|(n, kind)| format!("\n                  {n:>4} x {kind}"))
        .collect();
    let error_lines = log.lines().filter(|l| l.contains(" ERROR ")).count();
    let t = &s.t;
    let dups = drained.duplicates();
    let lines_accepted = drained
        .streams
        .iter()
        .find(|x| x.name == LINES)
        .map_or(0, |x| x.accepted);
    let misnumbered = misnumbered_lines(&s.sub);
    let source_ok = written.is_none_or(|w| w == lines_accepted) && misnumbered.is_empty();
    let source_line = match written {
        Some(w) => format!(
            "{w} lines written, {lines_accepted} ingested, {} delivered records whose line is not their seq",
            misnumbered.len()
        ),
        None => "none".to_owned(),
    };
    let left: u64 = drained.streams.iter().map(|x| x.left_in_spool).sum();
    let evicted: u64 = drained.streams.iter().map(|x| x.evicted).sum();
    println!(
        "
=== ferry soak summary ===
run:            tests/soak.sh {secs}  (SOAK_SEED={seed}; {sources}; faults for {:.0} s, final drain {:.1} s)
faults:         {} cuts, {} blackholes ({:.0} s in all), {} x 9600 B/s + 600 ms ({:.0} s), {} latency phases, {} throttle phases, {} SIGKILLs of ferry, {} graceful broker restarts
records produced: {}  (spool next_seq - 1 over {} streams, after a final clean stop and drain)
file source:      {source_line}
delivered:        {}  (distinct seqs at the subscriber)
lost:             {}
duplicates:       {}  ({:.2}% of {} received)
reconnects:       {}  (\"{CONNECTED}\" in ferry's log, {} processes)
connections lost: {}  (\"{LOST}\" in ferry's log, by error:){}
ERROR lines in ferry's log: {error_lines}
max RSS of ferry: {:.1} MiB  (VmHWM)
spool disk high-water: {:.1} MiB allocated ({:.1} MiB apparent)
left in spool: {left}, evicted: {evicted}, ferry.loss records: {}, ferry exited on its own: {} times, drain completed: {}
result: {}
",
        faults_for.as_secs_f64(),
        drain_took.as_secs_f64(),
        t.cuts,
        t.blackholes,
        t.blackhole.as_secs_f64(),
        t.satellite,
        t.satellite_time.as_secs_f64(),
        t.latency,
        t.throttle,
        t.kills,
        t.broker_restarts,
        drained.produced(),
        drained.streams.len(),
        drained.delivered(),
        drained.lost(),
        dups,
        100.0 * dups as f64 / drained.received().max(1) as f64,
        drained.received(),
        reconnects,
        t.processes + 1,
        log.matches(LOST).count(),
        losses.concat(),
        t.max_hwm_kib as f64 / 1024.0,
        mib(t.disk_high),
        mib(t.disk_high_apparent),
        drained.loss_records,
        t.unexpected_exits,
        drained.completed,
        if drained.lost() == 0 && t.unexpected_exits == 0 && drained.completed && source_ok {
            "PASS"
        } else {
            "FAIL"
        },
    );
    drained.assert_nothing_lost(&log);
    assert_eq!(t.unexpected_exits, 0, "ferry exited on its own:\n{log}");
    assert!(
        source_ok,
        "file source: {source_line}; first misnumbered: {:?}",
        &misnumbered[..misnumbered.len().min(10)]
    );
}
