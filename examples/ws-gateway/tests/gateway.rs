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
use support::{Env, Writer};
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

fn acme(seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, u64)> {
    seqs.map(|s| ("acme".to_string(), s)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn browser_resumes_from_its_last_seq_through_disconnects() {
    let env = Env::start(None);
    let mut w = Writer::new(&env.pg).await;
    let gateway = Gateway::start(&env, "127.0.0.1:0".parse().unwrap()).await;
    w.insert("acme", 10).await;
    w.insert("globex", 5).await;

    // The tenant comes from the token only: a `tenant` parameter is ignored.
    let mut browser = gateway
        .connect("token=tokA&after_seq=0&tenant=globex")
        .await
        .unwrap();
    assert_eq!(
        read_events(&mut browser, 10, Some(("acme", 0))).await,
        acme(1..=10)
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
    let got = read_events(&mut other, 5, Some(("globex", 0))).await;
    assert_eq!(
        got,
        (1..=5)
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
    assert_eq!(
        read_events(&mut bearer, 5, Some(("globex", 0))).await.len(),
        5
    );

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
    // told to re-sync and continues after the tenant's last seq.
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
    w.insert("acme", 1).await;
    assert_eq!(read_events(&mut stale, 1, None).await, acme(27..=27));

    // A seq this stream never had (e.g. from before the stream was
    // re-created): re-sync too, then live from the tenant's last seq.
    let mut foreign = gateway.connect("token=tokA&after_seq=1000").await.unwrap();
    next_json(&mut foreign).await.expect("hello");
    let resync = next_json(&mut foreign).await.expect("resync");
    assert_eq!(resync["resync"]["reason"], "ahead", "{resync}");
    assert_eq!(resync["resync"]["lastSeq"], "27", "{resync}");
    w.insert("acme", 1).await;
    assert_eq!(read_events(&mut foreign, 1, None).await, acme(28..=28));

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
