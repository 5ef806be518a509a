//! SPEC §5: metrics, health, readiness, secrets, configuration errors.

use std::process::Command;
use std::time::Duration;

use crate::support::daemon::{Daemon, Env};
use crate::support::edge::{http_get as get, metric, scrape};
use crate::support::workload::Workload;
use crate::support::{free_port, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_readiness() {
    let env = Env::start().await;
    let addr = format!("127.0.0.1:{}", free_port());
    let mut options = env.options();
    options.http_addr = Some(addr.clone());
    let daemon = Daemon::start(options.resolve().unwrap());
    let mut client = env.pg.client().await;
    client
        .batch_execute(
            "INSERT INTO tasks (id, tenant_id, title) VALUES ('a0000000-0000-4000-8000-000000000001', 'acme', 'one');
             UPDATE tasks SET status = 'done' WHERE tenant_id = 'acme';
             INSERT INTO tasks (id, tenant_id, title) VALUES ('a0000000-0000-4000-8000-000000000002', 'bad.tenant', 'x');",
        )
        .await
        .unwrap();
    Workload::new(Workload::seed(), 2)
        .run(&mut client, 50)
        .await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;

    let (status, body) = get(&addr, "/healthz").await.expect("healthz answers");
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    wait_until(Duration::from_secs(10), || async {
        get(&addr, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await
    .expect("ready while replicating");
    let (_, body) = get(&addr, "/metrics").await.unwrap();
    let completed = metric(
        &body,
        r#"walcast_events_published_total{entity="task",action="completed"}"#,
    );
    assert!(completed >= Some(1.0), "completed counter in:\n{body}");
    assert!(
        metric(
            &body,
            r#"walcast_events_published_total{entity="task",action="created"}"#
        ) >= Some(2.0)
    );
    // At least: the registry is the test process's, shared with the
    // daemons of tests running beside this one. The exact count is checked
    // on a walcast of its own (data_edges::invalid_tenant_ids_go_to_the_dead_letter_subject).
    assert!(metric(&body, "walcast_dead_letters_total") >= Some(1.0));
    assert!(metric(&body, "walcast_event_bytes_total") > Some(100.0));
    assert!(
        metric(&body, "walcast_publish_ack_seconds_count") >= Some(3.0),
        "{body}"
    );
    assert!(body.contains("walcast_replication_lag_seconds"));
    assert_eq!(metric(&body, "walcast_up"), Some(1.0));
    assert!(!body.contains("tenant="), "no tenant label");
    assert!(
        body.contains("walcast_last_checkpoint_timestamp_seconds"),
        "{body}"
    );

    // NATS goes away: not ready; back: ready again.
    env.nats.stop().unwrap();
    wait_until(Duration::from_secs(20), || async {
        get(&addr, "/readyz").await.map(|r| r.0) == Some(503)
    })
    .await
    .expect("not ready without NATS");
    assert_eq!(
        get(&addr, "/healthz").await.map(|r| r.0),
        Some(200),
        "still alive"
    );
    env.nats.start_again().unwrap();
    wait_until(Duration::from_secs(60), || async {
        get(&addr, "/readyz").await.map(|r| r.0) == Some(200)
    })
    .await
    .expect("ready again after NATS returns");
    daemon.stop().await.unwrap();
}

/// The replication reader pauses while it is behind, so the walsender's
/// writes batch (vendor/README.md); a reader that keeps up never pauses.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_read_with_pauses_and_a_live_trickle_without() {
    let env = Env::start().await;
    // walcast in its own process: the metric is process-wide, and the
    // daemons of tests running beside this one share the test binary's.
    let dir = crate::support::TempDir::new("read-pacing").unwrap();
    let (mut walcast, addr) = crate::support::edge::start_walcast(&env, dir.path(), "walcast", &[]);
    let client = env.pg.client().await;
    let pauses = || async {
        scrape(&addr, "walcast_source_read_pauses_total")
            .await
            .unwrap_or(0.0)
    };

    // Live: each change is read before the next one is written. The first
    // one also carries the count of whatever the start read (it is copied
    // to the metric at commits); the next 20 must not move it.
    let insert_one = || {
        client.execute(
            "INSERT INTO tasks (id, tenant_id, title) VALUES (gen_random_uuid(), 'acme', 'live')",
            &[],
        )
    };
    insert_one().await.unwrap();
    env.wait_for_messages(1, Duration::from_secs(30)).await;
    let at_start = pauses().await;
    for written in 2..=21 {
        insert_one().await.unwrap();
        env.wait_for_messages(written, Duration::from_secs(30))
            .await;
    }
    assert_eq!(pauses().await, at_start, "a reader that keeps up paused");

    // 20,000 rows in one transaction: the walsender sends them faster than
    // walcast publishes them.
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title)
             SELECT gen_random_uuid(), 'acme', 'row ' || i FROM generate_series(1, 20000) i",
            &[],
        )
        .await
        .unwrap();
    env.wait_for_messages(21 + 20_000, Duration::from_secs(120))
        .await;
    // The count is copied to the metric at commits.
    wait_until(Duration::from_secs(10), || async {
        pauses().await > at_start
    })
    .await
    .expect("the backlog was read with pauses");
    walcast.stop(Duration::from_secs(20)).await;
}

fn walcast(args: &[&str], env: &[(&str, &str)]) -> (i32, String) {
    let out = Command::new(crate::support::walcast_bin())
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .output()
        .expect("run walcast");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_name_the_problem_and_exit_non_zero() {
    let dir = crate::support::TempDir::new("walcast-config").unwrap();
    let file = dir.path().join("walcast.toml");
    std::fs::write(
        &file,
        "database_url = \"postgres://u@127.0.0.1:1/db\"\nslott = \"typo\"\n",
    )
    .unwrap();
    let (code, err) = walcast(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(
        err.contains("slott") && err.lines().count() == 1,
        "one line naming the key: {err}"
    );

    std::fs::write(
        &file,
        "database_url = \"postgres://u@127.0.0.1:1/db\"\nconfirm_delay = \"soon\"\n",
    )
    .unwrap();
    let (code, err) = walcast(&["run", "--config", file.to_str().unwrap()], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("confirm_delay"), "{err}");

    let (code, err) = walcast(&["run"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("WALCAST_DATABASE_URL"), "{err}");

    let (code, err) = walcast(&["run", "--database-url", "mysql://x"], &[]);
    assert_ne!(code, 0);
    assert!(err.contains("postgres://"), "{err}");
}

/// Flags beat the environment, which beats the file; the secret never shows.
#[test]
fn precedence_and_secrets() {
    let dir = crate::support::TempDir::new("walcast-config").unwrap();
    let file = dir.path().join("walcast.toml");
    // A database nobody listens on: walcast must fail, and say so without the password.
    let port = free_port();
    let url = format!("postgres://walcast:s3cr3t-pa55@127.0.0.1:{port}/db");
    std::fs::write(
        &file,
        format!("database_url = \"{url}\"\nslot = \"from_file\"\nsubject_prefix = \"a.b\"\n"),
    )
    .unwrap();
    // subject_prefix from the file is invalid, but the env overrides it; the flag overrides the env's.
    let (code, err) = walcast(
        &[
            "run",
            "--config",
            file.to_str().unwrap(),
            "--subject-prefix",
            "from-flag!",
        ],
        &[("WALCAST_SUBJECT_PREFIX", "fromenv")],
    );
    assert_ne!(code, 0);
    assert!(err.contains("from-flag!"), "the flag wins: {err}");
    let (code, err) = walcast(
        &["run", "--config", file.to_str().unwrap()],
        &[
            ("WALCAST_SUBJECT_PREFIX", "fromenv"),
            ("WALCAST_HTTP_ADDR", &format!("127.0.0.1:{}", free_port())),
            ("WALCAST_STARTUP_TIMEOUT", "1s"),
        ],
    );
    assert_ne!(code, 0, "no database: exits non-zero");
    assert!(!err.contains("s3cr3t-pa55"), "password leaked: {err}");
    assert!(
        err.contains("walcast:***@127.0.0.1") || err.contains("Postgres"),
        "{err}"
    );
}
