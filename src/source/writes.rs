//! The application's own writes. Postgres checks a published table's
//! replica identity when the application writes, not when the publication
//! or the table is altered: in the states below every UPDATE and DELETE on
//! the table fails ("cannot update table ...") while walcast's stream stays
//! correct. One `ALTER TABLE ... ADD COLUMN ... GENERATED ALWAYS AS (...)
//! STORED` on PostgreSQL 18 is enough (SPEC §1), so this is checked by
//! `walcast check` (a failed line each) and at every start (an ERROR line
//! each, the run goes on: stopping walcast would not let the writes
//! through).
//!
//! Invariant: every such state of a configured source table in the
//! publication is reported with the SQL that fixes it. The states
//! (PostgreSQL 14–18, verified on 15 and 18):
//! - REPLICA IDENTITY NOTHING, or DEFAULT without a primary key, on a table
//!   whose publication publishes updates or deletes;
//! - a column list on a REPLICA IDENTITY FULL table (15+);
//! - on 18, with REPLICA IDENTITY FULL: a stored generated column while the
//!   publication has `publish_generated_columns = none`, or a virtual
//!   generated column (which no publication can publish).
//!
//! Before 18, generated columns are never published and never block writes;
//! their values are simply not in events (a note says so).

use tokio_postgres::Client;

use super::preflight::Violation;
use super::publication::GENERATED_COLUMNS_SINCE;
use crate::config::Settings;
use crate::database::{DbError, query_err, quote_ident};

/// What [`inspect`] found.
#[derive(Debug, Default)]
pub struct Findings {
    /// States in which the application's UPDATE/DELETE fail now.
    pub broken: Vec<Violation>,
    /// States one ordinary DDL away from that.
    pub warnings: Vec<Violation>,
    /// Facts worth knowing (nothing to fix).
    pub notes: Vec<String>,
}

/// One configured source table as the catalogs show it.
struct Table {
    name: String,
    identity: String,
    has_pk: bool,
    column_list: bool,
    /// (column, `s` stored / `v` virtual, type, expression)
    generated: Vec<(String, String, String, String)>,
}

/// Inspects the publication and the configured source tables it covers.
pub async fn inspect(c: &Client, s: &Settings) -> Result<Findings, DbError> {
    let version = super::publication::server_version(c).await?;
    // `to_jsonb` reads columns newer servers have without a version switch.
    let Some(publication) = c
        .query_opt(
            "SELECT p.pubupdate OR p.pubdelete, to_jsonb(p)->>'pubgencols' FROM pg_publication p WHERE p.pubname = $1",
            &[&s.publication],
        )
        .await
        .map_err(query_err("read pg_publication"))?
    else {
        return Ok(Findings::default());
    };
    let gencols: Option<String> = publication.get(1);
    let scope = Scope {
        settings: s,
        version,
        checks_identity: publication.get(0),
        generated_published: gencols.as_deref() == Some("s"),
    };
    let tables = read_tables(c, s).await?;
    let mut found = Findings::default();
    for t in &tables {
        scope.identity(t, &mut found);
        scope.generated(t, &mut found);
    }
    let any_stored = tables
        .iter()
        .any(|t| t.generated.iter().any(|g| g.1 == "s"));
    if version >= GENERATED_COLUMNS_SINCE
        && !scope.generated_published
        && !any_stored
        && scope.checks_identity
    {
        found.warnings.push(Violation::new(
            format!(
                "publication {} does not publish generated columns: one ALTER TABLE ... ADD COLUMN ... \
                 GENERATED ALWAYS AS (...) STORED on a REPLICA IDENTITY FULL source table would make Postgres \
                 refuse every UPDATE and DELETE on it",
                s.publication
            ),
            format!("{} (or run `walcast migrate`)", scope.set_stored()),
        ));
    }
    Ok(found)
}

/// What every table is checked against.
struct Scope<'a> {
    settings: &'a Settings,
    version: i32,
    /// The publication publishes updates or deletes: Postgres checks each
    /// table's replica identity on those.
    checks_identity: bool,
    generated_published: bool,
}

impl Scope<'_> {
    fn quoted(&self, name: &str) -> String {
        format!(
            "{}.{}",
            quote_ident(&self.settings.tables.schema),
            quote_ident(name)
        )
    }

    fn set_stored(&self) -> String {
        format!(
            "ALTER PUBLICATION {} SET (publish_generated_columns = stored);",
            quote_ident(&self.settings.publication)
        )
    }

    /// No replica identity, or a column list that cannot cover FULL.
    fn identity(&self, t: &Table, found: &mut Findings) {
        let (s, table) = (self.settings, self.quoted(&t.name));
        if self.checks_identity && (t.identity == "n" || (t.identity == "d" && !t.has_pk)) {
            found.broken.push(Violation::new(
                format!(
                    "Postgres refuses every UPDATE and DELETE on {table}: it has no replica identity \
                     (REPLICA IDENTITY {}) and publication {} publishes updates and deletes",
                    if t.identity == "n" { "NOTHING" } else { "DEFAULT without a primary key" },
                    s.publication
                ),
                format!("ALTER TABLE {table} REPLICA IDENTITY FULL;"),
            ));
        }
        if self.checks_identity && t.identity == "f" && t.column_list {
            let all = [&s.tables.tasks, &s.tables.projects, &s.tables.locks]
                .map(|name| self.quoted(name))
                .join(", ");
            found.broken.push(Violation::new(
                format!(
                    "Postgres refuses every UPDATE and DELETE on {table}: publication {} has a column list \
                     for it, which cannot cover its REPLICA IDENTITY FULL",
                    s.publication
                ),
                format!("ALTER PUBLICATION {} SET TABLE {all};", quote_ident(&s.publication)),
            ));
        }
    }

    /// Generated columns: unpublished ones in a FULL identity break writes
    /// (PostgreSQL 18+); before 18 they are never published (a note).
    fn generated(&self, t: &Table, found: &mut Findings) {
        let (s, table) = (self.settings, self.quoted(&t.name));
        if self.version < GENERATED_COLUMNS_SINCE {
            if !t.generated.is_empty() {
                let names: Vec<&str> = t.generated.iter().map(|g| g.0.as_str()).collect();
                found.notes.push(format!(
                    "{table} has generated column(s) {}: Postgres {} does not publish generated columns, so \
                     their values are not in events (PostgreSQL 18 with publish_generated_columns = stored does)",
                    names.join(", "),
                    self.version / 10000
                ));
            }
            return;
        }
        if !(self.checks_identity && t.identity == "f") {
            return;
        }
        let stored: Vec<&str> = t
            .generated
            .iter()
            .filter(|g| g.1 == "s")
            .map(|g| g.0.as_str())
            .collect();
        if !stored.is_empty() && !self.generated_published {
            found.broken.push(Violation::new(
                format!(
                    "Postgres refuses every UPDATE and DELETE on {table} (\"Replica identity must not contain \
                     unpublished generated columns\"): its stored generated column(s) {} are in its REPLICA \
                     IDENTITY FULL but publication {} does not publish generated columns",
                    stored.join(", "),
                    s.publication
                ),
                format!("{} (or run `walcast migrate`)", self.set_stored()),
            ));
        }
        for (column, _, ty, expr) in t.generated.iter().filter(|g| g.1 == "v") {
            let column = quote_ident(column);
            found.broken.push(Violation::new(
                format!(
                    "Postgres refuses every UPDATE and DELETE on {table} (\"Replica identity must not contain \
                     unpublished generated columns\"): virtual generated column {column} is in its REPLICA \
                     IDENTITY FULL and no publication can publish a virtual column"
                ),
                format!(
                    "make it stored (rewrites the table): ALTER TABLE {table} DROP COLUMN {column}, \
                     ADD COLUMN {column} {ty} GENERATED ALWAYS AS ({expr}) STORED;"
                ),
            ));
        }
    }
}

/// The configured source tables that exist and are in the publication.
async fn read_tables(c: &Client, s: &Settings) -> Result<Vec<Table>, DbError> {
    let t = &s.tables;
    let names = [t.tasks.as_str(), t.projects.as_str(), t.locks.as_str()];
    let rows = c
        .query(
            "SELECT c.relname::text, c.relreplident::text,
                    EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = c.oid AND i.indisprimary),
                    EXISTS (SELECT 1 FROM pg_publication_rel r JOIN pg_publication p ON p.oid = r.prpubid
                            WHERE p.pubname = $2 AND r.prrelid = c.oid AND to_jsonb(r)->>'prattrs' IS NOT NULL),
                    coalesce((SELECT array_agg(u.v ORDER BY a.attnum, u.k)
                              FROM pg_attribute a
                              LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum,
                              LATERAL unnest(ARRAY[a.attname::text, a.attgenerated::text,
                                                   format_type(a.atttypid, a.atttypmod),
                                                   coalesce(pg_get_expr(d.adbin, d.adrelid), '')])
                                  WITH ORDINALITY AS u(v, k)
                              WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
                                AND a.attgenerated <> ''), '{}')
             FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
             WHERE n.nspname = $1 AND c.relname = ANY($3) AND c.relkind IN ('r', 'p')
               AND EXISTS (SELECT 1 FROM pg_publication_tables pt
                           WHERE pt.pubname = $2 AND pt.schemaname = n.nspname AND pt.tablename = c.relname)
             ORDER BY c.relname",
            &[&t.schema, &s.publication, &names.as_slice()],
        )
        .await
        .map_err(query_err("read the source tables' replica identity"))?;
    Ok(rows
        .iter()
        .map(|r| {
            // Four text values per generated column, in column order.
            let flat: Vec<String> = r.get(4);
            Table {
                name: r.get(0),
                identity: r.get(1),
                has_pk: r.get(2),
                column_list: r.get(3),
                generated: flat
                    .chunks(4)
                    .filter(|g| g.len() == 4)
                    .map(|g| (g[0].clone(), g[1].clone(), g[2].clone(), g[3].clone()))
                    .collect(),
            }
        })
        .collect())
}

/// Logs each finding at startup: broken writes as ERROR, warnings as WARN.
pub fn log(found: &Findings) {
    for v in &found.broken {
        tracing::error!(fix = %v.fix, "{}", v.problem);
    }
    for v in &found.warnings {
        tracing::warn!(fix = %v.fix, "{}", v.problem);
    }
    for note in &found.notes {
        tracing::info!("{note}");
    }
}
