//! Tail mode: follow one file like `tail -F`, with a position committed atomically with the
//! lines read up to it.
//!
//! # Position
//!
//! The position is (device, inode, byte offset, head fingerprint). The offset is the end of
//! the last complete line handed to the spool; a partial last line is read again after a
//! restart. The head fingerprint (length and FNV-1a hash of the first up to 256 bytes) tells
//! a file from another one that got the same inode number (inode reuse after delete and
//! recreate), and a file that was truncated and grew back past the offset. Each intake carries
//! the position after its last line as its checkpoint, so the spool commits both in one batch:
//! after SIGKILL the collector resumes exactly after the last committed line, with no loss and
//! no duplicate ingest.
//!
//! # Following
//!
//! The file is polled every `poll_interval_ms` (no inotify: it works the same on every
//! filesystem, and a poll of an idle file is two `stat`s and one 256-byte read). Each poll
//! reads up to `batch_lines` lines per intake and goes on at once while there is more. Before
//! reading it checks the open file for truncation; at the end of the file it checks the path:
//!
//! - **Not there yet** (first start, or between delete and re-create): wait. A file that
//!   appears after the collector started is read from its beginning.
//! - **Another file at the path** (rename rotation, delete and re-create, even with the inode
//!   number reused: the open file then has no link left): the old file is read to its end
//!   once more, an unterminated last line of it is taken as a line, then the new file is read
//!   from 0.
//! - **Open file shorter than the offset, or with a different head** (copytruncate; checked
//!   before every read, so a file that grew back past the old offset is not read from
//!   there): read again from 0. A partial line before the truncation is dropped. Lines written between the last
//!   poll and the truncation exist only in the copy and are not seen; that loss is inherent in
//!   copytruncate (prefer rename rotation).
//!
//! `start_at` applies only when there is no stored position and the file exists at start;
//! `end` stores the current end at once, so lines written after the start are not skipped
//! even if ferry crashes before the first line.
//!
//! After a restart whose stored file is no longer at the path, the directory is searched for
//! the stored inode (a rotated `app.log.1` beside it): its rest is read first, then the file
//! at the path from 0. If it cannot be found (deleted, moved elsewhere, compressed), the lines
//! written to it after the stored offset are lost and a warning says so.
//!
//! # One run at a time
//!
//! A run holds [`exclusive_run`](crate::collectors::common::exclusive_run) for its source
//! from before it loads the position until its intakes are settled, so a restarted or
//! reconfigured collector never reads from a position that is about to be overtaken.
//!
//! # Commit failures
//!
//! Every intake is sent with a receipt, and at most [`MAX_PENDING_INTAKES`] are unconfirmed.
//! If the spool reports a failed commit, the run ends with an error once everything already
//! handed over is settled, and the supervisor restarts it from the last committed position.
//! When the later intakes failed too (the usual case: sled stays failed, e.g. on ENOSPC,
//! until it is reopened) the lines are read again rather than lost. When a later intake did
//! commit, its checkpoint is past the failed lines: they stay lost, and the spool reports them
//! on `ferry.loss` as `spool_write_failed`. Waiting on every receipt before the next read
//! would close that gap at the price of one commit interval per batch.

use super::{FileConfig, FileError};
use crate::collectors::lines::{Frame, LineSplitter};
use crate::collectors::parse::{LineDecoder, Parser};
use crate::collectors::{CollectorContext, CollectorError};
use crate::spool::{Checkpoint, Intake};
use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{info, warn};

/// Bytes read from the file at once.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of the head fingerprint.
const HEAD_BYTES: u64 = 256;
/// Intakes handed over whose commit is not confirmed yet. Bounds how much is read ahead of
/// the spool (8 x `batch_lines`) and how long a failed run waits to settle.
const MAX_PENDING_INTAKES: usize = 8;
const POSITION_VERSION: u8 = 1;
const POSITION_LEN: usize = 1 + 8 + 8 + 8 + 2 + 8;

/// Where the collector is in which file; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub head: Head,
}

/// Fingerprint of the first `len` bytes of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub len: u16,
    pub hash: u64,
}

impl Position {
    /// `version u8 | dev u64 | ino u64 | offset u64 | head_len u16 | head_hash u64`, big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(POSITION_LEN);
        v.push(POSITION_VERSION);
        v.extend_from_slice(&self.dev.to_be_bytes());
        v.extend_from_slice(&self.ino.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.head.len.to_be_bytes());
        v.extend_from_slice(&self.head.hash.to_be_bytes());
        v
    }

    pub fn decode(b: &[u8]) -> Option<Position> {
        if b.len() != POSITION_LEN || b[0] != POSITION_VERSION {
            return None;
        }
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        Some(Position {
            dev: u64_at(1),
            ino: u64_at(9),
            offset: u64_at(17),
            head: Head {
                len: u16::from_be_bytes([b[25], b[26]]),
                hash: u64_at(27),
            },
        })
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// The fingerprint of the first `min(len, HEAD_BYTES)` bytes; shorter if the file is.
fn head_of(file: &File, len: u64) -> std::io::Result<Head> {
    let mut buf = vec![0u8; len.min(HEAD_BYTES) as usize];
    let mut got = 0;
    while got < buf.len() {
        match file.read_at(&mut buf[got..], got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(Head {
        len: got as u16,
        hash: fnv1a(&buf[..got]),
    })
}

struct Open {
    file: File,
    /// Where it was opened (the followed path, or a rotated name found by inode).
    name: PathBuf,
    dev: u64,
    ino: u64,
    read_offset: u64,
    head: Head,
}

impl Open {
    fn new(file: File, name: &Path, offset: u64) -> std::io::Result<Open> {
        let meta = file.metadata()?;
        let mut open = Open {
            file,
            name: name.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            read_offset: 0,
            head: Head::default(),
        };
        open.seek(offset)?;
        Ok(open)
    }

    fn seek(&mut self, offset: u64) -> std::io::Result<()> {
        self.file.seek(SeekFrom::Start(offset))?;
        self.read_offset = offset;
        self.head = head_of(&self.file, offset.max(HEAD_BYTES))?;
        Ok(())
    }

    /// Whether the first `head.len` bytes are still what they were.
    fn head_unchanged(&self, head: Head) -> std::io::Result<bool> {
        Ok(head_of(&self.file, u64::from(head.len))? == head)
    }
}

/// What one poll produced.
#[derive(Debug)]
pub struct Step {
    pub frames: Vec<Frame>,
    /// The new position, if it changed since the last step that reported one.
    pub position: Option<Position>,
    /// More may be readable at once (a full batch, or a switch to a new file).
    pub more: bool,
}

/// The synchronous file follower; runs on the blocking pool, one step at a time.
pub struct Tailer {
    path: PathBuf,
    current: Option<Open>,
    splitter: LineSplitter,
    last_reported: Option<Position>,
    chunk: Vec<u8>,
}

fn open_err(path: &Path, source: std::io::Error) -> FileError {
    FileError::Open {
        path: path.display().to_string(),
        source,
    }
}

fn read_err(path: &Path, source: std::io::Error) -> FileError {
    FileError::Read {
        path: path.display().to_string(),
        source,
    }
}

/// Opens `path`; `None` if it does not exist.
fn open_if_exists(path: &Path) -> Result<Option<File>, FileError> {
    match File::open(path) {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(open_err(path, e)),
    }
}

/// A file in `dir` with this device and inode (a rotated copy of the followed file).
fn find_by_inode(dir: &Path, dev: u64, ino: u64) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .flatten()
        .find(|e| {
            e.metadata()
                .is_ok_and(|m| m.is_file() && m.dev() == dev && m.ino() == ino)
        })
        .map(|e| e.path())
}

impl Tailer {
    /// Decides where to start: the stored position if it still names the data, else
    /// `start_at` (see the module doc).
    pub fn start(
        path: PathBuf,
        saved: Option<Position>,
        start_at: super::StartAt,
        max_line_bytes: usize,
    ) -> Result<Tailer, FileError> {
        let mut t = Tailer {
            current: None,
            splitter: LineSplitter::new(b'\n', max_line_bytes),
            last_reported: saved,
            chunk: vec![0u8; READ_CHUNK_BYTES],
            path,
        };
        let at_path = open_if_exists(&t.path)?;
        let Some(saved) = saved else {
            if let Some(file) = at_path {
                let len = file.metadata().map_err(|e| open_err(&t.path, e))?.len();
                let offset = match start_at {
                    super::StartAt::End => len,
                    super::StartAt::Beginning => 0,
                };
                t.current =
                    Some(Open::new(file, &t.path, offset).map_err(|e| open_err(&t.path, e))?);
            }
            return Ok(t);
        };
        // Is the stored file still at the path?
        if let Some(file) = at_path {
            let m = file.metadata().map_err(|e| open_err(&t.path, e))?;
            if (m.dev(), m.ino()) == (saved.dev, saved.ino) {
                let mut open = Open::new(file, &t.path, 0).map_err(|e| open_err(&t.path, e))?;
                if m.len() >= saved.offset
                    && open
                        .head_unchanged(saved.head)
                        .map_err(|e| read_err(&t.path, e))?
                {
                    open.seek(saved.offset).map_err(|e| read_err(&t.path, e))?;
                } else {
                    info!(path = %t.path.display(), "The file was truncated or replaced while ferry was stopped; reading it from the start.");
                }
                t.current = Some(open);
                return Ok(t);
            }
            t.current = Some(Open::new(file, &t.path, 0).map_err(|e| open_err(&t.path, e))?);
        }
        // Rotated while ferry was stopped: finish the stored file under its new name first
        // (the file at the path, if any, is opened again from 0 after it).
        if let Some(rotated) = t.rotated(&saved)? {
            info!(path = %t.path.display(), rotated = %rotated.name.display(), "Finishing the rotated file before following the new one.");
            t.current = Some(rotated);
        } else {
            warn!(path = %t.path.display(), offset = saved.offset, "The file followed before the restart is gone; lines written to it after the stored position are lost. Following the file at the path from its start.");
        }
        Ok(t)
    }

    /// The stored file under another name in the same directory, positioned at the stored
    /// offset, if it is still the same file (long enough, same head).
    fn rotated(&self, saved: &Position) -> Result<Option<Open>, FileError> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let Some(name) = find_by_inode(dir, saved.dev, saved.ino) else {
            return Ok(None);
        };
        let Some(file) = open_if_exists(&name)? else {
            return Ok(None);
        };
        let len = file.metadata().map_err(|e| open_err(&name, e))?.len();
        let mut open = Open::new(file, &name, 0).map_err(|e| open_err(&name, e))?;
        if len < saved.offset
            || !open
                .head_unchanged(saved.head)
                .map_err(|e| read_err(&name, e))?
        {
            // Another file that got the inode number: not ours.
            return Ok(None);
        }
        open.seek(saved.offset).map_err(|e| read_err(&name, e))?;
        Ok(Some(open))
    }

    /// The position after the last complete line read.
    fn position(&self) -> Option<Position> {
        self.current.as_ref().map(|c| Position {
            dev: c.dev,
            ino: c.ino,
            offset: c.read_offset - self.splitter.pending_bytes(),
            head: c.head,
        })
    }

    /// Reads up to about `max_lines` lines, then checks for rotation at the end of the file.
    pub fn step(&mut self, max_lines: usize) -> Result<Step, FileError> {
        let mut frames = Vec::new();
        let mut more = false;
        if self.current.is_none()
            && let Some(file) = open_if_exists(&self.path)?
        {
            info!(path = %self.path.display(), "File appeared; reading it from the start.");
            self.current =
                Some(Open::new(file, &self.path, 0).map_err(|e| open_err(&self.path, e))?);
        }
        if self.current.is_some() {
            // Before reading: a file truncated and written again past the old offset must not
            // be read from that offset.
            self.check_truncated()?;
            let at_end = self.read(&mut frames, max_lines)?;
            if at_end {
                more = self.check_path(&mut frames)?;
            } else {
                more = true;
            }
        }
        let position = self.position();
        let changed = position.is_some() && position != self.last_reported;
        if changed {
            self.last_reported = position;
        }
        Ok(Step {
            frames,
            position: if changed { position } else { None },
            more,
        })
    }

    /// Reads until `max_lines` frames or the end of the file; true at the end.
    fn read(&mut self, frames: &mut Vec<Frame>, max_lines: usize) -> Result<bool, FileError> {
        let cur = self.current.as_mut().expect("read() with an open file");
        loop {
            let n = match cur.file.read(&mut self.chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(&cur.name, e)),
            };
            if n == 0 {
                return Ok(true);
            }
            cur.read_offset += n as u64;
            self.splitter.push(&self.chunk[..n], frames);
            if u64::from(cur.head.len) < HEAD_BYTES && cur.read_offset > u64::from(cur.head.len) {
                cur.head = head_of(&cur.file, HEAD_BYTES).map_err(|e| read_err(&cur.name, e))?;
            }
            if frames.len() >= max_lines {
                return Ok(false);
            }
        }
    }

    /// At the end of the current file: is another file at the path now? True if the
    /// collector switched files and should read again at once.
    fn check_path(&mut self, frames: &mut Vec<Frame>) -> Result<bool, FileError> {
        let cur = self
            .current
            .as_mut()
            .expect("check_path() with an open file");
        let unlinked = cur
            .file
            .metadata()
            .map_err(|e| read_err(&cur.name, e))?
            .nlink()
            == 0;
        let at_path = match std::fs::metadata(&self.path) {
            Ok(m) => m,
            // Renamed or deleted, nothing new yet: keep what is open and wait.
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(open_err(&self.path, e)),
        };
        let same_file = (at_path.dev(), at_path.ino()) == (cur.dev, cur.ino) && !unlinked;
        if !same_file {
            // A new file is at the path. Whatever reached the old one before the new one was
            // created is read now; then the old one is finished.
            self.read(frames, usize::MAX)?;
            if let Some(last) = self.splitter.take_partial() {
                frames.push(last);
            }
            let old = self.current.take().expect("current file");
            info!(path = %self.path.display(), finished = %old.name.display(), "File rotated; following the new file from the start.");
            if let Some(file) = open_if_exists(&self.path)? {
                self.current =
                    Some(Open::new(file, &self.path, 0).map_err(|e| open_err(&self.path, e))?);
            }
            return Ok(true);
        }
        Ok(false)
    }

    /// Restarts at 0 if the open file is shorter than the read offset or its head changed
    /// (copytruncate, or rewritten in place).
    fn check_truncated(&mut self) -> Result<(), FileError> {
        let cur = self
            .current
            .as_mut()
            .expect("check_truncated() with an open file");
        let size = cur
            .file
            .metadata()
            .map_err(|e| read_err(&cur.name, e))?
            .len();
        let truncated = size < cur.read_offset
            || !cur
                .head_unchanged(cur.head)
                .map_err(|e| read_err(&cur.name, e))?;
        if truncated {
            info!(path = %cur.name.display(), offset = cur.read_offset, size, "File truncated; reading it from the start.");
            self.splitter.reset();
            cur.seek(0).map_err(|e| read_err(&cur.name, e))?;
        }
        Ok(())
    }
}

/// Receipts of intakes handed over and not yet confirmed.
#[derive(Default)]
struct Receipts(VecDeque<oneshot::Receiver<bool>>);

fn commit_failed(path: &Path) -> CollectorError {
    CollectorError::Source(format!(
        "the spool could not commit lines of {}; they will be read again from the last committed position",
        path.display()
    ))
}

impl Receipts {
    /// Drops confirmed receipts; an error if a commit failed.
    fn check(&mut self, path: &Path) -> Result<(), CollectorError> {
        while let Some(rx) = self.0.front_mut() {
            match rx.try_recv() {
                Ok(true) => {
                    self.0.pop_front();
                }
                Err(oneshot::error::TryRecvError::Empty) => break,
                Ok(false) | Err(oneshot::error::TryRecvError::Closed) => {
                    self.0.pop_front();
                    return Err(commit_failed(path));
                }
            }
        }
        Ok(())
    }

    /// Waits until fewer than [`MAX_PENDING_INTAKES`] are outstanding.
    async fn make_room(&mut self, path: &Path) -> Result<(), CollectorError> {
        while self.0.len() >= MAX_PENDING_INTAKES {
            let rx = self.0.pop_front().expect("not empty");
            if rx.await != Ok(true) {
                return Err(commit_failed(path));
            }
        }
        Ok(())
    }

    /// Waits until every outstanding intake is committed or failed.
    async fn settle(&mut self) {
        for rx in self.0.drain(..) {
            let _ = rx.await;
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, FileError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| FileError::Panicked(e.to_string()))
}

pub async fn run(config: FileConfig, ctx: CollectorContext) -> Result<(), CollectorError> {
    let parser = Parser::new(&config.format.clone().unwrap_or_default()).map_err(|issues| {
        let msgs: Vec<String> = issues.iter().map(ToString::to_string).collect();
        FileError::Config(msgs.join("; "))
    })?;
    let path = PathBuf::from(
        config
            .path
            .clone()
            .ok_or_else(|| FileError::Config("tail mode needs `path`".into()))?,
    );
    // One run per source: a reconfigured collector's new run loads the position only after
    // the old run's intakes are settled.
    let Some(_run) = crate::collectors::common::exclusive_run(&ctx.name, &ctx.shutdown).await
    else {
        return Ok(());
    };
    let saved = match ctx.positions.load(&ctx.name).await? {
        Some(bytes) => {
            Some(Position::decode(&bytes).ok_or_else(|| FileError::Position(ctx.name.clone()))?)
        }
        None => None,
    };
    let start_at = config.start_at.unwrap_or_default();
    let max_line = config.max_line_bytes() as usize;
    let p = path.clone();
    let tailer = blocking(move || Tailer::start(p, saved, start_at, max_line)).await??;
    info!(collector = %ctx.name, path = %path.display(), resumed = saved.is_some(), "Following file.");
    let mut decoder = LineDecoder::new(&ctx.name, parser, config.tags.clone());
    let mut receipts = Receipts::default();
    let result = follow(&config, &ctx, &path, tailer, &mut decoder, &mut receipts).await;
    // The next run (after a failure or a reconfiguration) loads the committed position: let
    // what was handed over settle first, so that position matches the lines in the spool.
    // The spool writer runs until every collector has stopped, so this ends within a commit.
    receipts.settle().await;
    result
}

async fn follow(
    config: &FileConfig,
    ctx: &CollectorContext,
    path: &Path,
    mut tailer: Tailer,
    decoder: &mut LineDecoder,
    receipts: &mut Receipts,
) -> Result<(), CollectorError> {
    let interval = Duration::from_millis(config.poll_interval_ms());
    let batch = config.batch_lines() as usize;
    loop {
        if ctx.shutdown.is_cancelled() {
            return Ok(());
        }
        let (back, step) = blocking(move || {
            let step = tailer.step(batch);
            (tailer, step)
        })
        .await?;
        tailer = back;
        let step = step?;
        if !step.frames.is_empty() || step.position.is_some() {
            let mut readings = Vec::with_capacity(step.frames.len());
            for frame in step.frames {
                decoder.decode(frame, &mut readings);
            }
            decoder.finish(&mut readings);
            let checkpoint = step.position.map(|p| Checkpoint {
                source: ctx.name.clone(),
                position: p.encode(),
            });
            receipts.check(path)?;
            receipts.make_room(path).await?;
            let (intake, rx) = Intake::with_receipt(readings, checkpoint);
            ctx.send(intake).await?;
            receipts.0.push_back(rx);
        }
        if !step.more {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::StartAt;
    use super::*;
    use std::io::Write;

    fn lines(frames: &[Frame]) -> Vec<String> {
        frames
            .iter()
            .map(|f| match f {
                Frame::Line(l) => String::from_utf8_lossy(l).into_owned(),
                Frame::Oversized(_) => "<oversized>".into(),
            })
            .collect()
    }

    fn append(path: &Path, text: &str) {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// Steps until nothing more is readable at once; all lines and the last position.
    fn drain(t: &mut Tailer) -> (Vec<String>, Option<Position>) {
        let mut out = Vec::new();
        let mut pos = None;
        loop {
            let s = t.step(1000).unwrap();
            out.extend(lines(&s.frames));
            pos = s.position.or(pos);
            if !s.more {
                return (out, pos);
            }
        }
    }

    #[test]
    fn position_round_trips() {
        let p = Position {
            dev: 1,
            ino: u64::MAX,
            offset: 42,
            head: Head { len: 256, hash: 7 },
        };
        assert_eq!(Position::decode(&p.encode()), Some(p));
        assert_eq!(Position::decode(b"short"), None);
    }

    #[test]
    fn start_at_end_skips_history_and_reports_its_position_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "old 1\nold 2\n");
        let mut t = Tailer::start(path.clone(), None, StartAt::End, 1024).unwrap();
        let s = t.step(100).unwrap();
        assert!(s.frames.is_empty());
        assert_eq!(s.position.unwrap().offset, 12);
        append(&path, "new 1\nnew 2\npart");
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["new 1", "new 2"]);
        assert_eq!(pos.unwrap().offset, 24);
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["old 1", "old 2", "new 1", "new 2"]);
    }

    #[test]
    fn resumes_at_the_stored_position_and_detects_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, &"x".repeat(300));
        append(&path, "\na\nb\n");
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        let (_, pos) = drain(&mut t);
        let pos = pos.unwrap();
        append(&path, "c\n");
        let mut t = Tailer::start(path.clone(), Some(pos), StartAt::End, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["c"]);
        // Same inode, rewritten with other content that is longer than the offset.
        std::fs::write(&path, format!("{}\nd\ne\nf\n", "y".repeat(400))).unwrap();
        let mut t = Tailer::start(path.clone(), Some(pos), StartAt::End, 1024).unwrap();
        assert_eq!(drain(&mut t).0.len(), 4);
    }

    #[test]
    fn rename_rotation_finishes_the_old_file_then_reads_the_new_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n");
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["1"]);
        append(&path, "2\nunterminated");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        // Nothing at the path yet: keep reading the old file.
        assert_eq!(drain(&mut t).0, ["2"]);
        append(&dir.path().join("app.log.1"), " end\n3\n");
        append(&path, "4\n");
        assert_eq!(drain(&mut t).0, ["unterminated end", "3", "4"]);
    }

    #[test]
    fn restart_after_rotation_finishes_the_rotated_file_found_by_inode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n2\n");
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        let (_, pos) = drain(&mut t);
        drop(t);
        append(&path, "3\n");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "4\n");
        let mut t = Tailer::start(path.clone(), pos, StartAt::End, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["3", "4"]);
    }

    #[test]
    fn an_unrelated_file_with_the_stored_inode_is_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "new 1\n");
        // As if the stored file's inode number now belonged to another file beside it.
        let other = dir.path().join("other.log");
        append(&other, "not ours\n");
        let m = std::fs::metadata(&other).unwrap();
        let saved = Position {
            dev: m.dev(),
            ino: m.ino(),
            offset: 3,
            head: Head { len: 9, hash: 1 },
        };
        let mut t = Tailer::start(path.clone(), Some(saved), StartAt::End, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["new 1"]);
    }

    #[test]
    fn copytruncate_and_delete_recreate_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n2\n3\n");
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        assert_eq!(drain(&mut t).0, ["1", "2", "3"]);
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        append(&path, "4\n");
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["4"]);
        assert_eq!(pos.unwrap().offset, 2);
        std::fs::remove_file(&path).unwrap();
        assert!(drain(&mut t).0.is_empty());
        append(&path, "5\n6\n");
        assert_eq!(drain(&mut t).0, ["5", "6"]);
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later.log");
        let mut t = Tailer::start(path.clone(), None, StartAt::End, 1024).unwrap();
        let s = t.step(10).unwrap();
        assert!(s.frames.is_empty() && s.position.is_none() && !s.more);
        append(&path, "first\nsecond\n");
        assert_eq!(drain(&mut t).0, ["first", "second"]);
    }

    #[test]
    fn batches_are_bounded_and_positions_are_line_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.log");
        let text: String = (0..5000).map(|i| format!("line {i}\n")).collect();
        append(&path, &text);
        append(&path, "partial");
        let mut t = Tailer::start(path.clone(), None, StartAt::Beginning, 1024).unwrap();
        let mut total = 0;
        loop {
            let s = t.step(100).unwrap();
            total += s.frames.len();
            if let Some(p) = s.position {
                // Every reported offset is just after a newline.
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes[p.offset as usize - 1], b'\n');
            }
            if !s.more {
                break;
            }
        }
        assert_eq!(total, 5000);
    }

    /// The supervisor starts a reconfigured collector while the old run is still stopping.
    #[tokio::test]
    async fn a_new_run_waits_until_the_old_runs_intakes_are_committed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "a=1\n");
        let cfg: FileConfig = serde_yaml::from_str(&format!(
            "name: reload\npath: {}\nstart_at: beginning\npoll_interval_ms: 20\nformat: {{type: kv}}\n",
            path.display()
        ))
        .unwrap();
        let (old_ctx, mut old_rx) = CollectorContext::new_test("reload");
        let positions = old_ctx.positions.clone();
        let old_stop = old_ctx.shutdown.clone();
        let old = tokio::spawn(run(cfg.clone(), old_ctx));
        let mut first = old_rx.recv().await.unwrap();
        old_stop.cancel();
        let (new_ctx, mut new_rx) = CollectorContext::new_test("reload");
        let new_stop = new_ctx.shutdown.clone();
        let new = tokio::spawn(run(
            cfg,
            CollectorContext {
                positions: positions.clone(),
                ..new_ctx
            },
        ));
        // The old run's line is not committed yet: the new run must not read from the start.
        let early = tokio::time::timeout(Duration::from_millis(300), new_rx.recv()).await;
        assert!(
            early.is_err(),
            "the new run read before the old one settled"
        );
        // The spool commits the old run's intake (position and all).
        positions.set_in_memory("reload", first.checkpoint.take().unwrap().position);
        let _ = first.committed.take().unwrap().send(true);
        old.await.unwrap().unwrap();
        append(&path, "a=2\n");
        let mut next = new_rx.recv().await.unwrap();
        let _ = next.committed.take().unwrap().send(true);
        assert_eq!(
            next.readings[0].body,
            crate::record::Body::Fields(vec![("a".into(), crate::record::Value::I64(2))])
        );
        new_stop.cancel();
        new.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn collector_commits_positions_with_lines_and_resumes_from_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "a=1\na=2\n");
        let cfg: FileConfig = serde_yaml::from_str(&format!(
            "name: app\npath: {}\nstart_at: beginning\npoll_interval_ms: 20\nformat: {{type: kv}}\n",
            path.display()
        ))
        .unwrap();
        let (ctx, mut rx) = CollectorContext::new_test("app");
        let positions = ctx.positions.clone();
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(run(cfg.clone(), ctx));
        let mut got = Vec::new();
        while got.len() < 2 {
            let intake = rx.recv().await.unwrap();
            got.extend(intake.readings);
            let cp = intake.checkpoint.unwrap();
            assert_eq!(cp.source, "app");
            // Commit: store the position as the spool would, and confirm.
            positions.set_in_memory("app", cp.position);
            let _ = intake.committed.unwrap().send(true);
        }
        shutdown.cancel();
        task.await.unwrap().unwrap();
        append(&path, "a=3\n");
        let (ctx, mut rx) = CollectorContext::new_test("app");
        let ctx = CollectorContext { positions, ..ctx };
        let shutdown = ctx.shutdown.clone();
        let task = tokio::spawn(run(cfg, ctx));
        let mut intake = rx.recv().await.unwrap();
        // Confirm the commit, as the spool would: a stopping run waits for its receipts.
        let _ = intake.committed.take().unwrap().send(true);
        assert_eq!(intake.readings.len(), 1);
        assert_eq!(
            intake.readings[0].body,
            crate::record::Body::Fields(vec![("a".into(), crate::record::Value::I64(3))])
        );
        shutdown.cancel();
        task.await.unwrap().unwrap();
    }
}
