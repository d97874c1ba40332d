//! Scoped services in axum handlers (feature `axum`).
//!
//! With this feature [`Singleton<T>`], [`Scoped<T>`] and [`Transient<T>`] are axum extractors: a
//! request handler takes them as parameters, and they resolve in the request's [`RequestScope`]. One
//! scope per request: a scoped value (a database transaction, say) is made on first use, shared by
//! every extractor of that request, never by two requests, and ended when the handler has answered,
//! with [`RunOutcome::Succeeded`] for a status below 400 and [`RunOutcome::Failed`] otherwise.
//!
//! stevedore-web's `WebServer` opens the scope for every route. Elsewhere, wrap the router with
//! [`with_request_scope`] in an `axum::middleware::from_fn_with_state` middleware.
//!
//! ```
//! use axum::{Router, extract::{Request, State}, middleware::{self, Next}, routing::post};
//! use stevedore::{BoxError, RunOutcome, ServiceContext, Scoped, ServiceCollection};
//!
//! struct Audit(Vec<String>);
//!
//! async fn rename(audit: Scoped<Audit>) -> &'static str {
//!     audit.lock().await.0.push("renamed".into());
//!     "ok"
//! }
//!
//! let services = ServiceCollection::new().scoped_with_end(
//!     || async { Ok::<_, BoxError>(Audit(Vec::new())) },
//!     |audit: Audit, outcome: RunOutcome| async move {
//!         // a 2xx/3xx answer commits, anything else rolls back
//!         println!("{} entries, {}", audit.0.len(), outcome.as_str());
//!         Ok::<_, BoxError>(())
//!     },
//! );
//! let ctx = ServiceContext::detached_with("web", Default::default(), services);
//! let app: Router = Router::new().route("/rename", post(rename)).layer(middleware::from_fn_with_state(
//!     ctx,
//!     |State(ctx): State<ServiceContext>, request: Request, next: Next| async move {
//!         stevedore::axum::with_request_scope(&ctx, request, |r| next.run(r)).await
//!     },
//! ));
//! # let _ = app;
//! ```
//!
//! The scope ends before the response is sent, so a failed commit still becomes a 500 rather than a
//! 200 the client would wrongly trust. A streaming body must therefore not hold a scoped value. A
//! request whose connection drops mid-handler has its scope ended with [`RunOutcome::Failed`] in the
//! background. Each per-request need is checked when first extracted; declare them up front (with
//! `WebServer::needs` in stevedore-web, or [`ServiceSpec::needs`](crate::ServiceSpec::needs)) to
//! have the host check them when it is built.
//!
//! Why here and not in stevedore-web: axum's trait and Stevedore's extractor types must meet in one of
//! their two crates (the orphan rule).

use std::future::Future;
use std::sync::Arc;

use axum_core::extract::FromRequestParts;
use axum_core::response::{IntoResponse, Response};
use http::StatusCode;
use http::request::Parts;

use crate::error::BoxError;
use crate::handler::FromScope;
use crate::host::error_chain;
use crate::scope::{Scope, Scoped, Singleton, Transient, short_type_name};
use crate::service::ServiceContext;
use crate::status::RunOutcome;

/// The scope of one HTTP request, kept in the request's extensions. Cheap to clone (one reference
/// count); every clone must be gone when the scope is closed, so handlers should not keep one.
#[derive(Clone, Debug)]
pub struct RequestScope(Arc<Scope>);

impl RequestScope {
    /// Opens a fresh scope in `ctx` (the web service's context) for one request.
    pub fn open(ctx: &ServiceContext) -> Self {
        RequestScope(Arc::new(ctx.create_scope()))
    }

    /// The scope, to resolve from it directly or attach extensions.
    pub fn scope(&self) -> &Scope {
        &self.0
    }

    /// The outcome a response's status stands for: below 400 (1xx such as a WebSocket upgrade, 2xx,
    /// 3xx) the request succeeded; 4xx and 5xx it failed, so a transaction is rolled back.
    pub fn outcome_for(status: StatusCode) -> RunOutcome {
        if status.as_u16() < 400 { RunOutcome::Succeeded } else { RunOutcome::Failed }
    }

    /// Ends the scope's values with `outcome` (see [`Scope::close`]).
    pub async fn close(self, outcome: RunOutcome) -> Result<(), RequestScopeError> {
        let scope = Arc::try_unwrap(self.0).map_err(|_| RequestScopeError::InUse)?;
        scope.close(outcome).await.map_err(|e| RequestScopeError::Close(error_chain(e.as_ref())))
    }
}

/// A request's scope could not be ended cleanly.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RequestScopeError {
    /// Something still holds a clone of the [`RequestScope`] (a spawned task, a streaming body), so
    /// its values could not be ended; they are dropped with the last clone instead.
    #[error("the request's scope is still in use after the handler answered, so its values were not ended")]
    InUse,
    /// An end hook failed (a commit, say); every hook still ran.
    #[error("ending the request's scope failed: {0}")]
    Close(String),
}

/// Runs `next` (the rest of the middleware stack and the handler) with a fresh [`RequestScope`] in
/// the request's extensions, then ends the scope with the outcome of the response's status.
///
/// A failure to end it is logged with the request's method and path and turns the response into a
/// 500 (the body has not been sent yet). If the request is dropped mid-way (the client went away, or
/// the shutdown budget ran out) the scope is ended with [`RunOutcome::Failed`] in a background task.
pub async fn with_request_scope<F, Fut>(
    ctx: &ServiceContext,
    mut request: http::Request<axum_core::body::Body>,
    next: F,
) -> Response
where
    F: FnOnce(http::Request<axum_core::body::Body>) -> Fut,
    Fut: Future<Output = Response>,
{
    let method = request.method().clone();
    // The path only: a query string may carry secrets.
    let path = request.uri().path().to_string();
    let scope = RequestScope::open(ctx);
    let mut guard = CloseOnDrop(Some(scope.clone()));
    request.extensions_mut().insert(scope);
    let response = next(request).await;
    let Some(scope) = guard.0.take() else { return response };
    let status = response.status();
    match scope.close(RequestScope::outcome_for(status)).await {
        Ok(()) => response,
        Err(error) => {
            tracing::error!(%method, %path, %status, %error, "ending the request's scope failed: answering 500");
            (StatusCode::INTERNAL_SERVER_ERROR, "the request's work could not be completed\n").into_response()
        }
    }
}

/// Ends a request's scope as failed when the request is dropped before it was ended.
struct CloseOnDrop(Option<RequestScope>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        let Some(scope) = self.0.take() else { return };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        runtime.spawn(async move {
            // The dropped handler may still be letting go of its clone on another thread.
            let mut scope = scope;
            for _ in 0..100 {
                match Arc::try_unwrap(scope.0) {
                    Ok(inner) => {
                        if let Err(e) = inner.close(RunOutcome::Failed).await {
                            tracing::error!(error = %error_chain(e.as_ref()), "ending an abandoned request's scope failed");
                        }
                        return;
                    }
                    Err(shared) => {
                        scope = RequestScope(shared);
                        tokio::task::yield_now().await;
                    }
                }
            }
            tracing::warn!("an abandoned request's scope is still in use; its values are dropped without being ended");
        });
    }
}

/// Why a [`Singleton<T>`], [`Scoped<T>`] or [`Transient<T>`] parameter could not be provided. As a
/// response it is a 500 naming the type; the reason goes to the log, not to the client.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ScopeRejection {
    /// The request has no [`RequestScope`]: the router is not served through stevedore-web's
    /// `WebServer` nor wrapped with [`with_request_scope`].
    #[error(
        "cannot provide `{type_name}`: the request has no scope (serve the router with stevedore-web's WebServer, or wrap it with `stevedore::axum::with_request_scope`)"
    )]
    NoScope {
        /// The parameter's type, e.g. `Scoped<Db>`.
        type_name: String,
    },
    /// The registry could not provide it: not registered, registered with another lifetime, or its
    /// factory failed.
    #[error("cannot provide `{type_name}`: {reason}")]
    Failed {
        /// The parameter's type, e.g. `Scoped<Db>`.
        type_name: String,
        /// Why, with the error's sources.
        reason: String,
    },
}

impl ScopeRejection {
    /// The parameter's type, e.g. `Scoped<Db>`.
    pub fn type_name(&self) -> &str {
        match self {
            ScopeRejection::NoScope { type_name } | ScopeRejection::Failed { type_name, .. } => type_name,
        }
    }
}

impl IntoResponse for ScopeRejection {
    fn into_response(self) -> Response {
        tracing::error!(error = %self, "a request handler's parameter could not be provided: answering 500");
        let body = match &self {
            ScopeRejection::NoScope { .. } => format!("{self}\n"),
            // A factory's error may describe internals (hosts, file paths): the log has it.
            ScopeRejection::Failed { type_name, .. } => {
                format!("cannot provide `{type_name}` to this request's handler; the server log says why\n")
            }
        };
        (StatusCode::INTERNAL_SERVER_ERROR, body).into_response()
    }
}

async fn extract<E: FromScope>(parts: &Parts) -> Result<E, ScopeRejection> {
    let Some(scope) = parts.extensions.get::<RequestScope>().cloned() else {
        return Err(ScopeRejection::NoScope { type_name: short_type_name::<E>() });
    };
    E::from_scope(scope.scope()).await.map_err(|e: BoxError| ScopeRejection::Failed {
        type_name: short_type_name::<E>(),
        reason: error_chain(e.as_ref()),
    })
}

impl<S: Send + Sync, T: Send + Sync + 'static> FromRequestParts<S> for Singleton<T> {
    type Rejection = ScopeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        extract(parts).await
    }
}

impl<S: Send + Sync, T: Send + Sync + 'static> FromRequestParts<S> for Scoped<T> {
    type Rejection = ScopeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        extract(parts).await
    }
}

impl<S: Send + Sync, T: Send + Sync + 'static> FromRequestParts<S> for Transient<T> {
    type Rejection = ScopeRejection;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        extract(parts).await
    }
}
