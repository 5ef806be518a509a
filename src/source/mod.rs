//! Replication source: the walsender connection, through pgwire-replication.
//!
//! It owns the slot's confirmed position on the wire: [`Source::confirm`] is
//! the only way an LSN reaches Postgres, and it is called only with positions
//! the checkpointer has made durable. Keepalives are answered by the library,
//! which reports the last confirmed position, never more.

pub mod failover;
pub mod preflight;
pub mod publication;
pub mod slot;
pub mod writes;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pgwire_replication::{
    FeedbackObserver, PgWireError, ReplicationClient, ReplicationEvent, ReplicationMetrics,
};
use tokio::sync::Notify;

use crate::database::Database;
use crate::decode::{Begin, Commit, LogicalMessage, Message};
use crate::lsn::Lsn;
use crate::telemetry::metrics as m;

/// Why the replication connection failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("replication connection: {0}")]
    Replication(String),
    #[error("{0}")]
    Definite(String),
    /// Another process (a second walcast) streams this slot: wait as a standby.
    #[error(
        "replication slot is in use by another process ({0}); waiting as a standby until it is free"
    )]
    SlotBusy(String),
    /// Postgres invalidated the slot (e.g. `max_slot_wal_keep_size`): the WAL
    /// it still needed is gone, so retrying can never succeed.
    #[error("{}", preflight::slot_invalidated(.slot, .reason))]
    SlotLost { slot: String, reason: String },
}

/// Whether a walsender error says the slot was invalidated (PostgreSQL 14–18
/// wordings: "can no longer get changes from replication slot", "cannot
/// read from logical replication slot", "can no longer access replication
/// slot", "This slot has been invalidated").
fn says_invalidated(text: &str) -> bool {
    let text = text.to_lowercase();
    text.contains("can no longer get changes from replication slot")
        || text.contains("cannot read from logical replication slot")
        || text.contains("can no longer access replication slot")
        || (text.contains("slot") && text.contains("has been invalidated"))
}

impl SourceError {
    fn from_pgwire(e: PgWireError, slot: &str) -> SourceError {
        let text = e.to_string().replace(['\n', '\r'], " ");
        if says_invalidated(&text) {
            SourceError::SlotLost {
                slot: slot.to_string(),
                reason: text,
            }
        } else if e.is_auth()
            || text.contains("must be superuser or replication role")
            || text.contains("permission denied")
        {
            SourceError::Definite(format!(
                "replication connection refused: {text} (the role needs LOGIN and REPLICATION, and pg_hba.conf must allow replication)"
            ))
        } else if text.contains("is active for PID") {
            SourceError::SlotBusy(text)
        } else {
            SourceError::Replication(text)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalidated_slot_is_fatal_and_says_how_to_recover() {
        for server in [
            "server error: can no longer get changes from replication slot \"walcast\" (SQLSTATE 55000)",
            "server error: can no longer access replication slot \"walcast\" (SQLSTATE 55000)",
            "server error: This slot has been invalidated because it exceeded the maximum reserved size.",
        ] {
            let e = SourceError::from_pgwire(PgWireError::Server(server.into()), "walcast");
            let stop = crate::error_policy::decide(&e.into(), true);
            assert_eq!(stop, crate::error_policy::Decision::Stop);
            let text =
                SourceError::from_pgwire(PgWireError::Server(server.into()), "walcast").to_string();
            assert!(text.contains("may be missing"), "{text}");
            assert!(text.contains("Lost replication slot"), "{text}");
            assert!(
                text.contains("pg_drop_replication_slot('walcast')"),
                "{text}"
            );
            assert!(!text.contains('\n'), "{text}");
        }
        let other =
            SourceError::from_pgwire(PgWireError::Server("connection reset".into()), "walcast");
        let retry = crate::error_policy::decide(&other.into(), true);
        assert_eq!(retry, crate::error_policy::Decision::Retry);
    }
}

/// What the source yields, with pgoutput's boundary messages already parsed
/// by the library and everything else as raw pgoutput bytes.
#[derive(Debug)]
pub enum SourceEvent {
    Begin(Begin),
    Commit(Commit),
    /// A pgoutput message to decode.
    Data(Bytes),
    Message {
        transactional: bool,
        lsn: u64,
        prefix: String,
        content: Bytes,
    },
    KeepAlive(Lsn),
}

impl SourceEvent {
    /// The decoded form, for the events the library parsed itself.
    pub fn as_message(&self) -> Option<Message<'_>> {
        match self {
            SourceEvent::Begin(b) => Some(Message::Begin(*b)),
            SourceEvent::Commit(c) => Some(Message::Commit(*c)),
            SourceEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => Some(Message::Message(LogicalMessage {
                transactional: *transactional,
                lsn: *lsn,
                prefix,
                content,
            })),
            _ => None,
        }
    }
}

/// A running replication stream.
pub struct Source {
    client: ReplicationClient,
    slot: String,
    /// Woken after every status update that advanced the reported position.
    reported: Arc<Notify>,
    /// The last position given to [`Source::confirm`] in this session.
    confirmed: Option<Lsn>,
    /// The client's count of read pauses, last copied to the metric.
    pauses: PauseCount,
}

/// Copies the replication client's read-pause count (vendor/README.md) to
/// `walcast_source_read_pauses_total`, at commits and only when it moved.
struct PauseCount {
    client: Arc<ReplicationMetrics>,
    copied: u64,
}

impl PauseCount {
    fn copy(&mut self) {
        let now = self.client.read_pauses();
        if now != self.copied {
            metrics::counter!(m::SOURCE_READ_PAUSES).increment(now - self.copied);
            self.copied = now;
        }
    }
}

impl Source {
    /// Starts streaming the slot from `start` (Postgres starts at the slot's
    /// confirmed position if that is later).
    pub async fn start(
        db: &Database,
        slot: &str,
        publication: &str,
        start: Lsn,
    ) -> Result<Source, SourceError> {
        let reported = Arc::new(Notify::new());
        let observer = {
            let reported = reported.clone();
            FeedbackObserver::new(move |_| reported.notify_waiters())
        };
        // A multi-host URL streams from the host that is the primary now.
        let db = db
            .primary()
            .await
            .map_err(|e| SourceError::Replication(e.to_string()))?;
        let config = db
            .replication_config(slot, publication)
            .with_start_lsn(start.into())
            .with_feedback_observer(observer);
        let from_pgwire = |e| SourceError::from_pgwire(e, slot);
        let connect = async {
            let mut client = ReplicationClient::connect(config)
                .await
                .map_err(from_pgwire)?;
            client.wait_started().await.map_err(from_pgwire)?;
            Ok::<_, SourceError>(client)
        };
        let client = tokio::time::timeout(crate::database::IO_TIMEOUT, connect)
            .await
            .map_err(|_| {
                SourceError::Replication(format!(
                    "START_REPLICATION did not complete within {} s",
                    crate::database::IO_TIMEOUT.as_secs()
                ))
            })??;
        let pauses = PauseCount {
            client: client.metrics(),
            copied: 0,
        };
        Ok(Source {
            client,
            slot: slot.to_string(),
            reported,
            confirmed: None,
            pauses,
        })
    }

    /// The next event; `None` when the stream ended cleanly.
    pub async fn next(&mut self) -> Result<Option<SourceEvent>, SourceError> {
        let Some(event) = self
            .client
            .recv()
            .await
            .map_err(|e| SourceError::from_pgwire(e, &self.slot))?
        else {
            return Ok(None);
        };
        Ok(Some(match event {
            ReplicationEvent::Begin {
                final_lsn,
                xid,
                commit_time_micros,
            } => SourceEvent::Begin(Begin {
                final_lsn: final_lsn.as_u64(),
                commit_time: commit_time_micros,
                xid,
            }),
            ReplicationEvent::Commit {
                lsn,
                end_lsn,
                commit_time_micros,
            } => {
                self.pauses.copy();
                SourceEvent::Commit(Commit {
                    flags: 0,
                    commit_lsn: lsn.as_u64(),
                    end_lsn: end_lsn.as_u64(),
                    commit_time: commit_time_micros,
                })
            }
            ReplicationEvent::XLogData { data, .. } => SourceEvent::Data(data),
            ReplicationEvent::Message {
                transactional,
                lsn,
                prefix,
                content,
            } => SourceEvent::Message {
                transactional,
                lsn: lsn.as_u64(),
                prefix,
                content,
            },
            ReplicationEvent::KeepAlive { wal_end, .. } => SourceEvent::KeepAlive(wal_end.into()),
            ReplicationEvent::StoppedAt { reached } => SourceEvent::KeepAlive(reached.into()),
        }))
    }

    /// Confirms `lsn` as flushed: sent with the next status update.
    pub fn confirm(&mut self, lsn: Lsn) {
        self.confirmed = Some(lsn);
        self.client.update_applied_lsn(lsn.into());
    }

    /// Waits (bounded) until the last confirmed position was sent to
    /// Postgres, then ends the stream cleanly. A session that confirmed
    /// nothing (a confirm delay longer than the run) has nothing to wait for.
    pub async fn close(mut self) {
        let Some(lsn) = self.confirmed else {
            let _ = tokio::time::timeout(Duration::from_secs(2), self.client.shutdown()).await;
            return;
        };
        let metrics = self.client.metrics();
        let reported = self.reported.clone();
        let wait = async {
            loop {
                let notified = reported.notified();
                if metrics.last_applied_lsn().as_u64() >= lsn.0 {
                    break;
                }
                notified.await;
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), wait)
            .await
            .is_err()
        {
            tracing::warn!(%lsn, "the final confirmed LSN was not sent to Postgres in time; it will be on the next start");
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), self.client.shutdown()).await;
    }
}
