//! The byte budget: wire bytes allowed per UTC day and per UTC calendar month, counted as the
//! MQTT PUBLISH packets ferry sends (fixed header, topic, packet id and payload; resends
//! included), persisted in the spool's database so a restart does not reset it.
//!
//! Invariants:
//! - A message of the normal or bulk lane is cut to what is left of every period (it carries
//!   fewer stored chunks) and sent only if its packet fits, so those lanes never overshoot. When
//!   not even one chunk fits, the period is spent (the rest of it, less than one chunk's
//!   message, is not used).
//! - Budgets never stall: config validation refuses a budget smaller than
//!   `uplink.max_packet_bytes`, the largest message ferry sends, so every message fits in a
//!   fresh period. A message over that limit is never sent (it is reported lost) and is not held
//!   back by the budget.
//! - Once a period is spent, only the high lane flows (command replies, `ferry.loss`, alarms)
//!   until it rolls over; high-lane packets are counted too and may take the total past the
//!   limit: they are what an operator needs most when the budget is gone.
//! - Periods follow the injected [`ClockSource`]; a clock that jumps (first sync of a gateway
//!   without a real-time clock) starts a new period.
//! - The counts are written to sled with every charge and reach the disk with the spool's next
//!   flush (at most `flush_interval_ms` later): a power cut can forget the last few packets.
//! - MQTT control packets (CONNECT, PINGREQ, SUBSCRIBE, PUBACKs of commands) and TLS framing
//!   are not counted; leave them room (docs/WIRE.md gives their sizes).

use super::BudgetSettings;
use crate::clock::ClockSource;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tracing::{info, warn};

const DAY_MS: u64 = 86_400_000;
const DAY_KEY: &[u8] = b"day";
const MONTH_KEY: &[u8] = b"month";

/// Budget figures for `ferry status` and `ferry.self`.
#[derive(Debug, Default)]
pub struct BudgetStats {
    pub day_used: AtomicU64,
    pub month_used: AtomicU64,
    /// A period is spent: only the high lane flows.
    pub spent: AtomicBool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Period {
    id: u32,
    used: u64,
    spent: bool,
}

impl Period {
    fn encode(&self) -> [u8; 13] {
        let mut b = [0u8; 13];
        b[..4].copy_from_slice(&self.id.to_be_bytes());
        b[4..12].copy_from_slice(&self.used.to_be_bytes());
        b[12] = self.spent as u8;
        b
    }

    fn decode(b: &[u8]) -> Option<Period> {
        Some(Period {
            id: u32::from_be_bytes(b.get(..4)?.try_into().ok()?),
            used: u64::from_be_bytes(b.get(4..12)?.try_into().ok()?),
            spent: *b.get(12)? != 0,
        })
    }
}

pub struct Budget {
    tree: sled::Tree,
    limits: BudgetSettings,
    clock: Arc<dyn ClockSource>,
    day: Period,
    month: Period,
    stats: Arc<BudgetStats>,
}

/// UTC day number and calendar month number (year * 12 + month - 1) of `now_ms`.
fn periods(now_ms: u64) -> (u32, u32) {
    let days = now_ms / DAY_MS;
    // Howard Hinnant's civil_from_days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (days as u32, (year * 12 + month - 1) as u32)
}

impl Budget {
    /// Loads the persisted counts from `tree`.
    pub fn open(
        tree: sled::Tree,
        limits: BudgetSettings,
        clock: Arc<dyn ClockSource>,
        stats: Arc<BudgetStats>,
    ) -> Budget {
        let load = |key: &[u8]| {
            tree.get(key)
                .ok()
                .flatten()
                .and_then(|v| Period::decode(&v))
        };
        let empty = Period {
            id: u32::MAX,
            used: 0,
            spent: false,
        };
        let mut b = Budget {
            day: load(DAY_KEY).unwrap_or(empty),
            month: load(MONTH_KEY).unwrap_or(empty),
            tree,
            limits,
            clock,
            stats,
        };
        b.roll();
        b
    }

    pub fn set_limits(&mut self, limits: BudgetSettings) {
        if limits != self.limits {
            self.limits = limits;
            // A raised limit may leave room again.
            self.day.spent = false;
            self.month.spent = false;
            self.publish_stats();
        }
    }

    /// Starts new periods when the clock has moved into one.
    pub fn roll(&mut self) {
        let (day, month) = periods(self.clock.now_ms());
        let mut changed = false;
        for (p, id, name) in [
            (&mut self.day, day, "day"),
            (&mut self.month, month, "month"),
        ] {
            if p.id != id {
                if p.spent {
                    info!(
                        period = name,
                        "A new budget period started; all lanes flow again."
                    );
                }
                *p = Period {
                    id,
                    used: 0,
                    spent: false,
                };
                changed = true;
            }
        }
        if changed {
            self.persist();
        }
        self.publish_stats();
    }

    /// Bytes the normal and bulk lanes may still send; `None` when there is no limit.
    pub fn remaining(&mut self) -> Option<u64> {
        self.roll();
        let left = |p: &Period, limit: Option<u64>| {
            limit.map(|l| if p.spent { 0 } else { l.saturating_sub(p.used) })
        };
        match (
            left(&self.day, self.limits.daily_bytes),
            left(&self.month, self.limits.monthly_bytes),
        ) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Counts a packet that was handed to the connection.
    pub fn charge(&mut self, bytes: u64) {
        self.day.used += bytes;
        self.month.used += bytes;
        self.persist();
        self.publish_stats();
    }

    /// A normal or bulk message did not fit: the periods it did not fit in are spent.
    pub fn exhaust(&mut self, packet: u64) {
        let day_left = self
            .limits
            .daily_bytes
            .map(|l| l.saturating_sub(self.day.used));
        let month_left = self
            .limits
            .monthly_bytes
            .map(|l| l.saturating_sub(self.month.used));
        if day_left.is_some_and(|l| l < packet) && !self.day.spent {
            self.day.spent = true;
            warn!(used = self.day.used, limit = ?self.limits.daily_bytes, "Daily byte budget spent; only the high lane flows until the next UTC day.");
        }
        if month_left.is_some_and(|l| l < packet) && !self.month.spent {
            self.month.spent = true;
            warn!(used = self.month.used, limit = ?self.limits.monthly_bytes, "Monthly byte budget spent; only the high lane flows until the next month.");
        }
        self.persist();
        self.publish_stats();
    }

    fn persist(&self) {
        let mut batch = sled::Batch::default();
        batch.insert(DAY_KEY, &self.day.encode()[..]);
        batch.insert(MONTH_KEY, &self.month.encode()[..]);
        if let Err(e) = self.tree.apply_batch(batch) {
            warn!(error = %e, "Cannot store the byte budget counts.");
        }
    }

    fn publish_stats(&self) {
        self.stats.day_used.store(self.day.used, Ordering::Relaxed);
        self.stats
            .month_used
            .store(self.month.used, Ordering::Relaxed);
        let spent = (self.day.spent && self.limits.daily_bytes.is_some())
            || (self.month.spent && self.limits.monthly_bytes.is_some());
        self.stats.spent.store(spent, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;

    fn tree() -> sled::Tree {
        sled::Config::new()
            .temporary(true)
            .open()
            .unwrap()
            .open_tree("budget")
            .unwrap()
    }

    #[test]
    fn civil_months() {
        // 2026-11-25 and 2026-12-01 UTC.
        assert_eq!(periods(1_795_651_200_000).1, 2026 * 12 + 10);
        assert_eq!(periods(1_796_083_200_000).1, 2026 * 12 + 11);
        assert_eq!(periods(0), (0, 1970 * 12));
        // 2024-02-29 is in February.
        assert_eq!(periods(1_709_164_800_000).1, 2024 * 12 + 1);
    }

    #[test]
    fn spends_persists_and_rolls_over() {
        let t = tree();
        let clock = ManualClock::new(1_795_651_200_000, 0, true);
        let limits = BudgetSettings {
            daily_bytes: Some(10_000),
            monthly_bytes: Some(15_000),
        };
        let stats = Arc::new(BudgetStats::default());
        let mut b = Budget::open(t.clone(), limits, clock.clone(), stats.clone());
        assert_eq!(b.remaining(), Some(10_000));
        b.charge(9_000);
        assert_eq!(b.remaining(), Some(1_000));
        b.exhaust(1_200);
        assert_eq!(b.remaining(), Some(0));
        assert!(stats.spent.load(Ordering::Relaxed));

        // A restart keeps the counts.
        let mut again = Budget::open(t.clone(), limits, clock.clone(), stats.clone());
        assert_eq!(again.remaining(), Some(0));

        // Next day: the month still has 6,000 left.
        clock.advance(DAY_MS);
        assert_eq!(again.remaining(), Some(6_000));
        assert!(!stats.spent.load(Ordering::Relaxed));
        again.charge(6_000);
        again.exhaust(100);
        clock.advance(DAY_MS);
        assert_eq!(again.remaining(), Some(0), "the month is spent");
    }
}
