//! The shutdown budget, the shutdown delay, and the OS signals that start a stop.
//!
//! One budget covers the whole stop (every `stopping` hook, every stop, every `stopped` hook), as in
//! .NET. A service still running when it runs out is abandoned: its task is aborted, it is named in an
//! error log line and in the [`RunReport`](crate::RunReport), and the host returns at once.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::BuildError;
use crate::lifetime::{AppLifetime, StopReason};

/// Environment variable that overrides the shutdown budget, e.g. `30s` or `1m 30s`.
pub const SHUTDOWN_TIMEOUT_ENV: &str = "STEVEDORE_SHUTDOWN_TIMEOUT";
/// Environment variable that overrides the shutdown delay, e.g. `5s`.
pub const SHUTDOWN_DELAY_ENV: &str = "STEVEDORE_SHUTDOWN_DELAY";

/// The default shutdown budget: 5 seconds, as in the article.
pub const DEFAULT_SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(5);

/// How the host stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShutdownOptions {
    /// The one budget for the whole stop.
    pub timeout: Duration,
    /// A wait between the stop request and the stop, during which readiness already reports 503, so a
    /// load balancer (Kubernetes endpoints) stops routing first. A second signal ends it at once.
    pub delay: Duration,
    /// Stop services all at once instead of one by one in reverse registration order.
    pub concurrent: bool,
}

impl Default for ShutdownOptions {
    fn default() -> Self {
        ShutdownOptions { timeout: DEFAULT_SHUTDOWN_TIMEOUT, delay: Duration::ZERO, concurrent: false }
    }
}

impl ShutdownOptions {
    /// Applies `STEVEDORE_SHUTDOWN_TIMEOUT` and `STEVEDORE_SHUTDOWN_DELAY` when set; a value that does
    /// not parse is an error naming the variable.
    pub fn apply_env(&mut self) -> Result<(), BuildError> {
        if let Some(d) = duration_from_env(SHUTDOWN_TIMEOUT_ENV)? {
            self.timeout = d;
        }
        if let Some(d) = duration_from_env(SHUTDOWN_DELAY_ENV)? {
            self.delay = d;
        }
        Ok(())
    }
}

/// Reads a human duration (`30s`, `1m 30s`, `500ms`) from an environment variable.
pub fn duration_from_env(var: &'static str) -> Result<Option<Duration>, BuildError> {
    match std::env::var(var) {
        Ok(value) => parse_duration(&value).map(Some).map_err(|reason| BuildError::InvalidEnv { var, value, reason }),
        Err(std::env::VarError::NotPresent) => Ok(None),
        Err(std::env::VarError::NotUnicode(v)) => Err(BuildError::InvalidEnv {
            var,
            value: v.to_string_lossy().into_owned(),
            reason: "not valid UTF-8".into(),
        }),
    }
}

/// Parses a human duration such as `30s`, `1m 30s` or `250ms`.
///
/// ```
/// assert_eq!(stevedore::shutdown::parse_duration("1m 30s"), Ok(std::time::Duration::from_secs(90)));
/// assert!(stevedore::shutdown::parse_duration("soon").is_err());
/// ```
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("expected a duration such as `30s` or `1m 30s`: {e}"))
}

/// Listens for SIGINT, SIGTERM and SIGQUIT: the first requests a stop, a second one cancels `force`,
/// which ends the shutdown delay and the stop's wait at once.
///
/// The handlers are installed before this returns, so a signal that arrives once the host has begun
/// starting is never met by the default action (which would end the process at once).
pub(crate) fn spawn_signal_listener(lifetime: AppLifetime, force: CancellationToken) -> tokio::task::JoinHandle<()> {
    let signals = Signals::new();
    tokio::spawn(async move {
        let mut signals = match signals {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for OS signals; stop the host programmatically");
                return;
            }
        };
        let name = signals.next().await;
        tracing::info!(signal = name, "signal received: stopping");
        lifetime.request_stop_because(StopReason::Signal(name));
        let name = signals.next().await;
        tracing::warn!(signal = name, "second signal: abandoning what is still running");
        force.cancel();
    })
}

#[cfg(unix)]
struct Signals {
    int: tokio::signal::unix::Signal,
    term: tokio::signal::unix::Signal,
    quit: tokio::signal::unix::Signal,
}

#[cfg(unix)]
impl Signals {
    fn new() -> std::io::Result<Self> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            int: signal(SignalKind::interrupt())?,
            term: signal(SignalKind::terminate())?,
            quit: signal(SignalKind::quit())?,
        })
    }

    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.int.recv() => "SIGINT",
            _ = self.term.recv() => "SIGTERM",
            _ = self.quit.recv() => "SIGQUIT",
        }
    }
}

#[cfg(not(unix))]
struct Signals;

#[cfg(not(unix))]
impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Signals)
    }

    async fn next(&mut self) -> &'static str {
        match tokio::signal::ctrl_c().await {
            Ok(()) => "CTRL-C",
            Err(_) => std::future::pending().await,
        }
    }
}
