//! Wires the roles: which services a process runs, on which database and bus.
//!
//! | service | all | web | worker |
//! | --- | --- | --- | --- |
//! | `scopes` (context for job scopes) | yes | yes | yes |
//! | `sync-employees`: the timed sync (core interval service, per process) | yes | | |
//! | `jobs`: sync and report jobs, the cluster-wide timed sync (a periodic job) | yes | | yes |
//! | `outbox-relay` (one active per database) and `directory-consumer` | yes | | yes |
//! | `web`: API (all, web), upstream simulation, health, metrics, dashboard | yes | yes | yes |

use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use stevedore::interval::IntervalService;
use stevedore::{
    BoxError, Host, HostBuilder, OnFailure, RestartPolicy, Scoped, ServiceCollection, ServiceSpec, Singleton,
};
use stevedore_bus::Message;
use stevedore_bus::amqp::{AmqpConfig, AmqpPublisher, AmqpSource};
use stevedore_bus::consumer::{Consumer, ConsumerOptions, Source};
use stevedore_bus::memory::InProcessBus;
use stevedore_bus::nats::{JetStreamPublisher, JetStreamSource, NatsConfig};
use stevedore_bus::outbox::Outbox;
use stevedore_bus::relay::{Relay, RelayOptions};
use stevedore_bus::{Publisher, consumer};
use stevedore_jobs::{AnyStore, JobStore, PeriodicJob, PostgresStore, SqliteStore, Worker, WorkerConfig};
use stevedore_web::isolation::BackgroundRuntime;
use stevedore_web::{WebHostExt, WebServer};

use crate::api::{ApiState, routes};
use crate::config::{BusUrl, Config, DatabaseUrl, Role};
use crate::consumer::{CONSUMER, on_employee_changed};
use crate::db::{Database, Either, UnitOfWork};
use crate::jobs::{GenerateReport, SyncEmployees, run_report_job, run_sync_job};
use crate::sync::sync_employees;
use crate::upstream::Upstream;

/// The topic (AMQP routing key, NATS subject) of the events: prefixed with the bus name, so that
/// deployments sharing a NATS account do not claim the same subjects.
fn topic(config: &Config) -> Arc<str> {
    format!("{}.{}", config.bus_name, crate::sync::TOPIC).into()
}

/// Connects to the database named by the config, applies every migration, and returns the
/// application's handle and the job store on the same database.
pub async fn open(config: &Config) -> Result<(Database, AnyStore), BoxError> {
    match &config.database {
        DatabaseUrl::Sqlite(url) => {
            let store = SqliteStore::connect(url).await.map_err(|e| format!("opening {url}: {e}"))?;
            // One writer connection for jobs, outbox and application rows: no lock contention.
            let pool = store.pool().clone();
            let db =
                Database { outbox: Outbox::sqlite(pool.clone()), pool: Either::Sqlite(pool), topic: topic(config) };
            db.migrate().await?;
            Ok((db, AnyStore::Sqlite(store)))
        }
        DatabaseUrl::Postgres(url) => {
            let options = PgConnectOptions::from_str(url).map_err(|e| format!("invalid --database-url: {e}"))?;
            let pool = PgPoolOptions::new()
                .max_connections(config.database_max_connections)
                .acquire_timeout(Duration::from_secs(10))
                .connect_with(options)
                .await
                .map_err(|e| format!("cannot connect to the database: {e}"))?;
            let store = PostgresStore::from_pool(pool.clone());
            store.migrate().await?;
            let db =
                Database { outbox: Outbox::postgres(pool.clone()), pool: Either::Postgres(pool), topic: topic(config) };
            db.migrate().await?;
            Ok((db, AnyStore::Postgres(store)))
        }
    }
}

/// Builds the host for the configured role. Nothing runs until [`Host::run`].
pub async fn build(config: &Config) -> Result<Host, BoxError> {
    let (db, jobs) = open(config).await?;
    let background = BackgroundRuntime::builder().name("employee-sync-bg").build()?;
    let mut router = crate::upstream::routes(config.simulated_change_every);
    if config.role != Role::Worker {
        router = router.merge(routes(ApiState { db: db.clone(), jobs: jobs.clone() }));
    }
    // The dashboard shows the job store too: queues, dead jobs with their errors, retry and cancel.
    let web = WebServer::new(router).bind(config.listen.clone()).background(background.clone()).jobs(jobs.clone());
    let upstream = Upstream::new(config.upstream_url.clone(), web.local_addr(), config.upstream_timeout);

    let services = ServiceCollection::new().singleton_value(db.clone()).singleton_value(upstream).scoped_with_end(
        |db: Singleton<Database>| async move { Ok::<_, BoxError>(UnitOfWork::new((*db).clone())) },
        UnitOfWork::end,
    );

    let mut host = Host::builder()
        .services(services)
        .read_env(false) // the config already merged STEVEDORE_SHUTDOWN_* with flags and file
        .shutdown_timeout(config.shutdown_timeout)
        .shutdown_delay(config.shutdown_delay)
        .stop_concurrently(true);

    if config.role != Role::Web {
        host = add_bus(host, config, &db)?;
        host = host.add(worker(jobs.clone(), config, &db, &background));
    }
    if config.role == Role::All {
        // The article's timed service: every period, first run at start, never overlapping, each run
        // in its own scope whose transaction commits or rolls back with the run.
        let lifetime = host.lifetime();
        let timer = IntervalService::fixed_rate(
            "sync-employees",
            config.sync_interval,
            move |upstream: Singleton<Upstream>, uow: Scoped<UnitOfWork>| {
                let lifetime = lifetime.clone();
                async move {
                    // The default upstream is this process's own web server, which starts last.
                    if !lifetime.started().await {
                        return Ok(());
                    }
                    sync_employees("timer".into(), upstream, uow).await.map(|_| ())
                }
            },
        )
        .timeout(config.sync_interval.min(config.upstream_timeout * 3));
        host = host.add(timer.into_spec().heartbeat(config.sync_interval * 3));
    }
    Ok(host.build_web(web)?)
}

fn worker<S: JobStore>(store: S, config: &Config, db: &Database, background: &BackgroundRuntime) -> ServiceSpec {
    let worker_config = WorkerConfig {
        lease_ttl: config.job_lease_ttl,
        shutdown_timeout: config.drain_budget(),
        ..WorkerConfig::default()
    };
    let (db, background) = (db.clone(), background.clone());
    let mut worker = Worker::new(store)
        .config(worker_config)
        .register(run_sync_job)
        .register(move |job: GenerateReport, ctx| run_report_job(db.clone(), background.clone(), job, ctx))
        .queue(<SyncEmployees as stevedore_jobs::Job>::QUEUE, 1)
        .queue(<GenerateReport as stevedore_jobs::Job>::QUEUE, config.report_concurrency);
    if config.role == Role::Worker {
        // Many workers, one timer: the elected leader enqueues one sync job per tick for the cluster.
        worker = worker.periodic(PeriodicJob::every(
            "employee-sync",
            config.sync_interval,
            SyncEmployees { trigger: "timer".into() },
        ));
    }
    worker.into_service("jobs").on_failure(OnFailure::Restart(RestartPolicy::default()))
}

fn add_bus(host: HostBuilder, config: &Config, db: &Database) -> Result<HostBuilder, BoxError> {
    let queue = format!("{}.{CONSUMER}", config.bus_name);
    let pattern = format!("{}.employees.#", config.bus_name);
    let patterns = [pattern.as_str()];
    Ok(match &config.bus {
        BusUrl::InProcess => {
            let bus = InProcessBus::new();
            let source = bus.queue(&queue, &patterns).source();
            add_relay_and_consumer(host, config, db, bus, source)
        }
        BusUrl::Amqp(url) => {
            let amqp = AmqpConfig::new(url.clone(), config.bus_name.clone());
            let publisher = AmqpPublisher::new(amqp.clone()).with_queue(&queue, &patterns);
            add_relay_and_consumer(host, config, db, publisher, AmqpSource::new(amqp, &queue, &patterns))
        }
        BusUrl::Nats(url) => {
            let stream = config.bus_name.replace('-', "_").to_uppercase();
            let subjects = format!("{}.employees.>", config.bus_name);
            let nats = NatsConfig::new(url.clone(), stream, &[subjects.as_str()]);
            let durable = queue.replace('.', "_");
            let source = JetStreamSource::new(nats.clone(), &durable, &subjects);
            add_relay_and_consumer(host, config, db, JetStreamPublisher::new(nats), source)
        }
    })
}

fn add_relay_and_consumer<P: Publisher, S: Source>(
    host: HostBuilder,
    config: &Config,
    db: &Database,
    publisher: P,
    source: S,
) -> HostBuilder {
    // No heartbeat on the relay: on PostgreSQL one relay per database is active and the others
    // stand by without beating, which is healthy.
    let relay = Relay::new(db.outbox.clone(), publisher, RelayOptions::default());
    let options = ConsumerOptions { drain_timeout: config.drain_budget(), ..ConsumerOptions::default() };
    let db = db.clone();
    let handler = move |m: Message| {
        let db = db.clone();
        async move { on_employee_changed(&db, m).await }
    };
    let consumer: consumer::Consumer<S, _> = Consumer::new(source, handler, options);
    host.add(ServiceSpec::background("outbox-relay", relay).on_failure(OnFailure::Restart(RestartPolicy::default())))
        .add(
            ServiceSpec::background(format!("{CONSUMER}-consumer"), consumer)
                .heartbeat(Duration::from_secs(30))
                .on_failure(OnFailure::Restart(RestartPolicy::default())),
        )
}
