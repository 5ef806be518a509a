//! Chained acknowledgements: one JetStream ack stands for every publish
//! before it.
//!
//! Every publish carries `Nats-Expected-Last-Sequence` = the stream sequence
//! walcast expects before it. If JetStream rejects or loses message k, every
//! later message fails that check, so an ack for message n stored at exactly
//! the expected sequence n proves messages ..=n are stored, in order. The
//! publisher therefore asks for an ack (sets a reply subject) only on the
//! last event of a batch and every [`ACK_EVERY`] events; the others are
//! plain publishes. That saves JetStream an ack message per event and
//! walcast a reply subscription, a oneshot and a timer per event.
//!
//! Acks arrive on one subscription, `<inbox>.<stream seq>`; the token names
//! the stream sequence the acked message was expected at.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use async_nats::{Client, Subject, Subscriber};
use serde::Deserialize;

use super::PublishError;

/// An ack is requested at least this often (events), so progress, the
/// in-flight bound and the ack timeout keep moving inside a large batch.
pub const ACK_EVERY: u64 = 256;

/// An ack not received this long after its request fails the run (it
/// restarts from the checkpoint).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Outstanding ack requests and the subscription their acks arrive on.
pub struct Acks {
    inbox: String,
    sub: Subscriber,
    /// Stream sequences an ack was requested for, with when, in order.
    requested: VecDeque<(u64, Instant)>,
    /// Acks that arrived ahead of an earlier request (JetStream answers in
    /// order, but nothing here relies on it).
    early: BTreeMap<u64, Verdict>,
}

/// What JetStream said about the message expected at a stream sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stored at this sequence (a duplicate was not stored).
    Stored { seq: u64, duplicate: bool },
    /// Rejected, with JetStream's description.
    Rejected(String),
}

/// An ack matched to the request it answers.
pub struct Answer {
    /// The stream sequence the acked message was expected at.
    pub expected: u64,
    pub verdict: Verdict,
    /// Time since the request.
    pub latency: Duration,
}

impl Acks {
    /// Subscribes to a fresh inbox; must run before the first publish.
    pub async fn subscribe(client: &Client) -> Result<Acks, PublishError> {
        let inbox = client.new_inbox();
        let sub = client
            .subscribe(format!("{inbox}.*"))
            .await
            .map_err(|e| PublishError::Nats(format!("subscribe to the ack inbox: {e}")))?;
        Ok(Acks {
            inbox,
            sub,
            requested: VecDeque::new(),
            early: BTreeMap::new(),
        })
    }

    /// The reply subject for the publish expected at `seq`, and records the
    /// request.
    pub fn request(&mut self, seq: u64) -> Subject {
        self.requested.push_back((seq, Instant::now()));
        Subject::from(format!("{}.{seq}", self.inbox))
    }

    pub fn is_empty(&self) -> bool {
        self.requested.is_empty()
    }

    /// The next answer, in request order. Pending forever while nothing is
    /// requested (for `select!`).
    pub async fn next(&mut self) -> Result<Answer, PublishError> {
        use futures::StreamExt;
        loop {
            let Some(&(front, at)) = self.requested.front() else {
                return std::future::pending().await;
            };
            if let Some(verdict) = self.early.remove(&front) {
                self.requested.pop_front();
                return Ok(Answer {
                    expected: front,
                    verdict,
                    latency: at.elapsed(),
                });
            }
            let msg = self.sub.next().await.ok_or_else(|| {
                PublishError::Nats("the ack subscription ended (connection closed)".into())
            })?;
            let Some(seq) = msg
                .subject
                .rsplit_once('.')
                .and_then(|(_, t)| t.parse::<u64>().ok())
            else {
                continue;
            };
            if !self.requested.iter().any(|(s, _)| *s == seq) {
                // A late answer to a request of a failed attempt: not ours.
                continue;
            }
            let verdict = match msg.status {
                Some(status) if status == async_nats::StatusCode::NO_RESPONDERS => {
                    Verdict::Rejected(
                        "no stream captures the subject (no responders): was the stream deleted?"
                            .into(),
                    )
                }
                _ => parse(&msg.payload),
            };
            self.early.insert(seq, verdict);
        }
    }

    /// Fails when the oldest request has waited longer than [`ACK_TIMEOUT`].
    pub fn check_timeout(&self, now: Instant) -> Result<(), PublishError> {
        match self.requested.front() {
            Some(&(seq, at)) if now.duration_since(at) > ACK_TIMEOUT => Err(PublishError::Ack {
                event_id: format!("at stream sequence {seq}"),
                reason: format!("no acknowledgement from JetStream within {ACK_TIMEOUT:?}"),
            }),
            _ => Ok(()),
        }
    }
}

#[derive(Deserialize)]
struct AckBody<'a> {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    #[serde(default, borrow)]
    error: Option<ApiError<'a>>,
}

#[derive(Deserialize)]
struct ApiError<'a> {
    #[serde(default)]
    code: u16,
    #[serde(default, borrow)]
    description: std::borrow::Cow<'a, str>,
}

/// Reads a JetStream publish ack (`{"stream":..,"seq":..}` or `{"error":..}`).
pub fn parse(body: &[u8]) -> Verdict {
    match serde_json::from_slice::<AckBody<'_>>(body) {
        Ok(AckBody {
            error: Some(err), ..
        }) => Verdict::Rejected(format!("{} (code {})", err.description, err.code)),
        Ok(AckBody { seq, duplicate, .. }) if seq > 0 => Verdict::Stored { seq, duplicate },
        Ok(_) => Verdict::Rejected(format!(
            "unexpected ack {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
        Err(e) => Verdict::Rejected(format!(
            "unreadable ack ({e}): {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stored_duplicate_and_errors() {
        assert_eq!(
            parse(br#"{"stream":"WALCAST","seq":42}"#),
            Verdict::Stored {
                seq: 42,
                duplicate: false
            }
        );
        assert_eq!(
            parse(br#"{"stream":"WALCAST","seq":7,"duplicate":true}"#),
            Verdict::Stored {
                seq: 7,
                duplicate: true
            }
        );
        assert_eq!(
            parse(
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4"},"stream":"WALCAST","seq":0}"#
            ),
            Verdict::Rejected("wrong last sequence: 4 (code 400)".into())
        );
        assert!(matches!(parse(b"garbage"), Verdict::Rejected(r) if r.contains("unreadable")));
        assert!(matches!(parse(b"{}"), Verdict::Rejected(r) if r.contains("unexpected")));
    }
}
