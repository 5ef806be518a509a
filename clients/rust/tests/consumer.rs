//! The ordered consumer under a live subscription, against a real
//! nats-server: when the server loses it before it delivered anything, the
//! one async-nats creates in its place starts where the first did — not at
//! the stream's first message, which made a quiet tenant's subscriber read
//! its whole history again (an all-tenant one, the whole stream).
//! vendor/README.md, "async-nats: an ordered consumer recreated before its
//! first message".

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

#[tokio::test]
async fn a_consumer_lost_before_its_first_message_is_recreated_where_it_started() {
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
    let options = Options {
        request_timeout: Duration::from_secs(1),
        ..Options::default()
    };
    let client = Client::connect(&nats.url(), options).await.unwrap();
    let mut sub = client.subscribe("acme", 300).unwrap();

    // The subscription's consumer starts after the 300 events, so it has
    // delivered nothing when the server loses it.
    let js = jetstream::new(fake.nats.clone());
    let filter = "walcast.acme.>";
    let first = consumer_of(&js, filter, "").await;
    let stream = js.get_stream(STREAM).await.unwrap();
    stream.delete_consumer(&first.name).await.unwrap();
    let second = consumer_of(&js, filter, &first.name).await;
    assert_eq!(
        second.config.deliver_policy, first.config.deliver_policy,
        "the new consumer starts where the lost one did: {:?} then {:?}",
        first.config.deliver_policy, second.config.deliver_policy
    );

    // And the subscription goes on with the next event, having read nothing else.
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
    let delivered = js
        .get_stream(STREAM)
        .await
        .unwrap()
        .consumer_info(&second.name)
        .await
        .unwrap()
        .delivered
        .consumer_sequence;
    assert_eq!(
        (event.seq, delivered),
        (301, 1),
        "the next event, and the only message the new consumer delivered"
    );
}
