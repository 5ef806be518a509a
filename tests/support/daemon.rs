//! walcast-specific helpers: an environment (Postgres + NATS + migrations),
//! the daemon in-process or as a child process, and reading the stream back.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream;
use futures::StreamExt;
use prost::Message as _;
use tokio::sync::oneshot;
use walcast::config::{Options, Settings};
use walcast::proto::ChangeEvent;

use super::nats::Nats;
use super::postgres::Postgres;

/// Logs from in-process daemons go to the test's captured output.
pub fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("walcast=info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}

/// A throwaway Postgres (migrated) and NATS for one test.
pub struct Env {
    pub pg: Postgres,
    pub nats: Nats,
}

impl Env {
    pub async fn start() -> Env {
        Self::start_on(
            Postgres::start().expect("start postgres"),
            super::nats::NatsOptions::default(),
        )
        .await
    }

    /// Like [`Env::start`], with a nats-server configured by `nats`.
    pub async fn start_with(nats: super::nats::NatsOptions) -> Env {
        Self::start_on(Postgres::start().expect("start postgres"), nats).await
    }

    /// An environment on a Postgres the test started (another version, other
    /// settings) and a nats-server configured by `nats`, migrated like
    /// [`Env::start`].
    pub async fn start_on(pg: Postgres, nats: super::nats::NatsOptions) -> Env {
        init_logging();
        let nats = Nats::start_with(nats).expect("start nats");
        let env = Env { pg, nats };
        walcast::migrate::run(&env.settings())
            .await
            .expect("walcast migrate");
        env
    }

    /// Options as a user would pass them, with no confirm delay so tests see
    /// the slot advance at once.
    pub fn options(&self) -> Options {
        Options {
            database_url: Some(self.pg.url()),
            nats_url: Some(self.nats.url()),
            confirm_delay: Some("0".into()),
            http_addr: Some(format!("127.0.0.1:{}", super::free_port())),
            ..Default::default()
        }
    }

    pub fn settings(&self) -> Settings {
        self.options().resolve().expect("valid test settings")
    }

    /// Environment variables that configure the walcast binary the same way.
    pub fn env_vars(&self) -> Vec<(String, String)> {
        vec![
            ("WALCAST_DATABASE_URL".into(), self.pg.url()),
            ("WALCAST_NATS_URL".into(), self.nats.url()),
            ("WALCAST_CONFIRM_DELAY".into(), "0".into()),
            (
                "WALCAST_HTTP_ADDR".into(),
                format!("127.0.0.1:{}", super::free_port()),
            ),
        ]
    }

    pub async fn stream_events(&self) -> Vec<StreamEvent> {
        read_stream(&self.nats.url(), "WALCAST").await
    }

    /// Waits until walcast has confirmed everything written so far: the slot's
    /// confirmed LSN reaches the current WAL position (needs confirm delay 0).
    pub async fn wait_caught_up(&self, client: &tokio_postgres::Client, timeout: Duration) {
        super::chaos::catch_up(client, timeout)
            .await
            .unwrap_or_else(|e| panic!("walcast did not catch up: {e}"));
    }

    /// Waits until the stream holds at least `count` messages.
    pub async fn wait_for_messages(&self, count: u64, timeout: Duration) {
        let url = self.nats.url();
        super::wait_until(timeout, || {
            let url = url.clone();
            async move { stream_last_seq(&url, "WALCAST").await >= count }
        })
        .await
        .unwrap_or_else(|e| panic!("stream never reached {count} messages: {e}"));
    }
}

/// The daemon running in this process (`app::run`), stopped like SIGTERM would.
pub struct Daemon {
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<Result<(), walcast::app::AppError>>,
}

impl Daemon {
    pub fn start(settings: Settings) -> Daemon {
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(walcast::app::run(settings, async move {
            let _ = stopped.await;
        }));
        Daemon {
            stop: Some(stop),
            handle,
        }
    }

    /// Graceful stop; returns the daemon's result.
    pub async fn stop(mut self) -> Result<(), walcast::app::AppError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(20), &mut self.handle)
            .await
            .expect("daemon stops within 20 s")
            .expect("daemon task did not panic")
    }
}

/// One stream message, decoded.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub stream_seq: u64,
    pub subject: String,
    pub headers: HashMap<String, String>,
    pub event: ChangeEvent,
}

impl StreamEvent {
    /// Whether walcast published it: a message it did not publish (a copy
    /// a tenant user made the server store, one published by hand) has
    /// another subject or no `Nats-Msg-Id` naming its own event.
    pub fn is_walcasts(&self) -> bool {
        self.subject.starts_with("walcast.")
            && self.headers.get("Nats-Msg-Id") == Some(&self.event.event_id)
    }
}

pub async fn stream_last_seq(nats_url: &str, stream: &str) -> u64 {
    let Ok(client) = async_nats::connect(nats_url).await else {
        return 0;
    };
    let js = jetstream::new(client);
    match js.get_stream(stream).await {
        Ok(mut s) => s.info().await.map(|i| i.state.last_sequence).unwrap_or(0),
        Err(_) => 0,
    }
}

/// Every message of the stream, in stream order.
pub async fn read_stream(nats_url: &str, stream: &str) -> Vec<StreamEvent> {
    let client = async_nats::connect(nats_url)
        .await
        .expect("connect to nats");
    read_stream_as(client, stream).await
}

/// [`read_stream`] over a connection of the caller's (a server with users).
pub async fn read_stream_as(client: async_nats::Client, stream: &str) -> Vec<StreamEvent> {
    let js = jetstream::new(client);
    let mut stream = js.get_stream(stream).await.expect("stream exists");
    let last = stream
        .info()
        .await
        .expect("stream info")
        .state
        .last_sequence;
    let mut out = Vec::new();
    if last == 0 {
        return out;
    }
    let mut next = 1;
    let mut stalls = 0;
    let mut messages = ordered_messages(&stream, next).await;
    loop {
        let msg = match tokio::time::timeout(READ_STALL, messages.next()).await {
            Ok(Some(msg)) => msg.expect("stream message"),
            Ok(None) => break,
            // On a cluster whose node just came back, the consumer can sit
            // on a replica that is still catching up (seen in CI: 10 s of
            // nothing after the cluster test's last restart): read on from
            // the next position with a new consumer, as walcast's own
            // reads do.
            Err(_) if stalls < READ_STALLS => {
                stalls += 1;
                eprintln!(
                    "stream read stalled {READ_STALL:?} before position {next}; reading on with a new consumer"
                );
                messages = ordered_messages(&stream, next).await;
                continue;
            }
            Err(_) => panic!("stream read stalled {READ_STALLS} times before position {next}"),
        };
        let stream_seq = msg.info().expect("message info").stream_sequence;
        next = stream_seq + 1;
        let headers = header_map(msg.headers.as_ref());
        let payload = match headers.get("Walcast-Object") {
            Some(object) => fetch_object(&js, object).await,
            None => msg.payload.to_vec(),
        };
        let event = ChangeEvent::decode(payload.as_slice()).expect("payload is a ChangeEvent");
        out.push(StreamEvent {
            stream_seq,
            subject: msg.subject.to_string(),
            headers,
            event,
        });
        if stream_seq >= last {
            break;
        }
    }
    out
}

/// How long a stream read waits for its next message before it reads on
/// with a new consumer, and how many times it does.
const READ_STALL: Duration = Duration::from_secs(10);
const READ_STALLS: u32 = 3;

/// An ordered read of `stream` from position `start`. On a cluster that
/// just lost a node the server may place the consumer there and never
/// answer the create (seen in CI: `TimedOut` a second after a kill -9):
/// each attempt is a new consumer, as walcast's own reads do
/// (vendor/README.md).
async fn ordered_messages(
    stream: &jetstream::stream::Stream,
    start: u64,
) -> jetstream::consumer::pull::Ordered {
    let config = jetstream::consumer::pull::OrderedConfig {
        deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
            start_sequence: start,
        },
        ..Default::default()
    };
    let mut attempts = 0;
    loop {
        attempts += 1;
        match stream.create_consumer(config.clone()).await {
            Ok(consumer) => return consumer.messages().await.expect("consume"),
            Err(e) if attempts < 5 => eprintln!("creating an ordered consumer failed ({e}); again"),
            Err(e) => panic!("ordered consumer, {attempts} attempts: {e}"),
        }
    }
}

/// A message's headers, first value of each.
pub fn header_map(headers: Option<&async_nats::HeaderMap>) -> HashMap<String, String> {
    headers
        .map(|h| {
            h.iter()
                .map(|(k, v)| {
                    (
                        k.to_string(),
                        v.first().map(|v| v.to_string()).unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Reads an oversized event from `<bucket>/<event_id>` (SPEC §3).
pub async fn fetch_object(js: &jetstream::Context, object: &str) -> Vec<u8> {
    try_fetch_object(js, object)
        .await
        .unwrap_or_else(|| panic!("oversized object {object} exists"))
}

/// An object's body; `None` if it does not exist (any more).
pub async fn try_fetch_object(js: &jetstream::Context, object: &str) -> Option<Vec<u8>> {
    use async_nats::jetstream::object_store::GetErrorKind;
    use tokio::io::AsyncReadExt;
    let (bucket, name) = object
        .split_once('/')
        .expect("Walcast-Object is <bucket>/<name>");
    let store = js
        .get_object_store(bucket)
        .await
        .expect("oversized bucket exists");
    let mut reader = match store.get(name).await {
        Err(e) if e.kind() == GetErrorKind::NotFound => return None,
        result => result.expect("read an oversized object"),
    };
    let mut out = Vec::new();
    reader
        .read_to_end(&mut out)
        .await
        .expect("read oversized object");
    Some(out)
}
