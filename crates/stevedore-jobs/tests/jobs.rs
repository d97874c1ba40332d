//! Store and worker behaviour against real SQLite files and a real PostgreSQL, one fresh
//! database (file or schema) per test.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use common::{Db, TestJob, eventually};
use stevedore_jobs::{
    Backoff, BoxError, JobContext, JobState, JobStore, Lease, ListQuery, NewJob, Outcome, PeriodicJob, Retention,
    Worker, WorkerConfig,
};
use tokio_util::sync::CancellationToken;

fn job(n: u64) -> NewJob {
    NewJob::new(&TestJob { n, hang: false, fail: false, sleep_ms: 0 }).unwrap()
}

fn lease(owner: &str, ttl_ms: u64) -> Lease {
    Lease { owner: owner.to_string(), ttl: Duration::from_millis(ttl_ms) }
}

fn fast_config() -> WorkerConfig {
    WorkerConfig {
        lease_ttl: Duration::from_secs(5),
        rescue_interval: Duration::from_millis(200),
        poll_interval: Some(Duration::from_millis(200)),
        shutdown_timeout: Duration::from_secs(5),
        backoff: Backoff { base: Duration::from_millis(10), max: Duration::from_millis(50), jitter: 0.2 },
        ..WorkerConfig::default()
    }
}

/// A worker whose TestJob handler records each run, then hangs, fails or succeeds.
fn test_worker<S: JobStore>(db: &Db<S>, concurrency: usize) -> Worker<S> {
    let runs = db.runs.clone();
    let worker = Worker::new(db.store.clone()).config(fast_config());
    let owner = worker.id().to_string();
    worker
        .register(move |job: TestJob, ctx: JobContext| {
            let runs = runs.clone();
            let owner = owner.clone();
            async move {
                runs.record(ctx.id(), &owner).await;
                if job.hang {
                    std::future::pending::<()>().await;
                }
                if job.sleep_ms > 0 {
                    tokio::time::sleep(Duration::from_millis(job.sleep_ms)).await;
                }
                if job.fail {
                    return Err(format!("job {} failed on attempt {}", job.n, ctx.attempt()).into());
                }
                Ok::<(), BoxError>(())
            }
        })
        .queue("default", concurrency)
}

async fn count<S: JobStore>(store: &S, state: JobState) -> u64 {
    let stats = store.stats().await.unwrap();
    stats
        .iter()
        .map(|q| match state {
            JobState::Available => q.available + q.scheduled,
            JobState::Running => q.running,
            JobState::Completed => q.completed,
            JobState::Dead => q.dead,
            JobState::Cancelled => q.cancelled,
        })
        .sum()
}

async fn enqueue_fetch_complete<S: JobStore>(db: Db<S>) {
    let store = &db.store;
    let ids = store
        .enqueue_many(&[
            job(1).priority(5),
            job(2),
            job(3).unique_key("k"),
            job(4).unique_key("k"),
            job(5).delay(Duration::from_secs(3600)),
        ])
        .await
        .unwrap();
    assert_eq!(ids.len(), 5);
    assert!(ids[0].is_some() && ids[1].is_some() && ids[2].is_some());
    assert_eq!(ids[3], None, "second job with the same unique key is not inserted");
    assert!(ids[0] < ids[1] && ids[1] < ids[2] && ids[2] < ids[4], "ids follow input order: {ids:?}");
    assert_eq!(store.enqueue(&job(6).unique_key("k")).await.unwrap(), None);

    let l = lease("a", 30_000);
    let fetched = store.fetch("default", 10, &l).await.unwrap();
    let mut got: Vec<_> = fetched.iter().map(|j| j.id).collect();
    got.sort();
    assert_eq!(got, vec![ids[0].unwrap(), ids[1].unwrap(), ids[2].unwrap()], "the delayed job is not due");
    assert!(fetched.iter().all(|j| j.attempt == 1 && j.kind == "test_job"));
    let payload: TestJob = serde_json::from_str(&fetched[0].payload).unwrap();
    assert!(payload.n <= 3);

    let stats = store.stats().await.unwrap();
    assert_eq!(stats.len(), 1);
    assert_eq!((stats[0].running, stats[0].scheduled, stats[0].available), (3, 1, 0));

    let applied = store
        .finish(
            &[
                Outcome::Completed { id: ids[0].unwrap() },
                Outcome::Retry { id: ids[1].unwrap(), delay: Duration::from_secs(600), error: "boom".into() },
                Outcome::Dead { id: ids[2].unwrap(), error: "fatal".into() },
            ],
            "a",
        )
        .await
        .unwrap();
    assert_eq!(applied.len(), 3);
    let retried = store.get(ids[1].unwrap()).await.unwrap().unwrap();
    assert_eq!(retried.state, JobState::Available);
    assert_eq!(retried.errors.len(), 1);
    assert_eq!((retried.errors[0].attempt, retried.errors[0].error.as_str()), (1, "boom"));
    assert!(retried.scheduled_at > retried.created_at + chrono::TimeDelta::seconds(500));
    let dead = store.list(&ListQuery::state(JobState::Dead)).await.unwrap();
    assert_eq!(dead.len(), 1);
    assert_eq!(dead[0].errors[0].error, "fatal");
    assert_eq!(dead[0].unique_key.as_deref(), Some("k"));
    assert!(dead[0].finished_at.is_some());
    assert_eq!(count(store, JobState::Completed).await, 1);
}
both_backends!(enqueue_fetch_complete);

async fn priority_then_time_then_id<S: JobStore>(db: Db<S>) {
    let store = &db.store;
    let ids = store
        .enqueue_many(&[job(1).priority(2), job(2).priority(1), job(3).priority(1), job(4).priority(-1)])
        .await
        .unwrap();
    let mut order = Vec::new();
    for _ in 0..4 {
        let j = store.fetch("default", 1, &lease("a", 30_000)).await.unwrap();
        order.push(j[0].id);
    }
    assert_eq!(order, vec![ids[3].unwrap(), ids[1].unwrap(), ids[2].unwrap(), ids[0].unwrap()]);
}
both_backends!(priority_then_time_then_id);

/// River#1302: a rescued job's late completion by the old worker is refused.
async fn state_guard_race<S: JobStore>(db: Db<S>) {
    let store = &db.store;
    let id = store.enqueue(&job(1)).await.unwrap().unwrap();
    let old = lease("old-worker", 100);
    assert_eq!(store.fetch("default", 1, &old).await.unwrap().len(), 1);
    db.runs.expire_leases().await;
    assert_eq!(store.rescue().await.unwrap(), 1);
    let new = lease("new-worker", 30_000);
    let again = store.fetch("default", 1, &new).await.unwrap();
    assert_eq!(again[0].attempt, 2);

    // The old worker wakes up: every change it tries is refused.
    assert!(store.heartbeat(&[id], &old).await.unwrap().is_empty());
    assert!(store.finish(&[Outcome::Completed { id }], "old-worker").await.unwrap().is_empty());
    assert!(store.finish(&[Outcome::Dead { id, error: "late".into() }], "old-worker").await.unwrap().is_empty());
    assert_eq!(store.release(&[id], "old-worker").await.unwrap(), 0);
    let rec = store.get(id).await.unwrap().unwrap();
    assert_eq!((rec.state, rec.lease_owner.as_deref()), (JobState::Running, Some("new-worker")));
    assert_eq!(rec.errors.len(), 1);
    assert!(rec.errors[0].error.contains("lease expired: worker old-worker"), "{:?}", rec.errors);

    assert_eq!(store.finish(&[Outcome::Completed { id }], "new-worker").await.unwrap(), vec![id]);
    assert_eq!(store.get(id).await.unwrap().unwrap().state, JobState::Completed);
}
both_backends!(state_guard_race);

async fn rescue_of_last_attempt_is_dead<S: JobStore>(db: Db<S>) {
    let store = &db.store;
    let id = store.enqueue(&job(1).max_attempts(1)).await.unwrap().unwrap();
    store.fetch("default", 1, &lease("w", 100)).await.unwrap();
    db.runs.expire_leases().await;
    assert_eq!(store.rescue().await.unwrap(), 1);
    let rec = store.get(id).await.unwrap().unwrap();
    assert_eq!(rec.state, JobState::Dead);
    assert!(rec.errors[0].error.contains("lease expired"));
}
both_backends!(rescue_of_last_attempt_is_dead);

async fn concurrent_unique_enqueue<S: JobStore>(db: Db<S>) {
    let mut tasks = Vec::new();
    for n in 0..32 {
        let store = db.store.clone();
        tasks.push(tokio::spawn(async move { store.enqueue(&job(n).unique_key("only-one")).await.unwrap() }));
    }
    let mut inserted = 0;
    for t in tasks {
        if t.await.unwrap().is_some() {
            inserted += 1;
        }
    }
    assert_eq!(inserted, 1);
    assert_eq!(db.store.list(&ListQuery::default()).await.unwrap().len(), 1);
}
both_backends!(concurrent_unique_enqueue);

async fn cancel_retry_pause_cleanup<S: JobStore>(db: Db<S>) {
    let store = &db.store;
    let ids: Vec<i64> =
        store.enqueue_many(&[job(1), job(2), job(3)]).await.unwrap().into_iter().map(Option::unwrap).collect();
    assert!(store.cancel(ids[0]).await.unwrap());
    assert!(!store.cancel(ids[0]).await.unwrap(), "already cancelled");
    store.pause("default").await.unwrap();
    assert!(store.fetch("default", 10, &lease("a", 30_000)).await.unwrap().is_empty(), "paused");
    assert!(store.stats().await.unwrap()[0].paused);
    store.resume("default").await.unwrap();
    let fetched = store.fetch("default", 10, &lease("a", 30_000)).await.unwrap();
    assert_eq!(fetched.len(), 2);
    store
        .finish(
            &[Outcome::Dead { id: ids[1], error: "x".into() }, Outcome::Dead { id: ids[2], error: "y".into() }],
            "a",
        )
        .await
        .unwrap();
    assert!(store.retry(ids[1]).await.unwrap());
    assert!(!store.retry(ids[1]).await.unwrap(), "available jobs are not retried");
    let again = store.get(ids[1]).await.unwrap().unwrap();
    assert_eq!((again.state, again.attempt, again.errors.len()), (JobState::Available, 0, 1));
    assert_eq!(store.retry_dead(Some("other")).await.unwrap(), 0);
    assert_eq!(store.retry_dead(None).await.unwrap(), 1);
    assert!(store.retry(ids[0]).await.unwrap(), "cancelled jobs can be retried");
    let fetched = store.fetch("default", 10, &lease("b", 30_000)).await.unwrap();
    assert_eq!(fetched.len(), 3);
    let done: Vec<Outcome> = fetched.iter().map(|j| Outcome::Completed { id: j.id }).collect();
    store.finish(&done, "b").await.unwrap();
    let keep = Retention { finished: Duration::from_secs(3600), dead: Duration::from_secs(3600) };
    assert_eq!(store.cleanup(&keep).await.unwrap(), 0);
    let drop_all = Retention { finished: Duration::ZERO, dead: Duration::ZERO };
    // Finish times are in the past by at least a clock tick once we look again.
    eventually(Duration::from_secs(5), "retention deletes finished jobs", || async {
        store.cleanup(&drop_all).await.unwrap() == 3 || store.list(&ListQuery::default()).await.unwrap().is_empty()
    })
    .await;
    assert!(store.list(&ListQuery::default()).await.unwrap().is_empty());
}
both_backends!(cancel_retry_pause_cleanup);

async fn worker_runs_jobs_once<S: JobStore>(db: Db<S>) {
    let jobs: Vec<NewJob> = (0..300).map(job).collect();
    db.store.enqueue_many(&jobs).await.unwrap();
    let stop = CancellationToken::new();
    let worker = test_worker(&db, 8).spawn(stop.clone());
    eventually(Duration::from_secs(30), "300 jobs completed", || async {
        count(&db.store, JobState::Completed).await == 300
    })
    .await;
    stop.cancel();
    worker.await.unwrap().unwrap();
    let runs = db.runs.all().await;
    assert_eq!(runs.len(), 300, "each job ran exactly once");
}
both_backends!(worker_runs_jobs_once);

async fn idle_worker_wakes_on_enqueue<S: JobStore>(db: Db<S>) {
    let stop = CancellationToken::new();
    let mut worker = test_worker(&db, 2);
    // Polling alone would take a minute: only the wake-up can make this pass.
    worker.config_mut().poll_interval = Some(Duration::from_secs(60));
    let handle = worker.spawn(stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await; // let it go idle
    for n in 0..3 {
        db.store.enqueue(&job(n)).await.unwrap();
        eventually(Duration::from_secs(10), "job woken and completed", || async {
            count(&db.store, JobState::Completed).await == n + 1
        })
        .await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}
both_backends!(idle_worker_wakes_on_enqueue);

async fn failing_job_retries_then_dies_with_every_error<S: JobStore>(db: Db<S>) {
    let id = db
        .store
        .enqueue(&NewJob::new(&TestJob { n: 9, hang: false, fail: true, sleep_ms: 0 }).unwrap().max_attempts(3))
        .await
        .unwrap()
        .unwrap();
    let stop = CancellationToken::new();
    let handle = test_worker(&db, 2).spawn(stop.clone());
    eventually(Duration::from_secs(20), "job dead", || async {
        db.store.get(id).await.unwrap().unwrap().state == JobState::Dead
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let rec = db.store.get(id).await.unwrap().unwrap();
    assert_eq!(rec.attempt, 3);
    let errors: Vec<(u32, String)> = rec.errors.into_iter().map(|e| (e.attempt, e.error)).collect();
    assert_eq!(errors, (1..=3).map(|a| (a, format!("job 9 failed on attempt {a}"))).collect::<Vec<_>>());
    assert_eq!(db.runs.all().await.len(), 3);
}
both_backends!(failing_job_retries_then_dies_with_every_error);

async fn poison_payload_and_unknown_kind_are_dead_at_once<S: JobStore>(db: Db<S>) {
    let poison = db.store.enqueue(&NewJob::raw("test_job", r#"{"n": "not a number"}"#)).await.unwrap().unwrap();
    let unknown = db.store.enqueue(&NewJob::raw("no_such_kind", "{}")).await.unwrap().unwrap();
    let good = db.store.enqueue(&job(1)).await.unwrap().unwrap();
    let stop = CancellationToken::new();
    let handle = test_worker(&db, 2).spawn(stop.clone());
    eventually(Duration::from_secs(20), "all three settled", || async {
        count(&db.store, JobState::Dead).await == 2 && count(&db.store, JobState::Completed).await == 1
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let p = db.store.get(poison).await.unwrap().unwrap();
    assert_eq!((p.state, p.attempt, p.errors.len()), (JobState::Dead, 1, 1));
    assert!(p.errors[0].error.contains("does not deserialize"), "{}", p.errors[0].error);
    let u = db.store.get(unknown).await.unwrap().unwrap();
    assert_eq!(u.state, JobState::Dead);
    assert!(u.errors[0].error.contains("unknown job kind \"no_such_kind\""), "{}", u.errors[0].error);
    assert_eq!(db.store.get(good).await.unwrap().unwrap().state, JobState::Completed);
    assert_eq!(db.runs.all().await.len(), 1, "the handler never saw the poison payload");
}
both_backends!(poison_payload_and_unknown_kind_are_dead_at_once);

async fn graceful_stop_releases_jobs_still_running<S: JobStore>(db: Db<S>) {
    let hang = db
        .store
        .enqueue(&NewJob::new(&TestJob { n: 1, hang: true, fail: false, sleep_ms: 0 }).unwrap())
        .await
        .unwrap()
        .unwrap();
    let quick = db
        .store
        .enqueue(&NewJob::new(&TestJob { n: 2, hang: false, fail: false, sleep_ms: 300 }).unwrap())
        .await
        .unwrap()
        .unwrap();
    let stop = CancellationToken::new();
    let mut worker = test_worker(&db, 4);
    worker.config_mut().shutdown_timeout = Duration::from_secs(1);
    let handle = worker.spawn(stop.clone());
    eventually(Duration::from_secs(10), "both running", || async { db.runs.all().await.len() == 2 }).await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let q = db.store.get(quick).await.unwrap().unwrap();
    assert_eq!(q.state, JobState::Completed, "a job finishing within the budget completes");
    let h = db.store.get(hang).await.unwrap().unwrap();
    assert_eq!((h.state, h.attempt, h.lease_owner), (JobState::Available, 0, None), "released, attempt not counted");
    assert!(h.errors.is_empty());
}
both_backends!(graceful_stop_releases_jobs_still_running);

async fn cancelling_a_running_job_cancels_its_context<S: JobStore>(db: Db<S>) {
    let id = db.store.enqueue(&job(1)).await.unwrap().unwrap();
    let seen = Arc::new(AtomicU32::new(0));
    let seen2 = Arc::clone(&seen);
    let mut worker = Worker::new(db.store.clone())
        .config(fast_config())
        .register(move |_job: TestJob, ctx: JobContext| {
            let seen = Arc::clone(&seen2);
            async move {
                seen.fetch_add(1, Ordering::SeqCst);
                ctx.cancelled().await;
                seen.fetch_add(10, Ordering::SeqCst);
                Ok::<(), BoxError>(())
            }
        })
        .queue("default", 1);
    worker.config_mut().heartbeat_interval = Some(Duration::from_millis(50));
    let stop = CancellationToken::new();
    let handle = worker.spawn(stop.clone());
    eventually(Duration::from_secs(10), "job started", || async { seen.load(Ordering::SeqCst) == 1 }).await;
    assert!(db.store.cancel(id).await.unwrap());
    eventually(Duration::from_secs(10), "handler saw cancellation", || async { seen.load(Ordering::SeqCst) == 11 })
        .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    assert_eq!(db.store.get(id).await.unwrap().unwrap().state, JobState::Cancelled, "its completion was refused");
}
both_backends!(cancelling_a_running_job_cancels_its_context);

async fn job_timeout_fails_the_attempt<S: JobStore>(db: Db<S>) {
    let id = db
        .store
        .enqueue(
            &NewJob::new(&TestJob { n: 1, hang: true, fail: false, sleep_ms: 0 })
                .unwrap()
                .timeout(Duration::from_millis(100))
                .max_attempts(2),
        )
        .await
        .unwrap()
        .unwrap();
    let stop = CancellationToken::new();
    let handle = test_worker(&db, 1).spawn(stop.clone());
    eventually(Duration::from_secs(10), "dead after two timeouts", || async {
        db.store.get(id).await.unwrap().unwrap().state == JobState::Dead
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
    let rec = db.store.get(id).await.unwrap().unwrap();
    assert!(rec.errors.iter().all(|e| e.error == "timed out after 100 ms"), "{:?}", rec.errors);
    assert_eq!(rec.errors.len(), 2);
}
both_backends!(job_timeout_fails_the_attempt);

async fn periodic_job_enqueues_each_tick_once<S: JobStore>(db: Db<S>) {
    let mut workers = Vec::new();
    let stop = CancellationToken::new();
    // Two schedulers on one store: only the leader enqueues, and never a tick twice.
    for _ in 0..2 {
        let mut w = Worker::new(db.store.clone())
            .config(fast_config())
            .queue("unused", 1)
            .periodic(PeriodicJob::every("tick", Duration::from_secs(1), common::Tick));
        w.config_mut().leader_ttl = Duration::from_secs(2);
        workers.push(w.spawn(stop.clone()));
    }
    eventually(Duration::from_secs(15), "three ticks", || async {
        db.store.list(&ListQuery { queue: Some("ticks".into()), ..Default::default() }).await.unwrap().len() >= 3
    })
    .await;
    stop.cancel();
    for w in workers {
        w.await.unwrap().unwrap();
    }
    let ticks = db.store.list(&ListQuery { queue: Some("ticks".into()), ..Default::default() }).await.unwrap();
    let mut times: Vec<_> = ticks.iter().map(|t| t.scheduled_at).collect();
    times.sort();
    for pair in times.windows(2) {
        assert_eq!(pair[1] - pair[0], chrono::TimeDelta::seconds(1), "consecutive ticks: {times:?}");
    }
    assert!(ticks.iter().all(|t| t.unique_key.as_deref().is_some_and(|k| k.starts_with("periodic:tick:"))));
}
both_backends!(periodic_job_enqueues_each_tick_once);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_enqueue_in_callers_transaction() {
    let Some(db) = common::postgres().await else { return };
    let common::Runs::Pg(pool) = &db.runs else { unreachable!() };
    let mut tx = pool.begin().await.unwrap();
    let ids = stevedore_jobs::PostgresStore::enqueue_in(&mut tx, &[job(1)]).await.unwrap();
    assert!(ids[0].is_some());
    tx.rollback().await.unwrap();
    assert!(db.store.list(&ListQuery::default()).await.unwrap().is_empty(), "rolled back: no job");

    let mut tx = pool.begin().await.unwrap();
    stevedore_jobs::PostgresStore::enqueue_in(&mut tx, &[job(2), job(3)]).await.unwrap();
    assert!(db.store.list(&ListQuery::default()).await.unwrap().is_empty(), "not visible before commit");
    tx.commit().await.unwrap();
    assert_eq!(db.store.list(&ListQuery::default()).await.unwrap().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_enqueue_in_callers_transaction() {
    let db = common::sqlite().await;
    let common::Runs::Sqlite(pool) = &db.runs else { unreachable!() };
    let mut tx = pool.begin().await.unwrap();
    stevedore_jobs::SqliteStore::enqueue_in(&mut tx, &[job(1)]).await.unwrap();
    tx.rollback().await.unwrap();
    assert!(db.store.list(&ListQuery::default()).await.unwrap().is_empty(), "rolled back: no job");
    let mut tx = pool.begin().await.unwrap();
    stevedore_jobs::SqliteStore::enqueue_in(&mut tx, &[job(2), job(3)]).await.unwrap();
    tx.commit().await.unwrap();
    assert_eq!(db.store.list(&ListQuery::default()).await.unwrap().len(), 2);
}

/// LISTEN/NOTIFY: a job inserted by another process (here: another pool, so no in-process
/// wake-up) starts an idle worker at once, not at its next poll a minute later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_notify_wakes_idle_worker_of_another_process() {
    let Some(db) = common::postgres().await else { return };
    let common::Place::Postgres(schema) = &db.place else { unreachable!() };
    let producer = stevedore_jobs::PostgresStore::from_pool(common::pg_pool(schema, 2).await);
    let stop = CancellationToken::new();
    let mut worker = test_worker(&db, 2);
    worker.config_mut().poll_interval = Some(Duration::from_secs(60));
    let handle = worker.spawn(stop.clone());
    tokio::time::sleep(Duration::from_millis(300)).await; // let it go idle
    for n in 0..3 {
        producer.enqueue(&job(n)).await.unwrap();
        eventually(Duration::from_secs(10), "job woken by NOTIFY and completed", || async {
            count(&db.store, JobState::Completed).await == n + 1
        })
        .await;
    }
    stop.cancel();
    handle.await.unwrap().unwrap();
}

async fn prefetched_jobs_wait_for_a_slot_and_are_released_at_stop<S: JobStore>(db: Db<S>) {
    let stop = CancellationToken::new();
    let mut worker = test_worker(&db, 1);
    worker.config_mut().prefetch = 3;
    worker.config_mut().prefetch_wait = Duration::from_secs(10);
    worker.config_mut().shutdown_timeout = Duration::from_millis(500);
    let handle = worker.spawn(stop.clone());
    // Quick jobs first: prefetching starts once run times are known to be short.
    db.store.enqueue_many(&(0..3).map(job).collect::<Vec<_>>()).await.unwrap();
    eventually(Duration::from_secs(10), "quick jobs done", || async {
        count(&db.store, JobState::Completed).await == 3
    })
    .await;
    let hanging: Vec<NewJob> =
        (10..14).map(|n| NewJob::new(&TestJob { n, hang: true, fail: false, sleep_ms: 0 }).unwrap()).collect();
    db.store.enqueue_many(&hanging).await.unwrap();
    eventually(Duration::from_secs(10), "four leased, one running", || async {
        count(&db.store, JobState::Running).await == 4 && db.runs.all().await.len() == 4
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(db.runs.all().await.len(), 4, "only one handler runs at concurrency 1");
    stop.cancel();
    handle.await.unwrap().unwrap();
    let all = db.store.list(&ListQuery::state(JobState::Available)).await.unwrap();
    assert_eq!(all.len(), 4);
    assert!(
        all.iter().all(|j| j.attempt == 0 && j.lease_owner.is_none()),
        "the running one and the prefetched ones are released: {all:?}"
    );
}
both_backends!(prefetched_jobs_wait_for_a_slot_and_are_released_at_stop);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_store_picks_the_backend_from_the_url() {
    let path = std::env::temp_dir().join(format!("{}.db", common::unique_name()));
    let store = stevedore_jobs::AnyStore::connect(&format!("sqlite://{}?mode=rwc", path.display())).await.unwrap();
    assert_eq!(store.backend(), "sqlite");
    store.enqueue(&job(1)).await.unwrap();
    let again = stevedore_jobs::AnyStore::connect(path.to_str().unwrap()).await.unwrap();
    assert_eq!(again.stats().await.unwrap()[0].available, 1, "a plain path opens the same file");
    drop((store, again));
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
    }
    let Some(db) = common::postgres().await else { return };
    let common::Place::Postgres(schema) = &db.place else { unreachable!() };
    let url = format!("{}?options=-csearch_path%3D{schema}", stevedore_testkit::postgres_url());
    let pg = stevedore_jobs::AnyStore::connect(&url).await.unwrap();
    assert_eq!(pg.backend(), "postgres");
    pg.enqueue(&job(1)).await.unwrap();
    assert_eq!(db.store.stats().await.unwrap()[0].available, 1, "same schema as the fixture");
}

/// Hosted: each job runs in its own scope, whose scoped resources are ended with the run's
/// outcome; the handler takes them as extractors next to the payload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosted_worker_runs_each_job_in_its_own_scope() {
    use stevedore::{Host, RunOutcome, Scoped, ServiceCollection};

    struct PerJob {
        touched: u32,
    }
    let db = common::sqlite().await;
    let ended: Arc<std::sync::Mutex<Vec<(u32, RunOutcome)>>> = Arc::default();
    let sink = Arc::clone(&ended);
    let services = ServiceCollection::new().scoped_with_end(
        || async { Ok::<_, BoxError>(PerJob { touched: 0 }) },
        move |per: PerJob, outcome: RunOutcome| {
            let sink = Arc::clone(&sink);
            async move {
                sink.lock().unwrap().push((per.touched, outcome));
                Ok::<_, BoxError>(())
            }
        },
    );
    let worker = Worker::new(db.store.clone()).config(fast_config()).queue("default", 2).register(
        |job: TestJob, ctx: JobContext, per: Scoped<PerJob>| async move {
            per.lock().await.touched += 1;
            if job.fail {
                return Err(format!("job {} failed", ctx.id()));
            }
            Ok(())
        },
    );
    db.store
        .enqueue_many(&[
            job(1),
            NewJob::new(&TestJob { n: 2, hang: false, fail: true, sleep_ms: 0 }).unwrap().max_attempts(1),
        ])
        .await
        .unwrap();
    let host =
        Host::builder().services(services).add(worker.into_service("jobs")).handle_signals(false).build().unwrap();
    let lifetime = host.lifetime();
    let running = tokio::spawn(host.run());
    eventually(Duration::from_secs(10), "both jobs settled", || async {
        count(&db.store, JobState::Completed).await == 1 && count(&db.store, JobState::Dead).await == 1
    })
    .await;
    lifetime.request_stop();
    running.await.unwrap();
    let mut ended = ended.lock().unwrap().clone();
    ended.sort_by_key(|(_, o)| o.as_str());
    assert_eq!(ended, vec![(1, RunOutcome::Failed), (1, RunOutcome::Succeeded)]);
}

async fn pausing_the_worker_stops_its_fetching<S: JobStore>(db: Db<S>) {
    use stevedore::ServiceControl;
    let worker = test_worker(&db, 2);
    let control = worker.control();
    assert!(control.pause());
    let stop = CancellationToken::new();
    let handle = worker.spawn(stop.clone());
    db.store.enqueue(&job(1)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(count(&db.store, JobState::Available).await, 1, "paused: nothing fetched");
    assert!(control.resume());
    eventually(Duration::from_secs(10), "resumed worker runs the job", || async {
        count(&db.store, JobState::Completed).await == 1
    })
    .await;
    stop.cancel();
    handle.await.unwrap().unwrap();
}
both_backends!(pausing_the_worker_stops_its_fetching);

async fn next_due_time_spans_priorities<S: JobStore>(db: Db<S>) {
    assert_eq!(db.store.time_until_due("default").await.unwrap(), None, "empty queue");
    db.store
        .enqueue_many(&[
            job(1).priority(1).delay(Duration::from_secs(600)),
            job(2).priority(5).delay(Duration::from_secs(60)),
            job(3).queue("other"),
        ])
        .await
        .unwrap();
    let due = db.store.time_until_due("default").await.unwrap().expect("a scheduled job");
    assert!(due > Duration::from_secs(50) && due <= Duration::from_secs(60), "{due:?}");
    assert_eq!(db.store.time_until_due("other").await.unwrap(), Some(Duration::ZERO), "already due");
}
both_backends!(next_due_time_spans_priorities);
