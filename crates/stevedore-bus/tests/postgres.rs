//! The outbox, the relay lock and the deduplicator on PostgreSQL.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use stevedore_bus::memory::InProcessBus;
use stevedore_bus::outbox::{Outbox, enqueue};
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{Message, Status, idempotent};
use tokio_util::sync::CancellationToken;

#[tokio::test]
async fn rolled_back_transactions_publish_nothing_and_bad_rows_are_set_aside() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return;
    }
    let schema = unique("stevedore_test");
    let pool = pg_pool(&schema).await;
    let outbox = Outbox::postgres(pool.clone());
    outbox.migrate().await.unwrap();
    outbox.migrate().await.unwrap(); // idempotent
    sqlx::query("CREATE TABLE orders (id TEXT PRIMARY KEY)").execute(&pool).await.unwrap();

    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-1')").execute(&mut *tx).await.unwrap();
    enqueue(&mut *tx, &Message::new("orders.created", "o-1", "{}")).await.unwrap();
    tx.rollback().await.unwrap();

    sqlx::query("INSERT INTO stevedore_outbox (id, topic, msg_key, payload) VALUES ($1, 'bad topic', 'k', '\\x00')")
        .bind(uuid::Uuid::now_v7())
        .execute(&pool)
        .await
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    sqlx::query("INSERT INTO orders VALUES ('o-2')").execute(&mut *tx).await.unwrap();
    let kept = Message::new("orders.created", "o-2", "{}").with_header("tenant", "acme");
    enqueue(&mut *tx, &kept).await.unwrap();
    tx.commit().await.unwrap();

    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    let relay = Relay::new(outbox.clone(), bus, RelayOptions::default());
    relay.relay_once().await.unwrap();
    relay.relay_once().await.unwrap();
    assert_eq!(queue.len(), 1, "only the committed, valid message");
    assert_eq!(outbox.pending().await.unwrap(), 0);
    assert_eq!(outbox.undeliverable().await.unwrap(), 1);
    let (error,): (Option<String>,) =
        sqlx::query_as("SELECT last_error FROM stevedore_outbox WHERE dead_at IS NOT NULL")
            .fetch_one(&pool)
            .await
            .unwrap();
    assert!(error.unwrap_or_default().contains("whitespace"));

    // Delivered rows go after the retention; undeliverable ones stay for operators.
    assert_eq!(outbox.purge(Duration::from_secs(3600)).await.unwrap(), 0);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(outbox.purge(Duration::from_millis(1)).await.unwrap(), 1);
    assert_eq!(outbox.undeliverable().await.unwrap(), 1);

    pool.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn one_relay_per_schema_publishes_at_a_time() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return;
    }
    let schema = unique("stevedore_test");
    let pool = pg_pool(&schema).await;
    let outbox = Outbox::postgres(pool.clone());
    outbox.migrate().await.unwrap();
    let bus = InProcessBus::new();
    let queue = bus.queue("q", &["#"]);
    let options = RelayOptions { poll_interval: Duration::from_millis(20), ..RelayOptions::default() };
    let first = Arc::new(Relay::new(outbox.clone(), bus.clone(), options.clone()));
    let second = Arc::new(Relay::new(outbox.clone(), bus.clone(), options));
    let (stop_first, stop_second) = (CancellationToken::new(), CancellationToken::new());
    let a = tokio::spawn({
        let (r, s) = (first.clone(), stop_first.clone());
        async move { r.run(s).await }
    });
    tokio::time::timeout(Duration::from_secs(10), first.health().subscribe().wait_for(|s| *s == Status::Connected))
        .await
        .expect("the first relay takes the lock")
        .unwrap();
    let b = tokio::spawn({
        let (r, s) = (second.clone(), stop_second.clone());
        async move { r.run(s).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(second.health().status(), Status::Starting, "the second relay waits for the lock");

    let mut tx = pool.begin().await.unwrap();
    enqueue(&mut *tx, &Message::new("orders.created", "o-1", "{}")).await.unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queue.is_empty() {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The holder stops; the other takes over and relays the next message.
    stop_first.cancel();
    a.await.unwrap().unwrap();
    tokio::time::timeout(Duration::from_secs(10), second.health().subscribe().wait_for(|s| *s == Status::Connected))
        .await
        .expect("the second relay takes over")
        .unwrap();
    let mut tx = pool.begin().await.unwrap();
    enqueue(&mut *tx, &Message::new("orders.created", "o-2", "{}")).await.unwrap();
    tx.commit().await.unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while queue.len() < 2 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(queue.len(), 2, "each message relayed once");
    stop_second.cancel();
    b.await.unwrap().unwrap();
    pool.close().await;
    drop_schema(&schema).await;
}

#[tokio::test]
async fn claim_is_idempotent_on_postgres() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return;
    }
    let schema = unique("stevedore_test");
    let pool = pg_pool(&schema).await;
    Outbox::postgres(pool.clone()).migrate().await.unwrap();
    let m = Message::new("orders.created", "o-1", "{}");
    let mut tx = pool.begin().await.unwrap();
    assert!(idempotent::claim(&mut *tx, "billing", &m).await.unwrap());
    tx.rollback().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(idempotent::claim(&mut *tx, "billing", &m).await.unwrap());
    tx.commit().await.unwrap();
    let mut tx = pool.begin().await.unwrap();
    assert!(!idempotent::claim(&mut *tx, "billing", &m).await.unwrap());
    tx.commit().await.unwrap();
    pool.close().await;
    drop_schema(&schema).await;
}
