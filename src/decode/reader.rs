//! A bounds-checked cursor over one pgoutput message. Every read returns a
//! typed error instead of panicking, and nothing is allocated from a length
//! field: variable-length data is borrowed from the input.

use super::DecodeError;

/// Reads big-endian integers, C strings and length-prefixed bytes from a slice.
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    pub(crate) fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let rest = self.remaining();
        if rest.len() < n {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
            });
        }
        self.pos += n;
        Ok(&rest[..n])
    }

    pub(crate) fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.take(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    pub(crate) fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub(crate) fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        Ok(self.u32(what)? as i32)
    }

    pub(crate) fn u64(&mut self, what: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, what)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    pub(crate) fn i64(&mut self, what: &'static str) -> Result<i64, DecodeError> {
        Ok(self.u64(what)? as i64)
    }

    /// A NUL-terminated string; Postgres sends identifiers in the server
    /// encoding, which walcast requires to be UTF-8.
    pub(crate) fn cstr(&mut self, what: &'static str) -> Result<&'a str, DecodeError> {
        let rest = self.remaining();
        let Some(end) = rest.iter().position(|&b| b == 0) else {
            return Err(DecodeError::Truncated {
                what,
                offset: self.pos,
            });
        };
        let text = std::str::from_utf8(&rest[..end]).map_err(|_| DecodeError::NotUtf8 { what })?;
        self.pos += end + 1;
        Ok(text)
    }

    /// A non-negative `i32` length followed by that many bytes.
    pub(crate) fn len_prefixed(&mut self, what: &'static str) -> Result<&'a [u8], DecodeError> {
        let len = self.i32(what)?;
        let len = usize::try_from(len).map_err(|_| DecodeError::BadLength {
            what,
            len: i64::from(len),
        })?;
        self.take(len, what)
    }

    pub(crate) fn finish(&self, what: &'static str) -> Result<(), DecodeError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(DecodeError::TrailingBytes {
                what,
                extra: self.buf.len() - self.pos,
            })
        }
    }
}
