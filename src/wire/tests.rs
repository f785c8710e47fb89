use super::*;
use crate::record::{Body, ClockState, Record, Value};
use proptest::prelude::*;

fn origin() -> Origin {
    Origin {
        device: "gw-7".into(),
        boot: "b00t".into(),
    }
}

fn formats() -> Vec<Format> {
    let mut all = Vec::new();
    for encoding in [Encoding::Json, Encoding::Cbor] {
        for compression in [Compression::None, Compression::Zstd { level: 3 }] {
            all.push(Format {
                encoding,
                compression,
            });
        }
    }
    all
}

/// What an encoding is able to carry (see the module invariants), with fields sorted by name.
fn carried(r: &Record, encoding: Encoding) -> Record {
    let clock = match r.clock {
        ClockState::Unsynced { .. } => ClockState::Unsynced {
            boot: 0,
            uptime_ms: 0,
        },
        c => c,
    };
    let body = match &r.body {
        Body::Line(l) => Body::Line(l.clone()),
        Body::Fields(f) => {
            let mut f: Vec<(String, Value)> = f
                .iter()
                .map(|(k, v)| {
                    let v = match (encoding, v) {
                        (Encoding::Json, Value::I64(x)) if *x >= 0 => Value::U64(*x as u64),
                        (Encoding::Json, Value::F64(x)) if !x.is_finite() => Value::F64(f64::NAN),
                        _ => v.clone(),
                    };
                    (k.clone(), v)
                })
                .collect();
            f.sort_by(|a, b| a.0.cmp(&b.0));
            Body::Fields(f)
        }
    };
    Record {
        seq: r.seq,
        ts_ms: r.ts_ms,
        clock,
        body,
    }
}

/// Equality that takes NaN as equal to NaN (and compares floats by bits otherwise).
fn same(a: &Record, b: &Record) -> bool {
    let values_equal = |x: &Value, y: &Value| match (x, y) {
        (Value::F64(p), Value::F64(q)) => (p.is_nan() && q.is_nan()) || p.to_bits() == q.to_bits(),
        _ => x == y,
    };
    a.seq == b.seq
        && a.ts_ms == b.ts_ms
        && a.clock == b.clock
        && match (&a.body, &b.body) {
            (Body::Line(x), Body::Line(y)) => x == y,
            (Body::Fields(x), Body::Fields(y)) => {
                x.len() == y.len()
                    && x.iter()
                        .zip(y)
                        .all(|(p, q)| p.0 == q.0 && values_equal(&p.1, &q.1))
            }
            _ => false,
        }
}

fn chunks_of(records: &[Record], per_chunk: usize) -> Vec<ChunkData> {
    records
        .chunks(per_chunk.max(1))
        .enumerate()
        .map(|(i, rs)| ChunkData {
            chunk_id: i as u64 + 1,
            committed_ms: 0,
            stored_bytes: 0,
            records: rs.to_vec(),
        })
        .collect()
}

fn value_strategy() -> impl Strategy<Value = Value> {
    prop_oneof![
        any::<i64>().prop_map(Value::I64),
        any::<u64>().prop_map(Value::U64),
        any::<f64>().prop_map(Value::F64),
        (-1e6f64..1e6).prop_map(Value::F64),
        any::<bool>().prop_map(Value::Bool),
        ".{0,12}".prop_map(Value::Str),
    ]
}

fn body_strategy() -> impl Strategy<Value = Body> {
    prop_oneof![
        4 => prop::collection::btree_map("[a-z.]{1,6}", value_strategy(), 0..6)
            .prop_map(|m| Body::Fields(m.into_iter().collect())),
        1 => ".{0,40}".prop_map(Body::Line),
    ]
}

fn clock_strategy() -> impl Strategy<Value = ClockState> {
    prop_oneof![
        6 => Just(ClockState::Synced),
        1 => (any::<u32>(), any::<u64>())
            .prop_map(|(boot, uptime_ms)| ClockState::Unsynced { boot, uptime_ms }),
        1 => Just(ClockState::Corrected),
    ]
}

fn records_strategy() -> impl Strategy<Value = Vec<Record>> {
    (
        any::<u64>(),
        prop::collection::vec(
            (1u64..4, any::<u32>(), clock_strategy(), body_strategy()),
            1..40,
        ),
    )
        .prop_map(|(start, items)| {
            let mut seq = start % (u64::MAX / 2);
            items
                .into_iter()
                .map(|(gap, ts, clock, body)| {
                    seq += gap;
                    Record {
                        seq,
                        ts_ms: ts as u64 * 1000,
                        clock,
                        body,
                    }
                })
                .collect()
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn every_format_round_trips(records in records_strategy(), per_chunk in 1usize..8) {
        let chunks = chunks_of(&records, per_chunk);
        for format in formats() {
            let (payload, used) = encode(format, &origin(), "s.x", &chunks, 1 << 24);
            prop_assert_eq!(used, chunks.len());
            let message = decode(&payload).map_err(|e| TestCaseError::fail(format!("{}: {e}", format.name())))?;
            prop_assert_eq!(&message.device, "gw-7");
            prop_assert_eq!(&message.boot, "b00t");
            prop_assert_eq!(&message.stream, "s.x");
            prop_assert_eq!(message.records.len(), records.len());
            for (got, sent) in message.records.iter().zip(&records) {
                let want = carried(sent, format.encoding);
                let got = carried(got, format.encoding);
                prop_assert!(same(&got, &want), "{}: got {:?}, sent {:?}", format.name(), got, want);
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300), first in prop::sample::select(vec![b'{', 0x80, 0x81, 0x84, 0x85, 0x00, 0xff])) {
        let mut payload = vec![first];
        payload.extend(bytes);
        let _ = decode(&payload);
    }
}

fn sample_records(n: u64) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            seq: 100 + i,
            ts_ms: 1_764_100_000_000 + i * 1000,
            clock: ClockState::Synced,
            body: Body::Fields(vec![
                ("cpu.total_pct".into(), Value::F64(3.5 + (i % 3) as f64)),
                ("mem.used_bytes".into(), Value::U64(812_000_000 + i * 4096)),
                ("host".into(), Value::Str("gw".into())),
            ]),
        })
        .collect()
}

#[test]
fn header_byte_says_the_format() {
    let chunks = chunks_of(&sample_records(50), 10);
    let first = |f: Format| encode(f, &origin(), "system", &chunks, 1 << 20).0[0];
    assert_eq!(first(Format::JSON), b'{');
    let cbor = Format {
        encoding: Encoding::Cbor,
        compression: Compression::None,
    };
    assert_eq!(first(cbor), 0x81);
    let zstd = Compression::Zstd { level: 3 };
    assert_eq!(
        first(Format {
            encoding: Encoding::Cbor,
            compression: zstd
        }),
        0x85
    );
    assert_eq!(
        first(Format {
            encoding: Encoding::Json,
            compression: zstd
        }),
        0x84
    );
}

#[test]
fn cbor_is_smaller_than_json_and_zstd_smaller_still() {
    let chunks = chunks_of(&sample_records(60), 60);
    let size = |f: Format| encode(f, &origin(), "system", &chunks, 1 << 20).0.len();
    let json = size(Format::JSON);
    let cbor = size(Format {
        encoding: Encoding::Cbor,
        compression: Compression::None,
    });
    let cbor_zstd = size(Format {
        encoding: Encoding::Cbor,
        compression: Compression::Zstd { level: 3 },
    });
    assert!(cbor * 3 < json, "cbor {cbor} vs json {json}");
    assert!(cbor_zstd < cbor, "cbor+zstd {cbor_zstd} vs cbor {cbor}");
}

#[test]
fn incompressible_payload_is_sent_uncompressed() {
    // One short record: zstd's frame costs more than it saves.
    let chunks = chunks_of(&sample_records(1)[..1], 1);
    let format = Format {
        encoding: Encoding::Cbor,
        compression: Compression::Zstd { level: 19 },
    };
    let (payload, _) = encode(format, &origin(), "s", &chunks, 1 << 20);
    assert_eq!(payload[0], 0x81, "header says not compressed");
    assert_eq!(decode(&payload).unwrap().records.len(), 1);
}

#[test]
fn columnar_keeps_the_chunks_that_fit_and_always_one() {
    let chunks = chunks_of(&sample_records(100), 10);
    let format = Format {
        encoding: Encoding::Cbor,
        compression: Compression::None,
    };
    let (all, _) = encode(format, &origin(), "s", &chunks, 1 << 20);
    let (payload, used) = encode(format, &origin(), "s", &chunks, all.len() / 2);
    assert!((1..10).contains(&used), "used {used}");
    assert!(payload.len() <= all.len() / 2);
    let (_, one) = encode(format, &origin(), "s", &chunks, 10);
    assert_eq!(one, 1);
}

#[test]
fn zstd_bomb_is_refused() {
    let zeros = vec![0u8; (MAX_INFLATED + 1024) as usize];
    let mut payload = vec![0x85];
    payload.extend(zstd::bulk::compress(&zeros, 1).unwrap());
    assert!(matches!(decode(&payload), Err(WireError::TooLarge)));
}

#[test]
fn unknown_header_is_an_error() {
    for b in [0x00u8, 0x7f, 0x83, 0x8c, 0x90, 0xf0] {
        assert!(decode(&[b, 1, 2]).is_err(), "0x{b:02x}");
    }
    assert!(matches!(decode(&[]), Err(WireError::Empty)));
}

#[test]
fn publish_packet_size_counts_the_remaining_length_bytes() {
    // 2 + 5 + 2 + 118 = 127 remaining: one length byte.
    assert_eq!(publish_packet_bytes(5, 118), 1 + 1 + 127);
    assert_eq!(publish_packet_bytes(5, 119), 1 + 2 + 128);
    assert_eq!(publish_packet_bytes(10, 20_000), 1 + 3 + 20_014);
}
