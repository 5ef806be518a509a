//! Row images: pgoutput tuples resolved against their layout (typed by `wire`).
//!
//! An update's new tuple may carry "unchanged TOAST" markers instead of large
//! values; they are filled from the before-image (present under REPLICA
//! IDENTITY FULL). Only when no before-image has the value is the column
//! listed in `unchanged_fields` — never silently empty.

use crate::decode::{Tuple, Value};

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
