//! The JetStream stream (SPEC §3): created when missing, refused when an
//! existing one would break walcast's guarantees.

use std::time::Duration;

use async_nats::jetstream::{self, stream};

use super::PublishError;
use crate::config::Settings;

/// Creates or verifies the stream, returning its handle.
pub async fn ensure(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<stream::Stream, PublishError> {
    if let Some(existing) = verify_existing(js, settings).await? {
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

fn verify(config: &stream::Config, name: &str, subjects: &str) -> Result<(), PublishError> {
    let incompatible = |why: String| PublishError::Incompatible(format!("stream {name} {why}"));
    if !config.subjects.iter().any(|s| s == subjects || s == ">") {
        return Err(incompatible(format!(
            "has subjects {:?} but walcast publishes to {subjects}; add it (nats stream edit {name} --subjects '{subjects}') or pick another --stream",
            config.subjects
        )));
    }
    if config.retention != stream::RetentionPolicy::Limits {
        return Err(incompatible(format!(
            "uses {:?} retention, which deletes events once consumed; walcast needs limits retention (recreate the stream or pick another --stream)",
            config.retention
        )));
    }
    if config.discard == stream::DiscardPolicy::New
        && (config.max_bytes > 0 || config.max_messages > 0)
    {
        return Err(incompatible(
            "uses discard=new with limits, which rejects publishes when full and would stall replication; use discard=old".into(),
        ));
    }
    Ok(())
}

/// Checks an existing stream without creating one: `Ok(None)` if missing.
pub async fn verify_existing(
    js: &jetstream::Context,
    settings: &Settings,
) -> Result<Option<stream::Stream>, PublishError> {
    match js.get_stream(&settings.stream).await {
        Ok(mut existing) => {
            let info = existing
                .info()
                .await
                .map_err(|e| PublishError::Nats(format!("read stream info: {e}")))?;
            verify(
                &info.config,
                &settings.stream,
                &format!("{}.>", settings.subject_prefix),
            )?;
            Ok(Some(existing))
        }
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
            if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(e) => Err(classify_get_error(e, settings)),
    }
}
