//! The store interface shared by SQLite and PostgreSQL, and the pieces both use.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::watch;

use crate::error::JobError;
use crate::job::{ClaimedJob, JobId, JobRecord, ListQuery, NewJob, QueueStats};

pub mod any;
pub mod postgres;
pub mod sqlite;

/// A worker's hold on the jobs it fetched: who holds them and for how long without a heartbeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// Unique id of the holding worker (one per worker run).
    pub owner: String,
    /// How long the lease lasts unless renewed; a crashed worker's jobs return after this.
    pub ttl: Duration,
}

/// How a run ended, as the worker records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// The handler succeeded.
    Completed {
        /// The job.
        id: JobId,
    },
    /// The run failed and attempts remain: available again after `delay`.
    Retry {
        /// The job.
        id: JobId,
        /// Backoff before the next attempt.
        delay: Duration,
        /// This attempt's error, appended to the job's error list.
        error: String,
    },
    /// The run failed for good: the last attempt, a bad payload or an unknown kind.
    Dead {
        /// The job.
        id: JobId,
        /// This attempt's error, appended to the job's error list.
        error: String,
    },
}

impl Outcome {
    /// The job the outcome is for.
    pub fn id(&self) -> JobId {
        match self {
            Outcome::Completed { id } | Outcome::Retry { id, .. } | Outcome::Dead { id, .. } => *id,
        }
    }
}

/// How long finished jobs are kept before [`JobStore::cleanup`] deletes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Completed and cancelled jobs (default 24 hours).
    pub finished: Duration,
    /// Dead jobs, kept longer so someone can look at them (default 7 days).
    pub dead: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        Self { finished: Duration::from_secs(24 * 3600), dead: Duration::from_secs(7 * 24 * 3600) }
    }
}

/// Wakes a worker's fetch loop when jobs are inserted into its queue.
#[derive(Debug, Clone)]
pub struct Wakeup(watch::Receiver<u64>);

impl Wakeup {
    /// Forgets wake-ups seen so far; call before a fetch so one arriving during it is kept.
    pub fn mark_seen(&mut self) {
        self.0.mark_unchanged();
    }

    /// True when a wake-up arrived since the last [`mark_seen`](Self::mark_seen).
    pub fn has_changed(&self) -> bool {
        self.0.has_changed().unwrap_or(false)
    }

    /// Resolves at the next wake-up after the last [`mark_seen`](Self::mark_seen). Pending forever
    /// when the store is gone, so select it against a timeout.
    pub async fn changed(&mut self) {
        if self.0.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// Per-queue wake-up channels of one store (shared by its clones).
#[derive(Debug, Default)]
pub(crate) struct Wakers {
    queues: Mutex<HashMap<String, watch::Sender<u64>>>,
}

impl Wakers {
    pub(crate) fn subscribe(&self, queue: &str) -> Wakeup {
        let mut map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let sender = map.entry(queue.to_string()).or_insert_with(|| watch::channel(0).0);
        Wakeup(sender.subscribe())
    }

    pub(crate) fn wake(&self, queue: &str) {
        let map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(sender) = map.get(queue) {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    pub(crate) fn wake_all(&self) {
        let map = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        for sender in map.values() {
            sender.send_modify(|n| *n = n.wrapping_add(1));
        }
    }
}

pub(crate) type SharedWakers = Arc<Wakers>;

/// Where jobs live. Implemented by [`SqliteStore`](crate::SqliteStore) (embedded, the default)
/// and [`PostgresStore`](crate::PostgresStore) (many worker processes); the
/// [`Worker`](crate::Worker) and the periodic scheduler only use this trait.
///
/// Every change to a running job is guarded by its state and its lease owner, so a worker
/// that lost a job (rescued after its lease ran out, or cancelled) cannot complete, fail or
/// release it.
pub trait JobStore: Clone + Send + Sync + 'static {
    /// Short name of the backend ("sqlite", "postgres"), for logs.
    fn backend(&self) -> &'static str;

    /// Applies the embedded migrations that are not applied yet. Safe to call from many
    /// processes at once.
    fn migrate(&self) -> impl Future<Output = Result<(), JobError>> + Send;

    /// Inserts jobs in one transaction. Each result is the new job's id, or `None` when a job
    /// with its unique key is already stored.
    fn enqueue_many(&self, jobs: &[NewJob]) -> impl Future<Output = Result<Vec<Option<JobId>>, JobError>> + Send;

    /// Inserts one job; `None` when a job with its unique key is already stored.
    fn enqueue(&self, job: &NewJob) -> impl Future<Output = Result<Option<JobId>, JobError>> + Send {
        async move {
            let mut ids = self.enqueue_many(std::slice::from_ref(job)).await?;
            Ok(ids.pop().flatten())
        }
    }

    /// Leases up to `limit` due jobs of `queue` (none while it is paused), in priority,
    /// scheduled time, id order, counting an attempt for each.
    fn fetch(
        &self,
        queue: &str,
        limit: u32,
        lease: &Lease,
    ) -> impl Future<Output = Result<Vec<ClaimedJob>, JobError>> + Send;

    /// Extends the lease of `ids` by its TTL; returns the ids still held by `lease.owner`
    /// (a missing one was rescued or cancelled).
    fn heartbeat(&self, ids: &[JobId], lease: &Lease) -> impl Future<Output = Result<Vec<JobId>, JobError>> + Send;

    /// Records outcomes of runs leased by `owner`; returns the ids whose outcome was applied.
    /// An outcome for a job no longer running under `owner` is refused (not in the result).
    fn finish(&self, outcomes: &[Outcome], owner: &str) -> impl Future<Output = Result<Vec<JobId>, JobError>> + Send;

    /// Gives back running jobs without counting their attempt (graceful stop).
    fn release(&self, ids: &[JobId], owner: &str) -> impl Future<Output = Result<u64, JobError>> + Send;

    /// Returns running jobs whose lease ran out to available (or dead, if that was their last
    /// attempt), recording the lost attempt's error. Returns how many.
    fn rescue(&self) -> impl Future<Output = Result<u64, JobError>> + Send;

    /// Time until the next scheduled job of `queue` is due, if it has one waiting.
    fn time_until_due(&self, queue: &str) -> impl Future<Output = Result<Option<Duration>, JobError>> + Send;

    /// A wake-up for inserts into `queue` (PostgreSQL: LISTEN/NOTIFY across processes;
    /// SQLite: inserts made through this store's process).
    fn subscribe(&self, queue: &str) -> impl Future<Output = Result<Wakeup, JobError>> + Send;

    /// Cancels a job that has not finished. A running job's worker sees its lease gone at its
    /// next heartbeat and its context is cancelled. Returns false if the job was not cancellable.
    fn cancel(&self, id: JobId) -> impl Future<Output = Result<bool, JobError>> + Send;

    /// Makes a dead or cancelled job available again now, with a fresh set of attempts (its
    /// error list is kept). Returns false if the job was in another state.
    fn retry(&self, id: JobId) -> impl Future<Output = Result<bool, JobError>> + Send;

    /// [`retry`](Self::retry) for every dead job, or every dead job of one queue.
    fn retry_dead(&self, queue: Option<&str>) -> impl Future<Output = Result<u64, JobError>> + Send;

    /// Deletes finished jobs older than the retention (by their finish time). Returns how many.
    fn cleanup(&self, retention: &Retention) -> impl Future<Output = Result<u64, JobError>> + Send;

    /// Stops workers fetching from `queue` (running jobs finish).
    fn pause(&self, queue: &str) -> impl Future<Output = Result<(), JobError>> + Send;

    /// Lets workers fetch from `queue` again.
    fn resume(&self, queue: &str) -> impl Future<Output = Result<(), JobError>> + Send;

    /// Job counts per queue and state.
    fn stats(&self) -> impl Future<Output = Result<Vec<QueueStats>, JobError>> + Send;

    /// Jobs matching `query`, by id.
    fn list(&self, query: &ListQuery) -> impl Future<Output = Result<Vec<JobRecord>, JobError>> + Send;

    /// One job.
    fn get(&self, id: JobId) -> impl Future<Output = Result<Option<JobRecord>, JobError>> + Send;

    /// The store's clock (the database server's for PostgreSQL), used by the periodic
    /// scheduler so that every process agrees on time.
    fn now(&self) -> impl Future<Output = Result<DateTime<Utc>, JobError>> + Send;

    /// Takes or renews the leadership of `election` for `ttl`; true while `owner` leads.
    fn try_lead(
        &self,
        election: &str,
        owner: &str,
        ttl: Duration,
    ) -> impl Future<Output = Result<bool, JobError>> + Send;

    /// Gives up the leadership of `election` if `owner` holds it.
    fn resign(&self, election: &str, owner: &str) -> impl Future<Output = Result<(), JobError>> + Send;

    /// The last tick enqueued for periodic job `name`, setting it to `start` if there is none.
    fn periodic_state(
        &self,
        name: &str,
        start: DateTime<Utc>,
    ) -> impl Future<Output = Result<DateTime<Utc>, JobError>> + Send;

    /// In one transaction: moves `name`'s last tick from `prev` to `tick` and inserts `job`.
    /// False (and nothing inserted) if the last tick was no longer `prev`.
    fn enqueue_tick(
        &self,
        name: &str,
        prev: DateTime<Utc>,
        tick: DateTime<Utc>,
        job: &NewJob,
    ) -> impl Future<Output = Result<bool, JobError>> + Send;
}

pub(crate) fn parse_errors(id: JobId, text: &str) -> Result<Vec<crate::job::AttemptError>, JobError> {
    serde_json::from_str(text).map_err(|e| JobError::Corrupt { id, what: format!("error list is not valid JSON: {e}") })
}

pub(crate) fn to_u32(id: JobId, what: &str, v: i64) -> Result<u32, JobError> {
    u32::try_from(v).map_err(|_| JobError::Corrupt { id, what: format!("{what} out of range: {v}") })
}
