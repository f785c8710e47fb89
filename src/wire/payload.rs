//! The JSON message a batch is sent as; readable with `mosquitto_sub`.
//!
//! ```json
//! {"v":1,"device":"gw-01","boot":"9f3c...","stream":"system",
//!  "records":[{"seq":41,"ts":1764100000000,"fields":{"cpu.total_pct":3.2}},
//!             {"seq":42,"ts":1764100001000,"line":"raw text"}]}
//! ```
//!
//! `seq` is per stream and never reused; with `device` and `stream` it identifies a record, so
//! a consumer drops duplicates by (device, stream, seq) and sees a gap as a missing seq. `boot`
//! changes at every start of the agent.

use crate::record::ChunkData;
use crate::record::{Body, ClockState, Record, Value};
use serde::ser::{Serialize, SerializeMap, Serializer};

pub const FORMAT_VERSION: u8 = 1;

/// Identity carried by every message.
#[derive(Debug, Clone)]
pub struct Origin {
    pub device: String,
    pub boot: String,
}

struct FieldsRef<'a>(&'a [(String, Value)]);

impl Serialize for FieldsRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(Some(self.0.len()))?;
        for (k, v) in self.0 {
            match v {
                Value::I64(x) => m.serialize_entry(k, x)?,
                Value::U64(x) => m.serialize_entry(k, x)?,
                // JSON has no NaN or infinity; null says "no value".
                Value::F64(x) if !x.is_finite() => m.serialize_entry(k, &())?,
                Value::F64(x) => m.serialize_entry(k, x)?,
                Value::Bool(x) => m.serialize_entry(k, x)?,
                Value::Str(x) => m.serialize_entry(k, x)?,
            }
        }
        m.end()
    }
}

struct RecordRef<'a>(&'a Record);

impl Serialize for RecordRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let r = self.0;
        let mut m = s.serialize_map(None)?;
        m.serialize_entry("seq", &r.seq)?;
        m.serialize_entry("ts", &r.ts_ms)?;
        // Only a doubtful timestamp costs bytes.
        match r.clock {
            ClockState::Synced => {}
            ClockState::Unsynced { .. } => m.serialize_entry("clock", "unsynced")?,
            ClockState::Corrected => m.serialize_entry("clock", "corrected")?,
        }
        match &r.body {
            Body::Fields(f) => m.serialize_entry("fields", &FieldsRef(f))?,
            Body::Line(l) => m.serialize_entry("line", l)?,
        }
        m.end()
    }
}

/// One record as a JSON line for `ferry spool export`: `{"stream","seq","ts","fields"|"line"}`.
pub fn export_line(stream: &str, record: &Record) -> String {
    record_value(stream, record).to_string()
}

/// One record as the JSON object of [`export_line`].
pub fn record_value(stream: &str, record: &Record) -> serde_json::Value {
    let mut v = serde_json::to_value(RecordRef(record)).expect("a record serializes");
    if let Some(o) = v.as_object_mut() {
        o.insert("stream".into(), stream.into());
    }
    v
}

/// Encodes the leading chunks of a batch that fit in `max_bytes` (always at least one).
/// Returns the payload and how many chunks it holds.
pub fn encode(
    origin: &Origin,
    stream: &str,
    chunks: &[ChunkData],
    max_bytes: usize,
) -> (Vec<u8>, usize) {
    let mut out = Vec::with_capacity(max_bytes.min(64 << 10));
    out.extend_from_slice(format!("{{\"v\":{FORMAT_VERSION},\"device\":").as_bytes());
    write_json(&mut out, &origin.device);
    out.extend_from_slice(b",\"boot\":");
    write_json(&mut out, &origin.boot);
    out.extend_from_slice(b",\"stream\":");
    write_json(&mut out, &stream);
    out.extend_from_slice(b",\"records\":[");
    let mut used = 0;
    let mut first = true;
    for chunk in chunks {
        let mark = out.len();
        for r in &chunk.records {
            if !first {
                out.push(b',');
            }
            first = false;
            write_json(&mut out, &RecordRef(r));
        }
        if used > 0 && out.len() + 2 > max_bytes {
            out.truncate(mark);
            break;
        }
        used += 1;
    }
    out.extend_from_slice(b"]}");
    (out, used)
}

/// A command reply (a record of the `commands` stream, whose line is the reply object) as the
/// message published on the replies topic: the reply with `seq`, `device` and `boot` added.
pub fn encode_reply(origin: &Origin, record: &Record) -> Vec<u8> {
    let mut reply = match &record.body {
        Body::Line(l) => serde_json::from_str::<serde_json::Value>(l)
            .unwrap_or_else(|_| serde_json::json!({ "raw": l })),
        Body::Fields(_) => serde_json::json!({}),
    };
    if let Some(obj) = reply.as_object_mut() {
        obj.insert("seq".into(), record.seq.into());
        obj.insert("device".into(), origin.device.clone().into());
        obj.insert("boot".into(), origin.boot.clone().into());
    }
    reply.to_string().into_bytes()
}

fn write_json<T: Serialize + ?Sized>(out: &mut Vec<u8>, v: &T) {
    serde_json::to_writer(&mut *out, v).expect("serializing to a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(first_seq: u64, n: u64) -> ChunkData {
        ChunkData {
            chunk_id: first_seq,
            committed_ms: 0,
            stored_bytes: 0,
            records: (0..n)
                .map(|i| Record {
                    seq: first_seq + i,
                    ts_ms: 1000 + i,
                    clock: ClockState::Synced,
                    body: Body::Fields(vec![
                        ("x".into(), Value::F64(1.5)),
                        ("nan".into(), Value::F64(f64::NAN)),
                    ]),
                })
                .collect(),
        }
    }

    fn origin() -> Origin {
        Origin {
            device: "gw".into(),
            boot: "b1".into(),
        }
    }

    #[test]
    fn encodes_valid_json_with_seq_and_ts() {
        let (p, used) = encode(&origin(), "system", &[chunk(1, 2), chunk(3, 1)], 1 << 20);
        assert_eq!(used, 2);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["device"], "gw");
        assert_eq!(v["stream"], "system");
        let seqs: Vec<u64> = v["records"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["seq"].as_u64().unwrap())
            .collect();
        assert_eq!(seqs, vec![1, 2, 3]);
        assert_eq!(v["records"][0]["fields"]["x"], 1.5);
        assert!(v["records"][0]["fields"]["nan"].is_null());
    }

    #[test]
    fn stops_before_the_chunk_that_does_not_fit_but_keeps_one() {
        let (p, used) = encode(&origin(), "s", &[chunk(1, 10), chunk(11, 10)], 300);
        assert_eq!(used, 1);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["records"].as_array().unwrap().len(), 10);
    }

    #[test]
    fn line_records() {
        let c = ChunkData {
            chunk_id: 0,
            committed_ms: 0,
            stored_bytes: 0,
            records: vec![Record {
                seq: 5,
                ts_ms: 1,
                clock: ClockState::Corrected,
                body: Body::Line("a \"quoted\" line".into()),
            }],
        };
        let (p, _) = encode(&origin(), "file.x", &[c], 1 << 20);
        let v: serde_json::Value = serde_json::from_slice(&p).unwrap();
        assert_eq!(v["records"][0]["line"], "a \"quoted\" line");
    }
}
