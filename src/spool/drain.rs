//! The order in which the uplink drains the spool: priority lanes, weights between the lower
//! lanes, and live-first streams. [`DrainState`] is where one connection epoch stands; it
//! starts empty at every epoch, so everything unacknowledged is sent again after a reconnect.
//!
//! Invariants:
//! - **High lane first.** Command replies, then `ferry.loss` and every stream configured
//!   `lane: high`, before anything else; when the byte budget is spent only this lane flows.
//! - **Normal and bulk share by weight.** While both have data, they get messages in the
//!   ratio of their weights, so bulk is slowed, never starved. A lane that had nothing to send
//!   earns no credit for later: the shares count only while both lanes wait.
//! - **Within a lane, oldest data first** (smallest chunk id across its streams).
//! - **Live-first streams** (opt-in) send their newest batch first after an outage, then keep
//!   sending newly committed chunks ahead of the backlog, which drains oldest-first in between.
//!   The chunks sent ahead form one contiguous run of chunk ids per stream; the backlog run
//!   below it closes up to it. Records keep their seq, so consumers can reorder.

use crate::record::{COMMANDS_STREAM, LOSS_STREAM, SELF_STREAM};
use serde::Deserialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Lane {
    High,
    #[default]
    Normal,
    Bulk,
}

impl Lane {
    fn index(self) -> usize {
        match self {
            Lane::High => 0,
            Lane::Normal => 1,
            Lane::Bulk => 2,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Lane::High => "high",
            Lane::Normal => "normal",
            Lane::Bulk => "bulk",
        }
    }
}

/// Messages of the normal and bulk lanes while both have data: `normal` of one for every
/// `bulk` of the other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneWeights {
    pub normal: u32,
    pub bulk: u32,
}

impl Default for LaneWeights {
    fn default() -> Self {
        LaneWeights { normal: 4, bulk: 1 }
    }
}

/// How one stream is drained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamDrain {
    pub lane: Lane,
    pub live_first: bool,
}

/// The drain order as configured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct DrainRules {
    pub weights: LaneWeights,
    /// Streams not named here: normal lane, oldest first (`ferry.self`: bulk).
    pub streams: BTreeMap<String, StreamDrain>,
}

impl DrainRules {
    pub fn of(&self, stream: &str) -> StreamDrain {
        if stream == COMMANDS_STREAM || stream == LOSS_STREAM {
            return StreamDrain {
                lane: Lane::High,
                live_first: false,
            };
        }
        match self.streams.get(stream) {
            Some(d) => *d,
            None if stream == SELF_STREAM => StreamDrain {
                lane: Lane::Bulk,
                live_first: false,
            },
            None => StreamDrain::default(),
        }
    }
}

/// What kind of read a batch is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pick {
    /// The oldest chunks after the backlog cursor.
    Backlog,
    /// A live-first stream's newest chunks, sent ahead of its backlog.
    Newest,
    /// Chunks committed after the run sent ahead, continuing it.
    Fresh,
}

/// Where one stream's drain stands in the current epoch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Cursor {
    /// Every chunk at or below this id was sent this epoch (oldest-first part).
    pub backlog: Option<u64>,
    /// Live-first: the run of chunk ids `[first, last]` sent ahead of the backlog.
    pub ahead: Option<(u64, u64)>,
}

impl Cursor {
    /// First chunk id the backlog part still has to send.
    pub fn backlog_start(&self) -> u64 {
        self.backlog.map_or(0, |c| c + 1)
    }
}

/// One epoch's drain position in every stream and the shares of the lower lanes.
#[derive(Debug, Clone, Default)]
pub struct DrainState {
    cursors: HashMap<u32, Cursor>,
    served: [u64; 3],
}

impl DrainState {
    /// A state where stream `sid` was sent oldest-first up to chunk `last` for each entry.
    pub fn from_backlog(cursors: &HashMap<u32, u64>) -> DrainState {
        DrainState {
            cursors: cursors
                .iter()
                .map(|(&sid, &last)| {
                    (
                        sid,
                        Cursor {
                            backlog: Some(last),
                            ahead: None,
                        },
                    )
                })
                .collect(),
            served: [0; 3],
        }
    }

    pub fn cursor(&self, stream_id: u32) -> Cursor {
        self.cursors.get(&stream_id).copied().unwrap_or_default()
    }

    /// Records that a batch was sent up to chunk `last_used` (encoding may use fewer chunks
    /// than the batch held).
    pub fn advance(&mut self, batch: &super::Batch, last_used: u64) {
        let first = batch.chunks.first().map_or(last_used, |c| c.chunk_id);
        let c = self.cursors.entry(batch.stream_id).or_default();
        match batch.pick {
            Pick::Backlog => c.backlog = Some(last_used),
            Pick::Newest => c.ahead = Some((first, last_used)),
            Pick::Fresh => {
                if let Some(a) = c.ahead.as_mut() {
                    a.1 = last_used;
                }
            }
        }
        if let Some((a_first, a_last)) = c.ahead
            && c.backlog_start() >= a_first
        {
            c.backlog = Some(a_last);
            c.ahead = None;
        }
        match batch.lane {
            Lane::High => {}
            lane if batch.contested => self.served[lane.index()] += 1,
            // Shares count only while normal and bulk both wait.
            _ => self.served = [0; 3],
        }
    }

    /// Which lower lane the next message goes to when both wait.
    pub(super) fn lower_lane(&self, weights: LaneWeights) -> Lane {
        let (n, b) = (self.served[1], self.served[2]);
        // normal's share n/wn against bulk's b/wb; ties go to normal.
        if n * u64::from(weights.bulk.max(1)) <= b * u64::from(weights.normal.max(1)) {
            Lane::Normal
        } else {
            Lane::Bulk
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_lanes_and_defaults() {
        let mut rules = DrainRules::default();
        rules.streams.insert(
            LOSS_STREAM.into(),
            StreamDrain {
                lane: Lane::Bulk,
                live_first: true,
            },
        );
        assert_eq!(rules.of(LOSS_STREAM).lane, Lane::High);
        assert_eq!(rules.of(COMMANDS_STREAM).lane, Lane::High);
        assert_eq!(rules.of(SELF_STREAM).lane, Lane::Bulk);
        assert_eq!(rules.of("system").lane, Lane::Normal);
    }

    #[test]
    fn weights_give_bulk_its_share() {
        let mut s = DrainState::default();
        let w = LaneWeights { normal: 3, bulk: 1 };
        let mut count = [0; 3];
        for _ in 0..40 {
            let lane = s.lower_lane(w);
            count[lane.index()] += 1;
            s.served[lane.index()] += 1;
        }
        assert_eq!((count[1], count[2]), (30, 10));
    }
}
