//! The state bucket (SPEC §8) on a 3-node NATS cluster, replicated like the
//! stream (R3). On a cluster, direct gets are answered by the nearest
//! replica and a loader's consumer is placed on any of them, so a replica
//! that lags can be read: walcast's own decisions (re-checking a key after
//! a restart, reading the backfill marker) must not trust one, and the
//! backfill's `complete` waits for every replica (docs/STATE.md, "Clustered
//! buckets").

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::state::{Replica, follow, of_tenant};
use crate::support::chaos::{Load, Walcast, catch_up};
use crate::support::cluster::{Cluster, NODES};
use crate::support::daemon::{init_logging, read_stream};
use crate::support::postgres::Postgres;
use crate::support::state::{assert_state_exact, marker_state, read_bucket, wait_bucket_holds};
use crate::support::workload::{Tables, Workload};
use crate::support::{TempDir, wait_until};

const BUCKET: &str = "WALCAST_STATE";
const TENANTS: usize = 3;

/// Pre-existing rows are backfilled into an R3 bucket while loaders, one
/// per tenant on each node, wait for it; more loaders start during a
/// workload, walcast is killed (kill -9) and started again (it re-checks
/// its recent writes key by key), and a last wave loads after that. Every
/// loader's snapshot plus its events ends equal to its tenant's rows, and
/// every key ends at its row's latest value and last event's seq.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_on_a_three_node_cluster_stays_exact_through_kill9() {
    init_logging();
    let pg = Postgres::start().expect("start postgres");
    let cluster = Cluster::start().await.expect("start a 3-node nats cluster");
    let settings = cluster.settings(&pg);
    let mut client = pg.client().await;
    // Rows from before walcast: written while no slot exists.
    walcast::migrate::run(&settings)
        .await
        .expect("walcast migrate");
    client
        .execute("SELECT pg_drop_replication_slot('walcast')", &[])
        .await
        .expect("drop the slot");
    let mut workload = Workload::new(Workload::seed(), TENANTS);
    workload.run(&mut client, 1500).await;
    walcast::migrate::run(&settings)
        .await
        .expect("migrate creates the slot again");

    let dir = TempDir::new("cluster-state").expect("log dir");
    let env = cluster.walcast_env(&pg, 0);
    let urls = cluster.urls();
    let mut loaders = Vec::new();
    let mut start_loaders = |wave: usize| {
        for i in 0..TENANTS {
            let tenant = format!("tenant-{i}");
            let url = urls[(i + wave) % NODES].clone();
            let replica = Arc::new(Mutex::new(Replica::default()));
            let task = tokio::spawn(follow(url, tenant.clone(), replica.clone()));
            loaders.push((format!("{tenant} (wave {wave})"), tenant, replica, task));
        }
    };
    // The first wave waits for the backfill and loads the moment it completes.
    start_loaders(0);
    let mut w = Walcast::start("walcast", dir.path(), &env, &[]);
    let load = Load::start_on(&pg, TENANTS, Duration::from_millis(2)).await;
    let marker_url = cluster.any_url();
    wait_until(Duration::from_secs(120), || async {
        marker_state(&marker_url, BUCKET).await.as_deref() == Some("complete")
    })
    .await
    .unwrap_or_else(|e| panic!("the backfill never completed: {e}\n{}", w.log_tail(40)));
    load.wait_transactions(100, Duration::from_secs(60)).await;
    start_loaders(1);
    load.wait_transactions(100, Duration::from_secs(60)).await;
    w.kill9().await;
    load.wait_transactions(50, Duration::from_secs(60)).await;
    let mut w = Walcast::start("walcast-restarted", dir.path(), &env, &[]);
    load.wait_transactions(150, Duration::from_secs(120)).await;
    start_loaders(2);
    load.wait_transactions(100, Duration::from_secs(60)).await;
    let stats = load.stop().await;
    if let Err(e) = catch_up(&client, Duration::from_secs(90)).await {
        panic!("walcast did not catch up: {e}\n{}", w.log_tail(60));
    }
    let real = Tables::load(&client).await;

    for (name, tenant, replica, task) in &loaders {
        let want = of_tenant(&real, tenant);
        wait_until(Duration::from_secs(60), || async {
            replica.lock().unwrap().tables == want
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{name}: snapshot + events never equalled the tables: {e}\n{}",
                w.log_tail(40)
            )
        });
        assert!(!task.is_finished(), "{name}: the loader stopped early");
        let r = replica.lock().unwrap();
        eprintln!(
            "[cluster-state] {name}: as of {:?}, followed to {}, {} tasks",
            r.as_of,
            r.last_seq,
            want.tasks.len()
        );
    }
    let url = cluster.any_url();
    wait_bucket_holds(
        &url,
        BUCKET,
        &real,
        Duration::from_secs(60),
        "the bucket converges to the tables",
    )
    .await;
    w.stop(Duration::from_secs(15)).await;
    let entries = read_bucket(&url, BUCKET).await;
    assert_state_exact(&entries, &read_stream(&url, "WALCAST").await, &real);
    for (_, _, _, task) in loaders {
        task.abort();
    }
    eprintln!(
        "[cluster-state] PASS: {} keys ({} backfilled and unchanged); workload {stats:?}",
        entries.len(),
        entries.values().filter(|e| e.seq == 0).count()
    );
}
