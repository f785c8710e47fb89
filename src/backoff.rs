//! Exponential backoff with full jitter, shared by the two places allowed to retry: the
//! collector supervisor and the uplink's reconnect loop.
//!
//! Attempt n waits a uniformly random time in `[0, min(max, initial * 2^n)]` ("full jitter"),
//! so a fleet of gateways that lost the same broker does not reconnect in lock-step. The
//! attempt counter resets once a connection (or a collector run) stayed up for
//! `reset_after`.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    initial: Duration,
    max: Duration,
    attempt: u32,
    rng: fastrand::Rng,
}

impl Backoff {
    pub fn new(initial: Duration, max: Duration) -> Backoff {
        Backoff::with_rng(initial, max, fastrand::Rng::new())
    }

    /// A backoff with a seeded generator, for tests.
    pub fn with_rng(initial: Duration, max: Duration, rng: fastrand::Rng) -> Backoff {
        Backoff {
            initial,
            max: max.max(initial),
            attempt: 0,
            rng,
        }
    }

    /// The ceiling of the next delay, before jitter.
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The next delay: uniformly random in `[0, ceiling]`, then the ceiling doubles.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let ms = ceiling.as_millis() as u64;
        Duration::from_millis(self.rng.u64(0..=ms))
    }

    /// Number of delays handed out since the last reset.
    pub fn attempts(&self) -> u32 {
        self.attempt
    }

    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceiling_doubles_up_to_max() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(100),
            Duration::from_millis(1000),
            fastrand::Rng::with_seed(1),
        );
        let mut ceilings = Vec::new();
        for _ in 0..7 {
            ceilings.push(b.ceiling().as_millis());
            b.next_delay();
        }
        assert_eq!(ceilings, vec![100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn delays_stay_within_bounds_and_are_jittered() {
        let mut b = Backoff::with_rng(
            Duration::from_millis(50),
            Duration::from_secs(5),
            fastrand::Rng::with_seed(7),
        );
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let ceiling = b.ceiling();
            let d = b.next_delay();
            assert!(d <= ceiling, "{d:?} > {ceiling:?}");
            assert!(d <= Duration::from_secs(5));
            seen.insert(d.as_millis());
        }
        // Full jitter: the delays at the cap are spread, not one value.
        assert!(seen.len() > 50, "only {} distinct delays", seen.len());
    }

    #[test]
    fn reset_starts_over_and_huge_attempts_do_not_overflow() {
        let mut b = Backoff::with_rng(
            Duration::from_secs(1),
            Duration::from_secs(300),
            fastrand::Rng::with_seed(3),
        );
        for _ in 0..100 {
            b.next_delay();
        }
        assert_eq!(b.ceiling(), Duration::from_secs(300));
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.ceiling(), Duration::from_secs(1));
    }

    #[test]
    fn max_below_initial_is_raised_to_initial() {
        let b = Backoff::with_rng(
            Duration::from_secs(2),
            Duration::from_secs(1),
            fastrand::Rng::with_seed(3),
        );
        assert_eq!(b.ceiling(), Duration::from_secs(2));
    }
}
