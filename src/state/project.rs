//! The projection: reads the stream in order from where the bucket says it
//! stopped and writes each event to its row's key.
//!
//! Invariant owned here: keys are written in stream order, by one writer,
//! after the event is in the stream — so when the bucket holds an event of
//! seq `s` for a tenant, it holds every earlier event of that tenant too
//! (what makes a tenant's snapshot exact, docs/STATE.md).

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;

use super::layout::{self, Skip, Write};
use super::writer::Writer;
use crate::telemetry::metrics as m;

/// Projects the stream from `after + 1` on, forever (returning is failing).
pub async fn run(
    js: jetstream::Context,
    client: &async_nats::Client,
    stream: &Stream,
    bucket: &str,
    after: u64,
    applied: Arc<AtomicU64>,
) -> Result<(), String> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            deliver_subject: client.new_inbox(),
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: after + 1,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("read the stream for the state: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("read the stream for the state: {e}"))?;
    let mut writer = Writer::new(js, bucket, applied);
    let mut warned = [false; 2];
    loop {
        let msg = match tokio::time::timeout(Duration::from_millis(50), messages.next()).await {
            Ok(Some(msg)) => msg.map_err(|e| format!("read the stream for the state: {e}"))?,
            Ok(None) => return Err("the state's stream consumer ended".into()),
            // Idle: settle what is in flight, so the position moves on.
            Err(_) => {
                writer.flush().await?;
                continue;
            }
        };
        let position = msg
            .info()
            .map_err(|e| format!("a stream message without its position: {e}"))?
            .stream_sequence;
        let (subject, headers) = (msg.subject.as_str(), msg.headers.as_ref());
        match layout::write_for(subject, headers, &msg.payload) {
            Ok(write) => send(&mut writer, write, headers, &msg.payload, position).await?,
            Err(skip) => {
                skipped(skip, subject, &mut warned);
                writer.skip(position).await?;
            }
        }
    }
}

async fn send(
    writer: &mut Writer,
    write: Write,
    event_headers: Option<&async_nats::HeaderMap>,
    payload: &bytes::Bytes,
    position: u64,
) -> Result<(), String> {
    let header = |name| event_headers.and_then(|h| h.get(name)).map(|v| v.as_str());
    let seq = header(layout::SEQ)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut headers = layout::headers(seq, position);
    let (key, body) = match write {
        Write::Put(key) => {
            if let Some(object) = header(layout::OBJECT) {
                headers.insert(layout::OBJECT, object);
            }
            (key, payload.clone())
        }
        Write::Delete(key) => {
            headers.insert("KV-Operation", "DEL");
            (key, bytes::Bytes::new())
        }
    };
    writer.send(&key, headers, body, position).await?;
    metrics::counter!(m::STATE_WRITES).increment(1);
    Ok(())
}

/// Counts an event left out of the state; logs the first of each reason.
fn skipped(skip: Skip, subject: &str, warned: &mut [bool; 2]) {
    metrics::counter!(m::STATE_SKIPPED, "reason" => skip.label()).increment(1);
    let first = &mut warned[skip as usize];
    if skip == Skip::InvalidKey && !*first {
        *first = true;
        tracing::warn!(
            subject,
            "an event's row has no valid state key (its id holds characters a key cannot): it is in the stream, not in the state bucket; counted in walcast_state_skipped_total"
        );
    }
}
