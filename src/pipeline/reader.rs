//! The read side of a run: source events → decoded messages → assembled
//! items, in batches, with already-published events turned into counts.

use futures::FutureExt;

use super::foreign::Foreign;
use super::prepare::Reconciled;
use super::{BATCH, PipelineError};
use crate::assemble::Assembler;
use crate::checkpoint::Checkpoint;
use crate::decode;
use crate::events::{Route, parse_event_id};
use crate::handoff::Item;
use crate::lsn::Lsn;
use crate::position::StreamSeq;
use crate::publish::PublishError;
use crate::publish::holes::{Hole, HoleLoss, Lost};
use crate::source::{Source, SourceError, SourceEvent};

/// Reads one batch: at least one event (waiting for it), then whatever is
/// already buffered, up to [`BATCH`] items.
pub(super) async fn read_batch(
    source: &mut Source,
    reader: &mut Reader<'_>,
) -> Result<Vec<Item>, PipelineError> {
    let mut out = Vec::with_capacity(BATCH);
    let first = source
        .next()
        .await?
        .ok_or_else(|| SourceError::Replication("stream ended".into()))?;
    reader.handle(first, &mut out)?;
    while out.len() < BATCH {
        match source.next().now_or_never() {
            Some(next) => {
                let event = next?.ok_or_else(|| SourceError::Replication("stream ended".into()))?;
                reader.handle(event, &mut out)?;
            }
            None => break,
        }
    }
    Ok(out)
}

/// Decode → assemble → skip what is already published.
pub(super) struct Reader<'a> {
    pub(super) assembler: &'a mut Assembler,
    pub(super) skip: Skip,
    pub(super) last_boundary: Lsn,
}

impl Reader<'_> {
    pub(super) fn handle(
        &mut self,
        event: SourceEvent,
        out: &mut Vec<Item>,
    ) -> Result<(), PipelineError> {
        let from = out.len();
        match &event {
            SourceEvent::Data(bytes) => self.assembler.handle(decode::decode(bytes)?, out)?,
            SourceEvent::KeepAlive(lsn) => {
                if !self.assembler.in_transaction() && *lsn > self.last_boundary {
                    out.push(Item::Boundary(*lsn));
                }
            }
            other => {
                if let Some(msg) = other.as_message() {
                    self.assembler.handle(msg, out)?;
                }
            }
        }
        // In place: a split-off tail would allocate per source message.
        let mut i = from;
        while i < out.len() {
            match &out[i] {
                Item::Boundary(lsn) => {
                    self.last_boundary = self.last_boundary.max(*lsn);
                    // Nothing is confirmed (so nothing checkpointed) while the
                    // replay of what the stream holds is not yet verified
                    // against the stream's last message.
                    if self.skip.remaining > 0 {
                        out.remove(i);
                        continue;
                    }
                }
                Item::Event(event) if self.skip.remaining > 0 => out[i] = self.skip.take(event)?,
                _ => {}
            }
            i += 1;
        }
        Ok(())
    }
}

/// Events a previous run already published, to count but not resend.
///
/// Some of their positions may be holes (`publish::holes`): the events the
/// replay puts there are the lost ones. Once the replay is past the last
/// hole it names them all (tenant and seq) and stops the run — JetStream
/// cannot take them back in place — unless the operator accepted those
/// holes (`--accept-holes-through`): then an ERROR names them and the run
/// goes on.
pub(super) struct Skip {
    remaining: u64,
    next_stream_seq: StreamSeq,
    /// Positions of messages walcast did not publish: no event goes there.
    foreign: Foreign,
    tail_id: Option<String>,
    holes: Vec<Hole>,
    /// The first of `holes` not yet behind the replay.
    hole_at: usize,
    accept_through: StreamSeq,
    /// Holes that took only tenants' oldest events (judged by this process:
    /// `pipeline::retention`).
    oldest_removed: Vec<Hole>,
    lost: Lost,
    stream: String,
}

impl Skip {
    /// What reconciliation found past the checkpoint.
    pub(super) fn after(checkpoint: &Checkpoint, reconciled: &Reconciled) -> Self {
        let mut skip = Skip::new(
            reconciled.already,
            checkpoint.stream_seq,
            reconciled.tail_id.clone(),
        );
        skip.holes = reconciled.holes.clone();
        skip.foreign = reconciled.foreign.clone();
        skip.accept_through = reconciled.accept_through;
        skip.oldest_removed = reconciled.oldest_removed.clone();
        skip.stream = checkpoint.stream.clone();
        skip
    }

    pub(super) fn new(
        remaining: u64,
        checkpoint_stream_seq: StreamSeq,
        tail_id: Option<String>,
    ) -> Self {
        Skip {
            remaining,
            next_stream_seq: checkpoint_stream_seq.next(),
            foreign: Foreign::default(),
            tail_id,
            holes: Vec::new(),
            hole_at: 0,
            accept_through: StreamSeq(0),
            oldest_removed: Vec::new(),
            lost: Lost::default(),
            stream: String::new(),
        }
    }

    /// Notes the event the replay puts at `stream_seq` if that position is
    /// a hole; past the last hole, stops the run or reports (see [`Skip`]).
    fn check_hole(
        &mut self,
        stream_seq: StreamSeq,
        event: &crate::events::OutEvent,
    ) -> Result<(), PipelineError> {
        let Some(end) = self.holes.last().map(|h| h.last) else {
            return Ok(());
        };
        // The replay's positions only grow: holes behind it are done with
        // (O(events + holes), however many holes a broker made).
        while self.hole_at < self.holes.len() && self.holes[self.hole_at].last < stream_seq {
            self.hole_at += 1;
        }
        if self
            .holes
            .get(self.hole_at)
            .is_some_and(|h| h.contains(stream_seq))
        {
            let tenant = match &event.route {
                Route::Tenant { tenant, seq } => Some((&**tenant, *seq)),
                _ => None,
            };
            self.lost.record(&event.event_id, tenant);
        }
        if stream_seq < end {
            return Ok(());
        }
        let ranges = std::mem::take(&mut self.holes);
        let holes = crate::publish::holes::describe(&ranges);
        let lost = std::mem::take(&mut self.lost);
        let lsns = lost
            .ids
            .as_ref()
            .and_then(|(a, b)| Some((parse_event_id(a)?.0, parse_event_id(b)?.0)))
            .map(|(a, b)| format!("{a}..={b}"))
            .unwrap_or_default();
        let stream = &self.stream;
        if crate::publish::holes::covered(&ranges, &self.oldest_removed) {
            tracing::info!(
                stream = %stream,
                missing = %holes,
                lost = %lost.describe(),
                "going on past holes that took only tenants' oldest events"
            );
            return Ok(());
        }
        if end <= self.accept_through {
            tracing::error!(
                stream = %stream,
                missing = %holes,
                events = lost.events,
                lost = %lost.describe(),
                lsns = %lsns,
                accepted_through = %self.accept_through,
                "stream messages are missing from the middle of the stream; --accept-holes-through accepts them, \
                 so walcast goes on without them: consumers of the named tenants must re-sync from the database"
            );
            return Ok(());
        }
        let message = format!(
            "stream {stream} is missing messages {holes} from its middle (deleted, or lost by the broker): {} events, \
             {} (commit LSNs {lsns}). The slot still holds them, but JetStream cannot put a message back at its old \
             position and appending them would break each tenant's stream order, so walcast stops rather than go on \
             past the hole. Re-sync those tenants' consumers from the database, then restart with \
             --accept-holes-through {end} (WALCAST_ACCEPT_HOLES_THROUGH) to go on without them; see README \
             \"Broker data loss\"",
            lost.events,
            lost.describe(),
        );
        Err(PublishError::LostInHoles(Box::new(HoleLoss {
            message,
            holes,
            ranges,
            lost,
        }))
        .into())
    }

    fn take(&mut self, event: &crate::events::OutEvent) -> Result<Item, PipelineError> {
        self.remaining -= 1;
        let stream_seq = self.foreign.skip(self.next_stream_seq);
        self.next_stream_seq = stream_seq.next();
        self.check_hole(stream_seq, event)?;
        if self.remaining == 0
            && let Some(tail) = &self.tail_id
            && *tail != event.event_id
        {
            return Err(PipelineError::Fatal(format!(
                "the stream's last message is event {tail}, but replaying the slot from the checkpoint gives {} at that \
                 position: the stream holds messages walcast did not publish, or the checkpoint belongs to another \
                 stream. Point walcast at its own stream",
                event.event_id
            )));
        }
        let tenant = match &event.route {
            Route::Tenant { tenant, seq } => Some((tenant.clone(), *seq)),
            _ => None,
        };
        Ok(Item::Published { tenant, stream_seq })
    }
}
