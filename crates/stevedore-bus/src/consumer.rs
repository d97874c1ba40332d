//! Consumers: take messages from a broker, run a handler, acknowledge only after it succeeds.
//!
//! One engine serves every transport: [`Consumer`] pulls deliveries from a [`Source`] with
//! bounded prefetch and concurrency, retries a failing handler with backoff, dead-letters a
//! message with its reason once attempts run out (or at once when it cannot be decoded), and on
//! stop drains: it stops taking, lets in-flight handlers finish within the budget (the host's
//! remaining shutdown budget less [`ConsumerOptions::drain_reserve`], at most
//! [`ConsumerOptions::drain_timeout`]), and returns everything else to the broker.
//!
//! Handlers are [`MessageHandler`]s: the message first, then extractors resolved from a fresh
//! scope per attempt (see [`MessageHandler`] for the transaction semantics).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use stevedore::handler::run_payload_handler;
use stevedore::scope::Dependency;
use stevedore::{PayloadHandler, ServiceContext, ServiceSpec};
use tokio::sync::{Mutex, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::hosted::{BEAT_EVERY, Reporter};
use crate::{Backoff, BoxError, Health, Message, Status};

/// Handles one message: a [`PayloadHandler`] taking the [`Message`] first, then any extractors
/// ([`Singleton`](stevedore::Singleton), [`Scoped`](stevedore::Scoped),
/// [`Transient`](stevedore::Transient), [`ServiceContext`], [`CancellationToken`],
/// [`Extension<DeliveryInfo>`](stevedore::Extension)).
///
/// Each attempt runs in a fresh scope of the service's registry, and the scope ends with the
/// attempt's outcome *before* the message is acknowledged: a scoped transaction commits when
/// the handler returns `Ok` and rolls back otherwise, and a commit that fails counts as a failed
/// attempt (retried, never acknowledged). Returning `Err` makes the consumer retry (with
/// backoff) and finally dead-letter the message with the error as its reason. A panic counts as
/// an error.
///
/// Plain closures `Fn(Message) -> impl Future<Output = Result<(), E>>` (E: `Into<BoxError>`,
/// the closure `Clone`) are handlers with no extractors:
///
/// ```
/// use stevedore::Scoped;
/// use stevedore_bus::{BoxError, Message, consumer::MessageHandler};
/// fn assert_handler<Args>(_: impl MessageHandler<Args>) {}
/// assert_handler(|m: Message| async move {
///     let order: serde_json::Value = m.decode()?;
///     println!("{order}");
///     Ok::<(), BoxError>(())
/// });
/// struct Tx; // registered with `ServiceCollection::scoped_with_end`: commit or roll back
/// assert_handler(|m: Message, tx: Scoped<Tx>| async move {
///     let _tx = tx.lock().await;
///     println!("{}", m.id);
///     Ok::<(), BoxError>(())
/// });
/// ```
pub trait MessageHandler<Args>: PayloadHandler<Message, Args> {}

impl<Args, H: PayloadHandler<Message, Args>> MessageHandler<Args> for H {}

/// What a handler may know about the delivery it runs for, attached to each attempt's scope as
/// an [`Extension`](stevedore::Extension): take `Extension<DeliveryInfo>` as a handler (or
/// scoped factory) parameter.
///
/// ```
/// use stevedore::Extension;
/// use stevedore_bus::{BoxError, Message, consumer::{DeliveryInfo, MessageHandler}};
/// fn assert_handler<Args>(_: impl MessageHandler<Args>) {}
/// assert_handler(|_m: Message, Extension(info): Extension<DeliveryInfo>| async move {
///     if info.attempt > 1 {
///         println!("retrying {} ({})", info.id, info.attempt);
///     }
///     Ok::<(), BoxError>(())
/// });
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryInfo {
    /// The message id (stable across re-deliveries).
    pub id: Uuid,
    /// The message topic.
    pub topic: String,
    /// The message key.
    pub key: String,
    /// Which attempt this is, 1-based (in-process retries and, where the broker counts them,
    /// redeliveries).
    pub attempt: u32,
    /// The consumer's name (its queue or durable consumer).
    pub consumer: String,
}

/// The one place a handler is called: in a fresh scope of `ctx`, ended with the outcome before
/// returning, so the caller acknowledges only what committed. A panic becomes an error so the
/// message is retried and dead-lettered rather than lost.
async fn invoke<Args, H: MessageHandler<Args>>(
    handler: &H,
    ctx: &ServiceContext,
    message: Message,
    info: DeliveryInfo,
) -> Result<(), String> {
    let result = run_payload_handler(ctx, handler, message, None, |scope| scope.insert_extension(info)).await;
    if result.is_success() { Ok(()) } else { Err(result.error.unwrap_or_else(|| result.outcome.as_str().to_string())) }
}

/// How a consumer takes and retries messages.
#[derive(Debug, Clone)]
pub struct ConsumerOptions {
    /// How many unacknowledged messages the broker may push ahead (AMQP `basic.qos`, JetStream
    /// `max_ack_pending`).
    pub prefetch: u16,
    /// How many handlers run at once.
    pub concurrency: usize,
    /// Attempts before a message is dead-lettered (1 = no retry).
    pub max_attempts: u32,
    /// Delay between attempts of a failing handler.
    pub retry: Backoff,
    /// Delay between reconnection attempts while the broker is away.
    pub reconnect: Backoff,
    /// On stop, the most in-flight handlers may run before they are abandoned (their messages go
    /// back to the broker). Hosted, the drain also ends [`drain_reserve`](Self::drain_reserve)
    /// before the host's shutdown deadline, whichever comes first, so the host never abandons
    /// the consumer with messages unreturned; run directly, this is the whole budget. Default
    /// 30 s.
    pub drain_timeout: Duration,
    /// Hosted, how long before the host's shutdown deadline the drain ends, leaving time to give
    /// unfinished messages back to the broker. Default 500 ms.
    pub drain_reserve: Duration,
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        Self {
            prefetch: 32,
            concurrency: 8,
            max_attempts: 5,
            retry: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            reconnect: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
            drain_timeout: Duration::from_secs(30),
            drain_reserve: Duration::from_millis(500),
        }
    }
}

/// A broker-side message being processed. Implemented by each transport.
pub trait Delivery: Send + 'static {
    /// The decoded message, or why it cannot be decoded (it is then dead-lettered).
    fn message(&self) -> Result<Message, String>;
    /// Which attempt this is, 1-based, as far as the broker counts (JetStream does; AMQP
    /// reports 1).
    fn attempt(&self) -> u32 {
        1
    }
    /// True when the broker schedules retries itself ([`Delivery::retry_later`]); false when
    /// the consumer retries in process while holding the message.
    fn broker_retries(&self) -> bool {
        false
    }
    /// Acknowledges: the message is done.
    fn ack(self) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// Asks the broker to deliver the message again after `delay`.
    fn retry_later(self, delay: Duration) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// Gives the message back untouched (drain on stop).
    fn requeue(self) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// Moves the message to the dead-letter destination with `reason`, then removes it from the
    /// queue.
    fn dead_letter(self, reason: String, attempts: u32) -> impl Future<Output = Result<(), BoxError>> + Send;
}

/// Where deliveries come from. Implemented by each transport.
pub trait Source: Send + 'static {
    /// The delivery type.
    type Delivery: Delivery;
    /// A name for logs, metrics and health (the queue or durable consumer).
    fn name(&self) -> &str;
    /// (Re)connects, declares what it consumes from, and starts consuming with
    /// `options.prefetch` (and, where the broker counts deliveries, `options.max_attempts`).
    fn connect(&mut self, options: &ConsumerOptions) -> impl Future<Output = Result<(), BoxError>> + Send;
    /// The next delivery; `None` or an error means the connection is gone.
    fn next(&mut self) -> impl Future<Output = Option<Result<Self::Delivery, BoxError>>> + Send;
    /// Stops the broker from sending more and returns buffered, unstarted deliveries to it;
    /// returns how many were given back.
    fn stop(&mut self) -> impl Future<Output = usize> + Send;
    /// Closes the connection; anything still unacknowledged goes back to the broker.
    fn close(&mut self) -> impl Future<Output = ()> + Send;
}

/// What happened to one message, for metrics and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Acked,
    Retried,
    DeadLettered,
    Failed,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Acked => "acked",
            Outcome::Retried => "retried",
            Outcome::DeadLettered => "dead_lettered",
            Outcome::Failed => "ack_failed",
        }
    }
}

/// Runs a [`MessageHandler`] over a [`Source`] until cancelled. See the module docs for the
/// guarantees.
///
/// Hosted (the usual way), register it with [`Consumer::into_spec`], which declares the
/// handler's needs so [`HostBuilder::build`](stevedore::HostBuilder::build) checks them; each
/// message then resolves its extractors from the host's registry. [`Consumer::run`] runs it
/// outside a host, with an empty registry.
///
/// ```
/// use stevedore_bus::{BoxError, Message, Publisher, consumer::{Consumer, ConsumerOptions}};
/// use stevedore_bus::memory::InProcessBus;
/// use tokio_util::sync::CancellationToken;
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let bus = InProcessBus::new();
/// let queue = bus.queue("orders", &["orders.#"]);
/// bus.publish(&Message::new("orders.created", "o-1", "hi")).await.unwrap();
/// let stop = CancellationToken::new();
/// let s = stop.clone();
/// let consumer = Consumer::new(queue.source(), move |m: Message| {
///     let s = s.clone();
///     async move { assert_eq!(&m.payload[..], b"hi"); s.cancel(); Ok::<(), BoxError>(()) }
/// }, ConsumerOptions::default());
/// consumer.run(stop).await.unwrap();
/// assert!(queue.is_empty());
/// # });
/// ```
pub struct Consumer<S: Source, H, Args = ()> {
    source: Mutex<S>,
    handler: Arc<H>,
    options: ConsumerOptions,
    health: Health,
    name: String,
    _args: PhantomData<fn(Args)>,
}

/// Why a consumer stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    /// `run` was called while the consumer was already running.
    #[error("consumer {0} is already running")]
    AlreadyRunning(String),
}

impl<S: Source, Args: 'static, H: MessageHandler<Args>> Consumer<S, H, Args> {
    /// A consumer of `source` calling `handler` for each message.
    pub fn new(source: S, handler: H, options: ConsumerOptions) -> Self {
        let name = source.name().to_string();
        Self {
            source: Mutex::new(source),
            handler: Arc::new(handler),
            options,
            health: Health::new(),
            name,
            _args: PhantomData,
        }
    }

    /// What the handler's parameters need from the registry (for
    /// [`ServiceSpec::needs`] when registering with [`ServiceSpec::background`] yourself).
    pub fn dependencies() -> Vec<Dependency> {
        H::dependencies()
    }

    /// The consumer as a hosted background service named `name` (kind `consumer`), declaring the
    /// handler's needs so the host's build fails, naming the chain, when one is not registered.
    ///
    /// ```
    /// use stevedore::{Host, Scoped, ServiceCollection};
    /// use stevedore_bus::consumer::{Consumer, ConsumerOptions};
    /// use stevedore_bus::{BoxError, Message, memory::InProcessBus};
    ///
    /// struct Tx;
    /// let bus = InProcessBus::new();
    /// let consumer = Consumer::new(
    ///     bus.queue("billing", &["orders.#"]).source(),
    ///     |_m: Message, _tx: Scoped<Tx>| async move { Ok::<(), BoxError>(()) },
    ///     ConsumerOptions::default(),
    /// );
    /// let error = Host::builder()
    ///     .services(ServiceCollection::new()) // `Tx` is not registered
    ///     .add(consumer.into_spec("billing"))
    ///     .build()
    ///     .unwrap_err();
    /// assert!(error.to_string().contains("`billing` needs `Tx`"), "{error}");
    /// ```
    pub fn into_spec(self, name: impl Into<String>) -> ServiceSpec {
        ServiceSpec::background(name, self).kind("consumer").needs(H::dependencies())
    }

    /// The health handle: connection status for the host's health report.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The consumer's name (its queue or durable consumer).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Consumes until `stop` is cancelled, reconnecting with backoff whenever the broker goes
    /// away, then drains within [`ConsumerOptions::drain_timeout`]. Returns when drained.
    ///
    /// Runs outside any host: handler scopes come from an empty registry, so only handlers
    /// without registered dependencies (plain closures, `ServiceContext`, `CancellationToken`,
    /// `Extension<DeliveryInfo>`) can run. Use [`Consumer::run_in`] or host it for the rest.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), ConsumeError> {
        self.run_in(&ServiceContext::detached(self.name.clone(), stop)).await
    }

    /// Consumes until `ctx` is cancelled, each message in a fresh scope of `ctx`, then drains
    /// within the budget (see [`ConsumerOptions::drain_timeout`]). The hosted service calls
    /// this; tests and tools can pass [`ServiceContext::detached_with`] a registry.
    pub async fn run_in(&self, ctx: &ServiceContext) -> Result<(), ConsumeError> {
        let mut source = self.source.try_lock().map_err(|_| ConsumeError::AlreadyRunning(self.name.clone()))?;
        let stop = ctx.token().clone();
        let report = Reporter::new(ctx.clone());
        let opts = &self.options;
        let name = self.name.clone();
        let permits = Arc::new(Semaphore::new(opts.concurrency.clamp(1, Semaphore::MAX_PERMITS)));
        let mut tasks: JoinSet<Outcome> = JoinSet::new();
        let mut failures = 0u32;
        let connected = metrics::gauge!("stevedore_bus_consumer_connected", "consumer" => name.clone());

        'outer: while !stop.is_cancelled() {
            let attempt = tokio::select! {
                _ = stop.cancelled() => break 'outer,
                r = source.connect(opts) => r,
            };
            if let Err(error) = attempt {
                failures += 1;
                metrics::counter!("stevedore_bus_consumer_reconnects_total", "consumer" => name.clone()).increment(1);
                tracing::warn!(consumer = %name, attempt = failures, %error, "consumer cannot connect; retrying");
                self.health.set(Status::Reconnecting { attempt: failures, error: error.to_string() });
                if sleep_or_stop(opts.reconnect.delay(failures), &stop).await {
                    break 'outer;
                }
                continue;
            }
            failures = 0;
            connected.set(1.0);
            self.health.set(Status::Connected);
            tracing::info!(consumer = %name, "consumer connected");

            let mut beat = tokio::time::interval(BEAT_EVERY);
            loop {
                while let Some(done) = tasks.try_join_next() {
                    record(&name, done, &report);
                }
                report.queue(|q| q.in_flight = tasks.len() as u64);
                let permit = tokio::select! {
                    _ = stop.cancelled() => break 'outer,
                    p = permits.clone().acquire_owned() => match p {
                        Ok(p) => p,
                        Err(_) => break 'outer,
                    },
                };
                // Heartbeats must not cancel `next` (a JetStream pull request in the making is
                // not cancel-safe), so the future stays pinned across ticks.
                let next = {
                    let next = source.next();
                    tokio::pin!(next);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => break None,
                            _ = beat.tick() => report.beat(),
                            n = &mut next => break Some(n),
                        }
                    }
                };
                let Some(next) = next else { break 'outer };
                match next {
                    Some(Ok(delivery)) => {
                        let handler = self.handler.clone();
                        let (opts, ctx, name) = (opts.clone(), ctx.clone(), name.clone());
                        tasks.spawn(async move {
                            let _permit = permit;
                            process(delivery, &*handler, &ctx, name, &opts).await
                        });
                    }
                    Some(Err(error)) => {
                        self.lost(&name, &connected, error.to_string(), &mut failures);
                        break;
                    }
                    None => {
                        self.lost(&name, &connected, "delivery stream ended".into(), &mut failures);
                        break;
                    }
                }
            }
            if sleep_or_stop(opts.reconnect.delay(failures.max(1)), &stop).await {
                break 'outer;
            }
        }

        // Drain: stop taking, finish in-flight within the budget, give back the rest.
        self.health.set(Status::Draining);
        let returned = source.stop().await;
        let in_flight = tasks.len();
        tracing::info!(consumer = %name, in_flight, returned, "consumer draining");
        let until = drain_until(Instant::now(), ctx.lifetime().stop_deadline(), opts);
        tracing::debug!(consumer = %name, budget = ?until.saturating_duration_since(Instant::now()), "drain budget");
        let deadline = tokio::time::sleep_until(until);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                done = tasks.join_next() => match done {
                    Some(done) => record(&name, done, &report),
                    None => break,
                },
                _ = &mut deadline => {
                    let abandoned = tasks.len();
                    tracing::warn!(consumer = %name, abandoned, "drain budget exceeded; unfinished messages go back to the broker");
                    metrics::counter!("stevedore_bus_consumer_abandoned_total", "consumer" => name.clone())
                        .increment(abandoned as u64);
                    tasks.abort_all();
                    while tasks.join_next().await.is_some() {}
                    break;
                }
            }
        }
        source.close().await;
        connected.set(0.0);
        self.health.set(Status::Stopped);
        Ok(())
    }

    fn lost(&self, name: &str, connected: &metrics::Gauge, error: String, failures: &mut u32) {
        *failures += 1;
        connected.set(0.0);
        metrics::counter!("stevedore_bus_consumer_reconnects_total", "consumer" => name.to_string()).increment(1);
        tracing::warn!(consumer = %name, %error, "consumer lost its broker; reconnecting");
        self.health.set(Status::Reconnecting { attempt: *failures, error });
    }
}

/// When a drain that starts at `now` must give up on in-flight handlers: after `drain_timeout`,
/// or `drain_reserve` before the host's shutdown deadline when there is one, whichever is first.
fn drain_until(now: Instant, host_deadline: Option<Instant>, opts: &ConsumerOptions) -> Instant {
    // A timeout past what the clock can add (`Duration::MAX`: wait for the handlers) is thirty years.
    const FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);
    let own = now.checked_add(opts.drain_timeout).or_else(|| now.checked_add(FAR)).unwrap_or(now);
    match host_deadline {
        Some(deadline) => {
            let host = deadline.checked_sub(opts.drain_reserve).unwrap_or(now).max(now);
            own.min(host)
        }
        None => own,
    }
}

fn record(name: &str, done: Result<Outcome, tokio::task::JoinError>, report: &Reporter) {
    let outcome = done.unwrap_or(Outcome::Failed);
    if outcome == Outcome::DeadLettered {
        report.queue(|q| q.failed += 1);
    }
    metrics::counter!("stevedore_bus_consumed_total", "consumer" => name.to_string(), "outcome" => outcome.label())
        .increment(1);
}

/// Sleeps for `delay`; returns true if `stop` fired first.
async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

async fn process<D: Delivery, Args, H: MessageHandler<Args>>(
    delivery: D,
    handler: &H,
    ctx: &ServiceContext,
    consumer: String,
    opts: &ConsumerOptions,
) -> Outcome {
    let message = match delivery.message() {
        Ok(m) => m,
        Err(reason) => {
            let attempt = delivery.attempt();
            tracing::error!(%reason, "undecodable message; dead-lettering");
            return match delivery.dead_letter(format!("malformed message: {reason}"), attempt).await {
                Ok(()) => Outcome::DeadLettered,
                Err(error) => {
                    tracing::warn!(%error, "dead-lettering failed; the broker will redeliver");
                    Outcome::Failed
                }
            };
        }
    };
    let mut attempt = delivery.attempt().max(1);
    loop {
        let info = DeliveryInfo {
            id: message.id,
            topic: message.topic.clone(),
            key: message.key.clone(),
            attempt,
            consumer: consumer.clone(),
        };
        match invoke(handler, ctx, message.clone(), info).await {
            Ok(()) => {
                return match delivery.ack().await {
                    Ok(()) => Outcome::Acked,
                    Err(error) => {
                        tracing::warn!(id = %message.id, %error, "ack failed; the broker will redeliver");
                        Outcome::Failed
                    }
                };
            }
            Err(error) => {
                if attempt >= opts.max_attempts {
                    tracing::error!(id = %message.id, attempt, %error, "handler failed for the last time; dead-lettering");
                    return match delivery.dead_letter(error, attempt).await {
                        Ok(()) => Outcome::DeadLettered,
                        Err(e) => {
                            tracing::warn!(id = %message.id, error = %e, "dead-lettering failed; the broker will redeliver");
                            Outcome::Failed
                        }
                    };
                }
                let delay = opts.retry.delay(attempt);
                tracing::warn!(id = %message.id, attempt, %error, ?delay, "handler failed; retrying");
                if delivery.broker_retries() {
                    return match delivery.retry_later(delay).await {
                        Ok(()) => Outcome::Retried,
                        Err(_) => Outcome::Failed,
                    };
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(drain_timeout: u64, drain_reserve: u64) -> ConsumerOptions {
        ConsumerOptions {
            drain_timeout: Duration::from_millis(drain_timeout),
            drain_reserve: Duration::from_millis(drain_reserve),
            ..ConsumerOptions::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn drain_ends_at_the_earlier_of_its_own_bound_and_the_host_deadline_less_the_reserve() {
        let now = Instant::now();
        let ms = Duration::from_millis;
        // Outside a host: the own bound only.
        assert_eq!(drain_until(now, None, &opts(4000, 500)), now + ms(4000));
        // A generous host budget: the own bound is the upper bound.
        assert_eq!(drain_until(now, Some(now + ms(30_000)), &opts(4000, 500)), now + ms(4000));
        // A tight host budget: stop the reserve before its deadline.
        assert_eq!(drain_until(now, Some(now + ms(2000)), &opts(4000, 500)), now + ms(1500));
        // Already inside the reserve: give everything back at once.
        assert_eq!(drain_until(now, Some(now + ms(300)), &opts(4000, 500)), now);
        assert_eq!(drain_until(now + ms(5000), Some(now + ms(1000)), &opts(4000, 500)), now + ms(5000));
        // No bound of its own: the host's deadline, and outside a host a far one, not a panic.
        let forever = ConsumerOptions { drain_timeout: Duration::MAX, ..opts(0, 500) };
        assert_eq!(drain_until(now, Some(now + ms(2000)), &forever), now + ms(1500));
        assert!(drain_until(now, None, &forever) > now + Duration::from_secs(3600 * 24 * 365));
    }
}
