//! Row changes: Insert, Update, Delete and Truncate.

use super::{DecodeError, reader::Reader, tuple::Tuple};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Insert<'a> {
    pub relation: u32,
    pub new: Tuple<'a>,
}

impl<'a> Insert<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let relation = r.u32("Insert relation")?;
        expect_marker(r, b'N', "Insert new tuple marker")?;
        Ok(Insert {
            relation,
            new: Tuple::decode(r)?,
        })
    }
}

/// An update. `old` is the full old row under REPLICA IDENTITY FULL, only the
/// key columns when the key changed (`key_only`), and absent otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Update<'a> {
    pub relation: u32,
    pub old: Option<Tuple<'a>>,
    pub key_only: bool,
    pub new: Tuple<'a>,
}

impl<'a> Update<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let relation = r.u32("Update relation")?;
        let (old, key_only) = match r.u8("Update tuple marker")? {
            b'N' => {
                return Ok(Update {
                    relation,
                    old: None,
                    key_only: false,
                    new: Tuple::decode(r)?,
                });
            }
            b'K' => (Tuple::decode(r)?, true),
            b'O' => (Tuple::decode(r)?, false),
            byte => {
                return Err(DecodeError::BadMarker {
                    what: "Update tuple marker",
                    byte,
                });
            }
        };
        expect_marker(r, b'N', "Update new tuple marker")?;
        Ok(Update {
            relation,
            old: Some(old),
            key_only,
            new: Tuple::decode(r)?,
        })
    }
}

/// A delete: `old` is the full old row (`key_only == false`) or its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delete<'a> {
    pub relation: u32,
    pub old: Tuple<'a>,
    pub key_only: bool,
}

impl<'a> Delete<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let relation = r.u32("Delete relation")?;
        let key_only = match r.u8("Delete tuple marker")? {
            b'K' => true,
            b'O' => false,
            byte => {
                return Err(DecodeError::BadMarker {
                    what: "Delete tuple marker",
                    byte,
                });
            }
        };
        Ok(Delete {
            relation,
            old: Tuple::decode(r)?,
            key_only,
        })
    }
}

/// TRUNCATE of one or more relations. `relations` holds big-endian u32 oids.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Truncate<'a> {
    pub options: u8,
    relations: &'a [u8],
}

impl<'a> Truncate<'a> {
    pub const CASCADE: u8 = 1;
    pub const RESTART_IDENTITY: u8 = 2;

    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let count = r.i32("Truncate relation count")?;
        let count = usize::try_from(count).map_err(|_| DecodeError::BadLength {
            what: "Truncate relation count",
            len: i64::from(count),
        })?;
        let options = r.u8("Truncate options")?;
        let bytes = count.checked_mul(4).ok_or(DecodeError::BadLength {
            what: "Truncate relation count",
            len: count as i64,
        })?;
        Ok(Truncate {
            options,
            relations: r.take(bytes, "Truncate relations")?,
        })
    }

    /// The truncated relations' oids.
    pub fn relations(&self) -> impl Iterator<Item = u32> + 'a {
        self.relations
            .chunks_exact(4)
            .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
    }
}

fn expect_marker(r: &mut Reader<'_>, want: u8, what: &'static str) -> Result<(), DecodeError> {
    match r.u8(what)? {
        byte if byte == want => Ok(()),
        byte => Err(DecodeError::BadMarker { what, byte }),
    }
}
