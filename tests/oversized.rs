//! Oversized messages (SPEC §3): with a NATS server whose
//! `max_payload` is small (64 KiB), events that do not fit are stored whole
//! in the object store bucket `WALCAST_OVERSIZED` under their event id, and
//! the stream gets a stub (same subject, seq, headers + `Walcast-Object`,
//! without row images and `extra`). Order, seq continuity and exactly-once
//! hold — across a kill -9 — and every full event is retrievable.

use std::time::Duration;

use async_nats::jetstream;
use prost::Message as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use walcast::proto::ChangeEvent;

use crate::support::TempDir;
use crate::support::chaos::{Load, Walcast, catch_up, verify};
use crate::support::daemon::{Env, read_stream, stream_last_seq};
use crate::support::edge::uuid;
use crate::support::nats::NatsOptions;
use crate::support::oracle::Oracle;
use crate::support::workload::Workload;

/// Postgres + a NATS server with a small `max_payload`, migrated.
pub(crate) async fn small_payload_env(max_payload: usize) -> Env {
    Env::start_with(NatsOptions {
        max_payload: Some(max_payload as u32),
        ..NatsOptions::default()
    })
    .await
}

/// Text of exactly `len` bytes that compresses badly (md5 hex).
pub(crate) fn sql_blob(len: usize) -> String {
    format!(
        "left(string_agg(md5(i::text), ''), {len}) FROM generate_series(1, {}) i",
        len / 32 + 1
    )
}

/// `max_payload` = 192 KiB: above the object store's 128 KiB chunks (see
/// the regression test below for smaller limits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_events_keep_order_seq_and_exactly_once() {
    oversized_scenario(192 * 1024).await;
}

/// Regression test for a fixed bug (src/publish/oversized.rs): the full
/// event was stored with the object store's default 128 KiB chunks, and a
/// server whose `max_payload` is below that refused every chunk ("Payload
/// size limit of 65536 exceeded"); the error was retried forever, so the
/// first oversized event stopped the stream for good. Chunks are now sized
/// to `max_payload`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_event_is_stored_when_max_payload_is_below_the_chunk_size() {
    oversized_scenario(64 * 1024).await;
}

async fn oversized_scenario(max_payload: usize) {
    let env = small_payload_env(max_payload).await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("oversized").unwrap();
    let vars = env.env_vars();
    let mut walcast = Walcast::start("walcast-1", dir.path(), &vars, &[]);
    let load = Load::start(&env, 4, Duration::from_millis(5)).await;

    let seed = Workload::seed();
    let mut rng = StdRng::seed_from_u64(seed);
    // Sizes around the limit (an event is the row plus ~300 bytes; an update
    // carries it twice), and far above it.
    let sizes = [
        1_000, 30_000, 32_000, 60_000, 64_500, 65_536, 70_000, 200_000, 1_000_000, 3_000_000,
    ];
    let mut n = 0u64;
    let mut killed = false;
    for round in 0..3 {
        for &size in &sizes {
            n += 1;
            let id = uuid(1_000_000 + n);
            let tenant = format!("big-{}", rng.random_range(0..3));
            client
                .execute(
                    &format!(
                        "INSERT INTO tasks (id, tenant_id, title, description) SELECT $1::text::uuid, $2, 'big', {}",
                        sql_blob(size)
                    ),
                    &[&id, &tenant],
                )
                .await
                .unwrap();
            match rng.random_range(0..4) {
                // Update the big column (before and after both carry it).
                0 => client
                    .execute(
                        "UPDATE tasks SET description = reverse(description), version = version + 1 WHERE id = $1::text::uuid",
                        &[&id],
                    )
                    .await
                    .map(drop)
                    .unwrap(),
                // Update another column (the big one is unchanged TOAST).
                1 => client
                    .execute("UPDATE tasks SET status = 'done' WHERE id = $1::text::uuid", &[&id])
                    .await
                    .map(drop)
                    .unwrap(),
                // Big and small changes in one transaction, then a delete.
                2 => client
                    .batch_execute(&format!(
                        "BEGIN;
                         INSERT INTO projects (id, tenant_id, name, metadata) SELECT '{p}', '{tenant}', 'p', jsonb_build_object('blob', (SELECT {blob}));
                         UPDATE tasks SET title = 'small' WHERE id = '{id}';
                         DELETE FROM tasks WHERE id = '{id}';
                         COMMIT;",
                        p = uuid(2_000_000 + n),
                        blob = sql_blob(size / 2),
                    ))
                    .await
                    .unwrap(),
                _ => {}
            }
        }
        if round == 0 && !killed {
            // kill -9 while big events are being stored and published.
            tokio::time::sleep(Duration::from_millis(300)).await;
            walcast.kill9().await;
            killed = true;
            walcast = Walcast::start("walcast-2", dir.path(), &vars, &[]);
        }
    }
    let stats = load.stop().await;
    if let Err(e) = catch_up(&client, Duration::from_secs(120)).await {
        panic!(
            "walcast did not catch up: {e}\n--- log ---\n{}",
            walcast.log_tail(60)
        );
    }
    let checked = verify("oversized", &env, &client, &oracle).await;

    // Every message that would not fit is a stub pointing at the full event.
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    let stream = js.get_stream("WALCAST").await.unwrap();
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let (mut stubs, mut inline_max) = (0, 0);
    for m in &events {
        let raw = stream.get_raw_message(m.stream_seq).await.unwrap();
        let full_len = m.event.encoded_len();
        match m.headers.get("Walcast-Object") {
            Some(object) => {
                stubs += 1;
                assert_eq!(*object, format!("WALCAST_OVERSIZED/{}", m.event.event_id));
                // walcast's rule: body + headers + 512 bytes of margin must fit.
                assert!(
                    full_len + 512 + 1024 > max_payload,
                    "{}: a {full_len}-byte event would have fit",
                    m.event.event_id
                );
                let stub = ChangeEvent::decode(raw.payload.as_ref()).expect("stub decodes");
                assert!(stub.after.is_none() && stub.before.is_none() && stub.extra.is_empty());
                assert_eq!(
                    (
                        &stub.event_id,
                        stub.seq,
                        &stub.tenant_id,
                        stub.action,
                        stub.tx_index
                    ),
                    (
                        &m.event.event_id,
                        m.event.seq,
                        &m.event.tenant_id,
                        m.event.action,
                        m.event.tx_index
                    )
                );
                assert!(
                    m.event.after.is_some() || m.event.before.is_some(),
                    "full event fetched"
                );
            }
            None => {
                assert_eq!(
                    raw.payload.len(),
                    full_len,
                    "inline body is the whole event"
                );
                assert!(full_len + 512 <= max_payload, "{}", m.event.event_id);
                inline_max = inline_max.max(full_len);
            }
        }
    }
    // Certain: each round inserts these rows whole; the updates, deletes and
    // projects that add more depend on the seed (18 to ~30 seen).
    let certain = 3 * sizes.iter().filter(|&&size| size > max_payload).count();
    assert!(
        stubs >= certain,
        "{stubs} oversized events, expected at least {certain}"
    );
    assert_eq!(
        stream_last_seq(&env.nats.url(), "WALCAST").await,
        events.len() as u64
    );
    let objects = js.get_object_store("WALCAST_OVERSIZED").await.unwrap();
    let mut listed = 0;
    {
        use futures::StreamExt;
        let mut list = objects.list().await.unwrap();
        while let Some(info) = list.next().await {
            let info = info.unwrap();
            assert!(
                events.iter().any(|m| m.event.event_id == info.name),
                "object {} belongs to a stream event",
                info.name
            );
            listed += 1;
        }
    }
    assert_eq!(
        listed, stubs,
        "one object per oversized event, none left over"
    );
    walcast.stop(Duration::from_secs(20)).await;
    eprintln!(
        "seed {seed}: {checked} events checked, {stubs} oversized (largest inline {inline_max} B), load {stats:?}"
    );
}

/// Regression test for a fixed bug (src/publish/oversized.rs): the stub
/// keeps everything but the row images and `extra` — including the actor
/// from a `walcast.actor` message, which the application controls and which
/// can be any size. When the stub itself exceeded `max_payload`, the publish
/// was refused, the error was treated as transient, and walcast retried the
/// same event forever: the stream stopped for every tenant. Now the stream
/// message is reduced to the event's key fields with a `Walcast-Reason`, on
/// its tenant subject with its `seq` (no gap), and the full event is in the
/// object store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stub_larger_than_max_payload_is_published_with_its_key_fields() {
    // Above the 128 KiB object chunks, so storing the full event works.
    let max_payload = 256 * 1024;
    let env = small_payload_env(max_payload).await;
    let client = env.pg.client().await;
    let dir = TempDir::new("oversized-stub").unwrap();
    let mut walcast = Walcast::start("walcast", dir.path(), &env.env_vars(), &[]);
    let actor_id = "a".repeat(300_000);
    let actor = format!(r#"{{"actor_type":"user","actor_id":"{actor_id}"}}"#);
    client
        .batch_execute(&format!(
            "BEGIN;
             SELECT pg_logical_emit_message(true, 'walcast.actor', '{actor}');
             INSERT INTO tasks (id, tenant_id, title) VALUES ('{}', 'acme', 'huge actor');
             COMMIT;
             INSERT INTO tasks (id, tenant_id, title) VALUES ('{}', 'acme', 'after it');",
            uuid(1),
            uuid(2)
        ))
        .await
        .unwrap();
    let caught_up = catch_up(&client, Duration::from_secs(30)).await;
    let log = walcast.log_tail(10);
    assert!(
        caught_up.is_ok(),
        "the stream stalled behind an event whose stub does not fit max_payload; walcast log:\n{log}"
    );
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    assert_eq!(events.len(), 2);
    // Both on the tenant's subject, seq 1 and 2: no gap.
    for (m, seq) in events.iter().zip(1..) {
        assert_eq!(m.subject, "walcast.acme.task.created");
        assert_eq!(m.event.seq, seq);
        assert_eq!(m.headers.get("Walcast-Seq"), Some(&seq.to_string()));
    }
    let (big, small) = (&events[0], &events[1]);
    assert!(!small.headers.contains_key("Walcast-Object"));
    assert!(!small.headers.contains_key("Walcast-Reason"));
    // The full event, actor included, is in the object store.
    assert_eq!(
        big.headers.get("Walcast-Object"),
        Some(&format!("WALCAST_OVERSIZED/{}", big.event.event_id))
    );
    let full_actor = big.event.actor.as_ref().expect("actor of the full event");
    assert_eq!(full_actor.actor_id.as_deref(), Some(actor_id.as_str()));
    assert_eq!(big.event.entity_id, uuid(1));
    assert!(big.event.after.is_some(), "full event fetched");
    // The stream message: key fields only, and why.
    assert_eq!(
        big.headers.get("Walcast-Reason").map(String::as_str),
        Some(walcast::publish::oversized::KEY_FIELDS_ONLY)
    );
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    let stream = js.get_stream("WALCAST").await.unwrap();
    let raw = stream.get_raw_message(big.stream_seq).await.unwrap();
    assert!(raw.payload.len() < 1024, "{} bytes", raw.payload.len());
    let stub = ChangeEvent::decode(raw.payload.as_ref()).expect("stub decodes");
    assert_eq!(
        (
            &*stub.event_id,
            &*stub.tenant_id,
            stub.seq,
            &*stub.entity_id
        ),
        (&*big.event.event_id, "acme", 1, &*uuid(1))
    );
    assert_eq!(
        (stub.entity, stub.action, stub.commit_lsn, stub.tx_index),
        (
            big.event.entity,
            big.event.action,
            big.event.commit_lsn,
            big.event.tx_index
        )
    );
    assert!(stub.actor.is_none() && stub.after.is_none() && stub.before.is_none());
    walcast.stop(Duration::from_secs(15)).await;
}

/// A replica that lags (`StaleReplica`: "not found" for a share of the
/// object store's direct gets, as a follower that has not stored an object
/// yet answers on a cluster): the Rust client still delivers every
/// oversized event whole, in order; it never takes an object a replica has
/// not stored yet for one that expired.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_does_not_make_a_fresh_object_look_expired() {
    use crate::support::stale::StaleReplica;
    use futures::StreamExt;
    use walcast_client::{Client, Options, Update};
    let env = Env::start_with(NatsOptions {
        max_payload: Some(64 * 1024),
        extra: StaleReplica::mappings(&["OBJ_WALCAST_OVERSIZED"]),
        ..NatsOptions::default()
    })
    .await;
    let url = env.nats.url();
    let stale = StaleReplica::start(&url, "OBJ_WALCAST_OVERSIZED").await;
    let client = env.pg.client().await;
    let dir = TempDir::new("oversized-stale").unwrap();
    let mut walcast = Walcast::start("walcast", dir.path(), &env.env_vars(), &[]);
    // The object store exists once the first oversized event is stored.
    let insert = |n: u64| {
        format!(
            "INSERT INTO tasks (id, tenant_id, title, description) SELECT '{}', 'big', 'big', {}",
            uuid(n),
            sql_blob(100_000)
        )
    };
    client.batch_execute(&insert(1)).await.unwrap();
    catch_up(&client, Duration::from_secs(30)).await.unwrap();
    let follower = Client::connect(&url, Options::default()).await.unwrap();
    let mut updates = follower.subscribe("big", 0).unwrap();
    const EVENTS: u64 = 30;
    for n in 2..=EVENTS {
        client.batch_execute(&insert(n)).await.unwrap();
    }
    for seq in 1..=EVENTS {
        let update = tokio::time::timeout(Duration::from_secs(30), updates.next())
            .await
            .unwrap_or_else(|_| panic!("event {seq} never came:\n{}", walcast.log_tail(20)))
            .expect("the subscription goes on");
        match update.unwrap_or_else(|e| panic!("event {seq}: {e}")) {
            Update::Event(event) => {
                assert_eq!(event.seq, seq);
                let Some(walcast_client::proto::change_event::After::Task(task)) = &event.after
                else {
                    panic!("event {seq} without its row")
                };
                assert_eq!(task.description.as_deref().map(str::len), Some(100_000));
            }
            other => panic!("event {seq}: {other:?}"),
        }
    }
    assert!(
        stale.answered() > 0,
        "the lagging replica answered no direct get"
    );
    eprintln!(
        "the lagging replica answered {} direct gets",
        stale.answered()
    );
    walcast.stop(Duration::from_secs(15)).await;
}

/// The object store for oversized events exists from the start, like the
/// stream (SPEC §3: "created like the stream, same max age"), and takes the
/// max age the stream really has: an existing stream that keeps events 30
/// days (walcast's setting says 7) must not lose their full events after 7.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_object_store_is_there_from_the_start_with_the_streams_max_age() {
    use crate::support::daemon::Daemon;
    let env = Env::start().await;
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    let thirty_days = Duration::from_secs(30 * 24 * 3600);
    js.create_stream(jetstream::stream::Config {
        name: "WALCAST".into(),
        subjects: vec!["walcast.>".into()],
        max_age: thirty_days,
        ..Default::default()
    })
    .await
    .expect("an operator's stream");
    let daemon = Daemon::start(env.settings());
    let store = crate::support::wait_for(Duration::from_secs(30), || {
        let js = js.clone();
        async move { js.get_stream("OBJ_WALCAST_OVERSIZED").await.ok() }
    })
    .await
    .expect("OBJ_WALCAST_OVERSIZED created at start, before any oversized event");
    assert_eq!(store.cached_info().config.max_age, thirty_days);
    daemon.stop().await.expect("clean stop");
}
