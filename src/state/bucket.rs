//! The bucket itself: created like the stream (or checked when it exists),
//! the readiness marker, and where the projection stopped — read back from
//! the bucket's own last entry, so the state's progress is exactly as
//! durable as the state.

use std::time::SystemTime;

use async_nats::jetstream::kv::{self, Store};
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{LastRawMessageError, LastRawMessageErrorKind, Stream};
use async_nats::jetstream::{self};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::layout::{self, MARKER_KEY};

/// The bucket's store API and its stream.
pub struct Bucket {
    pub name: String,
    pub store: Store,
    pub stream: Stream,
}

/// Opens `name`, creating it (history 1, no max age, `replicas`) if missing.
pub async fn ensure(
    js: &jetstream::Context,
    name: &str,
    replicas: usize,
) -> Result<Bucket, String> {
    let store = match js.get_key_value(name).await {
        Ok(store) => store,
        Err(_) => js
            .create_key_value(kv::Config {
                bucket: name.to_string(),
                description: "walcast: each tenant's current rows (SPEC §8)".into(),
                history: 1,
                storage: jetstream::stream::StorageType::File,
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| format!("create the state bucket {name} on NATS: {e}"))?,
    };
    let mut stream = js
        .get_stream(format!("KV_{name}"))
        .await
        .map_err(|e| format!("open the state bucket {name} on NATS: {e}"))?;
    compatible(&mut stream, name).await?;
    crate::broker::limits::ensure_in(js, &stream.cached_info().config).await;
    Ok(Bucket {
        name: name.to_string(),
        store,
        stream,
    })
}

/// What `walcast check` reports: `None` if the bucket does not exist yet,
/// else its readiness marker (after checking it is compatible).
pub async fn inspect(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<Option<Marker>>, String> {
    let Ok(mut stream) = js.get_stream(format!("KV_{name}")).await else {
        return Ok(None);
    };
    compatible(&mut stream, name).await?;
    Ok(Some(marker(&stream, name).await?))
}

/// History 1 and no max age: a row's value must never expire.
async fn compatible(stream: &mut Stream, name: &str) -> Result<(), String> {
    let config = &stream
        .info()
        .await
        .map_err(|e| format!("read the state bucket {name} from NATS: {e}"))?
        .config;
    if config.max_messages_per_subject != 1 || !config.max_age.is_zero() {
        return Err(format!(
            "state bucket {name} is incompatible: it keeps {} values per key and expires them after {:?}; walcast needs history 1 and no max age. Delete it (nats kv del {name}; walcast recreates and backfills it) or name another with --state-bucket",
            config.max_messages_per_subject, config.max_age
        ));
    }
    Ok(())
}

/// The stream position the bucket's newest entry was written at (0 for an
/// empty bucket: the projection starts from the stream's beginning).
pub async fn applied_through(bucket: &Bucket) -> Result<u64, String> {
    Ok(applied_by(newest(bucket).await?.as_ref()))
}

/// The bucket's newest entry, any key, delete markers too; `None` when the
/// bucket is empty.
pub async fn newest(bucket: &Bucket) -> Result<Option<StreamMessage>, String> {
    let subject = format!("$KV.{}.>", bucket.name);
    last_at_leader(&bucket.stream, &subject)
        .await
        .map_err(|e| format!("read the state bucket {} from NATS: {e}", bucket.name))
}

/// The stream position `newest` was written at (see [`applied_through`]).
pub fn applied_by(newest: Option<&StreamMessage>) -> u64 {
    newest.map_or(0, |m| layout::stream_seq_of(Some(&m.headers)).unwrap_or(0))
}

/// The last message on `subject`, as the stream leader answers (a direct
/// get may come from a replica that lags: docs/STATE.md "Clustered
/// buckets"); `None` when the subject has none.
pub async fn last_at_leader(
    stream: &Stream,
    subject: &str,
) -> Result<Option<StreamMessage>, LastRawMessageError> {
    match stream.get_last_raw_message_by_subject(subject).await {
        Ok(message) => Ok(Some(message)),
        Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The readiness marker's content (docs/STATE.md).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Marker {
    /// `requested`, `running` or `complete`.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

impl Marker {
    pub fn new(state: &str, snapshot_lsn: Option<String>, rows: Option<u64>) -> Marker {
        Marker {
            state: state.into(),
            snapshot_lsn,
            rows,
            at: Some(humantime::format_rfc3339_seconds(SystemTime::now()).to_string()),
        }
    }

    pub fn is_complete(&self) -> bool {
        self.state == "complete"
    }
}

/// The marker, if the bucket has one (an unreadable one counts as none: the
/// backfill runs again, which is always safe). Read from the stream leader:
/// any replica of a clustered bucket answers a direct get (`Store::get`),
/// and a lagging one would still say `running` after the backfill completed
/// and have it run again.
pub async fn marker(stream: &Stream, bucket: &str) -> Result<Option<Marker>, String> {
    let subject = format!("$KV.{bucket}.{MARKER_KEY}");
    let last = last_at_leader(stream, &subject)
        .await
        .map_err(|e| format!("read the state bucket's {MARKER_KEY} from NATS: {e}"))?;
    Ok(last
        .filter(|m| is_value(&m.headers))
        .and_then(|m| serde_json::from_slice(&m.payload).ok()))
}

/// Not a KV delete or purge marker (`KV-Operation: DEL` / `PURGE`).
fn is_value(headers: &async_nats::HeaderMap) -> bool {
    headers.get(crate::headers::KV_OPERATION).is_none()
}

/// Writes the marker, stamped with the projection's position `applied`.
pub async fn set_marker(
    js: &jetstream::Context,
    bucket: &str,
    marker: &Marker,
    applied: u64,
) -> Result<(), String> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(crate::headers::STREAM_SEQ, applied.to_string().as_str());
    headers.insert(crate::headers::CONTENT_TYPE, "application/json");
    let body = Bytes::from(serde_json::to_vec(marker).unwrap_or_default());
    js.publish_with_headers(format!("$KV.{bucket}.{MARKER_KEY}"), headers, body)
        .await
        .map_err(|e| format!("write the state bucket's {MARKER_KEY} on NATS: {e}"))?
        .await
        .map_err(|e| format!("write the state bucket's {MARKER_KEY} on NATS: {e}"))?;
    Ok(())
}
