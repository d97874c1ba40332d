//! The tick driver: a few tasks per runtime that start every interval service's runs.
//!
//! A service with its own tokio timer costs, at each tick, a timer-wheel entry, a wake-up and a
//! trip through the scheduler before its run even starts; 10,000 of them started together are
//! 10,000 wake-ups queued in one millisecond. Here each runtime has one driver per worker thread
//! (a shard), which keeps its services' next ticks in a heap, sleeps until the earliest, and starts
//! every run that is due by polling it in place. A run that ends at that first poll, as most timed
//! work that finds nothing to do does, never touches its service's task. One that has to wait is
//! handed to its service's own task, which drives it to the end, so a slow run holds up no other
//! service (`BENCHMARKS.md`, thirteenth session, for what this saves).
//!
//! What a service does at a tick (the policies) lives with the service, behind [`Timed`]; this
//! module only keeps time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::runs::instant_after;

/// When a service's next run is due, and what the service needs to know about it then.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Plan {
    /// When the driver starts the run.
    pub(crate) run_at: Instant,
    /// The grid point the run is for (fixed rate), for the service's policies.
    pub(crate) at: Instant,
    /// When that grid point falls due, with its jitter: `run_at`, but for a catch-up run.
    pub(crate) due: Instant,
    /// A catch-up run ([`Overlap::RunOnce`](super::Overlap::RunOnce)), not a tick.
    pub(crate) catch_up: bool,
}

/// A service the driver keeps time for.
pub(crate) trait Timed: Send + Sync + 'static {
    /// `plan` fell due at `clock`, the time now: start the run. Returns the next plan when the run
    /// ended here; `None` when the service took the run (or the plan) into its own task, which then
    /// gives the next plan back through its [`Registration`]. A service that reads the clock moves
    /// `clock` on, so that the driver need not read it again for the next service.
    fn fire(self: Arc<Self>, plan: Plan, clock: &mut Instant) -> Option<Plan>;
}

struct Entry {
    plan: Plan,
    service: Arc<dyn Timed>,
}

/// A shard's plans in time order. The heap holds only small keys (when, and where in `entries`
/// the plan is): at thousands of services, sifting whole entries through it took a fifth of the
/// driver's time.
struct Plans {
    /// The driver's time origin: keys count nanoseconds from it.
    origin: Instant,
    keys: BinaryHeap<Reverse<(u64, u32)>>,
    entries: Vec<Option<Entry>>,
    free: Vec<u32>,
}

impl Plans {
    fn new() -> Self {
        Plans { origin: Instant::now(), keys: BinaryHeap::new(), entries: Vec::new(), free: Vec::new() }
    }

    fn key(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&mut self, entry: Entry) {
        let at = self.key(entry.plan.run_at);
        let index = match self.free.pop() {
            Some(index) => {
                self.entries[index as usize] = Some(entry);
                index
            }
            None => {
                self.entries.push(Some(entry));
                u32::try_from(self.entries.len() - 1).unwrap_or(u32::MAX)
            }
        };
        self.keys.push(Reverse((at, index)));
    }

    /// The earliest plan's time.
    fn next_at(&self) -> Option<Instant> {
        let Reverse((at, _)) = self.keys.peek()?;
        Some(instant_after(self.origin, Duration::from_nanos(*at)))
    }

    /// The earliest plan, if it is due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Entry> {
        let Reverse((at, index)) = *self.keys.peek()?;
        if at > self.key(now) {
            return None;
        }
        self.keys.pop();
        self.free.push(index);
        self.entries.get_mut(index as usize)?.take()
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The runtime's drivers.
struct Driver {
    shards: Box<[Shard]>,
    /// Which shard the next service goes to.
    next_shard: AtomicUsize,
}

#[derive(Default)]
struct Shard {
    inner: Mutex<ShardInner>,
}

#[derive(Default)]
struct ShardInner {
    /// Plans handed in since the driver last looked (a new service, or one back from a long run).
    incoming: Vec<Entry>,
    /// Services registered with this shard and not yet stopped: the driver ends at zero.
    services: usize,
    /// Whether the shard's task is running.
    running: bool,
    /// The shard's task, while it sleeps.
    waker: Option<Waker>,
}

impl Shard {
    fn lock(&self) -> MutexGuard<'_, ShardInner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl ShardInner {
    fn push(&mut self, plan: Plan, service: Arc<dyn Timed>) {
        self.incoming.push(Entry { plan, service });
        if let Some(waker) = self.waker.take() {
            waker.wake();
        }
    }
}

/// Each runtime's driver, found by the runtime's id. A driver lives while a service or a shard's
/// task holds it; a runtime's id is never reused, so a dead entry is only swept away.
static DRIVERS: Mutex<Vec<(tokio::runtime::Id, Weak<Driver>)>> = Mutex::new(Vec::new());

fn driver_for(runtime: &tokio::runtime::Handle) -> Arc<Driver> {
    let mut drivers = DRIVERS.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    drivers.retain(|(_, driver)| driver.strong_count() > 0);
    let id = runtime.id();
    if let Some(driver) = drivers.iter().find(|(of, _)| *of == id).and_then(|(_, d)| d.upgrade()) {
        return driver;
    }
    let shards = runtime.metrics().num_workers().max(1);
    let driver =
        Arc::new(Driver { shards: (0..shards).map(|_| Shard::default()).collect(), next_shard: AtomicUsize::new(0) });
    drivers.push((id, Arc::downgrade(&driver)));
    driver
}

/// A service's place with its runtime's driver; dropping it takes the service off.
pub(crate) struct Registration {
    driver: Arc<Driver>,
    shard: usize,
}

/// Puts `service` on the current runtime's driver, its first run due as `first` says.
pub(crate) fn register(service: Arc<dyn Timed>, first: Plan) -> Registration {
    let runtime = tokio::runtime::Handle::current();
    let driver = driver_for(&runtime);
    let shard = driver.next_shard.fetch_add(1, Ordering::Relaxed) % driver.shards.len();
    let mut inner = driver.shards[shard].lock();
    inner.services += 1;
    inner.push(first, service);
    if !std::mem::replace(&mut inner.running, true) {
        runtime.spawn(drive(driver.clone(), shard));
    }
    drop(inner);
    Registration { driver, shard }
}

impl Registration {
    /// Gives the service's next plan back to the driver (after a run in the service's own task).
    pub(crate) fn schedule(&self, plan: Plan, service: Arc<dyn Timed>) {
        self.driver.shards[self.shard].lock().push(plan, service);
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut inner = self.driver.shards[self.shard].lock();
        inner.services -= 1;
        if inner.services == 0
            && let Some(waker) = inner.waker.take()
        {
            waker.wake();
        }
    }
}

/// Runs due in a row before the driver lets the worker run other tasks: a burst of thousands
/// should not hold a worker for milliseconds while a request waits behind it.
const RUNS_PER_TURN: u32 = 64;

/// A shard's task: sleeps until the earliest plan, starts every run that is due, and again.
async fn drive(driver: Arc<Driver>, index: usize) {
    let shard = &driver.shards[index];
    let mut plans = Plans::new();
    let mut sleep = Box::pin(tokio::time::sleep_until(Instant::now()));
    loop {
        {
            let mut inner = shard.lock();
            if inner.services == 0 {
                inner.running = false;
                return;
            }
            for entry in inner.incoming.drain(..) {
                plans.push(entry);
            }
        }
        let mut now = Instant::now();
        let mut in_turn = 0;
        while let Some(entry) = plans.pop_due(now) {
            if let Some(plan) = entry.service.clone().fire(entry.plan, &mut now) {
                plans.push(Entry { plan, ..entry });
            }
            in_turn += 1;
            // Each run's first step is polled in this task, so it spends this task's tokio budget:
            // out of it, a run's first await would come back pending and be handed on for nothing.
            if in_turn == RUNS_PER_TURN || !tokio::task::coop::has_budget_remaining() {
                in_turn = 0;
                tokio::task::yield_now().await;
                now = Instant::now();
            }
        }
        if let Some(at) = plans.next_at()
            && sleep.deadline() != at
        {
            sleep.as_mut().reset(at);
        }
        let idle = plans.is_empty();
        std::future::poll_fn(|cx| {
            if !idle && sleep.as_mut().poll(cx).is_ready() {
                return Poll::Ready(());
            }
            let mut inner = shard.lock();
            if !inner.incoming.is_empty() || inner.services == 0 {
                return Poll::Ready(());
            }
            inner.waker = Some(cx.waker().clone());
            Poll::Pending
        })
        .await;
    }
}

/// A run's future, once it is handed to its service's task.
pub(crate) type RunFuture = Pin<Box<dyn Future<Output = Instant> + Send>>;
