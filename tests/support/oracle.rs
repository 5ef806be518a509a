//! An independent log of committed changes, kept by Postgres itself through a
//! second logical slot with the built-in `test_decoding` plugin, so tests can
//! check the stream against something walcast had no part in: the n-th
//! change in commit order must be the n-th (tenant or dead-letter) stream
//! event — same transaction, same table, same key, same tenant, same kind of
//! operation and same position inside its transaction.

use tokio_postgres::Client;
use walcast::proto::{Action, Entity};

use super::daemon::StreamEvent;

/// A second logical slot (test_decoding, built in) that counts committed row
/// changes independently of walcast; create it before the workload.
pub async fn create_counter(client: &Client) {
    client
        .execute(
            "SELECT pg_create_logical_replication_slot('test_counter', 'test_decoding')",
            &[],
        )
        .await
        .unwrap();
}

/// How many events the committed changes so far must produce.
pub async fn count_events(client: &Client) -> u64 {
    let row = client
        .query_one(
            "SELECT count(*) FROM pg_logical_slot_peek_changes('test_counter', NULL, NULL)
             WHERE data ~ '^table public\\.(tasks|projects|editing_locks): (INSERT|UPDATE|DELETE)'",
            &[],
        )
        .await
        .unwrap();
    row.get::<_, i64>(0) as u64
}

/// Kind of row operation, as the WAL says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Insert,
    Update,
    Delete,
}

impl Op {
    /// The operation an event's action stands for (SPEC §2).
    pub fn of_action(action: Action) -> Option<Op> {
        match action {
            Action::Created | Action::Acquired => Some(Op::Insert),
            Action::Updated
            | Action::Completed
            | Action::Archived
            | Action::Refreshed
            | Action::Transferred => Some(Op::Update),
            Action::Deleted | Action::Released | Action::Expired => Some(Op::Delete),
            Action::Unspecified | Action::Truncated => None,
        }
    }
}

/// One committed row change of a source table, from test_decoding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub xid: u64,
    /// `tasks`, `projects` or `editing_locks`.
    pub table: String,
    pub op: Op,
    /// Task/project id, or `<record_type>:<record_id>` for a lock (the
    /// event's `entity_id`).
    pub key: String,
    pub tenant: String,
    /// Position among the transaction's source-table changes (`tx_index`).
    pub index: u32,
    /// End of the transaction's commit record: once the slot's confirmed
    /// position reaches it, walcast may never be sent this change again.
    pub commit_end: u64,
}

/// The independent log: a test_decoding slot created before any change the
/// test makes.
pub struct Oracle {
    slot: String,
}

impl Oracle {
    /// Creates the slot `oracle`; call it before the workload starts (after
    /// walcast's own slot exists, i.e. after `walcast migrate`).
    pub async fn create(client: &Client) -> Oracle {
        let slot = "oracle".to_string();
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'test_decoding')",
                &[&slot],
            )
            .await
            .expect("create the test_decoding oracle slot");
        Oracle { slot }
    }

    /// Every committed change of the three source tables so far, in commit
    /// order (peeked: the slot keeps them).
    pub async fn changes(&self, client: &Client) -> Vec<Change> {
        let rows = client
            .query(
                "SELECT lsn::text, xid::text, data FROM pg_logical_slot_peek_changes($1, NULL, NULL,
                    'include-xids', '1', 'skip-empty-xacts', '1')",
                &[&self.slot],
            )
            .await
            .expect("peek the oracle slot");
        let mut out: Vec<Change> = Vec::new();
        let mut index = 0u32;
        let mut tx_start = 0;
        for row in rows {
            let xid: u64 = row.get::<_, &str>(1).parse().expect("xid is a number");
            let data: &str = row.get(2);
            if data.starts_with("BEGIN") {
                index = 0;
                tx_start = out.len();
                continue;
            }
            if data.starts_with("COMMIT") {
                // The COMMIT row's lsn is the end of the commit record.
                let end = walcast::lsn::Lsn::parse(row.get::<_, &str>(0))
                    .expect("commit lsn")
                    .0;
                for change in &mut out[tx_start..] {
                    change.commit_end = end;
                }
                continue;
            }
            if let Some(change) = parse_change(xid, index, data) {
                index += 1;
                out.push(change);
            }
        }
        out
    }
}

/// Parses one test_decoding line; `None` for tables that are not sources
/// (walcast's own checkpoint tables, the test's noise tables).
pub fn parse_change(xid: u64, index: u32, data: &str) -> Option<Change> {
    let rest = data.strip_prefix("table public.")?;
    let (table, rest) = rest.split_once(": ")?;
    if !matches!(table, "tasks" | "projects" | "editing_locks") {
        return None;
    }
    let (op, tuple_text) = if let Some(t) = rest.strip_prefix("INSERT:") {
        (Op::Insert, t)
    } else if let Some(t) = rest.strip_prefix("DELETE:") {
        (Op::Delete, t)
    } else if let Some(t) = rest.strip_prefix("UPDATE:") {
        (Op::Update, t)
    } else {
        panic!("unexpected test_decoding change on a source table: {data}");
    };
    let columns = match op {
        Op::Update => {
            let mut tuples = parse_tuples(tuple_text);
            // With REPLICA IDENTITY FULL: "old-key: <old> new-tuple: <new>".
            tuples.pop().expect("an update has a new tuple")
        }
        _ => parse_tuples(tuple_text)
            .pop()
            .expect("a change has a tuple"),
    };
    let col = |name: &str| -> String {
        columns
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("column {name} missing in test_decoding line: {data}"))
    };
    let key = match table {
        "editing_locks" => format!("{}:{}", col("record_type"), col("record_id")),
        _ => col("id"),
    };
    Some(Change {
        xid,
        table: table.to_string(),
        op,
        key,
        tenant: col("tenant_id"),
        index,
        commit_end: 0,
    })
}

/// Splits ` old-key: <tuple> new-tuple: <tuple>` (or one ` <tuple>`) into
/// tuples of `(column, value)`, values unquoted.
fn parse_tuples(text: &str) -> Vec<Vec<(String, String)>> {
    let mut tuples = vec![Vec::new()];
    let mut rest = text;
    loop {
        rest = rest.trim_start_matches(' ');
        if rest.is_empty() {
            break;
        }
        if let Some(r) = rest.strip_prefix("old-key:") {
            rest = r;
            continue;
        }
        if let Some(r) = rest.strip_prefix("new-tuple:") {
            tuples.push(Vec::new());
            rest = r;
            continue;
        }
        let open = rest.find('[').expect("column name ends with [type]");
        let name = rest[..open].to_string();
        let close = rest[open..].find("]:").expect("type ends with ]:") + open;
        rest = &rest[close + 2..];
        let value;
        if let Some(quoted) = rest.strip_prefix('\'') {
            // '...' with '' for a quote inside.
            let bytes = quoted.as_bytes();
            let mut i = 0;
            let mut v = String::new();
            loop {
                let next = quoted[i..].find('\'').expect("closing quote") + i;
                v.push_str(&quoted[i..next]);
                if bytes.get(next + 1) == Some(&b'\'') {
                    v.push('\'');
                    i = next + 2;
                } else {
                    i = next + 1;
                    break;
                }
            }
            value = v;
            rest = &quoted[i..];
        } else {
            let end = rest.find(' ').unwrap_or(rest.len());
            value = rest[..end].to_string();
            rest = &rest[end..];
        }
        tuples.last_mut().expect("a tuple").push((name, value));
    }
    tuples
}

fn table_of(entity: Entity) -> &'static str {
    match entity {
        Entity::Task => "tasks",
        Entity::Project => "projects",
        Entity::Lock => "editing_locks",
        Entity::Unspecified => "?",
    }
}

/// Asserts that the stream's row events are exactly the oracle's changes,
/// one to one, in order. Table-wide (`._truncated`) events are not row
/// changes and are left out. Returns how many were compared.
pub fn assert_matches_oracle(events: &[StreamEvent], changes: &[Change]) -> usize {
    let n = assert_prefix_of_oracle(events, changes);
    if n != changes.len() {
        panic!(
            "the stream has {n} row events but {} changes were committed (first missing: {:?})",
            changes.len(),
            changes.get(n)
        );
    }
    n
}

/// Asserts that the stream's row events are the first changes of the
/// oracle, one to one, in order (walcast may still be behind). Returns how
/// many were compared.
pub fn assert_prefix_of_oracle(events: &[StreamEvent], changes: &[Change]) -> usize {
    let rows: Vec<&StreamEvent> = events
        .iter()
        .filter(|m| !m.subject.ends_with("._truncated"))
        .collect();
    for (n, (m, c)) in rows.iter().zip(changes).enumerate() {
        let e = &m.event;
        let what = || {
            format!(
                "stream event #{n} ({} {}, stream seq {}) vs committed change #{n} {c:?}",
                e.event_id, m.subject, m.stream_seq
            )
        };
        assert_eq!(e.xid, c.xid, "wrong transaction: {}", what());
        assert_eq!(table_of(e.entity()), c.table, "wrong table: {}", what());
        assert_eq!(e.entity_id, c.key, "wrong row: {}", what());
        assert_eq!(e.tenant_id, c.tenant, "wrong tenant: {}", what());
        assert_eq!(
            Op::of_action(e.action()),
            Some(c.op),
            "action {:?} is not a {:?}: {}",
            e.action(),
            c.op,
            what()
        );
        assert_eq!(e.tx_index, c.index, "wrong tx_index: {}", what());
    }
    if rows.len() > changes.len() {
        let first_extra = &rows[changes.len()];
        panic!(
            "the stream has {} row events but only {} changes were committed; first extra: {} (stream seq {})",
            rows.len(),
            changes.len(),
            first_extra.event.event_id,
            first_extra.stream_seq
        );
    }
    rows.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_test_decoding_lines() {
        let c = parse_change(
            7,
            0,
            "table public.tasks: UPDATE: old-key: id[uuid]:'a' tenant_id[text]:'t1' title[text]:'it''s new-tuple: x' priority[integer]:null new-tuple: id[uuid]:'b' tenant_id[text]:'t2' due_at[timestamp with time zone]:'2026-01-01 00:00:00+00'",
        )
        .unwrap();
        assert_eq!(
            (c.key.as_str(), c.tenant.as_str(), c.op),
            ("b", "t2", Op::Update)
        );
        let c = parse_change(
            7,
            1,
            "table public.editing_locks: DELETE: tenant_id[text]:'t' record_type[text]:'task' record_id[uuid]:'r' locked_by[text]:'u'",
        )
        .unwrap();
        assert_eq!(c.key, "task:r");
        assert!(parse_change(1, 0, "table walcast.checkpoints: UPDATE: slot[text]:'w'").is_none());
    }
}
