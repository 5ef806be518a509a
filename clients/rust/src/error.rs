//! What can go wrong, split by what the application should do about it.
//!
//! Transient trouble (walcast restarting, NATS reconnecting, a consumer
//! dying) never reaches the application: subscriptions retry it with backoff
//! and log it with `tracing`. What is left here is *definite*: retrying the
//! same thing would fail the same way. A subscription that yields an `Err`
//! ends right after it, so an application never reads past a problem.

/// A definite failure of the client or of a subscription.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Could not connect to NATS (only from [`Client::connect`](crate::Client::connect)).
    #[error("connect to NATS: {0}")]
    Connect(#[from] async_nats::ConnectError),
    /// The tenant id can never reach a walcast subject (SPEC §3: it must
    /// match `[A-Za-z0-9_-]{1,128}`), so nothing would ever be delivered.
    #[error("invalid tenant id {tenant_id:?}: must match [A-Za-z0-9_-]{{1,128}}")]
    InvalidTenant {
        /// The rejected id.
        tenant_id: String,
    },
    /// The catch-up service rejected the request (`bad_request`): a client
    /// and daemon that disagree on the protocol.
    #[error("catch-up service rejected the request: {message}")]
    BadRequest {
        /// The service's explanation.
        message: String,
    },
    /// `after_seq` is beyond the tenant's last published `seq` and stayed so
    /// for [`Options::ahead_timeout`](crate::Options::ahead_timeout): the
    /// application's position does not come from this stream (e.g. the
    /// stream was re-created and seqs restarted). Re-sync from the database
    /// and subscribe again from the stream's position.
    #[error(
        "tenant {tenant_id}: after_seq {after_seq} is ahead of the last published seq {last_seq}"
    )]
    Ahead {
        /// The tenant.
        tenant_id: String,
        /// The position the subscription asked for.
        after_seq: u64,
        /// The tenant's last published seq, per walcast.
        last_seq: u64,
    },
    /// A message or reply that is not what walcast sends (missing header,
    /// undecodable body, a reply without the documented fields). Delivering
    /// past it could hide a gap, so the subscription stops.
    #[error("malformed {what}: {reason}")]
    Malformed {
        /// Which message (e.g. `stream message 42`, `catch-up reply`).
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An oversized event's full body is gone from the object store (it
    /// expired before it was read); its `seq` cannot be delivered.
    #[error("oversized event {object} is no longer in the object store")]
    ObjectMissing {
        /// The `Walcast-Object` header: `<bucket>/<event_id>`.
        object: String,
    },
    /// The state bucket was not ready within
    /// [`Options::state_ready_timeout`](crate::Options::state_ready_timeout):
    /// its readiness marker (`_walcast.backfill`) never said `complete`.
    /// walcast is still copying the tables (first start, purged bucket), is
    /// not running, or runs with the state turned off. A snapshot is never
    /// given before it is complete, since it would miss pre-existing rows.
    #[error(
        "state bucket {bucket} not ready for tenant {tenant_id} (backfill marker: {})",
        state.as_deref().unwrap_or("absent")
    )]
    StateNotReady {
        /// The bucket that was read.
        bucket: String,
        /// The tenant being loaded.
        tenant_id: String,
        /// The marker's last `state` seen (`running`, `requested`), `None`
        /// when there was no marker (or no bucket).
        state: Option<String>,
    },
}
