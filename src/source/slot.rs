//! The replication slot: created when missing, checked when present. On
//! PostgreSQL 17 and later it is created as a failover slot (unless
//! `slot_failover` is off), so a standby with `sync_replication_slots = on`
//! keeps a copy that a promoted standby serves from (README "Failover").

use tokio_postgres::Client;

use crate::database::{DbError, query_err};
use crate::lsn::Lsn;

/// The operator's procedure for a lost slot (README "Lost replication
/// slot"), written once for every error and `walcast check` line that needs
/// it. An invalidated slot still exists and must be dropped first.
pub fn recovery(slot: &str, invalidated: bool) -> String {
    let slot = slot.replace('\'', "''");
    let drop = if invalidated {
        format!("SELECT pg_drop_replication_slot('{slot}'); ")
    } else {
        String::new()
    };
    format!(
        "follow README \"Lost replication slot\": re-sync consumers from the database, then {drop}\
         DELETE FROM walcast.checkpoints WHERE slot = '{slot}'; DELETE FROM walcast.tenant_seqs WHERE slot = '{slot}'; \
         use a new --stream or purge the old one (seqs restart at 1), and start walcast again"
    )
}

/// A slot as `pg_replication_slots` reports it.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub database: Option<String>,
    pub confirmed_flush: Lsn,
    pub active_pid: Option<i32>,
    /// `pg_replication_slots.wal_status`; `lost` means invalidated.
    pub wal_status: Option<String>,
    /// Why Postgres invalidated it (`wal_removed`, `idle_timeout`, ...; 17+).
    pub invalidation_reason: Option<String>,
    /// Whether standbys synchronize it (17+; `None` before).
    pub failover: Option<bool>,
    /// Whether this is a standby's copy of a primary's failover slot (17+).
    pub synced: Option<bool>,
    pub created: bool,
}

/// Reads the slot, if it exists.
pub async fn read(client: &Client, slot: &str) -> Result<Option<SlotState>, DbError> {
    let row = client
        .query_opt(
            // `to_jsonb` reads the columns newer servers have without a version switch.
            "SELECT plugin::text, database::text, coalesce(confirmed_flush_lsn, '0/0')::text, active_pid,
                    wal_status::text, to_jsonb(s)->>'invalidation_reason', (to_jsonb(s)->>'failover')::bool,
                    (to_jsonb(s)->>'synced')::bool
             FROM pg_replication_slots s WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("read pg_replication_slots"))?;
    Ok(row.map(|r| SlotState {
        plugin: r.get(0),
        database: r.get(1),
        confirmed_flush: Lsn::parse(r.get::<_, &str>(2)).unwrap_or_default(),
        active_pid: r.get(3),
        wal_status: r.get(4),
        invalidation_reason: r.get(5),
        failover: r.get(6),
        synced: r.get(7),
        created: false,
    }))
}

impl SlotState {
    /// Whether Postgres invalidated the slot (the WAL it needs is gone).
    pub fn is_lost(&self) -> bool {
        self.wal_status.as_deref() == Some("lost")
    }
}

/// The first server version with failover slots.
pub const FAILOVER_SINCE: i32 = 170000;

/// Creates the slot with pgoutput if it does not exist; on PostgreSQL 17
/// and later as a failover slot when `failover` is set.
pub async fn ensure(client: &Client, slot: &str, failover: bool) -> Result<SlotState, DbError> {
    if let Some(state) = read(client, slot).await? {
        return Ok(state);
    }
    let failover = failover && super::publication::server_version(client).await? >= FAILOVER_SINCE;
    let created = if failover {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', false, false, true)",
                &[&slot],
            )
            .await
    } else {
        client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput')",
                &[&slot],
            )
            .await
    };
    if let Err(e) = created {
        // 42710: another process created it meanwhile; anything else is real.
        let code = e.code().map(|c| c.code());
        if code == Some("42501") {
            return Err(DbError::Precondition(format!(
                "cannot create the replication slot {slot}: the database role walcast connects as lacks the REPLICATION attribute; run ALTER ROLE <role> REPLICATION as a superuser (the role walcast migrate creates has it)"
            )));
        }
        if code != Some("42710") {
            return Err(DbError::Query {
                what: "create the replication slot",
                source: e,
            });
        }
    }
    let mut state = read(client, slot).await?.ok_or_else(|| {
        DbError::Precondition(format!(
            "replication slot {slot} vanished right after it was created"
        ))
    })?;
    state.created = true;
    Ok(state)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_recovery_procedure_is_complete() {
        assert_eq!(
            super::recovery("walcast", true),
            "follow README \"Lost replication slot\": re-sync consumers from the database, then \
             SELECT pg_drop_replication_slot('walcast'); DELETE FROM walcast.checkpoints WHERE slot = 'walcast'; \
             DELETE FROM walcast.tenant_seqs WHERE slot = 'walcast'; use a new --stream or purge the old one \
             (seqs restart at 1), and start walcast again"
        );
        assert!(!super::recovery("walcast", false).contains("pg_drop_replication_slot"));
    }
}
