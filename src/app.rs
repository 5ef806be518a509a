//! Wires the stages and supervises runs: connect, run the pipeline, and on a
//! transient failure retry with capped exponential backoff and jitter, from
//! the durable checkpoint. Shutdown is an argument, so tests stop the daemon
//! precisely; the drain order is: stop reading → flush publishes → await
//! acks → checkpoint → confirm LSN.
//!
//! A stop is never forgotten (SPEC §5: exit 0 within a few seconds): it is
//! watched from the first moment, while NATS is waited for too; a run that
//! ends after it is not retried, whatever its end; a run still preparing is
//! left at once, and a drain that cannot finish (NATS or Postgres away) is
//! left after [`DRAIN_BUDGET`]. Leaving loses nothing: the slot is confirmed
//! only through what JetStream acknowledged, and the next start resumes
//! from the checkpoint.

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

/// How long a stop waits for a replicating run to drain (flush, await acks,
/// checkpoint, confirm). A healthy drain takes well under a second; one that
/// takes longer waits on an unreachable NATS or Postgres (an ack times out
/// only after 10 s, a Postgres query after 30 s), and leaving it loses
/// nothing (see the module doc).
pub const DRAIN_BUDGET: Duration = Duration::from_secs(5);

/// Runs the daemon until `shutdown` completes (exit 0) or a failure needs an operator.
pub async fn run(
    settings: Settings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), AppError> {
    let stop_rx = watch_stop(shutdown).await;
    if settings.auth.is_some() {
        crate::auth::validate(&settings)?;
    }
    let ctx = tokio::select! {
        connected = connect(settings) => connected?,
        () = requested(stop_rx.clone()) => {
            tracing::info!("stopped while waiting for NATS");
            return Ok(());
        }
    };
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

/// Watches `shutdown` from now on: the receiver turns true when it
/// completes. The binary's signal handlers are installed when `shutdown` is
/// first polled, so this lets its task run before anything waits: a
/// SIGTERM while NATS is waited for stops the daemon (exit 0) instead of
/// killing it.
async fn watch_stop(shutdown: impl Future<Output = ()> + Send + 'static) -> watch::Receiver<bool> {
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    tokio::task::yield_now().await;
    stop_rx
}

/// Completes once a stop is requested (at once if it already was); never
/// if none can come anymore. Takes its own receiver: the pipeline's
/// `changed()` must still see the stop.
async fn requested(mut stop: watch::Receiver<bool>) {
    if stop.wait_for(|stopping| *stopping).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Everything a run needs that outlives runs: settings, the database
/// address, the NATS connection (it reconnects by itself), health and the
/// HTTP endpoints (kept alive by the second field). The endpoints answer
/// from the start: while NATS is waited for (up to `--startup-timeout`),
/// `/healthz` says the process is up and `/readyz` that it is not ready.
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
    let health = Arc::new(Health::default());
    let http = crate::telemetry::http::serve(&settings.http_addr, health.clone())
        .await
        .map_err(|e| http_error(&settings.http_addr, e))?;
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
    http.connected(js.client());
    let ctx = pipeline::Context {
        connects,
        acked: Default::default(),
        oldest_removed: Default::default(),
        settings,
        db,
        js,
        health,
    };
    Ok((ctx, http))
}

fn http_error(addr: &str, error: std::io::Error) -> AppError {
    AppError::Http {
        addr: addr.to_string(),
        reason: error.to_string(),
    }
}

/// How a run ended.
enum Ended {
    /// It returned: a clean stop, or an error.
    Ran(Result<(), PipelineError>),
    /// A stop came before it replicated: it was left at once (it had read
    /// nothing, so it had nothing to flush).
    Preparing,
    /// A stop came while it replicated, and it was left after draining for
    /// [`DRAIN_BUDGET`].
    DrainOverdue,
}

/// Starts runs until a stop or an error the policy says to stop on (see
/// `error_policy`): transient errors retry with backoff, a busy slot waits
/// as a standby, and at startup Postgres and NATS are waited for at most
/// `--startup-timeout`. Once a stop is requested nothing is retried.
async fn supervise(
    ctx: &pipeline::Context,
    mut stop: watch::Receiver<bool>,
) -> Result<(), AppError> {
    let mut attempt = 0u32;
    let startup = Instant::now();
    loop {
        let began = Instant::now();
        let replications_before = ctx.health.replications();
        let result = match run_once(ctx, &mut stop).await {
            Ended::Ran(result) if !*stop.borrow() => result,
            ended => return stopped(ctx, ended),
        };
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
            () = requested(stop.clone()) => {
                tracing::info!("stopped while waiting to retry");
                return Ok(());
            }
        }
    }
}

/// One run, left early once a stop makes waiting for it pointless: at once
/// while it prepares (its NATS and Postgres waits can be long: a stream
/// leader election alone is waited for 15 s), after [`DRAIN_BUDGET`] while
/// it drains.
async fn run_once(ctx: &pipeline::Context, stop: &mut watch::Receiver<bool>) -> Ended {
    let overdue = overdue(stop.clone(), &ctx.health);
    tokio::select! {
        biased;
        result = pipeline::run(ctx, stop) => Ended::Ran(result),
        ended = overdue => ended,
    }
}

async fn overdue(stop: watch::Receiver<bool>, health: &Health) -> Ended {
    requested(stop).await;
    if !health.is_replicating() {
        return Ended::Preparing;
    }
    tokio::time::sleep(DRAIN_BUDGET).await;
    Ended::DrainOverdue
}

/// What a run's end means once a stop was requested: the daemon exits, and
/// the run is never retried. Exit 0 unless the run's error needs an
/// operator anyway (`Decision::Stop`): a transient failure of the final
/// drain (NATS or Postgres away) loses nothing, since what JetStream did
/// not acknowledge was neither checkpointed nor confirmed to Postgres.
fn stopped(ctx: &pipeline::Context, ended: Ended) -> Result<(), AppError> {
    const NOT_FLUSHED: &str = "stopped without the final flush: changes JetStream did not acknowledge \
        were neither checkpointed nor confirmed to Postgres; the next start resumes from the \
        checkpoint and publishes them";
    match ended {
        Ended::Ran(Ok(())) => tracing::info!("stopped cleanly"),
        Ended::Preparing => tracing::info!("stopped before replicating: nothing to flush"),
        Ended::Ran(Err(error)) => {
            metrics::counter!(m::ERRORS, "stage" => error.stage()).increment(1);
            if error_policy::decide(&error, ctx.health.ever_replicated()) == Decision::Stop {
                return Err(error.into());
            }
            tracing::warn!(stage = error.stage(), error = %error, "{NOT_FLUSHED}");
        }
        Ended::DrainOverdue => tracing::warn!(
            waited = ?DRAIN_BUDGET,
            "the drain did not finish in time (is NATS or Postgres unreachable?); {NOT_FLUSHED}"
        ),
    }
    Ok(())
}
