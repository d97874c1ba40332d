//! The publisher interface every transport implements.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use uuid::Uuid;

use crate::{BoxError, Message};

/// Why a publish failed. Every variant names the broker; none of them means the message was
/// delivered, so the caller (usually the outbox relay) sends it again later.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The broker could not be reached or the connection dropped.
    #[error("{broker} is unavailable: {source}")]
    Unavailable {
        /// Which broker (`rabbitmq`, `nats`, `in-process`).
        broker: &'static str,
        /// The transport error.
        #[source]
        source: BoxError,
    },
    /// Declaring the exchange, queues or stream failed.
    #[error("{broker}: declaring {what} failed: {source}")]
    Topology {
        /// Which broker.
        broker: &'static str,
        /// The exchange, queue or stream being declared.
        what: String,
        /// The broker's error.
        #[source]
        source: BoxError,
    },
    /// The broker refused the message (negative confirm).
    #[error("{broker} refused message {id}: {reason}")]
    Rejected {
        /// Which broker.
        broker: &'static str,
        /// The refused message.
        id: Uuid,
        /// What the broker said.
        reason: String,
    },
    /// The message can never be published as it is (see [`Message::validate`]); retrying will
    /// not help, so the relay sets it aside.
    #[error("message {id} cannot be published: {reason}")]
    Invalid {
        /// The message at fault.
        id: Uuid,
        /// What is wrong with it.
        reason: String,
    },
    /// No confirm arrived in time; the message may or may not have been stored.
    #[error("{broker} did not confirm message {id} within {timeout:?}")]
    Timeout {
        /// Which broker.
        broker: &'static str,
        /// The unconfirmed message.
        id: Uuid,
        /// How long we waited.
        timeout: Duration,
    },
}

/// The outcome of [`Publisher::publish_batch`]: the first `confirmed` messages were confirmed by
/// the broker, in order; if `error` is set, the rest were not (they may still have arrived, so a
/// retry can duplicate them, never lose them).
#[derive(Debug)]
pub struct BatchOutcome {
    /// Length of the confirmed prefix.
    pub confirmed: usize,
    /// Why the batch stopped early.
    pub error: Option<PublishError>,
}

/// The confirms of a batch already sent, to be awaited later (see [`Publisher::send_batch`]).
pub struct PendingConfirms(Pin<Box<dyn Future<Output = BatchOutcome> + Send>>);

impl PendingConfirms {
    /// Confirms that `confirms` will resolve.
    pub fn new(confirms: impl Future<Output = BatchOutcome> + Send + 'static) -> Self {
        Self(Box::pin(confirms))
    }

    /// An outcome already known.
    pub fn ready(outcome: BatchOutcome) -> Self {
        Self::new(std::future::ready(outcome))
    }
}

impl Future for PendingConfirms {
    type Output = BatchOutcome;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<BatchOutcome> {
        self.0.as_mut().poll(cx)
    }
}

impl std::fmt::Debug for PendingConfirms {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PendingConfirms")
    }
}

/// Sends messages to a broker and resolves only once the broker has taken responsibility for
/// them (publisher confirm, JetStream ack).
///
/// ```
/// use stevedore_bus::{Message, Publisher, memory::InProcessBus};
/// # tokio_test_block_on(async {
/// let bus = InProcessBus::new();
/// let orders = bus.queue("orders", &["orders.*"]);
/// bus.publish(&Message::new("orders.created", "o-1", "{}")).await?;
/// assert_eq!(orders.len(), 1);
/// # Ok::<(), stevedore_bus::PublishError>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
pub trait Publisher: Send + Sync + 'static {
    /// Publishes one message and waits for the broker's confirm.
    fn publish(&self, message: &Message) -> impl Future<Output = Result<(), PublishError>> + Send;

    /// Publishes `messages` in order and reports the confirmed prefix. Transports override this
    /// to pipeline: send all, then wait for all confirms.
    fn publish_batch(&self, messages: &[Message]) -> impl Future<Output = BatchOutcome> + Send {
        async move {
            for (i, m) in messages.iter().enumerate() {
                if let Err(reason) = m.validate() {
                    return BatchOutcome { confirmed: i, error: Some(PublishError::Invalid { id: m.id, reason }) };
                }
                if let Err(error) = self.publish(m).await {
                    return BatchOutcome { confirmed: i, error: Some(error) };
                }
            }
            BatchOutcome { confirmed: messages.len(), error: None }
        }
    }

    /// Sends `messages` in order and returns their confirms without waiting for them, so the
    /// caller can send the next batch meanwhile (the relay keeps two batches in flight this
    /// way). A later call's messages go out after these. The default publishes and confirms
    /// before returning.
    #[allow(clippy::async_yields_async)] // yielding the confirms, unawaited, is the point
    fn send_batch(&self, messages: &[Message]) -> impl Future<Output = PendingConfirms> + Send {
        async move {
            let outcome = self.publish_batch(messages).await;
            PendingConfirms::ready(outcome)
        }
    }
}
