//! `lifecycle`: start then stop N idle background services, against N bare `tokio::spawn` tasks
//! awaiting a CancellationToken. Each side runs in a fresh child process so memory figures are clean.

use std::process::Command;
use std::time::Instant;

use stevedore::{BoxError, Host, ServiceSpec};
use tokio_util::sync::CancellationToken;

use crate::report::{Figures, median, rss_bytes};

pub fn run(services: usize, runs: usize) -> Figures {
    let (mut time_ratio, mut time_ratio_concurrent, mut extra) = (Vec::new(), Vec::new(), Vec::new());
    let (mut base_ms, mut ours_ms, mut ours_concurrent_ms) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        // Alternate sides so drift on a shared machine hits all three.
        let (bt, bm) = measure_child("baseline", services, false);
        let (st, sm) = measure_child("stevedore", services, false);
        let (ct, _) = measure_child("stevedore", services, true);
        time_ratio.push(st / bt);
        time_ratio_concurrent.push(ct / bt);
        extra.push((sm - bm) / services as f64);
        base_ms.push(bt * 1e3);
        ours_ms.push(st * 1e3);
        ours_concurrent_ms.push(ct * 1e3);
    }
    let mut f = Figures::new(format!("lifecycle: start then stop {services} idle services (median of {runs})"));
    f.add(
        "time_ratio",
        median(time_ratio),
        "Stevedore's start+stop time over the baseline's, default stop (one by one, reverse order)",
    );
    f.add(
        "time_ratio_concurrent",
        median(time_ratio_concurrent),
        "the same with stop_concurrently(true) (every service cancelled at once, as the baseline does)",
    );
    f.add("extra_bytes_per_service", median(extra), "extra resident bytes per idle service over the baseline");
    f.add("baseline_ms", median(base_ms), "baseline: bare spawn + CancellationToken, ms");
    f.add("stevedore_ms", median(ours_ms), "Stevedore host build+start+stop, default stop, ms");
    f.add(
        "stevedore_concurrent_ms",
        median(ours_concurrent_ms),
        "Stevedore host build+start+stop, concurrent stop, ms",
    );
    f.note("Each side runs in a fresh process on a 2-thread runtime; sides alternate within each run.");
    f.note(
        "The default stop cancels each service only when the one after it has stopped, so it pays one \
         hand-off between tasks per service; the baseline cancels everything at once.",
    );
    f
}

fn measure_child(side: &str, n: usize, stop_concurrently: bool) -> (f64, f64) {
    let exe = std::env::current_exe().expect("bench binary path");
    let mut cmd = Command::new(exe);
    cmd.args(["child", side, &n.to_string()]);
    if stop_concurrently {
        cmd.env("STOP_CONCURRENTLY", "1");
    } else {
        cmd.env_remove("STOP_CONCURRENTLY");
    }
    let out = cmd.output().expect("child runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.split_whitespace().map(|v| v.parse::<f64>().unwrap_or(f64::NAN));
    (parts.next().unwrap_or(f64::NAN), parts.next().unwrap_or(f64::NAN))
}

/// One side in this process: prints `seconds rss_delta_bytes`.
pub fn child(side: &str, n: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let (secs, rss) = rt.block_on(async {
        let before = rss_bytes();
        match side {
            "baseline" => baseline(n, before).await,
            _ => stevedore_host(n, before).await,
        }
    });
    println!("{secs} {rss}");
}

async fn baseline(n: usize, before: u64) -> (f64, f64) {
    let began = Instant::now();
    let token = CancellationToken::new();
    let mut handles = Vec::with_capacity(n);
    for _ in 0..n {
        let t = token.child_token();
        handles.push(tokio::spawn(async move { t.cancelled().await }));
    }
    if std::env::var("PHASES").is_ok() {
        eprintln!("spawned {:?}", began.elapsed());
    }
    tokio::task::yield_now().await;
    let rss = rss_bytes().saturating_sub(before) as f64;
    token.cancel();
    for h in handles {
        let _ = h.await;
    }
    (began.elapsed().as_secs_f64(), rss)
}

async fn stevedore_host(n: usize, before: u64) -> (f64, f64) {
    let began = Instant::now();
    let concurrent = std::env::var("STOP_CONCURRENTLY").is_ok();
    let mut builder = Host::builder().handle_signals(false).read_env(false).stop_concurrently(concurrent);
    for i in 0..n {
        builder = builder.add(ServiceSpec::from_fn(format!("idle-{i}"), |ctx| async move {
            ctx.cancelled().await;
            Ok::<_, BoxError>(())
        }));
    }
    if std::env::var("PHASES").is_ok() {
        eprintln!("added {:?}", began.elapsed());
    }
    let host = builder.build().expect("valid host");
    if std::env::var("PHASES").is_ok() {
        eprintln!("build {:?}", began.elapsed());
    }
    let lifetime = host.lifetime();
    let measured = tokio::spawn(async move {
        lifetime.started().await;
        if std::env::var("PHASES").is_ok() {
            eprintln!("started {:?}", began.elapsed());
        }
        tokio::task::yield_now().await;
        let rss = rss_bytes().saturating_sub(before) as f64;
        lifetime.request_stop();
        rss
    });
    let report = host.run().await;
    let elapsed = began.elapsed();
    if std::env::var("PHASES").is_ok() {
        eprintln!("stopped {elapsed:?} (stop itself {:?})", report.stop_duration);
    }
    assert!(report.is_clean(), "{}", report.summary());
    let rss = measured.await.unwrap_or(f64::NAN);
    (elapsed.as_secs_f64(), rss)
}
