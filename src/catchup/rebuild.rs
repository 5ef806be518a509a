//! After a restart the index knows only each tenant's last seq (from the
//! checkpoint). This thread gives it back the exact positions of the
//! events already in the stream, in two steps:
//!
//! 1. Load (at normal priority, a few seconds at most): the saved segments
//!    (`saved`), plus the short stretches no segment covers read back from
//!    the stream (the tail not yet saved when the last run stopped, and any
//!    segment the writer dropped), in stream order, checked against the
//!    stream, merged in one go. From then on answers about those events
//!    come from memory.
//! 2. Read back (nice 19, in the background): what is older than the
//!    segments, up to what the index can hold, newest first. With no
//!    segment (first start after an upgrade, the table missing, segments
//!    that disagree with the stream) that is everything: 10M messages take
//!    about two minutes.
//!
//! Answers stay correct meanwhile (they search the stream); they only get
//! fast again when the positions are in.
//!
//! It runs on its own thread with its own NATS connection: on the pipeline's
//! thread and connection, millions of pushed messages would queue ahead of
//! the publisher's acks and the catch-up service's replies.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use async_nats::jetstream::stream::Stream;

use tokio::sync::oneshot;

use super::index::{Index, MAX_EXACT_BYTES, Rebuilt};
use super::loading::{self, Loading};
use super::saved::{self, Loaded, Part, Place};
use super::segment;
use crate::broker::range::HeadersRead;
use crate::config::Settings;
use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::metrics as m;

/// Messages read back at most: more than the exact positions can hold
/// (~1.5 bytes each within [`MAX_EXACT_BYTES`]) would be read for nothing.
pub const MAX_MESSAGES: u64 = (MAX_EXACT_BYTES / 3 * 2) as u64;

/// Messages the load step reads back at most (between and after saved
/// segments); beyond, older segments are left out and read back later.
pub const MAX_LOAD_READ_BACK: u64 = 1 << 18;

/// A rebuild in the background; stopped when dropped.
pub struct Rebuild {
    stop: Arc<AtomicBool>,
}

impl Drop for Rebuild {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts rebuilding `index` from saved segments (at `saved`) and stream
/// messages up to `through`; `loaded` is sent (or dropped) once the saved
/// segments are read, so this run's writer may cut them.
pub fn spawn(
    settings: Settings,
    index: Index,
    through: StreamSeq,
    saved: Option<Place>,
    loaded: oneshot::Sender<()>,
    loading: loading::Shared,
) -> Result<Rebuild, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    std::thread::Builder::new()
        .name("walcast-rebuild".into())
        .spawn(move || {
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
                let mut stream = async_nats::jetstream::new(client.clone())
                    .get_stream(&settings.stream)
                    .await
                    .map_err(|e| format!("stream {}: {e}", settings.stream))?;
                let state = stream
                    .info()
                    .await
                    .map_err(|e| format!("stream info: {e}"))?
                    .state
                    .clone();
                // Not past the stream's end: a broker that lost messages may hold fewer.
                let through = StreamSeq(through.0.min(state.last_sequence));
                let first_seq = StreamSeq(state.first_sequence.max(1));
                let loaded_from = match saved {
                    Some(place) => load(&client, &stream, (&index, &loading), &place, (first_seq, through), &stopped)
                        .await
                        .unwrap_or_else(|e| {
                            tracing::warn!("{e}");
                            None
                        }),
                    None => None,
                };
                drop(loaded);
                // The machine's last choice for the CPU from here: reading
                // back millions of messages must never slow publishing or
                // the catch-up answers that meanwhile search the stream.
                crate::service_thread::lower_priority(19);
                let (older, budget) = match loaded_from {
                    Some(from) => (from.prev(), MAX_MESSAGES.saturating_sub(through - from.prev())),
                    None => (through, MAX_MESSAGES),
                };
                rebuild(&client, &stream, &index, older, budget, &stopped).await
            });
            if let Err(e) = outcome {
                tracing::warn!(error = %e, "could not rebuild the catch-up index from the stream: answers search the stream instead (correct, slower)");
            }
        })
        .map_err(|e| format!("start the catch-up index rebuild: {e}"))?;
    Ok(Rebuild { stop })
}

/// Step 1 (see the module docs): loads the saved segments and the
/// stretches between and after them, checks them against the stream and
/// merges them. Returns the oldest stream sequence covered, `None` if
/// nothing was loaded (then the read-back does it all).
async fn load(
    client: &async_nats::Client,
    stream: &Stream,
    (index, loading): (&Index, &loading::Shared),
    place: &Place,
    (first_seq, through): (StreamSeq, StreamSeq),
    stop: &AtomicBool,
) -> Result<Option<StreamSeq>, String> {
    let mut g = Gathered {
        loaded: Loaded {
            began: Some(Instant::now()),
            ..Default::default()
        },
        ..Default::default()
    };
    let db = place.db.connect().await.map_err(unusable)?;
    let listed = saved::list(&db, place, first_seq, through)
        .await
        .map_err(unusable)?;
    let plan = saved::plan(
        &listed,
        first_seq,
        through,
        saved::MAX_SAVED_BYTES as u64,
        MAX_LOAD_READ_BACK,
    );
    if plan.parts.is_empty() {
        tracing::info!(
            segments = listed.len(),
            through = through.0,
            "no saved catch-up positions to load: reading the stream back"
        );
        return Ok(None);
    }
    // Answers may use the segments while they load (each read back until
    // the segments' ends agree with the stream); withdrawn when this returns.
    let (published, _withdrawn_on_return) =
        loading.publish(Loading::new(place.clone(), &plan, &listed, first_seq));
    crate::failpoint::hold_point("index_trust").await;
    if trust(stream, &db, &published).await {
        published.trust();
    } else {
        loading.withdraw();
    }
    crate::failpoint::hold_point("index_load").await;
    for part in &plan.parts {
        match *part {
            Part::Saved { first, last } => {
                let data = saved::fetch(&db, place, first).await.map_err(unusable)?;
                g.take_segment(&data, first, first.max(first_seq), last);
            }
            Part::ReadBack { from, to } => {
                let read = read_range(
                    client,
                    stream,
                    from.0,
                    to.0,
                    stop,
                    &mut g.rebuilt,
                    &mut g.tenants,
                );
                match read.await? {
                    Some(n) => g.loaded.read_back += n,
                    None => return Ok(None), // the run ended
                }
            }
        }
    }
    // Checked already when the same ends were published to answers.
    if !published.is_trusted() && !trusted(stream, &db, place, [&g.newest, &g.oldest]).await {
        return Ok(None);
    }
    index.merge_older(g.rebuilt);
    report(&g.loaded, plan.from, through);
    Ok(Some(plan.from))
}

/// A loaded position: tenant, seq, stream sequence.
type Position = (Arc<str>, TenantSeq, StreamSeq);

/// What a load has gathered, not trusted yet.
#[derive(Default)]
struct Gathered {
    rebuilt: Rebuilt,
    tenants: Tenants,
    /// The newest and the oldest position taken from segments, checked
    /// against the stream before any is trusted.
    newest: Option<Position>,
    oldest: Option<Position>,
    loaded: Loaded,
}

impl Gathered {
    /// Takes segment `first`'s positions within `from..=last`; a damaged
    /// segment is skipped with a warning (its range stays unknown).
    fn take_segment(&mut self, data: &[u8], first: StreamSeq, from: StreamSeq, last: StreamSeq) {
        let mut n = 0;
        let Gathered {
            rebuilt,
            tenants,
            newest,
            oldest,
            ..
        } = self;
        // The tenant of the positions being handed over, and its slot.
        let mut current: Option<(Arc<str>, u32)> = None;
        let decoded = segment::decode(data, |tenant, seq, at| {
            if from <= at && at <= last {
                let (name, slot) = match current.take() {
                    Some((name, slot)) if *name == *tenant => (name, slot),
                    _ => {
                        let name = tenants.get(tenant);
                        let slot = rebuilt.slot(&name);
                        (name, slot)
                    }
                };
                if newest.as_ref().is_none_or(|p| p.2 < at) {
                    *newest = Some((name.clone(), seq, at));
                }
                if oldest.as_ref().is_none_or(|p| p.2 > at) {
                    *oldest = Some((name.clone(), seq, at));
                }
                rebuilt.push_at(slot, seq, at);
                current = Some((name, slot));
                n += 1;
            }
        });
        match decoded {
            Ok(_) => {
                self.loaded.segments += 1;
                self.loaded.positions += n;
            }
            Err(e) => tracing::warn!(first = first.0, "{e}"),
        }
        self.rebuilt.bound(last.next());
    }
}

/// Whether the loaded ends agree with the stream; if not, the saved
/// segments are deleted (and the stream is read back instead).
async fn trusted(
    stream: &Stream,
    db: &tokio_postgres::Client,
    place: &Place,
    ends: [&Option<Position>; 2],
) -> bool {
    for (tenant, seq, at) in ends.into_iter().flatten() {
        if let Err(why) = check(stream, tenant, *seq, *at).await {
            tracing::warn!(
                stream_seq = at.0,
                "saved catch-up positions disagree with the stream ({why}): ignored and deleted, reading the stream back instead"
            );
            if let Err(e) = saved::forget(db, place).await {
                tracing::warn!(error = %e, "could not delete the saved catch-up positions");
            }
            return false;
        }
    }
    true
}

/// Whether the oldest and newest position `loading` holds are in the
/// stream as it says (if not, the load's own check refuses them too).
async fn trust(stream: &Stream, db: &tokio_postgres::Client, loading: &Loading) -> bool {
    let ends = match loading.ends(db).await {
        Ok(ends) => ends,
        Err(e) => {
            tracing::debug!(error = %e, "catch-up answers search the stream until the index is loaded");
            return false;
        }
    };
    for (tenant, seq, at) in &ends {
        if let Err(why) = check(stream, tenant, *seq, *at).await {
            tracing::debug!(
                why,
                "catch-up answers search the stream until the index is loaded"
            );
            return false;
        }
    }
    tracing::info!("catch-up answers use the saved segments while they load");
    true
}

/// The load's figures, in the log and in metrics.
fn report(loaded: &Loaded, from: StreamSeq, through: StreamSeq) {
    let seconds = loaded.began.map_or(0.0, |b| b.elapsed().as_secs_f64());
    metrics::gauge!(m::CATCHUP_INDEX_LOADED_POSITIONS).set(loaded.positions as f64);
    metrics::gauge!(m::CATCHUP_INDEX_READ_BACK_MESSAGES).set(loaded.read_back as f64);
    metrics::gauge!(m::CATCHUP_INDEX_LOAD_SECONDS).set(seconds);
    tracing::info!(
        segments = loaded.segments,
        positions = loaded.positions,
        read_back = loaded.read_back,
        from = from.0,
        through = through.0,
        seconds,
        "catch-up index loaded from saved segments"
    );
}

/// What the operator reads when the saved segments cannot be read.
fn unusable(e: crate::database::DbError) -> String {
    match e {
        crate::database::DbError::Precondition(fix) => fix,
        e => format!(
            "could not read the saved catch-up positions ({e}): reading the stream back instead (correct, slower); check that Postgres is reachable"
        ),
    }
}

/// Whether the stream holds the tenant's event `seq` at `at`. The direct
/// get may be answered by a replica that lags (on a cluster), so anything
/// but a match is read again from the stream leader before it counts.
pub(super) async fn check(
    stream: &Stream,
    tenant: &str,
    seq: TenantSeq,
    at: StreamSeq,
) -> Result<(), String> {
    let holds = |headers: &async_nats::HeaderMap| match position(Some(headers)) {
        Some((t, s)) if t == tenant && s == seq.0 => Ok(()),
        other => Err(format!(
            "stream message {at} is {other:?}, a segment says tenant {tenant:?} seq {seq}"
        )),
    };
    if let Ok(msg) = stream.direct_get(at.0).await
        && holds(&msg.headers).is_ok()
    {
        return Ok(());
    }
    let msg = stream
        .get_raw_message(at.0)
        .await
        .map_err(|e| format!("stream message {at}: {e}"))?;
    holds(&msg.headers)
}

/// Tenant ids shared by every position of a tenant.
#[derive(Default)]
struct Tenants(HashMap<String, Arc<str>>);

impl Tenants {
    fn get(&mut self, tenant: &str) -> Arc<str> {
        match self.0.get(tenant) {
            Some(t) => t.clone(),
            None => self
                .0
                .entry(tenant.to_string())
                .or_insert_with(|| Arc::from(tenant))
                .clone(),
        }
    }
}

/// Stream messages read by the first pass; each next one reads twice as
/// many, up to [`MAX_PASS`]. Passes go newest first, each merged as soon as
/// it is read: recent events (what reconnecting gateways ask for) are exact
/// again within a second of a restart, older ones follow.
const FIRST_PASS: u64 = 1 << 16;
const MAX_PASS: u64 = 1 << 21;

/// Step 2: reads stream messages up to `through` (at most `max_messages`)
/// and merges their positions into `index`, newest first. Returns the
/// messages read.
async fn rebuild(
    client: &async_nats::Client,
    stream: &Stream,
    index: &Index,
    through: StreamSeq,
    max_messages: u64,
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
        .max((through + 1).saturating_sub(max_messages));
    let mut read = 0;
    let mut hi = through;
    let mut pass = FIRST_PASS;
    let mut tenants = Tenants::default();
    while hi >= from && hi > 0 && max_messages > 0 {
        let lo = from.max(hi.saturating_sub(pass - 1));
        pass = (pass * 2).min(MAX_PASS);
        let mut rebuilt = Rebuilt::default();
        match read_range(client, stream, lo, hi, stop, &mut rebuilt, &mut tenants).await? {
            Some(n) => {
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

/// Adds the positions of the tenant messages in `lo..=hi` to `rebuilt`
/// (whose positions are all older); returns how many messages were read,
/// `None` if stopped.
async fn read_range(
    client: &async_nats::Client,
    stream: &Stream,
    lo: u64,
    hi: u64,
    stop: &AtomicBool,
    rebuilt: &mut Rebuilt,
    tenants: &mut Tenants,
) -> Result<Option<u64>, String> {
    let mut messages = HeadersRead::open(client, stream, lo, hi).await?;
    let mut read = 0u64;
    // A copy someone made the server store is not walcast's (`OwnIds`).
    let mut own_ids = crate::events::OwnIds::default();
    while let Some((stream_seq, headers)) = messages.next().await? {
        let own = own_ids.admits(event_id(headers.as_ref()));
        if let Some((tenant, seq)) = position(headers.as_ref()).filter(|_| own) {
            let tenant = tenants.get(tenant);
            rebuilt.push(&tenant, TenantSeq(seq), StreamSeq(stream_seq));
        }
        read += 1;
        if read.is_multiple_of(4096) {
            rebuilt.bound(StreamSeq(stream_seq + 1));
            if stop.load(Ordering::Relaxed) {
                return Ok(None);
            }
        }
    }
    rebuilt.bound(StreamSeq(hi + 1));
    Ok(Some(read))
}

/// A message's event id (`Nats-Msg-Id`), as a WAL position.
fn event_id(headers: Option<&async_nats::HeaderMap>) -> Option<(crate::lsn::Lsn, u32)> {
    crate::events::parse_event_id(headers?.get(crate::headers::MSG_ID)?.as_str())
}

/// A tenant message's `(tenant, seq)` from its headers.
fn position(headers: Option<&async_nats::HeaderMap>) -> Option<(&str, u64)> {
    let headers = headers?;
    let tenant = headers.get(crate::headers::TENANT)?.as_str();
    let seq = headers.get(crate::headers::SEQ)?.as_str().parse().ok()?;
    Some((tenant, seq))
}
