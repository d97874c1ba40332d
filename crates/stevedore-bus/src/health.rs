//! Connection status of a relay or consumer, readable by the host.

use std::sync::Arc;

use tokio::sync::watch;

/// Where a relay or consumer stands with its broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    /// Not connected yet.
    Starting,
    /// Connected and working.
    Connected,
    /// The broker went away or refused us; retrying with backoff.
    Reconnecting {
        /// Consecutive failed attempts so far.
        attempt: u32,
        /// The last error, for the health report.
        error: String,
    },
    /// Stopping: no new work is taken, in-flight work finishes.
    Draining,
    /// Stopped.
    Stopped,
}

/// A cheap, clonable view of a [`Status`] that a host health check can read while the service
/// runs.
///
/// ```
/// use stevedore_bus::{Health, Status};
/// let health = Health::new();
/// assert_eq!(health.status(), Status::Starting);
/// assert!(!health.is_healthy());
/// ```
#[derive(Debug, Clone)]
pub struct Health {
    tx: Arc<watch::Sender<Status>>,
}

impl Health {
    /// A health handle in the [`Status::Starting`] state.
    pub fn new() -> Self {
        Self { tx: Arc::new(watch::channel(Status::Starting).0) }
    }

    /// The current status.
    pub fn status(&self) -> Status {
        self.tx.borrow().clone()
    }

    /// True while connected.
    pub fn is_healthy(&self) -> bool {
        matches!(*self.tx.borrow(), Status::Connected)
    }

    /// A receiver that is notified on every change.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.tx.subscribe()
    }

    pub(crate) fn set(&self, status: Status) {
        self.tx.send_if_modified(|s| {
            if *s == status {
                false
            } else {
                *s = status;
                true
            }
        });
    }
}

impl Default for Health {
    fn default() -> Self {
        Self::new()
    }
}
