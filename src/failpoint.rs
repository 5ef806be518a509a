//! Crash points for fault-injection tests (cargo feature `failpoints`).
//!
//! `WALCAST_CRASH_AT=<name>:<n>` makes the process abort — no cleanup, no
//! flush, like `kill -9` — the n-th time it reaches the point `<name>`.
//! Without the feature, [`crash_point`] compiles to nothing.
//!
//! Points: `mid_transaction` (an event of an open transaction was handed to
//! the publisher), `after_publish` (a publish was sent, its ack not yet
//! read), `after_ack` (an ack was read, not yet checkpointed),
//! `after_checkpoint` (checkpoint committed, LSN not yet confirmed).
//!
//! `WALCAST_HOLD_AT=<name>:<file>` makes a task wait at the point `<name>`
//! while `<file>` exists, so a test can look at the process mid-way and
//! then let it go on. Points: `index_trust` (a restart's catch-up index
//! load, its saved segments published to answers, not yet checked against
//! the stream), `index_load` (checked, before the load reads them) and
//! `state_apply` (the state projection, before it applies an event).

/// Aborts the process here if `WALCAST_CRASH_AT` names this point and hit count.
#[inline(always)]
pub fn crash_point(name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hit(name);
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

/// Waits here while the file `WALCAST_HOLD_AT` names for this point exists.
#[inline(always)]
pub async fn hold_point(name: &str) {
    #[cfg(feature = "failpoints")]
    imp::hold(name).await;
    #[cfg(not(feature = "failpoints"))]
    let _ = name;
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};

    static TARGET: OnceLock<Option<(String, u64)>> = OnceLock::new();
    static HITS: AtomicU64 = AtomicU64::new(0);

    pub fn hit(name: &str) {
        let target = TARGET.get_or_init(|| {
            let spec = std::env::var("WALCAST_CRASH_AT").ok()?;
            let (point, n) = spec.split_once(':')?;
            Some((point.to_string(), n.parse().ok()?))
        });
        if let Some((point, n)) = target
            && point == name
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *n
        {
            eprintln!("walcast: crash point {name} reached (hit {n}), aborting");
            std::process::abort();
        }
    }

    /// `WALCAST_HOLD_AT`, read once: a point may be reached per event.
    static HOLD: OnceLock<Option<(String, String)>> = OnceLock::new();

    pub async fn hold(name: &str) {
        let hold = HOLD.get_or_init(|| {
            let spec = std::env::var("WALCAST_HOLD_AT").ok()?;
            let (point, file) = spec.split_once(':')?;
            Some((point.to_string(), file.to_string()))
        });
        let Some((point, file)) = hold else {
            return;
        };
        let file = std::path::Path::new(file);
        if point != name || !file.exists() {
            return;
        }
        eprintln!("walcast: holding at {name} while {} exists", file.display());
        while file.exists() {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}
