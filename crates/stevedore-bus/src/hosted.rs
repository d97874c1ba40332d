//! Relays and consumers as hosted services of the core crate.
//!
//! Both implement [`stevedore::BackgroundService`]: register a relay with
//! [`stevedore::ServiceSpec::background`], a consumer with
//! [`Consumer::into_spec`](crate::consumer::Consumer::into_spec) (which also declares its
//! handler's needs). While connected they beat the service's heartbeat,
//! so a spec with [`stevedore::ServiceSpec::heartbeat`] turns unhealthy during a broker outage
//! longer than the interval; they also report queue figures (outbox depth; consumer in-flight
//! and dead-lettered counts).

use std::time::Duration;

use stevedore::{BackgroundService, BoxError, QueueStats, ServiceContext};

use crate::Publisher;
use crate::consumer::{Consumer, MessageHandler, Source};
use crate::relay::Relay;

/// How often a connected, idle consumer beats.
pub(crate) const BEAT_EVERY: Duration = Duration::from_secs(1);

/// Where a relay or consumer reports progress: the host's service status when hosted, nowhere
/// when run directly.
#[derive(Clone, Default)]
pub(crate) struct Reporter(Option<ServiceContext>);

impl Reporter {
    pub(crate) fn new(ctx: ServiceContext) -> Self {
        Reporter(Some(ctx))
    }

    pub(crate) fn beat(&self) {
        if let Some(ctx) = &self.0 {
            ctx.heartbeat();
        }
    }

    pub(crate) fn queue(&self, f: impl FnOnce(&mut QueueStats)) {
        if let Some(ctx) = &self.0 {
            ctx.status().update_queue(f);
        }
    }
}

impl<P: Publisher> BackgroundService for Relay<P> {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        let stop = ctx.token().clone();
        self.run_reporting(stop, Reporter(Some(ctx))).await?;
        Ok(())
    }
}

impl<S: Source, Args: 'static, H: MessageHandler<Args>> BackgroundService for Consumer<S, H, Args> {
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        self.run_in(&ctx).await?;
        Ok(())
    }
}
