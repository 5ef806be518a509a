//! The durable checkpoint in `walcast.checkpoints` / `walcast.tenant_seqs`.
//!
//! A checkpoint says: every event of every transaction that committed before
//! `lsn` is in the stream at or before message `stream_seq`, and each tenant's
//! last `seq` among them is in `tenants`. It is written before the slot is
//! confirmed at `lsn`, so the slot never passes it.

use std::sync::Arc;

use tokio_postgres::Client;

use crate::database::{DbError, query_err};
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::metrics as m;

/// A checkpoint as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Checkpoint {
    pub lsn: Lsn,
    pub stream: String,
    pub stream_seq: StreamSeq,
    /// Highest stream sequence seen acknowledged (>= `stream_seq`).
    pub acked_seq: StreamSeq,
    pub tenants: Vec<(String, TenantSeq)>,
}

/// Where a run writes its checkpoints: Postgres in production
/// ([`tokio_postgres::Client`]), memory in tests (`memory::MemoryStore`).
/// Every write names the run's fencing token and fails with
/// [`DbError::Fenced`] once another run claimed the checkpoint.
pub(crate) trait Store {
    /// Advances the checkpoint atomically (see [`save`]).
    async fn save(
        &mut self,
        slot: &str,
        owner: &str,
        lsn: Lsn,
        stream_seq: StreamSeq,
        tenants: &[(Arc<str>, TenantSeq)],
    ) -> Result<(), DbError>;
    /// Records the highest acknowledged stream sequence (see [`save_acked`]).
    async fn save_acked(
        &mut self,
        slot: &str,
        owner: &str,
        acked_seq: StreamSeq,
    ) -> Result<(), DbError>;
    /// Updates the slot gauges; a failure only leaves them stale.
    async fn gauges(&mut self, slot: &str, acked: Lsn);
}

impl Store for Client {
    async fn save(
        &mut self,
        slot: &str,
        owner: &str,
        lsn: Lsn,
        stream_seq: StreamSeq,
        tenants: &[(Arc<str>, TenantSeq)],
    ) -> Result<(), DbError> {
        save(self, slot, owner, lsn, stream_seq, tenants).await
    }

    async fn save_acked(
        &mut self,
        slot: &str,
        owner: &str,
        acked_seq: StreamSeq,
    ) -> Result<(), DbError> {
        save_acked(self, slot, owner, acked_seq).await
    }

    async fn gauges(&mut self, slot: &str, acked: Lsn) {
        slot_gauges(self, slot, acked).await
    }
}

/// Sets the slot gauges; a failed query only leaves them stale.
async fn slot_gauges(client: &Client, slot: &str, acked: Lsn) {
    let row = client
        .query_opt(
            "WITH cur AS (SELECT CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END AS lsn)
             SELECT (cur.lsn - s.restart_lsn)::float8, (cur.lsn - $2::text::pg_lsn)::float8,
                    (cur.lsn - s.confirmed_flush_lsn)::float8
             FROM pg_replication_slots s, cur WHERE s.slot_name = $1",
            &[&slot, &acked.to_string()],
        )
        .await;
    if let Ok(Some(row)) = row {
        if let Ok(Some(retained)) = row.try_get::<_, Option<f64>>(0) {
            metrics::gauge!(m::SLOT_RETAINED_WAL_BYTES).set(retained);
        }
        if let Ok(Some(lag)) = row.try_get::<_, Option<f64>>(1) {
            metrics::gauge!(m::REPLICATION_LAG_BYTES).set(lag.max(0.0));
        }
        if let Ok(Some(lag)) = row.try_get::<_, Option<f64>>(2) {
            metrics::gauge!(m::SLOT_CONFIRM_LAG_BYTES).set(lag.max(0.0));
        }
    }
}

/// Loads the checkpoint of `slot`, if any.
pub async fn load(client: &Client, slot: &str) -> Result<Option<Checkpoint>, DbError> {
    let Some(row) = client
        .query_opt(
            "SELECT lsn::text, stream, stream_seq, acked_seq FROM walcast.checkpoints WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(missing_schema)?
    else {
        return Ok(None);
    };
    let tenants = client
        .query(
            "SELECT tenant_id, seq FROM walcast.tenant_seqs WHERE slot = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("read walcast.tenant_seqs"))?
        .iter()
        .map(|r| (r.get::<_, String>(0), TenantSeq(r.get::<_, i64>(1) as u64)))
        .collect();
    Ok(Some(Checkpoint {
        lsn: Lsn::parse(row.get::<_, &str>(0)).unwrap_or_default(),
        stream: row.get(1),
        stream_seq: StreamSeq(row.get::<_, i64>(2) as u64),
        acked_seq: StreamSeq(row.get::<_, i64>(3) as u64),
        tenants,
    }))
}

fn missing_schema(e: tokio_postgres::Error) -> DbError {
    if e.code().map(|c| c.code()) == Some("42P01") {
        DbError::Precondition(
            "walcast.checkpoints does not exist: run `walcast migrate` first".into(),
        )
    } else {
        DbError::Query {
            what: "read walcast.checkpoints",
            source: e,
        }
    }
}

/// Makes this run the checkpoint's only writer (see migration 0005): every
/// later write names `owner`, so a previous holder of the slot that has not
/// noticed it lost it cannot move the checkpoint any more.
pub async fn claim(client: &Client, slot: &str, owner: &str) -> Result<(), DbError> {
    client
        .execute(
            "UPDATE walcast.checkpoints SET owner = $2 WHERE slot = $1",
            &[&slot, &owner],
        )
        .await
        .map_err(query_err("claim walcast.checkpoints"))?;
    Ok(())
}

/// Creates the first checkpoint of a slot (no-op if one exists), then loads it.
pub async fn init(
    client: &Client,
    slot: &str,
    lsn: Lsn,
    stream: &str,
    stream_seq: StreamSeq,
) -> Result<Checkpoint, DbError> {
    client
        .execute(
            "INSERT INTO walcast.checkpoints (slot, lsn, stream, stream_seq) VALUES ($1, $2::text::pg_lsn, $3, $4)
             ON CONFLICT (slot) DO NOTHING",
            &[&slot, &lsn.to_string(), &stream, &(stream_seq.0 as i64)],
        )
        .await
        .map_err(query_err("create the first checkpoint"))?;
    load(client, slot).await?.ok_or_else(|| {
        DbError::Precondition(format!(
            "checkpoint of slot {slot} vanished right after it was written"
        ))
    })
}

/// Tenants written per statement of a checkpoint: one statement for all of
/// them (60,000 when every one of 100,000 tenants is busy) encoded its
/// arrays at once, ~4 MB of the process's peak memory.
const TENANTS_PER_STATEMENT: usize = 4096;

/// Advances the checkpoint atomically: the tenants' new last seqs and the
/// position they are valid at.
pub async fn save(
    client: &mut Client,
    slot: &str,
    owner: &str,
    lsn: Lsn,
    stream_seq: StreamSeq,
    tenants: &[(Arc<str>, TenantSeq)],
) -> Result<(), DbError> {
    let tx = client
        .transaction()
        .await
        .map_err(query_err("begin checkpoint"))?;
    if !tenants.is_empty() {
        let upsert = tx
            .prepare(
                "INSERT INTO walcast.tenant_seqs (slot, tenant_id, seq)
                 SELECT $1, t, s FROM unnest($2::text[], $3::bigint[]) AS u(t, s)
                 ON CONFLICT (slot, tenant_id) DO UPDATE SET seq = EXCLUDED.seq",
            )
            .await
            .map_err(query_err("write walcast.tenant_seqs"))?;
        let (mut names, mut seqs) = (Vec::new(), Vec::new());
        for chunk in tenants.chunks(TENANTS_PER_STATEMENT) {
            names.clear();
            seqs.clear();
            names.extend(chunk.iter().map(|(t, _)| &**t));
            seqs.extend(chunk.iter().map(|(_, s)| s.0 as i64));
            tx.execute(&upsert, &[&slot, &names, &seqs])
                .await
                .map_err(query_err("write walcast.tenant_seqs"))?;
        }
    }
    let updated = tx
        .execute(
            "UPDATE walcast.checkpoints SET lsn = $2::text::pg_lsn, stream_seq = $3, updated_at = now()
             WHERE slot = $1 AND owner = $4",
            &[&slot, &lsn.to_string(), &(stream_seq.0 as i64), &owner],
        )
        .await
        .map_err(query_err("write walcast.checkpoints"))?;
    if updated != 1 {
        return Err(DbError::Fenced(slot.to_string()));
    }
    tx.commit().await.map_err(query_err("commit checkpoint"))
}

/// Records the highest acknowledged stream sequence (monotonic).
pub async fn save_acked(
    client: &Client,
    slot: &str,
    owner: &str,
    acked_seq: StreamSeq,
) -> Result<(), DbError> {
    let updated = client
        .execute(
            "UPDATE walcast.checkpoints SET acked_seq = greatest(acked_seq, $2) WHERE slot = $1 AND owner = $3",
            &[&slot, &(acked_seq.0 as i64), &owner],
        )
        .await
        .map_err(query_err("write walcast.checkpoints.acked_seq"))?;
    if updated != 1 {
        return Err(DbError::Fenced(slot.to_string()));
    }
    Ok(())
}
