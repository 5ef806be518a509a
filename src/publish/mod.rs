//! Publisher: JetStream publishes with pipelined, in-order acknowledgements.
//!
//! Invariants owned here:
//! - every publish carries `Nats-Expected-Last-Sequence` = the stream
//!   sequence of the event before it, so the stream can only ever hold a
//!   gap-free prefix of walcast's event order: if one publish fails, every
//!   later one in flight fails too, and recovery restarts from the
//!   checkpoint (see `pipeline`). This also fences off a second writer.
//! - acknowledgements are consumed in publish order, and a transaction
//!   boundary is reported to [`Progress`] only after every event before it
//!   is acknowledged.
//! - at most `max_in_flight` publishes await an ack (bounded memory).

pub mod oversized;
pub mod republish;
mod stats;
pub mod stream;

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, context::PublishAckFuture};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use tokio::sync::mpsc;

use crate::checkpoint::{Progress, Segment};
use crate::events::{OutEvent, Route};

/// What flows from the event builder to the publisher, in WAL order.
#[derive(Debug)]
pub enum Item {
    Event(OutEvent),
    /// Everything before this LSN has been handed over (a commit's end, or an
    /// idle keepalive position): confirmable once all of it is acknowledged.
    Boundary(u64),
    /// An event a previous run already published at `stream_seq`: not sent
    /// again, but its tenant seq still counts for the checkpoint.
    Published {
        tenant: Option<(Arc<str>, u64)>,
        stream_seq: u64,
    },
}

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
        expected: u64,
        got: u64,
    },
    #[error("checkpointer stopped")]
    Downstream,
    #[error("stream {stream} now ends at message {last} but messages up to {high} were acknowledged: the broker lost {} of them; reconciling from the checkpoint", high - last)]
    BrokerLoss {
        stream: String,
        last: u64,
        high: u64,
    },
}

impl PublishError {
    /// Worth retrying with backoff (the pipeline restarts from the checkpoint).
    pub fn is_transient(&self) -> bool {
        !matches!(
            self,
            PublishError::NoJetStream(_) | PublishError::Incompatible(_)
        )
    }
}

/// Per-event bookkeeping, in publish order.
enum Pending {
    Event(Sent),
    Boundary(u64),
    Published {
        tenant: Option<(Arc<str>, u64)>,
        stream_seq: u64,
    },
}

/// What is remembered of a sent event until its ack.
struct Sent {
    event_id: String,
    tenant: Option<(Arc<str>, u64)>,
    entity: crate::proto::Entity,
    action: crate::proto::Action,
    bytes: usize,
    dead_letter: bool,
    commit_micros: i64,
    at: Instant,
}

impl Sent {
    fn of(event: &OutEvent) -> Sent {
        Sent {
            event_id: event.event_id.clone(),
            tenant: match &event.route {
                Route::Tenant { tenant, seq } => Some((tenant.clone(), *seq)),
                _ => None,
            },
            entity: event.entity,
            action: event.action,
            bytes: event.payload.len(),
            dead_letter: matches!(event.route, Route::DeadLetter { .. }),
            commit_micros: event.commit_unix_micros,
            at: Instant::now(),
        }
    }
}

/// How often progress is cut into segments for the checkpointer.
const CUT_EVERY: Duration = Duration::from_millis(20);

/// Publishes a stream of items.
pub struct Publisher {
    pub js: jetstream::Context,
    pub stream: String,
    pub max_in_flight: usize,
    pub oversized: oversized::Oversized,
    /// Where each tenant's events land, for the catch-up service.
    pub index: crate::catchup::Index,
    /// Highest acknowledged stream sequence in this process (see `pipeline`).
    pub acked_high: Arc<std::sync::atomic::AtomicU64>,
    /// Tracks events republished because the broker lost them.
    pub republish: republish::Republish,
}

impl Publisher {
    /// Runs until `items` closes and every publish is acknowledged. `last_seq`
    /// is the stream's last sequence when this run started.
    pub async fn run(
        mut self,
        mut items: mpsc::Receiver<Vec<Item>>,
        segments: mpsc::Sender<Segment>,
        last_seq: u64,
    ) -> Result<(), PublishError> {
        let mut acks = FuturesOrdered::new();
        let mut pending: VecDeque<Pending> = VecDeque::new();
        let mut progress = Progress::new(last_seq, CUT_EVERY);
        let mut next_seq = last_seq + 1;
        let mut acked_seq = last_seq;
        let mut input_open = true;
        let mut stats = stats::Stats::default();
        let mut tick = tokio::time::interval(CUT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                Some(ack) = acks.next(), if !acks.is_empty() => {
                    let ack: Result<jetstream::publish::PublishAck, jetstream::context::PublishError> = ack;
                    let Some(Pending::Event(sent)) = pending.pop_front() else {
                        unreachable!("acks and pending events are pushed together, boundaries are drained eagerly")
                    };
                    let ack = ack.map_err(|e| PublishError::Ack { event_id: sent.event_id.clone(), reason: e.to_string() })?;
                    crate::failpoint::crash_point("after_ack");
                    acked_seq += 1;
                    if ack.sequence != acked_seq || ack.duplicate {
                        return Err(PublishError::Chain { event_id: sent.event_id, expected: acked_seq, got: ack.sequence });
                    }
                    self.acked_high.fetch_max(ack.sequence, std::sync::atomic::Ordering::SeqCst);
                    stats.acked(sent.entity, sent.action, sent.bytes, sent.dead_letter, sent.commit_micros, sent.at.elapsed());
                    progress.acked(sent.tenant.as_ref().map(|(t, s)| (t, *s)), ack.sequence);
                    drain_ready(&mut pending, &mut progress);
                }
                batch = items.recv(), if input_open && acks.len() < self.max_in_flight => match batch {
                    Some(batch) => {
                        // Index first: once a message is sent a subscriber may see it and
                        // ask the catch-up service about it, which must already know it.
                        self.index.record(&positions(&batch, next_seq), next_seq + events_in(&batch));
                        if let Some(replayed) = batch.iter().rev().find_map(|i| match i {
                            Item::Published { stream_seq, .. } => Some(*stream_seq),
                            _ => None,
                        }) {
                            self.index.replayed_through(replayed);
                        }
                        for item in batch {
                            match item {
                                Item::Event(event) => {
                                    let sent = Sent::of(&event);
                                    self.republish.sent(next_seq, &event);
                                    acks.push_back(self.publish(event, next_seq - 1).await?.into_future());
                                    pending.push_back(Pending::Event(sent));
                                    crate::failpoint::crash_point("after_publish");
                                    next_seq += 1;
                                }
                                Item::Boundary(lsn) => pending.push_back(Pending::Boundary(lsn)),
                                Item::Published { tenant, stream_seq } => {
                                    pending.push_back(Pending::Published { tenant, stream_seq });
                                }
                            }
                        }
                        drain_ready(&mut pending, &mut progress);
                    }
                    None => input_open = false,
                },
                _ = tick.tick() => {
                    stats.flush();
                    if let Some(seg) = progress.cut(Instant::now(), false) {
                        segments.send(seg).await.map_err(|_| PublishError::Downstream)?;
                    }
                }
            }
            if !input_open && acks.is_empty() {
                self.republish.finish();
                stats.flush();
                drain_ready(&mut pending, &mut progress);
                if let Some(seg) = progress.cut(Instant::now(), true) {
                    segments
                        .send(seg)
                        .await
                        .map_err(|_| PublishError::Downstream)?;
                }
                return Ok(());
            }
        }
    }

    async fn publish(
        &mut self,
        event: OutEvent,
        expected_last: u64,
    ) -> Result<PublishAckFuture, PublishError> {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", event.event_id.as_str());
        headers.insert(
            "Nats-Expected-Last-Sequence",
            expected_last.to_string().as_str(),
        );
        match &event.route {
            Route::Tenant { tenant, seq } => {
                headers.insert("Walcast-Tenant", &**tenant);
                headers.insert("Walcast-Seq", seq.to_string().as_str());
            }
            Route::DeadLetter { reason } => headers.insert("Walcast-Reason", *reason),
            Route::System => {}
        }
        headers.insert("Walcast-Lsn", event.commit_lsn.to_string().as_str());
        headers.insert("Content-Type", "application/x-protobuf");
        let payload = self.oversized.fit(&self.js, &event, &mut headers).await?;
        let publish = jetstream::message::PublishMessage::build()
            .headers(headers)
            .payload(payload);
        self.js
            .send_publish(event.subject, publish)
            .await
            .map_err(|e| PublishError::Nats(format!("publish {}: {e}", event.event_id)))
    }
}

/// The stream sequence every tenant event of `batch` gets (or already has).
fn positions(batch: &[Item], mut next_seq: u64) -> Vec<(Arc<str>, u64, u64)> {
    let mut out = Vec::with_capacity(batch.len());
    for item in batch {
        match item {
            Item::Event(event) => {
                if let Route::Tenant { tenant, seq } = &event.route {
                    out.push((tenant.clone(), *seq, next_seq));
                }
                next_seq += 1;
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
