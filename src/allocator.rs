//! Keeps the allocator's free memory from counting as walcast's (glibc).
//!
//! glibc serves a large allocation from the heap once the process has freed
//! one as large (its mmap threshold adapts), and a block freed inside the
//! heap stays resident. Each time a hash table doubles it frees the old
//! one: a 100,000-tenant drain left ~8 MB of such holes (heaptrack: 29 MB
//! live against 37 MB anonymous RSS). So blocks of 128 KiB and more always
//! get their own mapping (returned to the OS when freed), and the free
//! pages left inside the heap are returned once a second. Measured on that
//! drain: peak RSS 50.2 -> 48.8 MB with the threshold, 50.0 without it;
//! CPU per event unchanged within one round's noise (docs/BENCHMARKS.md).

use std::time::Duration;

/// How often free heap pages are returned (`malloc_trim`: ~0.01 % of the
/// drain's CPU in `perf`; nothing to do when idle).
const TRIM_EVERY: Duration = Duration::from_secs(1);

/// Fixes the mmap threshold; call once, before other threads start.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes glibc's allocation thresholds; setting
    // one also stops glibc from moving it.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 << 10);
    }
}

/// Returns the heap's free pages every [`TRIM_EVERY`] for the life of the
/// runtime (no-op off glibc).
pub fn spawn_trimmer() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(async {
        let mut tick = tokio::time::interval(TRIM_EVERY);
        loop {
            tick.tick().await;
            // SAFETY: malloc_trim only releases free memory.
            unsafe {
                libc::malloc_trim(0);
            }
        }
    });
}
