//! Chunks that cannot be read back: moved aside so one bad value never stops delivery.
//!
//! A chunk whose header or records do not decode (a bit flip, a bug in an older version) would
//! otherwise end every uplink epoch at the same place, and once eviction reached it, fail every
//! commit. Instead, the first reader that meets it (the drain, or eviction) takes it out of the
//! spool: its raw bytes go to a file beside the spool directory,
//! `<spool dir>.badchunk-<stream>-<chunk id>`, it is deleted from the tree with its stream's
//! counters adjusted, and its seqs are reported as a `spool_corrupt` loss.
//!
//! **Which seqs.** With a readable header the range is exact (`first_seq`, `count`). Without
//! one, the count is exact and the range is bounded:
//! - count = the stream's stored record counter minus the counts of its other (readable)
//!   chunks; this reads every chunk of that stream once, which is acceptable for a rare fault;
//! - range = from one past the last seq of the nearest readable chunk before it (or the lowest
//!   seq the stream can have, when there is none) to one before the first seq of the nearest
//!   readable chunk after it (or the stream's last assigned seq). It may include seqs that
//!   were already delivered and acknowledged, never miss one that was lost; the record then
//!   carries `range: "bounded"` so a consumer knows to trust `count` over the range.
//!
//! Several unreadable headers in one stream: the first one met takes the whole remainder, the
//! next ones count 0; their ranges overlap. The total is exact.

use super::SpoolError;
use super::chunk;
use super::keys;
use crate::loss::{Loss, LossReason};
use crate::record::Value;
use std::path::{Path, PathBuf};
use tracing::error;

/// What the stream knows about itself, for bounding an unreadable chunk.
pub struct StreamView<'a> {
    pub sid: u32,
    pub name: &'a str,
    /// Records the stream's counters hold for chunks with id `>= from`.
    pub records: u64,
    pub from: u64,
    pub next_seq: u64,
    pub seq_floor: u64,
}

/// A bad chunk taken out: its loss report and the records it held.
pub struct Taken {
    pub loss: Loss,
    pub records: u64,
}

/// Works out which seqs a bad chunk held, exports its bytes beside `spool_dir`, and returns the
/// loss. The caller deletes the key and adjusts the stream's counters.
pub fn take(
    tree: &sled::Tree,
    spool_dir: &Path,
    stream: &StreamView<'_>,
    chunk_id: u64,
    value: &[u8],
    why: &SpoolError,
) -> Result<Taken, SpoolError> {
    let (records, first, last, exact) = match chunk::header(value) {
        Ok(h) if h.count > 0 => (
            h.count as u64,
            h.first_seq,
            h.first_seq + h.count as u64 - 1,
            true,
        ),
        _ => bounds(tree, stream, chunk_id)?,
    };
    let path = export_path(spool_dir, stream.name, chunk_id);
    let mut loss = if records > 0 {
        Loss::range(stream.name, LossReason::SpoolCorrupt, first, last)
    } else {
        Loss::new(stream.name, LossReason::SpoolCorrupt, 0)
    };
    loss.count = records;
    if !exact {
        loss = loss.with("range", Value::Str("bounded".into()));
    }
    loss = loss
        .with("bytes", Value::U64(value.len() as u64))
        .with("error", Value::Str(why.to_string()));
    match std::fs::write(&path, value) {
        Ok(()) => {
            error!(stream = stream.name, chunk_id, records, first_seq = first, last_seq = last, moved_to = %path.display(), error = %why, "A stored chunk is unreadable: moved aside, its records are lost.");
            loss = loss.with("quarantined", Value::Str(path.display().to_string()));
        }
        Err(e) => {
            error!(stream = stream.name, chunk_id, records, path = %path.display(), error = %e, "A stored chunk is unreadable and cannot be exported either: dropped, its records are lost.");
            loss = loss.with("export_error", Value::Str(e.to_string()));
        }
    }
    Ok(Taken { loss, records })
}

/// `<spool dir>.badchunk-<stream>-<chunk id>`, with the stream name made safe for a file name.
pub fn export_path(spool_dir: &Path, stream: &str, chunk_id: u64) -> PathBuf {
    let dir_name = spool_dir
        .file_name()
        .map_or_else(|| "spool".into(), |n| n.to_string_lossy().into_owned());
    let safe: String = stream
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    spool_dir.with_file_name(format!("{dir_name}.badchunk-{safe}-{chunk_id}"))
}

/// Count and seq bounds of a chunk whose header is unreadable (see the module doc).
fn bounds(
    tree: &sled::Tree,
    stream: &StreamView<'_>,
    chunk_id: u64,
) -> Result<(u64, u64, u64, bool), SpoolError> {
    let mut others = 0u64;
    let mut prev_end: Option<u64> = None;
    let mut next_first: Option<u64> = None;
    for item in tree.range(keys::chunk(stream.sid, stream.from)..=keys::chunk(stream.sid, u64::MAX))
    {
        let (k, v) = item?;
        let Some(cid) = keys::chunk_id(&k) else {
            continue;
        };
        let Ok(h) = chunk::header(&v) else { continue };
        if cid == chunk_id {
            continue;
        }
        others += h.count as u64;
        if cid < chunk_id {
            prev_end = Some(h.first_seq + h.count as u64 - 1);
        } else if next_first.is_none() {
            next_first = Some(h.first_seq);
        }
    }
    let records = stream.records.saturating_sub(others);
    let first = prev_end.map_or(stream.seq_floor.max(1), |e| e + 1);
    let last = next_first.map_or(stream.next_seq.saturating_sub(1), |f| f.saturating_sub(1));
    Ok((records, first, last.max(first), false))
}
