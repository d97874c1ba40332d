//! What happens when a service fails at run time: stop the host, ignore it, or restart it with backoff.

use std::time::Duration;

/// The failure policy of one service. A panic counts as a failure and carries its message.
#[derive(Debug, Clone, Default, PartialEq)]
pub enum OnFailure {
    /// Stop the whole host (the default, as in .NET); the process then exits non-zero.
    #[default]
    StopHost,
    /// Log the failure, mark the service failed and keep the host running.
    Ignore,
    /// Restart with exponential backoff and jitter; past the policy's limit, stop the host.
    Restart(RestartPolicy),
}

/// Restart with exponential backoff and jitter, at most `max_restarts` within a sliding `window`.
///
/// The n-th consecutive restart within the window waits `initial_backoff * 2^(n-1)`, capped at
/// `max_backoff`, then shortened by a random share of up to `jitter` (0.0 to 1.0) so that many
/// replicas do not restart in step. When a failure would exceed `max_restarts` within `window`,
/// the service is marked failed and the host stops.
///
/// ```
/// use std::time::Duration;
/// let policy = stevedore::RestartPolicy::default()
///     .max_restarts(3)
///     .window(Duration::from_secs(60))
///     .backoff(Duration::from_millis(100), Duration::from_secs(5))
///     .jitter(0.0);
/// assert_eq!(policy.delay(1, 0.0), Duration::from_millis(100));
/// assert_eq!(policy.delay(3, 0.0), Duration::from_millis(400));
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window`.
    pub max_restarts: u32,
    /// The sliding window restarts are counted in.
    pub window: Duration,
    /// The first restart's delay.
    pub initial_backoff: Duration,
    /// The longest delay.
    pub max_backoff: Duration,
    /// The largest share of a delay removed at random (0.0 to 1.0).
    pub jitter: f64,
}

impl Default for RestartPolicy {
    /// 5 restarts per minute, from 100 ms doubling to 30 s, 20% jitter.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            initial_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(30),
            jitter: 0.2,
        }
    }
}

impl RestartPolicy {
    /// Sets the number of restarts allowed within the window.
    pub fn max_restarts(mut self, n: u32) -> Self {
        self.max_restarts = n;
        self
    }

    /// Sets the sliding window.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// Sets the first and the longest delay.
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    /// Sets the jitter share, clamped to 0.0..=1.0.
    pub fn jitter(mut self, jitter: f64) -> Self {
        self.jitter = if jitter.is_finite() { jitter.clamp(0.0, 1.0) } else { 0.0 };
        self
    }

    /// The delay before the `n`-th consecutive restart (1-based), given a random draw in `0.0..1.0`.
    pub fn delay(&self, n: u32, random: f64) -> Duration {
        backoff_delay(self.initial_backoff, self.max_backoff, n, self.jitter, random)
    }
}

/// Exponential backoff: `initial * 2^(n-1)` capped at `max`, minus up to `jitter` of it at random.
///
/// Shared by restarts, interval jitter and retries so that every backoff in the project means the same.
pub fn backoff_delay(initial: Duration, max: Duration, n: u32, jitter: f64, random: f64) -> Duration {
    let exp = n.saturating_sub(1).min(31);
    let base = initial.saturating_mul(1u32 << exp).min(max);
    let cut = (jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0)).min(1.0);
    base.mul_f64(1.0 - cut)
}
