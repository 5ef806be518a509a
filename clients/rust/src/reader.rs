//! Reading walcast messages from JetStream: consumers, the headers
//! that identify an event, and the body (from the object store when the
//! event was too large for a NATS message, SPEC §3).
//!
//! Headers are read first and are enough to judge a message (tenant, `seq`,
//! `event_id`), so duplicates are skipped without decoding or fetching
//! anything. Only events that will be delivered pay for their body.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::stream::LastRawMessageErrorKind;
use async_nats::jetstream::{self, consumer, object_store, object_store::ObjectStore};
use futures::StreamExt;
use prost::Message as _;

use crate::error::Error;
use crate::proto::ChangeEvent;

/// The longest wait for an object's next chunk before the fetch is retried.
const CHUNK_STALL: Duration = Duration::from_secs(10);

/// A live read's pull requests: messages per request (the next one goes
/// out when half are in), how long one waits at most, and how often the
/// server says it still waits when there is nothing to deliver.
const LIVE_BATCH: usize = 500;
const LIVE_EXPIRES: Duration = Duration::from_secs(30);
const LIVE_HEARTBEAT: Duration = Duration::from_secs(5);

/// A random consumer name (22 characters of `[A-Za-z0-9]`, like a NUID):
/// unguessable, since a tenant user may pull from any consumer it can name.
/// Named, a consumer's create request goes to the API subject that carries
/// the filter (`$JS.API.CONSUMER.CREATE.<stream>.<name>.<filter>`): the only
/// form a broker permission can confine to one tenant (SPEC §9). Unnamed,
/// it goes to `...CREATE.<stream>`.
fn consumer_name() -> String {
    use rand::Rng;
    rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(22)
        .map(char::from)
        .collect()
}

/// Where a consumer starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum From {
    /// At this stream sequence.
    Seq(u64),
    /// At the stream's first message.
    First,
    /// The last message of each subject matching the filter, then what
    /// follows: a key-value bucket's current keys (the state bucket).
    LastPerSubject,
}

impl From {
    fn deliver_policy(self) -> consumer::DeliverPolicy {
        match self {
            From::Seq(start_sequence) => {
                consumer::DeliverPolicy::ByStartSequence { start_sequence }
            }
            From::First => consumer::DeliverPolicy::All,
            From::LastPerSubject => consumer::DeliverPolicy::LastPerSubject,
        }
    }
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

    /// A subscription's read: see [`Live`].
    pub async fn open(&self, stream: &str, filter: &str, from: From) -> Result<Live, String> {
        let consumer = self.create_unacked_consumer(stream, filter, from).await?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(LIVE_BATCH)
            .expires(LIVE_EXPIRES)
            .heartbeat(LIVE_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| format!("consume {stream} ({filter}): {e}"))?;
        Ok(Live {
            messages,
            delivered: 0,
        })
    }

    /// An ordered (ephemeral, flow-controlled, self-healing) consumer for a
    /// short read with a deadline of its own, and how many messages it had
    /// pending when it was created: a reader that must stop once it has
    /// seen everything (`num_pending` 0) knows at once when there is nothing.
    pub async fn open_counted(
        &self,
        stream: &str,
        filter: &str,
        from: From,
    ) -> Result<(consumer::pull::Ordered, u64), String> {
        let config = consumer::pull::OrderedConfig {
            // Named: see `consumer_name`.
            name: Some(consumer_name()),
            filter_subject: filter.to_string(),
            deliver_policy: from.deliver_policy(),
            ..Default::default()
        };
        let consumer = self.create(config, stream, filter).await?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| format!("consume {stream} ({filter}): {e}"))?;
        Ok((messages, pending))
    }

    /// A consumer without acks for a read that sends its own pull requests
    /// (`pull.rs`): its name, and how many messages it had pending when it
    /// was created. Gone 30 s after the read, like an ordered consumer
    /// (tenant users may not delete consumers).
    pub async fn create_unacked(
        &self,
        stream: &str,
        filter: &str,
        from: From,
    ) -> Result<(String, u64), String> {
        let consumer = self.create_unacked_consumer(stream, filter, from).await?;
        let info = consumer.cached_info();
        Ok((info.name.clone(), info.num_pending))
    }

    async fn create_unacked_consumer(
        &self,
        stream: &str,
        filter: &str,
        from: From,
    ) -> Result<consumer::PullConsumer, String> {
        let config = consumer::pull::Config {
            name: Some(consumer_name()),
            filter_subject: filter.to_string(),
            deliver_policy: from.deliver_policy(),
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(30),
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        };
        self.create(config, stream, filter).await
    }

    async fn create<C>(
        &self,
        config: C,
        stream: &str,
        filter: &str,
    ) -> Result<consumer::Consumer<C>, String>
    where
        C: consumer::IntoConsumerConfig + consumer::FromConsumer,
    {
        self.js
            .create_consumer_on_stream(config, stream)
            .await
            .map_err(|e| format!("create consumer on {stream} ({filter}): {e}"))
    }

    /// The JetStream context, for reads that need no consumer.
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
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
    ///
    /// Reads the object's chunks with an ordered pull consumer like every
    /// other read here, not with `ObjectStore::get`: that one reads through
    /// an ordered *push* consumer, and with several subscriptions fetching
    /// at once on one connection it was seen to hang for good (async-nats
    /// 0.51) — a subscription stuck forever in the middle of a tenant.
    pub async fn fetch(&mut self, object: &str) -> Result<Vec<u8>, ReadError> {
        let Some((bucket, name)) = object.split_once('/') else {
            return Err(ReadError::Definite(Error::Malformed {
                what: "Walcast-Object header".into(),
                reason: format!("{object:?} is not <bucket>/<event_id>"),
            }));
        };
        let missing = || {
            ReadError::Definite(Error::ObjectMissing {
                object: object.to_string(),
            })
        };
        let info = match self.store(bucket).await?.info(name).await {
            Ok(info) if !info.deleted => info,
            Err(e) if e.kind() != object_store::InfoErrorKind::NotFound => {
                return Err(ReadError::Transient(format!("object info {object}: {e}")));
            }
            // Missing or deleted as the nearest replica has it.
            _ => self
                .info_at_leader(bucket, name)
                .await?
                .ok_or_else(missing)?,
        };
        let body = self.chunks(bucket, &info.nuid, info.size).await?;
        if body.len() != info.size {
            return Err(ReadError::Transient(format!(
                "object {object}: read {} of {} bytes",
                body.len(),
                info.size
            )));
        }
        Ok(body)
    }

    /// An object's meta as the stream leader has it (`None`: no object, or
    /// deleted). `ObjectStore::info` reads it with a direct get, which on a
    /// cluster the nearest replica answers; one that has not stored the
    /// object yet says "not found" for an event published a moment ago,
    /// so that answer is asked again here before the object counts as gone.
    async fn info_at_leader(
        &self,
        bucket: &str,
        name: &str,
    ) -> Result<Option<object_store::ObjectInfo>, ReadError> {
        use base64::Engine as _;
        let transient = |e: &dyn std::fmt::Display| {
            ReadError::Transient(format!("object info {bucket}/{name} from the leader: {e}"))
        };
        let stream = self
            .js
            .get_stream_no_info(format!("OBJ_{bucket}"))
            .await
            .map_err(|e| transient(&e))?;
        let name64 = base64::engine::general_purpose::URL_SAFE.encode(name);
        let subject = format!("$O.{bucket}.M.{name64}");
        match stream.get_last_raw_message_by_subject(&subject).await {
            Ok(meta) => {
                let info: object_store::ObjectInfo =
                    serde_json::from_slice(&meta.payload).map_err(|e| transient(&e))?;
                Ok((!info.deleted).then_some(info))
            }
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(transient(&e)),
        }
    }

    /// The object store `bucket`, opened once.
    async fn store(&mut self, bucket: &str) -> Result<ObjectStore, ReadError> {
        if let Some(store) = self.stores.get(bucket) {
            return Ok(store.clone());
        }
        let store = self
            .js
            .get_object_store(bucket)
            .await
            .map_err(|e| ReadError::Transient(format!("object store {bucket}: {e}")))?;
        self.stores.insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// An object's chunks (subject `$O.<bucket>.C.<nuid>` of stream
    /// `OBJ_<bucket>`), concatenated.
    async fn chunks(&self, bucket: &str, nuid: &str, size: usize) -> Result<Vec<u8>, ReadError> {
        let (stream, filter) = (format!("OBJ_{bucket}"), format!("$O.{bucket}.C.{nuid}"));
        let (mut messages, mut pending) = self
            .open_counted(&stream, &filter, From::First)
            .await
            .map_err(ReadError::Transient)?;
        let mut body = Vec::with_capacity(size);
        while pending > 0 {
            let msg = match tokio::time::timeout(CHUNK_STALL, next(&mut messages)).await {
                Ok(Some(Ok(msg))) => msg,
                Ok(Some(Err(e))) => return Err(ReadError::Transient(e)),
                Ok(None) | Err(_) => {
                    return Err(ReadError::Transient(format!("{filter}: chunks stalled")));
                }
            };
            body.extend_from_slice(&msg.payload);
            pending = msg
                .info()
                .map_err(|e| ReadError::Transient(e.to_string()))?
                .pending;
        }
        Ok(body)
    }
}

/// The identity of a walcast tenant message; an error for anything else.
pub fn meta(delivery: &Delivery) -> Result<Meta, Error> {
    let Delivery { msg, stream_seq } = delivery;
    let stream_seq = *stream_seq;
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

/// A subscription's read: a consumer without acks (like an ordered
/// consumer: one replica, in memory, gone 30 s after the read), pulled
/// with heartbeats, whose every break is the driver's to repair by
/// repositioning — the one recovery path a subscription has.
///
/// Why not async-nats' ordered consumer, which heals itself: it notices a
/// consumer lost with the cluster node that held it (this connection
/// staying up on another node) only after two missed 15 s heartbeats: a
/// subscription then heard nothing for 44.5 s (`tests/cluster_client.rs`).
/// Here two missed 5 s heartbeats break the read (10.1 s).
pub struct Live {
    messages: consumer::pull::Stream,
    /// Deliveries so far: the consumer numbers them 1, 2, …
    delivered: u64,
}

/// A message of a [`Live`] read and its stream sequence.
pub struct Delivery {
    pub msg: jetstream::Message,
    pub stream_seq: u64,
}

impl Live {
    /// The next message in delivery order; an error when the read broke:
    /// a delivery missing (the consumer's count skipped one), heartbeats
    /// missing, the consumer gone, a failed pull.
    pub async fn next(&mut self) -> Option<Result<Delivery, String>> {
        let msg = match self.messages.next().await? {
            Ok(msg) => msg,
            Err(e) => return Some(Err(format!("the consumer broke: {e}"))),
        };
        let info = match msg.info() {
            Ok(info) => info,
            Err(e) => return Some(Err(format!("a delivery without its position: {e}"))),
        };
        if info.consumer_sequence != self.delivered + 1 {
            return Some(Err(format!(
                "delivery {} after {}: a message went missing",
                info.consumer_sequence, self.delivered
            )));
        }
        self.delivered = info.consumer_sequence;
        let stream_seq = info.stream_sequence;
        Some(Ok(Delivery { msg, stream_seq }))
    }
}

/// The next message of an ordered consumer, as the caller's loop wants it.
pub async fn next(
    messages: &mut consumer::pull::Ordered,
) -> Option<Result<jetstream::Message, String>> {
    messages.next().await.map(|m| m.map_err(|e| e.to_string()))
}

pub fn header(msg: &jetstream::Message, name: &str) -> Option<String> {
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
