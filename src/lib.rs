//! walcast: PostgreSQL logical replication → per-tenant protobuf events on NATS JetStream.
//!
//! Data flows one way through the stages, one module each:
//! [`source`] (replication connection) → [`decode`] (pgoutput bytes → messages) →
//! [`assemble`] (transactions, relations, actor) → [`events`] (entity, action, tenant,
//! seq) → [`publish`] (JetStream, acks) → `checkpoint` (durable progress, LSN confirm).
//! [`config`], [`cli`], [`telemetry`] and [`migrate`] sit at the edges; `pipeline`
//! runs the stages once and [`app`] supervises runs. `catchup` answers requests
//! beside the pipeline, on a thread of its own ([`service_thread`]); so does
//! [`auth`], the NATS auth callout that confines clients to one tenant. See docs/ARCHITECTURE.md.

/// The event contract (`proto/walcast/v1/events.proto`), generated once in
/// the client crate so the daemon and its clients share one set of types.
pub use walcast_client::proto;

pub mod allocator;
pub mod app;
pub mod assemble;
pub mod auth;
pub(crate) mod broker;
pub(crate) mod by_tenant;
pub(crate) mod catchup;
pub mod check;
pub(crate) mod checkpoint;
pub mod cli;
pub mod config;
pub(crate) mod database;
pub mod decode;
pub(crate) mod error_policy;
pub mod events;
pub(crate) mod failpoint;
pub mod handoff;
pub mod headers;
pub mod lsn;
pub mod migrate;
pub(crate) mod pipeline;
pub mod position;
pub mod publish;
pub mod secrets;
pub mod service_thread;
pub mod source;
pub mod state;
pub mod tail;
pub mod telemetry;
