//! What the server logs: a warning when it listens beyond loopback with no admin token, and never
//! the token itself.

mod common;

use std::sync::{Arc, Mutex};

use axum::Router;
use common::post;
use stevedore::Host;
use stevedore_web::{WebHostExt, WebServer};

/// Collects every log line written while it is the thread's default subscriber. The tests run on
/// tokio's current-thread runtime, so the host's tasks log on this thread too.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("unpoisoned").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().expect("unpoisoned")).into_owned()
    }
}

fn capture() -> (Captured, tracing::subscriber::DefaultGuard) {
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::DEBUG)
        .with_ansi(false)
        .with_writer(move || writer.clone())
        .finish();
    (logs, tracing::subscriber::set_default(subscriber))
}

async fn run_once(web: WebServer, actions: &[Option<&str>]) {
    let mut local = web.local_addr();
    let host = Host::builder().handle_signals(false).read_env(false).build_web(web).expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    assert!(lifetime.started().await);
    let addr = local.wait().await.expect("bound");
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()));
    for token in actions {
        post(loopback, "/stevedore/api/services/log-web/trigger", *token).await;
    }
    lifetime.request_stop();
    assert!(run.await.expect("joined").start_error.is_none());
}

#[tokio::test]
async fn no_token_on_a_public_address_is_a_warning() {
    let (logs, _guard) = capture();
    run_once(WebServer::new(Router::new()).bind("0.0.0.0:0").name("log-web").admin_token(None).metrics(false), &[])
        .await;
    let text = logs.text();
    assert!(
        text.lines().any(|l| l.contains("WARN") && l.contains("non-loopback") && l.contains("STEVEDORE_ADMIN_TOKEN")),
        "no warning in:\n{text}"
    );
}

#[tokio::test]
async fn no_token_on_loopback_is_no_warning() {
    let (logs, _guard) = capture();
    run_once(WebServer::new(Router::new()).bind("127.0.0.1:0").name("log-web").admin_token(None).metrics(false), &[])
        .await;
    let text = logs.text();
    assert!(!text.lines().any(|l| l.contains("WARN")), "unexpected warning in:\n{text}");
    assert!(text.contains("read-only"), "{text}");
}

#[tokio::test]
async fn the_token_is_never_logged() {
    let secret = "tok-SECRET-4f1e9";
    let (logs, _guard) = capture();
    let web =
        WebServer::new(Router::new()).bind("127.0.0.1:0").name("log-web").admin_token(Some(secret)).metrics(false);
    run_once(web, &[None, Some("tok-SECRET-wrong"), Some(secret)]).await;
    let text = logs.text();
    assert!(text.contains("dashboard action refused"), "refusals are logged:\n{text}");
    assert!(!text.contains("SECRET"), "a token reached the logs:\n{text}");
}
