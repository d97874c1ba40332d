//! RabbitMQ transport (AMQP 0-9-1 through lapin).
//!
//! Topology, declared by both the publisher and the consumers (idempotently, with the same
//! arguments):
//! - `exchange`: a durable topic exchange; a message's topic is its routing key;
//! - `exchange.dlx`: a durable direct exchange for dead letters;
//! - each queue: durable, with `x-dead-letter-exchange = exchange.dlx` and
//!   `x-dead-letter-routing-key = queue`, bound to `exchange` with its patterns;
//! - each queue's `queue.dlq`: durable, bound to `exchange.dlx` with the queue's name.
//!
//! Messages are persistent (delivery mode 2) and every publish waits for the publisher confirm.
//! The message id travels as the AMQP `message_id`, the key as the `stevedore-key` header. A
//! dead-lettered message is republished (confirmed) to `exchange.dlx` with the
//! `stevedore-error` and `stevedore-attempts` headers, then acknowledged.
//!
//! Retries happen in process while the consumer holds the message (classic queues do not count
//! deliveries), so a consumer restart starts the count again, and a message that crashes the
//! consumer process itself is redelivered each time it restarts.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties, ExchangeKind, PublisherConfirm};
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::consumer::{ConsumerOptions, Delivery, Source};
use crate::message::{ATTEMPTS_HEADER, ERROR_HEADER, KEY_HEADER};
use crate::publisher::{BatchOutcome, PendingConfirms};
use crate::{BoxError, Message, PublishError, Publisher};

const BROKER: &str = "rabbitmq";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where and how to reach RabbitMQ.
#[derive(Debug, Clone)]
pub struct AmqpConfig {
    /// `amqp://user:pass@host:port/vhost`.
    pub url: String,
    /// The topic exchange messages are published to.
    pub exchange: String,
    /// How long to wait for a publisher confirm before giving up on a message.
    pub confirm_timeout: Duration,
}

impl AmqpConfig {
    /// Config for `exchange` on the broker at `url`, with a 10 s confirm timeout.
    pub fn new(url: impl Into<String>, exchange: impl Into<String>) -> Self {
        Self { url: url.into(), exchange: exchange.into(), confirm_timeout: Duration::from_secs(10) }
    }

    /// The dead-letter exchange's name.
    pub fn dead_letter_exchange(&self) -> String {
        format!("{}.dlx", self.exchange)
    }
}

struct Link {
    conn: Connection,
    channel: Channel,
}

impl Link {
    async fn open(config: &AmqpConfig) -> Result<Self, PublishError> {
        let unavailable = |e: lapin::Error| PublishError::Unavailable { broker: BROKER, source: e.into() };
        // A black-holed address would otherwise hang the relay or consumer on connect.
        let conn =
            tokio::time::timeout(CONNECT_TIMEOUT, Connection::connect(&config.url, ConnectionProperties::default()))
                .await
                .map_err(|_| PublishError::Unavailable { broker: BROKER, source: "connect timed out".into() })?
                .map_err(unavailable)?;
        let channel = conn.create_channel().await.map_err(unavailable)?;
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(unavailable)?;
        Ok(Self { conn, channel })
    }

    async fn close(&self) {
        let _ = self.channel.close(200, "closing".into()).await;
        let _ = self.conn.close(200, "closing".into()).await;
    }
}

fn topology_err(what: String) -> impl FnOnce(lapin::Error) -> PublishError {
    move |e| PublishError::Topology { broker: BROKER, what, source: e.into() }
}

async fn declare_exchanges(channel: &Channel, config: &AmqpConfig) -> Result<(), PublishError> {
    let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
    channel
        .exchange_declare(config.exchange.as_str().into(), ExchangeKind::Topic, durable, FieldTable::default())
        .await
        .map_err(topology_err(format!("exchange {}", config.exchange)))?;
    let dlx = config.dead_letter_exchange();
    channel
        .exchange_declare(dlx.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
        .await
        .map_err(topology_err(format!("exchange {dlx}")))?;
    Ok(())
}

async fn declare_queue(
    channel: &Channel,
    config: &AmqpConfig,
    queue: &str,
    bindings: &[String],
) -> Result<(), PublishError> {
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    let dlx = config.dead_letter_exchange();
    let dlq = format!("{queue}.dlq");
    channel
        .queue_declare(dlq.as_str().into(), durable, FieldTable::default())
        .await
        .map_err(topology_err(format!("queue {dlq}")))?;
    channel
        .queue_bind(
            dlq.as_str().into(),
            dlx.as_str().into(),
            queue.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .map_err(topology_err(format!("binding {dlq} to {dlx}")))?;
    let mut args = FieldTable::default();
    args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString(dlx.as_str().into()));
    args.insert("x-dead-letter-routing-key".into(), AMQPValue::LongString(queue.into()));
    channel.queue_declare(queue.into(), durable, args).await.map_err(topology_err(format!("queue {queue}")))?;
    for pattern in bindings {
        let routing = ShortString::try_new(pattern.as_str()).map_err(|e| PublishError::Topology {
            broker: BROKER,
            what: format!("binding pattern {pattern:.40}"),
            source: e.into(),
        })?;
        channel
            .queue_bind(
                queue.into(),
                config.exchange.as_str().into(),
                routing,
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .map_err(topology_err(format!("binding {queue} to {} with {pattern}", config.exchange)))?;
    }
    Ok(())
}

/// AMQP names are short strings (at most 255 bytes); check ours, with room for the `.dlx` and
/// `.dlq` suffixes, before lapin would refuse them.
fn check_names<'a>(config: &'a AmqpConfig, queues: impl Iterator<Item = &'a str>) -> Result<(), PublishError> {
    let names = std::iter::once(config.exchange.as_str()).chain(queues);
    for name in names {
        if name.len() > 250 {
            return Err(PublishError::Topology {
                broker: BROKER,
                what: format!("{name:.40}..."),
                source: "AMQP names must be at most 250 bytes here (255 with the .dlx/.dlq suffix)".into(),
            });
        }
    }
    Ok(())
}

fn properties(message: &Message, extra: &[(&str, String)]) -> BasicProperties {
    let mut headers = FieldTable::default();
    for (k, v) in &message.headers {
        headers.insert(k.as_str().into(), AMQPValue::LongString(v.as_str().into()));
    }
    headers.insert(KEY_HEADER.into(), AMQPValue::LongString(message.key.as_str().into()));
    for (k, v) in extra {
        headers.insert((*k).into(), AMQPValue::LongString(v.as_str().into()));
    }
    BasicProperties::default()
        .with_message_id(message.id.to_string().into())
        .with_delivery_mode(2)
        .with_headers(headers)
}

fn value_string(v: &AMQPValue) -> Option<String> {
    match v {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_string()),
        _ => None,
    }
}

fn decode(d: &lapin::message::Delivery) -> Result<Message, String> {
    let id = d.properties.message_id().as_ref().ok_or_else(|| "no message_id property".to_string())?;
    let id = Uuid::parse_str(id.as_str()).map_err(|e| format!("message_id {:?} is not a UUID: {e}", id.as_str()))?;
    let mut headers = BTreeMap::new();
    let mut key = String::new();
    if let Some(table) = d.properties.headers() {
        for (k, v) in table.inner() {
            let Some(v) = value_string(v) else { continue };
            if k.as_str() == KEY_HEADER {
                key = v;
            } else if !k.as_str().starts_with("x-") {
                headers.insert(k.as_str().to_string(), v);
            }
        }
    }
    Ok(Message { id, topic: d.routing_key.as_str().to_string(), key, payload: d.data.clone().into(), headers })
}

async fn await_confirm(confirm: PublisherConfirm, id: Uuid, timeout: Duration) -> Result<(), PublishError> {
    match tokio::time::timeout(timeout, confirm).await {
        Err(_) => Err(PublishError::Timeout { broker: BROKER, id, timeout }),
        Ok(Err(e)) => Err(PublishError::Unavailable { broker: BROKER, source: e.into() }),
        Ok(Ok(c)) if c.is_nack() => {
            Err(PublishError::Rejected { broker: BROKER, id, reason: "negative publisher confirm".into() })
        }
        Ok(Ok(_)) => Ok(()),
    }
}

/// Publishes to a RabbitMQ topic exchange with publisher confirms. Connects lazily (or with
/// [`AmqpPublisher::start`]) and reconnects on the next publish after a failure.
///
/// ```no_run
/// use stevedore_bus::{Message, Publisher, amqp::{AmqpConfig, AmqpPublisher}};
/// # async fn f() -> Result<(), stevedore_bus::PublishError> {
/// let publisher = AmqpPublisher::new(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "shop"))
///     .with_queue("billing", &["orders.*"]);
/// publisher.start().await?; // declares the exchange and the billing queue
/// publisher.publish(&Message::new("orders.created", "o-1", "{}")).await?;
/// # Ok(()) }
/// ```
pub struct AmqpPublisher {
    config: AmqpConfig,
    queues: Vec<(String, Vec<String>)>,
    link: Mutex<Option<Arc<Link>>>,
}

impl AmqpPublisher {
    /// A publisher to `config.exchange`.
    pub fn new(config: AmqpConfig) -> Self {
        Self { config, queues: Vec::new(), link: Mutex::new(None) }
    }

    /// Also declares `queue` bound with `patterns` whenever the publisher connects, so messages
    /// published before any consumer starts are kept.
    pub fn with_queue(mut self, queue: &str, patterns: &[&str]) -> Self {
        self.queues.push((queue.to_string(), patterns.iter().map(|p| p.to_string()).collect()));
        self
    }

    /// Connects and declares the topology now rather than on the first publish.
    pub async fn start(&self) -> Result<(), PublishError> {
        self.link().await.map(|_| ())
    }

    async fn link(&self) -> Result<Arc<Link>, PublishError> {
        let mut guard = self.link.lock().await;
        if let Some(link) = &*guard
            && link.channel.status().connected()
        {
            return Ok(link.clone());
        }
        if let Some(old) = guard.take() {
            old.close().await;
        }
        check_names(&self.config, self.queues.iter().map(|(q, _)| q.as_str()))?;
        let link = Link::open(&self.config).await?;
        declare_exchanges(&link.channel, &self.config).await?;
        for (queue, patterns) in &self.queues {
            declare_queue(&link.channel, &self.config, queue, patterns).await?;
        }
        let link = Arc::new(link);
        *guard = Some(link.clone());
        Ok(link)
    }

    async fn forget(&self, failed: &Arc<Link>) {
        let mut guard = self.link.lock().await;
        if guard.as_ref().is_some_and(|l| Arc::ptr_eq(l, failed))
            && let Some(old) = guard.take()
        {
            old.close().await;
        }
    }

    async fn send(&self, link: &Link, message: &Message) -> Result<PublisherConfirm, PublishError> {
        message.validate().map_err(|reason| PublishError::Invalid { id: message.id, reason })?;
        link.channel
            .basic_publish(
                self.config.exchange.as_str().into(),
                message.topic.as_str().into(),
                BasicPublishOptions::default(),
                &message.payload,
                properties(message, &[]),
            )
            .await
            .map_err(|e| PublishError::Unavailable { broker: BROKER, source: e.into() })
    }
}

impl Publisher for AmqpPublisher {
    async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let link = self.link().await?;
        let result = match self.send(&link, message).await {
            Ok(confirm) => await_confirm(confirm, message.id, self.config.confirm_timeout).await,
            Err(e) => Err(e),
        };
        if matches!(result, Err(PublishError::Unavailable { .. } | PublishError::Timeout { .. })) {
            self.forget(&link).await;
        }
        result
    }

    async fn publish_batch(&self, messages: &[Message]) -> BatchOutcome {
        self.send_batch(messages).await.await
    }

    async fn send_batch(&self, messages: &[Message]) -> PendingConfirms {
        let link = match self.link().await {
            Ok(l) => l,
            Err(error) => return PendingConfirms::ready(BatchOutcome { confirmed: 0, error: Some(error) }),
        };
        let mut confirms = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            match self.send(&link, m).await {
                Ok(c) => confirms.push((m.id, c)),
                Err(e) => {
                    send_error = Some(e);
                    break;
                }
            }
        }
        if matches!(send_error, Some(PublishError::Unavailable { .. })) {
            self.forget(&link).await;
        }
        // A dropped connection also shows in the channel status, so the next batch reconnects
        // even when only a confirm failed.
        let timeout = self.config.confirm_timeout;
        PendingConfirms::new(async move {
            let mut confirmed = 0;
            for (id, c) in confirms {
                match await_confirm(c, id, timeout).await {
                    Ok(()) => confirmed += 1,
                    // Later confirms are not awaited: those messages are sent again.
                    Err(e) => return BatchOutcome { confirmed, error: Some(e) },
                }
            }
            BatchOutcome { confirmed, error: send_error }
        })
    }
}

/// Consumes one RabbitMQ queue, declaring it (with its dead-letter queue) on connect.
///
/// ```no_run
/// use stevedore_bus::{BoxError, Message, amqp::{AmqpConfig, AmqpSource}};
/// use stevedore_bus::consumer::{Consumer, ConsumerOptions};
/// # async fn f() {
/// let source = AmqpSource::new(AmqpConfig::new("amqp://guest:guest@127.0.0.1:5672/%2f", "shop"), "billing", &["orders.*"]);
/// let consumer = Consumer::new(source, |m: Message| async move {
///     println!("{}", m.id);
///     Ok::<(), BoxError>(())
/// }, ConsumerOptions::default());
/// consumer.run(tokio_util::sync::CancellationToken::new()).await.unwrap();
/// # }
/// ```
pub struct AmqpSource {
    config: AmqpConfig,
    queue: String,
    bindings: Vec<String>,
    link: Option<Link>,
    consumer: Option<lapin::Consumer>,
}

impl AmqpSource {
    /// A source for `queue`, bound to `config.exchange` with `patterns`.
    pub fn new(config: AmqpConfig, queue: &str, patterns: &[&str]) -> Self {
        Self {
            config,
            queue: queue.to_string(),
            bindings: patterns.iter().map(|p| p.to_string()).collect(),
            link: None,
            consumer: None,
        }
    }

    /// The dead-letter queue's name (`queue.dlq`).
    pub fn dead_letter_queue(&self) -> String {
        format!("{}.dlq", self.queue)
    }
}

impl Source for AmqpSource {
    type Delivery = AmqpDelivery;

    fn name(&self) -> &str {
        &self.queue
    }

    async fn connect(&mut self, options: &ConsumerOptions) -> Result<(), BoxError> {
        self.close().await;
        check_names(&self.config, std::iter::once(self.queue.as_str()))?;
        let link = Link::open(&self.config).await?;
        link.channel.basic_qos(options.prefetch, BasicQosOptions::default()).await?;
        declare_exchanges(&link.channel, &self.config).await?;
        declare_queue(&link.channel, &self.config, &self.queue, &self.bindings).await?;
        let consumer = link
            .channel
            .basic_consume(
                self.queue.as_str().into(),
                ShortString::from(""),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        self.consumer = Some(consumer);
        self.link = Some(link);
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<AmqpDelivery, BoxError>> {
        let (Some(consumer), Some(link)) = (&mut self.consumer, &self.link) else {
            return None;
        };
        match consumer.next().await? {
            Ok(inner) => Some(Ok(AmqpDelivery {
                inner,
                channel: link.channel.clone(),
                config: self.config.clone(),
                queue: self.queue.clone(),
            })),
            Err(e) => Some(Err(e.into())),
        }
    }

    async fn stop(&mut self) -> usize {
        let (Some(consumer), Some(link)) = (&mut self.consumer, &self.link) else {
            return 0;
        };
        let _ = link.channel.basic_cancel(consumer.tag(), BasicCancelOptions::default()).await;
        let mut returned = 0;
        // Give back what was prefetched but not started; a short quiet gap means none is left.
        while let Ok(Some(Ok(d))) = tokio::time::timeout(Duration::from_millis(100), consumer.next()).await {
            let _ = d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            returned += 1;
        }
        returned
    }

    async fn close(&mut self) {
        self.consumer = None;
        if let Some(link) = self.link.take() {
            link.close().await;
        }
    }
}

/// A message received from RabbitMQ.
pub struct AmqpDelivery {
    inner: lapin::message::Delivery,
    channel: Channel,
    config: AmqpConfig,
    queue: String,
}

impl Delivery for AmqpDelivery {
    fn message(&self) -> Result<Message, String> {
        decode(&self.inner)
    }

    async fn ack(self) -> Result<(), BoxError> {
        self.inner.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }

    async fn retry_later(self, delay: Duration) -> Result<(), BoxError> {
        tokio::time::sleep(delay).await;
        self.requeue().await
    }

    async fn requeue(self) -> Result<(), BoxError> {
        self.inner.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await?;
        Ok(())
    }

    async fn dead_letter(self, reason: String, attempts: u32) -> Result<(), BoxError> {
        let mut props = self.inner.properties.clone();
        let mut headers = props.headers().clone().unwrap_or_default();
        headers.insert(ERROR_HEADER.into(), AMQPValue::LongString(reason.as_str().into()));
        headers.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongString(attempts.to_string().as_str().into()));
        headers.insert("stevedore-topic".into(), AMQPValue::LongString(self.inner.routing_key.as_str().into()));
        props = props.with_headers(headers).with_delivery_mode(2);
        let id = decode(&self.inner).map(|m| m.id).unwrap_or_default();
        let confirm = self
            .channel
            .basic_publish(
                self.config.dead_letter_exchange().as_str().into(),
                self.queue.as_str().into(),
                BasicPublishOptions::default(),
                &self.inner.data,
                props,
            )
            .await?;
        await_confirm(confirm, id, self.config.confirm_timeout).await?;
        self.inner.acker.ack(BasicAckOptions::default()).await?;
        Ok(())
    }
}

/// Deletes what the publisher and the sources declared: each of `queues` with its `.dlq`, and
/// the exchange with its `.dlx`. Messages in them are lost; for tests, benchmarks and
/// decommissioning.
pub async fn delete_topology(config: &AmqpConfig, queues: &[&str]) -> Result<(), PublishError> {
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    check_names(config, queues.iter().copied())?;
    let link = Link::open(config).await?;
    let mut result = Ok(());
    for q in queues {
        for name in [q.to_string(), format!("{q}.dlq")] {
            if let Err(e) = link.channel.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await {
                result = Err(topology_err(format!("deleting queue {name}"))(e));
            }
        }
    }
    for name in [config.exchange.clone(), config.dead_letter_exchange()] {
        if let Err(e) = link.channel.exchange_delete(name.as_str().into(), ExchangeDeleteOptions::default()).await {
            result = Err(topology_err(format!("deleting exchange {name}"))(e));
        }
    }
    link.close().await;
    result
}

/// Reads a dead-lettered message's reason from its headers.
pub fn dead_letter_reason(properties: &BasicProperties) -> Option<String> {
    properties.headers().as_ref()?.inner().get(ERROR_HEADER).and_then(value_string)
}
