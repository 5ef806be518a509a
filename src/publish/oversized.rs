//! Oversized events (SPEC §3): never dropped, never split. The full event goes
//! to the object store bucket `<stream>_OVERSIZED` under its `event_id` first;
//! the stream message keeps subject, seq and headers, adds `Walcast-Object`,
//! and carries the event without its row images and `extra`.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, object_store};
use bytes::Bytes;
use prost::Message as _;

use super::PublishError;
use crate::events::OutEvent;
use crate::proto::ChangeEvent;

/// Decides whether an event fits and stores it aside when it does not.
pub struct Oversized {
    pub bucket_name: String,
    pub max_age: Duration,
    pub replicas: usize,
    bucket: Option<object_store::ObjectStore>,
}

/// Room left for the NATS protocol line around headers and body.
const MARGIN: usize = 512;

impl Oversized {
    pub fn new(stream: &str, max_age: Duration, replicas: usize) -> Self {
        Oversized {
            bucket_name: format!("{stream}_OVERSIZED"),
            max_age,
            replicas,
            bucket: None,
        }
    }

    /// The payload to publish: the event itself when it fits `max_payload`,
    /// else the stripped event, after the full one is stored.
    pub async fn fit(
        &mut self,
        js: &jetstream::Context,
        event: &OutEvent,
        headers: &mut HeaderMap,
    ) -> Result<Bytes, PublishError> {
        let max_payload = js_max_payload(js);
        if event.payload.len() + header_len(headers) + MARGIN <= max_payload {
            return Ok(event.payload.clone());
        }
        let bucket = self.bucket(js).await?;
        let mut reader: &[u8] = &event.payload;
        // Object store chunks are NATS messages too: they must fit max_payload.
        let meta = object_store::ObjectMetadata {
            name: event.event_id.clone(),
            chunk_size: Some((max_payload.saturating_sub(MARGIN)).clamp(1024, 128 * 1024)),
            ..Default::default()
        };
        bucket.put(meta, &mut reader).await.map_err(|e| {
            PublishError::Nats(format!(
                "store oversized event {} in {}: {e}",
                event.event_id, self.bucket_name
            ))
        })?;
        headers.insert(
            "Walcast-Object",
            format!("{}/{}", self.bucket_name, event.event_id).as_str(),
        );
        let mut stub = ChangeEvent::decode(event.payload.clone()).map_err(|e| {
            PublishError::Nats(format!("re-decode oversized event {}: {e}", event.event_id))
        })?;
        stub.after = None;
        stub.before = None;
        stub.extra.clear();
        Ok(Bytes::from(stub.encode_to_vec()))
    }

    async fn bucket(
        &mut self,
        js: &jetstream::Context,
    ) -> Result<&object_store::ObjectStore, PublishError> {
        if self.bucket.is_none() {
            let store = match js.get_object_store(&self.bucket_name).await {
                Ok(store) => store,
                Err(_) => js
                    .create_object_store(object_store::Config {
                        bucket: self.bucket_name.clone(),
                        max_age: self.max_age,
                        num_replicas: self.replicas,
                        storage: jetstream::stream::StorageType::File,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| {
                        PublishError::Nats(format!("create object store {}: {e}", self.bucket_name))
                    })?,
            };
            self.bucket = Some(store);
        }
        self.bucket.as_ref().ok_or(PublishError::Downstream)
    }
}

fn js_max_payload(js: &jetstream::Context) -> usize {
    js.client().server_info().max_payload
}

/// Bytes the headers take on the wire (`NATS/1.0\r\n`, `k: v\r\n` each, `\r\n`).
fn header_len(headers: &HeaderMap) -> usize {
    12 + headers
        .iter()
        .map(|(k, vs)| {
            vs.iter()
                .map(|v| AsRef::<str>::as_ref(k).len() + v.as_str().len() + 4)
                .sum::<usize>()
        })
        .sum::<usize>()
}
