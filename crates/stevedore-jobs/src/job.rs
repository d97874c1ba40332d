//! What a job is: its kind, payload and the options it is enqueued with, and what the store keeps.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::JobError;

/// A job's id in its store (database-assigned, increasing).
pub type JobId = i64;

/// The queue used when a job names none.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a job gets unless it says otherwise (the first run included).
pub const DEFAULT_MAX_ATTEMPTS: u32 = 20;

/// A typed job: a serde payload with a stable kind name that workers dispatch on.
///
/// The kind is stored with each job, so renaming it orphans jobs already enqueued (they go
/// dead with "unknown kind", and can be retried once a worker knows the kind again).
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use stevedore_jobs::Job;
///
/// #[derive(Serialize, Deserialize)]
/// struct SendEmail {
///     to: String,
/// }
///
/// impl Job for SendEmail {
///     const KIND: &'static str = "send_email";
///     const QUEUE: &'static str = "email";
///     const MAX_ATTEMPTS: u32 = 5;
/// }
/// ```
pub trait Job: Serialize + DeserializeOwned + Send + 'static {
    /// Stable name of the job's kind, stored with each job.
    const KIND: &'static str;
    /// Queue the job goes to unless [`NewJob::queue`] says otherwise.
    const QUEUE: &'static str = DEFAULT_QUEUE;
    /// Attempts before the job is dead, unless [`NewJob::max_attempts`] says otherwise.
    const MAX_ATTEMPTS: u32 = DEFAULT_MAX_ATTEMPTS;
    /// Priority (lower runs first), unless [`NewJob::priority`] says otherwise.
    const PRIORITY: i16 = 0;
    /// Time one run may take before it is failed, unless [`NewJob::timeout`] says otherwise.
    /// `None`: the worker's default.
    const TIMEOUT: Option<Duration> = None;
}

/// A job ready to be enqueued: kind, JSON payload and options. Build one from a typed [`Job`]
/// with [`NewJob::new`], then adjust the options.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # use stevedore_jobs::{Job, NewJob};
/// # #[derive(Serialize, Deserialize)] struct Report { day: u32 }
/// # impl Job for Report { const KIND: &'static str = "report"; }
/// use std::time::Duration;
///
/// let job = NewJob::new(&Report { day: 3 })?
///     .delay(Duration::from_secs(60))
///     .priority(-1)
///     .unique_key("report:3");
/// # Ok::<(), stevedore_jobs::JobError>(())
/// ```
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub(crate) kind: String,
    pub(crate) queue: String,
    pub(crate) payload: String,
    pub(crate) priority: i16,
    pub(crate) run_at: Option<DateTime<Utc>>,
    pub(crate) delay: Option<Duration>,
    pub(crate) max_attempts: u32,
    pub(crate) timeout: Option<Duration>,
    pub(crate) unique_key: Option<String>,
}

impl NewJob {
    /// Serializes `job` as the payload and takes the defaults from its [`Job`] impl.
    pub fn new<J: Job>(job: &J) -> Result<Self, JobError> {
        let payload =
            serde_json::to_string(job).map_err(|source| JobError::Serialize { kind: J::KIND.to_string(), source })?;
        let mut new = Self::raw(J::KIND, payload);
        new.queue = J::QUEUE.to_string();
        new.max_attempts = J::MAX_ATTEMPTS.max(1);
        new.priority = J::PRIORITY;
        new.timeout = J::TIMEOUT;
        Ok(new)
    }

    /// A job from a kind and a payload that is already JSON text (for producers that do not
    /// share the Rust type). A payload that does not fit the worker's type makes the job dead
    /// at its first run, with the deserialization error.
    pub fn raw(kind: impl Into<String>, payload_json: impl Into<String>) -> Self {
        Self {
            kind: kind.into(),
            queue: DEFAULT_QUEUE.to_string(),
            payload: payload_json.into(),
            priority: 0,
            run_at: None,
            delay: None,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            timeout: None,
            unique_key: None,
        }
    }

    /// Queue to put the job on.
    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = queue.into();
        self
    }

    /// Priority: lower numbers run first among due jobs of a queue (default 0).
    pub fn priority(mut self, priority: i16) -> Self {
        self.priority = priority;
        self
    }

    /// Runs the job no earlier than `at`.
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self.delay = None;
        self
    }

    /// Runs the job no earlier than `delay` after it is inserted (measured on the database's
    /// clock for PostgreSQL).
    pub fn delay(mut self, delay: Duration) -> Self {
        self.delay = Some(delay);
        self.run_at = None;
        self
    }

    /// Attempts before the job is dead (at least 1).
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }

    /// Time one run may take before it is failed (and retried if attempts remain).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// At most one stored job has this key: enqueueing another is a no-op that returns `None`.
    /// The key is held until the job holding it is deleted by retention.
    pub fn unique_key(mut self, key: impl Into<String>) -> Self {
        self.unique_key = Some(key.into());
        self
    }

    /// The job's kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The payload as JSON text.
    pub fn payload_json(&self) -> &str {
        &self.payload
    }

    pub(crate) fn timeout_ms(&self) -> Option<i64> {
        self.timeout.map(duration_ms)
    }

    pub(crate) fn delay_ms(&self) -> i64 {
        self.delay.map(duration_ms).unwrap_or(0)
    }
}

pub(crate) fn duration_ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Waiting for its scheduled time or for a worker.
    Available,
    /// Leased by a worker that is running it.
    Running,
    /// Ran successfully.
    Completed,
    /// Failed its last attempt, or could not run at all (bad payload, unknown kind).
    Dead,
    /// Cancelled before it completed.
    Cancelled,
}

impl JobState {
    /// All states, in lifecycle order.
    pub const ALL: [JobState; 5] =
        [JobState::Available, JobState::Running, JobState::Completed, JobState::Dead, JobState::Cancelled];

    /// The name stored in the database.
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Available => "available",
            JobState::Running => "running",
            JobState::Completed => "completed",
            JobState::Dead => "dead",
            JobState::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for JobState {
    type Err = JobError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        JobState::ALL.into_iter().find(|state| state.as_str() == s).ok_or_else(|| JobError::UnknownState(s.to_string()))
    }
}

/// The error of one failed attempt, kept on the job for as long as it is stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttemptError {
    /// Which attempt failed (1 for the first run).
    pub attempt: u32,
    /// When it failed, in milliseconds since the Unix epoch.
    pub at: i64,
    /// What went wrong.
    pub error: String,
}

/// A stored job, as listed for operators and dashboards.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Id in the store.
    pub id: JobId,
    /// Kind the worker dispatches on.
    pub kind: String,
    /// Queue it belongs to.
    pub queue: String,
    /// Current state.
    pub state: JobState,
    /// Payload as JSON text.
    pub payload: String,
    /// Priority (lower runs first).
    pub priority: i16,
    /// Attempts started so far.
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// Per-run time limit, if the job has its own.
    pub timeout: Option<Duration>,
    /// Unique key, if any.
    pub unique_key: Option<String>,
    /// Earliest time it may run.
    pub scheduled_at: DateTime<Utc>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// When its last attempt started.
    pub attempted_at: Option<DateTime<Utc>>,
    /// When it reached completed, dead or cancelled.
    pub finished_at: Option<DateTime<Utc>>,
    /// Worker holding its lease while running.
    pub lease_owner: Option<String>,
    /// When that lease runs out unless renewed.
    pub lease_expires_at: Option<DateTime<Utc>>,
    /// The error of every failed attempt, oldest first.
    pub errors: Vec<AttemptError>,
}

/// A job leased to a worker by a fetch.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    /// Id in the store.
    pub id: JobId,
    /// Kind to dispatch on.
    pub kind: String,
    /// Queue it came from.
    pub queue: String,
    /// Payload as JSON text.
    pub payload: String,
    /// This attempt's number (1 for the first run).
    pub attempt: u32,
    /// Attempts allowed.
    pub max_attempts: u32,
    /// The job's own per-run time limit, if any.
    pub timeout: Option<Duration>,
}

/// Job counts of one queue, by state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    /// Queue name.
    pub queue: String,
    /// Whether workers are told not to fetch from it.
    pub paused: bool,
    /// Available and due now.
    pub available: u64,
    /// Available but scheduled for later (including retries waiting out their backoff).
    pub scheduled: u64,
    /// Running (leased).
    pub running: u64,
    /// Completed and not yet removed by retention.
    pub completed: u64,
    /// Dead letters.
    pub dead: u64,
    /// Cancelled.
    pub cancelled: u64,
}

impl QueueStats {
    /// Both stores' `stats`, from what they read: job counts by queue, state and whether they are
    /// due (`(queue, state, due, count)`), and each known queue's pause flag. A queue named by
    /// either shows up, in order of name.
    pub(crate) fn tally(
        counts: Vec<(String, String, bool, i64)>,
        pause_flags: Vec<(String, bool)>,
    ) -> Result<Vec<QueueStats>, JobError> {
        let mut by_queue: std::collections::BTreeMap<String, QueueStats> = Default::default();
        for (queue, state, due, count) in counts {
            let state = JobState::from_str(&state)?;
            by_queue.entry(queue.clone()).or_insert_with(|| QueueStats { queue, ..QueueStats::default() }).add(
                state,
                due,
                count.max(0) as u64,
            );
        }
        for (queue, paused) in pause_flags {
            by_queue.entry(queue.clone()).or_insert_with(|| QueueStats { queue, ..QueueStats::default() }).paused =
                paused;
        }
        Ok(by_queue.into_values().collect())
    }

    fn add(&mut self, state: JobState, due: bool, count: u64) {
        match state {
            JobState::Available if due => self.available += count,
            JobState::Available => self.scheduled += count,
            JobState::Running => self.running += count,
            JobState::Completed => self.completed += count,
            JobState::Dead => self.dead += count,
            JobState::Cancelled => self.cancelled += count,
        }
    }
}

/// Which jobs [`JobStore::list`](crate::JobStore::list) returns.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListQuery {
    /// Only jobs in this state.
    pub state: Option<JobState>,
    /// Only jobs of this queue.
    pub queue: Option<String>,
    /// Only jobs with an id greater than this (for paging: pass the last id seen).
    pub after_id: Option<JobId>,
    /// At most this many (0 means 100).
    pub limit: u32,
}

impl ListQuery {
    /// Jobs in `state`, first 100.
    pub fn state(state: JobState) -> Self {
        Self { state: Some(state), ..Self::default() }
    }

    pub(crate) fn effective_limit(&self) -> i64 {
        if self.limit == 0 { 100 } else { i64::from(self.limit) }
    }
}
