//! `stevedore`: the operator's tool for Stevedore's durable jobs.
//!
//! ```text
//! stevedore --database-url postgres://postgres@127.0.0.1/app migrate
//! stevedore jobs stats [--json]
//! stevedore jobs list [--state dead] [--queue NAME] [--limit N] [--json]
//! stevedore jobs retry ID            stevedore jobs retry --all-dead [--queue NAME]
//! stevedore jobs cancel ID
//! stevedore queues pause NAME        stevedore queues resume NAME
//! ```
//!
//! The database URL comes from `--database-url` or `STEVEDORE_DATABASE_URL`: `postgres://...` or
//! `sqlite://FILE`. Exit codes: 0 done; 1 the operation failed or was refused (unreachable
//! database, a job not in a state that allows it); 2 a usage error (bad flags, a malformed URL).
#![deny(missing_docs)]

use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use clap::{Parser, Subcommand};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::SqliteConnectOptions;
use stevedore_bus::outbox::Outbox;
use stevedore_jobs::{
    AnyStore, JobError, JobId, JobRecord, JobState, JobStore, ListQuery, PostgresStore, QueueStats, SqliteStore,
};

/// Operate Stevedore's durable jobs: apply migrations, look at queues and jobs, retry, cancel, pause.
#[derive(Debug, Parser)]
#[command(name = "stevedore", version)]
struct Cli {
    /// postgres://USER@HOST:PORT/DB or sqlite://FILE.
    #[arg(long, env = "STEVEDORE_DATABASE_URL", global = true)]
    database_url: Option<String>,

    /// How long to wait for the database before giving up.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    connect_timeout: Duration,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Creates or updates the job tables and the outbox tables (safe to run again, and from many
    /// processes at once).
    Migrate,
    /// Look at and act on jobs.
    #[command(subcommand)]
    Jobs(JobsCommand),
    /// Stop or restart fetching from a queue.
    #[command(subcommand)]
    Queues(QueuesCommand),
}

#[derive(Debug, Subcommand)]
enum JobsCommand {
    /// Job counts per queue and state.
    Stats {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Jobs, by id (the first 100 unless --limit says otherwise).
    List {
        /// available, running, completed, dead or cancelled.
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Only jobs with an id above this (paging).
        #[arg(long)]
        after: Option<JobId>,
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Makes a dead or cancelled job available again with a fresh set of attempts.
    Retry {
        /// The job's id.
        #[arg(required_unless_present = "all_dead", conflicts_with = "all_dead")]
        id: Option<JobId>,
        /// Every dead job (of --queue, if given).
        #[arg(long)]
        all_dead: bool,
        /// With --all-dead: only this queue.
        #[arg(long, requires = "all_dead")]
        queue: Option<String>,
    },
    /// Cancels a job that has not finished (a running job's worker is told at its next heartbeat).
    Cancel {
        /// The job's id.
        id: JobId,
    },
}

#[derive(Debug, Subcommand)]
enum QueuesCommand {
    /// Workers stop fetching from the queue; running jobs finish.
    Pause {
        /// The queue.
        name: String,
    },
    /// Workers fetch from the queue again.
    Resume {
        /// The queue.
        name: String,
    },
}

fn parse_state(s: &str) -> Result<JobState, String> {
    JobState::from_str(s).map_err(|_| {
        let names: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
        format!("{s:?} is not a job state; use one of {}", names.join(", "))
    })
}

/// Why a command could not be carried out.
#[derive(Debug, thiserror::Error)]
enum CliError {
    /// No URL was given.
    #[error(
        "no database given: pass --database-url postgres://USER@HOST/DB (or sqlite://FILE), or set STEVEDORE_DATABASE_URL"
    )]
    NoUrl,
    /// The URL cannot be parsed.
    #[error("invalid database URL {url:?}: {reason}")]
    BadUrl { url: String, reason: String },
    /// The database could not be reached.
    #[error("cannot connect to the database at {target}: {source}")]
    Unreachable { target: String, source: sqlx::Error },
    /// A SQLite file that does not exist.
    #[error("no SQLite database at {0} (run `stevedore migrate` to create one)")]
    NoSqliteFile(String),
    /// The tables are missing.
    #[error("the job tables do not exist in this database: run `stevedore migrate` first ({0})")]
    NotMigrated(JobError),
    /// A store operation failed.
    #[error("{0}")]
    Job(#[from] JobError),
    /// The outbox migration failed.
    #[error("{0}")]
    Outbox(#[from] stevedore_bus::db::OutboxError),
    /// The operation was refused.
    #[error("{0}")]
    Refused(String),
}

impl CliError {
    fn exit_code(&self) -> u8 {
        match self {
            CliError::NoUrl | CliError::BadUrl { .. } => 2,
            _ => 1,
        }
    }
}

/// Where a URL points, without its password, for messages.
fn target_of(options: &PgConnectOptions) -> String {
    format!(
        "{}:{}/{}",
        options.get_host(),
        options.get_port(),
        options.get_database().unwrap_or(options.get_username())
    )
}

async fn connect(url: &str, timeout: Duration, creating: bool) -> Result<AnyStore, CliError> {
    let url = url.trim();
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| CliError::BadUrl { url: url.into(), reason: e.to_string() })?;
        let file = options.get_filename().to_path_buf();
        if !creating && !file.exists() {
            return Err(CliError::NoSqliteFile(file.display().to_string()));
        }
        // Opening applies the job store's migrations (SQLite files are opened by one process).
        let store = SqliteStore::open_with(options).await.map_err(|e| match e {
            JobError::Database { source, .. } => CliError::Unreachable { target: file.display().to_string(), source },
            other => CliError::Job(other),
        })?;
        return Ok(AnyStore::Sqlite(store));
    }
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        let scheme = url.split("://").next().filter(|s| *s != url).unwrap_or("(none)");
        return Err(CliError::BadUrl {
            url: redact(url),
            reason: format!("unsupported scheme {scheme:?}: use postgres://USER@HOST/DB or sqlite://FILE"),
        });
    }
    let options =
        PgConnectOptions::from_str(url).map_err(|e| CliError::BadUrl { url: redact(url), reason: e.to_string() })?;
    let target = target_of(&options);
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(timeout)
        .connect_with(options)
        .await
        .map_err(|source| CliError::Unreachable { target, source })?;
    Ok(AnyStore::Postgres(PostgresStore::from_pool(pool)))
}

/// The URL with any password replaced, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &url[s + 3..at];
            match creds.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &creds[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// A missing table shows as this SQLSTATE (PostgreSQL) or message (SQLite).
fn not_migrated(e: JobError) -> CliError {
    if let JobError::Database { source: sqlx::Error::Database(db), .. } = &e
        && (db.code().as_deref() == Some("42P01") || db.message().contains("no such table"))
    {
        return CliError::NotMigrated(e);
    }
    CliError::Job(e)
}

/// A job as `jobs list --json` prints it.
#[derive(Debug, Serialize)]
struct JobView {
    id: JobId,
    kind: String,
    queue: String,
    state: JobState,
    attempt: u32,
    max_attempts: u32,
    priority: i16,
    unique_key: Option<String>,
    scheduled_at: chrono::DateTime<chrono::Utc>,
    created_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
    lease_owner: Option<String>,
    payload: serde_json::Value,
    errors: Vec<stevedore_jobs::AttemptError>,
}

impl From<JobRecord> for JobView {
    fn from(r: JobRecord) -> Self {
        let payload = serde_json::from_str(&r.payload).unwrap_or(serde_json::Value::String(r.payload));
        JobView {
            id: r.id,
            kind: r.kind,
            queue: r.queue,
            state: r.state,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            priority: r.priority,
            unique_key: r.unique_key,
            scheduled_at: r.scheduled_at,
            created_at: r.created_at,
            finished_at: r.finished_at,
            lease_owner: r.lease_owner,
            payload,
            errors: r.errors,
        }
    }
}

fn total_of(queues: &[QueueStats]) -> QueueStats {
    let mut t = QueueStats { queue: "TOTAL".into(), ..QueueStats::default() };
    for q in queues {
        t.available += q.available;
        t.scheduled += q.scheduled;
        t.running += q.running;
        t.completed += q.completed;
        t.dead += q.dead;
        t.cancelled += q.cancelled;
    }
    t
}

fn print_stats(queues: &[QueueStats]) {
    let width = queues.iter().map(|q| q.queue.len()).max().unwrap_or(5).max(5);
    println!(
        "{:width$}  {:>6}  {:>9}  {:>9}  {:>7}  {:>9}  {:>5}  {:>9}",
        "QUEUE", "PAUSED", "AVAILABLE", "SCHEDULED", "RUNNING", "COMPLETED", "DEAD", "CANCELLED"
    );
    let total = total_of(queues);
    for q in queues.iter().chain(std::iter::once(&total)) {
        let paused = if q.queue == "TOTAL" {
            ""
        } else if q.paused {
            "yes"
        } else {
            "no"
        };
        println!(
            "{:width$}  {:>6}  {:>9}  {:>9}  {:>7}  {:>9}  {:>5}  {:>9}",
            q.queue, paused, q.available, q.scheduled, q.running, q.completed, q.dead, q.cancelled
        );
    }
}

fn print_jobs(jobs: &[JobRecord]) {
    println!(
        "{:>8}  {:20}  {:12}  {:9}  {:>7}  {:20}  LAST ERROR",
        "ID", "KIND", "QUEUE", "STATE", "ATTEMPT", "SCHEDULED"
    );
    for j in jobs {
        let error = j.errors.last().map(|e| e.error.replace('\n', " ")).unwrap_or_default();
        let error: String = error.chars().take(80).collect();
        println!(
            "{:>8}  {:20}  {:12}  {:9}  {:>7}  {:20}  {}",
            j.id,
            j.kind,
            j.queue,
            j.state.as_str(),
            format!("{}/{}", j.attempt, j.max_attempts),
            j.scheduled_at.format("%Y-%m-%d %H:%M:%S"),
            error
        );
    }
    if jobs.is_empty() {
        println!("(no jobs)");
    }
}

async fn run(cli: Cli) -> Result<(), CliError> {
    let url = cli.database_url.as_deref().filter(|u| !u.trim().is_empty()).ok_or(CliError::NoUrl)?;
    let creating = matches!(cli.command, Command::Migrate);
    let store = connect(url, cli.connect_timeout, creating).await?;
    match cli.command {
        Command::Migrate => {
            store.migrate().await?;
            let outbox = match &store {
                AnyStore::Sqlite(s) => Outbox::sqlite(s.pool().clone()),
                AnyStore::Postgres(s) => Outbox::postgres(s.pool().clone()),
            };
            outbox.migrate().await?;
            println!("migrated: job tables and outbox tables are up to date");
        }
        Command::Jobs(JobsCommand::Stats { json }) => {
            let queues = store.stats().await.map_err(not_migrated)?;
            if json {
                let out = serde_json::json!({ "queues": queues, "total": total_of(&queues) });
                println!("{out}");
            } else {
                print_stats(&queues);
            }
        }
        Command::Jobs(JobsCommand::List { state, queue, limit, after, json }) => {
            let query = ListQuery { state, queue, after_id: after, limit };
            let jobs = store.list(&query).await.map_err(not_migrated)?;
            if json {
                let views: Vec<JobView> = jobs.into_iter().map(JobView::from).collect();
                println!("{}", serde_json::to_string(&views).unwrap_or_else(|_| "[]".into()));
            } else {
                print_jobs(&jobs);
            }
        }
        Command::Jobs(JobsCommand::Retry { id: Some(id), .. }) => {
            if store.retry(id).await.map_err(not_migrated)? {
                println!("job {id} is available again");
            } else {
                return Err(refusal(&store, id, "retried (only dead or cancelled jobs can be)").await);
            }
        }
        Command::Jobs(JobsCommand::Retry { id: None, queue, .. }) => {
            let n = store.retry_dead(queue.as_deref()).await.map_err(not_migrated)?;
            println!("{n} dead job(s) available again");
        }
        Command::Jobs(JobsCommand::Cancel { id }) => {
            if store.cancel(id).await.map_err(not_migrated)? {
                println!("job {id} cancelled");
            } else {
                return Err(refusal(&store, id, "cancelled (it has already finished)").await);
            }
        }
        Command::Queues(QueuesCommand::Pause { name }) => {
            store.pause(&name).await.map_err(not_migrated)?;
            println!("queue {name} paused: workers fetch nothing more from it; running jobs finish");
        }
        Command::Queues(QueuesCommand::Resume { name }) => {
            store.resume(&name).await.map_err(not_migrated)?;
            println!("queue {name} resumed");
        }
    }
    Ok(())
}

/// Why `id` could not be acted on: it does not exist, or its state does not allow it.
async fn refusal(store: &AnyStore, id: JobId, what: &str) -> CliError {
    match store.get(id).await {
        Ok(None) => CliError::Refused(format!("no job {id}")),
        Ok(Some(job)) => CliError::Refused(format!("job {id} is {} and cannot be {what}", job.state)),
        Err(e) => CliError::Job(e),
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("stevedore: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(redact("postgres://app:secret@db:5432/app"), "postgres://app:***@db:5432/app");
        assert_eq!(redact("postgres://app@db/app"), "postgres://app@db/app");
    }

    #[test]
    fn states_parse_or_say_why() {
        assert_eq!(parse_state("dead"), Ok(JobState::Dead));
        assert!(parse_state("zombie").unwrap_err().contains("available, running, completed, dead, cancelled"));
    }
}
