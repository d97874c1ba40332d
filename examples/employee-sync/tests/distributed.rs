//! The real binaries, split as in production: one web and two worker processes on a fresh
//! PostgreSQL database and RabbitMQ. The test drives the API, SIGKILLs one worker and SIGTERMs the
//! other mid-run, starts replacements, and checks with the `stevedore` CLI that every job
//! completed, and in the database that every event was consumed exactly once.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use sqlx::{Connection, PgConnection};

struct Db {
    admin: PgConnection,
    name: String,
    url: String,
}

async fn fresh_database() -> Db {
    let admin_url = stevedore_testkit::postgres_url();
    let name = format!("employee_sync_e2e_{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let mut admin = PgConnection::connect(&admin_url).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&mut admin).await.unwrap();
    let base = &admin_url[..admin_url.rfind('/').expect("a database in the test URL")];
    Db { admin, url: format!("{base}/{name}"), name }
}

fn job_stats(url: &str) -> serde_json::Value {
    let out = stevedore(url, &["jobs", "stats", "--json"]);
    serde_json::from_str::<serde_json::Value>(&out).expect("stats JSON")["total"].clone()
}

fn n(v: &serde_json::Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or_else(|| panic!("no {key} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn web_and_workers_survive_kill_and_terminate_without_losing_or_doubling_anything() {
    if !stevedore_testkit::require(stevedore_testkit::POSTGRES)
        || !stevedore_testkit::require(stevedore_testkit::RABBITMQ)
    {
        return;
    }
    let mut db = fresh_database().await;
    let dir = temp_dir("employee-sync-e2e");
    let bus_name = format!("es-e2e-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    assert!(stevedore(&db.url, &["migrate"]).contains("migrated"));

    let common = |role: &str| -> Vec<String> {
        vec![
            "--role".into(),
            role.into(),
            "--database-url".into(),
            db.url.clone(),
            "--shutdown-timeout".into(),
            "8s".into(),
        ]
    };
    let web = start("web", &dir, &common("web"));
    web.ready(Duration::from_secs(30)).await;
    let upstream = format!("http://{}/upstream/employees", web.addr);
    let worker_args = |extra: &[&str]| -> Vec<String> {
        let mut args = common("worker");
        for a in [
            "--bus-url",
            &stevedore_testkit::amqp_url(),
            "--bus-name",
            &bus_name,
            "--upstream-url",
            &upstream,
            "--job-lease-ttl",
            "3s",
            "--sync-interval",
            "2s",
            "--simulated-change-every",
            "1s",
        ] {
            args.push(a.to_string());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    };
    let mut a = start("worker-a", &dir, &worker_args(&[]));
    let mut b = start("worker-b", &dir, &worker_args(&[]));
    a.ready(Duration::from_secs(30)).await;
    b.ready(Duration::from_secs(30)).await;

    // Drive the API: syncs and CPU-heavy reports, so both workers are busy.
    let mut enqueued = 0u64;
    let mut reports = Vec::new();
    for _ in 0..10 {
        let (status, _) = web.http("POST", "/api/employees/sync", "");
        assert_eq!(status, 202);
        let (status, answer) = web.json("POST", "/api/reports", r#"{"rounds": 400}"#);
        assert_eq!(status, 202, "{answer}");
        reports.push(answer["report_id"].as_str().unwrap().to_string());
        enqueued += 2;
    }

    // Mid-run, while each worker holds a running report: one dies without warning, the other is
    // asked to stop. The CLI shows which worker leases which job (`worker-<pid>-...`).
    let (pid_a, pid_b) = (a.child.id().unwrap(), b.child.id().unwrap());
    let url = db.url.clone();
    let killed_jobs = eventually(Duration::from_secs(30), "both workers running a job", || {
        let running: serde_json::Value =
            serde_json::from_str(&stevedore(&url, &["jobs", "list", "--state", "running", "--json"])).unwrap();
        let held_by = |pid: u32| -> Vec<i64> {
            let prefix = format!("worker-{pid}-");
            running
                .as_array()
                .unwrap()
                .iter()
                .filter(|j| j["lease_owner"].as_str().is_some_and(|o| o.starts_with(&prefix)))
                // Reports only: a sync takes a tenth of a second and may finish between this
                // look and the kill; a 400-round report runs for seconds.
                .filter(|j| j["kind"] == "employee_report")
                .map(|j| j["id"].as_i64().unwrap())
                .collect()
        };
        let (on_a, on_b) = (held_by(pid_a), held_by(pid_b));
        (!on_a.is_empty() && !on_b.is_empty()).then_some(on_a)
    })
    .await;
    a.kill();
    b.terminate();
    assert_eq!(a.wait(Duration::from_secs(10)).await, None, "SIGKILL ends the process by signal");
    assert_eq!(b.wait(Duration::from_secs(20)).await, Some(0), "SIGTERM: a clean stop\n{}", b.tail());
    let b_log = std::fs::read_to_string(&b.log).unwrap();
    assert!(b_log.contains("host stopped cleanly"), "{}", b.tail());

    // Replacements, as a Deployment would start them.
    let c = start("worker-c", &dir, &worker_args(&[]));
    let d = start("worker-d", &dir, &worker_args(&[]));
    c.ready(Duration::from_secs(30)).await;
    d.ready(Duration::from_secs(30)).await;
    for _ in 0..3 {
        assert_eq!(web.http("POST", "/api/employees/sync", "").0, 202);
        let (_, answer) = web.json("POST", "/api/reports", r#"{"rounds": 50}"#);
        reports.push(answer["report_id"].as_str().unwrap().to_string());
        enqueued += 2;
    }

    // Every job completed (the killed worker's after its lease ran out), none dead, checked with
    // the operator CLI. The cluster timer keeps adding sync jobs, so wait for a quiet moment.
    let stats = eventually(Duration::from_secs(90), "every job to complete", || {
        let t = job_stats(&url);
        assert_eq!(n(&t, "dead"), 0, "no job is dead: {t}\n{}\n{}", c.tail(), d.tail());
        // Also wait for the cluster timer's first sync to complete: it ticks on its own clock, so
        // the API's jobs can all finish before it has.
        let done = n(&t, "available") + n(&t, "scheduled") + n(&t, "running") == 0 && n(&t, "completed") > enqueued;
        done.then_some(t)
    })
    .await;
    assert_eq!(n(&stats, "cancelled"), 0);
    let timer_syncs = n(&stats, "completed") - enqueued;
    assert!(timer_syncs >= 1, "the cluster-wide timer enqueued syncs too: {stats}");

    // The jobs the killed worker held ran again elsewhere once their lease ran out.
    for id in &killed_jobs {
        let job: serde_json::Value = serde_json::from_str::<serde_json::Value>(&stevedore(
            &url,
            &["jobs", "list", "--after", &(id - 1).to_string(), "--limit", "1", "--json"],
        ))
        .unwrap()[0]
            .clone();
        assert_eq!(job["id"].as_i64(), Some(*id));
        assert_eq!(job["state"], "completed", "{job}");
        assert!(job["attempt"].as_u64().unwrap() >= 2, "run again after the kill: {job}");
        let error = job["errors"][0]["error"].as_str().unwrap();
        assert!(error.contains(&format!("lease expired: worker worker-{pid_a}-")), "{job}");
    }

    let mut conn = PgConnection::connect(&db.url).await.unwrap();
    for id in &reports {
        let state: String =
            sqlx::query_scalar("SELECT state FROM reports WHERE id = $1").bind(id).fetch_one(&mut conn).await.unwrap();
        assert_eq!(state, "done", "report {id}");
    }

    // Every event consumed exactly once: the relay delivered every outbox row, and the change log
    // holds one row per event, never two, whatever the redeliveries.
    let published = eventually(Duration::from_secs(60), "every event to be relayed and consumed", || {
        let (pending, total, logged): (i64, i64, i64) = futures_block(async {
            let mut conn = PgConnection::connect(&url).await.unwrap();
            let pending = sqlx::query_scalar("SELECT COUNT(*) FROM stevedore_outbox WHERE delivered_at IS NULL")
                .fetch_one(&mut conn)
                .await
                .unwrap();
            let total = sqlx::query_scalar("SELECT COUNT(*) FROM stevedore_outbox").fetch_one(&mut conn).await.unwrap();
            let logged =
                sqlx::query_scalar("SELECT COUNT(*) FROM employee_change_log").fetch_one(&mut conn).await.unwrap();
            (pending, total, logged)
        });
        assert!(logged <= total, "more change-log rows ({logged}) than events ({total}): a duplicate was applied");
        (pending == 0 && logged == total).then_some(total)
    })
    .await;
    // The first sync hires the whole roster, which always holds at least 8 people (upstream::roster);
    // how many changes follow depends on how many 1 s epochs the run spans.
    assert!(published >= 8, "the syncs produced events: {published}");
    let outbox_ids: Vec<String> =
        sqlx::query_scalar("SELECT id::text FROM stevedore_outbox").fetch_all(&mut conn).await.unwrap();
    let logged_ids: Vec<String> =
        sqlx::query_scalar("SELECT message_id FROM employee_change_log").fetch_all(&mut conn).await.unwrap();
    let unique: HashSet<&String> = logged_ids.iter().collect();
    assert_eq!(unique.len(), logged_ids.len(), "no event was applied twice");
    assert_eq!(unique, outbox_ids.iter().collect::<HashSet<_>>(), "every event was applied");
    let claimed: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stevedore_processed WHERE consumer = 'directory'")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(claimed, published, "one claim per event");
    let undeliverable: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM stevedore_outbox WHERE dead_at IS NOT NULL")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(undeliverable, 0);
    drop(conn);

    let mut rest = [web, c, d];
    for app in &rest {
        app.terminate();
    }
    for app in &mut rest {
        let code = app.wait(Duration::from_secs(20)).await;
        assert_eq!(code, Some(0), "{} stops cleanly\n{}", app.name, app.tail());
    }

    let amqp = stevedore_bus::amqp::AmqpConfig::new(stevedore_testkit::amqp_url(), bus_name.clone());
    let queue = format!("{bus_name}.directory");
    stevedore_bus::amqp::delete_topology(&amqp, &[&queue]).await.unwrap();
    sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE {} WITH (FORCE)", db.name)))
        .execute(&mut db.admin)
        .await
        .unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}

/// Runs a future to completion from synchronous polling code (on this multi-threaded runtime).
fn futures_block<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(f))
}
