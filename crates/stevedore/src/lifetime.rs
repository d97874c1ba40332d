//! The application lifetime: await started / stopping / stopped, and request a stop, from anywhere.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where the host is in its life. Ordered: a later phase compares greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HostState {
    /// Services are being started.
    Starting,
    /// Every service has started.
    Started,
    /// The stop has begun (after the optional shutdown delay).
    Stopping,
    /// Every service has stopped or been abandoned.
    Stopped,
}

impl HostState {
    /// Lower-case name, as shown in logs, JSON and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            HostState::Starting => "starting",
            HostState::Started => "started",
            HostState::Stopping => "stopping",
            HostState::Stopped => "stopped",
        }
    }
}

/// Why the host stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopReason {
    /// An OS signal (SIGINT, SIGTERM, SIGQUIT).
    Signal(&'static str),
    /// [`AppLifetime::request_stop`] was called.
    Requested,
    /// A service failed under the `StopHost` policy (or ran out of restarts).
    ServiceFailed(String),
    /// A service failed to start.
    StartFailed(String),
}

/// A cheap, cloneable handle on the host's lifetime, for services and request handlers.
///
/// ```
/// # async fn demo(lifetime: stevedore::AppLifetime) {
/// if lifetime.started().await {
///     // every service is up
/// }
/// lifetime.request_stop(); // idempotent
/// lifetime.stopped().await;
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct AppLifetime {
    inner: Arc<LifetimeInner>,
}

#[derive(Debug)]
struct LifetimeInner {
    state: watch::Sender<HostState>,
    reached_started: AtomicBool,
    stop_requested: CancellationToken,
    reason: std::sync::Mutex<Option<StopReason>>,
    stop_deadline: std::sync::OnceLock<tokio::time::Instant>,
}

impl Default for AppLifetime {
    fn default() -> Self {
        Self::new()
    }
}

impl AppLifetime {
    /// A lifetime in the `Starting` state. The host makes one; tests may make their own.
    pub fn new() -> Self {
        AppLifetime {
            inner: Arc::new(LifetimeInner {
                state: watch::Sender::new(HostState::Starting),
                reached_started: AtomicBool::new(false),
                stop_requested: CancellationToken::new(),
                reason: std::sync::Mutex::new(None),
                stop_deadline: std::sync::OnceLock::new(),
            }),
        }
    }

    /// The current phase.
    pub fn state(&self) -> HostState {
        *self.inner.state.borrow()
    }

    /// Resolves when every service has started (true), or when the host stopped without ever
    /// reaching that point (false), so a waiter never hangs on a failed start.
    pub async fn started(&self) -> bool {
        self.wait_for(HostState::Started).await;
        self.inner.reached_started.load(Ordering::Acquire)
    }

    /// Resolves when the stop begins.
    pub async fn stopping(&self) {
        self.wait_for(HostState::Stopping).await
    }

    /// Resolves when every service has stopped.
    pub async fn stopped(&self) {
        self.wait_for(HostState::Stopped).await
    }

    /// Asks the host to stop. Idempotent: the first reason wins.
    pub fn request_stop(&self) {
        self.request_stop_because(StopReason::Requested)
    }

    /// True once a stop has been requested, even before the stop begins (during the shutdown delay).
    pub fn is_stop_requested(&self) -> bool {
        self.inner.stop_requested.is_cancelled()
    }

    /// Resolves as soon as a stop is requested (before the shutdown delay, unlike [`stopping`](Self::stopping)).
    pub async fn stop_requested(&self) {
        self.inner.stop_requested.cancelled().await
    }

    /// The reason of the first stop request, if any.
    pub fn stop_reason(&self) -> Option<StopReason> {
        self.inner.reason.lock().map(|r| r.clone()).unwrap_or(None)
    }

    /// When the shutdown budget runs out, once the stop has begun: services that drain work (queues)
    /// stop taking more in time to hand back the rest before the host abandons them.
    pub fn stop_deadline(&self) -> Option<tokio::time::Instant> {
        self.inner.stop_deadline.get().copied()
    }

    pub(crate) fn set_stop_deadline(&self, deadline: tokio::time::Instant) {
        let _ = self.inner.stop_deadline.set(deadline);
    }

    pub(crate) fn request_stop_because(&self, reason: StopReason) {
        if let Ok(mut slot) = self.inner.reason.lock()
            && slot.is_none()
        {
            *slot = Some(reason);
        }
        self.inner.stop_requested.cancel();
    }

    pub(crate) fn set_state(&self, state: HostState) {
        if state == HostState::Started {
            self.inner.reached_started.store(true, Ordering::Release);
        }
        self.inner.state.send_if_modified(|s| {
            if *s < state {
                *s = state;
                true
            } else {
                false
            }
        });
    }

    async fn wait_for(&self, state: HostState) {
        let mut rx = self.inner.state.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(|s| *s >= state).await;
    }
}
