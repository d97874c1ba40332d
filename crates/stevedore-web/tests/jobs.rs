//! Durable jobs on the dashboard, its API and /metrics, against real SQLite and PostgreSQL stores:
//! a dead job shows in the API and the page, every action needs the admin token, a retry puts the
//! job back to available and the counts follow, and the job gauges pass `promtool check metrics`.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use common::jobs::{make_dead, postgres, sqlite, unique};
use common::{eventually, get, post, send};
use serde::{Deserialize, Serialize};
use stevedore::{AppLifetime, Host, RunReport};
use stevedore_jobs::{Job, JobId, JobState, JobStore, NewJob, Worker, WorkerConfig};
use stevedore_web::{WebHostExt, WebServer};
use tokio::task::JoinHandle;

const TOKEN: &str = "jobs-admin-token";

#[derive(Debug, Serialize, Deserialize)]
struct Mail {
    to: String,
}

impl Job for Mail {
    const KIND: &'static str = "send_mail";
    const MAX_ATTEMPTS: u32 = 1;
}

struct Running {
    addr: SocketAddr,
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

async fn start(host: stevedore::HostBuilder, web: WebServer) -> Running {
    let mut local = web.local_addr();
    let host = host.handle_signals(false).read_env(false).build_web(web).expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let addr = local.wait().await.expect("bound");
    assert!(lifetime.started().await);
    Running { addr, lifetime, run }
}

/// One queue's counts from `GET /stevedore/api/jobs`.
async fn queue_stats(addr: SocketAddr, queue: &str) -> Option<serde_json::Value> {
    let reply = get(addr, "/stevedore/api/jobs").await;
    assert_eq!(reply.status, 200, "{}", reply.body);
    let json = reply.json();
    json["queues"].as_array().expect("queues").iter().find(|q| q["queue"] == queue).cloned()
}

async fn state_of<S: JobStore>(store: &S, id: JobId) -> JobState {
    store.get(id).await.expect("read the job").expect("the job exists").state
}

/// The whole round trip on one store: a worker in the host makes two jobs dead (a failing
/// handler, an unknown kind); the API and the page show them; every action is refused without the
/// right token; with it, the durable queue is paused, a dead job retried (back to available, the
/// counts follow), another cancelled, all dead retried, the queue resumed, and the worker then
/// completes the healed job. /metrics follows and passes promtool.
async fn round_trip<S: JobStore>(store: S, prefix: &str) {
    common::init_tracing();
    let queue = unique(prefix);
    let healed = Arc::new(AtomicBool::new(false));
    let handler_healed = healed.clone();
    let config = WorkerConfig { poll_interval: Some(Duration::from_millis(200)), ..WorkerConfig::default() };
    let worker =
        Worker::new(store.clone())
            .register(move |mail: Mail| {
                let healed = handler_healed.clone();
                async move {
                    if healed.load(Ordering::SeqCst) { Ok(()) } else { Err(format!("SMTP refused <{}>", mail.to)) }
                }
            })
            .queue(queue.clone(), 1)
            .config(config);
    let web = WebServer::new(Router::new())
        .bind("127.0.0.1:0")
        .name(format!("{prefix}-web"))
        .admin_token(Some(TOKEN))
        .jobs(store.clone());
    let h = start(Host::builder().add(worker.into_service(format!("{prefix}-jobs"))), web).await;

    let mail = store
        .enqueue(&NewJob::new(&Mail { to: "ada@example.com".into() }).expect("a job").queue(&queue))
        .await
        .expect("enqueued")
        .expect("an id");
    let ghost = store.enqueue(&NewJob::raw("ghost", "{}").queue(&queue)).await.expect("enqueued").expect("an id");
    eventually(Duration::from_secs(20), "both jobs are dead", || async {
        queue_stats(h.addr, &queue).await.is_some_and(|q| q["dead"] == 2)
    })
    .await;

    // The API lists them with kind, attempts and errors; the payload only to the token holder.
    let dead = get(h.addr, &format!("/stevedore/api/jobs/list?state=dead&queue={queue}")).await.json();
    let dead = dead.as_array().expect("a list");
    assert_eq!(dead.len(), 2, "{dead:?}");
    assert_eq!((dead[0]["id"].as_i64(), dead[0]["kind"].as_str()), (Some(mail), Some("send_mail")));
    assert_eq!((dead[0]["attempt"].as_u64(), dead[0]["max_attempts"].as_u64()), (Some(1), Some(1)));
    assert!(dead[0]["last_error"].as_str().is_some_and(|e| e.contains("SMTP refused <ada@example.com>")), "{dead:?}");
    assert_eq!(dead[0]["errors"].as_array().map(Vec::len), Some(1));
    assert_eq!(dead[0]["errors"][0]["attempt"], 1);
    assert!(dead[0].get("payload").is_none(), "payloads are shown to the token holder only");
    assert_eq!((dead[1]["id"].as_i64(), dead[1]["kind"].as_str()), (Some(ghost), Some("ghost")));
    let one = send("GET", h.addr, &format!("/stevedore/api/jobs/{mail}"), Some(TOKEN)).await.expect("a reply");
    assert_eq!(one.json()["payload"]["to"], "ada@example.com");
    assert_eq!(get(h.addr, "/stevedore/api/jobs/987654321").await.status, 404);
    assert_eq!(get(h.addr, "/stevedore/api/jobs/list?state=buried").await.status, 400);

    // The page shows them, with their retry buttons.
    let page = get(h.addr, "/stevedore").await;
    assert_eq!(page.status, 200);
    for expected in [
        format!(r#"<tr data-job-queue="{queue}">"#),
        format!(r#"<tr data-job="{mail}">"#),
        format!(r#"data-post="stevedore/api/jobs/{mail}/retry""#),
        format!(r#"<details data-errors="{mail}">"#),
        "SMTP refused &lt;ada@example.com&gt;".to_string(),
        r#"<td class="kind">send_mail</td>"#.to_string(),
        r#"data-post="stevedore/api/jobs/retry-dead""#.to_string(),
    ] {
        assert!(page.body.contains(&expected), "`{expected}` missing from the page:\n{}", page.body);
    }

    // Every action is refused without the right token, and changes nothing.
    let actions = [
        format!("/stevedore/api/jobs/{mail}/retry"),
        format!("/stevedore/api/jobs/{mail}/cancel"),
        "/stevedore/api/jobs/retry-dead".to_string(),
        format!("/stevedore/api/jobs/queues/{queue}/pause"),
        format!("/stevedore/api/jobs/queues/{queue}/resume"),
        format!("/stevedore/api/jobs/queues/{queue}/retry-dead"),
    ];
    for path in &actions {
        assert_eq!(post(h.addr, path, None).await.status, 401, "{path} without a token");
        assert_eq!(post(h.addr, path, Some("jobs-admin-toke")).await.status, 401, "{path} with a wrong token");
        assert_eq!(post(h.addr, path, Some("jobs-admin-token!")).await.status, 401, "{path} with a wrong token");
    }
    assert_eq!(state_of(&store, mail).await, JobState::Dead);
    assert_eq!(state_of(&store, ghost).await, JobState::Dead);
    assert_eq!(queue_stats(h.addr, &queue).await.expect("the queue")["paused"], false);

    // Pause the durable queue so that retried jobs wait where the test can see them.
    let r = post(h.addr, &format!("/stevedore/api/jobs/queues/{queue}/pause"), Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(queue_stats(h.addr, &queue).await.expect("the queue")["paused"], true);
    assert_eq!(post(h.addr, "/stevedore/api/jobs/queues/no-such-queue/pause", Some(TOKEN)).await.status, 404);

    // Retry one dead job: back to available, and the counts change.
    let r = post(h.addr, &format!("/stevedore/api/jobs/{mail}/retry"), Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(state_of(&store, mail).await, JobState::Available);
    let q = queue_stats(h.addr, &queue).await.expect("the queue");
    assert_eq!((q["dead"].as_u64(), q["available"].as_u64()), (Some(1), Some(1)), "{q}");
    let again = post(h.addr, &format!("/stevedore/api/jobs/{mail}/retry"), Some(TOKEN)).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert!(again.body.contains("is available"), "{}", again.body);
    assert_eq!(post(h.addr, "/stevedore/api/jobs/987654321/retry", Some(TOKEN)).await.status, 404);
    assert_eq!(post(h.addr, &format!("/stevedore/api/jobs/{mail}/explode"), Some(TOKEN)).await.status, 404);
    let page = get(h.addr, "/stevedore").await;
    assert!(!page.body.contains(&format!(r#"data-post="stevedore/api/jobs/{mail}/retry""#)), "still listed dead");
    assert!(page.body.contains(&format!(r#"data-post="stevedore/api/jobs/{mail}/cancel""#)), "not listed waiting");

    // Cancel a scheduled job; a dead one cannot be cancelled.
    let later = store
        .enqueue(&NewJob::raw("later", "{}").queue(&queue).delay(Duration::from_secs(3600)))
        .await
        .expect("enqueued")
        .expect("an id");
    let r = post(h.addr, &format!("/stevedore/api/jobs/{later}/cancel"), Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(state_of(&store, later).await, JobState::Cancelled);
    assert_eq!(post(h.addr, &format!("/stevedore/api/jobs/{ghost}/cancel"), Some(TOKEN)).await.status, 409);

    // Retry all dead (the ghost), then resume: the healed mail completes, the ghost dies again.
    let r = post(h.addr, "/stevedore/api/jobs/retry-dead", Some(TOKEN)).await;
    assert_eq!((r.status, r.json()["retried"].as_u64()), (200, Some(1)), "{}", r.body);
    assert_eq!(state_of(&store, ghost).await, JobState::Available);
    let q = queue_stats(h.addr, &queue).await.expect("the queue");
    assert_eq!((q["dead"].as_u64(), q["available"].as_u64(), q["cancelled"].as_u64()), (Some(0), Some(2), Some(1)));
    healed.store(true, Ordering::SeqCst);
    let r = post(h.addr, &format!("/stevedore/api/jobs/queues/{queue}/resume"), Some(TOKEN)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually(Duration::from_secs(20), "the worker finishes both jobs", || async {
        queue_stats(h.addr, &queue).await.is_some_and(|q| q["completed"] == 1 && q["dead"] == 1)
    })
    .await;
    assert_eq!(state_of(&store, mail).await, JobState::Completed);
    let ghost_errors = get(h.addr, &format!("/stevedore/api/jobs/{ghost}")).await.json();
    assert_eq!(ghost_errors["errors"].as_array().map(Vec::len), Some(2), "the error list is kept: {ghost_errors}");

    // /metrics: the job gauges (read through a cache of at most 5 s), valid for promtool.
    let expected = [
        format!(r#"stevedore_jobs{{queue="{queue}",state="completed"}} 1"#),
        format!(r#"stevedore_jobs{{queue="{queue}",state="dead"}} 1"#),
        format!(r#"stevedore_jobs{{queue="{queue}",state="cancelled"}} 1"#),
        format!(r#"stevedore_jobs{{queue="{queue}",state="available"}} 0"#),
        format!(r#"stevedore_jobs_queue_paused{{queue="{queue}"}} 0"#),
        "stevedore_jobs_store_up 1".to_string(),
        "# TYPE stevedore_jobs gauge".to_string(),
    ];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    let text = loop {
        let text = get(h.addr, "/metrics").await.body;
        if expected.iter().all(|e| text.contains(e.as_str())) {
            break text;
        }
        let missing: Vec<_> = expected.iter().filter(|e| !text.contains(e.as_str())).collect();
        assert!(tokio::time::Instant::now() < deadline, "missing {missing:?} in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(!text.contains(TOKEN), "the admin token leaked into the metrics");
    common::promtool(&text).await;

    h.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_round_trip_on_sqlite() {
    let (store, place) = sqlite().await;
    round_trip(store, "sq").await;
    place.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_jobs_round_trip_on_postgres() {
    let Some((store, place)) = postgres().await else { return };
    round_trip(store.clone(), "pg").await;
    store.pool().close().await;
    place.remove().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_token_jobs_are_read_only() {
    let (store, place) = sqlite().await;
    let queue = unique("ro");
    let id = make_dead(&store, &queue, "disk <full>").await;
    let web = WebServer::new(Router::new()).bind("127.0.0.1:0").admin_token(None).metrics(false).jobs(store.clone());
    let h = start(Host::builder(), web).await;
    for path in [
        format!("/stevedore/api/jobs/{id}/retry"),
        "/stevedore/api/jobs/retry-dead".to_string(),
        format!("/stevedore/api/jobs/queues/{queue}/pause"),
    ] {
        for token in [None, Some(TOKEN)] {
            let r = post(h.addr, &path, token).await;
            assert_eq!(r.status, 403, "{path}: {}", r.body);
            assert!(r.body.contains("STEVEDORE_ADMIN_TOKEN"), "{}", r.body);
        }
    }
    assert_eq!(state_of(&store, id).await, JobState::Dead);
    let page = get(h.addr, "/stevedore").await;
    assert!(page.body.contains(&format!(r#"<tr data-job="{id}">"#)), "{}", page.body);
    assert!(page.body.contains("disk &lt;full&gt;"), "errors are escaped: {}", page.body);
    assert!(!page.body.contains("<button"), "read-only pages offer no buttons");
    let job = send("GET", h.addr, &format!("/stevedore/api/jobs/{id}"), Some(TOKEN)).await.expect("a reply").json();
    assert!(job.get("payload").is_none(), "no token configured, no payloads: {job}");
    h.stop().await;
    drop(store);
    place.remove().await;
}
