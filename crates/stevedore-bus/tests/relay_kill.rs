//! The relay killed with SIGKILL mid-stream and started again loses nothing.
//!
//! The relay runs as a child process (the `relay` example); the test writes 10,000 messages to
//! the outbox, kills the relay while it is publishing, restarts it, and checks with a consumer
//! that every message reached the broker.

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;
use stevedore_bus::amqp::{AmqpConfig, AmqpSource};
use stevedore_bus::consumer::{Consumer, ConsumerOptions};
use stevedore_bus::nats::{JetStreamSource, NatsConfig};
use stevedore_bus::outbox::{Outbox, enqueue};
use stevedore_bus::{Message, consumer::Source};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const TOTAL: usize = 10_000;

/// The `relay` example, built on demand (a plain `cargo test` has built it already).
fn relay_binary() -> PathBuf {
    let status = std::process::Command::new(env!("CARGO"))
        .args(["build", "-q", "-p", "stevedore-bus", "--example", "relay"])
        .status()
        .expect("run cargo");
    assert!(status.success(), "building the relay example failed");
    // target/debug/deps/relay_kill-xxxx -> target/debug/examples/relay
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().join("examples").join("relay")
}

fn spawn_relay(bin: &PathBuf, args: &[String]) -> Child {
    Command::new(bin)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start the relay")
}

/// Writes `TOTAL` messages in transactions of 100 and returns their ids.
async fn write_pg(pool: &sqlx::PgPool, topic: &str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(TOTAL);
    for chunk in 0..TOTAL / 100 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..100 {
            let m = Message::new(topic, format!("key-{}", (chunk * 100 + i) % 50), format!("{chunk}-{i}"));
            enqueue(&mut *tx, &m).await.unwrap();
            ids.push(m.id);
        }
        tx.commit().await.unwrap();
    }
    ids
}

async fn write_sqlite(pool: &sqlx::SqlitePool, topic: &str) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(TOTAL);
    for chunk in 0..TOTAL / 100 {
        let mut tx = pool.begin().await.unwrap();
        for i in 0..100 {
            let m = Message::new(topic, format!("key-{}", (chunk * 100 + i) % 50), format!("{chunk}-{i}"));
            enqueue(&mut *tx, &m).await.unwrap();
            ids.push(m.id);
        }
        tx.commit().await.unwrap();
    }
    ids
}

/// Runs the relay, kills it with SIGKILL once it has published part of the outbox, starts it
/// again and waits for the outbox to empty.
async fn kill_mid_stream_and_restart(outbox: &Outbox, args: Vec<String>) {
    let bin = relay_binary();
    let mut relay = spawn_relay(&bin, &args);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let pending = outbox.pending().await.unwrap();
        if pending < (TOTAL as i64) * 8 / 10 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the relay did not start publishing");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    relay.start_kill().unwrap(); // SIGKILL
    relay.wait().await.unwrap();
    let left = outbox.pending().await.unwrap();
    assert!(left > 0, "the relay was killed mid-stream, with messages still pending");
    eprintln!("relay killed with {left} messages pending");

    let mut relay = spawn_relay(&bin, &args);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while outbox.pending().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the restarted relay did not empty the outbox");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.start_kill().unwrap();
    relay.wait().await.unwrap();
}

async fn consume_all<S: Source>(source: S, ids: &[Uuid]) -> Seen {
    let seen = Seen::default();
    let consumer = std::sync::Arc::new(Consumer::new(
        source,
        seen.handler(),
        ConsumerOptions { prefetch: 200, concurrency: 16, ..ConsumerOptions::default() },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    let all = seen.wait_for(ids.len(), Duration::from_secs(120)).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(all, "only {} of {} messages were consumed", seen.distinct(), ids.len());
    assert!(seen.contains_all(ids).is_empty(), "messages were lost");
    seen
}

#[tokio::test]
async fn postgres_outbox_to_rabbitmq_survives_kill_9_of_the_relay() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES)
        || !stevedore_testkit::require(stevedore_testkit::RABBITMQ)
    {
        return;
    }
    let schema = unique("stevedore_test");
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let pool = pg_pool(&schema).await;
    let outbox = Outbox::postgres(pool.clone());
    outbox.migrate().await.unwrap();
    let ids = write_pg(&pool, "orders.created").await;

    let args = vec![
        stevedore_testkit::postgres_url(),
        schema.clone(),
        "amqp".into(),
        stevedore_testkit::amqp_url(),
        exchange.clone(),
        queue.clone(),
        "orders.#".into(),
        "50".into(),
    ];
    kill_mid_stream_and_restart(&outbox, args).await;
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let seen = consume_all(AmqpSource::new(config, &queue, &["orders.#"]), &ids).await;
    eprintln!("{} deliveries for {} messages", seen.deliveries(), ids.len());
    amqp_cleanup(&exchange, &[&queue]).await;
    pool.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn sqlite_outbox_to_jetstream_survives_kill_9_of_the_relay() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let path = std::env::temp_dir().join(format!("{}.db", unique("stevedore_bus_kill")));
    let pool = sqlite_pool(&path).await;
    let outbox = Outbox::sqlite(pool.clone());
    outbox.migrate().await.unwrap();
    let ids = write_sqlite(&pool, &format!("{prefix}.orders.created")).await;

    let args = vec![
        format!("sqlite://{}", path.display()),
        "-".into(),
        "nats".into(),
        stevedore_testkit::nats_url(),
        stream.clone(),
        format!("{prefix}.>"),
        "50".into(),
    ];
    kill_mid_stream_and_restart(&outbox, args).await;
    let config = NatsConfig::new(stevedore_testkit::nats_url(), &stream, &[&format!("{prefix}.>")]);
    consume_all(JetStreamSource::new(config, "checker", &format!("{prefix}.>")), &ids).await;
    nats_cleanup(&stream).await;
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}
