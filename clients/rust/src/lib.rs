//! Rust client for [walcast](https://github.com/): a tenant's row changes
//! from NATS JetStream as typed [`ChangeEvent`](proto::ChangeEvent)s, in
//! `seq` order, each exactly once, surviving reconnects and restarts.
//!
//! walcast numbers each tenant's events 1, 2, 3… with no gaps and answers
//! "tenant T after seq N" through its catch-up service (SPEC §7). This crate
//! turns that into one call: [`Client::subscribe`] yields a tenant's events
//! after the `seq` your application last applied. Behind it, a subscription
//!
//! - positions a JetStream ordered consumer through the catch-up service;
//! - drops duplicates (by `seq`, and by `event_id` within a window);
//! - detects gaps (a `seq` jump), reconnects and broken consumers, and
//!   repairs them through the catch-up service, keeping the order;
//! - tells the application to re-sync from the database, with
//!   [`Update::Resync`], when the events it needs have left the stream;
//! - retries everything transient with capped exponential backoff and
//!   jitter, and reads the stream directly while walcast itself is down
//!   ([`Options::fallback_after`]);
//! - fetches oversized events from the JetStream object store.
//!
//! ```no_run
//! use futures::StreamExt;
//! use walcast_client::{Client, Options, Update};
//!
//! # async fn run() -> Result<(), walcast_client::Error> {
//! let client = Client::connect("nats://127.0.0.1:4222", Options::default()).await?;
//! let last_applied = 41; // from your own storage
//! let mut events = client.subscribe("acme", last_applied)?;
//! while let Some(update) = events.next().await {
//!     match update? {
//!         Update::Event(event) => {
//!             // Apply it, then store event.seq as the new position.
//!             println!("{} {}", event.seq, walcast_client::json::to_string(&event).unwrap());
//!         }
//!         Update::Resync { last_seq, .. } => {
//!             // Too far behind: reload the tenant from the database; the
//!             // stream goes on with seq last_seq + 1.
//!         }
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! [`json::to_string`] gives an event's proto3 JSON mapping exactly as
//! `walcast tail` prints it: the documented form for gateways that forward
//! events to browsers. (The generated types also implement serde directly,
//! with pbjson's `+00:00` timestamp suffix instead of the mapping's `Z`.)

#![warn(missing_docs)]

mod all;
mod catchup;
mod client;
mod error;
pub mod json;
mod load;
mod options;
mod order;
mod pull;
mod pump;
mod reader;
mod state;
mod subscription;
mod tenant;

pub use all::AllFrom;
pub use client::Client;
pub use error::Error;
pub use load::{Snapshot, StateSubscription, StateUpdate};
pub use options::{Backoff, Options};
pub use subscription::{Subscription, Update};

/// The walcast event contract, generated from `proto/walcast/v1/events.proto`
/// (package `walcast.v1`) with prost, plus its proto3 JSON mapping (serde,
/// via pbjson). Timestamps are [`pbjson_types::Timestamp`].
#[allow(missing_docs, clippy::all)]
pub mod proto {
    include!(concat!(env!("OUT_DIR"), "/walcast.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/walcast.v1.serde.rs"));
}
