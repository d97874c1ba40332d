//! A start/stop service (the article's `IHostedService`) with lifecycle hooks, next to a background
//! service: starts run in registration order, stops in reverse, all stops under one budget.
//!
//! `cargo run -p stevedore --example 03_hosted_service`

use std::time::Duration;

use stevedore::{BoxError, Host, HostedService, ServiceContext, ServiceSpec};

struct ConnectionPool;

impl HostedService for ConnectionPool {
    async fn starting(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        tracing::info!("starting hook: before any service starts");
        Ok(())
    }
    async fn start(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        tracing::info!("pool opened");
        Ok(())
    }
    async fn started(&self, ctx: &ServiceContext) -> Result<(), BoxError> {
        tracing::info!(state = ctx.lifetime().state().as_str(), "started hook: every service is up");
        Ok(())
    }
    async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        tracing::info!("pool closed (stops run in reverse order, so this is last)");
        Ok(())
    }
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let host = Host::builder()
        .shutdown_timeout(Duration::from_secs(5))
        .add(ServiceSpec::hosted("pool", ConnectionPool))
        .add(ServiceSpec::from_fn("reporter", |ctx| async move {
            ctx.cancelled().await;
            tracing::info!("reporter stopped first");
            Ok::<_, std::convert::Infallible>(())
        }))
        .build()
        .expect("a valid host");
    let lifetime = host.lifetime();
    tokio::spawn(async move {
        if lifetime.started().await {
            tokio::time::sleep(Duration::from_secs(1)).await;
            tracing::info!("requesting a stop from code");
            lifetime.request_stop();
        }
    });
    host.run().await.exit();
}
