//! Pipelined writes to the state bucket, acknowledged in the order sent.
//!
//! JetStream stores the publishes of one connection in the order it
//! receives them, so a window of unacknowledged writes keeps the bucket in
//! stream order while the writer never waits a round trip per row.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream;
use bytes::Bytes;

use crate::headers::Headers;
use crate::publish::acks::Verdict;
use crate::publish::sink::NatsReplies;

/// Unacknowledged writes (and skipped positions behind them) at most.
pub const WINDOW: usize = 1024;

/// An ack not received this long after its write fails the service (it
/// starts again from the bucket).
const ACK_WAIT: Duration = Duration::from_secs(10);

struct Pending {
    /// The token of the write's ack; `None` for a skipped position.
    ack: Option<u64>,
    /// The stream position this write (or skipped event) completes.
    position: u64,
}

/// Writes of one task, in order.
///
/// Every write is acknowledged on its own (a key's write cannot stand for
/// another's), but through one ack subscription with a token per write —
/// not async-nats' request per publish (an inbox, a oneshot, a permit and a
/// timer each, and a JSON parse through an untagged enum): measured, that
/// was most of the state service's CPU per write.
pub struct Writer {
    client: async_nats::Client,
    replies: NatsReplies,
    /// `$KV.<bucket>.`
    subject_prefix: String,
    pending: VecDeque<Pending>,
    /// The next write's ack token.
    token: u64,
    /// Acks that arrived ahead of an earlier write's (JetStream answers in
    /// order; nothing here relies on it).
    early: BTreeMap<u64, Verdict>,
    /// Every position up to this one is written (or needed no write).
    acked: Arc<AtomicU64>,
    pub written: u64,
    /// Create-only writes that found the key present (a newer value or a
    /// delete marker): the backfill's older copy is not written.
    pub kept_newer: u64,
}

impl Writer {
    pub async fn new(
        js: &jetstream::Context,
        bucket: &str,
        acked: Arc<AtomicU64>,
    ) -> Result<Self, String> {
        let client = js.client();
        let replies = NatsReplies::subscribe(&client)
            .await
            .map_err(|e| format!("state bucket {bucket}: {e}"))?;
        Ok(Writer {
            client,
            replies,
            subject_prefix: format!("$KV.{bucket}."),
            pending: VecDeque::new(),
            token: 0,
            early: BTreeMap::new(),
            acked,
            written: 0,
            kept_newer: 0,
        })
    }

    /// Sends a write of `key`, completing `position` once acknowledged.
    pub async fn send(
        &mut self,
        key: &str,
        headers: &Headers<'_>,
        payload: Bytes,
        position: u64,
    ) -> Result<(), String> {
        self.make_room().await?;
        self.token += 1;
        let mut subject = String::with_capacity(self.subject_prefix.len() + key.len());
        subject.push_str(&self.subject_prefix);
        subject.push_str(key);
        let reply = self.replies.subject_for(self.token);
        self.client
            .publish_with_raw_headers(subject, Some(reply), headers.block(), payload)
            .await
            .map_err(|e| format!("write {key} to the state bucket on NATS: {e}"))?;
        self.pending.push_back(Pending {
            ack: Some(self.token),
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
        if let Some(token) = next.ack {
            match self.ack(token).await? {
                Verdict::Stored { .. } => self.written += 1,
                Verdict::WrongLast(_) => self.kept_newer += 1,
                Verdict::Rejected(reason) => {
                    return Err(format!(
                        "NATS refused a write to the state bucket: {reason}"
                    ));
                }
                Verdict::NoResponders => {
                    return Err(
                        "NATS did not acknowledge a write to the state bucket: no responders (the bucket's stream has no leader, or is gone)".into(),
                    );
                }
            }
        }
        self.acked.fetch_max(next.position, Ordering::SeqCst);
        Ok(())
    }

    /// The ack of write `token` (a timer only when it is not in yet).
    async fn ack(&mut self, token: u64) -> Result<Verdict, String> {
        loop {
            if let Some(verdict) = self.early.remove(&token) {
                return Ok(verdict);
            }
            let next = self.replies.next_token();
            tokio::pin!(next);
            let got = match futures::poll!(&mut next) {
                std::task::Poll::Ready(got) => got,
                std::task::Poll::Pending => tokio::time::timeout(ACK_WAIT, next)
                    .await
                    .map_err(|_| {
                        format!("NATS did not acknowledge a write to the state bucket within {ACK_WAIT:?}")
                    })?,
            };
            match got {
                Some((got, verdict)) if got == token => return Ok(verdict),
                // An ack of a write this writer gave up on cannot come; one
                // ahead of `token` waits for its turn.
                Some((got, verdict)) if got > token => {
                    self.early.insert(got, verdict);
                }
                Some(_) => {}
                None => return Err("the state bucket's ack subscription ended".into()),
            }
        }
    }
}

/// Adds the header that makes a write create-only: it fails (and is counted
/// in [`Writer::kept_newer`]) when the key has any entry, a delete marker too.
pub fn create_only(headers: &mut Headers<'_>) {
    headers.insert(crate::headers::EXPECTED_LAST_SUBJECT_SEQUENCE, 0);
}
