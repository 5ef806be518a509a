//! Messages missing from the middle of the stream (SPEC §4.7, issue 19):
//! deleted by hand (`$JS.API.STREAM.MSG.DELETE`) or lost by the broker
//! (Jepsen, NATS 2.12.1: records lost from the middle of a stream).
//!
//! JetStream reports them cheaply: its stream info counts the messages
//! missing between the first and the last sequence (`num_deleted`), and
//! lists them on request (`deleted_details`). Messages dropped at the head
//! (max age, max bytes) move the first sequence instead and are not holes.
//!
//! JetStream cannot put a message back at its old position, and appending
//! a lost event at the tail would break "stream order = seq order" within
//! its tenant (SPEC §4.2). So a hole is never repaired by republishing:
//! - within the repair window (past the checkpoint: the slot still holds
//!   the WAL) the replay names every lost event — tenant and seq — and the
//!   run stops with that list (`pipeline::reader::Skip`), unless the
//!   operator accepted the hole (`--accept-holes-through`) or each tenant
//!   lost only its oldest events (`pipeline::retention`: a purge by subject);
//! - beyond it (the slot no longer holds those events) walcast logs an
//!   ERROR naming the range and the neighbouring events, and goes on.
//!
//! Either way the gauge [`m::STREAM_MISSING_MESSAGES`] says how many
//! messages are missing: never silent.

use std::collections::BTreeMap;
use std::fmt;

use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::metrics as m;

/// A run of consecutive stream positions whose messages are gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hole {
    pub first: StreamSeq,
    pub last: StreamSeq,
}

impl Hole {
    pub fn messages(&self) -> u64 {
        self.last.0 - self.first.0 + 1
    }

    pub fn contains(&self, seq: StreamSeq) -> bool {
        self.first <= seq && seq <= self.last
    }
}

impl fmt::Display for Hole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}..={}", self.first, self.last)
    }
}

/// The holes a list of deleted stream sequences makes, in order, merged.
pub fn ranges(mut deleted: Vec<u64>) -> Vec<Hole> {
    deleted.sort_unstable();
    deleted.dedup();
    let mut out: Vec<Hole> = Vec::new();
    for seq in deleted.into_iter().map(StreamSeq) {
        match out.last_mut() {
            Some(h) if h.last.next() == seq => h.last = seq,
            _ => out.push(Hole {
                first: seq,
                last: seq,
            }),
        }
    }
    out
}

/// What a message's headers say about it: its event, tenant and seq.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub event_id: String,
    pub tenant: Option<String>,
    pub seq: Option<u64>,
}

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "event {}", self.event_id)?;
        if let (Some(t), Some(s)) = (&self.tenant, self.seq) {
            write!(f, " (tenant {t} seq {s})")?;
        }
        if let Some((lsn, _)) = crate::events::parse_event_id(&self.event_id) {
            write!(f, " committed at LSN {lsn}")?;
        }
        Ok(())
    }
}

/// Holes named in a message at most; the rest are summed up.
pub const HOLES_NAMED: usize = 20;

/// `3..=5, 9..=10` — the first [`HOLES_NAMED`], then how many more.
pub fn describe(holes: &[Hole]) -> String {
    let mut parts: Vec<String> = holes
        .iter()
        .take(HOLES_NAMED)
        .map(ToString::to_string)
        .collect();
    if let Some(rest) = holes.get(HOLES_NAMED..).filter(|r| !r.is_empty()) {
        parts.push(format!(
            "and {} more holes ({} messages) up to {}",
            rest.len(),
            missing(rest),
            rest[rest.len() - 1].last
        ));
    }
    parts.join(", ")
}

/// Whether every hole of `holes` lies within one of `judged` (a hole judged
/// earlier may since have been split at the checkpoint, never grown).
pub fn covered(holes: &[Hole], judged: &[Hole]) -> bool {
    holes.iter().all(|h| {
        judged
            .iter()
            .any(|j| j.first <= h.first && h.last <= j.last)
    })
}

/// Total messages missing.
pub fn missing(holes: &[Hole]) -> u64 {
    holes.iter().map(Hole::messages).sum()
}

/// Holes split at the checkpoint's stream sequence: those past it are
/// within the repair window (the slot holds their WAL), the rest beyond.
pub fn split(holes: &[Hole], checkpoint: StreamSeq) -> (Vec<Hole>, Vec<Hole>) {
    let (mut within, mut beyond) = (Vec::new(), Vec::new());
    for h in holes {
        if h.last <= checkpoint {
            beyond.push(*h);
        } else if h.first > checkpoint {
            within.push(*h);
        } else {
            beyond.push(Hole {
                first: h.first,
                last: checkpoint,
            });
            within.push(Hole {
                first: checkpoint.next(),
                last: h.last,
            });
        }
    }
    (within, beyond)
}

/// Sets the gauge of messages missing from the middle of the stream.
pub fn gauge(missing: u64) {
    metrics::gauge!(m::STREAM_MISSING_MESSAGES).set(missing as f64);
}

/// Events a replay found in holes past the checkpoint that the operator has
/// not accepted: the run stops with [`HoleLoss::message`] unless every
/// tenant lost only its oldest events (`pipeline::retention`).
#[derive(Debug)]
pub struct HoleLoss {
    /// The error that names the holes and the lost events.
    pub message: String,
    /// The holes, as named in `message`.
    pub holes: String,
    /// The holes themselves.
    pub ranges: Vec<Hole>,
    pub lost: Lost,
}

/// Tenants named in a message at most; the rest are counted.
const TENANTS_NAMED: usize = 20;

/// The events a replay found at positions missing from the stream:
/// per tenant, its lost seqs as ranges.
#[derive(Debug, Default)]
pub struct Lost {
    tenants: BTreeMap<String, Vec<(TenantSeq, TenantSeq)>>,
    /// Events without a tenant (dead letters).
    pub untenanted: u64,
    pub events: u64,
    /// The first and last lost event's id.
    pub ids: Option<(String, String)>,
}

impl Lost {
    pub fn record(&mut self, event_id: &str, tenant: Option<(&str, TenantSeq)>) {
        self.events += 1;
        match &mut self.ids {
            Some((_, last)) => *last = event_id.to_string(),
            None => self.ids = Some((event_id.to_string(), event_id.to_string())),
        }
        let Some((tenant, seq)) = tenant else {
            self.untenanted += 1;
            return;
        };
        let ranges = self.tenants.entry(tenant.to_string()).or_default();
        match ranges.last_mut() {
            Some((_, last)) if TenantSeq(last.0 + 1) == seq => *last = seq,
            _ => ranges.push((seq, seq)),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Each tenant that lost events, with the highest seq it lost.
    pub fn highest_per_tenant(&self) -> Vec<(String, TenantSeq)> {
        self.tenants
            .iter()
            .filter_map(|(t, ranges)| Some((t.clone(), ranges.last()?.1)))
            .collect()
    }

    /// `tenant acme seq 4..=6, tenant beta seq 2..=2, ...`
    pub fn describe(&self) -> String {
        let mut parts: Vec<String> = self
            .tenants
            .iter()
            .take(TENANTS_NAMED)
            .map(|(t, ranges)| {
                let seqs: Vec<String> = ranges.iter().map(|(a, b)| format!("{a}..={b}")).collect();
                format!("tenant {t} seq {}", seqs.join(","))
            })
            .collect();
        if self.tenants.len() > TENANTS_NAMED {
            parts.push(format!(
                "and {} more tenants",
                self.tenants.len() - TENANTS_NAMED
            ));
        }
        if self.untenanted > 0 {
            parts.push(format!("{} dead letters", self.untenanted));
        }
        parts.join(", ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deleted_sequences_make_merged_holes() {
        let holes = ranges(vec![9, 3, 4, 5, 12, 10]);
        let shown: Vec<String> = holes.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["3..=5", "9..=10", "12..=12"]);
        assert_eq!(missing(&holes), 6);
        assert!(holes[0].contains(StreamSeq(4)) && !holes[0].contains(StreamSeq(6)));
    }

    #[test]
    fn many_holes_are_summed_up() {
        let holes = ranges((1..=50).map(|i| i * 2).collect());
        let text = describe(&holes);
        assert!(text.starts_with("2..=2, 4..=4, "), "{text}");
        assert!(
            text.ends_with("40..=40, and 30 more holes (30 messages) up to 100"),
            "{text}"
        );
    }

    #[test]
    fn split_at_the_checkpoint() {
        let holes = ranges(vec![3, 4, 5, 9, 10, 12]);
        let (within, beyond) = split(&holes, StreamSeq(9));
        let show = |h: &[Hole]| h.iter().map(ToString::to_string).collect::<Vec<_>>();
        assert_eq!(show(&beyond), ["3..=5", "9..=9"]);
        assert_eq!(show(&within), ["10..=10", "12..=12"]);
    }

    #[test]
    fn only_holes_within_judged_ones_are_covered() {
        let judged = ranges(vec![3, 4, 5, 9]);
        assert!(covered(&ranges(vec![4, 5, 9]), &judged));
        assert!(covered(&[], &judged));
        assert!(!covered(&ranges(vec![2]), &judged), "an older, new hole");
        assert!(!covered(&ranges(vec![5, 6]), &judged), "a hole that grew");
    }

    #[test]
    fn lost_events_are_named_per_tenant() {
        let mut lost = Lost::default();
        lost.record("a", Some(("acme", TenantSeq(4))));
        lost.record("b", Some(("beta", TenantSeq(2))));
        lost.record("c", Some(("acme", TenantSeq(5))));
        lost.record("d", None);
        lost.record("e", Some(("acme", TenantSeq(9))));
        assert_eq!(
            lost.describe(),
            "tenant acme seq 4..=5,9..=9, tenant beta seq 2..=2, 1 dead letters"
        );
        assert_eq!(lost.ids, Some(("a".into(), "e".into())));
    }
}
