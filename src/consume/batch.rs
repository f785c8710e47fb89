//! One batch of messages, from payloads to output lines and dedupe state.
//!
//! [`Processor::process`] runs the steps in this order, and the consumer acknowledges the
//! batch's messages only after it returned Ok:
//!
//! 1. decode every message (a payload that is not a ferry message, or whose device differs
//!    from its topic's, is saved under `DIR/rejected/` and logged: acknowledged, never lost);
//! 2. lock the devices involved (in name order, so consumers sharing the state cannot
//!    deadlock) and read their state;
//! 3. keep the records whose (device, stream, seq) is new, note loss reports, and review the
//!    holes (losses at once, gaps past the timeout);
//! 4. write and fsync each changed state next to the current one;
//! 5. write the lines to stdout and flush;
//! 6. rename the new states into place, fsync the directory, unlock.
//!
//! A crash before 5 outputs nothing and changes nothing (the broker redelivers); a crash
//! after 6 but before the acks only makes the broker redeliver what the state now drops. Only
//! a crash between the first byte of 5 and the last rename of 6 can output a batch's lines a
//! second time after the restart: that window holds no disk I/O but the renames.

use super::gaps::{self, GapEvent, StreamState};
use super::output::{self, Format};
use super::seen::{Insert, StreamSeen};
use super::store::{Held, Store, StoreError};
use crate::clock::now_ms;
use crate::record::{Body, LOSS_STREAM, Value};
use crate::wire;
use rumqttc::Publish;
use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum BatchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot write to standard output: {0}")]
    Output(std::io::Error),
    #[error("cannot save a rejected message under {path}: {source}")]
    Reject {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// What the consumer has done since it started.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub messages: u64,
    pub records: u64,
    pub duplicates: u64,
    pub gaps: u64,
    pub gap_seqs: u64,
    pub losses: u64,
    pub lost_seqs: u64,
    pub rejected: u64,
    pub statuses: u64,
    /// Holes dropped to keep the state bounded (see `seen.rs`).
    pub forgotten_holes: u64,
    /// Records with no field line protocol can carry (influx only).
    pub unrepresentable: u64,
}

/// Decodes, dedupes and outputs batches; owns the state store and stdout.
pub struct Processor {
    store: Store,
    format: Format,
    prefix: String,
    gap_timeout_ms: u64,
    rejected_dir: PathBuf,
    /// Devices that may have a hole waiting for its report (checked by [`Processor::sweep`]).
    watch: BTreeSet<String>,
    pub counters: Counters,
}

enum Item {
    Data(wire::Message),
    Status { device: String, payload: Vec<u8> },
}

impl Processor {
    /// Opens the state under `state_dir` and notes the devices with holes still to report.
    pub fn open(
        state_dir: &std::path::Path,
        format: Format,
        prefix: &str,
        gap_timeout_ms: u64,
    ) -> Result<Processor, BatchError> {
        let mut store = Store::open(state_dir)?;
        let mut watch = BTreeSet::new();
        for device in store.devices()? {
            let held = store.hold(&device)?;
            if held
                .state
                .streams
                .values()
                .any(|s| gaps::has_open(s) || !s.losses.is_empty())
            {
                watch.insert(device);
            }
        }
        Ok(Processor {
            store,
            format,
            prefix: prefix.to_string(),
            gap_timeout_ms,
            rejected_dir: state_dir.join("rejected"),
            watch,
            counters: Counters::default(),
        })
    }

    /// Handles one batch (see the module doc). On Ok the messages may be acknowledged.
    pub fn process(&mut self, batch: &[Publish]) -> Result<(), BatchError> {
        let now = now_ms();
        let mut items = Vec::with_capacity(batch.len());
        for p in batch {
            self.counters.messages += 1;
            match self.classify(p) {
                Ok(item) => items.push(item),
                Err(why) => self.reject(p, &why)?,
            }
        }
        let devices: BTreeSet<String> = items
            .iter()
            .filter_map(|i| match i {
                Item::Data(m) => Some(m.device.clone()),
                Item::Status { .. } => None,
            })
            .collect();
        let mut held: BTreeMap<String, Held> = BTreeMap::new();
        for d in devices {
            held.insert(d.clone(), self.store.hold(&d)?);
        }
        let mut out = String::new();
        for item in &items {
            match item {
                Item::Data(m) => {
                    let h = held.get_mut(&m.device).expect("every data device is held");
                    self.dedupe(h, m, now, &mut out);
                }
                Item::Status { device, payload } => {
                    self.counters.statuses += 1;
                    output::status(self.format, device, payload, now, &mut out);
                }
            }
        }
        self.review(&mut held, now, &mut out);
        self.finish(held, &out)
    }

    /// Reports the holes of watched devices that are overdue; called every second or so.
    pub fn sweep(&mut self) -> Result<(), BatchError> {
        let now = now_ms();
        let mut held = BTreeMap::new();
        for d in std::mem::take(&mut self.watch) {
            held.insert(d.clone(), self.store.hold(&d)?);
        }
        let mut out = String::new();
        self.review(&mut held, now, &mut out);
        self.finish(held, &out)
    }

    fn classify(&self, p: &Publish) -> Result<Item, String> {
        let topic = p.topic.as_str();
        let rest = topic
            .strip_prefix(&self.prefix)
            .and_then(|r| r.strip_prefix('/'))
            .ok_or_else(|| format!("topic {topic:?} is outside the prefix"))?;
        let (device, kind) = rest
            .split_once('/')
            .ok_or_else(|| format!("topic {topic:?} has no device level"))?;
        if kind == "status" {
            return Ok(Item::Status {
                device: device.to_string(),
                payload: p.payload.to_vec(),
            });
        }
        if !kind.starts_with("data/") {
            return Err(format!("topic {topic:?} is neither data nor status"));
        }
        let m = wire::decode(&p.payload).map_err(|e| format!("not a ferry message: {e}"))?;
        if m.device != device {
            return Err(format!(
                "device {:?} in a message on topic {topic:?}",
                m.device
            ));
        }
        Ok(Item::Data(m))
    }

    fn reject(&mut self, p: &Publish, why: &str) -> Result<(), BatchError> {
        self.counters.rejected += 1;
        std::fs::create_dir_all(&self.rejected_dir).map_err(|source| BatchError::Reject {
            path: self.rejected_dir.clone(),
            source,
        })?;
        let path = self
            .rejected_dir
            .join(format!("{}-{}.bin", now_ms(), self.counters.rejected));
        std::fs::write(&path, &p.payload).map_err(|source| BatchError::Reject {
            path: path.clone(),
            source,
        })?;
        tracing::error!(topic = %p.topic, bytes = p.payload.len(), saved = %path.display(), reason = why, "Rejected a message (acknowledged, payload saved).");
        Ok(())
    }

    fn dedupe(&mut self, h: &mut Held, m: &wire::Message, now: u64, out: &mut String) {
        for r in &m.records {
            let entry = h.state.streams.entry(m.stream.clone());
            let st = entry.or_insert_with(|| StreamState {
                seen: None,
                losses: BTreeMap::new(),
            });
            let outcome = match &mut st.seen {
                None => {
                    st.seen = Some(StreamSeen::first(r.seq));
                    Insert::New
                }
                Some(seen) => {
                    let (outcome, forgotten) = seen.insert(r.seq, now);
                    if forgotten > 0 {
                        self.counters.forgotten_holes += forgotten as u64;
                        tracing::warn!(device = %m.device, stream = %m.stream, forgotten, "Too many holes: forgot the oldest (a late record in them would be dropped).");
                    }
                    outcome
                }
            };
            if outcome == Insert::Duplicate {
                self.counters.duplicates += 1;
                continue;
            }
            h.dirty = true;
            self.counters.records += 1;
            if !output::record(self.format, m, r, out) {
                self.counters.unrepresentable += 1;
            }
            if m.stream == LOSS_STREAM {
                note_loss(h, r);
            }
        }
    }

    fn review(&mut self, held: &mut BTreeMap<String, Held>, now: u64, out: &mut String) {
        for (device, h) in held.iter_mut() {
            let mut events: Vec<GapEvent> = Vec::new();
            for (stream, st) in h.state.streams.iter_mut() {
                events.extend(gaps::review(stream, st, now, self.gap_timeout_ms));
            }
            if h.state.streams.values().any(gaps::has_open) {
                self.watch.insert(device.clone());
            }
            for e in &events {
                if e.reason.is_some() {
                    self.counters.losses += 1;
                    self.counters.lost_seqs += e.count();
                } else {
                    self.counters.gaps += 1;
                    self.counters.gap_seqs += e.count();
                    tracing::warn!(device = %device, stream = %e.stream, first_seq = e.first_seq, last_seq = e.last_seq, "Gap with no loss report.");
                }
                output::gap(self.format, device, e, now, out);
            }
            h.dirty |= !events.is_empty();
        }
    }

    /// Steps 4-6 of the module doc.
    fn finish(&mut self, mut held: BTreeMap<String, Held>, out: &str) -> Result<(), BatchError> {
        for h in held.values_mut() {
            self.store.prepare(h)?;
        }
        if !out.is_empty() {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(out.as_bytes())
                .and_then(|()| stdout.flush())
                .map_err(BatchError::Output)?;
        }
        let any = held.values().any(|h| h.dirty);
        for h in held.into_values() {
            self.store.commit(h)?;
        }
        if any {
            self.store.sync()?;
        }
        Ok(())
    }
}

/// Notes a `ferry.loss` record `{stream, first_seq, last_seq, reason}` for its stream (loss
/// records without a seq range, e.g. a collector's dropped input, use no seqs: nothing to note).
fn note_loss(h: &mut Held, r: &crate::record::Record) {
    let Body::Fields(fields) = &r.body else {
        return;
    };
    let get = |k: &str| fields.iter().find(|(n, _)| n == k).map(|(_, v)| v);
    let num = |k: &str| match get(k) {
        Some(Value::U64(v)) => Some(*v),
        Some(Value::I64(v)) => u64::try_from(*v).ok(),
        _ => None,
    };
    let (Some(Value::Str(stream)), Some(first), Some(last)) =
        (get("stream"), num("first_seq"), num("last_seq"))
    else {
        return;
    };
    let reason = match get("reason") {
        Some(Value::Str(s)) => s.as_str(),
        _ => "unknown",
    };
    h.dirty = true;
    let st = h
        .state
        .streams
        .entry(stream.clone())
        .or_insert_with(|| StreamState {
            seen: None,
            losses: BTreeMap::new(),
        });
    gaps::note_loss(st, first, last, reason);
}
