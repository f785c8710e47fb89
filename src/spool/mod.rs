//! The spool: a disk-backed queue on sled, the only source of truth for what is still to be
//! delivered.
//!
//! # Contract
//!
//! **Format.** One sled tree. Records are packed into *chunks*: consecutive records of one
//! stream, stored as one value under `c | stream_id (u32 BE) | chunk_id (u64 BE)`. Chunk ids
//! are global and increase with every commit, so per-stream key order is FIFO order and the
//! smallest head chunk id across streams is the oldest data. Per-stream metadata (name, next
//! seq, record/byte/chunk counts, evictions) lives under `s | stream_id`, the global counters
//! under `g`, and source positions (a file collector's inode and offset) under `p | source`,
//! all in the same tree so one batch updates records and counters atomically. See
//! [`keys`] and [`chunk`].
//!
//! **Write.** Collectors send [`Intake`]s into a bounded channel; one [`writer`] task drains it
//! and commits a group every `flush_interval_ms` or `flush_max_records`, whichever comes
//! first: one sled batch (chunks, metadata, positions), then a sync: sled's flush plus an
//! fdatasync of sled's log (sled's own flush is `sync_file_range`, which survives SIGKILL but
//! not a power cut). Each record's `seq` is assigned at commit from its stream's persisted
//! counter, below the durable seq reservation kept outside sled ([`seqfile`]), which is raised
//! before the batch is applied; seqs are never reused, also across restarts, evictions, a
//! spool moved aside or lost, and a wrong clock. A record is **accepted** (and counted as
//! committed in the status) only once that sync returned: from then on it survives SIGKILL
//! and power loss, and it leaves the spool only by ack or by counted eviction. Chunks are kept
//! small enough that sled stores its pages inline in its log; a single record too big for that
//! goes to a sled blob file, which the vendored sled fsyncs before its log can point at it.
//!
//! **Open.** The ferry binary first opens the spool in a child process ([`probe`]); a spool
//! that sled cannot open, or that crashes the child (now or at any earlier open), is moved
//! aside, and a fresh one starts at the reservation with a `spool_corrupt` loss record.
//!
//! **Read.** [`Spool::drain_batch`] hands out accepted chunks of one stream in the order of
//! [`drain`] (lanes, weights, live-first) after the [`DrainState`] the uplink keeps per
//! connection epoch. Chunks written but not yet flushed are never handed out: a record is
//! never sent before it is durable, so a crash can never make a delivered seq be reused for
//! other data.
//!
//! **Ack.** [`Spool::ack`] deletes chunks once the broker's PUBACK for the message carrying
//! them arrived. Deletion is lazy (not flushed): if a crash loses it, the chunk is sent again
//! (a duplicate, never a loss).
//!
//! **Full.** The spool is bounded by `max_bytes` of stored keys and values. With
//! `drop_oldest` (default) a commit that would pass the cap first evicts the oldest chunks of
//! any stream but `ferry.loss`, down to 9/10 of the cap (in steps: see `EVICT_DOWN_TO`); with
//! `drop_newest` the new records that do not fit are not stored (their seqs are used up).
//! Either way every dropped seq range is counted, in the same commit, in the stream's persisted
//! metadata and in the loss counters.
//!
//! **Loss reports.** Every loss is one [`crate::loss::Loss`] (stream, reason, count, seq
//! range, detail), written as a record on `ferry.loss` with the fields of docs/WIRE.md and
//! counted by [`Counters::count`]; nothing else builds or counts one. Loss records are not
//! evicted, which is the only slack above the cap, and no fault may grow them without bound:
//! - `evicted` ranges are written in the commit that evicts (one record per evicted stream per
//!   eviction step of a tenth of the cap);
//! - `spool_full` ranges (`drop_newest`) are *held back*: one open range per stream, persisted
//!   under `keys::PENDING_LOSSES` in the same batch and extended in place while the spool stays
//!   full, so a long outage adds no chunk at all. They are written (already counted) by the
//!   first commit that drops nothing, or when a stream's next dropped range does not follow on;
//! - `disk_full` and `spool_write_failed` (readings that never got seqs) are counted and made
//!   durable *before the writer goes on*, in a small fsynced file beside sled's
//!   (`unreported`), since sled must not be written on a full disk; the next successful commit
//!   writes them with a generation marker in the same batch, so a restart reports them exactly
//!   once.
//!
//! **Bad chunks.** A chunk that does not decode (the drain meets it, or eviction reaches it) is
//! moved aside, never an error that stops delivery or commits: its bytes go to
//! `<spool dir>.badchunk-<stream>-<chunk id>`, it is deleted with its stream's counters
//! adjusted, and its seqs are reported as `spool_corrupt` (exact from the header; with an
//! unreadable header the count is exact and the range bounded by the readable neighbours, see
//! `badchunk`).
//!
//! **Clock correction.** [`Spool::correct_clock`] rewrites unsynced records in batches of
//! `CORRECT_BATCH_CHUNKS` chunks under the lock, with a key cursor between batches: commits
//! and acks go on meanwhile, and memory is one batch, not the spool. sled's files take about
//! twice the stored bytes on disk and do not shrink (see docs/ARCHITECTURE.md).

mod badchunk;
pub mod chunk;
pub mod drain;
pub mod keys;
pub mod probe;
pub mod seqfile;
mod settings;
mod store;
mod unreported;
pub mod writer;

pub use drain::{DrainRules, DrainState, Lane, LaneWeights, Pick, StreamDrain};
pub use settings::{BatchLimits, CHUNK_MAX_BYTES_CAP, FullPolicy, SpoolSettings};
pub use store::{Batch, CommitSummary, Counters, Spool, SpoolStats, StreamReport, StreamStats};

use crate::record::Reading;

/// What a collector hands to the spool in one send.
#[derive(Debug, Default)]
pub struct Intake {
    pub readings: Vec<Reading>,
    /// A source position committed in the same batch as `readings`.
    pub checkpoint: Option<Checkpoint>,
    /// Told `true` once `readings` (and `checkpoint`) are accepted, `false` if the commit
    /// failed. Lets a sender act only on durable data (e.g. acknowledge a command).
    pub committed: Option<tokio::sync::oneshot::Sender<bool>>,
}

/// A re-readable source's position (e.g. inode and byte offset), stored atomically with the
/// records read up to it.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    pub source: String,
    pub position: Vec<u8>,
}

impl SpoolError {
    /// Whether the spool's files are damaged (as opposed to unreadable or locked).
    pub fn is_corruption(&self) -> bool {
        match self {
            SpoolError::Corrupt(_) => true,
            SpoolError::Open { source, .. } => matches!(
                source,
                sled::Error::Corruption { .. }
                    | sled::Error::Unsupported(_)
                    | sled::Error::ReportableBug(_)
            ),
            _ => false,
        }
    }
}

impl Intake {
    pub fn reading(reading: Reading) -> Intake {
        Intake {
            readings: vec![reading],
            ..Intake::default()
        }
    }

    /// An intake whose commit is reported on the returned receiver.
    pub fn with_receipt(
        readings: Vec<Reading>,
        checkpoint: Option<Checkpoint>,
    ) -> (Intake, tokio::sync::oneshot::Receiver<bool>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let intake = Intake {
            readings,
            checkpoint,
            committed: Some(tx),
        };
        (intake, rx)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    #[error("cannot create spool directory {dir}: {source}")]
    CreateDir {
        dir: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("cannot open spool at {dir}: {source}")]
    Open {
        dir: std::path::PathBuf,
        source: sled::Error,
    },
    #[error("the spool at {dir} is locked by another process (is another ferry running?)")]
    Locked { dir: std::path::PathBuf },
    #[error(
        "the spool's filesystem is full: {free} bytes free, {reserve} kept in reserve (spool.min_free_bytes); new readings are dropped and counted until space returns"
    )]
    DiskFull { free: u64, reserve: u64 },
    #[error("spool storage error: {0}")]
    Storage(#[from] sled::Error),
    #[error("spool data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    SeqFile(#[from] seqfile::SeqFileError),
}

#[cfg(test)]
mod tests;

#[cfg(test)]
mod power_tests;

#[cfg(test)]
mod status_tests;
