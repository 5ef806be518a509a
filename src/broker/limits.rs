//! How many consumers the streams walcast owns accept: the event stream,
//! the state bucket's `KV_…` stream and the two object stores' `OBJ_…`.
//!
//! Every client that follows a tenant holds an ordered consumer on the
//! stream (SPEC §7), a state load holds one on the bucket (SPEC §8), and
//! reading an oversized event or value holds one on an object store. A
//! client that goes away without deleting its consumer (a closed browser
//! tab, a reconnect) leaves it behind until the server drops it as inactive:
//! 5 minutes for the TypeScript client's.
//!
//! nats-server 2.15 caps every stream that sets no limit of its own at
//! `default_max_consumers` (1,000 unless configured): beyond that, new
//! dashboards fail with "maximum consumers limit reached". Older servers
//! treat "no limit" as unlimited. So walcast gives its streams an explicit
//! limit, [`MAX_CONSUMERS`], when they have none; a limit an operator set
//! (`nats stream edit <stream> --max-consumers N`) is kept.

use async_nats::jetstream::{self, ErrorCode};

/// The consumer limit walcast sets on its streams when they have none:
/// room for the open dashboards of a large deployment and their reconnect
/// storms, yet still a bound on a runaway client.
pub const MAX_CONSUMERS: i32 = 100_000;

/// Sets [`MAX_CONSUMERS`] on stream `name` if it has no consumer limit
/// (see [`ensure_in`]).
pub async fn ensure_consumer_limit(js: &jetstream::Context, name: &str) {
    match js.get_stream(name).await {
        Ok(mut stream) => match stream.info().await {
            Ok(info) => ensure_in(js, &info.config).await,
            Err(e) => not_set(name, &e.to_string()),
        },
        Err(e) => not_set(name, &e.to_string()),
    }
}

/// Sets [`MAX_CONSUMERS`] on the stream whose current configuration is
/// `config` if it has no consumer limit. Never fails the caller: a server
/// that cannot change the limit (before 2.12) has no default cap either,
/// and any other failure is logged with its fix, to be tried again at the
/// next start.
pub async fn ensure_in(js: &jetstream::Context, config: &jetstream::stream::Config) {
    let name = config.name.as_str();
    if config.max_consumers > 0 {
        return;
    }
    let config = jetstream::stream::Config {
        max_consumers: MAX_CONSUMERS,
        ..config.clone()
    };
    match js.update_stream(&config).await {
        Ok(_) => tracing::info!(
            stream = name,
            max_consumers = MAX_CONSUMERS,
            "stream had no consumer limit (nats-server 2.15 would cap it at its default_max_consumers, 1,000); set one"
        ),
        Err(e) if unchangeable(&e) => tracing::debug!(
            stream = name,
            "this nats-server cannot change a stream's consumer limit; it has no default cap either"
        ),
        Err(e) => not_set(name, &e.to_string()),
    }
}

/// A server before 2.12 refuses to change `max_consumers` with a generic
/// invalid-configuration error.
fn unchangeable(e: &jetstream::context::UpdateStreamError) -> bool {
    use jetstream::context::CreateStreamErrorKind;
    matches!(e.kind(), CreateStreamErrorKind::JetStream(api)
        if api.error_code() == ErrorCode::STREAM_INVALID_CONFIG)
}

fn not_set(name: &str, error: &str) {
    tracing::warn!(
        stream = name,
        error,
        "could not give the stream a consumer limit; on nats-server 2.15 it accepts only default_max_consumers (1,000) \
         consumers, so clients beyond that fail: run `nats stream edit {name} --max-consumers {MAX_CONSUMERS}` \
         (walcast tries again at its next start)"
    );
}
