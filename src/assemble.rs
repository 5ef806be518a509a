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
//! - a [`Item::Boundary`] is emitted only outside a transaction.

use std::collections::{HashMap, HashSet};

use crate::decode::{Message, ReplicaIdentity};
use crate::events::{Change, EventBuilder, Layout, Tables, TxContext, actor, timestamp};
use crate::publish::Item;

/// The stream broke the protocol's rules; the pipeline restarts.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    #[error("pgoutput {0} arrived outside a transaction")]
    OutsideTransaction(&'static str),
    #[error("pgoutput change for relation {0} arrived before its Relation message")]
    UnknownRelation(u32),
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
    warned_identity: HashSet<u32>,
    tx: Option<OpenTx>,
    resume_at: u64,
}

impl Assembler {
    pub fn new(tables: Tables, builder: EventBuilder, resume_at: u64) -> Self {
        Assembler {
            tables,
            builder,
            relations: HashMap::new(),
            warned_identity: HashSet::new(),
            tx: None,
            resume_at,
        }
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
                        commit_lsn: b.final_lsn,
                        commit_time: timestamp::from_pg_micros(b.commit_time),
                        xid: b.xid,
                        actor: None,
                    },
                    next_index: 0,
                    skip: b.final_lsn < self.resume_at,
                });
            }
            Message::Commit(c) => {
                self.tx
                    .take()
                    .ok_or(AssembleError::OutsideTransaction("Commit"))?;
                out.push(Item::Boundary(c.end_lsn));
            }
            Message::Relation(rel) => {
                let layout = Layout::of(&self.tables, &rel);
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
            Message::Truncate(t) => {
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
            }
            Message::Type(_) | Message::Origin(_) | Message::Message(_) => {}
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
