//! The state's trusted position in Postgres (`walcast.checkpoints.state_applied`):
//! a position applied at least the loss horizon ago (see `recent`), so even a
//! restart of both walcast and the broker re-checks every write the broker
//! may have lost.

use std::time::Duration;

use crate::database::Database;

/// How often the trusted position is saved.
const SAVE_EVERY: Duration = Duration::from_secs(5);

/// The saved position (0 when none was saved yet).
pub async fn load(db: &Database, slot: &str) -> Result<u64, String> {
    let sql = db.connect().await.map_err(|e| e.to_string())?;
    let row = sql
        .query_opt(
            "SELECT state_applied FROM walcast.checkpoints WHERE slot = $1",
            &[&slot],
        )
        .await;
    match row {
        Ok(row) => Ok(row.map_or(0, |r| r.get::<_, i64>(0).max(0) as u64)),
        Err(e) if missing_column(&e) => {
            tracing::warn!(
                "walcast.checkpoints has no state_applied column: run `walcast migrate` (until then every restart re-checks the whole state bucket)"
            );
            Ok(0)
        }
        Err(e) => Err(format!("read the state's position from Postgres: {e}")),
    }
}

/// 42703 undefined_column: the database predates migration 0006.
fn missing_column(e: &tokio_postgres::Error) -> bool {
    e.code().map(|c| c.code()) == Some("42703")
}

/// Saves the trusted position every few seconds, forever. A failed save
/// is only logged: the next one catches up, and an older saved position
/// only widens the next restart's re-check.
pub async fn keep_saving(db: &Database, slot: &str, horizon: Duration) -> Result<(), String> {
    let mut sql = None;
    loop {
        tokio::time::sleep(SAVE_EVERY).await;
        let Some(position) = super::recent::trusted(horizon) else {
            continue;
        };
        if sql.is_none() {
            sql = db.connect().await.ok();
        }
        let Some(client) = &sql else { continue };
        let saved = client
            .execute(
                "UPDATE walcast.checkpoints SET state_applied = $2 WHERE slot = $1",
                &[&slot, &(position as i64)],
            )
            .await;
        match saved {
            Err(e) if missing_column(&e) => return std::future::pending().await,
            Err(e) => {
                tracing::debug!(error = %e, "the state's position was not saved; retrying");
                sql = None;
            }
            Ok(_) => {}
        }
    }
}
