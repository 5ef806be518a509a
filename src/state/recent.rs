//! Where the projection stood over the last minutes, in this process.
//!
//! A broker acknowledges a write before it fsyncs it (SPEC §4.7), and one
//! that restarts can lose acknowledged writes — not only the newest: a key
//! whose new value is lost may lose its old one too (history 1). So after
//! its connection dropped, the state service does not trust the bucket's
//! newest entry alone: it re-checks every position applied within the loss
//! horizon, key by key, which rewrites whatever the broker lost and never
//! steps a key back (`project::Resume`).

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Samples kept: one a second covers well over the loss horizon.
const KEEP: usize = 1200;

static SAMPLES: Mutex<VecDeque<(Instant, u64)>> = Mutex::new(VecDeque::new());

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
