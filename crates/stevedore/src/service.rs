//! The three ways to register work: a start/stop service, a background service, a closure.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::BoxError;
use crate::lifetime::AppLifetime;
use crate::scope::{Container, Dependency, Scope, ServiceCollection};
use crate::status::{ServiceControl, StatusHandle};
use crate::supervision::OnFailure;

pub(crate) type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A service with an explicit start and stop: the article's `IHostedService`.
///
/// `start` should return quickly (spawn long work, or use a [`BackgroundService`]); `stop` runs when the
/// host stops, in reverse registration order, within the shutdown budget. The four lifecycle hooks
/// default to doing nothing; each runs for every service before the next phase (all `starting` hooks,
/// then all starts, then all `started` hooks; likewise on the way down).
///
/// ```
/// use stevedore::{BoxError, HostedService, ServiceContext};
///
/// struct Cache;
///
/// impl HostedService for Cache {
///     async fn start(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
///         println!("warming the cache");
///         Ok(())
///     }
///     async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
///         println!("flushing the cache");
///         Ok(())
///     }
/// }
/// ```
pub trait HostedService: Send + Sync + 'static {
    /// Starts the service. An error stops the services already started and the host returns it.
    fn start(&self, ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Stops the service. Runs under the host's one shutdown budget; past it the call is abandoned.
    fn stop(&self, ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send;

    /// Runs before any service starts.
    fn starting(&self, _ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// Runs once every service has started.
    fn started(&self, _ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// Runs when the stop begins, before any service stops.
    fn stopping(&self, _ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }

    /// Runs once every service has stopped.
    fn stopped(&self, _ctx: &ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        async { Ok(()) }
    }
}

/// A service with one long-running `execute`: the article's `BackgroundService`.
///
/// `execute` always runs in its own task, so code before its first `.await` never holds up other
/// services or the start. It should return once [`ServiceContext::cancelled`] resolves. Returning
/// earlier with `Ok` marks the service completed (start-up work); an error or a panic is a failure,
/// handled by the service's [`OnFailure`] policy.
///
/// ```
/// use stevedore::{BackgroundService, BoxError, ServiceContext};
///
/// struct Consumer;
///
/// impl BackgroundService for Consumer {
///     async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
///         while !ctx.is_cancelled() {
///             tokio::select! {
///                 _ = ctx.cancelled() => break,
///                 _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => ctx.heartbeat(),
///             }
///         }
///         Ok(())
///     }
/// }
/// ```
pub trait BackgroundService: Send + Sync + 'static {
    /// Does the service's work until `ctx` is cancelled. Called again after each restart.
    fn execute(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// What every service is handed: its name, its cancellation, the host's lifetime and its status.
///
/// Cloning is cheap (one reference count).
#[derive(Clone)]
pub struct ServiceContext {
    /// The service's status slot, which also holds the context's parts: one allocation per service.
    status: StatusHandle,
}

impl std::fmt::Debug for ServiceContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceContext").field("name", &self.name()).finish_non_exhaustive()
    }
}

/// A context's parts besides its status, kept in the service's status slot.
///
/// The slot thus holds the registry: a singleton that keeps the host's `StatusView`, a
/// `StatusHandle` or a `ServiceContext` makes a reference cycle, and the host's memory is then
/// freed only when the process ends (as it already was for a singleton keeping a context).
pub(crate) struct ContextParts {
    pub(crate) token: CancellationToken,
    pub(crate) lifetime: AppLifetime,
    pub(crate) container: Arc<Container>,
    /// In a stop one by one, the token the host cancels after this service's: cancelled by this
    /// service's own task as it ends, so the stop runs down the chain without a hand-off to the
    /// host per service. Set only between two background services (whose stop is the token alone).
    pub(crate) stop_next: Option<CancellationToken>,
}

impl ContextParts {
    /// Parts outside any host: a lifetime of their own, cancelled when `token` is.
    pub(crate) fn detached(token: CancellationToken, container: Arc<Container>) -> Self {
        ContextParts { token, lifetime: AppLifetime::new(), container, stop_next: None }
    }
}

impl ServiceContext {
    /// The context of the service whose status this is.
    pub(crate) fn of(status: StatusHandle) -> Self {
        ServiceContext { status }
    }

    fn parts(&self) -> &ContextParts {
        self.status.context()
    }

    /// Called as the service's task ends: during the host's stop, a service that stopped because
    /// it was asked to passes the stop on. Never before the stop (a service ending on its own, or
    /// cancelling its own token, does not stop its neighbour).
    pub(crate) fn pass_stop_on(&self) {
        let parts = self.parts();
        if let Some(next) = &parts.stop_next
            && parts.token.is_cancelled()
            && parts.lifetime.state() == crate::HostState::Stopping
        {
            next.cancel();
        }
    }

    /// A context outside any host, for tests and tools: cancelled when `token` is, with an empty registry.
    pub fn detached(name: impl Into<String>, token: CancellationToken) -> Self {
        Self::of(StatusHandle::detached_with(name.into(), ContextParts::detached(token, Container::empty())))
    }

    /// A context outside any host that resolves from `services`, for tests and tools.
    pub fn detached_with(name: impl Into<String>, token: CancellationToken, services: ServiceCollection) -> Self {
        Self::of(StatusHandle::detached_with(name.into(), ContextParts::detached(token, services.into_container())))
    }

    /// A fresh scope for one unit of work, for custom loops; close it with [`Scope::close`].
    pub fn create_scope(&self) -> Scope {
        Scope::new(self.clone())
    }

    pub(crate) fn container(&self) -> &Arc<Container> {
        &self.parts().container
    }

    /// The service's unique name.
    pub fn name(&self) -> &str {
        self.status.name()
    }

    /// Resolves when this service is asked to stop (its turn in the stop order).
    pub fn cancelled(&self) -> impl Future<Output = ()> + Send + '_ {
        // The token's own future, not an `async fn` around it: every service that awaits this
        // holds it in its task, and the wrapper would add two words to each.
        self.parts().token.cancelled()
    }

    /// True once this service is asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.parts().token.is_cancelled()
    }

    /// The service's cancellation token, to hand to code that takes one.
    pub fn token(&self) -> &CancellationToken {
        &self.parts().token
    }

    /// The host's lifetime: await started / stopping / stopped, or request a stop.
    pub fn lifetime(&self) -> &AppLifetime {
        &self.parts().lifetime
    }

    /// The handle through which the service reports runs and queue figures.
    pub fn status(&self) -> &StatusHandle {
        &self.status
    }

    /// Records progress for the service's heartbeat (see [`ServiceSpec::heartbeat`]).
    pub fn heartbeat(&self) {
        self.status.heartbeat()
    }
}

// ---- type erasure: the host stores every service behind one of these two object-safe traits ----

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Hook {
    Starting,
    Start,
    Started,
    Stopping,
    Stop,
    Stopped,
}

impl Hook {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Hook::Starting => "starting",
            Hook::Start => "start",
            Hook::Started => "started",
            Hook::Stopping => "stopping",
            Hook::Stop => "stop",
            Hook::Stopped => "stopped",
        }
    }
}

pub(crate) trait DynHosted: Send + Sync + 'static {
    fn call<'a>(&'a self, hook: Hook, ctx: &'a ServiceContext) -> BoxFuture<'a, Result<(), BoxError>>;
}

impl<T: HostedService> DynHosted for T {
    fn call<'a>(&'a self, hook: Hook, ctx: &'a ServiceContext) -> BoxFuture<'a, Result<(), BoxError>> {
        match hook {
            Hook::Starting => Box::pin(self.starting(ctx)),
            Hook::Start => Box::pin(self.start(ctx)),
            Hook::Started => Box::pin(self.started(ctx)),
            Hook::Stopping => Box::pin(self.stopping(ctx)),
            Hook::Stop => Box::pin(self.stop(ctx)),
            Hook::Stopped => Box::pin(self.stopped(ctx)),
        }
    }
}

pub(crate) trait DynBackground: Send + Sync + 'static {
    /// Spawns the service's supervised task, which owns the service from then on. Generic per
    /// service type, so that the service and `execute`'s future live inline in the task instead of
    /// in allocations of their own.
    fn spawn_supervised(
        self: Box<Self>,
        ctx: ServiceContext,
        policy: crate::host::Policy,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> tokio::task::JoinHandle<()>;
}

impl<T: Execute> DynBackground for T {
    fn spawn_supervised(
        self: Box<Self>,
        ctx: ServiceContext,
        policy: crate::host::Policy,
        runtime: Option<&tokio::runtime::Handle>,
    ) -> tokio::task::JoinHandle<()> {
        crate::host::spawn_supervised(*self, ctx, policy, runtime)
    }
}

/// What a supervisor runs: a [`BackgroundService`], or a closure whose error is turned into a
/// [`BoxError`] only once it has failed. Converting inside the future (`map_err`) would add a word
/// to every idle closure service's task, and that word moved it into the next allocation class.
pub(crate) trait Execute: Send + Sync + 'static {
    type Error: Into<BoxError>;
    fn run(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

impl<T: BackgroundService> Execute for T {
    type Error = BoxError;
    fn run(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        self.execute(ctx)
    }
}

/// A closure as a background service; made by [`ServiceSpec::from_fn`].
pub(crate) struct FnService<F>(pub(crate) F);

impl<F, Fut, E> Execute for FnService<F>
where
    F: Fn(ServiceContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    type Error = E;
    fn run(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), E>> + Send {
        (self.0)(ctx)
    }
}

pub(crate) enum Work {
    Hosted(Arc<dyn DynHosted>),
    /// Boxed, not shared: its task takes it over at the start (a closure with no captures then costs
    /// no allocation at all).
    Background(Box<dyn DynBackground>),
    /// A background service whose task has taken it over.
    Spawned,
}

/// How a service is registered: its name, its work, its failure policy and its heartbeat.
///
/// ```
/// use std::time::Duration;
/// use stevedore::{OnFailure, RestartPolicy, ServiceSpec};
///
/// let spec = ServiceSpec::from_fn("poller", |ctx| async move {
///     ctx.cancelled().await;
///     Ok::<_, std::io::Error>(())
/// })
/// .on_failure(OnFailure::Restart(RestartPolicy::default()))
/// .heartbeat(Duration::from_secs(30));
/// # let _ = spec;
/// ```
pub struct ServiceSpec {
    pub(crate) name: String,
    pub(crate) kind: &'static str,
    pub(crate) work: Work,
    /// Settings a plain registration leaves at their defaults, boxed on first use: a host of many
    /// plain services then holds (and copies) a small spec for each.
    pub(crate) extras: Option<Box<SpecExtras>>,
}

/// The less common parts of a [`ServiceSpec`].
#[derive(Default)]
pub(crate) struct SpecExtras {
    pub(crate) on_failure: OnFailure,
    pub(crate) heartbeat: Option<Duration>,
    pub(crate) control: Option<Arc<dyn ServiceControl>>,
    pub(crate) error: Option<String>,
    pub(crate) needs: Vec<Dependency>,
    pub(crate) on_host_runtime: bool,
}

impl std::fmt::Debug for ServiceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceSpec")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("on_failure", &self.extras.as_ref().map(|e| &e.on_failure).unwrap_or(&OnFailure::StopHost))
            .field("heartbeat", &self.extras.as_ref().and_then(|e| e.heartbeat))
            .finish_non_exhaustive()
    }
}

impl ServiceSpec {
    fn with_work(name: impl Into<String>, kind: &'static str, work: Work) -> Self {
        ServiceSpec { name: name.into(), kind, work, extras: None }
    }

    fn extras(&mut self) -> &mut SpecExtras {
        self.extras.get_or_insert_with(Box::default)
    }

    /// A start/stop service.
    pub fn hosted(name: impl Into<String>, service: impl HostedService) -> Self {
        Self::with_work(name, "hosted", Work::Hosted(Arc::new(service)))
    }

    /// A background service; its `execute` runs in its own task.
    pub fn background(name: impl Into<String>, service: impl BackgroundService) -> Self {
        Self::with_work(name, "background", Work::Background(Box::new(service)))
    }

    /// A closure run as a background service: called again after each restart.
    ///
    /// ```
    /// let spec = stevedore::ServiceSpec::from_fn("hello", |ctx| async move {
    ///     println!("hello from {}", ctx.name());
    ///     Ok::<_, std::convert::Infallible>(())
    /// });
    /// # let _ = spec;
    /// ```
    pub fn from_fn<F, Fut, E>(name: impl Into<String>, f: F) -> Self
    where
        F: Fn(ServiceContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        Self::with_work(name, "background", Work::Background(Box::new(FnService(f))))
    }

    /// What to do when the service fails at run time (default: stop the host).
    pub fn on_failure(mut self, policy: OnFailure) -> Self {
        self.extras().on_failure = policy;
        self
    }

    /// Declares that the service makes progress at least this often (through
    /// [`ServiceContext::heartbeat`] or a run); past it the service reports unhealthy.
    pub fn heartbeat(mut self, interval: Duration) -> Self {
        self.extras().heartbeat = Some(interval);
        self
    }

    /// Names the kind shown in status and on the dashboard (`interval`, `cron`, `queue`, ...).
    pub fn kind(mut self, kind: &'static str) -> Self {
        self.kind = kind;
        self
    }

    /// Attaches operator actions (run now, pause, resume).
    pub fn control(mut self, control: Arc<dyn ServiceControl>) -> Self {
        self.extras().control = Some(control);
        self
    }

    /// Marks the registration invalid; [`HostBuilder::build`](crate::HostBuilder::build) then fails
    /// with this reason, naming the service. For integrations that validate their configuration when
    /// the service is declared (a cron expression, say).
    pub fn invalid(mut self, reason: impl Into<String>) -> Self {
        self.extras().error.get_or_insert(reason.into());
        self
    }

    /// Keeps this background service on the runtime the host runs on, even when the host has a
    /// separate [background runtime](crate::HostBuilder::background_runtime): for latency-sensitive
    /// work that must not run at a lowered priority.
    pub fn on_host_runtime(mut self) -> Self {
        self.extras().on_host_runtime = true;
        self
    }

    /// Declares what the service's handler needs from the registry, so the host checks it at build.
    /// Integrations pass `H::dependencies()` of the handler they run.
    pub fn needs(mut self, dependencies: impl IntoIterator<Item = Dependency>) -> Self {
        self.extras().needs.extend(dependencies);
        self
    }

    /// The service's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}
