//! # Durable jobs for Stevedore
//!
//! Work that must survive a crash and may be shared by many processes: typed jobs stored in
//! **SQLite** (the embedded default: one file, WAL, nothing to set up) or **PostgreSQL** (many
//! worker hosts on one database), run by a [`Worker`] that is a Stevedore background service.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use stevedore_jobs::{BoxError, Job, JobContext, JobStore, NewJob, SqliteStore, Worker};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail { to: String }
//!
//! impl Job for SendEmail {
//!     const KIND: &'static str = "send_email";
//! }
//!
//! async fn send_email(job: SendEmail, ctx: JobContext) -> Result<(), BoxError> {
//!     println!("mailing {} (attempt {})", job.to, ctx.attempt());
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let store = SqliteStore::open("jobs.db").await?; // or PostgresStore::connect(url)
//!     store.enqueue(&NewJob::new(&SendEmail { to: "ada@example.com".into() })?).await?;
//!
//!     let host = stevedore::Host::builder()
//!         .add(Worker::new(store).register(send_email).queue("default", 8).into_service("jobs"))
//!         .build()?;
//!     host.run().await.exit();
//! }
//! ```
//!
//! Handlers are async fns or closures taking the payload first, then any Stevedore extractors:
//! [`JobContext`] (id, attempt, cancellation), `Scoped<T>`, `Singleton<T>`, `Transient<T>`,
//! resolved in a fresh scope per run; the scope is closed with the run's outcome, so a scoped
//! transaction can commit on success and roll back on failure (and a failed commit fails the
//! attempt).
//!
//! ## Guarantees
//!
//! - **At least once.** A job runs until an attempt succeeds, it runs out of attempts, or it is
//!   cancelled. It runs more than once only when a worker lost it mid-run (crash, kill, a stall
//!   longer than the lease) or its outcome could not be recorded.
//! - **Leases, not guesses.** A fetch leases the job to one worker (`lease_owner`) until
//!   `lease_expires_at`; a heartbeat renews the leases of every running job every third of the
//!   TTL. A job is rescued only when its lease has really run out, so a long job that is still
//!   heartbeating is never run twice, and a crashed worker's jobs return after the TTL
//!   (30 s by default), not hours.
//! - **Guarded state changes.** Completing, failing, releasing and renewing a job require that
//!   it is still `running` under the caller's lease. A worker whose job was rescued or cancelled
//!   cannot complete it afterwards; its late outcome is refused and logged, and its handler's
//!   [`JobContext`] is cancelled at the next heartbeat.
//! - **Nothing is lost on a bad job.** A payload that does not deserialize into the handler's
//!   type, or a kind no handler is registered for, makes the job dead at once with that error
//!   (no crash loop); a handler that panics fails the attempt like an error does.
//! - **Dead letters keep their history.** Every failed attempt appends `{attempt, at, error}`
//!   to the job; [`JobStore::list`] with [`JobState::Dead`] shows them, and [`JobStore::retry`] /
//!   [`JobStore::retry_dead`] put them back with a fresh set of attempts.
//! - **Transactional enqueue.** [`PostgresStore::enqueue_in`] and [`SqliteStore::enqueue_in`]
//!   insert through the caller's own transaction: the job exists if and only if it commits.
//! - **Unique jobs.** At most one stored job has a given unique key; the key is held until the
//!   job holding it is deleted by retention. Concurrent enqueues of one key insert one job.
//! - **Periodic jobs once per cluster.** See [`PeriodicJob`]: one elected leader enqueues each
//!   tick in a transaction that advances the schedule's stored last tick, with the tick's time in
//!   the job's unique key; a failover neither doubles nor drops a tick.
//! - **Graceful stop.** When the worker is stopped it fetches nothing more, lets running jobs
//!   finish for [`WorkerConfig::shutdown_timeout`], then aborts the rest and releases them (back
//!   to available, the attempt not counted).
//!
//! ## Defaults
//!
//! | setting | default |
//! |---|---|
//! | attempts ([`Job::MAX_ATTEMPTS`]) | 20 |
//! | retry backoff ([`Backoff`]) | 1 s doubling per attempt, capped at 1 h, ±20 % jitter (dead after about 9 h) |
//! | lease TTL / heartbeat / rescue check | 30 s / 10 s / every 5 s |
//! | run timeout ([`WorkerConfig::default_timeout`]) | 30 min |
//! | shutdown budget of running jobs | 4 s (under the host's default 5 s) |
//! | fetch batch / outcome batch | 100 / 500 |
//! | prefetch beyond the concurrency ([`WorkerConfig::prefetch`]) | up to 64, only while a prefetched job would wait under 5 ms |
//! | fallback poll | PostgreSQL 5 s (LISTEN/NOTIFY wakes workers), SQLite 1 s (wake-ups stay in-process) |
//! | retention | completed and cancelled 24 h, dead 7 days |
//! | periodic leader lease | 10 s |
//!
//! ## What a crash costs
//!
//! - **kill -9 or a power cut of a worker:** its running jobs stay leased until the lease
//!   expires (at most the TTL, 30 s, after the last heartbeat), then any worker's rescuer makes
//!   them available again (or dead, if it was their last attempt) with a "lease expired" error
//!   in their history, and they run again. Jobs whose handler had finished but whose outcome was
//!   still in the worker's outcome batch run again too: outcomes are written as soon as the
//!   previous write returns, so that window is one database round trip. Prefetched jobs that had
//!   not started are returned by the same rescue (their attempt counts). Nothing else is lost.
//! - **PostgreSQL server crash:** enqueues are as durable as the database makes them; the
//!   worker's own writes (fetch, heartbeat, outcomes) commit asynchronously, so up to a few
//!   hundred milliseconds of them can be lost, which only makes the jobs concerned run again.
//! - **Database unavailable:** fetches and heartbeats fail and are retried; outcome writes are
//!   retried for up to one lease TTL, then given up (the jobs run again after rescue).
//! - **SQLite durability:** `synchronous = NORMAL` in WAL mode: a committed job survives a crash
//!   of the process; a power loss may lose the last transactions.
//! - **Periodic leader crash:** no tick is enqueued until the leader lease expires (10 s by
//!   default); the new leader then enqueues the missed ticks (the latest
//!   [`WorkerConfig::max_catch_up`]).
//!
//! ## Operating
//!
//! Migrations are embedded, versioned (table `stevedore_jobs_migrations`) and applied by
//! [`SqliteStore::open`], [`PostgresStore::connect`], [`Worker::run`] and [`JobStore::migrate`].
//! [`JobStore::stats`], [`JobStore::list`], [`JobStore::cancel`], [`JobStore::pause`] and
//! [`JobStore::resume`] serve the CLI and the dashboard.
#![deny(missing_docs)]

mod backoff;
mod error;
mod job;
mod periodic;
mod store;
mod worker;

pub use backoff::Backoff;
pub use error::{BoxError, JobError};
pub use job::{
    AttemptError, ClaimedJob, DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Job, JobId, JobRecord, JobState, ListQuery, NewJob,
    QueueStats,
};
pub use periodic::{PERIODIC_ELECTION, PeriodicJob};
pub use store::any::AnyStore;
pub use store::postgres::{NOTIFY_CHANNEL, PostgresStore};
pub use store::sqlite::SqliteStore;
pub use store::{JobStore, Lease, Outcome, Retention, Wakeup};
pub use worker::{JobContext, Worker, WorkerConfig, WorkerControl};
