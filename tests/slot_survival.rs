//! What lets the slot outlive its server or a long walcast downtime
//! (issue 19): on PostgreSQL 17+ the slot (from `walcast migrate` or
//! `walcast run`) is a failover slot unless `slot_failover` is off, and
//! `walcast check` says so; a slot that
//! PostgreSQL 18 invalidated under `idle_replication_slot_timeout` stops
//! walcast with the lost-slot error naming the setting and the recovery.
//! PostgreSQL 18 comes from the version matrix (`WALCAST_MATRIX_PG_BIN`);
//! without it these tests say SKIPPED.

use std::time::Duration;

use walcast::config::Options;

use crate::support::chaos::catch_up;
use crate::support::daemon::{Daemon, Env};
use crate::support::edge::{run_bounded, start_walcast, uuid};
use crate::support::postgres::Postgres;
use crate::support::{TempDir, wait_until};

fn check(env: &Env) -> (Option<i32>, String) {
    let out = run_bounded(&["check"], &env.env_vars(), Duration::from_secs(60));
    (out.code, format!("{}{}", out.stdout, out.stderr))
}

async fn failover_flag(client: &tokio_postgres::Client, slot: &str) -> bool {
    client
        .query_one(
            "SELECT failover FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_slot_is_a_failover_slot_unless_turned_off() {
    let Some(pg) = Postgres::start_matrix(&[]) else {
        return;
    };
    let env = Env::start_on(pg, Default::default()).await;
    let client = env.pg.client().await;
    assert!(
        failover_flag(&client, "walcast").await,
        "migrate creates a failover slot"
    );
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "{report}");
    assert!(
        report.contains("✓ slot walcast is a failover slot"),
        "{report}"
    );
    assert!(
        report.contains("i no standby seen from this primary"),
        "{report}"
    );

    // `walcast run` creates a missing slot the same way.
    let by_run = Options {
        slot: Some("by_run".into()),
        ..env.options()
    }
    .resolve()
    .unwrap();
    let daemon = Daemon::start(by_run);
    wait_until(Duration::from_secs(30), || async {
        client
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'by_run' AND active",
                &[],
            )
            .await
            .map(|row| row.is_some())
            .unwrap_or(false)
    })
    .await
    .expect("walcast run creates and streams slot by_run");
    assert!(
        failover_flag(&client, "by_run").await,
        "run creates a failover slot"
    );
    daemon.stop().await.expect("clean stop");

    let plain = Options {
        slot: Some("plain".into()),
        slot_failover: Some(false),
        ..env.options()
    }
    .resolve()
    .unwrap();
    let report = walcast::migrate::run(&plain).await.unwrap();
    assert!(report.slot_created);
    assert!(
        !failover_flag(&client, "plain").await,
        "slot_failover = false"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_invalidated_for_idleness_stops_walcast_naming_the_setting() {
    let Some(pg) = Postgres::start_matrix(&[]) else {
        return;
    };
    let env = Env::start_on(pg, Default::default()).await;
    let client = env.pg.client().await;
    let dir = TempDir::new("idle-slot").unwrap();

    // walcast streams once, so it has a checkpoint, then stops cleanly.
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "first", &[]);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title) VALUES ($1::text::uuid, 'acme', 'before')",
            &[&uuid(1)],
        )
        .await
        .unwrap();
    env.wait_for_messages(1, Duration::from_secs(30)).await;
    catch_up(&client, Duration::from_secs(30)).await.unwrap();
    walcast.stop(Duration::from_secs(20)).await;

    for sql in [
        "ALTER SYSTEM SET idle_replication_slot_timeout = 1",
        "SELECT pg_reload_conf()",
    ] {
        client.batch_execute(sql).await.unwrap();
    }
    wait_until(Duration::from_secs(10), || async {
        let row = client
            .query_one(
                "SELECT current_setting('idle_replication_slot_timeout')",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, String>(0) == "1s"
    })
    .await
    .unwrap();
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "a warning does not fail check:\n{report}");
    assert!(
        report.contains("! idle_replication_slot_timeout is 1s")
            && report.contains("idle_replication_slot_timeout = 0"),
        "{report}"
    );

    // Idle for longer than the timeout; the next checkpoint invalidates it.
    wait_until(Duration::from_secs(30), || async {
        client
            .batch_execute("CHECKPOINT")
            .await
            .unwrap();
        let row = client
            .query_one(
                "SELECT coalesce(invalidation_reason, '') FROM pg_replication_slots WHERE slot_name = 'walcast'",
                &[],
            )
            .await
            .unwrap();
        row.get::<_, String>(0) == "idle_timeout"
    })
    .await
    .expect("the slot is invalidated for idleness");

    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "second", &[]);
    let status = walcast.wait(Duration::from_secs(60)).await;
    let log = walcast.log();
    assert_ne!(
        status.code(),
        Some(0),
        "a clear stop, not a clean exit:\n{log}"
    );
    assert!(status.code().is_some(), "exited, not killed:\n{log}");
    for needle in [
        "replication slot walcast was invalidated",
        "idle_timeout",
        "longer than idle_replication_slot_timeout",
        "Lost replication slot",
        "SELECT pg_drop_replication_slot('walcast');",
        "ALTER SYSTEM SET idle_replication_slot_timeout = 0",
    ] {
        assert!(log.contains(needle), "the stop names {needle:?}:\n{log}");
    }
    assert!(
        !log.contains("retrying"),
        "a lost slot is not retried:\n{log}"
    );
    let (code, report) = check(&env);
    assert_ne!(code, Some(0), "{report}");
    assert!(
        report.contains("✗ replication slot walcast was invalidated (wal_status is lost, invalidation_reason idle_timeout"),
        "{report}"
    );
}
