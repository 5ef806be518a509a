//! Logical decoding messages from `pg_logical_emit_message()`.

use super::{DecodeError, reader::Reader};

/// A message a transaction wrote into the WAL, e.g. `walcast.actor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogicalMessage<'a> {
    /// Emitted with `transactional = true`: delivered inside its transaction.
    pub transactional: bool,
    pub lsn: u64,
    pub prefix: &'a str,
    pub content: &'a [u8],
}

impl<'a> LogicalMessage<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let flags = r.u8("Message flags")?;
        Ok(LogicalMessage {
            transactional: flags & 1 == 1,
            lsn: r.u64("Message LSN")?,
            prefix: r.cstr("Message prefix")?,
            content: r.len_prefixed("Message content")?,
        })
    }
}
