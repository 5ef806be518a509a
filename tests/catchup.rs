//! SPEC §7: the catch-up service inside `walcast run`, against real NATS.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use rand::Rng;
use serde_json::Value;

use crate::support::TempDir;
use crate::support::chaos::Walcast;
use crate::support::daemon::{Daemon, Env};
use crate::support::workload::Workload;

async fn ask(client: &async_nats::Client, body: &str) -> (Option<String>, Value) {
    let reply = client
        .request("walcast-api.v1.catchup", body.to_string().into())
        .await
        .expect("catch-up request answered");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    let json: Value = serde_json::from_slice(&reply.payload).expect("JSON reply body");
    (code, json)
}

/// The seqs a consumer built only from the reply delivers, up to `n` of them.
async fn consume(js: &jetstream::Context, reply: &Value, n: usize) -> Vec<u64> {
    let stream = js
        .get_stream(reply["stream"].as_str().unwrap())
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: reply["filter_subject"].as_str().unwrap().to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: reply["start_stream_seq"].as_u64().unwrap(),
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let msg = msg.unwrap();
        let seq = msg
            .headers
            .as_ref()
            .unwrap()
            .get("Walcast-Seq")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        seqs.push(seq);
    }
    seqs
}

/// Asks for `tenant` after `after` (its last seq is `n`) and checks that a
/// consumer built only from the answer delivers `after + 1, ...` (the first
/// `take` of them).
async fn replays_from(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    tenant: &str,
    after: u64,
    n: u64,
    take: usize,
) {
    let (code, reply) = ask(
        nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":{after}}}"#),
    )
    .await;
    assert_eq!(code, None, "{reply}");
    assert_eq!(reply["last_seq"].as_u64(), Some(n));
    assert_eq!(reply["filter_subject"], format!("walcast.{tenant}.>"));
    let want = ((after + 1)..=n).take(take).collect::<Vec<_>>();
    assert_eq!(
        consume(js, &reply, want.len()).await,
        want,
        "tenant {tenant} after {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_answers_as_the_spec_says() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let daemon = Daemon::start(env.settings());
    let mut workload = Workload::new(Workload::seed(), 5);
    workload.run(&mut client, 600).await;

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    // Wait until everything is published, then learn each tenant's last seq from the stream.
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let events = env.stream_events().await;
    let mut last = std::collections::HashMap::new();
    for m in &events {
        last.insert(m.event.tenant_id.clone(), m.event.seq);
    }

    let mut rng = rand::rng();
    for (tenant, &n) in &last {
        for after in [0, n / 2, n.saturating_sub(1), rng.random_range(0..n)] {
            replays_from(&nats, &js, tenant, after, n, 20).await;
        }
        // Nothing missed: start at the stream's next sequence.
        let (code, reply) = ask(
            &nats,
            &format!(r#"{{"tenant_id":"{tenant}","after_seq":{n}}}"#),
        )
        .await;
        assert_eq!(code, None);
        assert_eq!(
            reply["start_stream_seq"].as_u64(),
            Some(events.len() as u64 + 1)
        );
        // Ahead.
        let (code, reply) = ask(
            &nats,
            &format!(r#"{{"tenant_id":"{tenant}","after_seq":{}}}"#, n + 1),
        )
        .await;
        assert_eq!(code.as_deref(), Some("416"));
        assert_eq!(reply["error"], "ahead");
    }
    // Unknown tenant: last_seq 0, start at the next sequence.
    let (code, reply) = ask(&nats, r#"{"tenant_id":"nobody","after_seq":0}"#).await;
    assert_eq!(code, None);
    assert_eq!(reply["last_seq"], 0);
    assert_eq!(
        reply["start_stream_seq"].as_u64(),
        Some(events.len() as u64 + 1)
    );
    // Malformed requests.
    for bad in [
        "not json",
        r#"{"tenant_id":"a.b","after_seq":1}"#,
        r#"{"tenant_id":"acme"}"#,
        r#"{"tenant_id":"x","after_seq":-1}"#,
    ] {
        let (code, reply) = ask(&nats, bad).await;
        assert_eq!(code.as_deref(), Some("400"), "{bad}");
        assert_eq!(reply["error"], "bad_request");
    }
    // Discoverable as a NATS micro service.
    let ping = nats
        .request("$SRV.PING.walcast", "".into())
        .await
        .expect("$SRV.PING answered");
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "walcast");

    // too_old: purge a tenant's oldest events.
    let (tenant, &n) = last.iter().max_by_key(|(_, n)| **n).unwrap();
    let (_, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":10}}"#),
    )
    .await;
    let cut = reply["start_stream_seq"].as_u64().unwrap(); // the stream position of seq 11
    let stream = js.get_stream("WALCAST").await.unwrap();
    stream
        .purge()
        .filter(format!("walcast.{tenant}.>"))
        .sequence(cut)
        .await
        .unwrap();
    let (code, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":3}}"#),
    )
    .await;
    assert_eq!(code.as_deref(), Some("410"), "{reply}");
    assert_eq!(reply["error"], "too_old");
    assert_eq!(reply["oldest_seq"].as_u64(), Some(11));
    let (code, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":10}}"#),
    )
    .await;
    assert_eq!(code, None, "after_seq 10 still answerable: {reply}");
    assert_eq!(
        consume(&js, &reply, 3).await,
        vec![11, 12, 13]
            .into_iter()
            .filter(|s| *s <= n)
            .collect::<Vec<_>>()
    );
    daemon.stop().await.unwrap();
}

/// After a restart the index is read back from the stream (positions of
/// events an earlier run published) and merged with what the new run
/// publishes. Answers from it are trusted without reading the stream, so a
/// wrong position would show here as a consumer starting at the wrong event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_after_a_restart_uses_the_rebuilt_index() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let dir = TempDir::new("catchup-restart").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 4);
    workload.run(&mut client, 500).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;
    // Published by the next run, after the positions it reads back.
    workload.run(&mut client, 150).await;
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &[]);
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast
        .wait_log("catch-up index rebuilt", Duration::from_secs(60))
        .await;

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let events = env.stream_events().await;
    let mut last = std::collections::HashMap::new();
    for m in &events {
        last.insert(m.event.tenant_id.clone(), m.event.seq);
    }
    let mut checked = 0;
    for (tenant, &n) in &last {
        for after in (0..n).step_by(7).chain([n - 1]) {
            replays_from(&nats, &js, tenant, after, n, 3).await;
            checked += 1;
        }
    }
    assert!(checked > 50, "{checked} answers checked");
    walcast.stop(Duration::from_secs(20)).await;
}
