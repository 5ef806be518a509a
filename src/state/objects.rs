//! Oversized state values (SPEC §8: "oversized values use the claim check
//! of §3"). An oversized event's full body is in the stream's object store,
//! which expires with the stream (`--stream-max-age`); a row's value must
//! not. So the state keeps its own copy in the object store
//! `<state bucket>_OVERSIZED` (no max age), and the key's `Walcast-Object`
//! header names that copy.
//!
//! Each value gets a new object, named `<key>.<seq>`: a loader holding a
//! key's value never reads a newer value's body under the same name (if the
//! key moved on meanwhile and its old object is gone, the load retries).
//! An object is deleted only after its key's next write is acknowledged, so
//! a key never names a deleted object.
//!
//! Invariant owned here: every object in the store is its key's current
//! value, or is about to be deleted — [`Objects`] indexes them by key (read
//! back from the store at start) and the projection retires a key's other
//! objects once a newer write of that key is applied.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::{self, object_store};
use futures::StreamExt;
use tokio::sync::Mutex;

/// The state's object store, its index by key, and the deletions waiting
/// for a newer write of their key to be applied.
#[derive(Clone)]
pub struct Objects {
    js: jetstream::Context,
    pub name: String,
    store: object_store::ObjectStore,
    /// Chunks must fit the server's `max_payload`.
    chunk_size: usize,
    index: Arc<Mutex<Index>>,
}

#[derive(Default)]
struct Index {
    /// Object names per key (normally one; two between a write and its ack).
    by_key: HashMap<String, Vec<String>>,
    /// `(stream position, key, seq)` of writes after which the key's
    /// objects of older seqs go, in position order.
    retiring: VecDeque<(u64, String, u64)>,
}

/// The store's name for a state bucket.
pub fn store_name(state_bucket: &str) -> String {
    format!("{state_bucket}_OVERSIZED")
}

impl Objects {
    /// Opens (or creates) the store; see [`Objects::index_existing`].
    pub async fn open(
        js: &jetstream::Context,
        state_bucket: &str,
        replicas: usize,
    ) -> Result<Objects, String> {
        let name = store_name(state_bucket);
        let store = match js.get_object_store(&name).await {
            Ok(store) => store,
            Err(_) => js
                .create_object_store(object_store::Config {
                    bucket: name.clone(),
                    description: Some("walcast: oversized values of the state bucket".into()),
                    num_replicas: replicas,
                    storage: jetstream::stream::StorageType::File,
                    ..Default::default()
                })
                .await
                .map_err(|e| format!("create the object store {name} on NATS: {e}"))?,
        };
        crate::broker::limits::ensure_consumer_limit(js, &format!("OBJ_{name}")).await;
        let max_payload = js.client().server_info().max_payload;
        Ok(Objects {
            js: js.clone(),
            name,
            store,
            chunk_size: max_payload.saturating_sub(512).clamp(1024, 128 * 1024),
            index: Arc::default(),
        })
    }

    /// Reads which objects the store already holds (values written before
    /// this start), in the background: the index only serves deleting
    /// replaced values, so the state must not wait for it — listing creates
    /// a consumer, which times out while a cluster elects the store's
    /// leader. An object a key's write retired before the listing found it
    /// stays until that key's next write.
    pub fn index_existing(&self) {
        let objects = self.clone();
        tokio::spawn(async move {
            for attempt in 0u32..10 {
                match objects.list().await {
                    Ok(()) => return,
                    Err(e) if attempt == 0 => {
                        tracing::warn!(error = %e, "listing the state's oversized values failed; retrying (only their clean-up waits)")
                    }
                    Err(_) => {}
                }
                tokio::time::sleep(std::time::Duration::from_secs(1 << attempt.min(5))).await;
            }
        });
    }

    async fn list(&self) -> Result<(), String> {
        let failed =
            |e: &dyn std::fmt::Display| format!("list the object store {} on NATS: {e}", self.name);
        let mut list = self.store.list().await.map_err(|e| failed(&e))?;
        let mut names = Vec::new();
        while let Some(info) = list.next().await {
            names.push(info.map_err(|e| failed(&e))?.name);
        }
        for name in names {
            if let Some((key, _seq)) = name.rsplit_once('.') {
                self.register(key, &name).await;
            }
        }
        Ok(())
    }

    /// The object store bucket oversized backfilled rows go to (through
    /// the publisher's claim check, named by [`Objects::name_for`]).
    pub fn bucket(&self, replicas: usize) -> crate::publish::sink::Bucket {
        crate::publish::sink::Bucket {
            name: self.name.clone(),
            max_age: std::time::Duration::ZERO,
            replicas,
        }
    }

    /// The object name of `key`'s value at `seq`.
    pub fn name_for(key: &str, seq: u64) -> String {
        format!("{key}.{seq}")
    }

    /// Stores `body` as the value of `key` at `seq`; returns the object's
    /// name (the `Walcast-Object` header is `<store>/<name>`).
    pub async fn store(&self, key: &str, seq: u64, body: &[u8]) -> Result<String, String> {
        let object = Self::name_for(key, seq);
        let meta = object_store::ObjectMetadata {
            name: object.clone(),
            chunk_size: Some(self.chunk_size),
            ..Default::default()
        };
        let mut reader = body;
        self.store
            .put(meta, &mut reader)
            .await
            .map_err(|e| format!("store the oversized value of {key} in {}: {e}", self.name))?;
        self.register(key, &object).await;
        Ok(object)
    }

    /// Records that `object` holds a value of `key`.
    pub async fn register(&self, key: &str, object: &str) {
        let mut index = self.index.lock().await;
        let names = index.by_key.entry(key.to_string()).or_default();
        if !names.iter().any(|n| n == object) {
            names.push(object.to_string());
        }
    }

    /// An oversized event's full body, from the stream's object store
    /// (`<bucket>/<event_id>`, its `Walcast-Object` header); [`Objects::store`]
    /// keeps it as a key's value (the stream's copy expires with the stream).
    pub async fn read_event(&self, object: &str) -> Result<bytes::Bytes, String> {
        read(&self.js, object).await.map(bytes::Bytes::from)
    }

    /// After the write of `key`'s value of `seq` at stream `position`:
    /// once it is applied, the key's objects of older seqs go. (Not "every
    /// object but this write's": by then a later write of the key may have
    /// stored its own.)
    pub async fn retire_after(&self, position: u64, key: &str, seq: u64) {
        let mut index = self.index.lock().await;
        if index.by_key.contains_key(key) {
            index.retiring.push_back((position, key.to_string(), seq));
        }
    }

    /// Deletes the objects whose key's newer write is applied (`applied`:
    /// every position up to it).
    pub async fn retire_applied(&self, applied: u64) -> Result<(), String> {
        loop {
            let doomed = {
                let mut index = self.index.lock().await;
                match index.retiring.front() {
                    Some((position, _, _)) if *position <= applied => {}
                    _ => return Ok(()),
                }
                let Some((_, key, seq)) = index.retiring.pop_front() else {
                    return Ok(());
                };
                let names = index.by_key.remove(&key).unwrap_or_default();
                let (doomed, kept): (Vec<_>, Vec<_>) =
                    names.into_iter().partition(|n| seq_of(n) < seq);
                if !kept.is_empty() {
                    index.by_key.insert(key, kept);
                }
                doomed
            };
            for object in doomed {
                self.delete(&object).await?;
            }
        }
    }

    async fn delete(&self, object: &str) -> Result<(), String> {
        match self.store.delete(object).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(format!(
                "delete the replaced value {object} from {} on NATS: {e}",
                self.name
            )),
        }
    }
}

/// The seq an object name (`<key>.<seq>`) holds a value of.
fn seq_of(name: &str) -> u64 {
    name.rsplit_once('.')
        .and_then(|(_, seq)| seq.parse().ok())
        .unwrap_or(0)
}

/// An object's body (`<bucket>/<name>`), read through an ordered pull
/// consumer on its chunks (as the clients do: `ObjectStore::get` reads
/// through a push consumer, seen to hang in async-nats 0.51).
async fn read(js: &jetstream::Context, object: &str) -> Result<Vec<u8>, String> {
    let failed =
        |e: &dyn std::fmt::Display| format!("read the oversized event {object} from NATS: {e}");
    let (bucket, name) = object
        .split_once('/')
        .ok_or_else(|| failed(&"not <bucket>/<name>"))?;
    let store = js.get_object_store(bucket).await.map_err(|e| failed(&e))?;
    let info = store.info(name).await.map_err(|e| failed(&e))?;
    let stream = js
        .get_stream_no_info(format!("OBJ_{bucket}"))
        .await
        .map_err(|e| failed(&e))?;
    let consumer = stream
        .create_consumer(crate::broker::ordered::with_short_heartbeats(
            OrderedConfig {
                filter_subject: format!("$O.{bucket}.C.{}", info.nuid),
                deliver_policy: DeliverPolicy::All,
                ..Default::default()
            },
        ))
        .await
        .map_err(|e| failed(&e))?;
    let mut pending = consumer.cached_info().num_pending;
    let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
    let mut body = Vec::with_capacity(info.size);
    while pending > 0 {
        let next = tokio::time::timeout(std::time::Duration::from_secs(10), messages.next());
        let msg = match next.await {
            Ok(Some(Ok(msg))) => msg,
            Ok(Some(Err(e))) => return Err(failed(&e)),
            Ok(None) | Err(_) => return Err(failed(&"its chunks stalled")),
        };
        body.extend_from_slice(&msg.payload);
        pending = msg.info().map_err(|e| failed(&e))?.pending;
    }
    if body.len() != info.size {
        return Err(failed(&format!(
            "read {} of {} bytes",
            body.len(),
            info.size
        )));
    }
    Ok(body)
}
