//! A full spool filesystem (a small tmpfs mounted by the test; CI runs as root): a clear ERROR,
//! new readings dropped and counted instead of reaching sled (which poisons itself on ENOSPC),
//! no crash, and recovery with a `disk_full` loss record when space returns.

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_filesystem_is_reported_counted_and_recovered_from() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), "8m");
    let broker = Broker::start(BrokerOpts::default());
    let sub = Subscriber::start(broker.plain_port(), "ferry/#").await;
    let mut cfg = AgentConfig::new(dir.path(), broker.agent_port());
    cfg.spool_dir = fs.0.join("spool");
    cfg.collectors = (0..3)
        .map(|i| format!("type: system\nname: sys{i}\ninterval_ms: 200"))
        .collect();
    let yaml = cfg.render().replace(
        "  cache_bytes: 4194304\n",
        "  cache_bytes: 4194304\n  min_free_bytes: 1048576\n",
    );
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
