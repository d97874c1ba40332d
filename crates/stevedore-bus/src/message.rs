//! The message every transport carries.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Serialize, de::DeserializeOwned};
use uuid::Uuid;

/// Header carrying the message key on the wire (AMQP header, NATS header).
pub const KEY_HEADER: &str = "stevedore-key";
/// Header carrying the reason a message was dead-lettered.
pub const ERROR_HEADER: &str = "stevedore-error";
/// Header carrying how many times a dead-lettered message was attempted.
pub const ATTEMPTS_HEADER: &str = "stevedore-attempts";

/// A message on the bus.
///
/// `id` is a UUID v7 chosen when the message is created, so a message re-sent after a crash or a
/// broker outage keeps its id and consumers can drop the duplicate (see
/// [`crate::idempotent::claim`]). `topic` routes it (AMQP routing key, NATS subject);
/// `key` orders it: the outbox relay delivers messages with the same key in the order they were
/// written.
///
/// ```
/// use stevedore_bus::Message;
/// let m = Message::json("orders.created", "order-42", &serde_json::json!({"total": 10}))?;
/// assert_eq!(m.key, "order-42");
/// assert_eq!(m.id.get_version_num(), 7);
/// # Ok::<(), serde_json::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Unique id (UUID v7), stable across re-deliveries.
    pub id: Uuid,
    /// Routing topic: dot-separated words, e.g. `orders.created`.
    pub topic: String,
    /// Ordering key: messages with the same key are relayed in order.
    pub key: String,
    /// Opaque body.
    pub payload: Bytes,
    /// Application headers, carried as strings.
    pub headers: BTreeMap<String, String>,
}

impl Message {
    /// A new message with a fresh UUID v7 id.
    pub fn new(topic: impl Into<String>, key: impl Into<String>, payload: impl Into<Bytes>) -> Self {
        Self {
            id: Uuid::now_v7(),
            topic: topic.into(),
            key: key.into(),
            payload: payload.into(),
            headers: BTreeMap::new(),
        }
    }

    /// A new message whose payload is `value` serialized as JSON.
    pub fn json<T: Serialize + ?Sized>(
        topic: impl Into<String>,
        key: impl Into<String>,
        value: &T,
    ) -> Result<Self, serde_json::Error> {
        Ok(Self::new(topic, key, serde_json::to_vec(value)?))
    }

    /// Adds an application header.
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.insert(name.into(), value.into());
        self
    }

    /// Checks that every transport can carry the message: the topic is 1-255 bytes of
    /// dot-separated, non-empty words without whitespace or wildcards (`*`, `#`, `>`); header
    /// names are 1-255 printable ASCII characters without `:`; header values and the key have no
    /// line breaks. [`crate::outbox::enqueue`] refuses an invalid message, so it cannot block
    /// the outbox later.
    pub fn validate(&self) -> Result<(), String> {
        let t = &self.topic;
        if t.is_empty() || t.len() > 255 {
            return Err(format!("topic must be 1-255 bytes, got {}", t.len()));
        }
        if t.split('.').any(|w| w.is_empty() || w == "*" || w == "#" || w == ">")
            || t.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(format!("topic {t:?} must be dot-separated words without whitespace or wildcards"));
        }
        let no_breaks = |s: &str| !s.contains(['\r', '\n']);
        if !no_breaks(&self.key) || self.key.len() > 4096 {
            return Err("key must be at most 4096 bytes without line breaks".into());
        }
        for (name, value) in &self.headers {
            if name.is_empty() || name.len() > 255 || !name.chars().all(|c| c.is_ascii_graphic() && c != ':') {
                return Err(format!("header name {name:?} must be 1-255 printable ASCII characters without ':'"));
            }
            if !no_breaks(value) {
                return Err(format!("header {name:?} has a line break in its value"));
            }
        }
        Ok(())
    }

    /// Decodes the JSON payload.
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.payload)
    }
}
