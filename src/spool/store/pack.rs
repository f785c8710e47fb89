//! Assigning seqs and packing records into chunks: the spool's value format at write time.
//!
//! # Invariants
//! - A record's seq is its stream's `next_seq`, taken in the order the records come; seqs
//!   are consecutive within a stream and the counter only grows (nothing here gives one back:
//!   a chunk the cap drops keeps its seqs used up).
//! - Chunk ids come from the global counter and only grow, so per-stream key order is FIFO
//!   and the smallest chunk id is the oldest data.
//! - A chunk holds at most `chunk_max_records` records and at most `chunk_max_bytes` of
//!   encoded records, unless a single record is larger; a command reply is a chunk of its own
//!   (the unit of acknowledgement).
//! - The stream's counters (records, bytes, chunks) grow with every chunk packed, in the
//!   caller's draft: they hold the new chunks until the cap or the batch says otherwise.

use super::{GlobalMeta, StreamMeta, Tables};
use crate::clock::{ClockState, Snapshot};
use crate::loss::Loss;
use crate::record::{Body, COMMANDS_STREAM, LOSS_STREAM};
use crate::spool::chunk::{self, Header};
use crate::spool::{SpoolSettings, keys};

/// A chunk about to be written: its key, the seqs it holds and its value.
pub(super) struct NewChunk {
    pub(super) stream_id: u32,
    pub(super) chunk_id: u64,
    pub(super) first_seq: u64,
    pub(super) count: u64,
    pub(super) value: Vec<u8>,
}

impl NewChunk {
    /// Bytes it counts against the cap: its value and its key.
    pub(super) fn bytes(&self) -> u64 {
        (self.value.len() + 13) as u64
    }
}

/// Packs loss reports into new chunks of the loss stream.
pub(super) fn pack_losses(
    draft: &mut Tables,
    losses: &[Loss],
    committed_ms: u64,
    clock: &Snapshot,
    settings: &SpoolSettings,
    out: &mut Vec<NewChunk>,
) {
    let bodies: Vec<Body> = losses.iter().map(Loss::to_body).collect();
    let sid = draft.stream_id(LOSS_STREAM);
    let meta = draft
        .metas
        .get_mut(&sid)
        .expect("loss stream id was just ensured");
    pack(
        sid,
        meta,
        &mut draft.global,
        bodies
            .iter()
            .map(|b| (committed_ms, clock.stamp(committed_ms), b)),
        committed_ms,
        settings,
        out,
    );
}

/// Assigns seqs to `records` and packs them into chunks bounded by the chunk limits.
pub(super) fn pack<'a>(
    sid: u32,
    meta: &mut StreamMeta,
    global: &mut GlobalMeta,
    records: impl Iterator<Item = (u64, ClockState, &'a Body)>,
    committed_ms: u64,
    settings: &SpoolSettings,
    out: &mut Vec<NewChunk>,
) {
    let mut buf = Vec::new();
    let mut count = 0u64;
    let mut first_seq = meta.next_seq;
    // Replies go out one per message, so each is its own chunk (the unit of acknowledgement).
    let max_records = if meta.name == COMMANDS_STREAM {
        1
    } else {
        settings.chunk_max_records
    };
    let mut flush = |buf: &mut Vec<u8>,
                     count: &mut u64,
                     first_seq: &mut u64,
                     meta: &mut StreamMeta,
                     global: &mut GlobalMeta| {
        if *count == 0 {
            return;
        }
        let value = chunk::assemble(
            Header {
                committed_ms,
                first_seq: *first_seq,
                count: *count as u32,
            },
            buf,
        );
        let c = NewChunk {
            stream_id: sid,
            chunk_id: global.next_chunk_id,
            first_seq: *first_seq,
            count: *count,
            value,
        };
        global.next_chunk_id += 1;
        meta.records += c.count;
        meta.bytes += c.bytes();
        meta.chunks += 1;
        *first_seq += *count;
        out.push(c);
        buf.clear();
        *count = 0;
    };
    for (ts, clock, body) in records {
        let before = buf.len();
        chunk::encode_record(&mut buf, ts, clock, body);
        if count > 0 && buf.len() > settings.chunk_max_bytes {
            // This record does not fit: close the chunk without it, then start a new one.
            let tail = buf.split_off(before);
            flush(&mut buf, &mut count, &mut first_seq, meta, global);
            buf = tail;
        }
        count += 1;
        meta.next_seq += 1;
        if count as usize >= max_records {
            flush(&mut buf, &mut count, &mut first_seq, meta, global);
        }
    }
    flush(&mut buf, &mut count, &mut first_seq, meta, global);
}

/// Writes new chunks into a batch under their keys.
pub(super) fn write(batch: &mut sled::Batch, new_chunks: &[NewChunk]) {
    for c in new_chunks {
        batch.insert(&keys::chunk(c.stream_id, c.chunk_id), c.value.as_slice());
    }
}
