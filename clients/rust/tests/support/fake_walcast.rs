//! A stand-in for `walcast run` on a real nats-server, for the state tests:
//! it publishes `ChangeEvent`s to the stream exactly as walcast does
//! (subject, headers, oversized bodies in the object store), answers the
//! catch-up service (SPEC §7) from what it published, and writes the state
//! bucket exactly as `docs/STATE.md` lays it out (values and delete markers
//! with `Walcast-Seq` / `Walcast-Stream-Seq`, claim checks, the
//! `_walcast.backfill` marker). A [`Model`] generates a tenant's changes and
//! keeps the rows they leave, to compare loads against.
//!
//! Kept apart from `support/mod.rs` (shared with the ws-gateway crate, which
//! lacks these dependencies): include it with `#[path]`.

#![allow(dead_code)] // each test uses a different part

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, object_store, stream};
use futures::StreamExt;
use prost::Message as _;
use rand::Rng;
use serde::Deserialize;
use tokio::sync::Mutex;
use walcast_client::proto::{Action, ChangeEvent, EditingLock, Entity, Task, change_event};

pub const STREAM: &str = "WALCAST";
pub const BUCKET: &str = "WALCAST_STATE";
pub const OBJECTS: &str = "WALCAST_OVERSIZED";

/// Which stream sequences hold each tenant's seqs, for the catch-up answers.
#[derive(Default)]
struct Index {
    tenants: HashMap<String, BTreeMap<u64, u64>>,
    last_stream_seq: u64,
}

/// The fake daemon: stream publisher, catch-up service, state writer.
pub struct FakeWalcast {
    pub nats: async_nats::Client,
    js: jetstream::Context,
    objects: object_store::ObjectStore,
    /// Locked across a publish and its index update, so a catch-up answer
    /// never sees an event in the stream that the index lacks.
    index: Arc<Mutex<Index>>,
    service: tokio::task::JoinHandle<()>,
}

impl Drop for FakeWalcast {
    fn drop(&mut self) {
        self.service.abort();
    }
}

impl FakeWalcast {
    /// Creates the stream and the object store and starts the catch-up
    /// service; the state bucket comes with [`FakeWalcast::create_bucket`].
    pub async fn start(url: &str) -> anyhow::Result<FakeWalcast> {
        let nats = async_nats::connect(url).await?;
        let js = jetstream::new(nats.clone());
        js.create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["walcast.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await?;
        let objects = js
            .create_object_store(object_store::Config {
                bucket: OBJECTS.into(),
                ..Default::default()
            })
            .await?;
        let index = Arc::new(Mutex::new(Index::default()));
        let service = start_catchup_service(nats.clone(), index.clone()).await?;
        Ok(FakeWalcast {
            nats,
            js,
            objects,
            index,
            service,
        })
    }

    /// The state bucket as walcast creates it: history 1, direct gets.
    pub async fn create_bucket(&self) -> anyhow::Result<()> {
        self.js
            .create_key_value(kv::Config {
                bucket: BUCKET.into(),
                history: 1, // async-nats sets allow_direct itself
                ..Default::default()
            })
            .await?;
        Ok(())
    }

    /// Publishes `event` to the stream like walcast (oversized: the full
    /// event in the object store, a stub in the stream); its stream sequence.
    pub async fn publish(&self, event: &ChangeEvent, oversized: bool) -> anyhow::Result<u64> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        headers.insert("Walcast-Tenant", event.tenant_id.as_str());
        headers.insert("Walcast-Seq", event.seq.to_string().as_str());
        headers.insert("Walcast-Lsn", event.commit_lsn.to_string().as_str());
        headers.insert("Content-Type", "application/x-protobuf");
        let body = self.claim_check(event, oversized, &mut headers).await?;
        let mut index = self.index.lock().await;
        let ack = self
            .js
            .publish_with_headers(subject(event), headers, body.into())
            .await?
            .await?;
        let seqs = index.tenants.entry(event.tenant_id.clone()).or_default();
        seqs.insert(event.seq, ack.sequence);
        index.last_stream_seq = ack.sequence;
        Ok(ack.sequence)
    }

    /// Publishes a change, then writes its key: the daemon's order.
    pub async fn apply(&self, change: &Change, oversized: bool) -> anyhow::Result<()> {
        let stream_seq = self.publish(&change.event, oversized).await?;
        match change.event.after {
            Some(_) => {
                self.put_row(&change.key, &change.event, stream_seq, oversized)
                    .await
            }
            None => {
                self.delete_row(&change.key, change.event.seq, stream_seq)
                    .await
            }
        }
    }

    /// Writes a row's value (`Walcast-Seq` = the event's seq, 0 for a
    /// backfilled row).
    pub async fn put_row(
        &self,
        key: &str,
        event: &ChangeEvent,
        stream_seq: u64,
        oversized: bool,
    ) -> anyhow::Result<()> {
        let mut headers = state_headers(event.seq, stream_seq);
        headers.insert("Content-Type", "application/x-protobuf");
        let body = self.claim_check(event, oversized, &mut headers).await?;
        self.put(key, headers, body).await
    }

    /// A delete marker carrying the delete event's seq.
    pub async fn delete_row(&self, key: &str, seq: u64, stream_seq: u64) -> anyhow::Result<()> {
        let mut headers = state_headers(seq, stream_seq);
        headers.insert("KV-Operation", "DEL");
        self.put(key, headers, Vec::new()).await
    }

    /// Writes the readiness marker with `state` (`running`, `complete`, …).
    pub async fn set_marker(&self, state: &str) -> anyhow::Result<()> {
        let body = serde_json::json!({
            "state": state, "snapshot_lsn": "0/1A2B3C4", "rows": 0,
            "completed_at": "2025-01-02T03:04:05Z",
        });
        self.put(
            "_walcast.backfill",
            HeaderMap::new(),
            body.to_string().into_bytes(),
        )
        .await
    }

    /// Deletes stream messages (retention), so the catch-up service says
    /// `too_old` for positions before what is left.
    pub async fn forget(
        &self,
        tenant: &str,
        seqs: std::ops::RangeInclusive<u64>,
    ) -> anyhow::Result<()> {
        let stream = self.js.get_stream(STREAM).await?;
        let mut index = self.index.lock().await;
        let known = index.tenants.entry(tenant.to_string()).or_default();
        for seq in seqs {
            if let Some(stream_seq) = known.remove(&seq) {
                stream.delete_message(stream_seq).await?;
            }
        }
        Ok(())
    }

    async fn put(&self, key: &str, headers: HeaderMap, body: Vec<u8>) -> anyhow::Result<()> {
        let subject = format!("$KV.{BUCKET}.{key}");
        self.js
            .publish_with_headers(subject, headers, body.into())
            .await?
            .await?;
        Ok(())
    }

    /// The body to publish: the event, or (oversized) its stub after
    /// storing the full event and naming it in `Walcast-Object`.
    async fn claim_check(
        &self,
        event: &ChangeEvent,
        oversized: bool,
        headers: &mut HeaderMap,
    ) -> anyhow::Result<Vec<u8>> {
        if !oversized {
            return Ok(event.encode_to_vec());
        }
        let full = event.encode_to_vec();
        self.objects
            .put(event.event_id.as_str(), &mut full.as_slice())
            .await?;
        headers.insert(
            "Walcast-Object",
            format!("{OBJECTS}/{}", event.event_id).as_str(),
        );
        let stub = ChangeEvent {
            after: None,
            before: None,
            extra: Default::default(),
            ..event.clone()
        };
        Ok(stub.encode_to_vec())
    }
}

fn state_headers(seq: u64, stream_seq: u64) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert("Walcast-Seq", seq.to_string().as_str());
    headers.insert("Walcast-Stream-Seq", stream_seq.to_string().as_str());
    headers
}

/// `walcast.<tenant>.<entity>.<action>`, names lower-case.
fn subject(event: &ChangeEvent) -> String {
    let name = |full: &str, prefix: &str| full.trim_start_matches(prefix).to_lowercase();
    let entity = name(event.entity().as_str_name(), "ENTITY_");
    let action = name(event.action().as_str_name(), "ACTION_");
    format!("walcast.{}.{entity}.{action}", event.tenant_id)
}

// --- the catch-up service ---------------------------------------------------

async fn start_catchup_service(
    nats: async_nats::Client,
    index: Arc<Mutex<Index>>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    // The shared subject and the tenant-scoped one the client uses (SPEC §7).
    let shared = nats.subscribe("walcast-api.v1.catchup").await?;
    let scoped = nats.subscribe("walcast-api.v1.catchup.*").await?;
    let mut requests = futures::stream::select(shared, scoped);
    nats.flush().await?;
    Ok(tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let Some(reply) = request.reply else { continue };
            let (headers, body) = answer(&index, &request.payload).await;
            let _ = nats
                .publish_with_headers(reply, headers, body.to_string().into())
                .await;
        }
    }))
}

/// SPEC §7's answer from the index.
async fn answer(index: &Mutex<Index>, payload: &[u8]) -> (HeaderMap, serde_json::Value) {
    #[derive(Deserialize)]
    struct Request {
        tenant_id: String,
        after_seq: u64,
    }
    let Ok(Request {
        tenant_id,
        after_seq,
    }) = serde_json::from_slice(payload)
    else {
        return error("400", serde_json::json!({"error": "bad_request"}));
    };
    let index = index.lock().await;
    let empty = BTreeMap::new();
    let seqs = index.tenants.get(&tenant_id).unwrap_or(&empty);
    let last_seq = seqs.keys().next_back().copied().unwrap_or(0);
    let oldest_seq = seqs.keys().next().copied().unwrap_or(0);
    let start = if after_seq > last_seq {
        return error(
            "416",
            serde_json::json!({"error": "ahead", "last_seq": last_seq}),
        );
    } else if after_seq == last_seq {
        index.last_stream_seq + 1
    } else if let Some(stream_seq) = seqs.get(&(after_seq + 1)) {
        *stream_seq
    } else {
        let body =
            serde_json::json!({"error": "too_old", "oldest_seq": oldest_seq, "last_seq": last_seq});
        return error("410", body);
    };
    let body = serde_json::json!({
        "stream": STREAM, "filter_subject": format!("walcast.{tenant_id}.>"),
        "start_stream_seq": start, "last_seq": last_seq,
    });
    (HeaderMap::new(), body)
}

fn error(code: &str, body: serde_json::Value) -> (HeaderMap, serde_json::Value) {
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Service-Error-Code", code);
    headers.insert("Nats-Service-Error", body["error"].as_str().unwrap_or(""));
    (headers, body)
}

// --- a tenant's changes and the rows they leave ----------------------------

/// One row change: the state key it writes and its event (`after` absent
/// for a delete).
#[derive(Debug, Clone)]
pub struct Change {
    pub key: String,
    pub event: ChangeEvent,
}

/// A tenant's rows, changed by random creates, updates and deletes of
/// tasks and locks, numbered 1, 2, 3… like walcast.
pub struct Model {
    pub tenant: String,
    pub seq: u64,
    pub rows: BTreeMap<String, ChangeEvent>,
    next_id: u64,
}

impl Model {
    pub fn new(tenant: &str) -> Model {
        Model {
            tenant: tenant.to_string(),
            seq: 0,
            rows: BTreeMap::new(),
            next_id: 0,
        }
    }

    /// A row copied by the backfill (seq 0, the create action), added to
    /// the rows; write it with [`FakeWalcast::put_row`].
    pub fn backfilled(&mut self) -> Change {
        let mut change = self.create(0);
        change.event.event_id = format!("backfill-0/1A2B3C4-{}", change.key);
        apply(&mut self.rows, &change.key, &change.event);
        change
    }

    /// The tenant's next change (a create when there are few rows), applied
    /// to the rows.
    pub fn next_change(&mut self, rng: &mut impl Rng) -> Change {
        self.seq += 1;
        let roll = rng.random_range(0..10);
        let change = if self.rows.len() < 3 || roll < 4 {
            self.create(self.seq)
        } else {
            let pick = rng.random_range(0..self.rows.len());
            let (key, row) = self.rows.iter().nth(pick).expect("a row");
            let (key, row) = (key.clone(), row.clone());
            if roll < 8 {
                self.update(key, &row)
            } else {
                self.delete(key, &row)
            }
        };
        apply(&mut self.rows, &change.key, &change.event);
        change
    }

    /// The tenant's next change: deleting `key`'s row.
    pub fn delete_row(&mut self, key: &str) -> Change {
        self.seq += 1;
        let row = self.rows[key].clone();
        let change = self.delete(key.to_string(), &row);
        apply(&mut self.rows, key, &change.event);
        change
    }

    /// A new task, or every third one a lock.
    fn create(&mut self, seq: u64) -> Change {
        self.next_id += 1;
        let id = format!("{:08}-0000-4000-8000-{:012}", self.next_id, seq);
        if self.next_id.is_multiple_of(3) {
            let lock = EditingLock {
                tenant_id: self.tenant.clone(),
                record_type: "task".into(),
                record_id: id.clone(),
                locked_by: "user-1".into(),
                ..Default::default()
            };
            let key = format!("{}.lock.task.{id}", self.tenant);
            let mut event = self.event(seq, Entity::Lock, Action::Acquired, format!("task:{id}"));
            event.after = Some(change_event::After::Lock(Box::new(lock)));
            return Change { key, event };
        }
        let task = Task {
            id: id.clone(),
            tenant_id: self.tenant.clone(),
            title: format!("task {id}"),
            status: "todo".into(),
            version: 1,
            ..Default::default()
        };
        let key = format!("{}.task.{id}", self.tenant);
        let mut event = self.event(seq, Entity::Task, Action::Created, id);
        event.after = Some(change_event::After::Task(Box::new(task)));
        Change { key, event }
    }

    fn update(&self, key: String, row: &ChangeEvent) -> Change {
        let (action, after) = match row.after.clone() {
            Some(change_event::After::Task(mut task)) => {
                task.version += 1;
                task.title = format!("{} v{}", task.id, task.version);
                (Action::Updated, change_event::After::Task(task))
            }
            Some(change_event::After::Lock(mut lock)) => {
                lock.locked_by = format!("user-{}", self.seq);
                (Action::Transferred, change_event::After::Lock(lock))
            }
            other => panic!("no update for {other:?}"),
        };
        let mut event = self.event(self.seq, row.entity(), action, row.entity_id.clone());
        event.after = Some(after);
        Change { key, event }
    }

    fn delete(&self, key: String, row: &ChangeEvent) -> Change {
        let action = match row.entity() {
            Entity::Lock => Action::Released,
            _ => Action::Deleted,
        };
        let event = self.event(self.seq, row.entity(), action, row.entity_id.clone());
        Change { key, event }
    }

    fn event(&self, seq: u64, entity: Entity, action: Action, entity_id: String) -> ChangeEvent {
        ChangeEvent {
            event_id: format!("{}-{seq}", self.tenant),
            tenant_id: self.tenant.clone(),
            seq,
            entity: entity as i32,
            action: action as i32,
            entity_id,
            commit_lsn: 1_000 + seq,
            xid: 700 + seq,
            table: "public.tasks".into(),
            ..Default::default()
        }
    }
}

/// Applies one event to rows keyed by state key: what an application does
/// with the events after a snapshot.
pub fn apply(rows: &mut BTreeMap<String, ChangeEvent>, key: &str, event: &ChangeEvent) {
    match event.after {
        Some(_) => rows.insert(key.to_string(), event.clone()),
        None => rows.remove(key),
    };
}

/// The state key of an event's row (SPEC §8).
pub fn state_key(event: &ChangeEvent) -> String {
    let entity = subject(event)
        .split('.')
        .nth(2)
        .unwrap_or_default()
        .to_string();
    let id = event.entity_id.replace(':', ".");
    format!("{}.{entity}.{id}", event.tenant_id)
}
