//! Consumer limits on the streams walcast owns: nats-server 2.15 caps a
//! stream that sets no limit at `default_max_consumers` (1,000), which would
//! turn away every dashboard past the thousandth (each follows the stream
//! with an ordered consumer). walcast gives its streams an explicit limit —
//! at creation, and at start to streams an older walcast or an operator
//! created without one.

use std::time::Duration;

use async_nats::jetstream::{self, consumer, kv};
use serde_json::{Value, json};

use crate::oversized::{small_payload_env, sql_blob};
use crate::support::daemon::{Daemon, Env};
use crate::support::edge::run_bounded;
use crate::support::wait_until;

/// The limit walcast gives its streams (`broker::limits::MAX_CONSUMERS`,
/// README "Supported versions").
const MAX_CONSUMERS: i32 = 100_000;

/// More consumers than nats-server 2.15's default cap.
const PAST_THE_DEFAULT_CAP: usize = 1_001;

async fn max_consumers(js: &jetstream::Context, name: &str) -> Option<i32> {
    let mut stream = js.get_stream(name).await.ok()?;
    Some(stream.info().await.ok()?.config.max_consumers)
}

/// A stream walcast creates takes more consumers than the server's default
/// cap: the dashboards of a large deployment can all follow it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_walcast_creates_takes_more_than_a_thousand_consumers() {
    let env = Env::start().await;
    let daemon = Daemon::start(env.settings());
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    wait_until(Duration::from_secs(30), || async {
        max_consumers(&js, "WALCAST").await.is_some()
    })
    .await
    .expect("walcast creates its stream");
    assert_eq!(max_consumers(&js, "WALCAST").await, Some(MAX_CONSUMERS));

    let stream = js.get_stream("WALCAST").await.unwrap();
    for n in 0..PAST_THE_DEFAULT_CAP {
        stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: format!("walcast.t{n}.>"),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("consumer {n} of the stream: {e}"));
    }
    daemon.stop().await.expect("walcast stops cleanly");
}

/// A stream and a state bucket created without a limit (by an older walcast,
/// or by hand) get one when walcast starts, and keep every other setting
/// they had; the object stores it creates for oversized events and values
/// have one too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_without_a_consumer_limit_get_one_at_start() {
    let env = small_payload_env(64 * 1024).await;
    let js = jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    // Created by hand, with settings of the operator's own.
    let created: Value = js
        .request(
            "STREAM.CREATE.WALCAST".to_string(),
            &json!({
                "name": "WALCAST",
                "subjects": ["walcast.>"],
                "storage": "file",
                "allow_direct": true,
                "description": "made by hand",
                "metadata": {"owner": "ops"},
            }),
        )
        .await
        .unwrap();
    assert!(created.get("error").is_none(), "{created}");
    js.create_key_value(kv::Config {
        bucket: "WALCAST_STATE".into(),
        history: 1,
        ..Default::default()
    })
    .await
    .expect("an unlimited state bucket");
    assert!(max_consumers(&js, "WALCAST").await.unwrap() <= 0);
    assert!(max_consumers(&js, "KV_WALCAST_STATE").await.unwrap() <= 0);
    // `walcast check` says so where the server would cap it (2.15 and newer).
    let (server, release) = env.nats.version().await;
    let check = || run_bounded(&["check"], &env.env_vars(), Duration::from_secs(60)).stdout;
    let warning = "! stream WALCAST has no consumer limit";
    let before = check();
    assert_eq!(
        before.contains(warning),
        release.as_slice() >= [2, 15].as_slice(),
        "server {server}:\n{before}"
    );

    let daemon = Daemon::start(env.settings());
    let client = env.pg.client().await;
    client
        .batch_execute(&format!(
            "INSERT INTO tasks (id, tenant_id, title, description) \
             SELECT gen_random_uuid(), 'big', 'large', {}",
            sql_blob(200_000)
        ))
        .await
        .expect("a task over max_payload: both object stores come into use");
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let streams = [
        "WALCAST",
        "KV_WALCAST_STATE",
        "OBJ_WALCAST_OVERSIZED",
        "OBJ_WALCAST_STATE_OVERSIZED",
    ];
    let limited = || async {
        let mut all = Vec::new();
        for name in streams {
            all.push(max_consumers(&js, name).await);
        }
        all
    };
    // Servers before 2.12 cannot change a stream's limit (nor do they cap a
    // stream without one); the object stores are created without a limit
    // and then given one, so there they stay unlimited too.
    let changeable = release.as_slice() >= [2, 12].as_slice();
    let expected = Some(if changeable { MAX_CONSUMERS } else { -1 });
    let as_expected = wait_until(Duration::from_secs(30), || async {
        limited().await.iter().all(|l| *l == expected)
    })
    .await
    .is_ok();
    assert!(
        as_expected,
        "server {server}, {streams:?}: {:?}",
        limited().await
    );
    let after = check();
    assert!(!after.contains(warning), "{after}");
    let config = &js
        .request::<_, _, Value>("STREAM.INFO.WALCAST".to_string(), &json!({}))
        .await
        .unwrap()["config"];
    assert_eq!(config["description"], "made by hand", "{config}");
    assert_eq!(config["metadata"]["owner"], "ops", "{config}");
    daemon.stop().await.expect("walcast stops cleanly");
}
