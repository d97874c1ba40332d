//! The transactional outbox: messages written in the caller's transaction, relayed later.
//!
//! [`enqueue`] inserts the message into the `stevedore_outbox` table through the caller's own
//! connection, normally its open transaction. The message therefore exists if and only if the
//! business change commits. A [`crate::relay::Relay`] then publishes pending rows in order and
//! marks them delivered once the broker confirms.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sqlx::{PgPool, SqlitePool};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::Message;
use crate::db::{BusConnection, Db, OutboxError, db_err};

/// Writes `message` to the outbox through `conn`, usually the caller's open transaction.
///
/// ```
/// # use stevedore_bus::{Message, outbox::{Outbox, enqueue}};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
/// let outbox = Outbox::sqlite(pool.clone());
/// outbox.migrate().await?;
///
/// let mut tx = pool.begin().await?;
/// // ... the business change, on the same transaction ...
/// enqueue(&mut *tx, &Message::new("orders.created", "order-7", "{}")).await?;
/// tx.commit().await?; // the message exists only if this commits
/// assert_eq!(outbox.pending().await?, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub async fn enqueue<C: BusConnection + ?Sized>(conn: &mut C, message: &Message) -> Result<(), OutboxError> {
    message.validate().map_err(|reason| OutboxError::InvalidMessage { id: message.id, reason })?;
    conn.insert_outbox(message).await
}

/// A row waiting in the outbox.
#[derive(Debug, Clone)]
pub(crate) struct Pending {
    pub(crate) seq: i64,
    pub(crate) message: Message,
}

/// The outbox table of one database: migrations, the relay's reads and writes, housekeeping.
#[derive(Debug, Clone)]
pub struct Outbox {
    pub(crate) db: Db,
    wake: Arc<Notify>,
}

type SqliteRow = (i64, String, String, String, Vec<u8>, String);
type PgRow = (i64, Uuid, String, String, Vec<u8>, String);

fn to_message(id: Uuid, topic: String, key: String, payload: Vec<u8>, headers: String) -> Message {
    // The headers column is written by `enqueue` from a map, so it always parses; a row edited
    // by hand into something else is still relayed, without its headers, rather than stuck.
    let headers = serde_json::from_str(&headers).unwrap_or_else(|error| {
        tracing::warn!(%id, %error, "outbox row has unreadable headers; relaying without them");
        Default::default()
    });
    Message { id, topic, key, payload: Bytes::from(payload), headers }
}

impl Outbox {
    /// The outbox in a SQLite database.
    pub fn sqlite(pool: SqlitePool) -> Self {
        Self { db: Db::Sqlite(pool), wake: Arc::new(Notify::new()) }
    }

    /// The outbox in a PostgreSQL database (the tables go to the connection's `search_path`).
    pub fn postgres(pool: PgPool) -> Self {
        Self { db: Db::Postgres(pool), wake: Arc::new(Notify::new()) }
    }

    /// Creates the outbox and processed-messages tables (embedded migrations, tracked in
    /// [`crate::db::MIGRATIONS_TABLE`]).
    pub async fn migrate(&self) -> Result<(), OutboxError> {
        self.db.migrate().await
    }

    /// Tells a relay in this process that rows were committed, so it does not wait for its next
    /// poll. Optional: the relay polls anyway.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) async fn woken(&self) {
        self.wake.notified().await
    }

    /// How many messages wait to be delivered.
    pub async fn pending(&self) -> Result<i64, OutboxError> {
        const SQL: &str = "SELECT COUNT(*) FROM stevedore_outbox WHERE delivered_at IS NULL AND dead_at IS NULL";
        let n: i64 = match &self.db {
            Db::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
        }
        .map_err(db_err("counting pending messages"))?;
        Ok(n)
    }

    /// The oldest undelivered rows, in write order, leaving out `exclude` (rows in flight).
    pub(crate) async fn fetch_pending(&self, limit: usize, exclude: &[i64]) -> Result<Vec<Pending>, OutboxError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let err = db_err("reading pending messages");
        match &self.db {
            Db::Sqlite(p) => {
                let rows: Vec<SqliteRow> = sqlx::query_as(
                    "SELECT seq, id, topic, msg_key, payload, headers FROM stevedore_outbox \
                     WHERE delivered_at IS NULL AND dead_at IS NULL \
                     AND seq NOT IN (SELECT value FROM json_each(?)) ORDER BY seq LIMIT ?",
                )
                .bind(serde_json::to_string(exclude).unwrap_or_else(|_| "[]".into()))
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(err)?;
                Ok(rows
                    .into_iter()
                    .map(|(seq, id, topic, key, payload, headers)| {
                        // Written by `enqueue` from a Uuid; an unparsable id gets a fresh one so
                        // the row is still delivered (consumers see it as a new message).
                        let id = Uuid::parse_str(&id).unwrap_or_else(|_| Uuid::now_v7());
                        Pending { seq, message: to_message(id, topic, key, payload, headers) }
                    })
                    .collect())
            }
            Db::Postgres(p) => {
                let rows: Vec<PgRow> = sqlx::query_as(
                    "SELECT seq, id, topic, msg_key, payload, headers FROM stevedore_outbox \
                     WHERE delivered_at IS NULL AND dead_at IS NULL AND seq <> ALL($1) ORDER BY seq LIMIT $2",
                )
                .bind(exclude)
                .bind(limit)
                .fetch_all(p)
                .await
                .map_err(err)?;
                Ok(rows
                    .into_iter()
                    .map(|(seq, id, topic, key, payload, headers)| Pending {
                        seq,
                        message: to_message(id, topic, key, payload, headers),
                    })
                    .collect())
            }
        }
    }

    /// Marks exactly these rows delivered (never a range: a concurrent transaction may commit a
    /// lower sequence number later).
    pub(crate) async fn mark_delivered(&self, seqs: &[i64]) -> Result<(), OutboxError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let err = db_err("marking messages delivered");
        match &self.db {
            Db::Sqlite(p) => {
                let list = serde_json::to_string(seqs).unwrap_or_else(|_| "[]".into());
                sqlx::query(
                    "UPDATE stevedore_outbox \
                     SET delivered_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) \
                     WHERE seq IN (SELECT value FROM json_each(?))",
                )
                .bind(list)
                .execute(p)
                .await
                .map_err(err)?;
            }
            Db::Postgres(p) => {
                sqlx::query("UPDATE stevedore_outbox SET delivered_at = now() WHERE seq = ANY($1)")
                    .bind(seqs)
                    .execute(p)
                    .await
                    .map_err(err)?;
            }
        }
        Ok(())
    }

    /// Records a failed delivery attempt on a row, for operators reading the table.
    pub(crate) async fn record_failure(&self, seq: i64, error: &str) -> Result<(), OutboxError> {
        let err = db_err("recording a failed delivery");
        match &self.db {
            Db::Sqlite(p) => {
                sqlx::query("UPDATE stevedore_outbox SET attempts = attempts + 1, last_error = ? WHERE seq = ?")
                    .bind(error)
                    .bind(seq)
                    .execute(p)
                    .await
                    .map_err(err)?
                    .rows_affected()
            }
            Db::Postgres(p) => {
                sqlx::query("UPDATE stevedore_outbox SET attempts = attempts + 1, last_error = $1 WHERE seq = $2")
                    .bind(error)
                    .bind(seq)
                    .execute(p)
                    .await
                    .map_err(err)?
                    .rows_affected()
            }
        };
        Ok(())
    }

    /// Sets a row aside as undeliverable (the broker refuses it for good, e.g. an invalid
    /// topic), so it does not block the rows behind it. It stays in the table with its error.
    pub(crate) async fn mark_dead(&self, seq: i64, error: &str) -> Result<(), OutboxError> {
        let err = db_err("setting aside an undeliverable message");
        match &self.db {
            Db::Sqlite(p) => sqlx::query(
                "UPDATE stevedore_outbox SET attempts = attempts + 1, last_error = ?, \
                 dead_at = CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) WHERE seq = ?",
            )
            .bind(error)
            .bind(seq)
            .execute(p)
            .await
            .map_err(err)?
            .rows_affected(),
            Db::Postgres(p) => sqlx::query(
                "UPDATE stevedore_outbox SET attempts = attempts + 1, last_error = $1, dead_at = now() \
                 WHERE seq = $2",
            )
            .bind(error)
            .bind(seq)
            .execute(p)
            .await
            .map_err(err)?
            .rows_affected(),
        };
        Ok(())
    }

    /// How many messages were set aside as undeliverable (see the `dead_at` and `last_error`
    /// columns).
    pub async fn undeliverable(&self) -> Result<i64, OutboxError> {
        const SQL: &str = "SELECT COUNT(*) FROM stevedore_outbox WHERE dead_at IS NOT NULL";
        let n: i64 = match &self.db {
            Db::Sqlite(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
            Db::Postgres(p) => sqlx::query_scalar(SQL).fetch_one(p).await,
        }
        .map_err(db_err("counting undeliverable messages"))?;
        Ok(n)
    }

    /// Deletes delivered rows older than `age`, and processed-message records older than `age`;
    /// returns how many rows went. The relay calls this periodically.
    pub async fn purge(&self, age: Duration) -> Result<u64, OutboxError> {
        let err = db_err("purging delivered messages");
        let millis = i64::try_from(age.as_millis()).unwrap_or(i64::MAX);
        let n = match &self.db {
            Db::Sqlite(p) => {
                let cutoff = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER) - ?";
                let a = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM stevedore_outbox WHERE delivered_at IS NOT NULL AND delivered_at < {cutoff}"
                )))
                .bind(millis)
                .execute(p)
                .await
                .map_err(db_err("purging delivered messages"))?;
                let b = sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DELETE FROM stevedore_processed WHERE processed_at < {cutoff}"
                )))
                .bind(millis)
                .execute(p)
                .await
                .map_err(err)?;
                a.rows_affected() + b.rows_affected()
            }
            Db::Postgres(p) => {
                let a = sqlx::query(
                    "DELETE FROM stevedore_outbox WHERE delivered_at IS NOT NULL \
                     AND delivered_at < now() - make_interval(secs => $1::double precision / 1000)",
                )
                .bind(millis)
                .execute(p)
                .await
                .map_err(db_err("purging delivered messages"))?;
                let b = sqlx::query(
                    "DELETE FROM stevedore_processed \
                     WHERE processed_at < now() - make_interval(secs => $1::double precision / 1000)",
                )
                .bind(millis)
                .execute(p)
                .await
                .map_err(err)?;
                a.rows_affected() + b.rows_affected()
            }
        };
        Ok(n)
    }
}
