//! The database side: embedded migrations and the connection types the outbox and the
//! deduplicator write through.

use std::borrow::Cow;
use std::future::Future;

use sqlx::migrate::{Migration, MigrationType, Migrator};
use sqlx::{PgConnection, PgPool, SqlSafeStr, SqliteConnection, SqlitePool};
use uuid::Uuid;

use crate::Message;

/// Name of the table recording which of this crate's migrations ran (kept apart from the
/// application's own `_sqlx_migrations`).
pub const MIGRATIONS_TABLE: &str = "_stevedore_bus_migrations";

const SQLITE_MIGRATIONS: &[(i64, &str, &str)] = &[(1, "outbox", include_str!("../migrations/sqlite/0001_outbox.sql"))];
const POSTGRES_MIGRATIONS: &[(i64, &str, &str)] =
    &[(1, "outbox", include_str!("../migrations/postgres/0001_outbox.sql"))];

/// Errors of the outbox, the relay's database side and the deduplicator.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    /// A query on the outbox or processed-messages table failed.
    #[error("outbox database error while {action}: {source}")]
    Database {
        /// What was being done.
        action: &'static str,
        /// The database error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the embedded migrations failed.
    #[error("applying the stevedore-bus migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The message cannot be carried by a broker (see [`Message::validate`]).
    #[error("message {id} is invalid: {reason}")]
    InvalidMessage {
        /// The message at fault.
        id: Uuid,
        /// What is wrong with it.
        reason: String,
    },
    /// The message's headers could not be serialized.
    #[error("message {id}: headers cannot be encoded: {source}")]
    Headers {
        /// The message at fault.
        id: Uuid,
        /// The encoding error.
        #[source]
        source: serde_json::Error,
    },
}

pub(crate) fn db_err(action: &'static str) -> impl FnOnce(sqlx::Error) -> OutboxError {
    move |source| OutboxError::Database { action, source }
}

/// A pool of either supported database.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

fn migrator(list: &[(i64, &'static str, &'static str)]) -> Migrator {
    let migrations = list
        .iter()
        .map(|(v, d, sql)| Migration::new(*v, Cow::Borrowed(*d), MigrationType::Simple, sql.into_sql_str(), false))
        .collect();
    let mut m = Migrator::with_migrations(migrations);
    m.dangerous_set_table_name(MIGRATIONS_TABLE);
    m
}

impl Db {
    pub(crate) async fn migrate(&self) -> Result<(), OutboxError> {
        match self {
            Db::Sqlite(pool) => migrator(SQLITE_MIGRATIONS).run(pool).await?,
            Db::Postgres(pool) => migrator(POSTGRES_MIGRATIONS).run(pool).await?,
        }
        Ok(())
    }
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for sqlx::SqliteConnection {}
    impl Sealed for sqlx::PgConnection {}
}

/// A connection (usually the caller's open transaction, `&mut *tx`) that the outbox and the
/// deduplicator write through. Implemented for SQLite and PostgreSQL connections.
pub trait BusConnection: sealed::Sealed + Send {
    /// Inserts `message` into the outbox table.
    fn insert_outbox(&mut self, message: &Message) -> impl Future<Output = Result<(), OutboxError>> + Send;
    /// Records that `consumer` processed `id`; false if it already had.
    fn claim_processed(&mut self, consumer: &str, id: Uuid) -> impl Future<Output = Result<bool, OutboxError>> + Send;
}

fn headers_json(message: &Message) -> Result<String, OutboxError> {
    serde_json::to_string(&message.headers).map_err(|source| OutboxError::Headers { id: message.id, source })
}

impl BusConnection for SqliteConnection {
    async fn insert_outbox(&mut self, message: &Message) -> Result<(), OutboxError> {
        let headers = headers_json(message)?;
        sqlx::query("INSERT INTO stevedore_outbox (id, topic, msg_key, payload, headers) VALUES (?, ?, ?, ?, ?)")
            .bind(message.id.to_string())
            .bind(&message.topic)
            .bind(&message.key)
            .bind(message.payload.as_ref())
            .bind(headers)
            .execute(&mut *self)
            .await
            .map_err(db_err("inserting into the outbox"))?;
        Ok(())
    }

    async fn claim_processed(&mut self, consumer: &str, id: Uuid) -> Result<bool, OutboxError> {
        let r =
            sqlx::query("INSERT INTO stevedore_processed (consumer, message_id) VALUES (?, ?) ON CONFLICT DO NOTHING")
                .bind(consumer)
                .bind(id.to_string())
                .execute(&mut *self)
                .await
                .map_err(db_err("recording a processed message"))?;
        Ok(r.rows_affected() == 1)
    }
}

impl BusConnection for PgConnection {
    async fn insert_outbox(&mut self, message: &Message) -> Result<(), OutboxError> {
        let headers = headers_json(message)?;
        sqlx::query("INSERT INTO stevedore_outbox (id, topic, msg_key, payload, headers) VALUES ($1, $2, $3, $4, $5)")
            .bind(message.id)
            .bind(&message.topic)
            .bind(&message.key)
            .bind(message.payload.as_ref())
            .bind(headers)
            .execute(&mut *self)
            .await
            .map_err(db_err("inserting into the outbox"))?;
        Ok(())
    }

    async fn claim_processed(&mut self, consumer: &str, id: Uuid) -> Result<bool, OutboxError> {
        let r = sqlx::query(
            "INSERT INTO stevedore_processed (consumer, message_id) VALUES ($1, $2) ON CONFLICT DO NOTHING",
        )
        .bind(consumer)
        .bind(id)
        .execute(&mut *self)
        .await
        .map_err(db_err("recording a processed message"))?;
        Ok(r.rows_affected() == 1)
    }
}
