//! A `BackgroundService` (the article's `BackgroundService`): one `execute` that runs until cancelled,
//! with a heartbeat so health checks can tell it is making progress.
//!
//! `cargo run -p stevedore --example 02_background_service`

use std::time::Duration;

use stevedore::{BackgroundService, BoxError, Host, ServiceContext, ServiceSpec};

struct Poller {
    every: Duration,
}

impl BackgroundService for Poller {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        let mut polls = 0u64;
        loop {
            tokio::select! {
                _ = ctx.cancelled() => break,
                _ = tokio::time::sleep(self.every) => {
                    polls += 1;
                    ctx.heartbeat();
                    tracing::info!(polls, "polled");
                }
            }
        }
        tracing::info!(polls, "stopping cleanly");
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let host = Host::builder()
        .add(
            ServiceSpec::background("poller", Poller { every: Duration::from_secs(1) })
                .heartbeat(Duration::from_secs(5)),
        )
        .build()
        .expect("a valid host");
    host.run().await.exit();
}
