//! Log rotation as logrotate does it by default (`create` plus a `postrotate` signal), end to
//! end: the real `ferry` binary follows a real file while writers go on writing to their old
//! handle for a while after the rename, the file is rotated several times, and ferry is
//! SIGKILLed in the middle. Every line must reach a real Mosquitto subscriber, ingested once:
//! all copies of one line carry one seq (the uplink may deliver a record twice after a crash;
//! a second ingest would get a second seq), and no seq carries two lines.
//!
//! - [`late_reopen_after_rotations_and_a_sigkill_loses_and_repeats_nothing`] does logrotate's
//!   steps itself (shift the old names, rename, create, signal), so the timing is exact: one
//!   writer reopens 50 ms after the signal, the other writes 100 lines 0.3 s and 50 lines
//!   1.3 s after it to its old handle and only then reopens; rotations come every second, so
//!   several rotated files are waited on at once.
//! - [`real_logrotate_with_create_and_postrotate_loses_and_repeats_nothing`] runs the real
//!   `logrotate` binary (Debian package `logrotate`) with its own state file and config, whose
//!   `postrotate` sends SIGHUP to a small writer process that reopens late the same way.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::drain::stop_and_drain;
use common::subscriber::Subscriber;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const STREAM: &str = "app";
/// Generous for one behaviour: ferry polls every 50 ms and commits every 50 ms.
const WAIT: Duration = Duration::from_secs(30);
/// A writer's pace between two lines.
const LINE_PAUSE: Duration = Duration::from_millis(2);
/// The late writer: bursts to its old handle after the rotation signal, then it reopens.
const LATE_BURSTS: [(Duration, u32); 2] = [
    (Duration::from_millis(300), 100),
    (Duration::from_millis(1300), 50),
];
const LATE_REOPEN: Duration = Duration::from_millis(1300);
const PROMPT_REOPEN: Duration = Duration::from_millis(50);

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()))
}

/// Starts a broker (persistent, so a restarted ferry's session survives), a subscriber and
/// ferry following `<dir>/app.log`.
async fn setup(dir: &Path) -> (Broker, Subscriber, Agent, AgentConfig) {
    let broker = Broker::start(BrokerOpts {
        secure: None,
        persistence: true,
    });
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let mut cfg = AgentConfig::new(dir, broker.agent_port());
    cfg.collectors = vec![format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nbatch_lines: 200\nrotate_wait_ms: 5000",
        dir.join("app.log").display()
    )];
    let agent = Agent::spawn(dir, &cfg.render());
    assert!(
        agent.wait_for_log("Following file.", WAIT).await,
        "{}",
        agent.log()
    );
    (broker, sub, agent, cfg)
}

/// Line content -> the distinct seqs it arrived with.
fn arrivals(sub: &Subscriber) -> BTreeMap<String, BTreeSet<u64>> {
    let mut m: BTreeMap<String, BTreeSet<u64>> = BTreeMap::new();
    for r in sub.records(STREAM) {
        let content = r["line"]
            .as_str()
            .expect("raw records carry `line`")
            .to_string();
        m.entry(content)
            .or_default()
            .insert(r["seq"].as_u64().expect("records carry a seq"));
    }
    m
}

/// `prefix-000001` ..= `prefix-{count}`.
fn written(prefix: &str, count: u32) -> impl Iterator<Item = String> + '_ {
    (1..=count).map(move |n| format!("{prefix}-{n:06}"))
}

/// Waits until every expected line arrived, drains ferry's spool through the shared drain
/// helper (every accepted seq delivered, nothing lost or left), then compares by content:
/// each line arrived with exactly one seq, no seq carries two lines, nothing else arrived.
async fn assert_exactly_once(
    sub: &Subscriber,
    agent: &mut Agent,
    cfg: &AgentConfig,
    expected: &BTreeSet<String>,
) {
    let all_there = sub
        .wait_until(WAIT, |s| {
            let got = arrivals(s);
            expected.iter().all(|l| got.contains_key(l))
        })
        .await;
    let drained = stop_and_drain(agent, cfg, sub, &[STREAM.to_string()], WAIT).await;
    drained.assert_nothing_lost(&agent.log());
    let got = arrivals(sub);
    let missing: Vec<&String> = expected.iter().filter(|l| !got.contains_key(*l)).collect();
    assert!(
        all_there && missing.is_empty(),
        "{} of {} lines never arrived, first: {:?}\nlog:\n{}",
        missing.len(),
        expected.len(),
        &missing[..missing.len().min(10)],
        agent.log()
    );
    let twice: Vec<_> = got
        .iter()
        .filter(|(_, seqs)| seqs.len() > 1)
        .take(10)
        .collect();
    assert!(twice.is_empty(), "lines ingested more than once: {twice:?}");
    let unexpected: Vec<&String> = got.keys().filter(|l| !expected.contains(*l)).collect();
    assert!(unexpected.is_empty(), "lines never written: {unexpected:?}");
    let mut line_of_seq: BTreeMap<u64, &String> = BTreeMap::new();
    for (line, seqs) in &got {
        for s in seqs {
            if let Some(other) = line_of_seq.insert(*s, line) {
                panic!("seq {s} carries two lines: {other} and {line}");
            }
        }
    }
    assert_eq!(drained.delivered(), expected.len() as u64);
    eprintln!(
        "{} lines, {} records received ({} redelivered duplicates)",
        expected.len(),
        drained.received(),
        drained.duplicates()
    );
}

/// An application process that writes `prefix-N` lines through its own handle and reopens
/// the path some time after each rotation signal (`rx`), writing bursts to the old handle
/// before it does. Returns how many lines it wrote once `stop` is set and nothing is due.
fn app_writer(
    path: PathBuf,
    prefix: &'static str,
    reopen_after: Duration,
    bursts: &'static [(Duration, u32)],
    rx: mpsc::Receiver<()>,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<u32> {
    std::thread::spawn(move || {
        let mut f = open_append(&path);
        let mut n = 0u32;
        let write = |f: &mut File, n: &mut u32| {
            *n += 1;
            // One write(2) per line: two writers append to one file.
            f.write_all(format!("{prefix}-{n:06}\n").as_bytes())
                .expect("append a line");
        };
        let mut reopen_at: Option<Instant> = None;
        let mut due: Vec<(Instant, u32)> = Vec::new();
        loop {
            while rx.try_recv().is_ok() {
                let now = Instant::now();
                reopen_at = Some(now + reopen_after);
                due.extend(bursts.iter().map(|(after, count)| (now + *after, *count)));
            }
            let now = Instant::now();
            due.retain(|(at, count)| {
                if *at <= now {
                    (0..*count).for_each(|_| write(&mut f, &mut n));
                }
                *at > now
            });
            if reopen_at.is_some_and(|at| at <= now) {
                f = open_append(&path);
                reopen_at = None;
            }
            if stop.load(Ordering::Relaxed) && reopen_at.is_none() && due.is_empty() {
                return n;
            }
            write(&mut f, &mut n);
            std::thread::sleep(LINE_PAUSE);
        }
    })
}

/// logrotate's steps for `create` without `dateext`: shift `app.log.N` to `app.log.N+1`,
/// rename `app.log` to `app.log.1`, create a new empty `app.log`.
fn rotate_like_logrotate(path: &Path, rotated_so_far: u32) {
    let name = |i: u32| PathBuf::from(format!("{}.{i}", path.display()));
    for i in (1..=rotated_so_far).rev() {
        std::fs::rename(name(i), name(i + 1)).expect("shift an old log");
    }
    std::fs::rename(path, name(1)).expect("rename the log");
    File::create(path).expect("create the new log");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_reopen_after_rotations_and_a_sigkill_loses_and_repeats_nothing() {
    const ROTATIONS: u32 = 5;
    const KILL_AFTER_ROTATION: u32 = 3;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    File::create(&path).unwrap();
    let (_broker, sub, mut agent, cfg) = setup(dir.path()).await;

    let stop = Arc::new(AtomicBool::new(false));
    let (late_tx, late_rx) = mpsc::channel();
    let (prompt_tx, prompt_rx) = mpsc::channel();
    let late = app_writer(
        path.clone(),
        "late",
        LATE_REOPEN,
        &LATE_BURSTS,
        late_rx,
        stop.clone(),
    );
    let prompt = app_writer(
        path.clone(),
        "prompt",
        PROMPT_REOPEN,
        &[],
        prompt_rx,
        stop.clone(),
    );
    for r in 0..ROTATIONS {
        tokio::time::sleep(Duration::from_secs(1)).await;
        rotate_like_logrotate(&path, r);
        // postrotate: tell both processes to reopen.
        late_tx.send(()).unwrap();
        prompt_tx.send(()).unwrap();
        if r + 1 == KILL_AFTER_ROTATION {
            // Between the late writer's two bursts to the rotated file.
            tokio::time::sleep(Duration::from_millis(600)).await;
            agent.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.start_again();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::Relaxed);
    let (late, prompt) = (late.join().unwrap(), prompt.join().unwrap());
    let expected: BTreeSet<String> = written("late", late)
        .chain(written("prompt", prompt))
        .collect();
    assert!(
        agent.log().contains("Resuming rotated files"),
        "the restart did not find a rotated file waited on; the test missed its case:\n{}",
        agent.log()
    );
    assert_exactly_once(&sub, &mut agent, &cfg, &expected).await;
}

/// The writer process for the real logrotate: appends `line-N` every 2 ms through its own
/// handle; on SIGHUP it writes 100 lines 0.3 s and 50 lines 1.3 s later to the old handle,
/// then reopens the path. On SIGTERM it finishes what is due, prints its count and exits.
const WRITER_PY: &str = r#"
import os, signal, sys, time
path = sys.argv[1]
hups, stop = [], []
signal.signal(signal.SIGHUP, lambda *_: hups.append(time.monotonic()))
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
n, due, reopen_at = 0, [], None
def line():
    global n
    n += 1
    os.write(fd, b"line-%06d\n" % n)
print("ready", flush=True)
while True:
    while hups:
        t = hups.pop()
        due += [(t + 0.3, 100), (t + 1.3, 50)]
        reopen_at = t + 1.3
    now = time.monotonic()
    for d in [d for d in due if d[0] <= now]:
        for _ in range(d[1]):
            line()
        due.remove(d)
    if reopen_at is not None and reopen_at <= now:
        os.close(fd)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        reopen_at = None
    if stop and not due and reopen_at is None:
        print(n, flush=True)
        sys.exit(0)
    line()
    time.sleep(0.002)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_logrotate_with_create_and_postrotate_loses_and_repeats_nothing() {
    const ROTATIONS: u32 = 4;
    const KILL_AFTER_ROTATION: u32 = 2;
    let logrotate = ["/usr/sbin/logrotate", "/sbin/logrotate"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("logrotate is not installed (apt-get install logrotate; scripts/test does)");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    File::create(&path).unwrap();
    let (_broker, sub, mut agent, cfg) = setup(dir.path()).await;

    let script = dir.path().join("writer.py");
    std::fs::write(&script, WRITER_PY).unwrap();
    let mut writer = Command::new("python3")
        .arg(&script)
        .arg(&path)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 runs");
    let mut out = std::io::BufReader::new(writer.stdout.take().unwrap());
    let mut first = String::new();
    std::io::BufRead::read_line(&mut out, &mut first).unwrap();
    assert_eq!(first.trim(), "ready");
    let pid_file = dir.path().join("writer.pid");
    std::fs::write(&pid_file, writer.id().to_string()).unwrap();
    let conf = dir.path().join("logrotate.conf");
    std::fs::write(
        &conf,
        format!(
            "{log} {{\n    rotate 20\n    create 0644\n    nocompress\n    missingok\n    postrotate\n        kill -HUP \"$(cat {pid})\"\n    endscript\n}}\n",
            log = path.display(),
            pid = pid_file.display()
        ),
    )
    .unwrap();
    let state = dir.path().join("logrotate.state");

    for r in 1..=ROTATIONS {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let run = Command::new(logrotate)
            .arg("-f")
            .arg("-s")
            .arg(&state)
            .arg(&conf)
            .output()
            .expect("logrotate runs");
        assert!(
            run.status.success(),
            "logrotate failed: {}\n{}",
            run.status,
            String::from_utf8_lossy(&run.stderr)
        );
        if r == KILL_AFTER_ROTATION {
            tokio::time::sleep(Duration::from_millis(600)).await;
            agent.kill9();
            tokio::time::sleep(Duration::from_millis(300)).await;
            agent.start_again();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(common::send_signal(writer.id(), "TERM"));
    let mut count = String::new();
    std::io::BufRead::read_line(&mut out, &mut count).unwrap();
    assert!(writer.wait().unwrap().success());
    let count: u32 = count.trim().parse().expect("the writer prints its count");
    let rotated = (1..=ROTATIONS)
        .filter(|i| dir.path().join(format!("app.log.{i}")).exists())
        .count();
    assert_eq!(
        rotated, ROTATIONS as usize,
        "logrotate did not rotate each time"
    );
    let expected: BTreeSet<String> = written("line", count).collect();
    assert!(
        agent.log().contains("Resuming rotated files"),
        "the restart did not find a rotated file waited on; the test missed its case:\n{}",
        agent.log()
    );
    assert_exactly_once(&sub, &mut agent, &cfg, &expected).await;
}
