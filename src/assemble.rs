//! Transaction assembler: keeps the state that spans messages — the relation
//! cache, the open transaction, its actor and event counter — and turns each
//! decoded message into [`Item`]s in WAL order.
//!
//! Invariants owned here:
//! - events are emitted only between Begin and Commit, numbered 0.. by
//!   `tx_index`; pgoutput v1 sends only committed transactions, whole, in
//!   commit order, so nothing from a rollback (or rolled-back savepoint)
//!   ever arrives;
//! - a transaction that committed before `resume_at` (the checkpoint) is
//!   skipped whole: its events are already counted in the checkpoint;
//! - a [`Item::Boundary`] is emitted only outside a transaction;
//! - a source table is followed by identity (its OID), not only by name: a
//!   table that is renamed (or moved to another schema) while it stays in the
//!   publication keeps producing events of its entity, and the rename is
//!   logged as a WARN naming the old and the new name — its changes are
//!   never silently dropped.

use std::collections::{HashMap, HashSet};

use crate::decode::{Message, Relation, ReplicaIdentity, Truncate};
use crate::events::{Change, EventBuilder, Layout, Tables, TxContext, actor, timestamp};
use crate::handoff::Item;
use crate::lsn::Lsn;
use crate::proto::Entity;

/// The stream broke the protocol's rules; the pipeline restarts.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("pgoutput {0} arrived outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("pgoutput change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
}

/// A relation known to be one of the source tables, and the name it had last.
struct KnownSource {
    entity: Entity,
    name: String,
}

struct OpenTx {
    ctx: TxContext,
    next_index: u32,
    skip: bool,
}

/// Stateful stage between the decoder and the event builder.
pub struct Assembler {
    tables: Tables,
    builder: EventBuilder,
    relations: HashMap<u32, Option<Layout>>,
    /// Source tables by OID, so a rename does not lose them.
    sources: HashMap<u32, KnownSource>,
    warned_identity: HashSet<u32>,
    tx: Option<OpenTx>,
    resume_at: Lsn,
}

impl Assembler {
    pub fn new(tables: Tables, builder: EventBuilder, resume_at: Lsn) -> Self {
        Assembler {
            tables,
            builder,
            relations: HashMap::new(),
            sources: HashMap::new(),
            warned_identity: HashSet::new(),
            tx: None,
            resume_at,
        }
    }

    /// Seeds the source tables' OIDs (as the catalog names them now), so that
    /// changes replayed from a time the table had another name are still
    /// recognised.
    pub fn with_sources(mut self, sources: impl IntoIterator<Item = (u32, Entity)>) -> Self {
        for (oid, entity) in sources {
            let name = self.configured_name(entity);
            self.sources.insert(oid, KnownSource { entity, name });
        }
        self
    }

    /// `(schema, table)` as configured for `entity`.
    fn configured(&self, entity: Entity) -> Option<(&str, &str)> {
        let t = &self.tables;
        let table = match entity {
            Entity::Task => &t.tasks,
            Entity::Project => &t.projects,
            Entity::Lock => &t.locks,
            Entity::Unspecified => return None,
        };
        Some((&t.schema, table))
    }

    /// `schema.table` as configured for `entity`.
    fn configured_name(&self, entity: Entity) -> String {
        self.configured(entity)
            .map(|(schema, table)| format!("{schema}.{table}"))
            .unwrap_or_default()
    }

    /// The layout of `rel`: by its name, or — for a source table that was
    /// renamed — by its identity, with a warning naming both names.
    fn layout(&mut self, rel: &Relation) -> Option<Layout> {
        let name = format!("{}.{}", rel.namespace, rel.name);
        let by_name = self.tables.entity(&rel.namespace, &rel.name);
        let entity = match self.sources.get_mut(&rel.oid) {
            Some(known) => {
                if known.name != name {
                    match by_name {
                        Some(_) => tracing::info!(
                            old = %known.name,
                            new = %name,
                            oid = rel.oid,
                            "source table renamed back to its configured name"
                        ),
                        None => tracing::warn!(
                            old = %known.name,
                            new = %name,
                            oid = rel.oid,
                            entity = ?known.entity,
                            "source table {} was renamed to {name}: walcast follows the table (same OID, still in the \
                             publication) and keeps publishing its changes. Rename it back, or configure the new name \
                             (--schema, --tasks-table, --projects-table, --locks-table) before walcast restarts: a \
                             restart refuses a publication that lacks the configured table",
                            known.name
                        ),
                    }
                    known.name = name;
                }
                known.entity
            }
            None => {
                let entity = by_name?;
                self.sources.insert(rel.oid, KnownSource { entity, name });
                entity
            }
        };
        if by_name == Some(entity) {
            return Layout::of(&self.tables, rel);
        }
        // Build the layout as if the table had its configured name, then
        // report its real one.
        let (namespace, table) = self.configured(entity)?;
        let mut renamed = rel.clone();
        renamed.namespace = namespace.to_string();
        renamed.name = table.to_string();
        let mut layout = Layout::of(&self.tables, &renamed)?;
        layout.table = format!("{}.{}", rel.namespace, rel.name);
        Some(layout)
    }

    pub fn builder(&self) -> &EventBuilder {
        &self.builder
    }

    /// Whether a transaction is open (no boundary may be emitted).
    pub fn in_transaction(&self) -> bool {
        self.tx.is_some()
    }

    /// Handles one message, appending what it produces to `out`.
    pub fn handle(&mut self, msg: Message<'_>, out: &mut Vec<Item>) -> Result<(), AssembleError> {
        match msg {
            Message::Begin(b) => {
                self.tx = Some(OpenTx {
                    ctx: TxContext {
                        commit_lsn: Lsn(b.final_lsn),
                        commit_time: timestamp::from_pg_micros(b.commit_time),
                        xid: b.xid,
                        actor: None,
                    },
                    next_index: 0,
                    skip: Lsn(b.final_lsn) < self.resume_at,
                });
            }
            Message::Commit(c) => {
                self.tx
                    .take()
                    .ok_or(AssembleError::OutsideTransaction("Commit"))?;
                out.push(Item::Boundary(Lsn(c.end_lsn)));
            }
            Message::Relation(rel) => self.relation(&rel),
            Message::Message(m) if m.transactional && m.prefix == actor::MESSAGE_PREFIX => {
                let tx = self
                    .tx
                    .as_mut()
                    .ok_or(AssembleError::OutsideTransaction("Message"))?;
                match actor::from_message(m.content) {
                    Ok(a) => tx.ctx.actor = Some(a),
                    Err(e) => {
                        tracing::warn!(error = %e, xid = tx.ctx.xid, "ignoring malformed walcast.actor message")
                    }
                }
            }
            Message::Insert(i) => self.change(i.relation, Change::Insert { new: i.new }, out)?,
            Message::Update(u) => self.change(
                u.relation,
                Change::Update {
                    old: u.old,
                    key_only: u.key_only,
                    new: u.new,
                },
                out,
            )?,
            Message::Delete(d) => self.change(
                d.relation,
                Change::Delete {
                    old: d.old,
                    key_only: d.key_only,
                },
                out,
            )?,
            Message::Truncate(t) => self.truncate(&t, out)?,
            Message::Type(_) | Message::Origin(_) | Message::Message(_) => {}
        }
        Ok(())
    }

    /// Caches the relation's layout (`None`: not a source table), warning
    /// once per table without REPLICA IDENTITY FULL.
    fn relation(&mut self, rel: &Relation) {
        let layout = self.layout(rel);
        if layout.is_some()
            && rel.replica_identity != ReplicaIdentity::Full
            && self.warned_identity.insert(rel.oid)
        {
            tracing::warn!(
                table = %format!("{}.{}", rel.namespace, rel.name),
                "REPLICA IDENTITY is not FULL: updates and deletes carry no before-image, so \
                 transitions (completed, archived, transferred, expired) and deletes' tenants \
                 cannot always be derived; run ALTER TABLE ... REPLICA IDENTITY FULL"
            );
        }
        self.relations.insert(rel.oid, layout);
    }

    /// One event per source table the TRUNCATE names.
    fn truncate(&mut self, t: &Truncate<'_>, out: &mut Vec<Item>) -> Result<(), AssembleError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or(AssembleError::OutsideTransaction("Truncate"))?;
        for oid in t.relations() {
            let layout = self
                .relations
                .get(&oid)
                .ok_or(AssembleError::UnknownRelation(oid))?;
            if let Some(layout) = layout {
                let index = tx.next_index;
                tx.next_index += 1;
                if !tx.skip {
                    out.push(Item::Event(self.builder.truncate(&tx.ctx, index, layout)));
                }
            }
        }
        Ok(())
    }

    fn change(
        &mut self,
        oid: u32,
        change: Change<'_>,
        out: &mut Vec<Item>,
    ) -> Result<(), AssembleError> {
        let tx = self
            .tx
            .as_mut()
            .ok_or(AssembleError::OutsideTransaction("row change"))?;
        let layout = self
            .relations
            .get(&oid)
            .ok_or(AssembleError::UnknownRelation(oid))?;
        let Some(layout) = layout else { return Ok(()) };
        let index = tx.next_index;
        tx.next_index += 1;
        if !tx.skip {
            out.push(Item::Event(
                self.builder.build(&tx.ctx, index, layout, change),
            ));
            if index > 0 {
                crate::failpoint::crash_point("mid_transaction");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decode::{Begin, Commit, Value, decode, encode};
    use crate::events::Sequencer;

    use crate::events::tests::LOCK_COLS as LOCKS;

    fn relation(oid: u32, name: &str) -> Vec<u8> {
        encode::message(&Message::Relation(Relation {
            oid,
            ..crate::events::tests::relation(name, LOCKS)
        }))
    }

    fn insert(oid: u32, record: &str) -> Vec<u8> {
        let mut out = vec![b'I'];
        out.extend_from_slice(&oid.to_be_bytes());
        out.push(b'N');
        let values: Vec<Value<'_>> = [
            "acme",
            "task",
            record,
            "ann",
            "2025-01-01 00:00:00+00",
            "2025-01-01 01:00:00+00",
        ]
        .iter()
        .map(|v| Value::Text(v.as_bytes()))
        .collect();
        encode::tuple(&mut out, &values);
        out
    }

    /// Feeds one transaction (after `relations`) and returns its events' subjects.
    fn transaction(a: &mut Assembler, lsn: u64, messages: &[Vec<u8>]) -> Vec<String> {
        let mut out = Vec::new();
        let begin = encode::message(&Message::Begin(Begin {
            final_lsn: lsn,
            commit_time: 0,
            xid: 7,
        }));
        let commit = encode::message(&Message::Commit(Commit {
            flags: 0,
            commit_lsn: lsn,
            end_lsn: lsn + 8,
            commit_time: 0,
        }));
        for bytes in std::iter::once(&begin)
            .chain(messages)
            .chain(std::iter::once(&commit))
        {
            a.handle(decode(bytes).unwrap(), &mut out).unwrap();
        }
        out.iter()
            .filter_map(|item| match item {
                Item::Event(e) => Some(e.subject.clone()),
                _ => None,
            })
            .collect()
    }

    fn assembler() -> Assembler {
        Assembler::new(
            Tables::default(),
            EventBuilder::new("walcast", Sequencer::default()),
            Lsn(0),
        )
    }

    #[test]
    fn a_renamed_source_table_keeps_producing_events() {
        let mut a = assembler();
        let acquired = vec!["walcast.acme.lock.acquired".to_string()];
        assert_eq!(
            transaction(
                &mut a,
                100,
                &[relation(16003, "editing_locks"), insert(16003, "r1")]
            ),
            acquired
        );
        assert_eq!(
            transaction(
                &mut a,
                200,
                &[relation(16003, "editing_locks_v2"), insert(16003, "r2")]
            ),
            acquired
        );
        assert_eq!(
            transaction(
                &mut a,
                300,
                &[relation(16003, "editing_locks"), insert(16003, "r3")]
            ),
            acquired
        );
        // Another table that is not a source stays ignored.
        assert!(
            transaction(
                &mut a,
                400,
                &[relation(17000, "audit"), insert(17000, "r4")]
            )
            .is_empty()
        );
    }

    #[test]
    fn seeded_sources_are_recognised_under_an_old_name() {
        // A replay from before a rename: the catalog names the table as
        // configured now, the WAL still has its old name.
        let mut a = assembler().with_sources([(16003, Entity::Lock)]);
        assert_eq!(
            transaction(
                &mut a,
                100,
                &[relation(16003, "locks_old"), insert(16003, "r1")]
            ),
            vec!["walcast.acme.lock.acquired".to_string()]
        );
        let mut plain = assembler();
        assert!(
            transaction(
                &mut plain,
                100,
                &[relation(16003, "locks_old"), insert(16003, "r1")]
            )
            .is_empty()
        );
    }
}
