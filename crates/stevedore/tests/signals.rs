//! The real signal path: an example binary run as a child process, sent SIGTERM.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn example(name: &str) -> PathBuf {
    // Integration tests live in target/<profile>/deps; `cargo test` builds examples beside them.
    let exe = std::env::current_exe().expect("test binary path");
    let dir = exe.parent().and_then(|d| d.parent()).expect("target dir").join("examples");
    let path = dir.join(name);
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-p", "stevedore", "--example", name])
            .status()
            .expect("cargo build runs");
        assert!(status.success(), "building example {name} failed");
    }
    path
}

fn spawn(name: &str, envs: &[(&str, &str)]) -> (Child, std::thread::JoinHandle<()>) {
    let mut cmd = Command::new(example(name));
    cmd.stdout(Stdio::piped()).stderr(Stdio::null()).env_remove("STEVEDORE_SHUTDOWN_DELAY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("example starts");
    let mut out = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    while !line.starts_with("READY") {
        line.clear();
        let n = out.read_line(&mut line).expect("reads the child's output");
        assert!(n > 0, "the child ended before printing READY");
    }
    // Keep draining, so the child never blocks on a full pipe.
    let drain = std::thread::spawn(move || for _ in out.lines() {});
    (child, drain)
}

fn sigterm(child: &Child) {
    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().expect("kill runs");
    assert!(status.success());
}

fn wait_with_limit(child: &mut Child, limit: Duration) -> (std::process::ExitStatus, Duration) {
    let began = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return (status, began.elapsed());
        }
        if began.elapsed() > limit {
            let _ = child.kill();
            panic!("the process outlived {limit:?} after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn sigterm_stops_cleanly_with_exit_code_zero() {
    let (mut child, _out) = spawn("05_stubborn_service", &[("STUBBORN", "0"), ("STEVEDORE_SHUTDOWN_TIMEOUT", "3s")]);
    sigterm(&child);
    let (status, took) = wait_with_limit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(0));
    assert!(took < Duration::from_secs(3), "a clean stop does not wait for the budget: {took:?}");
}

#[test]
fn a_service_ignoring_cancellation_exits_non_zero_just_after_the_budget() {
    let (mut child, _out) = spawn("05_stubborn_service", &[("STUBBORN", "1"), ("STEVEDORE_SHUTDOWN_TIMEOUT", "1s")]);
    sigterm(&child);
    let (status, took) = wait_with_limit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2), "abandoned service means exit code 2");
    assert!(took >= Duration::from_secs(1), "waited the budget: {took:?}");
    // "Just after": process start-up noise aside, well under half a second past the budget.
    assert!(took < Duration::from_millis(1500), "outlived the budget by too much: {took:?}");
}

#[test]
fn a_second_sigterm_ends_the_wait_at_once() {
    let (mut child, _out) = spawn("05_stubborn_service", &[("STUBBORN", "1"), ("STEVEDORE_SHUTDOWN_TIMEOUT", "30s")]);
    sigterm(&child);
    std::thread::sleep(Duration::from_millis(200));
    sigterm(&child);
    let (status, took) = wait_with_limit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(2));
    assert!(took < Duration::from_secs(5), "the second signal cut the 30 s budget short: {took:?}");
}
