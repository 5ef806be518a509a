//! The reference the wire encoder is checked against: the event built
//! through the generated types, as walcast did before `wire` (a `String` per
//! column). Tests only.

use std::collections::HashMap;

use super::layout::{Field, Layout};
use super::row::{Cell, Image};
use super::{Change, TxContext, action, decided, timestamp};
use crate::proto::{Actor, ChangeEvent, EditingLock, Entity, Project, Task, change_event};

/// The event for one row change, through the generated types; `seq` as the
/// builder numbered it.
pub(crate) fn event(
    tx: &TxContext,
    tx_index: u32,
    layout: &Layout,
    change: Change<'_>,
    seq: u64,
) -> ChangeEvent {
    let (before, after, action) = decided(tx, layout, change);
    let current = after.as_ref().or(before.as_ref());
    let text = |f| action::field(layout, current, f).map(str::to_string);
    let actor = tx.actor.clone().unwrap_or_else(|| match layout.entity {
        Entity::Lock => Actor {
            actor_type: None,
            actor_id: text(Field::LockedBy),
            client_id: None,
        },
        _ => Actor {
            actor_type: text(Field::ActorType),
            actor_id: text(Field::UpdatedBy),
            client_id: text(Field::ClientId),
        },
    });
    let mut event = ChangeEvent {
        event_id: super::event_id(tx.commit_lsn, tx_index),
        tenant_id: text(Field::TenantId).unwrap_or_default(),
        seq,
        entity: layout.entity as i32,
        action: action as i32,
        entity_id: super::entity_id(layout, current).into_owned(),
        commit_lsn: tx.commit_lsn.0,
        commit_time: Some(tx.commit_time),
        xid: u64::from(tx.xid),
        tx_index,
        actor: Some(actor),
        changed_fields: super::changed_fields(layout, before.as_ref(), after.as_ref())
            .into_iter()
            .map(str::to_string)
            .collect(),
        table: layout.table.clone(),
        ..Default::default()
    };
    set_images(&mut event, layout, before.as_ref(), after.as_ref());
    event
}

fn set_images(
    event: &mut ChangeEvent,
    layout: &Layout,
    before: Option<&Image<'_>>,
    after: Option<&Image<'_>>,
) {
    use change_event::{After, Before};
    if let Some(image) = after {
        let (row, extra, missing) = match layout.entity {
            Entity::Task => split(typed::<Task>(layout, image), After::Task),
            Entity::Project => split(typed::<Project>(layout, image), After::Project),
            _ => split(typed::<EditingLock>(layout, image), After::Lock),
        };
        event.after = Some(row);
        event.extra = extra;
        event.unchanged_fields = missing;
    }
    if let Some(image) = before {
        let (row, extra, _) = match layout.entity {
            Entity::Task => split(typed::<Task>(layout, image), Before::TaskBefore),
            Entity::Project => split(typed::<Project>(layout, image), Before::ProjectBefore),
            _ => split(typed::<EditingLock>(layout, image), Before::LockBefore),
        };
        event.before = Some(row);
        if after.is_none() {
            event.extra = extra;
        }
    }
}

type Parts<R> = (R, std::collections::HashMap<String, String>, Vec<String>);

fn split<T, R>(typed: Typed<T>, wrap: impl FnOnce(Box<T>) -> R) -> Parts<R> {
    (wrap(Box::new(typed.row)), typed.extra, typed.missing)
}

/// Typed rows, plus the text of columns that are unknown or did not parse.
pub struct Typed<T> {
    pub row: T,
    pub extra: HashMap<String, String>,
    pub missing: Vec<String>,
}

/// Builds a typed row of any entity from an image.
pub fn typed<T: TypedRow>(layout: &Layout, image: &Image<'_>) -> Typed<T> {
    let mut out = Typed {
        row: T::default(),
        extra: HashMap::new(),
        missing: Vec::new(),
    };
    for ((cell, field), name) in image.iter().zip(&layout.fields).zip(&layout.names) {
        match (cell, field) {
            (Cell::Missing, _) => out.missing.push(name.clone()),
            (Cell::Null, _) => {}
            (Cell::Text(text), Some(field)) => {
                if !out.row.set(*field, text) {
                    // Kept as text: a type change or an out-of-range value never loses data.
                    out.extra.insert(name.clone(), (*text).to_string());
                }
            }
            (Cell::Text(text), None) => {
                out.extra.insert(name.clone(), (*text).to_string());
            }
        }
    }
    out
}

/// A proto row message that columns can be written into.
pub trait TypedRow: Default {
    /// Sets `field` from its text form; `false` if the text does not fit the
    /// field's type exactly (the caller keeps the text in `extra`).
    fn set(&mut self, field: Field, text: &str) -> bool;
}

fn ts(text: &str, slot: &mut Option<pbjson_types::Timestamp>) -> bool {
    match timestamp::parse(text) {
        Some(parsed) => {
            *slot = Some(parsed.timestamp);
            parsed.exact
        }
        None => false,
    }
}

fn num<T: std::str::FromStr>(text: &str, slot: &mut T) -> bool {
    text.parse().map(|v| *slot = v).is_ok()
}

fn opt_num<T: std::str::FromStr>(text: &str, slot: &mut Option<T>) -> bool {
    text.parse().map(|v| *slot = Some(v)).is_ok()
}

/// Sets the columns tasks and projects share, then the entity's own
/// (`$own` arms); evaluates to `true` if the text fit the field.
macro_rules! set_record_field {
    ($row:ident, $field:ident, $text:ident, { $($own:tt)* }) => {{
        let s = || $text.to_string();
        match $field {
            Field::Id => $row.id = s(),
            Field::TenantId => $row.tenant_id = s(),
            Field::Description => $row.description = Some(s()),
            Field::Status => $row.status = s(),
            Field::Version => return num($text, &mut $row.version),
            Field::CreatedAt => return ts($text, &mut $row.created_at),
            Field::UpdatedAt => return ts($text, &mut $row.updated_at),
            Field::UpdatedBy => $row.updated_by = Some(s()),
            Field::ActorType => $row.actor_type = Some(s()),
            Field::ClientId => $row.client_id = Some(s()),
            Field::Metadata => $row.metadata = Some(s()),
            $($own)*
            _ => return false,
        }
        true
    }};
}

impl TypedRow for Task {
    fn set(&mut self, field: Field, text: &str) -> bool {
        set_record_field!(self, field, text, {
            Field::ProjectId => self.project_id = Some(text.to_string()),
            Field::Title => self.title = text.to_string(),
            Field::Priority => return opt_num(text, &mut self.priority),
            Field::Assignee => self.assignee = Some(text.to_string()),
            Field::DueAt => return ts(text, &mut self.due_at),
            Field::CompletedAt => return ts(text, &mut self.completed_at),
        })
    }
}

impl TypedRow for Project {
    fn set(&mut self, field: Field, text: &str) -> bool {
        set_record_field!(self, field, text, {
            Field::Name => self.name = text.to_string(),
        })
    }
}

impl TypedRow for EditingLock {
    fn set(&mut self, field: Field, text: &str) -> bool {
        let s = || text.to_string();
        match field {
            Field::TenantId => self.tenant_id = s(),
            Field::RecordType => self.record_type = s(),
            Field::RecordId => self.record_id = s(),
            Field::LockedBy => self.locked_by = s(),
            Field::LockedAt => return ts(text, &mut self.locked_at),
            Field::ExpiresAt => return ts(text, &mut self.expires_at),
            _ => return false,
        }
        true
    }
}
