//! Where each tenant's events sit in the stream, kept by the publisher.
//!
//! The publisher records every event's stream sequence when it sends it: the
//! publish chain (`Nats-Expected-Last-Sequence`) makes that sequence certain —
//! the event is stored there, or the run fails and the next run republishes
//! it at the same place. So the index is never behind what a subscriber can
//! have seen. Per tenant it keeps the last event and one sample every
//! [`SAMPLE_EVERY`] events: memory is ~1/64 of the events, and a lookup
//! narrows to a window of at most 64 of the tenant's events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One sample per this many events of a tenant.
pub const SAMPLE_EVERY: u64 = 64;

/// A tenant's position: last seq and its stream sequence (0 = not known in
/// this process, e.g. right after a restart), plus sparse samples.
#[derive(Debug, Default, Clone)]
pub struct TenantTail {
    pub last_seq: u64,
    pub last_stream_seq: u64,
    /// `(seq, stream_seq)`, ascending.
    pub samples: Vec<(u64, u64)>,
}

/// Bounds for the event with `seq`: stream sequences it lies within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: u64,
    pub to: u64,
}

impl TenantTail {
    /// The narrowest known window of stream sequences holding `seq`.
    pub fn window(&self, seq: u64, stream_last: u64) -> Window {
        if seq == self.last_seq && self.last_stream_seq > 0 {
            return Window {
                from: self.last_stream_seq,
                to: self.last_stream_seq,
            };
        }
        let at = self.samples.partition_point(|(s, _)| *s <= seq);
        let from = if at > 0 { self.samples[at - 1].1 } else { 1 };
        let to = self.samples.get(at).map_or(
            if self.last_stream_seq > 0 {
                self.last_stream_seq
            } else {
                stream_last
            },
            |(_, q)| q.saturating_sub(1).max(from),
        );
        Window { from, to }
    }
}

/// Shared between the publisher (writer) and the catch-up service (reader).
#[derive(Debug, Default, Clone)]
pub struct Index {
    tenants: Arc<RwLock<HashMap<Arc<str>, TenantTail>>>,
    next_stream_seq: Arc<AtomicU64>,
    /// After a restart, stream messages up to this one are replayed from the
    /// slot before the index knows them; `replayed` says how far that went.
    replay_to: Arc<AtomicU64>,
    replayed: Arc<AtomicU64>,
}

impl Index {
    /// Seeds last seqs from the checkpoint (stream positions unknown yet).
    pub fn seed(&self, tenants: &[(String, u64)]) {
        let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        map.clear();
        for (t, seq) in tenants {
            map.insert(
                Arc::from(t.as_str()),
                TenantTail {
                    last_seq: *seq,
                    ..Default::default()
                },
            );
        }
    }

    /// Records events sent (or found already published) at known stream sequences.
    pub fn record(&self, events: &[(Arc<str>, u64, u64)], next_stream_seq: u64) {
        if !events.is_empty() {
            let mut map = self.tenants.write().unwrap_or_else(|p| p.into_inner());
            for (tenant, seq, stream_seq) in events {
                let tail = map.entry(tenant.clone()).or_default();
                tail.last_seq = *seq;
                tail.last_stream_seq = *stream_seq;
                if seq % SAMPLE_EVERY == 1 {
                    tail.samples.push((*seq, *stream_seq));
                }
            }
        }
        self.next_stream_seq
            .fetch_max(next_stream_seq, Ordering::SeqCst);
    }

    /// The index is complete only once the replay reaches stream message `seq`.
    pub fn expect_replay_through(&self, seq: u64) {
        self.replay_to.store(seq, Ordering::SeqCst);
    }

    /// Messages up to `seq` already in the stream have been replayed and recorded.
    pub fn replayed_through(&self, seq: u64) {
        self.replayed.fetch_max(seq, Ordering::SeqCst);
    }

    /// Whether answers reflect everything the stream holds.
    pub fn is_ready(&self) -> bool {
        self.replayed.load(Ordering::SeqCst) >= self.replay_to.load(Ordering::SeqCst)
    }

    /// The tenant's tail, if walcast has seen it.
    pub fn tenant(&self, tenant: &str) -> Option<TenantTail> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tenant)
            .cloned()
    }

    /// The stream sequence the next event will get.
    pub fn next_stream_seq(&self) -> u64 {
        self.next_stream_seq.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_narrow_to_samples() {
        let index = Index::default();
        let t: Arc<str> = Arc::from("acme");
        let events: Vec<_> = (1..=200).map(|s| (t.clone(), s, s * 3)).collect();
        index.record(&events, 601);
        let tail = index.tenant("acme").unwrap();
        assert_eq!(
            tail.samples,
            vec![(1, 3), (65, 195), (129, 387), (193, 579)]
        );
        assert_eq!(tail.window(200, 600), Window { from: 600, to: 600 });
        assert_eq!(tail.window(70, 600), Window { from: 195, to: 386 });
        assert_eq!(tail.window(65, 600), Window { from: 195, to: 386 });
        assert_eq!(tail.window(199, 600), Window { from: 579, to: 600 });
        assert_eq!(index.next_stream_seq(), 601);
        let fresh = TenantTail {
            last_seq: 10,
            ..Default::default()
        };
        assert_eq!(fresh.window(5, 900), Window { from: 1, to: 900 });
    }
}
