//! In-process transport: the embedded default and the test double for handlers.
//!
//! Queues bind to topics with AMQP-style patterns (`*` one word, `#` any number of words), like
//! a RabbitMQ topic exchange. Nothing survives the process; use it where the producer and the
//! consumer share a process, or in tests.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::consumer::{ConsumerOptions, Delivery, Source};
use crate::{BoxError, Message, PublishError, Publisher};

/// A message that ended in a queue's dead-letter list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The message as it was received.
    pub message: Message,
    /// Why it was dead-lettered (the handler's last error, or the decoding error).
    pub reason: String,
    /// How many attempts were made.
    pub attempts: u32,
}

#[derive(Debug, Default)]
struct QueueState {
    ready: VecDeque<Message>,
    dead: Vec<DeadLetter>,
}

#[derive(Debug)]
struct QueueInner {
    name: String,
    patterns: Vec<String>,
    state: Mutex<QueueState>,
    notify: Notify,
}

impl QueueInner {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        // A panic while holding this lock cannot leave the queue half-updated (each critical
        // section is one push or pop), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn push_back(&self, m: Message) {
        self.lock().ready.push_back(m);
        self.notify.notify_one();
    }

    fn push_front(&self, m: Message) {
        self.lock().ready.push_front(m);
        self.notify.notify_one();
    }
}

/// An in-process topic exchange with queues.
///
/// ```
/// use stevedore_bus::{Message, Publisher, memory::InProcessBus};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let bus = InProcessBus::new();
/// let all = bus.queue("audit", &["#"]);
/// let created = bus.queue("created", &["*.created"]);
/// bus.publish(&Message::new("orders.created", "o-1", "x")).await.unwrap();
/// bus.publish(&Message::new("orders.shipped", "o-1", "y")).await.unwrap();
/// assert_eq!((all.len(), created.len()), (2, 1));
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct InProcessBus {
    queues: Arc<Mutex<Vec<Arc<QueueInner>>>>,
}

impl InProcessBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Declares (or returns the existing) queue `name` bound to `patterns`.
    pub fn queue(&self, name: &str, patterns: &[&str]) -> InProcessQueue {
        let mut queues = self.queues.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(q) = queues.iter().find(|q| q.name == name) {
            return InProcessQueue { inner: q.clone() };
        }
        let inner = Arc::new(QueueInner {
            name: name.to_string(),
            patterns: patterns.iter().map(|p| p.to_string()).collect(),
            state: Mutex::new(QueueState::default()),
            notify: Notify::new(),
        });
        queues.push(inner.clone());
        InProcessQueue { inner }
    }
}

impl Publisher for InProcessBus {
    async fn publish(&self, message: &Message) -> Result<(), PublishError> {
        let queues: Vec<_> = self.queues.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for q in queues {
            if q.patterns.iter().any(|p| topic_matches(p, &message.topic)) {
                q.push_back(message.clone());
            }
        }
        Ok(())
    }
}

/// A queue of an [`InProcessBus`].
#[derive(Debug, Clone)]
pub struct InProcessQueue {
    inner: Arc<QueueInner>,
}

impl InProcessQueue {
    /// Messages waiting to be consumed.
    pub fn len(&self) -> usize {
        self.inner.lock().ready.len()
    }

    /// True when no message waits.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Messages dead-lettered so far, with their reasons.
    pub fn dead_letters(&self) -> Vec<DeadLetter> {
        self.inner.lock().dead.clone()
    }

    /// A [`Source`] for a [`crate::consumer::Consumer`] on this queue.
    pub fn source(&self) -> InProcessSource {
        InProcessSource { inner: self.inner.clone() }
    }
}

/// Consumes an [`InProcessQueue`].
#[derive(Debug)]
pub struct InProcessSource {
    inner: Arc<QueueInner>,
}

impl Source for InProcessSource {
    type Delivery = InProcessDelivery;

    fn name(&self) -> &str {
        &self.inner.name
    }

    async fn connect(&mut self, _options: &ConsumerOptions) -> Result<(), BoxError> {
        Ok(())
    }

    async fn next(&mut self) -> Option<Result<InProcessDelivery, BoxError>> {
        loop {
            let notified = self.inner.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(message) = self.inner.lock().ready.pop_front() {
                return Some(Ok(InProcessDelivery { message: Some(message), queue: self.inner.clone() }));
            }
            notified.await;
        }
    }

    async fn stop(&mut self) -> usize {
        0
    }

    async fn close(&mut self) {}
}

/// A message taken from an [`InProcessQueue`]. Dropped without being settled (its handler
/// was abandoned at the end of a drain), it goes back to the front of the queue.
#[derive(Debug)]
pub struct InProcessDelivery {
    message: Option<Message>,
    queue: Arc<QueueInner>,
}

impl InProcessDelivery {
    /// Takes the message out so that dropping `self` no longer requeues it.
    fn settle(mut self) -> Option<Message> {
        self.message.take()
    }
}

impl Drop for InProcessDelivery {
    fn drop(&mut self) {
        if let Some(m) = self.message.take() {
            self.queue.push_front(m);
        }
    }
}

impl Delivery for InProcessDelivery {
    fn message(&self) -> Result<Message, String> {
        self.message.clone().ok_or_else(|| "delivery already settled".to_string())
    }

    async fn ack(self) -> Result<(), BoxError> {
        self.settle();
        Ok(())
    }

    async fn retry_later(self, delay: Duration) -> Result<(), BoxError> {
        tokio::time::sleep(delay).await;
        let queue = self.queue.clone();
        if let Some(m) = self.settle() {
            queue.push_back(m);
        }
        Ok(())
    }

    async fn requeue(self) -> Result<(), BoxError> {
        let queue = self.queue.clone();
        if let Some(m) = self.settle() {
            queue.push_front(m);
        }
        Ok(())
    }

    async fn dead_letter(self, reason: String, attempts: u32) -> Result<(), BoxError> {
        let queue = self.queue.clone();
        if let Some(message) = self.settle() {
            queue.lock().dead.push(DeadLetter { message, reason, attempts });
        }
        Ok(())
    }
}

/// AMQP topic matching: `*` is exactly one word, `#` zero or more words.
///
/// Word by word of the pattern, the set of topic prefixes it can match so far: time in pattern
/// words times topic words, where trying each way a `#` could match takes time exponential in the
/// number of `#`s.
pub(crate) fn topic_matches(pattern: &str, topic: &str) -> bool {
    let words: Vec<&str> = topic.split('.').collect();
    // reach[j]: the pattern so far can match the topic's first j words.
    let mut reach = vec![false; words.len() + 1];
    reach[0] = true;
    for part in pattern.split('.') {
        let mut next = vec![false; words.len() + 1];
        if part == "#" {
            // Zero or more words: every prefix from the shortest one reached on.
            if let Some(first) = reach.iter().position(|r| *r) {
                next[first..].fill(true);
            }
        } else {
            for (j, word) in words.iter().enumerate() {
                next[j + 1] = reach[j] && (part == "*" || part == *word);
            }
        }
        reach = next;
    }
    reach[words.len()]
}

#[cfg(test)]
mod tests {
    use super::topic_matches;

    #[test]
    fn topic_patterns_follow_amqp_rules() {
        assert!(topic_matches("orders.*", "orders.created"));
        assert!(!topic_matches("orders.*", "orders.created.eu"));
        assert!(topic_matches("orders.#", "orders.created.eu"));
        assert!(topic_matches("orders.#", "orders"));
        assert!(topic_matches("#", "a.b.c"));
        assert!(topic_matches("*.created", "users.created"));
        assert!(!topic_matches("users.created", "orders.created"));
        assert!(topic_matches("#.created", "created"));
        assert!(topic_matches("a.#.b.#", "a.b"));
        assert!(!topic_matches("a.*.#", "a"));
    }

    /// Tries every way each `#` could match: the definition, exponential, for short inputs only.
    fn by_definition(p: &[&str], t: &[&str]) -> bool {
        match (p.first(), t.first()) {
            (None, None) => true,
            (Some(&"#"), _) => by_definition(&p[1..], t) || (!t.is_empty() && by_definition(p, &t[1..])),
            (Some(&"*"), Some(_)) => by_definition(&p[1..], &t[1..]),
            (Some(pw), Some(tw)) => pw == tw && by_definition(&p[1..], &t[1..]),
            _ => false,
        }
    }

    #[test]
    fn matching_agrees_with_the_definition_on_every_short_pattern_and_topic() {
        let pattern_words = ["a", "b", "*", "#"];
        let topic_words = ["a", "b"];
        // Every pattern of up to four words against every topic of up to four words.
        let all = |words: &[&'static str]| {
            let mut all: Vec<Vec<&'static str>> = vec![vec![]];
            let mut last: Vec<Vec<&'static str>> = vec![vec![]];
            for _ in 0..4 {
                last = last.iter().flat_map(|w| words.iter().map(move |x| [w.clone(), vec![*x]].concat())).collect();
                all.extend(last.clone());
            }
            all.into_iter().filter(|w| !w.is_empty()).collect::<Vec<_>>()
        };
        let (patterns, topics) = (all(&pattern_words), all(&topic_words));
        for p in &patterns {
            for t in &topics {
                let expected = by_definition(p, t);
                assert_eq!(
                    topic_matches(&p.join("."), &t.join(".")),
                    expected,
                    "{} against {}",
                    p.join("."),
                    t.join(".")
                );
            }
        }
    }

    #[test]
    fn many_hashes_take_no_time_to_fail() {
        // 40 `#`s and a last word that is not there: trying each split of the topic among the
        // `#`s, as the definition does, would not end in this test's life.
        let pattern = format!("{}.z", vec!["#"; 40].join("."));
        let topic = vec!["a"; 40].join(".");
        assert!(!topic_matches(&pattern, &topic));
        assert!(topic_matches(&pattern, &format!("{topic}.z")));
    }
}
