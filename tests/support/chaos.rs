//! Fault-injection helpers (issue 4): the walcast binary with its log
//! captured in a file (to kill it, crash it and read its WARN lines), a
//! steady background write load, catch-up waits, and the verification every
//! scenario ends with.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs::File;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use super::checks::{assert_replays_to_tables, assert_stream_exact};
use super::daemon::{Env, StreamEvent, read_stream};
use super::oracle::{Change, Oracle, assert_matches_oracle, assert_prefix_of_oracle};
use super::postgres::Postgres;
use super::workload::{Stats, Workload};

/// `WALCAST_SOAK=1`: the long variants (more kills, longer outages).
pub fn soak() -> bool {
    std::env::var("WALCAST_SOAK").is_ok_and(|v| v == "1")
}

/// The walcast binary as a child process whose stdout and stderr go to a
/// file, so tests can assert on its log. Killed on drop.
pub struct Walcast {
    pub name: String,
    child: Child,
    log: PathBuf,
    exited: Option<ExitStatus>,
}

/// The numeric field `key` of [`Walcast::log_fields`].
pub fn field(fields: &HashMap<String, String>, key: &str) -> u64 {
    fields
        .get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric {key} in {fields:?}"))
}

impl Walcast {
    /// `walcast run` with `env` (from [`Env::env_vars`], possibly edited) and
    /// `extra` variables; the log goes to `<dir>/<name>.log`.
    pub fn start(
        name: &str,
        dir: &Path,
        env: &[(String, String)],
        extra: &[(&str, &str)],
    ) -> Walcast {
        Walcast::start_command("run", name, dir, env, extra)
    }

    /// Like [`Walcast::start`], for another long-running command (`auth`).
    pub fn start_command(
        command: &str,
        name: &str,
        dir: &Path,
        env: &[(String, String)],
        extra: &[(&str, &str)],
    ) -> Walcast {
        let log = dir.join(format!("{name}.log"));
        let out = File::create(&log).expect("create walcast log");
        let err = out.try_clone().expect("clone walcast log handle");
        let child = Command::new(super::walcast_bin())
            .arg(command)
            // The default log level; a test's own RUST_LOG wins.
            .env("RUST_LOG", "walcast=info")
            .envs(env.iter().cloned())
            .envs(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn walcast");
        Walcast {
            name: name.to_string(),
            child,
            log,
            exited: None,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal with `kill -<signal>`.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.pid().to_string()])
            .status();
        assert!(
            status.map(|s| s.success()).unwrap_or(false),
            "kill -{signal} {} failed",
            self.name
        );
    }

    /// kill -9, then reaps the process.
    pub async fn kill9(&mut self) -> ExitStatus {
        self.signal("KILL");
        self.wait(Duration::from_secs(10)).await
    }

    /// The exit status, if it exited.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = self.child.try_wait().expect("try_wait walcast");
        }
        self.exited
    }

    /// Waits (bounded) for the process to exit.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {timeout:?}\n--- log ---\n{}",
                    self.name,
                    self.log_tail(60)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGTERM, then asserts a clean exit 0 within `timeout`.
    pub async fn stop(&mut self, timeout: Duration) {
        self.signal("TERM");
        let status = self.wait(timeout).await;
        assert_eq!(
            status.code(),
            Some(0),
            "{} did not exit cleanly after SIGTERM ({status})\n--- log ---\n{}",
            self.name,
            self.log_tail(60)
        );
    }

    /// Waits (bounded) until the log contains `needle`.
    pub async fn wait_log(&self, needle: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{} never logged {needle:?} within {timeout:?}:\n{}",
                self.name,
                self.log_tail(30)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The whole log.
    pub fn log(&self) -> String {
        strip_ansi(&super::read_log(&self.log))
    }

    /// The `key=value` fields of the first log line containing `needle`.
    pub fn log_fields(&self, needle: &str) -> HashMap<String, String> {
        let log = self.log();
        let line = log
            .lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no {needle:?} in the log:\n{}", self.log_tail(40)));
        line.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The last `n` lines of the log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Log lines at WARN level.
    pub fn warn_lines(&self) -> Vec<String> {
        self.log()
            .lines()
            .filter(|l| l.contains(" WARN "))
            .map(str::to_string)
            .collect()
    }

    /// The supervisor's retry lines (one per retry).
    pub fn retry_lines(&self) -> Vec<String> {
        self.warn_lines()
            .into_iter()
            .filter(|l| l.contains("restarting from the checkpoint"))
            .collect()
    }
}

impl Drop for Walcast {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `text` without terminal colour codes (log assertions read plain text).
pub fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// How a walcast process ended, for messages: "exit 1", "signal 6 (SIGABRT)".
pub fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit {code}"),
        (None, Some(6)) => "signal 6 (SIGABRT)".into(),
        (None, Some(9)) => "signal 9 (SIGKILL)".into(),
        (None, Some(s)) => format!("signal {s}"),
        (None, None) => "unknown".into(),
    }
}

/// Parses the `retry_in=<Duration as Debug>` field of a retry line.
pub fn retry_in(line: &str) -> Option<Duration> {
    let text = line.split("retry_in=").nth(1)?.split_whitespace().next()?;
    let (number, unit) = text.split_at(text.find(|c: char| c.is_ascii_alphabetic() || c == 'µ')?);
    let n: f64 = number.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "ms" => n / 1e3,
        "µs" | "us" => n / 1e6,
        "ns" => n / 1e9,
        _ => return None,
    };
    Some(Duration::from_secs_f64(secs))
}

/// A steady write load in the background: the randomized multi-tenant
/// [`Workload`] (multi-row transactions, rollbacks, savepoints, actor
/// messages), one transaction at a time with a short pause, on its own
/// connection straight to Postgres (never through a test proxy).
///
/// Every [`HOUSEKEEPING_EVERY`] transactions it also completes every task
/// still `todo`, in one larger transaction: the workload's bulk update
/// touches all of a tenant's `todo` tasks, so without this the events per
/// transaction grow with the table and a minute of load becomes hundreds of
/// thousands of events.
pub struct Load {
    stop: Arc<AtomicBool>,
    txs: Arc<AtomicU64>,
    handle: JoinHandle<Stats>,
}

pub const HOUSEKEEPING_EVERY: u64 = 100;

impl Load {
    pub async fn start(env: &Env, tenants: usize, pause: Duration) -> Load {
        Self::start_on(&env.pg, tenants, pause).await
    }

    /// Like [`Load::start`], for a test whose NATS is not an [`Env`]'s.
    pub async fn start_on(pg: &Postgres, tenants: usize, pause: Duration) -> Load {
        let mut client = pg.client().await;
        let mut workload = Workload::new(Workload::seed(), tenants);
        let stop = Arc::new(AtomicBool::new(false));
        let txs = Arc::new(AtomicU64::new(0));
        let handle = tokio::spawn({
            let (stop, txs) = (stop.clone(), txs.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    workload.run(&mut client, 1).await;
                    let n = txs.fetch_add(1, Ordering::Relaxed) + 1;
                    if n % HOUSEKEEPING_EVERY == 0 {
                        client
                            .execute(
                                "UPDATE tasks SET status = 'done', completed_at = now(), version = version + 1
                                 WHERE status = 'todo'",
                                &[],
                            )
                            .await
                            .expect("housekeeping");
                        workload.stats.committed_txs += 1;
                    }
                    tokio::time::sleep(pause).await;
                }
                workload.stats
            }
        });
        Load { stop, txs, handle }
    }

    /// Transactions run so far (committed or rolled back).
    pub fn transactions(&self) -> u64 {
        self.txs.load(Ordering::Relaxed)
    }

    /// Waits until at least `n` more transactions ran.
    pub async fn wait_transactions(&self, n: u64, timeout: Duration) {
        let target = self.transactions() + n;
        super::wait_until(timeout, || async { self.transactions() >= target })
            .await
            .unwrap_or_else(|e| panic!("the load did not run {n} transactions: {e}"));
    }

    /// Stops after the current transaction; returns what the workload did.
    pub async fn stop(self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.await.expect("the load task panicked")
    }
}

/// `pg_current_wal_lsn() - confirmed_flush_lsn` of walcast's slot, in bytes.
pub async fn slot_lag(client: &Client) -> i64 {
    client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .expect("read walcast's slot")
        .get(0)
}

/// Waits until walcast's slot has confirmed everything written so far: every
/// committed change is published, acknowledged and checkpointed (with
/// `WALCAST_CONFIRM_DELAY=0`).
pub async fn catch_up(client: &Client, timeout: Duration) -> anyhow::Result<()> {
    let target: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await?
        .get(0);
    super::wait_until(timeout, || {
        let target = &target;
        async move {
            client
                .query_one(
                    "SELECT confirmed_flush_lsn >= $1::text::pg_lsn FROM pg_replication_slots WHERE slot_name = 'walcast'",
                    &[target],
                )
                .await
                .map(|r| r.get::<_, Option<bool>>(0).unwrap_or(false))
                .unwrap_or(false)
        }
    })
    .await
}

/// Like [`catch_up`], but gives up as soon as `walcast` exits.
pub async fn catch_up_while_alive(
    client: &Client,
    walcast: &mut Walcast,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = walcast.exited() {
            return Err(format!("{} exited ({})", walcast.name, describe(status)));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "{} did not catch up within {timeout:?}",
                walcast.name
            ));
        }
        if catch_up(client, left.min(Duration::from_secs(1)))
            .await
            .is_ok()
        {
            return Ok(());
        }
    }
}

/// The stream's last sequence, 0 while walcast has not created it yet
/// (for waits that may start before walcast is up).
pub async fn stream_last_seq_or_zero(nats_url: &str) -> u64 {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    match jetstream::new(client).get_stream("WALCAST").await {
        Ok(mut stream) => {
            stream
                .info()
                .await
                .expect("stream info")
                .state
                .last_sequence
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(js)
                if js.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            0
        }
        Err(e) => panic!("stream WALCAST: {e}"),
    }
}

/// The stream's last sequence and duplicate window.
pub async fn stream_state(nats_url: &str) -> (u64, Duration) {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    let js = jetstream::new(client);
    let mut stream = js.get_stream("WALCAST").await.expect("stream WALCAST");
    let info = stream.info().await.expect("stream info");
    (info.state.last_sequence, info.config.duplicate_window)
}

/// `walcast.checkpoints.stream_seq` of slot walcast.
pub async fn checkpoint_stream_seq(client: &Client) -> u64 {
    client
        .query_one(
            "SELECT stream_seq FROM walcast.checkpoints WHERE slot = 'walcast'",
            &[],
        )
        .await
        .expect("read walcast.checkpoints")
        .get::<_, i64>(0) as u64
}

/// Everything a scenario asserts at the end, from the stream (SPEC §4):
/// exactly one message per committed change, one to one with the oracle's
/// independent log; per-tenant seq 1..N without gap or duplicate; commit
/// order and transaction contiguity; nothing rolled back; and replaying the
/// stream rebuilds exactly the source tables. Returns the events checked.
pub async fn verify(scenario: &str, env: &Env, client: &Client, oracle: &Oracle) -> usize {
    verify_at(scenario, &env.nats.url(), client, oracle).await
}

/// [`verify`] against the stream on the NATS server at `nats_url`.
pub async fn verify_at(scenario: &str, nats_url: &str, client: &Client, oracle: &Oracle) -> usize {
    let events: Vec<StreamEvent> = read_stream(nats_url, "WALCAST").await;
    let per_tenant = assert_stream_exact(&events);
    let changes = oracle.changes(client).await;
    let compared = assert_matches_oracle(&events, &changes);
    let problems = durable_state_problems(client, &events, &changes).await;
    assert!(problems.is_empty(), "{scenario}: {}", problems.join("; "));
    assert_replays_to_tables(&events, client).await;
    let txs = {
        let mut lsns: Vec<u64> = events.iter().map(|m| m.event.commit_lsn).collect();
        lsns.dedup();
        lsns.len()
    };
    assert!(compared > 0, "{scenario}: nothing was checked");
    eprintln!(
        "[{scenario}] checked {} events ({txs} transactions, {} tenants, seqs {:?}) against the test_decoding log ({} changes) and the tables",
        events.len(),
        per_tenant.len(),
        {
            let mut v: Vec<_> = per_tenant.iter().collect();
            v.sort();
            v
        },
        changes.len(),
    );
    events.len()
}

/// walcast's durable state in Postgres: the checkpoint and the slot.
#[derive(Debug)]
pub struct Durable {
    pub checkpoint_lsn: u64,
    pub stream_seq: u64,
    pub tenants: BTreeMap<String, u64>,
    pub confirmed_flush: u64,
}

pub async fn durable(client: &Client) -> Durable {
    let row = client
        .query_one(
            "SELECT c.lsn::text, c.stream_seq, s.confirmed_flush_lsn::text
             FROM walcast.checkpoints c, pg_replication_slots s
             WHERE c.slot = 'walcast' AND s.slot_name = 'walcast'",
            &[],
        )
        .await
        .expect("read the checkpoint and the slot");
    let lsn = |i: usize| {
        walcast::lsn::Lsn::parse(row.get::<_, &str>(i))
            .expect("an lsn")
            .0
    };
    let tenants = client
        .query(
            "SELECT tenant_id, seq FROM walcast.tenant_seqs WHERE slot = 'walcast'",
            &[],
        )
        .await
        .expect("read walcast.tenant_seqs")
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1) as u64))
        .collect();
    Durable {
        checkpoint_lsn: lsn(0),
        stream_seq: row.get::<_, i64>(1) as u64,
        tenants,
        confirmed_flush: lsn(2),
    }
}

/// What is wrong with walcast's durable state, judged against the stream
/// and the oracle (empty when all is well):
/// - the checkpoint (LSN c, stream message s, tenant seqs) must describe the
///   stream exactly: the events committed before c are messages 1..=s, and
///   each tenant's last seq among them is its stored seq;
/// - the slot never runs ahead of NATS (SPEC §4.4): every change of a
///   transaction that ended at or before the confirmed flush LSN is in the
///   stream (Postgres will never send it again).
pub async fn durable_state_problems(
    client: &Client,
    events: &[StreamEvent],
    changes: &[Change],
) -> Vec<String> {
    let d = durable(client).await;
    let mut problems = Vec::new();
    let before: Vec<&StreamEvent> = events
        .iter()
        .filter(|m| m.event.commit_lsn < d.checkpoint_lsn)
        .collect();
    if before.len() as u64 != d.stream_seq
        || before.last().is_some_and(|m| m.stream_seq != d.stream_seq)
    {
        problems.push(format!(
            "checkpoint says the events committed before {:X} end at stream message {}, but the stream has {} of them (ending at message {:?})",
            d.checkpoint_lsn,
            d.stream_seq,
            before.len(),
            before.last().map(|m| m.stream_seq)
        ));
    }
    let mut last: BTreeMap<String, u64> = BTreeMap::new();
    for m in &before {
        if m.event.seq > 0 {
            last.insert(m.event.tenant_id.clone(), m.event.seq);
        }
    }
    let names: BTreeSet<&String> = last.keys().chain(d.tenants.keys()).collect();
    for t in names {
        let (stored, real) = (
            d.tenants.get(t).copied().unwrap_or(0),
            last.get(t).copied().unwrap_or(0),
        );
        if stored != real {
            problems.push(format!(
                "checkpoint has seq {stored} for tenant {t}, but its last event committed before {:X} has seq {real}",
                d.checkpoint_lsn
            ));
        }
    }
    let rows = events
        .iter()
        .filter(|m| !m.subject.ends_with("._truncated"))
        .count();
    let gone = changes
        .iter()
        .filter(|c| c.commit_end <= d.confirmed_flush)
        .count();
    if gone > rows {
        problems.push(format!(
            "the slot confirmed {:X}: {gone} committed changes end before it, but only {rows} are in the stream — changes {}..{} are lost (first: {:?})",
            d.confirmed_flush,
            rows + 1,
            gone,
            changes.get(rows)
        ));
    }
    problems
}

/// Mid-scenario check (walcast may be behind or dead): the stream is exact
/// so far, a prefix of the committed changes, and walcast's durable state is
/// consistent with it. Returns the events checked.
pub async fn assert_consistent_so_far(
    what: &str,
    env: &Env,
    client: &Client,
    oracle: &Oracle,
) -> usize {
    let events: Vec<StreamEvent> = read_stream(&env.nats.url(), "WALCAST").await;
    assert_stream_exact(&events);
    let changes = oracle.changes(client).await;
    assert_prefix_of_oracle(&events, &changes);
    let problems = durable_state_problems(client, &events, &changes).await;
    assert!(problems.is_empty(), "{what}: {}", problems.join("; "));
    events.len()
}
