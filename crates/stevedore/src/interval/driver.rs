//! The tick driver: a few tasks per runtime that start every interval service's runs.
//!
//! A service with its own tokio timer costs, at each tick, a timer-wheel entry, a wake-up and a
//! trip through the scheduler before its run even starts; 10,000 of them started together are
//! 10,000 wake-ups queued in one millisecond. Here each runtime has one driver per worker thread
//! (a shard), which keeps its services' next runs in time order, sleeps until the earliest, and starts
//! every run that is due by polling it in place. A run that ends at that first poll, as most timed
//! work that finds nothing to do does, never touches its service's task. One that has to wait is
//! handed to its service's own task, which drives it to the end, so a slow run holds up no other
//! service (`BENCHMARKS.md`, thirteenth session, for what this saves).
//!
//! What a service does at a tick (the policies) lives with the service, behind [`Timed`]; this
//! module only keeps time.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Poll, Waker};
use std::time::Duration;

use tokio::time::Instant;

use crate::runs::instant_after;

/// A service the driver keeps time for. The service keeps its own plan; the driver keeps only
/// when it falls due.
pub(crate) trait Timed: Send + Sync + 'static {
    /// The service's plan fell due at `clock`, the time now: start the run. Returns when the
    /// next is due if the run ended here; `None` when the service took the run (or the plan) into
    /// its own task, which then gives the next time back through its [`Registration`]. A service
    /// that reads the clock moves `clock` on, so that the driver need not read it again.
    fn fire(self: Arc<Self>, clock: &mut Instant) -> Option<Instant>;
}

/// One service's next run in a shard's queues: when, in nanoseconds from the shard's origin, and
/// whose. 24 bytes: at thousands of services, sifting larger entries through a heap took a fifth
/// of the driver's time.
struct Entry {
    at: u64,
    service: Arc<dyn Timed>,
}

impl PartialEq for Entry {
    fn eq(&self, other: &Self) -> bool {
        self.at == other.at
    }
}
impl Eq for Entry {}
impl PartialOrd for Entry {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}
/// Reversed, so that `BinaryHeap` (a max-heap) pops the earliest.
impl Ord for Entry {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        other.at.cmp(&self.at)
    }
}

/// A shard's services in the order their runs fall due.
///
/// Two queues: a run due no earlier than the last one queued goes to the back of `in_order`, in
/// constant time, and any other to the heap. Services that share a period (the usual case, and
/// the costly one: thousands of them) are due again in the order they ran, so they stay in
/// `in_order` and never pay the heap's sifting, a tenth of the driver's time at 10,000 services.
struct Plans {
    /// Entries count nanoseconds from here.
    origin: Instant,
    in_order: VecDeque<Entry>,
    heap: BinaryHeap<Entry>,
}

impl Plans {
    fn new() -> Self {
        Plans { origin: Instant::now(), in_order: VecDeque::new(), heap: BinaryHeap::new() }
    }

    fn key(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn push(&mut self, at: Instant, service: Arc<dyn Timed>) {
        let entry = Entry { at: self.key(at), service };
        match self.in_order.back() {
            Some(last) if last.at > entry.at => self.heap.push(entry),
            _ => self.in_order.push_back(entry),
        }
    }

    /// The earliest entry's time, and whether it is the heap's.
    fn earliest(&self) -> Option<(u64, bool)> {
        match (self.in_order.front(), self.heap.peek()) {
            (Some(first), Some(top)) if top.at < first.at => Some((top.at, true)),
            (Some(first), _) => Some((first.at, false)),
            (None, Some(top)) => Some((top.at, true)),
            (None, None) => None,
        }
    }

    /// When the earliest run is due.
    fn next_at(&self) -> Option<Instant> {
        let (at, _) = self.earliest()?;
        Some(instant_after(self.origin, Duration::from_nanos(at)))
    }

    /// The service whose run is earliest, if it is due at `now`.
    fn pop_due(&mut self, now: Instant) -> Option<Arc<dyn Timed>> {
        let (at, in_heap) = self.earliest()?;
        if at > self.key(now) {
            return None;
        }
        let entry = if in_heap { self.heap.pop() } else { self.in_order.pop_front() };
        entry.map(|entry| entry.service)
    }

    fn is_empty(&self) -> bool {
        self.in_order.is_empty() && self.heap.is_empty()
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
    /// Runs handed in since the driver last looked (a new service, or one back from a long run).
    incoming: Vec<(Instant, Arc<dyn Timed>)>,
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
    fn push(&mut self, at: Instant, service: Arc<dyn Timed>) {
        self.incoming.push((at, service));
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

/// Puts `service` on the current runtime's driver, its first run due at `first`.
pub(crate) fn register(service: Arc<dyn Timed>, first: Instant) -> Registration {
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
    /// Gives the service's next run back to the driver (after a run in the service's own task).
    pub(crate) fn schedule(&self, at: Instant, service: Arc<dyn Timed>) {
        self.driver.shards[self.shard].lock().push(at, service);
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

/// How long the driver runs due runs before it lets the worker run other tasks: a burst of
/// thousands should not hold a worker for milliseconds while a request waits behind it.
const TURN: Duration = Duration::from_micros(250);

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
            for (at, service) in inner.incoming.drain(..) {
                plans.push(at, service);
            }
        }
        let mut now = Instant::now();
        let mut turn_began = now;
        while let Some(service) = plans.pop_due(now) {
            if let Some(at) = service.clone().fire(&mut now) {
                plans.push(at, service);
            }
            // Each run's first step is polled in this task, so it spends this task's tokio budget:
            // out of it, a run's first await would come back pending and be handed on for nothing.
            if now.saturating_duration_since(turn_began) >= TURN || !tokio::task::coop::has_budget_remaining() {
                tokio::task::yield_now().await;
                now = Instant::now();
                turn_began = now;
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

#[cfg(test)]
mod tests {
    use super::*;

    /// A service that only says which it is.
    struct Named(u32);
    impl Timed for Named {
        fn fire(self: Arc<Self>, _: &mut Instant) -> Option<Instant> {
            None
        }
    }

    fn name_of(service: &Arc<dyn Timed>, all: &[Arc<Named>]) -> u32 {
        let named = all.iter().find(|n| std::ptr::addr_eq(Arc::as_ptr(service), Arc::as_ptr(*n))).unwrap();
        named.0
    }

    #[test]
    fn runs_come_out_in_time_order_whatever_order_they_went_in() {
        let mut plans = Plans::new();
        let origin = plans.origin;
        let ms = |n: u64| origin + Duration::from_millis(n);
        // In order (to the queue), then earlier and later ones mixed (to the heap).
        let due = [10, 20, 30, 40, 15, 5, 40, 35, 50, 0, 25];
        let all: Vec<Arc<Named>> = (0..due.len() as u32).map(|i| Arc::new(Named(i))).collect();
        for (named, at) in all.iter().zip(due) {
            plans.push(ms(at), named.clone());
        }
        assert_eq!(plans.next_at(), Some(ms(0)));
        let mut popped = Vec::new();
        while let Some(service) = plans.pop_due(ms(100)) {
            popped.push(due[name_of(&service, &all) as usize]);
        }
        assert_eq!(popped, [0, 5, 10, 15, 20, 25, 30, 35, 40, 40, 50]);
        assert!(plans.is_empty());
    }

    #[test]
    fn only_what_is_due_comes_out() {
        let mut plans = Plans::new();
        let origin = plans.origin;
        let all: Vec<Arc<Named>> = (0..3).map(|i| Arc::new(Named(i))).collect();
        for (named, at) in all.iter().zip([30, 10, 20]) {
            plans.push(origin + Duration::from_millis(at), named.clone());
        }
        let due_by_20: Vec<u32> = std::iter::from_fn(|| plans.pop_due(origin + Duration::from_millis(20)))
            .map(|s| name_of(&s, &all))
            .collect();
        assert_eq!(due_by_20, [1, 2]);
        assert_eq!(plans.next_at(), Some(origin + Duration::from_millis(30)));
    }
}
