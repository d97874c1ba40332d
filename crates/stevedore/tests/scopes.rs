//! Scoped services: lifetimes, build-time validation with exact messages, ends with outcomes, and a
//! real SQLite transaction committed on success and rolled back on failure.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use stevedore::handler::{run_handler, run_payload_handler};
use stevedore::{
    BoxError, CancellationToken, Host, RunOutcome, Scoped, ServiceCollection, ServiceContext, ServiceSpec, Singleton,
    Transient,
};

fn ctx(services: ServiceCollection) -> ServiceContext {
    ServiceContext::detached_with("test", CancellationToken::new(), services)
}

struct Counter(AtomicU32);
struct PerRun(u32);
struct Fresh(u32);

fn counting() -> ServiceCollection {
    ServiceCollection::new()
        .singleton_value(Counter(AtomicU32::new(0)))
        .scoped(|c: Singleton<Counter>| async move { Ok::<_, BoxError>(PerRun(c.0.fetch_add(1, Ordering::SeqCst))) })
        .transient(|c: Singleton<Counter>| async move { Ok::<_, BoxError>(Fresh(c.0.fetch_add(1, Ordering::SeqCst))) })
}

#[tokio::test]
async fn each_lifetime_behaves_as_named() {
    let ctx = ctx(counting());
    type Seen = Vec<(u32, u32, u32, u32)>;
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let s = seen.clone();
    let handler = move |a: Scoped<PerRun>, b: Scoped<PerRun>, t1: Transient<Fresh>, t2: Transient<Fresh>| {
        let s = s.clone();
        async move {
            // One value behind both parameters: lock one at a time.
            let a = a.lock().await.0;
            let b = b.lock().await.0;
            s.lock().unwrap().push((a, b, t1.0, t2.0));
            Ok::<_, BoxError>(())
        }
    };
    assert!(run_handler(&ctx, &handler, None).await.is_success());
    assert!(run_handler(&ctx, &handler, None).await.is_success());
    let seen = seen.lock().unwrap().clone();
    // Scoped: one per run, shared inside it. Transient: fresh at each parameter. One counter for all.
    assert_eq!(seen, [(0, 0, 1, 2), (3, 3, 4, 5)]);
}

#[tokio::test]
async fn two_concurrent_runs_never_share_a_scoped_value() {
    let ctx = ctx(counting());
    let handler = |run: Scoped<PerRun>| async move {
        let mine = run.lock().await.0;
        tokio::task::yield_now().await;
        Ok::<_, BoxError>(mine)
    };
    use stevedore::Handler;
    let (s1, s2) = (ctx.create_scope(), ctx.create_scope());
    let (a, b) = tokio::join!(Handler::call(&handler, &s1), Handler::call(&handler, &s2));
    let (a, b) = (a.unwrap(), b.unwrap());
    assert_ne!(a, b, "two scopes got the same scoped value");
    let (x, y) = (s1.get::<Scoped<PerRun>>().await.unwrap(), s2.get::<Scoped<PerRun>>().await.unwrap());
    assert_ne!(x.lock().await.0, y.lock().await.0);
}

struct PgPool;
struct EmployeeDb;
struct Cache;
struct A;
struct B;

async fn sync_employees(_db: Scoped<EmployeeDb>) -> Result<(), BoxError> {
    Ok(())
}

fn build_with(services: ServiceCollection, spec: ServiceSpec) -> String {
    Host::builder().read_env(false).services(services).add(spec).build().unwrap_err().to_string()
}

fn spec_needing<Args, H: stevedore::Handler<Args>>(name: &str, handler: H) -> ServiceSpec {
    let _ = &handler;
    ServiceSpec::from_fn(name.to_string(), |ctx| async move {
        ctx.cancelled().await;
        Ok::<_, BoxError>(())
    })
    .needs(H::dependencies())
}

#[test]
fn a_missing_registration_names_the_whole_chain() {
    let services = ServiceCollection::new().scoped(|_pool: Singleton<PgPool>| async { Ok::<_, BoxError>(EmployeeDb) });
    let message = build_with(services, spec_needing("sync_employees", sync_employees));
    assert_eq!(message, "`sync_employees` needs `EmployeeDb` (scoped), which needs `PgPool`: not registered");
}

#[test]
fn a_direct_missing_registration_is_named() {
    let message = build_with(ServiceCollection::new(), spec_needing("sync_employees", sync_employees));
    assert_eq!(message, "`sync_employees` needs `EmployeeDb`: not registered");
}

#[test]
fn a_singleton_depending_on_a_scoped_service_is_a_captive_dependency() {
    let services = ServiceCollection::new()
        .singleton_value(PgPool)
        .scoped(|_pool: Singleton<PgPool>| async { Ok::<_, BoxError>(EmployeeDb) })
        .singleton(|_db: Scoped<EmployeeDb>| async { Ok::<_, BoxError>(Cache) });
    let message =
        build_with(services, spec_needing("reporter", |_c: Singleton<Cache>| async { Ok::<_, BoxError>(()) }));
    assert_eq!(
        message,
        "`reporter` needs `Cache` (singleton), which needs `EmployeeDb` (scoped): a singleton cannot depend on a scoped service (captive dependency)"
    );
}

#[test]
fn the_captive_dependency_is_caught_even_when_no_handler_uses_it() {
    let services = ServiceCollection::new()
        .scoped(|| async { Ok::<_, BoxError>(EmployeeDb) })
        .singleton(|_db: Scoped<EmployeeDb>| async { Ok::<_, BoxError>(Cache) });
    let message = Host::builder().read_env(false).services(services).build().unwrap_err().to_string();
    assert_eq!(
        message,
        "`singleton Cache` needs `EmployeeDb` (scoped): a singleton cannot depend on a scoped service (captive dependency)"
    );
}

#[test]
fn a_cycle_is_named() {
    let services = ServiceCollection::new()
        .singleton(|_b: Singleton<B>| async { Ok::<_, BoxError>(A) })
        .singleton(|_a: Singleton<A>| async { Ok::<_, BoxError>(B) });
    let message = build_with(services, spec_needing("job", |_a: Singleton<A>| async { Ok::<_, BoxError>(()) }));
    assert_eq!(message, "`job` needs `A` (singleton), which needs `B` (singleton), which needs `A`: dependency cycle");
}

#[test]
fn asking_for_the_wrong_lifetime_is_named() {
    let services = ServiceCollection::new().singleton_value(PgPool);
    let message = build_with(services, spec_needing("job", |_p: Scoped<PgPool>| async { Ok::<_, BoxError>(()) }));
    assert_eq!(message, "`job` needs `PgPool`: asked for as scoped, but registered as singleton");
}

#[tokio::test]
async fn scoped_values_end_in_reverse_order_and_see_the_outcome() {
    let log: Arc<Mutex<Vec<String>>> = Arc::default();
    let (l1, l2) = (log.clone(), log.clone());
    struct First;
    struct Second;
    let services = ServiceCollection::new()
        .scoped_with_end(
            || async { Ok::<_, BoxError>(First) },
            move |_: First, outcome: RunOutcome| {
                let l = l1.clone();
                async move {
                    l.lock().unwrap().push(format!("end First {}", outcome.as_str()));
                    Ok::<_, BoxError>(())
                }
            },
        )
        .scoped_with_end(
            |_f: Scoped<First>| async { Ok::<_, BoxError>(Second) },
            move |_: Second, outcome: RunOutcome| {
                let l = l2.clone();
                async move {
                    l.lock().unwrap().push(format!("end Second {}", outcome.as_str()));
                    Ok::<_, BoxError>(())
                }
            },
        );
    let ctx = ctx(services);
    // Second is made first (its factory then makes First), so First was created last... check it:
    // creation order is First (inside Second's factory) then Second; ends run in reverse.
    let ok = run_handler(&ctx, &|_s: Scoped<Second>| async { Ok::<_, BoxError>(()) }, None).await;
    assert!(ok.is_success());
    let failed = run_handler(&ctx, &|_s: Scoped<Second>| async { Err::<(), BoxError>("boom".into()) }, None).await;
    assert_eq!(failed.outcome, RunOutcome::Failed);
    assert_eq!(failed.error.as_deref(), Some("boom"));
    assert_eq!(
        *log.lock().unwrap(),
        ["end Second succeeded", "end First succeeded", "end Second failed", "end First failed"]
    );
}

#[tokio::test]
async fn an_end_error_is_reported_and_turns_success_into_failure() {
    struct Tx;
    let services = ServiceCollection::new().scoped_with_end(
        || async { Ok::<_, BoxError>(Tx) },
        |_: Tx, _| async { Err::<(), BoxError>("commit refused: disk full".into()) },
    );
    let r = run_handler(&ctx(services), &|_t: Scoped<Tx>| async { Ok::<_, BoxError>(()) }, None).await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert_eq!(r.error.as_deref(), Some("ending `Tx` failed: commit refused: disk full"));
}

#[tokio::test]
async fn a_failing_factory_names_the_parameter() {
    let services =
        ServiceCollection::new().scoped(|| async { Err::<EmployeeDb, BoxError>("connection refused".into()) });
    let r = run_handler(&ctx(services), &sync_employees, None).await;
    assert_eq!(r.error.as_deref(), Some("cannot provide `Scoped<EmployeeDb>`: connection refused"));
}

#[tokio::test]
async fn payload_handlers_take_the_payload_first() {
    let services = ServiceCollection::new().singleton_value(Counter(AtomicU32::new(40)));
    let handler = |n: u32, c: Singleton<Counter>| async move {
        c.0.fetch_add(n, Ordering::SeqCst);
        Ok::<_, BoxError>(())
    };
    let ctx = ctx(services);
    let r = run_payload_handler(&ctx, &handler, 2, None, |_| {}).await;
    assert!(r.is_success());
    let scope = ctx.create_scope();
    assert_eq!(scope.get::<Singleton<Counter>>().await.unwrap().0.load(Ordering::SeqCst), 42);
}

#[tokio::test]
async fn a_panicking_handler_is_a_failed_run() {
    let r = run_handler(
        &ctx(ServiceCollection::new()),
        &|| async {
            if true {
                panic!("bad row");
            }
            Ok::<_, BoxError>(())
        },
        None,
    )
    .await;
    assert_eq!(r.outcome, RunOutcome::Failed);
    assert_eq!(r.error.as_deref(), Some("panicked: bad row"));
}

#[tokio::test]
async fn singletons_are_made_at_start_and_a_failing_one_fails_the_start() {
    let services = ServiceCollection::new().singleton(|| async { Err::<PgPool, BoxError>("no route to host".into()) });
    let report = Host::builder().read_env(false).handle_signals(false).services(services).build().unwrap().run().await;
    assert_eq!(
        report.start_error.map(|e| e.to_string()).as_deref(),
        Some("service `singleton `PgPool`` failed to start: no route to host")
    );
}

/// The article's case: a scoped transaction, committed when the run succeeds, rolled back otherwise.
mod sqlite_transaction {
    use super::*;
    use sqlx::sqlite::{SqliteConnectOptions, SqlitePoolOptions};
    use sqlx::{Sqlite, SqlitePool, Transaction};

    struct Tx(Transaction<'static, Sqlite>);

    /// A database file in a directory of its own, removed when the test ends.
    struct TempDir(std::path::PathBuf);

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    async fn pool() -> (SqlitePool, TempDir) {
        let dir = TempDir(std::env::temp_dir().join(format!("stevedore-scope-{}", uuid_like())));
        std::fs::create_dir_all(&dir.0).unwrap();
        let options = SqliteConnectOptions::new().filename(dir.0.join("db.sqlite")).create_if_missing(true);
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await.unwrap();
        sqlx::query("CREATE TABLE employees (name TEXT NOT NULL)").execute(&pool).await.unwrap();
        (pool, dir)
    }

    fn uuid_like() -> String {
        format!("{}-{}", std::process::id(), rand::random::<u64>())
    }

    fn services(pool: SqlitePool) -> ServiceCollection {
        ServiceCollection::new().singleton_value(pool).scoped_with_end(
            |pool: Singleton<SqlitePool>| async move { Ok::<_, BoxError>(Tx(pool.begin().await?)) },
            |tx: Tx, outcome: RunOutcome| async move {
                match outcome {
                    RunOutcome::Succeeded => tx.0.commit().await,
                    _ => tx.0.rollback().await,
                }
            },
        )
    }

    async fn insert(name: &'static str, fail: bool, tx: Scoped<Tx>) -> Result<(), BoxError> {
        let mut tx = tx.lock().await;
        sqlx::query("INSERT INTO employees (name) VALUES (?)").bind(name).execute(&mut *tx.0).await?;
        if fail {
            return Err("validation failed after the insert".into());
        }
        Ok(())
    }

    #[tokio::test]
    async fn committed_on_success_rolled_back_on_failure() {
        let (pool, _dir) = pool().await;
        let ctx = ctx(services(pool.clone()));
        let ok = run_handler(&ctx, &|tx: Scoped<Tx>| insert("ada", false, tx), None).await;
        assert!(ok.is_success(), "{ok:?}");
        let failed = run_handler(&ctx, &|tx: Scoped<Tx>| insert("bob", true, tx), None).await;
        assert_eq!(failed.outcome, RunOutcome::Failed);
        let names: Vec<String> =
            sqlx::query_scalar("SELECT name FROM employees ORDER BY name").fetch_all(&pool).await.unwrap();
        assert_eq!(names, ["ada"], "bob's insert was rolled back with its failed run");
        pool.close().await;
    }
}
