//! `walcast tail`: a tenant's events from the stream, one proto3-JSON object
//! per line — the documented form for gateways that forward to browsers.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::AsyncReadExt;

use crate::config::Settings;
use crate::events::tenant;
use crate::proto::ChangeEvent;

/// What to print.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Tenant whose events to print
    #[arg(long)]
    pub tenant: String,
    /// Only this entity: task, project or lock
    #[arg(long, value_parser = ["task", "project", "lock"])]
    pub entity: Option<String>,
    /// Start at this seq of the tenant (default: the oldest in the stream)
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Keep printing new events as they arrive
    #[arg(long)]
    pub follow: bool,
}

/// Prints the events; returns how many were printed.
pub async fn run(settings: &Settings, args: &TailArgs) -> anyhow::Result<u64> {
    tenant::validate(Some(&args.tenant))
        .map_err(|e| anyhow::anyhow!("--tenant: {}", e.reason()))?;
    let client = crate::broker::connect(settings).await?.client;
    let js = jetstream::new(client);
    let mut stream = js
        .get_stream(&settings.stream)
        .await
        .map_err(|e| anyhow::anyhow!("stream {} not found on NATS: {e}", settings.stream))?;
    let last = stream.info().await?.state.last_sequence;
    let filter = match &args.entity {
        Some(entity) => format!("{}.{}.{entity}.*", settings.subject_prefix, args.tenant),
        None => format!("{}.{}.>", settings.subject_prefix, args.tenant),
    };
    let consumer = stream
        .create_consumer(consumer::pull::OrderedConfig {
            filter_subject: filter,
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut printed = 0;
    let mut out = std::io::stdout().lock();
    if last == 0 && !args.follow {
        return Ok(0);
    }
    loop {
        let next = if args.follow {
            messages.next().await
        } else {
            match tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
                Ok(next) => next,
                Err(_) => break, // nothing more for this tenant
            }
        };
        let Some(msg) = next else { break };
        let msg = msg?;
        let info = msg.info().map_err(anyhow::Error::msg)?;
        let (stream_seq, pending) = (info.stream_sequence, info.pending);
        let body = match msg.headers.as_ref().and_then(|h| h.get("Walcast-Object")) {
            Some(object) => fetch_object(&js, object.as_str()).await?,
            None => msg.payload.to_vec(),
        };
        let event = ChangeEvent::decode(body.as_slice())?;
        if args.from_seq.is_none_or(|from| event.seq >= from) {
            writeln!(out, "{}", walcast_client::json::to_value(&event)?)?;
            printed += 1;
        }
        if !args.follow && (pending == 0 || stream_seq >= last) {
            break;
        }
    }
    out.flush()?;
    Ok(printed)
}

/// Reads an oversized event from the object store (`<bucket>/<event_id>`).
async fn fetch_object(js: &jetstream::Context, object: &str) -> anyhow::Result<Vec<u8>> {
    let (bucket, name) = object
        .split_once('/')
        .ok_or_else(|| anyhow::anyhow!("malformed Walcast-Object header {object:?}"))?;
    let store = js.get_object_store(bucket).await?;
    let mut reader = store.get(name).await?;
    let mut body = Vec::new();
    reader.read_to_end(&mut body).await?;
    Ok(body)
}
