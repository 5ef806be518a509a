//! Where the projection stood over the last minutes, in this process.
//!
//! A broker acknowledges a write before it fsyncs it (SPEC §4.7), and one
//! that restarts can lose acknowledged writes — not only the newest: a key
//! whose new value is lost may lose its old one too (history 1). So after
//! its connection dropped, the state service does not trust the bucket's
//! newest entry alone: it re-checks every position applied within the loss
//! horizon, key by key, which rewrites whatever the broker lost and never
//! steps a key back (`project::Resume`).
//!
//! A start that follows a stop by the pipeline, not a failure, skips that
//! re-check when nothing can have been lost since it was last done
//! ([`continuous`]): a pipeline restart (a stream leader change, a foreign
//! message) then costs the state no key-by-key reads (docs/BENCHMARKS.md,
//! session 31: 120k of them doubled such a restart's stall at 1,000/s).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Samples kept: one a second covers well over the loss horizon.
const KEEP: usize = 1200;

static SAMPLES: Mutex<VecDeque<(Instant, u64)>> = Mutex::new(VecDeque::new());

/// The last start's server (`server_id`) and the position its re-check
/// ran through, until a state service fails or the stream is found to
/// have lost acknowledged messages.
static LAST_START: Mutex<Option<(String, u64)>> = Mutex::new(None);

/// Remembers that every position up to `applied` is written now.
pub fn record(applied: u64) {
    let mut samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    if samples.len() >= KEEP {
        samples.pop_front();
    }
    samples.push_back((Instant::now(), applied));
}

/// The position applied at least `horizon` ago, if this process has been
/// projecting that long.
pub fn trusted(horizon: Duration) -> Option<u64> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let cutoff = Instant::now().checked_sub(horizon)?;
    samples
        .iter()
        .rev()
        .find(|(at, _)| *at <= cutoff)
        .map(|(_, p)| *p)
}

/// The oldest and newest positions this process knows, if any.
pub fn known() -> Option<(u64, u64)> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    Some((samples.front()?.1, samples.back()?.1))
}

/// A state service starts on a connection to the server `server_id` and
/// re-checks through `through`: whether it may skip re-checking what
/// earlier starts wrote. Only if the last start of this process was to the
/// same server process, no state service failed since (a dropped
/// connection fails it), and the last start's own re-check was done (the
/// newest position known reached its end). A nats-server loses
/// acknowledged writes only when it restarts, and a restarted server has a
/// new `server_id`. Not covered, as the running service does not see it
/// either: a bucket whose leader is another cluster node, which restarts
/// while this connection stays up.
pub fn continuous(server_id: &str, through: u64) -> bool {
    let mut last = LAST_START.lock().unwrap_or_else(|e| e.into_inner());
    let newest = known().map(|(_, newest)| newest);
    let skip = may_skip(last.as_ref(), newest, server_id);
    *last = Some((server_id.to_string(), through));
    skip
}

/// A state service failed, or the stream lost acknowledged messages: the
/// next start re-checks.
pub fn distrust() {
    *LAST_START.lock().unwrap_or_else(|e| e.into_inner()) = None;
}

fn may_skip(last: Option<&(String, u64)>, newest: Option<u64>, server_id: &str) -> bool {
    matches!((last, newest), (Some((id, through)), Some(newest)) if id == server_id && newest >= *through)
}

#[cfg(test)]
mod tests {
    use super::may_skip;

    #[test]
    fn only_the_same_server_after_a_finished_recheck_is_trusted() {
        let last = ("NSERVER".to_string(), 100);
        assert!(may_skip(Some(&last), Some(100), "NSERVER"));
        assert!(may_skip(Some(&last), Some(250), "NSERVER"));
        // The last start's re-check had not reached its end.
        assert!(!may_skip(Some(&last), Some(99), "NSERVER"));
        // Another server process: restarted, or another node.
        assert!(!may_skip(Some(&last), Some(250), "NOTHER"));
        // The first start of the process, or one after a failure.
        assert!(!may_skip(None, Some(250), "NSERVER"));
        assert!(!may_skip(Some(&last), None, "NSERVER"));
    }
}
