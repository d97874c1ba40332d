//! A standalone outbox relay: reads the outbox of a SQLite or PostgreSQL database and publishes
//! it to RabbitMQ or NATS JetStream until SIGTERM or Ctrl-C.
//!
//! ```text
//! relay <database-url> <schema|-> amqp <amqp-url> <exchange> <queue> <pattern> [batch-size]
//! relay <database-url> <schema|-> nats <nats-url> <stream> <subject-filter>   [batch-size]
//! ```
//!
//! The crash tests kill it with SIGKILL mid-stream and start it again: nothing is lost.

use std::time::Duration;

use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher};
use stevedore_bus::nats::{JetStreamPublisher, NatsConfig};
use stevedore_bus::outbox::Outbox;
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{Backoff, BoxError, Publisher};
use tokio_util::sync::CancellationToken;

fn usage() -> BoxError {
    "usage: relay <database-url> <schema|-> (amqp <url> <exchange> <queue> <pattern> | nats <url> <stream> <subjects>) [batch-size]"
        .into()
}

async fn open_outbox(url: &str, schema: &str) -> Result<Outbox, BoxError> {
    if url.starts_with("postgres") {
        let mut options = sqlx::postgres::PgPoolOptions::new().max_connections(4);
        if schema != "-" {
            let set = format!("SET search_path TO {schema}");
            options = options.after_connect(move |conn, _| {
                let set = set.clone();
                Box::pin(async move {
                    sqlx::query(sqlx::AssertSqlSafe(set)).execute(conn).await?;
                    Ok(())
                })
            });
        }
        Ok(Outbox::postgres(options.connect(url).await?))
    } else {
        let opts: sqlx::sqlite::SqliteConnectOptions = url.parse()?;
        let opts = opts.busy_timeout(Duration::from_secs(10));
        Ok(Outbox::sqlite(sqlx::SqlitePool::connect_with(opts).await?))
    }
}

async fn run<P: Publisher>(outbox: Outbox, publisher: P, batch: usize) -> Result<(), BoxError> {
    let relay = Relay::new(
        outbox,
        publisher,
        RelayOptions {
            batch_size: batch,
            poll_interval: Duration::from_millis(20),
            backoff: Backoff::new(Duration::from_millis(50), Duration::from_secs(1)),
            ..RelayOptions::default()
        },
    );
    let stop = CancellationToken::new();
    let s = stop.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = async { match &mut term { Some(t) => { t.recv().await; } None => std::future::pending().await } } => {}
        }
        s.cancel();
    });
    eprintln!("relay started");
    relay.run(stop).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    tracing_subscriber::fmt().with_env_filter(tracing_subscriber::EnvFilter::from_default_env()).init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [db, schema, kind, rest @ ..] = args.as_slice() else {
        return Err(usage());
    };
    let outbox = open_outbox(db, schema).await?;
    outbox.migrate().await?;
    match (kind.as_str(), rest) {
        ("amqp", [url, exchange, queue, pattern, more @ ..]) => {
            let batch = more.first().and_then(|b| b.parse().ok()).unwrap_or(256);
            let publisher = AmqpPublisher::new(AmqpConfig::new(url, exchange)).with_queue(queue, &[pattern]);
            run(outbox, publisher, batch).await
        }
        ("nats", [url, stream, subjects, more @ ..]) => {
            let batch = more.first().and_then(|b| b.parse().ok()).unwrap_or(256);
            let mut config = NatsConfig::new(url, stream, &[subjects]);
            config.ack_timeout = Duration::from_secs(3);
            run(outbox, JetStreamPublisher::new(config), batch).await
        }
        _ => Err(usage()),
    }
}
