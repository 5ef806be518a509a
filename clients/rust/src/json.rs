//! The proto3 JSON mapping of a `ChangeEvent`, byte for byte what
//! `walcast tail` prints: the documented form for gateways that forward
//! events to browsers (SPEC §7).
//!
//! The generated serde impls (pbjson) already give camelCase names, 64-bit
//! integers as strings and enum names; only timestamps differ: pbjson writes
//! `…+00:00`, the mapping requires `…Z`. walcast's timestamps are always UTC,
//! so the suffix is rewritten — everywhere except in `extra`, which holds
//! column text exactly as Postgres wrote it.

use serde_json::Value;

use crate::proto::ChangeEvent;

/// The event as a proto3 JSON value.
pub fn to_value(event: &ChangeEvent) -> serde_json::Result<Value> {
    let mut value = serde_json::to_value(event)?;
    normalize_timestamps(&mut value);
    Ok(value)
}

/// The event as a proto3 JSON string (one line).
pub fn to_string(event: &ChangeEvent) -> serde_json::Result<String> {
    to_value(event).map(|v| v.to_string())
}

fn normalize_timestamps(value: &mut Value) {
    match value {
        Value::String(s) if is_utc_timestamp(s) => {
            s.truncate(s.len() - "+00:00".len());
            s.push('Z');
        }
        Value::Array(items) => items.iter_mut().for_each(normalize_timestamps),
        Value::Object(fields) => {
            for (key, field) in fields.iter_mut() {
                if key != "extra" {
                    normalize_timestamps(field);
                }
            }
        }
        _ => {}
    }
}

/// `YYYY-MM-DDTHH:MM:SS[.f]+00:00`, as pbjson writes a UTC timestamp.
fn is_utc_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    s.ends_with("+00:00")
        && b.len() >= 25
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b'T'
        && b[13] == b':'
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{Task, change_event::After};

    #[test]
    fn timestamps_end_in_z_and_extra_is_untouched() {
        let event = ChangeEvent {
            seq: 7,
            commit_time: Some(pbjson_types::Timestamp {
                seconds: 1_700_000_000,
                nanos: 5_000_000,
            }),
            after: Some(After::Task(Box::new(Task {
                due_at: Some(pbjson_types::Timestamp {
                    seconds: 0,
                    nanos: 0,
                }),
                title: "2024-01-01T00:00:00+00:00".into(),
                ..Default::default()
            }))),
            extra: [("note".to_string(), "2024-01-01T00:00:00+00:00".to_string())].into(),
            ..Default::default()
        };
        let v = to_value(&event).unwrap();
        assert_eq!(v["seq"], "7");
        assert_eq!(v["commitTime"], "2023-11-14T22:13:20.005Z");
        assert_eq!(v["task"]["dueAt"], "1970-01-01T00:00:00Z");
        assert_eq!(v["extra"]["note"], "2024-01-01T00:00:00+00:00");
        assert_eq!(to_string(&event).unwrap(), v.to_string());
    }
}
