//! The sled-backed spool itself: its handle, its in-memory state, and the steps every write
//! shares. All methods are synchronous and may block on disk: call them from a blocking thread
//! (`spawn_blocking`), never directly on an async worker.
//!
//! The files follow the headings of the spool's contract (`spool/mod.rs`):
//! - this file: [`Spool`], its [`State`], the persisted counters ([`StreamMeta`],
//!   [`GlobalMeta`], [`Counters`]) in their [`Tables`], of which every write changes a copy
//!   (its draft), and the sync and publish steps that end every write;
//! - `open.rs` (**Open**): opening or creating sled, loading the state, the seq reservation;
//! - `quarantine.rs` (**Open**): moving a corrupt spool aside and reporting it;
//! - `commit.rs` (**Write**): a group's commit, cut into its steps;
//! - `pack.rs` (**Format**, **Write**): assigning seqs and packing records into chunks;
//! - `cap.rs` (**Full**): the byte cap: eviction, `drop_newest`, held-back `spool_full` ranges;
//! - `failed.rs` (**Loss reports**): groups refused on a full disk or failed by sled;
//! - `read.rs` (**Read**, **Bad chunks**): the next batch in drain order;
//! - `ack.rs` (**Ack**): deleting acknowledged chunks;
//! - `inspect.rs`: stats, per-stream reports and record walks, changing nothing;
//! - `correct_clock.rs` (**Clock correction**): rewriting unsynced timestamps in batches.
//!
//! # Invariants
//! - Every mutation (commit, ack, a bad chunk taken out, a clock correction batch) runs under
//!   the one mutex around [`State`], so a batch never races another for the same keys.
//! - [`State`] changes only after its sled batch was applied ([`State::apply`]): the in-memory
//!   counters always equal the persisted ones, and a failed batch changes nothing.
//! - No seq reaches the tree before the durable reservation above it ([`Tables::reserve_seqs`]).
//! - Flushes run outside the mutex; [`Inner::readable_below`] advances only after the sync
//!   ([`Spool::publish`]), so readers see only flushed chunks.

mod ack;
mod cap;
mod commit;
mod correct_clock;
mod failed;
mod inspect;
mod open;
mod pack;
mod quarantine;
mod read;

pub use commit::CommitSummary;
pub use inspect::{SpoolStats, StreamReport, StreamStats};
pub use read::Batch;

use super::seqfile::SeqFile;
use super::unreported::Unreported;
use super::{SpoolError, SpoolSettings, keys};
use crate::clock::ClockSource;
use crate::loss::Loss;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::error;

/// Persisted per-stream counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StreamMeta {
    name: String,
    next_seq: u64,
    records: u64,
    bytes: u64,
    chunks: u64,
    evicted: u64,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct GlobalMeta {
    next_chunk_id: u64,
    next_stream_id: u32,
    /// First seq of a new stream; above zero after a corrupt spool was replaced.
    seq_floor: u64,
}

/// Persisted totals, for status and self-metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    /// Readings handed to the spool (stored or not).
    pub collected: u64,
    /// Readings stored (accepted).
    pub committed: u64,
    /// Records dropped, by reason, as reported on `ferry.loss` (by the spool or a collector).
    pub lost: BTreeMap<String, u64>,
}

impl Counters {
    /// Adds a loss to its reason's total: the one place a loss is counted.
    pub fn count(&mut self, loss: &Loss) {
        *self
            .lost
            .entry(loss.reason.as_str().to_string())
            .or_default() += loss.count;
    }
}

struct State {
    /// What the tree holds, as of the latest applied batch (the base of the next write).
    tables: Tables,
    /// Counters as of the latest commit known to be on stable storage: what `stats` reports
    /// as committed and lost. `reported_gen` is the commit it came from, `applied_gen` the
    /// latest applied one (commits may finish their sync out of order).
    reported: Counters,
    /// Each stream's next seq as of that same synced commit: `stats` reports these, so a seq
    /// shows as taken only once the record holding it is on stable storage.
    reported_next: BTreeMap<u32, u64>,
    reported_gen: u64,
    applied_gen: u64,
    /// The durable seq reservation; raised before a commit persists a seq at or above it.
    seq: SeqFile,
    /// Readings that could not be committed (disk full, storage error), per stream; durable in
    /// a side file and reported on the loss stream by the next commit that succeeds.
    failures: Unreported,
}

impl State {
    /// The write of `synced.generation` is on stable storage: report its counters and next
    /// seqs, unless a later write's sync finished first.
    fn synced(&mut self, synced: Synced) {
        if synced.generation > self.reported_gen {
            self.reported_gen = synced.generation;
            self.reported = synced.counters;
            self.reported_next = synced.next;
        }
    }

    /// A working copy of the tables for one write (its draft).
    fn draft(&self) -> Tables {
        self.tables.clone()
    }

    /// Takes a write's draft as the tables, once its batch was applied to the tree; returns
    /// what to report once the write is synced ([`State::synced`]).
    fn apply(&mut self, draft: Tables) -> Synced {
        self.tables = draft;
        self.applied_gen += 1;
        Synced {
            generation: self.applied_gen,
            counters: self.tables.counters.clone(),
            next: self.tables.next_seqs(),
        }
    }
}

/// What a write reports once its sync returned ([`State::synced`]): its generation, and the
/// counters and each stream's next seq (by stream id) it applied.
struct Synced {
    generation: u64,
    counters: Counters,
    next: BTreeMap<u32, u64>,
}

/// The streams' metadata and ids, the global ids, the counters (as applied to the tree) and
/// the `drop_newest` losses held back while the spool stays full, one range per stream,
/// extended in place (persisted under [`keys::PENDING_LOSSES`]). A write changes a copy (its
/// draft: new streams, seqs assigned, chunks added or removed), written into the write's batch
/// by [`Tables::write_meta`] and taken as the state by [`State::apply`] only once the batch
/// was applied.
#[derive(Clone)]
struct Tables {
    metas: BTreeMap<u32, StreamMeta>,
    ids: HashMap<String, u32>,
    global: GlobalMeta,
    counters: Counters,
    pending: Vec<Loss>,
}

impl Tables {
    /// Each stream's next seq, by stream id.
    fn next_seqs(&self) -> BTreeMap<u32, u64> {
        self.metas.iter().map(|(id, m)| (*id, m.next_seq)).collect()
    }

    fn total_bytes(&self) -> u64 {
        self.metas.values().map(|m| m.bytes).sum()
    }

    /// The id of `stream`, creating the stream (starting at the seq floor) if it is new.
    fn stream_id(&mut self, stream: &str) -> u32 {
        if let Some(id) = self.ids.get(stream) {
            return *id;
        }
        let id = self.global.next_stream_id;
        self.global.next_stream_id += 1;
        self.ids.insert(stream.to_string(), id);
        self.metas.insert(
            id,
            StreamMeta {
                name: stream.to_string(),
                next_seq: self.global.seq_floor.max(1),
                ..StreamMeta::default()
            },
        );
        id
    }

    /// Writes what changed against `old` into `batch`: the metadata of streams that changed,
    /// the counters and global ids, and the held-back losses if they changed.
    fn write_meta(&self, old: &Tables, batch: &mut sled::Batch) {
        for (sid, meta) in &self.metas {
            if old.metas.get(sid) != Some(meta) {
                batch.insert(&keys::stream(*sid), encode_meta(meta));
            }
        }
        batch.insert(keys::COUNTERS, encode_meta(&self.counters));
        batch.insert(keys::GLOBAL, encode_meta(&self.global));
        if self.pending != old.pending {
            batch.insert(keys::PENDING_LOSSES, encode_meta(&self.pending));
        }
    }

    /// Raises the durable seq reservation above every seq this write assigned, before its
    /// batch is applied; returns whether the reservation file was rewritten.
    fn reserve_seqs(&self, seq: &mut SeqFile) -> Result<bool, SpoolError> {
        let next_seq = self.metas.values().map(|m| m.next_seq).max().unwrap_or(0);
        Ok(seq.reserve_below(next_seq)?)
    }
}

struct Inner {
    tree: sled::Tree,
    db: sled::Db,
    /// sled's log file, opened by us to fdatasync it after sled's flush.
    log: std::fs::File,
    settings: SpoolSettings,
    state: Mutex<State>,
    /// Chunk ids below this are flushed and may be handed to the uplink.
    readable_below: AtomicU64,
    committed: tokio::sync::watch::Sender<u64>,
    clock: std::sync::RwLock<Arc<dyn ClockSource>>,
}

/// Handle to the spool; cheap to clone.
#[derive(Clone)]
pub struct Spool {
    inner: Arc<Inner>,
}

fn decode_meta<T: for<'a> Deserialize<'a>>(what: &str, v: &[u8]) -> Result<T, SpoolError> {
    postcard::from_bytes(v).map_err(|e| SpoolError::Corrupt(format!("{what}: {e}")))
}

fn encode_meta<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes into a Vec")
}

impl Spool {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock would be a bug; the state is still consistent with
        // the tree because it is only updated after a batch was applied.
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sets where commit times and clock states come from.
    pub fn set_clock(&self, clock: Arc<dyn ClockSource>) {
        *self.inner.clock.write().unwrap_or_else(|p| p.into_inner()) = clock;
    }

    fn clock(&self) -> Arc<dyn ClockSource> {
        self.inner
            .clock
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Watch that changes whenever newly flushed chunks become readable.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// Chunks below `readable` are flushed: hands them to readers and wakes the subscribers.
    fn publish(&self, readable: u64) {
        self.inner
            .readable_below
            .fetch_max(readable, Ordering::AcqRel);
        self.inner.committed.send_replace(readable);
    }

    /// Id and name of every stream that has stored chunks.
    fn streams_with_data(&self) -> Vec<(u32, String)> {
        let state = self.lock();
        state
            .tables
            .metas
            .iter()
            .filter(|(_, m)| m.chunks > 0)
            .map(|(id, m)| (*id, m.name.clone()))
            .collect()
    }

    /// Another tree in the spool's database, for state that must be durable with the same
    /// guarantees (e.g. the command ledger). Flushing the spool flushes it too.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, SpoolError> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// The spool's tree, for tests that damage stored values.
    #[cfg(test)]
    pub(in crate::spool) fn tree(&self) -> &sled::Tree {
        &self.inner.tree
    }

    /// Flushes everything, including lazy deletions, to stable storage. Called at shutdown.
    pub fn flush(&self) -> Result<(), SpoolError> {
        self.sync()
    }

    /// Makes everything written so far durable against a power cut. sled's flush writes its
    /// log with `sync_file_range`, which neither flushes the disk's cache nor persists the
    /// file's size; an fdatasync of the log through our own handle does both. (sled's blobs
    /// are fsynced by sled itself before the log can point at them: vendor/sled.)
    fn sync(&self) -> Result<(), SpoolError> {
        self.inner.db.flush()?;
        self.inner
            .log
            .sync_data()
            .map_err(|e| SpoolError::Storage(e.into()))
    }

    /// Bytes the spool's files take on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.inner.db.size_on_disk().unwrap_or_else(|e| {
            error!(error = %e, "Cannot measure the spool's size on disk.");
            0
        })
    }
}
