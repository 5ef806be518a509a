//! Republishing after broker data loss (SPEC §4.7): the events a run sends
//! again at stream positions this process had already seen acknowledged.
//! They are ordinary publishes (same ids, seqs and headers); this only
//! counts them and logs one WARN naming the range.

use std::collections::BTreeMap;

use crate::events::{OutEvent, Route};
use crate::lsn::Lsn;
use crate::position::{StreamSeq, TenantSeq};
use crate::telemetry::metrics as m;

/// Summary of republished events.
#[derive(Debug, Default)]
pub struct Republish {
    /// Stream sequences up to this one were acknowledged before.
    below: StreamSeq,
    count: u64,
    streams: Option<(StreamSeq, StreamSeq)>,
    lsns: Option<(Lsn, Lsn)>,
    tenants: BTreeMap<String, (TenantSeq, TenantSeq)>,
    reported: bool,
}

/// Tenants named in the log line at most; the rest are counted.
const TENANTS_LOGGED: usize = 20;

impl Republish {
    pub fn below(acked_high: StreamSeq) -> Self {
        Republish {
            below: acked_high,
            ..Default::default()
        }
    }

    /// An event is being sent at `stream_seq`.
    pub fn sent(&mut self, stream_seq: StreamSeq, event: &OutEvent) {
        if stream_seq > self.below {
            self.finish();
            return;
        }
        self.count += 1;
        fn widen<T: Ord + Copy>(range: &mut Option<(T, T)>, v: T) {
            *range = Some(range.map_or((v, v), |(a, b)| (a.min(v), b.max(v))));
        }
        widen(&mut self.streams, stream_seq);
        widen(&mut self.lsns, event.commit_lsn);
        if let Route::Tenant { tenant, seq } = &event.route {
            let entry = self
                .tenants
                .entry(tenant.to_string())
                .or_insert((*seq, *seq));
            entry.1 = *seq;
        }
    }

    /// Logs the summary once, when republishing is over.
    pub fn finish(&mut self) {
        if self.reported || self.count == 0 {
            return;
        }
        self.reported = true;
        metrics::counter!(m::REPUBLISHED_EVENTS).increment(self.count);
        let (first, last) = self.streams.unwrap_or_default();
        let (lsn_from, lsn_to) = self.lsns.unwrap_or_default();
        let mut tenants: Vec<String> = self
            .tenants
            .iter()
            .take(TENANTS_LOGGED)
            .map(|(t, (a, b))| format!("{t} {a}..={b}"))
            .collect();
        if self.tenants.len() > TENANTS_LOGGED {
            tenants.push(format!(
                "and {} more tenants",
                self.tenants.len() - TENANTS_LOGGED
            ));
        }
        tracing::warn!(
            events = self.count,
            stream_seqs = %format!("{first}..={last}"),
            lsns = %format!("{lsn_from}..={lsn_to}"),
            tenants = %tenants.join(", "),
            "republished events the broker had lost"
        );
    }
}
