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
use crate::pipeline::{self, PipelineError};
use crate::publish::PublishError;
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
    let _http = crate::telemetry::http::serve(&settings.http_addr, health.clone(), js.client())
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

    let (stop_tx, mut stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let mut attempt = 0u32;
    let startup = Instant::now();
    loop {
        let began = Instant::now();
        let replications_before = ctx.health.replications();
        let result = pipeline::run(&ctx, &mut stop_rx).await;
        if *stop_rx.borrow() && result.is_ok() {
            tracing::info!("stopped cleanly");
            return Ok(());
        }
        let error = match result {
            Ok(()) => {
                PipelineError::Source(SourceError::Replication("replication stream ended".into()))
            }
            Err(e) => e,
        };
        metrics::counter!(m::ERRORS, "stage" => error.stage()).increment(1);
        let started = ctx.health.ever_replicated();
        // JetStream can be briefly unavailable while a NATS server restarts:
        // only at startup does "no JetStream" mean a misconfigured server.
        let retry = error.is_transient()
            || (started && matches!(error, PipelineError::Publish(PublishError::NoJetStream(_))));
        if !retry {
            return Err(error.into());
        }
        // A standby waits for the slot for as long as the active instance holds it.
        let standby = matches!(error, PipelineError::Source(SourceError::SlotBusy(_)));
        if !started && !standby && startup.elapsed() >= ctx.settings.startup_timeout {
            tracing::error!(timeout = ?ctx.settings.startup_timeout, "gave up waiting for Postgres and NATS at startup");
            return Err(error.into());
        }
        // A run that reached replication was a successful (re)connection:
        // the next outage starts the backoff from the beginning again.
        if began.elapsed() > HEALTHY_RUN || ctx.health.replications() > replications_before {
            attempt = 0;
        }
        metrics::counter!(m::PIPELINE_RESTARTS, "stage" => error.stage()).increment(1);
        let wait = pipeline::backoff(attempt);
        attempt = attempt.saturating_add(1);
        tracing::warn!(stage = error.stage(), error = %error, retry_in = ?wait, attempt, "pipeline interrupted; restarting from the checkpoint");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop_rx.changed() => {
                tracing::info!("stopped while waiting to retry");
                return Ok(());
            }
        }
    }
}
