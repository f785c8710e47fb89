//! Tail mode: follow one file like `tail -F`, with a position committed atomically with the
//! lines read up to it, and rotated files read until their writer is done with them.
//!
//! # Position
//!
//! A file's position is (device, inode, byte offset, head fingerprint). The offset is the end
//! of the last complete line handed to the spool; a partial last line is read again after a
//! restart. The head fingerprint (length and FNV-1a hash of the first up to 256 bytes) tells
//! a file from another one that got the same inode number (inode reuse after delete and
//! recreate), and a file that was truncated and grew back past the offset.
//!
//! The collector's [`Position`] lists every file it reads: the rotated files it still waits
//! on, oldest first, and the followed file. Each intake carries the whole list after its last
//! line as its checkpoint, so the spool commits both in one batch: after SIGKILL the collector
//! resumes every file exactly after its last committed line, with no loss and no duplicate
//! ingest. A position stored by an older ferry (version 1: one file) is read as the followed
//! file alone, so an upgrade resumes exactly too.
//!
//! # Following
//!
//! The files are polled every `poll_interval_ms` (no inotify: it works the same on every
//! filesystem, and a poll of an idle file is two `stat`s and one 256-byte read). Each poll
//! reads up to `batch_lines` lines per intake and goes on at once while there is more. Before
//! reading a file it checks it for truncation; at the end of the followed file it checks the
//! path:
//!
//! - **Not there yet** (first start, or between delete and re-create): wait. A file that
//!   appears after the collector started is read from its beginning.
//! - **Another file at the path** (rename rotation, delete and re-create, even with the inode
//!   number reused: the open file then has no link left): the open file becomes a *rotated
//!   file* and the new one is followed from 0. The application may go on writing to the old
//!   file through its open handle until it reopens the path (logrotate's `create` with a
//!   `postrotate` signal), so a rotated file is read at every poll, beside the followed one,
//!   until it has been idle (no new byte) at its end for `rotate_wait_ms`; then an
//!   unterminated last line of it is taken as a line and it leaves the position. A rotated
//!   file that is deleted meanwhile is still read through the open handle. Rotations within
//!   `rotate_wait_ms` leave several rotated files; at most [`MAX_ROTATED_FILES`] are waited
//!   on, an older one is finished as soon as it is read to its end (as with
//!   `rotate_wait_ms: 0`). Bytes written to a rotated file after it was finished are not read.
//! - **Open file shorter than the offset, or with a different head** (copytruncate; checked
//!   before every read, so a file that grew back past the old offset is not read from
//!   there): read again from 0. A partial line before the truncation is dropped. Lines written
//!   between the last poll and the truncation exist only in the copy and are not seen; that
//!   loss is inherent in copytruncate (prefer rename rotation).
//!
//! `start_at` applies only when there is no stored position and the file exists at start;
//! `end` stores the current end at once, so lines written after the start are not skipped
//! even if ferry crashes before the first line.
//!
//! # Order
//!
//! All files feed one stream, whose seqs the spool hands out in intake order, strictly
//! increasing. Each poll reads the rotated files oldest first and the followed file last, and
//! reads a newer file only once every older one is at its end: a line gets a higher seq than
//! every line that was already in an older file when it was read. Lines of one file keep their
//! order; lines written at the same time to an old and a new file (one writer has reopened,
//! another not yet) interleave in the order ferry read them.
//!
//! # Restart
//!
//! The stored followed file is looked for at the path. If another file is there, the stored
//! one is looked for by inode in the same directory (a rotated `app.log.1`) and becomes a
//! rotated file, and the file at the path is read from 0; if nothing is there, the stored file
//! stays the followed one under its new name. Each stored rotated file is looked for by inode
//! in the directory and resumed at its offset; its idle time counts from the restart. A
//! stored file that cannot be found (deleted, moved elsewhere, compressed) or is no longer the
//! same file (shorter than the offset, another head) cannot be finished: the lines written to
//! it after the stored offset are lost, how many cannot be known (the file is gone), and an
//! ERROR names its inode and offset.
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
use std::time::{Duration, Instant};
use tokio::sync::oneshot;
use tracing::{error, info, warn};

/// Bytes read from a file at once.
const READ_CHUNK_BYTES: usize = 64 << 10;
/// Bytes of the head fingerprint.
const HEAD_BYTES: u64 = 256;
/// Intakes handed over whose commit is not confirmed yet. Bounds how much is read ahead of
/// the spool (8 x `batch_lines`) and how long a failed run waits to settle.
const MAX_PENDING_INTAKES: usize = 8;
/// Rotated files waited on at once. Each holds a file descriptor and up to `max_line_bytes`
/// of a partial line; logrotate rotates a file once per run, so more than a few within
/// `rotate_wait_ms` means something rotates far faster than any writer reopens.
pub const MAX_ROTATED_FILES: usize = 8;
/// One file, the only format before rotated files were waited for: `1 u8 | file`.
const POSITION_V1: u8 = 1;
/// `2 u8 | rotated count u16 | followed present u8 | rotated files.. | followed file`.
const POSITION_V2: u8 = 2;
/// `dev u64 | ino u64 | offset u64 | head_len u16 | head_hash u64`, big-endian.
const FILE_POSITION_LEN: usize = 8 + 8 + 8 + 2 + 8;

/// Where the collector is in one file; see the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FilePosition {
    pub dev: u64,
    pub ino: u64,
    pub offset: u64,
    pub head: Head,
}

/// Where the collector is in every file it reads.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Position {
    /// Rotated files not finished yet, oldest first.
    pub rotated: Vec<FilePosition>,
    /// The followed file, if one is open.
    pub followed: Option<FilePosition>,
}

/// Fingerprint of the first `len` bytes of a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub len: u16,
    pub hash: u64,
}

impl FilePosition {
    fn put(&self, v: &mut Vec<u8>) {
        v.extend_from_slice(&self.dev.to_be_bytes());
        v.extend_from_slice(&self.ino.to_be_bytes());
        v.extend_from_slice(&self.offset.to_be_bytes());
        v.extend_from_slice(&self.head.len.to_be_bytes());
        v.extend_from_slice(&self.head.hash.to_be_bytes());
    }

    /// From exactly [`FILE_POSITION_LEN`] bytes.
    fn get(b: &[u8]) -> FilePosition {
        let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        FilePosition {
            dev: u64_at(0),
            ino: u64_at(8),
            offset: u64_at(16),
            head: Head {
                len: u16::from_be_bytes([b[24], b[25]]),
                hash: u64_at(26),
            },
        }
    }
}

impl Position {
    /// Version 2 (see [`POSITION_V2`]); the version 1 form when only a followed file is
    /// open, so a downgrade within that state still resumes.
    pub fn encode(&self) -> Vec<u8> {
        match (&self.rotated[..], &self.followed) {
            ([], Some(f)) => {
                let mut v = Vec::with_capacity(1 + FILE_POSITION_LEN);
                v.push(POSITION_V1);
                f.put(&mut v);
                v
            }
            _ => {
                let files = self.rotated.len() + usize::from(self.followed.is_some());
                let mut v = Vec::with_capacity(4 + files * FILE_POSITION_LEN);
                v.push(POSITION_V2);
                // At most MAX_ROTATED_FILES plus a few being finished: far below u16::MAX.
                let count = u16::try_from(self.rotated.len()).unwrap_or(u16::MAX);
                v.extend_from_slice(&count.to_be_bytes());
                v.push(u8::from(self.followed.is_some()));
                for f in self.rotated.iter().take(usize::from(count)) {
                    f.put(&mut v);
                }
                if let Some(f) = &self.followed {
                    f.put(&mut v);
                }
                v
            }
        }
    }

    /// Either version; `None` if the bytes are neither.
    pub fn decode(b: &[u8]) -> Option<Position> {
        match *b.first()? {
            POSITION_V1 if b.len() == 1 + FILE_POSITION_LEN => Some(Position {
                rotated: Vec::new(),
                followed: Some(FilePosition::get(&b[1..])),
            }),
            POSITION_V2 if b.len() >= 4 => {
                let rotated = usize::from(u16::from_be_bytes([b[1], b[2]]));
                let followed = match b[3] {
                    0 => false,
                    1 => true,
                    _ => return None,
                };
                let files = &b[4..];
                if files.len() != (rotated + usize::from(followed)) * FILE_POSITION_LEN {
                    return None;
                }
                let mut all: Vec<FilePosition> = files
                    .chunks_exact(FILE_POSITION_LEN)
                    .map(FilePosition::get)
                    .collect();
                let followed = if followed { all.pop() } else { None };
                Some(Position {
                    rotated: all,
                    followed,
                })
            }
            _ => None,
        }
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

/// One file being read, followed or rotated.
struct Open {
    file: File,
    /// Where it was opened (the followed path, or a rotated name found by inode).
    name: PathBuf,
    dev: u64,
    ino: u64,
    read_offset: u64,
    head: Head,
    /// Its own: a partial line of one file must not be continued by another file's bytes.
    splitter: LineSplitter,
    /// When a read last got bytes, or the file was rotated or resumed as rotated.
    last_data: Instant,
    /// Finish it at its end without waiting (more than [`MAX_ROTATED_FILES`] wait).
    hurry: bool,
}

impl Open {
    fn new(
        file: File,
        name: &Path,
        offset: u64,
        max_line_bytes: usize,
        now: Instant,
    ) -> Result<Open, FileError> {
        let meta = file.metadata().map_err(|e| open_err(name, e))?;
        let mut open = Open {
            file,
            name: name.to_path_buf(),
            dev: meta.dev(),
            ino: meta.ino(),
            read_offset: 0,
            head: Head::default(),
            splitter: LineSplitter::new(b'\n', max_line_bytes),
            last_data: now,
            hurry: false,
        };
        open.seek(offset)?;
        Ok(open)
    }

    fn seek(&mut self, offset: u64) -> Result<(), FileError> {
        self.file
            .seek(SeekFrom::Start(offset))
            .map_err(|e| read_err(&self.name, e))?;
        self.read_offset = offset;
        self.head =
            head_of(&self.file, offset.max(HEAD_BYTES)).map_err(|e| read_err(&self.name, e))?;
        Ok(())
    }

    /// Whether the first `head.len` bytes are still what they were.
    fn head_unchanged(&self, head: Head) -> Result<bool, FileError> {
        Ok(head_of(&self.file, u64::from(head.len)).map_err(|e| read_err(&self.name, e))? == head)
    }

    /// Whether it is still the file `saved` describes: long enough, with the same head.
    fn matches(&self, saved: &FilePosition) -> Result<bool, FileError> {
        let len = self.len()?;
        Ok(len >= saved.offset && self.head_unchanged(saved.head)?)
    }

    fn len(&self) -> Result<u64, FileError> {
        Ok(self
            .file
            .metadata()
            .map_err(|e| read_err(&self.name, e))?
            .len())
    }

    /// The position after the last complete line read.
    fn position(&self) -> FilePosition {
        FilePosition {
            dev: self.dev,
            ino: self.ino,
            offset: self.read_offset - self.splitter.pending_bytes(),
            head: self.head,
        }
    }

    /// Restarts at 0 if the file is shorter than the read offset or its head changed
    /// (copytruncate, or rewritten in place).
    fn check_truncated(&mut self) -> Result<(), FileError> {
        let size = self.len()?;
        let truncated = size < self.read_offset || !self.head_unchanged(self.head)?;
        if truncated {
            info!(path = %self.name.display(), offset = self.read_offset, size, "File truncated; reading it from the start.");
            self.splitter.reset();
            self.seek(0)?;
        }
        Ok(())
    }

    /// Reads until `frames` holds `max_frames` or the end of the file; true at the end.
    fn read(
        &mut self,
        chunk: &mut [u8],
        frames: &mut Vec<Frame>,
        max_frames: usize,
        now: Instant,
    ) -> Result<bool, FileError> {
        loop {
            if frames.len() >= max_frames {
                return Ok(false);
            }
            let n = match self.file.read(chunk) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(read_err(&self.name, e)),
            };
            if n == 0 {
                return Ok(true);
            }
            self.last_data = now;
            self.read_offset += n as u64;
            self.splitter.push(&chunk[..n], frames);
            if u64::from(self.head.len) < HEAD_BYTES && self.read_offset > u64::from(self.head.len)
            {
                self.head = head_of(&self.file, HEAD_BYTES).map_err(|e| read_err(&self.name, e))?;
            }
        }
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

/// How a [`Tailer`] starts and waits; from the collector's config.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    pub start_at: super::StartAt,
    pub max_line_bytes: usize,
    /// How long a rotated file must be idle at its end before it is finished.
    pub rotate_wait: Duration,
}

/// The synchronous file follower; runs on the blocking pool, one step at a time. Time comes
/// in as an argument (`now`), so the idle rule is tested without waiting.
pub struct Tailer {
    path: PathBuf,
    settings: Settings,
    followed: Option<Open>,
    /// Oldest first.
    rotated: VecDeque<Open>,
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

/// Where the stored followed file was found after a restart.
struct Restored {
    /// Still the followed file (at the path, or renamed with nothing new at the path).
    followed: Option<Open>,
    /// Rotated while ferry was stopped: a new file is at the path.
    rotated: Option<Open>,
    /// The file at the path, if it is not the stored followed file.
    new_at_path: Option<File>,
}

/// A stored file that cannot be resumed: what was written to it after `saved.offset` is lost.
fn lost(path: &Path, saved: &FilePosition) {
    error!(
        path = %path.display(),
        inode = saved.ino,
        offset = saved.offset,
        "A file read before the restart is gone or was replaced; the lines written to it after the stored offset are lost (how many cannot be known)."
    );
}

impl Tailer {
    /// Decides where to start: the stored position for each file it still names, else
    /// `start_at` (see the module doc).
    pub fn start(
        path: PathBuf,
        saved: Option<Position>,
        settings: Settings,
        now: Instant,
    ) -> Result<Tailer, FileError> {
        let mut t = Tailer {
            followed: None,
            rotated: VecDeque::new(),
            // Nothing stored yet is an empty position: a first file is reported at once.
            last_reported: Some(saved.clone().unwrap_or_default()),
            chunk: vec![0u8; READ_CHUNK_BYTES],
            settings,
            path,
        };
        let at_path = open_if_exists(&t.path)?;
        let Some(saved) = saved else {
            if let Some(file) = at_path {
                let len = file.metadata().map_err(|e| open_err(&t.path, e))?.len();
                let offset = match settings.start_at {
                    super::StartAt::End => len,
                    super::StartAt::Beginning => 0,
                };
                t.followed = Some(t.open(file, &t.path, offset, now)?);
            }
            return Ok(t);
        };
        let restored = t.restore_followed(saved.followed, at_path, now)?;
        t.followed = restored.followed;
        for f in &saved.rotated {
            let same = |o: &Open| (o.dev, o.ino) == (f.dev, f.ino);
            if t.is_open(f) || restored.rotated.as_ref().is_some_and(same) {
                continue;
            }
            match t.find_rotated(f, now)? {
                Some(open) => t.rotated.push_back(open),
                None => lost(&t.path, f),
            }
        }
        t.rotated.extend(restored.rotated);
        if let Some(file) = restored.new_at_path {
            let m = file.metadata().map_err(|e| open_err(&t.path, e))?;
            let stored = t
                .rotated
                .iter()
                .position(|o| (o.dev, o.ino) == (m.dev(), m.ino()));
            t.followed = match stored {
                // A stored rotated file renamed back to the path: it keeps its offset.
                Some(i) => t.rotated.remove(i),
                // Newer than every stored file: all of it is new.
                None => Some(t.open(file, &t.path, 0, now)?),
            };
        }
        if !t.rotated.is_empty() {
            info!(path = %t.path.display(), rotated = t.rotated.len(), "Resuming rotated files beside the followed one.");
        }
        Ok(t)
    }

    /// The stored followed file: at the path (followed), under another name with nothing new
    /// at the path (still followed), or under another name with a new file at the path
    /// (rotated while ferry was stopped).
    fn restore_followed(
        &self,
        saved: Option<FilePosition>,
        at_path: Option<File>,
        now: Instant,
    ) -> Result<Restored, FileError> {
        let found = |followed, rotated, new_at_path| {
            Ok(Restored {
                followed,
                rotated,
                new_at_path,
            })
        };
        let Some(saved) = saved else {
            return found(None, None, at_path);
        };
        if let Some(file) = at_path {
            let m = file.metadata().map_err(|e| open_err(&self.path, e))?;
            if (m.dev(), m.ino()) == (saved.dev, saved.ino) {
                let mut open = self.open(file, &self.path, 0, now)?;
                if open.matches(&saved)? {
                    open.seek(saved.offset)?;
                } else {
                    info!(path = %self.path.display(), "The file was truncated or replaced while ferry was stopped; reading it from the start.");
                }
                return found(Some(open), None, None);
            }
            return match self.find_rotated(&saved, now)? {
                Some(open) => {
                    info!(path = %self.path.display(), rotated = %open.name.display(), "Rotated while ferry was stopped; reading the old file until it is idle beside the new one.");
                    found(None, Some(open), Some(file))
                }
                None => {
                    lost(&self.path, &saved);
                    found(None, None, Some(file))
                }
            };
        }
        match self.find_rotated(&saved, now)? {
            Some(open) => found(Some(open), None, None),
            None => {
                lost(&self.path, &saved);
                found(None, None, None)
            }
        }
    }

    fn open(&self, file: File, name: &Path, offset: u64, now: Instant) -> Result<Open, FileError> {
        Open::new(file, name, offset, self.settings.max_line_bytes, now)
    }

    /// Whether the file `saved` names is open already (two stored entries, one file).
    fn is_open(&self, saved: &FilePosition) -> bool {
        self.followed
            .iter()
            .chain(self.rotated.iter())
            .any(|o| (o.dev, o.ino) == (saved.dev, saved.ino))
    }

    /// The stored file under any name in the path's directory, positioned at the stored
    /// offset, if it is still the same file (long enough, same head).
    fn find_rotated(&self, saved: &FilePosition, now: Instant) -> Result<Option<Open>, FileError> {
        let dir = self.path.parent().unwrap_or(Path::new("/"));
        let Some(name) = find_by_inode(dir, saved.dev, saved.ino) else {
            return Ok(None);
        };
        let Some(file) = open_if_exists(&name)? else {
            return Ok(None);
        };
        let mut open = self.open(file, &name, 0, now)?;
        if !open.matches(saved)? {
            // Another file that got the inode number: not ours.
            return Ok(None);
        }
        open.seek(saved.offset)?;
        Ok(Some(open))
    }

    /// Every file's position after its last complete line.
    fn position(&self) -> Position {
        Position {
            rotated: self.rotated.iter().map(Open::position).collect(),
            followed: self.followed.as_ref().map(Open::position),
        }
    }

    /// Reads up to about `max_lines` lines, rotated files first, then checks for rotation at
    /// the end of the followed file. `now` is the time of this poll.
    pub fn step(&mut self, max_lines: usize, now: Instant) -> Result<Step, FileError> {
        let mut frames = Vec::new();
        if self.followed.is_none()
            && let Some(file) = open_if_exists(&self.path)?
        {
            info!(path = %self.path.display(), "File appeared; reading it from the start.");
            self.followed = Some(self.open(file, &self.path, 0, now)?);
        }
        let mut more = self.read_rotated(&mut frames, max_lines, now)?;
        if !more && let Some(cur) = self.followed.as_mut() {
            // Before reading: a file truncated and written again past the old offset must not
            // be read from that offset.
            cur.check_truncated()?;
            more = if cur.read(&mut self.chunk, &mut frames, max_lines, now)? {
                self.check_path(now)?
            } else {
                true
            };
        }
        let position = self.position();
        let changed = self.last_reported.as_ref() != Some(&position);
        if changed {
            self.last_reported = Some(position.clone());
        }
        Ok(Step {
            frames,
            position: changed.then_some(position),
            more,
        })
    }

    /// Reads the rotated files, oldest first, and finishes those idle at their end for
    /// `rotate_wait`. True if one has more to read at once: newer files wait for it.
    fn read_rotated(
        &mut self,
        frames: &mut Vec<Frame>,
        max_lines: usize,
        now: Instant,
    ) -> Result<bool, FileError> {
        let mut i = 0;
        while let Some(r) = self.rotated.get_mut(i) {
            r.check_truncated()?;
            if !r.read(&mut self.chunk, frames, max_lines, now)? {
                return Ok(true);
            }
            let idle = now.saturating_duration_since(r.last_data);
            if r.hurry || idle >= self.settings.rotate_wait {
                let mut done = self.rotated.remove(i).expect("index checked by get_mut");
                if let Some(last) = done.splitter.take_partial() {
                    frames.push(last);
                }
                info!(path = %self.path.display(), inode = done.ino, size = done.read_offset, idle_ms = idle.as_millis() as u64, "Rotated file finished.");
            } else {
                i += 1;
            }
        }
        Ok(false)
    }

    /// At the end of the followed file: is another file at the path now? If so the followed
    /// file becomes a rotated one and the new file is followed from 0; true then (read again
    /// at once).
    fn check_path(&mut self, now: Instant) -> Result<bool, FileError> {
        let cur = self
            .followed
            .as_ref()
            .expect("check_path() with a followed file");
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
        if (at_path.dev(), at_path.ino()) == (cur.dev, cur.ino) && !unlinked {
            return Ok(false);
        }
        let mut old = self.followed.take().expect("checked above");
        old.last_data = now;
        info!(path = %self.path.display(), inode = old.ino, rotate_wait_ms = self.settings.rotate_wait.as_millis() as u64, "File rotated; following the new file from the start and the old one until it is idle.");
        self.push_rotated(old);
        if let Some(file) = open_if_exists(&self.path)? {
            self.followed = Some(self.open(file, &self.path, 0, now)?);
        }
        Ok(true)
    }

    /// Adds the newest rotated file; beyond [`MAX_ROTATED_FILES`] waiting, the oldest waiting
    /// one is finished at its end.
    fn push_rotated(&mut self, open: Open) {
        self.rotated.push_back(open);
        if self.rotated.iter().filter(|r| !r.hurry).count() > MAX_ROTATED_FILES
            && let Some(oldest) = self.rotated.iter_mut().find(|r| !r.hurry)
        {
            warn!(path = %self.path.display(), inode = oldest.ino, max = MAX_ROTATED_FILES, "More rotated files than ferry waits on; finishing the oldest at its end. Lines written to it later are not read.");
            oldest.hurry = true;
        }
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
    let settings = Settings {
        start_at: config.start_at.unwrap_or_default(),
        max_line_bytes: config.max_line_bytes() as usize,
        rotate_wait: Duration::from_millis(config.rotate_wait_ms()),
    };
    let p = path.clone();
    let resumed = saved.is_some();
    let now = tokio::time::Instant::now().into_std();
    let tailer = blocking(move || Tailer::start(p, saved, settings, now)).await??;
    info!(collector = %ctx.name, path = %path.display(), resumed, "Following file.");
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
        let now = tokio::time::Instant::now().into_std();
        let (back, step) = blocking(move || {
            let step = tailer.step(batch, now);
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
    use std::sync::OnceLock;

    /// The injected clock: `at(ms)` is `ms` after a fixed start.
    fn at(ms: u64) -> Instant {
        static BASE: OnceLock<Instant> = OnceLock::new();
        *BASE.get_or_init(Instant::now) + Duration::from_millis(ms)
    }

    const WAIT_MS: u64 = 5_000;

    fn settings(start_at: StartAt) -> Settings {
        Settings {
            start_at,
            max_line_bytes: 1024,
            rotate_wait: Duration::from_millis(WAIT_MS),
        }
    }

    fn start(path: &Path, saved: Option<Position>, start_at: StartAt) -> Tailer {
        Tailer::start(path.to_path_buf(), saved, settings(start_at), at(0)).unwrap()
    }

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

    /// Steps at `now` until nothing more is readable at once; all lines and the last position.
    fn drain_at(t: &mut Tailer, now: Instant) -> (Vec<String>, Option<Position>) {
        let mut out = Vec::new();
        let mut pos = None;
        loop {
            let s = t.step(1000, now).unwrap();
            out.extend(lines(&s.frames));
            pos = s.position.or(pos);
            if !s.more {
                return (out, pos);
            }
        }
    }

    fn drain(t: &mut Tailer) -> (Vec<String>, Option<Position>) {
        drain_at(t, at(0))
    }

    fn offset(pos: Option<Position>) -> u64 {
        pos.unwrap().followed.unwrap().offset
    }

    fn file_pos(ino: u64, offset: u64) -> FilePosition {
        FilePosition {
            dev: 1,
            ino,
            offset,
            head: Head { len: 256, hash: 7 },
        }
    }

    #[test]
    fn position_round_trips_and_reads_the_version_1_form() {
        let one = Position {
            rotated: vec![],
            followed: Some(file_pos(u64::MAX, 42)),
        };
        // One followed file keeps the old form, byte for byte: an older ferry reads it too.
        let v1 = one.encode();
        assert_eq!((v1[0], v1.len()), (1, 1 + FILE_POSITION_LEN));
        assert_eq!(Position::decode(&v1), Some(one));
        let many = Position {
            rotated: vec![file_pos(2, 10), file_pos(3, 20)],
            followed: Some(file_pos(4, 0)),
        };
        assert_eq!(Position::decode(&many.encode()), Some(many));
        let only_rotated = Position {
            rotated: vec![file_pos(5, 1)],
            followed: None,
        };
        assert_eq!(Position::decode(&only_rotated.encode()), Some(only_rotated));
        assert_eq!(
            Position::decode(&Position::default().encode()),
            Some(Position::default())
        );
        assert_eq!(Position::decode(b"short"), None);
        let mut bad = Position::default().encode();
        bad[3] = 2;
        assert_eq!(Position::decode(&bad), None);
        let mut long = Position::default().encode();
        long.push(0);
        assert_eq!(Position::decode(&long), None);
    }

    /// A position written by the one-file format of earlier releases resumes exactly.
    #[test]
    fn a_version_1_position_resumes_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "a\nb\n");
        let m = std::fs::metadata(&path).unwrap();
        let file = File::open(&path).unwrap();
        let mut old = vec![1u8];
        old.extend_from_slice(&m.dev().to_be_bytes());
        old.extend_from_slice(&m.ino().to_be_bytes());
        old.extend_from_slice(&2u64.to_be_bytes());
        let head = head_of(&file, 4).unwrap();
        old.extend_from_slice(&head.len.to_be_bytes());
        old.extend_from_slice(&head.hash.to_be_bytes());
        let saved = Position::decode(&old).unwrap();
        let mut t = start(&path, Some(saved), StartAt::Beginning);
        assert_eq!(drain(&mut t).0, ["b"]);
    }

    #[test]
    fn start_at_end_skips_history_and_reports_its_position_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "old 1\nold 2\n");
        let mut t = start(&path, None, StartAt::End);
        let s = t.step(100, at(0)).unwrap();
        assert!(s.frames.is_empty());
        assert_eq!(offset(s.position), 12);
        append(&path, "new 1\nnew 2\npart");
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["new 1", "new 2"]);
        assert_eq!(offset(pos), 24);
        let mut t = start(&path, None, StartAt::Beginning);
        assert_eq!(drain(&mut t).0, ["old 1", "old 2", "new 1", "new 2"]);
    }

    #[test]
    fn resumes_at_the_stored_position_and_detects_replacement() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, &"x".repeat(300));
        append(&path, "\na\nb\n");
        let mut t = start(&path, None, StartAt::Beginning);
        let (_, pos) = drain(&mut t);
        append(&path, "c\n");
        let mut t = start(&path, pos.clone(), StartAt::End);
        assert_eq!(drain(&mut t).0, ["c"]);
        // Same inode, rewritten with other content that is longer than the offset.
        std::fs::write(&path, format!("{}\nd\ne\nf\n", "y".repeat(400))).unwrap();
        let mut t = start(&path, pos, StartAt::End);
        assert_eq!(drain(&mut t).0.len(), 4);
    }

    /// logrotate's `create` with a `postrotate` signal: the application writes to the renamed
    /// file until it reopens; those lines are read beside the new file's until the old file
    /// has been idle for the wait.
    #[test]
    fn a_rotated_file_is_read_beside_the_new_one_until_idle_for_the_wait() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let old = dir.path().join("app.log.1");
        append(&path, "1\n");
        let mut t = start(&path, None, StartAt::Beginning);
        assert_eq!(drain(&mut t).0, ["1"]);
        append(&path, "2\nunterminated");
        std::fs::rename(&path, &old).unwrap();
        // Nothing at the path yet: keep reading the old file.
        assert_eq!(drain_at(&mut t, at(100)).0, ["2"]);
        append(&path, "new 1\n");
        let (got, pos) = drain_at(&mut t, at(200));
        assert_eq!(got, ["new 1"]);
        let pos = pos.unwrap();
        assert_eq!(pos.rotated.len(), 1, "the old file is waited on: {pos:?}");
        assert_eq!(
            pos.rotated[0].offset, 4,
            "after line 2, before the partial line"
        );
        // The application writes to its old handle 0.3 s and 1.3 s after the rename.
        append(&old, " end\n3\n");
        append(&path, "new 2\n");
        assert_eq!(
            drain_at(&mut t, at(500)).0,
            ["unterminated end", "3", "new 2"]
        );
        append(&old, "4\nlast");
        assert_eq!(drain_at(&mut t, at(1_500)).0, ["4"]);
        // Idle since 1.5 s: still waited on just before 6.5 s, finished at 6.5 s.
        let s = t.step(100, at(1_500 + WAIT_MS - 1)).unwrap();
        assert!(s.frames.is_empty() && s.position.is_none());
        let (got, pos) = drain_at(&mut t, at(1_500 + WAIT_MS));
        assert_eq!(
            got,
            ["last"],
            "the unterminated last line is taken at the finish"
        );
        let pos = pos.unwrap();
        assert!(pos.rotated.is_empty() && pos.followed.is_some(), "{pos:?}");
        append(&old, "too late\n");
        append(&path, "new 3\n");
        assert_eq!(drain_at(&mut t, at(10_000)).0, ["new 3"]);
    }

    #[test]
    fn rotate_wait_zero_finishes_the_old_file_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n");
        let set = Settings {
            rotate_wait: Duration::ZERO,
            ..settings(StartAt::Beginning)
        };
        let mut t = Tailer::start(path.clone(), None, set, at(0)).unwrap();
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "2\n");
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["1", "2"]);
        assert!(pos.unwrap().rotated.is_empty());
    }

    /// Each poll reads older files first, and a newer file only once the older ones are at
    /// their end: one writer's lines keep their order across the rotation.
    #[test]
    fn older_files_are_read_first_and_a_full_batch_holds_the_newer_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let old = dir.path().join("app.log.1");
        append(&path, "");
        let mut t = start(&path, None, StartAt::Beginning);
        drain(&mut t);
        std::fs::rename(&path, &old).unwrap();
        append(&path, "");
        drain_at(&mut t, at(10));
        // More than one read chunk in the old file, so a batch ends inside it.
        let text: String = (0..20_000).map(|i| format!("o{i}\n")).collect();
        append(&old, &text);
        append(&path, "n1\n");
        let s = t.step(100, at(20)).unwrap();
        let first = lines(&s.frames);
        assert!(s.more && first[0] == "o0" && !first.contains(&"n1".to_string()));
        let (rest, _) = drain_at(&mut t, at(20));
        assert_eq!(first.len() + rest.len(), 20_001);
        assert_eq!(rest[rest.len() - 2..], ["o19999", "n1"]);
    }

    /// Rotations within the wait: every old file is waited on, each until its own idle time.
    #[test]
    fn several_rotations_within_the_wait_are_all_read_to_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let mut t = start(&path, None, StartAt::Beginning);
        append(&path, "a1\n");
        drain_at(&mut t, at(0));
        std::fs::rename(&path, dir.path().join("app.log.a")).unwrap();
        append(&path, "b1\n");
        assert_eq!(drain_at(&mut t, at(1_000)).0, ["b1"]);
        std::fs::rename(&path, dir.path().join("app.log.b")).unwrap();
        append(&path, "c1\n");
        let (got, pos) = drain_at(&mut t, at(2_000));
        assert_eq!(got, ["c1"]);
        assert_eq!(pos.unwrap().rotated.len(), 2);
        append(&dir.path().join("app.log.a"), "a2\n");
        append(&dir.path().join("app.log.b"), "b2\n");
        assert_eq!(drain_at(&mut t, at(3_000)).0, ["a2", "b2"]);
        // a idle since 3 s, b since 3 s too; b gets one more line at 7 s.
        append(&dir.path().join("app.log.b"), "b3\n");
        assert_eq!(drain_at(&mut t, at(7_000)).0, ["b3"]);
        let (_, pos) = drain_at(&mut t, at(8_000));
        assert_eq!(
            pos.unwrap().rotated.len(),
            1,
            "a finished, b still waited on"
        );
        let (_, pos) = drain_at(&mut t, at(12_000));
        assert!(pos.unwrap().rotated.is_empty());
    }

    #[test]
    fn beyond_the_cap_the_oldest_rotated_file_is_finished_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let mut t = start(&path, None, StartAt::Beginning);
        for i in 0..=MAX_ROTATED_FILES {
            append(&path, &format!("{i}\n"));
            drain_at(&mut t, at(i as u64));
            std::fs::rename(&path, dir.path().join(format!("app.log.{i}"))).unwrap();
        }
        append(&path, "new\n");
        let (got, pos) = drain_at(&mut t, at(100));
        assert_eq!(got.last().unwrap(), "new");
        assert_eq!(pos.unwrap().rotated.len(), MAX_ROTATED_FILES);
    }

    /// A rotated file deleted (or compressed) while ferry still reads it: the open handle
    /// still has every byte.
    #[test]
    fn a_rotated_file_deleted_early_is_still_read_through_the_handle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        let old = dir.path().join("app.log.1");
        append(&path, "1\n");
        let mut t = start(&path, None, StartAt::Beginning);
        drain(&mut t);
        let mut writer = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        std::fs::rename(&path, &old).unwrap();
        append(&path, "new\n");
        assert_eq!(drain_at(&mut t, at(10)).0, ["new"]);
        std::fs::remove_file(&old).unwrap();
        writer.write_all(b"2\n").unwrap();
        assert_eq!(drain_at(&mut t, at(300)).0, ["2"]);
        let (_, pos) = drain_at(&mut t, at(300 + WAIT_MS));
        assert!(pos.unwrap().rotated.is_empty());
    }

    /// SIGKILL with a rotated file waited on: after the restart the rotated file (renamed once
    /// more meanwhile) and the followed one resume at their own committed offsets.
    #[test]
    fn restart_resumes_rotated_and_followed_files_at_their_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n");
        let mut t = start(&path, None, StartAt::Beginning);
        drain(&mut t);
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "n1\n");
        append(&dir.path().join("app.log.1"), "2\n");
        let (got, pos) = drain_at(&mut t, at(100));
        assert_eq!(got, ["2", "n1"]);
        let pos = pos.unwrap();
        assert_eq!(pos.rotated.len(), 1);
        drop(t);
        // While ferry is down: both files grow, and the next rotation shifts the names.
        append(&dir.path().join("app.log.1"), "3\n");
        append(&path, "n2\n");
        std::fs::rename(dir.path().join("app.log.1"), dir.path().join("app.log.2")).unwrap();
        let mut t = start(&path, Some(pos), StartAt::End);
        assert_eq!(drain_at(&mut t, at(0)).0, ["3", "n2"]);
        // Its idle time counts from the restart.
        append(&dir.path().join("app.log.2"), "4\n");
        assert_eq!(drain_at(&mut t, at(WAIT_MS - 1)).0, ["4"]);
    }

    #[test]
    fn restart_after_rotation_while_stopped_reads_the_old_rest_and_the_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n2\n");
        let mut t = start(&path, None, StartAt::Beginning);
        let (_, pos) = drain(&mut t);
        drop(t);
        append(&path, "3\n");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "4\n");
        let mut t = start(&path, pos, StartAt::End);
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["3", "4"]);
        // The old file is waited on: its writer may not have reopened yet.
        assert_eq!(pos.unwrap().rotated.len(), 1);
        append(&dir.path().join("app.log.1"), "5\n");
        assert_eq!(drain(&mut t).0, ["5"]);
    }

    /// Renamed with nothing new at the path: the stored file stays the followed one.
    #[test]
    fn restart_after_a_rename_without_a_new_file_follows_the_renamed_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n");
        let mut t = start(&path, None, StartAt::Beginning);
        let (_, pos) = drain(&mut t);
        drop(t);
        append(&path, "2\n");
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        let mut t = start(&path, pos, StartAt::End);
        let (got, pos) = drain_at(&mut t, at(0));
        assert_eq!(got, ["2"]);
        let pos = pos.unwrap();
        assert!(pos.rotated.is_empty() && pos.followed.is_some(), "{pos:?}");
        // Not finished by idleness: it is not rotated until a new file appears.
        append(&dir.path().join("app.log.1"), "3\n");
        assert_eq!(drain_at(&mut t, at(10 * WAIT_MS)).0, ["3"]);
    }

    #[test]
    fn restart_skips_a_rotated_file_that_is_gone_and_resumes_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "a\n");
        let mut t = start(&path, None, StartAt::Beginning);
        drain(&mut t);
        std::fs::rename(&path, dir.path().join("app.log.1")).unwrap();
        append(&path, "b\n");
        drain_at(&mut t, at(10));
        std::fs::rename(&path, dir.path().join("app.log.2")).unwrap();
        append(&path, "c\n");
        let (_, pos) = drain_at(&mut t, at(20));
        let pos = pos.unwrap();
        assert_eq!(pos.rotated.len(), 2);
        drop(t);
        append(&dir.path().join("app.log.1"), "lost\n");
        std::fs::remove_file(dir.path().join("app.log.1")).unwrap();
        append(&dir.path().join("app.log.2"), "b2\n");
        append(&path, "c2\n");
        let mut t = start(&path, Some(pos), StartAt::End);
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["b2", "c2"]);
        assert_eq!(pos.unwrap().rotated.len(), 1);
    }

    /// A stored rotated file that is at the path again is read once, from its offset.
    #[test]
    fn a_stored_rotated_file_back_at_the_path_is_not_read_twice() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n");
        let mut t = start(&path, None, StartAt::Beginning);
        let (_, pos) = drain(&mut t);
        drop(t);
        let saved = Position {
            rotated: vec![pos.unwrap().followed.unwrap()],
            followed: None,
        };
        append(&path, "2\n");
        let mut t = start(&path, Some(saved), StartAt::Beginning);
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["2"]);
        assert!(pos.unwrap().rotated.is_empty());
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
        let stale = FilePosition {
            dev: m.dev(),
            ino: m.ino(),
            offset: 3,
            head: Head { len: 9, hash: 1 },
        };
        for saved in [
            Position {
                rotated: vec![],
                followed: Some(stale),
            },
            Position {
                rotated: vec![stale],
                followed: None,
            },
        ] {
            let mut t = start(&path, Some(saved), StartAt::End);
            assert_eq!(drain(&mut t).0, ["new 1"]);
        }
    }

    #[test]
    fn copytruncate_and_delete_recreate_start_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("app.log");
        append(&path, "1\n2\n3\n");
        let mut t = start(&path, None, StartAt::Beginning);
        assert_eq!(drain(&mut t).0, ["1", "2", "3"]);
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        append(&path, "4\n");
        let (got, pos) = drain(&mut t);
        assert_eq!(got, ["4"]);
        let pos = pos.unwrap();
        assert_eq!(pos.followed.unwrap().offset, 2);
        assert!(pos.rotated.is_empty(), "a truncation is not a rotation");
        std::fs::remove_file(&path).unwrap();
        assert!(drain(&mut t).0.is_empty());
        append(&path, "5\n6\n");
        assert_eq!(drain(&mut t).0, ["5", "6"]);
    }

    #[test]
    fn a_file_that_appears_later_is_read_from_its_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("later.log");
        let mut t = start(&path, None, StartAt::End);
        let s = t.step(10, at(0)).unwrap();
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
        let mut t = start(&path, None, StartAt::Beginning);
        let mut total = 0;
        loop {
            let s = t.step(100, at(0)).unwrap();
            total += s.frames.len();
            if let Some(p) = s.position {
                // Every reported offset is just after a newline.
                let bytes = std::fs::read(&path).unwrap();
                assert_eq!(bytes[p.followed.unwrap().offset as usize - 1], b'\n');
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
