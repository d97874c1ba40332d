//! `queue`: no-op tasks through Stevedore's in-memory queue, one at a time and 64 at a time, against
//! raw baselines in the same run (a bounded tokio mpsc with one consumer loop; mpsc plus
//! `tokio::spawn` under a 64-permit semaphore) and against apalis 1.0's in-memory backend.
//!
//! Every subject counts completions with one shared atomic and ends when all `n` are done, each
//! measurement on a fresh 2-thread runtime. Stevedore and the raw baselines have a producer task
//! feeding a bounded channel (capacity 1024) while the consumer runs; apalis's in-memory backend is
//! unbounded, so it is filled first and only the burn-down is timed, which spares it the
//! producer's contention.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use stevedore::queue::TaskQueue;
use stevedore::{BoxError, Host};
use tokio::sync::{Notify, Semaphore, mpsc};

use crate::report::{Figures, MachineState, median};

const CAPACITY: usize = 1024;
const CONCURRENT: usize = 64;

/// Counts completions and wakes the timer at the last one.
#[derive(Clone)]
struct Done {
    count: Arc<AtomicU64>,
    all: Arc<Notify>,
    n: u64,
}

impl Done {
    fn new(n: u64) -> Self {
        Done { count: Arc::default(), all: Arc::new(Notify::new()), n }
    }
    #[inline]
    fn one(&self) {
        if self.count.fetch_add(1, Ordering::Relaxed) + 1 == self.n {
            self.all.notify_one();
        }
    }
}

async fn raw_sequential(n: u64) -> f64 {
    let done = Done::new(n);
    let (tx, mut rx) = mpsc::channel::<u64>(CAPACITY);
    let d = done.clone();
    let consumer = tokio::spawn(async move {
        while let Some(task) = rx.recv().await {
            std::hint::black_box(task);
            d.one();
        }
    });
    let began = Instant::now();
    tokio::spawn(async move {
        for i in 0..n {
            if tx.send(i).await.is_err() {
                break;
            }
        }
    });
    done.all.notified().await;
    let rate = n as f64 / began.elapsed().as_secs_f64();
    consumer.abort();
    rate
}

async fn raw_spawn_semaphore(n: u64) -> f64 {
    let done = Done::new(n);
    let (tx, mut rx) = mpsc::channel::<u64>(CAPACITY);
    let d = done.clone();
    let consumer = tokio::spawn(async move {
        let permits = Arc::new(Semaphore::new(CONCURRENT));
        while let Some(task) = rx.recv().await {
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let d = d.clone();
            tokio::spawn(async move {
                std::hint::black_box(task);
                d.one();
                drop(permit);
            });
        }
    });
    let began = Instant::now();
    tokio::spawn(async move {
        for i in 0..n {
            if tx.send(i).await.is_err() {
                break;
            }
        }
    });
    done.all.notified().await;
    let rate = n as f64 / began.elapsed().as_secs_f64();
    consumer.abort();
    rate
}

async fn stevedore_queue(n: u64, concurrency: usize) -> f64 {
    let done = Done::new(n);
    let d = done.clone();
    let handler = move |task: u64| {
        std::hint::black_box(task);
        d.one();
        async { Ok::<_, BoxError>(()) }
    };
    let (queue, service) = TaskQueue::builder("bench", handler).capacity(CAPACITY).concurrency(concurrency).build();
    let host = Host::builder().handle_signals(false).read_env(false).add(service).build().expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    lifetime.started().await;
    let began = Instant::now();
    tokio::spawn(async move {
        for i in 0..n {
            if queue.enqueue(i).await.is_err() {
                break;
            }
        }
    });
    done.all.notified().await;
    let rate = n as f64 / began.elapsed().as_secs_f64();
    lifetime.request_stop();
    let _ = run.await;
    rate
}

static APALIS_DONE: std::sync::OnceLock<std::sync::Mutex<Option<Done>>> = std::sync::OnceLock::new();

async fn apalis_noop(task: u64) -> Result<(), apalis::prelude::BoxDynError> {
    std::hint::black_box(task);
    if let Some(done) = APALIS_DONE.get().and_then(|d| d.lock().ok()?.clone()) {
        done.one();
    }
    Ok(())
}

async fn apalis_memory(n: u64, concurrency: usize) -> f64 {
    use apalis::prelude::*;
    let done = Done::new(n);
    *APALIS_DONE.get_or_init(Default::default).lock().expect("lock") = Some(done.clone());
    let mut storage = MemoryStorage::<u64>::new();
    for chunk in (0..n).collect::<Vec<_>>().chunks(10_000) {
        storage.push_bulk(chunk.to_vec()).await.expect("push");
    }
    let worker = WorkerBuilder::new("bench").backend(storage).concurrency(concurrency).build(apalis_noop);
    let began = Instant::now();
    let all = done.all.clone();
    let _ = worker
        .run_until(async move {
            all.notified().await;
            Ok::<(), std::io::Error>(())
        })
        .await;
    n as f64 / began.elapsed().as_secs_f64()
}

/// A fresh 2-thread runtime: each measurement gets its own, so that nothing one subject leaves
/// behind (apalis's worker leaves tasks running after `run_until` returns) slows the next.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime")
}

pub fn run(n: u64, runs: usize) -> Figures {
    let mut cols: [Vec<f64>; 6] = Default::default();
    if let Ok(side) = std::env::var("STEVEDORE_BENCH_QUEUE_PROFILE") {
        // Profiling aid: run one side alone, many times: `seq` or `concurrent` for Stevedore, `raw-seq`
        // for the bare channel loop.
        runtime().block_on(async {
            for _ in 0..runs {
                let rate = match side.as_str() {
                    "raw-seq" => raw_sequential(n).await,
                    "concurrent" => stevedore_queue(n, CONCURRENT).await,
                    _ => stevedore_queue(n, 1).await,
                };
                println!("{rate:.0} tasks/s");
            }
        });
        std::process::exit(0);
    }
    let measure = |subject: std::pin::Pin<Box<dyn std::future::Future<Output = f64>>>| runtime().block_on(subject);
    // One warm-up of each, not counted.
    measure(Box::pin(raw_sequential(n / 10)));
    measure(Box::pin(stevedore_queue(n / 10, 1)));
    let mut machine = MachineState::default();
    for _ in 0..runs {
        machine.sample();
        cols[0].push(measure(Box::pin(raw_sequential(n))));
        cols[1].push(measure(Box::pin(stevedore_queue(n, 1))));
        cols[2].push(measure(Box::pin(raw_spawn_semaphore(n))));
        cols[3].push(measure(Box::pin(stevedore_queue(n, CONCURRENT))));
        cols[4].push(measure(Box::pin(apalis_memory(n, CONCURRENT))));
        cols[5].push(measure(Box::pin(apalis_memory(n, 16))));
    }
    let [raw_seq, ours_seq, raw_conc, ours_conc, apalis64, apalis16] = cols.map(median);
    let mut f = Figures::new(format!("queue: {n} no-op tasks, 2 worker threads (median of {runs})"));
    f.add("seq_ratio", ours_seq / raw_seq, "Stevedore sequential over raw mpsc + one consumer loop");
    f.add(
        "concurrent_ratio",
        ours_conc / raw_conc,
        "Stevedore 64 at a time over mpsc + spawn under a 64-permit semaphore",
    );
    f.add("apalis_ratio", ours_conc / apalis64, "Stevedore 64 at a time over apalis in-memory at concurrency 64");
    f.add("apalis16_ratio", ours_conc / apalis16, "Stevedore 64 at a time over apalis in-memory at concurrency 16");
    f.add("stevedore_seq_per_s", ours_seq, "Stevedore, one at a time, tasks/s");
    f.add("raw_seq_per_s", raw_seq, "raw mpsc + one consumer loop, tasks/s");
    f.add("stevedore_concurrent_per_s", ours_conc, "Stevedore, 64 at a time, tasks/s");
    f.add("raw_concurrent_per_s", raw_conc, "mpsc + spawn under a 64-permit semaphore, tasks/s");
    f.add("apalis64_per_s", apalis64, "apalis 1.0 in-memory, concurrency 64, jobs/s");
    f.add("apalis16_per_s", apalis16, "apalis 1.0 in-memory, concurrency 16, jobs/s");
    machine.report(&mut f);
    f.note("Stevedore's figures include per-task scope, span, timeout/panic guard and status record.");
    f
}
