//! A `ChangeEvent`'s protobuf bytes, written straight from the borrowed row
//! images.
//!
//! Why not the generated types: they hold a `String` per column, so every
//! event cost ~30 allocations that were copied once more by the encoder and
//! then freed. Here a typed row is an array of values borrowed from the
//! image with its encoded length, and the message is written in one pass
//! into a buffer of its exact size (docs/BENCHMARKS.md, session 19).
//!
//! The generated types stay the contract. The presence rules are proto3's
//! as prost writes them (a plain string or number is left out when empty or
//! zero, an `optional` one and a message are written when present), fields
//! go in tag order, and `events::tests` decodes what this writes with the
//! generated types and compares it with the event built through them.

use pbjson_types::Timestamp;

use super::layout::{Field, Layout};
use super::row::{Cell, Image};
use super::timestamp;
use crate::proto::{Action, Actor, Entity};

/// How a typed field is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// `string`: left out when empty.
    Str,
    /// `optional string`: written when present.
    OptStr,
    /// `int64`: left out when zero.
    I64,
    /// `optional int32`: written when present.
    OptI32,
    /// `google.protobuf.Timestamp`: written when present.
    Ts,
}

/// A typed value, borrowed from its image where it is text.
#[derive(Debug, Clone, Copy)]
enum Val<'a> {
    Str(&'a str),
    Int(i64),
    Ts(Timestamp),
}

/// The tag and kind of `field` in `entity`'s row message (`proto/walcast/v1`).
fn slot(entity: Entity, field: Field) -> Option<(u32, Kind)> {
    use Field::*;
    use Kind::*;
    Some(match (entity, field) {
        (Entity::Task, f) => match f {
            Id => (1, Str),
            TenantId => (2, Str),
            ProjectId => (3, OptStr),
            Title => (4, Str),
            Description => (5, OptStr),
            Status => (6, Str),
            Priority => (7, OptI32),
            Assignee => (8, OptStr),
            DueAt => (9, Ts),
            CompletedAt => (10, Ts),
            Version => (11, I64),
            CreatedAt => (12, Ts),
            UpdatedAt => (13, Ts),
            UpdatedBy => (14, OptStr),
            ActorType => (15, OptStr),
            ClientId => (16, OptStr),
            Metadata => (17, OptStr),
            _ => return None,
        },
        (Entity::Project, f) => match f {
            Id => (1, Str),
            TenantId => (2, Str),
            Name => (3, Str),
            Description => (4, OptStr),
            Status => (5, Str),
            Version => (6, I64),
            CreatedAt => (7, Ts),
            UpdatedAt => (8, Ts),
            UpdatedBy => (9, OptStr),
            ActorType => (10, OptStr),
            ClientId => (11, OptStr),
            Metadata => (12, OptStr),
            _ => return None,
        },
        (Entity::Lock, f) => match f {
            TenantId => (1, Str),
            RecordType => (2, Str),
            RecordId => (3, Str),
            LockedBy => (4, Str),
            LockedAt => (5, Ts),
            ExpiresAt => (6, Ts),
            _ => return None,
        },
        (Entity::Unspecified, _) => return None,
    })
}

/// The highest field tag of a row message, plus one.
const ROW_TAGS: usize = 18;

/// A typed row: its values by tag.
#[derive(Debug, Clone)]
pub struct Row<'a> {
    entity: Entity,
    vals: [Option<(Kind, Val<'a>)>; ROW_TAGS],
    /// The encoded message's length, once every value is set.
    len: usize,
}

/// A typed row, plus the text of columns that are unknown or did not parse
/// and the names of columns whose value is missing (unchanged TOAST).
pub struct Typed<'a> {
    pub row: Row<'a>,
    pub extra: Vec<(&'a str, &'a str)>,
    pub missing: Vec<&'a str>,
}

/// Types an image. A value that does not fit its field's type exactly is
/// kept as text in `extra`: a type change or an out-of-range value never
/// loses data (an inexact timestamp is both set and kept).
pub fn typed<'a>(layout: &'a Layout, image: &Image<'a>) -> Typed<'a> {
    let mut out = Typed {
        row: Row {
            entity: layout.entity,
            vals: [None; ROW_TAGS],
            len: 0,
        },
        extra: Vec::new(),
        missing: Vec::new(),
    };
    for ((cell, field), name) in image.iter().zip(&layout.fields).zip(&layout.names) {
        let text = match cell {
            Cell::Missing => {
                out.missing.push(name);
                continue;
            }
            Cell::Null => continue,
            Cell::Text(text) => *text,
        };
        let Some((tag, kind)) = field.and_then(|f| slot(layout.entity, f)) else {
            out.extra.push((name, text));
            continue;
        };
        let (val, exact) = match kind {
            Kind::Str | Kind::OptStr => (Some(Val::Str(text)), true),
            Kind::I64 => (text.parse::<i64>().ok().map(Val::Int), true),
            Kind::OptI32 => (text.parse::<i32>().ok().map(|v| Val::Int(v.into())), true),
            Kind::Ts => match timestamp::parse(text) {
                Some(parsed) => (Some(Val::Ts(parsed.timestamp)), parsed.exact),
                None => (None, true),
            },
        };
        if let Some(val) = val {
            out.row.vals[tag as usize] = Some((kind, val));
        }
        if val.is_none() || !exact {
            out.extra.push((name, text));
        }
    }
    out.row.len = out
        .row
        .fields()
        .map(|(tag, kind, val)| field_len(tag, kind, val))
        .sum();
    out
}

impl<'a> Row<'a> {
    /// The set values, in tag order.
    fn fields(&self) -> impl Iterator<Item = (u32, Kind, Val<'a>)> + '_ {
        (self.vals.iter().enumerate())
            .filter_map(|(tag, v)| v.map(|(kind, val)| (tag as u32, kind, val)))
    }

    /// The oneof field (`after` 13–15, `before` 16–18) it is written as.
    fn tag(&self, first: u32) -> u32 {
        first
            + match self.entity {
                Entity::Task => 0,
                Entity::Project => 1,
                _ => 2,
            }
    }
}

/// Who made the change, borrowed.
#[derive(Debug, Clone, Copy, Default)]
pub struct ActorRef<'a> {
    pub actor_type: Option<&'a str>,
    pub actor_id: Option<&'a str>,
    pub client_id: Option<&'a str>,
}

impl<'a> From<&'a Actor> for ActorRef<'a> {
    fn from(a: &'a Actor) -> Self {
        ActorRef {
            actor_type: a.actor_type.as_deref(),
            actor_id: a.actor_id.as_deref(),
            client_id: a.client_id.as_deref(),
        }
    }
}

/// A `ChangeEvent`, borrowed (fields as in `proto/walcast/v1`).
pub struct Event<'a> {
    pub event_id: &'a str,
    pub tenant_id: &'a str,
    pub seq: u64,
    pub entity: Entity,
    pub action: Action,
    pub entity_id: &'a str,
    pub commit_lsn: u64,
    pub commit_time: Timestamp,
    pub xid: u64,
    pub tx_index: u32,
    pub actor: Option<ActorRef<'a>>,
    pub changed_fields: Vec<&'a str>,
    pub after: Option<Row<'a>>,
    pub before: Option<Row<'a>>,
    pub extra: Vec<(&'a str, &'a str)>,
    pub unchanged_fields: Vec<&'a str>,
    pub table: &'a str,
}

impl<'a> Event<'a> {
    /// An event of `layout`'s table at `commit_lsn`, every other field empty.
    pub fn empty(layout: &'a Layout, commit_lsn: u64, commit_time: Timestamp) -> Self {
        Event {
            event_id: "",
            tenant_id: "",
            seq: 0,
            entity: layout.entity,
            action: Action::Unspecified,
            entity_id: "",
            commit_lsn,
            commit_time,
            xid: 0,
            tx_index: 0,
            actor: None,
            changed_fields: Vec::new(),
            after: None,
            before: None,
            extra: Vec::new(),
            unchanged_fields: Vec::new(),
            table: &layout.table,
        }
    }

    /// The event's protobuf bytes, written into a buffer of their size.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = Vec::with_capacity(self.len());
        self.write(&mut buf);
        debug_assert_eq!(
            buf.len(),
            self.len(),
            "a field's length and writer disagree"
        );
        buf
    }

    fn actor_len(actor: &ActorRef) -> usize {
        opt_str_len(1, actor.actor_type)
            + opt_str_len(2, actor.actor_id)
            + opt_str_len(3, actor.client_id)
    }

    fn len(&self) -> usize {
        str_len(1, self.event_id)
            + str_len(2, self.tenant_id)
            + uint_len(3, self.seq)
            + uint_len(4, self.entity as i32 as u64)
            + uint_len(5, self.action as i32 as u64)
            + str_len(6, self.entity_id)
            + uint_len(7, self.commit_lsn)
            + message_len(8, timestamp_len(&self.commit_time))
            + uint_len(9, self.xid)
            + uint_len(10, self.tx_index.into())
            + (self.actor.as_ref()).map_or(0, |a| message_len(11, Self::actor_len(a)))
            + (self.changed_fields.iter())
                .map(|n| opt_str_len(12, Some(n)))
                .sum::<usize>()
            + (self.after.as_ref()).map_or(0, |r| message_len(r.tag(13), r.len))
            + (self.before.as_ref()).map_or(0, |r| message_len(r.tag(16), r.len))
            + (self.extra.iter())
                .map(|(k, v)| message_len(19, str_len(1, k) + str_len(2, v)))
                .sum::<usize>()
            + (self.unchanged_fields.iter())
                .map(|n| opt_str_len(20, Some(n)))
                .sum::<usize>()
            + str_len(21, self.table)
    }

    /// Writes the fields in tag order, as prost does.
    fn write(&self, buf: &mut Vec<u8>) {
        put_str(buf, 1, self.event_id);
        put_str(buf, 2, self.tenant_id);
        put_uint(buf, 3, self.seq);
        put_uint(buf, 4, self.entity as i32 as u64);
        put_uint(buf, 5, self.action as i32 as u64);
        put_str(buf, 6, self.entity_id);
        put_uint(buf, 7, self.commit_lsn);
        put_timestamp(buf, 8, &self.commit_time);
        put_uint(buf, 9, self.xid);
        put_uint(buf, 10, self.tx_index.into());
        if let Some(actor) = &self.actor {
            put_header(buf, 11, Self::actor_len(actor));
            put_opt_str(buf, 1, actor.actor_type);
            put_opt_str(buf, 2, actor.actor_id);
            put_opt_str(buf, 3, actor.client_id);
        }
        for name in &self.changed_fields {
            put_opt_str(buf, 12, Some(name));
        }
        if let Some(row) = &self.after {
            put_row(buf, row.tag(13), row);
        }
        if let Some(row) = &self.before {
            put_row(buf, row.tag(16), row);
        }
        for (key, value) in &self.extra {
            put_header(buf, 19, str_len(1, key) + str_len(2, value));
            put_str(buf, 1, key);
            put_str(buf, 2, value);
        }
        for name in &self.unchanged_fields {
            put_opt_str(buf, 20, Some(name));
        }
        put_str(buf, 21, self.table);
    }
}

// Each field's length and its writer side by side; the property test in
// `events::tests` holds the pairs to prost's bytes.

const VARINT: u64 = 0;
const LEN: u64 = 2;

fn key_len(tag: u32) -> usize {
    varint_len(u64::from(tag) << 3)
}

fn varint_len(v: u64) -> usize {
    // 1 byte per started 7 bits; 0 takes one byte.
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push(v as u8 | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

fn put_key(buf: &mut Vec<u8>, tag: u32, wire_type: u64) {
    put_varint(buf, u64::from(tag) << 3 | wire_type);
}

/// A plain `string`: nothing when empty.
fn str_len(tag: u32, s: &str) -> usize {
    if s.is_empty() {
        0
    } else {
        opt_str_len(tag, Some(s))
    }
}

fn put_str(buf: &mut Vec<u8>, tag: u32, s: &str) {
    if !s.is_empty() {
        put_opt_str(buf, tag, Some(s));
    }
}

/// An `optional` or repeated `string`: written when present.
fn opt_str_len(tag: u32, s: Option<&str>) -> usize {
    s.map_or(0, |s| message_len(tag, s.len()))
}

fn put_opt_str(buf: &mut Vec<u8>, tag: u32, s: Option<&str>) {
    if let Some(s) = s {
        put_header(buf, tag, s.len());
        buf.extend_from_slice(s.as_bytes());
    }
}

/// A plain integer (as its two's complement `u64`): nothing when zero.
fn uint_len(tag: u32, v: u64) -> usize {
    if v == 0 {
        0
    } else {
        key_len(tag) + varint_len(v)
    }
}

fn put_uint(buf: &mut Vec<u8>, tag: u32, v: u64) {
    if v != 0 {
        put_key(buf, tag, VARINT);
        put_varint(buf, v);
    }
}

/// A length-delimited field of `len` bytes, key and length included.
fn message_len(tag: u32, len: usize) -> usize {
    key_len(tag) + varint_len(len as u64) + len
}

fn put_header(buf: &mut Vec<u8>, tag: u32, len: usize) {
    put_key(buf, tag, LEN);
    put_varint(buf, len as u64);
}

fn timestamp_len(t: &Timestamp) -> usize {
    uint_len(1, t.seconds as u64) + uint_len(2, i64::from(t.nanos) as u64)
}

fn put_timestamp(buf: &mut Vec<u8>, tag: u32, t: &Timestamp) {
    put_header(buf, tag, timestamp_len(t));
    put_uint(buf, 1, t.seconds as u64);
    put_uint(buf, 2, i64::from(t.nanos) as u64);
}

/// A row's field: an `optional int32` is written even when zero.
fn field_len(tag: u32, kind: Kind, val: Val) -> usize {
    match (kind, val) {
        (Kind::Str, Val::Str(s)) => str_len(tag, s),
        (_, Val::Str(s)) => opt_str_len(tag, Some(s)),
        (Kind::OptI32, Val::Int(v)) => key_len(tag) + varint_len(v as u64),
        (_, Val::Int(v)) => uint_len(tag, v as u64),
        (_, Val::Ts(t)) => message_len(tag, timestamp_len(&t)),
    }
}

fn put_row(buf: &mut Vec<u8>, tag: u32, row: &Row) {
    put_header(buf, tag, row.len);
    for (tag, kind, val) in row.fields() {
        match (kind, val) {
            (Kind::Str, Val::Str(s)) => put_str(buf, tag, s),
            (_, Val::Str(s)) => put_opt_str(buf, tag, Some(s)),
            (Kind::OptI32, Val::Int(v)) => {
                put_key(buf, tag, VARINT);
                put_varint(buf, v as u64);
            }
            (_, Val::Int(v)) => put_uint(buf, tag, v as u64),
            (_, Val::Ts(t)) => put_timestamp(buf, tag, &t),
        }
    }
}
