//! What the assembler hands the publisher, in WAL order: owned by neither
//! stage, so data flows one way (assemble → publish) without a back edge.

use std::sync::Arc;

use crate::events::OutEvent;
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};

/// What flows from the event builder to the publisher, in WAL order.
#[derive(Debug)]
pub enum Item {
    Event(OutEvent),
    /// Everything before this LSN has been handed over (a commit's end, or an
    /// idle keepalive position): confirmable once all of it is acknowledged.
    Boundary(Lsn),
    /// An event a previous run already published at `stream_seq`: not sent
    /// again, but its tenant seq still counts for the checkpoint.
    Published {
        tenant: Option<(Arc<str>, TenantSeq)>,
        stream_seq: StreamSeq,
    },
}
