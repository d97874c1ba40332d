//! Interval services: a handler run every period, at a fixed rate or with a fixed delay between runs.
//!
//! The article's timed service (`SyncEmployees` every 60 s, first run at start) without the flaws of
//! the .NET samples: runs never overlap, missed ticks never come as a burst, and each run gets its own
//! scope, span, timeout and status record.
//!
//! ```no_run
//! use std::time::Duration;
//! use stevedore::interval::IntervalService;
//! use stevedore::{BoxError, CancellationToken, Host};
//!
//! async fn sync_employees(stop: CancellationToken) -> Result<(), BoxError> {
//!     // fetch, compare, write; give up early when `stop` is cancelled
//!     let _ = stop;
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let timer = IntervalService::fixed_rate("sync-employees", Duration::from_secs(60), sync_employees)
//!         .initial_delay(Duration::ZERO) // the article's `TimeSpan.Zero`: first run at start
//!         .timeout(Duration::from_secs(50));
//!     let run_now = timer.trigger_handle(); // hand to an admin endpoint, say
//!     let host = Host::builder().add(timer.into_spec()).build().expect("valid host");
//!     # let _ = run_now;
//!     host.run().await.exit();
//! }
//! ```
//!
//! # Policies
//!
//! - **Schedule.** [`fixed_rate`](IntervalService::fixed_rate) runs on a grid,
//!   `start + initial_delay + k * period`, whatever each run takes. [`fixed_delay`](IntervalService::fixed_delay) waits the
//!   period after each run ends, so it can neither overlap nor miss a tick.
//! - **Initial delay.** Zero by default: the first run starts with the service (the article's
//!   `TimeSpan.Zero`). Set one with [`initial_delay`](IntervalService::initial_delay).
//! - **Phase.** Services started together with the same period fall due together, every period: a
//!   thousand of them are a thousand wake-ups in one millisecond, and the last waits for all the
//!   others (on two cores, 10,000 such timers read a p99 lateness of 3-8 ms, bare tokio loops as
//!   much). [`spread_phase`](IntervalService::spread_phase) moves a service's grid by an offset
//!   within the period worked out from its name, so such services spread over it (the same 10,000:
//!   p99 1.8 ms, bare loops given the same offsets 1.7 ms; `BENCHMARKS.md`). The offset is the
//!   same at every start, and unlike jitter it moves the grid once rather than each run. The
//!   `10_many_timers` example shows 2,000 pollers both ways.
//! - **Overlap.** Runs never overlap. A tick that falls while a run is still going is, by
//!   [`Overlap`]: skipped ([`Overlap::Skip`], the default: the next run is the next tick on the grid
//!   after the run ends), or kept once ([`Overlap::RunOnce`]: one run starts as soon as the long run
//!   ends, however many ticks fell during it, then the grid resumes). Skipped ticks are counted in the
//!   status view (`runs.skipped`).
//! - **Missed ticks while not running.** When the service wakes late for a tick (the process was
//!   stopped with SIGSTOP, the runtime was starved), every tick that fell due meanwhile is folded into
//!   the one run it wakes for, and counted as skipped: never a burst. Time the machine spends suspended
//!   does not count at all: tokio's clock is monotonic, so the schedule simply resumes after a resume.
//! - **Jitter.** [`jitter`](IntervalService::jitter) delays each run by a random share of up to the
//!   given maximum, drawn afresh for every tick, the first included. With a fixed rate it never moves
//!   the grid, so runs do not drift; it must be shorter than the period.
//! - **Timeout.** [`timeout`](IntervalService::timeout) bounds each run; a run past it is cancelled and
//!   recorded as timed out.
//! - **Stop.** When the host stops, the service takes no more ticks; a run in progress sees its
//!   `CancellationToken` (or `ServiceContext`) cancelled and is awaited within the host's shutdown
//!   budget.
//! - **Run now.** [`TriggerHandle::trigger`] (also the dashboard's "run now") starts a run at once; one
//!   asked for during a run starts when that run ends. It does not move the schedule.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::error::BoxError;
use crate::handler::{Handler, run_handler};
use crate::runs::{StopWatch, StoppedOnDrop, TriggerHandle, Woken, instant_after, jitter, recorded_from, wait};
use crate::service::{BackgroundService, ServiceContext, ServiceSpec};

/// What to do with ticks that fall while a run is still going (fixed rate only).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Overlap {
    /// Skip them; the next run is the next tick after the run ends. The default.
    #[default]
    Skip,
    /// Keep one: a run starts as soon as the long run ends, then the schedule resumes.
    RunOnce,
}

/// Fixed rate or fixed delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cadence {
    /// Runs start every period on a fixed grid.
    FixedRate(Duration),
    /// Each run starts a period after the previous one ended.
    FixedDelay(Duration),
}

/// A handler run on an interval; see the [module docs](self) for every policy.
pub struct IntervalService<H, Args> {
    name: String,
    cadence: Cadence,
    initial_delay: Duration,
    /// Whether the grid is moved by the name's offset: see [`spread_phase`](IntervalService::spread_phase).
    /// (The offset is worked out at the start, not kept, so the struct keeps its size: where a
    /// timer's data lies moves a tick's cost; `BENCHMARKS.md`, ninth and tenth sessions.)
    spread_phase: bool,
    overlap: Overlap,
    jitter: Duration,
    timeout: Option<Duration>,
    handler: H,
    trigger: TriggerHandle,
    _args: PhantomData<fn(Args)>,
}

impl<H, Args> std::fmt::Debug for IntervalService<H, Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalService")
            .field("name", &self.name)
            .field("cadence", &self.cadence)
            .field("initial_delay", &self.initial_delay)
            .field("spread_phase", &self.spread_phase)
            .field("overlap", &self.overlap)
            .field("jitter", &self.jitter)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<H, Args> IntervalService<H, Args>
where
    H: Handler<Args>,
    Args: 'static,
{
    fn new(name: impl Into<String>, cadence: Cadence, handler: H) -> Self {
        IntervalService {
            name: name.into(),
            cadence,
            initial_delay: Duration::ZERO,
            spread_phase: false,
            overlap: Overlap::default(),
            jitter: Duration::ZERO,
            timeout: None,
            handler,
            trigger: TriggerHandle::default(),
            _args: PhantomData,
        }
    }

    /// Runs `handler` every `period`, on a fixed grid from the start; see [`Overlap`] for long runs.
    ///
    /// ```
    /// # use std::time::Duration;
    /// let timer = stevedore::interval::IntervalService::fixed_rate("heartbeat", Duration::from_secs(5), || async {
    ///     Ok::<_, stevedore::BoxError>(())
    /// });
    /// let spec: stevedore::ServiceSpec = timer.into_spec();
    /// # let _ = spec;
    /// ```
    pub fn fixed_rate(name: impl Into<String>, period: Duration, handler: H) -> Self {
        Self::new(name, Cadence::FixedRate(period), handler)
    }

    /// Runs `handler`, waits `delay` after it ends, and again.
    pub fn fixed_delay(name: impl Into<String>, delay: Duration, handler: H) -> Self {
        Self::new(name, Cadence::FixedDelay(delay), handler)
    }

    /// The wait before the first run (default zero: run at start).
    pub fn initial_delay(mut self, delay: Duration) -> Self {
        self.initial_delay = delay;
        self
    }

    /// Moves the service's schedule by an offset below the period, worked out from its name, so
    /// that services with the same period do not all fall due in the same moment (see the
    /// [module docs](self#policies)). The first run comes at the initial delay plus the offset.
    ///
    /// The offset depends on the name and the period alone: it is the same at every start and on
    /// every machine, and [`phase`](Self::phase) tells it.
    ///
    /// ```
    /// # use std::time::Duration;
    /// use stevedore::interval::IntervalService;
    /// let noop = || async { Ok::<_, stevedore::BoxError>(()) };
    /// let a = IntervalService::fixed_rate("poll-a", Duration::from_secs(10), noop).spread_phase();
    /// let b = IntervalService::fixed_rate("poll-b", Duration::from_secs(10), noop).spread_phase();
    /// assert!(a.phase() < Duration::from_secs(10));
    /// assert_ne!(a.phase(), b.phase());
    /// ```
    pub fn spread_phase(mut self) -> Self {
        self.spread_phase = true;
        self
    }

    /// The offset [`spread_phase`](Self::spread_phase) gives the schedule (zero without it).
    pub fn phase(&self) -> Duration {
        let (Cadence::FixedRate(period) | Cadence::FixedDelay(period)) = self.cadence;
        if self.spread_phase { phase_within(&self.name, period) } else { Duration::ZERO }
    }

    /// What to do with ticks that fall during a run (default [`Overlap::Skip`]).
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Delays each run by a random amount up to `max`; with a fixed rate it must be below the period.
    pub fn jitter(mut self, max: Duration) -> Self {
        self.jitter = max;
        self
    }

    /// Bounds each run; a run past it is cancelled and recorded as timed out.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// A handle to run the service now, out of schedule.
    pub fn trigger_handle(&self) -> TriggerHandle {
        self.trigger.clone()
    }

    fn problem(&self) -> Option<String> {
        let period = match self.cadence {
            Cadence::FixedRate(p) | Cadence::FixedDelay(p) => p,
        };
        if period.is_zero() {
            return Some("interval of zero: give a period above zero".into());
        }
        if let Cadence::FixedRate(p) = self.cadence
            && self.jitter >= p
        {
            return Some(format!("jitter of {:?} is not below the period of {p:?}", self.jitter));
        }
        None
    }

    /// The service to register with [`HostBuilder::add`](crate::HostBuilder::add). An invalid
    /// configuration (a zero period, jitter not below a fixed rate's period) makes the host's build
    /// fail, naming the service.
    pub fn into_spec(self) -> ServiceSpec {
        let name = self.name.clone();
        let problem = self.problem();
        let trigger = self.trigger.clone();
        let mut spec = ServiceSpec::background(name, Runner(Arc::new(self)))
            .kind("interval")
            .control(Arc::new(trigger))
            .needs(H::dependencies());
        if let Some(reason) = problem {
            spec = spec.invalid(reason);
        }
        spec
    }
}

impl<H: Handler<Args>, Args: 'static> From<IntervalService<H, Args>> for ServiceSpec {
    fn from(service: IntervalService<H, Args>) -> Self {
        service.into_spec()
    }
}

struct Runner<H, Args>(Arc<IntervalService<H, Args>>);

/// Why a run starts, as shown in its span.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Cause {
    Tick,
    CatchUp,
    Trigger,
}

impl Cause {
    fn as_str(self) -> &'static str {
        match self {
            Cause::Tick => "tick",
            Cause::CatchUp => "catch-up",
            Cause::Trigger => "trigger",
        }
    }
}

/// The next tick on the grid and when, with its jitter, it is due.
#[derive(Clone, Copy)]
struct Tick {
    at: Instant,
    due: Instant,
}

impl Tick {
    fn new(at: Instant, max_jitter: Duration) -> Self {
        Tick { at, due: instant_after(at, jitter(max_jitter)) }
    }
}

/// An offset below `period` for the name, spread evenly over the period as names vary.
///
/// FNV-1a, whose output is fixed by its definition (std's hashers may change between Rust
/// releases, and the offset has to stay the same at every start), then a SplitMix64 finish, so
/// that names that differ in one character land far apart; the hash scales into the period
/// with a multiply and a shift.
fn phase_within(name: &str, period: Duration) -> Duration {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in name.bytes() {
        h = (h ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^= h >> 31;
    let period = u64::try_from(period.as_nanos()).unwrap_or(u64::MAX);
    let nanos = (u128::from(h) * u128::from(period)) >> 64;
    Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
}

/// How many ticks of `period` from `first` (included) are at or before `now`.
fn ticks_until(first: Instant, period: Duration, now: Instant) -> u64 {
    if now < first {
        return 0;
    }
    let elapsed = (now - first).as_nanos();
    (elapsed / period.as_nanos().max(1)) as u64 + 1
}

fn advance(at: Instant, period: Duration, n: u64) -> Instant {
    let n = u32::try_from(n).unwrap_or(u32::MAX);
    instant_after(at, period.saturating_mul(n))
}

impl<H: Handler<Args>, Args: 'static> BackgroundService for Runner<H, Args> {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        // The settings themselves, not the `Arc` around them: a tick then reads them with one load
        // from this future's state instead of two dependent ones.
        let svc: &IntervalService<H, Args> = &self.0;
        svc.trigger.set_stopped(false);
        let _stopped = StoppedOnDrop(&svc.trigger);
        let status = ctx.status();
        let start = Instant::now();
        // One cancellation waiter and one timer for the service's life, re-armed each tick: creating
        // and dropping them per tick takes locks, which shows at thousands of timers. The waiter is
        // polled only when the stop has fired (see `wait`).
        let cancelled = ctx.token().cancelled();
        tokio::pin!(cancelled);
        let mut watch = StopWatch::default();
        // Boxed, not pinned in this (large) future: the timer wheel walks every timer due at a
        // tick, and small timers allocated side by side as the services start make that walk touch
        // far less memory than timers a task's size apart (a third of the wheel's cost at 10,000).
        let mut sleep = Box::pin(tokio::time::sleep_until(start));
        match svc.cadence {
            Cadence::FixedRate(period) => {
                let first = instant_after(start, svc.initial_delay.saturating_add(svc.phase()));
                let mut next = Tick::new(first, svc.jitter);
                let mut catch_up = false;
                loop {
                    let cause = if std::mem::take(&mut catch_up) {
                        Cause::CatchUp
                    } else if svc.trigger.take() {
                        Cause::Trigger
                    } else {
                        status.set_next_due(Some(next.due));
                        if sleep.deadline() != next.due {
                            sleep.as_mut().reset(next.due);
                        }
                        match wait(sleep.as_mut(), cancelled.as_mut(), &svc.trigger, &mut watch).await {
                            Woken::Due => Cause::Tick,
                            Woken::Stop => break,
                            Woken::Trigger => Cause::Trigger,
                        }
                    };
                    let now = Instant::now();
                    if cause == Cause::Tick {
                        // Woken late: ticks that fell due meanwhile fold into this run.
                        let late = ticks_until(instant_after(next.at, period), period, now);
                        for _ in 0..late.min(1_000_000) {
                            status.run_skipped();
                        }
                        next = Tick::new(advance(next.at, period, late + 1), svc.jitter);
                    }
                    let work = || run_handler(&ctx, &svc.handler, svc.timeout);
                    let (_, now) = recorded_from(&ctx, cause.as_str(), now, work).await;
                    // Ticks that fell due during the run: skipped, or one kept (unless stopping).
                    if next.due <= now && !ctx.is_cancelled() {
                        let missed = ticks_until(next.at, period, now);
                        let skipped = match svc.overlap {
                            Overlap::Skip => missed,
                            Overlap::RunOnce => {
                                catch_up = true;
                                missed.saturating_sub(1)
                            }
                        };
                        for _ in 0..skipped.min(1_000_000) {
                            status.run_skipped();
                        }
                        next = Tick::new(advance(next.at, period, missed), svc.jitter);
                    }
                }
            }
            Cadence::FixedDelay(delay) => {
                let mut due = instant_after(
                    start,
                    svc.initial_delay.saturating_add(svc.phase()).saturating_add(jitter(svc.jitter)),
                );
                loop {
                    let cause = if svc.trigger.take() {
                        Cause::Trigger
                    } else {
                        status.set_next_due(Some(due));
                        if sleep.deadline() != due {
                            sleep.as_mut().reset(due);
                        }
                        match wait(sleep.as_mut(), cancelled.as_mut(), &svc.trigger, &mut watch).await {
                            Woken::Due => Cause::Tick,
                            Woken::Stop => break,
                            Woken::Trigger => Cause::Trigger,
                        }
                    };
                    let work = || run_handler(&ctx, &svc.handler, svc.timeout);
                    let (_, ended) = recorded_from(&ctx, cause.as_str(), Instant::now(), work).await;
                    due = instant_after(ended, delay.saturating_add(jitter(svc.jitter)));
                }
            }
        }
        status.set_next_due(None);
        Ok(())
    }
}
