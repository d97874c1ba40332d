//! What every timed, queued and streamed run shares: its record in the status view, its tracing span,
//! and the "run now" trigger.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use std::task::Poll;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;
use tracing::Instrument;

use crate::handler::RunResult;
use crate::service::ServiceContext;
use crate::status::{RunOutcome, RunTally, ServiceControl};

/// Runs the future `work()` makes (a [`run_handler`](crate::handler::run_handler) call, say) as one
/// recorded run: counted in the status view with its start, duration, outcome and error, inside
/// one `run` span, and logged when it does not succeed.
///
/// The future is made here, in place, not passed in: a run's future is hundreds of bytes, and each
/// move of it is a copy into memory the tick has not touched yet.
pub(crate) async fn recorded<F>(ctx: &ServiceContext, cause: &'static str, work: impl FnOnce() -> F) -> RunOutcome
where
    F: Future<Output = RunResult>,
{
    recorded_from(ctx, cause, Instant::now(), work).await.0
}

/// [`recorded`], for a run that started at `start`, a clock reading the caller already had; returns
/// the outcome and when the run ended, for the caller to go on with. A timer at every tick saves
/// two clock readings out of four this way.
pub(crate) async fn recorded_from<F>(
    ctx: &ServiceContext,
    cause: &'static str,
    start: Instant,
    work: impl FnOnce() -> F,
) -> (RunOutcome, Instant)
where
    F: Future<Output = RunResult>,
{
    let ticket = ctx.status().run_started_at(start);
    // The level check first: with no subscriber interested in INFO, the span macro would still
    // format its fields for the `log` crate (tracing's `log` feature, which sqlx and others turn
    // on), a cost every run of a busy queue felt.
    let span = if tracing::level_enabled!(tracing::Level::INFO) {
        tracing::info_span!("run", service = ctx.name(), cause)
    } else {
        tracing::Span::none()
    };
    // A disabled span (no subscriber wants it) costs nothing to skip; busy queues feel the wrapper.
    // Either way the run's future has one place in this one.
    let work = std::pin::pin!(work());
    let result = if span.is_disabled() { work.await } else { work.instrument(span.clone()).await };
    warn_unless_succeeded(ctx, Some(&span), &result);
    let end = Instant::now();
    ctx.status().run_finished_at(ticket, result.outcome, result.error, end);
    (result.outcome, end)
}

/// Warns of a run that did not succeed, in its span if it has one. (A run without one passes
/// `None`, not a `Span::none()`, whose drop checks the `log` crate's level: 30 of a quick queue
/// task's 900 instructions.)
fn warn_unless_succeeded(ctx: &ServiceContext, span: Option<&tracing::Span>, result: &RunResult) {
    if result.outcome != RunOutcome::Succeeded {
        let error = result.error.as_deref().unwrap_or("");
        let outcome = result.outcome.as_str();
        match span.filter(|span| !span.is_disabled()) {
            Some(span) => tracing::warn!(parent: span, outcome, error, "run did not succeed"),
            // With no run span to carry it, the warning names the service itself.
            None => tracing::warn!(service = ctx.name(), outcome, error, "run did not succeed"),
        }
    }
}

/// Records the runs of a loop that runs one thing at a time (a sequential queue), cheaply when it
/// is busy.
///
/// A run that ends at its first poll, as a quick task does, is tallied here and published with the
/// others under one lock, and one clock reading serves as its end and the next run's start. A run
/// that has to wait is published at once, with everything tallied before it, so the status view
/// shows it in flight. The loop calls [`idle`](Self::idle) before it waits for work and
/// [`publish`](Self::publish) whenever [`publish_due`](Self::publish_due) says so, so the view lags
/// a busy loop by at most a few milliseconds and an idle one not at all.
pub(crate) struct SequentialRuns<'a> {
    ctx: &'a ServiceContext,
    tally: RunTally,
    /// When the first run of the tally started.
    tally_began: Option<Tick>,
    /// When the last run of the tally started.
    last_start: Option<Tick>,
    /// The last run's end, while nothing has been awaited since: the next run's start.
    last_end: Option<Tick>,
}

/// Quick runs are timed on the CPU's time-stamp counter: a reading costs about a third of the
/// monotonic clock's, which a queue of quick tasks feels (falls back to the OS clock where the
/// counter is not reliable). Times go onto the host's clock only when the tally is published.
type Tick = quanta::Instant;

/// A counter reading on the host's clock: now, less the time since the reading.
fn host_time_of(tick: Tick) -> Instant {
    let ago = Tick::now().duration_since(tick);
    let now = Instant::now();
    now.checked_sub(ago).unwrap_or(now)
}

/// A busy loop publishes at least this often...
const PUBLISH_AFTER: Duration = Duration::from_millis(5);
/// ...and after at most this many runs.
const PUBLISH_RUNS: u64 = 1024;

impl<'a> SequentialRuns<'a> {
    pub(crate) fn new(ctx: &'a ServiceContext) -> Self {
        SequentialRuns { ctx, tally: RunTally::default(), tally_began: None, last_start: None, last_end: None }
    }

    /// Runs the future `work()` makes as one recorded run (see [`recorded`]). `on_wait` is called
    /// if the run has to wait, and what it returns is dropped when the run ends: an in-flight
    /// count, say. (The future is made here, in place: moving a run's future costs a quick run.)
    pub(crate) async fn run<F, G>(
        &mut self,
        cause: &'static str,
        work: impl FnOnce() -> F,
        on_wait: impl FnOnce() -> G,
    ) -> RunOutcome
    where
        F: Future<Output = RunResult>,
    {
        if tracing::level_enabled!(tracing::Level::INFO) {
            // Someone listens for run spans: each run is recorded on its own.
            self.publish();
            let _waiting = on_wait();
            return recorded(self.ctx, cause, work).await;
        }
        let start = self.last_end.take().unwrap_or_else(Tick::now);
        let mut work = std::pin::pin!(work());
        let first = std::future::poll_fn(|cx| Poll::Ready(work.as_mut().poll(cx))).await;
        let Poll::Ready(result) = first else {
            self.publish();
            let _waiting = on_wait();
            let ticket = self.ctx.status().run_started_at(host_time_of(start));
            let result = work.await;
            warn_unless_succeeded(self.ctx, None, &result);
            self.ctx.status().run_finished(ticket, result.outcome, result.error);
            return result.outcome;
        };
        let end = Tick::now();
        self.last_end = Some(end);
        warn_unless_succeeded(self.ctx, None, &result);
        let duration = end.duration_since(start);
        self.ctx.status().record_duration(duration);
        self.tally_began.get_or_insert(start);
        self.last_start = Some(start);
        self.tally.add(duration, result.outcome, result.error);
        result.outcome
    }

    /// True when the tally is old or long enough to be published.
    pub(crate) fn publish_due(&self) -> bool {
        self.tally.len() >= PUBLISH_RUNS
            || match (self.tally_began, self.last_end) {
                (Some(began), Some(end)) => end.duration_since(began) >= PUBLISH_AFTER,
                _ => false,
            }
    }

    /// Publishes the tallied runs to the status view.
    pub(crate) fn publish(&mut self) {
        self.tally_began = None;
        if let (false, Some(start)) = (self.tally.is_empty(), self.last_start) {
            self.ctx.status().publish(&mut self.tally, host_time_of(start));
        }
    }

    /// The loop is about to wait for work: publishes the tally, and forgets the last run's end so
    /// that the next run reads the clock.
    pub(crate) fn idle(&mut self) {
        self.publish();
        self.last_end = None;
    }
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
    /// The one waiter (the service's task); lock-free, unlike a `Notify`.
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
        take_flag(&self.inner.pending)
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

/// Lowers `flag` and says whether it was up; a plain read first, so that a flag that is down (the
/// usual case, at every tick) costs no locked instruction.
fn take_flag(flag: &AtomicBool) -> bool {
    flag.load(Ordering::Acquire) && flag.swap(false, Ordering::AcqRel)
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

/// `at + by`, or a moment some thirty years after `at` where that sum is past what the clock can
/// hold: a user's delay of `Duration::MAX` means "not in this process's life", not a panic.
pub(crate) fn instant_after(at: Instant, by: Duration) -> Instant {
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    at.checked_add(by).or_else(|| at.checked_add(FAR)).unwrap_or(at)
}

/// A random delay in `0..=max`, for jitter.
pub(crate) fn jitter(max: Duration) -> Duration {
    if max.is_zero() {
        return Duration::ZERO;
    }
    // Not `mul_f64`, which panics where rounding takes a product of a huge `max` past the maximum.
    Duration::try_from_secs_f64(max.as_secs_f64() * rand::random::<f64>()).map_or(max, |d| d.min(max))
}
