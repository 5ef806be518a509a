//! What this process saw the stream acknowledge, kept across its runs and
//! lost with it (`kill -9` forgets it, which only makes the next run do
//! more work).
//!
//! - The highest acknowledged stream sequence: if the stream later ends
//!   below it, the broker lost acknowledged messages (`pipeline::prepare`,
//!   `pipeline::watchdog`).
//! - The last of walcast's own publishes acknowledged, with its event id
//!   (the "own tail"): every position up to it was either published by this
//!   process under the publish chain or read by one of its runs before
//!   publishing, so a run that finds the same message still there reads the
//!   stream for foreign messages from it, not from the checkpoint
//!   (`pipeline::foreign::scan`).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::position::StreamSeq;

/// Shared by the runs of one process (see the module comment).
#[derive(Debug, Default)]
pub struct Acked {
    high: AtomicU64,
    own_tail: Mutex<Option<OwnTail>>,
}

/// Walcast's own message at `seq`, acknowledged to this process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnTail {
    pub seq: StreamSeq,
    /// Its `Nats-Msg-Id`.
    pub event_id: String,
}

impl Acked {
    /// The highest stream sequence seen acknowledged.
    pub fn high(&self) -> StreamSeq {
        StreamSeq(self.high.load(Ordering::SeqCst))
    }

    /// Raises the highest to at least `seq` (a checkpoint's); the result.
    pub fn raise(&self, seq: StreamSeq) -> StreamSeq {
        StreamSeq(self.high.fetch_max(seq.0, Ordering::SeqCst).max(seq.0))
    }

    /// The stream stored walcast's publish of `event_id` at `seq`, under
    /// the publish chain (nothing else can sit between it and the run's
    /// earlier messages).
    pub fn own(&self, seq: StreamSeq, event_id: String) {
        self.raise(seq);
        *self.own_tail.lock().unwrap_or_else(|e| e.into_inner()) = Some(OwnTail { seq, event_id });
    }

    /// The last of walcast's publishes acknowledged to this process.
    pub fn own_tail(&self) -> Option<OwnTail> {
        self.own_tail
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_own_tail_is_the_last_acknowledged_and_raises_the_high() {
        let acked = Acked::default();
        assert_eq!(acked.own_tail(), None);
        assert_eq!(acked.raise(StreamSeq(10)), StreamSeq(10));
        acked.own(StreamSeq(7), "a".into());
        assert_eq!(acked.high(), StreamSeq(10), "never lowered");
        acked.own(StreamSeq(12), "b".into());
        assert_eq!(acked.high(), StreamSeq(12));
        assert_eq!(
            acked.own_tail(),
            Some(OwnTail {
                seq: StreamSeq(12),
                event_id: "b".into()
            })
        );
    }
}
