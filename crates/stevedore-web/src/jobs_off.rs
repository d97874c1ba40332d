//! Without feature `jobs`: no job store can be attached, so nothing here is ever reached.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;

use crate::auth::AdminToken;

/// Uninhabited: a server without the feature never has a job store.
#[derive(Debug)]
pub(crate) enum Jobs {}

impl Jobs {
    pub(crate) async fn render(&self, _actions: bool, _html: &mut String) {
        match *self {}
    }

    pub(crate) async fn record_metrics(&self, _max_age: Duration) {
        match *self {}
    }
}

pub(crate) const DEFAULT_METRICS_MAX_AGE: Duration = Duration::from_secs(5);

pub(crate) fn describe_metrics() {}

pub(crate) fn routes(jobs: Arc<Jobs>, _token: Option<Arc<AdminToken>>) -> Router {
    match *jobs {}
}
