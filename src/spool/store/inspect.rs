//! Looking into the spool without changing it: stats for status and self-metrics, the
//! per-stream report of `ferry spool inspect`, walks over stored records (`export`), a
//! source's stored position.
//!
//! # Invariants
//! - Nothing here writes: no batch, no flush, no counter changed.
//! - Stats report committed and lost as of the latest *synced* commit (never a count the disk
//!   may not hold yet); `collected` as offered.
//! - A walk reads chunks in key order (oldest first per stream) and fails on an unreadable
//!   chunk rather than skipping it silently (the drain is what moves bad chunks aside).

use super::{Counters, Spool, StreamMeta};
use crate::record::Record;
use crate::spool::{SpoolError, chunk, keys};
use std::collections::HashMap;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub name: String,
    pub next_seq: u64,
    pub records: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub evicted: u64,
}

/// What `ferry spool inspect` shows for one stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamReport {
    pub name: String,
    pub records: u64,
    pub bytes: u64,
    pub evicted: u64,
    pub next_seq: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub oldest_ts_ms: Option<u64>,
    pub newest_ts_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub records: u64,
    pub bytes: u64,
    pub streams: Vec<StreamStats>,
    pub counters: Counters,
}

impl SpoolStats {
    pub fn stream(&self, name: &str) -> Option<&StreamStats> {
        self.streams.iter().find(|s| s.name == name)
    }
}

impl Spool {
    /// The stored position of a re-readable source.
    pub fn position(&self, source: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self
            .inner
            .tree
            .get(keys::position(source))?
            .map(|v| v.to_vec()))
    }

    pub fn stats(&self) -> SpoolStats {
        let state = self.lock();
        // A stream whose first commit is not yet synced is not shown.
        let streams: Vec<StreamStats> = state
            .tables
            .metas
            .iter()
            .filter_map(|(id, m)| Some((m, *state.reported_next.get(id)?)))
            .map(|(m, next_seq)| StreamStats {
                name: m.name.clone(),
                next_seq,
                records: m.records,
                bytes: m.bytes,
                chunks: m.chunks,
                evicted: m.evicted,
            })
            .collect();
        SpoolStats {
            records: streams.iter().map(|s| s.records).sum(),
            bytes: state.tables.total_bytes(),
            streams,
            // Committed and lost as of the latest synced commit; collected as offered.
            counters: Counters {
                collected: state.tables.counters.collected,
                ..state.reported.clone()
            },
        }
    }

    /// Commit time of the oldest stored chunk of each stream.
    pub fn oldest_committed_ms(&self) -> HashMap<String, u64> {
        let streams = self.streams_with_data();
        let mut out = HashMap::new();
        for (sid, name) in streams {
            let head = self
                .inner
                .tree
                .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
                .next();
            if let Some(Ok((_, v))) = head
                && let Ok(h) = chunk::header(&v)
            {
                out.insert(name, h.committed_ms);
            }
        }
        out
    }

    /// Per-stream report for `ferry spool inspect`: counts, first and last seq, oldest and
    /// newest sample time of what is stored.
    pub fn inspect(&self) -> Result<Vec<StreamReport>, SpoolError> {
        let metas: Vec<(u32, StreamMeta)> = {
            let state = self.lock();
            state
                .tables
                .metas
                .iter()
                .map(|(id, m)| (*id, m.clone()))
                .collect()
        };
        let mut out = Vec::new();
        for (sid, m) in metas {
            let range = || {
                self.inner
                    .tree
                    .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
            };
            let first = range()
                .next()
                .transpose()?
                .map(|(_, v)| chunk::decode(&v))
                .transpose()?;
            let last = range()
                .next_back()
                .transpose()?
                .map(|(_, v)| chunk::decode(&v))
                .transpose()?;
            let (first_rec, last_rec) = (
                first.as_ref().and_then(|(_, r)| r.first()),
                last.as_ref().and_then(|(_, r)| r.last()),
            );
            out.push(StreamReport {
                name: m.name.clone(),
                records: m.records,
                bytes: m.bytes,
                evicted: m.evicted,
                next_seq: m.next_seq,
                first_seq: first_rec.map(|r| r.seq),
                last_seq: last_rec.map(|r| r.seq),
                oldest_ts_ms: first_rec.map(|r| r.ts_ms),
                newest_ts_ms: last_rec.map(|r| r.ts_ms),
            });
        }
        Ok(out)
    }

    /// Calls `f` with every stored record of `stream`, oldest first, until it returns false.
    /// Returns how many records were visited.
    pub fn for_each_record(
        &self,
        stream: &str,
        mut f: impl FnMut(&Record) -> bool,
    ) -> Result<u64, SpoolError> {
        let Some(sid) = self.lock().tables.ids.get(stream).copied() else {
            return Ok(0);
        };
        let mut n = 0;
        for item in self
            .inner
            .tree
            .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
        {
            let (_, v) = item?;
            for r in chunk::decode(&v)?.1 {
                n += 1;
                if !f(&r) {
                    return Ok(n);
                }
            }
        }
        Ok(n)
    }
}
