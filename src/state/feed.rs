//! The state's live input: the events this run's publisher had acknowledged,
//! handed over in process, so a projection that keeps up does not read
//! back from the broker what walcast has just written there (each read
//! cost the nats-server a delivery and the state thread a message to
//! parse: docs/BENCHMARKS.md, session 14).
//!
//! Invariant owned here: the feed holds consecutive stream positions
//! `[oldest, end)`, each with the event JetStream acknowledged at that
//! position. It keeps the newest [`CAPACITY`] events (at most
//! [`MAX_BYTES`] of payloads) and drops older ones; a projection behind
//! what it holds reads the stream instead (`source`). While the projection
//! is further behind than the feed could hold (a restart, a stalled
//! bucket), the publisher hands nothing over ([`Feed::wants`]): it would
//! only be dropped.
//!
//! A projection that reads the feed stays in it through a backlog: the
//! publisher, draining events committed a while ago, takes no new batch
//! while this projection is [`LAG_LIMIT`] events behind it
//! ([`Feed::holds_back`]; `publish` decides when to wait and for how long).
//! Read back from the stream, every event of a drain cost the nats-server
//! a delivery and walcast a message to parse, on the same cores
//! (docs/BENCHMARKS.md, session 19). A live stream never waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::Notify;

/// Events held at most.
pub const CAPACITY: usize = 4096;
/// Payload bytes held at most.
pub const MAX_BYTES: usize = 4 << 20;
/// How far a projection reading the feed may fall behind the publisher's
/// next position before a draining publisher waits for it: half the feed,
/// so a batch sent meanwhile still fits.
pub const LAG_LIMIT: u64 = CAPACITY as u64 / 2;

/// One stream message as the state reads it (from the feed or the stream).
#[derive(Debug)]
pub struct Input {
    /// Its stream sequence.
    pub position: u64,
    pub subject: Subject,
    /// `Walcast-Tenant` (none for dead letters and table-wide events).
    pub tenant: Option<Arc<str>>,
    /// `Walcast-Seq` (0 when absent).
    pub seq: u64,
    /// `Walcast-Object`: the claim check of an oversized event.
    pub object: Option<String>,
    pub payload: Bytes,
    /// A message walcast did not publish (`pipeline::foreign`): read from
    /// the stream without an event id, or with one not after the last read.
    pub foreign: bool,
}

/// What [`Feed::take`] found at the asked position.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Events from the asked position on (at least one).
    Taken,
    /// The asked position is the feed's end: nothing acknowledged after it yet.
    AtEnd,
    /// The asked position is no longer held (dropped, or before this run).
    Behind,
    /// The asked position is not acknowledged yet (the stream shows a
    /// message before its ack reaches the publisher).
    Ahead,
}

/// Shared between a run's publisher (writes) and its state service (reads).
pub struct Feed {
    ring: Mutex<Ring>,
    arrived: Notify,
    /// The position the projection asked for last.
    reader: AtomicU64,
    /// Whether that position was in the feed (or after it).
    following: AtomicBool,
    /// Notified when the projection asks for a later position.
    advanced: Notify,
}

struct Ring {
    events: VecDeque<Input>,
    /// The position after the newest event (the next one expected).
    end: u64,
    bytes: usize,
}

impl Feed {
    /// An empty feed whose first event will be at `first`.
    pub fn new(first: u64) -> Arc<Feed> {
        Arc::new(Feed {
            ring: Mutex::new(Ring {
                events: VecDeque::new(),
                end: first,
                bytes: 0,
            }),
            arrived: Notify::new(),
            reader: AtomicU64::new(first),
            following: AtomicBool::new(true),
            advanced: Notify::new(),
        })
    }

    /// Whether the event at `position` is worth handing over: the
    /// projection is close enough to reach it before it is dropped.
    pub fn wants(&self, position: u64) -> bool {
        position < self.reader.load(Ordering::Relaxed) + CAPACITY as u64
    }

    /// Whether a publisher about to send position `next` is so far ahead
    /// of a projection that reads the feed that the next events would
    /// drop out of the feed before it reaches them.
    pub fn holds_back(&self, next: u64) -> bool {
        self.following.load(Ordering::Relaxed)
            && next.saturating_sub(self.reader.load(Ordering::Relaxed)) >= LAG_LIMIT
    }

    /// The position the projection asked for last.
    pub fn reader(&self) -> u64 {
        self.reader.load(Ordering::Relaxed)
    }

    /// Completes when the projection asks for a later position (at once if
    /// it did since the last call): one waiter, the publisher.
    pub async fn advanced(&self) {
        self.advanced.notified().await
    }

    fn ring(&self) -> std::sync::MutexGuard<'_, Ring> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends acknowledged events, in stream order: every position up to
    /// `through` is acknowledged, `events` are those handed over. An event
    /// that does not follow the newest one, or positions acknowledged
    /// without one, start the feed over, so what it holds stays consecutive.
    pub fn push(&self, events: impl IntoIterator<Item = Input>, through: u64) {
        let mut ring = self.ring();
        let mut any = false;
        for event in events {
            if event.position != ring.end {
                ring.events.clear();
                ring.bytes = 0;
            }
            ring.end = event.position + 1;
            ring.bytes += event.payload.len();
            ring.events.push_back(event);
            while ring.events.len() > CAPACITY || ring.bytes > MAX_BYTES {
                let dropped = ring.events.pop_front().expect("over capacity, not empty");
                ring.bytes -= dropped.payload.len();
            }
            any = true;
        }
        if ring.end != through + 1 {
            ring.events.clear();
            ring.bytes = 0;
            ring.end = through + 1;
        }
        drop(ring);
        if any {
            self.arrived.notify_one();
        }
    }

    /// Moves up to `max` events from position `from` on into `out`; events
    /// before `from` are dropped (already applied).
    pub fn take(&self, from: u64, max: usize, out: &mut VecDeque<Input>) -> Take {
        let taken = self.take_from(from, max, out);
        self.following
            .store(taken != Take::Behind, Ordering::Relaxed);
        if self.reader.swap(from, Ordering::Relaxed) < from {
            self.advanced.notify_one();
        }
        taken
    }

    fn take_from(&self, from: u64, max: usize, out: &mut VecDeque<Input>) -> Take {
        let mut guard = self.ring();
        let ring = &mut *guard;
        let oldest = ring.end - ring.events.len() as u64;
        if from < oldest {
            return Take::Behind;
        }
        if from > ring.end {
            return Take::Ahead;
        }
        let skip = (from - oldest) as usize;
        for dropped in ring.events.drain(..skip) {
            ring.bytes -= dropped.payload.len();
        }
        if ring.events.is_empty() {
            return Take::AtEnd;
        }
        let n = ring.events.len().min(max);
        for event in ring.events.drain(..n) {
            ring.bytes -= event.payload.len();
            out.push_back(event);
        }
        Take::Taken
    }

    /// Completes when events arrive (at once if some arrived since the
    /// last call): one reader.
    pub async fn arrived(&self) {
        self.arrived.notified().await
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn input(position: u64, bytes: usize) -> Input {
        Input {
            position,
            subject: Subject::from("walcast.acme.task.created"),
            tenant: Some("acme".into()),
            seq: position,
            object: None,
            payload: Bytes::from(vec![0u8; bytes]),
            foreign: false,
        }
    }

    fn positions(out: &VecDeque<Input>) -> Vec<u64> {
        out.iter().map(|i| i.position).collect()
    }

    /// A publisher is held back only by a projection that reads the feed,
    /// and only [`LAG_LIMIT`] events ahead of it; it learns when the
    /// projection moves on.
    #[tokio::test]
    async fn holds_back_a_publisher_far_ahead_of_a_projection_in_the_feed() {
        let feed = Feed::new(10);
        let mut out = VecDeque::new();
        assert!(!feed.holds_back(10 + LAG_LIMIT - 1));
        assert!(feed.holds_back(10 + LAG_LIMIT));
        feed.push((10..20).map(|p| input(p, 1)), 19);
        assert_eq!(feed.take(15, 2, &mut out), Take::Taken);
        assert_eq!(feed.reader(), 15);
        // Moved since the last wait: that wait completes at once.
        tokio::time::timeout(Duration::from_secs(5), feed.advanced())
            .await
            .expect("the projection moved");
        assert!(!feed.holds_back(15 + LAG_LIMIT - 1));
        assert!(feed.holds_back(15 + LAG_LIMIT));
        // Behind the feed (reading the stream): never waited for.
        assert_eq!(feed.take(12, 2, &mut out), Take::Behind);
        assert!(!feed.holds_back(12 + 10 * LAG_LIMIT));
        // Back in it: waited for again.
        assert_eq!(feed.take(17, 2, &mut out), Take::Taken);
        assert!(feed.holds_back(17 + LAG_LIMIT));
    }

    #[test]
    fn hands_over_consecutive_events_and_says_where_the_reader_is() {
        let feed = Feed::new(10);
        let mut out = VecDeque::new();
        assert_eq!(feed.take(10, 8, &mut out), Take::AtEnd);
        assert_eq!(feed.take(9, 8, &mut out), Take::Behind);
        feed.push((10..15).map(|p| input(p, 1)), 14);
        assert_eq!(feed.take(16, 8, &mut out), Take::Ahead);
        assert_eq!(feed.take(12, 2, &mut out), Take::Taken);
        assert_eq!(positions(&out), [12, 13]);
        // What was taken (and skipped) is gone.
        assert_eq!(feed.take(12, 8, &mut out), Take::Behind);
        out.clear();
        assert_eq!(feed.take(14, 8, &mut out), Take::Taken);
        assert_eq!(positions(&out), [14]);
        assert_eq!(feed.take(15, 8, &mut out), Take::AtEnd);
    }

    #[test]
    fn keeps_only_the_newest_events_within_its_bounds() {
        let feed = Feed::new(1);
        let last = CAPACITY as u64 + 10;
        feed.push((1..=last).map(|p| input(p, 1)), last);
        let mut out = VecDeque::new();
        assert_eq!(feed.take(10, 1, &mut out), Take::Behind);
        assert_eq!(feed.take(11, 1, &mut out), Take::Taken);
        // Bytes bound: two large events leave room for one.
        let feed = Feed::new(1);
        feed.push(
            [input(1, MAX_BYTES / 2 + 1), input(2, MAX_BYTES / 2 + 1)],
            2,
        );
        assert_eq!(feed.take(1, 8, &mut out), Take::Behind);
        out.clear();
        assert_eq!(feed.take(2, 8, &mut out), Take::Taken);
        assert_eq!(positions(&out), [2]);
    }

    #[test]
    fn an_event_out_of_sequence_starts_the_feed_over() {
        let feed = Feed::new(1);
        feed.push((1..=3).map(|p| input(p, 1)), 3);
        feed.push([input(7, 1)], 7);
        let mut out = VecDeque::new();
        assert_eq!(feed.take(3, 8, &mut out), Take::Behind);
        assert_eq!(feed.take(7, 8, &mut out), Take::Taken);
        assert_eq!(positions(&out), [7]);
        // Positions acknowledged without their events: nothing held.
        feed.push([input(8, 1)], 9);
        assert_eq!(feed.take(8, 8, &mut out), Take::Behind);
        assert_eq!(feed.take(10, 8, &mut out), Take::AtEnd);
    }

    #[test]
    fn wants_only_what_the_reader_can_reach() {
        let feed = Feed::new(100);
        assert!(feed.wants(100 + CAPACITY as u64 - 1));
        assert!(!feed.wants(100 + CAPACITY as u64));
        let mut out = VecDeque::new();
        assert_eq!(feed.take(50, 8, &mut out), Take::Behind);
        assert!(!feed.wants(50 + CAPACITY as u64));
    }

    #[tokio::test]
    async fn a_push_wakes_the_reader_even_if_it_was_not_waiting_yet() {
        let feed = Feed::new(1);
        feed.push([input(1, 1)], 1);
        tokio::time::timeout(std::time::Duration::from_secs(5), feed.arrived())
            .await
            .expect("the permit of the earlier push");
    }
}
