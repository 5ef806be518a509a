//! Exact stream positions of one tenant's recent events, ~0.5–1.7 bytes each.
//!
//! Why: a catch-up answer found by searching the stream costs at least one
//! message-block load in the nats-server (8 MB, ~5 ms, tens of ms at the
//! tail), however few probes it makes. Knowing the exact position of the
//! event answers from memory. Positions are kept as runs: a [`Mark`] with
//! the full `(seq, stream_seq)` every [`RUN`] consecutive seqs, the others as
//! Rice codes of the stream sequence's steps (a step `d` is `d >> k` in
//! unary, then the low `k` bits), `k` picked per run from the tenant's
//! average step so far. The steps of a tenant's events are roughly
//! geometric, where a Rice code is near the entropy: a tenant with 0.1 % of
//! the traffic needs ~1.5 bytes per event (2 as varints), one with 10 %
//! ~0.7 (1 as varints). But a transaction's events are contiguous in the
//! stream, so a tenant whose transactions change several rows has many
//! steps of exactly 1: when the previous run had enough of them, a run
//! codes a step of 1 as one `0` bit and any other as `1` and the Rice code
//! of `d - 2` (transactions of 1–10 rows: ~0.5 bytes per event, 1.2 as
//! varints). A step too large for its run's code starts a new run.

use smallvec::SmallVec;

use crate::position::{StreamSeq, TenantSeq};

/// Events per run: a lookup decodes at most this many codes.
pub const RUN: u32 = 256;

/// Longest unary part of a code; a larger step starts a new run instead
/// (a mark costs 24 bytes, a unary part this long 4).
const MAX_UNARY: u64 = 32;

/// How a run codes its steps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Code {
    /// Rice parameter.
    k: u32,
    /// Steps of 1 are one `0` bit; others `1` and the Rice code of `d - 2`.
    ones: bool,
}

impl Code {
    /// The bits of `step` (value, count) as two parts: the prefix (flag and
    /// unary) and the Rice remainder; `None` if too large for this code.
    fn parts(self, step: u64) -> Option<((u64, u32), (u64, u32))> {
        if self.ones && step == 1 {
            return Some(((0, 1), (0, 0)));
        }
        let (value, flag) = if self.ones { (step - 2, 1) } else { (step, 0) };
        let q = value >> self.k;
        if q >= MAX_UNARY {
            return None;
        }
        // flag bit, q ones, a zero
        let prefix = (((1u64 << q) - 1) << flag) | flag as u64;
        Some(((prefix, q as u32 + 1 + flag), (value, self.k)))
    }
}

/// The start of a run of consecutive seqs.
#[derive(Debug, Clone, Copy)]
struct Mark {
    seq: u64,
    stream_seq: u64,
    /// Bit offset of the run's first code in the tenant's bits (as they are now),
    /// shifted left by 7; the run's [`Code`] in the low 7 (`k`, then `ones`).
    at_code: u64,
}

impl Mark {
    fn at(&self) -> u64 {
        self.at_code >> 7
    }

    fn code(&self) -> Code {
        Code {
            k: (self.at_code & 63) as u32,
            ones: self.at_code & 64 != 0,
        }
    }

    fn with_at(at: u64, code: Code) -> u64 {
        at << 7 | u64::from(code.k) | if code.ones { 64 } else { 0 }
    }
}

/// Heap bytes accounted per mark.
pub const MARK_BYTES: usize = std::mem::size_of::<Mark>();

/// Code bytes held inline: a tenant with a few events needs no allocation.
const INLINE_BYTES: usize = 24;

/// One tenant's exact positions, oldest first; old runs can be dropped.
/// A tenant's first run and its first [`INLINE_BYTES`] bytes of codes live
/// inline (a fleet of 100,000 mostly quiet tenants then makes no allocation
/// per tenant here).
#[derive(Debug, Default, Clone)]
pub struct Exact {
    marks: SmallVec<[Mark; 1]>,
    /// The codes, least significant bit first.
    bits: SmallVec<[u8; INLINE_BYTES]>,
    /// The last recorded `(seq, stream_seq)`, the events in its run and
    /// how many of its steps were 1.
    last: (u64, u64),
    run: u16,
    ones: u16,
    /// Bits used in `bits`' last byte (0: it is full, or there is none).
    fill: u8,
}

impl Exact {
    /// Appends the position of `seq`; returns the bytes it added (for the
    /// index's budget; a code may fit in the last byte: 0), or `None` if it
    /// is out of order and was left out (answers for it search instead).
    /// Seqs that do not follow the last one start a new run.
    pub fn push(&mut self, seq: TenantSeq, stream_seq: StreamSeq) -> Option<usize> {
        let (seq, stream_seq) = (seq.0, stream_seq.0);
        let (last_seq, last_stream) = self.last;
        let Some(mark) = self.marks.last().copied() else {
            return Some(self.start_run(seq, stream_seq, None));
        };
        if seq <= last_seq || stream_seq <= last_stream {
            return None;
        }
        let step = stream_seq - last_stream;
        if seq == last_seq + 1 && u32::from(self.run) < RUN {
            let before = self.bits.len();
            if let Some((prefix, rest)) = mark.code().parts(step) {
                self.put(prefix.0, prefix.1);
                self.put(rest.0, rest.1);
                self.last = (seq, stream_seq);
                self.run += 1;
                self.ones += u16::from(step == 1);
                return Some(self.bits.len() - before);
            }
        }
        Some(self.start_run(seq, stream_seq, Some(mark)))
    }

    /// A new mark at `(seq, stream_seq)`, its code from the previous run's
    /// steps (or, for the first, the tenant's average step since the
    /// stream began, with flagged ones: a quiet tenant's few events are
    /// often one transaction's, whose steps of 1 would cost `k + 1` bits
    /// each and push its codes out of the inline bytes; without any, the
    /// flag costs a bit per event of one run).
    fn start_run(&mut self, seq: u64, stream_seq: u64, previous: Option<Mark>) -> usize {
        let code = match previous {
            Some(m) if self.last.0 > m.seq => {
                self.next_code(self.last.1 - m.stream_seq, self.last.0 - m.seq)
            }
            _ => Code {
                k: rice_k(stream_seq / seq.max(1)),
                ones: true,
            },
        };
        reserve_gently(&mut self.marks, 1);
        self.marks.push(Mark {
            seq,
            stream_seq,
            at_code: Mark::with_at(self.end_bit(), code),
        });
        self.last = (seq, stream_seq);
        self.run = 1;
        self.ones = 0;
        MARK_BYTES
    }

    /// The code for a run after one whose `steps` steps spanned `span`:
    /// flagged ones when they save more bits (`k` each) than the flag costs
    /// the other steps (1 each).
    fn next_code(&self, span: u64, steps: u64) -> Code {
        let ones = u64::from(self.ones);
        let plain = rice_k(span / steps);
        let others = steps - ones;
        if ones * u64::from(plain.max(1)) <= others {
            return Code {
                k: plain,
                ones: false,
            };
        }
        let mean_other = (span - ones) / others.max(1);
        Code {
            k: rice_k(mean_other.saturating_sub(2)),
            ones: true,
        }
    }

    /// Bit offset just past the last code.
    fn end_bit(&self) -> u64 {
        let unused = if self.fill == 0 {
            0
        } else {
            8 - u64::from(self.fill)
        };
        self.bits.len() as u64 * 8 - unused
    }

    /// Appends the low `n` (≤ 57) bits of `value`, least significant first.
    fn put(&mut self, mut value: u64, mut n: u32) {
        while n > 0 {
            if self.fill == 0 {
                reserve_gently(&mut self.bits, 1);
                self.bits.push(0);
            }
            let take = (8 - u32::from(self.fill)).min(n);
            if let Some(byte) = self.bits.last_mut() {
                *byte |= ((value & ((1 << take) - 1)) as u8) << self.fill;
            }
            value >>= take;
            n -= take;
            self.fill = ((u32::from(self.fill) + take) % 8) as u8;
        }
    }

    /// Where run `i`'s codes are, as bit offsets into `bits`.
    fn run_bits(&self, i: usize) -> (usize, usize) {
        let from = self.marks[i].at();
        let to = self.marks.get(i + 1).map_or(self.end_bit(), Mark::at);
        (from as usize, to as usize)
    }

    /// The stream sequence of `seq`, if it is still held.
    pub fn find(&self, seq: TenantSeq) -> Option<StreamSeq> {
        let seq = seq.0;
        let i = self
            .marks
            .partition_point(|m| m.seq <= seq)
            .checked_sub(1)?;
        let mark = self.marks[i];
        let (from, to) = self.run_bits(i);
        let mut codes = Codes::new(&self.bits, from, to, mark.code());
        let mut stream_seq = mark.stream_seq;
        for _ in mark.seq..seq {
            stream_seq += codes.next()?; // None: `seq` is past this run, never recorded
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
        let keep_from = self.marks.get(n).map_or(self.end_bit(), Mark::at);
        let cut = (keep_from / 8) as usize;
        self.bits.drain(..cut);
        self.marks.drain(..n);
        // Offsets are into `bits` as it is now (no count of dropped bytes
        // to keep: 8 bytes less per tenant).
        for mark in &mut self.marks {
            mark.at_code = Mark::with_at(mark.at() - cut as u64 * 8, mark.code());
        }
        self.bits.shrink_to_fit();
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
        let shift = self.end_bit();
        let (from, to) = (first.at(), later.end_bit());
        self.marks.extend(later.marks.iter().map(|m| Mark {
            at_code: Mark::with_at(m.at() - first.at() + shift, m.code()),
            ..*m
        }));
        let mut bit = from;
        while bit < to {
            let n = (to - bit).min(57) as u32;
            self.put(read_bits(&later.bits, bit as usize, n), n);
            bit += u64::from(n);
        }
        self.last = later.last;
        self.run = later.run;
        self.ones = later.ones;
    }

    /// The runs held, oldest first: each run's first `(seq, stream_seq)` and
    /// the steps to the stream sequences of `seq + 1, seq + 2, ...` (what a
    /// saved segment stores, see `segment`).
    pub fn runs(&self) -> impl Iterator<Item = (TenantSeq, StreamSeq, Codes<'_>)> {
        (0..self.marks.len()).map(|i| {
            let mark = self.marks[i];
            let (from, to) = self.run_bits(i);
            (
                TenantSeq(mark.seq),
                StreamSeq(mark.stream_seq),
                Codes::new(&self.bits, from, to, mark.code()),
            )
        })
    }

    /// Bytes accounted for this tenant.
    pub fn bytes(&self) -> usize {
        self.bits.len() + self.marks.len() * MARK_BYTES
    }
}

/// The Rice parameter for steps averaging `mean`: ~log2(mean · ln 2).
fn rice_k(mean: u64) -> u32 {
    let scaled = mean.saturating_mul(45) / 64; // ln 2 ≈ 0.70
    scaled.checked_ilog2().unwrap_or(0).min(56)
}

/// `n` (≤ 57) bits of `bytes` from bit offset `at`, least significant first.
fn read_bits(bytes: &[u8], at: usize, n: u32) -> u64 {
    let mut word = [0u8; 8];
    let start = at / 8;
    let avail = bytes.len().saturating_sub(start).min(8);
    word[..avail].copy_from_slice(&bytes[start..start + avail]);
    (u64::from_le_bytes(word) >> (at % 8)) & ((1 << n) - 1)
}

/// The steps of one run, decoded from its codes.
#[derive(Debug, Clone)]
pub struct Codes<'a> {
    bytes: &'a [u8],
    at: usize,
    end: usize,
    code: Code,
}

impl<'a> Codes<'a> {
    fn new(bytes: &'a [u8], at: usize, end: usize, code: Code) -> Self {
        Codes {
            bytes,
            at,
            end,
            code,
        }
    }

    fn bits(&mut self, n: u32) -> u64 {
        let v = read_bits(self.bytes, self.at, n);
        self.at += n as usize;
        v
    }
}

impl Iterator for Codes<'_> {
    type Item = u64;

    fn next(&mut self) -> Option<u64> {
        // Codes are contiguous and a run's bits end with its last one.
        if self.at >= self.end {
            return None;
        }
        let Code { k, ones } = self.code;
        if ones && self.bits(1) == 0 {
            return Some(1);
        }
        let q = u64::from(read_bits(self.bytes, self.at, MAX_UNARY as u32 + 1).trailing_ones())
            .min(MAX_UNARY);
        self.at += q as usize + 1;
        let value = q << k | self.bits(k);
        Some(if ones { value + 2 } else { value })
    }
}

/// Vectors at least this long grow by a quarter instead of doubling.
const GENTLE_FROM: usize = 4096;

/// Makes room for `more` items, growing a long vector by a quarter: a busy
/// tenant's deltas are the index's largest vectors, and doubling could
/// leave them holding up to twice the bytes [`MAX_EXACT_BYTES`] accounts
/// for (a 10M-event stream: ~32 MB real for a 16 MB bound; a quarter still
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
            // Mostly steps of 1-3 (flagged ones), or any size (plain codes
            // and steps too large for a run's code).
            steps in prop_oneof![
                proptest::collection::vec(
                    (prop_oneof![15 => Just(1u64), 1 => Just(2)], prop_oneof![4 => 1u64..4, 1 => 1u64..400_000]),
                    1..1200,
                ),
                proptest::collection::vec((1u64..3, 1u64..400_000), 1..600),
            ],
            cut_at in 0usize..1200,
        ) {
            let mut exact = Exact::default();
            let (mut seq, mut stream_seq) = (0u64, 0u64);
            let mut recorded = Vec::new();
            let mut bytes = 0;
            for (seq_step, stream_step) in &steps {
                seq += seq_step; // a step of 2 leaves a seq out (a new run)
                stream_seq += stream_step;
                bytes += exact.push(TenantSeq(seq), StreamSeq(stream_seq)).unwrap();
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
            // The back's codes may start in the front's last byte.
            prop_assert!((front_bytes + back_bytes).saturating_sub(1) <= front.bytes());
            prop_assert!(front.bytes() <= front_bytes + back_bytes);
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
        let n = 1_200_000u64; // past GENTLE_FROM marks too
        for seq in 1..=n {
            exact.push(TenantSeq(seq), StreamSeq(seq * 300)); // 10-bit codes, a run per 256
        }
        for seq in [1, 2, 256, 257, 4097, n / 2, n] {
            assert_eq!(exact.find(TenantSeq(seq)), Some(StreamSeq(seq * 300)));
        }
        let (len, cap) = (exact.bits.len(), exact.bits.capacity());
        assert!(cap <= len + len / 4 + 16, "codes: {len} bytes in {cap}");
        let (len, cap) = (exact.marks.len(), exact.marks.capacity());
        assert!(
            len > GENTLE_FROM && cap <= len + len / 4 + 1,
            "marks: {len} in {cap}"
        );
    }

    /// Steps of a tenant with 1/`share` of the traffic: geometric, mean `share`.
    fn steps(share: f64, n: usize) -> impl Iterator<Item = u64> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..n).map(move |_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let u = (x >> 11) as f64 / (1u64 << 53) as f64;
            1 + ((1.0 - u).ln() / (1.0 - 1.0 / share).ln()) as u64
        })
    }

    /// The density the module's doc promises: ~1.45 bytes per event for a
    /// tenant with 0.1 % of the traffic, ~0.7 with 10 % (marks included).
    #[test]
    fn rice_codes_are_dense_for_geometric_steps() {
        for (share, most) in [(1000.0, 1.6), (100.0, 1.25), (10.0, 0.8), (1.5, 0.5)] {
            let mut exact = Exact::default();
            let (mut stream_seq, n) = (0, 200_000);
            let mut want = Vec::with_capacity(n);
            for (seq, step) in (1..).zip(steps(share, n)) {
                stream_seq += step;
                exact.push(TenantSeq(seq), StreamSeq(stream_seq));
                want.push(stream_seq);
            }
            let per_event = exact.bytes() as f64 / n as f64;
            eprintln!("1/{share} of the traffic: {per_event:.3} bytes per event");
            assert!(
                per_event <= most,
                "1/{share} of the traffic: {per_event:.2} bytes per event"
            );
            for seq in (1..=n).step_by(997) {
                assert_eq!(
                    exact.find(TenantSeq(seq as u64)),
                    Some(StreamSeq(want[seq - 1]))
                );
            }
        }
    }

    /// A tenant with 1/1000 of the traffic in transactions of 1–10 rows
    /// (the benchmark's load): most steps are 1, where flagged codes need
    /// one bit.
    #[test]
    fn steps_of_one_cost_a_bit() {
        let mut exact = Exact::default();
        let (mut stream_seq, mut seq, mut want) = (0, 0u64, Vec::new());
        let mut gaps = steps(5500.0, 40_000);
        let mut rows = 0u64;
        while seq < 200_000 {
            rows = rows * 7 % 11 + 1; // 1..=11, varied
            stream_seq += gaps.next().unwrap_or(1);
            for row in 0..rows {
                seq += 1;
                stream_seq += u64::from(row > 0);
                exact.push(TenantSeq(seq), StreamSeq(stream_seq));
                want.push(stream_seq);
            }
        }
        let per_event = exact.bytes() as f64 / seq as f64;
        assert!(per_event <= 0.6, "{per_event:.2} bytes per event");
        for s in (1..=seq).step_by(991) {
            assert_eq!(
                exact.find(TenantSeq(s)),
                Some(StreamSeq(want[s as usize - 1]))
            );
        }
    }

    /// 100,000 quiet tenants: three 5-row transactions of one, far apart
    /// in the stream, stay in the inline bytes (no allocation per tenant).
    #[test]
    fn a_quiet_tenants_transactions_stay_inline() {
        let mut exact = Exact::default();
        let mut seq = 0;
        for txn in 0..3u64 {
            let at = 500_000 + txn * 100_000;
            for row in 0..5 {
                seq += 1;
                exact.push(TenantSeq(seq), StreamSeq(at + row));
            }
        }
        assert!(
            !exact.bits.spilled() && !exact.marks.spilled(),
            "{} code bytes, {} marks",
            exact.bits.len(),
            exact.marks.len()
        );
        assert_eq!(exact.find(TenantSeq(15)), Some(StreamSeq(700_004)));
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
