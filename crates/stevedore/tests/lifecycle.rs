//! Host lifecycle: order, concurrency, rollback, budget, supervision. Time is tokio's paused clock.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stevedore::{
    AppLifetime, BoxError, BuildError, Host, HostState, HostedService, OnFailure, RestartPolicy, ServiceContext,
    ServiceSpec, ServiceState, StartError, StatusView, StopReason,
};
use tokio::time::Instant;

type Log = Arc<Mutex<Vec<String>>>;

fn log() -> Log {
    Arc::new(Mutex::new(Vec::new()))
}

fn entries(log: &Log) -> Vec<String> {
    log.lock().unwrap().clone()
}

/// A start/stop service that records each call and can be told to fail or to take time.
struct Recorder {
    name: &'static str,
    log: Log,
    fail_start: bool,
    stop_takes: Duration,
}

impl Recorder {
    fn new(name: &'static str, log: &Log) -> Self {
        Recorder { name, log: log.clone(), fail_start: false, stop_takes: Duration::ZERO }
    }
}

impl HostedService for Recorder {
    async fn starting(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("starting {}", self.name));
        Ok(())
    }
    async fn start(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        tokio::time::sleep(Duration::from_millis(10)).await;
        if self.fail_start {
            return Err(format!("{} cannot open its port", self.name).into());
        }
        self.log.lock().unwrap().push(format!("start {}", self.name));
        Ok(())
    }
    async fn started(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("started {}", self.name));
        Ok(())
    }
    async fn stopping(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("stopping {}", self.name));
        Ok(())
    }
    async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        tokio::time::sleep(self.stop_takes).await;
        self.log.lock().unwrap().push(format!("stop {}", self.name));
        Ok(())
    }
    async fn stopped(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
        self.log.lock().unwrap().push(format!("stopped {}", self.name));
        Ok(())
    }
}

fn builder() -> stevedore::HostBuilder {
    Host::builder().handle_signals(false).read_env(false)
}

/// Runs the host and requests a stop once it has started.
async fn run_then_stop(host: Host) -> stevedore::RunReport {
    let lifetime = host.lifetime();
    let stopper = tokio::spawn(async move {
        if lifetime.started().await {
            lifetime.request_stop();
        }
    });
    let report = host.run().await;
    stopper.await.unwrap();
    report
}

/// Runs the host in a task of its own and waits until it has started.
async fn start(host: Host) -> (AppLifetime, StatusView, tokio::task::JoinHandle<stevedore::RunReport>) {
    let (lifetime, status) = (host.lifetime(), host.status());
    let run = tokio::spawn(host.run());
    assert!(lifetime.started().await, "the host did not start");
    (lifetime, status, run)
}

#[tokio::test(start_paused = true)]
async fn starts_in_order_and_stops_in_reverse_with_all_hooks() {
    let log = log();
    let host = builder()
        .add(ServiceSpec::hosted("a", Recorder::new("a", &log)))
        .add(ServiceSpec::hosted("b", Recorder::new("b", &log)))
        .add(ServiceSpec::hosted("c", Recorder::new("c", &log)))
        .build()
        .unwrap();
    let report = run_then_stop(host).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(
        entries(&log),
        [
            "starting a",
            "starting b",
            "starting c",
            "start a",
            "start b",
            "start c",
            "started a",
            "started b",
            "started c",
            "stopping a",
            "stopping b",
            "stopping c",
            "stop c",
            "stop b",
            "stop a",
            "stopped a",
            "stopped b",
            "stopped c",
        ]
    );
    assert_eq!(report.stop_reason, Some(StopReason::Requested));
    assert!(report.services.iter().all(|s| s.state == ServiceState::Stopped));
}

#[tokio::test(start_paused = true)]
async fn concurrent_start_and_stop_overlap() {
    let log = log();
    let slow = |name| {
        let mut r = Recorder::new(name, &log);
        r.stop_takes = Duration::from_secs(1);
        ServiceSpec::hosted(name, r)
    };
    let host = builder()
        .start_concurrently(true)
        .stop_concurrently(true)
        .add(slow("a"))
        .add(slow("b"))
        .add(slow("c"))
        .build()
        .unwrap();
    let lifetime = host.lifetime();
    let began = Instant::now();
    let watcher = tokio::spawn(async move {
        lifetime.started().await;
        let started_at = Instant::now();
        lifetime.request_stop();
        started_at
    });
    let report = host.run().await;
    let started_at = watcher.await.unwrap();
    assert!(report.is_clean());
    // Each start sleeps 10 ms: concurrently the three take 10 ms, not 30.
    assert_eq!(started_at - began, Duration::from_millis(10));
    // Each stop takes 1 s: concurrently the stop takes 1 s, not 3.
    assert_eq!(report.stop_duration, Duration::from_secs(1));
}

#[tokio::test(start_paused = true)]
async fn sequential_stop_takes_the_sum() {
    let log = log();
    let mut r1 = Recorder::new("a", &log);
    r1.stop_takes = Duration::from_secs(1);
    let mut r2 = Recorder::new("b", &log);
    r2.stop_takes = Duration::from_secs(1);
    let host = builder().add(ServiceSpec::hosted("a", r1)).add(ServiceSpec::hosted("b", r2)).build().unwrap();
    let report = run_then_stop(host).await;
    assert!(report.is_clean());
    assert_eq!(report.stop_duration, Duration::from_secs(2));
}

#[tokio::test(start_paused = true)]
async fn failed_start_stops_the_started_ones_in_reverse_and_names_the_service() {
    let log = log();
    let mut bad = Recorder::new("c", &log);
    bad.fail_start = true;
    let host = builder()
        .add(ServiceSpec::hosted("a", Recorder::new("a", &log)))
        .add(ServiceSpec::hosted("b", Recorder::new("b", &log)))
        .add(ServiceSpec::hosted("c", bad))
        .add(ServiceSpec::hosted("d", Recorder::new("d", &log)))
        .build()
        .unwrap();
    let lifetime = host.lifetime();
    let report = host.run().await;
    assert!(!lifetime.started().await, "started() must report a start that never finished");
    match &report.start_error {
        Some(StartError::Failed { service, message }) => {
            assert_eq!(service, "c");
            assert_eq!(message, "c cannot open its port");
        }
        other => panic!("expected a start failure, got {other:?}"),
    }
    assert_eq!(report.exit_code(), 1);
    let log = entries(&log);
    let after_start: Vec<_> = log.iter().skip_while(|l| *l != "start b").skip(1).cloned().collect();
    assert_eq!(after_start, ["stopping a", "stopping b", "stop b", "stop a", "stopped a", "stopped b"]);
    assert!(!log.iter().any(|l| l.ends_with(" d") && !l.starts_with("starting")), "d never starts: {log:?}");
    assert_eq!(report.services[3].state, ServiceState::Registered);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_blocking_prefix_in_execute_does_not_hold_up_the_start() {
    let (release_tx, release_rx) = std::sync::mpsc::channel::<()>();
    let release_rx = Arc::new(Mutex::new(release_rx));
    let host = builder()
        .add(ServiceSpec::from_fn("blocks-before-first-await", move |ctx| {
            let release_rx = release_rx.clone();
            async move {
                // Blocking code before the first await: in .NET before 10 this held up every later service.
                let _ = release_rx.lock().unwrap().recv_timeout(Duration::from_secs(30));
                ctx.cancelled().await;
                Ok::<_, BoxError>(())
            }
        }))
        .add(ServiceSpec::from_fn("after", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let (lifetime, status, run) = start(host).await;
    assert_eq!(status.service("after").unwrap().state, ServiceState::Running);
    release_tx.send(()).unwrap();
    lifetime.request_stop();
    let report = run.await.unwrap();
    assert!(report.is_clean(), "{}", report.summary());
}

#[tokio::test(start_paused = true)]
async fn an_overrunning_service_is_abandoned_at_the_budget_and_reported() {
    let host = builder()
        .shutdown_timeout(Duration::from_secs(3))
        .add(ServiceSpec::from_fn("stubborn", |_ctx| async move {
            loop {
                tokio::time::sleep(Duration::from_secs(3600)).await;
            }
            #[allow(unreachable_code)]
            Ok::<_, BoxError>(())
        }))
        .add(ServiceSpec::from_fn("polite", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let report = run_then_stop(host).await;
    assert_eq!(report.stop_duration, Duration::from_secs(3), "exactly the budget, not a moment more");
    let abandoned: Vec<_> = report.abandoned().map(|s| s.name.as_str()).collect();
    assert_eq!(abandoned, ["stubborn"]);
    assert_eq!(report.services[1].state, ServiceState::Stopped);
    assert_eq!(report.exit_code(), 2);
    assert!(report.summary().contains("`stubborn` abandoned"), "{}", report.summary());
}

#[tokio::test(start_paused = true)]
async fn the_budget_is_shared_by_the_whole_stop() {
    let log = log();
    let mut a = Recorder::new("a", &log);
    a.stop_takes = Duration::from_secs(2);
    let mut b = Recorder::new("b", &log);
    b.stop_takes = Duration::from_secs(2);
    let host = builder()
        .shutdown_timeout(Duration::from_secs(3))
        .add(ServiceSpec::hosted("a", a))
        .add(ServiceSpec::hosted("b", b))
        .build()
        .unwrap();
    let report = run_then_stop(host).await;
    // b stops in 2 s, leaving 1 s for a, which needs 2: a is abandoned at 3 s.
    assert_eq!(report.stop_duration, Duration::from_secs(3));
    assert_eq!(report.services[0].state, ServiceState::Abandoned);
    assert_eq!(report.services[1].state, ServiceState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn services_after_a_spent_budget_are_abandoned_and_say_why() {
    let log = log();
    let mut slow = Recorder::new("slow", &log);
    slow.stop_takes = Duration::from_secs(60);
    let host = builder()
        .shutdown_timeout(Duration::from_secs(1))
        .add(ServiceSpec::hosted("first", Recorder::new("first", &log)))
        .add(ServiceSpec::hosted("slow", slow))
        .build()
        .unwrap();
    let report = run_then_stop(host).await;
    assert_eq!(report.stop_duration, Duration::from_secs(1));
    assert_eq!(report.services[1].error.as_deref(), Some("overran the shutdown budget and was abandoned"));
    assert_eq!(
        report.services[0].error.as_deref(),
        Some("abandoned: the shutdown budget was spent before its turn to stop")
    );
}

#[tokio::test(start_paused = true)]
async fn restart_backoff_follows_the_policy_then_stops_the_host() {
    let attempts: Log = log();
    let seen = attempts.clone();
    let began = Instant::now();
    let policy = RestartPolicy::default()
        .max_restarts(3)
        .window(Duration::from_secs(60))
        .backoff(Duration::from_millis(100), Duration::from_millis(250))
        .jitter(0.0);
    let host = builder()
        .add(
            ServiceSpec::from_fn("flaky", move |_ctx| {
                let seen = seen.clone();
                async move {
                    seen.lock().unwrap().push(format!("{:?}", began.elapsed()));
                    Err::<(), BoxError>("upstream refused".into())
                }
            })
            .on_failure(OnFailure::Restart(policy)),
        )
        .build()
        .unwrap();
    let status = host.status();
    let report = host.run().await;
    // Delays 100 ms, 200 ms, then 400 ms capped at 250 ms; the fourth failure exceeds the limit.
    assert_eq!(entries(&attempts), ["0ns", "100ms", "300ms", "550ms"]);
    assert_eq!(status.service("flaky").unwrap().restarts, 3);
    assert_eq!(report.stop_reason, Some(StopReason::ServiceFailed("flaky".into())));
    assert_eq!(report.services[0].state, ServiceState::Failed);
    assert!(report.services[0].error.as_deref().unwrap().contains("restart limit of 3"));
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test(start_paused = true)]
async fn jitter_keeps_restart_delays_within_bounds() {
    let policy = RestartPolicy::default().backoff(Duration::from_millis(100), Duration::from_secs(10)).jitter(0.5);
    for n in 1..=6 {
        let full = Duration::from_millis(100) * 2u32.pow(n - 1);
        for r in [0.0, 0.25, 0.5, 0.999] {
            let d = policy.delay(n, r);
            assert!(d <= full && d >= full / 2, "n={n} r={r}: {d:?} not within [{:?}, {full:?}]", full / 2);
        }
    }
}

#[tokio::test(start_paused = true)]
async fn a_panic_is_a_failure_carrying_its_message() {
    let host = builder()
        .add(ServiceSpec::from_fn("panicky", |_ctx| async move {
            tokio::time::sleep(Duration::from_millis(5)).await;
            if true {
                panic!("index out of range in the sync loop");
            }
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let report = host.run().await;
    assert_eq!(report.services[0].state, ServiceState::Failed);
    assert_eq!(report.services[0].error.as_deref(), Some("panicked: index out of range in the sync loop"));
    assert_eq!(report.exit_code(), 1);
}

#[tokio::test(start_paused = true)]
async fn ignore_policy_keeps_the_host_running() {
    let host = builder()
        .add(
            ServiceSpec::from_fn("optional", |_ctx| async move { Err::<(), BoxError>("nope".into()) })
                .on_failure(OnFailure::Ignore),
        )
        .add(ServiceSpec::from_fn("main", |ctx| async move {
            tokio::time::sleep(Duration::from_secs(1)).await;
            ctx.lifetime().request_stop();
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let report = host.run().await;
    assert_eq!(report.stop_reason, Some(StopReason::Requested));
    assert_eq!(report.services[0].state, ServiceState::Failed);
    assert!(report.is_clean(), "an ignored failure does not fail the exit code: {}", report.summary());
}

#[tokio::test(start_paused = true)]
async fn stop_is_idempotent_and_the_first_reason_wins() {
    let host = builder()
        .add(ServiceSpec::from_fn("idle", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let lifetime = host.lifetime();
    let l2 = lifetime.clone();
    tokio::spawn(async move {
        l2.started().await;
        l2.request_stop();
        l2.request_stop();
    });
    let report = host.run().await;
    lifetime.request_stop();
    assert!(report.is_clean());
    assert_eq!(report.stop_reason, Some(StopReason::Requested));
    assert_eq!(lifetime.state(), HostState::Stopped);
}

#[tokio::test(start_paused = true)]
async fn shutdown_delay_waits_before_stopping_while_readiness_already_fails() {
    let host = builder()
        .shutdown_delay(Duration::from_secs(5))
        .add(ServiceSpec::from_fn("idle", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let (lifetime, status, run) = start(host).await;
    assert!(status.readiness().ready);
    let asked = Instant::now();
    lifetime.request_stop();
    let ready = status.readiness();
    assert!(!ready.ready);
    assert_eq!(ready.not_ready[0], ("host".to_string(), "stop requested".to_string()));
    lifetime.stopping().await;
    assert_eq!(asked.elapsed(), Duration::from_secs(5));
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_service_that_finishes_its_work_is_completed() {
    let host =
        builder().add(ServiceSpec::from_fn("warmup", |_ctx| async move { Ok::<_, BoxError>(()) })).build().unwrap();
    let (lifetime, status, run) = start(host).await;
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(status.service("warmup").unwrap().state, ServiceState::Completed);
    lifetime.request_stop();
    let report = run.await.unwrap();
    assert_eq!(report.services[0].state, ServiceState::Completed);
    assert!(report.is_clean());
}

#[tokio::test(start_paused = true)]
async fn heartbeat_silence_makes_the_service_unhealthy() {
    let host = builder()
        .add(
            ServiceSpec::from_fn("stuck", |ctx| async move {
                ctx.heartbeat();
                ctx.cancelled().await;
                Ok::<_, BoxError>(())
            })
            .heartbeat(Duration::from_secs(10)),
        )
        .build()
        .unwrap();
    let (lifetime, status, run) = start(host).await;
    tokio::time::sleep(Duration::from_secs(9)).await;
    assert!(status.readiness().ready);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let r = status.readiness();
    assert!(!r.ready);
    assert_eq!(r.not_ready[0].0, "stuck");
    assert!(r.not_ready[0].1.starts_with("no heartbeat for 11"), "{:?}", r.not_ready);
    lifetime.request_stop();
    run.await.unwrap();
}

#[tokio::test]
async fn build_errors_name_what_is_wrong() {
    let idle = || {
        ServiceSpec::from_fn("same", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        })
    };
    let err = builder().add(idle()).add(idle()).build().unwrap_err();
    assert_eq!(err.to_string(), "service name `same` is registered twice: every service needs a unique name");
    let err = builder().add(idle().invalid("cron expression `61 * * * *` is invalid")).build().unwrap_err();
    assert!(matches!(err, BuildError::InvalidService { .. }));
    assert_eq!(err.to_string(), "service `same`: cron expression `61 * * * *` is invalid");
}

#[tokio::test(start_paused = true)]
async fn startup_timeout_names_the_pending_services() {
    struct Slow;
    impl HostedService for Slow {
        async fn start(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
            tokio::time::sleep(Duration::from_secs(60)).await;
            Ok(())
        }
        async fn stop(&self, _ctx: &ServiceContext) -> Result<(), BoxError> {
            Ok(())
        }
    }
    let host =
        builder().startup_timeout(Duration::from_secs(2)).add(ServiceSpec::hosted("slow", Slow)).build().unwrap();
    let report = host.run().await;
    match report.start_error {
        Some(StartError::TimedOut { timeout, pending }) => {
            assert_eq!(timeout, Duration::from_secs(2));
            assert_eq!(pending, ["slow"]);
        }
        other => panic!("expected a startup timeout, got {other:?}"),
    }
}

#[test]
fn background_services_run_on_the_background_runtime_unless_they_opt_out() {
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("stevedore-bg")
        .enable_all()
        .build()
        .unwrap();
    let host_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("host-rt")
        .enable_all()
        .build()
        .unwrap();
    let seen: Log = log();
    let (s1, s2, watch) = (seen.clone(), seen.clone(), seen.clone());
    let handle = background.handle().clone();
    let report = host_rt.block_on(async move {
        let name = || std::thread::current().name().unwrap_or("?").to_string();
        let host = builder()
            .background_runtime(handle)
            .add(ServiceSpec::from_fn("isolated", move |ctx| {
                let s1 = s1.clone();
                async move {
                    s1.lock().unwrap().push(format!("isolated on {}", name()));
                    ctx.cancelled().await;
                    Ok::<_, BoxError>(())
                }
            }))
            .add(
                ServiceSpec::from_fn("latency-sensitive", move |ctx| {
                    let s2 = s2.clone();
                    async move {
                        s2.lock().unwrap().push(format!("opted out on {}", name()));
                        ctx.cancelled().await;
                        Ok::<_, BoxError>(())
                    }
                })
                .on_host_runtime(),
            )
            .build()
            .unwrap();
        let (lifetime, _, run) = start(host).await;
        while watch.lock().unwrap().len() < 2 {
            tokio::task::yield_now().await;
        }
        lifetime.request_stop();
        run.await.unwrap()
    });
    drop(background);
    assert!(report.is_clean(), "{}", report.summary());
    let mut seen = entries(&seen);
    seen.sort();
    assert_eq!(seen, ["isolated on stevedore-bg", "opted out on host-rt"]);
}

/// A background service that, once cancelled, takes `takes` to wind down and logs when it began and
/// finished winding down.
fn winding_down(name: &'static str, log: &Log, takes: Duration) -> ServiceSpec {
    let log = log.clone();
    ServiceSpec::from_fn(name, move |ctx: ServiceContext| {
        let log = log.clone();
        async move {
            ctx.cancelled().await;
            log.lock().unwrap().push(format!("cancelled {name}"));
            tokio::time::sleep(takes).await;
            log.lock().unwrap().push(format!("stopped {name}"));
            Ok::<_, BoxError>(())
        }
    })
}

#[tokio::test(start_paused = true)]
async fn background_services_stop_one_by_one_in_reverse() {
    let log = log();
    let host = builder()
        .add(winding_down("a", &log, Duration::from_millis(300)))
        .add(winding_down("b", &log, Duration::from_millis(200)))
        .add(winding_down("c", &log, Duration::from_millis(100)))
        .build()
        .unwrap();
    let report = run_then_stop(host).await;
    assert!(report.is_clean(), "{}", report.summary());
    // Each one is asked to stop only once the one registered after it has stopped.
    assert_eq!(entries(&log), ["cancelled c", "stopped c", "cancelled b", "stopped b", "cancelled a", "stopped a"]);
    assert_eq!(report.stop_duration, Duration::from_millis(600));
}

#[tokio::test(start_paused = true)]
async fn a_service_ending_itself_does_not_stop_its_neighbour() {
    let log = log();
    let host = builder()
        .add(winding_down("a", &log, Duration::ZERO))
        .add(ServiceSpec::from_fn("b", |ctx: ServiceContext| async move {
            // Cancels its own token and ends, long before the host stops.
            ctx.token().cancel();
            Ok::<_, BoxError>(())
        }))
        .build()
        .unwrap();
    let (lifetime, status, run) = start(host).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(entries(&log).is_empty(), "a was stopped by its neighbour: {:?}", entries(&log));
    assert_eq!(status.service("a").unwrap().state, ServiceState::Running);
    lifetime.request_stop();
    let report = run.await.unwrap();
    assert_eq!(entries(&log), ["cancelled a", "stopped a"]);
    assert!(report.start_error.is_none());
}
