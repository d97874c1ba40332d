//! Errors of the job store and worker.

pub use stevedore::BoxError;

/// What went wrong in the job store or the worker.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JobError {
    /// The database rejected or failed a statement.
    #[error("job store: {operation} failed: {source}")]
    Database {
        /// What the store was doing.
        operation: &'static str,
        /// The driver's error.
        #[source]
        source: sqlx::Error,
    },
    /// Applying the embedded migrations failed.
    #[error("job store: migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A job's payload could not be serialized.
    #[error("job kind {kind:?}: payload could not be serialized: {source}")]
    Serialize {
        /// The job's kind.
        kind: String,
        /// serde's error.
        #[source]
        source: serde_json::Error,
    },
    /// A state name read from the database is not one this version knows.
    #[error("job store: unknown job state {0:?}")]
    UnknownState(String),
    /// A stored value could not be decoded (a column out of range, malformed error list).
    #[error("job store: job {id}: {what}")]
    Corrupt {
        /// The job concerned.
        id: i64,
        /// What was wrong with it.
        what: String,
    },
    /// A periodic job's schedule could not be parsed.
    #[error("periodic job {name:?}: bad cron pattern {pattern:?}: {reason}")]
    Schedule {
        /// The periodic job's name.
        name: String,
        /// The pattern given.
        pattern: String,
        /// Why croner refused it.
        reason: String,
    },
    /// The worker was configured wrongly.
    #[error("job worker: {0}")]
    Config(String),
}

impl JobError {
    pub(crate) fn db(operation: &'static str) -> impl FnOnce(sqlx::Error) -> JobError {
        move |source| JobError::Database { operation, source }
    }
}
