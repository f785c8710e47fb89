//! Acknowledgement: deleting chunks once the broker's PUBACK for them arrived.
//!
//! # Invariants
//! - Only acknowledged chunks leave this way; a chunk already gone (evicted meanwhile, acked
//!   twice) is skipped, and an unreadable one is left to the drain (it was never handed out).
//! - The deletions of one call and their streams' counters go in one sled batch, under the
//!   lock; the in-memory metadata follows only once it is applied.
//! - Deletion is lazy (not flushed): if a crash loses it, the chunk is sent again (a
//!   duplicate, never a loss).

use super::{Spool, StreamMeta, encode_meta};
use crate::spool::chunk::{self, Header};
use crate::spool::{SpoolError, keys};
use tracing::warn;

impl Spool {
    /// Deletes acknowledged chunks. Chunks already gone (evicted meanwhile, or acked twice)
    /// are skipped. Not flushed: a lost deletion only causes a resend.
    pub fn ack(&self, stream_id: u32, chunk_ids: &[u64]) -> Result<u64, SpoolError> {
        self.ack_many(&[(stream_id, chunk_ids.to_vec())])
    }

    /// [`Spool::ack`] for several streams in one sled batch; returns the records deleted.
    pub fn ack_many(&self, acked: &[(u32, Vec<u64>)]) -> Result<u64, SpoolError> {
        let mut state = self.lock();
        let mut batch = sled::Batch::default();
        let mut changed: Vec<(u32, StreamMeta)> = Vec::new();
        let mut removed = 0;
        for (stream_id, chunk_ids) in acked {
            let Some(mut meta) = state.tables.metas.get(stream_id).cloned() else {
                continue;
            };
            let before = removed;
            for &cid in chunk_ids {
                let key = keys::chunk(*stream_id, cid);
                if let Some(v) = self.inner.tree.get(key)? {
                    // Never handed out (the drain moves unreadable chunks aside), so never
                    // acknowledged; skip rather than fail the other acks.
                    let Ok(h): Result<Header, _> = chunk::header(&v) else {
                        warn!(
                            stream_id,
                            chunk_id = cid,
                            "Acknowledged chunk is unreadable; left to the drain."
                        );
                        continue;
                    };
                    meta.records -= h.count as u64;
                    meta.bytes -= (v.len() + key.len()) as u64;
                    meta.chunks -= 1;
                    removed += h.count as u64;
                    batch.remove(&key);
                }
            }
            if removed > before {
                batch.insert(&keys::stream(*stream_id), encode_meta(&meta));
                changed.push((*stream_id, meta));
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        self.inner.tree.apply_batch(batch)?;
        state.tables.metas.extend(changed);
        Ok(removed)
    }
}
