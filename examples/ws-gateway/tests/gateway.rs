//! The example gateway driven by a real WebSocket client against real
//! PostgreSQL, nats-server and walcast (issue 9, "done when" 3): a browser's
//! view through a dropped connection and a gateway restart.

#[path = "../../../clients/rust/tests/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::Value;
use support::{Env, Nats, Postgres, Walcast, Writer};
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::{self, Message};

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A gateway running in this process; stopped (sockets closed) on `stop`.
struct Gateway {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Gateway {
    async fn start(env: &Env, addr: SocketAddr) -> Gateway {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .expect("bind the gateway");
        let addr = listener.local_addr().unwrap();
        let config = ws_gateway::Config {
            listen: addr,
            nats_url: env.nats.url(),
            tokens: HashMap::from([
                ("tokA".into(), "acme".into()),
                ("tokB".into(), "globex".into()),
            ]),
            walcast: walcast_client::Options {
                ahead_timeout: Duration::from_secs(1),
                ..Default::default()
            },
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(ws_gateway::serve(listener, config, async move {
            let _ = stopped.await;
        }));
        Gateway {
            addr,
            stop: Some(stop),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .expect("gateway stops within 10 s")
            .unwrap()
            .unwrap();
    }

    async fn connect(&self, query: &str) -> Result<Socket, tungstenite::Error> {
        let url = format!("ws://{}/ws?{query}", self.addr);
        tokio_tungstenite::connect_async(url)
            .await
            .map(|(socket, _)| socket)
    }
}

/// The next JSON message; None when the socket closed or stayed silent.
async fn next_json(socket: &mut Socket) -> Option<Value> {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(30), socket.next())
            .await
            .ok()??
            .ok()?;
        match msg {
            Message::Text(text) => return Some(serde_json::from_str(&text).expect("JSON message")),
            Message::Close(_) => return None,
            _ => continue,
        }
    }
}

/// Reads the hello, then `n` events; returns their (tenant, seq).
async fn read_events(
    socket: &mut Socket,
    n: usize,
    hello: Option<(&str, u64)>,
) -> Vec<(String, u64)> {
    if let Some((tenant, after)) = hello {
        let msg = next_json(socket).await.expect("hello");
        assert_eq!(msg["connected"]["tenantId"], tenant, "{msg}");
        assert_eq!(msg["connected"]["afterSeq"], after.to_string(), "{msg}");
    }
    let mut got = Vec::new();
    while got.len() < n {
        let msg = next_json(socket)
            .await
            .unwrap_or_else(|| panic!("socket ended after {got:?}"));
        // proto3 JSON: camelCase names, uint64 as strings, enum names.
        assert_eq!(msg["entity"], "ENTITY_TASK", "{msg}");
        assert!(msg["eventId"].is_string(), "{msg}");
        assert!(msg["commitTime"].as_str().unwrap().ends_with('Z'), "{msg}");
        let seq = msg["seq"]
            .as_str()
            .expect("seq as a string")
            .parse()
            .unwrap();
        got.push((msg["tenantId"].as_str().unwrap().to_string(), seq));
    }
    got
}

/// Reads a snapshot message: its `asOfSeq` and rows (ChangeEvent JSON).
async fn read_snapshot(socket: &mut Socket, tenant: &str) -> (u64, Vec<Value>) {
    let msg = next_json(socket).await.expect("snapshot");
    let snapshot = &msg["snapshot"];
    assert_eq!(snapshot["tenantId"], tenant, "{msg}");
    let as_of = snapshot["asOfSeq"]
        .as_str()
        .expect("asOfSeq")
        .parse()
        .unwrap();
    let rows = snapshot["rows"].as_array().expect("rows").clone();
    for row in &rows {
        assert_eq!(row["tenantId"], tenant, "{row}");
    }
    (as_of, rows)
}

/// The task titles of snapshot rows.
fn titles(rows: &[Value]) -> Vec<String> {
    let mut titles: Vec<String> = rows
        .iter()
        .filter_map(|row| row["task"]["title"].as_str().map(str::to_string))
        .collect();
    titles.sort();
    titles
}

/// Starts Postgres, NATS and walcast with rows that existed before walcast
/// ran: inserted, then the slot dropped and created again by `walcast
/// migrate`, so they have no event in the stream and reach a browser only
/// through walcast's backfill of the state bucket.
async fn env_with_rows_from_before_walcast() -> Env {
    let pg = Postgres::start().expect("start postgres");
    let nats = Nats::start(None).expect("start nats-server");
    let mut walcast = Walcast::migrated(&pg, &nats).expect("walcast migrate");
    let w = Writer::new(&pg).await;
    w.db.batch_execute(
        "INSERT INTO tasks (id, tenant_id, title) VALUES
           (gen_random_uuid(), 'acme', 'old acme task'),
           (gen_random_uuid(), 'globex', 'old globex task');
         SELECT pg_drop_replication_slot('walcast');",
    )
    .await
    .expect("rows from before walcast");
    walcast.migrate().expect("walcast migrate again");
    walcast.start_again().expect("start walcast");
    Env { walcast, nats, pg }
}

fn acme(seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
    seqs.map(|s| ("acme".to_string(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_resumes_from_its_last_seq_through_disconnects() {
    let env = env_with_rows_from_before_walcast().await;
    let mut w = Writer::new(&env.pg).await;
    let gateway = Gateway::start(&env, "127.0.0.1:0".parse().unwrap()).await;
    w.insert("acme", 10).await;
    w.insert("globex", 5).await;

    // The tenant comes from the token only: a `tenant` parameter is ignored.
    // A fresh page gets the tenant's rows first, from the state bucket: the
    // row from before walcast is in that first message.
    let mut browser = gateway
        .connect("token=tokA&after_seq=0&tenant=globex")
        .await
        .unwrap();
    let hello = next_json(&mut browser).await.expect("hello");
    assert_eq!(hello["connected"]["tenantId"], "acme", "{hello}");
    let (as_of, rows) = read_snapshot(&mut browser, "acme").await;
    assert!(
        titles(&rows).contains(&"old acme task".to_string()),
        "the row from before walcast is in the snapshot: {rows:?}"
    );
    assert!(as_of <= 10, "asOfSeq {as_of}");
    // Rows and the events after them: all 10 inserts, each once.
    assert_eq!(rows.len() as u64, 1 + as_of, "{rows:?}");
    assert_eq!(
        read_events(&mut browser, (10 - as_of) as usize, None).await,
        acme(as_of + 1..=10)
    );

    // The connection drops (no close handshake); events keep coming.
    drop(browser);
    w.insert("acme", 10).await;
    let mut browser = gateway.connect("token=tokA&after_seq=10").await.unwrap();
    assert_eq!(
        read_events(&mut browser, 10, Some(("acme", 10))).await,
        acme(11..=20)
    );

    // Live: an event committed now arrives on the open socket.
    w.insert("acme", 1).await;
    assert_eq!(read_events(&mut browser, 1, None).await, acme(21..=21));

    // The gateway restarts: the socket closes, the browser reconnects to the
    // new instance with its last seq and misses nothing written meanwhile.
    let addr = gateway.addr;
    gateway.stop().await;
    assert_eq!(next_json(&mut browser).await, None, "closed by the gateway");
    w.insert("acme", 5).await;
    let gateway = Gateway::start(&env, addr).await;
    let mut browser = gateway.connect("token=tokA&after_seq=21").await.unwrap();
    assert_eq!(
        read_events(&mut browser, 5, Some(("acme", 21))).await,
        acme(22..=26)
    );
    // And nothing else is pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(500), browser.next())
            .await
            .is_err()
    );
    browser.close(None).await.unwrap();

    // Another token, another tenant; Authorization header works too.
    let mut other = gateway.connect("token=tokB").await.unwrap();
    let hello = next_json(&mut other).await.expect("hello");
    assert_eq!(hello["connected"]["tenantId"], "globex", "{hello}");
    let (as_of, rows) = read_snapshot(&mut other, "globex").await;
    assert!(as_of <= 5, "asOfSeq {as_of}");
    assert_eq!(
        titles(&rows)
            .iter()
            .filter(|t| *t == "old globex task")
            .count(),
        1,
        "{rows:?}"
    );
    assert_eq!(rows.len() as u64, 1 + as_of, "{rows:?}");
    assert_eq!(
        read_events(&mut other, (5 - as_of) as usize, None).await,
        (as_of + 1..=5)
            .map(|s| ("globex".to_string(), s))
            .collect::<Vec<_>>()
    );
    let mut request =
        tungstenite::client::IntoClientRequest::into_client_request(format!("ws://{addr}/ws"))
            .unwrap();
    request
        .headers_mut()
        .insert("Authorization", "Bearer tokB".parse().unwrap());
    let (mut bearer, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    next_json(&mut bearer).await.expect("hello");
    let (as_of, rows) = read_snapshot(&mut bearer, "globex").await;
    assert_eq!(rows.len() as u64, 1 + as_of);

    // Unknown or missing token: refused before the upgrade.
    for query in ["token=nope", "", "token=tokA&after_seq=-1"] {
        match gateway.connect(query).await {
            Err(tungstenite::Error::Http(response)) => {
                assert!(
                    [400, 401].contains(&response.status().as_u16()),
                    "{query}: {}",
                    response.status()
                );
            }
            other => panic!(
                "{query}: expected an HTTP error, got {:?}",
                other.map(|_| ())
            ),
        }
    }

    // Too far behind: purge acme's seqs 1..=10, then a browser at seq 3 is
    // told to re-sync, gets the rows again from the state (no database),
    // and continues after them.
    let nats = async_nats::connect(env.nats.url()).await.unwrap();
    let reply = nats
        .request(
            "walcast-api.v1.catchup",
            r#"{"tenant_id":"acme","after_seq":10}"#.into(),
        )
        .await
        .unwrap();
    let cut = serde_json::from_slice::<Value>(&reply.payload).unwrap()["start_stream_seq"]
        .as_u64()
        .unwrap();
    let js = async_nats::jetstream::new(nats);
    js.get_stream("WALCAST")
        .await
        .unwrap()
        .purge()
        .filter("walcast.acme.>")
        .sequence(cut)
        .await
        .unwrap();
    let mut stale = gateway.connect("token=tokA&after_seq=3").await.unwrap();
    next_json(&mut stale).await.expect("hello");
    let resync = next_json(&mut stale).await.expect("resync");
    assert_eq!(resync["resync"]["reason"], "too_old", "{resync}");
    assert_eq!(resync["resync"]["oldestSeq"], "11", "{resync}");
    assert_eq!(resync["resync"]["lastSeq"], "26", "{resync}");
    let (as_of, rows) = read_snapshot(&mut stale, "acme").await;
    assert!((11..=26).contains(&as_of), "asOfSeq {as_of}");
    assert_eq!(
        rows.len() as u64,
        1 + as_of,
        "the inserts and the row from before walcast"
    );
    assert!(titles(&rows).contains(&"old acme task".to_string()));
    w.insert("acme", 1).await;
    assert_eq!(
        read_events(&mut stale, (27 - as_of) as usize, None).await,
        acme(as_of + 1..=27)
    );

    // A seq this stream never had (e.g. from before the stream was
    // re-created): re-sync too, the rows from the state, then live.
    let mut foreign = gateway.connect("token=tokA&after_seq=1000").await.unwrap();
    next_json(&mut foreign).await.expect("hello");
    let resync = next_json(&mut foreign).await.expect("resync");
    assert_eq!(resync["resync"]["reason"], "ahead", "{resync}");
    assert_eq!(resync["resync"]["lastSeq"], "27", "{resync}");
    let (as_of, rows) = read_snapshot(&mut foreign, "acme").await;
    assert!((11..=27).contains(&as_of), "asOfSeq {as_of}");
    assert_eq!(rows.len() as u64, 1 + as_of);
    w.insert("acme", 1).await;
    assert_eq!(
        read_events(&mut foreign, (28 - as_of) as usize, None).await,
        acme(as_of + 1..=28)
    );

    // The demo page.
    let mut http = tokio::net::TcpStream::connect(addr).await.unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut http, b"GET / HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut page = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut http, &mut page)
        .await
        .unwrap();
    assert!(
        page.starts_with("HTTP/1.0 200") || page.starts_with("HTTP/1.1 200"),
        "{page}"
    );
    assert!(page.contains("new WebSocket(") && page.contains("after_seq="));

    let _ = stale.send(Message::Close(None)).await;
    gateway.stop().await;
}
