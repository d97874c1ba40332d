//! Crash, signal and failover behaviour with real worker processes: the test binary re-runs
//! itself as a child worker (the ignored `child_worker` test), against a real SQLite file or
//! PostgreSQL schema.

mod common;

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Db, Place, TestJob, eventually, recording_worker};
use stevedore_jobs::{JobState, JobStore, ListQuery, NewJob, PeriodicJob, Worker, WorkerConfig};
use tokio_util::sync::CancellationToken;

const ROLE: &str = "STEVEDORE_JOBS_CHILD_ROLE";
const PLACE: &str = "STEVEDORE_JOBS_CHILD_DB";

fn spawn_child(place: &Place, role: &str) -> Child {
    let exe = std::env::current_exe().expect("test binary path");
    Command::new(exe)
        .args(["--exact", "child_worker", "--ignored", "--nocapture", "--test-threads=1"])
        .env(ROLE, role)
        .env(PLACE, place.encode())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn child worker")
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("run kill");
    assert!(status.success());
}

async fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        assert!(tokio::time::Instant::now() < deadline, "child did not exit within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn child_config() -> WorkerConfig {
    WorkerConfig {
        lease_ttl: Duration::from_secs(3),
        rescue_interval: Duration::from_millis(200),
        poll_interval: Some(Duration::from_millis(200)),
        shutdown_timeout: Duration::from_secs(10),
        ..WorkerConfig::default()
    }
}

/// The child process: a worker in the role its parent asked for, stopped by SIGTERM.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "child worker process of the other tests in this file"]
async fn child_worker() {
    let (Ok(role), Ok(place)) = (std::env::var(ROLE), std::env::var(PLACE)) else {
        panic!("run by the process tests only");
    };
    let place = Place::decode(&place);
    if let Some(db) = common::reopen_sqlite(&place).await {
        run_child(db, &role).await;
    } else if let Some(db) = common::reopen_postgres(&place).await {
        run_child(db, &role).await;
    }
}

async fn run_child<S: JobStore>(db: Db<S>, role: &str) {
    let stop = CancellationToken::new();
    let on_term = stop.clone();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::spawn(async move {
        term.recv().await;
        on_term.cancel();
    });
    let worker = match role {
        "work" => recording_worker(&db, 100, true, child_config()),
        "periodic" => {
            let mut w = Worker::new(db.store.clone())
                .config(child_config())
                .queue("unused", 1)
                .periodic(PeriodicJob::every("tick", Duration::from_secs(1), common::Tick));
            w.config_mut().leader_ttl = Duration::from_secs(2);
            w
        }
        other => panic!("unknown child role {other}"),
    };
    worker.run(stop).await.expect("child worker run");
}

fn test_job(n: u64, hang: bool, sleep_ms: u64) -> NewJob {
    NewJob::new(&TestJob { n, hang, fail: false, sleep_ms }).unwrap()
}

async fn counts<S: JobStore>(store: &S) -> (u64, u64, u64) {
    let s = store.stats().await.unwrap();
    let q = s.iter().find(|q| q.queue == "default").cloned().unwrap_or_default();
    (q.available + q.scheduled, q.running, q.completed)
}

fn runs_per_job(runs: &[(i64, String)]) -> HashMap<i64, usize> {
    let mut per = HashMap::new();
    for (id, _) in runs {
        *per.entry(*id).or_insert(0) += 1;
    }
    per
}

/// kill -9 of a worker holding 100 running jobs: after rescue all complete, none is lost,
/// and only the jobs that were running at the kill run twice.
async fn kill_9_with_100_running_jobs<S: JobStore>(db: Db<S>) {
    let quick: Vec<NewJob> = (0..50).map(|n| test_job(n, false, 0)).collect();
    let hanging: Vec<NewJob> = (50..150).map(|n| test_job(n, true, 0)).collect();
    db.store.enqueue_many(&quick).await.unwrap();
    db.store.enqueue_many(&hanging).await.unwrap();

    let mut child = spawn_child(&db.place, "work");
    eventually(Duration::from_secs(60), "child completed 50 and runs 100", || async {
        let (_, running, completed) = counts(&db.store).await;
        running == 100 && completed == 50 && db.runs.all().await.len() == 150
    })
    .await;
    let running_at_kill: HashSet<i64> = db.runs.ids_in("running").await.into_iter().collect();
    child.kill().expect("kill -9");
    child.wait().expect("reap child");
    let killed_at = tokio::time::Instant::now();

    let stop = CancellationToken::new();
    let survivor = recording_worker(&db, 16, false, child_config()).spawn(stop.clone());
    eventually(Duration::from_secs(30), "all 150 completed after rescue", || async {
        counts(&db.store).await.2 == 150
    })
    .await;
    let recovered_in = killed_at.elapsed();
    stop.cancel();
    survivor.await.unwrap().unwrap();

    assert!(recovered_in < Duration::from_secs(15), "recovery took {recovered_in:?}, lease TTL is 3 s");
    let per = runs_per_job(&db.runs.all().await);
    assert_eq!(per.len(), 150, "every job ran");
    let twice: HashSet<i64> = per.iter().filter(|(_, n)| **n > 1).map(|(id, _)| *id).collect();
    assert!(per.values().all(|n| *n <= 2));
    assert_eq!(twice, running_at_kill, "duplicates are exactly the jobs that were mid-run");
    for id in running_at_kill.iter().take(5) {
        let rec = db.store.get(*id).await.unwrap().unwrap();
        assert_eq!((rec.state, rec.attempt), (JobState::Completed, 2));
        assert!(rec.errors[0].error.contains("lease expired"), "{:?}", rec.errors);
    }
}
both_backends!(kill_9_with_100_running_jobs);

/// SIGTERM under load: the worker stops fetching, finishes what it runs, records it, exits
/// cleanly; the rest is done by another worker. None lost, none run twice.
async fn sigterm_under_load<S: JobStore>(db: Db<S>) {
    // 3,000 jobs of 20 ms at concurrency 100: the SIGTERM lands well before the end.
    let jobs: Vec<NewJob> = (0..3000).map(|n| test_job(n, false, 20)).collect();
    db.store.enqueue_many(&jobs).await.unwrap();
    let mut child = spawn_child(&db.place, "work");
    eventually(Duration::from_secs(60), "child has run 300 jobs", || async { db.runs.all().await.len() >= 300 }).await;
    sigterm(&child);
    let status = wait_exit(&mut child, Duration::from_secs(20)).await;
    assert!(status.success(), "child exit: {status:?}");
    let (_, running, completed) = counts(&db.store).await;
    assert_eq!(running, 0, "nothing left running after a graceful stop");
    assert!((300..3000).contains(&completed), "stopped mid-way: {completed}");

    let stop = CancellationToken::new();
    let survivor = recording_worker(&db, 16, false, child_config()).spawn(stop.clone());
    eventually(Duration::from_secs(60), "all 3000 completed", || async { counts(&db.store).await.2 == 3000 }).await;
    stop.cancel();
    survivor.await.unwrap().unwrap();
    let per = runs_per_job(&db.runs.all().await);
    assert_eq!(per.len(), 3000, "none lost");
    assert!(per.values().all(|n| *n == 1), "none run twice");
}
both_backends!(sigterm_under_load);

/// Two worker processes with one periodic job: kill -9 the leader; the survivor takes over
/// within the TTL, and no tick is doubled or missed.
async fn leader_failover<S: JobStore>(db: Db<S>) {
    let mut a = spawn_child(&db.place, "periodic");
    let mut b = spawn_child(&db.place, "periodic");
    let ticks = || async {
        let mut t =
            db.store.list(&ListQuery { queue: Some("ticks".into()), limit: 1000, ..Default::default() }).await.unwrap();
        t.sort_by_key(|r| r.scheduled_at);
        t
    };
    eventually(Duration::from_secs(30), "three ticks", || async { ticks().await.len() >= 3 }).await;
    let owner = current_leader(&db).await.expect("a leader");
    let pid: u32 = owner.split('-').nth(1).and_then(|p| p.parse().ok()).expect("pid in owner name");
    let (leader, other) = if a.id() == pid { (&mut a, &mut b) } else { (&mut b, &mut a) };
    assert_eq!(leader.id(), pid);
    let killed_at = db.store.now().await.unwrap();
    leader.kill().unwrap();
    leader.wait().unwrap();

    eventually(Duration::from_secs(20), "four ticks after the kill", || async {
        ticks().await.iter().filter(|t| t.scheduled_at > killed_at).count() >= 4
    })
    .await;
    let new_owner = current_leader(&db).await.expect("a new leader");
    assert_ne!(new_owner, owner);
    assert!(new_owner.contains(&format!("-{}-", other.id())));
    sigterm(other);
    assert!(wait_exit(other, Duration::from_secs(20)).await.success());

    let all = ticks().await;
    for pair in all.windows(2) {
        assert_eq!(
            pair[1].scheduled_at - pair[0].scheduled_at,
            chrono::TimeDelta::seconds(1),
            "no tick missed or doubled"
        );
    }
    let first_after = all.iter().filter(|t| t.created_at > killed_at).map(|t| t.created_at).min().unwrap();
    let takeover = (first_after - killed_at).to_std().unwrap();
    // The lease must run out (2 s) and the survivor tries every third of it (plus slack for a
    // loaded machine).
    assert!(takeover <= Duration::from_millis(4000), "took over after {takeover:?}");
}
both_backends!(leader_failover);

async fn current_leader<S: JobStore>(db: &Db<S>) -> Option<String> {
    match &db.runs {
        common::Runs::Sqlite(p) => sqlx::query_scalar("SELECT owner FROM stevedore_leaders").fetch_optional(p).await,
        common::Runs::Pg(p) => sqlx::query_scalar("SELECT owner FROM stevedore_leaders").fetch_optional(p).await,
    }
    .unwrap()
}
