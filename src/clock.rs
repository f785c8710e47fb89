//! Honest timestamps.
//!
//! A gateway without a real-time clock boots in 1970 or at its last shutdown time, and its
//! clock jumps when NTP finally syncs. Every committed record therefore carries a
//! [`ClockState`]: `Synced`, `Unsynced` (with the kernel boot it was stamped in and the time
//! since that boot, which does not jump), or `Corrected`.
//!
//! When the clock becomes synchronised while unsynced records of the current boot are still in
//! the spool, their timestamps are recomputed as `uptime_at_stamp + (wall_now - uptime_now)`
//! and marked `Corrected` (see `Spool::correct_clock`). Records of an earlier boot cannot be
//! corrected and stay `Unsynced`.
//!
//! "Synchronised" means: systemd-timesyncd's marker file exists (or the configured one), and
//! the wall clock is past 2020. `assume_synced` is for gateways with a battery-backed clock.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Clock quality of one record's `ts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ClockState {
    #[default]
    Synced,
    /// Stamped while the clock was not known to be right; `uptime_ms` since kernel boot `boot`.
    Unsynced { boot: u32, uptime_ms: u64 },
    /// Was unsynced; `ts` recomputed from the uptime once the clock synced.
    Corrected,
}

/// Where time comes from; injectable so tests can sync a clock at will.
pub trait ClockSource: Send + Sync + 'static {
    /// Wall-clock time, ms since the Unix epoch.
    fn now_ms(&self) -> u64;
    /// Time since kernel boot, ms; does not jump with the wall clock.
    fn uptime_ms(&self) -> u64;
    /// Identity of the current kernel boot.
    fn boot(&self) -> u32;
    fn synced(&self) -> bool;

    /// The clock as it is now, to stamp many samples with one look at the sync state.
    fn snapshot(&self) -> Snapshot {
        Snapshot {
            synced: self.synced(),
            now_ms: self.now_ms(),
            uptime_ms: self.uptime_ms(),
            boot: self.boot(),
        }
    }

    /// The state to record for a sample stamped `ts_ms` (wall) now.
    fn stamp(&self, ts_ms: u64) -> ClockState {
        self.snapshot().stamp(ts_ms)
    }
}

/// One reading of a [`ClockSource`].
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub synced: bool,
    pub now_ms: u64,
    pub uptime_ms: u64,
    pub boot: u32,
}

impl Snapshot {
    /// The state to record for a sample stamped `ts_ms` on the wall clock.
    pub fn stamp(&self, ts_ms: u64) -> ClockState {
        if self.synced {
            return ClockState::Synced;
        }
        // The sample was taken (now - ts) ago on the same, unsynced, wall clock.
        let age = self.now_ms.saturating_sub(ts_ms);
        ClockState::Unsynced {
            boot: self.boot,
            uptime_ms: self.uptime_ms.saturating_sub(age),
        }
    }
}

/// systemd-timesyncd creates this file once the clock is synchronised.
pub const DEFAULT_SYNC_MARKER: &str = "/run/systemd/timesync/synchronized";

/// 2020-01-01T00:00:00Z: a wall clock before this is certainly not synchronised.
const PLAUSIBLE_MS: u64 = 1_577_836_800_000;

pub struct SystemClock {
    marker: PathBuf,
    assume_synced: bool,
    start: Instant,
    uptime_at_start_ms: u64,
    boot: u32,
}

impl SystemClock {
    pub fn new(marker: PathBuf, assume_synced: bool) -> SystemClock {
        let uptime_at_start_ms = std::fs::read_to_string("/proc/uptime")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0, |secs| (secs * 1000.0) as u64);
        let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| fnv32(s.trim().as_bytes()))
            .unwrap_or(0);
        SystemClock {
            marker,
            assume_synced,
            start: Instant::now(),
            uptime_at_start_ms,
            boot,
        }
    }
}

fn fnv32(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

impl ClockSource for SystemClock {
    fn now_ms(&self) -> u64 {
        crate::record::now_ms()
    }

    fn uptime_ms(&self) -> u64 {
        self.uptime_at_start_ms + self.start.elapsed().as_millis() as u64
    }

    fn boot(&self) -> u32 {
        self.boot
    }

    fn synced(&self) -> bool {
        synced_at(self.now_ms(), self.assume_synced || self.marker.exists())
    }
}

/// The sync rule, apart from where the wall clock is read: a clock before 2020 is never
/// synchronised, whatever the marker (or `assume_synced`) says.
fn synced_at(now_ms: u64, marked: bool) -> bool {
    now_ms >= PLAUSIBLE_MS && marked
}

/// A clock for tests: wall time, uptime and sync state are set by hand.
#[derive(Default)]
pub struct ManualClock {
    state: std::sync::Mutex<(u64, u64, bool)>,
}

impl ManualClock {
    pub fn new(now_ms: u64, uptime_ms: u64, synced: bool) -> Arc<ManualClock> {
        Arc::new(ManualClock {
            state: std::sync::Mutex::new((now_ms, uptime_ms, synced)),
        })
    }

    /// Lets `ms` pass on both clocks.
    pub fn advance(&self, ms: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 += ms;
        s.1 += ms;
    }

    /// The wall clock jumps to `now_ms` and is synchronised.
    pub fn sync_to(&self, now_ms: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        s.0 = now_ms;
        s.2 = true;
    }
}

impl ClockSource for ManualClock {
    fn now_ms(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).0
    }
    fn uptime_ms(&self) -> u64 {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1
    }
    fn boot(&self) -> u32 {
        7
    }
    fn synced(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).2
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_unsynced_samples_with_their_uptime() {
        let c = ManualClock::new(1_000_000, 50_000, false);
        assert_eq!(
            c.stamp(999_000),
            ClockState::Unsynced {
                boot: 7,
                uptime_ms: 49_000
            }
        );
        c.sync_to(1_800_000_000_000);
        assert_eq!(c.stamp(1_800_000_000_000), ClockState::Synced);
    }

    #[test]
    fn a_1970_clock_is_never_synced() {
        // 1970-01-01, a day later, and the last millisecond of 2019: not synced even with the
        // marker present or assume_synced set.
        for now_ms in [0, 86_400_000, PLAUSIBLE_MS - 1] {
            assert!(!synced_at(now_ms, true), "{now_ms} ms counted as synced");
        }
        assert!(synced_at(PLAUSIBLE_MS, true));
        assert!(!synced_at(PLAUSIBLE_MS, false), "no marker, not assumed");
    }

    #[test]
    fn the_system_clock_follows_the_marker_file() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("synchronized");
        std::fs::write(&marker, b"").unwrap();
        let c = SystemClock::new(marker, false);
        assert!(c.synced(), "this machine's clock is past 2020 and marked");
        assert!(c.uptime_ms() > 0);
        assert!(!SystemClock::new(dir.path().join("missing"), false).synced());
        assert!(SystemClock::new(dir.path().join("missing"), true).synced());
    }
}
