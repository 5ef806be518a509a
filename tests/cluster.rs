//! Issue 16: walcast on a 3-node NATS cluster with an R3 stream, configured
//! with the three-server list, under a steady randomized write load. The
//! stream leader is killed (kill -9) twice and started again each time;
//! walcast is killed (kill -9) while a node is down and restarted while its
//! first listed server is down. The stream must stay exact (SPEC §4: every
//! committed change exactly once, per-tenant seq continuous), and each
//! leader change may stall publishing only for about the election plus one
//! retry: the stall (from the kill to the first message stored after it) is
//! measured, printed, and bounded generously so a busy machine does not
//! fail the test.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::chaos::{Load, Walcast, catch_up, verify_at};
use crate::support::cluster::{Cluster, NODES};
use crate::support::daemon::init_logging;
use crate::support::oracle::Oracle;
use crate::support::postgres::Postgres;
use crate::support::{TempDir, wait_for, wait_until};

const STREAM: &str = "WALCAST";

/// The most a stream leader change may stall publishing here. The election
/// alone takes ~4–9 s (nats-server's randomized Raft election timeout); this
/// leaves room for a loaded CI machine. The measured stalls are printed.
const STALL_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_leader_failover_on_a_three_node_cluster() {
    let began = Instant::now();
    init_logging();
    let pg = Postgres::start().expect("start postgres");
    let cluster = Cluster::start().await.expect("start a 3-node nats cluster");
    walcast::migrate::run(&cluster.settings(&pg))
        .await
        .expect("walcast migrate");
    let client = pg.client().await;
    let oracle = Oracle::create(&client).await;
    let dir = TempDir::new("cluster").expect("log dir");
    let env = |first: usize| cluster.walcast_env(&pg, first);

    let load = Load::start_on(&pg, 6, Duration::from_millis(2)).await;
    let mut w = Walcast::start("walcast", dir.path(), &env(0), &[]);
    wait_for_growth(&cluster, &w, 200).await;

    // Two stream leader kills, each node started again afterwards.
    let mut stalls = Vec::new();
    for round in 1..=2 {
        let leader = cluster
            .wait_stream_healthy(STREAM, Duration::from_secs(60))
            .await
            .expect("a healthy R3 stream before the kill");
        let warns_before = w.warn_lines().len();
        let (stall, election) = kill_leader_and_measure(&cluster, leader, &w).await;
        eprintln!(
            "[cluster] leader kill {round}: {} (stream leader) killed; new leader elected after {election:.2?}; publishing stalled {stall:.2?}; walcast WARNs meanwhile:\n  {}",
            cluster.name(leader),
            w.warn_lines()[warns_before..].join("\n  ")
        );
        let warns = &w.warn_lines()[warns_before..];
        assert!(
            warns.iter().any(|l| l.contains("stream leader change")),
            "leader kill {round}: walcast never said a stream leader change is under way:\n{}",
            w.log_tail(40)
        );
        assert!(
            !warns.iter().any(|l| l.contains("deleted")),
            "leader kill {round}: walcast took the leader change for a deleted stream:\n{}",
            w.log_tail(40)
        );
        assert!(
            stall < STALL_BOUND,
            "leader kill {round}: publishing stalled {stall:?} (bound {STALL_BOUND:?})\n{}",
            w.log_tail(40)
        );
        stalls.push(stall);
        cluster
            .start_again(leader)
            .await
            .expect("restart the killed node");
        assert!(w.exited().is_none(), "walcast exited:\n{}", w.log_tail(40));
    }

    // walcast dies while a node is down, and comes back while its first
    // listed server is still down.
    let leader = cluster
        .wait_stream_healthy(STREAM, Duration::from_secs(60))
        .await
        .expect("a healthy R3 stream");
    let down = (leader + 1) % NODES;
    cluster.kill9(down).expect("kill a follower node");
    wait_for_growth(&cluster, &w, 100).await;
    w.kill9().await;
    let mut w = Walcast::start("walcast-restarted", dir.path(), &env(down), &[]);
    wait_for_growth(&cluster, &w, 200).await;
    cluster
        .start_again(down)
        .await
        .expect("restart the follower node");
    // The restarted follower catches up on what it missed. On loaded CI
    // machines it was once still 7,172 messages behind after 60 s, and once
    // never heard from its leader again in 180 s (replica "active 179.8s"
    // ago, lag fixed): nats-server's matter, not walcast's. Its log is
    // printed, and it is stopped, so that no read of the check below is
    // placed on a replica that stays behind; the stream keeps its quorum.
    if let Err(e) = cluster
        .wait_stream_healthy(STREAM, Duration::from_secs(90))
        .await
    {
        let log = cluster.node(down).log_contents();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        eprintln!(
            "[cluster] {} did not catch up after its restart ({e}); stopping it. Its log's end:\n  {}",
            cluster.name(down),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n  ")
        );
        cluster
            .kill9(down)
            .expect("stop the follower that stays behind");
        cluster
            .wait_stream_healthy(STREAM, Duration::from_secs(60))
            .await
            .expect("a leader with a current replica on the other two nodes");
    }

    load.wait_transactions(50, Duration::from_secs(30)).await;
    let stats = load.stop().await;
    if let Err(e) = catch_up(&client, Duration::from_secs(60)).await {
        panic!("walcast did not catch up: {e}\n{}", w.log_tail(60));
    }
    w.stop(Duration::from_secs(15)).await;
    let checked = verify_at(
        &format!(
            "3-node cluster, 2 stream leader kills (stalls {stalls:.2?}), walcast killed with a node down and restarted with its first server down"
        ),
        &cluster.any_url(),
        &client,
        &oracle,
    )
    .await;
    eprintln!(
        "[cluster] PASS: {checked} events checked in {:.1?}; workload {stats:?}",
        began.elapsed()
    );
}

/// Waits until `n` more messages than now are in the stream (walcast
/// publishes through whatever happened).
async fn wait_for_growth(cluster: &Cluster, w: &Walcast, n: u64) {
    let last = || async {
        cluster
            .stream_info(STREAM)
            .await
            .map(|i| i.state.last_sequence)
    };
    let start = wait_for(Duration::from_secs(60), last).await.unwrap_or(0);
    let grown = wait_until(Duration::from_secs(60), || async {
        last().await.is_some_and(|l| l >= start + n)
    })
    .await;
    if let Err(e) = grown {
        panic!(
            "the stream did not grow by {n} messages from {start}: {e}\n--- {} log ---\n{}",
            w.name,
            w.log_tail(60)
        );
    }
}

/// Kills the stream leader (kill -9) and returns how long publishing
/// stalled: from the kill until the first message stored after it, by the
/// timestamps the stream gives its messages; and how long the election took
/// (until the new leader's `leader_since`), if known.
async fn kill_leader_and_measure(
    cluster: &Cluster,
    leader: usize,
    w: &Walcast,
) -> (Duration, Option<Duration>) {
    let before = cluster
        .stream_info(STREAM)
        .await
        .expect("stream info before the kill")
        .state
        .last_sequence;
    cluster.kill9(leader).expect("kill the stream leader");
    let killed = unix_nanos(SystemTime::now());

    let (last, last_time) = match wait_for(STALL_BOUND * 2, || async {
        let state = cluster.stream_info(STREAM).await?.state;
        (state.last_timestamp.unix_timestamp_nanos() > killed).then_some((
            state.last_sequence,
            state.last_timestamp.unix_timestamp_nanos(),
        ))
    })
    .await
    {
        Ok(found) => found,
        Err(e) => panic!(
            "no message was stored after the stream leader was killed: {e}\n--- {} log ---\n{}",
            w.name,
            w.log_tail(60)
        ),
    };
    // Binary search for the first message stored after the kill: messages
    // up to `lo` were stored before it, `hi` after.
    let (mut lo, mut hi, mut hi_time) = (before, last, last_time);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        let time = message_time(cluster, mid).await;
        if time > killed {
            (hi, hi_time) = (mid, time);
        } else {
            lo = mid;
        }
    }
    let stall = Duration::from_nanos((hi_time - killed) as u64);
    let since = cluster
        .stream_info(STREAM)
        .await
        .and_then(|i| i.cluster?.leader_since)
        .map(|t| t.unix_timestamp_nanos());
    let election = since.map(|t| Duration::from_nanos((t - killed).max(0) as u64));
    (stall, election)
}

/// When the stream stored message `seq` (nanoseconds since the epoch).
/// Asked again for a while: right after an election the stream may still
/// answer "JetStream system temporarily unavailable" (seen in CI).
async fn message_time(cluster: &Cluster, seq: u64) -> i128 {
    let read = wait_for(Duration::from_secs(30), || async {
        let client = async_nats::connect(cluster.any_url()).await.ok()?;
        let stream = async_nats::jetstream::new(client)
            .get_stream(STREAM)
            .await
            .ok()?;
        stream.get_raw_message(seq).await.ok()
    })
    .await;
    read.unwrap_or_else(|e| panic!("read stream message {seq}: {e}"))
        .time
        .unix_timestamp_nanos()
}

fn unix_nanos(t: SystemTime) -> i128 {
    t.duration_since(UNIX_EPOCH)
        .expect("after the epoch")
        .as_nanos() as i128
}

/// The lookup walcast uses after "no responders" returns within a moment of
/// the new stream leader's election: requests the leaderless cluster drops
/// do not hold it up until their timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_lookup_answers_as_soon_as_a_new_leader_is_elected() {
    init_logging();
    let cluster = Cluster::start().await.expect("start a 3-node nats cluster");
    let connect = |i: usize| {
        let url = cluster.node(i).url();
        async move {
            async_nats::jetstream::new(async_nats::connect(url).await.expect("connect to a node"))
        }
    };
    connect(0)
        .await
        .create_stream(async_nats::jetstream::stream::Config {
            name: "PROBE".into(),
            subjects: vec!["probe.>".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .expect("create an R3 stream");
    let leader = cluster
        .wait_stream_healthy("PROBE", Duration::from_secs(30))
        .await
        .expect("a healthy R3 stream");
    let js = connect((leader + 1) % NODES).await;
    cluster.kill9(leader).expect("kill the stream leader");
    let killed = Instant::now();
    let found = walcast::publish::stream::lookup(&js, "PROBE", Duration::from_secs(15))
        .await
        .expect("the stream, once it has a leader");
    let answered = SystemTime::now();
    let waited = killed.elapsed();
    let info = found.cached_info().cluster.clone().expect("cluster info");
    let since = info
        .leader_since
        .expect("leader_since")
        .unix_timestamp_nanos();
    let late = Duration::from_nanos((unix_nanos(answered) - since).max(0) as u64);
    eprintln!(
        "[lookup] new leader {:?} elected {:.2?} after the kill; the lookup answered {late:.2?} after the election",
        info.leader,
        waited.saturating_sub(late)
    );
    assert_ne!(info.leader.as_deref(), Some(cluster.name(leader).as_str()));
    assert!(
        late < Duration::from_secs(2),
        "the lookup answered {late:?} after the new leader was elected"
    );
}
