//! A throwaway nats-server (JetStream enabled) per test, on a random port
//! with its own store dir. The config file is generated from `NatsOptions`
//! so restarts (`start_again`) reuse exactly the same port and store. A
//! node of a test cluster (`cluster.rs`) is one of these with
//! `NatsOptions::cluster` set.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{TempDir, free_port, read_log, repo_root};

/// How long a start or stop may take before the test fails.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// What goes into the generated server config.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Enable JetStream (store dir inside the test's temp dir). Default true.
    pub jetstream: bool,
    /// `max_payload` in bytes (server default: 1 MiB).
    pub max_payload: Option<u32>,
    /// Extra lines inside the `jetstream { }` block, e.g.
    /// `sync_interval: always`. (A second top-level `jetstream` block would
    /// replace the generated one, losing `store_dir`.)
    pub jetstream_extra: String,
    /// Extra top-level config text, appended verbatim.
    pub extra: String,
    /// Membership in a multi-node cluster (see `cluster.rs`): server name
    /// and routes. `None`: a standalone server.
    pub cluster: Option<ClusterMember>,
}

/// One node's place in a test cluster: routes on loopback.
#[derive(Debug, Clone)]
pub struct ClusterMember {
    /// `server_name` (JetStream clustering needs a unique one per node).
    pub server_name: String,
    /// The cluster's name, the same on every node.
    pub cluster_name: String,
    /// This node's route port.
    pub route_port: u16,
    /// The other nodes' route ports.
    pub peers: Vec<u16>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            jetstream: true,
            max_payload: None,
            jetstream_extra: String::new(),
            extra: String::new(),
            cluster: None,
        }
    }
}

/// A nats-server owned by one test. Dropping it kills the server and deletes
/// its store, also when the test panics.
#[derive(Debug)]
pub struct Nats {
    bin: PathBuf,
    port: u16,
    dir: TempDir,
    options: NatsOptions,
    child: Mutex<Option<Child>>,
}

impl Nats {
    /// Starts a JetStream-enabled server with default options.
    pub fn start() -> anyhow::Result<Nats> {
        Self::start_with(NatsOptions::default())
    }

    /// Starts a server with `extra_conf` appended to the generated config.
    pub fn start_with_config(extra_conf: &str) -> anyhow::Result<Nats> {
        Self::start_with(NatsOptions {
            extra: extra_conf.to_string(),
            ..NatsOptions::default()
        })
    }

    /// Starts a server with the given options.
    pub fn start_with(options: NatsOptions) -> anyhow::Result<Nats> {
        let mut nats = Nats {
            bin: nats_bin()?.to_path_buf(),
            port: 0,
            dir: TempDir::new("nats")?,
            options,
            child: Mutex::new(None),
        };
        // A port that was free a moment ago may be taken by a parallel test.
        let mut attempt = 0;
        loop {
            attempt += 1;
            nats.port = free_port();
            nats.write_config()?;
            match nats.start_again() {
                Ok(()) => return Ok(nats),
                Err(e) if attempt < 5 && nats.log_contents().contains("address already in use") => {
                    eprintln!("nats: port {} taken, retrying: {e:#}", nats.port);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The running server's version, and its release numbers (`2.14.6-RC.1`:
    /// `[2, 14, 6]`), for tests whose expectations differ by version.
    pub async fn version(&self) -> (String, Vec<u32>) {
        let client = async_nats::connect(self.url())
            .await
            .expect("connect to the test nats-server");
        let version = client.server_info().version;
        let release = version.split(['-', '+']).next().unwrap_or_default();
        let numbers = release.split('.').map_while(|p| p.parse().ok()).collect();
        (version, numbers)
    }

    /// The client port (stays the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across restarts).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("jetstream")
    }

    /// The generated config file.
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    /// The server log (all starts append to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("nats.log")
    }

    /// The server log's content, for assertions and failure messages.
    pub fn log_contents(&self) -> String {
        read_log(&self.log_path())
    }

    /// Whether the server process is running (not stopped or killed).
    pub fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .is_some()
    }

    /// Graceful stop: SIGTERM, then waits for the process to exit.
    pub fn stop(&self) -> anyhow::Result<()> {
        let mut guard = self
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut child) = guard.take() else {
            bail!("nats-server is not running")
        };
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .context("run kill -TERM")?;
        if !status.success() {
            bail!("kill -TERM nats-server failed: {status}");
        }
        let deadline = Instant::now() + SERVER_TIMEOUT;
        while child.try_wait().context("wait for nats-server")?.is_none() {
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "nats-server did not stop within {SERVER_TIMEOUT:?}\n--- log ---\n{}",
                    self.log_contents()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// SIGKILL, like a crash; `start_again` brings it back.
    pub fn kill9(&self) -> anyhow::Result<()> {
        let mut guard = self
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let Some(mut child) = guard.take() else {
            bail!("nats-server is not running")
        };
        child.kill().context("kill nats-server")?;
        child.wait().context("wait for killed nats-server")?;
        Ok(())
    }

    /// Starts the stopped (or killed) server again: same port, same store.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut guard = self
            .child
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if guard.is_some() {
            bail!("nats-server is already running");
        }
        // Only log lines from this start count for readiness.
        let log_start = std::fs::metadata(self.log_path())
            .map(|m| m.len())
            .unwrap_or(0) as usize;
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open nats log")?;
        let log2 = log.try_clone().context("clone nats log handle")?;
        let mut child = Command::new(&self.bin)
            .arg("-c")
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .with_context(|| format!("spawn {}", self.bin.display()))?;
        // Ready = the log says so (JetStream recovered) and the port answers.
        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("poll nats-server")? {
                let log = self.log_contents();
                bail!(
                    "nats-server exited during startup ({status})\n--- log of this start ---\n{}",
                    log.get(log_start..).unwrap_or(&log)
                );
            }
            let log = std::fs::read(self.log_path()).unwrap_or_default();
            let ready = log
                .get(log_start..)
                .is_some_and(|l| l.windows(15).any(|w| w == b"Server is ready"))
                && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok();
            if ready {
                *guard = Some(child);
                return Ok(());
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "nats-server not ready after {SERVER_TIMEOUT:?}\n--- log ---\n{}",
                    self.log_contents()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn write_config(&self) -> anyhow::Result<()> {
        let o = &self.options;
        let mut conf = format!("listen: \"127.0.0.1:{}\"\n", self.port);
        if o.jetstream {
            conf.push_str(&format!(
                "jetstream {{\n  store_dir: {}\n{}\n}}\n",
                quote(&self.store_dir())?,
                o.jetstream_extra
            ));
        }
        if let Some(c) = &o.cluster {
            let routes: Vec<String> = c
                .peers
                .iter()
                .map(|p| format!("\"nats-route://127.0.0.1:{p}\""))
                .collect();
            conf.push_str(&format!(
                "server_name: {}\ncluster {{\n  name: {}\n  listen: \"127.0.0.1:{}\"\n  routes: [{}]\n}}\n",
                c.server_name,
                c.cluster_name,
                c.route_port,
                routes.join(", ")
            ));
        }
        if let Some(max_payload) = o.max_payload {
            conf.push_str(&format!("max_payload: {max_payload}\n"));
        }
        conf.push_str(&o.extra);
        conf.push('\n');
        let mut file = File::create(self.config_path()).context("create nats.conf")?;
        std::io::Write::write_all(&mut file, conf.as_bytes()).context("write nats.conf")
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        let child = self
            .child
            .get_mut()
            .map(Option::take)
            .unwrap_or_else(|p| p.into_inner().take());
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The nats-server binary: `WALCAST_NATS_SERVER`, else
/// `<repo>/.tools/bin/nats-server` (scripts/install-deps.sh), else `PATH`.
fn nats_bin() -> anyhow::Result<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let from_env = std::env::var_os("WALCAST_NATS_SERVER").map(PathBuf::from);
        let tools = repo_root().join(".tools/bin/nats-server");
        let from_tools = || tools.is_file().then(|| tools.clone());
        let from_path = || {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("nats-server"))
                .find(|p| p.is_file())
        };
        let bin = from_env.or_else(from_tools).or_else(from_path);
        match &bin {
            Some(b) => eprintln!("test nats-server: {}", b.display()),
            None => eprintln!("test nats-server: not found"),
        }
        bin
    });
    found
        .as_deref()
        .context("nats-server not found: set WALCAST_NATS_SERVER or run scripts/install-deps.sh")
}

/// A double-quoted config string.
fn quote(path: &Path) -> anyhow::Result<String> {
    let s = path
        .to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))?;
    Ok(format!(
        "\"{}\"",
        s.replace('\\', "\\\\").replace('"', "\\\"")
    ))
}
