//! Helpers for tests that run the real binaries: start, probe over HTTP, signal, read logs.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

/// A free loopback port (bound and released: another process could take it in between, which
/// the tests would report as a bind failure naming the address).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A running `employee-sync` process with its log file.
pub struct App {
    pub name: String,
    pub addr: SocketAddr,
    pub child: Child,
    pub log: PathBuf,
}

/// Starts `employee-sync` in `cwd` with `args` (plus `--listen` on a free port), logging to a file.
pub fn start(name: &str, cwd: &Path, args: &[String]) -> App {
    let port = free_port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let log = cwd.join(format!("{name}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let err = out.try_clone().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_employee-sync"));
    for (k, _) in std::env::vars() {
        if k.starts_with("STEVEDORE_") {
            cmd.env_remove(k);
        }
    }
    let child = cmd
        .current_dir(cwd)
        .env("RUST_LOG", "info,sqlx=warn")
        .env("NO_COLOR", "1")
        .arg("--listen")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .kill_on_drop(true)
        .spawn()
        .expect("start employee-sync");
    App { name: name.to_string(), addr, child, log }
}

impl App {
    /// The last lines of its log, for failure messages.
    pub fn tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(40);
        format!("--- {} ({}) ---\n{}", self.name, self.log.display(), lines[from..].join("\n"))
    }

    /// Sends SIGTERM (a graceful stop).
    pub fn terminate(&self) {
        let pid = self.child.id().expect("still running").to_string();
        let ok = std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success();
        assert!(ok, "kill -TERM {pid}");
    }

    /// Sends SIGKILL: no chance to clean up.
    pub fn kill(&mut self) {
        self.child.start_kill().expect("SIGKILL");
    }

    /// Waits for the process to exit and returns its code (`None`: killed by a signal).
    pub async fn wait(&mut self, limit: Duration) -> Option<i32> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?}\n{}", self.name, self.tail()))
            .unwrap();
        status.code()
    }

    /// GET or POST `path`; `(status, body)`.
    pub fn http(&self, method: &str, path: &str, body: &str) -> (u16, String) {
        http(self.addr, method, path, body)
    }

    /// `http` for a JSON answer.
    pub fn json(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (status, text) = self.http(method, path, body);
        let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{method} {path}: not JSON ({e}): {text}"));
        (status, value)
    }

    /// Waits until `/health/ready` answers 200.
    pub async fn ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok((200, _)) = try_http(self.addr, "GET", "/health/ready", "") {
                return;
            }
            assert!(Instant::now() < deadline, "{} was not ready within {limit:?}\n{}", self.name, self.tail());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// One HTTP/1.0 request; panics naming the request when the connection fails.
pub fn http(addr: SocketAddr, method: &str, path: &str, body: &str) -> (u16, String) {
    try_http(addr, method, path, body).unwrap_or_else(|e| panic!("{method} http://{addr}{path}: {e}"))
}

/// One HTTP/1.0 request (the server closes the connection after answering).
pub fn try_http(addr: SocketAddr, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    conn.set_read_timeout(Some(Duration::from_secs(20)))?;
    let request = format!(
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    conn.write_all(request.as_bytes())?;
    let mut reply = String::new();
    conn.read_to_string(&mut reply)?;
    let status = reply.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = reply.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((status, body))
}

/// Polls `check` every 100 ms until it returns `Some`, or fails after `limit` with `what`.
pub async fn eventually<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A fresh, empty directory.
pub fn temp_dir(prefix: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{prefix}-{}", uuid::Uuid::new_v4().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The `stevedore` CLI next to this test's binary, built first if it is missing.
pub fn stevedore_bin() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap(); // target/<profile>/deps/.. -> target/<profile>
    let bin = dir.join("stevedore");
    if !bin.exists() {
        let mut cmd = std::process::Command::new(env!("CARGO"));
        cmd.args(["build", "-q", "-p", "stevedore-cli", "--bin", "stevedore"]);
        if dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        assert!(cmd.status().expect("run cargo").success(), "building the stevedore CLI failed");
    }
    assert!(bin.exists(), "no stevedore binary at {}", bin.display());
    bin
}

/// Runs the CLI and returns its standard output; panics with its error output on failure.
pub fn stevedore(url: &str, args: &[&str]) -> String {
    let out = std::process::Command::new(stevedore_bin())
        .env_remove("STEVEDORE_DATABASE_URL")
        .arg("--database-url")
        .arg(url)
        .args(args)
        .output()
        .expect("run stevedore");
    assert!(out.status.success(), "stevedore {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}
