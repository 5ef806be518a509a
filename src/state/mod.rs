//! The state bucket (SPEC §8): each tenant's current rows in NATS, tagged
//! with the `seq` they reflect, so a client loads a tenant and follows the
//! stream from there exactly, without touching Postgres. Layout and the
//! load protocol: docs/STATE.md.
//!
//! A service beside the pipeline, not a stage of it: it reads the stream
//! (so a key is written only after its event is in the stream, in stream
//! order) — handed over by the run's publisher as JetStream acknowledges it
//! (`feed`) while it keeps up, read back from JetStream otherwise — on its
//! own thread and NATS connection (`service_thread`), and runs
//! only while this instance holds the slot, so the bucket has one writer.
//! Its progress is the bucket's own newest entry (`project`), and a bucket
//! without a complete readiness marker is backfilled from a snapshot
//! (`backfill`).

mod backfill;
pub(crate) mod bucket;
pub mod demand;
mod durable;
pub mod feed;
pub(crate) mod layout;
mod objects;
mod project;
pub(crate) mod recent;
mod source;
mod writer;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;

use crate::config::Settings;
use crate::database::Database;
use crate::service_thread::{self, Ready, Service, ServiceError, ServiceThread};
use crate::telemetry::health::Health;
use crate::telemetry::metrics as m;

/// How often the readiness marker is looked at for a requested backfill.
const MARKER_POLL: Duration = Duration::from_secs(1);

/// A running state service; stopped when dropped.
pub struct StateService {
    thread: ServiceThread,
    lag: tokio::task::JoinHandle<()>,
}

impl Drop for StateService {
    fn drop(&mut self) {
        self.lag.abort();
    }
}

impl StateService {
    /// Completes only if the service's thread ends on its own (a panic):
    /// other failures restart it in place.
    pub async fn failed(&mut self) -> ServiceError {
        self.thread.failed().await
    }
}

/// Starts the state service, unless the state is turned off. Returns at
/// once: the pipeline never waits for the state, and a state service that
/// stops (its connection dropped, a cluster electing the bucket's leader,
/// a bucket it cannot use) starts again on its thread after a backoff,
/// logged, counted in `walcast_errors_total{stage="state"}`, while the
/// stream goes on.
///
/// `feed` is this run's: the publisher fills it with the events JetStream
/// acknowledged.
pub fn start(
    settings: &Settings,
    db: &Database,
    health: &Arc<Health>,
    feed: Option<Arc<feed::Feed>>,
) -> Result<Option<StateService>, ServiceError> {
    if settings.state_bucket.is_none() {
        return Ok(None);
    }
    let service = State {
        settings: settings.clone(),
        db: db.clone(),
        health: health.clone(),
        feed,
    };
    let thread = service_thread::start_restarting(settings, service)?;
    let lag = tokio::spawn(report_lag(
        health.clone(),
        db.clone(),
        settings.slot.clone(),
    ));
    Ok(Some(StateService { thread, lag }))
}

/// How often `walcast_state_lag_events` is set.
const LAG_EVERY: Duration = Duration::from_secs(1);

/// Sets `walcast_state_lag_events` (events acknowledged in the stream and
/// not yet applied to the bucket) from the pipeline's runtime, not from the
/// state's thread: while that thread is down (restarting after a dropped
/// connection, a bucket it cannot use), which is when an alert on the lag
/// matters, the gauge keeps counting. Until the service has read where it
/// resumes, the lag counts from the position last saved in Postgres (a
/// little behind, never ahead), not from 0: a fresh process would otherwise
/// report the whole stream for its first second.
async fn report_lag(health: Arc<Health>, db: Database, slot: String) {
    let applied = health.state_applied();
    if applied.load(Ordering::SeqCst) == 0
        && let Ok(saved) = durable::load(&db, &slot).await
    {
        // Only if the service has not stored its own position meanwhile.
        let _ = applied.compare_exchange(0, saved, Ordering::SeqCst, Ordering::SeqCst);
    }
    let gauge = metrics::gauge!(m::STATE_LAG_EVENTS);
    let mut tick = tokio::time::interval(LAG_EVERY);
    loop {
        tick.tick().await;
        let (_, acked) = health.acked_position();
        gauge.set(acked.saturating_sub(applied.load(Ordering::SeqCst)) as f64);
    }
}

/// The service as it runs on its thread (a copy for each start).
#[derive(Clone)]
struct State {
    settings: Settings,
    db: Database,
    health: Arc<Health>,
    feed: Option<Arc<feed::Feed>>,
}

impl Service for State {
    const NAME: &'static str = "state";
    // Its position lives in memory between writes; after a broker that lost
    // writes it must be read back from the bucket, and no write queued
    // before the drop may land after it.
    const FAIL_ON_DISCONNECT: bool = true;

    fn on_failure() {
        recent::distrust();
    }

    async fn serve(self, client: async_nats::Client, ready: Ready) -> Result<(), String> {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_secs(10))
            .build(client.clone());
        let name = self.settings.state_bucket.clone().unwrap_or_default();
        let bucket = bucket::ensure(&js, &name, self.settings.stream_replicas).await?;
        let objects = objects::Objects::open(&js, &name, self.settings.stream_replicas).await?;
        objects.index_existing();
        let stream = js
            .get_stream(&self.settings.stream)
            .await
            .map_err(|e| format!("JetStream stream {}: {e}", self.settings.stream))?;
        let marker = bucket::marker(&bucket.stream, &name).await?;
        let resume = resume_point(&bucket, stream.clone(), marker.as_ref()).await?;
        let resume = self
            .recheck_recent(resume, &client.server_info().server_id)
            .await?;
        let from_start = resume.after == 0;
        tracing::info!(bucket = %name, after = resume.after, recheck_through = resume.recheck_through, "state projection resumes");
        let applied = self.health.state_applied().clone();
        applied.store(resume.after, Ordering::SeqCst);
        ready.serving();
        let projection = project::run(
            js.clone(),
            (&stream, self.feed.clone()),
            &bucket,
            &objects,
            resume,
            applied.clone(),
        );
        let backfills = self.keep_backfilled(&js, (&bucket, &objects), from_start);
        let horizon = loss_horizon(&self.settings);
        let saving = durable::keep_saving(&self.db, &self.settings.slot, horizon);
        tokio::select! {
            result = projection => result,
            result = backfills => result,
            result = saving => result,
        }
    }
}

/// How far back writes may have been lost with a broker restart: its
/// sync interval (the confirm delay says how long it is), and at least 30 s.
fn loss_horizon(settings: &Settings) -> Duration {
    settings.confirm_delay.max(Duration::from_secs(30))
}

impl State {
    /// Widens `resume` back to the trusted position — saved in Postgres, or
    /// known to this process — so every write a broker may have lost is
    /// re-checked (see `recent`), unless nothing can have been lost since
    /// the last start did so ([`recent::continuous`]; `server_id`: this
    /// start's server).
    async fn recheck_recent(
        &self,
        resume: project::Resume,
        server_id: &str,
    ) -> Result<project::Resume, String> {
        let mut widened = resume;
        let known = recent::known();
        if let Some((_, newest)) = known {
            // Writes of the last start may still have been in flight.
            widened.recheck_through = widened.recheck_through.max(newest + writer::WINDOW as u64);
        }
        if recent::continuous(server_id, widened.recheck_through) {
            tracing::info!(
                after = widened.after,
                "the state service starts again on the same nats-server process and has not failed since: no re-check of earlier writes"
            );
            return Ok(widened);
        }
        let saved = durable::load(&self.db, &self.settings.slot).await?;
        // Nothing saved yet (a bucket younger than the horizon, so a short
        // stream): re-check all of it.
        widened.after = widened.after.min(saved);
        if let Some((oldest, _)) = known {
            widened.after = widened
                .after
                .min(recent::trusted(loss_horizon(&self.settings)).unwrap_or(oldest));
        }
        if widened.after < resume.after {
            tracing::info!(
                from = widened.after,
                through = widened.recheck_through,
                "re-checking the state bucket's recent writes key by key (a broker may have lost acknowledged writes)"
            );
        }
        Ok(widened)
    }

    /// Backfills when the bucket has no complete marker (first start, a
    /// purge, a backfill cut short, `walcast backfill`); forever.
    ///
    /// A marker that goes away once seen, or that is missing while the
    /// projection did not start from the stream's beginning, means the
    /// bucket was purged (or the marker deleted) under this run: the keys
    /// the projection wrote are gone with it, and a backfill now would tag
    /// rows that have events in the stream with seq 0 (SPEC §8 wants their
    /// event's seq). So the service ends, and its restart projects the whole
    /// stream again before backfilling ([`resume_point`]).
    async fn keep_backfilled(
        &self,
        js: &jetstream::Context,
        (bucket, objects): (&bucket::Bucket, &objects::Objects),
        from_start: bool,
    ) -> Result<(), String> {
        let mut may_lack_marker = from_start;
        loop {
            let marker = bucket::marker(&bucket.stream, &bucket.name).await?;
            match &marker {
                None if !may_lack_marker => {
                    return Err(format!(
                        "the state bucket {} lost its readiness marker while walcast ran (purged?): projecting the whole stream into it again, then backfilling; nothing to do",
                        bucket.name
                    ));
                }
                Some(_) => may_lack_marker = false,
                None => {}
            }
            if !marker.is_some_and(|m| m.is_complete()) {
                let backfill = backfill::Backfill {
                    settings: &self.settings,
                    db: &self.db,
                    js,
                    store: &bucket.store,
                    objects,
                    health: &self.health,
                };
                backfill.run().await?;
                // It wrote the marker: from now on, one that is gone was purged.
                may_lack_marker = false;
            }
            tokio::time::sleep(MARKER_POLL).await;
        }
    }
}

/// Where the projection resumes: around the bucket's newest position (see
/// [`project::Resume`]), unless the stream is shorter (the broker lost
/// messages; the pipeline republishes them after its tail, where the
/// projection then finds them).
///
/// Until a backfill completes the bucket may hold writes from past that
/// position: the bucket was purged while walcast ran, which left the
/// marker gone and newer keys written since, and a restart may have come
/// after that. Such a projection starts from the stream's beginning if the
/// marker is gone, and re-checks key by key through the stream's end.
async fn resume_point(
    bucket: &bucket::Bucket,
    mut stream: jetstream::stream::Stream,
    marker: Option<&bucket::Marker>,
) -> Result<project::Resume, String> {
    let state = stream
        .info()
        .await
        .map_err(|e| format!("reading the stream from JetStream for the state bucket: {e}"))?
        .state
        .clone();
    let newest = bucket::newest(bucket).await?;
    let resume = resume_in_stream(bucket, bucket::applied_by(newest.as_ref()), &state);
    if marker.is_some_and(|m| m.is_complete()) {
        return Ok(resume);
    }
    let after = if marker.is_none() { 0 } else { resume.after };
    let recheck_through = if newest.is_none() {
        // Nothing in the bucket to step back from.
        0
    } else {
        resume
            .recheck_through
            .max(state.last_sequence + writer::WINDOW as u64)
    };
    Ok(project::Resume {
        after,
        recheck_through,
    })
}

/// [`resume_point`] for a bucket whose backfill is complete and whose
/// newest entry was written at `applied`.
fn resume_in_stream(
    bucket: &bucket::Bucket,
    applied: u64,
    state: &jetstream::stream::State,
) -> project::Resume {
    if applied > state.last_sequence {
        tracing::warn!(
            bucket = %bucket.name,
            applied,
            stream_last = state.last_sequence,
            "the state bucket is ahead of the stream (the broker lost messages): it follows the stream from its tail, where the republished events come"
        );
        return project::Resume::from_newest(state.last_sequence);
    }
    if applied > 0 && applied + 1 < state.first_sequence {
        tracing::warn!(
            bucket = %bucket.name,
            applied,
            stream_first = state.first_sequence,
            "the stream no longer holds events the state bucket has not applied (they aged out): keys may be stale; purge the bucket (nats kv purge or del) and restart walcast to backfill it"
        );
    }
    project::Resume::from_newest(applied)
}
