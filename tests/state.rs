//! The state bucket (SPEC §8) against real Postgres and NATS: pre-existing
//! rows backfilled, every key following the stream, never going back.

use std::time::Duration;

use crate::support::daemon::{Daemon, Env};
use crate::support::state::{assert_state_exact, marker_state, read_bucket, rows_of};
use crate::support::wait_until;
use crate::support::workload::{Tables, Workload};

const BUCKET: &str = "WALCAST_STATE";

/// Rows written before the slot existed are backfilled with `Walcast-Seq: 0`
/// while a workload keeps changing them; afterwards every key holds its
/// row's latest value (or a delete marker) with its last event's seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preexisting_rows_are_backfilled_while_the_stream_flows() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    // Rows from before walcast: no slot while they are written.
    client
        .execute("SELECT pg_drop_replication_slot('walcast')", &[])
        .await
        .expect("drop the slot");
    let mut workload = Workload::new(Workload::seed(), 5);
    workload.run(&mut client, 600).await;
    walcast::migrate::run(&env.settings())
        .await
        .expect("migrate creates the slot again");
    let before = Tables::load(&client).await;
    assert!(
        before.tasks.len() > 50,
        "pre-existing rows: {}",
        before.tasks.len()
    );

    let daemon = Daemon::start(env.settings());
    let url = env.nats.url();
    // The stream flows while the backfill copies.
    workload.run(&mut client, 400).await;
    wait_until(Duration::from_secs(60), || {
        let url = url.clone();
        async move { marker_state(&url, BUCKET).await.as_deref() == Some("complete") }
    })
    .await
    .expect("the backfill completes");
    workload.run(&mut client, 200).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let real = Tables::load(&client).await;
    wait_until(Duration::from_secs(30), || {
        let (url, real) = (url.clone(), &real);
        async move { rows_of(&read_bucket(&url, BUCKET).await) == *real }
    })
    .await
    .expect("the bucket converges to the tables");
    daemon.stop().await.expect("clean stop");

    let events = env.stream_events().await;
    let entries = read_bucket(&url, BUCKET).await;
    assert_state_exact(&entries, &events, &real);
    let unchanged = entries.values().filter(|e| e.seq == 0).count();
    assert!(
        unchanged > 0,
        "some pre-existing rows were never changed: Walcast-Seq 0"
    );
    eprintln!(
        "{} keys ({unchanged} backfilled and unchanged), {} events",
        entries.len(),
        events.len()
    );
}

/// Drops the slot, writes rows walcast never sees as changes, and creates
/// the slot again: the state of an application adopting walcast.
async fn preexisting_rows(
    env: &Env,
    client: &mut tokio_postgres::Client,
    workload: &mut Workload,
    txs: usize,
) {
    client
        .execute("SELECT pg_drop_replication_slot('walcast')", &[])
        .await
        .expect("drop the slot");
    workload.run(client, txs).await;
    walcast::migrate::run(&env.settings())
        .await
        .expect("migrate creates the slot again");
}

async fn wait_complete(url: &str) {
    wait_until(Duration::from_secs(90), || async {
        marker_state(url, BUCKET).await.as_deref() == Some("complete")
    })
    .await
    .expect("the backfill completes");
}

/// Waits until the bucket holds exactly the tables' rows, then checks every
/// key against the stream.
async fn assert_converges(env: &Env, client: &tokio_postgres::Client) -> usize {
    env.wait_caught_up(client, Duration::from_secs(90)).await;
    let real = Tables::load(client).await;
    let url = env.nats.url();
    wait_until(Duration::from_secs(60), || {
        let (url, real) = (url.clone(), &real);
        async move { rows_of(&read_bucket(&url, BUCKET).await) == *real }
    })
    .await
    .expect("the bucket converges to the tables");
    let entries = read_bucket(&url, BUCKET).await;
    assert_state_exact(&entries, &env.stream_events().await, &real);
    entries.len()
}

/// kill -9 during the backfill and during a workload, a NATS restart, then
/// `walcast backfill` beside a running walcast (nothing overwritten) and
/// alone after the bucket was purged: every key ends at its row's latest
/// value and last event's seq. `walcast tail --state` prints a tenant's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_kill9_and_nats_restart_and_backfills_on_demand() {
    use crate::support::chaos::{Load, Walcast};
    use crate::support::edge::run_bounded;
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 4);
    preexisting_rows(&env, &mut client, &mut workload, 3000).await;
    let url = env.nats.url();
    let dir = crate::support::TempDir::new("state-chaos").unwrap();
    let vars = env.env_vars();

    let mut first = Walcast::start("first", dir.path(), &vars, &[]);
    let load = Load::start(&env, 4, Duration::from_millis(2)).await;
    first
        .wait_log("state backfill started", Duration::from_secs(60))
        .await;
    first.kill9().await;
    let mut second = Walcast::start("second", dir.path(), &vars, &[]);
    wait_complete(&url).await;
    load.wait_transactions(150, Duration::from_secs(60)).await;
    second.kill9().await;
    let third = Walcast::start("third", dir.path(), &vars, &[]);
    load.wait_transactions(150, Duration::from_secs(60)).await;
    tokio::task::block_in_place(|| env.nats.stop()).expect("stop nats");
    tokio::task::block_in_place(|| env.nats.start_again()).expect("start nats");
    load.wait_transactions(150, Duration::from_secs(90)).await;
    load.stop().await;
    let keys = assert_converges(&env, &client).await;

    let backfill =
        tokio::task::block_in_place(|| run_bounded(&["backfill"], &vars, Duration::from_secs(90)));
    assert_eq!(
        backfill.code,
        Some(0),
        "walcast backfill beside a running walcast:\n{}",
        backfill.stderr
    );
    assert!(
        backfill.stdout.contains("backfill complete"),
        "{}",
        backfill.stdout
    );
    assert_converges(&env, &client).await;

    let tenant = "tenant-1";
    let tail = tokio::task::block_in_place(|| {
        run_bounded(
            &["tail", "--state", "--tenant", tenant],
            &vars,
            Duration::from_secs(30),
        )
    });
    assert_eq!(tail.code, Some(0), "{}", tail.stderr);
    let real = Tables::load(&client).await;
    let rows = real
        .tasks
        .values()
        .filter(|t| t.tenant_id == tenant)
        .count()
        + real
            .projects
            .values()
            .filter(|p| p.tenant_id == tenant)
            .count()
        + real
            .locks
            .values()
            .filter(|l| l.tenant_id == tenant)
            .count();
    assert_eq!(
        tail.stdout.lines().count(),
        rows,
        "tail --state prints the tenant's rows"
    );
    let mut third = third;
    third.stop(Duration::from_secs(15)).await;

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    js.get_stream(format!("KV_{BUCKET}"))
        .await
        .unwrap()
        .purge()
        .await
        .expect("purge the bucket");
    let alone =
        tokio::task::block_in_place(|| run_bounded(&["backfill"], &vars, Duration::from_secs(90)));
    assert_eq!(
        alone.code,
        Some(0),
        "walcast backfill alone:\n{}",
        alone.stderr
    );
    eprintln!("walcast backfill alone:\n{}", alone.stderr);
    let after_purge = assert_converges(&env, &client).await;
    eprintln!("{keys} keys; {after_purge} after a purge and walcast backfill alone");
}
