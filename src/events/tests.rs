//! Event builder rules, from decoded pgoutput bytes to ChangeEvents.

use prost::Message as _;

use super::*;
use crate::decode::{self, Column, Message, Relation, ReplicaIdentity, Value, encode};
use crate::proto::change_event::{After, Before};

/// A relation of text columns (also used by the assembler's tests).
pub(crate) fn relation(name: &str, cols: &[&str]) -> Relation {
    Relation {
        oid: 1,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: ReplicaIdentity::Full,
        columns: cols
            .iter()
            .map(|c| Column {
                name: c.to_string(),
                type_oid: 25,
                type_modifier: -1,
                is_key: false,
            })
            .collect(),
    }
}

const TASK_COLS: &[&str] = &[
    "id",
    "tenant_id",
    "title",
    "status",
    "version",
    "updated_by",
    "actor_type",
    "due_at",
    "mood",
];
pub(crate) const LOCK_COLS: &[&str] = &[
    "tenant_id",
    "record_type",
    "record_id",
    "locked_by",
    "locked_at",
    "expires_at",
];

fn tx(actor: Option<Actor>) -> TxContext {
    TxContext {
        commit_lsn: Lsn(0x1234),
        commit_time: timestamp::parse("2024-01-01 12:00:00+00")
            .unwrap()
            .timestamp,
        xid: 7,
        actor,
    }
}

fn text(v: &[&'static str]) -> Vec<Value<'static>> {
    v.iter()
        .map(|s| {
            if *s == "NULL" {
                Value::Null
            } else if *s == "TOAST" {
                Value::UnchangedToast
            } else {
                Value::Text(s.as_bytes())
            }
        })
        .collect()
}

/// Decodes `bytes` (an encoded row change) and builds its event.
fn build(
    b: &mut EventBuilder,
    layout: &Layout,
    bytes: &[u8],
    actor: Option<Actor>,
) -> (OutEvent, ChangeEvent) {
    let change = match decode::decode(bytes).unwrap() {
        Message::Insert(i) => Change::Insert { new: i.new },
        Message::Update(u) => Change::Update {
            old: u.old,
            key_only: u.key_only,
            new: u.new,
        },
        Message::Delete(d) => Change::Delete {
            old: d.old,
            key_only: d.key_only,
        },
        other => panic!("not a change: {other:?}"),
    };
    let out = b.build(&tx(actor), 3, layout, change);
    let event = ChangeEvent::decode(out.payload.clone()).unwrap();
    (out, event)
}

fn task_layout() -> Layout {
    Layout::of(&Tables::default(), &relation("tasks", TASK_COLS)).unwrap()
}

#[test]
fn insert_is_created_routed_numbered_and_typed() {
    let layout = task_layout();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    let row = text(&[
        "t1",
        "acme",
        "Write",
        "todo",
        "1",
        "ann",
        "user",
        "2024-02-01 00:00:00+00",
        "happy",
    ]);
    let (out, ev) = build(&mut b, &layout, &encode::insert(1, &row), None);
    assert_eq!(out.subject, "walcast.acme.task.created");
    assert_eq!(
        out.route,
        Route::Tenant {
            tenant: "acme".into(),
            seq: TenantSeq(1)
        }
    );
    assert_eq!(ev.event_id, "0000000000001234-00000003");
    assert_eq!(parse_event_id(&ev.event_id), Some((Lsn(0x1234), 3)));
    assert_eq!(
        (ev.seq, ev.entity_id.as_str(), ev.tx_index, ev.xid),
        (1, "t1", 3, 7)
    );
    assert_eq!(ev.action(), Action::Created);
    assert_eq!(ev.extra.get("mood").map(String::as_str), Some("happy"));
    let Some(After::Task(task)) = ev.after else {
        panic!("no task")
    };
    assert_eq!(
        (
            task.title.as_str(),
            task.version,
            task.updated_by.as_deref()
        ),
        ("Write", 1, Some("ann"))
    );
    assert_eq!(task.due_at.unwrap().seconds, 1_706_745_600);
    assert!(ev.before.is_none());
    let actor = ev.actor.unwrap();
    assert_eq!(
        (actor.actor_type.as_deref(), actor.actor_id.as_deref()),
        (Some("user"), Some("ann"))
    );
    assert_eq!(
        b.build(
            &tx(None),
            4,
            &layout,
            Change::Insert {
                new: decode_new(&encode::insert(1, &row))
            }
        )
        .route,
        Route::Tenant {
            tenant: "acme".into(),
            seq: TenantSeq(2)
        }
    );
}

fn decode_new(bytes: &[u8]) -> decode::Tuple<'_> {
    match decode::decode(bytes).unwrap() {
        Message::Insert(i) => i.new,
        _ => unreachable!(),
    }
}

#[test]
fn update_to_done_is_completed_with_changed_fields_and_toast_filled() {
    let layout = task_layout();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    let old = text(&[
        "t1",
        "acme",
        "Write",
        "in_progress",
        "1",
        "ann",
        "user",
        "NULL",
        "big",
    ]);
    let new = text(&[
        "t1", "acme", "Write", "done", "2", "bob", "user", "NULL", "TOAST",
    ]);
    let (out, ev) = build(&mut b, &layout, &encode::update(1, Some(&old), &new), None);
    assert_eq!(out.subject, "walcast.acme.task.completed");
    assert_eq!(ev.changed_fields, vec!["status", "version", "updated_by"]);
    assert_eq!(
        ev.extra.get("mood").map(String::as_str),
        Some("big"),
        "TOAST filled from before"
    );
    assert!(ev.unchanged_fields.is_empty());
    let Some(Before::TaskBefore(before)) = ev.before else {
        panic!("no before")
    };
    assert_eq!(before.status, "in_progress");

    // Already done: a plain update. Unchanged TOAST without a before-image is reported, not emptied.
    let (out, ev) = build(&mut b, &layout, &encode::update(1, None, &new), None);
    assert_eq!(out.subject, "walcast.acme.task.updated");
    assert_eq!(ev.unchanged_fields, vec!["mood"]);
    assert!(!ev.extra.contains_key("mood"));
}

#[test]
fn project_archived_and_deleted() {
    let layout = Layout::of(
        &Tables::default(),
        &relation("projects", &["id", "tenant_id", "name", "status"]),
    )
    .unwrap();
    let mut b = EventBuilder::new("p", Sequencer::default());
    let old = text(&["p1", "acme", "P", "active"]);
    let new = text(&["p1", "acme", "P", "archived"]);
    assert_eq!(
        build(&mut b, &layout, &encode::update(1, Some(&old), &new), None)
            .0
            .subject,
        "p.acme.project.archived"
    );
    assert_eq!(
        build(&mut b, &layout, &encode::update(1, Some(&new), &new), None)
            .0
            .subject,
        "p.acme.project.updated"
    );
    let (out, ev) = build(&mut b, &layout, &encode::delete(1, &new), None);
    assert_eq!(out.subject, "p.acme.project.deleted");
    assert!(ev.after.is_none() && matches!(ev.before, Some(Before::ProjectBefore(_))));
    assert_eq!(ev.seq, 3);
}

#[test]
fn lock_actions() {
    let layout = Layout::of(&Tables::default(), &relation("editing_locks", LOCK_COLS)).unwrap();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    let lock = |by: &'static str, expires: &'static str| {
        text(&["acme", "task", "r1", by, "2024-01-01 11:00:00+00", expires])
    };
    let later = "2024-01-01 12:30:00+00";
    let (out, ev) = build(
        &mut b,
        &layout,
        &encode::insert(1, &lock("ann", later)),
        None,
    );
    assert_eq!(out.subject, "walcast.acme.lock.acquired");
    assert_eq!(ev.entity_id, "task:r1");
    assert_eq!(ev.actor.unwrap().actor_id.as_deref(), Some("ann"));
    let upd = |a: Vec<Value<'static>>, b: Vec<Value<'static>>| encode::update(1, Some(&a), &b);
    assert_eq!(
        build(
            &mut b,
            &layout,
            &upd(lock("ann", later), lock("ann", later)),
            None
        )
        .0
        .subject,
        "walcast.acme.lock.refreshed"
    );
    assert_eq!(
        build(
            &mut b,
            &layout,
            &upd(lock("ann", later), lock("bob", later)),
            None
        )
        .0
        .subject,
        "walcast.acme.lock.transferred"
    );
    // Commit time is 12:00: a lock expiring later was released, one expiring at or before it expired.
    let (out, ev) = build(
        &mut b,
        &layout,
        &encode::delete(1, &lock("bob", later)),
        None,
    );
    assert_eq!(out.subject, "walcast.acme.lock.released");
    assert_eq!(
        ev.actor.unwrap().actor_id.as_deref(),
        Some("bob"),
        "old holder on delete"
    );
    assert_eq!(
        build(
            &mut b,
            &layout,
            &encode::delete(1, &lock("bob", "2024-01-01 12:00:00+00")),
            None
        )
        .0
        .subject,
        "walcast.acme.lock.expired"
    );
}

#[test]
fn message_actor_wins_over_row_columns() {
    let layout = task_layout();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    let actor =
        actor::from_message(br#"{"actor_type":"agent","actor_id":"bot-7","client_id":"c1"}"#)
            .unwrap();
    let row = text(&[
        "t1", "acme", "W", "todo", "1", "ann", "user", "NULL", "NULL",
    ]);
    let (_, ev) = build(
        &mut b,
        &layout,
        &encode::insert(1, &row),
        Some(actor.clone()),
    );
    assert_eq!(ev.actor, Some(actor));
}

#[test]
fn invalid_tenants_go_to_dead_letter_without_seq() {
    let layout = task_layout();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    for tenant in ["NULL", "a.b", "*", ">", "a b", "é", ""] {
        let row = text(&[
            "t1", tenant, "W", "todo", "1", "NULL", "NULL", "NULL", "NULL",
        ]);
        let (out, ev) = build(&mut b, &layout, &encode::insert(1, &row), None);
        assert_eq!(out.subject, "walcast._deadletter", "{tenant:?}");
        assert!(matches!(out.route, Route::DeadLetter { .. }));
        assert_eq!(ev.seq, 0);
    }
    assert_eq!(b.sequencer().tenants(), 0);
}

#[test]
fn unparsable_typed_value_is_kept_as_text() {
    let layout = task_layout();
    let mut b = EventBuilder::new("walcast", Sequencer::default());
    let row = text(&[
        "t1",
        "acme",
        "W",
        "todo",
        "not-a-number",
        "NULL",
        "NULL",
        "infinity",
        "NULL",
    ]);
    let (_, ev) = build(&mut b, &layout, &encode::insert(1, &row), None);
    assert_eq!(
        ev.extra.get("version").map(String::as_str),
        Some("not-a-number")
    );
    assert_eq!(ev.extra.get("due_at").map(String::as_str), Some("infinity"));
    let Some(After::Task(task)) = ev.after else {
        panic!()
    };
    assert_eq!(task.due_at, Some(timestamp::MAX));
}

#[test]
fn other_tables_have_no_layout() {
    assert!(Layout::of(&Tables::default(), &relation("users", &["id"])).is_none());
    let mut other_schema = relation("tasks", &["id"]);
    other_schema.namespace = "audit".into();
    assert!(Layout::of(&Tables::default(), &other_schema).is_none());
}

/// Regression (issue 6, found by fuzz/assemble): a Begin whose commit time is
/// absurd (the wire carries any i64) produced a `commit_time` outside the
/// protobuf Timestamp range — an invalid event that `walcast tail` and
/// proto3-JSON consumers cannot render — and for the largest values the
/// Unix-micros conversion for lag metrics overflowed (a panic in debug
/// builds). The commit time is now clamped into range like row timestamps.
#[test]
fn absurd_commit_time_is_clamped_and_never_overflows() {
    let layout = task_layout();
    let row = text(&[
        "t1", "acme", "W", "todo", "1", "NULL", "NULL", "NULL", "NULL",
    ]);
    let bytes = encode::insert(1, &row);
    for (micros, want) in [
        (i64::MAX, timestamp::MAX),
        (i64::MIN, timestamp::MIN),
        (4_612_534_766_688_000_000, timestamp::MAX),
    ] {
        let mut b = EventBuilder::new("walcast", Sequencer::default());
        let mut ctx = tx(None);
        ctx.commit_time = timestamp::from_pg_micros(micros);
        let out = b.build(
            &ctx,
            0,
            &layout,
            Change::Insert {
                new: decode_new(&bytes),
            },
        );
        let ev = ChangeEvent::decode(out.payload.clone()).unwrap();
        assert_eq!(ev.commit_time, Some(want), "commit time {micros}");
        let truncated = b.truncate(&ctx, 1, &layout);
        assert_eq!(
            ChangeEvent::decode(truncated.payload).unwrap().commit_time,
            Some(want)
        );
    }
}

/// Every column a table's layout knows, plus one it does not.
fn full_layout(table: &str) -> Layout {
    let cols: &[&str] = match table {
        "tasks" => &[
            "id",
            "tenant_id",
            "project_id",
            "title",
            "description",
            "status",
            "priority",
            "assignee",
            "due_at",
            "completed_at",
            "version",
            "created_at",
            "updated_at",
            "updated_by",
            "actor_type",
            "client_id",
            "metadata",
            "mood",
        ],
        "projects" => &[
            "id",
            "tenant_id",
            "name",
            "description",
            "status",
            "version",
            "created_at",
            "updated_at",
            "updated_by",
            "actor_type",
            "client_id",
            "metadata",
            "mood",
        ],
        _ => &[
            "tenant_id",
            "record_type",
            "record_id",
            "locked_by",
            "locked_at",
            "expires_at",
            "mood",
        ],
    };
    Layout::of(&Tables::default(), &relation(table, cols)).unwrap()
}

/// Column values that exercise every presence rule and type check: empty
/// text, numbers in and out of range, exact, inexact and unparsable
/// timestamps (before 1970 too), NULL and unchanged TOAST.
const VALUES: &[&str] = &[
    "NULL",
    "TOAST",
    "",
    "acme",
    "done",
    "archived",
    "héllo wörld",
    "0",
    "-7",
    "2147483648",
    "9223372036854775808",
    "2024-02-01 00:00:00+00",
    "2024-02-01 00:00:00.123456+00",
    "1969-12-31 23:59:59.5+00",
    "2024-02-01 00:00:00+05:30",
    "infinity",
    "not a time",
];

proptest::proptest! {
    /// The wire encoder writes what the generated types would have: decoded
    /// with them, every event equals the one built through them (and its
    /// bytes are prost's, unless `extra`'s order may differ).
    #[test]
    fn wire_events_decode_to_the_generated_types_event(
        table in proptest::sample::select(vec!["tasks", "projects", "editing_locks"]),
        kind in 0..4u8,
        picks in proptest::collection::vec((0..VALUES.len(), 0..VALUES.len()), 18),
        actor in proptest::option::of((
            proptest::option::of("[a-z]{0,3}"),
            proptest::option::of("[a-z]{0,3}"),
            proptest::option::of("[a-z]{0,3}"),
        )),
    ) {
        let layout = full_layout(table);
        let n = layout.names.len();
        let old: Vec<&str> = picks[..n].iter().map(|(o, _)| VALUES[*o]).collect();
        let new: Vec<&str> = picks[..n].iter().map(|(_, v)| VALUES[*v]).collect();
        // An old image never holds unchanged TOAST; a new one only on update.
        let no_toast = |v: &Vec<&'static str>| -> Vec<&'static str> {
            v.iter().map(|s| if *s == "TOAST" { "NULL" } else { *s }).collect()
        };
        let (old, new) = (text(&no_toast(&old)), text(&new));
        let bytes = match kind {
            0 => encode::insert(1, &old),
            1 => encode::update(1, Some(&old), &new),
            2 => encode::update(1, None, &new),
            _ => encode::delete(1, &old),
        };
        let actor = actor.map(|(actor_type, actor_id, client_id)| Actor {
            actor_type,
            actor_id,
            client_id,
        });
        let mut b = EventBuilder::new("walcast", Sequencer::default());
        let (out, event) = build(&mut b, &layout, &bytes, actor.clone());
        let change = match decode::decode(&bytes).unwrap() {
            Message::Insert(i) => Change::Insert { new: i.new },
            Message::Update(u) => Change::Update { old: u.old, key_only: u.key_only, new: u.new },
            Message::Delete(d) => Change::Delete { old: d.old, key_only: d.key_only },
            other => panic!("not a change: {other:?}"),
        };
        let expected = reference::event(&tx(actor), 3, &layout, change, event.seq);
        proptest::prop_assert_eq!(&event, &expected);
        if expected.extra.len() <= 1 {
            // Byte for byte too, where prost's map order cannot differ.
            proptest::prop_assert_eq!(&out.payload[..], &expected.encode_to_vec()[..]);
        }
        proptest::prop_assert_eq!(out.event_id, expected.event_id);
        proptest::prop_assert_eq!(out.commit_lsn.0, expected.commit_lsn);
    }
}

#[test]
fn own_ids_are_the_running_maximum_of_event_ids() {
    let id = |lsn, i| Some((Lsn(lsn), i));
    let mut own = OwnIds::after(None, (Lsn(0x20), 0));
    assert!(!own.admits(id(0x10, 0)), "before the floor");
    assert!(own.admits(id(0x20, 0)));
    assert!(own.admits(id(0x20, 1)));
    assert!(!own.admits(None), "no event id");
    assert!(!own.admits(id(0x20, 0)), "a copy of an earlier event");
    assert!(!own.admits(id(0x20, 1)), "a copy of the last one");
    assert!(own.admits(id(0x30, 0)));
    let mut from_known = OwnIds::after(id(0x30, 0), (Lsn(0), 0));
    assert!(!from_known.admits(id(0x25, 0)));
    assert!(from_known.admits(id(0x31, 0)));
}
