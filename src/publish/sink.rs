//! The publisher's seam: where its messages go, where their acknowledgements
//! come from, and what reconciliation reads back from the stream.
//! [`JetStream`] in production (async-nats), `memory::MemorySink` in tests
//! (a `Vec`-backed stream with the same ordering and dedup rules).
//!
//! Generic, not `dyn`: the production publisher is compiled for
//! [`JetStream`] alone, so the seam costs nothing per event (no boxed
//! future, no extra allocation: `send` takes the subject, headers and
//! payload the publisher built anyway).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream::{self, object_store};
use async_nats::{Statistics, Subject, Subscriber};
use bytes::Bytes;

use super::PublishError;
use super::acks::{Verdict, parse};
use super::holes::{Hole, Message, ranges};
use super::stream;
use crate::broker::range::HeadersRead;
use crate::headers::Headers;
use crate::position::StreamSeq;

/// Where the publisher's messages go.
///
/// Ordering is the broker's job: every message carries
/// `Nats-Expected-Last-Sequence` and `Nats-Msg-Id`, and a sink stores a
/// message only if the stream's last sequence is the expected one (a
/// duplicate id within the duplicate window is not stored again and is
/// answered with the original's sequence).
pub(crate) trait Sink {
    /// The acknowledgements of one run.
    type Replies: Replies;
    /// Opens the channel this run's acks arrive on; before the first send.
    async fn replies(&self) -> Result<Self::Replies, PublishError>;
    /// The largest message the broker takes, headers included.
    fn max_payload(&self) -> usize;
    /// Hands one message to the broker; `reply` (from
    /// [`Replies::subject`]) asks for its ack. Whether and where it was
    /// stored is only known from that ack (or a later message's).
    async fn send(
        &self,
        subject: Subject,
        headers: &Headers<'_>,
        payload: Bytes,
        reply: Option<Subject>,
    ) -> Result<(), String>;
    /// Stores an oversized event whole under `name`, beside the stream.
    async fn put_object(
        &mut self,
        bucket: &Bucket,
        name: &str,
        data: &[u8],
        chunk_size: usize,
    ) -> Result<(), PublishError>;
    /// Why publishes found no responders, once the stream has a leader
    /// again or the wait is over.
    async fn no_responders(&self, event_id: &str) -> PublishError;
    /// The stream's last sequence (0 when empty), as reconciliation reads it.
    async fn last_seq(&self) -> Result<StreamSeq, PublishError>;
    /// The message at `seq` (`None`: deleted, or past the end): one direct
    /// read of the stream, which the four reads below keep parts of.
    async fn stored(&self, seq: StreamSeq) -> Result<Option<StoredMessage>, PublishError>;
    /// The `Nats-Msg-Id` of the message at `seq`, if it can still be read.
    async fn message_id(&self, seq: StreamSeq) -> Option<String> {
        self.stored(seq).await.ok().flatten()?.msg_id
    }
    /// The event, tenant and seq of the message at `seq`, if it can be read.
    async fn message(&self, seq: StreamSeq) -> Option<Message> {
        let stored = self.stored(seq).await.ok().flatten()?;
        Some(Message {
            event_id: stored.msg_id?,
            tenant: stored.tenant,
            seq: stored.seq,
        })
    }
    /// The subject of the message at `seq`, if it can be read (reports
    /// name it: a foreign message's subject names whose data it copies).
    async fn subject_at(&self, seq: StreamSeq) -> Option<String> {
        Some(self.stored(seq).await.ok().flatten()?.subject)
    }
    /// Whose message is at `seq` (see `pipeline::foreign`).
    async fn probe(&self, seq: StreamSeq) -> Result<Probe, PublishError> {
        Ok(match self.stored(seq).await? {
            Some(stored) => Probe::of(stored.msg_id.as_deref()),
            None => Probe::Missing,
        })
    }
    /// The probes of the messages in `after + 1 ..= through`, in order
    /// (positions without a message left out): one headers-only read.
    async fn probes(
        &self,
        after: StreamSeq,
        through: StreamSeq,
    ) -> Result<Vec<(StreamSeq, Probe)>, PublishError>;
    /// The runs of stream positions missing between the stream's first and
    /// last message (see [`holes`](super::holes)): one stream info request,
    /// a second one listing them only if any are missing.
    async fn holes(&self) -> Result<Vec<Hole>, PublishError>;
}

/// A stored message: its subject and the headers walcast reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    pub subject: String,
    pub msg_id: Option<String>,
    pub tenant: Option<String>,
    pub seq: Option<u64>,
}

/// Whose message is at a stream position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// None: deleted, or past the end.
    Missing,
    /// An event's: its `Nats-Msg-Id` is an event id (commit LSN, index).
    Event((crate::lsn::Lsn, u32)),
    /// One without an event id: walcast did not publish it.
    Foreign,
}

impl Probe {
    /// The event id, if it is an event's.
    pub fn id(self) -> Option<(crate::lsn::Lsn, u32)> {
        match self {
            Probe::Event(id) => Some(id),
            _ => None,
        }
    }

    /// The probe of a message with this `Nats-Msg-Id`.
    pub fn of(msg_id: Option<&str>) -> Probe {
        match msg_id.and_then(crate::events::parse_event_id) {
            Some(id) => Probe::Event(id),
            None => Probe::Foreign,
        }
    }
}

/// The acknowledgements of one run, on one subscription.
pub(crate) trait Replies {
    /// The reply subject asking for the ack of the message expected at `seq`.
    fn subject(&self, seq: StreamSeq) -> Subject;
    /// How many times the connection has (re)connected: an ack requested
    /// on an earlier connection may be lost with it.
    fn connects(&self) -> u64;
    /// The next reply: the stream sequence its message was expected at, and
    /// the broker's verdict. `None` once the subscription ended.
    async fn next(&mut self) -> Option<(StreamSeq, Verdict)>;
}

/// The object store bucket oversized events go to (SPEC §3).
#[derive(Debug, Clone)]
pub struct Bucket {
    pub name: String,
    pub max_age: Duration,
    pub replicas: usize,
}

/// The production sink: one JetStream stream.
pub struct JetStream {
    js: jetstream::Context,
    /// The context's client, cloned once (not per message).
    client: async_nats::Client,
    stream: jetstream::stream::Stream<()>,
    name: String,
    objects: Option<object_store::ObjectStore>,
}

impl JetStream {
    /// The sink for stream `name` (no request: the stream was verified by
    /// `stream::ensure`).
    pub async fn new(js: jetstream::Context, name: &str) -> Result<Self, PublishError> {
        let stream = js
            .get_stream_no_info(name)
            .await
            .map_err(|e| PublishError::Nats(format!("stream {name}: {e}")))?;
        Ok(JetStream {
            client: js.client(),
            js,
            stream,
            name: name.to_string(),
            objects: None,
        })
    }
}

/// The ack subscription: `<inbox>.<expected stream seq>`.
pub struct NatsReplies {
    inbox: String,
    sub: Subscriber,
    stats: Arc<Statistics>,
}

impl Sink for JetStream {
    type Replies = NatsReplies;

    async fn replies(&self) -> Result<NatsReplies, PublishError> {
        NatsReplies::subscribe(&self.client)
            .await
            .map_err(PublishError::Nats)
    }

    fn max_payload(&self) -> usize {
        // Clones the server info: read once per batch (see `Oversized`).
        self.client.server_info().max_payload
    }

    async fn send(
        &self,
        subject: Subject,
        headers: &Headers<'_>,
        payload: Bytes,
        reply: Option<Subject>,
    ) -> Result<(), String> {
        self.client
            .publish_with_raw_headers(subject, reply, headers.block(), payload)
            .await
            .map_err(|e| e.to_string())
    }

    async fn put_object(
        &mut self,
        bucket: &Bucket,
        name: &str,
        data: &[u8],
        chunk_size: usize,
    ) -> Result<(), PublishError> {
        if self.objects.is_none() {
            self.objects = Some(object_bucket(&self.js, bucket).await?);
        }
        let Some(objects) = &self.objects else {
            return Err(PublishError::Downstream);
        };
        let meta = object_store::ObjectMetadata {
            name: name.to_string(),
            chunk_size: Some(chunk_size),
            ..Default::default()
        };
        let mut reader = data;
        objects.put(meta, &mut reader).await.map_err(|e| {
            PublishError::Nats(format!(
                "store oversized event {name} in {}: {e}",
                bucket.name
            ))
        })?;
        Ok(())
    }

    async fn no_responders(&self, event_id: &str) -> PublishError {
        no_responders(&self.js, &self.name, event_id).await
    }

    async fn last_seq(&self) -> Result<StreamSeq, PublishError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| PublishError::Nats(format!("read stream info: {e}")))?;
        Ok(StreamSeq(info.state.last_sequence))
    }

    async fn stored(&self, seq: StreamSeq) -> Result<Option<StoredMessage>, PublishError> {
        use async_nats::jetstream::stream::RawMessageErrorKind;
        let msg = match self.stream.get_raw_message(seq.0).await {
            Ok(msg) => msg,
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
            Err(e) => {
                return Err(PublishError::Nats(format!(
                    "read stream message {seq}: {e}"
                )));
            }
        };
        let header = |name: &str| msg.headers.get(name).map(|v| v.as_str().to_string());
        Ok(Some(StoredMessage {
            subject: msg.subject.to_string(),
            msg_id: header(crate::headers::MSG_ID),
            tenant: header(crate::headers::TENANT),
            seq: header(crate::headers::SEQ).and_then(|s| s.parse().ok()),
        }))
    }

    async fn probes(
        &self,
        after: StreamSeq,
        through: StreamSeq,
    ) -> Result<Vec<(StreamSeq, Probe)>, PublishError> {
        let failed = |e: String| {
            PublishError::Nats(format!(
                "read stream messages {}..={through}: {e}",
                after.next()
            ))
        };
        let mut out = Vec::new();
        if through <= after {
            return Ok(out);
        }
        let mut read = HeadersRead::open(&self.client, &self.stream, after.next().0, through.0)
            .await
            .map_err(failed)?;
        while let Some((seq, headers)) = read.next().await.map_err(failed)? {
            let id = headers.as_ref().and_then(|h| h.get(crate::headers::MSG_ID));
            out.push((StreamSeq(seq), Probe::of(id.map(|v| v.as_str()))));
        }
        Ok(out)
    }

    async fn holes(&self) -> Result<Vec<Hole>, PublishError> {
        let info = self
            .stream
            .get_info()
            .await
            .map_err(|e| PublishError::Nats(format!("read stream info: {e}")))?;
        if info.state.deleted_count.unwrap_or(0) == 0 {
            return Ok(Vec::new());
        }
        let detailed = self
            .stream
            .info_builder()
            .with_deleted(true)
            .fetch()
            .await
            .map_err(|e| PublishError::Nats(format!("list the stream's deleted messages: {e}")))?;
        Ok(ranges(detailed.info.state.deleted.unwrap_or_default()))
    }
}

impl JetStream {
    /// Opens the object store for oversized events now, creating it if
    /// missing, so it exists from the start like the stream (SPEC §3). A
    /// failure is logged; the first oversized event tries again.
    pub async fn open_objects(&mut self, bucket: &Bucket) {
        match object_bucket(&self.js, bucket).await {
            Ok(store) => self.objects = Some(store),
            Err(e) => tracing::warn!(
                bucket = %bucket.name,
                error = %e,
                "cannot open the object store for oversized events yet; the first oversized event tries again"
            ),
        }
    }
}

async fn object_bucket(
    js: &jetstream::Context,
    bucket: &Bucket,
) -> Result<object_store::ObjectStore, PublishError> {
    let store = match js.get_object_store(&bucket.name).await {
        Ok(store) => store,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: bucket.name.clone(),
                max_age: bucket.max_age,
                num_replicas: bucket.replicas,
                storage: jetstream::stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| PublishError::Nats(format!("create object store {}: {e}", bucket.name)))?,
    };
    crate::broker::limits::ensure_consumer_limit(js, &format!("OBJ_{}", bucket.name)).await;
    Ok(store)
}

/// Why publishes found no responders, once the stream has a leader again
/// (or the wait is over): a leader change, or a deleted stream.
async fn no_responders(js: &jetstream::Context, name: &str, event_id: &str) -> PublishError {
    let started = std::time::Instant::now();
    match stream::lookup(js, name, stream::ELECTION_WAIT).await {
        Ok(found) if stream::has_leader(found.cached_info()) => {
            let leader = found
                .cached_info()
                .cluster
                .as_ref()
                .and_then(|c| c.leader.clone())
                .unwrap_or_else(|| "the same server".into());
            PublishError::LeaderChange {
                stream: name.to_string(),
                outcome: format!("{leader} leads it after {:.1?}", started.elapsed()),
            }
        }
        Ok(_) => PublishError::LeaderChange {
            stream: name.to_string(),
            outcome: format!("still no leader after {:.1?}", started.elapsed()),
        },
        Err(e) if stream::not_found(&e) => PublishError::StreamGone {
            stream: name.to_string(),
        },
        Err(e) => PublishError::Nats(format!(
            "publish {event_id}: no responders for stream {name}'s subjects, and its stream info failed: {e}"
        )),
    }
}

impl NatsReplies {
    /// Subscribes to a new inbox for JetStream acks on `client`.
    pub(crate) async fn subscribe(client: &async_nats::Client) -> Result<NatsReplies, String> {
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| format!("subscribe to the ack inbox: {e}"))?;
        Ok(NatsReplies {
            inbox,
            sub,
            stats: client.statistics(),
        })
    }

    /// The reply subject whose ack [`NatsReplies::next_token`] returns with `token`.
    pub(crate) fn subject_for(&self, token: u64) -> Subject {
        let mut digits = itoa::Buffer::new();
        let token = digits.format(token);
        let mut subject = String::with_capacity(self.inbox.len() + 1 + token.len());
        subject.push_str(&self.inbox);
        subject.push('.');
        subject.push_str(token);
        Subject::from(subject)
    }

    /// The next ack: the token its reply subject named, and the verdict.
    /// `None` once the subscription ended.
    pub(crate) async fn next_token(&mut self) -> Option<(u64, Verdict)> {
        use futures::StreamExt;
        loop {
            let msg = self.sub.next().await?;
            let Some(token) = msg
                .subject
                .rsplit_once('.')
                .and_then(|(_, t)| t.parse::<u64>().ok())
            else {
                continue;
            };
            if msg.status == Some(async_nats::StatusCode::NO_RESPONDERS) {
                return Some((token, Verdict::NoResponders));
            }
            return Some((token, parse(&msg.payload)));
        }
    }
}

/// The publisher's acks: the token is the stream sequence a message was
/// expected at.
impl Replies for NatsReplies {
    fn subject(&self, seq: StreamSeq) -> Subject {
        self.subject_for(seq.0)
    }

    fn connects(&self) -> u64 {
        self.stats.connects.load(Ordering::Relaxed)
    }

    async fn next(&mut self) -> Option<(StreamSeq, Verdict)> {
        let (token, verdict) = self.next_token().await?;
        Some((StreamSeq(token), verdict))
    }
}
