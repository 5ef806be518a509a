//! SIGTERM whatever walcast is doing (SPEC §5: "stop reading, flush
//! in-flight publishes, checkpoint, confirm, exit 0 within a few seconds"):
//! while NATS is away with publishes in flight (the drain cannot finish: the
//! stop must not be forgotten and the run not retried), and while walcast
//! still waits for NATS at startup (the signal is handled, and `/healthz`
//! answers meanwhile).

use std::time::{Duration, Instant};

use tokio::task::block_in_place;
use tokio_postgres::Client;

use crate::support::chaos::{Walcast, catch_up};
use crate::support::checks::assert_stream_exact;
use crate::support::daemon::Env;
use crate::support::edge::{http_get, start_walcast};
use crate::support::workload::insert_tasks;
use crate::support::{TempDir, free_port, wait_for, wait_until};

/// SPEC §5's "within a few seconds", with room for a slow machine; a drain
/// that waited out the 10 s ack timeout (or a retried run) exceeds it.
const EXIT_BOUND: Duration = Duration::from_secs(9);

/// NATS goes away while walcast replicates; two transactions are read and
/// published (never acknowledged) before the SIGTERM. The drain cannot
/// finish, yet walcast exits 0 within a few seconds, saying what it did
/// not flush, and starts no run after the stop — it used to wait out the
/// 10 s ack timeout, then log a retry. Nothing is lost: with NATS back, the
/// next start publishes both transactions, once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_nats_is_down_exits_0_promptly_and_loses_nothing() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("sigterm-nats-down").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "first", &[]);
    insert_tasks(&client, "before", 2, 0, 3).await;
    catch_up(&client, Duration::from_secs(60)).await.unwrap();

    block_in_place(|| env.nats.stop()).expect("stop nats");
    for (i, label) in ["outage a", "outage b"].into_iter().enumerate() {
        insert_tasks(&client, label, 2, 10 * (i as i64 + 1), 2).await;
        wait_until_sent(&client, &walcast).await;
    }
    walcast.signal("TERM");
    let signalled = Instant::now();
    exits_0_within(&mut walcast, EXIT_BOUND).await;
    assert!(
        walcast.log().contains("stopped without the final flush"),
        "a WARN says what was not flushed:\n{}",
        walcast.log_tail(40)
    );
    assert!(
        walcast.retry_lines().is_empty(),
        "no run after the stop:\n{}",
        walcast.log_tail(40)
    );
    eprintln!("exited {:?} after SIGTERM", signalled.elapsed());

    block_in_place(|| env.nats.start_again()).expect("start nats");
    let (mut second, _addr) = start_walcast(&env, dir.path(), "second", &[]);
    env.wait_for_messages(7, Duration::from_secs(60)).await;
    catch_up(&client, Duration::from_secs(60)).await.unwrap();
    second.stop(Duration::from_secs(15)).await;
    let events = env.stream_events().await;
    assert_eq!(events.len(), 7, "every change exactly once");
    assert_stream_exact(&events);
}

/// A run that waits on NATS while it prepares is left at once on SIGTERM:
/// here the run after an ack timeout (NATS is down) looks the stream up,
/// which waits up to 15 s for an answer (a leader election looks the same).
/// walcast exits 0 within a few seconds — it used to finish the lookup
/// first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_a_run_waits_for_the_stream_exits_0_at_once() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("sigterm-preparing").unwrap();
    let (mut walcast, _addr) = start_walcast(&env, dir.path(), "walcast", &[]);
    insert_tasks(&client, "before", 2, 0, 1).await;
    catch_up(&client, Duration::from_secs(60)).await.unwrap();

    block_in_place(|| env.nats.stop()).expect("stop nats");
    insert_tasks(&client, "outage", 2, 10, 1).await;
    // The publish is never acknowledged: after the 10 s ack timeout the
    // run fails, and the next one waits for the stream.
    let waiting = wait_until(Duration::from_secs(40), || async {
        walcast
            .log()
            .split_once("restarting from the checkpoint")
            .is_some_and(|(_, after)| after.contains("stream has no leader"))
    })
    .await;
    if let Err(e) = waiting {
        panic!(
            "no run waited for the stream: {e}\n{}",
            walcast.log_tail(40)
        );
    }
    walcast.signal("TERM");
    exits_0_within(&mut walcast, Duration::from_secs(4)).await;
    assert!(
        walcast.log().contains("stopped before replicating"),
        "{}",
        walcast.log_tail(40)
    );
}

/// Waits until Postgres has sent walcast everything written so far (its
/// walsender's `sent_lsn`): walcast has the transaction, and publishes it.
/// The process exits with 0 within `bound` of a signal.
async fn exits_0_within(walcast: &mut Walcast, bound: Duration) {
    let status = walcast.wait(bound).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0 after SIGTERM ({status})\n{}",
        walcast.log_tail(40)
    );
}

async fn wait_until_sent(client: &Client, walcast: &Walcast) {
    let target: String = client
        .query_one("SELECT pg_current_wal_flush_lsn()::text", &[])
        .await
        .unwrap()
        .get(0);
    let sent = wait_until(Duration::from_secs(30), || async {
        client
            .query_one(
                "SELECT coalesce(bool_or(r.sent_lsn >= $1::text::pg_lsn), false)
                 FROM pg_stat_replication r JOIN pg_replication_slots s ON s.active_pid = r.pid
                 WHERE s.slot_name = 'walcast'",
                &[&target],
            )
            .await
            .is_ok_and(|row| row.get::<_, bool>(0))
    })
    .await;
    if let Err(e) = sent {
        panic!(
            "walcast never received the WAL through {target}: {e}\n{}",
            walcast.log_tail(40)
        );
    }
}

/// NATS unreachable at startup: while walcast waits for it (up to the 30 s
/// startup timeout), `/healthz` answers 200 and `/readyz` 503, and a
/// SIGTERM stops it with exit 0 at once — it used to serve nothing until
/// NATS answered, and die by the signal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_while_waiting_for_nats_exits_0_and_healthz_answers_meanwhile() {
    let dir = TempDir::new("sigterm-no-nats").unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let vars = [
        (
            "WALCAST_DATABASE_URL".to_string(),
            format!("postgres://walcast@127.0.0.1:{}/walcast", free_port()),
        ),
        (
            "WALCAST_NATS_URL".to_string(),
            format!("nats://127.0.0.1:{}", free_port()),
        ),
        ("WALCAST_HTTP_ADDR".to_string(), addr.clone()),
    ];
    let mut walcast = Walcast::start("waiting", dir.path(), &vars, &[]);
    let healthz = wait_for(Duration::from_secs(10), || async {
        http_get(&addr, "/healthz").await
    })
    .await;
    let healthz = healthz.unwrap_or_else(|e| {
        panic!(
            "/healthz never answered while NATS was waited for: {e}\n{}",
            walcast.log_tail(30)
        )
    });
    assert_eq!(healthz.0, 200, "/healthz: {healthz:?}");
    let readyz = http_get(&addr, "/readyz").await.expect("/readyz answers");
    assert_eq!(readyz.0, 503, "not ready without NATS: {readyz:?}");
    assert!(
        walcast.exited().is_none(),
        "still waiting for NATS:\n{}",
        walcast.log_tail(30)
    );

    walcast.signal("TERM");
    exits_0_within(&mut walcast, Duration::from_secs(5)).await;
    assert!(
        walcast.log().contains("stopped while waiting for NATS"),
        "{}",
        walcast.log_tail(30)
    );
    // The address is free again at once: a restart can bind it.
    wait_until(Duration::from_secs(5), || async {
        std::net::TcpListener::bind(&addr).is_ok()
    })
    .await
    .expect("the HTTP address is released");
}
