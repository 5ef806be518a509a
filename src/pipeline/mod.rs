//! One run of the pipeline, from the durable checkpoint to a clean stop or
//! the first error. Every failure — a crash, a NATS or Postgres outage, a
//! broker that lost acknowledged messages — is recovered the same way: the
//! supervisor starts a new run, and the run reconciles the stream with the
//! checkpoint before publishing anything.
//!
//! Reconciliation (why no event is lost, duplicated or renumbered):
//! the stream is a gap-free prefix of walcast's event order (expected-last-
//! sequence chaining in `publish`), and the checkpoint says "events before
//! LSN `c` end at stream message `s`". Replaying the slot from `c` rebuilds
//! the same events with the same ids and seqs, in the same order, so the
//! first `last_seq - s` of them are exactly the ones already in the stream:
//! they are counted but not sent again. If the stream holds fewer than `s`
//! messages, the broker lost events the slot no longer has: stop, loudly.

mod dry_run;
mod reader;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::{mpsc, watch};

use crate::assemble::{AssembleError, Assembler};
use crate::catchup;
use crate::checkpoint::{self, store};
use crate::config::Settings;
use crate::database::{Database, DbError, query_err, with_timeout};
use crate::decode::DecodeError;
use crate::events::{EventBuilder, Sequencer};
use crate::lsn::Lsn;
use crate::publish::{self, Item, PublishError, Publisher};
use crate::service_thread::ServiceError;
use crate::source::{Source, SourceError, slot};
use crate::telemetry::http::Health;
use reader::{Reader, Skip, read_batch};

/// Why a run ended early.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Assemble(#[from] AssembleError),
    #[error("cannot decode the replication stream: {0}")]
    Decode(#[from] DecodeError),
    /// A service beside the pipeline (catch-up) did not start or stopped.
    #[error(transparent)]
    Service(#[from] ServiceError),
    /// Needs an operator: retrying cannot fix it.
    #[error("{0}")]
    Fatal(String),
}

impl PipelineError {
    /// The stage that failed, for logs and the `stage` metric label.
    pub fn stage(&self) -> &'static str {
        match self {
            PipelineError::Db(_) => "database",
            PipelineError::Source(_) => "replication",
            PipelineError::Publish(_) => "publish",
            PipelineError::Assemble(_) => "assemble",
            PipelineError::Decode(_) => "decode",
            PipelineError::Service(e) => e.service(),
            PipelineError::Fatal(_) => "fatal",
        }
    }

    /// Retry with backoff, or stop and tell the operator.
    pub fn is_transient(&self) -> bool {
        match self {
            PipelineError::Db(e) => e.is_transient(),
            PipelineError::Source(e) => e.is_transient(),
            PipelineError::Publish(e) => e.is_transient(),
            PipelineError::Assemble(_) | PipelineError::Service(_) => true,
            PipelineError::Decode(_) | PipelineError::Fatal(_) => false,
        }
    }
}

/// Shared across runs: settings and the NATS connection (which reconnects by itself).
pub struct Context {
    pub settings: Settings,
    pub db: Database,
    pub js: jetstream::Context,
    pub health: Arc<Health>,
    /// Ticks on every NATS (re)connection.
    pub connects: watch::Receiver<u64>,
    /// The highest stream sequence this process has seen acknowledged: if the
    /// stream later ends below it, the broker lost acknowledged messages.
    pub acked_high: Arc<AtomicU64>,
}

/// Marks the instance ready while a run holds the slot.
struct Replicating<'a>(&'a Health);

impl Drop for Replicating<'_> {
    fn drop(&mut self) {
        self.0.set_replicating(false);
    }
}

/// Items per batch handed to the publisher.
pub const BATCH: usize = 512;

/// Runs until `shutdown` flips to true (clean stop: drain, checkpoint,
/// confirm) or an error.
pub async fn run(ctx: &Context, shutdown: &mut watch::Receiver<bool>) -> Result<(), PipelineError> {
    let s = &ctx.settings;
    let sql = ctx.db.connect().await?;
    let sources = with_timeout("check wal_level and the publication", preflight(&sql, s)).await??;
    let had_checkpoint = with_timeout("read the checkpoint", store::load(&sql, &s.slot))
        .await??
        .is_some();
    prepare_slot(&sql, s, had_checkpoint).await?;
    if s.dry_run {
        let checkpoint = store::load(&sql, &s.slot).await?;
        let slot_state = slot::read(&sql, &s.slot)
            .await?
            .ok_or_else(|| slot_vanished(s))?;
        return dry_run::run(ctx, shutdown, checkpoint, slot_state, sources).await;
    }
    let mut stream = publish::stream::ensure(&ctx.js, s).await?;

    // Own the slot before reading any state: until START_REPLICATION
    // succeeds, another instance may still advance the slot and the
    // checkpoint. Starting at 0/0 means "at the slot's confirmed position".
    let mut source = Source::start(&ctx.db, &s.slot, &s.publication, Lsn(0)).await?;
    let slot_state = slot::read(&sql, &s.slot)
        .await?
        .ok_or_else(|| slot_vanished(s))?;
    let last_seq = stream
        .info()
        .await
        .map_err(|e| PublishError::Nats(format!("read stream info: {e}")))?
        .state
        .last_sequence;
    let checkpoint = match store::load(&sql, &s.slot).await? {
        Some(c) => c,
        None => {
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
    if checkpoint.stream != s.stream {
        return Err(PipelineError::Fatal(format!(
            "slot {} was checkpointed for stream {} but --stream is {}; use that stream or another slot",
            s.slot, checkpoint.stream, s.stream
        )));
    }
    if last_seq < checkpoint.stream_seq {
        return Err(PipelineError::Fatal(format!(
            "stream {} ends at message {} but messages up to {} were published and checkpointed at LSN {}: \
             the broker lost messages {}..={} and the slot no longer holds their WAL. Re-sync consumers and \
             see README \"Broker data loss\"",
            s.stream,
            last_seq,
            checkpoint.stream_seq,
            checkpoint.lsn,
            last_seq + 1,
            checkpoint.stream_seq
        )));
    }
    let already = last_seq - checkpoint.stream_seq;
    let tail_id = if already > 0 {
        tail_event_id(&stream, last_seq).await
    } else {
        None
    };
    if already > 0 {
        tracing::info!(
            messages = already,
            "stream is ahead of the checkpoint; replaying without republishing"
        );
    }
    let acked_high = ctx
        .acked_high
        .fetch_max(checkpoint.acked_seq, Ordering::SeqCst)
        .max(checkpoint.acked_seq);
    if last_seq < acked_high {
        tracing::warn!(
            stream = %s.stream,
            lost_from = last_seq + 1,
            lost_to = acked_high,
            "the broker lost messages it had acknowledged; republishing them from the slot with the same ids and seqs"
        );
    }

    let start = checkpoint.lsn.max(slot_state.confirmed_flush);
    let tenants = checkpoint.tenants.len();
    let builder = EventBuilder::new(
        s.subject_prefix.clone(),
        Sequencer::from_checkpoint(checkpoint.tenants.clone()),
    );
    let mut assembler =
        Assembler::new(s.tables.clone(), builder, checkpoint.lsn.0).with_sources(sources);
    tracing::info!(%start, stream_seq = last_seq, tenants, "replicating");
    ctx.health.set_replicating(true);
    let _ready = Replicating(&ctx.health);

    let (items_tx, items_rx) = mpsc::channel::<Vec<Item>>(64);
    let (segments_tx, segments_rx) = mpsc::channel(1024);
    let (confirm_tx, mut confirm_rx) = watch::channel(start);
    let index = catchup::Index::default();
    index.seed(&checkpoint.tenants);
    // Until the events already in the stream are replayed, the index is
    // behind the stream: the catch-up service answers "unavailable" meanwhile.
    index.expect_replay_through(last_seq);
    index.replayed_through(checkpoint.stream_seq);
    index.record(&[], last_seq + 1);
    // Only the instance holding the slot answers catch-up requests; it runs
    // on its own thread and connection until this run ends.
    let mut catchup = catchup::start(s, index.clone(), checkpoint.stream_seq).await?;
    let publisher = Publisher {
        js: ctx.js.clone(),
        stream: s.stream.clone(),
        max_in_flight: s.max_in_flight,
        oversized: publish::oversized::Oversized::new(
            &s.stream,
            s.stream_max_age,
            s.stream_replicas,
        ),
        index,
        acked_high: ctx.acked_high.clone(),
        republish: publish::republish::Republish::below(acked_high),
    };
    let publishing = tokio::spawn(publisher.run(items_rx, segments_tx, last_seq));
    let checkpointer = checkpoint::Checkpointer {
        client: ctx.db.connect().await?,
        slot: s.slot.clone(),
        owner,
        delay: s.confirm_delay,
        health: ctx.health.clone(),
    };
    let checkpointing = tokio::spawn(checkpointer.run(checkpoint.clone(), segments_rx, confirm_tx));

    let mut reader = Reader {
        assembler: &mut assembler,
        skip: Skip::new(already, checkpoint.stream_seq, tail_id),
        last_boundary: start.0,
    };
    let mut items_tx = Some(items_tx);
    let mut failure: Option<PipelineError> = None;
    let mut confirmed = start;
    // Read until shutdown or an error; keep passing confirmations through.
    let mut connects = ctx.connects.clone();
    connects.borrow_and_update();
    let (dog_tx, mut dog) = tokio::sync::oneshot::channel();
    let watchdog = tokio::spawn(watch_postgres(sql, s.slot.clone(), dog_tx));
    loop {
        tokio::select! {
            biased;
            // A dead Postgres connection can be silent for minutes while idle.
            Ok(error) = &mut dog, if items_tx.is_some() => {
                failure = Some(error);
                items_tx = None;
            }
            // A service that stops on its own fails the run: the next run
            // starts a new one (a standby never answers, nor may the active
            // instance stop answering).
            error = catchup.failed(), if items_tx.is_some() => {
                failure = Some(error.into());
                items_tx = None;
            }
            // SPEC §4.7: on every reconnection, compare the stream's tail with
            // what this process saw acknowledged; a shorter stream means loss,
            // and the restart from the checkpoint republishes it.
            Ok(()) = connects.changed(), if items_tx.is_some() => {
                connects.borrow_and_update();
                if let Some(loss) = broker_loss(&stream, &ctx.acked_high).await {
                    failure = Some(loss);
                    items_tx = None;
                }
            }
            _ = shutdown.changed(), if items_tx.is_some() => {
                if *shutdown.borrow() {
                    items_tx = None; // the publisher drains, then the checkpointer finishes
                }
            }
            changed = confirm_rx.changed() => {
                if changed.is_err() {
                    break; // checkpointer finished (clean stop) or failed
                }
                confirmed = *confirm_rx.borrow_and_update();
                source.confirm(confirmed);
            }
            result = read_batch(&mut source, &mut reader), if items_tx.is_some() => match result {
                Ok(batch) if batch.is_empty() => {}
                Ok(batch) => {
                    let sent = match &items_tx { Some(tx) => tx.send(batch).await.is_ok(), None => true };
                    if !sent {
                        items_tx = None; // publisher failed; its error is collected below
                    }
                }
                Err(e) => {
                    failure = Some(e);
                    items_tx = None;
                }
            },
            // The publisher stopped (it failed): stop reading, collect its error.
            _ = closed(&items_tx), if items_tx.is_some() => items_tx = None,
        }
    }
    drop(items_tx);
    watchdog.abort();
    let published = match publishing.await {
        Ok(result) => result.map_err(PipelineError::from),
        Err(e) => Err(PipelineError::Fatal(format!(
            "publisher task ended abnormally: {e}"
        ))),
    };
    let checkpointed = match checkpointing.await {
        Ok(result) => result.map_err(PipelineError::from),
        Err(e) => Err(PipelineError::Fatal(format!(
            "checkpointer task ended abnormally: {e}"
        ))),
    };
    // Report the root cause: when the checkpointer fails, the publisher only
    // sees its channel close ("checkpointer stopped").
    let downstream =
        |e: &PipelineError| matches!(e, PipelineError::Publish(PublishError::Downstream));
    let (published, publish_downstream) = match published {
        Err(e) if downstream(&e) => (None, Some(e)),
        other => (other.err(), None),
    };
    if let Some(e) = failure
        .or(published)
        .or(checkpointed.err())
        .or(publish_downstream)
    {
        return Err(e);
    }
    source.close(confirmed).await;
    Ok(())
}

async fn closed<T>(tx: &Option<mpsc::Sender<T>>) {
    match tx {
        Some(tx) => tx.closed().await,
        None => std::future::pending().await,
    }
}

/// How often the watchdog checks Postgres, and how long it waits for an answer.
const WATCHDOG_EVERY: Duration = Duration::from_secs(5);
const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Reports the first sign that the replication session is gone: Postgres
/// does not answer, the slot was dropped, or no process streams it any more.
async fn watch_postgres(
    sql: tokio_postgres::Client,
    slot: String,
    report: tokio::sync::oneshot::Sender<PipelineError>,
) {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let error = loop {
        tokio::time::sleep(WATCHDOG_EVERY).await;
        let probe = sql.query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &params,
        );
        match tokio::time::timeout(WATCHDOG_TIMEOUT, probe).await {
            Err(_) => {
                break PipelineError::Db(DbError::Timeout {
                    what: "watchdog probe",
                    seconds: WATCHDOG_TIMEOUT.as_secs(),
                });
            }
            Ok(Err(e)) => {
                break PipelineError::Db(DbError::Query {
                    what: "watchdog probe",
                    source: e,
                });
            }
            Ok(Ok(None)) => {
                break PipelineError::Fatal(format!(
                    "replication slot {slot} was dropped while walcast was streaming it: changes after it may be \
                     missing. See README \"Lost replication slot\""
                ));
            }
            Ok(Ok(Some(row))) if row.get::<_, Option<i32>>(0).is_none() => {
                break PipelineError::Source(SourceError::Replication(
                    "the replication session ended on the server".into(),
                ));
            }
            Ok(Ok(Some(_))) => {}
        }
    };
    let _ = report.send(error);
}

/// Creates the slot if missing (and walcast never ran on it), and checks it
/// is a pgoutput slot. A missing slot that has a checkpoint was dropped.
async fn prepare_slot(
    sql: &tokio_postgres::Client,
    s: &Settings,
    had_checkpoint: bool,
) -> Result<(), PipelineError> {
    let state = match slot::read(sql, &s.slot).await? {
        Some(state) => state,
        None if !had_checkpoint => {
            tracing::info!(slot = %s.slot, "creating replication slot");
            slot::ensure(sql, &s.slot).await?
        }
        None => return Err(slot_vanished(s)),
    };
    if state.is_lost() {
        return Err(PipelineError::Source(SourceError::SlotLost {
            slot: s.slot.clone(),
            reason: "wal_status is lost".into(),
        }));
    }
    if state.plugin.as_deref() != Some("pgoutput") {
        return Err(PipelineError::Fatal(format!(
            "replication slot {} uses plugin {:?}, walcast needs pgoutput: drop it or choose another --slot",
            s.slot, state.plugin
        )));
    }
    Ok(())
}

fn slot_vanished(s: &Settings) -> PipelineError {
    PipelineError::Fatal(format!(
        "replication slot {slot} is gone but walcast has a checkpoint for it: changes since then may be missing \
         from the stream. walcast will not silently recreate it. See README \"Lost replication slot\": re-sync \
         consumers, then `DELETE FROM walcast.checkpoints WHERE slot = '{slot}'` and start walcast again",
        slot = s.slot
    ))
}

/// The error to restart with if the stream now ends before what was acknowledged.
async fn broker_loss(
    stream: &jetstream::stream::Stream,
    acked_high: &AtomicU64,
) -> Option<PipelineError> {
    let mut stream = stream.clone();
    let last = stream.info().await.ok()?.state.last_sequence;
    let high = acked_high.load(Ordering::SeqCst);
    (last < high).then(|| {
        PipelineError::Publish(PublishError::BrokerLoss {
            stream: stream.cached_info().config.name.clone(),
            last,
            high,
        })
    })
}

/// The `Nats-Msg-Id` of the stream's last message, if it can still be read.
async fn tail_event_id(stream: &jetstream::stream::Stream, last_seq: u64) -> Option<String> {
    let msg = stream.get_raw_message(last_seq).await.ok()?;
    Some(msg.headers.get("Nats-Msg-Id")?.as_str().to_string())
}

/// Checks the database settings a run depends on, with fixes in the errors;
/// returns the source tables' OIDs.
async fn preflight(
    sql: &tokio_postgres::Client,
    s: &Settings,
) -> Result<Vec<(u32, crate::proto::Entity)>, PipelineError> {
    let wal_level: String = sql
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query_err("SHOW wal_level"))?
        .get(0);
    if wal_level != "logical" {
        return Err(PipelineError::Fatal(format!(
            "wal_level is {wal_level}, walcast needs logical: ALTER SYSTEM SET wal_level = logical; then restart Postgres"
        )));
    }
    Ok(crate::source::publication::verify(sql, s).await?)
}

/// Exposed for the supervisor's retry logs.
pub fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(8));
    let capped = base.min(Duration::from_secs(30));
    let jitter = rand::random_range(0.5..1.0);
    capped.mul_f64(jitter)
}
