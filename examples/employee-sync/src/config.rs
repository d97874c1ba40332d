//! Settings: flags, `STEVEDORE_...` environment variables and a JSON config file, resolved and checked
//! once at start so that a bad value stops the process before anything runs.
//!
//! Precedence: a flag beats its environment variable (clap's `env` feature), which beats the config
//! file, which beats the built-in default. The file is JSON (no new dependency; the keys are the flag
//! names, e.g. `{"role": "worker", "sync-interval": "30s"}`); unknown keys are refused, so a typo is
//! an error rather than a silently ignored setting.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};
use serde::{Deserialize, Deserializer};

/// Which part of the system this process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Everything in one process: web API, job worker, timer, relay and consumer.
    All,
    /// The web API only: enqueues jobs, serves reads, health, metrics and the dashboard.
    Web,
    /// Background work only: jobs, the cluster-wide timed sync, the outbox relay and the consumer
    /// (plus health, metrics and the dashboard for probes and operators).
    Worker,
}

impl Role {
    /// The name used on the command line.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::All => "all",
            Role::Web => "web",
            Role::Worker => "worker",
        }
    }
}

/// The settings as given (flags, environment, file); every field is optional until resolved.
#[derive(Debug, Default, Parser, Deserialize)]
#[command(
    name = "employee-sync",
    version,
    about = "Syncs employees from an HTTP API every minute, publishes changes through an outbox, and serves a web API.",
    long_about = "Syncs employees from an HTTP API every minute, publishes changes through an outbox, and serves a web API.\n\n\
                  Every flag can also be set with its environment variable (shown below) or in a JSON file given with \
                  --config; a flag beats its variable, which beats the file."
)]
#[serde(rename_all = "kebab-case", deny_unknown_fields, default)]
pub struct Settings {
    /// A JSON file with any of these settings, keyed by flag name (e.g. {"role": "worker"}).
    #[arg(long, env = "STEVEDORE_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,

    /// all (default): one process, SQLite and an in-process bus; web or worker: separate roles on
    /// PostgreSQL and a broker.
    #[arg(long, env = "STEVEDORE_ROLE", value_enum)]
    pub role: Option<Role>,

    /// sqlite://FILE (default for --role all: sqlite://employee-sync.db in the current directory) or
    /// postgres://USER@HOST/DB (required for --role web and --role worker).
    #[arg(long, env = "STEVEDORE_DATABASE_URL")]
    pub database_url: Option<String>,

    /// amqp://USER:PASS@HOST:PORT/VHOST or nats://HOST:PORT; none means the in-process bus (--role all).
    #[arg(long, env = "STEVEDORE_BUS_URL")]
    pub bus_url: Option<String>,

    /// The exchange (RabbitMQ) or stream (NATS) and queue-name prefix on the broker [default: employee-sync].
    #[arg(long, env = "STEVEDORE_BUS_NAME")]
    pub bus_name: Option<String>,

    /// Address the web server listens on [default: 127.0.0.1:8080].
    #[arg(long, env = "STEVEDORE_LISTEN")]
    pub listen: Option<String>,

    /// The employee API to sync from [default: this process's simulated upstream,
    /// http://LISTEN/upstream/employees]. Plain http:// only.
    #[arg(long, env = "STEVEDORE_UPSTREAM_URL")]
    pub upstream_url: Option<String>,

    /// How long one upstream request may take [default: 10s].
    #[arg(long, env = "STEVEDORE_UPSTREAM_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub upstream_timeout: Option<Duration>,

    /// How often the simulated upstream's data changes [default: 20s].
    #[arg(long, env = "STEVEDORE_SIMULATED_CHANGE_EVERY", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub simulated_change_every: Option<Duration>,

    /// How often the timed sync runs [default: 60s]. With --role worker it runs once per cluster.
    #[arg(long, env = "STEVEDORE_SYNC_INTERVAL", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub sync_interval: Option<Duration>,

    /// The one budget for the whole graceful stop [default: 10s].
    #[arg(long, env = "STEVEDORE_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub shutdown_timeout: Option<Duration>,

    /// Time between SIGTERM and the stop, while /health/ready already answers 503 [default: 0s].
    #[arg(long, env = "STEVEDORE_SHUTDOWN_DELAY", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub shutdown_delay: Option<Duration>,

    /// How long a job stays leased to a worker without a heartbeat; a killed worker's jobs run
    /// again this long after its last heartbeat [default: 30s].
    #[arg(long, env = "STEVEDORE_JOB_LEASE_TTL", value_parser = humantime::parse_duration)]
    #[serde(deserialize_with = "duration")]
    pub job_lease_ttl: Option<Duration>,

    /// Report jobs run at once by one worker process [default: 2].
    #[arg(long, env = "STEVEDORE_REPORT_CONCURRENCY")]
    pub report_concurrency: Option<usize>,

    /// Most PostgreSQL connections of this process [default: 10].
    #[arg(long, env = "STEVEDORE_DATABASE_MAX_CONNECTIONS")]
    pub database_max_connections: Option<u32>,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    let text: Option<String> = Option::deserialize(d)?;
    text.map(|t| humantime::parse_duration(&t).map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}")))).transpose()
}

/// A setting that cannot work, found at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read the config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The config file is not valid JSON for these settings.
    #[error("config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// serde's error, with line and column.
        source: serde_json::Error,
    },
    /// One setting is wrong.
    #[error("invalid setting `{setting}`: {reason}")]
    Invalid {
        /// The flag name.
        setting: &'static str,
        /// What is wrong and what would work.
        reason: String,
    },
}

fn invalid(setting: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { setting, reason: reason.into() }
}

/// Where the data lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// An embedded SQLite file.
    Sqlite(String),
    /// A PostgreSQL server shared by every process.
    Postgres(String),
}

/// Which bus carries the events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusUrl {
    /// In process: nothing to run, nothing survives the process.
    InProcess,
    /// RabbitMQ.
    Amqp(String),
    /// NATS JetStream.
    Nats(String),
}

/// The resolved, checked settings.
#[derive(Debug, Clone)]
pub struct Config {
    /// The role.
    pub role: Role,
    /// The database.
    pub database: DatabaseUrl,
    /// The bus.
    pub bus: BusUrl,
    /// Exchange / stream / queue prefix.
    pub bus_name: String,
    /// The listen address as given.
    pub listen: String,
    /// `None`: this process's simulated upstream.
    pub upstream_url: Option<String>,
    /// Per-request limit of the upstream call.
    pub upstream_timeout: Duration,
    /// How often the simulated data changes.
    pub simulated_change_every: Duration,
    /// The timed sync's period.
    pub sync_interval: Duration,
    /// The shutdown budget.
    pub shutdown_timeout: Duration,
    /// The shutdown delay.
    pub shutdown_delay: Duration,
    /// Job lease TTL.
    pub job_lease_ttl: Duration,
    /// Report concurrency per worker.
    pub report_concurrency: usize,
    /// PostgreSQL pool size.
    pub database_max_connections: u32,
}

impl Settings {
    /// Flags and environment, merged over the config file they name (if any).
    pub fn load(self) -> Result<Settings, ConfigError> {
        let Some(path) = self.config.clone() else { return Ok(self) };
        let text = std::fs::read_to_string(&path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        let file: Settings = serde_json::from_str(&text).map_err(|source| ConfigError::Parse { path, source })?;
        Ok(self.over(file))
    }

    /// `self`'s values where set, else `base`'s.
    fn over(self, base: Settings) -> Settings {
        Settings {
            config: self.config,
            role: self.role.or(base.role),
            database_url: self.database_url.or(base.database_url),
            bus_url: self.bus_url.or(base.bus_url),
            bus_name: self.bus_name.or(base.bus_name),
            listen: self.listen.or(base.listen),
            upstream_url: self.upstream_url.or(base.upstream_url),
            upstream_timeout: self.upstream_timeout.or(base.upstream_timeout),
            simulated_change_every: self.simulated_change_every.or(base.simulated_change_every),
            sync_interval: self.sync_interval.or(base.sync_interval),
            shutdown_timeout: self.shutdown_timeout.or(base.shutdown_timeout),
            shutdown_delay: self.shutdown_delay.or(base.shutdown_delay),
            job_lease_ttl: self.job_lease_ttl.or(base.job_lease_ttl),
            report_concurrency: self.report_concurrency.or(base.report_concurrency),
            database_max_connections: self.database_max_connections.or(base.database_max_connections),
        }
    }

    /// Applies the defaults and checks every value.
    pub fn resolve(self) -> Result<Config, ConfigError> {
        let role = self.role.unwrap_or(Role::All);
        let database = match self.database_url.as_deref().map(str::trim) {
            None | Some("") if role == Role::All => DatabaseUrl::Sqlite("sqlite://employee-sync.db".into()),
            None | Some("") => {
                return Err(invalid(
                    "database-url",
                    format!(
                        "--role {} needs --database-url postgres://USER@HOST/DB (web and worker processes share \
                         their jobs and data through PostgreSQL)",
                        role.as_str()
                    ),
                ));
            }
            Some(url) if url.starts_with("sqlite:") => {
                if role != Role::All {
                    return Err(invalid(
                        "database-url",
                        format!(
                            "--role {} cannot use SQLite ({url}): a SQLite file belongs to one process; use \
                             postgres://... or --role all",
                            role.as_str()
                        ),
                    ));
                }
                DatabaseUrl::Sqlite(url.to_string())
            }
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                DatabaseUrl::Postgres(url.to_string())
            }
            Some(url) => {
                return Err(invalid(
                    "database-url",
                    format!("{url:?} is neither sqlite://FILE nor postgres://USER@HOST/DB"),
                ));
            }
        };
        let bus = match self.bus_url.as_deref().map(str::trim) {
            None | Some("") => BusUrl::InProcess,
            Some(url) if url.starts_with("amqp://") || url.starts_with("amqps://") => BusUrl::Amqp(url.to_string()),
            Some(url) if url.starts_with("nats://") => BusUrl::Nats(url.to_string()),
            Some(url) => {
                return Err(invalid(
                    "bus-url",
                    format!("{url:?} is neither amqp://... (RabbitMQ) nor nats://... (NATS)"),
                ));
            }
        };
        if role == Role::Worker && bus == BusUrl::InProcess {
            return Err(invalid(
                "bus-url",
                "--role worker needs --bus-url amqp://... or nats://...: with an in-process bus, events relayed by \
                 a worker that dies would be lost",
            ));
        }
        let bus_name = self.bus_name.unwrap_or_else(|| "employee-sync".into());
        if bus_name.is_empty() || !bus_name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(invalid("bus-name", format!("{bus_name:?}: use letters, digits, '-' and '_' only")));
        }
        let listen = self.listen.unwrap_or_else(|| "127.0.0.1:8080".into());
        if listen.parse::<SocketAddr>().is_err() {
            return Err(invalid(
                "listen",
                format!("{listen:?} is not an address such as 127.0.0.1:8080 or 0.0.0.0:8080"),
            ));
        }
        let upstream_url = match self.upstream_url.map(|u| u.trim().to_string()).filter(|u| !u.is_empty()) {
            None => None,
            Some(u) if u.starts_with("http://") => {
                u.parse::<axum::http::Uri>().map_err(|e| invalid("upstream-url", format!("{u:?}: {e}")))?;
                Some(u)
            }
            Some(u) => {
                return Err(invalid(
                    "upstream-url",
                    format!(
                        "{u:?}: only plain http:// is supported by this example's client (put a TLS-terminating \
                         proxy or sidecar in front of an https API)"
                    ),
                ));
            }
        };
        let positive = |setting: &'static str, value: Option<Duration>, default: Duration| match value {
            Some(d) if d.is_zero() => Err(invalid(setting, "must be above zero")),
            Some(d) => Ok(d),
            None => Ok(default),
        };
        let config = Config {
            role,
            database,
            bus,
            bus_name,
            listen,
            upstream_url,
            upstream_timeout: positive("upstream-timeout", self.upstream_timeout, Duration::from_secs(10))?,
            simulated_change_every: positive(
                "simulated-change-every",
                self.simulated_change_every,
                Duration::from_secs(20),
            )?,
            sync_interval: positive("sync-interval", self.sync_interval, Duration::from_secs(60))?,
            shutdown_timeout: positive("shutdown-timeout", self.shutdown_timeout, Duration::from_secs(10))?,
            shutdown_delay: self.shutdown_delay.unwrap_or(Duration::ZERO),
            job_lease_ttl: positive("job-lease-ttl", self.job_lease_ttl, Duration::from_secs(30))?,
            report_concurrency: match self.report_concurrency {
                Some(0) => return Err(invalid("report-concurrency", "must be at least 1")),
                Some(n) => n,
                None => 2,
            },
            database_max_connections: match self.database_max_connections {
                Some(n) if n < 2 => {
                    return Err(invalid(
                        "database-max-connections",
                        "must be at least 2 (a job runs while the worker records another's outcome)",
                    ));
                }
                Some(n) => n,
                None => 10,
            },
        };
        if config.role != Role::Web && config.sync_interval < Duration::from_secs(1) {
            return Err(invalid("sync-interval", "must be at least 1s"));
        }
        if config.job_lease_ttl < Duration::from_secs(1) {
            return Err(invalid("job-lease-ttl", "must be at least 1s (heartbeats go every third of it)"));
        }
        Ok(config)
    }
}

impl Config {
    /// The address to reach this process's own listener from inside it (an unspecified address
    /// such as 0.0.0.0 becomes loopback).
    pub fn local_target(addr: SocketAddr) -> SocketAddr {
        let ip = if addr.ip().is_unspecified() { IpAddr::V4(Ipv4Addr::LOCALHOST) } else { addr.ip() };
        SocketAddr::new(ip, addr.port())
    }

    /// Part of the shutdown budget the job worker and the consumer may spend draining, leaving a
    /// second for releasing what is left.
    pub fn drain_budget(&self) -> Duration {
        let budget = self.shutdown_timeout;
        budget.saturating_sub(Duration::from_secs(1)).max(budget / 2)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["employee-sync"];
        all.extend_from_slice(args);
        Settings::try_parse_from(all).expect("flags parse").resolve()
    }

    #[test]
    fn defaults_need_nothing() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.role, Role::All);
        assert_eq!(c.database, DatabaseUrl::Sqlite("sqlite://employee-sync.db".into()));
        assert_eq!(c.bus, BusUrl::InProcess);
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.sync_interval, Duration::from_secs(60));
    }

    #[test]
    fn bad_values_name_the_setting() {
        let e = parse(&["--role", "worker"]).unwrap_err().to_string();
        assert!(e.contains("`database-url`") && e.contains("postgres://"), "{e}");
        let e = parse(&["--role", "worker", "--database-url", "postgres://x@h/db"]).unwrap_err().to_string();
        assert!(e.contains("`bus-url`"), "{e}");
        let e = parse(&["--role", "web", "--database-url", "sqlite://a.db"]).unwrap_err().to_string();
        assert!(e.contains("cannot use SQLite"), "{e}");
        let e = parse(&["--listen", "nowhere"]).unwrap_err().to_string();
        assert!(e.contains("`listen`"), "{e}");
        let e = parse(&["--upstream-url", "https://api.example.com"]).unwrap_err().to_string();
        assert!(e.contains("only plain http://"), "{e}");
        let e = parse(&["--sync-interval", "0s"]).unwrap_err().to_string();
        assert!(e.contains("`sync-interval`: must be above zero"), "{e}");
        let e = parse(&["--bus-url", "kafka://x"]).unwrap_err().to_string();
        assert!(e.contains("`bus-url`"), "{e}");
    }

    #[test]
    fn file_fills_what_flags_leave() {
        let dir = std::env::temp_dir().join(format!("employee-sync-config-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, r#"{"role": "web", "database-url": "postgres://a@b/c", "sync-interval": "30s"}"#)
            .unwrap();
        let settings = Settings::try_parse_from(["x", "--config", path.to_str().unwrap(), "--role", "all"]).unwrap();
        let c = settings.load().unwrap().resolve().unwrap();
        assert_eq!(c.role, Role::All, "the flag wins over the file");
        assert_eq!(c.database, DatabaseUrl::Postgres("postgres://a@b/c".into()));
        assert_eq!(c.sync_interval, Duration::from_secs(30));

        std::fs::write(&path, r#"{"sync-intervall": "30s"}"#).unwrap();
        let settings = Settings::try_parse_from(["x", "--config", path.to_str().unwrap()]).unwrap();
        let e = settings.load().unwrap_err().to_string();
        assert!(e.contains("unknown field `sync-intervall`") && e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}
