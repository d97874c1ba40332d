//! What every timed, queued and streamed run shares: its record in the status view, its tracing span,
//! and the "run now" trigger.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::task::Poll;

use futures_util::task::AtomicWaker;
use tracing::Instrument;

use crate::handler::RunResult;
use crate::service::ServiceContext;
use crate::status::{RunOutcome, ServiceControl};

/// Runs `work` (a [`run_handler`](crate::handler::run_handler) call, say) as one recorded run: counted
/// in the status view with its start, duration, outcome and error, inside one `run` span, and
/// logged when it does not succeed.
pub(crate) async fn recorded<F>(ctx: &ServiceContext, cause: &'static str, work: F) -> RunOutcome
where
    F: Future<Output = RunResult>,
{
    let ticket = ctx.status().run_started();
    // The level check first: with no subscriber interested in INFO, the span macro would still
    // format its fields for the `log` crate (tracing's `log` feature, which sqlx and others turn
    // on), a cost every run of a busy queue felt.
    let span = if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::info_span!("run", service = ctx.name(), cause)
    } else {
        tracing::Span::none()
    };
    // A disabled span (no subscriber wants it) costs nothing to skip; busy queues feel the wrapper.
    let result = if span.is_disabled() { work.await } else { work.instrument(span.clone()).await };
    match result.outcome {
        RunOutcome::Succeeded => {}
        outcome => {
            let error = result.error.as_deref().unwrap_or("");
            tracing::warn!(parent: &span, outcome = outcome.as_str(), error, "run did not succeed");
        }
    }
    ctx.status().run_finished(ticket, result.outcome, result.error);
    result.outcome
}

/// A handle to run a timed service now, out of schedule (the dashboard's "run now").
///
/// A trigger while a run is going is kept once: the triggered run starts as soon as the current one
/// ends, and several triggers meanwhile still make one run. A trigger does not move the schedule.
/// Before the service starts, a trigger is kept for its first moment; once it has stopped,
/// [`trigger`](Self::trigger) returns false.
///
/// ```
/// # use std::time::Duration;
/// use stevedore::interval::IntervalService;
/// let timer = IntervalService::fixed_rate("report", Duration::from_secs(3600), || async {
///     Ok::<_, stevedore::BoxError>(())
/// });
/// let handle = timer.trigger_handle();
/// assert!(handle.trigger()); // runs at once when the host has started
/// ```
#[derive(Clone, Debug, Default)]
pub struct TriggerHandle {
    inner: Arc<TriggerInner>,
}

#[derive(Debug, Default)]
struct TriggerInner {
    pending: AtomicBool,
    stopped: AtomicBool,
    /// The one waiter (the service's loop); lock-free, unlike a `Notify`, which matters at 10,000 timers.
    waker: AtomicWaker,
}

impl TriggerHandle {
    /// Asks for a run now. False once the service has stopped.
    pub fn trigger(&self) -> bool {
        if self.inner.stopped.load(Ordering::Acquire) {
            return false;
        }
        self.inner.pending.store(true, Ordering::Release);
        self.inner.waker.wake();
        true
    }

    /// Takes a pending trigger.
    pub(crate) fn take(&self) -> bool {
        self.inner.pending.load(Ordering::Acquire) && self.inner.pending.swap(false, Ordering::AcqRel)
    }

    /// Resolves when a trigger is pending (take it with [`take`](Self::take)).
    pub(crate) fn notified(&self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| {
            if self.inner.pending.load(Ordering::Acquire) {
                return Poll::Ready(());
            }
            self.inner.waker.register(cx.waker());
            if self.inner.pending.load(Ordering::Acquire) { Poll::Ready(()) } else { Poll::Pending }
        })
    }

    pub(crate) fn set_stopped(&self, stopped: bool) {
        self.inner.stopped.store(stopped, Ordering::Release);
    }
}

impl ServiceControl for TriggerHandle {
    fn trigger(&self) -> bool {
        TriggerHandle::trigger(self)
    }
    fn can_trigger(&self) -> bool {
        !self.inner.stopped.load(Ordering::Acquire)
    }
}

/// Marks the trigger stopped when the service's loop ends, however it ends.
pub(crate) struct StoppedOnDrop<'a>(pub(crate) &'a TriggerHandle);

impl Drop for StoppedOnDrop<'_> {
    fn drop(&mut self) {
        self.0.set_stopped(true);
    }
}

/// A random delay in `0..=max`, for jitter.
pub(crate) fn jitter(max: Duration) -> Duration {
    if max.is_zero() { Duration::ZERO } else { max.mul_f64(rand::random::<f64>()) }
}
