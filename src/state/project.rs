//! The projection: reads the stream in order from where the bucket says it
//! stopped and writes each event to its row's key.
//!
//! Invariant owned here: keys are written in stream order, by one writer,
//! after the event is in the stream — so when the bucket holds an event of
//! seq `s` for a tenant, it holds every earlier event of that tenant too
//! (what makes a tenant's snapshot exact, docs/STATE.md).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, stream::Stream};
use futures::StreamExt;

use super::bucket::Bucket;
use super::feed::{Feed, Input};
use super::layout::{self, Skip, Write};
use super::objects::Objects;
use super::source::Source;
use super::writer::{WINDOW, Writer};
use crate::telemetry::metrics as m;

/// The applied-position gauge is set every this many messages (and at
/// every pause).
const GAUGE_EVERY: u64 = 256;

/// How often the applied position is sampled (see `recent`).
const SAMPLE_EVERY: Duration = Duration::from_secs(1);

/// Where a projection starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resume {
    /// Read the stream from `after + 1`.
    pub after: u64,
    /// Up to this position, a write may already be in the bucket, or may
    /// have been lost while later ones landed (a window of writes was in
    /// flight when the last run ended): each key is read first and written
    /// only if it holds an older seq — never a step back.
    pub recheck_through: u64,
}

impl Resume {
    /// From the newest entry's `Walcast-Stream-Seq`: every position up to it
    /// was acknowledged when that entry was sent (0: empty bucket); up to a
    /// window of later writes may have landed.
    pub fn from_newest(newest: u64) -> Resume {
        Resume {
            after: newest,
            recheck_through: newest + WINDOW as u64,
        }
    }
}

/// Projects the stream from `resume.after + 1` on, forever (returning is
/// failing): from the run's feed while it holds the next position, else
/// from the stream (`source`).
pub async fn run(
    js: jetstream::Context,
    (stream, feed): (&Stream, Option<Arc<Feed>>),
    bucket: &Bucket,
    objects: &Objects,
    resume: Resume,
    applied: Arc<AtomicU64>,
) -> Result<(), String> {
    let mut source = Source::new(stream, feed, resume.after);
    let mut writer = Writer::new(&js, &bucket.name, applied).await?;
    let mut warned = [false; 2];
    // After the first one read, positions are consecutive unless messages
    // were removed from the middle (see `missing`).
    let mut expected: Option<u64> = None;
    super::recent::record(resume.after);
    let mut last_sample = std::time::Instant::now();
    let writes = metrics::counter!(m::STATE_WRITES);
    loop {
        objects.retire_applied(writer.applied()).await?;
        let input = next_input(&mut source, &mut writer, objects).await?;
        let position = input.position;
        match expected {
            Some(expected) if expected < position => missing(expected, position - 1),
            Some(expected) if expected > position => {
                // The stream went back (it lost its tail and was written
                // again): restart from what the bucket has applied.
                return Err(format!(
                    "the state's read of the stream went back from position {expected} to {position}; restarting it from the bucket"
                ));
            }
            _ => {}
        }
        expected = Some(position + 1);
        if position.is_multiple_of(GAUGE_EVERY) {
            metrics::gauge!(m::STATE_APPLIED).set(writer.applied() as f64);
        }
        if last_sample.elapsed() >= SAMPLE_EVERY {
            last_sample = std::time::Instant::now();
            super::recent::record(writer.applied());
        }
        let target = Target {
            bucket,
            objects,
            writes: &writes,
        };
        crate::failpoint::hold_point("state_apply").await;
        apply(&mut writer, target, &resume, input, &mut warned).await?;
    }
}

/// Positions `from..=through` are not in the stream: removed from its middle
/// (a purge by subject, a delete, a broker that lost them — see
/// `publish::holes`, which stops the pipeline on a hole it can still name).
/// An ordered consumer only jumps over messages that are gone, so waiting
/// or re-reading cannot bring them back; stopping here would stall the
/// state (and every load) for good. The state goes on, like any consumer of
/// the stream, and says what it could not apply.
fn missing(from: u64, through: u64) {
    metrics::counter!(m::STATE_SKIPPED, "reason" => "missing_from_stream")
        .increment(through - from + 1);
    tracing::error!(
        from,
        through,
        "the state's read of the stream found positions {from}..={through} missing (removed from the stream): their events are not applied, so rows they changed may be stale in the state bucket until they change again; purge the bucket (nats kv del) to have walcast backfill it exactly"
    );
}

/// The next event; while none comes, what is in flight is settled so the
/// applied position moves on.
async fn next_input(
    source: &mut Source<'_>,
    writer: &mut Writer,
    objects: &Objects,
) -> Result<Input, String> {
    loop {
        let wait = (!writer.is_settled()).then_some(Duration::from_millis(50));
        if let Some(input) = source.next(wait).await? {
            return Ok(input);
        }
        writer.flush().await?;
        objects.retire_applied(writer.applied()).await?;
        metrics::gauge!(m::STATE_APPLIED).set(writer.applied() as f64);
    }
}

/// Where the projection writes: the bucket and its oversized values, and
/// the count of writes (a handle: no registry lookup per write).
#[derive(Clone, Copy)]
struct Target<'a> {
    bucket: &'a Bucket,
    objects: &'a Objects,
    writes: &'a metrics::Counter,
}

/// What one stream message does to the bucket.
async fn apply(
    writer: &mut Writer,
    Target {
        bucket,
        objects,
        writes,
    }: Target<'_>,
    resume: &Resume,
    input: Input,
    warned: &mut [bool; 2],
) -> Result<(), String> {
    let position = input.position;
    if input.foreign {
        metrics::counter!(m::STATE_SKIPPED, "reason" => "foreign").increment(1);
        tracing::debug!(position, subject = %input.subject, "the state skips a stream message walcast did not publish");
        return writer.skip(position).await;
    }
    let tenant = input.tenant.as_deref();
    let mut effect = layout::effect(&input.subject, tenant, &input.payload);
    // An oversized event's stub has no before image: whether an update
    // moved its row is read from the full event (which its put stores).
    let mut full = None;
    if let Some(object) = input.object.as_deref().filter(|_| effect.may_move()) {
        let body = objects.read_event(object).await?;
        effect = layout::effect(&input.subject, tenant, &body);
        full = Some(body);
    }
    if let Some(key) = &effect.vacated
        && vacate(writer, (bucket, objects), key, &input).await?
    {
        writes.increment(1);
    }
    match effect.write {
        Ok(Write::Truncate(entity)) => {
            // Everything before it lands first; then the entity's keys go.
            writer.flush().await?;
            delete_all(writer, bucket, entity, position).await?;
            writer.flush().await?;
            writer.skip(position).await
        }
        Ok(write)
            if position <= resume.recheck_through && !newer(bucket, &write, input.seq).await? =>
        {
            writer.skip(position).await
        }
        Ok(write) => {
            send(writer, objects, write, input, full).await?;
            writes.increment(1);
            Ok(())
        }
        Err(skip) => {
            skipped(skip, &input.subject, warned);
            writer.skip(position).await
        }
    }
}

/// Deletes every row of `entity` (all tenants): the table was truncated.
///
/// Each key gets a delete marker carrying the seq it held, as if its row
/// had been deleted then. A load's `as_of_seq` is the highest seq it reads,
/// markers included (docs/STATE.md), so it does not go back: a purge
/// without markers lowered it below the removed rows' events, and the
/// events a client followed from there brought the truncated rows back.
/// The markers complete the position before the truncate's (`position - 1`,
/// already applied), so a crash part-way repeats the truncate.
async fn delete_all(
    writer: &mut Writer,
    bucket: &Bucket,
    entity: &str,
    position: u64,
) -> Result<(), String> {
    let failed = |e: &dyn std::fmt::Display| {
        format!("delete the truncated {entity} rows from the state bucket on NATS: {e}")
    };
    let prefix = format!("$KV.{}.", bucket.name);
    let consumer = bucket
        .stream
        .create_consumer(crate::broker::ordered::with_short_heartbeats(
            OrderedConfig {
                filter_subject: format!("{prefix}*.{entity}.>"),
                deliver_policy: DeliverPolicy::LastPerSubject,
                headers_only: true,
                ..Default::default()
            },
        ))
        .await
        .map_err(|e| failed(&e))?;
    let mut rows = 0;
    if consumer.cached_info().num_pending > 0 {
        let mut messages = consumer.messages().await.map_err(|e| failed(&e))?;
        loop {
            let message = tokio::time::timeout(TRUNCATE_READ_WAIT, messages.next())
                .await
                .map_err(|_| failed(&"no message for 10 s"))?
                .ok_or_else(|| failed(&"the read ended"))?
                .map_err(|e| failed(&e))?;
            let pending = message.info().map_err(|e| failed(&e))?.pending;
            if let Some((key, seq)) = held_row(&message, &prefix) {
                mark_gone(writer, key, seq, position).await?;
                rows += 1;
            }
            if pending == 0 {
                break;
            }
        }
    }
    tracing::info!(
        entity,
        rows,
        "a source table was truncated: its rows are deleted from the state bucket"
    );
    Ok(())
}

/// The row left `key` (this event changed its tenant or id): the key gets
/// a delete marker carrying the seq it held, as a truncated row's does, so
/// no tenant's `as_of_seq` goes back, and a load between this marker and
/// the row's new key lacks the row but is as of a seq before this event,
/// which it then follows and which brings the row back. A row moved to
/// another tenant has no event in its old tenant's stream (one message per
/// change, SPEC §4.1):
/// loads of that tenant lose it, its live followers keep it until they load
/// again. Nothing is written over a marker, or over a value of a later
/// event (a restart reapplying this one); a key with no entry gets a marker
/// too, so a backfill's copy from before this event cannot create it.
/// Returns whether it wrote the marker.
async fn vacate(
    writer: &mut Writer,
    (bucket, objects): (&Bucket, &Objects),
    key: &str,
    input: &Input,
) -> Result<bool, String> {
    // What is in flight lands first, so the read below sees it.
    writer.flush().await?;
    let held = entry_at_leader(bucket, &format!("$KV.{}.{key}", bucket.name), key).await?;
    let held_seq = match &held {
        None => 0,
        Some(entry) if is_marker(&entry.headers) => return Ok(false),
        Some(entry) => {
            let (seq, at) = (held_seq(&entry.headers), layout::commit_of(&entry.payload));
            if !layout::precedes(seq, at, layout::commit_of(&input.payload)) {
                return Ok(false);
            }
            seq
        }
    };
    mark_gone(writer, key, held_seq, input.position).await?;
    // Its value's object (an oversized row) goes once the marker is applied.
    objects
        .retire_after(input.position, key, held_seq + 1)
        .await;
    tracing::debug!(
        key,
        subject = %input.subject,
        "a row's tenant or id changed: its old key in the state bucket is now a delete marker"
    );
    Ok(true)
}

/// A delete marker for a row gone without a delete event of its own (a
/// TRUNCATE, a move), keeping the `seq` the key held; it completes the
/// position before the event's, so a crash part-way repeats the event.
async fn mark_gone(writer: &mut Writer, key: &str, seq: u64, position: u64) -> Result<(), String> {
    let mut headers = layout::headers(seq, writer.applied());
    headers.insert(crate::headers::KV_OPERATION, "DEL");
    writer
        .send(
            key,
            &headers,
            bytes::Bytes::new(),
            position.saturating_sub(1),
        )
        .await
}

fn is_marker(headers: &async_nats::HeaderMap) -> bool {
    headers.get(crate::headers::KV_OPERATION).is_some()
}

/// How long reading the keys of a truncated table waits for the next one.
const TRUNCATE_READ_WAIT: Duration = Duration::from_secs(10);

/// The key and `Walcast-Seq` of a bucket entry that holds a row (not a
/// delete marker).
fn held_row<'m>(message: &'m jetstream::Message, prefix: &str) -> Option<(&'m str, u64)> {
    let headers = message.headers.as_ref()?;
    if is_marker(headers) {
        return None;
    }
    let seq = headers.get(crate::headers::SEQ)?.as_str().parse().ok()?;
    Some((message.subject.strip_prefix(prefix)?, seq))
}

/// Whether the event is newer than what its key holds.
///
/// A direct get may be answered by any replica of a clustered bucket (one
/// that has applied 90 % of the leader's log already answers), so it may
/// return an older value than the key holds, never a newer one: "not newer"
/// is final, but "newer" is asked again of the stream leader before the key
/// is written, or a lagging replica would make a key step back.
async fn newer(bucket: &Bucket, write: &Write, seq: u64) -> Result<bool, String> {
    let (Write::Put(key) | Write::Delete(key)) = write else {
        return Ok(true);
    };
    let subject = format!("$KV.{}.{key}", bucket.name);
    newer_than_held(seq, held_nearby(bucket, &subject, key), || {
        held_at_leader(bucket, &subject, key)
    })
    .await
}

/// [`newer`]'s decision: `nearby` may be stale (older), `leader` is not.
async fn newer_than_held<L, F>(
    seq: u64,
    nearby: impl Future<Output = Result<u64, String>>,
    leader: L,
) -> Result<bool, String>
where
    L: FnOnce() -> F,
    F: Future<Output = Result<u64, String>>,
{
    if seq <= nearby.await? {
        return Ok(false);
    }
    Ok(seq > leader().await?)
}

/// The seq a key holds (0: none), as the nearest replica answers.
async fn held_nearby(bucket: &Bucket, subject: &str, key: &str) -> Result<u64, String> {
    match bucket.stream.direct_get_last_for_subject(subject).await {
        Ok(entry) => Ok(held_seq(&entry.headers)),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(0),
        Err(e) => Err(format!("read {key} from the state bucket on NATS: {e}")),
    }
}

/// The seq a key holds (0: none), as the stream leader answers.
async fn held_at_leader(bucket: &Bucket, subject: &str, key: &str) -> Result<u64, String> {
    let held = entry_at_leader(bucket, subject, key).await?;
    Ok(held.map_or(0, |entry| held_seq(&entry.headers)))
}

/// The newest entry of `key` (its `subject`), as the stream leader answers.
async fn entry_at_leader(
    bucket: &Bucket,
    subject: &str,
    key: &str,
) -> Result<Option<async_nats::jetstream::message::StreamMessage>, String> {
    super::bucket::last_at_leader(&bucket.stream, subject)
        .await
        .map_err(|e| format!("read {key} from the state bucket's leader on NATS: {e}"))
}

fn held_seq(headers: &async_nats::HeaderMap) -> u64 {
    headers
        .get(crate::headers::SEQ)
        .and_then(|v| v.as_str().parse::<u64>().ok())
        .unwrap_or(0)
}

/// Writes the event to its key; `full` is the full body of an oversized
/// event (the stream's message is its stub).
async fn send(
    writer: &mut Writer,
    objects: &Objects,
    write: Write,
    input: Input,
    full: Option<bytes::Bytes>,
) -> Result<(), String> {
    let Input {
        seq,
        position,
        object,
        payload,
        ..
    } = input;
    // The position every write before this one has reached: what a restart
    // may trust (see `Resume`).
    let mut headers = layout::headers(seq, writer.applied());
    let (key, body) = match write {
        Write::Put(key) => {
            if let Some(object) = object {
                // The stream's copy expires with the stream: the state's does not.
                let body = match full {
                    Some(body) => body,
                    None => objects.read_event(&object).await?,
                };
                let copy = objects.store(&key, seq, &body).await?;
                headers.insert(crate::headers::OBJECT, format!("{}/{copy}", objects.name));
            }
            (key, payload)
        }
        Write::Delete(key) => {
            headers.insert(crate::headers::KV_OPERATION, "DEL");
            (key, bytes::Bytes::new())
        }
        Write::Truncate(_) => return Ok(()), // handled by the caller
    };
    writer.send(&key, &headers, body, position).await?;
    objects.retire_after(position, &key, seq).await;
    Ok(())
}

/// Counts an event left out of the state; logs the first of each reason.
fn skipped(skip: Skip, subject: &str, warned: &mut [bool; 2]) {
    metrics::counter!(m::STATE_SKIPPED, "reason" => skip.label()).increment(1);
    let first = &mut warned[skip as usize];
    if *first {
        return;
    }
    *first = true;
    match skip {
        Skip::InvalidKey => tracing::warn!(
            subject,
            "an event's row has no valid state key (its id holds characters a key cannot): it is in the stream, not in the state bucket; counted in walcast_state_skipped_total"
        ),
        Skip::NoTenant => tracing::warn!(
            subject,
            "a dead letter (its row's tenant id cannot be routed) is in the stream's dead-letter subject, not in the state bucket; fix the row's tenant_id. Counted in walcast_state_skipped_total{{reason=\"no_tenant\"}} and walcast_dead_letters_total"
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `newer` decides from a nearby replica's answer and the leader's
    /// (`None`: the leader must not be asked).
    fn decide(seq: u64, nearby: u64, leader: Option<u64>) -> bool {
        let asked = std::cell::Cell::new(false);
        let decided =
            futures::executor::block_on(newer_than_held(seq, async { Ok(nearby) }, || {
                asked.set(true);
                async move { leader.ok_or_else(|| "asked the leader".to_string()) }
            }))
            .expect("decided");
        assert_eq!(asked.get(), leader.is_some(), "leader asked");
        decided
    }

    #[test]
    fn a_lagging_replica_never_makes_a_key_step_back() {
        // The key holds seq 10; a lagging replica still shows 5: event 7
        // is not written.
        assert!(!decide(7, 5, Some(10)));
        // Up to date everywhere: written.
        assert!(decide(7, 5, Some(5)));
        assert!(decide(7, 0, Some(0)));
        // Not newer nearby: final, the leader is not asked.
        assert!(!decide(7, 7, None));
        assert!(!decide(7, 9, None));
    }

    #[test]
    fn a_restart_rechecks_every_write_that_may_have_been_in_flight() {
        let w = WINDOW as u64;
        assert_eq!(
            Resume::from_newest(0),
            Resume {
                after: 0,
                recheck_through: w
            }
        );
        assert_eq!(
            Resume::from_newest(10),
            Resume {
                after: 10,
                recheck_through: 10 + w
            }
        );
    }
}
