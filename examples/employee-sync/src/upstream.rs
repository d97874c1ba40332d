//! The employee API the sync reads: a real HTTP GET, and a simulated API to read from by default.
//!
//! The simulation is a pure function of the wall clock: every `change_every` the roster moves on
//! (people join and leave, change title or department), and every process computes the same roster
//! for the same moment, so web and worker processes agree without talking to each other.

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, Uri};
use axum::routing::get;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use stevedore_web::LocalAddr;

use crate::config::Config;
use crate::db::Employee;

/// The largest response accepted from the upstream.
const MAX_BODY: usize = 4 * 1024 * 1024;

/// Why the upstream could not be read. Each names the URL.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The simulated upstream is this process's own server, which is not listening yet.
    #[error("the simulated upstream is not listening yet")]
    NotListening,
    /// The URL is not a valid URI.
    #[error("upstream URL {url:?} is invalid: {reason}")]
    BadUrl {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// Connecting or sending failed.
    #[error("GET {url} failed: {source}")]
    Request {
        /// The URL.
        url: String,
        /// The client's error.
        source: hyper_util::client::legacy::Error,
    },
    /// The request took too long.
    #[error("GET {url} took longer than {after:?}")]
    Timeout {
        /// The URL.
        url: String,
        /// The limit.
        after: Duration,
    },
    /// The answer was not 200.
    #[error("GET {url} answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status.
        status: StatusCode,
    },
    /// The body could not be read (or exceeded 4 MiB).
    #[error("GET {url}: reading the body failed: {reason}")]
    Body {
        /// The URL.
        url: String,
        /// Why.
        reason: String,
    },
    /// The body is not a JSON list of employees.
    #[error("GET {url}: not a list of employees: {source}")]
    Json {
        /// The URL.
        url: String,
        /// serde's error.
        source: serde_json::Error,
    },
    /// The list breaks a rule the sync relies on.
    #[error("GET {url}: invalid employee list: {reason}")]
    Invalid {
        /// The URL.
        url: String,
        /// Which rule.
        reason: String,
    },
}

/// Where the upstream is.
#[derive(Debug, Clone)]
enum Target {
    Url(String),
    Own(LocalAddr),
}

/// The client for the employee API; a singleton.
#[derive(Debug, Clone)]
pub struct Upstream {
    client: Client<HttpConnector, Empty<Bytes>>,
    target: Target,
    timeout: Duration,
}

impl Upstream {
    /// `url`, or this process's own simulated upstream once its server listens.
    pub fn new(url: Option<String>, own: LocalAddr, timeout: Duration) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(timeout));
        let client = Client::builder(TokioExecutor::new()).build(connector);
        let target = match url {
            Some(u) => Target::Url(u),
            None => Target::Own(own),
        };
        Upstream { client, target, timeout }
    }

    fn url(&self) -> Result<String, UpstreamError> {
        match &self.target {
            Target::Url(u) => Ok(u.clone()),
            Target::Own(local) => {
                let addr = local.get().ok_or(UpstreamError::NotListening)?;
                Ok(format!("http://{}/upstream/employees", Config::local_target(addr)))
            }
        }
    }

    /// GETs the employee list and checks it: ids unique and non-empty, e-mails with an `@`.
    pub async fn fetch(&self) -> Result<Vec<Employee>, UpstreamError> {
        let url = self.url()?;
        let uri: Uri = url.parse().map_err(|e: axum::http::uri::InvalidUri| UpstreamError::BadUrl {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let work = async {
            let response =
                self.client.get(uri).await.map_err(|source| UpstreamError::Request { url: url.clone(), source })?;
            if response.status() != StatusCode::OK {
                return Err(UpstreamError::Status { url: url.clone(), status: response.status() });
            }
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| UpstreamError::Body { url: url.clone(), reason: e.to_string() })?
                .to_bytes();
            serde_json::from_slice::<Vec<Employee>>(&body)
                .map_err(|source| UpstreamError::Json { url: url.clone(), source })
        };
        let list = tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| UpstreamError::Timeout { url: url.clone(), after: self.timeout })??;
        let mut seen = std::collections::HashSet::new();
        for e in &list {
            if e.id.trim().is_empty() {
                return Err(UpstreamError::Invalid { url, reason: "an employee has an empty id".into() });
            }
            if !seen.insert(e.id.as_str()) {
                return Err(UpstreamError::Invalid { url, reason: format!("employee id {:?} appears twice", e.id) });
            }
            if !e.email.contains('@') {
                return Err(UpstreamError::Invalid { url, reason: format!("employee {}: e-mail {:?}", e.id, e.email) });
            }
        }
        Ok(list)
    }
}

/// `GET /upstream/employees`: the simulated employee API.
pub fn routes(change_every: Duration) -> Router {
    Router::new().route("/upstream/employees", get(employees)).with_state(change_every)
}

async fn employees(State(change_every): State<Duration>) -> axum::Json<Vec<Employee>> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    let epoch = (now.as_millis() / change_every.as_millis().max(1)) as u64;
    axum::Json(roster(epoch))
}

const FIRST: [&str; 16] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken", "Margaret", "Dennis", "Radia", "Niklaus",
    "Hedy", "John", "Sophie", "Tony",
];
const LAST: [&str; 16] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson", "Hamilton", "Ritchie",
    "Perlman", "Wirth", "Lamarr", "Backus", "Wilson", "Hoare",
];
const DEPARTMENTS: [&str; 5] = ["Engineering", "Research", "Operations", "Finance", "People"];
const TITLES: [&str; 6] = ["Engineer", "Senior Engineer", "Staff Engineer", "Manager", "Analyst", "Director"];

fn mix(mut x: u64) -> u64 {
    // splitmix64: a fixed, well-spread hash, so every process draws the same roster.
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// The roster at `epoch`: most of 16 people, each with a department and a title that move on.
pub fn roster(epoch: u64) -> Vec<Employee> {
    (0..FIRST.len() as u64)
        .filter(|&i| i < 8 || !mix(i * 1_000_003 + epoch).is_multiple_of(4))
        .map(|i| {
            let (first, last) = (FIRST[i as usize], LAST[i as usize]);
            Employee {
                id: format!("e-{:03}", i + 1),
                name: format!("{first} {last}"),
                email: format!("{}.{}@example.com", first.to_lowercase(), last.to_lowercase()),
                department: DEPARTMENTS[(mix(i * 7919 + epoch / 3) % DEPARTMENTS.len() as u64) as usize].to_string(),
                title: TITLES[(mix(i * 104_729 + epoch / 2) % TITLES.len() as u64) as usize].to_string(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::roster;

    #[test]
    fn the_roster_is_a_function_of_time_and_moves_on() {
        assert_eq!(roster(42), roster(42));
        let changed = (0..20).filter(|&k| roster(k) != roster(k + 1)).count();
        assert!(changed >= 15, "the data changes from one period to the next ({changed} of 20)");
        assert!(roster(1).len() >= 8);
    }
}
