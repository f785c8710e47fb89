//! Reading: the next batch of one stream in the order of [`drain`](crate::spool::drain).
//!
//! # Invariants
//! - Only chunks below [`Inner::readable_below`](super::Inner) are handed out: a record is
//!   never sent before it is durable, so a crash can never make a delivered seq be reused.
//! - A batch is consecutive chunks of one stream after the epoch's cursors, oldest first, and
//!   holds at least one chunk; it stops at `max_records` / `max_bytes` (the first chunk always
//!   fits) and says so (`full`). Command replies go one chunk per batch.
//! - The high lane goes first; between normal and bulk the weights decide when both have data;
//!   within a lane, command replies first, then the stream whose pending data is oldest.
//! - A chunk that does not decode is moved aside (`badchunk`) in its own flushed batch, with
//!   its `spool_corrupt` loss record, and the read goes on: never an error that stops delivery.

use super::Spool;
use super::pack::{self, pack_losses};
use crate::clock::now_ms;
use crate::record::{COMMANDS_STREAM, ChunkData};
use crate::spool::badchunk::{self, StreamView};
use crate::spool::drain::{DrainRules, DrainState, Lane, Pick};
use crate::spool::{BatchLimits, SpoolError, chunk, keys};
use std::collections::HashMap;
use std::sync::atomic::Ordering;

/// Consecutive chunks of one stream, oldest first.
#[derive(Debug, Clone)]
pub struct Batch {
    pub stream_id: u32,
    pub stream: String,
    pub chunks: Vec<ChunkData>,
    /// True when a limit stopped the batch (more records of this stream are waiting).
    pub full: bool,
    pub lane: Lane,
    /// Which part of the stream it was read from.
    pub pick: Pick,
    /// Normal and bulk both had data when it was picked.
    pub contested: bool,
}

impl Batch {
    pub fn record_count(&self) -> usize {
        self.chunks.iter().map(|c| c.records.len()).sum()
    }
}

/// A stream with chunks to send, and the chunk-id range to read them from.
struct Candidate {
    sid: u32,
    name: String,
    lane: Lane,
    pick: Pick,
    start: u64,
    end: u64,
    /// The oldest chunk id it has pending.
    oldest: u64,
}

impl Spool {
    /// The oldest chunks of one stream after `cursors` (chunk id sent last per stream), in
    /// plain oldest-first order with command replies and loss records first.
    pub fn next_batch(
        &self,
        cursors: &HashMap<u32, u64>,
        limits: &BatchLimits,
    ) -> Result<Option<Batch>, SpoolError> {
        self.drain_batch(
            &DrainState::from_backlog(cursors),
            limits,
            &DrainRules::default(),
            false,
            &[],
        )
    }

    /// The next batch to send in the order of [`crate::spool::drain`]: lane first, then the
    /// stream whose pending data is oldest; `high_only` when only the high lane may flow (byte
    /// budget spent); streams in `skip` (e.g. lingering) are passed over. The caller records
    /// what it sent with [`DrainState::advance`].
    pub fn drain_batch(
        &self,
        state: &DrainState,
        limits: &BatchLimits,
        rules: &DrainRules,
        high_only: bool,
        skip: &[u32],
    ) -> Result<Option<Batch>, SpoolError> {
        let readable = self.inner.readable_below.load(Ordering::Acquire);
        if readable == 0 {
            return Ok(None);
        }
        let candidates = self.candidates(state, rules, high_only, skip, readable)?;
        let Some((pick, lane, contested)) = choose(candidates, state, rules) else {
            return Ok(None);
        };
        let (batch, moved_aside) = self.read_pick(pick, lane, contested, limits)?;
        if batch.chunks.is_empty() && moved_aside {
            // Every chunk in reach was bad and is gone now: pick again.
            return self.drain_batch(state, limits, rules, high_only, skip);
        }
        Ok(Some(batch))
    }

    /// The first readable chunk id of stream `sid` in `start..end`.
    fn head(&self, sid: u32, start: u64, end: u64) -> Result<Option<u64>, SpoolError> {
        if start >= end {
            return Ok(None);
        }
        match self
            .inner
            .tree
            .range(keys::chunk(sid, start)..keys::chunk(sid, end))
            .next()
        {
            Some(item) => Ok(Some(keys::chunk_id(&item?.0).expect("chunk key"))),
            None => Ok(None),
        }
    }

    /// Every stream with readable chunks after its cursor, with the part to read: what was
    /// committed after the newest chunk sent (`Fresh`), else the newest backlog chunks for a
    /// live-first stream not yet ahead (`Newest`), else the backlog.
    fn candidates(
        &self,
        state: &DrainState,
        rules: &DrainRules,
        high_only: bool,
        skip: &[u32],
        readable: u64,
    ) -> Result<Vec<Candidate>, SpoolError> {
        let mut candidates = Vec::new();
        for (sid, name) in self.streams_with_data() {
            let rule = rules.of(&name);
            if (high_only && rule.lane != Lane::High) || skip.contains(&sid) {
                continue;
            }
            let c = state.cursor(sid);
            let (b_start, b_end) = (c.backlog_start(), c.ahead.map_or(readable, |a| a.0));
            let backlog = self.head(sid, b_start, b_end)?;
            let fresh = match c.ahead {
                Some((_, last)) => self.head(sid, last + 1, readable)?.map(|h| (h, last + 1)),
                None => None,
            };
            let (pick, start, end, first) = match (fresh, backlog) {
                (Some((h, start)), _) => (Pick::Fresh, start, readable, h),
                (None, Some(h)) if rule.live_first && c.ahead.is_none() => {
                    (Pick::Newest, b_start, b_end, h)
                }
                (None, Some(h)) => (Pick::Backlog, b_start, b_end, h),
                (None, None) => continue,
            };
            candidates.push(Candidate {
                sid,
                name,
                lane: rule.lane,
                pick,
                start,
                end,
                oldest: backlog.unwrap_or(first).min(first),
            });
        }
        Ok(candidates)
    }

    /// Reads the picked range into a batch up to the limits (newest first for `Newest`, then
    /// put in oldest-first order), moving unreadable chunks aside; returns the batch and
    /// whether a chunk was moved aside.
    fn read_pick(
        &self,
        pick: Candidate,
        lane: Lane,
        contested: bool,
        limits: &BatchLimits,
    ) -> Result<(Batch, bool), SpoolError> {
        let mut batch = Batch {
            stream_id: pick.sid,
            stream: pick.name,
            chunks: Vec::new(),
            full: false,
            lane,
            pick: pick.pick,
            contested,
        };
        let one_chunk = batch.stream == COMMANDS_STREAM;
        let range = self
            .inner
            .tree
            .range(keys::chunk(pick.sid, pick.start)..keys::chunk(pick.sid, pick.end));
        let (mut records, mut bytes) = (0usize, 0usize);
        let items: Box<dyn Iterator<Item = _>> = if pick.pick == Pick::Newest {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut read_all = true;
        let mut moved_aside = false;
        for item in items {
            if one_chunk && !batch.chunks.is_empty() {
                read_all = false;
                break;
            }
            let (k, v) = item?;
            let (h, recs) = match chunk::decode(&v) {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.take_bad_chunk(pick.sid, &k, &v, &e)?;
                    moved_aside = true;
                    continue;
                }
            };
            let size = k.len() + v.len();
            if !batch.chunks.is_empty()
                && (records + recs.len() > limits.max_records || bytes + size > limits.max_bytes)
            {
                read_all = false;
                break;
            }
            records += recs.len();
            bytes += size;
            batch.chunks.push(ChunkData {
                chunk_id: keys::chunk_id(&k).expect("chunk key"),
                committed_ms: h.committed_ms,
                stored_bytes: size,
                records: recs,
            });
            if records >= limits.max_records {
                read_all = false;
                break;
            }
        }
        // A limit stopped the batch: more of the stream waits (for Newest: older chunks).
        batch.full = !read_all || records >= limits.max_records;
        if pick.pick == Pick::Newest {
            batch.chunks.reverse();
        }
        Ok((batch, moved_aside))
    }

    /// Moves an unreadable chunk met by the drain aside ([`badchunk`]): exports it, deletes it,
    /// and writes its `spool_corrupt` loss record, in one flushed batch.
    fn take_bad_chunk(
        &self,
        sid: u32,
        key: &[u8],
        value: &[u8],
        why: &SpoolError,
    ) -> Result<(), SpoolError> {
        let mut state = self.lock();
        // Acked, evicted or taken by someone else meanwhile: nothing to do.
        if self.inner.tree.get(key)?.is_none_or(|v| v != value) {
            return Ok(());
        }
        let mut draft = state.draft();
        let Some(meta) = draft.metas.get_mut(&sid) else {
            return Ok(());
        };
        let view = StreamView {
            sid,
            name: &meta.name,
            records: meta.records,
            from: 0,
            next_seq: meta.next_seq,
            seq_floor: draft.global.seq_floor,
        };
        let cid = keys::chunk_id(key).expect("chunk key");
        let dir = &self.inner.settings.dir;
        let taken = badchunk::take(&self.inner.tree, dir, &view, cid, value, why)?;
        meta.records = meta.records.saturating_sub(taken.records);
        meta.bytes = meta.bytes.saturating_sub((key.len() + value.len()) as u64);
        meta.chunks = meta.chunks.saturating_sub(1);
        draft.counters.count(&taken.loss);
        let mut new_chunks = Vec::new();
        let now = now_ms();
        let clock = self.clock().snapshot();
        let settings = &self.inner.settings;
        let losses = [taken.loss];
        pack_losses(&mut draft, &losses, now, &clock, settings, &mut new_chunks);
        let mut batch = sled::Batch::default();
        batch.remove(key);
        pack::write(&mut batch, &new_chunks);
        draft.write_meta(&state.tables, &mut batch);
        // The loss record takes a seq: no seq reaches the tree before its reservation.
        draft.reserve_seqs(&mut state.seq)?;
        let readable = draft.global.next_chunk_id;
        self.inner.tree.apply_batch(batch)?;
        let synced = state.apply(draft);
        drop(state);
        self.sync()?;
        self.lock().synced(synced);
        self.publish(readable);
        Ok(())
    }
}

/// The lane to serve (high first; the weights between normal and bulk when both have data)
/// and, in it, command replies first, then the stream whose pending data is oldest. Returns
/// the pick, its lane and whether normal and bulk were contested.
fn choose(
    candidates: Vec<Candidate>,
    state: &DrainState,
    rules: &DrainRules,
) -> Option<(Candidate, Lane, bool)> {
    let has = |lane: Lane| candidates.iter().any(|c| c.lane == lane);
    let contested = has(Lane::Normal) && has(Lane::Bulk);
    let lane = if has(Lane::High) {
        Lane::High
    } else if contested {
        state.lower_lane(rules.weights)
    } else if has(Lane::Normal) {
        Lane::Normal
    } else if has(Lane::Bulk) {
        Lane::Bulk
    } else {
        return None;
    };
    let pick = candidates
        .into_iter()
        .filter(|c| c.lane == lane)
        .min_by_key(|c| (c.name != COMMANDS_STREAM, c.oldest))
        .expect("the lane has a candidate");
    Some((pick, lane, contested))
}
