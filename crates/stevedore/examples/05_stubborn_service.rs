//! A service that ignores cancellation: at the end of the shutdown budget it is abandoned, named in
//! the log and the report, and the process exits with code 2 just after the budget.
//!
//! `STEVEDORE_SHUTDOWN_TIMEOUT=1s cargo run -p stevedore --example 05_stubborn_service`, then Ctrl-C.
//! With `STUBBORN=0` the service behaves and the process exits 0.

use std::time::Duration;

use stevedore::{Host, ServiceSpec};

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let stubborn = std::env::var("STUBBORN").map(|v| v != "0").unwrap_or(true);
    let host = Host::builder()
        .add(ServiceSpec::from_fn("polite", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, std::convert::Infallible>(())
        }))
        .add(ServiceSpec::from_fn("stubborn", move |ctx| async move {
            if stubborn {
                // Never looks at the cancellation.
                loop {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
            }
            ctx.cancelled().await;
            Ok::<_, std::convert::Infallible>(())
        }))
        .build()
        .expect("a valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    tokio::spawn(async move {
        if lifetime.started().await {
            // Tests wait for this line before sending the signal.
            println!("READY {}", status.services().len());
        }
    });
    host.run().await.exit();
}
