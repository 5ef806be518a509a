//! The state bucket (SPEC §8) against real Postgres and NATS: pre-existing
//! rows backfilled, every key following the stream, never going back.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::support::daemon::{Daemon, Env, StreamEvent};
use crate::support::state::{
    assert_state_exact, marker_state, read_bucket, rows_of, wait_bucket_holds,
};
use crate::support::wait_until;
use crate::support::workload::{Tables, Workload, insert_tasks};

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
    wait_bucket_holds(
        &url,
        BUCKET,
        &real,
        Duration::from_secs(30),
        "the bucket converges to the tables",
    )
    .await;
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

/// The bucket purged while walcast runs (SPEC §8: "or an operator purged
/// it"): walcast projects the stream into it again and backfills, so every
/// key ends with its row's last event's seq — a row changed before the purge
/// and not since is not copied back with seq 0 — while the stream flows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_purged_while_walcast_runs_gets_each_rows_seq_back() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 4);
    preexisting_rows(&env, &mut client, &mut workload, 300).await;
    let daemon = Daemon::start(env.settings());
    let url = env.nats.url();
    workload.run(&mut client, 300).await;
    wait_complete(&url).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;

    purge_bucket(&url).await;
    workload.run(&mut client, 100).await;
    wait_complete(&url).await;
    workload.run(&mut client, 100).await;
    let keys = assert_converges(&env, &client).await;
    daemon.stop().await.expect("clean stop");
    eprintln!("{keys} keys after a purge under a running walcast");
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

/// What an operator's `nats stream purge KV_WALCAST_STATE` does.
async fn purge_bucket(url: &str) {
    let js = async_nats::jetstream::new(async_nats::connect(url).await.unwrap());
    js.get_stream(format!("KV_{BUCKET}"))
        .await
        .unwrap()
        .purge()
        .await
        .expect("purge the bucket");
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
    assert_converges_on(env, client, |_| true).await
}

/// [`assert_converges`], judging the bucket by the stream messages `keep`
/// takes.
async fn assert_converges_on(
    env: &Env,
    client: &tokio_postgres::Client,
    keep: fn(&StreamEvent) -> bool,
) -> usize {
    env.wait_caught_up(client, Duration::from_secs(90)).await;
    let real = Tables::load(client).await;
    let url = env.nats.url();
    wait_bucket_holds(
        &url,
        BUCKET,
        &real,
        Duration::from_secs(60),
        "the bucket converges to the tables",
    )
    .await;
    let entries = read_bucket(&url, BUCKET).await;
    let mut events = env.stream_events().await;
    events.retain(keep);
    assert_state_exact(&entries, &events, &real);
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
    let rechecks = third.log().matches(RECHECKING).count();
    tokio::task::block_in_place(|| env.nats.stop()).expect("stop nats");
    tokio::task::block_in_place(|| env.nats.start_again()).expect("start nats");
    load.wait_transactions(150, Duration::from_secs(90)).await;
    // A restarted nats-server may have lost acknowledged writes: the state
    // service, its connection dropped, re-checks them key by key.
    wait_until(Duration::from_secs(60), || async {
        third.log().matches(RECHECKING).count() > rechecks
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "no re-check after the NATS restart: {e}\n{}",
            third.log_tail(40)
        )
    });
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

    purge_bucket(&url).await;
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

/// What the state service logs when it re-checks its recent writes key by
/// key, and when a start skips that.
const RECHECKING: &str = "re-checking the state bucket's recent writes key by key";
const RECHECK_SKIPPED: &str = "no re-check of earlier writes";

/// A pipeline restart the broker had no part in — here one message walcast
/// did not publish — starts the state service again on the same
/// nats-server process: it skips the key-by-key re-check (nothing can have
/// been lost; at 1,000 commits/s it doubled such a restart's stall,
/// docs/BENCHMARKS.md session 31) and the state still ends equal to the
/// tables. The opposite case, a NATS restart, re-checks
/// (`survives_kill9_and_nats_restart_and_backfills_on_demand`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pipeline_restart_on_the_same_broker_skips_the_state_recheck() {
    use crate::support::chaos::{Load, Walcast};
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = crate::support::TempDir::new("state-skip").unwrap();
    // A checkpoint well behind the stream's end, as in production.
    let delay = [("WALCAST_CONFIRM_DELAY", "20s")];
    let mut w = Walcast::start("walcast", dir.path(), &env.env_vars(), &delay);
    let load = Load::start(&env, 4, Duration::from_millis(2)).await;
    wait_complete(&env.nats.url()).await;
    // Past the end of the first start's own re-check (1,024 positions past
    // what the bucket held) and a second of the projection's samples.
    load.wait_transactions(3000, Duration::from_secs(120)).await;
    let nats = async_nats::connect(env.nats.url()).await.expect("connect");
    // Empty: the test's stream reads decode it (as a default event) and
    // leave it out below, having no event id.
    nats.publish("walcast.acme.task.created", "".into())
        .await
        .expect("publish a foreign message");
    nats.flush().await.expect("flush");
    w.wait_log(RECHECK_SKIPPED, Duration::from_secs(60)).await;
    load.wait_transactions(300, Duration::from_secs(60)).await;
    load.stop().await;
    assert_converges_on(&env, &client, StreamEvent::is_walcasts).await;
    let log = w.log();
    assert!(
        log.contains("the stream holds messages walcast did not publish"),
        "the restart was not the foreign message's:\n{}",
        w.log_tail(40)
    );
    let since = &log[log.find(RECHECK_SKIPPED).unwrap_or(0)..];
    assert!(
        !since.contains(RECHECKING),
        "the state re-checked after a pipeline restart on the same broker:\n{}",
        w.log_tail(40)
    );
    assert_scanned_from_own_tail(&w);
    w.stop(Duration::from_secs(15)).await;
}

/// The restart read the stream for foreign messages from the last message
/// the process saw acknowledged (what landed after it: the foreign message,
/// and what the refused batch had stored before it), not from the
/// checkpoint, 20 s behind.
fn assert_scanned_from_own_tail(w: &crate::support::chaos::Walcast) {
    use crate::support::chaos::field;
    let scan = w.log_fields("reading the stream's headers for messages walcast did not publish");
    let from_own_tail = scan.get("after_own_tail").map(String::as_str);
    assert_eq!(from_own_tail, Some("true"), "{scan:?}");
    let (read, past) = (field(&scan, "messages"), field(&scan, "past_checkpoint"));
    // At most the refused publish batch (512 events) and the message.
    assert!((1..=1_024).contains(&read) && past > read, "{scan:?}");
}

/// What one loader saw: its replica of the tenant's rows and the last seq
/// applied.
#[derive(Default)]
pub struct Replica {
    pub tables: Tables,
    pub as_of: Option<u64>,
    pub last_seq: u64,
}

/// Loads `tenant` with the Rust client and applies everything it yields to
/// a replica, checking that events follow the snapshot one seq at a time.
pub async fn follow(
    url: String,
    tenant: String,
    replica: std::sync::Arc<std::sync::Mutex<Replica>>,
) {
    use futures::StreamExt;
    use walcast_client::{Client, Options, StateUpdate};
    let client = Client::connect(&url, Options::default())
        .await
        .expect("client connects");
    let mut updates = client.load_and_follow(&tenant).expect("load starts");
    while let Some(update) = updates.next().await {
        let mut r = replica.lock().unwrap();
        match update.expect("no client error") {
            StateUpdate::Snapshot(snapshot) => {
                assert!(r.as_of.is_none(), "one snapshot, first");
                for event in snapshot.rows.values() {
                    r.tables.apply(event);
                }
                r.as_of = Some(snapshot.as_of_seq);
                r.last_seq = snapshot.as_of_seq;
            }
            StateUpdate::Event(event) => {
                assert!(r.as_of.is_some(), "the snapshot comes first");
                assert_eq!(
                    event.seq,
                    r.last_seq + 1,
                    "{tenant}: every event once, in order"
                );
                r.last_seq = event.seq;
                r.tables.apply(&event);
            }
            StateUpdate::Resync { .. } => panic!("{tenant}: unexpected re-sync"),
        }
    }
}

/// The rows of one tenant.
pub fn of_tenant(t: &Tables, tenant: &str) -> Tables {
    Tables {
        tasks: t
            .tasks
            .iter()
            .filter(|(_, r)| r.tenant_id == tenant)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        projects: t
            .projects
            .iter()
            .filter(|(_, r)| r.tenant_id == tenant)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        locks: t
            .locks
            .iter()
            .filter(|(_, r)| r.tenant_id == tenant)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}

/// Loaders (the Rust client against the real daemon) start at random
/// moments of a workload over pre-existing rows: each one's snapshot plus
/// the events after its `as_of_seq` ends equal to its tenant's rows — no
/// event applied twice, none missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loaders_started_during_a_workload_end_equal_to_the_tables() {
    use crate::support::chaos::Load;
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 3);
    preexisting_rows(&env, &mut client, &mut workload, 300).await;
    let daemon = Daemon::start(env.settings());
    let load = Load::start(&env, 3, Duration::from_millis(2)).await;
    let mut loaders = Vec::new();
    for i in 0..6 {
        load.wait_transactions(40 + 15 * i as u64, Duration::from_secs(60))
            .await;
        let tenant = format!("tenant-{}", i % 3);
        let replica = Arc::new(Mutex::new(Replica::default()));
        let task = tokio::spawn(follow(env.nats.url(), tenant.clone(), replica.clone()));
        loaders.push((tenant, replica, task));
    }
    load.wait_transactions(100, Duration::from_secs(60)).await;
    load.stop().await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let real = Tables::load(&client).await;
    for (tenant, replica, task) in &loaders {
        let want = of_tenant(&real, tenant);
        wait_until(Duration::from_secs(60), || async {
            replica.lock().unwrap().tables == want
        })
        .await
        .unwrap_or_else(|e| panic!("{tenant}: snapshot + events never equalled the tables: {e}"));
        assert!(!task.is_finished(), "{tenant}: the loader stopped early");
        let r = replica.lock().unwrap();
        eprintln!(
            "{tenant}: as of {:?}, followed to {}, {} tasks",
            r.as_of,
            r.last_seq,
            want.tasks.len()
        );
    }
    for (_, _, task) in loaders {
        task.abort();
    }
    daemon.stop().await.expect("clean stop");
}

/// A TRUNCATE of a source table removes that table's rows (every tenant's)
/// from the state; the other tables' rows stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_table_leaves_the_state() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 3);
    let daemon = Daemon::start(env.settings());
    workload.run(&mut client, 300).await;
    wait_complete(&env.nats.url()).await;
    assert_converges(&env, &client).await;
    let url = env.nats.url();
    let entries_before = read_bucket(&url, BUCKET).await;
    let before = rows_of(&entries_before);
    assert!(!before.locks.is_empty(), "the workload took locks");
    client
        .batch_execute("TRUNCATE editing_locks")
        .await
        .expect("truncate");
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let entries = crate::support::wait_for(Duration::from_secs(30), || async {
        let entries = read_bucket(&url, BUCKET).await;
        let locks_left = entries
            .values()
            .any(|e| e.key.contains(".lock.") && !e.deleted);
        (!locks_left).then_some(entries)
    })
    .await
    .expect("the locks leave the state");
    let after = rows_of(&entries);
    assert_eq!(
        (after.tasks, after.projects),
        (before.tasks, before.projects),
        "the other tables stay"
    );
    // Each lock is deleted at the seq it held, so no tenant's as_of_seq (the
    // highest seq a load reads, markers included) goes back: following from
    // it never replays the truncated rows' events.
    for (key, held) in entries_before.iter().filter(|(k, _)| k.contains(".lock.")) {
        let now = &entries[key];
        assert!(now.deleted, "{key} deleted");
        assert_eq!(now.seq, held.seq, "{key}: its marker keeps the seq it held");
    }
    assert_eq!(
        as_of_seqs(&entries),
        as_of_seqs(&entries_before),
        "every tenant's as_of_seq"
    );
    daemon.stop().await.expect("clean stop");
}

/// UPDATEs that change a row's tenant, its id, a lock's record, or make its
/// tenant a dead letter's leave its old key a delete marker carrying the
/// seq it held — rows the backfill copied (seq 0) and rows with events
/// alike — and a row moved back takes its old key again. The bucket stays
/// exact, loads of the old tenant no longer have the row, and replaying the
/// stream into a purged bucket ends the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_tenant_or_id_changes_leaves_its_old_key() {
    const A: &str = "a0000000-0000-4000-8000-000000000001";
    const B: &str = "a0000000-0000-4000-8000-000000000002";
    const D: &str = "a0000000-0000-4000-8000-000000000003";
    const D2: &str = "a0000000-0000-4000-8000-000000000004";
    const R2: &str = "a0000000-0000-4000-8000-000000000005";
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 3);
    client
        .execute("SELECT pg_drop_replication_slot('walcast')", &[])
        .await
        .expect("drop the slot");
    // Before walcast: two tasks and a lock of tenant-x, copied by the backfill.
    client
        .batch_execute(&format!(
            "INSERT INTO tasks (id, tenant_id, title) VALUES ('{A}', 'tenant-x', 'a'), ('{B}', 'tenant-x', 'b');
             INSERT INTO editing_locks (tenant_id, record_type, record_id, locked_by, locked_at, expires_at)
               VALUES ('tenant-x', 'task', '{A}', 'ann', now(), now() + interval '1 hour')"
        ))
        .await
        .expect("rows before walcast");
    walcast::migrate::run(&env.settings())
        .await
        .expect("migrate creates the slot again");
    let daemon = Daemon::start(env.settings());
    let url = env.nats.url();
    wait_complete(&url).await;
    workload.run(&mut client, 100).await;
    // A task with events.
    client
        .batch_execute(&format!(
            "INSERT INTO tasks (id, tenant_id, title) VALUES ('{D}', 'tenant-x', 'd');
             UPDATE tasks SET title = 'd2' WHERE id = '{D}'"
        ))
        .await
        .expect("a task with events");
    assert_converges(&env, &client).await;
    let held = read_bucket(&url, BUCKET).await;
    let held_d = held[&format!("tenant-x.task.{D}")].seq;
    assert!(held_d > 0, "task D has events");
    for (what, sql) in [
        (
            "A to tenant-0",
            format!("UPDATE tasks SET tenant_id = 'tenant-0' WHERE id = '{A}'"),
        ),
        (
            "D's id",
            format!("UPDATE tasks SET id = '{D2}' WHERE id = '{D}'"),
        ),
        (
            "B to a dead letter",
            format!("UPDATE tasks SET tenant_id = 'bad.tenant' WHERE id = '{B}'"),
        ),
        (
            "the lock's record",
            format!("UPDATE editing_locks SET record_id = '{R2}' WHERE record_id = '{A}'"),
        ),
        (
            "A back",
            format!("UPDATE tasks SET tenant_id = 'tenant-x' WHERE id = '{A}'"),
        ),
        // Out of the dead letters (the state holds no dead letter's row), to a
        // tenant the workload leaves alone (it may delete a row of its own).
        (
            "B to tenant-y",
            format!("UPDATE tasks SET tenant_id = 'tenant-y' WHERE id = '{B}'"),
        ),
    ] {
        client
            .batch_execute(&sql)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e}"));
    }
    workload.run(&mut client, 50).await;
    assert_converges(&env, &client).await;
    let entries = read_bucket(&url, BUCKET).await;
    let marker = |key: String| {
        let entry = &entries[&key];
        assert!(entry.deleted, "{key} is a delete marker");
        entry.seq
    };
    assert_eq!(
        marker(format!("tenant-x.task.{B}")),
        0,
        "B: the backfill's seq"
    );
    assert_eq!(
        marker(format!("tenant-x.task.{D}")),
        held_d,
        "D: the seq it held"
    );
    assert_eq!(marker(format!("tenant-x.lock.task.{A}")), 0, "the lock");
    assert!(
        marker(format!("tenant-0.task.{A}")) > 0,
        "A held tenant-0's seq"
    );
    assert!(!entries[&format!("tenant-x.task.{A}")].deleted, "A is back");
    assert!(
        !entries[&format!("tenant-x.task.{D2}")].deleted,
        "D's new key"
    );
    assert!(
        !entries[&format!("tenant-y.task.{B}")].deleted,
        "B's new key"
    );

    // A load of each tenant is its rows.
    let real = Tables::load(&client).await;
    for tenant in ["tenant-x", "tenant-0"] {
        let replica = Arc::new(Mutex::new(Replica::default()));
        let task = tokio::spawn(follow(url.clone(), tenant.into(), replica.clone()));
        let want = of_tenant(&real, tenant);
        wait_until(Duration::from_secs(30), || async {
            replica.lock().unwrap().tables == want
        })
        .await
        .unwrap_or_else(|e| panic!("{tenant}: the load is not its rows: {e}"));
        task.abort();
    }

    // The stream replayed into a purged bucket ends the same.
    purge_bucket(&url).await;
    wait_complete(&url).await;
    assert_converges(&env, &client).await;
    daemon.stop().await.expect("clean stop");
}

/// What a load computes for each tenant: the highest `Walcast-Seq` of its
/// keys, values and delete markers.
fn as_of_seqs(
    entries: &std::collections::BTreeMap<String, crate::support::state::Entry>,
) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for entry in entries.values() {
        let tenant = entry.key.split('.').next().unwrap_or_default();
        if entry.key.split('.').count() >= 3 {
            let seq = out.entry(tenant.to_string()).or_insert(0);
            *seq = (*seq).max(entry.seq);
        }
    }
    out
}

/// Messages removed from the middle of the stream (a purge by subject while
/// walcast was down) do not stall the state: replaying the stream into a
/// new bucket, the projection reports the hole and goes on, and the
/// backfill completes with the tables' rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hole_in_the_stream_is_reported_and_the_state_goes_on() {
    use crate::support::chaos::Walcast;
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let url = env.nats.url();
    let dir = crate::support::TempDir::new("state-hole").unwrap();
    let vars = env.env_vars();
    let mut first = Walcast::start("first", dir.path(), &vars, &[]);
    let mut workload = Workload::new(Workload::seed(), 3);
    workload.run(&mut client, 300).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    first.stop(Duration::from_secs(15)).await;

    let js = async_nats::jetstream::new(async_nats::connect(&url).await.unwrap());
    let stream = js.get_stream("WALCAST").await.expect("the stream");
    let purged = stream
        .purge()
        .filter("walcast.tenant-1.>")
        .keep(1)
        .await
        .expect("purge tenant-1 but its last event");
    assert!(purged.purged > 10, "{} messages purged", purged.purged);
    js.delete_key_value(BUCKET)
        .await
        .expect("delete the state bucket");

    let mut second = Walcast::start("second", dir.path(), &vars, &[]);
    second
        .wait_log(
            "the state's read of the stream found positions",
            Duration::from_secs(60),
        )
        .await;
    wait_complete(&url).await;
    let real = Tables::load(&client).await;
    wait_bucket_holds(
        &url,
        BUCKET,
        &real,
        Duration::from_secs(60),
        "the bucket holds the tables' rows",
    )
    .await;
    second.stop(Duration::from_secs(15)).await;
}

/// A state service that cannot run (the bucket is incompatible: history 5)
/// starts again and again on its thread while the stream goes on, and
/// `walcast_state_lag_events` counts the events it has not applied — the
/// gauge an operator's alert watches (it used to stay unset, or frozen at
/// its last value, while the service was down); after a restart it counts
/// from the position saved in Postgres.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lag_gauge_counts_while_the_state_cannot_run() {
    use crate::support::edge::{start_walcast, wait_metric};
    let env = Env::start().await;
    let client = env.pg.client().await;
    let js = async_nats::jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    js.create_key_value(async_nats::jetstream::kv::Config {
        bucket: BUCKET.into(),
        history: 5,
        ..Default::default()
    })
    .await
    .expect("an incompatible state bucket");
    let dir = crate::support::TempDir::new("state-lag").unwrap();
    let (mut walcast, addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    client
        .execute(
            "INSERT INTO tasks (id, tenant_id, title)
             SELECT md5('lag' || i)::uuid, 'tenant-' || (i % 3), 'row ' || i
             FROM generate_series(1, 20) i",
            &[],
        )
        .await
        .expect("insert 20 tasks");
    let lag = wait_metric(
        &addr,
        "walcast_state_lag_events",
        20.0,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        lag,
        Some(20.0),
        "lag gauge with the state down\n{}",
        walcast.log_tail(20)
    );
    walcast
        .wait_log("is incompatible", Duration::from_secs(10))
        .await;
    walcast.stop(Duration::from_secs(15)).await;

    // A new process counts from the position saved in Postgres until its
    // state service has read its own (here: never), not from 0, which
    // reported the whole stream as lag.
    client
        .execute("UPDATE walcast.checkpoints SET state_applied = 15", &[])
        .await
        .expect("a saved state position");
    let (mut walcast, addr) = start_walcast(&env, dir.path(), "walcast-2", &[]);
    let lag = wait_metric(
        &addr,
        "walcast_state_lag_events",
        5.0,
        Duration::from_secs(60),
    )
    .await;
    assert_eq!(
        lag,
        Some(5.0),
        "lag gauge after a restart, 15 of 20 applied as saved\n{}",
        walcast.log_tail(20)
    );
    walcast.stop(Duration::from_secs(15)).await;
}

/// The state reads what this process publishes from the publisher (the
/// feed) while it keeps up. Held back past what the feed holds, it reads
/// the stream instead, then returns to the feed; the bucket is exact
/// throughout (each key against the stream, the rows against the tables).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_state_reads_the_stream_while_behind_the_feed_and_returns_to_it() {
    use crate::support::TempDir;
    use crate::support::edge::{scrape, start_walcast};
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 3);
    let dir = TempDir::new("state-feed").unwrap();
    let hold = dir.path().join("hold-state");
    let hold_at = format!("state_apply:{}", hold.display());
    let (mut walcast, addr) = start_walcast(
        &env,
        dir.path(),
        "walcast",
        &[("WALCAST_HOLD_AT", &hold_at)],
    );
    let read = |source: &'static str| {
        let addr = addr.clone();
        async move {
            let name = format!("walcast_state_events_read_total{{source=\"{source}\"}}");
            scrape(&addr, &name).await.unwrap_or(0.0)
        }
    };
    workload.run(&mut client, 200).await;
    wait_complete(&env.nats.url()).await;
    assert_converges(&env, &client).await;
    let (fed, streamed) = (read("feed").await, read("stream").await);
    assert!(
        fed > 0.0,
        "kept up: reads the feed ({fed} fed, {streamed} streamed)"
    );

    // Held: the publisher goes on past what the feed holds.
    std::fs::write(&hold, b"").unwrap();
    workload.run(&mut client, 20).await;
    walcast
        .wait_log("holding at state_apply", Duration::from_secs(60))
        .await;
    insert_tasks(&client, "burst", 3, 1, 6000).await;
    workload.run(&mut client, 100).await;
    env.wait_caught_up(&client, Duration::from_secs(90)).await;
    // Read the bucket once the state is level again, not while it writes
    // the backlog (a bucket read racing ~6,000 writes can stall).
    let lag = || scrape(&addr, "walcast_state_lag_events");
    wait_until(Duration::from_secs(60), || async {
        lag().await.is_some_and(|n| n > 6000.0)
    })
    .await
    .expect("the held state lags the burst");
    std::fs::remove_file(&hold).unwrap();
    wait_until(Duration::from_secs(90), || async {
        lag().await == Some(0.0)
    })
    .await
    .expect("the state catches up");
    assert_converges(&env, &client).await;
    let behind = read("stream").await;
    assert!(
        behind >= streamed + 6000.0 - walcast::state::feed::CAPACITY as f64,
        "behind the feed: read back from the stream ({streamed} -> {behind})"
    );

    // Caught up again: back on the feed. Fewer new events than the feed
    // holds, so no scheduling of the threads can leave the state outside
    // its window (the workload would update every burst row of a tenant
    // per statement: 2,000-event transactions, ~20,000 events in all).
    let fed = read("feed").await;
    let rows = (walcast::state::feed::CAPACITY / 8) as i64;
    insert_tasks(&client, "after", 3, 1, rows).await;
    assert_converges(&env, &client).await;
    let (fed_after, streamed_after) = (read("feed").await, read("stream").await);
    assert!(
        fed_after > fed && streamed_after == behind,
        "back on the feed: fed {fed} -> {fed_after}, streamed {behind} -> {streamed_after}"
    );
    walcast.stop(Duration::from_secs(20)).await;
}

/// A backlog drained after a restart reaches the state through the feed:
/// the publisher waits for the projection instead of running past what the
/// feed holds, so not one event is read back from the stream (each would
/// cost the nats-server a delivery and walcast a parse: docs/BENCHMARKS.md,
/// session 19), and the bucket ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_backlog_reaches_the_state_through_the_feed() {
    use crate::support::TempDir;
    use crate::support::edge::{scrape, start_walcast};
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("state-drain").unwrap();
    let (mut walcast, _) = start_walcast(&env, dir.path(), "walcast", &[]);
    wait_complete(&env.nats.url()).await;
    walcast.stop(Duration::from_secs(15)).await;

    // Four times what the feed holds, in transactions of 2,048 rows.
    let batches = 8;
    let rows = walcast::state::feed::CAPACITY as i32 / 2;
    for b in 0..batches {
        insert_tasks(
            &client,
            "backlog",
            7,
            i64::from(b * rows + 1),
            i64::from(rows),
        )
        .await;
    }
    // Only a backlog is paced: events committed over a second before they
    // are published (the publisher's BACKLOG_AGE). This waits for the
    // events to age, not for a condition.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let (mut walcast, addr) = start_walcast(&env, dir.path(), "walcast-2", &[]);
    assert_converges(&env, &client).await;
    let read = |source: &'static str| {
        let name = format!("walcast_state_events_read_total{{source=\"{source}\"}}");
        let addr = addr.clone();
        async move { scrape(&addr, &name).await.unwrap_or(0.0) }
    };
    let (fed, streamed) = (read("feed").await, read("stream").await);
    let events = f64::from(batches * rows);
    assert!(
        streamed == 0.0 && fed >= events,
        "the backlog through the feed: {fed} fed, {streamed} read back from the stream, of {events}\n{}",
        walcast.log_tail(20)
    );
    walcast.stop(Duration::from_secs(20)).await;
}

/// A replica that lags (`StaleReplica`: "not found" for a share of the
/// bucket's direct gets, as a follower that has not applied the newest
/// writes answers on a cluster) while walcast restarts and re-checks its
/// writes key by key: no key steps back to an older event (a watcher of
/// every key sees each key's `Walcast-Seq` only grow), the backfill does
/// not run again, and the bucket ends exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lagging_replica_never_makes_a_key_step_back() {
    use crate::support::chaos::{Load, Walcast};
    use crate::support::nats::NatsOptions;
    use crate::support::stale::StaleReplica;
    let env = Env::start_with(NatsOptions {
        extra: StaleReplica::mappings(&[&format!("KV_{BUCKET}")]),
        ..NatsOptions::default()
    })
    .await;
    let url = env.nats.url();
    let stale = StaleReplica::start(&url, &format!("KV_{BUCKET}")).await;
    let mut client = env.pg.client().await;
    let mut workload = Workload::new(Workload::seed(), 3);
    preexisting_rows(&env, &mut client, &mut workload, 300).await;
    let dir = crate::support::TempDir::new("state-stale").unwrap();
    let vars = env.env_vars();
    let mut first = Walcast::start("first", dir.path(), &vars, &[]);
    wait_complete(&url).await;
    let load = Load::start(&env, 3, Duration::from_millis(1)).await;
    load.wait_transactions(400, Duration::from_secs(120)).await;
    first.kill9().await;

    let steps_back = Arc::new(Mutex::new(Vec::new()));
    let watcher = tokio::spawn(watch_for_steps_back(url.clone(), steps_back.clone()));
    let mut second = Walcast::start("second", dir.path(), &vars, &[]);
    load.wait_transactions(200, Duration::from_secs(120)).await;
    load.stop().await;
    let keys = assert_converges(&env, &client).await;
    second.stop(Duration::from_secs(15)).await;
    watcher.abort();
    let answered = stale.answered();
    assert!(answered > 0, "the lagging replica answered no direct get");
    let steps_back = steps_back.lock().unwrap();
    assert!(
        steps_back.is_empty(),
        "keys stepped back to older events: {:?}",
        &steps_back[..steps_back.len().min(10)]
    );
    let backfills = second.log().matches("state backfill started").count();
    assert_eq!(backfills, 0, "the restart ran the backfill again");
    eprintln!("{keys} keys; the lagging replica answered {answered} direct gets");
}

/// Reads every key of the bucket (its current values, then every write)
/// and records each write whose `Walcast-Seq` is below the key's highest.
async fn watch_for_steps_back(url: String, steps_back: Arc<Mutex<Vec<String>>>) {
    use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
    use futures::StreamExt;
    let js = async_nats::jetstream::new(async_nats::connect(&url).await.expect("connect"));
    let stream = js
        .get_stream(format!("KV_{BUCKET}"))
        .await
        .expect("the bucket");
    let consumer = stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("$KV.{BUCKET}.>"),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut highest = std::collections::HashMap::<String, u64>::new();
    while let Some(Ok(msg)) = messages.next().await {
        let Some(seq) = msg
            .headers
            .as_ref()
            .and_then(|h| h.get("Walcast-Seq"))
            .and_then(|v| v.as_str().parse::<u64>().ok())
        else {
            continue; // the marker
        };
        let high = highest.entry(msg.subject.to_string()).or_default();
        if seq < *high {
            steps_back
                .lock()
                .unwrap()
                .push(format!("{}: {} after {}", msg.subject, seq, *high));
        }
        *high = (*high).max(seq);
    }
}
