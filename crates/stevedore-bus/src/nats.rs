//! NATS JetStream transport (async-nats).
//!
//! The publisher ensures a file-backed stream over the configured subjects and waits for
//! JetStream's publish acknowledgement; a message's topic is its subject. The message id
//! travels as `Nats-Msg-Id`, so JetStream itself drops a re-sent duplicate inside the stream's
//! duplicate window; the key travels as the `stevedore-key` header.
//!
//! A consumer is a durable pull consumer with explicit acks, `max_ack_pending = prefetch` and
//! `max_deliver = max_attempts + 1`. A failed message is negatively acknowledged with the
//! backoff delay, so JetStream schedules the retry and counts deliveries; after the last attempt
//! it is published (acknowledged) to the dead-letter stream `STREAM_DLQ`, subject
//! `stevedore.dlq.STREAM.CONSUMER`, with the `stevedore-error` and `stevedore-attempts`
//! headers, and terminated. The one extra delivery JetStream allows covers a consumer that
//! crashed during its last attempt: that delivery is dead-lettered if it fails again.
//!
//! Every delivery counts, including one given back at stop: a message given back on its last
//! allowed delivery is dead-lettered with the reason `given back at stop on its last allowed
//! delivery` instead of being stranded. A message that crashes the consumer process itself is
//! delivered `max_attempts + 1` times, then JetStream stops and publishes its MAX_DELIVERIES
//! advisory; the message stays in the stream.

use std::str::FromStr;
use std::time::Duration;

use async_nats::header::{HeaderMap, HeaderName, NATS_MESSAGE_ID};
use async_nats::jetstream::{self, AckKind, consumer::pull, stream};
use futures_util::StreamExt;
use tokio::sync::Mutex;
use uuid::Uuid;

use crate::consumer::{ConsumerOptions, Delivery, Source};
use crate::message::{ATTEMPTS_HEADER, ERROR_HEADER, KEY_HEADER};
use crate::publisher::{BatchOutcome, PendingConfirms};
use crate::{BoxError, Message, PublishError, Publisher};

const BROKER: &str = "nats";

/// Where and how to reach NATS, and the stream to use.
#[derive(Debug, Clone)]
pub struct NatsConfig {
    /// `nats://host:port`.
    pub url: String,
    /// JetStream stream name (no `.`, spaces or wildcards).
    pub stream: String,
    /// Subjects the stream stores, e.g. `orders.>`.
    pub subjects: Vec<String>,
    /// How long to wait for JetStream's publish acknowledgement.
    pub ack_timeout: Duration,
}

impl NatsConfig {
    /// Config for `stream` over `subjects` on the server at `url`, with a 10 s ack timeout.
    pub fn new(url: impl Into<String>, stream: impl Into<String>, subjects: &[&str]) -> Self {
        Self {
            url: url.into(),
            stream: stream.into(),
            subjects: subjects.iter().map(|s| s.to_string()).collect(),
            ack_timeout: Duration::from_secs(10),
        }
    }

    /// The dead-letter stream's name.
    pub fn dead_letter_stream(&self) -> String {
        format!("{}_DLQ", self.stream)
    }

    /// The subject dead letters of `consumer` are published to.
    pub fn dead_letter_subject(&self, consumer: &str) -> String {
        format!("stevedore.dlq.{}.{}", self.stream, consumer)
    }

    async fn connect(&self) -> Result<(async_nats::Client, jetstream::Context), PublishError> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(5))
            .connect(&self.url)
            .await
            .map_err(|e| PublishError::Unavailable { broker: BROKER, source: e.into() })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(self.ack_timeout);
        js.get_or_create_stream(stream::Config {
            name: self.stream.clone(),
            subjects: self.subjects.clone(),
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .map_err(|e| PublishError::Topology {
            broker: BROKER,
            what: format!("stream {}", self.stream),
            source: e.into(),
        })?;
        Ok((client, js))
    }
}

/// Deletes the stream and its dead-letter stream (with their consumers and messages); for
/// tests, benchmarks and decommissioning. A stream that does not exist is not an error.
pub async fn delete_streams(config: &NatsConfig) -> Result<(), PublishError> {
    let client = async_nats::connect(&config.url)
        .await
        .map_err(|e| PublishError::Unavailable { broker: BROKER, source: e.into() })?;
    let js = jetstream::new(client);
    for name in [config.stream.clone(), config.dead_letter_stream()] {
        if let Err(e) = js.delete_stream(&name).await {
            let missing = matches!(e.kind(), jetstream::context::DeleteStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND);
            if !missing {
                return Err(PublishError::Topology {
                    broker: BROKER,
                    what: format!("deleting stream {name}"),
                    source: e.into(),
                });
            }
        }
    }
    Ok(())
}

/// A header value without line breaks (NATS refuses them).
fn header_value(s: &str) -> String {
    s.replace(['\r', '\n'], " ")
}

fn headers_for(message: &Message) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in &message.headers {
        // `Message::validate` has checked the names; skip rather than panic on the impossible.
        if let Ok(name) = HeaderName::from_str(k) {
            h.insert(name, header_value(v).as_str());
        }
    }
    h.insert(NATS_MESSAGE_ID, message.id.to_string().as_str());
    h.insert(KEY_HEADER, header_value(&message.key).as_str());
    h
}

fn publish_err(id: Uuid, timeout: Duration) -> impl FnOnce(jetstream::context::PublishError) -> PublishError {
    move |e| {
        if matches!(e.kind(), jetstream::context::PublishErrorKind::TimedOut) {
            PublishError::Timeout { broker: BROKER, id, timeout }
        } else {
            PublishError::Unavailable { broker: BROKER, source: e.into() }
        }
    }
}

/// Publishes to a JetStream stream and waits for its acknowledgement. Connects lazily (or with
/// [`JetStreamPublisher::start`]); the client reconnects by itself after an outage.
///
/// ```no_run
/// use stevedore_bus::{Message, Publisher, nats::{JetStreamPublisher, NatsConfig}};
/// # async fn f() -> Result<(), stevedore_bus::PublishError> {
/// let publisher = JetStreamPublisher::new(NatsConfig::new("nats://127.0.0.1:4222", "ORDERS", &["orders.>"]));
/// publisher.start().await?; // creates the stream if missing
/// publisher.publish(&Message::new("orders.created", "o-1", "{}")).await?;
/// # Ok(()) }
/// ```
pub struct JetStreamPublisher {
    config: NatsConfig,
    link: Mutex<Option<jetstream::Context>>,
}

impl JetStreamPublisher {
    /// A publisher to `config.stream`.
    pub fn new(config: NatsConfig) -> Self {
        Self { config, link: Mutex::new(None) }
    }

    /// Connects and ensures the stream now rather than on the first publish.
    pub async fn start(&self) -> Result<(), PublishError> {
        self.context().await.map(|_| ())
    }

    async fn context(&self) -> Result<jetstream::Context, PublishError> {
        let mut guard = self.link.lock().await;
        if let Some(js) = &*guard {
            return Ok(js.clone());
        }
        let (_, js) = self.config.connect().await?;
        *guard = Some(js.clone());
        Ok(js)
    }

    async fn send(
        &self,
        js: &jetstream::Context,
        m: &Message,
    ) -> Result<jetstream::context::PublishAckFuture, PublishError> {
        m.validate().map_err(|reason| PublishError::Invalid { id: m.id, reason })?;
        js.publish_with_headers(m.topic.clone(), headers_for(m), m.payload.clone())
            .await
            .map_err(publish_err(m.id, self.config.ack_timeout))
    }
}

impl Publisher for JetStreamPublisher {
    async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let js = self.context().await?;
        let ack = self.send(&js, message).await?;
        ack.await.map_err(publish_err(message.id, self.config.ack_timeout))?;
        Ok(())
    }

    async fn publish_batch(&self, messages: &[Message]) -> BatchOutcome {
        self.send_batch(messages).await.await
    }

    async fn send_batch(&self, messages: &[Message]) -> PendingConfirms {
        let js = match self.context().await {
            Ok(js) => js,
            Err(error) => return PendingConfirms::ready(BatchOutcome { confirmed: 0, error: Some(error) }),
        };
        let mut acks = Vec::with_capacity(messages.len());
        let mut send_error = None;
        for m in messages {
            match self.send(&js, m).await {
                Ok(a) => acks.push((m.id, a)),
                Err(e) => {
                    send_error = Some(e);
                    break;
                }
            }
        }
        let timeout = self.config.ack_timeout;
        PendingConfirms::new(async move {
            let mut confirmed = 0;
            for (id, ack) in acks {
                match ack.await {
                    Ok(_) => confirmed += 1,
                    Err(e) => return BatchOutcome { confirmed, error: Some(publish_err(id, timeout)(e)) },
                }
            }
            BatchOutcome { confirmed, error: send_error }
        })
    }
}

/// Consumes a JetStream stream through a durable pull consumer.
///
/// Messages are pulled in batches of `prefetch` (a long poll of up to 1 s); on stop, no further
/// batch is requested, the open one runs out (at most 1 s), and its messages that were not
/// started are negatively acknowledged so they go to the next consumer at once.
///
/// ```no_run
/// use stevedore_bus::{BoxError, Message, nats::{JetStreamSource, NatsConfig}};
/// use stevedore_bus::consumer::{Consumer, ConsumerOptions};
/// # async fn f() {
/// let config = NatsConfig::new("nats://127.0.0.1:4222", "ORDERS", &["orders.>"]);
/// let source = JetStreamSource::new(config, "billing", "orders.>");
/// let consumer = Consumer::new(source, |m: Message| async move { Ok::<(), BoxError>(()) }, ConsumerOptions::default());
/// consumer.run(tokio_util::sync::CancellationToken::new()).await.unwrap();
/// # }
/// ```
pub struct JetStreamSource {
    config: NatsConfig,
    durable: String,
    filter: String,
    /// How long JetStream waits for an ack before redelivering.
    pub ack_wait: Duration,
    prefetch: usize,
    max_deliver: i64,
    client: Option<async_nats::Client>,
    consumer: Option<jetstream::consumer::PullConsumer>,
    batch: Option<pull::Batch>,
    dead_letters: Option<(jetstream::Context, String)>,
}

/// How long one pull request waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(1);

impl JetStreamSource {
    /// A durable consumer named `durable` of `config.stream`, taking subjects matching `filter`.
    pub fn new(config: NatsConfig, durable: &str, filter: &str) -> Self {
        Self {
            config,
            durable: durable.to_string(),
            filter: filter.to_string(),
            ack_wait: Duration::from_secs(30),
            prefetch: 1,
            max_deliver: 0,
            client: None,
            consumer: None,
            batch: None,
            dead_letters: None,
        }
    }

    fn delivery(&self, inner: jetstream::Message) -> Option<JetStreamDelivery> {
        let (js, subject) = self.dead_letters.as_ref()?;
        Some(JetStreamDelivery {
            inner,
            dead_letters: js.clone(),
            subject: subject.clone(),
            ack_timeout: self.config.ack_timeout,
        })
    }
}

impl Source for JetStreamSource {
    type Delivery = JetStreamDelivery;

    fn name(&self) -> &str {
        &self.durable
    }

    async fn connect(&mut self, options: &ConsumerOptions) -> Result<(), BoxError> {
        self.close().await;
        self.max_deliver = i64::from(options.max_attempts.saturating_add(1));
        let (client, js) = self.config.connect().await?;
        let dlq_subject = self.config.dead_letter_subject(&self.durable);
        js.get_or_create_stream(stream::Config {
            name: self.config.dead_letter_stream(),
            subjects: vec![format!("stevedore.dlq.{}.>", self.config.stream)],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
        let stream = js.get_stream(&self.config.stream).await?;
        let consumer: jetstream::consumer::PullConsumer = stream
            .get_or_create_consumer(
                &self.durable,
                pull::Config {
                    durable_name: Some(self.durable.clone()),
                    filter_subject: self.filter.clone(),
                    ack_policy: jetstream::consumer::AckPolicy::Explicit,
                    ack_wait: self.ack_wait,
                    max_deliver: self.max_deliver,
                    max_ack_pending: i64::from(options.prefetch.max(1)),
                    ..Default::default()
                },
            )
            .await?;
        self.prefetch = usize::from(options.prefetch.max(1));
        self.consumer = Some(consumer);
        self.dead_letters = Some((js, dlq_subject));
        self.client = Some(client);
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<JetStreamDelivery, BoxError>> {
        loop {
            if self.batch.is_none() {
                let consumer = self.consumer.as_ref()?;
                let batch = consumer.batch().max_messages(self.prefetch).expires(PULL_EXPIRES).messages().await;
                match batch {
                    Ok(b) => self.batch = Some(b),
                    Err(e) => return Some(Err(e.into())),
                }
            }
            match self.batch.as_mut()?.next().await {
                Some(Ok(m)) => return self.delivery(m).map(Ok),
                Some(Err(e)) => {
                    self.batch = None;
                    return Some(Err(e));
                }
                None => {
                    // The pull request ended (filled or expired). While the server is away the
                    // client queues requests silently; report the outage instead.
                    self.batch = None;
                    let state = self.client.as_ref().map(|c| c.connection_state());
                    if !matches!(state, Some(async_nats::connection::State::Connected)) {
                        return Some(Err("lost the connection to NATS".into()));
                    }
                }
            }
        }
    }

    async fn stop(&mut self) -> usize {
        let Some(mut batch) = self.batch.take() else {
            return 0;
        };
        // Let the open pull request run out first: a message given back while it is open
        // would be redelivered straight into it, to nobody. It ends within PULL_EXPIRES; what
        // arrives meanwhile is given back too.
        let mut held = Vec::new();
        let until = tokio::time::Instant::now() + PULL_EXPIRES + Duration::from_secs(2);
        while let Ok(Some(Ok(m))) = tokio::time::timeout_at(until, batch.next()).await {
            held.push(m);
        }
        drop(batch);
        let returned = held.len();
        for m in held {
            let last = m.info().map(|i| i.delivered >= self.max_deliver).unwrap_or(false);
            match self.delivery(m) {
                // JetStream would not deliver it again: keep it, with the reason, rather than
                // leave it stranded in the stream.
                Some(d) if last => {
                    let attempts = d.attempt();
                    let _ = d.dead_letter("given back at stop on its last allowed delivery".into(), attempts).await;
                }
                Some(d) => {
                    let _ = d.requeue().await;
                }
                None => {}
            }
        }
        returned
    }

    async fn close(&mut self) {
        self.batch = None;
        self.consumer = None;
        self.dead_letters = None;
        if let Some(client) = self.client.take() {
            // Acks are fire-and-forget publishes: flush them before letting go.
            let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        }
    }
}

/// A message received from JetStream.
pub struct JetStreamDelivery {
    inner: jetstream::Message,
    dead_letters: jetstream::Context,
    subject: String,
    ack_timeout: Duration,
}

fn decode(m: &jetstream::Message) -> Result<Message, String> {
    let headers = m.headers.clone().unwrap_or_default();
    let id = headers.get(NATS_MESSAGE_ID).ok_or("no Nats-Msg-Id header")?;
    let id = Uuid::parse_str(id.as_str()).map_err(|e| format!("Nats-Msg-Id {:?} is not a UUID: {e}", id.as_str()))?;
    let mut message = Message {
        id,
        topic: m.subject.to_string(),
        key: headers.get(KEY_HEADER).map(|v| v.as_str().to_string()).unwrap_or_default(),
        payload: m.payload.clone(),
        headers: Default::default(),
    };
    for (name, values) in headers.iter() {
        let name = name.to_string();
        if name.starts_with("Nats-") || name == KEY_HEADER {
            continue;
        }
        if let Some(v) = values.last() {
            message.headers.insert(name, v.as_str().to_string());
        }
    }
    Ok(message)
}

impl Delivery for JetStreamDelivery {
    fn message(&self) -> Result<Message, String> {
        decode(&self.inner)
    }

    fn attempt(&self) -> u32 {
        self.inner.info().map(|i| u32::try_from(i.delivered).unwrap_or(1)).unwrap_or(1).max(1)
    }

    fn broker_retries(&self) -> bool {
        true
    }

    async fn ack(self) -> Result<(), BoxError> {
        self.inner.ack().await
    }

    async fn retry_later(self, delay: Duration) -> Result<(), BoxError> {
        self.inner.ack_with(AckKind::Nak(Some(delay))).await
    }

    async fn requeue(self) -> Result<(), BoxError> {
        self.inner.ack_with(AckKind::Nak(None)).await
    }

    async fn dead_letter(self, reason: String, attempts: u32) -> Result<(), BoxError> {
        let mut headers = self.inner.headers.clone().unwrap_or_default();
        headers.insert(ERROR_HEADER, header_value(&reason).as_str());
        headers.insert(ATTEMPTS_HEADER, attempts.to_string().as_str());
        headers.insert("stevedore-topic", self.inner.subject.as_str());
        let ack =
            self.dead_letters.publish_with_headers(self.subject.clone(), headers, self.inner.payload.clone()).await?;
        tokio::time::timeout(self.ack_timeout, ack.into_future()).await??;
        self.inner.ack_with(AckKind::Term).await
    }
}
