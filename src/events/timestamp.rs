//! Postgres timestamp text (DateStyle ISO) → `google.protobuf.Timestamp`.
//!
//! The replication session pins `DateStyle=ISO` and `TimeZone=UTC`, so values
//! look like `2024-03-01 12:00:00.123456+00`; other offsets, `BC` years and
//! `timestamp without time zone` (read as UTC) are handled too. `infinity`,
//! `-infinity` and years outside 1..=9999 do not fit a protobuf Timestamp:
//! they are clamped to its range and reported as inexact, so the caller can
//! keep the original text.

use pbjson_types::Timestamp;

/// 0001-01-01T00:00:00Z, the smallest protobuf Timestamp.
pub const MIN: Timestamp = Timestamp {
    seconds: -62_135_596_800,
    nanos: 0,
};
/// 9999-12-31T23:59:59.999999999Z, the largest protobuf Timestamp.
pub const MAX: Timestamp = Timestamp {
    seconds: 253_402_300_799,
    nanos: 999_999_999,
};

/// Seconds between 1970-01-01 and Postgres' epoch 2000-01-01.
const PG_EPOCH_UNIX_SECONDS: i64 = 946_684_800;

/// A parsed timestamp; `exact == false` when it was clamped into range.
#[derive(Debug, Clone, PartialEq)]
pub struct Parsed {
    pub timestamp: Timestamp,
    pub exact: bool,
}

/// Converts pgoutput's commit time (microseconds since 2000-01-01), clamped
/// into the protobuf range (the wire can carry any i64; an out-of-range
/// Timestamp is an invalid event).
pub fn from_pg_micros(micros: i64) -> Timestamp {
    let seconds = micros.div_euclid(1_000_000) + PG_EPOCH_UNIX_SECONDS;
    let nanos = (micros.rem_euclid(1_000_000) * 1000) as i32;
    if seconds < MIN.seconds {
        MIN
    } else if seconds > MAX.seconds {
        MAX
    } else {
        Timestamp { seconds, nanos }
    }
}

/// Parses Postgres' ISO text output; `None` if it is not a timestamp at all.
pub fn parse(text: &str) -> Option<Parsed> {
    utc_fast(text).or_else(|| parse_general(text))
}

/// The shape the replication session gives every in-range `timestamptz`
/// (DateStyle ISO, TimeZone UTC): `YYYY-MM-DD HH:MM:SS[.fraction]+00`,
/// read at fixed offsets; `None` for anything else, which the general
/// parser then reads (or refuses). Why: splitting and searching the text
/// was a tenth of a drain's CPU (three timestamps per task row).
fn utc_fast(text: &str) -> Option<Parsed> {
    let b = text.as_bytes();
    let body = b.strip_suffix(b"+00")?;
    if body.len() < 19 || body[4] != b'-' || body[7] != b'-' || body[10] != b' ' {
        return None;
    }
    if body[13] != b':' || body[16] != b':' {
        return None;
    }
    let year = i64::from(digits(&body[0..4])?);
    let (month, day) = (digits(&body[5..7])?, digits(&body[8..10])?);
    let hour = i64::from(digits(&body[11..13])?);
    let minute = i64::from(digits(&body[14..16])?);
    let second = i64::from(digits(&body[17..19])?);
    let nanos = match &body[19..] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            digits(fraction)? * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    let date_ok = year >= 1
        && (1..=12).contains(&month)
        && (1..=days_in_month(year, month, false)).contains(&day);
    if !date_ok || hour > 23 || minute > 59 || second > 59 {
        return None; // 24:00:00 and impossible dates: the general parser decides
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3600 + minute * 60 + second;
    Some(Parsed {
        timestamp: Timestamp {
            seconds,
            nanos: nanos as i32,
        },
        exact: true, // years 1..=9999: always within the protobuf range
    })
}

/// ASCII digits as a number (at most 9 of them); `None` if any is not one.
fn digits(b: &[u8]) -> Option<u32> {
    b.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

/// Every form `parse` accepts, the slower way.
fn parse_general(text: &str) -> Option<Parsed> {
    let clamped = |max: bool| Parsed {
        timestamp: if max { MAX } else { MIN },
        exact: false,
    };
    match text {
        "infinity" => return Some(clamped(true)),
        "-infinity" => return Some(clamped(false)),
        _ => {}
    }
    let (text, bc) = match text.strip_suffix(" BC") {
        Some(rest) => (rest, true),
        None => (text, false),
    };
    let (date, time) = text.split_once(' ').unwrap_or((text, "00:00:00"));
    let (year, month, day) = parse_date(date, bc)?;
    let (second_of_day, nanos, offset_seconds) = parse_time(time)?;
    // Years beyond any timestamp (Postgres stops at 294276) are clamped before
    // the arithmetic, so it cannot overflow.
    const YEAR_LIMIT: i64 = 1_000_000;
    if year.abs() > YEAR_LIMIT {
        return Some(clamped(year > 0));
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + second_of_day - offset_seconds;
    Some(if !(MIN.seconds..=MAX.seconds).contains(&seconds) {
        clamped(seconds > MAX.seconds)
    } else {
        Parsed {
            timestamp: Timestamp {
                seconds,
                nanos: nanos as i32,
            },
            exact: true,
        }
    })
}

/// `YYYY-MM-DD` as (astronomical year, month, day): 1 BC is year 0.
fn parse_date(date: &str, bc: bool) -> Option<(i64, u32, u32)> {
    let mut parts = date.splitn(3, '-');
    let year: i64 = parts.next()?.parse().ok()?;
    let month: u32 = parts.next()?.parse().ok()?;
    let day: u32 = parts.next()?.parse().ok()?;
    if !(1..=12).contains(&month) || day < 1 || day > days_in_month(year, month, bc) {
        return None;
    }
    Some((if bc { 1 - year } else { year }, month, day))
}

/// `HH:MM:SS[.fraction][offset]` as (second of the day, nanoseconds, offset
/// in seconds).
fn parse_time(time: &str) -> Option<(i64, i64, i64)> {
    let offset_at = time.find(['+', '-']).unwrap_or(time.len());
    let (clock, offset) = time.split_at(offset_at);
    let (hms, fraction) = clock.split_once('.').unwrap_or((clock, ""));
    let mut hms = hms.splitn(3, ':');
    let hour: i64 = hms.next()?.parse().ok()?;
    let minute: i64 = hms.next()?.parse().ok()?;
    let second: i64 = hms.next()?.parse().ok()?;
    if fraction.len() > 9 || !fraction.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos: i64 = if fraction.is_empty() {
        0
    } else {
        fraction.parse::<i64>().ok()? * 10i64.pow(9 - fraction.len() as u32)
    };
    // Postgres accepts 24:00:00 (the end of the day) and nothing beyond.
    let in_day = (0..24).contains(&hour) && (0..60).contains(&minute) && (0..60).contains(&second);
    let end_of_day = hour == 24 && minute == 0 && second == 0 && nanos == 0;
    if !in_day && !end_of_day {
        return None;
    }
    Some((
        hour * 3600 + minute * 60 + second,
        nanos,
        parse_offset(offset)?,
    ))
}

/// Days in `month` of `year` as written (before the BC conversion), in the
/// proleptic Gregorian calendar Postgres uses.
fn days_in_month(year: i64, month: u32, bc: bool) -> u32 {
    // 1 BC, 5 BC, ... are the leap years before year 1.
    let astronomical = if bc { 1 - year } else { year };
    let leap = astronomical.rem_euclid(4) == 0
        && (astronomical.rem_euclid(100) != 0 || astronomical.rem_euclid(400) == 0);
    match month {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// `+HH`, `-HH:MM`, `+HH:MM:SS` or empty (no zone: UTC).
fn parse_offset(offset: &str) -> Option<i64> {
    let Some(sign) = offset.chars().next() else {
        return Some(0);
    };
    let sign = if sign == '-' { -1 } else { 1 };
    let mut parts = offset[1..].splitn(3, ':');
    let hours: i64 = parts.next()?.parse().ok()?;
    let minutes: i64 = parts.next().map_or(Some(0), |m| m.parse().ok())?;
    let seconds: i64 = parts.next().map_or(Some(0), |s| s.parse().ok())?;
    // Postgres' zone offsets lie within ±15:59:59.
    if !(0..=15).contains(&hours) || !(0..60).contains(&minutes) || !(0..60).contains(&seconds) {
        return None;
    }
    Some(sign * (hours * 3600 + minutes * 60 + seconds))
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(text: &str) -> (i64, i32, bool) {
        let p = parse(text).unwrap_or_else(|| panic!("{text} should parse"));
        (p.timestamp.seconds, p.timestamp.nanos, p.exact)
    }

    #[test]
    fn iso_forms() {
        assert_eq!(ts("1970-01-01 00:00:00+00"), (0, 0, true));
        assert_eq!(
            ts("2024-03-01 12:00:00.5+00"),
            (1_709_294_400, 500_000_000, true)
        );
        assert_eq!(
            ts("2024-03-01 12:00:00.123456+00"),
            (1_709_294_400, 123_456_000, true)
        );
        assert_eq!(ts("2024-03-01 17:30:00+05:30"), (1_709_294_400, 0, true));
        assert_eq!(ts("2024-03-01 07:00:00-05"), (1_709_294_400, 0, true));
        assert_eq!(ts("2024-03-01 12:00:00"), (1_709_294_400, 0, true));
        assert_eq!(ts("1969-12-31 23:59:59.999999+00"), (-1, 999_999_000, true));
        assert_eq!(ts("0001-01-01 00:00:00+00"), (MIN.seconds, 0, true));
    }

    #[test]
    fn out_of_range_is_clamped_and_flagged() {
        assert_eq!(ts("infinity"), (MAX.seconds, MAX.nanos, false));
        assert_eq!(ts("-infinity"), (MIN.seconds, 0, false));
        assert_eq!(
            ts("10000-01-01 00:00:00+00"),
            (MAX.seconds, MAX.nanos, false)
        );
        assert_eq!(ts("0044-03-15 00:00:00+00 BC"), (MIN.seconds, 0, false));
    }

    #[test]
    fn garbage_is_none() {
        for bad in [
            "",
            "yesterday",
            "2024-13-01 00:00:00+00",
            "2024-01-01 aa:00:00+00",
            "2024-01-01 00:00:00.x+00",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    /// Regression (issue 6): a timestamp *field* is found by column name, so a
    /// column retyped to text can hold any string. Huge years, hours or
    /// offsets overflowed i64 (a panic in debug builds; in release a wrapped,
    /// "exact" and wrong instant: the text below became 1966-02-22, and the
    /// original was not kept in `extra`).
    #[test]
    fn absurd_components_never_overflow() {
        assert_eq!(
            ts("584554051220-01-01 00:00:00+00"),
            (MAX.seconds, MAX.nanos, false)
        );
        assert_eq!(
            ts("9223372036854775807-12-31 23:59:59+00"),
            (MAX.seconds, MAX.nanos, false)
        );
        assert_eq!(
            ts("9223372036854775807-01-01 00:00:00+00 BC"),
            (MIN.seconds, 0, false)
        );
        for bad in [
            "2024-01-01 3000000000000000:00:00+00",
            "2024-01-01 00:00:00+3000000000000000",
            "2024-01-01 00:00:00-00:9223372036854775807",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    /// Regression (issue 6): out-of-range fields were accepted and silently
    /// normalized (Feb 30 became Mar 1, 25:00 the next day), so text that is
    /// not a timestamp was typed as one instead of being kept in `extra`.
    #[test]
    fn impossible_dates_and_times_are_not_timestamps() {
        for bad in [
            "2023-02-29 00:00:00+00",
            "2024-02-30 00:00:00+00",
            "2024-04-31 00:00:00+00",
            "1900-02-29 00:00:00+00",
            "2024-01-01 25:00:00+00",
            "2024-01-01 24:00:01+00",
            "2024-01-01 12:60:00+00",
            "2024-01-01 12:00:60+00",
            "2024-01-01 12:00:00+16",
            "2024-01-01 12:00:00+05:60",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
        assert_eq!(ts("2024-02-29 00:00:00+00"), (1_709_164_800, 0, true));
        assert_eq!(
            ts("2000-02-29 23:59:59.5-15:59:59"),
            (951_926_398, 500_000_000, true)
        );
        assert_eq!(ts("2023-12-31 24:00:00+00"), (1_704_067_200, 0, true));
    }

    proptest::proptest! {
        /// The fast path agrees with the general parser on every input it
        /// takes, and takes every in-range UTC timestamp of the session.
        #[test]
        fn the_fast_path_agrees_with_the_general_parser(
            year in 0i64..=10_500,
            month in 0u32..=13,
            day in 0u32..=32,
            hour in 0u32..=25,
            minute in 0u32..=61,
            second in 0u32..=61,
            fraction in proptest::option::of("[0-9]{1,10}"),
            noise in proptest::option::of((0usize..30, proptest::char::any())),
        ) {
            let fraction = fraction.map(|f| format!(".{f}")).unwrap_or_default();
            let mut text = format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02}:{second:02}{fraction}+00");
            if let Some((at, c)) = noise {
                let at = (0..=at.min(text.len())).rev().find(|&i| text.is_char_boundary(i)).unwrap_or(0);
                text.insert(at, c);
            }
            let general = parse_general(&text);
            if let Some(fast) = utc_fast(&text) {
                proptest::prop_assert_eq!(Some(fast), general.clone(), "{}", text);
            }
            let plain = noise.is_none() && fraction.len() <= 10 && (1..=9999).contains(&year) && hour < 24;
            if plain && general.is_some() {
                proptest::prop_assert!(utc_fast(&text).is_some(), "not taken: {}", text);
            }
            proptest::prop_assert_eq!(parse(&text), general, "{}", text);
        }
    }

    #[test]
    fn commit_time_epoch() {
        assert_eq!(
            from_pg_micros(0),
            Timestamp {
                seconds: 946_684_800,
                nanos: 0
            }
        );
        assert_eq!(
            from_pg_micros(-1),
            Timestamp {
                seconds: 946_684_799,
                nanos: 999_999_000
            }
        );
    }
}
