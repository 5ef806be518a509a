//! `walcast backfill`: a backfill on demand. It asks for one through the
//! bucket's readiness marker (`requested`), which the instance holding the
//! slot acts on — a running `walcast run`, or, when none runs, this process
//! running the daemon itself until the backfill is complete. So a backfill
//! always happens where the projection runs (docs/STATE.md says why that
//! matters), and never twice at once.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream;

use super::bucket::{self, Marker};
use crate::app::{self, AppError};
use crate::config::Settings;
use crate::database::Database;

/// How often the marker is read while waiting.
const POLL: Duration = Duration::from_millis(500);

/// Requests a backfill and waits for it; returns the completed marker.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<Marker, AppError> {
    let name = settings.state_bucket.clone().ok_or_else(|| {
        AppError::State(
            "the state is turned off (--state-bucket is empty): there is nothing to backfill"
                .into(),
        )
    })?;
    let client = crate::broker::connect(&settings).await?.client;
    let js = jetstream::new(client);
    let bucket = bucket::ensure(&js, &name, settings.stream_replicas)
        .await
        .map_err(AppError::State)?;
    bucket::set_marker(
        &js,
        &name,
        &Marker::new("requested", None, None),
        applied(&bucket).await?,
    )
    .await
    .map_err(AppError::State)?;
    let done = until_complete(bucket);
    if slot_is_active(&settings).await? {
        tracing::info!("a walcast run holds the slot: it runs the backfill; waiting for it");
        tokio::select! {
            marker = done => marker,
            _ = shutdown => Err(AppError::State("interrupted; the running walcast completes the backfill".into())),
        }
    } else {
        tracing::info!(
            "no walcast run holds the slot: running the pipeline here until the backfill is complete"
        );
        let (tx, rx) = tokio::sync::oneshot::channel();
        let stop = async move {
            tokio::select! {
                marker = done => { let _ = tx.send(marker); }
                _ = shutdown => {}
            }
        };
        app::run(settings, stop).await?;
        rx.await.unwrap_or_else(|_| {
            Err(AppError::State(
                "interrupted before the backfill completed; it completes at the next start".into(),
            ))
        })
    }
}

async fn applied(bucket: &bucket::Bucket) -> Result<u64, AppError> {
    bucket::applied_through(bucket)
        .await
        .map_err(AppError::State)
}

/// Completes with the marker once it says `complete`.
async fn until_complete(bucket: bucket::Bucket) -> Result<Marker, AppError> {
    let mut last_rows = None;
    loop {
        if let Some(marker) = bucket::marker(&bucket.stream, &bucket.name)
            .await
            .map_err(AppError::State)?
        {
            if marker.is_complete() {
                return Ok(marker);
            }
            if marker.rows != last_rows {
                last_rows = marker.rows;
                tracing::info!(state = %marker.state, rows = marker.rows.unwrap_or(0), "backfill");
            }
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Whether some process streams the slot now.
async fn slot_is_active(settings: &Settings) -> Result<bool, AppError> {
    let sql = Database::parse(&settings.database_url)?.connect().await?;
    let row = sql
        .query_opt(
            "SELECT active FROM pg_replication_slots WHERE slot_name = $1",
            &[&settings.slot],
        )
        .await
        .map_err(crate::database::query_err("read the replication slot"))?;
    Ok(row.is_some_and(|r| r.get::<_, bool>(0)))
}
