//! Readings that could not be committed (`disk_full`, `spool_write_failed`), kept durable until
//! a commit reports them on the loss stream.
//!
//! They cannot go into sled: `disk_full` means the spool refuses to write so sled never meets
//! ENOSPC, and `spool_write_failed` means sled itself failed. So the counts live in a small
//! file in the spool directory, [`FILE`], rewritten (temp file, fsync, rename, fsync of the
//! directory) every time a group fails. It is a few hundred bytes, which fits in the
//! `min_free_bytes` reserve the disk-full check keeps.
//!
//! Exactly once: every rewrite carries a new `generation`. The commit that reports the counts
//! writes that generation under [`keys::FAILURES_REPORTED`] in the same sled batch as the loss
//! records. At open a file whose generation is not above the reported one was already reported
//! and is ignored; a later one is loaded and reported by the next commit. The file is never
//! deleted on the write path (so a new failure racing a commit cannot lose it).

use super::keys;
use crate::loss::{Loss, LossReason};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use tracing::error;

/// The file's name in the spool directory.
pub const FILE: &str = "unreported-losses.json";

#[derive(Debug, Default, Serialize, Deserialize)]
struct OnDisk {
    generation: u64,
    /// Readings handed to the spool and not stored (for the `collected` counter).
    collected: u64,
    losses: Vec<Loss>,
}

/// The unreported failures of this spool, in memory and in [`FILE`].
#[derive(Debug)]
pub struct Unreported {
    path: PathBuf,
    /// Generation of the last write (or of the last report, when nothing is pending).
    generation: u64,
    collected: u64,
    counts: BTreeMap<(String, LossReason), u64>,
    /// A write failed; logged once until one succeeds.
    write_failing: bool,
}

impl Unreported {
    /// Loads what the file holds beyond the generation sled says was reported.
    pub fn load(dir: &Path, tree: &sled::Tree) -> Unreported {
        let reported = tree
            .get(keys::FAILURES_REPORTED)
            .ok()
            .flatten()
            .and_then(|v| Some(u64::from_be_bytes(v.as_ref().try_into().ok()?)))
            .unwrap_or(0);
        let mut me = Unreported {
            path: dir.join(FILE),
            generation: reported,
            collected: 0,
            counts: BTreeMap::new(),
            write_failing: false,
        };
        let on_disk: OnDisk = match std::fs::read(&me.path) {
            Ok(bytes) => match serde_json::from_slice(&bytes) {
                Ok(d) => d,
                Err(e) => {
                    error!(file = %me.path.display(), error = %e, "The file of unreported losses is unreadable; the losses it held cannot be reported.");
                    return me;
                }
            },
            Err(_) => return me,
        };
        if on_disk.generation > reported {
            me.generation = on_disk.generation;
            me.collected = on_disk.collected;
            for l in on_disk.losses {
                if let Some(stream) = l.stream {
                    *me.counts.entry((stream, l.reason)).or_default() += l.count;
                }
            }
        }
        me
    }

    /// Readings counted as `collected` that are not yet in sled's counters.
    pub fn collected(&self) -> u64 {
        self.collected
    }

    /// Counts `n` readings of `stream` lost for `reason` and writes the file.
    pub fn note(&mut self, readings: impl Iterator<Item = (String, u64)>, reason: LossReason) {
        for (stream, n) in readings {
            *self.counts.entry((stream, reason)).or_default() += n;
            self.collected += n;
        }
        self.generation += 1;
        match self.write() {
            Ok(()) => self.write_failing = false,
            Err(e) if !self.write_failing => {
                self.write_failing = true;
                error!(file = %self.path.display(), error = %e, "Cannot persist the count of lost readings; a restart before the next commit would lose it.");
            }
            Err(_) => {}
        }
    }

    /// The losses to report, one per stream and reason.
    pub fn losses(&self) -> Vec<Loss> {
        self.counts
            .iter()
            .map(|((stream, reason), n)| Loss::new(stream, *reason, *n))
            .collect()
    }

    /// The key and value that mark the current generation reported, for the commit batch.
    pub fn reported_marker(&self) -> (&'static [u8], [u8; 8]) {
        (keys::FAILURES_REPORTED, self.generation.to_be_bytes())
    }

    /// The commit that carried `losses` (from [`Unreported::losses`]) is durable: subtract
    /// them. Called after the flush, so a commit whose flush failed leaves them to be
    /// reported again (a count reported twice at worst, never lost).
    pub fn reported(&mut self, losses: &[Loss], collected: u64) {
        for l in losses {
            let Some(stream) = &l.stream else { continue };
            let key = (stream.clone(), l.reason);
            if let Some(n) = self.counts.get_mut(&key) {
                *n = n.saturating_sub(l.count);
                if *n == 0 {
                    self.counts.remove(&key);
                }
            }
        }
        self.collected = self.collected.saturating_sub(collected);
    }

    fn write(&self) -> std::io::Result<()> {
        let data = OnDisk {
            generation: self.generation,
            collected: self.collected,
            losses: self.losses(),
        };
        let tmp = self.path.with_extension("tmp");
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&serde_json::to_vec(&data).map_err(std::io::Error::other)?)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &self.path)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}
