//! A job store that stops answering: the API says so with a 503 naming the store, the rest of the
//! dashboard keeps working, and `/metrics` reports `stevedore_jobs_store_up 0`. In its own test
//! binary because the metrics recorder is process-wide.

mod common;

use std::time::Duration;

use axum::Router;
use common::jobs::postgres;
use common::{eventually, get, post};
use stevedore::Host;
use stevedore_web::{WebHostExt, WebServer};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_store_is_reported_not_fatal() {
    let Some((store, place)) = postgres().await else { return };
    let web = WebServer::new(Router::new())
        .bind("127.0.0.1:0")
        .name("down-web")
        .admin_token(Some("t"))
        .jobs(store.clone())
        .jobs_metrics_cache(Duration::ZERO);
    let mut local = web.local_addr();
    let host = Host::builder().handle_signals(false).read_env(false).build_web(web).expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);

    assert!(get(addr, "/metrics").await.body.contains("stevedore_jobs_store_up 1"));
    store.pool().close().await; // every later query fails at once
    let metrics = get(addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(metrics.body.contains("stevedore_jobs_store_up 0"), "{}", metrics.body);
    // The dashboard's figures may be up to a second old.
    eventually(Duration::from_secs(5), "the API reports the store down", || async {
        get(addr, "/stevedore/api/jobs").await.status == 503
    })
    .await;
    let api = get(addr, "/stevedore/api/jobs").await;
    assert!(api.body.contains("job store"), "the error names the store: {}", api.body);
    let page = get(addr, "/stevedore").await;
    assert_eq!(page.status, 200, "the rest of the dashboard still works");
    assert!(page.body.contains(r#"id="jobs-error""#), "{}", page.body);
    assert!(page.body.contains(r#"data-service="down-web""#), "{}", page.body);
    assert_eq!(post(addr, "/stevedore/api/jobs/1/retry", Some("t")).await.status, 503);

    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
    place.remove().await;
}
