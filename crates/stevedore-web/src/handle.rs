//! The host, as request handlers see it.

use axum::extract::FromRequestParts;
use axum::http::StatusCode;
use axum::http::request::Parts;
use stevedore::{AppLifetime, StatusView};

/// The host's status and lifetime, extracted in any handler served by a [`WebServer`](crate::WebServer).
///
/// ```
/// use axum::{Json, Router, routing::get};
/// use stevedore_web::HostHandle;
///
/// async fn workers(host: HostHandle) -> Json<Vec<String>> {
///     Json(host.status().services().into_iter().map(|s| s.name).collect())
/// }
///
/// let app: Router = Router::new().route("/workers", get(workers));
/// # let _ = app;
/// ```
#[derive(Clone, Debug)]
pub struct HostHandle {
    status: StatusView,
}

impl HostHandle {
    pub(crate) fn new(status: StatusView) -> Self {
        HostHandle { status }
    }

    /// Every service's state; operator actions (trigger, pause, resume).
    pub fn status(&self) -> &StatusView {
        &self.status
    }

    /// The host's lifetime: its phase, or a stop request (an admin "shut down" endpoint, say).
    pub fn lifetime(&self) -> &AppLifetime {
        self.status.lifetime()
    }
}

impl<S: Send + Sync> FromRequestParts<S> for HostHandle {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        parts
            .extensions
            .get::<HostHandle>()
            .cloned()
            .ok_or((StatusCode::INTERNAL_SERVER_ERROR, "this router is not served by a stevedore WebServer"))
    }
}
