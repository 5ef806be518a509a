//! `walcast check`: verifies every precondition of `walcast run` and prints
//! one line per check, with the exact fix for each failure. Exit status is
//! non-zero if any check fails (warnings do not fail it).

use std::fmt;
use std::time::Duration;

use tokio_postgres::Client;

use crate::broker::BrokerError;
use crate::config::Settings;
use crate::database::{Database, DbError, query_err, quote_ident};
use crate::secrets::redact_url;
use crate::source::preflight::{self, Checked, SlotVerdict, Violation};
use crate::source::{failover, publication, slot, writes};

/// The outcome of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pass,
    Warn,
    Fail,
    Info,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Line {
    pub status: Status,
    pub text: String,
    /// How to fix it (failures and warnings).
    pub fix: Option<String>,
}

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mark = match self.status {
            Status::Pass => "✓",
            Status::Warn => "!",
            Status::Fail => "✗",
            Status::Info => "i",
        };
        write!(f, "{mark} {}", self.text)?;
        if let Some(fix) = &self.fix {
            write!(f, "\n    fix: {fix}")?;
        }
        Ok(())
    }
}

#[derive(Default)]
struct Report(Vec<Line>);

impl Report {
    fn add(&mut self, status: Status, text: impl Into<String>, fix: Option<String>) {
        self.0.push(Line {
            status,
            text: text.into(),
            fix,
        });
    }
    fn pass(&mut self, text: impl Into<String>) {
        self.add(Status::Pass, text, None);
    }
    fn fail(&mut self, text: impl Into<String>, fix: impl Into<String>) {
        self.add(Status::Fail, text, Some(fix.into()));
    }
    fn record(&mut self, outcome: Checked<String>) {
        match outcome {
            Ok(pass) => self.pass(pass),
            Err(violation) => self.violated(violation),
        }
    }
    fn violated(&mut self, Violation { problem, fix }: Violation) {
        self.fail(problem, fix)
    }
    fn check(
        &mut self,
        ok: bool,
        pass: impl Into<String>,
        fail: impl Into<String>,
        fix: impl Into<String>,
    ) {
        if ok {
            self.pass(pass)
        } else {
            self.fail(fail, fix)
        }
    }
}

/// Runs every check; returns the lines in order.
pub async fn run(settings: &Settings) -> Vec<Line> {
    let mut report = Report::default();
    match Database::parse(&settings.database_url) {
        Err(e) => report.fail(
            e.to_string(),
            "pass a libpq URL: postgres://USER:PASSWORD@HOST:PORT/DB",
        ),
        Ok(db) => match db.connect().await {
            Err(e) => report.fail(
                e.to_string(),
                "check that Postgres runs and that --database-url is right",
            ),
            Ok(client) => {
                report.pass(format!("Postgres reachable at {}", db.redacted()));
                if let Err(e) = postgres(&client, &db, settings, &mut report).await {
                    report.fail(
                        format!("a check query failed: {e}"),
                        "run walcast check with a role that can read pg_catalog",
                    );
                }
            }
        },
    }
    nats(settings, &mut report).await;
    report.0.extend(crate::auth::wiring::check(settings).await);
    report.add(
        Status::Info,
        format!(
            "confirm delay is {}: the slot keeps that much WAL behind acknowledged events \
             (0 only for nats-server v2.14.6 or newer with sync_interval: always)",
            humantime::format_duration(settings.confirm_delay)
        ),
        (settings.confirm_delay.is_zero()).then(|| {
            "with 0, a NATS crash before its fsync (sync_interval, 2m by default) can lose acknowledged events for good; \
             use 0 only if every NATS server is v2.14.6 or newer and runs with `jetstream { sync_interval: always }`"
                .to_string()
        }),
    );
    report.0
}

async fn postgres(c: &Client, db: &Database, s: &Settings, r: &mut Report) -> Result<(), DbError> {
    server(c, s, r).await?;
    let user = role(c, r).await?;
    tables(c, s, &user, r).await?;
    match publication::verify(c, s).await? {
        Err(violation) => r.violated(violation),
        Ok(_) => publication_extras(c, s, r).await?,
    }
    application_writes(c, s, r).await?;
    checkpoint_tables(c, &user, r).await?;
    slot_state(c, s, r).await?;
    slot_survival(c, db, s, r).await
}

/// Failover slots, standbys and the idle-slot timeout (see `source::failover`).
async fn slot_survival(
    c: &Client,
    db: &Database,
    s: &Settings,
    r: &mut Report,
) -> Result<(), DbError> {
    let found = failover::inspect(c, db, s).await?;
    for pass in found.passes {
        r.pass(pass);
    }
    for Violation { problem, fix } in found.warnings {
        r.add(Status::Warn, problem, Some(fix));
    }
    for note in found.notes {
        r.add(Status::Info, note, None);
    }
    Ok(())
}

/// Version, wal_level, and room for one more slot and WAL sender.
async fn server(c: &Client, s: &Settings, r: &mut Report) -> Result<(), DbError> {
    let version: i32 = c
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await
        .map_err(check_query)?
        .get(0);
    r.check(
        version >= 140000,
        format!("Postgres version {} is supported", version / 10000),
        format!("Postgres {} is too old", version / 10000),
        "upgrade to PostgreSQL 14 or newer (walcast needs pgoutput's `messages` option)",
    );
    r.record(preflight::wal_level(c).await?);
    let row = c
        .query_one(
            "SELECT current_setting('max_replication_slots')::int, (SELECT count(*) FROM pg_replication_slots)::int,
                    current_setting('max_wal_senders')::int, (SELECT count(*) FROM pg_stat_replication)::int,
                    EXISTS (SELECT FROM pg_replication_slots WHERE slot_name = $1)",
            &[&s.slot],
        )
        .await.map_err(check_query)?;
    let (max_slots, slots, max_senders, senders, slot_exists): (i32, i32, i32, i32, bool) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    r.check(
        slot_exists || slots < max_slots,
        format!("replication slots: {slots} of {max_slots} used"),
        format!("no free replication slot ({slots} of {max_slots} used)"),
        "raise max_replication_slots (ALTER SYSTEM SET max_replication_slots = ...; restart) or drop an unused slot",
    );
    r.check(
        senders < max_senders,
        format!("WAL senders: {senders} of {max_senders} used"),
        format!("no free WAL sender ({senders} of {max_senders} used)"),
        "raise max_wal_senders (ALTER SYSTEM SET max_wal_senders = ...; restart Postgres)",
    );
    Ok(())
}

/// The connecting role may replicate; returns its name for the fixes.
async fn role(c: &Client, r: &mut Report) -> Result<String, DbError> {
    let row = c
        .query_one("SELECT current_user::text, rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await.map_err(check_query)?;
    let (user, replication): (String, bool) = (row.get(0), row.get(1));
    r.check(
        replication,
        format!("role {user} has REPLICATION"),
        format!("role {user} lacks REPLICATION"),
        format!("ALTER ROLE {} REPLICATION;", quote_ident(&user)),
    );
    Ok(user)
}

/// Each source table exists, is readable and has REPLICA IDENTITY FULL.
async fn tables(c: &Client, s: &Settings, user: &str, r: &mut Report) -> Result<(), DbError> {
    let t = &s.tables;
    let tables = [&t.tasks, &t.projects, &t.locks];
    for table in tables {
        let qualified = format!("{}.{}", quote_ident(&t.schema), quote_ident(table));
        let row = c
            .query_opt(
                "SELECT has_table_privilege(c.oid, 'SELECT'), c.relreplident::text
                 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = $1 AND c.relname = $2",
                &[&t.schema, table],
            )
            .await.map_err(check_query)?;
        let Some(row) = row else {
            r.fail(format!("table {qualified} does not exist"), "run `walcast migrate`, or set --schema / --tasks-table / --projects-table / --locks-table");
            continue;
        };
        let (select, identity): (bool, String) = (row.get(0), row.get(1));
        r.check(
            select,
            format!("SELECT on {qualified}"),
            format!("no SELECT on {qualified}"),
            format!("GRANT SELECT ON {qualified} TO {};", quote_ident(user)),
        );
        if identity == "f" {
            r.pass(format!("{qualified} has REPLICA IDENTITY FULL"));
        } else {
            r.add(
                Status::Warn,
                format!("{qualified} does not have REPLICA IDENTITY FULL: updates and deletes carry no before-image"),
                Some(format!("ALTER TABLE {qualified} REPLICA IDENTITY FULL;")),
            );
        }
    }
    Ok(())
}

/// walcast's own tables are writable by the role.
async fn checkpoint_tables(c: &Client, user: &str, r: &mut Report) -> Result<(), DbError> {
    let state = c
        .query_opt(
            "SELECT has_table_privilege('walcast.checkpoints', 'INSERT') AND has_table_privilege('walcast.checkpoints', 'UPDATE')
                AND has_table_privilege('walcast.tenant_seqs', 'INSERT') AND has_table_privilege('walcast.tenant_seqs', 'UPDATE')
             WHERE to_regclass('walcast.checkpoints') IS NOT NULL AND to_regclass('walcast.tenant_seqs') IS NOT NULL",
            &[],
        )
        .await.map_err(check_query)?;
    match state.map(|row| row.get::<_, bool>(0)) {
        Some(true) => r.pass("checkpoint tables walcast.checkpoints and walcast.tenant_seqs are writable"),
        Some(false) => r.fail(
            "checkpoint tables are not writable by this role",
            format!("GRANT SELECT, INSERT, UPDATE, DELETE ON walcast.checkpoints, walcast.tenant_seqs TO {};", quote_ident(user)),
        ),
        None => r.fail("checkpoint tables are missing", "run `walcast migrate`"),
    }
    // Saved catch-up positions: without them `walcast run` still works, but
    // every restart reads the stream back (minutes on a large stream).
    let segments = OptionalTable {
        name: "walcast.catchup_segments",
        migration: "0007",
        passes: "(restarts load the catch-up index from it)",
        without: "restarts read the stream back to rebuild the catch-up index",
    };
    segments.check(c, user, r).await?;
    // Where a run records messages it did not publish: without it a run
    // that finds some stops (README "Tenant isolation at the broker").
    let foreign = OptionalTable {
        name: "walcast.foreign_messages",
        migration: "0008",
        passes: "(messages walcast did not publish are recorded there)",
        without: "a run that finds messages it did not publish in the stream stops",
    };
    foreign.check(c, user, r).await
}

/// A table of a later migration that `walcast run` works without, worse.
struct OptionalTable {
    name: &'static str,
    migration: &'static str,
    /// Said after "<name> is writable".
    passes: &'static str,
    /// What happens without it.
    without: &'static str,
}

impl OptionalTable {
    async fn check(&self, c: &Client, user: &str, r: &mut Report) -> Result<(), DbError> {
        let name = self.name;
        let state = c
            .query_opt(
                "SELECT has_table_privilege($1::text, 'INSERT') AND has_table_privilege($1::text, 'DELETE')
                 WHERE to_regclass($1::text) IS NOT NULL",
                &[&name],
            )
            .await
            .map_err(check_query)?;
        match state.map(|row| row.get::<_, bool>(0)) {
            Some(true) => r.pass(format!("{name} is writable {}", self.passes)),
            Some(false) => r.add(
                Status::Warn,
                format!("{name} is not writable by this role: {}", self.without),
                Some(format!(
                    "GRANT SELECT, INSERT, UPDATE, DELETE ON {name} TO {};",
                    quote_ident(user)
                )),
            ),
            None => r.add(
                Status::Warn,
                format!("{name} is missing: {}", self.without),
                Some(format!(
                    "run `walcast migrate` (migration {})",
                    self.migration
                )),
            ),
        }
        Ok(())
    }
}

/// The slot, judged as `walcast run` judges it.
async fn slot_state(c: &Client, s: &Settings, r: &mut Report) -> Result<(), DbError> {
    let state = slot::read(c, &s.slot).await?;
    let checkpointed = has_checkpoint(c, &s.slot)
        .await
        .map_err(query_err("read walcast.checkpoints"))?;
    match preflight::judge_slot(&s.slot, state.as_ref(), checkpointed) {
        Err(violation) => r.violated(violation),
        Ok(SlotVerdict::Create) => r.pass(format!(
            "slot {} does not exist yet; `walcast migrate` or `walcast run` creates it",
            s.slot
        )),
        Ok(SlotVerdict::Ready) => r.pass(slot_summary(c, &s.slot).await?),
    }
    Ok(())
}

/// A healthy slot in one line: who streams it, how much WAL it retains.
async fn slot_summary(c: &Client, slot: &str) -> Result<String, DbError> {
    let row = c
        .query_one(
            "SELECT active, coalesce(wal_status, 'unknown'),
                    (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() ELSE pg_current_wal_lsn() END - restart_lsn)::bigint
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await
        .map_err(query_err("read pg_replication_slots"))?;
    let (active, wal_status, retained): (bool, String, Option<i64>) =
        (row.get(0), row.get(1), row.get(2));
    let mb = retained.unwrap_or(0) as f64 / 1_048_576.0;
    let holder = if active {
        "in use by a walcast"
    } else {
        "idle"
    };
    Ok(format!(
        "slot {slot} (pgoutput, {holder}, {mb:.1} MB of WAL retained, wal_status {wal_status})"
    ))
}

/// The publication covers the source tables; tables beyond them cost
/// decoding for nothing.
async fn publication_extras(c: &Client, s: &Settings, r: &mut Report) -> Result<(), DbError> {
    let t = &s.tables;
    let published: Vec<String> = c
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables WHERE pubname = $1 ORDER BY 1",
            &[&s.publication],
        )
        .await
        .map_err(query_err("read pg_publication_tables"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let tables = [&t.tasks, &t.projects, &t.locks];
    let mut wanted: Vec<String> = tables
        .iter()
        .map(|name| format!("{}.{name}", t.schema))
        .collect();
    wanted.sort();
    let list = tables
        .iter()
        .map(|name| format!("{}.{}", quote_ident(&t.schema), quote_ident(name)))
        .collect::<Vec<_>>()
        .join(", ");
    r.check(
        published == wanted,
        format!(
            "publication {} covers exactly {}",
            s.publication,
            wanted.join(", ")
        ),
        format!(
            "publication {} covers {:?}, expected {:?}",
            s.publication, published, wanted
        ),
        format!(
            "ALTER PUBLICATION {} SET TABLE {list};",
            quote_ident(&s.publication)
        ),
    );
    Ok(())
}

/// States in which Postgres refuses the application's own UPDATE/DELETE
/// (see `source::writes`).
async fn application_writes(c: &Client, s: &Settings, r: &mut Report) -> Result<(), DbError> {
    let found = writes::inspect(c, s).await?;
    if found.broken.is_empty() {
        r.pass(
            "the publication and the source tables let the application's UPDATE and DELETE through",
        );
    }
    for violation in found.broken {
        r.violated(violation);
    }
    for Violation { problem, fix } in found.warnings {
        r.add(Status::Warn, problem, Some(fix));
    }
    for note in found.notes {
        r.add(Status::Info, note, None);
    }
    Ok(())
}

/// Whether walcast has a checkpoint for `slot` (false if its tables are missing:
/// that is reported by its own check).
async fn has_checkpoint(c: &Client, slot: &str) -> Result<bool, tokio_postgres::Error> {
    let row = c
        .query_one(
            "SELECT CASE WHEN to_regclass('walcast.checkpoints') IS NULL THEN false
                         ELSE has_table_privilege('walcast.checkpoints', 'SELECT') END",
            &[],
        )
        .await?;
    if !row.get::<_, bool>(0) {
        return Ok(false);
    }
    Ok(c.query_opt(
        "SELECT 1 FROM walcast.checkpoints WHERE slot = $1",
        &[&slot],
    )
    .await?
    .is_some())
}

/// The first nats-server release whose `sync_interval: always` survives a
/// power loss during block compaction (#8456, #8475, merged after v2.14.5).
const SYNC_ALWAYS_SAFE: [u32; 3] = [2, 14, 6];

async fn nats(s: &Settings, r: &mut Report) {
    let Some(client) = nats_client(s, r).await else {
        return;
    };
    nats_version(s.confirm_delay, &client.server_info().version, r);
    let js = async_nats::jetstream::new(client);
    match js.query_account().await {
        Ok(_) => r.pass("JetStream is enabled"),
        Err(e) => {
            return r.fail(
                format!("JetStream is not available: {e}"),
                "start nats-server with -js (or a jetstream {} block)",
            );
        }
    }
    stream(&js, s, r).await;
    state_bucket(&js, s, r).await;
}

/// Connects as `walcast run` would, or says why it cannot.
async fn nats_client(s: &Settings, r: &mut Report) -> Option<async_nats::Client> {
    let url = redact_url(&s.nats_url);
    let connect = crate::broker::connect_once(s, "walcast-check");
    let (problem, fix): (String, &str) =
        match tokio::time::timeout(Duration::from_secs(10), connect).await {
            Ok(Ok(client)) => {
                r.pass(format!(
                    "NATS reachable at {url} (server {})",
                    client.server_info().version
                ));
                return Some(client);
            }
            Ok(Err(BrokerError::Refused { url, reason, fix })) => {
                r.fail(format!("NATS at {url} refused walcast: {reason}"), fix);
                return None;
            }
            Ok(Err(BrokerError::Setup(reason))) => {
                (reason, "fix --nats-creds / --nats-nkey / --nats-ca")
            }
            Ok(Err(BrokerError::Unreachable { reason, .. })) => (
                format!("NATS unreachable at {url}: {reason}"),
                "check that nats-server runs and that --nats-url is right",
            ),
            Err(_) => (
                format!("NATS at {url} did not answer within 10 s"),
                "check --nats-url and firewalls",
            ),
        };
    r.fail(problem, fix);
    None
}

/// A server version's release numbers: `2.14.6-RC.1` is `[2, 14, 6]`.
fn release_numbers(server: &str) -> Vec<u32> {
    let release = server.split(['-', '+']).next().unwrap_or_default();
    release.split('.').map_while(|p| p.parse().ok()).collect()
}

/// The server's version: supported, and safe with the confirm delay.
fn nats_version(confirm_delay: Duration, server: &str, r: &mut Report) {
    let version = release_numbers(server);
    r.check(
        version.as_slice() >= [2, 10].as_slice(),
        format!("NATS server {server} is supported"),
        format!("NATS server {server} is too old"),
        "upgrade nats-server to 2.10 or newer",
    );
    if confirm_delay.is_zero() && version.as_slice() < SYNC_ALWAYS_SAFE.as_slice() {
        r.add(
            Status::Warn,
            format!(
                "--confirm-delay 0 with NATS server {server}: before v2.14.6, block compaction could lose acknowledged \
                 messages on a power loss even with `sync_interval: always` (nats-server #8456, #8475)"
            ),
            Some(
                "upgrade every NATS server to v2.14.6 or newer (with `jetstream { sync_interval: always }`), \
                 or keep --confirm-delay at its default 2m"
                    .into(),
            ),
        );
    }
}

/// The stream: compatible (or to be created), and whole.
async fn stream(js: &async_nats::jetstream::Context, s: &Settings, r: &mut Report) {
    match crate::publish::stream::verify_existing(js, s).await {
        Ok(Some(stream)) => {
            r.pass(format!("stream {} exists and is compatible", s.stream));
            let server = js.client().server_info().version;
            consumer_limit(&stream.cached_info().config, &server, r);
            let missing = stream.cached_info().state.deleted_count.unwrap_or(0);
            if missing > 0 {
                r.add(
                    Status::Warn,
                    format!(
                        "stream {} misses {missing} messages from its middle (deleted, or lost by the broker)",
                        s.stream
                    ),
                    Some(
                        "`walcast run` names them (README \"Broker data loss\"): it stops at a hole the slot still \
                         holds, and reports older ones"
                            .into(),
                    ),
                );
            }
        }
        Ok(None) => r.pass(format!(
            "stream {} does not exist yet; `walcast run` creates it",
            s.stream
        )),
        Err(e) => r.fail(
            e.to_string(),
            format!(
                "fix or remove stream {}, or pick another --stream",
                s.stream
            ),
        ),
    }
}

/// A stream without a consumer limit takes only `default_max_consumers`
/// (1,000 unless configured) on nats-server 2.15 or newer (`broker::limits`).
fn consumer_limit(config: &async_nats::jetstream::stream::Config, server: &str, r: &mut Report) {
    if config.max_consumers > 0 || release_numbers(server).as_slice() < [2, 15].as_slice() {
        return;
    }
    let (name, limit) = (&config.name, crate::broker::limits::MAX_CONSUMERS);
    r.add(
        Status::Warn,
        format!(
            "stream {name} has no consumer limit: NATS server {server} caps it at its default_max_consumers \
             (1,000 unless configured), and refuses clients past that"
        ),
        Some(format!(
            "`walcast run` gives it {limit} when it starts; or run `nats stream edit {name} --max-consumers {limit}`"
        )),
    );
}

/// The state bucket (SPEC §8): compatible, and whether its backfill is done.
async fn state_bucket(js: &async_nats::jetstream::Context, s: &Settings, r: &mut Report) {
    let Some(name) = &s.state_bucket else {
        return r.pass("the state bucket is turned off (--state-bucket is empty)");
    };
    match crate::state::bucket::inspect(js, name).await {
        Ok(None) => r.pass(format!("state bucket {name} does not exist yet; `walcast run` creates and backfills it")),
        Ok(Some(Some(marker))) if marker.is_complete() => r.pass(format!(
            "state bucket {name} is backfilled ({} rows from the snapshot at {})",
            marker.rows.unwrap_or(0),
            marker.snapshot_lsn.as_deref().unwrap_or("?")
        )),
        Ok(Some(marker)) => r.pass(format!(
            "state bucket {name} exists; its backfill is {} (clients wait for it)",
            marker.map_or("not started".to_string(), |m| m.state)
        )),
        Err(e) => r.fail(e, format!("delete state bucket {name} (walcast recreates and backfills it) or pick another --state-bucket")),
    }
}

fn check_query(source: tokio_postgres::Error) -> DbError {
    DbError::Query {
        what: "a check query",
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn version_lines(confirm_delay: Duration, server: &str) -> Vec<(Status, String)> {
        let mut r = Report::default();
        nats_version(confirm_delay, server, &mut r);
        r.0.into_iter().map(|l| (l.status, l.text)).collect()
    }

    fn warns(server: &str) -> bool {
        version_lines(Duration::ZERO, server)
            .iter()
            .any(|(status, text)| *status == Status::Warn && text.contains("v2.14.6"))
    }

    #[test]
    fn release_numbers_ignore_prerelease_and_build_tags() {
        assert_eq!(release_numbers("2.15.1"), [2, 15, 1]);
        assert_eq!(release_numbers("2.14.6-RC.1"), [2, 14, 6]);
        assert_eq!(release_numbers("2.12.0+build.7"), [2, 12, 0]);
        assert_eq!(release_numbers("garbage"), Vec::<u32>::new());
    }

    #[test]
    fn a_zero_confirm_delay_warns_below_the_first_safe_release() {
        for old in ["2.10.26", "2.12.8", "2.14.5"] {
            assert!(warns(old), "{old}");
        }
        for safe in ["2.14.6", "2.15.1", "3.0.0"] {
            assert!(!warns(safe), "{safe}");
        }
        let default_delay = version_lines(Duration::from_secs(120), "2.12.8");
        assert!(default_delay.iter().all(|(s, _)| *s == Status::Pass));
    }

    #[test]
    fn a_stream_without_a_consumer_limit_warns_from_2_15() {
        let warned = |max_consumers: i32, server: &str| {
            let config = async_nats::jetstream::stream::Config {
                name: "WALCAST".into(),
                max_consumers,
                ..Default::default()
            };
            let mut r = Report::default();
            consumer_limit(&config, server, &mut r);
            r.0.iter().any(|l| {
                l.status == Status::Warn && l.text.contains("stream WALCAST has no consumer limit")
            })
        };
        assert!(warned(-1, "2.15.1"));
        assert!(warned(0, "2.16.0"));
        assert!(!warned(-1, "2.14.6"), "no default cap before 2.15");
        assert!(!warned(100_000, "2.15.1"));
        assert!(!warned(50, "2.15.1"), "an operator's limit is theirs");
    }

    #[test]
    fn servers_before_2_10_fail() {
        let lines = version_lines(Duration::from_secs(120), "2.9.25");
        assert_eq!(lines[0].0, Status::Fail, "{lines:?}");
        assert_eq!(version_lines(Duration::ZERO, "2.10.0")[0].0, Status::Pass);
    }
}
