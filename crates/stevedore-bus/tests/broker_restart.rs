//! 10,000 messages through the outbox while the broker is stopped and started mid-stream.
//!
//! These tests stop the shared RabbitMQ and NATS, so they live in their own test binary, run
//! one at a time (a static lock), and always start the broker again (a drop guard), even when
//! an assertion fails.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource};
use stevedore_bus::consumer::{Consumer, ConsumerOptions, MessageHandler, Source};
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::outbox::{Outbox, enqueue};
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{Backoff, Health, Message, Publisher, Status};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

static BROKERS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const TOTAL: usize = 10_000;
const BEFORE_OUTAGE: usize = 3_000;

fn port_open(addr: &str) -> bool {
    addr.parse().ok().is_some_and(|a| std::net::TcpStream::connect_timeout(&a, Duration::from_millis(500)).is_ok())
}

fn wait_port(addr: &str, open: bool, within: Duration) -> bool {
    let deadline = std::time::Instant::now() + within;
    while std::time::Instant::now() < deadline {
        if port_open(addr) == open {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// Starts RabbitMQ's app again when dropped, whatever happened in the test.
struct RabbitRestarter;

impl RabbitRestarter {
    fn stop(&self) {
        let ok = std::process::Command::new("rabbitmqctl").arg("stop_app").status().is_ok_and(|s| s.success());
        assert!(ok, "rabbitmqctl stop_app failed");
        assert!(wait_port(stevedore_testkit::RABBITMQ.addr, false, Duration::from_secs(30)));
    }

    fn start(&self) {
        let _ = std::process::Command::new("rabbitmqctl").arg("start_app").status();
        wait_port(stevedore_testkit::RABBITMQ.addr, true, Duration::from_secs(60));
    }
}

impl Drop for RabbitRestarter {
    fn drop(&mut self) {
        if !port_open(stevedore_testkit::RABBITMQ.addr) {
            self.start();
        }
    }
}

/// Starts nats-server again when dropped, whatever happened in the test.
struct NatsRestarter;

impl NatsRestarter {
    fn stop(&self) {
        let out = std::process::Command::new("pidof").arg("nats-server").output().expect("pidof");
        let pids = String::from_utf8_lossy(&out.stdout).trim().to_string();
        assert!(!pids.is_empty(), "nats-server is not running");
        for pid in pids.split_whitespace() {
            let _ = std::process::Command::new("kill").arg(pid).status();
        }
        assert!(wait_port(stevedore_testkit::NATS.addr, false, Duration::from_secs(30)));
    }

    fn start(&self) {
        let _ = std::process::Command::new("start-stop-daemon")
            .args([
                "--start",
                "--oknodo",
                "--background",
                "--exec",
                "/usr/sbin/nats-server",
                "--",
                "-a",
                "127.0.0.1",
                "-p",
                "4222",
                "-js",
                "-sd",
                "/var/lib/nats-server",
                "-l",
                "/var/log/nats-server.log",
            ])
            .status();
        wait_port(stevedore_testkit::NATS.addr, true, Duration::from_secs(60));
    }
}

impl Drop for NatsRestarter {
    fn drop(&mut self) {
        if !port_open(stevedore_testkit::NATS.addr) {
            self.start();
        }
    }
}

async fn wait_status(health: &Health, what: &str, f: impl Fn(&Status) -> bool) {
    let mut rx = health.subscribe();
    let r = tokio::time::timeout(Duration::from_secs(60), rx.wait_for(|s| f(s))).await;
    assert!(r.is_ok(), "{what} did not happen; status {:?}", health.status());
}

fn relay_options() -> RelayOptions {
    RelayOptions {
        batch_size: 200,
        poll_interval: Duration::from_millis(20),
        backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        ..RelayOptions::default()
    }
}

fn consumer_options() -> ConsumerOptions {
    ConsumerOptions {
        prefetch: 200,
        concurrency: 16,
        reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        ..ConsumerOptions::default()
    }
}

/// Writes messages `from..to` in transactions of 100 through `begin`.
macro_rules! write_range {
    ($pool:expr, $topic:expr, $range:expr, $ids:expr) => {{
        let range = $range;
        let mut i = range.start;
        while i < range.end {
            let mut tx = $pool.begin().await.unwrap();
            for j in i..(i + 100).min(range.end) {
                let m = Message::new($topic, format!("key-{}", j % 64), format!("{j}"));
                enqueue(&mut *tx, &m).await.unwrap();
                $ids.push(m.id);
            }
            tx.commit().await.unwrap();
            i += 100;
        }
    }};
}

struct Running<P: Publisher, S: Source, H: MessageHandler<A>, A: 'static> {
    relay: Arc<Relay<P>>,
    consumer: Arc<Consumer<S, H, A>>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

fn start<P: Publisher, S: Source, H: MessageHandler<A>, A: 'static>(
    relay: Relay<P>,
    consumer: Consumer<S, H, A>,
) -> Running<P, S, H, A> {
    let (relay, consumer, stop) = (Arc::new(relay), Arc::new(consumer), CancellationToken::new());
    let tasks = vec![
        tokio::spawn({
            let (r, s) = (relay.clone(), stop.clone());
            async move { r.run(s).await.unwrap() }
        }),
        tokio::spawn({
            let (c, s) = (consumer.clone(), stop.clone());
            async move { c.run(s).await.unwrap() }
        }),
    ];
    Running { relay, consumer, stop, tasks }
}

impl<P: Publisher, S: Source, H: MessageHandler<A>, A: 'static> Running<P, S, H, A> {
    async fn stop(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
    }
}

/// The relay marks rows after their confirm, which may come after the consumer saw them.
async fn wait_outbox_empty(outbox: &Outbox) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while outbox.pending().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the outbox did not empty");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_none_lost(seen: &Seen, ids: &[Uuid]) {
    let missing = seen.contains_all(ids);
    assert!(missing.is_empty(), "{} of {} messages lost", missing.len(), ids.len());
    eprintln!("{} deliveries for {} messages", seen.deliveries(), ids.len());
}

#[tokio::test]
async fn rabbitmq_stopped_and_started_mid_stream_loses_nothing() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES)
        || !stevedore_testkit::require(stevedore_testkit::RABBITMQ)
    {
        return;
    }
    let _serial = BROKERS.lock().await;
    let rabbit = RabbitRestarter;
    let schema = unique("stevedore_test");
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let pool = pg_pool(&schema).await;
    let outbox = Outbox::postgres(pool.clone());
    outbox.migrate().await.unwrap();

    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let publisher = AmqpPublisher::new(config.clone()).with_queue(&queue, &["orders.#"]);
    publisher.start().await.unwrap();
    let seen = Seen::default();
    let running = start(
        Relay::new(outbox.clone(), publisher, relay_options()),
        Consumer::new(AmqpSource::new(config, &queue, &["orders.#"]), seen.handler(), consumer_options()),
    );

    let mut ids = Vec::with_capacity(TOTAL);
    write_range!(pool, "orders.created", 0..BEFORE_OUTAGE, ids);
    assert!(seen.wait_for(1_000, Duration::from_secs(60)).await, "the stream did not start");

    tokio::task::spawn_blocking({
        let r = RabbitRestarter;
        move || {
            r.stop();
            std::mem::forget(r); // the outer guard restarts it
        }
    })
    .await
    .unwrap();
    // The outage is visible in health while messages keep being written.
    wait_status(&running.consumer.health(), "consumer reconnecting", |s| matches!(s, Status::Reconnecting { .. }))
        .await;
    write_range!(pool, "orders.created", BEFORE_OUTAGE..TOTAL, ids);
    outbox.wake();
    wait_status(&running.relay.health(), "relay reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    assert!(outbox.pending().await.unwrap() > 0, "messages wait in the outbox during the outage");

    tokio::task::spawn_blocking(|| RabbitRestarter.start()).await.unwrap();
    assert!(seen.wait_for(TOTAL, Duration::from_secs(120)).await, "only {} of {TOTAL} consumed", seen.distinct());
    wait_status(&running.consumer.health(), "consumer reconnected", |s| *s == Status::Connected).await;
    wait_status(&running.relay.health(), "relay reconnected", |s| *s == Status::Connected).await;
    wait_outbox_empty(&outbox).await;
    running.stop().await;
    assert_none_lost(&seen, &ids);

    drop(rabbit);
    amqp_cleanup(&exchange, &[&queue]).await;
    pool.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn nats_stopped_and_started_mid_stream_loses_nothing() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let _serial = BROKERS.lock().await;
    let nats = NatsRestarter;
    let stream = unique("STV");
    let prefix = unique("stv");
    let path = std::env::temp_dir().join(format!("{}.db", unique("stevedore_bus_restart")));
    let pool = sqlite_pool(&path).await;
    let outbox = Outbox::sqlite(pool.clone());
    outbox.migrate().await.unwrap();

    let mut config = NatsConfig::new(stevedore_testkit::nats_url(), &stream, &[&format!("{prefix}.>")]);
    config.ack_timeout = Duration::from_secs(2);
    let publisher = JetStreamPublisher::new(config.clone());
    publisher.start().await.unwrap();
    let seen = Seen::default();
    let running = start(
        Relay::new(outbox.clone(), publisher, relay_options()),
        Consumer::new(
            JetStreamSource::new(config, "checker", &format!("{prefix}.>")),
            seen.handler(),
            consumer_options(),
        ),
    );

    let topic = format!("{prefix}.orders.created");
    let mut ids = Vec::with_capacity(TOTAL);
    write_range!(pool, topic.as_str(), 0..BEFORE_OUTAGE, ids);
    assert!(seen.wait_for(1_000, Duration::from_secs(60)).await, "the stream did not start");

    tokio::task::spawn_blocking(|| {
        let n = NatsRestarter;
        n.stop();
        std::mem::forget(n);
    })
    .await
    .unwrap();
    write_range!(pool, topic.as_str(), BEFORE_OUTAGE..TOTAL, ids);
    outbox.wake();
    wait_status(&running.relay.health(), "relay reconnecting", |s| matches!(s, Status::Reconnecting { .. })).await;
    assert!(outbox.pending().await.unwrap() > 0, "messages wait in the outbox during the outage");

    tokio::task::spawn_blocking(|| NatsRestarter.start()).await.unwrap();
    assert!(seen.wait_for(TOTAL, Duration::from_secs(120)).await, "only {} of {TOTAL} consumed", seen.distinct());
    wait_status(&running.relay.health(), "relay reconnected", |s| *s == Status::Connected).await;
    wait_status(&running.consumer.health(), "consumer connected", |s| *s == Status::Connected).await;
    wait_outbox_empty(&outbox).await;
    running.stop().await;
    assert_none_lost(&seen, &ids);

    drop(nats);
    nats_cleanup(&stream).await;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
