//! A full spool filesystem (a small tmpfs mounted by the test; CI runs as root): a clear ERROR,
//! new readings dropped and counted instead of reaching sled (which poisons itself on ENOSPC),
//! no crash, and recovery with a `disk_full` loss record when space returns; the count of what
//! was dropped survives a SIGKILL while the disk is full.

mod common;

use common::agent::{Agent, AgentConfig};
use common::broker::{Broker, BrokerOpts};
use common::subscriber::{Subscriber, assert_contiguous};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Mounts a tmpfs of `size` at `at`. Panics with the reason if that is not possible: the
    /// test cannot run its real check without one, and a skipped check must not pass.
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount (util-linux): {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN; CI runs as root), so the disk-full check cannot run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the filesystem at `dir` leaving about `leave` bytes free.
fn fill(dir: &Path, leave: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let block = vec![0u8; 64 << 10];
    while f.write_all(&block).is_ok() {}
    drop(f);
    let len = std::fs::metadata(&path).unwrap().len();
    let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    f.set_len(len.saturating_sub(leave)).unwrap();
    path
}

/// Three system collectors at 200 ms, spooling on `fs` with 1 MiB kept free.
fn config(dir: &Path, fs: &Tmpfs, port: u16) -> String {
    let mut cfg = AgentConfig::new(dir, port);
    cfg.spool_dir = fs.0.join("spool");
    cfg.collectors = (0..3)
        .map(|i| format!("type: system\nname: sys{i}\ninterval_ms: 200"))
        .collect();
    cfg.render().replace(
        "  cache_bytes: 4194304\n",
        "  cache_bytes: 4194304\n  min_free_bytes: 1048576\n",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_filesystem_is_reported_counted_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), "8m");
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let yaml = config(dir.path(), &fs, broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &yaml);
    assert!(
        sub.wait_for_seq("sys0", 3, Duration::from_secs(15)).await,
        "{}",
        agent.log()
    );

    let filler = fill(&fs.0, 600 << 10);
    assert!(
        agent
            .wait_for_log("Disk full.", Duration::from_secs(10))
            .await,
        "no disk-full error\n{}",
        agent.log()
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        agent.is_running(),
        "ferry died on a full disk\n{}",
        agent.log()
    );
    assert_eq!(
        agent.log().matches("Disk full.").count(),
        1,
        "the error is logged once per episode, not at every flush"
    );
    assert!(
        agent.log().contains("spool.min_free_bytes"),
        "the error names the setting"
    );

    std::fs::remove_file(filler).unwrap();
    assert!(
        agent
            .wait_for_log("has room again", Duration::from_secs(10))
            .await,
        "{}",
        agent.log()
    );
    assert!(
        sub.wait_until(Duration::from_secs(15), |s| s
            .records("ferry.loss")
            .iter()
            .any(
                |l| l["fields"]["reason"] == "disk_full" && l["fields"]["count"].as_u64() > Some(0)
            ))
        .await,
        "no disk_full loss record\n{}",
        agent.log()
    );
    // Sampling goes on, and the readings that were stored have no gaps (the dropped ones never
    // got a seq; the loss record counts them).
    let before = *sub.unique_seqs("sys0").last().unwrap();
    assert!(
        sub.wait_for_seq("sys0", before + 3, Duration::from_secs(10))
            .await
    );
    assert!(agent.terminate().success());
    let seqs = sub.unique_seqs("sys0");
    assert_contiguous(&seqs, 1, *seqs.last().unwrap());
    drop(fs);
}

/// The agent's persisted counters: (collected, committed, lost to `disk_full`).
async fn counters(agent: &Agent) -> (u64, u64, u64) {
    let status = agent.status_json().await;
    let c = &status["counters"];
    (
        c["collected"].as_u64().unwrap(),
        c["committed"].as_u64().unwrap(),
        c["lost_by_reason"]["disk_full"].as_u64().unwrap_or(0),
    )
}

/// Sum of the `disk_full` counts the subscriber received, each loss record once.
fn disk_full_reported(sub: &Subscriber) -> u64 {
    let mut seen = std::collections::BTreeSet::new();
    sub.records("ferry.loss")
        .iter()
        .filter(|l| l["fields"]["reason"] == "disk_full")
        .filter(|l| seen.insert(l["seq"].as_u64()))
        .map(|l| l["fields"]["count"].as_u64().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_full_counts_survive_a_sigkill_while_the_disk_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let Some(fs) = Tmpfs::mount(&dir.path().join("fs"), "8m") else {
        return;
    };
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let yaml = config(dir.path(), &fs, broker.agent_port());
    let mut agent = Agent::spawn(dir.path(), &yaml);
    assert!(
        sub.wait_for_seq("sys0", 3, Duration::from_secs(15)).await,
        "{}",
        agent.log()
    );

    let filler = fill(&fs.0, 600 << 10);
    assert!(
        agent
            .wait_for_log("Disk full.", Duration::from_secs(10))
            .await,
        "no disk-full error\n{}",
        agent.log()
    );
    // Let a few groups be refused, then crash while the disk is still full.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let mut before_kill = counters(&agent).await;
    while before_kill.2 < 6 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        before_kill = counters(&agent).await;
    }
    assert!(before_kill.2 >= 6, "{before_kill:?}\n{}", agent.log());
    agent.kill9();
    assert_eq!(
        disk_full_reported(&sub),
        0,
        "nothing could be reported while the disk was full"
    );

    // The new process starts on the full disk and still knows what the old one dropped.
    agent.start_again();
    assert!(
        agent
            .wait_for_log_count("Disk full.", 2, Duration::from_secs(15))
            .await,
        "{}",
        agent.log()
    );
    let (collected, committed, lost) = counters(&agent).await;
    assert!(
        lost > before_kill.2,
        "disk_full {lost} after the restart, {} before the SIGKILL\n{}",
        before_kill.2,
        agent.log()
    );
    // Every reading handed to the spool is stored or counted as dropped.
    assert_eq!(collected, committed + lost);

    std::fs::remove_file(filler).unwrap();
    assert!(
        agent
            .wait_for_log("has room again", Duration::from_secs(10))
            .await,
        "{}",
        agent.log()
    );
    // The loss records carry exactly the persisted count, including the killed process's.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let (mut reported, mut counted) = (0, (0, 0, 0));
    while tokio::time::Instant::now() < deadline {
        counted = counters(&agent).await;
        reported = disk_full_reported(&sub);
        if reported == counted.2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "disk_full before the SIGKILL: {}, after the restart: {lost}, reported: {reported}",
        before_kill.2
    );
    assert_eq!(reported, counted.2, "{}", agent.log());
    assert!(reported >= lost);
    assert_eq!(counted.0, counted.1 + counted.2);
    assert!(agent.terminate().success());
    drop(fs);
}
