//! Scoped services per request: request handlers take `Singleton<T>`, `Scoped<T>` and `Transient<T>`
//! as axum extractors; each request has its own scope, ended with the response's outcome.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::Path;
use axum::http::StatusCode;
use axum::routing::{get, post};
use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
use sqlx::{Sqlite, SqlitePool, Transaction};
use stevedore::{AppLifetime, BoxError, Host, RunOutcome, RunReport, Scoped, ServiceCollection, Singleton, Transient};
use stevedore_web::{WebHostExt, WebServer};
use tokio::task::JoinHandle;

use common::{eventually, get as http_get, post as http_post};

/// A started host serving `app` with `services`; stopped by [`Running::stop`].
struct Running {
    addr: SocketAddr,
    lifetime: AppLifetime,
    run: JoinHandle<RunReport>,
}

impl Running {
    async fn start(app: Router, services: ServiceCollection) -> Self {
        let web = WebServer::new(app).bind("127.0.0.1:0").admin_token(None).metrics(false);
        let mut bound = web.local_addr();
        let host = Host::builder()
            .handle_signals(false)
            .read_env(false)
            .services(services)
            .build_web(web)
            .expect("valid host");
        let lifetime = host.lifetime();
        let run = tokio::spawn(host.run());
        assert!(lifetime.started().await, "the host started");
        let addr = bound.wait().await.expect("the server is listening");
        Running { addr, lifetime, run }
    }

    async fn stop(self) {
        self.lifetime.request_stop();
        let report = self.run.await.expect("joined");
        assert!(!report.forced && report.start_error.is_none(), "{report:?}");
    }
}

/// A scoped value that records who wrote to it; `id` is the factory call that made it.
struct Tally {
    id: u64,
    writes: Vec<String>,
}

/// Counts factory calls (a singleton).
#[derive(Default)]
struct Made(AtomicU64);

fn tally_services() -> ServiceCollection {
    ServiceCollection::new().singleton_value(Made::default()).scoped(|made: Singleton<Made>| async move {
        Ok::<_, BoxError>(Tally { id: made.0.fetch_add(1, Ordering::SeqCst) + 1, writes: Vec::new() })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_scoped_value_per_request_shared_by_its_extractors() {
    async fn twice(a: Scoped<Tally>, b: Scoped<Tally>, made: Singleton<Made>) -> String {
        a.lock().await.writes.push("a".into());
        let b = b.lock().await;
        // Both parameters are the same value: b sees a's write.
        format!("{} {} {}", b.id, b.writes.join(","), made.0.load(Ordering::SeqCst))
    }
    let running = Running::start(Router::new().route("/twice", get(twice)), tally_services()).await;
    let first = http_get(running.addr, "/twice").await;
    assert_eq!((first.status, first.body.as_str()), (200, "1 a 1"), "one value, made once, shared");
    let second = http_get(running.addr, "/twice").await;
    assert_eq!((second.status, second.body.as_str()), (200, "2 a 2"), "a fresh value for the next request");
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_never_share_a_scoped_value() {
    const N: usize = 8;
    async fn mark(
        Path(n): Path<u32>,
        tally: Scoped<Tally>,
        all_in: Singleton<tokio::sync::Barrier>,
    ) -> Result<String, (StatusCode, String)> {
        tally.lock().await.writes.push(n.to_string());
        // Every request holds its value at once before any checks it.
        all_in.wait().await;
        let t = tally.lock().await;
        if t.writes != [n.to_string()] {
            return Err((StatusCode::CONFLICT, format!("request {n} saw writes {:?}", t.writes)));
        }
        Ok(t.id.to_string())
    }
    let services = tally_services().singleton_value(tokio::sync::Barrier::new(N));
    let running = Running::start(Router::new().route("/mark/{n}", get(mark)), services).await;
    let addr = running.addr;
    let replies: Vec<_> =
        (0..N).map(|n| tokio::spawn(async move { http_get(addr, &format!("/mark/{n}")).await })).collect();
    let mut ids = Vec::new();
    for reply in replies {
        let reply = reply.await.expect("joined");
        assert_eq!(reply.status, 200, "{}", reply.body);
        ids.push(reply.body.parse::<u64>().expect("an id"));
    }
    ids.sort_unstable();
    assert_eq!(ids, (1..=N as u64).collect::<Vec<_>>(), "each request had its own value");
    running.stop().await;
}

/// The article's case, over HTTP: a request's transaction commits when it answers 2xx, rolls back
/// otherwise.
mod sqlite_transaction {
    use super::*;

    struct Tx(Transaction<'static, Sqlite>);

    struct Db {
        pool: SqlitePool,
        dir: std::path::PathBuf,
    }

    impl Drop for Db {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    async fn db() -> Db {
        let dir = std::env::temp_dir().join(format!("stevedore-web-scope-{}-{}", std::process::id(), rand_suffix()));
        std::fs::create_dir_all(&dir).expect("a temp dir");
        let options = SqliteConnectOptions::new().filename(dir.join("db.sqlite")).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await.expect("sqlite");
        sqlx::query("CREATE TABLE employees (name TEXT NOT NULL)").execute(&pool).await.expect("table");
        Db { pool, dir }
    }

    fn rand_suffix() -> u64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(0)
    }

    fn services(pool: SqlitePool, outcomes: Arc<std::sync::Mutex<Vec<RunOutcome>>>) -> ServiceCollection {
        ServiceCollection::new().singleton_value(pool).scoped_with_end(
            |pool: Singleton<SqlitePool>| async move { Ok::<_, BoxError>(Tx(pool.begin().await?)) },
            move |tx: Tx, outcome: RunOutcome| {
                outcomes.lock().expect("unpoisoned").push(outcome);
                async move {
                    match outcome {
                        RunOutcome::Succeeded => tx.0.commit().await,
                        _ => tx.0.rollback().await,
                    }
                }
            },
        )
    }

    async fn insert(Path((name, answer)): Path<(String, u16)>, tx: Scoped<Tx>) -> (StatusCode, String) {
        let mut tx = tx.lock().await;
        if let Err(e) = sqlx::query("INSERT INTO employees (name) VALUES (?)").bind(&name).execute(&mut *tx.0).await {
            return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
        }
        (StatusCode::from_u16(answer).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR), name)
    }

    async fn names(pool: &SqlitePool) -> Vec<String> {
        sqlx::query_scalar("SELECT name FROM employees ORDER BY name").fetch_all(pool).await.expect("select")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn committed_on_2xx_and_3xx_rolled_back_on_4xx_and_5xx() {
        let db = db().await;
        let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let app = Router::new().route("/employees/{name}/{answer}", post(insert));
        let running = Running::start(app, services(db.pool.clone(), outcomes.clone())).await;
        for (name, answer) in [("ada", 200), ("bob", 500), ("cy", 303), ("dee", 422), ("eve", 201)] {
            let reply = http_post(running.addr, &format!("/employees/{name}/{answer}"), None).await;
            assert_eq!(reply.status, answer, "{}", reply.body);
            // The scope ended before the response was sent: the database already shows it.
            let expected: &[&str] = match name {
                "ada" | "bob" => &["ada"],
                "cy" | "dee" => &["ada", "cy"],
                _ => &["ada", "cy", "eve"],
            };
            assert_eq!(names(&db.pool).await, expected, "after {name} answered {answer}");
        }
        use RunOutcome::{Failed, Succeeded};
        assert_eq!(*outcomes.lock().expect("unpoisoned"), [Succeeded, Failed, Succeeded, Failed, Succeeded]);
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_commit_turns_the_answer_into_500() {
        let db = db().await;
        // The end hook refuses to commit: the client must not see the 200 the handler returned.
        let services = ServiceCollection::new().singleton_value(db.pool.clone()).scoped_with_end(
            |pool: Singleton<SqlitePool>| async move { Ok::<_, BoxError>(Tx(pool.begin().await?)) },
            |tx: Tx, _outcome: RunOutcome| async move {
                tx.0.rollback().await?;
                Err::<(), BoxError>("the commit was refused".into())
            },
        );
        let app = Router::new().route("/employees/{name}/{answer}", post(insert));
        let running = Running::start(app, services).await;
        let reply = http_post(running.addr, "/employees/ada/200", None).await;
        assert_eq!(reply.status, 500, "{}", reply.body);
        assert!(!reply.body.contains("refused"), "the end hook's error stays in the log: {}", reply.body);
        assert!(names(&db.pool).await.is_empty());
        running.stop().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_request_dropped_mid_handler_is_rolled_back() {
        let db = db().await;
        let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
        let inserted = Arc::new(tokio::sync::Notify::new());
        let signal = inserted.clone();
        let app = Router::new().route(
            "/slow/{name}",
            post(move |Path(name): Path<String>, tx: Scoped<Tx>| {
                let signal = signal.clone();
                async move {
                    let mut tx = tx.lock().await;
                    sqlx::query("INSERT INTO employees (name) VALUES (?)").bind(&name).execute(&mut *tx.0).await.ok();
                    signal.notify_one();
                    std::future::pending::<()>().await;
                    "never"
                }
            }),
        );
        let running = Running::start(app, services(db.pool.clone(), outcomes.clone())).await;
        let addr = running.addr;
        let client = tokio::spawn(async move { common::send("POST", addr, "/slow/zed", None).await });
        inserted.notified().await;
        // The client goes away: the server drops the request's work, and its scope ends as failed.
        client.abort();
        eventually(Duration::from_secs(5), "the abandoned request's scope to end", || {
            let outcomes = outcomes.clone();
            async move { *outcomes.lock().expect("unpoisoned") == [RunOutcome::Failed] }
        })
        .await;
        assert!(names(&db.pool).await.is_empty(), "the abandoned insert was rolled back");
        running.stop().await;
    }
}

struct Unregistered;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_extractor_that_cannot_be_provided_is_a_500_naming_the_type() {
    struct Broken;
    let services = tally_services()
        .scoped(|| async { Err::<Broken, BoxError>("connection refused by db.internal:5432".into()) })
        .transient(|| async { Ok::<_, BoxError>(7u32) });
    let app = Router::new()
        .route("/missing", get(|_: Scoped<Unregistered>| async { "unreachable" }))
        .route("/wrong-lifetime", get(|_: Singleton<Tally>| async { "unreachable" }))
        .route("/broken", get(|_: Scoped<Broken>| async { "unreachable" }))
        .route("/seven", get(|n: Transient<u32>| async move { n.to_string() }));
    let running = Running::start(app, services).await;
    let missing = http_get(running.addr, "/missing").await;
    assert_eq!(missing.status, 500);
    assert!(missing.body.contains("`Scoped<Unregistered>`"), "{}", missing.body);
    let wrong = http_get(running.addr, "/wrong-lifetime").await;
    assert_eq!(wrong.status, 500);
    assert!(wrong.body.contains("`Singleton<Tally>`"), "{}", wrong.body);
    let broken = http_get(running.addr, "/broken").await;
    assert_eq!(broken.status, 500);
    assert!(broken.body.contains("`Scoped<Broken>`"), "{}", broken.body);
    assert!(!broken.body.contains("db.internal"), "the factory's error stays in the log: {}", broken.body);
    let seven = http_get(running.addr, "/seven").await;
    assert_eq!((seven.status, seven.body.as_str()), (200, "7"));
    // The server is still serving after the failures.
    assert_eq!(http_get(running.addr, "/health/live").await.status, 200);
    running.stop().await;
}

#[test]
fn declared_needs_are_checked_when_the_host_is_built() {
    let web = WebServer::new(Router::new()).name("front").need::<Scoped<Tally>>().need::<Scoped<Unregistered>>();
    let err = Host::builder().services(tally_services()).build_web(web).expect_err("Unregistered is missing");
    let text = err.to_string();
    assert!(text.contains("`front` needs `Unregistered`: not registered"), "{text}");
    let web = WebServer::new(Router::new()).need::<Singleton<Tally>>();
    let err = Host::builder().services(tally_services()).build_web(web).expect_err("Tally is scoped");
    assert!(err.to_string().contains("asked for as singleton, but registered as scoped"), "{err}");
    let web = WebServer::new(Router::new()).need::<Scoped<Tally>>().need::<Singleton<Made>>();
    assert!(Host::builder().services(tally_services()).build_web(web).is_ok());
}

#[tokio::test]
async fn a_router_without_a_scope_is_told_so() {
    use axum::extract::FromRequestParts;
    let (mut parts, ()) = axum::http::Request::new(()).into_parts();
    let rejection = Scoped::<Tally>::from_request_parts(&mut parts, &()).await.err().expect("no scope");
    assert_eq!(rejection.type_name(), "Scoped<Tally>");
    assert!(rejection.to_string().contains("has no scope"), "{rejection}");
}
