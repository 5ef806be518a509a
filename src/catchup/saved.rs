//! Saved segments in `walcast.catchup_segments` (migration 0007): what lets
//! a restart load the exact positions of recent events in a few seconds
//! instead of reading the stream back (SPEC §6 "Restart").
//!
//! Why Postgres: the table sits beside the checkpoint it complements, is
//! read with one indexed query per segment, and retention and overlap rules
//! are single statements. A JetStream KV or object store would live on the
//! broker whose losses (SPEC §4.7) the segments must survive being wrong
//! about, and would add a stream to operate.
//!
//! Rules that keep a segment from ever giving a wrong answer:
//! - segments hold only acknowledged positions (`journal`);
//! - writing `[s, e]` first deletes the segments starting at or after `s` and
//!   cuts the ones reaching past `s` down to `s - 1`, and a run's first write
//!   does so from the first stream sequence the run records: after a broker
//!   lost messages and the run republished after the stream's tail, no old
//!   segment covers a reused stream sequence;
//! - a restart loads only positions at or below what it reads back from the
//!   stream anyway (`min(checkpoint, stream's last_seq)`) and at or above the
//!   stream's `first_seq`, and trusts them only once the newest and the
//!   oldest loaded position are checked against the stream (one direct get
//!   each: `Walcast-Tenant` and `Walcast-Seq`); otherwise it ignores and
//!   deletes every segment and reads the stream back as before;
//! - an index answer still requires the stream to hold every message in
//!   between (`lookup`), and a corrupt segment is skipped.
//!
//! Retention: the newest segments up to [`MAX_SAVED_BYTES`] (what the index
//! holds), and none ending before the stream's `first_seq`.
//!
//! A missing table (the operator has not run `walcast migrate` since the
//! upgrade) is a warning: nothing is saved and restarts read back as before.

use std::time::Instant;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use super::index::MAX_EXACT_BYTES;
use super::segment::Segment;
use crate::database::{Database, DbError, query_err, with_timeout};
use crate::position::StreamSeq;
use crate::telemetry::metrics as m;

/// Payload bytes of saved segments kept per slot: a little more than the
/// index holds (segments store varints, ~2 bytes per event, the index's
/// Rice codes ~1.5: [`MAX_EXACT_BYTES`] × 1.5 ≈ 12M events at 1,000
/// tenants).
pub const MAX_SAVED_BYTES: i64 = (MAX_EXACT_BYTES + MAX_EXACT_BYTES / 2) as i64;

/// Segments waiting for the writer; more are dropped (see `journal`).
pub const WRITER_QUEUE: usize = 16;

const MISSING_TABLE: &str = "walcast.catchup_segments does not exist: run `walcast migrate` to create it (until then restarts read the stream back to rebuild the catch-up index: correct, slower)";

/// Where a run's segments go.
#[derive(Debug, Clone)]
pub struct Place {
    pub db: Database,
    pub slot: String,
    pub stream: String,
}

/// Whether a failed query means the table is missing.
fn missing(e: &tokio_postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some("42P01")
}

fn failed(what: &'static str) -> impl FnOnce(tokio_postgres::Error) -> DbError {
    move |e| {
        if missing(&e) {
            DbError::Precondition(MISSING_TABLE.into())
        } else {
            query_err(what)(e)
        }
    }
}

/// Writes the run's segments as they come, until the publisher drops its
/// end. Waits for `loaded` first (the restart's load must read the old
/// segments before this run's first write cuts them), keeping at most
/// [`WRITER_QUEUE`] segments meanwhile. `run_from`: the first stream
/// sequence this run records.
pub async fn write(
    place: Place,
    run_from: StreamSeq,
    loaded: oneshot::Receiver<()>,
    mut segments: mpsc::Receiver<Segment>,
) {
    let _ = loaded.await;
    let mut client: Option<Client> = None;
    let mut cut_from = Some(run_from);
    while let Some(segment) = segments.recv().await {
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = match place.db.connect().await {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(error = %e, "could not save catch-up positions: a restart reads this range back instead");
                    continue;
                }
            };
        }
        let Some(c) = client.as_mut() else { continue };
        let from = cut_from.map_or(segment.first, |f| f.min(segment.first));
        match with_timeout("save a catch-up segment", save(c, &place, from, &segment)).await {
            Ok(Ok(())) => {
                cut_from = None;
                metrics::counter!(m::CATCHUP_SEGMENTS_SAVED).increment(1);
            }
            Ok(Err(DbError::Precondition(message))) => {
                return tracing::warn!("{message}");
            }
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, first = segment.first.0, last = segment.last.0, "could not save catch-up positions: a restart reads this range back instead");
                client = None;
            }
        }
    }
}

/// Saves one segment, cutting what it overlaps (from `from` on), and keeps
/// the newest [`MAX_SAVED_BYTES`].
async fn save(
    client: &mut Client,
    place: &Place,
    from: StreamSeq,
    segment: &Segment,
) -> Result<(), DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(query_err("begin saving a catch-up segment"))?;
    let from = from.0 as i64;
    tx.execute(
        "DELETE FROM walcast.catchup_segments WHERE slot = $1 AND (first_seq >= $2 OR stream <> $3)",
        &[&place.slot, &from, &place.stream],
    )
    .await
    .map_err(failed("delete overlapped catch-up segments"))?;
    tx.execute(
        "UPDATE walcast.catchup_segments SET last_seq = $2 - 1 WHERE slot = $1 AND last_seq >= $2",
        &[&place.slot, &from],
    )
    .await
    .map_err(failed("cut overlapped catch-up segments"))?;
    tx.execute(
        "INSERT INTO walcast.catchup_segments (slot, stream, first_seq, last_seq, positions, data)
         VALUES ($1, $2, $3, $4, $5, $6)",
        &[
            &place.slot,
            &place.stream,
            &(segment.first.0 as i64),
            &(segment.last.0 as i64),
            &(segment.positions as i64),
            &segment.data,
        ],
    )
    .await
    .map_err(failed("insert a catch-up segment"))?;
    tx.execute(
        "DELETE FROM walcast.catchup_segments WHERE slot = $1 AND first_seq < (
             SELECT min(first_seq) FROM (
                 SELECT first_seq, sum(octet_length(data)) OVER (ORDER BY first_seq DESC) AS total
                 FROM walcast.catchup_segments WHERE slot = $1) newest
             WHERE total <= $2)",
        &[&place.slot, &MAX_SAVED_BYTES],
    )
    .await
    .map_err(failed("delete old catch-up segments"))?;
    tx.commit()
        .await
        .map_err(query_err("commit a catch-up segment"))
}

/// A saved segment's range and size, as listed before loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Listed {
    pub first: StreamSeq,
    pub last: StreamSeq,
    pub bytes: u64,
}

/// Deletes the segments no restart can use (ending before the stream's
/// `first_seq`, or of another stream) and lists the others that start at
/// or below `through`, newest first.
pub async fn list(
    client: &Client,
    place: &Place,
    first_seq: StreamSeq,
    through: StreamSeq,
) -> Result<Vec<Listed>, DbError> {
    client
        .execute(
            "DELETE FROM walcast.catchup_segments WHERE slot = $1 AND (last_seq < $2 OR stream <> $3)",
            &[&place.slot, &(first_seq.0 as i64), &place.stream],
        )
        .await
        .map_err(failed("delete old catch-up segments"))?;
    let rows = client
        .query(
            "SELECT first_seq, last_seq, octet_length(data)::bigint FROM walcast.catchup_segments
             WHERE slot = $1 AND first_seq <= $2 ORDER BY first_seq DESC",
            &[&place.slot, &(through.0 as i64)],
        )
        .await
        .map_err(failed("list catch-up segments"))?;
    Ok(rows
        .iter()
        .map(|r| Listed {
            first: StreamSeq(r.get::<_, i64>(0).max(0) as u64),
            last: StreamSeq(r.get::<_, i64>(1).max(0) as u64),
            bytes: r.get::<_, i64>(2).max(0) as u64,
        })
        .collect())
}

/// One segment's payload.
pub async fn fetch(client: &Client, place: &Place, first: StreamSeq) -> Result<Vec<u8>, DbError> {
    let row = client
        .query_opt(
            "SELECT data FROM walcast.catchup_segments WHERE slot = $1 AND first_seq = $2",
            &[&place.slot, &(first.0 as i64)],
        )
        .await
        .map_err(failed("read a catch-up segment"))?;
    Ok(row.map(|r| r.get(0)).unwrap_or_default())
}

/// The payloads of the segments stored at `keys` that still exist, in
/// stream order.
pub async fn fetch_many(
    client: &Client,
    place: &Place,
    keys: &[StreamSeq],
) -> Result<Vec<(StreamSeq, Vec<u8>)>, DbError> {
    let keys: Vec<i64> = keys.iter().map(|k| k.0 as i64).collect();
    let rows = client
        .query(
            "SELECT first_seq, data FROM walcast.catchup_segments
             WHERE slot = $1 AND first_seq = ANY($2) ORDER BY first_seq",
            &[&place.slot, &keys],
        )
        .await
        .map_err(failed("read catch-up segments"))?;
    Ok(rows
        .iter()
        .map(|r| (StreamSeq(r.get::<_, i64>(0).max(0) as u64), r.get(1)))
        .collect())
}

/// Deletes every segment of the slot (they disagreed with the stream).
pub async fn forget(client: &Client, place: &Place) -> Result<u64, DbError> {
    client
        .execute(
            "DELETE FROM walcast.catchup_segments WHERE slot = $1",
            &[&place.slot],
        )
        .await
        .map_err(failed("delete catch-up segments"))
}

/// How a restart fills the index, oldest first: saved segments, and the
/// ranges between and after them that no segment covers, read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    /// Load the segment starting at `first`, its positions up to `last`.
    Saved {
        first: StreamSeq,
        last: StreamSeq,
    },
    ReadBack {
        from: StreamSeq,
        to: StreamSeq,
    },
}

/// The plan: parts in stream order, covering `from..=through` gap-free.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Plan {
    pub parts: Vec<Part>,
    pub from: StreamSeq,
}

/// Plans a restart from the listed segments (newest first): the newest
/// ones up to `max_bytes`, with the messages between them and after the
/// newest read back as long as those stay within `max_read_back`
/// (beyond, the older part is left to the background read-back). Overlaps
/// go to the newer segment (the one starting later). Empty if no segment
/// can be used.
pub fn plan(
    listed: &[Listed],
    first_seq: StreamSeq,
    through: StreamSeq,
    max_bytes: u64,
    max_read_back: u64,
) -> Plan {
    let mut parts = Vec::new();
    let mut cursor = through.0; // the highest stream sequence not yet covered
    let (mut bytes, mut read_back) = (0u64, 0u64);
    let first_seq = first_seq.0.max(1);
    if through.0 < first_seq {
        return Plan::default(); // nothing of the earlier runs left in the stream
    }
    for s in listed {
        if s.first.0 > cursor {
            continue; // past `through`
        }
        if s.last.0 < first_seq {
            break; // no longer in the stream, nor anything older
        }
        let (first, last) = (s.first.0.max(first_seq), s.last.0.min(cursor));
        let gap = cursor - last;
        if read_back + gap > max_read_back || bytes + s.bytes > max_bytes {
            break;
        }
        if gap > 0 {
            parts.push(Part::ReadBack {
                from: StreamSeq(last + 1),
                to: StreamSeq(cursor),
            });
        }
        parts.push(Part::Saved {
            first: s.first,
            last: StreamSeq(last),
        });
        read_back += gap;
        bytes += s.bytes;
        cursor = first - 1;
        if first == first_seq {
            break;
        }
    }
    if !parts.iter().any(|p| matches!(p, Part::Saved { .. })) {
        return Plan::default();
    }
    parts.reverse();
    Plan {
        parts,
        from: StreamSeq(cursor + 1),
    }
}

/// What a restart loaded, for the log and the metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Loaded {
    pub segments: u64,
    pub positions: u64,
    pub read_back: u64,
    pub began: Option<Instant>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn l(first: u64, last: u64, bytes: u64) -> Listed {
        Listed {
            first: StreamSeq(first),
            last: StreamSeq(last),
            bytes,
        }
    }

    fn saved(first: u64, last: u64) -> Part {
        Part::Saved {
            first: StreamSeq(first),
            last: StreamSeq(last),
        }
    }

    fn back(from: u64, to: u64) -> Part {
        Part::ReadBack {
            from: StreamSeq(from),
            to: StreamSeq(to),
        }
    }

    #[test]
    fn plans_segments_tail_and_gaps() {
        let listed = [
            l(301, 400, 10),
            l(201, 300, 10),
            l(101, 180, 10),
            l(1, 100, 10),
        ];
        let p = plan(&listed, StreamSeq(1), StreamSeq(450), 100, 100);
        assert_eq!(
            p.parts,
            vec![
                saved(1, 100),
                saved(101, 180),
                back(181, 200),
                saved(201, 300),
                saved(301, 400),
                back(401, 450)
            ]
        );
        assert_eq!(p.from, StreamSeq(1));
        // A segment reaching past `through` is loaded up to it.
        let p = plan(&listed, StreamSeq(1), StreamSeq(350), 100, 100);
        assert_eq!(p.parts.last(), Some(&saved(301, 350)));
        // Bytes and read-back bounds stop the plan; older is left out.
        let p = plan(&listed, StreamSeq(1), StreamSeq(450), 25, 100);
        assert_eq!(
            p.parts,
            vec![saved(201, 300), saved(301, 400), back(401, 450)]
        );
        assert_eq!(p.from, StreamSeq(201));
        let p = plan(&listed, StreamSeq(1), StreamSeq(450), 100, 60);
        assert_eq!(p.from, StreamSeq(201));
        // The stream's first_seq cuts the oldest one.
        let p = plan(&listed, StreamSeq(150), StreamSeq(400), 100, 100);
        assert_eq!(p.parts[0], saved(101, 180));
        assert_eq!(p.from, StreamSeq(150));
        // Too much to read back after the newest segment: nothing planned.
        assert_eq!(
            plan(&listed, StreamSeq(1), StreamSeq(1000), 100, 100),
            Plan::default()
        );
        assert_eq!(
            plan(&[], StreamSeq(1), StreamSeq(1000), 100, 100),
            Plan::default()
        );
    }

    proptest! {
        /// Whatever the segments, the plan covers `from..=through` exactly
        /// once, in order, loads no position past `through` or before the
        /// stream's first_seq, and lets a newer (later-starting) segment win.
        #[test]
        fn plans_cover_each_sequence_once(
            ranges in proptest::collection::vec((1u64..500, 0u64..80), 0..12),
            first_seq in 1u64..100,
            through in 1u64..600,
        ) {
            let mut listed: Vec<_> = ranges.iter().map(|&(f, len)| l(f, f + len, 1)).collect();
            listed.sort_by_key(|s| std::cmp::Reverse(s.first));
            listed.dedup_by_key(|s| s.first);
            let p = plan(&listed, StreamSeq(first_seq), StreamSeq(through), u64::MAX, u64::MAX);
            if p.parts.is_empty() {
                return Ok(());
            }
            let mut next = p.from.0;
            prop_assert!(next >= first_seq);
            for part in &p.parts {
                let (from, to) = match *part {
                    Part::Saved { first, last } => {
                        let s = listed.iter().find(|s| s.first == first).unwrap();
                        prop_assert!(last <= s.last);
                        // No later-starting segment overlaps what it loads.
                        prop_assert!(!listed.iter().any(|o| o.first > first && o.first <= last));
                        (first.0.max(first_seq), last.0)
                    }
                    Part::ReadBack { from, to } => (from.0, to.0),
                };
                prop_assert_eq!(from, next);
                prop_assert!(to >= from);
                next = to + 1;
            }
            prop_assert_eq!(next, through + 1);
        }
    }
}
