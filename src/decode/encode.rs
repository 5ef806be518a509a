//! pgoutput encoder: the inverse of the decoder, byte for byte (flag bits
//! the decoder does not keep are written as 0), for byte fixtures,
//! property-based round trips and the fuzz targets. Only in test builds and
//! with the `pgoutput-encoder` feature (which the fuzz crate enables).

use super::{Message, Relation, ReplicaIdentity, Value};

pub fn tuple(out: &mut Vec<u8>, values: &[Value<'_>]) {
    out.extend_from_slice(&(values.len() as i16).to_be_bytes());
    for v in values {
        match v {
            Value::Null => out.push(b'n'),
            Value::UnchangedToast => out.push(b'u'),
            Value::Text(b) | Value::Binary(b) => {
                out.push(if matches!(v, Value::Text(_)) {
                    b't'
                } else {
                    b'b'
                });
                out.extend_from_slice(&(b.len() as i32).to_be_bytes());
                out.extend_from_slice(b);
            }
        }
    }
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

/// Encodes a message exactly as the walsender would.
pub fn message(msg: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    match msg {
        Message::Begin(b) => {
            out.push(b'B');
            out.extend_from_slice(&b.final_lsn.to_be_bytes());
            out.extend_from_slice(&b.commit_time.to_be_bytes());
            out.extend_from_slice(&b.xid.to_be_bytes());
        }
        Message::Commit(c) => {
            out.push(b'C');
            out.push(c.flags);
            out.extend_from_slice(&c.commit_lsn.to_be_bytes());
            out.extend_from_slice(&c.end_lsn.to_be_bytes());
            out.extend_from_slice(&c.commit_time.to_be_bytes());
        }
        Message::Origin(o) => {
            out.push(b'O');
            out.extend_from_slice(&o.commit_lsn.to_be_bytes());
            cstr(&mut out, o.name);
        }
        Message::Relation(r) => relation(&mut out, r),
        Message::Type(t) => {
            out.push(b'Y');
            out.extend_from_slice(&t.oid.to_be_bytes());
            cstr(&mut out, t.namespace);
            cstr(&mut out, t.name);
        }
        Message::Insert(i) => {
            out.push(b'I');
            out.extend_from_slice(&i.relation.to_be_bytes());
            out.push(b'N');
            tuple(&mut out, &i.new.iter().collect::<Vec<_>>());
        }
        Message::Update(u) => {
            out.push(b'U');
            out.extend_from_slice(&u.relation.to_be_bytes());
            if let Some(old) = &u.old {
                out.push(if u.key_only { b'K' } else { b'O' });
                tuple(&mut out, &old.iter().collect::<Vec<_>>());
            }
            out.push(b'N');
            tuple(&mut out, &u.new.iter().collect::<Vec<_>>());
        }
        Message::Delete(d) => {
            out.push(b'D');
            out.extend_from_slice(&d.relation.to_be_bytes());
            out.push(if d.key_only { b'K' } else { b'O' });
            tuple(&mut out, &d.old.iter().collect::<Vec<_>>());
        }
        Message::Truncate(t) => {
            let rels: Vec<u32> = t.relations().collect();
            out.push(b'T');
            out.extend_from_slice(&(rels.len() as i32).to_be_bytes());
            out.push(t.options);
            for oid in rels {
                out.extend_from_slice(&oid.to_be_bytes());
            }
        }
        Message::Message(m) => {
            out.push(b'M');
            out.push(u8::from(m.transactional));
            out.extend_from_slice(&m.lsn.to_be_bytes());
            cstr(&mut out, m.prefix);
            out.extend_from_slice(&(m.content.len() as i32).to_be_bytes());
            out.extend_from_slice(m.content);
        }
    }
    out
}

pub fn relation(out: &mut Vec<u8>, r: &Relation) {
    out.push(b'R');
    out.extend_from_slice(&r.oid.to_be_bytes());
    cstr(out, &r.namespace);
    cstr(out, &r.name);
    out.push(match r.replica_identity {
        ReplicaIdentity::Default => b'd',
        ReplicaIdentity::Nothing => b'n',
        ReplicaIdentity::Full => b'f',
        ReplicaIdentity::Index => b'i',
    });
    out.extend_from_slice(&(r.columns.len() as i16).to_be_bytes());
    for c in &r.columns {
        out.push(u8::from(c.is_key));
        cstr(out, &c.name);
        out.extend_from_slice(&c.type_oid.to_be_bytes());
        out.extend_from_slice(&c.type_modifier.to_be_bytes());
    }
}

/// Encodes an Insert of `values` into `relation` (the common fixture).
pub fn insert(relation: u32, values: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'I'];
    out.extend_from_slice(&relation.to_be_bytes());
    out.push(b'N');
    tuple(&mut out, values);
    out
}

/// Encodes an Update with an optional full (`O`) old image.
pub fn update(relation: u32, old: Option<&[Value<'_>]>, new: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'U'];
    out.extend_from_slice(&relation.to_be_bytes());
    if let Some(old) = old {
        out.push(b'O');
        tuple(&mut out, old);
    }
    out.push(b'N');
    tuple(&mut out, new);
    out
}

/// Encodes a Delete with a full (`O`) old image.
pub fn delete(relation: u32, old: &[Value<'_>]) -> Vec<u8> {
    let mut out = vec![b'D'];
    out.extend_from_slice(&relation.to_be_bytes());
    out.push(b'O');
    tuple(&mut out, old);
    out
}
