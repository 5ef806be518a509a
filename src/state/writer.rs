//! Pipelined writes to the state bucket, acknowledged in the order sent.
//!
//! JetStream stores the publishes of one connection in the order it
//! receives them, so a window of unacknowledged writes keeps the bucket in
//! stream order while the writer never waits a round trip per row.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishErrorKind};
use async_nats::jetstream::{self};
use bytes::Bytes;

/// Unacknowledged writes (and skipped positions behind them) at most.
pub const WINDOW: usize = 1024;

struct Pending {
    ack: Option<PublishAckFuture>,
    /// The stream position this write (or skipped event) completes.
    position: u64,
}

/// Writes of one task, in order.
pub struct Writer {
    js: jetstream::Context,
    /// `$KV.<bucket>.`
    subject_prefix: String,
    pending: VecDeque<Pending>,
    /// Every position up to this one is written (or needed no write).
    acked: Arc<AtomicU64>,
    pub written: u64,
    /// Create-only writes that found the key present (a newer value or a
    /// delete marker): the backfill's older copy is not written.
    pub kept_newer: u64,
}

impl Writer {
    pub fn new(js: jetstream::Context, bucket: &str, acked: Arc<AtomicU64>) -> Self {
        Writer {
            js,
            subject_prefix: format!("$KV.{bucket}."),
            pending: VecDeque::new(),
            acked,
            written: 0,
            kept_newer: 0,
        }
    }

    /// Sends a write of `key`, completing `position` once acknowledged.
    pub async fn send(
        &mut self,
        key: &str,
        headers: HeaderMap,
        payload: Bytes,
        position: u64,
    ) -> Result<(), String> {
        self.make_room().await?;
        let ack = self
            .js
            .publish_with_headers(format!("{}{key}", self.subject_prefix), headers, payload)
            .await
            .map_err(|e| format!("write {key} to the state bucket on NATS: {e}"))?;
        self.pending.push_back(Pending {
            ack: Some(ack),
            position,
        });
        Ok(())
    }

    /// `position` needs no write; it completes after the writes before it.
    pub async fn skip(&mut self, position: u64) -> Result<(), String> {
        if self.pending.is_empty() {
            self.acked.fetch_max(position, Ordering::SeqCst);
            return Ok(());
        }
        self.make_room().await?;
        self.pending.push_back(Pending {
            ack: None,
            position,
        });
        Ok(())
    }

    /// Every position up to this one is written (or needed no write).
    pub fn applied(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    /// Every write sent so far is acknowledged.
    pub fn is_settled(&self) -> bool {
        self.pending.is_empty()
    }

    /// Waits for every write sent so far.
    pub async fn flush(&mut self) -> Result<(), String> {
        while !self.pending.is_empty() {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn make_room(&mut self) -> Result<(), String> {
        while self.pending.len() >= WINDOW {
            self.settle_one().await?;
        }
        Ok(())
    }

    async fn settle_one(&mut self) -> Result<(), String> {
        let Some(next) = self.pending.pop_front() else {
            return Ok(());
        };
        if let Some(ack) = next.ack {
            match ack.await {
                Ok(_) => self.written += 1,
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => self.kept_newer += 1,
                Err(e) => {
                    return Err(format!(
                        "NATS did not acknowledge a write to the state bucket: {e}"
                    ));
                }
            }
        }
        self.acked.fetch_max(next.position, Ordering::SeqCst);
        Ok(())
    }
}

/// Adds the header that makes a write create-only: it fails (and is counted
/// in [`Writer::kept_newer`]) when the key has any entry, a delete marker too.
pub fn create_only(headers: &mut HeaderMap) {
    headers.insert("Nats-Expected-Last-Subject-Sequence", "0");
}
