//! Reading the state bucket back (docs/STATE.md), independently of walcast:
//! the newest entry of every key, with its headers, decoded.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use prost::Message as _;
use walcast::proto::ChangeEvent;
use walcast::proto::change_event::{After, Before};

use super::daemon::{StreamEvent, header_map, try_fetch_object};
use super::workload::Tables;

/// The newest entry of one key.
#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub deleted: bool,
    /// `Walcast-Seq`.
    pub seq: u64,
    pub headers: HashMap<String, String>,
    /// The full event (fetched from the object store for a stub).
    pub event: Option<ChangeEvent>,
}

/// Every key's newest entry (values and delete markers), the marker too.
pub async fn read_bucket(nats_url: &str, bucket: &str) -> BTreeMap<String, Entry> {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    let js = jetstream::new(client);
    let mut stalls = 0;
    for _ in 0..50 {
        // An oversized value's object goes once its key holds a newer value:
        // one that vanished during the read is read again.
        if let Some(out) = read_once(&js, bucket, &mut stalls).await {
            return out;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{bucket}: a key's value names an object that stays missing");
}

/// A read that stalls this often fails the test.
const STALLS: u32 = 3;

async fn read_once(
    js: &jetstream::Context,
    bucket: &str,
    stalls: &mut u32,
) -> Option<BTreeMap<String, Entry>> {
    let mut stream = js
        .get_stream(format!("KV_{bucket}"))
        .await
        .expect("the state bucket exists");
    let mut out = BTreeMap::new();
    if stream.info().await.expect("bucket info").state.messages == 0 {
        return Some(out);
    }
    let created = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: DeliverPolicy::LastPerSubject,
            filter_subject: format!("$KV.{bucket}.>"),
            ..Default::default()
        })
        .await;
    let consumer = match created {
        Ok(consumer) => consumer,
        Err(e) => {
            // On a cluster, a consumer created as a node dies can be placed
            // on that node and never answer: another one is placed anew.
            stalled(
                bucket,
                stalls,
                &format!("creating its consumer failed ({e})"),
            );
            return None;
        }
    };
    let mut messages = consumer.messages().await.expect("read the bucket");
    let prefix = format!("$KV.{bucket}.");
    loop {
        let Ok(next) = tokio::time::timeout(Duration::from_secs(10), messages.next()).await else {
            // Seen while thousands of keys were written during the read:
            // read again on a new consumer, as the clients' loads do.
            stalled(bucket, stalls, "no message for 10 s");
            return None;
        };
        let Some(msg) = next else { break };
        let msg = msg.expect("bucket message");
        let pending = msg.info().expect("message info").pending;
        let headers = header_map(msg.headers.as_ref());
        let key = msg
            .subject
            .as_str()
            .strip_prefix(&prefix)
            .expect("a key subject")
            .to_string();
        let deleted = headers
            .get("KV-Operation")
            .is_some_and(|op| op == "DEL" || op == "PURGE");
        let event = if deleted || key.starts_with("_walcast.") {
            None
        } else {
            let payload = match headers.get("Walcast-Object") {
                Some(object) => try_fetch_object(js, object).await?,
                None => msg.payload.to_vec(),
            };
            Some(ChangeEvent::decode(payload.as_slice()).expect("a value is a ChangeEvent"))
        };
        let seq = headers
            .get("Walcast-Seq")
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        out.insert(
            key.clone(),
            Entry {
                key,
                deleted,
                seq,
                headers,
                event,
            },
        );
        if pending == 0 {
            break;
        }
    }
    Some(out)
}

/// Counts a read that must start again; too many fail the test.
fn stalled(bucket: &str, stalls: &mut u32, why: &str) {
    *stalls += 1;
    assert!(
        *stalls < STALLS,
        "{bucket}: the bucket read stalled {STALLS} times, the last: {why}"
    );
    eprintln!("{bucket}: the bucket read stalled ({why}); reading it again");
}

/// Waits (up to `timeout`) until the bucket holds exactly `real`'s rows;
/// panics with `what` otherwise.
pub async fn wait_bucket_holds(
    nats_url: &str,
    bucket: &str,
    real: &Tables,
    timeout: Duration,
    what: &str,
) {
    if let Err(e) = super::wait_until(timeout, || async {
        rows_of(&read_bucket(nats_url, bucket).await) == *real
    })
    .await
    {
        let held = rows_of(&read_bucket(nats_url, bucket).await);
        panic!("{what}: {e}; {}", differences(&held, real));
    }
}

/// The rows that differ between the bucket's `held` and the tables' `real`.
fn differences(held: &Tables, real: &Tables) -> String {
    fn diff<V: PartialEq>(
        name: &str,
        held: &BTreeMap<String, V>,
        real: &BTreeMap<String, V>,
    ) -> Vec<String> {
        let keys: std::collections::BTreeSet<&String> = held.keys().chain(real.keys()).collect();
        keys.into_iter()
            .filter(|k| held.get(*k) != real.get(*k))
            .map(|k| {
                let side = |t: &BTreeMap<String, V>| {
                    if t.contains_key(k) {
                        "present"
                    } else {
                        "absent"
                    }
                };
                format!("{name} {k}: bucket {}, tables {}", side(held), side(real))
            })
            .collect()
    }
    let mut out = diff("task", &held.tasks, &real.tasks);
    out.extend(diff("project", &held.projects, &real.projects));
    out.extend(diff("lock", &held.locks, &real.locks));
    out.truncate(20);
    out.join("; ")
}

/// The readiness marker's `state`, if any.
pub async fn marker_state(nats_url: &str, bucket: &str) -> Option<String> {
    let client = async_nats::connect(nats_url).await.ok()?;
    let store = jetstream::new(client).get_key_value(bucket).await.ok()?;
    let value = store.get("_walcast.backfill").await.ok()??;
    let json: serde_json::Value = serde_json::from_slice(&value).ok()?;
    Some(json["state"].as_str()?.to_string())
}

/// The rows the bucket holds, in the form the tables are compared in.
pub fn rows_of(entries: &BTreeMap<String, Entry>) -> Tables {
    let mut tables = Tables::default();
    for entry in entries.values() {
        if let Some(event) = &entry.event {
            tables.apply(event);
        }
    }
    tables
}

/// The key of the row an event is about (docs/STATE.md), from its images.
pub fn key_of(event: &ChangeEvent) -> String {
    let t = &event.tenant_id;
    match (&event.after, &event.before) {
        (Some(After::Task(r)), _) | (None, Some(Before::TaskBefore(r))) => {
            format!("{t}.task.{}", r.id)
        }
        (Some(After::Project(r)), _) | (None, Some(Before::ProjectBefore(r))) => {
            format!("{t}.project.{}", r.id)
        }
        (Some(After::Lock(r)), _) | (None, Some(Before::LockBefore(r))) => {
            format!("{t}.lock.{}.{}", r.record_type, r.record_id)
        }
        _ => panic!("an event without a row image: {event:?}"),
    }
}

/// The key a row had before an UPDATE that changed its tenant or id (from
/// its before image), when it differs from the event's own key.
pub fn vacated_key(event: &ChangeEvent) -> Option<String> {
    let (tenant, before) = match &event.before {
        Some(Before::TaskBefore(r)) => (&r.tenant_id, format!("{}.task.{}", r.tenant_id, r.id)),
        Some(Before::ProjectBefore(r)) => {
            (&r.tenant_id, format!("{}.project.{}", r.tenant_id, r.id))
        }
        Some(Before::LockBefore(r)) => (
            &r.tenant_id,
            format!("{}.lock.{}.{}", r.tenant_id, r.record_type, r.record_id),
        ),
        None => return None,
    };
    let valid_tenant = |t: &str| {
        (1..=128).contains(&t.len())
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    let own = valid_tenant(&event.tenant_id).then(|| key_of(event));
    (valid_tenant(tenant) && own.as_ref() != Some(&before)).then_some(before)
}

/// Asserts the bucket is the stream applied to the backfilled rows: each
/// key's `Walcast-Seq` is its row's last event's seq (0 for a row with no
/// event), each deleted row is a marker with its delete's seq, a key an
/// UPDATE moved the row from is a marker with the seq it held, and the rows
/// equal `real` (the tables as SELECT sees them).
pub fn assert_state_exact(
    entries: &BTreeMap<String, Entry>,
    events: &[StreamEvent],
    real: &Tables,
) {
    let mut last_seq: HashMap<String, (u64, bool)> = HashMap::new();
    for m in events
        .iter()
        .filter(|m| m.event.before.is_some() || m.event.seq > 0)
    {
        if let Some(before) = vacated_key(&m.event) {
            let held = last_seq.get(&before).map_or(0, |(seq, _)| *seq);
            last_seq.insert(before, (held, true));
        }
        if m.event.tenant_id.is_empty() || m.event.seq == 0 {
            continue; // a dead letter
        }
        let deleted = m.event.after.is_none();
        last_seq.insert(key_of(&m.event), (m.event.seq, deleted));
    }
    for (key, entry) in entries.iter().filter(|(k, _)| !k.starts_with("_walcast.")) {
        let (seq, deleted) = last_seq.get(key).copied().unwrap_or((0, false));
        assert_eq!(
            entry.seq, seq,
            "{key}: Walcast-Seq is its row's last event's seq"
        );
        assert_eq!(
            entry.deleted, deleted,
            "{key}: a delete marker exactly when the row's last event deleted it"
        );
    }
    for (key, (_, deleted)) in &last_seq {
        if *deleted {
            assert!(
                entries.get(key).is_some_and(|e| e.deleted),
                "{key}: deleted row has its marker"
            );
        }
    }
    let rows = rows_of(entries);
    assert_eq!(rows.tasks.len(), real.tasks.len(), "task count");
    for (id, task) in &real.tasks {
        assert_eq!(rows.tasks.get(id), Some(task), "task {id}");
    }
    assert_eq!(rows.projects, real.projects, "projects");
    assert_eq!(rows.locks, real.locks, "locks");
}
