//! `GET /metrics` in the Prometheus text format, through the `metrics` facade.
//!
//! Service figures are read from the host's [`StatusView`] at scrape time and set as gauges and
//! absolute counters, so a scrape always shows the host's own numbers. HTTP request durations are
//! recorded per request by a middleware. One recorder serves the whole process: the first call to
//! [`install_prometheus`] installs it and every later call returns the same handle.
//!
//! | metric | type | labels |
//! | --- | --- | --- |
//! | `stevedore_host_state` | gauge (1 for the current phase) | `state` |
//! | `stevedore_ready` | gauge | |
//! | `stevedore_service_state` | gauge (1 for the current state) | `service`, `state` |
//! | `stevedore_service_healthy` | gauge | `service` |
//! | `stevedore_service_heartbeat_age_seconds` | gauge | `service` (services with a heartbeat) |
//! | `stevedore_service_restarts_total` | counter | `service` |
//! | `stevedore_runs_started_total` | counter | `service` |
//! | `stevedore_runs_total` | counter | `service`, `outcome` (`succeeded`, `failed`) |
//! | `stevedore_runs_skipped_total` | counter | `service` |
//! | `stevedore_runs_in_flight` | gauge | `service` |
//! | `stevedore_run_duration_seconds` | histogram | `service` |
//! | `stevedore_queue_depth`, `_in_flight`, `_failed`, `_paused` | gauge | `service` (queue services) |
//! | `http_server_request_duration_seconds` | histogram | `method`, `route`, `status` |
//! | `stevedore_jobs` | gauge | `queue`, `state` (`available`, `scheduled`, `running`, `completed`, `dead`, `cancelled`) |
//! | `stevedore_jobs_queue_paused` | gauge (1 when paused for every worker) | `queue` |
//! | `stevedore_jobs_store_up` | gauge (1 when the last read of the counts succeeded) | |
//!
//! The three `stevedore_jobs*` gauges exist with a job store attached ([`WebServer::jobs`](crate::WebServer::jobs),
//! feature `jobs`). They are read from the store at scrape time through a cache (5 s by default,
//! [`WebServer::jobs_metrics_cache`](crate::WebServer::jobs_metrics_cache)), and every store call
//! gives up after 5 s: a store that fails or hangs sets `stevedore_jobs_store_up` to 0 and leaves
//! the counts at their last values rather than failing the scrape. A queue that disappears (its
//! last jobs deleted by retention) has its gauges set to 0. The gauges are process-wide like the
//! recorder, so two servers in one process should not attach stores with the same queue names.
//!
//! Run durations are recorded by the host itself as each run ends
//! ([`stevedore::RUN_DURATION_METRIC`]), one observation per run. Each service takes its histogram
//! handle from the recorder at its first finished run, which is why `build_web` installs the
//! recorder before building the host.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{MatchedPath, Request};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use metrics::{Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use stevedore::{HostState, ServiceState, StatusView};

use crate::jobs::Jobs;

/// HTTP request durations, by method, route and status.
pub const HTTP_DURATION: &str = "http_server_request_duration_seconds";
/// Run durations, by service: recorded by the host as each run ends.
pub const RUN_DURATION: &str = stevedore::RUN_DURATION_METRIC;

const HTTP_BUCKETS: &[f64] = &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
const RUN_BUCKETS: &[f64] = &[0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0];

const SERVICE_STATES: &[ServiceState] = &[
    ServiceState::Registered,
    ServiceState::Starting,
    ServiceState::Running,
    ServiceState::Restarting,
    ServiceState::Stopping,
    ServiceState::Stopped,
    ServiceState::Completed,
    ServiceState::Failed,
    ServiceState::Abandoned,
];
const HOST_STATES: &[HostState] = &[HostState::Starting, HostState::Started, HostState::Stopping, HostState::Stopped];

/// The process-wide Prometheus recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {0} (pass your own handle with `WebServer::prometheus_handle`)")]
pub struct MetricsError(String);

static INSTALLED: Mutex<Option<PrometheusHandle>> = Mutex::new(None);

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls return the
/// same handle. Fails when another recorder was installed first (by the application, say).
///
/// ```
/// let handle = stevedore_web::metrics::install_prometheus().expect("no other recorder");
/// metrics::counter!("orders_total").increment(1);
/// assert!(handle.render().contains("orders_total"));
/// ```
pub fn install_prometheus() -> Result<PrometheusHandle, MetricsError> {
    let mut slot = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(handle) = slot.as_ref() {
        return Ok(handle.clone());
    }
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_string()), HTTP_BUCKETS)
        .and_then(|b| b.set_buckets_for_metric(Matcher::Full(RUN_DURATION.to_string()), RUN_BUCKETS))
        .map_err(|e| MetricsError(e.to_string()))?
        .install_recorder()
        .map_err(|e| MetricsError(e.to_string()))?;
    describe();
    *slot = Some(handle.clone());
    Ok(handle)
}

fn describe() {
    describe_histogram!(HTTP_DURATION, Unit::Seconds, "HTTP request durations, by method, route and status.");
    describe_histogram!(RUN_DURATION, Unit::Seconds, "Run durations, by service.");
    describe_gauge!("stevedore_host_state", "1 for the host's current phase, 0 for the others.");
    describe_gauge!("stevedore_ready", "1 when the host is ready (what /health/ready reports).");
    describe_gauge!("stevedore_service_state", "1 for each service's current state, 0 for the others.");
    describe_gauge!("stevedore_service_healthy", "1 unless the service failed or missed its heartbeat.");
    describe_gauge!("stevedore_service_heartbeat_age_seconds", "Seconds since the service last reported progress.");
    describe_counter!("stevedore_service_restarts_total", "Restarts after a failure, by service.");
    describe_counter!("stevedore_runs_started_total", "Runs started, by service.");
    describe_counter!("stevedore_runs_total", "Runs finished, by service and outcome.");
    describe_counter!("stevedore_runs_skipped_total", "Ticks skipped because a run was still going.");
    describe_gauge!("stevedore_runs_in_flight", "Runs going on now, by service.");
    describe_gauge!("stevedore_queue_depth", "Items waiting, by queue service.");
    describe_gauge!("stevedore_queue_in_flight", "Items being processed, by queue service.");
    describe_gauge!("stevedore_queue_failed", "Items whose processing failed, by queue service.");
    describe_gauge!("stevedore_queue_paused", "1 when the queue is paused.");
    crate::jobs::describe_metrics();
}

pub(crate) fn routes(status: StatusView, handle: PrometheusHandle, jobs: Option<(Arc<Jobs>, Duration)>) -> Router {
    let scraper = Arc::new(Scraper { status, handle, jobs });
    Router::new().route("/metrics", get(move || scrape(scraper.clone())))
}

struct Scraper {
    status: StatusView,
    handle: PrometheusHandle,
    /// The attached job store, and how old the job counts may be.
    jobs: Option<(Arc<Jobs>, Duration)>,
}

async fn scrape(scraper: Arc<Scraper>) -> Response {
    scraper.update();
    if let Some((jobs, max_age)) = &scraper.jobs {
        jobs.record_metrics(*max_age).await;
    }
    scraper.handle.run_upkeep();
    let body = scraper.handle.render();
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], body).into_response()
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

impl Scraper {
    fn update(&self) {
        let host = self.status.host_state();
        for s in HOST_STATES {
            gauge!("stevedore_host_state", "state" => s.as_str()).set(flag(*s == host));
        }
        gauge!("stevedore_ready").set(flag(self.status.readiness().ready));
        for s in self.status.services() {
            let name = s.name.clone();
            for state in SERVICE_STATES {
                gauge!("stevedore_service_state", "service" => name.clone(), "state" => state.as_str())
                    .set(flag(*state == s.state));
            }
            gauge!("stevedore_service_healthy", "service" => name.clone()).set(flag(s.is_healthy()));
            if let Some(age) = s.since_heartbeat {
                gauge!("stevedore_service_heartbeat_age_seconds", "service" => name.clone()).set(age.as_secs_f64());
            }
            counter!("stevedore_service_restarts_total", "service" => name.clone()).absolute(u64::from(s.restarts));
            counter!("stevedore_runs_started_total", "service" => name.clone()).absolute(s.runs.started);
            counter!("stevedore_runs_total", "service" => name.clone(), "outcome" => "succeeded")
                .absolute(s.runs.succeeded);
            counter!("stevedore_runs_total", "service" => name.clone(), "outcome" => "failed").absolute(s.runs.failed);
            counter!("stevedore_runs_skipped_total", "service" => name.clone()).absolute(s.runs.skipped);
            gauge!("stevedore_runs_in_flight", "service" => name.clone()).set(s.runs.in_flight as f64);
            if let Some(q) = &s.queue {
                gauge!("stevedore_queue_depth", "service" => name.clone()).set(q.depth as f64);
                gauge!("stevedore_queue_in_flight", "service" => name.clone()).set(q.in_flight as f64);
                gauge!("stevedore_queue_failed", "service" => name.clone()).set(q.failed as f64);
                gauge!("stevedore_queue_paused", "service" => name).set(flag(q.paused));
            }
        }
    }
}

/// Records every request's duration under its route template (`/users/{id}`), never the raw path,
/// so label cardinality stays bounded; unmatched requests share the route `unmatched`.
pub(crate) async fn track_http(request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().as_str().to_string();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let response = next.run(request).await;
    let status = response.status();
    histogram!(HTTP_DURATION, "method" => method, "route" => route, "status" => status_label(status))
        .record(started.elapsed().as_secs_f64());
    response
}

fn status_label(status: StatusCode) -> String {
    status.as_u16().to_string()
}
