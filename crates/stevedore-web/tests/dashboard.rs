//! The dashboard and its JSON API: what it shows, and that every action needs the admin token.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use axum::Router;
use axum::routing::post;
use common::{eventually, get, post as send_post, queue, send_body, triggered};
use stevedore::{AppLifetime, Host, RunReport, StatusView};
use stevedore_web::{WebHostExt, WebServer};
use tokio::task::JoinHandle;

const TOKEN: &str = "correct horse battery staple";

struct Running {
    addr: SocketAddr,
    status: StatusView,
    lifetime: AppLifetime,
    run: JoinHandle<RunReport>,
}

impl Running {
    async fn stop(self) {
        self.lifetime.request_stop();
        let report = self.run.await.expect("joined");
        assert!(report.start_error.is_none());
    }
}

async fn start(prefix: &str, token: Option<&str>) -> Running {
    let app = Router::new().route("/echo", post(|body: String| async move { body.len().to_string() }));
    let web = WebServer::new(app)
        .bind("127.0.0.1:0")
        .name(format!("{prefix}-web"))
        .admin_token(token)
        .body_limit(1024)
        .metrics(false);
    let mut local = web.local_addr();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(triggered(&format!("{prefix}-timer")))
        .add(queue(&format!("{prefix}-queue")))
        .add(stevedore::ServiceSpec::from_fn(format!("{prefix}-plain"), |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, std::convert::Infallible>(())
        }))
        .build_web(web)
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);
    // The queue's figures appear once its execute has run, on the background runtime (at nice 19).
    let queue = format!("{prefix}-queue");
    eventually(Duration::from_secs(5), "the queue to report its figures", || {
        let found = status.service(&queue).is_some_and(|s| s.queue.is_some());
        async move { found }
    })
    .await;
    Running { addr, status, lifetime, run }
}

fn runs(status: &StatusView, name: &str) -> u64 {
    status.service(name).expect("registered").runs.started
}

fn paused(status: &StatusView, name: &str) -> bool {
    status.service(name).and_then(|s| s.queue).is_some_and(|q| q.paused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_action_requires_the_token() {
    let h = start("tok", Some(TOKEN)).await;
    let actions = [
        "/stevedore/api/services/tok-timer/trigger",
        "/stevedore/api/services/tok-queue/pause",
        "/stevedore/api/services/tok-queue/resume",
        "/stevedore/api/services/tok-plain/trigger",
        "/stevedore/api/services/nobody/trigger",
        "/stevedore/api/services/tok-timer/explode",
    ];
    let wrong =
        ["", "correct horse battery stapl", "correct horse battery staple!", "x", "Correct horse battery staple"];
    for path in actions {
        let r = send_post(h.addr, path, None).await;
        assert_eq!(r.status, 401, "{path} without a token: {}", r.body);
        for token in wrong {
            let r = send_post(h.addr, path, Some(token)).await;
            assert_eq!(r.status, 401, "{path} with a wrong token: {}", r.body);
        }
    }
    assert_eq!(runs(&h.status, "tok-timer"), 0, "a refused trigger ran the service");
    assert!(!paused(&h.status, "tok-queue"), "a refused pause paused the queue");

    // With the token: the effects happen, and errors are told apart.
    let r = send_post(h.addr, "/stevedore/api/services/tok-timer/trigger", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(5), "the triggered run", || async { runs(&h.status, "tok-timer") == 1 }).await;
    let r = send_post(h.addr, "/stevedore/api/services/tok-queue/pause", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(5), "the queue pauses", || async { paused(&h.status, "tok-queue") }).await;
    let r = send_post(h.addr, "/stevedore/api/services/tok-queue/resume", Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(5), "the queue resumes", || async { !paused(&h.status, "tok-queue") }).await;
    assert_eq!(send_post(h.addr, "/stevedore/api/services/tok-plain/trigger", Some(TOKEN)).await.status, 409);
    assert_eq!(send_post(h.addr, "/stevedore/api/services/tok-timer/pause", Some(TOKEN)).await.status, 409);
    assert_eq!(send_post(h.addr, "/stevedore/api/services/nobody/trigger", Some(TOKEN)).await.status, 404);
    assert_eq!(send_post(h.addr, "/stevedore/api/services/tok-timer/explode", Some(TOKEN)).await.status, 404);
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_the_dashboard_is_read_only() {
    let h = start("ro", None).await;
    for token in [None, Some(""), Some(TOKEN)] {
        let r = send_post(h.addr, "/stevedore/api/services/ro-timer/trigger", token).await;
        assert_eq!(r.status, 403, "{}", r.body);
        assert!(r.body.contains("STEVEDORE_ADMIN_TOKEN"), "{}", r.body);
    }
    assert_eq!(runs(&h.status, "ro-timer"), 0);
    let page = get(h.addr, "/stevedore").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("Read-only"));
    assert!(!page.body.contains("<button"), "read-only pages offer no buttons");
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_and_the_api_show_every_service() {
    let h = start("show", Some(TOKEN)).await;
    let page = get(h.addr, "/stevedore").await;
    assert_eq!(page.status, 200);
    for name in ["show-timer", "show-queue", "show-plain", "show-web"] {
        assert!(page.body.contains(&format!(r#"data-service="{name}""#)), "{name} missing from the page");
    }
    assert!(page.body.contains(r#"data-action="trigger" data-name="show-timer""#));
    assert!(page.body.contains(r#"data-action="pause" data-name="show-queue""#));
    assert!(page.body.contains(r#"<tr data-queue="show-queue"><td>show-queue</td><td>3</td><td>1</td>"#));

    let api = get(h.addr, "/stevedore/api/services").await;
    assert_eq!(api.status, 200);
    let list = api.json();
    let names: Vec<&str> = list.as_array().expect("a list").iter().filter_map(|s| s["name"].as_str()).collect();
    assert_eq!(names, ["show-timer", "show-queue", "show-plain", "show-web"]);
    assert_eq!(list[0]["can_trigger"], true);
    assert_eq!(list[0]["kind"], "interval");
    assert_eq!(list[1]["queue"]["depth"], 3);
    assert_eq!(list[3]["state"], "running");
    let one = get(h.addr, "/stevedore/api/services/show-queue").await.json();
    assert_eq!(one["can_pause"], true);
    assert_eq!(get(h.addr, "/stevedore/api/services/nobody").await.status, 404);
    let ready = get(h.addr, "/stevedore/api/readiness").await;
    assert_eq!((ready.status, ready.json()["ready"].as_bool()), (200, Some(true)));
    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_bodies_are_limited() {
    let h = start("limit", Some(TOKEN)).await;
    let small = send_body("POST", h.addr, "/echo", None, vec![b'a'; 1000]).await.expect("a reply");
    assert_eq!((small.status, small.body.as_str()), (200, "1000"));
    let big = send_body("POST", h.addr, "/echo", None, vec![b'a'; 1025]).await.expect("a reply");
    assert_eq!(big.status, 413, "{}", big.body);
    h.stop().await;
}
