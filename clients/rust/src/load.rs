//! "Load then follow" (SPEC §8): a tenant's current rows from the state
//! bucket as one [`Snapshot`], then every later event of the tenant.
//!
//! The snapshot says which `seq` it reflects (`as_of_seq`); the follow is an
//! ordinary tenant subscription from `after_seq = as_of_seq`, so everything
//! a subscription guarantees (order, exactly once, gap repair, the re-sync
//! signal) holds for what comes after the snapshot, and applying those
//! events to the snapshot gives the tenant's rows at every point. Only NATS
//! is read: a load works while Postgres is down.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use futures::{FutureExt, StreamExt};
use tokio::task::JoinHandle;

use crate::error::Error;
use crate::options::Options;
use crate::proto::ChangeEvent;
use crate::pump::Ctx;
use crate::reader::Reader;
use crate::state;
use crate::subscription::{Subscription, Update};
use crate::tenant;

/// A tenant's current rows, consistent with the stream at `as_of_seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// The tenant.
    pub tenant_id: String,
    /// The tenant's last event these rows reflect (0 when none does: an
    /// empty tenant, or only rows copied by walcast's backfill). The first
    /// event after the snapshot has `seq = as_of_seq + 1`.
    pub as_of_seq: u64,
    /// Every current row, keyed by its state key (`<tenant>.task.<id>`,
    /// `<tenant>.project.<id>`, `<tenant>.lock.<record_type>.<record_id>`).
    /// Each value is the row's latest `ChangeEvent`: its `after` image is
    /// the row (oversized rows arrive complete). Rows copied by the backfill
    /// and unchanged since have `seq` 0 and the entity's create action.
    pub rows: BTreeMap<String, ChangeEvent>,
}

/// One item of a [`StateSubscription`]: first one `Snapshot`, then the
/// items a [`Subscription`] yields.
#[derive(Debug, Clone, PartialEq)]
pub enum StateUpdate {
    /// The tenant's rows; always the first item, and only once.
    Snapshot(Snapshot),
    /// The tenant's next event (`seq` = the previous one + 1, starting at
    /// the snapshot's `as_of_seq + 1`); see [`Update::Event`].
    Event(Box<ChangeEvent>),
    /// The events after the position are gone from the stream: re-sync
    /// from the database; see [`Update::Resync`].
    Resync {
        /// The tenant that must re-sync.
        tenant_id: String,
        /// The tenant's oldest `seq` still in the stream.
        oldest_seq: u64,
        /// The next event has `seq = last_seq + 1`.
        last_seq: u64,
    },
}

impl From<Update> for StateUpdate {
    fn from(update: Update) -> StateUpdate {
        match update {
            Update::Event(event) => StateUpdate::Event(event),
            Update::Resync {
                tenant_id,
                oldest_seq,
                last_seq,
            } => StateUpdate::Resync {
                tenant_id,
                oldest_seq,
                last_seq,
            },
        }
    }
}

/// The snapshot, plus the subscription that follows it (already running).
type Loaded = Result<(Snapshot, Subscription), Error>;

/// A tenant's snapshot then its events: `Stream<Item = Result<StateUpdate,
/// Error>>`, from [`Client::load_and_follow`](crate::Client::load_and_follow).
///
/// An `Err` is definite and the last item. Dropping it stops the load or
/// the subscription.
pub struct StateSubscription {
    loading: Option<JoinHandle<Loaded>>,
    follow: Option<Subscription>,
}

impl StateSubscription {
    /// Starts loading `tenant` on the tokio runtime.
    pub(crate) fn spawn(nats: async_nats::Client, options: Arc<Options>, tenant: String) -> Self {
        StateSubscription {
            loading: Some(tokio::spawn(load_then_follow(nats, options, tenant))),
            follow: None,
        }
    }
}

/// Reads the snapshot, then starts the tenant's subscription after it. The
/// subscription starts before the application has taken the snapshot, so
/// the events that follow are already being fetched meanwhile.
async fn load_then_follow(
    nats: async_nats::Client,
    options: Arc<Options>,
    tenant: String,
) -> Loaded {
    let mut reader = Reader::new(async_nats::jetstream::new(nats.clone()));
    let state = state::load(&mut reader, &options, &tenant).await?;
    tracing::debug!(%tenant, as_of_seq = state.as_of_seq, rows = state.rows.len(), "state loaded");
    let snapshot = Snapshot {
        tenant_id: tenant.clone(),
        as_of_seq: state.as_of_seq,
        rows: state.rows,
    };
    let after_seq = snapshot.as_of_seq;
    let follow = Subscription::spawn(options.buffer, move |tx| {
        tenant::run(Ctx::new(nats, options, tx), tenant, after_seq)
    });
    Ok((snapshot, follow))
}

impl futures::Stream for StateSubscription {
    type Item = Result<StateUpdate, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(loading) = self.loading.as_mut() {
            let loaded = match loading.poll_unpin(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(loaded)) => loaded,
                Poll::Ready(Err(e)) => std::panic::resume_unwind(e.into_panic()),
            };
            self.loading = None;
            return Poll::Ready(Some(loaded.map(|(snapshot, follow)| {
                self.follow = Some(follow);
                StateUpdate::Snapshot(snapshot)
            })));
        }
        match self.follow.as_mut() {
            Some(follow) => follow
                .poll_next_unpin(cx)
                .map(|item| item.map(|r| r.map(StateUpdate::from))),
            None => Poll::Ready(None), // the load failed: its error was the last item
        }
    }
}

impl Drop for StateSubscription {
    fn drop(&mut self) {
        if let Some(loading) = &self.loading {
            loading.abort(); // a loaded subscription is dropped with the task's output
        }
    }
}

impl std::fmt::Debug for StateSubscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateSubscription")
            .field("loaded", &self.loading.is_none())
            .finish_non_exhaustive()
    }
}
