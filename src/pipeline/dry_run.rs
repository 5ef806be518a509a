//! `--dry-run`: replicate, decode and build events, publish nothing.
//!
//! Useful to check what walcast would publish, and to measure decoding and
//! event building alone. It never writes a checkpoint and never confirms the
//! slot, so a dry run cannot make a later real run skip anything.

use tokio::sync::watch;

use super::prepare::Checked;
use super::reader::{Reader, Skip, read_batch};
use super::{Context, PipelineError, Replicating};
use crate::assemble::Assembler;
use crate::events::{EventBuilder, Sequencer};
use crate::handoff::Item;
use crate::position::StreamSeq;
use crate::source::Source;
use crate::source::{preflight, slot};
use crate::telemetry::metrics as m;

/// Reads until shutdown, counting the events it would publish.
pub(super) async fn run(
    ctx: &Context,
    shutdown: &mut watch::Receiver<bool>,
    checked: Checked,
) -> Result<(), PipelineError> {
    let s = &ctx.settings;
    let slot = slot::read(&checked.sql, &s.slot)
        .await?
        .ok_or_else(|| preflight::slot_dropped(&s.slot))?;
    let checkpoint = checked.checkpoint.unwrap_or_default();
    let start = checkpoint.lsn.max(slot.confirmed_flush);
    let builder = EventBuilder::new(
        s.subject_prefix.clone(),
        Sequencer::from_checkpoint(checkpoint.tenants),
    );
    let mut assembler =
        Assembler::new(s.tables.clone(), builder, checkpoint.lsn).with_sources(checked.sources);
    let mut source = Source::start(&ctx.db, &s.slot, &s.publication, start).await?;
    tracing::warn!(%start, "dry run: events are built but not published, and the slot is not confirmed");
    ctx.health.set_replicating(true);
    let _ready = Replicating(&ctx.health);
    let mut reader = Reader {
        assembler: &mut assembler,
        skip: Skip::new(0, StreamSeq(0), None),
        last_boundary: start,
    };
    loop {
        tokio::select! {
            _ = shutdown.changed() => if *shutdown.borrow() { break },
            batch = read_batch(&mut source, &mut reader) => {
                let events = batch?.iter().filter(|item| matches!(item, Item::Event(_))).count();
                metrics::counter!(m::EVENTS_BUILT).increment(events as u64);
            }
        }
    }
    source.close().await;
    Ok(())
}
