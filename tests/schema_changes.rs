//! Schema changes while streaming: DDL on the source tables while
//! a randomized multi-tenant load runs. The stream must stay exact — one to
//! one with an independent test_decoding log of committed changes, seqs
//! gap-free, and replaying it must rebuild the tables — and each change
//! must show up as README describes: new columns in `extra`, a dropped
//! column gone, type changes still typed (or kept as text), and after
//! REPLICA IDENTITY DEFAULT events continue without before-images and one
//! warning is logged.

use std::time::Duration;

use tokio_postgres::Client;
use walcast::proto::change_event::After;
use walcast::proto::{Action, Entity};

use crate::support::TempDir;
use crate::support::chaos::{Load, Walcast, catch_up, verify};
use crate::support::daemon::{Env, StreamEvent, read_stream};
use crate::support::edge::{start_walcast, uuid};
use crate::support::oracle::Oracle;

async fn wal_lsn(client: &Client) -> u64 {
    let text: String = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    walcast::lsn::Lsn::parse(&text).unwrap().0
}

/// Runs `ddl` between two stretches of load; returns the WAL position
/// right after it committed.
async fn ddl_under_load(client: &Client, load: &Load, ddl: &str) -> u64 {
    ddl_between(client, load, ddl).await.1
}

/// Like [`ddl_under_load`], also returning the WAL position just before the
/// DDL: only transactions committed before that cannot see its effect
/// (the load keeps committing while the DDL runs and its position is read).
async fn ddl_between(client: &Client, load: &Load, ddl: &str) -> (u64, u64) {
    load.wait_transactions(40, Duration::from_secs(60)).await;
    let before = wal_lsn(client).await;
    client
        .batch_execute(ddl)
        .await
        .unwrap_or_else(|e| panic!("{ddl}: {e}"));
    let at = wal_lsn(client).await;
    load.wait_transactions(40, Duration::from_secs(60)).await;
    (before, at)
}

fn after_lsn(events: &[StreamEvent], lsn: u64, entity: Entity) -> Vec<&StreamEvent> {
    events
        .iter()
        .filter(|m| m.event.commit_lsn > lsn && m.event.entity() == entity)
        .collect()
}

async fn caught_up(client: &Client, walcast: &Walcast) {
    if let Err(e) = catch_up(client, Duration::from_secs(120)).await {
        panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ddl_while_streaming_keeps_the_stream_exact() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("schema").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    let load = Load::start(&env, 5, Duration::from_millis(2)).await;

    // ADD COLUMN (with a default, so every later row has it).
    let (before_add, added) = ddl_between(
        &client,
        &load,
        "ALTER TABLE tasks ADD COLUMN mood text DEFAULT 'calm'",
    )
    .await;
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, mood) VALUES ($1::text::uuid, 'tenant-0', 'moody', 'happy')",
            &[&uuid(1)],
        )
        .await
        .unwrap();
    // DROP of a column nobody uses (added for the purpose).
    let scratch = ddl_under_load(
        &client,
        &load,
        "ALTER TABLE projects ADD COLUMN scratch int DEFAULT 7",
    )
    .await;
    let (before_drop, dropped) =
        ddl_between(&client, &load, "ALTER TABLE projects DROP COLUMN scratch").await;
    // Type changes: typed columns (timestamptz -> timestamp, text -> varchar)
    // and an unknown one (text -> integer, a table rewrite).
    let retimed = ddl_under_load(
        &client,
        &load,
        "ALTER TABLE tasks ALTER COLUMN due_at TYPE timestamp without time zone, ALTER COLUMN assignee TYPE varchar(200)",
    )
    .await;
    let (before_retype, retyped) = ddl_between(
        &client,
        &load,
        "ALTER TABLE tasks ALTER COLUMN mood DROP DEFAULT,
                           ALTER COLUMN mood TYPE integer USING length(mood),
                           ALTER COLUMN mood SET DEFAULT 42",
    )
    .await;
    // REPLICA IDENTITY DEFAULT (the locks' key includes the tenant).
    let default_identity = ddl_under_load(
        &client,
        &load,
        "ALTER TABLE editing_locks REPLICA IDENTITY DEFAULT",
    )
    .await;
    // And back, while the load still runs.
    let restored = ddl_under_load(
        &client,
        &load,
        "ALTER TABLE tasks ALTER COLUMN due_at TYPE timestamptz",
    )
    .await;
    let stats = load.stop().await;
    caught_up(&client, &walcast).await;
    let checked = verify("schema changes", &env, &client, &oracle).await;
    let events = read_stream(&env.nats.url(), "WALCAST").await;

    // ADD COLUMN: in `extra`, with the row's value.
    let tasks_after_add = after_lsn(&events, added, Entity::Task);
    assert!(tasks_after_add.len() > 20);
    for m in &tasks_after_add {
        let mood = m.event.extra.get("mood").map(String::as_str);
        // The load's bulk updates touch the moody row too: one committed
        // while the retype's position was read has commit_lsn < `retyped`
        // and the new type (length('happy') = 5).
        if m.event.entity_id == uuid(1) && m.event.commit_lsn < before_retype {
            assert_eq!(mood, Some("happy"));
        } else if m.event.entity_id == uuid(1) && m.event.commit_lsn < retyped {
            assert!(matches!(mood, Some("happy" | "5")), "{mood:?}");
        } else if m.event.after.is_some() {
            assert!(mood.is_some(), "{}: mood in extra", m.event.event_id);
        }
    }
    assert!(
        events
            .iter()
            .filter(|m| m.event.commit_lsn < before_add)
            .all(|m| !m.event.extra.contains_key("mood"))
    );
    // The column added then dropped: in `extra` between the two, gone after.
    let projects: Vec<&StreamEvent> = after_lsn(&events, scratch, Entity::Project);
    // A change committed after the DROP but before its position was read has
    // commit_lsn < `dropped` and no column: only what committed before the
    // DROP started (`before_drop`) surely has it, only what committed after
    // `dropped` surely has not.
    let between: Vec<&&StreamEvent> = projects
        .iter()
        .filter(|m| m.event.commit_lsn < before_drop)
        .collect();
    let after_drop: Vec<&&StreamEvent> = projects
        .iter()
        .filter(|m| m.event.commit_lsn > dropped)
        .collect();
    assert!(!between.is_empty(), "project events while scratch exists");
    assert!(
        between.iter().filter(|m| m.event.after.is_some()).all(|m| m
            .event
            .extra
            .get("scratch")
            .map(String::as_str)
            == Some("7")),
        "scratch in extra while it exists"
    );
    assert!(!after_drop.is_empty(), "project events after the drop");
    assert!(
        after_drop
            .iter()
            .all(|m| !m.event.extra.contains_key("scratch")),
        "a dropped column is gone"
    );
    // Type changes: due_at and assignee stay typed (never in extra); mood,
    // unknown, stays in extra with its new text form.
    let tasks_retimed = after_lsn(&events, retimed, Entity::Task);
    let typed_due = tasks_retimed
        .iter()
        .filter_map(|m| match &m.event.after {
            Some(After::Task(t)) => t.due_at.as_ref(),
            _ => None,
        })
        .count();
    assert!(typed_due > 5, "typed due_at after the type change");
    for m in after_lsn(&events, retimed, Entity::Task) {
        for col in ["due_at", "assignee"] {
            assert!(
                !m.event.extra.contains_key(col),
                "{}: {col} stays typed",
                m.event.event_id
            );
        }
    }
    for m in after_lsn(&events, retyped, Entity::Task) {
        if m.event.after.is_some() {
            let mood = m.event.extra.get("mood").expect("mood in extra");
            assert!(
                mood.parse::<i32>().is_ok(),
                "{}: mood is an integer now: {mood}",
                m.event.event_id
            );
        }
    }
    // REPLICA IDENTITY DEFAULT: lock events go on; updates have no
    // before-image (so no transfer/expiry can be derived); one warning.
    let locks = after_lsn(&events, default_identity, Entity::Lock);
    let updates: Vec<&&StreamEvent> = locks
        .iter()
        .filter(|m| m.event.after.is_some() && m.event.action() != Action::Acquired)
        .collect();
    assert!(
        !updates.is_empty(),
        "lock updates after REPLICA IDENTITY DEFAULT"
    );
    for m in &updates {
        assert!(
            m.event.before.is_none(),
            "{}: no before-image",
            m.event.event_id
        );
        assert_eq!(m.event.action(), Action::Refreshed);
    }
    assert!(
        locks
            .iter()
            .filter(|m| m.event.after.is_none())
            .all(|m| m.event.action() == Action::Released),
        "no expiry judged without expires_at"
    );
    let warnings: Vec<String> = walcast
        .warn_lines()
        .into_iter()
        .filter(|l| l.contains("REPLICA IDENTITY is not FULL"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning: {warnings:#?}");
    assert!(
        warnings[0].contains("public.editing_locks"),
        "{}",
        warnings[0]
    );
    assert!(
        walcast.retry_lines().is_empty(),
        "no restart: {:?}",
        walcast.retry_lines()
    );
    let _ = restored;
    walcast.stop(Duration::from_secs(15)).await;
    eprintln!("schema changes: {checked} events checked; load {stats:?}");
}

/// A source table that is renamed (here behind an updatable view, so the
/// application keeps writing) keeps its OID and stays in the publication:
/// walcast follows the table by OID, so its changes keep flowing — in order,
/// nothing dropped — and it logs one WARN naming the old and the new name
/// (regression: relations were mapped to entities by name only, so every
/// change made under the new name was silently dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renamed_source_table_keeps_streaming() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("rename").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    // The rename must come after walcast has loaded its tables (by OID): on
    // a loaded machine its start can otherwise see the view and refuse it.
    walcast
        .wait_log("replicating", Duration::from_secs(60))
        .await;
    let lock = |n: u64| {
        format!(
            "INSERT INTO editing_locks VALUES ('acme', 'task', '{}', 'ann', now(), now() + interval '1 hour')",
            uuid(n)
        )
    };
    client.batch_execute(&lock(1)).await.unwrap();
    client
        .batch_execute(
            "BEGIN;
             ALTER TABLE editing_locks RENAME TO editing_locks_v2;
             CREATE VIEW editing_locks AS SELECT * FROM editing_locks_v2;
             COMMIT;",
        )
        .await
        .unwrap();
    client.batch_execute(&lock(2)).await.unwrap(); // through the view
    client
        .batch_execute(
            "BEGIN;
             DROP VIEW editing_locks;
             ALTER TABLE editing_locks_v2 RENAME TO editing_locks;
             COMMIT;",
        )
        .await
        .unwrap();
    client.batch_execute(&lock(3)).await.unwrap();
    caught_up(&client, &walcast).await;
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let ids: Vec<String> = events.iter().map(|m| m.event.entity_id.clone()).collect();
    let want: Vec<String> = (1..=3).map(|n| format!("task:{}", uuid(n))).collect();
    assert_eq!(
        ids, want,
        "the lock written while the table was renamed is missing from the stream"
    );
    // Never silent: the rename is reported with both names.
    let renamed: Vec<String> = walcast
        .warn_lines()
        .into_iter()
        .filter(|l| l.contains("was renamed"))
        .collect();
    assert!(
        renamed
            .iter()
            .any(|l| l.contains("public.editing_locks ") && l.contains("public.editing_locks_v2")),
        "a WARN naming the old and the new name: {renamed:#?}\n{}",
        walcast.log_tail(20)
    );
    walcast.stop(Duration::from_secs(15)).await;
}
