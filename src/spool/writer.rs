//! The spool writer: the one task that turns intakes into committed groups.
//!
//! It waits for the first intake, then gathers more until `flush_interval` has passed since
//! that first one or `flush_max_records` readings are waiting, and commits the group on the
//! blocking pool (one sled batch, then a flush). While a commit runs the intake channel fills
//! up and collectors wait on `send`: back-pressure instead of unbounded memory.
//!
//! A receipt ([`Intake::committed`]) says `true` only if its group was committed with every
//! reading stored: under `drop_newest` a full spool drops new readings, and then every intake
//! of that group hears `false`, so a sender that resends unconfirmed data may duplicate but
//! never loses.
//!
//! It ends when every sender is gone (all collectors stopped) and the channel is drained, so
//! at shutdown whatever collectors handed over is committed before the spool is flushed.

use super::{Intake, Spool, SpoolError};
use crate::heartbeat::{Heartbeat, TICK};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error, info};

/// Intakes waiting for the writer. A system sample is one intake; 1024 of them is minutes of
/// sampling, far more than one commit takes, so the channel only fills when the disk stalls.
pub const INTAKE_CAPACITY: usize = 1024;

/// Creates the bounded intake channel.
pub fn channel() -> (mpsc::Sender<Intake>, mpsc::Receiver<Intake>) {
    mpsc::channel(INTAKE_CAPACITY)
}

/// Runs until the channel is closed and drained.
pub async fn run(
    spool: Spool,
    mut rx: mpsc::Receiver<Intake>,
    flush_interval: Duration,
    flush_max_records: usize,
    heartbeat: Heartbeat,
) {
    let mut disk_full = false;
    loop {
        heartbeat.touch();
        let first = match tokio::time::timeout(TICK, rx.recv()).await {
            Ok(Some(first)) => first,
            Ok(None) => break,
            Err(_) => continue,
        };
        let deadline = Instant::now() + flush_interval;
        let mut readings = first.readings.len();
        let mut group = vec![first];
        while readings < flush_max_records {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(intake)) => {
                    readings += intake.readings.len();
                    group.push(intake);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let s = spool.clone();
        let result = tokio::task::spawn_blocking(move || {
            let r = s.commit(&group);
            if let Err(e) = &r {
                s.note_failed(&group, e);
            }
            (r, group)
        })
        .await;
        match result {
            Ok((r, group)) => {
                let ok = r.as_ref().is_ok_and(|s| s.dropped == 0);
                match r {
                    Ok(summary) => {
                        if disk_full {
                            info!(
                                "The spool's filesystem has room again; readings are stored again and the dropped ones are reported on ferry.loss."
                            );
                            disk_full = false;
                        }
                        debug!(
                            accepted = summary.accepted,
                            evicted = summary.evicted,
                            dropped = summary.dropped,
                            "Committed a group."
                        )
                    }
                    // Once per episode: a full disk would otherwise log at every flush.
                    Err(e @ SpoolError::DiskFull { .. }) => {
                        if !disk_full {
                            error!(error = %e, "Disk full.");
                            disk_full = true;
                        }
                    }
                    Err(e) => {
                        error!(error = %e, readings, "Cannot commit readings to the spool; they are lost and will be reported on ferry.loss.")
                    }
                }
                for intake in group {
                    if let Some(tx) = intake.committed {
                        let _ = tx.send(ok);
                    }
                }
            }
            Err(e) => error!(error = %e, readings, "The spool commit panicked; readings lost."),
        }
    }
    debug!("Spool writer finished: intake closed and drained.");
}
