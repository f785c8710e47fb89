//! The file collector's tail mode end to end: the real `ferry` binary follows a real file
//! while this test writes to it like an application and rotates it like logrotate; every line
//! must reach a real Mosquitto subscriber exactly once, in order.
//!
//! "Exactly once" is checked by line content: each line must arrive, and all copies of a line
//! must carry the same seq (a redelivered record is allowed; the same line ingested twice
//! would get a second seq).

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::Subscriber;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::time::Duration;

const STREAM: &str = "app";
const WAIT: Duration = Duration::from_secs(20);

fn broker() -> Broker {
    Broker::start(BrokerOpts {
        secure: None,
        persistence: false,
    })
}

fn line(n: u32) -> String {
    format!("line-{n:06}")
}

fn open_append(path: &Path) -> File {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

/// Writes lines `from..=to` like a busy application: a short pause every 5 lines, so ferry
/// polls many times while a file is being written and rotated.
fn write_lines(f: &mut File, from: u32, to: u32) {
    for n in from..=to {
        writeln!(f, "{}", line(n)).unwrap();
        if n % 5 == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
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
            .insert(r["seq"].as_u64().unwrap());
    }
    m
}

/// Every line 1..=n arrived, each ingested once, in order of seq.
fn assert_exactly_once_in_order(sub: &Subscriber, n: u32, agent: &Agent) {
    let got = arrivals(sub);
    let missing: Vec<String> = (1..=n).map(line).filter(|l| !got.contains_key(l)).collect();
    assert!(
        missing.is_empty(),
        "{} lines missing, first: {:?}\nlog:\n{}",
        missing.len(),
        &missing[..missing.len().min(10)],
        agent.log()
    );
    let twice: Vec<_> = got.iter().filter(|(_, seqs)| seqs.len() > 1).collect();
    assert!(twice.is_empty(), "ingested more than once: {twice:?}");
    assert_eq!(got.len(), n as usize, "unexpected lines arrived");
    let mut by_seq: Vec<(u64, &String)> =
        got.iter().map(|(l, s)| (*s.first().unwrap(), l)).collect();
    by_seq.sort();
    assert!(
        by_seq.windows(2).all(|w| w[0].1 < w[1].1),
        "lines out of order"
    );
}

async fn wait_for_lines(sub: &Subscriber, n: u32, agent: &Agent) {
    let done = sub
        .wait_until(WAIT, |s| arrivals(s).len() >= n as usize)
        .await;
    assert!(
        done,
        "only {} of {n} lines arrived\nlog:\n{}",
        arrivals(sub).len(),
        agent.log()
    );
}

/// Starts a broker, a subscriber and ferry following `<dir>/app.log`.
async fn setup(dir: &Path) -> (Broker, Subscriber, Agent) {
    let broker = broker();
    let sub = Subscriber::start(broker.plain_port(), "ferry/+/data/#").await;
    let mut cfg = AgentConfig::new(dir, broker.agent_port());
    cfg.collectors = vec![format!(
        "type: file\nname: {STREAM}\npath: {}\nstart_at: beginning\npoll_interval_ms: 50\nbatch_lines: 200",
        dir.join("app.log").display()
    )];
    let agent = Agent::spawn(dir, &cfg.render());
    assert!(
        agent.wait_for_log("Following file.", WAIT).await,
        "{}",
        agent.log()
    );
    (broker, sub, agent)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rename_rotation_while_writing_loses_and_repeats_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    File::create(&path).unwrap();
    let (_broker, sub, agent) = setup(dir.path()).await;
    let p = path.clone();
    let writer = std::thread::spawn(move || {
        let mut f = open_append(&p);
        write_lines(&mut f, 1, 1000);
        // logrotate renames; the application still writes to its open file for a while...
        std::fs::rename(&p, p.with_extension("log.1")).unwrap();
        write_lines(&mut f, 1001, 1200);
        // ...until it reopens the path, which creates the new file.
        let mut f = open_append(&p);
        write_lines(&mut f, 1201, 2000);
    });
    writer.join().unwrap();
    wait_for_lines(&sub, 2000, &agent).await;
    assert_exactly_once_in_order(&sub, 2000, &agent);
    assert!(agent.log().contains("File rotated"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copytruncate_while_writing_restarts_at_zero() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    File::create(&path).unwrap();
    let (_broker, sub, agent) = setup(dir.path()).await;
    let mut f = open_append(&path);
    write_lines(&mut f, 1, 1000);
    // copytruncate cannot be exact: lines written between ferry's last read and the
    // truncation exist only in the copy, which ferry does not read (docs/COLLECTORS.md). So
    // rotate once ferry has read what was written, as logrotate would at a quiet moment.
    wait_for_lines(&sub, 1000, &agent).await;
    std::fs::copy(&path, path.with_extension("log.1")).unwrap();
    OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    // The application goes on writing through its O_APPEND handle, from offset 0 now; it
    // writes far more than ferry's old offset before ferry looks (the head fingerprint, not
    // the size, shows the truncation then) and goes on while ferry reads.
    let writer = std::thread::spawn(move || {
        write_lines(&mut f, 1001, 3000);
    });
    writer.join().unwrap();
    wait_for_lines(&sub, 3000, &agent).await;
    assert_exactly_once_in_order(&sub, 3000, &agent);
    assert!(agent.log().contains("File truncated"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_recreate_while_writing_reads_both_files_fully() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    File::create(&path).unwrap();
    let (_broker, sub, agent) = setup(dir.path()).await;
    let p = path.clone();
    let writer = std::thread::spawn(move || {
        let mut f = open_append(&p);
        write_lines(&mut f, 1, 1000);
        // Deleted while the application still has it open: ferry keeps reading its handle.
        std::fs::remove_file(&p).unwrap();
        write_lines(&mut f, 1001, 1100);
        std::thread::sleep(Duration::from_millis(200));
        // A new file at the same path (it may even get the same inode number).
        let mut f = open_append(&p);
        write_lines(&mut f, 1101, 2000);
    });
    writer.join().unwrap();
    wait_for_lines(&sub, 2000, &agent).await;
    assert_exactly_once_in_order(&sub, 2000, &agent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_created_after_start_is_read_from_its_first_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("app.log");
    let (_broker, sub, agent) = setup(dir.path()).await;
    // Let ferry poll the missing file a few times first.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let writer = std::thread::spawn(move || {
        let mut f = open_append(&path);
        write_lines(&mut f, 1, 2000);
    });
    writer.join().unwrap();
    wait_for_lines(&sub, 2000, &agent).await;
    assert_exactly_once_in_order(&sub, 2000, &agent);
    assert!(agent.log().contains("File appeared"), "{}", agent.log());
}
