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
