//! Test helpers shared by the Stevedore crates.
//!
//! Tests talk to the real PostgreSQL, RabbitMQ and NATS on the machine. When one of them is
//! unreachable, a developer's run skips the test with a loud message, but a run with `CI=true`
//! fails: CI must never pass because a service was down.
#![deny(missing_docs)]

use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// A service the tests depend on, with the address it listens on.
#[derive(Debug, Clone, Copy)]
pub struct ServiceAddr {
    /// Human name, used in the skip or failure message.
    pub name: &'static str,
    /// `host:port` to probe with a TCP connect.
    pub addr: &'static str,
}

/// PostgreSQL on the loopback interface (trust auth, database `test`).
pub const POSTGRES: ServiceAddr = ServiceAddr { name: "PostgreSQL", addr: "127.0.0.1:5432" };
/// RabbitMQ's AMQP port (guest/guest).
pub const RABBITMQ: ServiceAddr = ServiceAddr { name: "RabbitMQ", addr: "127.0.0.1:5672" };
/// NATS with JetStream.
pub const NATS: ServiceAddr = ServiceAddr { name: "NATS", addr: "127.0.0.1:4222" };

/// Connection URL of the PostgreSQL test database; `STEVEDORE_TEST_PG_URL` overrides it.
pub fn postgres_url() -> String {
    std::env::var("STEVEDORE_TEST_PG_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string())
}

/// Connection URL of RabbitMQ; `STEVEDORE_TEST_AMQP_URL` overrides it.
pub fn amqp_url() -> String {
    std::env::var("STEVEDORE_TEST_AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
}

/// Connection URL of NATS; `STEVEDORE_TEST_NATS_URL` overrides it.
pub fn nats_url() -> String {
    std::env::var("STEVEDORE_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_string())
}

/// True when running under CI (`CI=true`), where a missing service is a failure, not a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").map(|v| v == "true" || v == "1").unwrap_or(false)
}

/// Returns true when `service` accepts TCP connections. When it does not: under CI this panics
/// (the test fails), elsewhere it prints a loud skip message to stderr and returns false.
///
/// ```no_run
/// if !stevedore_testkit::require(stevedore_testkit::POSTGRES) {
///     return; // skipped on a laptop without PostgreSQL
/// }
/// ```
pub fn require(service: ServiceAddr) -> bool {
    if reachable(service.addr) {
        return true;
    }
    let message = format!("{} is not reachable at {}: the test needs the real service", service.name, service.addr);
    if in_ci() {
        panic!("{message} (CI=true, so this is a failure, not a skip)");
    }
    eprintln!("\n!!!!!!!! SKIPPED: {message} !!!!!!!!\n");
    false
}

fn reachable(addr: &str) -> bool {
    let Ok(mut addrs) = addr.to_socket_addrs() else {
        return false;
    };
    addrs.any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}
