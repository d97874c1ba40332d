//! Each message in its own scope, against the real RabbitMQ and NATS: a scoped SQLite
//! transaction commits when the handler succeeds, rolls back when it fails, and a commit that
//! fails is not acknowledged; a missing registration fails the host's build.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use stevedore::{Extension, Host, RunOutcome, Scoped, ServiceCollection, Singleton};
use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource, dead_letter_reason};
use stevedore_bus::consumer::{Consumer, ConsumerOptions, DeliveryInfo, MessageHandler, Source};
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::{Backoff, BoxError, ERROR_HEADER, Message, Publisher};

/// The application's database, a singleton.
struct Db(sqlx::SqlitePool);

/// One message's transaction, a scoped value: committed or rolled back when the scope ends.
struct Tx(sqlx::Transaction<'static, sqlx::Sqlite>);

fn services(pool: sqlx::SqlitePool) -> ServiceCollection {
    ServiceCollection::new().singleton_value(Db(pool)).scoped_with_end(
        |db: Singleton<Db>| async move { Ok::<_, BoxError>(Tx(db.0.begin().await?)) },
        |tx: Tx, outcome: RunOutcome| async move {
            if outcome == RunOutcome::Succeeded { tx.0.commit().await } else { tx.0.rollback().await }
        },
    )
}

fn options() -> ConsumerOptions {
    ConsumerOptions {
        max_attempts: 2,
        retry: Backoff::new(Duration::from_millis(20), Duration::from_millis(50)),
        reconnect: Backoff::new(Duration::from_millis(100), Duration::from_secs(1)),
        ..ConsumerOptions::default()
    }
}

type Attempts = Arc<Mutex<Vec<DeliveryInfo>>>;

/// Writes the message into `applied` through the scoped transaction, then:
/// `fail` returns an error (the write must roll back); `orphan` also writes a row whose deferred
/// foreign key is checked only at COMMIT (the commit fails: the message must not be acked).
fn handler(attempts: Attempts) -> impl MessageHandler<(Scoped<Tx>, Extension<DeliveryInfo>)> {
    move |m: Message, tx: Scoped<Tx>, Extension(info): Extension<DeliveryInfo>| {
        let attempts = attempts.clone();
        async move {
            attempts.lock().unwrap().push(info);
            let body = String::from_utf8_lossy(&m.payload).to_string();
            let mut tx = tx.lock().await;
            sqlx::query("INSERT INTO applied (id, body) VALUES (?, ?)")
                .bind(m.id.to_string())
                .bind(&body)
                .execute(&mut *tx.0)
                .await?;
            match body.as_str() {
                "fail" => Err("refused by the handler".into()),
                "orphan" => {
                    sqlx::query("INSERT INTO child (parent) VALUES (999)").execute(&mut *tx.0).await?;
                    Ok(())
                }
                _ => Ok::<(), BoxError>(()),
            }
        }
    }
}

async fn database(prefix: &str) -> (sqlx::SqlitePool, std::path::PathBuf) {
    let path = std::env::temp_dir().join(format!("{prefix}.sqlite"));
    let pool = sqlite_pool(&path).await;
    for ddl in [
        "CREATE TABLE applied (id TEXT PRIMARY KEY, body TEXT NOT NULL)",
        "CREATE TABLE parent (id INTEGER PRIMARY KEY)",
        "CREATE TABLE child (id INTEGER PRIMARY KEY, \
         parent INTEGER NOT NULL REFERENCES parent(id) DEFERRABLE INITIALLY DEFERRED)",
    ] {
        sqlx::query(ddl).execute(&pool).await.unwrap();
    }
    (pool, path)
}

async fn remove_database(pool: sqlx::SqlitePool, path: std::path::PathBuf) {
    pool.close().await;
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
}

/// Publishes `ok-1`, `fail`, `orphan`, `ok-2`, hosts a consumer of `source` with the scoped
/// transaction, waits until both successes committed and `settled` says the broker side is done
/// (both failures dead-lettered, nothing pending), stops the host cleanly, and
/// returns the messages and what the handler saw.
async fn run_scenario<P: Publisher, S: Source, F, Fut>(
    publisher: P,
    topic: &str,
    source: S,
    pool: &sqlx::SqlitePool,
    settled: F,
) -> (Vec<Message>, Vec<DeliveryInfo>)
where
    F: Fn() -> Fut,
    Fut: Future<Output = bool>,
{
    let messages: Vec<_> =
        ["ok-1", "fail", "orphan", "ok-2"].iter().map(|b| Message::new(topic, format!("key-{b}"), *b)).collect();
    let outcome = publisher.publish_batch(&messages).await;
    assert_eq!(outcome.confirmed, 4);

    let attempts = Attempts::default();
    let consumer = Consumer::new(source, handler(attempts.clone()), ConsumerOptions { concurrency: 1, ..options() });
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .services(services(pool.clone()))
        .add(consumer.into_spec("billing"))
        .build()
        .expect("every need of the handler is registered");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let committed = || async {
        sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM applied").fetch_one(pool).await.unwrap_or(0) == 2
    };
    while !(committed().await && settled().await) {
        assert!(tokio::time::Instant::now() < deadline, "the messages did not settle: {:?}", attempts.lock().unwrap());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lifetime.request_stop();
    let report = run.await.unwrap();
    assert!(report.is_clean(), "{}", report.summary());
    let seen = attempts.lock().unwrap().clone();
    (messages, seen)
}

/// The committed rows are exactly the two successes; the failed and the uncommittable attempts
/// left nothing behind.
async fn assert_database(pool: &sqlx::SqlitePool, messages: &[Message]) {
    let mut applied: Vec<(String, String)> =
        sqlx::query_as("SELECT id, body FROM applied").fetch_all(pool).await.unwrap();
    applied.sort_by(|a, b| a.1.cmp(&b.1));
    let expected: Vec<(String, String)> = [&messages[0], &messages[3]]
        .iter()
        .map(|m| (m.id.to_string(), String::from_utf8_lossy(&m.payload).to_string()))
        .collect();
    assert_eq!(applied, expected, "only the successful handlers' writes committed");
    let children: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM child").fetch_one(pool).await.unwrap();
    assert_eq!(children, 0, "the failed commit left nothing");
}

/// Each failing message was attempted twice, each attempt in its own scope with its own
/// delivery info; each success once.
fn assert_attempts(messages: &[Message], seen: &[DeliveryInfo]) {
    for m in messages {
        let mine: Vec<_> = seen.iter().filter(|i| i.id == m.id).collect();
        let body = String::from_utf8_lossy(&m.payload);
        let expected = if body.starts_with("ok") { vec![1] } else { vec![1, 2] };
        assert_eq!(mine.iter().map(|i| i.attempt).collect::<Vec<_>>(), expected, "attempts of {body}");
        assert!(mine.iter().all(|i| i.key == m.key && i.topic == m.topic && i.consumer == mine[0].consumer));
    }
}

#[tokio::test]
async fn rabbitmq_scoped_transaction_commits_on_success_and_rolls_back_on_failure() {
    if !stevedore_testkit::require(stevedore_testkit::RABBITMQ) {
        return;
    }
    let exchange = unique("stv_x");
    let queue = unique("stv_q");
    let (pool, path) = database(&unique("stv_scoped")).await;
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), &exchange);
    let publisher = AmqpPublisher::new(config.clone()).with_queue(&queue, &["#"]);
    let dlq = format!("{queue}.dlq");
    let (messages, seen) =
        run_scenario(publisher, "orders.created", AmqpSource::new(config, &queue, &["#"]), &pool, || async {
            amqp_count(&dlq).await == 2 && amqp_count(&queue).await == 0
        })
        .await;
    assert_database(&pool, &messages).await;
    assert_attempts(&messages, &seen);
    assert!(seen.iter().all(|i| i.consumer == queue));

    let mut reasons = Vec::new();
    for _ in 0..2 {
        let d = amqp_get(&dlq, Duration::from_secs(10)).await.expect("a dead letter");
        let id = d.delivery.properties.message_id().as_ref().map(|s| s.to_string()).unwrap_or_default();
        reasons.push((id, dead_letter_reason(&d.delivery.properties).unwrap_or_default()));
    }
    assert_dead_letters(&messages, reasons);
    assert_eq!(amqp_count(&queue).await, 0, "nothing left in the queue after the clean stop");
    amqp_cleanup(&exchange, &[&queue]).await;
    remove_database(pool, path).await;
}

/// `fail` is dead-lettered with the handler's error; `orphan` with the failed commit's.
fn assert_dead_letters(messages: &[Message], mut reasons: Vec<(String, String)>) {
    reasons.sort_by_key(|(id, _)| if *id == messages[1].id.to_string() { 0 } else { 1 });
    assert_eq!(reasons[0], (messages[1].id.to_string(), "refused by the handler".to_string()));
    assert_eq!(reasons[1].0, messages[2].id.to_string());
    assert!(reasons[1].1.contains("ending `Tx` failed"), "the commit's failure is the reason: {}", reasons[1].1);
    assert!(reasons[1].1.contains("FOREIGN KEY constraint failed"), "{}", reasons[1].1);
}

#[tokio::test]
async fn nats_scoped_transaction_commits_on_success_and_rolls_back_on_failure() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let stream = unique("STV");
    let prefix = unique("stv");
    let (pool, path) = database(&unique("stv_scoped")).await;
    let config = NatsConfig::new(stevedore_testkit::nats_url(), &stream, &[&format!("{prefix}.>")]);
    let info_of = |config: NatsConfig| async move {
        let client = async_nats::connect(&config.url).await.ok()?;
        let js = async_nats::jetstream::new(client);
        let mut dlq = js.get_stream(config.dead_letter_stream()).await.ok()?;
        let dead = dlq.info().await.ok()?.state.messages;
        let main = js.get_stream(&config.stream).await.ok()?;
        let mut consumer: async_nats::jetstream::consumer::PullConsumer = main.get_consumer("billing").await.ok()?;
        let info = consumer.info().await.ok()?;
        Some((dead, info.num_pending + info.num_ack_pending as u64))
    };
    let (messages, seen) = run_scenario(
        JetStreamPublisher::new(config.clone()),
        &format!("{prefix}.orders.created"),
        JetStreamSource::new(config.clone(), "billing", &format!("{prefix}.>")),
        &pool,
        || {
            let config = config.clone();
            async move { info_of(config).await == Some((2, 0)) }
        },
    )
    .await;
    assert_database(&pool, &messages).await;
    assert_attempts(&messages, &seen);

    let client = async_nats::connect(&config.url).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let dlq = js.get_stream(config.dead_letter_stream()).await.unwrap();
    let mut reasons = Vec::new();
    for seq in 1..=2 {
        let raw = dlq.get_raw_message(seq).await.unwrap();
        let id = raw.headers.get("Nats-Msg-Id").map(|v| v.to_string()).unwrap_or_default();
        reasons.push((id, raw.headers.get(ERROR_HEADER).map(|v| v.to_string()).unwrap_or_default()));
    }
    assert_dead_letters(&messages, reasons);
    nats_cleanup(&stream).await;
    remove_database(pool, path).await;
}

#[tokio::test]
async fn a_missing_registration_fails_the_host_build_naming_the_chain() {
    // Nothing connects at build time, so no broker is needed; the source is a real one.
    let config = AmqpConfig::new(stevedore_testkit::amqp_url(), "unused");
    let attempts = Attempts::default();
    let consumer = Consumer::new(AmqpSource::new(config.clone(), "unused", &["#"]), handler(attempts), options());
    // `Tx` is registered, but the `Db` singleton its factory needs is not.
    let without_db = ServiceCollection::new().scoped_with_end(
        |db: Singleton<Db>| async move { Ok::<_, BoxError>(Tx(db.0.begin().await?)) },
        |tx: Tx, _: RunOutcome| async move { tx.0.rollback().await },
    );
    let error = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .services(without_db)
        .add(consumer.into_spec("billing"))
        .build()
        .expect_err("the build checks the handler's needs");
    assert_eq!(
        error.to_string().matches("`billing` needs `Tx` (scoped), which needs `Db`: not registered").count(),
        1,
        "{error}"
    );

    // Nothing registered at all: the handler's own need is named.
    let consumer = Consumer::new(AmqpSource::new(config, "unused", &["#"]), handler(Attempts::default()), options());
    let error = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(consumer.into_spec("billing"))
        .build()
        .expect_err("the build checks the handler's needs");
    assert!(error.to_string().contains("`billing` needs `Tx`: not registered"), "{error}");

    // A plain closure needs nothing.
    let plain = Consumer::new(
        AmqpSource::new(AmqpConfig::new(stevedore_testkit::amqp_url(), "unused"), "unused", &["#"]),
        |_m: Message| async { Ok::<(), BoxError>(()) },
        options(),
    );
    Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(plain.into_spec("plain"))
        .build()
        .expect("nothing to check");
}
