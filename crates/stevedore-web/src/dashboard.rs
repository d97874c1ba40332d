//! The dashboard at `/stevedore` and its JSON API at `/stevedore/api/`.
//!
//! The page is rendered on the server; a small inline script swaps in a fresh rendering of the live
//! section every two seconds (from `/stevedore/live`, the same renderer) and sends the actions. With
//! JavaScript off the page still shows everything, refreshed by reloading. The script's URLs are
//! relative, so the page also works behind a reverse proxy that mounts it under a prefix.
//!
//! Actions are POSTs under `/stevedore/api/services/{name}/{trigger|pause|resume}` and require
//! `Authorization: Bearer <STEVEDORE_ADMIN_TOKEN>`: 401 without it or with a wrong token, 403 when
//! no token is configured (read-only), 404 for an unknown service, 409 when the service does not
//! offer the action. The page keeps the token the operator types in the tab's session storage only.
//! Browsers never attach an `Authorization` header on their own, so another site cannot make a
//! logged-in operator's browser act (no CSRF).
//!
//! With a job store attached, the live section also renders the Jobs section and the API gains
//! `/stevedore/api/jobs...` (see `jobs.rs`); job buttons carry their API URL in `data-post`.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Serialize;
use stevedore::{ControlError, ServiceStatus, StatusView};

use crate::auth::{Access, AdminToken, check};
use crate::health::ReadinessJson;
use crate::jobs::Jobs;

#[derive(Clone)]
struct Dash {
    status: StatusView,
    token: Option<Arc<AdminToken>>,
    jobs: Option<Arc<Jobs>>,
}

pub(crate) fn routes(status: StatusView, token: Option<AdminToken>, jobs: Option<Arc<Jobs>>) -> Router {
    let token = token.map(Arc::new);
    let state = Dash { status, token: token.clone(), jobs: jobs.clone() };
    let mut router = Router::new()
        .route("/stevedore", get(page))
        .route("/stevedore/live", get(live))
        .route("/stevedore/api/services", get(services))
        .route("/stevedore/api/services/{name}", get(service))
        .route("/stevedore/api/readiness", get(readiness))
        .route("/stevedore/api/services/{name}/{action}", post(act))
        .with_state(state);
    if let Some(jobs) = jobs {
        router = router.merge(crate::jobs::routes(jobs, token));
    }
    router
}

// ---- JSON API ----

/// One service, as the API serves it. Times are RFC 3339 in UTC; durations in milliseconds.
#[derive(Debug, Serialize)]
pub(crate) struct ServiceJson {
    name: String,
    kind: &'static str,
    state: &'static str,
    since: String,
    healthy: bool,
    restarts: u32,
    last_error: Option<String>,
    runs: RunsJson,
    queue: Option<QueueJson>,
    heartbeat_interval_ms: Option<u128>,
    since_heartbeat_ms: Option<u128>,
    can_trigger: bool,
    can_pause: bool,
}

#[derive(Debug, Serialize)]
struct RunsJson {
    started: u64,
    succeeded: u64,
    failed: u64,
    skipped: u64,
    in_flight: u64,
    last_started: Option<String>,
    last_duration_ms: Option<f64>,
    last_outcome: Option<&'static str>,
    last_run_error: Option<String>,
    next_run: Option<String>,
}

#[derive(Debug, Serialize)]
struct QueueJson {
    depth: u64,
    in_flight: u64,
    failed: u64,
    paused: bool,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&ServiceStatus> for ServiceJson {
    fn from(s: &ServiceStatus) -> Self {
        ServiceJson {
            name: s.name.clone(),
            kind: s.kind,
            state: s.state.as_str(),
            since: rfc3339(s.since),
            healthy: s.is_healthy(),
            restarts: s.restarts,
            last_error: s.last_error.clone(),
            runs: RunsJson {
                started: s.runs.started,
                succeeded: s.runs.succeeded,
                failed: s.runs.failed,
                skipped: s.runs.skipped,
                in_flight: s.runs.in_flight,
                last_started: s.runs.last_started.map(rfc3339),
                last_duration_ms: s.runs.last_duration.map(|d| d.as_secs_f64() * 1000.0),
                last_outcome: s.runs.last_outcome.map(|o| o.as_str()),
                last_run_error: s.runs.last_run_error.clone(),
                next_run: s.runs.next_run.map(rfc3339),
            },
            queue: s.queue.as_ref().map(|q| QueueJson {
                depth: q.depth,
                in_flight: q.in_flight,
                failed: q.failed,
                paused: q.paused,
            }),
            heartbeat_interval_ms: s.heartbeat_interval.map(|d| d.as_millis()),
            since_heartbeat_ms: s.since_heartbeat.map(|d| d.as_millis()),
            can_trigger: s.can_trigger,
            can_pause: s.can_pause,
        }
    }
}

async fn services(State(d): State<Dash>) -> Json<Vec<ServiceJson>> {
    Json(d.status.services().iter().map(ServiceJson::from).collect())
}

async fn service(State(d): State<Dash>, Path(name): Path<String>) -> Response {
    match d.status.service(&name) {
        Some(s) => Json(ServiceJson::from(&s)).into_response(),
        None => error(StatusCode::NOT_FOUND, format!("no service is named `{name}`")),
    }
}

async fn readiness(State(d): State<Dash>) -> Response {
    let r = d.status.readiness();
    let code = if r.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(ReadinessJson::from(&r))).into_response()
}

pub(crate) fn error(code: StatusCode, message: String) -> Response {
    (code, Json(serde_json::json!({ "error": message }))).into_response()
}

/// The bearer-token check every action (POST) goes through: `Some` is the refusal to send, 403
/// when no token is configured (read-only), 401 with `WWW-Authenticate: Bearer` when the header is
/// missing or the token wrong. `what` names the action in the warning logged for a refusal (never
/// the token presented).
pub(crate) fn refusal(token: Option<&AdminToken>, headers: &HeaderMap, what: &str) -> Option<Response> {
    match check(token, headers) {
        Access::Granted => None,
        Access::ReadOnly => Some(error(
            StatusCode::FORBIDDEN,
            format!("the dashboard is read-only: set {} to allow actions", crate::ADMIN_TOKEN_ENV),
        )),
        denied @ (Access::Missing | Access::Wrong) => {
            let message = if denied == Access::Missing {
                "an `Authorization: Bearer <token>` header is required"
            } else {
                "the bearer token is not the admin token"
            };
            tracing::warn!(action = %what, "dashboard action refused: {message}");
            let mut response = error(StatusCode::UNAUTHORIZED, message.to_string());
            response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            Some(response)
        }
    }
}

async fn act(State(d): State<Dash>, Path((name, action)): Path<(String, String)>, headers: HeaderMap) -> Response {
    if let Some(refused) = refusal(d.token.as_deref(), &headers, &format!("{action} service {name}")) {
        return refused;
    }
    let result = match action.as_str() {
        "trigger" => d.status.trigger(&name),
        "pause" => d.status.pause(&name),
        "resume" => d.status.resume(&name),
        other => {
            return error(StatusCode::NOT_FOUND, format!("unknown action `{other}`: use trigger, pause or resume"));
        }
    };
    match result {
        Ok(()) => {
            tracing::info!(service = %name, action = %action, "dashboard action");
            (StatusCode::OK, Json(serde_json::json!({ "ok": true, "service": name, "action": action }))).into_response()
        }
        Err(e @ ControlError::UnknownService(_)) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e) => error(StatusCode::CONFLICT, e.to_string()),
    }
}

// ---- HTML ----

async fn page(State(d): State<Dash>) -> Html<String> {
    let mut html = String::with_capacity(8192);
    html.push_str(HEAD);
    let _ = write!(
        html,
        r#"<p class="mode">{}</p>"#,
        if d.token.is_some() {
            r#"Actions need the admin token: <input id="token" type="password" placeholder="admin token" autocomplete="off">"#
        } else {
            "Read-only: set STEVEDORE_ADMIN_TOKEN to enable actions."
        }
    );
    html.push_str(r#"<p id="message" role="status"></p><div id="live">"#);
    render_live(&d, &mut html).await;
    html.push_str("</div>");
    html.push_str(SCRIPT);
    html.push_str("</body></html>");
    Html(html)
}

async fn live(State(d): State<Dash>) -> Response {
    let mut html = String::with_capacity(4096);
    render_live(&d, &mut html).await;
    ([(header::CACHE_CONTROL, "no-store")], Html(html)).into_response()
}

/// The part of the page the script refreshes: host, services, queues and, with a job store, jobs.
async fn render_live(d: &Dash, html: &mut String) {
    let actions = d.token.is_some();
    render_services(&d.status, actions, html);
    if let Some(jobs) = &d.jobs {
        jobs.render(actions, html).await;
    }
}

fn render_services(status: &StatusView, actions: bool, html: &mut String) {
    let readiness = status.readiness();
    let _ = write!(
        html,
        r#"<p class="host">Host <b id="host-state">{}</b> &middot; <span class="{}">{}</span></p>"#,
        readiness.host.as_str(),
        if readiness.ready { "ok" } else { "bad" },
        if readiness.ready { "ready" } else { "not ready" },
    );
    let services = status.services();
    html.push_str(
        "<h2>Services</h2><table id=\"services\"><thead><tr><th>Service</th><th>Kind</th><th>State</th>\
         <th>Runs</th><th>Failed</th><th>Last run</th><th>Duration</th><th>Next run</th><th>Restarts</th>\
         <th>Last error</th><th></th></tr></thead><tbody>",
    );
    let now = SystemTime::now();
    for s in &services {
        let healthy = s.is_healthy();
        let _ = write!(
            html,
            r#"<tr data-service="{name}"><td class="name">{name}</td><td>{kind}</td><td class="state {cls}">{state}</td><td class="runs">{runs}</td><td>{failed}</td><td>{last}</td><td>{dur}</td><td>{next}</td><td>{restarts}</td><td class="err">{err}</td><td>"#,
            name = escape(&s.name),
            kind = escape(s.kind),
            cls = if healthy { "ok" } else { "bad" },
            state = s.state.as_str(),
            runs = s.runs.started,
            failed = s.runs.failed,
            last = s.runs.last_started.map(|t| ago(now, t)).unwrap_or_else(|| "&ndash;".into()),
            dur = s.runs.last_duration.map(short).unwrap_or_else(|| "&ndash;".into()),
            next = s.runs.next_run.map(|t| until(now, t)).unwrap_or_else(|| "&ndash;".into()),
            restarts = s.restarts,
            err = escape(s.runs.last_run_error.as_deref().or(s.last_error.as_deref()).unwrap_or("")),
        );
        if actions && s.can_trigger {
            let _ = write!(html, r#"<button data-action="trigger" data-name="{}">Run now</button>"#, escape(&s.name));
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");
    let queues: Vec<_> = services.iter().filter(|s| s.queue.is_some()).collect();
    html.push_str("<h2>Queues</h2>");
    if queues.is_empty() {
        html.push_str("<p>No queues.</p>");
        return;
    }
    html.push_str(
        "<table id=\"queues\"><thead><tr><th>Queue</th><th>Depth</th><th>In flight</th><th>Failed</th>\
         <th>State</th><th></th></tr></thead><tbody>",
    );
    for s in queues {
        let Some(q) = &s.queue else { continue };
        let _ = write!(
            html,
            r#"<tr data-queue="{name}"><td>{name}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>"#,
            q.depth,
            q.in_flight,
            q.failed,
            if q.paused { "paused" } else { "running" },
            name = escape(&s.name),
        );
        if actions && s.can_pause {
            let (action, label) = if q.paused { ("resume", "Resume") } else { ("pause", "Pause") };
            let _ = write!(html, r#"<button data-action="{action}" data-name="{}">{label}</button>"#, escape(&s.name));
        }
        html.push_str("</td></tr>");
    }
    html.push_str("</tbody></table>");
}

fn short(d: Duration) -> String {
    if d < Duration::from_millis(1) {
        format!("{}&micro;s", d.as_micros())
    } else if d < Duration::from_secs(1) {
        format!("{} ms", d.as_millis())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

pub(crate) fn ago(now: SystemTime, t: SystemTime) -> String {
    match now.duration_since(t) {
        Ok(d) => format!("{} ago", coarse(d)),
        Err(_) => "just now".to_string(),
    }
}

pub(crate) fn until(now: SystemTime, t: SystemTime) -> String {
    match t.duration_since(now) {
        Ok(d) => format!("in {}", coarse(d)),
        Err(_) => "due".to_string(),
    }
}

fn coarse(d: Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => "<1 s".replace('<', "&lt;"),
        1..=119 => format!("{s} s"),
        120..=7199 => format!("{} min", s / 60),
        _ => format!("{} h", s / 3600),
    }
}

/// Escapes text for HTML element content and quoted attribute values.
pub(crate) fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const HEAD: &str = r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>Stevedore</title>
<style>
body{font:14px/1.4 system-ui,sans-serif;margin:1.5rem;color:#222}
h1{font-size:1.4rem;margin:0 0 .5rem}h2{font-size:1.1rem;margin:1.2rem 0 .4rem}
table{border-collapse:collapse;width:100%}th,td{padding:.3rem .5rem;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}.ok{color:#1a7f37}.bad{color:#c62828;font-weight:600}.err{color:#c62828;max-width:28rem}
button{cursor:pointer}#message{min-height:1.2em;color:#555}h3{font-size:1rem;margin:1rem 0 .3rem}
small{color:#666;font-weight:normal}details ol{margin:.3rem 0;padding-left:1.2rem;white-space:pre-wrap}
</style></head><body><h1>Stevedore</h1>"#;

const SCRIPT: &str = r#"<script>
(function(){
  var live=document.getElementById('live'), msg=document.getElementById('message'), tok=document.getElementById('token');
  if(tok){tok.value=sessionStorage.getItem('stevedore-token')||'';tok.addEventListener('input',function(){sessionStorage.setItem('stevedore-token',tok.value);});}
  var opened={};
  function refresh(){fetch('stevedore/live',{cache:'no-store'}).then(function(r){return r.ok?r.text():null;}).then(function(h){
    if(h===null){return;}
    live.innerHTML=h;
    Object.keys(opened).forEach(function(id){
      var d=live.querySelector('details[data-errors="'+id+'"]');
      if(!d){delete opened[id];return;}
      d.querySelector('.attempts-list').replaceChildren(opened[id]);d.open=true;
    });
  }).catch(function(){});}
  function post(url,label){
    fetch(url,{method:'POST',headers:{'Authorization':'Bearer '+(tok?tok.value:'')}})
      .then(function(r){return r.json().then(function(j){msg.textContent=r.ok?(label+': done'):(label+': '+j.error);});})
      .catch(function(err){msg.textContent=String(err);}).then(refresh);
  }
  live.addEventListener('click',function(e){
    var p=e.target.closest('button[data-post]');
    if(p){var c=p.getAttribute('data-confirm'); if(!c||window.confirm(c)){post(p.getAttribute('data-post'),p.getAttribute('data-label'));} return;}
    var b=e.target.closest('button[data-action]'); if(!b){return;}
    var name=b.getAttribute('data-name'), action=b.getAttribute('data-action');
    post('stevedore/api/services/'+encodeURIComponent(name)+'/'+action,action+' '+name);
  });
  // A dead job's attempt errors are fetched when its row is opened, and kept open across refreshes.
  live.addEventListener('toggle',function(e){
    var d=e.target, id=d.getAttribute&&d.getAttribute('data-errors'); if(!id){return;}
    if(!d.open){delete opened[id];return;}
    if(opened[id]){return;}
    fetch('stevedore/api/jobs/'+id,{cache:'no-store'}).then(function(r){return r.ok?r.json():null;}).then(function(j){
      if(!j){return;}
      var ol=document.createElement('ol');
      j.errors.forEach(function(a){var li=document.createElement('li');li.textContent='attempt '+a.attempt+' at '+a.at+': '+a.error;ol.appendChild(li);});
      opened[id]=ol;
      var box=live.querySelector('details[data-errors="'+id+'"] .attempts-list'); if(box){box.replaceChildren(ol);}
    }).catch(function(){});
  },true);
  setInterval(refresh,2000);
})();
</script>"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_markup() {
        assert_eq!(escape(r#"<b a="x">&'"#), "&lt;b a=&quot;x&quot;&gt;&amp;&#39;");
    }
}
