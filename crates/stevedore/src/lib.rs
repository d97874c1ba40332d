//! # Stevedore
//!
//! Hosted services for tokio, as ASP.NET Core has them, done properly: a [`Host`] that starts your
//! background work in order, supervises it, and stops it on SIGTERM within one shutdown budget.
//!
//! Three ways to register work, all through [`ServiceSpec`]:
//! - [`HostedService`]: an explicit async start and stop (the article's `IHostedService`);
//! - [`BackgroundService`]: one async `execute` handed a cancellation signal (`BackgroundService`);
//! - [`ServiceSpec::from_fn`]: a plain async closure.
//!
//! ```no_run
//! use stevedore::{Host, ServiceSpec};
//!
//! #[tokio::main]
//! async fn main() {
//!     let host = Host::builder()
//!         .add(ServiceSpec::from_fn("greeter", |ctx| async move {
//!             println!("hello");
//!             ctx.cancelled().await; // until SIGTERM
//!             Ok::<_, std::convert::Infallible>(())
//!         }))
//!         .build()
//!         .expect("a valid host");
//!     host.run().await.exit();
//! }
//! ```
//!
//! Handlers take what they need as parameters ([`Singleton`], [`Scoped`], [`Transient`],
//! [`ServiceContext`], ...), resolved from a [`ServiceCollection`] in a fresh [`Scope`] per unit of
//! work; the host checks the whole dependency graph when it is built.
//!
//! Where things live: the shutdown budget and signals in [`shutdown`], failure policies in
//! [`supervision`], the lifetime handle in [`lifetime`], per-service status in [`status`], the run
//! report and exit codes in [`report`].
#![deny(missing_docs)]

#[cfg(feature = "axum")]
pub mod axum;
pub mod cron;
pub mod error;
pub mod handler;
mod host;
pub mod interval;
pub mod lifetime;
pub mod queue;
pub mod report;
mod runs;
pub mod scope;
mod service;
pub mod shutdown;
pub mod status;
pub mod stream;
pub mod supervision;

pub use error::{BoxError, BuildError, StartError};
pub use handler::{Extension, FromScope, Handler, PayloadHandler, RunResult};
pub use host::{Host, HostBuilder};
pub use lifetime::{AppLifetime, HostState, StopReason};
pub use report::{RunReport, ServiceReport};
pub use runs::TriggerHandle;
pub use scope::{Lifetime, Scope, Scoped, ServiceCollection, Singleton, Transient};
pub use service::{BackgroundService, HostedService, ServiceContext, ServiceSpec};
pub use status::{
    ControlError, QueueStats, RUN_DURATION_METRIC, Readiness, RunOutcome, RunStats, ServiceControl, ServiceState,
    ServiceStatus, StatusHandle, StatusView,
};
pub use supervision::{OnFailure, RestartPolicy};

/// Re-exported so services need not depend on tokio-util for the token type.
pub use tokio_util::sync::CancellationToken;
