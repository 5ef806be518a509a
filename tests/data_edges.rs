//! Data and transactions: bad tenant ids, odd values, TOAST,
//! TRUNCATE, tables outside the publication and thousands of tiny
//! transactions, against real Postgres and NATS with the walcast binary.

use std::collections::HashMap;
use std::time::Duration;

use walcast::proto::change_event::{After, Before};
use walcast::proto::{Action, ChangeEvent, Entity, Task};

use crate::support::TempDir;
use crate::support::chaos::{catch_up, verify};
use crate::support::checks::assert_stream_exact;
use crate::support::daemon::{Env, StreamEvent, read_stream};
use crate::support::edge::{on_subject, start_walcast, subject_counts, uuid, wait_metric};
use crate::support::oracle::Oracle;

const CATCH_UP: Duration = Duration::from_secs(90);

fn task(e: &ChangeEvent) -> &Task {
    match &e.after {
        Some(After::Task(t)) => t,
        other => panic!("event {} has no task after-image: {other:?}", e.event_id),
    }
}

fn task_before(e: &ChangeEvent) -> &Task {
    match &e.before {
        Some(Before::TaskBefore(t)) => t,
        other => panic!("event {} has no task before-image: {other:?}", e.event_id),
    }
}

/// The `Walcast-Reason` SPEC §3 / README give for a tenant id (same
/// precedence as the validator: NULL, empty, too long, bad character).
fn reason(tenant: Option<&str>) -> Option<&'static str> {
    match tenant {
        None => Some("tenant_id is NULL"),
        Some("") => Some("tenant_id is empty"),
        Some(t) if t.len() > 128 => Some("tenant_id is longer than 128 bytes"),
        Some(t)
            if !t
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') =>
        {
            Some("tenant_id has a character outside [A-Za-z0-9_-]")
        }
        Some(_) => None,
    }
}

/// Every invalid tenant id (NULL, empty, `.`, `*`, `>`, spaces, control
/// characters, non-ASCII, > 128 bytes) goes to `walcast._deadletter` with its
/// reason and the full event, never to a tenant subject, without a seq; the
/// dead-letter metric counts them; valid tenants around them (including the
/// 128-byte and one-character edge cases) keep gap-free seqs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_tenant_ids_go_to_the_dead_letter_subject() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    client
        .batch_execute("ALTER TABLE tasks ALTER COLUMN tenant_id DROP NOT NULL")
        .await
        .unwrap();
    let dir = TempDir::new("deadletter").unwrap();
    let (mut walcast, addr) = start_walcast(&env, dir.path(), "walcast", &[]);

    let long_ascii = "x".repeat(129);
    let long_unicode = "é".repeat(65); // 130 bytes, 65 characters
    let very_long = "t".repeat(2000);
    let invalid: Vec<Option<&str>> = vec![
        None,
        Some(""),
        Some("a.b"),
        Some("."),
        Some("acme."),
        Some("*"),
        Some("a*"),
        Some(">"),
        Some("a>b"),
        Some(" "),
        Some("a b"),
        Some(" acme"),
        Some("tab\there"),
        Some("new\nline"),
        Some("\u{1}ctl"),
        Some("del\u{7f}"),
        Some("esc\u{1b}[31m"),
        Some("é"),
        Some("日本"),
        Some("emoji🚀"),
        Some("zero\u{200b}width"),
        Some("\u{430}cme"), // Cyrillic а: looks like "acme"
        Some("a/b"),
        Some("$SYS"),
        Some(&long_ascii),
        Some(&long_unicode),
        Some(&very_long),
    ];
    let max_len = "m".repeat(128);
    // Valid, though odd: one character, `_`-prefixed names that look like
    // walcast's own two-token subjects, exactly 128 bytes.
    let valid = [
        "acme",
        "-",
        "_",
        "_deadletter",
        "_truncated",
        "A-Za-z0-9_-",
        max_len.as_str(),
    ];
    let mut n = 0u64;
    let mut expected_dead = Vec::new();
    for (i, tenant) in invalid.iter().enumerate() {
        // A valid change before each bad one: the stream goes on around them.
        let t = valid[i % valid.len()];
        n += 1;
        client
            .execute(
                "INSERT INTO tasks (id, tenant_id, title) VALUES ($1::text::uuid, $2, 'ok')",
                &[&uuid(n), &t],
            )
            .await
            .unwrap();
        n += 1;
        let id = uuid(n);
        client
            .execute(
                "INSERT INTO tasks (id, tenant_id, title) VALUES ($1::text::uuid, $2, $3)",
                &[&id, tenant, &format!("bad #{i}")],
            )
            .await
            .unwrap();
        client
            .execute(
                "UPDATE tasks SET title = title || ' (edited)', version = version + 1 WHERE id = $1::text::uuid",
                &[&id],
            )
            .await
            .unwrap();
        client
            .execute("DELETE FROM tasks WHERE id = $1::text::uuid", &[&id])
            .await
            .unwrap();
        for action in [Action::Created, Action::Updated, Action::Deleted] {
            expected_dead.push((id.clone(), tenant.map(str::to_string), action));
        }
    }
    // A lock and a project with a bad tenant (tenant_id is part of the lock's key).
    client
        .batch_execute(
            "INSERT INTO editing_locks VALUES ('a.b', 'task', '00000000-0000-4000-8000-00000000beef', 'ann', now(), now() + interval '1 hour');
             INSERT INTO projects (id, tenant_id, name) VALUES ('00000000-0000-4000-8000-00000000cafe', 'x y', 'p');
             INSERT INTO tasks (id, tenant_id, title) VALUES ('00000000-0000-4000-8000-00000000f00d', 'acme', 'after all of them');",
        )
        .await
        .unwrap();
    catch_up(&client, CATCH_UP)
        .await
        .unwrap_or_else(|e| panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40)));

    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let per_tenant = assert_stream_exact(&events);
    // Valid tenants: every one routed, seqs 1..N (assert_stream_exact), and
    // nothing else reached a tenant subject.
    for m in &events {
        if m.subject == "walcast._deadletter" {
            continue;
        }
        let tokens: Vec<&str> = m.subject.split('.').collect();
        assert_eq!(tokens.len(), 4, "subject {:?}", m.subject);
        assert!(
            reason(Some(tokens[1])).is_none(),
            "invalid tenant on a subject: {:?}",
            m.subject
        );
    }
    for t in valid {
        assert!(
            per_tenant.contains_key(t),
            "tenant {t:?} was routed: {per_tenant:?}"
        );
    }
    assert_eq!(
        per_tenant["acme"], 5,
        "acme: 4 'ok' rows + the last one: {per_tenant:?}"
    );

    let dead = on_subject(&events, "walcast._deadletter");
    assert_eq!(
        dead.len(),
        expected_dead.len() + 2,
        "dead letters: {:?}",
        subject_counts(&events)
    );
    for (m, (id, tenant, action)) in dead.iter().zip(&expected_dead) {
        let e = &m.event;
        let what = format!("dead letter {} for tenant {tenant:?}", e.event_id);
        assert_eq!(e.entity_id, *id, "{what}");
        assert_eq!(e.action(), *action, "{what}");
        assert_eq!(e.seq, 0, "{what}: no seq");
        assert_eq!(e.tenant_id, tenant.clone().unwrap_or_default(), "{what}");
        assert_eq!(
            m.headers.get("Walcast-Reason").map(String::as_str),
            reason(tenant.as_deref()),
            "{what}"
        );
        assert_eq!(m.headers.get("Nats-Msg-Id"), Some(&e.event_id), "{what}");
        assert!(
            !m.headers.contains_key("Walcast-Seq") && !m.headers.contains_key("Walcast-Tenant"),
            "{what}: headers {:?}",
            m.headers
        );
        // The full event: typed row images as for any other event.
        match action {
            Action::Created => assert!(task(e).title.starts_with("bad #"), "{what}"),
            Action::Updated => {
                assert!(task(e).title.ends_with("(edited)"), "{what}");
                assert!(task_before(e).title.starts_with("bad #"), "{what}");
                assert_eq!(e.changed_fields, ["title", "version"], "{what}");
            }
            _ => assert_eq!(task_before(e).id, *id, "{what}"),
        }
        let row = match action {
            Action::Deleted => task_before(e),
            _ => task(e),
        };
        assert_eq!(
            row.tenant_id,
            tenant.clone().unwrap_or_default(),
            "{what}: the typed row carries the raw tenant id"
        );
    }
    let lock = dead[dead.len() - 2];
    assert_eq!(lock.event.entity(), Entity::Lock);
    assert_eq!(lock.event.tenant_id, "a.b");
    let project = dead[dead.len() - 1];
    assert_eq!(project.event.entity(), Entity::Project);
    assert_eq!(
        project.headers.get("Walcast-Reason").map(String::as_str),
        reason(Some("x y"))
    );

    let want = dead.len() as f64;
    let counted = wait_metric(
        &addr,
        "walcast_dead_letters_total",
        want,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(counted, Some(want), "walcast_dead_letters_total");
    assert!(walcast.exited().is_none(), "walcast is still running");
    walcast.stop(Duration::from_secs(15)).await;
    eprintln!(
        "checked {} events: {} dead letters, {} tenants",
        events.len(),
        dead.len(),
        per_tenant.len()
    );
}

/// Text of `column` of the row with `id`, as Postgres prints it.
async fn pg_text(
    client: &tokio_postgres::Client,
    table: &str,
    column: &str,
    id: &str,
) -> Option<String> {
    client
        .query_one(
            &format!("SELECT {column}::text FROM {table} WHERE id = $1::text::uuid"),
            &[&id],
        )
        .await
        .unwrap()
        .get(0)
}

const PB_MIN: (i64, i32) = (-62_135_596_800, 0);
const PB_MAX: (i64, i32) = (253_402_300_799, 999_999_999);

fn secs(t: &Option<pbjson_types::Timestamp>) -> Option<(i64, i32)> {
    t.as_ref().map(|t| (t.seconds, t.nanos))
}

/// NULL in every nullable column, odd unicode, timestamps at ±infinity and
/// at the ends of Postgres' range, numeric edge values, 10 MB text and jsonb
/// values (TOAST), and unchanged-TOAST markers on update: filled from the
/// before-image under REPLICA IDENTITY FULL, listed in `unchanged_fields`
/// (never an empty string) under DEFAULT.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn values_nulls_unicode_infinity_numeric_and_toast() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("values").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);

    // 1. NULL in every nullable column (tasks and projects).
    let nulls = uuid(1);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, project_id, title, description, status, priority, assignee, due_at,
                                completed_at, version, created_at, updated_at, updated_by, actor_type, client_id, metadata)
             VALUES ($1::text::uuid, 'acme', NULL, 'nulls', NULL, 'todo', NULL, NULL, NULL, NULL, 1, NULL, NULL, NULL, NULL, NULL, NULL)",
            &[&nulls],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO projects (id, tenant_id, name, description, created_at, updated_at, updated_by, actor_type, client_id, metadata)
             VALUES ($1::text::uuid, 'acme', 'nulls', NULL, NULL, NULL, NULL, NULL, NULL, NULL)",
            &[&uuid(2)],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE tasks SET priority = 3, assignee = 'ann' WHERE id = $1::text::uuid",
            &[&nulls],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE tasks SET priority = NULL, assignee = NULL WHERE id = $1::text::uuid",
            &[&nulls],
        )
        .await
        .unwrap();

    // 2. Unicode: emoji (ZWJ sequences), RTL and bidi overrides, combining
    //    marks, BOM / zero-width, astral and noncharacters, control characters.
    let odd = [
        "emoji 🚀🔥 👩‍👩‍👧‍👦 🏳️‍🌈",
        "rtl שלום עולם مرحبا بالعالم",
        "bidi \u{202e}txet desrever\u{202c} \u{2067}isolate\u{2069}",
        "combining e\u{301}\u{302}\u{303} Z\u{36b}\u{33e}",
        "bom \u{feff} zero\u{200b}width \u{200d}joiner",
        "astral 𝕏𝔂𝓏 \u{10ffff} \u{fffe} \u{fffd}",
        "control \u{1}\u{7}\u{8}\u{1b}[0m \u{7f} \u{85} \u{2028}",
        "quotes ' \" \\ \\x00 $$ %s {}",
        "crlf\r\n\ttab",
    ];
    for (i, title) in odd.iter().enumerate() {
        let meta = format!(
            r#"{{"title": {}, "n": {i}, "nested": {{"é": ["🚀", null, true]}}}}"#,
            serde_json::to_string(title).unwrap()
        );
        client
            .execute(
                "INSERT INTO tasks (id, tenant_id, title, description, assignee, metadata) VALUES ($1::text::uuid, 'acme', $2, $2, $2, $3::text::jsonb)",
                &[&uuid(100 + i as u64), title, &meta],
            )
            .await
            .unwrap();
    }

    // 3. Timestamps at infinity and at the ends of Postgres' range; numeric edges.
    let times = uuid(3);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, priority, version, due_at, completed_at, created_at, updated_at)
             VALUES ($1::text::uuid, 'acme', 'edges', 2147483647, 9223372036854775807, 'infinity', '-infinity',
                     '294276-12-31 23:59:59.999999+00', '4713-01-01 00:00:00+00 BC')",
            &[&times],
        )
        .await
        .unwrap();
    let in_range = uuid(4);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, priority, version, due_at, completed_at, created_at, updated_at)
             VALUES ($1::text::uuid, 'acme', 'in range', -2147483648, -9223372036854775808,
                     '0001-01-01 00:00:00+00', '9999-12-31 23:59:59.999999+00', '1969-12-31 23:59:59.999999+00',
                     '2000-02-29 12:34:56.000001+05:30')",
            &[&in_range],
        )
        .await
        .unwrap();
    client
        .batch_execute(
            "INSERT INTO editing_locks VALUES ('acme', 'task', '00000000-0000-4000-8000-000000000001', 'ann', '-infinity', 'infinity');
             INSERT INTO editing_locks VALUES ('acme', 'task', '00000000-0000-4000-8000-000000000002', 'bob', now(), '-infinity');
             DELETE FROM editing_locks;",
        )
        .await
        .unwrap();

    // jsonb numbers at the edges of numeric (kept exactly, as Postgres prints them).
    let numbers = uuid(7);
    client
        .execute(
            r#"INSERT INTO tasks (id, tenant_id, title, metadata) VALUES ($1::text::uuid, 'acme', 'numbers',
               '{"huge": 1e400, "tiny": -1e-400, "pi": 3.14159265358979323846264338327950288419716939937510,
                 "int64max": 9223372036854775807, "beyond": 18446744073709551616, "zero": -0.0}'::jsonb)"#,
            &[&numbers],
        )
        .await
        .unwrap();

    // 4. TOAST: 10 MB text and 10 MB jsonb (incompressible enough to be
    //    stored out of line), then updates that leave them unchanged.
    let big_text = uuid(5);
    let big_json = uuid(6);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title, description)
             SELECT $1::text::uuid, 'acme', 'big text', string_agg(md5(i::text), '') FROM generate_series(1, 327680) i",
            &[&big_text],
        )
        .await
        .unwrap();
    client
        .execute(
            "INSERT INTO projects (id, tenant_id, name, metadata)
             SELECT $1::text::uuid, 'acme', 'big json', jsonb_build_object('blob', string_agg(md5(i::text), ''), 'n', 1)
             FROM generate_series(1, 327680) i",
            &[&big_json],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE tasks SET title = 'big text, renamed' WHERE id = $1::text::uuid",
            &[&big_text],
        )
        .await
        .unwrap();
    client
        .execute(
            "UPDATE projects SET name = 'big json, renamed' WHERE id = $1::text::uuid",
            &[&big_json],
        )
        .await
        .unwrap();
    // Without a before-image the unchanged value cannot be filled.
    client
        .batch_execute("ALTER TABLE tasks REPLICA IDENTITY DEFAULT")
        .await
        .unwrap();
    client
        .execute(
            "UPDATE tasks SET title = 'big text, default identity' WHERE id = $1::text::uuid",
            &[&big_text],
        )
        .await
        .unwrap();
    client
        .batch_execute("ALTER TABLE tasks REPLICA IDENTITY FULL")
        .await
        .unwrap();
    client
        .execute(
            "UPDATE tasks SET title = 'big text, full again' WHERE id = $1::text::uuid",
            &[&big_text],
        )
        .await
        .unwrap();

    catch_up(&client, CATCH_UP)
        .await
        .unwrap_or_else(|e| panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40)));
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    assert_stream_exact(&events);
    let by_id = |id: &str| -> Vec<&StreamEvent> {
        events.iter().filter(|m| m.event.entity_id == id).collect()
    };

    // 1. NULLs: absent optional fields, nothing in extra, nothing "unchanged".
    let n = by_id(&nulls);
    assert_eq!(n.len(), 3);
    let t = task(&n[0].event);
    assert_eq!(
        (
            &t.project_id,
            &t.description,
            &t.priority,
            &t.assignee,
            &t.due_at,
            &t.completed_at
        ),
        (&None, &None, &None, &None, &None, &None)
    );
    assert_eq!(
        (
            &t.created_at,
            &t.updated_at,
            &t.updated_by,
            &t.actor_type,
            &t.client_id,
            &t.metadata
        ),
        (&None, &None, &None, &None, &None, &None)
    );
    assert!(n[0].event.extra.is_empty() && n[0].event.unchanged_fields.is_empty());
    assert_eq!(n[1].event.changed_fields, ["priority", "assignee"]);
    assert_eq!(
        (
            task(&n[1].event).priority,
            task(&n[1].event).assignee.as_deref()
        ),
        (Some(3), Some("ann"))
    );
    assert_eq!(
        n[2].event.changed_fields,
        ["priority", "assignee"],
        "NULL again is a change"
    );
    assert_eq!(
        (
            task(&n[2].event).priority,
            task(&n[2].event).assignee.as_deref()
        ),
        (None, None)
    );
    let Some(After::Project(p)) = &by_id(&uuid(2))[0].event.after else {
        panic!("project")
    };
    assert_eq!(
        (&p.description, &p.metadata, &p.created_at, &p.client_id),
        (&None, &None, &None, &None)
    );

    // 2. Unicode arrives byte for byte; jsonb in Postgres' own text form.
    for (i, title) in odd.iter().enumerate() {
        let id = uuid(100 + i as u64);
        let t = task(&by_id(&id)[0].event).clone();
        assert_eq!(t.title, *title);
        assert_eq!(t.description.as_deref(), Some(*title));
        assert_eq!(t.assignee.as_deref(), Some(*title));
        assert_eq!(t.metadata, pg_text(&client, "tasks", "metadata", &id).await);
    }

    // 3. Out-of-range timestamps are clamped and keep their text in `extra`;
    //    in-range edges are exact; numeric edges are exact.
    let e = &by_id(&times)[0].event;
    let t = task(e);
    assert_eq!(
        (secs(&t.due_at), secs(&t.completed_at)),
        (Some(PB_MAX), Some(PB_MIN))
    );
    assert_eq!(
        (secs(&t.created_at), secs(&t.updated_at)),
        (Some(PB_MAX), Some(PB_MIN))
    );
    for col in ["due_at", "completed_at", "created_at", "updated_at"] {
        assert_eq!(
            e.extra.get(col),
            pg_text(&client, "tasks", col, &times).await.as_ref(),
            "original text of {col} in extra"
        );
    }
    assert_eq!(e.extra.get("due_at").map(String::as_str), Some("infinity"));
    assert_eq!((t.priority, t.version), (Some(i32::MAX), i64::MAX));
    let e = &by_id(&in_range)[0].event;
    let t = task(e);
    assert!(
        e.extra.is_empty(),
        "in-range values are exact: {:?}",
        e.extra
    );
    assert_eq!((t.priority, t.version), (Some(i32::MIN), i64::MIN));
    assert_eq!(secs(&t.due_at), Some(PB_MIN));
    assert_eq!(secs(&t.completed_at), Some((253_402_300_799, 999_999_000)));
    assert_eq!(secs(&t.created_at), Some((-1, 999_999_000)));
    assert_eq!(secs(&t.updated_at), Some((951_807_896, 1_000)));
    let locks: Vec<&StreamEvent> = events
        .iter()
        .filter(|m| m.event.entity() == Entity::Lock)
        .collect();
    let actions: Vec<Action> = locks.iter().map(|m| m.event.action()).collect();
    assert_eq!(
        actions,
        [
            Action::Acquired,
            Action::Acquired,
            Action::Released,
            Action::Expired
        ]
    );
    let Some(After::Lock(l)) = &locks[0].event.after else {
        panic!("lock")
    };
    assert_eq!(
        (secs(&l.locked_at), secs(&l.expires_at)),
        (Some(PB_MIN), Some(PB_MAX))
    );
    assert_eq!(
        locks[0].event.extra.get("expires_at").map(String::as_str),
        Some("infinity")
    );

    let meta = task(&by_id(&numbers)[0].event).metadata.clone();
    assert_eq!(meta, pg_text(&client, "tasks", "metadata", &numbers).await);
    assert!(
        meta.as_deref()
            .is_some_and(|m| m.contains(&"0".repeat(399))),
        "{meta:?}"
    );

    // 4. TOAST.
    let want_text = pg_text(&client, "tasks", "description", &big_text)
        .await
        .unwrap();
    let want_json = pg_text(&client, "projects", "metadata", &big_json)
        .await
        .unwrap();
    assert!(want_text.len() >= 10 * 1024 * 1024 && want_json.len() >= 10 * 1024 * 1024);
    let big = by_id(&big_text);
    assert_eq!(big.len(), 4, "insert + 3 updates");
    for m in [big[0], big[1], big[3]] {
        assert!(
            m.headers.contains_key("Walcast-Object"),
            "a 10 MB event is stored in the object store: {}",
            m.event.event_id
        );
    }
    assert_eq!(
        task(&big[0].event).description.as_deref(),
        Some(want_text.as_str())
    );
    // FULL: the unchanged value comes from the before-image.
    for m in [big[1], big[3]] {
        let e = &m.event;
        assert_eq!(e.changed_fields, ["title"], "{}", e.event_id);
        assert!(
            e.unchanged_fields.is_empty(),
            "{}: {:?}",
            e.event_id,
            e.unchanged_fields
        );
        assert!(
            task(e).description.as_deref() == Some(want_text.as_str()),
            "{}: unchanged TOAST value filled from the before-image",
            e.event_id
        );
        assert_eq!(
            task_before(e).description.as_deref(),
            Some(want_text.as_str())
        );
    }
    // DEFAULT: no before-image; the column is marked, never silently empty.
    let e = &big[2].event;
    assert!(
        e.before.is_none(),
        "no before-image under REPLICA IDENTITY DEFAULT"
    );
    assert_eq!(e.unchanged_fields, ["description"]);
    assert_eq!(task(e).description, None, "absent, not \"\"");
    assert_eq!(task(e).title, "big text, default identity");
    let bj = by_id(&big_json);
    let Some(After::Project(p)) = &bj[0].event.after else {
        panic!("project")
    };
    assert_eq!(p.metadata.as_deref(), Some(want_json.as_str()));
    let Some(After::Project(p)) = &bj[1].event.after else {
        panic!("project")
    };
    assert_eq!(
        p.metadata.as_deref(),
        Some(want_json.as_str()),
        "jsonb filled from the before-image"
    );
    assert!(bj[1].event.unchanged_fields.is_empty());
    walcast.stop(Duration::from_secs(20)).await;
    eprintln!("checked {} events", events.len());
}

/// TRUNCATE publishes one `ACTION_TRUNCATED` event per truncated source
/// table on `walcast._truncated` (no tenant, no seq), in the transaction's
/// order; tables outside the publication are not reported; tenant seqs go
/// on across them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_publishes_one_event_per_table() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("truncate").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    let fill = |n: u64| {
        format!(
            "INSERT INTO projects (id, tenant_id, name) VALUES ('{p}', 'acme', 'p{n}');
             INSERT INTO tasks (id, tenant_id, project_id, title) VALUES ('{t}', 'acme', '{p}', 't{n}');
             INSERT INTO editing_locks VALUES ('globex', 'task', '{t}', 'ann', now(), now() + interval '1 hour');",
            p = uuid(n),
            t = uuid(n + 1000),
        )
    };
    let statements = [
        "CREATE TABLE noise (id int)".to_string(),
        "INSERT INTO noise VALUES (1)".to_string(),
        fill(1),
        "TRUNCATE tasks".to_string(),
        fill(2),
        format!(
            "BEGIN; TRUNCATE editing_locks, noise; INSERT INTO tasks (id, tenant_id, title) VALUES ('{}', 'acme', 'in tx'); COMMIT",
            uuid(9)
        ),
        "TRUNCATE projects CASCADE".to_string(),
        "TRUNCATE noise".to_string(),
        fill(3),
        "TRUNCATE projects, tasks, editing_locks RESTART IDENTITY".to_string(),
    ];
    // One transaction each (a multi-statement string would be one implicit transaction).
    for sql in &statements {
        client.batch_execute(sql).await.unwrap();
    }
    catch_up(&client, CATCH_UP)
        .await
        .unwrap_or_else(|e| panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40)));
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let per_tenant = assert_stream_exact(&events);
    assert_eq!(per_tenant["acme"], 7, "{per_tenant:?}");
    assert_eq!(per_tenant["globex"], 3, "{per_tenant:?}");
    // One group per TRUNCATE statement (= transaction), tables sorted by tx_index.
    let mut groups: Vec<(u64, Vec<(Entity, u32)>)> = Vec::new();
    for m in events.iter().filter(|m| m.subject == "walcast._truncated") {
        let e = &m.event;
        assert_eq!(e.action(), Action::Truncated);
        assert_eq!((e.seq, e.tenant_id.as_str()), (0, ""), "no tenant, no seq");
        assert!(e.after.is_none() && e.before.is_none());
        assert!(
            !m.headers.contains_key("Walcast-Seq") && !m.headers.contains_key("Walcast-Tenant"),
            "{:?}",
            m.headers
        );
        assert_eq!(m.headers.get("Nats-Msg-Id"), Some(&e.event_id));
        match groups.last_mut() {
            Some((lsn, g)) if *lsn == e.commit_lsn => g.push((e.entity(), e.tx_index)),
            _ => groups.push((e.commit_lsn, vec![(e.entity(), e.tx_index)])),
        }
    }
    let groups: Vec<Vec<(Entity, u32)>> = groups.into_iter().map(|(_, g)| g).collect();
    assert_eq!(
        groups,
        vec![
            vec![(Entity::Task, 0)],
            vec![(Entity::Lock, 0)],
            // CASCADE: the referencing table is truncated (and reported) too.
            vec![(Entity::Project, 0), (Entity::Task, 1)],
            vec![(Entity::Project, 0), (Entity::Task, 1), (Entity::Lock, 2)],
        ],
        "one event per truncated source table, none for `noise`"
    );
    // The row inserted in the same transaction as a TRUNCATE follows it.
    let in_tx = events
        .iter()
        .find(|m| m.event.entity_id == uuid(9))
        .unwrap();
    assert_eq!(in_tx.event.tx_index, 1);
    walcast.stop(Duration::from_secs(15)).await;
}

/// Thousands of tiny transactions (one statement each, across 20 tenants),
/// interleaved — inside the same transactions and as transactions of their
/// own — with changes to tables outside the publication (`noise`) and to a
/// published table walcast is not configured for (`other.tasks`, same name
/// as a source table in another schema). The stream matches the independent
/// test_decoding log one to one (tx_index counts only source-table changes),
/// and replays into exactly the source tables.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thousands_of_tiny_transactions_interleaved_with_other_tables() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    client
        .batch_execute(
            "CREATE TABLE noise (id bigint PRIMARY KEY, tenant_id text, payload text);
             CREATE SCHEMA other;
             CREATE TABLE other.tasks (LIKE public.tasks INCLUDING ALL);
             ALTER TABLE other.tasks REPLICA IDENTITY FULL;
             ALTER PUBLICATION walcast ADD TABLE other.tasks;",
        )
        .await
        .unwrap();
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("tiny").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);

    let transactions = 4000u64;
    let began = std::time::Instant::now();
    let mut live: HashMap<u64, String> = HashMap::new();
    for i in 0..transactions {
        let tenant = format!("t{}", i % 20);
        let id = uuid(i);
        let noise = format!("INSERT INTO noise VALUES ({i}, '{tenant}', 'x');");
        let other = format!(
            "INSERT INTO other.tasks (id, tenant_id, title) VALUES ('{id}', '{tenant}', 'shadow');"
        );
        let sql = match i % 8 {
            // Single-statement transactions (autocommit).
            0..=2 => format!("INSERT INTO tasks (id, tenant_id, title) VALUES ('{id}', '{tenant}', 'tiny {i}')"),
            3 => match live.keys().next().copied() {
                Some(k) => format!("UPDATE tasks SET title = 'tiny upd {i}', version = version + 1 WHERE id = '{}'", uuid(k)),
                None => noise.clone(),
            },
            4 => match live.keys().next().copied() {
                Some(k) => {
                    live.remove(&k);
                    format!("DELETE FROM tasks WHERE id = '{}'", uuid(k))
                }
                None => noise.clone(),
            },
            // Transactions with only other tables' changes.
            5 => noise.clone(),
            6 => other.clone(),
            // Source changes between other tables' changes, in one transaction.
            _ => format!(
                "BEGIN; {noise} INSERT INTO tasks (id, tenant_id, title) VALUES ('{id}', '{tenant}', 'mixed'); {other}
                 INSERT INTO editing_locks VALUES ('{tenant}', 'task', '{id}', 'ann', now(), now() + interval '1 hour');
                 UPDATE noise SET payload = 'y' WHERE id = {i}; COMMIT;"
            ),
        };
        if matches!(i % 8, 0 | 1 | 2 | 7) {
            live.insert(i, tenant.clone());
        }
        client.batch_execute(&sql).await.unwrap();
    }
    eprintln!("{transactions} transactions in {:?}", began.elapsed());
    catch_up(&client, CATCH_UP)
        .await
        .unwrap_or_else(|e| panic!("walcast did not catch up: {e}\n{}", walcast.log_tail(40)));
    let checked = verify("tiny transactions", &env, &client, &oracle).await;
    assert!(checked > 3000, "{checked}");
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    assert!(
        events
            .iter()
            .all(|m| m.event.table != "other.tasks" && m.event.title_like() != "shadow"),
        "nothing from other.tasks"
    );
    walcast.stop(Duration::from_secs(15)).await;
}

trait TitleLike {
    fn title_like(&self) -> &str;
}

impl TitleLike for ChangeEvent {
    fn title_like(&self) -> &str {
        match &self.after {
            Some(After::Task(t)) => &t.title,
            _ => "",
        }
    }
}
