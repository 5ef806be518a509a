//! Actor attribution (SPEC §4.5): a `walcast.actor` logical message in the
//! transaction wins; otherwise the row's own columns say who changed it.

use serde::Deserialize;

use super::action::field;
use super::layout::{Field, Layout};
use super::row::Image;
use super::wire::ActorRef;
use crate::proto::{Actor, Entity};

/// The `pg_logical_emit_message` prefix that sets the actor.
pub const MESSAGE_PREFIX: &str = "walcast.actor";

#[derive(Deserialize)]
struct ActorJson {
    actor_type: Option<String>,
    actor_id: Option<String>,
    client_id: Option<String>,
}

/// Parses a `walcast.actor` message body.
pub fn from_message(content: &[u8]) -> Result<Actor, serde_json::Error> {
    let a: ActorJson = serde_json::from_slice(content)?;
    Ok(Actor {
        actor_type: a.actor_type,
        actor_id: a.actor_id,
        client_id: a.client_id,
    })
}

/// The actor recorded in the row itself (`image` is the after-image, or the
/// before-image of a delete). For a lock it is the holder.
pub fn from_row<'a>(layout: &Layout, image: Option<&Image<'a>>) -> ActorRef<'a> {
    let text = |f| field(layout, image, f);
    match layout.entity {
        Entity::Lock => ActorRef {
            actor_type: None,
            actor_id: text(Field::LockedBy),
            client_id: None,
        },
        _ => ActorRef {
            actor_type: text(Field::ActorType),
            actor_id: text(Field::UpdatedBy),
            client_id: text(Field::ClientId),
        },
    }
}
