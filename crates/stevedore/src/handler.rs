//! Handlers that declare what they need through their parameters, in the manner of axum extractors.
//!
//! A handler is an async fn or closure whose parameters all implement [`FromScope`]: a
//! [`Singleton<T>`], a [`Scoped<T>`], a [`Transient<T>`], the [`ServiceContext`], the
//! [`CancellationToken`], or an [`Extension<T>`] an integration attached to the scope. A payload
//! handler takes the unit of work's payload (a queued task, a job, a message) as its first parameter.
//!
//! ```
//! use stevedore::handler::Handler;
//! use stevedore::scope::{Scoped, Singleton};
//! use stevedore::{BoxError, ServiceContext};
//!
//! struct ApiClient;
//! struct EmployeeDb;
//!
//! async fn sync_employees(
//!     api: Singleton<ApiClient>,
//!     db: Scoped<EmployeeDb>,
//!     ctx: ServiceContext,
//! ) -> Result<(), BoxError> {
//!     let _db = db.lock().await;
//!     let _ = (api, ctx.name());
//!     Ok(())
//! }
//!
//! fn assert_handler<Args>(_: impl Handler<Args>) {}
//! assert_handler(sync_employees);
//! ```

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::error::BoxError;
use crate::host::error_chain;
use crate::scope::{Dependency, Lifetime, Scope, Scoped, Singleton, Transient, short_type_name};
use crate::service::ServiceContext;
use crate::status::RunOutcome;

/// A value a handler can take as a parameter, made from the unit of work's [`Scope`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be a handler parameter",
    label = "not extractable from a scope",
    note = "handler parameters are `Singleton<T>`, `Scoped<T>`, `Transient<T>`, `ServiceContext`, `CancellationToken` or `Extension<T>`; register `T` in the ServiceCollection and wrap it in one of these"
)]
pub trait FromScope: Sized + Send + 'static {
    /// Makes the value, or says why it cannot.
    fn from_scope(scope: &Scope) -> impl Future<Output = Result<Self, BoxError>> + Send;

    /// What the parameter needs from the registry, checked when the host is built.
    fn dependency() -> Option<Dependency> {
        None
    }
}

impl<T: Send + Sync + 'static> FromScope for Singleton<T> {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        scope.singleton::<T>().await.map(Singleton)
    }
    fn dependency() -> Option<Dependency> {
        Some(Dependency::of::<T>(Lifetime::Singleton))
    }
}

impl<T: Send + Sync + 'static> FromScope for Scoped<T> {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        scope.scoped::<T>().await.map(Scoped)
    }
    fn dependency() -> Option<Dependency> {
        Some(Dependency::of::<T>(Lifetime::Scoped))
    }
}

impl<T: Send + Sync + 'static> FromScope for Transient<T> {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        scope.transient::<T>().await.map(Transient)
    }
    fn dependency() -> Option<Dependency> {
        Some(Dependency::of::<T>(Lifetime::Transient))
    }
}

impl FromScope for ServiceContext {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        Ok(scope.context().clone())
    }
}

impl FromScope for CancellationToken {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        Ok(scope.context().token().clone())
    }
}

/// A typed value an integration attached to the scope (a job's id and attempt, a message's key).
#[derive(Debug, Clone)]
pub struct Extension<T>(pub T);

impl<T: Clone + Send + Sync + 'static> FromScope for Extension<T> {
    async fn from_scope(scope: &Scope) -> Result<Self, BoxError> {
        scope
            .extension::<T>()
            .map(Extension)
            .ok_or_else(|| format!("no `{}` extension is attached to this scope", short_type_name::<T>()).into())
    }
}

/// An async fn or closure whose parameters are all extractors, returning `Result<Out, E>`.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Stevedore handler",
    note = "a handler is an async fn or Clone closure returning `Result<_, E>` (E: Into<BoxError>) whose parameters all implement `FromScope`"
)]
pub trait Handler<Args, Out = ()>: Clone + Send + Sync + 'static {
    /// Extracts every parameter from `scope` and calls the handler.
    fn call<'a>(&'a self, scope: &'a Scope) -> impl Future<Output = Result<Out, BoxError>> + Send + 'a;

    /// What the parameters need from the registry.
    fn dependencies() -> Vec<Dependency>;
}

/// A handler that takes a payload of type `T` as its first parameter, then extractors.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Stevedore handler for payloads of type `{T}`",
    note = "a payload handler is an async fn or Clone closure taking the payload first, then parameters that implement `FromScope`, and returning `Result<(), E>`"
)]
pub trait PayloadHandler<T, Args>: Clone + Send + Sync + 'static {
    /// Extracts every other parameter from `scope` and calls the handler with `payload`.
    fn call<'a>(&'a self, payload: T, scope: &'a Scope) -> impl Future<Output = Result<(), BoxError>> + Send + 'a;

    /// What the parameters need from the registry.
    fn dependencies() -> Vec<Dependency>;
}

async fn extract<E: FromScope>(scope: &Scope) -> Result<E, BoxError> {
    E::from_scope(scope)
        .await
        .map_err(|e| format!("cannot provide `{}`: {}", short_type_name::<E>(), error_chain(e.as_ref())).into())
}

macro_rules! impl_handlers {
    ($($ty:ident),*) => {
        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, Out, Err, $($ty,)*> Handler<($($ty,)*), Out> for F
        where
            F: Fn($($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<Out, Err>> + Send,
            Out: Send,
            Err: Into<BoxError>,
            $($ty: FromScope,)*
        {
            fn call<'a>(&'a self, scope: &'a Scope) -> impl Future<Output = Result<Out, BoxError>> + Send + 'a {
                async move {
                    $(let $ty = extract::<$ty>(scope).await?;)*
                    (self)($($ty,)*).await.map_err(Into::into)
                }
            }
            fn dependencies() -> Vec<Dependency> {
                let deps: Vec<Option<Dependency>> = vec![$($ty::dependency(),)*];
                deps.into_iter().flatten().collect()
            }
        }

        #[allow(non_snake_case, unused_variables)]
        impl<F, Fut, Err, T, $($ty,)*> PayloadHandler<T, ($($ty,)*)> for F
        where
            F: Fn(T, $($ty,)*) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), Err>> + Send,
            Err: Into<BoxError>,
            T: Send + 'static,
            $($ty: FromScope,)*
        {
            fn call<'a>(&'a self, payload: T, scope: &'a Scope) -> impl Future<Output = Result<(), BoxError>> + Send + 'a {
                async move {
                    $(let $ty = extract::<$ty>(scope).await?;)*
                    (self)(payload, $($ty,)*).await.map_err(Into::into)
                }
            }
            fn dependencies() -> Vec<Dependency> {
                let deps: Vec<Option<Dependency>> = vec![$($ty::dependency(),)*];
                deps.into_iter().flatten().collect()
            }
        }
    };
}

impl_handlers!();
impl_handlers!(A1);
impl_handlers!(A1, A2);
impl_handlers!(A1, A2, A3);
impl_handlers!(A1, A2, A3, A4);
impl_handlers!(A1, A2, A3, A4, A5);
impl_handlers!(A1, A2, A3, A4, A5, A6);
impl_handlers!(A1, A2, A3, A4, A5, A6, A7);
impl_handlers!(A1, A2, A3, A4, A5, A6, A7, A8);

/// How one run in a scope ended: its outcome and, when it did not succeed, the error text (including
/// any error from ending the scope's values).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunResult {
    /// The outcome.
    pub outcome: RunOutcome,
    /// The error, when there was one.
    pub error: Option<String>,
}

impl RunResult {
    /// True when the run succeeded and its scope ended cleanly.
    pub fn is_success(&self) -> bool {
        self.outcome == RunOutcome::Succeeded
    }
}

/// Runs a handler in a fresh scope of `ctx`, with an optional timeout, and ends the scope with the
/// outcome. Panics are caught and reported as failures.
pub async fn run_handler<Args, H: Handler<Args>>(
    ctx: &ServiceContext,
    handler: &H,
    timeout: Option<Duration>,
) -> RunResult {
    let scope = ctx.create_scope();
    let (outcome, error) = run_caught(timeout, || handler.call(&scope)).await;
    if scope.nothing_to_end() {
        return RunResult { outcome, error };
    }
    // Boxed: rare (scoped values to end), and unboxed its state would grow every run's future.
    Box::pin(finish(scope, outcome, error)).await
}

/// Runs a payload handler in a fresh scope of `ctx`; see [`run_handler`]. `prepare` may attach
/// extensions to the scope first.
pub async fn run_payload_handler<T, Args, H: PayloadHandler<T, Args>>(
    ctx: &ServiceContext,
    handler: &H,
    payload: T,
    timeout: Option<Duration>,
    prepare: impl FnOnce(&Scope),
) -> RunResult {
    let scope = ctx.create_scope();
    prepare(&scope);
    let (outcome, error) = run_caught(timeout, || handler.call(payload, &scope)).await;
    if scope.nothing_to_end() {
        return RunResult { outcome, error };
    }
    // Boxed: rare (scoped values to end), and unboxed its state would grow every run's future.
    Box::pin(finish(scope, outcome, error)).await
}

/// [`run_payload_handler`] in the scope kept in `spare` (made there if empty), left there for the
/// caller's next run (a sequential queue's next task) when nothing was made in it or attached to
/// it, and taken and ended otherwise. The scope stays in place: moving it into and out of each
/// run stalled a quick queue's loop on every task (`BENCHMARKS.md`, sixth session).
pub(crate) async fn run_payload_handler_reusing<T, Args, H: PayloadHandler<T, Args>>(
    ctx: &ServiceContext,
    spare: &mut Option<Scope>,
    handler: &H,
    payload: T,
    timeout: Option<Duration>,
) -> RunResult {
    let scope = spare.get_or_insert_with(|| ctx.create_scope());
    let (outcome, error) = run_caught(timeout, || handler.call(payload, scope)).await;
    if scope.is_pristine() {
        return RunResult { outcome, error };
    }
    match spare.take() {
        Some(scope) if !scope.nothing_to_end() => Box::pin(finish(scope, outcome, error)).await,
        _ => RunResult { outcome, error },
    }
}

/// Runs the future `work()` makes with an optional timeout, catching panics as failures, and turns
/// its result into an outcome. One layer, polled inside `catch_unwind` itself: a quick task feels
/// every async layer it goes through. The future is made in place, not passed in, for the reason
/// [`recorded`](crate::runs::recorded) gives.
async fn run_caught<Fut>(timeout: Option<Duration>, work: impl FnOnce() -> Fut) -> (RunOutcome, Option<String>)
where
    Fut: Future<Output = Result<(), BoxError>> + Send,
{
    let result = match timeout {
        None => crate::host::caught(std::pin::pin!(work())).await,
        // Boxed: a timer is dearer than the allocation, and unboxed the timer's state would grow the
        // future of every run, timed or not.
        Some(limit) => {
            use futures_util::FutureExt;
            let timed = Box::pin(std::panic::AssertUnwindSafe(tokio::time::timeout(limit, work())).catch_unwind());
            match timed.await {
                Ok(Ok(result)) => Ok(result),
                Ok(Err(_elapsed)) => {
                    return (RunOutcome::TimedOut, Some(format!("run exceeded its timeout of {limit:?}")));
                }
                Err(panic) => Err(panic),
            }
        }
    };
    match result {
        Ok(Ok(())) => (RunOutcome::Succeeded, None),
        Ok(Err(e)) => (RunOutcome::Failed, Some(error_chain(e.as_ref()))),
        Err(panic) => (RunOutcome::Failed, Some(format!("panicked: {}", crate::host::panic_message(panic.as_ref())))),
    }
}

/// Closes the scope with the outcome. A close error turns a success into a failure: a commit that
/// failed is not a success.
async fn finish(scope: Scope, outcome: RunOutcome, error: Option<String>) -> RunResult {
    match scope.close(outcome).await {
        Ok(()) => RunResult { outcome, error },
        Err(e) => {
            let close = error_chain(e.as_ref());
            let error = Some(match error {
                Some(first) => format!("{first}; {close}"),
                None => close,
            });
            let outcome = if outcome == RunOutcome::Succeeded { RunOutcome::Failed } else { outcome };
            RunResult { outcome, error }
        }
    }
}
