//! Timestamps and durations as Prefect (pydantic) reads and writes them.
//!
//! Timestamps: RFC 3339 with `Z` or an offset; a timestamp without an offset is taken as UTC;
//! numbers are Unix seconds. Output is RFC 3339 in UTC with a `Z` and only the fractional digits
//! needed. Durations (`within`): a number of seconds, an ISO-8601 duration (`PT30S`, `P1DT2H`),
//! or pydantic's `[D days,] HH:MM:SS[.ffffff]` form. Serialized back as float seconds.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, TimeDelta, Utc};
use serde_json::Value;

/// Parses a timestamp field; the error is a reason phrase.
pub fn parse_timestamp(value: &Value) -> Result<DateTime<Utc>, String> {
    match value {
        Value::String(s) => parse_timestamp_str(s),
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
            crate::event::json_type_name(other)
        )),
    }
}

/// Parses an RFC 3339 timestamp string (offset optional, then UTC).
pub fn parse_timestamp_str(s: &str) -> Result<DateTime<Utc>, String> {
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

/// Formats a timestamp the way Spur prints it everywhere: RFC 3339, UTC, `Z`.
pub fn format_timestamp(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::AutoSi, true)
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
            crate::event::json_type_name(other)
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
    use serde_json::json;

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
