//! Stream-level assertions shared by the guarantee tests (SPEC §3, §4).

use std::collections::{HashMap, HashSet};

use super::daemon::StreamEvent;
use super::workload::{ROLLED_BACK, Tables};

/// Asserts SPEC §4.1–4.3 on a whole stream: per-tenant seq exactly 1..N in
/// stream order, headers match the body, event ids unique, events of a
/// transaction contiguous and in tx_index order, transactions in commit order.
/// Returns each tenant's N.
pub fn assert_stream_exact(events: &[StreamEvent]) -> HashMap<String, u64> {
    let mut last_seq: HashMap<String, u64> = HashMap::new();
    let mut ids = HashSet::new();
    let mut finished_txs = HashSet::new();
    let mut current: Option<(u64, u32)> = None; // (commit_lsn, last tx_index)
    for (i, m) in events.iter().enumerate() {
        let e = &m.event;
        assert_eq!(
            m.stream_seq,
            i as u64 + 1,
            "stream sequence gap before {}",
            e.event_id
        );
        assert!(
            ids.insert(e.event_id.clone()),
            "duplicate event {}",
            e.event_id
        );
        assert_eq!(m.headers.get("Nats-Msg-Id"), Some(&e.event_id));
        assert_eq!(
            m.headers.get("Walcast-Lsn"),
            Some(&e.commit_lsn.to_string())
        );
        assert_eq!(
            m.headers.get("Content-Type").map(String::as_str),
            Some("application/x-protobuf")
        );
        // Tenant-less events have two-token subjects (`walcast._deadletter`,
        // `walcast._truncated`); a tenant id may itself start with `_`.
        let tokens: Vec<&str> = m.subject.split('.').collect();
        if tokens.len() == 2 {
            assert!(
                matches!(tokens[1], "_deadletter" | "_truncated"),
                "{}",
                m.subject
            );
            assert_eq!(e.seq, 0, "tenant-less events carry no seq: {}", m.subject);
        } else {
            assert_eq!(tokens.len(), 4, "subject {}", m.subject);
            assert_eq!(tokens[1], e.tenant_id);
            assert_eq!(m.headers.get("Walcast-Tenant"), Some(&e.tenant_id));
            assert_eq!(m.headers.get("Walcast-Seq"), Some(&e.seq.to_string()));
            let seq = last_seq.entry(e.tenant_id.clone()).or_insert(0);
            assert_eq!(
                e.seq,
                *seq + 1,
                "tenant {} seq jumps from {} to {} at {}",
                e.tenant_id,
                seq,
                e.seq,
                e.event_id
            );
            *seq = e.seq;
        }
        match current {
            Some((lsn, index)) if lsn == e.commit_lsn => {
                assert_eq!(
                    e.tx_index,
                    index + 1,
                    "tx_index out of order in transaction {lsn:x}"
                );
            }
            previous => {
                if let Some((lsn, _)) = previous {
                    assert!(
                        e.commit_lsn > lsn,
                        "commit order broken: {:x} after {lsn:x}",
                        e.commit_lsn
                    );
                    finished_txs.insert(lsn);
                }
                assert!(
                    !finished_txs.contains(&e.commit_lsn),
                    "transaction {:x} is not contiguous",
                    e.commit_lsn
                );
                assert_eq!(
                    e.tx_index, 0,
                    "transaction {:x} does not start at tx_index 0",
                    e.commit_lsn
                );
            }
        }
        current = Some((e.commit_lsn, e.tx_index));
    }
    last_seq
}

/// Asserts that applying the stream's events to empty tables rebuilds
/// exactly the rows Postgres has, and that nothing rolled back was
/// published. Returns the real tables.
pub async fn assert_replays_to_tables(
    events: &[StreamEvent],
    client: &tokio_postgres::Client,
) -> Tables {
    let mut replica = Tables::default();
    for m in events {
        assert!(
            !format!("{:?}", m.event).contains(ROLLED_BACK),
            "rolled-back change published: {}",
            m.event.event_id
        );
        replica.apply(&m.event);
    }
    let real = Tables::load(client).await;
    assert_eq!(
        replica.tasks.len(),
        real.tasks.len(),
        "tasks rebuilt from the stream"
    );
    for (id, task) in &real.tasks {
        assert_eq!(replica.tasks.get(id), Some(task), "task {id}");
    }
    assert_eq!(
        replica.projects, real.projects,
        "projects rebuilt from the stream"
    );
    assert_eq!(replica.locks, real.locks, "locks rebuilt from the stream");
    real
}
