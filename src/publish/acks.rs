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
//!
//! Two answers end the wait for the acks before them at once, since those
//! will never come: "no responders" (nothing stores the stream's subjects:
//! its leader is being elected, or the stream is gone), and a NATS
//! reconnection (an ack sent to the old connection is lost with it).

use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;

use async_nats::Subject;
use serde::Deserialize;
// The runtime's clock: paused in the in-process tests, the system clock in
// production.
use tokio::time::Instant;

use super::PublishError;
use super::sink::Replies;
use crate::position::StreamSeq;

/// An ack is requested at least this often (events), so progress, the
/// in-flight bound and the ack timeout keep moving inside a large batch.
pub const ACK_EVERY: u64 = 256;

/// An ack not received this long after its request fails the run (it
/// restarts from the checkpoint).
pub const ACK_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an ack requested before a NATS reconnection may still arrive
/// after it (a publish still queued in the client goes out on the new
/// connection); one sent on the old connection is lost.
pub const RECONNECT_GRACE: Duration = Duration::from_secs(2);

/// Outstanding ack requests and the subscription their acks arrive on.
pub struct Acks<R> {
    replies: R,
    /// The connection count last seen, and since when.
    connection: (u64, Instant),
    /// Stream sequences an ack was requested for, with when and on which
    /// connection (count), in order.
    requested: VecDeque<(StreamSeq, Instant, u64)>,
    /// Acks that arrived ahead of an earlier request (JetStream answers in
    /// order, but nothing here relies on it).
    early: BTreeMap<StreamSeq, Verdict>,
}

/// What JetStream said about the message expected at a stream sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Stored at this sequence (a duplicate was not stored).
    Stored { seq: StreamSeq, duplicate: bool },
    /// Rejected, with JetStream's description.
    Rejected(String),
    /// Rejected because the stream (or, for `Nats-Expected-Last-Subject-Sequence`,
    /// the subject) did not end where the message expected it to (JetStream
    /// error 10071): a broken publish chain, or a create-only write of a key
    /// that exists.
    WrongLast(String),
    /// Nothing captures the subject: no stream leader (an election), or no
    /// stream.
    NoResponders,
}

/// An ack matched to the request it answers.
pub struct Answer {
    /// The stream sequence the acked message was expected at.
    pub expected: StreamSeq,
    pub verdict: Verdict,
    /// Time since the request.
    pub latency: Duration,
}

impl<R: Replies> Acks<R> {
    /// Starts on a fresh subscription (opened before the first publish).
    pub fn new(replies: R) -> Acks<R> {
        let connects = replies.connects();
        Acks {
            replies,
            connection: (connects, Instant::now()),
            requested: VecDeque::new(),
            early: BTreeMap::new(),
        }
    }

    /// The reply subject for the publish expected at `seq`, and records the
    /// request.
    pub fn request(&mut self, seq: StreamSeq) -> Subject {
        let connects = self.replies.connects();
        self.requested.push_back((seq, Instant::now(), connects));
        self.replies.subject(seq)
    }

    pub fn is_empty(&self) -> bool {
        self.requested.is_empty()
    }

    /// The next answer, in request order. Pending forever while nothing is
    /// requested (for `select!`).
    pub async fn next(&mut self) -> Result<Answer, PublishError> {
        loop {
            let Some(&(front, at, _)) = self.requested.front() else {
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
            let (seq, verdict) = self.replies.next().await.ok_or_else(|| {
                PublishError::Nats("the ack subscription ended (connection closed)".into())
            })?;
            let Some(&(_, at, _)) = self.requested.iter().find(|(s, _, _)| *s == seq) else {
                // A late answer to a request of a failed attempt: not ours.
                continue;
            };
            if verdict == Verdict::NoResponders {
                // Every request before it is as good as unanswered: say so
                // now rather than after the ack timeout.
                return Ok(Answer {
                    expected: seq,
                    verdict,
                    latency: at.elapsed(),
                });
            }
            self.early.insert(seq, verdict);
        }
    }

    /// Fails when the oldest request has waited longer than [`ACK_TIMEOUT`],
    /// or was sent before a NATS reconnection more than [`RECONNECT_GRACE`]
    /// ago.
    pub fn check_timeout(&mut self, now: Instant) -> Result<(), PublishError> {
        let connects = self.replies.connects();
        if connects != self.connection.0 {
            self.connection = (connects, now);
        }
        match self.requested.front() {
            Some(&(seq, at, _)) if now.duration_since(at) > ACK_TIMEOUT => Err(PublishError::Ack {
                event_id: format!("at stream sequence {seq}"),
                reason: format!("no acknowledgement from JetStream within {ACK_TIMEOUT:?}"),
            }),
            Some(&(seq, _, on))
                if on < connects && now.duration_since(self.connection.1) > RECONNECT_GRACE =>
            {
                Err(PublishError::Nats(format!(
                    "reconnected before JetStream acknowledged stream sequence {seq}: \
                     the acknowledgement was lost with the old connection"
                )))
            }
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
    #[serde(default)]
    err_code: u32,
    #[serde(default, borrow)]
    description: std::borrow::Cow<'a, str>,
}

/// JetStream's error code for a wrong expected last (subject) sequence.
const WRONG_LAST_SEQUENCE: u32 = 10071;

/// Reads a JetStream publish ack (`{"stream":..,"seq":..}` or `{"error":..}`).
pub fn parse(body: &[u8]) -> Verdict {
    match serde_json::from_slice::<AckBody<'_>>(body) {
        Ok(AckBody {
            error: Some(err), ..
        }) => {
            let reason = format!("{} (code {})", err.description, err.code);
            if err.err_code == WRONG_LAST_SEQUENCE {
                Verdict::WrongLast(reason)
            } else {
                Verdict::Rejected(reason)
            }
        }
        Ok(AckBody { seq, duplicate, .. }) if seq > 0 => Verdict::Stored {
            seq: StreamSeq(seq),
            duplicate,
        },
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
                seq: StreamSeq(42),
                duplicate: false
            }
        );
        assert_eq!(
            parse(br#"{"stream":"WALCAST","seq":7,"duplicate":true}"#),
            Verdict::Stored {
                seq: StreamSeq(7),
                duplicate: true
            }
        );
        assert_eq!(
            parse(
                br#"{"error":{"code":400,"err_code":10071,"description":"wrong last sequence: 4"},"stream":"WALCAST","seq":0}"#
            ),
            Verdict::WrongLast("wrong last sequence: 4 (code 400)".into())
        );
        assert!(matches!(parse(b"garbage"), Verdict::Rejected(r) if r.contains("unreadable")));
        assert!(matches!(parse(b"{}"), Verdict::Rejected(r) if r.contains("unexpected")));
    }
}
