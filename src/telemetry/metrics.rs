//! Metric names, described once. Prometheus conventions: `walcast_<noun>_<unit>`,
//! `_total` for counters; labels are low-cardinality (never a tenant).

use std::sync::OnceLock;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

pub const EVENTS_PUBLISHED: &str = "walcast_events_published_total";
pub const EVENTS_BUILT: &str = "walcast_events_built_total";
pub const EVENT_BYTES: &str = "walcast_event_bytes_total";
pub const DEAD_LETTERS: &str = "walcast_dead_letters_total";
pub const FOREIGN_MESSAGES: &str = "walcast_stream_foreign_messages_total";
pub const PUBLISH_ACK_SECONDS: &str = "walcast_publish_ack_seconds";
pub const REPLICATION_LAG_BYTES: &str = "walcast_replication_lag_bytes";
pub const REPLICATION_LAG_SECONDS: &str = "walcast_replication_lag_seconds";
pub const SLOT_RETAINED_WAL_BYTES: &str = "walcast_slot_retained_wal_bytes";
pub const SLOT_CONFIRM_LAG_BYTES: &str = "walcast_slot_confirm_lag_bytes";
pub const CHECKPOINT_AGE_SECONDS: &str = "walcast_checkpoint_age_seconds";
pub const LAST_CHECKPOINT_TIMESTAMP: &str = "walcast_last_checkpoint_timestamp_seconds";
pub const CONFIRMED_LSN: &str = "walcast_confirmed_lsn";
pub const PIPELINE_RESTARTS: &str = "walcast_pipeline_restarts_total";
pub const SOURCE_READ_PAUSES: &str = "walcast_source_read_pauses_total";
pub const NATS_RECONNECTS: &str = "walcast_nats_reconnects_total";
pub const ERRORS: &str = "walcast_errors_total";
pub const REPUBLISHED_EVENTS: &str = "walcast_republished_events_total";
pub const STREAM_MISSING_MESSAGES: &str = "walcast_stream_missing_messages";
pub const CATCHUP_REQUESTS: &str = "walcast_catchup_requests_total";
pub const CATCHUP_SECONDS: &str = "walcast_catchup_seconds";
pub const CATCHUP_INDEX_BYTES: &str = "walcast_catchup_index_bytes";
pub const CATCHUP_INDEX_LOADED_POSITIONS: &str = "walcast_catchup_index_loaded_positions";
pub const CATCHUP_INDEX_READ_BACK_MESSAGES: &str = "walcast_catchup_index_read_back_messages";
pub const CATCHUP_INDEX_LOAD_SECONDS: &str = "walcast_catchup_index_load_seconds";
pub const CATCHUP_ANSWERS_FROM_SAVED: &str = "walcast_catchup_answers_from_saved_total";
pub const CATCHUP_SEGMENTS_SAVED: &str = "walcast_catchup_segments_saved_total";
pub const CATCHUP_SEGMENTS_DROPPED: &str = "walcast_catchup_segments_dropped_total";
pub const UP: &str = "walcast_up";
pub const STATE_WRITES: &str = "walcast_state_writes_total";
pub const STATE_SKIPPED: &str = "walcast_state_skipped_total";
pub const STATE_LAG_EVENTS: &str = "walcast_state_lag_events";
pub const STATE_APPLIED: &str = "walcast_state_applied_stream_seq";
pub const STATE_READ: &str = "walcast_state_events_read_total";
pub const BACKFILL_ROWS: &str = "walcast_state_backfill_rows_total";
pub const BACKFILL_RUNNING: &str = "walcast_state_backfill_running";
pub const AUTH_ALLOWED: &str = "walcast_auth_allowed_total";
pub const AUTH_REFUSED: &str = "walcast_auth_refused_total";
pub const AUTH_SECONDS: &str = "walcast_auth_seconds";

/// Installs the process-wide recorder once and returns its handle.
pub fn install() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let latency = [
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ];
        let handle = PrometheusBuilder::new()
            .set_buckets(&latency)
            .expect("static bucket list is not empty")
            .install_recorder()
            .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder().handle());
        describe();
        show_incidents_at_zero();
        // Histogram samples wait in the recorder until a render or an upkeep
        // folds them into buckets: without a Prometheus scrape they would
        // grow with every event. Fold them in regularly.
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("walcast-metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(std::time::Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .ok();
        handle
    })
}

/// Counters of incidents are on `/metrics` from the start, at 0, not only
/// after the first one: SPEC §5 lists errors and dead letters among the
/// metrics, and `increase()` or `rate()` over a series that appears with
/// its first incident misses that incident.
fn show_incidents_at_zero() {
    metrics::counter!(DEAD_LETTERS).absolute(0);
    metrics::counter!(FOREIGN_MESSAGES).absolute(0);
    for stage in crate::pipeline::PipelineError::STAGES {
        metrics::counter!(ERRORS, "stage" => stage).absolute(0);
    }
}

fn describe() {
    describe_counter!(
        EVENTS_PUBLISHED,
        "Events acknowledged by JetStream, by entity and action"
    );
    describe_counter!(
        EVENT_BYTES,
        Unit::Bytes,
        "Encoded event bytes acknowledged by JetStream"
    );
    describe_counter!(
        DEAD_LETTERS,
        "Events published to <prefix>._deadletter (tenant id not routable)"
    );
    describe_counter!(
        FOREIGN_MESSAGES,
        "Messages found in the stream that walcast did not publish (skipped; README \"Tenant isolation at the broker\")"
    );
    describe_histogram!(
        PUBLISH_ACK_SECONDS,
        Unit::Seconds,
        "Time from publish to JetStream acknowledgement (one sample per ack; an ack stands for every event before it)"
    );
    describe_gauge!(
        REPLICATION_LAG_BYTES,
        Unit::Bytes,
        "Server WAL position minus the last acknowledged commit"
    );
    describe_gauge!(
        REPLICATION_LAG_SECONDS,
        Unit::Seconds,
        "Age of the newest acknowledged event's commit when it was acknowledged"
    );
    describe_gauge!(
        SLOT_RETAINED_WAL_BYTES,
        Unit::Bytes,
        "WAL the replication slot keeps (current WAL LSN - restart_lsn)"
    );
    describe_gauge!(
        SLOT_CONFIRM_LAG_BYTES,
        Unit::Bytes,
        "WAL past the slot's confirmed flush LSN (current WAL LSN - confirmed_flush_lsn): what Postgres resends after a restart; about the confirm delay's worth when healthy"
    );
    describe_gauge!(
        CHECKPOINT_AGE_SECONDS,
        Unit::Seconds,
        "Seconds since the last durable checkpoint"
    );
    describe_gauge!(
        LAST_CHECKPOINT_TIMESTAMP,
        Unit::Seconds,
        "Unix time of the last durable checkpoint"
    );
    describe_gauge!(CONFIRMED_LSN, "LSN last confirmed to the slot");
    describe_counter!(
        PIPELINE_RESTARTS,
        "Pipeline restarts from the checkpoint after an error, by stage"
    );
    describe_counter!(
        SOURCE_READ_PAUSES,
        "Short pauses of the replication reader while it is behind, so the walsender's writes batch (loopback TCP only)"
    );
    describe_counter!(NATS_RECONNECTS, "NATS disconnections");
    describe_counter!(ERRORS, "Errors, by stage");
    describe_counter!(
        REPUBLISHED_EVENTS,
        "Events republished because the broker lost them (SPEC §4.7)"
    );
    describe_gauge!(
        STREAM_MISSING_MESSAGES,
        "Messages missing from the middle of the stream (deleted or lost by the broker), as of the last (re)connect"
    );
    describe_catchup();
    describe_state();
    describe_auth();
    describe_gauge!(UP, "1 while walcast holds the slot and publishes");
}

/// The catch-up service's and its index's metrics (SPEC §7).
fn describe_catchup() {
    describe_counter!(CATCHUP_REQUESTS, "Catch-up requests, by result code");
    describe_histogram!(CATCHUP_SECONDS, Unit::Seconds, "Catch-up request latency");
    describe_gauge!(
        CATCHUP_INDEX_BYTES,
        Unit::Bytes,
        "Memory of the catch-up index: exact positions of recent events (bounded) and samples"
    );
    describe_gauge!(
        CATCHUP_INDEX_LOADED_POSITIONS,
        "Exact positions the catch-up index loaded from saved segments when this run started"
    );
    describe_gauge!(
        CATCHUP_INDEX_READ_BACK_MESSAGES,
        "Stream messages read back (not covered by saved segments) before the catch-up index was loaded"
    );
    describe_gauge!(
        CATCHUP_INDEX_LOAD_SECONDS,
        Unit::Seconds,
        "Time this run took to load the catch-up index from saved segments"
    );
    describe_counter!(
        CATCHUP_ANSWERS_FROM_SAVED,
        "Catch-up answers found in the saved segments while a restart was loading them"
    );
    describe_counter!(
        CATCHUP_SEGMENTS_SAVED,
        "Segments of exact catch-up positions saved to walcast.catchup_segments"
    );
    describe_counter!(
        CATCHUP_SEGMENTS_DROPPED,
        "Segments of exact catch-up positions not saved because the writer was behind (a restart reads their range back)"
    );
}

/// The auth callout's metrics (SPEC §9).
fn describe_auth() {
    describe_counter!(
        AUTH_ALLOWED,
        "Auth callout logins allowed (a tenant user issued)"
    );
    describe_counter!(
        AUTH_REFUSED,
        "Auth callout logins refused, by reason (expired, bad_signature, no_tenant, invalid_tenant, ...)"
    );
    describe_histogram!(
        AUTH_SECONDS,
        Unit::Seconds,
        "Time to answer one auth callout request"
    );
}

/// The state bucket's metrics (SPEC §8).
fn describe_state() {
    describe_counter!(
        STATE_WRITES,
        "Row values and delete markers written to the state bucket by the projection"
    );
    describe_counter!(
        STATE_SKIPPED,
        "Events and rows left out of the state bucket, by reason (no_tenant, invalid_key, missing_from_stream)"
    );
    describe_gauge!(
        STATE_LAG_EVENTS,
        "Stream messages acknowledged but not yet applied to the state bucket"
    );
    describe_counter!(
        STATE_READ,
        "Stream messages the state projection read, by source: feed (handed over by the publisher once acknowledged) or stream (read back from JetStream: after a restart, or while the state is behind)"
    );
    describe_gauge!(
        STATE_APPLIED,
        "Stream sequence up to which every message is applied to the state bucket"
    );
    describe_counter!(
        BACKFILL_ROWS,
        "Rows the state backfill copied from its snapshot (written, or kept because the bucket held a newer value)"
    );
    describe_gauge!(BACKFILL_RUNNING, "1 while a state backfill copies rows");
}
