//! Helpers shared by the broker tests.
#![allow(dead_code)]

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use stevedore_bus::{BoxError, Message};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// A short unique suffix for exchange, queue, stream and schema names.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{}", &Uuid::new_v4().simple().to_string()[..12])
}

/// A PostgreSQL pool whose connections use a fresh schema.
pub async fn pg_pool(schema: &str) -> sqlx::PgPool {
    let url = stevedore_testkit::postgres_url();
    let admin = sqlx::PgPool::connect(&url).await.expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.expect("create schema");
    admin.close().await;
    let set = format!("SET search_path TO {schema}");
    sqlx::postgres::PgPoolOptions::new()
        .max_connections(5)
        .after_connect(move |conn, _| {
            let set = set.clone();
            Box::pin(async move {
                sqlx::query(sqlx::AssertSqlSafe(set)).execute(conn).await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .expect("connect to PostgreSQL")
}

pub async fn drop_schema(schema: &str) {
    if let Ok(admin) = sqlx::PgPool::connect(&stevedore_testkit::postgres_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE"))).execute(&admin).await;
        admin.close().await;
    }
}

/// A SQLite file in the temp dir, removed by the caller.
pub async fn sqlite_pool(path: &std::path::Path) -> sqlx::SqlitePool {
    let opts = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(path)
        .create_if_missing(true)
        .journal_mode(sqlx::sqlite::SqliteJournalMode::Wal)
        .busy_timeout(Duration::from_secs(10));
    sqlx::sqlite::SqlitePoolOptions::new().max_connections(4).connect_with(opts).await.expect("open SQLite")
}

/// Records the ids a handler saw (with duplicates counted separately).
#[derive(Clone, Default)]
pub struct Seen {
    ids: Arc<Mutex<HashSet<Uuid>>>,
    deliveries: Arc<Mutex<u64>>,
}

impl Seen {
    pub fn handler(
        &self,
    ) -> impl Fn(Message) -> std::future::Ready<Result<(), BoxError>> + Clone + Send + Sync + 'static {
        let seen = self.clone();
        move |m: Message| {
            seen.ids.lock().unwrap().insert(m.id);
            *seen.deliveries.lock().unwrap() += 1;
            std::future::ready(Ok(()))
        }
    }

    pub fn distinct(&self) -> usize {
        self.ids.lock().unwrap().len()
    }

    pub fn deliveries(&self) -> u64 {
        *self.deliveries.lock().unwrap()
    }

    pub fn contains_all(&self, ids: &[Uuid]) -> Vec<Uuid> {
        let seen = self.ids.lock().unwrap();
        ids.iter().filter(|id| !seen.contains(id)).copied().collect()
    }

    /// Polls until `n` distinct ids were seen or `within` passes.
    pub async fn wait_for(&self, n: usize, within: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        while self.distinct() < n {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        true
    }
}

pub async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(&stevedore_testkit::amqp_url(), lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

/// Takes one message from `queue`, polling until `within` passes.
pub async fn amqp_get(queue: &str, within: Duration) -> Option<lapin::message::BasicGetMessage> {
    let (_conn, ch) = amqp_channel().await;
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Ok(Some(m)) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await {
            return Some(m);
        }
        if tokio::time::Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Messages ready in `queue`.
pub async fn amqp_count(queue: &str) -> u32 {
    let (_conn, ch) = amqp_channel().await;
    ch.queue_declare(queue.into(), QueueDeclareOptions { passive: true, ..Default::default() }, FieldTable::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0)
}

/// Deletes the test's exchanges and queues, checking they are gone.
pub async fn amqp_cleanup(exchange: &str, queues: &[&str]) {
    let config = stevedore_bus::amqp::AmqpConfig::new(stevedore_testkit::amqp_url(), exchange);
    stevedore_bus::amqp::delete_topology(&config, queues).await.expect("delete the test topology");
    let (_conn, ch) = amqp_channel().await;
    for q in queues {
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        assert!(ch.queue_declare((*q).into(), passive, FieldTable::default()).await.is_err(), "{q} deleted");
    }
}

/// Deletes the test's stream and its dead-letter stream.
pub async fn nats_cleanup(stream: &str) {
    let config = stevedore_bus::nats::NatsConfig::new(stevedore_testkit::nats_url(), stream, &[]);
    stevedore_bus::nats::delete_streams(&config).await.expect("delete the test streams");
    stevedore_bus::nats::delete_streams(&config).await.expect("deleting again is not an error");
}

/// A handler that holds every message it starts until [`release`](Gate::release), for tests of
/// what a stop does to work in flight: it counts the starts and keeps the ids it finished.
#[derive(Clone, Default)]
pub struct Gate {
    started: Arc<AtomicU32>,
    finished: Arc<Mutex<Vec<Uuid>>>,
    release: CancellationToken,
}

type Handled = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

impl Gate {
    pub fn handler(&self) -> impl Fn(Message) -> Handled + Clone + Send + Sync + 'static {
        let gate = self.clone();
        move |m: Message| {
            let gate = gate.clone();
            Box::pin(async move {
                gate.started.fetch_add(1, Ordering::SeqCst);
                gate.release.cancelled().await;
                gate.finished.lock().unwrap().push(m.id);
                Ok(())
            })
        }
    }

    /// Waits (20 s at most, on tokio's clock) until `n` messages have started.
    pub async fn wait_started(&self, n: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while self.started() < n {
            assert!(tokio::time::Instant::now() < deadline, "{n} handlers did not start within 20 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    pub fn release(&self) {
        self.release.cancel();
    }

    pub fn started(&self) -> u32 {
        self.started.load(Ordering::SeqCst)
    }

    pub fn finished(&self) -> Vec<Uuid> {
        self.finished.lock().unwrap().clone()
    }
}
