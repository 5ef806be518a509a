//! After a restart the index knows only each tenant's last seq (from the
//! checkpoint), so answers must search the stream: several message-block
//! loads in the nats-server each. This reads the stream's recent messages
//! once, headers only, in the background, and gives the index their exact
//! positions back. Answers stay correct meanwhile (they search); they only
//! get fast again when it is done.
//!
//! It runs on its own thread with its own NATS connection: on the pipeline's
//! thread and connection, millions of pushed messages would queue ahead of
//! the publisher's acks and the catch-up service's replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, push::OrderedConfig};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;

use super::index::{Index, MAX_EXACT_BYTES, Rebuilt};
use crate::config::Settings;
use crate::position::{StreamSeq, TenantSeq};

/// Messages read back at most: more than the exact positions can hold
/// (~2 bytes each within [`MAX_EXACT_BYTES`]) would be read for nothing.
pub const MAX_MESSAGES: u64 = (MAX_EXACT_BYTES / 2) as u64;

/// A rebuild in the background; stopped when dropped.
pub struct Rebuild {
    stop: Arc<AtomicBool>,
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts rebuilding `index` from stream messages up to `through`.
pub fn spawn(settings: Settings, index: Index, through: StreamSeq) -> Result<Rebuild, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("walcast-rebuild".into())
        .spawn(move || {
            // The machine's last choice for the CPU: reading back millions
            // of messages must never slow publishing or the catch-up answers
            // that meanwhile search the stream.
            crate::service_thread::lower_priority(19);
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => return tracing::warn!(error = %e, "no runtime for the catch-up index rebuild"),
            };
            let outcome = runtime.block_on(async {
                let client = crate::broker::connect_once(&settings, "walcast-catchup-rebuild")
                    .await
                    .map_err(|e| e.to_string())?;
                let stream = async_nats::jetstream::new(client.clone())
                    .get_stream(&settings.stream)
                    .await
                    .map_err(|e| format!("stream {}: {e}", settings.stream))?;
                rebuild(&client, &stream, &index, through, &stopped).await
            });
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "could not rebuild the catch-up index from the stream: answers search the stream instead (correct, slower)");
            }
        })
        .map_err(|e| format!("start the catch-up index rebuild: {e}"))?;
    Ok(Rebuild { stop })
}

/// Stream messages read by the first pass; each next one reads twice as
/// many, up to [`MAX_PASS`]. Passes go newest first, each merged as soon as
/// it is read: recent events (what reconnecting gateways ask for) are exact
/// again within a second of a restart, older ones follow.
const FIRST_PASS: u64 = 1 << 16;
const MAX_PASS: u64 = 1 << 21;

/// Reads stream messages up to `through` (those already in the stream when
/// this run started and not replayed by it) and merges their positions into
/// `index`. Returns the messages read.
async fn rebuild(
    client: &async_nats::Client,
    stream: &Stream,
    index: &Index,
    through: StreamSeq,
    stop: &AtomicBool,
) -> Result<u64, String> {
    let began = Instant::now();
    let mut stream_now = stream.clone();
    let state = &stream_now
        .info()
        .await
        .map_err(|e| format!("stream info: {e}"))?
        .state;
    // Not past the stream's end: a broker that lost messages may hold fewer.
    let through = through.0.min(state.last_sequence);
    let from = state
        .first_sequence
        .max(1)
        .max((through + 1).saturating_sub(MAX_MESSAGES));
    let mut read = 0;
    let mut hi = through;
    let mut pass = FIRST_PASS;
    while hi >= from && hi > 0 {
        let lo = from.max(hi.saturating_sub(pass - 1));
        pass = (pass * 2).min(MAX_PASS);
        match read_range(client, stream, lo, hi, stop).await? {
            Some((rebuilt, n)) => {
                index.merge_older(rebuilt);
                read += n;
            }
            None => return Ok(read), // the run ended; its index is gone
        }
        hi = lo - 1;
    }
    tracing::info!(
        messages = read,
        from,
        through,
        seconds = began.elapsed().as_secs_f64(),
        "catch-up index rebuilt from the stream"
    );
    Ok(read)
}

/// The positions of the tenant messages in `lo..=hi`, and how many messages
/// were read; `None` if stopped.
async fn read_range(
    client: &async_nats::Client,
    stream: &Stream,
    lo: u64,
    hi: u64,
    stop: &AtomicBool,
) -> Result<Option<(Rebuilt, u64)>, String> {
    let consumer = stream
        .create_consumer(OrderedConfig {
            // Pushed with flow control: several times faster than pulling.
            deliver_subject: client.new_inbox(),
            headers_only: true,
            deliver_policy: DeliverPolicy::ByStartSequence { start_sequence: lo },
            ..Default::default()
        })
        .await
        .map_err(|e| format!("create a consumer: {e}"))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| format!("read the stream: {e}"))?;
    let mut rebuilt = Rebuilt::default();
    let mut tenants: HashMap<String, Arc<str>> = HashMap::new();
    let mut read = 0u64;
    loop {
        let msg = match tokio::time::timeout(Duration::from_secs(30), messages.next()).await {
            Ok(Some(msg)) => msg.map_err(|e| format!("read the stream: {e}"))?,
            Ok(None) => return Err("the stream's consumer ended early".into()),
            Err(_) => return Err("no message from the stream for 30 s".into()),
        };
        let info = msg.info().map_err(|e| e.to_string())?;
        let (stream_seq, pending) = (info.stream_sequence, info.pending);
        if stream_seq > hi {
            break; // `hi` itself was removed from the stream
        }
        if let Some((tenant, seq)) = position(msg.headers.as_ref()) {
            let tenant = match tenants.get(tenant) {
                Some(t) => t.clone(),
                None => tenants
                    .entry(tenant.to_string())
                    .or_insert_with(|| Arc::from(tenant))
                    .clone(),
            };
            rebuilt.push(&tenant, TenantSeq(seq), StreamSeq(stream_seq));
        }
        read += 1;
        if read.is_multiple_of(4096) {
            rebuilt.bound(StreamSeq(stream_seq + 1));
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
        }
        if stream_seq == hi || pending == 0 {
            break;
        }
    }
    Ok(Some((rebuilt, read)))
}

/// A tenant message's `(tenant, seq)` from its headers.
fn position(headers: Option<&async_nats::HeaderMap>) -> Option<(&str, u64)> {
    let headers = headers?;
    let tenant = headers.get("Walcast-Tenant")?.as_str();
    let seq = headers.get("Walcast-Seq")?.as_str().parse().ok()?;
    Some((tenant, seq))
}
