//! The in-memory twin of the JetStream sink, for in-process tests of the
//! publisher and of recovery: a `Vec`-backed stream with JetStream's rules
//! for what it stores (`Nats-Msg-Id` dedup within a window, then
//! `Nats-Expected-Last-Sequence`), acks delivered after a latency on the
//! runtime's (pausable) clock, and the faults recovery must survive: losing
//! its last acknowledged messages (SPEC §4.7), refusing a send, and
//! dropping the connection (the message and every ack in flight lost).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::Subject;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::PublishError;
use super::acks::Verdict;
use super::sink::{Bucket, Replies, Sink};
use crate::headers::{self as names, Headers};
use crate::position::StreamSeq;

/// The subject of the foreign messages [`MemoryBroker::store_foreign`] stores.
pub(crate) const FOREIGN_SUBJECT: &str = "$KV.WALCAST_STATE.acme.task.1";

/// One stored message.
#[derive(Debug, Clone)]
pub(crate) struct Stored {
    pub subject: String,
    pub msg_id: String,
    pub tenant: Option<String>,
    pub seq: Option<u64>,
    pub payload: Bytes,
    pub stored_at: Instant,
}

/// What the broker holds: it outlives every walcast run.
#[derive(Debug)]
pub(crate) struct Broker {
    /// Message n (stream sequence) is `messages[n - 1]`.
    pub messages: Vec<Stored>,
    /// The duplicate window.
    pub window: Duration,
    /// Stream sequences deleted from the middle (still counted in `messages`).
    pub deleted: std::collections::BTreeSet<u64>,
    /// Connections so far (a disconnect opens a new one).
    connects: u64,
    /// Sends so far, over all runs (faults are placed on this count).
    sends: u64,
    /// The send with this number is refused.
    fail_at: Option<u64>,
    /// The connection drops at the send with this number: that message and
    /// every ack in flight are lost.
    disconnect_at: Option<u64>,
    /// Just before the send with this number, a message walcast did not
    /// publish is stored (a tenant's pull reply into the stream).
    foreign_at: Option<u64>,
}

/// A handle on the broker, shared by the test and the runs' sinks.
#[derive(Debug, Clone)]
pub(crate) struct MemoryBroker(Arc<Mutex<Broker>>);

impl MemoryBroker {
    pub fn new(window: Duration) -> Self {
        MemoryBroker(Arc::new(Mutex::new(Broker {
            messages: Vec::new(),
            window,
            deleted: Default::default(),
            connects: 1,
            sends: 0,
            fail_at: None,
            disconnect_at: None,
            foreign_at: None,
        })))
    }

    pub fn lock(&self) -> MutexGuard<'_, Broker> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The broker loses its last `n` (acknowledged) messages, as after an
    /// unclean restart with fsync lag; returns how many it lost.
    pub fn lose_last(&self, n: u64) -> u64 {
        let mut b = self.lock();
        let keep = b.messages.len().saturating_sub(n as usize);
        let lost = b.messages.len() - keep;
        b.messages.truncate(keep);
        b.deleted.retain(|s| *s <= keep as u64);
        lost as u64
    }

    /// Deletes message `seq` from the middle of the stream, as
    /// `$JS.API.STREAM.MSG.DELETE` does: its position stays taken.
    pub fn delete(&self, seq: u64) {
        self.lock().deleted.insert(seq);
    }

    /// Refuses the `n`-th send from now.
    pub fn fail_in(&self, n: u64) {
        let mut b = self.lock();
        b.fail_at = Some(b.sends + n.max(1));
    }

    /// Drops the connection at the `n`-th send from now.
    pub fn disconnect_in(&self, n: u64) {
        let mut b = self.lock();
        b.disconnect_at = Some(b.sends + n.max(1));
    }

    /// Stores a foreign message just before the `n`-th send from now.
    pub fn foreign_in(&self, n: u64) {
        let mut b = self.lock();
        b.foreign_at = Some(b.sends + n.max(1));
    }

    /// Stores a foreign message now (no `Nats-Msg-Id`): a copy of a
    /// tenant's state value, as a tenant user can make the server store.
    pub fn store_foreign(&self) {
        let mut b = self.lock();
        b.messages.push(Stored {
            subject: FOREIGN_SUBJECT.to_string(),
            msg_id: String::new(),
            tenant: None,
            seq: None,
            payload: Bytes::from_static(b"foreign"),
            stored_at: Instant::now(),
        });
    }

    /// Clears faults not yet reached.
    pub fn heal(&self) {
        let mut b = self.lock();
        b.fail_at = None;
        b.disconnect_at = None;
        b.foreign_at = None;
    }

    /// A sink on a new connection, for one run; acks take `latency`.
    pub fn connect(&self, latency: Duration) -> MemorySink {
        MemorySink {
            broker: self.clone(),
            latency,
            replies: Mutex::new(None),
        }
    }
}

impl Broker {
    fn last_seq(&self) -> StreamSeq {
        StreamSeq(self.messages.len() as u64)
    }

    /// JetStream's decision on one message: a duplicate id within the
    /// window is answered with the original's sequence, then the expected
    /// last sequence and the expected last id must match (a message without
    /// an id clears the last id), then the message is stored.
    fn store(
        &mut self,
        msg: Stored,
        expected_last: Option<StreamSeq>,
        expected_id: Option<&str>,
    ) -> Verdict {
        let now = msg.stored_at;
        if let Some(i) = self
            .messages
            .iter()
            .rposition(|m| m.msg_id == msg.msg_id && m.stored_at + self.window > now)
        {
            return Verdict::Stored {
                seq: StreamSeq(i as u64 + 1),
                duplicate: true,
            };
        }
        let last = self.last_seq();
        if let Some(expected) = expected_last
            && expected != last
        {
            return Verdict::WrongLast(format!("wrong last sequence: {last} (code 400)"));
        }
        let last_id = self.messages.last().map_or("", |m| m.msg_id.as_str());
        if let Some(id) = expected_id
            && id != last_id
        {
            return Verdict::Rejected(format!("wrong last msg ID: {last_id} (code 400)"));
        }
        self.messages.push(msg);
        Verdict::Stored {
            seq: last.next(),
            duplicate: false,
        }
    }
}

/// One run's connection to the broker.
pub(crate) struct MemorySink {
    broker: MemoryBroker,
    latency: Duration,
    /// Where this run's acks go, once it opened them.
    replies: Mutex<Option<mpsc::UnboundedSender<Reply>>>,
}

/// An ack on its way: when it arrives, on which connection, what it says.
type Reply = (Instant, u64, u64, Verdict);

/// The acks of one run.
pub(crate) struct MemoryReplies {
    broker: MemoryBroker,
    rx: mpsc::UnboundedReceiver<Reply>,
    due: VecDeque<Reply>,
}

impl MemorySink {
    /// Records the send and applies a fault that falls on it: `Err` if it
    /// is refused, `Ok(false)` if the connection dropped with it.
    fn fault(&self) -> Result<bool, String> {
        let mut b = self.broker.lock();
        b.sends += 1;
        if b.fail_at == Some(b.sends) {
            return Err("the connection refused the message (test fault)".into());
        }
        if b.disconnect_at == Some(b.sends) {
            b.connects += 1;
            return Ok(false);
        }
        if b.foreign_at == Some(b.sends) {
            drop(b);
            self.broker.store_foreign();
        }
        Ok(true)
    }
}

impl Sink for MemorySink {
    type Replies = MemoryReplies;

    async fn replies(&self) -> Result<MemoryReplies, PublishError> {
        let (tx, rx) = mpsc::unbounded_channel();
        *self.replies.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
        Ok(MemoryReplies {
            broker: self.broker.clone(),
            rx,
            due: VecDeque::new(),
        })
    }

    fn max_payload(&self) -> usize {
        1 << 20
    }

    async fn send(
        &self,
        subject: Subject,
        headers: &Headers<'_>,
        payload: Bytes,
        reply: Option<Subject>,
    ) -> Result<(), String> {
        if !self.fault()? {
            return Ok(()); // lost with the connection
        }
        let msg = Stored {
            subject: subject.to_string(),
            msg_id: (headers.text(names::MSG_ID).ok_or("no Nats-Msg-Id")?).to_string(),
            tenant: headers.text(names::TENANT).map(str::to_string),
            seq: headers.number(names::SEQ),
            payload,
            stored_at: Instant::now(),
        };
        let expected = headers.number(names::EXPECTED_LAST_SEQUENCE).map(StreamSeq);
        let expected_id = headers.text(names::EXPECTED_LAST_MSG_ID);
        let mut broker = self.broker.lock();
        let verdict = broker.store(msg, expected, expected_id);
        let replies = self.replies.lock().unwrap_or_else(|e| e.into_inner());
        if let (Some(reply), Some(tx)) = (reply, replies.as_ref()) {
            let token = reply.rsplit_once('.').and_then(|(_, t)| t.parse().ok());
            let at = Instant::now() + self.latency;
            let _ = tx.send((at, broker.connects, token.unwrap_or(0), verdict));
        }
        Ok(())
    }

    async fn put_object(
        &mut self,
        bucket: &Bucket,
        name: &str,
        _data: &[u8],
        _chunk_size: usize,
    ) -> Result<(), PublishError> {
        Err(PublishError::Nats(format!(
            "the memory sink has no object store ({}/{name})",
            bucket.name
        )))
    }

    async fn no_responders(&self, event_id: &str) -> PublishError {
        PublishError::Nats(format!("no responders for {event_id} (memory sink)"))
    }

    async fn last_seq(&self) -> Result<StreamSeq, PublishError> {
        Ok(self.broker.lock().last_seq())
    }

    async fn stored(
        &self,
        seq: StreamSeq,
    ) -> Result<Option<super::sink::StoredMessage>, PublishError> {
        let b = self.broker.lock();
        let Some(i) = seq.0.checked_sub(1).and_then(|i| usize::try_from(i).ok()) else {
            return Ok(None);
        };
        if b.deleted.contains(&seq.0) {
            return Ok(None);
        }
        Ok(b.messages.get(i).map(|m| super::sink::StoredMessage {
            subject: m.subject.clone(),
            msg_id: (!m.msg_id.is_empty()).then(|| m.msg_id.clone()),
            tenant: m.tenant.clone(),
            seq: m.seq,
        }))
    }

    async fn probes(
        &self,
        after: StreamSeq,
        through: StreamSeq,
    ) -> Result<Vec<(StreamSeq, super::sink::Probe)>, PublishError> {
        let mut out = Vec::new();
        for seq in after.0 + 1..=through.0 {
            match self.probe(StreamSeq(seq)).await? {
                super::sink::Probe::Missing => {}
                probe => out.push((StreamSeq(seq), probe)),
            }
        }
        Ok(out)
    }

    async fn holes(&self) -> Result<Vec<super::holes::Hole>, PublishError> {
        let b = self.broker.lock();
        let last = b.messages.len() as u64;
        Ok(super::holes::ranges(
            b.deleted.iter().copied().filter(|s| *s <= last).collect(),
        ))
    }
}

impl Replies for MemoryReplies {
    fn subject(&self, seq: StreamSeq) -> Subject {
        Subject::from(format!("ack.{seq}"))
    }

    fn connects(&self) -> u64 {
        self.broker.lock().connects
    }

    async fn next(&mut self) -> Option<(StreamSeq, Verdict)> {
        loop {
            while let Ok(reply) = self.rx.try_recv() {
                self.due.push_back(reply);
            }
            let Some(&(at, _, _, _)) = self.due.front() else {
                let reply = self.rx.recv().await?;
                self.due.push_back(reply);
                continue;
            };
            tokio::time::sleep_until(at).await;
            let (_, on, seq, verdict) = self.due.pop_front()?;
            if on == self.connects() {
                return Some((StreamSeq(seq), verdict));
            } // else: lost with the connection it was sent on
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(id: &str, expected_last: u64) -> Headers<'_> {
        let mut h = Headers::new();
        h.insert(names::MSG_ID, id);
        h.insert(names::EXPECTED_LAST_SEQUENCE, expected_last);
        h
    }

    /// Sends `id` expecting `last`, asking for its ack; returns the ack.
    async fn send(sink: &MemorySink, replies: &mut MemoryReplies, id: &str, last: u64) -> Verdict {
        let reply = Some(replies.subject(StreamSeq(last + 1)));
        let headers = headers(id, last);
        let sent = sink.send("s".into(), &headers, Bytes::new(), reply);
        sent.await.unwrap();
        replies.next().await.unwrap().1
    }

    #[tokio::test(start_paused = true)]
    async fn stores_like_jetstream_and_loses_its_tail() {
        let broker = MemoryBroker::new(Duration::from_secs(120));
        let sink = broker.connect(Duration::from_millis(5));
        let mut replies = sink.replies().await.unwrap();
        let stored = |seq, duplicate| Verdict::Stored {
            seq: StreamSeq(seq),
            duplicate,
        };
        assert_eq!(send(&sink, &mut replies, "a", 0).await, stored(1, false));
        assert_eq!(send(&sink, &mut replies, "b", 1).await, stored(2, false));
        // A duplicate id is answered with the original's sequence, whatever
        // it expected; a wrong expected last sequence is refused.
        assert_eq!(send(&sink, &mut replies, "a", 2).await, stored(1, true));
        let refused = Verdict::WrongLast("wrong last sequence: 2 (code 400)".into());
        assert_eq!(send(&sink, &mut replies, "c", 1).await, refused);
        assert_eq!(broker.lose_last(1), 1);
        assert_eq!(sink.last_seq().await.unwrap(), StreamSeq(1));
        assert_eq!(send(&sink, &mut replies, "b", 1).await, stored(2, false));
        assert_eq!(sink.message_id(StreamSeq(2)).await.as_deref(), Some("b"));
        // Past the window, an id is new again.
        tokio::time::sleep(Duration::from_secs(121)).await;
        assert_eq!(send(&sink, &mut replies, "a", 2).await, stored(3, false));
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_connection_loses_the_message_and_the_acks_in_flight() {
        let broker = MemoryBroker::new(Duration::from_secs(120));
        let sink = broker.connect(Duration::from_millis(5));
        let mut replies = sink.replies().await.unwrap();
        let reply = Some(replies.subject(StreamSeq(1)));
        sink.send("s".into(), &headers("a", 0), Bytes::new(), reply)
            .await
            .unwrap();
        broker.disconnect_in(1);
        let reply = Some(replies.subject(StreamSeq(2)));
        sink.send("s".into(), &headers("b", 1), Bytes::new(), reply)
            .await
            .unwrap();
        assert_eq!(replies.connects(), 2);
        assert_eq!(sink.last_seq().await.unwrap(), StreamSeq(1), "b was lost");
        let next = tokio::time::timeout(Duration::from_secs(1), replies.next()).await;
        assert!(next.is_err(), "a's ack was lost with the connection");
        broker.fail_in(1);
        let c = headers("c", 1);
        assert!(sink.send("s".into(), &c, Bytes::new(), None).await.is_err());
    }
}
