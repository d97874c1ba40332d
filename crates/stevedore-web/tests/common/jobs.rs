//! Job stores for the tests: a fresh SQLite file or PostgreSQL schema each, removed when the test
//! passes (a failed test leaves its data for a look).

use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use std::time::Duration;

use stevedore_jobs::{JobId, JobStore, Lease, NewJob, Outcome, PostgresStore, SqliteStore};

pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos());
    format!("{prefix}_{}_{}_{}", std::process::id(), nanos.unwrap_or(0), N.fetch_add(1, Ordering::Relaxed))
}

/// Where a test's jobs live; removed when the test passes (a failed test leaves them for a look).
pub enum Place {
    Sqlite(std::path::PathBuf),
    Postgres(String),
}

impl Place {
    pub async fn remove(self) {
        match self {
            Place::Sqlite(path) => {
                for suffix in ["", "-wal", "-shm"] {
                    let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
                }
            }
            Place::Postgres(schema) => {
                let admin = PgPool::connect(&stevedore_testkit::postgres_url()).await.expect("connect to PostgreSQL");
                sqlx::query(sqlx::AssertSqlSafe(format!("DROP SCHEMA IF EXISTS {schema} CASCADE")))
                    .execute(&admin)
                    .await
                    .expect("drop the test schema");
                admin.close().await;
            }
        }
    }
}

pub async fn sqlite() -> (SqliteStore, Place) {
    let path = std::env::temp_dir().join(format!("{}.db", unique("stevedore_web_jobs")));
    let store = SqliteStore::open(&path).await.expect("open the SQLite store");
    (store, Place::Sqlite(path))
}

/// A store in a fresh schema, or `None` (skipped loudly) when PostgreSQL is down outside CI.
pub async fn postgres() -> Option<(PostgresStore, Place)> {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
        return None;
    }
    let schema = unique("stevedore_test_web");
    let admin = PgPool::connect(&stevedore_testkit::postgres_url()).await.expect("connect to PostgreSQL");
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}"))).execute(&admin).await.expect("create schema");
    admin.close().await;
    let options = PgConnectOptions::from_str(&stevedore_testkit::postgres_url())
        .expect("a PostgreSQL URL")
        .options([("search_path", schema.as_str())]);
    let pool = PgPoolOptions::new().max_connections(6).connect_with(options).await.expect("connect to PostgreSQL");
    let store = PostgresStore::from_pool(pool);
    store.migrate().await.expect("migrate");
    Some((store, Place::Postgres(schema)))
}

/// A dead job made through the store's own API, as a worker would (fetch under a lease, then a
/// dead outcome).
pub async fn make_dead<S: JobStore>(store: &S, queue: &str, error: &str) -> JobId {
    let id = store.enqueue(&NewJob::raw("report", r#"{"day":3}"#).queue(queue)).await.expect("enqueued").expect("id");
    let lease = Lease { owner: "test-worker".to_string(), ttl: Duration::from_secs(30) };
    let claimed = store.fetch(queue, 1, &lease).await.expect("fetched");
    assert_eq!(claimed.iter().map(|c| c.id).collect::<Vec<_>>(), [id]);
    let applied =
        store.finish(&[Outcome::Dead { id, error: error.to_string() }], &lease.owner).await.expect("finished");
    assert_eq!(applied, [id]);
    id
}
