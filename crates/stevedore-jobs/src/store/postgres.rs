//! PostgreSQL store: many worker processes share one database.
//!
//! Dequeue is one statement: a CTE picks due jobs with `FOR UPDATE SKIP LOCKED` in priority,
//! scheduled time, id order, and an UPDATE marks them running under the worker's lease. Inserts
//! fire a statement-level trigger that sends `NOTIFY stevedore_jobs, '<queue>'`, which wakes idle
//! workers at commit; workers poll slowly only as a fallback. All times are the database
//! server's clock, so worker hosts with skewed clocks agree on leases and schedules.
//!
//! The worker's own writes (fetch, heartbeat, outcomes, release, rescue) commit asynchronously
//! (`synchronous_commit = off` for that transaction only): they do not wait for the WAL flush.
//! A crash of the database server can lose the last few hundred milliseconds of them, which
//! only makes the jobs concerned run again (at-least-once holds); enqueues, in the store or in
//! the caller's transaction, keep the database's durability setting.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{PgConnection, Row, SqlSafeStr};
use tokio::sync::OnceCell;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::{JobStore, Lease, Outcome, Retention, SharedWakers, Wakers, Wakeup, parse_errors, to_u32};
use crate::error::JobError;
use crate::job::{ClaimedJob, JobId, JobRecord, JobState, ListQuery, NewJob, QueueStats, duration_ms};

/// The NOTIFY channel inserts are announced on (payload: the queue name).
pub const NOTIFY_CHANNEL: &str = "stevedore_jobs";

const MIGRATIONS_TABLE: &str = "stevedore_jobs_migrations";

/// Jobs in PostgreSQL. Cheap to clone (clones share the pool and the LISTEN connection).
///
/// ```no_run
/// use stevedore_jobs::{JobStore, NewJob, PostgresStore};
/// # async fn demo() -> Result<(), stevedore_jobs::JobError> {
/// let store = PostgresStore::connect("postgres://postgres@127.0.0.1/app").await?;
/// store.enqueue(&NewJob::raw("resize", r#"{"image": 7}"#)).await?;
/// # Ok(()) }
/// ```
#[derive(Clone, Debug)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    pool: PgPool,
    wakers: SharedWakers,
    listener: OnceCell<()>,
    stop: CancellationToken,
    _stop_on_drop: DropGuard,
}

impl PostgresStore {
    /// Connects to `url` and applies the migrations.
    pub async fn connect(url: &str) -> Result<Self, JobError> {
        let options = PgConnectOptions::from_str(url).map_err(JobError::db("parse the database URL"))?;
        let pool =
            PgPoolOptions::new().max_connections(10).connect_with(options).await.map_err(JobError::db("connect"))?;
        let store = Self::from_pool(pool);
        store.migrate().await?;
        Ok(store)
    }

    /// Uses an existing pool as it is (call [`JobStore::migrate`] before the first use). The
    /// pool's connections find the tables through their `search_path`.
    pub fn from_pool(pool: PgPool) -> Self {
        let stop = CancellationToken::new();
        Self {
            inner: Arc::new(Inner {
                pool,
                wakers: Arc::new(Wakers::default()),
                listener: OnceCell::new(),
                _stop_on_drop: stop.clone().drop_guard(),
                stop,
            }),
        }
    }

    /// The pool the store uses.
    pub fn pool(&self) -> &PgPool {
        &self.inner.pool
    }

    /// Inserts jobs through the caller's connection, typically inside the caller's own
    /// transaction: the jobs exist if and only if that transaction commits, and idle workers
    /// are woken at commit.
    ///
    /// ```no_run
    /// # use stevedore_jobs::{NewJob, PostgresStore};
    /// # async fn demo(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO orders (id) VALUES (42)").execute(&mut *tx).await?;
    /// PostgresStore::enqueue_in(&mut tx, &[NewJob::raw("ship_order", r#"{"order": 42}"#)]).await?;
    /// tx.commit().await?;
    /// # Ok(()) }
    /// ```
    pub async fn enqueue_in(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
        insert_jobs(conn, jobs).await
    }

    async fn notify(&self, queues: Vec<String>) -> Result<(), JobError> {
        if queues.is_empty() {
            return Ok(());
        }
        for q in &queues {
            self.inner.wakers.wake(q);
        }
        sqlx::query("SELECT pg_notify($1, q) FROM (SELECT DISTINCT q FROM UNNEST($2::text[]) AS q) AS d")
            .bind(NOTIFY_CHANNEL)
            .bind(queues)
            .execute(&self.inner.pool)
            .await
            .map_err(JobError::db("notify workers"))?;
        Ok(())
    }

    async fn start_listener(&self) -> Result<(), JobError> {
        let mut listener =
            PgListener::connect_with(&self.inner.pool).await.map_err(JobError::db("open the LISTEN connection"))?;
        listener.listen(NOTIFY_CHANNEL).await.map_err(JobError::db("LISTEN"))?;
        let wakers = Arc::clone(&self.inner.wakers);
        let stop = self.inner.stop.clone();
        tokio::spawn(async move {
            loop {
                let received = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = listener.recv() => r,
                };
                match received {
                    Ok(note) => wakers.wake(note.payload()),
                    Err(error) => {
                        // Notifications may have been missed while the connection was down:
                        // wake every queue so its worker fetches once; recv() reconnects.
                        tracing::warn!(%error, "job store: LISTEN connection failed; reconnecting");
                        wakers.wake_all();
                        tokio::select! {
                            _ = stop.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

fn migrator() -> Migrator {
    let mut migrator = Migrator::with_migrations(vec![
        Migration::new(
            1,
            "jobs".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0001_jobs.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            2,
            "due index".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0002_due_index.sql").into_sql_str(),
            false,
        ),
        Migration::new(
            3,
            "drop due index".into(),
            MigrationType::Simple,
            include_str!("../../migrations/postgres/0003_drop_due_index.sql").into_sql_str(),
            false,
        ),
    ]);
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    migrator
}

const INSERT_JOBS: &str = r#"
INSERT INTO stevedore_jobs (kind, queue, payload, priority, scheduled_at, max_attempts, timeout_ms, unique_key)
SELECT t.kind, t.queue, t.payload::jsonb, t.priority,
       COALESCE(t.run_at, now() + t.delay_ms * interval '1 millisecond'),
       t.max_attempts, t.timeout_ms, t.unique_key
FROM UNNEST($1::text[], $2::text[], $3::text[], $4::int2[], $5::timestamptz[], $6::int8[],
            $7::int4[], $8::int8[], $9::text[])
     WITH ORDINALITY AS t(kind, queue, payload, priority, run_at, delay_ms, max_attempts, timeout_ms, unique_key, ord)
ORDER BY t.ord
ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL DO NOTHING
RETURNING id, unique_key
"#;

async fn insert_jobs(conn: &mut PgConnection, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
    if jobs.is_empty() {
        return Ok(Vec::new());
    }
    let n = jobs.len();
    let mut kinds = Vec::with_capacity(n);
    let mut queues = Vec::with_capacity(n);
    let mut payloads = Vec::with_capacity(n);
    let mut priorities = Vec::with_capacity(n);
    let mut run_ats = Vec::with_capacity(n);
    let mut delays = Vec::with_capacity(n);
    let mut max_attempts = Vec::with_capacity(n);
    let mut timeouts = Vec::with_capacity(n);
    let mut keys = Vec::with_capacity(n);
    for job in jobs {
        kinds.push(job.kind.as_str());
        queues.push(job.queue.as_str());
        payloads.push(job.payload.as_str());
        priorities.push(job.priority);
        run_ats.push(job.run_at);
        delays.push(job.delay_ms());
        max_attempts.push(i32::try_from(job.max_attempts).unwrap_or(i32::MAX));
        timeouts.push(job.timeout_ms());
        keys.push(job.unique_key.as_deref());
    }
    let rows = sqlx::query(INSERT_JOBS)
        .bind(kinds)
        .bind(queues)
        .bind(payloads)
        .bind(priorities)
        .bind(run_ats)
        .bind(delays)
        .bind(max_attempts)
        .bind(timeouts)
        .bind(keys)
        .fetch_all(&mut *conn)
        .await
        .map_err(JobError::db("enqueue jobs"))?;
    // Ids are assigned in input order; jobs without a key are always inserted, keyed ones
    // are matched by key (the first job of a key in the batch wins).
    let mut plain = Vec::new();
    let mut keyed = HashMap::new();
    for row in rows {
        let id: i64 = row.try_get(0).map_err(JobError::db("read enqueued ids"))?;
        let key: Option<String> = row.try_get(1).map_err(JobError::db("read enqueued ids"))?;
        match key {
            Some(key) => {
                keyed.insert(key, id);
            }
            None => plain.push(id),
        }
    }
    plain.sort_unstable();
    let mut plain = plain.into_iter();
    Ok(jobs
        .iter()
        .map(|job| match &job.unique_key {
            Some(key) => keyed.remove(key),
            None => plain.next(),
        })
        .collect())
}

const FETCH: &str = r#"
WITH picked AS (
    SELECT id FROM stevedore_jobs
    WHERE state = 'available' AND queue = $1 AND scheduled_at <= now()
      AND NOT EXISTS (SELECT 1 FROM stevedore_queues q WHERE q.name = $1 AND q.paused)
    ORDER BY priority, scheduled_at, id
    LIMIT $2
    FOR UPDATE SKIP LOCKED
)
UPDATE stevedore_jobs j
SET state = 'running', attempt = j.attempt + 1, attempted_at = now(),
    lease_owner = $3, lease_expires_at = now() + $4::int8 * interval '1 millisecond'
FROM picked, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit WHERE j.id = picked.id
RETURNING j.id, j.kind, j.queue, j.payload::text, j.attempt, j.max_attempts, j.timeout_ms
"#;

const RECORD_COLUMNS: &str = "id, kind, queue, state, payload::text, priority, attempt, max_attempts, \
     timeout_ms, unique_key, scheduled_at, created_at, attempted_at, finished_at, lease_owner, \
     lease_expires_at, errors::text";

fn record(row: &PgRow) -> Result<JobRecord, JobError> {
    let get = JobError::db("read a job");
    let id: i64 = row.try_get(0).map_err(JobError::db("read a job"))?;
    let inner = || -> Result<JobRecord, sqlx::Error> {
        Ok(JobRecord {
            id,
            kind: row.try_get(1)?,
            queue: row.try_get(2)?,
            state: JobState::Available,
            payload: row.try_get(4)?,
            priority: row.try_get(5)?,
            attempt: 0,
            max_attempts: 0,
            timeout: row.try_get::<Option<i64>, _>(8)?.map(|ms| Duration::from_millis(ms.max(0) as u64)),
            unique_key: row.try_get(9)?,
            scheduled_at: row.try_get(10)?,
            created_at: row.try_get(11)?,
            attempted_at: row.try_get(12)?,
            finished_at: row.try_get(13)?,
            lease_owner: row.try_get(14)?,
            lease_expires_at: row.try_get(15)?,
            errors: Vec::new(),
        })
    };
    let mut rec = inner().map_err(get)?;
    let state: String = row.try_get(3).map_err(JobError::db("read a job"))?;
    rec.state = JobState::from_str(&state)?;
    let attempt: i32 = row.try_get(6).map_err(JobError::db("read a job"))?;
    let max: i32 = row.try_get(7).map_err(JobError::db("read a job"))?;
    rec.attempt = to_u32(id, "attempt", attempt.into())?;
    rec.max_attempts = to_u32(id, "max_attempts", max.into())?;
    let errors: String = row.try_get(16).map_err(JobError::db("read a job"))?;
    rec.errors = parse_errors(id, &errors)?;
    Ok(rec)
}

fn claimed(row: &PgRow) -> Result<ClaimedJob, JobError> {
    let err = || JobError::db("read fetched jobs");
    let id: i64 = row.try_get(0).map_err(err())?;
    let attempt: i32 = row.try_get(4).map_err(err())?;
    let max: i32 = row.try_get(5).map_err(err())?;
    let timeout: Option<i64> = row.try_get(6).map_err(err())?;
    Ok(ClaimedJob {
        id,
        kind: row.try_get(1).map_err(err())?,
        queue: row.try_get(2).map_err(err())?,
        payload: row.try_get(3).map_err(err())?,
        attempt: to_u32(id, "attempt", attempt.into())?,
        max_attempts: to_u32(id, "max_attempts", max.into())?,
        timeout: timeout.map(|ms| Duration::from_millis(ms.max(0) as u64)),
    })
}

const APPEND_ERROR: &str = "errors || jsonb_build_array(jsonb_build_object('attempt', j.attempt, \
     'at', (extract(epoch FROM now()) * 1000)::int8, 'error', t.error))";

impl JobStore for PostgresStore {
    fn backend(&self) -> &'static str {
        "postgres"
    }

    async fn migrate(&self) -> Result<(), JobError> {
        migrator().run(&self.inner.pool).await?;
        Ok(())
    }

    async fn enqueue_many(&self, jobs: &[NewJob]) -> Result<Vec<Option<JobId>>, JobError> {
        let mut conn = self.inner.pool.acquire().await.map_err(JobError::db("enqueue jobs"))?;
        let ids = insert_jobs(&mut conn, jobs).await?;
        // Same-process workers need no round trip through NOTIFY.
        for job in jobs {
            self.inner.wakers.wake(&job.queue);
        }
        Ok(ids)
    }

    async fn fetch(&self, queue: &str, limit: u32, lease: &Lease) -> Result<Vec<ClaimedJob>, JobError> {
        let rows = sqlx::query(FETCH)
            .bind(queue)
            .bind(i64::from(limit))
            .bind(&lease.owner)
            .bind(duration_ms(lease.ttl))
            .fetch_all(&self.inner.pool)
            .await
            .map_err(JobError::db("fetch jobs"))?;
        rows.iter().map(claimed).collect()
    }

    async fn heartbeat(&self, ids: &[JobId], lease: &Lease) -> Result<Vec<JobId>, JobError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        sqlx::query_scalar(
            "UPDATE stevedore_jobs SET lease_expires_at = now() + $3::int8 * interval '1 millisecond' \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
             WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2 RETURNING id",
        )
        .bind(ids)
        .bind(&lease.owner)
        .bind(duration_ms(lease.ttl))
        .fetch_all(&self.inner.pool)
        .await
        .map_err(JobError::db("renew job leases"))
    }

    async fn finish(&self, outcomes: &[Outcome], owner: &str) -> Result<Vec<JobId>, JobError> {
        let mut completed = Vec::new();
        let (mut retry_ids, mut retry_delays, mut retry_errors) = (Vec::new(), Vec::new(), Vec::new());
        let (mut dead_ids, mut dead_errors) = (Vec::new(), Vec::new());
        for outcome in outcomes {
            match outcome {
                Outcome::Completed { id } => completed.push(*id),
                Outcome::Retry { id, delay, error } => {
                    retry_ids.push(*id);
                    retry_delays.push(duration_ms(*delay));
                    retry_errors.push(error.as_str());
                }
                Outcome::Dead { id, error } => {
                    dead_ids.push(*id);
                    dead_errors.push(error.as_str());
                }
            }
        }
        let pool = &self.inner.pool;
        let mut applied = Vec::with_capacity(outcomes.len());
        if !completed.is_empty() {
            let ids: Vec<i64> = sqlx::query_scalar(
                "UPDATE stevedore_jobs SET state = 'completed', finished_at = now(), \
                 lease_owner = NULL, lease_expires_at = NULL \
                 FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
             WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2 RETURNING id",
            )
            .bind(&completed)
            .bind(owner)
            .fetch_all(pool)
            .await
            .map_err(JobError::db("record completed jobs"))?;
            applied.extend(ids);
        }
        if !retry_ids.is_empty() {
            let sql = format!(
                "UPDATE stevedore_jobs j SET state = 'available', \
                 scheduled_at = now() + t.delay_ms * interval '1 millisecond', \
                 lease_owner = NULL, lease_expires_at = NULL, errors = j.{APPEND_ERROR} \
                 FROM UNNEST($1::int8[], $2::int8[], $3::text[]) AS t(id, delay_ms, error), (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
                 WHERE j.id = t.id AND j.state = 'running' AND j.lease_owner = $4 RETURNING j.id"
            );
            let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(&retry_ids)
                .bind(&retry_delays)
                .bind(&retry_errors)
                .bind(owner)
                .fetch_all(pool)
                .await
                .map_err(JobError::db("record failed jobs for retry"))?;
            applied.extend(ids);
        }
        if !dead_ids.is_empty() {
            let sql = format!(
                "UPDATE stevedore_jobs j SET state = 'dead', finished_at = now(), \
                 lease_owner = NULL, lease_expires_at = NULL, errors = j.{APPEND_ERROR} \
                 FROM UNNEST($1::int8[], $2::text[]) AS t(id, error), (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
                 WHERE j.id = t.id AND j.state = 'running' AND j.lease_owner = $3 RETURNING j.id"
            );
            let ids: Vec<i64> = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind(&dead_ids)
                .bind(&dead_errors)
                .bind(owner)
                .fetch_all(pool)
                .await
                .map_err(JobError::db("record dead jobs"))?;
            applied.extend(ids);
        }
        Ok(applied)
    }

    async fn release(&self, ids: &[JobId], owner: &str) -> Result<u64, JobError> {
        if ids.is_empty() {
            return Ok(0);
        }
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = attempt - 1, \
             lease_owner = NULL, lease_expires_at = NULL \
             FROM (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit \
             WHERE id = ANY($1) AND state = 'running' AND lease_owner = $2 RETURNING queue",
        )
        .bind(ids)
        .bind(owner)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(JobError::db("release jobs"))?;
        let n = queues.len() as u64;
        self.notify(queues).await?;
        Ok(n)
    }

    async fn rescue(&self) -> Result<u64, JobError> {
        let rows = sqlx::query(
            "WITH expired AS (
                SELECT id FROM stevedore_jobs
                WHERE state = 'running' AND lease_expires_at < now()
                FOR UPDATE SKIP LOCKED
            )
            UPDATE stevedore_jobs j SET
                state = CASE WHEN j.attempt >= j.max_attempts THEN 'dead' ELSE 'available' END,
                finished_at = CASE WHEN j.attempt >= j.max_attempts THEN now() END,
                errors = j.errors || jsonb_build_array(jsonb_build_object(
                    'attempt', j.attempt, 'at', (extract(epoch FROM now()) * 1000)::int8,
                    'error', 'lease expired: worker ' || coalesce(j.lease_owner, '?')
                        || ' stopped renewing it (crashed, killed or stalled)')),
                lease_owner = NULL, lease_expires_at = NULL
            FROM expired, (SELECT set_config('synchronous_commit', 'off', true)) AS async_commit WHERE j.id = expired.id
            RETURNING j.queue, j.state",
        )
        .fetch_all(&self.inner.pool)
        .await
        .map_err(JobError::db("rescue jobs with expired leases"))?;
        let n = rows.len() as u64;
        let mut queues = Vec::new();
        for row in rows {
            let state: String = row.try_get(1).map_err(JobError::db("rescue jobs"))?;
            if state == "available" {
                queues.push(row.try_get::<String, _>(0).map_err(JobError::db("rescue jobs"))?);
            }
        }
        self.notify(queues).await?;
        Ok(n)
    }

    async fn time_until_due(&self, queue: &str) -> Result<Option<Duration>, JobError> {
        let ms: Option<f64> = sqlx::query_scalar(
            // The earliest job of each priority, one dequeue-index probe per distinct priority
            // (a loose index scan), then the earliest of those.
            "WITH RECURSIVE p AS (
                (SELECT priority, scheduled_at FROM stevedore_jobs
                 WHERE state = 'available' AND queue = $1 ORDER BY priority, scheduled_at LIMIT 1)
                UNION ALL
                SELECT n.priority, n.scheduled_at FROM p, LATERAL (
                    SELECT priority, scheduled_at FROM stevedore_jobs
                    WHERE state = 'available' AND queue = $1 AND priority > p.priority
                    ORDER BY priority, scheduled_at LIMIT 1) n
            )
            SELECT (extract(epoch FROM (min(scheduled_at) - now())) * 1000)::float8 FROM p",
        )
        .bind(queue)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(JobError::db("look up the next scheduled job"))?;
        Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
    }

    async fn subscribe(&self, queue: &str) -> Result<Wakeup, JobError> {
        self.inner.listener.get_or_try_init(|| self.start_listener()).await?;
        Ok(self.inner.wakers.subscribe(queue))
    }

    async fn cancel(&self, id: JobId) -> Result<bool, JobError> {
        let done = sqlx::query(
            "UPDATE stevedore_jobs SET state = 'cancelled', finished_at = now(), \
             lease_owner = NULL, lease_expires_at = NULL \
             WHERE id = $1 AND state IN ('available', 'running')",
        )
        .bind(id)
        .execute(&self.inner.pool)
        .await
        .map_err(JobError::db("cancel a job"))?;
        Ok(done.rows_affected() == 1)
    }

    async fn retry(&self, id: JobId) -> Result<bool, JobError> {
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = 0, scheduled_at = now(), \
             finished_at = NULL WHERE id = $1 AND state IN ('dead', 'cancelled') RETURNING queue",
        )
        .bind(id)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(JobError::db("retry a job"))?;
        let found = !queues.is_empty();
        self.notify(queues).await?;
        Ok(found)
    }

    async fn retry_dead(&self, queue: Option<&str>) -> Result<u64, JobError> {
        let queues: Vec<String> = sqlx::query_scalar(
            "UPDATE stevedore_jobs SET state = 'available', attempt = 0, scheduled_at = now(), \
             finished_at = NULL WHERE state = 'dead' AND ($1::text IS NULL OR queue = $1) \
             RETURNING queue",
        )
        .bind(queue)
        .fetch_all(&self.inner.pool)
        .await
        .map_err(JobError::db("retry dead jobs"))?;
        let n = queues.len() as u64;
        let mut distinct = queues;
        distinct.sort();
        distinct.dedup();
        self.notify(distinct).await?;
        Ok(n)
    }

    async fn cleanup(&self, retention: &Retention) -> Result<u64, JobError> {
        let mut total = 0;
        loop {
            let done = sqlx::query(
                "DELETE FROM stevedore_jobs WHERE id IN (
                    SELECT id FROM stevedore_jobs
                    WHERE (state IN ('completed', 'cancelled')
                           AND finished_at < now() - $1::int8 * interval '1 millisecond')
                       OR (state = 'dead' AND finished_at < now() - $2::int8 * interval '1 millisecond')
                    LIMIT 10000)",
            )
            .bind(duration_ms(retention.finished))
            .bind(duration_ms(retention.dead))
            .execute(&self.inner.pool)
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
            "INSERT INTO stevedore_queues (name, paused) VALUES ($1, true) \
             ON CONFLICT (name) DO UPDATE SET paused = true",
        )
        .bind(queue)
        .execute(&self.inner.pool)
        .await
        .map_err(JobError::db("pause a queue"))?;
        Ok(())
    }

    async fn resume(&self, queue: &str) -> Result<(), JobError> {
        sqlx::query(
            "INSERT INTO stevedore_queues (name, paused) VALUES ($1, false) \
             ON CONFLICT (name) DO UPDATE SET paused = false",
        )
        .bind(queue)
        .execute(&self.inner.pool)
        .await
        .map_err(JobError::db("resume a queue"))?;
        self.notify(vec![queue.to_string()]).await
    }

    async fn stats(&self) -> Result<Vec<QueueStats>, JobError> {
        let pool = &self.inner.pool;
        let counts = sqlx::query_as(
            "SELECT queue, state, (state <> 'available' OR scheduled_at <= now()) AS due, count(*) \
             FROM stevedore_jobs GROUP BY 1, 2, 3",
        )
        .fetch_all(pool)
        .await
        .map_err(JobError::db("count jobs"))?;
        let pause_flags = sqlx::query_as("SELECT name, paused FROM stevedore_queues")
            .fetch_all(pool)
            .await
            .map_err(JobError::db("read queue flags"))?;
        QueueStats::tally(counts, pause_flags)
    }

    async fn list(&self, query: &ListQuery) -> Result<Vec<JobRecord>, JobError> {
        let sql = format!(
            "SELECT {RECORD_COLUMNS} FROM stevedore_jobs \
             WHERE ($1::text IS NULL OR state = $1) AND ($2::text IS NULL OR queue = $2) AND id > $3 \
             ORDER BY id LIMIT $4"
        );
        let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(query.state.map(JobState::as_str))
            .bind(query.queue.as_deref())
            .bind(query.after_id.unwrap_or(0))
            .bind(query.effective_limit())
            .fetch_all(&self.inner.pool)
            .await
            .map_err(JobError::db("list jobs"))?;
        rows.iter().map(record).collect()
    }

    async fn get(&self, id: JobId) -> Result<Option<JobRecord>, JobError> {
        let sql = format!("SELECT {RECORD_COLUMNS} FROM stevedore_jobs WHERE id = $1");
        let row = sqlx::query(sqlx::AssertSqlSafe(sql))
            .bind(id)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(JobError::db("read a job"))?;
        row.as_ref().map(record).transpose()
    }

    async fn now(&self) -> Result<DateTime<Utc>, JobError> {
        sqlx::query_scalar("SELECT now()")
            .fetch_one(&self.inner.pool)
            .await
            .map_err(JobError::db("read the database clock"))
    }

    async fn try_lead(&self, election: &str, owner: &str, ttl: Duration) -> Result<bool, JobError> {
        let row: Option<String> = sqlx::query_scalar(
            "INSERT INTO stevedore_leaders (name, owner, expires_at) \
             VALUES ($1, $2, now() + $3::int8 * interval '1 millisecond') \
             ON CONFLICT (name) DO UPDATE SET owner = EXCLUDED.owner, expires_at = EXCLUDED.expires_at \
             WHERE stevedore_leaders.owner = EXCLUDED.owner OR stevedore_leaders.expires_at < now() \
             RETURNING owner",
        )
        .bind(election)
        .bind(owner)
        .bind(duration_ms(ttl))
        .fetch_optional(&self.inner.pool)
        .await
        .map_err(JobError::db("elect a leader"))?;
        Ok(row.is_some())
    }

    async fn resign(&self, election: &str, owner: &str) -> Result<(), JobError> {
        sqlx::query("DELETE FROM stevedore_leaders WHERE name = $1 AND owner = $2")
            .bind(election)
            .bind(owner)
            .execute(&self.inner.pool)
            .await
            .map_err(JobError::db("resign leadership"))?;
        Ok(())
    }

    async fn periodic_state(&self, name: &str, start: DateTime<Utc>) -> Result<DateTime<Utc>, JobError> {
        sqlx::query_scalar(
            "WITH ins AS (
                INSERT INTO stevedore_periodic (name, last_tick) VALUES ($1, $2)
                ON CONFLICT (name) DO NOTHING RETURNING last_tick
            )
            SELECT last_tick FROM ins
            UNION ALL SELECT last_tick FROM stevedore_periodic WHERE name = $1
            LIMIT 1",
        )
        .bind(name)
        .bind(start)
        .fetch_one(&self.inner.pool)
        .await
        .map_err(JobError::db("read a periodic job's schedule state"))
    }

    async fn enqueue_tick(
        &self,
        name: &str,
        prev: DateTime<Utc>,
        tick: DateTime<Utc>,
        job: &NewJob,
    ) -> Result<bool, JobError> {
        let mut tx = self.inner.pool.begin().await.map_err(JobError::db("enqueue a periodic job"))?;
        let moved = sqlx::query("UPDATE stevedore_periodic SET last_tick = $3 WHERE name = $1 AND last_tick = $2")
            .bind(name)
            .bind(prev)
            .bind(tick)
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
