//! The sync: fetch the upstream list, write what changed in the unit of work's transaction, and put
//! one `EmployeeChanged` event per change in the outbox, in that same transaction.

use std::collections::HashMap;

use chrono::Utc;
use serde::{Deserialize, Serialize};
use stevedore::{BoxError, Scoped, Singleton};
use stevedore_bus::Message;
use stevedore_bus::outbox::enqueue;

use crate::db::{Employee, UnitOfWork, db_err, either};
use crate::upstream::Upstream;

/// The topic every employee event goes to, after the bus name (`employee-sync.employees.changed`).
pub const TOPIC: &str = "employees.changed";

/// What happened to an employee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// Listed for the first time.
    Hired,
    /// A field changed.
    Updated,
    /// No longer listed.
    Departed,
}

impl ChangeKind {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            ChangeKind::Hired => "hired",
            ChangeKind::Updated => "updated",
            ChangeKind::Departed => "departed",
        }
    }
}

/// The event published (through the outbox) for every change a sync makes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmployeeChanged {
    /// What happened.
    pub kind: ChangeKind,
    /// The employee as now stored (as last stored, for a departure).
    pub employee: Employee,
    /// The previous values, for an update.
    pub previous: Option<Employee>,
}

impl EmployeeChanged {
    /// A one-line description for people.
    pub fn summary(&self) -> String {
        let e = &self.employee;
        match (&self.kind, &self.previous) {
            (ChangeKind::Updated, Some(p)) if p.department != e.department => {
                format!("{} moved from {} to {}", e.name, p.department, e.department)
            }
            (ChangeKind::Updated, Some(p)) if p.title != e.title => {
                format!("{} is now {} (was {})", e.name, e.title, p.title)
            }
            (ChangeKind::Updated, _) => format!("{}'s details changed", e.name),
            (ChangeKind::Hired, _) => format!("{} joined {} as {}", e.name, e.department, e.title),
            (ChangeKind::Departed, _) => format!("{} left {}", e.name, e.department),
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SyncSummary {
    /// Employees the upstream listed.
    pub fetched: i64,
    /// New ones.
    pub hired: i64,
    /// Changed ones.
    pub updated: i64,
    /// Gone ones.
    pub departed: i64,
}

/// One sync in the caller's scope: the article's `SyncEmployees`, with a real HTTP call, the writes
/// in the scope's transaction and the events in the outbox of that same transaction. Any error
/// (upstream, validation, database) fails the run and the scope rolls everything back.
pub async fn sync_employees(
    trigger: String,
    upstream: Singleton<Upstream>,
    uow: Scoped<UnitOfWork>,
) -> Result<SyncSummary, BoxError> {
    let fetched = upstream.fetch().await?;
    let mut uow = uow.lock().await;
    let summary = apply(&mut uow, &trigger, &fetched).await?;
    let result = if summary.hired + summary.updated + summary.departed == 0 { "unchanged" } else { "changed" };
    metrics::counter!("employee_sync_runs_total", "trigger" => trigger.clone(), "result" => result).increment(1);
    tracing::info!(%trigger, ?summary, "employees synced");
    Ok(summary)
}

/// Writes the difference between the stored employees and `fetched`. Changes are guarded (an
/// update only applies to a row that still differs; an insert only to an id not stored yet), and
/// on PostgreSQL syncs take a transaction-scoped advisory lock, so concurrent syncs on several
/// workers never emit the same change twice.
async fn apply(uow: &mut UnitOfWork, trigger: &str, fetched: &[Employee]) -> Result<SyncSummary, BoxError> {
    let now = Utc::now();
    let topic = uow.topic();
    let tx = uow.tx().await?;
    let mut events = Vec::new();
    either!(tx, t => {
        let conn = &mut **t;
        if matches!(tx_kind(conn), Backend::Postgres) {
            sqlx::query("SELECT pg_advisory_xact_lock(hashtext('employee-sync'))")
                .execute(&mut *conn)
                .await
                .map_err(db_err("taking the sync lock"))?;
        }
        let stored: Vec<crate::db::EmployeeRow> =
            sqlx::query_as("SELECT id, name, email, department, title FROM employees")
                .fetch_all(&mut *conn)
                .await
                .map_err(db_err("reading employees"))?;
        let stored: Vec<Employee> = stored.into_iter().map(Employee::from).collect();
        let stored: HashMap<&str, &Employee> = stored.iter().map(|e| (e.id.as_str(), e)).collect();
        for e in fetched {
            match stored.get(e.id.as_str()) {
                None => {
                    let n = sqlx::query(
                        "INSERT INTO employees (id, name, email, department, title, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (id) DO NOTHING",
                    )
                    .bind(&e.id).bind(&e.name).bind(&e.email).bind(&e.department).bind(&e.title).bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err("inserting an employee"))?
                    .rows_affected();
                    if n == 1 {
                        events.push(EmployeeChanged { kind: ChangeKind::Hired, employee: e.clone(), previous: None });
                    }
                }
                Some(old) if *old != e => {
                    let n = sqlx::query(
                        "UPDATE employees SET name = $2, email = $3, department = $4, title = $5, updated_at = $6 \
                         WHERE id = $1 AND (name <> $2 OR email <> $3 OR department <> $4 OR title <> $5)",
                    )
                    .bind(&e.id).bind(&e.name).bind(&e.email).bind(&e.department).bind(&e.title).bind(now)
                    .execute(&mut *conn)
                    .await
                    .map_err(db_err("updating an employee"))?
                    .rows_affected();
                    if n == 1 {
                        events.push(EmployeeChanged {
                            kind: ChangeKind::Updated,
                            employee: e.clone(),
                            previous: Some((*old).clone()),
                        });
                    }
                }
                Some(_) => {}
            }
        }
        let listed: std::collections::HashSet<&str> = fetched.iter().map(|e| e.id.as_str()).collect();
        for (id, old) in &stored {
            if listed.contains(id) {
                continue;
            }
            let n = sqlx::query("DELETE FROM employees WHERE id = $1")
                .bind(*id)
                .execute(&mut *conn)
                .await
                .map_err(db_err("removing an employee"))?
                .rows_affected();
            if n == 1 {
                events.push(EmployeeChanged { kind: ChangeKind::Departed, employee: (*old).clone(), previous: None });
            }
        }
        let mut summary = SyncSummary { fetched: fetched.len() as i64, ..Default::default() };
        for event in &events {
            match event.kind {
                ChangeKind::Hired => summary.hired += 1,
                ChangeKind::Updated => summary.updated += 1,
                ChangeKind::Departed => summary.departed += 1,
            }
            let message = Message::json(&*topic, &event.employee.id, event)?;
            enqueue(&mut *conn, &message).await?;
            metrics::counter!("employee_sync_events_total", "kind" => event.kind.as_str()).increment(1);
        }
        sqlx::query(
            "INSERT INTO sync_runs (trigger_name, fetched, hired, updated, departed, finished_at) \
             VALUES ($1, $2, $3, $4, $5, $6)",
        )
        .bind(trigger).bind(summary.fetched).bind(summary.hired).bind(summary.updated).bind(summary.departed).bind(now)
        .execute(&mut *conn)
        .await
        .map_err(db_err("recording the sync"))?;
        Ok::<_, BoxError>(summary)
    })
    .inspect(|_| uow.wrote_events |= !events.is_empty())
}

enum Backend {
    Sqlite,
    Postgres,
}

trait Kind {
    fn backend(&self) -> Backend;
}

impl Kind for sqlx::SqliteConnection {
    fn backend(&self) -> Backend {
        Backend::Sqlite
    }
}

impl Kind for sqlx::PgConnection {
    fn backend(&self) -> Backend {
        Backend::Postgres
    }
}

fn tx_kind<K: Kind>(conn: &K) -> Backend {
    conn.backend()
}

#[cfg(test)]
mod tests {
    use stevedore::handler::run_handler;
    use stevedore::{CancellationToken, ServiceCollection, ServiceContext};
    use stevedore_bus::outbox::Outbox;

    use super::*;
    use crate::db::{Database, Either};

    async fn database() -> (Database, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("employee-sync-uow-{}.db", uuid::Uuid::new_v4().simple()));
        let options = sqlx::sqlite::SqliteConnectOptions::new().filename(&path).create_if_missing(true);
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await.unwrap();
        let db = Database {
            outbox: Outbox::sqlite(pool.clone()),
            pool: Either::Sqlite(pool),
            topic: "test.employees.changed".into(),
        };
        db.migrate().await.unwrap();
        (db, path)
    }

    fn context(db: &Database) -> ServiceContext {
        let services = ServiceCollection::new().singleton_value(db.clone()).scoped_with_end(
            |db: Singleton<Database>| async move { Ok::<_, BoxError>(UnitOfWork::new((*db).clone())) },
            UnitOfWork::end,
        );
        ServiceContext::detached_with("test", CancellationToken::new(), services)
    }

    fn people(n: usize, department: &str) -> Vec<Employee> {
        (0..n)
            .map(|i| Employee {
                id: format!("e-{i}"),
                name: format!("Person {i}"),
                email: format!("p{i}@example.com"),
                department: department.into(),
                title: "Engineer".into(),
            })
            .collect()
    }

    #[tokio::test]
    async fn a_failed_run_rolls_back_the_rows_and_their_events_and_a_good_one_commits_both() {
        let (db, path) = database().await;
        let ctx = context(&db);

        // The changes and their events are written, then the run fails: nothing of it remains.
        let failing = |uow: Scoped<UnitOfWork>| async move {
            let summary = apply(&mut *uow.lock().await, "test", &people(3, "Research")).await?;
            assert_eq!(summary.hired, 3);
            Err::<(), BoxError>("something after the writes failed".into())
        };
        let result = run_handler(&ctx, &failing, None).await;
        assert!(!result.is_success());
        assert_eq!(db.employees().await.unwrap().len(), 0, "the inserts were rolled back");
        assert_eq!(db.outbox.pending().await.unwrap(), 0, "so were their events");
        assert!(db.syncs(10).await.unwrap().is_empty());

        // A good run commits rows, events and the sync record together.
        let good = |uow: Scoped<UnitOfWork>| async move {
            apply(&mut *uow.lock().await, "test", &people(3, "Research")).await.map(|_| ())
        };
        assert!(run_handler(&ctx, &good, None).await.is_success());
        assert_eq!(db.employees().await.unwrap().len(), 3);
        assert_eq!(db.outbox.pending().await.unwrap(), 3);

        // Only real changes make events: one moves, one leaves, the third is unchanged.
        let next = |uow: Scoped<UnitOfWork>| async move {
            let mut list = people(2, "Research");
            list[1].department = "Finance".into();
            let s = apply(&mut *uow.lock().await, "test", &list).await?;
            assert_eq!((s.hired, s.updated, s.departed), (0, 1, 1));
            Ok::<(), BoxError>(())
        };
        assert!(run_handler(&ctx, &next, None).await.is_success());
        assert_eq!(db.outbox.pending().await.unwrap(), 5);
        let again = |uow: Scoped<UnitOfWork>| async move {
            let mut list = people(2, "Research");
            list[1].department = "Finance".into();
            let s = apply(&mut *uow.lock().await, "test", &list).await?;
            assert_eq!((s.hired, s.updated, s.departed), (0, 0, 0), "the same list again changes nothing");
            Ok::<(), BoxError>(())
        };
        assert!(run_handler(&ctx, &again, None).await.is_success());
        assert_eq!(db.outbox.pending().await.unwrap(), 5);
        let _ = std::fs::remove_file(path);
    }
}
