//! Contract tests of the spool on a real sled database in a temp dir.

use super::badchunk;
use super::*;
use super::{BatchLimits, FullPolicy, SpoolSettings};
use crate::record::{Body, LOSS_STREAM, Reading, Value};
use std::collections::HashMap;
use std::time::Duration;

fn settings(dir: &std::path::Path, max_bytes: u64, policy: FullPolicy) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_path_buf(),
        max_bytes,
        full_policy: policy,
        flush_interval: Duration::from_millis(10),
        flush_max_records: 1000,
        cache_bytes: 1 << 20,
        min_free_bytes: 0,
        chunk_max_records: 50,
        chunk_max_bytes: 4096,
    }
}

fn reading(stream: &str, i: u64) -> Reading {
    Reading {
        stream: stream.into(),
        ts_ms: 1_700_000_000_000 + i,
        body: Body::Fields(vec![
            ("i".into(), Value::U64(i)),
            ("x".into(), Value::F64(i as f64 * 0.5)),
            ("pad".into(), Value::Str("p".repeat(60))),
        ]),
    }
}

fn intakes(stream: &str, range: std::ops::Range<u64>) -> Vec<Intake> {
    range.map(|i| Intake::reading(reading(stream, i))).collect()
}

const ALL: BatchLimits = BatchLimits {
    max_records: 100_000,
    max_bytes: usize::MAX,
    linger: Duration::ZERO,
};

/// Everything readable, by draining with cursors, as (stream, seqs).
fn drain(spool: &Spool) -> Vec<(String, Vec<u64>)> {
    let mut cursors = HashMap::new();
    let mut out = Vec::new();
    while let Some(b) = spool.next_batch(&cursors, &ALL).unwrap() {
        cursors.insert(b.stream_id, b.chunks.last().unwrap().chunk_id);
        let seqs = b
            .chunks
            .iter()
            .flat_map(|c| c.records.iter().map(|r| r.seq))
            .collect();
        out.push((b.stream.clone(), seqs));
    }
    out
}

#[test]
fn seqs_are_contiguous_per_stream_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
    {
        let spool = Spool::open(&s).unwrap();
        let mut group = intakes("a", 0..120);
        group.extend(intakes("b", 0..7));
        let sum = spool.commit(&group).unwrap();
        assert_eq!(sum.accepted, 127);
    }
    let spool = Spool::open(&s).unwrap();
    spool.commit(&intakes("a", 120..130)).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.stream("a").unwrap().next_seq, 131);
    assert_eq!(stats.stream("a").unwrap().records, 130);
    assert_eq!(stats.stream("b").unwrap().records, 7);
    let a: Vec<u64> = drain(&spool)
        .into_iter()
        .filter(|(s, _)| s == "a")
        .flat_map(|(_, v)| v)
        .collect();
    assert_eq!(a, (1..=130).collect::<Vec<_>>());
}

#[test]
fn chunks_respect_record_and_byte_limits() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    spool.commit(&intakes("a", 0..200)).unwrap();
    let limits = BatchLimits {
        max_records: 1000,
        max_bytes: usize::MAX,
        linger: Duration::ZERO,
    };
    let b = spool.next_batch(&HashMap::new(), &limits).unwrap().unwrap();
    for c in &b.chunks {
        assert!(c.records.len() <= 50);
        assert!(c.stored_bytes <= 4096 + 13 + chunk::HEADER_LEN + 200);
    }
    assert_eq!(b.record_count(), 200);
}

#[test]
fn ack_deletes_only_acked_chunks_and_seq_is_never_reused() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
    let spool = Spool::open(&s).unwrap();
    spool.commit(&intakes("a", 0..100)).unwrap();
    let limits = BatchLimits {
        max_records: 50,
        max_bytes: usize::MAX,
        linger: Duration::ZERO,
    };
    let first = spool.next_batch(&HashMap::new(), &limits).unwrap().unwrap();
    assert!(first.full);
    let n = first.record_count() as u64;
    assert!((1..=50).contains(&n));
    let ids: Vec<u64> = first.chunks.iter().map(|c| c.chunk_id).collect();
    assert_eq!(spool.ack(first.stream_id, &ids).unwrap(), n);
    // Acking again is harmless.
    assert_eq!(spool.ack(first.stream_id, &ids).unwrap(), 0);
    drop(spool);
    let spool = Spool::open(&s).unwrap();
    let left: Vec<u64> = drain(&spool).into_iter().flat_map(|(_, v)| v).collect();
    assert_eq!(left, (n + 1..=100).collect::<Vec<_>>());
    // Even with everything acked, the next record gets a new seq.
    let rest = spool.next_batch(&HashMap::new(), &ALL).unwrap().unwrap();
    spool
        .ack(
            rest.stream_id,
            &rest.chunks.iter().map(|c| c.chunk_id).collect::<Vec<_>>(),
        )
        .unwrap();
    assert_eq!(spool.stats().records, 0);
    spool.commit(&intakes("a", 0..1)).unwrap();
    assert_eq!(drain(&spool), vec![("a".to_string(), vec![101])]);
}

#[test]
fn oldest_stream_goes_first_and_cursor_skips_handed_out_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    spool.commit(&intakes("b", 0..3)).unwrap();
    spool.commit(&intakes("a", 0..3)).unwrap();
    spool.commit(&intakes("b", 3..5)).unwrap();
    let order: Vec<(String, Vec<u64>)> = drain(&spool);
    assert_eq!(order[0], ("b".to_string(), vec![1, 2, 3, 4, 5]));
    assert_eq!(order[1], ("a".to_string(), vec![1, 2, 3]));
}

fn loss_records(spool: &Spool) -> Vec<HashMap<String, Value>> {
    let mut cursors = HashMap::new();
    let mut out = Vec::new();
    while let Some(b) = spool.next_batch(&cursors, &ALL).unwrap() {
        cursors.insert(b.stream_id, b.chunks.last().unwrap().chunk_id);
        if b.stream != LOSS_STREAM {
            continue;
        }
        for r in b.chunks.iter().flat_map(|c| c.records.iter()) {
            let Body::Fields(f) = &r.body else {
                panic!("loss record is fields")
            };
            out.push(f.iter().cloned().collect());
        }
    }
    out
}

#[test]
fn drop_oldest_evicts_oldest_and_reports_the_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 64 << 10, FullPolicy::DropOldest);
    let spool = Spool::open(&s).unwrap();
    let mut evicted = 0;
    for round in 0..40u64 {
        let sum = spool
            .commit(&intakes("a", round * 50..round * 50 + 50))
            .unwrap();
        evicted += sum.evicted;
    }
    let stats = spool.stats();
    let a = stats.stream("a").unwrap();
    assert!(evicted > 0);
    assert_eq!(a.evicted, evicted);
    let data_bytes = stats.bytes - stats.stream(LOSS_STREAM).map_or(0, |l| l.bytes);
    assert!(data_bytes <= 64 << 10, "{data_bytes} over the cap");
    // What is left of "a" is the newest, contiguous up to the last seq.
    let left: Vec<u64> = drain(&spool)
        .into_iter()
        .filter(|(s, _)| s == "a")
        .flat_map(|(_, v)| v)
        .collect();
    assert_eq!(*left.last().unwrap(), 2000);
    assert_eq!(left.len() as u64 + evicted, 2000);
    assert!(left.windows(2).all(|w| w[1] == w[0] + 1));
    // Loss records cover exactly the evicted seqs 1..first_left-1.
    let mut covered = Vec::new();
    for l in loss_records(&spool) {
        assert_eq!(l["stream"], Value::Str("a".into()));
        assert_eq!(l["reason"], Value::Str("evicted".into()));
        let (Value::U64(f), Value::U64(t)) = (&l["first_seq"], &l["last_seq"]) else {
            panic!()
        };
        covered.extend(*f..=*t);
    }
    covered.sort();
    assert_eq!(covered, (1..left[0]).collect::<Vec<_>>());
    // Counters persist, including the loss total by reason.
    drop(spool);
    let spool = Spool::open(&s).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.stream("a").unwrap().evicted, evicted);
    assert_eq!(stats.counters.lost.get("evicted"), Some(&evicted));
    assert_eq!(stats.counters.collected, 2000);
    assert_eq!(stats.counters.committed, 2000);
}

/// Acknowledges everything readable.
fn ack_all(spool: &Spool) {
    while let Some(b) = spool.next_batch(&HashMap::new(), &ALL).unwrap() {
        let ids: Vec<u64> = b.chunks.iter().map(|c| c.chunk_id).collect();
        spool.ack(b.stream_id, &ids).unwrap();
    }
}

fn u64_of(v: &Value) -> u64 {
    match v {
        Value::U64(n) => *n,
        other => panic!("not a u64: {other:?}"),
    }
}

#[test]
fn drop_newest_keeps_old_records_and_reports_the_new_ones_once_room_is_back() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 64 << 10, FullPolicy::DropNewest);
    let spool = Spool::open(&s).unwrap();
    let mut dropped = 0;
    for round in 0..40u64 {
        dropped += spool
            .commit(&intakes("a", round * 50..round * 50 + 50))
            .unwrap()
            .dropped;
    }
    assert!(dropped > 0);
    let left: Vec<u64> = drain(&spool)
        .into_iter()
        .filter(|(s, _)| s == "a")
        .flat_map(|(_, v)| v)
        .collect();
    assert_eq!(left[0], 1);
    assert!(left.windows(2).all(|w| w[1] == w[0] + 1));
    // While full, the dropped range is held back (counted, durable), not a chunk per commit.
    assert!(loss_records(&spool).is_empty());
    assert_eq!(
        spool.stats().counters.lost.get("spool_full"),
        Some(&dropped)
    );
    drop(spool);
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    // Room comes back (everything acknowledged): the next commit reports one range.
    ack_all(&spool);
    spool.commit(&intakes("a", 2000..2001)).unwrap();
    let losses = loss_records(&spool);
    assert_eq!(losses.len(), 1, "{losses:?}");
    assert_eq!(losses[0]["reason"], Value::Str("spool_full".into()));
    assert_eq!(u64_of(&losses[0]["count"]), dropped);
    assert_eq!(u64_of(&losses[0]["first_seq"]), *left.last().unwrap() + 1);
    assert_eq!(u64_of(&losses[0]["last_seq"]), 2000);
    assert_eq!(
        spool.stats().counters.lost.get("spool_full"),
        Some(&dropped)
    );
}

#[test]
fn drop_newest_through_a_six_hour_outage_stays_within_the_cap() {
    use crate::clock::{ClockSource, ManualClock};
    let dir = tempfile::tempdir().unwrap();
    let cap = 256 << 10;
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        cap,
        FullPolicy::DropNewest,
    ))
    .unwrap();
    let clock = ManualClock::new(1_800_000_000_000, 1_000, true);
    spool.set_clock(clock.clone());
    // Six hours of 5 readings/s with the link down, one commit per 10 s of samples.
    let (step_ms, per_commit) = (10_000u64, 50u64);
    let commits = 6 * 3600 * 1000 / step_ms;
    let (mut high, mut dropped, mut stored_high) = (0, 0, 0);
    for n in 0..commits {
        let group: Vec<Intake> = (0..per_commit)
            .map(|i| {
                let mut r = reading("a", n * per_commit + i);
                r.ts_ms = clock.now_ms();
                Intake::reading(r)
            })
            .collect();
        dropped += spool.commit(&group).unwrap().dropped;
        clock.advance(step_ms);
        stored_high = stored_high.max(spool.stats().bytes);
        if n % 50 == 0 {
            high = high.max(dir_size(dir.path()));
        }
    }
    high = high.max(dir_size(dir.path()));
    let written = commits * per_commit * 100;
    eprintln!(
        "cap {cap} B, offered {written} B in {commits} commits, stored high-water {stored_high} B, disk high-water {high} B"
    );
    assert!(dropped > commits * per_commit / 2);
    assert!(
        stored_high <= cap,
        "stored {stored_high} B for a cap of {cap} B"
    );
    // The bound of the drop_oldest churn test.
    assert!(
        high <= 4 * cap + (2 << 20),
        "disk use {high} B for a cap of {cap} B"
    );
    assert_eq!(
        spool.stats().stream(LOSS_STREAM).map_or(0, |l| l.records),
        0
    );
}

#[test]
fn failed_commits_are_reported_with_the_next_commit_even_after_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
    {
        let spool = Spool::open(&s).unwrap();
        spool.commit(&intakes("a", 0..1)).unwrap();
        let full = SpoolError::DiskFull {
            free: 0,
            reserve: 1,
        };
        spool.note_failed(&intakes("a", 1..4), &full);
        spool.note_failed(&intakes("b", 0..2), &full);
        assert_eq!(spool.stats().counters.lost.get("disk_full"), Some(&5));
        // Killed before any commit succeeded: only the side file knows.
    }
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    let stats = spool.stats();
    assert_eq!(stats.counters.lost.get("disk_full"), Some(&5));
    assert_eq!(stats.counters.collected, 6);
    spool.commit(&intakes("a", 4..5)).unwrap();
    let mut losses = loss_records(&spool);
    losses.sort_by_key(|l| format!("{:?}", l["stream"]));
    assert_eq!(losses.len(), 2, "{losses:?}");
    assert_eq!(losses[0]["stream"], Value::Str("a".into()));
    assert_eq!(losses[0]["count"], Value::U64(3));
    assert_eq!(losses[1]["count"], Value::U64(2));
    assert!(
        losses
            .iter()
            .all(|l| l["reason"] == Value::Str("disk_full".into()))
    );
    // Reported once: reopening does not report or count them again.
    drop(spool);
    std::thread::sleep(Duration::from_millis(1100));
    let spool = Spool::open(&s).unwrap();
    spool.commit(&intakes("a", 5..6)).unwrap();
    assert_eq!(loss_records(&spool).len(), 2);
    let stats = spool.stats();
    assert_eq!(stats.counters.lost.get("disk_full"), Some(&5));
    assert_eq!(stats.counters.collected, 8);
}

#[test]
fn checkpoint_is_committed_with_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
    {
        let spool = Spool::open(&s).unwrap();
        let mut i = Intake::reading(reading("f", 1));
        i.checkpoint = Some(Checkpoint {
            source: "f".into(),
            position: vec![1, 2, 3],
        });
        spool.commit(&[i]).unwrap();
    }
    let spool = Spool::open(&s).unwrap();
    assert_eq!(spool.position("f").unwrap(), Some(vec![1, 2, 3]));
    assert_eq!(spool.stats().stream("f").unwrap().records, 1);
}

#[test]
fn failed_commits_are_reported_with_the_next_commit() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    spool.note_failed(&intakes("a", 0..3), &SpoolError::Corrupt("test".into()));
    spool.commit(&intakes("a", 3..4)).unwrap();
    let losses = loss_records(&spool);
    assert_eq!(losses.len(), 1);
    assert_eq!(losses[0]["count"], Value::U64(3));
    assert_eq!(losses[0]["reason"], Value::Str("spool_write_failed".into()));
}

#[test]
fn disk_use_stays_bounded_while_churning_ten_times_the_cap() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 256 << 10;
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        cap,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    let mut high = 0;
    let mut written = 0u64;
    let mut i = 0;
    while written < 10 * cap {
        spool.commit(&intakes("a", i..i + 50)).unwrap();
        i += 50;
        written += 50 * 100;
        high = high.max(dir_size(dir.path()));
    }
    eprintln!("cap {cap} B, written {written} B, disk high-water {high} B");
    assert!(
        high <= 4 * cap + (2 << 20),
        "disk use {high} B for a cap of {cap} B"
    );
}

fn dir_size(p: &std::path::Path) -> u64 {
    std::fs::read_dir(p)
        .unwrap()
        .flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() {
                dir_size(&e.path())
            } else {
                m.len()
            }
        })
        .sum()
}

fn corrupt_and_reopen(damage: impl Fn(&std::path::Path)) {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
    {
        let spool = Spool::open(&s).unwrap();
        spool.commit(&intakes("a", 0..100)).unwrap();
        spool.flush().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100)); // sled's flusher releases the lock
    damage(&s.dir);
    let spool = Spool::open(&s).expect("a corrupt spool is replaced, not an error");
    let moved: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("spool.corrupt-")
        })
        .collect();
    assert_eq!(moved.len(), 1, "the corrupt spool is kept aside");
    let losses = loss_records(&spool);
    assert_eq!(losses.len(), 1);
    assert_eq!(losses[0]["reason"], Value::Str("spool_corrupt".into()));
    // New seqs are above anything the lost spool used (1..=100): the seq reservation.
    spool.commit(&intakes("a", 0..1)).unwrap();
    let a = drain(&spool).into_iter().find(|(s, _)| s == "a").unwrap().1;
    assert!(a[0] > 100, "seq {} reused a low range", a[0]);
}

#[test]
fn a_damaged_log_that_sled_silently_drops_is_detected_and_quarantined() {
    corrupt_and_reopen(|dir| {
        let db = dir.join("db");
        let len = std::fs::metadata(&db).unwrap().len();
        std::fs::write(&db, vec![0xff; len as usize]).unwrap();
    });
}

#[test]
fn an_unreadable_sled_config_is_quarantined() {
    corrupt_and_reopen(|dir| std::fs::write(dir.join("conf"), b"\x00garbage\xff").unwrap());
}

#[test]
fn unsynced_records_are_flagged_then_corrected_after_sync() {
    use crate::clock::{ClockState, ManualClock};
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    // Booted in 1970: wall clock 10 s, 10 s of uptime.
    let clock = ManualClock::new(10_000, 10_000, false);
    spool.set_clock(clock.clone());
    let sample = |ts| {
        Intake::reading(Reading {
            stream: "a".into(),
            ts_ms: ts,
            body: Body::Line("x".into()),
        })
    };
    spool.commit(&[sample(10_000)]).unwrap();
    clock.advance(5_000);
    spool.commit(&[sample(15_000)]).unwrap();
    let records = |spool: &Spool| {
        let mut out = Vec::new();
        spool
            .for_each_record("a", |r| {
                out.push((r.ts_ms, r.clock));
                true
            })
            .unwrap();
        out
    };
    assert_eq!(
        records(&spool),
        vec![
            (
                10_000,
                ClockState::Unsynced {
                    boot: 7,
                    uptime_ms: 10_000
                }
            ),
            (
                15_000,
                ClockState::Unsynced {
                    boot: 7,
                    uptime_ms: 15_000
                }
            ),
        ]
    );
    // Nothing to correct while unsynced.
    assert_eq!(spool.correct_clock().unwrap(), 0);
    // NTP arrives 1 s later: the real time is 1.8e12 ms at uptime 16 s.
    clock.advance(1_000);
    clock.sync_to(1_800_000_000_000);
    assert_eq!(spool.correct_clock().unwrap(), 2);
    assert_eq!(
        records(&spool),
        vec![
            (1_800_000_000_000 - 6_000, ClockState::Corrected),
            (1_800_000_000_000 - 1_000, ClockState::Corrected),
        ]
    );
    // Records stamped after the sync are plain synced ones; byte counters stay exact.
    spool.commit(&[sample(1_800_000_000_500)]).unwrap();
    assert_eq!(records(&spool)[2], (1_800_000_000_500, ClockState::Synced));
    let stored: u64 = spool.stats().bytes;
    drop(spool);
    std::thread::sleep(Duration::from_millis(1100));
    let reopened = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    assert_eq!(reopened.stats().bytes, stored);
}

/// Drains in drain order, one commit per reading so each chunk is one record; returns the
/// (stream, first seq) of every batch.
fn drain_ordered(spool: &Spool, rules: &DrainRules, limits: &BatchLimits) -> Vec<(String, u64)> {
    let mut state = DrainState::default();
    let mut out = Vec::new();
    while let Some(b) = spool
        .drain_batch(&state, limits, rules, false, &[])
        .unwrap()
    {
        let last = b.chunks.last().unwrap().chunk_id;
        out.push((b.stream.clone(), b.chunks[0].records[0].seq));
        state.advance(&b, last);
    }
    out
}

fn commit_each(spool: &Spool, stream: &str, range: std::ops::Range<u64>) {
    for i in intakes(stream, range) {
        spool.commit(&[i]).unwrap();
    }
}

const ONE: BatchLimits = BatchLimits {
    max_records: 1,
    max_bytes: usize::MAX,
    linger: Duration::ZERO,
};

#[test]
fn high_lane_first_then_normal_and_bulk_by_weight() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    // Oldest first on disk: bulk, then normal, then the alarm stream.
    commit_each(&spool, "bulk", 0..20);
    commit_each(&spool, "normal", 0..20);
    commit_each(&spool, "alarm", 0..3);
    let mut rules = DrainRules {
        weights: LaneWeights { normal: 3, bulk: 1 },
        ..Default::default()
    };
    for (name, lane) in [("alarm", Lane::High), ("bulk", Lane::Bulk)] {
        rules.streams.insert(
            name.into(),
            StreamDrain {
                lane,
                live_first: false,
            },
        );
    }
    let order = drain_ordered(&spool, &rules, &ONE);
    let streams: Vec<&str> = order.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(&streams[..3], ["alarm"; 3], "high lane first: {streams:?}");
    // While both wait: 3 normal for every bulk.
    let first_16 = &streams[3..19];
    assert_eq!(first_16.iter().filter(|s| **s == "bulk").count(), 4);
    assert_eq!(first_16.iter().filter(|s| **s == "normal").count(), 12);
    // Each stream's own order stays oldest first.
    for name in ["normal", "bulk"] {
        let seqs: Vec<u64> = order
            .iter()
            .filter(|(s, _)| s == name)
            .map(|(_, q)| *q)
            .collect();
        assert_eq!(seqs, (1..=20).collect::<Vec<_>>(), "{name}");
    }
}

#[test]
fn high_only_returns_nothing_but_the_high_lane() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    commit_each(&spool, "normal", 0..5);
    let rules = DrainRules::default();
    let state = DrainState::default();
    assert!(
        spool
            .drain_batch(&state, &ONE, &rules, true, &[])
            .unwrap()
            .is_none()
    );
    commit_each(&spool, LOSS_STREAM, 0..1);
    let b = spool
        .drain_batch(&state, &ONE, &rules, true, &[])
        .unwrap()
        .unwrap();
    assert_eq!(b.stream, LOSS_STREAM);
}

#[test]
fn live_first_sends_the_newest_then_fresh_data_ahead_of_the_backlog() {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        1 << 30,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    commit_each(&spool, "live", 0..10);
    let mut rules = DrainRules::default();
    rules.streams.insert(
        "live".into(),
        StreamDrain {
            lane: Lane::Normal,
            live_first: true,
        },
    );
    let two = BatchLimits {
        max_records: 2,
        ..ONE
    };
    let mut state = DrainState::default();
    let next = |state: &mut DrainState| {
        let b = spool
            .drain_batch(state, &two, &rules, false, &[])
            .unwrap()?;
        state.advance(&b, b.chunks.last().unwrap().chunk_id);
        Some(
            b.chunks
                .iter()
                .flat_map(|c| c.records.iter().map(|r| r.seq))
                .collect::<Vec<_>>(),
        )
    };
    assert_eq!(next(&mut state), Some(vec![9, 10]), "newest batch first");
    assert_eq!(
        next(&mut state),
        Some(vec![1, 2]),
        "then the backlog, oldest first"
    );
    // New data arrives mid-backlog: it goes ahead of the rest of the backlog.
    commit_each(&spool, "live", 10..11);
    assert_eq!(next(&mut state), Some(vec![11]));
    let mut rest = Vec::new();
    while let Some(seqs) = next(&mut state) {
        rest.extend(seqs);
    }
    assert_eq!(
        rest,
        (3..=8).collect::<Vec<_>>(),
        "every record exactly once"
    );
}

#[test]
fn drop_oldest_evicts_down_to_nine_tenths_of_the_cap_then_waits() {
    let dir = tempfile::tempdir().unwrap();
    let cap = 256 << 10;
    let spool = Spool::open(&settings(
        &dir.path().join("spool"),
        cap,
        FullPolicy::DropOldest,
    ))
    .unwrap();
    let mut i = 0;
    let first_eviction = loop {
        let s = spool.commit(&intakes("a", i..i + 20)).unwrap();
        i += 20;
        if s.evicted > 0 {
            break s;
        }
    };
    let after = spool.stats().bytes;
    assert!(
        after <= cap * 9 / 10,
        "evicted {} records but {after} B of {cap} B are still stored",
        first_eviction.evicted
    );
    // Room was made: the next commits fit without evicting again.
    let s = spool.commit(&intakes("a", i..i + 20)).unwrap();
    assert_eq!(s.evicted, 0);
}

/// Commits `n` chunks of 10 records of `stream` (one chunk per commit) from seq 1 on.
fn commit_chunks(spool: &Spool, stream: &str, n: u64) {
    for c in 0..n {
        spool.commit(&intakes(stream, c * 10..c * 10 + 10)).unwrap();
    }
}

/// Replaces the value of the `nth` stored chunk of `stream` (oldest first); returns its id and
/// its seqs.
fn spoil(spool: &Spool, stream: &str, nth: usize, f: impl Fn(&[u8]) -> Vec<u8>) -> (u64, Vec<u64>) {
    let b = spool
        .next_batch(&HashMap::new(), &ALL)
        .unwrap()
        .filter(|b| b.stream == stream)
        .expect("the stream has chunks");
    let c = &b.chunks[nth];
    let key = keys::chunk(b.stream_id, c.chunk_id);
    let old = spool.tree().get(key).unwrap().unwrap();
    spool.tree().insert(key, f(&old)).unwrap();
    (c.chunk_id, c.records.iter().map(|r| r.seq).collect())
}

/// Overwrites the header: not a chunk any more (same length, as a damaged value would be).
fn garbage(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v[..chunk::HEADER_LEN].fill(0xff);
    v
}

/// Keeps the header, garbles the records.
fn garbled(v: &[u8]) -> Vec<u8> {
    let mut v = v.to_vec();
    v[chunk::HEADER_LEN..].fill(0xff);
    v
}

#[test]
fn unreadable_chunks_are_moved_aside_and_reported_and_delivery_goes_on() {
    for (damage, exact) in [(garbage as fn(&[u8]) -> Vec<u8>, false), (garbled, true)] {
        let dir = tempfile::tempdir().unwrap();
        let s = settings(&dir.path().join("spool"), 1 << 30, FullPolicy::DropOldest);
        let spool = Spool::open(&s).unwrap();
        commit_chunks(&spool, "a", 5);
        let (cid, bad) = spoil(&spool, "a", 2, damage);
        assert_eq!(bad, (21..=30).collect::<Vec<_>>());
        let delivered: Vec<u64> = drain(&spool)
            .into_iter()
            .filter(|(s, _)| s == "a")
            .flat_map(|(_, v)| v)
            .collect();
        let expected: Vec<u64> = (1..=50).filter(|q| !bad.contains(q)).collect();
        assert_eq!(delivered, expected);
        let losses = loss_records(&spool);
        assert_eq!(losses.len(), 1, "{losses:?}");
        let l = &losses[0];
        assert_eq!(l["reason"], Value::Str("spool_corrupt".into()));
        assert_eq!(l["stream"], Value::Str("a".into()));
        assert_eq!((u64_of(&l["first_seq"]), u64_of(&l["last_seq"])), (21, 30));
        assert_eq!(u64_of(&l["count"]), 10);
        assert_eq!(l.contains_key("range"), !exact, "{l:?}");
        let export = badchunk::export_path(&s.dir, "a", cid);
        assert_eq!(l["quarantined"], Value::Str(export.display().to_string()));
        let spoiled = std::fs::read(&export).unwrap();
        assert!(chunk::decode(&spoiled).is_err());
        let stats = spool.stats();
        assert_eq!(stats.stream("a").unwrap().records, 40);
        assert_eq!(stats.counters.lost.get("spool_corrupt"), Some(&10));
        // Counters stay exact: acking everything leaves an empty spool.
        ack_all(&spool);
        assert_eq!(spool.stats().records, 0);
        assert_eq!(spool.stats().bytes, 0);
    }
}

#[test]
fn eviction_that_reaches_an_unreadable_chunk_moves_it_aside_and_commits_go_on() {
    let dir = tempfile::tempdir().unwrap();
    let s = settings(&dir.path().join("spool"), 16 << 10, FullPolicy::DropOldest);
    let spool = Spool::open(&s).unwrap();
    commit_chunks(&spool, "a", 3);
    let (_, bad) = spoil(&spool, "a", 0, garbage);
    for c in 3..40 {
        spool
            .commit(&intakes("a", c * 10..c * 10 + 10))
            .expect("commits go on past an unreadable chunk");
    }
    let losses = loss_records(&spool);
    let corrupt: Vec<_> = losses
        .iter()
        .filter(|l| l["reason"] == Value::Str("spool_corrupt".into()))
        .collect();
    assert_eq!(corrupt.len(), 1, "{losses:?}");
    assert_eq!(u64_of(&corrupt[0]["first_seq"]), bad[0]);
    assert_eq!(u64_of(&corrupt[0]["last_seq"]), *bad.last().unwrap());
    assert_eq!(u64_of(&corrupt[0]["count"]), 10);
    // Every other seq up to the first one left was evicted and reported as such.
    let left = drain(&spool).into_iter().find(|(s, _)| s == "a").unwrap().1;
    let mut covered: Vec<u64> = losses
        .iter()
        .flat_map(|l| u64_of(&l["first_seq"])..=u64_of(&l["last_seq"]))
        .collect();
    covered.sort();
    assert_eq!(covered, (1..left[0]).collect::<Vec<_>>());
    ack_all(&spool);
    assert_eq!(spool.stats().records, 0);
}

#[test]
fn clock_correction_works_in_batches_while_commits_go_on() {
    correct_while_committing(64);
}

/// The same on 1 GiB: `cargo test --lib spool::tests::clock_correction_of_1_gib -- --ignored
/// --nocapture` (docs/RELIABILITY.md has its figures).
#[test]
#[ignore = "writes 1 GiB (about 2 GiB of sled files); a soak, not a CI test"]
fn clock_correction_of_1_gib_works_in_batches_while_commits_go_on() {
    correct_while_committing(1024);
}

/// Clock state of the first and the last record of the stream with id `sid`.
fn first_and_last_clock(
    spool: &Spool,
    sid: u32,
) -> (crate::clock::ClockState, crate::clock::ClockState) {
    let range = keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX);
    let state = |v: sled::IVec, last: bool| {
        let (_, records) = chunk::decode(&v).unwrap();
        let r = if last {
            records.last()
        } else {
            records.first()
        };
        r.unwrap().clock
    };
    let tree = spool.tree();
    let first = tree.range(range.clone()).next().unwrap().unwrap().1;
    let last = tree.range(range).next_back().unwrap().unwrap().1;
    (state(first, false), state(last, true))
}

/// Fills a spool with `mb` MiB of unsynced records, then corrects the clock while another
/// thread commits: commits must complete *between* the correction's batches, i.e. while the
/// big stream's first chunk is already corrected and its last one not yet (the correction
/// goes through the chunks in key order). Prints the correction's duration and the longest
/// commit meanwhile (figures for docs/RELIABILITY.md, not asserted).
fn correct_while_committing(mb: u64) {
    use crate::clock::{ClockState, ManualClock};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let mut s = settings(&dir.path().join("spool"), 1 << 40, FullPolicy::DropOldest);
    s.chunk_max_bytes = 64 << 10;
    s.chunk_max_records = 1000;
    let spool = Spool::open(&s).unwrap();
    let clock = ManualClock::new(10_000, 10_000, false);
    spool.set_clock(clock.clone());
    // Unsynced records in 64 KiB chunks.
    let target = mb << 20;
    let line = "x".repeat(4000);
    let mut n = 0u64;
    let filling = Instant::now();
    while spool.stats().bytes < target {
        let group: Vec<Intake> = (0..256)
            .map(|_| {
                n += 1;
                Intake::reading(Reading {
                    stream: "big".into(),
                    ts_ms: 10_000,
                    body: Body::Line(line.clone()),
                })
            })
            .collect();
        spool.commit(&group).unwrap();
    }
    eprintln!(
        "filled {} MiB ({n} records) in {:?}; sled's files: {} MB",
        target >> 20,
        filling.elapsed(),
        spool.disk_bytes() / 1_000_000
    );
    let one = BatchLimits {
        max_records: 1,
        ..ALL
    };
    let head = spool.next_batch(&HashMap::new(), &one).unwrap().unwrap();
    assert_eq!(head.stream, "big");
    let big = head.stream_id;
    clock.advance(1_000);
    clock.sync_to(1_800_000_000_000);
    let correcting = AtomicBool::new(true);
    let (corrected, between, stall) = std::thread::scope(|scope| {
        let committer = scope.spawn(|| {
            let (mut between, mut stall) = (0u64, Duration::ZERO);
            let mut i = 0;
            while correcting.load(Ordering::Acquire) {
                let t = Instant::now();
                spool.commit(&intakes("small", i..i + 5)).unwrap();
                stall = stall.max(t.elapsed());
                i += 5;
                let (first, last) = first_and_last_clock(&spool, big);
                if first == ClockState::Corrected && matches!(last, ClockState::Unsynced { .. }) {
                    between += 1;
                }
            }
            (between, stall)
        });
        let started = Instant::now();
        let corrected = spool.correct_clock().unwrap();
        correcting.store(false, Ordering::Release);
        eprintln!(
            "corrected {corrected} records ({} MiB) in {:?}",
            target >> 20,
            started.elapsed()
        );
        let (between, stall) = committer.join().unwrap();
        (corrected, between, stall)
    });
    eprintln!(
        "commits completed between the correction's first and last batch: {between}; longest commit meanwhile: {stall:?}"
    );
    assert_eq!(corrected, n);
    assert!(
        between >= 3,
        "only {between} commits completed between the correction's batches"
    );
    let mut unsynced = 0;
    spool
        .for_each_record("big", |r| {
            unsynced += u64::from(!matches!(r.clock, crate::clock::ClockState::Corrected));
            true
        })
        .unwrap();
    assert_eq!(unsynced, 0);
}
