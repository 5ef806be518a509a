//! Benchmark: how long `load_and_follow` takes to yield a tenant's snapshot.
//!
//! Times `--loads` loads of `--tenant` (default `big`): from the call to the
//! snapshot item, every row decoded; checks the snapshot has `--rows` rows.
//! Prints one JSON line. `bench/run.py --scenarios state_load` runs it
//! against a bucket a real walcast filled (`--no-fill`); without `--no-fill`
//! it first fills `WALCAST_STATE` itself the way walcast writes it (one key
//! per row, a `Walcast-Seq` header, the `_walcast.backfill` marker
//! `complete`): `--rows` rows of the tenant and `--other-rows` rows of 1,000
//! other tenants, for profiling the client without Postgres (`--append`:
//! into the existing bucket, to hold several tenants).
//!
//! cargo run --release -p walcast-client --example state_load -- \
//!     nats://127.0.0.1:4222 --rows 10000 --other-rows 100000 --loads 20

use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use prost::Message as _;
use walcast_client::proto::{ChangeEvent, Entity, Task, change_event};
use walcast_client::{Client, Options, StateUpdate};

struct Args {
    url: String,
    rows: usize,
    other_rows: usize,
    loads: usize,
    fill: bool,
    /// Fill into the existing bucket (another tenant beside the first).
    append: bool,
    tenant: String,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        url: "nats://127.0.0.1:4222".into(),
        rows: 10_000,
        other_rows: 0,
        loads: 10,
        fill: true,
        append: false,
        tenant: "big".into(),
    };
    while let Some(arg) = it.next() {
        let mut num = || it.next().and_then(|v| v.parse().ok()).expect("a number");
        match arg.as_str() {
            "--rows" => a.rows = num(),
            "--other-rows" => a.other_rows = num(),
            "--loads" => a.loads = num(),
            "--no-fill" => a.fill = false,
            "--append" => a.append = true,
            "--tenant" => a.tenant = it.next().expect("a tenant"),
            url => a.url = url.to_string(),
        }
    }
    a
}

/// A row as the benchmark's backfilled tasks are (bench/run.py, state_load).
fn row(tenant: &str, i: usize) -> (String, bytes::Bytes) {
    let now = pbjson_types::Timestamp {
        seconds: 1_764_800_000,
        nanos: 123_456_000,
    };
    let id = format!("00000000-0000-4000-8000-{i:012}");
    let event = ChangeEvent {
        event_id: format!("backfill-{tenant}-{i}"),
        tenant_id: tenant.into(),
        seq: 0,
        entity: Entity::Task as i32,
        entity_id: id.clone(),
        table: "public.tasks".into(),
        after: Some(change_event::After::Task(Box::new(Task {
            id: id.clone(),
            tenant_id: tenant.into(),
            title: format!("Task {i}"),
            description: Some("x".repeat(100)),
            status: "todo".into(),
            priority: Some(i32::try_from(i % 4).unwrap_or(0)),
            version: 1,
            created_at: Some(now),
            updated_at: Some(now),
            metadata: Some(r#"{"board": 1}"#.into()),
            ..Default::default()
        }))),
        ..Default::default()
    };
    (format!("{tenant}.task.{id}"), event.encode_to_vec().into())
}

async fn fill(js: &jetstream::Context, bucket: &str, a: &Args) {
    if !a.append {
        let _ = js.delete_key_value(bucket).await;
        js.create_key_value(kv::Config {
            bucket: bucket.into(),
            history: 1,
            ..Default::default()
        })
        .await
        .expect("create bucket");
    }
    let mut acks = futures::stream::FuturesOrdered::new();
    let others = (0..a.other_rows).map(|i| (format!("t{}", i % 1000), i));
    let big = (0..a.rows).map(|i| (a.tenant.clone(), i));
    for (tenant, i) in others.chain(big) {
        let (key, value) = row(&tenant, i);
        let mut headers = HeaderMap::new();
        headers.insert("Walcast-Seq", "0");
        headers.insert("Content-Type", "application/protobuf");
        headers.insert("Walcast-Stream-Seq", "0");
        headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
        let ack = js
            .publish_with_headers(format!("$KV.{bucket}.{key}"), headers, value)
            .await
            .expect("publish");
        acks.push_back(ack.into_future());
        while acks.len() > 4096 {
            acks.next().await.unwrap().expect("ack");
        }
    }
    while let Some(ack) = acks.next().await {
        ack.expect("ack");
    }
    js.publish(
        format!("$KV.{bucket}._walcast.backfill"),
        r#"{"state":"complete"}"#.into(),
    )
    .await
    .expect("marker")
    .await
    .expect("marker ack");
}

#[tokio::main]
async fn main() {
    // The client's own log (a retried load says why) on stderr: RUST_LOG=walcast_client=info.
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let a = args();
    let nats = async_nats::connect(&a.url).await.expect("connect");
    let js = jetstream::new(nats.clone());
    let bucket = "WALCAST_STATE";
    if a.fill {
        let t = Instant::now();
        fill(&js, bucket, &a).await;
        eprintln!(
            "filled {} + {} rows in {:?}",
            a.rows,
            a.other_rows,
            t.elapsed()
        );
    }
    let client = Client::new(nats, Options::default());
    let mut took = Vec::new();
    for _ in 0..a.loads {
        let t = Instant::now();
        let mut sub = client.load_and_follow(&a.tenant).expect("load");
        let snapshot = match sub.next().await {
            Some(Ok(StateUpdate::Snapshot(s))) => s,
            other => panic!("expected a snapshot, got {other:?}"),
        };
        took.push(t.elapsed()); // before the snapshot is dropped: that is the caller's time
        assert_eq!(snapshot.rows.len(), a.rows);
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    let in_order: Vec<String> = took.iter().map(|d| format!("{:.1}", ms(*d))).collect();
    took.sort();
    let pct = |p: f64| ms(took[((took.len() as f64 * p).ceil() as usize).clamp(1, took.len()) - 1]);
    println!(
        "{{\"rows\":{},\"other_rows\":{},\"loads\":{},\"p50_ms\":{:.1},\"p99_ms\":{:.1},\"min_ms\":{:.1},\"each_ms\":[{}]}}",
        a.rows,
        a.other_rows,
        a.loads,
        pct(0.5),
        pct(0.99),
        ms(took[0]),
        in_order.join(",")
    );
}
