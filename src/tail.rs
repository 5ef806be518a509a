//! `walcast tail`: a tenant's events from the stream, one proto3-JSON object
//! per line — the documented form for gateways that forward to browsers.

use std::io::Write;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use prost::Message as _;
use tokio::io::AsyncReadExt;

use crate::broker::ordered;
use crate::config::Settings;
use crate::events::tenant;
use crate::proto::ChangeEvent;

/// What to print.
#[derive(Debug, Clone, clap::Args)]
pub struct TailArgs {
    /// Tenant whose events to print (or give it as the first argument)
    #[arg(
        long = "tenant",
        value_name = "TENANT",
        required_unless_present = "tenant_arg",
        conflicts_with = "tenant_arg"
    )]
    tenant_flag: Option<String>,
    /// Tenant whose events to print (the same as --tenant)
    #[arg(value_name = "TENANT")]
    tenant_arg: Option<String>,
    /// Only this entity: task, project or lock
    #[arg(long, value_parser = ["task", "project", "lock"])]
    pub entity: Option<String>,
    /// Start at this seq of the tenant (default: the oldest in the stream)
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Keep printing new events as they arrive
    #[arg(long)]
    pub follow: bool,
    /// Print the tenant's current rows from the state bucket instead: each
    /// row's latest event (its `task`/`project`/`lock` is the row)
    #[arg(long, conflicts_with_all = ["follow", "from_seq"])]
    pub state: bool,
}

impl TailArgs {
    /// The tenant, from `--tenant` or the first argument (clap requires one).
    pub fn tenant(&self) -> &str {
        self.tenant_flag
            .as_deref()
            .or(self.tenant_arg.as_deref())
            .unwrap_or_default()
    }
}

/// Why `walcast tail` stopped.
#[derive(Debug, thiserror::Error)]
pub enum TailError {
    #[error("--tenant: {0}")]
    Tenant(String),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error("stream {stream} on NATS: {reason}")]
    Stream { stream: String, reason: String },
    #[error("reading the stream: {0}")]
    Read(String),
    #[error("stream message {seq} is not a walcast event: {reason}")]
    Event { seq: u64, reason: String },
    #[error("cannot write to standard output: {0}")]
    Output(#[from] std::io::Error),
}

fn read_err(e: impl std::fmt::Display) -> TailError {
    TailError::Read(e.to_string())
}

/// Prints the events; returns how many were printed.
pub async fn run(settings: &Settings, args: &TailArgs) -> Result<u64, TailError> {
    tenant::validate(Some(args.tenant())).map_err(|e| TailError::Tenant(e.reason().to_string()))?;
    let client = crate::broker::connect(settings).await?.client;
    let js = jetstream::new(client);
    if args.state {
        return state_rows(settings, &js, args).await;
    }
    let stream_err = |e: &dyn std::fmt::Display| TailError::Stream {
        stream: settings.stream.clone(),
        reason: e.to_string(),
    };
    let mut stream = js
        .get_stream(&settings.stream)
        .await
        .map_err(|e| stream_err(&e))?;
    let last = stream
        .info()
        .await
        .map_err(|e| stream_err(&e))?
        .state
        .last_sequence;
    let filter = match &args.entity {
        Some(entity) => format!("{}.{}.{entity}.*", settings.subject_prefix, args.tenant()),
        None => format!("{}.{}.>", settings.subject_prefix, args.tenant()),
    };
    let consumer = stream
        .create_consumer(ordered::with_short_heartbeats(
            consumer::pull::OrderedConfig {
                filter_subject: filter,
                ..Default::default()
            },
        ))
        .await
        .map_err(|e| stream_err(&e))?;
    let mut messages = consumer.messages().await.map_err(read_err)?;
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
        let msg = msg.map_err(read_err)?;
        let info = msg.info().map_err(read_err)?;
        let (stream_seq, pending) = (info.stream_sequence, info.pending);
        let event = event(&js, &msg, stream_seq).await?;
        if args.from_seq.is_none_or(|from| event.seq >= from) {
            let json = walcast_client::json::to_value(&event).map_err(|e| TailError::Event {
                seq: stream_seq,
                reason: e.to_string(),
            })?;
            writeln!(out, "{json}")?;
            printed += 1;
        }
        if !args.follow && (pending == 0 || stream_seq >= last) {
            break;
        }
    }
    out.flush()?;
    Ok(printed)
}

/// Prints the tenant's rows from the state bucket (deleted rows left out).
async fn state_rows(
    settings: &Settings,
    js: &jetstream::Context,
    args: &TailArgs,
) -> Result<u64, TailError> {
    let bucket = settings
        .state_bucket
        .as_deref()
        .ok_or_else(|| TailError::Stream {
            stream: "(state)".into(),
            reason: "the state is turned off (--state-bucket is empty)".into(),
        })?;
    let kv_stream = format!("KV_{bucket}");
    let stream_err = |e: &dyn std::fmt::Display| TailError::Stream {
        stream: kv_stream.clone(),
        reason: e.to_string(),
    };
    let mut stream = js
        .get_stream(&kv_stream)
        .await
        .map_err(|e| stream_err(&e))?;
    let entity = args
        .entity
        .as_deref()
        .map_or(">".to_string(), |e| format!("{e}.>"));
    let filter = format!("$KV.{bucket}.{}.{entity}", args.tenant());
    let info = stream.info().await.map_err(|e| stream_err(&e))?;
    if info.state.messages == 0 {
        return Ok(0);
    }
    let consumer = stream
        .create_consumer(ordered::with_short_heartbeats(
            consumer::pull::OrderedConfig {
                filter_subject: filter,
                deliver_policy: consumer::DeliverPolicy::LastPerSubject,
                ..Default::default()
            },
        ))
        .await
        .map_err(|e| stream_err(&e))?;
    if consumer.cached_info().num_pending == 0 {
        return Ok(0);
    }
    let mut messages = consumer.messages().await.map_err(read_err)?;
    let mut printed = 0;
    let mut out = std::io::stdout().lock();
    while let Ok(Some(msg)) = tokio::time::timeout(Duration::from_secs(2), messages.next()).await {
        let msg = msg.map_err(read_err)?;
        let info = msg.info().map_err(read_err)?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        let deleted = msg
            .headers
            .as_ref()
            .and_then(|h| h.get(crate::headers::KV_OPERATION))
            .is_some();
        if !deleted {
            let event = event(js, &msg, seq).await?;
            let json = walcast_client::json::to_value(&event).map_err(|e| TailError::Event {
                seq,
                reason: e.to_string(),
            })?;
            writeln!(out, "{json}")?;
            printed += 1;
        }
        if pending == 0 {
            break;
        }
    }
    out.flush()?;
    Ok(printed)
}

/// The message's event, fetched from the object store when oversized.
async fn event(
    js: &jetstream::Context,
    msg: &jetstream::Message,
    seq: u64,
) -> Result<ChangeEvent, TailError> {
    let bad = |reason: String| TailError::Event { seq, reason };
    let body = match msg
        .headers
        .as_ref()
        .and_then(|h| h.get(crate::headers::OBJECT))
    {
        Some(object) => fetch_object(js, object.as_str()).await.map_err(bad)?,
        None => msg.payload.to_vec(),
    };
    ChangeEvent::decode(body.as_slice()).map_err(|e| bad(e.to_string()))
}

/// Reads an oversized event from the object store (`<bucket>/<event_id>`).
async fn fetch_object(js: &jetstream::Context, object: &str) -> Result<Vec<u8>, String> {
    let (bucket, name) = object
        .split_once('/')
        .ok_or_else(|| format!("malformed Walcast-Object header {object:?}"))?;
    let store = js
        .get_object_store(bucket)
        .await
        .map_err(|e| format!("object store {bucket}: {e}"))?;
    let mut reader = store
        .get(name)
        .await
        .map_err(|e| format!("object {object}: {e}"))?;
    let mut body = Vec::new();
    reader
        .read_to_end(&mut body)
        .await
        .map_err(|e| format!("object {object}: {e}"))?;
    Ok(body)
}
