//! Integration-test harness: every test starts its own throwaway PostgreSQL
//! and nats-server on random ports, so tests never touch (or depend on)
//! services already running on the machine, and can run in parallel.
//!
//! Tools are found through `WALCAST_PG_BIN` / `WALCAST_NATS_SERVER`, which
//! `scripts/install-deps.sh` writes to `.tools/env` (see `scripts/test.sh`).
//! Set `WALCAST_KEEP_TEST_DIRS=1` to keep data directories and logs for
//! post-mortem debugging.

// Each test module uses a different part of the harness.
#![allow(dead_code)]

pub mod nats;
pub mod postgres;
pub mod proxy;
pub mod stale;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// How often `wait_until` / `wait_for` re-check their condition.
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// A free TCP port on 127.0.0.1 that no other caller in this process has
/// been given. Ports come from just below the kernel's ephemeral range, so
/// neither `bind(0)` nor an outgoing connection can take a server's port
/// while that server is down for a restart (a killed cluster node or
/// Postgres must come back on the same port). Falls back to `bind(0)` when
/// there is no room below the ephemeral range.
pub fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let (low, high) = test_port_range();
    let size = u64::from(high - low);
    if size == 0 {
        return kernel_port();
    }
    // Start at a pid-dependent place: two test processes at once (rare)
    // walk different stretches.
    let start = u64::from(std::process::id()).wrapping_mul(7919) % size;
    for _ in 0..size {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % size;
        let port = low + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    kernel_port()
}

/// `[low, high)`: up to 12,000 ports below the ephemeral range (default
/// 32768–60999 gives 20768–32767), never below 10000.
fn test_port_range() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let low = ephemeral_low.saturating_sub(12_000).max(10_000);
    (low, ephemeral_low.max(low))
}

/// A port the kernel picks (free now, not reserved).
fn kernel_port() -> u16 {
    let listener =
        std::net::TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0 to find a free port");
    listener
        .local_addr()
        .expect("local_addr of a bound listener")
        .port()
}

/// Polls `condition` every 50 ms until it returns true; errors after `timeout`.
/// Use this instead of sleeping in tests: it is as fast as the system allows
/// and fails with a message instead of hanging.
pub async fn wait_until<F, Fut>(timeout: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    wait_for(timeout, || {
        let fut = condition();
        async move { fut.await.then_some(()) }
    })
    .await
}

/// Like [`wait_until`], for conditions that produce a value: polls until
/// `probe` returns `Some` and returns that value.
pub async fn wait_for<T, F, Fut>(timeout: Duration, mut probe: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            anyhow::bail!("condition not met within {timeout:?}");
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

/// The walcast binary built for this test run.
pub fn walcast_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_walcast"))
}

/// The repository root (where Cargo.toml lives).
pub fn repo_root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A uniquely named directory under the system temp dir, deleted on drop
/// (unless `WALCAST_KEEP_TEST_DIRS` is set).
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates `<tmp>/walcast-<prefix>-<pid>-<n>-<random>`.
    pub fn new(prefix: &str) -> anyhow::Result<TempDir> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!(
            "walcast-{prefix}-{}-{n}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        );
        let path = std::env::temp_dir().join(name);
        std::fs::create_dir(&path)
            .map_err(|e| anyhow::anyhow!("create temp dir {}: {e}", path.display()))?;
        Ok(TempDir { path })
    }

    /// The directory's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WALCAST_KEEP_TEST_DIRS").is_some() {
            eprintln!("keeping test dir {}", self.path.display());
            return;
        }
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Reads a log file for error messages; never fails.
pub(crate) fn read_log(path: &Path) -> String {
    match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}
pub mod callout;
pub mod chaos;
pub mod checks;
pub mod cluster;
pub mod daemon;
pub mod edge;
pub mod oracle;
pub mod pgdelay;
pub mod state;
pub mod workload;
