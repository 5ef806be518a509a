//! Reading walcast's state bucket (SPEC §8, `docs/STATE.md`): wait until the
//! backfill is complete, then read one tenant's current keys as a set that
//! is exactly the tenant's rows after some `seq`.
//!
//! Why the set is exact. walcast is the bucket's only writer and writes keys
//! in stream order, so the bucket is always "the rows after a prefix of the
//! stream". A consumer with deliver policy "last per subject" delivers the
//! keys' messages as they were when it was created, then every later write
//! in stream order; keeping the last message per key and stopping when
//! nothing is pending gives the bucket as it was at one moment (a later one
//! than the creation, when writes came in meanwhile). Within a tenant, the
//! highest `Walcast-Seq` of that set (delete markers included: a deleted row
//! still records that its delete happened) is the tenant's last event the
//! set reflects: `as_of_seq`. Rows with `Walcast-Seq: 0` were copied by the
//! backfill and have no event up to `as_of_seq`, so their copy is current.
//!
//! This holds only once the backfill is complete (before, rows may still be
//! missing), hence the marker `_walcast.backfill`: a load waits until it says
//! `complete`, and reads the marker again after the rows: if its revision
//! changed (the bucket was purged and is being filled again), the rows read
//! may be a mix and the load starts over.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{consumer::pull::Ordered, stream::DirectGetErrorKind};
use prost::Message as _;
use serde::Deserialize;
use tokio::time::Instant;

use crate::error::Error;
use crate::options::Options;
use crate::proto::ChangeEvent;
use crate::pull::{self, PullRead};
use crate::reader::{self, From, ReadError, Reader};

/// The readiness marker's key: two tokens, so never a row key (those have
/// at least three: `<tenant>.<entity>.<id…>`).
const MARKER_KEY: &str = "_walcast.backfill";

/// The longest silence tolerated while messages are still pending; after it
/// the read counts as broken and the load is retried.
const STALL: Duration = Duration::from_secs(10);

/// A tenant's rows as of `as_of_seq`, keyed by their state key
/// (`<tenant>.task.<id>`, …); each value is the row's latest `ChangeEvent`,
/// whose `after` image is the row.
#[derive(Debug)]
pub struct TenantState {
    pub as_of_seq: u64,
    pub rows: BTreeMap<String, ChangeEvent>,
}

/// The names a key-value bucket implies on the JetStream level.
struct Bucket {
    name: String,
    /// `$KV.<name>.`, the prefix of every key's subject.
    key_prefix: String,
}

impl Bucket {
    fn new(name: String) -> Bucket {
        let key_prefix = format!("$KV.{name}.");
        Bucket { name, key_prefix }
    }

    fn stream(&self) -> String {
        format!("KV_{}", self.name)
    }

    fn subject(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    /// The key of a row's subject; `None` for anything that is not a row
    /// (the marker matches a tenant named `_walcast`'s filter).
    fn row_key<'a>(&self, subject: &'a str) -> Option<&'a str> {
        let key = subject.strip_prefix(&self.key_prefix)?;
        let first = key.find('.')?;
        key[first + 1..].contains('.').then_some(key)
    }
}

/// Loads `tenant`'s rows, waiting up to `options.state_ready_timeout` for
/// the state to be ready. Transient trouble (NATS reconnecting, a consumer
/// that broke, the backfill restarting) is retried with backoff.
pub async fn load(
    reader: &mut Reader,
    options: &Options,
    tenant: &str,
) -> Result<TenantState, Error> {
    let bucket = Bucket::new(options.state_bucket());
    let deadline = Instant::now() + options.state_ready_timeout;
    let mut attempt = 0;
    loop {
        let revision = wait_until_complete(reader, &bucket, options, deadline)
            .await
            .map_err(|state| Error::StateNotReady {
                bucket: bucket.name.clone(),
                tenant_id: tenant.to_string(),
                state,
            })?;
        match read_consistent(reader, &bucket, tenant, revision).await {
            Ok(state) => return Ok(state),
            Err(ReadError::Definite(e)) => return Err(e),
            Err(ReadError::Transient(why)) => {
                tracing::info!(%tenant, bucket = %bucket.name, %why, "state load interrupted; retrying");
                tokio::time::sleep(options.backoff.delay(attempt)).await;
                attempt += 1;
            }
        }
    }
}

/// Reads the tenant, then checks that the marker still has `revision`.
async fn read_consistent(
    reader: &mut Reader,
    bucket: &Bucket,
    tenant: &str,
    revision: u64,
) -> Result<TenantState, ReadError> {
    let state = read_tenant(reader, bucket, tenant).await?;
    match current_marker(reader, bucket).await {
        Ok(marker) if marker.complete() && marker.revision == revision => Ok(state),
        Ok(_) => Err(ReadError::Transient(
            "the backfill marker changed during the read (bucket purged or backfill restarted)"
                .into(),
        )),
        Err(why) => Err(ReadError::Transient(why)),
    }
}

// --- the readiness marker ---------------------------------------------------

/// The marker as last written: its `state`, `None` when absent or deleted.
struct Marker {
    state: Option<String>,
    /// Its stream sequence: a new backfill writes a new one.
    revision: u64,
}

impl Marker {
    fn complete(&self) -> bool {
        self.state.as_deref() == Some("complete")
    }

    fn parse(headers: Option<&HeaderMap>, payload: &[u8], revision: u64) -> Marker {
        #[derive(Deserialize)]
        struct Body {
            state: String,
        }
        let state = if is_delete(headers) {
            None
        } else {
            Some(match serde_json::from_slice::<Body>(payload) {
                Ok(body) => body.state,
                Err(e) => format!("unreadable ({e})"),
            })
        };
        Marker { state, revision }
    }
}

/// The marker's revision once it says `complete`; the last state seen if
/// `deadline` passes first. Looks once, then watches the key.
async fn wait_until_complete(
    reader: &Reader,
    bucket: &Bucket,
    options: &Options,
    deadline: Instant,
) -> Result<u64, Option<String>> {
    let mut last_state = None;
    if let Ok(marker) = current_marker(reader, bucket).await {
        if marker.complete() {
            return Ok(marker.revision);
        }
        last_state = marker.state;
    }
    tracing::info!(bucket = %bucket.name, state = ?last_state, "waiting for the state backfill to complete");
    for attempt in 0.. {
        match watch_marker(reader, bucket, deadline, &mut last_state).await {
            Some(Ok(revision)) => return Ok(revision),
            None => return Err(last_state),
            Some(Err(why)) => {
                tracing::debug!(bucket = %bucket.name, %why, "watching the backfill marker failed; retrying");
                let retry_at = Instant::now() + options.backoff.delay(attempt);
                tokio::time::sleep_until(retry_at.min(deadline)).await;
            }
        }
    }
    unreachable!("the loop returns")
}

/// Watches the marker until it is complete (`Some(Ok(revision))`), the
/// deadline passes (`None`) or the watch breaks (`Some(Err)`).
async fn watch_marker(
    reader: &Reader,
    bucket: &Bucket,
    deadline: Instant,
    last_state: &mut Option<String>,
) -> Option<Result<u64, String>> {
    let (stream, subject) = (bucket.stream(), bucket.subject(MARKER_KEY));
    let opened = reader.open_counted(&stream, &subject, From::LastPerSubject);
    let mut messages: Ordered = match tokio::time::timeout_at(deadline, opened).await {
        Err(_) => return None,
        Ok(Err(why)) => return Some(Err(why)),
        Ok(Ok((messages, _))) => messages,
    };
    loop {
        let msg = match tokio::time::timeout_at(deadline, reader::next(&mut messages)).await {
            Err(_) => return None,
            Ok(None) => return Some(Err("marker watch ended".into())),
            Ok(Some(Err(why))) => return Some(Err(why)),
            Ok(Some(Ok(msg))) => msg,
        };
        let revision = msg.info().map(|i| i.stream_sequence).unwrap_or(0);
        let marker = Marker::parse(msg.headers.as_ref(), &msg.payload, revision);
        if marker.complete() {
            return Some(Ok(marker.revision));
        }
        *last_state = marker.state;
    }
}

/// The marker now, by a direct get (no consumer).
async fn current_marker(reader: &Reader, bucket: &Bucket) -> Result<Marker, String> {
    let stream = reader
        .jetstream()
        .get_stream_no_info(bucket.stream())
        .await
        .map_err(|e| format!("state bucket {}: {e}", bucket.name))?;
    match stream
        .direct_get_last_for_subject(bucket.subject(MARKER_KEY))
        .await
    {
        Ok(msg) => Ok(Marker::parse(
            Some(&msg.headers),
            &msg.payload,
            msg.sequence,
        )),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(Marker {
            state: None,
            revision: 0,
        }),
        Err(e) => Err(format!("read the backfill marker of {}: {e}", bucket.name)),
    }
}

// --- the tenant's keys ------------------------------------------------------

/// A key's last message so far, decoded as it arrives: the decoding then
/// runs while the server is still sending, not after the last message
/// (that tail was a third of a 100,000-row load). A later message of the
/// same key replaces it.
enum Latest {
    /// A delete marker: no row, but its seq counts for `as_of_seq`.
    Deleted {
        seq: u64,
    },
    /// An oversized value: its object is fetched once the read ends.
    Oversized {
        seq: u64,
        object: String,
    },
    Row(Box<ChangeEvent>),
}

impl Latest {
    fn seq(&self) -> u64 {
        match self {
            Latest::Deleted { seq } | Latest::Oversized { seq, .. } => *seq,
            Latest::Row(event) => event.seq,
        }
    }
}

/// Messages per pull request while reading a tenant's keys.
const PULL_BATCH: u64 = 512;

/// Every current key of the tenant, read until nothing is pending (see
/// `pull.rs`).
async fn read_tenant(
    reader: &mut Reader,
    bucket: &Bucket,
    tenant: &str,
) -> Result<TenantState, ReadError> {
    let (stream, filter) = (bucket.stream(), bucket.subject(&format!("{tenant}.>")));
    let (name, num_pending) = reader
        .create_unacked(&stream, &filter, From::LastPerSubject)
        .await
        .map_err(ReadError::Transient)?;
    // A hash map while reading (a key may come again if written meanwhile),
    // sorted once at the end: inserting into a B-tree per message cost a
    // sixth of a 100,000-row load.
    let mut latest = HashMap::with_capacity(usize::try_from(num_pending).unwrap_or(0).min(1 << 20));
    let nats = reader.jetstream().client();
    let read = PullRead {
        nats: &nats,
        stream: &stream,
        consumer: &name,
        num_pending,
        batch: PULL_BATCH,
        stall: STALL,
    };
    pull::pull_all(read, |msg| {
        if let Some(key) = bucket.row_key(&msg.subject) {
            latest.insert(key.to_string(), latest_of(tenant, key, msg)?);
        }
        Ok(())
    })
    .await?;
    finish(reader, tenant, latest).await
}

/// A key's message as a [`Latest`]; every one carries `Walcast-Seq`.
fn latest_of(tenant: &str, key: &str, msg: &async_nats::Message) -> Result<Latest, ReadError> {
    let headers = msg.headers.as_ref();
    let seq = headers
        .and_then(|h| h.get("Walcast-Seq"))
        .ok_or_else(|| malformed(key, "no Walcast-Seq header".into()))?
        .as_str()
        .parse()
        .map_err(|e| malformed(key, format!("Walcast-Seq: {e}")))?;
    if is_delete(headers) {
        return Ok(Latest::Deleted { seq });
    }
    if let Some(object) = headers.and_then(|h| h.get("Walcast-Object")) {
        let object = object.as_str().to_string();
        return Ok(Latest::Oversized { seq, object });
    }
    decode_row(tenant, key, seq, &msg.payload).map(|event| Latest::Row(Box::new(event)))
}

/// A value's `ChangeEvent`, which must be the key's tenant's event `seq`.
fn decode_row(tenant: &str, key: &str, seq: u64, body: &[u8]) -> Result<ChangeEvent, ReadError> {
    let event = ChangeEvent::decode(body)
        .map_err(|e| malformed(key, format!("undecodable ChangeEvent: {e}")))?;
    if event.tenant_id != tenant || event.seq != seq {
        let reason = format!(
            "Walcast-Seq {seq} of tenant {tenant}, but the value is seq {} of tenant {}",
            event.seq, event.tenant_id
        );
        return Err(malformed(key, reason));
    }
    Ok(event)
}

/// Fetches the oversized values, computes `as_of_seq` over every key
/// (delete markers included) and orders the rows by key.
async fn finish(
    reader: &mut Reader,
    tenant: &str,
    latest: HashMap<String, Latest>,
) -> Result<TenantState, ReadError> {
    let as_of_seq = latest.values().map(Latest::seq).max().unwrap_or(0);
    // Boxed while sorting: a sort moves each element ~log n times, and a
    // `ChangeEvent` is 360 bytes (1 KB before its row images were boxed).
    let mut rows = Vec::with_capacity(latest.len());
    for (key, latest) in latest {
        let event = match latest {
            Latest::Deleted { .. } => continue,
            Latest::Row(event) => event,
            Latest::Oversized { seq, object } => {
                let body = fetch_value(reader, &object).await?;
                Box::new(decode_row(tenant, &key, seq, &body)?)
            }
        };
        rows.push((key, event));
    }
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    // Collected from sorted pairs, the tree is built bottom-up, without a
    // search per key.
    let rows = rows.into_iter().map(|(key, event)| (key, *event)).collect();
    Ok(TenantState { as_of_seq, rows })
}

/// An oversized value's body. walcast deletes a value's object once the
/// key holds a newer value: gone means the key moved on during the read,
/// and the load starts over.
async fn fetch_value(reader: &mut Reader, object: &str) -> Result<Vec<u8>, ReadError> {
    match reader.fetch(object).await {
        Err(ReadError::Definite(Error::ObjectMissing { object })) => Err(ReadError::Transient(
            format!("{object} was replaced during the read"),
        )),
        other => other,
    }
}

/// A KV delete or purge marker (`KV-Operation: DEL` / `PURGE`).
fn is_delete(headers: Option<&HeaderMap>) -> bool {
    headers
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

fn malformed(key: &str, reason: String) -> ReadError {
    ReadError::Definite(Error::Malformed {
        what: format!("state key {key}"),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_row_keys_count() {
        let bucket = Bucket::new("WALCAST_STATE".into());
        assert_eq!(
            bucket.row_key("$KV.WALCAST_STATE.acme.task.1"),
            Some("acme.task.1")
        );
        assert_eq!(
            bucket.row_key("$KV.WALCAST_STATE.acme.lock.task.1"),
            Some("acme.lock.task.1")
        );
        assert_eq!(bucket.row_key("$KV.WALCAST_STATE._walcast.backfill"), None);
        assert_eq!(bucket.row_key("$KV.OTHER.acme.task.1"), None);
    }

    #[test]
    fn marker_states() {
        let mut del = HeaderMap::new();
        del.insert("KV-Operation", "DEL");
        let complete = br#"{"state":"complete","snapshot_lsn":"0/1","rows":3}"#;
        assert!(Marker::parse(None, complete, 7).complete());
        assert!(!Marker::parse(Some(&del), complete, 7).complete());
        let running = Marker::parse(None, br#"{"state":"running"}"#, 7);
        assert_eq!(running.state.as_deref(), Some("running"));
        assert!(!Marker::parse(None, b"not json", 7).complete());
    }
}
