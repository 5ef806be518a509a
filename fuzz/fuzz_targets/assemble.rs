//! The whole read side after the wire: decode → assemble → build events, on
//! arbitrary message sequences. The input is a list of `[u16 length][bytes]`
//! pgoutput messages; the harness first sends Relation messages for the
//! three source tables (REPLICA IDENTITY chosen by the first byte) and a
//! Begin, and closes with a Commit. Properties, for every built event:
//! - nothing panics (overflow included);
//! - the payload is a valid `ChangeEvent` whose id is its WAL position;
//! - a tenant subject only ever carries a valid tenant id, and each tenant's
//!   seq is 1, 2, 3, ... in build order; everything else goes to
//!   `_deadletter` / `_truncated` without a seq;
//! - an unchanged-TOAST column that no before-image fills is listed in
//!   `unchanged_fields` (never silently empty);
//! - typed timestamps lie in the protobuf range.
#![no_main]

use std::collections::HashMap;

use libfuzzer_sys::fuzz_target;
use prost::Message as _;
use walcast::assemble::Assembler;
use walcast::decode::{Column, Message, Relation, ReplicaIdentity, Value, decode};
use walcast::events::{EventBuilder, Route, Sequencer, Tables, parse_event_id, tenant};
use walcast::handoff::Item;
use walcast::lsn::Lsn;
use walcast::proto::change_event::After;
use walcast::proto::{Action, ChangeEvent, Entity};

#[allow(dead_code)]
use walcast::decode::encode;

const TASKS: &[&str] = &[
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
];
const PROJECTS: &[&str] = &[
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
];
const LOCKS: &[&str] = &[
    "tenant_id",
    "record_type",
    "record_id",
    "locked_by",
    "locked_at",
    "expires_at",
];

fn relation(oid: u32, name: &str, cols: &[&str], identity: ReplicaIdentity) -> Relation {
    Relation {
        oid,
        namespace: "public".into(),
        name: name.into(),
        replica_identity: identity,
        columns: cols
            .iter()
            .map(|c| Column {
                name: c.to_string(),
                type_oid: 25,
                type_modifier: -1,
                is_key: *c == "id",
            })
            .collect(),
    }
}

fn messages(data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while rest.len() >= 2 {
        let len = usize::from(u16::from_be_bytes([rest[0], rest[1]]));
        let body = &rest[2..];
        let take = len.min(body.len());
        out.push(&body[..take]);
        rest = &body[take..];
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let identity = match mode % 4 {
        0 => ReplicaIdentity::Full,
        1 => ReplicaIdentity::Default,
        2 => ReplicaIdentity::Nothing,
        _ => ReplicaIdentity::Index,
    };
    let mut assembler = Assembler::new(
        Tables::default(),
        EventBuilder::new("walcast", Sequencer::default()),
        Lsn(0),
    );
    let mut columns: HashMap<u32, Vec<String>> = HashMap::new();
    let mut prelude = Vec::new();
    for (oid, name, cols) in [
        (16001, "tasks", TASKS),
        (16002, "projects", PROJECTS),
        (16003, "editing_locks", LOCKS),
    ] {
        let mut bytes = Vec::new();
        encode::relation(&mut bytes, &relation(oid, name, cols, identity));
        prelude.push(bytes);
    }
    let mut begin = vec![b'B'];
    begin.extend_from_slice(&0x1_0000_0000u64.to_be_bytes());
    begin.extend_from_slice(&800_000_000_000_000i64.to_be_bytes());
    begin.extend_from_slice(&1234u32.to_be_bytes());
    prelude.push(begin);
    let mut commit = vec![b'C', 0];
    commit.extend_from_slice(&0x1_0000_0000u64.to_be_bytes());
    commit.extend_from_slice(&0x1_0000_0100u64.to_be_bytes());
    commit.extend_from_slice(&800_000_000_000_000i64.to_be_bytes());

    let fuzzed = messages(data);
    let all = prelude
        .iter()
        .map(Vec::as_slice)
        .chain(fuzzed)
        .chain(std::iter::once(commit.as_slice()));
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    for bytes in all {
        let Ok(msg) = decode(bytes) else { continue };
        let expect_missing = expected_unchanged(&msg, &columns);
        if let Message::Relation(r) = &msg {
            columns.insert(r.oid, r.columns.iter().map(|c| c.name.clone()).collect());
        }
        out.clear();
        if assembler.handle(msg, &mut out).is_err() {
            continue;
        }
        for item in &out {
            let Item::Event(e) = item else { continue };
            let event = ChangeEvent::decode(e.payload.clone()).expect("payload is a ChangeEvent");
            assert_eq!(event.event_id, e.event_id);
            assert_eq!(
                parse_event_id(&e.event_id),
                Some((Lsn(event.commit_lsn), event.tx_index))
            );
            assert_ne!(event.entity(), Entity::Unspecified);
            assert_ne!(event.action(), Action::Unspecified);
            match &e.route {
                Route::Tenant { tenant: t, seq } => {
                    assert_eq!(tenant::validate(Some(t)), Ok(&**t));
                    assert_eq!(event.tenant_id, **t);
                    let last = seqs.entry(t.to_string()).or_default();
                    *last += 1;
                    assert_eq!(seq.0, *last, "seq of tenant {t}");
                    assert_eq!(event.seq, seq.0);
                    assert_eq!(e.subject.split('.').count(), 4, "{}", e.subject);
                    assert!(e.subject.starts_with(&format!("walcast.{t}.")));
                }
                Route::DeadLetter { .. } => {
                    assert_eq!(e.subject, "walcast._deadletter");
                    assert_eq!(event.seq, 0);
                    assert!(
                        tenant::validate(Some(&event.tenant_id)).is_err()
                            || event.tenant_id.is_empty()
                    );
                }
                Route::System => {
                    assert_eq!(e.subject, "walcast._truncated");
                    assert_eq!(event.action(), Action::Truncated);
                }
            }
            if let Some(missing) = &expect_missing {
                for name in missing {
                    assert!(
                        event.unchanged_fields.contains(name),
                        "unchanged TOAST column {name} neither filled nor listed: {event:?}"
                    );
                }
            }
            check_timestamps(&event);
        }
    }
});

/// For an Update of a known relation: the columns whose new value is an
/// unchanged-TOAST marker that the old image cannot fill.
fn expected_unchanged(
    msg: &Message<'_>,
    columns: &HashMap<u32, Vec<String>>,
) -> Option<Vec<String>> {
    let Message::Update(u) = msg else { return None };
    let names = columns.get(&u.relation)?;
    let old: Vec<Value<'_>> = match (&u.old, u.key_only) {
        (Some(old), false) => old.iter().collect(),
        _ => Vec::new(),
    };
    let mut missing = Vec::new();
    for (i, v) in u.new.iter().enumerate() {
        let Some(name) = names.get(i) else { break };
        let filled = matches!(old.get(i), Some(Value::Text(b) | Value::Binary(b)) if std::str::from_utf8(b).is_ok());
        if v == Value::UnchangedToast && !filled {
            missing.push(name.clone());
        }
    }
    Some(missing)
}

fn check_timestamps(event: &ChangeEvent) {
    let ok = |t: &Option<pbjson_types::Timestamp>| {
        if let Some(t) = t {
            assert!(
                (-62_135_596_800..=253_402_300_799).contains(&t.seconds)
                    && (0..1_000_000_000).contains(&t.nanos),
                "timestamp out of the protobuf range: {t:?}"
            );
        }
    };
    ok(&event.commit_time);
    match &event.after {
        Some(After::Task(t)) => {
            for ts in [&t.due_at, &t.completed_at, &t.created_at, &t.updated_at] {
                ok(ts);
            }
        }
        Some(After::Project(p)) => {
            ok(&p.created_at);
            ok(&p.updated_at);
        }
        Some(After::Lock(l)) => {
            ok(&l.locked_at);
            ok(&l.expires_at);
        }
        None => {}
    }
}
