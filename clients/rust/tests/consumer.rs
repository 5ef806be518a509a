//! A consumer the server loses before it delivered anything, against a
//! real nats-server: the one that takes its place starts where it did.
//!
//! - async-nats' ordered consumer (walcast's own readers, the client's
//!   short reads) used to start the new one at the stream's first message
//!   (vendor/README.md, "an ordered consumer recreated before its first
//!   message");
//! - a subscription repositions from its last delivered event.
//!
//! Both then deliver only the next event.

#[path = "support/fake_walcast.rs"]
mod fake_walcast;
mod support;

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use fake_walcast::{FakeWalcast, Model, STREAM};
use futures::{StreamExt, TryStreamExt};
use rand::{SeedableRng, rngs::StdRng};
use support::Nats;
use walcast_client::{Client, Options, Update};

const PATIENCE: Duration = Duration::from_secs(20);

/// The consumer reading `filter` whose name is not `not`, once there is one.
async fn consumer_of(js: &jetstream::Context, filter: &str, not: &str) -> consumer::Info {
    let deadline = Instant::now() + PATIENCE;
    loop {
        let stream = js.get_stream(STREAM).await.expect("the stream");
        let infos: Vec<consumer::Info> = stream
            .consumers()
            .try_collect()
            .await
            .expect("list consumers");
        let found = infos
            .into_iter()
            .find(|i| i.config.filter_subject == filter && i.name != not);
        if let Some(info) = found {
            return info;
        }
        assert!(
            Instant::now() < deadline,
            "no consumer of {filter} within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the consumer reading `filter` and waits for the one that takes
/// its place: (lost, new). Checks the new one starts where the lost one did.
async fn lose_consumer(js: &jetstream::Context, filter: &str) -> (consumer::Info, consumer::Info) {
    let lost = consumer_of(js, filter, "").await;
    let stream = js.get_stream(STREAM).await.unwrap();
    stream.delete_consumer(&lost.name).await.unwrap();
    let new = consumer_of(js, filter, &lost.name).await;
    assert_eq!(
        new.config.deliver_policy, lost.config.deliver_policy,
        "the new consumer starts where the lost one did: {:?} then {:?}",
        lost.config.deliver_policy, new.config.deliver_policy
    );
    (lost, new)
}

/// How many messages consumer `name` has delivered.
async fn delivered(js: &jetstream::Context, name: &str) -> u64 {
    let stream = js.get_stream(STREAM).await.unwrap();
    let info = stream.consumer_info(name).await.unwrap();
    info.delivered.consumer_sequence
}

/// A nats-server, the fake daemon, and 300 events of `acme` in the stream.
async fn setup() -> (Nats, FakeWalcast, Model, StdRng) {
    support::init_logging();
    let nats = Nats::start(None).expect("start nats-server");
    let fake = FakeWalcast::start(&nats.url()).await.expect("fake walcast");
    let mut rng = StdRng::seed_from_u64(7);
    let mut acme = Model::new("acme");
    for _ in 0..300 {
        fake.publish(&acme.next_change(&mut rng).event, false)
            .await
            .unwrap();
    }
    (nats, fake, acme, rng)
}

#[tokio::test]
async fn an_ordered_consumer_lost_before_its_first_message_is_recreated_where_it_started() {
    let (_nats, fake, mut acme, mut rng) = setup().await;
    let js = jetstream::new(fake.nats.clone());
    let filter = "walcast.acme.>";
    let mut stream = js.get_stream(STREAM).await.unwrap();
    let start = stream.info().await.unwrap().state.last_sequence + 1;
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter.into(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1);
    let reading = tokio::spawn(async move {
        while let Some(msg) = messages.next().await {
            let position = msg.map(|m| m.info().map(|i| i.stream_sequence).unwrap_or(0));
            if tx.send(position.map_err(|e| e.to_string())).await.is_err() {
                break;
            }
        }
    });

    let (_, new) = lose_consumer(&js, filter).await;
    fake.publish(&acme.next_change(&mut rng).event, false)
        .await
        .unwrap();
    let position = tokio::time::timeout(PATIENCE, rx.recv())
        .await
        .expect("the next message in time")
        .expect("the consumer goes on")
        .expect("a message");
    assert_eq!(
        (position, delivered(&js, &new.name).await),
        (start, 1),
        "the next message, and the only one the new consumer delivered"
    );
    reading.abort();
}

#[tokio::test]
async fn a_subscription_whose_consumer_is_lost_goes_on_from_its_last_event() {
    let (nats, fake, mut acme, mut rng) = setup().await;
    let options = Options {
        request_timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let client = Client::connect(&nats.url(), options).await.unwrap();
    let mut sub = client.subscribe("acme", 300).unwrap();

    // The subscription's consumer starts after the 300 events, so it has
    // delivered nothing when the server loses it.
    let js = jetstream::new(fake.nats.clone());
    let (_, new) = lose_consumer(&js, "walcast.acme.>").await;
    fake.publish(&acme.next_change(&mut rng).event, false)
        .await
        .unwrap();
    let update = tokio::time::timeout(PATIENCE, sub.next())
        .await
        .expect("the next event in time")
        .expect("the subscription goes on")
        .expect("an update");
    let Update::Event(event) = update else {
        panic!("expected the next event, got {update:?}");
    };
    assert_eq!(
        (event.seq, delivered(&js, &new.name).await),
        (301, 1),
        "the next event, and the only message the new consumer delivered"
    );
}
