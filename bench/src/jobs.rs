//! `jobs` scenario: durable jobs, Stevedore against apalis 1.0 and graphile-worker, in one run.
//!
//! For each subject: burn-down (insert N no-op jobs in batches, then time how long the worker
//! takes to run them all, until the last outcome is recorded for Stevedore) and enqueue-to-start
//! latency (1,000 jobs enqueued one by one, each waited for; the time includes the enqueue's
//! own commit). Every subject gets a fresh database (PostgreSQL) or a fresh file (SQLite) on
//! the same server. apalis on SQLite runs fewer jobs (its claim and completion queries slow
//! down as the backlog grows, so a smaller N flatters it); the rate is what is compared.
//!
//! graphile-worker runs from `bench/jobs-graphile` (installed with npm on first use).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use stevedore_jobs::{BoxError, Job, JobContext, JobStore, NewJob, PostgresStore, SqliteStore, Worker};
use tokio_util::sync::CancellationToken;

/// What the scenario runs.
#[derive(Debug, Clone)]
pub struct JobsOptions {
    /// PostgreSQL server (a database is created per subject and dropped after).
    pub pg_url: String,
    /// Jobs in the burn-down of Stevedore and graphile-worker.
    pub jobs: u64,
    /// Jobs in the burn-down of apalis on SQLite.
    pub apalis_sqlite_jobs: u64,
    /// Jobs in the burn-down of apalis on PostgreSQL.
    pub apalis_pg_jobs: u64,
    /// Jobs enqueued one by one for the latency figures.
    pub latency_jobs: u64,
    /// Worker concurrency of every subject.
    pub concurrency: usize,
    /// Where the graphile-worker script lives.
    pub graphile_dir: PathBuf,
    /// Skip apalis and graphile-worker (Stevedore alone).
    pub skip_peers: bool,
}

impl Default for JobsOptions {
    fn default() -> Self {
        Self {
            pg_url: std::env::var("STEVEDORE_BENCH_PG_URL")
                .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string()),
            jobs: 100_000,
            apalis_sqlite_jobs: 5_000,
            apalis_pg_jobs: 100_000,
            latency_jobs: 1_000,
            concurrency: 16,
            graphile_dir: Path::new(env!("CARGO_MANIFEST_DIR")).join("jobs-graphile"),
            skip_peers: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Noop {
    n: u64,
}

impl Job for Noop {
    const KIND: &'static str = "noop";
}

/// Runs the scenario, prints a table, and returns the figures (the names of the issue) with
/// the details under `detail`.
pub async fn run(opts: &JobsOptions) -> Result<Value, BoxError> {
    let mut detail = serde_json::Map::new();
    let mut line = |name: &str, v: Value| {
        println!("  {name:<44} {v}");
        detail.insert(name.to_string(), v);
    };
    println!("jobs: {} no-op jobs, concurrency {}", opts.jobs, opts.concurrency);

    // Stevedore with its default settings (adaptive prefetch), and with prefetch turned off
    // (one fetch per batch of free slots, nothing leased ahead).
    let sqlite = burn_stevedore_sqlite(opts, None).await?;
    line("stevedore sqlite burn-down jobs/s", json!(sqlite.rate));
    line("stevedore sqlite enqueue jobs/s", json!(sqlite.enqueue_rate));
    let sqlite_plain = burn_stevedore_sqlite(opts, Some(0)).await?;
    line("stevedore sqlite burn-down jobs/s (prefetch off)", json!(sqlite_plain.rate));
    let pg = burn_stevedore_pg(opts, None).await?;
    line("stevedore pg burn-down jobs/s", json!(pg.rate));
    line("stevedore pg enqueue jobs/s", json!(pg.enqueue_rate));
    let pg_plain = burn_stevedore_pg(opts, Some(0)).await?;
    line("stevedore pg burn-down jobs/s (prefetch off)", json!(pg_plain.rate));

    let sqlite_lat = {
        let file = TempFile::new("lat");
        latency_stevedore(SqliteStore::open(&file.0).await?, opts).await?
    };
    line("stevedore sqlite latency p50 ms", json!(sqlite_lat.p50));
    line("stevedore sqlite latency p99 ms", json!(sqlite_lat.p99));
    line("stevedore sqlite commit-to-start p99 ms", json!(sqlite_lat.after_commit_p99));
    let pg_lat = {
        let db = TempDb::create(&opts.pg_url, "stevedore_lat").await?;
        let lat = latency_stevedore(PostgresStore::connect(&db.url).await?, opts).await?;
        db.drop().await?;
        lat
    };
    line("stevedore pg latency p50 ms", json!(pg_lat.p50));
    line("stevedore pg latency p99 ms", json!(pg_lat.p99));
    line("stevedore pg commit-to-start p99 ms", json!(pg_lat.after_commit_p99));

    let mut figures = json!({
        "pg_jobs_per_s": pg.rate,
        "sqlite_jobs_per_s": sqlite.rate,
        "pg_latency_p99_ms": pg_lat.p99,
        "sqlite_latency_p99_ms": sqlite_lat.p99,
    });

    if !opts.skip_peers {
        let apalis_sqlite = apalis_sqlite_burn(opts).await?;
        line("apalis sqlite burn-down jobs/s", json!(apalis_sqlite));
        let apalis_pg = apalis_pg_burn(opts).await?;
        line("apalis pg burn-down jobs/s", json!(apalis_pg));
        let graphile = run_graphile(opts, "burn", "default", opts.jobs).await?;
        line("graphile-worker burn-down jobs/s (default)", graphile["jobs_per_s"].clone());
        let graphile_batched = run_graphile(opts, "burn", "batched", opts.jobs).await?;
        line("graphile-worker burn-down jobs/s (batched)", graphile_batched["jobs_per_s"].clone());
        let graphile_lat = run_graphile(opts, "latency", "default", opts.latency_jobs).await?;
        line("graphile-worker latency p50 ms", graphile_lat["latency_p50_ms"].clone());
        line("graphile-worker latency p99 ms", graphile_lat["latency_p99_ms"].clone());
        let g = graphile["jobs_per_s"].as_f64().unwrap_or(f64::NAN);
        let gb = graphile_batched["jobs_per_s"].as_f64().unwrap_or(f64::NAN);
        figures["pg_vs_graphile"] = json!(pg.rate / g);
        figures["pg_vs_graphile_batched"] = json!(pg.rate / gb);
        figures["pg_prefetch_off_vs_graphile"] = json!(pg_plain.rate / g);
        figures["pg_vs_apalis"] = json!(pg.rate / apalis_pg);
        figures["sqlite_vs_apalis"] = json!(sqlite.rate / apalis_sqlite);
    }
    println!("jobs figures: {figures}");
    figures["detail"] = Value::Object(detail);
    Ok(figures)
}

/// Runs the whole scenario `runs` times and reports the median of every figure (and of every
/// detail line), with the runs' values kept under `runs`.
pub async fn run_median(opts: &JobsOptions, runs: usize) -> Result<Value, BoxError> {
    let mut all = Vec::with_capacity(runs.max(1));
    for i in 0..runs.max(1) {
        println!("-- run {} of {}", i + 1, runs.max(1));
        all.push(run(opts).await?);
    }
    let median_of = |pick: &dyn Fn(&Value) -> Option<&serde_json::Map<String, Value>>| {
        let mut out = serde_json::Map::new();
        if let Some(first) = pick(&all[0]) {
            for key in first.keys() {
                let v: Vec<f64> =
                    all.iter().filter_map(|r| pick(r).and_then(|m| m.get(key)).and_then(Value::as_f64)).collect();
                if !v.is_empty() {
                    out.insert(key.clone(), json!(crate::report::median(v)));
                }
            }
        }
        out
    };
    let mut figures = Value::Object(median_of(&|r| r.as_object()));
    figures["detail"] = Value::Object(median_of(&|r| r.get("detail").and_then(Value::as_object)));
    println!("jobs figures, median of {}: {}", all.len(), {
        let mut f = figures.clone();
        f.as_object_mut().map(|m| m.remove("detail"));
        f
    });
    figures["runs"] = Value::Array(all);
    Ok(figures)
}

struct Burn {
    rate: f64,
    enqueue_rate: f64,
}

struct Latency {
    p50: f64,
    p99: f64,
    after_commit_p99: f64,
}

async fn burn_stevedore_sqlite(opts: &JobsOptions, prefetch: Option<usize>) -> Result<Burn, BoxError> {
    let file = TempFile::new("burn");
    burn_stevedore(SqliteStore::open(&file.0).await?, opts, prefetch).await
}

async fn burn_stevedore_pg(opts: &JobsOptions, prefetch: Option<usize>) -> Result<Burn, BoxError> {
    let db = TempDb::create(&opts.pg_url, "stevedore_burn").await?;
    let burn = burn_stevedore(PostgresStore::connect(&db.url).await?, opts, prefetch).await;
    db.drop().await?;
    burn
}

async fn burn_stevedore<S: JobStore>(store: S, opts: &JobsOptions, prefetch: Option<usize>) -> Result<Burn, BoxError> {
    let n = opts.jobs;
    let jobs: Vec<NewJob> = (0..n).map(|n| NewJob::new(&Noop { n })).collect::<Result<_, _>>()?;
    let t = Instant::now();
    for chunk in jobs.chunks(5_000) {
        store.enqueue_many(chunk).await?;
    }
    let enqueue_rate = n as f64 / t.elapsed().as_secs_f64();

    let ran = Arc::new(AtomicU64::new(0));
    let counter = Arc::clone(&ran);
    let mut worker = Worker::new(store.clone())
        .register(move |_job: Noop, _ctx: JobContext| {
            counter.fetch_add(1, Ordering::Relaxed);
            async { Ok::<(), BoxError>(()) }
        })
        .queue("default", opts.concurrency);
    worker.config_mut().retention = None;
    if let Some(prefetch) = prefetch {
        worker.config_mut().prefetch = prefetch;
    }
    let stop = CancellationToken::new();
    let t = Instant::now();
    let handle = worker.spawn(stop.clone());
    while ran.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // Done means recorded: wait for the last outcomes to reach the store.
    loop {
        let completed: u64 = store.stats().await?.iter().map(|q| q.completed).sum();
        if completed >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let rate = n as f64 / t.elapsed().as_secs_f64();
    stop.cancel();
    handle.await??;
    Ok(Burn { rate, enqueue_rate })
}

async fn latency_stevedore<S: JobStore>(store: S, opts: &JobsOptions) -> Result<Latency, BoxError> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Instant>();
    let worker = Worker::new(store.clone())
        .register(move |_job: Noop, _ctx: JobContext| {
            let _ = tx.send(Instant::now());
            async { Ok::<(), BoxError>(()) }
        })
        .queue("default", opts.concurrency);
    let stop = CancellationToken::new();
    let handle = worker.spawn(stop.clone());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut total = Vec::new();
    let mut after_commit = Vec::new();
    for n in 0..opts.latency_jobs {
        let t0 = Instant::now();
        store.enqueue(&NewJob::new(&Noop { n })?).await?;
        let committed = Instant::now();
        let started = rx.recv().await.ok_or("latency worker stopped")?;
        total.push(started.saturating_duration_since(t0));
        after_commit.push(started.saturating_duration_since(committed));
    }
    stop.cancel();
    handle.await??;
    Ok(Latency {
        p50: percentile_ms(&mut total, 0.50),
        p99: percentile_ms(&mut total, 0.99),
        after_commit_p99: percentile_ms(&mut after_commit, 0.99),
    })
}

fn percentile_ms(v: &mut [Duration], q: f64) -> f64 {
    v.sort();
    let i = ((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1));
    v.get(i).map_or(f64::NAN, |d| d.as_secs_f64() * 1000.0)
}

// ---- apalis ----

static APALIS_RAN: AtomicU64 = AtomicU64::new(0);

async fn apalis_noop(_job: Noop) -> Result<(), apalis::prelude::BoxDynError> {
    APALIS_RAN.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

async fn apalis_sqlite_burn(opts: &JobsOptions) -> Result<f64, BoxError> {
    use apalis::prelude::*;
    use apalis_sqlite::SqliteStorage;

    let file = TempFile::new("apalis");
    let pool = sqlx::SqlitePool::connect(&format!("sqlite://{}?mode=rwc", file.0.display())).await?;
    SqliteStorage::setup(&pool).await?;
    let mut storage = SqliteStorage::new(&pool);
    let n = opts.apalis_sqlite_jobs;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        storage.push_bulk(chunk.iter().map(|&n| Noop { n }).collect()).await?;
    }
    APALIS_RAN.store(0, Ordering::Relaxed);
    let worker = WorkerBuilder::new("bench").backend(storage).concurrency(opts.concurrency).build(apalis_noop);
    let t = Instant::now();
    worker
        .run_until(async move {
            while APALIS_RAN.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<(), std::io::Error>(())
        })
        .await?;
    Ok(n as f64 / t.elapsed().as_secs_f64())
}

async fn apalis_pg_burn(opts: &JobsOptions) -> Result<f64, BoxError> {
    use apalis::prelude::*;
    use apalis_postgres::PostgresStorage;

    let db = TempDb::create(&opts.pg_url, "apalis").await?;
    let pool = sqlx::PgPool::connect(&db.url).await?;
    PostgresStorage::setup(&pool).await?;
    let mut storage = PostgresStorage::new(&pool);
    let n = opts.apalis_pg_jobs;
    for chunk in (0..n).collect::<Vec<_>>().chunks(1_000) {
        storage.push_bulk(chunk.iter().map(|&n| Noop { n }).collect()).await?;
    }
    APALIS_RAN.store(0, Ordering::Relaxed);
    let worker = WorkerBuilder::new("bench").backend(storage).concurrency(opts.concurrency).build(apalis_noop);
    let t = Instant::now();
    worker
        .run_until(async move {
            while APALIS_RAN.load(Ordering::Relaxed) < n {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Ok::<(), std::io::Error>(())
        })
        .await?;
    let rate = n as f64 / t.elapsed().as_secs_f64();
    pool.close().await;
    db.drop().await?;
    Ok(rate)
}

// ---- graphile-worker ----

async fn run_graphile(opts: &JobsOptions, mode: &str, settings: &str, jobs: u64) -> Result<Value, BoxError> {
    let dir = &opts.graphile_dir;
    if !dir.join("node_modules").join("graphile-worker").exists() {
        let status = tokio::process::Command::new("npm")
            .args(["install", "--no-audit", "--no-fund", "--loglevel=error"])
            .current_dir(dir)
            .status()
            .await?;
        if !status.success() {
            return Err(format!("npm install in {} failed: {status}", dir.display()).into());
        }
    }
    let db = TempDb::create(&opts.pg_url, "graphile").await?;
    let out = tokio::process::Command::new("node")
        .arg("bench.mjs")
        .current_dir(dir)
        .env("DATABASE_URL", &db.url)
        .env("MODE", mode)
        .env("SETTINGS", settings)
        .env("JOBS", jobs.to_string())
        .env("CONCURRENCY", opts.concurrency.to_string())
        .stderr(std::process::Stdio::null())
        .output()
        .await?;
    db.drop().await?;
    if !out.status.success() {
        return Err(format!("graphile-worker {mode}/{settings} failed: {}", out.status).into());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.starts_with('{')).ok_or("graphile-worker printed no result")?;
    Ok(serde_json::from_str(last)?)
}

// ---- scratch databases ----

struct TempFile(PathBuf);

impl TempFile {
    fn new(tag: &str) -> Self {
        let unique = format!("{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        TempFile(std::env::temp_dir().join(format!("stevedore-bench-jobs-{tag}-{unique}.db")))
    }
}

static NEXT: AtomicU64 = AtomicU64::new(0);

impl Drop for TempFile {
    fn drop(&mut self) {
        for suffix in ["", "-wal", "-shm"] {
            let _ = std::fs::remove_file(format!("{}{suffix}", self.0.display()));
        }
    }
}

struct TempDb {
    admin: sqlx::PgPool,
    name: String,
    url: String,
}

impl TempDb {
    async fn create(server: &str, tag: &str) -> Result<Self, BoxError> {
        let admin = sqlx::PgPool::connect(server).await?;
        let name = format!("stevedore_bench_{tag}_{}_{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}"))).execute(&admin).await?;
        let base = server.rsplit_once('/').map_or(server, |(b, _)| b);
        let url = format!("{base}/{name}");
        Ok(TempDb { admin, name, url })
    }

    async fn drop(self) -> Result<(), BoxError> {
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name)))
            .execute(&self.admin)
            .await?;
        self.admin.close().await;
        Ok(())
    }
}
