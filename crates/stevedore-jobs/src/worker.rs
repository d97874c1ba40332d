//! The worker: fetches jobs per queue, runs their handlers, renews leases, records outcomes,
//! rescues jobs of crashed workers, and stops gracefully.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::BoxFuture;
use tokio::sync::{Notify, Semaphore, mpsc, watch};
use tokio::task::{AbortHandle, JoinHandle};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use stevedore::scope::Dependency;
use stevedore::{PayloadHandler, RunOutcome, ServiceContext};

use crate::backoff::Backoff;
use crate::error::{BoxError, JobError};
use crate::job::{ClaimedJob, Job, JobId, duration_ms};
use crate::periodic::{PeriodicJob, run_scheduler};
use crate::store::{JobStore, Lease, Outcome, Retention};

/// What a running job knows about itself, and how it learns that it should stop.
///
/// The context is cancelled when the worker's shutdown budget runs out, when the job's lease
/// is lost (the job was cancelled, or rescued because heartbeats did not get through), and
/// when the job's timeout is reached. A handler doing long work should select on
/// [`cancelled`](Self::cancelled).
#[derive(Debug, Clone)]
pub struct JobContext {
    id: JobId,
    kind: Arc<str>,
    queue: Arc<str>,
    attempt: u32,
    max_attempts: u32,
    token: CancellationToken,
}

impl JobContext {
    /// The job's id.
    pub fn id(&self) -> JobId {
        self.id
    }

    /// The job's kind.
    pub fn kind(&self) -> &str {
        &self.kind
    }

    /// The queue it came from.
    pub fn queue(&self) -> &str {
        &self.queue
    }

    /// This attempt's number (1 for the first run).
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// Attempts the job has in all.
    pub fn max_attempts(&self) -> u32 {
        self.max_attempts
    }

    /// True on the job's last attempt: a failure now makes it dead.
    pub fn is_last_attempt(&self) -> bool {
        self.attempt >= self.max_attempts
    }

    /// Resolves when the run should stop (see the type's docs).
    pub async fn cancelled(&self) {
        self.token.cancelled().await
    }

    /// True once the run should stop.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The cancellation token, to hand to code that takes one.
    pub fn token(&self) -> &CancellationToken {
        &self.token
    }
}

impl stevedore::FromScope for JobContext {
    async fn from_scope(scope: &stevedore::Scope) -> Result<Self, BoxError> {
        scope.extension::<JobContext>().ok_or_else(|| "no job is running in this scope".into())
    }
}

/// How one attempt ended, from the handler's side.
enum Attempt {
    Succeeded,
    Failed(String),
    TimedOut(Duration),
}

/// A handler with its job type erased: decodes the payload, then runs in a fresh scope.
type ErasedHandler = Arc<
    dyn Fn(&str, JobContext, ServiceContext, Duration) -> Result<BoxFuture<'static, Attempt>, serde_json::Error>
        + Send
        + Sync,
>;

/// The single place where job handlers are called: a fresh scope per run with the job's
/// [`JobContext`] attached, the run's time limit, panics caught, and the scope closed with the
/// run's outcome (a scope whose end fails, a transaction that does not commit say, fails the
/// attempt).
async fn call_handler<J, Args, H>(
    handler: H,
    job: J,
    ctx: JobContext,
    service: ServiceContext,
    timeout: Duration,
) -> Attempt
where
    J: Job,
    H: PayloadHandler<J, Args>,
{
    let token = ctx.token.clone();
    let scope = service.create_scope();
    scope.insert_extension(ctx);
    let result = tokio::time::timeout(timeout, AssertUnwindSafe(handler.call(job, &scope)).catch_unwind()).await;
    let (attempt, outcome) = match result {
        Ok(Ok(Ok(()))) => (Attempt::Succeeded, RunOutcome::Succeeded),
        Ok(Ok(Err(error))) => (Attempt::Failed(error_chain(error.as_ref())), RunOutcome::Failed),
        Ok(Err(panic)) => {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "non-string panic payload".to_string());
            (Attempt::Failed(format!("handler panicked: {message}")), RunOutcome::Failed)
        }
        Err(_) => {
            token.cancel();
            (Attempt::TimedOut(timeout), RunOutcome::TimedOut)
        }
    };
    match scope.close(outcome).await {
        Ok(()) => attempt,
        Err(error) => match attempt {
            Attempt::Succeeded => {
                Attempt::Failed(format!("ending the job's scope failed: {}", error_chain(error.as_ref())))
            }
            other => other,
        },
    }
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

/// Tuning of a [`Worker`]. The defaults suit most uses; every duration is a real one.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// How long a fetched job stays leased without a heartbeat. A crashed worker's jobs run
    /// again this long after its last heartbeat. Default 30 s.
    pub lease_ttl: Duration,
    /// How often running jobs' leases are renewed. Default: a third of `lease_ttl`.
    pub heartbeat_interval: Option<Duration>,
    /// How often this worker looks for jobs whose lease ran out. Default 5 s.
    pub rescue_interval: Duration,
    /// Fallback poll when no wake-up arrives. Default: 5 s on PostgreSQL (LISTEN/NOTIFY wakes
    /// workers), 1 s on SQLite (wake-ups do not cross processes).
    pub poll_interval: Option<Duration>,
    /// Most jobs taken by one fetch. Default 100.
    pub fetch_batch: u32,
    /// Most jobs fetched per queue beyond its concurrency, to start as slots free up: fewer
    /// round trips for short jobs. Adaptive: the worker prefetches only as many as keep the
    /// expected wait of a prefetched job under [`prefetch_wait`](Self::prefetch_wait), from the
    /// queue's measured run times, so slow jobs are never held back from idle workers. A
    /// graceful stop releases prefetched jobs not started. 0 turns it off. Default 64.
    pub prefetch: usize,
    /// Longest expected wait of a prefetched job for a free slot. Default 5 ms.
    pub prefetch_wait: Duration,
    /// Most outcomes recorded by one write. Default 500.
    pub complete_batch: usize,
    /// Time running jobs get to finish after stop is requested; jobs still running then are
    /// aborted and released. Default 4 s: under the host's default 5 s shutdown budget, leaving
    /// time to release.
    pub shutdown_timeout: Duration,
    /// Time limit of one run for jobs that set none. Default 30 min.
    pub default_timeout: Duration,
    /// Retry delays.
    pub backoff: Backoff,
    /// Deletion of finished jobs; `None` keeps them. Default: [`Retention::default`].
    pub retention: Option<Retention>,
    /// How often retention runs. Default 60 s.
    pub cleanup_interval: Duration,
    /// Leadership lease of the periodic scheduler. Default 10 s.
    pub leader_ttl: Duration,
    /// Most missed ticks of one periodic job enqueued after downtime (the latest ones).
    /// Default 10.
    pub max_catch_up: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(30),
            heartbeat_interval: None,
            rescue_interval: Duration::from_secs(5),
            poll_interval: None,
            fetch_batch: 100,
            prefetch: 64,
            prefetch_wait: Duration::from_millis(5),
            complete_batch: 500,
            shutdown_timeout: Duration::from_secs(4),
            default_timeout: Duration::from_secs(30 * 60),
            backoff: Backoff::default(),
            retention: Some(Retention::default()),
            cleanup_interval: Duration::from_secs(60),
            leader_ttl: Duration::from_secs(10),
            max_catch_up: 10,
        }
    }
}

/// Runs jobs from a [`JobStore`]: per-queue concurrency, leases with heartbeats, retries,
/// dead letters, rescue of crashed workers' jobs, periodic jobs and a graceful stop.
///
/// ```no_run
/// use serde::{Deserialize, Serialize};
/// use stevedore_jobs::{BoxError, Job, JobContext, JobStore, NewJob, SqliteStore, Worker};
/// use tokio_util::sync::CancellationToken;
///
/// #[derive(Serialize, Deserialize)]
/// struct Resize { image: u64 }
/// impl Job for Resize { const KIND: &'static str = "resize"; }
///
/// # async fn demo() -> Result<(), stevedore_jobs::JobError> {
/// let store = SqliteStore::open("jobs.db").await?;
/// store.enqueue(&NewJob::new(&Resize { image: 7 })?).await?;
///
/// let stop = CancellationToken::new();
/// Worker::new(store)
///     .register(|job: Resize, _ctx: JobContext| async move {
///         println!("resizing {}", job.image);
///         Ok::<(), BoxError>(())
///     })
///     .queue("default", 8)
///     .run(stop)
///     .await?;
/// # Ok(()) }
/// ```
pub struct Worker<S: JobStore> {
    store: S,
    handlers: HashMap<String, ErasedHandler>,
    queues: Vec<(String, usize)>,
    periodic: Vec<PeriodicJob>,
    config: WorkerConfig,
    owner: String,
    needs: Vec<Dependency>,
    control: Arc<WorkerControl>,
}

/// Operator actions on a worker (the dashboard's and the CLI's pause and resume). Pausing stops
/// this worker fetching; running jobs finish. Other workers go on: to stop a queue everywhere,
/// use [`JobStore::pause`].
#[derive(Debug)]
pub struct WorkerControl {
    paused: watch::Sender<bool>,
}

impl Default for WorkerControl {
    fn default() -> Self {
        Self { paused: watch::channel(false).0 }
    }
}

impl WorkerControl {
    /// Whether the worker is paused.
    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }
}

impl stevedore::ServiceControl for WorkerControl {
    fn pause(&self) -> bool {
        self.paused.send_replace(true);
        true
    }

    fn resume(&self) -> bool {
        self.paused.send_replace(false);
        true
    }

    fn can_pause(&self) -> bool {
        true
    }
}

impl<S: JobStore> std::fmt::Debug for Worker<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("owner", &self.owner)
            .field("kinds", &self.handlers.keys().collect::<Vec<_>>())
            .field("queues", &self.queues)
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

/// A job this worker is running or whose outcome it has not recorded yet.
struct InFlight {
    token: CancellationToken,
    abort: Option<AbortHandle>,
    /// The handler has returned and its outcome is on its way to the store.
    finished: bool,
}

type InFlightMap = Arc<Mutex<HashMap<JobId, InFlight>>>;

fn lock(map: &InFlightMap) -> std::sync::MutexGuard<'_, HashMap<JobId, InFlight>> {
    map.lock().unwrap_or_else(|e| e.into_inner())
}

impl<S: JobStore> Worker<S> {
    /// A worker on `store` with the default configuration, no handlers and no queues (a worker
    /// with handlers but no queue runs the default queue with concurrency 10).
    pub fn new(store: S) -> Self {
        let id = uuid::Uuid::new_v4().simple().to_string();
        Self {
            store,
            handlers: HashMap::new(),
            needs: Vec::new(),
            control: Arc::default(),
            queues: Vec::new(),
            periodic: Vec::new(),
            config: WorkerConfig::default(),
            owner: format!("worker-{}-{}", std::process::id(), &id[..12]),
        }
    }

    /// Runs jobs of kind `J::KIND` with `handler`: an async fn or closure taking the payload
    /// first, then any Stevedore extractors ([`JobContext`], `Scoped<T>`, `Singleton<T>`, ...),
    /// resolved in a fresh scope per run. A second registration of a kind replaces the first.
    ///
    /// ```
    /// use stevedore_jobs::{BoxError, JobContext};
    /// # #[derive(serde::Serialize, serde::Deserialize)] struct Resize { image: u64 }
    /// # impl stevedore_jobs::Job for Resize { const KIND: &'static str = "resize"; }
    ///
    /// async fn resize(job: Resize, ctx: JobContext) -> Result<(), BoxError> {
    ///     println!("resizing {} (attempt {})", job.image, ctx.attempt());
    ///     Ok(())
    /// }
    ///
    /// fn worker(store: stevedore_jobs::SqliteStore) -> stevedore_jobs::Worker<stevedore_jobs::SqliteStore> {
    ///     stevedore_jobs::Worker::new(store).register(resize)
    /// }
    /// ```
    pub fn register<J, Args, H>(mut self, handler: H) -> Self
    where
        J: Job,
        Args: Send + 'static,
        H: PayloadHandler<J, Args>,
    {
        self.needs.extend(H::dependencies());
        let erased: ErasedHandler =
            Arc::new(move |payload: &str, ctx: JobContext, service: ServiceContext, timeout: Duration| {
                let job: J = serde_json::from_str(payload)?;
                Ok(Box::pin(call_handler(handler.clone(), job, ctx, service, timeout)) as BoxFuture<'static, Attempt>)
            });
        self.handlers.insert(J::KIND.to_string(), erased);
        self
    }

    /// Works `queue` with at most `concurrency` jobs at once (at least 1).
    pub fn queue(mut self, queue: impl Into<String>, concurrency: usize) -> Self {
        self.queues.push((queue.into(), concurrency.max(1)));
        self
    }

    /// Enqueues `job` on its schedule, once per tick across every worker sharing the store.
    pub fn periodic(mut self, job: PeriodicJob) -> Self {
        self.periodic.push(job);
        self
    }

    /// Replaces the configuration.
    pub fn config(mut self, config: WorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// The configuration, to adjust in place.
    pub fn config_mut(&mut self) -> &mut WorkerConfig {
        &mut self.config
    }

    /// The lease owner name this worker writes on the jobs it runs.
    pub fn id(&self) -> &str {
        &self.owner
    }

    /// Pause and resume for this worker (also attached to its host service).
    pub fn control(&self) -> Arc<WorkerControl> {
        Arc::clone(&self.control)
    }

    /// The store.
    pub fn store(&self) -> &S {
        &self.store
    }

    /// Runs until `stop` is cancelled, then stops gracefully: no new fetches; running jobs get
    /// [`WorkerConfig::shutdown_timeout`]; those still running then are aborted and released
    /// (back to available, the attempt not counted). Applies the migrations first.
    ///
    /// A worker can run again after it stopped (the host restarts failed services this way).
    pub async fn run(&self, stop: CancellationToken) -> Result<(), JobError> {
        self.run_in(ServiceContext::detached(self.owner.clone(), stop)).await
    }

    /// [`run`](Self::run) inside a host service: stops when `service` is cancelled, creates each
    /// job's scope from it and reports runs to its status (what the host does through
    /// [`into_service`](Self::into_service)).
    pub async fn run_in(&self, service: ServiceContext) -> Result<(), JobError> {
        let stop = service.token().clone();
        let store = self.store.clone();
        let handlers = self.handlers.clone();
        let mut queues = self.queues.clone();
        let periodic = self.periodic.clone();
        let config = self.config.clone();
        let owner = self.owner.clone();
        store.migrate().await?;
        if queues.is_empty() {
            queues.push((crate::job::DEFAULT_QUEUE.to_string(), 10));
        }
        let lease = Lease { owner: owner.clone(), ttl: config.lease_ttl };
        let poll = config.poll_interval.unwrap_or(match store.backend() {
            "postgres" => Duration::from_secs(5),
            _ => Duration::from_secs(1),
        });
        tracing::info!(
            worker = %owner,
            backend = store.backend(),
            queues = ?queues,
            kinds = ?handlers.keys().collect::<Vec<_>>(),
            "job worker starting"
        );

        let shared = Arc::new(Shared {
            store: store.clone(),
            handlers,
            config: config.clone(),
            lease: lease.clone(),
            in_flight: Arc::new(Mutex::new(HashMap::new())),
            tracker: TaskTracker::new(),
            jobs_token: CancellationToken::new(),
            service: service.clone(),
            paused: self.control.paused.subscribe(),
        });
        // Background duties stop only after the jobs are settled.
        let duties = CancellationToken::new();
        let (done_tx, done_rx) = mpsc::unbounded_channel::<Outcome>();

        let completer = tokio::spawn(record_outcomes(Arc::clone(&shared), done_rx));
        let mut background: Vec<JoinHandle<()>> = vec![
            tokio::spawn(heartbeat(Arc::clone(&shared), duties.clone())),
            tokio::spawn(rescuer(store.clone(), config.rescue_interval, duties.clone())),
        ];
        if let Some(retention) = config.retention {
            background.push(tokio::spawn(cleaner(store.clone(), retention, config.cleanup_interval, duties.clone())));
        }
        if !periodic.is_empty() {
            background.push(tokio::spawn(run_scheduler(
                store.clone(),
                periodic,
                owner.clone(),
                config.leader_ttl,
                config.max_catch_up,
                duties.clone(),
            )));
        }

        let mut fetchers = Vec::new();
        for (queue, concurrency) in queues {
            fetchers.push(tokio::spawn(fetch_loop(
                Arc::clone(&shared),
                queue,
                concurrency,
                poll,
                done_tx.clone(),
                stop.clone(),
            )));
        }
        drop(done_tx);

        for fetcher in fetchers {
            let _ = fetcher.await;
        }
        // Stop requested: no fetch is running any more. Running jobs get the budget.
        shared.tracker.close();
        let running = lock(&shared.in_flight).len();
        tracing::info!(worker = %owner, running, "job worker stopping");
        if tokio::time::timeout(config.shutdown_timeout, shared.tracker.wait()).await.is_err() {
            shared.jobs_token.cancel();
            for entry in lock(&shared.in_flight).values() {
                if let Some(abort) = &entry.abort {
                    abort.abort();
                }
            }
            shared.tracker.wait().await;
        }
        // Every handler has returned or been aborted: record the outcomes that were sent,
        // then give back the jobs that never got one.
        let _ = completer.await;
        let unfinished: Vec<JobId> =
            lock(&shared.in_flight).iter().filter(|(_, e)| !e.finished).map(|(id, _)| *id).collect();
        let mut result = Ok(());
        if !unfinished.is_empty() {
            match store.release(&unfinished, &owner).await {
                Ok(n) => tracing::info!(worker = %owner, released = n, "released unfinished jobs"),
                Err(error) => {
                    tracing::error!(worker = %owner, %error, "could not release unfinished jobs; they return when their lease expires");
                    result = Err(error);
                }
            }
        }
        duties.cancel();
        for task in background {
            let _ = task.await;
        }
        tracing::info!(worker = %owner, "job worker stopped");
        result
    }
}

struct Shared<S> {
    store: S,
    handlers: HashMap<String, ErasedHandler>,
    config: WorkerConfig,
    lease: Lease,
    in_flight: InFlightMap,
    tracker: TaskTracker,
    /// Parent of every job's token: cancelled when the shutdown budget runs out.
    jobs_token: CancellationToken,
    /// The host service the worker runs as (or a detached one): scopes and run status.
    service: ServiceContext,
    /// Operator pause of this worker's fetching.
    paused: watch::Receiver<bool>,
}

/// Longest wait for more free slots before a fetch while jobs are waiting.
const BACKLOG_GATHER: Duration = Duration::from_millis(2);

async fn fetch_loop<S: JobStore>(
    shared: Arc<Shared<S>>,
    queue: String,
    concurrency: usize,
    poll: Duration,
    done: mpsc::UnboundedSender<Outcome>,
    stop: CancellationToken,
) {
    let store = &shared.store;
    let prefetch = shared.config.prefetch;
    // Fetch permits: one per job held (running or prefetched).
    // Held to tokio's limit (about 2^61), past which the semaphore would panic.
    let semaphore = Arc::new(Semaphore::new(concurrency.saturating_add(prefetch).min(Semaphore::MAX_PERMITS)));
    let local = Arc::new(Notify::new());
    let queue_shared = QueueShared {
        name: Arc::from(queue.as_str()),
        done,
        local: Arc::clone(&local),
        run_gate: (prefetch > 0).then(|| Arc::new(Semaphore::new(concurrency.min(Semaphore::MAX_PERMITS)))),
        stop: stop.clone(),
        load: Arc::new(QueueLoad::default()),
    };
    let load = Arc::clone(&queue_shared.load);
    let mut wakeup = loop {
        match store.subscribe(&queue).await {
            Ok(w) => break w,
            Err(error) => {
                tracing::warn!(%queue, %error, "job worker: cannot subscribe to wake-ups; retrying");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    };
    let batch = shared.config.fetch_batch.max(1) as usize;
    // Under a backlog, fetch once at least this many slots are free (or BACKLOG_GATHER passed).
    let refill = batch.min(concurrency + prefetch).div_ceil(2);
    let mut backlog = false;
    let mut paused = shared.paused.clone();
    loop {
        if *paused.borrow_and_update() {
            shared.service.status().update_queue(|q| q.paused = true);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                changed = paused.changed() => if changed.is_err() { return },
            }
            shared.service.status().update_queue(|q| q.paused = *paused.borrow());
            continue;
        }
        let first = tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let allowed = allowed_prefetch(
            load.avg_run_us.load(AtomicOrdering::Relaxed),
            concurrency,
            prefetch,
            shared.config.prefetch_wait,
        );
        let held = load.held.load(AtomicOrdering::Acquire);
        let room = (concurrency + allowed).saturating_sub(held);
        if room == 0 {
            // Jobs got slower: hold no more than the new limit allows.
            drop(first);
            tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                _ = load.finished.notified() => {}
            }
            continue;
        }
        let batch = batch.min(room);
        let refill = refill.min(room);
        let mut permits = vec![first];
        while permits.len() < batch {
            match Arc::clone(&semaphore).try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        if backlog && permits.len() < refill {
            // Jobs are waiting: rather than one round trip per freed slot, let a few more
            // slots free up (bounded by a short wait) and fetch them together.
            let until = tokio::time::Instant::now() + BACKLOG_GATHER;
            while permits.len() < refill {
                tokio::select! {
                    biased;
                    permit = Arc::clone(&semaphore).acquire_owned() => match permit {
                        Ok(p) => permits.push(p),
                        Err(_) => return,
                    },
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
        }
        wakeup.mark_seen();
        let asked = permits.len();
        let jobs = match store.fetch(&queue, asked as u32, &shared.lease).await {
            Ok(jobs) => jobs,
            Err(error) => {
                tracing::warn!(%queue, %error, "job worker: fetch failed; retrying");
                drop(permits);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                continue;
            }
        };
        let got = jobs.len();
        backlog = got == asked;
        for (job, permit) in jobs.into_iter().zip(permits.drain(..)) {
            spawn_job(&shared, &queue_shared, job, permit);
        }
        drop(permits);
        if got == asked || wakeup.has_changed() {
            // A full batch: more may be due. Or jobs arrived during the fetch: take them now, so
            // an enqueue that just missed the fetch waits one round trip, not three.
            continue;
        }
        let until_due = store.time_until_due(&queue).await.ok().flatten();
        if wakeup.has_changed() {
            continue;
        }
        let wait = until_due.map_or(poll, |d| d.min(poll).saturating_add(Duration::from_millis(1)));
        tokio::select! {
            biased;
            _ = stop.cancelled() => return,
            _ = wakeup.changed() => {}
            _ = local.notified() => {}
            _ = paused.changed() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// What the jobs of one queue share.
struct QueueShared {
    name: Arc<str>,
    done: mpsc::UnboundedSender<Outcome>,
    /// Wakes the fetch loop when a retry it scheduled comes due.
    local: Arc<Notify>,
    /// Limits running handlers when jobs are prefetched beyond the concurrency.
    run_gate: Option<Arc<Semaphore>>,
    /// The worker's stop request: prefetched jobs not started by then are released.
    stop: CancellationToken,
    load: Arc<QueueLoad>,
}

/// What the fetch loop knows of its queue's jobs, to size prefetching.
#[derive(Default)]
struct QueueLoad {
    /// Jobs leased and not finished (running or prefetched).
    held: AtomicUsize,
    /// Moving average of handler run time in microseconds (0: none measured yet).
    avg_run_us: AtomicU64,
    /// Signalled when a job finishes.
    finished: Notify,
}

impl QueueLoad {
    fn record_run(&self, took: Duration) {
        let sample = u64::try_from(took.as_micros()).unwrap_or(u64::MAX).max(1);
        let _ = self.avg_run_us.fetch_update(AtomicOrdering::Relaxed, AtomicOrdering::Relaxed, |avg| {
            Some(if avg == 0 { sample } else { avg - avg / 8 + sample / 8 })
        });
    }
}

/// Jobs to fetch beyond `concurrency` so that a prefetched job waits about `wait` at most.
fn allowed_prefetch(avg_run_us: u64, concurrency: usize, max: usize, wait: Duration) -> usize {
    if avg_run_us == 0 || max == 0 {
        return 0;
    }
    let wait_us = u64::try_from(wait.as_micros()).unwrap_or(u64::MAX);
    let n = (concurrency as u64).saturating_mul(wait_us) / avg_run_us;
    usize::try_from(n).unwrap_or(usize::MAX).min(max)
}

fn spawn_job<S: JobStore>(
    shared: &Arc<Shared<S>>,
    queue: &QueueShared,
    job: ClaimedJob,
    permit: tokio::sync::OwnedSemaphorePermit,
) {
    let id = job.id;
    let ctx = JobContext {
        id,
        kind: Arc::from(job.kind.as_str()),
        queue: Arc::clone(&queue.name),
        attempt: job.attempt,
        max_attempts: job.max_attempts,
        token: shared.jobs_token.child_token(),
    };
    let done = queue.done.clone();
    let local = Arc::clone(&queue.local);
    let run_gate = queue.run_gate.clone();
    let stop = queue.stop.clone();
    let load = Arc::clone(&queue.load);
    load.held.fetch_add(1, AtomicOrdering::AcqRel);
    let service = shared.service.clone();
    let handler = shared.handlers.get(&job.kind).cloned();
    let timeout = job.timeout.unwrap_or(shared.config.default_timeout);
    let backoff = shared.config.backoff;
    let in_flight = Arc::clone(&shared.in_flight);
    // Hold the map while spawning so the task cannot finish before its entry exists.
    let mut map = lock(&shared.in_flight);
    map.insert(id, InFlight { token: ctx.token.clone(), abort: None, finished: false });
    let task = shared.tracker.spawn(async move {
        let _running = match run_gate {
            Some(gate) => tokio::select! {
                biased;
                permit = gate.acquire_owned() => permit.ok(),
                // Prefetched and never started: left unfinished, so it is released.
                _ = stop.cancelled() => {
                    load.held.fetch_sub(1, AtomicOrdering::AcqRel);
                    return;
                }
            },
            None => None,
        };
        let started = tokio::time::Instant::now();
        let ticket = service.status().run_started();
        let outcome = run_job(handler, &job, ctx, service.clone(), timeout, &backoff).await;
        load.record_run(started.elapsed());
        match &outcome {
            Outcome::Completed { .. } => service.status().run_finished(ticket, RunOutcome::Succeeded, None),
            Outcome::Retry { error, .. } | Outcome::Dead { error, .. } => {
                service.status().run_finished(ticket, RunOutcome::Failed, Some(error.clone()))
            }
        }
        let retry_in = match &outcome {
            Outcome::Retry { delay, .. } => Some(*delay),
            _ => None,
        };
        {
            // Marked and sent with no await in between: an abort cannot split them.
            let mut map = lock(&in_flight);
            if let Some(entry) = map.get_mut(&id) {
                entry.finished = true;
            }
            let _ = done.send(outcome);
        }
        drop(permit);
        load.held.fetch_sub(1, AtomicOrdering::AcqRel);
        load.finished.notify_one();
        if let Some(delay) = retry_in {
            tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                local.notify_one();
            });
        }
    });
    if let Some(entry) = map.get_mut(&id) {
        entry.abort = Some(task.abort_handle());
    }
}

/// Runs one attempt of a claimed job and says how it ended.
async fn run_job(
    handler: Option<ErasedHandler>,
    job: &ClaimedJob,
    ctx: JobContext,
    service: ServiceContext,
    timeout: Duration,
    backoff: &Backoff,
) -> Outcome {
    let id = job.id;
    let Some(handler) = handler else {
        return Outcome::Dead {
            id,
            error: format!("unknown job kind {:?}: no handler is registered for it on this worker", job.kind),
        };
    };
    let future = match handler(&job.payload, ctx, service, timeout) {
        Ok(future) => future,
        Err(error) => {
            return Outcome::Dead {
                id,
                error: format!("payload of job kind {:?} does not deserialize: {error}", job.kind),
            };
        }
    };
    let error = match future.await {
        Attempt::Succeeded => return Outcome::Completed { id },
        Attempt::Failed(error) => error,
        Attempt::TimedOut(after) => format!("timed out after {} ms", duration_ms(after)),
    };
    if job.attempt >= job.max_attempts {
        Outcome::Dead { id, error }
    } else {
        Outcome::Retry { id, delay: backoff.delay(job.attempt), error }
    }
}

/// Records outcomes in batches: whatever has arrived since the last write goes in the next.
async fn record_outcomes<S: JobStore>(shared: Arc<Shared<S>>, mut done: mpsc::UnboundedReceiver<Outcome>) {
    let max = shared.config.complete_batch.max(1);
    let mut batch = Vec::with_capacity(max);
    while done.recv_many(&mut batch, max).await > 0 {
        let mut delay = Duration::from_millis(50);
        // `None`: a lease too long for the clock to hold, so no giving up.
        let give_up = tokio::time::Instant::now().checked_add(shared.config.lease_ttl);
        loop {
            match shared.store.finish(&batch, &shared.lease.owner).await {
                Ok(applied) => {
                    if applied.len() < batch.len() {
                        let refused: Vec<JobId> =
                            batch.iter().map(Outcome::id).filter(|id| !applied.contains(id)).collect();
                        tracing::warn!(
                            ?refused,
                            "job outcomes refused: these jobs were no longer leased to this worker (rescued or cancelled)"
                        );
                    }
                    break;
                }
                Err(error) if give_up.is_none_or(|at| tokio::time::Instant::now() < at) => {
                    tracing::warn!(%error, "recording job outcomes failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
                Err(error) => {
                    tracing::error!(%error, jobs = batch.len(), "recording job outcomes failed; the jobs run again after rescue");
                    break;
                }
            }
        }
        let mut map = lock(&shared.in_flight);
        for outcome in &batch {
            map.remove(&outcome.id());
        }
        drop(map);
        batch.clear();
    }
}

async fn heartbeat<S: JobStore>(shared: Arc<Shared<S>>, stop: CancellationToken) {
    let every = shared.config.heartbeat_interval.unwrap_or(shared.config.lease_ttl / 3).max(Duration::from_millis(10));
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ticker.tick().await;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        // Progress for the host's health view: the worker is alive and ticking.
        shared.service.heartbeat();
        let ids: Vec<JobId> = lock(&shared.in_flight).keys().copied().collect();
        if ids.is_empty() {
            continue;
        }
        match shared.store.heartbeat(&ids, &shared.lease).await {
            Ok(held) => {
                if held.len() < ids.len() {
                    let held: std::collections::HashSet<JobId> = held.into_iter().collect();
                    let map = lock(&shared.in_flight);
                    for id in ids.iter().filter(|id| !held.contains(id)) {
                        if let Some(entry) = map.get(id)
                            && !entry.token.is_cancelled()
                        {
                            tracing::warn!(job = id, "job lease lost (cancelled or rescued); cancelling its run");
                            entry.token.cancel();
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "renewing job leases failed; retrying at the next heartbeat"),
        }
    }
}

async fn rescuer<S: JobStore>(store: S, every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store.rescue().await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(rescued = n, "returned jobs whose worker stopped renewing their lease"),
            Err(error) => tracing::warn!(%error, "rescuing expired jobs failed"),
        }
    }
}

async fn cleaner<S: JobStore>(store: S, retention: Retention, every: Duration, stop: CancellationToken) {
    let mut ticker = tokio::time::interval(every.max(Duration::from_millis(10)));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticker.tick() => {}
        }
        match store.cleanup(&retention).await {
            Ok(0) => {}
            Ok(n) => tracing::debug!(deleted = n, "deleted finished jobs past retention"),
            Err(error) => tracing::warn!(%error, "deleting finished jobs failed"),
        }
    }
}

/// The worker as a Stevedore background service: it runs until the host stops it, then stops
/// gracefully. Keep [`WorkerConfig::shutdown_timeout`] under the host's shutdown budget so
/// that jobs still running at its end can be released before the host gives up on the service
/// (if it does, they return through the rescuer after their lease TTL).
impl<S: JobStore> stevedore::BackgroundService for Worker<S> {
    async fn execute(&self, ctx: stevedore::ServiceContext) -> Result<(), BoxError> {
        self.run_in(ctx).await.map_err(BoxError::from)
    }
}

impl<S: JobStore> Worker<S> {
    /// Runs the worker in a new task until `stop` is cancelled (see [`run`](Self::run)).
    pub fn spawn(self, stop: CancellationToken) -> JoinHandle<Result<(), JobError>> {
        tokio::spawn(async move { self.run(stop).await })
    }

    /// Wraps the worker as a host service named `name` (kind `jobs`).
    ///
    /// ```no_run
    /// # use stevedore_jobs::{SqliteStore, Worker};
    /// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
    /// let store = SqliteStore::open("jobs.db").await?;
    /// let host = stevedore::Host::builder()
    ///     .add(Worker::new(store).queue("default", 8).into_service("jobs"))
    ///     .build()?;
    /// host.run().await.exit();
    /// # }
    /// ```
    pub fn into_service(self, name: impl Into<String>) -> stevedore::ServiceSpec {
        let needs = self.needs.clone();
        let control: Arc<dyn stevedore::ServiceControl> = self.control.clone();
        stevedore::ServiceSpec::background(name, self).kind("jobs").needs(needs).control(control)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefetch_follows_run_time() {
        let wait = Duration::from_millis(5);
        assert_eq!(allowed_prefetch(0, 16, 64, wait), 0, "nothing measured yet");
        assert_eq!(allowed_prefetch(50, 16, 64, wait), 64, "no-op jobs: the cap");
        assert_eq!(allowed_prefetch(2_000, 16, 64, wait), 40);
        assert_eq!(allowed_prefetch(10_000, 16, 64, wait), 8);
        assert_eq!(allowed_prefetch(100_000, 16, 64, wait), 0, "slow jobs are not held back");
        assert_eq!(allowed_prefetch(50, 16, 0, wait), 0, "turned off");
    }
}
