//! `/metrics` (Prometheus text), `/healthz` (process up), `/readyz` (200 only
//! while replicating and NATS is connected).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::metrics;

/// What the probes report, shared with the pipeline.
#[derive(Debug, Default)]
pub struct Health {
    replicating: AtomicBool,
    ever_replicated: AtomicBool,
    replications: AtomicU64,
    last_checkpoint_unix: AtomicU64,
}

impl Health {
    /// The pipeline holds the slot and its publisher runs.
    pub fn set_replicating(&self, on: bool) {
        self.replicating.store(on, Ordering::SeqCst);
        self.ever_replicated.fetch_or(on, Ordering::SeqCst);
        self.replications.fetch_add(u64::from(on), Ordering::SeqCst);
        ::metrics::gauge!(metrics::UP).set(if on { 1.0 } else { 0.0 });
    }

    /// How many runs reached replication.
    pub fn replications(&self) -> u64 {
        self.replications.load(Ordering::SeqCst)
    }

    /// Some run of this process reached replication (startup is over).
    pub fn ever_replicated(&self) -> bool {
        self.ever_replicated.load(Ordering::SeqCst)
    }

    pub fn is_replicating(&self) -> bool {
        self.replicating.load(Ordering::SeqCst)
    }

    /// A checkpoint became durable now.
    pub fn checkpointed(&self) {
        let now = unix_now();
        self.last_checkpoint_unix.store(now, Ordering::SeqCst);
        ::metrics::gauge!(metrics::LAST_CHECKPOINT_TIMESTAMP).set(now as f64);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

struct AppState {
    health: Arc<Health>,
    nats: async_nats::Client,
}

/// The running endpoints; they stop when this is dropped.
pub struct Server(tokio::task::JoinHandle<()>);

impl Drop for Server {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Serves the endpoints until the returned [`Server`] is dropped.
pub async fn serve(
    addr: &str,
    health: Arc<Health>,
    nats: async_nats::Client,
) -> std::io::Result<Server> {
    let handle = metrics::install();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let state = Arc::new(AppState { health, nats });
    let app = Router::new()
        .route(
            "/metrics",
            get(move |State(state): State<Arc<AppState>>| async move {
                let last = state.health.last_checkpoint_unix.load(Ordering::SeqCst);
                if last > 0 {
                    ::metrics::gauge!(metrics::CHECKPOINT_AGE_SECONDS)
                        .set(unix_now().saturating_sub(last) as f64);
                }
                handle.render()
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state);
    Ok(Server(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    })))
}

async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    let nats_up = state.nats.connection_state() == async_nats::connection::State::Connected;
    match (state.health.is_replicating(), nats_up) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not replicating\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "NATS disconnected\n"),
    }
}
