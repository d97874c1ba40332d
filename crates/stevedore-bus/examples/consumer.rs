//! A consumer hosted by a Stevedore host: stops on SIGTERM, finishing the message in flight.
//!
//! ```text
//! consumer amqp <amqp-url> <exchange> <queue> <pattern>     <handler-millis>
//! consumer nats <nats-url> <stream>   <durable> <subjects>  <handler-millis>
//! ```
//!
//! Prints `started <id>` and `handled <id>` for each message, so a test can send SIGTERM while
//! a handler runs and check that it finished and that nothing else was taken.

use std::time::Duration;

use stevedore::Host;
use stevedore_bus::amqp::{AmqpConfig, AmqpSource};
use stevedore_bus::consumer::{Consumer, ConsumerOptions, Source};
use stevedore_bus::nats::{JetStreamSource, NatsConfig};
use stevedore_bus::{BoxError, Message};

async fn host<S: Source>(source: S, millis: u64) -> Result<(), BoxError> {
    let consumer = Consumer::new(
        source,
        move |m: Message| async move {
            println!("started {}", m.id);
            tokio::time::sleep(Duration::from_millis(millis)).await;
            println!("handled {}", m.id);
            Ok::<(), BoxError>(())
        },
        ConsumerOptions { prefetch: 5, concurrency: 1, drain_timeout: Duration::from_secs(8), ..Default::default() },
    );
    let host = Host::builder().shutdown_timeout(Duration::from_secs(10)).add(consumer.into_spec("consumer")).build()?;
    host.run().await.exit()
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let usage = "usage: consumer (amqp|nats) <url> <exchange|stream> <queue|durable> <pattern|subjects> <millis>";
    let [kind, url, target, name, pattern, millis] = args.as_slice() else {
        return Err(usage.into());
    };
    let millis: u64 = millis.parse()?;
    match kind.as_str() {
        "amqp" => host(AmqpSource::new(AmqpConfig::new(url, target), name, &[pattern]), millis).await,
        "nats" => host(JetStreamSource::new(NatsConfig::new(url, target, &[pattern]), name, pattern), millis).await,
        _ => Err(usage.into()),
    }
}
