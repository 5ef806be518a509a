//! Saved segments: the exact positions of every tenant event in one range
//! of stream sequences `[first, last]`, all tenants together, as the
//! publisher recorded them (see `saved` for where they are kept and how a
//! restart uses them).
//!
//! Encoding (version 1), all numbers LEB128 varints:
//! `version: u8, first, last, positions, tenants`, then per tenant
//! `name length, name, runs` and per run (`exact.rs`'s runs of consecutive
//! seqs) `seq, stream_seq - first, delta bytes, deltas...`: ~2 bytes per
//! event (the index's Rice codes are denser, but a segment is written
//! once and this format is what version 1 stores). Decoding checks everything (seqs and
//! stream sequences strictly increasing per tenant, inside `[first, last]`,
//! valid tenant ids, the position count, no trailing bytes): a segment that
//! fails is skipped, never trusted.

use std::collections::HashMap;
use std::sync::Arc;

use super::exact::{Exact, push_varint, read_varint};
use crate::events::tenant;
use crate::position::{StreamSeq, TenantSeq};

/// The encoding written by this version.
pub const VERSION: u8 = 1;

/// One range's positions, encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    pub first: StreamSeq,
    pub last: StreamSeq,
    pub positions: u64,
    pub data: Vec<u8>,
}

/// Why a saved segment was not used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("corrupt catch-up segment: {0} (skipped: its range is searched or read back instead)")]
pub struct Corrupt(pub &'static str);

/// Collects positions, in stream order, into one segment.
#[derive(Debug, Default)]
pub struct Builder {
    tenants: HashMap<Arc<str>, Exact>,
    positions: u64,
    last: StreamSeq,
}

impl Builder {
    /// Adds the position of a tenant's event (positions out of order are
    /// left out: the range's answers then search the stream).
    pub fn push(&mut self, tenant: &Arc<str>, seq: TenantSeq, stream_seq: StreamSeq) {
        let exact = match self.tenants.get_mut(tenant) {
            Some(exact) => exact,
            None => self.tenants.entry(tenant.clone()).or_default(),
        };
        if exact.push(seq, stream_seq).is_some() {
            self.positions += 1;
            self.last = self.last.max(stream_seq);
        }
    }

    /// Positions held.
    pub fn positions(&self) -> u64 {
        self.positions
    }

    /// The highest stream sequence held.
    pub fn last(&self) -> StreamSeq {
        self.last
    }

    /// The segment `[first, last]` (`first` at or below every position held,
    /// `last` at or above); empties the builder.
    pub fn finish(&mut self, first: StreamSeq, last: StreamSeq) -> Segment {
        let tenants = std::mem::take(&mut self.tenants);
        let positions = std::mem::take(&mut self.positions);
        self.last = StreamSeq(0);
        let mut data = Vec::with_capacity(16 + positions as usize * 2);
        data.push(VERSION);
        push_varint(&mut data, first.0);
        push_varint(&mut data, last.0);
        push_varint(&mut data, positions);
        push_varint(&mut data, tenants.len() as u64);
        let mut deltas = Vec::new();
        for (tenant, exact) in &tenants {
            push_varint(&mut data, tenant.len() as u64);
            data.extend_from_slice(tenant.as_bytes());
            push_varint(&mut data, exact.runs().count() as u64);
            for (seq, stream_seq, steps) in exact.runs() {
                deltas.clear();
                for step in steps {
                    push_varint(&mut deltas, step);
                }
                push_varint(&mut data, seq.0);
                push_varint(&mut data, stream_seq.0.saturating_sub(first.0));
                push_varint(&mut data, deltas.len() as u64);
                data.extend_from_slice(&deltas);
            }
        }
        Segment {
            first,
            last,
            positions,
            data,
        }
    }
}

/// A decoded segment's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub first: StreamSeq,
    pub last: StreamSeq,
    pub positions: u64,
}

/// Checks `data` whole, then hands every position to `each` (per tenant,
/// in stream order); nothing is handed over from a corrupt segment.
pub fn decode(
    data: &[u8],
    mut each: impl FnMut(&str, TenantSeq, StreamSeq),
) -> Result<Header, Corrupt> {
    let header = walk(data, &mut |_, _, _| {})?;
    walk(data, &mut each)?;
    Ok(header)
}

/// Hands every position to `each` while checking `data`, in one pass: a
/// caller that gets an error must discard what it was handed (cheaper
/// than [`decode`] where the positions are only looked at).
pub fn scan(
    data: &[u8],
    mut each: impl FnMut(&str, TenantSeq, StreamSeq),
) -> Result<Header, Corrupt> {
    walk(data, &mut each)
}

/// Reads varints off the front of a slice.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn varint(&mut self, what: &'static str) -> Result<u64, Corrupt> {
        let (v, len) = read_varint(self.0).ok_or(Corrupt(what))?;
        self.0 = &self.0[len..];
        Ok(v)
    }

    fn bytes(&mut self, n: u64, what: &'static str) -> Result<&'a [u8], Corrupt> {
        let n = usize::try_from(n).map_err(|_| Corrupt(what))?;
        if n > self.0.len() {
            return Err(Corrupt(what));
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }
}

fn walk(data: &[u8], each: &mut impl FnMut(&str, TenantSeq, StreamSeq)) -> Result<Header, Corrupt> {
    let (&version, rest) = data.split_first().ok_or(Corrupt("empty"))?;
    if version != VERSION {
        return Err(Corrupt("unknown version"));
    }
    let mut r = Reader(rest);
    let first = r.varint("first")?;
    let last = r.varint("last")?;
    let positions = r.varint("positions")?;
    if first == 0 || last < first {
        return Err(Corrupt("range"));
    }
    let tenants = r.varint("tenant count")?;
    let mut seen = 0u64;
    for _ in 0..tenants {
        let len = r.varint("tenant length")?;
        let name = std::str::from_utf8(r.bytes(len, "tenant")?).map_err(|_| Corrupt("tenant"))?;
        tenant::validate(Some(name)).map_err(|_| Corrupt("tenant"))?;
        let runs = r.varint("run count")?;
        let (mut prev_seq, mut prev_stream) = (0u64, 0u64);
        for _ in 0..runs {
            let seq = r.varint("seq")?;
            let offset = r.varint("stream offset")?;
            let mut stream_seq = first.checked_add(offset).ok_or(Corrupt("stream offset"))?;
            if seq <= prev_seq || stream_seq <= prev_stream || stream_seq > last {
                return Err(Corrupt("positions out of order"));
            }
            let n = r.varint("delta length")?;
            let mut deltas = Reader(r.bytes(n, "deltas")?);
            let mut seq = seq;
            loop {
                seen += 1;
                each(name, TenantSeq(seq), StreamSeq(stream_seq));
                (prev_seq, prev_stream) = (seq, stream_seq);
                if deltas.0.is_empty() {
                    break;
                }
                let delta = deltas.varint("delta")?;
                seq = seq.checked_add(1).ok_or(Corrupt("seq"))?;
                stream_seq = stream_seq
                    .checked_add(delta)
                    .filter(|&s| delta > 0 && s <= last)
                    .ok_or(Corrupt("delta"))?;
            }
        }
    }
    if !r.0.is_empty() {
        return Err(Corrupt("trailing bytes"));
    }
    if seen != positions {
        return Err(Corrupt("position count"));
    }
    Ok(Header {
        first: StreamSeq(first),
        last: StreamSeq(last),
        positions,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decoded(data: &[u8]) -> Result<Vec<(String, u64, u64)>, Corrupt> {
        let mut out = Vec::new();
        decode(data, |t, s, q| out.push((t.to_string(), s.0, q.0)))?;
        out.sort();
        Ok(out)
    }

    proptest! {
        /// Every position recorded comes back, and nothing else.
        #[test]
        fn round_trips(
            steps in proptest::collection::vec((0usize..4, 1u64..3, 1u64..300), 1..800),
            base in 1u64..1_000_000_000,
        ) {
            let tenants: Vec<Arc<str>> = ["a", "b-2", "c_3", "d"].iter().map(|t| Arc::from(*t)).collect();
            let mut builder = Builder::default();
            let mut seqs = [0u64; 4];
            let mut stream_seq = base;
            let mut want = Vec::new();
            for &(t, seq_step, stream_step) in &steps {
                stream_seq += stream_step;
                seqs[t] += seq_step;
                builder.push(&tenants[t], TenantSeq(seqs[t]), StreamSeq(stream_seq));
                want.push((tenants[t].to_string(), seqs[t], stream_seq));
            }
            want.sort();
            let segment = builder.finish(StreamSeq(base), StreamSeq(stream_seq + 5));
            prop_assert_eq!(segment.positions, steps.len() as u64);
            prop_assert!(segment.data.len() <= 64 + steps.len() * 4, "{} bytes", segment.data.len());
            prop_assert_eq!(decoded(&segment.data), Ok(want));
            prop_assert_eq!(builder.positions(), 0);
        }

        /// Damaged data is refused or decodes to positions inside the range,
        /// never a panic.
        #[test]
        fn damage_is_caught_or_harmless(
            steps in proptest::collection::vec((0usize..3, 1u64..200), 1..300),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
        ) {
            let tenants: Vec<Arc<str>> = ["a", "b", "c"].iter().map(|t| Arc::from(*t)).collect();
            let mut builder = Builder::default();
            let (mut seqs, mut stream_seq) = ([0u64; 3], 10u64);
            for &(t, step) in &steps {
                stream_seq += step;
                seqs[t] += 1;
                builder.push(&tenants[t], TenantSeq(seqs[t]), StreamSeq(stream_seq));
            }
            let segment = builder.finish(StreamSeq(10), StreamSeq(stream_seq));
            let mut data = segment.data.clone();
            for (at, byte) in &flips {
                let i = at.index(data.len());
                data[i] ^= byte | 1;
            }
            if let Ok(header) = decode(&data, |_, _, _| {}) {
                decode(&data, |_, _, q| assert!(header.first <= q && q <= header.last)).unwrap();
            }
            let short = &segment.data[..cut.index(segment.data.len())];
            prop_assert!(decode(short, |_, _, _| ()).is_err(), "{} bytes decoded", short.len());
        }
    }

    #[test]
    fn refuses_what_it_cannot_trust() {
        assert_eq!(decoded(&[]), Err(Corrupt("empty")));
        assert_eq!(decoded(&[2, 1, 1, 0, 0]), Err(Corrupt("unknown version")));
        assert_eq!(decoded(&[1, 5, 4, 0, 0]), Err(Corrupt("range")));
        assert_eq!(decoded(&[1, 1, 9, 0, 0]), Ok(vec![]));
        assert_eq!(decoded(&[1, 1, 9, 1, 0]), Err(Corrupt("position count")));
        assert_eq!(decoded(&[1, 1, 9, 0, 0, 7]), Err(Corrupt("trailing bytes")));
        // One tenant "a", one run: seq 3 at 1 + 2, then a delta past `last`.
        assert_eq!(
            decoded(&[1, 1, 9, 2, 1, 1, b'a', 1, 3, 2, 1, 1]),
            Ok(vec![("a".into(), 3, 3), ("a".into(), 4, 4)])
        );
        assert_eq!(
            decoded(&[1, 1, 9, 2, 1, 1, b'a', 1, 3, 2, 1, 7]),
            Err(Corrupt("delta"))
        );
        assert_eq!(
            decoded(&[1, 1, 9, 1, 1, 1, b'.', 1, 3, 2, 0]),
            Err(Corrupt("tenant"))
        );
    }
}
