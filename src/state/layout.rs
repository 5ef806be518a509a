//! The state bucket's layout (docs/STATE.md): which key a row has, what a
//! stream event does to it, and the headers every write carries.
//!
//! Invariant owned here: a tenant id or an entity id reaches a key only as a
//! valid key token (`[-/_=a-zA-Z0-9]+`); anything else is left out of the
//! state, never written under a mangled key.

use async_nats::HeaderMap;
use bytes::Bytes;

use crate::headers::{CONTENT_TYPE, Headers, PROTOBUF, SEQ, STREAM_SEQ};

/// The readiness marker (two tokens: no row key has fewer than three).
pub const MARKER_KEY: &str = "_walcast.backfill";

/// The write one stream event makes to its row's key.
#[derive(Debug, PartialEq, Eq)]
pub enum Write {
    /// The row's key now holds this event.
    Put(String),
    /// The row is gone: a delete marker.
    Delete(String),
    /// A TRUNCATE: every row of this entity (`task`, `project`, `lock`) is gone.
    Truncate(&'static str),
}

/// Why an event leaves the state alone (a metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Skip {
    /// A dead letter or a table-wide event: no tenant.
    NoTenant,
    /// The tenant or entity id cannot be a key token.
    InvalidKey,
}

impl Skip {
    pub fn label(self) -> &'static str {
        match self {
            Skip::NoTenant => "no_tenant",
            Skip::InvalidKey => "invalid_key",
        }
    }
}

/// Only the fields the keys need: prost skips the rest of the event unread
/// (and, in a row image, every column but the key's).
#[derive(Clone, PartialEq, prost::Message)]
struct KeyFields {
    #[prost(int32, tag = "4")]
    entity: i32,
    #[prost(string, tag = "6")]
    entity_id: String,
    #[prost(message, optional, tag = "16")]
    task_before: Option<RowKey>,
    #[prost(message, optional, tag = "17")]
    project_before: Option<RowKey>,
    #[prost(message, optional, tag = "18")]
    lock_before: Option<LockKey>,
}

/// A task's or project's key columns (as bytes: slices of the message,
/// nothing copied for the common update that keeps its key).
#[derive(Clone, PartialEq, prost::Message)]
struct RowKey {
    #[prost(bytes = "bytes", tag = "1")]
    id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    tenant_id: Bytes,
}

/// An editing lock's key columns.
#[derive(Clone, PartialEq, prost::Message)]
struct LockKey {
    #[prost(bytes = "bytes", tag = "1")]
    tenant_id: Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    record_type: Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    record_id: Bytes,
}

impl KeyFields {
    /// The key of the row's before image, if it is not the event's own
    /// row's. A before image of the key columns only (replica identity not
    /// FULL) has no tenant: the row kept the event's.
    fn moved_from(&self, tenant: Option<&str>) -> Option<String> {
        fn text(b: &Bytes) -> Option<&str> {
            std::str::from_utf8(b).ok()
        }
        fn tenant_of<'a>(own: &'a Bytes, tenant: Option<&'a str>) -> Option<&'a str> {
            if own.is_empty() { tenant } else { text(own) }
        }
        if let Some(lock) = &self.lock_before {
            let (record_type, record_id) = (text(&lock.record_type)?, text(&lock.record_id)?);
            let before = tenant_of(&lock.tenant_id, tenant)?;
            let own = self.entity_id.rsplit_once(':') == Some((record_type, record_id));
            return (Some(before) != tenant || !own)
                .then(|| row_key(before, "lock", &format!("{record_type}:{record_id}")))?;
        }
        let (entity, row) = match (&self.task_before, &self.project_before) {
            (Some(row), _) => ("task", row),
            (None, Some(row)) => ("project", row),
            (None, None) => return None,
        };
        let (before, id) = (tenant_of(&row.tenant_id, tenant)?, text(&row.id)?);
        (Some(before) != tenant || id != self.entity_id).then(|| row_key(before, entity, id))?
    }
}

/// What one stream event does to the state.
#[derive(Debug, PartialEq, Eq)]
pub struct Effect {
    /// The write of the row's key, or why there is none.
    pub write: Result<Write, Skip>,
    /// The key the row had before this event, when it is not the key
    /// written: an UPDATE that changed the row's tenant or id (or made it a
    /// dead letter) left it. It becomes a delete marker, or loads of its
    /// tenant would keep the row for good.
    pub vacated: Option<String>,
}

impl Effect {
    /// Whether the event may have moved its row (a delete or a TRUNCATE
    /// cannot): an oversized one's stub cannot say.
    pub fn may_move(&self) -> bool {
        !matches!(self.write, Ok(Write::Delete(_) | Write::Truncate(_)))
    }
}

/// What a stream message does to the state: `<prefix>.<tenant>.<entity>.<action>`
/// with its `Walcast-Tenant` header and a `ChangeEvent` body (the full one:
/// an oversized event's stub has no before image).
pub fn effect(subject: &str, tenant: Option<&str>, payload: &Bytes) -> Effect {
    let fields = <KeyFields as prost::Message>::decode(payload.clone()).ok();
    let write = write_for(subject, tenant, fields.as_ref());
    let vacated = fields
        .filter(|_| !subject.ends_with("._truncated"))
        .and_then(|fields| fields.moved_from(tenant));
    Effect { write, vacated }
}

/// The write of the event's own key.
fn write_for(
    subject: &str,
    tenant: Option<&str>,
    fields: Option<&KeyFields>,
) -> Result<Write, Skip> {
    if subject.ends_with("._truncated") {
        let fields = fields.ok_or(Skip::NoTenant)?;
        let entity = crate::proto::Entity::try_from(fields.entity).map_err(|_| Skip::NoTenant)?;
        return match entity {
            crate::proto::Entity::Unspecified => Err(Skip::NoTenant),
            e => Ok(Write::Truncate(crate::events::action::entity_token(e))),
        };
    }
    let tenant = tenant.ok_or(Skip::NoTenant)?;
    let mut tokens = subject.rsplit('.');
    let (Some(action), Some(entity)) = (tokens.next(), tokens.next()) else {
        return Err(Skip::NoTenant);
    };
    let entity_id = &fields.ok_or(Skip::InvalidKey)?.entity_id;
    let key = row_key(tenant, entity, entity_id).ok_or(Skip::InvalidKey)?;
    Ok(match action {
        "deleted" | "released" | "expired" => Write::Delete(key),
        _ => Write::Put(key),
    })
}

/// Where a value's event was committed.
#[derive(Clone, PartialEq, prost::Message)]
struct CommitFields {
    #[prost(uint64, tag = "7")]
    commit_lsn: u64,
    #[prost(uint32, tag = "10")]
    tx_index: u32,
}

/// `(commit_lsn, tx_index)` of a value's event (a backfilled row's
/// `commit_lsn` is its snapshot's); `(0, 0)` if the body is no event.
pub fn commit_of(payload: &Bytes) -> (u64, u32) {
    <CommitFields as prost::Message>::decode(payload.clone())
        .map_or((0, 0), |c| (c.commit_lsn, c.tx_index))
}

/// Whether a key's value — of `seq`, its event committed at `held` — is
/// older than the event committed at `event`. A backfilled row (`seq` 0)
/// was copied from a snapshot taken at `held.0`, past every commit it saw:
/// an event committed at or after it had not happened to the copied row.
pub fn precedes(seq: u64, held: (u64, u32), event: (u64, u32)) -> bool {
    if seq == 0 {
        held.0 <= event.0
    } else {
        held < event
    }
}

/// `<tenant>.task.<id>`, `<tenant>.project.<id>`,
/// `<tenant>.lock.<record_type>.<record_id>` (a lock's entity id is
/// `<record_type>:<record_id>`).
pub fn row_key(tenant: &str, entity: &str, entity_id: &str) -> Option<String> {
    let tokens: Vec<&str> = match entity {
        "lock" => {
            let (record_type, record_id) = entity_id.rsplit_once(':')?;
            vec![tenant, entity, record_type, record_id]
        }
        "task" | "project" => vec![tenant, entity, entity_id],
        _ => return None,
    };
    tokens
        .iter()
        .all(|t| valid_token(t))
        .then(|| tokens.join("."))
}

fn valid_token(token: &str) -> bool {
    !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'/' | b'='))
}

/// The headers of a value or delete marker.
pub fn headers(seq: u64, stream_seq: u64) -> Headers<'static> {
    let mut headers = Headers::new();
    headers.insert(SEQ, seq);
    headers.insert(CONTENT_TYPE, PROTOBUF);
    headers.insert(STREAM_SEQ, stream_seq);
    headers
}

/// The applied position an entry of the bucket carries ([`STREAM_SEQ`]).
pub fn stream_seq_of(headers: Option<&HeaderMap>) -> Option<u64> {
    headers?.get(STREAM_SEQ)?.as_str().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    fn event(entity_id: &str) -> Bytes {
        let event = crate::proto::ChangeEvent {
            entity_id: entity_id.into(),
            tenant_id: "acme".into(),
            seq: 7,
            ..Default::default()
        };
        Bytes::from(event.encode_to_vec())
    }

    #[test]
    fn keys_follow_the_spec() {
        let id = "0b5e8c9e-1f1a-4c55-9d7e-7c1b2a3d4e5f";
        let cases = [
            (
                "walcast.acme.task.created",
                id,
                Ok(Write::Put(format!("acme.task.{id}"))),
            ),
            (
                "walcast.acme.project.deleted",
                id,
                Ok(Write::Delete(format!("acme.project.{id}"))),
            ),
            (
                "walcast.acme.lock.transferred",
                &format!("task:{id}") as &str,
                Ok(Write::Put(format!("acme.lock.task.{id}"))),
            ),
            (
                "walcast.acme.lock.expired",
                "task:x",
                Ok(Write::Delete("acme.lock.task.x".into())),
            ),
            ("walcast.acme.lock.released", "a b:x", Err(Skip::InvalidKey)),
            ("walcast.acme.task.updated", "", Err(Skip::InvalidKey)),
            ("walcast.acme.task.updated", "a.b", Err(Skip::InvalidKey)),
        ];
        for (subject, entity_id, want) in cases {
            let got = effect(subject, Some("acme"), &event(entity_id)).write;
            assert_eq!(got, want, "{subject} {entity_id:?}");
        }
        assert_eq!(
            effect("walcast._deadletter", None, &event("x")),
            Effect {
                write: Err(Skip::NoTenant),
                vacated: None
            }
        );
        let truncate = crate::proto::ChangeEvent {
            entity: crate::proto::Entity::Lock as i32,
            ..Default::default()
        };
        assert_eq!(
            effect(
                "walcast._truncated",
                None,
                &Bytes::from(truncate.encode_to_vec())
            ),
            Effect {
                write: Ok(Write::Truncate("lock")),
                vacated: None
            }
        );
    }

    /// An event whose before image is `before` (a task's key columns, or a
    /// lock's with `lock`).
    fn moved(entity_id: &str, before: crate::proto::change_event::Before) -> Bytes {
        let event = crate::proto::ChangeEvent {
            entity_id: entity_id.into(),
            before: Some(before),
            ..Default::default()
        };
        Bytes::from(event.encode_to_vec())
    }

    fn task(tenant: &str, id: &str) -> crate::proto::change_event::Before {
        crate::proto::change_event::Before::TaskBefore(Box::new(crate::proto::Task {
            id: id.into(),
            tenant_id: tenant.into(),
            title: "kept out of the key".into(),
            ..Default::default()
        }))
    }

    #[test]
    fn a_row_whose_key_changed_vacates_its_old_key() {
        let vacated = |subject, tenant, payload| effect(subject, tenant, &payload).vacated;
        let updated = "walcast.acme.task.updated";
        // Same key: nothing vacated (updates, deletes).
        assert_eq!(
            vacated(updated, Some("acme"), moved("a", task("acme", "a"))),
            None
        );
        assert_eq!(
            vacated(
                "walcast.acme.task.deleted",
                Some("acme"),
                moved("a", task("acme", "a"))
            ),
            None
        );
        // The tenant changed, or the id.
        assert_eq!(
            vacated(updated, Some("acme"), moved("a", task("beta", "a"))),
            Some("beta.task.a".into())
        );
        assert_eq!(
            vacated(updated, Some("acme"), moved("b", task("acme", "a"))),
            Some("acme.task.a".into())
        );
        // A before image of the key columns only: the event's tenant.
        assert_eq!(
            vacated(updated, Some("acme"), moved("b", task("", "a"))),
            Some("acme.task.a".into())
        );
        // Now a dead letter, or with an id no key can hold: the old key goes.
        assert_eq!(
            vacated("walcast._deadletter", None, moved("a", task("acme", "a"))),
            Some("acme.task.a".into())
        );
        assert_eq!(
            vacated(updated, Some("acme"), moved("a.b", task("acme", "a"))),
            Some("acme.task.a".into())
        );
        // The old key was never a key (a dead letter's tenant, a bad id).
        assert_eq!(
            vacated(updated, Some("acme"), moved("a", task("x.y", "a"))),
            None
        );
        assert_eq!(
            vacated(updated, Some("acme"), moved("a", task("acme", "a b"))),
            None
        );
        // Locks: the record changed.
        let lock =
            crate::proto::change_event::Before::LockBefore(Box::new(crate::proto::EditingLock {
                tenant_id: "acme".into(),
                record_type: "task".into(),
                record_id: "a".into(),
                ..Default::default()
            }));
        assert_eq!(
            vacated(
                "walcast.acme.lock.transferred",
                Some("acme"),
                moved("task:b", lock.clone())
            ),
            Some("acme.lock.task.a".into())
        );
        assert_eq!(
            vacated(
                "walcast.acme.lock.refreshed",
                Some("acme"),
                moved("task:a", lock)
            ),
            None
        );
    }

    #[test]
    fn only_a_value_from_before_the_event_is_vacated() {
        // Events: commit order, then position in the transaction.
        assert!(precedes(3, (100, 0), (200, 0)));
        assert!(precedes(3, (200, 0), (200, 1)));
        assert!(!precedes(3, (200, 1), (200, 1)));
        assert!(!precedes(3, (300, 0), (200, 5)));
        // A backfilled row: copied before the event unless its snapshot saw it.
        assert!(precedes(0, (200, 0), (200, 0)));
        assert!(!precedes(0, (201, 0), (200, 0)));
        let event = crate::proto::ChangeEvent {
            commit_lsn: 77,
            tx_index: 2,
            ..Default::default()
        };
        assert_eq!(commit_of(&Bytes::from(event.encode_to_vec())), (77, 2));
    }

    #[test]
    fn headers_round_trip_the_position() {
        let block = headers(5, 1234).block();
        let text = std::str::from_utf8(&block).unwrap();
        assert!(text.contains("\r\nWalcast-Seq: 5\r\n"), "{text}");
        assert!(text.contains("\r\nWalcast-Stream-Seq: 1234\r\n"), "{text}");
        let mut read = HeaderMap::new();
        read.insert(STREAM_SEQ, "1234");
        assert_eq!(stream_seq_of(Some(&read)), Some(1234));
        assert_eq!(stream_seq_of(None), None);
    }
}
