//! Postgres timestamp text → protobuf Timestamp, on arbitrary strings (a
//! column whose type was changed to text can hold anything). Properties:
//! never panics (overflow included); a result is inside the protobuf range
//! with valid nanos; an *exact* result re-renders to text that parses back
//! to the same instant.
#![no_main]

use libfuzzer_sys::fuzz_target;
use walcast::events::timestamp::{MAX, MIN, parse};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Some(parsed) = parse(text) else { return };
    let t = parsed.timestamp;
    assert!(
        (MIN.seconds, MIN.nanos) <= (t.seconds, t.nanos)
            && (t.seconds, t.nanos) <= (MAX.seconds, MAX.nanos),
        "{text:?} parsed out of range: {t:?}"
    );
    assert!(
        (0..1_000_000_000).contains(&t.nanos),
        "{text:?}: nanos {}",
        t.nanos
    );
    if parsed.exact {
        let again = render(t.seconds, t.nanos);
        let back = parse(&again).unwrap_or_else(|| panic!("{text:?} -> {again:?} does not parse"));
        assert_eq!(back.timestamp, t, "{text:?} -> {again:?}");
        assert!(back.exact);
    }
});

/// ISO text of a Unix instant (UTC), as Postgres would print it.
fn render(seconds: i64, nanos: i32) -> String {
    let days = seconds.div_euclid(86_400);
    let secs = seconds.rem_euclid(86_400);
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{nanos:09}+00",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}
