//! The spool's settings. The spool owns them; config validation fills them in from the file
//! (ranges, defaults, relative paths), so the spool never reads the config itself.

use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

/// What the spool does when a commit would take it past `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullPolicy {
    /// Evict the oldest records (of any stream but `ferry.loss`) to make room.
    #[default]
    DropOldest,
    /// Keep what is stored; the new records are dropped (their seqs are still used up).
    DropNewest,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub full_policy: FullPolicy,
    pub flush_interval: Duration,
    pub flush_max_records: usize,
    pub cache_bytes: u64,
    pub min_free_bytes: u64,
    /// Most records packed into one stored chunk (= the uplink's batch record limit, so a
    /// chunk always fits in one message).
    pub chunk_max_records: usize,
    /// Most encoded bytes in one stored chunk (a single larger record is a chunk of its own). A
    /// chunk is the unit of acknowledgement, so it is kept to a fraction of the batch byte
    /// limit: even when JSON inflates it, one chunk fits in one message. At most
    /// [`CHUNK_MAX_BYTES_CAP`], so sled keeps its pages inline in its log.
    pub chunk_max_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BatchLimits {
    pub max_records: usize,
    pub max_bytes: usize,
    /// How long a batch that is not full waits for more records before it is sent.
    pub linger: Duration,
}

/// Upper bound of the stored chunk byte limit, whatever the batch limit: sled 0.34 writes a
/// page larger than a quarter of its 512 KiB segment (about 128 KiB) to a separate blob file,
/// which costs two fsyncs (vendor/sled/FERRY-PATCHES.md), and a leaf page holds up to 17
/// values (it splits by count, above 16). 17 chunks of 6 KiB plus keys stay near 105 KiB, so
/// only a single record larger than this makes a blob. Measured in `benches/spool_ingest.rs`.
pub const CHUNK_MAX_BYTES_CAP: u64 = 6 << 10;
