//! What decides whether the slot survives the loss of its server, for
//! `walcast check`: the slot's `failover` flag (PostgreSQL 17+), what the
//! primary sees of its standbys (physical slots, `pg_stat_replication`,
//! `synchronized_standby_slots`), each standby of a multi-host URL's slot
//! synchronization settings, and `idle_replication_slot_timeout`
//! (PostgreSQL 18), which invalidates the slot while walcast is down.
//!
//! Invariant: every setting README "Failover" asks for is checked where it
//! can be seen from here, and a missing one is a warning with the SQL that
//! sets it (none of them stops a run: walcast streams correctly without
//! them, it only cannot survive a failover or a long downtime).

use tokio_postgres::Client;

use super::preflight::Violation;
use super::slot::{self, FAILOVER_SINCE};
use crate::config::Settings;
use crate::database::{Database, DbError, query_err, quote_ident};

/// What [`inspect`] found: one entry per line of `walcast check`.
#[derive(Debug, Default)]
pub struct Findings {
    pub passes: Vec<String>,
    pub warnings: Vec<Violation>,
    pub notes: Vec<String>,
}

/// Inspects the slot's failover readiness from the primary `c`, and each
/// other host of `db` that is a standby.
pub async fn inspect(c: &Client, db: &Database, s: &Settings) -> Result<Findings, DbError> {
    let mut found = Findings::default();
    let version = super::publication::server_version(c).await?;
    idle_timeout(c, s, &mut found).await?;
    if version < FAILOVER_SINCE {
        found.notes.push(format!(
            "PostgreSQL {} has no failover slots: after a failover to a standby slot {} does not exist there \
             and walcast stops with the lost-slot error (PostgreSQL 17+ keeps it; README \"Failover\")",
            version / 10000,
            s.slot
        ));
        return Ok(found);
    }
    slot_flag(c, s, &mut found).await?;
    let physical = standbys(c, s, &mut found).await?;
    synchronized_standby_slots(c, &physical, &mut found).await?;
    for host in db.hosts().into_iter().skip(1) {
        standby_settings(&host, s, &mut found).await;
    }
    Ok(found)
}

/// PostgreSQL 18 invalidates a slot idle longer than
/// `idle_replication_slot_timeout` (at the next checkpoint).
async fn idle_timeout(c: &Client, s: &Settings, found: &mut Findings) -> Result<(), DbError> {
    let seconds: Option<i64> = c
        .query_opt(
            "SELECT setting::bigint FROM pg_settings WHERE name = 'idle_replication_slot_timeout'",
            &[],
        )
        .await
        .map_err(query_err("read idle_replication_slot_timeout"))?
        .map(|row| row.get(0));
    match seconds {
        Some(secs) if secs > 0 => found.warnings.push(Violation::new(
            format!(
                "idle_replication_slot_timeout is {}: if walcast is stopped or cannot reach Postgres for longer, \
                 the next checkpoint invalidates slot {}; walcast then stops with the lost-slot error and consumers \
                 must re-sync from the database (README \"Lost replication slot\")",
                humantime::format_duration(std::time::Duration::from_secs(secs.unsigned_abs())),
                s.slot
            ),
            "keep it longer than any walcast downtime you plan for, or turn it off: \
             ALTER SYSTEM SET idle_replication_slot_timeout = 0; SELECT pg_reload_conf();",
        )),
        Some(_) => found
            .passes
            .push("idle_replication_slot_timeout is 0: an idle slot is never invalidated for idleness".into()),
        None => {}
    }
    Ok(())
}

/// The slot's `failover` flag against the `slot_failover` setting.
async fn slot_flag(c: &Client, s: &Settings, found: &mut Findings) -> Result<(), DbError> {
    let name = &s.slot;
    match slot::read(c, name).await? {
        None => found.notes.push(format!(
            "slot {name} will be created with failover = {} (slot_failover)",
            s.slot_failover
        )),
        Some(state) if state.failover == Some(true) => found.passes.push(format!(
            "slot {name} is a failover slot: standbys with sync_replication_slots = on keep a copy of it"
        )),
        Some(_) if !s.slot_failover => found.notes.push(format!(
            "slot {name} is not a failover slot (slot_failover is off): a failover to a standby loses it"
        )),
        Some(_) => found.warnings.push(Violation::new(
            format!("slot {name} is not a failover slot: a failover to a standby loses it"),
            format!(
                "stop walcast, then on a replication connection (psql \"dbname=<db> replication=database\"): \
                 ALTER_REPLICATION_SLOT {} (FAILOVER true)",
                quote_ident(name)
            ),
        )),
    }
    Ok(())
}

/// What the primary sees of its standbys; returns the physical slots.
async fn standbys(c: &Client, s: &Settings, found: &mut Findings) -> Result<Vec<String>, DbError> {
    let in_recovery: bool = c
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .map_err(query_err("SELECT pg_is_in_recovery()"))?
        .get(0);
    if in_recovery {
        found.notes.push(format!(
            "this server is a standby: slot {} can be streamed only after it is promoted",
            s.slot
        ));
        return Ok(Vec::new());
    }
    let physical: Vec<(String, bool)> = c
        .query(
            "SELECT slot_name::text, active FROM pg_replication_slots WHERE slot_type = 'physical' ORDER BY 1",
            &[],
        )
        .await
        .map_err(query_err("read physical slots"))?
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    // Physical walsenders only: a logical one holds a logical slot.
    let streaming: Vec<String> = c
        .query(
            "SELECT coalesce(application_name, '?') || ' (' || coalesce(state, '?') || ', ' || coalesce(sync_state, '?') || ')'
             FROM pg_stat_replication
             WHERE pid NOT IN (SELECT active_pid FROM pg_replication_slots
                               WHERE slot_type = 'logical' AND active_pid IS NOT NULL)
             ORDER BY 1",
            &[],
        )
        .await
        .map_err(query_err("read pg_stat_replication"))?
        .iter()
        .map(|r| r.get(0))
        .collect();
    if physical.is_empty() && streaming.is_empty() {
        found.notes.push(
            "no standby seen from this primary (no physical slot, nothing in pg_stat_replication): a failover \
             would find no copy of the slot"
                .into(),
        );
    } else {
        let slots: Vec<String> = physical
            .iter()
            .map(|(name, active)| {
                format!("{name} ({})", if *active { "active" } else { "inactive" })
            })
            .collect();
        found.notes.push(format!(
            "standbys seen from this primary: physical slots [{}], streaming [{}]",
            slots.join(", "),
            streaming.join(", ")
        ));
    }
    Ok(physical.into_iter().map(|(name, _)| name).collect())
}

/// `synchronized_standby_slots` must name the standbys' physical slots, or
/// walcast can publish changes a standby has not received: after failing
/// over to it, they are in the stream but not in the database.
async fn synchronized_standby_slots(
    c: &Client,
    physical: &[String],
    found: &mut Findings,
) -> Result<(), DbError> {
    let value: String = c
        .query_one(
            "SELECT coalesce(current_setting('synchronized_standby_slots', true), '')",
            &[],
        )
        .await
        .map_err(query_err("read synchronized_standby_slots"))?
        .get(0);
    let listed: Vec<&str> = value
        .split(',')
        .map(|p| p.trim().trim_matches('"'))
        .filter(|p| !p.is_empty())
        .collect();
    // A name without a physical slot holds every logical walsender back
    // for good ("Logical replication is waiting on the standby associated
    // with ..."): typically on a promoted standby that inherited the old
    // primary's setting through pg_basebackup's copy of postgresql.auto.conf.
    let absent: Vec<&str> = listed
        .iter()
        .copied()
        .filter(|name| !physical.iter().any(|p| p == name))
        .collect();
    if !absent.is_empty() {
        let keep: Vec<&str> = listed
            .iter()
            .copied()
            .filter(|n| !absent.contains(n))
            .collect();
        found.warnings.push(Violation::new(
            format!(
                "synchronized_standby_slots ('{value}') names {} which no physical slot here has: Postgres sends \
                 walcast nothing until that standby confirms, so walcast stalls (typical on a promoted standby \
                 that inherited the old primary's setting)",
                absent.join(", ")
            ),
            format!(
                "ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf(); (name this server's \
                 standbys' physical slots, or none)",
                keep.join(",")
            ),
        ));
        return Ok(());
    }
    if physical.is_empty() {
        return Ok(());
    }
    let missing: Vec<&str> = physical
        .iter()
        .map(String::as_str)
        .filter(|p| !listed.contains(p))
        .collect();
    if missing.is_empty() {
        found.passes.push(format!(
            "synchronized_standby_slots = '{value}': walcast receives no change before those standbys have it"
        ));
    } else {
        let all: Vec<&str> = physical.iter().map(String::as_str).collect();
        found.warnings.push(Violation::new(
            format!(
                "synchronized_standby_slots ('{value}') does not name physical slot(s) {}: walcast can publish \
                 changes those standbys have not received, and after failing over to one of them the stream \
                 holds changes the database lost",
                missing.join(", ")
            ),
            format!(
                "ALTER SYSTEM SET synchronized_standby_slots = '{}'; SELECT pg_reload_conf();",
                all.join(",")
            ),
        ));
    }
    Ok(())
}

/// A standby of a multi-host URL: the settings slot synchronization needs.
async fn standby_settings(host: &Database, s: &Settings, found: &mut Findings) {
    let where_ = host.redacted().to_string();
    let standby = match read_standby(host, &s.slot).await {
        Ok(Some(standby)) => standby,
        Ok(None) => {
            return found
                .notes
                .push(format!("{where_} is not in recovery (not a standby)"));
        }
        Err(e) => return found.notes.push(format!("cannot check {where_}: {e}")),
    };
    let mut want = |ok: bool, what: &str, fix: &str| {
        if ok {
            found.passes.push(format!("standby {where_}: {what}"));
        } else {
            found.warnings.push(Violation::new(
                format!(
                    "standby {where_}: not {what}, so it keeps no usable copy of slot {}",
                    s.slot
                ),
                format!("on the standby: {fix}"),
            ));
        }
    };
    want(
        standby.sync == "on",
        "sync_replication_slots = on",
        "ALTER SYSTEM SET sync_replication_slots = on; SELECT pg_reload_conf();",
    );
    want(
        standby.feedback == "on",
        "hot_standby_feedback = on",
        "ALTER SYSTEM SET hot_standby_feedback = on; SELECT pg_reload_conf();",
    );
    want(
        !standby.primary_slot.is_empty(),
        "primary_slot_name is set",
        "create a physical slot on the primary (SELECT pg_create_physical_replication_slot('standby1');), then \
         ALTER SYSTEM SET primary_slot_name = 'standby1'; SELECT pg_reload_conf();",
    );
    match &standby.conninfo {
        Some(conninfo) => want(
            conninfo.contains("dbname="),
            "primary_conninfo names a database (dbname=)",
            "ALTER SYSTEM SET primary_conninfo = '<as now> dbname=<the database walcast reads>'; SELECT pg_reload_conf();",
        ),
        None => found.notes.push(format!(
            "standby {where_}: cannot read primary_conninfo (needs superuser or pg_read_all_settings); slot sync \
             needs dbname= in it"
        )),
    }
    want(
        standby.synced,
        "holds a synced copy of the slot",
        "check the standby's log for slot sync errors (primary_conninfo needs dbname=...)",
    );
}

/// A standby's slot-sync settings, as it reports them.
struct Standby {
    sync: String,
    feedback: String,
    primary_slot: String,
    /// Superuser-only (it may hold a password): `None` if this role cannot read it.
    conninfo: Option<String>,
    /// It holds a synced copy of the slot.
    synced: bool,
}

/// Reads `host`'s slot-sync settings; `None` if it is not in recovery.
async fn read_standby(host: &Database, slot: &str) -> Result<Option<Standby>, String> {
    let client = host.connect().await.map_err(|e| e.to_string())?;
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(),
                    coalesce(current_setting('sync_replication_slots', true), ''),
                    coalesce(current_setting('hot_standby_feedback', true), ''),
                    coalesce(current_setting('primary_slot_name', true), ''),
                    EXISTS (SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND (to_jsonb(pg_replication_slots)->>'synced')::bool)",
            &[&slot],
        )
        .await
        .map_err(|e| e.to_string())?;
    if !row.get::<_, bool>(0) {
        return Ok(None);
    }
    let conninfo = client
        .query_one("SELECT current_setting('primary_conninfo')", &[])
        .await
        .ok()
        .map(|row| row.get(0));
    Ok(Some(Standby {
        sync: row.get(1),
        feedback: row.get(2),
        primary_slot: row.get(3),
        conninfo,
        synced: row.get(4),
    }))
}
