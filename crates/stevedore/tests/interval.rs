//! Interval services under tokio's paused clock: schedule, overlap, missed ticks, jitter, trigger,
//! timeout, stop.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stevedore::interval::{IntervalService, Overlap};
use stevedore::{
    BoxError, BuildError, CancellationToken, Host, HostBuilder, RunOutcome, RunReport, ServiceSpec, ServiceState,
    StatusView,
};
use tokio::time::Instant;

fn builder() -> HostBuilder {
    Host::builder().handle_signals(false).read_env(false).shutdown_timeout(Duration::from_secs(60))
}

/// Start times of runs, in whole seconds from the test's start.
#[derive(Clone)]
struct Starts {
    t0: Instant,
    at: Arc<Mutex<Vec<f64>>>,
}

impl Starts {
    fn new() -> Self {
        Starts { t0: Instant::now(), at: Arc::default() }
    }
    /// Records a start and returns how many runs started before it.
    fn record(&self) -> usize {
        let mut at = self.at.lock().unwrap();
        at.push((Instant::now() - self.t0).as_secs_f64());
        at.len() - 1
    }
    fn get(&self) -> Vec<f64> {
        self.at.lock().unwrap().clone()
    }
}

/// A handler that records its start and then takes `took(n)` for the n-th run.
fn timed(
    starts: &Starts,
    took: impl Fn(usize) -> Duration + Clone + Send + Sync + 'static,
) -> impl stevedore::Handler<()> {
    let starts = starts.clone();
    move || {
        let n = starts.record();
        let took = took.clone();
        async move {
            tokio::time::sleep(took(n)).await;
            Ok::<_, BoxError>(())
        }
    }
}

/// Runs the host for `d` of virtual time, then stops it; returns the report and the status view.
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

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

#[tokio::test(start_paused = true)]
async fn fixed_rate_runs_at_start_then_every_period() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("sync", secs(10), timed(&starts, |_| secs(1)));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (report, status) = run_for(host, Duration::from_millis(35_500)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(starts.get(), [0.0, 10.0, 20.0, 30.0]);
    let s = status.service("sync").unwrap();
    assert_eq!(s.kind, "interval");
    assert_eq!(s.state, ServiceState::Stopped);
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.failed, s.runs.skipped), (4, 4, 0, 0));
    assert_eq!(s.runs.last_outcome, Some(RunOutcome::Succeeded));
    assert_eq!(s.runs.last_duration, Some(secs(1)));
    // The last run started at 30 s on the host's clock, about 5.5 s before the snapshot.
    let ago = std::time::SystemTime::now().duration_since(s.runs.last_started.expect("a last start")).unwrap();
    assert!(ago >= Duration::from_millis(5_400) && ago < secs(7), "last start {ago:?} ago");
    assert!(!s.can_trigger, "a stopped timer cannot be triggered");
}

#[tokio::test(start_paused = true)]
async fn initial_delay_shifts_the_grid() {
    let starts = Starts::new();
    let timer =
        IntervalService::fixed_rate("late", secs(10), timed(&starts, |_| Duration::ZERO)).initial_delay(secs(5));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (_, status) = run_for(host, secs(30)).await;
    assert_eq!(starts.get(), [5.0, 15.0, 25.0]);
    assert!(status.service("late").unwrap().runs.next_run.is_none(), "no next run once stopped");
}

#[tokio::test(start_paused = true)]
async fn next_run_is_shown_while_waiting() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("shown", secs(60), timed(&starts, |_| Duration::ZERO));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let status = host.status();
    let lifetime = host.lifetime();
    let task = tokio::spawn(host.run());
    tokio::time::sleep(secs(1)).await;
    let s = status.service("shown").unwrap();
    let next = s.runs.next_run.expect("next run set");
    let ahead = next.duration_since(std::time::SystemTime::now()).unwrap();
    // Due at virtual 60 s and read at virtual 1 s: 59 s ahead of the wall clock at the snapshot.
    assert!(ahead > Duration::from_millis(58_900) && ahead <= secs(59), "{ahead:?}");
    assert!(s.can_trigger);
    lifetime.request_stop();
    assert!(task.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn a_tick_during_a_run_is_skipped_by_default() {
    let starts = Starts::new();
    // The first run takes 25 s: the ticks at 10 and 20 fall during it.
    let took = |n| if n == 0 { secs(25) } else { secs(1) };
    let timer = IntervalService::fixed_rate("skip", secs(10), timed(&starts, took));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (_, status) = run_for(host, secs(55)).await;
    assert_eq!(starts.get(), [0.0, 30.0, 40.0, 50.0], "never overlapping, back on the grid");
    assert_eq!(status.service("skip").unwrap().runs.skipped, 2);
}

#[tokio::test(start_paused = true)]
async fn a_tick_during_a_run_can_be_kept_once() {
    let starts = Starts::new();
    let took = |n| if n == 0 { secs(25) } else { secs(1) };
    let timer = IntervalService::fixed_rate("keep", secs(10), timed(&starts, took)).overlap(Overlap::RunOnce);
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (_, status) = run_for(host, secs(55)).await;
    // Two ticks fell during the long run: one catch-up run at its end, then the grid.
    assert_eq!(starts.get(), [0.0, 25.0, 30.0, 40.0, 50.0]);
    assert_eq!(status.service("keep").unwrap().runs.skipped, 1);
}

#[tokio::test(start_paused = true)]
async fn ticks_missed_while_the_process_was_stalled_fold_into_one_run() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("stalled", secs(10), timed(&starts, |_| Duration::ZERO));
    let host = builder().add(timer.into_spec()).build().unwrap();
    // At 5 s the whole process stalls for 30 s (as under SIGSTOP): ticks 10, 20 and 30 fall due unseen.
    tokio::spawn(async {
        tokio::time::sleep(secs(5)).await;
        tokio::time::advance(secs(30)).await;
    });
    let (_, status) = run_for(host, secs(45)).await;
    assert_eq!(starts.get(), [0.0, 35.0, 40.0], "one late run, no burst, then the grid");
    assert_eq!(status.service("stalled").unwrap().runs.skipped, 2);
}

#[tokio::test(start_paused = true)]
async fn fixed_delay_waits_after_each_run() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_delay("delay", secs(10), timed(&starts, |_| secs(3)));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let _ = run_for(host, secs(45)).await;
    assert_eq!(starts.get(), [0.0, 13.0, 26.0, 39.0]);
}

#[tokio::test(start_paused = true)]
async fn jitter_delays_each_run_within_its_bound_without_drift() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("jitter", secs(10), timed(&starts, |_| Duration::ZERO)).jitter(secs(2));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let _ = run_for(host, Duration::from_millis(199_000)).await;
    let at = starts.get();
    assert_eq!(at.len(), 20);
    for (i, t) in at.iter().enumerate() {
        let grid = 10.0 * i as f64;
        assert!((grid..=grid + 2.0).contains(t), "run {i} at {t}s, outside [{grid}, {}]", grid + 2.0);
    }
    assert!(at.iter().enumerate().any(|(i, t)| *t != 10.0 * i as f64), "jitter moved no run: {at:?}");
}

#[tokio::test(start_paused = true)]
async fn trigger_runs_now_without_moving_the_grid_and_is_kept_once_during_a_run() {
    let starts = Starts::new();
    let took = |n| if n == 1 { secs(10) } else { Duration::ZERO };
    let timer = IntervalService::fixed_rate("report", secs(60), timed(&starts, took));
    let trigger = timer.trigger_handle();
    let host = builder().add(timer.into_spec()).build().unwrap();
    let status = host.status();
    tokio::spawn(async move {
        tokio::time::sleep(secs(5)).await;
        assert!(trigger.trigger()); // run 1, takes 10 s
        tokio::time::sleep(secs(2)).await;
        assert!(trigger.trigger()); // during run 1: kept...
        status.trigger("report").unwrap(); // ...once, however many
    });
    let (_, status) = run_for(host, secs(90)).await;
    assert_eq!(starts.get(), [0.0, 5.0, 15.0, 60.0]);
    assert_eq!(status.service("report").unwrap().runs.started, 4);
}

#[tokio::test(start_paused = true)]
async fn a_run_past_its_timeout_is_recorded_as_timed_out() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("slow", secs(60), timed(&starts, |_| secs(120))).timeout(secs(2));
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (report, status) = run_for(host, secs(10)).await;
    assert!(report.is_clean(), "a failing run is not a failing service: {}", report.summary());
    let s = status.service("slow").unwrap();
    assert_eq!(s.runs.last_outcome, Some(RunOutcome::TimedOut));
    assert_eq!(s.runs.failed, 1);
    assert!(s.runs.last_run_error.unwrap().contains("timeout"));
}

#[tokio::test(start_paused = true)]
async fn errors_and_panics_are_recorded_and_the_timer_goes_on() {
    let n = Arc::new(Mutex::new(0));
    let counter = n.clone();
    let handler = move || {
        let run = {
            let mut n = counter.lock().unwrap();
            *n += 1;
            *n
        };
        async move {
            match run {
                1 => Err::<(), BoxError>("upstream said 503".into()),
                2 => panic!("index out of bounds"),
                _ => Ok(()),
            }
        }
    };
    let host = builder().add(IntervalService::fixed_rate("flaky", secs(10), handler).into_spec()).build().unwrap();
    let (report, status) = run_for(host, secs(25)).await;
    assert!(report.is_clean(), "{}", report.summary());
    let s = status.service("flaky").unwrap();
    assert_eq!((s.runs.started, s.runs.failed, s.runs.succeeded), (3, 2, 1));
    assert!(s.runs.last_run_error.unwrap().contains("index out of bounds"));
    assert_eq!(*n.lock().unwrap(), 3);
}

#[tokio::test(start_paused = true)]
async fn the_hosts_stop_cancels_the_run_in_progress() {
    let saw_stop = Arc::new(Mutex::new(None));
    let seen = saw_stop.clone();
    let t0 = Instant::now();
    let handler = move |stop: CancellationToken| {
        let seen = seen.clone();
        async move {
            tokio::select! {
                _ = stop.cancelled() => { *seen.lock().unwrap() = Some(t0.elapsed()); Ok(()) }
                _ = tokio::time::sleep(secs(3600)) => Err::<(), BoxError>("never stopped".into()),
            }
        }
    };
    let host = builder().add(IntervalService::fixed_rate("long", secs(60), handler).into_spec()).build().unwrap();
    let (report, status) = run_for(host, secs(7)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(*saw_stop.lock().unwrap(), Some(secs(7)));
    assert_eq!(status.service("long").unwrap().runs.succeeded, 1);
}

#[tokio::test(start_paused = true)]
async fn a_stop_during_a_run_that_ignores_it_ends_the_timer_as_the_run_ends() {
    // The stop fires while the run sleeps and does not look at it: the timer must see it as the run
    // ends, not at its next tick a minute later, and run no more. The first run is a second in, so
    // that the timer has waited (and so watched for the stop) before it.
    for cadence in ["fixed rate", "fixed delay"] {
        let starts = Starts::new();
        let handler = timed(&starts, |_| secs(5));
        let timer = match cadence {
            "fixed rate" => IntervalService::fixed_rate("deaf", secs(60), handler),
            _ => IntervalService::fixed_delay("deaf", secs(60), handler),
        };
        let host = builder().add(timer.initial_delay(secs(1)).into_spec()).build().unwrap();
        let t0 = Instant::now();
        let (report, status) = run_for(host, secs(2)).await;
        assert!(report.is_clean(), "{cadence}: {}", report.summary());
        assert_eq!(t0.elapsed(), secs(6), "{cadence}: the host stopped as the run ended");
        assert_eq!(starts.get(), vec![1.0], "{cadence}");
        assert_eq!(status.service("deaf").unwrap().runs.succeeded, 1, "{cadence}");
    }
}

#[tokio::test(start_paused = true)]
async fn each_run_gets_a_fresh_scope() {
    use stevedore::{Scoped, ServiceCollection};
    struct RunId(u32);
    let made = Arc::new(Mutex::new(0u32));
    let counter = made.clone();
    let services = ServiceCollection::new().scoped(move || {
        let counter = counter.clone();
        async move {
            let mut n = counter.lock().unwrap();
            *n += 1;
            Ok::<_, BoxError>(RunId(*n))
        }
    });
    let ids = Arc::new(Mutex::new(Vec::new()));
    let seen = ids.clone();
    let handler = move |id: Scoped<RunId>| {
        let seen = seen.clone();
        async move {
            let id = id.lock().await.0;
            seen.lock().unwrap().push(id);
            Ok::<_, BoxError>(())
        }
    };
    let host = builder()
        .services(services)
        .add(IntervalService::fixed_rate("scoped", secs(10), handler).into_spec())
        .build()
        .unwrap();
    let _ = run_for(host, secs(25)).await;
    assert_eq!(*ids.lock().unwrap(), [1, 2, 3]);
}

#[tokio::test]
async fn a_handler_needing_an_unregistered_type_fails_the_build() {
    use stevedore::Singleton;
    struct ApiClient;
    let handler = |_api: Singleton<ApiClient>| async { Ok::<_, BoxError>(()) };
    let err = builder().add(IntervalService::fixed_rate("sync", secs(60), handler).into_spec()).build().unwrap_err();
    let text = err.to_string();
    assert!(text.contains("sync") && text.contains("ApiClient"), "{text}");
}

#[tokio::test]
async fn a_zero_interval_fails_the_build_naming_the_service() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let err = builder().add(IntervalService::fixed_rate("spin", Duration::ZERO, noop).into_spec()).build().unwrap_err();
    assert!(matches!(&err, BuildError::InvalidService { service, .. } if service == "spin"), "{err}");
    assert!(err.to_string().contains("interval of zero"), "{err}");
    let err =
        builder().add(IntervalService::fixed_rate("wide", secs(10), noop).jitter(secs(10)).into()).build().unwrap_err();
    assert!(err.to_string().contains("`wide`") && err.to_string().contains("jitter"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn a_trigger_after_the_stop_is_refused() {
    let timer = IntervalService::fixed_rate("done", secs(60), || async { Ok::<_, BoxError>(()) });
    let trigger = timer.trigger_handle();
    let spec: ServiceSpec = timer.into();
    let host = builder().add(spec).build().unwrap();
    let _ = run_for(host, secs(1)).await;
    assert!(!trigger.trigger());
}

#[tokio::test(start_paused = true)]
async fn quick_runs_are_in_the_status_view_as_soon_as_the_timer_waits_again() {
    // Runs that end without waiting are written as the service goes back to its timer: the view
    // holds them while the timer is still running, with their start on the host's clock.
    let timer = IntervalService::fixed_rate("quick", secs(10), || async { Ok::<_, BoxError>(()) });
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (status, lifetime) = (host.status(), host.lifetime());
    let run = tokio::spawn(host.run());
    tokio::time::sleep(Duration::from_millis(20_500)).await;
    let s = status.service("quick").unwrap();
    assert_eq!((s.runs.started, s.runs.succeeded, s.runs.in_flight), (3, 3, 0), "runs at 0, 10 and 20 s");
    assert_eq!(s.runs.last_outcome, Some(RunOutcome::Succeeded));
    assert!(s.runs.last_duration.unwrap() < Duration::from_millis(100), "{:?}", s.runs.last_duration);
    let ago = std::time::SystemTime::now().duration_since(s.runs.last_started.expect("a last start")).unwrap();
    assert!(ago >= Duration::from_millis(400) && ago < secs(2), "last start {ago:?} ago");
    let ahead = s.runs.next_run.expect("a next run").duration_since(std::time::SystemTime::now()).unwrap();
    assert!(ahead > secs(9) && ahead <= secs(10), "next run in {ahead:?}");
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

#[tokio::test(start_paused = true)]
async fn spread_phase_moves_the_grid_by_an_offset_below_the_period() {
    let starts = Starts::new();
    let timer = IntervalService::fixed_rate("report", secs(10), timed(&starts, |_| Duration::ZERO)).spread_phase();
    let phase = timer.phase();
    assert!(phase > Duration::ZERO && phase < secs(10), "phase {phase:?}");
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (report, _) = run_for(host, Duration::from_millis(30_500)).await;
    assert!(report.is_clean(), "{}", report.summary());
    let p = phase.as_secs_f64();
    let expected: Vec<f64> = (0..3).map(|k| p + 10.0 * f64::from(k)).collect();
    let got = starts.get();
    assert_eq!(got.len(), 3, "{got:?}");
    for (g, e) in got.iter().zip(&expected) {
        assert!((g - e).abs() < 0.002, "starts {got:?}, expected {expected:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn spread_phase_comes_after_the_initial_delay_and_is_the_same_for_the_same_name() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let once = IntervalService::fixed_rate("nightly-report", secs(60), noop).spread_phase().phase();
    let again = IntervalService::fixed_rate("nightly-report", secs(60), noop).spread_phase().phase();
    assert_eq!(once, again, "the same name and period give the same offset");
    let starts = Starts::new();
    let timer = IntervalService::fixed_delay("nightly-report", secs(60), timed(&starts, |_| secs(1)))
        .initial_delay(secs(100))
        .spread_phase();
    assert_eq!(timer.phase(), once, "the cadence does not change the offset");
    let host = builder().add(timer.into_spec()).build().unwrap();
    let (report, _) = run_for(host, secs(220)).await;
    assert!(report.is_clean(), "{}", report.summary());
    let first = 100.0 + once.as_secs_f64();
    let got = starts.get();
    assert!((got[0] - first).abs() < 0.002, "first start {got:?}, expected {first}");
    assert!((got[1] - (first + 61.0)).abs() < 0.002, "fixed delay after the phase: {got:?}");
}

#[test]
fn many_services_with_one_period_spread_over_it() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let period = Duration::from_millis(100);
    // 10,000 names as a host of many timers might have: the offsets fill the period's 100
    // milliseconds about evenly (about 100 in each), where without spreading all would share one.
    let mut per_ms = [0u32; 100];
    for i in 0..10_000 {
        let phase = IntervalService::fixed_rate(format!("timer-{i}"), period, noop).spread_phase().phase();
        assert!(phase < period);
        per_ms[phase.as_millis() as usize] += 1;
    }
    let (min, max) = (per_ms.iter().min().unwrap(), per_ms.iter().max().unwrap());
    assert!(*min >= 60 && *max <= 140, "offsets per millisecond from {min} to {max}: {per_ms:?}");
}

#[tokio::test(start_paused = true)]
async fn delays_past_what_the_clock_holds_mean_never_not_a_panic() {
    let starts = Starts::new();
    let far = IntervalService::fixed_rate("far", Duration::MAX, timed(&starts, |_| Duration::ZERO))
        .initial_delay(Duration::MAX)
        .spread_phase();
    let later = IntervalService::fixed_delay("later", Duration::MAX, timed(&starts, |_| Duration::ZERO))
        .jitter(Duration::MAX)
        .initial_delay(Duration::MAX);
    let host = builder().shutdown_timeout(Duration::MAX).add(far.into_spec()).add(later.into_spec()).build().unwrap();
    let (report, status) = run_for(host, secs(3600)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert!(starts.get().is_empty(), "no run is due in this process's life: {:?}", starts.get());
    for name in ["far", "later"] {
        let s = status.service(name).unwrap();
        assert_eq!(s.state, ServiceState::Stopped, "{name}: {s:?}");
    }
}

// The tick driver: every interval service's runs start from a few shared tasks per runtime, not
// from a timer of each service's own.

#[tokio::test(start_paused = true)]
async fn thousands_of_services_each_run_on_their_own_grid() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let mut builder = builder();
    for i in 0..3_000 {
        // Three phases (0, 30 and 60 ms) and two periods (100 and 200 ms), so that the shared
        // heap interleaves services that fall due at different times.
        let period = Duration::from_millis(if i % 2 == 0 { 100 } else { 200 });
        let timer = IntervalService::fixed_rate(format!("timer-{i}"), period, noop)
            .initial_delay(Duration::from_millis(30 * (i % 3)));
        builder = builder.add(timer.into_spec());
    }
    let host = builder.build().unwrap();
    // Stopped at 1,010 ms: runs at phase + k * period up to then.
    let (report, status) = run_for(host, Duration::from_millis(1_010)).await;
    assert!(report.is_clean(), "{}", report.summary());
    for i in 0..3_000u64 {
        let runs = status.service(&format!("timer-{i}")).unwrap().runs;
        let (period, phase) = (if i % 2 == 0 { 100 } else { 200 }, 30 * (i % 3));
        let expected = (1_010 - phase).div_ceil(period);
        assert_eq!((runs.started, runs.succeeded, runs.skipped), (expected, expected, 0), "timer-{i}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_run_that_waits_holds_up_no_other_service() {
    let (slow, quick) = (Starts::new(), Starts::new());
    // Each slow run waits 25 s; the quick service's runs on the same driver keep their grid.
    let slow_timer = IntervalService::fixed_rate("slow", secs(10), timed(&slow, |_| secs(25)));
    let quick_timer = IntervalService::fixed_rate("quick", secs(1), timed(&quick, |_| Duration::ZERO));
    let host = builder().add(slow_timer.into_spec()).add(quick_timer.into_spec()).build().unwrap();
    let (_, status) = run_for(host, Duration::from_millis(60_500)).await;
    assert_eq!(slow.get(), [0.0, 30.0, 60.0]);
    assert_eq!(quick.get(), (0..=60).map(f64::from).collect::<Vec<_>>());
    assert_eq!(status.service("slow").unwrap().runs.skipped, 4);
}

#[tokio::test(start_paused = true)]
async fn hosts_on_one_runtime_come_and_go_without_disturbing_each_other() {
    let (a, b, c) = (Starts::new(), Starts::new(), Starts::new());
    let host_a =
        builder().add(IntervalService::fixed_rate("a", secs(1), timed(&a, |_| Duration::ZERO)).into_spec()).build();
    let host_b =
        builder().add(IntervalService::fixed_rate("b", secs(1), timed(&b, |_| Duration::ZERO)).into_spec()).build();
    let (host_a, host_b) = (host_a.unwrap(), host_b.unwrap());
    let both =
        tokio::join!(run_for(host_a, Duration::from_millis(3_500)), run_for(host_b, Duration::from_millis(6_500)));
    assert!(both.0.0.is_clean() && both.1.0.is_clean());
    assert_eq!(a.get(), [0.0, 1.0, 2.0, 3.0], "a stops at 3.5 s");
    assert_eq!(b.get(), [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0], "b goes on after a has stopped");
    // Every service on the runtime has stopped; a new host's services start the driver again.
    let host_c =
        builder().add(IntervalService::fixed_rate("c", secs(1), timed(&c, |_| Duration::ZERO)).into_spec()).build();
    let (report, _) = run_for(host_c.unwrap(), Duration::from_millis(2_500)).await;
    assert!(report.is_clean(), "{}", report.summary());
    let t = (Instant::now() - c.t0).as_secs_f64();
    assert_eq!(c.get(), [t - 2.5, t - 1.5, t - 0.5]);
}

/// The task each run of a service ran in.
fn task_ids(
    record: Arc<Mutex<Vec<tokio::task::Id>>>,
    compute: Duration,
) -> impl Fn() -> std::future::Ready<Result<(), BoxError>> + Clone + Send + Sync + 'static {
    move || {
        record.lock().unwrap().push(tokio::task::id());
        // Work done before the run's first await, as a handler that computes in place does.
        std::thread::sleep(compute);
        std::future::ready(Ok(()))
    }
}

// The real clock: what moves a service off the driver is how long its runs' first steps really take.
#[tokio::test]
async fn a_service_whose_runs_compute_before_their_first_await_moves_to_its_own_task() {
    let (heavy, light) = (Arc::new(Mutex::new(Vec::new())), Arc::new(Mutex::new(Vec::new())));
    let period = Duration::from_millis(20);
    let heavy_timer = IntervalService::fixed_rate("heavy", period, task_ids(heavy.clone(), Duration::from_millis(5)));
    let light_timer = IntervalService::fixed_rate("light", period, task_ids(light.clone(), Duration::ZERO));
    let host = builder().add(heavy_timer.into_spec()).add(light_timer.into_spec()).build().unwrap();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    // Wait for four runs of the heavy service and three of the light, however long this machine takes for them.
    while heavy.lock().unwrap().len() < 4 || light.lock().unwrap().len() < 3 {
        tokio::time::sleep(period).await;
    }
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
    let (heavy, light) = (heavy.lock().unwrap().clone(), light.lock().unwrap().clone());
    // The light service's runs all start in the driver's task (on a one-thread runtime, one shard)...
    assert!(light.iter().all(|id| *id == light[0]), "light runs in one task: {light:?}");
    // ...as did the heavy one's first two, which took 5 ms there each; after them, each starts in
    // the heavy service's own task.
    assert!(heavy[..2].iter().all(|id| *id == light[0]), "first heavy runs on the driver: {heavy:?} {light:?}");
    assert!(heavy[2..].iter().all(|id| *id == heavy[2] && *id != light[0]), "then its own task: {heavy:?}");
}

// The real clock: the driver gives the thread away after a stretch of runs, by time.
#[tokio::test]
async fn a_burst_of_due_runs_does_not_hold_the_thread_until_it_ends() {
    const SERVICES: usize = 2_000;
    let ran = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut builder = builder();
    for i in 0..SERVICES {
        let ran = ran.clone();
        // All due at the start; each run computes for 20 µs, so the burst takes 40 ms or more.
        let handler = move || {
            ran.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let began = std::time::Instant::now();
            while began.elapsed() < Duration::from_micros(20) {
                std::hint::spin_loop();
            }
            std::future::ready(Ok::<_, BoxError>(()))
        };
        builder = builder.add(IntervalService::fixed_rate(format!("busy-{i}"), secs(3600), handler).into_spec());
    }
    let host = builder.build().unwrap();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    // Another task on this one-thread runtime, as a request handler would be: it gets the thread
    // while the burst is still going.
    let seen = loop {
        let seen = ran.load(std::sync::atomic::Ordering::Relaxed);
        if seen > 0 {
            break seen;
        }
        tokio::task::yield_now().await;
    };
    assert!(seen < SERVICES / 2, "another task ran only after {seen} of {SERVICES} runs");
    while ran.load(std::sync::atomic::Ordering::Relaxed) < SERVICES {
        tokio::task::yield_now().await;
    }
    lifetime.request_stop();
    assert!(run.await.unwrap().is_clean());
}

/// What a `fmt` subscriber writes, kept for the test to read.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(start_paused = true)]
async fn runs_started_by_the_driver_log_inside_their_service_span() {
    let captured = Captured::default();
    let writer = captured.clone();
    let subscriber = tracing_subscriber::fmt().with_ansi(false).with_writer(move || writer.clone()).finish();
    let _default = tracing::subscriber::set_default(subscriber);
    // One run that ends at its first poll (on the driver), one that waits (finished in its task).
    let quick = IntervalService::fixed_rate("quick", secs(10), || async {
        tracing::info!("quick run");
        Ok::<_, BoxError>(())
    });
    let slow = IntervalService::fixed_rate("slow", secs(10), || async {
        tokio::time::sleep(secs(1)).await;
        tracing::info!("slow run");
        Ok::<_, BoxError>(())
    });
    let host = builder().add(quick.into_spec()).add(slow.into_spec()).build().unwrap();
    run_for(host, secs(5)).await;
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    for name in ["quick", "slow"] {
        let line = text.lines().find(|l| l.contains(&format!("{name} run"))).unwrap_or_else(|| panic!("{text}"));
        assert!(
            line.contains(&format!("service{{service=\"{name}\"}}:run{{service=\"{name}\" cause=\"tick\"}}")),
            "{line}"
        );
    }
}
