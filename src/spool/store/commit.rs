//! A group's commit, in named steps: check the disk's room, group readings by stream, assign
//! seqs and encode chunks, enforce the cap (`cap.rs`), count and report losses, write one
//! batch, reserve the seqs, apply, sync, publish.
//!
//! # Invariants
//! - Each record's seq comes from its stream's persisted counter (`next_seq`) in the order the
//!   group holds it; seqs are consecutive within a stream and never reused.
//! - One sled batch holds everything a commit changes: chunks, stream metadata, counters,
//!   global ids, loss records, held-back ranges, the failure marker and source positions. It
//!   is applied whole or not at all, and the in-memory state follows only once it is applied.
//! - The durable seq reservation is raised above every assigned seq before the batch is
//!   applied.
//! - A record is accepted only once the sync returned; only then are its chunks readable and
//!   its counters reported (`Spool::stats`).
//! - Every dropped seq range is counted in the commit that drops it; loss records are packed
//!   after the cap and are not evicted (the only slack above it).

use super::cap;
use super::pack::{self, NewChunk};
use super::{Spool, Synced, Tables};
use crate::clock::{Snapshot, now_ms};
use crate::loss::Loss;
use crate::record::{LOSS_STREAM, Reading};
use crate::spool::{Checkpoint, Intake, SpoolError, SpoolSettings, keys};
use tracing::error;

/// What one commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitSummary {
    /// Records stored.
    pub accepted: u64,
    /// Old records evicted to make room (`drop_oldest`).
    pub evicted: u64,
    /// New records not stored for lack of room (`drop_newest`).
    pub dropped: u64,
}

/// A group's readings by stream, in the order of the group within each stream.
type ByStream<'a> = Vec<(&'a str, Vec<&'a Reading>)>;

impl Spool {
    /// Commits a group of intakes: assigns seqs, packs chunks, applies the byte cap, writes one
    /// batch and flushes it. When this returns `Ok`, every stored record is accepted.
    pub fn commit(&self, group: &[Intake]) -> Result<CommitSummary, SpoolError> {
        self.check_space(group)?;
        let settings = &self.inner.settings;
        let mut state = self.lock();
        let mut draft = state.draft();

        // Assign seqs and encode chunks. One look at the clock per commit: its sync check
        // reads the file system.
        let (by_stream, checkpoints) = group_by_stream(group);
        let committed_ms = now_ms();
        let clock = self.clock().snapshot();
        let mut new_chunks = pack_group(&mut draft, &by_stream, committed_ms, &clock, settings);

        // Enforce the cap; count and report what it dropped, and earlier groups' failures.
        let mut batch = sled::Batch::default();
        let capped = self.enforce_cap(&mut draft, &mut new_chunks, &mut batch)?;
        let mut summary = CommitSummary {
            accepted: 0,
            evicted: capped.evicted,
            dropped: capped.dropped,
        };
        let failures = state.failures.losses();
        let failures_collected = state.failures.collected();
        let loss_records = report_losses(
            &mut draft,
            capped.losses,
            &failures,
            committed_ms,
            &clock,
            settings,
            &mut new_chunks,
        );
        advance_counters(&mut draft, &mut summary, group, &new_chunks, loss_records);

        // Write one batch, reserve its seqs, apply it; then sync and publish.
        pack::write(&mut batch, &new_chunks);
        write_positions(&mut batch, &checkpoints);
        draft.write_meta(&state.tables, &mut batch);
        if !failures.is_empty() {
            let (key, generation) = state.failures.reported_marker();
            batch.insert(key, &generation[..]);
        }
        let raised = draft.reserve_seqs(&mut state.seq)?;
        let marks = stream_marks(&draft);
        let readable = draft.global.next_chunk_id;
        self.inner.tree.apply_batch(batch)?;
        let synced = state.apply(draft);
        drop(state);
        self.sync()?;
        self.mark_synced(synced, &failures, failures_collected, marks, raised);
        self.publish(readable);
        Ok(summary)
    }

    /// The commit is durable: report its counters and next seqs, clear the failures it wrote,
    /// and mark its streams' next seqs in the reservation file.
    fn mark_synced(
        &self,
        synced: Synced,
        failures: &[Loss],
        failures_collected: u64,
        marks: Vec<(String, u64)>,
        raised: bool,
    ) {
        let mut state = self.lock();
        state.synced(synced);
        if !failures.is_empty() {
            state.failures.reported(failures, failures_collected);
        }
        // Now durable: new streams (and, per block, every stream) are marked in the file.
        let marks = marks.iter().map(|(n, s)| (n.as_str(), *s));
        if let Err(e) = state.seq.record_streams(marks, raised) {
            error!(error = %e, "Cannot record the spool's streams in the seq reservation.");
        }
    }
}

/// Groups readings by stream, keeping order within each stream, and collects the group's
/// source positions.
fn group_by_stream(group: &[Intake]) -> (ByStream<'_>, Vec<&Checkpoint>) {
    let mut by_stream: ByStream<'_> = Vec::new();
    let mut checkpoints: Vec<&Checkpoint> = Vec::new();
    for intake in group {
        for r in &intake.readings {
            match by_stream.iter_mut().find(|(s, _)| *s == r.stream) {
                Some((_, v)) => v.push(r),
                None => by_stream.push((&r.stream, vec![r])),
            }
        }
        checkpoints.extend(intake.checkpoint.as_ref());
    }
    (by_stream, checkpoints)
}

/// Assigns seqs to every stream's readings and encodes them into new chunks.
fn pack_group(
    draft: &mut Tables,
    by_stream: &ByStream<'_>,
    committed_ms: u64,
    clock: &Snapshot,
    settings: &SpoolSettings,
) -> Vec<NewChunk> {
    let mut new_chunks = Vec::new();
    for (stream, readings) in by_stream {
        let sid = draft.stream_id(stream);
        let meta = draft
            .metas
            .get_mut(&sid)
            .expect("stream id was just ensured");
        pack::pack(
            sid,
            meta,
            &mut draft.global,
            readings
                .iter()
                .map(|r| (r.ts_ms, clock.stamp(r.ts_ms), &r.body)),
            committed_ms,
            settings,
            &mut new_chunks,
        );
    }
    new_chunks
}

/// Counts what this commit dropped and reports it in the same batch, except `drop_newest`
/// ranges held back while the spool stays full (`cap::hold_back`); failures of earlier groups
/// (counted when they failed) go with it. Returns how many loss records were packed.
fn report_losses(
    draft: &mut Tables,
    dropped: Vec<Loss>,
    failures: &[Loss],
    committed_ms: u64,
    clock: &Snapshot,
    settings: &SpoolSettings,
    out: &mut Vec<NewChunk>,
) -> u64 {
    for l in &dropped {
        draft.counters.count(l);
    }
    let mut report = cap::hold_back(&mut draft.pending, dropped);
    report.extend(failures.iter().cloned());
    if !report.is_empty() {
        pack::pack_losses(draft, &report, committed_ms, clock, settings, out);
    }
    report.len() as u64
}

/// Adds the group to the counters and the summary: readings offered, records accepted (the
/// spool's own `loss_records` are not a collector's readings), and the losses collectors
/// reported as readings on the loss stream.
fn advance_counters(
    draft: &mut Tables,
    summary: &mut CommitSummary,
    group: &[Intake],
    new_chunks: &[NewChunk],
    loss_records: u64,
) {
    summary.accepted += new_chunks.iter().map(|c| c.count).sum::<u64>();
    summary.accepted -= loss_records;
    let offered: u64 = group.iter().map(|i| i.readings.len() as u64).sum();
    let counters = &mut draft.counters;
    counters.collected += offered;
    counters.committed += summary.accepted;
    for loss in group
        .iter()
        .flat_map(|i| &i.readings)
        .filter(|r| r.stream == LOSS_STREAM)
        .filter_map(|r| Loss::from_body(&r.body))
    {
        counters.count(&loss);
    }
}

/// Writes the group's source positions into the batch, beside the records read up to them.
fn write_positions(batch: &mut sled::Batch, checkpoints: &[&Checkpoint]) {
    for cp in checkpoints {
        batch.insert(keys::position(&cp.source), cp.position.as_slice());
    }
}

/// Every stream's next seq, for the reservation file once the commit is durable.
fn stream_marks(draft: &Tables) -> Vec<(String, u64)> {
    draft
        .metas
        .values()
        .map(|m| (m.name.clone(), m.next_seq))
        .collect()
}
