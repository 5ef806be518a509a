//! Generated columns on PostgreSQL 18 (SPEC §1, issue 19): with REPLICA
//! IDENTITY FULL, Postgres refuses every UPDATE and DELETE on a table with
//! a generated column its publication does not publish. `walcast migrate`
//! makes the publication publish stored generated columns, so adding one
//! mid-workload leaves the application's writes working, the stream exact,
//! and the generated values in the events' `extra`; `walcast check` (and
//! the startup log) name every state that would break the writes, with SQL
//! that really fixes it. These tests need the version matrix's PostgreSQL
//! 18 (`WALCAST_MATRIX_PG_BIN`) and say SKIPPED without it.

use std::time::Duration;

use tokio_postgres::Client;
use walcast::proto::Entity;
use walcast::proto::change_event::After;

use crate::support::TempDir;
use crate::support::chaos::{Load, catch_up, verify};
use crate::support::daemon::{Env, read_stream};
use crate::support::edge::{run_bounded, start_walcast};
use crate::support::oracle::Oracle;
use crate::support::postgres::Postgres;

async fn pubgencols(client: &Client) -> String {
    client
        .query_one(
            "SELECT pubgencols::text FROM pg_publication WHERE pubname = 'walcast'",
            &[],
        )
        .await
        .unwrap()
        .get(0)
}

async fn wal_lsn(client: &Client) -> u64 {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    walcast::lsn::Lsn::parse(&text).unwrap().0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stored_generated_column_added_mid_workload_keeps_writes_and_stream_exact() {
    let Some(pg) = Postgres::start_matrix(&[]) else {
        return;
    };
    let env = Env::start_on(pg, Default::default()).await;
    let client = env.pg.client().await;
    assert_eq!(
        pubgencols(&client).await,
        "s",
        "migrate publishes generated columns"
    );
    let again = walcast::migrate::run(&env.settings()).await.unwrap();
    assert!(!again.generated_columns_published, "migrate is idempotent");

    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("generated").unwrap();
    let (walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    // The load panics on any failed statement: its UPDATEs and DELETEs on
    // tasks keep working after the DDL or the test fails.
    let load = Load::start(&env, 5, Duration::from_millis(2)).await;
    load.wait_transactions(40, Duration::from_secs(60)).await;
    let before = wal_lsn(&client).await;
    client
        .batch_execute(
            "ALTER TABLE tasks ADD COLUMN title_chars int GENERATED ALWAYS AS (char_length(title)) STORED",
        )
        .await
        .unwrap();
    let added = wal_lsn(&client).await;
    load.wait_transactions(80, Duration::from_secs(60)).await;
    // And explicitly: an UPDATE and a DELETE of a task after the DDL.
    let updated = client
        .execute(
            "UPDATE tasks SET title = 'renamed by the test' WHERE id = (SELECT id FROM tasks LIMIT 1)",
            &[],
        )
        .await
        .expect("UPDATE on tasks with a stored generated column");
    assert_eq!(updated, 1);
    let deleted = client
        .execute(
            "DELETE FROM tasks WHERE id = (SELECT id FROM tasks WHERE title <> 'renamed by the test' LIMIT 1)",
            &[],
        )
        .await
        .expect("DELETE on tasks with a stored generated column");
    assert_eq!(deleted, 1);
    let stats = load.stop().await;
    assert!(stats.committed_txs > 100, "{stats:?}");
    if let Err(e) = catch_up(&client, Duration::from_secs(120)).await {
        panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40));
    }
    verify("stored generated column", &env, &client, &oracle).await;

    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let mut with_value = 0;
    for m in events.iter().filter(|m| m.event.entity() == Entity::Task) {
        let value = m.event.extra.get("title_chars");
        // Only what committed before the DDL began surely lacks the column,
        // only what committed after its position was read surely has it.
        if m.event.commit_lsn < before {
            assert!(value.is_none(), "{}: no column yet", m.event.event_id);
            continue;
        }
        if m.event.commit_lsn <= added {
            continue;
        }
        let Some(After::Task(task)) = &m.event.after else {
            continue;
        };
        let want = task.title.chars().count().to_string();
        assert_eq!(
            value,
            Some(&want),
            "{}: the generated value is in extra",
            m.event.event_id
        );
        with_value += 1;
    }
    assert!(
        with_value > 20,
        "only {with_value} task events after the DDL"
    );
    assert!(
        events.iter().any(|m| m.event.entity_id.len() == 36
            && matches!(&m.event.after, Some(After::Task(t)) if t.title == "renamed by the test")
            && m.event.extra.get("title_chars").map(String::as_str) == Some("19")),
        "the explicit UPDATE's event carries the generated value"
    );
}

/// `walcast check` on `env`: (exit code, stdout + stderr).
fn check(env: &Env) -> (Option<i32>, String) {
    let out = run_bounded(&["check"], &env.env_vars(), Duration::from_secs(60));
    (out.code, format!("{}{}", out.stdout, out.stderr))
}

/// The `fix:` line printed under the first ✗ line containing `needle`.
fn fix_for(report: &str, needle: &str) -> String {
    let mut lines = report
        .lines()
        .skip_while(|l| !(l.starts_with('✗') && l.contains(needle)));
    lines
        .next()
        .unwrap_or_else(|| panic!("no ✗ line with {needle:?}:\n{report}"));
    let fix = lines.next().unwrap_or_default().trim();
    fix.strip_prefix("fix: ")
        .unwrap_or_else(|| panic!("no fix under {needle:?}:\n{report}"))
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_names_states_that_break_the_applications_writes_with_a_working_fix() {
    let Some(pg) = Postgres::start_matrix(&[]) else {
        return;
    };
    let env = Env::start_on(pg, Default::default()).await;
    let client = env.pg.client().await;
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "a migrated database passes:\n{report}");
    assert!(
        report.contains("let the application's UPDATE and DELETE through"),
        "{report}"
    );

    // The broken states: an unpublished stored generated column on tasks and
    // a virtual one on projects, both REPLICA IDENTITY FULL.
    client
        .batch_execute(
            "ALTER PUBLICATION walcast SET (publish_generated_columns = none);
             INSERT INTO projects (id, tenant_id, name) VALUES (gen_random_uuid(), 'acme', 'p');
             INSERT INTO tasks (id, tenant_id, title) VALUES (gen_random_uuid(), 'acme', 't');
             ALTER TABLE tasks ADD COLUMN title_chars int GENERATED ALWAYS AS (char_length(title)) STORED;
             ALTER TABLE projects ADD COLUMN name_upper text GENERATED ALWAYS AS (upper(name)) VIRTUAL;",
        )
        .await
        .unwrap();
    // Postgres really refuses the application's writes.
    for sql in ["UPDATE tasks SET title = 'x'", "DELETE FROM projects"] {
        let e = client.execute(sql, &[]).await.unwrap_err();
        let detail = e.as_db_error().and_then(|d| d.detail()).unwrap_or_default();
        assert!(
            detail.contains("Replica identity must not contain unpublished generated columns"),
            "{sql}: {e:?}"
        );
    }
    let (code, report) = check(&env);
    assert_ne!(code, Some(0), "check fails:\n{report}");
    let stored_fix = fix_for(&report, "stored generated column(s) title_chars");
    assert!(
        stored_fix
            .starts_with("ALTER PUBLICATION \"walcast\" SET (publish_generated_columns = stored);"),
        "{stored_fix}"
    );
    let virtual_fix = fix_for(&report, "virtual generated column \"name_upper\"");
    assert!(virtual_fix.contains("STORED;"), "{virtual_fix}");

    // The startup log says the same, and the run goes on.
    let dir = TempDir::new("generated-check").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    walcast
        .wait_log(
            "Replica identity must not contain unpublished generated columns",
            Duration::from_secs(30),
        )
        .await;
    walcast
        .wait_log(
            "ALTER PUBLICATION \"walcast\" SET (publish_generated_columns = stored)",
            Duration::from_secs(5),
        )
        .await;
    assert!(walcast.exited().is_none(), "{}", walcast.log_tail(20));
    walcast.stop(Duration::from_secs(20)).await;

    // The printed fixes, run verbatim, let the writes through again.
    let sql = |fix: &str| fix.split(" (or run").next().unwrap().to_string();
    client.batch_execute(&sql(&stored_fix)).await.unwrap();
    let virtual_sql = virtual_fix
        .strip_prefix("make it stored (rewrites the table): ")
        .unwrap();
    client.batch_execute(virtual_sql).await.unwrap();
    client
        .execute("UPDATE tasks SET title = 'x'", &[])
        .await
        .expect("UPDATE after the fix");
    client
        .execute("DELETE FROM projects", &[])
        .await
        .expect("DELETE after the fix");
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "fixed:\n{report}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn before_postgres_18_generated_columns_block_no_write_and_are_not_in_events() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let version: i32 = client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .unwrap()
        .get(0);
    if version >= 180000 {
        eprintln!("SKIPPED: this test is about PostgreSQL < 18 (WALCAST_PG_BIN is {version})");
        return;
    }
    client
        .batch_execute(
            "ALTER TABLE tasks ADD COLUMN title_chars int GENERATED ALWAYS AS (char_length(title)) STORED;
             INSERT INTO tasks (id, tenant_id, title) VALUES (gen_random_uuid(), 'acme', 'seven!!');
             UPDATE tasks SET title = 'eight!!!';
             DELETE FROM tasks;",
        )
        .await
        .expect("PostgreSQL < 18 never refuses writes for a generated column");
    let (code, report) = check(&env);
    assert_eq!(code, Some(0), "{report}");
    let note = format!(
        "i \"public\".\"tasks\" has generated column(s) title_chars: Postgres {} does not publish generated columns",
        version / 10000
    );
    assert!(report.contains(&note), "{report}");

    let dir = TempDir::new("generated-pg15").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    env.wait_for_messages(3, Duration::from_secs(30)).await;
    walcast.stop(Duration::from_secs(20)).await;
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    assert_eq!(events.len(), 3);
    assert!(
        events
            .iter()
            .all(|m| !m.event.extra.contains_key("title_chars")),
        "Postgres < 18 does not send generated columns"
    );
}
