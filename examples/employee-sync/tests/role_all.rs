//! `employee-sync` with no settings, from an empty directory: the README's run command. It must
//! serve health and the dashboard, sync within 10 seconds, run jobs and stop cleanly on SIGTERM.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test]
async fn runs_from_an_empty_directory_with_nothing_set_up() {
    let dir = temp_dir("employee-sync-all");
    let started = Instant::now();
    let mut app = start("all", &dir, &[]);
    app.ready(Duration::from_secs(10)).await;

    let (status, _) = app.http("GET", "/health/live", "");
    assert_eq!(status, 200);
    let (status, page) = app.http("GET", "/stevedore", "");
    assert_eq!(status, 200, "the dashboard");
    for service in ["sync-employees", "jobs", "outbox-relay", "directory-consumer", "web"] {
        assert!(page.contains(service), "the dashboard lists {service}");
    }

    // The timed sync runs at start: a completed sync, with its changes, within 10 s.
    let first = eventually(Duration::from_secs(10).saturating_sub(started.elapsed()), "a completed sync", || {
        let (_, v) = app.json("GET", "/api/syncs", "");
        v["syncs"].as_array().and_then(|s| s.last().cloned())
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "synced within 10 s of the start");
    assert_eq!(first["trigger_name"], "timer");
    let hired = first["hired"].as_i64().unwrap();
    assert!(hired >= 8, "the first sync hires everyone listed: {first}");
    let (_, employees) = app.json("GET", "/api/employees", "");
    assert_eq!(employees["count"].as_i64(), Some(hired));

    // Every event of that sync reaches the consumer through the outbox.
    eventually(Duration::from_secs(10), "the consumer to record every event", || {
        let (_, v) = app.json("GET", "/api/changes", "");
        (v["total"].as_i64() == Some(hired)).then_some(())
    })
    .await;

    // A report job runs (on the background runtime) and a manual sync is enqueued and run.
    let (status, answer) = app.json("POST", "/api/reports", r#"{"rounds": 5}"#);
    assert_eq!(status, 202, "{answer}");
    let url = answer["url"].as_str().unwrap().to_string();
    let report = eventually(Duration::from_secs(20), "the report", || {
        let (_, r) = app.json("GET", &url, "");
        (r["state"] == "done").then_some(r)
    })
    .await;
    let result: serde_json::Value = serde_json::from_str(report["result"].as_str().unwrap()).unwrap();
    let counted: u64 = result["headcount"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert_eq!(counted as i64, hired, "the report counts every employee");
    let (status, _) = app.http("POST", "/api/reports", r#"{"rounds": 0}"#);
    assert_eq!(status, 400, "a report of no work is refused");

    let (status, _) = app.http("POST", "/api/employees/sync", "");
    assert_eq!(status, 202);
    eventually(Duration::from_secs(20), "the API-triggered sync", || {
        let (_, v) = app.json("GET", "/api/syncs", "");
        v["syncs"].as_array().unwrap().iter().any(|s| s["trigger_name"] == "api").then_some(())
    })
    .await;

    eventually(Duration::from_secs(5), "the job queues on the dashboard", || {
        let (_, page) = app.http("GET", "/stevedore", "");
        (page.contains(r#"data-job-queue="reports""#) && page.contains(r#"data-job-queue="sync""#)).then_some(())
    })
    .await;

    let (status, metrics) = app.http("GET", "/metrics", "");
    assert_eq!(status, 200);
    assert!(metrics.contains("employee_sync_runs_total"), "application metrics are exported");
    assert!(metrics.contains("stevedore_service_state"), "host metrics are exported");

    app.terminate();
    assert_eq!(app.wait(Duration::from_secs(15)).await, Some(0), "a clean stop\n{}", app.tail());
    assert!(dir.join("employee-sync.db").exists(), "the data lives in one SQLite file in the working directory");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn an_invalid_setting_fails_at_start_naming_it() {
    let dir = temp_dir("employee-sync-bad");
    let mut app = start("bad", &dir, &["--role".into(), "worker".into()]);
    assert_eq!(app.wait(Duration::from_secs(10)).await, Some(2));
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(log.contains("invalid setting `database-url`: --role worker needs --database-url postgres://"), "{log}");

    // A database that cannot be reached fails the start (exit 1), naming what failed.
    let args: Vec<String> = ["--role", "web", "--database-url", "postgres://postgres@127.0.0.1:1/nowhere"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut app = start("no-db", &dir, &args);
    assert_eq!(app.wait(Duration::from_secs(30)).await, Some(1));
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(log.contains("cannot start: cannot connect to the database"), "{log}");

    std::fs::write(dir.join("config.json"), r#"{"role": "all", "sync-interval": "soon"}"#).unwrap();
    let mut app = start("bad-file", &dir, &["--config".into(), "config.json".into()]);
    assert_eq!(app.wait(Duration::from_secs(10)).await, Some(2));
    let log = std::fs::read_to_string(&app.log).unwrap();
    assert!(log.contains("config file config.json") && log.contains("\"soon\""), "{log}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn carries_events_over_nats_jetstream_when_given_a_nats_url() {
    if !stevedore_testkit::require(stevedore_testkit::NATS) {
        return;
    }
    let dir = temp_dir("employee-sync-nats");
    let bus_name = format!("es-nats-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let args: Vec<String> =
        ["--bus-url", &stevedore_testkit::nats_url(), "--bus-name", &bus_name].iter().map(|s| s.to_string()).collect();
    let mut app = start("nats", &dir, &args);
    app.ready(Duration::from_secs(20)).await;
    let first = eventually(Duration::from_secs(10), "a completed sync", || {
        let (_, v) = app.json("GET", "/api/syncs", "");
        v["syncs"].as_array().and_then(|s| s.last().cloned())
    })
    .await;
    let hired = first["hired"].as_i64().unwrap();
    eventually(Duration::from_secs(20), "every event back through JetStream", || {
        let (_, v) = app.json("GET", "/api/changes", "");
        (v["total"].as_i64() == Some(hired)).then_some(())
    })
    .await;
    app.terminate();
    assert_eq!(app.wait(Duration::from_secs(15)).await, Some(0), "{}", app.tail());

    let stream = bus_name.replace('-', "_").to_uppercase();
    let subjects = format!("{bus_name}.employees.>");
    let nats = stevedore_bus::nats::NatsConfig::new(stevedore_testkit::nats_url(), stream, &[subjects.as_str()]);
    stevedore_bus::nats::delete_streams(&nats).await.unwrap();
    std::fs::remove_dir_all(dir).unwrap();
}
