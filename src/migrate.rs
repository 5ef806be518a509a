//! `walcast migrate`: applies `migrations/*.sql` in order, once each, then
//! makes sure the configured publication and replication slot exist, so
//! changes made between the migration and the first `walcast run` are kept.
//! On PostgreSQL 18 and later the publication publishes stored generated
//! columns (SPEC §1); on 17 and later the slot is a failover slot unless
//! `slot_failover` is off.

use tokio_postgres::Client;

use crate::config::Settings;
use crate::database::{Database, DbError, query_err, quote_ident};
use crate::source::{publication, slot};

/// The migration files, embedded so the binary is self-contained.
pub const MIGRATIONS: &[(&str, &str)] = &[
    (
        "0001_reference_schema.sql",
        include_str!("../migrations/0001_reference_schema.sql"),
    ),
    (
        "0002_walcast_state.sql",
        include_str!("../migrations/0002_walcast_state.sql"),
    ),
    (
        "0003_role_and_publication.sql",
        include_str!("../migrations/0003_role_and_publication.sql"),
    ),
    (
        "0004_acked_seq.sql",
        include_str!("../migrations/0004_acked_seq.sql"),
    ),
    (
        "0005_checkpoint_owner.sql",
        include_str!("../migrations/0005_checkpoint_owner.sql"),
    ),
    (
        "0006_state_applied.sql",
        include_str!("../migrations/0006_state_applied.sql"),
    ),
    (
        "0007_catchup_segments.sql",
        include_str!("../migrations/0007_catchup_segments.sql"),
    ),
    (
        "0008_foreign_messages.sql",
        include_str!("../migrations/0008_foreign_messages.sql"),
    ),
];

/// What a migration run did.
#[derive(Debug, Default)]
pub struct Report {
    pub applied: Vec<&'static str>,
    pub publication_created: bool,
    /// `publish_generated_columns = stored` was set on the publication.
    pub generated_columns_published: bool,
    pub slot_created: bool,
}

/// Applies pending migrations and creates the publication and slot if missing.
pub async fn run(settings: &Settings) -> Result<Report, DbError> {
    let db = Database::parse(&settings.database_url)?;
    let mut client = db.connect().await?;
    let mut report = Report {
        applied: apply(&mut client).await?,
        ..Default::default()
    };
    report.publication_created = ensure_publication(&client, settings).await?;
    report.generated_columns_published =
        publication::publish_generated_columns(&client, &settings.publication).await?;
    report.slot_created = slot::ensure(&client, &settings.slot, settings.slot_failover)
        .await?
        .created;
    Ok(report)
}

async fn apply(client: &mut Client) -> Result<Vec<&'static str>, DbError> {
    client
        .batch_execute(
            "CREATE SCHEMA IF NOT EXISTS walcast;
             CREATE TABLE IF NOT EXISTS walcast.schema_migrations (
                 version text PRIMARY KEY,
                 applied_at timestamptz NOT NULL DEFAULT now());",
        )
        .await
        .map_err(query_err("create walcast.schema_migrations"))?;
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS {
        let tx = client
            .transaction()
            .await
            .map_err(query_err("begin migration"))?;
        // Serialises concurrent `walcast migrate` runs.
        tx.execute("SELECT pg_advisory_xact_lock(7223372036854775807)", &[])
            .await
            .map_err(query_err("lock migrations"))?;
        let done = tx
            .query_opt(
                "SELECT 1 FROM walcast.schema_migrations WHERE version = $1",
                &[version],
            )
            .await
            .map_err(query_err("read walcast.schema_migrations"))?;
        if done.is_none() {
            tx.batch_execute(sql)
                .await
                .map_err(query_err("apply migration"))?;
            tx.execute(
                "INSERT INTO walcast.schema_migrations (version) VALUES ($1)",
                &[version],
            )
            .await
            .map_err(query_err("record migration"))?;
            applied.push(*version);
        }
        tx.commit().await.map_err(query_err("commit migration"))?;
    }
    Ok(applied)
}

/// Creates the configured publication for the configured tables if it is
/// missing (the migrations create the default one).
async fn ensure_publication(client: &Client, settings: &Settings) -> Result<bool, DbError> {
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&settings.publication],
        )
        .await
        .map_err(query_err("read pg_publication"))?;
    if exists.is_some() {
        return Ok(false);
    }
    let t = &settings.tables;
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {s}.{}, {s}.{}, {s}.{}",
        quote_ident(&settings.publication),
        quote_ident(&t.projects),
        quote_ident(&t.tasks),
        quote_ident(&t.locks),
        s = quote_ident(&t.schema),
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(query_err("create publication"))?;
    Ok(true)
}
