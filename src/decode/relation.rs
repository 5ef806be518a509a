//! Relation and Type messages: the schema of the rows that follow.

use super::{DecodeError, reader::Reader};

/// How much of the old row Postgres logs on update and delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplicaIdentity {
    /// Primary key only (`d`).
    Default,
    /// Nothing (`n`).
    Nothing,
    /// Every column (`f`): walcast's before-images need this.
    Full,
    /// A chosen unique index (`i`).
    Index,
}

/// One column of a relation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    pub type_oid: u32,
    pub type_modifier: i32,
    /// Part of the replica identity key.
    pub is_key: bool,
}

/// A table's schema as the walsender sees it. Sent before the first change to
/// the table in a session and again after every DDL that touches it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub oid: u32,
    pub namespace: String,
    pub name: String,
    pub replica_identity: ReplicaIdentity,
    pub columns: Vec<Column>,
}

/// Upper bound on columns, so a corrupt count cannot reserve a huge Vec.
/// Postgres itself allows at most 1,664 columns in a table.
const MAX_COLUMNS: usize = 1664;

impl Relation {
    pub(super) fn decode(r: &mut Reader<'_>) -> Result<Self, DecodeError> {
        let oid = r.u32("Relation oid")?;
        let namespace = r.cstr("Relation namespace")?.to_owned();
        let name = r.cstr("Relation name")?.to_owned();
        let replica_identity = match r.u8("Relation replica identity")? {
            b'd' => ReplicaIdentity::Default,
            b'n' => ReplicaIdentity::Nothing,
            b'f' => ReplicaIdentity::Full,
            b'i' => ReplicaIdentity::Index,
            byte => {
                return Err(DecodeError::BadMarker {
                    what: "Relation replica identity",
                    byte,
                });
            }
        };
        let count = r.i16("Relation column count")?;
        let count = usize::try_from(count)
            .ok()
            .filter(|&n| n <= MAX_COLUMNS)
            .ok_or(DecodeError::BadLength {
                what: "Relation column count",
                len: i64::from(count),
            })?;
        let mut columns = Vec::with_capacity(count);
        for _ in 0..count {
            let flags = r.u8("Relation column flags")?;
            columns.push(Column {
                name: r.cstr("Relation column name")?.to_owned(),
                type_oid: r.u32("Relation column type")?,
                type_modifier: r.i32("Relation column type modifier")?,
                is_key: flags & 1 == 1,
            });
        }
        Ok(Relation {
            oid,
            namespace,
            name,
            replica_identity,
            columns,
        })
    }

    /// The position of the column called `name`.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// A user-defined type used by a following Relation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo<'a> {
    pub oid: u32,
    pub namespace: &'a str,
    pub name: &'a str,
}

impl<'a> TypeInfo<'a> {
    pub(super) fn decode(r: &mut Reader<'a>) -> Result<Self, DecodeError> {
        Ok(TypeInfo {
            oid: r.u32("Type oid")?,
            namespace: r.cstr("Type namespace")?,
            name: r.cstr("Type name")?,
        })
    }
}
