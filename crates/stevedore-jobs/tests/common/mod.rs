//! Shared fixtures: a fresh SQLite file or PostgreSQL schema per test, a side table that
//! records every handler run, and child worker processes.
#![allow(dead_code)]

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions};
use stevedore_jobs::{Job, JobStore, PostgresStore, SqliteStore};

/// The job the tests run: `hang` never returns, `fail` always fails, otherwise it sleeps
/// `sleep_ms` and succeeds. Every run is recorded in `test_runs`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TestJob {
    pub n: u64,
    #[serde(default)]
    pub hang: bool,
    #[serde(default)]
    pub fail: bool,
    #[serde(default)]
    pub sleep_ms: u64,
}

impl Job for TestJob {
    const KIND: &'static str = "test_job";
}

/// A periodic tick (never worked in the tests; only its rows are looked at).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tick;

impl Job for Tick {
    const KIND: &'static str = "tick";
    const QUEUE: &'static str = "ticks";
}

pub fn unique_name() -> String {
    format!("stevedore_test_{}", uuid::Uuid::new_v4().simple())
}

/// Where a test's jobs live, as a child process can find them again.
#[derive(Debug, Clone)]
pub enum Place {
    Sqlite(PathBuf),
    Postgres(String),
}

impl Place {
    pub fn encode(&self) -> String {
        match self {
            Place::Sqlite(p) => format!("sqlite:{}", p.display()),
            Place::Postgres(schema) => format!("pg:{schema}"),
        }
    }

    pub fn decode(s: &str) -> Place {
        if let Some(p) = s.strip_prefix("sqlite:") {
            Place::Sqlite(PathBuf::from(p))
        } else {
            Place::Postgres(s.trim_start_matches("pg:").to_string())
        }
    }
}

/// The side table of handler runs, reached through its own pool.
#[derive(Debug, Clone)]
pub enum Runs {
    Sqlite(SqlitePool),
    Pg(PgPool),
}

impl Runs {
    pub async fn record(&self, job: i64, worker: &str) {
        let r = match self {
            Runs::Sqlite(p) => sqlx::query("INSERT INTO test_runs (job_id, worker) VALUES (?1, ?2)")
                .bind(job)
                .bind(worker)
                .execute(p)
                .await
                .map(|_| ()),
            Runs::Pg(p) => sqlx::query("INSERT INTO test_runs (job_id, worker) VALUES ($1, $2)")
                .bind(job)
                .bind(worker)
                .execute(p)
                .await
                .map(|_| ()),
        };
        r.expect("record a run");
    }

    /// (job id, worker) of every run.
    pub async fn all(&self) -> Vec<(i64, String)> {
        match self {
            Runs::Sqlite(p) => sqlx::query_as("SELECT job_id, worker FROM test_runs").fetch_all(p).await,
            Runs::Pg(p) => sqlx::query_as("SELECT job_id, worker FROM test_runs").fetch_all(p).await,
        }
        .expect("read runs")
    }

    /// Ids of jobs in `state`.
    pub async fn ids_in(&self, state: &str) -> Vec<i64> {
        match self {
            Runs::Sqlite(p) => {
                sqlx::query_scalar("SELECT id FROM stevedore_jobs WHERE state = ?1 ORDER BY id")
                    .bind(state)
                    .fetch_all(p)
                    .await
            }
            Runs::Pg(p) => {
                sqlx::query_scalar("SELECT id FROM stevedore_jobs WHERE state = $1 ORDER BY id")
                    .bind(state)
                    .fetch_all(p)
                    .await
            }
        }
        .expect("read job ids")
    }

    /// Sets every running job's lease as expired (simulates a worker that stalled).
    pub async fn expire_leases(&self) {
        match self {
            Runs::Sqlite(p) => sqlx::query("UPDATE stevedore_jobs SET lease_expires_at = 0 WHERE state = 'running'")
                .execute(p)
                .await
                .map(|_| ()),
            Runs::Pg(p) => sqlx::query(
                "UPDATE stevedore_jobs SET lease_expires_at = now() - interval '1 hour' WHERE state = 'running'",
            )
            .execute(p)
            .await
            .map(|_| ()),
        }
        .expect("expire leases");
    }
}

pub struct Db<S> {
    pub place: Place,
    pub store: S,
    pub runs: Runs,
    /// The test that created the file or schema removes it when done (child processes don't).
    pub owned: bool,
}

impl<S> Drop for Db<S> {
    fn drop(&mut self) {
        if !self.owned || std::thread::panicking() {
            return; // a failed test leaves its data for a look
        }
        match &self.place {
            Place::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Place::Postgres(schema) => {
                let sql = format!("DROP SCHEMA IF EXISTS {schema} CASCADE");
                let _ = std::thread::spawn(move || {
                    let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                    rt.block_on(async move {
                        if let Ok(pool) = PgPool::connect(&stevedore_testkit::postgres_url()).await {
                            let _ = sqlx::query(sqlx::AssertSqlSafe(sql)).execute(&pool).await;
                            pool.close().await;
                        }
                    });
                })
                .join();
            }
        }
    }
}

pub async fn sqlite_at(path: PathBuf) -> Db<SqliteStore> {
    let store = SqliteStore::open(&path).await.expect("open SQLite store");
    let options = SqliteConnectOptions::new()
        .filename(&path)
        .journal_mode(SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(30));
    let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.expect("open runs pool");
    sqlx::query("CREATE TABLE IF NOT EXISTS test_runs (job_id INTEGER NOT NULL, worker TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("create test_runs");
    Db { place: Place::Sqlite(path), store, runs: Runs::Sqlite(pool), owned: false }
}

pub async fn sqlite() -> Db<SqliteStore> {
    let path = std::env::temp_dir().join(format!("{}.db", unique_name()));
    let mut db = sqlite_at(path).await;
    db.owned = true;
    db
}

pub async fn pg_pool(schema: &str, max: u32) -> PgPool {
    let options = PgConnectOptions::from_str(&stevedore_testkit::postgres_url())
        .expect("PostgreSQL URL")
        .options([("search_path", schema)]);
    PgPoolOptions::new().max_connections(max).connect_with(options).await.expect("connect to PostgreSQL")
}

pub async fn postgres_at(schema: String) -> Db<PostgresStore> {
    let pool = pg_pool(&schema, 8).await;
    let store = PostgresStore::from_pool(pool.clone());
    store.migrate().await.expect("migrate");
    sqlx::query("CREATE TABLE IF NOT EXISTS test_runs (job_id BIGINT NOT NULL, worker TEXT NOT NULL)")
        .execute(&pool)
        .await
        .expect("create test_runs");
    Db { place: Place::Postgres(schema), store, runs: Runs::Pg(pool), owned: false }
}

/// A fresh schema, or None (skipped) when PostgreSQL is down outside CI.
pub async fn postgres() -> Option<Db<PostgresStore>> {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return None;
    }
    let schema = unique_name();
    let admin = PgPool::connect(&stevedore_testkit::postgres_url()).await.expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.expect("create schema");
    admin.close().await;
    let mut db = postgres_at(schema).await;
    db.owned = true;
    Some(db)
}

/// Polls `check` until it returns true or `within` passes (then panics with `what`).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs one test in both backends. The body is `async fn(db: Db<S>)` generic over the store.
#[macro_export]
macro_rules! both_backends {
    ($body:ident) => {
        mod $body {
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn sqlite() {
                let db = $crate::common::sqlite().await;
                super::$body(db).await;
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn postgres() {
                let Some(db) = $crate::common::postgres().await else { return };
                super::$body(db).await;
            }
        }
    };
}

/// Reopens the store a child process was pointed at.
pub async fn reopen_sqlite(place: &Place) -> Option<Db<SqliteStore>> {
    match place {
        Place::Sqlite(p) => Some(sqlite_at(p.clone()).await),
        Place::Postgres(_) => None,
    }
}

pub async fn reopen_postgres(place: &Place) -> Option<Db<PostgresStore>> {
    match place {
        Place::Postgres(s) => Some(postgres_at(s.clone()).await),
        Place::Sqlite(_) => None,
    }
}

pub fn is_store<S: JobStore>(_: &S) {}

/// A worker whose TestJob handler records each run (under the worker's id), then hangs (when
/// `honor_hang`), sleeps, fails or succeeds.
pub fn recording_worker<S: JobStore>(
    db: &Db<S>,
    concurrency: usize,
    honor_hang: bool,
    config: stevedore_jobs::WorkerConfig,
) -> stevedore_jobs::Worker<S> {
    let runs = db.runs.clone();
    let worker = stevedore_jobs::Worker::new(db.store.clone()).config(config);
    let owner = worker.id().to_string();
    worker
        .register(move |job: TestJob, ctx: stevedore_jobs::JobContext| {
            let runs = runs.clone();
            let owner = owner.clone();
            async move {
                runs.record(ctx.id(), &owner).await;
                if job.hang && honor_hang {
                    std::future::pending::<()>().await;
                }
                if job.sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
                }
                if job.fail {
                    return Err(format!("job {} failed on attempt {}", job.n, ctx.attempt()).into());
                }
                Ok::<(), stevedore_jobs::BoxError>(())
            }
        })
        .queue("default", concurrency)
}
