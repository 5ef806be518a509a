//! Publisher: JetStream publishes with pipelined, in-order acknowledgements.
//! It publishes through a `Sink`: `JetStream` in production, the
//! in-memory twin (`memory`) in the recovery property tests
//! (`pipeline::tests`).
//!
//! Invariants owned here:
//! - every publish carries `Nats-Expected-Last-Sequence` = the stream
//!   sequence of the event before it, so the stream can only ever hold a
//!   gap-free prefix of walcast's event order: if one publish fails, every
//!   later one in flight fails too, and recovery restarts from the
//!   checkpoint (see `pipeline`). This also fences off a second writer.
//! - every publish but a run's first also carries `Nats-Expected-Last-Msg-Id`
//!   = the id of the event sent before it. A message walcast did not
//!   publish (a tenant user can make the nats-server store one: a pull
//!   request's reply subject or a push consumer's deliver subject in the
//!   stream's subjects, see README "Tenant isolation") takes a position
//!   and clears that id, so every later publish of the run fails. The
//!   sequence check alone would let the publish after a refused one land
//!   on the position after the foreign message, and the refused event
//!   would be lost without an error (only a batch's last publish has a
//!   reply). Reconciliation then skips the foreign messages
//!   (`pipeline::prepare::foreign`).
//! - an ack for the message expected at stream sequence n, stored at n,
//!   stands for every message before it (see [`acks`]), so acks are asked
//!   for per batch, not per event;
//! - acknowledgements are consumed in publish order, and a transaction
//!   boundary is reported to [`Progress`] only after every event before it
//!   is acknowledged.
//! - at most `max_in_flight` publishes await an ack (bounded memory).
//! - draining a backlog, it waits for a state projection that reads the
//!   feed rather than push it out of the feed, but never longer than
//!   [`STATE_WAIT`] without the projection moving, and never while live
//!   ([`Publisher::state_to_wait_for`]).
//!
//! A stream leader change on a cluster shows as publishes with "no
//! responders": the run then asks the stream's info, waiting out the
//! election ([`stream::lookup`]), and ends with [`PublishError::LeaderChange`]
//! once a new leader answers (or [`PublishError::StreamGone`] if the stream
//! no longer exists), so the next run publishes at once.

pub mod acked;
pub(crate) mod acks;
pub mod holes;
#[cfg(test)]
pub(crate) mod memory;
pub mod oversized;
pub mod republish;
pub(crate) mod sink;
mod stats;
pub mod stream;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Subject;
use tokio::sync::mpsc;

use crate::checkpoint::{Progress, Segment};
use crate::events::{OutEvent, Route};
use crate::handoff::Item;
use crate::headers::{
    CONTENT_TYPE, EXPECTED_LAST_MSG_ID, EXPECTED_LAST_SEQUENCE, Headers, LSN, MSG_ID, PROTOBUF,
    REASON, SEQ, TENANT,
};
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};
use crate::state::feed::{Feed, Input};
pub(crate) use sink::{JetStream, Sink};

/// Why publishing stopped.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("NATS: {0}")]
    Nats(String),
    #[error(
        "NATS has no JetStream ({0}): start nats-server with -js (or jetstream {{}} in its config)"
    )]
    NoJetStream(String),
    #[error("{0}")]
    Incompatible(String),
    #[error("JetStream did not acknowledge event {event_id}: {reason}")]
    Ack { event_id: String, reason: String },
    #[error("stream sequence mismatch: event {event_id} was stored as {got}, expected {expected}")]
    Chain {
        event_id: String,
        expected: StreamSeq,
        got: StreamSeq,
    },
    #[error("checkpointer stopped")]
    Downstream,
    /// Publishes found nothing capturing their subject (see [`run`](Publisher::run)).
    #[error("JetStream found no responders for event {event_id}")]
    NoResponders { event_id: String },
    #[error(
        "stream {stream} changed leader: publishes found no responders while it was elected ({outcome}); resuming from the checkpoint"
    )]
    LeaderChange { stream: String, outcome: String },
    #[error(
        "stream {stream} no longer exists: publishes found no responders and JetStream says it is not found (was it deleted?)"
    )]
    StreamGone { stream: String },
    #[error(
        "stream {stream} now misses {missing} messages from its middle (it missed {known} when this run started): checking them from the checkpoint"
    )]
    StreamHoles {
        stream: String,
        missing: u64,
        known: u64,
    },
    /// Events lost in holes past the checkpoint (see `pipeline::retention`).
    #[error("{}", .0.message)]
    LostInHoles(Box<holes::HoleLoss>),
    /// Holes that only took tenants' oldest events, as a purge by subject
    /// does: the next run goes on past them.
    #[error(
        "stream {stream} misses messages {holes} from its middle, each tenant only its oldest events (a purge by subject?); going on past them"
    )]
    OldestEventsRemoved { stream: String, holes: String },
    #[error("stream {stream} now ends at message {last} but messages up to {high} were acknowledged: the broker lost {} of them; reconciling from the checkpoint", high.0 - last.0)]
    BrokerLoss {
        stream: String,
        last: StreamSeq,
        high: StreamSeq,
    },
}

/// Per-event bookkeeping, in publish order.
enum Pending {
    Event(Sent),
    Boundary(Lsn),
    Published {
        tenant: Option<(Arc<str>, TenantSeq)>,
        stream_seq: StreamSeq,
    },
}

/// What is remembered of a sent event until its ack.
struct Sent {
    event_id: String,
    tenant: Option<(Arc<str>, TenantSeq)>,
    entity: crate::proto::Entity,
    action: crate::proto::Action,
    bytes: usize,
    dead_letter: bool,
    commit_micros: i64,
    /// What the state service reads once it is acknowledged (with a feed).
    fed: Option<Input>,
}

/// Where the stream ends when a run starts: its last message, and the last
/// that is walcast's (or the checkpoint's position), which differ when
/// foreign messages end it (`pipeline::foreign`).
#[derive(Debug, Clone, Copy)]
pub struct Tail {
    pub last_seq: StreamSeq,
    pub own: StreamSeq,
}

/// What the stream must end with for a publish to be stored: the message
/// at `seq`, whose id is `id` (empty: not checked, a run's first publish).
struct Expected<'a> {
    seq: StreamSeq,
    id: &'a str,
}

/// How often progress is cut into segments for the checkpointer.
const CUT_EVERY: Duration = Duration::from_millis(20);

/// Publishes a stream of items to a [`Sink`] ([`JetStream`] in production).
pub(crate) struct Publisher<S> {
    pub sink: S,
    pub max_in_flight: usize,
    pub oversized: oversized::Oversized,
    /// Where each tenant's events land, for the catch-up service.
    pub index: crate::catchup::Index,
    /// The same positions, to be saved once acknowledged (`None`: not saved).
    pub journal: Option<crate::catchup::Journal>,
    /// What this process saw acknowledged (see [`acked`]).
    pub acked: Arc<acked::Acked>,
    /// Tracks events republished because the broker lost them.
    pub republish: republish::Republish,
    /// Where acknowledged events go for the state service (`None`: no state).
    pub feed: Option<Arc<Feed>>,
}

/// The publisher's running state: what is sent and what is acknowledged.
struct Flight {
    pending: VecDeque<Pending>,
    progress: Progress,
    stats: stats::Stats,
    /// Stream sequence of the next event to send.
    next_seq: StreamSeq,
    /// Highest stream sequence acknowledged (directly or by a later ack).
    acked_seq: StreamSeq,
    /// Highest stream sequence an ack was requested for.
    requested_seq: StreamSeq,
    /// The id of the last event sent in this run (empty before the first):
    /// the next publish expects the stream to end with it.
    last_sent_id: String,
    /// Commit time of the last event sent, Unix microseconds.
    sent_commit_micros: i64,
    /// Where the state's projection was when a wait for it ran out: no
    /// more waiting until it moves (see [`Publisher::state_to_wait_for`]).
    state_stalled_at: Option<u64>,
}

impl Flight {
    fn unacked(&self) -> u64 {
        self.next_seq.prev() - self.acked_seq
    }

    /// Applies JetStream's answer for the message expected at `answer.expected`:
    /// it stands for every event before it too (see [`acks`]).
    fn answered(
        &mut self,
        answer: acks::Answer,
        acked: &acked::Acked,
        feed: Option<&Feed>,
    ) -> Result<(), PublishError> {
        let expected = answer.expected;
        let event_id = || self.event_id_at(expected);
        match answer.verdict {
            acks::Verdict::Rejected(reason) | acks::Verdict::WrongLast(reason) => {
                return Err(PublishError::Ack {
                    event_id: event_id(),
                    reason,
                });
            }
            acks::Verdict::NoResponders => {
                return Err(PublishError::NoResponders {
                    event_id: event_id(),
                });
            }
            acks::Verdict::Stored { seq, duplicate } if seq != expected || duplicate => {
                return Err(PublishError::Chain {
                    event_id: event_id(),
                    expected,
                    got: seq,
                });
            }
            acks::Verdict::Stored { .. } => {}
        }
        crate::failpoint::crash_point("after_ack");
        self.stats.ack_latency(answer.latency);
        let mut fed = Vec::new();
        let mut last_id = None;
        while self.acked_seq < expected {
            match self.pending.pop_front() {
                Some(Pending::Event(mut sent)) => {
                    self.acked_seq = self.acked_seq.next();
                    fed.extend(sent.fed.take());
                    self.stats.acked(
                        sent.entity,
                        sent.action,
                        sent.bytes,
                        sent.dead_letter,
                        sent.commit_micros,
                    );
                    self.progress
                        .acked(sent.tenant.as_ref().map(|(t, s)| (t, *s)), self.acked_seq);
                    last_id = Some(sent.event_id);
                }
                Some(Pending::Boundary(lsn)) => self.progress.boundary(lsn),
                Some(Pending::Published { tenant, stream_seq }) => self
                    .progress
                    .acked(tenant.as_ref().map(|(t, s)| (t, *s)), stream_seq),
                None => unreachable!("an ack was requested only for a sent event"),
            }
        }
        match last_id {
            Some(id) => acked.own(expected, id),
            None => _ = acked.raise(expected),
        }
        if let Some(feed) = feed {
            feed.push(fed, self.acked_seq.0);
        }
        drain_ready(&mut self.pending, &mut self.progress);
        Ok(())
    }

    /// The id of the unacknowledged event at stream sequence `seq`, for errors.
    fn event_id_at(&self, seq: StreamSeq) -> String {
        let mut at = self.acked_seq;
        for p in &self.pending {
            if let Pending::Event(sent) = p {
                at = at.next();
                if at == seq {
                    return sent.event_id.clone();
                }
            }
        }
        format!("at stream sequence {seq}")
    }
}

impl<S: Sink> Publisher<S> {
    /// Runs until `items` closes and every publish is acknowledged. `last_seq`
    /// is the stream's last sequence when this run started.
    ///
    /// When publishes find no responders, this run is over (the stream is
    /// chained: nothing after the unanswered message can be stored), but the
    /// next one can only publish once the stream has a leader again. So the
    /// input is closed first (the pipeline stops reading), then stream info
    /// tells a leader election (the stream still exists) from a deleted
    /// stream, waiting for the new leader for at most
    /// [`stream::ELECTION_WAIT`].
    pub async fn run(
        mut self,
        items: mpsc::Receiver<Vec<Item>>,
        segments: mpsc::Sender<Segment>,
        tail: Tail,
    ) -> Result<(), PublishError> {
        match self.publish_all(items, segments, tail).await {
            Err(PublishError::NoResponders { event_id }) => {
                Err(self.sink.no_responders(&event_id).await)
            }
            other => other,
        }
    }

    async fn publish_all(
        &mut self,
        mut items: mpsc::Receiver<Vec<Item>>,
        segments: mpsc::Sender<Segment>,
        Tail { last_seq, own }: Tail,
    ) -> Result<(), PublishError> {
        let mut acks = acks::Acks::new(self.sink.replies().await?);
        let mut f = Flight {
            pending: VecDeque::new(),
            // A checkpoint names the last event's position, not a foreign
            // message's after it (see `Tail`).
            progress: Progress::new(own, CUT_EVERY),
            stats: stats::Stats::default(),
            next_seq: last_seq.next(),
            acked_seq: last_seq,
            requested_seq: last_seq,
            last_sent_id: String::new(),
            sent_commit_micros: 0,
            state_stalled_at: None,
        };
        let mut input_open = true;
        let mut tick = tokio::time::interval(CUT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let state = self.state_to_wait_for(&f);
            tokio::select! {
                biased;
                answer = acks.next() => {
                    f.answered(answer?, &self.acked, self.feed.as_deref())?;
                    self.journal_acked(&f, false);
                }
                batch = items.recv(), if input_open && f.unacked() < self.max_in_flight as u64 && state.is_none() => match batch {
                    Some(batch) => self.send_batch(batch, &mut f, &mut acks).await?,
                    None => input_open = false,
                },
                moved = state_moved(state.as_deref()), if state.is_some() => {
                    if !moved {
                        f.state_stalled_at = state.as_ref().map(|feed| feed.reader());
                    }
                },
                // Idle (nothing in flight, nothing to cut or flush): no
                // wake-ups 50 times a second.
                _ = tick.tick(), if !acks.is_empty() || f.progress.has_boundary() || !f.stats.is_empty() || self.journal_pending() => {
                    acks.check_timeout(tokio::time::Instant::now())?;
                    f.stats.flush();
                    self.journal_acked(&f, false);
                    if let Some(seg) = f.progress.cut(tokio::time::Instant::now(), false) {
                        segments.send(seg).await.map_err(|_| PublishError::Downstream)?;
                    }
                }
            }
            if !input_open && acks.is_empty() {
                self.republish.finish();
                f.stats.flush();
                self.journal_acked(&f, true);
                drain_ready(&mut f.pending, &mut f.progress);
                if let Some(seg) = f.progress.cut(tokio::time::Instant::now(), true) {
                    segments
                        .send(seg)
                        .await
                        .map_err(|_| PublishError::Downstream)?;
                }
                return Ok(());
            }
        }
    }

    /// The state's feed when the next batch should wait for its projection:
    /// while the publisher drains events committed more than
    /// [`BACKLOG_AGE`] ago and the projection, reading the feed, would
    /// otherwise fall out of it ([`Feed::holds_back`]). Waits run out after
    /// [`STATE_WAIT`] without progress, and none starts again until the
    /// projection moves: a stalled bucket never stops the stream, and a
    /// live stream never waits.
    fn state_to_wait_for(&self, f: &Flight) -> Option<Arc<Feed>> {
        let feed = self.feed.as_ref()?;
        let wait = feed.holds_back(f.next_seq.0)
            && f.state_stalled_at != Some(feed.reader())
            && stats::unix_micros_now() - f.sent_commit_micros > BACKLOG_AGE.as_micros() as i64;
        wait.then(|| feed.clone())
    }

    /// Hands the journal's acknowledged segments to their writer (`all`:
    /// the open one too).
    fn journal_acked(&mut self, f: &Flight, all: bool) {
        if let Some(journal) = &mut self.journal {
            journal.acked(f.acked_seq, std::time::Instant::now(), all);
        }
    }

    fn journal_pending(&self) -> bool {
        self.journal.as_ref().is_some_and(|j| j.is_pending())
    }

    /// Sends one batch; asks for an ack on its last event and every
    /// [`acks::ACK_EVERY`] events.
    async fn send_batch(
        &mut self,
        batch: Vec<Item>,
        f: &mut Flight,
        acks: &mut acks::Acks<S::Replies>,
    ) -> Result<(), PublishError> {
        // Index first: once a message is sent a subscriber may see it and
        // ask the catch-up service about it, which must already know it.
        let positions = positions(&batch, f.next_seq);
        self.index
            .record(&positions, f.next_seq + events_in(&batch));
        if let Some(journal) = &mut self.journal {
            journal.record(&positions, std::time::Instant::now());
        }
        if let Some(replayed) = batch.iter().rev().find_map(|i| match i {
            Item::Published { stream_seq, .. } => Some(*stream_seq),
            _ => None,
        }) {
            self.index.replayed_through(replayed);
        }
        self.oversized.refresh(&self.sink);
        let last_event = batch.iter().rposition(|i| matches!(i, Item::Event(_)));
        for (i, item) in batch.into_iter().enumerate() {
            match item {
                Item::Event(event) => {
                    let seq = f.next_seq;
                    self.republish.sent(seq, &event);
                    let reply = (Some(i) == last_event || seq - f.requested_seq >= acks::ACK_EVERY)
                        .then(|| {
                            f.requested_seq = seq;
                            acks.request(seq)
                        });
                    let expected = Expected {
                        seq: seq.prev(),
                        id: &f.last_sent_id,
                    };
                    let sent = self.publish(event, expected, reply).await?;
                    f.last_sent_id.clear();
                    f.last_sent_id.push_str(&sent.event_id);
                    f.sent_commit_micros = sent.commit_micros;
                    f.pending.push_back(Pending::Event(sent));
                    crate::failpoint::crash_point("after_publish");
                    f.next_seq = f.next_seq.next();
                }
                Item::Boundary(lsn) => f.pending.push_back(Pending::Boundary(lsn)),
                Item::Published { tenant, stream_seq } => {
                    f.pending
                        .push_back(Pending::Published { tenant, stream_seq });
                }
            }
        }
        drain_ready(&mut f.pending, &mut f.progress);
        Ok(())
    }

    async fn publish(
        &mut self,
        mut event: OutEvent,
        expected: Expected<'_>,
        reply: Option<async_nats::Subject>,
    ) -> Result<Sent, PublishError> {
        let expected_last = expected.seq;
        let subject = Subject::from(std::mem::take(&mut event.subject));
        let (fed, sent) = {
            let mut headers = Headers::new();
            headers.insert(MSG_ID, event.event_id.as_str());
            headers.insert(EXPECTED_LAST_SEQUENCE, expected_last.0);
            if !expected.id.is_empty() {
                headers.insert(EXPECTED_LAST_MSG_ID, expected.id);
            }
            match &event.route {
                Route::Tenant { tenant, seq } => {
                    headers.insert(TENANT, &**tenant);
                    headers.insert(SEQ, seq.0);
                }
                Route::DeadLetter { reason } => headers.insert(REASON, *reason),
                Route::System => {}
            }
            // The header carries the decimal number (README), not `X/Y`.
            headers.insert(LSN, event.commit_lsn.0);
            headers.insert(CONTENT_TYPE, PROTOBUF);
            let payload = self
                .oversized
                .fit(&mut self.sink, &event, &mut headers)
                .await?;
            let at = expected_last.next();
            let fed = (self.feed.as_ref())
                .is_some_and(|feed| feed.wants(at.0))
                .then(|| fed(&event, at, &subject, &headers, &payload));
            let send = self.sink.send(subject, &headers, payload, reply);
            tokio::pin!(send);
            // While NATS is away the client queues publishes until its buffer
            // is full, then a publish waits: for as long as the outage lasts,
            // and the ack timeout (checked between publishes) would never
            // fire. The timer is only armed in that case, not on every
            // message.
            let sent = match futures::poll!(&mut send) {
                std::task::Poll::Ready(sent) => sent,
                std::task::Poll::Pending => tokio::time::timeout(acks::ACK_TIMEOUT, send)
                    .await
                    .map_err(|_| {
                        PublishError::Nats(format!(
                            "publish {}: the NATS client accepted nothing for {:?} (is NATS reachable?)",
                            event.event_id,
                            acks::ACK_TIMEOUT
                        ))
                    })?,
            };
            (fed, sent)
        };
        sent.map_err(|e| PublishError::Nats(format!("publish {}: {e}", event.event_id)))?;
        Ok(Sent {
            tenant: match &event.route {
                Route::Tenant { tenant, seq } => Some((tenant.clone(), *seq)),
                _ => None,
            },
            entity: event.entity,
            action: event.action,
            bytes: event.payload.len(),
            dead_letter: matches!(event.route, Route::DeadLetter { .. }),
            commit_micros: event.commit_unix_micros,
            event_id: event.event_id,
            fed,
        })
    }
}

/// Events committed longer ago than this are a backlog being drained.
const BACKLOG_AGE: Duration = Duration::from_secs(1);
/// How long the publisher waits at most for the state's projection to move
/// (long enough for a state service that is still starting: one that
/// misses the feed's first events reads the stream for the whole drain).
const STATE_WAIT: Duration = Duration::from_secs(1);

/// Whether the projection moved within [`STATE_WAIT`] (never completes
/// without a feed).
async fn state_moved(feed: Option<&Feed>) -> bool {
    match feed {
        Some(feed) => tokio::time::timeout(STATE_WAIT, feed.advanced())
            .await
            .is_ok(),
        None => std::future::pending().await,
    }
}

/// What the state service reads of an event sent at stream sequence `at`
/// (the same as a read of the stream would give it).
fn fed(
    event: &OutEvent,
    at: StreamSeq,
    subject: &Subject,
    headers: &Headers<'_>,
    payload: &bytes::Bytes,
) -> Input {
    let (tenant, seq) = match &event.route {
        Route::Tenant { tenant, seq } => (Some(tenant.clone()), seq.0),
        _ => (None, 0),
    };
    Input {
        position: at.0,
        subject: subject.clone(),
        tenant,
        seq,
        object: headers.text(crate::headers::OBJECT).map(str::to_string),
        payload: payload.clone(),
        foreign: false,
    }
}

/// The stream sequence every tenant event of `batch` gets (or already has).
fn positions(batch: &[Item], mut next_seq: StreamSeq) -> Vec<(Arc<str>, TenantSeq, StreamSeq)> {
    let mut out = Vec::with_capacity(batch.len());
    for item in batch {
        match item {
            Item::Event(event) => {
                if let Route::Tenant { tenant, seq } = &event.route {
                    out.push((tenant.clone(), *seq, next_seq));
                }
                next_seq = next_seq.next();
            }
            Item::Published {
                tenant: Some((tenant, seq)),
                stream_seq,
            } => out.push((tenant.clone(), *seq, *stream_seq)),
            _ => {}
        }
    }
    out
}

fn events_in(batch: &[Item]) -> u64 {
    batch.iter().filter(|i| matches!(i, Item::Event(_))).count() as u64
}

/// Feeds progress with the entries at the front that need no ack.
fn drain_ready(pending: &mut VecDeque<Pending>, progress: &mut Progress) {
    loop {
        match pending.front() {
            Some(Pending::Boundary(lsn)) => progress.boundary(*lsn),
            Some(Pending::Published { tenant, stream_seq }) => {
                progress.acked(tenant.as_ref().map(|(t, s)| (t, *s)), *stream_seq)
            }
            _ => return,
        }
        pending.pop_front();
    }
}
