//! `bus` scenario: messages from producers to a consumer through the transactional outbox
//! (PostgreSQL, relay, broker), against direct publishing with confirms, for RabbitMQ and NATS
//! JetStream, in the same run.
//!
//! Both sides do one business operation per message from `producers` concurrent tasks: a
//! PostgreSQL transaction that inserts a row into a business table, and then
//! - direct (the article's pattern, no outbox): commit, then publish the message and wait for the
//!   broker's confirm; a crash between the two loses the message;
//! - outbox: insert the message into the outbox in the same transaction and commit; the relay
//!   publishes it (batched, confirmed) and the same consumer receives it.
//!
//! Throughput is `messages / (last consumed - first produced)`; latency is produced-to-consumed
//! per message, measured under that load. Each side gets fresh broker objects (and a fresh
//! schema), and sides alternate so drift on a shared machine hits both.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource};
use stevedore_bus::consumer::{Consumer, ConsumerOptions, Source};
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::outbox::{Outbox, enqueue};
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{BoxError, Message, Publisher, Status};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::report::{Figures, median};

/// What the scenario runs.
#[derive(Debug, Clone)]
pub struct BusOptions {
    /// Messages per side and run.
    pub messages: usize,
    /// Concurrent producers per side.
    pub producers: usize,
    /// PostgreSQL server for the outbox (a schema per run, dropped after).
    pub pg_url: String,
    /// RabbitMQ.
    pub amqp_url: String,
    /// NATS with JetStream.
    pub nats_url: String,
}

impl Default for BusOptions {
    fn default() -> Self {
        let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
        Self {
            messages: 20_000,
            producers: 16,
            pg_url: env("STEVEDORE_BENCH_PG_URL", "postgres://postgres@127.0.0.1:5432/test"),
            amqp_url: env("STEVEDORE_BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/%2f"),
            nats_url: env("STEVEDORE_BENCH_NATS_URL", "nats://127.0.0.1:4222"),
        }
    }
}

/// One side's measurement.
struct Sample {
    per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Path {
    Direct,
    Outbox,
}

#[derive(Clone, Copy, PartialEq)]
enum Broker {
    Amqp,
    Nats,
}

impl Broker {
    fn name(self) -> &'static str {
        match self {
            Broker::Amqp => "amqp",
            Broker::Nats => "nats",
        }
    }
}

/// Runs the scenario `runs` times per side and reports medians.
pub fn run(opts: &BusOptions, runs: usize) -> Figures {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    rt.block_on(async {
        let mut f = Figures::new(format!(
            "bus: {} messages from {} producers, outbox (PostgreSQL) vs direct publish with confirms (median of {runs})",
            opts.messages, opts.producers
        ));
        for broker in [Broker::Amqp, Broker::Nats] {
            let (mut ratio, mut direct, mut outbox) = (Vec::new(), Vec::new(), Vec::new());
            let (mut d99, mut o50, mut o99) = (Vec::new(), Vec::new(), Vec::new());
            for _ in 0..runs {
                let d = side(broker, Path::Direct, opts).await;
                let o = side(broker, Path::Outbox, opts).await;
                ratio.push(o.per_s / d.per_s);
                direct.push(d.per_s);
                outbox.push(o.per_s);
                d99.push(d.p99_ms);
                o50.push(o.p50_ms);
                o99.push(o.p99_ms);
            }
            let b = broker.name();
            f.add(&format!("{b}_outbox_ratio"), median(ratio), "outbox throughput over direct publishing (target >= 0.7)");
            f.add(&format!("{b}_latency_p99_ms"), median(o99), "outbox path: produced-to-consumed p99 under load, ms");
            f.add(&format!("{b}_latency_p50_ms"), median(o50), "outbox path: produced-to-consumed p50 under load, ms");
            f.add(&format!("{b}_direct_latency_p99_ms"), median(d99), "direct path: produced-to-consumed p99 under load, ms");
            f.add(&format!("{b}_outbox_per_s"), median(outbox), "outbox path: messages per second, end to end");
            f.add(&format!("{b}_direct_per_s"), median(direct), "direct path: messages per second, end to end");
        }
        f.note("Each message is one business operation: a PostgreSQL transaction inserting a business row. Direct = commit, then publish and wait for the confirm (the article's pattern). Outbox = the message inserted in the same transaction; the relay publishes in confirmed batches.");
        f
    })
}

fn epoch() -> Instant {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

fn now_ns() -> u64 {
    u64::try_from(epoch().elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// What the consumer records: latencies and when the last message arrived.
#[derive(Default)]
struct Collector {
    count: AtomicU64,
    last_ns: AtomicU64,
    latencies_ns: Mutex<Vec<u64>>,
    done: Notify,
}

fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let stamp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    format!("{prefix}_{}_{stamp}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

async fn side(broker: Broker, path: Path, opts: &BusOptions) -> Sample {
    let name = unique("bench_bus");
    match broker {
        Broker::Amqp => {
            let config = AmqpConfig::new(&opts.amqp_url, &name);
            let publisher = AmqpPublisher::new(config.clone()).with_queue(&name, &["bench.#"]);
            publisher.start().await.expect("RabbitMQ reachable");
            let source = AmqpSource::new(config, &name, &["bench.#"]);
            let sample = measure(publisher, source, "bench.msg".to_string(), path, opts).await;
            let _ = stevedore_bus::amqp::delete_topology(&AmqpConfig::new(&opts.amqp_url, &name), &[&name]).await;
            sample
        }
        Broker::Nats => {
            let stream = name.to_uppercase();
            let config = NatsConfig::new(&opts.nats_url, &stream, &[&format!("{name}.>")]);
            let publisher = JetStreamPublisher::new(config.clone());
            publisher.start().await.expect("NATS reachable");
            let source = JetStreamSource::new(config.clone(), "bench", &format!("{name}.>"));
            let sample = measure(publisher, source, format!("{name}.msg"), path, opts).await;
            let _ = stevedore_bus::nats::delete_streams(&config).await;
            sample
        }
    }
}

async fn pg_outbox(url: &str) -> (sqlx::PgPool, Outbox, String) {
    let schema = unique("stevedore_bench");
    let admin = sqlx::PgPool::connect(url).await.expect("PostgreSQL reachable");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.expect("create schema");
    admin.close().await;
    let set = format!("SET search_path TO {schema}");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(24)
        .after_connect(move |conn, _| {
            let set = set.clone();
            Box::pin(async move {
                sqlx::query(sqlx::AssertSqlSafe(set)).execute(conn).await?;
                Ok(())
            })
        })
        .connect(url)
        .await
        .expect("PostgreSQL reachable");
    let outbox = Outbox::postgres(pool.clone());
    outbox.migrate().await.expect("outbox migrations");
    sqlx::query("CREATE TABLE bench_orders (id BIGSERIAL PRIMARY KEY, body BYTEA NOT NULL)")
        .execute(&pool)
        .await
        .expect("create the business table");
    (pool, outbox, schema)
}

async fn measure<P: Publisher, S: Source>(
    publisher: P,
    source: S,
    topic: String,
    path: Path,
    opts: &BusOptions,
) -> Sample {
    let n = opts.messages as u64;
    let collector = Arc::new(Collector::default());
    let c = collector.clone();
    let consumer = Arc::new(Consumer::new(
        source,
        move |m: Message| {
            let now = now_ns();
            let sent = m.payload.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_le_bytes).unwrap_or(now);
            c.latencies_ns.lock().unwrap_or_else(|p| p.into_inner()).push(now.saturating_sub(sent));
            c.last_ns.fetch_max(now, Ordering::Relaxed);
            if c.count.fetch_add(1, Ordering::Relaxed) + 1 == n {
                c.done.notify_one();
            }
            async { Ok::<(), BoxError>(()) }
        },
        ConsumerOptions { prefetch: 500, concurrency: 32, ..ConsumerOptions::default() },
    ));
    let stop = CancellationToken::new();
    let mut tasks = vec![tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move {
            let _ = c.run(s).await;
        }
    })];
    consumer.health().subscribe().wait_for(|s| *s == Status::Connected).await.expect("the consumer connects");

    let publisher = Arc::new(publisher);
    let (pool, outbox, schema) = pg_outbox(&opts.pg_url).await;
    if path == Path::Outbox {
        let relay = Arc::new(Relay::new(
            outbox.clone(),
            ArcPublisher(publisher.clone()),
            RelayOptions { batch_size: 500, poll_interval: Duration::from_millis(20), ..RelayOptions::default() },
        ));
        tasks.push(tokio::spawn({
            let s = stop.clone();
            async move {
                let _ = relay.run(s).await;
            }
        }));
    }

    let start_ns = now_ns();
    let per_producer = opts.messages / opts.producers.max(1);
    let mut producers = Vec::new();
    for p in 0..opts.producers.max(1) {
        let count = if p == 0 { opts.messages - per_producer * (opts.producers.max(1) - 1) } else { per_producer };
        let (publisher, topic, pool, outbox) = (publisher.clone(), topic.clone(), pool.clone(), outbox.clone());
        producers.push(tokio::spawn(async move {
            for i in 0..count {
                let m = Message::new(topic.as_str(), format!("p{p}-{}", i % 16), now_ns().to_le_bytes().to_vec());
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query("INSERT INTO bench_orders (body) VALUES ($1)")
                    .bind(m.payload.as_ref())
                    .execute(&mut *tx)
                    .await
                    .expect("business insert");
                match path {
                    Path::Direct => {
                        tx.commit().await.expect("commit");
                        publisher.publish(&m).await.expect("direct publish");
                    }
                    Path::Outbox => {
                        enqueue(&mut *tx, &m).await.expect("enqueue");
                        tx.commit().await.expect("commit");
                        outbox.wake();
                    }
                }
            }
        }));
    }
    for p in producers {
        p.await.expect("producer");
    }
    let notified = collector.done.notified();
    if collector.count.load(Ordering::Relaxed) < n {
        tokio::time::timeout(Duration::from_secs(600), notified).await.expect("every message consumed");
    }
    let elapsed = Duration::from_nanos(collector.last_ns.load(Ordering::Relaxed).saturating_sub(start_ns));
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    pool.close().await;
    if let Ok(admin) = sqlx::PgPool::connect(&opts.pg_url).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await;
        admin.close().await;
    }
    let mut lat = std::mem::take(&mut *collector.latencies_ns.lock().unwrap_or_else(|p| p.into_inner()));
    lat.sort_unstable();
    let pct = |q: f64| lat.get(((lat.len() as f64 - 1.0) * q).round() as usize).copied().unwrap_or(0) as f64 / 1e6;
    Sample { per_s: n as f64 / elapsed.as_secs_f64(), p50_ms: pct(0.50), p99_ms: pct(0.99) }
}

/// Lets the relay and the direct producers share one publisher (one connection).
struct ArcPublisher<P>(Arc<P>);

impl<P: Publisher> Publisher for ArcPublisher<P> {
    fn publish(
        &self,
        message: &Message,
    ) -> impl std::future::Future<Output = Result<(), stevedore_bus::PublishError>> + Send {
        self.0.publish(message)
    }

    fn publish_batch(
        &self,
        messages: &[Message],
    ) -> impl std::future::Future<Output = stevedore_bus::BatchOutcome> + Send {
        self.0.publish_batch(messages)
    }
}
