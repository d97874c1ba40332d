//! Cron services: fire times across daylight-saving changes in several zones, and the running service
//! under tokio's paused clock with a wall clock that follows it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use stevedore::cron::{CronSchedule, CronService, WallClock};
use stevedore::interval::Overlap;
use stevedore::{BoxError, BuildError, Host, HostBuilder, RunReport, StatusView};

fn builder() -> HostBuilder {
    Host::builder().handle_signals(false).read_env(false).shutdown_timeout(Duration::from_secs(600))
}

fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
    Utc.with_ymd_and_hms(y, mo, d, h, mi, s).unwrap()
}

/// The next `n` fire times after `from`, as RFC 3339 in the schedule's zone.
fn upcoming(expr: &str, zone: &str, from: DateTime<Utc>, n: usize) -> Vec<String> {
    CronSchedule::parse(expr, zone).unwrap().upcoming(from, n).iter().map(|t| t.to_rfc3339()).collect()
}

// ---- daylight saving: spring forward ----

#[test]
fn spring_forward_new_york_fixed_time_in_the_gap_runs_once_right_after_it() {
    // 2026-03-08: 02:00 EST becomes 03:00 EDT; 02:30 does not exist that day.
    assert_eq!(
        upcoming("30 2 * * *", "America/New_York", utc(2026, 3, 7, 12, 0, 0), 2),
        ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
    );
}

#[test]
fn spring_forward_new_york_wildcard_skips_the_missing_hour() {
    assert_eq!(
        upcoming("0 */30 * * * *", "America/New_York", utc(2026, 3, 8, 5, 45, 0), 4),
        [
            "2026-03-08T01:00:00-05:00",
            "2026-03-08T01:30:00-05:00",
            "2026-03-08T03:00:00-04:00",
            "2026-03-08T03:30:00-04:00"
        ]
    );
}

#[test]
fn spring_forward_berlin_fixed_time_in_the_gap_runs_once_right_after_it() {
    // 2026-03-29: 02:00 CET becomes 03:00 CEST.
    assert_eq!(
        upcoming("0 30 2 * * *", "Europe/Berlin", utc(2026, 3, 28, 12, 0, 0), 2),
        ["2026-03-29T03:00:00+02:00", "2026-03-30T02:30:00+02:00"]
    );
}

#[test]
fn spring_forward_london_midnight_job_runs_once() {
    // croner 3.x ran this at 00:00 and again at 02:00 on the transition day (01:00 GMT -> 02:00 BST).
    assert_eq!(
        upcoming("0 0 * * *", "Europe/London", utc(2026, 3, 28, 12, 0, 0), 3),
        ["2026-03-29T00:00:00+00:00", "2026-03-30T00:00:00+01:00", "2026-03-31T00:00:00+01:00"]
    );
}

// ---- daylight saving: fall back ----

#[test]
fn fall_back_new_york_fixed_time_in_the_repeated_hour_runs_once() {
    // 2026-11-01: 02:00 EDT becomes 01:00 EST; 01:30 happens twice.
    assert_eq!(
        upcoming("30 1 * * *", "America/New_York", utc(2026, 10, 31, 12, 0, 0), 2),
        ["2026-11-01T01:30:00-04:00", "2026-11-02T01:30:00-05:00"]
    );
}

#[test]
fn fall_back_new_york_wildcard_runs_in_both_passes() {
    assert_eq!(
        upcoming("0 */30 * * * *", "America/New_York", utc(2026, 11, 1, 4, 45, 0), 5),
        [
            "2026-11-01T01:00:00-04:00",
            "2026-11-01T01:30:00-04:00",
            "2026-11-01T01:00:00-05:00",
            "2026-11-01T01:30:00-05:00",
            "2026-11-01T02:00:00-05:00",
        ]
    );
}

#[test]
fn fall_back_berlin_fixed_time_once_and_wildcard_in_both_passes() {
    // 2026-10-25: 03:00 CEST becomes 02:00 CET.
    assert_eq!(
        upcoming("0 30 2 * * *", "Europe/Berlin", utc(2026, 10, 24, 12, 0, 0), 2),
        ["2026-10-25T02:30:00+02:00", "2026-10-26T02:30:00+01:00"]
    );
    assert_eq!(
        upcoming("0 */30 * * * *", "Europe/Berlin", utc(2026, 10, 25, 0, 15, 0), 4),
        [
            "2026-10-25T02:30:00+02:00",
            "2026-10-25T02:00:00+01:00",
            "2026-10-25T02:30:00+01:00",
            "2026-10-25T03:00:00+01:00"
        ]
    );
}

#[test]
fn southern_hemisphere_sydney_changes_the_other_way() {
    // 2026-10-04: 02:00 AEST becomes 03:00 AEDT; 2026-04-05: 03:00 AEDT becomes 02:00 AEST.
    assert_eq!(
        upcoming("30 2 * * *", "Australia/Sydney", utc(2026, 10, 3, 0, 0, 0), 2),
        ["2026-10-04T03:00:00+11:00", "2026-10-05T02:30:00+11:00"]
    );
    assert_eq!(
        upcoming("30 2 * * *", "Australia/Sydney", utc(2026, 4, 4, 0, 0, 0), 2),
        ["2026-04-05T02:30:00+11:00", "2026-04-06T02:30:00+10:00"]
    );
}

// ---- parsing ----

#[test]
fn five_or_six_fields_and_nicknames() {
    let from = utc(2026, 1, 1, 0, 0, 0);
    assert_eq!(upcoming("*/20 * * * * *", "UTC", from, 2), ["2026-01-01T00:00:20+00:00", "2026-01-01T00:00:40+00:00"]);
    assert_eq!(upcoming("*/20 * * * *", "UTC", from, 1), ["2026-01-01T00:20:00+00:00"]);
    assert_eq!(upcoming("@daily", "UTC", from, 1), ["2026-01-02T00:00:00+00:00"]);
    assert_eq!(upcoming("0 9 * * MON-FRI", "UTC", from, 2), ["2026-01-01T09:00:00+00:00", "2026-01-02T09:00:00+00:00"]);
}

#[tokio::test]
async fn an_invalid_expression_fails_the_build_naming_service_and_expression() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let err = builder().add(CronService::new("nightly", "61 * * * *", noop).into_spec()).build().unwrap_err();
    assert!(matches!(&err, BuildError::InvalidService { service, .. } if service == "nightly"), "{err}");
    let text = err.to_string();
    assert!(text.contains("`nightly`") && text.contains("`61 * * * *`"), "{text}");
}

#[tokio::test]
async fn an_unknown_zone_fails_the_build_naming_service_zone_and_expression() {
    let noop = || async { Ok::<_, BoxError>(()) };
    let err = builder()
        .add(CronService::new("nightly", "0 3 * * *", noop).zone("Mars/Olympus_Mons").into_spec())
        .build()
        .unwrap_err();
    let text = err.to_string();
    assert!(text.contains("`nightly`") && text.contains("Mars/Olympus_Mons") && text.contains("`0 3 * * *`"), "{text}");
}

// ---- the running service ----

/// Wall-clock times of runs.
#[derive(Clone, Default)]
struct Fires(Arc<Mutex<Vec<String>>>);

impl Fires {
    fn handler(&self, clock: &WallClock, took: Duration) -> impl stevedore::Handler<()> {
        let (fires, clock) = (self.0.clone(), clock.clone());
        move || {
            fires.lock().unwrap().push(clock.now().to_rfc3339());
            async move {
                tokio::time::sleep(took).await;
                Ok::<_, BoxError>(())
            }
        }
    }
    fn get(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }
}

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

#[tokio::test(start_paused = true)]
async fn runs_at_second_precision() {
    let clock = WallClock::starting_at(utc(2026, 1, 1, 0, 0, 5));
    let fires = Fires::default();
    let job = CronService::new("quarter", "*/15 * * * * *", fires.handler(&clock, Duration::ZERO)).clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    let (report, status) = run_for(host, Duration::from_secs(50)).await;
    assert!(report.is_clean(), "{}", report.summary());
    assert_eq!(fires.get(), ["2026-01-01T00:00:15+00:00", "2026-01-01T00:00:30+00:00", "2026-01-01T00:00:45+00:00"]);
    let s = status.service("quarter").unwrap();
    assert_eq!((s.kind, s.runs.started, s.runs.succeeded), ("cron", 3, 3));
}

#[tokio::test(start_paused = true)]
async fn the_running_service_follows_spring_forward_in_berlin() {
    let clock = WallClock::starting_at(utc(2026, 3, 28, 12, 0, 0));
    let fires = Fires::default();
    let job = CronService::new("nightly", "0 30 2 * * *", fires.handler(&clock, Duration::ZERO))
        .zone("Europe/Berlin")
        .clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    run_for(host, Duration::from_secs(48 * 3600)).await;
    // 03:00 CEST on the transition day, 02:30 CEST the day after.
    assert_eq!(fires.get(), ["2026-03-29T01:00:00+00:00", "2026-03-30T00:30:00+00:00"]);
}

#[tokio::test(start_paused = true)]
async fn the_running_service_follows_fall_back_in_new_york() {
    let clock = WallClock::starting_at(utc(2026, 11, 1, 4, 45, 0));
    let fires = Fires::default();
    let job = CronService::new("half-hourly", "0 */30 * * * *", fires.handler(&clock, Duration::ZERO))
        .zone("America/New_York")
        .clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    run_for(host, Duration::from_secs(2 * 3600)).await;
    // Every 30 real minutes through the repeated hour.
    assert_eq!(
        fires.get(),
        [
            "2026-11-01T05:00:00+00:00",
            "2026-11-01T05:30:00+00:00",
            "2026-11-01T06:00:00+00:00",
            "2026-11-01T06:30:00+00:00"
        ]
    );
}

#[tokio::test(start_paused = true)]
async fn next_fire_times_on_request() {
    let clock = WallClock::starting_at(utc(2026, 3, 7, 12, 0, 0));
    let job =
        CronService::new("n", "30 2 * * *", || async { Ok::<_, BoxError>(()) }).zone("America/New_York").clock(clock);
    let next: Vec<_> = job.next_fire_times(3).iter().map(|t| t.to_rfc3339()).collect();
    assert_eq!(next, ["2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00", "2026-03-10T02:30:00-04:00"]);
}

#[tokio::test(start_paused = true)]
async fn a_fire_during_a_run_is_skipped_by_default() {
    let clock = WallClock::starting_at(utc(2026, 1, 1, 0, 0, 30));
    let fires = Fires::default();
    let job = CronService::new("minutely", "0 * * * * *", fires.handler(&clock, Duration::from_secs(150))).clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    let (_, status) = run_for(host, Duration::from_secs(240)).await;
    // The run from 00:01:00 lasts until 00:03:30: 00:02 and 00:03 pass during it.
    assert_eq!(fires.get(), ["2026-01-01T00:01:00+00:00", "2026-01-01T00:04:00+00:00"]);
    assert_eq!(status.service("minutely").unwrap().runs.skipped, 2);
}

#[tokio::test(start_paused = true)]
async fn a_fire_during_a_run_can_be_kept_once() {
    let clock = WallClock::starting_at(utc(2026, 1, 1, 0, 0, 30));
    let fires = Fires::default();
    let job = CronService::new("minutely", "0 * * * * *", fires.handler(&clock, Duration::from_secs(150)))
        .overlap(Overlap::RunOnce)
        .clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    let (_, status) = run_for(host, Duration::from_secs(240)).await;
    assert_eq!(
        fires.get(),
        ["2026-01-01T00:01:00+00:00", "2026-01-01T00:03:30+00:00"],
        "one catch-up run at the end of the long run for the two fires that passed"
    );
    assert_eq!(status.service("minutely").unwrap().runs.skipped, 1);
}

#[tokio::test(start_paused = true)]
async fn fires_missed_while_stalled_fold_into_one_run() {
    let clock = WallClock::starting_at(utc(2026, 1, 1, 0, 0, 30));
    let fires = Fires::default();
    let job = CronService::new("minutely", "0 * * * * *", fires.handler(&clock, Duration::ZERO)).clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    // At 00:00:50 the process stalls for 200 s, until 00:04:10.
    tokio::spawn(async {
        tokio::time::sleep(Duration::from_secs(20)).await;
        tokio::time::advance(Duration::from_secs(200)).await;
    });
    let (_, status) = run_for(host, Duration::from_secs(300)).await;
    assert_eq!(fires.get(), ["2026-01-01T00:04:10+00:00", "2026-01-01T00:05:00+00:00"]);
    assert_eq!(status.service("minutely").unwrap().runs.skipped, 3);
}

#[tokio::test(start_paused = true)]
async fn trigger_runs_a_cron_service_now() {
    let clock = WallClock::starting_at(utc(2026, 1, 1, 0, 0, 0));
    let fires = Fires::default();
    let job = CronService::new("hourly", "0 0 * * * *", fires.handler(&clock, Duration::ZERO)).clock(clock);
    let host = builder().add(job.into_spec()).build().unwrap();
    let status = host.status();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(5)).await;
        status.trigger("hourly").unwrap();
    });
    run_for(host, Duration::from_secs(3700)).await;
    assert_eq!(fires.get(), ["2026-01-01T00:00:05+00:00", "2026-01-01T01:00:00+00:00"]);
}
