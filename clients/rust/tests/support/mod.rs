//! Real services for the client and gateway tests: a throwaway PostgreSQL,
//! a nats-server and the walcast daemon itself, each on a random port in a
//! temp dir, stopped and deleted on `Drop` (also when a test panics).
//!
//! Shared by `clients/rust/tests` and `examples/ws-gateway/tests` (included
//! there with `#[path]`), so it depends only on what both crates have:
//! std, tokio, tokio-postgres, anyhow.
//!
//! Tools: `WALCAST_PG_BIN` (default `/usr/lib/postgresql/15/bin`),
//! `WALCAST_NATS_SERVER` (default `<repo>/.tools/bin/nats-server`), and the
//! daemon from `WALCAST_BIN`, else `target/debug/walcast` if it is newer
//! than the daemon's sources, else `cargo build -p walcast` once.

#![allow(dead_code)] // each test crate uses a different part

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};

/// Client logs (`RUST_LOG`, default `walcast_client=info`) in the test output.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walcast_client=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    let here = Path::new(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .find(|d| d.join("proto").is_dir() && d.join("src/main.rs").is_file())
        .expect("repository root above the crate")
        .to_path_buf()
}

/// A currently free port on 127.0.0.1.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// Polls `condition` every 50 ms; fails after `timeout`.
pub async fn wait_until<F, Fut>(
    timeout: Duration,
    what: &str,
    mut condition: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !condition().await {
        if Instant::now() >= deadline {
            bail!("{what}: not within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A directory deleted on drop (kept with `WALCAST_KEEP_TEST_DIRS=1`).
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(kind: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("walcast-client-{kind}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("WALCAST_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Option<Child>);

impl Proc {
    fn signal(&mut self, signal: &str) -> anyhow::Result<()> {
        let Some(mut child) = self.0.take() else {
            bail!("not running")
        };
        let _ = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A throwaway PostgreSQL with `wal_level=logical`. When we are root, it
/// runs as the `postgres` user (Postgres refuses root).
pub struct Postgres {
    proc: Proc,
    pub port: u16,
    _dir: TempDir,
}

impl Postgres {
    pub fn start() -> anyhow::Result<Postgres> {
        let dir = TempDir::new("pg");
        let bin = PathBuf::from(
            std::env::var("WALCAST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let owner = server_user();
        if owner.is_some() {
            let status = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()?;
            anyhow::ensure!(status.success(), "chown the Postgres dir to postgres");
        }
        let data = dir.path().join("data");
        let out = as_user(Command::new(bin.join("initdb")), owner)
            .arg("-D")
            .arg(&data)
            .args([
                "--auth=trust",
                "-U",
                "postgres",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ])
            .output()
            .context("run initdb (set WALCAST_PG_BIN)")?;
        anyhow::ensure!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for attempt in 0.. {
            let port = free_port();
            let log = std::fs::File::create(dir.path().join(format!("pg-{attempt}.log")))?;
            let child = as_user(Command::new(bin.join("postgres")), owner)
                .arg("-D")
                .arg(&data)
                .args([
                    "-c",
                    &format!("port={port}"),
                    "-c",
                    "listen_addresses=127.0.0.1",
                ])
                .args([
                    "-c",
                    "wal_level=logical",
                    "-c",
                    "fsync=off",
                    "-c",
                    "max_replication_slots=10",
                ])
                .arg("-c")
                .arg(format!("unix_socket_directories={}", dir.path().display()))
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .context("spawn postgres")?;
            let mut proc = Proc(Some(child));
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if proc
                    .0
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
                {
                    break; // exited: port taken, or a real failure
                }
                let ready = Command::new(bin.join("pg_isready"))
                    .args(["-q", "-h", "127.0.0.1", "-U", "postgres", "-t", "1"])
                    .args(["-p", &port.to_string()])
                    .status()
                    .is_ok_and(|s| s.success());
                if ready {
                    return Ok(Postgres {
                        proc,
                        port,
                        _dir: dir,
                    });
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if attempt >= 3 {
                let log = std::fs::read_to_string(dir.path().join(format!("pg-{attempt}.log")))
                    .unwrap_or_default();
                bail!("postgres did not start:\n{log}");
            }
        }
        unreachable!()
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.proc.signal("-QUIT"); // immediate shutdown, backends included
    }
}

/// The uid/gid of `postgres` when we run as root (Postgres refuses root).
fn server_user() -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    if std::fs::metadata("/proc/self").ok()?.uid() != 0 {
        return None;
    }
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    let line = passwd.lines().find(|l| l.starts_with("postgres:"))?;
    let fields: Vec<&str> = line.split(':').collect();
    Some((fields.get(2)?.parse().ok()?, fields.get(3)?.parse().ok()?))
}

fn as_user(mut cmd: Command, user: Option<(u32, u32)>) -> Command {
    if let Some((uid, gid)) = user {
        cmd.gid(gid).uid(uid);
    }
    cmd
}

/// A nats-server with JetStream; `stop` + `start_again` keep port and store.
pub struct Nats {
    proc: Proc,
    pub port: u16,
    dir: TempDir,
}

impl Nats {
    /// `max_payload`: the server's message size limit (None = 1 MiB default).
    pub fn start(max_payload: Option<u32>) -> anyhow::Result<Nats> {
        let mut nats = Nats {
            proc: Proc(None),
            port: 0,
            dir: TempDir::new("nats"),
        };
        for attempt in 0.. {
            nats.port = free_port();
            let mut conf = format!(
                "listen: \"127.0.0.1:{}\"\njetstream {{ store_dir: \"{}\" }}\n",
                nats.port,
                nats.dir.path().join("js").display()
            );
            if let Some(m) = max_payload {
                conf.push_str(&format!("max_payload: {m}\n"));
            }
            std::fs::write(nats.dir.path().join("nats.conf"), conf)?;
            match nats.start_again() {
                Ok(()) => break,
                Err(e) if attempt >= 3 => return Err(e),
                Err(_) => {} // port taken meanwhile: another one
            }
        }
        Ok(nats)
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Graceful stop (SIGTERM).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        self.proc.signal("-TERM")
    }

    /// Starts again on the same port with the same store.
    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let bin = std::env::var("WALCAST_NATS_SERVER")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_root().join(".tools/bin/nats-server"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("nats.log"))?;
        let child = Command::new(&bin)
            .arg("-c")
            .arg(self.dir.path().join("nats.conf"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} (set WALCAST_NATS_SERVER)", bin.display()))?;
        self.proc = Proc(Some(child));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self
                .proc
                .0
                .as_mut()
                .is_some_and(|c| c.try_wait().ok().flatten().is_some())
            {
                bail!(
                    "nats-server exited: {}",
                    std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default()
                );
            }
            let ready =
                std::fs::read_to_string(self.dir.path().join("nats.log")).unwrap_or_default();
            // "Server is ready" once per start: count them.
            let starts = ready.matches("Server is ready").count();
            let launched = ready.matches("Starting nats-server").count();
            if starts == launched && std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("nats-server not ready on {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The walcast daemon (`walcast run`) as a child process.
pub struct Walcast {
    proc: Proc,
    /// `WALCAST_*` settings for every start (tests may add, e.g. a crash point).
    pub env: Vec<(String, String)>,
    log: PathBuf,
    _dir: TempDir,
}

impl Walcast {
    /// Runs `walcast migrate`, then starts `walcast run`.
    pub fn start(pg: &Postgres, nats: &Nats) -> anyhow::Result<Walcast> {
        let mut walcast = Walcast::migrated(pg, nats)?;
        walcast.start_again()?;
        Ok(walcast)
    }

    /// Runs `walcast migrate` (which creates the slot); `start_again` runs it.
    pub fn migrated(pg: &Postgres, nats: &Nats) -> anyhow::Result<Walcast> {
        let dir = TempDir::new("walcast");
        let env = vec![
            ("WALCAST_DATABASE_URL".to_string(), pg.url()),
            ("WALCAST_NATS_URL".to_string(), nats.url()),
            ("WALCAST_CONFIRM_DELAY".to_string(), "0".to_string()),
            (
                "WALCAST_HTTP_ADDR".to_string(),
                format!("127.0.0.1:{}", free_port()),
            ),
        ];
        let walcast = Walcast {
            proc: Proc(None),
            env,
            log: dir.path().join("walcast.log"),
            _dir: dir,
        };
        walcast.migrate()?;
        Ok(walcast)
    }

    /// `walcast migrate` again (idempotent; recreates a dropped slot).
    pub fn migrate(&self) -> anyhow::Result<()> {
        let out = Command::new(walcast_bin())
            .arg("migrate")
            .envs(self.env.iter().cloned())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "walcast migrate: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    }

    pub fn start_again(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(walcast_bin())
            .arg("run")
            .envs(self.env.iter().cloned())
            .env("RUST_LOG", "warn,walcast=info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn walcast run")?;
        self.proc = Proc(Some(child));
        Ok(())
    }

    /// SIGKILL, like a crash.
    pub fn kill9(&mut self) -> anyhow::Result<()> {
        self.proc.signal("-KILL")
    }

    /// The daemon's log so far (for failure messages).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// The walcast binary (see the module doc).
pub fn walcast_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("WALCAST_BIN") {
            return PathBuf::from(bin);
        }
        // target/debug/deps/<test> → target/debug/walcast
        let exe = std::env::current_exe().expect("current exe");
        let bin = exe
            .parent()
            .and_then(Path::parent)
            .expect("target dir")
            .join("walcast");
        let root = repo_root();
        let sources =
            ["src", "proto", "migrations", "build.rs", "Cargo.toml"].map(|p| root.join(p));
        let fresh = modified(&bin).is_some_and(|built| sources.iter().all(|s| newest(s) <= built));
        if !fresh {
            eprintln!("building the walcast daemon for the client tests…");
            let status = Command::new(env!("CARGO"))
                .args([
                    "build",
                    "-p",
                    "walcast",
                    "--bin",
                    "walcast",
                    "--features",
                    "failpoints",
                ])
                .current_dir(&root)
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build -p walcast failed");
        }
        bin
    })
    .clone()
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The newest modification time of a file or anything under a directory.
fn newest(path: &Path) -> SystemTime {
    let mut newest = modified(path).unwrap_or(SystemTime::UNIX_EPOCH);
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            newest = newest.max(self::newest(&entry.path()));
        }
    }
    newest
}

/// Everything a test needs, started in dependency order.
pub struct Env {
    pub walcast: Walcast,
    pub nats: Nats,
    pub pg: Postgres,
}

impl Env {
    pub fn start(max_payload: Option<u32>) -> Env {
        let pg = Postgres::start().expect("start postgres");
        let nats = Nats::start(max_payload).expect("start nats-server");
        let walcast = Walcast::start(&pg, &nats).expect("start walcast");
        Env { walcast, nats, pg }
    }
}

/// Makes row changes and counts the events they produce per tenant: each
/// statement below changes one `tasks` row, so it is one event.
pub struct Writer {
    pub db: tokio_postgres::Client,
    pub counts: std::collections::HashMap<String, u64>,
}

impl Writer {
    pub async fn new(pg: &Postgres) -> Writer {
        Writer::connect(&pg.url()).await
    }

    /// A writer on its own connection (e.g. for a concurrent task).
    pub async fn connect(url: &str) -> Writer {
        let (db, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect to test postgres");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Writer {
            db,
            counts: Default::default(),
        }
    }

    /// `n` task inserts for `tenant`, one transaction each; returns the
    /// tenant's last seq after them.
    pub async fn insert(&mut self, tenant: &str, n: u64) -> u64 {
        for _ in 0..n {
            let seq = self.counts.get(tenant).copied().unwrap_or(0) + 1;
            self.db
                .execute(
                    "INSERT INTO tasks (id, tenant_id, title) VALUES (gen_random_uuid(), $1, $2)",
                    &[&tenant, &format!("task {seq}")],
                )
                .await
                .expect("insert task");
            self.counts.insert(tenant.to_string(), seq);
        }
        self.counts[tenant]
    }

    /// One task whose description is `bytes` long (an oversized event when
    /// NATS's `max_payload` is smaller).
    pub async fn insert_large(&mut self, tenant: &str, bytes: usize) -> u64 {
        let seq = self.counts.get(tenant).copied().unwrap_or(0) + 1;
        let description: String = (0..bytes)
            .map(|i| (b'a' + (i * 7 % 26) as u8) as char)
            .collect();
        self.db
            .execute(
                "INSERT INTO tasks (id, tenant_id, title, description) VALUES (gen_random_uuid(), $1, 'large', $2)",
                &[&tenant, &description],
            )
            .await
            .expect("insert large task");
        self.counts.insert(tenant.to_string(), seq);
        seq
    }
}
