//! The JetStream stream (SPEC §3): created when missing, refused when an
//! existing one would break walcast's guarantees; and looked up in a way
//! that waits out a stream leader election ([`lookup`]).
//!
//! On a cluster, only a replicated stream's leader answers its stream info
//! and stores its messages. When the leader dies, the survivors elect a new
//! one, which takes nats-server's Raft election timeout (randomized, 4–9 s).
//! Meanwhile publishes find no responders and stream info requests go
//! unanswered: one request would wait for the client's whole request timeout
//! (10 s), longer than the election itself. [`lookup`] asks again every
//! [`ASK_EVERY`] (the requests overlap, so a slow server still answers the
//! first one) and returns the first answer from a leader.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use futures::stream::FuturesUnordered;

use super::PublishError;
use crate::config::Settings;

/// Creates or verifies the stream, returning its handle.
pub async fn ensure(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<stream::Stream, PublishError> {
    if let Some(existing) = verify_existing(js, settings).await? {
        crate::broker::limits::ensure_in(js, &existing.cached_info().config).await;
        return Ok(existing);
    }
    let config = stream::Config {
        name: settings.stream.clone(),
        subjects: vec![format!("{}.>", settings.subject_prefix)],
        storage: stream::StorageType::File,
        retention: stream::RetentionPolicy::Limits,
        discard: stream::DiscardPolicy::Old,
        num_replicas: settings.stream_replicas,
        max_age: settings.stream_max_age,
        max_bytes: settings.stream_max_bytes,
        duplicate_window: settings.duplicate_window.max(Duration::from_millis(100)),
        allow_direct: true,
        max_consumers: crate::broker::limits::MAX_CONSUMERS,
        ..Default::default()
    };
    js.create_stream(config)
        .await
        .map_err(|e| classify_create_error(e, settings))
}

/// Why JetStream cannot serve walcast at all, if that is what `error` says:
/// nothing answers the JetStream API (a server started without `-js`: the
/// client reports "no responders", which async-nats words as "requested
/// JetStream resource does not exist"), or the server says JetStream is not
/// enabled (for the account). `None` for every other failure.
fn no_jetstream(
    request: Option<&(dyn std::error::Error + 'static)>,
    api: Option<&jetstream::Error>,
    settings: &Settings,
) -> Option<PublishError> {
    use async_nats::jetstream::context::{RequestError, RequestErrorKind};
    if let Some(api) = api {
        let code = api.error_code();
        if code == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED
            || code == jetstream::ErrorCode::JETSTREAM_NOT_ENABLED_FOR_ACCOUNT
        {
            return Some(not_enabled(settings, &api.to_string()));
        }
    }
    let request = request?.downcast_ref::<RequestError>()?;
    (request.kind() == RequestErrorKind::NoResponders).then(|| not_enabled(settings, NO_RESPONDERS))
}

const NO_RESPONDERS: &str = "nothing answers its JetStream API";

fn not_enabled(settings: &Settings, why: &str) -> PublishError {
    PublishError::NoJetStream(format!(
        "not enabled on the server at {}: {why}",
        crate::secrets::redact_url(&settings.nats_url)
    ))
}

fn classify_get_error(e: jetstream::context::GetStreamError, settings: &Settings) -> PublishError {
    use jetstream::context::GetStreamErrorKind;
    let api = match e.kind() {
        GetStreamErrorKind::JetStream(api) => Some(api),
        _ => None,
    };
    if let Some(no_js) = no_jetstream(std::error::Error::source(&e), api.as_ref(), settings) {
        return no_js;
    }
    PublishError::Nats(format!("look up stream {}: {e}", settings.stream))
}

fn classify_create_error(
    e: jetstream::context::CreateStreamError,
    settings: &Settings,
) -> PublishError {
    use jetstream::context::CreateStreamErrorKind;
    let api = match e.kind() {
        CreateStreamErrorKind::JetStream(api) => Some(api),
        _ => None,
    };
    if e.kind() == CreateStreamErrorKind::JetStreamUnavailable {
        return not_enabled(settings, NO_RESPONDERS);
    }
    if let Some(no_js) = no_jetstream(None, api.as_ref(), settings) {
        return no_js;
    }
    PublishError::Nats(format!("create stream {}: {e}", settings.stream))
}

fn verify(
    config: &stream::Config,
    name: &str,
    subjects: &str,
    max_payload: usize,
) -> Result<(), PublishError> {
    match why_incompatible(config, name, subjects, max_payload) {
        Some(why) => Err(PublishError::Incompatible(format!("stream {name} {why}"))),
        None => Ok(()),
    }
}

/// What in an existing stream's configuration would break walcast's
/// guarantees (SPEC §3, §4), and how to fix it; `None` if nothing does.
/// Limits an operator chose (replicas, max age, max bytes) are not among
/// them: [`warn_of_drift`] only reports those.
fn why_incompatible(
    config: &stream::Config,
    name: &str,
    subjects: &str,
    max_payload: usize,
) -> Option<String> {
    let recreate = "recreate the stream or pick another --stream";
    if !config.subjects.iter().any(|s| s == subjects || s == ">") {
        return Some(format!(
            "has subjects {:?} but walcast publishes to {subjects}; add it (nats stream edit {name} --subjects '{subjects}') or pick another --stream",
            config.subjects
        ));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return Some(format!(
            "uses {:?} retention, which deletes events once consumed; walcast needs limits retention ({recreate})",
            config.retention
        ));
    }
    if config.discard == stream::DiscardPolicy::New
        && (config.max_bytes > 0 || config.max_messages > 0)
    {
        return Some(
            "uses discard=new with limits, which rejects publishes when full and would stall replication; use discard=old".into(),
        );
    }
    if config.storage != stream::StorageType::File {
        return Some(format!(
            "keeps its messages in memory: a nats-server restart loses every event, more than walcast can publish again from its slot; walcast needs file storage ({recreate})"
        ));
    }
    if config.max_messages_per_subject > 0 {
        return Some(format!(
            "keeps at most {} messages per subject, which deletes a tenant's older events of the same kind and leaves gaps in its seq; remove the limit (nats stream edit {name} --max-msgs-per-subject=-1)",
            config.max_messages_per_subject
        ));
    }
    if config.max_message_size > 0 && (config.max_message_size as usize) < max_payload {
        return Some(format!(
            "refuses messages over {} bytes, but walcast sends events up to the server's max_payload ({max_payload} bytes) and would retry a larger one for ever; remove the limit (nats stream edit {name} --max-msg-size=-1)",
            config.max_message_size
        ));
    }
    if config.no_ack {
        return Some(format!(
            "does not acknowledge publishes (no_ack), and walcast moves its checkpoint only on acknowledgements; {recreate}"
        ));
    }
    if config.sealed {
        return Some(format!("is sealed and takes no more messages; {recreate}"));
    }
    if config.mirror.is_some() {
        return Some(format!("is a mirror and takes no publishes; {recreate}"));
    }
    if config.subject_transform.is_some() {
        return Some(format!(
            "rewrites the subjects it stores (subject_transform), but consumers read events on walcast's subjects; {recreate}"
        ));
    }
    None
}

/// Logs a WARN for each limit of an existing stream that differs from
/// walcast's settings: walcast never changes them on an existing stream
/// (shortening the max age would delete events at once), so the operator
/// decides, with the command given.
fn warn_of_drift(config: &stream::Config, settings: &Settings) {
    let name = &settings.stream;
    let drift = |what: &str, has: String, wanted: String, edit: String| {
        if has != wanted {
            tracing::warn!(
                stream = %name,
                "stream {name} has {what} {has} but walcast is configured with {wanted}; walcast does not change an existing stream's limits: apply yours with `nats stream edit {name} {edit}`, or configure what the stream has"
            );
        }
    };
    drift(
        "replicas",
        config.num_replicas.to_string(),
        settings.stream_replicas.to_string(),
        format!("--replicas {}", settings.stream_replicas),
    );
    drift(
        "max age",
        format!("{:?}", config.max_age),
        format!("{:?}", settings.stream_max_age),
        format!("--max-age {}s", settings.stream_max_age.as_secs()),
    );
    drift(
        "max bytes",
        config.max_bytes.to_string(),
        settings.stream_max_bytes.to_string(),
        format!("--max-bytes {}", settings.stream_max_bytes),
    );
}

/// Checks an existing stream without creating one: `Ok(None)` if missing.
pub async fn verify_existing(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<stream::Stream>, PublishError> {
    match lookup(js, &settings.stream, ELECTION_WAIT).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| PublishError::Nats(format!("read stream info: {e}")))?;
            verify(
                &info.config,
                &settings.stream,
                &format!("{}.>", settings.subject_prefix),
                js.client().server_info().max_payload,
            )?;
            warn_of_drift(&info.config, settings);
            Ok(Some(existing))
        }
        Err(e) if not_found(&e) => Ok(None),
        Err(e) => Err(classify_get_error(e, settings)),
    }
}

/// How long a lookup waits for a stream that has no leader: longer than a
/// Raft election (at most ~9 s on nats-server).
pub const ELECTION_WAIT: Duration = Duration::from_secs(15);

/// How often a lookup asks again while unanswered or answered without a
/// leader.
const ASK_EVERY: Duration = Duration::from_millis(250);

/// How long one of a lookup's requests waits for its answer. A server
/// drops a request it gets while the stream has no leader: it is never
/// answered, and must not hold a place among the outstanding ones.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);

/// At most this many stream info requests are outstanding in a lookup
/// (ASK_TIMEOUT / ASK_EVERY, and some).
const MAX_ASKS: usize = 24;

/// Whether stream info came from a leader: a replica answers during an
/// election with no (or an empty) leader. A stream that is not replicated
/// across a cluster may carry no cluster info at all.
pub fn has_leader(info: &stream::Info) -> bool {
    info.cluster
        .as_ref()
        .is_none_or(|c| c.leader.as_deref().is_some_and(|l| !l.is_empty()))
}

/// The stream, looked up while waiting out a leader election for at most
/// `wait`: returns the first answer from a leader, or any error answer at
/// once (not found, no JetStream), or after `wait` the last thing heard (a
/// leaderless answer or the request timeout). Logs a WARN when it has to
/// wait, saying a stream leader change is probably under way.
pub async fn lookup(
    js: &jetstream::Context,
    name: &str,
    wait: Duration,
) -> Result<stream::Stream, jetstream::context::GetStreamError> {
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + wait;
    let mut asks = FuturesUnordered::<
        futures::future::BoxFuture<'_, Result<stream::Stream, jetstream::context::GetStreamError>>,
    >::new();
    let mut tick = tokio::time::interval(ASK_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = None;
    let mut waiting: Option<Waiting> = None;
    let mut past_deadline = false;
    loop {
        tokio::select! {
            biased;
            Some(answer) = asks.next() => match answer {
                Ok(found) if has_leader(found.cached_info()) => {
                    if waiting.as_ref().is_some_and(|w| w.said) {
                        tracing::info!(
                            stream = name,
                            leader = found.cached_info().cluster.as_ref().and_then(|c| c.leader.as_deref()).unwrap_or_default(),
                            waited = ?started.elapsed(),
                            "stream has a leader again"
                        );
                    }
                    return Ok(found);
                }
                Ok(leaderless) => last = Some(Ok(leaderless)),
                Err(e) if timed_out(&e) => last = Some(Err(e)),
                Err(e) => return Err(e),
            },
            _ = tick.tick(), if !past_deadline && asks.len() < MAX_ASKS => {
                // Not answered by a leader within ASK_EVERY: say why we wait.
                if (last.is_some() || !asks.is_empty()) && waiting.is_none() {
                    waiting = Some(Waiting::start(name, wait));
                }
                asks.push(Box::pin(async move {
                    tokio::time::timeout(ASK_TIMEOUT, js.get_stream(name))
                        .await
                        .unwrap_or_else(|_| Err(unanswered()))
                }));
            }
            _ = tokio::time::sleep_until(deadline), if !past_deadline => past_deadline = true,
        }
        if past_deadline && let Some(last) = last.take() {
            return last;
        }
    }
}

/// Lookups of this process waiting for a stream leader. The publisher and
/// the pipeline's reconnect check may wait for the same election: only the
/// first says so.
static WAITING: AtomicUsize = AtomicUsize::new(0);

/// One lookup waiting for a leader (counted in [`WAITING`] while it lives).
struct Waiting {
    /// Whether this one logged the WARN (and so logs the outcome).
    said: bool,
}

impl Waiting {
    fn start(name: &str, wait: Duration) -> Waiting {
        let said = WAITING.fetch_add(1, Ordering::SeqCst) == 0;
        if said {
            tracing::warn!(
                stream = name,
                wait = ?wait,
                "stream has no leader: a stream leader change is probably under way; waiting for the election"
            );
        }
        Waiting { said }
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        WAITING.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Whether JetStream says the stream does not exist.
pub fn not_found(e: &jetstream::context::GetStreamError) -> bool {
    matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
        if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND)
}

/// A stream info request that got no answer within [`ASK_TIMEOUT`].
fn unanswered() -> jetstream::context::GetStreamError {
    use jetstream::context::{GetStreamError, GetStreamErrorKind, RequestError, RequestErrorKind};
    GetStreamError::with_source(
        GetStreamErrorKind::Request,
        RequestError::with_source(RequestErrorKind::TimedOut, "no answer within 5s"),
    )
}

/// Whether a stream info request went unanswered.
fn timed_out(e: &jetstream::context::GetStreamError) -> bool {
    use jetstream::context::{RequestError, RequestErrorKind};
    std::error::Error::source(e)
        .and_then(|s| s.downcast_ref::<RequestError>())
        .is_some_and(|r| r.kind() == RequestErrorKind::TimedOut)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUBJECTS: &str = "walcast.>";
    const MAX_PAYLOAD: usize = 1024 * 1024;

    /// A stream as `walcast run` creates it.
    fn created() -> stream::Config {
        stream::Config {
            name: "WALCAST".into(),
            subjects: vec![SUBJECTS.into()],
            storage: stream::StorageType::File,
            max_messages_per_subject: -1,
            max_message_size: -1,
            ..Default::default()
        }
    }

    fn why(change: impl FnOnce(&mut stream::Config)) -> Option<String> {
        let mut config = created();
        change(&mut config);
        why_incompatible(&config, "WALCAST", SUBJECTS, MAX_PAYLOAD)
    }

    #[test]
    fn walcasts_own_stream_and_operator_limits_are_compatible() {
        assert_eq!(why(|_| {}), None);
        assert_eq!(
            why(|c| {
                c.subjects = vec![">".into()];
                c.max_age = Duration::from_secs(3600);
                c.max_bytes = 1 << 30;
                c.num_replicas = 3;
                c.max_message_size = MAX_PAYLOAD as i32;
            }),
            None
        );
    }

    #[test]
    fn what_breaks_a_guarantee_is_refused_with_its_fix() {
        type Change = fn(&mut stream::Config);
        let cases: [(&str, Change); 10] = [
            ("other.>", |c| c.subjects = vec!["other.>".into()]),
            ("limits retention", |c| {
                c.retention = stream::RetentionPolicy::WorkQueue
            }),
            ("discard=old", |c| {
                c.discard = stream::DiscardPolicy::New;
                c.max_bytes = 1 << 20;
            }),
            ("file storage", |c| c.storage = stream::StorageType::Memory),
            ("--max-msgs-per-subject=-1", |c| {
                c.max_messages_per_subject = 10
            }),
            ("--max-msg-size=-1", |c| c.max_message_size = 65536),
            ("no_ack", |c| c.no_ack = true),
            ("sealed", |c| c.sealed = true),
            ("mirror", |c| {
                c.mirror = Some(stream::Source {
                    name: "ELSEWHERE".into(),
                    ..Default::default()
                })
            }),
            ("subject_transform", |c| {
                c.subject_transform = Some(stream::SubjectTransform {
                    source: "walcast.>".into(),
                    destination: "moved.>".into(),
                })
            }),
        ];
        for (says, change) in cases {
            let why = why(change).unwrap_or_else(|| panic!("accepted: {says}"));
            assert!(why.contains(says), "{says}: {why}");
        }
    }
}
