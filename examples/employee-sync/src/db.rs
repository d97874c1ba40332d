//! The application's tables, and the unit of work: one database transaction per sync, begun on first
//! use and ended by the scope with the run's outcome (commit on success, roll back otherwise).

use std::borrow::Cow;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{PgPool, Postgres, SqlSafeStr, Sqlite, SqlitePool, Transaction};
use stevedore::{BoxError, RunOutcome};
use stevedore_bus::outbox::Outbox;

/// Runs `$body` with `$c` bound to the concrete pool or connection of either backend: the SQL is
/// written once (`$1`-style parameters work on both), the driver types differ.
macro_rules! either {
    ($value:expr, $c:ident => $body:expr) => {
        match $value {
            $crate::db::Either::Sqlite($c) => $body,
            $crate::db::Either::Postgres($c) => $body,
        }
    };
}
pub(crate) use either;

/// One of two backends' values.
#[derive(Debug, Clone)]
pub enum Either<S, P> {
    /// SQLite's.
    Sqlite(S),
    /// PostgreSQL's.
    Postgres(P),
}

/// The application's database (shared with the job store and the outbox). Cheap to clone.
#[derive(Debug, Clone)]
pub struct Database {
    /// The pool.
    pub pool: Either<SqlitePool, PgPool>,
    /// The outbox in the same database, so events commit with the change that caused them.
    pub outbox: Outbox,
    /// The events' topic.
    pub topic: std::sync::Arc<str>,
}

/// A database failure, naming what was being done.
#[derive(Debug, thiserror::Error)]
#[error("database: {action} failed: {source}")]
pub struct DbError {
    action: &'static str,
    #[source]
    source: sqlx::Error,
}

pub(crate) fn db_err(action: &'static str) -> impl FnOnce(sqlx::Error) -> DbError {
    move |source| DbError { action, source }
}

const MIGRATIONS_TABLE: &str = "_employee_sync_migrations";

const SQLITE: &str = "
CREATE TABLE employees (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
    department TEXT NOT NULL, title TEXT NOT NULL, updated_at TEXT NOT NULL
);
CREATE TABLE sync_runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, trigger_name TEXT NOT NULL, fetched INTEGER NOT NULL,
    hired INTEGER NOT NULL, updated INTEGER NOT NULL, departed INTEGER NOT NULL, finished_at TEXT NOT NULL
);
CREATE TABLE employee_change_log (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, message_id TEXT NOT NULL, employee_id TEXT NOT NULL,
    change_kind TEXT NOT NULL, summary TEXT NOT NULL, received_at TEXT NOT NULL
);
CREATE TABLE reports (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, rounds INTEGER NOT NULL, requested_at TEXT NOT NULL,
    finished_at TEXT, result TEXT
);
";

const POSTGRES: &str = "
CREATE TABLE employees (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL,
    department TEXT NOT NULL, title TEXT NOT NULL, updated_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE sync_runs (
    id BIGSERIAL PRIMARY KEY, trigger_name TEXT NOT NULL, fetched BIGINT NOT NULL,
    hired BIGINT NOT NULL, updated BIGINT NOT NULL, departed BIGINT NOT NULL, finished_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE employee_change_log (
    seq BIGSERIAL PRIMARY KEY, message_id TEXT NOT NULL, employee_id TEXT NOT NULL,
    change_kind TEXT NOT NULL, summary TEXT NOT NULL, received_at TIMESTAMPTZ NOT NULL
);
CREATE TABLE reports (
    id TEXT PRIMARY KEY, state TEXT NOT NULL, rounds BIGINT NOT NULL, requested_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ, result TEXT
);
";

fn migrator(sql: &'static str) -> Migrator {
    let m = Migration::new(1, Cow::Borrowed("employee_sync"), MigrationType::Simple, sql.into_sql_str(), false);
    let mut migrator = Migrator::with_migrations(vec![m]);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

/// An employee as the upstream API and `GET /api/employees` show it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Employee {
    /// Stable id, e.g. `e-007`.
    pub id: String,
    /// Full name.
    pub name: String,
    /// Work e-mail.
    pub email: String,
    /// Department.
    pub department: String,
    /// Job title.
    pub title: String,
}

/// A stored employee with its last change.
#[derive(Debug, Clone, Serialize)]
pub struct StoredEmployee {
    #[serde(flatten)]
    /// The employee.
    pub employee: Employee,
    /// When the sync last changed it.
    pub updated_at: DateTime<Utc>,
}

/// One finished sync, as `GET /api/syncs` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SyncRun {
    /// Sequence number.
    pub id: i64,
    /// `timer`, `api` or `startup`.
    pub trigger_name: String,
    /// Employees the upstream returned.
    pub fetched: i64,
    /// New employees.
    pub hired: i64,
    /// Changed employees.
    pub updated: i64,
    /// Employees no longer listed.
    pub departed: i64,
    /// Commit time (the row commits with the changes).
    pub finished_at: DateTime<Utc>,
}

/// One event as the consumer recorded it.
#[derive(Debug, Clone, Serialize)]
pub struct ChangeLogEntry {
    /// Sequence number.
    pub seq: i64,
    /// The bus message id (UUID v7), unique per event.
    pub message_id: String,
    /// The employee.
    pub employee_id: String,
    /// `hired`, `updated` or `departed`.
    pub change_kind: String,
    /// A human line.
    pub summary: String,
    /// When the consumer handled it.
    pub received_at: DateTime<Utc>,
}

/// A report, queued or done.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Id (UUID v7).
    pub id: String,
    /// `queued` or `done`.
    pub state: String,
    /// Work size.
    pub rounds: i64,
    /// When it was asked for.
    pub requested_at: DateTime<Utc>,
    /// When it was done.
    pub finished_at: Option<DateTime<Utc>>,
    /// The result as JSON text.
    pub result: Option<String>,
}

pub(crate) type EmployeeRow = (String, String, String, String, String);

impl From<EmployeeRow> for Employee {
    fn from((id, name, email, department, title): EmployeeRow) -> Self {
        Employee { id, name, email, department, title }
    }
}

type StoredRow = (String, String, String, String, String, DateTime<Utc>);
type SyncRow = (i64, String, i64, i64, i64, i64, DateTime<Utc>);
type ChangeRow = (i64, String, String, String, String, DateTime<Utc>);
type ReportRow = (String, String, i64, DateTime<Utc>, Option<DateTime<Utc>>, Option<String>);

fn report_of((id, state, rounds, requested_at, finished_at, result): ReportRow) -> Report {
    Report { id, state, rounds, requested_at, finished_at, result }
}

/// Every stored employee through `conn` (a pool or a transaction).
pub(crate) async fn load_employees<'c, E>(conn: E) -> Result<Vec<Employee>, DbError>
where
    E: sqlx::Executor<'c>,
    EmployeeRow: for<'r> sqlx::FromRow<'r, <E::Database as sqlx::Database>::Row>,
    <E::Database as sqlx::Database>::Arguments: sqlx::IntoArguments<E::Database>,
{
    let rows: Vec<EmployeeRow> = sqlx::query_as("SELECT id, name, email, department, title FROM employees")
        .fetch_all(conn)
        .await
        .map_err(db_err("reading employees"))?;
    Ok(rows.into_iter().map(Employee::from).collect())
}

impl Database {
    /// Creates the application's tables and the outbox's (idempotent; safe from many processes).
    pub async fn migrate(&self) -> Result<(), BoxError> {
        match &self.pool {
            Either::Sqlite(p) => migrator(SQLITE).run(p).await?,
            Either::Postgres(p) => migrator(POSTGRES).run(p).await?,
        }
        self.outbox.migrate().await?;
        Ok(())
    }

    /// Every stored employee, by id.
    pub async fn employees(&self) -> Result<Vec<StoredEmployee>, DbError> {
        const SQL: &str = "SELECT id, name, email, department, title, updated_at FROM employees ORDER BY id";
        let rows: Vec<StoredRow> =
            either!(&self.pool, p => sqlx::query_as(SQL).fetch_all(p).await).map_err(db_err("reading employees"))?;
        Ok(rows
            .into_iter()
            .map(|(id, name, email, department, title, updated_at)| StoredEmployee {
                employee: Employee { id, name, email, department, title },
                updated_at,
            })
            .collect())
    }

    /// The latest sync runs, newest first.
    pub async fn syncs(&self, limit: i64) -> Result<Vec<SyncRun>, DbError> {
        const SQL: &str = "SELECT id, trigger_name, fetched, hired, updated, departed, finished_at FROM sync_runs \
                           ORDER BY id DESC LIMIT $1";
        let rows: Vec<SyncRow> = either!(&self.pool, p => sqlx::query_as(SQL).bind(limit).fetch_all(p).await)
            .map_err(db_err("reading sync runs"))?;
        Ok(rows
            .into_iter()
            .map(|(id, trigger_name, fetched, hired, updated, departed, finished_at)| SyncRun {
                id,
                trigger_name,
                fetched,
                hired,
                updated,
                departed,
                finished_at,
            })
            .collect())
    }

    /// The latest consumed events, newest first, and how many there are in all.
    pub async fn changes(&self, limit: i64) -> Result<(i64, Vec<ChangeLogEntry>), DbError> {
        const SQL: &str = "SELECT seq, message_id, employee_id, change_kind, summary, received_at \
                           FROM employee_change_log ORDER BY seq DESC LIMIT $1";
        const COUNT: &str = "SELECT COUNT(*) FROM employee_change_log";
        let err = db_err("reading the change log");
        either!(&self.pool, p => {
            let total: i64 = sqlx::query_scalar(COUNT).fetch_one(p).await.map_err(db_err("counting changes"))?;
            let rows: Vec<ChangeRow> = sqlx::query_as(SQL).bind(limit).fetch_all(p).await.map_err(err)?;
            let rows = rows
                .into_iter()
                .map(|(seq, message_id, employee_id, change_kind, summary, received_at)| ChangeLogEntry {
                    seq,
                    message_id,
                    employee_id,
                    change_kind,
                    summary,
                    received_at,
                })
                .collect();
            Ok((total, rows))
        })
    }

    /// The latest reports, newest first.
    pub async fn reports(&self, limit: i64) -> Result<Vec<Report>, DbError> {
        const SQL: &str =
            "SELECT id, state, rounds, requested_at, finished_at, result FROM reports ORDER BY id DESC LIMIT $1";
        let rows: Vec<ReportRow> = either!(&self.pool, p => sqlx::query_as(SQL).bind(limit).fetch_all(p).await)
            .map_err(db_err("reading reports"))?;
        Ok(rows.into_iter().map(report_of).collect())
    }

    /// One report.
    pub async fn report(&self, id: &str) -> Result<Option<Report>, DbError> {
        const SQL: &str = "SELECT id, state, rounds, requested_at, finished_at, result FROM reports WHERE id = $1";
        let row: Option<ReportRow> = either!(&self.pool, p => sqlx::query_as(SQL).bind(id).fetch_optional(p).await)
            .map_err(db_err("reading a report"))?;
        Ok(row.map(report_of))
    }

    /// Stores a report's result.
    pub async fn finish_report(&self, id: &str, result: &str) -> Result<(), DbError> {
        const SQL: &str = "UPDATE reports SET state = 'done', result = $2, finished_at = $3 WHERE id = $1";
        let now = Utc::now();
        either!(&self.pool, p => sqlx::query(SQL).bind(id).bind(result).bind(now).execute(p).await.map(|_| ()))
            .map_err(db_err("storing a report"))
    }
}

/// One unit of work's transaction: begun on first use, committed or rolled back by the scope's end
/// (see [`UnitOfWork::end`]), never by the code that uses it.
pub struct UnitOfWork {
    db: Database,
    tx: Option<Either<Transaction<'static, Sqlite>, Transaction<'static, Postgres>>>,
    /// Whether anything was written to the outbox (the relay is woken after the commit).
    pub(crate) wrote_events: bool,
}

impl std::fmt::Debug for UnitOfWork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UnitOfWork").field("open", &self.tx.is_some()).finish_non_exhaustive()
    }
}

impl UnitOfWork {
    /// A unit of work on `db`; nothing is begun yet.
    pub fn new(db: Database) -> Self {
        UnitOfWork { db, tx: None, wrote_events: false }
    }

    /// The topic events written in this unit go to.
    pub fn topic(&self) -> std::sync::Arc<str> {
        self.db.topic.clone()
    }

    /// The open transaction, begun now if this is its first use.
    pub async fn tx(
        &mut self,
    ) -> Result<&mut Either<Transaction<'static, Sqlite>, Transaction<'static, Postgres>>, DbError> {
        if self.tx.is_none() {
            let tx = match &self.db.pool {
                Either::Sqlite(p) => Either::Sqlite(p.begin().await.map_err(db_err("beginning a transaction"))?),
                Either::Postgres(p) => Either::Postgres(p.begin().await.map_err(db_err("beginning a transaction"))?),
            };
            self.tx = Some(tx);
        }
        Ok(self.tx.as_mut().expect("just set"))
    }

    /// The scope's end: commit when the run succeeded, roll back otherwise. A failed commit is
    /// reported with the run, which then counts as failed.
    pub async fn end(self, outcome: RunOutcome) -> Result<(), BoxError> {
        let Some(tx) = self.tx else { return Ok(()) };
        if outcome == RunOutcome::Succeeded {
            either!(tx, t => t.commit().await).map_err(db_err("committing the unit of work"))?;
            if self.wrote_events {
                self.db.outbox.wake();
            }
        } else {
            tracing::info!(outcome = outcome.as_str(), "rolling back the unit of work");
            either!(tx, t => t.rollback().await).map_err(db_err("rolling back the unit of work"))?;
        }
        Ok(())
    }
}
