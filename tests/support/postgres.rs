//! A throwaway PostgreSQL cluster per test: initdb into a temp dir, then the
//! postmaster runs as our child process on a random port with
//! `wal_level=logical`. Being its parent (not `pg_ctl start`, which detaches
//! it) lets us reap it after `kill9()`, so a restart never trips over a
//! zombie postmaster still "holding" `postmaster.pid`. Settings live in the
//! cluster's own config file (not `-c` flags) so `start_again()` restarts
//! exactly the same server and `ALTER SYSTEM` still works.

use std::fs::OpenOptions;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

use super::{TempDir, free_port, read_log};

/// Settings every test cluster gets; `start_with` overrides or adds to them.
const DEFAULT_SETTINGS: &[(&str, &str)] = &[
    ("listen_addresses", "127.0.0.1"),
    ("wal_level", "logical"),
    ("max_replication_slots", "20"),
    ("max_wal_senders", "20"),
    ("fsync", "off"),
    ("synchronous_commit", "on"),
    ("full_page_writes", "off"),
    ("wal_sender_timeout", "60s"),
];

/// The file (inside the data dir) holding the settings above plus the port;
/// `postgresql.conf` includes it.
const SETTINGS_FILE: &str = "walcast-test.conf";

/// How long a start or stop may take before the test fails.
const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

/// How `stop` shuts the server down (`pg_ctl stop -m <mode>`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopMode {
    /// Disconnect clients, checkpoint, exit cleanly.
    Fast,
    /// Exit at once without a checkpoint; the next start does crash recovery.
    Immediate,
}

/// A running (or stopped) test PostgreSQL server owned by one test. Dropping
/// it kills the server and deletes its data directory, also when the test
/// panics.
#[derive(Debug)]
pub struct Postgres {
    bin: PathBuf,
    port: u16,
    dir: TempDir,
    settings: Vec<(String, String)>,
    /// The postmaster, or `runuser` running it when we are root.
    child: Mutex<Option<Child>>,
}

impl Postgres {
    /// Starts a cluster with the default test settings.
    pub fn start() -> anyhow::Result<Postgres> {
        Self::start_with(&[])
    }

    /// Starts a cluster with `settings` overriding or adding to the defaults,
    /// e.g. `&[("wal_level", "replica")]` for a misconfiguration test.
    pub fn start_with(settings: &[(&str, &str)]) -> anyhow::Result<Postgres> {
        Self::start_bin(pg_bin()?, settings)
    }

    /// Starts a cluster of the version matrix's PostgreSQL (18, from
    /// `WALCAST_MATRIX_PG_BIN`), for tests of what only newer servers do;
    /// `None` (after saying so) when that build is not installed.
    pub fn start_matrix(settings: &[(&str, &str)]) -> Option<Postgres> {
        let Some(bin) = matrix_bin() else {
            eprintln!(
                "SKIPPED: WALCAST_MATRIX_PG_BIN is not set or has no postgres binaries \
                 (run scripts/install-deps.sh and source .tools/env)"
            );
            return None;
        };
        Some(Self::start_bin(&bin, settings).expect("start the matrix's postgres"))
    }

    /// Starts a cluster from the binaries in `bin`.
    pub fn start_bin(bin: &Path, settings: &[(&str, &str)]) -> anyhow::Result<Postgres> {
        let merged = with_defaults(settings);
        let mut pg = Postgres {
            bin: bin.to_path_buf(),
            port: 0,
            dir: TempDir::new("pg")?,
            settings: merged,
            child: Mutex::new(None),
        };
        // From here on, an error drops `pg`, which cleans up.
        pg.initdb()?;
        // A port that was free a moment ago may be taken by a parallel test.
        let mut attempt = 0;
        loop {
            attempt += 1;
            pg.port = free_port();
            pg.write_settings()?;
            match pg.start_again() {
                Ok(()) => return Ok(pg),
                Err(e) if attempt < 5 && pg.log_contents().contains("could not bind") => {
                    eprintln!("postgres: port {} taken, retrying: {e:#}", pg.port);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres` (superuser, trust auth).
    pub fn url(&self) -> String {
        self.url_for("postgres", None, "postgres")
    }

    /// A URL for another role and database of this server.
    pub fn url_for(&self, user: &str, password: Option<&str>, db: &str) -> String {
        let auth = match password {
            Some(p) => format!("{user}:{p}"),
            None => user.to_string(),
        };
        format!("postgres://{auth}@127.0.0.1:{}/{db}", self.port)
    }

    /// The TCP port the server listens on (stays the same across restarts).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The server log (all starts append to it).
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postgres.log")
    }

    /// The server log's content, for assertions and failure messages.
    pub fn log_contents(&self) -> String {
        read_log(&self.log_path())
    }

    /// A superuser client on the `postgres` database; panics (with the server
    /// log) if the server cannot be reached.
    pub async fn client(&self) -> tokio_postgres::Client {
        match connect(&self.url()).await {
            Ok(client) => client,
            Err(e) => panic!(
                "connect to test postgres: {e:#}\n--- log ---\n{}",
                self.log_contents()
            ),
        }
    }

    /// Stops the server (`pg_ctl stop -m fast|immediate`); `start_again`
    /// brings it back.
    pub fn stop(&self, mode: StopMode) -> anyhow::Result<()> {
        let Some(mut child) = lock(&self.child).take() else {
            bail!("postgres is not running")
        };
        let mode = match mode {
            StopMode::Fast => "fast",
            StopMode::Immediate => "immediate",
        };
        let timeout = SERVER_TIMEOUT.as_secs().to_string();
        let data = self.data_dir();
        let stopped = path_str(&data).and_then(|data| {
            let out = self.run(
                "pg_ctl",
                &["-D", data, "-m", mode, "-w", "-t", &timeout, "stop"],
                true,
            )?;
            if !out.status.success() {
                bail!(
                    "pg_ctl stop -m {mode} failed: {}\n--- log ---\n{}",
                    output_text(&out),
                    self.log_contents()
                );
            }
            Ok(())
        });
        if let Err(e) = stopped {
            hard_kill(child);
            return Err(e);
        }
        // The pid file is gone; reap the postmaster (it exits right after).
        child.wait().context("wait for postgres to exit")?;
        Ok(())
    }

    /// Starts the stopped (or killed) server again: same data dir, same port.
    pub fn start_again(&self) -> anyhow::Result<()> {
        let mut guard = lock(&self.child);
        if guard.is_some() {
            bail!("postgres is already running");
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open postgres log")?;
        let log2 = log.try_clone().context("clone postgres log handle")?;
        let data = self.data_dir();
        let mut child = self
            .command("postgres", &["-D", path_str(&data)?], true)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .spawn()
            .context("spawn postgres")?;
        match self.wait_started(&mut child) {
            Ok(()) => {
                *guard = Some(child);
                Ok(())
            }
            Err(e) => {
                hard_kill(child);
                Err(e)
            }
        }
    }

    /// Polls `pg_isready` until the server accepts connections.
    fn wait_started(&self, child: &mut Child) -> anyhow::Result<()> {
        let port = self.port.to_string();
        let deadline = Instant::now() + SERVER_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().context("poll postgres")? {
                bail!(
                    "postgres exited during startup ({status})\n--- log ---\n{}",
                    self.log_contents()
                );
            }
            let ready = [
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                "postgres",
                "-t",
                "1",
            ];
            if self.run("pg_isready", &ready, false)?.status.success() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "postgres not ready on port {port} after {SERVER_TIMEOUT:?}\n--- log ---\n{}",
                    self.log_contents()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILLs the postmaster, like a crash. Its children notice and exit;
    /// this waits for them (killing stragglers) so `start_again` can run.
    pub fn kill9(&self) -> anyhow::Result<()> {
        let mut guard = lock(&self.child);
        let Some(mut child) = guard.take() else {
            bail!("postgres is not running")
        };
        let Some(pid) = self.postmaster_pid() else {
            hard_kill(child);
            bail!("postgres was running without a postmaster.pid; killed it");
        };
        let children = children_of(pid);
        if let Err(e) = kill("KILL", &pid.to_string()) {
            hard_kill(child);
            return Err(e);
        }
        // Our child is the postmaster or the `runuser` that reaps it.
        child.wait().context("wait for killed postgres")?;
        // Orphaned backends exit on postmaster death; a restart must wait
        // for them to release the old shared memory.
        let deadline = Instant::now() + Duration::from_secs(10);
        while children.iter().any(|&c| alive(c)) {
            if Instant::now() >= deadline {
                for &c in &children {
                    let _ = kill("KILL", &c.to_string());
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// The postmaster's pid from `postmaster.pid`, if the server runs.
    fn postmaster_pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data_dir().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Starts a physical standby of this (running) server: `pg_basebackup`
    /// through the physical slot `slot` (which must exist), then streaming
    /// with `primary_slot_name`, `hot_standby_feedback` and
    /// `sync_replication_slots` on, so it keeps synced copies of failover
    /// slots (PostgreSQL 17+). `settings` override or add to those. Like any
    /// pg_basebackup, it copies the primary's `ALTER SYSTEM` settings
    /// (`postgresql.auto.conf`), which win over `settings`.
    pub fn start_standby(&self, slot: &str, settings: &[(&str, &str)]) -> anyhow::Result<Postgres> {
        let conninfo = format!(
            "host=127.0.0.1 port={} user=postgres dbname=postgres application_name={slot}",
            self.port
        );
        let mut all: Vec<(&str, &str)> = vec![
            ("primary_conninfo", conninfo.as_str()),
            ("primary_slot_name", slot),
            ("hot_standby_feedback", "on"),
            ("sync_replication_slots", "on"),
        ];
        all.extend_from_slice(settings);
        let merged = with_defaults(&all);
        let mut standby = Postgres {
            bin: self.bin.clone(),
            port: 0,
            dir: TempDir::new("pg-standby")?,
            settings: merged,
            child: Mutex::new(None),
        };
        standby.give_to_server_user()?;
        let data = standby.data_dir();
        let port = self.port.to_string();
        let args = [
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-U",
            "postgres",
            "-D",
            path_str(&data)?,
            "-X",
            "stream",
            "-S",
            slot,
            "-c",
            "fast",
            "--no-sync",
        ];
        let out = standby.run("pg_basebackup", &args, true)?;
        if !out.status.success() {
            bail!("pg_basebackup failed: {}", output_text(&out));
        }
        std::fs::write(data.join("standby.signal"), "").context("write standby.signal")?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            standby.port = free_port();
            standby.write_settings()?;
            match standby.start_again() {
                Ok(()) => return Ok(standby),
                Err(e) if attempt < 5 && standby.log_contents().contains("could not bind") => {
                    eprintln!(
                        "postgres standby: port {} taken, retrying: {e:#}",
                        standby.port
                    );
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Promotes this standby (`pg_ctl promote -w`): it leaves recovery and
    /// accepts writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        let data = self.data_dir();
        let timeout = SERVER_TIMEOUT.as_secs().to_string();
        let out = self.run(
            "pg_ctl",
            &["-D", path_str(&data)?, "-w", "-t", &timeout, "promote"],
            true,
        )?;
        if !out.status.success() {
            bail!(
                "pg_ctl promote failed: {}\n--- log ---\n{}",
                output_text(&out),
                self.log_contents()
            );
        }
        Ok(())
    }

    /// Hands the temp dir to the `postgres` user when we are root (Postgres
    /// refuses to run as root).
    fn give_to_server_user(&self) -> anyhow::Result<()> {
        if !running_as_root() {
            return Ok(());
        }
        let out = Command::new("chown")
            .args(["-R", "postgres:postgres"])
            .arg(self.dir.path())
            .output()
            .context("run chown")?;
        if !out.status.success() {
            bail!(
                "chown postgres {}: {}",
                self.dir.path().display(),
                output_text(&out)
            );
        }
        Ok(())
    }

    fn initdb(&self) -> anyhow::Result<()> {
        self.give_to_server_user()?;
        let data = self.data_dir();
        let args = [
            "-D",
            path_str(&data)?,
            "--auth=trust",
            "-U",
            "postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        ];
        let out = self.run("initdb", &args, true)?;
        if !out.status.success() {
            bail!("initdb failed: {}", output_text(&out));
        }
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf).context("read postgresql.conf")?;
        text.push_str(&format!("\ninclude '{SETTINGS_FILE}'\n"));
        std::fs::write(&conf, text).context("write postgresql.conf")
    }

    /// Writes the port, the unix socket dir and the settings to `SETTINGS_FILE`.
    fn write_settings(&self) -> anyhow::Result<()> {
        let mut text = format!("port = {}\n", self.port);
        let socket_dir = path_str(self.dir.path())?.to_string();
        let all = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in
            std::iter::once(("unix_socket_directories", socket_dir.as_str())).chain(all)
        {
            text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        // Written as root, read by the server: world-readable is fine for tests.
        std::fs::write(self.data_dir().join(SETTINGS_FILE), text).context("write test settings")
    }

    /// Runs a Postgres tool to completion.
    fn run(&self, tool: &str, args: &[&str], as_server_user: bool) -> anyhow::Result<Output> {
        self.command(tool, args, as_server_user)
            .output()
            .with_context(|| format!("run {tool}"))
    }

    /// A command for a Postgres tool; `as_server_user` runs it as the
    /// `postgres` user when we are root (initdb, postgres and pg_ctl refuse
    /// to run as root).
    fn command(&self, tool: &str, args: &[&str], as_server_user: bool) -> Command {
        let exe = self.bin.join(tool);
        let mut cmd = if as_server_user && running_as_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        // The tools must not pick up the caller's PG* settings or a cwd they
        // cannot read.
        cmd.args(args).current_dir(self.dir.path());
        for var in [
            "PGHOST",
            "PGPORT",
            "PGDATA",
            "PGUSER",
            "PGDATABASE",
            "PGOPTIONS",
            "PGSERVICE",
        ] {
            cmd.env_remove(var);
        }
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // A failing stop kills the processes itself.
        let _ = self.stop(StopMode::Immediate);
    }
}

/// Connects with NoTls and drives the connection on a spawned task.
pub async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to {url}"))?;
    tokio::spawn(async move {
        // Errors surface on the client's next query; nothing to do here.
        let _ = connection.await;
    });
    Ok(client)
}

/// The version matrix's PostgreSQL (`WALCAST_MATRIX_PG_BIN`), if installed.
pub fn matrix_bin() -> Option<PathBuf> {
    let dir = PathBuf::from(std::env::var_os("WALCAST_MATRIX_PG_BIN")?);
    ["initdb", "postgres", "pg_ctl"]
        .iter()
        .all(|t| dir.join(t).is_file())
        .then_some(dir)
}

/// The directory with initdb/postgres/pg_ctl: `WALCAST_PG_BIN`, else the
/// highest `/usr/lib/postgresql/<major>/bin`, else the first on `PATH`.
fn pg_bin() -> anyhow::Result<&'static Path> {
    static BIN: OnceLock<Option<PathBuf>> = OnceLock::new();
    let found = BIN.get_or_init(|| {
        let has_tools = |dir: &Path| {
            ["initdb", "postgres", "pg_ctl"]
                .iter()
                .all(|t| dir.join(t).is_file())
        };
        let from_env = std::env::var_os("WALCAST_PG_BIN").map(PathBuf::from);
        let from_usr_lib = || {
            let mut dirs: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse().ok()?;
                    Some((major, e.path().join("bin")))
                })
                .filter(|(_, dir)| has_tools(dir))
                .collect();
            dirs.sort();
            dirs.pop().map(|(_, dir)| dir)
        };
        let from_path = || std::env::split_paths(&std::env::var_os("PATH")?).find(|d| has_tools(d));
        let dir = from_env.or_else(from_usr_lib).or_else(from_path);
        match &dir {
            Some(d) => eprintln!("test postgres binaries: {}", d.display()),
            None => eprintln!("test postgres binaries: not found"),
        }
        dir
    });
    found
        .as_deref()
        .context("PostgreSQL binaries not found: set WALCAST_PG_BIN or run scripts/install-deps.sh")
}

/// Whether we run as root (Postgres refuses to), without a libc dependency.
fn running_as_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| {
        std::fs::metadata("/proc/self")
            .map(|m| m.uid() == 0)
            .unwrap_or(false)
    })
}

/// Locks the child slot, also after a panic elsewhere (Drop must not panic).
fn lock(child: &Mutex<Option<Child>>) -> std::sync::MutexGuard<'_, Option<Child>> {
    child
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SIGKILLs our child and everything below it (postmaster, backends), then
/// reaps the child: the way out when a graceful stop failed.
fn hard_kill(mut child: Child) {
    let mut victims = vec![child.id()];
    let mut i = 0;
    while i < victims.len() {
        victims.extend(children_of(victims[i]));
        i += 1;
    }
    for pid in victims.iter().skip(1) {
        let _ = kill("KILL", &pid.to_string());
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Pids whose parent is `ppid` (the postmaster's backends and workers).
fn children_of(ppid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| proc_stat(pid).is_some_and(|(_, parent)| parent == ppid))
        .collect()
}

/// Whether `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|(state, _)| state != "Z" && state != "X")
}

/// State and parent pid from `/proc/<pid>/stat` ("pid (comm) state ppid ...";
/// comm may contain spaces and parentheses).
fn proc_stat(pid: u32) -> Option<(String, u32)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.to_string();
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// `kill -<signal> <pid>`, without a libc dependency.
fn kill(signal: &str, target: &str) -> anyhow::Result<()> {
    let out = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg("--")
        .arg(target)
        .output()
        .context("run kill")?;
    if !out.status.success() {
        bail!("kill -{signal} {target}: {}", output_text(&out));
    }
    Ok(())
}

fn path_str(path: &Path) -> anyhow::Result<&str> {
    path.to_str()
        .with_context(|| format!("non-UTF-8 path {}", path.display()))
}

fn output_text(out: &Output) -> String {
    format!(
        "{}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `DEFAULT_SETTINGS`, each overridden by the same name in `settings`
/// (later ones win), in `postgresql.conf` order.
fn with_defaults(settings: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut merged: Vec<(String, String)> = DEFAULT_SETTINGS
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (name, value) in settings {
        merged.retain(|(k, _)| k != name);
        merged.push((name.to_string(), value.to_string()));
    }
    merged
}
