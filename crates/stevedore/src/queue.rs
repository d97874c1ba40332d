//! An in-memory background task queue: the article's "queued tasks that run sequentially", bounded,
//! with backpressure, contained failures, and a stop that never drops work silently.
//!
//! Tasks are typed payloads run by a [`PayloadHandler`] (payload first, then any extractors), or boxed
//! closures ([`BackgroundTask`], through [`TaskQueue::closures`]). Each task runs in its own scope and
//! is recorded as one run in the status view.
//!
//! ```no_run
//! use stevedore::queue::TaskQueue;
//! use stevedore::{BoxError, Host};
//!
//! struct Email { to: String }
//!
//! async fn send(email: Email) -> Result<(), BoxError> {
//!     println!("sending to {}", email.to);
//!     Ok(())
//! }
//!
//! #[tokio::main]
//! async fn main() {
//!     let (emails, service) = TaskQueue::builder("emails", send).capacity(1000).build();
//!     let host = Host::builder().add(service).build().expect("valid host");
//!     emails.enqueue(Email { to: "ada@example.com".into() }).await.expect("queue open");
//!     host.run().await.exit();
//!     let left = emails.take_unprocessed(); // whatever the stop handed back
//!     println!("{} emails not sent", left.len());
//! }
//! ```
//!
//! # Policies
//!
//! - **Bounded, with backpressure.** At most [`capacity`](QueueBuilder::capacity) tasks wait (default
//!   1024). [`TaskQueue::enqueue`] waits for room; [`TaskQueue::try_enqueue`] returns
//!   [`EnqueueError::Full`] with the payload at once. Once the queue has stopped both return
//!   [`EnqueueError::Closed`] with the payload.
//! - **Concurrency.** One task at a time by default, in enqueue order. With
//!   [`concurrency(n)`](QueueBuilder::concurrency), up to `n` run at once as futures of the queue's
//!   own task (as apalis does), so a handler that does CPU-heavy work should hand it to
//!   `tokio::task::spawn_blocking`.
//! - **Failures.** A task's error, timeout or panic is contained: logged, counted (`queue.failed`,
//!   `runs.failed`) and recorded as the last run error; the queue goes on.
//! - **Status.** Each task is one run in the status view. A sequential queue busy with quick tasks
//!   publishes its runs and [counts](TaskQueue::counts) in bulk: every 1,024 tasks or 5 ms, and
//!   whenever it waits for work. So both lag a busy queue by at most that, and are exact once it is
//!   idle; a task that has to wait (for I/O, say) shows in flight at once. Tasks that end without
//!   waiting are timed on the CPU's time-stamp counter (through `quanta`), a third of the cost of a
//!   monotonic clock reading; under tokio's paused clock they show their real, tiny, duration.
//!   This is what lets a sequential queue keep up with a bare channel loop (`BENCHMARKS.md`).
//! - **Running dry.** A busy queue that runs out of tasks yields to the scheduler a few times before
//!   it waits, so that a producer on another worker can refill it without a wake-up between
//!   threads. A sequential queue does so only while that measures faster than waiting at once: it
//!   times both ways now and then (every half million tasks or so, and again whenever its choice
//!   gets slower), since which one wins depends on the machine and can change while it runs. An
//!   idle queue waits without polling and costs no CPU.
//! - **Pause.** [`TaskQueue::pause`] (also the dashboard's) stops taking tasks; the ones running
//!   finish. [`TaskQueue::resume`] goes on.
//! - **Stop.** When the host stops, the queue closes to new tasks at once. The tasks running finish
//!   (within the host's shutdown budget). The tasks still waiting are, by [`OnStop`]:
//!   - [`OnStop::Drain`] (the default): run, as long as each one can still end in time. A task starts
//!     only while the host's deadline minus a [`drain_reserve`](QueueBuilder::drain_reserve) (default
//!     250 ms) is ahead, and, when the queue has a per-task [`timeout`](QueueBuilder::timeout), only
//!     when that timeout would end before it. Past that, the rest is handed back.
//!   - [`OnStop::HandBack`]: handed back at once, none run.
//!
//!   A paused queue hands its rest back whatever the policy. Handed back means: given to the
//!   [`on_unprocessed`](QueueBuilder::on_unprocessed) callback if there is one, otherwise kept for
//!   [`TaskQueue::take_unprocessed`]; either way the count is logged and reported by
//!   [`TaskQueue::counts`]. Even if the host abandons the queue past its budget, the waiting tasks stay
//!   in the queue for `take_unprocessed`: nothing is dropped silently.

use std::collections::VecDeque;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::task::AtomicWaker;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::error::BoxError;
use crate::handler::{PayloadHandler, run_payload_handler, run_payload_handler_reusing};
use crate::runs::{SequentialRuns, recorded};
use crate::scope::Scope;
use crate::service::{BackgroundService, ServiceContext, ServiceSpec};
use crate::status::{QueueStats, RunOutcome, ServiceControl};

/// How many tasks are taken from the channel at once when the queue has to wait for them.
const BATCH: usize = 64;
/// How often a busy queue refreshes its figures in the status view, in tasks.
const PUBLISH_EVERY: u32 = 256;

/// How many times a queue that ran dry yields to the scheduler before it waits. One was enough on
/// an Intel guest; on an AMD guest, where a parked worker's wake-up costs more, eight took a
/// quick producer's sequential queue from 0.72-1.53x a bare channel loop to 1.00-1.37x, with a
/// quarter of the thread switches (`BENCHMARKS.md`, sixth session); a sequential queue yields only
/// while [`DrySpin`] measures it faster than waiting. The yields follow a wake-up
/// or a run of work; an idle queue waits without polling.
const DRY_YIELDS: u32 = 8;

/// Whether a sequential queue that ran dry spins (yields [`DRY_YIELDS`] times) or waits at once,
/// chosen by measuring both.
///
/// Spinning keeps the queue's loop on its own worker, apart from the producer; waiting lets the
/// wake-up bring it onto the producer's worker. Which is faster depends on the machine, and one
/// guest changed its mind from minute to minute: spinning read 1.04x a bare channel loop against
/// 0.76x for waiting, then 0.33x against 0.90x (`BENCHMARKS.md`, tenth session). So the loop
/// tries each for two epochs, times the second (the first lets the loop settle where that way puts
/// it), and keeps the faster, preferring to wait (it leaves a core free) unless spinning is clearly
/// ahead. A queue whose producer is the slower side measures the same either way, and so waits.
///
/// One trial can still mislead (a stretch in which the whole machine is slow, or in which waiting
/// happens to run as fast as spinning), and a choice held for a whole cycle at two-thirds of the
/// speed is dear (`BENCHMARKS.md`, eleventh session). So the choice is tried again early when it
/// gets slower than its own best by a quarter for two epochs in a row; an early trial that
/// confirms the choice doubles the wait before the next one, so a noisy machine does not trial for
/// ever.
#[derive(Debug)]
struct DrySpin {
    /// Whether this epoch spins: the choice, or the trial under way.
    spin: bool,
    /// False for a queue with tasks at once: it always spins (that measured faster in both of the
    /// guest's states).
    measured: bool,
    /// Tasks run in this epoch, and when it began (the first epoch only starts the clock).
    tasks: u32,
    began: Option<quanta::Instant>,
    /// Epochs since the last trial began: the first four are the trials, two spinning then two
    /// waiting, the second of each timed.
    epoch: u32,
    /// How long the spinning trial took.
    spin_took: Option<Duration>,
    /// The quickest epoch of the choice since its trial: what it does at its best.
    best: Duration,
    /// Epochs in a row slower than `best` by a quarter.
    slow_epochs: u32,
    /// Epochs after a trial before slow epochs may call the next one early.
    patience: u32,
    /// Whether the trial under way was called early, by slow epochs.
    early: bool,
    /// The choice before the trial under way.
    chosen: bool,
}

/// Tasks in an epoch: long enough to outlast a migration between workers, short enough that a
/// cycle's trials are a small share of a busy queue's time.
const SPIN_EPOCH_TASKS: u32 = 4096;
/// Epochs in a cycle: the trials, then the winner for the rest.
const SPIN_CYCLE: u32 = 128;
/// The least patience: epochs after a trial before slow epochs may call another.
const SPIN_PATIENCE: u32 = 8;
/// Slow epochs in a row that call a trial early.
const SLOW_EPOCHS: u32 = 2;

impl DrySpin {
    /// Measured for a sequential queue (`concurrency` 1), always spinning otherwise.
    fn new(concurrency: usize) -> Self {
        DrySpin {
            spin: true,
            measured: concurrency == 1,
            tasks: 0,
            began: None,
            epoch: 0,
            spin_took: None,
            best: Duration::MAX,
            slow_epochs: 0,
            patience: SPIN_PATIENCE,
            early: false,
            chosen: true,
        }
    }

    /// A task ended: counts it, and ends the epoch at its last task.
    fn task_ended(&mut self) {
        if !self.measured {
            return;
        }
        self.tasks += 1;
        if self.tasks >= SPIN_EPOCH_TASKS {
            self.tasks = 0;
            let now = quanta::Instant::now();
            if let Some(began) = self.began.replace(now) {
                self.epoch_ended(now.duration_since(began));
            }
        }
    }

    /// How many times to yield before waiting, in this epoch.
    fn yields(&self) -> u32 {
        if self.spin { DRY_YIELDS } else { 0 }
    }

    /// An epoch of [`SPIN_EPOCH_TASKS`] tasks ended, taking `took`.
    fn epoch_ended(&mut self, took: Duration) {
        // Each trial's first epoch lets the loop settle where the way under trial puts it; the
        // second is timed.
        match self.epoch {
            0 | 2 => {}
            1 => {
                self.spin_took = Some(took);
                self.spin = false;
            }
            3 => {
                // Spinning keeps both cores busy: it has to win by a clear margin.
                let spin = self.spin_took.is_some_and(|spun| spun.mul_f64(1.1) < took);
                self.patience = match (self.early, spin == self.chosen) {
                    (true, true) => (self.patience * 2).min(SPIN_CYCLE),
                    (_, false) => SPIN_PATIENCE,
                    (false, true) => self.patience,
                };
                self.spin = spin;
                self.best = if spin { self.spin_took.unwrap_or(took) } else { took };
                self.slow_epochs = 0;
            }
            _ => {
                self.best = self.best.min(took);
                let slow = took > self.best.saturating_add(self.best / 4);
                self.slow_epochs = if slow { self.slow_epochs + 1 } else { 0 };
            }
        }
        self.epoch += 1;
        let early = self.epoch >= self.patience && self.slow_epochs >= SLOW_EPOCHS;
        if self.epoch >= SPIN_CYCLE || early {
            self.early = early;
            self.epoch = 0;
            self.chosen = self.spin;
            self.spin = true;
        }
    }
}

/// What happens to the tasks still waiting when the queue stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum OnStop {
    /// Run them while each can still end within the shutdown budget; hand back the rest. The default.
    #[default]
    Drain,
    /// Hand them all back at once.
    HandBack,
}

/// A task could not be enqueued; the payload is handed back.
pub enum EnqueueError<T> {
    /// The queue is at capacity (only from [`TaskQueue::try_enqueue`]).
    Full {
        /// The queue's name.
        queue: String,
        /// Its capacity.
        capacity: usize,
        /// The payload, handed back.
        task: T,
    },
    /// The queue has stopped taking tasks.
    Closed {
        /// The queue's name.
        queue: String,
        /// The payload, handed back.
        task: T,
    },
}

impl<T> EnqueueError<T> {
    /// The payload that was not enqueued.
    pub fn into_task(self) -> T {
        match self {
            EnqueueError::Full { task, .. } | EnqueueError::Closed { task, .. } => task,
        }
    }
}

impl<T> std::fmt::Display for EnqueueError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            EnqueueError::Full { queue, capacity, .. } => {
                write!(f, "queue `{queue}` is full ({capacity} tasks waiting)")
            }
            EnqueueError::Closed { queue, .. } => write!(f, "queue `{queue}` is closed: its service has stopped"),
        }
    }
}

impl<T> std::fmt::Debug for EnqueueError<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EnqueueError({self})")
    }
}

impl<T> std::error::Error for EnqueueError<T> {}

/// Counters of a queue since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    /// Tasks accepted.
    pub enqueued: u64,
    /// Tasks that succeeded.
    pub succeeded: u64,
    /// Tasks that failed, timed out or panicked.
    pub failed: u64,
    /// Tasks handed back at stop.
    pub handed_back: u64,
    /// Tasks waiting now.
    pub depth: u64,
    /// Tasks running now.
    pub in_flight: u64,
}

type Unprocessed<T> = Box<dyn FnOnce(Vec<T>) + Send>;

struct Shared<T> {
    name: String,
    tx: mpsc::Sender<T>,
    rx: tokio::sync::Mutex<mpsc::Receiver<T>>,
    paused: AtomicBool,
    /// Set once the service's token is cancelled: a plain load, where the token's check takes a lock.
    stopping: AtomicBool,
    /// The queue's task while it waits for work: woken by a pause, a resume and the stop. Lock-free,
    /// where a `Notify` waiter made and dropped at every wait took two locks, which a quick queue
    /// that keeps running dry pays often.
    wake: AtomicWaker,
    enqueued: AtomicU64,
    done: DoneCounts,
    handed_back: AtomicU64,
    unprocessed: Mutex<Vec<T>>,
    on_unprocessed: Mutex<Option<Unprocessed<T>>>,
}

/// What the queue's own task counts as tasks run, on a cache line of its own: producers write
/// `enqueued` beside the channel at every enqueue, and sharing a line with them costs both sides.
#[derive(Default)]
#[repr(align(128))]
struct DoneCounts {
    succeeded: AtomicU64,
    failed: AtomicU64,
    in_flight: AtomicU64,
}

impl DoneCounts {
    fn add(&self, outcome: RunOutcome) {
        let counter = if outcome == RunOutcome::Succeeded { &self.succeeded } else { &self.failed };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a task in flight until the guard is dropped.
    fn in_flight(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(&self.in_flight)
    }
}

struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Outcomes a sequential queue has counted and not yet added to [`DoneCounts`]: it adds them when
/// it publishes its runs, not at every task.
#[derive(Default)]
struct Unpublished {
    succeeded: u64,
    failed: u64,
}

impl Unpublished {
    fn add(&mut self, outcome: RunOutcome) {
        if outcome == RunOutcome::Succeeded {
            self.succeeded += 1;
        } else {
            self.failed += 1;
        }
    }

    fn publish(&mut self, done: &DoneCounts) {
        if self.succeeded > 0 {
            done.succeeded.fetch_add(std::mem::take(&mut self.succeeded), Ordering::Relaxed);
        }
        if self.failed > 0 {
            done.failed.fetch_add(std::mem::take(&mut self.failed), Ordering::Relaxed);
        }
    }
}

impl<T> Shared<T> {
    fn depth(&self) -> u64 {
        (self.tx.max_capacity() - self.tx.capacity()) as u64
    }

    fn stats(&self) -> QueueStats {
        QueueStats {
            depth: self.depth(),
            in_flight: self.done.in_flight.load(Ordering::Relaxed),
            failed: self.done.failed.load(Ordering::Relaxed),
            paused: self.paused.load(Ordering::Relaxed),
        }
    }
}

/// The producer's handle on a queue: enqueue, pause, resume, counts. Cheap to clone.
pub struct TaskQueue<T> {
    shared: Arc<Shared<T>>,
}

impl<T> Clone for TaskQueue<T> {
    fn clone(&self) -> Self {
        TaskQueue { shared: self.shared.clone() }
    }
}

impl<T> std::fmt::Debug for TaskQueue<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TaskQueue").field("name", &self.shared.name).field("counts", &self.counts()).finish()
    }
}

impl<T: Send + 'static> TaskQueue<T> {
    /// Starts a queue of payloads of type `T` run by `handler`; finish with [`QueueBuilder::build`].
    pub fn builder<H, Args>(name: impl Into<String>, handler: H) -> QueueBuilder<T, H, Args>
    where
        H: PayloadHandler<T, Args>,
    {
        QueueBuilder {
            name: name.into(),
            capacity: 1024,
            concurrency: 1,
            timeout: None,
            on_stop: OnStop::default(),
            drain_reserve: Duration::from_millis(250),
            on_unprocessed: None,
            handler,
            _t: PhantomData,
        }
    }

    /// Enqueues a task, waiting for room when the queue is full (backpressure).
    pub async fn enqueue(&self, task: T) -> Result<(), EnqueueError<T>> {
        match self.shared.tx.send(task).await {
            Ok(()) => {
                self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::SendError(task)) => Err(EnqueueError::Closed { queue: self.shared.name.clone(), task }),
        }
    }

    /// Enqueues a task if there is room now; otherwise hands it back with [`EnqueueError::Full`].
    pub fn try_enqueue(&self, task: T) -> Result<(), EnqueueError<T>> {
        match self.shared.tx.try_send(task) {
            Ok(()) => {
                self.shared.enqueued.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(mpsc::error::TrySendError::Full(task)) => Err(EnqueueError::Full {
                queue: self.shared.name.clone(),
                capacity: self.shared.tx.max_capacity(),
                task,
            }),
            Err(mpsc::error::TrySendError::Closed(task)) => {
                Err(EnqueueError::Closed { queue: self.shared.name.clone(), task })
            }
        }
    }

    /// Takes the tasks the stop handed back (when no callback took them), and any still waiting in a
    /// queue whose service is not running (abandoned past the budget, or never started).
    pub fn take_unprocessed(&self) -> Vec<T> {
        let mut out = std::mem::take(&mut *self.shared.unprocessed.lock().unwrap_or_else(|p| p.into_inner()));
        if let Ok(mut rx) = self.shared.rx.try_lock() {
            rx.close();
            let mut extra = 0;
            while let Ok(task) = rx.try_recv() {
                out.push(task);
                extra += 1;
            }
            self.shared.handed_back.fetch_add(extra, Ordering::Relaxed);
        }
        out
    }
}

impl<T> TaskQueue<T> {
    /// The queue's name (its service's name).
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Stops taking tasks; the running ones finish.
    pub fn pause(&self) {
        self.shared.paused.store(true, Ordering::Release);
        self.shared.wake.wake();
    }

    /// Takes tasks again after [`pause`](Self::pause).
    pub fn resume(&self) {
        self.shared.paused.store(false, Ordering::Release);
        self.shared.wake.wake();
    }

    /// Depth, in flight, failed and paused, as the status view shows them.
    pub fn stats(&self) -> QueueStats {
        self.shared.stats()
    }

    /// Counters since the queue was built.
    pub fn counts(&self) -> QueueCounts {
        let s = &self.shared;
        QueueCounts {
            enqueued: s.enqueued.load(Ordering::Relaxed),
            succeeded: s.done.succeeded.load(Ordering::Relaxed),
            failed: s.done.failed.load(Ordering::Relaxed),
            handed_back: s.handed_back.load(Ordering::Relaxed),
            depth: s.depth(),
            in_flight: s.done.in_flight.load(Ordering::Relaxed),
        }
    }
}

/// A boxed closure for a queue of closures (the article's `Func<CancellationToken, ValueTask>`): it is
/// handed the queue's cancellation token, cancelled when the host stops.
pub struct BackgroundTask(Box<dyn FnOnce(CancellationToken) -> TaskFuture + Send>);

type TaskFuture = Pin<Box<dyn Future<Output = Result<(), BoxError>> + Send>>;

impl BackgroundTask {
    /// Boxes `f`.
    pub fn new<F, Fut, E>(f: F) -> Self
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        BackgroundTask(Box::new(move |token| {
            let fut = f(token);
            Box::pin(async move { fut.await.map_err(Into::into) })
        }))
    }
}

impl std::fmt::Debug for BackgroundTask {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BackgroundTask")
    }
}

async fn run_closure(task: BackgroundTask, token: CancellationToken) -> Result<(), BoxError> {
    (task.0)(token).await
}

impl TaskQueue<BackgroundTask> {
    /// Starts a queue of boxed closures.
    ///
    /// ```
    /// # async fn demo() {
    /// use stevedore::queue::TaskQueue;
    /// let (queue, service) = TaskQueue::closures("background").capacity(100).build();
    /// queue
    ///     .enqueue_fn(|stop| async move {
    ///         let _ = stop; // cancelled when the host stops
    ///         Ok::<_, stevedore::BoxError>(())
    ///     })
    ///     .await
    ///     .expect("queue open");
    /// # let _ = service;
    /// # }
    /// ```
    pub fn closures(
        name: impl Into<String>,
    ) -> QueueBuilder<BackgroundTask, impl PayloadHandler<BackgroundTask, (CancellationToken,)>, (CancellationToken,)>
    {
        TaskQueue::builder(name, run_closure)
    }

    /// Enqueues a closure, waiting for room.
    pub async fn enqueue_fn<F, Fut, E>(&self, f: F) -> Result<(), EnqueueError<BackgroundTask>>
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.enqueue(BackgroundTask::new(f)).await
    }

    /// Enqueues a closure if there is room now.
    pub fn try_enqueue_fn<F, Fut, E>(&self, f: F) -> Result<(), EnqueueError<BackgroundTask>>
    where
        F: FnOnce(CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<BoxError>,
    {
        self.try_enqueue(BackgroundTask::new(f))
    }
}

/// Settings of a queue; [`build`](Self::build) makes the producer handle and the service.
pub struct QueueBuilder<T, H, Args> {
    name: String,
    capacity: usize,
    concurrency: usize,
    timeout: Option<Duration>,
    on_stop: OnStop,
    drain_reserve: Duration,
    on_unprocessed: Option<Unprocessed<T>>,
    handler: H,
    _t: PhantomData<fn(Args)>,
}

impl<T, H, Args> std::fmt::Debug for QueueBuilder<T, H, Args> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueBuilder")
            .field("name", &self.name)
            .field("capacity", &self.capacity)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("on_stop", &self.on_stop)
            .finish_non_exhaustive()
    }
}

impl<T, H, Args> QueueBuilder<T, H, Args>
where
    T: Send + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    /// How many tasks may wait (default 1024); must be at least 1 (and is held to tokio's
    /// channel limit, about 2^61).
    pub fn capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity;
        self
    }

    /// How many tasks run at once (default 1: one after another); must be at least 1.
    pub fn concurrency(mut self, n: usize) -> Self {
        self.concurrency = n;
        self
    }

    /// Bounds each task; one past it is cancelled and counted as failed.
    pub fn timeout(mut self, limit: Duration) -> Self {
        self.timeout = Some(limit);
        self
    }

    /// What happens to the waiting tasks at stop (default [`OnStop::Drain`]).
    pub fn on_stop(mut self, policy: OnStop) -> Self {
        self.on_stop = policy;
        self
    }

    /// How long before the host's shutdown deadline a draining queue stops starting tasks (default
    /// 250 ms), leaving time for the running ones to end.
    pub fn drain_reserve(mut self, reserve: Duration) -> Self {
        self.drain_reserve = reserve;
        self
    }

    /// Receives the tasks handed back at stop (to persist them, say), instead of keeping them for
    /// [`TaskQueue::take_unprocessed`]. Called once, from the queue's stop.
    pub fn on_unprocessed(mut self, f: impl FnOnce(Vec<T>) + Send + 'static) -> Self {
        self.on_unprocessed = Some(Box::new(f));
        self
    }

    /// The producer handle and the service to register with the host. A capacity or concurrency of
    /// zero makes the host's build fail, naming the service.
    pub fn build(self) -> (TaskQueue<T>, ServiceSpec) {
        let mut problem = None;
        if self.capacity == 0 {
            problem = Some("queue capacity of zero: give at least 1".to_string());
        }
        if self.concurrency == 0 {
            problem = Some("queue concurrency of zero: give at least 1".to_string());
        }
        if self.concurrency == 1 {
            // A sequential queue times its quick runs on the CPU's counter, whose first reading
            // calibrates it (about half a millisecond): here, at build, not in the first task.
            let _ = quanta::Instant::now();
        }
        // Past tokio's semaphore limit (about 2^61 on 64-bit) the channel would panic; no queue
        // holds that many tasks anyway.
        let (tx, rx) = mpsc::channel(self.capacity.clamp(1, tokio::sync::Semaphore::MAX_PERMITS));
        let shared = Arc::new(Shared {
            name: self.name.clone(),
            tx,
            rx: tokio::sync::Mutex::new(rx),
            paused: AtomicBool::new(false),
            stopping: AtomicBool::new(false),
            wake: AtomicWaker::new(),
            enqueued: AtomicU64::new(0),
            done: DoneCounts::default(),
            handed_back: AtomicU64::new(0),
            unprocessed: Mutex::new(Vec::new()),
            on_unprocessed: Mutex::new(self.on_unprocessed),
        });
        let queue = TaskQueue { shared: shared.clone() };
        let runner = Runner {
            shared,
            handler: self.handler,
            concurrency: self.concurrency.max(1),
            timeout: self.timeout,
            on_stop: self.on_stop,
            drain_reserve: self.drain_reserve,
            _args: PhantomData,
        };
        let mut spec = ServiceSpec::background(self.name, runner)
            .kind("queue")
            .control(Arc::new(QueueControl(queue.clone())))
            .needs(H::dependencies());
        if let Some(reason) = problem {
            spec = spec.invalid(reason);
        }
        (queue, spec)
    }
}

struct QueueControl<T>(TaskQueue<T>);

impl<T: Send + 'static> ServiceControl for QueueControl<T> {
    fn pause(&self) -> bool {
        self.0.pause();
        true
    }
    fn resume(&self) -> bool {
        self.0.resume();
        true
    }
    fn can_pause(&self) -> bool {
        true
    }
}

struct Runner<T, H, Args> {
    shared: Arc<Shared<T>>,
    handler: H,
    concurrency: usize,
    timeout: Option<Duration>,
    on_stop: OnStop,
    drain_reserve: Duration,
    _args: PhantomData<fn(Args)>,
}

impl<T, H, Args> Runner<T, H, Args>
where
    T: Send + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    /// Runs one task among others at once (or during the stop's drain).
    async fn process(&self, ctx: &ServiceContext, task: T) {
        let done = &self.shared.done;
        let in_flight = done.in_flight();
        let outcome =
            recorded(ctx, "task", || run_payload_handler(ctx, &self.handler, task, self.timeout, |_| {})).await;
        drop(in_flight);
        done.add(outcome);
    }

    /// Runs one task of a sequential queue, its run and outcome tallied for publishing later. A
    /// task that has to wait publishes the tally first, and counts as in flight until it ends.
    async fn process_in_turn(
        &self,
        ctx: &ServiceContext,
        runs: &mut SequentialRuns<'_>,
        unpublished: &mut Unpublished,
        spare_scope: &mut Option<Scope>,
        task: T,
    ) {
        let done = &self.shared.done;
        let work = || run_payload_handler_reusing(ctx, spare_scope, &self.handler, task, self.timeout);
        let outcome = runs
            .run("task", work, || {
                unpublished.publish(done);
                done.in_flight()
            })
            .await;
        unpublished.add(outcome);
    }

    /// When a draining queue may no longer start a task.
    fn drain_until(&self, ctx: &ServiceContext) -> Option<Instant> {
        let deadline = ctx.lifetime().stop_deadline()?;
        let stop_taking = deadline.checked_sub(self.drain_reserve).unwrap_or(deadline);
        Some(match self.timeout {
            Some(limit) => stop_taking.checked_sub(limit).unwrap_or(stop_taking.min(Instant::now())),
            None => stop_taking,
        })
    }

    fn hand_back(&self, ctx: &ServiceContext, rest: Vec<T>) {
        let s = &self.shared;
        let n = rest.len();
        if n == 0 {
            return;
        }
        s.handed_back.fetch_add(n as u64, Ordering::Relaxed);
        let callback = s.on_unprocessed.lock().unwrap_or_else(|p| p.into_inner()).take();
        match callback {
            Some(f) => {
                tracing::warn!(queue = ctx.name(), handed_back = n, "queue stopped: {n} waiting tasks handed back");
                f(rest);
            }
            None => {
                tracing::warn!(
                    queue = ctx.name(),
                    handed_back = n,
                    "queue stopped: {n} waiting tasks kept for TaskQueue::take_unprocessed"
                );
                s.unprocessed.lock().unwrap_or_else(|p| p.into_inner()).extend(rest);
            }
        }
    }
}

impl<T, H, Args> BackgroundService for Runner<T, H, Args>
where
    T: Send + 'static,
    H: PayloadHandler<T, Args>,
    Args: 'static,
{
    async fn execute(&self, ctx: ServiceContext) -> Result<(), BoxError> {
        let s = &self.shared;
        let mut rx = s.rx.lock().await;
        let limit = self.concurrency;
        let watcher = {
            let (shared, ctx) = (self.shared.clone(), ctx.clone());
            shared.stopping.store(false, Ordering::Release);
            tokio::spawn(async move {
                ctx.cancelled().await;
                shared.stopping.store(true, Ordering::Release);
                shared.wake.wake();
            })
        };
        let _watcher = AbortOnDrop(watcher);
        let mut running = FuturesUnordered::new();
        // Taken from the channel in a batch, not started yet; they go first, and back at the stop.
        let mut pending: VecDeque<T> = VecDeque::new();
        let mut batch = Vec::with_capacity(BATCH);
        // Whether to spin when dry: measured for a sequential queue, always for the others.
        let mut dry_spin = DrySpin::new(limit);
        // A sequential queue's runs and outcomes, published in bulk (see `SequentialRuns`).
        let mut runs = SequentialRuns::new(&ctx);
        let mut unpublished = Unpublished::default();
        // A task's scope that nothing was made in or attached to serves the next task.
        let mut spare_scope: Option<Scope> = None;
        let mut published = s.stats();
        ctx.status().set_queue(published.clone());
        // Taking and running tasks until the stop. While work is at hand the loop runs without
        // awaiting anything but the tasks (flags are plain loads); it registers for wake-ups only
        // when it has to wait, so a busy queue pays no waiter bookkeeping per task. It takes tasks
        // from the channel in batches: the channel then frees their room with one lock, not one per
        // task, which is most of what a producer and a quick consumer contend for.
        'taking: loop {
            let mut since_publish = 0u32;
            let mut yields = 0u32;
            loop {
                if s.stopping.load(Ordering::Acquire) {
                    break 'taking;
                }
                while !running.is_empty() {
                    match running.next().now_or_never() {
                        Some(Some(())) => {}
                        _ => break,
                    }
                }
                if s.paused.load(Ordering::Acquire) || running.len() >= limit {
                    break;
                }
                let task = match pending.pop_front() {
                    Some(task) => task,
                    None => match rx.recv_many(&mut batch, BATCH).now_or_never() {
                        Some(n) if n > 0 => {
                            pending.extend(batch.drain(..));
                            yields = 0;
                            continue;
                        }
                        // Run dry: yield a few times before publishing and waiting, so that a
                        // producer ready on this or the other worker can refill the channel
                        // meanwhile; a worker that parks costs a thread switch and a wake-up.
                        _ if yields < dry_spin.yields() => {
                            yields += 1;
                            tokio::task::yield_now().await;
                            continue;
                        }
                        _ => break,
                    },
                };
                if limit == 1 {
                    self.process_in_turn(&ctx, &mut runs, &mut unpublished, &mut spare_scope, task).await;
                    dry_spin.task_ended();
                    if runs.publish_due() {
                        runs.publish();
                        unpublished.publish(&s.done);
                        published = publish_queue(&ctx, s, published);
                    }
                } else {
                    running.push(self.process(&ctx, task));
                    since_publish += 1;
                    if since_publish >= PUBLISH_EVERY {
                        since_publish = 0;
                        published = publish_queue(&ctx, s, published);
                    }
                }
            }
            runs.idle();
            unpublished.publish(&s.done);
            published = publish_queue(&ctx, s, published);
            // Waiting: for the stop, a pause or resume, a running task, or the channel. The stop
            // reaches this wait through `stopping` and the waker (set by the watcher task), so the
            // wait polls no cancellation future, which takes a lock.
            let paused = s.paused.load(Ordering::Acquire);
            let can_take = !paused && running.len() < limit;
            let woken = std::future::poll_fn(|cx| {
                s.wake.register(cx.waker());
                if s.stopping.load(Ordering::Acquire) {
                    return Poll::Ready(Woken::Stop);
                }
                if s.paused.load(Ordering::Acquire) != paused {
                    return Poll::Ready(Woken::Changed);
                }
                if !running.is_empty() && running.poll_next_unpin(cx).is_ready() {
                    return Poll::Ready(Woken::Changed);
                }
                if can_take && let Poll::Ready(n) = rx.poll_recv_many(cx, &mut batch, BATCH) {
                    return Poll::Ready(Woken::Took(n));
                }
                Poll::Pending
            })
            .await;
            match woken {
                Woken::Stop | Woken::Took(0) => break, // stopping, or closed and empty
                Woken::Changed => {}
                Woken::Took(_) => pending.extend(batch.drain(..)),
            }
        }
        // The stop: no new tasks; drain by policy while there is time; hand back the rest.
        runs.idle();
        unpublished.publish(&s.done);
        rx.close();
        let mut rest = Vec::new();
        let mut rx_pending = pending;
        if self.on_stop == OnStop::Drain && !s.paused.load(Ordering::Acquire) {
            let until = self.drain_until(&ctx);
            let past = || until.is_some_and(|u| Instant::now() >= u);
            while !past() {
                tokio::select! {
                    biased;
                    Some(()) = running.next(), if !running.is_empty() => {}
                    task = next_task(&mut rx_pending, &mut rx), if running.len() < limit => match task {
                        Some(task) if past() => { rest.push(task); break; }
                        Some(task) if limit == 1 => self.process(&ctx, task).await,
                        Some(task) => running.push(self.process(&ctx, task)),
                        None => break,
                    },
                    _ = sleep_until_or_never(until) => break,
                }
            }
        }
        rest.extend(rx_pending.drain(..));
        while let Ok(task) = rx.try_recv() {
            rest.push(task);
        }
        self.hand_back(&ctx, rest);
        ctx.status().set_queue(s.stats());
        while running.next().await.is_some() {}
        ctx.status().set_queue(s.stats());
        Ok(())
    }
}

/// What ended a queue's wait for work.
enum Woken {
    Stop,
    /// A pause or resume, or a running task ended: look again.
    Changed,
    /// Tasks taken from the channel (0: closed and empty).
    Took(usize),
}

/// Puts the queue's figures in the status view if they changed since `last` (a lock spared each
/// time a quick queue runs dry); returns them.
fn publish_queue<T>(ctx: &ServiceContext, s: &Shared<T>, last: QueueStats) -> QueueStats {
    let now = s.stats();
    if now != last {
        ctx.status().set_queue(now.clone());
    }
    now
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The next task: one already taken from the channel, else the channel's next.
async fn next_task<T>(pending: &mut VecDeque<T>, rx: &mut mpsc::Receiver<T>) -> Option<T> {
    match pending.pop_front() {
        Some(task) => Some(task),
        None => rx.recv().await,
    }
}

async fn sleep_until_or_never(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Runs a whole cycle with the given trial times; returns the yields asked for at each epoch.
    fn cycle(spin: &mut DrySpin, spin_took: Duration, wait_took: Duration) -> Vec<u32> {
        let mut yields = Vec::new();
        for epoch in 0..SPIN_CYCLE {
            yields.push(spin.yields());
            let took = match epoch {
                1 => spin_took,
                3 => wait_took,
                _ => MS,
            };
            spin.epoch_ended(took);
        }
        yields
    }

    /// Feeds epochs taking the given milliseconds; returns the yields asked for at each.
    fn feed(spin: &mut DrySpin, millis: &[u32]) -> Vec<u32> {
        millis
            .iter()
            .map(|&ms| {
                let yields = spin.yields();
                spin.epoch_ended(ms * MS);
                yields
            })
            .collect()
    }

    const S: u32 = DRY_YIELDS;

    #[test]
    fn a_dry_queue_spins_for_the_cycle_when_spinning_measured_clearly_faster() {
        let mut spin = DrySpin::new(1);
        let yields = cycle(&mut spin, 10 * MS, 14 * MS);
        assert_eq!(yields[..4], [S, S, 0, 0], "the trials spin, then wait at once");
        assert!(yields[4..].iter().all(|&y| y == DRY_YIELDS), "spinning won: {yields:?}");
        assert_eq!(spin.yields(), DRY_YIELDS, "the next cycle starts with the spinning trial");
    }

    #[test]
    fn a_queue_with_tasks_at_once_always_spins() {
        let mut spin = DrySpin::new(64);
        for _ in 0..3 * SPIN_EPOCH_TASKS {
            spin.task_ended();
        }
        assert_eq!((spin.yields(), spin.epoch), (DRY_YIELDS, 0), "no trials for a concurrent queue");
    }

    #[test]
    fn a_dry_queue_waits_for_the_cycle_unless_spinning_wins_by_a_tenth() {
        let mut spin = DrySpin::new(1);
        // Spinning 5% faster is not enough: it keeps a second core busy.
        let yields = cycle(&mut spin, 100 * MS, 105 * MS);
        assert!(yields[4..].iter().all(|&y| y == 0), "waiting kept: {yields:?}");
        // Spinning three times slower (the hand-off between cores is dear): waiting, of course.
        let yields = cycle(&mut spin, 30 * MS, 10 * MS);
        assert_eq!(yields[0], DRY_YIELDS, "each cycle tries spinning again");
        assert!(yields[4..].iter().all(|&y| y == 0), "waiting kept: {yields:?}");
    }

    #[test]
    fn only_the_second_epoch_of_each_trial_is_timed() {
        let mut spin = DrySpin::new(1);
        // The first spinning epoch is slow (the loop moves), the first waiting one quick: neither counts.
        feed(&mut spin, &[50, 10, 1, 14]);
        assert_eq!(spin.yields(), DRY_YIELDS, "spinning won, 10 ms against 14");
    }

    #[test]
    fn a_choice_that_slows_by_a_quarter_for_two_epochs_is_tried_again() {
        let mut spin = DrySpin::new(1);
        // Spinning wins, then runs at its best for a while.
        let yields = feed(&mut spin, &[10, 10, 14, 14, 10, 10, 10, 10]);
        assert_eq!(yields[4..], [S; 4]);
        // One slow epoch is noise; 12 ms is within a quarter of the best.
        assert_eq!(feed(&mut spin, &[13, 10, 12, 12]), [S; 4]);
        assert_eq!((spin.epoch, spin.yields()), (12, DRY_YIELDS), "no trial yet");
        // Two in a row a quarter slower: the next epochs are a trial, and waiting now wins.
        feed(&mut spin, &[13, 13]);
        assert_eq!(spin.epoch, 0, "a trial begins: {spin:?}");
        let yields = feed(&mut spin, &[13, 13, 10, 10, 10]);
        assert_eq!(yields, [S, S, 0, 0, 0], "waiting won");
        assert_eq!(spin.patience, SPIN_PATIENCE, "a trial that changed the choice keeps the least patience");
    }

    #[test]
    fn an_early_trial_that_confirms_the_choice_doubles_the_patience() {
        let mut spin = DrySpin::new(1);
        feed(&mut spin, &[10, 10, 14, 14]);
        // Slow from the start: the trial is called at the patience's end, not before.
        feed(&mut spin, &[13; 3]);
        assert_eq!(spin.epoch, 7, "no trial before {SPIN_PATIENCE} epochs");
        feed(&mut spin, &[13]);
        assert_eq!(spin.epoch, 0, "slow at the patience's end: a trial");
        // Spinning wins again (the whole machine was slow): the next early trial waits longer.
        feed(&mut spin, &[13, 13, 18, 18]);
        assert_eq!((spin.yields(), spin.patience), (DRY_YIELDS, 2 * SPIN_PATIENCE));
        feed(&mut spin, &[20; 2 * SPIN_PATIENCE as usize - 5]);
        assert_ne!(spin.epoch, 0, "still patient at epoch {}", spin.epoch);
        feed(&mut spin, &[20]);
        assert_eq!(spin.epoch, 0, "a trial at epoch {}", 2 * SPIN_PATIENCE);
    }
}
