//! The command ledger: ids of recent commands and their final replies, persisted in sled, so a
//! command runs at most once even when the broker redelivers it (QoS 1 retransmission, a crash
//! before the PUBACK, a reconnect).
//!
//! An entry is written as `accepted` and flushed *before* the command is acknowledged to the
//! broker and run; it becomes `done` with the final reply afterwards. An entry still `accepted`
//! at start means ferry stopped while the command ran: it is not run again. Bounded by count
//! and age; the oldest entries go first.

use serde::{Deserialize, Serialize};
use std::time::Duration;

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
    pub fn new(tree: sled::Tree, max_entries: usize, max_age: Duration) -> Ledger {
        Ledger {
            tree,
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

    /// Records a command as accepted and flushes, so it survives a crash.
    pub fn accept(&self, id: &str, now_ms: u64) -> Result<(), sled::Error> {
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
        self.tree.flush()?;
        Ok(())
    }

    /// Stores the final reply of a command.
    pub fn finish(&self, id: &str, reply: &str) -> Result<(), sled::Error> {
        let received_ms = self.get(id)?.map_or(0, |e| e.received_ms);
        let entry = Entry {
            received_ms,
            reply: Some(reply.to_string()),
        };
        self.tree.insert(
            entry_key(id),
            serde_json::to_vec(&entry).expect("entry encodes"),
        )?;
        self.tree.flush()?;
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

    fn ledger(max: usize) -> (tempfile::TempDir, Ledger) {
        let dir = tempfile::tempdir().unwrap();
        let db = sled::Config::new().path(dir.path()).open().unwrap();
        let l = Ledger::new(
            db.open_tree("commands").unwrap(),
            max,
            Duration::from_secs(60),
        );
        (dir, l)
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
