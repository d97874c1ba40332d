//! The in-memory task queue under tokio's paused clock: order, backpressure, concurrency, contained
//! failures, pause, and the stop policies with exact counts.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stevedore::queue::{EnqueueError, OnStop, TaskQueue};
use stevedore::{BoxError, BuildError, Host, HostBuilder, RunOutcome, RunReport, StatusView};
use tokio::time::Instant;

fn builder() -> HostBuilder {
    Host::builder().handle_signals(false).read_env(false)
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Records which payloads ran, when, and the most that ran at once.
#[derive(Clone, Default)]
struct Probe {
    done: Arc<Mutex<Vec<u32>>>,
    now: Arc<AtomicUsize>,
    max: Arc<AtomicUsize>,
}

impl Probe {
    /// A handler that takes `took` per task.
    fn handler(&self, took: Duration) -> impl stevedore::PayloadHandler<u32, ()> {
        let probe = self.clone();
        move |n: u32| {
            let probe = probe.clone();
            async move {
                let running = probe.now.fetch_add(1, Ordering::SeqCst) + 1;
                probe.max.fetch_max(running, Ordering::SeqCst);
                tokio::time::sleep(took).await;
                probe.now.fetch_sub(1, Ordering::SeqCst);
                probe.done.lock().unwrap().push(n);
                Ok::<_, BoxError>(())
            }
        }
    }
    fn done(&self) -> Vec<u32> {
        self.done.lock().unwrap().clone()
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::SeqCst)
    }
}

/// Runs the host, requests a stop after `d`, and returns the report and status view.
async fn run_for(host: Host, d: Duration) -> (RunReport, StatusView) {
    let lifetime = host.lifetime();
    let status = host.status();
    let stopper = tokio::spawn(async move {
        tokio::time::sleep(d).await;
        lifetime.request_stop();
    });
    let report = host.run().await;
    stopper.await.unwrap();
    (report, status)
}

#[tokio::test(start_paused = true)]
async fn runs_tasks_one_at_a_time_in_order_by_default() {
    let probe = Probe::default();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1))).build();
    for n in 0..5 {
        queue.enqueue(n).await.unwrap();
    }
    let (report, status) = run_for(builder().add(service).build().unwrap(), secs(10)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(probe.done(), [0, 1, 2, 3, 4]);
    assert_eq!(probe.max(), 1);
    let s = status.service("q").unwrap();
    assert_eq!(s.kind, "queue");
    assert_eq!((s.runs.started, s.runs.succeeded), (5, 5));
    assert_eq!(s.queue.unwrap().depth, 0);
    assert!(s.can_pause);
}

#[tokio::test(start_paused = true)]
async fn concurrency_limit_is_respected() {
    let probe = Probe::default();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1))).concurrency(4).capacity(100).build();
    for n in 0..20 {
        queue.enqueue(n).await.unwrap();
    }
    let host = builder().add(service).build().unwrap();
    let began = Instant::now();
    let lifetime = host.lifetime();
    let q = queue.clone();
    tokio::spawn(async move {
        while q.counts().succeeded < 20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        lifetime.request_stop();
    });
    let report = host.run().await;
    assert!(report.is_clean());
    assert_eq!(probe.max(), 4, "never more than 4 at once");
    assert_eq!(probe.done().len(), 20);
    // 20 one-second tasks, 4 at a time: 5 seconds (plus the 100 ms poll).
    assert!(began.elapsed() <= Duration::from_millis(5100), "{:?}", began.elapsed());
}

#[tokio::test(start_paused = true)]
async fn backpressure_enqueue_waits_and_try_enqueue_refuses_when_full() {
    let probe = Probe::default();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1))).capacity(2).build();
    queue.try_enqueue(1).unwrap();
    queue.enqueue(2).await.unwrap();
    // Full: try_enqueue hands the payload back at once...
    match queue.try_enqueue(3) {
        Err(EnqueueError::Full { queue: name, capacity, task }) => {
            assert_eq!((name.as_str(), capacity, task), ("q", 2, 3));
        }
        other => panic!("expected Full, got {other:?}"),
    }
    // ...and enqueue waits for room.
    assert!(tokio::time::timeout(secs(60), queue.enqueue(3)).await.is_err(), "enqueue did not wait");
    assert_eq!(queue.stats().depth, 2);
    // Once the service takes tasks, the waiting enqueue goes through.
    let host = builder().add(service).build().unwrap();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let waited = Instant::now();
    queue.enqueue(3).await.unwrap();
    assert!(waited.elapsed() < secs(1), "room as soon as the first task was taken");
    tokio::time::sleep(secs(5)).await;
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
    assert_eq!(probe.done(), [1, 2, 3]);
}

#[tokio::test(start_paused = true)]
async fn a_panicking_or_failing_task_is_contained_logged_and_counted() {
    let done = Arc::new(Mutex::new(Vec::new()));
    let seen = done.clone();
    let handler = move |n: u32| {
        let seen = seen.clone();
        async move {
            match n {
                2 => panic!("task {n} blew up"),
                4 => Err::<(), BoxError>(format!("task {n} was refused").into()),
                _ => {
                    seen.lock().unwrap().push(n);
                    Ok(())
                }
            }
        }
    };
    let (queue, service) = TaskQueue::builder("q", handler).concurrency(2).build();
    for n in 0..6 {
        queue.enqueue(n).await.unwrap();
    }
    let (report, status) = run_for(builder().add(service).build().unwrap(), secs(1)).await;
    assert!(report.is_clean(), "a failing task is not a failing service: {}", report.summary());
    let mut ok = done.lock().unwrap().clone();
    ok.sort();
    assert_eq!(ok, [0, 1, 3, 5]);
    let counts = queue.counts();
    assert_eq!((counts.enqueued, counts.succeeded, counts.failed), (6, 4, 2));
    let s = status.service("q").unwrap();
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.failed), (6, 4, 2));
    assert_eq!(s.queue.unwrap().failed, 2);
    assert_eq!(s.runs.last_outcome, Some(RunOutcome::Succeeded));
    let last_error = s.runs.last_run_error.unwrap();
    assert!(last_error.contains("blew up") || last_error.contains("refused"), "{last_error}");
}

#[tokio::test(start_paused = true)]
async fn stop_drains_what_can_finish_in_the_budget_and_hands_back_the_rest() {
    let probe = Probe::default();
    let handed = Arc::new(Mutex::new(Vec::new()));
    let sink = handed.clone();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1)))
        .timeout(Duration::from_millis(1500))
        .on_unprocessed(move |rest| sink.lock().unwrap().extend(rest))
        .build();
    for n in 0..20 {
        queue.enqueue(n).await.unwrap();
    }
    let host = builder().shutdown_timeout(secs(5)).add(service).build().unwrap();
    // Stop at 2.5 s: task 2 is running; the budget ends at 7.5 s. A task may start only if its 1.5 s
    // timeout ends by 7.25 s (the 250 ms reserve): tasks 3, 4 and 5 start at 3, 4 and 5 s; task 6
    // would start at 6 s and could run to 7.5 s, so it and the rest are handed back.
    let (report, status) = run_for(host, Duration::from_millis(2500)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(probe.done(), [0, 1, 2, 3, 4, 5]);
    assert_eq!(*handed.lock().unwrap(), (6..20).collect::<Vec<_>>());
    let counts = queue.counts();
    assert_eq!((counts.succeeded, counts.handed_back, counts.depth), (6, 14, 0));
    assert!(report.stop_duration <= secs(5));
    // Closed to new work, and the payload comes back.
    let err = queue.enqueue(99).await.unwrap_err();
    assert!(matches!(err, EnqueueError::Closed { .. }), "{err}");
    assert_eq!(err.into_task(), 99);
    assert_eq!(status.service("q").unwrap().runs.succeeded, 6);
}

#[tokio::test(start_paused = true)]
async fn stop_hands_back_everything_waiting_when_told_to() {
    let probe = Probe::default();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1))).on_stop(OnStop::HandBack).build();
    for n in 0..10 {
        queue.enqueue(n).await.unwrap();
    }
    let (report, _) = run_for(builder().add(service).build().unwrap(), Duration::from_millis(2500)).await;
    assert!(report.is_clean(), "{}", report.summary());
    // Task 2 was running at the stop and finished; 3..10 come back, none lost.
    assert_eq!(probe.done(), [0, 1, 2]);
    assert_eq!(queue.take_unprocessed(), (3..10).collect::<Vec<_>>());
    assert_eq!(queue.counts().handed_back, 7);
    assert!(queue.take_unprocessed().is_empty(), "handed back once");
}

#[tokio::test(start_paused = true)]
async fn tasks_of_a_queue_that_never_ran_are_not_lost() {
    let probe = Probe::default();
    let (queue, spec) = TaskQueue::builder("q", probe.handler(secs(1))).build();
    for n in 0..4 {
        queue.enqueue(n).await.unwrap();
    }
    drop(spec);
    assert_eq!(queue.take_unprocessed(), [0, 1, 2, 3]);
    assert_eq!(queue.counts().handed_back, 4);
    assert!(matches!(queue.try_enqueue(4), Err(EnqueueError::Closed { .. })));
}

#[tokio::test(start_paused = true)]
async fn pause_stops_taking_tasks_and_resume_goes_on() {
    let probe = Probe::default();
    let (queue, service) = TaskQueue::builder("q", probe.handler(secs(1))).build();
    let host = builder().add(service).build().unwrap();
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    lifetime.started().await;
    status.pause("q").unwrap();
    for n in 0..3 {
        queue.enqueue(n).await.unwrap();
    }
    tokio::time::sleep(secs(10)).await;
    assert!(probe.done().is_empty(), "paused: nothing taken");
    let stats = status.service("q").unwrap().queue.unwrap();
    assert!(stats.paused);
    assert_eq!(stats.depth, 3);
    status.resume("q").unwrap();
    tokio::time::sleep(secs(10)).await;
    assert_eq!(probe.done(), [0, 1, 2]);
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_queue_of_closures() {
    let hits = Arc::new(AtomicUsize::new(0));
    let (queue, service) = TaskQueue::closures("background").build();
    for _ in 0..3 {
        let hits = hits.clone();
        queue
            .enqueue_fn(move |_stop| async move {
                hits.fetch_add(1, Ordering::SeqCst);
                Ok::<_, BoxError>(())
            })
            .await
            .unwrap();
    }
    queue.try_enqueue_fn(|_stop| async { Err::<(), _>(std::io::Error::other("disk full")) }).unwrap();
    let (report, status) = run_for(builder().add(service).build().unwrap(), secs(1)).await;
    assert!(report.is_clean());
    assert_eq!(hits.load(Ordering::SeqCst), 3);
    let s = status.service("background").unwrap();
    assert_eq!((s.runs.succeeded, s.runs.failed), (3, 1));
    assert!(s.runs.last_run_error.unwrap().contains("disk full"));
}

#[tokio::test]
async fn zero_capacity_or_concurrency_fails_the_build_naming_the_queue() {
    let noop = |_: u32| async { Ok::<_, BoxError>(()) };
    let (_, spec) = TaskQueue::builder("mail", noop).capacity(0).build();
    let err = builder().add(spec).build().unwrap_err();
    assert!(matches!(&err, BuildError::InvalidService { service, .. } if service == "mail"), "{err}");
    let (_, spec) = TaskQueue::builder("mail", noop).concurrency(0).build();
    assert!(builder().add(spec).build().unwrap_err().to_string().contains("concurrency of zero"));
}

#[tokio::test(start_paused = true)]
async fn a_capacity_or_concurrency_past_what_tokio_holds_is_held_to_it_not_a_panic() {
    let probe = Probe::default();
    let (queue, service) =
        TaskQueue::builder("q", probe.handler(secs(1))).capacity(usize::MAX).concurrency(usize::MAX).build();
    for n in 0..3 {
        queue.try_enqueue(n).unwrap();
    }
    let (report, status) = run_for(builder().add(service).build().unwrap(), secs(5)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!((probe.done().len(), probe.max()), (3, 3), "all three at once");
    assert_eq!(status.service("q").unwrap().runs.succeeded, 3);
}

/// Polls `check` on the paused clock (each step lets the queue's task run) until it holds.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    for _ in 0..1000 {
        if check() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    panic!("never happened: {what}");
}

#[tokio::test(start_paused = true)]
async fn a_sequential_queue_of_quick_tasks_publishes_every_run_once_it_is_idle() {
    // Tasks that end at their first poll are tallied and published together; once the queue has
    // nothing left to do, the status view and the counts hold every run, failures included.
    let handler = |n: u32| async move {
        match n {
            7 => Err::<(), BoxError>("seven is refused".into()),
            13 => panic!("thirteen blew up"),
            _ => Ok(()),
        }
    };
    let (queue, service) = TaskQueue::builder("q", handler).capacity(2000).build();
    let host = builder().add(service).build().unwrap();
    let (status, lifetime) = (host.status(), host.lifetime());
    let run = tokio::spawn(host.run());
    lifetime.started().await;
    let before = Instant::now();
    for n in 0..1500 {
        queue.enqueue(n).await.unwrap();
    }
    eventually("all 1500 tasks counted", || queue.counts().succeeded + queue.counts().failed == 1500).await;
    let s = status.service("q").unwrap();
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.failed, s.runs.in_flight), (1500, 1498, 2, 0));
    assert_eq!(s.runs.last_outcome, Some(RunOutcome::Succeeded));
    assert!(s.runs.last_run_error.as_deref().unwrap().contains("thirteen blew up"), "{:?}", s.runs.last_run_error);
    // Quick runs are timed on the CPU's counter, which the paused clock does not stop: a real,
    // tiny duration.
    assert!(s.runs.last_duration.unwrap() < Duration::from_millis(100), "{:?}", s.runs.last_duration);
    assert!(s.runs.last_started.is_some());
    let counts = queue.counts();
    assert_eq!((counts.enqueued, counts.succeeded, counts.failed, counts.in_flight), (1500, 1498, 2, 0));
    assert_eq!(s.queue.unwrap().failed, 2);
    assert!(Instant::now() - before < secs(1));
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_sequential_task_that_waits_is_shown_in_flight_with_the_quick_ones_before_it() {
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let opened = gate.clone();
    let handler = move |n: u32| {
        let gate = opened.clone();
        async move {
            if n == 3 {
                let _ = gate.acquire().await;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Ok::<_, BoxError>(())
        }
    };
    let (queue, service) = TaskQueue::builder("q", handler).build();
    let host = builder().add(service).build().unwrap();
    let (status, lifetime) = (host.status(), host.lifetime());
    let run = tokio::spawn(host.run());
    lifetime.started().await;
    for n in 0..5 {
        queue.enqueue(n).await.unwrap();
    }
    eventually("task 3 in flight", || queue.counts().in_flight == 1).await;
    let s = status.service("q").unwrap();
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.in_flight), (4, 3, 1), "0, 1, 2 done; 3 running");
    assert_eq!(queue.counts().succeeded, 3);
    gate.add_permits(1);
    eventually("all 5 done", || queue.counts().succeeded == 5).await;
    let s = status.service("q").unwrap();
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.in_flight), (5, 5, 0));
    assert_eq!(queue.counts().in_flight, 0);
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn each_task_of_a_sequential_queue_has_its_own_scope() {
    // The queue hands a scope that nothing was made in to the next task; one in which a scoped
    // value was made is ended with its task, and the next task gets a fresh one.
    use stevedore::{Scoped, ServiceCollection};
    struct Tx(u32);
    let made = Arc::new(AtomicUsize::new(0));
    let ended = Arc::new(Mutex::new(Vec::new()));
    let (m, e) = (made.clone(), ended.clone());
    let services = ServiceCollection::new().scoped_with_end(
        move || {
            let n = m.fetch_add(1, Ordering::SeqCst) as u32;
            async move { Ok::<_, BoxError>(Tx(n)) }
        },
        move |tx: Tx, outcome| {
            e.lock().unwrap().push((tx.0, outcome));
            async { Ok::<(), BoxError>(()) }
        },
    );
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s = seen.clone();
    let handler = move |n: u32, tx: Scoped<Tx>| {
        let s = s.clone();
        async move {
            let id = tx.lock().await.0;
            s.lock().unwrap().push((n, id));
            Ok::<(), BoxError>(())
        }
    };
    let (queue, service) = TaskQueue::builder("q", handler).build();
    for n in 0..3 {
        queue.enqueue(n).await.unwrap();
    }
    let (report, _) = run_for(builder().services(services).add(service).build().unwrap(), secs(1)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(*seen.lock().unwrap(), [(0, 0), (1, 1), (2, 2)], "a fresh scoped value per task");
    assert_eq!(made.load(Ordering::SeqCst), 3);
    let ok = RunOutcome::Succeeded;
    assert_eq!(*ended.lock().unwrap(), [(0, ok), (1, ok), (2, ok)], "each ended with its own task");
}
