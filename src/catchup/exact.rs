//! Exact stream positions of one tenant's recent events, ~1–3 bytes each.
//!
//! Why: a catch-up answer found by searching the stream costs at least one
//! message-block load in the nats-server (8 MB, ~5 ms, tens of ms at the
//! tail), however few probes it makes. Knowing the exact position of the
//! event answers from memory. Positions are kept as runs: a [`Mark`] with
//! the full `(seq, stream_seq)` every [`RUN`] consecutive seqs, the others as
//! varint deltas of the stream sequence (a tenant with 10 % of the traffic
//! needs 1 byte per event, one with 0.1 % needs 2).

use smallvec::SmallVec;

use crate::position::{StreamSeq, TenantSeq};

/// Events per run: a lookup decodes at most this many deltas.
pub const RUN: u32 = 64;

/// The start of a run of consecutive seqs.
#[derive(Debug, Clone, Copy)]
struct Mark {
    seq: u64,
    stream_seq: u64,
    /// Absolute offset of the run's first delta in the tenant's delta bytes.
    at: u64,
}

/// Heap bytes accounted per mark.
pub const MARK_BYTES: usize = std::mem::size_of::<Mark>();

/// Delta bytes held inline: a tenant with a few events needs no allocation.
const INLINE_DELTAS: usize = 24;

/// One tenant's exact positions, oldest first; old runs can be dropped.
/// A tenant's first run and its first [`INLINE_DELTAS`] bytes live inline
/// (a fleet of 100,000 mostly quiet tenants then makes no allocation per
/// tenant here).
#[derive(Debug, Default, Clone)]
pub struct Exact {
    marks: SmallVec<[Mark; 1]>,
    deltas: SmallVec<[u8; INLINE_DELTAS]>,
    /// Absolute offset of `deltas[0]` (bytes dropped from the front so far).
    dropped: u64,
    /// The last recorded `(seq, stream_seq)` and the events in its run.
    last: (u64, u64),
    run: u32,
}

impl Exact {
    /// Appends the position of `seq`; returns the bytes it added (for the
    /// index's budget). Seqs that do not follow the last one start a new run.
    pub fn push(&mut self, seq: TenantSeq, stream_seq: StreamSeq) -> usize {
        let (seq, stream_seq) = (seq.0, stream_seq.0); // stored as plain varint deltas
        let (last_seq, last_stream) = self.last;
        if !self.marks.is_empty() && (seq <= last_seq || stream_seq <= last_stream) {
            return 0; // out of order: keep the runs sorted, answers search instead
        }
        self.last = (seq, stream_seq);
        if !self.marks.is_empty() && seq == last_seq + 1 && self.run < RUN {
            self.run += 1;
            let (bytes, len) = varint(stream_seq - last_stream);
            reserve_gently(&mut self.deltas, len);
            self.deltas.extend_from_slice(&bytes[..len]);
            return len;
        }
        reserve_gently(&mut self.marks, 1);
        self.marks.push(Mark {
            seq,
            stream_seq,
            at: self.dropped + self.deltas.len() as u64,
        });
        self.run = 1;
        MARK_BYTES
    }

    /// The stream sequence of `seq`, if it is still held.
    pub fn find(&self, seq: TenantSeq) -> Option<StreamSeq> {
        let seq = seq.0;
        let i = self.marks.partition_point(|m| m.seq <= seq);
        let mark = self.marks.get(i.checked_sub(1)?)?;
        let end = self
            .marks
            .get(i)
            .map_or(self.deltas.len(), |next| (next.at - self.dropped) as usize);
        let mut pos = (mark.at - self.dropped) as usize;
        let mut stream_seq = mark.stream_seq;
        for _ in mark.seq..seq {
            if pos >= end {
                return None; // `seq` is past this run: never recorded
            }
            let (delta, len) = read_varint(&self.deltas[pos..end])?;
            stream_seq += delta;
            pos += len;
        }
        Some(StreamSeq(stream_seq))
    }

    /// Drops the runs that end before stream sequence `cutoff` (positions
    /// at or after it stay); returns the bytes freed.
    pub fn drop_before(&mut self, cutoff: StreamSeq) -> usize {
        let cutoff = cutoff.0;
        let mut n = self
            .marks
            .partition_point(|m| m.stream_seq <= cutoff)
            .saturating_sub(1);
        if n + 1 == self.marks.len() && self.last.1 < cutoff {
            n = self.marks.len(); // the last run too: a tenant gone quiet keeps nothing
        }
        if n == 0 {
            return 0;
        }
        let keep_from = self
            .marks
            .get(n)
            .map_or(self.dropped + self.deltas.len() as u64, |m| m.at);
        let cut = (keep_from - self.dropped) as usize;
        self.deltas.drain(..cut);
        self.dropped = keep_from;
        self.marks.drain(..n);
        self.deltas.shrink_to_fit();
        self.marks.shrink_to_fit();
        cut + n * MARK_BYTES
    }

    /// Appends `later`, whose seqs all follow this one's (if they do not,
    /// only `later` is kept).
    pub fn append(&mut self, later: Exact) {
        let Some(first) = later.marks.first() else {
            return;
        };
        if !self.marks.is_empty() && first.seq <= self.last.0 {
            *self = later;
            return;
        }
        let shift = self.dropped + self.deltas.len() as u64;
        self.marks.extend(later.marks.iter().map(|m| Mark {
            at: m.at - later.dropped + shift,
            ..*m
        }));
        self.deltas.extend_from_slice(&later.deltas);
        self.last = later.last;
        self.run = later.run;
    }

    /// The runs held, oldest first: each run's first `(seq, stream_seq)` and
    /// the varint deltas of the stream sequences of `seq + 1, seq + 2, ...`
    /// (what a saved segment stores, see `segment`).
    pub fn runs(&self) -> impl Iterator<Item = (TenantSeq, StreamSeq, &[u8])> {
        self.marks.iter().enumerate().map(|(i, m)| {
            let from = (m.at - self.dropped) as usize;
            let to = self
                .marks
                .get(i + 1)
                .map_or(self.deltas.len(), |next| (next.at - self.dropped) as usize);
            (
                TenantSeq(m.seq),
                StreamSeq(m.stream_seq),
                &self.deltas[from..to],
            )
        })
    }

    /// Bytes accounted for this tenant.
    pub fn bytes(&self) -> usize {
        self.deltas.len() + self.marks.len() * MARK_BYTES
    }
}

/// Vectors at least this long grow by a quarter instead of doubling.
const GENTLE_FROM: usize = 4096;

/// Makes room for `more` items, growing a long vector by a quarter: a busy
/// tenant's deltas are the index's largest vectors, and doubling could
/// leave them holding up to twice the bytes [`MAX_EXACT_BYTES`] accounts
/// for (a 10M-event stream: ~48 MB real for a 24 MB bound; a quarter still
/// amortizes to O(1) per push).
///
/// [`MAX_EXACT_BYTES`]: super::index::MAX_EXACT_BYTES
fn reserve_gently<A: smallvec::Array>(v: &mut SmallVec<A>, more: usize) {
    if v.len() + more > v.capacity() && v.len() >= GENTLE_FROM {
        v.reserve_exact(more.max(v.len() / 4));
    }
}

pub fn push_varint(out: &mut Vec<u8>, v: u64) -> usize {
    let (bytes, len) = varint(v);
    out.extend_from_slice(&bytes[..len]);
    len
}

/// `v` as a LEB128 varint: the bytes and how many of them are used.
fn varint(mut v: u64) -> ([u8; 10], usize) {
    let mut bytes = [0; 10];
    let mut n = 0;
    while v >= 0x80 {
        bytes[n] = (v as u8) | 0x80;
        v >>= 7;
        n += 1;
    }
    bytes[n] = v as u8;
    (bytes, n + 1)
}

pub fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// Every recorded seq is found at its stream sequence, any other is
        /// not, before and after old runs are dropped.
        #[test]
        fn finds_what_was_recorded(
            steps in proptest::collection::vec((1u64..3, 1u64..400_000), 1..600),
            cut_at in 0usize..600,
        ) {
            let mut exact = Exact::default();
            let (mut seq, mut stream_seq) = (0u64, 0u64);
            let mut recorded = Vec::new();
            let mut bytes = 0;
            for (seq_step, stream_step) in &steps {
                seq += seq_step; // a step of 2 leaves a seq out (a new run)
                stream_seq += stream_step;
                bytes += exact.push(TenantSeq(seq), StreamSeq(stream_seq));
                recorded.push((seq, stream_seq));
            }
            prop_assert_eq!(bytes, exact.bytes());
            // The same, recorded in two parts and appended.
            let split = cut_at.min(recorded.len());
            let (mut front, mut back) = (Exact::default(), Exact::default());
            for (i, &(s, q)) in recorded.iter().enumerate() {
                let (s, q) = (TenantSeq(s), StreamSeq(q));
                if i < split { front.push(s, q); } else { back.push(s, q); }
            }
            let back_bytes = back.bytes();
            let front_bytes = front.bytes();
            front.append(back);
            prop_assert_eq!(front.bytes(), front_bytes + back_bytes);
            for &(s, q) in &recorded {
                prop_assert_eq!(front.find(TenantSeq(s)), Some(StreamSeq(q)));
            }
            let cutoff = recorded.get(cut_at).map_or(u64::MAX, |r| r.1);
            for pass in 0..2 {
                for &(s, q) in &recorded {
                    let got = exact.find(TenantSeq(s)).map(|q| q.0);
                    if pass == 0 || q >= cutoff {
                        prop_assert_eq!(got, Some(q), "seq {} pass {}", s, pass);
                    } else {
                        prop_assert!(got.is_none() || got == Some(q), "seq {} pass {}", s, pass);
                    }
                    prop_assert!(exact.find(TenantSeq(s + 1)).is_none() || recorded.iter().any(|r| r.0 == s + 1));
                }
                prop_assert!(exact.find(TenantSeq(0)).is_none());
                let freed = exact.drop_before(StreamSeq(cutoff));
                bytes -= freed;
                prop_assert_eq!(bytes, exact.bytes());
            }
        }
    }

    #[test]
    fn a_busy_tenants_vectors_grow_by_a_quarter() {
        let mut exact = Exact::default();
        let n = 400_000u64; // past GENTLE_FROM marks too
        for seq in 1..=n {
            exact.push(TenantSeq(seq), StreamSeq(seq * 300)); // 2-byte deltas, a run per 64
        }
        for seq in [1, 2, 64, 65, 4097, n / 2, n] {
            assert_eq!(exact.find(TenantSeq(seq)), Some(StreamSeq(seq * 300)));
        }
        let (len, cap) = (exact.deltas.len(), exact.deltas.capacity());
        assert!(cap <= len + len / 4 + 16, "deltas: {len} bytes in {cap}");
        let (len, cap) = (exact.marks.len(), exact.marks.capacity());
        assert!(
            len > GENTLE_FROM && cap <= len + len / 4 + 1,
            "marks: {len} in {cap}"
        );
    }

    #[test]
    fn varints_round_trip() {
        for v in [0, 1, 127, 128, 300, 1 << 40, u64::MAX] {
            let mut out = Vec::new();
            let n = push_varint(&mut out, v);
            assert_eq!(read_varint(&out), Some((v, n)));
        }
        assert_eq!(read_varint(&[0x80, 0x80]), None);
    }
}
