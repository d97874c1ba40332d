//! The `stevedore` binary against real databases: a SQLite file and a fresh PostgreSQL database,
//! and the errors an operator gets for a bad URL, an unreachable server, a missing file and
//! tables that were never migrated.

use std::process::{Command, Output};
use std::time::{Duration, Instant};

use sqlx::Connection;
use stevedore_jobs::{JobState, JobStore, NewJob, SqliteStore, Worker};
use tokio_util::sync::CancellationToken;

fn stevedore(url: &str, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .env_remove("STEVEDORE_DATABASE_URL")
        .arg("--database-url")
        .arg(url)
        .args(args)
        .output()
        .expect("run stevedore")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(url: &str, args: &[&str]) -> String {
    let o = stevedore(url, args);
    assert!(o.status.success(), "stevedore {args:?} failed: {}", stderr(&o));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(url: &str, args: &[&str]) -> serde_json::Value {
    serde_json::from_str(&ok(url, args)).expect("JSON output")
}

fn code(o: &Output) -> i32 {
    o.status.code().expect("exited")
}

#[test]
fn bad_urls_are_usage_errors_that_say_what_would_work() {
    let o = stevedore("mysql://root@localhost/app", &["jobs", "stats"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(
        stderr(&o).contains("unsupported scheme \"mysql\": use postgres://USER@HOST/DB or sqlite://FILE"),
        "{}",
        stderr(&o)
    );

    let o = stevedore("postgres://app:hunter2@db:notaport/app", &["jobs", "stats"]);
    assert_eq!(code(&o), 2, "{}", stderr(&o));
    assert!(stderr(&o).contains("invalid database URL"), "{}", stderr(&o));
    assert!(!stderr(&o).contains("hunter2"), "the password is never printed: {}", stderr(&o));

    let o = Command::new(env!("CARGO_BIN_EXE_stevedore"))
        .env_remove("STEVEDORE_DATABASE_URL")
        .args(["jobs", "stats"])
        .output()
        .unwrap();
    assert_eq!(code(&o), 2);
    assert!(stderr(&o).contains("no database given"), "{}", stderr(&o));
}

#[test]
fn an_unreachable_server_fails_fast_and_names_the_address() {
    // Port 1 on loopback: nothing listens, the connection is refused at once.
    let started = Instant::now();
    let o = stevedore("postgres://postgres@127.0.0.1:1/app", &["--connect-timeout", "3s", "jobs", "stats"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("cannot connect to the database at 127.0.0.1:1/app"), "{}", stderr(&o));
    assert!(started.elapsed() < Duration::from_secs(10), "gave up within the connect timeout");
}

#[test]
fn a_missing_sqlite_file_is_not_created_by_a_read() {
    let dir = temp_dir();
    let file = dir.join("nope.db");
    let url = format!("sqlite://{}", file.display());
    let o = stevedore(&url, &["jobs", "stats"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("no SQLite database at") && stderr(&o).contains("stevedore migrate"), "{}", stderr(&o));
    assert!(!file.exists());
    std::fs::remove_dir_all(dir).unwrap();
}

fn temp_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("stevedore-cli-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Makes one dead job (a kind no worker knows dies at once) and two available ones, in `queue`.
async fn seed<S: JobStore>(store: S, queue: &str) -> i64 {
    let dead =
        store.enqueue(&NewJob::raw("nobody_handles_this", "{}").queue(queue).max_attempts(1)).await.unwrap().unwrap();
    let stop = CancellationToken::new();
    let worker = Worker::new(store.clone()).queue(queue, 1).spawn(stop.clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    while store.get(dead).await.unwrap().unwrap().state != JobState::Dead {
        assert!(Instant::now() < deadline, "the unknown kind went dead");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    worker.await.unwrap().unwrap();
    for n in 0..2 {
        store
            .enqueue(&NewJob::raw("later", format!("{{\"n\": {n}}}")).queue(queue).delay(Duration::from_secs(3600)))
            .await
            .unwrap();
    }
    dead
}

/// The whole operator round trip on one database.
fn operate(url: &str, queue: &str, dead: i64) {
    let stats = json(url, &["jobs", "stats", "--json"]);
    let q =
        stats["queues"].as_array().unwrap().iter().find(|q| q["queue"] == queue).expect("the queue is listed").clone();
    assert_eq!((q["dead"].as_u64(), q["scheduled"].as_u64(), q["paused"].as_bool()), (Some(1), Some(2), Some(false)));
    assert_eq!(stats["total"]["dead"].as_u64(), Some(1));
    let table = ok(url, &["jobs", "stats"]);
    assert!(table.contains("QUEUE") && table.contains(queue) && table.contains("TOTAL"), "{table}");

    let dead_jobs = json(url, &["jobs", "list", "--state", "dead", "--json"]);
    let dead_jobs = dead_jobs.as_array().unwrap();
    assert_eq!(dead_jobs.len(), 1);
    assert_eq!(dead_jobs[0]["id"].as_i64(), Some(dead));
    assert!(dead_jobs[0]["errors"][0]["error"].as_str().unwrap().contains("nobody_handles_this"), "{dead_jobs:?}");
    let listed = ok(url, &["jobs", "list", "--state", "dead"]);
    assert!(listed.contains("nobody_handles_this") && listed.contains("dead"), "{listed}");

    let id = dead.to_string();
    assert!(ok(url, &["jobs", "retry", &id]).contains("available again"));
    let o = stevedore(url, &["jobs", "retry", &id]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains(&format!("job {dead} is available and cannot be retried")), "{}", stderr(&o));
    assert!(ok(url, &["jobs", "cancel", &id]).contains("cancelled"));
    let o = stevedore(url, &["jobs", "cancel", &id]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("is cancelled and cannot be cancelled"), "{}", stderr(&o));
    let o = stevedore(url, &["jobs", "cancel", "999999999"]);
    assert_eq!(code(&o), 1);
    assert!(stderr(&o).contains("no job 999999999"), "{}", stderr(&o));
    assert!(ok(url, &["jobs", "retry", "--all-dead"]).contains("0 dead job(s)"));

    ok(url, &["queues", "pause", queue]);
    let stats = json(url, &["jobs", "stats", "--json"]);
    let paused = stats["queues"].as_array().unwrap().iter().find(|q| q["queue"] == queue).unwrap()["paused"].as_bool();
    assert_eq!(paused, Some(true));
    ok(url, &["queues", "resume", queue]);
    let stats = json(url, &["jobs", "stats", "--json"]);
    let paused = stats["queues"].as_array().unwrap().iter().find(|q| q["queue"] == queue).unwrap()["paused"].as_bool();
    assert_eq!(paused, Some(false));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operates_a_sqlite_file() {
    let dir = temp_dir();
    let file = dir.join("jobs.db");
    let url = format!("sqlite://{}", file.display());
    assert!(ok(&url, &["migrate"]).contains("migrated"));
    assert!(file.exists(), "migrate creates the file");
    let dead = seed(SqliteStore::open(&file).await.unwrap(), "mail").await;
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || operate(&url2, "mail", dead)).await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operates_a_postgres_database_and_asks_for_migrate_first() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return;
    }
    let admin = stevedore_testkit::postgres_url();
    let name = format!("stevedore_cli_{}", uuid::Uuid::new_v4().simple());
    let mut conn = sqlx::PgConnection::connect(&admin).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut conn).await.unwrap();
    let url = match admin.rfind('/') {
        Some(i) => format!("{}/{name}", &admin[..i]),
        None => panic!("unexpected test URL {admin}"),
    };

    let o = stevedore(&url, &["jobs", "stats"]);
    assert_eq!(code(&o), 1, "{}", stderr(&o));
    assert!(stderr(&o).contains("run `stevedore migrate` first"), "{}", stderr(&o));

    assert!(ok(&url, &["migrate"]).contains("migrated"));
    assert!(ok(&url, &["migrate"]).contains("migrated"), "migrate is idempotent");
    let store = stevedore_jobs::PostgresStore::connect(&url).await.unwrap();
    let dead = seed(store.clone(), "mail").await;
    let url2 = url.clone();
    tokio::task::spawn_blocking(move || operate(&url2, "mail", dead)).await.unwrap();

    drop(store);
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)"))).execute(&mut conn).await.unwrap();
}
