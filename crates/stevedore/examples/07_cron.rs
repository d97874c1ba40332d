//! A cron service in a time zone: prints its next fire times, then runs every 10 seconds (six fields,
//! seconds first) on Berlin time; a nightly job at 02:30 Berlin time shows how a day with a
//! daylight-saving change is handled (see the `cron` module docs).
//!
//! `cargo run -p stevedore --example 07_cron`, then Ctrl-C.

use stevedore::cron::CronService;
use stevedore::{BoxError, Host};

async fn tick() -> Result<(), BoxError> {
    tracing::info!("cron tick");
    Ok(())
}

async fn nightly() -> Result<(), BoxError> {
    tracing::info!("nightly report");
    Ok(())
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt().with_env_filter("info").init();
    let every_10s = CronService::new("every-10s", "*/10 * * * * *", tick).zone("Europe/Berlin");
    let nightly = CronService::new("nightly-report", "30 2 * * *", nightly).zone("Europe/Berlin");
    for (name, next) in [("every-10s", every_10s.next_fire_times(3)), ("nightly-report", nightly.next_fire_times(3))] {
        for at in next {
            println!("{name}: next at {}", at.to_rfc3339());
        }
    }
    let host = Host::builder().add(every_10s.into_spec()).add(nightly.into_spec()).build().expect("a valid host");
    host.run().await.exit();
}
