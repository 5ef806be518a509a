//! Transaction boundaries: Begin, Commit and Origin.

use super::{DecodeError, reader::Reader};

/// Microseconds since 2000-01-01 UTC, Postgres' timestamp epoch.
pub type PgMicros = i64;

/// Start of a transaction. `final_lsn` is the LSN of its commit record, known
/// up front, which lets events be built before the Commit arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begin {
    pub final_lsn: u64,
    pub commit_time: PgMicros,
    pub xid: u32,
}

impl Begin {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Begin {
            final_lsn: r.u64("Begin final LSN")?,
            commit_time: r.i64("Begin commit time")?,
            xid: r.u32("Begin xid")?,
        })
    }
}

/// End of a transaction. `end_lsn` is the position a consumer confirms once
/// everything in the transaction is safely delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Commit {
    pub flags: u8,
    pub commit_lsn: u64,
    pub end_lsn: u64,
    pub commit_time: PgMicros,
}

impl Commit {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        Ok(Commit {
            flags: r.u8("Commit flags")?,
            commit_lsn: r.u64("Commit LSN")?,
            end_lsn: r.u64("Commit end LSN")?,
            commit_time: r.i64("Commit time")?,
        })
    }
}

/// Replication origin of the transaction (set when it was itself replicated).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub commit_lsn: u64,
    pub name: &'a str,
}

impl<'a> Origin<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(Origin {
            commit_lsn: r.u64("Origin LSN")?,
            name: r.cstr("Origin name")?,
        })
    }
}
