//! Timestamps and durations as Prefect (pydantic) reads and writes them.
//!
//! Timestamps: RFC 3339 with `Z` or an offset; a timestamp without an offset is taken as UTC;
//! numbers are Unix seconds. Output is RFC 3339 in UTC with a `Z` and only the fractional digits
//! needed. Durations (`within`): a number of seconds, an ISO-8601 duration (`PT30S`, `P1DT2H`),
//! or pydantic's `[D days,] HH:MM:SS[.ffffff]` form. Serialized back as float seconds.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::Value;

/// Parses a timestamp field; the error is a reason phrase.
///
/// Only years 1 to 9999 are accepted: Python's `datetime` holds no others, so Prefect refuses
/// them, and Spur's own RFC 3339 output of such a time (`-2024-…`, `+12345-…`) would not
/// read back, leaving a stored event that cannot be loaded (found by fuzzing).
pub fn parse_timestamp(value: &Value) -> Result<DateTime<Utc>, String> {
    parse_timestamp_any(value).and_then(in_python_range)
}

/// Refuses a time outside Python's `datetime` range (years 1 to 9999).
fn in_python_range(t: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    use chrono::Datelike;
    if (1..=9999).contains(&t.year()) {
        Ok(t)
    } else {
        Err(format!(
            "{} is outside the years 1 to 9999 (Prefect's datetime range)",
            t.to_rfc3339()
        ))
    }
}

fn parse_timestamp_any(value: &Value) -> Result<DateTime<Utc>, String> {
    match value {
        Value::String(s) => parse_timestamp_text(s),
        Value::Number(n) => {
            let secs = n
                .as_f64()
                .ok_or_else(|| "is not a finite number".to_owned())?;
            let micros = (secs * 1_000_000.0).round();
            if !micros.is_finite() || micros.abs() > 1e17 {
                return Err(format!("{secs} is out of range"));
            }
            DateTime::from_timestamp_micros(micros as i64)
                .ok_or_else(|| format!("{secs} is out of range"))
        }
        other => Err(format!(
            "must be an RFC 3339 timestamp, got {}",
            crate::problem::json_type_name(other)
        )),
    }
}

/// Parses an RFC 3339 timestamp string (offset optional, then UTC), years 1 to 9999.
pub fn parse_timestamp_str(s: &str) -> Result<DateTime<Utc>, String> {
    parse_timestamp_text(s).and_then(in_python_range)
}

fn parse_timestamp_text(s: &str) -> Result<DateTime<Utc>, String> {
    let trimmed = s.trim();
    if let Ok(dt) = DateTime::parse_from_rfc3339(trimmed) {
        return Ok(dt.with_timezone(&Utc));
    }
    // pydantic also accepts a space instead of `T`, and no offset at all (taken as UTC here).
    let normalized = trimmed.replacen(' ', "T", 1);
    if let Ok(dt) = DateTime::parse_from_rfc3339(&normalized) {
        return Ok(dt.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%dT%H:%M"] {
        if let Ok(naive) = NaiveDateTime::parse_from_str(&normalized, format) {
            return Ok(naive.and_utc());
        }
    }
    Err(format!(
        "{s:?} is not an RFC 3339 timestamp (e.g. 2024-01-01T00:00:00Z)"
    ))
}

/// Formats a timestamp the way Spur prints it everywhere: RFC 3339, UTC, `Z`, and only the
/// fractional digits needed (none, 3, 6 or 9).
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    FormattedTimestamp::new(t).as_str().to_owned()
}

/// A timestamp formatted like [`format_timestamp`], on the stack.
///
/// Every stored event carries two timestamps, and chrono's general-purpose formatter (a
/// `String`, a format-item interpreter) cost ~750 instructions each, a fifth of encoding an
/// event. Years 0–9999 (all real ones) are written directly; anything else, and leap
/// seconds, go through chrono, so the output is always chrono's.
#[derive(Clone, Copy)]
pub struct FormattedTimestamp {
    bytes: [u8; 40],
    len: usize,
}

impl FormattedTimestamp {
    /// Formats `t`.
    pub fn new(t: DateTime<Utc>) -> FormattedTimestamp {
        let mut out = FormattedTimestamp {
            bytes: [0; 40],
            len: 0,
        };
        let nanos = t.timestamp_subsec_nanos();
        let secs = t.timestamp();
        let (days, second_of_day) = (secs.div_euclid(86_400), secs.rem_euclid(86_400) as u32);
        // 0000-01-01 and 9999-12-31, in days since 1970-01-01.
        if !(-719_528..=2_932_896).contains(&days) || nanos >= 1_000_000_000 {
            let text = t.to_rfc3339_opts(SecondsFormat::AutoSi, true);
            let len = text.len().min(out.bytes.len());
            out.bytes[..len].copy_from_slice(&text.as_bytes()[..len]);
            out.len = len;
            return out;
        }
        let (year, month, day) = civil_from_days(days);
        out.push_digits(year, 4);
        out.push(b'-');
        out.push_digits(month, 2);
        out.push(b'-');
        out.push_digits(day, 2);
        out.push(b'T');
        out.push_digits(second_of_day / 3600, 2);
        out.push(b':');
        out.push_digits(second_of_day / 60 % 60, 2);
        out.push(b':');
        out.push_digits(second_of_day % 60, 2);
        let (fraction, width) = if nanos == 0 {
            (0, 0)
        } else if nanos.is_multiple_of(1_000_000) {
            (nanos / 1_000_000, 3)
        } else if nanos.is_multiple_of(1_000) {
            (nanos / 1_000, 6)
        } else {
            (nanos, 9)
        };
        if width > 0 {
            out.push(b'.');
            out.push_digits(fraction, width);
        }
        out.push(b'Z');
        out
    }

    fn push(&mut self, byte: u8) {
        self.bytes[self.len] = byte;
        self.len += 1;
    }

    /// Appends `value` in decimal, zero-padded to `width` digits.
    fn push_digits(&mut self, value: u32, width: usize) {
        let mut rest = value;
        for i in (0..width).rev() {
            self.bytes[self.len + i] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        self.len += width;
    }

    /// The formatted text.
    pub fn as_str(&self) -> &str {
        // Only ASCII digits and separators, or chrono's own (UTF-8) output, are written.
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

/// The proleptic Gregorian (year, month, day) of a day counted from 1970-01-01, for years
/// 0–9999 (Howard Hinnant's `civil_from_days`, shifted so every intermediate is unsigned).
fn civil_from_days(days: i64) -> (u32, u32, u32) {
    // Count from -0400-03-01: leap days then fall at the end of each 400-year era, and
    // January and February of year 0 are not negative.
    let z = (days + 719_468 + 146_097) as u64;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1_460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2) - 400;
    (year as u32, month as u32, day as u32)
}

impl serde::Serialize for FormattedTimestamp {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl std::fmt::Debug for FormattedTimestamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Parses a duration given as seconds, ISO-8601 or `HH:MM:SS`. The error is a reason phrase.
pub fn parse_duration(value: &Value) -> Result<TimeDelta, String> {
    match value {
        Value::Number(n) => {
            let secs = n
                .as_f64()
                .ok_or_else(|| "should be a valid timedelta".to_owned())?;
            seconds_to_delta(secs)
        }
        Value::String(s) => parse_duration_str(s),
        Value::Null => Err("should be a valid timedelta".to_owned()),
        other => Err(format!(
            "should be a valid timedelta (seconds or an ISO-8601 duration), got {}",
            crate::problem::json_type_name(other)
        )),
    }
}

/// Seconds as a float to a `TimeDelta` with microsecond precision.
pub fn seconds_to_delta(secs: f64) -> Result<TimeDelta, String> {
    if !secs.is_finite() || secs.abs() > 1e12 {
        return Err(format!("{secs} seconds is out of range"));
    }
    Ok(TimeDelta::microseconds((secs * 1_000_000.0).round() as i64))
}

/// A `TimeDelta` as float seconds (Prefect's `ser_json_timedelta="float"`).
pub fn delta_seconds(d: TimeDelta) -> f64 {
    d.num_microseconds()
        .map_or(d.num_seconds() as f64, |us| us as f64 / 1_000_000.0)
}

fn parse_duration_str(s: &str) -> Result<TimeDelta, String> {
    let t = s.trim();
    if let Ok(secs) = t.parse::<f64>() {
        return seconds_to_delta(secs);
    }
    if let Some(d) = parse_iso8601_duration(t) {
        return Ok(d);
    }
    if let Some(d) = parse_clock_duration(t) {
        return Ok(d);
    }
    Err(format!(
        "{s:?} is not a duration: use seconds (30) or ISO-8601 (PT30S)"
    ))
}

/// `[-]P[nW][nD][T[nH][nM][n[.f]S]]` (years and months are refused: they have no fixed length).
fn parse_iso8601_duration(s: &str) -> Option<TimeDelta> {
    let (negative, rest) = match s.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, s.strip_prefix('+').unwrap_or(s)),
    };
    let rest = rest.strip_prefix('P').or_else(|| rest.strip_prefix('p'))?;
    if rest.is_empty() {
        return None;
    }
    let mut total = 0f64;
    let mut in_time = false;
    let mut number = String::new();
    let mut saw_component = false;
    for c in rest.chars() {
        match c.to_ascii_uppercase() {
            'T' if !in_time && number.is_empty() => in_time = true,
            d if d.is_ascii_digit() || d == '.' || d == ',' => {
                number.push(if d == ',' { '.' } else { d })
            }
            unit => {
                let n: f64 = number.parse().ok()?;
                number.clear();
                let factor = match (in_time, unit) {
                    (false, 'W') => 604_800.0,
                    (false, 'D') => 86_400.0,
                    (true, 'H') => 3_600.0,
                    (true, 'M') => 60.0,
                    (true, 'S') => 1.0,
                    _ => return None,
                };
                total += n * factor;
                saw_component = true;
            }
        }
    }
    if !number.is_empty() || !saw_component {
        return None;
    }
    seconds_to_delta(if negative { -total } else { total }).ok()
}

/// pydantic's `[-][D day[s], ]HH:MM:SS[.ffffff]` / `[D]D HH:MM:SS`.
fn parse_clock_duration(s: &str) -> Option<TimeDelta> {
    let (days, clock) = match s.rsplit_once(' ') {
        Some((d, c)) => {
            let d = d
                .trim_end_matches(',')
                .trim_end_matches("days")
                .trim_end_matches("day")
                .trim();
            (d.parse::<f64>().ok()?, c)
        }
        None => (0.0, s),
    };
    let parts: Vec<&str> = clock.split(':').collect();
    if parts.len() < 2 || parts.len() > 3 {
        return None;
    }
    let mut secs = 0f64;
    for part in &parts {
        secs = secs * 60.0 + part.parse::<f64>().ok()?;
    }
    if parts.len() == 2 {
        // MM:SS
    }
    seconds_to_delta(days * 86_400.0 + secs).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    /// Regression (fuzzing): `-2024-05-01T02:00` was accepted, stored, and printed as
    /// `-2024-05-01T02:00:00Z`, which does not read back. Prefect refuses years outside
    /// 1..=9999; so does Spur, for strings and numbers alike, and what it accepts reads back.
    #[test]
    fn only_years_python_can_hold_are_accepted_and_they_read_back() {
        for refused in [
            json!("-2024-05-01T02:00"),
            json!("0000-01-01T00:00:00Z"),
            json!("+12345-01-01T00:00:00Z"),
            json!(-62_135_596_801i64),
            json!(253_402_300_800i64),
        ] {
            assert!(parse_timestamp(&refused).is_err(), "{refused}");
        }
        for accepted in [
            json!("0001-01-01T00:00:00Z"),
            json!("9999-12-31T23:59:59.999999Z"),
            json!(-62_135_596_800i64),
        ] {
            let t = parse_timestamp(&accepted).expect("in range");
            assert_eq!(
                parse_timestamp_str(&format_timestamp(t)),
                Ok(t),
                "{accepted}"
            );
        }
    }

    proptest! {
        /// The direct formatter writes exactly what chrono does, for any instant chrono can
        /// hold (out-of-range years take chrono's own path) and every fraction width.
        #[test]
        fn timestamps_format_like_chrono(
            secs in -8_334_601_228_800i64..=8_210_266_876_799i64,
            nanos in prop_oneof![
                Just(0u32),
                (0u32..1000).prop_map(|ms| ms * 1_000_000),
                (0u32..1_000_000).prop_map(|us| us * 1_000),
                0u32..1_000_000_000,
            ],
        ) {
            let t = DateTime::from_timestamp(secs, nanos).expect("in range");
            prop_assert_eq!(
                format_timestamp(t),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
    }

    proptest! {
        /// Every day of years 0–9999, where the direct path is taken.
        #[test]
        fn every_day_of_years_0_to_9999_formats_like_chrono(
            days in -719_528i64..=2_932_896,
            second in 0i64..86_400,
        ) {
            let t = DateTime::from_timestamp(days * 86_400 + second, 0).expect("in range");
            prop_assert_eq!(
                format_timestamp(t),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
    }

    #[test]
    fn timestamps_at_the_edges_format_like_chrono() {
        for text in [
            "0000-01-01T00:00:00Z",
            "9999-12-31T23:59:59.999999999Z",
            "1970-01-01T00:00:00.001Z",
            "2024-02-29T12:34:56.000100Z",
            "0000-02-29T23:59:59Z",
            "0000-03-01T00:00:00Z",
            "1969-12-31T23:59:59.500Z",
            "1900-02-28T00:00:00Z",
            "2000-02-29T00:00:00Z",
        ] {
            let t: DateTime<Utc> = text.parse().expect("valid");
            assert_eq!(format_timestamp(t), text);
        }
        for t in [DateTime::<Utc>::MIN_UTC, DateTime::<Utc>::MAX_UTC] {
            assert_eq!(
                format_timestamp(t),
                t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
            );
        }
        // A leap second (nanoseconds past 1e9) is chrono's to write.
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("leap second")
            .and_utc();
        assert_eq!(
            format_timestamp(leap),
            leap.to_rfc3339_opts(SecondsFormat::AutoSi, true)
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration(&json!(30)), Ok(TimeDelta::seconds(30)));
        assert_eq!(
            parse_duration(&json!(1.5)),
            Ok(TimeDelta::milliseconds(1500))
        );
        assert_eq!(parse_duration(&json!("PT30S")), Ok(TimeDelta::seconds(30)));
        assert_eq!(
            parse_duration(&json!("P1DT2H")),
            Ok(TimeDelta::seconds(93_600))
        );
        assert_eq!(parse_duration(&json!("PT1.5M")), Ok(TimeDelta::seconds(90)));
        assert_eq!(
            parse_duration(&json!("00:01:00")),
            Ok(TimeDelta::seconds(60))
        );
        assert_eq!(parse_duration(&json!("-PT5S")), Ok(TimeDelta::seconds(-5)));
        assert!(parse_duration(&json!(null)).is_err());
        assert!(parse_duration(&json!("soon")).is_err());
        assert!(parse_duration(&json!("P1Y")).is_err());
        assert!(parse_duration(&json!("P")).is_err());
    }

    #[test]
    fn timestamps() {
        let want: DateTime<Utc> = "2024-03-01T09:00:00Z".parse().expect("valid");
        for s in [
            "2024-03-01T09:00:00Z",
            "2024-03-01T09:00:00+00:00",
            "2024-03-01T10:00:00+01:00",
            "2024-03-01 09:00:00",
            "2024-03-01T09:00:00.000",
        ] {
            assert_eq!(parse_timestamp(&json!(s)), Ok(want), "{s}");
        }
        assert_eq!(format_timestamp(want), "2024-03-01T09:00:00Z");
        assert!(parse_timestamp(&json!("nope")).is_err());
    }
}
