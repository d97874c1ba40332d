//! The relay: publishes outbox rows to a broker and marks them delivered.
//!
//! Each round reads the oldest pending rows in write order and sends them in that order on one
//! publisher; while the broker confirms that batch, the next one is read and sent (two batches
//! in flight). Exactly the confirmed prefix is marked delivered; after a failure the batches
//! behind it are dropped unmarked and sent again in order. While the broker is down it retries with backoff; nothing is marked
//! delivered without a confirm, so a broker restart or a `kill -9` of the relay loses nothing,
//! at the cost of re-sending the unmarked rows (consumers deduplicate by id).
//!
//! On PostgreSQL, several processes may run a relay against the same database: a session
//! advisory lock (per schema) lets one relay at a time publish, which keeps per-key order; the
//! others wait in [`Status::Starting`] and take over when the holder's connection goes away.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use sqlx::Connection;
use tokio_util::sync::CancellationToken;

use crate::db::{Db, OutboxError};
use crate::hosted::Reporter;
use crate::outbox::{Outbox, Pending};
use crate::{Backoff, Health, PendingConfirms, Publisher, Status};

/// How a relay paces itself.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    /// Rows per round (published pipelined, then confirmed).
    pub batch_size: usize,
    /// How long an idle relay waits before looking again (unless [`Outbox::wake`] is called).
    pub poll_interval: Duration,
    /// Delay between retries while the broker or the database is failing.
    pub backoff: Backoff,
    /// Delivered rows older than this are deleted; `None` keeps them.
    pub retain_delivered: Option<Duration>,
}

impl Default for RelayOptions {
    fn default() -> Self {
        Self {
            batch_size: 256,
            poll_interval: Duration::from_millis(100),
            backoff: Backoff::new(Duration::from_millis(100), Duration::from_secs(5)),
            retain_delivered: Some(Duration::from_secs(24 * 3600)),
        }
    }
}

/// Why a relay stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// `run` was called while this relay was already running.
    #[error("the outbox relay is already running")]
    AlreadyRunning,
    /// The outbox table could not be read or updated.
    #[error(transparent)]
    Outbox(#[from] OutboxError),
    /// The broker did not confirm.
    #[error(transparent)]
    Publish(crate::PublishError),
}

/// Relays an [`Outbox`] to a [`Publisher`] until stopped.
///
/// ```
/// use stevedore_bus::{Message, memory::InProcessBus, outbox::{Outbox, enqueue}, relay::{Relay, RelayOptions}};
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
/// let outbox = Outbox::sqlite(pool.clone());
/// outbox.migrate().await?;
/// let bus = InProcessBus::new();
/// let queue = bus.queue("orders", &["orders.#"]);
/// let mut tx = pool.begin().await?;
/// enqueue(&mut *tx, &Message::new("orders.created", "o-1", "{}")).await?;
/// tx.commit().await?;
///
/// let relay = Relay::new(outbox.clone(), bus, RelayOptions::default());
/// assert_eq!(relay.relay_once().await?, 1);
/// assert_eq!((queue.len(), outbox.pending().await?), (1, 0));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # }).unwrap();
/// ```
pub struct Relay<P: Publisher> {
    outbox: Outbox,
    publisher: P,
    options: RelayOptions,
    health: Health,
    running: tokio::sync::Mutex<()>,
}

/// Batches in flight per relay: one being confirmed while the next is sent.
const PIPELINE_DEPTH: usize = 2;

/// A batch sent, with its confirms.
type InFlight = (Vec<Pending>, PendingConfirms);

/// Result of one round.
enum Round {
    Idle,
    Sent,
    Published(usize),
    Failed(crate::PublishError),
}

impl<P: Publisher> Relay<P> {
    /// A relay from `outbox` to `publisher`.
    pub fn new(outbox: Outbox, publisher: P, options: RelayOptions) -> Self {
        Self { outbox, publisher, options, health: Health::new(), running: tokio::sync::Mutex::new(()) }
    }

    /// Connection status for the host's health report.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    /// The publisher (e.g. to publish directly, bypassing the outbox).
    pub fn publisher(&self) -> &P {
        &self.publisher
    }

    /// Publishes one batch and returns how many rows were delivered. Does not take the
    /// PostgreSQL relay lock; for tests and tools.
    pub async fn relay_once(&self) -> Result<usize, RelayError> {
        let mut in_flight = VecDeque::new();
        match self.round(&mut in_flight, 1).await? {
            Round::Idle => Ok(0),
            Round::Sent => Ok(0),
            Round::Published(n) => Ok(n),
            Round::Failed(e) => Err(RelayError::Publish(e)),
        }
    }

    /// One step: send a batch if the pipeline has room (and rows wait), otherwise settle the
    /// oldest batch in flight. Batches are sent in write order on one publisher, so keeping
    /// `depth` of them in flight keeps the order; a failure drops the later batches unmarked, to
    /// be sent again after the failed one.
    async fn round(&self, in_flight: &mut VecDeque<InFlight>, depth: usize) -> Result<Round, OutboxError> {
        if in_flight.len() < depth {
            let exclude: Vec<i64> = in_flight.iter().flat_map(|(b, _)| b.iter().map(|p| p.seq)).collect();
            let batch = self.outbox.fetch_pending(self.options.batch_size, &exclude).await?;
            if !batch.is_empty() {
                let messages: Vec<_> = batch.iter().map(|p| p.message.clone()).collect();
                let confirms = self.publisher.send_batch(&messages).await;
                in_flight.push_back((batch, confirms));
                if in_flight.len() < depth {
                    return Ok(Round::Sent);
                }
            }
        }
        let Some((batch, confirms)) = in_flight.pop_front() else {
            return Ok(Round::Idle);
        };
        let outcome = confirms.await;
        if outcome.error.is_some() {
            in_flight.clear();
        }
        let seqs: Vec<i64> = batch[..outcome.confirmed.min(batch.len())].iter().map(|p| p.seq).collect();
        self.outbox.mark_delivered(&seqs).await?;
        metrics::counter!("stevedore_bus_outbox_published_total").increment(seqs.len() as u64);
        match outcome.error {
            None => Ok(Round::Published(seqs.len())),
            Some(crate::PublishError::Invalid { id, reason }) => {
                // Retrying cannot help; set the row aside so the rows behind it move on.
                if let Some(bad) = batch.get(outcome.confirmed) {
                    tracing::error!(%id, %reason, "outbox message cannot be published; set aside");
                    metrics::counter!("stevedore_bus_outbox_undeliverable_total").increment(1);
                    self.outbox.mark_dead(bad.seq, &reason).await?;
                }
                Ok(Round::Published(seqs.len() + 1))
            }
            Some(error) => {
                metrics::counter!("stevedore_bus_outbox_publish_failures_total").increment(1);
                if let Some(first) = batch.get(outcome.confirmed) {
                    self.outbox.record_failure(first.seq, &error.to_string()).await?;
                }
                Ok(Round::Failed(error))
            }
        }
    }

    /// On stop: settles the batches still in flight, so confirmed rows are marked.
    async fn settle(&self, in_flight: &mut VecDeque<InFlight>) {
        while let Some((batch, confirms)) = in_flight.pop_front() {
            let outcome = confirms.await;
            let seqs: Vec<i64> = batch[..outcome.confirmed.min(batch.len())].iter().map(|p| p.seq).collect();
            if self.outbox.mark_delivered(&seqs).await.is_err() || outcome.error.is_some() {
                break;
            }
        }
        in_flight.clear();
    }

    /// Relays until `stop` is cancelled. The round in progress when `stop` fires is finished
    /// (bounded by the publisher's confirm timeout), so no confirmed row stays unmarked.
    pub async fn run(&self, stop: CancellationToken) -> Result<(), RelayError> {
        self.run_reporting(stop, Reporter::default()).await
    }

    pub(crate) async fn run_reporting(&self, stop: CancellationToken, report: Reporter) -> Result<(), RelayError> {
        let _running = self.running.try_lock().map_err(|_| RelayError::AlreadyRunning)?;
        let connected = metrics::gauge!("stevedore_bus_relay_connected");
        let mut failures = 0u32;
        let mut lock = RelayLock::default();
        let mut last_purge = Instant::now();
        let mut in_flight = VecDeque::new();
        while !stop.is_cancelled() {
            match lock.ensure(&self.outbox.db).await {
                Ok(true) => {}
                Ok(false) => {
                    in_flight.clear();
                    self.health.set(Status::Starting);
                    if sleep_or_stop(self.options.poll_interval.max(Duration::from_millis(500)), &stop).await {
                        break;
                    }
                    continue;
                }
                Err(error) => {
                    failures += 1;
                    self.failed(&connected, failures, error.to_string());
                    if sleep_or_stop(self.options.backoff.delay(failures), &stop).await {
                        break;
                    }
                    continue;
                }
            }
            match self.round(&mut in_flight, PIPELINE_DEPTH).await {
                Ok(Round::Sent) => {}
                Ok(Round::Published(_)) => {
                    report.beat();
                    failures = 0;
                    connected.set(1.0);
                    self.health.set(Status::Connected);
                }
                Ok(Round::Idle) => {
                    report.beat();
                    report.queue(|q| q.depth = 0);
                    if failures > 0 || self.health.status() != Status::Connected {
                        connected.set(1.0);
                        self.health.set(Status::Connected);
                    }
                    failures = 0;
                    if let Some(age) = self.options.retain_delivered
                        && last_purge.elapsed() > Duration::from_secs(60)
                    {
                        last_purge = Instant::now();
                        if let Err(error) = self.outbox.purge(age).await {
                            tracing::warn!(%error, "purging the outbox failed");
                        }
                    }
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = self.outbox.woken() => {}
                        _ = tokio::time::sleep(self.options.poll_interval) => {}
                    }
                }
                Ok(Round::Failed(error)) => {
                    if let Ok(depth) = self.outbox.pending().await {
                        report.queue(|q| q.depth = u64::try_from(depth).unwrap_or(0));
                    }
                    failures += 1;
                    self.failed(&connected, failures, error.to_string());
                    if sleep_or_stop(self.options.backoff.delay(failures), &stop).await {
                        break;
                    }
                }
                Err(error) => {
                    failures += 1;
                    // Batches still in flight would be settled after the rows just failed are
                    // sent again, out of order: drop them unmarked, they are sent again too.
                    in_flight.clear();
                    lock.release();
                    self.failed(&connected, failures, error.to_string());
                    if sleep_or_stop(self.options.backoff.delay(failures), &stop).await {
                        break;
                    }
                }
            }
        }
        self.settle(&mut in_flight).await;
        lock.close().await;
        connected.set(0.0);
        self.health.set(Status::Stopped);
        Ok(())
    }

    fn failed(&self, connected: &metrics::Gauge, attempt: u32, error: String) {
        connected.set(0.0);
        tracing::warn!(attempt, %error, "outbox relay cannot deliver; retrying with backoff");
        self.health.set(Status::Reconnecting { attempt, error });
    }
}

async fn sleep_or_stop(delay: Duration, stop: &CancellationToken) -> bool {
    tokio::select! {
        _ = stop.cancelled() => true,
        _ = tokio::time::sleep(delay) => false,
    }
}

/// The PostgreSQL session advisory lock that makes one relay per schema active. SQLite needs
/// none (one process owns the file's writer).
#[derive(Default)]
struct RelayLock {
    conn: Option<sqlx::PgConnection>,
}

const LOCK_SQL: &str = "SELECT pg_try_advisory_lock(hashtext(current_schema() || '.stevedore_outbox_relay'))";

impl RelayLock {
    async fn ensure(&mut self, db: &Db) -> Result<bool, OutboxError> {
        let Db::Postgres(pool) = db else {
            return Ok(true);
        };
        if let Some(conn) = &mut self.conn {
            if conn.ping().await.is_ok() {
                return Ok(true);
            }
            self.conn = None;
        }
        let mut conn = pool.acquire().await.map_err(crate::db::db_err("connecting for the relay lock"))?.detach();
        let got: bool = sqlx::query_scalar(LOCK_SQL)
            .fetch_one(&mut conn)
            .await
            .map_err(crate::db::db_err("taking the relay lock"))?;
        if got {
            self.conn = Some(conn);
        } else {
            let _ = conn.close().await;
        }
        Ok(got)
    }

    fn release(&mut self) {
        // Dropping the detached connection closes it, which releases the session lock.
        self.conn = None;
    }

    async fn close(&mut self) {
        if let Some(conn) = self.conn.take() {
            let _ = conn.close().await;
        }
    }
}
