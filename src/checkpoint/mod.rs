//! Checkpoint and LSN confirmation: the last stage.
//!
//! Architecture invariant: the slot's confirmed flush LSN never passes an
//! event that is not (a) acknowledged by JetStream for at least the confirm
//! delay and (b) counted in a durable checkpoint. The checkpointer writes the
//! checkpoint first and only then hands the LSN to the source to confirm.

pub mod confirm;
pub mod progress;
pub mod store;

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::{mpsc, watch};

use crate::database::{DbError, with_timeout};
use crate::lsn::Lsn;
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m_;
pub use confirm::ConfirmQueue;
pub use progress::{Progress, Segment};
pub use store::Checkpoint;
pub(crate) use store::Store;

#[cfg(test)]
pub(crate) mod memory;
#[cfg(test)]
pub(crate) mod tests;

/// At most this often a checkpoint is written while running (always on exit).
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// How often the highest acknowledged stream sequence is recorded.
const TICK: Duration = Duration::from_secs(1);

/// The slot's retained WAL and the lag in bytes are measured every 5 ticks.
const GAUGES_EVERY_TICKS: u64 = 5;

/// The last stage of one run.
pub struct Checkpointer<S> {
    /// Its own store (in production a SQL connection of its own, so
    /// checkpoint writes never wait behind other queries).
    pub store: S,
    pub slot: String,
    /// This run's fencing token (see `store::claim`).
    pub owner: String,
    /// `--confirm-delay`.
    pub delay: Duration,
    pub health: Arc<Health>,
}

impl<S: Store> Checkpointer<S> {
    /// Runs until the publisher closes `segments` (after draining), then writes
    /// the final checkpoint of what has matured and returns.
    pub async fn run(
        self,
        start: Checkpoint,
        segments: mpsc::Receiver<Segment>,
        confirm: watch::Sender<Lsn>,
    ) -> Result<(), DbError> {
        let Checkpointer {
            store,
            slot,
            owner,
            delay,
            health,
        } = self;
        run(store, slot, owner, delay, &start, segments, confirm, health).await
    }
}

#[allow(clippy::too_many_arguments)] // the fields of `Checkpointer`, destructured once
async fn run<S: Store>(
    mut store: S,
    slot: String,
    owner: String,
    delay: Duration,
    start: &Checkpoint,
    mut segments: mpsc::Receiver<Segment>,
    confirm: watch::Sender<Lsn>,
    health: Arc<Health>,
) -> Result<(), DbError> {
    let mut queue = ConfirmQueue::new(delay);
    let mut acked_lsn = start.lsn;
    let (mut acked_seq, mut saved_acked) = (start.acked_seq, start.acked_seq);
    let mut ticks = 0u64;
    let mut tick = tokio::time::interval(TICK);
    let mut saved_seq = start.stream_seq;
    let mut not_before = Instant::now();
    let mut open = true;
    while open {
        let due = queue.next_due().map(|d| d.max(not_before));
        tokio::select! {
            seg = segments.recv() => match seg {
                Some(seg) => {
                    acked_lsn = seg.end_lsn;
                    acked_seq = acked_seq.max(seg.stream_seq);
                    health.acked(seg.end_lsn, acked_seq);
                    queue.push(seg);
                }
                None => open = false,
            },
            _ = tick.tick() => {
                ticks += 1;
                if acked_seq > saved_acked {
                    with_timeout("record the acknowledged sequence", store.save_acked(&slot, &owner, acked_seq)).await??;
                    saved_acked = acked_seq;
                }
                if ticks % GAUGES_EVERY_TICKS == 1 {
                    let _ = with_timeout("measure the slot", store.gauges(&slot, acked_lsn)).await;
                }
                continue;
            }
            _ = sleep_until(due), if due.is_some() => {}
        }
        let now = Instant::now();
        if open && now < not_before {
            continue;
        }
        if let Some(m) = queue.mature(now) {
            // Keepalive-only progress changes no tenant and no stream position:
            // confirming it needs no write (the checkpoint stays valid up to it).
            if !m.tenants.is_empty() || m.stream_seq != saved_seq {
                let save = store.save(&slot, &owner, m.end_lsn, m.stream_seq, &m.tenants);
                with_timeout("write the checkpoint", save).await??;
                crate::failpoint::crash_point("after_checkpoint");
                health.checkpointed(m.stream_seq);
                saved_seq = m.stream_seq;
                not_before = now + SAVE_EVERY;
            }
            confirm.send_replace(m.end_lsn);
            metrics::gauge!(m_::CONFIRMED_LSN).set(m.end_lsn.0 as f64);
        }
    }
    Ok(())
}

async fn sleep_until(when: Option<Instant>) {
    if let Some(when) = when {
        tokio::time::sleep_until(when).await;
    }
}
