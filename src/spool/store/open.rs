//! Opening the spool: sled's database, the state loaded from it, the seq reservation.
//!
//! # Invariants
//! - A spool is opened by the probe first ([`probe`](crate::spool::probe)); what sled cannot
//!   open, or what makes it panic, is quarantined (`quarantine.rs`) by [`Spool::open`], and is
//!   an error, with nothing moved, for [`Spool::open_to_inspect`].
//! - A new spool is durable before it is used: its global counters are flushed and
//!   fdatasynced, then its marker file, sled's `conf` and the directory are fsynced. A
//!   directory with the marker but without counters in sled lost its data and is corrupt
//!   (sled drops what it cannot read of a damaged log, silently).
//! - A new spool's streams start at the seq reservation if one is there (a spool was here
//!   before), so no seq is handed out twice; an opened spool's reservation is raised to cover
//!   what sled says was handed out, and counters below a stream's mark in the reservation
//!   are corruption.
//! - Loss reports that waited (held-back `spool_full` ranges, failures in the side file) are
//!   loaded with the counters, so the next commit writes them.

use super::{
    Counters, GlobalMeta, Inner, Spool, State, StreamMeta, Tables, decode_meta, encode_meta,
};
use crate::clock::{SystemClock, now_ms};
use crate::loss::Loss;
use crate::spool::seqfile::{SeqFile, SeqFileError, sync_parent};
use crate::spool::unreported::Unreported;
use crate::spool::{SpoolError, SpoolSettings, keys};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use tracing::{error, warn};

/// How long `open` waits for sled's file lock before reporting that another process holds it.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// sled 0.34's log file in its directory (pages, and pointers to its blob files).
const SLED_LOG: &str = "db";

/// File written when a spool is created. A spool directory that has it but no counters in
/// sled lost its data.
const MARKER: &str = "ferry-spool";

fn is_lock_error(e: &sled::Error) -> bool {
    matches!(e, sled::Error::Io(io) if io.to_string().contains("could not acquire lock"))
}

impl Spool {
    /// Opens (or creates) the spool in `settings.dir`. A spool sled cannot open (an error that
    /// says corrupt, or a panic seen by the [`probe`](crate::spool::probe)) is moved aside and
    /// replaced by a fresh one; quarantines not yet reported are reported first.
    pub fn open(settings: &SpoolSettings) -> Result<Spool, SpoolError> {
        if let Some(why) = crate::spool::probe::check(&settings.dir)? {
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
        if let Some(why) = crate::spool::probe::check(&settings.dir)? {
            return Err(why);
        }
        Self::open_inner(settings)
    }

    /// Opens sled in `settings.dir` (creating the spool if needed) and loads the state.
    pub(super) fn open_inner(settings: &SpoolSettings) -> Result<Spool, SpoolError> {
        let created = !settings.dir.exists();
        create_dir(&settings.dir, created)?;
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
            None => create_spool(settings, &tree, &log, &marker, &loaded)?,
        };
        let counters: Counters = match tree.get(keys::COUNTERS)? {
            Some(v) => decode_meta("counters", &v)?,
            None => Counters::default(),
        };
        let (ids, metas) = load_streams(&tree)?;
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
                    reported_next: metas.iter().map(|(id, m)| (*id, m.next_seq)).collect(),
                    reported_gen: 0,
                    applied_gen: 0,
                    tables: Tables {
                        metas,
                        ids,
                        global,
                        counters,
                        pending,
                    },
                    seq,
                    failures,
                }),
                committed,
                clock: std::sync::RwLock::new(Arc::new(SystemClock::new(
                    crate::clock::DEFAULT_SYNC_MARKER.into(),
                    false,
                ))),
            }),
        })
    }
}

/// Creates the spool directory (and makes its entry durable when it is new).
fn create_dir(dir: &Path, created: bool) -> Result<(), SpoolError> {
    std::fs::create_dir_all(dir)
        .and_then(|()| if created { sync_parent(dir) } else { Ok(()) })
        .map_err(|source| SpoolError::CreateDir {
            dir: dir.to_path_buf(),
            source,
        })
}

/// Writes a new spool's global counters, starting at the seq reservation if there is one, and
/// makes them, the marker, sled's `conf` and the directory durable.
fn create_spool(
    settings: &SpoolSettings,
    tree: &sled::Tree,
    log: &std::fs::File,
    marker: &Path,
    loaded: &Result<Option<SeqFile>, SeqFileError>,
) -> Result<GlobalMeta, SpoolError> {
    let global = GlobalMeta {
        seq_floor: new_spool_floor(&settings.dir, loaded),
        ..GlobalMeta::default()
    };
    tree.insert(keys::GLOBAL, encode_meta(&global))?;
    tree.flush()?;
    log.sync_data()
        .and_then(|()| write_synced(marker, b"ferry spool\n"))
        // sled writes its `conf` once, at creation, without an fsync.
        .and_then(|()| std::fs::File::open(settings.dir.join("conf"))?.sync_all())
        .and_then(|()| std::fs::File::open(&settings.dir)?.sync_all())
        .map_err(|source| SpoolError::CreateDir {
            dir: settings.dir.clone(),
            source,
        })?;
    Ok(global)
}

/// Every stream's persisted counters, and the ids by name.
#[allow(clippy::type_complexity)]
fn load_streams(
    tree: &sled::Tree,
) -> Result<(HashMap<String, u32>, BTreeMap<u32, StreamMeta>), SpoolError> {
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
    Ok((ids, metas))
}

/// The first seq of a brand-new spool in `dir`: the reservation if there is one (a spool was
/// here before and was moved aside or lost), else 1.
fn new_spool_floor(dir: &Path, loaded: &Result<Option<SeqFile>, SeqFileError>) -> u64 {
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
    dir: &Path,
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
fn write_synced(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
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
    // Our own handle on sled's log, to fdatasync it after sled's flush (see `Spool::sync`).
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
    dir: &Path,
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
