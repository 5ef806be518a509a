//! One browser connection: the tenant's rows, then its events, as JSON.
//!
//! Invariant: the socket carries either the events after the browser's
//! `after_seq`, or a snapshot of the tenant's rows (loaded from walcast's
//! state bucket with [`Client::load_and_follow`], never from Postgres)
//! followed by the events after its `asOfSeq`; in `seq` order, each once. A
//! browser too far behind (or from another stream) gets a `resync` and a
//! fresh snapshot. The client library guarantees the order; this loop only
//! translates, and ends the subscription as soon as the browser is gone.

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures::StreamExt;
use futures::stream::BoxStream;
use serde_json::json;
use tokio::sync::watch;
use walcast_client::{Client, Error, Snapshot, StateUpdate};

/// What the socket relays: a snapshot (when loading) then events.
type Feed = BoxStream<'static, Result<StateUpdate, Error>>;

/// The tenant's rows from the state bucket, then its events.
fn load(client: &Client, tenant: &str) -> Result<Feed, Error> {
    Ok(client.load_and_follow(tenant)?.boxed())
}

/// The tenant's events after `after_seq` (a reconnecting browser).
fn follow(client: &Client, tenant: &str, after_seq: u64) -> Result<Feed, Error> {
    Ok(client
        .subscribe(tenant, after_seq)?
        .map(|update| update.map(StateUpdate::from))
        .boxed())
}

/// `{"snapshot":{"tenantId","asOfSeq","rows":[ChangeEvent JSON…]}}`.
fn snapshot_json(snapshot: &Snapshot) -> serde_json::Result<String> {
    let rows = snapshot
        .rows
        .values()
        .map(walcast_client::json::to_value)
        .collect::<serde_json::Result<Vec<_>>>()?;
    Ok(json!({"snapshot": {
        "tenantId": snapshot.tenant_id,
        "asOfSeq": snapshot.as_of_seq.to_string(),
        "rows": rows,
    }})
    .to_string())
}

pub async fn run(
    mut socket: WebSocket,
    client: Client,
    tenant: String,
    after_seq: u64,
    mut shutdown: watch::Receiver<bool>,
) {
    tracing::info!(%tenant, after_seq, "browser connected");
    let hello = json!({"connected": {"tenantId": tenant, "afterSeq": after_seq.to_string()}});
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_err()
    {
        return;
    }
    // A fresh page (after_seq 0) loads the rows; a reconnecting one resumes.
    let feed = if after_seq == 0 {
        load(&client, &tenant)
    } else {
        follow(&client, &tenant, after_seq)
    };
    let mut updates = match feed {
        Ok(updates) => updates,
        Err(e) => return close(socket, &e.to_string()).await,
    };
    loop {
        let text = tokio::select! {
            incoming = socket.recv() => match incoming {
                // The browser sends nothing we act on (and never a tenant).
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(_)) => continue,
            },
            _ = async { shutdown.wait_for(|stop| *stop).await.map(|_| ()) } => {
                let frame = CloseFrame { code: close_code::AWAY, reason: "gateway shutting down".into() };
                let _ = socket.send(Message::Close(Some(frame))).await;
                break;
            }
            update = updates.next() => match update {
                Some(Ok(StateUpdate::Snapshot(snapshot))) => match snapshot_json(&snapshot) {
                    Ok(text) => text,
                    Err(e) => return close(socket, &format!("encode snapshot: {e}")).await,
                },
                Some(Ok(StateUpdate::Event(event))) => match walcast_client::json::to_string(&event) {
                    Ok(text) => text,
                    Err(e) => return close(socket, &format!("encode event: {e}")).await,
                },
                // Too far behind: the events are gone, the rows are not.
                // Reload them from the state; its snapshot follows.
                Some(Ok(StateUpdate::Resync { tenant_id, oldest_seq, last_seq })) => match load(&client, &tenant) {
                    Ok(fresh) => {
                        updates = fresh;
                        json!({"resync": {
                            "tenantId": tenant_id,
                            "reason": "too_old",
                            "oldestSeq": oldest_seq.to_string(),
                            "lastSeq": last_seq.to_string(),
                        }})
                        .to_string()
                    }
                    Err(e) => return close(socket, &e.to_string()).await,
                },
                // The browser's seq is not from this stream (e.g. it was
                // re-created): it reloads too, from the state.
                Some(Err(Error::Ahead { last_seq, .. })) => match load(&client, &tenant) {
                    Ok(fresh) => {
                        updates = fresh;
                        json!({"resync": {"tenantId": tenant, "reason": "ahead", "lastSeq": last_seq.to_string()}})
                            .to_string()
                    }
                    Err(e) => return close(socket, &e.to_string()).await,
                },
                Some(Err(e)) => return close(socket, &e.to_string()).await,
                None => return close(socket, "subscription ended").await,
            },
        };
        if socket.send(Message::Text(text.into())).await.is_err() {
            break;
        }
    }
    tracing::info!(%tenant, "browser disconnected");
}

/// Tells the browser why, then closes with 1011 (server error).
async fn close(mut socket: WebSocket, reason: &str) {
    tracing::warn!(%reason, "closing a browser connection");
    let _ = socket
        .send(Message::Text(json!({"error": reason}).to_string().into()))
        .await;
    let frame = CloseFrame {
        code: close_code::ERROR,
        reason: "walcast subscription failed".into(),
    };
    let _ = socket.send(Message::Close(Some(frame))).await;
}
