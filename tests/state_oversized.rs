//! Oversized values in the state bucket (SPEC §8, the claim check of §3):
//! the state keeps its own copy of each in `WALCAST_STATE_OVERSIZED` (no max
//! age), so a row's value outlives the stream's copy, which expires with the
//! stream; a replaced or deleted value's copy is removed.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use walcast::config::Options;

use crate::oversized::{small_payload_env, sql_blob};
use crate::support::daemon::Daemon;
use crate::support::state::{marker_state, read_bucket, rows_of};
use crate::support::wait_until;
use crate::support::workload::Tables;

const BUCKET: &str = "WALCAST_STATE";
const OBJECTS: &str = "WALCAST_STATE_OVERSIZED";
/// Over the 64 KiB `max_payload`: every such row is oversized.
const LARGE: usize = 200_000;

/// A backfilled oversized row and oversized rows written while walcast runs
/// (one changes its id) load whole (Rust client) after the stream's copies
/// expired (3 s max age); the state's object store then holds exactly the
/// current values' objects.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_values_outlive_the_stream_and_go_with_their_row() {
    let env = small_payload_env(64 * 1024).await;
    let client = env.pg.client().await;
    // A row from before walcast (backfilled), written with no slot.
    client
        .batch_execute("SELECT pg_drop_replication_slot('walcast')")
        .await
        .expect("drop the slot");
    insert(&client, 1).await;
    walcast::migrate::run(&env.settings())
        .await
        .expect("migrate creates the slot again");
    let options = Options {
        stream_max_age: Some("3s".into()),
        duplicate_window: Some("1s".into()),
        ..env.options()
    };
    let daemon = Daemon::start(options.resolve().expect("valid settings"));
    let url = env.nats.url();
    wait_until(Duration::from_secs(60), || async {
        marker_state(&url, BUCKET).await.as_deref() == Some("complete")
    })
    .await
    .expect("the backfill completes");

    insert(&client, 2).await; // stays
    set_description(&client, 1, &format!("repeat('c', {LARGE})")).await; // replaced, still large
    insert(&client, 3).await;
    set_description(&client, 3, "'small now'").await; // its copy goes
    insert(&client, 4).await;
    client
        .batch_execute(&format!("DELETE FROM tasks WHERE id = '{}'", id(4)))
        .await
        .expect("delete");
    // Row 2 takes the id 5: an oversized update (its stub has no before
    // image) that leaves its old key.
    client
        .batch_execute(&format!(
            "UPDATE tasks SET id = '{}' WHERE id = '{}'",
            id(5),
            id(2)
        ))
        .await
        .expect("change an id");
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let real = Tables::load(&client).await;
    wait_until(Duration::from_secs(30), || async {
        rows_of(&read_bucket(&url, BUCKET).await) == real
    })
    .await
    .expect("the bucket holds the tables' rows");

    let js = jetstream::new(async_nats::connect(&url).await.expect("connect"));
    wait_until(Duration::from_secs(30), || async {
        stream_messages(&js, "OBJ_WALCAST_OVERSIZED").await == 0
    })
    .await
    .expect("the stream's oversized copies expire with the stream (3 s)");
    let loaded = load(&url, "big").await;
    assert_eq!(loaded.len(), 3, "rows 1, 3, 5: {:?}", loaded.keys());
    let description = |n: u128| {
        let key = format!("big.task.{}", id(n));
        match &loaded[&key].after {
            Some(walcast::proto::change_event::After::Task(t)) => t.description.clone(),
            other => panic!("{key}: {other:?}"),
        }
    };
    assert_eq!(description(1), Some("c".repeat(LARGE)));
    assert_eq!(description(5).map(|d| d.len()), Some(LARGE));
    assert_eq!(description(3).as_deref(), Some("small now"));

    // Only the current values' copies remain: rows 1, 3 and 5 (row 3's
    // update is oversized through its `before` image); not row 1's
    // backfilled value, not row 3's first, not deleted row 4's, not row 2's
    // (now row 5).
    let named = || async {
        read_bucket(&url, BUCKET)
            .await
            .values()
            .filter_map(|e| e.headers.get("Walcast-Object").cloned())
            .filter_map(|o| o.strip_prefix(&format!("{OBJECTS}/")).map(String::from))
            .collect::<BTreeSet<_>>()
    };
    let want = named().await;
    assert_eq!(want.len(), 3, "{want:?}");
    wait_until(Duration::from_secs(30), || async {
        objects(&js, OBJECTS).await == want
    })
    .await
    .unwrap_or_else(|e| {
        panic!("the state's object store keeps only the current values' objects {want:?}: {e}")
    });
    daemon.stop().await.expect("clean stop");
}

fn id(n: u128) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

/// A task of tenant `big` whose description is `LARGE` bytes.
async fn insert(client: &tokio_postgres::Client, n: u128) {
    client
        .batch_execute(&format!(
            "INSERT INTO tasks (id, tenant_id, title, description) SELECT '{}', 'big', 'task {n}', {}",
            id(n),
            sql_blob(LARGE)
        ))
        .await
        .expect("insert a large task");
}

async fn set_description(client: &tokio_postgres::Client, n: u128, sql: &str) {
    client
        .batch_execute(&format!(
            "UPDATE tasks SET description = {sql} WHERE id = '{}'",
            id(n)
        ))
        .await
        .expect("update a task");
}

async fn stream_messages(js: &jetstream::Context, stream: &str) -> u64 {
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.messages).unwrap_or(u64::MAX),
        Err(_) => u64::MAX,
    }
}

/// The names of the objects a store holds.
async fn objects(js: &jetstream::Context, store: &str) -> BTreeSet<String> {
    let store = js.get_object_store(store).await.expect("the store exists");
    let mut list = store.list().await.expect("list the objects");
    let mut names = BTreeSet::new();
    while let Some(info) = list.next().await {
        let info = info.expect("object info");
        if !info.deleted {
            names.insert(info.name);
        }
    }
    names
}

/// The tenant's snapshot through the Rust client.
async fn load(
    url: &str,
    tenant: &str,
) -> std::collections::BTreeMap<String, walcast::proto::ChangeEvent> {
    use walcast_client::{Client, Options, StateUpdate};
    let client = Client::connect(url, Options::default())
        .await
        .expect("client");
    let mut state = client.load_and_follow(tenant).expect("load");
    match tokio::time::timeout(Duration::from_secs(30), state.next()).await {
        Ok(Some(Ok(StateUpdate::Snapshot(s)))) => s.rows,
        other => panic!("expected a snapshot: {other:?}"),
    }
}
