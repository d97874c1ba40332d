//! # stevedore-web
//!
//! Hosts an axum server in the same [`Host`](stevedore::Host) as your background services, and keeps
//! the two apart:
//!
//! - [`WebServer`]: your [`Router`](axum::Router) as a hosted service, registered last by
//!   [`WebHostExt::build_web`]. It binds at start (a bind failure fails the start, naming the
//!   address), starts after every other service, stops first (the host stops in reverse order),
//!   stops accepting at once and lets in-flight requests finish within the shutdown budget. Handlers
//!   reach the host through the [`HostHandle`] extractor, and the host's registered services, scoped
//!   per request, through `Singleton<T>`, `Scoped<T>` and `Transient<T>` (see
//!   [Scoped services per request](#scoped-services-per-request)).
//! - Health: `GET /health/live` (200 while serving) and `GET /health/ready` (200 only when every
//!   service has started, none failed or missed its heartbeat, and no stop was requested; else 503
//!   with JSON naming what is not ready).
//! - Metrics: `GET /metrics` in the Prometheus text format (see [`metrics`]).
//! - A dashboard at `/stevedore` and a JSON API under `/stevedore/api/`: every service and queue,
//!   refreshed live; "run now", pause and resume, each requiring
//!   `Authorization: Bearer $STEVEDORE_ADMIN_TOKEN`.
//! - Durable jobs (feature `jobs`, on by default): [`WebServer::jobs`] puts a
//!   [`stevedore_jobs`] store on the dashboard, its API and `/metrics`, with retry, cancel and
//!   queue pause (see [Jobs](#jobs)).
//! - Isolation, on by default: background services run on their own runtime at nice 19 (see
//!   [Isolation](#isolation)); [`isolation::BackgroundRuntime::run_cpu`] runs CPU-heavy closures off
//!   the async threads with bounded concurrency.
//!
//! ```no_run
//! use axum::{Router, routing::get};
//! use stevedore::{Host, ServiceSpec};
//! use stevedore_web::{WebHostExt, WebServer};
//!
//! #[tokio::main]
//! async fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     let app = Router::new().route("/", get(|| async { "hello" }));
//!     let host = Host::builder()
//!         // runs on the background runtime, at nice 19, because a web server is hosted
//!         .add(ServiceSpec::from_fn("report", |ctx| async move {
//!             ctx.cancelled().await;
//!             Ok::<_, std::convert::Infallible>(())
//!         }))
//!         .build_web(WebServer::new(app).bind("127.0.0.1:8080"))?;
//!     host.run().await.exit();
//! }
//! ```
//!
//! ## Endpoints
//!
//! | route | what |
//! | --- | --- |
//! | `GET /health/live` | 200 while the process serves |
//! | `GET /health/ready` | 200 when ready, else 503; JSON `{"ready", "host", "not_ready": [{"name", "reason"}]}` |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /stevedore` | the dashboard (server-rendered, refreshed every 2 s) |
//! | `GET /stevedore/api/services`, `GET /stevedore/api/services/{name}` | service snapshots as JSON |
//! | `GET /stevedore/api/readiness` | as `/health/ready` |
//! | `POST /stevedore/api/services/{name}/{trigger,pause,resume}` | actions; bearer token required |
//! | `/stevedore/api/jobs...` | durable jobs, with a job store attached (see [Jobs](#jobs)) |
//!
//! Action answers: 200 done; 401 no or wrong token; 403 no token configured (read-only); 404 no
//! such service or action; 409 the service does not offer that action.
//!
//! A runnable round trip: start a host on a free port, ask it whether it is ready, stop it.
//!
//! ```
//! use axum::{Router, routing::get};
//! use stevedore::{Host, ServiceSpec};
//! use stevedore_web::{WebHostExt, WebServer};
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let app = Router::new().route("/hello", get(|| async { "hello" }));
//! let web = WebServer::new(app).bind("127.0.0.1:0"); // any free port
//! let mut bound = web.local_addr();
//! let host = Host::builder()
//!     .handle_signals(false)
//!     .add(ServiceSpec::from_fn("worker", |ctx| async move {
//!         ctx.cancelled().await;
//!         Ok::<_, std::convert::Infallible>(())
//!     }))
//!     .build_web(web)?;
//! let lifetime = host.lifetime();
//! let running = tokio::spawn(host.run());
//! assert!(lifetime.started().await);
//! let addr = bound.wait().await.expect("the server is listening");
//!
//! let mut conn = tokio::net::TcpStream::connect(addr).await?;
//! conn.write_all(b"GET /health/ready HTTP/1.0\r\n\r\n").await?;
//! let mut reply = String::new();
//! conn.read_to_string(&mut reply).await?;
//! assert!(reply.contains(" 200 OK"), "{reply}");
//!
//! lifetime.request_stop();
//! assert!(running.await?.start_error.is_none());
//! # Ok(()) }
//! ```
//!
//! ## Scoped services per request
//!
//! Request handlers take [`Singleton<T>`](stevedore::Singleton), [`Scoped<T>`](stevedore::Scoped)
//! and [`Transient<T>`](stevedore::Transient) as axum extractors, resolved from the registry given
//! with `HostBuilder::services`. Every request to your routes gets its own
//! [`Scope`](stevedore::Scope): a scoped value is made on first use, shared by every extractor of
//! that request and never by two requests, and ended once the handler has answered: with
//! `Succeeded` for a status below 400, `Failed` otherwise, so a scoped transaction commits on 2xx
//! and 3xx and rolls back on 4xx and 5xx.
//!
//! ```no_run
//! use axum::{Router, extract::Path, http::StatusCode, routing::post};
//! use sqlx::{Sqlite, SqlitePool, Transaction};
//! use stevedore::{BoxError, Host, RunOutcome, Scoped, ServiceCollection, Singleton};
//! use stevedore_web::{WebHostExt, WebServer};
//!
//! struct Tx(Transaction<'static, Sqlite>);
//!
//! async fn hire(Path(name): Path<String>, tx: Scoped<Tx>) -> Result<StatusCode, StatusCode> {
//!     let mut tx = tx.lock().await;
//!     sqlx::query("INSERT INTO employees (name) VALUES (?)")
//!         .bind(name)
//!         .execute(&mut *tx.0)
//!         .await
//!         .map_err(|_| StatusCode::INTERNAL_SERVER_ERROR)?; // rolled back
//!     Ok(StatusCode::CREATED) // committed before the client sees the 201
//! }
//!
//! # async fn demo(pool: SqlitePool) -> Result<(), Box<dyn std::error::Error>> {
//! let services = ServiceCollection::new().singleton_value(pool).scoped_with_end(
//!     |pool: Singleton<SqlitePool>| async move { Ok::<_, BoxError>(Tx(pool.begin().await?)) },
//!     |tx: Tx, outcome: RunOutcome| async move {
//!         match outcome {
//!             RunOutcome::Succeeded => tx.0.commit().await,
//!             _ => tx.0.rollback().await,
//!         }
//!     },
//! );
//! let app = Router::new().route("/employees/{name}", post(hire));
//! let web = WebServer::new(app).need::<Scoped<Tx>>(); // checked by build_web
//! let host = Host::builder().services(services).build_web(web)?;
//! host.run().await.exit();
//! # }
//! ```
//!
//! - The scope ends before the response is sent. An end hook that fails (a commit refused) is logged
//!   with the request's method and path and the client gets a 500 instead of the handler's answer,
//!   never a success for work that was not kept. A streaming body must not hold a scoped value.
//! - A request dropped mid-handler (the client went away, the shutdown budget ran out) has its
//!   scope ended as `Failed` in the background.
//! - A parameter that cannot be provided (not registered, another lifetime, a failing factory) is a
//!   500 whose body names its type, e.g. `Scoped<Tx>`; the reason goes to the log only.
//! - axum handlers cannot be inspected, so their needs are checked at first use. Declare them with
//!   [`WebServer::need`] or [`WebServer::needs`] to have `build_web` check them with the rest of the
//!   graph (registered, same lifetime, no captive dependency).
//! - The built-in routes (health, metrics, dashboard) open no scope. The scope belongs to the web
//!   service: its `ServiceContext` and `CancellationToken` are the web server's, cancelled when the
//!   server stops.
//! - Outside a `WebServer`, wrap a router with `stevedore::axum::with_request_scope` (core feature
//!   `axum`).
//!
//! ## Jobs
//!
//! With feature `jobs` (on by default; `default-features = false` drops it, and with it
//! stevedore-jobs and sqlx), [`WebServer::jobs`] attaches a durable job store: a
//! [`SqliteStore`](stevedore_jobs::SqliteStore), a [`PostgresStore`](stevedore_jobs::PostgresStore),
//! or an [`AnyStore`](stevedore_jobs::AnyStore) chosen by URL. The web server only reads the store
//! and acts on it; workers run wherever they run (in this host, in other processes, or both), so a
//! web-only process can watch a cluster's store.
//!
//! ```no_run
//! use axum::Router;
//! use stevedore::Host;
//! use stevedore_jobs::AnyStore;
//! use stevedore_web::{WebHostExt, WebServer};
//!
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! let store = AnyStore::connect("postgres://localhost/app").await?;
//! let web = WebServer::new(Router::new()).bind("0.0.0.0:8080").jobs(store);
//! Host::builder().build_web(web)?.run().await.exit();
//! # }
//! ```
//!
//! The dashboard's Jobs section, refreshed live with the rest:
//! - every durable queue with its counts per state (available: due now; scheduled: waiting for
//!   its time or a retry's backoff; running; completed; dead; cancelled) and whether it is paused;
//! - the 50 oldest dead jobs: id, queue, kind, attempts, when they died and their last error;
//!   opening a row fetches every attempt's error, and it stays open across refreshes;
//! - the 20 oldest running and 20 oldest waiting jobs;
//! - with the admin token: retry a dead job, retry all dead (or a queue's), cancel a running or
//!   waiting job, pause or resume a durable queue. Pausing here is durable and stops every
//!   worker of every process from fetching that queue (running jobs finish); the Queues section's
//!   pause only pauses the worker service of this host.
//!
//! | route | what |
//! | --- | --- |
//! | `GET /stevedore/api/jobs` | `{"backend", "queues": [{"queue", "paused", "available", "scheduled", "running", "completed", "dead", "cancelled"}]}` |
//! | `GET /stevedore/api/jobs/list?state=&queue=&after=&limit=` | jobs by id, each with `errors` (`[{"attempt", "at", "error"}]`) and `last_error`; `after` is the last id seen, `limit` 1 to 500 (default 100) |
//! | `GET /stevedore/api/jobs/{id}` | one job |
//! | `POST /stevedore/api/jobs/{id}/retry` | a dead or cancelled job back to available, with a fresh set of attempts (its errors are kept) |
//! | `POST /stevedore/api/jobs/{id}/cancel` | cancel an available or running job |
//! | `POST /stevedore/api/jobs/retry-dead` | every dead job back to available; answers `{"retried": n}` |
//! | `POST /stevedore/api/jobs/queues/{queue}/{pause,resume,retry-dead}` | one durable queue |
//!
//! Every POST needs the admin token, exactly as the service actions do (401, 403 when read-only).
//! Other answers: 404 no such job, queue (the store has no job in it and never paused it) or
//! action; 409 the job is not in a state the action applies to (the body names its state); 400
//! an unknown `state`; 503 the store failed or did not answer within 5 s (the body names the
//! store and the operation), while the rest of the dashboard goes on working.
//!
//! - Payloads are the application's data: `payload` is in a job's JSON only for a request that
//!   carries the admin token, and never on the page.
//! - The page and the API read counts and lists through a cache of one second, shared by every
//!   open dashboard; an action clears it.
//! - `/metrics` reads the counts at scrape time through a cache of 5 s by default
//!   ([`WebServer::jobs_metrics_cache`]), so frequent scrapes and several Prometheus servers cost
//!   one `GROUP BY` per period. Gauges: `stevedore_jobs{queue, state}`,
//!   `stevedore_jobs_queue_paused{queue}`, `stevedore_jobs_store_up` (see [`metrics`]).
//!
//! ## Isolation
//!
//! Hosted services share the web application's process, and in ASP.NET Core its thread pool too,
//! so a CPU-heavy background job slows every request. Here, when [`WebHostExt::build_web`] hosts a
//! server, every background service's `execute` runs on a separate
//! [`BackgroundRuntime`](isolation::BackgroundRuntime) whose threads run at nice 19: the kernel
//! gives request threads the CPU first and background work the rest, and an idle web server leaves
//! it all to the background.
//!
//! - Threads: [`WebServer::background_threads`] (default half the cores, at least one: 1 on a
//!   2-core machine; the method's docs say why).
//! - Your own runtime (another priority, name, or [`run_cpu`](isolation::BackgroundRuntime::run_cpu)
//!   from handlers): [`WebServer::background`].
//! - Opting out: one service with [`ServiceSpec::on_host_runtime`](stevedore::ServiceSpec::on_host_runtime)
//!   (latency-sensitive work that must not run at a lowered priority), or all with
//!   [`WebServer::isolation`]`(false)`.
//! - Start and stop calls, and the web server itself, run on the host's runtime.
//! - The host owns the runtime and shuts it down, without blocking, when it is dropped after its
//!   run; services that outlived the shutdown budget are dropped with it.
//! - A runtime already set with `HostBuilder::background_runtime` is kept as is.
//!
//! Choices made where the issue is silent:
//! - The server listens on `127.0.0.1:8080` unless told otherwise; the admin token is read from the
//!   environment at start, only its SHA-256 digest is kept, and a blank token counts as none.
//! - Liveness never looks at services (a failed dependency is a readiness matter, not a reason to
//!   restart the process); readiness is exactly [`StatusView::readiness`](stevedore::StatusView::readiness).
//! - Request bodies are limited to 64 KiB by default through axum's `DefaultBodyLimit`, which every
//!   body extractor honours; a route can set its own.
//! - HTTP durations are labelled by route template, never by raw path, to bound cardinality.
//! - Background threads default to nice 19 rather than `SCHED_IDLE`: measured here, `SCHED_IDLE`
//!   gave a worse request p99.
#![deny(missing_docs)]

mod auth;
mod dashboard;
mod handle;
mod health;
pub mod isolation;
#[cfg_attr(not(feature = "jobs"), path = "jobs_off.rs")]
mod jobs;
pub mod metrics;
mod server;

pub use handle::HostHandle;
pub use server::{ADMIN_TOKEN_ENV, DEFAULT_BODY_LIMIT, LocalAddr, WebError, WebHostExt, WebServer};
