//! The publisher's side of saved segments: it hands each batch's positions
//! here (beside `Index::record`), and every [`EVERY`] or [`MAX_POSITIONS`]
//! positions they are cut into a [`Segment`]. A segment is handed to the
//! writer (`saved::write`) only once every position in it is acknowledged
//! (the publish chain makes an acknowledged position exact), and only if
//! the writer's bounded channel has room: when it does not, the segment is
//! dropped and a restart reads that range back from the stream. Nothing
//! here waits, and nothing depends on a segment being written.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use super::segment::{Builder, Segment};
use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::metrics as m;

/// A segment is cut at least this often while events flow: a restart reads
/// back at most about this much of the stream that is not yet saved.
pub const EVERY: Duration = Duration::from_secs(1);

/// Positions per segment at most (~130 KB).
pub const MAX_POSITIONS: u64 = 1 << 16;

/// Segments cut but not yet acknowledged, or not yet handed over.
pub struct Journal {
    open: Builder,
    /// The first stream sequence of the open segment's range.
    from: StreamSeq,
    opened: Option<Instant>,
    /// Cut, waiting for their last position to be acknowledged.
    cut: VecDeque<Segment>,
    writer: mpsc::Sender<Segment>,
    /// [`MAX_POSITIONS`] (smaller in tests, to cut mid-flight).
    max_positions: u64,
}

impl Journal {
    /// A journal whose first segment starts at `from` (the first stream
    /// sequence this run records), handing segments to `writer`.
    pub fn new(from: StreamSeq, writer: mpsc::Sender<Segment>) -> Self {
        Journal {
            open: Builder::default(),
            from,
            opened: None,
            cut: VecDeque::new(),
            writer,
            max_positions: MAX_POSITIONS,
        }
    }

    /// Cuts every `n` positions (tests: segments cut while publishes are
    /// in flight).
    #[cfg(test)]
    pub fn cutting_every(mut self, n: u64) -> Self {
        self.max_positions = n;
        self
    }

    /// Records positions sent (or found already published), in stream order.
    pub fn record(&mut self, positions: &[(Arc<str>, TenantSeq, StreamSeq)], now: Instant) {
        if positions.is_empty() {
            return;
        }
        for (tenant, seq, stream_seq) in positions {
            self.open.push(tenant, *seq, *stream_seq);
        }
        self.opened.get_or_insert(now);
        if self.open.positions() >= self.max_positions {
            self.cut_open();
        }
    }

    /// Whether positions wait to be cut or acknowledged (the publisher
    /// keeps ticking meanwhile).
    pub fn is_pending(&self) -> bool {
        self.opened.is_some() || !self.cut.is_empty()
    }

    /// Every stream sequence up to `acked` is acknowledged: cuts the open
    /// segment if it is old enough (or `all`), hands over what is acknowledged.
    pub fn acked(&mut self, acked: StreamSeq, now: Instant, all: bool) {
        if self
            .opened
            .is_some_and(|t| all || now.duration_since(t) >= EVERY)
        {
            self.cut_open();
        }
        while self.cut.front().is_some_and(|s| s.last <= acked) {
            let Some(segment) = self.cut.pop_front() else {
                break;
            };
            match self.writer.try_send(segment) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(s)) => {
                    metrics::counter!(m::CATCHUP_SEGMENTS_DROPPED).increment(1);
                    tracing::debug!(
                        first = s.first.0,
                        last = s.last.0,
                        "catch-up segment dropped: its writer is behind (a restart reads this range back)"
                    );
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {} // not saving (warned once)
            }
        }
    }

    fn cut_open(&mut self) {
        self.opened = None;
        if self.open.positions() == 0 {
            return;
        }
        let last = self.open.last();
        let segment = self.open.finish(self.from, last);
        self.from = last.next();
        self.cut.push_back(segment);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catchup::segment::decode;

    #[test]
    fn hands_over_only_acknowledged_contiguous_segments() {
        let (tx, mut rx) = mpsc::channel(2);
        let mut journal = Journal::new(StreamSeq(11), tx);
        let a: Arc<str> = Arc::from("a");
        let t0 = Instant::now();
        let batch = |from: u64, n: u64| -> Vec<_> {
            (from..from + n)
                .map(|q| (a.clone(), TenantSeq(q - 10), StreamSeq(q)))
                .collect()
        };
        journal.record(&batch(11, 10), t0);
        journal.acked(StreamSeq(20), t0, false);
        assert!(rx.try_recv().is_err(), "not cut before EVERY");
        journal.record(&batch(21, 10), t0);
        let later = t0 + EVERY;
        journal.acked(StreamSeq(25), later, false);
        assert!(rx.try_recv().is_err(), "cut, but 26..=30 not acknowledged");
        journal.acked(StreamSeq(30), later, false);
        let first = rx.try_recv().unwrap();
        assert_eq!(
            (first.first, first.last, first.positions),
            (StreamSeq(11), StreamSeq(30), 20)
        );
        journal.record(&batch(31, 5), later);
        journal.acked(StreamSeq(35), later, true);
        let second = rx.try_recv().unwrap();
        assert_eq!((second.first, second.last), (StreamSeq(31), StreamSeq(35)));
        let mut got = Vec::new();
        decode(&second.data, |_, s, q| got.push((s.0, q.0))).unwrap();
        assert_eq!(got, (21..=25).map(|s| (s, s + 10)).collect::<Vec<_>>());
        // A full channel drops segments; the journal goes on.
        for k in 0..4 {
            journal.record(&batch(36 + k * 5, 5), later);
            journal.acked(StreamSeq(40 + k * 5), later, true);
        }
        assert_eq!(rx.try_recv().unwrap().first, StreamSeq(36));
        assert_eq!(rx.try_recv().unwrap().first, StreamSeq(41));
        assert!(rx.try_recv().is_err());
        assert!(!journal.is_pending());
    }
}
