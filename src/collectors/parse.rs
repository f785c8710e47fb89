//! Line formats shared by the serial, file, exec and listen collectors: `raw`, `json`, `kv`,
//! `csv`, `regex`, `influx` (InfluxDB line protocol).
//!
//! A [`Parser`] turns one line (bytes, without its delimiter) into a [`Body`] or a
//! [`Malformed`] error. Invariants:
//!
//! - Parsing never panics, whatever the bytes (a property test feeds it random input). Lines
//!   must be UTF-8 in every format; anything else is malformed.
//! - Typed numbers stay numbers: `int` is an i64 (a u64 if it only fits there), `float` a
//!   finite f64, `bool` is `true`/`false` (also `1`/`0`), `string` the text as is. `auto`, the
//!   default, takes the first of int, float, bool that fits and falls back to string; it
//!   only reads plain decimal numbers as numbers (not `inf`, `nan` or hex).
//! - `json`: one object per line; nested objects are flattened with dots (`{"a":{"b":1}}` ->
//!   `a.b`), arrays with indices (`a.0`, `a.1`); `null` fields are left out; numbers stay
//!   numbers, strings stay strings (`"12"` is a string). A line that is not one JSON object is
//!   malformed.
//! - `kv`: `key=value` pairs separated by spaces, tabs or commas; no quoting (a value cannot
//!   hold a space or a comma); a token without `=`, or with an empty key, makes the line
//!   malformed; a line without any pair is malformed. Values are typed by `types` (default
//!   `auto`).
//! - `csv`: values separated by `delimiter` (one byte, default `,`), trimmed of spaces, matched
//!   to `columns` by position; quoting is not supported. A line with another number of values
//!   is malformed. An empty value leaves its field out, except for `string` columns.
//! - `regex`: the pattern must match (it is not anchored unless you write `^...$`); each named
//!   group that took part becomes a field typed by `types` (default `auto`).
//! - `influx`: one InfluxDB line-protocol point per line,
//!   `measurement[,tag=v...] field=v[,field=v...] [timestamp]`. The measurement becomes field
//!   `measurement`, each tag a string field `tag.<key>`, each field keeps its type (`1i` i64,
//!   `1u` u64, `1.5` f64, `"s"` string, `t`/`true`/`f`/`false` bool), a timestamp (ns)
//!   becomes field `timestamp_ns`. Backslash escapes of `,`, ` `, `=` (keys) and `"`, `\\`
//!   (string values) are honoured. A line without a field is malformed.
//! - A value that does not convert to its configured type makes the whole line malformed.
//!
//! [`LineDecoder`] puts framing, parsing, tags and the loss tally together for one collector.

use super::common::{LossReason, LossTally, Tags, tag_body};
use super::lines::Frame;
use crate::clock::now_ms;
use crate::issue::Issue;
use crate::record::{Body, Reading, Value};
use serde::Deserialize;
use std::collections::BTreeMap;

/// Default `max_line_bytes`: six times it (JSON's worst case) fits in the default 256 KiB
/// packet, as config validation requires.
pub const DEFAULT_MAX_LINE_BYTES: u64 = 32 << 10;
/// Largest `max_line_bytes` accepted here; config validation also holds it to what fits in
/// `uplink.max_packet_bytes` after JSON escaping (one line is one record, one message).
pub const MAX_MAX_LINE_BYTES: u64 = 1 << 20;
/// Most columns in a `csv` format.
const MAX_COLUMNS: usize = 256;
/// Most fields one line may produce (json, kv); more makes the line malformed.
const MAX_FIELDS: usize = 1024;

pub fn default_max_line_bytes() -> u64 {
    DEFAULT_MAX_LINE_BYTES
}

/// Which format the lines are in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatKind {
    /// The line as a string (`line` in the record).
    #[default]
    Raw,
    Json,
    Kv,
    Csv,
    Regex,
    /// InfluxDB line protocol.
    Influx,
}

impl FormatKind {
    fn as_str(self) -> &'static str {
        match self {
            FormatKind::Raw => "raw",
            FormatKind::Json => "json",
            FormatKind::Kv => "kv",
            FormatKind::Csv => "csv",
            FormatKind::Regex => "regex",
            FormatKind::Influx => "influx",
        }
    }
}

/// The type a value is converted to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    #[default]
    Auto,
    Int,
    Float,
    Bool,
    String,
}

/// The `format:` mapping of a serial or file collector.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FormatConfig {
    #[serde(rename = "type", default)]
    pub kind: FormatKind,
    /// csv: the columns, in order.
    #[serde(default)]
    pub columns: Option<Vec<ColumnConfig>>,
    /// csv: the separator, one byte (default `,`).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// regex: the pattern, with named groups `(?P<name>...)`.
    #[serde(default)]
    pub pattern: Option<String>,
    /// kv and regex: field name -> type (default `auto`).
    #[serde(default)]
    pub types: Option<BTreeMap<String, FieldType>>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ColumnConfig {
    pub name: String,
    #[serde(rename = "type", default)]
    pub kind: FieldType,
}

/// Why a line was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Malformed(pub String);

fn malformed(msg: impl Into<String>) -> Malformed {
    Malformed(msg.into())
}

/// A validated, compiled format.
#[derive(Debug, Clone)]
pub struct Parser {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Raw,
    Json,
    Kv {
        types: BTreeMap<String, FieldType>,
    },
    Csv {
        columns: Vec<(String, FieldType)>,
        delimiter: char,
    },
    Regex {
        re: regex::Regex,
        /// Named groups: (group index, name, type).
        groups: Vec<(usize, String, FieldType)>,
    },
    Influx,
}

/// The problems of a collector's `format` key, with paths under `format.`: what every
/// line-based collector kind adds to its own checks.
pub fn format_issues(config: &FormatConfig) -> Vec<Issue> {
    match Parser::new(config) {
        Ok(_) => Vec::new(),
        Err(found) => found
            .into_iter()
            .map(|i| Issue::new(format!("format.{}", i.path), i.message))
            .collect(),
    }
}

impl Parser {
    /// Checks and compiles `config`. Issue paths are relative to the `format` key.
    pub fn new(config: &FormatConfig) -> Result<Parser, Vec<Issue>> {
        let mut issues = Vec::new();
        let kind = config.kind;
        let unused = |issues: &mut Vec<Issue>, key: &str, set: bool, used_by: &str| {
            if set {
                issues.push(Issue::new(
                    key,
                    format!(
                        "is only used by format type {used_by}, not {}",
                        kind.as_str()
                    ),
                ));
            }
        };
        if kind != FormatKind::Csv {
            unused(&mut issues, "columns", config.columns.is_some(), "csv");
            unused(&mut issues, "delimiter", config.delimiter.is_some(), "csv");
        }
        if kind != FormatKind::Regex {
            unused(&mut issues, "pattern", config.pattern.is_some(), "regex");
        }
        if !matches!(kind, FormatKind::Regex | FormatKind::Kv) {
            unused(&mut issues, "types", config.types.is_some(), "kv or regex");
        }
        let types = config.types.clone().unwrap_or_default();
        let parsed = match kind {
            FormatKind::Raw => Some(Kind::Raw),
            FormatKind::Json => Some(Kind::Json),
            FormatKind::Kv => Some(Kind::Kv { types }),
            FormatKind::Csv => csv_kind(config, &mut issues),
            FormatKind::Regex => regex_kind(config, types, &mut issues),
            FormatKind::Influx => Some(Kind::Influx),
        };
        match parsed {
            Some(kind) if issues.is_empty() => Ok(Parser { kind }),
            _ => Err(issues),
        }
    }

    /// Parses one line (without its delimiter).
    pub fn parse(&self, line: &[u8]) -> Result<Body, Malformed> {
        let text = std::str::from_utf8(line).map_err(|_| malformed("not valid UTF-8"))?;
        match &self.kind {
            Kind::Raw => Ok(Body::Line(text.to_string())),
            Kind::Json => parse_json(text),
            Kind::Kv { types } => parse_kv(text, types),
            Kind::Csv { columns, delimiter } => parse_csv(text, columns, *delimiter),
            Kind::Regex { re, groups } => parse_regex(text, re, groups),
            Kind::Influx => parse_influx(text),
        }
    }
}

fn csv_kind(config: &FormatConfig, issues: &mut Vec<Issue>) -> Option<Kind> {
    let delimiter = match config.delimiter.as_deref() {
        None => ',',
        Some(d) if d.len() == 1 && d != "\n" => d.chars().next().expect("one byte"),
        Some(d) => {
            issues.push(Issue::new(
                "delimiter",
                format!("must be one ASCII character other than a newline, got {d:?}"),
            ));
            ','
        }
    };
    let Some(columns) = &config.columns else {
        issues.push(Issue::new(
            "columns",
            "is required for format type csv: a list of {name, type}",
        ));
        return None;
    };
    if columns.is_empty() || columns.len() > MAX_COLUMNS {
        issues.push(Issue::new(
            "columns",
            format!(
                "must list 1 to {MAX_COLUMNS} columns, got {}",
                columns.len()
            ),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for (i, c) in columns.iter().enumerate() {
        if c.name.is_empty() {
            issues.push(Issue::new(
                format!("columns[{i}].name"),
                "must not be empty",
            ));
        } else if !seen.insert(c.name.as_str()) {
            issues.push(Issue::new(
                format!("columns[{i}].name"),
                format!("duplicate column name {:?}", c.name),
            ));
        }
    }
    Some(Kind::Csv {
        columns: columns.iter().map(|c| (c.name.clone(), c.kind)).collect(),
        delimiter,
    })
}

fn regex_kind(
    config: &FormatConfig,
    types: BTreeMap<String, FieldType>,
    issues: &mut Vec<Issue>,
) -> Option<Kind> {
    let Some(pattern) = &config.pattern else {
        issues.push(Issue::new(
            "pattern",
            "is required for format type regex: a pattern with named groups (?P<name>...)",
        ));
        return None;
    };
    let re = match regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
    {
        Ok(re) => re,
        Err(e) => {
            // The regex crate's message spans several lines (pattern, caret, message).
            let msg = e.to_string();
            let last = msg.lines().last().unwrap_or_default();
            let msg = last.strip_prefix("error: ").unwrap_or(last).to_string();
            issues.push(Issue::new(
                "pattern",
                format!("does not compile: {}", msg.trim()),
            ));
            return None;
        }
    };
    let groups: Vec<(usize, String, FieldType)> = re
        .capture_names()
        .enumerate()
        .filter_map(|(i, n)| n.map(|n| (i, n.to_string())))
        .map(|(i, n)| {
            let t = types.get(&n).copied().unwrap_or_default();
            (i, n, t)
        })
        .collect();
    if groups.is_empty() {
        issues.push(Issue::new(
            "pattern",
            "has no named group; write (?P<name>...) for each field",
        ));
    }
    for name in types.keys() {
        if !groups.iter().any(|(_, n, _)| n == name) {
            issues.push(Issue::new(
                format!("types.{name}"),
                format!("names no group of the pattern; groups: {}", {
                    let names: Vec<&str> = groups.iter().map(|(_, n, _)| n.as_str()).collect();
                    names.join(", ")
                }),
            ));
        }
    }
    Some(Kind::Regex { re, groups })
}

/// Converts one textual value; `None` means "leave the field out" (empty, non-string).
fn convert(raw: &str, t: FieldType) -> Result<Option<Value>, Malformed> {
    if raw.is_empty() && t != FieldType::String {
        return Ok(None);
    }
    let bad = |what: &str| malformed(format!("{raw:?} is not {what}"));
    let v = match t {
        FieldType::String => Value::Str(raw.to_string()),
        FieldType::Int => int(raw).ok_or_else(|| bad("an integer"))?,
        FieldType::Float => float(raw).ok_or_else(|| bad("a number"))?,
        FieldType::Bool => match raw {
            "true" | "1" => Value::Bool(true),
            "false" | "0" => Value::Bool(false),
            _ => return Err(bad("true or false")),
        },
        FieldType::Auto => {
            if looks_numeric(raw) {
                int(raw)
                    .or_else(|| float(raw))
                    .unwrap_or(Value::Str(raw.into()))
            } else if raw == "true" || raw == "false" {
                Value::Bool(raw == "true")
            } else {
                Value::Str(raw.to_string())
            }
        }
    };
    Ok(Some(v))
}

fn int(raw: &str) -> Option<Value> {
    raw.parse::<i64>()
        .map(Value::I64)
        .ok()
        .or_else(|| raw.parse::<u64>().ok().map(Value::U64))
}

fn float(raw: &str) -> Option<Value> {
    if !looks_numeric(raw) {
        return None;
    }
    raw.parse::<f64>()
        .ok()
        .filter(|f| f.is_finite())
        .map(Value::F64)
}

/// Plain decimal: optional sign, digits, optional fraction, optional exponent.
fn looks_numeric(s: &str) -> bool {
    let b = s.as_bytes();
    let start = usize::from(matches!(b.first(), Some(b'+' | b'-')));
    b.len() > start
        && b[start..]
            .iter()
            .all(|c| c.is_ascii_digit() || matches!(c, b'.' | b'e' | b'E' | b'+' | b'-'))
        && b[start..].iter().any(u8::is_ascii_digit)
        && (b[start].is_ascii_digit() || b[start] == b'.')
}

fn parse_json(text: &str) -> Result<Body, Malformed> {
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| malformed(format!("not JSON: {e}")))?;
    let serde_json::Value::Object(map) = v else {
        return Err(malformed("not a JSON object"));
    };
    let mut fields = Vec::with_capacity(map.len());
    for (k, v) in map {
        flatten(k, v, &mut fields)?;
    }
    Ok(Body::Fields(fields))
}

fn flatten(
    key: String,
    v: serde_json::Value,
    out: &mut Vec<(String, Value)>,
) -> Result<(), Malformed> {
    use serde_json::Value as J;
    if out.len() >= MAX_FIELDS {
        return Err(malformed(format!("more than {MAX_FIELDS} fields")));
    }
    match v {
        J::Null => {}
        J::Bool(b) => out.push((key, Value::Bool(b))),
        J::Number(n) => {
            let v = if let Some(i) = n.as_i64() {
                Value::I64(i)
            } else if let Some(u) = n.as_u64() {
                Value::U64(u)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            };
            out.push((key, v));
        }
        J::String(s) => out.push((key, Value::Str(s))),
        J::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                flatten(format!("{key}.{i}"), item, out)?;
            }
        }
        J::Object(map) => {
            for (k, item) in map {
                flatten(format!("{key}.{k}"), item, out)?;
            }
        }
    }
    Ok(())
}

fn parse_kv(text: &str, types: &BTreeMap<String, FieldType>) -> Result<Body, Malformed> {
    let mut fields = Vec::new();
    for token in text.split([' ', '\t', ',']).filter(|t| !t.is_empty()) {
        let Some((k, v)) = token.split_once('=') else {
            return Err(malformed(format!("{token:?} is not key=value")));
        };
        if k.is_empty() {
            return Err(malformed(format!("{token:?} has an empty key")));
        }
        if fields.len() >= MAX_FIELDS {
            return Err(malformed(format!("more than {MAX_FIELDS} fields")));
        }
        let t = types.get(k).copied().unwrap_or_default();
        if let Some(v) = convert(v, t)? {
            fields.push((k.to_string(), v));
        }
    }
    if fields.is_empty() {
        return Err(malformed("no key=value pair"));
    }
    Ok(Body::Fields(fields))
}

fn parse_csv(
    text: &str,
    columns: &[(String, FieldType)],
    delimiter: char,
) -> Result<Body, Malformed> {
    let n = text.split(delimiter).count();
    if n != columns.len() {
        return Err(malformed(format!(
            "{n} values for {} columns",
            columns.len()
        )));
    }
    let mut fields = Vec::with_capacity(columns.len());
    for (raw, (name, t)) in text.split(delimiter).zip(columns) {
        if let Some(v) = convert(raw.trim(), *t)? {
            fields.push((name.clone(), v));
        }
    }
    Ok(Body::Fields(fields))
}

fn parse_regex(
    text: &str,
    re: &regex::Regex,
    groups: &[(usize, String, FieldType)],
) -> Result<Body, Malformed> {
    let caps = re
        .captures(text)
        .ok_or_else(|| malformed("the pattern does not match"))?;
    let mut fields = Vec::with_capacity(groups.len());
    for (i, name, t) in groups {
        if let Some(m) = caps.get(*i)
            && let Some(v) = convert(m.as_str(), *t)?
        {
            fields.push((name.clone(), v));
        }
    }
    Ok(Body::Fields(fields))
}

/// Splits `text` at unescaped `sep` outside double quotes (quotes only count when `quotes`).
fn split_unescaped(text: &str, sep: char, quotes: bool) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut start, mut escaped, mut quoted) = (0, false, false);
    for (i, c) in text.char_indices() {
        if escaped {
            escaped = false;
        } else if c == '\\' {
            escaped = true;
        } else if quotes && c == '"' {
            quoted = !quoted;
        } else if c == sep && !quoted {
            parts.push(&text[start..i]);
            start = i + 1;
        }
    }
    parts.push(&text[start..]);
    parts
}

/// Removes the backslashes of a line-protocol key (measurement, tag, field name).
fn unescape_key(key: &str) -> Result<String, Malformed> {
    if key.is_empty() {
        return Err(malformed("an empty name"));
    }
    let mut out = String::with_capacity(key.len());
    let mut chars = key.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => match chars.next() {
                Some(e @ (',' | ' ' | '=' | '\\' | '"')) => out.push(e),
                Some(e) => {
                    out.push('\\');
                    out.push(e);
                }
                None => out.push('\\'),
            },
            _ => out.push(c),
        }
    }
    Ok(out)
}

/// One line-protocol field value.
fn influx_value(raw: &str) -> Result<Value, Malformed> {
    let bad = || malformed(format!("{raw:?} is not a line-protocol value"));
    if let Some(inner) = raw.strip_prefix('"') {
        let inner = inner.strip_suffix('"').ok_or_else(bad)?;
        let mut out = String::with_capacity(inner.len());
        let mut chars = inner.chars();
        while let Some(c) = chars.next() {
            match (c, chars.clone().next()) {
                ('\\', Some(e @ ('"' | '\\'))) => {
                    out.push(e);
                    chars.next();
                }
                ('"', _) => return Err(bad()),
                _ => out.push(c),
            }
        }
        return Ok(Value::Str(out));
    }
    match raw {
        "t" | "T" | "true" | "True" | "TRUE" => return Ok(Value::Bool(true)),
        "f" | "F" | "false" | "False" | "FALSE" => return Ok(Value::Bool(false)),
        _ => {}
    }
    if let Some(n) = raw.strip_suffix('i') {
        return n.parse::<i64>().map(Value::I64).map_err(|_| bad());
    }
    if let Some(n) = raw.strip_suffix('u') {
        return n.parse::<u64>().map(Value::U64).map_err(|_| bad());
    }
    float(raw).ok_or_else(bad)
}

fn parse_influx(text: &str) -> Result<Body, Malformed> {
    let text = text.trim_end();
    if text.starts_with('#') || text.is_empty() {
        return Err(malformed("a comment or an empty line, not a point"));
    }
    let sections = split_unescaped(text, ' ', true);
    let sections: Vec<&str> = sections.into_iter().filter(|s| !s.is_empty()).collect();
    let (series, field_set, time) = match sections.as_slice() {
        [series, fields] => (*series, *fields, None),
        [series, fields, time] => (*series, *fields, Some(*time)),
        _ => {
            return Err(malformed(
                "expected `measurement[,tags] fields [timestamp]`",
            ));
        }
    };
    let mut keys = split_unescaped(series, ',', false).into_iter();
    let measurement = unescape_key(keys.next().unwrap_or_default())?;
    let mut fields = vec![("measurement".to_string(), Value::Str(measurement))];
    for tag in keys {
        let [k, v] = split_unescaped(tag, '=', false)[..] else {
            return Err(malformed(format!("tag {tag:?} is not key=value")));
        };
        fields.push((
            format!("tag.{}", unescape_key(k)?),
            Value::Str(unescape_key(v)?),
        ));
    }
    let tag_count = fields.len();
    for field in split_unescaped(field_set, ',', true) {
        let Some((k, v)) = split_unescaped(field, '=', true)
            .first()
            .map(|k| (*k, &field[k.len()..]))
            .and_then(|(k, rest)| rest.strip_prefix('=').map(|v| (k, v)))
        else {
            return Err(malformed(format!("field {field:?} is not key=value")));
        };
        if fields.len() >= MAX_FIELDS {
            return Err(malformed(format!("more than {MAX_FIELDS} fields")));
        }
        fields.push((unescape_key(k)?, influx_value(v)?));
    }
    if fields.len() == tag_count {
        return Err(malformed("no field"));
    }
    if let Some(t) = time {
        let ns = t
            .parse::<i64>()
            .map_err(|_| malformed(format!("timestamp {t:?} is not an integer")))?;
        fields.push(("timestamp_ns".to_string(), Value::I64(ns)));
    }
    Ok(Body::Fields(fields))
}

/// Framed lines -> readings for one collector: parse, tag, count what is unusable.
#[derive(Debug)]
pub struct LineDecoder {
    stream: String,
    parser: Parser,
    tags: Tags,
    tally: LossTally,
}

impl LineDecoder {
    pub fn new(stream: &str, parser: Parser, tags: Tags) -> LineDecoder {
        LineDecoder {
            stream: stream.to_string(),
            parser,
            tags,
            tally: LossTally::default(),
        }
    }

    /// Appends the reading for `frame` to `out`, or counts it as lost. Empty lines are
    /// skipped without a report.
    pub fn decode(&mut self, frame: Frame, out: &mut Vec<Reading>) {
        match frame {
            Frame::Line(line) if line.is_empty() => {}
            Frame::Line(line) => match self.parser.parse(&line) {
                Ok(body) => out.push(Reading {
                    stream: self.stream.clone(),
                    ts_ms: now_ms(),
                    body: tag_body(body, &self.tags),
                }),
                Err(e) => {
                    tracing::debug!(collector = %self.stream, error = %e, "Malformed line.");
                    self.tally.note(LossReason::Malformed, &line);
                }
            },
            Frame::Oversized(sample) => self.tally.note(LossReason::Oversized, &sample),
        }
    }

    /// Appends the loss readings counted since the last report.
    pub fn finish(&mut self, out: &mut Vec<Reading>) {
        self.tally.drain_into(&self.stream, out);
    }

    /// Appends the loss readings only if the oldest unreported one is `window` old.
    pub fn finish_due(&mut self, out: &mut Vec<Reading>, window: std::time::Duration) {
        self.tally.drain_due(&self.stream, out, window);
    }

    /// When unreported losses are due under `window`; `None` if there are none.
    pub fn loss_due_at(&self, window: std::time::Duration) -> Option<std::time::Instant> {
        self.tally.due_at(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn influx_line_protocol_keeps_types_tags_and_escapes() {
        let p = parser("type: influx\n");
        let f = fields(
            p.parse(br#"modem,iface=wwan0,op=My\ Telco rssi=-71i,snr=9.5,up=true,n=3u,note="a \"b\", c=d" 1700000000000000000"#)
                .unwrap(),
        );
        assert_eq!(
            f,
            vec![
                ("measurement".into(), Value::Str("modem".into())),
                ("tag.iface".into(), Value::Str("wwan0".into())),
                ("tag.op".into(), Value::Str("My Telco".into())),
                ("rssi".into(), Value::I64(-71)),
                ("snr".into(), Value::F64(9.5)),
                ("up".into(), Value::Bool(true)),
                ("n".into(), Value::U64(3)),
                ("note".into(), Value::Str(r#"a "b", c=d"#.into())),
                ("timestamp_ns".into(), Value::I64(1_700_000_000_000_000_000)),
            ]
        );
        let f = fields(p.parse(b"m v=1").unwrap());
        assert_eq!(f[1], ("v".into(), Value::F64(1.0)));
        for bad in [
            "m",
            "m,t v=1",
            "m v=",
            "m v=1x",
            "m v=\"open",
            "m v=1 notatime",
            "# comment",
            "m v=1 2 3",
            ",t=1 v=1",
        ] {
            assert!(p.parse(bad.as_bytes()).is_err(), "{bad:?} parsed");
        }
    }

    fn parser(yaml: &str) -> Parser {
        Parser::new(&serde_yaml::from_str(yaml).unwrap()).unwrap()
    }

    fn issues(yaml: &str) -> Vec<String> {
        match Parser::new(&serde_yaml::from_str(yaml).unwrap()) {
            Ok(_) => vec![],
            Err(i) => i
                .iter()
                .map(|i| format!("{}: {}", i.path, i.message))
                .collect(),
        }
    }

    fn fields(body: Body) -> Vec<(String, Value)> {
        match body {
            Body::Fields(f) => f,
            Body::Line(l) => panic!("expected fields, got line {l:?}"),
        }
    }

    fn f(k: &str, v: Value) -> (String, Value) {
        (k.to_string(), v)
    }

    #[test]
    fn raw_keeps_the_line_and_rejects_invalid_utf8() {
        let p = parser("type: raw");
        assert_eq!(
            p.parse(b"hello world").unwrap(),
            Body::Line("hello world".into())
        );
        assert!(p.parse(b"\xff\xfe").is_err());
        assert_eq!(
            Parser::new(&FormatConfig::default())
                .unwrap()
                .parse(b"x")
                .unwrap(),
            Body::Line("x".into())
        );
    }

    #[test]
    fn json_flattens_and_keeps_numbers() {
        let p = parser("type: json");
        let got = fields(
            p.parse(br#"{"t":21.5,"n":-3,"big":18446744073709551615,"ok":true,"s":"12","gps":{"lat":1.5,"fix":{"q":2}},"a":[1,"x"],"z":null}"#)
                .unwrap(),
        );
        let want = vec![
            f("a.0", Value::I64(1)),
            f("a.1", Value::Str("x".into())),
            f("big", Value::U64(u64::MAX)),
            f("gps.fix.q", Value::I64(2)),
            f("gps.lat", Value::F64(1.5)),
            f("n", Value::I64(-3)),
            f("ok", Value::Bool(true)),
            f("s", Value::Str("12".into())),
            f("t", Value::F64(21.5)),
        ];
        assert_eq!(got, want);
        for bad in [&b"[1,2]"[..], b"42", b"{\"a\":", b"not json", b"{} {}"] {
            assert!(p.parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let deep = format!("{}{}", "[".repeat(200), "]".repeat(200));
        assert!(p.parse(format!("{{\"a\":{deep}}}").as_bytes()).is_err());
    }

    #[test]
    fn kv_pairs_typed_by_auto_and_types() {
        let p = parser("type: kv\ntypes: {id: string, level: float, on: bool}");
        let got = fields(
            p.parse(b"temp=21.5, hum=40 id=007\tlevel=3 on=1 name=pump empty=")
                .unwrap(),
        );
        assert_eq!(
            got,
            vec![
                f("temp", Value::F64(21.5)),
                f("hum", Value::I64(40)),
                f("id", Value::Str("007".into())),
                f("level", Value::F64(3.0)),
                f("on", Value::Bool(true)),
                f("name", Value::Str("pump".into())),
            ]
        );
        for bad in [
            &b"no pairs here"[..],
            b"=3",
            b"a=1 b",
            b"   ,",
            b"level=high",
        ] {
            assert!(p.parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        // auto never turns words that Rust would parse as floats into numbers.
        let got = fields(
            p.parse(b"a=inf b=NaN c=1e3 d=-.5 e=0x10 f=true g=1.2.3")
                .unwrap(),
        );
        assert_eq!(
            got,
            vec![
                f("a", Value::Str("inf".into())),
                f("b", Value::Str("NaN".into())),
                f("c", Value::F64(1000.0)),
                f("d", Value::F64(-0.5)),
                f("e", Value::Str("0x10".into())),
                f("f", Value::Bool(true)),
                f("g", Value::Str("1.2.3".into())),
            ]
        );
    }

    #[test]
    fn csv_columns_by_position() {
        let p = parser(
            "type: csv\ncolumns:\n  - {name: ts, type: int}\n  - {name: temp, type: float}\n  - {name: unit, type: string}\n  - {name: ok}\n",
        );
        assert_eq!(
            fields(p.parse(b"1700000000, 21.5 ,C,true").unwrap()),
            vec![
                f("ts", Value::I64(1_700_000_000)),
                f("temp", Value::F64(21.5)),
                f("unit", Value::Str("C".into())),
                f("ok", Value::Bool(true)),
            ]
        );
        assert_eq!(
            fields(p.parse(b"1,,,").unwrap()),
            vec![f("ts", Value::I64(1)), f("unit", Value::Str(String::new()))]
        );
        for bad in [
            &b"1,2,C"[..],
            b"1,2,C,true,extra",
            b"x,2,C,true",
            b"1,warm,C,true",
        ] {
            assert!(p.parse(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
        let semi = parser(
            "type: csv\ndelimiter: \";\"\ncolumns: [{name: a, type: int}, {name: b, type: int}]",
        );
        assert_eq!(fields(semi.parse(b"1;2").unwrap()).len(), 2);
    }

    #[test]
    fn regex_named_groups_typed() {
        let p = parser(
            "type: regex\npattern: '^(?P<station>\\w+) T=(?P<t>-?[0-9.]+)C(?: RH=(?P<rh>[0-9]+)%)?$'\ntypes: {t: float, station: string}",
        );
        assert_eq!(
            fields(p.parse(b"north T=-3.5C RH=80%").unwrap()),
            vec![
                f("station", Value::Str("north".into())),
                f("t", Value::F64(-3.5)),
                f("rh", Value::I64(80)),
            ]
        );
        assert_eq!(fields(p.parse(b"south T=2C").unwrap()).len(), 2);
        assert!(p.parse(b"garbage").is_err());
    }

    #[test]
    fn config_problems_are_named_by_key() {
        assert_eq!(
            issues("type: regex\npattern: '(?P<a>[0-9'"),
            vec!["pattern: does not compile: unclosed character class"]
        );
        assert_eq!(
            issues("type: regex\npattern: '[0-9]+'\ntypes: {x: int}"),
            vec![
                "pattern: has no named group; write (?P<name>...) for each field",
                "types.x: names no group of the pattern; groups: "
            ]
        );
        assert_eq!(
            issues("type: csv")[0],
            "columns: is required for format type csv: a list of {name, type}"
        );
        assert_eq!(
            issues("type: csv\ncolumns: [{name: a}, {name: a}]\ndelimiter: ab"),
            vec![
                "delimiter: must be one ASCII character other than a newline, got \"ab\"",
                "columns[1].name: duplicate column name \"a\""
            ]
        );
        assert_eq!(
            issues("type: json\npattern: x"),
            vec!["pattern: is only used by format type regex, not json"]
        );
        let err = serde_path_to_error::deserialize::<_, FormatConfig>(
            serde_yaml::Deserializer::from_str(
                "type: csv\ncolumns:\n  - {name: a}\n  - {name: b}\n  - {name: c, type: integer}\n",
            ),
        )
        .unwrap_err();
        assert_eq!(err.path().to_string(), "columns[2].type");
    }

    #[test]
    fn decoder_counts_malformed_and_oversized_and_tags_good_lines() {
        let tags: Tags = [("site".to_string(), "a".to_string())].into();
        let mut d = LineDecoder::new("s", parser("type: kv"), tags);
        let mut out = Vec::new();
        for frame in [
            Frame::Line(b"x=1".to_vec()),
            Frame::Line(b"garbage".to_vec()),
            Frame::Line(vec![]),
            Frame::Line(b"\xff=1".to_vec()),
            Frame::Oversized(b"yyy".to_vec()),
        ] {
            d.decode(frame, &mut out);
        }
        d.finish(&mut out);
        assert_eq!(out.len(), 3);
        assert_eq!(
            out[0].body,
            Body::Fields(vec![
                f("x", Value::I64(1)),
                f("tag.site", Value::Str("a".into()))
            ])
        );
        let loss: Vec<_> = out[1..].iter().map(|r| fields(r.body.clone())).collect();
        assert_eq!(loss[0][1], f("count", Value::U64(2)));
        assert_eq!(loss[0][2], f("reason", Value::Str("malformed".into())));
        assert_eq!(loss[0][3], f("sample", Value::Str("garbage".into())));
        assert_eq!(loss[1][1], f("count", Value::U64(1)));
        assert_eq!(loss[1][2], f("reason", Value::Str("oversized".into())));
    }

    fn all_parsers() -> Vec<Parser> {
        vec![
            parser("type: raw"),
            parser("type: json"),
            parser("type: kv\ntypes: {a: int, b: float, c: bool}"),
            parser(
                "type: csv\ncolumns: [{name: a, type: int}, {name: b, type: float}, {name: c, type: bool}, {name: d}]",
            ),
            parser(
                "type: regex\npattern: '(?P<a>[0-9]+)?(?P<b>.*)=(?P<c>\\S*)'\ntypes: {a: int, c: float}",
            ),
            parser("type: influx"),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic_any_parser(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            for p in all_parsers() {
                let _ = p.parse(&bytes);
            }
        }

        #[test]
        fn near_valid_text_never_panics_any_parser(s in "[0-9a-z=,;.{}\\[\\]\":+eE\\\\ -]{0,200}") {
            for p in all_parsers() {
                let _ = p.parse(s.as_bytes());
            }
        }

        #[test]
        fn framing_and_decoding_random_chunks_never_panics(
            chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..300), 0..20),
            max in 1usize..200,
        ) {
            let mut s = super::super::lines::LineSplitter::new(b'\n', max);
            let mut frames = Vec::new();
            let mut total = 0u64;
            for c in &chunks {
                s.push(c, &mut frames);
                total += c.len() as u64;
                prop_assert!(s.pending_bytes() <= total);
            }
            for fr in &frames {
                if let Frame::Line(l) = fr {
                    prop_assert!(l.len() <= max);
                }
            }
            let mut d = LineDecoder::new("s", parser("type: json"), Tags::new());
            let mut out = Vec::new();
            for fr in frames {
                d.decode(fr, &mut out);
            }
            d.finish(&mut out);
        }
    }
}
