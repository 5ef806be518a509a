//! The NATS header names walcast writes and reads (SPEC §3, §8), spelled
//! once for the publisher, the oversized path, the state, catch-up and tail.

use std::borrow::Cow;

/// JetStream's deduplication id: the event's `event_id`.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// JetStream stores the message only if the stream ends at this sequence.
pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
/// JetStream stores the message only if the stream's last message has this
/// `Nats-Msg-Id` (a message without one clears it).
pub const EXPECTED_LAST_MSG_ID: &str = "Nats-Expected-Last-Msg-Id";
/// JetStream stores the message only if its subject's last message is at
/// this sequence (`0`: the subject has none).
pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
/// The event's tenant.
pub const TENANT: &str = "Walcast-Tenant";
/// The event's per-tenant `seq` (in the state: the row's latest event's).
pub const SEQ: &str = "Walcast-Seq";
/// Why an event is a dead letter, or was cut to its key fields.
pub const REASON: &str = "Walcast-Reason";
/// The commit LSN of the event's transaction, as a decimal number.
pub const LSN: &str = "Walcast-Lsn";
/// The claim check of SPEC §3: `<object bucket>/<event_id>`.
pub const OBJECT: &str = "Walcast-Object";
/// On a state write: every stream position up to it was applied to the
/// bucket when it was sent.
pub const STREAM_SEQ: &str = "Walcast-Stream-Seq";
pub const CONTENT_TYPE: &str = "Content-Type";
pub const PROTOBUF: &str = "application/x-protobuf";
/// NATS KV's operation header: `DEL` or `PURGE` on a delete marker, absent
/// on a value.
pub const KV_OPERATION: &str = "KV-Operation";

/// A message's headers, in the order they go on the wire: few, with names
/// from this module, kept as borrowed text and numbers until the message
/// is written as one header block ([`Headers::block`]), which the vendored
/// async-nats sends as it is (`publish_with_raw_headers`). An
/// `async_nats::HeaderMap` per message — a hash map, a `String` and a
/// `Vec` per header, serialized again by the client — was ~30 % of
/// walcast's CPU per published event.
#[derive(Debug, Clone, Default)]
pub struct Headers<'a> {
    lines: Vec<(&'static str, Value<'a>)>,
}

/// A header's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value<'a> {
    Text(Cow<'a, str>),
    /// Written in decimal.
    Number(u64),
}

impl<'a> From<&'a str> for Value<'a> {
    fn from(s: &'a str) -> Self {
        Value::Text(Cow::Borrowed(s))
    }
}

impl From<String> for Value<'_> {
    fn from(s: String) -> Self {
        Value::Text(Cow::Owned(s))
    }
}

impl From<u64> for Value<'_> {
    fn from(n: u64) -> Self {
        Value::Number(n)
    }
}

impl std::fmt::Display for Value<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Text(s) => f.write_str(s),
            Value::Number(n) => write!(f, "{n}"),
        }
    }
}

impl<'a> Headers<'a> {
    pub fn new() -> Self {
        Headers {
            lines: Vec::with_capacity(8),
        }
    }

    /// Sets `name` (one of this module's constants) to `value`, in place if
    /// it is already there.
    pub fn insert(&mut self, name: &'static str, value: impl Into<Value<'a>>) {
        debug_assert!(name.bytes().all(|b| b.is_ascii_graphic() && b != b':'));
        let value = value.into();
        match self.lines.iter_mut().find(|(n, _)| *n == name) {
            Some(line) => line.1 = value,
            None => self.lines.push((name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Value<'a>> {
        self.lines.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// The value of `name` if it is text.
    pub fn text(&self, name: &str) -> Option<&str> {
        match self.get(name)? {
            Value::Text(s) => Some(s),
            Value::Number(_) => None,
        }
    }

    /// The value of `name` if it is a number.
    pub fn number(&self, name: &str) -> Option<u64> {
        match self.get(name)? {
            Value::Number(n) => Some(*n),
            Value::Text(_) => None,
        }
    }

    /// The bytes [`Headers::block`] takes, counted without writing it.
    pub fn wire_len(&self) -> usize {
        let lines: usize = self
            .lines
            .iter()
            .map(|(name, value)| {
                let len = match value {
                    Value::Text(s) => s.len(),
                    Value::Number(n) => decimal_len(*n),
                };
                name.len() + 2 + len + 2
            })
            .sum();
        VERSION_LINE.len() + lines + 2
    }

    /// The header block as NATS sends it: `NATS/1.0\r\n`, `Name: value\r\n`
    /// per header, `\r\n`. A CR or LF in a value would end the header early
    /// and let the rest be read as another header, so each becomes a space.
    pub fn block(&self) -> bytes::Bytes {
        let mut buf = Vec::with_capacity(self.wire_len());
        buf.extend_from_slice(VERSION_LINE);
        for (name, value) in &self.lines {
            buf.extend_from_slice(name.as_bytes());
            buf.extend_from_slice(b": ");
            match value {
                Value::Text(s) => put_text(&mut buf, s.as_bytes()),
                Value::Number(n) => {
                    buf.extend_from_slice(itoa::Buffer::new().format(*n).as_bytes())
                }
            }
            buf.extend_from_slice(b"\r\n");
        }
        buf.extend_from_slice(b"\r\n");
        bytes::Bytes::from(buf)
    }
}

fn put_text(buf: &mut Vec<u8>, value: &[u8]) {
    if value.iter().any(|&b| b == b'\r' || b == b'\n') {
        buf.extend(value.iter().map(|&b| match b {
            b'\r' | b'\n' => b' ',
            b => b,
        }));
    } else {
        buf.extend_from_slice(value);
    }
}

const VERSION_LINE: &[u8] = b"NATS/1.0\r\n";

/// How many digits `n` has in decimal.
const fn decimal_len(n: u64) -> usize {
    match n.checked_ilog10() {
        Some(log) => log as usize + 1,
        None => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_the_wire_form_of_its_headers_without_line_breaks() {
        let mut headers = Headers::new();
        headers.insert(MSG_ID, "0000000001000000-00000002");
        headers.insert(SEQ, 41);
        headers.insert(REASON, "bad\r\nInjected: yes");
        headers.insert(SEQ, 42);
        let block = headers.block();
        assert_eq!(
            std::str::from_utf8(&block).unwrap(),
            "NATS/1.0\r\nNats-Msg-Id: 0000000001000000-00000002\r\nWalcast-Seq: 42\r\nWalcast-Reason: bad  Injected: yes\r\n\r\n"
        );
        assert_eq!(headers.wire_len(), block.len());
        assert_eq!(headers.number(SEQ), Some(42));
        assert_eq!(headers.text(MSG_ID), Some("0000000001000000-00000002"));
        assert_eq!(Headers::new().wire_len(), Headers::new().block().len());
    }

    #[test]
    fn decimal_len_counts_digits() {
        for n in [0, 9, 10, 99, 100, 12345, u64::MAX] {
            assert_eq!(decimal_len(n), n.to_string().len(), "{n}");
        }
    }
}
