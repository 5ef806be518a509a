//! Messages in the stream that walcast did not publish ("foreign").
//!
//! The nats-server lets a user that may read a stream write copies of its
//! messages anywhere in its account: a pull request's reply subject and a
//! push consumer's deliver subject are not checked against the user's
//! permissions (nats-server issue 8274). A tenant user of the auth callout
//! (SPEC §9) may pull from its own consumers, so it can make the server
//! store copies of its events, or of its state values, in the stream
//! (README "Tenant isolation at the broker"). An operator publishing by
//! hand into `<prefix>.>` does the same.
//!
//! Such a message takes a stream position. Walcast's publish chain
//! (`Nats-Expected-Last-Msg-Id`, `publish`) makes every later publish of
//! the run fail, so foreign messages only ever sit after the last message
//! of a run and before the first of the next. Each run, before it
//! publishes, reads the messages after the last one it knows to be its own
//! ([`scan`]) and records the foreign ones' positions in
//! `walcast.foreign_messages` (migration 0008), so that this run and every
//! later one skips them when it counts what the stream already holds past
//! the checkpoint (`prepare::reconcile`, `reader::Skip`), until the
//! checkpoint passes them.

use tokio_postgres::Client;

use crate::checkpoint::Checkpoint;
use crate::database::{DbError, query_err};
use crate::events::OwnIds;
use crate::position::StreamSeq;
use crate::publish::Sink;
use crate::publish::acked::Acked;
use crate::publish::holes::Hole;

/// Positions of foreign messages: inclusive ranges, sorted and disjoint.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Foreign(Vec<(StreamSeq, StreamSeq)>);

impl Foreign {
    pub fn from_ranges(mut ranges: Vec<(StreamSeq, StreamSeq)>) -> Foreign {
        ranges.retain(|(a, b)| a <= b);
        ranges.sort();
        let mut merged: Vec<(StreamSeq, StreamSeq)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a.0 <= last.1.0 + 1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        Foreign(merged)
    }

    /// The positions in `after + 1 ..= through`.
    pub fn within(&self, after: StreamSeq, through: StreamSeq) -> Foreign {
        Foreign::from_ranges(
            self.0
                .iter()
                .map(|&(a, b)| (a.max(after.next()), b.min(through)))
                .collect(),
        )
    }

    /// How many positions there are.
    pub fn count(&self) -> u64 {
        self.0.iter().map(|(a, b)| b.0 - a.0 + 1).sum()
    }

    /// The range holding `seq`, if it is foreign.
    fn holding(&self, seq: StreamSeq) -> Option<(StreamSeq, StreamSeq)> {
        self.0.iter().copied().find(|(a, b)| *a <= seq && seq <= *b)
    }

    /// `seq`, or the first position after the range holding it.
    pub fn skip(&self, seq: StreamSeq) -> StreamSeq {
        self.holding(seq).map_or(seq, |(_, b)| b.next())
    }

    /// The last position in `after + 1 ..= through` that is not foreign.
    pub fn last_outside(&self, after: StreamSeq, through: StreamSeq) -> Option<StreamSeq> {
        let mut p = through;
        for (a, b) in self.0.iter().rev() {
            if *a <= p && p <= *b {
                p = a.prev();
            }
        }
        (p > after).then_some(p)
    }

    /// Whether `seq` is foreign.
    pub fn contains(&self, seq: StreamSeq) -> bool {
        self.holding(seq).is_some()
    }

    /// These positions and those of `other`.
    pub fn union(&self, other: &Foreign) -> Foreign {
        Foreign::from_ranges(self.0.iter().chain(&other.0).copied().collect())
    }

    /// The ranges, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (StreamSeq, StreamSeq)> + '_ {
        self.0.iter().copied()
    }

    /// Whether every position of `hole` is foreign (deleted foreign
    /// messages lost no event).
    pub fn covers(&self, hole: &Hole) -> bool {
        self.0
            .iter()
            .any(|(a, b)| *a <= hole.first && hole.last <= *b)
    }
}

impl std::fmt::Display for Foreign {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (a, b)) in self.0.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            match a == b {
                true => write!(f, "{sep}{a}")?,
                false => write!(f, "{sep}{a}..={b}")?,
            }
        }
        Ok(())
    }
}

/// How far this process knows the stream: to its own tail (the last of its
/// publishes acknowledged, `publish::acked`) if the stream still holds that
/// very message there. Every position up to it was then published by this
/// process under the publish chain, or read by one of its runs before it
/// published (the foreign messages found recorded). Not from the highest
/// position acknowledged alone: a broker that lost its tail may hold
/// anything there now. But not that message: lost, it is gone from the
/// stream, and no copy of it can take its place (a copy is made from what
/// the stream holds); only walcast puts it back, republishing from the
/// checkpoint after reading the stream from there.
pub async fn own_tail(sink: &impl Sink, acked: &Acked, last_seq: StreamSeq) -> Option<StreamSeq> {
    let tail = acked.own_tail().filter(|t| t.seq <= last_seq)?;
    let held = sink.message_id(tail.seq).await?;
    (held == tail.event_id).then_some(tail.seq)
}

/// The foreign messages not in `known`: positions after the checkpoint's,
/// or after this process's verified `own_tail`, up to `last_seq`. One
/// headers-only read of what the stream holds past there: after a
/// restart, about `--confirm-delay` of events; after a run of this process
/// ended, what landed after its last acknowledged message (the foreign
/// message that ended it, say). Not from the last `known` one: a broker
/// that lost it and messages before it may hold new foreign messages
/// there now, which no record names.
///
/// A copy is of a message already in the stream, so its event id (if any)
/// is at most the highest walcast had published before it: walcast's own
/// messages are exactly those whose event id is higher than every one
/// before them (the first after the checkpoint's position: at or after its
/// LSN). Reading from there, each message is judged by that running
/// maximum; a missing position (a hole) is left to the hole checks.
pub async fn scan(
    sink: &impl Sink,
    checkpoint: &Checkpoint,
    known: &Foreign,
    own_tail: Option<StreamSeq>,
    last_seq: StreamSeq,
) -> Result<Foreign, crate::publish::PublishError> {
    let from = (checkpoint.stream_seq).max(own_tail.unwrap_or_default());
    if from >= last_seq {
        return Ok(Foreign::default());
    }
    tracing::info!(
        from = from.next().0,
        through = last_seq.0,
        messages = last_seq - from,
        past_checkpoint = last_seq - checkpoint.stream_seq,
        after_own_tail = own_tail == Some(from),
        "reading the stream's headers for messages walcast did not publish"
    );
    // From the last message of walcast's at or before `from`, else from
    // the checkpoint's LSN as a floor.
    let mut highest = None;
    if let Some(own) = known.last_outside(StreamSeq(0), from) {
        highest = sink.probe(own).await?.id();
    }
    let mut own = OwnIds::after(highest, (checkpoint.lsn, 0));
    let mut found = Vec::new();
    for (seq, probe) in sink.probes(from, last_seq).await? {
        if !own.admits(probe.id()) && !known.contains(seq) {
            found.push((seq, seq));
        }
    }
    Ok(Foreign::from_ranges(found))
}

/// How many foreign messages' subjects a report names.
const SUBJECTS_REPORTED: usize = 3;

/// The subjects of the first message of the first few ranges of `found`,
/// for the WARN: a copy keeps the subject of what it copies
/// (`walcast.<tenant>.…` or `$KV.<bucket>.<tenant>.…`), and a tenant user
/// can only copy its own tenant's messages.
pub async fn subjects(sink: &impl Sink, found: &Foreign) -> String {
    let mut named = Vec::new();
    for (first, _) in found.ranges().take(SUBJECTS_REPORTED) {
        named.push(
            sink.subject_at(first)
                .await
                .unwrap_or_else(|| "(gone)".into()),
        );
    }
    if found.ranges().count() > SUBJECTS_REPORTED {
        named.push("…".into());
    }
    named.join(", ")
}

const MISSING_TABLE: &str = "walcast.foreign_messages does not exist: run `walcast migrate` (migration 0008) so walcast can record the positions of messages it did not publish";

/// The foreign messages recorded for `slot` (none if the table is missing:
/// a deployment not migrated yet, until it needs one).
pub async fn load(client: &Client, slot: &str) -> Result<Foreign, DbError> {
    let rows = match client
        .query(
            "SELECT first_seq, last_seq FROM walcast.foreign_messages WHERE slot = $1",
            &[&slot],
        )
        .await
    {
        Ok(rows) => rows,
        Err(e) if e.code().map(|c| c.code()) == Some("42P01") => {
            tracing::debug!("{MISSING_TABLE}");
            return Ok(Foreign::default());
        }
        Err(e) => return Err(query_err("read walcast.foreign_messages")(e)),
    };
    let seq = |r: &tokio_postgres::Row, i| StreamSeq(r.get::<_, i64>(i) as u64);
    Ok(Foreign::from_ranges(
        rows.iter().map(|r| (seq(r, 0), seq(r, 1))).collect(),
    ))
}

/// Brings the record of `slot` up to date before a run publishes: adds
/// `found` (the foreign messages at the tail), forgets the ranges the
/// checkpoint (`stream_seq`) has passed, and cuts those past the stream's
/// end (`last_seq`: a broker that lost its tail reuses those positions,
/// walcast's next events will be there).
pub async fn update(
    client: &Client,
    slot: &str,
    found: &Foreign,
    stream_seq: StreamSeq,
    last_seq: StreamSeq,
) -> Result<(), DbError> {
    let failed = |e: tokio_postgres::Error| match e.code().map(|c| c.code()) {
        Some("42P01") if found.count() == 0 => None,
        Some("42P01") => Some(DbError::Precondition(MISSING_TABLE.into())),
        _ => Some(query_err("write walcast.foreign_messages")(e)),
    };
    for (first, last) in found.ranges() {
        let inserted = client
            .execute(
                "INSERT INTO walcast.foreign_messages (slot, first_seq, last_seq) VALUES ($1, $2, $3)
                 ON CONFLICT (slot, first_seq) DO UPDATE SET last_seq = greatest(walcast.foreign_messages.last_seq, EXCLUDED.last_seq)",
                &[&slot, &(first.0 as i64), &(last.0 as i64)],
            )
            .await;
        if let Err(e) = inserted {
            return failed(e).map_or(Ok(()), Err);
        }
    }
    let (passed, end) = (stream_seq.0 as i64, last_seq.0 as i64);
    let forgotten = client
        .execute(
            "DELETE FROM walcast.foreign_messages WHERE slot = $1 AND (last_seq <= $2 OR first_seq > $3)",
            &[&slot, &passed, &end],
        )
        .await;
    let cut = match forgotten {
        Ok(_) => {
            client
                .execute(
                    "UPDATE walcast.foreign_messages SET last_seq = $2 WHERE slot = $1 AND last_seq > $2",
                    &[&slot, &end],
                )
                .await
        }
        Err(e) => Err(e),
    };
    if let Err(e) = cut {
        return failed(e).map_or(Ok(()), Err);
    }
    Ok(())
}

/// Forgets what was recorded for `slot` (a new checkpoint starts).
pub async fn forget(client: &Client, slot: &str) -> Result<(), DbError> {
    match client
        .execute(
            "DELETE FROM walcast.foreign_messages WHERE slot = $1",
            &[&slot],
        )
        .await
    {
        Err(e) if e.code().map(|c| c.code()) != Some("42P01") => {
            Err(query_err("clear walcast.foreign_messages")(e))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(ranges: &[(u64, u64)]) -> Foreign {
        Foreign::from_ranges(
            ranges
                .iter()
                .map(|&(a, b)| (StreamSeq(a), StreamSeq(b)))
                .collect(),
        )
    }

    #[test]
    fn ranges_merge_count_clip_and_skip() {
        let foreign = f(&[(10, 12), (5, 5), (13, 14), (20, 21)]);
        assert_eq!(foreign, f(&[(5, 5), (10, 14), (20, 21)]));
        assert_eq!(foreign.count(), 8);
        assert_eq!(foreign.to_string(), "5, 10..=14, 20..=21");
        assert_eq!(
            foreign.within(StreamSeq(11), StreamSeq(20)),
            f(&[(12, 14), (20, 20)])
        );
        assert_eq!(foreign.skip(StreamSeq(4)), StreamSeq(4));
        assert_eq!(foreign.skip(StreamSeq(10)), StreamSeq(15));
        assert_eq!(foreign.skip(StreamSeq(21)), StreamSeq(22));
        assert_eq!(
            foreign.last_outside(StreamSeq(0), StreamSeq(21)),
            Some(StreamSeq(19))
        );
        assert_eq!(
            foreign.last_outside(StreamSeq(0), StreamSeq(14)),
            Some(StreamSeq(9))
        );
        assert_eq!(foreign.last_outside(StreamSeq(9), StreamSeq(14)), None);
        assert_eq!(
            foreign.last_outside(StreamSeq(0), StreamSeq(5)),
            Some(StreamSeq(4))
        );
        let hole = |a, b| Hole {
            first: StreamSeq(a),
            last: StreamSeq(b),
        };
        assert!(foreign.covers(&hole(11, 13)));
        assert!(!foreign.covers(&hole(14, 15)));
        assert_eq!(f(&[]).within(StreamSeq(0), StreamSeq(9)), f(&[]));
    }

    #[tokio::test]
    async fn a_report_names_the_subjects_of_the_first_ranges() {
        use crate::publish::memory::{FOREIGN_SUBJECT, MemoryBroker};
        let broker = MemoryBroker::new(std::time::Duration::from_secs(120));
        (0..5).for_each(|_| broker.store_foreign());
        let sink = broker.connect(std::time::Duration::ZERO);
        let one = subjects(&sink, &f(&[(2, 3)])).await;
        assert_eq!(one, FOREIGN_SUBJECT);
        let many = subjects(&sink, &f(&[(1, 1), (3, 3), (5, 5), (9, 9)])).await;
        let s = FOREIGN_SUBJECT;
        assert_eq!(many, format!("{s}, {s}, {s}, …"));
        assert_eq!(subjects(&sink, &f(&[(9, 9)])).await, "(gone)");
    }
}
