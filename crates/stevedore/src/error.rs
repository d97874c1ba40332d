//! Errors the host returns, each naming the service or setting at fault.

use std::time::Duration;

/// The error type a service returns: any error, boxed, so services keep their own error types.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A host could not be built: caught before anything starts, not at 3 a.m.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BuildError {
    /// Two services were registered under one name; names identify services in logs, status and reports.
    #[error("service name `{0}` is registered twice: every service needs a unique name")]
    DuplicateName(String),
    /// A service was registered with an empty name.
    #[error("a service was registered with an empty name")]
    EmptyName,
    /// An environment variable holds a value the host cannot use.
    #[error("environment variable {var}={value:?} is invalid: {reason}")]
    InvalidEnv {
        /// The variable, e.g. `STEVEDORE_SHUTDOWN_TIMEOUT`.
        var: &'static str,
        /// The value found.
        value: String,
        /// Why it was refused.
        reason: String,
    },
    /// A handler or factory needs something the registry cannot give: an unregistered type, a lifetime
    /// mismatch, a captive dependency or a cycle. The message names the whole chain.
    #[error("{0}")]
    Dependency(String),
    /// A service's own configuration is invalid (an interval of zero, a cron expression that does not parse...).
    #[error("service `{service}`: {reason}")]
    InvalidService {
        /// The service at fault.
        service: String,
        /// What is wrong, naming the value.
        reason: String,
    },
}

/// A service failed to start, so the host stopped the services already started and did not run.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The service's start (or `starting`/`started` hook) returned an error or panicked.
    #[error("service `{service}` failed to start: {message}")]
    Failed {
        /// The service at fault.
        service: String,
        /// Its error or panic message.
        message: String,
    },
    /// The whole start did not finish within the startup timeout.
    #[error("start did not finish within the startup timeout of {timeout:?}; still starting: {pending:?}")]
    TimedOut {
        /// The startup timeout that elapsed.
        timeout: Duration,
        /// Services whose start had not finished.
        pending: Vec<String>,
    },
    /// A stop was requested (a signal, say) before the start finished.
    #[error("a stop was requested while the host was starting")]
    Interrupted,
}
