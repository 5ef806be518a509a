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

/// Segments waiting out the confirm delay, merged into buckets, oldest first.
#[derive(Debug)]
pub struct ConfirmQueue {
    delay: Duration,
    /// Segments acknowledged within this long of a bucket's first one join it.
    width: Duration,
    waiting: VecDeque<Bucket>,
}

/// Buckets are this fraction of the delay wide (at least [`MIN_BUCKET`]).
///
/// Why buckets: the publisher cuts a segment every 20 ms, so two minutes of
/// delay would hold ~6,000 of them, each listing the tenants it touched:
/// memory growing with the events of the whole delay (a 100,000-tenant
/// drain held tens of MB). A bucket holds each tenant once, and about five
/// buckets wait at a time, each ~33 bytes per tenant it touched (100,000
/// busy tenants: ~16 MB). The price: a segment may wait up to one bucket
/// longer than the delay (never less: a bucket matures with its newest
/// segment), so the slot retains up to a quarter more WAL than the delay
/// alone would (2m30s instead of 2m at the default). Eight buckets per
/// delay held ~30 MB at 100,000 busy tenants for 15 s less retention.
/// Only the newest bucket is a map; the others are sealed into exact lists
/// (see [`Tenants`]).
const BUCKETS_PER_DELAY: u32 = 4;
const MIN_BUCKET: Duration = Duration::from_secs(1);

/// How long after its bucket opened a segment still joins it.
pub(crate) fn bucket_width(delay: Duration) -> Duration {
    (delay / BUCKETS_PER_DELAY).max(MIN_BUCKET)
}

/// Merged segments: each tenant's last seq, up to the newest segment's end.
#[derive(Debug)]
struct Bucket {
    opened: Instant,
    end_lsn: Lsn,
    stream_seq: StreamSeq,
    /// The newest segment's acknowledgement: the bucket matures `delay` after it.
    acked_at: Instant,
    tenants: Tenants,
}

/// A bucket's tenants with their last seq: a map while segments join the
/// bucket, an exact list once a newer bucket has opened. A map holds 25
/// bytes a slot at up to 7/8 load (29 to 57 bytes a tenant); the list 24.
/// With every one of 100,000 tenants busy, four sealed buckets of ~60,000
/// tenants each take ~6 MB instead of ~13.
#[derive(Debug)]
enum Tenants {
    Open(HashMap<Arc<str>, TenantSeq>),
    Sealed(Vec<(Arc<str>, TenantSeq)>),
}

impl Tenants {
    fn seal(&mut self) {
        if let Tenants::Open(map) = self {
            // An exact-size iterator: the list is allocated once, at its size.
            *self = Tenants::Sealed(std::mem::take(map).into_iter().collect());
        }
    }

    fn into_list(self) -> Vec<(Arc<str>, TenantSeq)> {
        match self {
            Tenants::Open(map) => map.into_iter().collect(),
            Tenants::Sealed(list) => list,
        }
    }
}

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
            width: bucket_width(delay),
            waiting: VecDeque::new(),
        }
    }

    pub fn push(&mut self, segment: Segment) {
        if let Some(last) = self.waiting.back_mut()
            && segment.acked_at.duration_since(last.opened) < self.width
        {
            last.end_lsn = segment.end_lsn;
            last.stream_seq = segment.stream_seq;
            last.acked_at = segment.acked_at;
            match &mut last.tenants {
                Tenants::Open(map) => map.extend(segment.delta),
                Tenants::Sealed(_) => unreachable!("only the newest bucket is open"),
            }
            return;
        }
        if let Some(last) = self.waiting.back_mut() {
            last.tenants.seal();
        }
        self.waiting.push_back(Bucket {
            opened: segment.acked_at,
            end_lsn: segment.end_lsn,
            stream_seq: segment.stream_seq,
            acked_at: segment.acked_at,
            tenants: Tenants::Open(segment.delta),
        });
    }

    /// Merges every bucket acknowledged at least `delay` before `now`.
    pub fn mature(&mut self, now: Instant) -> Option<Matured> {
        let mut matured: Vec<Bucket> = Vec::new();
        while let Some(front) = self.waiting.front() {
            if now.duration_since(front.acked_at) < self.delay {
                break;
            }
            matured.extend(self.waiting.pop_front());
        }
        let last = matured.last()?;
        let (end_lsn, stream_seq) = (last.end_lsn, last.stream_seq);
        let tenants = if matured.len() == 1 {
            matured.pop()?.tenants.into_list()
        } else {
            // Several at once (the checkpointer was held up): newer buckets'
            // seqs replace older ones.
            let mut merged: HashMap<Arc<str>, TenantSeq> = HashMap::new();
            for bucket in matured {
                merged.extend(bucket.tenants.into_list());
            }
            merged.into_iter().collect()
        };
        Some(Matured {
            end_lsn,
            stream_seq,
            tenants,
        })
    }

    /// When the oldest waiting bucket matures.
    pub fn next_due(&self) -> Option<Instant> {
        self.waiting.front().map(|b| b.acked_at + self.delay)
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
    fn segments_merge_into_buckets_that_mature_with_their_newest() {
        let t0 = Instant::now();
        let mut q = ConfirmQueue::new(Duration::from_secs(40)); // buckets of 10 s
        for i in 0..600u64 {
            // 20 ms apart for 12 s: two buckets ([0, 10 s) and [10 s, 12 s)).
            let tenant = if i % 2 == 0 { "a" } else { "b" };
            q.push(seg(
                10 * (i + 1),
                Some((tenant, i / 2 + 1)),
                t0 + Duration::from_millis(20 * i),
            ));
        }
        assert_eq!(q.waiting.len(), 2);
        let first_newest = t0 + Duration::from_millis(20 * 499);
        assert_eq!(q.next_due(), Some(first_newest + Duration::from_secs(40)));
        assert_eq!(q.mature(first_newest + Duration::from_secs(39)), None);
        let m = q.mature(first_newest + Duration::from_secs(40)).unwrap();
        assert_eq!((m.end_lsn, m.stream_seq), (Lsn(5000), StreamSeq(500)));
        let mut tenants = m.tenants;
        tenants.sort();
        assert_eq!(
            tenants,
            vec![
                (Arc::from("a"), TenantSeq(250)),
                (Arc::from("b"), TenantSeq(250))
            ]
        );
    }

    #[test]
    fn older_buckets_are_sealed_and_several_maturing_keep_the_newest_seqs() {
        let t0 = Instant::now();
        let at = |s| t0 + Duration::from_secs(s);
        let mut q = ConfirmQueue::new(Duration::from_secs(40)); // buckets of 10 s
        q.push(seg(10, Some(("a", 1)), at(0)));
        q.push(seg(20, Some(("b", 1)), at(1)));
        q.push(seg(30, Some(("a", 2)), at(10))); // second bucket
        q.push(seg(40, Some(("c", 1)), at(20))); // third
        q.push(seg(50, Some(("a", 3)), at(21)));
        let sealed: Vec<bool> = q
            .waiting
            .iter()
            .map(|b| matches!(b.tenants, Tenants::Sealed(_)))
            .collect();
        assert_eq!(sealed, [true, true, false]);
        // Held up past all three: one step, each tenant at its newest seq.
        let m = q.mature(at(100)).unwrap();
        assert_eq!((m.end_lsn, m.stream_seq), (Lsn(50), StreamSeq(5)));
        let mut tenants = m.tenants;
        tenants.sort();
        let expected: Vec<(Arc<str>, TenantSeq)> = [("a", 3), ("b", 1), ("c", 1)]
            .into_iter()
            .map(|(t, s)| (Arc::from(t), TenantSeq(s)))
            .collect();
        assert_eq!(tenants, expected);
        assert_eq!(q.next_due(), None);
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
