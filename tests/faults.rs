//! Fault injection against real Postgres and real NATS. Each test
//! runs the walcast binary under a steady randomized write load, breaks
//! something (kill -9 at crash points and at random moments, NATS outages
//! and restarts, Postgres restarts, cut / stalled / blackholed TCP
//! connections, a crash left alone past the duplicate window, a second
//! instance on the same slot), and then checks the whole stream (SPEC §4):
//! exactly one message per committed change — one to one with an
//! independent log of committed changes that Postgres keeps through a
//! test_decoding slot, and replaying into exactly the source tables —
//! per-tenant seq 1..N with no gap or duplicate, and commit order.
//!
//! `WALCAST_SOAK=1` runs the long variants (more kills, longer outages).

use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio::task::block_in_place;
use tokio_postgres::Client;

use crate::support::TempDir;
use crate::support::chaos::{
    Load, Walcast, assert_consistent_so_far, catch_up, catch_up_while_alive, checkpoint_stream_seq,
    describe, durable, durable_state_problems, retry_in, slot_lag, soak, stream_state, verify,
};
use crate::support::checks::assert_stream_exact;
use crate::support::daemon::{Env, read_stream, stream_last_seq};
use crate::support::edge::with_var;
use crate::support::oracle::Oracle;
use crate::support::pgdelay::ReplicationDelayProxy;
use crate::support::postgres::StopMode;
use crate::support::proxy::TcpProxy;
use crate::support::workload::Workload;

/// One scenario's world: Postgres + NATS (migrated), the oracle slot created
/// before any change, a superuser client, and a directory for walcast logs.
struct Scenario {
    name: &'static str,
    env: Env,
    client: Client,
    oracle: Oracle,
    dir: TempDir,
    began: Instant,
    passed: std::cell::Cell<bool>,
}

impl Drop for Scenario {
    fn drop(&mut self) {
        if !self.passed.get() {
            eprintln!("[{}] FAILED after {:.1?}", self.name, self.began.elapsed());
        }
    }
}

impl Scenario {
    async fn start(name: &'static str) -> Scenario {
        let began = Instant::now();
        let env = Env::start().await;
        let client = env.pg.client().await;
        let oracle = Oracle::create(&client).await;
        let dir = TempDir::new("faults").expect("log dir");
        Scenario {
            name,
            env,
            client,
            oracle,
            dir,
            began,
            passed: std::cell::Cell::new(false),
        }
    }

    fn walcast(&self, name: &str, env: &[(String, String)], extra: &[(&str, &str)]) -> Walcast {
        Walcast::start(name, self.dir.path(), env, extra)
    }

    /// After a Postgres restart the old client is gone.
    async fn reconnect(&mut self) {
        self.client = self.env.pg.client().await;
    }

    async fn caught_up(&self, timeout: Duration, walcast: &Walcast) {
        if let Err(e) = catch_up(&self.client, timeout).await {
            panic!(
                "[{}] walcast did not catch up with Postgres: {e}\n{}\n--- {} log ---\n{}",
                self.name,
                self.diagnose().await,
                walcast.name,
                walcast.log_tail(80)
            );
        }
    }

    /// Where things stand, for failure messages.
    async fn diagnose(&self) -> String {
        let last = stream_last_seq(&self.env.nats.url(), "WALCAST").await;
        let slot = self
            .client
            .query_one(
                "SELECT active_pid, confirmed_flush_lsn::text, pg_current_wal_lsn()::text
                 FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .map(|r| {
                format!(
                    "slot walcast: active pid {:?}, confirmed {}, current WAL {}",
                    r.get::<_, Option<i32>>(0),
                    r.get::<_, String>(1),
                    r.get::<_, String>(2)
                )
            })
            .unwrap_or_else(|e| format!("slot: {e}"));
        let sessions = self
            .client
            .query(
                "SELECT pid, backend_type, state, wait_event, left(query, 60) FROM pg_stat_activity
                 WHERE application_name = 'walcast'",
                &[],
            )
            .await
            .map(|rows| {
                rows.iter()
                    .map(|r| {
                        format!(
                            "  pid {} {:?} {:?} {:?} {:?}",
                            r.get::<_, i32>(0),
                            r.get::<_, Option<String>>(1),
                            r.get::<_, Option<String>>(2),
                            r.get::<_, Option<String>>(3),
                            r.get::<_, Option<String>>(4)
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            })
            .unwrap_or_else(|e| format!("sessions: {e}"));
        format!(
            "stream WALCAST ends at {last}; {slot}; checkpoint stream seq {}\nwalcast sessions:\n{sessions}",
            checkpoint_stream_seq(&self.client).await
        )
    }

    async fn verify(&self, what: &str) -> usize {
        verify(
            &format!("{}: {what}", self.name),
            &self.env,
            &self.client,
            &self.oracle,
        )
        .await
    }

    fn done(&self, checked: usize) {
        self.passed.set(true);
        eprintln!(
            "[{}] PASS: {checked} events checked in {:.1?}",
            self.name,
            self.began.elapsed()
        );
    }
}

/// Words a retry line's cause uses when walcast waits for NATS.
const NATS_CAUSES: &[&str] = &["NATS", "JetStream", "stream WALCAST", "broker"];
/// ... and when it waits for Postgres.
const PG_CAUSES: &[&str] = &["Postgres", "replication connection"];

/// Asserts the supervisor's retry lines: one WARN per retry, each with the
/// cause, mentioning `cause`, with a delay capped at 30 s. Returns the
/// delays.
fn assert_retries_logged(walcast: &Walcast, cause: &[&str], at_least: usize) -> Vec<Duration> {
    let retries = walcast.retry_lines();
    assert!(
        retries.len() >= at_least,
        "expected at least {at_least} retry WARN lines, got {}:\n{}",
        retries.len(),
        walcast.log_tail(60)
    );
    for line in &retries {
        assert!(
            line.contains("error="),
            "a retry line without its cause: {line}"
        );
        assert!(
            cause.iter().any(|c| line.contains(c)),
            "a retry line that does not say what walcast waits for ({cause:?}): {line}"
        );
    }
    let delays: Vec<Duration> = retries.iter().filter_map(|l| retry_in(l)).collect();
    assert_eq!(delays.len(), retries.len(), "every retry line has retry_in");
    for d in &delays {
        assert!(
            *d <= Duration::from_secs(30),
            "backoff above its cap: {d:?}"
        );
    }
    delays
}

fn assert_backoff_shape(delays: &[Duration]) {
    // Within one outage the delays grow (each attempt doubles the base; the
    // jitter is at most half of it) until the cap, and they are jittered
    // (not exactly 200 ms × 2^n).
    for pair in delays.windows(2) {
        if pair[0] < Duration::from_secs(15) {
            assert!(
                pair[1] >= pair[0],
                "backoff shrank within one outage: {delays:?}"
            );
        }
    }
    let exact = delays.iter().all(|d| {
        let units = d.as_secs_f64() / 0.2;
        (units - units.round()).abs() < 1e-6 && (units.round() as u64).is_power_of_two()
    });
    assert!(!exact, "no jitter in the backoff: {delays:?}");
}

// ---------------------------------------------------------------------------
// 1. kill -9 at crash points and at random moments
// ---------------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Kill {
    /// `WALCAST_CRASH_AT=<point>:<n>`: abort (like kill -9) the n-th time.
    At(&'static str, u64),
    /// kill -9 after this long.
    After(Duration),
}

/// At least 20 kills during a steady write load: every crash point several
/// times (mid-transaction, between publish and ack, between ack and
/// checkpoint, between checkpoint and LSN confirm) and at random moments, in
/// random order, each restart racing the previous process's walsender.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_at_crash_points_and_random_moments() {
    let s = Scenario::start("kill -9").await;
    let seed = Workload::seed();
    eprintln!("kill plan seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let load = Load::start(&s.env, 8, Duration::from_millis(2)).await;
    let env = s.env.env_vars();

    let (rounds, random) = if soak() { (15, 60) } else { (3, 10) };
    let mut plan = Vec::new();
    for _ in 0..rounds {
        plan.push(Kill::At("mid_transaction", rng.random_range(1..=20)));
        plan.push(Kill::At("after_publish", rng.random_range(1..=300)));
        plan.push(Kill::At("after_ack", rng.random_range(1..=300)));
        plan.push(Kill::At("after_checkpoint", rng.random_range(1..=3)));
    }
    for _ in 0..random {
        plan.push(Kill::After(Duration::from_millis(
            rng.random_range(50..=1500),
        )));
    }
    plan.shuffle(&mut rng);
    let first = plan
        .iter()
        .position(|k| matches!(k, Kill::After(_)))
        .unwrap();
    plan.swap(0, first); // the first run creates the stream; let it live a little

    let mut ahead = 0;
    for (i, kill) in plan.iter().enumerate() {
        let name = format!("run{i:02}");
        match kill {
            Kill::At(point, n) => {
                let spec = format!("{point}:{n}");
                let mut w = s.walcast(&name, &env, &[("WALCAST_CRASH_AT", &spec)]);
                let status = w.wait(Duration::from_secs(60)).await;
                let log = w.log();
                assert!(
                    log.contains(&format!("crash point {point} reached (hit {n})")),
                    "{name} ended ({}) without reaching {spec}:\n{}",
                    describe(status),
                    w.log_tail(40)
                );
                assert_eq!(describe(status), "signal 6 (SIGABRT)", "{name}");
            }
            Kill::After(after) => {
                let mut w = s.walcast(&name, &env, &[]);
                tokio::time::sleep(*after).await;
                if let Some(status) = w.exited() {
                    panic!(
                        "{name} exited by itself ({}):\n{}",
                        describe(status),
                        w.log_tail(40)
                    );
                }
                let status = w.kill9().await;
                assert_eq!(describe(status), "signal 9 (SIGKILL)", "{name}");
            }
        }
        // walcast is dead: the stream so far, the checkpoint and the slot
        // must be consistent with each other and with the oracle.
        let (last, _) = stream_state(&s.env.nats.url()).await;
        let checkpointed = checkpoint_stream_seq(&s.client).await;
        if last > checkpointed {
            ahead += 1;
        }
        let events = assert_consistent_so_far(
            &format!("after kill #{i} {kill:?}"),
            &s.env,
            &s.client,
            &s.oracle,
        )
        .await;
        eprintln!("[kill -9] #{i:02} {kill:?}: stream {last} (checked), checkpoint {checkpointed}");
        assert!(events as u64 >= last);
    }

    let mut w = s.walcast("final", &env, &[]);
    load.wait_transactions(50, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(120), &w).await;
    w.stop(Duration::from_secs(15)).await;
    let checked = s
        .verify(&format!(
            "{} kills ({} at crash points, {} at random times; the stream was ahead of the checkpoint after {ahead})",
            plan.len(),
            plan.iter().filter(|k| matches!(k, Kill::At(..))).count(),
            plan.iter().filter(|k| matches!(k, Kill::After(..))).count(),
        ))
        .await;
    assert!(plan.len() >= 20);
    assert!(
        ahead > 0,
        "no kill left published-but-unchecked messages: the replay path was never exercised"
    );
    eprintln!("[kill -9] workload: {stats:?}");
    s.done(checked);
}

// ---------------------------------------------------------------------------
// 2. NATS outages and restarts
// ---------------------------------------------------------------------------

/// NATS stopped for 30 s while Postgres keeps writing, then started again:
/// walcast retries (one WARN per retry, with the cause, capped jittered
/// exponential backoff), never confirms the slot past what NATS
/// acknowledged, and catches up by itself with nothing lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_down_30s_while_postgres_writes() {
    let s = Scenario::start("NATS down 30 s").await;
    let load = Load::start(&s.env, 6, Duration::from_millis(3)).await;
    let w = s.walcast("walcast", &s.env.env_vars(), &[]);
    s.env.wait_for_messages(300, Duration::from_secs(30)).await;

    block_in_place(|| s.env.nats.stop()).expect("stop nats");
    let outage = Duration::from_secs(if soak() { 120 } else { 30 });
    let written_before = load.transactions();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let frozen = confirmed_lsn(&s.client).await;
    tokio::time::sleep(outage - Duration::from_secs(3)).await;
    assert_eq!(
        confirmed_lsn(&s.client).await,
        frozen,
        "the slot advanced while NATS was down (SPEC §4.4)"
    );
    let written = load.transactions() - written_before;
    assert!(
        written > 100,
        "Postgres kept writing: {written} transactions"
    );
    let retries_during = w.retry_lines().len();
    block_in_place(|| s.env.nats.start_again()).expect("restart nats");
    let back = Instant::now();

    load.wait_transactions(100, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(90), &w).await;
    let recovered = back.elapsed();
    let mut w = w;
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;

    // walcast says what it waits for: a WARN naming NATS during the outage,
    // and one WARN with the cause per retry.
    assert!(
        w.warn_lines().iter().any(|l| l.contains("NATS")),
        "no WARN says walcast waits for NATS:\n{}",
        w.log_tail(40)
    );
    let delays = assert_retries_logged(&w, NATS_CAUSES, 1);
    if retries_during >= 3 {
        assert_backoff_shape(&delays[..retries_during]);
    }
    let checked = s
        .verify(&format!(
            "{written} transactions written during the outage, {} retries, caught up {recovered:.1?} after NATS came back",
            delays.len()
        ))
        .await;
    eprintln!("[NATS down] retry delays {delays:?}; workload {stats:?}");
    s.done(checked);
}

/// NATS restarted mid-stream (same store dir): a graceful stop + start, then
/// kill -9 + start. The test server keeps NATS's default `sync_interval`, so
/// a kill -9 can lose the last acknowledged messages: walcast runs with a
/// confirm delay (SPEC §4.7) and must republish them from the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_restarted_mid_stream() {
    let s = Scenario::start("NATS restarts").await;
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    let env = with_var(&s.env.env_vars(), "WALCAST_CONFIRM_DELAY", "5s");
    let mut w = s.walcast("walcast", &env, &[]);
    s.env.wait_for_messages(300, Duration::from_secs(30)).await;

    let before = stream_last_seq(&s.env.nats.url(), "WALCAST").await;
    block_in_place(|| {
        s.env.nats.stop()?;
        s.env.nats.start_again()
    })
    .expect("restart nats");
    load.wait_transactions(300, Duration::from_secs(60)).await;
    let grown = wait_stream_beyond(&s, before + 300, &w).await;
    eprintln!("[NATS restarts] graceful restart at stream {before}; stream went on to {grown}");

    let before = stream_last_seq(&s.env.nats.url(), "WALCAST").await;
    block_in_place(|| {
        s.env.nats.kill9()?;
        s.env.nats.start_again()
    })
    .expect("kill -9 and restart nats");
    load.wait_transactions(300, Duration::from_secs(60)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(90), &w).await;
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;
    // Said what happened: a WARN naming NATS; any retry names its cause.
    assert!(
        w.warn_lines().iter().any(|l| l.contains("NATS")),
        "no WARN about the NATS restarts:\n{}",
        w.log_tail(40)
    );
    assert_retries_logged(&w, NATS_CAUSES, 0);
    let lost: Vec<String> = w
        .warn_lines()
        .into_iter()
        .filter(|l| l.contains("lost"))
        .collect();
    let checked = s
        .verify(&format!(
            "NATS stop+start and kill -9+start (at stream {before}), {} retries, {} broker-loss reports {lost:?}",
            w.retry_lines().len(),
            lost.len()
        ))
        .await;
    eprintln!("[NATS restarts] workload {stats:?}");
    s.done(checked);
}

async fn wait_stream_beyond(s: &Scenario, count: u64, w: &Walcast) -> u64 {
    let url = s.env.nats.url();
    crate::support::wait_for(Duration::from_secs(90), || {
        let url = url.clone();
        async move {
            let last = stream_last_seq(&url, "WALCAST").await;
            (last >= count).then_some(last)
        }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "the stream never reached {count} messages: {e}\n--- log ---\n{}",
            w.log_tail(60)
        )
    })
}

// ---------------------------------------------------------------------------
// 3. Postgres restarts
// ---------------------------------------------------------------------------

/// A burst big enough that walcast is still publishing it when Postgres goes
/// down (`done` tasks, so the workload's bulk updates of `todo` tasks do not
/// touch them again).
async fn burst(client: &Client, rows: i32) {
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, priority, status)
             SELECT gen_random_uuid(), 'tenant-' || (i % 5), 'burst #' || i, i % 7, 'done'
             FROM generate_series(1, $1) AS i",
            &[&rows],
        )
        .await
        .expect("burst");
}

/// Postgres restarted mid-stream, with a fast and with an immediate
/// shutdown: walcast reconnects by itself (capped exponential backoff with
/// jitter, one WARN per retry saying it waits for Postgres).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restarted_fast_and_immediate() {
    let mut s = Scenario::start("Postgres restarts").await;
    let mut w = s.walcast("walcast", &s.env.env_vars(), &[]);
    let mut notes = Vec::new();
    let mut first_outage_retries = 0;
    for mode in [StopMode::Fast, StopMode::Immediate] {
        let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
        load.wait_transactions(400, Duration::from_secs(60)).await;
        load.stop().await;
        burst(&s.client, 20_000).await;
        let at = stream_last_seq(&s.env.nats.url(), "WALCAST").await;
        let retries = w.retry_lines().len();
        block_in_place(|| s.env.pg.stop(mode)).expect("stop postgres");
        tokio::time::sleep(Duration::from_secs(4)).await;
        if mode == StopMode::Fast {
            first_outage_retries = w.retry_lines().len();
        }
        block_in_place(|| s.env.pg.start_again()).expect("start postgres");
        let back = Instant::now();
        s.reconnect().await;
        s.caught_up(Duration::from_secs(90), &w).await;
        let retried = w.retry_lines().len() - retries;
        assert!(
            retried >= 1,
            "walcast never noticed that Postgres went down ({mode:?}):\n{}",
            w.log_tail(40)
        );
        notes.push(format!(
            "{mode:?} stop at stream {at} (mid-burst: {}), {retried} retries, caught up {:.1?} after Postgres was back",
            at < stream_last_seq(&s.env.nats.url(), "WALCAST").await,
            back.elapsed()
        ));
    }
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    load.wait_transactions(200, Duration::from_secs(60)).await;
    load.stop().await;
    s.caught_up(Duration::from_secs(60), &w).await;
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;
    let delays = assert_retries_logged(&w, PG_CAUSES, 4);
    eprintln!("[Postgres restarts] retry delays {delays:?}");
    // Each outage starts a new run of growing delays; check the first one.
    assert_backoff_shape(&delays[..first_outage_retries]);
    let checked = s.verify(&notes.join("; ")).await;
    s.done(checked);
}

// ---------------------------------------------------------------------------
// 4. TCP connections cut, stalled and blackholed
// ---------------------------------------------------------------------------

/// Which of walcast's connections a TCP fault scenario cuts.
#[derive(Clone, Copy)]
enum Link {
    Postgres,
    Nats,
}

/// Cuts, a stall, then a blackhole of walcast's Postgres connections (SQL and
/// replication), through a proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_cut_stalled_and_blackholed() {
    connections_cut_stalled_and_blackholed(Link::Postgres).await;
}

/// Cuts, a stall, then a blackhole of walcast's NATS connection, through a
/// proxy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connections_cut_stalled_and_blackholed() {
    connections_cut_stalled_and_blackholed(Link::Nats).await;
}

/// A TCP proxy in front of `link`'s server, and walcast's environment
/// pointed at it.
fn through_proxy(s: &Scenario, link: Link) -> (TcpProxy, Vec<(String, String)>) {
    let (port, var) = match link {
        Link::Postgres => (s.env.pg.port(), "WALCAST_DATABASE_URL"),
        Link::Nats => (s.env.nats.port(), "WALCAST_NATS_URL"),
    };
    let proxy = TcpProxy::start(port);
    let url = match link {
        Link::Postgres => format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port()),
        Link::Nats => format!("nats://127.0.0.1:{}", proxy.port()),
    };
    let env = with_var(&s.env.env_vars(), var, &url);
    (proxy, env)
}

/// Three cuts (every connection reset), a stall that heals (shorter than
/// wal_sender_timeout and than two NATS pings), then 5 s of a server that
/// accepts connections but never answers; the stream stays exact throughout.
async fn connections_cut_stalled_and_blackholed(link: Link) {
    let name = match link {
        Link::Postgres => "Postgres TCP faults",
        Link::Nats => "NATS TCP faults",
    };
    let s = Scenario::start(name).await;
    let (proxy, env) = through_proxy(&s, link);
    let mut w = s.walcast("walcast", &env, &[]);
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    s.env.wait_for_messages(200, Duration::from_secs(30)).await;

    for _ in 0..3 {
        load.wait_transactions(150, Duration::from_secs(30)).await;
        proxy.cut();
    }
    load.wait_transactions(150, Duration::from_secs(30)).await;
    proxy.pause();
    tokio::time::sleep(Duration::from_secs(8)).await; // the fault's length, not a wait
    proxy.resume();
    load.wait_transactions(150, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(45), &w).await;
    let checked = s.verify("3 cuts and an 8 s stall").await;
    eprintln!("[{name}] workload {stats:?}");

    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    load.wait_transactions(100, Duration::from_secs(30)).await;
    proxy.blackhole(true);
    proxy.cut();
    tokio::time::sleep(Duration::from_secs(5)).await; // the fault's length, not a wait
    proxy.blackhole(false);
    let lifted = Instant::now();
    load.wait_transactions(100, Duration::from_secs(30)).await;
    load.stop().await;
    s.caught_up(Duration::from_secs(60), &w).await;
    eprintln!(
        "[{name}] caught up {:.1?} after the blackhole was lifted",
        lifted.elapsed()
    );
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;
    if let Link::Postgres = link {
        assert_retries_logged(&w, PG_CAUSES, 3);
    }
    let checked = checked.max(s.verify("3 cuts, an 8 s stall and a 5 s blackhole").await);
    s.done(checked);
}

/// A NATS stall long enough to fill walcast's window of unacknowledged
/// publishes (`WALCAST_MAX_IN_FLIGHT=64`, a 3 s stall): the publisher must
/// wait for acks and go on once they come, not hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_stall_fills_the_in_flight_window() {
    let s = Scenario::start("in-flight window full").await;
    let (proxy, env) = through_proxy(&s, Link::Nats);
    let mut w = s.walcast("walcast", &env, &[("WALCAST_MAX_IN_FLIGHT", "64")]);
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    s.env.wait_for_messages(200, Duration::from_secs(30)).await;
    proxy.pause();
    load.wait_transactions(200, Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    proxy.resume();
    let resumed = Instant::now();
    load.wait_transactions(100, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(30), &w).await;
    let recovered = resumed.elapsed();
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;
    let checked = s
        .verify(&format!(
            "a 3 s NATS stall with at most 64 publishes in flight, caught up {recovered:.1?} after it"
        ))
        .await;
    eprintln!("[in-flight window full] workload {stats:?}");
    s.done(checked);
}

/// The connection to NATS goes silent (packets dropped, nothing reset) for
/// 10 s, then the network heals. The old connection is dead for good, so
/// walcast must notice and reconnect, and catch up within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_connection_hangs_silently() {
    connection_hangs_silently(Link::Nats).await;
}

/// The connections to Postgres go silent (packets dropped, nothing reset)
/// for 10 s, then the network heals. The old connections are dead for good,
/// so walcast must notice and reconnect, and catch up within 30 s.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_hang_silently() {
    connection_hangs_silently(Link::Postgres).await;
}

async fn connection_hangs_silently(link: Link) {
    let (name, what, causes) = match link {
        Link::Nats => ("NATS connection hangs", "NATS connection", NATS_CAUSES),
        Link::Postgres => (
            "Postgres connections hang",
            "Postgres connections",
            PG_CAUSES,
        ),
    };
    let s = Scenario::start(name).await;
    let (proxy, env) = through_proxy(&s, link);
    let mut w = s.walcast("walcast", &env, &[]);
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    s.env.wait_for_messages(200, Duration::from_secs(30)).await;
    // Blackhole without a cut: the open connection swallows everything.
    proxy.blackhole(true);
    tokio::time::sleep(Duration::from_secs(10)).await; // the fault's length, not a wait
    proxy.blackhole(false);
    let healed = Instant::now();
    load.wait_transactions(100, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(30), &w).await;
    let recovered = healed.elapsed();
    assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    w.stop(Duration::from_secs(15)).await;
    assert_retries_logged(&w, causes, 1);
    let checked = s
        .verify(&format!(
            "10 s silent {what}, caught up {recovered:.1?} after the network healed"
        ))
        .await;
    eprintln!("[{name}] workload {stats:?}");
    s.done(checked);
}

// ---------------------------------------------------------------------------
// 5. Down longer than the duplicate window
// ---------------------------------------------------------------------------

/// A crash between publish and checkpoint, then walcast down for longer than
/// the stream's duplicate window (2 s): JetStream would accept the same
/// Nats-Msg-Id again, so only walcast's own reconciliation prevents
/// duplicates.
#[cfg(feature = "failpoints")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_longer_than_the_duplicate_window() {
    let s = Scenario::start("past the duplicate window").await;
    let mut rng = StdRng::seed_from_u64(Workload::seed());
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    let env = s.env.env_vars();
    let window = [("WALCAST_DUPLICATE_WINDOW", "2s")];
    let mut notes = Vec::new();
    let points: &[&str] = if soak() {
        &["after_ack", "after_publish", "after_ack", "after_publish"]
    } else {
        &["after_ack", "after_publish"]
    };
    for (i, point) in points.iter().copied().enumerate() {
        let spec = format!("{point}:{}", rng.random_range(100..=400));
        let mut crash = s.walcast(
            &format!("crash{i}"),
            &env,
            &[window[0], ("WALCAST_CRASH_AT", &spec)],
        );
        let status = crash.wait(Duration::from_secs(60)).await;
        assert_eq!(
            describe(status),
            "signal 6 (SIGABRT)",
            "crash at {spec}:\n{}",
            crash.log_tail(40)
        );
        let (last, dup_window) = stream_state(&s.env.nats.url()).await;
        assert_eq!(
            dup_window,
            Duration::from_secs(2),
            "the stream's duplicate window"
        );
        let checkpointed = checkpoint_stream_seq(&s.client).await;
        if point == "after_ack" {
            assert!(
                last > checkpointed,
                "an acknowledged message must be in the stream but not yet checkpointed ({last} vs {checkpointed})"
            );
        }
        assert_consistent_so_far(
            &format!("after the crash at {spec}"),
            &s.env,
            &s.client,
            &s.oracle,
        )
        .await;
        notes.push(format!(
            "{spec}: {} messages past the checkpoint",
            last - checkpointed
        ));
        // Stay down well past the duplicate window while Postgres writes.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let mut w = s.walcast(&format!("run{i}"), &env, &window);
        load.wait_transactions(100, Duration::from_secs(30)).await;
        s.caught_up(Duration::from_secs(60), &w).await;
        w.stop(Duration::from_secs(15)).await;
        let events = read_stream(&s.env.nats.url(), "WALCAST").await;
        assert_stream_exact(&events);
    }
    let stats = load.stop().await;
    let mut w = s.walcast("final", &env, &window);
    s.caught_up(Duration::from_secs(60), &w).await;
    w.stop(Duration::from_secs(15)).await;
    let checked = s.verify(&notes.join("; ")).await;
    eprintln!("[duplicate window] workload {stats:?}");
    s.done(checked);
}

// ---------------------------------------------------------------------------
// 6. Two instances on one slot
// ---------------------------------------------------------------------------

/// A second `walcast run` on the same slot must not corrupt anything: it
/// waits as a standby (retrying, saying the slot is in use) and takes over
/// when the first is killed — or exits non-zero with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_slot() {
    let s = Scenario::start("two instances").await;
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    let mut a = s.walcast("a", &s.env.env_vars(), &[]);
    s.env.wait_for_messages(200, Duration::from_secs(30)).await;
    let mut b = s.walcast("b", &s.env.env_vars(), &[]);
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(a.exited().is_none(), "a exited:\n{}", a.log_tail(40));
    let standby = match b.exited() {
        None => {
            let retries = b.retry_lines();
            assert!(
                !retries.is_empty() && retries.iter().all(|l| l.contains("active for PID")),
                "the second instance must say it waits for the slot in use:\n{}",
                b.log_tail(40)
            );
            eprintln!("[two instances] the standby says: {}", retries[0]);
            assert!(
                !b.log().contains("replicating"),
                "the second instance replicated while the first held the slot:\n{}",
                b.log_tail(40)
            );
            true
        }
        Some(status) => {
            let log = b.log();
            assert_ne!(status.code(), Some(0), "the second instance exited 0");
            assert!(
                log.contains("slot") && (log.contains("in use") || log.contains("active")),
                "the second instance exited without saying why:\n{log}"
            );
            false
        }
    };
    let events = read_stream(&s.env.nats.url(), "WALCAST").await;
    assert_stream_exact(&events);

    a.kill9().await;
    let mut taker = if standby {
        b
    } else {
        s.walcast("c", &s.env.env_vars(), &[])
    };
    load.wait_transactions(300, Duration::from_secs(60)).await;
    let stats = load.stop().await;
    s.caught_up(Duration::from_secs(90), &taker).await;
    assert!(
        taker.log().contains("replicating"),
        "{} took over",
        taker.name
    );
    taker.stop(Duration::from_secs(15)).await;
    let checked = s
        .verify(&format!(
            "second instance {} ({} retries), took over after kill -9 of the first",
            if standby {
                "waited as a standby"
            } else {
                "exited"
            },
            taker.retry_lines().len()
        ))
        .await;
    eprintln!("[two instances] workload {stats:?}");
    s.done(checked);
}

/// The standby takes over at the worst moment: it has read the checkpoint
/// and the stream's tail, and is connecting for START_REPLICATION (held 3 s
/// by a slow network path), while the first instance still advances the
/// checkpoint and the slot; then the first dies. The standby must start from
/// where the slot really is, not from what it read before it owned the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_takes_over_while_connecting() {
    let s = Scenario::start("takeover while connecting").await;
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    let mut a = s.walcast("a", &s.env.env_vars(), &[]);
    s.env.wait_for_messages(300, Duration::from_secs(30)).await;

    let slow = ReplicationDelayProxy::start(s.env.pg.port(), Duration::from_secs(3));
    let env_b = with_var(
        &s.env.env_vars(),
        "WALCAST_DATABASE_URL",
        &format!("postgres://postgres@127.0.0.1:{}/postgres", slow.port()),
    );
    let before = checkpoint_stream_seq(&s.client).await;
    let mut b = s.walcast("b", &env_b, &[]);
    slow.wait_held(1, Duration::from_secs(30)).await;
    // b has read the checkpoint and the stream's tail; a goes on for a
    // second, drains (the writers pause), checkpoints, and dies.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = load.stop().await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    a.kill9().await;
    let after = checkpoint_stream_seq(&s.client).await;
    eprintln!(
        "[takeover] a advanced the checkpoint from stream seq {before} to {after} while b was connecting"
    );
    assert!(
        after > before,
        "the scenario needs a to move the checkpoint"
    );
    // b gets the slot; then the writers go on.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let load = Load::start(&s.env, 6, Duration::from_millis(2)).await;
    load.wait_transactions(300, Duration::from_secs(60)).await;
    load.stop().await;
    let b_ok = catch_up_while_alive(&s.client, &mut b, Duration::from_secs(60)).await;
    let b_status = b.exited();
    eprintln!(
        "[takeover] b: {}; caught up: {b_ok:?}\n--- b log ---\n{}",
        b_status.map(describe).unwrap_or_else(|| "running".into()),
        b.log_tail(30)
    );
    let mut problems = Vec::new();
    if b_status.is_some() || b_ok.is_err() {
        if b.exited().is_none() {
            b.kill9().await;
        }
        let events = read_stream(&s.env.nats.url(), "WALCAST").await;
        let changes = s.oracle.changes(&s.client).await;
        problems = durable_state_problems(&s.client, &events, &changes).await;
        eprintln!(
            "[takeover] after b failed: stream {} messages, {} committed changes, durable state {:?}, problems: {problems:#?}",
            events.len(),
            changes.len(),
            durable(&s.client).await
        );
    }
    let mut taker = b;
    if b_status.is_some() || b_ok.is_err() {
        // What an operator would do: start walcast again.
        taker = s.walcast("c", &s.env.env_vars(), &[]);
        let c_ok = catch_up_while_alive(&s.client, &mut taker, Duration::from_secs(30)).await;
        eprintln!(
            "[takeover] restarting walcast (c): caught up {c_ok:?}, {}\n--- c log ---\n{}",
            taker
                .exited()
                .map(describe)
                .unwrap_or_else(|| "running".into()),
            taker.log_tail(10)
        );
    }
    assert!(
        b_status.is_none() && b_ok.is_ok(),
        "the standby failed to take over ({}); walcast's durable state is then: {}",
        b_status
            .map(describe)
            .unwrap_or_else(|| "did not catch up".into()),
        problems.join("; ")
    );
    let checked = s.verify("standby took over while connecting").await;
    taker.stop(Duration::from_secs(15)).await;
    eprintln!("[takeover] workload {stats:?}");
    s.done(checked);
}

// ---------------------------------------------------------------------------
// 7. Idle: other tables write 50 MB, the slot keeps up
// ---------------------------------------------------------------------------

/// No changes in the published tables while another table gets 50 MB of
/// writes: walcast confirms the keepalive positions, so the WAL its slot
/// holds back stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_slot_follows_wal_written_by_other_tables() {
    let s = Scenario::start("idle slot").await;
    let mut w = s.walcast("walcast", &s.env.env_vars(), &[]);
    let mut client = s.env.pg.client().await;
    Workload::new(Workload::seed(), 3)
        .run(&mut client, 30)
        .await;
    s.caught_up(Duration::from_secs(30), &w).await;
    let published = stream_last_seq(&s.env.nats.url(), "WALCAST").await;
    client
        .batch_execute("CREATE TABLE noise (id bigserial PRIMARY KEY, payload text)")
        .await
        .unwrap();
    // The oracle slot would hold the WAL too; it is not what is measured.
    let start: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let megabytes = if soak() { 500 } else { 50 };
    let (mut worst, mut decoder_behind) = (0i64, 0i64);
    for i in 0..megabytes {
        client
            .execute(
                "INSERT INTO noise (payload) SELECT repeat(md5(g::text), 30) FROM generate_series(1, 1000) g",
                &[],
            )
            .await
            .unwrap();
        if i >= 5 {
            let (lag, behind) = lags(&s.client).await;
            worst = worst.max(lag);
            decoder_behind = decoder_behind.max(behind);
        }
        // Another application's steady writes, not one giant burst.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let written: i64 = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1::text::pg_lsn)::bigint",
            &[&start],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        written >= megabytes as i64 * 1_000_000,
        "the noise wrote only {written} bytes of WAL"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let settled = slot_lag(&s.client).await;
    eprintln!(
        "[idle slot] {:.1} MB of WAL from another table; walcast slot lag: worst {:.2} MB while writing (walsender behind the WAL by at most {:.2} MB), {:.2} MB after",
        written as f64 / 1e6,
        worst as f64 / 1e6,
        decoder_behind as f64 / 1e6,
        settled as f64 / 1e6
    );
    assert!(
        worst < 8_000_000,
        "the slot held back {worst} bytes of WAL while idle:\n{}",
        w.log_tail(30)
    );
    assert!(
        settled < 1_000_000,
        "the slot held back {settled} bytes once quiet"
    );
    assert_eq!(
        stream_last_seq(&s.env.nats.url(), "WALCAST").await,
        published,
        "writes to other tables published something"
    );
    w.stop(Duration::from_secs(15)).await;
    let checked = s.verify("50 MB of WAL from another table").await;
    s.done(checked);
}

async fn confirmed_lsn(client: &Client) -> String {
    client
        .query_one(
            "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

/// `(pg_current_wal_lsn() - confirmed_flush_lsn, pg_current_wal_lsn() -
/// sent_lsn)` for walcast's slot: how much WAL the slot holds back, and how
/// much of that the walsender itself has not even decoded yet.
async fn lags(client: &Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), s.confirmed_flush_lsn)::bigint,
                    coalesce(pg_wal_lsn_diff(pg_current_wal_lsn(), r.sent_lsn)::bigint, -1)
             FROM pg_replication_slots s LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
             WHERE s.slot_name = 'walcast'",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}
