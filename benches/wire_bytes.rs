//! Wire bytes per point over one hour of 1 Hz system metrics recorded from a real machine's
//! system collector (`benches/fixtures/system-1h.jsonl.zst`, see docs/PERFORMANCE.md for how
//! it was recorded), for each way ferry can send them.
//!
//! A *point* is one field value as sampled (so deadband, which sends fewer values, is charged
//! per sampled point too). Bytes are MQTT 3.1.1 PUBLISH packets (fixed header, topic, packet id,
//! payload: `ferry::wire::publish_packet_bytes`, the count tests/budget.rs checks against what
//! Mosquitto delivers) on the topic ferry uses, `ferry/<device>/data/system`. Payloads are made
//! by ferry's own encoders, in batches of the size a linger of N seconds gives at 1 Hz.
//!
//! Baseline: one JSON message per sample (the "seed" style). Every mode is printed as bytes
//! per point and as a ratio of the baseline, both from this run.

mod common;

use ferry::collectors::deadband::{Deadband, DeadbandConfig};
use ferry::record::ChunkData;
use ferry::record::{Body, ClockState, Reading, Record, Value};
use ferry::wire::payload::Origin;
use ferry::wire::{self, Compression, Encoding, Format};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/benches/fixtures/system-1h.jsonl.zst"
);
const TOPIC: &str = "ferry/gw-0001/data/system";
const TARGET_BYTES_PER_POINT: f64 = 10.0;

/// The recorded samples, in order, as synced records.
fn load() -> Vec<Record> {
    let file = std::fs::File::open(FIXTURE).expect("the fixture exists");
    let reader = BufReader::new(zstd::stream::read::Decoder::new(file).expect("zstd"));
    reader
        .lines()
        .map(|line| {
            let v: serde_json::Value = serde_json::from_str(&line.unwrap()).unwrap();
            let fields = v["fields"]
                .as_object()
                .unwrap()
                .iter()
                .map(|(k, x)| {
                    let value = if let Some(u) = x.as_u64() {
                        Value::U64(u)
                    } else if let Some(i) = x.as_i64() {
                        Value::I64(i)
                    } else if let Some(f) = x.as_f64() {
                        Value::F64(f)
                    } else if let Some(b) = x.as_bool() {
                        Value::Bool(b)
                    } else {
                        Value::Str(x.as_str().unwrap_or_default().to_string())
                    };
                    (k.clone(), value)
                })
                .collect();
            Record {
                seq: v["seq"].as_u64().unwrap(),
                ts_ms: v["ts"].as_u64().unwrap(),
                // The recording machine had no time sync marker; a deployed gateway has one.
                clock: ClockState::Synced,
                body: Body::Fields(fields),
            }
        })
        .collect()
}

fn points(records: &[Record]) -> usize {
    records
        .iter()
        .map(|r| match &r.body {
            Body::Fields(f) => f.len(),
            Body::Line(_) => 1,
        })
        .sum()
}

/// Packet bytes and message count when `records` go in batches of `batch` records.
fn wire_cost(records: &[Record], batch: usize, format: Format) -> (usize, usize) {
    let origin = Origin {
        device: "gw-0001".into(),
        boot: "5f0c7e2a9d3b4e61".into(),
    };
    let mut bytes = 0;
    let mut messages = 0;
    for group in records.chunks(batch) {
        let chunk = ChunkData {
            chunk_id: 1,
            committed_ms: 0,
            stored_bytes: 0,
            records: group.to_vec(),
        };
        let (payload, used) = wire::encode(format, &origin, "system", &[chunk], 1 << 24);
        assert_eq!(used, 1);
        // Every mode must give back what it was given.
        let decoded = wire::decode(&payload).expect("decodes");
        assert_eq!(decoded.records.len(), group.len());
        bytes += wire::publish_packet_bytes(TOPIC.len(), payload.len());
        messages += 1;
    }
    (bytes, messages)
}

/// Deadband thresholds for the system collector's fields, by what a field measures.
fn deadband_config(records: &[Record], heartbeat: u64) -> DeadbandConfig {
    let mut fields = BTreeMap::new();
    for r in records {
        if let Body::Fields(f) = &r.body {
            for (name, _) in f {
                let t = if name.ends_with("_pct") {
                    2.0 // percent points
                } else if name.starts_with("load.") {
                    0.1
                } else if name.ends_with("_bytes") && name.starts_with("net.") {
                    65_536.0 // counters since boot: 64 KiB of traffic
                } else if name.ends_with("_bytes") {
                    4_194_304.0 // memory, disk: 4 MiB
                } else if name.ends_with("_c") {
                    0.5 // degrees
                } else if name.starts_with("net.") {
                    100.0 // packet and error counters
                } else {
                    0.0 // e.g. uptime: sent on every change
                };
                fields.insert(name.clone(), t);
            }
        }
    }
    DeadbandConfig {
        default: None,
        fields,
        heartbeat,
    }
}

/// The records ferry would store with a deadband on the collector: suppressed fields left out,
/// fully suppressed samples never stored (so no seq used).
fn with_deadband(records: &[Record], config: &DeadbandConfig) -> Vec<Record> {
    let mut filter = Deadband::new(config);
    let mut seq = 0;
    records
        .iter()
        .filter_map(|r| {
            let reading = Reading {
                stream: "system".into(),
                ts_ms: r.ts_ms,
                body: r.body.clone(),
            };
            let kept = filter.apply(reading)?;
            seq += 1;
            Some(Record {
                seq,
                ts_ms: kept.ts_ms,
                clock: r.clock,
                body: kept.body,
            })
        })
        .collect()
}

/// The records with only the fields whose value changed at least once in the fixture: this
/// machine has idle interfaces whose counters stay 0 all hour, which compress to nothing and
/// would flatter every mode.
fn changing_fields_only(records: &[Record]) -> Vec<Record> {
    let mut first: BTreeMap<&str, &Value> = BTreeMap::new();
    let mut changing = std::collections::BTreeSet::new();
    for r in records {
        if let Body::Fields(f) = &r.body {
            for (name, v) in f {
                if *first.entry(name).or_insert(v) != v {
                    changing.insert(name.clone());
                }
            }
        }
    }
    records
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Body::Fields(f) = &mut r.body {
                f.retain(|(name, _)| changing.contains(name));
            }
            r
        })
        .collect()
}

fn main() {
    if common::skip_unless_cargo_bench("wire_bytes") {
        return;
    }
    let all = load();
    let varying = std::env::var("FERRY_BENCH_CHANGING_ONLY").is_ok_and(|v| v == "1");
    let records = if varying {
        println!("only the fields that change during the hour (FERRY_BENCH_CHANGING_ONLY=1)");
        changing_fields_only(&all)
    } else {
        all
    };
    let n_points = points(&records);
    let span_s = (records.last().unwrap().ts_ms - records[0].ts_ms) / 1000;
    println!(
        "fixture: {} samples over {} s, {} points ({:.1} fields per sample)",
        records.len(),
        span_s,
        n_points,
        n_points as f64 / records.len() as f64
    );
    let json = Format::JSON;
    let cbor = Format {
        encoding: Encoding::Cbor,
        compression: Compression::None,
    };
    let zstd = |level| Format {
        encoding: Encoding::Cbor,
        compression: Compression::Zstd { level },
    };
    let json_zstd = Format {
        encoding: Encoding::Json,
        compression: Compression::Zstd { level: 3 },
    };

    let (seed_bytes, seed_msgs) = wire_cost(&records, 1, json);
    let seed = seed_bytes as f64 / n_points as f64;
    println!(
        "\n{:<44} {:>9} {:>12} {:>9} {:>10}",
        "mode", "messages", "wire bytes", "B/point", "vs seed"
    );
    let row = |name: &str, (bytes, msgs): (usize, usize)| {
        let per_point = bytes as f64 / n_points as f64;
        println!(
            "{:<44} {:>9} {:>12} {:>9.2} {:>9.3}x",
            name,
            msgs,
            bytes,
            per_point,
            per_point / seed
        );
        per_point
    };
    row(
        "seed style: one JSON message per sample",
        (seed_bytes, seed_msgs),
    );
    let mut best = f64::MAX;
    for batch in [5usize, 60, 300] {
        println!("-- batches of {batch} samples (linger {batch} s at 1 Hz)");
        row(
            &format!("ferry json, batch {batch}"),
            wire_cost(&records, batch, json),
        );
        row(
            &format!("ferry json+zstd3, batch {batch}"),
            wire_cost(&records, batch, json_zstd),
        );
        row(
            &format!("ferry cbor, batch {batch}"),
            wire_cost(&records, batch, cbor),
        );
        for level in [3, 19] {
            let b = row(
                &format!("ferry cbor+zstd{level}, batch {batch}"),
                wire_cost(&records, batch, zstd(level)),
            );
            best = best.min(b);
        }
        for heartbeat in [60u64, 600] {
            let config = deadband_config(&records, heartbeat);
            let kept = with_deadband(&records, &config);
            let sent_points = points(&kept);
            let b = row(
                &format!("deadband (heartbeat {heartbeat}) + cbor+zstd3, batch {batch}"),
                wire_cost(&kept, batch, zstd(3)),
            );
            best = best.min(b);
            println!(
                "{:<44} {:>9} samples kept, {} of {} points sent ({:.1}%)",
                "",
                kept.len(),
                sent_points,
                n_points,
                100.0 * sent_points as f64 / n_points as f64
            );
        }
    }
    println!(
        "\nbest mode: {best:.2} B/point, target <= {TARGET_BYTES_PER_POINT}: {}",
        if best <= TARGET_BYTES_PER_POINT {
            "met"
        } else {
            "MISSED"
        }
    );
}
