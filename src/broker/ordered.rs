//! walcast's own reads of a stream (the state projection behind the feed,
//! `walcast tail --follow`, an oversized value's chunks) go through
//! async-nats' ordered pull consumer, with heartbeats short enough that an
//! idle reader notices a consumer lost with its cluster node in ~10 s.
//!
//! On a NATS cluster an ordered consumer (R1, memory) lives on one node,
//! often not the reader's. When that node dies and the reader's own
//! connection stays up, no error comes. A reader that pulls finds no
//! responder at its next pull and replaces the consumer at once (see
//! vendor/README.md, "an ordered consumer lost with its cluster node"); an
//! idle one has only the heartbeats. async-nats pulls with a 30 s expiry
//! and 15 s heartbeats and replaces the consumer after two missed
//! heartbeat timers (2 × 2 × the heartbeat, up to a minute). It asks for
//! heartbeats at half the pull's expiry, which it caps at the consumer's
//! `max_expires`, so a lower `max_expires` is the one setting that
//! shortens it.

use std::time::Duration;

use async_nats::jetstream::consumer::pull::OrderedConfig;

/// The longest a pull request of walcast's ordered consumers waits at the
/// server: heartbeats every 2.5 s, an idle reader's lost consumer
/// replaced after ~10 s.
/// An idle reader sends a pull request this often (a few bytes).
pub const PULL_EXPIRY: Duration = Duration::from_secs(5);

/// `config` with the pull expiry that makes the heartbeats short.
pub fn with_short_heartbeats(config: OrderedConfig) -> OrderedConfig {
    OrderedConfig {
        max_expires: PULL_EXPIRY,
        ..config
    }
}
