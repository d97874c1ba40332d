//! employee-sync: the article's scenario as a runnable product.
//!
//! A timed service syncs employees from an HTTP API every minute, writes the changes in a scoped
//! database transaction together with one `EmployeeChanged` event per change (transactional
//! outbox); a consumer keeps a change log, once per event; a web API enqueues sync and report jobs.
//! `--role all` runs everything in one process on SQLite with an in-process bus; `--role web` and
//! `--role worker` split it over processes sharing PostgreSQL and RabbitMQ or NATS. See README.md.
#![deny(missing_docs)]

mod api;
mod app;
mod config;
mod consumer;
mod db;
mod jobs;
mod sync;
mod upstream;

use clap::Parser;

use crate::config::Settings;

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .init();
    let config = match Settings::parse().load().and_then(Settings::resolve) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("employee-sync: {e}");
            std::process::exit(2);
        }
    };
    tracing::info!(role = config.role.as_str(), listen = %config.listen, "employee-sync starting");
    let host = match app::build(&config).await {
        Ok(h) => h,
        Err(e) => {
            eprintln!("employee-sync: cannot start: {e}");
            std::process::exit(1);
        }
    };
    host.run().await.exit();
}
