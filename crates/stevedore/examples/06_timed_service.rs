//! The article's timed service, `SyncEmployees`: every 60 s, first run at start (`TimeSpan.Zero`),
//! with a singleton API client and a per-run database scope committed on success and rolled back
//! otherwise. Runs never overlap. "Run now" is the trigger handle: here a helper task presses it every
//! 25 s, as an admin endpoint or the dashboard would.
//!
//! `cargo run -p stevedore --example 06_timed_service`, then Ctrl-C.

use std::time::Duration;

use stevedore::interval::IntervalService;
use stevedore::{BoxError, CancellationToken, Host, RunOutcome, Scoped, ServiceCollection, Singleton};

/// Talks to the HR system; one for the whole process.
struct ApiClient {
    base_url: String,
}

/// A unit of work against the employee database; one per run.
struct EmployeeDb {
    written: usize,
}

async fn sync_employees(
    api: Singleton<ApiClient>,
    db: Scoped<EmployeeDb>,
    stop: CancellationToken,
) -> Result<(), BoxError> {
    let fetched = tokio::select! {
        _ = stop.cancelled() => return Err("stopping: sync abandoned, nothing committed".into()),
        _ = tokio::time::sleep(Duration::from_millis(300)) => 42, // the HTTP call
    };
    db.lock().await.written += fetched;
    tracing::info!(from = %api.base_url, fetched, "employees synced");
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let services = ServiceCollection::new()
        .singleton_value(ApiClient { base_url: "https://hr.example.com".into() })
        .scoped_with_end(
            || async { Ok::<_, BoxError>(EmployeeDb { written: 0 }) },
            |db: EmployeeDb, outcome: RunOutcome| async move {
                match outcome {
                    RunOutcome::Succeeded => tracing::info!(rows = db.written, "commit"),
                    other => tracing::warn!(outcome = other.as_str(), "rollback"),
                }
                Ok::<_, BoxError>(())
            },
        );
    let timer = IntervalService::fixed_rate("sync-employees", Duration::from_secs(60), sync_employees)
        .initial_delay(Duration::ZERO)
        .timeout(Duration::from_secs(30));
    let run_now = timer.trigger_handle();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(Duration::from_secs(25)).await;
            if !run_now.trigger() {
                break;
            }
            tracing::info!("run now pressed");
        }
    });
    let host = Host::builder().services(services).add(timer.into_spec()).build().expect("a valid host");
    host.run().await.exit();
}
