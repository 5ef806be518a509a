//! `/metrics` (Prometheus text), `/healthz` (process up), `/readyz` (200 only
//! while replicating and NATS is connected). They answer from the process's
//! start: while NATS is still waited for (up to `--startup-timeout`),
//! `/healthz` says the process is up and `/readyz` "waiting for NATS", so a
//! liveness probe does not restart an instance that only waits for its
//! broker.

use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::health::Health;
use super::metrics;

struct AppState {
    health: Arc<Health>,
    /// Set once NATS is connected ([`Server::connected`]).
    nats: OnceLock<async_nats::Client>,
}

/// The running endpoints; they stop when this is dropped.
pub struct Server {
    task: tokio::task::JoinHandle<()>,
    state: Arc<AppState>,
}

impl Server {
    /// NATS is connected: `/readyz` asks this client from now on.
    pub fn connected(&self, nats: async_nats::Client) {
        let _ = self.state.nats.set(nats);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Serves the endpoints until the returned [`Server`] is dropped.
pub async fn serve(addr: &str, health: Arc<Health>) -> std::io::Result<Server> {
    let handle = metrics::install();
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let state = Arc::new(AppState {
        health,
        nats: OnceLock::new(),
    });
    let app = Router::new()
        .route(
            "/metrics",
            get(move |State(state): State<Arc<AppState>>| async move {
                if let Some(age) = state.health.checkpoint_age_secs() {
                    ::metrics::gauge!(metrics::CHECKPOINT_AGE_SECONDS).set(age as f64);
                }
                handle.render()
            }),
        )
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(state.clone());
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!(error = %e, "HTTP endpoint stopped");
        }
    });
    Ok(Server { task, state })
}

async fn ready(State(state): State<Arc<AppState>>) -> (StatusCode, &'static str) {
    let Some(nats) = state.nats.get() else {
        return (StatusCode::SERVICE_UNAVAILABLE, "waiting for NATS\n");
    };
    let nats_up = nats.connection_state() == async_nats::connection::State::Connected;
    match (state.health.is_replicating(), nats_up) {
        (true, true) => (StatusCode::OK, "ready\n"),
        (false, _) => (StatusCode::SERVICE_UNAVAILABLE, "not replicating\n"),
        (true, false) => (StatusCode::SERVICE_UNAVAILABLE, "NATS disconnected\n"),
    }
}
