//! Supervision: a flaky service restarted with exponential backoff and jitter, up to a limit; past
//! it the host stops and the process exits non-zero.
//!
//! `cargo run -p stevedore --example 04_restart_on_failure; echo "exit code $?"`

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stevedore::{Host, OnFailure, RestartPolicy, ServiceSpec};

static ATTEMPTS: AtomicU32 = AtomicU32::new(0);

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let policy = RestartPolicy::default()
        .max_restarts(3)
        .window(Duration::from_secs(60))
        .backoff(Duration::from_millis(200), Duration::from_secs(2));
    let host = Host::builder()
        .add(
            ServiceSpec::from_fn("flaky", |_ctx| async move {
                let n = ATTEMPTS.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
                Err(std::io::Error::other(format!("upstream refused attempt {n}")))
            })
            .on_failure(OnFailure::Restart(policy)),
        )
        .build()
        .expect("a valid host");
    let report = host.run().await;
    println!("{}", report.summary());
    report.exit();
}
