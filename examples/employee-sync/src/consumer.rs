//! The consumer of `EmployeeChanged`: keeps the directory's change log, once per event however many
//! times the bus delivers it.

use chrono::Utc;
use stevedore::BoxError;
use stevedore_bus::Message;
use stevedore_bus::idempotent::claim;

use crate::db::{Database, db_err, either};
use crate::sync::EmployeeChanged;

/// The consumer's name in the processed-messages table (and its queue's suffix).
pub const CONSUMER: &str = "directory";

/// Handles one delivery: claims the message id and writes the change-log row in one transaction,
/// so a redelivery (after a crash, a lost ack, a relay re-send) commits nothing new. A payload that
/// does not decode is an error: retried, then dead-lettered with the reason.
pub async fn on_employee_changed(db: &Database, message: Message) -> Result<(), BoxError> {
    let event: EmployeeChanged = message.decode()?;
    let now = Utc::now();
    let first = either!(&db.pool, p => {
        let mut tx = p.begin().await.map_err(db_err("beginning the consumer's transaction"))?;
        let first = claim(&mut *tx, CONSUMER, &message).await?;
        if first {
            sqlx::query(
                "INSERT INTO employee_change_log (message_id, employee_id, change_kind, summary, received_at) \
                 VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(message.id.to_string())
            .bind(&event.employee.id)
            .bind(event.kind.as_str())
            .bind(event.summary())
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(db_err("writing the change log"))?;
        }
        tx.commit().await.map_err(db_err("committing the consumer's transaction"))?;
        Ok::<_, BoxError>(first)
    })?;
    if first {
        tracing::debug!(id = %message.id, "{}", event.summary());
        metrics::counter!("employee_sync_events_consumed_total").increment(1);
    } else {
        tracing::info!(id = %message.id, "duplicate delivery dropped");
        metrics::counter!("employee_sync_duplicate_deliveries_total").increment(1);
    }
    Ok(())
}
