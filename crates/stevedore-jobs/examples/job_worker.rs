//! A job worker as a hosted service: enqueues a few jobs, runs them, enqueues a periodic one
//! every 10 seconds, and stops gracefully on Ctrl-C or SIGTERM.
//!
//! ```text
//! cargo run -p stevedore-jobs --example job_worker                      # SQLite file jobs.db
//! cargo run -p stevedore-jobs --example job_worker -- postgres://postgres@127.0.0.1/test
//! ```

use std::time::Duration;

use serde::{Deserialize, Serialize};
use stevedore::Host;
use stevedore_jobs::{AnyStore, BoxError, Job, JobContext, JobStore, NewJob, PeriodicJob, Worker};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct SendEmail {
    to: String,
}

impl Job for SendEmail {
    const KIND: &'static str = "send_email";
    const MAX_ATTEMPTS: u32 = 5;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Heartbeat;

impl Job for Heartbeat {
    const KIND: &'static str = "heartbeat";
}

async fn send_email(job: SendEmail, ctx: JobContext) -> Result<(), BoxError> {
    tracing::info!(job = ctx.id(), attempt = ctx.attempt(), to = %job.to, "sending email");
    if job.to.ends_with("@invalid") && !ctx.is_last_attempt() {
        return Err(format!("mail server refused {}", job.to).into());
    }
    Ok(())
}

async fn heartbeat(_job: Heartbeat, ctx: JobContext) -> Result<(), BoxError> {
    tracing::info!(job = ctx.id(), "periodic heartbeat");
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let url = std::env::args().nth(1).unwrap_or_else(|| "jobs.db".to_string());
    let store = AnyStore::connect(&url).await?;

    store
        .enqueue_many(&[
            NewJob::new(&SendEmail { to: "ada@example.com".into() })?,
            NewJob::new(&SendEmail { to: "bob@invalid".into() })?,
            NewJob::new(&SendEmail { to: "eve@example.com".into() })?.delay(Duration::from_secs(3)),
        ])
        .await?;

    let worker = Worker::new(store)
        .register(send_email)
        .register(heartbeat)
        .queue("default", 8)
        .periodic(PeriodicJob::every("heartbeat", Duration::from_secs(10), Heartbeat));

    let host = Host::builder().add(worker.into_service("jobs")).build()?;
    host.run().await.exit();
}
