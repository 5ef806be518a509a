//! Configuration and environment: every misconfiguration gives
//! one clear error line (`walcast: error: ...`, naming the problem, never a
//! password) and a non-zero exit within a bound — never a panic or a hang;
//! `walcast check` prints a ✗ line with a fix for each and exits non-zero,
//! and only ✓ / i lines (exit 0) on a good setup. A slot held by another
//! process is waited for (standby, WARN naming the slot), and a dropped slot
//! stops walcast with the documented recovery instead of silently
//! recreating it.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use async_nats::jetstream;

use crate::support::chaos::catch_up;
use crate::support::daemon::{Env, read_stream};
use crate::support::edge::{Outcome, run_bounded, start_walcast, with_var};
use crate::support::nats::{Nats, NatsOptions};
use crate::support::postgres::Postgres;
use crate::support::{TempDir, free_port, wait_until};

/// How long a failing `walcast run` may take to exit (the slowest case waits
/// out `WALCAST_STARTUP_TIMEOUT=2s`).
const BOUND: Duration = Duration::from_secs(20);

/// Passwords that must never appear in any output.
const RIGHT_PASSWORD: &str = "Right-Pa55-4ever";
const WRONG_PASSWORD: &str = "Wr0ng-Pa55-777";
const UNREACHABLE_PASSWORD: &str = "Unreach-Pa55-42";

struct Case {
    name: &'static str,
    /// Environment for the binary (replaces the good one's variables).
    env: Vec<(String, String)>,
    /// Extra arguments after `run` / `check`.
    args: Vec<String>,
    /// What the `walcast: error:` line of `walcast run` must say (all of them).
    run_says: &'static [&'static str],
    /// What the ✗ line of `walcast check` must say; `None`: the settings
    /// themselves are invalid, so `check` fails like `run`, with one line.
    check_says: Option<&'static [&'static str]>,
}

fn assert_one_error_line(case: &str, cmd: &str, out: &Outcome, says: &[&str]) {
    let all = format!("{}{}", out.stdout, out.stderr);
    let context = || format!("[{case}] walcast {cmd} ({:?}):\n{all}", out.elapsed);
    assert!(
        out.code.is_some(),
        "{}: still running after {BOUND:?}",
        context()
    );
    assert_ne!(out.code, Some(0), "{}: exit 0", context());
    assert!(!all.contains("panicked"), "{}: panic", context());
    for secret in [RIGHT_PASSWORD, WRONG_PASSWORD, UNREACHABLE_PASSWORD] {
        assert!(
            !all.contains(secret),
            "{}: password in the output",
            context()
        );
    }
    let last = out.last_line();
    assert!(
        last.starts_with("walcast: error: "),
        "{}: the last line is not the error line",
        context()
    );
    // One line: the line before the error line, if any, is a log line
    // (timestamped), not the first half of a multi-line message.
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    if let [.., before, _] = lines.as_slice() {
        assert!(
            before.starts_with(|c: char| c.is_ascii_digit()),
            "{}: the error spans several lines (line before it: {before:?})",
            context()
        );
    }
    let lower = last.to_lowercase();
    for s in says {
        assert!(
            lower.contains(&s.to_lowercase()),
            "{}: the error line does not say {s:?}: {last}",
            context()
        );
    }
}

fn assert_check_fails(case: &str, out: &Outcome, says: &[&str]) {
    let all = format!("{}{}", out.stdout, out.stderr);
    let context = || format!("[{case}] walcast check:\n{all}");
    assert!(
        out.code.is_some() && out.code != Some(0),
        "{}: exit {:?}",
        context(),
        out.code
    );
    assert!(!all.contains("panicked"), "{}", context());
    for secret in [RIGHT_PASSWORD, WRONG_PASSWORD, UNREACHABLE_PASSWORD] {
        assert!(
            !all.contains(secret),
            "{}: password in the output",
            context()
        );
    }
    let lines: Vec<&str> = out.stdout.lines().collect();
    let failed = lines.iter().enumerate().find(|(_, l)| {
        l.starts_with("✗ ")
            && says
                .iter()
                .all(|s| l.to_lowercase().contains(&s.to_lowercase()))
    });
    let Some((at, _)) = failed else {
        panic!("{}: no ✗ line saying {says:?}", context());
    };
    assert!(
        lines
            .get(at + 1)
            .is_some_and(|l| l.trim_start().starts_with("fix: ") && l.len() > 12),
        "{}: the ✗ line has no fix",
        context()
    );
}

/// Writes pg_hba.conf rules (before the trust rules initdb wrote) and reloads.
async fn require_password(pg: &Postgres, client: &tokio_postgres::Client, role: &str) {
    let hba = pg.data_dir().join("pg_hba.conf");
    let old = std::fs::read_to_string(&hba).unwrap();
    let rules = format!(
        "host all {role} 127.0.0.1/32 scram-sha-256\nhost replication {role} 127.0.0.1/32 scram-sha-256\n"
    );
    std::fs::write(&hba, rules + &old).unwrap();
    client
        .batch_execute("SELECT pg_reload_conf()")
        .await
        .unwrap();
    // The reload is asynchronous: wait until a password-less login is refused.
    let url = pg.url_for(role, None, "postgres");
    wait_until(Duration::from_secs(10), || {
        let url = url.clone();
        async move {
            tokio_postgres::connect(&url, tokio_postgres::NoTls)
                .await
                .is_err()
        }
    })
    .await
    .expect("pg_hba.conf reloaded");
}

fn nats_url(nats: &Nats) -> String {
    nats.url()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_misconfiguration_is_one_clear_error_and_a_non_zero_exit() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    // Roles: one without REPLICATION, one with a password (scram).
    client
        .batch_execute(&format!(
            "CREATE ROLE norep LOGIN;
             GRANT USAGE ON SCHEMA walcast TO norep;
             GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.checkpoints, walcast.tenant_seqs, walcast.catchup_segments, walcast.foreign_messages TO norep;
             GRANT SELECT ON public.tasks, public.projects, public.editing_locks TO norep;
             CREATE ROLE pwuser LOGIN REPLICATION PASSWORD '{RIGHT_PASSWORD}';
             GRANT USAGE ON SCHEMA walcast TO pwuser;
             GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.checkpoints, walcast.tenant_seqs, walcast.catchup_segments, walcast.foreign_messages TO pwuser;
             GRANT SELECT ON public.tasks, public.projects, public.editing_locks TO pwuser;"
        ))
        .await
        .unwrap();
    client
        .batch_execute("SELECT pg_create_logical_replication_slot('other_plugin', 'test_decoding')")
        .await
        .unwrap();
    require_password(&env.pg, &client, "pwuser").await;
    // Other servers: Postgres with wal_level=replica, NATS without JetStream.
    let replica = Postgres::start_with(&[("wal_level", "replica")]).unwrap();
    let no_js = Nats::start_with(NatsOptions {
        jetstream: false,
        ..NatsOptions::default()
    })
    .unwrap();
    // A stream that does not take walcast's subjects.
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    js.create_stream(jetstream::stream::Config {
        name: "OTHER".into(),
        subjects: vec!["other.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let dir = TempDir::new("misconfig").unwrap();
    let toml = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };

    // The good setup: the least-privilege role from `walcast migrate`, with a
    // password, and everything else default.
    let good_url = env.pg.url_for("pwuser", Some(RIGHT_PASSWORD), "postgres");
    let good: Vec<(String, String)> = vec![
        ("WALCAST_DATABASE_URL".into(), good_url.clone()),
        ("WALCAST_NATS_URL".into(), env.nats.url()),
        (
            "WALCAST_HTTP_ADDR".into(),
            format!("127.0.0.1:{}", free_port()),
        ),
        ("WALCAST_STARTUP_TIMEOUT".into(), "2s".into()),
    ];
    let set = |name: &str, value: &str| with_var(&good, name, value);
    let url = |user: &str, password: Option<&str>| env.pg.url_for(user, password, "postgres");
    let bad_toml = toml(
        "bad.toml",
        "database_url = \"postgres://x@127.0.0.1/db\"\nslot = [unclosed\n",
    );
    let unknown_key = toml(
        "unknown.toml",
        "database_url = \"postgres://x@127.0.0.1/db\"\nslott = \"typo\"\n",
    );
    let url_file = toml(
        "database-url",
        &env.pg
            .url_for("pwuser", Some(RIGHT_PASSWORD), "nodb_from_file"),
    );
    let s = |v: &'static [&'static str]| Some(v);
    let cases = vec![
        Case {
            name: "wal_level=replica",
            env: set("WALCAST_DATABASE_URL", &replica.url()),
            args: vec![],
            run_says: &["wal_level is replica", "logical"],
            check_says: s(&["wal_level is replica"]),
        },
        Case {
            name: "missing publication",
            env: set("WALCAST_PUBLICATION", "nope"),
            args: vec![],
            run_says: &["publication nope does not exist"],
            check_says: s(&["publication nope does not exist"]),
        },
        Case {
            name: "role without REPLICATION, slot not created yet",
            env: with_var(
                &set("WALCAST_DATABASE_URL", &url("norep", None)),
                "WALCAST_SLOT",
                "not_yet",
            ),
            args: vec![],
            run_says: &["not_yet", "REPLICATION", "ALTER ROLE"],
            check_says: s(&["norep lacks REPLICATION"]),
        },
        Case {
            name: "slot of another plugin",
            env: set("WALCAST_SLOT", "other_plugin"),
            args: vec![],
            run_says: &["other_plugin", "test_decoding", "pgoutput"],
            check_says: s(&["other_plugin", "test_decoding"]),
        },
        Case {
            name: "role without REPLICATION",
            env: set("WALCAST_DATABASE_URL", &url("norep", None)),
            args: vec![],
            run_says: &["replication"],
            check_says: s(&["norep lacks REPLICATION"]),
        },
        Case {
            name: "wrong password",
            env: set("WALCAST_DATABASE_URL", &url("pwuser", Some(WRONG_PASSWORD))),
            args: vec![],
            run_says: &["password authentication failed", "pwuser"],
            check_says: s(&["password authentication failed"]),
        },
        Case {
            name: "unreachable Postgres",
            env: set(
                "WALCAST_DATABASE_URL",
                &format!(
                    "postgres://walcast:{UNREACHABLE_PASSWORD}@127.0.0.1:{}/app",
                    free_port()
                ),
            ),
            args: vec![],
            run_says: &["cannot connect to Postgres"],
            check_says: s(&["cannot connect to Postgres"]),
        },
        Case {
            name: "unreachable NATS",
            env: set(
                "WALCAST_NATS_URL",
                &format!("nats://127.0.0.1:{}", free_port()),
            ),
            args: vec![],
            run_says: &["NATS"],
            check_says: s(&["NATS unreachable"]),
        },
        Case {
            name: "NATS without JetStream",
            env: set("WALCAST_NATS_URL", &nats_url(&no_js)),
            args: vec![],
            run_says: &["JetStream"],
            check_says: s(&["JetStream is not available"]),
        },
        Case {
            name: "stream with incompatible subjects",
            env: set("WALCAST_STREAM", "OTHER"),
            args: vec![],
            run_says: &["stream OTHER", "other.>", "walcast.>"],
            check_says: s(&["stream OTHER", "walcast.>"]),
        },
        Case {
            name: "invalid TOML",
            env: good.clone(),
            args: vec!["--config".into(), bad_toml.clone()],
            run_says: &["bad.toml"],
            check_says: None,
        },
        Case {
            name: "unknown key",
            env: good.clone(),
            args: vec!["--config".into(), unknown_key.clone()],
            run_says: &["slott"],
            check_says: None,
        },
        Case {
            name: "bad database URL",
            env: set("WALCAST_DATABASE_URL", "mysql://root@db/app"),
            args: vec![],
            run_says: &["postgres://"],
            // Rejected while reading the settings, before any check runs.
            check_says: None,
        },
        Case {
            name: "bad NATS URL",
            env: set("WALCAST_NATS_URL", "nats://127.0.0.1:not-a-port"),
            args: vec![],
            run_says: &["NATS", "not-a-port"],
            check_says: s(&["NATS"]),
        },
        Case {
            name: "a database URL file flag wins over the URL from the environment",
            env: good.clone(),
            args: vec!["--database-url-file".into(), url_file.clone()],
            run_says: &["nodb_from_file"],
            check_says: s(&["nodb_from_file"]),
        },
        Case {
            name: "max in flight past the semaphore limit",
            env: good.clone(),
            args: vec!["--max-in-flight".into(), "2305843009213693000".into()],
            run_says: &["max_in_flight", "out of range", "1048576"],
            check_says: None,
        },
        Case {
            name: "max in flight u64::MAX",
            env: set("WALCAST_MAX_IN_FLIGHT", "18446744073709551615"),
            args: vec![],
            run_says: &["max_in_flight", "out of range"],
            check_says: None,
        },
        Case {
            name: "confirm delay past Instant",
            env: good.clone(),
            args: vec!["--confirm-delay".into(), "18446744073709551615s".into()],
            run_says: &["confirm_delay"],
            check_says: None,
        },
        Case {
            name: "stream max age of 300 years",
            env: set("WALCAST_STREAM_MAX_AGE", "300y"),
            args: vec![],
            run_says: &["stream_max_age", "out of range"],
            check_says: None,
        },
        Case {
            name: "database does not exist",
            env: set(
                "WALCAST_DATABASE_URL",
                &env.pg.url_for("pwuser", Some(RIGHT_PASSWORD), "nodb"),
            ),
            args: vec![],
            run_says: &["nodb", "does not exist"],
            check_says: s(&["nodb"]),
        },
    ];

    // Run every case (run and check) concurrently; each is bounded.
    // Concurrent runs: each its own metrics address (listeners held until all
    // are picked, so no two cases get the same port).
    let listeners: Vec<std::net::TcpListener> = cases
        .iter()
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addrs: Vec<String> = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    drop(listeners);
    let results: Vec<(Outcome, Outcome)> = std::thread::scope(|scope| {
        let handles: Vec<_> = cases
            .iter()
            .zip(&addrs)
            .map(|(c, addr)| {
                scope.spawn(move || {
                    let env = with_var(&c.env, "WALCAST_HTTP_ADDR", addr);
                    let mut run: Vec<&str> = vec!["run"];
                    run.extend(c.args.iter().map(String::as_str));
                    let mut check: Vec<&str> = vec!["check"];
                    check.extend(c.args.iter().map(String::as_str));
                    (
                        run_bounded(&run, &env, BOUND),
                        run_bounded(&check, &env, BOUND),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut failures = Vec::new();
    for (case, (run, check)) in cases.iter().zip(&results) {
        eprintln!(
            "[{}] run: exit {:?} in {:?}: {}\n[{}] check: exit {:?}: {}",
            case.name,
            run.code,
            run.elapsed,
            run.last_line(),
            case.name,
            check.code,
            check
                .stdout
                .lines()
                .filter(|l| l.starts_with('✗'))
                .collect::<Vec<_>>()
                .join(" | ")
        );
        let outcome = std::panic::catch_unwind(|| {
            assert_one_error_line(case.name, "run", run, case.run_says);
            match case.check_says {
                Some(says) => assert_check_fails(case.name, check, says),
                None => assert_one_error_line(case.name, "check", check, case.run_says),
            }
        });
        if let Err(e) = outcome {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| format!("[{}] failed", case.name)),
            );
        }
    }
    assert!(
        failures.is_empty(),
        "{} case(s) failed:\n{}",
        failures.len(),
        failures.join("\n\n")
    );

    // The good setup: `walcast check` prints only ✓ and i lines and exits 0.
    let out = run_bounded(&["check"], &good, BOUND);
    assert_eq!(out.code, Some(0), "{}{}", out.stdout, out.stderr);
    for line in out.stdout.lines() {
        assert!(
            line.starts_with("✓ ") || line.starts_with("i "),
            "good setup, unexpected line: {line:?}\n{}",
            out.stdout
        );
    }
    assert!(!out.stdout.contains(RIGHT_PASSWORD) && !out.stderr.contains(RIGHT_PASSWORD));
    assert!(
        out.stdout.lines().filter(|l| l.starts_with("✓ ")).count() >= 10,
        "{}",
        out.stdout
    );
    drop(replica);
    drop(no_js);
}

/// A slot held by another process (here pg_recvlogical; the same goes for a
/// second walcast): walcast does not exit — it waits as a standby, logging a
/// WARN that names the busy slot on every retry — and takes over, without
/// losing anything, once the slot is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_held_by_another_process_is_waited_for() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let pg_bin =
        std::env::var("WALCAST_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into());
    let mut holder: Child = Command::new(format!("{pg_bin}/pg_recvlogical"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &env.pg.port().to_string(),
            "-U",
            "postgres",
            "-d",
            "postgres",
        ])
        .args([
            "-S",
            "walcast",
            "--start",
            "-f",
            "/dev/null",
            "-o",
            "proto_version=1",
            "-o",
            "publication_names=walcast",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn pg_recvlogical");
    wait_until(Duration::from_secs(10), || async {
        client
            .query_one(
                "SELECT active FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .map(|r| r.get::<_, bool>(0))
            .unwrap_or(false)
    })
    .await
    .expect("pg_recvlogical holds the slot");
    let dir = TempDir::new("busy").unwrap();
    let (mut walcast, _addr) = start_walcast(
        &env,
        dir.path(),
        "standby",
        &[("WALCAST_STARTUP_TIMEOUT", "2s")],
    );
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'while busy')")
        .await
        .unwrap();
    // Well past the startup timeout: still running, retrying, naming the slot.
    tokio::time::sleep(Duration::from_secs(8)).await;
    assert!(
        walcast.exited().is_none(),
        "walcast exited:\n{}",
        walcast.log_tail(20)
    );
    let busy: Vec<String> = walcast
        .warn_lines()
        .into_iter()
        .filter(|l| l.contains("replication slot \"walcast\" is active for PID"))
        .collect();
    assert!(
        busy.len() >= 2,
        "WARNs naming the busy slot, on each retry:\n{}",
        walcast.log_tail(20)
    );
    assert!(busy.iter().all(|l| l.contains("standby")), "{busy:?}");
    let _ = holder.kill();
    let _ = holder.wait();
    if let Err(e) = catch_up(&client, Duration::from_secs(60)).await {
        panic!(
            "the standby did not take over: {e}\n{}",
            walcast.log_tail(20)
        );
    }
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    assert_eq!(events.len(), 1, "the change made while the slot was busy");
    walcast.stop(Duration::from_secs(15)).await;
}

async fn slot_exists(client: &tokio_postgres::Client) -> bool {
    client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .unwrap()
        .is_some()
}

/// A dropped slot: walcast stops with an error that says changes may be
/// missing and points at the recovery procedure, and does not recreate the
/// slot; following README's "Lost replication slot" procedure brings it back
/// (seqs restart at 1 on a purged stream).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_slot_stops_walcast_with_the_recovery_procedure() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("lost-slot").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "first", &[]);
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'one')")
        .await
        .unwrap();
    catch_up(&client, Duration::from_secs(60)).await.unwrap();
    walcast.stop(Duration::from_secs(15)).await;

    client
        .batch_execute(
            "SELECT pg_drop_replication_slot('walcast');
             INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000002', 'acme', 'lost');",
        )
        .await
        .unwrap();
    let env_vars = with_var(&env.env_vars(), "WALCAST_STARTUP_TIMEOUT", "2s");
    let out = run_bounded(&["run"], &env_vars, BOUND);
    assert_one_error_line(
        "dropped slot",
        "run",
        &out,
        &[
            "replication slot walcast is gone",
            "may be missing",
            // The whole procedure, as README and `walcast check` give it.
            &walcast::source::slot::recovery("walcast", false),
        ],
    );
    assert!(
        !slot_exists(&client).await,
        "walcast must not recreate the slot"
    );

    // README: re-sync consumers, delete the checkpoint and the tenant seqs,
    // use a new stream or purge the old one, start walcast.
    client
        .batch_execute(
            "DELETE FROM walcast.checkpoints WHERE slot = 'walcast';
             DELETE FROM walcast.tenant_seqs WHERE slot = 'walcast';",
        )
        .await
        .unwrap();
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    js.get_stream("WALCAST")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "recovered", &[]);
    wait_until(Duration::from_secs(30), || slot_exists(&client))
        .await
        .expect("slot recreated");
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000003', 'acme', 'after recovery')")
        .await
        .unwrap();
    catch_up(&client, Duration::from_secs(60)).await.unwrap();
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let tail: Vec<(u64, String)> = events
        .iter()
        .map(|m| (m.event.seq, m.event.entity_id.clone()))
        .collect();
    assert_eq!(
        tail,
        vec![(1, "00000000-0000-4000-8000-000000000003".to_string())],
        "after recovery seqs restart at 1 on the purged stream"
    );
    walcast.stop(Duration::from_secs(15)).await;
}

/// The good environment with a partial publication and the role `pwuser`
/// is overkill here: the superuser URL is enough.
async fn env_vars_with(env: &Env, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = with_var(&env.env_vars(), "WALCAST_STARTUP_TIMEOUT", "2s");
    for (k, v) in extra {
        vars = with_var(&vars, k, v);
    }
    vars
}

/// A publication that lacks one of the source tables (pgoutput would
/// silently send nothing for it): `walcast check` flags it, and `walcast run`
/// stops with one error line naming the missing table and the ALTER
/// PUBLICATION fix, and a non-zero exit (regression: it used to stream the
/// other two tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publication_missing_a_table_is_one_clear_error() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    client
        .batch_execute("CREATE PUBLICATION partial FOR TABLE public.tasks, public.projects")
        .await
        .unwrap();
    let vars = env_vars_with(&env, &[("WALCAST_PUBLICATION", "partial")]).await;
    let check = run_bounded(&["check"], &vars, BOUND);
    assert_check_fails(
        "partial publication",
        &check,
        // The same violation and fix as `walcast run` gives (one text).
        &["publication partial does not cover public.editing_locks"],
    );
    let out = run_bounded(&["run"], &vars, Duration::from_secs(10));
    assert_one_error_line(
        "partial publication",
        "run",
        &out,
        &[
            "publication partial does not cover public.editing_locks",
            "ALTER PUBLICATION \"partial\" ADD TABLE \"public\".\"editing_locks\"",
        ],
    );
}

/// nats-server without JetStream answers the stream lookup with "no
/// responders" (async-nats: "requested JetStream resource does not exist"):
/// walcast must recognise it as "no JetStream" and stop at once — not retry
/// it for the whole startup timeout (30 s by default) — saying "start
/// nats-server with -js" (SPEC §4.6).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_without_jetstream_error_says_what_to_fix() {
    let env = Env::start().await;
    let no_js = Nats::start_with(NatsOptions {
        jetstream: false,
        ..NatsOptions::default()
    })
    .unwrap();
    // The default startup timeout: a definite error must not wait it out.
    let mut vars = with_var(&env.env_vars(), "WALCAST_NATS_URL", &no_js.url());
    vars.retain(|(k, _)| k != "WALCAST_STARTUP_TIMEOUT");
    let out = run_bounded(&["run"], &vars, Duration::from_secs(20));
    assert_one_error_line("no JetStream", "run", &out, &["JetStream", "-js"]);
    assert!(
        out.elapsed < Duration::from_secs(10),
        "took {:?}",
        out.elapsed
    );
}

/// NATS down at startup: walcast waits for it at most the startup timeout,
/// then says the server (by its address) is unreachable — not, after a 10 s
/// JetStream request, "look up stream: request error: timed out".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_nats_error_names_the_server() {
    let env = Env::start().await;
    let port = free_port();
    let vars = env_vars_with(
        &env,
        &[("WALCAST_NATS_URL", &format!("nats://127.0.0.1:{port}"))],
    )
    .await;
    let out = run_bounded(&["run"], &vars, Duration::from_secs(30));
    assert_one_error_line("unreachable NATS", "run", &out, &[&port.to_string()]);
    let last = out.last_line().to_lowercase();
    assert!(
        last.contains("unreachable")
            || last.contains("cannot connect")
            || last.contains("connection refused"),
        "{last}"
    );
    assert!(
        out.elapsed < Duration::from_secs(8),
        "took {:?} with a 2 s startup timeout",
        out.elapsed
    );
}

/// After the slot was dropped, walcast has a checkpoint for a slot that no
/// longer exists and `walcast run` refuses to start: `walcast check` must
/// say so with a ✗ line (changes may be missing) and the README recovery
/// procedure as the fix — not "✓ slot walcast does not exist yet".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_fails_on_a_dropped_slot_that_has_a_checkpoint() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("lost-slot-check").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "first", &[]);
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'one')")
        .await
        .unwrap();
    catch_up(&client, Duration::from_secs(60)).await.unwrap();
    walcast.stop(Duration::from_secs(15)).await;
    client
        .batch_execute("SELECT pg_drop_replication_slot('walcast')")
        .await
        .unwrap();
    let vars = env_vars_with(&env, &[]).await;
    let out = run_bounded(&["check"], &vars, BOUND);
    assert_check_fails("dropped slot", &out, &["slot walcast", "missing"]);
}

/// A slot invalidated by `max_slot_wal_keep_size` while walcast was down:
/// walcast must stop with an error that says changes may be missing and
/// points at the recovery procedure (README "Lost replication slot"), not
/// retry forever nor recreate the slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidated_slot_stops_walcast_with_the_recovery_procedure() {
    crate::support::daemon::init_logging();
    let pg = Postgres::start_with(&[
        ("max_slot_wal_keep_size", "1MB"),
        ("max_wal_size", "32MB"),
        ("min_wal_size", "32MB"),
    ])
    .unwrap();
    let nats = Nats::start().unwrap();
    let env = Env { pg, nats };
    walcast::migrate::run(&env.settings()).await.unwrap();
    let client = env.pg.client().await;
    let dir = TempDir::new("invalidated").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "first", &[]);
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000001', 'acme', 'one')")
        .await
        .unwrap();
    catch_up(&client, Duration::from_secs(60)).await.unwrap();
    walcast.stop(Duration::from_secs(15)).await;
    // WAL beyond the keep size, then checkpoints: the slot is invalidated.
    client
        .batch_execute("INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-000000000002', 'acme', 'lost')")
        .await
        .unwrap();
    for _ in 0..4 {
        client
            .batch_execute("CREATE TABLE IF NOT EXISTS filler (x text); INSERT INTO filler SELECT repeat(md5(i::text), 10) FROM generate_series(1, 20000) i; SELECT pg_switch_wal(); CHECKPOINT;")
            .await
            .unwrap();
    }
    let status: Option<String> = client
        .query_one(
            "SELECT wal_status FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        status.as_deref(),
        Some("lost"),
        "the test invalidates the slot"
    );
    let vars = env_vars_with(&env, &[]).await;
    let check = run_bounded(&["check"], &vars, BOUND);
    assert_check_fails("invalidated slot", &check, &["invalidated"]);
    let out = run_bounded(&["run"], &vars, BOUND);
    assert_one_error_line(
        "invalidated slot",
        "run",
        &out,
        &[
            "walcast",
            "may be missing",
            &walcast::source::slot::recovery("walcast", true),
        ],
    );
}
