//! Continuous processing: a service that consumes a stream or a channel until the host stops, each
//! item through a [`PayloadHandler`] in its own scope.
//!
//! ```no_run
//! use stevedore::stream::StreamService;
//! use stevedore::{BoxError, Host};
//!
//! async fn index(line: String) -> Result<(), BoxError> {
//!     println!("indexing {line}");
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let (tx, rx) = tokio::sync::mpsc::channel::<String>(100);
//!     let host = Host::builder()
//!         .add(StreamService::from_receiver("indexer", rx, index).into_spec())
//!         .build()
//!         .expect("valid host");
//!     tx.send("hello".into()).await.expect("indexer running");
//!     host.run().await.exit();
//! }
//! ```
//!
//! # Policies
//!
//! - Items are handled one at a time, in order; a failing or panicking item is logged, counted and
//!   recorded as a failed run, and the service goes on with the next.
//! - On stop the service takes no further item; the item in hand finishes (its handler sees the
//!   cancellation) within the host's shutdown budget. Items not yet taken stay in the stream or
//!   channel: for a channel made with [`StreamService::from_receiver`], they can be read back with
//!   [`ReceiverHandle::take_unprocessed`].
//! - A stream that ends makes the service complete (state `completed`); with a channel, that is
//!   when every sender is dropped.
//! - After a restart (with [`OnFailure::Restart`](crate::OnFailure::Restart)), a stream service asks
//!   its factory for a fresh stream; a channel service goes on with the same receiver.

use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::mpsc;

use crate::error::BoxError;
use crate::handler::{PayloadHandler, run_payload_handler};
use crate::runs::recorded;
use crate::service::{BackgroundService, ServiceContext, ServiceSpec};

enum Source<F, T> {
    Factory(F),
    Receiver(Arc<tokio::sync::Mutex<mpsc::Receiver<T>>>),
}

/// A service that consumes a stream or a channel until cancelled; see the [module docs](self).
pub struct StreamService<T, F, H, Args> {
    name: String,
    source: Source<F, T>,
    handler: H,
    timeout: Option<Duration>,
    _args: PhantomData<fn(Args)>,
}

impl<T, F, H, Args> std::fmt::Debug for StreamService<T, F, H, Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamService")
            .field("name", &self.name)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// A placeholder factory type for channel-fed services.
pub type NoFactory<T> = fn(&ServiceContext) -> futures_util::stream::Empty<T>;

impl<T, S, F, H, Args> StreamService<T, F, H, Args>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
    F: Fn(&ServiceContext) -> S + Send + Sync + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    /// Consumes the stream `make` returns (called at each start and restart), each item through
    /// `handler`.
    ///
    /// ```
    /// use stevedore::stream::StreamService;
    /// let ticks = StreamService::new(
    ///     "numbers",
    ///     |_ctx: &stevedore::ServiceContext| futures_util::stream::iter(0..10u32),
    ///     |n: u32| async move { println!("{n}"); Ok::<_, stevedore::BoxError>(()) },
    /// );
    /// let spec = ticks.into_spec();
    /// # let _ = spec;
    /// ```
    pub fn new(name: impl Into<String>, make: F, handler: H) -> Self {
        StreamService { name: name.into(), source: Source::Factory(make), handler, timeout: None, _args: PhantomData }
    }
}

impl<T, H, Args> StreamService<T, NoFactory<T>, H, Args>
where
    T: Send + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    /// Consumes a tokio channel's receiver, each item through `handler`.
    pub fn from_receiver(name: impl Into<String>, rx: mpsc::Receiver<T>, handler: H) -> Self {
        StreamService {
            name: name.into(),
            source: Source::Receiver(Arc::new(tokio::sync::Mutex::new(rx))),
            handler,
            timeout: None,
            _args: PhantomData,
        }
    }

    /// A handle on the receiver, to read back what was not consumed once the host has stopped.
    /// `None` for a stream service.
    pub fn receiver_handle(&self) -> Option<ReceiverHandle<T>> {
        match &self.source {
            Source::Receiver(rx) => Some(ReceiverHandle { rx: rx.clone() }),
            Source::Factory(_) => None,
        }
    }
}

/// Reads back the items a channel-fed [`StreamService`] did not consume.
pub struct ReceiverHandle<T> {
    rx: Arc<tokio::sync::Mutex<mpsc::Receiver<T>>>,
}

impl<T> std::fmt::Debug for ReceiverHandle<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ReceiverHandle")
    }
}

impl<T> ReceiverHandle<T> {
    /// Closes the channel and returns what is left in it; empty while the service is still running.
    pub fn take_unprocessed(&self) -> Vec<T> {
        let mut out = Vec::new();
        if let Ok(mut rx) = self.rx.try_lock() {
            rx.close();
            while let Ok(item) = rx.try_recv() {
                out.push(item);
            }
        }
        out
    }
}

impl<T, S, F, H, Args> StreamService<T, F, H, Args>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
    F: Fn(&ServiceContext) -> S + Send + Sync + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    /// Bounds each item's handling; one past it is cancelled and recorded as timed out.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// The service to register with [`HostBuilder::add`](crate::HostBuilder::add).
    pub fn into_spec(self) -> ServiceSpec {
        let name = self.name.clone();
        ServiceSpec::background(name, Runner(self)).kind("stream").needs(H::dependencies())
    }
}

struct Runner<T, F, H, Args>(StreamService<T, F, H, Args>);

impl<T, S, F, H, Args> Runner<T, F, H, Args>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
    F: Fn(&ServiceContext) -> S + Send + Sync + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    async fn handle(&self, ctx: &ServiceContext, item: T) {
        let svc = &self.0;
        recorded(ctx, "item", || run_payload_handler(ctx, &svc.handler, item, svc.timeout, |_| {})).await;
    }

    /// Handles each item in turn until the stream ends or the service is stopped.
    async fn consume(&self, ctx: &ServiceContext, stream: impl Stream<Item = T>) {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                biased;
                _ = ctx.cancelled() => break,
                item = stream.next() => item,
            };
            match item {
                Some(item) => self.handle(ctx, item).await,
                None => break,
            }
        }
    }
}

impl<T, S, F, H, Args> BackgroundService for Runner<T, F, H, Args>
where
    T: Send + 'static,
    S: Stream<Item = T> + Send + 'static,
    F: Fn(&ServiceContext) -> S + Send + Sync + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        match &self.0.source {
            Source::Factory(make) => self.consume(&ctx, make(&ctx)).await,
            Source::Receiver(rx) => {
                let mut rx = rx.lock().await;
                self.consume(&ctx, futures_util::stream::poll_fn(|cx| rx.poll_recv(cx))).await;
            }
        }
        Ok(())
    }
}
