//! SPEC §7: the catch-up service inside `walcast run`, against real NATS.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use rand::{Rng, SeedableRng};
use serde_json::Value;

use crate::support::chaos::Walcast;
use crate::support::checks::assert_stream_exact;
use crate::support::daemon::{Daemon, Env};
use crate::support::oracle::{Oracle, assert_matches_oracle};
use crate::support::workload::Workload;
use crate::support::{TempDir, wait_for, wait_until};

pub(crate) async fn ask(client: &async_nats::Client, body: &str) -> (Option<String>, Value) {
    ask_on(client, "walcast-api.v1.catchup", body).await
}

async fn ask_on(client: &async_nats::Client, subject: &str, body: &str) -> (Option<String>, Value) {
    let reply = client
        .request(subject.to_string(), body.to_string().into())
        .await
        .expect("catch-up request answered");
    let code = reply
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.to_string());
    let json: Value = serde_json::from_slice(&reply.payload).expect("JSON reply body");
    (code, json)
}

/// The seqs a consumer built only from the reply delivers, up to `n` of them.
async fn consume(js: &jetstream::Context, reply: &Value, n: usize) -> Vec<u64> {
    let stream = js
        .get_stream(reply["stream"].as_str().unwrap())
        .await
        .unwrap();
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: reply["filter_subject"].as_str().unwrap().to_string(),
            deliver_policy: consumer::DeliverPolicy::ByStartSequence {
                start_sequence: reply["start_stream_seq"].as_u64().unwrap(),
            },
            ..Default::default()
        })
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let mut seqs = Vec::new();
    while seqs.len() < n {
        let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(5), messages.next()).await
        else {
            break;
        };
        let msg = msg.unwrap();
        let seq = msg
            .headers
            .as_ref()
            .unwrap()
            .get("Walcast-Seq")
            .unwrap()
            .as_str()
            .parse()
            .unwrap();
        seqs.push(seq);
    }
    seqs
}

/// Asks for `tenant` after `after` (its last seq is `n`) and checks that a
/// consumer built only from the answer delivers `after + 1, ...` (the first
/// `take` of them).
pub(crate) async fn replays_from(
    nats: &async_nats::Client,
    js: &jetstream::Context,
    tenant: &str,
    after: u64,
    n: u64,
    take: usize,
) {
    let (code, reply) = ask(
        nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":{after}}}"#),
    )
    .await;
    assert_eq!(code, None, "{reply}");
    assert_eq!(reply["last_seq"].as_u64(), Some(n));
    assert_eq!(reply["filter_subject"], format!("walcast.{tenant}.>"));
    let want = ((after + 1)..=n).take(take).collect::<Vec<_>>();
    assert_eq!(
        consume(js, &reply, want.len()).await,
        want,
        "tenant {tenant} after {after}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_answers_as_the_spec_says() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let daemon = Daemon::start(env.settings());
    let mut workload = Workload::new(Workload::seed(), 5);
    workload.run(&mut client, 600).await;

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    // Wait until everything is published, then learn each tenant's last seq from the stream.
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let events = env.stream_events().await;
    let mut last = std::collections::HashMap::new();
    for m in &events {
        last.insert(m.event.tenant_id.clone(), m.event.seq);
    }

    let mut rng = rand::rng();
    for (tenant, &n) in &last {
        for after in [0, n / 2, n.saturating_sub(1), rng.random_range(0..n)] {
            replays_from(&nats, &js, tenant, after, n, 20).await;
        }
        // Nothing missed: start at the stream's next sequence.
        let (code, reply) = ask(
            &nats,
            &format!(r#"{{"tenant_id":"{tenant}","after_seq":{n}}}"#),
        )
        .await;
        assert_eq!(code, None);
        assert_eq!(
            reply["start_stream_seq"].as_u64(),
            Some(events.len() as u64 + 1)
        );
        // Ahead.
        let (code, reply) = ask(
            &nats,
            &format!(r#"{{"tenant_id":"{tenant}","after_seq":{}}}"#, n + 1),
        )
        .await;
        assert_eq!(code.as_deref(), Some("416"));
        assert_eq!(reply["error"], "ahead");
    }
    // Unknown tenant: last_seq 0, start at the next sequence.
    let (code, reply) = ask(&nats, r#"{"tenant_id":"nobody","after_seq":0}"#).await;
    assert_eq!(code, None);
    assert_eq!(reply["last_seq"], 0);
    assert_eq!(
        reply["start_stream_seq"].as_u64(),
        Some(events.len() as u64 + 1)
    );
    // The tenant-scoped subject answers like the shared one for its own
    // tenant, and refuses a body naming another tenant.
    for (tenant, &n) in &last {
        let body = format!(r#"{{"tenant_id":"{tenant}","after_seq":{}}}"#, n / 2);
        let scoped = format!("walcast-api.v1.catchup.{tenant}");
        let (code, reply) = ask_on(&nats, &scoped, &body).await;
        assert_eq!(code, None, "{reply}");
        assert_eq!((code, reply), ask(&nats, &body).await);
        let other = r#"{"tenant_id":"someone-else","after_seq":0}"#;
        let (code, reply) = ask_on(&nats, &scoped, other).await;
        assert_eq!(code.as_deref(), Some("400"), "{reply}");
        assert_eq!(reply["error"], "bad_request");
        assert!(
            reply["message"].as_str().unwrap().contains("subject"),
            "{reply}"
        );
    }
    // Malformed requests.
    for bad in [
        "not json",
        r#"{"tenant_id":"a.b","after_seq":1}"#,
        r#"{"tenant_id":"acme"}"#,
        r#"{"tenant_id":"x","after_seq":-1}"#,
    ] {
        let (code, reply) = ask(&nats, bad).await;
        assert_eq!(code.as_deref(), Some("400"), "{bad}");
        assert_eq!(reply["error"], "bad_request");
    }
    // Discoverable as a NATS micro service.
    let ping = nats
        .request("$SRV.PING.walcast", "".into())
        .await
        .expect("$SRV.PING answered");
    let ping: Value = serde_json::from_slice(&ping.payload).unwrap();
    assert_eq!(ping["name"], "walcast");

    // too_old: purge a tenant's oldest events.
    let (tenant, &n) = last.iter().max_by_key(|(_, n)| **n).unwrap();
    let (_, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":10}}"#),
    )
    .await;
    let cut = reply["start_stream_seq"].as_u64().unwrap(); // the stream position of seq 11
    let stream = js.get_stream("WALCAST").await.unwrap();
    stream
        .purge()
        .filter(format!("walcast.{tenant}.>"))
        .sequence(cut)
        .await
        .unwrap();
    let (code, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":3}}"#),
    )
    .await;
    assert_eq!(code.as_deref(), Some("410"), "{reply}");
    assert_eq!(reply["error"], "too_old");
    assert_eq!(reply["oldest_seq"].as_u64(), Some(11));
    let (code, reply) = ask(
        &nats,
        &format!(r#"{{"tenant_id":"{tenant}","after_seq":10}}"#),
    )
    .await;
    assert_eq!(code, None, "after_seq 10 still answerable: {reply}");
    assert_eq!(
        consume(&js, &reply, 3).await,
        vec![11, 12, 13]
            .into_iter()
            .filter(|s| *s <= n)
            .collect::<Vec<_>>()
    );
    daemon.stop().await.unwrap();
}

/// After a restart the index is read back from the stream (positions of
/// events an earlier run published) and merged with what the new run
/// publishes. Answers from it are trusted without reading the stream, so a
/// wrong position would show here as a consumer starting at the wrong event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_after_a_restart_uses_the_rebuilt_index() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let dir = TempDir::new("catchup-restart").unwrap();
    let mut walcast = Walcast::start("first", dir.path(), &env.env_vars(), &[]);
    let mut workload = Workload::new(Workload::seed(), 4);
    workload.run(&mut client, 500).await;
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast.stop(Duration::from_secs(20)).await;
    // Published by the next run, after the positions it reads back.
    workload.run(&mut client, 150).await;
    let mut walcast = Walcast::start("second", dir.path(), &env.env_vars(), &[]);
    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    walcast
        .wait_log("catch-up index rebuilt", Duration::from_secs(60))
        .await;

    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let js = jetstream::new(nats.clone());
    let events = env.stream_events().await;
    let mut last = std::collections::HashMap::new();
    for m in &events {
        last.insert(m.event.tenant_id.clone(), m.event.seq);
    }
    let mut checked = 0;
    for (tenant, &n) in &last {
        for after in (0..n).step_by(7).chain([n - 1]) {
            replays_from(&nats, &js, tenant, after, n, 3).await;
            checked += 1;
        }
    }
    assert!(checked > 50, "{checked} answers checked");
    walcast.stop(Duration::from_secs(20)).await;
}

/// One catch-up answer seen during the flood, checked once the stream is complete.
struct Seen {
    tenant: String,
    after: u64,
    code: Option<String>,
    reply: Value,
}

/// Requests from one connection, 50 at a time, until `stop`: random
/// tenants, `after_seq` up to one past the tenant's last seq seen so far
/// (so most answers are start points, some are "ahead"). Counts the
/// answers with a start point in `answered`.
async fn flood_client(
    url: String,
    tenants: usize,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
) -> Vec<Seen> {
    let nats = async_nats::connect(url).await.unwrap();
    let mut rng = rand::rngs::StdRng::from_rng(&mut rand::rng());
    let mut last = HashMap::new();
    let mut seen = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let asks: Vec<_> = (0..50)
            .map(|_| {
                let tenant = format!("tenant-{}", rng.random_range(0..tenants));
                let after = rng.random_range(0..=last.get(&tenant).copied().unwrap_or(0) + 1);
                let nats = nats.clone();
                async move {
                    let body = format!(r#"{{"tenant_id":"{tenant}","after_seq":{after}}}"#);
                    let (code, reply) = ask(&nats, &body).await;
                    Seen {
                        tenant,
                        after,
                        code,
                        reply,
                    }
                }
            })
            .collect();
        for s in futures::future::join_all(asks).await {
            if let Some(n) = s.reply["last_seq"].as_u64() {
                last.insert(s.tenant.clone(), n);
            }
            if s.code.is_none() {
                answered.fetch_add(1, Ordering::SeqCst);
            }
            // All early answers and a sample of the rest are checked.
            if seen.len() < 300 || rng.random_ratio(1, 20) {
                seen.push(s);
            }
        }
    }
    seen
}

/// Checks a flood answer against the complete stream (`last`: each
/// tenant's final seq): a start point is where a consumer gets
/// `after_seq + 1` first (or nothing, if the tenant had no later event).
async fn check_answer(
    stream: &jetstream::stream::Stream,
    last: &HashMap<String, u64>,
    s: &Seen,
) -> bool {
    let final_last = last.get(&s.tenant).copied().unwrap_or(0);
    let reply_last = || {
        let n = s.reply["last_seq"]
            .as_u64()
            .expect("last_seq in the answer");
        assert!(
            n <= final_last,
            "{} after {}: {}",
            s.tenant,
            s.after,
            s.reply
        );
        n
    };
    match s.code.as_deref() {
        None => {
            assert!(
                s.after <= reply_last(),
                "{} after {}: {}",
                s.tenant,
                s.after,
                s.reply
            );
            assert_eq!(s.reply["filter_subject"], format!("walcast.{}.>", s.tenant));
            let start = s.reply["start_stream_seq"].as_u64().unwrap();
            let first = match stream
                .direct_get_next_for_subject(format!("walcast.{}.>", s.tenant), Some(start))
                .await
            {
                Ok(msg) => Some(
                    msg.headers
                        .get("Walcast-Seq")
                        .unwrap()
                        .as_str()
                        .parse::<u64>()
                        .unwrap(),
                ),
                Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => None,
                Err(e) => panic!("direct get: {e}"),
            };
            let want = (s.after < final_last).then_some(s.after + 1);
            assert_eq!(first, want, "{} after {}: {}", s.tenant, s.after, s.reply);
            want.is_some()
        }
        Some("416") => {
            assert!(
                s.after > reply_last(),
                "{} after {}: {}",
                s.tenant,
                s.after,
                s.reply
            );
            false
        }
        // Unavailable: the event was still being published; clients retry.
        Some("503") => false,
        Some(code) => panic!("{} after {}: code {code}: {}", s.tenant, s.after, s.reply),
    }
}

/// The micro service's instance id (new for every pipeline run's service).
async fn service_id(nats: &async_nats::Client) -> Option<String> {
    let info = nats.request("$SRV.INFO.walcast", "".into()).await.ok()?;
    let info: Value = serde_json::from_slice(&info.payload).ok()?;
    info["id"].as_str().map(str::to_string)
}

/// Issue 16: the catch-up service runs on its own thread and connection, so
/// a flood of requests while the pipeline publishes neither stops nor
/// reorders it (the stream matches Postgres' own log one to one), and every
/// answer given meanwhile is right against the final stream. Timing is not
/// asserted here: `scripts/bench.sh --scenarios catchup_flood` measures it.
/// A new pipeline run starts a new service; a stopped daemon answers no more.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catchup_flood_leaves_the_pipeline_exact_and_answers_right() {
    let env = Env::start().await;
    let mut client = env.pg.client().await;
    let oracle = Oracle::create(&client).await;
    let daemon = Daemon::start(env.settings());
    let tenants = 5;
    let mut workload = Workload::new(Workload::seed(), tenants);
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let first_id = wait_for(Duration::from_secs(60), || service_id(&nats))
        .await
        .expect("the catch-up service registers once the pipeline runs");

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let flood: Vec<_> = (0..8)
        .map(|_| {
            tokio::spawn(flood_client(
                env.nats.url(),
                tenants,
                stop.clone(),
                answered.clone(),
            ))
        })
        .collect();
    // Rounds of writes, each followed by more answers: flood and pipeline overlap.
    for _ in 0..8 {
        workload.run(&mut client, 50).await;
        let before = answered.load(Ordering::SeqCst);
        wait_until(Duration::from_secs(60), || async {
            answered.load(Ordering::SeqCst) >= before + 200
        })
        .await
        .expect("catch-up keeps answering during the flood");
    }
    stop.store(true, Ordering::SeqCst);
    let mut seen = Vec::new();
    for client in futures::future::join_all(flood).await {
        seen.extend(client.expect("flood client"));
    }

    env.wait_caught_up(&client, Duration::from_secs(60)).await;
    let events = env.stream_events().await;
    let last = assert_stream_exact(&events);
    assert_matches_oracle(&events, &oracle.changes(&client).await);
    let js = jetstream::new(nats.clone());
    let stream = js.get_stream("WALCAST").await.unwrap();
    let mut started = 0;
    for s in &seen {
        started += usize::from(check_answer(&stream, &last, s).await);
    }
    eprintln!(
        "flood: {} start points answered, {} answers checked ({started} start points within the stream)",
        answered.load(Ordering::SeqCst),
        seen.len()
    );
    assert!(
        started > 100,
        "{started} of {} answers were start points",
        seen.len()
    );

    // A new run (the walsender is gone) has a new service, which answers right.
    client
        .execute(
            "SELECT pg_terminate_backend(active_pid) FROM pg_replication_slots WHERE slot_name = 'walcast'",
            &[],
        )
        .await
        .unwrap();
    wait_until(Duration::from_secs(60), || async {
        service_id(&nats).await.is_some_and(|id| id != first_id)
    })
    .await
    .expect("the next pipeline run registers a new catch-up service");
    let (tenant, &n) = last.iter().max_by_key(|(_, n)| **n).unwrap();
    replays_from(&nats, &js, tenant, n / 2, n, 5).await;

    daemon.stop().await.unwrap();
    // The service's thread and connection ended with the daemon. (A request
    // the server routed just before it saw the connection close gets no
    // answer at all: ask again.)
    wait_until(Duration::from_secs(30), || async {
        let asked = nats.request("walcast-api.v1.catchup", "{}".into());
        tokio::time::timeout(Duration::from_secs(1), asked)
            .await
            .is_ok_and(|r| r.is_err_and(|e| e.kind() == async_nats::RequestErrorKind::NoResponders))
    })
    .await
    .expect("no catch-up service once the daemon stopped");
}
