//! The single-tenant subscription: position through the catch-up service,
//! consume, and on anything unusual position again from the last delivered
//! `seq`.
//!
//! Every way this can go wrong ends in the same repair — ask the catch-up
//! service "tenant after `last`" and open a new consumer where it says — so
//! there is one recovery path to get right:
//!
//! - a `seq` jump (gap): the message is not delivered; repositioning
//!   delivers the missing events first, then it again;
//! - the NATS connection reconnected (NATS restarted, network cut): the old
//!   consumer may have missed or may repeat messages; repositioning makes
//!   both irrelevant;
//! - the consumer broke or a body could not be fetched: after a backoff;
//! - silence for [`Options::idle_check`](crate::Options::idle_check) while
//!   the service says the tenant has newer events: the last events went
//!   missing and no later event revealed it.
//!
//! When the service cannot answer (walcast is down) the subscription
//! retries with capped, jittered backoff, and after
//! [`Options::fallback_after`](crate::Options::fallback_after) reads the
//! tenant's subject directly from just after its last handled stream
//! message (or from the stream's start), skipping what it already
//! delivered. A gap met that way is never crossed: it waits for the service.

use std::time::{Duration, Instant};

use crate::catchup::{Answer, AskError};
use crate::error::Error;
use crate::order::{Baseline, Tracker};
use crate::pump::{Ctx, Outcome, Stop};
use crate::reader::From;
use crate::subscription::Update;

/// When the first idle check after (re)positioning happens at the latest.
const FIRST_CHECK: Duration = Duration::from_secs(1);

/// Runs a tenant subscription until the application drops it or a definite error.
pub async fn run(mut ctx: Ctx, tenant: String, after_seq: u64) {
    let mut tracker = Tracker::new(Baseline::Zero, ctx.options.dedup_window);
    tracker.set(&tenant, after_seq);
    if let Err(Stop::Fatal(e)) = drive(&mut ctx, &tenant, &mut tracker).await {
        tracing::warn!(%tenant, error = %e, "subscription failed");
        let _ = ctx.tx.send(Err(e)).await;
    }
}

/// Where the next consumer reads from.
struct Plan {
    stream: String,
    filter: String,
    from: From,
    fallback: bool,
}

async fn drive(ctx: &mut Ctx, tenant: &str, tracker: &mut Tracker) -> Result<(), Stop> {
    let mut attempt = 0u32;
    let mut unavailable_since: Option<Instant> = None;
    let mut ahead_since: Option<Instant> = None;
    let mut fallback_allowed = true;
    loop {
        let last = tracker.last(tenant).unwrap_or(0);
        let plan = match ctx.ask(tenant, last).await {
            Ok(Answer::Start {
                stream,
                filter_subject,
                start_stream_seq,
                ..
            }) => {
                unavailable_since = None;
                ahead_since = None;
                fallback_allowed = true;
                Plan {
                    stream,
                    filter: filter_subject,
                    from: From::Seq(start_stream_seq),
                    fallback: false,
                }
            }
            Ok(Answer::TooOld {
                oldest_seq,
                last_seq,
            }) => {
                tracing::warn!(%tenant, after_seq = last, oldest_seq, last_seq, "too old: the application must re-sync");
                ctx.send(Update::Resync {
                    tenant_id: tenant.to_string(),
                    oldest_seq,
                    last_seq,
                })
                .await?;
                tracker.set(tenant, last_seq);
                continue;
            }
            Ok(Answer::Ahead { last_seq }) => {
                let since = *ahead_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= ctx.options.ahead_timeout {
                    return Err(Stop::Fatal(Error::Ahead {
                        tenant_id: tenant.to_string(),
                        after_seq: last,
                        last_seq,
                    }));
                }
                tracing::debug!(%tenant, after_seq = last, last_seq, "ahead of walcast; retrying");
                ctx.back_off(attempt).await?;
                attempt += 1;
                continue;
            }
            Err(AskError::Definite(e)) => return Err(Stop::Fatal(e)),
            Err(AskError::Unavailable(why)) => {
                let since = *unavailable_since.get_or_insert_with(Instant::now);
                if !(fallback_allowed && since.elapsed() >= ctx.options.fallback_after) {
                    tracing::debug!(%tenant, %why, "catch-up service unavailable; retrying");
                    ctx.back_off(attempt).await?;
                    attempt += 1;
                    continue;
                }
                tracing::warn!(%tenant, %why, "catch-up service unavailable; reading the stream directly");
                Plan {
                    stream: ctx.options.stream.clone(),
                    filter: format!("{}.{tenant}.>", ctx.options.prefix),
                    from: ctx.position.map_or(From::First, |q| From::Seq(q + 1)),
                    fallback: true,
                }
            }
        };
        let before = tracker.last(tenant);
        let outcome = consume(ctx, tenant, tracker, &plan).await?;
        if tracker.last(tenant) != before {
            attempt = 0; // progress: the next trouble starts a fresh backoff
        }
        match outcome {
            Outcome::Gap(..) if plan.fallback => {
                tracing::warn!(%tenant, "gap while reading without the catch-up service; waiting for it");
                fallback_allowed = false;
            }
            Outcome::Gap(_, meta) => {
                tracing::info!(%tenant, last = tracker.last(tenant), seq = meta.seq, "gap; repositioning");
                if tracker.last(tenant) == before {
                    ctx.back_off(attempt).await?; // the service pointed at a gap again
                    attempt += 1;
                }
            }
            Outcome::Reconnected | Outcome::Idle => {
                tracing::info!(%tenant, ?outcome, "repositioning through the catch-up service");
            }
            Outcome::Retry(why) => {
                tracing::info!(%tenant, %why, "consumer interrupted; repositioning");
                ctx.back_off(attempt).await?;
                attempt += 1;
            }
            Outcome::Done => {}
        }
    }
}

/// Consumes from `plan` until the driver must reposition. Silence is
/// checked against the service: it returns `Idle` only when the tenant has
/// events this subscription has not delivered.
async fn consume(
    ctx: &mut Ctx,
    tenant: &str,
    tracker: &mut Tracker,
    plan: &Plan,
) -> Result<Outcome, Stop> {
    let connects = ctx.connects();
    let mut messages = match ctx.reader.open(&plan.stream, &plan.filter, plan.from).await {
        Ok(messages) => messages,
        Err(e) => return Ok(Outcome::Retry(e)),
    };
    // The first check comes soon: a start position that skipped events
    // (walcast answering from stale state right after a restart) is then
    // caught at once instead of after a full idle period.
    let mut idle = ctx.options.idle_check.min(FIRST_CHECK);
    loop {
        let outcome = ctx
            .pump(
                &mut messages,
                tracker,
                connects,
                Some(idle),
                None,
                Some(tenant),
            )
            .await?;
        idle = ctx.options.idle_check;
        match outcome {
            Outcome::Idle => {
                let last = tracker.last(tenant).unwrap_or(0);
                match ctx.ask(tenant, last).await {
                    Ok(Answer::Start { last_seq, .. }) if last_seq > last => {
                        return Ok(Outcome::Idle);
                    }
                    Ok(Answer::TooOld { .. }) => return Ok(Outcome::Idle),
                    _ => {} // up to date, or cannot tell now: keep consuming
                }
            }
            outcome => return Ok(outcome),
        }
    }
}
