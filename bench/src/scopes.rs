//! `scopes`: a no-op run with 3 scoped and 2 singleton dependencies, through a fresh scope and the
//! extractor machinery, against the same function called with hand-built arguments.

use std::time::Instant;

use stevedore::handler::run_handler;
use stevedore::{BoxError, CancellationToken, Scoped, ServiceCollection, ServiceContext, Singleton};

use crate::report::{Figures, median};

struct Config(u64);
struct Client(u64);
struct Db(u64);
struct Cache(u64);
struct Clock(u64);

async fn work(c: &Config, k: &Client, d: &Db, a: &Cache, t: &Clock) -> Result<(), BoxError> {
    std::hint::black_box(c.0 + k.0 + d.0 + a.0 + t.0);
    Ok(())
}

async fn handler(
    c: Singleton<Config>,
    k: Singleton<Client>,
    d: Scoped<Db>,
    a: Scoped<Cache>,
    t: Scoped<Clock>,
) -> Result<(), BoxError> {
    let (d, a, t) = (d.lock().await, a.lock().await, t.lock().await);
    work(&c, &k, &d, &a, &t).await
}

pub fn run(iterations: u32, runs: usize) -> Figures {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let services = ServiceCollection::new()
        .singleton_value(Config(1))
        .singleton_value(Client(2))
        .scoped(|| async { Ok::<_, BoxError>(Db(3)) })
        .scoped(|| async { Ok::<_, BoxError>(Cache(4)) })
        .scoped(|| async { Ok::<_, BoxError>(Clock(5)) });
    let ctx = ServiceContext::detached_with("bench", CancellationToken::new(), services);
    let (mut extra, mut base_ns, mut ours_ns) = (Vec::new(), Vec::new(), Vec::new());
    rt.block_on(async {
        for _ in 0..runs {
            let began = Instant::now();
            for i in 0..iterations {
                // Hand-built: the same values made and dropped per run, as a caller without a container would.
                let (c, k) = (Config(1), Client(2));
                let (d, a, t) = (Db(3 + u64::from(i & 1)), Cache(4), Clock(5));
                work(&c, &k, &d, &a, &t).await.expect("no-op");
            }
            let base = began.elapsed().as_nanos() as f64 / f64::from(iterations);
            let began = Instant::now();
            for _ in 0..iterations {
                let r = run_handler(&ctx, &handler, None).await;
                assert!(r.is_success(), "{r:?}");
            }
            let ours = began.elapsed().as_nanos() as f64 / f64::from(iterations);
            extra.push(ours - base);
            base_ns.push(base);
            ours_ns.push(ours);
        }
    });
    let mut f = Figures::new(format!("scopes: no-op run, 3 scoped + 2 singleton dependencies (median of {runs})"));
    f.add("extra_ns_per_run", median(extra), "extra ns per run over hand-built arguments");
    f.add("baseline_ns_per_run", median(base_ns), "hand-built arguments, ns per run");
    f.add("stevedore_ns_per_run", median(ours_ns), "fresh scope + extraction + close, ns per run");
    f.note("Both sides on one current-thread runtime; the baseline builds the five values by hand per run.");
    f
}
