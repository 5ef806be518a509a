//! The client against real services: PostgreSQL, nats-server and the
//! walcast daemon, with the daemon killed and NATS restarted under a live
//! subscription (issue 9, "done when" 2).

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use support::{Env, Writer, wait_until};
use walcast_client::{AllFrom, Backoff, Client, Error, Options, Subscription, Update};

/// Short timings so recovery happens within the test's patience.
fn options() -> Options {
    Options {
        request_timeout: Duration::from_secs(1),
        backoff: Backoff {
            initial: Duration::from_millis(50),
            max: Duration::from_millis(500),
        },
        fallback_after: Duration::from_secs(1),
        idle_check: Duration::from_secs(2),
        ahead_timeout: Duration::from_secs(20),
        ..Options::default()
    }
}

/// Everything a subscription yields, gathered in the background.
#[derive(Clone, Default)]
struct Collected(Arc<Mutex<Vec<Result<Update, String>>>>);

impl Collected {
    fn start(mut sub: Subscription) -> (Collected, tokio::task::JoinHandle<()>) {
        let collected = Collected::default();
        let items = collected.0.clone();
        let task = tokio::spawn(async move {
            while let Some(item) = sub.next().await {
                items.lock().unwrap().push(item.map_err(|e| e.to_string()));
            }
        });
        (collected, task)
    }

    fn items(&self) -> Vec<Result<Update, String>> {
        self.0.lock().unwrap().clone()
    }

    /// The seqs delivered for `tenant`, in delivery order.
    fn seqs(&self, tenant: &str) -> Vec<u64> {
        self.items()
            .into_iter()
            .filter_map(|i| match i {
                Ok(Update::Event(e)) if e.tenant_id == tenant => Some(e.seq),
                _ => None,
            })
            .collect()
    }

    async fn wait_for(&self, tenant: &str, n: usize, env: &Env) {
        let what = format!("{n} events of {tenant}");
        let result = wait_until(Duration::from_secs(40), &what, || async {
            self.seqs(tenant).len() >= n
        })
        .await;
        if let Err(e) = result {
            panic!(
                "{e}; got {:?}\nother items: {:?}\n--- walcast log ---\n{}",
                self.seqs(tenant),
                self.items()
                    .iter()
                    .filter(|i| !matches!(i, Ok(Update::Event(_))))
                    .collect::<Vec<_>>(),
                env.walcast.log()
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_in_order_across_walcast_kill_and_nats_restart() {
    support::init_logging();
    let mut env = Env::start(None);
    let mut w = Writer::new(&env.pg).await;
    let client = Client::connect(&env.nats.url(), options()).await.unwrap();
    let (acme, _t1) = Collected::start(client.subscribe("acme", 0).unwrap());
    let (all, _t2) = Collected::start(client.subscribe_all(AllFrom::Beginning));

    // Steady state.
    for _ in 0..5 {
        w.insert("acme", 4).await;
        w.insert("globex", 2).await;
    }
    acme.wait_for("acme", 20, &env).await;

    // kill -9 walcast in the middle of a burst of writes, so some of them
    // were published and some not; then restart NATS while walcast is down.
    let url = env.pg.url();
    let burst = tokio::spawn(async move {
        let mut w = Writer::connect(&url).await;
        for _ in 0..20 {
            w.insert("acme", 1).await;
            w.insert("globex", 1).await;
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        w.counts
    });
    acme.wait_for("acme", 25, &env).await;
    env.walcast.kill9().unwrap();
    for (tenant, n) in burst.await.unwrap() {
        *w.counts.entry(tenant).or_default() += n;
    }
    env.nats.stop().unwrap();
    env.nats.start_again().unwrap();
    // A subscriber that starts while the catch-up service is gone reads the
    // stream directly (Options::fallback_after) while walcast stays down.
    let (late, _t3) = Collected::start(client.subscribe("acme", 5).unwrap());
    late.wait_for("acme", 15, &env).await;
    // Written while walcast is down: the slot keeps them.
    w.insert("acme", 10).await;
    env.walcast.start_again().unwrap();
    w.insert("acme", 10).await;
    w.insert("globex", 5).await;

    let n = w.counts["acme"] as usize;
    let g = w.counts["globex"] as usize;
    acme.wait_for("acme", n, &env).await;
    late.wait_for("acme", n - 5, &env).await;
    all.wait_for("acme", n, &env).await;
    all.wait_for("globex", g, &env).await;
    // Nothing more may arrive (no late duplicate).
    tokio::time::sleep(Duration::from_millis(500)).await;

    let want = |from: u64, to: usize| (from..=to as u64).collect::<Vec<_>>();
    assert_eq!(acme.seqs("acme"), want(1, n), "tenant subscription");
    assert_eq!(acme.seqs("globex"), Vec::<u64>::new(), "only its tenant");
    assert_eq!(
        late.seqs("acme"),
        want(6, n),
        "subscription started during the outage"
    );
    assert_eq!(
        all.seqs("acme"),
        want(1, n),
        "all-tenant subscription, acme"
    );
    assert_eq!(
        all.seqs("globex"),
        want(1, g),
        "all-tenant subscription, globex"
    );
    for c in [&acme, &late, &all] {
        assert_eq!(
            c.items().len(),
            c.seqs("acme").len() + c.seqs("globex").len(),
            "no resync, no error"
        );
    }
    let ids: std::collections::HashSet<String> = acme
        .items()
        .into_iter()
        .filter_map(|i| match i {
            Ok(Update::Event(e)) => Some(e.event_id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), n, "distinct event ids");

    // All tenants from saved positions, and from now on.
    let positions = HashMap::from([
        ("acme".to_string(), n as u64 - 3),
        ("globex".to_string(), g as u64),
    ]);
    let (after, _t4) = Collected::start(client.subscribe_all(AllFrom::After(positions)));
    let (now, _t5) = Collected::start(client.subscribe_all(AllFrom::Now));
    after.wait_for("acme", 3, &env).await;
    // `Now` starts wherever the stream's tail is when it looks: write until
    // it sees an event, then it must see every later one.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while now.seqs("acme").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "AllFrom::Now saw nothing"
        );
        w.insert("acme", 1).await;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let first = now.seqs("acme")[0];
    let (n2, g2) = (
        w.insert("acme", 1).await as usize,
        w.insert("globex", 1).await as usize,
    );
    after.wait_for("acme", n2 - n + 3, &env).await;
    after.wait_for("globex", 1, &env).await;
    now.wait_for("acme", n2 - first as usize + 1, &env).await;
    now.wait_for("globex", 1, &env).await;
    assert_eq!(after.seqs("acme"), want(n as u64 - 2, n2));
    assert_eq!(after.seqs("globex"), want(g as u64 + 1, g2));
    assert_eq!(now.seqs("acme"), want(first, n2));
    assert_eq!(now.seqs("globex"), want(g as u64 + 1, g2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn too_old_is_a_resync_signal_and_oversized_events_arrive_whole() {
    support::init_logging();
    // A small max_payload makes a 300 kB row an oversized event (object
    // store). Not smaller: walcast stores objects in 128 KiB chunks, which
    // must fit too.
    let env = Env::start(Some(256 * 1024));
    let mut w = Writer::new(&env.pg).await;
    let client = Client::connect(
        &env.nats.url(),
        Options {
            ahead_timeout: Duration::from_secs(1),
            ..options()
        },
    )
    .await
    .unwrap();
    let (live, _t) = Collected::start(client.subscribe("acme", 0).unwrap());
    w.insert("acme", 20).await;
    let large = w.insert_large("acme", 300_000).await;
    live.wait_for("acme", 21, &env).await;
    let event = live
        .items()
        .into_iter()
        .find_map(|i| match i {
            Ok(Update::Event(e)) if e.seq == large => Some(e),
            _ => None,
        })
        .unwrap();
    let task = match event.after.clone() {
        Some(walcast_client::proto::change_event::After::Task(t)) => t,
        other => panic!("no task row: {other:?}"),
    };
    assert_eq!(
        task.description.map(|d| d.len()),
        Some(300_000),
        "fetched from the object store"
    );
    // proto3 JSON, as a gateway forwards it.
    let json = walcast_client::json::to_value(&event).unwrap();
    assert_eq!(json["seq"], "21");
    assert_eq!(json["action"], "ACTION_CREATED");
    assert!(
        json["commitTime"].as_str().unwrap().ends_with('Z'),
        "{json}"
    );

    // Retention: drop acme's seqs 1..=10 from the stream.
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let reply = nats
        .request(
            "walcast-api.v1.catchup",
            r#"{"tenant_id":"acme","after_seq":10}"#.into(),
        )
        .await
        .unwrap();
    let reply: serde_json::Value = serde_json::from_slice(&reply.payload).unwrap();
    let cut = reply["start_stream_seq"].as_u64().unwrap();
    let js = async_nats::jetstream::new(nats);
    let stream = js.get_stream("WALCAST").await.unwrap();
    stream
        .purge()
        .filter("walcast.acme.>")
        .sequence(cut)
        .await
        .unwrap();

    let (old, _t) = Collected::start(client.subscribe("acme", 3).unwrap());
    let (recent, _t) = Collected::start(client.subscribe("acme", 10).unwrap());
    wait_until(Duration::from_secs(20), "the re-sync signal", || async {
        !old.items().is_empty()
    })
    .await
    .unwrap();
    match &old.items()[0] {
        Ok(Update::Resync {
            tenant_id,
            oldest_seq,
            last_seq,
        }) => {
            assert_eq!(
                (tenant_id.as_str(), *oldest_seq, *last_seq),
                ("acme", 11, 21)
            );
        }
        other => panic!("expected a re-sync first, got {other:?}"),
    }
    // After the re-sync the stream goes on after last_seq.
    w.insert("acme", 2).await;
    old.wait_for("acme", 2, &env).await;
    assert_eq!(old.seqs("acme"), vec![22, 23]);
    recent.wait_for("acme", 13, &env).await;
    assert_eq!(
        recent.seqs("acme"),
        (11..=23).collect::<Vec<_>>(),
        "still in the stream: no re-sync"
    );
    assert!(
        recent
            .items()
            .iter()
            .all(|i| matches!(i, Ok(Update::Event(_))))
    );

    // An all-tenant subscription from the beginning re-syncs acme too, and
    // goes on after acme's last seq.
    let (all, _t) = Collected::start(client.subscribe_all(AllFrom::Beginning));
    wait_until(
        Duration::from_secs(20),
        "the all-tenant re-sync",
        || async { !all.items().is_empty() },
    )
    .await
    .unwrap();
    assert!(
        matches!(
            &all.items()[0],
            Ok(Update::Resync {
                oldest_seq: 11,
                last_seq: 23,
                ..
            })
        ),
        "{:?}",
        all.items()[0]
    );
    w.insert("acme", 1).await;
    all.wait_for("acme", 1, &env).await;
    assert_eq!(all.seqs("acme"), vec![24]);

    // Positions the stream never had, and tenant ids walcast never publishes.
    let mut ahead = client.subscribe("acme", 500).unwrap();
    match tokio::time::timeout(Duration::from_secs(20), ahead.next())
        .await
        .unwrap()
    {
        Some(Err(Error::Ahead {
            after_seq: 500,
            last_seq: 24,
            ..
        })) => {}
        other => panic!("expected Error::Ahead, got {other:?}"),
    }
    assert!(ahead.next().await.is_none(), "an error is the last item");
    assert!(matches!(
        client.subscribe("a.b", 0),
        Err(Error::InvalidTenant { .. })
    ));
}
