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

use async_nats::jetstream;
use serde_json::{Value, json};

/// The consumer limit walcast sets on its streams when they have none:
/// room for the open dashboards of a large deployment and their reconnect
/// storms, yet still a bound on a runaway client.
pub const MAX_CONSUMERS: i32 = 100_000;

/// The JetStream API's error code for an invalid configuration: what a
/// server before 2.12 answers to a change of `max_consumers`.
const STREAM_INVALID_CONFIG: u64 = 10052;

/// [`ensure_consumer_limit`] for a stream whose configuration the caller
/// has just read: nothing to ask the server when it already has a limit.
pub async fn ensure_in(js: &jetstream::Context, config: &jetstream::stream::Config) {
    if config.max_consumers <= 0 {
        ensure_consumer_limit(js, &config.name).await;
    }
}

/// Sets [`MAX_CONSUMERS`] on stream `name` if it has no consumer limit.
///
/// The update sends back the configuration exactly as the server reported
/// it, with only `max_consumers` changed, so settings this client does not
/// model are kept. Never fails the caller: a server that cannot change the
/// limit (before 2.12) has no default cap either, and any other failure is
/// logged with its fix, to be tried again at the next start.
pub async fn ensure_consumer_limit(js: &jetstream::Context, name: &str) {
    let info = match api(js, &format!("STREAM.INFO.{name}"), &json!({})).await {
        Ok(info) => info,
        Err(e) => return not_set(name, &e.text),
    };
    let mut config = info["config"].clone();
    if config["max_consumers"].as_i64().is_some_and(|n| n > 0) {
        return;
    }
    config["max_consumers"] = json!(MAX_CONSUMERS);
    match api(js, &format!("STREAM.UPDATE.{name}"), &config).await {
        Ok(_) => tracing::info!(
            stream = name,
            max_consumers = MAX_CONSUMERS,
            "stream had no consumer limit (nats-server 2.15 would cap it at its default_max_consumers, 1,000); set one"
        ),
        Err(e) if e.code == Some(STREAM_INVALID_CONFIG) => tracing::debug!(
            stream = name,
            error = e.text,
            "this nats-server cannot change a stream's consumer limit; it has no default cap either"
        ),
        Err(e) => not_set(name, &e.text),
    }
}

/// A failed API request: the server's `err_code`, if it answered.
struct ApiError {
    code: Option<u64>,
    text: String,
}

/// One JetStream API request and its answer as the server wrote it.
async fn api(js: &jetstream::Context, subject: &str, body: &Value) -> Result<Value, ApiError> {
    let answer: Value = js
        .request(subject.to_string(), body)
        .await
        .map_err(|e| ApiError {
            code: None,
            text: e.to_string(),
        })?;
    match answer.get("error") {
        None => Ok(answer),
        Some(error) => Err(ApiError {
            code: error["err_code"].as_u64(),
            text: error["description"].as_str().unwrap_or("error").to_string(),
        }),
    }
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
