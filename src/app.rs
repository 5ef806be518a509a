//! Wires the stages and supervises runs: connect, run the pipeline, and on a
//! transient failure retry with capped exponential backoff and jitter, from
//! the durable checkpoint. Shutdown is an argument, so tests stop the daemon
//! precisely; the drain order is: stop reading → flush publishes → await
//! acks → checkpoint → confirm LSN.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

use crate::config::Settings;
use crate::database::Database;
use crate::error_policy::{self, Decision};
use crate::pipeline::{self, PipelineError};
use crate::secrets::redact_url;
use crate::source::SourceError;

/// Why the daemon stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Pipeline(#[from] PipelineError),
    #[error(transparent)]
    Broker(#[from] crate::broker::BrokerError),
    #[error(transparent)]
    Db(#[from] crate::database::DbError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error("state bucket: {0}")]
    State(String),
    #[error("cannot serve metrics on --http-addr {addr}: {reason} (is another process using it?)")]
    Http { addr: String, reason: String },
}

/// A run that lasted this long resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(60);

/// Runs the daemon until `shutdown` completes (exit 0) or a failure needs an operator.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    if settings.auth.is_some() {
        crate::auth::validate(&settings)?;
    }
    let ctx = connect(settings).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    // The auth callout (SPEC §9) runs beside the pipeline for the daemon's
    // whole life, standby or not: logins need it, the slot does not.
    let auth = ctx.0.settings.auth.is_some().then(|| {
        tokio::spawn(crate::auth::supervise(
            ctx.0.settings.clone(),
            None,
            stop_rx.clone(),
        ))
    });
    let result = supervise(&ctx.0, stop_rx).await;
    if let Some(auth) = auth {
        auth.abort();
        let _ = auth.await;
    }
    result
}

/// Everything a run needs that outlives runs: settings, the database
/// address, the NATS connection (it reconnects by itself), health and the
/// HTTP endpoints (kept alive by the second field).
async fn connect(
    settings: Settings,
) -> Result<(pipeline::Context, crate::telemetry::http::Server), AppError> {
    let db = Database::parse(&settings.database_url)?;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        database = %db.redacted(),
        nats = %redact_url(&settings.nats_url),
        slot = %settings.slot,
        publication = %settings.publication,
        stream = %settings.stream,
        confirm_delay = ?settings.confirm_delay,
        "walcast starting"
    );
    let crate::broker::Connection {
        client: nats,
        connects,
    } = crate::broker::connect(&settings).await?;
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(10))
        // The publisher bounds in-flight publishes itself (it admits a batch
        // while fewer than max_in_flight await acks, and it is the only task
        // polling them). The client's own permits must never be the binding
        // limit: waiting for one inside the publisher would deadlock it.
        .max_ack_inflight(settings.max_in_flight + 2 * crate::pipeline::BATCH)
        .backpressure_on_inflight(false)
        .build(nats);
    let health = Arc::new(Health::default());
    crate::telemetry::metrics::install();
    let http = crate::telemetry::http::serve(&settings.http_addr, health.clone(), js.client())
        .await
        .map_err(|e| AppError::Http {
            addr: settings.http_addr.clone(),
            reason: e.to_string(),
        })?;
    let ctx = pipeline::Context {
        connects,
        acked_high: Default::default(),
        settings,
        db,
        js,
        health,
    };
    Ok((ctx, http))
}

/// Starts runs until a clean stop or an error the policy says to stop on
/// (see `error_policy`): transient errors retry with backoff, a busy slot
/// waits as a standby, and at startup Postgres and NATS are waited for at
/// most `--startup-timeout`.
async fn supervise(
    ctx: &pipeline::Context,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AppError> {
    let mut attempt = 0u32;
    let startup = Instant::now();
    loop {
        let began = Instant::now();
        let replications_before = ctx.health.replications();
        let result = pipeline::run(ctx, &mut stop).await;
        if *stop.borrow() && result.is_ok() {
            tracing::info!("stopped cleanly");
            return Ok(());
        }
        let error = result
            .err()
            .unwrap_or_else(|| SourceError::Replication("replication stream ended".into()).into());
        metrics::counter!(m::ERRORS, "stage" => error.stage()).increment(1);
        let started = ctx.health.ever_replicated();
        let decision = error_policy::decide(&error, started);
        if decision == Decision::Stop {
            return Err(error.into());
        }
        if !started
            && decision != Decision::Standby
            && startup.elapsed() >= ctx.settings.startup_timeout
        {
            tracing::error!(timeout = ?ctx.settings.startup_timeout, "gave up waiting for Postgres and NATS at startup");
            return Err(error.into());
        }
        // A run that reached replication was a successful (re)connection:
        // the next outage starts the backoff from the beginning again.
        if began.elapsed() > HEALTHY_RUN || ctx.health.replications() > replications_before {
            attempt = 0;
        }
        metrics::counter!(m::PIPELINE_RESTARTS, "stage" => error.stage()).increment(1);
        let wait = error_policy::run_backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::warn!(stage = error.stage(), error = %error, retry_in = ?wait, attempt, "pipeline interrupted; restarting from the checkpoint");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.changed() => {
                tracing::info!("stopped while waiting to retry");
                return Ok(());
            }
        }
    }
}
