//! Where each tenant's events sit in the stream, kept by the publisher.
//!
//! The publisher records every event's stream sequence when it sends it: the
//! publish chain (`Nats-Expected-Last-Sequence`) makes that sequence certain —
//! the event is stored there, or the run fails and the next run republishes
//! it at the same place. So the index is never behind what a subscriber can
//! have seen. Per tenant it keeps the last event and one sample every
//! [`SAMPLE_EVERY`] events, so a lookup narrows to a window of at most 64 of
//! the tenant's events. Samples are bounded: when all tenants together hold
//! [`MAX_SAMPLES`], each keeps every other one and the interval doubles, so
//! memory does not grow with the events a long-running process publishes
//! (16 bytes per 64 events otherwise: 250 MB per billion); a window then
//! spans up to twice as many events, one more probe per doubling.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

/// One sample per this many events of a tenant (until [`MAX_SAMPLES`]).
pub const SAMPLE_EVERY: u64 = 64;

/// Samples kept over all tenants (16 bytes each) before they are thinned
/// (or two per tenant, if that is more: a tenant's first sample is never
/// thinned).
pub const MAX_SAMPLES: usize = 1 << 18;

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

/// Every tenant's tail, and the sampling state.
#[derive(Debug)]
struct Tenants {
    map: HashMap<Arc<str>, TenantTail>,
    /// Current sampling interval: [`SAMPLE_EVERY`] times a power of two.
    every: u64,
    /// Samples held over all tenants.
    samples: usize,
    /// Thin when `samples` reaches this (and twice the tenants).
    max_samples: usize,
}

impl Tenants {
    fn new(max_samples: usize) -> Self {
        Tenants {
            map: HashMap::new(),
            every: SAMPLE_EVERY,
            samples: 0,
            max_samples,
        }
    }

    /// Doubles the interval and keeps the samples that are on it (about
    /// every other one; a sample at seq 1 is on every interval).
    fn thin(&mut self) {
        self.every *= 2;
        let every = self.every;
        self.samples = 0;
        for tail in self.map.values_mut() {
            tail.samples.retain(|(seq, _)| seq % every == 1);
            tail.samples.shrink_to_fit();
            self.samples += tail.samples.len();
        }
    }
}

/// Shared between the publisher (writer) and the catch-up service (reader).
#[derive(Debug, Clone)]
pub struct Index {
    tenants: Arc<RwLock<Tenants>>,
    next_stream_seq: Arc<AtomicU64>,
    /// After a restart, stream messages up to this one are replayed from the
    /// slot before the index knows them; `replayed` says how far that went.
    replay_to: Arc<AtomicU64>,
    replayed: Arc<AtomicU64>,
}

impl Default for Index {
    fn default() -> Self {
        Index::with_max_samples(MAX_SAMPLES)
    }
}

impl Index {
    fn with_max_samples(max_samples: usize) -> Self {
        Index {
            tenants: Arc::new(RwLock::new(Tenants::new(max_samples))),
            next_stream_seq: Arc::default(),
            replay_to: Arc::default(),
            replayed: Arc::default(),
        }
    }

    /// Seeds last seqs from the checkpoint (stream positions unknown yet).
    pub fn seed(&self, tenants: &[(String, u64)]) {
        let mut state = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let max_samples = state.max_samples;
        *state = Tenants::new(max_samples);
        for (t, seq) in tenants {
            state.map.insert(
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
            let mut state = self.tenants.write().unwrap_or_else(|p| p.into_inner());
            let state = &mut *state;
            for (tenant, seq, stream_seq) in events {
                let tail = state.map.entry(tenant.clone()).or_default();
                tail.last_seq = *seq;
                tail.last_stream_seq = *stream_seq;
                if seq % state.every == 1 {
                    tail.samples.push((*seq, *stream_seq));
                    state.samples += 1;
                }
            }
            if state.samples >= state.max_samples.max(2 * state.map.len()) {
                state.thin();
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
            .map
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

    #[test]
    fn samples_are_thinned_to_a_bound() {
        let index = Index::with_max_samples(64);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        // Two tenants, interleaved: a's seq s at stream 2s - 1, b's at 2s.
        let mut high = 0;
        for chunk in (1..=100_000u64).collect::<Vec<_>>().chunks(500) {
            let events: Vec<_> = chunk
                .iter()
                .flat_map(|&s| [(a.clone(), s, 2 * s - 1), (b.clone(), s, 2 * s)])
                .collect();
            index.record(&events, 2 * chunk[chunk.len() - 1] + 1);
            high = high.max(index.tenants.read().unwrap().samples);
        }
        let state = index.tenants.read().unwrap();
        assert!(high <= 64 + 2 * 500 / 64 + 2, "{high} samples");
        assert!(
            state.samples < 64 && state.samples >= 16,
            "{}",
            state.samples
        );
        assert_eq!(state.every, 4096);
        drop(state);
        let tail = index.tenant("a").unwrap();
        assert!(
            tail.samples
                .iter()
                .all(|(s, q)| s % 4096 == 1 && *q == 2 * s - 1)
        );
        assert!(tail.samples.windows(2).all(|w| w[0].0 < w[1].0));
        // Windows stay correct, only wider.
        for seq in [1, 2, 4096, 4097, 50_000, 99_999] {
            let w = tail.window(seq, 200_001);
            let at = 2 * seq - 1;
            assert!(w.from <= at && at <= w.to, "{seq}: {w:?}");
            assert!(w.to - w.from < 2 * 4096, "{seq}: {w:?}");
        }
        // Thinning never loops on tenants with a single sample each.
        let many = Index::with_max_samples(4);
        let events: Vec<_> = (0..100u64)
            .map(|t| (Arc::from(format!("t{t}").as_str()), 1, t + 1))
            .collect();
        many.record(&events, 101);
        assert_eq!(many.tenants.read().unwrap().samples, 100);
    }
}
