//! What `ferry consume` prints: one line per record, gap or status message.
//!
//! **jsonl** (default): a record is the object `ferry decode` prints (`device`, `boot`,
//! `stream`, `seq`, `ts`, `clock`?, `fields` | `line`). A hole in the seqs is
//! `{"type":"loss"|"gap","device","stream","first_seq","last_seq","count","reason"?,"ts"}`
//! (`loss`: covered by the device's `ferry.loss` report, with its reason; `gap`: not covered).
//! A status message is `{"type":"status","device",...the status payload...}`.
//!
//! **influx**: InfluxDB line protocol, timestamps in ns. Measurement = stream; tags = `device`
//! plus the collector's tags (fields named `tag.<key>`); the system collector's dimensions
//! (`cpu.<n>.*`, `disk.<mount>.*`, `net.<iface>.*`, `temp.<sensor>.*`) become a tag of their
//! own on a line per instance (`system,device=gw,disk=root disk.used_bytes=..`). Integers get
//! the `i` suffix (`u` above i64's range), strings are quoted, NaN and infinities are left out
//! (line protocol cannot carry them), a raw line is the string field `line`. Holes go to the
//! measurement `ferry.gap` (tags device, stream, type, reason), status messages to
//! `ferry.status`.
//!
//! Invariant: every line is complete and ends in `\n`; values never contain a raw newline
//! (newlines inside strings become spaces in influx, JSON escapes them).

use super::gaps::GapEvent;
use crate::record::{Body, Record, Value};
use crate::wire::{self, Message};
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Format {
    #[default]
    Jsonl,
    Influx,
}

/// Field name prefix of a collector tag.
const TAG_PREFIX: &str = "tag.";
/// Field groups of the system collector whose middle part names an instance.
const DIMENSIONS: [&str; 4] = ["cpu", "disk", "net", "temp"];

/// Appends the line(s) of one record. Returns false if influx had no field to write.
pub fn record(format: Format, message: &Message, record: &Record, out: &mut String) -> bool {
    match format {
        Format::Jsonl => {
            out.push_str(&wire::json_line(message, record));
            out.push('\n');
            true
        }
        Format::Influx => influx_record(message, record, out),
    }
}

/// Appends the line of a hole report, stamped `now_ms`.
pub fn gap(format: Format, device: &str, g: &GapEvent, now_ms: u64, out: &mut String) {
    let kind = if g.reason.is_some() { "loss" } else { "gap" };
    match format {
        Format::Jsonl => {
            let mut v = serde_json::json!({
                "type": kind, "device": device, "stream": g.stream,
                "first_seq": g.first_seq, "last_seq": g.last_seq, "count": g.count(), "ts": now_ms,
            });
            if let Some(r) = &g.reason {
                v["reason"] = r.clone().into();
            }
            let _ = writeln!(out, "{v}");
        }
        Format::Influx => {
            let mut tags = vec![
                ("device".to_string(), device.to_string()),
                ("stream".to_string(), g.stream.clone()),
                ("type".to_string(), kind.to_string()),
            ];
            if let Some(r) = &g.reason {
                tags.push(("reason".into(), r.clone()));
            }
            let fields = [
                ("first_seq", Value::U64(g.first_seq)),
                ("last_seq", Value::U64(g.last_seq)),
                ("count", Value::U64(g.count())),
            ];
            let fields: Vec<(&str, &Value)> = fields.iter().map(|(k, v)| (*k, v)).collect();
            line("ferry.gap", &tags, &fields, now_ms, out);
        }
    }
}

/// Appends the line of a status message (`payload` as the device sent it).
pub fn status(format: Format, device: &str, payload: &[u8], now_ms: u64, out: &mut String) {
    let parsed: serde_json::Value = serde_json::from_slice(payload)
        .unwrap_or_else(|_| serde_json::json!({ "raw": String::from_utf8_lossy(payload) }));
    match format {
        Format::Jsonl => {
            let mut v = serde_json::json!({ "type": "status", "device": device });
            if let Some(o) = parsed.as_object() {
                for (k, val) in o {
                    v[k] = val.clone();
                }
            }
            let _ = writeln!(out, "{v}");
        }
        Format::Influx => {
            let fields: Vec<(String, Value)> = parsed
                .as_object()
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| json_value(v).map(|v| (k.clone(), v)))
                .collect();
            let fields: Vec<(&str, &Value)> = fields.iter().map(|(k, v)| (k.as_str(), v)).collect();
            let tags = [("device".to_string(), device.to_string())];
            line("ferry.status", &tags, &fields, now_ms, out);
        }
    }
}

fn json_value(v: &serde_json::Value) -> Option<Value> {
    match v {
        serde_json::Value::Bool(b) => Some(Value::Bool(*b)),
        serde_json::Value::Number(n) => n
            .as_i64()
            .map(Value::I64)
            .or_else(|| n.as_u64().map(Value::U64))
            .or_else(|| n.as_f64().map(Value::F64)),
        serde_json::Value::String(s) => Some(Value::Str(s.clone())),
        _ => None,
    }
}

/// A dimension group and instance, e.g. `("disk", "root")`.
type Instance<'a> = (&'a str, &'a str);
/// A field name and its value.
type Field<'a> = (&'a str, &'a Value);

fn influx_record(message: &Message, record: &Record, out: &mut String) -> bool {
    let mut tags = vec![("device".to_string(), message.device.clone())];
    let line_field;
    let fields: Vec<(&str, &Value)> = match &record.body {
        Body::Line(l) => {
            line_field = Value::Str(l.clone());
            vec![("line", &line_field)]
        }
        Body::Fields(f) => f.iter().map(|(k, v)| (k.as_str(), v)).collect(),
    };
    let mut plain = Vec::new();
    // (group, instance) -> fields, in order of first appearance.
    let mut groups: Vec<(Instance, Vec<Field>)> = Vec::new();
    for (name, value) in fields {
        if let Some(key) = name.strip_prefix(TAG_PREFIX)
            && let Value::Str(s) = value
        {
            tags.push((key.to_string(), s.clone()));
            continue;
        }
        match dimension(name) {
            Some((group, instance, metric)) => {
                match groups.iter_mut().find(|(k, _)| *k == (group, instance)) {
                    Some((_, v)) => v.push((metric, value)),
                    None => groups.push(((group, instance), vec![(metric, value)])),
                }
            }
            None => plain.push((name, value)),
        }
    }
    let mut any = false;
    if !plain.is_empty() {
        any |= line(&message.stream, &tags, &plain, record.ts_ms, out);
    }
    for ((group, instance), metrics) in groups {
        let mut t = tags.clone();
        t.push((group.to_string(), instance.to_string()));
        let names: Vec<String> = metrics
            .iter()
            .map(|(m, _)| format!("{group}.{m}"))
            .collect();
        let f: Vec<(&str, &Value)> = names
            .iter()
            .zip(&metrics)
            .map(|(n, (_, v))| (n.as_str(), *v))
            .collect();
        any |= line(&message.stream, &t, &f, record.ts_ms, out);
    }
    any
}

/// `group.instance.metric` for the system collector's dimensioned fields.
fn dimension(name: &str) -> Option<(&str, &str, &str)> {
    let mut parts = name.splitn(3, '.');
    let (group, instance, metric) = (parts.next()?, parts.next()?, parts.next()?);
    (DIMENSIONS.contains(&group)
        && !instance.is_empty()
        && !metric.is_empty()
        && !metric.contains('.'))
    .then_some((group, instance, metric))
}

/// Appends one line-protocol line; false (nothing written) when no field is representable.
fn line(
    measurement: &str,
    tags: &[(String, String)],
    fields: &[(&str, &Value)],
    ts_ms: u64,
    out: &mut String,
) -> bool {
    let mut f = String::new();
    for (name, value) in fields {
        let v = match value {
            Value::I64(i) => format!("{i}i"),
            Value::U64(u) if i64::try_from(*u).is_ok() => format!("{u}i"),
            Value::U64(u) => format!("{u}u"),
            Value::F64(x) if x.is_finite() => format!("{x:?}"),
            Value::F64(_) => continue,
            Value::Bool(b) => b.to_string(),
            Value::Str(s) => format!("\"{}\"", string_value(s)),
        };
        if !f.is_empty() {
            f.push(',');
        }
        f.push_str(&escape(name, true));
        f.push('=');
        f.push_str(&v);
    }
    if f.is_empty() {
        return false;
    }
    out.push_str(&escape(measurement, false));
    let mut sorted: Vec<&(String, String)> = tags
        .iter()
        .filter(|(k, v)| !k.is_empty() && !v.is_empty())
        .collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (k, v) in sorted {
        let _ = write!(out, ",{}={}", escape(k, true), escape(v, true));
    }
    let _ = writeln!(out, " {f} {}", u128::from(ts_ms) * 1_000_000);
    true
}

/// Escapes a measurement (`equals` false) or a tag key, tag value or field key (`equals` true).
fn escape(s: &str, equals: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\n' | '\r' => out.push(' '),
            ',' | ' ' => {
                out.push('\\');
                out.push(c);
            }
            '=' if equals => out.push_str("\\="),
            '\\' => out.push_str("\\\\"),
            _ => out.push(c),
        }
    }
    out
}

fn string_value(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace(['\n', '\r'], " ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ClockState;

    fn message(fields: Vec<(&str, Value)>) -> (Message, Record) {
        let r = Record {
            seq: 1,
            ts_ms: 1_764_100_000_000,
            clock: ClockState::Synced,
            body: Body::Fields(
                fields
                    .into_iter()
                    .map(|(k, v)| (k.to_string(), v))
                    .collect(),
            ),
        };
        let m = Message {
            device: "gw 1".into(),
            boot: "b".into(),
            stream: "system".into(),
            records: vec![r.clone()],
        };
        (m, r)
    }

    #[test]
    fn influx_tags_dimensions_and_types() {
        let (m, r) = message(vec![
            ("cpu.total_pct", Value::F64(3.5)),
            ("disk.root.used_bytes", Value::U64(10)),
            ("disk.root.total_bytes", Value::U64(20)),
            ("net.eth0.rx_bytes", Value::U64(u64::MAX)),
            ("tag.site", Value::Str("north pole".into())),
            ("up", Value::Bool(true)),
            ("bad", Value::F64(f64::NAN)),
            ("s", Value::Str("a \"q\"\nb".into())),
        ]);
        let mut out = String::new();
        assert!(record(Format::Influx, &m, &r, &mut out));
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(
            lines,
            vec![
                r#"system,device=gw\ 1,site=north\ pole cpu.total_pct=3.5,up=true,s="a \"q\" b" 1764100000000000000"#,
                r#"system,device=gw\ 1,disk=root,site=north\ pole disk.used_bytes=10i,disk.total_bytes=20i 1764100000000000000"#,
                r#"system,device=gw\ 1,net=eth0,site=north\ pole net.rx_bytes=18446744073709551615u 1764100000000000000"#,
            ]
        );
    }

    #[test]
    fn influx_skips_a_record_without_a_representable_field() {
        let (m, r) = message(vec![("x", Value::F64(f64::INFINITY))]);
        let mut out = String::new();
        assert!(!record(Format::Influx, &m, &r, &mut out));
        assert!(out.is_empty());
    }

    #[test]
    fn gap_lines() {
        let g = GapEvent {
            stream: "system".into(),
            first_seq: 3,
            last_seq: 5,
            reason: Some("evicted".into()),
        };
        let mut out = String::new();
        gap(Format::Jsonl, "gw", &g, 7, &mut out);
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        assert_eq!(v["type"], "loss");
        assert_eq!(v["count"], 3);
        out.clear();
        gap(Format::Influx, "gw", &g, 7, &mut out);
        assert_eq!(
            out,
            "ferry.gap,device=gw,reason=evicted,stream=system,type=loss first_seq=3i,last_seq=5i,count=3i 7000000\n"
        );
    }
}
