//! Failover to a physical standby (PostgreSQL 17+, issue 19): the slot is a
//! failover slot, the standby (pg_basebackup, `sync_replication_slots = on`)
//! keeps a synced copy, and the primary's `synchronized_standby_slots`
//! holds walcast back to what the standby has. Mid-workload the primary is
//! killed and the standby promoted; walcast, given both hosts in one URL,
//! follows by itself and continues from the synced slot: against an
//! independent log written by triggers in the application's own
//! transactions (physically replicated, so it is exactly what the new
//! primary committed), the stream has every change once, per-tenant seqs
//! stay continuous, and replaying it rebuilds the new primary's tables.
//! On the way, the promoted standby's inherited `synchronized_standby_slots`
//! (pg_basebackup copies `postgresql.auto.conf`) holds walcast back until
//! the fix `walcast check` prints is applied.
//! Needs the version matrix's PostgreSQL 18 (`WALCAST_MATRIX_PG_BIN`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::task::JoinHandle;
use tokio_postgres::Client;
use walcast::proto::Entity;

use crate::support::chaos::{Walcast, catch_up};
use crate::support::checks::{assert_replays_to_tables, assert_stream_exact};
use crate::support::daemon::{Env, read_stream};
use crate::support::edge::{run_bounded, with_var};
use crate::support::oracle::Op;
use crate::support::postgres::{Postgres, connect};
use crate::support::workload::Workload;
use crate::support::{TempDir, wait_until};

/// An audit log of every row change of the three tables, written in the
/// same transaction by row triggers (so it commits, rolls back and
/// replicates with the change itself).
const AUDIT: &str = "
CREATE TABLE public.audit (n bigserial PRIMARY KEY, xid bigint NOT NULL DEFAULT txid_current(),
                           tbl text NOT NULL, op text NOT NULL, key text NOT NULL, tenant text);
CREATE FUNCTION public.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE j jsonb;
BEGIN
    j := CASE WHEN TG_OP = 'DELETE' THEN to_jsonb(OLD) ELSE to_jsonb(NEW) END;
    INSERT INTO public.audit (tbl, op, key, tenant) VALUES (TG_TABLE_NAME, TG_OP,
        CASE WHEN TG_TABLE_NAME = 'editing_locks' THEN (j->>'record_type') || ':' || (j->>'record_id')
             ELSE j->>'id' END,
        j->>'tenant_id');
    RETURN NULL;
END $$;
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.tasks FOR EACH ROW EXECUTE FUNCTION public.audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.projects FOR EACH ROW EXECUTE FUNCTION public.audit_row();
CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON public.editing_locks FOR EACH ROW EXECUTE FUNCTION public.audit_row();
";

/// One change as (table, operation, key, tenant).
type Change = (String, Op, String, String);

/// The audit log of `client`'s server: each transaction's changes in order.
async fn audited(client: &Client) -> BTreeMap<u64, Vec<Change>> {
    let rows = client
        .query(
            "SELECT xid, tbl, op, key, coalesce(tenant, '') FROM public.audit ORDER BY n",
            &[],
        )
        .await
        .unwrap();
    let mut out: BTreeMap<u64, Vec<Change>> = BTreeMap::new();
    for r in rows {
        let op = match r.get::<_, &str>(2) {
            "INSERT" => Op::Insert,
            "UPDATE" => Op::Update,
            _ => Op::Delete,
        };
        out.entry(r.get::<_, i64>(0) as u64)
            .or_default()
            .push((r.get(1), op, r.get(3), r.get(4)));
    }
    out
}

/// A write load that ends quietly when its server goes away (a failover),
/// instead of failing the test.
struct TolerantLoad {
    stop: Arc<AtomicBool>,
    txs: Arc<AtomicU64>,
    handle: JoinHandle<()>,
}

impl TolerantLoad {
    async fn start(url: &str, seed: u64) -> TolerantLoad {
        let mut client = connect(url).await.unwrap();
        let mut workload = Workload::new(seed, 5);
        let stop = Arc::new(AtomicBool::new(false));
        let txs = Arc::new(AtomicU64::new(0));
        let handle = tokio::spawn({
            let (stop, txs) = (stop.clone(), txs.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    let one = std::panic::AssertUnwindSafe(workload.run(&mut client, 1));
                    if one.catch_unwind().await.is_err() {
                        eprintln!("the load's server went away; load stopped");
                        return;
                    }
                    txs.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
        });
        TolerantLoad { stop, txs, handle }
    }

    async fn wait_transactions(&self, n: u64, timeout: Duration) {
        let target = self.txs.load(Ordering::Relaxed) + n;
        wait_until(timeout, || async {
            self.txs.load(Ordering::Relaxed) >= target
        })
        .await
        .unwrap_or_else(|e| panic!("the load did not run {n} transactions: {e}"));
    }

    async fn stop(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.handle.await;
        self.txs.load(Ordering::Relaxed)
    }
}

fn table_of(entity: Entity) -> &'static str {
    match entity {
        Entity::Task => "tasks",
        Entity::Project => "projects",
        Entity::Lock => "editing_locks",
        Entity::Unspecified => "?",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn walcast_follows_a_promoted_standby_exactly_once() {
    let Some(primary) = Postgres::start_matrix(&[]) else {
        return;
    };
    let env = Env::start_on(primary, Default::default()).await;
    let old = env.pg.client().await;
    old.batch_execute(AUDIT).await.unwrap();
    old.batch_execute("SELECT pg_create_physical_replication_slot('standby1')")
        .await
        .unwrap();
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = 'standby1'",
        "SELECT pg_reload_conf()",
    ] {
        old.batch_execute(sql).await.unwrap();
    }
    let standby = env
        .pg
        .start_standby("standby1", &[])
        .expect("start the standby");
    let both = format!(
        "postgres://postgres@127.0.0.1:{},127.0.0.1:{}/postgres",
        env.pg.port(),
        standby.port()
    );
    let mut vars = env.env_vars();
    vars.retain(|(k, _)| k != "WALCAST_DATABASE_URL");
    vars.push(("WALCAST_DATABASE_URL".into(), both.clone()));

    let dir = TempDir::new("failover").unwrap();
    let mut walcast = Walcast::start("walcast", dir.path(), &vars, &[]);
    let seed = Workload::seed();
    let load = TolerantLoad::start(&env.pg.url(), seed).await;
    load.wait_transactions(50, Duration::from_secs(60)).await;

    // The standby holds a persisted, synced copy of walcast's slot. Slot
    // sync waits until walcast's slot has passed the standby's own horizon;
    // running-xacts records move it on, and a reload wakes the sync worker
    // (which naps up to 30 s after a failed attempt).
    let on_standby = standby.client().await;
    wait_until(Duration::from_secs(90), || async {
        let _ = old.batch_execute("SELECT pg_log_standby_snapshot()").await;
        let _ = on_standby.batch_execute("SELECT pg_reload_conf()").await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        on_standby
            .query_opt(
                "SELECT 1 FROM pg_replication_slots WHERE slot_name = 'walcast' AND synced AND NOT temporary AND failover",
                &[],
            )
            .await
            .map(|row| row.is_some())
            .unwrap_or(false)
    })
    .await
    .unwrap_or_else(|e| panic!("the slot was never synced to the standby: {e}\n{}", standby.log_contents()));

    // walcast check sees the failover setup from the primary and the standby.
    let out = run_bounded(&["check"], &vars, Duration::from_secs(60));
    let report = format!("{}{}", out.stdout, out.stderr);
    for line in [
        "✓ slot walcast is a failover slot",
        "✓ synchronized_standby_slots = 'standby1'",
        "sync_replication_slots = on",
        "hot_standby_feedback = on",
        "holds a synced copy of the slot",
        "primary_conninfo names a database (dbname=)",
        "physical slots [standby1 (active)]",
    ] {
        assert!(report.contains(line), "check says {line:?}:\n{report}");
    }
    assert!(!report.contains("\n! standby"), "{report}");

    // Mid-workload: the primary dies, the standby is promoted.
    load.wait_transactions(50, Duration::from_secs(60)).await;
    env.pg.kill9().expect("kill the primary");
    let before = load.stop().await;
    standby.promote().expect("promote the standby");
    drop(on_standby);
    let new = standby.client().await;
    let in_recovery: bool = new
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(!in_recovery);

    // pg_basebackup copied the old primary's synchronized_standby_slots: on
    // the new primary it names a slot that does not exist, and Postgres
    // holds walcast back. walcast check names it and the fix.
    wait_until(Duration::from_secs(30), || async {
        standby.log_contents().contains(
            "replication slot \"standby1\" specified in parameter \"synchronized_standby_slots\" does not exist",
        )
    })
    .await
    .unwrap_or_else(|e| panic!("Postgres did not hold walcast back: {e}\n{}", standby.log_contents()));
    let out = run_bounded(
        &["check"],
        &with_var(&vars, "WALCAST_DATABASE_URL", &standby.url()),
        Duration::from_secs(60),
    );
    let report = format!("{}{}", out.stdout, out.stderr);
    let mut lines = report.lines().skip_while(|l| {
        !l.starts_with(
            "! synchronized_standby_slots ('standby1') names standby1 which no physical slot",
        )
    });
    assert!(
        lines.next().is_some(),
        "check names the inherited setting:\n{report}"
    );
    let fix = lines.next().unwrap_or_default().trim().to_string();
    assert!(
        fix.starts_with(
            "fix: ALTER SYSTEM SET synchronized_standby_slots = ''; SELECT pg_reload_conf();"
        ),
        "{report}"
    );
    for sql in [
        "ALTER SYSTEM SET synchronized_standby_slots = ''",
        "SELECT pg_reload_conf()",
    ] {
        new.batch_execute(sql).await.unwrap();
    }

    // The application goes on writing to the new primary; walcast follows.
    let load = TolerantLoad::start(&standby.url(), seed ^ 1).await;
    load.wait_transactions(80, Duration::from_secs(60)).await;
    let after = load.stop().await;
    if let Err(e) = catch_up(&new, Duration::from_secs(120)).await {
        panic!(
            "walcast did not catch up on the new primary: {e}\n{}",
            walcast.log_tail(60)
        );
    }
    assert!(walcast.exited().is_none(), "{}", walcast.log_tail(60));

    // The stream against the new primary: exact, every committed change
    // once, nothing the new primary does not have.
    let events = read_stream(&env.nats.url(), "WALCAST").await;
    let seqs = assert_stream_exact(&events);
    let audit = audited(&new).await;
    let mut streamed: BTreeMap<u64, Vec<Change>> = BTreeMap::new();
    for m in &events {
        let e = &m.event;
        let changes = streamed.entry(e.xid).or_default();
        assert_eq!(e.tx_index as usize, changes.len(), "{}", e.event_id);
        changes.push((
            table_of(e.entity()).to_string(),
            Op::of_action(e.action()).expect("a row event"),
            e.entity_id.clone(),
            e.tenant_id.clone(),
        ));
    }
    let lost: Vec<&u64> = audit.keys().filter(|x| !streamed.contains_key(x)).collect();
    let extra: Vec<&u64> = streamed.keys().filter(|x| !audit.contains_key(x)).collect();
    assert!(
        lost.is_empty() && extra.is_empty(),
        "transactions committed but not streamed: {lost:?}; streamed but not in the new primary: {extra:?}\n{}",
        walcast.log_tail(60)
    );
    for (xid, changes) in &audit {
        assert_eq!(&streamed[xid], changes, "transaction {xid}");
    }
    assert_replays_to_tables(&events, &new).await;
    let log = walcast.log();
    assert!(
        !log.contains("invalidated") && !log.contains("is gone"),
        "{log}"
    );
    eprintln!(
        "[failover] {} events in {} transactions ({before} load transactions before the failover, {after} after), seqs {seqs:?}",
        events.len(),
        audit.len()
    );
    walcast.stop(Duration::from_secs(20)).await;
}
