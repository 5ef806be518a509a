//! The service thread (src/service_thread.rs) against a real nats-server:
//! a service answers on its own connection while its handle is held, stops
//! with its thread and connection when the handle is dropped, and a failing
//! service reports a typed error instead of panicking across threads.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::StreamExt;
use walcast::config::{Options, Settings};
use walcast::service_thread::{self, Ready, Service, ServiceError};

use crate::support::nats::Nats;
use crate::support::wait_until;

fn settings(nats: &Nats) -> Settings {
    Options {
        nats_url: Some(nats.url()),
        ..Default::default()
    }
    .resolve_nats_only()
    .expect("valid settings")
}

/// Sets a flag when dropped: tells the test the service's future is gone.
struct Gone(Arc<AtomicBool>);

impl Drop for Gone {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Answers "pong" on `subject`; how it ends is chosen by `fail`.
struct Echo {
    subject: String,
    fail: Option<&'static str>,
    gone: Arc<AtomicBool>,
}

impl Service for Echo {
    const NAME: &'static str = "echo";

    async fn serve(self, client: async_nats::Client, ready: Ready) -> Result<(), String> {
        let _gone = Gone(self.gone);
        if self.fail == Some("setup") {
            return Err("no endpoint for you".into());
        }
        let mut requests = client
            .subscribe(self.subject.clone())
            .await
            .map_err(|e| e.to_string())?;
        // A message to itself comes back once the server has the
        // subscription (a flush only writes it to the socket).
        client
            .publish(self.subject, "self".into())
            .await
            .map_err(|e| e.to_string())?;
        requests.next().await.ok_or("no message to itself")?;
        ready.serving();
        while let Some(request) = requests.next().await {
            if self.fail == Some("panic") {
                panic!("echo was asked");
            }
            if let Some(reply) = request.reply {
                let _ = client.publish(reply, "pong".into()).await;
            }
        }
        Err("subscription ended".into())
    }
}

fn echo(subject: &str, fail: Option<&'static str>) -> (Echo, Arc<AtomicBool>) {
    let gone = Arc::new(AtomicBool::new(false));
    let service = Echo {
        subject: subject.into(),
        fail,
        gone: gone.clone(),
    };
    (service, gone)
}

/// Whether a request on `subject` gets "no responders" (within a second:
/// a request routed just before the server saw a connection close gets no
/// answer at all).
async fn no_responders(client: &async_nats::Client, subject: &str) -> bool {
    let asked = client.request(subject.to_string(), "ping".into());
    tokio::time::timeout(Duration::from_secs(1), asked)
        .await
        .is_ok_and(|r| r.is_err_and(|e| e.kind() == async_nats::RequestErrorKind::NoResponders))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_answers_while_held_and_stops_with_its_handle() {
    let nats = Nats::start().expect("start nats");
    let client = async_nats::connect(nats.url()).await.unwrap();
    let (service, gone) = echo("echo.one", None);
    let handle = service_thread::start(&settings(&nats), service)
        .await
        .expect("the service starts");
    let reply = client.request("echo.one", "ping".into()).await.unwrap();
    assert_eq!(&reply.payload[..], b"pong");
    assert!(!gone.load(Ordering::SeqCst));
    drop(handle);
    // `drop` returns once the thread has ended, its service with it.
    assert!(
        gone.load(Ordering::SeqCst),
        "the service outlived its handle"
    );
    wait_until(Duration::from_secs(30), || {
        no_responders(&client, "echo.one")
    })
    .await
    .expect("nothing answers once the handle is dropped");
    // A new one starts on a new thread and connection.
    let (service, _) = echo("echo.one", None);
    let _handle = service_thread::start(&settings(&nats), service)
        .await
        .expect("a new service starts");
    let reply = client.request("echo.one", "ping".into()).await.unwrap();
    assert_eq!(&reply.payload[..], b"pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_service_is_a_typed_error_not_a_panic() {
    let nats = Nats::start().expect("start nats");
    let client = async_nats::connect(nats.url()).await.unwrap();

    let (service, _) = echo("echo.setup", Some("setup"));
    match service_thread::start(&settings(&nats), service).await {
        Err(ServiceError::Start { service, reason }) => {
            assert_eq!(service, "echo");
            assert_eq!(reason, "no endpoint for you");
        }
        Err(other) => panic!("expected a start error, got {other}"),
        Ok(_) => panic!("a service whose setup fails must not start"),
    }

    let (service, _) = echo("echo.panic", Some("panic"));
    let mut handle = service_thread::start(&settings(&nats), service)
        .await
        .expect("the service starts");
    // Any message makes it panic.
    client.publish("echo.panic", "ping".into()).await.unwrap();
    client.flush().await.unwrap();
    match handle.failed().await {
        ServiceError::Panicked { service, message } => {
            assert_eq!(service, "echo");
            assert_eq!(message, "echo was asked");
        }
        other => panic!("expected a panic report, got {other}"),
    }
}

/// Fails its first `failing` starts at setup, then answers like [`Echo`];
/// counts its starts. A copy serves each start.
#[derive(Clone)]
struct Flaky {
    subject: String,
    failing: u32,
    starts: Arc<std::sync::atomic::AtomicU32>,
}

impl Service for Flaky {
    const NAME: &'static str = "flaky";
    const FAIL_ON_DISCONNECT: bool = true;

    async fn serve(self, client: async_nats::Client, ready: Ready) -> Result<(), String> {
        let start = self.starts.fetch_add(1, Ordering::SeqCst) + 1;
        if start <= self.failing {
            return Err(format!("start {start} fails"));
        }
        let (echo, _) = echo(&self.subject, None);
        echo.serve(client, ready).await
    }
}

/// A restarting service is served again after each failure — a setup that
/// fails, its connection dropped by a nats-server restart — without its
/// holder seeing a failure, and still stops with its handle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarting_service_comes_back_after_failures_and_a_dropped_connection() {
    let nats = Nats::start().expect("start nats");
    let starts = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let service = Flaky {
        subject: "echo.flaky".into(),
        failing: 2,
        starts: starts.clone(),
    };
    let mut handle =
        service_thread::start_restarting(&settings(&nats), service).expect("the thread starts");
    let answers = |url: String| async move {
        let Ok(client) = async_nats::connect(url).await else {
            return false;
        };
        let asked = client.request("echo.flaky", "ping".into());
        matches!(
            tokio::time::timeout(Duration::from_secs(1), asked).await,
            Ok(Ok(reply)) if &reply.payload[..] == b"pong"
        )
    };
    wait_until(Duration::from_secs(30), || answers(nats.url()))
        .await
        .expect("the service answers after two failed starts");
    assert_eq!(starts.load(Ordering::SeqCst), 3);

    tokio::task::block_in_place(|| nats.stop()).expect("stop nats");
    tokio::task::block_in_place(|| nats.start_again()).expect("start nats");
    wait_until(Duration::from_secs(30), || answers(nats.url()))
        .await
        .expect("the service answers again after the nats-server restart");
    assert_eq!(
        starts.load(Ordering::SeqCst),
        4,
        "the dropped connection starts the service once more"
    );
    let failed = tokio::time::timeout(Duration::from_millis(500), handle.failed()).await;
    assert!(
        failed.is_err(),
        "a restarting service's holder sees no failure"
    );

    drop(handle);
    let client = async_nats::connect(nats.url()).await.unwrap();
    wait_until(Duration::from_secs(30), || {
        no_responders(&client, "echo.flaky")
    })
    .await
    .expect("nothing answers once the handle is dropped");
}
