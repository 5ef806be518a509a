//! One browser connection: a walcast subscription forwarded as JSON.
//!
//! Invariant: the socket carries the tenant's events in `seq` order, each
//! once, starting at `after_seq + 1` (or after a re-sync message). The
//! subscription guarantees it; this loop only translates, and ends the
//! subscription as soon as the browser is gone.

use axum::extract::ws::{CloseFrame, Message, WebSocket, close_code};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;
use walcast_client::{Client, Error, Update};

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
    let mut updates = match client.subscribe(&tenant, after_seq) {
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
                Some(Ok(Update::Event(event))) => match walcast_client::json::to_string(&event) {
                    Ok(text) => text,
                    Err(e) => return close(socket, &format!("encode event: {e}")).await,
                },
                Some(Ok(Update::Resync { tenant_id, oldest_seq, last_seq })) => json!({"resync": {
                    "tenantId": tenant_id,
                    "reason": "too_old",
                    "oldestSeq": oldest_seq.to_string(),
                    "lastSeq": last_seq.to_string(),
                }})
                .to_string(),
                // The browser's seq is not from this stream (e.g. it was
                // re-created): it must reload too; go on from the stream's tail.
                Some(Err(Error::Ahead { last_seq, .. })) => match client.subscribe(&tenant, last_seq) {
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
