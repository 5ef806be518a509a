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
//!
//! On top of the samples, the exact position of every recent event
//! ([`Exact`], ~1.5 bytes per event) answers most requests without reading
//! the stream at all. Those are bounded by [`MAX_EXACT_BYTES`] over all
//! tenants: past it, the oldest quarter (by stream sequence) is dropped and
//! requests for it fall back to samples and probes.
//!
//! The index lives in memory only; a restart gets its exact positions back
//! from the segments the publisher's `journal` saved (`saved`, `rebuild`),
//! merged in front of what the new run records ([`Index::merge_older`]).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use smallvec::SmallVec;

use super::exact::Exact;
use crate::by_tenant::ByTenant;
use crate::position::{StreamSeq, TenantSeq};

/// One sample per this many events of a tenant (until [`MAX_SAMPLES`]).
pub const SAMPLE_EVERY: u64 = 64;

/// Samples kept over all tenants (16 bytes each) before they are thinned
/// (or two per tenant, if that is more: a tenant's first sample is never
/// thinned).
pub const MAX_SAMPLES: usize = 1 << 18;

/// Bytes of exact positions kept over all tenants: ~11M events at 1,000
/// tenants (~1.5 bytes each), so SPEC §6's 10,000,000-event stream is all
/// exact, while walcast with the index at its bound stays under its 50 MB
/// (a tenant with most of the traffic needs fewer bytes per event, 100,000
/// evenly busy tenants more: ~2.3).
pub const MAX_EXACT_BYTES: usize = 16 << 20;

/// What holding a tenant costs the index before any exact position: its
/// tail and shared name, in `ByTenant`'s chunks (144 bytes).
const TAIL_BYTES: usize = std::mem::size_of::<(Arc<str>, TenantTail)>();

/// Exact positions kept however many tenants there are (~450,000 events).
const MIN_EXACT_BYTES: usize = 1 << 20;

/// The bytes of exact positions kept with `tenants` tenants: the tails
/// count against [`MAX_EXACT_BYTES`] too, so the index's memory stays
/// bounded however many tenants there are. 1,000 tenants leave 15.9 MiB
/// (SPEC §6's 10,000,000-event stream still all exact); 100,000 leave
/// ~2 MiB, the newest ~1M events. Without it, 100,000 busy tenants each
/// grew a small heap block of positions, and walcast's RSS passed 50 MB
/// after seven minutes at 3,000 commits/s, still climbing toward the
/// bound. Older positions are answered by searching the stream, as after a
/// drop.
fn exact_budget(max_exact_bytes: usize, tenants: usize) -> usize {
    max_exact_bytes
        .saturating_sub(tenants.saturating_mul(TAIL_BYTES))
        .max(MIN_EXACT_BYTES.min(max_exact_bytes))
}

/// A tenant's position: last seq and its stream sequence (0 = not known in
/// this process, e.g. right after a restart), plus sparse samples and the
/// exact positions of its recent events.
#[derive(Debug, Default, Clone)]
pub struct TenantTail {
    pub last_seq: TenantSeq,
    pub last_stream_seq: StreamSeq,
    /// `(seq, stream_seq)`, ascending (most tenants hold one: inline).
    pub samples: SmallVec<[(TenantSeq, StreamSeq); 1]>,
    exact: Exact,
}

/// What the index knows about where one event of a tenant is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Known {
    pub last_seq: TenantSeq,
    pub last_stream_seq: StreamSeq,
    /// The event's exact stream sequence, if it is among the recent ones.
    pub exact: Option<StreamSeq>,
    /// Stream sequences the event lies within, if it is in the stream.
    pub window: Window,
    /// For estimates only: a lower bound of the tenant's seq at
    /// `window.from`, and a `(stream_seq, seq)` of the tenant past
    /// `window.to` (or where its next event would be).
    pub from_seq: TenantSeq,
    pub above: (StreamSeq, TenantSeq),
}

/// Bounds for the event with `seq`: stream sequences it lies within.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: StreamSeq,
    pub to: StreamSeq,
}

impl TenantTail {
    /// A tail that knows only the tenant's last seq (e.g. from a checkpoint).
    pub fn new(last_seq: TenantSeq) -> Self {
        TenantTail {
            last_seq,
            ..Default::default()
        }
    }

    /// What is known about the event with `seq`.
    pub fn known(&self, seq: TenantSeq, stream_last: StreamSeq) -> Known {
        let window = self.window(seq, stream_last);
        let at = self.samples.partition_point(|(s, _)| *s <= seq);
        Known {
            last_seq: self.last_seq,
            last_stream_seq: self.last_stream_seq,
            exact: self.exact.find(seq),
            window,
            from_seq: at
                .checked_sub(1)
                .map_or(TenantSeq(1), |i| self.samples[i].0),
            above: self.samples.get(at).map_or(
                (
                    StreamSeq(window.to.0.saturating_add(1)),
                    TenantSeq(self.last_seq.0.saturating_add(1)),
                ),
                |&(s, q)| (q, s),
            ),
        }
    }

    /// The narrowest known window of stream sequences holding `seq`.
    pub fn window(&self, seq: TenantSeq, stream_last: StreamSeq) -> Window {
        if seq == self.last_seq && self.last_stream_seq > StreamSeq(0) {
            return Window {
                from: self.last_stream_seq,
                to: self.last_stream_seq,
            };
        }
        let at = self.samples.partition_point(|(s, _)| *s <= seq);
        let from = if at > 0 {
            self.samples[at - 1].1
        } else {
            StreamSeq(1)
        };
        let to = self.samples.get(at).map_or(
            if self.last_stream_seq > StreamSeq(0) {
                self.last_stream_seq
            } else {
                stream_last
            },
            |(_, q)| StreamSeq(q.0.saturating_sub(1)).max(from),
        );
        Window { from, to }
    }
}

/// Every tenant's tail, and the sampling state.
#[derive(Debug)]
struct Tenants {
    map: ByTenant<TenantTail>,
    /// Current sampling interval: [`SAMPLE_EVERY`] times a power of two.
    every: u64,
    /// Samples held over all tenants.
    samples: usize,
    /// Thin when `samples` reaches this (and twice the tenants).
    max_samples: usize,
    /// Bytes of exact positions held, and the bound past which the oldest
    /// quarter is dropped.
    exact_bytes: usize,
    max_exact_bytes: usize,
    /// Exact positions before this stream sequence have been dropped.
    exact_from: StreamSeq,
}

impl Tenants {
    fn new(max_samples: usize, max_exact_bytes: usize) -> Self {
        Tenants {
            map: ByTenant::default(),
            every: SAMPLE_EVERY,
            samples: 0,
            max_samples,
            exact_bytes: 0,
            max_exact_bytes,
            exact_from: StreamSeq(0),
        }
    }

    /// Records that the tenant's event `seq` is at `stream_seq` (the
    /// tenant's latest so far); call [`Tenants::bound`] after a batch.
    fn push(&mut self, tenant: &Arc<str>, seq: TenantSeq, stream_seq: StreamSeq) {
        let slot = self.map.slot(tenant);
        self.push_at(slot, seq, stream_seq);
    }

    /// [`Tenants::push`] to a tenant's slot.
    fn push_at(&mut self, slot: u32, seq: TenantSeq, stream_seq: StreamSeq) {
        let tail = self.map.at_mut(slot);
        tail.last_seq = seq;
        tail.last_stream_seq = stream_seq;
        if seq.0 % self.every == 1 {
            tail.samples.push((seq, stream_seq));
            self.samples += 1;
        }
        self.exact_bytes += tail.exact.push(seq, stream_seq).unwrap_or(0);
    }

    /// Publishes the index's memory as a metric.
    fn report(&self) {
        metrics::gauge!(crate::telemetry::metrics::CATCHUP_INDEX_BYTES)
            .set((self.exact_bytes + self.samples * 16) as f64);
    }

    /// Keeps samples and exact positions within their bounds.
    fn bound(&mut self, next_stream_seq: StreamSeq) {
        if self.samples >= self.max_samples.max(2 * self.map.len()) {
            self.thin();
        }
        self.drop_old_exact(next_stream_seq);
    }

    /// Drops the exact positions of the oldest quarter of the stream range
    /// they cover, until they fit the bound again (a quarter, not a half:
    /// the index stays at 75–100 % of its bound, not 50–100 %).
    fn drop_old_exact(&mut self, next_stream_seq: StreamSeq) {
        let budget = exact_budget(self.max_exact_bytes, self.map.len());
        while self.exact_bytes > budget && self.exact_from < next_stream_seq {
            let cutoff = self.exact_from + (next_stream_seq - self.exact_from).div_ceil(4);
            for tail in self.map.values_mut() {
                self.exact_bytes -= tail.exact.drop_before(cutoff);
            }
            self.exact_from = cutoff;
        }
    }

    /// Doubles the interval and keeps the samples that are on it (about
    /// every other one; a sample at seq 1 is on every interval).
    fn thin(&mut self) {
        self.every *= 2;
        let every = self.every;
        self.samples = 0;
        for tail in self.map.values_mut() {
            tail.samples.retain(|(seq, _)| seq.0 % every == 1);
            tail.samples.shrink_to_fit();
            self.samples += tail.samples.len();
        }
    }
}

/// Positions read back from the stream after a restart (see `rebuild`),
/// bounded like the index itself, to be merged with [`Index::merge_older`].
#[derive(Debug)]
pub struct Rebuilt(Tenants);

impl Default for Rebuilt {
    fn default() -> Self {
        Rebuilt(Tenants::new(MAX_SAMPLES, MAX_EXACT_BYTES))
    }
}

impl Rebuilt {
    /// Records one message, in stream order.
    pub fn push(&mut self, tenant: &Arc<str>, seq: TenantSeq, stream_seq: StreamSeq) {
        self.0.push(tenant, seq, stream_seq);
    }

    /// The tenant's slot, for [`Rebuilt::push_at`]: a saved segment lists a
    /// tenant's positions together, so a load looks each tenant up once a
    /// segment instead of once a position (the lookups were half of a 10M
    /// position load).
    pub fn slot(&mut self, tenant: &Arc<str>) -> u32 {
        self.0.map.slot(tenant)
    }

    /// Records one message of the tenant in `slot`, in stream order.
    pub fn push_at(&mut self, slot: u32, seq: TenantSeq, stream_seq: StreamSeq) {
        self.0.push_at(slot, seq, stream_seq);
    }

    /// Keeps the positions within bounds (call every few thousand messages).
    pub fn bound(&mut self, next_stream_seq: StreamSeq) {
        self.0.bound(next_stream_seq);
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
        Index::with_bounds(MAX_SAMPLES, MAX_EXACT_BYTES)
    }
}

impl Index {
    pub(super) fn with_bounds(max_samples: usize, max_exact_bytes: usize) -> Self {
        Index {
            tenants: Arc::new(RwLock::new(Tenants::new(max_samples, max_exact_bytes))),
            next_stream_seq: Arc::default(),
            replay_to: Arc::default(),
            replayed: Arc::default(),
        }
    }

    /// Seeds last seqs from the checkpoint (stream positions unknown yet).
    pub fn seed(&self, tenants: &[(String, TenantSeq)]) {
        let mut state = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        *state = Tenants::new(state.max_samples, state.max_exact_bytes);
        for (t, seq) in tenants {
            *state.map.get_or_default(&Arc::from(t.as_str())) = TenantTail::new(*seq);
        }
    }

    /// Records events sent (or found already published) at known stream
    /// sequences. The tenants' positions and the next stream sequence change
    /// together, under the lock, so a reader on another thread
    /// ([`Index::known_with_next`]) never sees one without the other.
    pub fn record(&self, events: &[(Arc<str>, TenantSeq, StreamSeq)], next_stream_seq: StreamSeq) {
        let mut state = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        if !events.is_empty() {
            for (tenant, seq, stream_seq) in events {
                state.push(tenant, *seq, *stream_seq);
            }
            state.bound(next_stream_seq);
            state.report();
        }
        self.next_stream_seq
            .fetch_max(next_stream_seq.0, Ordering::SeqCst);
    }

    /// Puts positions read back from the stream (all older than anything
    /// recorded since this process started) in front of the recorded ones.
    pub fn merge_older(&self, older: Rebuilt) {
        let mut state = self.tenants.write().unwrap_or_else(|p| p.into_inner());
        let state = &mut *state;
        let every = state.every;
        for (tenant, mut old) in older.0.map.into_entries() {
            let tail = state.map.get_or_default(&tenant);
            if tail.last_stream_seq == StreamSeq(0) && tail.last_seq <= old.last_seq {
                tail.last_seq = old.last_seq;
                tail.last_stream_seq = old.last_stream_seq;
            }
            let first_new = tail.samples.first().map_or(TenantSeq(u64::MAX), |s| s.0);
            old.samples
                .retain(|(seq, _)| seq.0 % every == 1 && *seq < first_new);
            let added = old.samples.len();
            old.samples.append(&mut tail.samples);
            tail.samples = old.samples;
            state.exact_bytes -= tail.exact.bytes();
            old.exact.append(std::mem::take(&mut tail.exact));
            tail.exact = old.exact;
            state.samples += added;
            state.exact_bytes += tail.exact.bytes();
        }
        let next = StreamSeq(self.next_stream_seq.load(Ordering::SeqCst));
        state.bound(next);
        state.report();
    }

    /// The index is complete only once the replay reaches stream message `seq`.
    pub fn expect_replay_through(&self, seq: StreamSeq) {
        self.replay_to.store(seq.0, Ordering::SeqCst);
    }

    /// Messages up to `seq` already in the stream have been replayed and recorded.
    pub fn replayed_through(&self, seq: StreamSeq) {
        self.replayed.fetch_max(seq.0, Ordering::SeqCst);
    }

    /// Whether answers reflect everything the stream holds.
    pub fn is_ready(&self) -> bool {
        self.replayed.load(Ordering::SeqCst) >= self.replay_to.load(Ordering::SeqCst)
    }

    /// What is known about the tenant's event `seq`, if walcast has seen
    /// the tenant (`stream_last`: the stream's last sequence, the bound of a
    /// window when the tenant's own last position is not known).
    #[cfg(test)] // the service reads both at once: `known_with_next`
    pub fn known(&self, tenant: &str, seq: TenantSeq, stream_last: StreamSeq) -> Option<Known> {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .map
            .get(tenant)
            .map(|tail| tail.known(seq, stream_last))
    }

    /// `Index::known` and the stream sequence the next event will get, as
    /// of one moment. The catch-up service runs on its own thread while the
    /// publisher records: read apart, a tenant's new last event with an
    /// older next sequence would make "nothing missed" start before that
    /// event (a duplicate), and the reverse would start after it (a gap).
    pub fn known_with_next(
        &self,
        tenant: &str,
        seq: TenantSeq,
        stream_last: StreamSeq,
    ) -> (Option<Known>, StreamSeq) {
        let state = self.tenants.read().unwrap_or_else(|p| p.into_inner());
        let known = state
            .map
            .get(tenant)
            .map(|tail| tail.known(seq, stream_last));
        (
            known,
            StreamSeq(self.next_stream_seq.load(Ordering::SeqCst)),
        )
    }

    /// Bytes of exact positions held (bounded by [`MAX_EXACT_BYTES`]).
    #[cfg(test)]
    pub fn exact_bytes(&self) -> usize {
        self.tenants
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .exact_bytes
    }

    /// The stream sequence the next event will get.
    #[cfg(test)]
    pub fn next_stream_seq(&self) -> StreamSeq {
        StreamSeq(self.next_stream_seq.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(from: u64, to: u64) -> Window {
        Window {
            from: StreamSeq(from),
            to: StreamSeq(to),
        }
    }

    fn plain(samples: &[(TenantSeq, StreamSeq)]) -> Vec<(u64, u64)> {
        samples.iter().map(|&(s, q)| (s.0, q.0)).collect()
    }

    /// A tail is paid once per tenant ever seen (100,000 tenants: 12.8 MB
    /// at 128 bytes, plus the name's 16 in `by_tenant`); growing it shows here.
    #[test]
    fn a_tail_stays_small() {
        assert!(
            std::mem::size_of::<TenantTail>() <= 128,
            "{} bytes",
            std::mem::size_of::<TenantTail>()
        );
    }

    #[test]
    fn windows_narrow_to_samples() {
        let index = Index::default();
        let t: Arc<str> = Arc::from("acme");
        let events: Vec<_> = (1..=200)
            .map(|s| (t.clone(), TenantSeq(s), StreamSeq(s * 3)))
            .collect();
        index.record(&events, StreamSeq(601));
        let tail = index
            .tenants
            .read()
            .unwrap()
            .map
            .get("acme")
            .unwrap()
            .clone();
        assert_eq!(
            plain(&tail.samples),
            vec![(1, 3), (65, 195), (129, 387), (193, 579)]
        );
        let window = |seq, last| tail.window(TenantSeq(seq), StreamSeq(last));
        assert_eq!(window(200, 600), w(600, 600));
        assert_eq!(window(70, 600), w(195, 386));
        assert_eq!(window(65, 600), w(195, 386));
        assert_eq!(window(199, 600), w(579, 600));
        assert_eq!(index.next_stream_seq(), StreamSeq(601));
        let fresh = TenantTail::new(TenantSeq(10));
        assert_eq!(fresh.window(TenantSeq(5), StreamSeq(900)), w(1, 900));
    }

    #[test]
    fn samples_are_thinned_to_a_bound() {
        let index = Index::with_bounds(64, MAX_EXACT_BYTES);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        // Two tenants, interleaved: a's seq s at stream 2s - 1, b's at 2s.
        let mut high = 0;
        for chunk in (1..=100_000u64).collect::<Vec<_>>().chunks(500) {
            let events: Vec<_> = chunk
                .iter()
                .flat_map(|&s| {
                    [
                        (a.clone(), TenantSeq(s), StreamSeq(2 * s - 1)),
                        (b.clone(), TenantSeq(s), StreamSeq(2 * s)),
                    ]
                })
                .collect();
            index.record(&events, StreamSeq(2 * chunk[chunk.len() - 1] + 1));
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
        let tail = index.tenants.read().unwrap().map.get("a").unwrap().clone();
        assert!(
            plain(&tail.samples)
                .iter()
                .all(|(s, q)| s % 4096 == 1 && *q == 2 * s - 1)
        );
        assert!(tail.samples.windows(2).all(|w| w[0].0 < w[1].0));
        // Windows stay correct, only wider.
        for seq in [1, 2, 4096, 4097, 50_000, 99_999] {
            let w = tail.window(TenantSeq(seq), StreamSeq(200_001));
            let at = StreamSeq(2 * seq - 1);
            assert!(w.from <= at && at <= w.to, "{seq}: {w:?}");
            assert!(w.to - w.from < 2 * 4096, "{seq}: {w:?}");
        }
        // Thinning never loops on tenants with a single sample each.
        let many = Index::with_bounds(4, MAX_EXACT_BYTES);
        let events: Vec<_> = (0..100u64)
            .map(|t| {
                (
                    Arc::from(format!("t{t}").as_str()),
                    TenantSeq(1),
                    StreamSeq(t + 1),
                )
            })
            .collect();
        many.record(&events, StreamSeq(101));
        assert_eq!(many.tenants.read().unwrap().samples, 100);
    }

    #[test]
    fn exact_positions_are_bounded_and_recent_ones_kept() {
        let index = Index::with_bounds(MAX_SAMPLES, 64 << 10);
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("a"), Arc::from("b"));
        // a: seq s at stream 10s; b fills the nine sequences in between.
        let mut b_seq = 0;
        for chunk in (1..=50_000u64).collect::<Vec<_>>().chunks(100) {
            let mut events = Vec::new();
            for &s in chunk {
                for k in 1..10 {
                    b_seq += 1;
                    events.push((b.clone(), TenantSeq(b_seq), StreamSeq(10 * (s - 1) + k)));
                }
                events.push((a.clone(), TenantSeq(s), StreamSeq(10 * s)));
            }
            index.record(&events, StreamSeq(10 * chunk[chunk.len() - 1] + 1));
            assert!(index.exact_bytes() <= 64 << 10, "{}", index.exact_bytes());
        }
        let known = |seq| {
            index
                .known("a", TenantSeq(seq), StreamSeq(500_000))
                .unwrap()
        };
        assert_eq!(known(50_000).exact, Some(StreamSeq(500_000)));
        assert_eq!(known(49_000).exact, Some(StreamSeq(490_000)));
        // The oldest are no longer exact, but their window still holds them.
        let old = known(10);
        assert_eq!(old.exact, None);
        assert!(
            old.window.from <= StreamSeq(100) && StreamSeq(100) <= old.window.to,
            "{old:?}"
        );
        assert_eq!(old.last_seq, TenantSeq(50_000));
        assert_eq!(
            index
                .known("b", TenantSeq(450_000), StreamSeq(500_000))
                .unwrap()
                .exact,
            Some(StreamSeq(499_999))
        );
        assert!(index.known("c", TenantSeq(1), StreamSeq(500_000)).is_none());
    }

    #[test]
    fn many_tenants_leave_less_room_for_exact_positions() {
        assert_eq!(TAIL_BYTES, 144);
        let mib = 1 << 20;
        assert_eq!(exact_budget(16 * mib, 1_000), 16 * mib - 144_000);
        assert_eq!(exact_budget(16 * mib, 100_000), 16 * mib - 14_400_000);
        assert_eq!(
            exact_budget(16 * mib, 1_000_000),
            mib,
            "never below the floor"
        );
        assert_eq!(
            exact_budget(64 << 10, 1_000),
            64 << 10,
            "nor above the bound"
        );

        // 20,000 tenants of one event each, then a busy one: its positions
        // stay within what the tails leave of a 4 MiB bound.
        let index = Index::with_bounds(MAX_SAMPLES, 4 * mib);
        let quiet: Vec<_> = (0..20_000u64)
            .map(|i| (Arc::from(format!("q{i}")), TenantSeq(1), StreamSeq(i + 1)))
            .collect();
        index.record(&quiet, StreamSeq(20_001));
        let budget = exact_budget(4 * mib, 20_001);
        let busy: Arc<str> = Arc::from("busy");
        let (mut stream_seq, mut most) = (20_000u64, 0);
        for batch in 0..500u64 {
            let events: Vec<_> = (1..=1_000u64)
                .map(|i| {
                    stream_seq += 99_991; // ~18 bits a position
                    (
                        busy.clone(),
                        TenantSeq(batch * 1_000 + i),
                        StreamSeq(stream_seq),
                    )
                })
                .collect();
            index.record(&events, StreamSeq(stream_seq + 1));
            most = most.max(index.exact_bytes());
            assert!(
                index.exact_bytes() <= budget,
                "{} > {budget}",
                index.exact_bytes()
            );
        }
        assert!(
            most > budget * 3 / 4,
            "the budget was used: {most} of {budget}"
        );
        let newest = index
            .known("busy", TenantSeq(500_000), StreamSeq(stream_seq + 1))
            .unwrap();
        assert_eq!(newest.exact, Some(StreamSeq(stream_seq)));
    }

    /// The publisher records on one thread while the catch-up service reads
    /// on another: every read sees a tenant's last position together with a
    /// next stream sequence past it (else "nothing missed" would start
    /// before the tenant's last event, or after its next one).
    #[test]
    fn readers_on_other_threads_see_positions_and_next_together() {
        let index = Index::default();
        let tenants: Vec<Arc<str>> = (0..4)
            .map(|t| Arc::from(format!("t{t}").as_str()))
            .collect();
        let reader = {
            let index = index.clone();
            std::thread::spawn(move || {
                let mut checked = 0u64;
                loop {
                    let last_round = index.next_stream_seq() > StreamSeq(200_000);
                    for t in ["t0", "t1", "t2", "t3"] {
                        let (known, next) = index.known_with_next(t, TenantSeq(1), StreamSeq(0));
                        if let Some(k) = known {
                            assert!(next > k.last_stream_seq, "{t}: next {next}, {k:?}");
                            // Each tenant's last event is the one before the
                            // next of the batch that wrote it (see below).
                            assert!(next - k.last_stream_seq <= 4, "{t}: next {next}, {k:?}");
                            checked += 1;
                        }
                    }
                    if last_round {
                        break checked;
                    }
                }
            })
        };
        // Batches of one event per tenant: stream sequences next..next+4.
        let mut next = 1u64;
        for seq in 1..=50_000u64 {
            let events: Vec<_> = tenants
                .iter()
                .enumerate()
                .map(|(i, t)| (t.clone(), TenantSeq(seq), StreamSeq(next + i as u64)))
                .collect();
            next += 4;
            index.record(&events, StreamSeq(next));
        }
        assert!(reader.join().expect("reader thread") > 0);
    }

    #[test]
    fn rebuilt_positions_go_in_front_of_recorded_ones() {
        let index = Index::default();
        index.seed(&[("a".to_string(), TenantSeq(100))]);
        let a: Arc<str> = Arc::from("a");
        // The new run publishes seqs 101..=200 at 1001..=1100.
        let live: Vec<_> = (101..=200)
            .map(|s| (a.clone(), TenantSeq(s), StreamSeq(s + 900)))
            .collect();
        index.record(&live, StreamSeq(1101));
        let known = |s| index.known("a", TenantSeq(s), StreamSeq(1100)).unwrap();
        assert_eq!(known(50).exact, None);
        // Read back newest first: 51..=100 at 951..=1000, then 1..=50 at 2, 4, ...
        for range in [51..=100u64, 1..=50] {
            let mut rebuilt = Rebuilt::default();
            for s in range {
                let at = if s > 50 { s + 900 } else { 2 * s };
                rebuilt.push(&a, TenantSeq(s), StreamSeq(at));
            }
            index.merge_older(rebuilt);
        }
        for s in 1..=200u64 {
            let want = StreamSeq(if s > 50 { s + 900 } else { 2 * s });
            let known = known(s);
            assert_eq!(known.exact, Some(want), "seq {s}");
            assert!(
                known.window.from <= want && want <= known.window.to,
                "{s}: {known:?}"
            );
            assert_eq!(
                (known.last_seq, known.last_stream_seq),
                (TenantSeq(200), StreamSeq(1100))
            );
        }
        let tenants = index.tenants.read().unwrap();
        let samples = &tenants.map.get("a").unwrap().samples;
        assert_eq!(
            plain(samples),
            vec![(1, 2), (65, 965), (129, 1029), (193, 1093)]
        );
        assert_eq!(index.tenants.read().unwrap().samples, 4);
    }
}
