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

/// What one stream event does to the state.
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

/// Only the fields the key needs: prost skips the rest of the event unread.
#[derive(Clone, PartialEq, prost::Message)]
struct KeyFields {
    #[prost(int32, tag = "4")]
    entity: i32,
    #[prost(string, tag = "6")]
    entity_id: String,
}

/// The write a stream message makes: `<prefix>.<tenant>.<entity>.<action>`
/// with its `Walcast-Tenant` header and a `ChangeEvent` body.
pub fn write_for(subject: &str, tenant: Option<&str>, payload: &Bytes) -> Result<Write, Skip> {
    if subject.ends_with("._truncated") {
        let fields =
            <KeyFields as prost::Message>::decode(payload.clone()).map_err(|_| Skip::NoTenant)?;
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
    let entity_id = <KeyFields as prost::Message>::decode(payload.clone())
        .map_err(|_| Skip::InvalidKey)?
        .entity_id;
    let key = row_key(tenant, entity, &entity_id).ok_or(Skip::InvalidKey)?;
    Ok(match action {
        "deleted" | "released" | "expired" => Write::Delete(key),
        _ => Write::Put(key),
    })
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
            let got = write_for(subject, Some("acme"), &event(entity_id));
            assert_eq!(got, want, "{subject} {entity_id:?}");
        }
        assert_eq!(
            write_for("walcast._deadletter", None, &event("x")),
            Err(Skip::NoTenant)
        );
        let truncate = crate::proto::ChangeEvent {
            entity: crate::proto::Entity::Lock as i32,
            ..Default::default()
        };
        assert_eq!(
            write_for(
                "walcast._truncated",
                None,
                &Bytes::from(truncate.encode_to_vec())
            ),
            Ok(Write::Truncate("lock"))
        );
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
