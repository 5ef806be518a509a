//! Reads a pull consumer to its end through a plain subscription and pull
//! requests of its own, for the state read (the TypeScript client's
//! `pull.ts` does the same).
//!
//! Why: through async-nats' ordered consumer, about one 10,000-row load in
//! 400 stopped receiving with messages still pending until the read's
//! 10 s stall guard retried it (docs/BENCHMARKS.md, session 24). A read that
//! owns its pull requests has nothing to wait for but the server: requests
//! without expiry, the next one sent when half of the last are in. It
//! needs no permission the ordered consumer does not: publish to
//! `$JS.API.CONSUMER.MSG.NEXT.<stream>.<consumer>` and subscribe to the
//! client's own inbox (SPEC §9).
//!
//! The read ends at the message whose delivery info says nothing is
//! pending. The server counts a write into the pending a moment after
//! acknowledging it (its stream signals consumers through a queue), so a
//! read may end before the last writes made during it: what it delivered
//! is a prefix of the consumer, never a guaranteed "up to now" (the state
//! load needs no more: its `as_of_seq` is what it read).
//!
//! Nothing goes missing unnoticed: a consumer without acks delivers each
//! message once, numbered 1, 2, … (the consumer sequence), so the message
//! that can be the last must carry the count received. A status other than
//! a heartbeat, a reconnect (pull requests die with the old connection) or
//! silence end the read with a transient error: the load starts over.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::StatusCode;
use futures::{FutureExt as _, StreamExt};

use crate::reader::ReadError;

/// How often a read that receives nothing checks for a reconnect.
const TICK: Duration = Duration::from_millis(250);

/// What to read.
pub struct PullRead<'a> {
    pub nats: &'a async_nats::Client,
    pub stream: &'a str,
    pub consumer: &'a str,
    /// The consumer's pending count when it was created.
    pub num_pending: u64,
    /// Messages per pull request; the next is sent when half are in.
    pub batch: u64,
    /// The longest silence tolerated while messages are pending.
    pub stall: Duration,
}

/// A message's consumer sequence and what is pending after it.
#[derive(Debug, PartialEq, Eq)]
pub struct Delivery {
    pub consumer_seq: u64,
    pub pending: u64,
}

/// The consumer sequence and pending count from a JetStream reply subject:
/// `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ns>.<pending>`,
/// or with `<domain>.<account hash>` after `ACK` and a random token at the end.
pub fn parse_delivery(reply: &str) -> Option<Delivery> {
    let tokens: Vec<&str> = reply.split('.').collect();
    let at = match tokens.len() {
        9 => 6,
        11 | 12 => 8,
        _ => return None,
    };
    if tokens[0] != "$JS" || tokens[1] != "ACK" {
        return None;
    }
    Some(Delivery {
        consumer_seq: tokens[at].parse().ok()?,
        pending: tokens[at + 2].parse().ok()?,
    })
}

/// Reads the consumer until nothing is pending, handing each message to
/// `on_message` in order; what it returns as an error ends the read as is.
pub async fn pull_all(
    read: PullRead<'_>,
    mut on_message: impl FnMut(&async_nats::Message) -> Result<(), ReadError>,
) -> Result<(), ReadError> {
    if read.num_pending == 0 {
        return Ok(());
    }
    let broken = |why: String| ReadError::Transient(format!("pulling from {}: {why}", read.stream));
    let connects = read.nats.statistics().connects.load(Ordering::Relaxed);
    let inbox = read.nats.new_inbox();
    let mut sub = read
        .nats
        .subscribe(inbox.clone())
        .await
        .map_err(|e| broken(e.to_string()))?;
    let next = format!(
        "$JS.API.CONSUMER.MSG.NEXT.{}.{}",
        read.stream, read.consumer
    );
    let request = bytes::Bytes::from(format!("{{\"batch\":{}}}", read.batch));
    let ask = || async {
        read.nats
            .publish_with_reply(next.clone(), inbox.clone(), request.clone())
            .await
            .map_err(|e| broken(e.to_string()))
    };
    ask().await?;
    let (mut requested, mut received, mut last_at) = (read.batch, 0u64, 1u64);
    let mut quiet = Duration::ZERO;
    loop {
        // A timer only when no message is ready: arming one per message cost
        // 7 % of a large load (session 22).
        let next = match sub.next().now_or_never() {
            Some(ready) => Ok(ready),
            None => tokio::time::timeout(TICK, sub.next()).await,
        };
        let msg = match next {
            Ok(Some(msg)) => msg,
            Ok(None) => return Err(broken("the subscription ended".into())),
            Err(_) => {
                if read.nats.statistics().connects.load(Ordering::Relaxed) != connects {
                    return Err(broken("the connection was re-established".into()));
                }
                quiet += TICK;
                if quiet >= read.stall {
                    return Err(broken(format!("nothing for {:?}", read.stall)));
                }
                continue;
            }
        };
        quiet = Duration::ZERO;
        let Some(reply) = msg.reply.as_ref().filter(|r| !r.is_empty()) else {
            match msg.status {
                Some(StatusCode::IDLE_HEARTBEAT) => continue,
                status => {
                    let what = msg.description.clone().unwrap_or_default();
                    return Err(broken(format!("status {status:?} {what}")));
                }
            }
        };
        received += 1;
        on_message(&msg)?;
        if received == last_at {
            match parse_delivery(reply.as_str()) {
                Some(d) if d.consumer_seq == received => {
                    if d.pending == 0 {
                        return Ok(());
                    }
                    last_at = received + d.pending;
                }
                _ => return Err(broken("a message went missing".into())),
            }
        }
        if requested - received <= read.batch / 2 {
            ask().await?;
            requested += read.batch;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_both_reply_forms() {
        assert_eq!(
            parse_delivery("$JS.ACK.KV_S.c1.1.77.12.1700000000000000000.5"),
            Some(Delivery {
                consumer_seq: 12,
                pending: 5
            })
        );
        assert_eq!(
            parse_delivery("$JS.ACK._.HASH.KV_S.c1.1.77.12.1700000000000000000.0.rnd"),
            Some(Delivery {
                consumer_seq: 12,
                pending: 0
            })
        );
        assert_eq!(
            parse_delivery("$JS.ACK.hub.HASH.KV_S.c1.1.77.12.1700000000000000000.3"),
            Some(Delivery {
                consumer_seq: 12,
                pending: 3
            })
        );
    }

    #[test]
    fn refuses_anything_else() {
        for reply in [
            "",
            "_INBOX.abc.def",
            "$JS.ACK.S.c.1.2.x.4.5",
            "$JS.NAK.S.c.1.2.3.4.5",
        ] {
            assert_eq!(parse_delivery(reply), None, "{reply}");
        }
    }
}
