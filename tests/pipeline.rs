//! The core pipeline end to end, against real Postgres and NATS.

use std::time::Duration;

use crate::support::chaos::Walcast;
use crate::support::checks::{assert_replays_to_tables, assert_stream_exact};
use crate::support::daemon::{Daemon, Env};
use crate::support::oracle::{count_events, create_counter};
use crate::support::workload::Workload;

/// A randomized multi-tenant workload replays from the stream into exactly the
/// tables Postgres has; seqs are gap-free; nothing rolled back appears.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn randomized_workload_replays_exactly() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 6);
    let daemon = Daemon::start(env.settings());

    workload.run(&mut client, 1000).await;
    workload.big_jsonb(&client, 3).await;
    workload.run(&mut client, 1000).await;
    let stats = &workload.stats;
    assert!(
        stats.rolled_back_txs > 50 && stats.rolled_back_savepoints > 50,
        "{stats:?}"
    );

    env.wait_caught_up(&client, Duration::from_secs(120)).await;
    daemon.stop().await.expect("clean stop");

    let events = env.stream_events().await;
    let per_tenant = assert_stream_exact(&events);
    assert_eq!(per_tenant.len(), 6, "every tenant has events");
    let real = assert_replays_to_tables(&events, &client).await;
    assert!(!real.tasks.is_empty() && !real.projects.is_empty() && !real.locks.is_empty());
    let big = events
        .iter()
        .filter(|m| m.event.encoded_len_hint() > 3 * 1024 * 1024)
        .count();
    assert!(big >= 1, "the multi-MB jsonb arrived whole");
    eprintln!(
        "checked {} events from {} committed transactions: {stats:?}",
        events.len(),
        stats.committed_txs
    );
}

trait EncodedLen {
    fn encoded_len_hint(&self) -> usize;
}

impl EncodedLen for walcast::proto::ChangeEvent {
    fn encoded_len_hint(&self) -> usize {
        prost::Message::encoded_len(self)
    }
}

/// SIGTERM stops the binary cleanly; a restart continues every tenant's seq
/// with no gap and no duplicate, and the slot's confirmed LSN advances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_and_restart_continue_every_seq() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 4);
    create_counter(&client).await;
    let before = confirmed_lsn(&client).await;

    let dir = crate::support::TempDir::new("sigterm").unwrap();
    let mut daemon = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    workload.run(&mut client, 200).await;
    let first_count = count_events(&client).await;
    env.wait_for_messages(first_count, Duration::from_secs(60))
        .await;
    daemon.stop(Duration::from_secs(10)).await; // SIGTERM, exit 0
    let after_first = confirmed_lsn(&client).await;
    assert!(
        after_first > before,
        "slot advanced: {before} -> {after_first}"
    );

    workload.run(&mut client, 200).await; // while walcast is down
    let mut daemon = Walcast::start("second", dir.path(), &env.env_vars(), &[]);
    workload.run(&mut client, 100).await;
    let total = count_events(&client).await;
    env.wait_for_messages(total, Duration::from_secs(60)).await;
    daemon.stop(Duration::from_secs(10)).await;

    let events = env.stream_events().await;
    assert_eq!(events.len() as u64, total, "exactly one message per change");
    assert_stream_exact(&events);
    assert!(confirmed_lsn(&client).await > after_first);
}

async fn confirmed_lsn(client: &tokio_postgres::Client) -> walcast::lsn::Lsn {
    let row = client
        .query_one("SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = 'walcast'", &[])
        .await
        .unwrap();
    walcast::lsn::Lsn::parse(row.get::<_, &str>(0)).unwrap()
}

/// `--dry-run` builds every event but publishes nothing, writes no
/// checkpoint and never confirms the slot, so a later real run still
/// publishes everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dry_run_builds_events_and_publishes_nothing() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = crate::support::TempDir::new("dry-run").unwrap();
    let (mut walcast, addr) = crate::support::edge::start_walcast(
        &env,
        dir.path(),
        "dry",
        &[("WALCAST_DRY_RUN", "true")],
    );
    walcast.wait_log("dry run", Duration::from_secs(30)).await;
    client
        .batch_execute(
            "INSERT INTO projects (id, tenant_id, name) VALUES
               ('00000000-0000-0000-0000-000000000001', 'acme', 'one'),
               ('00000000-0000-0000-0000-000000000002', 'acme', 'two'),
               ('00000000-0000-0000-0000-000000000003', 'beta', 'three')",
        )
        .await
        .unwrap();
    let built = crate::support::edge::wait_metric(
        &addr,
        "walcast_events_built_total",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(built, Some(3.0), "{}", walcast.log_tail(20));
    walcast.stop(Duration::from_secs(15)).await;
    let stream = crate::support::daemon::stream_last_seq(&env.nats.url(), "WALCAST").await;
    assert_eq!(stream, 0, "a dry run published");
    let checkpoints: i64 = client
        .query_one("SELECT count(*) FROM walcast.checkpoints", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(checkpoints, 0, "a dry run wrote a checkpoint");

    // A real run afterwards publishes all three.
    let daemon = Daemon::start(env.settings());
    env.wait_for_messages(3, Duration::from_secs(30)).await;
    daemon.stop().await.expect("clean stop");
    assert_stream_exact(&env.stream_events().await);
}
