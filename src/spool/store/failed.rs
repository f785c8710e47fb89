//! Groups that could not be committed: refused before sled on a full disk, or failed by sled.
//!
//! # Invariants
//! - sled never sees a full disk: a commit is refused (`DiskFull`) when the spool's
//!   filesystem has less than `min_free_bytes` plus about twice the group's size free, since
//!   sled poisons its database on the first ENOSPC until it is reopened.
//! - The readings of a group that failed get no seqs; they are counted at once
//!   (`disk_full` or `spool_write_failed`), collected and lost alike, and made durable in the
//!   fsynced side file (`unreported`) before the writer goes on; the next commit that
//!   succeeds writes them on the loss stream, exactly once across restarts.

use super::Spool;
use crate::loss::{Loss, LossReason};
use crate::record::Body;
use crate::spool::{Intake, SpoolError};
use std::collections::BTreeMap;

impl Spool {
    /// Counts readings that could not be committed (reason `disk_full` or
    /// `spool_write_failed`) and keeps the count durable (in a side file, see
    /// `spool::unreported`) until the next successful commit reports it on the loss stream.
    pub fn note_failed(&self, group: &[Intake], error: &SpoolError) {
        let reason = match error {
            SpoolError::DiskFull { .. } => LossReason::DiskFull,
            _ => LossReason::SpoolWriteFailed,
        };
        let mut per_stream: BTreeMap<&str, u64> = BTreeMap::new();
        for r in group.iter().flat_map(|i| &i.readings) {
            *per_stream.entry(&r.stream).or_default() += 1;
        }
        let mut state = self.lock();
        for (stream, n) in &per_stream {
            let loss = Loss::new(stream, reason, *n);
            state.tables.counters.collected += n;
            state.tables.counters.count(&loss);
            // Durable at once (the side file is fsynced below), so reported at once.
            state.reported.count(&loss);
        }
        state.failures.note(
            per_stream.into_iter().map(|(s, n)| (s.to_string(), n)),
            reason,
        );
    }

    /// Refuses to write when the spool's filesystem has less than `min_free_bytes` (plus what
    /// this group needs) free. sled poisons its database on the first ENOSPC until it is
    /// reopened, so running out must never reach sled.
    pub(super) fn check_space(&self, group: &[Intake]) -> Result<(), SpoolError> {
        let reserve = self.inner.settings.min_free_bytes;
        if reserve == 0 {
            return Ok(());
        }
        let Ok(st) = nix::sys::statvfs::statvfs(&self.inner.settings.dir) else {
            return Ok(());
        };
        // The statvfs field types are 32-bit on armhf, 64-bit here.
        #[allow(clippy::useless_conversion)]
        let free = u64::from(st.blocks_available()) * u64::from(st.fragment_size());
        // sled writes about twice what it stores.
        let need: u64 = group
            .iter()
            .flat_map(|i| &i.readings)
            .map(|r| 64 + 2 * body_size(&r.body))
            .sum();
        if free < reserve + need {
            return Err(SpoolError::DiskFull { free, reserve });
        }
        Ok(())
    }
}

/// Rough encoded size of a body, for the free-space check.
fn body_size(body: &Body) -> u64 {
    match body {
        Body::Line(l) => l.len() as u64,
        Body::Fields(f) => f.iter().map(|(k, _)| k.len() as u64 + 9).sum(),
    }
}
