//! SPEC §2 action rules, decided from the change kind and the row images.

use pbjson_types::Timestamp;

use super::layout::{Field, Layout};
use super::row::Image;
use super::timestamp;
use crate::proto::{Action, Entity};

/// What kind of row change produced an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Insert,
    Update,
    Delete,
}

/// The text of `field` in `image`, if present and not NULL.
pub fn field<'a>(layout: &Layout, image: Option<&Image<'a>>, field: Field) -> Option<&'a str> {
    image?.get(layout.index(field)?)?.text()
}

/// Decides the action. A transition rule (completed, archived, transferred)
/// needs the before-image; without one (REPLICA IDENTITY not FULL) walcast
/// does not guess and reports a plain update / refresh.
pub fn decide(
    layout: &Layout,
    kind: Kind,
    before: Option<&Image<'_>>,
    after: Option<&Image<'_>>,
    commit_time: &Timestamp,
) -> Action {
    let became = |f: Field, value: &str| {
        field(layout, after, f) == Some(value)
            && before.is_some_and(|_| field(layout, before, f) != Some(value))
    };
    match (layout.entity, kind) {
        (Entity::Task | Entity::Project, Kind::Insert) => Action::Created,
        (Entity::Task | Entity::Project, Kind::Delete) => Action::Deleted,
        (Entity::Task, Kind::Update) if became(Field::Status, "done") => Action::Completed,
        (Entity::Project, Kind::Update) if became(Field::Status, "archived") => Action::Archived,
        (Entity::Task | Entity::Project, Kind::Update) => Action::Updated,
        (Entity::Lock, Kind::Insert) => Action::Acquired,
        (Entity::Lock, Kind::Update) => {
            let old = field(layout, before, Field::LockedBy);
            let new = field(layout, after, Field::LockedBy);
            if old.is_some() && old != new {
                Action::Transferred
            } else {
                Action::Refreshed
            }
        }
        (Entity::Lock, Kind::Delete) => {
            let expires = field(layout, before, Field::ExpiresAt).and_then(timestamp::parse);
            match expires {
                Some(e)
                    if (commit_time.seconds, commit_time.nanos)
                        >= (e.timestamp.seconds, e.timestamp.nanos) =>
                {
                    Action::Expired
                }
                _ => Action::Released,
            }
        }
        (Entity::Unspecified, _) => Action::Unspecified,
    }
}

/// The lower-case subject token of an action (`ACTION_COMPLETED` → `completed`).
pub fn token(action: Action) -> &'static str {
    match action {
        Action::Unspecified => "unspecified",
        Action::Created => "created",
        Action::Updated => "updated",
        Action::Completed => "completed",
        Action::Archived => "archived",
        Action::Deleted => "deleted",
        Action::Acquired => "acquired",
        Action::Refreshed => "refreshed",
        Action::Transferred => "transferred",
        Action::Released => "released",
        Action::Expired => "expired",
        Action::Truncated => "truncated",
    }
}

/// The subject token of an entity.
pub fn entity_token(entity: Entity) -> &'static str {
    match entity {
        Entity::Task => "task",
        Entity::Project => "project",
        Entity::Lock => "lock",
        Entity::Unspecified => "unspecified",
    }
}
