//! Telling a gap from a reported loss.
//!
//! A hole in a stream's seqs (see `seen.rs`) is either data still on its way (a backlog, a
//! redelivery), data the device dropped and said so on `ferry.loss` (`{stream, first_seq,
//! last_seq, count, reason}`), or data gone without a word. [`review`] decides, for one stream:
//! - the part of a hole covered by a loss report is output at once as a loss with its reason;
//! - a part not covered and open longer than the gap timeout is output as a gap;
//! - each piece is output once (its hole remembers it), and stays a hole: a record that still
//!   arrives later is output as usual.
//!
//! Loss reports may arrive before the hole they explain is visible (the loss stream travels on
//! the high lane), so they are kept per stream until a hole needs them, at most
//! [`MAX_LOSSES`] per stream and never below the lowest seq seen.

use super::seen::{Report, StreamSeen};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Most pending loss reports kept per stream.
pub const MAX_LOSSES: usize = 1024;

/// A `ferry.loss` range: `first_seq..=end` (the map key is `first_seq`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Loss {
    pub end: u64,
    pub reason: String,
}

/// One stream's dedupe state and the loss reports it has been told about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamState {
    /// None until the stream's first record (a loss report can come first).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seen: Option<StreamSeen>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub losses: BTreeMap<u64, Loss>,
}

/// A hole piece to output: a loss (with the device's reason) or an unexplained gap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GapEvent {
    pub stream: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// `None`: no loss report covers it (a gap).
    pub reason: Option<String>,
}

impl GapEvent {
    pub fn count(&self) -> u64 {
        self.last_seq - self.first_seq + 1
    }
}

/// Remembers a loss report for `state`'s stream.
pub fn note_loss(state: &mut StreamState, first: u64, last: u64, reason: &str) {
    if last < first {
        return;
    }
    state.losses.insert(
        first,
        Loss {
            end: last,
            reason: reason.to_string(),
        },
    );
    while state.losses.len() > MAX_LOSSES {
        state.losses.pop_first();
    }
}

/// Reports the pieces of `state`'s holes that are now known lost or overdue (see the module
/// doc); `timeout_ms` is the gap timeout.
pub fn review(
    stream: &str,
    state: &mut StreamState,
    now_ms: u64,
    timeout_ms: u64,
) -> Vec<GapEvent> {
    let mut events = Vec::new();
    let Some(seen) = &mut state.seen else {
        return events;
    };
    for (&first, loss) in &state.losses {
        for start in seen.isolate(first, loss.end) {
            let hole = seen
                .holes
                .get_mut(&start)
                .expect("isolate returns existing starts");
            if hole.reported.is_none() {
                hole.reported = Some(Report::Lost(loss.reason.clone()));
                events.push(GapEvent {
                    stream: stream.to_string(),
                    first_seq: start,
                    last_seq: hole.end,
                    reason: Some(loss.reason.clone()),
                });
            }
        }
    }
    for (&start, hole) in seen.holes.iter_mut() {
        if hole.reported.is_none() && now_ms.saturating_sub(hole.opened_ms) >= timeout_ms {
            hole.reported = Some(Report::Gap);
            events.push(GapEvent {
                stream: stream.to_string(),
                first_seq: start,
                last_seq: hole.end,
                reason: None,
            });
        }
    }
    let min = seen.min;
    state.losses.retain(|_, l| l.end >= min);
    events
}

/// Whether some hole of `state` still waits for its report.
pub fn has_open(state: &StreamState) -> bool {
    state
        .seen
        .as_ref()
        .is_some_and(|s| s.holes.values().any(|h| h.reported.is_none()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(seqs: &[u64], at: u64) -> StreamState {
        let mut seen = StreamSeen::first(seqs[0]);
        for &q in &seqs[1..] {
            seen.insert(q, at);
        }
        StreamState {
            seen: Some(seen),
            losses: BTreeMap::new(),
        }
    }

    #[test]
    fn a_covered_hole_is_a_loss_at_once_and_only_once() {
        let mut s = state(&[1, 10], 0);
        note_loss(&mut s, 2, 9, "evicted");
        let e = review("a", &mut s, 1, 60_000);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].first_seq, e[0].last_seq), (2, 9));
        assert_eq!(e[0].reason.as_deref(), Some("evicted"));
        assert!(review("a", &mut s, 999_999, 60_000).is_empty());
    }

    #[test]
    fn an_uncovered_hole_is_a_gap_after_the_timeout() {
        let mut s = state(&[1, 5], 1000);
        assert!(review("a", &mut s, 1000 + 59_999, 60_000).is_empty());
        let e = review("a", &mut s, 1000 + 60_000, 60_000);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].first_seq, e[0].last_seq, e[0].reason.clone()),
            (2, 4, None)
        );
        assert!(!has_open(&s));
    }

    #[test]
    fn a_partly_covered_hole_splits() {
        let mut s = state(&[1, 20], 0);
        note_loss(&mut s, 5, 9, "spool_full");
        let e = review("a", &mut s, 0, 60_000);
        assert_eq!(e.len(), 1);
        assert_eq!((e[0].first_seq, e[0].last_seq), (5, 9));
        let e = review("a", &mut s, 60_000, 60_000);
        let ranges: Vec<_> = e.iter().map(|g| (g.first_seq, g.last_seq)).collect();
        assert_eq!(ranges, vec![(2, 4), (10, 19)]);
    }

    #[test]
    fn a_loss_before_its_hole_waits_for_it() {
        let mut s = state(&[1], 0);
        note_loss(&mut s, 2, 3, "evicted");
        assert!(review("a", &mut s, 0, 60_000).is_empty());
        s.seen.as_mut().unwrap().insert(4, 0);
        let e = review("a", &mut s, 0, 60_000);
        assert_eq!(e[0].reason.as_deref(), Some("evicted"));
    }

    #[test]
    fn a_late_record_in_a_reported_gap_is_still_new() {
        let mut s = state(&[1, 5], 0);
        review("a", &mut s, 60_000, 60_000);
        assert_eq!(
            s.seen.as_mut().unwrap().insert(3, 0).0,
            super::super::seen::Insert::New
        );
    }
}
