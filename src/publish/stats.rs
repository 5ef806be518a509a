//! Publish metrics, aggregated per acknowledged batch instead of per event
//! (a labelled counter lookup per event would cost more than the event).

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::events::action::{entity_token, token};
use crate::proto::{Action, Entity};
use crate::telemetry::metrics as m;

/// Counts since the last flush.
#[derive(Default)]
pub struct Stats {
    by_kind: HashMap<(Entity, Action), u64>,
    bytes: u64,
    dead_letters: u64,
    newest_commit_micros: i64,
}

impl Stats {
    /// One event was acknowledged.
    pub fn acked(
        &mut self,
        entity: Entity,
        action: Action,
        bytes: usize,
        dead_letter: bool,
        commit_micros: i64,
    ) {
        *self.by_kind.entry((entity, action)).or_default() += 1;
        self.bytes += bytes as u64;
        self.dead_letters += u64::from(dead_letter);
        self.newest_commit_micros = self.newest_commit_micros.max(commit_micros);
    }

    /// An ack (standing for every event before it) came `latency` after
    /// its request.
    pub fn ack_latency(&mut self, latency: Duration) {
        metrics::histogram!(m::PUBLISH_ACK_SECONDS).record(latency.as_secs_f64());
    }

    /// Nothing to flush.
    pub fn is_empty(&self) -> bool {
        self.by_kind.is_empty() && self.newest_commit_micros == 0
    }

    /// Publishes the counts to the recorder.
    pub fn flush(&mut self) {
        for ((entity, action), n) in self.by_kind.drain() {
            metrics::counter!(m::EVENTS_PUBLISHED, "entity" => entity_token(entity), "action" => token(action)).increment(n);
        }
        if self.bytes > 0 {
            metrics::counter!(m::EVENT_BYTES).increment(std::mem::take(&mut self.bytes));
        }
        if self.dead_letters > 0 {
            metrics::counter!(m::DEAD_LETTERS).increment(std::mem::take(&mut self.dead_letters));
        }
        if self.newest_commit_micros > 0 {
            let now = unix_micros_now();
            let lag = (now - std::mem::take(&mut self.newest_commit_micros)).max(0) as f64 / 1e6;
            metrics::gauge!(m::REPLICATION_LAG_SECONDS).set(lag);
        }
    }
}

/// Now, in Unix microseconds (as events carry their commit time).
pub(super) fn unix_micros_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}
