//! The host: builds, starts, supervises and stops every registered service.

use std::collections::{HashSet, VecDeque};
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::join_all;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::BoxError;
use crate::error::{BuildError, StartError};
use crate::lifetime::{AppLifetime, HostState, StopReason};
use crate::report::{RunReport, ServiceReport};
use crate::scope::ServiceCollection;
use crate::service::{ContextParts, DynHosted, Execute, Hook, ServiceContext, ServiceSpec, Work};
use crate::shutdown::{ShutdownOptions, spawn_signal_listener};
use crate::status::{ServiceState, StatusHandle, StatusView};
use crate::supervision::{OnFailure, RestartPolicy};

/// Builds a [`Host`]: register services, set the shutdown budget, then [`build`](Self::build).
///
/// ```no_run
/// use std::time::Duration;
/// use stevedore::{Host, ServiceSpec};
///
/// #[tokio::main]
/// async fn main() {
///     let host = Host::builder()
///         .shutdown_timeout(Duration::from_secs(10))
///         .add(ServiceSpec::from_fn("worker", |ctx| async move {
///             ctx.cancelled().await;
///             Ok::<_, std::convert::Infallible>(())
///         }))
///         .build()
///         .expect("valid host");
///     host.run().await.exit();
/// }
/// ```
#[derive(Debug)]
pub struct HostBuilder {
    services: Vec<ServiceSpec>,
    shutdown: ShutdownOptions,
    startup_timeout: Option<Duration>,
    start_concurrently: bool,
    handle_signals: bool,
    read_env: bool,
    lifetime: AppLifetime,
    registry: ServiceCollection,
    background: Option<tokio::runtime::Handle>,
}

impl Default for HostBuilder {
    fn default() -> Self {
        HostBuilder {
            services: Vec::new(),
            shutdown: ShutdownOptions::default(),
            startup_timeout: None,
            start_concurrently: false,
            handle_signals: true,
            read_env: true,
            lifetime: AppLifetime::new(),
            registry: ServiceCollection::new(),
            background: None,
        }
    }
}

impl HostBuilder {
    /// Registers a service. Services start in registration order and stop in reverse.
    #[allow(clippy::should_implement_trait)] // a builder step, not arithmetic
    pub fn add(mut self, service: ServiceSpec) -> Self {
        self.services.push(service);
        self
    }

    /// The registry handlers resolve their parameters from; checked whole at [`build`](Self::build),
    /// and its singletons are made when the host starts, before any service.
    pub fn services(mut self, services: ServiceCollection) -> Self {
        self.registry = services;
        self
    }

    /// Runs every background service's `execute` on this runtime instead of the host's own, so that
    /// background work cannot take threads from request handling (stevedore-web passes a runtime whose
    /// threads run at a lowered OS priority). Services registered with
    /// [`ServiceSpec::on_host_runtime`] stay on the host's runtime. Start/stop calls always run on the
    /// host's runtime.
    pub fn background_runtime(mut self, handle: tokio::runtime::Handle) -> Self {
        self.background = Some(handle);
        self
    }

    /// Whether a background runtime is set.
    pub fn has_background_runtime(&self) -> bool {
        self.background.is_some()
    }

    /// The one budget for the whole stop (default 5 s). `STEVEDORE_SHUTDOWN_TIMEOUT` overrides it.
    pub fn shutdown_timeout(mut self, timeout: Duration) -> Self {
        self.shutdown.timeout = timeout;
        self
    }

    /// A wait between a stop request and the stop (default none). `STEVEDORE_SHUTDOWN_DELAY` overrides it.
    pub fn shutdown_delay(mut self, delay: Duration) -> Self {
        self.shutdown.delay = delay;
        self
    }

    /// A limit on the whole start (default none: starts may take as long as they need).
    pub fn startup_timeout(mut self, timeout: Duration) -> Self {
        self.startup_timeout = Some(timeout);
        self
    }

    /// Start services all at once instead of in registration order.
    pub fn start_concurrently(mut self, yes: bool) -> Self {
        self.start_concurrently = yes;
        self
    }

    /// Stop services all at once instead of in reverse registration order.
    pub fn stop_concurrently(mut self, yes: bool) -> Self {
        self.shutdown.concurrent = yes;
        self
    }

    /// Whether SIGINT, SIGTERM and SIGQUIT stop the host (default true). Tests and embedders turn it off.
    pub fn handle_signals(mut self, yes: bool) -> Self {
        self.handle_signals = yes;
        self
    }

    /// Whether `STEVEDORE_SHUTDOWN_TIMEOUT` and `STEVEDORE_SHUTDOWN_DELAY` override the values set in
    /// code (default true, so operators can change them without a rebuild).
    pub fn read_env(mut self, yes: bool) -> Self {
        self.read_env = yes;
        self
    }

    /// The lifetime the host will have: hand it to code that must await or request a stop before
    /// the host is built.
    pub fn lifetime(&self) -> AppLifetime {
        self.lifetime.clone()
    }

    /// Checks every registration and setting; nothing starts here.
    pub fn build(self) -> Result<Host, BuildError> {
        let mut shutdown = self.shutdown;
        if self.read_env {
            shutdown.apply_env()?;
        }
        let mut names = HashSet::with_capacity(self.services.len());
        for spec in &self.services {
            if spec.name.trim().is_empty() {
                return Err(BuildError::EmptyName);
            }
            if !names.insert(spec.name.as_str()) {
                return Err(BuildError::DuplicateName(spec.name.clone()));
            }
            if let Some(reason) = spec.extras.as_ref().and_then(|e| e.error.as_ref()) {
                return Err(BuildError::InvalidService { service: spec.name.clone(), reason: reason.clone() });
            }
            let needs = spec.extras.as_ref().map(|e| e.needs.as_slice()).unwrap_or_default();
            self.registry.validate(&spec.name, needs)?;
        }
        self.registry.validate_all()?;
        let container = self.registry.into_container();
        let lifetime = self.lifetime;
        // Every service is registered at the same moment: one clock read for all of them.
        let now = (std::time::SystemTime::now(), Instant::now());
        // Stopping one by one, a background service after a background service hands the stop on
        // from its own task (see `ServiceContext::pass_stop_on`).
        let mut previous_background: Option<CancellationToken> = None;
        let entries: Vec<Entry> = self
            .services
            .into_iter()
            .map(|spec| {
                let extras = spec.extras.map(|e| *e).unwrap_or_default();
                let token = CancellationToken::new();
                let background = matches!(spec.work, Work::Background(_));
                let stop_next = if background && !shutdown.concurrent { previous_background.take() } else { None };
                previous_background = background.then(|| token.clone());
                let parts = ContextParts { token, lifetime: lifetime.clone(), container: container.clone(), stop_next };
                let status = StatusHandle::new(spec.name, spec.kind, extras.heartbeat, now, parts);
                if let Some(control) = extras.control {
                    status.set_control(control);
                }
                let ctx = ServiceContext::of(status);
                Entry {
                    work: spec.work,
                    ignore_failures: extras.on_failure == OnFailure::Ignore,
                    policy: Policy::from(extras.on_failure),
                    ctx,
                    task: None,
                    stop_task: None,
                    started: false,
                    had_time: true,
                    stop_done: false,
                    on_host_runtime: extras.on_host_runtime,
                }
            })
            .collect();
        let status = StatusView::new(entries.iter().map(|e| e.ctx.status().clone()).collect(), lifetime.clone());
        let parts =
            ContextParts { token: CancellationToken::new(), lifetime: lifetime.clone(), container, stop_next: None };
        let root = ServiceContext::of(StatusHandle::new("singletons".into(), "registry", None, now, parts));
        Ok(Host {
            root,
            entries,
            background: self.background,
            shutdown,
            startup_timeout: self.startup_timeout,
            start_concurrently: self.start_concurrently,
            handle_signals: self.handle_signals,
            lifetime,
            status,
        })
    }
}

struct Entry {
    work: Work,
    /// The failure policy, until the service's task takes it over at the start.
    policy: Policy,
    /// Whether its failures are ignored (they then do not count toward the exit code).
    ignore_failures: bool,
    /// The service's context, and through it its status.
    ctx: ServiceContext,
    task: Option<JoinHandle<()>>,
    /// A start/stop service's running `stop`.
    stop_task: Option<JoinHandle<Result<(), String>>>,
    started: bool,
    /// Whether the budget had time left when its turn to stop came.
    had_time: bool,
    /// Whether its stop finished within the budget.
    stop_done: bool,
    /// Whether its background task stays on the host's runtime when a background runtime is set.
    on_host_runtime: bool,
}

impl Entry {
    fn name(&self) -> &str {
        self.ctx.name()
    }
}

/// A built host, ready to [`run`](Self::run).
pub struct Host {
    /// Context used to make the singletons at start.
    root: ServiceContext,
    entries: Vec<Entry>,
    /// Where background services run, when not on the host's runtime.
    background: Option<tokio::runtime::Handle>,
    shutdown: ShutdownOptions,
    startup_timeout: Option<Duration>,
    start_concurrently: bool,
    handle_signals: bool,
    lifetime: AppLifetime,
    status: StatusView,
}

impl std::fmt::Debug for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Host")
            .field("services", &self.entries.iter().map(Entry::name).collect::<Vec<_>>())
            .field("shutdown", &self.shutdown)
            .finish_non_exhaustive()
    }
}

impl Host {
    /// Starts building a host.
    pub fn builder() -> HostBuilder {
        HostBuilder::default()
    }

    /// The host's lifetime handle.
    pub fn lifetime(&self) -> AppLifetime {
        self.lifetime.clone()
    }

    /// A cheap, cloneable view of every service's state.
    pub fn status(&self) -> StatusView {
        self.status.clone()
    }

    /// The shutdown settings in force (after environment overrides).
    pub fn shutdown_options(&self) -> &ShutdownOptions {
        &self.shutdown
    }

    /// Starts every service, runs until a stop is requested (signal, [`AppLifetime::request_stop`], or
    /// a failed service), then stops every service within the shutdown budget.
    ///
    /// The start runs in the caller's task; the wait and the stop run as a task of their own (aborted
    /// if this future is dropped). Under `#[tokio::main]` the caller is the thread blocked in
    /// `block_on`: every hand-off of a one-by-one stop would otherwise wake that thread and a worker
    /// in turn instead of staying on one worker. The start stays with the caller because that is
    /// where the services' tasks are allocated: glibc gives each worker thread its own arena, which
    /// grows a page per system call, where the main thread's grows in large steps.
    pub async fn run(mut self) -> RunReport {
        let force = CancellationToken::new();
        let signals = self.handle_signals.then(|| spawn_signal_listener(self.lifetime.clone(), force.clone()));
        let signals = signals.map(AbortOnDrop);
        tracing::info!(services = self.entries.len(), "host starting");
        let start_error = self.start_all().await.err();
        let (status, lifetime) = (self.status.clone(), self.lifetime.clone());
        let rest = async move {
            let stop_duration = self.wait_and_stop(start_error.as_ref(), &force).await;
            drop(signals);
            (self, start_error, stop_duration, force.is_cancelled())
        };
        let mut task = AbortOnDrop(tokio::spawn(rest.instrument(tracing::Span::current())));
        match (&mut task.0).await {
            // The report is written here, not in the task: its names are allocated where the
            // services' tasks were, and the host is dropped here too.
            Ok((host, start_error, stop_duration, forced)) => {
                let report = RunReport {
                    services: host.entries.iter().map(report_of).collect(),
                    start_error,
                    stop_reason: host.lifetime.stop_reason(),
                    forced,
                    stop_duration,
                };
                tracing::info!(code = report.exit_code(), ?stop_duration, "host stopped");
                report
            }
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            // Only a runtime shutting down cancels the task: report what each service reached.
            Err(_) => RunReport {
                services: status
                    .services()
                    .into_iter()
                    .map(|s| ServiceReport {
                        name: s.name,
                        state: s.state,
                        error: s.last_error,
                        counts_as_failure: true,
                    })
                    .collect(),
                start_error: None,
                stop_reason: lifetime.stop_reason(),
                forced: true,
                stop_duration: Duration::ZERO,
            },
        }
    }

    /// Waits for the stop request, then stops; returns how long the stop took.
    async fn wait_and_stop(&mut self, start_error: Option<&StartError>, force: &CancellationToken) -> Duration {
        if let Some(err) = start_error {
            tracing::error!(error = %err, "start failed: stopping the services already started");
            self.lifetime.request_stop_because(StopReason::StartFailed(err.to_string()));
        } else {
            self.lifetime.set_state(HostState::Started);
            tracing::info!("host started");
            self.lifetime.stop_requested().await;
            let delay = self.shutdown.delay;
            if !delay.is_zero() {
                tracing::info!(?delay, "stop requested: waiting the shutdown delay before stopping");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = force.cancelled() => {}
                }
            }
        }
        let stop_started = Instant::now();
        self.stop_all(force).await;
        let stop_duration = stop_started.elapsed();
        self.lifetime.set_state(HostState::Stopped);
        stop_duration
    }

    // ---- start ----

    async fn start_all(&mut self) -> Result<(), StartError> {
        let lifetime = self.lifetime.clone();
        let timeout = self.startup_timeout;
        let phase = async {
            let root = self.root.clone();
            root.container().init_singletons(&root).await.map_err(|(type_name, message)| StartError::Failed {
                service: format!("singleton `{type_name}`"),
                message,
            })?;
            self.run_hook_all(Hook::Starting, None).await?;
            let background = self.background.as_ref();
            if self.start_concurrently {
                let results = join_all(self.entries.iter_mut().map(|e| start_one(e, background))).await;
                results.into_iter().collect::<Result<Vec<()>, StartError>>()?;
            } else {
                for entry in self.entries.iter_mut() {
                    start_one(entry, background).await?;
                }
            }
            self.run_hook_all(Hook::Started, None).await
        };
        let outcome = tokio::select! {
            r = phase => r,
            _ = lifetime.stop_requested() => Err(StartError::Interrupted),
            _ = sleep_or_forever(timeout) => Err(StartError::TimedOut {
                timeout: timeout.unwrap_or_default(),
                pending: Vec::new(),
            }),
        };
        match outcome {
            Err(StartError::TimedOut { timeout, .. }) => Err(StartError::TimedOut {
                timeout,
                pending: self.entries.iter().filter(|e| !e.started).map(|e| e.name().to_string()).collect(),
            }),
            other => other,
        }
    }

    /// Runs one lifecycle hook on every start/stop service; `deadline` bounds it during the stop.
    async fn run_hook_all(
        &mut self,
        hook: Hook,
        deadline: Option<(Instant, &CancellationToken)>,
    ) -> Result<(), StartError> {
        for entry in self.entries.iter().filter(|e| matches!(e.work, Work::Hosted(_))) {
            if matches!(hook, Hook::Stopping | Hook::Stopped) && !entry.started {
                continue;
            }
            let Work::Hosted(service) = &entry.work else { continue };
            let span = tracing::info_span!("service", service = entry.name(), step = hook.as_str());
            let result = match deadline {
                None => call_caught(service.as_ref(), hook, &entry.ctx).instrument(span).await,
                Some((deadline, force)) => {
                    match bounded(
                        spawn_hook(service.clone(), hook, entry.ctx.clone()).instrument(span),
                        deadline,
                        force,
                    )
                    .await
                    {
                        Some(r) => r,
                        None => Err(format!("`{}` hook overran the shutdown budget", hook.as_str())),
                    }
                }
            };
            if let Err(message) = result {
                if deadline.is_none() {
                    return Err(StartError::Failed { service: entry.name().to_string(), message });
                }
                tracing::error!(service = entry.name(), hook = hook.as_str(), error = %message, "lifecycle hook failed");
            }
        }
        Ok(())
    }

    // ---- stop ----

    async fn stop_all(&mut self, force: &CancellationToken) {
        self.lifetime.set_state(HostState::Stopping);
        let deadline = crate::runs::instant_after(Instant::now(), self.shutdown.timeout);
        self.lifetime.set_stop_deadline(deadline);
        tracing::info!(budget = ?self.shutdown.timeout, concurrent = self.shutdown.concurrent, "host stopping");
        let _ = self.run_hook_all(Hook::Stopping, Some((deadline, force))).await;
        // One timer and one force waiter for the whole stop: the budget is shared, not per service,
        // and each service's wait reuses them instead of registering new ones.
        let mut cut_short = std::pin::pin!(async {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = force.cancelled() => {}
            }
        });
        // One clock reading for the whole stop: after it, the budget runs out only where `cut_short`
        // fires, and every service after that point had no time.
        let mut had_time = Instant::now() < deadline;
        if self.shutdown.concurrent {
            for entry in self.entries.iter_mut() {
                begin_stop(entry, had_time);
            }
            // Every service is cancelled already, so waiting in order costs no more than waiting for
            // all at once, and needs no per-service bookkeeping.
            let all = async {
                for entry in self.entries.iter_mut() {
                    finish_stop(entry).await;
                }
            };
            tokio::select! {
                biased;
                _ = all => {}
                _ = &mut cut_short => {}
            }
            // Services further down the list may have stopped within the budget too.
            for entry in self.entries.iter_mut().filter(|e| e.started && !e.stop_done) {
                let _ = finish_stop(entry).now_or_never();
            }
        } else {
            for entry in self.entries.iter_mut().rev() {
                begin_stop(entry, had_time && !force.is_cancelled());
                if !entry.had_time {
                    continue;
                }
                if entry.task.as_ref().is_some_and(|t| !t.is_finished()) {
                    // Let the chain of stops run ahead before waiting on this one.
                    tokio::task::yield_now().await;
                }
                tokio::select! {
                    biased;
                    _ = finish_stop(entry) => {}
                    _ = &mut cut_short => had_time = false,
                }
            }
        }
        let forced = force.is_cancelled();
        for entry in self.entries.iter_mut().filter(|e| e.started && !e.stop_done) {
            abandon(entry, forced);
        }
        let _ = self.run_hook_all(Hook::Stopped, Some((deadline, force))).await;
    }
}

async fn sleep_or_forever(timeout: Option<Duration>) {
    match timeout {
        Some(t) => tokio::time::sleep(t).await,
        None => std::future::pending().await,
    }
}

async fn start_one(entry: &mut Entry, background: Option<&tokio::runtime::Handle>) -> Result<(), StartError> {
    if let Work::Hosted(service) = &entry.work {
        let span = tracing::info_span!("service", service = entry.name());
        entry.ctx.status().set_state(ServiceState::Starting);
        tracing::debug!(parent: &span, "starting");
        if let Err(message) = call_caught(service.as_ref(), Hook::Start, &entry.ctx).instrument(span.clone()).await {
            entry.ctx.status().set_failed(ServiceState::Failed, message.clone());
            return Err(StartError::Failed { service: entry.name().to_string(), message });
        }
        entry.ctx.status().set_state(ServiceState::Running);
        tracing::debug!(parent: &span, "started");
    } else if let Work::Background(service) = std::mem::replace(&mut entry.work, Work::Spawned) {
        // Nothing to wait for before `execute` runs in its own task: straight to running.
        entry.ctx.status().set_state(ServiceState::Running);
        let runtime = if entry.on_host_runtime { None } else { background };
        let policy = std::mem::replace(&mut entry.policy, Policy::StopHost);
        let task = service.spawn_supervised(entry.ctx.clone(), policy, runtime);
        entry.task = Some(task);
        tracing::debug!(service = entry.name(), "started");
    }
    entry.started = true;
    Ok(())
}

/// Asks one service to stop: cancels its token and, for a start/stop service, spawns its `stop`.
fn begin_stop(entry: &mut Entry, had_time: bool) {
    if !entry.started {
        return;
    }
    entry.had_time = had_time;
    entry.ctx.status().set_state_unless_ended(ServiceState::Stopping);
    entry.ctx.token().cancel();
    if let Work::Hosted(service) = &entry.work {
        let (service, ctx) = (service.clone(), entry.ctx.clone());
        let span = tracing::info_span!("service", service = entry.name(), step = "stop");
        entry.stop_task =
            Some(tokio::spawn(async move { call_caught(service.as_ref(), Hook::Stop, &ctx).await }.instrument(span)));
    }
}

/// Waits for one service to stop and records how it ended.
async fn finish_stop(entry: &mut Entry) {
    if !entry.started || entry.stop_done {
        return;
    }
    let failure = match (entry.stop_task.as_mut(), entry.task.as_mut()) {
        (Some(stop), _) => match stop.await {
            Ok(result) => result.err(),
            Err(e) => Some(format!("task ended abnormally: {e}")),
        },
        (None, Some(task)) => task.await.err().map(|e| format!("task ended abnormally: {e}")),
        (None, None) => None,
    };
    entry.stop_task = None;
    entry.task = None;
    entry.stop_done = true;
    match failure {
        Some(message) => {
            tracing::error!(service = entry.name(), error = %message, "stop failed");
            entry.ctx.status().set_failed(ServiceState::Failed, format!("stop failed: {message}"));
        }
        None => {
            entry.ctx.status().set_state_unless_ended(ServiceState::Stopped);
            tracing::debug!(service = entry.name(), "stopped");
        }
    }
}

/// Aborts a service that did not stop in time, and says why.
fn abandon(entry: &mut Entry, forced: bool) {
    if let Some(task) = entry.task.take() {
        task.abort();
    }
    if let Some(task) = entry.stop_task.take() {
        task.abort();
    }
    let why = if forced {
        "abandoned: a second signal cut the stop short"
    } else if !entry.had_time {
        "abandoned: the shutdown budget was spent before its turn to stop"
    } else {
        "overran the shutdown budget and was abandoned"
    };
    let name = entry.name().to_string();
    tracing::error!(service = %name, "service `{name}` {why}");
    entry.ctx.status().set_failed(ServiceState::Abandoned, why.to_string());
}

/// Awaits `fut` until the deadline or a forced stop; `None` means it was cut off.
async fn bounded<F: Future>(fut: F, deadline: Instant, force: &CancellationToken) -> Option<F::Output> {
    tokio::select! {
        r = fut => Some(r),
        _ = tokio::time::sleep_until(deadline) => None,
        _ = force.cancelled() => None,
    }
}

/// Runs a hook in its own task so that an overrun can be aborted; panics become error messages.
async fn spawn_hook(service: Arc<dyn DynHosted>, hook: Hook, ctx: ServiceContext) -> Result<(), String> {
    let task = tokio::spawn(async move { call_caught(service.as_ref(), hook, &ctx).await });
    let mut guard = AbortOnDrop(task);
    match (&mut guard.0).await {
        Ok(r) => r,
        Err(e) => Err(format!("task ended abnormally: {e}")),
    }
}

struct AbortOnDrop<T>(JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn call_caught(service: &dyn DynHosted, hook: Hook, ctx: &ServiceContext) -> Result<(), String> {
    match AssertUnwindSafe(service.call(hook, ctx)).catch_unwind().await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(error_chain(e.as_ref())),
        Err(panic) => Err(format!("panicked: {}", panic_message(panic.as_ref()))),
    }
}

/// Polls `fut` inside `catch_unwind`, so that a panic in it comes out as an error instead of
/// unwinding the task. A plain `poll_fn` on the pinned future, not one more async layer around it:
/// a quick run feels every layer, and a supervisor keeps `execute`'s future where it was pinned.
pub(crate) fn caught<F: Future>(
    mut fut: std::pin::Pin<&mut F>,
) -> impl Future<Output = std::thread::Result<F::Output>> + '_ {
    std::future::poll_fn(move |cx| match std::panic::catch_unwind(AssertUnwindSafe(|| fut.as_mut().poll(cx))) {
        Ok(std::task::Poll::Pending) => std::task::Poll::Pending,
        Ok(std::task::Poll::Ready(r)) => std::task::Poll::Ready(Ok(r)),
        Err(panic) => std::task::Poll::Ready(Err(panic)),
    })
}

/// The message a panic carried (`panic!("...")` gives a `&str` or a `String`).
pub(crate) fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic with a non-string payload".to_string()
    }
}

/// An error and its sources, joined with `: `.
pub(crate) fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Spawns a background service's supervisor; inside its tracing span only when a subscriber wants
/// the span, so that an idle service costs no span when tracing is off.
pub(crate) fn spawn_supervised<T: Execute>(
    service: T,
    ctx: ServiceContext,
    policy: Policy,
    runtime: Option<&tokio::runtime::Handle>,
) -> JoinHandle<()> {
    // Checked before the span is made: with tracing's `log` feature on (any crate in the build may
    // turn it on), even a disabled span costs a log-compatibility record and drop.
    let span = if tracing::Level::INFO <= tracing::level_filters::STATIC_MAX_LEVEL
        && tracing::Level::INFO <= tracing::level_filters::LevelFilter::current()
    {
        tracing::info_span!("service", service = ctx.name())
    } else {
        tracing::Span::none()
    };
    if span.is_disabled() {
        spawn_on(supervise(service, PassStopOn(ctx), policy), runtime)
    } else {
        spawn_on(supervise(service, PassStopOn(ctx), policy).instrument(span), runtime)
    }
}

fn spawn_on<F: Future<Output = ()> + Send + 'static>(
    fut: F,
    runtime: Option<&tokio::runtime::Handle>,
) -> JoinHandle<()> {
    match runtime {
        Some(handle) => handle.spawn(fut),
        None => tokio::spawn(fut),
    }
}

/// Runs a background service until it ends, restarting it by its policy.
///
/// Generic over the service so that `execute`'s future lives inline in the task, held once (pinned
/// in place, caught by a closure rather than moved into a wrapper). Only the first run is inline:
/// the failure path and any restart are boxed, so an idle service's task is its own future and a
/// few words more, which keeps the task in tokio's smallest allocation class.
///
/// A plain `fn` around an `async move` block, not an `async fn`: an `async fn`'s state keeps its
/// arguments twice, as it was called with them and as the body's own bindings (32 bytes here, at
/// the head of every service's task). The context comes in its guard for the same reason.
#[expect(clippy::manual_async_fn, reason = "an async fn would hold its arguments twice")]
fn supervise<T: Execute>(service: T, ctx: PassStopOn, policy: Policy) -> impl Future<Output = ()> + Send {
    async move {
        let result = caught(std::pin::pin!(service.run(ctx.0.clone()))).await;
        if let Some(message) = failure_of(&ctx.0, result) {
            Box::pin(restarts(service, &ctx.0, policy, message)).await;
        }
    }
}

/// After a failed run: applies the policy, runs the service again while it says so.
async fn restarts<T: Execute>(service: T, ctx: &ServiceContext, mut policy: Policy, mut message: String) {
    while after_failure(ctx, &mut policy, message).await {
        ctx.status().set_state(ServiceState::Running);
        let result = caught(std::pin::pin!(service.run(ctx.clone()))).await;
        match failure_of(ctx, result) {
            Some(m) => message = m,
            None => return,
        }
    }
}

/// Records the state of a service whose `execute` ended well (stopped when asked, completed
/// otherwise) and returns `None`; or returns the failure's message.
fn failure_of<E: Into<BoxError>>(ctx: &ServiceContext, result: std::thread::Result<Result<(), E>>) -> Option<String> {
    match result {
        Ok(Ok(())) => {
            if ctx.is_cancelled() {
                ctx.status().set_state(ServiceState::Stopped);
            } else {
                tracing::info!("completed");
                ctx.status().set_state(ServiceState::Completed);
            }
            None
        }
        Ok(Err(e)) => Some(error_chain(e.into().as_ref())),
        Err(panic) => Some(format!("panicked: {}", panic_message(panic.as_ref()))),
    }
}

/// Owns the service's context in its task and hands the stop on as the task ends, however it ends.
struct PassStopOn(ServiceContext);

impl Drop for PassStopOn {
    fn drop(&mut self) {
        self.0.pass_stop_on();
    }
}

/// [`OnFailure`] as a supervisor holds it: two words, with a restart policy and its history boxed
/// (converted before the supervisor's call: an `async fn` keeps its arguments for its whole life).
pub(crate) enum Policy {
    StopHost,
    Ignore,
    Restart(Box<(RestartPolicy, VecDeque<Instant>)>),
}

impl From<OnFailure> for Policy {
    fn from(policy: OnFailure) -> Self {
        match policy {
            OnFailure::StopHost => Policy::StopHost,
            OnFailure::Ignore => Policy::Ignore,
            OnFailure::Restart(p) => Policy::Restart(Box::new((p, VecDeque::new()))),
        }
    }
}

/// Applies the failure policy; true when the service is to run again (after its backoff).
async fn after_failure(ctx: &ServiceContext, policy: &mut Policy, message: String) -> bool {
    let status = ctx.status();
    if ctx.is_cancelled() {
        tracing::error!(error = %message, "failed while stopping");
        status.set_failed(ServiceState::Failed, message);
        return false;
    }
    match policy {
        Policy::StopHost => {
            tracing::error!(error = %message, "service `{}` failed: stopping the host", ctx.name());
            status.set_failed(ServiceState::Failed, message);
            ctx.lifetime().request_stop_because(StopReason::ServiceFailed(ctx.name().to_string()));
            false
        }
        Policy::Ignore => {
            tracing::error!(error = %message, "service `{}` failed: ignored by its policy", ctx.name());
            status.set_failed(ServiceState::Failed, message);
            false
        }
        Policy::Restart(state) => {
            let (p, restarts) = &mut **state;
            let now = Instant::now();
            while restarts.front().is_some_and(|t| now.saturating_duration_since(*t) >= p.window) {
                restarts.pop_front();
            }
            if restarts.len() as u32 >= p.max_restarts {
                tracing::error!(
                    error = %message, max_restarts = p.max_restarts, window = ?p.window,
                    "service `{}` failed too often: stopping the host", ctx.name()
                );
                status.set_failed(
                    ServiceState::Failed,
                    format!("{message} (restart limit of {} in {:?} reached)", p.max_restarts, p.window),
                );
                ctx.lifetime().request_stop_because(StopReason::ServiceFailed(ctx.name().to_string()));
                return false;
            }
            restarts.push_back(now);
            let delay = p.delay(restarts.len() as u32, rand::random::<f64>());
            let n = status.add_restart();
            tracing::warn!(error = %message, restart = n, ?delay, "service `{}` failed: restarting", ctx.name());
            status.set_failed(ServiceState::Restarting, message);
            tokio::select! {
                _ = tokio::time::sleep(delay) => true,
                _ = ctx.cancelled() => {
                    status.set_state(ServiceState::Stopped);
                    false
                }
            }
        }
    }
}

fn report_of(entry: &Entry) -> ServiceReport {
    let (name, state, error) = entry.ctx.status().outcome();
    ServiceReport { name, state, error, counts_as_failure: !entry.ignore_failures || state != ServiceState::Failed }
}

#[allow(dead_code)]
fn _assert_send(h: Host) -> impl Future<Output = RunReport> + Send {
    h.run()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tokio allocates a task in 128-byte steps: with this future inline, an idle closure service's
    /// task takes 256 bytes, as a bare task awaiting a token does. The bound is where it would take 384.
    #[test]
    fn an_idle_closure_service_fits_the_smallest_task_allocation() {
        let service = crate::service::FnService(|ctx: ServiceContext| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        });
        let ctx = ServiceContext::detached("idle", CancellationToken::new());
        let supervisor = supervise(service, PassStopOn(ctx), Policy::StopHost);
        assert!(
            std::mem::size_of_val(&supervisor) <= 152,
            "the supervisor of an idle closure service grew to {} bytes",
            std::mem::size_of_val(&supervisor)
        );
    }

    /// The supervisor's own share of a service's task: its three arguments once (the context, the
    /// policy, the service), the catch's one pointer and its state's tag; not the arguments again.
    #[test]
    fn a_supervisor_holds_its_arguments_once() {
        let idle = |ctx: ServiceContext| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        };
        let ctx = ServiceContext::detached("idle", CancellationToken::new());
        let service_future = std::mem::size_of_val(&idle(ctx.clone()));
        let own = std::mem::size_of::<ServiceContext>() + std::mem::size_of::<Policy>() + 8 + 8;
        let supervisor = supervise(crate::service::FnService(idle), PassStopOn(ctx), Policy::StopHost);
        assert!(
            std::mem::size_of_val(&supervisor) <= service_future + own,
            "the supervisor takes {} bytes around a service future of {service_future}, more than {own}",
            std::mem::size_of_val(&supervisor) - service_future
        );
    }
}
