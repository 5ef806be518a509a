//! Example realtime gateway: browsers connect over WebSocket with a tenant
//! token and receive that tenant's current rows, loaded from walcast's
//! state bucket (SPEC §8; never from Postgres), then its walcast events as
//! proto3 JSON, resuming from their last `seq` after any disconnect.
//!
//! The gateway holds no state per browser beyond the open socket: the
//! browser remembers the last `seq` it applied and sends it when it
//! reconnects (`/ws?token=…&after_seq=N`); [`walcast_client`] does the
//! rest (snapshot, catch-up, dedup, gap repair, re-sync signal). The tenant
//! comes only from the token (see [`config`]), never from anything the
//! browser sends.
//!
//! Wire protocol, one JSON text message each:
//! - `{"connected":{"tenantId":"acme","afterSeq":"41"}}` first;
//! - with `after_seq=0` (a fresh page), then
//!   `{"snapshot":{"tenantId":"acme","asOfSeq":"57","rows":[…]}}`: every
//!   current row of the tenant, each as its latest `ChangeEvent` (its
//!   `task`, `project` or `lock` is the row); the events after `asOfSeq`
//!   follow;
//! - a `ChangeEvent` in the proto3 JSON mapping (as `walcast tail` prints
//!   it; 64-bit numbers such as `seq` are strings) per event;
//! - `{"resync":{"tenantId":"acme","reason":"too_old","oldestSeq":"11","lastSeq":"57"}}`
//!   when the browser is too far behind (or `"reason":"ahead"`, without
//!   `oldestSeq`, when its `after_seq` is beyond anything the stream has):
//!   drop the rows and keep the socket; a fresh `snapshot` from the state
//!   follows, then the events after it;
//! - `{"error":"…"}` before the gateway closes the socket (code 1011).

#![warn(missing_docs)]

pub mod config;
mod session;

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Query, State, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tokio::sync::watch;

pub use config::Config;

/// The demo page: a live event list with the connection state.
const INDEX_HTML: &str = include_str!("../static/index.html");

/// Shared by every request.
struct AppState {
    client: walcast_client::Client,
    tokens: HashMap<String, String>,
    /// Flips to true when the gateway shuts down; open sockets close then.
    shutdown: watch::Receiver<bool>,
}

/// Serves the gateway on `listener` until `shutdown` completes; then every
/// open socket is closed with 1001 "going away" (browsers reconnect to the
/// next instance and resume from their last `seq`).
pub async fn serve(
    listener: tokio::net::TcpListener,
    config: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let client = walcast_client::Client::connect(&config.nats_url, config.walcast).await?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let state = Arc::new(AppState {
        client,
        tokens: config.tokens,
        shutdown: stop_rx,
    });
    let app = Router::new()
        .route("/", get(|| async { Html(INDEX_HTML) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/ws", get(ws))
        .with_state(state);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        })
        .await?;
    Ok(())
}

/// `/ws` query: the token (browsers cannot set headers on a WebSocket) and
/// the last `seq` the browser applied.
#[derive(Deserialize)]
struct WsQuery {
    token: Option<String>,
    after_seq: Option<u64>,
}

/// Authenticates, then upgrades. The tenant is the token's; `after_seq`
/// defaults to 0 (a fresh page: the snapshot of the tenant's rows first).
async fn ws(
    State(state): State<Arc<AppState>>,
    query: Result<Query<WsQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let Ok(Query(query)) = query else {
        return (
            StatusCode::BAD_REQUEST,
            "after_seq must be a non-negative integer",
        )
            .into_response();
    };
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_string);
    let Some(tenant) = query
        .token
        .or(bearer)
        .and_then(|t| state.tokens.get(&t).cloned())
    else {
        return (StatusCode::UNAUTHORIZED, "unknown or missing token").into_response();
    };
    let after_seq = query.after_seq.unwrap_or(0);
    let (client, shutdown) = (state.client.clone(), state.shutdown.clone());
    upgrade.on_upgrade(move |socket| session::run(socket, client, tenant, after_seq, shutdown))
}
