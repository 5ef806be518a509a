//! Oversized events (SPEC §3): never dropped, never split. The full event goes
//! to the object store bucket `<stream>_OVERSIZED` under its `event_id` first;
//! the stream message keeps subject, seq and headers, adds `Walcast-Object`,
//! and carries the event without its row images and `extra`.
//!
//! The rest of the event can be large too (a `walcast.actor` message is
//! application-controlled, an invalid tenant id or a lock's record type can
//! be any length). When even that stub does not fit, the stream message is
//! reduced to the event's key fields (bounded size) and says why in
//! `Walcast-Reason`: still on its tenant subject with its `seq`, so the
//! tenant's sequence has no gap, and the full event is in the object store
//! as for any oversized event. Publishing a message the server refuses would
//! be retried forever and stop the stream for every tenant.

use std::time::Duration;

use bytes::Bytes;
use prost::Message as _;

use super::PublishError;
use super::sink::{Bucket, Sink};
use crate::events::OutEvent;
use crate::headers::Headers;
use crate::proto::ChangeEvent;

/// Decides whether an event fits and stores it aside when it does not.
pub struct Oversized {
    pub bucket: Bucket,
    /// The server's `max_payload`, read once per batch ([`Oversized::refresh`]):
    /// reading it clones the client and the whole server info.
    max_payload: usize,
}

/// Room left for the NATS protocol line around headers and body.
const MARGIN: usize = 512;

impl Oversized {
    pub fn new(stream: &str, max_age: Duration, replicas: usize) -> Self {
        Self::to(Bucket {
            name: format!("{stream}_OVERSIZED"),
            max_age,
            replicas,
        })
    }

    /// Stores aside into `bucket` (the state's values go to their own).
    pub fn to(bucket: Bucket) -> Self {
        Oversized {
            bucket,
            max_payload: 0,
        }
    }

    /// Reads the connected server's `max_payload` (it may change with a
    /// reconnect to another server).
    pub(crate) fn refresh(&mut self, sink: &impl Sink) {
        self.max_payload = sink.max_payload();
    }

    /// The payload to publish: the event itself when it fits `max_payload`,
    /// else the stripped event (or, when even that does not fit, its key
    /// fields and a `Walcast-Reason`), after the full one is stored.
    pub(crate) async fn fit(
        &mut self,
        sink: &mut impl Sink,
        event: &OutEvent,
        headers: &mut Headers<'_>,
    ) -> Result<Bytes, PublishError> {
        if self.max_payload == 0 {
            self.refresh(sink);
        }
        let max_payload = self.max_payload;
        if event.payload.len() + headers.wire_len() + MARGIN <= max_payload {
            return Ok(event.payload.clone());
        }
        // Object store chunks are NATS messages too: they must fit max_payload.
        let chunk_size = (max_payload.saturating_sub(MARGIN)).clamp(1024, 128 * 1024);
        sink.put_object(&self.bucket, &event.event_id, &event.payload, chunk_size)
            .await?;
        headers.insert(
            crate::headers::OBJECT,
            format!("{}/{}", self.bucket.name, event.event_id),
        );
        let mut stub = ChangeEvent::decode(event.payload.clone()).map_err(|e| {
            PublishError::Nats(format!("re-decode oversized event {}: {e}", event.event_id))
        })?;
        stub.after = None;
        stub.before = None;
        stub.extra.clear();
        if stub.encoded_len() + headers.wire_len() + MARGIN <= max_payload {
            return Ok(Bytes::from(stub.encode_to_vec()));
        }
        // Even without row images the event does not fit: key fields only.
        let reason = match headers.get(crate::headers::REASON) {
            Some(dead_letter) => format!("{dead_letter}; {KEY_FIELDS_ONLY}"),
            None => KEY_FIELDS_ONLY.to_string(),
        };
        headers.insert(crate::headers::REASON, reason);
        let keys = key_fields(&stub);
        let needed = keys.encoded_len() + headers.wire_len() + MARGIN;
        if needed > max_payload {
            // Only with a server limit of about a kilobyte: nothing can be
            // published, retrying would not help.
            return Err(PublishError::Incompatible(format!(
                "NATS max_payload is {max_payload} bytes, but event {} needs {needed} even reduced to its key fields: raise max_payload in the nats-server configuration",
                event.event_id
            )));
        }
        tracing::warn!(
            event_id = %event.event_id,
            tenant = %keys.tenant_id,
            seq = keys.seq,
            bytes = event.payload.len(),
            max_payload,
            "oversized event: even its stub exceeds max_payload, so the stream message carries only the key fields; the full event is in the object store"
        );
        Ok(Bytes::from(keys.encode_to_vec()))
    }
}

/// `Walcast-Reason` of a stream message reduced to [`key_fields`].
pub const KEY_FIELDS_ONLY: &str =
    "stub exceeds max_payload: key fields only, the full event is in the object store";

/// Longest `tenant_id` / `entity_id` a key-fields stub keeps (a tenant id
/// that reaches a tenant subject has at most 128 bytes).
const KEY_FIELD_MAX: usize = 256;

/// The event reduced to fields of bounded size: ids, `seq`, entity, action,
/// commit position and time, `tx_index`, table. `tenant_id` and `entity_id`
/// are kept unless longer than [`KEY_FIELD_MAX`] (an invalid tenant id on a
/// dead letter, a lock's free-text record type); `actor`, `changed_fields`
/// and `unchanged_fields` are left out.
fn key_fields(event: &ChangeEvent) -> ChangeEvent {
    let bounded = |s: &String| {
        if s.len() <= KEY_FIELD_MAX {
            s.clone()
        } else {
            String::new()
        }
    };
    ChangeEvent {
        event_id: event.event_id.clone(),
        tenant_id: bounded(&event.tenant_id),
        seq: event.seq,
        entity: event.entity,
        action: event.action,
        entity_id: bounded(&event.entity_id),
        commit_lsn: event.commit_lsn,
        commit_time: event.commit_time,
        xid: event.xid,
        tx_index: event.tx_index,
        table: bounded(&event.table),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::Actor;

    #[test]
    fn key_fields_are_bounded_and_keep_the_position() {
        let mut event = ChangeEvent {
            event_id: "0000000001000000-00000002".into(),
            tenant_id: "acme".into(),
            seq: 7,
            entity_id: "8c8b2f6e-1f6b-4d7e-9c2a-4b9d7e4f0a11".into(),
            commit_lsn: 0x100_0000,
            xid: 42,
            tx_index: 2,
            actor: Some(Actor {
                actor_id: Some("a".repeat(300_000)),
                ..Default::default()
            }),
            changed_fields: vec!["x".repeat(100_000)],
            unchanged_fields: vec!["description".into()],
            table: "public.tasks".into(),
            ..Default::default()
        };
        let keys = key_fields(&event);
        assert!(keys.encoded_len() < 200, "{}", keys.encoded_len());
        assert_eq!(
            (&*keys.event_id, &*keys.tenant_id, keys.seq, keys.tx_index),
            ("0000000001000000-00000002", "acme", 7, 2)
        );
        assert_eq!(
            (&*keys.entity_id, &*keys.table),
            (&*event.entity_id, "public.tasks")
        );
        assert_eq!((keys.commit_lsn, keys.xid), (0x100_0000, 42));
        assert!(keys.actor.is_none() && keys.changed_fields.is_empty());
        assert!(keys.unchanged_fields.is_empty());

        // A dead letter's tenant id can be any length; a lock's entity id too.
        event.tenant_id = "t".repeat(1_000_000);
        event.entity_id = format!("{}:x", "r".repeat(1_000_000));
        let keys = key_fields(&event);
        assert!(keys.tenant_id.is_empty() && keys.entity_id.is_empty());
        assert!(keys.encoded_len() < 200);
    }
}
