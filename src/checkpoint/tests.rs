//! In-process property tests of the checkpointer against the in-memory
//! store, on a paused clock: thousands of random ack timelines in seconds.
//!
//! Checked at every confirmation, at the instant it is made: the confirmed
//! LSN is the end of a segment acknowledged at least the confirm delay ago
//! (SPEC §4.7), and the store already holds a checkpoint covering every
//! segment up to it (SPEC §4.4); a run fenced off by another owner never
//! moves the store again; an unfenced run confirms every event that matured
//! by the time it is closed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proptest::prelude::*;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use super::memory::MemoryStore;
use super::{Checkpoint, Checkpointer, Segment};
use crate::database::DbError;
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::health::Health;

/// One step of a timeline: wait, then hand over a segment.
#[derive(Debug, Clone)]
struct Step {
    gap_ms: u64,
    /// Tenants with events in the segment (empty: a keepalive position).
    tenants: Vec<u8>,
}

fn step() -> impl Strategy<Value = Step> {
    (0u64..600, prop::collection::vec(0u8..4, 0..3))
        .prop_map(|(gap_ms, tenants)| Step { gap_ms, tenants })
}

/// A segment as sent: what the checks compare confirmations with.
#[derive(Debug, Clone)]
struct Sent {
    end_lsn: u64,
    stream_seq: u64,
    tenants: HashMap<String, u64>,
    acked_at: Instant,
}

/// Everything the observer needs to judge a confirmation.
struct Judge {
    delay: Duration,
    store: MemoryStore,
    sent: Arc<Mutex<Vec<Sent>>>,
}

impl Judge {
    fn check(&self, confirmed: Lsn) -> Result<(), String> {
        if confirmed.0 == 0 {
            return Ok(());
        }
        let sent = self.sent.lock().unwrap();
        let upto: Vec<&Sent> = sent.iter().filter(|s| s.end_lsn <= confirmed.0).collect();
        let last = upto
            .last()
            .filter(|s| s.end_lsn == confirmed.0)
            .ok_or(format!("confirmed {confirmed} is no segment's end"))?;
        if last.acked_at + self.delay > Instant::now() {
            return Err(format!("confirmed {confirmed} before the delay passed"));
        }
        let row = self.store.snapshot();
        let seq = upto.iter().map(|s| s.stream_seq).max().unwrap_or(0);
        if row.stream_seq < seq {
            return Err(format!(
                "confirmed {confirmed} past the durable checkpoint (stream {} < {seq})",
                row.stream_seq
            ));
        }
        for s in &upto {
            for (tenant, seq) in &s.tenants {
                if row.tenants.get(tenant).copied().unwrap_or(0) < *seq {
                    return Err(format!(
                        "confirmed {confirmed} before {tenant}'s seq {seq} was durable"
                    ));
                }
            }
        }
        // Each tenant's seq is the one at the checkpoint's position, never a
        // later one (a restart from it would number replayed events again).
        for (tenant, saved) in &row.tenants {
            let at_position = sent
                .iter()
                .filter(|s| s.stream_seq <= row.stream_seq)
                .filter_map(|s| s.tenants.get(tenant))
                .max()
                .copied()
                .unwrap_or(0);
            if *saved != at_position {
                return Err(format!(
                    "checkpoint at stream {} holds {tenant} seq {saved}, not {at_position}",
                    row.stream_seq
                ));
            }
        }
        Ok(())
    }
}

/// Runs one timeline; returns the first violated property.
async fn timeline(
    delay: Duration,
    steps: Vec<Step>,
    fence_at: Option<usize>,
) -> Result<(), String> {
    let store = MemoryStore::default();
    store.claim("run");
    let (segments, segments_rx) = mpsc::channel(1024);
    let (confirm_tx, mut confirms) = watch::channel(Lsn(0));
    let checkpointer = Checkpointer {
        store: store.clone(),
        slot: "slot".into(),
        owner: "run".into(),
        delay,
        health: Arc::new(Health::default()),
    };
    let run = tokio::spawn(checkpointer.run(Checkpoint::default(), segments_rx, confirm_tx));
    let judge = Arc::new(Judge {
        delay,
        store: store.clone(),
        sent: Arc::default(),
    });
    let observer = {
        let judge = judge.clone();
        tokio::spawn(async move {
            let mut last = Lsn(0);
            while confirms.changed().await.is_ok() {
                last = *confirms.borrow_and_update();
                judge.check(last)?;
            }
            Ok::<Lsn, String>(last)
        })
    };
    let (mut lsn, mut stream_seq, mut seqs) = (0u64, 0u64, HashMap::<String, u64>::new());
    let mut fenced_row = None;
    for (i, step) in steps.iter().enumerate() {
        if fence_at == Some(i) {
            store.claim("another run");
            fenced_row = Some(store.snapshot());
        }
        tokio::time::sleep(Duration::from_millis(step.gap_ms)).await;
        lsn += 100;
        let mut delta = HashMap::new();
        for t in &step.tenants {
            let tenant = format!("t{t}");
            let seq = seqs.entry(tenant.clone()).or_default();
            *seq += 1;
            stream_seq += 1;
            delta.insert(Arc::<str>::from(tenant.as_str()), *seq);
        }
        let sent = Sent {
            end_lsn: lsn,
            stream_seq,
            tenants: delta.iter().map(|(t, s)| (t.to_string(), *s)).collect(),
            acked_at: Instant::now(),
        };
        judge.sent.lock().unwrap().push(sent.clone());
        let segment = Segment {
            end_lsn: Lsn(lsn),
            stream_seq: StreamSeq(stream_seq),
            delta: delta.into_iter().map(|(t, s)| (t, TenantSeq(s))).collect(),
            acked_at: sent.acked_at,
        };
        if segments.send(segment).await.is_err() {
            break; // the run ended (fenced)
        }
    }
    let closed_at = Instant::now();
    drop(segments);
    let outcome = run.await.map_err(|e| e.to_string())?;
    let last = observer.await.map_err(|e| e.to_string())??;
    match (fenced_row, outcome) {
        (Some(before), outcome) => {
            let after = store.snapshot();
            if after.stream_seq != before.stream_seq || after.lsn != before.lsn {
                return Err("a fenced run moved the checkpoint".into());
            }
            if let Err(e) = outcome
                && !matches!(e, DbError::Fenced(_))
            {
                return Err(format!("a fenced run failed otherwise: {e}"));
            }
        }
        (None, Err(e)) => return Err(format!("run failed: {e}")),
        (None, Ok(())) => {
            let sent = judge.sent.lock().unwrap();
            // Segments share buckets in the confirm queue (bounded memory),
            // so a position is owed once its bucket's newest ack, at most one
            // bucket later than its own, has waited the delay.
            let owed_after = delay + super::confirm::bucket_width(delay);
            let matured = sent
                .iter()
                .filter(|s| s.acked_at + owed_after <= closed_at)
                .map(|s| s.end_lsn)
                .max()
                .unwrap_or(0);
            if last.0 < matured {
                return Err(format!("closed at {last}, but {matured} had matured"));
            }
        }
    }
    Ok(())
}

/// A current-thread runtime whose clock only moves when every task waits
/// (also used by the pipeline's property tests).
pub(crate) fn paused_runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
        .expect("a paused runtime")
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn confirmations_wait_for_the_delay_and_a_durable_checkpoint(
        delay_ms in prop_oneof![Just(0u64), Just(120_000), 1u64..3_000],
        steps in prop::collection::vec(step(), 1..40),
        fence_at in prop::option::weighted(0.2, 0usize..40),
    ) {
        let delay = Duration::from_millis(delay_ms);
        let outcome = paused_runtime().block_on(timeline(delay, steps, fence_at));
        prop_assert!(outcome.is_ok(), "{}", outcome.unwrap_err());
    }
}
