//! Durable jobs on the dashboard, its JSON API and `/metrics` (feature `jobs`).
//!
//! Any [`JobStore`] is attached with [`WebServer::jobs`](crate::WebServer::jobs). Its trait is not
//! object safe (return-position `impl Future`), so the store is wrapped once in [`DynStore`], which
//! boxes the few futures the dashboard needs. Every store call is bounded by [`STORE_TIMEOUT`] so
//! a database that does not answer costs a page or a scrape that long at most, and reads go
//! through short caches so that open dashboards and scrapes do not hammer the database; an action
//! clears them, so its effect shows at once.

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use metrics::gauge;
use serde::{Deserialize, Serialize};
use stevedore_jobs::{JobError, JobId, JobRecord, JobState, JobStore, ListQuery, QueueStats};
use tokio::time::Instant;

use crate::auth::{Access, AdminToken, check};
use crate::dashboard::{error, escape, refusal};

/// The longest a store call may take before the dashboard or a scrape gives up on it.
pub(crate) const STORE_TIMEOUT: Duration = Duration::from_secs(5);
/// How old the figures the dashboard and the JSON API show may be.
const PAGE_MAX_AGE: Duration = Duration::from_secs(1);
/// How old the job gauges a scrape serves may be, unless set with
/// [`WebServer::jobs_metrics_cache`](crate::WebServer::jobs_metrics_cache).
pub(crate) const DEFAULT_METRICS_MAX_AGE: Duration = Duration::from_secs(5);
/// Dead jobs listed on the page (oldest first); the API pages through all of them.
const DEAD_SHOWN: u32 = 50;
/// Running and waiting jobs listed on the page, each.
const PENDING_SHOWN: u32 = 20;
/// Characters of a job's last error shown in the table; the rest is one click away.
const ERROR_SHOWN: usize = 300;
/// The most jobs one API listing returns.
const LIST_MAX: u32 = 500;

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The store operations the dashboard uses, object safe.
trait DynStore: Send + Sync {
    fn backend(&self) -> &'static str;
    fn stats(&self) -> BoxFut<'_, Result<Vec<QueueStats>, JobError>>;
    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFut<'a, Result<Vec<JobRecord>, JobError>>;
    fn get(&self, id: JobId) -> BoxFut<'_, Result<Option<JobRecord>, JobError>>;
    fn retry(&self, id: JobId) -> BoxFut<'_, Result<bool, JobError>>;
    fn retry_dead<'a>(&'a self, queue: Option<&'a str>) -> BoxFut<'a, Result<u64, JobError>>;
    fn cancel(&self, id: JobId) -> BoxFut<'_, Result<bool, JobError>>;
    fn pause<'a>(&'a self, queue: &'a str) -> BoxFut<'a, Result<(), JobError>>;
    fn resume<'a>(&'a self, queue: &'a str) -> BoxFut<'a, Result<(), JobError>>;
}

impl<S: JobStore> DynStore for S {
    fn backend(&self) -> &'static str {
        JobStore::backend(self)
    }
    fn stats(&self) -> BoxFut<'_, Result<Vec<QueueStats>, JobError>> {
        Box::pin(JobStore::stats(self))
    }
    fn list<'a>(&'a self, query: &'a ListQuery) -> BoxFut<'a, Result<Vec<JobRecord>, JobError>> {
        Box::pin(JobStore::list(self, query))
    }
    fn get(&self, id: JobId) -> BoxFut<'_, Result<Option<JobRecord>, JobError>> {
        Box::pin(JobStore::get(self, id))
    }
    fn retry(&self, id: JobId) -> BoxFut<'_, Result<bool, JobError>> {
        Box::pin(JobStore::retry(self, id))
    }
    fn retry_dead<'a>(&'a self, queue: Option<&'a str>) -> BoxFut<'a, Result<u64, JobError>> {
        Box::pin(JobStore::retry_dead(self, queue))
    }
    fn cancel(&self, id: JobId) -> BoxFut<'_, Result<bool, JobError>> {
        Box::pin(JobStore::cancel(self, id))
    }
    fn pause<'a>(&'a self, queue: &'a str) -> BoxFut<'a, Result<(), JobError>> {
        Box::pin(JobStore::pause(self, queue))
    }
    fn resume<'a>(&'a self, queue: &'a str) -> BoxFut<'a, Result<(), JobError>> {
        Box::pin(JobStore::resume(self, queue))
    }
}

/// Why a store call gave no answer. Its text names the store and the operation.
#[derive(Debug, thiserror::Error)]
enum StoreFailure {
    #[error(transparent)]
    Store(#[from] JobError),
    #[error("job store ({backend}): {operation} did not answer within {} s", STORE_TIMEOUT.as_secs())]
    Timeout { backend: &'static str, operation: &'static str },
}

/// A value loaded at most once per `max_age`, shared by every request. A load holds the lock, so
/// concurrent readers wait for it instead of starting their own. Failures are cached too: a
/// database that is down is asked again only once the entry is stale.
struct Cached<T> {
    slot: tokio::sync::Mutex<Option<Loaded<T>>>,
}

/// When a value was loaded, and the value or why it could not be.
type Loaded<T> = (Instant, Arc<Result<T, String>>);

impl<T> Cached<T> {
    fn new() -> Self {
        Cached { slot: tokio::sync::Mutex::new(None) }
    }

    async fn get<F, Fut>(&self, max_age: Duration, load: F) -> Arc<Result<T, String>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, String>>,
    {
        let mut slot = self.slot.lock().await;
        if let Some((at, value)) = slot.as_ref()
            && at.elapsed() < max_age
        {
            return value.clone();
        }
        let value = Arc::new(load().await);
        *slot = Some((Instant::now(), value.clone()));
        value
    }

    /// Forgets the value; waits for a load in progress, whose result may predate the caller's
    /// change.
    async fn clear(&self) {
        *self.slot.lock().await = None;
    }
}

/// What the page shows of the store, read in one go.
struct Snapshot {
    stats: Vec<QueueStats>,
    dead: Vec<JobRecord>,
    running: Vec<JobRecord>,
    waiting: Vec<JobRecord>,
}

/// The job store attached to a web server, with its caches.
pub(crate) struct Jobs {
    store: Box<dyn DynStore>,
    stats: Cached<Vec<QueueStats>>,
    snapshot: Cached<Snapshot>,
    /// Queues given gauges at the last scrape, to zero those that have since disappeared.
    gauged: Mutex<BTreeSet<String>>,
    /// Stats fetched from the store, for the tests of the caches.
    loads: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Jobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jobs").field("backend", &self.store.backend()).finish_non_exhaustive()
    }
}

impl Jobs {
    pub(crate) fn new<S: JobStore>(store: S) -> Self {
        Jobs {
            store: Box::new(store),
            stats: Cached::new(),
            snapshot: Cached::new(),
            gauged: Mutex::new(BTreeSet::new()),
            loads: std::sync::atomic::AtomicU64::new(0),
        }
    }

    async fn call<T>(
        &self,
        operation: &'static str,
        fut: impl Future<Output = Result<T, JobError>>,
    ) -> Result<T, StoreFailure> {
        match tokio::time::timeout(STORE_TIMEOUT, fut).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreFailure::Timeout { backend: self.store.backend(), operation }),
        }
    }

    /// Counts per queue and state, at most `max_age` old.
    async fn stats(&self, max_age: Duration) -> Arc<Result<Vec<QueueStats>, String>> {
        self.stats
            .get(max_age, || async {
                self.loads.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                self.call("count jobs", self.store.stats()).await.map_err(|e| {
                    tracing::warn!(error = %e, "cannot read the job counts");
                    e.to_string()
                })
            })
            .await
    }

    async fn snapshot(&self) -> Arc<Result<Snapshot, String>> {
        self.snapshot
            .get(PAGE_MAX_AGE, || async {
                let stats = self.stats(PAGE_MAX_AGE).await;
                let stats = stats.as_ref().clone()?;
                let list = |state, limit| ListQuery { state: Some(state), limit, ..ListQuery::default() };
                let (dead, running, waiting) = (
                    list(JobState::Dead, DEAD_SHOWN),
                    list(JobState::Running, PENDING_SHOWN),
                    list(JobState::Available, PENDING_SHOWN),
                );
                let read = async |query: &ListQuery| {
                    self.call("list jobs", self.store.list(query)).await.map_err(|e| {
                        tracing::warn!(error = %e, "cannot list jobs");
                        e.to_string()
                    })
                };
                Ok(Snapshot {
                    stats,
                    dead: read(&dead).await?,
                    running: read(&running).await?,
                    waiting: read(&waiting).await?,
                })
            })
            .await
    }

    /// Forgets cached figures after an action, so the next page, API call or scrape shows its effect.
    async fn changed(&self) {
        self.snapshot.clear().await;
        self.stats.clear().await;
    }

    /// How many times the counts were read from the store (for tests of the cache).
    #[cfg(test)]
    fn loads(&self) -> u64 {
        self.loads.load(std::sync::atomic::Ordering::Relaxed)
    }

    // ---- metrics ----

    /// Sets the job gauges from counts at most `max_age` old. Gauges of a queue that has gone
    /// (its last jobs removed by retention) drop to 0 rather than keep their last values.
    pub(crate) async fn record_metrics(&self, max_age: Duration) {
        let stats = self.stats(max_age).await;
        let Ok(queues) = stats.as_ref() else {
            gauge!("stevedore_jobs_store_up").set(0.0);
            return;
        };
        gauge!("stevedore_jobs_store_up").set(1.0);
        let mut gauged = self.gauged.lock().unwrap_or_else(|p| p.into_inner());
        let now: BTreeSet<String> = queues.iter().map(|q| q.queue.clone()).collect();
        for q in queues {
            for (state, count) in counts(q) {
                gauge!("stevedore_jobs", "queue" => q.queue.clone(), "state" => state).set(count as f64);
            }
            gauge!("stevedore_jobs_queue_paused", "queue" => q.queue.clone()).set(if q.paused { 1.0 } else { 0.0 });
        }
        for gone in gauged.difference(&now) {
            for (state, _) in counts(&QueueStats::default()) {
                gauge!("stevedore_jobs", "queue" => gone.clone(), "state" => state).set(0.0);
            }
            gauge!("stevedore_jobs_queue_paused", "queue" => gone.clone()).set(0.0);
        }
        *gauged = now;
    }
}

/// A queue's counts under the `state` label values of `stevedore_jobs`.
fn counts(q: &QueueStats) -> [(&'static str, u64); 6] {
    [
        ("available", q.available),
        ("scheduled", q.scheduled),
        ("running", q.running),
        ("completed", q.completed),
        ("dead", q.dead),
        ("cancelled", q.cancelled),
    ]
}

pub(crate) fn describe_metrics() {
    metrics::describe_gauge!(
        "stevedore_jobs",
        "Durable jobs by queue and state (available = due now, scheduled = waiting for its time), read at scrape \
         time through a short cache."
    );
    metrics::describe_gauge!("stevedore_jobs_queue_paused", "1 when the durable queue is paused for every worker.");
    metrics::describe_gauge!("stevedore_jobs_store_up", "1 when the last read of the job counts succeeded.");
}

// ---- JSON API ----

#[derive(Clone)]
struct JobsState {
    jobs: Arc<Jobs>,
    token: Option<Arc<AdminToken>>,
}

pub(crate) fn routes(jobs: Arc<Jobs>, token: Option<Arc<AdminToken>>) -> Router {
    Router::new()
        .route("/stevedore/api/jobs", get(overview))
        .route("/stevedore/api/jobs/list", get(list))
        .route("/stevedore/api/jobs/retry-dead", post(retry_all_dead))
        .route("/stevedore/api/jobs/queues/{queue}/{action}", post(queue_action))
        .route("/stevedore/api/jobs/{id}", get(job))
        .route("/stevedore/api/jobs/{id}/{action}", post(job_action))
        .with_state(JobsState { jobs, token })
}

/// One failed attempt. `at` is RFC 3339 in UTC.
#[derive(Debug, Serialize)]
struct AttemptJson {
    attempt: u32,
    at: String,
    error: String,
}

/// One job, as the API serves it. Times are RFC 3339 in UTC.
#[derive(Debug, Serialize)]
struct JobJson {
    id: JobId,
    kind: String,
    queue: String,
    state: JobState,
    priority: i16,
    attempt: u32,
    max_attempts: u32,
    timeout_ms: Option<u128>,
    unique_key: Option<String>,
    scheduled_at: String,
    created_at: String,
    attempted_at: Option<String>,
    finished_at: Option<String>,
    lease_owner: Option<String>,
    lease_expires_at: Option<String>,
    last_error: Option<String>,
    errors: Vec<AttemptJson>,
    /// The payload, only for a request that carries the admin token: payloads are the application's
    /// data, while the rest of the dashboard is readable by anyone who reaches it.
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<serde_json::Value>,
}

fn rfc3339(t: impl Into<SystemTime>) -> String {
    humantime::format_rfc3339_millis(t.into()).to_string()
}

fn epoch_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(u64::try_from(ms).unwrap_or(0))
}

impl JobJson {
    fn new(r: &JobRecord, with_payload: bool) -> Self {
        JobJson {
            id: r.id,
            kind: r.kind.clone(),
            queue: r.queue.clone(),
            state: r.state,
            priority: r.priority,
            attempt: r.attempt,
            max_attempts: r.max_attempts,
            timeout_ms: r.timeout.map(|d| d.as_millis()),
            unique_key: r.unique_key.clone(),
            scheduled_at: rfc3339(r.scheduled_at),
            created_at: rfc3339(r.created_at),
            attempted_at: r.attempted_at.map(rfc3339),
            finished_at: r.finished_at.map(rfc3339),
            lease_owner: r.lease_owner.clone(),
            lease_expires_at: r.lease_expires_at.map(rfc3339),
            last_error: r.errors.last().map(|e| e.error.clone()),
            errors: r
                .errors
                .iter()
                .map(|e| AttemptJson { attempt: e.attempt, at: rfc3339(epoch_ms(e.at)), error: e.error.clone() })
                .collect(),
            // Stored payloads are JSON; one that is not is shown as a string rather than hidden.
            payload: with_payload.then(|| {
                serde_json::from_str(&r.payload).unwrap_or_else(|_| serde_json::Value::String(r.payload.clone()))
            }),
        }
    }
}

fn unavailable(e: &StoreFailure) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
}

async fn overview(State(s): State<JobsState>) -> Response {
    let stats = s.jobs.stats(PAGE_MAX_AGE).await;
    match stats.as_ref() {
        Ok(queues) => Json(serde_json::json!({ "backend": s.jobs.store.backend(), "queues": queues })).into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.clone()),
    }
}

/// `?state=dead&queue=email&after=120&limit=50`, every field optional.
#[derive(Debug, Deserialize)]
struct ListParams {
    state: Option<String>,
    queue: Option<String>,
    after: Option<JobId>,
    limit: Option<u32>,
}

async fn list(State(s): State<JobsState>, Query(p): Query<ListParams>, headers: HeaderMap) -> Response {
    let state = match p.state.as_deref().map(str::parse::<JobState>).transpose() {
        Ok(state) => state,
        Err(_) => {
            let known: Vec<&str> = JobState::ALL.iter().map(|s| s.as_str()).collect();
            return error(
                StatusCode::BAD_REQUEST,
                format!("unknown job state `{}`: use one of {}", p.state.unwrap_or_default(), known.join(", ")),
            );
        }
    };
    let query =
        ListQuery { state, queue: p.queue, after_id: p.after, limit: p.limit.unwrap_or(100).clamp(1, LIST_MAX) };
    let with_payload = check(s.token.as_deref(), &headers) == Access::Granted;
    match s.jobs.call("list jobs", s.jobs.store.list(&query)).await {
        Ok(jobs) => Json(jobs.iter().map(|r| JobJson::new(r, with_payload)).collect::<Vec<_>>()).into_response(),
        Err(e) => unavailable(&e),
    }
}

async fn job(State(s): State<JobsState>, Path(id): Path<JobId>, headers: HeaderMap) -> Response {
    let with_payload = check(s.token.as_deref(), &headers) == Access::Granted;
    match s.jobs.call("read a job", s.jobs.store.get(id)).await {
        Ok(Some(r)) => Json(JobJson::new(&r, with_payload)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no job has id {id}")),
        Err(e) => unavailable(&e),
    }
}

fn done(body: serde_json::Value) -> Response {
    (StatusCode::OK, Json(body)).into_response()
}

async fn job_action(
    State(s): State<JobsState>,
    Path((id, action)): Path<(JobId, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(s.token.as_deref(), &headers, &format!("{action} job {id}")) {
        return refused;
    }
    let (result, refusal) = match action.as_str() {
        "retry" => {
            (s.jobs.call("retry a job", s.jobs.store.retry(id)).await, "only dead or cancelled jobs can be retried")
        }
        "cancel" => (
            s.jobs.call("cancel a job", s.jobs.store.cancel(id)).await,
            "only available or running jobs can be cancelled",
        ),
        other => {
            return error(StatusCode::NOT_FOUND, format!("unknown job action `{other}`: use retry or cancel"));
        }
    };
    match result {
        Ok(true) => {
            s.jobs.changed().await;
            tracing::info!(job = id, action = %action, "dashboard job action");
            done(serde_json::json!({ "ok": true, "job": id, "action": action }))
        }
        // Refused: tell a missing job from one in the wrong state.
        Ok(false) => match s.jobs.call("read a job", s.jobs.store.get(id)).await {
            Ok(Some(r)) => error(StatusCode::CONFLICT, format!("job {id} is {}: {refusal}", r.state.as_str())),
            Ok(None) => error(StatusCode::NOT_FOUND, format!("no job has id {id}")),
            Err(e) => unavailable(&e),
        },
        Err(e) => unavailable(&e),
    }
}

async fn retry_all_dead(State(s): State<JobsState>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(s.token.as_deref(), &headers, "retry every dead job") {
        return refused;
    }
    match s.jobs.call("retry dead jobs", s.jobs.store.retry_dead(None)).await {
        Ok(n) => {
            s.jobs.changed().await;
            tracing::info!(retried = n, "dashboard: every dead job retried");
            done(serde_json::json!({ "ok": true, "action": "retry-dead", "retried": n }))
        }
        Err(e) => unavailable(&e),
    }
}

async fn queue_action(
    State(s): State<JobsState>,
    Path((queue, action)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = refusal(s.token.as_deref(), &headers, &format!("{action} job queue {queue}")) {
        return refused;
    }
    if !matches!(action.as_str(), "pause" | "resume" | "retry-dead") {
        return error(
            StatusCode::NOT_FOUND,
            format!("unknown queue action `{action}`: use pause, resume or retry-dead"),
        );
    }
    // Only queues the store knows: a typo must not leave a paused phantom queue behind.
    match s.jobs.call("count jobs", s.jobs.store.stats()).await {
        Ok(stats) if stats.iter().any(|q| q.queue == queue) => {}
        Ok(_) => return error(StatusCode::NOT_FOUND, format!("the job store has no queue named `{queue}`")),
        Err(e) => return unavailable(&e),
    }
    let result = match action.as_str() {
        "pause" => s.jobs.call("pause a queue", s.jobs.store.pause(&queue)).await.map(|()| None),
        "resume" => s.jobs.call("resume a queue", s.jobs.store.resume(&queue)).await.map(|()| None),
        _ => s.jobs.call("retry dead jobs", s.jobs.store.retry_dead(Some(&queue))).await.map(Some),
    };
    match result {
        Ok(retried) => {
            s.jobs.changed().await;
            tracing::info!(queue = %queue, action = %action, "dashboard job queue action");
            let mut body = serde_json::json!({ "ok": true, "queue": queue, "action": action });
            if let Some(n) = retried {
                body["retried"] = n.into();
            }
            done(body)
        }
        Err(e) => unavailable(&e),
    }
}

// ---- HTML ----

impl Jobs {
    /// Renders the Jobs section of the live part of the page.
    pub(crate) async fn render(&self, actions: bool, html: &mut String) {
        let snapshot = self.snapshot().await;
        let _ = write!(html, r#"<h2 id="jobs">Jobs <small>({})</small></h2>"#, self.store.backend());
        match snapshot.as_ref() {
            Ok(s) => render_snapshot(s, actions, html),
            Err(e) => {
                let _ = write!(html, r#"<p class="bad" id="jobs-error">Job store unavailable: {}</p>"#, escape(e));
            }
        }
    }
}

fn button(html: &mut String, url: &str, label: &str, text: &str, confirm: Option<&str>) {
    let _ = write!(
        html,
        r#"<button data-post="{}" data-label="{}"{}>{text}</button> "#,
        escape(url),
        escape(label),
        confirm.map(|c| format!(r#" data-confirm="{}""#, escape(c))).unwrap_or_default(),
    );
}

fn render_snapshot(s: &Snapshot, actions: bool, html: &mut String) {
    if s.stats.is_empty() {
        html.push_str("<p>No durable jobs stored.</p>");
        return;
    }
    html.push_str(
        "<table id=\"job-queues\"><thead><tr><th>Durable queue</th><th>State</th><th>Available</th>\
         <th>Scheduled</th><th>Running</th><th>Completed</th><th>Dead</th><th>Cancelled</th><th></th></tr>\
         </thead><tbody>",
    );
    let mut total_dead = 0;
    for q in &s.stats {
        total_dead += q.dead;
        let name = escape(&q.queue);
        let _ = write!(
            html,
            r#"<tr data-job-queue="{name}"><td>{name}</td><td class="{cls}">{state}</td>"#,
            cls = if q.paused { "bad" } else { "ok" },
            state = if q.paused { "paused" } else { "running" },
        );
        for (state, count) in counts(q) {
            let _ = write!(html, r#"<td class="{state}">{count}</td>"#);
        }
        html.push_str("<td>");
        if actions {
            let base = format!("stevedore/api/jobs/queues/{}", encode_segment(&q.queue));
            if q.paused {
                button(html, &format!("{base}/resume"), &format!("resume queue {}", q.queue), "Resume", None);
            } else {
                let confirm = format!("Pause queue {} for every worker?", q.queue);
                button(html, &format!("{base}/pause"), &format!("pause queue {}", q.queue), "Pause", Some(&confirm));
            }
            if q.dead > 0 {
                let confirm = format!("Retry the {} dead jobs of queue {}?", q.dead, q.queue);
                let label = format!("retry dead jobs of {}", q.queue);
                button(html, &format!("{base}/retry-dead"), &label, "Retry dead", Some(&confirm));
            }
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");

    let _ = write!(html, r#"<h3>Dead jobs <small id="dead-count">{total_dead}</small></h3>"#);
    if s.dead.is_empty() {
        html.push_str(r#"<p id="no-dead-jobs">No dead jobs.</p>"#);
    } else {
        if actions {
            let confirm = format!("Retry all {total_dead} dead jobs?");
            button(html, "stevedore/api/jobs/retry-dead", "retry all dead jobs", "Retry all dead", Some(&confirm));
        }
        html.push_str(
            "<table id=\"dead-jobs\"><thead><tr><th>Job</th><th>Queue</th><th>Kind</th><th>Attempts</th>\
             <th>Died</th><th>Last error</th><th>Errors</th><th></th></tr></thead><tbody>",
        );
        let now = SystemTime::now();
        for r in &s.dead {
            let last = r.errors.last().map(|e| e.error.as_str()).unwrap_or("");
            let shown: String = last.chars().take(ERROR_SHOWN).collect();
            let more = if shown.len() < last.len() { "&hellip;" } else { "" };
            let _ = write!(
                html,
                r#"<tr data-job="{id}"><td>{id}</td><td>{queue}</td><td class="kind">{kind}</td><td class="attempts">{attempt}/{max}</td><td>{died}</td><td class="err">{err}{more}</td><td><details data-errors="{id}"><summary>{n} error{s}</summary><div class="attempts-list"><a href="stevedore/api/jobs/{id}">as JSON</a></div></details></td><td>"#,
                id = r.id,
                queue = escape(&r.queue),
                kind = escape(&r.kind),
                attempt = r.attempt,
                max = r.max_attempts,
                died = r.finished_at.map(|t| crate::dashboard::ago(now, t.into())).unwrap_or_else(|| "&ndash;".into()),
                err = escape(&shown),
                n = r.errors.len(),
                s = if r.errors.len() == 1 { "" } else { "s" },
            );
            if actions {
                button(
                    html,
                    &format!("stevedore/api/jobs/{}/retry", r.id),
                    &format!("retry job {}", r.id),
                    "Retry",
                    None,
                );
            }
            html.push_str("</td></tr>");
        }
        html.push_str("</tbody></table>");
        if total_dead > s.dead.len() as u64 {
            let _ = write!(
                html,
                r#"<p>The {} oldest are shown; <a href="stevedore/api/jobs/list?state=dead">the API</a> lists them all (page with <code>after</code>).</p>"#,
                s.dead.len()
            );
        }
    }

    html.push_str("<h3>Running and waiting</h3>");
    if s.running.is_empty() && s.waiting.is_empty() {
        html.push_str(r#"<p id="no-pending-jobs">None.</p>"#);
        return;
    }
    html.push_str(
        "<table id=\"pending-jobs\"><thead><tr><th>Job</th><th>Queue</th><th>Kind</th><th>State</th>\
         <th>Attempt</th><th>Runs</th><th>Last error</th><th></th></tr></thead><tbody>",
    );
    let now = SystemTime::now();
    for r in s.running.iter().chain(&s.waiting) {
        let when = match r.state {
            JobState::Running => {
                r.attempted_at.map(|t| format!("started {}", crate::dashboard::ago(now, t.into()))).unwrap_or_default()
            }
            _ => crate::dashboard::until(now, r.scheduled_at.into()),
        };
        let last = r.errors.last().map(|e| e.error.as_str()).unwrap_or("");
        let shown: String = last.chars().take(ERROR_SHOWN).collect();
        let _ = write!(
            html,
            r#"<tr data-job="{id}"><td>{id}</td><td>{queue}</td><td class="kind">{kind}</td><td>{state}</td><td>{attempt}/{max}</td><td>{when}</td><td class="err">{err}</td><td>"#,
            id = r.id,
            queue = escape(&r.queue),
            kind = escape(&r.kind),
            state = r.state.as_str(),
            attempt = r.attempt,
            max = r.max_attempts,
            err = escape(&shown),
        );
        if actions {
            let confirm = format!("Cancel job {}?", r.id);
            button(
                html,
                &format!("stevedore/api/jobs/{}/cancel", r.id),
                &format!("cancel job {}", r.id),
                "Cancel",
                Some(&confirm),
            );
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");
}

/// Percent-encodes a path segment (everything but RFC 3986's unreserved characters).
fn encode_segment(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_are_percent_encoded() {
        assert_eq!(encode_segment("email/high prio"), "email%2Fhigh%20prio");
        assert_eq!(encode_segment("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(encode_segment("é"), "%C3%A9");
    }

    #[tokio::test]
    async fn counts_are_cached_until_stale_or_changed() {
        let path = std::env::temp_dir().join(format!("stevedore-web-cache-{}.db", std::process::id()));
        let store = stevedore_jobs::SqliteStore::open(&path).await.expect("a SQLite store");
        let jobs = Jobs::new(store);
        let hour = Duration::from_secs(3600);
        assert!(jobs.stats(hour).await.is_ok());
        assert!(jobs.stats(hour).await.is_ok());
        assert_eq!(jobs.loads(), 1, "a fresh entry is served from the cache");
        jobs.changed().await;
        assert!(jobs.stats(hour).await.is_ok());
        assert_eq!(jobs.loads(), 2, "an action clears the cache");
        assert!(jobs.stats(Duration::ZERO).await.is_ok());
        assert_eq!(jobs.loads(), 3, "a stale entry is read again");
        drop(jobs);
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", path.display()));
        }
    }
}
