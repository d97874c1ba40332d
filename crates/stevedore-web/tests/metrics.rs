//! `/metrics`: the Prometheus text output carries the host's figures and HTTP durations, and the
//! real `promtool check metrics` accepts it.

mod common;

use std::time::Duration;

use axum::Router;
use axum::routing::get as route_get;
use common::{eventually, get, post, queue, triggered};
use stevedore::Host;
use stevedore_web::{WebHostExt, WebServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_carry_the_host_figures_and_pass_promtool() {
    let app = Router::new().route("/users/{id}", route_get(|| async { "user" }));
    let web = WebServer::new(app).bind("127.0.0.1:0").name("m-web").admin_token(Some("t0ken"));
    let mut local = web.local_addr();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(triggered("m-timer"))
        .add(queue("m-queue"))
        .build_web(web)
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);

    for _ in 0..2 {
        let before = status.service("m-timer").expect("registered").runs.succeeded;
        assert_eq!(post(addr, "/stevedore/api/services/m-timer/trigger", Some("t0ken")).await.status, 200);
        eventually(Duration::from_secs(5), "the run finishes", || async {
            status.service("m-timer").expect("registered").runs.succeeded == before + 1
        })
        .await;
    }
    for id in 0..3 {
        assert_eq!(get(addr, &format!("/users/{id}")).await.status, 200);
    }
    assert_eq!(get(addr, "/nowhere").await.status, 404);

    let reply = get(addr, "/metrics").await;
    assert_eq!(reply.status, 200);
    let text = reply.body;
    for expected in [
        r#"stevedore_runs_total{service="m-timer",outcome="succeeded"} 2"#,
        r#"stevedore_runs_started_total{service="m-timer"} 2"#,
        r#"stevedore_service_restarts_total{service="m-timer"} 0"#,
        r#"stevedore_queue_depth{service="m-queue"} 3"#,
        r#"stevedore_queue_paused{service="m-queue"} 0"#,
        r#"stevedore_service_state{service="m-web",state="running"} 1"#,
        r#"stevedore_host_state{state="started"} 1"#,
        "stevedore_ready 1",
        // One observation per run, recorded as the run ended.
        r#"stevedore_run_duration_seconds_count{service="m-timer"} 2"#,
        r#"stevedore_run_duration_seconds_bucket{service="m-timer",le="+Inf"} 2"#,
        r#"http_server_request_duration_seconds_count{method="GET",route="/users/{id}",status="200"} 3"#,
        r#"http_server_request_duration_seconds_count{method="GET",route="unmatched",status="404"} 1"#,
        r#"http_server_request_duration_seconds_bucket{method="GET",route="/users/{id}",status="200",le="+Inf"} 3"#,
        "# TYPE stevedore_runs_total counter",
        "# TYPE http_server_request_duration_seconds histogram",
    ] {
        assert!(text.contains(expected), "missing `{expected}` in:\n{text}");
    }
    assert!(!text.contains("t0ken"), "the admin token leaked into the metrics");

    common::promtool(&text).await;

    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
}
