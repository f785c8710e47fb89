//! The seq reservation: a small file beside the spool directory (`<dir>.seq`), outside sled.
//!
//! # Invariant
//!
//! Every seq the spool ever handed out, in any stream, in this directory or in any spool that
//! was moved aside or lost, is below `reserved`. The spool raises it, in blocks of
//! [`RESERVE_BLOCK`] so that a write is rare, and makes it durable (temp file, fsync, rename,
//! fsync of the directory) **before** applying a commit that persists a seq at or above the old
//! value. A fresh spool (first start, a corrupt one moved aside, a deleted directory) starts its
//! streams at `reserved`, so no seq is ever reused, whatever the clock says and whatever sled
//! lost. The file sits beside the spool directory, not in it, so moving the directory aside or
//! losing it leaves the reservation where it was.
//!
//! It also records each stream of the current spool with a next seq sled has durably reached
//! (written after the commit that created the stream synced, and again whenever the reservation
//! grows). If sled later opens without that stream, or with a lower next seq, it lost committed
//! data (it silently drops a log tail it cannot read) and the spool is treated as corrupt.
//!
//! The file also lists quarantines not yet reported on `ferry.loss`: one is added (durably)
//! before a corrupt spool is moved aside and removed after the fresh spool committed its loss
//! record, so a crash in between reports it on the next start. A crash after that commit but
//! before the removal reports it twice (a duplicate report, never a missing one).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Seqs reserved per write: one durable write per ~1M records of the busiest stream.
pub const RESERVE_BLOCK: u64 = 1 << 20;

/// A spool moved aside whose loss is not reported yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    pub moved_to: PathBuf,
    pub error: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Contents {
    reserved: u64,
    /// Every stream of the current spool with its next seq as of the last write: a stream
    /// sled no longer knows, or knows with a lower next seq, means sled lost committed data.
    #[serde(default)]
    streams: BTreeMap<String, u64>,
    #[serde(default)]
    unreported: Vec<Quarantine>,
}

#[derive(Debug, thiserror::Error)]
pub enum SeqFileError {
    #[error("cannot write the seq reservation {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the seq reservation {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the seq reservation {path} is damaged: {source}")]
    Damaged {
        path: PathBuf,
        source: serde_json::Error,
    },
}

/// The loaded reservation; every change is written through before the call returns.
#[derive(Debug)]
pub struct SeqFile {
    path: PathBuf,
    contents: Contents,
}

impl SeqFile {
    /// Where the reservation of the spool in `dir` lives: `<dir>.seq`.
    pub fn path_for(dir: &Path) -> PathBuf {
        let name = dir
            .file_name()
            .map_or_else(|| "spool".into(), |n| n.to_string_lossy().into_owned());
        dir.with_file_name(format!("{name}.seq"))
    }

    /// The reservation of the spool in `dir`; `None` if it was never written.
    pub fn load(dir: &Path) -> Result<Option<SeqFile>, SeqFileError> {
        let path = Self::path_for(dir);
        let text = match std::fs::read(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SeqFileError::Read { path, source }),
        };
        let contents = serde_json::from_slice(&text).map_err(|source| SeqFileError::Damaged {
            path: path.clone(),
            source,
        })?;
        Ok(Some(SeqFile { path, contents }))
    }

    /// A reservation for `dir` starting at `reserved`, written at once.
    pub fn create(dir: &Path, reserved: u64) -> Result<SeqFile, SeqFileError> {
        let f = SeqFile {
            path: Self::path_for(dir),
            contents: Contents {
                reserved,
                ..Contents::default()
            },
        };
        f.store()?;
        Ok(f)
    }

    /// Every seq handed out so far is below this.
    pub fn reserved(&self) -> u64 {
        self.contents.reserved
    }

    /// Makes sure seqs below `next` may be handed out: if `next` passes the reservation, raises
    /// it to `next + RESERVE_BLOCK` and writes it durably before returning. True if it wrote.
    pub fn reserve_below(&mut self, next: u64) -> Result<bool, SeqFileError> {
        if next <= self.contents.reserved {
            return Ok(false);
        }
        let old = self.contents.reserved;
        self.contents.reserved = next.saturating_add(RESERVE_BLOCK);
        if let Err(e) = self.store() {
            self.contents.reserved = old;
            return Err(e);
        }
        Ok(true)
    }

    /// Records the spool's streams (name, next seq) once they are durable in sled: written
    /// when a stream is new to the file, or when `always`. A mark is never ahead of sled's
    /// synced state, so only a real loss makes sled's counters fall below it.
    pub fn record_streams<'a>(
        &mut self,
        streams: impl Iterator<Item = (&'a str, u64)> + Clone,
        always: bool,
    ) -> Result<(), SeqFileError> {
        let new_stream = streams
            .clone()
            .any(|(name, _)| !self.contents.streams.contains_key(name));
        if !always && !new_stream {
            return Ok(());
        }
        let old = self.contents.streams.clone();
        for (name, next_seq) in streams {
            let mark = self.contents.streams.entry(name.to_string()).or_default();
            *mark = (*mark).max(next_seq);
        }
        if let Err(e) = self.store() {
            self.contents.streams = old;
            return Err(e);
        }
        Ok(())
    }

    /// The first stream (name, recorded next seq) that `next_seq_of` (sled's view) does not
    /// have, or has with a lower next seq.
    pub fn regressed(&self, next_seq_of: impl Fn(&str) -> Option<u64>) -> Option<(String, u64)> {
        self.contents
            .streams
            .iter()
            .find(|(name, mark)| next_seq_of(name).is_none_or(|n| n < **mark))
            .map(|(name, mark)| (name.clone(), *mark))
    }

    pub fn unreported(&self) -> &[Quarantine] {
        &self.contents.unreported
    }

    /// Durably notes a quarantine before the spool is moved aside; the fresh spool starts
    /// with no streams.
    pub fn add_unreported(&mut self, q: Quarantine) -> Result<(), SeqFileError> {
        self.contents.unreported.push(q);
        self.contents.streams.clear();
        self.store()
    }

    /// Forgets the quarantines once their loss is committed.
    pub fn clear_unreported(&mut self) -> Result<(), SeqFileError> {
        if self.contents.unreported.is_empty() {
            return Ok(());
        }
        self.contents.unreported.clear();
        self.store()
    }

    /// tmp + fsync + rename + fsync of the directory: after a crash the file holds either the
    /// old or the new contents, and the new one once this returned.
    fn store(&self) -> Result<(), SeqFileError> {
        let err = |source| SeqFileError::Write {
            path: self.path.clone(),
            source,
        };
        let tmp = self.path.with_extension("seq.tmp");
        let text = serde_json::to_vec(&self.contents).expect("plain struct encodes as JSON");
        let mut f = std::fs::File::create(&tmp).map_err(err)?;
        f.write_all(&text)
            .and_then(|()| f.sync_all())
            .map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        sync_parent(&self.path).map_err(err)
    }
}

/// fsyncs the directory holding `path`, so a file created, renamed or removed there stays so.
pub fn sync_parent(path: &Path) -> std::io::Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::File::open(parent)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservation_is_raised_in_blocks_and_survives_reload() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        assert!(SeqFile::load(&spool).unwrap().is_none());
        let mut f = SeqFile::create(&spool, 0).unwrap();
        f.reserve_below(1).unwrap();
        assert_eq!(f.reserved(), 1 + RESERVE_BLOCK);
        f.reserve_below(500).unwrap();
        assert_eq!(
            f.reserved(),
            1 + RESERVE_BLOCK,
            "within the block: no write"
        );
        f.reserve_below(RESERVE_BLOCK + 5).unwrap();
        assert_eq!(f.reserved(), 2 * RESERVE_BLOCK + 5);
        let again = SeqFile::load(&spool).unwrap().unwrap();
        assert_eq!(again.reserved(), 2 * RESERVE_BLOCK + 5);
        assert_eq!(again.path, dir.path().join("spool.seq"));
        assert!(!dir.path().join("spool.seq.tmp").exists());
    }

    #[test]
    fn unreported_quarantines_round_trip_and_clear() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut f = SeqFile::create(&spool, 7).unwrap();
        let q = Quarantine {
            moved_to: dir.path().join("spool.corrupt-1"),
            error: "boom".into(),
        };
        f.add_unreported(q.clone()).unwrap();
        assert_eq!(SeqFile::load(&spool).unwrap().unwrap().unreported(), [q]);
        f.clear_unreported().unwrap();
        assert!(
            SeqFile::load(&spool)
                .unwrap()
                .unwrap()
                .unreported()
                .is_empty()
        );
    }

    #[test]
    fn a_damaged_file_is_an_error_not_a_reset() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        std::fs::write(SeqFile::path_for(&spool), b"{\"reserved\": 12").unwrap();
        assert!(matches!(
            SeqFile::load(&spool),
            Err(SeqFileError::Damaged { .. })
        ));
    }
}
