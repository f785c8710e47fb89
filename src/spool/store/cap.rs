//! The byte cap (`max_bytes` of stored keys and values), applied inside a commit.
//!
//! # Invariants
//! - After a commit, the stored bytes of every stream but `ferry.loss` are at most the cap.
//!   Loss records are not evicted and are packed after the cap: the only slack above it.
//! - `drop_oldest` evicts the oldest chunks of any stream but the loss stream, in chunk-id
//!   order, down to [`EVICT_DOWN_TO`] of the cap; when even an empty spool cannot hold the
//!   group, its oldest new chunks go too and its newest part is kept. `drop_newest` keeps the
//!   new chunks that fit, in order, and drops the rest (their seqs are used up).
//! - Every dropped chunk is un-counted from its stream (records, bytes, chunks; `evicted`
//!   grows) and its seq range recorded as a loss, merged with the previous range of the same
//!   stream and reason when contiguous.
//! - `spool_full` ranges are held back ([`hold_back`]): at most one open range per stream,
//!   extended in place while the spool stays full, so a long outage adds no loss chunk.
//! - An unreadable chunk that eviction reaches is moved aside (`badchunk`), never an error
//!   that fails the commit.

use super::pack::NewChunk;
use super::{Spool, StreamMeta, Tables};
use crate::loss::{Loss, LossReason};
use crate::record::LOSS_STREAM;
use crate::spool::badchunk::{self, StreamView};
use crate::spool::{FullPolicy, SpoolError, chunk, keys};
use std::collections::{BTreeMap, HashMap};

/// When a commit would pass the cap under `drop_oldest`, evict down to this fraction of it
/// (9/10), not just enough to fit. Evicting a little every commit made sled's files grow
/// without bound (28x the cap after 80x churn); evicting in steps keeps them near 2-5x
/// (`benches/spool_churn.rs`, docs/PERFORMANCE.md). The extra records evicted are the oldest
/// and are reported like any eviction.
const EVICT_DOWN_TO: (u64, u64) = (9, 10);

/// Seq ranges dropped in one commit, per (stream, reason), merged when contiguous.
#[derive(Default)]
struct Losses {
    ranges: Vec<Loss>,
}

impl Losses {
    fn add(&mut self, stream: &str, reason: LossReason, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let last = first + count - 1;
        let same = |l: &&mut Loss| l.stream.as_deref() == Some(stream) && l.reason == reason;
        if let Some(l) = self.ranges.iter_mut().filter(same).last()
            && l.extend(first, last)
        {
            return;
        }
        self.ranges.push(Loss::range(stream, reason, first, last));
    }
}

/// What the cap took from one commit: the dropped seq ranges, and how many records were
/// evicted (`drop_oldest`) and not stored (`drop_newest`).
#[derive(Default)]
pub(super) struct Capped {
    pub(super) losses: Vec<Loss>,
    pub(super) evicted: u64,
    pub(super) dropped: u64,
}

/// What a commit's cap works on: the draft's stream metadata and the new chunks, and what it
/// took so far.
struct Cut<'a> {
    metas: &'a mut BTreeMap<u32, StreamMeta>,
    new_chunks: &'a mut Vec<NewChunk>,
    losses: Losses,
    evicted: u64,
    dropped: u64,
}

impl Spool {
    /// Applies the byte cap to a commit: under `drop_oldest` evicts the oldest chunks of any
    /// stream but the loss stream into `batch`, under `drop_newest` drops the new chunks that
    /// do not fit; adjusts the draft's metadata and returns what it dropped.
    pub(super) fn enforce_cap(
        &self,
        draft: &mut Tables,
        new_chunks: &mut Vec<NewChunk>,
        batch: &mut sled::Batch,
    ) -> Result<Capped, SpoolError> {
        let settings = &self.inner.settings;
        let new_bytes: u64 = new_chunks.iter().map(NewChunk::bytes).sum();
        let total = draft.metas.values().map(|m| m.bytes).sum::<u64>();
        if total + new_bytes <= settings.max_bytes {
            return Ok(Capped::default());
        }
        let skip = draft.ids.get(LOSS_STREAM).copied();
        let seq_floor = draft.global.seq_floor;
        let mut cut = Cut {
            metas: &mut draft.metas,
            new_chunks,
            losses: Losses::default(),
            evicted: 0,
            dropped: 0,
        };
        match settings.full_policy {
            FullPolicy::DropOldest => {
                let total = self.evict_oldest(&mut cut, skip, seq_floor, total, batch)?;
                keep_newest(&mut cut, settings.max_bytes, total);
            }
            FullPolicy::DropNewest => drop_newest(&mut cut, settings.max_bytes, total),
        }
        Ok(Capped {
            losses: cut.losses.ranges,
            evicted: cut.evicted,
            dropped: cut.dropped,
        })
    }

    /// Evicts the oldest stored chunks of every stream but `skip` until the stored bytes
    /// (`total`) and the new chunks fit in [`EVICT_DOWN_TO`] of the cap, or nothing is left to
    /// evict; returns the stored bytes left.
    fn evict_oldest(
        &self,
        cut: &mut Cut<'_>,
        skip: Option<u32>,
        seq_floor: u64,
        mut total: u64,
        batch: &mut sled::Batch,
    ) -> Result<u64, SpoolError> {
        let settings = &self.inner.settings;
        let new_bytes: u64 = cut.new_chunks.iter().map(NewChunk::bytes).sum();
        let mut evict_from: HashMap<u32, u64> = HashMap::new();
        let target = settings.max_bytes / EVICT_DOWN_TO.1 * EVICT_DOWN_TO.0;
        while total + new_bytes > target {
            let Some((sid, key, value)) = self.oldest_chunk(cut.metas, skip, &evict_from)? else {
                break;
            };
            let cid = keys::chunk_id(&key).expect("chunk key");
            let from = evict_from.insert(sid, cid + 1).unwrap_or(0);
            let bytes = (value.len() + key.len()) as u64;
            let meta = cut.metas.get_mut(&sid).expect("evicted chunk has a stream");
            match chunk::header(&value) {
                Ok(h) => {
                    meta.records -= h.count as u64;
                    meta.evicted += h.count as u64;
                    cut.evicted += h.count as u64;
                    let (first, count) = (h.first_seq, h.count as u64);
                    cut.losses
                        .add(&meta.name, LossReason::Evicted, first, count);
                }
                Err(e) => {
                    let bad = BadChunk {
                        sid,
                        cid,
                        from,
                        value: &value,
                        why: &e,
                    };
                    let loss = self.evict_bad(meta, &bad, cut.new_chunks, seq_floor)?;
                    cut.losses.ranges.push(loss);
                }
            }
            meta.bytes -= bytes;
            meta.chunks -= 1;
            total -= bytes;
            batch.remove(key);
        }
        Ok(total)
    }

    /// Eviction met an unreadable chunk: moves it aside ([`badchunk`]) and un-counts it from
    /// `meta`, whose records with chunk id `>= bad.from` are those left in the tree plus this
    /// commit's `new_chunks`.
    fn evict_bad(
        &self,
        meta: &mut StreamMeta,
        bad: &BadChunk<'_>,
        new_chunks: &[NewChunk],
        seq_floor: u64,
    ) -> Result<Loss, SpoolError> {
        let new = new_chunks.iter().filter(|c| c.stream_id == bad.sid);
        let unstored: u64 = new.clone().map(|c| c.count).sum();
        let view = StreamView {
            sid: bad.sid,
            name: &meta.name,
            records: meta.records - unstored,
            from: bad.from,
            next_seq: new.map(|c| c.first_seq).min().unwrap_or(meta.next_seq),
            seq_floor,
        };
        let dir = &self.inner.settings.dir;
        let taken = badchunk::take(&self.inner.tree, dir, &view, bad.cid, bad.value, bad.why)?;
        meta.records -= taken.records;
        Ok(taken.loss)
    }

    /// The oldest stored chunk of any stream but `skip`, after the per-stream `from` bounds.
    #[allow(clippy::type_complexity)]
    fn oldest_chunk(
        &self,
        metas: &BTreeMap<u32, StreamMeta>,
        skip: Option<u32>,
        from: &HashMap<u32, u64>,
    ) -> Result<Option<(u32, sled::IVec, sled::IVec)>, SpoolError> {
        let mut best: Option<(u32, sled::IVec, sled::IVec)> = None;
        for (&sid, meta) in metas {
            if Some(sid) == skip || meta.chunks == 0 {
                continue;
            }
            let start = from.get(&sid).copied().unwrap_or(0);
            let head = self
                .inner
                .tree
                .range(keys::chunk(sid, start)..=keys::chunk(sid, u64::MAX))
                .next()
                .transpose()?;
            if let Some((k, v)) = head {
                let older = best
                    .as_ref()
                    .is_none_or(|(_, bk, _)| keys::chunk_id(&k) < keys::chunk_id(bk));
                if older {
                    best = Some((sid, k, v));
                }
            }
        }
        Ok(best)
    }
}

/// An unreadable chunk that eviction met: stream and chunk id, the chunk id its stream's
/// remaining records start at, its bytes and why it does not decode.
struct BadChunk<'a> {
    sid: u32,
    cid: u64,
    from: u64,
    value: &'a [u8],
    why: &'a SpoolError,
}

/// `drop_oldest` after eviction: even an empty spool cannot hold this group, so its oldest new
/// chunks are dropped (as evicted) and its newest part kept.
fn keep_newest(cut: &mut Cut<'_>, max_bytes: u64, total: u64) {
    let new_bytes: u64 = cut.new_chunks.iter().map(NewChunk::bytes).sum();
    let mut excess = (total + new_bytes).saturating_sub(max_bytes);
    let Cut {
        metas,
        new_chunks,
        losses,
        evicted,
        ..
    } = cut;
    new_chunks.retain(|c| {
        if excess == 0 {
            return true;
        }
        excess = excess.saturating_sub(c.bytes());
        drop_new(metas, c, losses, LossReason::Evicted, evicted);
        false
    });
}

/// `drop_newest`: keeps the new chunks that fit in the room left, in order, and drops every
/// chunk from the first that does not (as `spool_full`).
fn drop_newest(cut: &mut Cut<'_>, max_bytes: u64, total: u64) {
    let mut room = max_bytes.saturating_sub(total);
    let mut full = false;
    let Cut {
        metas,
        new_chunks,
        losses,
        dropped,
        ..
    } = cut;
    new_chunks.retain(|c| {
        if !full && c.bytes() <= room {
            room -= c.bytes();
            return true;
        }
        full = true;
        drop_new(metas, c, losses, LossReason::SpoolFull, dropped);
        false
    });
}

/// Un-counts a chunk of this commit that will not be stored, and records its seqs as lost.
fn drop_new(
    metas: &mut BTreeMap<u32, StreamMeta>,
    c: &NewChunk,
    losses: &mut Losses,
    reason: LossReason,
    counter: &mut u64,
) {
    let meta = metas.get_mut(&c.stream_id).expect("new chunk has a stream");
    meta.records -= c.count;
    meta.bytes -= c.bytes();
    meta.chunks -= 1;
    meta.evicted += c.count;
    *counter += c.count;
    losses.add(&meta.name, reason, c.first_seq, c.count);
}

/// Moves this commit's `spool_full` ranges into `pending`, extending a held range in place
/// when it follows on directly, so a spool that stays full under `drop_newest` writes no new
/// loss chunk per commit. Returns the ranges to write now: a held range that a new one does not
/// follow (records of the stream were stored in between), and, once a commit drops nothing,
/// every held range (room is back).
pub(super) fn hold_back(pending: &mut Vec<Loss>, losses: Vec<Loss>) -> Vec<Loss> {
    let mut now = Vec::new();
    let mut dropped = false;
    for l in losses {
        if l.reason != LossReason::SpoolFull {
            now.push(l);
            continue;
        }
        dropped = true;
        let (first, last) = l.seqs.expect("a spool_full loss has seqs");
        match pending
            .iter_mut()
            .find(|p| p.stream == l.stream && p.reason == l.reason)
        {
            Some(p) => {
                if !p.extend(first, last) {
                    now.push(std::mem::replace(p, l));
                }
            }
            None => pending.push(l),
        }
    }
    if !dropped {
        now.append(pending);
    }
    now
}
