//! One run of the pipeline, from the durable checkpoint to a clean stop or
//! the first error, in two phases: [`prepare`] (preconditions, slot,
//! fencing, reconciliation with the stream) and [`drive`] (read, publish,
//! checkpoint, confirm). Every failure — a crash, a NATS or Postgres outage,
//! a broker that lost acknowledged messages — is recovered the same way: the
//! supervisor starts a new run, and the run reconciles the stream with the
//! checkpoint before publishing anything.

mod drive;
mod dry_run;
pub(crate) mod foreign;
mod prepare;
mod reader;
mod retention;
#[cfg(test)]
mod tests;
mod watchdog;

use std::sync::Arc;

use async_nats::jetstream;
use tokio::sync::watch;

use crate::assemble::AssembleError;
use crate::config::Settings;
use crate::database::{Database, DbError};
use crate::decode::DecodeError;
use crate::publish::PublishError;
use crate::service_thread::ServiceError;
use crate::source::SourceError;
use crate::source::preflight::Violation;
use crate::telemetry::health::Health;

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
    /// A database precondition does not hold; the text says how to fix it.
    #[error(transparent)]
    Precondition(#[from] Violation),
    /// Needs an operator: retrying cannot fix it.
    #[error("{0}")]
    Fatal(String),
}

impl PipelineError {
    /// What [`PipelineError::stage`] names for the pipeline's own stages
    /// (services name theirs): the error counters shown at 0 from the start.
    pub const STAGES: [&'static str; 5] =
        ["database", "replication", "publish", "assemble", "decode"];

    /// The stage that failed, for logs and the `stage` metric label.
    pub fn stage(&self) -> &'static str {
        match self {
            PipelineError::Db(_) => "database",
            PipelineError::Source(_) => "replication",
            PipelineError::Publish(_) => "publish",
            PipelineError::Assemble(_) => "assemble",
            PipelineError::Decode(_) => "decode",
            PipelineError::Service(e) => e.service(),
            PipelineError::Precondition(_) => "precondition",
            PipelineError::Fatal(_) => "fatal",
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
    /// What this process has seen acknowledged: if the stream later ends
    /// below its highest, the broker lost acknowledged messages.
    pub acked: Arc<crate::publish::acked::Acked>,
    /// Holes that took only tenants' oldest events (`retention`): runs go
    /// on past exactly these (a later hole is judged anew).
    pub oldest_removed: Arc<std::sync::Mutex<Vec<crate::publish::holes::Hole>>>,
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
    let checked = prepare::check_database(ctx).await?;
    if ctx.settings.dry_run {
        return dry_run::run(ctx, shutdown, checked).await;
    }
    let prepared = prepare::prepare(ctx, checked).await?;
    match drive::drive(ctx, prepared, shutdown).await {
        Err(PipelineError::Publish(PublishError::LostInHoles(loss))) => {
            Err(retention::judge(ctx, *loss).await)
        }
        other => other,
    }
}
