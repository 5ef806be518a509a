//! Helpers for the robustness tests (data, schema changes, oversized
//! events, huge transactions, misconfiguration): the walcast binary with its
//! metrics endpoint, its memory high-water mark, metric scraping, and
//! running `walcast` to completion with a bound.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::chaos::{Walcast, strip_ansi};
use super::daemon::{Env, StreamEvent};
use super::free_port;

/// `walcast run` (the binary, log captured) with its own metrics address.
pub fn start_walcast(
    env: &Env,
    dir: &Path,
    name: &str,
    extra: &[(&str, &str)],
) -> (Walcast, String) {
    let addr = format!("127.0.0.1:{}", free_port());
    let mut vars = env.env_vars();
    vars.retain(|(k, _)| k != "WALCAST_HTTP_ADDR");
    vars.push(("WALCAST_HTTP_ADDR".into(), addr.clone()));
    (Walcast::start(name, dir, &vars, extra), addr)
}

/// A bare HTTP/1.0 GET: (status, body).
pub async fn http_get(addr: &str, path: &str) -> Option<(u16, String)> {
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// The value of the first sample whose line starts with `name_and_labels`.
pub fn metric(body: &str, name_and_labels: &str) -> Option<f64> {
    body.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// One sample scraped from `/metrics` now (`None`: no answer, or not on it).
pub async fn scrape(addr: &str, name_and_labels: &str) -> Option<f64> {
    match http_get(addr, "/metrics").await {
        Some((200, body)) => metric(&body, name_and_labels),
        _ => None,
    }
}

/// Polls `/metrics` until `name` reaches `want` (metrics are flushed every
/// 20 ms after the acks); returns the last value seen.
pub async fn wait_metric(addr: &str, name: &str, want: f64, timeout: Duration) -> Option<f64> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        if let Some(value) = scrape(addr, name).await {
            last = Some(value);
            if value == want {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last
}

/// A field of `/proc/<pid>/status` in kB (`VmHWM`, `VmRSS`).
pub fn proc_status_kb(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find(|l| l.starts_with(&format!("{field}:")))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Messages on exactly `subject`.
pub fn on_subject<'a>(events: &'a [StreamEvent], subject: &str) -> Vec<&'a StreamEvent> {
    events.iter().filter(|m| m.subject == subject).collect()
}

/// The outcome of one bounded `walcast` run.
#[derive(Debug)]
pub struct Outcome {
    /// `None`: still running at the bound (it was killed).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Outcome {
    /// The last non-empty line of stderr.
    pub fn last_line(&self) -> &str {
        self.stderr
            .lines()
            .rev()
            .find(|l| !l.trim().is_empty())
            .unwrap_or("")
    }
}

/// Runs the walcast binary with exactly `env` (nothing inherited but PATH),
/// kills it after `bound`, and returns what it printed.
pub fn run_bounded(args: &[&str], env: &[(String, String)], bound: Duration) -> Outcome {
    let dir = super::TempDir::new("walcast-run").expect("temp dir");
    let (out_path, err_path) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let began = Instant::now();
    let mut child = Command::new(super::walcast_bin())
        .args(args)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("NO_COLOR", "1")
        .envs(env.iter().cloned())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .expect("spawn walcast");
    let code = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break Some(status.code().unwrap_or(-1));
        }
        if began.elapsed() >= bound {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let read = |p: &Path| {
        let text = String::from_utf8_lossy(&std::fs::read(p).unwrap_or_default()).into_owned();
        strip_ansi(&text)
    };
    Outcome {
        code,
        stdout: read(&out_path),
        stderr: read(&err_path),
        elapsed: began.elapsed(),
    }
}

/// `env` with `name` set to `value` (replaced if present).
pub fn with_var(env: &[(String, String)], name: &str, value: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = env.iter().filter(|(k, _)| k != name).cloned().collect();
    out.push((name.to_string(), value.to_string()));
    out
}

/// Counts of subjects, for failure messages.
pub fn subject_counts(events: &[StreamEvent]) -> HashMap<String, usize> {
    let mut out = HashMap::new();
    for m in events {
        *out.entry(m.subject.clone()).or_default() += 1;
    }
    out
}

/// A deterministic v4-shaped uuid from a number.
pub fn uuid(n: u64) -> String {
    format!(
        "{:08x}-0000-4000-8000-{:012x}",
        n >> 32,
        n & 0xffff_ffff_ffff
    )
}
