//! `GET /health/live` and `GET /health/ready`.
//!
//! Liveness answers 200 as long as the process serves requests: a liveness probe that failed because
//! a dependency is down would only get the pod restarted, which fixes nothing. Readiness answers 200
//! only when every service has started, none has failed or gone silent past its declared heartbeat
//! interval, and no stop has been requested; otherwise 503 with a JSON body naming what is not ready.
//! During the host's shutdown delay readiness is already 503 while requests are still served, so a
//! load balancer stops routing before the server stops accepting.

use axum::Json;
use axum::Router;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use serde::Serialize;
use stevedore::{Readiness, StatusView};

pub(crate) fn routes(status: StatusView) -> Router {
    Router::new().route("/health/live", get(live)).route("/health/ready", get(move || ready(status.clone())))
}

async fn live() -> impl IntoResponse {
    (StatusCode::OK, Json(serde_json::json!({ "status": "live" })))
}

async fn ready(status: StatusView) -> impl IntoResponse {
    let readiness = status.readiness();
    let code = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(ReadinessJson::from(&readiness)))
}

/// Readiness as JSON: `{"ready": false, "host": "starting", "not_ready": [{"name": .., "reason": ..}]}`.
#[derive(Debug, Serialize)]
pub(crate) struct ReadinessJson {
    ready: bool,
    host: &'static str,
    not_ready: Vec<NotReady>,
}

#[derive(Debug, Serialize)]
struct NotReady {
    name: String,
    reason: String,
}

impl From<&Readiness> for ReadinessJson {
    fn from(r: &Readiness) -> Self {
        ReadinessJson {
            ready: r.ready,
            host: r.host.as_str(),
            not_ready: r
                .not_ready
                .iter()
                .map(|(name, reason)| NotReady { name: name.clone(), reason: reason.clone() })
                .collect(),
        }
    }
}
