//! Positions that are not WAL positions (those are [`crate::lsn::Lsn`]):
//! JetStream stream sequences and per-tenant sequence numbers. Each is its
//! own type so one cannot be passed where another is expected; the plain
//! `u64` (`.0`) appears only at the edges (NATS headers, SQL columns, JSON
//! bodies, protobuf fields, metrics).

use std::fmt;
use std::ops::{Add, AddAssign, Sub};

/// A JetStream stream sequence: message `n` of the stream, 1-based; 0 means
/// "before the first message".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct StreamSeq(pub u64);

/// A tenant's event number (`seq` in SPEC §3): 1, 2, 3, ... per tenant in
/// commit order; 0 means "no event yet".
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TenantSeq(pub u64);

impl StreamSeq {
    /// The message after this one.
    pub fn next(self) -> StreamSeq {
        StreamSeq(self.0 + 1)
    }

    /// The message before this one.
    pub fn prev(self) -> StreamSeq {
        StreamSeq(self.0 - 1)
    }
}

/// `n` messages further.
impl Add<u64> for StreamSeq {
    type Output = StreamSeq;
    fn add(self, n: u64) -> StreamSeq {
        StreamSeq(self.0 + n)
    }
}

impl AddAssign<u64> for StreamSeq {
    fn add_assign(&mut self, n: u64) {
        self.0 += n;
    }
}

/// How many messages apart two positions are.
impl Sub for StreamSeq {
    type Output = u64;
    fn sub(self, earlier: StreamSeq) -> u64 {
        self.0 - earlier.0
    }
}

impl TenantSeq {
    /// The tenant's next event number.
    pub fn next(self) -> TenantSeq {
        TenantSeq(self.0 + 1)
    }
}

impl fmt::Display for StreamSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl fmt::Display for TenantSeq {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arithmetic_and_text() {
        let s = StreamSeq(41);
        assert_eq!(s.next(), StreamSeq(42));
        assert_eq!(s.prev(), StreamSeq(40));
        assert_eq!(s + 9, StreamSeq(50));
        assert_eq!(StreamSeq(50) - s, 9);
        assert_eq!(s.to_string(), "41");
        assert_eq!(TenantSeq(6).next(), TenantSeq(7));
        assert_eq!(TenantSeq(7).to_string(), "7");
    }
}
