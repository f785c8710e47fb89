//! Disk use after churn: how much space sled's files take once ten times `spool.max_bytes` has
//! passed through the spool, as a ratio to `max_bytes` and to the bytes the spool holds (its own
//! accounting of stored keys and values). The unit test
//! `spool::tests::disk_use_stays_bounded_while_churning_ten_times_the_cap` checks a bound with
//! a 256 KiB cap; this measures realistic caps.
//!
//! Two ways records leave the spool, each on a fresh spool per cap:
//! - **evict:** the broker is unreachable; commits (`FERRY_BENCH_GROUP` sample readings, one
//!   sled batch and a flush each) go on past the cap and `drop_oldest` evicts in the same batch.
//! - **ack:** a consumer in the same thread reads the oldest batch (`Spool::next_batch`) and
//!   acknowledges it (`Spool::ack`, as after a PUBACK) whenever the spool holds more than half
//!   the cap (`FERRY_BENCH_ACK_AT`, default 0.5): a link that keeps up, but with a standing
//!   backlog.
//!
//! Sizes: apparent (file lengths) and allocated (`st_blocks`), the high-water mark over the run
//! (sampled after every commit), at the end after a flush, and again after closing and
//! reopening the spool. Target: disk <= 3x `max_bytes`, the sizing the shipped config
//! (`config/ferry.production.yaml`) tells operators to keep free.
//!
//! Run: `cargo bench --bench spool_churn` (~1-2 min). Knobs: `FERRY_BENCH_CAPS_MB` (MiB,
//! comma-separated, default `16,64`), `FERRY_BENCH_CHURN` (times the cap, default 10),
//! `FERRY_BENCH_ACK_AT`, `FERRY_BENCH_GROUP` (readings per commit, default 1000, the default
//! `flush_max_records`), `FERRY_BENCH_DIR` (must be a real disk).

mod common;

use common::suite::{dir_allocated_bytes, mb, prefill, verdict};
use common::{dir_bytes, env_or, machine_header, tempdir};
use ferry::config::{BatchLimits, FullPolicy, SpoolSettings};
use ferry::spool::Spool;
use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

const STREAM: &str = "sensor";

/// Spool settings as `config::load` derives them from the defaults, with `max_bytes` = `cap`.
fn settings(dir: &Path, cap: u64) -> SpoolSettings {
    SpoolSettings {
        dir: dir.to_path_buf(),
        max_bytes: cap,
        full_policy: FullPolicy::DropOldest,
        flush_interval: Duration::from_millis(200),
        flush_max_records: 1000,
        cache_bytes: 4 << 20,
        min_free_bytes: 16 << 20,
        chunk_max_records: 500,
        chunk_max_bytes: (64 << 10) / 8,
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Evict,
    Ack,
}

struct Churn {
    /// Records held by the spool's counters, and found by scanning the tree.
    records: u64,
    scanned: u64,
    churned: u64,
    elapsed: Duration,
    live: u64,
    evicted: u64,
    high_apparent: u64,
    high_allocated: u64,
    end_apparent: u64,
    end_allocated: u64,
    reopened_apparent: u64,
    reopened_allocated: u64,
}

fn churn(cap: u64, times: u64, mode: Mode, ack_at: f64, group: u64) -> Churn {
    let dir = tempdir("ferry-bench-churn-");
    let s = settings(&dir.path().join("spool"), cap);
    let spool = Spool::open(&s).expect("open the spool");
    let limits = BatchLimits {
        max_records: 500,
        max_bytes: 64 << 10,
        linger: Duration::ZERO,
    };
    let t = Instant::now();
    let (mut i, mut churned, mut high_apparent, mut high_allocated) = (0, 0, 0, 0);
    let mut per_group = 0;
    while churned < times * cap {
        let before = spool.stats().bytes;
        prefill(&spool, STREAM, i, group, group);
        if per_group == 0 {
            per_group = spool.stats().bytes - before;
        }
        i += group;
        churned += per_group;
        if mode == Mode::Ack {
            while spool.stats().bytes as f64 > cap as f64 * ack_at {
                let batch = spool
                    .next_batch(&HashMap::new(), &limits)
                    .expect("read the spool")
                    .expect("the spool holds data");
                let ids: Vec<u64> = batch.chunks.iter().map(|c| c.chunk_id).collect();
                spool.ack(batch.stream_id, &ids).expect("ack");
            }
        }
        high_apparent = high_apparent.max(dir_bytes(&s.dir));
        high_allocated = high_allocated.max(dir_allocated_bytes(&s.dir));
    }
    spool.flush().expect("flush");
    let elapsed = t.elapsed();
    let stats = spool.stats();
    let evicted = stats.streams.iter().map(|st| st.evicted).sum();
    let (end_apparent, end_allocated) = (dir_bytes(&s.dir), dir_allocated_bytes(&s.dir));
    drop(spool);
    let reopened = Spool::open(&s).expect("reopen the spool");
    assert_eq!(
        reopened.stats().bytes,
        stats.bytes,
        "same contents after reopening"
    );
    let (reopened_apparent, reopened_allocated) = (dir_bytes(&s.dir), dir_allocated_bytes(&s.dir));
    // The records really in the tree, by a scan: a deletion that only updated the counters
    // would show up here, not in the counters.
    let scanned = reopened
        .for_each_record(STREAM, |_| true)
        .expect("scan the spool");
    drop(reopened);
    Churn {
        records: stats.stream(STREAM).map_or(0, |st| st.records),
        scanned,
        churned,
        elapsed,
        live: stats.bytes,
        evicted,
        high_apparent: high_apparent.max(end_apparent),
        high_allocated: high_allocated.max(end_allocated),
        end_apparent,
        end_allocated,
        reopened_apparent,
        reopened_allocated,
    }
}

fn main() {
    if common::skip_unless_cargo_bench("spool_churn") {
        return;
    }
    let caps: Vec<u64> = std::env::var("FERRY_BENCH_CAPS_MB")
        .unwrap_or_else(|_| "16,64".into())
        .split(',')
        .map(|c| {
            c.trim()
                .parse::<u64>()
                .unwrap_or_else(|_| panic!("FERRY_BENCH_CAPS_MB: {c:?} is not a number"))
                << 20
        })
        .collect();
    let times: u64 = env_or("FERRY_BENCH_CHURN", 10);
    let ack_at: f64 = env_or("FERRY_BENCH_ACK_AT", 0.5);
    let group: u64 = env_or("FERRY_BENCH_GROUP", 1000);
    assert!(
        ack_at > 0.0 && ack_at < 1.0,
        "FERRY_BENCH_ACK_AT is a fraction of the cap"
    );

    println!(
        "spool_churn: sled's files after {times}x spool.max_bytes has passed through the spool"
    );
    println!("{}", machine_header());
    println!(
        "sample readings ({group} per commit, one batch + flush each); ack mode acknowledges \
         above {ack_at} x the cap; sizes in MB (10^6 B)"
    );
    println!();
    println!(
        "{:<5} {:>8} {:>9} {:>6} {:>8} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>7} {:>7} {:>8}",
        "mode",
        "cap MB",
        "churn MB",
        "time s",
        "live MB",
        "evicted",
        "high",
        "end",
        "reopen",
        "high al",
        "end al",
        "reop al",
        "end/cap",
        "hi/cap",
        "end/live"
    );
    let mut worst: f64 = 0.0;
    let mut mismatches = Vec::new();
    for &cap in &caps {
        for mode in [Mode::Evict, Mode::Ack] {
            let c = churn(cap, times, mode, ack_at, group);
            if c.scanned != c.records {
                // The counters are what eviction and the status socket trust: a mismatch is a
                // bug, not a figure. Finish the table, then fail.
                let m = format!(
                    "cap {} MB, {}: the counters say {} records are stored, a scan of the tree found {}",
                    mb(cap),
                    if mode == Mode::Evict { "evict" } else { "ack" },
                    c.records,
                    c.scanned
                );
                println!("!! {m}");
                mismatches.push(m);
            }
            let end = c.end_apparent.max(c.end_allocated) as f64;
            let high = c.high_apparent.max(c.high_allocated) as f64;
            worst = worst.max(high / cap as f64);
            println!(
                "{:<5} {:>8} {:>9} {:>6.1} {:>8} {:>9} | {:>8} {:>8} {:>8} | {:>8} {:>8} {:>8} | {:>6.2}x {:>6.2}x {:>7.2}x",
                if mode == Mode::Evict { "evict" } else { "ack" },
                mb(cap),
                mb(c.churned),
                c.elapsed.as_secs_f64(),
                mb(c.live),
                c.evicted,
                mb(c.high_apparent),
                mb(c.end_apparent),
                mb(c.reopened_apparent),
                mb(c.high_allocated),
                mb(c.end_allocated),
                mb(c.reopened_allocated),
                end / cap as f64,
                high / cap as f64,
                end / c.live.max(1) as f64,
            );
        }
    }
    println!();
    println!(
        "worst high-water disk use: {worst:.2}x max_bytes (target <= 3x, the free space the shipped config asks for: {})",
        verdict(worst <= 3.0)
    );
    println!(
        "columns: live = bytes the spool holds by its own accounting; evicted = records dropped \
         by drop_oldest; high/end/reopen = apparent size (file lengths) at the high-water mark, \
         after the final flush, after close + reopen; 'al' = the same, allocated blocks; ratios \
         use the larger of apparent and allocated"
    );
    if !mismatches.is_empty() {
        eprintln!(
            "spool_churn: FAILED: the spool's counters disagree with a scan of its tree:\n{}",
            mismatches.join("\n")
        );
        std::process::exit(1);
    }
}
