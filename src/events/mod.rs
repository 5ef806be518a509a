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

#[cfg(test)]
pub(crate) mod tests;

use std::sync::Arc;

use bytes::Bytes;
use pbjson_types::Timestamp;
use prost::Message as _;

use crate::decode::Tuple;
use crate::lsn::Lsn;
use crate::position::TenantSeq;
use crate::proto::{Action, Actor, ChangeEvent, EditingLock, Entity, Project, Task, change_event};
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
    format!("{:016x}-{tx_index:08x}", commit_lsn.0)
}

/// Parses an [`event_id`] back into its WAL position.
pub fn parse_event_id(id: &str) -> Option<(Lsn, u32)> {
    let (lsn, index) = id.split_once('-')?;
    Some((
        Lsn(u64::from_str_radix(lsn, 16).ok()?),
        u32::from_str_radix(index, 16).ok()?,
    ))
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
        let (kind, before, after) = images(change);
        let action = action::decide(
            layout,
            kind,
            before.as_ref(),
            after.as_ref(),
            &tx.commit_time,
        );
        let current = after.as_ref().or(before.as_ref());
        let tenant_text = action::field(layout, current, Field::TenantId);
        let actor = tx
            .actor
            .clone()
            .unwrap_or_else(|| actor::from_row(layout, current));

        let mut event = ChangeEvent {
            event_id: event_id(tx.commit_lsn, tx_index),
            tenant_id: tenant_text.unwrap_or_default().to_string(),
            entity: layout.entity as i32,
            action: action as i32,
            entity_id: entity_id(layout, current),
            commit_lsn: tx.commit_lsn.0,
            commit_time: Some(tx.commit_time),
            xid: u64::from(tx.xid),
            tx_index,
            actor: Some(actor),
            changed_fields: changed_fields(layout, before.as_ref(), after.as_ref()),
            table: layout.table.clone(),
            ..Default::default()
        };
        set_images(&mut event, layout, before.as_ref(), after.as_ref());

        let route = match tenant::validate(tenant_text) {
            Ok(tenant) => {
                let (tenant, seq) = self.sequencer.next(tenant);
                event.seq = seq.0;
                Route::Tenant { tenant, seq }
            }
            Err(invalid) => Route::DeadLetter {
                reason: invalid.reason(),
            },
        };
        self.finish(event, route, layout.entity, action)
    }

    /// Builds the table-wide event for a TRUNCATE of a configured table.
    pub fn truncate(&mut self, tx: &TxContext, tx_index: u32, layout: &Layout) -> OutEvent {
        let event = ChangeEvent {
            event_id: event_id(tx.commit_lsn, tx_index),
            entity: layout.entity as i32,
            action: Action::Truncated as i32,
            commit_lsn: tx.commit_lsn.0,
            commit_time: Some(tx.commit_time),
            xid: u64::from(tx.xid),
            tx_index,
            actor: tx.actor.clone(),
            table: layout.table.clone(),
            ..Default::default()
        };
        self.finish(event, Route::System, layout.entity, Action::Truncated)
    }

    fn finish(&self, event: ChangeEvent, route: Route, entity: Entity, action: Action) -> OutEvent {
        let subject = match &route {
            Route::Tenant { tenant, .. } => {
                let (entity, action) = (action::entity_token(entity), action::token(action));
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
        let payload = Bytes::from(event.encode_to_vec());
        OutEvent {
            subject,
            route,
            commit_lsn: Lsn(event.commit_lsn),
            commit_unix_micros: event
                .commit_time
                .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000)),
            entity,
            action,
            payload,
            event_id: event.event_id,
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
) -> ChangeEvent {
    let action = action::decide(layout, Kind::Insert, None, Some(image), &time);
    let mut event = ChangeEvent {
        tenant_id: action::field(layout, Some(image), Field::TenantId)
            .unwrap_or_default()
            .to_string(),
        entity: layout.entity as i32,
        action: action as i32,
        entity_id: entity_id(layout, Some(image)),
        commit_lsn: snapshot_lsn,
        commit_time: Some(time),
        actor: Some(actor::from_row(layout, Some(image))),
        table: layout.table.clone(),
        ..Default::default()
    };
    set_images(&mut event, layout, None, Some(image));
    event
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

fn entity_id(layout: &Layout, image: Option<&Image<'_>>) -> String {
    let text = |f| action::field(layout, image, f).unwrap_or_default();
    match layout.entity {
        Entity::Lock => format!("{}:{}", text(Field::RecordType), text(Field::RecordId)),
        _ => text(Field::Id).to_string(),
    }
}

fn changed_fields(
    layout: &Layout,
    before: Option<&Image<'_>>,
    after: Option<&Image<'_>>,
) -> Vec<String> {
    let (Some(before), Some(after)) = (before, after) else {
        return Vec::new();
    };
    layout
        .names
        .iter()
        .zip(before.iter().zip(after))
        .filter(|(_, (b, a))| b != a && **a != row::Cell::Missing)
        .map(|(name, _)| name.clone())
        .collect()
}

/// Fills `after`/`before`; `extra` and `unchanged_fields` describe the row
/// as it is now (the after-image, or the before-image of a delete).
fn set_images(
    event: &mut ChangeEvent,
    layout: &Layout,
    before: Option<&Image<'_>>,
    after: Option<&Image<'_>>,
) {
    use change_event::{After, Before};
    if let Some(image) = after {
        let (row, extra, missing) = match layout.entity {
            Entity::Task => split(row::typed::<Task>(layout, image), After::Task),
            Entity::Project => split(row::typed::<Project>(layout, image), After::Project),
            _ => split(row::typed::<EditingLock>(layout, image), After::Lock),
        };
        event.after = Some(row);
        event.extra = extra;
        event.unchanged_fields = missing;
    }
    if let Some(image) = before {
        let (row, extra, _) = match layout.entity {
            Entity::Task => split(row::typed::<Task>(layout, image), Before::TaskBefore),
            Entity::Project => split(row::typed::<Project>(layout, image), Before::ProjectBefore),
            _ => split(row::typed::<EditingLock>(layout, image), Before::LockBefore),
        };
        event.before = Some(row);
        if after.is_none() {
            event.extra = extra;
        }
    }
}

type Parts<R> = (R, std::collections::HashMap<String, String>, Vec<String>);

fn split<T, R>(typed: row::Typed<T>, wrap: impl FnOnce(T) -> R) -> Parts<R> {
    (wrap(typed.row), typed.extra, typed.missing)
}
