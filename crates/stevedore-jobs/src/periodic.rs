//! Periodic and cron jobs, enqueued once per tick across every worker sharing a store.
//!
//! Every worker with periodic jobs runs the scheduler, but only the elected leader (a lease
//! row with a TTL in `stevedore_leaders`) enqueues. Each tick is enqueued in one transaction
//! that advances the job's durable last tick (compare-and-set) and inserts the job with the
//! tick's time in its unique key, so a failover, a paused leader or two leaders at once can
//! neither double a tick nor drop one: the new leader continues from the stored last tick.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use tokio_util::sync::CancellationToken;

use crate::error::JobError;
use crate::job::{Job, NewJob};
use crate::store::JobStore;

/// Name of the leader election the scheduler takes part in.
pub const PERIODIC_ELECTION: &str = "stevedore.periodic";

#[derive(Clone)]
enum Schedule {
    Cron(Box<croner::Cron>),
    Every(Duration),
}

type MakeJob = Arc<dyn Fn(DateTime<Utc>) -> Result<NewJob, JobError> + Send + Sync>;

/// A job enqueued on a schedule: a cron pattern (seconds optional) or a fixed interval.
///
/// ```
/// use std::time::Duration;
/// use stevedore_jobs::{Job, PeriodicJob};
/// # #[derive(Clone, serde::Serialize, serde::Deserialize)] struct Digest;
/// # impl Job for Digest { const KIND: &'static str = "digest"; }
///
/// let nightly = PeriodicJob::cron("nightly-digest", "0 3 * * *", Digest)?;
/// let often = PeriodicJob::every("digest-every-minute", Duration::from_secs(60), Digest);
/// # Ok::<(), stevedore_jobs::JobError>(())
/// ```
#[derive(Clone)]
pub struct PeriodicJob {
    name: String,
    schedule: Schedule,
    make: MakeJob,
}

impl std::fmt::Debug for PeriodicJob {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let schedule = match &self.schedule {
            Schedule::Cron(c) => c.pattern.to_string(),
            Schedule::Every(d) => format!("every {d:?}"),
        };
        f.debug_struct("PeriodicJob").field("name", &self.name).field("schedule", &schedule).finish_non_exhaustive()
    }
}

impl PeriodicJob {
    /// Enqueues a copy of `job` at each time matching the cron `pattern` (UTC; 5 fields, or 6
    /// with seconds first). `name` identifies the schedule's stored state: keep it stable.
    pub fn cron<J: Job + Clone + Sync>(name: impl Into<String>, pattern: &str, job: J) -> Result<Self, JobError> {
        Self::cron_with(name, pattern, move |_tick| NewJob::new(&job))
    }

    /// Like [`cron`](Self::cron), building the job from the tick's time.
    pub fn cron_with(
        name: impl Into<String>,
        pattern: &str,
        make: impl Fn(DateTime<Utc>) -> Result<NewJob, JobError> + Send + Sync + 'static,
    ) -> Result<Self, JobError> {
        let name = name.into();
        let cron = croner::parser::CronParser::builder()
            .seconds(croner::parser::Seconds::Optional)
            .build()
            .parse(pattern)
            .map_err(|e| JobError::Schedule {
                name: name.clone(),
                pattern: pattern.to_string(),
                reason: e.to_string(),
            })?;
        Ok(Self { name, schedule: Schedule::Cron(Box::new(cron)), make: Arc::new(make) })
    }

    /// Enqueues a copy of `job` every `interval` (ticks aligned to multiples of the interval
    /// since the Unix epoch, so every process computes the same ticks; at least 1 s).
    pub fn every<J: Job + Clone + Sync>(name: impl Into<String>, interval: Duration, job: J) -> Self {
        Self::every_with(name, interval, move |_tick| NewJob::new(&job))
    }

    /// Like [`every`](Self::every), building the job from the tick's time.
    pub fn every_with(
        name: impl Into<String>,
        interval: Duration,
        make: impl Fn(DateTime<Utc>) -> Result<NewJob, JobError> + Send + Sync + 'static,
    ) -> Self {
        let interval = interval.max(Duration::from_secs(1));
        Self { name: name.into(), schedule: Schedule::Every(interval), make: Arc::new(make) }
    }

    /// The schedule's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The unique key of the job enqueued for `tick`.
    pub fn unique_key(&self, tick: DateTime<Utc>) -> String {
        format!("periodic:{}:{}", self.name, tick.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
    }

    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match &self.schedule {
            Schedule::Cron(cron) => cron.find_next_occurrence(&t, false).ok(),
            Schedule::Every(every) => {
                let every_ms = i64::try_from(every.as_millis()).ok()?.max(1);
                let ms = t.timestamp_millis();
                let next = (ms.div_euclid(every_ms) + 1).checked_mul(every_ms)?;
                DateTime::from_timestamp_millis(next)
            }
        }
    }

    /// Ticks after `last` up to and including `now`, at most `max` (the latest ones).
    fn due_ticks(&self, last: DateTime<Utc>, now: DateTime<Utc>, max: usize) -> Vec<DateTime<Utc>> {
        let mut ticks = Vec::new();
        let mut t = last;
        while let Some(next) = self.next_after(t) {
            if next > now {
                break;
            }
            ticks.push(next);
            if ticks.len() > max.max(1) {
                ticks.remove(0);
            }
            t = next;
        }
        ticks
    }

    fn job_for(&self, tick: DateTime<Utc>) -> Result<NewJob, JobError> {
        Ok((self.make)(tick)?.unique_key(self.unique_key(tick)).run_at(tick))
    }
}

/// The scheduler loop run by each worker that has periodic jobs.
pub(crate) async fn run_scheduler<S: JobStore>(
    store: S,
    jobs: Vec<PeriodicJob>,
    owner: String,
    ttl: Duration,
    max_catch_up: usize,
    stop: CancellationToken,
) {
    let renew = (ttl / 3).max(Duration::from_millis(50));
    let mut leading = false;
    loop {
        let mut sleep = renew;
        match store.try_lead(PERIODIC_ELECTION, &owner, ttl).await {
            Ok(now_leading) => {
                if now_leading != leading {
                    tracing::info!(worker = %owner, leading = now_leading, "periodic scheduler leadership changed");
                }
                leading = now_leading;
            }
            Err(error) => {
                tracing::warn!(%error, "periodic scheduler: election failed");
                leading = false;
            }
        }
        if leading {
            match enqueue_due(&store, &jobs, max_catch_up).await {
                Ok(Some(until_next)) => sleep = sleep.min(until_next),
                Ok(None) => {}
                Err(error) => tracing::warn!(%error, "periodic scheduler: enqueue failed; retrying"),
            }
        }
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tokio::time::sleep(sleep) => {}
        }
    }
    if leading && let Err(error) = store.resign(PERIODIC_ELECTION, &owner).await {
        tracing::warn!(%error, "periodic scheduler: could not resign; the lease expires by itself");
    }
}

/// Enqueues every due tick; returns the time until the next tick of any job.
async fn enqueue_due<S: JobStore>(
    store: &S,
    jobs: &[PeriodicJob],
    max_catch_up: usize,
) -> Result<Option<Duration>, JobError> {
    let now = store.now().await?;
    let mut next_any: Option<DateTime<Utc>> = None;
    for job in jobs {
        let mut last = store.periodic_state(&job.name, now).await?;
        let ticks = job.due_ticks(last, now, max_catch_up);
        if let Some(first) = ticks.first()
            && job.next_after(last) != Some(*first)
        {
            tracing::warn!(periodic = %job.name, "skipping missed ticks older than the catch-up limit");
        }
        for tick in ticks {
            let new_job = job.job_for(tick)?;
            if !store.enqueue_tick(&job.name, last, tick, &new_job).await? {
                // Another scheduler advanced it: it enqueued this tick.
                break;
            }
            tracing::debug!(periodic = %job.name, %tick, "enqueued periodic job");
            last = tick;
        }
        if let Some(next) = job.next_after(now.max(last)) {
            next_any = Some(next_any.map_or(next, |n| n.min(next)));
        }
    }
    Ok(next_any.map(|next| {
        let delta = next - now + TimeDelta::milliseconds(5);
        delta.to_std().unwrap_or(Duration::from_millis(5))
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).map(|d| d.with_timezone(&Utc)).unwrap()
    }

    #[test]
    fn interval_ticks_are_aligned_and_capped() {
        let p = PeriodicJob::every_with("p", Duration::from_secs(10), |_| Ok(NewJob::raw("k", "{}")));
        assert_eq!(p.next_after(at("2026-01-01T00:00:03Z")), Some(at("2026-01-01T00:00:10Z")));
        assert_eq!(p.next_after(at("2026-01-01T00:00:10Z")), Some(at("2026-01-01T00:00:20Z")));
        let ticks = p.due_ticks(at("2026-01-01T00:00:00Z"), at("2026-01-01T00:01:00Z"), 3);
        assert_eq!(ticks, vec![at("2026-01-01T00:00:40Z"), at("2026-01-01T00:00:50Z"), at("2026-01-01T00:01:00Z")]);
    }

    #[test]
    fn cron_with_seconds_and_bad_pattern() {
        let p = PeriodicJob::cron_with("c", "*/5 * * * * *", |_| Ok(NewJob::raw("k", "{}"))).unwrap();
        assert_eq!(p.next_after(at("2026-01-01T00:00:03Z")), Some(at("2026-01-01T00:00:05Z")));
        let err = PeriodicJob::cron_with("bad", "61 * * * *", |_| Ok(NewJob::raw("k", "{}"))).unwrap_err();
        assert!(err.to_string().contains("bad"), "{err}");
        assert!(p.unique_key(at("2026-01-01T00:00:05Z")).ends_with("2026-01-01T00:00:05.000Z"));
    }
}
