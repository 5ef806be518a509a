//! The backfill: rows that existed before walcast (or before the bucket was
//! purged) copied into the bucket from one snapshot, while the stream flows.
//!
//! Invariant owned here: a copied row never overwrites anything. The
//! snapshot is a REPEATABLE READ transaction; `lsn`, read inside it, is past
//! every commit it sees. Rows are written only once the projection has
//! applied every event committed before `lsn`, and only where the key has
//! no entry at all (create-only). So a key the stream ever touched keeps the
//! stream's newer value or delete marker, and a copied row has no event up
//! to what the projection has applied — its `Walcast-Seq: 0` is true.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream;
use bytes::Bytes;
use pbjson_types::Timestamp;
use prost::Message as _;
use tokio_postgres::{Client, SimpleQueryMessage, SimpleQueryRow};

use super::bucket::{self, Marker};
use super::layout::{self, Skip};
use super::objects::Objects;
use super::writer::{self, Writer};
use crate::config::Settings;
use crate::database::{Database, quote_ident};
use crate::decode::{Column, Relation, ReplicaIdentity};
use crate::events::row::{Cell, Image};
use crate::events::{self, Layout, OutEvent, Route, tenant};
use crate::lsn::Lsn;
use crate::publish::oversized::Oversized;
use crate::publish::sink::JetStream;
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// Rows fetched per round trip.
const PAGE: usize = 1000;
/// Rows at least this large (encoded) are looked up before they are
/// written: one that does not fit `max_payload` is stored aside first.
const LARGE: usize = 64 * 1024;
/// Progress goes to the log and the marker this often.
const REPORT_EVERY: Duration = Duration::from_secs(5);
/// The longest the `complete` marker waits for a clustered bucket's
/// replicas to store the copied rows.
const REPLICAS_WAIT: Duration = Duration::from_secs(30);

/// What a backfill needs from the service.
pub struct Backfill<'a> {
    pub settings: &'a Settings,
    pub db: &'a Database,
    pub js: &'a jetstream::Context,
    /// The bucket (to look before storing a large row aside).
    pub store: &'a async_nats::jetstream::kv::Store,
    /// Where oversized rows are stored aside (the state's own object store).
    pub objects: &'a super::objects::Objects,
    /// Also holds the projection's position (every stream message up to it applied).
    pub health: &'a Health,
}

impl Backfill<'_> {
    /// Copies every row of the three tables; returns how many it read.
    pub async fn run(&self) -> Result<u64, String> {
        let bucket = self.bucket();
        let sql = self.db.connect().await.map_err(|e| e.to_string())?;
        let lsn = snapshot(&sql).await?;
        tracing::info!(bucket, snapshot_lsn = %lsn, "state backfill started");
        metrics::gauge!(m::BACKFILL_RUNNING).set(1.0);
        let running = Marker::new("running", Some(lsn.to_string()), Some(0));
        bucket::set_marker(self.js, bucket, &running, self.applied()).await?;
        self.flush_marker_through_the_wal().await;
        self.wait_until_applied(lsn).await;
        let sink = JetStream::new(self.js.clone(), &self.settings.stream)
            .await
            .map_err(|e| e.to_string())?;
        let mut copy = Copy::new(self, lsn, sink).await?;
        let tables = &self.settings.tables;
        for table in [&tables.projects, &tables.tasks, &tables.locks] {
            copy.table(&sql, &tables.schema, table).await?;
        }
        copy.writer.flush().await?;
        sql.batch_execute("COMMIT")
            .await
            .map_err(|e| format!("end the backfill snapshot in Postgres: {e}"))?;
        self.wait_for_replicas().await;
        let complete = Marker::new("complete", Some(lsn.to_string()), Some(copy.rows));
        bucket::set_marker(self.js, bucket, &complete, self.applied()).await?;
        metrics::gauge!(m::BACKFILL_RUNNING).set(0.0);
        tracing::info!(
            bucket,
            rows = copy.rows,
            written = copy.writer.written,
            kept_newer = copy.writer.kept_newer,
            seconds = copy.began.elapsed().as_secs_f64(),
            "state backfill complete"
        );
        Ok(copy.rows)
    }

    fn bucket(&self) -> &str {
        self.settings.state_bucket.as_deref().unwrap_or_default()
    }

    fn applied(&self) -> u64 {
        self.health.state_applied().load(Ordering::SeqCst)
    }

    /// A commit after the snapshot's LSN, so the pipeline's acknowledged
    /// position passes it at once even when the tables are idle (else the
    /// next keepalive, up to wal_sender_timeout / 2, would).
    async fn flush_marker_through_the_wal(&self) {
        let emitted = async {
            let sql = self.db.connect().await.map_err(|e| e.to_string())?;
            sql.batch_execute("SELECT pg_logical_emit_message(true, 'walcast.backfill', '')")
                .await
                .map_err(|e| e.to_string())
        };
        if let Err(e) = emitted.await {
            tracing::debug!(error = %e, "no WAL marker for the backfill: it waits for the next keepalive");
        }
    }

    /// Before the marker says `complete`, every replica of a clustered bucket
    /// should hold the copied rows: a loader reads the marker from the
    /// nearest replica and the rows through a consumer NATS places on any of
    /// them, so one still storing the backfill would serve a snapshot that
    /// misses rows. Bounded: a replica that is down cannot be waited for
    /// (docs/STATE.md, "Clustered buckets").
    async fn wait_for_replicas(&self) {
        let began = Instant::now();
        let mut behind = Vec::new();
        while began.elapsed() < REPLICAS_WAIT {
            behind = match self.replicas_behind().await {
                Ok(behind) if behind.is_empty() => return,
                Ok(behind) => behind,
                Err(e) => vec![e],
            };
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        tracing::warn!(
            behind = %behind.join(", "),
            "the state backfill is complete, but a replica of the bucket has not stored every copied row yet: until it has, a load served by it may miss backfilled rows; check that every NATS server of the cluster is up"
        );
    }

    /// The bucket's replicas that have not stored everything the leader has.
    async fn replicas_behind(&self) -> Result<Vec<String>, String> {
        let name = format!("KV_{}", self.bucket());
        let info = self
            .js
            .get_stream(&name)
            .await
            .map_err(|e| e.to_string())?
            .cached_info()
            .clone();
        let replicas = info
            .cluster
            .as_ref()
            .map(|c| c.replicas.as_slice())
            .unwrap_or_default();
        Ok(replicas
            .iter()
            .filter(|peer| !peer.current || peer.offline)
            .map(|peer| format!("{} (lag {})", peer.name, peer.lag.unwrap_or(0)))
            .collect())
    }

    /// Waits until the stream holds every event committed before `lsn` and
    /// the projection has applied them.
    async fn wait_until_applied(&self, lsn: Lsn) {
        let through = loop {
            let (acked_lsn, stream_seq) = self.health.acked_position();
            if acked_lsn >= lsn.0 {
                break stream_seq;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        while self.applied() < through {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(snapshot_lsn = %lsn, stream_seq = through, "the state holds every change before the backfill's snapshot; copying rows");
    }
}

/// Opens the snapshot: a read-only REPEATABLE READ transaction whose first
/// statement reads the WAL position (past every commit the snapshot sees).
async fn snapshot(sql: &Client) -> Result<Lsn, String> {
    let failed = |e: tokio_postgres::Error| format!("open the backfill snapshot in Postgres: {e}");
    sql.batch_execute(
        "SET datestyle = 'ISO, YMD'; SET timezone = 'UTC'; SET intervalstyle = 'iso_8601'; \
         SET extra_float_digits = 3; BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY",
    )
    .await
    .map_err(failed)?;
    let row = sql
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await
        .map_err(failed)?;
    let text: String = row.get(0);
    Lsn::parse(&text).ok_or_else(|| format!("unreadable WAL position {text:?}"))
}

/// One backfill's copying state.
struct Copy<'a> {
    backfill: &'a Backfill<'a>,
    lsn: Lsn,
    time: Timestamp,
    writer: Writer,
    /// The claim check, storing aside into the state's object store.
    oversized: Oversized,
    sink: JetStream,
    rows: u64,
    began: Instant,
    reported: Instant,
    warned: bool,
}

impl<'a> Copy<'a> {
    async fn new(backfill: &'a Backfill<'a>, lsn: Lsn, sink: JetStream) -> Result<Self, String> {
        let s = backfill.settings;
        let since_epoch = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Ok(Copy {
            backfill,
            lsn,
            time: Timestamp {
                seconds: since_epoch.as_secs() as i64,
                nanos: since_epoch.subsec_nanos() as i32,
            },
            // Its own position counter: a backfill write completes no stream position.
            writer: Writer::new(backfill.js, backfill.bucket(), Arc::default()).await?,
            oversized: Oversized::to(backfill.objects.bucket(s.stream_replicas)),
            sink,
            rows: 0,
            began: Instant::now(),
            reported: Instant::now(),
            warned: false,
        })
    }

    /// Copies one table through a cursor, a page at a time (bounded memory).
    async fn table(&mut self, sql: &Client, schema: &str, table: &str) -> Result<(), String> {
        let name = format!("{}.{}", quote_ident(schema), quote_ident(table));
        let failed =
            |e: tokio_postgres::Error| format!("read {name} from Postgres for the backfill: {e}");
        sql.batch_execute(&format!(
            "DECLARE walcast_backfill NO SCROLL CURSOR FOR SELECT * FROM {name}"
        ))
        .await
        .map_err(failed)?;
        let mut layout = None;
        loop {
            let page = sql
                .simple_query(&format!("FETCH {PAGE} FROM walcast_backfill"))
                .await
                .map_err(failed)?;
            let rows: Vec<&SimpleQueryRow> = page
                .iter()
                .filter_map(|m| match m {
                    SimpleQueryMessage::Row(row) => Some(row),
                    _ => None,
                })
                .collect();
            if rows.is_empty() {
                break;
            }
            let layout = layout
                .get_or_insert_with(|| layout_of(self.backfill.settings, schema, table, rows[0]));
            let Some(layout) = layout else {
                break; // not a configured table (cannot happen: the names come from the settings)
            };
            for row in rows {
                self.row(layout, row).await?;
            }
            self.report(table).await?;
        }
        sql.batch_execute("CLOSE walcast_backfill")
            .await
            .map_err(failed)?;
        Ok(())
    }

    async fn row(&mut self, layout: &Layout, row: &SimpleQueryRow) -> Result<(), String> {
        self.rows += 1;
        metrics::counter!(m::BACKFILL_ROWS).increment(1);
        let image: Image<'_> = (0..row.len())
            .map(|i| row.get(i).map_or(Cell::Null, Cell::Text))
            .collect();
        let mut event = events::snapshot_row(layout, &image, self.lsn.0, self.time)
            .map_err(|e| format!("encode a copied row of {}: {e}", layout.table))?;
        let key = match key_of(&event, layout) {
            Ok(key) => key,
            Err(skip) => {
                metrics::counter!(m::STATE_SKIPPED, "reason" => skip.label()).increment(1);
                if !self.warned {
                    self.warned = true;
                    tracing::warn!(table = %layout.table, reason = skip.label(), "a row has no valid state key (invalid tenant id or id): it is left out of the state bucket; counted in walcast_state_skipped_total");
                }
                return Ok(());
            }
        };
        event.event_id = format!("backfill-{:016X}-{key}", self.lsn.0);
        let mut out = out_event(&event, &key);
        // Stored aside (if at all) under the state's name for the value.
        let object = Objects::name_for(&key, 0);
        out.event_id.clone_from(&object);
        if out.payload.len() > LARGE && self.has_entry(&key).await? {
            // Most rows already have a newer entry; a large one would be
            // stored aside in the object store for nothing.
            self.writer.kept_newer += 1;
            return Ok(());
        }
        let mut headers = layout::headers(0, self.backfill.applied());
        writer::create_only(&mut headers);
        let payload = self
            .oversized
            .fit(&mut self.sink, &out, &mut headers)
            .await
            .map_err(|e| e.to_string())?;
        if headers.get(crate::headers::OBJECT).is_some() {
            self.backfill.objects.register(&key, &object).await;
        }
        self.writer.send(&key, &headers, payload, 0).await
    }

    async fn has_entry(&self, key: &str) -> Result<bool, String> {
        let entry = self
            .backfill
            .store
            .entry(key)
            .await
            .map_err(|e| format!("read {key} from the state bucket on NATS: {e}"))?;
        Ok(entry.is_some())
    }

    async fn report(&mut self, table: &str) -> Result<(), String> {
        if self.reported.elapsed() < REPORT_EVERY {
            return Ok(());
        }
        self.reported = Instant::now();
        tracing::info!(table, rows = self.rows, "state backfill copying");
        let marker = Marker::new("running", Some(self.lsn.to_string()), Some(self.rows));
        bucket::set_marker(
            self.backfill.js,
            self.backfill.bucket(),
            &marker,
            self.backfill.applied(),
        )
        .await
    }
}

/// The row's key, if its tenant id and id can be one.
fn key_of(event: &crate::proto::ChangeEvent, layout: &Layout) -> Result<String, Skip> {
    let tenant = tenant::validate(Some(&event.tenant_id)).map_err(|_| Skip::NoTenant)?;
    let entity = events::action::entity_token(layout.entity);
    layout::row_key(tenant, entity, &event.entity_id).ok_or(Skip::InvalidKey)
}

/// What the oversized check needs of an event.
fn out_event(event: &crate::proto::ChangeEvent, key: &str) -> OutEvent {
    OutEvent {
        event_id: event.event_id.clone(),
        subject: key.to_string(),
        route: Route::Tenant {
            tenant: Arc::from(event.tenant_id.as_str()),
            seq: crate::position::TenantSeq(0),
        },
        commit_lsn: Lsn(event.commit_lsn),
        commit_unix_micros: 0,
        entity: event.entity(),
        action: event.action(),
        payload: Bytes::from(event.encode_to_vec()),
    }
}

/// The layout of a table's rows as the cursor returns them.
fn layout_of(
    settings: &Settings,
    schema: &str,
    table: &str,
    row: &SimpleQueryRow,
) -> Option<Layout> {
    let relation = Relation {
        oid: 0,
        namespace: schema.to_string(),
        name: table.to_string(),
        replica_identity: ReplicaIdentity::Full,
        columns: row
            .columns()
            .iter()
            .map(|c| Column {
                name: c.name().to_string(),
                type_oid: 0,
                type_modifier: -1,
                is_key: false,
            })
            .collect(),
    };
    Layout::of(&settings.tables, &relation)
}
