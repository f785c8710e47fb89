//! One typed loss report: what was dropped, from which stream, why, and how many.
//!
//! Every part that drops data (a collector's unusable input, the spool's cap, a full disk, a
//! bad chunk, a refused command) builds a [`Loss`] and nothing else; the spool writes it as a
//! record on [`LOSS_STREAM`] and adds its `count` to the persisted loss counter of its
//! [`LossReason`]. The record's fields are those of docs/WIRE.md:
//! `{stream, first_seq, last_seq, count, reason}` plus optional detail fields (`sample`,
//! `quarantined`, `error`, `id`, `bytes`). [`Loss::to_body`] and [`Loss::from_body`] are the only
//! place that knows these names, so what is written and what is counted cannot drift apart.
//!
//! This module imports only the record model, so collectors, the spool and commands can all
//! use it without importing each other.

use crate::record::{Body, LOSS_STREAM, Reading, Value};
use serde::{Deserialize, Serialize};

/// Why data was dropped: the `reason` field of a loss record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum LossReason {
    /// The line (or value) did not parse in the configured format, or was not UTF-8.
    Malformed,
    /// The line was longer than `max_line_bytes`; it was cut off and dropped.
    Oversized,
    /// A program exited non-zero or by a signal, or could not be started (exec); a device's
    /// link could not be opened or broke (modbus).
    Failed,
    /// A program or a device did not answer in time (exec, modbus).
    Timeout,
    /// Output past a size cap was discarded (exec `max_output_bytes`).
    Truncated,
    /// A scheduled sample was skipped because the previous one was still running (exec).
    Skipped,
    /// Stored records evicted to make room (`drop_oldest`).
    Evicted,
    /// New records not stored for lack of room (`drop_newest`).
    SpoolFull,
    /// Readings refused because the spool's filesystem was below `min_free_bytes`.
    DiskFull,
    /// Readings whose commit failed with a storage error.
    SpoolWriteFailed,
    /// Stored records that could not be read back (a damaged spool or chunk).
    SpoolCorrupt,
    /// A command that arrived after its `expires_at`.
    ExpiredCommand,
    /// Stored records whose chunk can never fit in one MQTT packet (`uplink.max_packet_bytes`,
    /// e.g. lowered after they were stored); `bytes` gives the message size.
    TooBigForPacket,
    /// A Modbus device answered a read with an exception (illegal address, device busy...);
    /// the sample names the request and the exception code.
    ModbusException,
}

impl LossReason {
    pub const ALL: [LossReason; 14] = [
        LossReason::Malformed,
        LossReason::Oversized,
        LossReason::Failed,
        LossReason::Timeout,
        LossReason::Truncated,
        LossReason::Skipped,
        LossReason::Evicted,
        LossReason::SpoolFull,
        LossReason::DiskFull,
        LossReason::SpoolWriteFailed,
        LossReason::SpoolCorrupt,
        LossReason::ExpiredCommand,
        LossReason::TooBigForPacket,
        LossReason::ModbusException,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            LossReason::Malformed => "malformed",
            LossReason::Oversized => "oversized",
            LossReason::Failed => "failed",
            LossReason::Timeout => "timeout",
            LossReason::Truncated => "truncated",
            LossReason::Skipped => "skipped",
            LossReason::Evicted => "evicted",
            LossReason::SpoolFull => "spool_full",
            LossReason::DiskFull => "disk_full",
            LossReason::SpoolWriteFailed => "spool_write_failed",
            LossReason::SpoolCorrupt => "spool_corrupt",
            LossReason::ExpiredCommand => "expired_command",
            LossReason::TooBigForPacket => "too_big_for_packet",
            LossReason::ModbusException => "modbus_exception",
        }
    }

    pub fn parse(s: &str) -> Option<LossReason> {
        LossReason::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl std::fmt::Display for LossReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One loss report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Loss {
    /// The stream the data belonged to; `None` for the whole spool (a quarantined spool).
    pub stream: Option<String>,
    pub reason: LossReason,
    /// Records (or readings, or lines) dropped.
    pub count: u64,
    /// Inclusive seq range, when the dropped data had seqs.
    pub seqs: Option<(u64, u64)>,
    /// Extra named fields (`sample`, `quarantined`, `error`, `id`, `bytes`).
    pub detail: Vec<(String, Value)>,
}

impl Loss {
    /// `count` readings of `stream` dropped before they had seqs.
    pub fn new(stream: &str, reason: LossReason, count: u64) -> Loss {
        Loss {
            stream: Some(stream.to_string()),
            reason,
            count,
            seqs: None,
            detail: Vec::new(),
        }
    }

    /// The stored records `first..=last` of `stream` dropped.
    pub fn range(stream: &str, reason: LossReason, first: u64, last: u64) -> Loss {
        Loss {
            seqs: Some((first, last)),
            ..Loss::new(stream, reason, last + 1 - first)
        }
    }

    pub fn with(mut self, name: &str, value: Value) -> Loss {
        self.detail.push((name.to_string(), value));
        self
    }

    /// Extends the seq range by `first..=last` if it follows on directly; false otherwise.
    pub fn extend(&mut self, first: u64, last: u64) -> bool {
        match &mut self.seqs {
            Some((_, end)) if *end + 1 == first => {
                *end = last;
                self.count += last + 1 - first;
                true
            }
            _ => false,
        }
    }

    /// The record's fields, in wire order.
    pub fn to_body(&self) -> Body {
        let mut f = Vec::with_capacity(5 + self.detail.len());
        if let Some(s) = &self.stream {
            f.push(("stream".to_string(), Value::Str(s.clone())));
        }
        if let Some((first, last)) = self.seqs {
            f.push(("first_seq".to_string(), Value::U64(first)));
            f.push(("last_seq".to_string(), Value::U64(last)));
        }
        f.push(("count".to_string(), Value::U64(self.count)));
        f.push((
            "reason".to_string(),
            Value::Str(self.reason.as_str().to_string()),
        ));
        f.extend(self.detail.iter().cloned());
        Body::Fields(f)
    }

    /// A reading on [`LOSS_STREAM`] stamped now.
    pub fn to_reading(&self) -> Reading {
        Reading {
            stream: LOSS_STREAM.to_string(),
            ts_ms: crate::clock::now_ms(),
            body: self.to_body(),
        }
    }

    /// Reads back a record written by [`Loss::to_body`]; `None` if it is not one.
    pub fn from_body(body: &Body) -> Option<Loss> {
        let Body::Fields(fields) = body else {
            return None;
        };
        let mut loss = Loss {
            stream: None,
            reason: LossReason::SpoolCorrupt,
            count: 0,
            seqs: None,
            detail: Vec::new(),
        };
        let (mut reason, mut first, mut last) = (None, None, None);
        for (k, v) in fields {
            match (k.as_str(), v) {
                ("stream", Value::Str(s)) => loss.stream = Some(s.clone()),
                ("reason", Value::Str(s)) => reason = LossReason::parse(s),
                ("count", Value::U64(n)) => loss.count = *n,
                ("count", Value::I64(n)) => loss.count = (*n).max(0) as u64,
                ("first_seq", Value::U64(n)) => first = Some(*n),
                ("last_seq", Value::U64(n)) => last = Some(*n),
                _ => loss.detail.push((k.clone(), v.clone())),
            }
        }
        loss.reason = reason?;
        loss.seqs = first.zip(last);
        Some(loss)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_fields_round_trip() {
        let l = Loss::range("a", LossReason::Evicted, 10, 19);
        assert_eq!(
            l.to_body(),
            Body::Fields(vec![
                ("stream".into(), Value::Str("a".into())),
                ("first_seq".into(), Value::U64(10)),
                ("last_seq".into(), Value::U64(19)),
                ("count".into(), Value::U64(10)),
                ("reason".into(), Value::Str("evicted".into())),
            ])
        );
        assert_eq!(Loss::from_body(&l.to_body()), Some(l));
        let s = Loss::new("gps", LossReason::Malformed, 2).with("sample", Value::Str("x".into()));
        assert_eq!(Loss::from_body(&s.to_body()), Some(s));
        for r in LossReason::ALL {
            assert_eq!(LossReason::parse(r.as_str()), Some(r));
        }
    }

    #[test]
    fn unknown_reasons_and_lines_are_not_losses() {
        let b = Body::Fields(vec![("reason".into(), Value::Str("nope".into()))]);
        assert_eq!(Loss::from_body(&b), None);
        assert_eq!(Loss::from_body(&Body::Line("x".into())), None);
    }

    #[test]
    fn extend_only_joins_adjacent_ranges() {
        let mut l = Loss::range("a", LossReason::SpoolFull, 5, 9);
        assert!(l.extend(10, 14));
        assert_eq!((l.seqs, l.count), (Some((5, 14)), 10));
        assert!(!l.extend(20, 21));
        assert!(!Loss::new("a", LossReason::DiskFull, 3).extend(1, 2));
    }
}
