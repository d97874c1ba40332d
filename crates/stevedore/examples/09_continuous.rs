//! Continuous processing: a service that consumes a channel until the host stops, each message
//! through a handler in its own scope. A second service produces readings.
//!
//! `cargo run -p stevedore --example 09_continuous`, then Ctrl-C.

use std::time::Duration;

use stevedore::stream::StreamService;
use stevedore::{BoxError, Host, ServiceSpec};

async fn record(reading: f64) -> Result<(), BoxError> {
    tracing::info!(reading, "recorded");
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let (tx, rx) = tokio::sync::mpsc::channel::<f64>(100);
    let sensor = ServiceSpec::from_fn("sensor", move |ctx| {
        let tx = tx.clone();
        async move {
            let mut value = 20.0;
            while !ctx.is_cancelled() {
                value += 0.1;
                tokio::select! {
                    _ = ctx.cancelled() => break,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {
                        if tx.send(value).await.is_err() { break; }
                    }
                }
            }
            Ok::<_, BoxError>(())
        }
    });
    let consumer = StreamService::from_receiver("recorder", rx, record);
    let host = Host::builder().add(consumer.into_spec()).add(sensor).build().expect("a valid host");
    host.run().await.exit();
}
