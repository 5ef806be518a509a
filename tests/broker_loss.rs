//! SPEC §4.7: a broker that loses messages it had acknowledged.
//! The NATS store directory is rolled back to a copy taken seconds earlier
//! (stop, restore, start): what an OS crash before fsync does.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::support::chaos::{
    Load, Walcast, slot_lag, stream_last_seq_or_zero, stream_state, verify,
};
use crate::support::daemon::Env;
use crate::support::oracle::Oracle;
use crate::support::{TempDir, wait_until};

fn copy_dir(from: &Path, to: &Path) {
    let _ = std::fs::remove_dir_all(to);
    let status = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .expect("cp -a");
    assert!(
        status.success(),
        "copy {} to {}",
        from.display(),
        to.display()
    );
}

/// Stops NATS, copies its store, starts it again; returns the stream's last seq.
pub(crate) async fn snapshot(env: &Env, to: &Path) -> u64 {
    env.nats.stop().unwrap();
    copy_dir(&env.nats.store_dir(), to);
    env.nats.start_again().unwrap();
    stream_state(&env.nats.url()).await.0
}

/// Stops NATS and puts the snapshot back in place of its store.
pub(crate) fn restore(env: &Env, from: &Path) {
    env.nats.stop().unwrap();
    copy_dir(from, &env.nats.store_dir());
}

/// walcast (`--confirm-delay 30s`) streaming a load, a copy of the broker's
/// store taken, and more than 100 events acknowledged since: what a broker
/// rolled back to the copy (returned) loses. Returns the stream's last seq
/// at the copy.
async fn run_past_a_snapshot(env: &Env, dir: &Path) -> (Walcast, Load, u64, PathBuf) {
    let saved = dir.join("store-copy");
    let walcast = Walcast::start(
        "first",
        dir,
        &env.env_vars(),
        &[("WALCAST_CONFIRM_DELAY", "30s")],
    );
    let load = Load::start(env, 5, Duration::from_millis(5)).await;
    load.wait_transactions(150, Duration::from_secs(60)).await;
    let at_snapshot = snapshot(env, &saved).await;
    let url = env.nats.url();
    wait_until(Duration::from_secs(60), || {
        let url = url.clone();
        async move { stream_state(&url).await.0 > at_snapshot + 100 }
    })
    .await
    .expect("events acknowledged after the snapshot");
    (walcast, load, at_snapshot, saved)
}

/// Waits until the checkpoint's recorded acknowledged high is past `seq`.
pub(crate) async fn wait_acked_high_past(client: &tokio_postgres::Client, seq: u64) {
    wait_until(Duration::from_secs(30), || async move {
        let row = client
            .query_one("SELECT acked_seq FROM walcast.checkpoints", &[])
            .await
            .unwrap();
        row.get::<_, i64>(0) as u64 > seq
    })
    .await
    .expect("the acknowledged high is recorded");
}

/// Waits until the stream holds one message per committed change.
pub(crate) async fn wait_complete(
    env: &Env,
    oracle: &Oracle,
    client: &tokio_postgres::Client,
    walcast: &Walcast,
) {
    let want = oracle.changes(client).await.len() as u64;
    let url = env.nats.url();
    wait_until(Duration::from_secs(120), || {
        let url = url.clone();
        // Under load walcast may not have created the stream yet.
        async move { stream_last_seq_or_zero(&url).await >= want }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "stream never got all {want} events: {e}\n{}",
            walcast.log_tail(40)
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_broker_is_repaired_from_the_slot() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("broker-loss").unwrap();
    let (mut walcast, load, at_snapshot, saved) = run_past_a_snapshot(&env, dir.path()).await;
    restore(&env, &saved);
    env.nats.start_again().unwrap();
    assert!(
        stream_state(&env.nats.url()).await.0 <= at_snapshot,
        "the broker lost acknowledged messages"
    );

    load.wait_transactions(100, Duration::from_secs(60)).await;
    let stats = load.stop().await;
    wait_complete(&env, &oracle, &client, &walcast).await;
    walcast.stop(Duration::from_secs(10)).await;
    let checked = verify("broker rollback", &env, &client, &oracle).await;
    let warns = walcast.warn_lines().join("\n");
    assert!(
        warns.contains("republished events the broker had lost"),
        "WARN with the range:\n{warns}"
    );
    assert!(
        warns.contains("stream_seqs=") && warns.contains("tenants="),
        "{warns}"
    );
    eprintln!("[broker rollback] {checked} events exact after losing the tail; {stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_broker_and_kill9_while_it_is_down() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("broker-loss-kill").unwrap();
    let (mut walcast, load, at_snapshot, saved) = run_past_a_snapshot(&env, dir.path()).await;
    // The acknowledged high is recorded about once a second: wait until it
    // covers what the restored broker is about to lose.
    let client = env.pg.client().await;
    wait_acked_high_past(&client, at_snapshot + 100).await;
    restore(&env, &saved);
    walcast.kill9().await; // while NATS is down
    env.nats.start_again().unwrap();
    let mut walcast = Walcast::start(
        "second",
        dir.path(),
        &env.env_vars(),
        &[("WALCAST_CONFIRM_DELAY", "30s")],
    );
    load.wait_transactions(100, Duration::from_secs(60)).await;
    load.stop().await;
    wait_complete(&env, &oracle, &client, &walcast).await;
    walcast.stop(Duration::from_secs(10)).await;
    let checked = verify("broker rollback + kill -9", &env, &client, &oracle).await;
    let warns = walcast.warn_lines().join("\n");
    assert!(
        warns.contains("the broker lost messages it had acknowledged"),
        "WARN with the range:\n{warns}"
    );
    assert!(
        warns.contains("lost_from=") && warns.contains("lost_to="),
        "{warns}"
    );
    eprintln!("[broker rollback + kill -9] {checked} events exact");
}

/// With --confirm-delay 0 the slot no longer holds what the broker lost:
/// walcast must stop with an error naming the range and publish nothing after the gap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrecoverable_loss_stops_with_the_range() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("broker-loss-fatal").unwrap();
    let saved = dir.path().join("store-copy");
    let mut walcast = Walcast::start(
        "walcast",
        dir.path(),
        &env.env_vars(),
        &[("WALCAST_CONFIRM_DELAY", "0")],
    );
    let load = Load::start(&env, 3, Duration::from_millis(5)).await;
    load.wait_transactions(50, Duration::from_secs(60)).await;
    let at_snapshot = snapshot(&env, &saved).await;
    load.wait_transactions(100, Duration::from_secs(60)).await;
    let checkpointed = crate::support::chaos::checkpoint_stream_seq(&client).await;
    let url = env.nats.url();
    wait_until(Duration::from_secs(60), || async {
        crate::support::chaos::checkpoint_stream_seq(&client).await > at_snapshot + 20
    })
    .await
    .unwrap_or_else(|_| {
        panic!("checkpoint never passed the snapshot ({checkpointed} vs {at_snapshot})")
    });
    restore(&env, &saved);
    env.nats.start_again().unwrap();
    let restored = stream_state(&url).await.0;
    assert!(restored <= at_snapshot);
    let status = walcast.wait(Duration::from_secs(90)).await;
    load.stop().await;
    assert_ne!(status.code(), Some(0), "walcast must stop with an error");
    let log = walcast.log();
    assert!(
        log.contains("the broker lost messages"),
        "error names the loss:\n{}",
        walcast.log_tail(20)
    );
    assert!(
        log.contains(&format!("ends at message {restored} "))
            && log.contains(&format!("lost messages {}..=", restored + 1)),
        "error names the range:\n{}",
        walcast.log_tail(20)
    );
    assert_eq!(
        stream_state(&url).await.0,
        restored,
        "nothing is published after the gap"
    );
}

/// With a confirm delay, idle WAL (writes to another table) is retained for
/// about the delay and released once it has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_wal_is_released_after_the_confirm_delay() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let dir = TempDir::new("idle-delay").unwrap();
    let mut walcast = Walcast::start(
        "walcast",
        dir.path(),
        &env.env_vars(),
        &[("WALCAST_CONFIRM_DELAY", "8s")],
    );
    client
        .batch_execute("CREATE TABLE other (id serial, pad text)")
        .await
        .unwrap();
    // ~24 MB over ~6 s: the retained WAL grows while the delay holds it...
    let mut peak = 0;
    for _ in 0..12 {
        client
            .execute(
                "INSERT INTO other (pad) SELECT repeat('x', 1800) FROM generate_series(1, 1000)",
                &[],
            )
            .await
            .unwrap();
        peak = peak.max(slot_lag(&client).await);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(
        peak > 8_000_000,
        "the delay holds recent WAL back (peak {peak} bytes)"
    );
    // ...and is released once the delay has passed.
    wait_until(Duration::from_secs(40), || async {
        slot_lag(&client).await < 4_000_000
    })
    .await
    .unwrap_or_else(|_| {
        panic!(
            "retained WAL not released: {} bytes\n{}",
            0,
            walcast.log_tail(20)
        )
    });
    walcast.stop(Duration::from_secs(10)).await;
}

/// The tenant and seq the message at stream sequence `seq` carries (`None`
/// for a dead letter), read before it is deleted.
async fn tenant_seq_at(
    stream: &async_nats::jetstream::stream::Stream,
    seq: u64,
) -> Option<(String, u64)> {
    let msg = stream.get_raw_message(seq).await.expect("read a message");
    let tenant = msg.headers.get("Walcast-Tenant")?.as_str().to_string();
    let s = msg.headers.get("Walcast-Seq")?.as_str().parse().ok()?;
    Some((tenant, s))
}

/// `len` consecutive stream positions, from `from` on, whose events all
/// have an older event of their tenant before them (seq > 1): deleting
/// them makes a gap inside tenants' events, which stops walcast, not a
/// trim of a tenant's oldest events (which does not: `pipeline::retention`).
async fn inside_tenants(nats_url: &str, from: u64, len: u64) -> (u64, u64) {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let stream = js.get_stream("WALCAST").await.unwrap();
    let mut start = from;
    let mut seq = from;
    while seq < start + len {
        match tenant_seq_at(&stream, seq).await {
            Some((_, s)) if s > 1 => seq += 1,
            _ => {
                seq += 1;
                start = seq;
            }
        }
    }
    (start, start + len - 1)
}

/// Like [`tenant_seq_at`], `None` also for a message deleted or purged.
async fn present_tenant_seq(
    stream: &async_nats::jetstream::stream::Stream,
    seq: u64,
) -> Option<(String, u64)> {
    stream.get_raw_message(seq).await.ok()?;
    tenant_seq_at(stream, seq).await
}

/// The first position in `positions` holding a tenant event whose tenant
/// and seq satisfy `wanted`: (position, tenant, seq).
async fn first_present(
    stream: &async_nats::jetstream::stream::Stream,
    positions: std::ops::RangeInclusive<u64>,
    wanted: impl Fn(&str, u64) -> bool,
) -> Option<(u64, String, u64)> {
    for at in positions {
        if let Some((t, s)) = present_tenant_seq(stream, at).await
            && wanted(&t, s)
        {
            return Some((at, t, s));
        }
    }
    None
}

/// Runs a small workload through `walcast` until the stream holds every
/// change; returns the stream's last sequence.
async fn publish_workload(
    env: &Env,
    oracle: &Oracle,
    client: &tokio_postgres::Client,
    walcast: &Walcast,
) -> u64 {
    let load = Load::start(env, 3, Duration::from_millis(2)).await;
    load.wait_transactions(40, Duration::from_secs(60)).await;
    load.stop().await;
    wait_complete(env, oracle, client, walcast).await;
    stream_state(&env.nats.url()).await.0
}

/// Deletes stream messages `from..=to` (`$JS.API.STREAM.MSG.DELETE`) and
/// returns what the lost events were, as walcast names them: `tenant T seq
/// A..=B` per tenant (sorted), then the dead letters.
async fn delete_middle(nats_url: &str, from: u64, to: u64) -> String {
    delete_middle_events(nats_url, from, to).await.0
}

/// Like [`delete_middle`], also returning each lost tenant's first lost seq.
async fn delete_middle_events(nats_url: &str, from: u64, to: u64) -> (String, Vec<(String, u64)>) {
    let js = async_nats::jetstream::new(async_nats::connect(nats_url).await.unwrap());
    let stream = js.get_stream("WALCAST").await.unwrap();
    let mut tenants: std::collections::BTreeMap<String, (u64, u64)> = Default::default();
    let mut dead = 0;
    for seq in from..=to {
        match tenant_seq_at(&stream, seq).await {
            Some((t, s)) => {
                let e = tenants.entry(t).or_insert((s, s));
                e.0 = e.0.min(s);
                e.1 = e.1.max(s);
            }
            None => dead += 1,
        }
        assert!(stream.delete_message(seq).await.expect("delete a message"));
    }
    let mut parts: Vec<String> = tenants
        .iter()
        .map(|(t, (a, b))| format!("tenant {t} seq {a}..={b}"))
        .collect();
    if dead > 0 {
        parts.push(format!("{dead} dead letters"));
    }
    let info = js
        .get_stream("WALCAST")
        .await
        .unwrap()
        .cached_info()
        .clone();
    assert_eq!(
        info.state.deleted_count,
        Some(to - from + 1),
        "JetStream counts the hole"
    );
    let firsts = tenants.iter().map(|(t, (a, _))| (t.clone(), *a)).collect();
    (parts.join(", "), firsts)
}

/// The catch-up service's error code for `tenant` after `after_seq`, once
/// it answers (it says "unavailable" until the restarted run has replayed
/// what the stream holds).
async fn catch_up_code(nats_url: &str, tenant: &str, after_seq: u64) -> Option<String> {
    let client = async_nats::connect(nats_url).await.unwrap();
    let body = format!(r#"{{"tenant_id":"{tenant}","after_seq":{after_seq}}}"#);
    let mut last = None;
    for _ in 0..300 {
        if let Ok(reply) = client
            .request("walcast-api.v1.catchup", body.clone().into())
            .await
        {
            last = Some(
                reply
                    .headers
                    .as_ref()
                    .and_then(|h| h.get("Nats-Service-Error-Code"))
                    .map(|v| v.to_string()),
            );
            if last != Some(Some("503".to_string())) {
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    last.expect("the catch-up service answers")
}

/// Issue 19 item 4, within the repair window: messages deleted from the
/// middle of the stream while the slot still holds them (confirm delay
/// 10m). JetStream cannot take them back in place, so the restarted walcast
/// stops with an error naming the stream range and each lost event's tenant
/// and seq, and publishes nothing past the hole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_hole_within_the_window_stops_naming_tenants_and_seqs() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("middle-hole").unwrap();
    let delay = [("WALCAST_CONFIRM_DELAY", "10m")];
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &delay);
    let last = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(last >= 20, "a workload of {last} events");
    walcast.stop(Duration::from_secs(10)).await;
    assert!(
        crate::support::chaos::checkpoint_stream_seq(&client).await < last / 2,
        "the hole is past the checkpoint (within the window)"
    );
    let (from, to) = inside_tenants(&env.nats.url(), last / 2, 3).await;
    let lost = delete_middle(&env.nats.url(), from, to).await;

    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &delay);
    let status = walcast.wait(Duration::from_secs(90)).await;
    assert_ne!(status.code(), Some(0), "walcast must stop with an error");
    let log = walcast.log();
    assert!(
        log.contains(&format!("missing messages {from}..={to} from its middle"))
            && log.contains(&format!("3 events, {lost} (commit LSNs ")),
        "the error names the range and every lost event ({lost}):\n{}",
        walcast.log_tail(20)
    );
    assert!(
        log.contains(&format!("--accept-holes-through {to}")),
        "the error says how to go on:\n{}",
        walcast.log_tail(20)
    );
    assert_eq!(
        stream_state(&env.nats.url()).await.0,
        last,
        "nothing is published past the hole"
    );
    eprintln!("[middle hole, within the window] {}", walcast.log_tail(1));

    // Accepted by the operator, walcast goes on (ERROR, gauge) and
    // publishes new changes after the hole.
    let accept = to.to_string();
    let http = env
        .env_vars()
        .into_iter()
        .find(|(k, _)| k == "WALCAST_HTTP_ADDR")
        .unwrap()
        .1;
    let mut vars = env.env_vars();
    vars.retain(|(k, _)| k != "WALCAST_HTTP_ADDR");
    vars.push(("WALCAST_HTTP_ADDR".into(), http.clone()));
    let mut walcast = Walcast::start(
        "accepted",
        dir.path(),
        &vars,
        &[
            ("WALCAST_CONFIRM_DELAY", "10m"),
            ("WALCAST_ACCEPT_HOLES_THROUGH", &accept),
        ],
    );
    walcast
        .wait_log(
            "--accept-holes-through accepts them",
            Duration::from_secs(60),
        )
        .await;
    assert!(walcast.log().contains(&lost), "{}", walcast.log_tail(20));
    let missing = crate::support::edge::wait_metric(
        &http,
        "walcast_stream_missing_messages",
        3.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(missing, Some(3.0), "the gauge counts the hole");
    let more = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(more > last, "new changes are published after the hole");
    walcast.stop(Duration::from_secs(10)).await;
}

/// Issue 19 item 4, beyond the repair window: messages deleted from the
/// middle of the stream after the checkpoint passed them (confirm delay 0:
/// the slot no longer holds them). The restarted walcast logs an ERROR
/// naming the range and its neighbouring events, sets the gauge, and goes
/// on publishing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_hole_beyond_the_window_is_reported_and_walcast_goes_on() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("middle-hole-beyond").unwrap();
    let vars = env.env_vars();
    let http = vars
        .iter()
        .find(|(k, _)| k == "WALCAST_HTTP_ADDR")
        .unwrap()
        .1
        .clone();
    let mut walcast = Walcast::start("first", dir.path(), &vars, &[]);
    let last = publish_workload(&env, &oracle, &client, &walcast).await;
    wait_until(Duration::from_secs(30), || async {
        crate::support::chaos::checkpoint_stream_seq(&client).await >= last
    })
    .await
    .expect("the checkpoint covers the whole stream");
    walcast.stop(Duration::from_secs(10)).await;
    let (from, to) = (last / 2, last / 2 + 1);
    let (_, lost) = delete_middle_events(&env.nats.url(), from, to).await;
    // `walcast check` sees the hole too and, on a server older than v2.14.6,
    // names the version `--confirm-delay 0` needs.
    let check = crate::support::edge::run_bounded(&["check"], &vars, Duration::from_secs(60));
    let (server, release) = env.nats.version().await;
    let warned = check
        .stdout
        .contains("! --confirm-delay 0 with NATS server 2.")
        && check.stdout.contains("v2.14.6 or newer");
    assert!(
        check
            .stdout
            .contains("! stream WALCAST misses 2 messages from its middle")
            && warned == (release.as_slice() < [2, 14, 6].as_slice()),
        "server {server}:\n{}{}",
        check.stdout,
        check.stderr
    );

    let mut walcast = Walcast::start("second", dir.path(), &vars, &[]);
    walcast
        .wait_log(
            "missing from the middle of the stream",
            Duration::from_secs(60),
        )
        .await;
    let error = walcast
        .log()
        .lines()
        .find(|l| l.contains(" ERROR ") && l.contains("missing from the middle"))
        .map(str::to_string)
        .unwrap_or_else(|| panic!("an ERROR line:\n{}", walcast.log_tail(20)));
    assert!(
        error.contains(&format!("missing={from}..={to}"))
            && error.contains("messages=2")
            && error.contains("before=event ")
            && error.contains("after=event "),
        "the ERROR names the range and its neighbours: {error}"
    );
    eprintln!("[middle hole, beyond the window] {error}");
    let missing = crate::support::edge::wait_metric(
        &http,
        "walcast_stream_missing_messages",
        2.0,
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(missing, Some(2.0), "the gauge counts the hole");
    // A consumer that asks to catch up across the hole is told to re-sync,
    // never handed a start that skips the lost event.
    assert!(!lost.is_empty(), "the workload has no dead letters");
    for (tenant, seq) in &lost {
        let code = catch_up_code(&env.nats.url(), tenant, seq - 1).await;
        assert_eq!(
            code.as_deref(),
            Some("410"),
            "too_old for {tenant} after {}",
            seq - 1
        );
    }
    let more = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(more > last, "walcast goes on publishing");
    walcast.stop(Duration::from_secs(10)).await;
}

/// A hole made while walcast runs is found at the next NATS reconnection:
/// the run restarts, replays the slot, names the lost events and stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_hole_is_found_on_reconnect() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("middle-hole-reconnect").unwrap();
    // No state bucket: its service would restart the run on the dropped
    // connection by itself; here the reconnection check must.
    let mut walcast = Walcast::start(
        "walcast",
        dir.path(),
        &env.env_vars(),
        &[
            ("WALCAST_CONFIRM_DELAY", "10m"),
            ("WALCAST_STATE_BUCKET", ""),
        ],
    );
    let last = publish_workload(&env, &oracle, &client, &walcast).await;
    let (from, to) = inside_tenants(&env.nats.url(), last / 2, 2).await;
    let lost = delete_middle(&env.nats.url(), from, to).await;
    assert!(
        walcast.exited().is_none(),
        "nothing noticed before a reconnect"
    );
    env.nats.stop().unwrap();
    env.nats.start_again().unwrap();
    let status = walcast.wait(Duration::from_secs(90)).await;
    assert_ne!(status.code(), Some(0), "walcast must stop with an error");
    let log = walcast.log();
    assert!(
        log.contains(&format!("missing messages {from}..={to} from its middle"))
            && log.contains(&format!("2 events, {lost} (commit LSNs ")),
        "the error names the range and every lost event ({lost}):\n{}",
        walcast.log_tail(20)
    );
    let retries = walcast.retry_lines();
    assert!(
        retries
            .iter()
            .any(|l| l.contains("now misses 2 messages from its middle")),
        "the reconnection check restarts the run: {retries:#?}"
    );
    assert_eq!(
        stream_state(&env.nats.url()).await.0,
        last,
        "nothing is published past the hole"
    );
}

/// A hole made while walcast runs and stays connected is found within
/// seconds (a stream info request every 10 s), while the slot still holds
/// it: walcast stops naming the lost events.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn middle_hole_made_while_connected_is_found_within_seconds() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("middle-hole-connected").unwrap();
    let mut walcast = Walcast::start(
        "walcast",
        dir.path(),
        &env.env_vars(),
        &[("WALCAST_CONFIRM_DELAY", "10m")],
    );
    let last = publish_workload(&env, &oracle, &client, &walcast).await;
    let (from, to) = inside_tenants(&env.nats.url(), last / 3, 1).await;
    let lost = delete_middle(&env.nats.url(), from, to).await;
    let status = walcast.wait(Duration::from_secs(60)).await;
    assert_ne!(status.code(), Some(0), "walcast must stop with an error");
    let log = walcast.log();
    assert!(
        log.contains("now misses 1 messages from its middle")
            && log.contains(&format!("missing messages {from}..={to} from its middle"))
            && log.contains(&format!("1 events, {lost} (commit LSNs ")),
        "found while connected, the error names the lost event ({lost}):\n{}",
        walcast.log_tail(20)
    );
    assert_eq!(stream_state(&env.nats.url()).await.0, last);
}

/// A hole made while walcast runs, before the checkpoint (a purge of old
/// events, say): an ERROR and the gauge, and the run goes on undisturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_hole_made_while_connected_is_reported_without_a_restart() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("old-hole-connected").unwrap();
    let vars = env.env_vars();
    let http = vars
        .iter()
        .find(|(k, _)| k == "WALCAST_HTTP_ADDR")
        .unwrap()
        .1
        .clone();
    let walcast = Walcast::start("walcast", dir.path(), &vars, &[]);
    let last = publish_workload(&env, &oracle, &client, &walcast).await;
    wait_until(Duration::from_secs(30), || async {
        crate::support::chaos::checkpoint_stream_seq(&client).await >= last
    })
    .await
    .expect("the checkpoint covers the whole stream");
    let (from, to) = (last / 2, last / 2 + 2);
    delete_middle(&env.nats.url(), from, to).await;
    walcast
        .wait_log("went missing from the middle", Duration::from_secs(30))
        .await;
    let error = walcast
        .log()
        .lines()
        .find(|l| l.contains(" ERROR ") && l.contains("went missing from the middle"))
        .map(str::to_string)
        .unwrap();
    assert!(error.contains(&format!("missing={from}..={to}")), "{error}");
    let missing = crate::support::edge::wait_metric(
        &http,
        "walcast_stream_missing_messages",
        3.0,
        Duration::from_secs(10),
    )
    .await;
    assert_eq!(missing, Some(3.0), "the gauge counts the hole");
    let more = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(more > last, "walcast goes on publishing");
    assert!(
        walcast.retry_lines().is_empty(),
        "no restart: {:#?}",
        walcast.retry_lines()
    );
}

/// SPEC §7's `too_old`, made the way an operator (or a test) makes it: a
/// purge by subject of one tenant's oldest events, while walcast runs and
/// the slot still holds them (confirm delay 10m). The holes it leaves took
/// only that tenant's oldest events, as the stream's limits would: walcast
/// goes on (a WARN, no stop, also after a restart), catch-up answers
/// `too_old` with the tenant's oldest seq left, and new changes flow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn purging_a_tenants_oldest_events_is_not_a_loss() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("purge-oldest").unwrap();
    let delay = [("WALCAST_CONFIRM_DELAY", "10m")];
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &delay);
    let last = publish_workload(&env, &oracle, &client, &walcast).await;

    let js = async_nats::jetstream::new(async_nats::connect(env.nats.url()).await.unwrap());
    let stream = js.get_stream("WALCAST").await.unwrap();
    // The first tenant event from the stream's middle on that has older
    // events of its tenant (the random workload may put a tenant's first
    // event there), trimmed to its events from there on.
    let (trim_at, tenant, _) = first_present(&stream, last / 2..=last, |_, s| s > 1)
        .await
        .expect("a tenant event with older ones, mid-stream");
    stream
        .purge()
        .filter(format!("walcast.{tenant}.>"))
        .sequence(trim_at)
        .await
        .expect("purge the tenant's oldest events");

    walcast
        .wait_log(
            "each tenant lost only its oldest events",
            Duration::from_secs(60),
        )
        .await;
    let more = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(more > last, "new changes are published after the purge");
    assert!(walcast.exited().is_none(), "{}", walcast.log_tail(20));
    let code = catch_up_code(&env.nats.url(), &tenant, 0).await;
    assert_eq!(code.as_deref(), Some("410"), "too_old for {tenant} after 0");
    walcast.stop(Duration::from_secs(10)).await;

    // A new process judges the holes again (the slot still holds them).
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &delay);
    walcast
        .wait_log(
            "each tenant lost only its oldest events",
            Duration::from_secs(60),
        )
        .await;
    let again = publish_workload(&env, &oracle, &client, &walcast).await;
    assert!(again > more, "and goes on: {}", walcast.log_tail(20));

    // Only those holes: a later one, below the trim's last position, inside
    // another tenant's events, stops walcast.
    let (at, other, seq) = first_present(&stream, 2..=trim_at - 1, |t, s| t != tenant && s > 1)
        .await
        .expect("another tenant's event below the trim");
    stream.delete_message(at).await.expect("delete it");
    let status = walcast.wait(Duration::from_secs(60)).await;
    assert_ne!(
        status.code(),
        Some(0),
        "walcast must stop: {}",
        walcast.log_tail(20)
    );
    // The new hole may merge with a trimmed one next to it: the error names
    // the lost event by its tenant and seq.
    assert!(
        walcast.log().contains("from its middle")
            && walcast
                .log()
                .contains(&format!("tenant {other} seq {seq}..={seq}")),
        "the error names the new hole at {at} ({other} seq {seq}):\n{}",
        walcast.log_tail(20)
    );
}
