//! A corrupt spool moved aside, and reported on a fresh one.
//!
//! # Invariants
//! - The quarantine is noted in the seq reservation file *before* the directory is moved, and
//!   reported (a `spool_corrupt` loss on `ferry.loss`) by the fresh spool, then cleared from
//!   the file: a crash at any point reports it once the next open succeeds. A noted
//!   quarantine whose target does not exist did not happen and is not reported.
//! - The fresh spool's streams start at the reservation, above every seq the old one handed
//!   out, whatever the clock says; without a usable reservation (a spool from before it
//!   existed), at the clock in ms * 1000.

use super::Spool;
use crate::clock::now_ms;
use crate::loss::{Loss, LossReason};
use crate::record::Value;
use crate::spool::seqfile::{Quarantine, SeqFile, sync_parent};
use crate::spool::{Intake, SpoolError, SpoolSettings};
use tracing::{error, warn};

impl Spool {
    /// Moves a corrupt spool aside and starts a fresh one whose streams start at the seq
    /// reservation ([`SeqFile`]), above every seq ever handed out, whatever the clock says. The
    /// quarantine is noted in the reservation file before the move and reported on
    /// `ferry.loss` by the fresh spool, so a crash at any point still reports it.
    pub(super) fn quarantine(
        settings: &SpoolSettings,
        why: &SpoolError,
    ) -> Result<Spool, SpoolError> {
        let dir = &settings.dir;
        let name = dir
            .file_name()
            .map_or_else(|| "spool".into(), |n| n.to_string_lossy().into_owned());
        let mut target = dir.with_file_name(format!("{name}.corrupt-{}", now_ms()));
        for n in 1.. {
            if !target.exists() {
                break;
            }
            target = dir.with_file_name(format!("{name}.corrupt-{}-{n}", now_ms()));
        }
        let mut seq = match SeqFile::load(dir) {
            Ok(Some(f)) => f,
            other => {
                // A spool from before the reservation existed: the clock is all that is left.
                let floor = now_ms().saturating_mul(1000);
                error!(dir = %dir.display(), floor, problem = ?other.err(), "No usable seq reservation for the corrupt spool; new seqs start at the clock (ms * 1000).");
                SeqFile::create(dir, floor)?
            }
        };
        seq.add_unreported(Quarantine {
            moved_to: target.clone(),
            error: why.to_string(),
        })?;
        std::fs::rename(dir, &target)
            .and_then(|()| sync_parent(dir))
            .map_err(|e| {
                error!(dir = %dir.display(), error = %e, "Cannot move the corrupt spool aside.");
                SpoolError::Corrupt(format!("{why}; moving it aside failed: {e}"))
            })?;
        error!(dir = %dir.display(), moved_to = %target.display(), error = %why, "The spool is corrupt: moved aside, continuing on a fresh spool. Records it held are lost.");
        drop(seq);
        let spool = Self::open_inner(settings)?;
        spool.report_quarantines()?;
        Ok(spool)
    }

    /// Commits a `spool_corrupt` loss record for every quarantine the reservation file still
    /// lists, then clears the list.
    pub(super) fn report_quarantines(&self) -> Result<(), SpoolError> {
        let pending = self.lock().seq.unreported().to_vec();
        if pending.is_empty() {
            return Ok(());
        }
        let mut intakes = Vec::new();
        for q in pending {
            if !q.moved_to.exists() {
                // Noted, then the process died before the move: the spool was not moved.
                warn!(moved_to = %q.moved_to.display(), "A noted quarantine did not happen; not reported.");
                continue;
            }
            let loss = Loss {
                stream: None,
                reason: LossReason::SpoolCorrupt,
                count: 1,
                seqs: None,
                detail: vec![
                    (
                        "quarantined".into(),
                        Value::Str(q.moved_to.display().to_string()),
                    ),
                    ("error".into(), Value::Str(q.error)),
                ],
            };
            intakes.push(Intake::reading(loss.to_reading()));
        }
        if !intakes.is_empty() {
            self.commit(&intakes)?;
        }
        self.lock().seq.clear_unreported()?;
        Ok(())
    }
}
