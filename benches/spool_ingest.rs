//! Durable ingest: records/s committed into the ferry spool, and what its durability costs.
//!
//! Every side does what the spool writer does with a group: encode the records, write one
//! sled batch, flush it. Four sides in the same process, same records, same sled settings
//! (`cache_capacity`, `flush_every_ms`), fresh temp dirs on the same filesystem, a different
//! side first in each repetition:
//! - ferry: `Spool::commit` (chunks and counters in one batch, sled's flush, an fdatasync of
//!   sled's log: committed means it survives a power cut);
//! - chunks, flush only: the same commits on raw sled (values packed to the spool's chunk
//!   limits under its keys, plus three small metadata values) with sled's flush alone, which
//!   is `sync_file_range` and survives SIGKILL but not a power cut. **ferry / this is the
//!   cost of durability** (plus the spool's own bookkeeping);
//! - chunks + fdatasync: the same plus the fdatasync, i.e. the fdatasync's cost alone;
//! - per-record sled: one key per record, flush only (the original baseline).
//!
//! Two group sizes: the default `flush_max_records` (a backlog or a fast collector) and a
//! small group (a slow collector: each commit pays a whole sync).
//!
//! Run: `cargo bench --bench spool_ingest` (release) or `cargo bench --profile dev --bench
//! spool_ingest`. Knobs: `FERRY_BENCH_RECORDS` (large groups, default 200000),
//! `FERRY_BENCH_SMALL_RECORDS` (default 50000), `FERRY_BENCH_SMALL_GROUP` (default 10),
//! `FERRY_BENCH_REPS` (default 3), `FERRY_BENCH_DIR` (default the temp dir; a real disk).

mod common;

use common::{dir_bytes, env_or, machine_header, median, sample_reading, scratch_base, tempdir};
use ferry::record::Reading;
use ferry::spool::{FullPolicy, SpoolSettings};
use ferry::spool::{Intake, Spool, chunk, keys};
use std::path::Path;
use std::time::{Duration, Instant};

/// Spool settings as `config::load` derives them from the defaults.
fn settings(dir: &Path) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_path_buf(),
        max_bytes: 1 << 30,
        full_policy: FullPolicy::DropOldest,
        flush_interval: Duration::from_millis(200),
        flush_max_records: 1000,
        cache_bytes: 4 << 20,
        min_free_bytes: 16 << 20,
        chunk_max_records: 500,
        chunk_max_bytes: ((64 << 10) / 8).min(ferry::spool::CHUNK_MAX_BYTES_CAP as usize),
    }
}

struct Run {
    elapsed: Duration,
    disk_bytes: u64,
}

impl Run {
    fn rate(&self, records: u64) -> f64 {
        records as f64 / self.elapsed.as_secs_f64()
    }
}

/// `commits` commits of the same group through `Spool::commit`.
fn run_ferry(group: &[Intake], commits: u64) -> Run {
    let dir = tempdir("ferry-bench-ingest-");
    let spool = Spool::open(&settings(&dir.path().join("spool"))).expect("open the spool");
    let t = Instant::now();
    for _ in 0..commits {
        spool.commit(group).expect("commit");
    }
    let elapsed = t.elapsed();
    let stored = spool.stats().records;
    assert_eq!(stored, commits * group.len() as u64, "every record stored");
    drop(spool);
    Run {
        elapsed,
        disk_bytes: dir_bytes(dir.path()),
    }
}

/// The baselines, raw sled in the same process.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    /// `Spool::commit`: sled batch, sled flush, fdatasync of sled's log.
    Ferry,
    /// The same commits without the fdatasync: the group packed into chunk values of the
    /// spool's size limits under the spool's keys, with the same three small metadata values,
    /// one `apply_batch` and one `flush` per group. What the spool did before a power cut had
    /// to be survived.
    Chunks,
    /// [`Side::Chunks`] plus the fdatasync of sled's log the spool does: the fdatasync's cost
    /// alone, without the rest of the spool.
    ChunksSync,
    /// One key per record, `apply_batch` + `flush` per group (the original baseline).
    PerRecord,
}

impl Side {
    const ALL: [Side; 4] = [Side::Ferry, Side::Chunks, Side::ChunksSync, Side::PerRecord];

    fn label(self) -> &'static str {
        match self {
            Side::Ferry => "ferry",
            Side::Chunks => "chunks, flush only",
            Side::ChunksSync => "chunks + fdatasync",
            Side::PerRecord => "per-record sled",
        }
    }
}

/// `commits` raw sled commits of `readings`, as `side` says.
fn run_raw(side: Side, readings: &[Reading], commits: u64) -> Run {
    let dir = tempdir("ferry-bench-ingest-raw-");
    let s = settings(&dir.path().join("raw"));
    let db = sled::Config::new()
        .path(&s.dir)
        .cache_capacity(s.cache_bytes)
        .flush_every_ms(Some(1000))
        .open()
        .expect("open sled");
    let tree = db.open_tree("raw").expect("open tree");
    let log = (side == Side::ChunksSync)
        .then(|| std::fs::File::open(s.dir.join("db")).expect("open sled's log"));
    let mut key = 0u64;
    let mut buf = Vec::with_capacity(8 << 10);
    let mut one = Vec::with_capacity(256);
    let meta = [0x5au8; 64];
    let t = Instant::now();
    for _ in 0..commits {
        let mut batch = sled::Batch::default();
        let chunk = |batch: &mut sled::Batch, buf: &mut Vec<u8>, count: u32, key: &mut u64| {
            let value = chunk::assemble(
                chunk::Header {
                    committed_ms: 0,
                    first_seq: *key,
                    count,
                },
                buf,
            );
            *key += 1;
            batch.insert(&keys::chunk(1, *key), value);
            buf.clear();
        };
        let mut count = 0u32;
        for r in readings {
            if side == Side::PerRecord {
                buf.clear();
                chunk::encode_record(&mut buf, r.ts_ms, ferry::clock::ClockState::Synced, &r.body);
                key += 1;
                batch.insert(&key.to_be_bytes(), buf.as_slice());
                continue;
            }
            one.clear();
            chunk::encode_record(&mut one, r.ts_ms, ferry::clock::ClockState::Synced, &r.body);
            if count > 0
                && (chunk::HEADER_LEN + buf.len() + one.len() > s.chunk_max_bytes
                    || count as usize == s.chunk_max_records)
            {
                chunk(&mut batch, &mut buf, count, &mut key);
                count = 0;
            }
            buf.extend_from_slice(&one);
            count += 1;
        }
        if count > 0 {
            chunk(&mut batch, &mut buf, count, &mut key);
        }
        if side != Side::PerRecord {
            batch.insert(&keys::stream(1), &meta[..]);
            batch.insert(keys::GLOBAL, &meta[..]);
            batch.insert(keys::COUNTERS, &meta[..]);
        }
        tree.apply_batch(batch).expect("apply_batch");
        tree.flush().expect("flush");
        if let Some(log) = &log {
            log.sync_data().expect("fdatasync");
        }
    }
    let elapsed = t.elapsed();
    assert!(tree.last().expect("read").is_some(), "records stored");
    drop(tree);
    drop(db);
    Run {
        elapsed,
        disk_bytes: dir_bytes(dir.path()),
    }
}

struct Row {
    group: usize,
    records: u64,
    runs: Vec<(Side, Run)>,
}

impl Row {
    fn rate(&self, side: Side) -> f64 {
        median(
            &self
                .runs
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, r)| r.rate(self.records))
                .collect::<Vec<_>>(),
        )
    }

    fn disk_mb(&self, side: Side) -> f64 {
        median(
            &self
                .runs
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, r)| r.disk_bytes as f64 / 1e6)
                .collect::<Vec<_>>(),
        )
    }

    /// Median ms per commit of `side`.
    fn commit_ms(&self, side: Side) -> f64 {
        let commits = (self.records / self.group as u64) as f64;
        median(
            &self
                .runs
                .iter()
                .filter(|(s, _)| *s == side)
                .map(|(_, r)| r.elapsed.as_secs_f64() * 1000.0 / commits)
                .collect::<Vec<_>>(),
        )
    }
}

fn measure(group_size: usize, records: u64, reps: usize) -> Row {
    let readings: Vec<Reading> = (0..group_size as u64)
        .map(|i| sample_reading("sensor", i))
        .collect();
    // One intake per reading, as the writer receives them from a collector.
    let group: Vec<Intake> = readings.iter().cloned().map(Intake::reading).collect();
    let commits = records.div_ceil(group_size as u64);
    let records = commits * group_size as u64;
    let mut row = Row {
        group: group_size,
        records,
        runs: Vec::new(),
    };
    for rep in 0..reps {
        // A different side goes first in each repetition.
        for k in 0..Side::ALL.len() {
            let side = Side::ALL[(rep + k) % Side::ALL.len()];
            let r = match side {
                Side::Ferry => run_ferry(&group, commits),
                _ => run_raw(side, &readings, commits),
            };
            println!(
                "  group {group_size:>5}  rep {}  {:<20} {:>10.0} rec/s  ({:.2} s)",
                rep + 1,
                side.label(),
                r.rate(records),
                r.elapsed.as_secs_f64()
            );
            row.runs.push((side, r));
        }
    }
    row
}

fn main() {
    if common::skip_unless_cargo_bench("spool_ingest") {
        return;
    }
    let records: u64 = env_or("FERRY_BENCH_RECORDS", 200_000);
    let small_records: u64 = env_or("FERRY_BENCH_SMALL_RECORDS", 50_000);
    let small_group: usize = env_or("FERRY_BENCH_SMALL_GROUP", 10);
    let reps: usize = env_or("FERRY_BENCH_REPS", 3);

    let sample = sample_reading("sensor", 0);
    let mut one = Vec::new();
    chunk::encode_record(
        &mut one,
        sample.ts_ms,
        ferry::clock::ClockState::Synced,
        &sample.body,
    );

    println!(
        "spool_ingest: durable ingest, ferry spool (Spool::commit) vs the same commits on raw sled without fdatasync, with it, and one key per record"
    );
    println!("{}", machine_header());
    println!(
        "record: 5 numeric fields, {} bytes encoded (postcard); scratch dir {}; {reps} alternating repetitions",
        one.len(),
        scratch_base().display()
    );

    let rows = [
        measure(1000, records, reps),
        measure(small_group, small_records, reps),
    ];

    println!();
    println!(
        "{:>6} {:>8} {:>12} {:>12} {:>12} {:>12} {:>12} {:>9} {:>9} {:>9}",
        "group",
        "records",
        "ferry rec/s",
        "flush-only",
        "+fdatasync",
        "per-record",
        "ferry/flush",
        "sync/flush",
        "ferry MB",
        "chunks MB"
    );
    for row in &rows {
        let ferry = row.rate(Side::Ferry);
        let flush = row.rate(Side::Chunks);
        let sync = row.rate(Side::ChunksSync);
        println!(
            "{:>6} {:>8} {:>12.0} {:>12.0} {:>12.0} {:>12.0} {:>11.2}x {:>8.2}x {:>9.1} {:>9.1}",
            row.group,
            row.records,
            ferry,
            flush,
            sync,
            row.rate(Side::PerRecord),
            ferry / flush,
            sync / flush,
            row.disk_mb(Side::Ferry),
            row.disk_mb(Side::Chunks),
        );
    }
    println!();
    for row in &rows {
        println!(
            "cost of durability at {} records/commit: ferry ingests {:.2}x the records/s of the \
             same commits without fdatasync ({:.2}x vs per-record sled); median ms per commit: \
             ferry {:.3}, flush only {:.3}, with fdatasync {:.3}",
            row.group,
            row.rate(Side::Ferry) / row.rate(Side::Chunks),
            row.rate(Side::Ferry) / row.rate(Side::PerRecord),
            row.commit_ms(Side::Ferry),
            row.commit_ms(Side::Chunks),
            row.commit_ms(Side::ChunksSync),
        );
    }
    println!("medians of {reps}; ratios are within this run (the machine is shared and noisy)");
}
