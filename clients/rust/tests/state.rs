//! `Client::load_and_follow` against a real nats-server, with a fake daemon
//! that writes the state bucket exactly as `docs/STATE.md` says and
//! publishes the matching events (SPEC §8 "Loading", issue 18).

#[path = "support/fake_walcast.rs"]
mod fake_walcast;
mod support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use fake_walcast::{FakeWalcast, Model, apply, state_key};
use futures::StreamExt;
use rand::{Rng, SeedableRng, rngs::StdRng};
use support::Nats;
use walcast_client::proto::ChangeEvent;
use walcast_client::{Backoff, Client, Error, Options, Snapshot, StateSubscription, StateUpdate};

/// How long any one expected item may take.
const PATIENCE: Duration = Duration::from_secs(20);

fn options() -> Options {
    Options {
        request_timeout: Duration::from_secs(1),
        backoff: Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        },
        idle_check: Duration::from_secs(2),
        state_ready_timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

/// A nats-server, the fake daemon with its bucket (marker `complete`
/// unless `ready` is false) and a client.
async fn setup(ready: bool) -> (Nats, FakeWalcast, Client) {
    support::init_logging();
    let nats = Nats::start(None).expect("start nats-server");
    let fake = FakeWalcast::start(&nats.url()).await.expect("fake walcast");
    fake.create_bucket().await.expect("create the state bucket");
    if ready {
        fake.set_marker("complete").await.expect("marker");
    }
    let client = Client::connect(&nats.url(), options())
        .await
        .expect("connect");
    (nats, fake, client)
}

async fn next(sub: &mut StateSubscription) -> StateUpdate {
    match tokio::time::timeout(PATIENCE, sub.next()).await {
        Ok(Some(Ok(update))) => update,
        Ok(Some(Err(e))) => panic!("load failed: {e}"),
        Ok(None) => panic!("load ended"),
        Err(_) => panic!("nothing within {PATIENCE:?}"),
    }
}

async fn snapshot(sub: &mut StateSubscription) -> Snapshot {
    match next(sub).await {
        StateUpdate::Snapshot(snapshot) => snapshot,
        other => panic!("expected the snapshot first, got {other:?}"),
    }
}

async fn event(sub: &mut StateSubscription) -> ChangeEvent {
    match next(sub).await {
        StateUpdate::Event(event) => *event,
        other => panic!("expected an event, got {other:?}"),
    }
}

/// Follows until `last_seq`, checking each event is the next seq, and
/// applies the events to the snapshot's rows.
async fn follow_until(
    sub: &mut StateSubscription,
    snapshot: Snapshot,
    last_seq: u64,
) -> BTreeMap<String, ChangeEvent> {
    let mut rows = snapshot.rows;
    let mut seq = snapshot.as_of_seq;
    while seq < last_seq {
        let event = event(sub).await;
        assert_eq!(
            event.seq,
            seq + 1,
            "events follow the snapshot in order, once"
        );
        apply(&mut rows, &state_key(&event), &event);
        seq = event.seq;
    }
    rows
}

#[tokio::test]
async fn snapshot_is_the_rows_as_of_the_highest_seq_then_the_events_follow() {
    let (_nats, fake, client) = setup(true).await;
    let mut rng = StdRng::seed_from_u64(18);
    let (mut acme, mut other) = (Model::new("acme"), Model::new("other"));
    for i in 0..5 {
        let row = acme.backfilled();
        fake.put_row(&row.key, &row.event, 0, i == 0).await.unwrap();
    }
    for i in 0..40 {
        let change = acme.next_change(&mut rng);
        fake.apply(&change, i % 10 == 3).await.unwrap();
        fake.apply(&other.next_change(&mut rng), false)
            .await
            .unwrap();
    }
    // The last change is a delete: as_of_seq must still count it.
    let victim = acme.rows.keys().next().unwrap().clone();
    let delete = acme.delete_row(&victim);
    fake.apply(&delete, false).await.unwrap();

    let mut sub = client.load_and_follow("acme").unwrap();
    let snapshot = snapshot(&mut sub).await;
    assert_eq!(snapshot.tenant_id, "acme");
    assert_eq!(snapshot.as_of_seq, 41);
    assert!(!snapshot.rows.contains_key(&victim));
    assert_eq!(
        snapshot.rows, acme.rows,
        "the snapshot is the tenant's rows"
    );

    for i in 0..10 {
        fake.apply(&acme.next_change(&mut rng), i == 4)
            .await
            .unwrap();
    }
    let rows = follow_until(&mut sub, snapshot, acme.seq).await;
    assert_eq!(rows, acme.rows);
    assert_quiet(&mut sub).await;
}

#[tokio::test]
async fn loads_during_writes_plus_their_events_give_the_rows() {
    let (_nats, fake, client) = setup(true).await;
    let fake = Arc::new(fake);
    let seed = rand::rng().random();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut acme = Model::new("acme");
    for _ in 0..20 {
        let row = acme.backfilled();
        fake.put_row(&row.key, &row.event, 0, false).await.unwrap();
    }
    const CHANGES: u64 = 1_000;
    let (progress, applied) = tokio::sync::watch::channel(0u64);
    let writer = tokio::spawn({
        let fake = fake.clone();
        let mut other = Model::new("other");
        async move {
            for i in 0..CHANGES {
                let change = acme.next_change(&mut rng);
                fake.apply(&change, i % 50 == 7).await.unwrap();
                if rng.random_bool(0.3) {
                    fake.apply(&other.next_change(&mut rng), false)
                        .await
                        .unwrap();
                }
                progress.send_replace(change.event.seq);
            }
            acme
        }
    });
    let mut loads = Vec::new();
    let mut moments: Vec<u64> = (0..8)
        .map(|_| rand::rng().random_range(0..CHANGES))
        .collect();
    moments.sort();
    for moment in moments {
        let mut applied = applied.clone();
        applied.wait_for(|seq| *seq >= moment).await.unwrap();
        let mut sub = client.load_and_follow("acme").unwrap();
        loads.push(tokio::spawn(async move {
            let snapshot = snapshot(&mut sub).await;
            let as_of = snapshot.as_of_seq;
            (
                moment,
                as_of,
                follow_until(&mut sub, snapshot, CHANGES).await,
            )
        }));
    }
    let acme = writer.await.unwrap();
    for load in loads {
        let (moment, as_of, rows) = load.await.unwrap();
        eprintln!(
            "load started after seq {moment}: as of {as_of}, {} rows at the end",
            rows.len()
        );
        assert!(
            as_of >= moment,
            "a load reflects at least what was applied before it"
        );
        assert_eq!(
            rows, acme.rows,
            "snapshot as of {as_of} plus the events that follow"
        );
    }
}

#[tokio::test]
async fn waits_for_the_backfill_then_loads() {
    let (_nats, fake, client) = setup(false).await;
    let mut acme = Model::new("acme");
    let row = acme.backfilled();
    fake.put_row(&row.key, &row.event, 0, false).await.unwrap();

    // No marker at all (first start), then `running`: nothing comes.
    let mut sub = client.load_and_follow("acme").unwrap();
    assert_quiet(&mut sub).await;
    fake.set_marker("running").await.unwrap();
    assert_quiet(&mut sub).await;
    let row = acme.backfilled();
    fake.put_row(&row.key, &row.event, 0, false).await.unwrap();
    fake.set_marker("complete").await.unwrap();

    let snapshot = snapshot(&mut sub).await;
    assert_eq!(snapshot.as_of_seq, 0);
    assert_eq!(snapshot.rows, acme.rows);
    assert_eq!(snapshot.rows.len(), 2);
}

#[tokio::test]
async fn not_ready_within_the_timeout_is_a_typed_error() {
    let (_nats, fake, client) = setup(false).await;
    let impatient = Client::new(
        client.nats().clone(),
        Options {
            state_ready_timeout: Duration::from_millis(300),
            ..options()
        },
    );
    fake.set_marker("running").await.unwrap();
    let mut sub = impatient.load_and_follow("acme").unwrap();
    let item = tokio::time::timeout(PATIENCE, sub.next()).await.unwrap();
    match item {
        Some(Err(Error::StateNotReady {
            bucket,
            tenant_id,
            state,
        })) => {
            assert_eq!(bucket, "WALCAST_STATE");
            assert_eq!(tenant_id, "acme");
            assert_eq!(state.as_deref(), Some("running"));
        }
        other => panic!("expected StateNotReady, got {other:?}"),
    }
    assert!(sub.next().await.is_none(), "an error is the last item");

    // No bucket at all (state turned off): the same error, no marker seen.
    let elsewhere = Client::new(
        client.nats().clone(),
        Options {
            state_ready_timeout: Duration::from_millis(300),
            state_bucket: Some("NOPE_STATE".into()),
            ..options()
        },
    );
    let item = elsewhere.load_and_follow("acme").unwrap().next().await;
    assert!(
        matches!(item, Some(Err(Error::StateNotReady { state: None, .. }))),
        "{item:?}"
    );
}

#[tokio::test]
async fn an_empty_tenant_loads_as_of_zero_then_gets_its_first_events() {
    let (_nats, fake, client) = setup(true).await;
    let mut rng = StdRng::seed_from_u64(7);
    let mut other = Model::new("other");
    for _ in 0..5 {
        fake.apply(&other.next_change(&mut rng), false)
            .await
            .unwrap();
    }
    let mut sub = client.load_and_follow("acme").unwrap();
    let snapshot = snapshot(&mut sub).await;
    assert_eq!((snapshot.as_of_seq, snapshot.rows.len()), (0, 0));

    let mut acme = Model::new("acme");
    for _ in 0..3 {
        fake.apply(&acme.next_change(&mut rng), false)
            .await
            .unwrap();
    }
    assert_eq!(follow_until(&mut sub, snapshot, 3).await, acme.rows);
}

#[tokio::test]
async fn a_tenant_named_like_the_marker_does_not_see_it() {
    let (_nats, fake, client) = setup(true).await;
    let mut sub = client.load_and_follow("_walcast").unwrap();
    let snapshot = snapshot(&mut sub).await;
    assert_eq!((snapshot.as_of_seq, snapshot.rows.len()), (0, 0));
    drop(fake);
}

#[tokio::test]
async fn events_gone_after_the_snapshot_give_the_resync_signal() {
    let (_nats, fake, client) = setup(true).await;
    let mut rng = StdRng::seed_from_u64(9);
    let mut acme = Model::new("acme");
    for _ in 0..5 {
        fake.apply(&acme.next_change(&mut rng), false)
            .await
            .unwrap();
    }
    // The state is as of seq 5; the stream has since lost seqs 6 and 7.
    for _ in 0..3 {
        fake.publish(&acme.next_change(&mut rng).event, false)
            .await
            .unwrap();
    }
    fake.forget("acme", 1..=7).await.unwrap();

    let mut sub = client.load_and_follow("acme").unwrap();
    assert_eq!(snapshot(&mut sub).await.as_of_seq, 5);
    match next(&mut sub).await {
        StateUpdate::Resync {
            tenant_id,
            oldest_seq,
            last_seq,
        } => assert_eq!((tenant_id.as_str(), oldest_seq, last_seq), ("acme", 8, 8)),
        other => panic!("expected Resync, got {other:?}"),
    }
    fake.apply(&acme.next_change(&mut rng), false)
        .await
        .unwrap();
    assert_eq!(event(&mut sub).await.seq, 9);
}

#[tokio::test]
async fn ten_thousand_rows_load() {
    let (_nats, fake, client) = setup(true).await;
    let mut rng = StdRng::seed_from_u64(10_000);
    let mut acme = Model::new("acme");
    let written = Instant::now();
    for _ in 0..9_000 {
        let row = acme.backfilled();
        fake.put_row(&row.key, &row.event, 0, false).await.unwrap();
    }
    while acme.rows.len() < 10_000 {
        fake.apply(&acme.next_change(&mut rng), false)
            .await
            .unwrap();
    }
    eprintln!("wrote 10,000 rows in {:?}", written.elapsed());

    let started = Instant::now();
    let mut sub = client.load_and_follow("acme").unwrap();
    let snapshot = snapshot(&mut sub).await;
    eprintln!(
        "loaded {} rows as of seq {} in {:?}",
        snapshot.rows.len(),
        snapshot.as_of_seq,
        started.elapsed()
    );
    assert_eq!(snapshot.as_of_seq, acme.seq);
    assert_eq!(snapshot.rows, acme.rows);
}

/// Nothing arrives for a while (a bounded wait for an absence).
async fn assert_quiet(sub: &mut StateSubscription) {
    let item = tokio::time::timeout(Duration::from_millis(500), sub.next()).await;
    assert!(item.is_err(), "expected nothing yet, got {item:?}");
}
