//! Decoding the row JSON message of [`super::payload`] back into records.
//!
//! JSON numbers do not say which integer type they came from: a non-negative integer decodes
//! as `U64`, a negative one as `I64`, anything with a fraction or exponent as `F64`; `null`
//! (how the encoder sends NaN and infinities) decodes as NaN.

use super::{Message, WireError};
use crate::record::{Body, ClockState, Record, Value};
use serde::Deserialize;

#[derive(Deserialize)]
struct RawMessage {
    v: u64,
    device: String,
    boot: String,
    stream: String,
    records: Vec<RawRecord>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecord {
    seq: u64,
    ts: u64,
    #[serde(default)]
    clock: Option<String>,
    #[serde(default)]
    fields: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    line: Option<String>,
}

pub fn decode(body: &[u8]) -> Result<Message, WireError> {
    let raw: RawMessage =
        serde_json::from_slice(body).map_err(|e| WireError::Json(e.to_string()))?;
    if raw.v != 1 {
        return Err(WireError::Layout(format!(
            "JSON message version {}, expected 1",
            raw.v
        )));
    }
    let records = raw
        .records
        .into_iter()
        .map(record)
        .collect::<Result<_, _>>()?;
    Ok(Message {
        device: raw.device,
        boot: raw.boot,
        stream: raw.stream,
        records,
    })
}

fn record(r: RawRecord) -> Result<Record, WireError> {
    let clock = match r.clock.as_deref() {
        None => ClockState::Synced,
        Some("unsynced") => ClockState::Unsynced {
            boot: 0,
            uptime_ms: 0,
        },
        Some("corrected") => ClockState::Corrected,
        Some(other) => {
            return Err(WireError::Layout(format!("clock {other:?}")));
        }
    };
    let body = match (r.fields, r.line) {
        (Some(fields), None) => Body::Fields(
            fields
                .into_iter()
                .map(|(k, v)| Ok((k, value(v)?)))
                .collect::<Result<_, WireError>>()?,
        ),
        (None, Some(line)) => Body::Line(line),
        _ => {
            return Err(WireError::Layout(format!(
                "record {} must have exactly one of fields and line",
                r.seq
            )));
        }
    };
    Ok(Record {
        seq: r.seq,
        ts_ms: r.ts,
        clock,
        body,
    })
}

fn value(v: serde_json::Value) -> Result<Value, WireError> {
    use serde_json::Value as J;
    Ok(match v {
        J::Null => Value::F64(f64::NAN),
        J::Bool(b) => Value::Bool(b),
        J::String(s) => Value::Str(s),
        J::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::U64(u)
            } else if let Some(i) = n.as_i64() {
                Value::I64(i)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        J::Array(_) | J::Object(_) => {
            return Err(WireError::Layout(
                "a field value is an array or object".into(),
            ));
        }
    })
}
