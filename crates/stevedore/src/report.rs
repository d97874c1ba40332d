//! What `Host::run` returns: how each service ended, and the process exit code that follows.

use std::time::Duration;

use crate::error::StartError;
use crate::lifetime::StopReason;
use crate::status::ServiceState;

/// How one service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceReport {
    /// The service's name.
    pub name: String,
    /// Its final state: `Stopped`, `Completed`, `Failed`, `Abandoned`, or `Registered` if it never started.
    pub state: ServiceState,
    /// Its last error (a failure, a panic, a failed stop, or why it was abandoned).
    pub error: Option<String>,
    /// Whether its failure counts toward the exit code (false for a failure under `OnFailure::Ignore`).
    pub counts_as_failure: bool,
}

/// The result of a host's run.
///
/// ```no_run
/// # async fn demo(host: stevedore::Host) {
/// let report = host.run().await;
/// report.exit(); // 0 when clean, 1 when a service failed, 2 when one overran the budget
/// # }
/// ```
#[derive(Debug, Clone)]
pub struct RunReport {
    /// Every service, in registration order.
    pub services: Vec<ServiceReport>,
    /// Set when the host never finished starting.
    pub start_error: Option<StartError>,
    /// Why the host stopped.
    pub stop_reason: Option<StopReason>,
    /// True when a second signal cut the stop short.
    pub forced: bool,
    /// How long the stop took (delay excluded).
    pub stop_duration: Duration,
}

/// Exit code when every service stopped or completed cleanly.
pub const EXIT_CLEAN: i32 = 0;
/// Exit code when a service failed (at start or run time) or the stop failed.
pub const EXIT_FAILED: i32 = 1;
/// Exit code when no service failed but one overran the shutdown budget and was abandoned.
pub const EXIT_ABANDONED: i32 = 2;

impl RunReport {
    /// Services that failed (and whose failure counts).
    pub fn failed(&self) -> impl Iterator<Item = &ServiceReport> {
        self.services.iter().filter(|s| s.state == ServiceState::Failed && s.counts_as_failure)
    }

    /// Services abandoned at the end of the shutdown budget.
    pub fn abandoned(&self) -> impl Iterator<Item = &ServiceReport> {
        self.services.iter().filter(|s| s.state == ServiceState::Abandoned)
    }

    /// True when the host started, and every service stopped or completed within the budget.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == EXIT_CLEAN
    }

    /// The process exit code: [`EXIT_CLEAN`], [`EXIT_FAILED`] or [`EXIT_ABANDONED`].
    pub fn exit_code(&self) -> i32 {
        if self.start_error.is_some() || self.failed().next().is_some() {
            EXIT_FAILED
        } else if self.abandoned().next().is_some() || self.forced {
            EXIT_ABANDONED
        } else {
            EXIT_CLEAN
        }
    }

    /// Logs a one-line summary and ends the process with [`exit_code`](Self::exit_code).
    ///
    /// Ends the process directly, so a task that ignores cancellation and never yields cannot keep
    /// the process alive past the budget (dropping a tokio runtime waits for such tasks).
    pub fn exit(self) -> ! {
        let code = self.exit_code();
        if code == EXIT_CLEAN {
            tracing::info!(code, "host stopped cleanly");
        } else {
            tracing::error!(code, summary = %self.summary(), "host stopped with problems");
        }
        std::process::exit(code)
    }

    /// A short human summary naming every service that failed or was abandoned.
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        if let Some(e) = &self.start_error {
            parts.push(e.to_string());
        }
        for s in self.failed() {
            parts.push(format!("`{}` failed: {}", s.name, s.error.as_deref().unwrap_or("")));
        }
        for s in self.abandoned() {
            parts.push(format!("`{}` abandoned: {}", s.name, s.error.as_deref().unwrap_or("")));
        }
        if self.forced {
            parts.push("stop cut short by a second signal".into());
        }
        if parts.is_empty() { "clean".into() } else { parts.join("; ") }
    }
}
