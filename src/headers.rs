//! The NATS header names walcast writes and reads (SPEC §3, §8), spelled
//! once for the publisher, the oversized path, the state, catch-up and tail.

/// JetStream's deduplication id: the event's `event_id`.
pub const MSG_ID: &str = "Nats-Msg-Id";
/// JetStream stores the message only if the stream ends at this sequence.
pub const EXPECTED_LAST_SEQUENCE: &str = "Nats-Expected-Last-Sequence";
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

/// A number as a header value, without `fmt` (~2 % of walcast's CPU per
/// published event went to formatting three of them).
pub fn decimal(n: u64) -> String {
    itoa::Buffer::new().format(n).to_owned()
}
