//! Row images: pgoutput tuples resolved against their layout, then typed.
//!
//! An update's new tuple may carry "unchanged TOAST" markers instead of large
//! values; they are filled from the before-image (present under REPLICA
//! IDENTITY FULL). Only when no before-image has the value is the column
//! listed in `unchanged_fields` — never silently empty.

use std::collections::HashMap;

use super::layout::{Field, Layout};
use super::timestamp;
use crate::decode::{Tuple, Value};
use crate::proto::{EditingLock, Project, Task};

/// One column of a resolved image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell<'a> {
    Null,
    Text(&'a str),
    /// Unchanged TOAST that no before-image could fill.
    Missing,
}

impl<'a> Cell<'a> {
    pub fn text(self) -> Option<&'a str> {
        match self {
            Cell::Text(t) => Some(t),
            _ => None,
        }
    }
}

/// A row image as cells in wire order.
pub type Image<'a> = Vec<Cell<'a>>;

/// Resolves a tuple, filling unchanged-TOAST markers from `before`.
pub fn resolve<'a>(tuple: &Tuple<'a>, before: Option<&Image<'a>>) -> Image<'a> {
    tuple
        .iter()
        .enumerate()
        .map(|(i, value)| match value {
            Value::Null => Cell::Null,
            // Text is UTF-8 (walcast requires a UTF-8 database); binary is never requested.
            Value::Text(bytes) | Value::Binary(bytes) => match std::str::from_utf8(bytes) {
                Ok(text) => Cell::Text(text),
                Err(_) => Cell::Missing,
            },
            Value::UnchangedToast => match before.and_then(|b| b.get(i)) {
                Some(cell @ Cell::Text(_)) => *cell,
                _ => Cell::Missing,
            },
        })
        .collect()
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
