//! The in-memory twin of the Postgres checkpoint store, for in-process
//! tests of the checkpointer: the same fencing rule (a write must name the
//! current owner), no I/O.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::store::{Checkpoint, Store};
use crate::database::DbError;
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};

/// What `walcast.checkpoints` + `walcast.tenant_seqs` hold for one slot, as
/// the columns hold it (plain numbers).
#[derive(Debug, Clone, Default)]
pub(crate) struct Row {
    pub owner: String,
    pub lsn: Lsn,
    pub stream_seq: u64,
    pub acked_seq: u64,
    pub tenants: HashMap<String, u64>,
}

/// Shared, so a test can read it (and claim it) while a run writes it.
#[derive(Debug, Clone, Default)]
pub(crate) struct MemoryStore(Arc<Mutex<Row>>);

impl MemoryStore {
    /// Makes `owner` the only writer, like `store::claim`.
    pub fn claim(&self, owner: &str) {
        self.row().owner = owner.to_string();
    }

    pub fn snapshot(&self) -> Row {
        self.row().clone()
    }

    /// The checkpoint as `store::load` reads it (of a slot checkpointed for
    /// `stream`).
    pub fn checkpoint(&self, stream: &str) -> Checkpoint {
        let row = self.row();
        Checkpoint {
            lsn: row.lsn,
            stream: stream.to_string(),
            stream_seq: StreamSeq(row.stream_seq),
            acked_seq: StreamSeq(row.acked_seq),
            tenants: row
                .tenants
                .iter()
                .map(|(t, s)| (t.clone(), TenantSeq(*s)))
                .collect(),
        }
    }

    fn row(&self) -> std::sync::MutexGuard<'_, Row> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn owned_by(&self, slot: &str, owner: &str) -> Result<std::sync::MutexGuard<'_, Row>, DbError> {
        let row = self.row();
        if row.owner == owner {
            Ok(row)
        } else {
            Err(DbError::Fenced(slot.to_string()))
        }
    }
}

impl Store for MemoryStore {
    async fn save(
        &mut self,
        slot: &str,
        owner: &str,
        lsn: Lsn,
        stream_seq: StreamSeq,
        tenants: &[(Arc<str>, TenantSeq)],
    ) -> Result<(), DbError> {
        // A real write takes a round trip: let other tasks run meanwhile, so
        // a confirmation sent before the write completes is observable.
        tokio::task::yield_now().await;
        let mut row = self.owned_by(slot, owner)?;
        for (tenant, seq) in tenants {
            row.tenants.insert(tenant.to_string(), seq.0);
        }
        row.lsn = lsn;
        row.stream_seq = stream_seq.0;
        Ok(())
    }

    async fn save_acked(
        &mut self,
        slot: &str,
        owner: &str,
        acked_seq: StreamSeq,
    ) -> Result<(), DbError> {
        let mut row = self.owned_by(slot, owner)?;
        row.acked_seq = row.acked_seq.max(acked_seq.0);
        Ok(())
    }

    async fn gauges(&mut self, _slot: &str, _acked: Lsn) {}
}
