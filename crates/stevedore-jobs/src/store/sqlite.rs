//! SQLite store: the embedded default. One file, WAL mode, no set-up.
//!
//! All writes of one store go through a single connection (SQLite has one writer at a time;
//! queueing in the pool is cheaper than SQLite's busy-wait), reads through a small pool.
//! Several processes may share the file (the busy timeout serializes them), but wake-ups only
//! travel within a process: a worker in another process finds new jobs at its next poll.
//! `synchronous = NORMAL`: a committed job survives a crash of the process, and a power loss
//! may lose the last transactions. WAL checkpoints run in a background task every 500 ms
//! rather than inside a commit, which keeps their fsync out of enqueue and fetch latency.

use std::path::Path;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlSafeStr, SqliteConnection};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{JobStore, Lease, Outcome, Retention, SharedWakers, Wakers, Wakeup, parse_errors, to_u32};
use crate::error::JobError;
use crate::job::{ClaimedJob, JobId, JobRecord, JobState, ListQuery, NewJob, QueueStats, duration_ms};

const MIGRATIONS_TABLE: &str = "stevedore_jobs_migrations";

/// Jobs in one SQLite file. Cheap to clone (clones share the connections).
///
/// ```no_run
/// use stevedore_jobs::{JobStore, NewJob, SqliteStore};
/// # async fn demo() -> Result<(), stevedore_jobs::JobError> {
/// let store = SqliteStore::open("jobs.db").await?; // created and migrated if needed
/// store.enqueue(&NewJob::raw("resize", r#"{"image": 7}"#)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    writer: SqlitePool,
    reader: SqlitePool,
    wakers: SharedWakers,
    _stop_checkpointer: DropGuard,
}

/// How often the background checkpointer copies the WAL into the database file.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

fn now_ms() -> i64 {
    Utc::now().timestamp_millis()
}

fn from_ms(id: JobId, what: &str, ms: i64) -> Result<DateTime<Utc>, JobError> {
    DateTime::from_timestamp_millis(ms)
        .ok_or_else(|| JobError::Corrupt { id, what: format!("{what} out of range: {ms}") })
}

fn ids_json(ids: &[JobId]) -> String {
    serde_json::to_string(ids).unwrap_or_else(|_| "[]".to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database file at `path` and applies the migrations.
    pub async fn open(path: impl AsRef<Path>) -> Result<Self, JobError> {
        let options = SqliteConnectOptions::new().filename(path);
        Self::open_with(options).await
    }

    /// Opens a `sqlite://` URL and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        let options = SqliteConnectOptions::from_str(url).map_err(JobError::db("parse the database URL"))?;
        Self::open_with(options).await
    }

    /// Opens with the given options (WAL, `synchronous = NORMAL`, a 30 s busy timeout and
    /// create-if-missing are set on top) and applies the migrations.
    pub async fn open_with(options: SqliteConnectOptions) -> Result<Self, JobError> {
        let options = options
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(30))
            // Checkpoints (and their fsyncs) run in the background, not in a commit.
            .pragma("wal_autocheckpoint", "0");
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .min_connections(1)
            .connect_with(options.clone())
            .await
            .map_err(JobError::db("open the SQLite database"))?;
        let reader = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(options.read_only(false))
            .await
            .map_err(JobError::db("open the SQLite database"))?;
        let stop = CancellationToken::new();
        tokio::spawn(checkpointer(reader.clone(), stop.clone()));
        let store = Self {
            inner: Arc::new(Inner {
                writer,
                reader,
                wakers: Arc::new(Wakers::default()),
                _stop_checkpointer: stop.drop_guard(),
            }),
        };
        store.migrate().await?;
        Ok(store)
    }

    /// The pool all writes go through (one connection).
    pub fn pool(&self) -> &SqlitePool {
        &self.inner.writer
    }

    /// Inserts jobs through the caller's connection, typically inside the caller's own
    /// transaction: the jobs exist if and only if that transaction commits. Workers in this
    /// process find them at their next poll; call [`wake`](Self::wake) after the commit to start
    /// them at once.
    ///
    /// ```no_run
    /// # use stevedore_jobs::{NewJob, SqliteStore};
    /// # async fn demo(store: SqliteStore, pool: sqlx::SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
    /// SqliteStore::enqueue_in(&mut tx, &[NewJob::raw("ship_order", r#"{"order": 42}"#)]).await?;
    /// tx.commit().await?;
    /// store.wake("default");
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_in(conn: &mut SqliteConnection, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
        insert_jobs(conn, jobs).await
    }

    /// Wakes this process's idle workers of `queue` (after committing jobs with
    /// [`enqueue_in`](Self::enqueue_in)).
    pub fn wake(&self, queue: &str) {
        self.inner.wakers.wake(queue);
    }

    async fn begin(&self, what: &'static str) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, JobError> {
        self.inner.writer.begin_with("BEGIN IMMEDIATE").await.map_err(JobError::db(what))
    }
}

/// Copies the WAL into the database file off the commit path (PASSIVE: never blocks writers).
async fn checkpointer(pool: SqlitePool, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(CHECKPOINT_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        if let Err(error) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)").execute(&pool).await {
            tracing::debug!(%error, "SQLite checkpoint failed; retrying at the next tick");
        }
    }
}

fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(vec![
        Migration::new(
            1,
            "jobs".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0001_jobs.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "due index".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0002_due_index.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "drop due index".into(),
            MigrationType::Simple,
            include_str!("../../migrations/sqlite/0003_drop_due_index.sql").into_sql_str(),
            false,
        ),
    ]);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

const INSERT_JOB: &str = "INSERT INTO stevedore_jobs \
     (kind, queue, payload, priority, scheduled_at, created_at, max_attempts, timeout_ms, unique_key) \
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) \
     ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING RETURNING id";

async fn insert_jobs(conn: &mut SqliteConnection, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
    let now = now_ms();
    let mut ids = Vec::with_capacity(jobs.len());
    for job in jobs {
        let scheduled = match job.run_at {
            Some(at) => at.timestamp_millis(),
            None => now.saturating_add(job.delay_ms()),
        };
        let id: Option<i64> = sqlx::query_scalar(INSERT_JOB)
            .bind(&job.kind)
            .bind(&job.queue)
            .bind(&job.payload)
            .bind(job.priority)
            .bind(scheduled)
            .bind(now)
            .bind(i64::from(job.max_attempts))
            .bind(job.timeout_ms())
            .bind(job.unique_key.as_deref())
            .fetch_optional(&mut *conn)
            .await
            .map_err(JobError::db("enqueue jobs"))?;
        ids.push(id);
    }
    Ok(ids)
}

const FETCH: &str = "UPDATE stevedore_jobs \
     SET state = 'running', attempt = attempt + 1, attempted_at = ?1, lease_owner = ?2, lease_expires_at = ?3 \
     WHERE id IN ( \
         SELECT id FROM stevedore_jobs \
         WHERE state = 'available' AND queue = ?4 AND scheduled_at <= ?1 \
           AND NOT EXISTS (SELECT 1 FROM stevedore_queues WHERE name = ?4 AND paused = 1) \
         ORDER BY priority, scheduled_at, id LIMIT ?5) \
     RETURNING id, kind, queue, payload, attempt, max_attempts, timeout_ms";

const RECORD_COLUMNS: &str = "id, kind, queue, state, payload, priority, attempt, max_attempts, \
     timeout_ms, unique_key, scheduled_at, created_at, attempted_at, finished_at, lease_owner, \
     lease_expires_at, errors";

fn record(row: &SqliteRow) -> Result<JobRecord, JobError> {
    let e = || JobError::db("read a job");
    let id: i64 = row.try_get(0).map_err(e())?;
    let opt_time = |i: usize, what: &str| -> Result<Option<DateTime<Utc>>, JobError> {
        let ms: Option<i64> = row.try_get(i).map_err(e())?;
        ms.map(|ms| from_ms(id, what, ms)).transpose()
    };
    let state: String = row.try_get(3).map_err(e())?;
    let errors: String = row.try_get(16).map_err(e())?;
    let timeout: Option<i64> = row.try_get(8).map_err(e())?;
    Ok(JobRecord {
        id,
        kind: row.try_get(1).map_err(e())?,
        queue: row.try_get(2).map_err(e())?,
        state: JobState::from_str(&state)?,
        payload: row.try_get(4).map_err(e())?,
        priority: row.try_get(5).map_err(e())?,
        attempt: to_u32(id, "attempt", row.try_get(6).map_err(e())?)?,
        max_attempts: to_u32(id, "max_attempts", row.try_get(7).map_err(e())?)?,
        timeout: timeout.map(|ms| Duration::from_millis(ms.max(0) as u64)),
        unique_key: row.try_get(9).map_err(e())?,
        scheduled_at: from_ms(id, "scheduled_at", row.try_get(10).map_err(e())?)?,
        created_at: from_ms(id, "created_at", row.try_get(11).map_err(e())?)?,
        attempted_at: opt_time(12, "attempted_at")?,
        finished_at: opt_time(13, "finished_at")?,
        lease_owner: row.try_get(14).map_err(e())?,
        lease_expires_at: opt_time(15, "lease_expires_at")?,
        errors: parse_errors(id, &errors)?,
    })
}

fn claimed(row: &SqliteRow) -> Result<ClaimedJob, JobError> {
    let e = || JobError::db("read fetched jobs");
    let id: i64 = row.try_get(0).map_err(e())?;
    let timeout: Option<i64> = row.try_get(6).map_err(e())?;
    Ok(ClaimedJob {
        id,
        kind: row.try_get(1).map_err(e())?,
        queue: row.try_get(2).map_err(e())?,
        payload: row.try_get(3).map_err(e())?,
        attempt: to_u32(id, "attempt", row.try_get(4).map_err(e())?)?,
        max_attempts: to_u32(id, "max_attempts", row.try_get(5).map_err(e())?)?,
        timeout: timeout.map(|ms| Duration::from_millis(ms.max(0) as u64)),
    })
}

impl JobStore for SqliteStore {
    fn backend(&self) -> &'static str {
        "sqlite"
    }

    async fn migrate(&self) -> Result<(), JobError> {
        migrator().run(&self.inner.writer).await?;
        Ok(())
    }

    async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
        let mut tx = self.begin("enqueue jobs").await?;
        let ids = insert_jobs(&mut tx, jobs).await?;
        tx.commit().await.map_err(JobError::db("enqueue jobs"))?;
        for job in jobs {
            self.inner.wakers.wake(&job.queue);
        }
        Ok(ids)
    }

    async fn fetch(&self, queue: &str, limit: u32, lease: &Lease) -> Result<Vec<ClaimedJob>, JobError> {
        let now = now_ms();
        let rows = sqlx::query(FETCH)
            .bind(now)
            .bind(&lease.owner)
            .bind(now.saturating_add(duration_ms(lease.ttl)))
            .bind(queue)
            .bind(i64::from(limit))
            .fetch_all(&self.inner.writer)
            .await
            .map_err(JobError::db("fetch jobs"))?;
        let mut jobs = rows.iter().map(claimed).collect::<Result<Vec<_>, _>>()?;
        jobs.sort_by_key(|j| j.id);
        Ok(jobs)
    }

    async fn heartbeat(&self, ids: &[JobId], lease: &Lease) -> Result<Vec<JobId>, JobError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "UPDATE stevedore_jobs SET lease_expires_at = ?3 \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'running' AND lease_owner = ?2 \
             RETURNING id",
        )
        .bind(ids_json(ids))
        .bind(&lease.owner)
        .bind(now_ms().saturating_add(duration_ms(lease.ttl)))
        .fetch_all(&self.inner.writer)
        .await
        .map_err(JobError::db("renew job leases"))
    }

    async fn finish(&self, outcomes: &[Outcome], owner: &str) -> Result<Vec<JobId>, JobError> {
        let mut completed = Vec::new();
        let mut retries = Vec::new();
        let mut dead = Vec::new();
        for outcome in outcomes {
            match outcome {
                Outcome::Completed { id } => completed.push(*id),
                Outcome::Retry { id, delay, error } => {
                    retries.push(serde_json::json!([id, duration_ms(*delay), error]))
                }
                Outcome::Dead { id, error } => dead.push(serde_json::json!([id, 0, error])),
            }
        }
        let now = now_ms();
        let mut tx = self.begin("record job outcomes").await?;
        let mut applied = Vec::with_capacity(outcomes.len());
        if !completed.is_empty() {
            let ids: Vec<i64> = sqlx::query_scalar(
                "UPDATE stevedore_jobs SET state = 'completed', finished_at = ?3, \
                 lease_owner = NULL, lease_expires_at = NULL \
                 WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'running' AND lease_owner = ?2 \
                 RETURNING id",
            )
            .bind(ids_json(&completed))
            .bind(owner)
            .bind(now)
            .fetch_all(&mut *tx)
            .await
            .map_err(JobError::db("record completed jobs"))?;
            applied.extend(ids);
        }
        for (list, state, finished) in [(retries, "available", None), (dead, "dead", Some(now))] {
            if list.is_empty() {
                continue;
            }
            let ids: Vec<i64> = sqlx::query_scalar(
                "UPDATE stevedore_jobs SET state = ?4, \
                 scheduled_at = CASE WHEN ?4 = 'available' THEN ?3 + json_extract(t.value, '$[1]') \
                                ELSE stevedore_jobs.scheduled_at END, \
                 finished_at = ?5, lease_owner = NULL, lease_expires_at = NULL, \
                 errors = json_insert(stevedore_jobs.errors, '$[#]', json_object( \
                     'attempt', stevedore_jobs.attempt, 'at', ?3, 'error', json_extract(t.value, '$[2]'))) \
                 FROM json_each(?1) AS t \
                 WHERE stevedore_jobs.id = json_extract(t.value, '$[0]') \
                   AND stevedore_jobs.state = 'running' AND stevedore_jobs.lease_owner = ?2 \
                 RETURNING stevedore_jobs.id",
            )
            .bind(serde_json::Value::Array(list).to_string())
            .bind(owner)
            .bind(now)
            .bind(state)
            .bind(finished)
            .fetch_all(&mut *tx)
            .await
            .map_err(JobError::db("record failed jobs"))?;
            applied.extend(ids);
        }
        tx.commit().await.map_err(JobError::db("record job outcomes"))?;
        Ok(applied)
    }

    async fn release(&self, ids: &[JobId], owner: &str) -> Result<u64, JobError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = attempt - 1, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id IN (SELECT value FROM json_each(?1)) AND state = 'running' AND lease_owner = ?2 \
             RETURNING queue",
        )
        .bind(ids_json(ids))
        .bind(owner)
        .fetch_all(&self.inner.writer)
        .await
        .map_err(JobError::db("release jobs"))?;
        for q in &queues {
            self.inner.wakers.wake(q);
        }
        Ok(queues.len() as u64)
    }

    async fn rescue(&self) -> Result<u64, JobError> {
        let rows: Vec<(String, String)> = sqlx::query_as(
            "UPDATE stevedore_jobs SET
                state = CASE WHEN attempt >= max_attempts THEN 'dead' ELSE 'available' END,
                finished_at = CASE WHEN attempt >= max_attempts THEN ?1 END,
                errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?1,
                    'error', 'lease expired: worker ' || coalesce(lease_owner, '?')
                        || ' stopped renewing it (crashed, killed or stalled)')),
                lease_owner = NULL, lease_expires_at = NULL
             WHERE state = 'running' AND lease_expires_at < ?1
             RETURNING queue, state",
        )
        .bind(now_ms())
        .fetch_all(&self.inner.writer)
        .await
        .map_err(JobError::db("rescue jobs with expired leases"))?;
        for (queue, state) in &rows {
            if state == "available" {
                self.inner.wakers.wake(queue);
            }
        }
        Ok(rows.len() as u64)
    }

    async fn time_until_due(&self, queue: &str) -> Result<Option<Duration>, JobError> {
        let next: Option<i64> = sqlx::query_scalar(
            // The earliest job of each priority, one dequeue-index probe per distinct priority
            // (a loose index scan), then the earliest of those.
            "WITH RECURSIVE p(priority) AS (
                SELECT (SELECT min(priority) FROM stevedore_jobs WHERE state = 'available' AND queue = ?1)
                UNION ALL
                SELECT (SELECT s.priority FROM stevedore_jobs s
                        WHERE s.state = 'available' AND s.queue = ?1 AND s.priority > p.priority
                        ORDER BY s.priority LIMIT 1)
                FROM p WHERE p.priority IS NOT NULL
            )
            SELECT min((SELECT s.scheduled_at FROM stevedore_jobs s
                        WHERE s.state = 'available' AND s.queue = ?1 AND s.priority = p.priority
                        ORDER BY s.scheduled_at LIMIT 1))
            FROM p WHERE p.priority IS NOT NULL",
        )
        .bind(queue)
        .fetch_one(&self.inner.reader)
        .await
        .map_err(JobError::db("look up the next scheduled job"))?;
        Ok(next.map(|at| Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64)))
    }

    async fn subscribe(&self, queue: &str) -> Result<Wakeup, JobError> {
        Ok(self.inner.wakers.subscribe(queue))
    }

    async fn cancel(&self, id: JobId) -> Result<bool, JobError> {
        let done = sqlx::query(
            "UPDATE stevedore_jobs SET state = 'cancelled', finished_at = ?2, \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = ?1 AND state IN ('available', 'running')",
        )
        .bind(id)
        .bind(now_ms())
        .execute(&self.inner.writer)
        .await
        .map_err(JobError::db("cancel a job"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn retry(&self, id: JobId) -> Result<bool, JobError> {
        let queue: Option<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = 0, scheduled_at = ?2, \
             finished_at = NULL WHERE id = ?1 AND state IN ('dead', 'cancelled') RETURNING queue",
        )
        .bind(id)
        .bind(now_ms())
        .fetch_optional(&self.inner.writer)
        .await
        .map_err(JobError::db("retry a job"))?;
        if let Some(q) = &queue {
            self.inner.wakers.wake(q);
        }
        Ok(queue.is_some())
    }

    async fn retry_dead(&self, queue: Option<&str>) -> Result<u64, JobError> {
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = 0, scheduled_at = ?2, \
             finished_at = NULL WHERE state = 'dead' AND (?1 IS NULL OR queue = ?1) RETURNING queue",
        )
        .bind(queue)
        .bind(now_ms())
        .fetch_all(&self.inner.writer)
        .await
        .map_err(JobError::db("retry dead jobs"))?;
        for q in &queues {
            self.inner.wakers.wake(q);
        }
        Ok(queues.len() as u64)
    }

    async fn cleanup(&self, retention: &Retention) -> Result<u64, JobError> {
        let now = now_ms();
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM stevedore_jobs WHERE id IN (
                    SELECT id FROM stevedore_jobs
                    WHERE (state IN ('completed', 'cancelled') AND finished_at < ?1)
                       OR (state = 'dead' AND finished_at < ?2)
                    LIMIT 10000)",
            )
            .bind(now.saturating_sub(duration_ms(retention.finished)))
            .bind(now.saturating_sub(duration_ms(retention.dead)))
            .execute(&self.inner.writer)
            .await
            .map_err(JobError::db("delete finished jobs"))?;
            total += done.rows_affected();
            if done.rows_affected() < 10000 {
                return Ok(total);
            }
        }
    }

    async fn pause(&self, queue: &str) -> Result<(), JobError> {
        sqlx::query(
            "INSERT INTO stevedore_queues (name, paused) VALUES (?1, 1) \
             ON CONFLICT (name) DO UPDATE SET paused = 1",
        )
        .bind(queue)
        .execute(&self.inner.writer)
        .await
        .map_err(JobError::db("pause a queue"))?;
        Ok(())
    }

    async fn resume(&self, queue: &str) -> Result<(), JobError> {
        sqlx::query(
            "INSERT INTO stevedore_queues (name, paused) VALUES (?1, 0) \
             ON CONFLICT (name) DO UPDATE SET paused = 0",
        )
        .bind(queue)
        .execute(&self.inner.writer)
        .await
        .map_err(JobError::db("resume a queue"))?;
        self.inner.wakers.wake(queue);
        Ok(())
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, JobError> {
        let counts = sqlx::query_as(
            "SELECT queue, state, (state <> 'available' OR scheduled_at <= ?1) AS due, count(*) \
             FROM stevedore_jobs GROUP BY 1, 2, 3",
        )
        .bind(now_ms())
        .fetch_all(&self.inner.reader)
        .await
        .map_err(JobError::db("count jobs"))?;
        let pause_flags = sqlx::query_as("SELECT name, paused FROM stevedore_queues")
            .fetch_all(&self.inner.reader)
            .await
            .map_err(JobError::db("read queue flags"))?;
        QueueStats::tally(counts, pause_flags)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<JobRecord>, JobError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM stevedore_jobs \
             WHERE (?1 IS NULL OR state = ?1) AND (?2 IS NULL OR queue = ?2) AND id > ?3 \
             ORDER BY id LIMIT ?4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(query.state.map(JobState::as_str))
            .bind(query.queue.as_deref())
            .bind(query.after_id.unwrap_or(0))
            .bind(query.effective_limit())
            .fetch_all(&self.inner.reader)
            .await
            .map_err(JobError::db("list jobs"))?;
        rows.iter().map(record).collect()
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, JobError> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM stevedore_jobs WHERE id = ?1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.inner.reader)
            .await
            .map_err(JobError::db("read a job"))?;
        row.as_ref().map(record).transpose()
    }

    async fn now(&self) -> Result<DateTime<Utc>, JobError> {
        Ok(Utc::now())
    }

    async fn try_lead(&self, election: &str, owner: &str, ttl: Duration) -> Result<bool, JobError> {
        let now = now_ms();
        let row: Option<String> = sqlx::query_scalar(
            "INSERT INTO stevedore_leaders (name, owner, expires_at) VALUES (?1, ?2, ?3) \
             ON CONFLICT (name) DO UPDATE SET owner = excluded.owner, expires_at = excluded.expires_at \
             WHERE stevedore_leaders.owner = excluded.owner OR stevedore_leaders.expires_at < ?4 \
             RETURNING owner",
        )
        .bind(election)
        .bind(owner)
        .bind(now.saturating_add(duration_ms(ttl)))
        .bind(now)
        .fetch_optional(&self.inner.writer)
        .await
        .map_err(JobError::db("elect a leader"))?;
        Ok(row.is_some())
    }

    async fn resign(&self, election: &str, owner: &str) -> Result<(), JobError> {
        sqlx::query("DELETE FROM stevedore_leaders WHERE name = ?1 AND owner = ?2")
            .bind(election)
            .bind(owner)
            .execute(&self.inner.writer)
            .await
            .map_err(JobError::db("resign leadership"))?;
        Ok(())
    }

    async fn periodic_state(&self, name: &str, start: DateTime<Utc>) -> Result<DateTime<Utc>, JobError> {
        let mut tx = self.begin("read a periodic job's schedule state").await?;
        sqlx::query("INSERT INTO stevedore_periodic (name, last_tick) VALUES (?1, ?2) ON CONFLICT (name) DO NOTHING")
            .bind(name)
            .bind(start.timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(JobError::db("read a periodic job's schedule state"))?;
        let ms: i64 = sqlx::query_scalar("SELECT last_tick FROM stevedore_periodic WHERE name = ?1")
            .bind(name)
            .fetch_one(&mut *tx)
            .await
            .map_err(JobError::db("read a periodic job's schedule state"))?;
        tx.commit().await.map_err(JobError::db("read a periodic job's schedule state"))?;
        from_ms(0, "periodic last_tick", ms)
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        prev: DateTime<Utc>,
        tick: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool, JobError> {
        let mut tx = self.begin("enqueue a periodic job").await?;
        let moved = sqlx::query("UPDATE stevedore_periodic SET last_tick = ?3 WHERE name = ?1 AND last_tick = ?2")
            .bind(name)
            .bind(prev.timestamp_millis())
            .bind(tick.timestamp_millis())
            .execute(&mut *tx)
            .await
            .map_err(JobError::db("advance a periodic job's schedule"))?;
        if moved.rows_affected() != 1 {
            return Ok(false);
        }
        insert_jobs(&mut tx, std::slice::from_ref(job)).await?;
        tx.commit().await.map_err(JobError::db("enqueue a periodic job"))?;
        self.inner.wakers.wake(&job.queue);
        Ok(true)
    }
}
