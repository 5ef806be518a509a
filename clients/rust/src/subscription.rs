//! What an application reads: a [`Subscription`] is a `Stream` of
//! [`Update`]s fed by a background task through a bounded channel.
//!
//! The task owns the NATS consumers, the dedup/gap state and every retry;
//! the channel's bound is the backpressure (a slow application pauses the
//! reading, nothing piles up). Dropping the subscription stops the task.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::sync::mpsc;

use crate::error::Error;
use crate::proto::ChangeEvent;

/// One item of a subscription.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The tenant's next event: its `seq` is exactly one more than the
    /// previous event of the same tenant delivered by this subscription (or
    /// than `after_seq` / a [`Update::Resync`]'s `last_seq`). Boxed because
    /// an event is large and this enum moves through a channel.
    Event(Box<ChangeEvent>),
    /// The events after the subscription's position are no longer in the
    /// stream (retention, SPEC §7 `too_old`): the application must re-read
    /// the tenant's state from the database. The subscription goes on with
    /// the events after `last_seq` (the tenant's last published `seq` when
    /// this was decided); a database read started after receiving this
    /// includes every change up to `last_seq`, and may include some of the
    /// events that follow (compare row `version`s to apply each once).
    Resync {
        /// The tenant that must re-sync.
        tenant_id: String,
        /// The tenant's oldest `seq` still in the stream. An application
        /// that prefers the retained history can subscribe again with
        /// `after_seq = oldest_seq - 1` (the gap before it stays a gap).
        oldest_seq: u64,
        /// The tenant's last published `seq`; the next [`Update::Event`] of
        /// this tenant has `seq = last_seq + 1`.
        last_seq: u64,
    },
}

/// A live subscription: `Stream<Item = Result<Update, Error>>`.
///
/// Per tenant it yields events in `seq` order, each exactly once, with no
/// gap, across reconnects, walcast restarts and NATS restarts (repaired
/// through the catch-up service), or an explicit [`Update::Resync`]. An
/// `Err` is definite and the last item. The stream never ends by itself;
/// drop it to unsubscribe.
pub struct Subscription {
    rx: mpsc::Receiver<Result<Update, Error>>,
    task: tokio::task::JoinHandle<()>,
}

impl Subscription {
    /// Starts `driver` (which owns the sending side) on the tokio runtime.
    pub(crate) fn spawn<F>(
        buffer: usize,
        driver: impl FnOnce(mpsc::Sender<Result<Update, Error>>) -> F,
    ) -> Subscription
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let (tx, rx) = mpsc::channel(buffer.max(1));
        let task = tokio::spawn(driver(tx));
        Subscription { rx, task }
    }
}

impl futures::Stream for Subscription {
    type Item = Result<Update, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        // The task would notice the closed channel; aborting frees its
        // consumer at once instead of at its next wake-up.
        self.task.abort();
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription").finish_non_exhaustive()
    }
}
