//! Dedup and gap detection: the pure heart of a subscription.
//!
//! walcast numbers each tenant's events 1, 2, 3… with no gaps (SPEC §2), so a
//! subscriber needs one number per tenant to know exactly where it is: the
//! last `seq` it delivered. A message at or below it is a redelivery (after
//! a reconnect, a consumer re-created from an older position, a fallback
//! scan); one above `last + 1` means something was missed. The [`Tracker`]
//! only *judges*; the subscription acts on the verdict (deliver, skip, or
//! repair through the catch-up service and judge again).
//!
//! Invariant: a tenant's delivered seqs are exactly `last + 1, last + 2, …`,
//! each once. Recent `event_id`s are remembered too, so a change that
//! somehow appears twice under two seqs is still delivered once.

use std::collections::{HashMap, HashSet, VecDeque};

/// What to do with a message of a tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// The next event: deliver it, then [`Tracker::accept`] it.
    Next,
    /// Already delivered (its `seq` is at or below the tenant's position): skip.
    Duplicate,
    /// The next `seq`, but its `event_id` was already delivered under another
    /// `seq`: [`Tracker::accept`] it without delivering.
    DuplicateId,
    /// Events `last + 1 .. seq` are missing: repair from `last`, then judge
    /// this message again.
    Gap {
        /// The tenant's position (last delivered seq).
        last: u64,
    },
}

/// Where a tenant nobody told the tracker about starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Baseline {
    /// Before its seq 1: every event of the tenant is expected.
    Zero,
    /// Just before the first event seen: "from now on".
    FirstSeen,
}

/// Per-tenant positions plus a bounded window of recent event ids.
#[derive(Debug)]
pub struct Tracker {
    last: HashMap<String, u64>,
    baseline: Baseline,
    recent: RecentIds,
}

impl Tracker {
    /// A tracker remembering `window` recent event ids.
    pub fn new(baseline: Baseline, window: usize) -> Tracker {
        Tracker {
            last: HashMap::new(),
            baseline,
            recent: RecentIds::new(window),
        }
    }

    /// Sets a tenant's position (its last delivered seq).
    pub fn set(&mut self, tenant: &str, last: u64) {
        self.last.insert(tenant.to_string(), last);
    }

    /// A tenant's position, if known.
    pub fn last(&self, tenant: &str) -> Option<u64> {
        self.last.get(tenant).copied()
    }

    /// Judges a message of `tenant` carrying `seq` and `event_id`.
    pub fn check(&self, tenant: &str, seq: u64, event_id: &str) -> Verdict {
        let last = match (self.last.get(tenant), self.baseline) {
            (Some(last), _) => *last,
            (None, Baseline::Zero) => 0,
            (None, Baseline::FirstSeen) => seq.saturating_sub(1),
        };
        if seq <= last {
            Verdict::Duplicate
        } else if seq > last + 1 {
            Verdict::Gap { last }
        } else if self.recent.contains(event_id) {
            Verdict::DuplicateId
        } else {
            Verdict::Next
        }
    }

    /// Records that `seq` of `tenant` was delivered (or deliberately passed).
    pub fn accept(&mut self, tenant: &str, seq: u64, event_id: &str) {
        match self.last.get_mut(tenant) {
            Some(last) => *last = (*last).max(seq),
            None => {
                self.last.insert(tenant.to_string(), seq);
            }
        }
        self.recent.insert(event_id);
    }
}

/// The last `capacity` distinct ids, oldest forgotten first.
#[derive(Debug)]
struct RecentIds {
    capacity: usize,
    order: VecDeque<String>,
    set: HashSet<String>,
}

impl RecentIds {
    fn new(capacity: usize) -> RecentIds {
        RecentIds {
            capacity,
            order: VecDeque::new(),
            set: HashSet::new(),
        }
    }

    fn contains(&self, id: &str) -> bool {
        self.set.contains(id)
    }

    fn insert(&mut self, id: &str) {
        if self.capacity == 0 || !self.set.insert(id.to_string()) {
            return;
        }
        self.order.push_back(id.to_string());
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(tenant: u8, seq: u64) -> String {
        format!("{tenant}-{seq:08}")
    }

    #[test]
    fn verdicts() {
        let mut t = Tracker::new(Baseline::Zero, 4);
        t.set("a", 3);
        assert_eq!(t.check("a", 2, "x"), Verdict::Duplicate);
        assert_eq!(t.check("a", 3, "x"), Verdict::Duplicate);
        assert_eq!(t.check("a", 5, "x"), Verdict::Gap { last: 3 });
        assert_eq!(t.check("a", 4, "x"), Verdict::Next);
        t.accept("a", 4, "x");
        assert_eq!(t.check("a", 5, "x"), Verdict::DuplicateId);
        assert_eq!(t.check("b", 1, "y"), Verdict::Next);
        assert_eq!(t.check("b", 2, "y"), Verdict::Gap { last: 0 });
        let f = Tracker::new(Baseline::FirstSeen, 4);
        assert_eq!(f.check("c", 57, "z"), Verdict::Next);
    }

    #[test]
    fn recent_ids_are_bounded() {
        let mut r = RecentIds::new(2);
        for i in ["a", "b", "a", "c"] {
            r.insert(i);
        }
        assert!(!r.contains("a") && r.contains("b") && r.contains("c"));
        assert_eq!(r.order.len(), 2);
    }

    /// A delivery a consumer might produce: the tenants' true events with
    /// redeliveries (jumps back), losses (skips forward) and restarts.
    fn arbitrary_delivery() -> impl Strategy<Value = (Vec<u64>, Vec<(u8, i8)>)> {
        (
            proptest::collection::vec(1u64..40, 1..4),
            proptest::collection::vec((0u8..4, -5i8..5), 0..300),
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 500, ..ProptestConfig::default() })]
        /// Whatever a consumer delivers (duplicates, reorders, losses), the
        /// tracker plus "repair from the truth on a gap" (what the
        /// subscription does through the catch-up service) delivers each
        /// tenant's events exactly once, in order, with no gap.
        #[test]
        fn delivers_each_event_once_in_order((counts, moves) in arbitrary_delivery(), start in 0u64..5) {
            let mut tracker = Tracker::new(Baseline::Zero, 64);
            let mut cursor: Vec<u64> = vec![1; counts.len()];
            let mut out: Vec<Vec<u64>> = vec![Vec::new(); counts.len()];
            for (t, &n) in counts.iter().enumerate() {
                let s = start.min(n);
                tracker.set(&t.to_string(), s);
                out[t].extend(1..=s); // what the application had before subscribing
            }
            // The consumer's (faulty) delivery, then a final full redelivery.
            let mut messages = Vec::new();
            for (t, step) in moves {
                let t = t as usize % counts.len();
                cursor[t] = (cursor[t] as i64 + step as i64).clamp(1, counts[t] as i64) as u64;
                messages.push((t, cursor[t]));
            }
            for (t, &n) in counts.iter().enumerate() {
                messages.extend((1..=n).map(|s| (t, s)));
            }
            for (t, seq) in messages {
                let tenant = t.to_string();
                loop {
                    match tracker.check(&tenant, seq, &id(t as u8, seq)) {
                        Verdict::Next => {
                            out[t].push(seq);
                            tracker.accept(&tenant, seq, &id(t as u8, seq));
                            break;
                        }
                        Verdict::Duplicate => break,
                        Verdict::DuplicateId => prop_assert!(false, "ids are unique here"),
                        Verdict::Gap { last } => {
                            // Repair: the catch-up service delivers last+1 .. seq-1.
                            for s in last + 1..seq {
                                prop_assert_eq!(tracker.check(&tenant, s, &id(t as u8, s)), Verdict::Next);
                                out[t].push(s);
                                tracker.accept(&tenant, s, &id(t as u8, s));
                            }
                        }
                    }
                }
            }
            for (t, &n) in counts.iter().enumerate() {
                prop_assert_eq!(&out[t], &(1..=n).collect::<Vec<_>>(), "tenant {}", t);
            }
        }

        /// The same change under two seqs (an upstream duplicate) is passed,
        /// not delivered twice, and does not stall the tenant.
        #[test]
        fn duplicate_ids_are_passed(n in 2u64..30, dup in 1u64..29) {
            let dup = dup.min(n - 1);
            let mut tracker = Tracker::new(Baseline::Zero, 8);
            let mut delivered = Vec::new();
            for seq in 1..=n {
                // seq dup+1 carries the id of seq dup.
                let event_id = if seq == dup + 1 { id(0, dup) } else { id(0, seq) };
                match tracker.check("t", seq, &event_id) {
                    Verdict::Next => delivered.push(seq),
                    Verdict::DuplicateId => {}
                    other => prop_assert!(false, "seq {} got {:?}", seq, other),
                }
                tracker.accept("t", seq, &event_id);
            }
            let want: Vec<u64> = (1..=n).filter(|s| *s != dup + 1).collect();
            prop_assert_eq!(delivered, want);
        }
    }
}
