//! Cron services: a handler run on a cron schedule, to the second, in a time zone.
//!
//! Expressions are parsed by the `croner` crate: five fields (minute precision) or six with seconds
//! first, plus an optional year; `L`, `W`, `#`, names (`MON`, `JAN`) and nicknames (`@daily`) work.
//! An expression or zone that does not parse fails [`HostBuilder::build`](crate::HostBuilder::build)
//! with an error naming the service and the expression: caught at start-up, not at the first fire.
//!
//! ```no_run
//! use stevedore::cron::CronService;
//! use stevedore::{BoxError, Host};
//!
//! async fn nightly_report() -> Result<(), BoxError> {
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let job = CronService::new("nightly-report", "0 30 2 * * *", nightly_report).zone("Europe/Berlin");
//!     for at in job.next_fire_times(3) {
//!         println!("next: {at}");
//!     }
//!     let host = Host::builder().add(job.into_spec()).build().expect("valid host");
//!     host.run().await.exit();
//! }
//! ```
//!
//! # Policies
//!
//! - **Daylight saving.** Fire times are computed in the service's zone (UTC by default) with
//!   croner's rules, which follow Vixie cron: in the spring-forward gap, a job at a fixed time that
//!   does not exist that day (`30 2 * * *` in Berlin) runs once at the first instant after the gap
//!   (03:00); jobs with a wildcard or step in the time fields skip the missing hour. In the fall-back
//!   overlap, a fixed-time job runs once, at the first pass; wildcard jobs run in both passes, since
//!   both are real time.
//! - **Overlap.** Runs never overlap. A fire time that passes while a run is going is skipped or kept
//!   once, by [`Overlap`], as for interval services (default: skipped, counted in `runs.skipped`).
//! - **Missed fires.** The service sleeps in steps of at most 10 s and re-reads the wall clock each
//!   time, so a clock set forward, a suspended machine or a starved process delays a fire by at most
//!   a step. Fire times missed while not running fold into one run at wake-up and are counted as
//!   skipped: never a burst. A clock set back does not repeat fires: the next fire is always after the
//!   last one.
//! - **Timeout, stop, run now:** as for [interval services](crate::interval).

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use tokio::time::Instant;

use crate::error::BoxError;
use crate::handler::{Handler, run_handler};
use crate::interval::Overlap;
use crate::runs::{StoppedOnDrop, TriggerHandle, recorded};
use crate::service::{BackgroundService, ServiceContext, ServiceSpec};

/// The longest single sleep before the wall clock is read again.
const MAX_STEP: Duration = Duration::from_secs(10);

/// A cron expression or a time zone that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ScheduleError {
    /// The expression does not parse.
    #[error("cron expression `{expression}` is invalid: {reason}")]
    Expression {
        /// The expression as given.
        expression: String,
        /// What the parser said.
        reason: String,
    },
    /// The time zone is not an IANA zone name.
    #[error(
        "time zone `{zone}` (for cron expression `{expression}`) is not a known IANA zone name such as `Europe/Berlin`"
    )]
    Zone {
        /// The zone as given.
        zone: String,
        /// The expression it was for.
        expression: String,
    },
}

/// A parsed cron expression in a time zone: computes fire times.
///
/// ```
/// use chrono::{TimeZone, Utc};
/// use stevedore::cron::CronSchedule;
///
/// let every_15s = CronSchedule::parse("*/15 * * * * *", "UTC").unwrap();
/// let from = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
/// let next: Vec<_> = every_15s.upcoming(from, 2).iter().map(|t| t.to_rfc3339()).collect();
/// assert_eq!(next, ["2026-01-01T00:00:15+00:00", "2026-01-01T00:00:30+00:00"]);
/// ```
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expression: String,
    zone: Tz,
    cron: croner::Cron,
}

impl CronSchedule {
    /// Parses `expression` (5 fields, or 6 with seconds first) for the IANA zone `zone`.
    pub fn parse(expression: &str, zone: &str) -> Result<Self, ScheduleError> {
        let tz: Tz = zone
            .trim()
            .parse()
            .map_err(|_| ScheduleError::Zone { zone: zone.to_string(), expression: expression.to_string() })?;
        Self::parse_in(expression, tz)
    }

    /// Parses `expression` for a zone already parsed.
    pub fn parse_in(expression: &str, zone: Tz) -> Result<Self, ScheduleError> {
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| ScheduleError::Expression { expression: expression.to_string(), reason: e.to_string() })?;
        Ok(CronSchedule { expression: expression.to_string(), zone, cron })
    }

    /// The expression as given.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The zone fire times are computed in.
    pub fn zone(&self) -> Tz {
        self.zone
    }

    /// The first fire time strictly after `after`, or `None` when there is none (a past year, say).
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Tz>> {
        self.cron.find_next_occurrence(&after.with_timezone(&self.zone), false).ok()
    }

    /// The next `n` fire times strictly after `after`.
    pub fn upcoming(&self, after: DateTime<Utc>, n: usize) -> Vec<DateTime<Tz>> {
        let mut out = Vec::with_capacity(n.min(1024));
        let mut from = after;
        while out.len() < n {
            let Some(next) = self.next_after(from) else { break };
            from = next.with_timezone(&Utc);
            out.push(next);
        }
        out
    }

    /// How many fire times fall in `(after, until]`, counting at most `cap`.
    fn count_between(&self, after: DateTime<Utc>, until: DateTime<Utc>, cap: u64) -> u64 {
        let mut n = 0;
        let mut from = after;
        while n < cap {
            match self.next_after(from) {
                Some(t) if t.with_timezone(&Utc) <= until => {
                    n += 1;
                    from = t.with_timezone(&Utc);
                }
                _ => break,
            }
        }
        n
    }
}

/// Where a cron service reads the time: the system clock, or (for tests and simulations) a clock that
/// starts at a chosen instant and advances with tokio's clock, which tests pause and advance at will.
#[derive(Debug, Clone, Default)]
pub struct WallClock {
    anchor: Option<(DateTime<Utc>, Instant)>,
}

impl WallClock {
    /// The system clock (the default).
    pub fn system() -> Self {
        WallClock { anchor: None }
    }

    /// A clock that reads `start` now and then advances with tokio's clock.
    ///
    /// ```
    /// # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
    /// use chrono::{TimeZone, Utc};
    /// let start = Utc.with_ymd_and_hms(2026, 3, 29, 0, 0, 0).unwrap();
    /// let clock = stevedore::cron::WallClock::starting_at(start);
    /// tokio::time::sleep(std::time::Duration::from_secs(60)).await;
    /// assert_eq!(clock.now(), start + chrono::Duration::seconds(60));
    /// # }
    /// ```
    pub fn starting_at(start: DateTime<Utc>) -> Self {
        WallClock { anchor: Some((start, Instant::now())) }
    }

    /// The time now.
    pub fn now(&self) -> DateTime<Utc> {
        match self.anchor {
            None => Utc::now(),
            Some((wall, at)) => {
                let elapsed = chrono::Duration::from_std(at.elapsed()).unwrap_or(chrono::Duration::MAX);
                wall.checked_add_signed(elapsed).unwrap_or(DateTime::<Utc>::MAX_UTC)
            }
        }
    }
}

/// A handler run on a cron schedule; see the [module docs](self) for every policy.
pub struct CronService<H, Args> {
    name: String,
    schedule: Result<CronSchedule, ScheduleError>,
    overlap: Overlap,
    timeout: Option<Duration>,
    clock: WallClock,
    handler: H,
    trigger: TriggerHandle,
    _args: PhantomData<fn(Args)>,
}

impl<H, Args> std::fmt::Debug for CronService<H, Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CronService")
            .field("name", &self.name)
            .field("schedule", &self.schedule)
            .field("overlap", &self.overlap)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl<H, Args> CronService<H, Args>
where
    H: Handler<Args>,
    Args: 'static,
{
    /// Runs `handler` at every fire time of `expression`, in UTC until [`zone`](Self::zone) says
    /// otherwise. An invalid expression is reported by the host's build.
    pub fn new(name: impl Into<String>, expression: &str, handler: H) -> Self {
        CronService {
            name: name.into(),
            schedule: CronSchedule::parse_in(expression, Tz::UTC),
            overlap: Overlap::default(),
            timeout: None,
            clock: WallClock::system(),
            handler,
            trigger: TriggerHandle::default(),
            _args: PhantomData,
        }
    }

    /// Computes fire times in the IANA zone `zone` (`Europe/Berlin`, `America/New_York`); an unknown
    /// zone is reported by the host's build.
    pub fn zone(mut self, zone: &str) -> Self {
        self.schedule = match self.schedule {
            Ok(s) => CronSchedule::parse(&s.expression, zone),
            Err(ScheduleError::Expression { expression, reason }) => {
                Err(ScheduleError::Expression { expression, reason })
            }
            Err(ScheduleError::Zone { expression, .. }) => CronSchedule::parse(&expression, zone),
        };
        self
    }

    /// What to do with fire times that pass during a run (default [`Overlap::Skip`]).
    pub fn overlap(mut self, overlap: Overlap) -> Self {
        self.overlap = overlap;
        self
    }

    /// Bounds each run; a run past it is cancelled and recorded as timed out.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// Reads the time from `clock` instead of the system clock (for tests and simulations).
    pub fn clock(mut self, clock: WallClock) -> Self {
        self.clock = clock;
        self
    }

    /// The parsed schedule, or why it is invalid.
    pub fn schedule(&self) -> Result<&CronSchedule, &ScheduleError> {
        self.schedule.as_ref()
    }

    /// The next `n` fire times from now, in the service's zone (empty when the schedule is invalid).
    pub fn next_fire_times(&self, n: usize) -> Vec<DateTime<Tz>> {
        match &self.schedule {
            Ok(s) => s.upcoming(self.clock.now(), n),
            Err(_) => Vec::new(),
        }
    }

    /// A handle to run the service now, out of schedule.
    pub fn trigger_handle(&self) -> TriggerHandle {
        self.trigger.clone()
    }

    /// The service to register with [`HostBuilder::add`](crate::HostBuilder::add).
    pub fn into_spec(self) -> ServiceSpec {
        let name = self.name.clone();
        let problem = self.schedule.as_ref().err().map(|e| e.to_string());
        let trigger = self.trigger.clone();
        let mut spec = ServiceSpec::background(name, Runner(Arc::new(self)))
            .kind("cron")
            .control(Arc::new(trigger))
            .needs(H::dependencies());
        if let Some(reason) = problem {
            spec = spec.invalid(reason);
        }
        spec
    }
}

impl<H: Handler<Args>, Args: 'static> From<CronService<H, Args>> for ServiceSpec {
    fn from(service: CronService<H, Args>) -> Self {
        service.into_spec()
    }
}

struct Runner<H, Args>(Arc<CronService<H, Args>>);

enum Wake {
    Fire,
    Trigger,
    Stop,
}

impl<H: Handler<Args>, Args: 'static> Runner<H, Args> {
    /// Sleeps until `fire` by the wall clock, in bounded steps, or until a trigger or the stop.
    async fn wait_for(&self, ctx: &ServiceContext, fire: Option<DateTime<Utc>>) -> Wake {
        let svc = &self.0;
        loop {
            let step = match fire {
                Some(fire) => {
                    let now = svc.clock.now();
                    if now >= fire {
                        return Wake::Fire;
                    }
                    let left = (fire - now).to_std().unwrap_or(Duration::ZERO);
                    // Round up to tokio's millisecond timer so a sub-millisecond rest is not a busy loop.
                    let left = Duration::from_millis(left.as_nanos().div_ceil(1_000_000) as u64);
                    left.min(MAX_STEP)
                }
                None => MAX_STEP,
            };
            tokio::select! {
                biased;
                _ = ctx.cancelled() => return Wake::Stop,
                _ = tokio::time::sleep(step) => {}
                _ = svc.trigger.notified() => if svc.trigger.take() { return Wake::Trigger },
            }
        }
    }
}

impl<H: Handler<Args>, Args: 'static> BackgroundService for Runner<H, Args> {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        let svc = &self.0;
        let schedule = svc.schedule.clone()?;
        svc.trigger.set_stopped(false);
        let _stopped = StoppedOnDrop(&svc.trigger);
        let status = ctx.status();
        let skip = |n: u64| {
            for _ in 0..n {
                status.run_skipped();
            }
        };
        // Fires are strictly after `last`.
        let mut last = svc.clock.now();
        let mut catch_up = false;
        loop {
            let fire = schedule.next_after(last).map(|t| t.with_timezone(&Utc));
            let cause = if std::mem::take(&mut catch_up) {
                "catch-up"
            } else if svc.trigger.take() {
                "trigger"
            } else {
                status.set_next_run(fire.map(std::time::SystemTime::from));
                match self.wait_for(&ctx, fire).await {
                    Wake::Stop => break,
                    Wake::Trigger => "trigger",
                    Wake::Fire => {
                        let (fire, now) = (fire.unwrap_or(last), svc.clock.now());
                        // Woken late: fires that passed meanwhile fold into this run.
                        skip(schedule.count_between(fire, now, 1_000_000));
                        last = fire.max(now);
                        "tick"
                    }
                }
            };
            if ctx.is_cancelled() {
                break;
            }
            recorded(&ctx, cause, || run_handler(&ctx, &svc.handler, svc.timeout)).await;
            if ctx.is_cancelled() {
                break;
            }
            let now = svc.clock.now();
            let missed = schedule.count_between(last, now, 1_000_000);
            if missed > 0 {
                match svc.overlap {
                    Overlap::Skip => skip(missed),
                    Overlap::RunOnce => {
                        catch_up = true;
                        skip(missed - 1);
                    }
                }
                last = now;
            }
        }
        status.set_next_run(None);
        Ok(())
    }
}
