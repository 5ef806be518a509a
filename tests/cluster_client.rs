//! A client subscription on a 3-node cluster whose consumer is lost with
//! the node that held it, while the client's own connection (to another
//! node) stays up: no reconnect, no "consumer deleted" — the server that
//! would say anything is gone. The subscription must notice by itself and
//! go on, every event once and in order. With async-nats' ordered
//! consumer it heard nothing for 44.5 s (two missed 15 s heartbeats);
//! walcast-client's live read breaks after two missed 5 s heartbeats
//! (`clients/rust/src/reader.rs`, `Live`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use prost::Message as _;
use walcast_client::proto::{Action, ChangeEvent, Entity, Task, change_event};
use walcast_client::{AllFrom, Client, Options, Subscription, Update};

use crate::support::cluster::{Cluster, NODES};
use crate::support::daemon::init_logging;
use crate::support::wait_for;

const STREAM: &str = "WALCAST";
const TENANT: &str = "acme";

/// The longest an event stored after the kill may wait for its delivery:
/// the heartbeats' 10 s, the reopen, and room for a loaded machine (the
/// ordered consumer's ~40 s fails it). Measured from the stream's ack, so
/// a leader election of the stream itself (the killed node may have led
/// it) is not counted against the subscription.
const WAIT_BOUND: Duration = Duration::from_secs(25);

/// When each seq was stored (acknowledged by the stream).
type StoredAt = Arc<Mutex<HashMap<u64, Instant>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_goes_on_when_the_node_holding_its_consumer_dies() {
    init_logging();
    let cluster = Cluster::start().await.expect("start a 3-node nats cluster");
    let admin = jetstream::new(connect(&cluster, 0).await);
    admin
        .create_stream(stream::Config {
            name: STREAM.into(),
            subjects: vec!["walcast.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create an R3 stream");
    cluster
        .wait_stream_healthy(STREAM, Duration::from_secs(30))
        .await
        .expect("a healthy R3 stream");

    // Open subscriptions until one's consumer sits on another node than
    // the client's connection (placement is the server's choice).
    let (client_node, host, mut sub) = subscription_away_from_its_consumer(&cluster).await;
    let publisher = connect(&cluster, client_node).await;
    let stored_at = StoredAt::default();
    let published = tokio::spawn(publish_forever(publisher, stored_at.clone()));

    let mut next_seq = 1;
    receive_until(&mut sub, &mut next_seq, 20).await;
    cluster.kill9(host).expect("kill the consumer's node");
    let killed = Instant::now();
    let before = next_seq;
    let mut longest = Duration::ZERO;
    while next_seq < before + 50 {
        let until = next_seq + 1;
        receive_until(&mut sub, &mut next_seq, until).await;
        let stored = stored_at.lock().unwrap().get(&(next_seq - 1)).copied();
        longest = longest.max(stored.map_or(Duration::ZERO, |at| at.elapsed()));
    }
    published.abort();
    eprintln!(
        "[cluster-client] node {} (the consumer's) killed; longest wait of an event after it {longest:.2?}; {} events in order since, {:.1?} after the kill",
        cluster.name(host),
        next_seq - before,
        killed.elapsed()
    );
    assert!(
        longest < WAIT_BOUND,
        "an event waited {longest:?} for the subscription after its consumer's node died"
    );
}

async fn connect(cluster: &Cluster, node: usize) -> async_nats::Client {
    async_nats::connect(cluster.node(node).url())
        .await
        .expect("connect to a node")
}

/// A client on one node with an all-tenant subscription whose consumer
/// another node holds: (client's node, consumer's node, subscription).
async fn subscription_away_from_its_consumer(cluster: &Cluster) -> (usize, usize, Subscription) {
    for attempt in 0..20 {
        let node = attempt % NODES;
        let client = Client::new(connect(cluster, node).await, Options::default());
        let known = cluster.consumers(STREAM).await;
        let sub = client.subscribe_all(AllFrom::Now);
        let host = wait_for(Duration::from_secs(20), || async {
            let hosts = cluster.consumers(STREAM).await;
            let new = hosts
                .into_iter()
                .find(|c| !known.iter().any(|k| k.name == c.name));
            new.map(|c| c.node)
        })
        .await
        .expect("the subscription's consumer shows");
        if host != node {
            return (node, host, sub);
        }
    }
    panic!("every consumer landed on its client's node");
}

/// Publishes the tenant's events as walcast does (subject, headers, body),
/// one every 20 ms, retrying each until the stream stores it.
async fn publish_forever(client: async_nats::Client, stored_at: StoredAt) {
    let js = jetstream::new(client);
    for seq in 1u64.. {
        let event = ChangeEvent {
            event_id: format!("e{seq}"),
            tenant_id: TENANT.into(),
            seq,
            entity: Entity::Task.into(),
            action: Action::Created.into(),
            after: Some(change_event::After::Task(Box::new(Task {
                id: format!("t{seq}"),
                tenant_id: TENANT.into(),
                ..Default::default()
            }))),
            ..Default::default()
        };
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        headers.insert("Walcast-Tenant", TENANT);
        headers.insert("Walcast-Seq", seq.to_string().as_str());
        headers.insert("Content-Type", "application/x-protobuf");
        let body = event.encode_to_vec();
        loop {
            let sent = js
                .publish_with_headers(
                    format!("walcast.{TENANT}.task.created"),
                    headers.clone(),
                    body.clone().into(),
                )
                .await;
            if let Ok(ack) = sent
                && ack.await.is_ok()
            {
                stored_at.lock().unwrap().insert(seq, Instant::now());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Receives events until `next_seq` reaches `until`, each the next seq.
async fn receive_until(sub: &mut Subscription, next_seq: &mut u64, until: u64) {
    while *next_seq < until {
        let update = tokio::time::timeout(Duration::from_secs(60), sub.next())
            .await
            .expect("an event within 60 s")
            .expect("the subscription goes on")
            .expect("no error");
        let Update::Event(event) = update else {
            panic!("expected an event, got {update:?}");
        };
        // `Now` starts each tenant at the first event seen.
        if *next_seq == 1 {
            *next_seq = event.seq;
        }
        assert_eq!(event.seq, *next_seq, "every event once, in order");
        *next_seq += 1;
    }
}
