//! walcast: PostgreSQL logical replication → per-tenant protobuf events on NATS JetStream.
//!
//! Data flows one way through the stages, one module each:
//! [`source`] (replication connection) → [`decode`] (pgoutput bytes → messages) →
//! [`assemble`] (transactions, relations, actor) → [`events`] (entity, action, tenant,
//! seq) → [`publish`] (JetStream, acks) → [`checkpoint`] (durable progress, LSN confirm).
//! [`config`], [`cli`], [`telemetry`] and [`migrate`] sit at the edges; [`pipeline`]
//! runs the stages once and [`app`] supervises runs. [`catchup`] answers requests
//! beside the pipeline, on a thread of its own ([`service_thread`]). See docs/ARCHITECTURE.md.

pub mod proto {
    //! Generated from `proto/walcast/v1/events.proto`.
    #![allow(missing_docs, clippy::all)]
    include!(concat!(env!("OUT_DIR"), "/walcast.v1.rs"));
    include!(concat!(env!("OUT_DIR"), "/walcast.v1.serde.rs"));
}

pub mod app;
pub mod assemble;
pub mod broker;
pub mod catchup;
pub mod check;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod database;
pub mod decode;
pub mod events;
pub mod failpoint;
pub mod lsn;
pub mod migrate;
pub mod pipeline;
pub mod publish;
pub mod service_thread;
pub mod source;
pub mod tail;
pub mod telemetry;
