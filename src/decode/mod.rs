//! pgoutput (protocol version 1) decoder: pure functions from the bytes of one
//! replication `XLogData` payload to a typed [`Message`] that borrows from them.
//!
//! Invariant owned here: decoding never panics and never allocates from a
//! length field; malformed input is a [`DecodeError`] naming what was wrong.
//! Only `Relation` allocates (it is cached for the whole session).
//!
//! Wire format: <https://www.postgresql.org/docs/current/protocol-logicalrep-message-formats.html>

mod change;
mod logical_message;
mod reader;
mod relation;
mod transaction;
mod tuple;

#[cfg(any(test, feature = "pgoutput-encoder"))]
pub mod encode;
#[cfg(test)]
mod tests;

pub use change::{Delete, Insert, Truncate, Update};
pub use logical_message::LogicalMessage;
pub use relation::{Column, Relation, ReplicaIdentity, TypeInfo};
pub use transaction::{Begin, Commit, Origin};
pub use tuple::{Tuple, TupleIter, Value};

use reader::Reader;

/// One decoded pgoutput message.
#[derive(Debug, Clone, PartialEq)]
pub enum Message<'a> {
    Begin(Begin),
    Commit(Commit),
    Origin(Origin<'a>),
    Relation(Relation),
    Type(TypeInfo<'a>),
    Insert(Insert<'a>),
    Update(Update<'a>),
    Delete(Delete<'a>),
    Truncate(Truncate<'a>),
    Message(LogicalMessage<'a>),
}

/// Why a payload is not valid pgoutput. Always a bug in the sender or a
/// protocol mismatch, so the pipeline stops on it instead of guessing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("pgoutput message is empty")]
    Empty,
    #[error("unknown pgoutput message tag {0:#04x} (is the server sending protocol version 1?)")]
    UnknownTag(u8),
    #[error("pgoutput {what} is truncated at byte {offset}")]
    Truncated { what: &'static str, offset: usize },
    #[error("pgoutput {what} has invalid length {len}")]
    BadLength { what: &'static str, len: i64 },
    #[error("pgoutput {what} is not valid UTF-8 (walcast needs a UTF-8 database)")]
    NotUtf8 { what: &'static str },
    #[error("pgoutput {what} has {extra} unexpected trailing bytes")]
    TrailingBytes { what: &'static str, extra: usize },
    #[error("pgoutput {what} has unexpected marker byte {byte:#04x}")]
    BadMarker { what: &'static str, byte: u8 },
}

/// Decodes one pgoutput message.
pub fn decode(buf: &[u8]) -> Result<Message<'_>, DecodeError> {
    let (&tag, body) = buf.split_first().ok_or(DecodeError::Empty)?;
    let mut r = Reader::new(body);
    let msg = match tag {
        b'B' => Message::Begin(Begin::decode(&mut r)?),
        b'C' => Message::Commit(Commit::decode(&mut r)?),
        b'O' => Message::Origin(Origin::decode(&mut r)?),
        b'R' => Message::Relation(Relation::decode(&mut r)?),
        b'Y' => Message::Type(TypeInfo::decode(&mut r)?),
        b'I' => Message::Insert(Insert::decode(&mut r)?),
        b'U' => Message::Update(Update::decode(&mut r)?),
        b'D' => Message::Delete(Delete::decode(&mut r)?),
        b'T' => Message::Truncate(Truncate::decode(&mut r)?),
        b'M' => Message::Message(LogicalMessage::decode(&mut r)?),
        other => return Err(DecodeError::UnknownTag(other)),
    };
    r.finish(tag_name(tag))?;
    Ok(msg)
}

fn tag_name(tag: u8) -> &'static str {
    match tag {
        b'B' => "Begin",
        b'C' => "Commit",
        b'O' => "Origin",
        b'R' => "Relation",
        b'Y' => "Type",
        b'I' => "Insert",
        b'U' => "Update",
        b'D' => "Delete",
        b'T' => "Truncate",
        _ => "Message",
    }
}
