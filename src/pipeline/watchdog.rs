//! Signs that a run must end although nothing it awaits has failed: a
//! silent Postgres (a dead connection can be quiet for minutes while idle),
//! a slot dropped under it, and a broker that lost acknowledged messages
//! across a reconnection (SPEC §4.7).

use std::time::Duration;

use async_nats::jetstream;

use super::PipelineError;
use crate::database::DbError;
use crate::position::StreamSeq;
use crate::publish::holes;
use crate::publish::{JetStream, PublishError, Sink};
use crate::source::{SourceError, preflight};
use crate::telemetry::health::Health;

/// How often the watchdog checks Postgres, and how long it waits for an answer.
const WATCHDOG_EVERY: Duration = Duration::from_secs(5);
pub(super) const WATCHDOG_TIMEOUT: Duration = Duration::from_secs(10);

/// Reports the first sign that the replication session is gone: Postgres
/// does not answer, the slot was dropped, or no process streams it any more.
pub(super) async fn watch_postgres(
    sql: tokio_postgres::Client,
    slot: String,
    report: tokio::sync::oneshot::Sender<PipelineError>,
) {
    let error = loop {
        tokio::time::sleep(WATCHDOG_EVERY).await;
        if let Some(error) = probe(&sql, &slot).await {
            break error;
        }
    };
    let _ = report.send(error);
}

async fn probe(sql: &tokio_postgres::Client, slot: &str) -> Option<PipelineError> {
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&slot];
    let probe = sql.query_opt(
        "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
        &params,
    );
    match tokio::time::timeout(WATCHDOG_TIMEOUT, probe).await {
        Err(_) => Some(PipelineError::Db(DbError::Timeout {
            what: "watchdog probe",
            seconds: WATCHDOG_TIMEOUT.as_secs(),
        })),
        Ok(Err(e)) => Some(PipelineError::Db(DbError::Query {
            what: "watchdog probe",
            source: e,
        })),
        Ok(Ok(None)) => Some(preflight::slot_dropped(slot).into()),
        Ok(Ok(Some(row))) if row.get::<_, Option<i32>>(0).is_none() => Some(
            SourceError::Replication("the replication session ended on the server".into()).into(),
        ),
        Ok(Ok(Some(_))) => None,
    }
}

/// The error to restart with if the stream now ends before what was
/// acknowledged, or misses more messages from its middle than the `known`
/// ones the run started with (the next run names them). Only its leader's
/// word counts (a replica may lag): after a reconnection the stream may be
/// electing one.
pub(super) async fn broker_loss(
    js: &jetstream::Context,
    name: &str,
    acked: &crate::publish::acked::Acked,
    known: u64,
) -> Option<PipelineError> {
    let found = crate::publish::stream::lookup(js, name, WATCHDOG_TIMEOUT)
        .await
        .ok()?;
    let info = found.cached_info();
    if !crate::publish::stream::has_leader(info) {
        return None;
    }
    let last = info.state.last_sequence;
    let high = acked.high().0;
    let missing = info.state.deleted_count.unwrap_or(0);
    if missing > known && last >= high {
        return Some(PipelineError::Publish(PublishError::StreamHoles {
            stream: name.to_string(),
            missing,
            known,
        }));
    }
    (last < high).then(|| {
        PipelineError::Publish(PublishError::BrokerLoss {
            stream: name.to_string(),
            last: StreamSeq(last),
            high: StreamSeq(high),
        })
    })
}

/// How often a run asks whether the stream misses more messages from its
/// middle than when it started (one stream info request).
const HOLES_EVERY: Duration = Duration::from_secs(10);

/// Watches for messages going missing from the middle of the stream while
/// the run goes on (deleted by hand while connected; a broker's own loss
/// shows at a reconnection too). A new hole past the checkpoint (the slot
/// still holds it: `--confirm-delay` is much longer than [`HOLES_EVERY`])
/// ends the run, so the next one names what it lost; older ones (a purge of
/// old events, say) only get an ERROR and the gauge. `known`: messages
/// missing when the run started; `checkpointed`: the stream sequence its
/// checkpoint started at (raised by later checkpoints, see [`Health`]).
pub(super) async fn watch_holes(
    js: jetstream::Context,
    name: String,
    mut known: u64,
    checkpointed: StreamSeq,
    health: std::sync::Arc<Health>,
    report: tokio::sync::oneshot::Sender<PipelineError>,
) {
    let Ok(sink) = JetStream::new(js.clone(), &name).await else {
        return;
    };
    loop {
        tokio::time::sleep(HOLES_EVERY).await;
        let Ok(Ok(found)) = tokio::time::timeout(WATCHDOG_TIMEOUT, js.get_stream(&name)).await
        else {
            continue; // an outage or an election: the reconnection check covers it
        };
        let missing = found.cached_info().state.deleted_count.unwrap_or(0);
        if missing <= known {
            continue;
        }
        let checkpoint = checkpointed.max(health.checkpointed_stream_seq());
        let Ok(Ok(all)) = tokio::time::timeout(WATCHDOG_TIMEOUT, sink.holes()).await else {
            continue;
        };
        let (within, beyond) = holes::split(&all, checkpoint);
        if !within.is_empty() {
            let _ = report.send(PipelineError::Publish(PublishError::StreamHoles {
                stream: name,
                missing,
                known,
            }));
            return;
        }
        holes::gauge(missing);
        tracing::error!(
            stream = %name,
            missing = %holes::describe(&beyond),
            messages = missing,
            checkpoint_stream_seq = %checkpoint,
            "stream messages went missing from the middle of the stream (deleted, or lost by the broker) before \
             the checkpoint: the slot no longer holds them; consumers of the tenants in that range must re-sync \
             (README \"Broker data loss\"; the next start names the neighbouring events)"
        );
        known = missing;
    }
}
