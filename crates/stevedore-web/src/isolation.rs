//! Background work that cannot hurt request latency.
//!
//! A [`BackgroundRuntime`] is a separate tokio runtime whose threads run at a lowered OS priority
//! (nice 19 by default, or `SCHED_IDLE`), so the kernel gives the web runtime's threads the CPU first
//! and background work the rest. A host built with [`build_web`](crate::WebHostExt::build_web) makes
//! one and runs every background service there unless told otherwise (see the crate docs'
//! Isolation section); opt one service out with `ServiceSpec::on_host_runtime`.
//! In a host without a web server, [`BackgroundRuntime::isolate`] wraps a single [`BackgroundService`]
//! so its `execute` runs there, or `HostBuilder::background_runtime(rt.handle().clone())` moves them all.
//! [`BackgroundRuntime::run_cpu`] runs CPU-heavy closures on the runtime's blocking threads (also at
//! the lowered priority) with bounded concurrency, keeping them off every async thread.
//!
//! ```no_run
//! use stevedore::{BackgroundService, BoxError, Host, ServiceContext};
//! use stevedore_web::isolation::BackgroundRuntime;
//!
//! struct Report;
//! impl BackgroundService for Report {
//!     async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
//!         ctx.cancelled().await;
//!         Ok(())
//!     }
//! }
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let background = BackgroundRuntime::builder().threads(1).build()?;
//! let host = Host::builder().add(background.background("report", Report)).build()?;
//! # let _ = host; Ok(()) }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use stevedore::{BackgroundService, BoxError, ServiceContext, ServiceSpec};
use thread_priority::{
    NormalThreadSchedulePolicy, ThreadPriority, ThreadSchedulePolicy, set_thread_priority_and_policy, thread_native_id,
};
use tokio::runtime::{Handle, Runtime};
use tokio::sync::Semaphore;

/// The OS scheduling priority of the background runtime's threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Priority {
    /// Leave the threads as they are.
    Normal,
    /// `SCHED_OTHER` at nice 19: the lowest time-sharing priority. The default: measured here, it kept
    /// request p99 closer to its unloaded value than `SCHED_IDLE` did.
    #[default]
    Lowest,
    /// `SCHED_IDLE` (Linux): runs only when nothing else wants the CPU.
    Idle,
}

/// Something went wrong building a [`BackgroundRuntime`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IsolationError {
    /// The runtime could not be built (threads could not be spawned).
    #[error("cannot build the background runtime `{name}`: {source}")]
    Runtime {
        /// The runtime's thread name.
        name: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// Zero threads or zero concurrency was asked for.
    #[error("the background runtime `{name}` needs at least one {what}")]
    Zero {
        /// The runtime's thread name.
        name: String,
        /// `thread` or `concurrent CPU task`.
        what: &'static str,
    },
}

/// A CPU-heavy closure run by [`BackgroundRuntime::run_cpu`] did not return a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CpuError {
    /// The closure panicked.
    #[error("CPU task panicked: {0}")]
    Panicked(String),
    /// The background runtime shut down before the closure ran.
    #[error("the background runtime shut down before the CPU task finished")]
    ShutDown,
}

/// Configures a [`BackgroundRuntime`].
#[derive(Debug, Clone)]
pub struct BackgroundRuntimeBuilder {
    name: String,
    threads: usize,
    priority: Priority,
    cpu_concurrency: Option<usize>,
}

impl BackgroundRuntimeBuilder {
    /// Worker threads (default: half the cores, at least one).
    pub fn threads(mut self, n: usize) -> Self {
        self.threads = n;
        self
    }

    /// The threads' OS priority (default [`Priority::Lowest`], nice 19).
    pub fn priority(mut self, p: Priority) -> Self {
        self.priority = p;
        self
    }

    /// The thread-name prefix (default `stevedore-bg`), seen in `top -H` and profilers.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// How many [`run_cpu`](BackgroundRuntime::run_cpu) closures may run at once (default: the
    /// number of cores). Further calls wait their turn without holding a thread.
    pub fn cpu_concurrency(mut self, n: usize) -> Self {
        self.cpu_concurrency = Some(n);
        self
    }

    /// Builds the runtime; its threads lower their own priority as they start.
    pub fn build(self) -> Result<BackgroundRuntime, IsolationError> {
        if self.threads == 0 {
            return Err(IsolationError::Zero { name: self.name, what: "thread" });
        }
        let cpu = self.cpu_concurrency.unwrap_or_else(cores);
        if cpu == 0 {
            return Err(IsolationError::Zero { name: self.name, what: "concurrent CPU task" });
        }
        let priority = self.priority;
        let warned = Arc::new(AtomicBool::new(false));
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(self.threads)
            .max_blocking_threads(cpu.max(1))
            .thread_name(self.name.clone())
            .enable_all()
            .on_thread_start(move || {
                if let Err(e) = lower_current_thread(priority)
                    && !warned.swap(true, Ordering::Relaxed)
                {
                    tracing::warn!(error = %e, ?priority, "cannot lower the background threads' priority");
                }
            })
            .build()
            .map_err(|source| IsolationError::Runtime { name: self.name.clone(), source })?;
        let handle = runtime.handle().clone();
        Ok(BackgroundRuntime {
            inner: Arc::new(Inner {
                runtime: Some(runtime),
                handle,
                cpu: Arc::new(Semaphore::new(cpu.min(Semaphore::MAX_PERMITS))),
                priority,
            }),
        })
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Lowers the calling thread's scheduling priority. Lowering needs no privilege.
pub fn lower_current_thread(priority: Priority) -> Result<(), String> {
    let policy = match priority {
        Priority::Normal => return Ok(()),
        Priority::Lowest => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
        Priority::Idle => ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
    };
    set_thread_priority_and_policy(thread_native_id(), ThreadPriority::Min, policy).map_err(|e| format!("{e:?}"))
}

/// A tokio runtime for background services, at a lowered OS priority. Cheap to clone; the runtime
/// shuts down (without blocking) when the last clone is dropped.
#[derive(Clone, Debug)]
pub struct BackgroundRuntime {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    runtime: Option<Runtime>,
    handle: Handle,
    cpu: Arc<Semaphore>,
    priority: Priority,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside async code; this does not.
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

impl BackgroundRuntime {
    /// Starts configuring a runtime.
    pub fn builder() -> BackgroundRuntimeBuilder {
        BackgroundRuntimeBuilder {
            name: "stevedore-bg".to_string(),
            threads: (cores() / 2).max(1),
            priority: Priority::default(),
            cpu_concurrency: None,
        }
    }

    /// The runtime's handle, to spawn onto it directly.
    pub fn handle(&self) -> &Handle {
        &self.inner.handle
    }

    /// The priority its threads run at.
    pub fn priority(&self) -> Priority {
        self.inner.priority
    }

    /// Wraps `service` so its `execute` runs on this runtime.
    pub fn isolate<S: BackgroundService>(&self, service: S) -> Isolated<S> {
        Isolated { service: Arc::new(service), runtime: self.clone() }
    }

    /// A background service registration whose `execute` runs on this runtime.
    pub fn background(&self, name: impl Into<String>, service: impl BackgroundService) -> ServiceSpec {
        ServiceSpec::background(name, self.isolate(service))
    }

    /// A closure run as a background service on this runtime (the isolated [`ServiceSpec::from_fn`]).
    pub fn from_fn<F, Fut, E>(&self, name: impl Into<String>, f: F) -> ServiceSpec
    where
        F: Fn(ServiceContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.background(name, FnService(f))
    }

    /// Runs a CPU-heavy closure on the runtime's blocking threads (at the lowered priority), at most
    /// `cpu_concurrency` at a time; further calls wait for a slot without holding a thread.
    ///
    /// ```
    /// # async fn demo(bg: stevedore_web::isolation::BackgroundRuntime) -> Result<(), stevedore_web::isolation::CpuError> {
    /// let sum = bg.run_cpu(|| (0..1_000_000u64).sum::<u64>()).await?;
    /// assert_eq!(sum, 499_999_500_000);
    /// # Ok(()) }
    /// ```
    pub async fn run_cpu<F, R>(&self, f: F) -> Result<R, CpuError>
    where
        F: FnOnce() -> R + Send + 'static,
        R: Send + 'static,
    {
        let permit = self.inner.cpu.clone().acquire_owned().await.map_err(|_| CpuError::ShutDown)?;
        let task = self.inner.handle.spawn_blocking(move || {
            let _permit = permit;
            f()
        });
        match task.await {
            Ok(r) => Ok(r),
            Err(e) if e.is_panic() => Err(CpuError::Panicked(panic_message(e.into_panic()))),
            Err(_) => Err(CpuError::ShutDown),
        }
    }
}

fn panic_message(panic: Box<dyn std::any::Any + Send>) -> String {
    match panic.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast_ref::<&str>().map(|s| s.to_string()).unwrap_or_else(|| "a non-string panic".into()),
    }
}

/// A background service whose `execute` runs on a [`BackgroundRuntime`]; made by
/// [`BackgroundRuntime::isolate`]. Cancellation, restarts and panics behave as without the wrapper:
/// a panic on the background runtime resumes in the supervisor, which applies the service's policy.
#[derive(Debug)]
pub struct Isolated<S> {
    service: Arc<S>,
    runtime: BackgroundRuntime,
}

impl<S: BackgroundService> BackgroundService for Isolated<S> {
    fn execute(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        let service = self.service.clone();
        let task = self.runtime.handle().spawn(async move { service.execute(ctx).await });
        async move {
            let mut guard = AbortOnDrop(task);
            match (&mut guard.0).await {
                Ok(r) => r,
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => Err(format!("the background runtime dropped the service's task: {e}").into()),
            }
        }
    }
}

/// Aborts the task when the supervisor gives up on it (the shutdown budget ran out).
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

struct FnService<F>(F);

impl<F, Fut, E> BackgroundService for FnService<F>
where
    F: Fn(ServiceContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Into<BoxError>,
{
    fn execute(&self, ctx: ServiceContext) -> impl Future<Output = Result<(), BoxError>> + Send {
        let fut = (self.0)(ctx);
        async move { fut.await.map_err(Into::into) }
    }
}
