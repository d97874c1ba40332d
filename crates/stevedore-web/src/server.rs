//! The web server as a hosted service: bound at start, stopped first, graceful within the budget.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use metrics_exporter_prometheus::PrometheusHandle;
use stevedore::scope::Dependency;
use stevedore::{
    BoxError, BuildError, FromScope, Host, HostBuilder, HostedService, ServiceContext, ServiceSpec, StatusView,
};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::auth::AdminToken;
use crate::handle::HostHandle;
use crate::isolation::BackgroundRuntime;
use crate::jobs::Jobs;

/// Environment variable holding the bearer token that every dashboard action (POST) requires.
pub const ADMIN_TOKEN_ENV: &str = "STEVEDORE_ADMIN_TOKEN";

/// The default request body limit: 64 KiB. Health, metrics and dashboard actions read no body at all.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;

/// Why the web server could not start. The host reports it as the web service's start failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WebError {
    /// The address could not be bound (in use, not local, no permission, does not resolve).
    #[error("cannot listen on `{addr}`: {source}")]
    Bind {
        /// The address as configured.
        addr: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// The server was added to a builder with [`HostBuilder::add`] instead of
    /// [`WebHostExt::build_web`], so it never learned the host's status.
    #[error("the web server was not registered through `build_web`, so it cannot see the host's status")]
    NotAttached,
}

/// An axum [`Router`] served by the host, with health, metrics and the dashboard mounted beside it.
///
/// Register it with [`WebHostExt::build_web`]: it is then the last service, so it starts after every
/// other service has started and, the host stopping in reverse order, stops accepting before any of
/// them stops. In-flight requests finish within the host's shutdown budget.
///
/// ```no_run
/// use axum::{Router, routing::get};
/// use stevedore::{Host, ServiceSpec};
/// use stevedore_web::{HostHandle, WebHostExt, WebServer};
///
/// #[tokio::main]
/// async fn main() {
///     let app = Router::new().route(
///         "/hello",
///         get(|host: HostHandle| async move { format!("host is {}", host.lifetime().state().as_str()) }),
///     );
///     let host = Host::builder()
///         .add(ServiceSpec::from_fn("worker", |ctx| async move {
///             ctx.cancelled().await;
///             Ok::<_, std::convert::Infallible>(())
///         }))
///         .build_web(WebServer::new(app).bind("127.0.0.1:8080"))
///         .expect("a valid host");
///     host.run().await.exit();
/// }
/// ```
pub struct WebServer {
    name: String,
    addr: String,
    router: Router,
    admin_token: TokenSource,
    body_limit: usize,
    health: bool,
    metrics: MetricsSource,
    dashboard: bool,
    isolation: Isolation,
    needs: Vec<Dependency>,
    local_addr: watch::Sender<Option<SocketAddr>>,
    jobs: Option<Arc<Jobs>>,
    jobs_metrics_max_age: Duration,
}

/// Where background services run when this server is hosted.
enum Isolation {
    /// A [`BackgroundRuntime`] made at build, with this many threads (`None`: its default).
    Default { threads: Option<usize> },
    /// The application's own runtime.
    Given(BackgroundRuntime),
    /// On the host's runtime, beside the requests.
    Off,
}

enum TokenSource {
    Env,
    Given(Option<AdminToken>),
}

enum MetricsSource {
    Off,
    Global,
    Given(PrometheusHandle),
}

impl std::fmt::Debug for WebServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .field("body_limit", &self.body_limit)
            .field("health", &self.health)
            .field("dashboard", &self.dashboard)
            .field("jobs", &self.jobs)
            .field(
                "isolation",
                &match &self.isolation {
                    Isolation::Default { threads } => format!("default ({threads:?} threads)"),
                    Isolation::Given(rt) => format!("given ({:?})", rt.priority()),
                    Isolation::Off => "off".to_string(),
                },
            )
            .finish_non_exhaustive()
    }
}

impl WebServer {
    /// Serves `router` (plus `/health`, `/metrics` and `/stevedore`) on `127.0.0.1:8080` by default.
    pub fn new(router: Router) -> Self {
        WebServer {
            name: "web".to_string(),
            addr: "127.0.0.1:8080".to_string(),
            router,
            admin_token: TokenSource::Env,
            body_limit: DEFAULT_BODY_LIMIT,
            health: true,
            metrics: MetricsSource::Global,
            dashboard: true,
            isolation: Isolation::Default { threads: None },
            needs: Vec::new(),
            local_addr: watch::Sender::new(None),
            jobs: None,
            jobs_metrics_max_age: crate::jobs::DEFAULT_METRICS_MAX_AGE,
        }
    }

    /// The address to listen on, e.g. `0.0.0.0:8080` or `127.0.0.1:0` (any free port). Bound at start;
    /// a bind failure fails the host's start, naming the address.
    pub fn bind(mut self, addr: impl Into<String>) -> Self {
        self.addr = addr.into();
        self
    }

    /// The service's name in status, logs and metrics (default `web`).
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Sets the admin token in code instead of reading `STEVEDORE_ADMIN_TOKEN` at start; `None` makes the
    /// dashboard read-only. Only a digest of the token is kept.
    pub fn admin_token(mut self, token: Option<&str>) -> Self {
        self.admin_token = TokenSource::Given(token.and_then(AdminToken::new));
        self
    }

    /// The largest request body an extractor (`Json`, `Bytes`, `String`, `Form`) accepts, for every
    /// route including yours; a route may set its own `DefaultBodyLimit` (default 64 KiB).
    pub fn body_limit(mut self, bytes: usize) -> Self {
        self.body_limit = bytes;
        self
    }

    /// Whether to serve `/health/live` and `/health/ready` (default true).
    pub fn health(mut self, yes: bool) -> Self {
        self.health = yes;
        self
    }

    /// Whether to serve `/metrics` and record HTTP request durations (default true, through the
    /// process-wide recorder that [`install_prometheus`](crate::metrics::install_prometheus) installs).
    pub fn metrics(mut self, yes: bool) -> Self {
        self.metrics = if yes { MetricsSource::Global } else { MetricsSource::Off };
        self
    }

    /// Renders `/metrics` from a Prometheus recorder the application installed itself. Install it
    /// before the host starts, or early run durations go unrecorded (each service takes its
    /// histogram handle at its first finished run).
    pub fn prometheus_handle(mut self, handle: PrometheusHandle) -> Self {
        self.metrics = MetricsSource::Given(handle);
        self
    }

    /// Whether to serve the dashboard at `/stevedore` and its API at `/stevedore/api/` (default true).
    pub fn dashboard(mut self, yes: bool) -> Self {
        self.dashboard = yes;
        self
    }

    /// Threads of the default background runtime (see [`WebHostExt::build_web`]). The default is
    /// half the cores, at least one: 1 on a 2-core machine. Background work then never holds more
    /// than half the cores' worth of threads, while the web runtime keeps one worker per core and,
    /// its threads not being lowered, gets the CPU first; more background threads only add context
    /// switches that requests pay for. Measured with one CPU-bound background task on 2 cores: one
    /// thread at nice 19 kept request p99 at 1.03x its unloaded value, against 1.32x when sharing.
    pub fn background_threads(mut self, threads: usize) -> Self {
        self.isolation = Isolation::Default { threads: Some(threads) };
        self
    }

    /// Runs background services on `runtime` (its threads, priority and name) instead of the
    /// default one. The host keeps a clone until it is dropped after its run.
    pub fn background(mut self, runtime: BackgroundRuntime) -> Self {
        self.isolation = Isolation::Given(runtime);
        self
    }

    /// `false` leaves background services on the host's runtime, beside the requests, as ASP.NET
    /// Core runs them (default `true`). A single service opts out with
    /// [`ServiceSpec::on_host_runtime`] instead.
    pub fn isolation(mut self, yes: bool) -> Self {
        self.isolation = match (yes, self.isolation) {
            (false, _) => Isolation::Off,
            (true, Isolation::Off) => Isolation::Default { threads: None },
            (true, other) => other,
        };
        self
    }

    /// Declares what request handlers take from the host's registry, so that
    /// [`build_web`](WebHostExt::build_web) checks it (registered, with that lifetime, no captive
    /// dependency) instead of the first request that needs it answering 500. axum handlers cannot be
    /// inspected, so undeclared needs are checked at first use only.
    ///
    /// ```
    /// use stevedore::{FromScope, Scoped, Singleton};
    /// use stevedore_web::WebServer;
    ///
    /// struct Db;
    /// struct Config;
    /// let web = WebServer::new(axum::Router::new())
    ///     .needs([Scoped::<Db>::dependency(), Singleton::<Config>::dependency()].into_iter().flatten());
    /// # let _ = web;
    /// ```
    pub fn needs(mut self, dependencies: impl IntoIterator<Item = Dependency>) -> Self {
        self.needs.extend(dependencies);
        self
    }

    /// Declares one handler parameter type, as [`needs`](Self::needs) does:
    /// `.need::<Scoped<Db>>().need::<Singleton<Config>>()`.
    pub fn need<E: FromScope>(self) -> Self {
        self.needs(E::dependency())
    }

    /// Attaches a durable job store (feature `jobs`, on by default): the dashboard gains a Jobs
    /// section (counts per queue and state, dead jobs with their errors, running and waiting
    /// jobs), its API gains `/stevedore/api/jobs...` (retry a dead job, retry all dead, cancel a
    /// job, pause or resume a durable queue, every action behind the admin token), and
    /// `/metrics` gains the `stevedore_jobs` gauges. See the crate docs, section
    /// [Jobs](crate#jobs).
    ///
    /// The store is only read and acted on, never worked: workers run elsewhere (in this host, in
    /// other processes, or both), and a web-only host can watch a store its workers share.
    ///
    /// ```no_run
    /// use stevedore::Host;
    /// use stevedore_jobs::SqliteStore;
    /// use stevedore_web::{WebHostExt, WebServer};
    ///
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = SqliteStore::open("jobs.db").await?; // or PostgresStore, or AnyStore::connect(url)
    /// let web = WebServer::new(axum::Router::new()).jobs(store.clone());
    /// let host = Host::builder()
    ///     .add(stevedore_jobs::Worker::new(store).queue("default", 4).into_service("jobs"))
    ///     .build_web(web)?;
    /// host.run().await.exit();
    /// # }
    /// ```
    #[cfg(feature = "jobs")]
    pub fn jobs<S: stevedore_jobs::JobStore>(mut self, store: S) -> Self {
        self.jobs = Some(Arc::new(Jobs::new(store)));
        self
    }

    /// How old the job counts a `/metrics` scrape serves may be (default 5 s): scrapes within that
    /// time of the last read cost the database nothing. An action on the dashboard refreshes
    /// them at once.
    #[cfg(feature = "jobs")]
    pub fn jobs_metrics_cache(mut self, max_age: Duration) -> Self {
        self.jobs_metrics_max_age = max_age;
        self
    }

    /// The address actually bound, known once the server started (useful with port 0).
    pub fn local_addr(&self) -> LocalAddr {
        LocalAddr(self.local_addr.subscribe())
    }
}

/// The address the server bound, published at start. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LocalAddr(watch::Receiver<Option<SocketAddr>>);

impl LocalAddr {
    /// The bound address, if the server has started.
    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.borrow()
    }

    /// Waits until the server has bound; `None` when the server was dropped without binding (its
    /// host failed to start, say).
    pub async fn wait(&mut self) -> Option<SocketAddr> {
        self.0.wait_for(Option::is_some).await.ok().and_then(|a| *a)
    }
}

/// Builds a host with a [`WebServer`] as its last service.
pub trait WebHostExt {
    /// Adds `web` as the last service and builds the host. Register every other service first.
    ///
    /// Isolation is on by default: every background service's `execute` runs on a
    /// [`BackgroundRuntime`] at nice 19 (see [`WebServer::background_threads`]), so background work
    /// cannot take the CPU from requests. A service registered with
    /// [`ServiceSpec::on_host_runtime`] stays on the host's runtime; [`WebServer::isolation`]`(false)`
    /// turns it off for all; [`WebServer::background`] supplies your own runtime; a runtime already
    /// set with [`HostBuilder::background_runtime`] is kept as is. Start and stop calls always run
    /// on the host's runtime. The host owns the runtime and shuts it down, without blocking, when it
    /// is dropped at the end of [`Host::run`].
    ///
    /// Fails, naming the web service, when the default runtime cannot be built (zero threads, or
    /// the OS refused threads).
    fn build_web(self, web: WebServer) -> Result<Host, BuildError>;
}

impl WebHostExt for HostBuilder {
    fn build_web(mut self, mut web: WebServer) -> Result<Host, BuildError> {
        let name = web.name.clone();
        let isolation = std::mem::replace(&mut web.isolation, Isolation::Off);
        let background = if self.has_background_runtime() {
            None
        } else {
            match isolation {
                Isolation::Off => None,
                Isolation::Given(runtime) => Some(runtime),
                Isolation::Default { threads } => {
                    let mut builder = BackgroundRuntime::builder();
                    if let Some(n) = threads {
                        builder = builder.threads(n);
                    }
                    let runtime = builder
                        .build()
                        .map_err(|e| BuildError::InvalidService { service: name.clone(), reason: e.to_string() })?;
                    Some(runtime)
                }
            }
        };
        if let Some(runtime) = &background {
            self = self.background_runtime(runtime.handle().clone());
        }
        // The recorder goes in before the host is built, so it is there for the first run of every
        // service (each takes its run-duration histogram handle then).
        if matches!(web.metrics, MetricsSource::Global) {
            web.metrics = match crate::metrics::install_prometheus() {
                Ok(handle) => MetricsSource::Given(handle),
                Err(e) => {
                    tracing::warn!(error = %e, "/metrics is not served");
                    MetricsSource::Off
                }
            };
        }
        let needs = std::mem::take(&mut web.needs);
        let status = Arc::new(OnceLock::new());
        let service =
            WebService { config: web, status: status.clone(), running: Mutex::new(None), _background: background };
        let host = self.add(ServiceSpec::hosted(name, service).kind("web").needs(needs)).build()?;
        let _ = status.set(host.status());
        Ok(host)
    }
}

struct WebService {
    config: WebServer,
    status: Arc<OnceLock<StatusView>>,
    running: Mutex<Option<Running>>,
    /// The background runtime, kept alive as long as the host (which owns this service). Dropping
    /// the last clone shuts it down with `shutdown_background`, which never blocks, so the host may
    /// be dropped inside async code.
    _background: Option<BackgroundRuntime>,
}

struct Running {
    shutdown: CancellationToken,
    task: JoinHandle<()>,
}

/// Aborts the server task if the stop is cut off by the shutdown budget.
struct AbortOnDrop(Option<JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

impl WebService {
    fn router(
        &self,
        ctx: &ServiceContext,
        status: StatusView,
        token: Option<AdminToken>,
        metrics: Option<PrometheusHandle>,
    ) -> Router {
        let cfg = &self.config;
        let handle = HostHandle::new(status.clone());
        // One scope per request, for the application's routes only (the built-in ones take nothing
        // from the registry). Inside the metrics layer, so durations include ending the scope and
        // a failed commit is counted as the 500 it becomes.
        let mut app = cfg.router.clone().layer(axum::middleware::from_fn_with_state(ctx.clone(), request_scope));
        if cfg.health {
            app = app.merge(crate::health::routes(status.clone()));
        }
        if let Some(prom) = &metrics {
            let jobs = cfg.jobs.clone().map(|j| (j, cfg.jobs_metrics_max_age));
            app = app.merge(crate::metrics::routes(status.clone(), prom.clone(), jobs));
        }
        if cfg.dashboard {
            app = app.merge(crate::dashboard::routes(status, token, cfg.jobs.clone()));
        }
        app = app.layer(axum::Extension(handle)).layer(DefaultBodyLimit::max(cfg.body_limit));
        if metrics.is_some() {
            app = app.layer(axum::middleware::from_fn(crate::metrics::track_http));
        }
        app
    }
}

/// Opens a scope for the request, and ends it with the response's outcome before the response is
/// sent (see [`stevedore::axum::with_request_scope`]).
async fn request_scope(
    axum::extract::State(ctx): axum::extract::State<ServiceContext>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    stevedore::axum::with_request_scope(&ctx, request, |r| next.run(r)).await
}

impl HostedService for WebService {
    async fn start(&self, ctx: &ServiceContext) -> Result<(), BoxError> {
        let status = self.status.get().cloned().ok_or(WebError::NotAttached)?;
        let cfg = &self.config;
        let listener = TcpListener::bind(cfg.addr.as_str())
            .await
            .map_err(|source| WebError::Bind { addr: cfg.addr.clone(), source })?;
        let local = listener.local_addr().map_err(|source| WebError::Bind { addr: cfg.addr.clone(), source })?;
        let token = match &cfg.admin_token {
            TokenSource::Given(t) => t.clone(),
            TokenSource::Env => AdminToken::from_env(ADMIN_TOKEN_ENV),
        };
        if cfg.dashboard && token.is_none() {
            if local.ip().is_loopback() {
                tracing::info!("no {ADMIN_TOKEN_ENV} set: the dashboard is read-only");
            } else {
                tracing::warn!(
                    address = %local,
                    "listening on a non-loopback address with no {ADMIN_TOKEN_ENV}: the dashboard is read-only \
                     but shows every service to anyone who can reach it"
                );
            }
        }
        let metrics = match &cfg.metrics {
            MetricsSource::Given(h) => Some(h.clone()),
            // `build_web` resolved `Global` already.
            MetricsSource::Off | MetricsSource::Global => None,
        };
        let app = self.router(ctx, status, token, metrics);
        let shutdown = CancellationToken::new();
        let signal = shutdown.clone();
        let lifetime = ctx.lifetime().clone();
        let server = axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .with_graceful_shutdown(signal.clone().cancelled_owned());
        let task = tokio::spawn(async move {
            let result = server.await;
            if !signal.is_cancelled() {
                // The server ended on its own: the host must not go on without its front door.
                match result {
                    Ok(()) => tracing::error!("the web server ended unexpectedly: stopping the host"),
                    Err(e) => tracing::error!(error = %e, "the web server failed: stopping the host"),
                }
                lifetime.request_stop();
            }
        });
        *self.running.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running { shutdown, task });
        cfg.local_addr.send_replace(Some(local));
        tracing::info!(address = %local, "web server listening on http://{local}");
        Ok(())
    }

    async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        let running = self.running.lock().unwrap_or_else(|p| p.into_inner()).take();
        let Some(Running { shutdown, task }) = running else { return Ok(()) };
        tracing::info!("web server: no longer accepting; waiting for in-flight requests");
        shutdown.cancel();
        let mut guard = AbortOnDrop(Some(task));
        if let Some(task) = guard.0.as_mut() {
            task.await.map_err(|e| format!("web server task ended abnormally: {e}"))?;
        }
        guard.0 = None;
        tracing::info!("web server stopped");
        Ok(())
    }
}
