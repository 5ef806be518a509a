//! Readiness and liveness state: what `/readyz` and the supervisor read,
//! written by the pipeline and the checkpointer.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use super::metrics;
use crate::lsn::Lsn;
use crate::position::StreamSeq;

/// What the probes report, shared with the pipeline.
#[derive(Debug, Default)]
pub struct Health {
    replicating: AtomicBool,
    ever_replicated: AtomicBool,
    replications: AtomicU64,
    last_checkpoint_unix: AtomicU64,
    /// Everything before this WAL position is acknowledged by JetStream...
    acked_lsn: AtomicU64,
    /// ... at this stream sequence or earlier (stored first, read second).
    acked_stream_seq: AtomicU64,
    /// The stream sequence the last durable checkpoint counts up to.
    checkpointed_stream_seq: AtomicU64,
    /// The state bucket has applied the stream up to here: written by its
    /// service, which restarts on its own thread; read for the lag gauge
    /// also while that thread is down (`state::report_lag`).
    state_applied: Arc<AtomicU64>,
}

impl Health {
    /// The pipeline holds the slot and its publisher runs.
    pub fn set_replicating(&self, on: bool) {
        self.replicating.store(on, Ordering::SeqCst);
        self.ever_replicated.fetch_or(on, Ordering::SeqCst);
        self.replications.fetch_add(u64::from(on), Ordering::SeqCst);
        ::metrics::gauge!(metrics::UP).set(if on { 1.0 } else { 0.0 });
    }

    /// How many runs reached replication.
    pub fn replications(&self) -> u64 {
        self.replications.load(Ordering::SeqCst)
    }

    /// Some run of this process reached replication (startup is over).
    pub fn ever_replicated(&self) -> bool {
        self.ever_replicated.load(Ordering::SeqCst)
    }

    pub fn is_replicating(&self) -> bool {
        self.replicating.load(Ordering::SeqCst)
    }

    /// Seconds since the last durable checkpoint, if there was one.
    pub fn checkpoint_age_secs(&self) -> Option<u64> {
        let last = self.last_checkpoint_unix.load(Ordering::SeqCst);
        (last > 0).then(|| unix_now().saturating_sub(last))
    }

    /// Every event before `lsn` is acknowledged, at `stream_seq` or earlier.
    /// The state backfill waits on it to know when the stream holds every
    /// change its snapshot saw.
    pub fn acked(&self, lsn: Lsn, stream_seq: StreamSeq) {
        self.acked_stream_seq
            .fetch_max(stream_seq.0, Ordering::SeqCst);
        self.acked_lsn.fetch_max(lsn.0, Ordering::SeqCst);
    }

    /// The state bucket's applied stream position, shared with its writer.
    pub fn state_applied(&self) -> &Arc<AtomicU64> {
        &self.state_applied
    }

    /// `(lsn, stream_seq)` as set by [`Health::acked`]: the stream sequence
    /// covers at least every event before the LSN. Plain numbers: the state
    /// bucket (`state/`) keeps its positions as `u64`.
    pub fn acked_position(&self) -> (u64, u64) {
        let lsn = self.acked_lsn.load(Ordering::SeqCst);
        (lsn, self.acked_stream_seq.load(Ordering::SeqCst))
    }

    /// The stream sequence the last durable checkpoint counts up to: holes
    /// past it are within the repair window (`publish::holes`).
    pub fn checkpointed_stream_seq(&self) -> StreamSeq {
        StreamSeq(self.checkpointed_stream_seq.load(Ordering::SeqCst))
    }

    /// A checkpoint counting the stream up to `stream_seq` became durable now.
    pub fn checkpointed(&self, stream_seq: StreamSeq) {
        self.checkpointed_stream_seq
            .fetch_max(stream_seq.0, Ordering::SeqCst);
        let now = unix_now();
        self.last_checkpoint_unix.store(now, Ordering::SeqCst);
        ::metrics::gauge!(metrics::LAST_CHECKPOINT_TIMESTAMP).set(now as f64);
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}
