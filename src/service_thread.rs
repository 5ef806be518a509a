//! A NATS service (the catch-up answers, the state bucket's writer, the
//! auth callout) on its own OS thread, with its own current-thread
//! Tokio runtime and its own NATS connection.
//!
//! Why: the pipeline runs on one thread (see `main.rs`), and the NATS client
//! runs one connection task per connection. A service on the pipeline's
//! runtime competes with the reader, publisher and checkpointer for that
//! thread, and its requests, probes and replies queue on the same socket as
//! the publisher's messages and acks. Measured: a flood of 10 × 2,000
//! catch-up requests raised commit → subscriber p99 from 17.9 ms to 146.6 ms
//! (issue 16). Here a flood costs the pipeline only what it costs the
//! machine (CPU, nats-server), never a place in its queue.
//!
//! Invariant: a service answers only while its [`ServiceThread`] is held.
//! Dropping it stops the thread and closes its connection before `drop`
//! returns (bounded by [`STOP_WAIT`]), so a new pipeline run never overlaps
//! an old run's service. A service that stops on its own — an error or a
//! panic — is reported by [`ServiceThread::failed`] as a [`ServiceError`],
//! and logged; a panic never crosses into the pipeline's thread. A service
//! started with [`start_restarting`] is instead served again on the same
//! thread after a backoff, so its outage never stops the pipeline and the
//! invariant above still holds.

use std::future::Future;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tokio::sync::{Notify, oneshot};

use crate::config::Settings;
use crate::telemetry::metrics as m;

/// How long dropping a [`ServiceThread`] waits for the thread to end.
pub const STOP_WAIT: Duration = Duration::from_secs(2);

/// A service that runs on its own thread and connection.
pub trait Service: Send + 'static {
    /// Names the thread (`walcast-<NAME>`), the NATS connection and log lines.
    const NAME: &'static str;
    /// The thread's nice value (0: the pipeline's priority). Raise it only
    /// for a service that shares no lock with the pipeline: a low-priority
    /// thread preempted while holding one stalls the pipeline behind it.
    const NICE: i32 = 0;
    /// Stop (fail) when the service's connection drops, instead of riding
    /// out the reconnect: for a writer whose in-memory position a broker
    /// that lost acknowledged messages would make wrong, and whose queued
    /// writes must not reach the server after such a loss.
    const FAIL_ON_DISCONNECT: bool = false;

    /// Called on the service's thread when it stopped on its own (an
    /// error, a panic, a dropped connection), not when its holder stopped
    /// it: what a failure makes the next start redo.
    fn on_failure() {}

    /// Sets up on `client` (this thread's own connection), calls
    /// [`Ready::serving`] once it answers, then serves until it fails.
    /// Returning at all is a failure: the service stops only when dropped.
    fn serve(
        self,
        client: async_nats::Client,
        ready: Ready,
    ) -> impl Future<Output = Result<(), String>>;
}

/// Tells [`start`] that the service is set up and answering.
pub struct Ready(oneshot::Sender<()>);

impl Ready {
    pub fn serving(self) {
        let _ = self.0.send(());
    }
}

/// Why a service thread did not start or stopped on its own.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The thread, its runtime, its connection or the service's own setup
    /// failed before it answered.
    #[error("the {service} service did not start: {reason}")]
    Start {
        service: &'static str,
        reason: String,
    },
    /// It answered, then stopped with an error.
    #[error("the {service} service stopped: {reason}")]
    Stopped {
        service: &'static str,
        reason: String,
    },
    #[error("the {service} service panicked: {message}")]
    Panicked {
        service: &'static str,
        message: String,
    },
}

impl ServiceError {
    /// The service's name, for logs and the `stage` metric label.
    pub fn service(&self) -> &'static str {
        match self {
            ServiceError::Start { service, .. }
            | ServiceError::Stopped { service, .. }
            | ServiceError::Panicked { service, .. } => service,
        }
    }
}

/// A running service; stopped (thread ended, connection closed) when dropped.
pub struct ServiceThread {
    service: &'static str,
    /// Dropping it tells the thread to stop.
    stop: Option<oneshot::Sender<()>>,
    /// How the thread ended, sent once; `None` once [`ServiceThread::failed`] took it.
    exit: Option<oneshot::Receiver<Result<(), ServiceError>>>,
    /// Disconnects when the thread ends (a std channel: waited on in `drop`).
    finished: mpsc::Receiver<()>,
    thread: Option<JoinHandle<()>>,
}

/// Starts `service` on a new thread and returns once it answers (or with
/// why it could not start).
pub async fn start<S: Service>(
    settings: &Settings,
    service: S,
) -> Result<ServiceThread, ServiceError> {
    let (ready_tx, ready) = oneshot::channel();
    let settings = settings.clone();
    let mut handle = spawn::<S>(move |stop| run(&settings, service, Ready(ready_tx), stop))?;
    match ready.await {
        Ok(()) => Ok(handle),
        // The thread ended before it was ready: say why.
        Err(_) => Err(match handle.failed().await {
            ServiceError::Stopped { service, reason } => ServiceError::Start { service, reason },
            other => other,
        }),
    }
}

/// Starts `service` on a new thread that serves until the handle is
/// dropped, starting it again (new connection, backoff) whenever it stops
/// or cannot start: for a service nothing else waits for, whose outage must
/// not stop the pipeline. Returns at once; [`ServiceThread::failed`]
/// reports only a panic.
pub fn start_restarting<S: Service + Clone>(
    settings: &Settings,
    service: S,
) -> Result<ServiceThread, ServiceError> {
    let settings = settings.clone();
    spawn::<S>(move |stop| run_restarting(&settings, service, stop))
}

/// Runs `body` on a new thread named after the service; a panic in it is
/// caught and reported as the thread's outcome.
fn spawn<S: Service>(
    body: impl FnOnce(oneshot::Receiver<()>) -> Result<(), ServiceError> + Send + 'static,
) -> Result<ServiceThread, ServiceError> {
    let (stop, stop_rx) = oneshot::channel();
    let (exit_tx, exit) = oneshot::channel();
    let (finished_tx, finished) = mpsc::channel::<()>();
    let thread = std::thread::Builder::new()
        .name(format!("walcast-{}", S::NAME))
        .spawn(move || {
            let _finished = finished_tx;
            let outcome =
                catch_unwind(AssertUnwindSafe(|| body(stop_rx))).unwrap_or_else(|panic| {
                    Err(ServiceError::Panicked {
                        service: S::NAME,
                        message: panic_message(panic.as_ref()),
                    })
                });
            if let Err(e) = &outcome {
                S::on_failure();
                tracing::error!(service = S::NAME, error = %e, "service thread ended");
            }
            let _ = exit_tx.send(outcome);
        })
        .map_err(|e| ServiceError::Start {
            service: S::NAME,
            reason: format!("cannot start its thread: {e}"),
        })?;
    Ok(ServiceThread {
        service: S::NAME,
        stop: Some(stop),
        exit: Some(exit),
        finished,
        thread: Some(thread),
    })
}

/// The thread's body: its runtime, its connection, the service until stopped.
fn run<S: Service>(
    settings: &Settings,
    service: S,
    ready: Ready,
    stop: oneshot::Receiver<()>,
) -> Result<(), ServiceError> {
    let runtime = thread_runtime::<S>()?;
    // Dropping the runtime on return cancels the service's tasks and closes
    // its connection: nothing of it outlives the thread.
    runtime.block_on(async {
        tokio::select! {
            failure = serve_once(settings, service, ready) => Err(failure),
            // Sent or dropped: either way the holder let go.
            _ = stop => Ok(()),
        }
    })
}

/// The body of a restarting service's thread: serves, and after each
/// failure logs it, counts it, waits a backoff and serves again on a new
/// connection, until stopped.
fn run_restarting<S: Service + Clone>(
    settings: &Settings,
    service: S,
    mut stop: oneshot::Receiver<()>,
) -> Result<(), ServiceError> {
    let runtime = thread_runtime::<S>()?;
    runtime.block_on(async {
        let mut backoff = RestartBackoff::default();
        loop {
            backoff.starting();
            let (ready, _) = oneshot::channel(); // nobody waits for a restart
            let failure = tokio::select! {
                failure = serve_once(settings, service.clone(), Ready(ready)) => failure,
                _ = &mut stop => return Ok(()),
            };
            S::on_failure();
            let wait = backoff.stopped();
            metrics::counter!(m::ERRORS, "stage" => S::NAME).increment(1);
            tracing::warn!(service = S::NAME, error = %failure, retry_in = ?wait, "service stopped; it starts again");
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = &mut stop => return Ok(()),
            }
        }
    })
}

/// The wait between a service's restarts: the run backoff, started over
/// once the service had served for [`RESTART_RESET`] (a service that fails
/// once a day waits 200 ms, one that fails at once waits longer each time).
#[derive(Debug)]
pub struct RestartBackoff {
    attempt: u32,
    began: Instant,
}

impl Default for RestartBackoff {
    fn default() -> Self {
        RestartBackoff {
            attempt: 0,
            began: Instant::now(),
        }
    }
}

impl RestartBackoff {
    /// A start begins now.
    pub fn starting(&mut self) {
        self.began = Instant::now();
    }

    /// The service stopped (or could not start): how long to wait.
    pub fn stopped(&mut self) -> Duration {
        if self.began.elapsed() > RESTART_RESET {
            self.attempt = 0;
        }
        let wait = crate::error_policy::run_backoff(self.attempt);
        self.attempt = self.attempt.saturating_add(1);
        wait
    }
}

/// A restarting service that served this long starts its backoff over.
const RESTART_RESET: Duration = Duration::from_secs(60);

/// The thread's own runtime (and priority).
fn thread_runtime<S: Service>() -> Result<tokio::runtime::Runtime, ServiceError> {
    if S::NICE > 0 {
        lower_priority(S::NICE);
    }
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ServiceError::Start {
            service: S::NAME,
            reason: format!("no async runtime: {e}"),
        })
}

/// Connects and serves once; completes only with why it stopped (a failed
/// connect before it answered is a `Start` error).
async fn serve_once<S: Service>(settings: &Settings, service: S, ready: Ready) -> ServiceError {
    let dropped = Arc::new(Notify::new());
    let watch = S::FAIL_ON_DISCONNECT.then(|| dropped.clone());
    let client = match connect(settings, S::NAME, watch).await {
        Ok(client) => client,
        Err(reason) => {
            return ServiceError::Start {
                service: S::NAME,
                reason,
            };
        }
    };
    tokio::select! {
        _ = dropped.notified() => ServiceError::Stopped {
            service: S::NAME,
            reason: "its NATS connection dropped; it starts again from what the broker holds".into(),
        },
        served = service.serve(client, ready) => ServiceError::Stopped {
            service: S::NAME,
            reason: served.err().unwrap_or_else(|| "it returned".into()),
        },
    }
}

/// The service's own NATS connection: one attempt (the pipeline's
/// connection is up when services start; if this one fails the run fails
/// and is retried with backoff), then the client reconnects by itself.
async fn connect(
    settings: &Settings,
    name: &str,
    on_disconnect: Option<Arc<Notify>>,
) -> Result<async_nats::Client, String> {
    crate::broker::connect_once_watched(settings, &format!("walcast-{name}"), on_disconnect)
        .await
        .map_err(|e| e.to_string())
}

impl ServiceThread {
    /// Completes only when the service stops on its own, with why. Cancel
    /// safe, so a pipeline can `select!` on it; pending forever once taken.
    pub async fn failed(&mut self) -> ServiceError {
        let Some(exit) = self.exit.as_mut() else {
            return std::future::pending().await;
        };
        let outcome = exit.await;
        self.exit = None;
        match outcome {
            Ok(Err(e)) => e,
            Ok(Ok(())) => ServiceError::Stopped {
                service: self.service,
                reason: "it stopped while still held".into(),
            },
            Err(_) => ServiceError::Panicked {
                service: self.service,
                message: "its thread ended without a result".into(),
            },
        }
    }
}

impl Drop for ServiceThread {
    fn drop(&mut self) {
        drop(self.stop.take());
        match self.finished.recv_timeout(STOP_WAIT) {
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                if let Some(thread) = self.thread.take() {
                    let _ = thread.join(); // ended: returns at once
                }
            }
            _ => tracing::warn!(
                service = self.service,
                wait = ?STOP_WAIT,
                "service thread did not stop in time; it ends on its own"
            ),
        }
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

/// Lowers the calling thread's CPU priority to `nice` (Linux; elsewhere a
/// no-op): background work that must never slow the pipeline.
pub(crate) fn lower_priority(nice: i32) {
    #[cfg(target_os = "linux")]
    // SAFETY: plain syscalls on the calling thread; no memory is passed.
    unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        if libc::setpriority(libc::PRIO_PROCESS, tid, nice) != 0 {
            tracing::debug!(nice, "could not lower the thread's priority");
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = nice;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The attempt a (jittered: half to all of 200 ms × 2^n) wait belongs to.
    fn attempt_of(wait: Duration) -> u32 {
        (0..8)
            .find(|n| {
                wait <= Duration::from_millis(200 << n) && wait >= Duration::from_millis(100 << n)
            })
            .expect("a run backoff")
    }

    #[test]
    fn restarts_back_off_and_start_over_after_a_long_service() {
        let mut backoff = RestartBackoff::default();
        let attempts: Vec<_> = (0..3)
            .map(|_| {
                backoff.starting();
                attempt_of(backoff.stopped())
            })
            .collect();
        assert_eq!(attempts, [0, 1, 2]);
        // This start served longer than RESTART_RESET: the wait is the first one again.
        backoff.starting();
        backoff.began -= RESTART_RESET + Duration::from_secs(1);
        assert_eq!(attempt_of(backoff.stopped()), 0);
        backoff.starting();
        assert_eq!(attempt_of(backoff.stopped()), 1);
    }
}
