//! Checkpoint and LSN confirmation: the last stage.
//!
//! Architecture invariant: the slot's confirmed flush LSN never passes an
//! event that is not (a) acknowledged by JetStream for at least the confirm
//! delay and (b) counted in a durable checkpoint. The checkpointer writes the
//! checkpoint first and only then hands the LSN to the source to confirm.

pub mod confirm;
pub mod progress;
pub mod store;

use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::database::DbError;
use crate::lsn::Lsn;
pub use confirm::ConfirmQueue;
pub use progress::{Progress, Segment};
pub use store::Checkpoint;

/// At most this often a checkpoint is written while running (always on exit).
const SAVE_EVERY: Duration = Duration::from_millis(250);

/// Runs until the publisher closes `segments` (after draining), then writes
/// the final checkpoint of what has matured and returns.
pub async fn run(
    mut client: Client,
    slot: String,
    delay: Duration,
    start: &Checkpoint,
    mut segments: mpsc::Receiver<Segment>,
    confirm: watch::Sender<Lsn>,
) -> Result<(), DbError> {
    let mut queue = ConfirmQueue::new(delay);
    let mut saved_seq = start.stream_seq;
    let mut not_before = Instant::now();
    let mut open = true;
    while open {
        let due = queue.next_due().map(|d| d.max(not_before));
        tokio::select! {
            seg = segments.recv() => match seg {
                Some(seg) => queue.push(seg),
                None => open = false,
            },
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
                store::save(&mut client, &slot, Lsn(m.end_lsn), m.stream_seq, &m.tenants).await?;
                crate::failpoint::crash_point("after_checkpoint");
                saved_seq = m.stream_seq;
                not_before = now + SAVE_EVERY;
            }
            confirm.send_replace(Lsn(m.end_lsn));
        }
    }
    Ok(())
}

async fn sleep_until(when: Option<Instant>) {
    if let Some(when) = when {
        tokio::time::sleep_until(when.into()).await;
    }
}
