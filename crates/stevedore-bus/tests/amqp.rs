//! RabbitMQ transport against the real broker.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::*;
use lapin::BasicProperties;
use lapin::options::BasicPublishOptions;
use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource, dead_letter_reason};
use stevedore_bus::consumer::{Consumer, ConsumerOptions};
use stevedore_bus::{Backoff, BoxError, Message, Publisher, Status};
use tokio_util::sync::CancellationToken;

fn options() -> ConsumerOptions {
    ConsumerOptions {
        max_attempts: 3,
        retry: Backoff::new(Duration::from_millis(20), Duration::from_millis(100)),
        reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        ..ConsumerOptions::default()
    }
}

#[tokio::test]
async fn published_messages_are_consumed_with_id_key_and_headers() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let publisher = AmqpPublisher::new(config.clone()).with_queue(&queue, &["orders.*"]);
    publisher.start().await.unwrap();
    let sent = Message::new("orders.created", "order-1", "hello").with_header("tenant", "acme");
    publisher.publish(&sent).await.unwrap();
    let batch: Vec<_> = (0..50).map(|i| Message::new("orders.updated", "order-1", format!("{i}"))).collect();
    let outcome = publisher.publish_batch(&batch).await;
    assert_eq!(outcome.confirmed, 50);
    assert!(outcome.error.is_none());

    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let r = received.clone();
    let consumer = Arc::new(Consumer::new(
        AmqpSource::new(config, &queue, &["orders.*"]),
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
    assert!(consumer.health().is_healthy());
    stop.cancel();
    run.await.unwrap().unwrap();
    let received = received.lock().unwrap().clone();
    assert_eq!(received[0], sent, "id, topic, key, payload and headers survive the trip");
    let order: Vec<_> = received[1..].iter().map(|m| m.id).collect();
    assert_eq!(order, batch.iter().map(|m| m.id).collect::<Vec<_>>(), "one channel keeps order");
    assert_eq!(amqp_count(&queue).await, 0, "everything was acknowledged");
    amqp_cleanup(&exchange, &[&queue]).await;
}

#[tokio::test]
async fn poison_and_malformed_messages_are_dead_lettered_with_their_reason() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let publisher = AmqpPublisher::new(config.clone()).with_queue(&queue, &["#"]);
    let poison = Message::new("orders.created", "o-1", "poison");
    publisher.publish(&poison).await.unwrap();
    // A message from a foreign producer without a message id.
    let (_conn, ch) = amqp_channel().await;
    ch.basic_publish(
        exchange.as_str().into(),
        "orders.created".into(),
        BasicPublishOptions::default(),
        b"raw",
        BasicProperties::default(),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let c = calls.clone();
    let consumer = Arc::new(Consumer::new(
        AmqpSource::new(config, &queue, &["#"]),
        move |_m: Message| {
            c.fetch_add(1, Ordering::SeqCst);
            async { Err::<(), BoxError>("total must be positive".into()) }
        },
        options(),
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    let first = amqp_get(&format!("{queue}.dlq"), Duration::from_secs(20)).await.expect("a dead letter");
    let second = amqp_get(&format!("{queue}.dlq"), Duration::from_secs(20)).await.expect("a second dead letter");
    stop.cancel();
    run.await.unwrap().unwrap();

    let mut reasons: Vec<(Option<String>, String)> = [first, second]
        .iter()
        .map(|d| {
            (
                d.delivery.properties.message_id().as_ref().map(|s| s.to_string()),
                dead_letter_reason(&d.delivery.properties).unwrap_or_default(),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(reasons[0], (None, "malformed message: no message_id property".to_string()));
    assert_eq!(reasons[1], (Some(poison.id.to_string()), "total must be positive".to_string()));
    assert_eq!(calls.load(Ordering::SeqCst), 3, "three attempts before dead-lettering");
    assert_eq!(amqp_count(&queue).await, 0);
    amqp_cleanup(&exchange, &[&queue]).await;
}

#[tokio::test]
async fn stop_drains_in_flight_and_returns_the_rest_to_the_queue() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let (exchange, queue, config) = queue_with_jobs(10).await;

    let gate = Gate::default();
    let consumer = Arc::new(Consumer::new(
        AmqpSource::new(config, &queue, &["#"]),
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
    let mut health = consumer.health().subscribe();
    health.wait_for(|s| *s == Status::Draining).await.unwrap();
    gate.release();
    run.await.unwrap().unwrap();
    assert_eq!(gate.started(), 2, "nothing new was started after stop");
    assert_eq!(gate.finished().len(), 2, "in-flight handlers finished");
    // The two finished were acked; the other eight (some prefetched) are back in the queue.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while amqp_count(&queue).await != 8 {
        assert!(tokio::time::Instant::now() < deadline, "expected 8 messages back in the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    amqp_cleanup(&exchange, &[&queue]).await;
}

#[tokio::test]
async fn hosted_drain_gives_messages_back_before_the_hosts_deadline() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let (exchange, queue, config) = queue_with_jobs(3).await;

    let started = Arc::new(tokio::sync::Notify::new());
    let s = started.clone();
    // Stuck handlers, a 30 s drain_timeout and a 3 s host budget: the host's deadline governs.
    let consumer = Consumer::new(
        AmqpSource::new(config, &queue, &["#"]),
        move |_m: Message| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            }
        },
        ConsumerOptions {
            prefetch: 3,
            concurrency: 1,
            drain_timeout: Duration::from_secs(30),
            // Slack for closing the connection on a loaded machine.
            drain_reserve: Duration::from_secs(1),
            ..options()
        },
    );
    let host = stevedore::Host::builder()
        .handle_signals(false)
        .read_env(false)
        .shutdown_timeout(Duration::from_secs(3))
        .add(consumer.into_spec("worker"))
        .build()
        .unwrap();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    tokio::time::timeout(Duration::from_secs(20), started.notified()).await.expect("a handler started");
    lifetime.request_stop();
    let report = run.await.unwrap();
    assert!(report.is_clean(), "the consumer stopped before the host's deadline: {}", report.summary());
    assert!(report.stop_duration >= Duration::from_secs(2), "it used the budget: {:?}", report.stop_duration);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while amqp_count(&queue).await != 3 {
        assert!(tokio::time::Instant::now() < deadline, "the stuck and the prefetched messages are back in the queue");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    amqp_cleanup(&exchange, &[&queue]).await;
}

/// A fresh exchange and queue (bound to every key) holding `n` confirmed `jobs.run` messages.
async fn queue_with_jobs(n: usize) -> (String, String, AmqpConfig) {
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let publisher = AmqpPublisher::new(config.clone()).with_queue(&queue, &["#"]);
    let batch: Vec<_> = (0..n).map(|i| Message::new("jobs.run", format!("{i}"), "x")).collect();
    assert_eq!(publisher.publish_batch(&batch).await.confirmed, n);
    (exchange, queue, config)
}
