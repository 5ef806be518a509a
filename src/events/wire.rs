//! A `ChangeEvent`'s protobuf bytes, written straight from the borrowed row
//! images.
//!
//! Why not the generated types: they hold a `String` per column, so every
//! event cost ~30 allocations that were copied once more by the encoder and
//! then freed — about a sixth of walcast's CPU per published event (session
//! 19's profile). Here a typed row is an array of values borrowed from the
//! image, and the message is written in one pass into a buffer of its exact
//! size.
//!
//! The generated types stay the contract. The presence rules are proto3's
//! as prost writes them (a plain string or number is left out when empty or
//! zero, an `optional` one and a message are written when present), fields
//! go in tag order, and `events::tests` decodes what this writes with the
//! generated types and compares it with the event built through them.

use pbjson_types::Timestamp;
use prost::encoding::{WireType, encode_key, encode_varint, encoded_len_varint, key_len};

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
    out
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

    /// The event's protobuf bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut size = Writer::sizing();
        self.write(&mut size);
        let mut out = Writer {
            len: 0,
            buf: Some(Vec::with_capacity(size.len)),
        };
        self.write(&mut out);
        out.buf.unwrap_or_default()
    }

    /// Writes (or, into a sizing writer, measures) the message.
    fn write(&self, w: &mut Writer) {
        w.str(1, self.event_id);
        w.str(2, self.tenant_id);
        w.uint(3, self.seq);
        w.uint(4, self.entity as i32 as u64);
        w.uint(5, self.action as i32 as u64);
        w.str(6, self.entity_id);
        w.uint(7, self.commit_lsn);
        w.message(8, |w| w.timestamp(&self.commit_time));
        w.uint(9, self.xid);
        w.uint(10, self.tx_index.into());
        if let Some(actor) = &self.actor {
            w.message(11, |w| {
                w.opt_str(1, actor.actor_type);
                w.opt_str(2, actor.actor_id);
                w.opt_str(3, actor.client_id);
            });
        }
        for name in &self.changed_fields {
            w.opt_str(12, Some(name));
        }
        // The oneofs: a task, project or lock, after (13–15) and before (16–18).
        let base = |row: &Row| match row.entity {
            Entity::Task => 0,
            Entity::Project => 1,
            _ => 2,
        };
        if let Some(row) = &self.after {
            w.message(13 + base(row), |w| w.row(row));
        }
        if let Some(row) = &self.before {
            w.message(16 + base(row), |w| w.row(row));
        }
        for (key, value) in &self.extra {
            w.message(19, |w| {
                w.str(1, key);
                w.str(2, value);
            });
        }
        for name in &self.unchanged_fields {
            w.opt_str(20, Some(name));
        }
        w.str(21, self.table);
    }
}

/// Writes protobuf fields into a buffer, or (without one) only counts their
/// bytes: the same code measures a message and writes it, so the two cannot
/// disagree.
struct Writer {
    len: usize,
    buf: Option<Vec<u8>>,
}

impl Writer {
    fn sizing() -> Self {
        Writer { len: 0, buf: None }
    }

    fn key(&mut self, tag: u32, wire_type: WireType) {
        self.len += key_len(tag);
        if let Some(b) = &mut self.buf {
            encode_key(tag, wire_type, b);
        }
    }

    fn varint(&mut self, v: u64) {
        self.len += encoded_len_varint(v);
        if let Some(b) = &mut self.buf {
            encode_varint(v, b);
        }
    }

    fn raw(&mut self, bytes: &[u8]) {
        self.len += bytes.len();
        if let Some(b) = &mut self.buf {
            b.extend_from_slice(bytes);
        }
    }

    /// A plain `string`: nothing when empty.
    fn str(&mut self, tag: u32, s: &str) {
        if !s.is_empty() {
            self.opt_str(tag, Some(s));
        }
    }

    /// An `optional` (or repeated) `string`: written when present.
    fn opt_str(&mut self, tag: u32, s: Option<&str>) {
        if let Some(s) = s {
            self.key(tag, WireType::LengthDelimited);
            self.varint(s.len() as u64);
            self.raw(s.as_bytes());
        }
    }

    /// A plain integer (as its two's complement `u64`): nothing when zero.
    fn uint(&mut self, tag: u32, v: u64) {
        if v != 0 {
            self.key(tag, WireType::Varint);
            self.varint(v);
        }
    }

    /// A nested message: its length first, measured by writing it into a
    /// sizing writer.
    fn message(&mut self, tag: u32, body: impl Fn(&mut Writer)) {
        let mut sizing = Writer::sizing();
        body(&mut sizing);
        let len = sizing.len;
        self.key(tag, WireType::LengthDelimited);
        self.varint(len as u64);
        if self.buf.is_some() {
            body(self);
        } else {
            self.len += len;
        }
    }

    fn timestamp(&mut self, t: &Timestamp) {
        self.uint(1, t.seconds as u64);
        self.uint(2, i64::from(t.nanos) as u64);
    }

    fn row(&mut self, row: &Row) {
        for (tag, val) in row.vals.iter().enumerate() {
            let tag = tag as u32;
            match val {
                None => {}
                Some((Kind::Str, Val::Str(s))) => self.str(tag, s),
                Some((_, Val::Str(s))) => self.opt_str(tag, Some(s)),
                Some((Kind::OptI32, Val::Int(v))) => {
                    self.key(tag, WireType::Varint);
                    self.varint(*v as u64);
                }
                Some((_, Val::Int(v))) => self.uint(tag, *v as u64),
                Some((_, Val::Ts(t))) => self.message(tag, |w| w.timestamp(t)),
            }
        }
    }
}
