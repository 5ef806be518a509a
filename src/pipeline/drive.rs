//! The second phase of a run: read the slot, hand batches to the publisher,
//! pass confirmations back to Postgres, until shutdown or the first error.
//! The drain order on a clean stop is written here once: stop reading →
//! the publisher flushes and awaits acks → the checkpointer writes the last
//! checkpoint → the final confirmation is sent → the stream ends.

use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

use super::prepare::Prepared;
use super::reader::{Reader, Skip, read_batch};
use super::watchdog::{broker_loss, watch_holes, watch_postgres};
use super::{Context, PipelineError, Replicating};
use crate::assemble::Assembler;
use crate::catchup;
use crate::checkpoint::{self, Checkpoint};
use crate::events::{EventBuilder, Sequencer, Tables};
use crate::handoff::Item;
use crate::lsn::Lsn;
use crate::position::StreamSeq;
use crate::publish::{self, PublishError, Publisher};
use crate::source::Source;
use crate::state;

/// How long a stopping run waits for its last catch-up segments to be saved.
const SAVE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// The tasks beside the reader, and what the reader talks to them through.
struct Stages {
    items: Option<mpsc::Sender<Vec<Item>>>,
    confirms: watch::Receiver<Lsn>,
    publishing: JoinHandle<Result<(), PublishError>>,
    checkpointing: JoinHandle<Result<(), crate::database::DbError>>,
    watchdog: JoinHandle<()>,
    dog: oneshot::Receiver<PipelineError>,
    /// Watches for new holes in the stream while the run goes on.
    hole_watch: JoinHandle<()>,
    holes: oneshot::Receiver<PipelineError>,
    catchup: catchup::CatchupService,
    /// Saves the catch-up index's positions (ends after the publisher).
    saving: JoinHandle<()>,
    /// `None` when the state bucket is turned off.
    state: Option<state::StateService>,
    /// Messages missing from the middle of the stream when the run started.
    missing: u64,
}

/// Runs until `shutdown` flips to true (clean stop: drain, checkpoint,
/// confirm) or an error.
pub(super) async fn drive(
    ctx: &Context,
    prepared: Prepared,
    shutdown: &mut watch::Receiver<bool>,
) -> Result<(), PipelineError> {
    let s = &ctx.settings;
    let mut assembler = replayer(&s.subject_prefix, s.tables.clone(), &prepared.checkpoint)
        .with_sources(prepared.sources.clone());
    tracing::info!(
        start = %prepared.start,
        stream_seq = prepared.last_seq.0,
        tenants = prepared.checkpoint.tenants.len(),
        "replicating"
    );
    ctx.health.set_replicating(true);
    let _ready = Replicating(&ctx.health);
    let mut reader = Reader {
        assembler: &mut assembler,
        skip: Skip::after(&prepared.checkpoint, &prepared.reconciled),
        last_boundary: prepared.start,
    };
    let (mut stages, mut source) = spawn_stages(ctx, prepared).await?;
    let failure = read_until_stopped(ctx, &mut source, &mut reader, &mut stages, shutdown).await;
    let result = finish(failure, stages).await;
    if result.is_ok() {
        source.close().await;
    }
    result
}

/// The assembler a run replays the slot with: seqs go on from the
/// checkpoint's, and transactions the checkpoint counts are skipped.
pub(super) fn replayer(prefix: &str, tables: Tables, checkpoint: &Checkpoint) -> Assembler {
    let sequencer = Sequencer::from_checkpoint(checkpoint.tenants.clone());
    let builder = EventBuilder::new(prefix.to_string(), sequencer);
    Assembler::new(tables, builder, checkpoint.lsn)
}

/// Starts the catch-up service, the publisher, the checkpointer and the
/// watchdog for a run; hands back the replication stream for the reader.
async fn spawn_stages(
    ctx: &Context,
    prepared: Prepared,
) -> Result<(Stages, Source), PipelineError> {
    let Prepared {
        sql,
        source,
        sink,
        checkpoint,
        owner,
        start,
        last_seq,
        reconciled,
        oversized,
        ..
    } = prepared;
    let s = &ctx.settings;
    let (items_tx, items_rx) = mpsc::channel::<Vec<Item>>(64);
    let (segments_tx, segments_rx) = mpsc::channel(1024);
    let (confirm_tx, confirms) = watch::channel(start);
    let index = catchup::Index::default();
    let (catchup, saving, journal) = start_catchup(ctx, &index, &checkpoint, last_seq).await?;
    // Likewise the state bucket: one writer, the slot's holder; it starts
    // (and restarts) on its own thread without holding up the run.
    // It reads what this run publishes from the publisher, once acknowledged.
    let feed = s
        .state_bucket
        .is_some()
        .then(|| state::feed::Feed::new(last_seq.next().0));
    let state = state::start(s, &ctx.db, &ctx.health, feed.clone())?;
    let publisher = Publisher {
        sink,
        max_in_flight: s.max_in_flight,
        oversized: publish::oversized::Oversized::to(oversized),
        index,
        journal: Some(journal),
        acked: ctx.acked.clone(),
        republish: publish::republish::Republish::below(reconciled.acked_high),
        feed,
    };
    let tail = reconciled.tail;
    let publishing = tokio::spawn(publisher.run(items_rx, segments_tx, tail));
    let checkpointer = checkpoint::Checkpointer {
        store: ctx.db.connect().await?,
        slot: s.slot.clone(),
        owner,
        delay: s.confirm_delay,
        health: ctx.health.clone(),
    };
    let checkpointed = checkpoint.stream_seq;
    let checkpointing = tokio::spawn(checkpointer.run(checkpoint, segments_rx, confirm_tx));
    let (dog_tx, dog) = oneshot::channel();
    let watchdog = tokio::spawn(watch_postgres(sql, s.slot.clone(), dog_tx));
    let (holes_tx, holes) = oneshot::channel();
    let hole_watch = tokio::spawn(watch_holes(
        ctx.js.clone(),
        s.stream.clone(),
        reconciled.missing,
        checkpointed,
        ctx.health.clone(),
        holes_tx,
    ));
    let stages = Stages {
        items: Some(items_tx),
        confirms,
        publishing,
        checkpointing,
        watchdog,
        dog,
        hole_watch,
        holes,
        catchup,
        saving,
        state,
        missing: reconciled.missing,
    };
    Ok((stages, source))
}

/// The catch-up side of a run: the service answering from `index` (on its
/// own thread and connection until the run ends: only the slot's holder
/// answers), the task saving its positions, and the journal the publisher
/// hands them to.
async fn start_catchup(
    ctx: &Context,
    index: &catchup::Index,
    checkpoint: &Checkpoint,
    last_seq: StreamSeq,
) -> Result<(catchup::CatchupService, JoinHandle<()>, catchup::Journal), PipelineError> {
    let s = &ctx.settings;
    index.seed(&checkpoint.tenants);
    // Until the events already in the stream are replayed, the index is
    // behind the stream: the catch-up service answers "unavailable" meanwhile.
    index.expect_replay_through(last_seq);
    index.replayed_through(checkpoint.stream_seq);
    index.record(&[], last_seq.next());
    // Positions up to `through` come from the segments earlier runs saved
    // (and the stream); this run records and saves the ones after it. Not
    // past the stream's tail at start: after a broker loss this run
    // republishes there, and old segments may say otherwise.
    let through = checkpoint.stream_seq.min(last_seq);
    let place = catchup::Place {
        db: ctx.db.clone(),
        slot: s.slot.clone(),
        stream: s.stream.clone(),
    };
    let (loaded_tx, loaded_rx) = oneshot::channel();
    let (saved_tx, saved_rx) = mpsc::channel(catchup::saved::WRITER_QUEUE);
    let catchup = catchup::start(s, index.clone(), through, Some(place.clone()), loaded_tx).await?;
    let saving = tokio::spawn(catchup::saved::write(
        place,
        through.next(),
        loaded_rx,
        saved_rx,
    ));
    Ok((
        catchup,
        saving,
        catchup::Journal::new(through.next(), saved_tx),
    ))
}

/// Reads until shutdown or an error, passing confirmations through; returns
/// the reader's own failure, if any. Ends when the checkpointer does (after
/// a clean drain, or because it failed).
async fn read_until_stopped(
    ctx: &Context,
    source: &mut Source,
    reader: &mut Reader<'_>,
    stages: &mut Stages,
    shutdown: &mut watch::Receiver<bool>,
) -> Option<PipelineError> {
    let mut failure = None;
    let mut connects = ctx.connects.clone();
    connects.borrow_and_update();
    loop {
        let reading = stages.items.is_some();
        tokio::select! {
            biased;
            // A dead Postgres connection can be silent for minutes while idle.
            Ok(error) = &mut stages.dog, if reading => {
                failure = Some(error);
                stages.items = None;
            }
            // Messages deleted from the middle while connected.
            Ok(error) = &mut stages.holes, if reading => {
                failure = Some(error);
                stages.items = None;
            }
            // A catch-up service that stops on its own fails the run: the
            // next run starts a new one (a standby never answers, nor may the
            // active instance stop answering). The state service restarts
            // itself; only its thread's end (a panic) gets here.
            error = stages.catchup.failed(), if reading => {
                failure = Some(error.into());
                stages.items = None;
            }
            error = state_failed(&mut stages.state), if reading => {
                failure = Some(error.into());
                stages.items = None;
            }
            // SPEC §4.7: on every reconnection, compare the stream's tail with
            // what this process saw acknowledged; a shorter stream means loss,
            // and the restart from the checkpoint republishes it. New holes
            // in its middle restart the run too, which names them.
            Ok(()) = connects.changed(), if reading => {
                connects.borrow_and_update();
                if let Some(loss) = broker_loss(&ctx.js, &ctx.settings.stream, &ctx.acked, stages.missing).await {
                    failure = Some(loss);
                    stages.items = None;
                }
            }
            _ = shutdown.changed(), if reading => {
                if *shutdown.borrow() {
                    stages.items = None; // the publisher drains, then the checkpointer finishes
                }
            }
            changed = stages.confirms.changed() => {
                if changed.is_err() {
                    return failure; // checkpointer finished (clean stop) or failed
                }
                let confirmed = *stages.confirms.borrow_and_update();
                source.confirm(confirmed);
            }
            result = read_batch(source, reader), if reading => match result {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    let sent = match &stages.items { Some(tx) => tx.send(batch).await.is_ok(), None => true };
                    if !sent {
                        stages.items = None; // publisher failed; its error is collected below
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    stages.items = None;
                }
            },
            // The publisher stopped (it failed): stop reading, collect its error.
            _ = closed(&stages.items), if reading => stages.items = None,
        }
    }
}

async fn state_failed(
    state: &mut Option<state::StateService>,
) -> crate::service_thread::ServiceError {
    match state {
        Some(state) => state.failed().await,
        None => std::future::pending().await,
    }
}

async fn closed<T>(tx: &Option<mpsc::Sender<T>>) {
    match tx {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// Waits for the publisher and the checkpointer and reports the root cause:
/// the reader's failure first, then the publisher's, then the
/// checkpointer's; the publisher's "checkpointer stopped" only if nothing
/// else explains it.
async fn finish(failure: Option<PipelineError>, mut stages: Stages) -> Result<(), PipelineError> {
    drop(stages.items);
    stages.watchdog.abort();
    stages.hole_watch.abort();
    let published = joined("publisher", stages.publishing.await);
    let checkpointed = joined("checkpointer", stages.checkpointing.await);
    // The last segments (the publisher is done: nothing more comes), so the
    // next start reads back as little as possible; never for long.
    let _ = tokio::time::timeout(SAVE_WAIT, &mut stages.saving).await;
    stages.saving.abort();
    let downstream =
        |e: &PipelineError| matches!(e, PipelineError::Publish(PublishError::Downstream));
    let (published, publish_downstream) = match published {
        Err(e) if downstream(&e) => (None, Some(e)),
        other => (other.err(), None),
    };
    match failure
        .or(published)
        .or(checkpointed.err())
        .or(publish_downstream)
    {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

fn joined<E: Into<PipelineError>>(
    task: &str,
    outcome: Result<Result<(), E>, tokio::task::JoinError>,
) -> Result<(), PipelineError> {
    match outcome {
        Ok(result) => result.map_err(Into::into),
        Err(e) => Err(PipelineError::Fatal(format!(
            "{task} task ended abnormally: {e}"
        ))),
    }
}
