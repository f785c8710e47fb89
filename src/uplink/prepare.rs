//! Reading and encoding the next messages, on the blocking pool: up to `count` batches from
//! the spool in drain order (lanes, live-first) after the epoch's [`DrainState`], each encoded
//! in its stream's wire format (or as a reply), within the in-flight byte budget and the
//! wire byte budget, held back while a batch that is not full lingers.

use super::StreamSettings;
use super::acks::Sent;
use super::options::Topics;
use crate::clock::now_ms;
use crate::record::COMMANDS_STREAM;
use crate::spool::{DrainState, Lane, Pick, Spool};
use crate::wire::payload::{self, Origin};
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
    /// The stream's name and the seqs this message carries (first, last).
    pub(super) stream: String,
    pub(super) seqs: (u64, u64),
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
    pub(super) limits: crate::spool::BatchLimits,
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
        let mut lingering: Vec<u32> = Vec::new();
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
                &lingering,
            )?
            else {
                // Nothing more, or only lingering batches (then not exhausted: they are due).
                exhausted = lingering.is_empty();
                break;
            };
            let is_reply = batch.stream == COMMANDS_STREAM;
            // The high lane (replies, loss reports, streams an operator marked urgent) never
            // waits for a fuller batch: a long linger is for bulk economy, not for alarms.
            let urgent = batch.lane == Lane::High;
            if !batch.full && !urgent && !self.ignore_linger && !self.limits.linger.is_zero() {
                let due = batch.chunks[0].committed_ms + self.limits.linger.as_millis() as u64;
                if now_ms() < due {
                    // Wait for more of this stream, but let the other streams go meanwhile.
                    linger_due_ms = Some(linger_due_ms.map_or(due, |d: u64| d.min(due)));
                    lingering.push(batch.stream_id);
                    continue;
                }
            }
            let topic = if is_reply {
                self.topics.replies()
            } else {
                self.topics.data(&batch.stream)
            };
            // The normal and bulk lanes are cut to what is left of the wire budget, so a
            // period is used up to less than one stored chunk.
            let budget_bytes = self
                .wire_left
                .filter(|_| batch.lane != Lane::High)
                .map(|left| payload_room(left, topic.len()));
            let (payload, used) = if is_reply {
                let record = &batch.chunks[0].records[0];
                (payload::encode_reply(&self.origin, record), 1)
            } else {
                let format = self.streams.format(&batch.stream);
                crate::wire::encode(
                    format,
                    &self.origin,
                    &batch.stream,
                    &batch.chunks,
                    budget_bytes.map_or(max_bytes, |b| max_bytes.min(b)),
                )
            };
            let wire_bytes = crate::wire::publish_packet_bytes(topic.len(), payload.len()) as u64;
            // MQTT fixed header (<= 5) + topic length (2) + topic + packet id (2).
            let oversize = payload.len() + topic.len() + 9 > self.max_packet_bytes;
            // An oversize message is never sent (it becomes a loss record), so the budget
            // does not hold it back: it would stop its lane for good.
            if let Some(left) = self.wire_left.as_mut()
                && !oversize
            {
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
            let seq_of = |c: Option<&crate::record::Record>| c.map_or(0, |r| r.seq);
            let seqs = (
                seq_of(chunks.first().and_then(|c| c.records.first())),
                seq_of(chunks.last().and_then(|c| c.records.last())),
            );
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
                stream: batch.stream.clone(),
                seqs,
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

/// Payload bytes a PUBLISH on a topic of `topic_len` bytes may carry within `left` wire bytes
/// (see [`crate::wire::publish_packet_bytes`]: at most 9 bytes besides topic and payload).
fn payload_room(left: u64, topic_len: usize) -> usize {
    (left as usize).saturating_sub(topic_len + 9)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::{Reading, Value};
    use crate::spool::{BatchLimits, FullPolicy, SpoolSettings};
    use crate::spool::{DrainRules, Intake, StreamDrain};
    use std::time::Duration;

    fn commit(spool: &Spool, stream: &str, n: u64) {
        for i in 0..n {
            let r = Reading::fields(stream, vec![("i".into(), Value::U64(i))]);
            spool.commit(&[Intake::reading(r)]).unwrap();
        }
    }

    fn spool(dir: &std::path::Path) -> Spool {
        Spool::open(&SpoolSettings {
            dir: dir.join("spool"),
            max_bytes: 1 << 30,
            full_policy: FullPolicy::DropOldest,
            flush_interval: Duration::from_millis(10),
            flush_max_records: 1000,
            cache_bytes: 1 << 20,
            min_free_bytes: 0,
            chunk_max_records: 2,
            chunk_max_bytes: 4096,
        })
        .unwrap()
    }

    fn job(spool: Spool, streams: StreamSettings, count: usize) -> PrepareJob {
        PrepareJob {
            spool,
            drain: DrainState::default(),
            streams: Arc::new(streams),
            wire_left: None,
            limits: BatchLimits {
                max_records: 2,
                max_bytes: 1 << 20,
                linger: Duration::from_secs(60),
            },
            max_packet_bytes: 1 << 20,
            topics: Topics::new("ferry", "gw"),
            origin: Origin {
                device: "gw".into(),
                boot: "b".into(),
            },
            ignore_linger: false,
            count,
            sent_high: HashMap::new(),
            byte_budget: None,
            must_send_one: true,
        }
    }

    #[test]
    fn a_lingering_stream_does_not_hold_back_the_others() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        // A bulk backlog (full batches) and one fresh normal record, which lingers.
        commit(&spool, "backlog", 6);
        commit(&spool, "fresh", 1);
        let mut streams = StreamSettings {
            drain: DrainRules::default(),
            ..Default::default()
        };
        streams.drain.streams.insert(
            "backlog".into(),
            StreamDrain {
                lane: Lane::Bulk,
                live_first: false,
            },
        );
        let out = job(spool, streams, 3).run().unwrap();
        let topics: Vec<&str> = out.messages.iter().map(|m| m.topic.as_str()).collect();
        assert_eq!(topics, ["ferry/gw/data/backlog"; 3]);
        assert!(out.linger_due_ms.is_some(), "the fresh batch is due later");
        assert!(!out.exhausted);
    }

    #[test]
    fn a_message_is_cut_to_what_is_left_of_the_wire_budget() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        // Ten chunks of two records each, none lingering.
        commit(&spool, "data", 20);
        let mut j = job(spool, StreamSettings::default(), 4);
        j.ignore_linger = true;
        j.limits.max_records = 20;
        let whole = {
            let mut all = job(j.spool.clone(), StreamSettings::default(), 1);
            all.ignore_linger = true;
            all.limits.max_records = 20;
            all.run().unwrap().messages.remove(0)
        };
        assert_eq!(whole.sent.records, 20, "one message takes everything");
        j.wire_left = Some(whole.wire_bytes / 2);
        let out = j.run().unwrap();
        assert_eq!(out.messages.len(), 1, "the rest does not fit");
        let m = &out.messages[0];
        assert!(
            m.sent.records > 0 && m.sent.records < 20,
            "{}",
            m.sent.records
        );
        assert!(m.wire_bytes <= whole.wire_bytes / 2);
        assert!(
            out.over_budget.is_some(),
            "the next chunk did not fit: the period is spent"
        );
    }

    #[test]
    fn the_high_lane_does_not_linger() {
        let dir = tempfile::tempdir().unwrap();
        let spool = spool(dir.path());
        // One fresh record each: a normal stream, the loss stream and a stream marked high.
        commit(&spool, "fresh", 1);
        commit(&spool, crate::record::LOSS_STREAM, 1);
        commit(&spool, "alarm", 1);
        let mut streams = StreamSettings {
            drain: DrainRules::default(),
            ..Default::default()
        };
        streams.drain.streams.insert(
            "alarm".into(),
            StreamDrain {
                lane: Lane::High,
                live_first: false,
            },
        );
        let out = job(spool, streams, 3).run().unwrap();
        let mut topics: Vec<&str> = out.messages.iter().map(|m| m.topic.as_str()).collect();
        topics.sort_unstable();
        assert_eq!(topics, ["ferry/gw/data/alarm", "ferry/gw/data/ferry.loss"]);
        assert!(
            out.linger_due_ms.is_some(),
            "the normal stream still lingers"
        );
    }
}
