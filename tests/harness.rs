//! Smoke tests of the test harness itself (tests/support), so a broken
//! harness shows up as such and not as a walcast bug.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;

use crate::support::nats::{Nats, NatsOptions};
use crate::support::postgres::{self, Postgres, StopMode};
use crate::support::proxy::TcpProxy;
use crate::support::{wait_for, wait_until};

const TIMEOUT: Duration = Duration::from_secs(20);

async fn wal_level(pg: &Postgres) -> String {
    let row = pg
        .client()
        .await
        .query_one("SHOW wal_level", &[])
        .await
        .expect("SHOW wal_level");
    row.get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_is_logical_and_survives_restarts() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    assert_eq!(wal_level(&pg).await, "logical");
    let client = pg.client().await;
    client
        .execute(
            "SELECT pg_create_logical_replication_slot('harness_slot', 'pgoutput')",
            &[],
        )
        .await
        .context("create logical slot")?;
    client
        .execute("SELECT pg_drop_replication_slot('harness_slot')", &[])
        .await
        .context("drop slot")?;
    client.execute("CREATE TABLE kept (id int)", &[]).await?;
    client.execute("INSERT INTO kept VALUES (1)", &[]).await?;
    drop(client);

    let port = pg.port();
    pg.stop(StopMode::Fast)?;
    assert!(
        postgres::connect(&pg.url()).await.is_err(),
        "stopped server still accepts connections"
    );
    pg.start_again()?;
    assert_eq!(pg.port(), port);
    let n: i64 = pg
        .client()
        .await
        .query_one("SELECT count(*) FROM kept", &[])
        .await?
        .get(0);
    assert_eq!(n, 1);

    pg.kill9()?;
    pg.start_again()?;
    let n: i64 = pg
        .client()
        .await
        .query_one("SELECT count(*) FROM kept", &[])
        .await?
        .get(0);
    assert_eq!(n, 1, "committed row lost after kill -9");
    assert!(
        pg.log_contents()
            .contains("database system is ready to accept connections")
    );

    pg.stop(StopMode::Immediate)?;
    pg.start_again()?;
    let data_dir = pg.data_dir();
    drop(pg);
    assert!(
        !data_dir.exists(),
        "data dir {} not deleted on drop",
        data_dir.display()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_settings_can_be_overridden() -> anyhow::Result<()> {
    let pg = Postgres::start_with(&[
        ("wal_level", "replica"),
        ("application_name", "it's quoted"),
    ])?;
    assert_eq!(wal_level(&pg).await, "replica");
    let client = pg.client().await;
    let name: String = client.query_one("SHOW application_name", &[]).await?.get(0);
    assert_eq!(name, "it's quoted");
    let err = client
        .execute(
            "SELECT pg_create_logical_replication_slot('s', 'pgoutput')",
            &[],
        )
        .await
        .expect_err("logical slot with wal_level=replica");
    assert!(
        format!("{err:?}").contains("wal_level"),
        "unexpected error: {err:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_jetstream_survives_restarts() -> anyhow::Result<()> {
    let nats = Nats::start()?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    js.query_account().await.context("JetStream account info")?;
    js.create_stream(jetstream::stream::Config {
        name: "HARNESS".into(),
        subjects: vec!["harness.>".into()],
        ..Default::default()
    })
    .await?;
    js.publish("harness.a", "one".into())
        .await?
        .await
        .context("publish ack")?;
    drop(js);

    nats.stop()?;
    nats.start_again()?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js
        .get_stream("HARNESS")
        .await
        .context("stream kept across stop")?;
    assert_eq!(stream.info().await?.state.messages, 1);
    drop(js);

    nats.kill9()?;
    nats.start_again()?;
    let js = jetstream::new(async_nats::connect(nats.url()).await?);
    let mut stream = js
        .get_stream("HARNESS")
        .await
        .context("stream kept across kill -9")?;
    assert_eq!(stream.info().await?.state.messages, 1);

    let store = nats.store_dir();
    assert!(store.exists());
    drop(nats);
    assert!(!store.exists(), "store dir not deleted on drop");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_options_reach_the_server() -> anyhow::Result<()> {
    let nats = Nats::start_with(NatsOptions {
        max_payload: Some(64 * 1024),
        jetstream_extra: "sync_interval: always".into(),
        ..NatsOptions::default()
    })?;
    let client = async_nats::connect(nats.url()).await?;
    assert_eq!(client.server_info().max_payload, 64 * 1024);
    jetstream::new(client)
        .query_account()
        .await
        .context("JetStream enabled")?;

    let plain = Nats::start_with(NatsOptions {
        jetstream: false,
        ..NatsOptions::default()
    })?;
    let client = async_nats::connect(plain.url()).await?;
    assert!(
        jetstream::new(client).query_account().await.is_err(),
        "JetStream should be off"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_cuts_pauses_and_blackholes() -> anyhow::Result<()> {
    let pg = Postgres::start()?;
    let proxy = TcpProxy::start(pg.port());
    let via_proxy = format!("postgres://postgres@127.0.0.1:{}/postgres", proxy.port());

    // cut: the open connection dies, new ones work.
    let client = postgres::connect(&via_proxy).await?;
    client
        .query_one("SELECT 1", &[])
        .await
        .context("query through proxy")?;
    proxy.cut();
    assert!(
        client.query_one("SELECT 1", &[]).await.is_err(),
        "query after cut succeeded"
    );
    let client = postgres::connect(&via_proxy)
        .await
        .context("reconnect after cut")?;
    client.query_one("SELECT 1", &[]).await?;

    // pause: bytes are held, not lost.
    proxy.pause();
    let stalled = tokio::time::timeout(
        Duration::from_millis(300),
        client.query_one("SELECT 1", &[]),
    )
    .await;
    assert!(stalled.is_err(), "query completed while paused");
    let query = tokio::spawn(async move {
        client
            .query_one("SELECT 2", &[])
            .await
            .map(|r| r.get::<_, i32>(0))
    });
    proxy.resume();
    let two = tokio::time::timeout(TIMEOUT, query)
        .await
        .context("query after resume")???;
    assert_eq!(two, 2);

    // blackhole: connections are accepted but never answered.
    proxy.blackhole(true);
    let hung =
        tokio::time::timeout(Duration::from_millis(300), postgres::connect(&via_proxy)).await;
    assert!(hung.is_err(), "connect through a blackhole finished");
    proxy.blackhole(false);
    let client = postgres::connect(&via_proxy)
        .await
        .context("connect after blackhole")?;
    client.query_one("SELECT 1", &[]).await?;

    // Dropping the proxy closes its connections.
    drop(proxy);
    wait_until(TIMEOUT, || async { client.is_closed() })
        .await
        .context("connection closed on proxy drop")?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_helpers_poll_and_time_out() {
    let mut calls = 0;
    let value = wait_for(TIMEOUT, || {
        calls += 1;
        let n = calls;
        async move { (n >= 3).then_some(n) }
    })
    .await
    .expect("wait_for");
    assert_eq!(value, 3);
    let err = wait_until(Duration::from_millis(100), || async { false })
        .await
        .expect_err("must time out");
    assert!(err.to_string().contains("not met"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn servers_are_cleaned_up_when_a_test_panics() -> anyhow::Result<()> {
    let (tx, rx) = std::sync::mpsc::channel();
    let task = tokio::spawn(async move {
        let pg = Postgres::start().expect("start postgres");
        let nats = Nats::start().expect("start nats");
        tx.send((pg.data_dir(), pg.port(), nats.store_dir(), nats.port()))
            .expect("report dirs");
        panic!("simulated test failure (expected by this test)");
    });
    assert!(task.await.expect_err("the task must panic").is_panic());
    let (data_dir, pg_port, store_dir, nats_port) = rx.recv()?;
    assert!(!data_dir.exists(), "postgres data dir left behind");
    assert!(!store_dir.exists(), "nats store dir left behind");
    for port in [pg_port, nats_port] {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", port)).is_err(),
            "server on {port} still running"
        );
    }
    Ok(())
}
