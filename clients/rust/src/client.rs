//! The entry point: a NATS connection plus [`Options`], handing out
//! subscriptions.

use std::sync::Arc;

use crate::all::{self, AllFrom};
use crate::error::Error;
use crate::load::StateSubscription;
use crate::options::Options;
use crate::pump::Ctx;
use crate::subscription::Subscription;
use crate::tenant;

/// A walcast client: cheap to clone, one NATS connection shared by all of
/// its subscriptions.
#[derive(Debug, Clone)]
pub struct Client {
    nats: async_nats::Client,
    options: Arc<Options>,
}

impl Client {
    /// Connects to NATS at `url` (e.g. `nats://127.0.0.1:4222`) with
    /// async-nats' defaults, which reconnect forever. To use TLS,
    /// credentials or other settings, connect yourself and use
    /// [`Client::new`].
    pub async fn connect(url: &str, options: Options) -> Result<Client, Error> {
        let nats = async_nats::connect(url).await?;
        Ok(Client::new(nats, options))
    }

    /// Wraps an existing NATS connection, so an application shares one
    /// connection (and its auth settings) between walcast and its own use.
    pub fn new(nats: async_nats::Client, options: Options) -> Client {
        Client {
            nats,
            options: Arc::new(options),
        }
    }

    /// The tenant's events with `seq > after_seq`, in order, each once.
    ///
    /// `after_seq` is the last `seq` the application has applied (0 for a
    /// tenant's whole retained history). If the events after it are gone
    /// from the stream, the first item is an
    /// [`Update::Resync`](crate::Update::Resync). Must be called inside a
    /// tokio runtime (the subscription runs as a task). Fails at once for a
    /// tenant id walcast can never publish.
    pub fn subscribe(&self, tenant_id: &str, after_seq: u64) -> Result<Subscription, Error> {
        validate_tenant(tenant_id)?;
        let (nats, options, tenant) = (
            self.nats.clone(),
            self.options.clone(),
            tenant_id.to_string(),
        );
        Ok(Subscription::spawn(self.options.buffer, move |tx| {
            tenant::run(Ctx::new(nats, options, tx), tenant, after_seq)
        }))
    }

    /// The tenant's current rows, then every later event: first one
    /// [`StateUpdate::Snapshot`](crate::StateUpdate::Snapshot) (its rows
    /// and the `as_of_seq` they reflect), then the tenant's events with
    /// `seq > as_of_seq` in order, each once, exactly as
    /// [`Client::subscribe`] yields them. Applying those events to the
    /// snapshot gives the tenant's rows at every point, whatever is
    /// committed during the load: no race between "read the rows" and
    /// "subscribe" (SPEC §8).
    ///
    /// Reads walcast's state bucket ([`Options::state_bucket`]) and the
    /// stream, never Postgres. Waits up to
    /// [`Options::state_ready_timeout`] while walcast is still copying the
    /// tables, then fails with [`Error::StateNotReady`]. Must be called
    /// inside a tokio runtime; fails at once for an invalid tenant id.
    pub fn load_and_follow(&self, tenant_id: &str) -> Result<StateSubscription, Error> {
        validate_tenant(tenant_id)?;
        Ok(StateSubscription::spawn(
            self.nats.clone(),
            self.options.clone(),
            tenant_id.to_string(),
        ))
    }

    /// Every tenant's events, in order per tenant, each once: for backend
    /// services that process all tenants (indexers, audit logs). Gaps are
    /// repaired per tenant; see [`AllFrom`] for where it starts.
    pub fn subscribe_all(&self, from: AllFrom) -> Subscription {
        let (nats, options) = (self.nats.clone(), self.options.clone());
        Subscription::spawn(self.options.buffer, move |tx| {
            all::run(Ctx::new(nats, options, tx), from)
        })
    }

    /// The underlying NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }
}

/// SPEC §3: tenant ids on subjects match `[A-Za-z0-9_-]{1,128}`.
pub(crate) fn validate_tenant(tenant_id: &str) -> Result<(), Error> {
    let ok = (1..=128).contains(&tenant_id.len())
        && tenant_id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidTenant {
            tenant_id: tenant_id.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::validate_tenant;

    #[test]
    fn tenant_ids_follow_the_spec() {
        for ok in ["acme", "a", "A-b_9", &"x".repeat(128)] {
            assert!(validate_tenant(ok).is_ok(), "{ok}");
        }
        for bad in ["", "a.b", "*", ">", "a b", "é", &"x".repeat(129)] {
            assert!(validate_tenant(bad).is_err(), "{bad}");
        }
    }
}
