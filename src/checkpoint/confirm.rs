//! The confirm delay (SPEC §4.7): segments wait here until they have been
//! acknowledged for at least `delay`, so the slot still holds the WAL of
//! anything a broker could lose before it fsyncs.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use super::progress::Segment;
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};

/// Segments waiting out the confirm delay, oldest first.
#[derive(Debug)]
pub struct ConfirmQueue {
    delay: Duration,
    /// Each segment with the time its bucket opened (see [`ConfirmQueue::push`]).
    waiting: VecDeque<(Instant, Segment)>,
}

/// Tenant-less segments (keepalive positions) within this window share one entry.
const KEEPALIVE_BUCKET: Duration = Duration::from_secs(1);

/// Matured segments merged into one checkpoint step.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Matured {
    pub end_lsn: Lsn,
    pub stream_seq: StreamSeq,
    pub tenants: Vec<(Arc<str>, TenantSeq)>,
}

impl ConfirmQueue {
    pub fn new(delay: Duration) -> Self {
        ConfirmQueue {
            delay,
            waiting: VecDeque::new(),
        }
    }

    pub fn push(&mut self, segment: Segment) {
        // A tenant-less segment right behind another one, in the same bucket,
        // replaces it: memory stays bounded however often keepalives come, and
        // the newest position still waits the full delay from its own ack.
        if segment.delta.is_empty()
            && let Some((opened, last)) = self.waiting.back_mut()
            && last.delta.is_empty()
            && segment.acked_at.duration_since(*opened) < KEEPALIVE_BUCKET
        {
            *last = segment;
            return;
        }
        self.waiting.push_back((segment.acked_at, segment));
    }

    /// Merges every segment acknowledged at least `delay` before `now`.
    pub fn mature(&mut self, now: Instant) -> Option<Matured> {
        let mut tenants: HashMap<Arc<str>, TenantSeq> = HashMap::new();
        let mut last = None;
        while let Some((_, front)) = self.waiting.front() {
            if now.duration_since(front.acked_at) < self.delay {
                break;
            }
            let (_, seg) = self.waiting.pop_front()?;
            tenants.extend(seg.delta);
            last = Some((seg.end_lsn, seg.stream_seq));
        }
        let (end_lsn, stream_seq) = last?;
        Some(Matured {
            end_lsn,
            stream_seq,
            tenants: tenants.into_iter().collect(),
        })
    }

    /// When the oldest waiting segment matures.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.front().map(|(_, s)| s.acked_at + self.delay)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(lsn: u64, tenant: Option<(&str, u64)>, at: Instant) -> Segment {
        let delta = tenant
            .map(|(t, s)| (Arc::from(t), TenantSeq(s)))
            .into_iter()
            .collect();
        Segment {
            end_lsn: Lsn(lsn),
            stream_seq: StreamSeq(lsn / 10),
            delta,
            acked_at: at,
        }
    }

    #[test]
    fn waits_out_the_delay_and_merges() {
        let t0 = Instant::now();
        let mut q = ConfirmQueue::new(Duration::from_secs(120));
        q.push(seg(100, Some(("a", 1)), t0));
        q.push(seg(200, Some(("a", 2)), t0 + Duration::from_secs(1)));
        q.push(seg(300, Some(("b", 1)), t0 + Duration::from_secs(60)));
        assert_eq!(q.mature(t0 + Duration::from_secs(119)), None);
        let m = q.mature(t0 + Duration::from_secs(121)).unwrap();
        assert_eq!((m.end_lsn, m.stream_seq), (Lsn(200), StreamSeq(20)));
        assert_eq!(m.tenants, vec![(Arc::from("a"), TenantSeq(2))]);
        assert_eq!(q.next_due(), Some(t0 + Duration::from_secs(180)));
    }

    #[test]
    fn zero_delay_matures_at_once_and_keepalives_coalesce() {
        let t0 = Instant::now();
        let mut q = ConfirmQueue::new(Duration::ZERO);
        q.push(seg(10, None, t0));
        q.push(seg(20, None, t0));
        assert_eq!(q.waiting.len(), 1);
        assert_eq!(q.mature(t0).unwrap().end_lsn, Lsn(20));
    }
}
