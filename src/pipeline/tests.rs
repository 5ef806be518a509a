//! In-process property tests of the one recovery path: the real reader
//! (assembler, event builder, skip of what the stream holds), publisher,
//! checkpointer and reconciliation, against the in-memory broker
//! (`publish::memory`) and checkpoint store (`checkpoint::memory`), on a
//! paused clock.
//!
//! A case is a random multi-tenant WAL and a list of interruptions: a
//! `kill -9` at a random instant (every task dropped mid-flight), a refused
//! send or a dropped connection at a random message; after each, sometimes
//! the broker loses its last acknowledged messages (SPEC §4.7). Only the
//! durable state survives an interruption: the broker's stream, the
//! checkpoint and the slot's confirmed LSN. Each run starts like
//! `prepare` (reconcile the checkpoint with the stream) and replays the
//! WAL from the slot.
//!
//! A foreign message (one walcast did not publish: a tenant's pull reply
//! into the stream's subjects) may land before a random send or between
//! runs, also in positions the broker just lost (where the process's last
//! acknowledged message was); it must be skipped, never taken for an event.
//!
//! Checked after every run: the stream, foreign messages left out, is a
//! prefix of the exact stream
//! (every event once, in commit order, each tenant's seqs 1..n); the
//! checkpoint counts exactly the events before its LSN, with each tenant's
//! last seq among them; the slot is never confirmed past the checkpoint.
//! After the last, uninterrupted run: the stream is the exact stream (so
//! republished losses carry their first ids and seqs). A run may stop with
//! the "broker lost checkpointed messages" error only when it did.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use prost::Message as _;
use tokio::sync::{mpsc, watch};

use super::drive::replayer;
use super::foreign::Foreign;
use super::prepare::{Names, reconcile};
use super::reader::{Reader, Skip};
use super::{BATCH, PipelineError};
use crate::catchup::segment::decode;
use crate::catchup::{Index, Journal};
use crate::checkpoint::Checkpointer;
use crate::checkpoint::memory::MemoryStore;
use crate::decode::{Begin, Commit, Message, Relation, Value, encode};
use crate::events::{Tables, event_id};
use crate::handoff::Item;
use crate::lsn::Lsn;
use crate::position::StreamSeq;
use crate::proto::ChangeEvent;
use crate::publish::acked::Acked;
use crate::publish::memory::MemoryBroker;
use crate::publish::oversized::Oversized;
use crate::publish::republish::Republish;
use crate::publish::{PublishError, Publisher, Sink};
use crate::source::SourceEvent;
use crate::telemetry::health::Health;

const STREAM: &str = "WALCAST";
const NAMES: Names<'static> = Names {
    slot: "walcast",
    stream: STREAM,
};

/// One committed transaction of the simulated WAL.
#[derive(Debug, Clone)]
struct Tx {
    /// Virtual milliseconds between the previous commit and this one.
    gap_ms: u64,
    /// Each row's tenant; `None` is an invalid tenant id (a dead letter).
    rows: Vec<Option<u8>>,
    /// An idle keepalive position follows it.
    keepalive: bool,
}

fn commit_lsn(i: usize) -> u64 {
    0x1000 * (i as u64 + 1)
}

fn end_lsn(i: usize) -> u64 {
    commit_lsn(i) + 0x10
}

/// An event of the exact stream.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expected {
    event_id: String,
    tenant: Option<String>,
    seq: Option<u64>,
    /// The end of its transaction (where a checkpoint may cover it).
    end_lsn: u64,
}

/// The exact stream the WAL must produce: every event once, in commit
/// order, each tenant numbered 1, 2, 3…
fn exact_stream(wal: &[Tx]) -> Vec<Expected> {
    let mut seqs: HashMap<String, u64> = HashMap::new();
    let mut out = Vec::new();
    for (i, tx) in wal.iter().enumerate() {
        for (j, row) in tx.rows.iter().enumerate() {
            let tenant = row.map(|t| format!("t{t}"));
            let seq = tenant.as_ref().map(|t| {
                let s = seqs.entry(t.clone()).or_default();
                *s += 1;
                *s
            });
            out.push(Expected {
                event_id: event_id(Lsn(commit_lsn(i)), j as u32),
                tenant,
                seq,
                end_lsn: end_lsn(i),
            });
        }
    }
    out
}

const TASK_COLUMNS: &[&str] = &["id", "tenant_id", "title", "status", "version"];

fn tasks() -> Relation {
    crate::events::tests::relation("tasks", TASK_COLUMNS)
}

/// What the walsender sends for transaction `i` (the Relation message
/// before the first change of a session).
fn source_events(i: usize, tx: &Tx, relation: bool) -> Vec<SourceEvent> {
    let (commit, time) = (commit_lsn(i), 1_000_000 * i as i64);
    let mut out = vec![SourceEvent::Begin(Begin {
        final_lsn: commit,
        commit_time: time,
        xid: i as u32 + 1,
    })];
    if relation {
        let bytes = encode::message(&Message::Relation(tasks()));
        out.push(SourceEvent::Data(Bytes::from(bytes)));
    }
    for (j, row) in tx.rows.iter().enumerate() {
        let id = format!("r{i}-{j}");
        let tenant = row.map_or("not a tenant!".to_string(), |t| format!("t{t}"));
        let values = [
            Value::Text(id.as_bytes()),
            Value::Text(tenant.as_bytes()),
            Value::Text(b"title"),
            Value::Text(b"todo"),
            Value::Text(b"1"),
        ];
        out.push(SourceEvent::Data(Bytes::from(encode::insert(1, &values))));
    }
    out.push(SourceEvent::Commit(Commit {
        flags: 0,
        commit_lsn: commit,
        end_lsn: end_lsn(i),
        commit_time: time,
    }));
    if tx.keepalive {
        out.push(SourceEvent::KeepAlive(Lsn(end_lsn(i) + 8)));
    }
    out
}

/// How a run (other than the last) ends.
#[derive(Debug, Clone)]
enum Stop {
    /// `kill -9` this many virtual milliseconds into the run.
    Crash(u64),
    /// The broker refuses the n-th message of the run.
    Refuse(u64),
    /// The connection drops at the n-th message of the run (it and the
    /// acks in flight are lost).
    Disconnect(u64),
    /// A foreign message lands just before the n-th message of the run.
    Foreign(u64),
}

/// What the broker loses after an interruption (an unclean restart with
/// fsync lag, SPEC §4.7).
#[derive(Debug, Clone)]
enum Loss {
    None,
    /// Its last n messages, but none the checkpoint counts: a loss younger
    /// than the confirm delay, which walcast must repair.
    Unconfirmed(u64),
    /// Its last n messages, whatever the checkpoint says: walcast must
    /// repair it or, if it reaches checkpointed messages, stop.
    Any(u64),
    /// One message from the middle, the k-th (modulo the stream's length):
    /// past the checkpoint walcast must stop (naming it), before it go on.
    Hole(u64),
    /// n foreign messages at the tail, while walcast is down.
    Foreign(u64),
    /// Its last n messages the checkpoint does not count, then n + 1
    /// foreign messages take their positions and one more: the process's
    /// last acknowledged position now holds a foreign message.
    Refilled(u64),
}

#[derive(Debug, Clone)]
struct Interruption {
    stop: Stop,
    loss: Loss,
}

#[derive(Debug, Clone)]
struct Case {
    wal: Vec<Tx>,
    interruptions: Vec<Interruption>,
    delay_ms: u64,
    ack_latency_ms: u64,
    /// How long a confirmation takes to reach the slot.
    feedback_ms: u64,
    max_in_flight: usize,
}

/// What outlives a run: the broker, the checkpoint, the slot.
struct World {
    expected: Vec<Expected>,
    broker: MemoryBroker,
    store: MemoryStore,
    /// The slot's confirmed flush LSN.
    confirmed: Arc<AtomicU64>,
    /// What the process saw acknowledged (lost with the process).
    process: Arc<Acked>,
    runs: u64,
    /// `--accept-holes-through`.
    accept_holes_through: u64,
    /// Saved catch-up positions that disagreed with the stream when handed
    /// over (they must hold only acknowledged, exact positions).
    saved_wrong: Vec<String>,
    /// The foreign messages recorded (`walcast.foreign_messages`).
    foreign: Foreign,
}

enum Outcome {
    Clean,
    Killed,
    Failed(PipelineError),
}

impl World {
    fn new(wal: &[Tx]) -> World {
        let store = MemoryStore::default();
        // `store::init` on an empty stream, before the first run.
        store.claim("init");
        World {
            expected: exact_stream(wal),
            broker: MemoryBroker::new(Duration::from_secs(120)),
            store,
            confirmed: Arc::default(),
            process: Arc::default(),
            runs: 0,
            accept_holes_through: 0,
            saved_wrong: Vec::new(),
            foreign: Foreign::default(),
        }
    }

    /// The durable state is consistent (see the module comment).
    fn check(&self) -> Result<(), String> {
        if let Some(wrong) = self.saved_wrong.first() {
            return Err(wrong.clone());
        }
        self.check_stream()?;
        self.check_checkpoint()
    }

    /// The stream, foreign messages left out, is a prefix of the exact
    /// stream.
    fn check_stream(&self) -> Result<(), String> {
        let broker = self.broker.lock();
        let own = broker.messages.iter().filter(|m| !m.msg_id.is_empty());
        for (i, got) in own.enumerate() {
            let want = self.expected.get(i).ok_or(format!(
                "stream message {} ({}) is past the last event",
                i + 1,
                got.msg_id
            ))?;
            // The body says the same as the headers (a republish rebuilds it).
            let body = ChangeEvent::decode(got.payload.clone()).map_err(|e| e.to_string())?;
            let in_body = (body.event_id == got.msg_id) && (body.seq == got.seq.unwrap_or(0));
            if !in_body
                || (&got.msg_id, &got.tenant, got.seq) != (&want.event_id, &want.tenant, want.seq)
            {
                return Err(format!(
                    "stream message {} is {} ({:?} seq {:?}), expected {} ({:?} seq {:?})",
                    i + 1,
                    got.msg_id,
                    got.tenant,
                    got.seq,
                    want.event_id,
                    want.tenant,
                    want.seq
                ));
            }
        }
        Ok(())
    }

    /// The checkpoint counts exactly the events before its LSN, and the
    /// slot is confirmed past it only over positions without events.
    fn check_checkpoint(&self) -> Result<(), String> {
        let row = self.store.snapshot();
        let covered: Vec<&Expected> = self
            .expected
            .iter()
            .filter(|e| e.end_lsn <= row.lsn.0)
            .collect();
        let foreign = self.foreign_through(row.stream_seq);
        if covered.len() as u64 + foreign != row.stream_seq {
            return Err(format!(
                "the checkpoint at {} says stream message {}, but {} events committed before it",
                row.lsn,
                row.stream_seq,
                covered.len()
            ));
        }
        let mut last = HashMap::new();
        for e in &covered {
            if let (Some(t), Some(s)) = (&e.tenant, e.seq) {
                last.insert(t.clone(), s);
            }
        }
        if last != row.tenants {
            return Err(format!(
                "the checkpoint at {} has tenant seqs {:?}, expected {last:?}",
                row.lsn, row.tenants
            ));
        }
        // Past the checkpoint, the slot may be confirmed only over positions
        // without events (keepalives, empty transactions).
        let confirmed = self.confirmed.load(Ordering::SeqCst);
        if let Some(e) = self
            .expected
            .iter()
            .find(|e| row.lsn.0 < e.end_lsn && e.end_lsn <= confirmed)
        {
            return Err(format!(
                "the slot was confirmed at {} past event {} (the checkpoint is at {})",
                Lsn(confirmed),
                e.event_id,
                row.lsn
            ));
        }
        Ok(())
    }

    /// How many foreign messages the stream holds up to `seq`.
    fn foreign_through(&self, seq: u64) -> u64 {
        let broker = self.broker.lock();
        let upto = broker.messages.len().min(seq as usize);
        broker.messages[..upto]
            .iter()
            .filter(|m| m.msg_id.is_empty())
            .count() as u64
    }

    fn lose(&self, loss: &Loss) {
        let n = match *loss {
            Loss::None => 0,
            Loss::Foreign(n) => {
                (0..n).for_each(|_| self.broker.store_foreign());
                0
            }
            Loss::Refilled(n) => {
                self.lose(&Loss::Unconfirmed(n));
                (0..=n).for_each(|_| self.broker.store_foreign());
                0
            }
            Loss::Unconfirmed(n) => {
                let len = self.broker.lock().messages.len() as u64;
                n.min(len.saturating_sub(self.store.snapshot().stream_seq))
            }
            Loss::Any(n) => n,
            Loss::Hole(k) => {
                // One of walcast's: a deleted foreign message lost no event.
                let own: Vec<u64> = (self.broker.lock().messages.iter().enumerate())
                    .filter(|(_, m)| !m.msg_id.is_empty())
                    .map(|(i, _)| i as u64 + 1)
                    .collect();
                if !own.is_empty() {
                    self.broker.delete(own[(k % own.len() as u64) as usize]);
                }
                0
            }
        };
        self.broker.lose_last(n);
    }

    /// Whether a message is missing from the middle of the stream past the
    /// checkpoint: the slot still holds it, but it cannot go back in place,
    /// so the next run must stop.
    fn hole_past_checkpoint(&self) -> bool {
        let checkpoint = self.store.snapshot().stream_seq;
        self.broker.lock().deleted.iter().any(|s| *s > checkpoint)
    }

    /// Whether the broker lost messages the checkpoint counts (the one case
    /// where stopping is right: the slot no longer has their WAL).
    fn lost_checkpointed(&self) -> bool {
        (self.broker.lock().messages.len() as u64) < self.store.snapshot().stream_seq
    }
}

/// Feeds the WAL from the slot's confirmed position through the reader, in
/// batches as `read_batch` would; then stops reading (`last`) or idles
/// until the publisher stops.
async fn feed(
    wal: &[Tx],
    from: u64,
    mut reader: Reader<'_>,
    items: mpsc::Sender<Vec<Item>>,
    last: bool,
) -> Result<(), PipelineError> {
    let mut out = Vec::new();
    let mut relation = true;
    for (i, tx) in wal.iter().enumerate() {
        // The slot decodes only transactions that commit at or after it.
        if commit_lsn(i) < from {
            continue;
        }
        if tx.gap_ms > 0 || out.len() >= BATCH {
            if !out.is_empty() && items.send(std::mem::take(&mut out)).await.is_err() {
                return Ok(()); // the publisher stopped: its error says why
            }
            tokio::time::sleep(Duration::from_millis(tx.gap_ms)).await;
        }
        for event in source_events(i, tx, relation) {
            reader.handle(event, &mut out)?;
        }
        relation = false;
    }
    if !out.is_empty() && items.send(out).await.is_err() {
        return Ok(());
    }
    if !last {
        items.closed().await;
    }
    Ok(())
}

/// One run, like `prepare` then `drive`; `limit` kills it (virtual time).
async fn run(w: &mut World, c: &Case, last: bool, limit: Duration) -> Outcome {
    w.runs += 1;
    let sink = w.broker.connect(Duration::from_millis(c.ack_latency_ms));
    let last_seq = sink.last_seq().await.unwrap_or_default();
    let checkpoint = w.store.checkpoint(STREAM);
    let owner = format!("run {}", w.runs);
    w.store.claim(&owner);
    let reconciled = match reconcile(
        &sink,
        NAMES,
        &checkpoint,
        last_seq,
        &w.foreign,
        &w.process,
        StreamSeq(w.accept_holes_through),
    )
    .await
    {
        Ok(r) => r,
        Err(e) => return Outcome::Failed(e),
    };
    // As `foreign::update` records them.
    let recorded = w.foreign.union(&reconciled.found_foreign);
    w.foreign = recorded.within(checkpoint.stream_seq, last_seq);
    let confirmed = w.confirmed.load(Ordering::SeqCst);
    let start = checkpoint.lsn.0.max(confirmed);
    let mut assembler = replayer("walcast", Tables::default(), &checkpoint);
    let reader = Reader {
        assembler: &mut assembler,
        skip: Skip::after(&checkpoint, &reconciled),
        last_boundary: Lsn(start),
    };
    let (saved_tx, mut saved_rx) = mpsc::channel(1024);
    let publisher = Publisher {
        sink,
        max_in_flight: c.max_in_flight,
        oversized: Oversized::new(STREAM, Duration::from_secs(60), 1),
        index: Index::default(),
        journal: Some(
            Journal::new(checkpoint.stream_seq.min(last_seq).next(), saved_tx).cutting_every(3),
        ),
        acked: w.process.clone(),
        feed: None,
        republish: Republish::below(reconciled.acked_high),
    };
    let checkpointer = Checkpointer {
        store: w.store.clone(),
        slot: NAMES.slot.into(),
        owner,
        delay: Duration::from_millis(c.delay_ms),
        health: Arc::new(Health::default()),
    };
    let (items_tx, items_rx) = mpsc::channel(64);
    let (segments_tx, segments_rx) = mpsc::channel(1024);
    let (confirm_tx, mut confirms) = watch::channel(Lsn(start));
    let slot = w.confirmed.clone();
    let feedback = Duration::from_millis(c.feedback_ms);
    let stages = async {
        let observe = async {
            while confirms.changed().await.is_ok() {
                tokio::time::sleep(feedback).await;
                slot.store(confirms.borrow_and_update().0, Ordering::SeqCst);
            }
        };
        let (fed, published, checkpointed, ()) = tokio::join!(
            feed(&c.wal, confirmed, reader, items_tx, last),
            publisher.run(items_rx, segments_tx, reconciled.tail),
            checkpointer.run(checkpoint, segments_rx, confirm_tx),
            observe,
        );
        // The root cause first, as `drive::finish` reports it.
        let downstream = matches!(published, Err(PublishError::Downstream));
        match (fed, published, checkpointed) {
            (Err(e), _, _) => Outcome::Failed(e),
            (_, Err(e), _) if !downstream => Outcome::Failed(e.into()),
            (_, _, Err(e)) => Outcome::Failed(e.into()),
            (_, Err(e), _) => Outcome::Failed(e.into()),
            _ => Outcome::Clean,
        }
    };
    let outcome = tokio::time::timeout(limit, stages)
        .await
        .unwrap_or(Outcome::Killed);
    // Every position handed over to be saved is in the stream as said.
    let broker = w.broker.lock();
    while let Ok(segment) = saved_rx.try_recv() {
        let decoded = decode(&segment.data, |tenant, seq, at| {
            let stored = broker.messages.get(at.0 as usize - 1);
            if stored.is_none_or(|m| m.tenant.as_deref() != Some(tenant) || m.seq != Some(seq.0)) {
                w.saved_wrong.push(format!(
                    "run {}: a saved segment says {tenant} seq {seq} is at {at}, the stream holds {:?}",
                    w.runs,
                    stored.map(|m| (&m.tenant, m.seq))
                ));
            }
        });
        if let Err(e) = decoded {
            w.saved_wrong.push(format!("run {}: {e}", w.runs));
        }
    }
    drop(broker);
    outcome
}

/// Runs a case; returns the first violated property.
async fn case(c: Case) -> Result<(), String> {
    let mut w = World::new(&c.wal);
    for (k, interruption) in c.interruptions.iter().enumerate() {
        let limit = match interruption.stop {
            Stop::Crash(ms) => Duration::from_millis(ms),
            Stop::Refuse(n) => {
                w.broker.fail_in(n);
                Duration::from_secs(60)
            }
            Stop::Disconnect(n) => {
                w.broker.disconnect_in(n);
                Duration::from_secs(60)
            }
            Stop::Foreign(n) => {
                w.broker.foreign_in(n);
                Duration::from_secs(60)
            }
        };
        let must_stop = w.hole_past_checkpoint();
        let outcome = run(&mut w, &c, false, limit).await;
        w.broker.heal();
        if must_stop && matches!(outcome, Outcome::Clean | Outcome::Failed(_)) {
            return match outcome {
                Outcome::Failed(e) if fatal(&e) => stopped_rightly(&w, e),
                _ => Err(format!("run {k} went on past a hole the slot still holds")),
            };
        }
        match outcome {
            // kill -9: the process's memory is gone.
            Outcome::Killed => w.process = Arc::default(),
            Outcome::Failed(e) if fatal(&e) => return stopped_rightly(&w, e),
            Outcome::Failed(_) | Outcome::Clean => {}
        }
        w.check()
            .map_err(|e| format!("after interruption {k}: {e}"))?;
        w.lose(&interruption.loss);
    }
    let must_stop = w.hole_past_checkpoint();
    match run(&mut w, &c, true, Duration::from_secs(3600)).await {
        Outcome::Clean if must_stop => {
            return Err("the last run went on past a hole the slot still holds".into());
        }
        Outcome::Clean => {}
        Outcome::Failed(e) if fatal(&e) => return stopped_rightly(&w, e),
        Outcome::Failed(e) => return Err(format!("the last run failed: {e}")),
        Outcome::Killed => return Err("the last run did not finish".into()),
    }
    w.check().map_err(|e| format!("after the last run: {e}"))?;
    let stored = w.broker.lock().messages.len();
    let len = stored - w.foreign_through(u64::MAX) as usize;
    if len != w.expected.len() {
        return Err(format!(
            "the stream ends at message {len}, the WAL has {} events",
            w.expected.len()
        ));
    }
    Ok(())
}

/// A stop: fatal, or events lost in holes (which `retention::judge`, not
/// run here, turns into a stop unless each tenant lost only its oldest).
fn fatal(e: &PipelineError) -> bool {
    matches!(
        e,
        PipelineError::Fatal(_)
            | PipelineError::Publish(crate::publish::PublishError::LostInHoles(_))
    )
}

/// A run that stops for good is right only if the broker lost messages
/// the checkpoint counts, or a message is missing from the middle past the
/// checkpoint (and the error names it).
fn stopped_rightly(w: &World, e: PipelineError) -> Result<(), String> {
    let names_hole = || {
        let deleted = w.broker.lock().deleted.clone();
        let text = e.to_string();
        text.contains("from its middle")
            && deleted
                .iter()
                .filter(|s| **s > w.store.snapshot().stream_seq)
                .all(|s| text.contains(&s.to_string()))
    };
    if w.lost_checkpointed() || (w.hole_past_checkpoint() && names_hole()) {
        Ok(())
    } else {
        Err(format!("stopped, but nothing was lost for good: {e}"))
    }
}

fn tx() -> impl Strategy<Value = Tx> {
    let row = prop::option::weighted(0.95, 0u8..4);
    (
        prop_oneof![3 => Just(0u64), 2 => 1u64..60],
        prop::collection::vec(row, 0..6),
        prop::bool::weighted(0.2),
    )
        .prop_map(|(gap_ms, rows, keepalive)| Tx {
            gap_ms,
            rows,
            keepalive,
        })
}

fn interruption() -> impl Strategy<Value = Interruption> {
    let stop = prop_oneof![
        3 => (0u64..2_500).prop_map(Stop::Crash),
        1 => (1u64..60).prop_map(Stop::Refuse),
        1 => (1u64..60).prop_map(Stop::Disconnect),
        1 => (1u64..60).prop_map(Stop::Foreign),
    ];
    let loss = prop_oneof![
        3 => Just(Loss::None),
        3 => (1u64..30).prop_map(Loss::Unconfirmed),
        1 => (1u64..8).prop_map(Loss::Any),
        1 => (0u64..1_000).prop_map(Loss::Hole),
        1 => (1u64..4).prop_map(Loss::Foreign),
        1 => (1u64..8).prop_map(Loss::Refilled),
    ];
    (stop, loss).prop_map(|(stop, loss)| Interruption { stop, loss })
}

fn workload() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec(tx(), 1..40),
        prop::collection::vec(interruption(), 0..5),
        prop_oneof![Just(0u64), 1u64..1_500],
        (0u64..40, prop_oneof![Just(0u64), 1u64..300]),
        prop_oneof![Just(1usize), 2usize..8, Just(1024)],
    )
        .prop_map(
            |(wal, interruptions, delay_ms, (ack_latency_ms, feedback_ms), max_in_flight)| Case {
                wal,
                interruptions,
                delay_ms,
                ack_latency_ms,
                feedback_ms,
                max_in_flight,
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn crashes_losses_and_restarts_keep_the_exact_stream(c in workload()) {
        let outcome = crate::checkpoint::tests::paused_runtime().block_on(case(c));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}

/// Two tenants' rows per transaction: message 2i+1 is tenant `t{i%2}`,
/// message 2i+2 tenant `t2`.
fn two_rows_each(n: usize) -> Case {
    Case {
        wal: (0..n)
            .map(|i| Tx {
                gap_ms: 1,
                rows: vec![Some((i % 2) as u8), Some(2)],
                keepalive: false,
            })
            .collect(),
        interruptions: Vec::new(),
        delay_ms: 0,
        ack_latency_ms: 1,
        feedback_ms: 0,
        max_in_flight: 1024,
    }
}

/// `two_rows_each(n)` published by a clean first run, nothing checkpointed
/// (all within the confirm window).
async fn published_unconfirmed(n: usize) -> (Case, World) {
    let mut c = two_rows_each(n);
    c.delay_ms = 3_600_000;
    let mut w = World::new(&c.wal);
    let first = run(&mut w, &c, true, Duration::from_secs(60)).await;
    assert!(matches!(first, Outcome::Clean));
    (c, w)
}

/// Issue 19 item 4: messages deleted from the middle of the stream past
/// the checkpoint (the slot still holds them). The next run names the lost
/// events' tenants and seqs and stops, publishing nothing; accepted
/// (`--accept-holes-through`), it goes on.
#[test]
fn a_hole_past_the_checkpoint_stops_naming_tenants_and_seqs() {
    crate::checkpoint::tests::paused_runtime().block_on(async {
        let (c, mut w) = published_unconfirmed(6).await;
        assert_eq!(w.broker.lock().messages.len(), 12);
        w.broker.delete(2); // t2 seq 1
        w.broker.delete(4); // t2 seq 2
        w.broker.delete(5); // t0 seq 2
        let Outcome::Failed(e) = run(&mut w, &c, true, Duration::from_secs(60)).await else {
            panic!("a run past a hole must stop");
        };
        let text = e.to_string();
        assert!(fatal(&e), "{text}");
        assert!(text.contains("missing messages 2..=2, 4..=5"), "{text}");
        assert!(
            text.contains("3 events, tenant t0 seq 2..=2, tenant t2 seq 1..=2"),
            "{text}"
        );
        assert!(text.contains("--accept-holes-through 5"), "{text}");
        assert_eq!(w.broker.lock().messages.len(), 12, "nothing published");

        w.accept_holes_through = 5;
        let accepted = run(&mut w, &c, true, Duration::from_secs(60)).await;
        assert!(matches!(accepted, Outcome::Clean));
        assert_eq!(w.broker.lock().messages.len(), 12, "nothing republished");
    });
}

/// A hole before the checkpoint (the slot no longer holds it) is reported,
/// and the run goes on.
#[test]
fn a_hole_before_the_checkpoint_does_not_stop_the_run() {
    crate::checkpoint::tests::paused_runtime().block_on(async {
        let mut c = two_rows_each(6);
        let mut w = World::new(&c.wal);
        assert!(matches!(
            run(&mut w, &c, true, Duration::from_secs(60)).await,
            Outcome::Clean
        ));
        assert_eq!(w.store.checkpoint(STREAM).stream_seq, StreamSeq(12));
        w.broker.delete(4);
        c.wal.extend(two_rows_each(2).wal);
        w.expected = exact_stream(&c.wal);
        let again = run(&mut w, &c, true, Duration::from_secs(60)).await;
        assert!(matches!(again, Outcome::Clean));
        assert_eq!(w.broker.lock().messages.len(), 16, "new events published");
    });
}

/// A run reads the stream for foreign messages from its process's last
/// acknowledged message only if the stream still holds that very message.
/// Here the broker lost it, the next run of the process ended before any
/// acknowledgement (so the process still remembers it), and foreign
/// messages took the lost positions: the run after must find them, not
/// count them as events already published.
#[test]
fn foreign_messages_in_a_lost_tail_are_found() {
    crate::checkpoint::tests::paused_runtime().block_on(async {
        let (c, mut w) = published_unconfirmed(10).await;
        let tail = w.process.own_tail().expect("an own tail");
        assert_eq!(tail.seq, StreamSeq(20));
        w.lose(&Loss::Unconfirmed(5));
        w.broker.fail_in(1);
        let refused = run(&mut w, &c, true, Duration::from_secs(60)).await;
        assert!(matches!(refused, Outcome::Failed(_)));
        w.broker.heal();
        assert_eq!(w.process.own_tail(), Some(tail), "no ack since");
        w.lose(&Loss::Foreign(6));
        assert_eq!(w.broker.lock().messages.len(), 21);
        let last = run(&mut w, &c, true, Duration::from_secs(60)).await;
        assert!(matches!(last, Outcome::Clean));
        w.check().unwrap();
        assert_eq!(w.foreign.count(), 6, "{:?}", w.foreign);
        let stored = w.broker.lock().messages.len();
        assert_eq!(stored - 6, w.expected.len(), "every event once");
    });
}

/// A recorded foreign message the broker lost, with messages of walcast's
/// before it, and new foreign messages in their positions: a new process
/// must read them all again (from the checkpoint), not only past the
/// recorded one, which no longer says what is before it.
#[test]
fn foreign_messages_refilling_a_recorded_ones_loss_are_found() {
    let mut c = two_rows_each(20);
    c.max_in_flight = 1;
    let stop = |stop, loss| Interruption { stop, loss };
    c.interruptions = vec![
        stop(Stop::Foreign(32), Loss::None),
        stop(Stop::Crash(0), Loss::Refilled(7)),
    ];
    let outcome = crate::checkpoint::tests::paused_runtime().block_on(case(c));
    assert_eq!(outcome, Ok(()));
}

/// The counters shown at 0 from the start are the ones the pipeline's own
/// errors increment.
#[test]
fn every_pipeline_stage_is_among_the_stages_shown_from_the_start() {
    use crate::assemble::AssembleError;
    use crate::database::DbError;
    use crate::decode::DecodeError;
    use crate::publish::PublishError;
    use crate::source::SourceError;
    let errors: [PipelineError; 5] = [
        DbError::NoPrimary("db".into()).into(),
        SourceError::Replication("cut".into()).into(),
        PublishError::Nats("down".into()).into(),
        AssembleError::UnknownRelation(7).into(),
        DecodeError::Empty.into(),
    ];
    let stages: Vec<&str> = errors.iter().map(PipelineError::stage).collect();
    assert_eq!(stages, PipelineError::STAGES);
}
