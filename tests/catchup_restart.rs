//! SPEC §6 "Restart": the catch-up index's exact positions are saved as
//! segments in `walcast.catchup_segments` and loaded by the next start, which
//! reads back from the stream only what no segment covers; a segment that
//! disagrees with the stream is never used, and without the table walcast
//! runs as before (reading the stream back).

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;

use crate::broker_loss::{restore, snapshot, wait_acked_high_past, wait_complete};
use crate::catchup::{ask, replays_from};
use crate::support::chaos::{Load, Walcast, field};
use crate::support::daemon::{Env, StreamEvent};
use crate::support::oracle::Oracle;
use crate::support::workload::Workload;
use crate::support::{TempDir, wait_until};

const LOADED: &str = "catch-up index loaded from saved segments";
const REBUILT: &str = "catch-up index rebuilt from the stream";

/// Each tenant's last seq in the stream.
fn last_seqs(events: &[StreamEvent]) -> HashMap<String, u64> {
    let mut last = HashMap::new();
    for m in events {
        last.insert(m.event.tenant_id.clone(), m.event.seq);
    }
    last
}

/// Asks for every tenant after every 5th seq (and the last but one) and
/// checks that a consumer built from each answer delivers exactly the
/// tenant's next events.
async fn answers_are_exact(env: &Env) -> usize {
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let events = env.stream_events().await;
    let mut checked = 0;
    for (tenant, &n) in &last_seqs(&events) {
        for after in (0..n).step_by(5).chain([n - 1]) {
            replays_from(&nats, &js, tenant, after, n, 3).await;
            checked += 1;
        }
    }
    assert!(checked > 50, "{checked} answers checked");
    checked
}

async fn saved_positions(client: &tokio_postgres::Client) -> (i64, i64) {
    let row = client
        .query_one(
            "SELECT count(*), coalesce(sum(positions), 0)::bigint FROM walcast.catchup_segments",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_loads_saved_positions_and_reads_back_only_the_tail() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let dir = TempDir::new("catchup-saved").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 4);
    workload.run(&mut client, 400).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    // Idle past a cut, then more: at least two segments.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    workload.run(&mut client, 200).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;

    // A clean stop saved every position.
    let events = env.stream_events().await;
    let (segments, positions) = saved_positions(&client).await;
    assert!(segments >= 2, "{segments} segments");
    assert_eq!(
        positions as usize,
        events.len(),
        "every event's position is saved"
    );

    // Published by the next run, after the positions it loads.
    workload.run(&mut client, 100).await;
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &[]);
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
    let loaded = walcast.log_fields(LOADED);
    assert_eq!(
        field(&loaded, "positions"),
        events.len() as u64,
        "{loaded:?}"
    );
    assert_eq!(field(&loaded, "read_back"), 0, "{loaded:?}");
    assert_eq!(field(&loaded, "from"), 1, "{loaded:?}");
    // Nothing older to read back in the background either.
    assert_eq!(field(&walcast.log_fields(REBUILT), "messages"), 0);
    let checked = answers_are_exact(&env).await;
    walcast.stop(Duration::from_secs(20)).await;

    // The newest segment lost (a writer that fell behind, a crash before the
    // last save): the next start reads back exactly that range.
    let newest = client
        .query_one(
            "DELETE FROM walcast.catchup_segments WHERE first_seq =
                 (SELECT max(first_seq) FROM walcast.catchup_segments) RETURNING first_seq, last_seq",
            &[],
        )
        .await
        .unwrap();
    let (first, last): (i64, i64) = (newest.get(0), newest.get(1));
    let stream_last = env.stream_events().await.len() as u64;
    assert_eq!(
        last as u64, stream_last,
        "the newest segment ends at the stream's end"
    );
    let walcast = Walcast::start("third", dir.path(), &env.env_vars(), &[]);
    walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
    let loaded = walcast.log_fields(LOADED);
    assert_eq!(
        field(&loaded, "read_back"),
        (last - first + 1) as u64,
        "{loaded:?}"
    );
    assert_eq!(
        field(&loaded, "positions") + field(&loaded, "read_back"),
        stream_last,
        "{loaded:?}"
    );
    answers_are_exact(&env).await;
    eprintln!("[catch-up restart] {checked} answers exact from saved positions; {loaded:?}");
}

/// While a restart loads the saved positions (held here mid-way), answers
/// find their events in the saved segments instead of searching the
/// stream, and are exact, also before the segments' ends are checked
/// (each answer read back); after the load the index answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_use_the_saved_segments_while_they_load() {
    use crate::support::edge::{scrape, start_walcast};
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let dir = TempDir::new("catchup-loading").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 4);
    // Idle past a cut after each round: several segments to choose from.
    for _ in 0..4 {
        workload.run(&mut client, 150).await;
        env.wait_caught_up(&client, Duration::from_secs(60)).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
    }
    walcast.stop(Duration::from_secs(20)).await;
    let (segments, _) = saved_positions(&client).await;
    assert!(segments >= 4, "{segments} segments");

    workload.run(&mut client, 50).await;
    let hold = dir.path().join("hold-index-load");
    std::fs::write(&hold, b"").unwrap();
    let hold_at = format!("index_load:{}", hold.display());
    let (mut walcast, addr) =
        start_walcast(&env, dir.path(), "second", &[("WALCAST_HOLD_AT", &hold_at)]);
    walcast
        .wait_log(
            "catch-up answers use the saved segments while they load",
            Duration::from_secs(60),
        )
        .await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let checked = answers_are_exact(&env).await;
    assert!(!walcast.log().contains(LOADED), "the load was held");
    let from_saved = scrape(&addr, "walcast_catchup_answers_from_saved_total").await;
    assert!(
        from_saved.is_some_and(|n| n >= (checked / 2) as f64),
        "{from_saved:?} of {checked} answers from the saved segments\n{}",
        walcast.log_tail(20)
    );

    std::fs::remove_file(&hold).unwrap();
    walcast.wait_log(LOADED, Duration::from_secs(60)).await;
    answers_are_exact(&env).await;
    walcast.stop(Duration::from_secs(20)).await;

    // Before the segments' ends are checked, each answer found in them is
    // read back from the stream first: still exact.
    std::fs::write(&hold, b"").unwrap();
    let hold_at = format!("index_trust:{}", hold.display());
    let (mut walcast, addr) =
        start_walcast(&env, dir.path(), "third", &[("WALCAST_HOLD_AT", &hold_at)]);
    walcast
        .wait_log("holding at index_trust", Duration::from_secs(60))
        .await;
    let unchecked = answers_are_exact(&env).await;
    let from_unchecked = scrape(&addr, "walcast_catchup_answers_from_saved_total").await;
    assert!(
        from_unchecked.is_some_and(|n| n >= (unchecked / 2) as f64),
        "{from_unchecked:?} of {unchecked} answers from unchecked segments\n{}",
        walcast.log_tail(20)
    );
    assert!(!walcast.log().contains(LOADED), "the load was held");
    std::fs::remove_file(&hold).unwrap();
    walcast.wait_log(LOADED, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;
    eprintln!(
        "[catch-up restart] {from_saved:?} of {checked} answers from saved segments while loading, {from_unchecked:?} of {unchecked} before their check"
    );
}

/// Appends `v` as a LEB128 varint (the segment encoding).
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// A segment that disagrees with the stream (what a broker that lost
/// acknowledged messages and got other events at the same stream sequences
/// would leave behind) is detected and never answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_segment_that_disagrees_with_the_stream_is_never_used() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let dir = TempDir::new("catchup-stale").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 3);
    workload.run(&mut client, 300).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;

    // Rewrite the newest segment: the last event of the stream's last
    // tenant `x` is said to be at the stream's last message, which holds
    // another tenant's event (the one the stream's last message of `x` is not).
    let events = env.stream_events().await;
    let last_msg = events.last().unwrap();
    let victim = events
        .iter()
        .rev()
        .find(|m| m.event.tenant_id != last_msg.event.tenant_id)
        .unwrap();
    let (tenant, seq) = (victim.event.tenant_id.clone(), victim.event.seq);
    let row = client
        .query_one(
            "SELECT first_seq, last_seq FROM walcast.catchup_segments ORDER BY first_seq DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap();
    let (first, last): (i64, i64) = (row.get(0), row.get(1));
    assert_eq!(last as u64, last_msg.stream_seq);
    // Alone, so nothing else holds `tenant`'s positions near the end.
    client
        .execute(
            "DELETE FROM walcast.catchup_segments WHERE first_seq <> $1",
            &[&first],
        )
        .await
        .unwrap();
    let mut data = vec![1u8];
    for v in [first as u64, last as u64, 1, 1, tenant.len() as u64] {
        varint(&mut data, v);
    }
    data.extend_from_slice(tenant.as_bytes());
    for v in [1, seq, last as u64 - first as u64, 0] {
        varint(&mut data, v);
    }
    client
        .execute(
            "UPDATE walcast.catchup_segments SET data = $1, positions = 1 WHERE first_seq = $2",
            &[&data, &first],
        )
        .await
        .unwrap();

    // Held while the segment is published to answers, not yet checked.
    let hold = dir.path().join("hold-index-trust");
    std::fs::write(&hold, b"").unwrap();
    let hold_at = format!("index_trust:{}", hold.display());
    let mut walcast = Walcast::start(
        "second",
        dir.path(),
        &env.env_vars(),
        &[("WALCAST_HOLD_AT", &hold_at)],
    );
    walcast
        .wait_log("holding at index_trust", Duration::from_secs(60))
        .await;
    // Answered right, before and after the check: `tenant` after `seq - 1`
    // starts at its real position, not at the stream's last message (the
    // answer found in the segment is read back and refused; then the
    // segments are refused whole and the stream read back instead).
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let question = format!(r#"{{"tenant_id":"{tenant}","after_seq":{}}}"#, seq - 1);
    for held in [true, false] {
        if !held {
            std::fs::remove_file(&hold).unwrap();
            walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
        }
        let (code, reply) = ask(&nats, &question).await;
        assert_eq!(code, None, "held {held}: {reply}");
        assert_eq!(
            reply["start_stream_seq"].as_u64(),
            Some(victim.stream_seq),
            "held {held}: {reply}"
        );
    }
    let warns = walcast.warn_lines().join("\n");
    assert!(
        warns.contains("saved catch-up positions disagree with the stream"),
        "{warns}"
    );
    assert!(!walcast.log().contains(LOADED), "{}", walcast.log_tail(30));
    answers_are_exact(&env).await;
    // The untrusted segments are gone; this run saves its own.
    walcast.stop(Duration::from_secs(20)).await;
    let stale = client
        .query_one(
            "SELECT count(*) FROM walcast.catchup_segments WHERE data = $1",
            &[&data],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(stale, 0);
}

/// Without `walcast.catchup_segments` (`walcast migrate` not re-run after an
/// upgrade) walcast runs, says what to do, and reads the stream back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_table_walcast_warns_and_reads_the_stream_back() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    client
        .batch_execute("DROP TABLE walcast.catchup_segments")
        .await
        .unwrap();
    // `walcast check` says so, with the fix.
    let check = std::process::Command::new(crate::support::walcast_bin())
        .arg("check")
        .envs(env.env_vars())
        .env("NO_COLOR", "1")
        .output()
        .expect("walcast check");
    let said = String::from_utf8_lossy(&check.stdout).to_string()
        + &String::from_utf8_lossy(&check.stderr);
    assert!(
        said.contains("walcast.catchup_segments is missing")
            && said.contains("run `walcast migrate`"),
        "{said}"
    );
    let dir = TempDir::new("catchup-no-table").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 3);
    workload.run(&mut client, 300).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;
    let warns = walcast.warn_lines().join("\n");
    assert!(
        warns.contains("walcast.catchup_segments does not exist: run `walcast migrate`"),
        "{warns}"
    );
    assert_eq!(
        warns.matches("catchup_segments does not exist").count(),
        1,
        "warned once per run: {warns}"
    );

    workload.run(&mut client, 50).await;
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &[]);
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
    assert!(
        walcast
            .warn_lines()
            .join("\n")
            .contains("run `walcast migrate`")
    );
    assert!(!walcast.log().contains(LOADED));
    assert!(field(&walcast.log_fields(REBUILT), "messages") > 0);
    answers_are_exact(&env).await;
    walcast.stop(Duration::from_secs(20)).await;
}

/// Waits until the checkpoint (held back by the confirm delay) reaches `seq`.
async fn checkpoint_reaches(client: &tokio_postgres::Client, seq: u64) {
    wait_until(Duration::from_secs(120), || async move {
        let row = client
            .query_opt("SELECT stream_seq FROM walcast.checkpoints", &[])
            .await
            .unwrap();
        row.is_some_and(|r| r.get::<_, i64>(0) as u64 >= seq)
    })
    .await
    .unwrap_or_else(|e| panic!("the checkpoint never reached stream sequence {seq}: {e}"));
}

/// SPEC §4.7: the broker loses acknowledged messages whose positions were
/// already saved, walcast is killed meanwhile and republishes them; every
/// answer stays exact, in that run (which loads the positions saved before
/// the loss) and in the next one (which loads those saved after it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_broker_loss_and_republish_answers_stay_exact() {
    let env = Env::start().await;
    let client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("catchup-broker-loss").unwrap();
    let store_copy = dir.path().join("store-copy");
    let delay = [("WALCAST_CONFIRM_DELAY", "30s")];
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &delay);
    let load = Load::start(&env, 5, Duration::from_millis(5)).await;
    // A checkpoint (30 s behind), so the next run has positions to load.
    checkpoint_reaches(&client, 1).await;
    let at_snapshot = snapshot(&env, &store_copy).await;
    // Positions past the snapshot are saved, then lost by the broker.
    wait_until(Duration::from_secs(60), || {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "SELECT coalesce(max(last_seq), 0) FROM walcast.catchup_segments",
                    &[],
                )
                .await
                .unwrap();
            row.get::<_, i64>(0) as u64 > at_snapshot + 100
        }
    })
    .await
    .expect("segments saved past the snapshot");
    wait_acked_high_past(&client, at_snapshot + 100).await;
    restore(&env, &store_copy);
    walcast.kill9().await; // while NATS is down
    env.nats.start_again().unwrap();
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &delay);
    walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
    let before_loss = walcast.log_fields(LOADED);
    assert!(
        field(&before_loss, "through") <= at_snapshot,
        "{before_loss:?}"
    );
    load.wait_transactions(100, Duration::from_secs(60)).await;
    load.stop().await;
    wait_complete(&env, &oracle, &client, &walcast).await;
    let first = answers_are_exact(&env).await;
    let warns = walcast.warn_lines().join("\n");
    assert!(
        warns.contains("the broker lost messages it had acknowledged"),
        "a loss happened:\n{warns}"
    );
    let stream_last = env.stream_events().await.len() as u64;
    checkpoint_reaches(&client, stream_last).await;
    walcast.stop(Duration::from_secs(20)).await;

    let mut walcast = Walcast::start("third", dir.path(), &env.env_vars(), &delay);
    walcast.wait_log(REBUILT, Duration::from_secs(60)).await;
    let after_loss = walcast.log_fields(LOADED);
    assert!(
        field(&after_loss, "positions") + field(&after_loss, "read_back") >= stream_last,
        "{after_loss:?}"
    );
    let second = answers_are_exact(&env).await;
    walcast.stop(Duration::from_secs(20)).await;
    eprintln!(
        "[catch-up broker loss] {first} + {second} answers exact; loaded {before_loss:?} then {after_loss:?}"
    );
}
