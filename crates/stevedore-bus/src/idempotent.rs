//! Idempotent consumption: remember which message ids a consumer has processed.
//!
//! Delivery is at least once: a relay restarted after a crash, or a consumer whose ack was lost,
//! sends a message again with the same [`Message::id`](crate::Message). To make the effect
//! happen once, claim the id in the same transaction as the handler's own writes:
//!
//! ```
//! # use stevedore_bus::{Message, outbox::Outbox, idempotent::claim};
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! # let pool = sqlx::SqlitePool::connect("sqlite::memory:").await?;
//! # Outbox::sqlite(pool.clone()).migrate().await?;
//! let message = Message::new("orders.created", "o-1", "{}");
//! for _delivery in 0..2 {
//!     let mut tx = pool.begin().await?;
//!     if claim(&mut *tx, "billing", &message).await? {
//!         // first time: do the work on `tx`
//!     } // else: a duplicate, skip the work
//!     tx.commit().await?; // the claim and the work commit (or roll back) together
//! }
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # }).unwrap();
//! ```
//!
//! The table (`stevedore_processed`) is created by [`crate::outbox::Outbox::migrate`] and
//! trimmed by [`crate::outbox::Outbox::purge`].

use crate::Message;
use crate::db::{BusConnection, OutboxError};

/// Records that `consumer` processed `message`, through `conn` (the handler's transaction).
/// Returns true the first time and false for a duplicate. Rolled back with the transaction.
pub async fn claim<C: BusConnection + ?Sized>(
    conn: &mut C,
    consumer: &str,
    message: &Message,
) -> Result<bool, OutboxError> {
    conn.claim_processed(consumer, message.id).await
}
