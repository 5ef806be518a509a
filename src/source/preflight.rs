//! The database preconditions of a run, shared by `walcast run` (which stops
//! at the first one violated) and `walcast check` (which reports each), so
//! every precondition and its fix are written once.

use tokio_postgres::Client;

use super::slot::{self, SlotState};
use crate::database::{DbError, query_err};

/// A precondition that does not hold: what is wrong and what fixes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub problem: String,
    pub fix: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.problem, self.fix)
    }
}

impl std::error::Error for Violation {}

impl Violation {
    pub fn new(problem: impl Into<String>, fix: impl Into<String>) -> Violation {
        Violation {
            problem: problem.into(),
            fix: fix.into(),
        }
    }
}

/// A precondition's outcome: what holds, or what is violated.
pub type Checked<T> = Result<T, Violation>;

/// `wal_level` must be `logical`.
pub async fn wal_level(c: &Client) -> Result<Checked<String>, DbError> {
    let level: String = c
        .query_one("SHOW wal_level", &[])
        .await
        .map_err(query_err("SHOW wal_level"))?
        .get(0);
    Ok(if level == "logical" {
        Ok("wal_level is logical".into())
    } else {
        Err(Violation::new(
            format!("wal_level is {level}, walcast needs logical"),
            "ALTER SYSTEM SET wal_level = logical; then restart Postgres",
        ))
    })
}

/// What a run may do with the slot.
#[derive(Debug, PartialEq, Eq)]
pub enum SlotVerdict {
    /// It exists and can be streamed.
    Ready,
    /// It does not exist and walcast never streamed it: create it.
    Create,
}

/// Judges the slot as `pg_replication_slots` shows it (`None`: missing),
/// knowing whether walcast has a checkpoint for it: a missing slot that has
/// one was dropped, and walcast never silently recreates it.
pub fn judge_slot(
    name: &str,
    state: Option<&SlotState>,
    checkpointed: bool,
) -> Checked<SlotVerdict> {
    let Some(state) = state else {
        return if checkpointed {
            Err(slot_dropped(name))
        } else {
            Ok(SlotVerdict::Create)
        };
    };
    if state.is_lost() {
        let reason = match &state.invalidation_reason {
            Some(why) => format!("wal_status is lost, invalidation_reason {why}"),
            None => "wal_status is lost".to_string(),
        };
        return Err(slot_invalidated(name, &reason));
    }
    if state.plugin.as_deref() != Some("pgoutput") {
        let plugin = state.plugin.as_deref().unwrap_or("none");
        return Err(Violation::new(
            format!("replication slot {name} uses plugin {plugin}, walcast needs pgoutput"),
            format!(
                "drop it (SELECT pg_drop_replication_slot('{name}');) or choose another --slot"
            ),
        ));
    }
    Ok(SlotVerdict::Ready)
}

/// The slot walcast has a checkpoint for is gone (dropped by an operator,
/// before or while walcast streamed it).
pub fn slot_dropped(name: &str) -> Violation {
    Violation::new(
        format!(
            "replication slot {name} is gone (missing) but walcast has a checkpoint for it: changes since then may \
             be missing from the stream, and walcast will not silently recreate the slot"
        ),
        slot::recovery(name, false),
    )
}

/// Postgres invalidated the slot. `reason` is what Postgres said (the
/// walsender's error or `pg_replication_slots`); the message names the
/// setting behind it and how to keep it from happening again.
pub fn slot_invalidated(name: &str, reason: &str) -> Violation {
    let idle = reason.contains("idle_timeout");
    let cause = if idle {
        "it was idle (no walcast connected) longer than idle_replication_slot_timeout, and a checkpoint \
         invalidated it"
    } else if reason.contains("rows_removed") || reason.contains("wal_level_insufficient") {
        "the catalog rows or the wal_level it needs are gone"
    } else {
        "e.g. by max_slot_wal_keep_size"
    };
    let mut fix = slot::recovery(name, true);
    if idle {
        fix.push_str(
            "; to keep it from happening again, set idle_replication_slot_timeout longer than any walcast \
             downtime, or 0 to turn it off: ALTER SYSTEM SET idle_replication_slot_timeout = 0; SELECT \
             pg_reload_conf();",
        );
    }
    Violation::new(
        format!(
            "replication slot {name} was invalidated ({reason}; {cause}): Postgres no longer \
             keeps the WAL it needed, so changes since its last confirmation may be missing from the stream, and \
             walcast will not silently recreate the slot"
        ),
        fix,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lsn::Lsn;

    fn state(plugin: &str, wal_status: &str) -> SlotState {
        SlotState {
            plugin: Some(plugin.into()),
            database: None,
            confirmed_flush: Lsn(0),
            active_pid: None,
            wal_status: Some(wal_status.into()),
            invalidation_reason: None,
            failover: None,
            synced: None,
            created: false,
        }
    }

    #[test]
    fn a_missing_slot_is_created_only_without_a_checkpoint() {
        assert_eq!(judge_slot("w", None, false), Ok(SlotVerdict::Create));
        assert_eq!(judge_slot("w", None, true), Err(slot_dropped("w")));
        let dropped = slot_dropped("w").to_string();
        assert!(dropped.contains("is gone") && dropped.ends_with(&slot::recovery("w", false)));
    }

    #[test]
    fn an_idle_timeout_invalidation_names_the_setting() {
        let mut lost = state("pgoutput", "lost");
        lost.invalidation_reason = Some("idle_timeout".into());
        let v = judge_slot("w", Some(&lost), true).unwrap_err();
        assert!(
            v.problem.contains("invalidation_reason idle_timeout"),
            "{v}"
        );
        assert!(
            v.problem
                .contains("longer than idle_replication_slot_timeout"),
            "{v}"
        );
        assert!(v.fix.starts_with(&slot::recovery("w", true)), "{v}");
        assert!(
            v.fix
                .contains("ALTER SYSTEM SET idle_replication_slot_timeout = 0"),
            "{v}"
        );
        let walsender = slot_invalidated(
            "w",
            "This replication slot has been invalidated due to \"idle_timeout\".",
        );
        assert!(walsender.fix.contains("idle_replication_slot_timeout = 0"));
        let wal = slot_invalidated("w", "wal_status is lost, invalidation_reason wal_removed");
        assert!(
            wal.problem.contains("max_slot_wal_keep_size") && !wal.fix.contains("idle"),
            "{wal}"
        );
    }

    #[test]
    fn lost_and_foreign_slots_are_violations() {
        let lost = judge_slot("w", Some(&state("pgoutput", "lost")), true).unwrap_err();
        assert_eq!(lost.fix, slot::recovery("w", true));
        let foreign =
            judge_slot("w", Some(&state("test_decoding", "reserved")), false).unwrap_err();
        assert!(foreign.problem.contains("test_decoding") && foreign.problem.contains("pgoutput"));
        assert_eq!(
            judge_slot("w", Some(&state("pgoutput", "reserved")), true),
            Ok(SlotVerdict::Ready)
        );
    }
}
