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
//! - **Phase.** Services started together with the same period fall due together, every period,
//!   and the last of them waits for all the others to start (on two cores, 10,000 such timers
//!   read a p99 lateness of 1.4-1.55 ms, bare tokio loops 1.7-3.9 ms).
//!   [`spread_phase`](IntervalService::spread_phase) moves a service's grid by an offset within
//!   the period worked out from its name, so such services spread over it: the same 10,000 read
//!   a p99 of 1.2 ms, but wake the runtime every millisecond instead of once a period, which costs
//!   about three times the CPU time (`BENCHMARKS.md`, thirteenth session). Spread phases to keep
//!   a burst of work (not of timers) off a shared database, say. The offset is the same at every
//!   start, and unlike jitter it moves the grid once rather than each run. The `10_many_timers`
//!   example shows 2,000 pollers both ways.
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
//!
//! # How runs start
//!
//! A service does not keep a timer of its own. The interval services of a runtime share one driver
//! task per worker thread, which keeps their next runs in time order and, when one falls due, polls
//! the run's first step itself, up to its first `await` that has to wait. A run that ends there,
//! as a poll that finds nothing to do usually does, never wakes its service's task; one that waits
//! is handed to the service's own task and finishes there, so it holds up no other service. At
//! 10,000 services every 100 ms this takes 0.45-0.64x the CPU time of as many bare
//! `tokio::time::interval` loops, and keeps the p99 lateness of timers all started together at
//! 1.4-1.55 ms, where the bare loops read 1.7-3.9 ms (`BENCHMARKS.md`, thirteenth session).
//!
//! The driver runs due runs for 250 µs at most before it yields, so a burst of them does not hold
//! a worker thread away from other tasks (requests, say) for long. A run's first step still runs on
//! the driver, so a handler that computes before its first `await` delays the services due after
//! it: a service whose runs do that for more than 1 ms, twice in a row, starts every later run
//! in its own task instead. (Long computation belongs in `spawn_blocking` in any case.)

mod driver;

use std::future::Future;
use std::marker::PhantomData;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use futures_util::task::AtomicWaker;
use tokio::time::Instant;
use tracing::Instrument;

use self::driver::{Registration, Timed};
use crate::error::BoxError;
use crate::handler::{Handler, run_handler};
use crate::runs::{StoppedOnDrop, TriggerHandle, instant_after, jitter, recorded_from};
use crate::service::{BackgroundService, ServiceContext, ServiceSpec};
use crate::status::StatusHandle;

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

impl<H: Handler<Args>, Args: 'static> IntervalService<H, Args> {
    /// The plan for the first run of a service started at `start`.
    fn first_plan(&self, start: Instant) -> Plan {
        let at = instant_after(start, self.initial_delay.saturating_add(self.phase()));
        let due = match self.cadence {
            Cadence::FixedRate(_) => Tick::new(at, self.jitter).due,
            Cadence::FixedDelay(_) => instant_after(at, jitter(self.jitter)),
        };
        Plan::on(Tick { at, due })
    }

    /// A copy for a running service to keep beside its state (not `Clone`: two services with one
    /// name and one trigger are not something to offer).
    fn copy(&self) -> Self {
        IntervalService {
            name: self.name.clone(),
            cadence: self.cadence,
            initial_delay: self.initial_delay,
            spread_phase: self.spread_phase,
            overlap: self.overlap,
            jitter: self.jitter,
            timeout: self.timeout,
            handler: self.handler.clone(),
            trigger: self.trigger.clone(),
            _args: PhantomData,
        }
    }

    /// A plan fell due at `now`: why the run starts, and the grid tick to go on from after it.
    fn begin(&self, plan: Plan, now: Instant, status: &StatusHandle) -> (Cause, Tick) {
        match self.cadence {
            Cadence::FixedRate(_) if plan.catch_up => (Cause::CatchUp, plan.tick),
            Cadence::FixedRate(period) => {
                // Woken late: ticks that fell due meanwhile fold into this run.
                let late = ticks_until(instant_after(plan.tick.at, period), period, now);
                for _ in 0..late.min(1_000_000) {
                    status.run_skipped();
                }
                (Cause::Tick, Tick::new(advance(plan.tick.at, period, late + 1), self.jitter))
            }
            Cadence::FixedDelay(_) => (Cause::Tick, plan.tick),
        }
    }

    /// The plan after a run that ended at `end`, `next` being the grid tick it went on from.
    fn after_run(&self, next: Tick, end: Instant, ctx: &ServiceContext) -> Plan {
        let next = match self.cadence {
            Cadence::FixedRate(period) if next.due <= end && !ctx.is_cancelled() => {
                // Ticks that fell due during the run: skipped, or one kept.
                let missed = ticks_until(next.at, period, end);
                let skipped = match self.overlap {
                    Overlap::Skip => missed,
                    Overlap::RunOnce => missed.saturating_sub(1),
                };
                for _ in 0..skipped.min(1_000_000) {
                    ctx.status().run_skipped();
                }
                let next = Tick::new(advance(next.at, period, missed), self.jitter);
                if self.overlap == Overlap::RunOnce {
                    return Plan { run_at: end, tick: next, catch_up: true };
                }
                next
            }
            Cadence::FixedRate(_) => next,
            Cadence::FixedDelay(delay) => {
                let due = instant_after(end, delay.saturating_add(jitter(self.jitter)));
                Tick { at: due, due }
            }
        };
        ctx.status().set_next_due(Some(next.due));
        Plan::on(next)
    }
}

/// When a service's next run is due, and what its policies need to know then.
#[derive(Clone, Copy)]
struct Plan {
    /// When the run starts.
    run_at: Instant,
    /// The grid tick the policies go on from (fixed rate). Its `due` is `run_at`, except for a
    /// catch-up run ([`Overlap::RunOnce`]), which runs at once for a tick still ahead.
    tick: Tick,
    catch_up: bool,
}

impl Plan {
    fn on(tick: Tick) -> Self {
        Plan { run_at: tick.due, tick, catch_up: false }
    }
}

/// A run's future, boxed so that the driver can hand it to its service's task; its output is when
/// the run ended.
type RunFuture = std::pin::Pin<Box<dyn Future<Output = Instant> + Send>>;

/// One running interval service, as its runtime's tick driver and its own task share it.
///
/// The service's settings and handler are copied in, so that a tick finds everything it reads
/// in one allocation: at thousands of services each further one is a cache miss per tick.
struct Slot<H, Args> {
    service: IntervalService<H, Args>,
    ctx: ServiceContext,
    state: Mutex<SlotState>,
    /// How many runs in a row held the driver past [`HEAVY_FIRST_STEP`] with their first step;
    /// at [`HEAVY_IN_A_ROW`] each later run starts in the service's own task. Only the driver
    /// touches it.
    slow_first_steps: AtomicU8,
    /// The service's own task, waiting for a run handed to it, a trigger or the stop.
    task: AtomicWaker,
    /// The span the service's task runs in, for the runs the driver starts to run in too.
    span: tracing::Span,
}

struct SlotState {
    phase: Phase,
    /// The service's next plan while the driver holds it (`scheduled`); otherwise the tick a run
    /// in the service's task goes on from when it ends.
    plan: Plan,
    /// Whether the driver holds the plan. (A plan that falls due during a run in the service's
    /// task is given back, not run: the task applies the overlap policy when the run ends.)
    scheduled: bool,
    /// A run the driver handed to the service's task, until the task takes it.
    handed: Option<RunFuture>,
    /// The service's task waits for the driver to finish a run's first step.
    wake_when_idle: bool,
}

/// Who is running the service now.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// No one.
    Idle,
    /// The driver, polling a run's first step.
    Driver,
    /// The service's own task: a run handed to it, or one it started itself (a trigger).
    Task,
    /// The service has stopped; its plan is dropped when it falls due.
    Stopped,
}

/// A run's first step longer than this, [`HEAVY_IN_A_ROW`] runs in a row, moves the service's runs
/// off the driver: a handler that computes for long before its first await would otherwise hold
/// up every service due after it. (Two in a row, so that one preemption of the thread does not.)
const HEAVY_FIRST_STEP: Duration = Duration::from_millis(1);
const HEAVY_IN_A_ROW: u8 = 2;

impl<H: Handler<Args>, Args: 'static> Slot<H, Args> {
    fn lock(&self) -> MutexGuard<'_, SlotState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The run's future, recorded in the status view; its output is when it ended.
    fn run(self: &Arc<Self>, cause: Cause, start: Instant) -> RunFuture {
        let slot = self.clone();
        let run = async move {
            let service = &slot.service;
            let work = || run_handler(&slot.ctx, &service.handler, service.timeout);
            recorded_from(&slot.ctx, cause.as_str(), start, work).await.1
        };
        // A disabled span (no subscriber wants it) costs nothing to leave out.
        if self.span.is_disabled() { Box::pin(run) } else { Box::pin(run.instrument(self.span.clone())) }
    }

    /// Counts a run's first step that held the driver too long; any other resets the count.
    fn time_first_step(&self, took: Duration) {
        let slow = &self.slow_first_steps;
        slow.store(if took > HEAVY_FIRST_STEP { slow.load(Ordering::Relaxed) + 1 } else { 0 }, Ordering::Relaxed);
    }

    /// A run in the service's task ended at `end`: the service is idle again, and, unless the
    /// driver still holds its plan, the next one goes to the driver.
    fn task_run_ended(self: &Arc<Self>, end: Instant, registration: &Registration) {
        let mut state = self.lock();
        state.phase = Phase::Idle;
        if state.scheduled {
            return;
        }
        let next = state.plan.tick;
        let at = self.plan_after(&mut state, next, end);
        drop(state);
        registration.schedule(at, self.clone());
    }

    /// Works out the plan after a run that went on from `next` and ended at `end`, keeps it for
    /// the driver, and says when it is due.
    fn plan_after(&self, state: &mut SlotState, next: Tick, end: Instant) -> Instant {
        state.plan = self.service.after_run(next, end, &self.ctx);
        state.scheduled = true;
        state.plan.run_at
    }
}

impl<H: Handler<Args>, Args: 'static> Timed for Slot<H, Args> {
    fn fire(self: Arc<Self>, clock: &mut Instant) -> Option<Instant> {
        let now = *clock;
        let plan = {
            let mut state = self.lock();
            state.scheduled = false;
            if state.phase != Phase::Idle {
                // During a run in the service's task, the plan stays for the task to go on from;
                // after the stop, it is dropped.
                return None;
            }
            state.phase = Phase::Driver;
            state.plan
        };
        let (cause, next) = self.service.begin(plan, now, self.ctx.status());
        let mut run = self.run(cause, now);
        if self.slow_first_steps.load(Ordering::Relaxed) < HEAVY_IN_A_ROW {
            // A run's first step, here: with the no-op waker, for the task it is handed to polls it
            // again at once, and a future registers its waker anew at every poll.
            let mut cx = Context::from_waker(Waker::noop());
            if let Poll::Ready(end) = run.as_mut().poll(&mut cx) {
                *clock = end;
                self.time_first_step(end.saturating_duration_since(now));
                let mut state = self.lock();
                state.phase = Phase::Idle;
                let at = self.plan_after(&mut state, next, end);
                if std::mem::take(&mut state.wake_when_idle) {
                    self.task.wake();
                }
                return Some(at);
            }
            *clock = Instant::now();
            self.time_first_step(clock.saturating_duration_since(now));
        }
        let mut state = self.lock();
        state.phase = Phase::Task;
        state.plan = Plan::on(next);
        state.handed = Some(run);
        state.wake_when_idle = false;
        drop(state);
        self.task.wake();
        None
    }
}

/// What the service's own task does next.
enum Step {
    /// Drive a run the driver handed over.
    Drive(RunFuture),
    /// Run now, for a trigger.
    Trigger,
    /// Stop: the service is off the driver.
    Stop,
}

impl<H: Handler<Args>, Args: 'static> BackgroundService for Runner<H, Args> {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        let service = &self.0;
        service.trigger.set_stopped(false);
        let _stopped = StoppedOnDrop(&service.trigger);
        let first = service.first_plan(Instant::now());
        ctx.status().set_next_due(Some(first.run_at));
        let slot = Arc::new(Slot {
            service: service.copy(),
            ctx: ctx.clone(),
            state: Mutex::new(SlotState {
                phase: Phase::Idle,
                plan: first,
                scheduled: true,
                handed: None,
                wake_when_idle: false,
            }),
            slow_first_steps: AtomicU8::new(0),
            task: AtomicWaker::new(),
            span: tracing::Span::current(),
        });
        let registration = driver::register(slot.clone(), first.run_at);
        let cancelled = ctx.token().cancelled();
        tokio::pin!(cancelled);
        let mut stopping = false;
        loop {
            let step = std::future::poll_fn(|cx| {
                slot.task.register(cx.waker());
                let mut state = slot.lock();
                if let Some(run) = state.handed.take() {
                    return Poll::Ready(Step::Drive(run));
                }
                stopping = stopping || cancelled.as_mut().poll(cx).is_ready();
                let wanted = if stopping {
                    Step::Stop
                } else if std::pin::pin!(service.trigger.notified()).poll(cx).is_ready() {
                    Step::Trigger
                } else {
                    return Poll::Pending;
                };
                match state.phase {
                    Phase::Idle if matches!(wanted, Step::Stop) => state.phase = Phase::Stopped,
                    Phase::Idle => state.phase = Phase::Task,
                    // The driver is polling a run's first step: wait for it to end.
                    Phase::Driver => {
                        state.wake_when_idle = true;
                        return Poll::Pending;
                    }
                    Phase::Task | Phase::Stopped => {}
                }
                Poll::Ready(wanted)
            })
            .await;
            match step {
                Step::Drive(run) => {
                    let end = run.await;
                    slot.task_run_ended(end, &registration);
                }
                Step::Trigger => {
                    service.trigger.take();
                    let end = slot.run(Cause::Trigger, Instant::now()).await;
                    slot.task_run_ended(end, &registration);
                }
                Step::Stop => break,
            }
        }
        drop(registration);
        ctx.status().set_next_due(None);
        Ok(())
    }
}
