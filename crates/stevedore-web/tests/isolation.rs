//! The background runtime: its threads run at the lowered OS priority, isolated services run there
//! with the usual cancellation and failure handling, and CPU work is bounded.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use stevedore::{Host, OnFailure, ServiceSpec, ServiceState};
use stevedore_web::isolation::{BackgroundRuntime, CpuError, IsolationError, Priority};
use stevedore_web::{WebHostExt, WebServer};

/// (nice, scheduling policy) of the calling thread, from /proc (Linux).
fn sched_of_this_thread() -> (i64, i64) {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").expect("procfs");
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = &stat[stat.rfind(')').expect("a command name") + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| fields[n - 3].parse::<i64>().expect("a number");
    (field(19), field(41))
}

const SCHED_OTHER: i64 = 0;
const SCHED_IDLE: i64 = 5;

#[tokio::test]
async fn worker_and_blocking_threads_run_at_nice_19() {
    let before = sched_of_this_thread();
    let bg = BackgroundRuntime::builder().threads(1).name("bg-nice").build().expect("a runtime");
    assert_eq!(bg.priority(), Priority::Lowest);
    let on_worker = bg.handle().spawn(async { sched_of_this_thread() }).await.expect("joined");
    assert_eq!(on_worker, (19, SCHED_OTHER));
    let on_blocking = bg.run_cpu(sched_of_this_thread).await.expect("ran");
    assert_eq!(on_blocking, (19, SCHED_OTHER));
    // The caller's own thread is untouched.
    assert_eq!(sched_of_this_thread(), before);
}

#[tokio::test]
async fn sched_idle_can_be_chosen() {
    let bg = BackgroundRuntime::builder().threads(1).priority(Priority::Idle).build().expect("a runtime");
    let on_worker = bg.handle().spawn(async { sched_of_this_thread() }).await.expect("joined");
    assert_eq!(on_worker.1, SCHED_IDLE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolated_services_run_on_the_background_runtime_and_stop_with_the_host() {
    let bg = BackgroundRuntime::builder().threads(1).name("bg-iso").build().expect("a runtime");
    let (tx, rx) = tokio::sync::oneshot::channel();
    let tx = std::sync::Mutex::new(Some(tx));
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(bg.from_fn("iso-worker", move |ctx| {
            let thread = std::thread::current().name().map(str::to_string);
            let sched = sched_of_this_thread();
            if let Some(tx) = tx.lock().expect("unpoisoned").take() {
                let _ = tx.send((thread, sched));
            }
            async move {
                ctx.cancelled().await;
                Ok::<_, std::convert::Infallible>(())
            }
        }))
        .add(ServiceSpec::from_fn("iso-stay", |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, std::convert::Infallible>(())
        }))
        .build()
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let (thread, sched) = rx.await.expect("the service ran");
    assert_eq!(thread.as_deref(), Some("bg-iso"));
    assert_eq!(sched.0, 19);
    lifetime.request_stop();
    let report = run.await.expect("joined");
    assert!(!report.forced && report.start_error.is_none());
    assert_eq!(status.service("iso-worker").expect("registered").state, ServiceState::Stopped);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_on_the_background_runtime_is_the_services_failure() {
    let bg = BackgroundRuntime::builder().threads(1).build().expect("a runtime");
    let host = Host::builder()
        .handle_signals(false)
        .read_env(false)
        .add(
            bg.from_fn("iso-panics", |_ctx| async move {
                if true {
                    panic!("boom on the background runtime");
                }
                Ok::<_, std::convert::Infallible>(())
            })
            .on_failure(OnFailure::Ignore),
        )
        .build()
        .expect("valid host");
    let status = host.status();
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while status.service("iso-panics").expect("registered").state != ServiceState::Failed {
        assert!(tokio::time::Instant::now() < deadline, "the panic was not reported");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let error = status.service("iso-panics").and_then(|s| s.last_error).unwrap_or_default();
    assert!(error.contains("boom on the background runtime"), "{error}");
    lifetime.request_stop();
    run.await.expect("joined");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_work_is_bounded_and_panics_are_errors() {
    let bg = BackgroundRuntime::builder().threads(1).cpu_concurrency(2).build().expect("a runtime");
    let running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..6u64)
        .map(|i| {
            let (bg, running, most) = (bg.clone(), running.clone(), most.clone());
            tokio::spawn(async move {
                bg.run_cpu(move || {
                    let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    let sum = (0..2_000_000u64).fold(i, |a, x| a.wrapping_add(x ^ i));
                    running.fetch_sub(1, Ordering::SeqCst);
                    (i, sum)
                })
                .await
            })
        })
        .collect();
    for (i, task) in tasks.into_iter().enumerate() {
        let (got, _) = task.await.expect("joined").expect("ran");
        assert_eq!(got, i as u64);
    }
    let most = most.load(Ordering::SeqCst);
    assert!((1..=2).contains(&most), "{most} CPU tasks ran at once with a limit of 2");
    match bg.run_cpu(|| -> u32 { panic!("cpu boom") }).await {
        Err(CpuError::Panicked(m)) => assert!(m.contains("cpu boom"), "{m}"),
        other => panic!("expected a panic error, got {other:?}"),
    }
}

#[test]
fn zero_threads_is_refused() {
    match BackgroundRuntime::builder().threads(0).name("bg-zero").build() {
        Err(e @ IsolationError::Zero { .. }) => assert!(e.to_string().contains("bg-zero"), "{e}"),
        other => panic!("expected an error, got {other:?}"),
    }
}

/// Where a service's `execute` ran: its thread's name and (nice, policy).
type Placement = (Option<String>, (i64, i64));

/// A service that reports where its `execute` runs, then waits for the stop.
fn reporting(name: &str, tx: tokio::sync::mpsc::UnboundedSender<(String, Placement)>) -> ServiceSpec {
    let name_owned = name.to_string();
    ServiceSpec::from_fn(name, move |ctx| {
        let placement = (std::thread::current().name().map(str::to_string), sched_of_this_thread());
        let _ = tx.send((name_owned.clone(), placement));
        async move {
            ctx.cancelled().await;
            Ok::<_, std::convert::Infallible>(())
        }
    })
}

fn web() -> WebServer {
    WebServer::new(axum::Router::new()).bind("127.0.0.1:0").admin_token(None).metrics(false)
}

/// Runs `builder` with `web` until both reporting services reported, then stops it.
async fn placements(builder: stevedore::HostBuilder, web: WebServer) -> HashMap<String, Placement> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let host = builder
        .handle_signals(false)
        .read_env(false)
        .add(reporting("bg-default", tx.clone()))
        .add(reporting("bg-opted-out", tx).on_host_runtime())
        .build_web(web)
        .expect("valid host");
    let lifetime = host.lifetime();
    let run = tokio::spawn(host.run());
    let mut seen = HashMap::new();
    while seen.len() < 2 {
        let (name, placement) = rx.recv().await.expect("both services report");
        seen.insert(name, placement);
    }
    lifetime.request_stop();
    let report = run.await.expect("joined");
    assert!(!report.forced && report.start_error.is_none(), "{report:?}");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_web_isolates_background_services_by_default() {
    let host_thread = sched_of_this_thread();
    let seen = placements(Host::builder(), web()).await;
    let (thread, sched) = &seen["bg-default"];
    assert_eq!(thread.as_deref(), Some("stevedore-bg"), "ran on the default background runtime");
    assert_eq!(*sched, (19, SCHED_OTHER));
    let (thread, sched) = &seen["bg-opted-out"];
    assert_ne!(thread.as_deref(), Some("stevedore-bg"), "the opted-out service stayed on the host's runtime");
    assert_eq!(*sched, host_thread, "at the host's own priority");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn isolation_can_be_turned_off_for_every_service() {
    let host_thread = sched_of_this_thread();
    let seen = placements(Host::builder(), web().isolation(false)).await;
    for name in ["bg-default", "bg-opted-out"] {
        let (thread, sched) = &seen[name];
        assert_ne!(thread.as_deref(), Some("stevedore-bg"), "{name}");
        assert_eq!(*sched, host_thread, "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runtime_set_on_the_builder_is_kept() {
    let own = BackgroundRuntime::builder().threads(1).priority(Priority::Idle).name("bg-builder").build().expect("rt");
    let seen = placements(Host::builder().background_runtime(own.handle().clone()), web()).await;
    let (thread, sched) = &seen["bg-default"];
    assert_eq!(thread.as_deref(), Some("bg-builder"));
    assert_eq!(sched.1, SCHED_IDLE);
}

/// How many threads of this process carry `name`.
fn threads_named(name: &str) -> usize {
    std::fs::read_dir("/proc/self/task")
        .expect("procfs")
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .filter(|comm| comm.trim_end() == name)
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_given_runtime_is_used_kept_for_the_run_and_shut_down_after() {
    let given = BackgroundRuntime::builder().threads(2).name("bg-given").build().expect("a runtime");
    let host_thread = sched_of_this_thread();
    let web = web().background(given.clone());
    drop(given); // the host now holds the only clone
    // Worker threads start asynchronously after the build.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while threads_named("bg-given") < 2 {
        assert!(tokio::time::Instant::now() < deadline, "the background runtime's threads did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let seen = placements(Host::builder(), web).await;
    assert_eq!(seen["bg-default"].0.as_deref(), Some("bg-given"));
    assert_eq!(seen["bg-default"].1, (19, SCHED_OTHER));
    assert_eq!(seen["bg-opted-out"].1, host_thread);
    // The host was dropped at the end of its run, inside this async test (no panic), and took the
    // runtime with it: its threads exit.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while threads_named("bg-given") > 0 {
        assert!(tokio::time::Instant::now() < deadline, "the background runtime's threads are still alive");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[test]
fn a_default_runtime_that_cannot_be_built_fails_the_build_naming_the_server() {
    let err = Host::builder().build_web(web().name("front").background_threads(0)).expect_err("zero threads");
    let text = err.to_string();
    assert!(text.contains("front") && text.contains("at least one thread"), "{text}");
}
