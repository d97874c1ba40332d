//! Figures: a table for people, and with `--json` one JSON object on the last line for tools.

use std::collections::BTreeMap;

/// Named figures of one scenario, printed as a table and optionally as JSON.
#[derive(Default)]
pub struct Figures {
    title: String,
    rows: Vec<(String, f64, String)>,
    notes: Vec<String>,
}

impl Figures {
    pub fn new(title: impl Into<String>) -> Self {
        Figures { title: title.into(), ..Default::default() }
    }

    /// Adds a figure: its JSON name, value, and a human description with unit.
    pub fn add(&mut self, name: &str, value: f64, what: impl Into<String>) {
        self.rows.push((name.to_string(), value, what.into()));
    }

    /// Adds a line of context printed under the table.
    pub fn note(&mut self, line: impl Into<String>) {
        self.notes.push(line.into());
    }

    pub fn print(&self, json: bool) {
        println!("## {}", self.title);
        println!();
        println!("| figure | value | what |");
        println!("|---|---|---|");
        for (name, value, what) in &self.rows {
            println!("| `{name}` | {} | {what} |", format_value(*value));
        }
        for note in &self.notes {
            println!();
            println!("{note}");
        }
        if json {
            let map: BTreeMap<&str, f64> = self.rows.iter().map(|(n, v, _)| (n.as_str(), *v)).collect();
            println!("{}", serde_json::to_string(&map).unwrap_or_else(|_| "{}".into()));
        }
    }
}

fn format_value(v: f64) -> String {
    if v.abs() >= 1000.0 { format!("{v:.0}") } else { format!("{v:.3}") }
}

/// The median of a set of measurements.
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Resident set size of this process, in bytes (Linux), or 0 where unknown.
pub fn rss_bytes() -> u64 {
    let Ok(status) = std::fs::read_to_string("/proc/self/status") else { return 0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// How many cores' worth of work two threads get from the machine now: the time one thread takes
/// for a fixed loop over the time two take for it split in halves, the median of three. About 2.0
/// with two free cores, about 1.0 pinned to one (`taskset -c 0`). Figures taken at different
/// values are not comparable: a guest whose host gives its two vCPUs one core's time reads ~1.0.
fn parallel_speedup() -> f64 {
    /// A dependent chain of multiplies: pure CPU, nothing for the threads to share.
    fn spin(iterations: u64) -> u64 {
        let mut x = 1u64;
        for i in 0..iterations {
            x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(i));
        }
        x
    }
    const WORK: u64 = 20_000_000;
    let ratios = (0..3)
        .map(|_| {
            let began = std::time::Instant::now();
            std::hint::black_box(spin(WORK));
            let one = began.elapsed();
            let began = std::time::Instant::now();
            std::thread::scope(|s| {
                let other = s.spawn(|| spin(WORK / 2));
                std::hint::black_box(spin(WORK / 2));
                let _ = other.join();
            });
            one.as_secs_f64() / began.elapsed().as_secs_f64().max(f64::EPSILON)
        })
        .collect();
    median(ratios)
}

/// How long one thread takes to wake another that is parked, and be woken back, in microseconds:
/// the median of three sets of 1,000 round trips. Work spread over a runtime's workers pays this
/// whenever one wakes another; on a guest it likely depends on how quickly a halted vCPU runs
/// again, which `parallel_speedup` does not see.
fn wake_round_trip_us() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    const TRIPS: u64 = 1000;
    let sets = (0..3)
        .map(|_| {
            // Odd: the other thread's turn; even: this one's. Each side parks until its turn, so a
            // spurious wake-up only parks again.
            let turn = AtomicU64::new(0);
            let this = std::thread::current();
            std::thread::scope(|s| {
                let other = s.spawn(|| {
                    for trip in 0..TRIPS {
                        while turn.load(Ordering::Acquire) != 2 * trip + 1 {
                            std::thread::park();
                        }
                        turn.store(2 * trip + 2, Ordering::Release);
                        this.unpark();
                    }
                });
                let began = std::time::Instant::now();
                for trip in 0..TRIPS {
                    turn.store(2 * trip + 1, Ordering::Release);
                    other.thread().unpark();
                    while turn.load(Ordering::Acquire) != 2 * trip + 2 {
                        std::thread::park();
                    }
                }
                began.elapsed().as_secs_f64() * 1e6 / TRIPS as f64
            })
        })
        .collect();
    median(sets)
}

/// The machine's state, sampled before each round of a scenario: labels for its figures, not
/// results (see the bench's README).
#[derive(Default)]
pub struct MachineState {
    speedups: Vec<f64>,
    wakes: Vec<f64>,
}

impl MachineState {
    /// Takes one sample of each label (about a quarter of a second).
    pub fn sample(&mut self) {
        self.speedups.push(parallel_speedup());
        self.wakes.push(wake_round_trip_us());
    }

    /// Adds the labels' medians to the figures.
    pub fn report(self, f: &mut Figures) {
        f.add(
            "parallel_speedup",
            median(self.speedups),
            "two threads' CPU-bound work over one's, before each round: ~2.0 with both cores there",
        );
        f.add("wake_round_trip_us", median(self.wakes), "a parked thread woken and waking back, before each round, µs");
    }
}
