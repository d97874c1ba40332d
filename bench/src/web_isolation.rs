//! `web-isolation`: request latency of an axum endpoint under fixed-rate load while CPU-bound
//! background work runs (a) not at all, (b) on the web's runtime, as ASP.NET Core runs it, and
//! (c) on Stevedore's background runtime at nice 19 (and, for the record, at `SCHED_IDLE`).
//!
//! The background work is as many tasks as there are cores, each computing for about 20 ms between
//! awaits (a report job, say). Its throughput is the number of 20 ms chunks finished per second; its
//! share is (c)'s throughput under web load over its throughput with no web load at all.
//!
//! The load comes from `oha` (open loop at a fixed rate, with latency correction for coordinated
//! omission) when it is on the PATH, else from Debian's `wrk` (closed loop: it cannot hold a rate,
//! so its request rate is part of the result). Every request goes to 127.0.0.1 only.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Router;
use axum::routing::get;
use serde_json::{Value, json};
use stevedore::{Host, ServiceSpec};
use stevedore_web::isolation::{BackgroundRuntime, Priority};
use stevedore_web::{WebHostExt, WebServer};

/// How long each chunk of background work computes before it yields.
const CHUNK: Duration = Duration::from_millis(20);

/// Settings of the `web-isolation` scenario.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long each measurement runs.
    pub duration: Duration,
    /// Requests per second the open-loop load aims at (oha only).
    pub rate: u32,
    /// Concurrent connections of the load tool.
    pub connections: u32,
    /// Worker threads of the web runtime (default: the number of cores, as `#[tokio::main]`).
    pub web_threads: usize,
    /// Rounds over every scenario; each figure is the median over the rounds, so one noisy moment
    /// on a shared machine does not decide the result.
    pub rounds: usize,
    /// Worker threads of the isolated background runtime (default: half the cores, at least one,
    /// as `BackgroundRuntime::builder()` has it).
    pub background_threads: usize,
}

impl Default for Options {
    fn default() -> Self {
        let cores = cores();
        Options {
            duration: Duration::from_secs(10),
            rate: 1000,
            connections: 16,
            web_threads: cores,
            rounds: 3,
            background_threads: (cores / 2).max(1),
        }
    }
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Placement {
    /// No background work.
    None,
    /// Background tasks spawned on the web's own runtime.
    Shared,
    /// Background tasks on a separate runtime at this priority.
    Isolated(Priority),
}

impl Placement {
    fn label(self) -> &'static str {
        match self {
            Placement::None => "a: no background work",
            Placement::Shared => "b: background on the web runtime",
            Placement::Isolated(Priority::Lowest) => "c: isolated, nice 19",
            Placement::Isolated(Priority::Idle) => "c': isolated, SCHED_IDLE",
            Placement::Isolated(Priority::Normal) => "isolated, normal priority",
        }
    }
}

/// What one load run measured.
#[derive(Debug, Clone, Default)]
struct Load {
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    rps: f64,
    errors: u64,
}

/// Runs the scenario and returns its figures (`p99_ratio_shared`, `p99_ratio_isolated`,
/// `background_share`, and every measurement) as JSON; prints a table on the way.
pub fn run(opts: &Options) -> Result<Value, String> {
    let tool = LoadTool::find()?;
    println!(
        "web-isolation: {} cores (load average {}), web runtime {} threads, background runtime {} threads, \
         {} background tasks x {:?} chunks, load: {} for {:?}{}",
        cores(),
        load_average(),
        opts.web_threads,
        opts.background_threads,
        cores(),
        CHUNK,
        tool.name(),
        opts.duration,
        if matches!(tool, LoadTool::Oha) { format!(" at {} req/s", opts.rate) } else { " (closed loop)".into() },
    );
    let placements = [
        Placement::None,
        Placement::Shared,
        Placement::Isolated(Priority::Lowest),
        Placement::Isolated(Priority::Idle),
    ];
    let rounds = opts.rounds.max(1);
    let mut alone = (Vec::new(), Vec::new());
    let mut samples: Vec<Vec<(Load, f64)>> = vec![Vec::new(); placements.len()];
    for round in 1..=rounds {
        alone.0.push(background_alone(opts, Priority::Lowest)?);
        alone.1.push(background_alone(opts, Priority::Idle)?);
        for (i, placement) in placements.iter().enumerate() {
            let (load, background) = measure(opts, &tool, *placement)?;
            println!(
                "  round {round}/{rounds} {:<36} p99 {:>8.3} ms  {:>8.1} req/s  background {:>6.1} chunks/s",
                placement.label(),
                load.p99_ms,
                load.rps,
                background
            );
            samples[i].push((load, background));
        }
    }
    let alone_nice = median(alone.0);
    let alone_idle = median(alone.1);
    println!("background alone: nice 19 {alone_nice:.1} chunks/s, SCHED_IDLE {alone_idle:.1} chunks/s");
    let mut rows = Vec::new();
    for (placement, runs) in placements.iter().copied().zip(samples) {
        let pick = |f: fn(&(Load, f64)) -> f64| median(runs.iter().map(f).collect());
        let load = Load {
            p50_ms: pick(|r| r.0.p50_ms),
            p99_ms: pick(|r| r.0.p99_ms),
            p999_ms: pick(|r| r.0.p999_ms),
            rps: pick(|r| r.0.rps),
            errors: runs.iter().map(|r| r.0.errors).sum(),
        };
        let background = pick(|r| r.1);
        println!(
            "{:<36} p50 {:>8.3} ms  p99 {:>8.3} ms  p99.9 {:>8.3} ms  {:>8.1} req/s  errors {:>4}  background {:>6.1} chunks/s",
            placement.label(),
            load.p50_ms,
            load.p99_ms,
            load.p999_ms,
            load.rps,
            load.errors,
            background
        );
        rows.push((placement, load, background));
    }
    let find = |p: Placement| rows.iter().find(|r| r.0 == p).cloned().ok_or("a scenario did not run");
    let (_, a, _) = find(Placement::None)?;
    let (_, b, b_bg) = find(Placement::Shared)?;
    let (_, c, c_bg) = find(Placement::Isolated(Priority::Lowest))?;
    let (_, ci, ci_bg) = find(Placement::Isolated(Priority::Idle))?;
    let ratio = |x: f64, y: f64| if y > 0.0 { x / y } else { f64::NAN };
    println!("load average at the end: {}", load_average());
    let figures = json!({
        "p99_ratio_shared": ratio(b.p99_ms, a.p99_ms),
        "p99_ratio_isolated": ratio(c.p99_ms, a.p99_ms),
        "background_share": ratio(c_bg, alone_nice),
        "p99_ratio_isolated_sched_idle": ratio(ci.p99_ms, a.p99_ms),
        "background_share_sched_idle": ratio(ci_bg, alone_idle),
        "background_share_shared": ratio(b_bg, alone_nice),
        "tool": tool.name(),
        "rate": opts.rate,
        "rounds": rounds,
        "web_threads": opts.web_threads,
        "background_threads": opts.background_threads,
        "duration_s": opts.duration.as_secs_f64(),
        "cores": cores(),
        "scenarios": rows.iter().map(|(p, l, bg)| json!({
            "scenario": p.label(),
            "p50_ms": l.p50_ms, "p99_ms": l.p99_ms, "p999_ms": l.p999_ms,
            "rps": l.rps, "errors": l.errors, "background_chunks_per_s": bg,
        })).collect::<Vec<_>>(),
        "background_alone_chunks_per_s": { "nice19": alone_nice, "sched_idle": alone_idle },
    });
    println!(
        "p99_ratio_shared {:.2}  p99_ratio_isolated {:.2} (target <= 1.5)  background_share {:.2} (target >= 0.6)",
        figures["p99_ratio_shared"].as_f64().unwrap_or(f64::NAN),
        figures["p99_ratio_isolated"].as_f64().unwrap_or(f64::NAN),
        figures["background_share"].as_f64().unwrap_or(f64::NAN),
    );
    Ok(figures)
}

/// The machine's 1/5/15-minute load average: other work on a shared machine skews latency.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// A CPU-bound "report job": `cores` tasks, each computing for [`CHUNK`] between awaits.
fn report_job(chunks: Arc<AtomicU64>) -> impl Fn(stevedore::ServiceContext) -> ReportFuture + Send + Sync + 'static {
    move |ctx| {
        let chunks = chunks.clone();
        Box::pin(async move {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..cores() {
                let (ctx, chunks) = (ctx.clone(), chunks.clone());
                tasks.spawn(async move {
                    let mut x = 0x9E37_79B9_7F4A_7C15u64;
                    while !ctx.is_cancelled() {
                        let started = Instant::now();
                        while started.elapsed() < CHUNK {
                            for _ in 0..1000 {
                                x = std::hint::black_box(x.rotate_left(7) ^ x.wrapping_mul(0x2545_F491_4F6C_DD1D));
                            }
                        }
                        chunks.fetch_add(1, Ordering::Relaxed);
                        tokio::task::yield_now().await;
                    }
                });
            }
            ctx.cancelled().await;
            tasks.shutdown().await;
            Ok(())
        })
    }
}

type ReportFuture =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), std::convert::Infallible>> + Send + 'static>>;

fn web_runtime(threads: usize) -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .thread_name("web")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot build the web runtime: {e}"))
}

fn background_runtime(opts: &Options, priority: Priority) -> Result<BackgroundRuntime, String> {
    BackgroundRuntime::builder()
        .threads(opts.background_threads)
        .priority(priority)
        .name("bench-bg")
        .build()
        .map_err(|e| e.to_string())
}

/// The background work's throughput with no web load at all, on the isolated runtime.
fn background_alone(opts: &Options, priority: Priority) -> Result<f64, String> {
    let rt = web_runtime(opts.web_threads)?;
    let bg = background_runtime(opts, priority)?;
    let chunks = Arc::new(AtomicU64::new(0));
    rt.block_on(async {
        let host = Host::builder()
            .handle_signals(false)
            .read_env(false)
            .add(bg.from_fn("report", report_job(chunks.clone())))
            .build()
            .map_err(|e| e.to_string())?;
        let lifetime = host.lifetime();
        let running = tokio::spawn(host.run());
        lifetime.started().await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = chunks.load(Ordering::Relaxed);
        let started = Instant::now();
        tokio::time::sleep(opts.duration).await;
        let rate = (chunks.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
        lifetime.request_stop();
        let _ = running.await;
        Ok(rate)
    })
}

/// One scenario: the host with the web server and (maybe) the background work, under load.
fn measure(opts: &Options, tool: &LoadTool, placement: Placement) -> Result<(Load, f64), String> {
    let rt = web_runtime(opts.web_threads)?;
    let chunks = Arc::new(AtomicU64::new(0));
    let bg = match placement {
        Placement::Isolated(p) => Some(background_runtime(opts, p)?),
        _ => None,
    };
    let app = Router::new().route(
        "/work",
        get(|| async {
            // A small, realistic handler: build and serialize a JSON document.
            let items: Vec<Value> = (0..20).map(|i| json!({ "id": i, "name": format!("item {i}") })).collect();
            axum::Json(json!({ "items": items }))
        }),
    );
    // Placement is explicit here: (b) must share the web runtime and (c) wraps its service itself, so
    // the web server's default isolation (a runtime of its own at nice 19) is turned off.
    let web = WebServer::new(app).bind("127.0.0.1:0").name("bench-web").admin_token(None).isolation(false);
    let mut bound = web.local_addr();
    let mut builder = Host::builder().handle_signals(false).read_env(false);
    builder = match (&placement, &bg) {
        (Placement::None, _) => builder,
        (Placement::Shared, _) => builder.add(ServiceSpec::from_fn("report", report_job(chunks.clone()))),
        (Placement::Isolated(_), Some(bg)) => builder.add(bg.from_fn("report", report_job(chunks.clone()))),
        (Placement::Isolated(_), None) => return Err("no background runtime".into()),
    };
    let host = builder.build_web(web).map_err(|e| e.to_string())?;
    let lifetime = host.lifetime();
    let running = rt.spawn(host.run());
    let addr = rt.block_on(async {
        lifetime.started().await;
        bound.wait().await
    });
    let addr = addr.ok_or("the web server did not start")?;
    // Warm the server's connections and caches and let the background work reach its steady state.
    let warm = Options { duration: Duration::from_secs(1), ..opts.clone() };
    let _ = tool.run(&format!("http://{addr}/work"), &warm);
    let before = chunks.load(Ordering::Relaxed);
    let started = Instant::now();
    let load = tool.run(&format!("http://{addr}/work"), opts);
    let background = (chunks.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64();
    lifetime.request_stop();
    let _ = rt.block_on(running);
    drop(bg);
    Ok((load?, background))
}

enum LoadTool {
    Oha,
    Wrk,
}

fn on_path(tool: &str) -> bool {
    Command::new(tool).arg("--version").output().is_ok()
}

impl LoadTool {
    fn find() -> Result<Self, String> {
        if on_path("oha") {
            Ok(LoadTool::Oha)
        } else if on_path("wrk") {
            Ok(LoadTool::Wrk)
        } else {
            Err("no load tool: install oha (`cargo install oha`) or wrk (Debian package `wrk`)".into())
        }
    }

    fn name(&self) -> &'static str {
        match self {
            LoadTool::Oha => "oha",
            LoadTool::Wrk => "wrk",
        }
    }

    fn run(&self, url: &str, opts: &Options) -> Result<Load, String> {
        match self {
            LoadTool::Oha => run_oha(url, opts),
            LoadTool::Wrk => run_wrk(url, opts),
        }
    }
}

fn run_oha(url: &str, opts: &Options) -> Result<Load, String> {
    let out = Command::new("oha")
        .args(["--no-tui", "--output-format", "json", "--latency-correction"])
        .args(["-z", &format!("{}ms", opts.duration.as_millis())])
        .args(["-q", &opts.rate.to_string(), "-c", &opts.connections.to_string(), url])
        .output()
        .map_err(|e| format!("cannot run oha: {e}"))?;
    if !out.status.success() {
        return Err(format!("oha failed: {}", String::from_utf8_lossy(&out.stderr)));
    }
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("oha's JSON: {e}"))?;
    let ms = |key: &str| v["latencyPercentiles"][key].as_f64().map(|s| s * 1000.0).unwrap_or(f64::NAN);
    let ok = v["statusCodeDistribution"]["200"].as_u64().unwrap_or(0);
    let total: u64 =
        v["statusCodeDistribution"].as_object().map(|m| m.values().filter_map(Value::as_u64).sum()).unwrap_or(0);
    // Requests still in flight when the run's time is up are reported as "aborted due to deadline":
    // an artefact of stopping, not a failure.
    let failed: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| m.iter().filter(|(k, _)| !k.contains("deadline")).filter_map(|(_, n)| n.as_u64()).sum())
        .unwrap_or(0);
    Ok(Load {
        p50_ms: ms("p50"),
        p99_ms: ms("p99"),
        p999_ms: ms("p99.9"),
        rps: v["summary"]["requestsPerSec"].as_f64().unwrap_or(f64::NAN),
        errors: failed + (total - ok),
    })
}

/// wrk's Lua hook prints the percentiles it does not show by default (p99.9) as one parsable line.
const WRK_SCRIPT: &str = r#"
done = function(summary, latency, requests)
  local errors = summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout
  io.write(string.format("STEVEDORE %f %f %f %d %d %d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests, summary.duration, errors))
end
"#;

fn run_wrk(url: &str, opts: &Options) -> Result<Load, String> {
    let script = std::env::temp_dir().join(format!("stevedore-wrk-{}.lua", std::process::id()));
    std::fs::write(&script, WRK_SCRIPT).map_err(|e| format!("cannot write {}: {e}", script.display()))?;
    let out = Command::new("wrk")
        .args(["-t", "1", "-c", &opts.connections.to_string()])
        .args(["-d", &format!("{}s", opts.duration.as_secs().max(1))])
        .arg("-s")
        .arg(&script)
        .arg(url)
        .output()
        .map_err(|e| format!("cannot run wrk: {e}"));
    let _ = std::fs::remove_file(&script);
    let out = out?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find_map(|l| l.strip_prefix("STEVEDORE ")).ok_or_else(|| format!("wrk said: {text}"))?;
    let f: Vec<f64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
    if f.len() != 6 {
        return Err(format!("unexpected wrk summary: {line}"));
    }
    // wrk reports microseconds.
    Ok(Load {
        p50_ms: f[0] / 1000.0,
        p99_ms: f[1] / 1000.0,
        p999_ms: f[2] / 1000.0,
        rps: f[3] / (f[4] / 1_000_000.0),
        errors: f[5] as u64,
    })
}
