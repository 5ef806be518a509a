//! `/metrics` (Prometheus text), `/healthz` (process up), `/readyz` (200 only
//! while replicating and NATS is connected).

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;

use super::health::Health;
use super::metrics;

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
                if let Some(age) = state.health.checkpoint_age_secs() {
                    ::metrics::gauge!(metrics::CHECKPOINT_AGE_SECONDS).set(age as f64);
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
