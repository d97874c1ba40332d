//! Exponential backoff with jitter, shared by the relay, reconnection and handler retries.

use std::time::Duration;

/// Exponential backoff: `initial * 2^(attempt-1)`, capped at `max`, with up to 20% jitter so
/// many clients do not reconnect in lockstep.
///
/// ```
/// use std::time::Duration;
/// use stevedore_bus::Backoff;
/// let b = Backoff::new(Duration::from_millis(100), Duration::from_secs(1));
/// assert!(b.delay(1) <= Duration::from_millis(100));
/// assert!(b.delay(30) <= Duration::from_secs(1));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound for any delay.
    pub max: Duration,
}

impl Backoff {
    /// A backoff from `initial` doubling up to `max`.
    pub const fn new(initial: Duration, max: Duration) -> Self {
        Self { initial, max }
    }

    /// The delay before retry number `attempt` (1-based), jittered down by at most 20%.
    pub fn delay(&self, attempt: u32) -> Duration {
        stevedore::supervision::backoff_delay(self.initial, self.max, attempt, 0.2, rand::random::<f64>())
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(Duration::from_millis(100), Duration::from_secs(10))
    }
}
