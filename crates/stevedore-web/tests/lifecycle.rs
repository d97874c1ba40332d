//! The web server inside the host's lifecycle: readiness from start to stop, the in-flight request
//! that finishes during the stop, the stop order, and a bind failure.

mod common;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing;
use common::{eventually, get, send, triggered};
use stevedore::{BoxError, Host, HostState, HostedService, ServiceContext, ServiceState};
use stevedore_web::{WebHostExt, WebServer};
use tokio::sync::Notify;

/// Holds the host in `starting` (its `started` hook) and in `stopping` (its `stopping` hook) until
/// the test lets it go, so each phase can be observed from outside.
#[derive(Clone, Default)]
struct Gate {
    let_start: Arc<Notify>,
    in_stopping: Arc<Notify>,
    let_stop: Arc<Notify>,
}

impl HostedService for Gate {
    async fn start(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        Ok(())
    }
    async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        Ok(())
    }
    async fn started(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.let_start.notified().await;
        Ok(())
    }
    async fn stopping(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.in_stopping.notify_one();
        self.let_stop.notified().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_lifecycle_and_in_flight_requests_finish() {
    common::init_tracing();
    let gate = Gate::default();
    let entered = Arc::new(Notify::new());
    let release = Arc::new(Notify::new());
    let (e, r) = (entered.clone(), release.clone());
    let app = Router::new().route(
        "/slow",
        routing::get(move || {
            let (e, r) = (e.clone(), r.clone());
            async move {
                e.notify_one();
                r.notified().await;
                "done"
            }
        }),
    );
    let web = WebServer::new(app).bind("127.0.0.1:0").name("web-lifecycle").admin_token(None);
    let mut local = web.local_addr();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(stevedore::ServiceSpec::hosted("gate", gate.clone()))
        .add(triggered("lifecycle-worker"))
        .build_web(web)
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());

    // Starting: the server is up (it starts after the other services) but the host is not ready.
    let addr = local.wait().await.expect("the server binds");
    assert_eq!(status.service("lifecycle-worker").expect("registered").state, ServiceState::Running);
    assert_eq!(get(addr, "/health/live").await.status, 200);
    let ready = get(addr, "/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    let body = ready.json();
    assert_eq!(body["ready"], false);
    assert_eq!(body["host"], "starting");
    assert_eq!(body["not_ready"][0]["name"], "host");

    // Started: ready.
    gate.let_start.notify_one();
    lifetime.started().await;
    let ready = get(addr, "/health/ready").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    assert_eq!(ready.json()["not_ready"].as_array().map(Vec::len), Some(0));

    // A request in flight when the stop begins.
    let slow = tokio::spawn(send("GET", addr, "/slow", None));
    entered.notified().await;
    lifetime.request_stop();
    gate.in_stopping.notified().await;
    assert_eq!(lifetime.state(), HostState::Stopping);
    let ready = get(addr, "/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.json()["host"], "stopping");

    // The web server stops first and no longer accepts, while the request still runs and the
    // background service, registered before it, has not been asked to stop yet.
    gate.let_stop.notify_one();
    eventually(Duration::from_secs(5), "the web server stops accepting", || async {
        send("GET", addr, "/health/live", None).await.is_err()
    })
    .await;
    assert_eq!(status.service("web-lifecycle").expect("registered").state, ServiceState::Stopping);
    assert_eq!(status.service("lifecycle-worker").expect("registered").state, ServiceState::Running);
    assert!(!slow.is_finished());

    release.notify_one();
    let reply = slow.await.expect("joined").expect("the in-flight request completes");
    assert_eq!((reply.status, reply.body.as_str()), (200, "done"));
    let report = run.await.expect("joined");
    assert!(report.start_error.is_none());
    assert!(!report.forced);
    for s in status.services() {
        assert_eq!(s.state, ServiceState::Stopped, "{} ended {:?}", s.name, s.last_error);
    }
}

#[tokio::test]
async fn a_bind_failure_fails_the_start_and_names_the_address() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = taken.local_addr().expect("bound").to_string();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(triggered("bind-worker"))
        .build_web(WebServer::new(Router::new()).bind(addr.clone()).name("web-bind").metrics(false))
        .expect("valid host");
    let status = host.status();
    let report = host.run().await;
    let error = report.start_error.expect("the start fails").to_string();
    assert!(error.contains("web-bind") && error.contains(&addr), "{error}");
    assert_eq!(status.service("bind-worker").expect("registered").state, ServiceState::Stopped);
}

#[tokio::test]
async fn handlers_reach_the_host() {
    let app = Router::new().route(
        "/phase",
        routing::get(|host: stevedore_web::HostHandle| async move {
            format!("{} {}", host.lifetime().state().as_str(), host.status().services().len())
        }),
    );
    let web = WebServer::new(app).bind("127.0.0.1:0").name("web-handle").metrics(false);
    let mut local = web.local_addr();
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(triggered("handle-worker"))
        .build_web(web)
        .expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    lifetime.started().await;
    assert_eq!(get(addr, "/phase").await.body, "started 2");
    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_heartbeat_makes_the_host_not_ready() {
    let beat = Arc::new(Notify::new());
    let b = beat.clone();
    let silent = stevedore::ServiceSpec::from_fn("hb-worker", move |ctx| {
        let b = b.clone();
        async move {
            loop {
                tokio::select! {
                    _ = ctx.cancelled() => return Ok::<_, std::convert::Infallible>(()),
                    _ = b.notified() => ctx.heartbeat(),
                }
            }
        }
    })
    .heartbeat(Duration::from_millis(200));
    let web = WebServer::new(Router::new()).bind("127.0.0.1:0").name("web-hb").metrics(false);
    let mut local = web.local_addr();
    let host = Host::builder().handle_signals(false).read_env(false).add(silent).build_web(web).expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);

    // Silent past its interval: not ready, and the body names it.
    eventually(Duration::from_secs(5), "readiness drops", || async { get(addr, "/health/ready").await.status == 503 })
        .await;
    let body = get(addr, "/health/ready").await.json();
    assert_eq!(body["not_ready"][0]["name"], "hb-worker", "{body}");
    assert!(body["not_ready"][0]["reason"].as_str().is_some_and(|r| r.contains("no heartbeat")), "{body}");
    let api = get(addr, "/stevedore/api/services/hb-worker").await.json();
    assert_eq!(api["healthy"], false);
    assert_eq!(get(addr, "/health/live").await.status, 200, "liveness does not depend on services");

    // Beating again brings it back.
    eventually(Duration::from_secs(5), "readiness returns", || async {
        beat.notify_one();
        get(addr, "/health/ready").await.status == 200
    })
    .await;
    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
}
