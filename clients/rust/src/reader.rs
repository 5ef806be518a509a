//! Reading walcast messages from JetStream: ordered consumers, the headers
//! that identify an event, and the body (from the object store when the
//! event was too large for a NATS message, SPEC §3).
//!
//! Headers are read first and are enough to judge a message (tenant, `seq`,
//! `event_id`), so duplicates are skipped without decoding or fetching
//! anything. Only events that will be delivered pay for their body.

use std::collections::HashMap;

use async_nats::jetstream::{self, consumer, object_store::ObjectStore};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::AsyncReadExt;

use crate::error::Error;
use crate::proto::ChangeEvent;

/// Where a consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// At this stream sequence.
    Seq(u64),
    /// At the stream's first message.
    First,
}

/// A message's identity, from its headers.
#[derive(Debug, Clone)]
pub struct Meta {
    pub stream_seq: u64,
    pub tenant: String,
    pub seq: u64,
    pub event_id: String,
}

/// A failed read: retry (reposition) or stop.
#[derive(Debug)]
pub enum ReadError {
    Transient(String),
    Definite(Error),
}

/// Opens consumers and fetches bodies; caches object store handles.
pub struct Reader {
    js: jetstream::Context,
    stores: HashMap<String, ObjectStore>,
}

impl Reader {
    pub fn new(js: jetstream::Context) -> Reader {
        Reader {
            js,
            stores: HashMap::new(),
        }
    }

    /// An ordered (ephemeral, flow-controlled, self-healing) consumer.
    pub async fn open(
        &self,
        stream: &str,
        filter: &str,
        from: From,
    ) -> Result<consumer::pull::Ordered, String> {
        let deliver_policy = match from {
            From::Seq(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            From::First => consumer::DeliverPolicy::All,
        };
        let config = consumer::pull::OrderedConfig {
            filter_subject: filter.to_string(),
            deliver_policy,
            ..Default::default()
        };
        let consumer = self
            .js
            .create_consumer_on_stream(config, stream)
            .await
            .map_err(|e| format!("create consumer on {stream} ({filter}): {e}"))?;
        consumer
            .messages()
            .await
            .map_err(|e| format!("consume {stream} ({filter}): {e}"))
    }

    /// The full event of a message whose [`Meta`] was judged deliverable.
    pub async fn event(
        &mut self,
        msg: &jetstream::Message,
        meta: &Meta,
    ) -> Result<ChangeEvent, ReadError> {
        let object = header(msg, "Walcast-Object");
        let body = match &object {
            Some(object) => self.fetch(object).await?,
            None => msg.payload.to_vec(),
        };
        let event = ChangeEvent::decode(body.as_slice()).map_err(|e| {
            ReadError::Definite(malformed(
                meta.stream_seq,
                format!("undecodable ChangeEvent: {e}"),
            ))
        })?;
        if event.seq != meta.seq
            || event.tenant_id != meta.tenant
            || event.event_id != meta.event_id
        {
            return Err(ReadError::Definite(malformed(
                meta.stream_seq,
                format!(
                    "headers say {}/{}/{} but the body says {}/{}/{}",
                    meta.tenant,
                    meta.seq,
                    meta.event_id,
                    event.tenant_id,
                    event.seq,
                    event.event_id
                ),
            )));
        }
        Ok(event)
    }

    /// An oversized event's full body from `<bucket>/<event_id>`.
    async fn fetch(&mut self, object: &str) -> Result<Vec<u8>, ReadError> {
        let Some((bucket, name)) = object.split_once('/') else {
            return Err(ReadError::Definite(Error::Malformed {
                what: "Walcast-Object header".into(),
                reason: format!("{object:?} is not <bucket>/<event_id>"),
            }));
        };
        let store = match self.stores.get(bucket) {
            Some(store) => store.clone(),
            None => {
                let store = self
                    .js
                    .get_object_store(bucket)
                    .await
                    .map_err(|e| ReadError::Transient(format!("object store {bucket}: {e}")))?;
                self.stores.insert(bucket.to_string(), store.clone());
                store
            }
        };
        let mut reader = store.get(name).await.map_err(|e| match e.kind() {
            jetstream::object_store::GetErrorKind::NotFound => {
                ReadError::Definite(Error::ObjectMissing {
                    object: object.to_string(),
                })
            }
            _ => ReadError::Transient(format!("get object {object}: {e}")),
        })?;
        let mut body = Vec::new();
        reader
            .read_to_end(&mut body)
            .await
            .map_err(|e| ReadError::Transient(format!("read object {object}: {e}")))?;
        Ok(body)
    }
}

/// The identity of a walcast tenant message; an error for anything else.
pub fn meta(msg: &jetstream::Message) -> Result<Meta, Error> {
    let info = msg.info().map_err(|e| Error::Malformed {
        what: "stream message".into(),
        reason: e.to_string(),
    })?;
    let stream_seq = info.stream_sequence;
    let need = |name: &str| {
        header(msg, name).ok_or_else(|| malformed(stream_seq, format!("no {name} header")))
    };
    let tenant = need("Walcast-Tenant")?;
    let event_id = need("Nats-Msg-Id")?;
    let seq = need("Walcast-Seq")?
        .parse()
        .map_err(|e| malformed(stream_seq, format!("Walcast-Seq: {e}")))?;
    Ok(Meta {
        stream_seq,
        tenant,
        seq,
        event_id,
    })
}

/// The next message of a consumer, as the caller's loop wants it.
pub async fn next(
    messages: &mut consumer::pull::Ordered,
) -> Option<Result<jetstream::Message, String>> {
    messages.next().await.map(|m| m.map_err(|e| e.to_string()))
}

fn header(msg: &jetstream::Message, name: &str) -> Option<String> {
    msg.headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str().to_string())
}

fn malformed(stream_seq: u64, reason: String) -> Error {
    Error::Malformed {
        what: format!("stream message {stream_seq}"),
        reason,
    }
}
