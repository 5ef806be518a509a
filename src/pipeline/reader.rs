//! The read side of a run: source events → decoded messages → assembled
//! items, in batches, with already-published events turned into counts.

use futures::FutureExt;

use super::prepare::Reconciled;
use super::{BATCH, PipelineError};
use crate::assemble::Assembler;
use crate::checkpoint::Checkpoint;
use crate::decode;
use crate::events::Route;
use crate::handoff::Item;
use crate::lsn::Lsn;
use crate::position::StreamSeq;
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
pub(super) struct Skip {
    remaining: u64,
    next_stream_seq: StreamSeq,
    tail_id: Option<String>,
}

impl Skip {
    /// What reconciliation found past the checkpoint.
    pub(super) fn after(checkpoint: &Checkpoint, reconciled: &Reconciled) -> Self {
        Skip::new(
            reconciled.already,
            checkpoint.stream_seq,
            reconciled.tail_id.clone(),
        )
    }

    pub(super) fn new(
        remaining: u64,
        checkpoint_stream_seq: StreamSeq,
        tail_id: Option<String>,
    ) -> Self {
        Skip {
            remaining,
            next_stream_seq: checkpoint_stream_seq.next(),
            tail_id,
        }
    }

    fn take(&mut self, event: &crate::events::OutEvent) -> Result<Item, PipelineError> {
        self.remaining -= 1;
        let stream_seq = self.next_stream_seq;
        self.next_stream_seq = self.next_stream_seq.next();
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
