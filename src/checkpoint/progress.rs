//! Publisher-side progress: turns the in-order stream of acknowledgements and
//! transaction boundaries into [`Segment`]s for the checkpointer.
//!
//! Invariant: a segment's `delta` holds exactly the events of transactions
//! that committed before its `end_lsn`, all of them acknowledged. Boundaries
//! are fed only once every event before them is acked, and events acked after
//! the pending boundary are held apart until the next boundary.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};

/// A run of acknowledged transactions, confirmable as a whole.
#[derive(Debug, Clone)]
pub struct Segment {
    /// Confirmable position: the end of the last transaction (or a keepalive).
    pub end_lsn: Lsn,
    /// Stream sequence of the last event before `end_lsn`.
    pub stream_seq: StreamSeq,
    /// Each tenant's last seq in the segment.
    pub delta: HashMap<Arc<str>, TenantSeq>,
    pub acked_at: Instant,
}

/// Accumulates acks and boundaries; cuts a segment at most every `every`.
#[derive(Debug)]
pub struct Progress {
    every: Duration,
    bounded: HashMap<Arc<str>, TenantSeq>,
    open: HashMap<Arc<str>, TenantSeq>,
    boundary: Option<(Lsn, StreamSeq)>,
    stream_seq: StreamSeq,
    last_cut: Instant,
}

impl Progress {
    pub fn new(stream_seq: StreamSeq, every: Duration) -> Self {
        Progress {
            every,
            bounded: HashMap::new(),
            open: HashMap::new(),
            boundary: None,
            stream_seq,
            last_cut: Instant::now(),
        }
    }

    /// An event was acknowledged at `stream_seq` (tenant events carry their seq).
    pub fn acked(&mut self, tenant: Option<(&Arc<str>, TenantSeq)>, stream_seq: StreamSeq) {
        self.stream_seq = stream_seq;
        if let Some((tenant, seq)) = tenant {
            self.open.insert(tenant.clone(), seq);
        }
    }

    /// Everything before `lsn` is acknowledged.
    pub fn boundary(&mut self, lsn: Lsn) {
        if self.bounded.is_empty() {
            std::mem::swap(&mut self.bounded, &mut self.open);
        } else {
            self.bounded.extend(self.open.drain());
        }
        self.boundary = Some((lsn, self.stream_seq));
    }

    /// A boundary is waiting to be cut.
    pub fn has_boundary(&self) -> bool {
        self.boundary.is_some()
    }

    /// The segment up to the latest boundary, if one is pending and either
    /// `force` is set or the last cut is old enough.
    pub fn cut(&mut self, now: Instant, force: bool) -> Option<Segment> {
        if !force && now.duration_since(self.last_cut) < self.every {
            return None;
        }
        let (end_lsn, stream_seq) = self.boundary.take()?;
        self.last_cut = now;
        Some(Segment {
            end_lsn,
            stream_seq,
            delta: std::mem::take(&mut self.bounded),
            acked_at: now,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_after_a_pending_boundary_stay_out_of_its_segment() {
        let t: Arc<str> = Arc::from("acme");
        let mut p = Progress::new(StreamSeq(10), Duration::from_secs(3600));
        p.acked(Some((&t, TenantSeq(1))), StreamSeq(11));
        p.boundary(Lsn(100));
        p.acked(Some((&t, TenantSeq(2))), StreamSeq(12)); // next transaction, not yet committed-and-acked
        let seg = p.cut(Instant::now(), true).unwrap();
        assert_eq!((seg.end_lsn, seg.stream_seq), (Lsn(100), StreamSeq(11)));
        assert_eq!(seg.delta.get("acme"), Some(&TenantSeq(1)));
        assert!(p.cut(Instant::now(), true).is_none(), "no boundary pending");
        p.boundary(Lsn(200));
        let seg = p.cut(Instant::now(), true).unwrap();
        assert_eq!(
            (seg.end_lsn, seg.stream_seq, seg.delta.get("acme")),
            (Lsn(200), StreamSeq(12), Some(&TenantSeq(2)))
        );
    }

    #[test]
    fn cuts_are_rate_limited_unless_forced() {
        let mut p = Progress::new(StreamSeq(0), Duration::from_secs(3600));
        p.boundary(Lsn(1));
        assert!(p.cut(Instant::now(), false).is_none());
        p.boundary(Lsn(2));
        assert_eq!(p.cut(Instant::now(), true).unwrap().end_lsn, Lsn(2));
    }
}
