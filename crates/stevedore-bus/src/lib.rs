//! # stevedore-bus
//!
//! Reliable messaging for Stevedore: publish through a **transactional outbox** to RabbitMQ or
//! NATS JetStream, and consume as **hosted services** that acknowledge only after the handler
//! succeeds.
//!
//! ```text
//!  your transaction ──► stevedore_outbox ──► Relay ──► broker ──► Consumer ──► your handler
//!  (business rows +     (same database)      (hosted   (confirm)   (hosted     (ack after Ok,
//!   outbox row)                               service)              service)    retry, dead-letter)
//! ```
//!
//! - [`outbox::enqueue`] writes a [`Message`] through the caller's own SQLite or PostgreSQL
//!   transaction: the message exists if and only if the business change commits.
//! - [`relay::Relay`] publishes pending rows in write order, waits for the broker's confirm,
//!   marks exactly the confirmed rows delivered, and retries with backoff while the broker is
//!   down.
//! - [`consumer::Consumer`] pulls with bounded prefetch and concurrency, runs each message in
//!   its own scope (a [`consumer::MessageHandler`] takes the message, then extractors such as a
//!   scoped transaction that commits or rolls back with it), acknowledges only after the handler
//!   and its scope succeeded, retries with backoff, dead-letters with the reason, reconnects
//!   with backoff, and drains on stop within the host's shutdown budget.
//! - Transports: [`amqp`] (RabbitMQ, lapin), [`nats`] (JetStream, async-nats), [`memory`]
//!   (in process: the embedded default and the test double). All implement [`Publisher`].
//!
//! ```no_run
//! use std::time::Duration;
//! use stevedore::{Host, ServiceSpec};
//! use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource};
//! use stevedore_bus::consumer::{Consumer, ConsumerOptions};
//! use stevedore_bus::outbox::{Outbox, enqueue};
//! use stevedore_bus::relay::{Relay, RelayOptions};
//! use stevedore_bus::{BoxError, Message};
//!
//! # async fn run() -> Result<(), BoxError> {
//! let pool = sqlx::PgPool::connect("postgres://postgres@127.0.0.1/shop").await?;
//! let outbox = Outbox::postgres(pool.clone());
//! outbox.migrate().await?;
//!
//! // Producer side: the message commits (or not) with the order.
//! let mut tx = pool.begin().await?;
//! sqlx::query("INSERT INTO orders (id) VALUES ($1)").bind(42_i64).execute(&mut *tx).await?;
//! enqueue(&mut *tx, &Message::json("orders.created", "order-42", &serde_json::json!({"id": 42}))?).await?;
//! tx.commit().await?;
//! outbox.wake(); // optional: relay now instead of at the next poll
//!
//! let amqp = AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "shop");
//! let relay = Relay::new(outbox, AmqpPublisher::new(amqp.clone()).with_queue("billing", &["orders.*"]), RelayOptions::default());
//! let billing = Consumer::new(
//!     AmqpSource::new(amqp, "billing", &["orders.*"]),
//!     |m: Message| async move {
//!         let order: serde_json::Value = m.decode()?; // a decoding error dead-letters the message
//!         println!("bill {order}");
//!         Ok::<(), BoxError>(())
//!     },
//!     ConsumerOptions::default(),
//! );
//! Host::builder()
//!     .add(ServiceSpec::background("outbox-relay", relay).heartbeat(Duration::from_secs(30)))
//!     .add(billing.into_spec("billing").heartbeat(Duration::from_secs(30)))
//!     .build()?
//!     .run()
//!     .await
//!     .exit()
//! # }
//! ```
//!
//! ## Guarantees
//!
//! - **Atomic publish.** A rolled-back transaction publishes nothing; a committed one publishes
//!   its messages eventually, however many times the relay or the broker restarts.
//! - **At least once, never lost.** A row is marked delivered only after the broker confirmed it
//!   (RabbitMQ publisher confirm on a persistent message; JetStream publish ack). A consumer
//!   acknowledges only after the handler succeeds.
//! - **Order per key.** The relay publishes in write order on one channel, one relay at a time
//!   (on PostgreSQL a per-schema advisory lock elects it; run one relay per SQLite file), with
//!   up to two batches in flight. After a connection loss the unconfirmed tail is sent again,
//!   so a consumer can see `m1 m2 m3 m2 m3`: re-sends repeat a suffix. A broker that refuses
//!   one message but takes the next (a negative confirm, a lost JetStream ack) can make the
//!   re-sent one arrive after a later one; where strict order matters, carry a per-key version
//!   in the message and ignore stale ones. Messages written by concurrent transactions are
//!   ordered by insertion, not commit. Consumers with `concurrency > 1` process in parallel;
//!   use `concurrency: 1` (or partition by key across queues) where handlers need the order.
//! - **Poison messages** are retried `max_attempts` times with backoff, then dead-lettered with
//!   the reason ([`ERROR_HEADER`], [`ATTEMPTS_HEADER`]): RabbitMQ `queue.dlq` through the
//!   `exchange.dlx` dead-letter exchange, JetStream stream `STREAM_DLQ`. A message that cannot
//!   be decoded (no id) is dead-lettered at once. A handler panic counts as a failure.
//! - **Invalid messages** (a topic no broker accepts, a bad header name) are refused by
//!   [`outbox::enqueue`], inside the caller's transaction; a row that still cannot be published
//!   is set aside (`dead_at`, `last_error`) instead of blocking the rows behind it.
//!
//! ## What a crash or an outage costs
//!
//! | event | cost |
//! | --- | --- |
//! | broker down | rows wait in the outbox; the relay retries with backoff (health `Reconnecting`, metric `stevedore_bus_relay_connected` 0); consumers reconnect with backoff. Nothing is lost. |
//! | relay killed (`kill -9`) mid-batch | the batch's unmarked rows are published again: duplicates, no loss. JetStream drops re-sends inside its 2-minute duplicate window (`Nats-Msg-Id`). |
//! | consumer killed mid-handler | the broker redelivers the unacknowledged messages: the handler runs again. |
//! | consumer stopped (SIGTERM) | it stops taking, lets in-flight handlers finish until `drain_reserve` before the host's shutdown deadline (at most `drain_timeout`), and gives back the rest (RabbitMQ requeue; JetStream negative ack). A handler past the budget is abandoned (its scope dropped: a scoped transaction rolls back) and its message redelivered. |
//! | database down | the relay retries with backoff; producers' transactions fail, so nothing is half-written. |
//!
//! ## Consuming idempotently
//!
//! Duplicates are the price of never losing a message. Every message carries a UUID v7
//! [`Message::id`] that survives re-sends; claim it in the same transaction as the handler's own
//! writes with [`idempotent::claim`], and the effect happens once:
//!
//! ```
//! # use stevedore_bus::{BoxError, Message, idempotent::claim};
//! async fn handle(pool: &sqlx::SqlitePool, m: Message) -> Result<(), BoxError> {
//!     let mut tx = pool.begin().await?;
//!     if claim(&mut *tx, "billing", &m).await? {
//!         // first delivery: apply the effect on `tx`
//!     }
//!     tx.commit().await?; // the claim and the effect commit together
//!     Ok(())
//! }
//! ```
//!
//! ## Health and metrics
//!
//! [`Health`] (from `Relay::health` / `Consumer::health`) reads `Connected`, `Reconnecting
//! { attempt, error }`, `Draining`, `Stopped`. Hosted, both beat the service heartbeat only while
//! connected. Metrics (`metrics` crate): `stevedore_bus_outbox_published_total`,
//! `stevedore_bus_outbox_publish_failures_total`, `stevedore_bus_outbox_undeliverable_total`,
//! `stevedore_bus_relay_connected`, `stevedore_bus_consumed_total{consumer,outcome}`,
//! `stevedore_bus_consumer_reconnects_total{consumer}`, `stevedore_bus_consumer_connected{consumer}`,
//! `stevedore_bus_consumer_abandoned_total{consumer}`.
#![deny(missing_docs)]

pub mod amqp;
mod backoff;
pub mod consumer;
pub mod db;
mod health;
mod hosted;
pub mod idempotent;
pub mod memory;
mod message;
pub mod nats;
pub mod outbox;
mod publisher;
pub mod relay;

pub use backoff::Backoff;
pub use health::{Health, Status};
pub use message::{ATTEMPTS_HEADER, ERROR_HEADER, KEY_HEADER, Message};
pub use publisher::{BatchOutcome, PendingConfirms, PublishError, Publisher};

/// A boxed error, as handlers and transports return it (the core crate's).
pub use stevedore::BoxError;
