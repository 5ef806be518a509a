//! The loop shared by every subscription: read a consumer, judge each
//! message with the [`Tracker`], deliver what is next, and stop at the first
//! thing the driver must decide about (a gap, a broken consumer, a
//! reconnect, silence).
//!
//! Invariant: nothing reaches the application except through
//! [`Ctx::deliver`] after a [`Verdict::Next`], and the tracker advances
//! only after the event was handed over, so a failure at any point resumes
//! from the last event the application actually received.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use async_nats::jetstream;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::catchup::{self, Answer, AskError};
use crate::error::Error;
use crate::options::Options;
use crate::order::{Tracker, Verdict};
use crate::reader::{self, Live, Meta, ReadError, Reader};
use crate::subscription::Update;

/// How often the NATS connection's reconnect counter is checked.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);

/// Why a driver stops for good.
#[derive(Debug)]
pub enum Stop {
    /// The application dropped the subscription.
    Closed,
    /// A definite error, to be sent as the last item.
    Fatal(Error),
}

impl From<Error> for Stop {
    fn from(e: Error) -> Stop {
        Stop::Fatal(e)
    }
}

/// Why [`Ctx::pump`] returned (besides [`Stop`]).
#[derive(Debug)]
pub enum Outcome {
    /// `meta`'s tenant misses events before it; `msg` is not delivered yet.
    Gap(Box<jetstream::Message>, Meta),
    /// The consumer broke or a body could not be read: reposition after a backoff.
    Retry(String),
    /// The NATS connection reconnected since the consumer was opened.
    Reconnected,
    /// No message for the idle period.
    Idle,
    /// The `until` condition was met.
    Done,
}

/// Everything a driver needs: NATS, settings, the channel to the application.
pub struct Ctx {
    pub client: async_nats::Client,
    pub reader: Reader,
    pub options: Arc<Options>,
    pub tx: mpsc::Sender<Result<Update, Error>>,
    /// The stream sequence up to which every message was handled (delivered
    /// or judged a duplicate) by the current driver, if any.
    pub position: Option<u64>,
}

impl Ctx {
    pub fn new(
        client: async_nats::Client,
        options: Arc<Options>,
        tx: mpsc::Sender<Result<Update, Error>>,
    ) -> Ctx {
        Ctx {
            reader: Reader::new(jetstream::new(client.clone())),
            client,
            options,
            tx,
            position: None,
        }
    }

    /// Hands an update to the application (waits while its buffer is full).
    pub async fn send(&self, update: Update) -> Result<(), Stop> {
        self.tx.send(Ok(update)).await.map_err(|_| Stop::Closed)
    }

    /// Sleeps, unless the application goes away first.
    pub async fn sleep(&self, d: Duration) -> Result<(), Stop> {
        tokio::select! {
            _ = tokio::time::sleep(d) => Ok(()),
            _ = self.tx.closed() => Err(Stop::Closed),
        }
    }

    /// Sleeps for the `attempt`-th backoff delay.
    pub async fn back_off(&self, attempt: u32) -> Result<(), Stop> {
        self.sleep(self.options.backoff.delay(attempt)).await
    }

    /// Asks the catch-up service once.
    pub async fn ask(&self, tenant: &str, after_seq: u64) -> Result<Answer, AskError> {
        let subject = self.options.catchup_subject(tenant);
        let ask = catchup::ask(
            &self.client,
            &subject,
            tenant,
            after_seq,
            self.options.request_timeout,
        );
        tokio::select! {
            answer = ask => answer,
            _ = self.tx.closed() => Err(AskError::Unavailable("subscription closed".into())),
        }
    }

    /// How many times the NATS connection has (re)connected.
    pub fn connects(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    /// Reads `messages` until something needs the driver. `connects` is the
    /// reconnect counter when the consumer was opened; `idle` how long
    /// silence may last; `until` is `(tenant, seq)` to stop once that
    /// tenant's position reaches `seq`; `only` the one tenant a filtered
    /// consumer may deliver (anything else is not walcast's layout).
    pub async fn pump(
        &mut self,
        messages: &mut Live,
        tracker: &mut Tracker,
        connects: u64,
        idle: Option<Duration>,
        until: Option<(&str, u64)>,
        only: Option<&str>,
    ) -> Result<Outcome, Stop> {
        let done =
            |t: &Tracker| until.is_some_and(|(tenant, seq)| t.last(tenant).unwrap_or(0) >= seq);
        let mut check = tokio::time::interval(RECONNECT_CHECK);
        let far = Duration::from_secs(86_400 * 365);
        let mut idle_at = Instant::now() + idle.unwrap_or(far);
        loop {
            if done(tracker) {
                return Ok(Outcome::Done);
            }
            let next = tokio::select! {
                _ = self.tx.closed() => return Err(Stop::Closed),
                _ = check.tick() => {
                    if self.connects() != connects {
                        return Ok(Outcome::Reconnected);
                    }
                    continue;
                }
                _ = tokio::time::sleep_until(idle_at) => return Ok(Outcome::Idle),
                next = messages.next() => next,
            };
            idle_at = Instant::now() + idle.unwrap_or(far);
            let delivery = match next {
                None => return Ok(Outcome::Retry("consumer ended".into())),
                Some(Err(e)) => return Ok(Outcome::Retry(e)),
                Some(Ok(delivery)) => delivery,
            };
            let meta = reader::meta(&delivery)?;
            let msg = delivery.msg;
            if let Some(tenant) = only.filter(|t| *t != meta.tenant) {
                return Err(Stop::Fatal(Error::Malformed {
                    what: format!("stream message {}", meta.stream_seq),
                    reason: format!("tenant {} on a consumer filtered for {tenant}", meta.tenant),
                }));
            }
            if let Some(outcome) = self.handle(&msg, &meta, tracker).await? {
                return Ok(outcome);
            }
        }
    }

    /// Judges one message and delivers it if it is next. `Some` when the
    /// driver must act (a gap, or a body that could not be read now).
    pub async fn handle(
        &mut self,
        msg: &jetstream::Message,
        meta: &Meta,
        tracker: &mut Tracker,
    ) -> Result<Option<Outcome>, Stop> {
        match tracker.check(&meta.tenant, meta.seq, &meta.event_id) {
            Verdict::Duplicate => {}
            Verdict::DuplicateId => {
                tracing::warn!(
                    tenant = %meta.tenant, seq = meta.seq, event_id = %meta.event_id,
                    "the stream holds this change twice (another seq has the same event_id); delivered once"
                );
                tracker.accept(&meta.tenant, meta.seq, &meta.event_id);
            }
            Verdict::Gap { last } => {
                tracing::debug!(tenant = %meta.tenant, last, seq = meta.seq, "gap");
                return Ok(Some(Outcome::Gap(Box::new(msg.clone()), meta.clone())));
            }
            Verdict::Next => {
                let event = match self.reader.event(msg, meta).await {
                    Ok(event) => event,
                    Err(ReadError::Transient(e)) => return Ok(Some(Outcome::Retry(e))),
                    Err(ReadError::Definite(e)) => return Err(Stop::Fatal(e)),
                };
                self.send(Update::Event(Box::new(event))).await?;
                tracker.accept(&meta.tenant, meta.seq, &meta.event_id);
            }
        }
        self.position = Some(self.position.unwrap_or(0).max(meta.stream_seq));
        Ok(None)
    }
}
