//! A store chosen by URL at run time, for tools (the CLI, the dashboard) that take a URL.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::postgres::PostgresStore;
use super::sqlite::SqliteStore;
use super::{JobStore, Lease, Outcome, Retention, Wakeup};
use crate::error::JobError;
use crate::job::{ClaimedJob, JobId, JobRecord, ListQuery, NewJob, QueueStats};

/// SQLite or PostgreSQL, whichever a URL names.
///
/// ```no_run
/// use stevedore_jobs::{AnyStore, JobStore};
/// # async fn demo() -> Result<(), stevedore_jobs::JobError> {
/// let store = AnyStore::connect("sqlite://jobs.db").await?; // or postgres://..., or a file path
/// for queue in store.stats().await? {
///     println!("{}: {} dead", queue.queue, queue.dead);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub enum AnyStore {
    /// An SQLite file.
    Sqlite(SqliteStore),
    /// A PostgreSQL database.
    Postgres(PostgresStore),
}

impl AnyStore {
    /// Connects and applies the migrations: `postgres://` and `postgresql://` URLs go to
    /// PostgreSQL, `sqlite:` URLs and anything else (a file path) to SQLite.
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(AnyStore::Postgres(PostgresStore::connect(url).await?))
        } else if url.starts_with("sqlite:") {
            Ok(AnyStore::Sqlite(SqliteStore::connect(url).await?))
        } else {
            Ok(AnyStore::Sqlite(SqliteStore::open(url).await?))
        }
    }
}

macro_rules! delegate {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            AnyStore::Sqlite($store) => $call.await,
            AnyStore::Postgres($store) => $call.await,
        }
    };
}

impl JobStore for AnyStore {
    fn backend(&self) -> &'static str {
        match self {
            AnyStore::Sqlite(s) => s.backend(),
            AnyStore::Postgres(s) => s.backend(),
        }
    }

    async fn migrate(&self) -> Result<(), JobError> {
        delegate!(self, s => s.migrate())
    }

    async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
        delegate!(self, s => s.enqueue_many(jobs))
    }

    async fn fetch(&self, queue: &str, limit: u32, lease: &Lease) -> Result<Vec<ClaimedJob>, JobError> {
        delegate!(self, s => s.fetch(queue, limit, lease))
    }

    async fn heartbeat(&self, ids: &[JobId], lease: &Lease) -> Result<Vec<JobId>, JobError> {
        delegate!(self, s => s.heartbeat(ids, lease))
    }

    async fn finish(&self, outcomes: &[Outcome], owner: &str) -> Result<Vec<JobId>, JobError> {
        delegate!(self, s => s.finish(outcomes, owner))
    }

    async fn release(&self, ids: &[JobId], owner: &str) -> Result<u64, JobError> {
        delegate!(self, s => s.release(ids, owner))
    }

    async fn rescue(&self) -> Result<u64, JobError> {
        delegate!(self, s => s.rescue())
    }

    async fn time_until_due(&self, queue: &str) -> Result<Option<Duration>, JobError> {
        delegate!(self, s => s.time_until_due(queue))
    }

    async fn subscribe(&self, queue: &str) -> Result<Wakeup, JobError> {
        delegate!(self, s => s.subscribe(queue))
    }

    async fn cancel(&self, id: JobId) -> Result<bool, JobError> {
        delegate!(self, s => s.cancel(id))
    }

    async fn retry(&self, id: JobId) -> Result<bool, JobError> {
        delegate!(self, s => s.retry(id))
    }

    async fn retry_dead(&self, queue: Option<&str>) -> Result<u64, JobError> {
        delegate!(self, s => s.retry_dead(queue))
    }

    async fn cleanup(&self, retention: &Retention) -> Result<u64, JobError> {
        delegate!(self, s => s.cleanup(retention))
    }

    async fn pause(&self, queue: &str) -> Result<(), JobError> {
        delegate!(self, s => s.pause(queue))
    }

    async fn resume(&self, queue: &str) -> Result<(), JobError> {
        delegate!(self, s => s.resume(queue))
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, JobError> {
        delegate!(self, s => s.stats())
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<JobRecord>, JobError> {
        delegate!(self, s => s.list(query))
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, JobError> {
        delegate!(self, s => s.get(id))
    }

    async fn now(&self) -> Result<DateTime<Utc>, JobError> {
        delegate!(self, s => s.now())
    }

    async fn try_lead(&self, election: &str, owner: &str, ttl: Duration) -> Result<bool, JobError> {
        delegate!(self, s => s.try_lead(election, owner, ttl))
    }

    async fn resign(&self, election: &str, owner: &str) -> Result<(), JobError> {
        delegate!(self, s => s.resign(election, owner))
    }

    async fn periodic_state(&self, name: &str, start: DateTime<Utc>) -> Result<DateTime<Utc>, JobError> {
        delegate!(self, s => s.periodic_state(name, start))
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        prev: DateTime<Utc>,
        tick: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool, JobError> {
        delegate!(self, s => s.enqueue_tick(name, prev, tick, job))
    }
}
