//! Which table is which entity, and which column is which typed field.
//!
//! Computed once per Relation message (so again after every DDL), never per
//! row. Columns walcast does not know map to `None` and end up in `extra`,
//! so `ALTER TABLE ... ADD COLUMN` never stops the stream.

use crate::decode::{Relation, ReplicaIdentity};
use crate::proto::Entity;

/// The configured source tables (SPEC §1: names are configurable).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tables {
    pub schema: String,
    pub tasks: String,
    pub projects: String,
    pub locks: String,
}

impl Default for Tables {
    fn default() -> Self {
        Tables {
            schema: "public".into(),
            tasks: "tasks".into(),
            projects: "projects".into(),
            locks: "editing_locks".into(),
        }
    }
}

impl Tables {
    /// The entity stored in `namespace.name`, if it is one of ours.
    pub fn entity(&self, namespace: &str, name: &str) -> Option<Entity> {
        if namespace != self.schema {
            return None;
        }
        if name == self.tasks {
            Some(Entity::Task)
        } else if name == self.projects {
            Some(Entity::Project)
        } else if name == self.locks {
            Some(Entity::Lock)
        } else {
            None
        }
    }
}

/// A typed field of `Task`, `Project` or `EditingLock`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field {
    Id,
    TenantId,
    ProjectId,
    Title,
    Name,
    Description,
    Status,
    Priority,
    Assignee,
    DueAt,
    CompletedAt,
    Version,
    CreatedAt,
    UpdatedAt,
    UpdatedBy,
    ActorType,
    ClientId,
    Metadata,
    RecordType,
    RecordId,
    LockedBy,
    LockedAt,
    ExpiresAt,
}

impl Field {
    /// The field a column of `entity` called `name` maps to.
    fn of(entity: Entity, name: &str) -> Option<Field> {
        use Field::*;
        let shared = match name {
            "tenant_id" => Some(TenantId),
            _ => None,
        };
        let specific = match entity {
            Entity::Task | Entity::Project => match name {
                "id" => Some(Id),
                "description" => Some(Description),
                "status" => Some(Status),
                "version" => Some(Version),
                "created_at" => Some(CreatedAt),
                "updated_at" => Some(UpdatedAt),
                "updated_by" => Some(UpdatedBy),
                "actor_type" => Some(ActorType),
                "client_id" => Some(ClientId),
                "metadata" => Some(Metadata),
                "title" if entity == Entity::Task => Some(Title),
                "project_id" if entity == Entity::Task => Some(ProjectId),
                "priority" if entity == Entity::Task => Some(Priority),
                "assignee" if entity == Entity::Task => Some(Assignee),
                "due_at" if entity == Entity::Task => Some(DueAt),
                "completed_at" if entity == Entity::Task => Some(CompletedAt),
                "name" if entity == Entity::Project => Some(Name),
                _ => None,
            },
            Entity::Lock => match name {
                "record_type" => Some(RecordType),
                "record_id" => Some(RecordId),
                "locked_by" => Some(LockedBy),
                "locked_at" => Some(LockedAt),
                "expires_at" => Some(ExpiresAt),
                _ => None,
            },
            Entity::Unspecified => None,
        };
        shared.or(specific)
    }
}

/// How to read rows of one relation.
#[derive(Debug, Clone)]
pub struct Layout {
    pub entity: Entity,
    /// `schema.table`, for the event's `table` field.
    pub table: String,
    pub replica_identity: ReplicaIdentity,
    /// Column names, in wire order.
    pub names: Vec<String>,
    /// The typed field of each column, in wire order; `None` goes to `extra`.
    pub fields: Vec<Option<Field>>,
}

impl Layout {
    /// The layout of `relation`, or `None` if it is not a configured table.
    pub fn of(tables: &Tables, relation: &Relation) -> Option<Layout> {
        let entity = tables.entity(&relation.namespace, &relation.name)?;
        Some(Layout {
            entity,
            table: format!("{}.{}", relation.namespace, relation.name),
            replica_identity: relation.replica_identity,
            names: relation.columns.iter().map(|c| c.name.clone()).collect(),
            fields: relation
                .columns
                .iter()
                .map(|c| Field::of(entity, &c.name))
                .collect(),
        })
    }

    /// The column index holding `field`.
    pub fn index(&self, field: Field) -> Option<usize> {
        self.fields.iter().position(|f| *f == Some(field))
    }
}
