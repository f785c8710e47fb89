//! Opening sled in a child process before opening it in ours.
//!
//! sled 0.34 panics on some damaged spools instead of returning an error: after a power cut
//! left a blob file empty, every open died with `tried to serialize Uninitialized`. Release
//! builds abort on a panic, so `catch_unwind` cannot help, and a panic in `Spool::open` would
//! crash-loop the service on every restart. So, when the ferry binary enabled it ([`enable`]),
//! [`check`] first runs `ferry __probe-spool DIR` (the binary re-executing itself), which opens
//! sled in the spool directory, reads what `Spool::open` reads, and exits. A child that dies by
//! a signal or exits abnormally marks the spool corrupt: the caller moves it aside. A child
//! that reports an ordinary sled error (a lock held, a corruption sled detects) lets the open
//! in this process find and report that error as before.
//!
//! A crashed open is not read-only: sled zeroes its log past the point it recovered to before
//! it writes the snapshot that panics, so the next open may succeed with that tail gone, and
//! sled would not say so. So a crash is remembered in the spool directory ([`CRASHED`], written
//! and fsynced before `check` returns): every later `check` reports the spool as corrupt
//! without probing it again, whichever command meets it next (`ferry run` moves it aside,
//! `ferry spool inspect` refuses). Moving the spool aside takes the file with it.
//!
//! Cost: sled's recovery runs twice per start (once in the child). Only the open is probed;
//! reads of pages later in the run are not.

use super::SpoolError;
use super::keys;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use tracing::{error, warn};

/// The hidden subcommand the child runs.
pub const SUBCOMMAND: &str = "__probe-spool";
/// The child's exit code when sled returned an error (not a crash).
pub const EXIT_SLED_ERROR: i32 = 3;
/// Most of the child's stderr kept for the error message.
const STDERR_KEEP_BYTES: usize = 2048;
/// In the spool directory once sled crashed opening it: the error, for the next open.
pub const CRASHED: &str = "sled-crashed";

static PROGRAM: OnceLock<PathBuf> = OnceLock::new();

/// Makes [`check`] probe with `program` (the ferry binary itself). Without it (the library in
/// tests), `check` does nothing.
pub fn enable(program: PathBuf) {
    let _ = PROGRAM.set(program);
}

/// Opens the spool in `dir` in a child process. `Some(error)` when the child crashed (the
/// spool is to be treated as corrupt); `None` when it opened, when sled reported an error
/// (the caller's own open reports it), or when there is nothing to probe.
pub fn check(dir: &Path) -> Result<Option<SpoolError>, SpoolError> {
    if let Ok(earlier) = std::fs::read_to_string(dir.join(CRASHED)) {
        return Ok(Some(SpoolError::Corrupt(format!(
            "sled crashed while opening it before (its recovery may have cut the log since): {}",
            earlier.trim()
        ))));
    }
    let Some(program) = PROGRAM.get() else {
        return Ok(None);
    };
    if !dir.join("db").exists() {
        return Ok(None);
    }
    let child = std::process::Command::new(program)
        .arg(SUBCOMMAND)
        .arg(dir)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => {
            warn!(program = %program.display(), error = %e, "Cannot start the spool probe; opening the spool without it.");
            return Ok(None);
        }
    };
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stderr.take() {
        // Read to the end (so the child never blocks on a full pipe), keep the tail.
        let mut buf = [0u8; 4096];
        while let Ok(n) = pipe.read(&mut buf) {
            if n == 0 {
                break;
            }
            stderr.extend_from_slice(&buf[..n]);
            if stderr.len() > 2 * STDERR_KEEP_BYTES {
                stderr.drain(..stderr.len() - STDERR_KEEP_BYTES);
            }
        }
    }
    let status = child.wait().map_err(|e| SpoolError::Open {
        dir: dir.to_path_buf(),
        source: e.into(),
    })?;
    if status.success() || status.code() == Some(EXIT_SLED_ERROR) {
        return Ok(None);
    }
    let tail = String::from_utf8_lossy(&stderr[stderr.len().saturating_sub(STDERR_KEEP_BYTES)..])
        .trim()
        .to_string();
    error!(dir = %dir.display(), %status, stderr = %tail, "sled crashed while opening the spool.");
    let why = format!("sled crashed while opening it ({status}): {tail}");
    if let Err(e) = remember(dir, &why) {
        warn!(dir = %dir.display(), error = %e, "Cannot note in the spool that sled crashed opening it.");
    }
    Ok(Some(SpoolError::Corrupt(why)))
}

/// Writes [`CRASHED`] durably (file and directory fsynced).
fn remember(dir: &Path, why: &str) -> std::io::Result<()> {
    use std::io::Write;
    let path = dir.join(CRASHED);
    let mut f = std::fs::File::create(&path)?;
    f.write_all(why.as_bytes())?;
    f.sync_all()?;
    super::seqfile::sync_parent(&path)
}

/// What the child runs: open sled in `dir`, read the spool's metadata and its first and last
/// keys, exit. Returns the exit code. A panic aborts (also in debug builds), so the parent
/// sees the same death either way.
pub fn child(dir: &Path) -> i32 {
    std::panic::set_hook(Box::new(|info| {
        eprintln!("sled panicked: {info}");
        std::process::abort();
    }));
    let opened = sled::Config::new()
        .path(dir)
        .cache_capacity(1 << 20)
        .flush_every_ms(None)
        .open();
    let result = opened.and_then(|db| {
        let tree = db.open_tree("spool")?;
        tree.get(keys::GLOBAL)?;
        tree.get(keys::COUNTERS)?;
        for item in tree.scan_prefix([keys::STREAM]) {
            item?;
        }
        tree.first()?;
        tree.last()?;
        Ok(())
    });
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("sled: {e}");
            EXIT_SLED_ERROR
        }
    }
}
