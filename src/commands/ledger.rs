//! The command ledger: ids of recent commands and their final replies, persisted in sled, so a
//! command runs at most once even when the broker redelivers it (QoS 1 retransmission, a crash
//! before the PUBACK, a reconnect).
//!
//! An entry is written as `accepted` and made durable *before* the command is acknowledged to
//! the broker and run; it becomes `done` with the final reply afterwards, also durably. An
//! entry still `accepted` at start means ferry stopped while the command ran: it is not run
//! again. Bounded by count and age; the oldest entries go first.
//!
//! Durable means the spool's sync ([`Durable`]): sled's flush plus an fdatasync of its log.
//! sled's flush alone is `sync_file_range`, which survives SIGKILL but not a power cut: an
//! `accepted` entry lost with the power would let the broker's redelivery run the command a
//! second time.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Makes everything written to the ledger's database so far survive a power cut; the
/// spool's [`Spool::flush`](crate::spool::Spool::flush) in the agent.
pub type Durable = Box<dyn Fn() -> Result<(), crate::spool::SpoolError> + Send + Sync>;

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    Sled(#[from] sled::Error),
    #[error("cannot make the ledger durable: {0}")]
    Sync(#[from] crate::spool::SpoolError),
}

const ENTRY: &[u8] = b"c/";
const ORDER: &[u8] = b"t/";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub received_ms: u64,
    /// The final reply (JSON text) once the command finished.
    pub reply: Option<String>,
}

pub struct Ledger {
    tree: sled::Tree,
    durable: Durable,
    max_entries: usize,
    max_age: Duration,
}

fn entry_key(id: &str) -> Vec<u8> {
    [ENTRY, id.as_bytes()].concat()
}

fn order_key(ms: u64, id: &str) -> Vec<u8> {
    [ORDER, &ms.to_be_bytes(), id.as_bytes()].concat()
}

impl Ledger {
    pub fn new(
        tree: sled::Tree,
        durable: Durable,
        max_entries: usize,
        max_age: Duration,
    ) -> Ledger {
        Ledger {
            tree,
            durable,
            max_entries,
            max_age,
        }
    }

    pub fn get(&self, id: &str) -> Result<Option<Entry>, sled::Error> {
        Ok(self
            .tree
            .get(entry_key(id))?
            .and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records a command as accepted; returns once that is durable (also against a power
    /// cut). The command may run only after `Ok`.
    pub fn accept(&self, id: &str, now_ms: u64) -> Result<(), LedgerError> {
        self.prune(now_ms)?;
        let entry = Entry {
            received_ms: now_ms,
            reply: None,
        };
        let mut b = sled::Batch::default();
        b.insert(
            entry_key(id),
            serde_json::to_vec(&entry).expect("entry encodes"),
        );
        b.insert(order_key(now_ms, id), id.as_bytes());
        self.tree.apply_batch(b)?;
        (self.durable)()?;
        Ok(())
    }

    /// Stores the final reply of a command, durably.
    pub fn finish(&self, id: &str, reply: &str) -> Result<(), LedgerError> {
        let received_ms = self.get(id)?.map_or(0, |e| e.received_ms);
        let entry = Entry {
            received_ms,
            reply: Some(reply.to_string()),
        };
        self.tree.insert(
            entry_key(id),
            serde_json::to_vec(&entry).expect("entry encodes"),
        )?;
        (self.durable)()?;
        Ok(())
    }

    /// Ids of commands accepted but never finished: ferry stopped while they ran.
    pub fn unfinished(&self) -> Result<Vec<String>, sled::Error> {
        let mut ids = Vec::new();
        for item in self.tree.scan_prefix(ENTRY) {
            let (k, v) = item?;
            let entry: Option<Entry> = serde_json::from_slice(&v).ok();
            if entry.is_some_and(|e| e.reply.is_none()) {
                ids.push(String::from_utf8_lossy(&k[ENTRY.len()..]).into_owned());
            }
        }
        Ok(ids)
    }

    fn prune(&self, now_ms: u64) -> Result<(), sled::Error> {
        let count = self.tree.scan_prefix(ENTRY).count();
        let mut excess = (count + 1).saturating_sub(self.max_entries);
        let cutoff = now_ms.saturating_sub(self.max_age.as_millis() as u64);
        let mut b = sled::Batch::default();
        for item in self.tree.scan_prefix(ORDER) {
            let (k, id) = item?;
            let ms = k
                .get(ORDER.len()..ORDER.len() + 8)
                .and_then(|s| s.try_into().ok())
                .map(u64::from_be_bytes)
                .unwrap_or(0);
            if excess == 0 && ms >= cutoff {
                break;
            }
            b.remove(k);
            b.remove(entry_key(&String::from_utf8_lossy(&id)));
            excess = excess.saturating_sub(1);
        }
        self.tree.apply_batch(b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    fn ledger(max: usize) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let l = Ledger::new(
            db.open_tree("commands").unwrap(),
            Box::new(|| Ok(())),
            max,
            Duration::from_secs(60),
        );
        (dir, l)
    }

    /// A ledger whose durable sync is recorded: what the tree held for `id` at each sync, and
    /// whether the sync fails.
    fn watched(
        fail: Arc<AtomicBool>,
    ) -> (tempfile::TempDir, Ledger, Arc<Mutex<Vec<Option<Entry>>>>) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let tree = db.open_tree("commands").unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (t, s) = (tree.clone(), seen.clone());
        let durable: Durable = Box::new(move || {
            let entry = t
                .get(entry_key("cmd-1"))
                .unwrap()
                .and_then(|v| serde_json::from_slice(&v).ok());
            s.lock().unwrap().push(entry);
            if fail.load(Ordering::SeqCst) {
                return Err(crate::spool::SpoolError::Corrupt("sync failed".into()));
            }
            Ok(())
        });
        (
            dir,
            Ledger::new(tree, durable, 10, Duration::from_secs(60)),
            seen,
        )
    }

    #[test]
    fn accept_returns_only_after_a_durable_sync_that_covers_the_entry() {
        let fail = Arc::new(AtomicBool::new(false));
        let (_d, l, seen) = watched(fail.clone());
        l.accept("cmd-1", 1000).unwrap();
        // The sync ran inside accept, after the entry was written: when accept returns (and
        // the command may run), the entry is on disk.
        assert_eq!(
            *seen.lock().unwrap(),
            [Some(Entry {
                received_ms: 1000,
                reply: None
            })]
        );
        l.finish("cmd-1", "{}").unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2, "finish syncs too");
        assert_eq!(
            seen.lock().unwrap()[1].as_ref().unwrap().reply.as_deref(),
            Some("{}")
        );
    }

    #[test]
    fn an_accept_whose_sync_fails_is_an_error() {
        let fail = Arc::new(AtomicBool::new(true));
        let (_d, l, seen) = watched(fail);
        assert!(matches!(l.accept("cmd-1", 1000), Err(LedgerError::Sync(_))));
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[test]
    fn accept_then_finish() {
        let (_d, l) = ledger(10);
        assert_eq!(l.get("a").unwrap(), None);
        l.accept("a", 1000).unwrap();
        assert_eq!(l.get("a").unwrap().unwrap().reply, None);
        assert_eq!(l.unfinished().unwrap(), vec!["a".to_string()]);
        l.finish("a", "{}").unwrap();
        assert!(l.unfinished().unwrap().is_empty());
        assert_eq!(l.get("a").unwrap().unwrap().reply.as_deref(), Some("{}"));
    }

    #[test]
    fn bounded_by_count_and_age() {
        let (_d, l) = ledger(3);
        for (i, id) in ["a", "b", "c", "d"].iter().enumerate() {
            l.accept(id, 1000 + i as u64).unwrap();
        }
        assert!(l.get("a").unwrap().is_none(), "oldest pruned by count");
        assert!(l.get("d").unwrap().is_some());
        l.accept("e", 1000 + 61_000).unwrap();
        assert!(l.get("b").unwrap().is_none(), "pruned by age");
        assert!(l.get("e").unwrap().is_some());
    }
}
