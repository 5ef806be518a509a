//! TupleData: the column values of one row, borrowed from the message.

use super::{DecodeError, reader::Reader};

/// One column value as pgoutput sends it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Value<'a> {
    Null,
    /// An unchanged TOASTed value that Postgres did not send (updates only).
    UnchangedToast,
    /// Text output of the column's type.
    Text(&'a [u8]),
    /// Binary send output (only with the `binary` option, which walcast does not use).
    Binary(&'a [u8]),
}

impl<'a> Value<'a> {
    /// The text form, if this value has one.
    pub fn as_text(&self) -> Option<&'a str> {
        match self {
            Value::Text(bytes) => std::str::from_utf8(bytes).ok(),
            _ => None,
        }
    }
}

/// A validated row image. Validation walks it once on decode, so iterating is
/// infallible and allocation-free.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Tuple<'a> {
    len: u16,
    data: &'a [u8],
}

impl std::fmt::Debug for Tuple<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl<'a> Tuple<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        let count = r.i16("TupleData column count")?;
        let len = u16::try_from(count).map_err(|_| DecodeError::BadLength {
            what: "TupleData column count",
            len: i64::from(count),
        })?;
        let start = r.remaining();
        for _ in 0..len {
            match r.u8("TupleData column kind")? {
                b'n' | b'u' => {}
                b't' | b'b' => {
                    r.len_prefixed("TupleData column value")?;
                }
                byte => {
                    return Err(DecodeError::BadMarker {
                        what: "TupleData column kind",
                        byte,
                    });
                }
            }
        }
        let used = start.len() - r.remaining().len();
        Ok(Tuple {
            len,
            data: &start[..used],
        })
    }

    /// Number of columns in the image.
    pub fn len(&self) -> usize {
        usize::from(self.len)
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn iter(&self) -> TupleIter<'a> {
        TupleIter {
            left: self.len,
            data: self.data,
        }
    }

    /// The value at `index`, walking from the start (rows are short).
    pub fn get(&self, index: usize) -> Option<Value<'a>> {
        self.iter().nth(index)
    }
}

/// Iterates the values of a validated [`Tuple`].
pub struct TupleIter<'a> {
    left: u16,
    data: &'a [u8],
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = Value<'a>;

    fn next(&mut self) -> Option<Value<'a>> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let (&kind, rest) = self.data.split_first()?;
        let value = match kind {
            b'n' => {
                self.data = rest;
                return Some(Value::Null);
            }
            b'u' => {
                self.data = rest;
                return Some(Value::UnchangedToast);
            }
            _ => {
                // Validated on decode: a 4-byte length then that many bytes.
                let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
                let bytes = rest.get(4..4 + len)?;
                self.data = &rest[4 + len..];
                if kind == b't' {
                    Value::Text(bytes)
                } else {
                    Value::Binary(bytes)
                }
            }
        };
        Some(value)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (usize::from(self.left), Some(usize::from(self.left)))
    }
}
