//! Retry delays: exponential backoff with jitter.

use std::time::Duration;

use rand::Rng;

/// Delay before retrying a failed job: `base * 2^(attempt - 1)`, capped at `max`, then
/// multiplied by a random factor in `[1 - jitter, 1 + jitter]` so that jobs failing together
/// do not retry together.
///
/// Defaults: base 1 s, max 1 h, jitter 0.2. With the default 20 attempts a job that always
/// fails is retried after about 1 s, 2 s, 4 s, ... 34 min, then hourly, and is dead about
/// 9 hours after its first run.
///
/// ```
/// use std::time::Duration;
/// use stevedore_jobs::Backoff;
///
/// let backoff = Backoff { base: Duration::from_millis(100), max: Duration::from_secs(10), jitter: 0.0 };
/// assert_eq!(backoff.delay(1), Duration::from_millis(100));
/// assert_eq!(backoff.delay(4), Duration::from_millis(800));
/// assert_eq!(backoff.delay(30), Duration::from_secs(10));
/// ```
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failed attempt.
    pub base: Duration,
    /// Largest delay before jitter.
    pub max: Duration,
    /// Relative spread of the random factor, between 0 and 1.
    pub jitter: f64,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: Duration::from_secs(1), max: Duration::from_secs(3600), jitter: 0.2 }
    }
}

impl Backoff {
    /// Delay before the attempt after failed attempt number `attempt` (1 for the first run).
    pub fn delay(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(62);
        let raw = self
            .base
            .checked_mul(1u32.checked_shl(exponent.min(31)).unwrap_or(u32::MAX))
            .unwrap_or(self.max)
            .min(self.max);
        // A NaN share would make the range below panic; it means no jitter.
        let jitter = if self.jitter.is_finite() { self.jitter.clamp(0.0, 1.0) } else { 0.0 };
        if jitter == 0.0 {
            return raw;
        }
        let factor = rand::rng().random_range(1.0 - jitter..=1.0 + jitter);
        // Not `mul_f64`, which panics where the product passes `Duration::MAX`.
        Duration::try_from_secs_f64(raw.as_secs_f64() * factor).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_exponentially_then_caps_and_stays_within_jitter() {
        let b = Backoff::default();
        for attempt in 1..=40 {
            let expected = Duration::from_secs(1u64 << (attempt - 1).min(20)).min(b.max);
            let d = b.delay(attempt);
            assert!(d >= expected.mul_f64(0.8) && d <= expected.mul_f64(1.2), "attempt {attempt}: {d:?}");
        }
    }

    #[test]
    fn a_huge_maximum_or_a_nan_jitter_gives_a_delay_not_a_panic() {
        let huge = Backoff { base: Duration::MAX, max: Duration::MAX, jitter: 0.5 };
        for attempt in [1, 2, 63, u32::MAX] {
            assert!(huge.delay(attempt) >= Duration::from_secs(u64::MAX / 4), "attempt {attempt}");
        }
        let nan = Backoff { base: Duration::from_secs(3), max: Duration::from_secs(60), jitter: f64::NAN };
        assert_eq!(nan.delay(2), Duration::from_secs(6), "a NaN jitter is no jitter");
    }
}
