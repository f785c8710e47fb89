//! Reading and encoding the next messages, on the blocking pool: up to `count` batches from
//! the spool in drain order (lanes, live-first) after the epoch's [`DrainState`], each encoded
//! in its stream's wire format (or as a reply), within the in-flight byte budget and the
//! wire byte budget, held back while a batch that is not full lingers.

use super::Sent;
use super::options::Topics;
use super::payload::{self, Origin};
use crate::config::StreamSettings;
use crate::record::{COMMANDS_STREAM, now_ms};
use crate::spool::{DrainState, Lane, Pick, Spool};
use std::collections::HashMap;
use std::sync::Arc;

/// One message ready to publish.
pub(super) struct Prepared {
    pub(super) topic: String,
    pub(super) payload: Vec<u8>,
    pub(super) sent: Sent,
    /// Records of this message published before.
    pub(super) resent: u64,
    /// Larger than the packet limit: cannot be sent.
    pub(super) oversize: bool,
    /// The MQTT PUBLISH packet's size, what the byte budget counts.
    pub(super) wire_bytes: u64,
    pub(super) pick: Pick,
}

pub(super) struct PrepareOutcome {
    pub(super) messages: Vec<Prepared>,
    pub(super) drain: DrainState,
    /// A normal or bulk message did not fit in the wire budget: its packet size.
    pub(super) over_budget: Option<u64>,
    /// When the batch held back by `linger` is due (ms since the epoch).
    pub(super) linger_due_ms: Option<u64>,
    /// The spool had nothing more to send.
    pub(super) exhausted: bool,
}

/// Reads and encodes up to `count` messages; runs on the blocking pool.
pub(super) struct PrepareJob {
    pub(super) spool: Spool,
    pub(super) drain: DrainState,
    pub(super) streams: Arc<StreamSettings>,
    /// Wire bytes the normal and bulk lanes may still use (`None`: no budget).
    pub(super) wire_left: Option<u64>,
    pub(super) limits: crate::config::BatchLimits,
    pub(super) max_packet_bytes: usize,
    pub(super) topics: Topics,
    pub(super) origin: Origin,
    pub(super) ignore_linger: bool,
    pub(super) count: usize,
    pub(super) sent_high: HashMap<u32, u64>,
    /// Payload bytes these messages may take together; the first may exceed it if nothing is
    /// in flight (`must_send_one`).
    pub(super) byte_budget: Option<usize>,
    pub(super) must_send_one: bool,
}

impl PrepareJob {
    pub(super) fn run(mut self) -> Result<PrepareOutcome, crate::spool::SpoolError> {
        let mut messages = Vec::new();
        let mut linger_due_ms = None;
        let mut exhausted = false;
        let mut inflight_left = self.byte_budget;
        let mut over_budget = None;
        while messages.len() < self.count {
            // A small budget also makes small messages, so a ping never waits long behind one.
            let max_bytes = match inflight_left {
                Some(b) if b < 1024 && !(messages.is_empty() && self.must_send_one) => break,
                Some(b) => self.limits.max_bytes.min(b.max(1024)),
                None => self.limits.max_bytes,
            };
            let high_only = self.wire_left == Some(0);
            let Some(batch) = self.spool.drain_batch(
                &self.drain,
                &self.limits,
                &self.streams.drain,
                high_only,
            )?
            else {
                exhausted = true;
                break;
            };
            let is_reply = batch.stream == COMMANDS_STREAM;
            if !batch.full && !is_reply && !self.ignore_linger && !self.limits.linger.is_zero() {
                let due = batch.chunks[0].committed_ms + self.limits.linger.as_millis() as u64;
                if now_ms() < due {
                    linger_due_ms = Some(due);
                    break;
                }
            }
            let (topic, payload, used) = if is_reply {
                let record = &batch.chunks[0].records[0];
                (
                    self.topics.replies(),
                    payload::encode_reply(&self.origin, record),
                    1,
                )
            } else {
                let format = self.streams.format(&batch.stream);
                let (p, used) = crate::wire::encode(
                    format,
                    &self.origin,
                    &batch.stream,
                    &batch.chunks,
                    max_bytes,
                );
                (self.topics.data(&batch.stream), p, used)
            };
            let wire_bytes = crate::wire::publish_packet_bytes(topic.len(), payload.len()) as u64;
            if let Some(left) = self.wire_left.as_mut() {
                if batch.lane != Lane::High && wire_bytes > *left {
                    // Not sent, not advanced: it goes when the next period starts.
                    over_budget = Some(wire_bytes);
                    *left = 0;
                    continue;
                }
                *left = left.saturating_sub(wire_bytes);
            }
            let chunks = &batch.chunks[..used];
            let last = chunks
                .last()
                .expect("encode uses at least one chunk")
                .chunk_id;
            self.drain.advance(&batch, last);
            let sent = Sent {
                stream_id: batch.stream_id,
                chunk_ids: chunks.iter().map(|c| c.chunk_id).collect(),
                records: chunks.iter().map(|c| c.records.len() as u64).sum(),
                bytes: payload.len(),
            };
            // MQTT fixed header (<= 5) + topic length (2) + topic + packet id (2).
            let oversize = payload.len() + topic.len() + 9 > self.max_packet_bytes;
            let high = self.sent_high.get(&batch.stream_id).copied();
            let resent = chunks
                .iter()
                .filter(|c| high.is_some_and(|h| c.chunk_id <= h))
                .map(|c| c.records.len() as u64)
                .sum();
            if let Some(b) = inflight_left.as_mut() {
                *b = b.saturating_sub(payload.len());
            }
            messages.push(Prepared {
                topic,
                payload,
                sent,
                resent,
                oversize,
                wire_bytes,
                pick: batch.pick,
            });
        }
        Ok(PrepareOutcome {
            messages,
            drain: self.drain,
            over_budget,
            linger_due_ms,
            exhausted,
        })
    }
}
