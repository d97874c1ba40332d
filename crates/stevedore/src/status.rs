//! A cheap, cloneable view of every service's state, for health endpoints, metrics and the dashboard.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::lifetime::{AppLifetime, HostState};
use crate::scope::Container;
use crate::service::ContextParts;

/// The `metrics` histogram every finished run is recorded in, in seconds, labelled `service`.
///
/// Each service takes its handle from the process's `metrics` recorder at its first finished run,
/// so install your recorder before the host starts (`stevedore-web` installs its Prometheus
/// recorder in `build_web`); with no recorder the record costs next to nothing.
pub const RUN_DURATION_METRIC: &str = "stevedore_run_duration_seconds";

/// What a service is doing now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServiceState {
    /// Registered, not started yet.
    Registered,
    /// Its start is running.
    Starting,
    /// Started and working.
    Running,
    /// Failed and waiting for its restart backoff.
    Restarting,
    /// Its stop is running.
    Stopping,
    /// Stopped cleanly.
    Stopped,
    /// Its work finished on its own before the host stopped (start-up work, say).
    Completed,
    /// Failed and will not run again.
    Failed,
    /// Overran the shutdown budget and was abandoned.
    Abandoned,
}

impl ServiceState {
    /// Lower-case name, as shown in logs, JSON and the dashboard.
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceState::Registered => "registered",
            ServiceState::Starting => "starting",
            ServiceState::Running => "running",
            ServiceState::Restarting => "restarting",
            ServiceState::Stopping => "stopping",
            ServiceState::Stopped => "stopped",
            ServiceState::Completed => "completed",
            ServiceState::Failed => "failed",
            ServiceState::Abandoned => "abandoned",
        }
    }
}

/// How one run (a tick, a queued task, a job) ended.
///
/// A word wide, not a byte: a run's result moves through several futures, and beside a one-byte
/// tag the compiler copied seven bytes of padding in overlapping pieces, which stalled the CPU's
/// store forwarding on a quick queue's path (`BENCHMARKS.md`, sixth session).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u64)]
pub enum RunOutcome {
    /// It returned success.
    Succeeded,
    /// It returned an error or panicked.
    Failed,
    /// It exceeded its per-run timeout.
    TimedOut,
    /// The host's stop cancelled it.
    Cancelled,
}

impl RunOutcome {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            RunOutcome::Succeeded => "succeeded",
            RunOutcome::Failed => "failed",
            RunOutcome::TimedOut => "timed_out",
            RunOutcome::Cancelled => "cancelled",
        }
    }
}

/// Counters and timings of a service's runs (timers, cron, queues, consumers).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunStats {
    /// Runs started.
    pub started: u64,
    /// Runs that succeeded.
    pub succeeded: u64,
    /// Runs that failed, timed out or panicked.
    pub failed: u64,
    /// Ticks skipped because a run was still going (interval services).
    pub skipped: u64,
    /// Runs going on now.
    pub in_flight: u64,
    /// When the last run started.
    pub last_started: Option<SystemTime>,
    /// How long the last finished run took.
    pub last_duration: Option<Duration>,
    /// How the last finished run ended.
    pub last_outcome: Option<RunOutcome>,
    /// The last run error, if the last failing run had one.
    pub last_run_error: Option<String>,
    /// When the next run is due (timers and cron).
    pub next_run: Option<SystemTime>,
}

/// Depth and flow of a queue served by the service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    /// Items waiting.
    pub depth: u64,
    /// Items being processed.
    pub in_flight: u64,
    /// Items whose processing failed.
    pub failed: u64,
    /// Whether taking new items is paused.
    pub paused: bool,
}

/// A snapshot of one service.
#[derive(Debug, Clone)]
pub struct ServiceStatus {
    /// The service's unique name.
    pub name: String,
    /// What kind of service: `hosted`, `background`, `interval`, `cron`, `queue`, ...
    pub kind: &'static str,
    /// Its current state.
    pub state: ServiceState,
    /// Since when it is in that state.
    pub since: SystemTime,
    /// How many times it was restarted after a failure.
    pub restarts: u32,
    /// Its last failure, if any.
    pub last_error: Option<String>,
    /// Run counters (zero for services that have no runs).
    pub runs: RunStats,
    /// Queue figures, for services that serve a queue.
    pub queue: Option<QueueStats>,
    /// The declared heartbeat interval, if the service promised to beat.
    pub heartbeat_interval: Option<Duration>,
    /// How long ago the last heartbeat (or start) was, when it promised to beat.
    pub since_heartbeat: Option<Duration>,
    /// Whether the service can be triggered now (`run now` on the dashboard).
    pub can_trigger: bool,
    /// Whether the service can be paused and resumed.
    pub can_pause: bool,
}

impl ServiceStatus {
    /// False when the service promised a heartbeat and has not beaten within its interval, or when it
    /// failed or was abandoned.
    pub fn is_healthy(&self) -> bool {
        if matches!(self.state, ServiceState::Failed | ServiceState::Abandoned) {
            return false;
        }
        match (self.heartbeat_interval, self.since_heartbeat) {
            (Some(interval), Some(since)) if self.state == ServiceState::Running => since <= interval,
            _ => true,
        }
    }
}

/// Actions a service offers to operators (the dashboard's buttons, the CLI).
///
/// Implemented by timed services (trigger) and queues (pause, resume); other crates implement it for
/// their own services and attach it with [`StatusHandle::set_control`].
pub trait ServiceControl: Send + Sync + 'static {
    /// Run now, out of schedule. Returns false when the service cannot be triggered.
    fn trigger(&self) -> bool {
        false
    }
    /// Stop taking new work. Returns false when the service cannot be paused.
    fn pause(&self) -> bool {
        false
    }
    /// Resume taking work. Returns false when the service cannot be paused.
    fn resume(&self) -> bool {
        false
    }
    /// Whether [`trigger`](Self::trigger) does anything.
    fn can_trigger(&self) -> bool {
        false
    }
    /// Whether [`pause`](Self::pause) and [`resume`](Self::resume) do anything.
    fn can_pause(&self) -> bool {
        false
    }
}

/// An operator action could not be carried out.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// No service has that name.
    #[error("no service is named `{0}`")]
    UnknownService(String),
    /// The service does not offer that action.
    #[error("service `{service}` does not support `{action}`")]
    Unsupported {
        /// The service.
        service: String,
        /// The action asked for.
        action: &'static str,
    },
}

#[derive(Debug)]
struct Record {
    state: ServiceState,
    since: SystemTime,
    restarts: u32,
    last_error: Option<String>,
    /// Only services that run things (timers, queues, consumers) have runs to record. Theirs is
    /// made with the slot, so it sits right after it in memory, and a run touches it as if it were
    /// inline; an idle service pays one word for it instead of 140 bytes, which shows at thousands.
    runs: Option<Box<RunRecord>>,
    queue: Option<Box<QueueStats>>,
    /// Kept only for services that declared a heartbeat interval: nothing else reads it, and an idle
    /// service then costs no clock read per state change.
    last_beat: Option<Instant>,
}

impl Record {
    fn runs(&mut self) -> &mut RunRecord {
        self.runs.get_or_insert_with(Box::default)
    }
}

#[derive(Debug, Default)]
struct RunRecord {
    stats: RunStats,
    /// When the last run started, on the monotonic clock already read for the run; turned into
    /// wall-clock time only when a snapshot is taken, so a run pays one clock read, not two.
    last_start: Option<Instant>,
}

pub(crate) struct Slot {
    name: String,
    kind: &'static str,
    heartbeat_interval: Option<Duration>,
    record: Mutex<Record>,
    control: OnceLock<Arc<dyn ServiceControl>>,
    /// Resolved at the first finished run (an idle service never pays for it), then each run pays
    /// for one record and no key lookup.
    run_duration: OnceLock<metrics::Histogram>,
    /// When the next run is due, for timers that set it every tick: nanoseconds after `created`,
    /// plus one (0: not set). An atomic store per tick, where the record's lock and a wall-clock
    /// conversion would cost more at 10,000 timers; converted when a snapshot is taken.
    next_due: AtomicU64,
    created: Instant,
    /// The rest of the service's context (token, lifetime, registry), in the same allocation as
    /// its status: a [`ServiceContext`](crate::ServiceContext) is a handle to this slot.
    context: ContextParts,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot").field("name", &self.name).finish_non_exhaustive()
    }
}

impl Slot {
    fn record(&self) -> MutexGuard<'_, Record> {
        // A panic while holding this lock cannot leave a record half-written in a way that matters:
        // every write is a plain field store, so a poisoned lock is taken over as is.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn next_due(&self) -> Option<Instant> {
        match self.next_due.load(Ordering::Relaxed) {
            0 => None,
            n => Some(self.created + Duration::from_nanos(n - 1)),
        }
    }

    fn snapshot(&self) -> ServiceStatus {
        let r = self.record();
        let control = self.control.get();
        ServiceStatus {
            name: self.name.clone(),
            kind: self.kind,
            state: r.state,
            since: r.since,
            restarts: r.restarts,
            last_error: r.last_error.clone(),
            runs: {
                // Times kept on the host's clock become wall-clock times here, at one reading of each.
                let mut runs = r.runs.as_ref().map(|x| x.stats.clone()).unwrap_or_default();
                let (wall, now) = (SystemTime::now(), Instant::now());
                let to_wall = |at: Instant| if at >= now { wall + (at - now) } else { wall - (now - at) };
                runs.last_started = r.runs.as_ref().and_then(|x| x.last_start).map(to_wall);
                if let Some(due) = self.next_due() {
                    runs.next_run = Some(to_wall(due));
                }
                runs
            },
            queue: r.queue.as_deref().cloned(),
            heartbeat_interval: self.heartbeat_interval,
            since_heartbeat: self.heartbeat_interval.and(r.last_beat).map(|beat| beat.elapsed()),
            can_trigger: control.is_some_and(|c| c.can_trigger()),
            can_pause: control.is_some_and(|c| c.can_pause()),
        }
    }
}

/// The handle a service uses to report its state and runs. Cheap to clone.
///
/// ```
/// # fn demo(status: stevedore::StatusHandle) {
/// let run = status.run_started();
/// // ... do the work ...
/// status.run_finished(run, stevedore::RunOutcome::Succeeded, None);
/// # }
/// ```
#[derive(Clone, Debug)]
pub struct StatusHandle {
    slot: Arc<Slot>,
}

/// A run in progress, returned by [`StatusHandle::run_started`] and handed back when it ends.
#[derive(Debug)]
#[must_use = "hand it back to StatusHandle::run_finished"]
pub struct RunTicket {
    started: Instant,
}

/// Runs that ended and that the status view has not heard of yet: a busy sequential loop tallies
/// its quick runs here and [publishes](StatusHandle::publish) them together, one lock for many runs.
#[derive(Debug, Default)]
pub(crate) struct RunTally {
    succeeded: u64,
    failed: u64,
    cancelled: u64,
    /// The last run tallied; `None` when the tally is empty.
    last: Option<TalliedRun>,
    /// The error of the last failed run tallied (`Some(None)`: it failed without a message).
    last_run_error: Option<Option<String>>,
}

#[derive(Debug, Clone, Copy)]
struct TalliedRun {
    duration: Duration,
    outcome: RunOutcome,
}

impl RunTally {
    /// Adds a run that took `duration`.
    pub(crate) fn add(&mut self, duration: Duration, outcome: RunOutcome, error: Option<String>) {
        match outcome {
            RunOutcome::Succeeded => self.succeeded += 1,
            RunOutcome::Cancelled => self.cancelled += 1,
            RunOutcome::Failed | RunOutcome::TimedOut => {
                self.failed += 1;
                self.last_run_error = Some(error);
            }
        }
        self.last = Some(TalliedRun { duration, outcome });
    }

    /// Whether no run waits to be published.
    pub(crate) fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    /// How many runs wait to be published.
    pub(crate) fn len(&self) -> u64 {
        self.succeeded + self.failed + self.cancelled
    }
}

impl StatusHandle {
    /// `(wall, now)` is when the service was registered, on the wall clock and the host's clock:
    /// the host reads them once for all of its services.
    pub(crate) fn new(
        name: String,
        kind: &'static str,
        heartbeat_interval: Option<Duration>,
        (wall, now): (SystemTime, Instant),
        context: ContextParts,
    ) -> Self {
        // A plain service (or the host's own registry) has no runs; every other kind (interval,
        // cron, queue, jobs, consumer, ...) gets its run record now, beside the slot.
        let records_runs = !matches!(kind, "background" | "hosted" | "registry");
        StatusHandle {
            slot: Arc::new(Slot {
                name,
                kind,
                heartbeat_interval,
                record: Mutex::new(Record {
                    state: ServiceState::Registered,
                    since: wall,
                    restarts: 0,
                    last_error: None,
                    runs: records_runs.then(Box::default),
                    queue: None,
                    last_beat: heartbeat_interval.map(|_| now),
                }),
                control: OnceLock::new(),
                run_duration: OnceLock::new(),
                next_due: AtomicU64::new(0),
                created: now,
                context,
            }),
        }
    }

    /// A handle that belongs to no host, for tests and for code run outside a host.
    pub fn detached(name: impl Into<String>) -> Self {
        let context = ContextParts::detached(CancellationToken::new(), Container::empty());
        Self::detached_with(name.into(), context)
    }

    pub(crate) fn detached_with(name: String, context: ContextParts) -> Self {
        Self::new(name, "detached", None, (SystemTime::now(), Instant::now()), context)
    }

    pub(crate) fn context(&self) -> &ContextParts {
        &self.slot.context
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.slot.name
    }

    /// A snapshot of the service.
    pub fn snapshot(&self) -> ServiceStatus {
        self.slot.snapshot()
    }

    /// Records progress: a service that declared a heartbeat interval is unhealthy when it has not
    /// called this within the interval.
    pub fn heartbeat(&self) {
        if self.slot.heartbeat_interval.is_some() {
            self.slot.record().last_beat = Some(Instant::now());
        }
    }

    /// Records the start of a run.
    pub fn run_started(&self) -> RunTicket {
        self.run_started_at(Instant::now())
    }

    /// Records the start of a run that began at `now` (a clock reading the caller already has).
    pub(crate) fn run_started_at(&self, now: Instant) -> RunTicket {
        let mut r = self.slot.record();
        if self.slot.heartbeat_interval.is_some() {
            r.last_beat = Some(now);
        }
        let runs = r.runs();
        runs.stats.started += 1;
        runs.stats.in_flight += 1;
        runs.last_start = Some(now);
        RunTicket { started: now }
    }

    /// Records the end of a run and its outcome; `error` is kept as the last run error. The run's
    /// duration also goes to the [`RUN_DURATION_METRIC`] histogram.
    pub fn run_finished(&self, ticket: RunTicket, outcome: RunOutcome, error: Option<String>) {
        self.run_finished_at(ticket, outcome, error, Instant::now());
    }

    /// Records the end of a run at `now` (a clock reading the caller goes on using).
    pub(crate) fn run_finished_at(&self, ticket: RunTicket, outcome: RunOutcome, error: Option<String>, now: Instant) {
        let duration = now.saturating_duration_since(ticket.started);
        let mut r = self.slot.record();
        if self.slot.heartbeat_interval.is_some() {
            r.last_beat = Some(now);
        }
        let runs = &mut r.runs().stats;
        runs.in_flight = runs.in_flight.saturating_sub(1);
        runs.last_duration = Some(duration);
        runs.last_outcome = Some(outcome);
        match outcome {
            RunOutcome::Succeeded => runs.succeeded += 1,
            RunOutcome::Cancelled => {}
            RunOutcome::Failed | RunOutcome::TimedOut => {
                runs.failed += 1;
                runs.last_run_error = error;
            }
        }
        drop(r);
        self.record_duration(duration);
    }

    /// Puts one run's duration in the [`RUN_DURATION_METRIC`] histogram.
    pub(crate) fn record_duration(&self, duration: Duration) {
        let name = &self.slot.name;
        let histogram =
            self.slot.run_duration.get_or_init(|| metrics::histogram!(RUN_DURATION_METRIC, "service" => name.clone()));
        histogram.record(duration.as_secs_f64());
    }

    /// Publishes the runs tallied since the last call, under one lock, and empties the tally. The
    /// last of them started at `last_start`.
    pub(crate) fn publish(&self, tally: &mut RunTally, last_start: Instant) {
        let Some(last) = tally.last.take() else { return };
        let mut r = self.slot.record();
        if self.slot.heartbeat_interval.is_some() {
            r.last_beat = Some(last_start + last.duration);
        }
        let record = r.runs();
        record.last_start = Some(last_start);
        let runs = &mut record.stats;
        runs.started += tally.succeeded + tally.failed + tally.cancelled;
        runs.succeeded += tally.succeeded;
        runs.failed += tally.failed;
        runs.last_duration = Some(last.duration);
        runs.last_outcome = Some(last.outcome);
        if let Some(error) = tally.last_run_error.take() {
            runs.last_run_error = error;
        }
        (tally.succeeded, tally.failed, tally.cancelled) = (0, 0, 0);
    }

    /// Records a tick skipped because a run was still going.
    pub fn run_skipped(&self) {
        self.slot.record().runs().stats.skipped += 1;
    }

    /// Records when the next run is due.
    pub fn set_next_run(&self, next: Option<SystemTime>) {
        self.slot.next_due.store(0, Ordering::Relaxed);
        self.slot.record().runs().stats.next_run = next;
    }

    /// Records when the next run is due on the host's clock: no lock and no wall-clock read, for
    /// timers that set it at every tick.
    pub(crate) fn set_next_due(&self, at: Option<Instant>) {
        let encoded = match at {
            None => 0,
            Some(at) => {
                let nanos = at.saturating_duration_since(self.slot.created).as_nanos();
                u64::try_from(nanos).unwrap_or(u64::MAX - 1).saturating_add(1)
            }
        };
        self.slot.next_due.store(encoded, Ordering::Relaxed);
    }

    /// Records queue figures.
    pub fn set_queue(&self, queue: QueueStats) {
        match &mut self.slot.record().queue {
            Some(current) => **current = queue,
            slot => *slot = Some(Box::new(queue)),
        }
    }

    /// Updates queue figures in place (creating them when absent).
    pub fn update_queue(&self, f: impl FnOnce(&mut QueueStats)) {
        let mut r = self.slot.record();
        f(r.queue.get_or_insert_with(Box::default));
    }

    /// Attaches operator actions. Only the first call takes effect.
    pub fn set_control(&self, control: Arc<dyn ServiceControl>) {
        let _ = self.slot.control.set(control);
    }

    pub(crate) fn set_state(&self, state: ServiceState) {
        let mut r = self.slot.record();
        if r.state != state {
            r.state = state;
            r.since = SystemTime::now();
        }
        if state == ServiceState::Running && self.slot.heartbeat_interval.is_some() {
            r.last_beat = Some(Instant::now());
        }
    }

    /// Moves to `state` unless the service already ended (completed, failed, stopped or
    /// abandoned): one lock for what would otherwise be a read then a write. In a stop one by one
    /// the chain of services often runs ahead of the host, and a service that has stopped must not
    /// show as stopping again.
    pub(crate) fn set_state_unless_ended(&self, state: ServiceState) {
        let mut r = self.slot.record();
        let ended = matches!(
            r.state,
            ServiceState::Completed | ServiceState::Failed | ServiceState::Stopped | ServiceState::Abandoned
        );
        if r.state != state && !ended {
            r.state = state;
            r.since = SystemTime::now();
        }
    }

    /// Name, state and last error, for the run report, without a full snapshot.
    pub(crate) fn outcome(&self) -> (String, ServiceState, Option<String>) {
        let r = self.slot.record();
        (self.slot.name.clone(), r.state, r.last_error.clone())
    }

    pub(crate) fn set_failed(&self, state: ServiceState, error: String) {
        let mut r = self.slot.record();
        r.state = state;
        r.since = SystemTime::now();
        r.last_error = Some(error);
    }

    pub(crate) fn add_restart(&self) -> u32 {
        let mut r = self.slot.record();
        r.restarts += 1;
        r.restarts
    }

    fn control(&self) -> Option<&Arc<dyn ServiceControl>> {
        self.slot.control.get()
    }
}

/// Readiness of the whole host, as `/health/ready` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Readiness {
    /// True only when every service has started and the host is not stopping.
    pub ready: bool,
    /// The host's phase.
    pub host: HostState,
    /// Services that are not ready, with the reason.
    pub not_ready: Vec<(String, String)>,
}

/// A cheap, cloneable view of the host and every service.
///
/// ```
/// # async fn demo() -> Result<(), stevedore::BuildError> {
/// let host = stevedore::Host::builder()
///     .add(stevedore::ServiceSpec::from_fn("idle", |ctx| async move {
///         ctx.cancelled().await;
///         Ok::<_, std::convert::Infallible>(())
///     }))
///     .build()?;
/// let status = host.status();
/// for service in status.services() {
///     println!("{} is {}", service.name, service.state.as_str());
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct StatusView {
    slots: Arc<[StatusHandle]>,
    lifetime: AppLifetime,
}

impl StatusView {
    pub(crate) fn new(slots: Vec<StatusHandle>, lifetime: AppLifetime) -> Self {
        StatusView { slots: slots.into(), lifetime }
    }

    /// Snapshots of every service, in registration order.
    pub fn services(&self) -> Vec<ServiceStatus> {
        self.slots.iter().map(|s| s.snapshot()).collect()
    }

    /// A snapshot of one service.
    pub fn service(&self, name: &str) -> Option<ServiceStatus> {
        self.find(name).map(|s| s.snapshot())
    }

    /// The host's phase.
    pub fn host_state(&self) -> HostState {
        self.lifetime.state()
    }

    /// The host's lifetime handle.
    pub fn lifetime(&self) -> &AppLifetime {
        &self.lifetime
    }

    /// Ready when the host has started, is not stopping, and no service is failed, abandoned or
    /// silent past its heartbeat interval.
    pub fn readiness(&self) -> Readiness {
        let host = self.lifetime.state();
        let mut not_ready = Vec::new();
        if host != HostState::Started || self.lifetime.is_stop_requested() {
            let why = if self.lifetime.is_stop_requested() && host < HostState::Stopping {
                "stop requested".to_string()
            } else {
                format!("host is {}", host.as_str())
            };
            not_ready.push(("host".to_string(), why));
        }
        for s in self.services() {
            if !s.is_healthy() {
                let why = match s.state {
                    ServiceState::Failed | ServiceState::Abandoned => {
                        format!("{}: {}", s.state.as_str(), s.last_error.clone().unwrap_or_default())
                    }
                    _ => format!(
                        "no heartbeat for {:?} (declared interval {:?})",
                        s.since_heartbeat.unwrap_or_default(),
                        s.heartbeat_interval.unwrap_or_default()
                    ),
                };
                not_ready.push((s.name.clone(), why));
            } else if host == HostState::Started && matches!(s.state, ServiceState::Registered | ServiceState::Starting)
            {
                not_ready.push((s.name.clone(), s.state.as_str().to_string()));
            }
        }
        Readiness { ready: not_ready.is_empty(), host, not_ready }
    }

    /// Runs a timed service now.
    pub fn trigger(&self, name: &str) -> Result<(), ControlError> {
        self.act(name, "trigger", |c| c.trigger())
    }

    /// Pauses a queue.
    pub fn pause(&self, name: &str) -> Result<(), ControlError> {
        self.act(name, "pause", |c| c.pause())
    }

    /// Resumes a paused queue.
    pub fn resume(&self, name: &str) -> Result<(), ControlError> {
        self.act(name, "resume", |c| c.resume())
    }

    fn act(
        &self,
        name: &str,
        action: &'static str,
        f: impl FnOnce(&Arc<dyn ServiceControl>) -> bool,
    ) -> Result<(), ControlError> {
        let slot = self.find(name).ok_or_else(|| ControlError::UnknownService(name.to_string()))?;
        match slot.control() {
            Some(c) if f(c) => Ok(()),
            _ => Err(ControlError::Unsupported { service: name.to_string(), action }),
        }
    }

    fn find(&self, name: &str) -> Option<&StatusHandle> {
        self.slots.iter().find(|s| s.name() == name)
    }
}
