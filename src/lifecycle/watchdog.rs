//! Liveness for systemd's watchdog.
//!
//! The tasks that would stall if ferry were stuck (the spool writer and the uplink) touch a
//! [`Heartbeat`] at least every [`TICK`], also while idle. The lifecycle loop pings
//! `WATCHDOG=1` only while every heartbeat is fresh, so a deadlocked writer or uplink stops the
//! pings and systemd restarts the agent; a timer that pinged unconditionally would hide that.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

// tokio's clock (the system clock unless a test pauses it), so a test can check the beat over
// many ticks without waiting for them.
use tokio::time::Instant;

/// How often a healthy task touches its heartbeat, at the least.
pub const TICK: Duration = Duration::from_secs(1);

#[derive(Clone, Debug)]
pub struct Heartbeat {
    name: &'static str,
    base: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    pub fn new(name: &'static str) -> Heartbeat {
        Heartbeat {
            name,
            base: Instant::now(),
            last_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    pub fn touch(&self) {
        self.last_ms
            .store(self.base.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    pub fn age(&self) -> Duration {
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        self.base.elapsed().saturating_sub(last)
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Sleeps for `d`, touching the heartbeat every [`TICK`].
    pub async fn sleep(&self, d: Duration) {
        let end = Instant::now() + d;
        loop {
            self.touch();
            let now = Instant::now();
            if now >= end {
                return;
            }
            tokio::time::sleep((end - now).min(TICK)).await;
        }
    }
}

/// The first heartbeat older than `stale_after`, if any.
pub fn stalled(beats: &[Heartbeat], stale_after: Duration) -> Option<&Heartbeat> {
    beats.iter().find(|b| b.age() > stale_after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_beat_that_stops_is_seen_as_stalled() {
        let a = Heartbeat::new("a");
        let b = Heartbeat::new("b");
        a.touch();
        b.touch();
        assert!(stalled(&[a.clone(), b.clone()], Duration::from_secs(5)).is_none());
        std::thread::sleep(Duration::from_millis(80));
        a.touch();
        assert_eq!(
            stalled(&[a, b], Duration::from_millis(50)).map(Heartbeat::name),
            Some("b")
        );
    }

    #[tokio::test(start_paused = true)]
    async fn sleeping_keeps_the_beat_fresh() {
        // A long sleep touches the beat at least every TICK all along, not only at its ends:
        // an observer never sees it older than a TICK (it would reach 10 s otherwise).
        let a = Heartbeat::new("a");
        let sleeper = tokio::spawn({
            let a = a.clone();
            async move { a.sleep(TICK * 10).await }
        });
        let mut oldest = Duration::ZERO;
        while !sleeper.is_finished() {
            tokio::time::sleep(TICK / 10).await;
            oldest = oldest.max(a.age());
        }
        assert!(
            oldest <= TICK,
            "the beat got {oldest:?} old during the sleep"
        );
        assert!(oldest >= TICK / 2, "the observer saw no tick: {oldest:?}");
        assert!(a.age() <= TICK, "touched when the sleep ends");
    }
}
