//! `timers`: 10,000 interval services at 100 ms for 10 s against 10,000 bare `tokio::time::interval`
//! loops in the same process, each side on its own 2-thread runtime: tick lateness (mean, p99) and
//! the process CPU time used over the measured window.
//!
//! Lateness is a run's start minus the grid point it runs for, on the earliest grid every run of the
//! timer so far fits: the bare loops (tokio's burst policy, every tick runs) are so measured against
//! their k-th point, and Stevedore (ticks it cannot make are skipped, and counted) against the one it
//! runs for. Both sides measure with the same code, kept inline in each timer's state. Samples go
//! to a 1 µs histogram shared by every timer of a side; the window starts one period after every
//! timer has started.
//!
//! The timers start within a few milliseconds of each other, so each period opens with a burst of
//! wake-ups, and the p99 is mostly the wait at the back of that queue: `peak_due_per_ms` says how
//! many timers share the busiest millisecond, and `p99_ratio` compares the two sides in the same run.
//! Two floor sides, 100 timers each with one due per millisecond, measure the lateness that is left
//! with no queue at all: tokio's timer granularity. Two spread sides run all the timers with their
//! phases spread over the period by `IntervalService::spread_phase`, the bare loops given the same
//! offsets: what a host whose timers do not share a phase sees.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use stevedore::interval::IntervalService;
use stevedore::{BoxError, Host};

use crate::report::{Figures, MachineState, median};

/// The period.
const PERIOD: Duration = Duration::from_millis(100);

/// The period the timers run at: [`PERIOD`], unless `STEVEDORE_BENCH_TIMERS_PERIOD_MS` says
/// otherwise. That is for counting cache misses under cachegrind, which runs some fifty times
/// slower: at 100 ms every tick would then be late, and the catch-up path would be measured instead
/// (`BENCHMARKS.md`, ninth session).
fn period() -> Duration {
    static SET: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SET.get_or_init(|| env_number("STEVEDORE_BENCH_TIMERS_PERIOD_MS").map_or(PERIOD, Duration::from_millis))
}

/// Each side's worker threads: 2, or `STEVEDORE_BENCH_TIMERS_WORKERS` (1 under cachegrind, so that
/// the heap is laid out the same way from one run to the next).
fn workers() -> usize {
    env_number("STEVEDORE_BENCH_TIMERS_WORKERS").map_or(2, |n| n.max(1) as usize)
}

fn env_number(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    match value.parse() {
        Ok(n) => Some(n),
        Err(_) => panic!("{name} must be a whole number, not {value:?}"),
    }
}

/// Histogram range: lateness past this is counted in the last bucket.
const BUCKETS: usize = 200_000;
/// Where in the period the timers' first runs fall, in steps of 0.1 ms.
const PHASE_STEPS: usize = 1_000;

struct Histogram {
    /// Timers' grids are kept as offsets from this instant, taken before any timer starts.
    epoch: Instant,
    period: Duration,
    buckets: Vec<AtomicU64>,
    sum_us: AtomicU64,
    count: AtomicU64,
    /// First runs per 0.1 ms of the period: how many timers share a millisecond, which sets how long
    /// the queue of wake-ups is at each burst. Kept across `reset` (first runs come before the window).
    phases: Vec<AtomicU64>,
}

impl Histogram {
    fn new() -> Self {
        Histogram {
            epoch: Instant::now(),
            period: period(),
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            sum_us: AtomicU64::new(0),
            count: AtomicU64::new(0),
            phases: (0..PHASE_STEPS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
    fn record(&self, late: Duration) {
        let us = late.as_micros().min(BUCKETS as u128 - 1) as usize;
        self.buckets[us].fetch_add(1, Ordering::Relaxed);
        self.sum_us.fetch_add(us as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }
    fn record_phase(&self, since_epoch: Duration) {
        let step = self.period / PHASE_STEPS as u32;
        let at = (since_epoch.as_nanos() / step.as_nanos()) as usize % PHASE_STEPS;
        self.phases[at].fetch_add(1, Ordering::Relaxed);
    }
    /// The most timers whose grid points fall in one millisecond of the period.
    fn peak_per_ms(&self) -> u64 {
        let steps: Vec<u64> = self.phases.iter().map(|p| p.load(Ordering::Relaxed)).collect();
        let per_ms = (PHASE_STEPS / self.period.as_millis().max(1) as usize).max(1);
        (0..PHASE_STEPS).map(|i| (0..per_ms).map(|k| steps[(i + k) % PHASE_STEPS]).sum()).max().unwrap_or(0)
    }
    fn reset(&self) {
        for b in &self.buckets {
            b.store(0, Ordering::Relaxed);
        }
        self.sum_us.store(0, Ordering::Relaxed);
        self.count.store(0, Ordering::Relaxed);
    }
    fn mean_ms(&self) -> f64 {
        let n = self.count.load(Ordering::Relaxed).max(1);
        self.sum_us.load(Ordering::Relaxed) as f64 / n as f64 / 1000.0
    }
    fn p99_ms(&self) -> f64 {
        self.quantile_ms(0.99)
    }
    /// p50 to p99.9 in one line, ms.
    fn quantiles(&self) -> String {
        let qs = [50.0, 90.0, 95.0, 99.0, 99.9];
        qs.map(|q| format!("p{q} {:.2}", self.quantile_ms(q / 100.0))).join(", ")
    }
    fn quantile_ms(&self, q: f64) -> f64 {
        let n = self.count.load(Ordering::Relaxed);
        let target = (n as f64 * q).ceil() as u64;
        let mut seen = 0;
        for (us, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= target {
                return us as f64 / 1000.0;
            }
        }
        (BUCKETS - 1) as f64 / 1000.0
    }
}

/// One timer's grid, kept inline in the timer's own state on both sides (the bare loop's future,
/// the Stevedore handler closure), so that measuring costs both sides the same.
#[derive(Default)]
struct Grid {
    /// The grid's origin: nanoseconds after the histogram's epoch, plus one (0: no run yet). Only
    /// the timer's own task touches it, one run at a time: plain loads and stores.
    origin: AtomicU64,
}

impl Clone for Grid {
    fn clone(&self) -> Self {
        Grid { origin: AtomicU64::new(self.origin.load(Ordering::Relaxed)) }
    }
}

impl Grid {
    /// Records this run's lateness against the nearest point of the earliest grid every run so far
    /// fits: the first run starts the grid, and a run earlier than its point moves the grid back
    /// (the first run was itself late). The k-th run of a timer that runs every tick (the bare
    /// loops, tokio's burst policy) is so measured against its k-th point, and a timer that skips
    /// the ticks it cannot make (Stevedore's default, the skips counted apart) against the point it
    /// runs for, not charged a whole period for each skipped one.
    fn tick(&self, hist: &Histogram) {
        let now = Instant::now().saturating_duration_since(hist.epoch).as_nanos() as u64;
        let Some(origin) = self.origin.load(Ordering::Relaxed).checked_sub(1) else {
            self.origin.store(now + 1, Ordering::Relaxed);
            hist.record_phase(Duration::from_nanos(now));
            hist.record(Duration::ZERO);
            return;
        };
        // A constant divisor at the period, as before the period could be set: the same
        // code on both sides either way, but no slower at the headline.
        let period = if hist.period == PERIOD { PERIOD.as_nanos() as u64 } else { hist.period.as_nanos() as u64 };
        let due = origin + (now.saturating_sub(origin) + period / 2) / period * period;
        if now < due {
            self.origin.store(origin - (due - now) + 1, Ordering::Relaxed);
            hist.record(Duration::ZERO);
        } else {
            hist.record(Duration::from_nanos(now - due));
        }
    }
}

/// Process CPU time (user + system), from /proc (Linux); zero elsewhere.
fn cpu_time() -> Duration {
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return Duration::ZERO };
    // Fields after the command name (which is in parentheses and may hold spaces).
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else { return Duration::ZERO };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 after the name.
    let ticks: u64 = fields.get(11..13).map(|f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum()).unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(workers()).enable_all().build().expect("runtime")
}

/// One side's figures over the window.
struct Measured {
    mean_ms: f64,
    p99_ms: f64,
    /// The lateness quantiles, for the profile line.
    quantiles: String,
    cpu_s: f64,
    /// The most timers due in one millisecond.
    peak_per_ms: u64,
}

/// Waits one period, resets the histogram, then measures `window`.
async fn measure(hist: &Histogram, window: Duration) -> Measured {
    tokio::time::sleep(period()).await;
    hist.reset();
    let cpu = cpu_time();
    tokio::time::sleep(window).await;
    let used = cpu_time().saturating_sub(cpu);
    Measured {
        mean_ms: hist.mean_ms(),
        p99_ms: hist.p99_ms(),
        quantiles: hist.quantiles(),
        cpu_s: used.as_secs_f64(),
        peak_per_ms: hist.peak_per_ms(),
    }
}

/// How the timers' first ticks are placed: all at once (the scenario); one every `PERIOD / n` (the
/// floor sides: with 100 timers no two are due in the same millisecond, so no wake-up ever queues);
/// or by `IntervalService::spread_phase` (the spread sides: with 10,000, about 100 share each
/// millisecond instead of thousands).
#[derive(Clone, Copy)]
enum Start {
    Together,
    Staggered,
    SpreadPhase,
}

impl Start {
    /// The `i`-th timer's first tick, after the start.
    fn offset(self, i: usize, n: usize) -> Duration {
        match self {
            Start::Together => Duration::ZERO,
            Start::Staggered => period() * i as u32 / n as u32,
            // What `spread_phase` gives the Stevedore side's timer of the same name.
            Start::SpreadPhase => {
                let noop = || async { Ok::<_, BoxError>(()) };
                IntervalService::fixed_rate(timer_name(i), period(), noop).spread_phase().phase()
            }
        }
    }
}

fn timer_name(i: usize) -> String {
    format!("timer-{i}")
}

fn baseline(n: usize, window: Duration, start: Start) -> Measured {
    let rt = runtime();
    let hist = Arc::new(Histogram::new());
    rt.block_on(async {
        let stop = tokio_util::sync::CancellationToken::new();
        let mut tasks = Vec::with_capacity(n);
        for i in 0..n {
            let (hist, stop) = (hist.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let grid = Grid::default();
                let mut interval = tokio::time::interval_at(tokio::time::Instant::now() + start.offset(i, n), period());
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = interval.tick() => {
                            grid.tick(&hist);
                            // The same no-op a Stevedore run does, for a like-for-like body.
                            std::hint::black_box(async { Ok::<_, BoxError>(()) }.await).ok();
                        }
                    }
                }
            }));
        }
        let figures = measure(&hist, window).await;
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
        figures
    })
}

fn stevedore(n: usize, window: Duration, start: Start) -> (Measured, u64) {
    let rt = runtime();
    let hist = Arc::new(Histogram::new());
    rt.block_on(async {
        let mut builder = Host::builder().handle_signals(false).read_env(false).start_concurrently(true);
        for i in 0..n {
            let (hist, grid) = (hist.clone(), Grid::default());
            let handler = move || {
                grid.tick(&hist);
                async { Ok::<_, BoxError>(()) }
            };
            let service = IntervalService::fixed_rate(timer_name(i), period(), handler);
            let service = match start {
                Start::SpreadPhase => service.spread_phase(),
                _ => service.initial_delay(start.offset(i, n)),
            };
            builder = builder.add(service.into_spec());
        }
        let host = builder.build().expect("valid host");
        let host_status = host.status();
        let lifetime = host.lifetime();
        let run = tokio::spawn(host.run());
        lifetime.started().await;
        let status = host_status.clone();
        let skipped_before: u64 = status.services().iter().map(|s| s.runs.skipped).sum();
        let figures = measure(&hist, window).await;
        let skipped: u64 = status.services().iter().map(|s| s.runs.skipped).sum::<u64>() - skipped_before;
        lifetime.request_stop();
        let _ = run.await;
        (figures, skipped)
    })
}

/// Timers in each floor side: one due every millisecond of the period, never two.
const FLOOR_TIMERS: usize = 100;

pub fn run(n: usize, seconds: u64, runs: usize) -> Figures {
    let window = Duration::from_secs(seconds);
    if let Ok(side) = std::env::var("STEVEDORE_BENCH_TIMERS_PROFILE") {
        // Profiling aid: one side alone: `baseline`, `floor`, `baseline-floor`, `spread` and
        // `baseline-spread` (all the timers, phases spread by `spread_phase`), or anything else
        // for Stevedore's. With `STEVEDORE_BENCH_TIMERS_PERIOD_MS` and `_WORKERS`, it is what
        // cachegrind runs to count cache misses per tick (`BENCHMARKS.md`, ninth session).
        let (m, skipped) = match side.as_str() {
            "baseline" => (baseline(n, window, Start::Together), 0),
            "baseline-floor" => (baseline(FLOOR_TIMERS, window, Start::Staggered), 0),
            "baseline-spread" => (baseline(n, window, Start::SpreadPhase), 0),
            "spread" => stevedore(n, window, Start::SpreadPhase),
            "floor" => stevedore(FLOOR_TIMERS, window, Start::Staggered),
            _ => stevedore(n, window, Start::Together),
        };
        println!(
            "mean {:.3} ms, p99 {:.3} ms, cpu {:.2} s, skipped {skipped}, peak {} due in 1 ms",
            m.mean_ms, m.p99_ms, m.cpu_s, m.peak_per_ms
        );
        println!("lateness {}", m.quantiles);
        std::process::exit(0);
    }
    // Each side's measurements, run by run; the figures are their medians.
    let (mut bases, mut ours, mut base_floors, mut floors, mut base_spreads, mut spreads) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut skips, mut p99_ratios) = (Vec::new(), Vec::new());
    let mut machine = MachineState::default();
    for _ in 0..runs {
        machine.sample();
        let base = baseline(n, window, Start::Together);
        let (our, skipped) = stevedore(n, window, Start::Together);
        p99_ratios.push(our.p99_ms / base.p99_ms.max(f64::EPSILON));
        skips.push(skipped as f64);
        bases.push(base);
        ours.push(our);
        base_floors.push(baseline(FLOOR_TIMERS, window, Start::Staggered));
        floors.push(stevedore(FLOOR_TIMERS, window, Start::Staggered).0);
        base_spreads.push(baseline(n, window, Start::SpreadPhase));
        spreads.push(stevedore(n, window, Start::SpreadPhase).0);
    }
    let med = |side: &[Measured], figure: fn(&Measured) -> f64| median(side.iter().map(figure).collect());
    let (mean, p99, cpu) = (med(&ours, |m| m.mean_ms), med(&ours, |m| m.p99_ms), med(&ours, |m| m.cpu_s));
    let peak = med(&ours, |m| m.peak_per_ms as f64);
    let (base_mean, base_p99, base_cpu) =
        (med(&bases, |m| m.mean_ms), med(&bases, |m| m.p99_ms), med(&bases, |m| m.cpu_s));
    let base_peak = med(&bases, |m| m.peak_per_ms as f64);
    let (floor, base_floor) = (med(&floors, |m| m.p99_ms), med(&base_floors, |m| m.p99_ms));
    let (spread, base_spread) = (med(&spreads, |m| m.p99_ms), med(&base_spreads, |m| m.p99_ms));
    let (spread_cpu, base_spread_cpu) = (med(&spreads, |m| m.cpu_s), med(&base_spreads, |m| m.cpu_s));
    let (skipped, p99_ratio) = (median(skips), median(p99_ratios));
    let mut f = Figures::new(format!(
        "timers: {n} timers at {:?} for {seconds} s, {} worker threads (median of {runs})",
        period(),
        workers()
    ));
    f.add("p99_lateness_ms", p99, "Stevedore interval services: p99 tick lateness, ms");
    f.add("cpu_ratio", cpu / base_cpu.max(f64::EPSILON), "Stevedore CPU time over the bare loops'");
    f.add("mean_lateness_ms", mean, "Stevedore: mean tick lateness, ms");
    f.add("baseline_p99_lateness_ms", base_p99, "bare tokio interval loops: p99 tick lateness, ms");
    f.add("baseline_mean_lateness_ms", base_mean, "bare loops: mean tick lateness, ms");
    f.add("p99_ratio", p99_ratio, "Stevedore's p99 lateness over the bare loops' in the same run");
    f.add("peak_due_per_ms", peak, "Stevedore: the most timers due in one millisecond of the period");
    f.add("baseline_peak_due_per_ms", base_peak, "bare loops: the most timers due in one millisecond");
    machine.report(&mut f);
    f.add("skipped_ticks", skipped, "Stevedore: ticks skipped in the window (woken more than a period late)");
    f.add(
        "floor_p99_lateness_ms",
        floor,
        format!("{FLOOR_TIMERS} Stevedore interval services, one due per millisecond: p99 tick lateness, ms"),
    );
    f.add(
        "baseline_floor_p99_lateness_ms",
        base_floor,
        format!("{FLOOR_TIMERS} bare loops, one due per millisecond: p99 tick lateness, ms"),
    );
    f.add(
        "spread_p99_lateness_ms",
        spread,
        format!(
            "{n} Stevedore interval services, phases spread over the period by spread_phase: p99 tick lateness, ms"
        ),
    );
    f.add(
        "baseline_spread_p99_lateness_ms",
        base_spread,
        format!("{n} bare loops, given the same offsets: p99 tick lateness, ms"),
    );
    f.add(
        "spread_cpu_ratio",
        spread_cpu / base_spread_cpu.max(f64::EPSILON),
        "phases spread: Stevedore CPU time over the bare loops'",
    );
    f.add("cpu_s", cpu, "Stevedore: process CPU seconds over the window");
    f.add("baseline_cpu_s", base_cpu, "bare loops: process CPU seconds over the window");
    f.note("Each Stevedore tick is a full run: fresh scope, span, panic guard and status record.");
    f.note("The timers start within a few milliseconds, so each period opens with a burst of wake-ups: the p99 is the wait at the back of that queue, and grows with the cost of one tick.");
    f.note("The spread sides run the same timers with their phases spread over the period by spread_phase (about 100 due in each millisecond): the gap between their p99 and the scenario's is what the burst's queue costs.");
    f.note("The floor sides have no queue at all: their lateness is tokio's timer granularity. tokio rounds a deadline up to the end of its millisecond, so even a timer alone on its runtime wakes up to 1 ms late (a worker that parks mid-millisecond sleeps whole milliseconds from the start of it, which can add up to 1 ms more).");
    f
}
