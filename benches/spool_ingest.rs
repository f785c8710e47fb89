//! Durable ingest: records/s committed into the ferry spool vs raw sled, one key per record.
//!
//! Both sides do what the spool writer does with a group: encode the records, write one sled
//! batch, flush (fsync) it. ferry packs a group into chunks (`Spool::commit`, which also updates
//! the per-stream counters in the same batch); the baseline stores every record under its own
//! big-endian u64 key with the same postcard encoding. Same process, same record count, same
//! sled settings (`cache_capacity`, `flush_every_ms`), fresh temp dirs on the same filesystem,
//! alternating order. Two group sizes: the default `flush_max_records` (a backlog or a fast
//! collector) and a small group (a slow collector: each commit pays a full fsync).
//!
//! Run: `cargo bench --bench spool_ingest`. Knobs: `FERRY_BENCH_RECORDS` (large groups,
//! default 200000), `FERRY_BENCH_SMALL_RECORDS` (default 50000), `FERRY_BENCH_SMALL_GROUP`
//! (default 10), `FERRY_BENCH_REPS` (default 3), `FERRY_BENCH_DIR` (default the temp dir),
//! `FERRY_BENCH_RAW_FDATASYNC=1` (the baseline also fdatasyncs sled's log per commit).

mod common;

use common::{dir_bytes, env_or, machine_header, median, sample_reading, scratch_base, tempdir};
use ferry::record::Reading;
use ferry::spool::{FullPolicy, SpoolSettings};
use ferry::spool::{Intake, Spool, chunk};
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

/// The baseline: one key per record, one `apply_batch` + `flush` per group.
fn run_raw(readings: &[Reading], commits: u64) -> Run {
    let dir = tempdir("ferry-bench-ingest-raw-");
    let s = settings(&dir.path().join("raw"));
    let db = sled::Config::new()
        .path(&s.dir)
        .cache_capacity(s.cache_bytes)
        .flush_every_ms(Some(1000))
        .open()
        .expect("open sled");
    let tree = db.open_tree("raw").expect("open tree");
    // FERRY_BENCH_RAW_FDATASYNC=1: the baseline also fdatasyncs sled's log after each flush,
    // as the spool does since it must survive a power cut (sled's flush alone does not).
    let log = (env_or("FERRY_BENCH_RAW_FDATASYNC", 0u64) == 1)
        .then(|| std::fs::File::open(s.dir.join("db")).expect("open sled's log"));
    let mut key = 0u64;
    let mut buf = Vec::with_capacity(256);
    let t = Instant::now();
    for _ in 0..commits {
        let mut batch = sled::Batch::default();
        for r in readings {
            buf.clear();
            chunk::encode_record(&mut buf, r.ts_ms, ferry::clock::ClockState::Synced, &r.body);
            key += 1;
            batch.insert(&key.to_be_bytes(), buf.as_slice());
        }
        tree.apply_batch(batch).expect("apply_batch");
        tree.flush().expect("flush");
        if let Some(log) = &log {
            log.sync_data().expect("fdatasync");
        }
    }
    let elapsed = t.elapsed();
    let last = tree.last().expect("read").map(|(k, _)| k.to_vec());
    assert_eq!(
        last.as_deref(),
        Some(&key.to_be_bytes()[..]),
        "every record stored"
    );
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
    ferry: Vec<Run>,
    raw: Vec<Run>,
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
        ferry: Vec::new(),
        raw: Vec::new(),
    };
    for rep in 0..reps {
        let ferry_first = rep % 2 == 0;
        for side in 0..2 {
            if (side == 0) == ferry_first {
                let r = run_ferry(&group, commits);
                println!(
                    "  group {group_size:>5}  rep {}  ferry     {:>10.0} rec/s  ({:.2} s)",
                    rep + 1,
                    r.rate(records),
                    r.elapsed.as_secs_f64()
                );
                row.ferry.push(r);
            } else {
                let r = run_raw(&readings, commits);
                println!(
                    "  group {group_size:>5}  rep {}  raw sled  {:>10.0} rec/s  ({:.2} s)",
                    rep + 1,
                    r.rate(records),
                    r.elapsed.as_secs_f64()
                );
                row.raw.push(r);
            }
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
        "spool_ingest: durable ingest, ferry spool (Spool::commit) vs raw sled, one key per record"
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

    let mb = |b: u64| b as f64 / 1e6;
    println!();
    println!(
        "{:>6} {:>8} {:>15} {:>15} {:>10} {:>11} {:>11}",
        "group", "records", "ferry rec/s", "raw rec/s", "ferry/raw", "ferry disk", "raw disk"
    );
    for row in &rows {
        let ferry = median(
            &row.ferry
                .iter()
                .map(|r| r.rate(row.records))
                .collect::<Vec<_>>(),
        );
        let raw = median(
            &row.raw
                .iter()
                .map(|r| r.rate(row.records))
                .collect::<Vec<_>>(),
        );
        let fd = median(
            &row.ferry
                .iter()
                .map(|r| mb(r.disk_bytes))
                .collect::<Vec<_>>(),
        );
        let rd = median(&row.raw.iter().map(|r| mb(r.disk_bytes)).collect::<Vec<_>>());
        println!(
            "{:>6} {:>8} {:>15.0} {:>15.0} {:>9.2}x {:>8.1} MB {:>8.1} MB",
            row.group,
            row.records,
            ferry,
            raw,
            ferry / raw,
            fd,
            rd
        );
    }
    let rate = |row: &Row| {
        median(
            &row.ferry
                .iter()
                .map(|r| r.rate(row.records))
                .collect::<Vec<_>>(),
        )
    };
    let commit_ms = |row: &Row| {
        median(
            &row.ferry
                .iter()
                .map(|r| r.elapsed.as_secs_f64() * 1000.0 / (row.records / row.group as u64) as f64)
                .collect::<Vec<_>>(),
        )
    };
    println!();
    println!(
        "durability cost: ferry at {} records/commit ingests {:.3}x the records/s it does at 1000 \
         (median {:.2} ms per commit vs {:.2} ms)",
        rows[1].group,
        rate(&rows[1]) / rate(&rows[0]),
        commit_ms(&rows[1]),
        commit_ms(&rows[0]),
    );
    println!("medians of {reps}; ratios are within this run (the machine is shared and noisy)");
}
