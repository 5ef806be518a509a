//! Event builder: one row change → one typed, routed, numbered `ChangeEvent`.
//!
//! Invariants owned here:
//! - `event_id` is a pure function of the change's position in the WAL
//!   (commit LSN, index in the transaction), so a replay rebuilds the same id;
//! - a tenant id reaches a subject only after [`tenant::validate`];
//! - `seq` comes from the [`Sequencer`] in the order events are built, which
//!   is commit order (the caller feeds transactions in commit order).

pub mod action;
pub mod actor;
pub mod layout;
pub mod row;
pub mod sequencer;
pub mod tenant;
pub mod timestamp;
pub mod wire;

#[cfg(test)]
pub(crate) mod reference;
#[cfg(test)]
pub(crate) mod tests;

use std::borrow::Cow;
use std::sync::Arc;

use bytes::Bytes;
use pbjson_types::Timestamp;
use prost::Message as _;

use crate::decode::Tuple;
use crate::lsn::Lsn;
use crate::position::TenantSeq;
use crate::proto::{Action, Actor, ChangeEvent, Entity};
pub use action::Kind;
pub use layout::{Layout, Tables};
pub use sequencer::Sequencer;

use layout::Field;
use row::Image;

/// The transaction an event belongs to.
#[derive(Debug, Clone)]
pub struct TxContext {
    pub commit_lsn: Lsn,
    pub commit_time: Timestamp,
    pub xid: u32,
    /// Set by a `walcast.actor` message earlier in the transaction.
    pub actor: Option<Actor>,
}

/// A row change as decoded, before it becomes an event.
#[derive(Debug, Clone, Copy)]
pub enum Change<'a> {
    Insert {
        new: Tuple<'a>,
    },
    Update {
        old: Option<Tuple<'a>>,
        key_only: bool,
        new: Tuple<'a>,
    },
    Delete {
        old: Tuple<'a>,
        key_only: bool,
    },
}

/// Where an event goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `<prefix>.<tenant>.<entity>.<action>`, numbered.
    Tenant { tenant: Arc<str>, seq: TenantSeq },
    /// `<prefix>._deadletter`: the tenant id is not routable.
    DeadLetter { reason: &'static str },
    /// `<prefix>._truncated`: table-wide events that belong to no tenant.
    System,
}

/// A built event, ready for the publisher.
#[derive(Debug, Clone)]
pub struct OutEvent {
    pub event_id: String,
    pub subject: String,
    pub route: Route,
    pub commit_lsn: Lsn,
    /// Commit time, Unix microseconds (for lag metrics).
    pub commit_unix_micros: i64,
    pub entity: Entity,
    pub action: Action,
    pub payload: Bytes,
}

/// The deterministic id of the event at `tx_index` in the transaction
/// committed at `commit_lsn`. Fixed width, so ids sort in WAL order.
pub fn event_id(commit_lsn: Lsn, tx_index: u32) -> String {
    // Written digit by digit: `format!` was ~3 % of walcast's CPU per event.
    fn hex(out: &mut String, value: u64, digits: u32) {
        for shift in (0..digits).rev() {
            let nibble = (value >> (shift * 4)) & 0xf;
            out.push(char::from_digit(nibble as u32, 16).unwrap_or('0'));
        }
    }
    let mut id = String::with_capacity(25);
    hex(&mut id, commit_lsn.0, 16);
    id.push('-');
    hex(&mut id, tx_index.into(), 8);
    id
}

/// Parses an [`event_id`] back into its WAL position.
pub fn parse_event_id(id: &str) -> Option<(Lsn, u32)> {
    let (lsn, index) = id.split_once('-')?;
    Some((
        Lsn(u64::from_str_radix(lsn, 16).ok()?),
        u32::from_str_radix(index, 16).ok()?,
    ))
}

/// Walcast's own messages along its stream: their event ids grow with the
/// position, while a copy someone made the server store there
/// (`pipeline::foreign`) has no event id or one at most the highest before
/// it. Judged by the running maximum.
#[derive(Debug, Clone, Copy, Default)]
pub struct OwnIds {
    highest: Option<(Lsn, u32)>,
    /// Before any is known: the lowest id that can be walcast's.
    floor: (Lsn, u32),
}

impl OwnIds {
    /// Judging from `highest` (the last known message of walcast's), or
    /// from `floor` when none is known.
    pub fn after(highest: Option<(Lsn, u32)>, floor: (Lsn, u32)) -> Self {
        OwnIds { highest, floor }
    }

    /// Whether the next message, with this event id, is walcast's (it then
    /// becomes the highest).
    pub fn admits(&mut self, id: Option<(Lsn, u32)>) -> bool {
        let own = match (id, self.highest) {
            (Some(id), Some(high)) => id > high,
            (Some(id), None) => id >= self.floor,
            (None, _) => false,
        };
        if own {
            self.highest = id;
        }
        own
    }
}

/// Builds events and owns the per-tenant sequence state.
pub struct EventBuilder {
    prefix: String,
    sequencer: Sequencer,
}

impl EventBuilder {
    pub fn new(prefix: impl Into<String>, sequencer: Sequencer) -> Self {
        EventBuilder {
            prefix: prefix.into(),
            sequencer,
        }
    }

    pub fn sequencer(&self) -> &Sequencer {
        &self.sequencer
    }

    /// Builds the event for one row change of a configured table.
    pub fn build(
        &mut self,
        tx: &TxContext,
        tx_index: u32,
        layout: &Layout,
        change: Change<'_>,
    ) -> OutEvent {
        let (before, after, action) = decided(tx, layout, change);
        let current = after.as_ref().or(before.as_ref());
        let tenant_text = action::field(layout, current, Field::TenantId);
        let route = match tenant::validate(tenant_text) {
            Ok(tenant) => {
                let (tenant, seq) = self.sequencer.next(tenant);
                Route::Tenant { tenant, seq }
            }
            Err(invalid) => Route::DeadLetter {
                reason: invalid.reason(),
            },
        };
        let id = event_id(tx.commit_lsn, tx_index);
        let entity_id = entity_id(layout, current);
        let after_row = after.as_ref().map(|image| wire::typed(layout, image));
        let before_row = before.as_ref().map(|image| wire::typed(layout, image));
        // `extra` and `unchanged_fields` describe the row as it is now: the
        // after-image, or the before-image of a delete.
        let (extra, unchanged_fields, after_row, before_row) = match (after_row, before_row) {
            (Some(a), b) => (a.extra, a.missing, Some(a.row), b.map(|b| b.row)),
            (None, Some(b)) => (b.extra, Vec::new(), None, Some(b.row)),
            (None, None) => Default::default(),
        };
        let event = wire::Event {
            event_id: &id,
            tenant_id: tenant_text.unwrap_or_default(),
            seq: match &route {
                Route::Tenant { seq, .. } => seq.0,
                _ => 0,
            },
            entity: layout.entity,
            action,
            entity_id: &entity_id,
            commit_lsn: tx.commit_lsn.0,
            commit_time: tx.commit_time,
            xid: u64::from(tx.xid),
            tx_index,
            actor: Some(match &tx.actor {
                Some(actor) => actor.into(),
                None => actor::from_row(layout, current),
            }),
            changed_fields: changed_fields(layout, before.as_ref(), after.as_ref()),
            after: after_row,
            before: before_row,
            extra,
            unchanged_fields,
            table: &layout.table,
        };
        let mut out = self.finish(&event, route);
        out.event_id = id;
        out
    }

    /// Builds the table-wide event for a TRUNCATE of a configured table.
    pub fn truncate(&mut self, tx: &TxContext, tx_index: u32, layout: &Layout) -> OutEvent {
        let id = event_id(tx.commit_lsn, tx_index);
        let event = wire::Event {
            event_id: &id,
            action: Action::Truncated,
            xid: u64::from(tx.xid),
            tx_index,
            actor: tx.actor.as_ref().map(Into::into),
            ..wire::Event::empty(layout, tx.commit_lsn.0, tx.commit_time)
        };
        let mut out = self.finish(&event, Route::System);
        out.event_id = id;
        out
    }

    /// The event's subject and bytes; its `event_id` is the caller's to move in.
    fn finish(&self, event: &wire::Event<'_>, route: Route) -> OutEvent {
        let subject = match &route {
            Route::Tenant { tenant, .. } => {
                let (entity, action) = (
                    action::entity_token(event.entity),
                    action::token(event.action),
                );
                let mut s = String::with_capacity(
                    self.prefix.len() + tenant.len() + entity.len() + action.len() + 3,
                );
                for (i, part) in [self.prefix.as_str(), tenant, entity, action]
                    .into_iter()
                    .enumerate()
                {
                    if i > 0 {
                        s.push('.');
                    }
                    s.push_str(part);
                }
                s
            }
            Route::DeadLetter { .. } => format!("{}._deadletter", self.prefix),
            Route::System => format!("{}._truncated", self.prefix),
        };
        let t = event.commit_time;
        OutEvent {
            subject,
            route,
            commit_lsn: Lsn(event.commit_lsn),
            commit_unix_micros: t.seconds * 1_000_000 + i64::from(t.nanos / 1000),
            entity: event.entity,
            action: event.action,
            payload: Bytes::from(event.encode()),
            event_id: String::new(),
        }
    }
}

/// The event the state backfill (SPEC §8) stores for a row it copied: the
/// entity's create action, `seq` 0 (no event of the stream), `commit_lsn` the
/// snapshot's position. The caller names it and validates its tenant.
pub fn snapshot_row(
    layout: &Layout,
    image: &Image<'_>,
    snapshot_lsn: u64,
    time: Timestamp,
) -> Result<ChangeEvent, prost::DecodeError> {
    let typed = wire::typed(layout, image);
    let entity_id = entity_id(layout, Some(image));
    let event = wire::Event {
        tenant_id: action::field(layout, Some(image), Field::TenantId).unwrap_or_default(),
        action: action::decide(layout, Kind::Insert, None, Some(image), &time),
        entity_id: &entity_id,
        actor: Some(actor::from_row(layout, Some(image))),
        after: Some(typed.row),
        extra: typed.extra,
        unchanged_fields: typed.missing,
        ..wire::Event::empty(layout, snapshot_lsn, time)
    };
    // The backfill names the event after its key, so it gets it typed.
    ChangeEvent::decode(event.encode().as_slice())
}

/// A change's before and after images, and its action.
fn decided<'a>(
    tx: &TxContext,
    layout: &Layout,
    change: Change<'a>,
) -> (Option<Image<'a>>, Option<Image<'a>>, Action) {
    let (kind, before, after) = images(change);
    let action = action::decide(
        layout,
        kind,
        before.as_ref(),
        after.as_ref(),
        &tx.commit_time,
    );
    (before, after, action)
}

/// Resolves before and after images of a change.
fn images<'a>(change: Change<'a>) -> (Kind, Option<Image<'a>>, Option<Image<'a>>) {
    match change {
        Change::Insert { new } => (Kind::Insert, None, Some(row::resolve(&new, None))),
        Change::Update { old, key_only, new } => {
            // A key-only old tuple is not a before-image: its other columns are NULL.
            let before = old.filter(|_| !key_only).map(|t| row::resolve(&t, None));
            let after = row::resolve(&new, before.as_ref());
            (Kind::Update, before, Some(after))
        }
        Change::Delete { old, .. } => (Kind::Delete, Some(row::resolve(&old, None)), None),
    }
}

fn entity_id<'a>(layout: &Layout, image: Option<&Image<'a>>) -> Cow<'a, str> {
    let text = |f| action::field(layout, image, f).unwrap_or_default();
    match layout.entity {
        Entity::Lock => Cow::Owned(format!(
            "{}:{}",
            text(Field::RecordType),
            text(Field::RecordId)
        )),
        _ => Cow::Borrowed(text(Field::Id)),
    }
}

fn changed_fields<'a>(
    layout: &'a Layout,
    before: Option<&Image<'_>>,
    after: Option<&Image<'_>>,
) -> Vec<&'a str> {
    let (Some(before), Some(after)) = (before, after) else {
        return Vec::new();
    };
    layout
        .names
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| b != a && **a != row::Cell::Missing)
        .map(|(name, _)| name.as_str())
        .collect()
}
