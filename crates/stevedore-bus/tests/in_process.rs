//! The consumer engine, the outbox and the relay on the in-process transport and SQLite.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use stevedore_bus::consumer::{Consumer, ConsumerOptions};
use stevedore_bus::memory::InProcessBus;
use stevedore_bus::outbox::{Outbox, enqueue};
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{Backoff, BatchOutcome, BoxError, Message, PublishError, Publisher, Status, idempotent};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use common::Gate;

fn fast_options() -> ConsumerOptions {
    ConsumerOptions {
        max_attempts: 3,
        retry: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        drain_timeout: Duration::from_secs(5),
        ..ConsumerOptions::default()
    }
}

#[tokio::test(start_paused = true)]
async fn poison_message_is_retried_then_dead_lettered_with_its_reason() {
    let bus = InProcessBus::new();
    let queue = bus.queue("orders", &["orders.#"]);
    let poison = Message::new("orders.created", "o-1", "poison");
    bus.publish(&poison).await.unwrap();
    bus.publish(&Message::new("orders.created", "o-2", "fine")).await.unwrap();

    let calls = Arc::new(AtomicU32::new(0));
    let acked = Arc::new(AtomicU32::new(0));
    let (c, a) = (calls.clone(), acked.clone());
    let consumer = Consumer::new(
        queue.source(),
        move |m: Message| {
            let (c, a) = (c.clone(), a.clone());
            async move {
                if &m.payload[..] == b"poison" {
                    c.fetch_add(1, Ordering::SeqCst);
                    return Err::<(), BoxError>("cannot parse order".into());
                }
                a.fetch_add(1, Ordering::SeqCst);
                Ok(())
            }
        },
        fast_options(),
    );
    let stop = CancellationToken::new();
    let consumer = Arc::new(consumer);
    let run = tokio::spawn({
        let (consumer, stop) = (consumer.clone(), stop.clone());
        async move { consumer.run(stop).await }
    });
    while queue.dead_letters().is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();

    let dead = queue.dead_letters();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].message.id, poison.id);
    assert_eq!(dead[0].reason, "cannot parse order");
    assert_eq!(dead[0].attempts, 3);
    assert_eq!(calls.load(Ordering::SeqCst), 3);
    assert_eq!(acked.load(Ordering::SeqCst), 1);
    assert!(queue.is_empty());
    assert_eq!(consumer.health().status(), Status::Stopped);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_handler_counts_as_a_failure() {
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    bus.publish(&Message::new("a.b", "k", "x")).await.unwrap();
    let consumer = Consumer::new(
        queue.source(),
        |_m: Message| async move {
            if true {
                panic!("boom");
            }
            Ok::<(), BoxError>(())
        },
        ConsumerOptions { max_attempts: 1, ..fast_options() },
    );
    let stop = CancellationToken::new();
    let s = stop.clone();
    let q = queue.clone();
    tokio::spawn(async move {
        while q.dead_letters().is_empty() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        s.cancel();
    });
    consumer.run(stop).await.unwrap();
    assert_eq!(queue.dead_letters()[0].reason, "panicked: boom");
}

#[tokio::test(start_paused = true)]
async fn drain_finishes_in_flight_and_leaves_the_rest_queued() {
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    for i in 0..3 {
        bus.publish(&Message::new("jobs.run", format!("k{i}"), "x")).await.unwrap();
    }
    let gate = Gate::default();
    let consumer =
        Arc::new(Consumer::new(queue.source(), gate.handler(), ConsumerOptions { concurrency: 2, ..fast_options() }));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    gate.wait_started(2).await;
    stop.cancel();
    // The consumer stops taking: the third message is not started while the two finish.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(consumer.health().status(), Status::Draining);
    gate.release();
    run.await.unwrap().unwrap();
    assert_eq!(gate.finished().len(), 2);
    assert_eq!(gate.started(), 2);
    assert_eq!(queue.len(), 1);
}

#[tokio::test(start_paused = true)]
async fn drain_budget_abandons_stuck_handlers_and_returns_their_messages() {
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    let stuck = Message::new("jobs.run", "k", "x");
    bus.publish(&stuck).await.unwrap();
    let started = Arc::new(Notify::new());
    let s = started.clone();
    let consumer = Arc::new(Consumer::new(
        queue.source(),
        move |_m: Message| {
            let s = s.clone();
            async move {
                s.notify_one();
                std::future::pending::<()>().await;
                Ok::<(), BoxError>(())
            }
        },
        ConsumerOptions { drain_timeout: Duration::from_secs(2), ..fast_options() },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (c, s) = (consumer.clone(), stop.clone());
        async move { c.run(s).await }
    });
    started.notified().await;
    assert!(queue.is_empty());
    let t0 = tokio::time::Instant::now();
    stop.cancel();
    run.await.unwrap().unwrap();
    assert!(t0.elapsed() >= Duration::from_secs(2));
    assert_eq!(queue.len(), 1, "the abandoned message went back to the queue");
}

async fn sqlite_outbox() -> (sqlx::SqlitePool, Outbox) {
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect("sqlite::memory:").await.unwrap();
    let outbox = Outbox::sqlite(pool.clone());
    outbox.migrate().await.unwrap();
    (pool, outbox)
}

#[tokio::test]
async fn a_rolled_back_transaction_publishes_nothing() {
    let (pool, outbox) = sqlite_outbox().await;
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)").execute(&pool).await.unwrap();
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-1')").execute(&mut *tx).await.unwrap();
    enqueue(&mut *tx, &Message::new("orders.created", "o-1", "{}")).await.unwrap();
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-2')").execute(&mut *tx).await.unwrap();
    let committed = Message::new("orders.created", "o-2", "{}");
    enqueue(&mut *tx, &committed).await.unwrap();
    tx.commit().await.unwrap();

    let relay = Relay::new(outbox.clone(), bus, RelayOptions::default());
    assert_eq!(relay.relay_once().await.unwrap(), 1);
    assert_eq!(relay.relay_once().await.unwrap(), 0);
    assert_eq!(queue.len(), 1);
    assert_eq!(outbox.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn enqueue_refuses_a_message_no_broker_can_carry() {
    let (pool, _outbox) = sqlite_outbox().await;
    let mut conn = pool.acquire().await.unwrap();
    let err = enqueue(&mut *conn, &Message::new("orders.*", "k", "x")).await.unwrap_err();
    assert!(err.to_string().contains("wildcards"), "{err}");
    let err = enqueue(&mut *conn, &Message::new("a", "k", "x").with_header("bad:name", "v")).await.unwrap_err();
    assert!(err.to_string().contains("bad:name"), "{err}");
}

#[tokio::test]
async fn an_unpublishable_row_is_set_aside_without_blocking_the_rest() {
    let (pool, outbox) = sqlite_outbox().await;
    // Written behind `enqueue`'s back, as an older version or a hand edit might.
    sqlx::query("INSERT INTO stevedore_outbox (id, topic, msg_key, payload) VALUES (?, 'bad topic', 'k', x'00')")
        .bind(uuid::Uuid::now_v7().to_string())
        .execute(&pool)
        .await
        .unwrap();
    let mut conn = pool.acquire().await.unwrap();
    enqueue(&mut *conn, &Message::new("orders.created", "k", "x")).await.unwrap();
    drop(conn);
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    let relay = Relay::new(outbox.clone(), bus, RelayOptions::default());
    relay.relay_once().await.unwrap();
    relay.relay_once().await.unwrap();
    assert_eq!(queue.len(), 1);
    assert_eq!(outbox.pending().await.unwrap(), 0);
    assert_eq!(outbox.undeliverable().await.unwrap(), 1);
}

/// A publisher that behaves like a channel whose broker goes away while `down` is set: the
/// batch in progress gets through (and is confirmed) only up to its middle, and nothing sent
/// after that reaches the broker until it is back.
struct Flaky {
    inner: InProcessBus,
    down: Arc<std::sync::atomic::AtomicBool>,
    broken: std::sync::atomic::AtomicBool,
}

impl Flaky {
    fn new(inner: InProcessBus, down: Arc<std::sync::atomic::AtomicBool>) -> Self {
        Self { inner, down, broken: std::sync::atomic::AtomicBool::new(false) }
    }
}

impl Publisher for Flaky {
    async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(PublishError::Unavailable { broker: "test", source: "connection refused".into() });
        }
        self.inner.publish(message).await
    }

    async fn publish_batch(&self, messages: &[Message]) -> BatchOutcome {
        if !self.down.load(Ordering::SeqCst) {
            self.broken.store(false, Ordering::SeqCst);
            for m in messages {
                let _ = self.inner.publish(m).await;
            }
            return BatchOutcome { confirmed: messages.len(), error: None };
        }
        // Confirm half the batch, then fail: the relay must mark exactly that prefix.
        let half = if self.broken.swap(true, Ordering::SeqCst) { 0 } else { messages.len() / 2 };
        for m in &messages[..half] {
            let _ = self.inner.publish(m).await;
        }
        BatchOutcome {
            confirmed: half,
            error: Some(PublishError::Unavailable { broker: "test", source: "connection reset".into() }),
        }
    }
}

#[tokio::test]
async fn relay_keeps_per_key_order_and_retries_while_the_broker_is_down() {
    let (pool, outbox) = sqlite_outbox().await;
    let mut tx = pool.begin().await.unwrap();
    let mut written: HashMap<String, Vec<uuid::Uuid>> = HashMap::new();
    for i in 0..500 {
        let key = format!("k{}", i % 7);
        let m = Message::new("orders.updated", key.clone(), format!("{i}"));
        written.entry(key).or_default().push(m.id);
        enqueue(&mut *tx, &m).await.unwrap();
    }
    tx.commit().await.unwrap();

    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = Arc::new(Relay::new(
        outbox.clone(),
        Flaky::new(bus, down.clone()),
        RelayOptions {
            batch_size: 64,
            backoff: Backoff::new(Duration::from_millis(5), Duration::from_millis(20)),
            ..RelayOptions::default()
        },
    ));
    let stop = CancellationToken::new();
    let run = tokio::spawn({
        let (r, s) = (relay.clone(), stop.clone());
        async move { r.run(s).await }
    });
    let mut health = relay.health().subscribe();
    health.wait_for(|s| matches!(s, Status::Reconnecting { .. })).await.unwrap();
    down.store(false, Ordering::SeqCst);
    health.wait_for(|s| *s == Status::Connected).await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while outbox.pending().await.unwrap() > 0 {
        assert!(tokio::time::Instant::now() < deadline, "relay did not drain the outbox");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.unwrap().unwrap();

    // Drain the queue and check: everything arrived, and per key the last copy of each message
    // comes in write order (re-sends after a failure may repeat a prefix, never reorder).
    let consumer_seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = consumer_seen.clone();
    let consumer = Consumer::new(
        queue.source(),
        move |m: Message| {
            seen.lock().unwrap().push((m.key.clone(), m.id));
            async { Ok::<(), BoxError>(()) }
        },
        ConsumerOptions { concurrency: 1, ..fast_options() },
    );
    let stop = CancellationToken::new();
    let s = stop.clone();
    let q = queue.clone();
    tokio::spawn(async move {
        while !q.is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        s.cancel();
    });
    consumer.run(stop).await.unwrap();
    let seen = consumer_seen.lock().unwrap().clone();
    for (key, ids) in &written {
        let got: Vec<_> = seen.iter().filter(|(k, _)| k == key).map(|(_, id)| *id).collect();
        let mut dedup: Vec<uuid::Uuid> = Vec::new();
        for id in got {
            if let Some(pos) = dedup.iter().position(|x| *x == id) {
                dedup.truncate(pos); // a re-send restarts from this message
            }
            dedup.push(id);
        }
        assert_eq!(&dedup, ids, "key {key}: messages missing or out of order");
    }
}

#[tokio::test]
async fn claim_makes_consumption_idempotent_and_rolls_back_with_the_transaction() {
    let (pool, _outbox) = sqlite_outbox().await;
    let m = Message::new("orders.created", "o-1", "{}");

    let mut tx = pool.begin().await.unwrap();
    assert!(idempotent::claim(&mut *tx, "billing", &m).await.unwrap());
    tx.rollback().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    assert!(idempotent::claim(&mut *tx, "billing", &m).await.unwrap(), "rolled back, so not claimed");
    tx.commit().await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    assert!(!idempotent::claim(&mut *tx, "billing", &m).await.unwrap(), "a duplicate");
    assert!(idempotent::claim(&mut *tx, "shipping", &m).await.unwrap(), "another consumer");
    tx.commit().await.unwrap();
}

#[tokio::test]
async fn relay_and_consumer_run_as_hosted_services_and_report_health() {
    let (pool, outbox) = sqlite_outbox().await;
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["orders.#"]);
    let down = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let relay = Relay::new(
        outbox.clone(),
        Flaky::new(bus, down.clone()),
        RelayOptions {
            poll_interval: Duration::from_millis(20),
            backoff: Backoff::new(Duration::from_millis(20), Duration::from_millis(50)),
            ..RelayOptions::default()
        },
    );
    let handled = Arc::new(AtomicU32::new(0));
    let h = handled.clone();
    let consumer = Consumer::new(
        queue.source(),
        move |_m: Message| {
            h.fetch_add(1, Ordering::SeqCst);
            async { Ok::<(), BoxError>(()) }
        },
        fast_options(),
    );
    let host = stevedore::Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(stevedore::ServiceSpec::background("outbox-relay", relay).heartbeat(Duration::from_millis(300)))
        .add(stevedore::ServiceSpec::background("billing", consumer).heartbeat(Duration::from_millis(1500)))
        .build()
        .unwrap();
    let (lifetime, status) = (host.lifetime(), host.status());
    let run = tokio::spawn(host.run());

    let mut tx = pool.begin().await.unwrap();
    for i in 0..20 {
        enqueue(&mut *tx, &Message::new("orders.created", format!("o-{i}"), "{}")).await.unwrap();
    }
    tx.commit().await.unwrap();
    outbox.wake();

    // The broker is "down": the relay stops beating and reports the outbox depth.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let relay = status.service("outbox-relay").unwrap();
        if !relay.is_healthy() && relay.queue.as_ref().is_some_and(|q| q.depth > 0) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the outage never showed: {relay:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(status.service("billing").unwrap().is_healthy(), "the consumer beats while idle");

    down.store(false, Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while handled.load(Ordering::SeqCst) < 20 || !status.service("outbox-relay").unwrap().is_healthy() {
        assert!(tokio::time::Instant::now() < deadline, "messages did not flow after the outage");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(outbox.pending().await.unwrap(), 0);

    lifetime.request_stop();
    let report = run.await.unwrap();
    assert_eq!(report.exit_code(), 0, "{}", report.summary());
}

/// Hosts a consumer whose handler takes `handler_takes` (started before the stop) and returns when the
/// host stopped: the report, what finished, and how many messages are back in the queue.
async fn hosted_drain(
    shutdown: Duration,
    drain_timeout: Duration,
    handler_takes: Duration,
) -> (stevedore::RunReport, u32, usize) {
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    bus.publish(&Message::new("jobs.run", "k", "x")).await.unwrap();
    let started = Arc::new(Notify::new());
    let finished = Arc::new(AtomicU32::new(0));
    let (s, f) = (started.clone(), finished.clone());
    let consumer = Consumer::new(
        queue.source(),
        move |_m: Message| {
            let (s, f) = (s.clone(), f.clone());
            async move {
                s.notify_one();
                tokio::time::sleep(handler_takes).await;
                f.fetch_add(1, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        },
        ConsumerOptions { drain_timeout, drain_reserve: Duration::from_millis(500), ..fast_options() },
    );
    let host = stevedore::Host::builder()
        .handle_signals(false)
        .read_env(false)
        .shutdown_timeout(shutdown)
        .add(consumer.into_spec("worker"))
        .build()
        .unwrap();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    started.notified().await;
    lifetime.request_stop();
    let report = run.await.unwrap();
    (report, finished.load(Ordering::SeqCst), queue.len())
}

#[tokio::test(start_paused = true)]
async fn hosted_drain_uses_the_hosts_remaining_budget() {
    // A handler longer than the old fixed 4 s, inside a 20 s host budget: it finishes and is
    // acknowledged.
    let (report, finished, back) = hosted_drain(secs(20), secs(30), secs(10)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!((finished, back), (1, 0), "the handler finished and its message was acknowledged");
    assert!(report.stop_duration >= secs(10) && report.stop_duration < secs(11), "{:?}", report.stop_duration);

    // A stuck handler under a 3 s host budget (drain_timeout 30 s): the consumer gives up 500 ms
    // before the host's deadline, returns the message, and stops cleanly, not abandoned.
    let (report, finished, back) = hosted_drain(secs(3), secs(30), secs(3600)).await;
    assert!(report.is_clean(), "the consumer stopped within the budget: {}", report.summary());
    assert_eq!((finished, back), (0, 1), "the unfinished message went back to the queue");
    assert_eq!(report.stop_duration, Duration::from_millis(2500));

    // drain_timeout stays an upper bound under a generous host budget.
    let (report, finished, back) = hosted_drain(secs(20), secs(1), secs(3600)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!((finished, back), (0, 1));
    assert_eq!(report.stop_duration, secs(1));
}

fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}
