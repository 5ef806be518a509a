//! Catch-up service (SPEC §7): "tenant T after seq N" → where to start a
//! filtered JetStream consumer, answered inside `walcast run` as the NATS
//! micro service `walcast` on `<prefix>-api.v1.catchup` and on the
//! tenant-scoped `<prefix>-api.v1.catchup.<tenant>` (the body's tenant must
//! be the subject's).
//!
//! It runs only while this instance is the active replicator (started by the
//! pipeline once it holds the slot), so a standby never answers from stale
//! state, and on its own thread and NATS connection (`service_thread`), so
//! a flood of requests never queues ahead of the pipeline's work. See `index` for how positions are known without scanning a
//! tenant's history, and `lookup` for the answer's invariant.
//!
//! Restart: the publisher also hands the positions it records to a
//! `journal`, cut about once a second into `segment`s that a writer task
//! saves in Postgres (`saved`, `walcast.catchup_segments`) once they are
//! acknowledged; a restart loads them, reads back from the stream only the
//! short stretches they do not cover, and checks them against the stream
//! (`rebuild`). Nothing waits on a segment, and no answer depends on one
//! being written: without them the restart reads the stream back.

mod exact;
pub mod index;
mod info;
mod journal;
mod loading;
pub mod lookup;
mod rebuild;
pub mod saved;
pub(crate) mod segment;

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, stream::Stream};
use async_nats::service::ServiceExt;
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

pub use index::Index;
pub use journal::Journal;
use lookup::{Answer, Probe, StreamState};
pub use saved::Place;

use crate::config::Settings;
use crate::events::tenant;
use crate::position::{StreamSeq, TenantSeq};
use crate::service_thread::{self, Ready, Service, ServiceError, ServiceThread};

/// Requests answered at once; more wait.
const CONCURRENCY: usize = 64;

#[derive(Deserialize)]
struct Request {
    tenant_id: String,
    after_seq: u64,
}

#[derive(Serialize)]
struct Reply<'a> {
    stream: &'a str,
    filter_subject: String,
    start_stream_seq: u64,
    last_seq: u64,
}

/// A running service (and its index rebuild); stopped when dropped.
pub struct CatchupService {
    thread: ServiceThread,
    _rebuild: Option<rebuild::Rebuild>,
}

impl CatchupService {
    /// Completes only if the service stops on its own (see [`ServiceThread::failed`]).
    pub async fn failed(&mut self) -> ServiceError {
        self.thread.failed().await
    }
}

/// Shared by every request.
struct Ctx {
    stream: Stream,
    infos: info::Infos,
    stream_name: String,
    prefix: String,
    index: Index,
    loading: loading::Shared,
}

/// Registers the service on its own thread and connection (see
/// `service_thread` for why) and answers requests there. Stream messages up
/// to `rebuild_through` were published by an earlier run: their positions
/// are loaded from the segments saved at `saved` and read back into the
/// index in the background; `loaded` is sent (or dropped) once the saved
/// segments are read.
pub async fn start(
    settings: &Settings,
    index: Index,
    rebuild_through: StreamSeq,
    saved: Option<Place>,
    loaded: tokio::sync::oneshot::Sender<()>,
) -> Result<CatchupService, ServiceError> {
    let loading = loading::Shared::default();
    let service = Catchup {
        stream_name: settings.stream.clone(),
        prefix: settings.subject_prefix.clone(),
        index: index.clone(),
        loading: loading.clone(),
    };
    let thread = service_thread::start(settings, service).await?;
    let rebuild = match rebuild_through {
        StreamSeq(0) => None,
        through => rebuild::spawn(settings.clone(), index, through, saved, loaded, loading)
            .inspect_err(|e| tracing::warn!(error = %e, "catch-up answers search the stream instead (correct, slower)"))
            .ok(),
    };
    Ok(CatchupService {
        thread,
        _rebuild: rebuild,
    })
}

/// The catch-up service as it runs on its thread.
struct Catchup {
    stream_name: String,
    prefix: String,
    /// Written by the publisher on the pipeline's thread, read here.
    index: Index,
    /// The saved segments while a restart loads them.
    loading: loading::Shared,
}

impl Service for Catchup {
    const NAME: &'static str = "catchup";

    async fn serve(self, client: async_nats::Client, ready: Ready) -> Result<(), String> {
        let stream = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone())
            .get_stream(&self.stream_name)
            .await
            .map_err(|e| format!("stream {}: {e}", self.stream_name))?;
        let service = client
            .service_builder()
            .description(
                "walcast catch-up: where a tenant's events after a seq start in the stream",
            )
            .start("walcast", env!("CARGO_PKG_VERSION"))
            .await
            .map_err(|e| format!("register the catch-up service: {e}"))?;
        let group = service.group(format!("{}-api.v1", self.prefix));
        let shared = group
            .endpoint("catchup")
            .await
            .map_err(|e| format!("add the catch-up endpoint: {e}"))?;
        // SPEC §7: the tenant-scoped subject, so a broker permission can
        // confine a connection to its own tenant (§9).
        let scoped = group
            .endpoint_builder()
            .name("catchup-tenant")
            .add("catchup.*")
            .await
            .map_err(|e| format!("add the tenant-scoped catch-up endpoint: {e}"))?;
        let mut endpoint = futures::stream::select(shared, scoped);
        ready.serving();
        let ctx = Arc::new(Ctx {
            infos: info::Infos::spawn(stream.clone()),
            stream,
            stream_name: self.stream_name,
            prefix: self.prefix,
            index: self.index,
            loading: self.loading,
        });
        let permits = Arc::new(Semaphore::new(CONCURRENCY));
        while let Some(request) = endpoint.next().await {
            let permit = permits
                .clone()
                .acquire_owned()
                .await
                .map_err(|_| "the request limit closed".to_string())?;
            let ctx = ctx.clone();
            tokio::spawn(async move {
                respond(&ctx, request).await;
                drop(permit);
            });
        }
        Err("the catch-up endpoint's subscription ended".into())
    }
}

/// Answers one request, with the micro error headers for errors.
async fn respond(ctx: &Ctx, request: async_nats::service::Request) {
    let began = std::time::Instant::now();
    let scoped = subject_tenant(&ctx.prefix, &request.message.subject);
    let (body, error) = handle(ctx, scoped, &request.message.payload).await;
    let code = error.map_or("200", |(_, name)| name);
    metrics::counter!(crate::telemetry::metrics::CATCHUP_REQUESTS, "code" => code).increment(1);
    metrics::histogram!(crate::telemetry::metrics::CATCHUP_SECONDS)
        .record(began.elapsed().as_secs_f64());
    let mut headers = HeaderMap::new();
    if let Some((code, name)) = error {
        headers.insert("Nats-Service-Error-Code", code.to_string().as_str());
        headers.insert("Nats-Service-Error", name);
    }
    headers.insert("Content-Type", "application/json");
    if let Err(e) = request.respond_with_headers(Ok(body.into()), headers).await {
        tracing::debug!(error = %e, "catch-up reply not sent");
    }
}

/// The tenant of a request on `<prefix>-api.v1.catchup.<tenant>`; `None`
/// on the shared subject.
fn subject_tenant<'a>(prefix: &str, subject: &'a str) -> Option<&'a str> {
    subject
        .strip_prefix(prefix)?
        .strip_prefix("-api.v1.catchup.")
}

/// The JSON reply body and, for errors, `(code, name)` for the micro headers.
/// `scoped`: the tenant named by a tenant-scoped subject, which the body's
/// must match.
async fn handle(
    ctx: &Ctx,
    scoped: Option<&str>,
    payload: &[u8],
) -> (String, Option<(u16, &'static str)>) {
    let request = match parse(scoped, payload) {
        Ok(request) => request,
        Err(message) => {
            let body = serde_json::json!({"error": "bad_request", "message": message});
            return (body.to_string(), Some((400, "bad_request")));
        }
    };
    if !ctx.index.is_ready() {
        return (
            serde_json::json!({"error": "unavailable",
                "message": "walcast is replaying the events already in the stream after a restart; retry shortly"})
            .to_string(),
            Some((503, "unavailable")),
        );
    }
    let filter_subject = format!("{}.{}.>", ctx.prefix, request.tenant_id);
    let answer = search(ctx, &request, &filter_subject).await;
    render(ctx, filter_subject, answer)
}

/// The request, if it is well formed, names a valid tenant and, on a
/// tenant-scoped subject, the subject's tenant; else why not.
fn parse(scoped: Option<&str>, payload: &[u8]) -> Result<Request, String> {
    let request: Request = serde_json::from_slice(payload)
        .map_err(|e| format!("expected {{\"tenant_id\": string, \"after_seq\": number}}: {e}"))?;
    if let Err(invalid) = tenant::validate(Some(&request.tenant_id)) {
        return Err(invalid.reason().to_string());
    }
    if let Some(subject_tenant) = scoped.filter(|t| *t != request.tenant_id) {
        return Err(format!(
            "tenant_id {:?} is not the subject's tenant {subject_tenant:?}",
            request.tenant_id
        ));
    }
    Ok(request)
}

/// Where the tenant's events after `after_seq` start; an event still in
/// flight (sent, not yet in the stream) is waited for, up to ~0.5 s.
async fn search(ctx: &Ctx, request: &Request, filter_subject: &str) -> Result<Answer, String> {
    let nearby = DirectGet {
        stream: &ctx.stream,
        filter: filter_subject,
    };
    let leader = LeaderGet {
        stream: &ctx.stream,
        filter: filter_subject,
    };
    let mut answer = Err("not attempted".to_string());
    for _ in 0..20 {
        let target = TenantSeq(request.after_seq.saturating_add(1));
        answer = match stream_state(ctx, &request.tenant_id, target).await {
            Ok((state, mut known)) => {
                if let Some(known) = known.as_mut() {
                    find_saved(ctx, &request.tenant_id, target, known).await;
                }
                let after = TenantSeq(request.after_seq);
                lookup::answer_confirmed(&nearby, &leader, known.as_ref(), after, state).await
            }
            Err(e) => Err(e),
        };
        if !matches!(answer, Ok(Answer::InFlight)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    answer
}

/// While a restart loads the saved segments, an event the index does not
/// know exactly yet may be found in them (`loading`): faster than
/// searching the stream, even when the position must be read back.
async fn find_saved(ctx: &Ctx, tenant: &str, target: TenantSeq, known: &mut index::Known) {
    if known.exact.is_some() || target > known.last_seq {
        return;
    }
    let Some(loading) = ctx.loading.current() else {
        return;
    };
    let last = (known.last_stream_seq, known.last_seq);
    let Some(at) = loading.find(tenant, target, last).await else {
        return;
    };
    // Until the segments' ends are checked, this answer is read back.
    if loading.is_trusted()
        || rebuild::check(&ctx.stream, tenant, target, at)
            .await
            .is_ok()
    {
        known.exact = Some(at);
    }
}

/// The reply's body and, for an error, its status code and name.
fn render(
    ctx: &Ctx,
    filter_subject: String,
    answer: Result<Answer, String>,
) -> (String, Option<(u16, &'static str)>) {
    match answer {
        Ok(Answer::Start { start_stream_seq, last_seq }) => {
            let reply = Reply {
                stream: &ctx.stream_name,
                filter_subject,
                start_stream_seq: start_stream_seq.0,
                last_seq: last_seq.0,
            };
            (serde_json::to_string(&reply).unwrap_or_default(), None)
        }
        Ok(Answer::TooOld { oldest_seq, last_seq }) => (
            serde_json::json!({"error": "too_old", "oldest_seq": oldest_seq.0, "last_seq": last_seq.0,
                "message": "events after after_seq are no longer in the stream: re-sync from the database"})
            .to_string(),
            Some((410, "too_old")),
        ),
        Ok(Answer::Ahead { last_seq }) => (
            serde_json::json!({"error": "ahead", "last_seq": last_seq.0,
                "message": "after_seq is beyond the tenant's last published seq"})
            .to_string(),
            Some((416, "ahead")),
        ),
        Ok(Answer::InFlight) | Err(_) => (
            serde_json::json!({"error": "unavailable", "message": answer.err().unwrap_or_else(|| "event still in flight".into())})
                .to_string(),
            Some((503, "unavailable")),
        ),
    }
}

/// The stream's state (read after the request arrived, see `info`), then
/// what the index knows about the tenant's event `target`. The stream is
/// read first: everything in it was recorded in the index before it was
/// sent, so the index is never behind it.
async fn stream_state(
    ctx: &Ctx,
    tenant: &str,
    target: TenantSeq,
) -> Result<(StreamState, Option<index::Known>), String> {
    let counts = ctx.infos.read().await?;
    let (first_seq, last_seq) = (counts.first_seq.max(1), counts.last_seq);
    let (known, next_seq) = ctx
        .index
        .known_with_next(tenant, target, StreamSeq(last_seq));
    let state = StreamState {
        first_seq: StreamSeq(first_seq),
        last_seq: StreamSeq(last_seq),
        next_seq,
        contiguous: counts.messages == (last_seq + 1).saturating_sub(first_seq),
    };
    Ok((state, known))
}

/// Probes with JetStream direct gets (`next_by_subj`), one request each,
/// answered by the nearest replica (on a cluster: maybe a lagging one).
struct DirectGet<'a> {
    stream: &'a Stream,
    filter: &'a str,
}

impl Probe for DirectGet<'_> {
    async fn next_at(&self, from: StreamSeq) -> Result<Option<(StreamSeq, TenantSeq)>, String> {
        match self
            .stream
            .direct_get_next_for_subject(self.filter, Some(from.0))
            .await
        {
            Ok(msg) => position_of(msg.sequence, &msg.headers).map(Some),
            Err(e) if e.kind() == jetstream::stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(format!("direct get: {e}")),
        }
    }
}

/// Probes through the stream leader (`STREAM.MSG.GET`, `next_by_subj`):
/// slower, never behind; asked before a client is told `too_old`, and by
/// `pipeline::retention` for a tenant's oldest event left.
pub(crate) struct LeaderGet<'a> {
    pub stream: &'a Stream,
    pub filter: &'a str,
}

impl Probe for LeaderGet<'_> {
    async fn next_at(&self, from: StreamSeq) -> Result<Option<(StreamSeq, TenantSeq)>, String> {
        match self
            .stream
            .get_first_raw_message_by_subject(self.filter, from.0)
            .await
        {
            Ok(msg) => position_of(msg.sequence, &msg.headers).map(Some),
            Err(e) if e.kind() == jetstream::stream::LastRawMessageErrorKind::NoMessageFound => {
                Ok(None)
            }
            Err(e) => Err(format!("read the stream's leader: {e}")),
        }
    }
}

/// A tenant's message as `(stream seq, tenant seq)`.
fn position_of(sequence: u64, headers: &HeaderMap) -> Result<(StreamSeq, TenantSeq), String> {
    let seq = headers
        .get(crate::headers::SEQ)
        .and_then(|v| v.as_str().parse().ok())
        .ok_or_else(|| format!("stream message {sequence} has no Walcast-Seq header"))?;
    Ok((StreamSeq(sequence), TenantSeq(seq)))
}
