//! Stevedore's benchmarks: every figure is a ratio against a baseline or a peer measured in the same
//! run, on the same machine, as the median of several runs.
//!
//! `cargo run --release -p stevedore-bench -- SCENARIO [--json]`; see the crate's README for the list.

mod bus;
mod jobs;
mod lifecycle;
mod queue;
mod report;
mod scopes;
mod timers;
mod web_isolation;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "stevedore-bench", about = "Stevedore benchmarks, each against a baseline in the same run")]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
    /// Print the figures as one JSON object on the last line.
    #[arg(long, global = true)]
    json: bool,
    /// How many runs of each side (the median is reported).
    #[arg(long, global = true, default_value_t = 5)]
    runs: usize,
}

#[derive(Subcommand)]
enum Scenario {
    /// Start then stop 10,000 idle background services vs 10,000 bare tasks with a CancellationToken.
    Lifecycle {
        /// Services per run.
        #[arg(long, default_value_t = 10_000)]
        services: usize,
    },
    /// A no-op run with 3 scoped and 2 singleton dependencies vs the same function with hand-built arguments.
    Scopes {
        /// Runs per measurement.
        #[arg(long, default_value_t = 200_000)]
        iterations: u32,
    },
    /// No-op tasks through the in-memory queue, 1 and 64 at a time, vs raw mpsc baselines and apalis.
    Queue {
        /// Tasks per measurement.
        #[arg(long, default_value_t = 1_000_000)]
        tasks: u64,
    },
    /// 10,000 interval services at 100 ms vs 10,000 bare tokio interval loops: tick lateness and CPU.
    Timers {
        /// Timers per side.
        #[arg(long, default_value_t = 10_000)]
        timers: usize,
        /// Seconds each side runs.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
    },
    /// Burn-down of no-op jobs and enqueue-to-start latency, SQLite and PostgreSQL, vs apalis and graphile-worker.
    Jobs {
        /// Jobs in each burn-down.
        #[arg(long, default_value_t = 100_000)]
        jobs: u64,
        /// Jobs enqueued one by one for the latency figures.
        #[arg(long, default_value_t = 1_000)]
        latency_jobs: u64,
        /// Measure Stevedore only (no apalis, no graphile-worker).
        #[arg(long)]
        skip_peers: bool,
    },
    /// Outbox to broker to consumer vs direct publishing with confirms, RabbitMQ and NATS.
    Bus {
        /// Messages per side and run.
        #[arg(long, default_value_t = 20_000)]
        messages: usize,
        /// Concurrent producers per side.
        #[arg(long, default_value_t = 16)]
        producers: usize,
    },
    /// An axum endpoint under fixed-rate load, with CPU-bound background work shared vs isolated.
    WebIsolation {
        /// Seconds each measurement runs.
        #[arg(long, default_value_t = 10)]
        seconds: u64,
        /// Requests per second of the open-loop load.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Rounds over every placement (medians are reported).
        #[arg(long, default_value_t = 3)]
        rounds: usize,
    },
    /// Internal: one side of a scenario measured in a fresh process (memory figures need one).
    #[command(hide = true)]
    Child {
        /// Which side.
        side: String,
        /// Its size.
        n: usize,
    },
}

fn main() {
    let cli = Cli::parse();
    let figures = match cli.scenario {
        Scenario::Lifecycle { services } => lifecycle::run(services, cli.runs),
        Scenario::Scopes { iterations } => scopes::run(iterations, cli.runs),
        Scenario::Queue { tasks } => queue::run(tasks, cli.runs),
        Scenario::Timers { timers, seconds } => timers::run(timers, seconds, cli.runs),
        Scenario::Jobs { jobs: n, latency_jobs, skip_peers } => {
            let opts = jobs::JobsOptions { jobs: n, latency_jobs, skip_peers, ..Default::default() };
            let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
            print_value(rt.block_on(jobs::run_median(&opts, cli.runs)).map_err(|e| e.to_string()), cli.json);
            return;
        }
        Scenario::Bus { messages, producers } => {
            bus::run(&bus::BusOptions { messages, producers, ..Default::default() }, cli.runs)
        }
        Scenario::WebIsolation { seconds, rate, rounds } => {
            let opts = web_isolation::Options {
                duration: std::time::Duration::from_secs(seconds),
                rate,
                rounds,
                ..Default::default()
            };
            print_value(web_isolation::run(&opts), cli.json);
            return;
        }
        Scenario::Child { side, n } => {
            lifecycle::child(&side, n);
            return;
        }
    };
    figures.print(cli.json);
}

/// Scenarios that build their own figures as JSON: the table was printed on the way; with `--json`
/// the object is the last line. A failure ends the process non-zero with its reason.
fn print_value(result: Result<serde_json::Value, String>, json: bool) {
    match result {
        Ok(value) => {
            if json {
                println!("{value}");
            }
        }
        Err(e) => {
            eprintln!("benchmark failed: {e}");
            std::process::exit(1);
        }
    }
}
