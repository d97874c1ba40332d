//! Many timers with one period: 2,000 device pollers every 2 s. Started with the host, they would
//! all fall due in the same moment every period, and the last of each burst would wait for all the
//! others. `spread_phase()` moves each poller's schedule by an offset its name fixes, so the runs
//! spread over the period. The program prints how the first runs fell in the period, and stops.
//!
//! `cargo run --release -p stevedore --example 10_many_timers`, and again with `-- --together` to
//! see the burst it avoids.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use stevedore::interval::IntervalService;
use stevedore::{BoxError, Host};
use tokio::time::Instant;

const POLLERS: usize = 2_000;
const PERIOD: Duration = Duration::from_secs(2);

#[tokio::main]
async fn main() {
    let together = std::env::args().any(|a| a == "--together");
    // Which poller ran when, after the program's start.
    let starts: Arc<Mutex<Vec<(usize, Duration)>>> = Arc::default();
    let t0 = Instant::now();
    let mut host = Host::builder();
    for i in 0..POLLERS {
        let record = starts.clone();
        let poll = move || {
            let record = record.clone();
            async move {
                record.lock().unwrap_or_else(|p| p.into_inner()).push((i, t0.elapsed()));
                Ok::<_, BoxError>(()) // read the device here
            }
        };
        let timer = IntervalService::fixed_rate(format!("poll-device-{i}"), PERIOD, poll);
        host = host.add(if together { timer } else { timer.spread_phase() }.into_spec());
    }
    let host = host.build().expect("a valid host");
    let lifetime = host.lifetime();
    tokio::spawn(async move {
        tokio::time::sleep(PERIOD + Duration::from_millis(200)).await;
        lifetime.request_stop();
    });
    let report = host.run().await;

    // Each poller's first run, from the earliest of them.
    let starts = starts.lock().unwrap_or_else(|p| p.into_inner());
    let mut first_runs = vec![None; POLLERS];
    for &(i, at) in starts.iter() {
        first_runs[i].get_or_insert(at);
    }
    let first_runs: Vec<Duration> = first_runs.into_iter().flatten().collect();
    let earliest = first_runs.iter().min().copied().unwrap_or_default();
    let tenth = PERIOD.as_millis() / 10;
    let mut per_tenth = [0usize; 10];
    let mut per_ms = std::collections::BTreeMap::<u128, usize>::new();
    for at in first_runs.iter().map(|at| *at - earliest) {
        per_tenth[((at.as_millis() / tenth) as usize).min(9)] += 1;
        *per_ms.entry(at.as_millis()).or_default() += 1;
    }
    let busiest = per_ms.values().max().copied().unwrap_or(0);
    let how = if together { "started together" } else { "phases spread" };
    println!("{} of {POLLERS} pollers every {PERIOD:?} ran, {how}", first_runs.len());
    println!("first runs in each tenth of the period: {per_tenth:?}");
    println!("most first runs in one millisecond: {busiest}");
    println!("{}", report.summary());
}
