//! Fuzzes what ferry does with the bytes of an incoming command: `request::decode`, the id
//! sniffing used for oversize, busy and retained refusals, and the canonical form a signature
//! covers. Generated inputs: arbitrary bytes, JSON values of any shape, and requests with
//! random fields, each possibly mutated byte-wise. A panic fails the run.
//!
//! `cargo bench --bench fuzz_commands` runs 1,000,000 inputs (`FUZZ_CASES` to change;
//! `--profile dev` reuses a debug build). `tests/fuzz_commands.rs` runs a short version of the
//! same generators ([`fuzz`]) as part of the tests.

use ferry::commands::request::{canonical, decode, sniff_id};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use serde_json::{Value, json};

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>().prop_map(|f| json!(f)),
        ".{0,12}".prop_map(Value::String),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(".{0,6}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn request() -> impl Strategy<Value = Vec<u8>> {
    let key = prop_oneof![
        Just("id"),
        Just("name"),
        Just("args"),
        Just("expires_at"),
        Just("sig"),
        Just("other")
    ];
    prop::collection::vec((key, json_value()), 0..6).prop_map(|fields| {
        let mut m = serde_json::Map::new();
        for (k, v) in fields {
            m.insert(k.to_string(), v);
        }
        Value::Object(m).to_string().into_bytes()
    })
}

fn input() -> impl Strategy<Value = Vec<u8>> {
    let base = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..256),
        json_value().prop_map(|v| v.to_string().into_bytes()),
        request(),
        Just(br#"{"id":"a","name":"ping","sig":{"kid":"k","hmac":"00"}}"#.to_vec()),
    ];
    (
        base,
        prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
    )
        .prop_map(|(mut bytes, flips)| {
            for (at, b) in flips {
                if !bytes.is_empty() {
                    let i = at % bytes.len();
                    bytes[i] = b;
                }
            }
            bytes
        })
}

/// Runs `cases` generated inputs through the command parser; panics on a failure. Returns the
/// share of a 10,000-input sample that decodes as a request, so a strategy that never reaches
/// the deep checks shows up.
pub fn fuzz(cases: u32) -> f64 {
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    let result = runner.run(&input(), |bytes| {
        let _ = sniff_id(&bytes);
        if let Ok(r) = decode(&bytes) {
            let _ = canonical(&r);
        }
        Ok(())
    });
    if let Err(e) = result {
        panic!("fuzz failure: {e}");
    }
    let decoded = std::cell::Cell::new(0u64);
    let mut sample = TestRunner::new(Config {
        cases: 10_000,
        failure_persistence: None,
        ..Config::default()
    });
    let _ = sample.run(&input(), |bytes| {
        if decode(&bytes).is_ok() {
            decoded.set(decoded.get() + 1);
        }
        Ok(())
    });
    decoded.get() as f64 / 10_000.0
}

#[allow(dead_code)] // The tests include this file for `fuzz` only.
fn main() {
    let cases: u32 = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1_000_000);
    let started = std::time::Instant::now();
    let decoded = fuzz(cases);
    println!(
        "fuzz_commands: {cases} inputs without a panic in {:.1} s; {:.1}% of a 10,000 sample decode as requests",
        started.elapsed().as_secs_f64(),
        decoded * 100.0
    );
}
