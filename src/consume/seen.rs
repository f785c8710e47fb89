//! Which seqs of one (device, stream) were already output: the dedupe state.
//!
//! The set is kept as the range `[min, max]` of seqs seen so far minus a list of holes (seqs
//! inside the range not seen yet). In the normal case (records arrive in order, maybe twice)
//! there are no holes and the state is two numbers: a contiguous watermark. A hole opens when a
//! seq arrives more than one above `max` (or more than one below `min`: a `live_first` stream
//! sends its newest batch before its backlog) and closes, piece by piece, as its seqs arrive.
//!
//! Invariants:
//! - A seq is new exactly once: [`StreamSeen::insert`] returns true the first time and false
//!   ever after, as long as the hole list stays under [`MAX_HOLES`].
//! - The holes are disjoint, ordered, lie strictly inside `[min, max]` and are exactly the
//!   seqs in that range not seen yet. A hole may be split in several adjacent pieces with
//!   their own report state (see `gaps.rs`).
//! - Bounded: at most [`MAX_HOLES`] holes per stream. Past that the lowest hole is forgotten
//!   (its seqs count as seen, a late record in it would be dropped as a duplicate); this is
//!   logged and counted, never silent.
//!
//! Seqs below the first one ever seen are not a gap: a consumer that starts after the device
//! did has simply not been there.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most holes kept per stream (about 60 bytes each in the state file).
pub const MAX_HOLES: usize = 4096;

/// How a hole was reported on the output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Report {
    /// Open past the gap timeout with no loss report covering it.
    Gap,
    /// Covered by a `ferry.loss` report with this reason.
    Lost(String),
}

/// Seqs `start..=end` (the map key is `start`) not seen yet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hole {
    pub end: u64,
    /// Wall time (ms since the epoch) when the consumer first saw this hole.
    pub opened_ms: u64,
    /// Set once the hole was output as a gap or a loss; a hole is reported once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reported: Option<Report>,
}

/// The seqs of one stream output so far.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamSeen {
    pub min: u64,
    pub max: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub holes: BTreeMap<u64, Hole>,
}

/// What inserting a seq did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Insert {
    /// First time: output it.
    New,
    /// Seen before: drop it.
    Duplicate,
}

impl StreamSeen {
    /// The state after the first seq of a stream.
    pub fn first(seq: u64) -> StreamSeen {
        StreamSeen {
            min: seq,
            max: seq,
            holes: BTreeMap::new(),
        }
    }

    /// Records `seq` as seen at wall time `now_ms`. Returns how many holes had to be forgotten
    /// to stay under [`MAX_HOLES`] along with the outcome.
    pub fn insert(&mut self, seq: u64, now_ms: u64) -> (Insert, usize) {
        if seq > self.max {
            if seq > self.max + 1 {
                self.open(self.max + 1, seq - 1, now_ms);
            }
            self.max = seq;
        } else if seq < self.min {
            if seq + 1 < self.min {
                self.open(seq + 1, self.min - 1, now_ms);
            }
            self.min = seq;
        } else if !self.fill(seq) {
            return (Insert::Duplicate, 0);
        }
        (Insert::New, self.trim())
    }

    /// Whether `seq` was seen (or forgotten as seen).
    pub fn contains(&self, seq: u64) -> bool {
        seq >= self.min && seq <= self.max && self.hole_at(seq).is_none()
    }

    /// Start of the hole containing `seq`, if any.
    pub fn hole_at(&self, seq: u64) -> Option<u64> {
        let (&start, hole) = self.holes.range(..=seq).next_back()?;
        (hole.end >= seq).then_some(start)
    }

    /// Splits the hole holding `start..=end`-overlapping seqs so that `from..=to` is a piece of
    /// its own; returns the starts of the pieces now exactly inside `from..=to`.
    pub fn isolate(&mut self, from: u64, to: u64) -> Vec<u64> {
        let starts: Vec<u64> = self
            .holes
            .range(..=to)
            .filter(|(_, h)| h.end >= from)
            .map(|(&s, _)| s)
            .collect();
        let mut inside = Vec::new();
        for start in starts {
            let hole = self.holes.remove(&start).expect("start was just listed");
            let lo = start.max(from);
            let hi = hole.end.min(to);
            if start < lo {
                self.holes.insert(
                    start,
                    Hole {
                        end: lo - 1,
                        ..hole.clone()
                    },
                );
            }
            if hole.end > hi {
                self.holes.insert(hi + 1, hole.clone());
            }
            self.holes.insert(lo, Hole { end: hi, ..hole });
            inside.push(lo);
        }
        inside
    }

    fn open(&mut self, start: u64, end: u64, now_ms: u64) {
        self.holes.insert(
            start,
            Hole {
                end,
                opened_ms: now_ms,
                reported: None,
            },
        );
    }

    /// Removes `seq` from its hole; false if it is in none (a duplicate).
    fn fill(&mut self, seq: u64) -> bool {
        let Some(start) = self.hole_at(seq) else {
            return false;
        };
        let hole = self.holes.remove(&start).expect("hole_at found it");
        if start < seq {
            self.holes.insert(
                start,
                Hole {
                    end: seq - 1,
                    ..hole.clone()
                },
            );
        }
        if hole.end > seq {
            self.holes.insert(seq + 1, hole);
        }
        true
    }

    fn trim(&mut self) -> usize {
        let mut forgotten = 0;
        while self.holes.len() > MAX_HOLES {
            self.holes.pop_first();
            forgotten += 1;
        }
        forgotten
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(seqs: &[u64]) -> StreamSeen {
        let mut s = StreamSeen::first(seqs[0]);
        for &q in &seqs[1..] {
            s.insert(q, 0);
        }
        s
    }

    #[test]
    fn in_order_needs_no_holes_and_drops_repeats() {
        let mut s = seen(&[1, 2, 3]);
        assert!(s.holes.is_empty());
        assert_eq!(s.insert(2, 0).0, Insert::Duplicate);
        assert_eq!(s.insert(4, 0).0, Insert::New);
        assert_eq!((s.min, s.max), (1, 4));
    }

    #[test]
    fn a_skip_opens_a_hole_that_fills_piece_by_piece() {
        let mut s = seen(&[1, 6]);
        assert_eq!(s.holes.len(), 1);
        assert_eq!(s.holes[&2].end, 5);
        assert_eq!(s.insert(3, 0).0, Insert::New);
        assert_eq!(s.holes.keys().copied().collect::<Vec<_>>(), vec![2, 4]);
        assert_eq!(s.insert(3, 0).0, Insert::Duplicate);
        for q in [2, 4, 5] {
            assert_eq!(s.insert(q, 0).0, Insert::New);
        }
        assert!(s.holes.is_empty());
        assert!((1..=6).all(|q| s.contains(q)));
    }

    #[test]
    fn backlog_below_the_first_seq_is_new() {
        let mut s = seen(&[100, 101]);
        assert_eq!(s.insert(50, 0).0, Insert::New);
        assert_eq!(s.holes[&51].end, 99);
        assert_eq!(s.insert(50, 0).0, Insert::Duplicate);
    }

    #[test]
    fn isolate_splits_and_keeps_metadata() {
        let mut s = StreamSeen::first(1);
        s.insert(20, 7);
        let inside = s.isolate(5, 9);
        assert_eq!(inside, vec![5]);
        assert_eq!(s.holes[&2].end, 4);
        assert_eq!(s.holes[&5].end, 9);
        assert_eq!(s.holes[&10].end, 19);
        assert!(s.holes.values().all(|h| h.opened_ms == 7));
    }

    #[test]
    fn holes_are_bounded() {
        let mut s = StreamSeen::first(0);
        let mut forgotten = 0;
        for i in 1..=(MAX_HOLES as u64 + 10) {
            forgotten += s.insert(i * 2, 0).1;
        }
        assert_eq!(s.holes.len(), MAX_HOLES);
        assert_eq!(forgotten, 10);
    }

    proptest::proptest! {
        #[test]
        fn every_seq_is_new_exactly_once(seqs in proptest::collection::vec(0u64..200, 1..400)) {
            let mut s = StreamSeen::first(seqs[0]);
            let mut model = std::collections::BTreeSet::from([seqs[0]]);
            for &q in &seqs[1..] {
                let new = s.insert(q, 0).0 == Insert::New;
                proptest::prop_assert_eq!(new, model.insert(q));
            }
            for q in 0..200 {
                proptest::prop_assert_eq!(s.contains(q), model.contains(&q));
            }
        }
    }
}
