//! Clock correction: rewriting the timestamps of records stamped before the clock was
//! synchronised, once it is.
//!
//! # Invariants
//! - Only records stamped unsynced in the *current* kernel boot are rewritten
//!   (`ts = uptime_at_stamp + (wall_now - uptime_now)`, marked `Corrected`); seqs, order and
//!   every other record stay as they are.
//! - The work goes in batches of [`CORRECT_BATCH_CHUNKS`] chunks, each one sled batch under
//!   the lock with a key cursor in between: commits and acks go on while a large spool is
//!   corrected, and memory is one batch, not the spool. Chunks acked or evicted between
//!   batches are not met; chunks committed meanwhile were stamped by the synced clock.
//! - A chunk's stream byte count follows its rewritten size in the same batch.
//! - Unreadable chunks are skipped (the drain moves them aside). One flush at the end: a crash
//!   before it loses only the correction, which the next sync of the same boot redoes.

use super::{Spool, State, StreamMeta, encode_meta};
use crate::clock::ClockState;
use crate::spool::{SpoolError, chunk, keys};
use std::collections::BTreeMap;
use std::sync::MutexGuard;

/// Chunks [`Spool::correct_clock`] rewrites per batch, under the lock; commits and acks run
/// between batches. With chunks of at most `batch.max_bytes / 8` (8 KiB by default) a batch
/// holds about 512 KiB, whatever the size of the spool.
const CORRECT_BATCH_CHUNKS: usize = 64;

impl Spool {
    /// Rewrites the timestamps of stored records stamped unsynced in the current kernel boot:
    /// `ts = uptime_at_stamp + (wall_now - uptime_now)`, marked `Corrected`. Call once the
    /// clock is synchronised. Returns how many records were corrected.
    ///
    /// Works through the spool in batches of `CORRECT_BATCH_CHUNKS` (64) chunks, each one sled
    /// batch under the lock, with a cursor in between: commits and acks go on while a large
    /// spool is corrected, and memory stays one batch. Chunks acked or evicted between batches
    /// are simply not met; chunks committed meanwhile were stamped by the synced clock.
    /// Unreadable chunks are skipped (the drain moves them aside). Flushed once at the end: a
    /// crash before loses only the correction, which the next sync of the same boot redoes.
    pub fn correct_clock(&self) -> Result<u64, SpoolError> {
        let clock = self.clock();
        if !clock.synced() {
            return Ok(0);
        }
        let offset = clock.now_ms() as i64 - clock.uptime_ms() as i64;
        let boot_now = clock.boot();
        let mut cursor = vec![keys::CHUNK];
        let mut corrected = 0;
        loop {
            let (n, next) = self.correct_batch(&cursor, offset, boot_now)?;
            corrected += n;
            match next {
                Some(k) => cursor = k,
                None => break,
            }
        }
        if corrected > 0 {
            self.inner.tree.flush()?;
        }
        Ok(corrected)
    }

    /// One batch of [`Spool::correct_clock`] from chunk key `from`; returns the records
    /// corrected and the key to go on from.
    fn correct_batch(
        &self,
        from: &[u8],
        offset: i64,
        boot_now: u32,
    ) -> Result<(u64, Option<Vec<u8>>), SpoolError> {
        let state = self.lock();
        let mut changed: BTreeMap<u32, StreamMeta> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        let (mut corrected, mut seen) = (0, 0);
        let end = [keys::CHUNK + 1];
        for item in self.inner.tree.range(from..&end[..]) {
            let (k, v) = item?;
            if seen == CORRECT_BATCH_CHUNKS {
                return self.apply_correction(state, batch, changed, corrected, Some(k.to_vec()));
            }
            seen += 1;
            let Ok((h, records)) = chunk::decode(&v) else {
                continue;
            };
            if !records
                .iter()
                .any(|r| matches!(r.clock, ClockState::Unsynced { boot, .. } if boot == boot_now))
            {
                continue;
            }
            let mut buf = Vec::with_capacity(v.len());
            for r in &records {
                let (ts, clock) = match r.clock {
                    ClockState::Unsynced { boot, uptime_ms } if boot == boot_now => {
                        corrected += 1;
                        (
                            (uptime_ms as i64 + offset).max(0) as u64,
                            ClockState::Corrected,
                        )
                    }
                    other => (r.ts_ms, other),
                };
                chunk::encode_record(&mut buf, ts, clock, &r.body);
            }
            let value = chunk::assemble(h, &buf);
            let sid = u32::from_be_bytes(k[1..5].try_into().expect("chunk key has a stream id"));
            if let Some(m) = state.tables.metas.get(&sid) {
                let m = changed.entry(sid).or_insert_with(|| m.clone());
                m.bytes = m.bytes + value.len() as u64 - v.len() as u64;
            }
            batch.insert(k, value);
        }
        self.apply_correction(state, batch, changed, corrected, None)
    }

    fn apply_correction(
        &self,
        mut state: MutexGuard<'_, State>,
        mut batch: sled::Batch,
        changed: BTreeMap<u32, StreamMeta>,
        corrected: u64,
        next: Option<Vec<u8>>,
    ) -> Result<(u64, Option<Vec<u8>>), SpoolError> {
        if corrected > 0 {
            for (sid, meta) in &changed {
                batch.insert(&keys::stream(*sid), encode_meta(meta));
            }
            self.inner.tree.apply_batch(batch)?;
            state.tables.metas.extend(changed);
        }
        Ok((corrected, next))
    }
}
