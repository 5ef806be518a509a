//! The publication: checked before every run to cover every source table,
//! because pgoutput silently sends nothing for a table outside it; and, on
//! PostgreSQL 18 and later, made to publish stored generated columns (SPEC
//! §1), without which Postgres refuses the application's UPDATE and DELETE
//! on a REPLICA IDENTITY FULL table that has one (see `writes`).

use tokio_postgres::Client;

use super::preflight::{Checked, Violation};
use crate::config::Settings;
use crate::database::{DbError, query_err, quote_ident};
use crate::proto::Entity;

/// Verifies that the publication exists and covers the three configured
/// source tables, and returns their OIDs (so a later rename does not lose
/// them, see `assemble`). A violation carries the SQL that fixes it.
pub async fn verify(client: &Client, s: &Settings) -> Result<Checked<Vec<(u32, Entity)>>, DbError> {
    let t = &s.tables;
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[&s.publication],
        )
        .await
        .map_err(query_err("read pg_publication"))?
        .is_some();
    let all = [
        (Entity::Task, &t.tasks),
        (Entity::Project, &t.projects),
        (Entity::Lock, &t.locks),
    ];
    let plain = |table: &str| format!("{}.{table}", t.schema);
    let quoted = |table: &str| format!("{}.{}", quote_ident(&t.schema), quote_ident(table));
    if !exists {
        let list: Vec<String> = all.iter().map(|(_, table)| quoted(table)).collect();
        return Ok(Err(Violation::new(
            format!("publication {} does not exist", s.publication),
            format!(
                "run `walcast migrate`, or CREATE PUBLICATION {} FOR TABLE {}",
                quote_ident(&s.publication),
                list.join(", ")
            ),
        )));
    }
    let names: Vec<&str> = all.iter().map(|(_, table)| table.as_str()).collect();
    // One row per configured table: its OID if it exists (as a table), and
    // whether the publication covers it.
    let rows = client
        .query(
            "SELECT t.name, c.oid,
                    EXISTS (SELECT 1 FROM pg_publication_tables p
                            WHERE p.pubname = $2 AND p.schemaname = $1 AND p.tablename = t.name)
             FROM unnest($3::text[]) WITH ORDINALITY AS t(name, n)
             LEFT JOIN pg_namespace ns ON ns.nspname = $1
             LEFT JOIN pg_class c ON c.relnamespace = ns.oid AND c.relname = t.name AND c.relkind IN ('r', 'p')
             ORDER BY t.n",
            &[&t.schema, &s.publication, &names],
        )
        .await
        .map_err(query_err("read pg_publication_tables"))?;
    let mut sources = Vec::new();
    let mut absent = Vec::new();
    let mut unpublished = Vec::new();
    for ((entity, table), row) in all.iter().zip(&rows) {
        let oid: Option<u32> = row.get(1);
        let covered: bool = row.get(2);
        match oid {
            None => absent.push(plain(table)),
            Some(_) if !covered => unpublished.push((plain(table), quoted(table))),
            Some(oid) => sources.push((oid, *entity)),
        }
    }
    if !absent.is_empty() {
        return Ok(Err(Violation::new(
            format!("source table(s) {} do not exist", absent.join(", ")),
            "run `walcast migrate`, or set --schema / --tasks-table / --projects-table / --locks-table to the \
             tables' names (a renamed source table must be configured under its new name)",
        )));
    }
    if !unpublished.is_empty() {
        let (plain, quoted): (Vec<String>, Vec<String>) = unpublished.into_iter().unzip();
        return Ok(Err(Violation::new(
            format!(
                "publication {} does not cover {}: their changes would never be published",
                s.publication,
                plain.join(", ")
            ),
            format!(
                "ALTER PUBLICATION {} ADD TABLE {}; then start walcast again",
                quote_ident(&s.publication),
                quoted.join(", ")
            ),
        )));
    }
    Ok(Ok(sources))
}

/// The first server version whose publications can publish generated
/// columns (`publish_generated_columns`).
pub const GENERATED_COLUMNS_SINCE: i32 = 180000;

/// The server's `server_version_num`.
pub async fn server_version(client: &Client) -> Result<i32, DbError> {
    Ok(client
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(query_err("read server_version_num"))?
        .get(0))
}

/// On PostgreSQL 18 and later, sets `publish_generated_columns = stored` on
/// the publication unless it is set; returns whether it changed anything
/// (idempotent; a no-op before 18 and for a missing publication).
pub async fn publish_generated_columns(
    client: &Client,
    publication: &str,
) -> Result<bool, DbError> {
    if server_version(client).await? < GENERATED_COLUMNS_SINCE {
        return Ok(false);
    }
    let current: Option<String> = client
        .query_opt(
            "SELECT pubgencols::text FROM pg_publication WHERE pubname = $1",
            &[&publication],
        )
        .await
        .map_err(query_err("read pg_publication.pubgencols"))?
        .map(|row| row.get(0));
    if current.as_deref() != Some("n") {
        return Ok(false);
    }
    let sql = format!(
        "ALTER PUBLICATION {} SET (publish_generated_columns = stored)",
        quote_ident(publication)
    );
    client.batch_execute(&sql).await.map_err(query_err(
        "set publish_generated_columns on the publication",
    ))?;
    Ok(true)
}
