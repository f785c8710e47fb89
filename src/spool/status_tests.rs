//! What the status reports is durable: `ferry status` (from [`Spool::stats`]) shows a stream's
//! `next_seq` and the `committed` counter only as of a commit whose sync returned, so a record
//! it reports as taken survives a power cut (the VM power-cut test compares the spool after
//! the cut against the last status printed before it).
//!
//! A test cannot cut the power between sled's batch and its sync; it can make the sync fail,
//! which leaves the spool in the same in-between state for good: the batch applied in sled's
//! memory, never on disk. A full tmpfs (mounted by the test; CI runs as root) makes sled's
//! write fail at the flush, after the batch was applied.

use super::*;
use crate::record::{Body, Reading};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

struct Tmpfs(PathBuf);

impl Tmpfs {
    /// Panics with the reason if no tmpfs can be mounted: the check cannot run without one.
    fn mount(at: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount (util-linux): {e}"));
        assert!(
            out.status.success(),
            "cannot mount a tmpfs (needs root or CAP_SYS_ADMIN; CI runs as root): {}",
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

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.join("spool"),
        max_bytes: 1 << 30,
        full_policy: FullPolicy::DropOldest,
        flush_interval: Duration::from_millis(10),
        flush_max_records: 1000,
        cache_bytes: 1 << 20,
        // No reserve: the commit reaches sled and fails there, as it can on any disk error.
        min_free_bytes: 0,
        chunk_max_records: 500,
        chunk_max_bytes: CHUNK_MAX_BYTES_CAP as usize,
    }
}

fn group(n: u64, bytes: usize) -> Vec<Intake> {
    (0..n)
        .map(|i| {
            Intake::reading(Reading {
                stream: "lines".into(),
                ts_ms: 1_700_000_000_000 + i,
                body: Body::Line(format!("{i:08} {}", "x".repeat(bytes))),
            })
        })
        .collect()
}

fn next_seq(stats: &SpoolStats) -> u64 {
    stats.stream("lines").map_or(0, |s| s.next_seq)
}

#[test]
fn status_never_reports_seqs_or_commits_whose_sync_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&tmp.path().join("fs"), "4m");
    let s = settings(&fs.0);
    let spool = Spool::open(&s).unwrap();
    spool.commit(&group(20, 100)).unwrap();
    let durable = spool.stats();
    assert_eq!(next_seq(&durable), 21);

    // Fill the filesystem, then commit: sled takes the batch into memory and fails to write it.
    let mut filler = std::fs::File::create(fs.0.join("filler")).unwrap();
    let block = vec![0u8; 64 << 10];
    while filler.write_all(&block).is_ok() {}
    let failed = spool.commit(&group(500, 300));
    assert!(failed.is_err(), "the commit on a full disk succeeded");

    let after = spool.stats();
    assert_eq!(
        next_seq(&after),
        next_seq(&durable),
        "status reports seqs that never reached the disk"
    );
    assert_eq!(after.counters.committed, durable.counters.committed);
}
