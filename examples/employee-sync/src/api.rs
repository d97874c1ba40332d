//! The web API: reads straight from the database, writes by enqueueing durable jobs.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;
use stevedore_jobs::NewJob;

use crate::db::Database;
use stevedore_jobs::{AnyStore, JobStore};

use crate::jobs::{SyncEmployees, enqueue_report};

/// What the handlers share.
#[derive(Debug, Clone)]
pub struct ApiState {
    /// The application's tables.
    pub db: Database,
    /// Where jobs are enqueued.
    pub jobs: AnyStore,
}

/// `/`, `/api/employees`, `/api/employees/sync`, `/api/syncs`, `/api/changes`, `/api/reports`.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/api/employees", get(employees))
        .route("/api/employees/sync", post(sync_now))
        .route("/api/syncs", get(syncs))
        .route("/api/changes", get(changes))
        .route("/api/reports", get(reports).post(new_report))
        .route("/api/reports/{id}", get(report))
        .with_state(state)
}

/// An error answer: 500 with the error's text as JSON, logged.
struct ApiError(String);

impl<E: std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::error!(error = %self.0, "API request failed");
        (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": self.0 }))).into_response()
    }
}

async fn index() -> Html<&'static str> {
    Html(include_str!("index.html"))
}

async fn employees(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let list = s.db.employees().await?;
    Ok(Json(json!({ "count": list.len(), "employees": list })))
}

async fn sync_now(State(s): State<ApiState>) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let id = s.jobs.enqueue(&NewJob::new(&SyncEmployees { trigger: "api".into() })?).await?;
    Ok((StatusCode::ACCEPTED, Json(json!({ "job_id": id }))))
}

async fn syncs(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "syncs": s.db.syncs(20).await? })))
}

async fn changes(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    let (total, latest) = s.db.changes(50).await?;
    Ok(Json(json!({ "total": total, "latest": latest })))
}

async fn reports(State(s): State<ApiState>) -> Result<Json<serde_json::Value>, ApiError> {
    Ok(Json(json!({ "reports": s.db.reports(20).await? })))
}

/// The body of `POST /api/reports` (optional).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewReport {
    /// Millions of mixing steps (1-10000, default 300: a few tenths of a second).
    rounds: Option<u32>,
}

async fn new_report(State(s): State<ApiState>, body: axum::body::Bytes) -> Result<Response, ApiError> {
    let request: NewReport = if body.is_empty() {
        NewReport::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => {
                let answer = json!({ "error": format!("body must be {{\"rounds\": N}} or empty: {e}") });
                return Ok((StatusCode::BAD_REQUEST, Json(answer)).into_response());
            }
        }
    };
    let rounds = request.rounds.unwrap_or(300);
    if !(1..=10_000).contains(&rounds) {
        let answer = json!({ "error": format!("rounds must be 1-10000, got {rounds}") });
        return Ok((StatusCode::BAD_REQUEST, Json(answer)).into_response());
    }
    let (report_id, job_id) = enqueue_report(&s.jobs, &s.db, rounds).await?;
    let answer = json!({ "report_id": report_id, "job_id": job_id, "url": format!("/api/reports/{report_id}") });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

async fn report(State(s): State<ApiState>, Path(id): Path<String>) -> Result<Response, ApiError> {
    Ok(match s.db.report(&id).await? {
        Some(r) => Json(r).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no report {id}") }))).into_response(),
    })
}
