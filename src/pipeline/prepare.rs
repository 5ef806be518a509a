//! The first phase of a run: everything that must hold before an event is
//! read — the database preconditions (shared with `walcast check`, see
//! `source::preflight`), the slot, the stream, owning the slot, fencing the
//! checkpoint, and reconciling the checkpoint with the stream.
//!
//! Reconciliation (why no event is lost, duplicated or renumbered): the
//! stream is a gap-free prefix of walcast's event order (expected-last-
//! sequence chaining in `publish`), and the checkpoint says "events before
//! LSN `c` end at stream message `s`". Replaying the slot from `c` rebuilds
//! the same events with the same ids and seqs, in the same order, so the
//! first `last_seq - s` of them are exactly the ones already in the stream:
//! they are counted but not sent again. If the stream holds fewer than `s`
//! messages, the broker lost events the slot no longer has: stop, loudly.
//!
//! Messages walcast did not publish (`foreign`) are not its events: the
//! positions recorded in Postgres and those found at the stream's tail are
//! left out of the count, and the replay skips them.
//!
//! Messages missing from the middle of the stream (`publish::holes`) are
//! found here too, from one stream info request: past the checkpoint the
//! replay names the lost events and stops (`reader::Skip`); before it,
//! an ERROR names the range and the run goes on.

use super::foreign::{self, Foreign};
use super::{Context, PipelineError};
use crate::checkpoint::{Checkpoint, store};
use crate::database::with_timeout;
use crate::lsn::Lsn;
use crate::position::StreamSeq;
use crate::proto::Entity;
use crate::publish::acked::Acked;
use crate::publish::holes::{self, Hole};
use crate::publish::sink::Bucket;
use crate::publish::{self, JetStream, Sink};
use crate::source::preflight::{self, SlotVerdict};
use crate::source::{Source, slot, writes};

/// What the database preconditions leave a run with.
pub(super) struct Checked {
    pub sql: tokio_postgres::Client,
    /// The source tables' OIDs, so a renamed table is still recognised.
    pub sources: Vec<(u32, Entity)>,
    pub checkpoint: Option<Checkpoint>,
}

/// Connects and checks every database precondition (stopping at the first
/// violated one), creating the slot if walcast never streamed it.
pub(super) async fn check_database(ctx: &Context) -> Result<Checked, PipelineError> {
    let s = &ctx.settings;
    let sql = ctx.db.connect().await?;
    with_timeout("check wal_level", preflight::wal_level(&sql)).await???;
    let sources = with_timeout(
        "check the publication",
        crate::source::publication::verify(&sql, s),
    )
    .await???;
    // The stream is right either way; the application's writes are not.
    let writes = with_timeout("check the application's writes", writes::inspect(&sql, s)).await??;
    writes::log(&writes);
    let checkpoint = with_timeout("read the checkpoint", store::load(&sql, &s.slot)).await??;
    let state = slot::read(&sql, &s.slot).await?;
    if preflight::judge_slot(&s.slot, state.as_ref(), checkpoint.is_some())? == SlotVerdict::Create
    {
        tracing::info!(slot = %s.slot, "creating replication slot");
        slot::ensure(&sql, &s.slot, s.slot_failover).await?;
    }
    Ok(Checked {
        sql,
        sources,
        checkpoint,
    })
}

/// A run ready to read: it holds the slot and has reconciled the
/// checkpoint with the stream.
pub(super) struct Prepared {
    pub sql: tokio_postgres::Client,
    pub sources: Vec<(u32, Entity)>,
    pub source: Source,
    /// Where the publisher sends (the stream reconciled with).
    pub sink: JetStream,
    pub checkpoint: Checkpoint,
    /// The fencing token this run wrote into the checkpoint row.
    pub owner: String,
    /// Where reading starts: the checkpoint or the slot, whichever is later.
    pub start: Lsn,
    /// The stream's last sequence when the run started.
    pub last_seq: StreamSeq,
    pub reconciled: Reconciled,
    /// Where oversized events go (SPEC §3).
    pub oversized: Bucket,
}

/// The object store for oversized events: `<stream>_OVERSIZED`, with the
/// max age and replicas the stream really has (an existing stream may keep
/// events longer than the settings say: a claim check must not expire
/// before its event).
fn oversized_bucket(stream: &str, config: &async_nats::jetstream::stream::Config) -> Bucket {
    Bucket {
        name: format!("{stream}_OVERSIZED"),
        max_age: config.max_age,
        replicas: config.num_replicas,
    }
}

/// Owns the slot, reads the stream's tail, fences the checkpoint and
/// reconciles the two (see the module comment).
pub(super) async fn prepare(ctx: &Context, checked: Checked) -> Result<Prepared, PipelineError> {
    let s = &ctx.settings;
    let Checked { sql, sources, .. } = checked;
    let stream = publish::stream::ensure(&ctx.js, s).await?;
    let mut sink = JetStream::new(ctx.js.clone(), &s.stream).await?;
    let oversized = oversized_bucket(&s.stream, &stream.cached_info().config);
    sink.open_objects(&oversized).await;
    // Own the slot before reading any state: until START_REPLICATION
    // succeeds, another instance may still advance the slot and the
    // checkpoint. Starting at 0/0 means "at the slot's confirmed position".
    let source = Source::start(&ctx.db, &s.slot, &s.publication, Lsn(0)).await?;
    let slot_state = slot::read(&sql, &s.slot)
        .await?
        .ok_or_else(|| preflight::slot_dropped(&s.slot))?;
    let last_seq = sink.last_seq().await?;
    let checkpoint = match store::load(&sql, &s.slot).await? {
        Some(c) => c,
        None => {
            // A new checkpoint: positions recorded for an earlier one (an
            // earlier stream) mean nothing now.
            foreign::forget(&sql, &s.slot).await?;
            store::init(
                &sql,
                &s.slot,
                slot_state.confirmed_flush,
                &s.stream,
                last_seq,
            )
            .await?
        }
    };
    // Fence off any earlier holder of the slot from the checkpoint.
    let owner = format!("{:016x}", rand::random::<u64>());
    store::claim(&sql, &s.slot, &owner).await?;
    let names = Names {
        slot: &s.slot,
        stream: &s.stream,
    };
    let recorded = foreign::load(&sql, &s.slot).await?;
    let mut reconciled = reconcile(
        &sink,
        names,
        &checkpoint,
        last_seq,
        &recorded,
        &ctx.acked,
        StreamSeq(s.accept_holes_through),
    )
    .await?;
    // Recorded before the first publish: from then on they sit between
    // this run's events and the last run's (see `foreign`).
    let found = &reconciled.found_foreign;
    foreign::update(&sql, &s.slot, found, checkpoint.stream_seq, last_seq).await?;
    reconciled.oldest_removed = ctx
        .oldest_removed
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    Ok(Prepared {
        start: checkpoint.lsn.max(slot_state.confirmed_flush),
        sql,
        sources,
        source,
        sink,
        checkpoint,
        owner,
        last_seq,
        reconciled,
        oversized,
    })
}

/// The slot and the stream a run works on, for reconciliation's messages.
#[derive(Clone, Copy)]
pub(super) struct Names<'a> {
    pub slot: &'a str,
    pub stream: &'a str,
}

/// What reconciling the checkpoint with the stream decided.
#[derive(Debug)]
pub(super) struct Reconciled {
    /// Events already in the stream past the checkpoint (replayed, not sent).
    pub already: u64,
    /// Positions past the checkpoint of messages walcast did not publish.
    pub foreign: Foreign,
    /// Those found by this reconciliation (to record).
    pub found_foreign: Foreign,
    /// Where the stream ends, and its last message that is walcast's.
    pub tail: crate::publish::Tail,
    /// The `Nats-Msg-Id` of walcast's last message in the stream, if
    /// `already > 0`.
    pub tail_id: Option<String>,
    /// The highest stream sequence ever acknowledged (this process or the
    /// checkpoint): below it, sends are republishes of lost messages.
    pub acked_high: StreamSeq,
    /// Holes past the checkpoint: the replay names what they lost.
    pub holes: Vec<Hole>,
    /// Holes up to here were accepted by the operator (reported, not fatal).
    pub accept_through: StreamSeq,
    /// Holes that took only tenants' oldest events (not fatal).
    pub oldest_removed: Vec<Hole>,
    /// Messages missing from the middle of the stream in all.
    pub missing: u64,
}

/// Reconciles the checkpoint with a stream that ends at `last_seq` (see the
/// module comment): how many events past the checkpoint it already holds,
/// and the last one's id to check the replay against. An error if the
/// checkpoint belongs to another stream or the stream lost events the slot
/// no longer has. `recorded` are the foreign messages known so far.
/// `process` is what this process saw acknowledged: its highest is raised
/// to the checkpoint's, and its own tail, if the stream still holds it,
/// is where the search for foreign messages starts. Holes up to
/// `accept_through` do not stop the run.
pub(super) async fn reconcile(
    sink: &impl Sink,
    names: Names<'_>,
    checkpoint: &Checkpoint,
    last_seq: StreamSeq,
    recorded: &Foreign,
    process: &Acked,
    accept_through: StreamSeq,
) -> Result<Reconciled, PipelineError> {
    let positions = count_past(names, checkpoint, last_seq)?;
    let own_tail = foreign::own_tail(sink, process, last_seq).await;
    let (foreign, found_foreign) =
        foreign_past(sink, names, checkpoint, recorded, own_tail, last_seq).await?;
    let already = positions - foreign.count();
    if already > 0 {
        tracing::info!(
            messages = already,
            foreign = foreign.count(),
            "stream is ahead of the checkpoint; replaying without republishing"
        );
    }
    let all = sink.holes().await?;
    let missing = holes::missing(&all);
    holes::gauge(missing);
    let (mut within, beyond) = holes::split(&all, checkpoint.stream_seq);
    within.retain(|hole| !foreign.covers(hole));
    for hole in beyond.iter().take(holes::HOLES_NAMED) {
        report_beyond(sink, names, checkpoint, hole).await;
    }
    if let Some(rest) = beyond.get(holes::HOLES_NAMED..).filter(|r| !r.is_empty()) {
        tracing::error!(
            stream = %names.stream,
            holes = rest.len(),
            messages = holes::missing(rest),
            from = %rest[0].first,
            to = %rest[rest.len() - 1].last,
            "more holes in the middle of the stream before the checkpoint (see the ERRORs above)"
        );
    }
    let own = foreign.last_outside(checkpoint.stream_seq, last_seq);
    let tail_id = match own {
        Some(tail) if already > 0 => sink.message_id(tail).await,
        _ => None,
    };
    let tail = crate::publish::Tail {
        last_seq,
        own: own.unwrap_or(checkpoint.stream_seq.min(last_seq)),
    };
    let acked_high = process.raise(checkpoint.acked_seq);
    if last_seq < acked_high {
        // The bucket may have lost acknowledged writes with it.
        crate::state::recent::distrust();
        tracing::warn!(
            stream = %names.stream,
            lost_from = last_seq.0 + 1,
            lost_to = acked_high.0,
            "the broker lost messages it had acknowledged; republishing them from the slot with the same ids and seqs"
        );
    }
    Ok(Reconciled {
        already,
        foreign,
        found_foreign,
        tail,
        tail_id,
        acked_high,
        holes: within,
        accept_through,
        oldest_removed: Vec::new(),
        missing,
    })
}

/// The foreign messages past the checkpoint (`recorded` and newly found),
/// and the newly found ones, reported.
async fn foreign_past(
    sink: &impl Sink,
    names: Names<'_>,
    checkpoint: &Checkpoint,
    recorded: &Foreign,
    own_tail: Option<StreamSeq>,
    last_seq: StreamSeq,
) -> Result<(Foreign, Foreign), PipelineError> {
    let known = recorded.within(checkpoint.stream_seq, last_seq);
    let found = foreign::scan(sink, checkpoint, &known, own_tail, last_seq).await?;
    if found.count() > 0 {
        let subjects = foreign::subjects(sink, &found).await;
        tracing::warn!(
            stream = %names.stream,
            positions = %found,
            subjects = %subjects,
            "the stream holds messages walcast did not publish: skipping them. A tenant user can make the \
             nats-server store copies of what it may read (a pull request's reply subject or a push consumer's \
             deliver subject in the stream's subjects): the copies' subjects name the tenant whose users did it. \
             Or someone published into them; see README \"Tenant isolation at the broker\""
        );
        metrics::counter!(crate::telemetry::metrics::FOREIGN_MESSAGES).increment(found.count());
    }
    Ok((known.union(&found), found))
}

/// The ERROR for a hole the slot can no longer fill: the range, and the
/// events on either side of it (their LSNs bound what was lost).
async fn report_beyond(sink: &impl Sink, names: Names<'_>, checkpoint: &Checkpoint, hole: &Hole) {
    let neighbour =
        |m: Option<holes::Message>| m.map_or_else(|| "none".to_string(), |m| m.to_string());
    let before = neighbour(match hole.first.prev() {
        StreamSeq(0) => None,
        seq => sink.message(seq).await,
    });
    let after = neighbour(sink.message(hole.last.next()).await);
    tracing::error!(
        stream = %names.stream,
        missing = %hole,
        messages = hole.messages(),
        before = %before,
        after = %after,
        checkpoint_stream_seq = %checkpoint.stream_seq,
        checkpoint_lsn = %checkpoint.lsn,
        "stream messages are missing from the middle of the stream (deleted, or lost by the broker) before the checkpoint: \
         the slot no longer holds them, so they cannot be republished; consumers of the tenants committed between \
         the two neighbouring events see a seq gap and must re-sync them from the database (README \"Broker data loss\")"
    );
}

/// How many positions past the checkpoint the stream holds; an error if the
/// checkpoint belongs to another stream or the stream lost events the slot
/// no longer has.
fn count_past(
    names: Names<'_>,
    checkpoint: &Checkpoint,
    last_seq: StreamSeq,
) -> Result<u64, PipelineError> {
    let Names { slot, stream } = names;
    if checkpoint.stream != stream {
        return Err(PipelineError::Fatal(format!(
            "slot {slot} was checkpointed for stream {} but --stream is {stream}; use that stream or another slot",
            checkpoint.stream
        )));
    }
    if last_seq < checkpoint.stream_seq {
        return Err(PipelineError::Fatal(format!(
            "stream {stream} ends at message {} but messages up to {} were published and checkpointed at LSN {}: \
             the broker lost messages {}..={} and the slot no longer holds their WAL. Re-sync consumers and \
             see README \"Broker data loss\"",
            last_seq,
            checkpoint.stream_seq,
            checkpoint.lsn,
            last_seq.next(),
            checkpoint.stream_seq
        )));
    }
    Ok(last_seq - checkpoint.stream_seq)
}
