//! Asking walcast's catch-up service (SPEC §7) where a tenant's events after
//! a `seq` start in the stream.
//!
//! Request `{"tenant_id","after_seq"}` on `<prefix>-api.v1.catchup.<tenant>`; the
//! answer is a start position, or an error in the NATS micro headers
//! (`Nats-Service-Error-Code`). This module turns both into [`Answer`] or
//! [`AskError`], and decides in one place what is transient: no responders
//! (walcast down or a standby), a timeout, or `503 unavailable` are retried
//! by the caller; `400` and malformed replies are definite.

use std::time::Duration;

use async_nats::HeaderMap;
use serde::Deserialize;

use crate::error::Error;

/// Where to read a tenant's events from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// A consumer on `stream` filtered on `filter_subject`, from
    /// `start_stream_seq`, delivers `after_seq + 1` first.
    Start {
        stream: String,
        filter_subject: String,
        start_stream_seq: u64,
        last_seq: u64,
    },
    /// Events after `after_seq` are gone from the stream (retention).
    TooOld { oldest_seq: u64, last_seq: u64 },
    /// `after_seq` is beyond the tenant's last published seq.
    Ahead { last_seq: u64 },
}

/// A failed ask.
#[derive(Debug)]
pub enum AskError {
    /// Try again later (walcast down, restarting, or busy).
    Unavailable(String),
    /// Asking again will not help.
    Definite(Error),
}

#[derive(Deserialize)]
struct StartReply {
    stream: String,
    filter_subject: String,
    start_stream_seq: u64,
    last_seq: u64,
}

#[derive(Deserialize)]
struct ErrorReply {
    #[serde(default)]
    oldest_seq: Option<u64>,
    #[serde(default)]
    last_seq: Option<u64>,
    #[serde(default)]
    message: Option<String>,
}

/// Asks once.
pub async fn ask(
    client: &async_nats::Client,
    subject: &str,
    tenant: &str,
    after_seq: u64,
    timeout: Duration,
) -> Result<Answer, AskError> {
    let body = serde_json::json!({"tenant_id": tenant, "after_seq": after_seq}).to_string();
    let request = async_nats::Request::new()
        .payload(body.into())
        .timeout(Some(timeout));
    match client.send_request(subject.to_string(), request).await {
        Ok(reply) => parse(reply.headers.as_ref(), &reply.payload),
        Err(e) => Err(AskError::Unavailable(format!("catch-up request: {e}"))),
    }
}

/// Interprets a reply: the error code header, then the JSON body.
pub fn parse(headers: Option<&HeaderMap>, body: &[u8]) -> Result<Answer, AskError> {
    let malformed = |reason: String| {
        AskError::Definite(Error::Malformed {
            what: "catch-up reply".into(),
            reason,
        })
    };
    let code = headers
        .and_then(|h| h.get("Nats-Service-Error-Code"))
        .map(|v| v.as_str().trim().to_string());
    let Some(code) = code else {
        let reply: StartReply = serde_json::from_slice(body)
            .map_err(|e| malformed(format!("{e}: {}", String::from_utf8_lossy(body))))?;
        return Ok(Answer::Start {
            stream: reply.stream,
            filter_subject: reply.filter_subject,
            start_stream_seq: reply.start_stream_seq,
            last_seq: reply.last_seq,
        });
    };
    let error: Option<ErrorReply> = serde_json::from_slice(body).ok();
    let field = |name: &str, value: Option<u64>| {
        value.ok_or_else(|| malformed(format!("error {code} without {name}")))
    };
    match code.as_str() {
        "410" => {
            let e = error.unwrap_or(ErrorReply {
                oldest_seq: None,
                last_seq: None,
                message: None,
            });
            Ok(Answer::TooOld {
                oldest_seq: field("oldest_seq", e.oldest_seq)?,
                last_seq: field("last_seq", e.last_seq)?,
            })
        }
        "416" => Ok(Answer::Ahead {
            last_seq: field("last_seq", error.and_then(|e| e.last_seq))?,
        }),
        "400" => Err(AskError::Definite(Error::BadRequest {
            message: error
                .and_then(|e| e.message)
                .unwrap_or_else(|| String::from_utf8_lossy(body).into_owned()),
        })),
        // 503 unavailable, and anything a newer daemon may add: retry.
        _ => Err(AskError::Unavailable(format!(
            "catch-up error {code}: {}",
            String::from_utf8_lossy(body)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(code: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("Nats-Service-Error-Code", code);
        h
    }

    #[test]
    fn parses_every_documented_reply() {
        let start = br#"{"stream":"WALCAST","filter_subject":"walcast.acme.>","start_stream_seq":9123,"last_seq":57}"#;
        assert_eq!(
            parse(None, start).unwrap(),
            Answer::Start {
                stream: "WALCAST".into(),
                filter_subject: "walcast.acme.>".into(),
                start_stream_seq: 9123,
                last_seq: 57
            }
        );
        let too_old = br#"{"error":"too_old","oldest_seq":11,"last_seq":20,"message":"x"}"#;
        assert_eq!(
            parse(Some(&headers("410")), too_old).unwrap(),
            Answer::TooOld {
                oldest_seq: 11,
                last_seq: 20
            }
        );
        let ahead = br#"{"error":"ahead","last_seq":20}"#;
        assert_eq!(
            parse(Some(&headers("416")), ahead).unwrap(),
            Answer::Ahead { last_seq: 20 }
        );
        let bad = br#"{"error":"bad_request","message":"invalid tenant"}"#;
        assert!(matches!(
            parse(Some(&headers("400")), bad),
            Err(AskError::Definite(Error::BadRequest { message })) if message == "invalid tenant"
        ));
        let busy = br#"{"error":"unavailable","message":"event still in flight"}"#;
        assert!(matches!(
            parse(Some(&headers("503")), busy),
            Err(AskError::Unavailable(_))
        ));
    }

    #[test]
    fn malformed_replies_are_definite() {
        assert!(matches!(
            parse(None, b"{}"),
            Err(AskError::Definite(Error::Malformed { .. }))
        ));
        assert!(matches!(
            parse(Some(&headers("410")), br#"{"error":"too_old"}"#),
            Err(AskError::Definite(Error::Malformed { .. }))
        ));
    }
}
