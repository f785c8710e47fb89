//! Power-cut items of the spool contract that a test in one process can show: no seq reused
//! after a quarantine whatever the clock, a quarantine interrupted by a crash still reported,
//! sled's pages kept out of blob files, and a big record's blob complete once committed.

use super::seqfile::{Quarantine, RESERVE_BLOCK, SeqFile};
use super::*;
use crate::record::{Body, LOSS_STREAM, Reading, Value};
use crate::spool::{FullPolicy, SpoolSettings};
use std::path::Path;
use std::time::Duration;

fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.join("spool"),
        max_bytes: 1 << 30,
        full_policy: FullPolicy::DropOldest,
        flush_interval: Duration::from_millis(10),
        flush_max_records: 1000,
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
        chunk_max_records: 500,
        // What `config::load` derives from the default `uplink.batch.max_bytes` (64 KiB).
        chunk_max_bytes: crate::spool::CHUNK_MAX_BYTES_CAP as usize,
    }
}

fn line(stream: &str, bytes: usize, i: u64) -> Intake {
    Intake::reading(Reading {
        stream: stream.into(),
        ts_ms: 1_700_000_000_000 + i,
        body: Body::Line(format!("{i:08} {}", "x".repeat(bytes))),
    })
}

fn seqs(spool: &Spool, stream: &str) -> Vec<u64> {
    let mut out = Vec::new();
    spool
        .for_each_record(stream, |r| {
            out.push(r.seq);
            true
        })
        .unwrap();
    out
}

fn losses(spool: &Spool) -> Vec<String> {
    let mut out = Vec::new();
    spool
        .for_each_record(LOSS_STREAM, |r| {
            if let Body::Fields(f) = &r.body
                && let Some((_, Value::Str(reason))) = f.iter().find(|(k, _)| k == "reason")
            {
                out.push(reason.clone());
            }
            true
        })
        .unwrap();
    out
}

/// Overwrites sled's log so the spool opens without its counters (detected as corrupt).
fn damage(dir: &Path) {
    std::thread::sleep(Duration::from_millis(1100)); // sled's flusher releases the lock
    let db = dir.join("db");
    let len = std::fs::metadata(&db).unwrap().len() as usize;
    std::fs::write(&db, vec![0xa5; len]).unwrap();
}

#[test]
fn a_quarantined_spool_restarts_above_every_old_seq_whatever_the_clock() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    // The reservation is the only floor: no clock is involved. A clock at 1970 (or one far
    // behind the seqs used so far) cannot pull it down; the old floor was `now_ms * 1000`.
    let clock_1970 = crate::clock::ManualClock::new(86_400_000, 1_000, false);
    let mut last_max = 0;
    for round in 0..3 {
        let spool = Spool::open(&s).unwrap();
        spool.set_clock(clock_1970.clone());
        spool
            .commit(&(0..50).map(|i| line("a", 100, i)).collect::<Vec<_>>())
            .unwrap();
        let a = seqs(&spool, "a");
        assert!(
            a[0] > last_max,
            "round {round}: seq {} reused (the previous spool went up to {last_max})",
            a[0]
        );
        assert_eq!(a.len(), 50);
        last_max = *a.last().unwrap();
        if round > 0 {
            assert_eq!(losses(&spool), ["spool_corrupt"], "round {round}");
        }
        assert!(
            SeqFile::load(&s.dir).unwrap().unwrap().reserved() > last_max,
            "the reservation covers every seq handed out"
        );
        drop(spool);
        damage(&s.dir);
    }
}

#[test]
fn a_crash_right_after_the_move_still_restarts_above_and_reports_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let old_max = {
        let spool = Spool::open(&s).unwrap();
        spool
            .commit(&(0..30).map(|i| line("a", 100, i)).collect::<Vec<_>>())
            .unwrap();
        *seqs(&spool, "a").last().unwrap()
    };
    damage(&s.dir);
    // What `quarantine` has on disk when a SIGKILL lands right after "moved aside": the
    // reservation file noting the quarantine, the directory renamed, no fresh spool yet.
    let target = tmp.path().join("spool.corrupt-1");
    let mut seq = SeqFile::load(&s.dir).unwrap().unwrap();
    seq.add_unreported(Quarantine {
        moved_to: target.clone(),
        error: "spool data is corrupt: test".into(),
    })
    .unwrap();
    std::fs::rename(&s.dir, &target).unwrap();
    drop(seq);

    let spool = Spool::open(&s).unwrap();
    assert_eq!(losses(&spool), ["spool_corrupt"], "reported after restart");
    spool.commit(&[line("a", 10, 0)]).unwrap();
    let a = seqs(&spool, "a");
    assert!(a[0] > old_max, "seq {} reused (old max {old_max})", a[0]);
    assert!(
        SeqFile::load(&s.dir)
            .unwrap()
            .unwrap()
            .unreported()
            .is_empty(),
        "reported once"
    );
    drop(spool);
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    assert_eq!(losses(&spool), ["spool_corrupt"], "not reported again");
}

#[test]
fn a_noted_quarantine_whose_move_never_happened_is_not_reported() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    drop(Spool::open(&s).unwrap());
    let mut seq = SeqFile::load(&s.dir).unwrap().unwrap();
    seq.add_unreported(Quarantine {
        moved_to: tmp.path().join("spool.corrupt-never"),
        error: "x".into(),
    })
    .unwrap();
    drop(seq);
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    assert!(losses(&spool).is_empty());
}

#[test]
fn seqs_are_reserved_durably_in_blocks_before_use() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let spool = Spool::open(&s).unwrap();
    spool.commit(&[line("a", 10, 0)]).unwrap();
    let reserved = SeqFile::load(&s.dir).unwrap().unwrap().reserved();
    assert_eq!(reserved, 2 + RESERVE_BLOCK, "next_seq 2 plus one block");
    spool
        .commit(&(0..100).map(|i| line("a", 10, i)).collect::<Vec<_>>())
        .unwrap();
    assert_eq!(
        SeqFile::load(&s.dir).unwrap().unwrap().reserved(),
        reserved,
        "no write within the block"
    );
}

#[test]
fn an_old_spool_without_a_reservation_gets_one_above_its_seqs() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    {
        let spool = Spool::open(&s).unwrap();
        spool
            .commit(&(0..40).map(|i| line("a", 10, i)).collect::<Vec<_>>())
            .unwrap();
    }
    // A spool written before the reservation existed.
    std::fs::remove_file(SeqFile::path_for(&s.dir)).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    drop(Spool::open(&s).unwrap());
    assert!(SeqFile::load(&s.dir).unwrap().unwrap().reserved() > 40);
}

/// Every file under sled's `blobs/` directory.
fn blobs(dir: &Path) -> Vec<(std::path::PathBuf, u64)> {
    std::fs::read_dir(dir.join("blobs"))
        .map(|rd| {
            rd.flatten()
                .map(|e| (e.path(), e.metadata().map_or(0, |m| m.len())))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn ingesting_many_default_chunks_never_makes_sled_write_a_blob() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let spool = Spool::open(&s).unwrap();
    // ~24 MB in groups as the writer commits them, each round of one line size: chunks just
    // under the limit (2 x 3000 B, 6 x 1000 B), single records near it (7000 B), and the size
    // that filled 8 KiB chunks (2 x 4000 B: blobs with the former limit). Acks in between make
    // sled rewrite its leaves.
    let mut i = 0u64;
    for round in 0..60 {
        let size = [4000, 3000, 1000, 7000][round % 4];
        let group: Vec<Intake> = (0..100)
            .map(|_| {
                i += 1;
                line("a", size, i)
            })
            .collect();
        spool.commit(&group).unwrap();
        if round % 7 == 6 {
            let batch = spool
                .next_batch(
                    &Default::default(),
                    &crate::spool::BatchLimits {
                        max_records: 200,
                        max_bytes: usize::MAX,
                        linger: Duration::ZERO,
                    },
                )
                .unwrap()
                .unwrap();
            let ids: Vec<u64> = batch.chunks.iter().map(|c| c.chunk_id).collect();
            spool.ack(batch.stream_id, &ids).unwrap();
        }
    }
    spool.flush().unwrap();
    assert!(
        blobs(&s.dir).is_empty(),
        "sled wrote pages as blobs: {:?}",
        blobs(&s.dir)
    );
}

#[test]
fn a_record_larger_than_a_sled_page_is_a_blob_that_is_complete_once_committed() {
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let spool = Spool::open(&s).unwrap();
    // A 300 kB line (max_line_bytes allows up to 1 MiB): one chunk, larger than sled's blob
    // threshold. sled (vendored) fsyncs the blob before its log can point at it.
    spool.commit(&[line("big", 300_000, 1)]).unwrap();
    let found = blobs(&s.dir);
    assert!(!found.is_empty(), "expected a blob for a 300 kB record");
    assert!(
        found.iter().all(|(_, len)| *len > 300_000),
        "every blob is complete: {found:?}"
    );
    drop(spool);
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    assert_eq!(seqs(&spool, "big"), [1]);
}

#[test]
fn a_spool_whose_blobs_a_power_cut_emptied_is_quarantined_not_reused() {
    // The shape the power-cut runs left behind with sled's unsynced blobs: the log is intact,
    // the blob files it points at are empty. sled then recovers silently to an older state
    // (here: the spool as created, every stream gone); counters that went back would hand
    // out the same seqs again.
    let tmp = tempfile::tempdir().unwrap();
    let s = settings(tmp.path());
    let old_max = {
        let spool = Spool::open(&s).unwrap();
        for i in 0..40 {
            spool.commit(&[line("lines", 150_000, i)]).unwrap();
        }
        spool
            .commit(&(40..60).map(|i| line("lines", 100, i)).collect::<Vec<_>>())
            .unwrap();
        *seqs(&spool, "lines").last().unwrap()
    };
    std::thread::sleep(Duration::from_millis(1100)); // sled's flusher releases the lock
    let found = blobs(&s.dir);
    assert!(!found.is_empty());
    for (path, _) in found {
        std::fs::write(path, b"").unwrap();
    }
    let spool = Spool::open(&s).unwrap();
    assert_eq!(losses(&spool), ["spool_corrupt"]);
    spool.commit(&[line("lines", 10, 0)]).unwrap();
    let now = seqs(&spool, "lines");
    assert!(
        now[0] > old_max,
        "seq {} reused (old max {old_max})",
        now[0]
    );
}
