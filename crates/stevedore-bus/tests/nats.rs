//! NATS JetStream transport against the real server.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use stevedore_bus::consumer::{Consumer, ConsumerOptions};
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::{Backoff, BoxError, ERROR_HEADER, Message, Publisher, Status};
use tokio_util::sync::CancellationToken;

fn options() -> ConsumerOptions {
    ConsumerOptions {
        max_attempts: 3,
        retry: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        ..ConsumerOptions::default()
    }
}

fn config(stream: &str, prefix: &str) -> NatsConfig {
    NatsConfig::new(stevedore_testkit::nats_url(), stream, &[&format!("{prefix}.>")])
}

/// Reads up to `n` messages of the dead-letter stream.
async fn dead_letters(config: &NatsConfig, n: usize) -> Vec<async_nats::jetstream::Message> {
    let client = async_nats::connect(&config.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(config.dead_letter_stream()).await.unwrap();
    let consumer = stream.create_consumer(async_nats::jetstream::consumer::pull::Config::default()).await.unwrap();
    let mut batch = consumer.fetch().max_messages(n).expires(Duration::from_secs(2)).messages().await.unwrap();
    let mut out = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        out.push(m);
    }
    out
}

#[tokio::test]
async fn published_messages_are_consumed_with_id_key_and_headers() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let config = config(&stream, &prefix);
    let publisher = JetStreamPublisher::new(config.clone());
    let sent = Message::new(format!("{prefix}.orders.created"), "order-1", "hello").with_header("tenant", "acme");
    publisher.publish(&sent).await.unwrap();
    let batch: Vec<_> =
        (0..50).map(|i| Message::new(format!("{prefix}.orders.updated"), "order-1", format!("{i}"))).collect();
    let outcome = publisher.publish_batch(&batch).await;
    assert_eq!(outcome.confirmed, 50);
    assert!(outcome.error.is_none());
    // A re-send of the same id is dropped by JetStream's duplicate window.
    publisher.publish(&sent).await.unwrap();

    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = received.clone();
    let consumer = Arc::new(Consumer::new(
        JetStreamSource::new(config, "reader", &format!("{prefix}.>")),
        move |m: Message| {
            r.lock().unwrap().push(m);
            async { Ok::<(), BoxError>(()) }
        },
        ConsumerOptions { concurrency: 1, ..options() },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while received.lock().unwrap().len() < 51 {
        assert!(tokio::time::Instant::now() < deadline, "not all messages arrived");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(consumer.health().is_healthy());
    stop.cancel();
    run.await.unwrap().unwrap();
    let received = received.lock().unwrap().clone();
    assert_eq!(received.len(), 51, "the duplicate was not stored");
    assert_eq!(received[0], sent);
    let order: Vec<_> = received[1..].iter().map(|m| m.id).collect();
    assert_eq!(order, batch.iter().map(|m| m.id).collect::<Vec<_>>());
    nats_cleanup(&stream).await;
}

#[tokio::test]
async fn poison_and_malformed_messages_are_dead_lettered_with_their_reason() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let config = config(&stream, &prefix);
    let publisher = JetStreamPublisher::new(config.clone());
    let poison = Message::new(format!("{prefix}.orders.created"), "o-1", "poison");
    publisher.publish(&poison).await.unwrap();
    // A foreign producer's message without Nats-Msg-Id.
    let client = async_nats::connect(&config.url).await.unwrap();
    async_nats::jetstream::new(client)
        .publish(format!("{prefix}.orders.created"), "raw".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let consumer = Arc::new(Consumer::new(
        JetStreamSource::new(config.clone(), "billing", &format!("{prefix}.>")),
        move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>("total must be\npositive".into()) }
        },
        options(),
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut dead = Vec::new();
    while dead.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline, "dead letters did not arrive");
        tokio::time::sleep(Duration::from_millis(200)).await;
        if let Ok(client) = async_nats::connect(&config.url).await
            && let Ok(s) = async_nats::jetstream::new(client).get_stream(config.dead_letter_stream()).await
            && s.get_info().await.map(|i| i.state.messages).unwrap_or(0) >= 2
        {
            dead = dead_letters(&config, 2).await;
        }
    }
    stop.cancel();
    run.await.unwrap().unwrap();
    let mut reasons: Vec<(Option<String>, String)> = dead
        .iter()
        .map(|m| {
            let h = m.headers.clone().unwrap_or_default();
            (
                h.get("Nats-Msg-Id").map(|v| v.to_string()),
                h.get(ERROR_HEADER).map(|v| v.to_string()).unwrap_or_default(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0], (None, "malformed message: no Nats-Msg-Id header".to_string()));
    assert_eq!(reasons[1], (Some(poison.id.to_string()), "total must be positive".to_string()));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "JetStream redelivered until max attempts");
    nats_cleanup(&stream).await;
}

#[tokio::test]
async fn stop_drains_in_flight_and_the_rest_is_redelivered_later() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let config = config(&stream, &prefix);
    let publisher = JetStreamPublisher::new(config.clone());
    let batch: Vec<_> = (0..10).map(|i| Message::new(format!("{prefix}.jobs"), format!("{i}"), "x")).collect();
    assert_eq!(publisher.publish_batch(&batch).await.confirmed, 10);

    let gate = Gate::default();
    let consumer = Arc::new(Consumer::new(
        JetStreamSource::new(config.clone(), "worker", &format!("{prefix}.>")),
        gate.handler(),
        ConsumerOptions { prefetch: 5, concurrency: 2, ..options() },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    gate.wait_started(2).await;
    stop.cancel();
    consumer.health().subscribe().wait_for(|s| *s == Status::Draining).await.unwrap();
    gate.release();
    run.await.unwrap().unwrap();
    assert_eq!(gate.started(), 2);
    assert_eq!(gate.finished().len(), 2);

    // A new consumer on the same durable gets exactly the eight that were not done.
    let seen = Seen::default();
    let again = Arc::new(Consumer::new(
        JetStreamSource::new(config, "worker", &format!("{prefix}.>")),
        seen.handler(),
        options(),
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (again.clone(), stop.clone());
        async move { c.run(s).await }
    });
    assert!(seen.wait_for(8, Duration::from_secs(20)).await, "saw {}", seen.distinct());
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    run.await.unwrap().unwrap();
    assert_eq!(seen.distinct(), 8);
    nats_cleanup(&stream).await;
}

/// Runs a consumer whose handler blocks until released, stops it once one message is in
/// flight, then releases the handler; returns the ids it handled.
async fn run_one_and_stop(config: &NatsConfig, prefix: &str, max_attempts: u32) -> Vec<uuid::Uuid> {
    let gate = Gate::default();
    let consumer = Arc::new(Consumer::new(
        JetStreamSource::new(config.clone(), "worker", &format!("{prefix}.>")),
        gate.handler(),
        ConsumerOptions { prefetch: 5, concurrency: 1, max_attempts, ..options() },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    gate.wait_started(1).await;
    // Let the rest of the pull arrive before stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.cancel();
    consumer.health().subscribe().wait_for(|s| *s == Status::Draining).await.unwrap();
    gate.release();
    run.await.unwrap().unwrap();
    gate.finished()
}

#[tokio::test]
async fn a_message_given_back_on_its_last_allowed_delivery_is_dead_lettered_not_stranded() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let config = config(&stream, &prefix);
    let publisher = JetStreamPublisher::new(config.clone());
    let batch: Vec<_> = (0..3).map(|i| Message::new(format!("{prefix}.jobs"), format!("{i}"), "x")).collect();
    assert_eq!(publisher.publish_batch(&batch).await.confirmed, 3);

    // max_attempts 1: JetStream allows two deliveries. The first stop gives two messages back
    // (their first delivery); the second stop gives one back on its second, last delivery.
    let first = run_one_and_stop(&config, &prefix, 1).await;
    let second = run_one_and_stop(&config, &prefix, 1).await;
    assert_eq!(first.len() + second.len(), 2, "one message handled per run");
    let dead = dead_letters(&config, 1).await;
    assert_eq!(dead.len(), 1);
    let h = dead[0].headers.clone().unwrap_or_default();
    assert_eq!(
        h.get(ERROR_HEADER).map(|v| v.to_string()).as_deref(),
        Some("given back at stop on its last allowed delivery")
    );
    let id: uuid::Uuid = h.get("Nats-Msg-Id").unwrap().to_string().parse().unwrap();
    let mut all: Vec<_> = first.iter().chain(&second).copied().chain([id]).collect();
    all.sort();
    let mut sent: Vec<_> = batch.iter().map(|m| m.id).collect();
    sent.sort();
    assert_eq!(all, sent, "every message handled or dead-lettered, none stranded");
    nats_cleanup(&stream).await;
}
