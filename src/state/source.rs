//! Where the projection reads its next event: the run's [`Feed`] while it
//! holds the next position, the stream otherwise (an ordered consumer from
//! that position: after a restart, while the state is behind the feed's
//! window, without a feed). Both give the same messages at the same
//! positions — the feed holds only what JetStream acknowledged at them.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::Ordered, pull::OrderedConfig};
use async_nats::jetstream::stream::Stream;
use futures::StreamExt;

use super::feed::{Feed, Input, Take};
use crate::broker::ordered;
use crate::telemetry::metrics as m;

/// Events moved out of the feed at once.
const TAKE: usize = 256;

/// How long the projection, caught up, lets events gather in the feed
/// after the first arrives, so one wake-up takes several acks' events: a
/// wake-up per ack ran the state thread right behind the pipeline, where
/// the walsender needs the CPU next, and the 5,000 commits/s tail grew
/// (docs/BENCHMARKS.md, session 14).
const GATHER: Duration = Duration::from_millis(2);

/// How long a read of the stream ahead of the feed waits before it looks
/// at the feed again.
const AHEAD_WAIT: Duration = Duration::from_millis(50);

/// Reads the stream from a position on, switching between feed and stream.
pub struct Source<'a> {
    stream: &'a Stream,
    feed: Option<Arc<Feed>>,
    consumer: Option<Ordered>,
    ready: VecDeque<Input>,
    /// The position wanted next.
    next: u64,
    /// Which messages read from the stream are walcast's (a copy's event
    /// id does not grow with the position: `pipeline::foreign`).
    own: crate::events::OwnIds,
    read: [metrics::Counter; 2],
}

impl<'a> Source<'a> {
    /// Reads from position `after + 1` on.
    pub fn new(stream: &'a Stream, feed: Option<Arc<Feed>>, after: u64) -> Self {
        let read = |source| metrics::counter!(m::STATE_READ, "source" => source);
        Source {
            stream,
            feed,
            consumer: None,
            ready: VecDeque::new(),
            next: after + 1,
            own: Default::default(),
            read: [read("feed"), read("stream")],
        }
    }

    /// The next event; `None` if nothing came within `wait` (`None`: wait
    /// as long as it takes).
    pub async fn next(&mut self, wait: Option<Duration>) -> Result<Option<Input>, String> {
        loop {
            if let Some(input) = self.ready.pop_front() {
                self.read[0].increment(1);
                return Ok(Some(self.advance(input)));
            }
            let take = (self.feed.as_ref()).map(|feed| feed.take(self.next, TAKE, &mut self.ready));
            match take {
                Some(Take::Taken) => {
                    self.switch_to_feed();
                    continue;
                }
                Some(Take::AtEnd) => {
                    self.switch_to_feed();
                    if let Some(feed) = &self.feed
                        && within(wait, feed.arrived()).await.is_none()
                    {
                        return Ok(None);
                    }
                    // Let more acks come: one wake-up for several.
                    tokio::time::sleep(GATHER).await;
                    continue;
                }
                // Its ack is on the way: look at the feed again soon.
                Some(Take::Ahead) => {
                    let wait = wait.map_or(AHEAD_WAIT, |w| w.min(AHEAD_WAIT));
                    return self.read_stream(Some(wait)).await;
                }
                Some(Take::Behind) | None => {}
            }
            return self.read_stream(wait).await;
        }
    }

    fn advance(&mut self, input: Input) -> Input {
        self.next = input.position + 1;
        input
    }

    fn switch_to_feed(&mut self) {
        if self.consumer.take().is_some() {
            tracing::debug!(
                at = self.next,
                "the state caught up with the publisher: it reads its events from the feed"
            );
        }
    }

    async fn read_stream(&mut self, wait: Option<Duration>) -> Result<Option<Input>, String> {
        loop {
            let messages = match &mut self.consumer {
                Some(messages) => messages,
                None => self.consumer.insert(open(self.stream, self.next).await?),
            };
            let (mut input, id) = match within(wait, messages.next()).await {
                None => return Ok(None),
                Some(Some(msg)) => from_message(msg.map_err(read_err)?)?,
                Some(None) => return Err("the state's stream consumer ended".into()),
            };

            // A consumer that async-nats recreated may start before the
            // position asked for (vendor/README.md): what the projection
            // already applied is never applied again.
            if input.position >= self.next {
                input.foreign = !self.own.admits(id);
                self.read[1].increment(1);
                return Ok(Some(self.advance(input)));
            }
        }
    }
}

/// `future`'s output, or `None` once `wait` is over.
async fn within<F: Future>(wait: Option<Duration>, future: F) -> Option<F::Output> {
    match wait {
        Some(wait) => tokio::time::timeout(wait, future).await.ok(),
        None => Some(future.await),
    }
}

/// An ordered consumer from `start` on. Pulled in batches: memory stays
/// bounded however far behind the projection is (a pushed consumer would
/// queue up to the client's subscription capacity, 65,536 messages). One
/// lost with its cluster node is replaced at the next pull; the short
/// heartbeats (`broker::ordered`) cover a read that waits at the stream's
/// end.
async fn open(stream: &Stream, start: u64) -> Result<Ordered, String> {
    let consumer = stream
        .create_consumer(ordered::with_short_heartbeats(OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        }))
        .await
        .map_err(read_err)?;
    consumer.messages().await.map_err(read_err)
}

fn read_err(e: impl std::fmt::Display) -> String {
    format!("reading the stream from JetStream for the state bucket: {e}")
}

/// A stream message as the projection reads it, and its event id.
fn from_message(
    msg: async_nats::jetstream::Message,
) -> Result<(Input, Option<(crate::lsn::Lsn, u32)>), String> {
    let position = msg
        .info()
        .map_err(|e| format!("a stream message without its position: {e}"))?
        .stream_sequence;
    let header = |name| {
        msg.headers
            .as_ref()
            .and_then(|h| h.get(name))
            .map(|v| v.as_str())
    };
    let id = header(crate::headers::MSG_ID).and_then(crate::events::parse_event_id);
    let input = Input {
        position,
        tenant: header(crate::headers::TENANT).map(Arc::from),
        seq: header(crate::headers::SEQ)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
        object: header(crate::headers::OBJECT).map(String::from),
        subject: msg.subject.clone(),
        payload: msg.payload.clone(),
        foreign: false,
    };
    Ok((input, id))
}
