//! The all-tenant subscription: one consumer on `<prefix>.*.*.*` (tenant
//! subjects only; `_deadletter` and `_truncated` have fewer tokens), with a
//! position per tenant and gap repair per tenant.
//!
//! A gap of one tenant does not stop the others for long: the missing
//! events are read through the catch-up service with a second, tenant-only
//! consumer, delivered, and then the message that revealed the gap. Order
//! holds per tenant (walcast guarantees nothing across tenants). After a
//! reconnect or a broken consumer, reading resumes just after the last
//! handled stream message; per-tenant `seq` checks catch anything else.

use std::collections::HashMap;
use std::time::Instant;

use crate::catchup::{Answer, AskError};
use crate::error::Error;
use crate::order::{Baseline, Tracker};
use crate::pump::{Ctx, Outcome, Stop};
use crate::reader::{From, Meta};
use crate::subscription::Update;

/// Where an all-tenant subscription starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AllFrom {
    /// With the events published from now on; each tenant starts at the
    /// first of its events seen.
    Now,
    /// With every tenant's oldest event still in the stream; a tenant whose
    /// seq 1 is gone gets an [`Update::Resync`] first.
    Beginning,
    /// Where a previous run stopped: each tenant's last handled `seq`.
    /// Tenants not in the map are new to the application: their events are
    /// delivered from seq 1 (or a re-sync) once one of them shows up after
    /// the earliest of these positions.
    After(HashMap<String, u64>),
}

/// Runs an all-tenant subscription until dropped or a definite error.
pub async fn run(mut ctx: Ctx, from: AllFrom) {
    let baseline = if from == AllFrom::Now {
        Baseline::FirstSeen
    } else {
        Baseline::Zero
    };
    let mut tracker = Tracker::new(baseline, ctx.options.dedup_window);
    if let Err(Stop::Fatal(e)) = drive(&mut ctx, from, &mut tracker).await {
        tracing::warn!(error = %e, "all-tenant subscription failed");
        let _ = ctx.tx.send(Err(e)).await;
    }
}

async fn drive(ctx: &mut Ctx, from: AllFrom, tracker: &mut Tracker) -> Result<(), Stop> {
    let start = start(ctx, from, tracker).await?;
    let stream = ctx.options.stream.clone();
    let filter = format!("{}.*.*.*", ctx.options.prefix);
    let mut attempt = 0u32;
    loop {
        let from = ctx.position.map_or(start, |q| From::Seq(q + 1));
        let connects = ctx.connects();
        let mut messages = match ctx.reader.open(&stream, &filter, from).await {
            Ok(m) => m,
            Err(e) => {
                tracing::info!(error = %e, "cannot open the all-tenant consumer; retrying");
                ctx.back_off(attempt).await?;
                attempt += 1;
                continue;
            }
        };
        loop {
            match ctx
                .pump(&mut messages, tracker, connects, None, None, None)
                .await?
            {
                Outcome::Gap(msg, meta) => {
                    repair(ctx, tracker, &meta).await?;
                    attempt = 0;
                    match ctx.handle(&msg, &meta, tracker).await? {
                        None => continue,
                        Some(Outcome::Gap(..)) => {
                            tracing::warn!(tenant = %meta.tenant, seq = meta.seq, "still a gap after repair; reopening");
                            ctx.back_off(attempt).await?;
                            break;
                        }
                        Some(_) => break,
                    }
                }
                Outcome::Reconnected => {
                    tracing::info!("NATS reconnected; reopening the all-tenant consumer");
                    break;
                }
                outcome => {
                    tracing::info!(?outcome, "all-tenant consumer interrupted; reopening");
                    ctx.back_off(attempt).await?;
                    attempt += 1;
                    break;
                }
            }
        }
    }
}

/// The first consumer position; for `After`, each tenant's position is
/// checked with the service first (too old → re-sync at once).
async fn start(ctx: &mut Ctx, from: AllFrom, tracker: &mut Tracker) -> Result<From, Stop> {
    match from {
        AllFrom::Beginning => Ok(From::First),
        AllFrom::Now => {
            let js = async_nats::jetstream::new(ctx.client.clone());
            let mut attempt = 0;
            loop {
                match js.get_stream(&ctx.options.stream).await {
                    Ok(mut stream) => match stream.info().await {
                        Ok(info) => return Ok(From::Seq(info.state.last_sequence + 1)),
                        Err(e) => tracing::info!(error = %e, "stream info; retrying"),
                    },
                    Err(e) => tracing::info!(error = %e, "stream {}; retrying", ctx.options.stream),
                }
                ctx.back_off(attempt).await?;
                attempt += 1;
            }
        }
        AllFrom::After(positions) => {
            let mut earliest: Option<u64> = None;
            for (tenant, after) in positions {
                crate::client::validate_tenant(&tenant)?;
                tracker.set(&tenant, after);
                if let Some(q) = locate(ctx, tracker, &tenant).await? {
                    earliest = Some(earliest.map_or(q, |e| e.min(q)));
                }
            }
            Ok(earliest.map_or(From::First, From::Seq))
        }
    }
}

/// Asks until the service answers for `tenant` after its position: the
/// stream sequence to read it from, or `None` after a re-sync. Falls back
/// to 1 (the stream's start) when the service stays unavailable.
async fn locate(ctx: &mut Ctx, tracker: &mut Tracker, tenant: &str) -> Result<Option<u64>, Stop> {
    let mut attempt = 0u32;
    let began = Instant::now();
    loop {
        let last = tracker.last(tenant).unwrap_or(0);
        match ctx.ask(tenant, last).await {
            Ok(Answer::Start {
                start_stream_seq, ..
            }) => return Ok(Some(start_stream_seq)),
            Ok(Answer::TooOld {
                oldest_seq,
                last_seq,
            }) => {
                ctx.send(Update::Resync {
                    tenant_id: tenant.to_string(),
                    oldest_seq,
                    last_seq,
                })
                .await?;
                tracker.set(tenant, last_seq);
            }
            Ok(Answer::Ahead { last_seq }) if began.elapsed() >= ctx.options.ahead_timeout => {
                return Err(Stop::Fatal(Error::Ahead {
                    tenant_id: tenant.to_string(),
                    after_seq: last,
                    last_seq,
                }));
            }
            Ok(Answer::Ahead { .. }) => {}
            Err(AskError::Definite(e)) => return Err(Stop::Fatal(e)),
            Err(AskError::Unavailable(_)) if began.elapsed() >= ctx.options.fallback_after => {
                return Ok(Some(1));
            }
            Err(AskError::Unavailable(_)) => {}
        }
        ctx.back_off(attempt).await?;
        attempt += 1;
    }
}

/// Delivers `meta.tenant`'s events before `meta.seq` (or a re-sync) with a
/// tenant-only consumer positioned by the service. The main consumer waits.
async fn repair(ctx: &mut Ctx, tracker: &mut Tracker, meta: &Meta) -> Result<(), Stop> {
    let tenant = meta.tenant.as_str();
    let upto = meta.seq - 1;
    let saved = ctx.position; // side reads must not move the main consumer's position
    let mut attempt = 0u32;
    let began = Instant::now();
    let mut fallback_allowed = true;
    let result = loop {
        let last = tracker.last(tenant).unwrap_or(0);
        if last >= upto {
            break Ok(());
        }
        let (stream, filter, from, fallback) = match ctx.ask(tenant, last).await {
            Ok(Answer::Start {
                stream,
                filter_subject,
                start_stream_seq,
                ..
            }) => (stream, filter_subject, From::Seq(start_stream_seq), false),
            Ok(Answer::TooOld {
                oldest_seq,
                last_seq,
            }) => {
                if let Err(e) = ctx
                    .send(Update::Resync {
                        tenant_id: tenant.to_string(),
                        oldest_seq,
                        last_seq,
                    })
                    .await
                {
                    break Err(e);
                }
                tracker.set(tenant, last_seq.max(last));
                break Ok(());
            }
            Err(AskError::Definite(e)) => break Err(Stop::Fatal(e)),
            Err(AskError::Unavailable(_))
                if fallback_allowed && began.elapsed() >= ctx.options.fallback_after =>
            {
                let filter = format!("{}.{tenant}.>", ctx.options.prefix);
                (ctx.options.stream.clone(), filter, From::First, true)
            }
            // Unavailable, or ahead (walcast restarting: it published more than it knows yet).
            Ok(Answer::Ahead { .. }) | Err(AskError::Unavailable(_)) => {
                if let Err(e) = ctx.back_off(attempt).await {
                    break Err(e);
                }
                attempt += 1;
                continue;
            }
        };
        let connects = ctx.connects();
        let outcome = match ctx.reader.open(&stream, &filter, from).await {
            Ok(mut messages) => {
                ctx.pump(
                    &mut messages,
                    tracker,
                    connects,
                    Some(ctx.options.request_timeout * 5),
                    Some((tenant, upto)),
                    Some(tenant),
                )
                .await
            }
            Err(e) => Ok(Outcome::Retry(e)),
        };
        match outcome {
            Ok(Outcome::Done) => break Ok(()),
            Ok(Outcome::Gap(..)) if fallback => fallback_allowed = false,
            Ok(other) => {
                tracing::info!(%tenant, ?other, "repair interrupted; retrying");
                if let Err(e) = ctx.back_off(attempt).await {
                    break Err(e);
                }
                attempt += 1;
            }
            Err(e) => break Err(e),
        }
    };
    ctx.position = saved;
    result
}
