//! Durable jobs: a sync asked for through the API (or by the cluster-wide timer), and a CPU-heavy
//! report, run on the background runtime's blocking threads so requests never wait behind it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use stevedore::{BoxError, Scoped, Singleton};
use stevedore_jobs::{AnyStore, Job, JobContext, JobId, NewJob, PostgresStore, SqliteStore};
use stevedore_web::isolation::BackgroundRuntime;

use crate::db::{Database, Either, Employee, UnitOfWork, db_err, either, load_employees};
use crate::sync::sync_employees;
use crate::upstream::Upstream;

/// Sync the employees now (`POST /api/employees/sync`, or the cluster-wide timer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncEmployees {
    /// Who asked: `api` or `timer`.
    pub trigger: String,
}

impl Job for SyncEmployees {
    const KIND: &'static str = "employee_sync";
    const QUEUE: &'static str = "sync";
    const MAX_ATTEMPTS: u32 = 5;
}

/// Compute a report over the employees (`POST /api/reports`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenerateReport {
    /// The report row to fill.
    pub report_id: String,
    /// Millions of mixing steps: the CPU work to do.
    pub rounds: u32,
}

impl Job for GenerateReport {
    const KIND: &'static str = "employee_report";
    const QUEUE: &'static str = "reports";
    const MAX_ATTEMPTS: u32 = 5;
}

/// Inserts a queued report row and its job in one transaction: both exist, or neither.
pub async fn enqueue_report(store: &AnyStore, db: &Database, rounds: u32) -> Result<(String, Option<JobId>), BoxError> {
    let id = uuid::Uuid::now_v7().to_string();
    let job = NewJob::new(&GenerateReport { report_id: id.clone(), rounds })?;
    const SQL: &str = "INSERT INTO reports (id, state, rounds, requested_at) VALUES ($1, 'queued', $2, $3)";
    let now = chrono::Utc::now();
    let job_id = match (store, &db.pool) {
        (AnyStore::Sqlite(store), Either::Sqlite(pool)) => {
            let mut tx = pool.begin().await.map_err(db_err("beginning a transaction"))?;
            sqlx::query(SQL)
                .bind(&id)
                .bind(i64::from(rounds))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_err("inserting a report"))?;
            let ids = SqliteStore::enqueue_in(&mut tx, std::slice::from_ref(&job)).await?;
            tx.commit().await.map_err(db_err("committing a report"))?;
            store.wake(GenerateReport::QUEUE);
            ids.into_iter().next().flatten()
        }
        (AnyStore::Postgres(_), Either::Postgres(pool)) => {
            let mut tx = pool.begin().await.map_err(db_err("beginning a transaction"))?;
            sqlx::query(SQL)
                .bind(&id)
                .bind(i64::from(rounds))
                .bind(now)
                .execute(&mut *tx)
                .await
                .map_err(db_err("inserting a report"))?;
            let ids = PostgresStore::enqueue_in(&mut tx, std::slice::from_ref(&job)).await?;
            tx.commit().await.map_err(db_err("committing a report"))?;
            ids.into_iter().next().flatten()
        }
        _ => return Err("the job store and the database are on different backends".into()),
    };
    Ok((id, job_id))
}

/// Runs one sync job: the same handler as the timer, the same transaction rules. The worker gives
/// each job a fresh scope, so the unit of work commits when the job succeeds and rolls back when it
/// fails, times out, loses its lease or is cut off by the stop.
pub async fn run_sync_job(
    job: SyncEmployees,
    upstream: Singleton<Upstream>,
    uow: Scoped<UnitOfWork>,
) -> Result<(), BoxError> {
    sync_employees(job.trigger, upstream, uow).await.map(|_| ())
}

/// Runs one report job: reads the employees, crunches on the background runtime's blocking
/// threads, stores the result. Re-running it (after a crash) overwrites the same row.
pub async fn run_report_job(
    db: Database,
    background: BackgroundRuntime,
    job: GenerateReport,
    ctx: JobContext,
) -> Result<(), BoxError> {
    let employees: Vec<Employee> = either!(&db.pool, p => load_employees(p).await)?;
    let rounds = job.rounds;
    let work = background.run_cpu(move || crunch(&employees, rounds));
    let report = tokio::select! {
        r = work => r?,
        _ = ctx.cancelled() => return Err("the report job was cancelled (lease lost, timeout or stop)".into()),
    };
    db.finish_report(&job.report_id, &serde_json::to_string(&report)?).await?;
    metrics::counter!("employee_sync_reports_total").increment(1);
    Ok(())
}

/// A report's content.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct ReportResult {
    /// Employees per department.
    pub headcount: BTreeMap<String, u64>,
    /// Employees per title.
    pub titles: BTreeMap<String, u64>,
    /// A digest of the roster after `rounds` million mixing steps: the CPU-heavy part.
    pub digest: String,
}

/// The CPU-heavy part: deliberately slow (about a millisecond per round), and deterministic.
pub fn crunch(employees: &[Employee], rounds: u32) -> ReportResult {
    let mut headcount = BTreeMap::new();
    let mut titles = BTreeMap::new();
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for e in employees {
        *headcount.entry(e.department.clone()).or_insert(0) += 1;
        *titles.entry(e.title.clone()).or_insert(0) += 1;
        for b in e.id.bytes().chain(e.department.bytes()) {
            h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    for _ in 0..u64::from(rounds) * 1_000_000 {
        h ^= h >> 33;
        h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
        h ^= h >> 29;
    }
    ReportResult { headcount, titles, digest: format!("{h:016x}") }
}
