//! Shared by the integration tests: a small HTTP client, test services with operator actions, and
//! tool checks that skip loudly on a laptop and fail under CI.
#![allow(dead_code)]

pub mod jobs;

use std::net::SocketAddr;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use stevedore::{BackgroundService, BoxError, RunOutcome, ServiceContext, ServiceControl, ServiceSpec};
use tokio::io::AsyncWriteExt;
use tokio::sync::Notify;

/// A response: status code and body text.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

/// Sends one request on a fresh connection (no pooling, so a stopped server is seen as such).
pub async fn send(method: &str, addr: SocketAddr, path: &str, token: Option<&str>) -> Result<Reply, String> {
    send_body(method, addr, path, token, Vec::new()).await
}

/// Like [`send`], with a request body.
pub async fn send_body(
    method: &str,
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: Vec<u8>,
) -> Result<Reply, String> {
    let client = Client::builder(TokioExecutor::new()).pool_max_idle_per_host(0).build_http::<Full<bytes::Bytes>>();
    let mut req = hyper::Request::builder().method(method).uri(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = req.body(Full::new(bytes::Bytes::from(body))).map_err(|e| e.to_string())?;
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
    Ok(Reply { status, body: String::from_utf8_lossy(&body).into_owned() })
}

pub async fn get(addr: SocketAddr, path: &str) -> Reply {
    send("GET", addr, path, None).await.unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub async fn post(addr: SocketAddr, path: &str, token: Option<&str>) -> Reply {
    send("POST", addr, path, token).await.unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

/// Polls `check` every 20 ms until it holds or `within` passes (for real external effects).
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A service that runs once each time it is triggered ("run now"), recording each run.
pub struct Triggered {
    wake: Arc<Notify>,
}

struct TriggerControl(Arc<Notify>);

impl ServiceControl for TriggerControl {
    fn trigger(&self) -> bool {
        self.0.notify_one();
        true
    }
    fn can_trigger(&self) -> bool {
        true
    }
}

impl BackgroundService for Triggered {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        loop {
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = self.wake.notified() => {
                    let run = ctx.status().run_started();
                    tokio::task::yield_now().await;
                    ctx.status().run_finished(run, RunOutcome::Succeeded, None);
                }
            }
        }
    }
}

/// A triggerable service registration, kind `interval` so it looks like a timed service.
pub fn triggered(name: &str) -> ServiceSpec {
    let wake = Arc::new(Notify::new());
    ServiceSpec::background(name, Triggered { wake: wake.clone() })
        .kind("interval")
        .control(Arc::new(TriggerControl(wake)))
}

/// A queue-like service whose pause flag is shown in its queue figures.
pub struct Queue {
    paused: Arc<AtomicBool>,
    changed: Arc<Notify>,
}

struct QueueControl {
    paused: Arc<AtomicBool>,
    changed: Arc<Notify>,
}

impl ServiceControl for QueueControl {
    fn pause(&self) -> bool {
        self.paused.store(true, Ordering::SeqCst);
        self.changed.notify_one();
        true
    }
    fn resume(&self) -> bool {
        self.paused.store(false, Ordering::SeqCst);
        self.changed.notify_one();
        true
    }
    fn can_pause(&self) -> bool {
        true
    }
}

impl BackgroundService for Queue {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        loop {
            let paused = self.paused.load(Ordering::SeqCst);
            ctx.status().update_queue(|q| {
                q.depth = 3;
                q.in_flight = 1;
                q.paused = paused;
            });
            tokio::select! {
                _ = ctx.cancelled() => return Ok(()),
                _ = self.changed.notified() => {}
            }
        }
    }
}

pub fn queue(name: &str) -> ServiceSpec {
    let paused = Arc::new(AtomicBool::new(false));
    let changed = Arc::new(Notify::new());
    ServiceSpec::background(name, Queue { paused: paused.clone(), changed: changed.clone() })
        .kind("queue")
        .control(Arc::new(QueueControl { paused, changed }))
}

/// Whether an external tool is installed: under CI a missing tool fails the test, elsewhere the
/// test is skipped with a loud message.
pub fn require_tool(path: &str, package: &str) -> bool {
    if std::path::Path::new(path).exists() {
        return true;
    }
    let message = format!("{path} is missing (Debian package `{package}`)");
    if stevedore_testkit::in_ci() {
        panic!("{message} (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
    false
}

/// Checks a `/metrics` body with the real `promtool check metrics` (skipped loudly without it on a
/// laptop, a failure under CI).
pub async fn promtool(text: &str) {
    if !require_tool("/usr/bin/promtool", "prometheus") {
        return;
    }
    let mut child = tokio::process::Command::new("/usr/bin/promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    let mut stdin = child.stdin.take().expect("a stdin");
    stdin.write_all(text.as_bytes()).await.expect("written");
    drop(stdin);
    let out = child.wait_with_output().await.expect("promtool finishes");
    assert!(
        out.status.success(),
        "promtool check metrics refused the output:\n{}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt().with_test_writer().with_env_filter("info").try_init();
}
