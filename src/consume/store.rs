//! The dedupe state on disk, shared by every consumer that is given the same `--state DIR`.
//!
//! Layout: `DIR/devices/<device>.json` holds one device's [`DeviceState`] (per stream: the
//! seqs output so far and pending loss reports); `DIR/devices/<device>.lock` is locked with
//! `flock` by whoever reads and changes that state. The device name is percent-encoded in the
//! file name (only `A-Z a-z 0-9 _ -` stay as they are).
//!
//! Invariants:
//! - A device's state is read and changed only under its lock, and the lock is held from the
//!   read until the new state is in place, so two consumers never both output the same key.
//! - A new state is written to `<device>.json.tmp` and fsynced ([`Store::prepare`]) *before*
//!   the lines it covers are written, then renamed over the old one ([`Store::commit`]) right
//!   after they are flushed; the directory is fsynced once per batch ([`Store::sync`]). The
//!   window in which a crash leaves lines written but the state old is one rename wide (see
//!   docs/CONSUMING.md for what each crash point gives).
//! - A state file that cannot be parsed stops the consumer with its path: starting that device
//!   afresh would output its records again, which the operator must choose.
//! - States read before are cached and reused while the file's inode, size and mtime are
//!   unchanged (another consumer's rename changes the inode).

use super::gaps::StreamState;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot {what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot lock {path}: {errno}")]
    Lock { path: PathBuf, errno: nix::Error },
    #[error(
        "state file {path} is corrupt ({error}); move it away to start this device afresh \
         (its records are then output again)"
    )]
    Corrupt { path: PathBuf, error: String },
}

/// Everything the consumers know about one device.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub v: u32,
    pub streams: BTreeMap<String, StreamState>,
}

/// A file's identity, to tell whether a cached state is still current.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    len: u64,
    mtime_ns: i64,
}

/// One device's state, locked.
pub struct Held {
    pub device: String,
    pub state: DeviceState,
    /// Set by whoever changed `state`; only then is it written.
    pub dirty: bool,
    prepared: bool,
    _lock: Flock<File>,
}

pub struct Store {
    dir: PathBuf,
    cache: HashMap<String, (Stamp, DeviceState)>,
}

const STATE_VERSION: u32 = 1;

impl Store {
    /// Opens (creating) `dir/devices`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        let dir = dir.join("devices");
        std::fs::create_dir_all(&dir).map_err(|source| StoreError::Io {
            what: "create the state directory",
            path: dir.clone(),
            source,
        })?;
        Ok(Store {
            dir,
            cache: HashMap::new(),
        })
    }

    /// The devices that have a state file.
    pub fn devices(&self) -> Result<Vec<String>, StoreError> {
        let entries =
            std::fs::read_dir(&self.dir).map_err(|source| self.io("list", &self.dir, source))?;
        let mut out = Vec::new();
        for e in entries.flatten() {
            let name = e.file_name();
            if let Some(stem) = name.to_str().and_then(|n| n.strip_suffix(".json"))
                && let Some(device) = decode_name(stem)
            {
                out.push(device);
            }
        }
        out.sort();
        Ok(out)
    }

    /// Locks `device` (waiting for another consumer that holds it) and reads its state.
    pub fn hold(&mut self, device: &str) -> Result<Held, StoreError> {
        let lock_path = self.path(device, "lock");
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|source| self.io("open", &lock_path, source))?;
        let lock =
            Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError::Lock {
                path: lock_path.clone(),
                errno,
            })?;
        let path = self.path(device, "json");
        let state = match std::fs::metadata(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => DeviceState::default(),
            Err(source) => return Err(self.io("stat", &path, source)),
            Ok(meta) => {
                let stamp = stamp(&meta);
                match self.cache.get(device) {
                    Some((s, state)) if *s == stamp => state.clone(),
                    _ => {
                        let state = read_state(&path)?;
                        self.cache
                            .insert(device.to_string(), (stamp, state.clone()));
                        state
                    }
                }
            }
        };
        Ok(Held {
            device: device.to_string(),
            state,
            dirty: false,
            prepared: false,
            _lock: lock,
        })
    }

    /// Writes and fsyncs the new state next to the current one (if it changed).
    pub fn prepare(&self, held: &mut Held) -> Result<(), StoreError> {
        if !held.dirty {
            return Ok(());
        }
        held.state.v = STATE_VERSION;
        let tmp = self.path(&held.device, "json.tmp");
        let bytes = serde_json::to_vec(&held.state).expect("a device state serialises");
        let mut f = File::create(&tmp).map_err(|source| self.io("create", &tmp, source))?;
        f.write_all(&bytes)
            .and_then(|()| f.sync_all())
            .map_err(|source| self.io("write", &tmp, source))?;
        held.prepared = true;
        Ok(())
    }

    /// Puts the prepared state in place and releases the lock.
    pub fn commit(&mut self, held: Held) -> Result<(), StoreError> {
        if !held.prepared {
            return Ok(());
        }
        let tmp = self.path(&held.device, "json.tmp");
        let path = self.path(&held.device, "json");
        std::fs::rename(&tmp, &path)
            .map_err(|source| self.io("rename into place", &path, source))?;
        if let Ok(meta) = std::fs::metadata(&path) {
            self.cache
                .insert(held.device.clone(), (stamp(&meta), held.state));
        }
        Ok(())
    }

    /// Makes the renames of [`Store::commit`] durable (one fsync of the directory).
    pub fn sync(&self) -> Result<(), StoreError> {
        File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| self.io("sync", &self.dir, source))
    }

    fn path(&self, device: &str, ext: &str) -> PathBuf {
        self.dir.join(format!("{}.{ext}", encode_name(device)))
    }

    fn io(&self, what: &'static str, path: &Path, source: std::io::Error) -> StoreError {
        StoreError::Io {
            what,
            path: path.to_path_buf(),
            source,
        }
    }
}

fn stamp(meta: &std::fs::Metadata) -> Stamp {
    Stamp {
        ino: meta.ino(),
        len: meta.len(),
        mtime_ns: meta.mtime() * 1_000_000_000 + meta.mtime_nsec(),
    }
}

fn read_state(path: &Path) -> Result<DeviceState, StoreError> {
    let bytes = std::fs::read(path).map_err(|source| StoreError::Io {
        what: "read",
        path: path.to_path_buf(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| StoreError::Corrupt {
        path: path.to_path_buf(),
        error: e.to_string(),
    })
}

/// `d-` plus the name with every byte outside `A-Z a-z 0-9 _ -` as `%XX`.
fn encode_name(device: &str) -> String {
    let mut out = String::from("d-");
    for b in device.bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn decode_name(stem: &str) -> Option<String> {
    let rest = stem.strip_prefix("d-")?.as_bytes();
    let mut out = Vec::with_capacity(rest.len());
    let mut i = 0;
    while i < rest.len() {
        if rest[i] == b'%' {
            let hex = std::str::from_utf8(rest.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(rest[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consume::seen::StreamSeen;

    #[test]
    fn names_round_trip_and_stay_inside_the_directory() {
        for d in ["gw-01", "a.b", "../x", "é/π %", ""] {
            let e = encode_name(d);
            assert!(!e.contains('/') && !e.contains('.'), "{e}");
            assert_eq!(decode_name(&e).as_deref(), Some(d));
        }
    }

    #[test]
    fn a_committed_state_is_read_back_by_another_store() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Store::open(dir.path()).unwrap();
        let mut held = a.hold("gw/1").unwrap();
        held.state.streams.insert(
            "system".into(),
            StreamState {
                seen: Some(StreamSeen::first(7)),
                losses: BTreeMap::new(),
            },
        );
        held.dirty = true;
        a.prepare(&mut held).unwrap();
        a.commit(held).unwrap();
        a.sync().unwrap();
        let mut b = Store::open(dir.path()).unwrap();
        assert_eq!(b.devices().unwrap(), vec!["gw/1".to_string()]);
        let held = b.hold("gw/1").unwrap();
        assert_eq!(held.state.streams["system"].seen.as_ref().unwrap().max, 7);
    }

    #[test]
    fn a_prepared_but_uncommitted_state_is_not_seen() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = Store::open(dir.path()).unwrap();
        let mut held = a.hold("gw").unwrap();
        held.state.streams.insert(
            "s".into(),
            StreamState {
                seen: Some(StreamSeen::first(1)),
                losses: BTreeMap::new(),
            },
        );
        held.dirty = true;
        a.prepare(&mut held).unwrap();
        drop(held); // a crash before the rename
        let held = Store::open(dir.path()).unwrap().hold("gw").unwrap();
        assert!(held.state.streams.is_empty());
    }

    #[test]
    fn a_corrupt_state_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Store::open(dir.path()).unwrap();
        std::fs::write(dir.path().join("devices/d-gw.json"), b"{not json").unwrap();
        let err = s.hold("gw").err().unwrap().to_string();
        assert!(
            err.contains("d-gw.json") && err.contains("corrupt"),
            "{err}"
        );
    }
}
