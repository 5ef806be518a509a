//! Benchmark receiver: the commit → receive time of every event, measured
//! by a process that does nothing else.
//!
//! Subscribes (core NATS) to `--subject` (default `walcast.>`), prints
//! `ready`, stamps each message with the wall clock as soon as async-nats
//! hands it over, and once no message came for `--idle` seconds (default 5)
//! after the first, decodes them and writes one JSON line per event:
//! `[commit_us, receive_us, "title"]` (the task's title). `bench/run.py
//! --latency-receiver rust` uses it instead of the harness's Python
//! subscriber, whose receive clock shares a GIL with the harness's other
//! threads.
//!
//! cargo run --release -p walcast-client --example latency_probe -- nats://127.0.0.1:4222

use std::io::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use prost::Message as _;
use walcast_client::proto::{ChangeEvent, change_event};

fn now_us() -> i64 {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

/// The event's commit time in µs since the epoch, and its task's title
/// (the harness matches events to pgbench's transactions by title).
fn commit_and_title(payload: &[u8]) -> Option<(i64, String)> {
    let event = ChangeEvent::decode(payload).ok()?;
    let ct = event.commit_time?;
    let title = match event.after {
        Some(change_event::After::Task(task)) => task.title,
        _ => String::new(),
    };
    Some((ct.seconds * 1_000_000 + i64::from(ct.nanos) / 1_000, title))
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let mut url = "nats://127.0.0.1:4222".to_string();
    let mut subject = "walcast.>".to_string();
    let mut idle = Duration::from_secs(5);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--subject" => subject = args.next().expect("a subject"),
            "--idle" => {
                idle = Duration::from_secs_f64(
                    args.next().and_then(|v| v.parse().ok()).expect("seconds"),
                )
            }
            other => url = other.to_string(),
        }
    }
    let nats = async_nats::connect(&url).await.expect("connect");
    let mut sub = nats.subscribe(subject).await.expect("subscribe");
    nats.flush().await.expect("flush");
    println!("ready");
    let mut samples: Vec<(i64, bytes::Bytes)> = Vec::with_capacity(1 << 20);
    loop {
        let next = if samples.is_empty() {
            sub.next().await
        } else {
            match tokio::time::timeout(idle, sub.next()).await {
                Ok(next) => next,
                Err(_) => break,
            }
        };
        let Some(msg) = next else { break };
        samples.push((now_us(), msg.payload)); // decoded after the run: nothing but the clock now
    }
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (received, payload) in samples {
        let (commit, title) = commit_and_title(&payload).unwrap_or((0, String::new()));
        let title = serde_json::to_string(&title).unwrap_or_else(|_| "\"\"".into());
        writeln!(out, "[{commit},{received},{title}]").expect("write");
    }
}
