//! Client settings, each with the default a production gateway wants.
//!
//! The names that must match the daemon (`prefix`, `stream`) default to
//! walcast's own defaults (`--subject-prefix walcast`, `--stream WALCAST`);
//! the timings decide how fast a subscription notices and repairs trouble.

use std::time::Duration;

/// How a [`Client`](crate::Client) finds walcast and how its subscriptions
/// recover. Build it with `Options::default()` and override fields:
///
/// ```
/// let options = walcast_client::Options {
///     prefix: "myapp".into(),
///     ..Default::default()
/// };
/// assert_eq!(options.stream, "WALCAST");
/// ```
#[derive(Debug, Clone)]
pub struct Options {
    /// walcast's subject prefix (`--subject-prefix`). Events are on
    /// `<prefix>.<tenant>.<entity>.<action>` and the catch-up service answers
    /// on `<prefix>-api.v1.catchup.<tenant>`. Default `walcast`.
    pub prefix: String,
    /// walcast's JetStream stream (`--stream`). Only needed when the catch-up
    /// service cannot be asked (fallback, all-tenant subscriptions); a
    /// catch-up answer names the stream itself. Default `WALCAST`.
    pub stream: String,
    /// How long one catch-up request may take before it counts as
    /// unavailable and is retried. Default 2 s.
    pub request_timeout: Duration,
    /// Waits between retries of anything transient (catch-up unavailable,
    /// consumer errors, reconnects). Default 100 ms doubling to 5 s, jittered.
    pub backoff: Backoff,
    /// When the catch-up service has been unavailable (walcast down) this
    /// long, a subscription stops waiting for it and reads the stream
    /// directly: from just after the last event it delivered, or, if it has
    /// delivered none yet, from the stream's first message, skipping events
    /// at or below its position. A gap seen while reading this way is never
    /// delivered across: the subscription goes back to waiting for the
    /// catch-up service. Default 5 s; `Duration::MAX` disables the fallback.
    pub fallback_after: Duration,
    /// A single-tenant subscription that received nothing for this long asks
    /// the catch-up service for the tenant's last `seq`, so an event missed
    /// at the very end of the stream (no later event reveals the gap) is
    /// still repaired. Default 30 s.
    pub idle_check: Duration,
    /// An `after_seq` beyond the tenant's last published `seq` (catch-up
    /// answer `ahead`) is retried this long before the subscription fails
    /// with [`Error::Ahead`](crate::Error::Ahead): right after a restart
    /// walcast may briefly not know the newest seqs it published. Default 30 s.
    pub ahead_timeout: Duration,
    /// How many recent `event_id`s are remembered to drop duplicates by id
    /// (besides by `seq`). Default 10,000.
    pub dedup_window: usize,
    /// Updates buffered between the background task and the application;
    /// when full, reading from NATS pauses (backpressure). Default 256.
    pub buffer: usize,
    /// walcast's state bucket (`--state-bucket`), read by
    /// [`Client::load_and_follow`](crate::Client::load_and_follow).
    /// Default `None`: `<stream>_STATE`, i.e. `WALCAST_STATE`.
    pub state_bucket: Option<String>,
    /// How long a load waits for the state to be ready (walcast's backfill
    /// marker `complete`: a first start or a purged bucket is being
    /// filled) before it fails with
    /// [`Error::StateNotReady`](crate::Error::StateNotReady). Default 30 s.
    pub state_ready_timeout: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            prefix: "walcast".into(),
            stream: "WALCAST".into(),
            request_timeout: Duration::from_secs(2),
            backoff: Backoff::default(),
            fallback_after: Duration::from_secs(5),
            idle_check: Duration::from_secs(30),
            ahead_timeout: Duration::from_secs(30),
            dedup_window: 10_000,
            buffer: 256,
            state_bucket: None,
            state_ready_timeout: Duration::from_secs(30),
        }
    }
}

impl Options {
    /// The catch-up service's tenant-scoped request subject (SPEC §7), the
    /// one a tenant user of walcast's auth callout may request (§9).
    pub(crate) fn catchup_subject(&self, tenant: &str) -> String {
        format!("{}-api.v1.catchup.{tenant}", self.prefix)
    }

    /// The state bucket's name: the one set, else `<stream>_STATE`.
    pub(crate) fn state_bucket(&self) -> String {
        self.state_bucket
            .clone()
            .unwrap_or_else(|| format!("{}_STATE", self.stream))
    }
}

/// Capped exponential backoff with jitter: the n-th wait is drawn from
/// `[d/2, d]` with `d = min(max, initial * 2^n)`, so many clients that lost
/// the same server do not come back in lockstep, yet each waits at least half
/// the nominal delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The first nominal delay. Default 100 ms.
    pub initial: Duration,
    /// The cap on the nominal delay. Default 5 s.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

impl Backoff {
    /// The nominal (un-jittered) delay before retry number `attempt` (0-based).
    pub(crate) fn nominal(&self, attempt: u32) -> Duration {
        let factor = 1u32.checked_shl(attempt.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The jittered delay before retry number `attempt`: uniform in `[d/2, d]`.
    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        use rand::Rng;
        let d = self.nominal(attempt);
        let half = d / 2;
        half + (d - half).mul_f64(rand::rng().random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn nominal_doubles_up_to_the_cap() {
        let b = Backoff::default();
        let got: Vec<u64> = (0..8).map(|a| b.nominal(a).as_millis() as u64).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1600, 3200, 5000, 5000]);
        assert_eq!(b.nominal(u32::MAX), Duration::from_secs(5));
    }

    proptest! {
        #[test]
        fn jitter_stays_within_half_and_full(attempt in 0u32..64, initial in 1u64..10_000, max in 1u64..100_000) {
            let b = Backoff { initial: Duration::from_millis(initial), max: Duration::from_millis(max) };
            let d = b.nominal(attempt);
            let j = b.delay(attempt);
            prop_assert!(j >= d / 2 && j <= d, "{j:?} not in [{:?}, {d:?}]", d / 2);
        }
    }
}
