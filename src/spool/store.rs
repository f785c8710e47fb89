//! The sled-backed spool itself. All methods are synchronous and may block on disk: call them
//! from a blocking thread (`spawn_blocking`), never directly on an async worker.
//!
//! Every mutation (commit, ack) runs under one mutex, so the in-memory counters always equal
//! the persisted ones and a batch never races another for the same keys. Flushes run outside
//! the mutex; [`Inner::readable_below`] then advances so readers see only flushed chunks.

use super::badchunk::{self, StreamView};
use super::chunk::{self, Header};
use super::drain::{DrainRules, DrainState, Lane, Pick};
use super::keys;
use super::seqfile::{Quarantine, SeqFile, SeqFileError, sync_parent};
use super::unreported::Unreported;
use super::{BatchLimits, FullPolicy, SpoolSettings};
use super::{Checkpoint, Intake, SpoolError};
use crate::clock::{ClockSource, ClockState, SystemClock, now_ms};
use crate::loss::{Loss, LossReason};
use crate::record::{Body, COMMANDS_STREAM, ChunkData, LOSS_STREAM, Reading, Record, Value};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{error, warn};

/// When a commit would pass the cap under `drop_oldest`, evict down to this fraction of it
/// (9/10), not just enough to fit. Evicting a little every commit made sled's files grow
/// without bound (28x the cap after 80x churn); evicting in steps keeps them near 2-5x
/// (`benches/spool_churn.rs`, docs/PERFORMANCE.md). The extra records evicted are the oldest
/// and are reported like any eviction.
const EVICT_DOWN_TO: (u64, u64) = (9, 10);
/// Chunks [`Spool::correct_clock`] rewrites per batch, under the lock; commits and acks run
/// between batches. With chunks of at most `batch.max_bytes / 8` (8 KiB by default) a batch
/// holds about 512 KiB, whatever the size of the spool.
const CORRECT_BATCH_CHUNKS: usize = 64;
/// How long `open` waits for sled's file lock before reporting that another process holds it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

/// Persisted per-stream counters.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
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

/// sled 0.34's log file in its directory (pages, and pointers to its blob files).
const SLED_LOG: &str = "db";

/// File written when a spool is created. A spool directory that has it but no counters in
/// sled lost its data.
const MARKER: &str = "ferry-spool";

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
    /// Counters as applied to the tree (the base of the next commit).
    counters: Counters,
    /// Counters as of the latest commit known to be on stable storage: what `stats` reports
    /// as committed and lost. `reported_gen` is the commit it came from, `applied_gen` the
    /// latest applied one (commits may finish their sync out of order).
    reported: Counters,
    /// Each stream's next seq as of that same commit: what `stats` reports as `next_seq`.
    reported_next: HashMap<u32, u64>,
    reported_gen: u64,
    applied_gen: u64,
    /// The durable seq reservation; raised before a commit persists a seq at or above it.
    seq: SeqFile,
    ids: HashMap<String, u32>,
    metas: BTreeMap<u32, StreamMeta>,
    global: GlobalMeta,
    /// Readings that could not be committed (disk full, storage error), per stream; durable in
    /// a side file and reported on the loss stream by the next commit that succeeds.
    failures: Unreported,
    /// `drop_newest` losses held back while the spool stays full, one range per stream,
    /// extended in place (persisted under [`keys::PENDING_LOSSES`]).
    pending: Vec<Loss>,
}

impl State {
    /// The commit of `generation`, whose counters are `counters`, is on stable storage: report
    /// them, unless a later commit's sync finished first.
    fn synced(&mut self, generation: u64, counters: Counters, next: HashMap<u32, u64>) {
        if generation > self.reported_gen {
            self.reported_gen = generation;
            self.reported = counters;
            self.reported_next = next;
        }
    }

    fn total_bytes(&self) -> u64 {
        self.metas.values().map(|m| m.bytes).sum()
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

/// Consecutive chunks of one stream, oldest first.
#[derive(Debug, Clone)]
pub struct Batch {
    pub stream_id: u32,
    pub stream: String,
    pub chunks: Vec<ChunkData>,
    /// True when a limit stopped the batch (more records of this stream are waiting).
    pub full: bool,
    pub lane: Lane,
    /// Which part of the stream it was read from.
    pub pick: Pick,
    /// Normal and bulk both had data when it was picked.
    pub contested: bool,
}

impl Batch {
    pub fn record_count(&self) -> usize {
        self.chunks.iter().map(|c| c.records.len()).sum()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamStats {
    pub name: String,
    pub next_seq: u64,
    pub records: u64,
    pub bytes: u64,
    pub chunks: u64,
    pub evicted: u64,
}

/// What `ferry spool inspect` shows for one stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StreamReport {
    pub name: String,
    pub records: u64,
    pub bytes: u64,
    pub evicted: u64,
    pub next_seq: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub oldest_ts_ms: Option<u64>,
    pub newest_ts_ms: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub records: u64,
    pub bytes: u64,
    pub streams: Vec<StreamStats>,
    pub counters: Counters,
}

impl SpoolStats {
    pub fn stream(&self, name: &str) -> Option<&StreamStats> {
        self.streams.iter().find(|s| s.name == name)
    }
}

fn decode_meta<T: for<'a> Deserialize<'a>>(what: &str, v: &[u8]) -> Result<T, SpoolError> {
    postcard::from_bytes(v).map_err(|e| SpoolError::Corrupt(format!("{what}: {e}")))
}

fn encode_meta<T: Serialize>(v: &T) -> Vec<u8> {
    postcard::to_allocvec(v).expect("postcard encodes into a Vec")
}

/// A chunk about to be written in a commit.
struct NewChunk {
    stream_id: u32,
    chunk_id: u64,
    first_seq: u64,
    count: u64,
    value: Vec<u8>,
}

impl NewChunk {
    fn bytes(&self) -> u64 {
        (self.value.len() + 13) as u64
    }
}

/// Seq ranges dropped in one commit, per (stream, reason), merged when contiguous.
#[derive(Default)]
struct Losses {
    ranges: Vec<Loss>,
}

impl Losses {
    fn add(&mut self, stream: &str, reason: LossReason, first: u64, count: u64) {
        if count == 0 {
            return;
        }
        let last = first + count - 1;
        let same = |l: &&mut Loss| l.stream.as_deref() == Some(stream) && l.reason == reason;
        if let Some(l) = self.ranges.iter_mut().filter(same).last()
            && l.extend(first, last)
        {
            return;
        }
        self.ranges.push(Loss::range(stream, reason, first, last));
    }
}

/// Moves this commit's `spool_full` ranges into `pending`, extending a held range in place
/// when it follows on directly, so a spool that stays full under `drop_newest` writes no new
/// loss chunk per commit. Returns the ranges to write now: a held range that a new one does not
/// follow (records of the stream were stored in between), and, once a commit drops nothing,
/// every held range (room is back).
fn hold_back(pending: &mut Vec<Loss>, losses: Vec<Loss>) -> Vec<Loss> {
    let mut now = Vec::new();
    let mut dropped = false;
    for l in losses {
        if l.reason != LossReason::SpoolFull {
            now.push(l);
            continue;
        }
        dropped = true;
        let (first, last) = l.seqs.expect("a spool_full loss has seqs");
        match pending
            .iter_mut()
            .find(|p| p.stream == l.stream && p.reason == l.reason)
        {
            Some(p) => {
                if !p.extend(first, last) {
                    now.push(std::mem::replace(p, l));
                }
            }
            None => pending.push(l),
        }
    }
    if !dropped {
        now.append(pending);
    }
    now
}

impl Spool {
    /// Opens (or creates) the spool in `settings.dir`. A spool sled cannot open (an error that
    /// says corrupt, or a panic seen by the [`probe`](super::probe)) is moved aside and replaced
    /// by a fresh one; quarantines not yet reported are reported first.
    pub fn open(settings: &SpoolSettings) -> Result<Spool, SpoolError> {
        if let Some(why) = super::probe::check(&settings.dir)? {
            return Self::quarantine(settings, &why);
        }
        match Self::open_inner(settings) {
            Err(e) if e.is_corruption() => Self::quarantine(settings, &e),
            Err(e) => Err(e),
            Ok(spool) => {
                spool.report_quarantines()?;
                Ok(spool)
            }
        }
    }

    /// Opens an existing spool to look into it (`ferry spool inspect`/`export`): a corrupt
    /// spool, or one that makes sled panic, is an error, and nothing is moved.
    pub fn open_to_inspect(settings: &SpoolSettings) -> Result<Spool, SpoolError> {
        if let Some(why) = super::probe::check(&settings.dir)? {
            return Err(why);
        }
        Self::open_inner(settings)
    }

    /// Moves a corrupt spool aside and starts a fresh one whose streams start at the seq
    /// reservation ([`SeqFile`]), above every seq ever handed out, whatever the clock says. The
    /// quarantine is noted in the reservation file before the move and reported on
    /// `ferry.loss` by the fresh spool, so a crash at any point still reports it.
    fn quarantine(settings: &SpoolSettings, why: &SpoolError) -> Result<Spool, SpoolError> {
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
    fn report_quarantines(&self) -> Result<(), SpoolError> {
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

    fn open_inner(settings: &SpoolSettings) -> Result<Spool, SpoolError> {
        let created = !settings.dir.exists();
        std::fs::create_dir_all(&settings.dir)
            .and_then(|()| {
                if created {
                    sync_parent(&settings.dir)
                } else {
                    Ok(())
                }
            })
            .map_err(|source| SpoolError::CreateDir {
                dir: settings.dir.clone(),
                source,
            })?;
        let marker = settings.dir.join(MARKER);
        let existed = marker.exists();
        let (db, log) = open_sled(settings)?;
        let tree = db.open_tree("spool")?;
        let loaded = SeqFile::load(&settings.dir);
        let global: GlobalMeta = match tree.get(keys::GLOBAL)? {
            Some(v) => decode_meta("global counters", &v)?,
            // sled recovers a damaged log by dropping what it cannot read, silently: a spool
            // that was used before but lost its counters would reuse seqs.
            None if existed => {
                return Err(SpoolError::Corrupt(
                    "the spool's counters are gone (damaged or truncated files)".into(),
                ));
            }
            None => {
                let global = GlobalMeta {
                    seq_floor: new_spool_floor(&settings.dir, &loaded),
                    ..GlobalMeta::default()
                };
                tree.insert(keys::GLOBAL, encode_meta(&global))?;
                tree.flush()?;
                log.sync_data()
                    .and_then(|()| write_synced(&marker, b"ferry spool\n"))
                    // sled writes its `conf` once, at creation, without an fsync.
                    .and_then(|()| std::fs::File::open(settings.dir.join("conf"))?.sync_all())
                    .and_then(|()| std::fs::File::open(&settings.dir)?.sync_all())
                    .map_err(|source| SpoolError::CreateDir {
                        dir: settings.dir.clone(),
                        source,
                    })?;
                global
            }
        };
        let counters: Counters = match tree.get(keys::COUNTERS)? {
            Some(v) => decode_meta("counters", &v)?,
            None => Counters::default(),
        };
        let mut metas = BTreeMap::new();
        let mut ids = HashMap::new();
        for item in tree.scan_prefix([keys::STREAM]) {
            let (k, v) = item?;
            let id = u32::from_be_bytes(
                k.get(1..5)
                    .and_then(|s| s.try_into().ok())
                    .ok_or_else(|| SpoolError::Corrupt(format!("stream key {k:?}")))?,
            );
            let meta: StreamMeta = decode_meta("stream counters", &v)?;
            ids.insert(meta.name.clone(), id);
            metas.insert(id, meta);
        }
        let (failures, pending, counters) = load_losses(&tree, &settings.dir, counters)?;
        let seq = reservation(&settings.dir, loaded, &global, &metas)?;
        let (committed, _) = tokio::sync::watch::channel(global.next_chunk_id);
        Ok(Spool {
            inner: Arc::new(Inner {
                readable_below: AtomicU64::new(global.next_chunk_id),
                tree,
                db,
                settings: settings.clone(),
                log,
                state: Mutex::new(State {
                    reported: counters.clone(),
                    reported_next: next_seqs(&metas),
                    reported_gen: 0,
                    applied_gen: 0,
                    counters,
                    seq,
                    ids,
                    metas,
                    global,
                    failures,
                    pending,
                }),
                committed,
                clock: std::sync::RwLock::new(Arc::new(SystemClock::new(
                    crate::clock::DEFAULT_SYNC_MARKER.into(),
                    false,
                ))),
            }),
        })
    }

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

    /// Rewrites the timestamps of stored records stamped unsynced in the current kernel boot:
    /// `ts = uptime_at_stamp + (wall_now - uptime_now)`, marked `Corrected`. Call once the
    /// clock is synchronised. Returns how many records were corrected.
    ///
    /// Works through the spool in batches of `CORRECT_BATCH_CHUNKS` (64) chunks, each one sled
    /// batch under the lock, with a cursor in between: commits and acks go on while a large
    /// spool is corrected, and memory stays one batch. Chunks acked or evicted between batches
    /// are simply not met; chunks committed meanwhile were stamped by the synced clock.
    /// Unreadable chunks are skipped (the drain moves them aside). Flushed once at the end: a
    /// crash before loses only the correction, which the next sync of the same boot redoes.
    pub fn correct_clock(&self) -> Result<u64, SpoolError> {
        let clock = self.clock();
        if !clock.synced() {
            return Ok(0);
        }
        let offset = clock.now_ms() as i64 - clock.uptime_ms() as i64;
        let boot_now = clock.boot();
        let mut cursor = vec![keys::CHUNK];
        let mut corrected = 0;
        loop {
            let (n, next) = self.correct_batch(&cursor, offset, boot_now)?;
            corrected += n;
            match next {
                Some(k) => cursor = k,
                None => break,
            }
        }
        if corrected > 0 {
            self.inner.tree.flush()?;
        }
        Ok(corrected)
    }

    /// One batch of [`Spool::correct_clock`] from chunk key `from`; returns the records
    /// corrected and the key to go on from.
    fn correct_batch(
        &self,
        from: &[u8],
        offset: i64,
        boot_now: u32,
    ) -> Result<(u64, Option<Vec<u8>>), SpoolError> {
        let state = self.lock();
        let mut changed: BTreeMap<u32, StreamMeta> = BTreeMap::new();
        let mut batch = sled::Batch::default();
        let (mut corrected, mut seen) = (0, 0);
        let end = [keys::CHUNK + 1];
        for item in self.inner.tree.range(from..&end[..]) {
            let (k, v) = item?;
            if seen == CORRECT_BATCH_CHUNKS {
                return self.apply_correction(state, batch, changed, corrected, Some(k.to_vec()));
            }
            seen += 1;
            let Ok((h, records)) = chunk::decode(&v) else {
                continue;
            };
            if !records
                .iter()
                .any(|r| matches!(r.clock, ClockState::Unsynced { boot, .. } if boot == boot_now))
            {
                continue;
            }
            let mut buf = Vec::with_capacity(v.len());
            for r in &records {
                let (ts, clock) = match r.clock {
                    ClockState::Unsynced { boot, uptime_ms } if boot == boot_now => {
                        corrected += 1;
                        (
                            (uptime_ms as i64 + offset).max(0) as u64,
                            ClockState::Corrected,
                        )
                    }
                    other => (r.ts_ms, other),
                };
                chunk::encode_record(&mut buf, ts, clock, &r.body);
            }
            let value = chunk::assemble(h, &buf);
            let sid = u32::from_be_bytes(k[1..5].try_into().expect("chunk key has a stream id"));
            if let Some(m) = state.metas.get(&sid) {
                let m = changed.entry(sid).or_insert_with(|| m.clone());
                m.bytes = m.bytes + value.len() as u64 - v.len() as u64;
            }
            batch.insert(k, value);
        }
        self.apply_correction(state, batch, changed, corrected, None)
    }

    fn apply_correction(
        &self,
        mut state: MutexGuard<'_, State>,
        mut batch: sled::Batch,
        changed: BTreeMap<u32, StreamMeta>,
        corrected: u64,
        next: Option<Vec<u8>>,
    ) -> Result<(u64, Option<Vec<u8>>), SpoolError> {
        if corrected > 0 {
            for (sid, meta) in &changed {
                batch.insert(&keys::stream(*sid), encode_meta(meta));
            }
            self.inner.tree.apply_batch(batch)?;
            state.metas.extend(changed);
        }
        Ok((corrected, next))
    }

    /// Watch that changes whenever newly flushed chunks become readable.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.committed.subscribe()
    }

    /// Commits a group of intakes: assigns seqs, packs chunks, applies the byte cap, writes one
    /// batch and flushes it. When this returns `Ok`, every stored record is accepted.
    pub fn commit(&self, group: &[Intake]) -> Result<CommitSummary, SpoolError> {
        self.check_space(group)?;
        let settings = &self.inner.settings;
        let mut state = self.lock();
        let mut metas = state.metas.clone();
        let mut ids = state.ids.clone();
        let mut global = state.global;
        let mut batch = sled::Batch::default();
        let mut summary = CommitSummary::default();
        let mut losses = Losses::default();

        // Group readings by stream, keeping order within each stream.
        let mut by_stream: Vec<(&str, Vec<&Reading>)> = Vec::new();
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

        let committed_ms = now_ms();
        // One look at the clock per commit: its sync check reads the file system.
        let clock = self.clock().snapshot();
        let mut new_chunks: Vec<NewChunk> = Vec::new();
        for (stream, readings) in &by_stream {
            let stream: &str = stream;
            let sid = stream_id(&mut ids, &mut metas, &mut global, stream);
            let meta = metas.get_mut(&sid).expect("stream id was just ensured");
            pack(
                sid,
                meta,
                &mut global,
                readings
                    .iter()
                    .map(|r| (r.ts_ms, clock.stamp(r.ts_ms), &r.body)),
                committed_ms,
                settings,
                &mut new_chunks,
            );
        }

        // Apply the cap.
        let loss_id = ids.get(LOSS_STREAM).copied();
        self.apply_cap(
            &mut metas,
            loss_id,
            global.seq_floor,
            &mut new_chunks,
            &mut batch,
            &mut summary,
            &mut losses,
        )?;

        // Count what this commit dropped, and report it in the same batch, except `drop_newest`
        // ranges held back while the spool stays full; failures of earlier groups go with it.
        let mut counters = state.counters.clone();
        for l in &losses.ranges {
            counters.count(l);
        }
        let mut pending = state.pending.clone();
        let mut report = hold_back(&mut pending, losses.ranges);
        let failures = state.failures.losses();
        let failures_collected = state.failures.collected();
        report.extend(failures.iter().cloned());
        if !report.is_empty() {
            pack_losses(
                (&mut ids, &mut metas, &mut global),
                &report,
                committed_ms,
                &clock,
                settings,
                &mut new_chunks,
            );
        }

        for c in &new_chunks {
            summary.accepted += c.count;
            batch.insert(&keys::chunk(c.stream_id, c.chunk_id), c.value.as_slice());
        }
        // The loss records themselves are not "accepted" readings of a collector.
        summary.accepted -= report.len() as u64;
        for (sid, meta) in &metas {
            if state.metas.get(sid).is_none_or(|old| !same_meta(old, meta)) {
                batch.insert(&keys::stream(*sid), encode_meta(meta));
            }
        }
        let offered: u64 = group.iter().map(|i| i.readings.len() as u64).sum();
        counters.collected += offered;
        counters.committed += summary.accepted;
        // Losses reported by collectors travel as readings on the loss stream.
        for loss in group
            .iter()
            .flat_map(|i| &i.readings)
            .filter(|r| r.stream == LOSS_STREAM)
            .filter_map(|r| Loss::from_body(&r.body))
        {
            counters.count(&loss);
        }
        batch.insert(keys::COUNTERS, encode_meta(&counters));
        batch.insert(keys::GLOBAL, encode_meta(&global));
        if pending != state.pending {
            batch.insert(keys::PENDING_LOSSES, encode_meta(&pending));
        }
        if !failures.is_empty() {
            let (key, generation) = state.failures.reported_marker();
            batch.insert(key, &generation[..]);
        }
        for cp in &checkpoints {
            batch.insert(keys::position(&cp.source), cp.position.as_slice());
        }
        // No seq reaches the tree before the reservation above it is durable.
        let next_seq = metas.values().map(|m| m.next_seq).max().unwrap_or(0);
        let raised = state.seq.reserve_below(next_seq)?;
        let marks: Vec<(String, u64)> = metas
            .values()
            .map(|m| (m.name.clone(), m.next_seq))
            .collect();
        self.inner.tree.apply_batch(batch)?;
        let next = next_seqs(&metas);
        state.metas = metas;
        state.ids = ids;
        state.global = global;
        state.counters = counters.clone();
        state.pending = pending;
        state.applied_gen += 1;
        let generation = state.applied_gen;
        let readable = global.next_chunk_id;
        drop(state);

        self.sync()?;
        {
            let mut state = self.lock();
            state.synced(generation, counters, next);
            if !failures.is_empty() {
                state.failures.reported(&failures, failures_collected);
            }
            // Now durable: new streams (and, per block, every stream) are marked in the file.
            let marks = marks.iter().map(|(n, s)| (n.as_str(), *s));
            if let Err(e) = state.seq.record_streams(marks, raised) {
                error!(error = %e, "Cannot record the spool's streams in the seq reservation.");
            }
        }
        self.inner
            .readable_below
            .fetch_max(readable, Ordering::AcqRel);
        self.inner.committed.send_replace(readable);
        Ok(summary)
    }

    /// Applies the byte cap to a commit: under `drop_oldest` evicts the oldest chunks of any
    /// stream but `skip` (the loss stream) into `batch`, under `drop_newest` drops the new
    /// chunks that do not fit; adjusts `metas` and records every dropped range in `losses`.
    /// An unreadable chunk met by eviction is moved aside ([`badchunk`]), not an error.
    #[allow(clippy::too_many_arguments)]
    fn apply_cap(
        &self,
        metas: &mut BTreeMap<u32, StreamMeta>,
        skip: Option<u32>,
        seq_floor: u64,
        new_chunks: &mut Vec<NewChunk>,
        batch: &mut sled::Batch,
        summary: &mut CommitSummary,
        losses: &mut Losses,
    ) -> Result<(), SpoolError> {
        let settings = &self.inner.settings;
        let new_bytes: u64 = new_chunks.iter().map(NewChunk::bytes).sum();
        let mut total = metas.values().map(|m| m.bytes).sum::<u64>();
        if total + new_bytes <= settings.max_bytes {
            return Ok(());
        }
        match settings.full_policy {
            FullPolicy::DropOldest => {
                let mut evict_from: HashMap<u32, u64> = HashMap::new();
                let target = settings.max_bytes / EVICT_DOWN_TO.1 * EVICT_DOWN_TO.0;
                while total + new_bytes > target {
                    let Some((sid, key, value)) = self.oldest_chunk(metas, skip, &evict_from)?
                    else {
                        break;
                    };
                    let cid = keys::chunk_id(&key).expect("chunk key");
                    let from = evict_from.insert(sid, cid + 1).unwrap_or(0);
                    let bytes = (value.len() + key.len()) as u64;
                    let meta = metas.get_mut(&sid).expect("evicted chunk has a stream");
                    match chunk::header(&value) {
                        Ok(h) => {
                            meta.records -= h.count as u64;
                            meta.evicted += h.count as u64;
                            summary.evicted += h.count as u64;
                            losses.add(
                                &meta.name,
                                LossReason::Evicted,
                                h.first_seq,
                                h.count as u64,
                            );
                        }
                        Err(e) => {
                            let loss = self.evict_bad(
                                sid, meta, cid, from, &value, &e, new_chunks, seq_floor,
                            )?;
                            losses.ranges.push(loss);
                        }
                    }
                    meta.bytes -= bytes;
                    meta.chunks -= 1;
                    total -= bytes;
                    batch.remove(key);
                }
                // Even an empty spool cannot hold this group: keep its newest part.
                let mut excess = (total + new_bytes).saturating_sub(settings.max_bytes);
                new_chunks.retain(|c| {
                    if excess == 0 {
                        return true;
                    }
                    excess = excess.saturating_sub(c.bytes());
                    drop_new(metas, c, losses, LossReason::Evicted, &mut summary.evicted);
                    false
                });
            }
            FullPolicy::DropNewest => {
                let mut room = settings.max_bytes.saturating_sub(total);
                let mut full = false;
                new_chunks.retain(|c| {
                    if !full && c.bytes() <= room {
                        room -= c.bytes();
                        return true;
                    }
                    full = true;
                    drop_new(
                        metas,
                        c,
                        losses,
                        LossReason::SpoolFull,
                        &mut summary.dropped,
                    );
                    false
                });
            }
        }
        Ok(())
    }

    /// Eviction met an unreadable chunk: moves it aside ([`badchunk`]) and un-counts it from
    /// `meta`, whose records with chunk id `>= from` are those left in the tree plus this
    /// commit's `new_chunks`.
    #[allow(clippy::too_many_arguments)]
    fn evict_bad(
        &self,
        sid: u32,
        meta: &mut StreamMeta,
        cid: u64,
        from: u64,
        value: &[u8],
        why: &SpoolError,
        new_chunks: &[NewChunk],
        seq_floor: u64,
    ) -> Result<Loss, SpoolError> {
        let new = new_chunks.iter().filter(|c| c.stream_id == sid);
        let unstored: u64 = new.clone().map(|c| c.count).sum();
        let view = StreamView {
            sid,
            name: &meta.name,
            records: meta.records - unstored,
            from,
            next_seq: new.map(|c| c.first_seq).min().unwrap_or(meta.next_seq),
            seq_floor,
        };
        let dir = &self.inner.settings.dir;
        let taken = badchunk::take(&self.inner.tree, dir, &view, cid, value, why)?;
        meta.records -= taken.records;
        Ok(taken.loss)
    }

    /// Counts readings that could not be committed (reason `disk_full` or
    /// `spool_write_failed`) and keeps the count durable (in a side file, see `spool::unreported`) until the
    /// next successful commit reports it on the loss stream.
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
            state.counters.collected += n;
            state.counters.count(&loss);
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
    fn check_space(&self, group: &[Intake]) -> Result<(), SpoolError> {
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

    /// The oldest stored chunk of any stream but `skip`, after the per-stream `from` bounds.
    #[allow(clippy::type_complexity)]
    fn oldest_chunk(
        &self,
        metas: &BTreeMap<u32, StreamMeta>,
        skip: Option<u32>,
        from: &HashMap<u32, u64>,
    ) -> Result<Option<(u32, sled::IVec, sled::IVec)>, SpoolError> {
        let mut best: Option<(u32, sled::IVec, sled::IVec)> = None;
        for (&sid, meta) in metas {
            if Some(sid) == skip || meta.chunks == 0 {
                continue;
            }
            let start = from.get(&sid).copied().unwrap_or(0);
            let head = self
                .inner
                .tree
                .range(keys::chunk(sid, start)..=keys::chunk(sid, u64::MAX))
                .next()
                .transpose()?;
            if let Some((k, v)) = head {
                let older = best
                    .as_ref()
                    .is_none_or(|(_, bk, _)| keys::chunk_id(&k) < keys::chunk_id(bk));
                if older {
                    best = Some((sid, k, v));
                }
            }
        }
        Ok(best)
    }

    /// The oldest chunks of one stream after `cursors` (chunk id sent last per stream), in
    /// plain oldest-first order with command replies and loss records first.
    pub fn next_batch(
        &self,
        cursors: &HashMap<u32, u64>,
        limits: &BatchLimits,
    ) -> Result<Option<Batch>, SpoolError> {
        self.drain_batch(
            &DrainState::from_backlog(cursors),
            limits,
            &DrainRules::default(),
            false,
            &[],
        )
    }

    /// The next batch to send in the order of [`super::drain`]: lane first, then the stream
    /// whose pending data is oldest; `high_only` when only the high lane may flow (byte
    /// budget spent); streams in `skip` (e.g. lingering) are passed over. The caller records
    /// what it sent with [`DrainState::advance`].
    pub fn drain_batch(
        &self,
        state: &DrainState,
        limits: &BatchLimits,
        rules: &DrainRules,
        high_only: bool,
        skip: &[u32],
    ) -> Result<Option<Batch>, SpoolError> {
        let readable = self.inner.readable_below.load(Ordering::Acquire);
        if readable == 0 {
            return Ok(None);
        }
        let tree = &self.inner.tree;
        let head = |sid: u32, start: u64, end: u64| -> Result<Option<u64>, SpoolError> {
            if start >= end {
                return Ok(None);
            }
            match tree
                .range(keys::chunk(sid, start)..keys::chunk(sid, end))
                .next()
            {
                Some(item) => Ok(Some(keys::chunk_id(&item?.0).expect("chunk key"))),
                None => Ok(None),
            }
        };
        struct Candidate {
            sid: u32,
            name: String,
            lane: Lane,
            pick: Pick,
            start: u64,
            end: u64,
            oldest: u64,
        }
        let mut candidates = Vec::new();
        for (sid, name) in self.streams_with_data() {
            let rule = rules.of(&name);
            if (high_only && rule.lane != Lane::High) || skip.contains(&sid) {
                continue;
            }
            let c = state.cursor(sid);
            let (b_start, b_end) = (c.backlog_start(), c.ahead.map_or(readable, |a| a.0));
            let backlog = head(sid, b_start, b_end)?;
            let fresh = match c.ahead {
                Some((_, last)) => head(sid, last + 1, readable)?.map(|h| (h, last + 1)),
                None => None,
            };
            let (pick, start, end, first) = match (fresh, backlog) {
                (Some((h, start)), _) => (Pick::Fresh, start, readable, h),
                (None, Some(h)) if rule.live_first && c.ahead.is_none() => {
                    (Pick::Newest, b_start, b_end, h)
                }
                (None, Some(h)) => (Pick::Backlog, b_start, b_end, h),
                (None, None) => continue,
            };
            candidates.push(Candidate {
                sid,
                name,
                lane: rule.lane,
                pick,
                start,
                end,
                oldest: backlog.unwrap_or(first).min(first),
            });
        }
        let has = |lane: Lane| candidates.iter().any(|c| c.lane == lane);
        let contested = has(Lane::Normal) && has(Lane::Bulk);
        let lane = if has(Lane::High) {
            Lane::High
        } else if contested {
            state.lower_lane(rules.weights)
        } else if has(Lane::Normal) {
            Lane::Normal
        } else if has(Lane::Bulk) {
            Lane::Bulk
        } else {
            return Ok(None);
        };
        // Command replies first; then the stream whose pending data is oldest.
        let pick = candidates
            .into_iter()
            .filter(|c| c.lane == lane)
            .min_by_key(|c| (c.name != COMMANDS_STREAM, c.oldest))
            .expect("the lane has a candidate");
        let mut batch = Batch {
            stream_id: pick.sid,
            stream: pick.name,
            chunks: Vec::new(),
            full: false,
            lane,
            pick: pick.pick,
            contested,
        };
        let one_chunk = batch.stream == COMMANDS_STREAM;
        let range = tree.range(keys::chunk(pick.sid, pick.start)..keys::chunk(pick.sid, pick.end));
        let (mut records, mut bytes) = (0usize, 0usize);
        let items: Box<dyn Iterator<Item = _>> = if pick.pick == Pick::Newest {
            Box::new(range.rev())
        } else {
            Box::new(range)
        };
        let mut read_all = true;
        let mut moved_aside = false;
        for item in items {
            if one_chunk && !batch.chunks.is_empty() {
                read_all = false;
                break;
            }
            let (k, v) = item?;
            let (h, recs) = match chunk::decode(&v) {
                Ok(decoded) => decoded,
                Err(e) => {
                    self.take_bad_chunk(pick.sid, &k, &v, &e)?;
                    moved_aside = true;
                    continue;
                }
            };
            let size = k.len() + v.len();
            if !batch.chunks.is_empty()
                && (records + recs.len() > limits.max_records || bytes + size > limits.max_bytes)
            {
                read_all = false;
                break;
            }
            records += recs.len();
            bytes += size;
            batch.chunks.push(ChunkData {
                chunk_id: keys::chunk_id(&k).expect("chunk key"),
                committed_ms: h.committed_ms,
                stored_bytes: size,
                records: recs,
            });
            if records >= limits.max_records {
                read_all = false;
                break;
            }
        }
        if batch.chunks.is_empty() && moved_aside {
            // Every chunk in reach was bad and is gone now: pick again.
            return self.drain_batch(state, limits, rules, high_only, skip);
        }
        // A limit stopped the batch: more of the stream waits (for Newest: older chunks).
        batch.full = !read_all || records >= limits.max_records;
        if pick.pick == Pick::Newest {
            batch.chunks.reverse();
        }
        Ok(Some(batch))
    }

    /// Moves an unreadable chunk met by the drain aside ([`badchunk`]): exports it, deletes it,
    /// and writes its `spool_corrupt` loss record, in one flushed batch.
    fn take_bad_chunk(
        &self,
        sid: u32,
        key: &[u8],
        value: &[u8],
        why: &SpoolError,
    ) -> Result<(), SpoolError> {
        let mut state = self.lock();
        // Acked, evicted or taken by someone else meanwhile: nothing to do.
        if self.inner.tree.get(key)?.is_none_or(|v| v != value) {
            return Ok(());
        }
        let (mut metas, mut ids, mut global) =
            (state.metas.clone(), state.ids.clone(), state.global);
        let Some(meta) = metas.get_mut(&sid) else {
            return Ok(());
        };
        let view = StreamView {
            sid,
            name: &meta.name,
            records: meta.records,
            from: 0,
            next_seq: meta.next_seq,
            seq_floor: global.seq_floor,
        };
        let cid = keys::chunk_id(key).expect("chunk key");
        let dir = &self.inner.settings.dir;
        let taken = badchunk::take(&self.inner.tree, dir, &view, cid, value, why)?;
        meta.records = meta.records.saturating_sub(taken.records);
        meta.bytes = meta.bytes.saturating_sub((key.len() + value.len()) as u64);
        meta.chunks = meta.chunks.saturating_sub(1);
        let mut counters = state.counters.clone();
        counters.count(&taken.loss);
        let mut new_chunks = Vec::new();
        let now = now_ms();
        let clock = self.clock().snapshot();
        let settings = &self.inner.settings;
        let losses = [taken.loss];
        pack_losses(
            (&mut ids, &mut metas, &mut global),
            &losses,
            now,
            &clock,
            settings,
            &mut new_chunks,
        );
        let mut batch = sled::Batch::default();
        batch.remove(key);
        for c in &new_chunks {
            batch.insert(&keys::chunk(c.stream_id, c.chunk_id), c.value.as_slice());
        }
        for (sid, meta) in &metas {
            if state.metas.get(sid).is_none_or(|old| !same_meta(old, meta)) {
                batch.insert(&keys::stream(*sid), encode_meta(meta));
            }
        }
        batch.insert(keys::COUNTERS, encode_meta(&counters));
        batch.insert(keys::GLOBAL, encode_meta(&global));
        // The loss record takes a seq: no seq reaches the tree before its reservation.
        let next_seq = metas.values().map(|m| m.next_seq).max().unwrap_or(0);
        state.seq.reserve_below(next_seq)?;
        self.inner.tree.apply_batch(batch)?;
        let next = next_seqs(&metas);
        state.metas = metas;
        state.ids = ids;
        state.global = global;
        state.counters = counters.clone();
        state.applied_gen += 1;
        let generation = state.applied_gen;
        drop(state);
        self.sync()?;
        self.lock().synced(generation, counters, next);
        let readable = global.next_chunk_id;
        self.inner
            .readable_below
            .fetch_max(readable, Ordering::AcqRel);
        self.inner.committed.send_replace(readable);
        Ok(())
    }

    /// Deletes acknowledged chunks. Chunks already gone (evicted meanwhile, or acked twice)
    /// are skipped. Not flushed: a lost deletion only causes a resend.
    pub fn ack(&self, stream_id: u32, chunk_ids: &[u64]) -> Result<u64, SpoolError> {
        self.ack_many(&[(stream_id, chunk_ids.to_vec())])
    }

    /// [`Spool::ack`] for several streams in one sled batch; returns the records deleted.
    pub fn ack_many(&self, acked: &[(u32, Vec<u64>)]) -> Result<u64, SpoolError> {
        let mut state = self.lock();
        let mut batch = sled::Batch::default();
        let mut changed: Vec<(u32, StreamMeta)> = Vec::new();
        let mut removed = 0;
        for (stream_id, chunk_ids) in acked {
            let Some(mut meta) = state.metas.get(stream_id).cloned() else {
                continue;
            };
            let before = removed;
            for &cid in chunk_ids {
                let key = keys::chunk(*stream_id, cid);
                if let Some(v) = self.inner.tree.get(key)? {
                    // Never handed out (the drain moves unreadable chunks aside), so never
                    // acknowledged; skip rather than fail the other acks.
                    let Ok(h): Result<Header, _> = chunk::header(&v) else {
                        warn!(
                            stream_id,
                            chunk_id = cid,
                            "Acknowledged chunk is unreadable; left to the drain."
                        );
                        continue;
                    };
                    meta.records -= h.count as u64;
                    meta.bytes -= (v.len() + key.len()) as u64;
                    meta.chunks -= 1;
                    removed += h.count as u64;
                    batch.remove(&key);
                }
            }
            if removed > before {
                batch.insert(&keys::stream(*stream_id), encode_meta(&meta));
                changed.push((*stream_id, meta));
            }
        }
        if changed.is_empty() {
            return Ok(0);
        }
        self.inner.tree.apply_batch(batch)?;
        state.metas.extend(changed);
        Ok(removed)
    }

    /// The stored position of a re-readable source.
    pub fn position(&self, source: &str) -> Result<Option<Vec<u8>>, SpoolError> {
        Ok(self
            .inner
            .tree
            .get(keys::position(source))?
            .map(|v| v.to_vec()))
    }

    pub fn stats(&self) -> SpoolStats {
        let state = self.lock();
        let streams: Vec<StreamStats> = state
            .metas
            .iter()
            .map(|(id, m)| StreamStats {
                name: m.name.clone(),
                // As of the latest synced commit: a seq reported as taken is on disk.
                next_seq: (state.reported_next.get(id).copied())
                    .unwrap_or(state.global.seq_floor.max(1)),
                records: m.records,
                bytes: m.bytes,
                chunks: m.chunks,
                evicted: m.evicted,
            })
            .collect();
        SpoolStats {
            records: streams.iter().map(|s| s.records).sum(),
            bytes: state.total_bytes(),
            streams,
            // Committed and lost as of the latest synced commit; collected as offered.
            counters: Counters {
                collected: state.counters.collected,
                ..state.reported.clone()
            },
        }
    }

    /// Id and name of every stream that has stored chunks.
    fn streams_with_data(&self) -> Vec<(u32, String)> {
        let state = self.lock();
        state
            .metas
            .iter()
            .filter(|(_, m)| m.chunks > 0)
            .map(|(id, m)| (*id, m.name.clone()))
            .collect()
    }

    /// Commit time of the oldest stored chunk of each stream.
    pub fn oldest_committed_ms(&self) -> HashMap<String, u64> {
        let streams = self.streams_with_data();
        let mut out = HashMap::new();
        for (sid, name) in streams {
            let head = self
                .inner
                .tree
                .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
                .next();
            if let Some(Ok((_, v))) = head
                && let Ok(h) = chunk::header(&v)
            {
                out.insert(name, h.committed_ms);
            }
        }
        out
    }

    /// Per-stream report for `ferry spool inspect`: counts, first and last seq, oldest and
    /// newest sample time of what is stored.
    pub fn inspect(&self) -> Result<Vec<StreamReport>, SpoolError> {
        let metas: Vec<(u32, StreamMeta)> = {
            let state = self.lock();
            state.metas.iter().map(|(id, m)| (*id, m.clone())).collect()
        };
        let mut out = Vec::new();
        for (sid, m) in metas {
            let range = || {
                self.inner
                    .tree
                    .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
            };
            let first = range()
                .next()
                .transpose()?
                .map(|(_, v)| chunk::decode(&v))
                .transpose()?;
            let last = range()
                .next_back()
                .transpose()?
                .map(|(_, v)| chunk::decode(&v))
                .transpose()?;
            let (first_rec, last_rec) = (
                first.as_ref().and_then(|(_, r)| r.first()),
                last.as_ref().and_then(|(_, r)| r.last()),
            );
            out.push(StreamReport {
                name: m.name.clone(),
                records: m.records,
                bytes: m.bytes,
                evicted: m.evicted,
                next_seq: m.next_seq,
                first_seq: first_rec.map(|r| r.seq),
                last_seq: last_rec.map(|r| r.seq),
                oldest_ts_ms: first_rec.map(|r| r.ts_ms),
                newest_ts_ms: last_rec.map(|r| r.ts_ms),
            });
        }
        Ok(out)
    }

    /// Calls `f` with every stored record of `stream`, oldest first, until it returns false.
    /// Returns how many records were visited.
    pub fn for_each_record(
        &self,
        stream: &str,
        mut f: impl FnMut(&Record) -> bool,
    ) -> Result<u64, SpoolError> {
        let Some(sid) = self.lock().ids.get(stream).copied() else {
            return Ok(0);
        };
        let mut n = 0;
        for item in self
            .inner
            .tree
            .range(keys::chunk(sid, 0)..=keys::chunk(sid, u64::MAX))
        {
            let (_, v) = item?;
            for r in chunk::decode(&v)?.1 {
                n += 1;
                if !f(&r) {
                    return Ok(n);
                }
            }
        }
        Ok(n)
    }

    /// Another tree in the spool's database, for state that must be durable with the same
    /// guarantees (e.g. the command ledger). Flushing the spool flushes it too.
    pub fn open_tree(&self, name: &str) -> Result<sled::Tree, SpoolError> {
        Ok(self.inner.db.open_tree(name)?)
    }

    /// The spool's tree, for tests that damage stored values.
    #[cfg(test)]
    pub(super) fn tree(&self) -> &sled::Tree {
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

/// The first seq of a brand-new spool in `dir`: the reservation if there is one (a spool was
/// here before and was moved aside or lost), else 1.
fn new_spool_floor(dir: &std::path::Path, loaded: &Result<Option<SeqFile>, SeqFileError>) -> u64 {
    match loaded {
        Ok(Some(f)) => f.reserved(),
        Ok(None) => 0,
        Err(e) => {
            let floor = now_ms().saturating_mul(1000);
            error!(dir = %dir.display(), error = %e, floor, "The seq reservation is unreadable; a new spool starts its seqs at the clock (ms * 1000).");
            floor
        }
    }
}

/// The seq reservation of an opened spool, raised to cover what sled says was handed out (a
/// spool from before the reservation existed, or a reservation file restored from elsewhere).
fn reservation(
    dir: &std::path::Path,
    loaded: Result<Option<SeqFile>, SeqFileError>,
    global: &GlobalMeta,
    metas: &BTreeMap<u32, StreamMeta>,
) -> Result<SeqFile, SpoolError> {
    let used_below = metas
        .values()
        .map(|m| m.next_seq)
        .max()
        .unwrap_or(0)
        .max(global.seq_floor);
    Ok(match loaded {
        Ok(Some(mut f)) => {
            // sled drops the tail of a log it cannot read, silently: counters that went back
            // would hand out seqs again.
            let next_seq_of =
                |name: &str| metas.values().find(|m| m.name == name).map(|m| m.next_seq);
            if let Some((stream, mark)) = f.regressed(next_seq_of) {
                return Err(SpoolError::Corrupt(format!(
                    "sled lost committed records: stream {stream} had handed out seqs below {mark}, the spool now says {}",
                    next_seq_of(&stream).map_or("nothing".into(), |n| format!("below {n}"))
                )));
            }
            f.reserve_below(used_below)?;
            f
        }
        Ok(None) => SeqFile::create(dir, used_below)?,
        Err(e) => {
            // Rewritten from what sled knows; the error was logged by `new_spool_floor` for
            // a new spool, so only log it here for an existing one.
            warn!(dir = %dir.display(), error = %e, used_below, "The seq reservation is unreadable; rewritten from the spool's counters.");
            SeqFile::create(dir, used_below)?
        }
    })
}

/// Writes a small file and fsyncs it (not its directory).
fn write_synced(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// Opens sled's database in `settings.dir`, waiting briefly for its lock, and a handle of our
/// own on sled's log file.
fn open_sled(settings: &SpoolSettings) -> Result<(sled::Db, std::fs::File), SpoolError> {
    let config = sled::Config::new()
        .path(&settings.dir)
        .cache_capacity(settings.cache_bytes)
        // Commits flush explicitly; the background flush only makes lazy deletions durable.
        .flush_every_ms(Some(1000));
    // sled's lock outlives a dropped handle until its flusher thread ends (up to one flush
    // period), so a reopen in the same process may have to wait for it briefly.
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    let db = loop {
        match config.open() {
            Ok(db) => break db,
            Err(e) if is_lock_error(&e) && std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) if is_lock_error(&e) => {
                return Err(SpoolError::Locked {
                    dir: settings.dir.clone(),
                });
            }
            Err(source) => {
                return Err(SpoolError::Open {
                    dir: settings.dir.clone(),
                    source,
                });
            }
        }
    };
    // Our own handle on sled's log, to fdatasync it after sled's flush (see `sync`).
    let log =
        std::fs::File::open(settings.dir.join(SLED_LOG)).map_err(|source| SpoolError::Open {
            dir: settings.dir.clone(),
            source: source.into(),
        })?;
    Ok((db, log))
}

/// Loss reports that wait at open: `drop_newest` ranges held back (in sled), and failures (in
/// the side file) whose counts sled's counters do not hold yet.
fn load_losses(
    tree: &sled::Tree,
    dir: &std::path::Path,
    mut counters: Counters,
) -> Result<(Unreported, Vec<Loss>, Counters), SpoolError> {
    let pending = match tree.get(keys::PENDING_LOSSES)? {
        Some(v) => decode_meta("held loss reports", &v)?,
        None => Vec::new(),
    };
    let failures = Unreported::load(dir, tree);
    counters.collected += failures.collected();
    for loss in failures.losses() {
        counters.count(&loss);
    }
    Ok((failures, pending, counters))
}

/// Packs loss reports into new chunks of the loss stream.
fn pack_losses(
    (ids, metas, global): (
        &mut HashMap<String, u32>,
        &mut BTreeMap<u32, StreamMeta>,
        &mut GlobalMeta,
    ),
    losses: &[Loss],
    committed_ms: u64,
    clock: &crate::clock::Snapshot,
    settings: &SpoolSettings,
    out: &mut Vec<NewChunk>,
) {
    let bodies: Vec<Body> = losses.iter().map(Loss::to_body).collect();
    let sid = stream_id(ids, metas, global, LOSS_STREAM);
    let meta = metas
        .get_mut(&sid)
        .expect("loss stream id was just ensured");
    pack(
        sid,
        meta,
        global,
        bodies
            .iter()
            .map(|b| (committed_ms, clock.stamp(committed_ms), b)),
        committed_ms,
        settings,
        out,
    );
}

/// Rough encoded size of a body, for the free-space check.
fn body_size(body: &Body) -> u64 {
    match body {
        Body::Line(l) => l.len() as u64,
        Body::Fields(f) => f.iter().map(|(k, _)| k.len() as u64 + 9).sum(),
    }
}

fn same_meta(a: &StreamMeta, b: &StreamMeta) -> bool {
    a.next_seq == b.next_seq
        && a.records == b.records
        && a.bytes == b.bytes
        && a.chunks == b.chunks
        && a.evicted == b.evicted
        && a.name == b.name
}

/// Each stream's next seq, by stream id.
fn next_seqs(metas: &BTreeMap<u32, StreamMeta>) -> HashMap<u32, u64> {
    metas.iter().map(|(id, m)| (*id, m.next_seq)).collect()
}

fn stream_id(
    ids: &mut HashMap<String, u32>,
    metas: &mut BTreeMap<u32, StreamMeta>,
    global: &mut GlobalMeta,
    stream: &str,
) -> u32 {
    if let Some(id) = ids.get(stream) {
        return *id;
    }
    let id = global.next_stream_id;
    global.next_stream_id += 1;
    ids.insert(stream.to_string(), id);
    metas.insert(
        id,
        StreamMeta {
            name: stream.to_string(),
            next_seq: global.seq_floor.max(1),
            ..StreamMeta::default()
        },
    );
    id
}

/// Assigns seqs to `records` and packs them into chunks bounded by the chunk limits.
fn pack<'a>(
    sid: u32,
    meta: &mut StreamMeta,
    global: &mut GlobalMeta,
    records: impl Iterator<Item = (u64, ClockState, &'a Body)>,
    committed_ms: u64,
    settings: &SpoolSettings,
    out: &mut Vec<NewChunk>,
) {
    let mut buf = Vec::new();
    let mut count = 0u64;
    let mut first_seq = meta.next_seq;
    // Replies go out one per message, so each is its own chunk (the unit of acknowledgement).
    let max_records = if meta.name == COMMANDS_STREAM {
        1
    } else {
        settings.chunk_max_records
    };
    let mut flush = |buf: &mut Vec<u8>,
                     count: &mut u64,
                     first_seq: &mut u64,
                     meta: &mut StreamMeta,
                     global: &mut GlobalMeta| {
        if *count == 0 {
            return;
        }
        let value = chunk::assemble(
            Header {
                committed_ms,
                first_seq: *first_seq,
                count: *count as u32,
            },
            buf,
        );
        let c = NewChunk {
            stream_id: sid,
            chunk_id: global.next_chunk_id,
            first_seq: *first_seq,
            count: *count,
            value,
        };
        global.next_chunk_id += 1;
        meta.records += c.count;
        meta.bytes += c.bytes();
        meta.chunks += 1;
        *first_seq += *count;
        out.push(c);
        buf.clear();
        *count = 0;
    };
    for (ts, clock, body) in records {
        let before = buf.len();
        chunk::encode_record(&mut buf, ts, clock, body);
        if count > 0 && buf.len() > settings.chunk_max_bytes {
            // This record does not fit: close the chunk without it, then start a new one.
            let tail = buf.split_off(before);
            flush(&mut buf, &mut count, &mut first_seq, meta, global);
            buf = tail;
        }
        count += 1;
        meta.next_seq += 1;
        if count as usize >= max_records {
            flush(&mut buf, &mut count, &mut first_seq, meta, global);
        }
    }
    flush(&mut buf, &mut count, &mut first_seq, meta, global);
}

/// Un-counts a chunk of this commit that will not be stored, and records its seqs as lost.
fn drop_new(
    metas: &mut BTreeMap<u32, StreamMeta>,
    c: &NewChunk,
    losses: &mut Losses,
    reason: LossReason,
    counter: &mut u64,
) {
    let meta = metas.get_mut(&c.stream_id).expect("new chunk has a stream");
    meta.records -= c.count;
    meta.bytes -= c.bytes();
    meta.chunks -= 1;
    meta.evicted += c.count;
    *counter += c.count;
    losses.add(&meta.name, reason, c.first_seq, c.count);
}
