//! The CBOR columnar batch: field names once per message, values grouped by field, integers
//! and timestamps as deltas, so repeated names and slowly changing values cost little (and
//! compress well under zstd).
//!
//! One CBOR map with short text keys (docs/WIRE.md is the normative description):
//!
//! | key | value |
//! |---|---|
//! | `v` | 2 (layout version) |
//! | `d`, `b`, `s` | device, boot id, stream |
//! | `n` | number of records |
//! | `q` | seq of the first record |
//! | `dq` | only when seqs are not consecutive: n-1 differences to the previous seq |
//! | `t` | timestamp of the first record, ms since the Unix epoch |
//! | `dt` | n-1 signed differences to the previous timestamp |
//! | `c` | only when some record's clock is not synced: n codes, 0 synced, 1 unsynced, 2 corrected |
//! | `l` | only when some record is a line: n items, the line or null |
//! | `f` | columns: `[name, kind, values]`, values an array of n items, null where absent |
//!
//! Column kinds: `u` unsigned and `i` signed integers, each item the difference to the
//! column's previous present value (the first to 0); `f` float (CBOR's shortest exact width);
//! `b` bool; `s` text. A record is a line when `l` holds a string for it, else it has the
//! fields whose columns are not null for it, in column order.

use super::WireError;
use super::payload::Origin;
use crate::record::ChunkData;
use crate::record::{Body, ClockState, Record, Value};
use ciborium::value::{Integer, Value as Cbor};
use std::collections::HashMap;

pub const LAYOUT_VERSION: u8 = 2;
/// Most records the decoder accepts in one message.
const MAX_RECORDS: usize = 1 << 20;

/// Encodes the leading chunks that fit in `max_bytes` (always at least one); returns the
/// payload (without the header byte) and how many chunks it holds.
pub fn encode(
    origin: &Origin,
    stream: &str,
    chunks: &[ChunkData],
    max_bytes: usize,
) -> (Vec<u8>, usize) {
    let mut used = chunks.len();
    loop {
        let records: Vec<&Record> = chunks[..used].iter().flat_map(|c| &c.records).collect();
        let out = encode_records(origin, stream, &records);
        if out.len() <= max_bytes || used <= 1 {
            return (out, used);
        }
        // Shrink in proportion to the overshoot, at least by one chunk.
        let fit = (used as u128 * max_bytes as u128 / out.len() as u128) as usize;
        used = fit.clamp(1, used - 1);
    }
}

fn text(s: &str) -> Cbor {
    Cbor::Text(s.to_string())
}

fn int(v: i128) -> Cbor {
    // Deltas of u64 or i64 values always fit CBOR's integer range (-2^64 ..= 2^64-1).
    Cbor::Integer(Integer::try_from(v).unwrap_or_else(|_| Integer::from(0u8)))
}

/// A column: one field name and kind.
struct Column<'a> {
    name: &'a str,
    kind: Kind,
    values: Vec<Option<&'a Value>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    U,
    I,
    F,
    B,
    S,
}

impl Kind {
    fn of(v: &Value) -> Kind {
        match v {
            Value::U64(_) => Kind::U,
            Value::I64(_) => Kind::I,
            Value::F64(_) => Kind::F,
            Value::Bool(_) => Kind::B,
            Value::Str(_) => Kind::S,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Kind::U => "u",
            Kind::I => "i",
            Kind::F => "f",
            Kind::B => "b",
            Kind::S => "s",
        }
    }

    fn parse(code: &str) -> Option<Kind> {
        Some(match code {
            "u" => Kind::U,
            "i" => Kind::I,
            "f" => Kind::F,
            "b" => Kind::B,
            "s" => Kind::S,
            _ => return None,
        })
    }
}

fn encode_records(origin: &Origin, stream: &str, records: &[&Record]) -> Vec<u8> {
    let n = records.len();
    let mut map: Vec<(Cbor, Cbor)> = vec![
        (text("v"), int(LAYOUT_VERSION.into())),
        (text("d"), text(&origin.device)),
        (text("b"), text(&origin.boot)),
        (text("s"), text(stream)),
        (text("n"), int(n as i128)),
    ];
    let first = records.first();
    map.push((text("q"), int(first.map_or(0, |r| r.seq).into())));
    let consecutive = records
        .windows(2)
        .all(|w| w[1].seq == w[0].seq.wrapping_add(1));
    if !consecutive {
        let d = records
            .windows(2)
            .map(|w| int(w[1].seq as i128 - w[0].seq as i128))
            .collect();
        map.push((text("dq"), Cbor::Array(d)));
    }
    map.push((text("t"), int(first.map_or(0, |r| r.ts_ms).into())));
    let dt = records
        .windows(2)
        .map(|w| int(w[1].ts_ms as i128 - w[0].ts_ms as i128))
        .collect();
    map.push((text("dt"), Cbor::Array(dt)));
    if records.iter().any(|r| r.clock != ClockState::Synced) {
        let c = records
            .iter()
            .map(|r| {
                int(match r.clock {
                    ClockState::Synced => 0,
                    ClockState::Unsynced { .. } => 1,
                    ClockState::Corrected => 2,
                })
            })
            .collect();
        map.push((text("c"), Cbor::Array(c)));
    }
    if records.iter().any(|r| matches!(r.body, Body::Line(_))) {
        let l = records
            .iter()
            .map(|r| match &r.body {
                Body::Line(l) => text(l),
                Body::Fields(_) => Cbor::Null,
            })
            .collect();
        map.push((text("l"), Cbor::Array(l)));
    }
    map.push((text("f"), Cbor::Array(columns(records))));
    let mut out = Vec::new();
    ciborium::into_writer(&Cbor::Map(map), &mut out).expect("writing CBOR to a Vec cannot fail");
    out
}

fn columns(records: &[&Record]) -> Vec<Cbor> {
    let n = records.len();
    let mut columns: Vec<Column> = Vec::new();
    // (name, kind) -> its columns; a record with the same name twice uses a second column.
    let mut index: HashMap<(&str, Kind), Vec<usize>> = HashMap::new();
    for (i, r) in records.iter().enumerate() {
        let Body::Fields(fields) = &r.body else {
            continue;
        };
        for (name, value) in fields {
            let kind = Kind::of(value);
            let slots = index.entry((name.as_str(), kind)).or_default();
            let free = slots
                .iter()
                .copied()
                .find(|&c| columns[c].values[i].is_none());
            let c = free.unwrap_or_else(|| {
                columns.push(Column {
                    name,
                    kind,
                    values: vec![None; n],
                });
                slots.push(columns.len() - 1);
                columns.len() - 1
            });
            columns[c].values[i] = Some(value);
        }
    }
    columns
        .into_iter()
        .map(|c| {
            let mut prev: i128 = 0;
            let values = c
                .values
                .iter()
                .map(|v| match v {
                    None => Cbor::Null,
                    Some(Value::U64(x)) => delta(&mut prev, *x as i128),
                    Some(Value::I64(x)) => delta(&mut prev, *x as i128),
                    Some(Value::F64(x)) => Cbor::Float(*x),
                    Some(Value::Bool(x)) => Cbor::Bool(*x),
                    Some(Value::Str(x)) => text(x),
                })
                .collect();
            Cbor::Array(vec![text(c.name), text(c.kind.code()), Cbor::Array(values)])
        })
        .collect()
}

fn delta(prev: &mut i128, x: i128) -> Cbor {
    let d = x - *prev;
    *prev = x;
    int(d)
}

/// Decodes a columnar message (after the header byte and decompression).
pub fn decode(body: &[u8]) -> Result<super::Message, WireError> {
    let value: Cbor = ciborium::from_reader(body).map_err(|e| WireError::Cbor(e.to_string()))?;
    let Cbor::Map(entries) = value else {
        return Err(bad("the message is not a CBOR map"));
    };
    let get = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k.as_text() == Some(key))
            .map(|(_, v)| v)
    };
    let need = |key: &str| get(key).ok_or_else(|| bad(format!("no `{key}`")));
    let version = as_u64(need("v")?, "v")?;
    if version != LAYOUT_VERSION as u64 {
        return Err(bad(format!("layout version {version}, expected 2")));
    }
    let string = |key: &str| -> Result<String, WireError> {
        need(key)?
            .as_text()
            .map(str::to_string)
            .ok_or_else(|| bad(format!("`{key}` is not text")))
    };
    let (device, boot, stream) = (string("d")?, string("b")?, string("s")?);
    let n = as_u64(need("n")?, "n")? as usize;
    if n > MAX_RECORDS {
        return Err(bad(format!("{n} records, more than {MAX_RECORDS}")));
    }
    let array = |key: &str, len: usize| -> Result<Option<&Vec<Cbor>>, WireError> {
        match get(key) {
            None => Ok(None),
            Some(Cbor::Array(a)) if a.len() == len => Ok(Some(a)),
            Some(_) => Err(bad(format!("`{key}` is not an array of {len} items"))),
        }
    };
    let minus_one = n.saturating_sub(1);

    let mut seqs = Vec::with_capacity(n);
    let mut seq = as_u64(need("q")?, "q")? as i128;
    let dq = array("dq", minus_one)?;
    let mut ts = as_u64(need("t")?, "t")? as i128;
    let dt = array("dt", minus_one)?.ok_or_else(|| bad("no `dt` of n-1 items"))?;
    let mut stamps = Vec::with_capacity(n);
    for i in 0..n {
        if i > 0 {
            seq += dq.map_or(Ok(1), |d| as_i128(&d[i - 1], "dq"))?;
            ts += as_i128(&dt[i - 1], "dt")?;
        }
        seqs.push(u64::try_from(seq).map_err(|_| bad("seq out of range"))?);
        stamps.push(u64::try_from(ts).map_err(|_| bad("ts out of range"))?);
    }
    let clocks = match array("c", n)? {
        None => vec![ClockState::Synced; n],
        Some(c) => c
            .iter()
            .map(|v| match as_u64(v, "c")? {
                0 => Ok(ClockState::Synced),
                1 => Ok(ClockState::Unsynced {
                    boot: 0,
                    uptime_ms: 0,
                }),
                2 => Ok(ClockState::Corrected),
                x => Err(bad(format!("clock code {x}"))),
            })
            .collect::<Result<_, _>>()?,
    };
    let mut bodies: Vec<Body> = match array("l", n)? {
        None => vec![Body::Fields(Vec::new()); n],
        Some(l) => l
            .iter()
            .map(|v| match v {
                Cbor::Null => Ok(Body::Fields(Vec::new())),
                Cbor::Text(t) => Ok(Body::Line(t.clone())),
                _ => Err(bad("`l` items must be text or null")),
            })
            .collect::<Result<_, _>>()?,
    };
    let Some(Cbor::Array(columns)) = get("f") else {
        return Err(bad("no `f` array"));
    };
    for column in columns {
        let Cbor::Array(parts) = column else {
            return Err(bad("a column is not an array"));
        };
        let [Cbor::Text(name), Cbor::Text(kind), Cbor::Array(values)] = parts.as_slice() else {
            return Err(bad("a column is not [name, kind, values]"));
        };
        let kind = Kind::parse(kind).ok_or_else(|| bad(format!("column kind {kind:?}")))?;
        if values.len() != n {
            return Err(bad(format!(
                "column {name:?} has {} items, not {n}",
                values.len()
            )));
        }
        let mut prev: i128 = 0;
        for (i, v) in values.iter().enumerate() {
            if v.is_null() {
                continue;
            }
            let value = match kind {
                Kind::U => {
                    prev += as_i128(v, name)?;
                    Value::U64(u64::try_from(prev).map_err(|_| bad("u value out of range"))?)
                }
                Kind::I => {
                    prev += as_i128(v, name)?;
                    Value::I64(i64::try_from(prev).map_err(|_| bad("i value out of range"))?)
                }
                Kind::F => Value::F64(match v {
                    Cbor::Float(f) => *f,
                    Cbor::Integer(x) => i128::from(*x) as f64,
                    _ => return Err(bad(format!("column {name:?}: not a number"))),
                }),
                Kind::B => Value::Bool(v.as_bool().ok_or_else(|| bad("not a bool"))?),
                Kind::S => Value::Str(v.as_text().ok_or_else(|| bad("not text"))?.to_string()),
            };
            match &mut bodies[i] {
                Body::Fields(f) => f.push((name.clone(), value)),
                Body::Line(_) => return Err(bad(format!("record {i} is a line and has fields"))),
            }
        }
    }
    let records = (0..n)
        .zip(bodies)
        .map(|(i, body)| Record {
            seq: seqs[i],
            ts_ms: stamps[i],
            clock: clocks[i],
            body,
        })
        .collect();
    Ok(super::Message {
        device,
        boot,
        stream,
        records,
    })
}

fn bad(message: impl Into<String>) -> WireError {
    WireError::Layout(message.into())
}

fn as_i128(v: &Cbor, key: &str) -> Result<i128, WireError> {
    match v {
        Cbor::Integer(x) => Ok(i128::from(*x)),
        _ => Err(bad(format!("`{key}`: expected an integer"))),
    }
}

fn as_u64(v: &Cbor, key: &str) -> Result<u64, WireError> {
    u64::try_from(as_i128(v, key)?).map_err(|_| bad(format!("`{key}` out of range")))
}
