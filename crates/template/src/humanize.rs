//! Humanize filters, equivalent to `jinja2-humanize-extension` (Python `humanize` 4.17), which
//! Prefect's template environment loads. Registered as `humanize_<name>` (Prefect's names) and
//! as plain `<name>`. Expected outputs in the tests were produced by the Python package.

use chrono::{DateTime, NaiveDate, TimeDelta, Utc};
use minijinja::value::Kwargs;
use minijinja::{Environment, Error, ErrorKind, Value};

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

fn number(value: &Value, filter: &str) -> Result<f64, Error> {
    if let Some(s) = value.as_str() {
        return s
            .trim()
            .parse::<f64>()
            .map_err(|_| invalid(format!("{filter}: {s:?} is not a number")));
    }
    f64::try_from(value.clone())
        .map_err(|_| invalid(format!("{filter}: expected a number, got {value}")))
}

fn is_integral(value: &Value) -> bool {
    i64::try_from(value.clone()).is_ok() && value.as_str().is_none()
}

/// `1234567` → `1,234,567`; floats keep their digits (`1,234.5678`).
pub fn intcomma(value: Value) -> Result<String, Error> {
    let text = match value.as_str() {
        Some(s) => s.trim().to_owned(),
        None if is_integral(&value) => i64::try_from(value.clone())
            .map(|i| i.to_string())
            .unwrap_or_default(),
        None => number(&value, "intcomma")?.to_string(),
    };
    let (sign, rest) = text
        .strip_prefix('-')
        .map_or(("", text.as_str()), |r| ("-", r));
    let (int, frac) = rest
        .split_once('.')
        .map_or((rest, None), |(i, f)| (i, Some(f)));
    let mut grouped = String::new();
    for (i, c) in int.chars().enumerate() {
        if i > 0 && (int.len() - i) % 3 == 0 {
            grouped.push(',');
        }
        grouped.push(c);
    }
    Ok(match frac {
        Some(f) => format!("{sign}{grouped}.{f}"),
        None => format!("{sign}{grouped}"),
    })
}

/// `1200000` → `1.2 million`; below a thousand, the number itself.
pub fn intword(value: Value) -> Result<String, Error> {
    let n = number(&value, "intword")?;
    const NAMES: &[(f64, &str)] = &[
        (1e3, "thousand"),
        (1e6, "million"),
        (1e9, "billion"),
        (1e12, "trillion"),
        (1e15, "quadrillion"),
        (1e18, "quintillion"),
        (1e21, "sextillion"),
        (1e24, "septillion"),
        (1e27, "octillion"),
        (1e30, "nonillion"),
        (1e33, "decillion"),
        (1e100, "googol"),
    ];
    if n.abs() < 1000.0 {
        return Ok(if n.fract() == 0.0 {
            format!("{}", n as i64)
        } else {
            n.to_string()
        });
    }
    let (power, name) = NAMES
        .iter()
        .rev()
        .find(|(p, _)| n.abs() >= *p)
        .copied()
        .unwrap_or(NAMES[0]);
    Ok(format!("{:.1} {name}", n / power))
}

/// `1` → `1st`, `12` → `12th`, `22` → `22nd`.
pub fn ordinal(value: Value) -> Result<String, Error> {
    let n = number(&value, "ordinal")? as i64;
    let suffix = match (n % 100, n % 10) {
        (11..=13, _) => "th",
        (_, 1) => "st",
        (_, 2) => "nd",
        (_, 3) => "rd",
        _ => "th",
    };
    Ok(format!("{n}{suffix}"))
}

/// `0`–`9` spelled out (`five`), other numbers unchanged.
pub fn apnumber(value: Value) -> Result<String, Error> {
    let n = number(&value, "apnumber")?;
    const WORDS: [&str; 10] = [
        "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
    ];
    Ok(if n.fract() == 0.0 && (0.0..10.0).contains(&n) {
        WORDS[n as usize].to_owned()
    } else if n.fract() == 0.0 {
        format!("{}", n as i64)
    } else {
        n.to_string()
    })
}

/// `1500` → `1.5 kB`; `binary=true` → `KiB` powers of 1024.
pub fn naturalsize(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let bytes = number(&value, "naturalsize")?;
    let binary: bool = kwargs.get::<Option<bool>>("binary")?.unwrap_or(false);
    kwargs.assert_all_used()?;
    let (base, units) = if binary {
        (
            1024f64,
            ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"],
        )
    } else {
        (1000f64, ["kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"])
    };
    if bytes.abs() == 1.0 {
        return Ok(format!("{} Byte", bytes as i64));
    }
    if bytes.abs() < base {
        return Ok(format!("{} Bytes", bytes as i64));
    }
    let mut unit = units[0];
    let mut scaled = bytes / base;
    for next in &units[1..] {
        if scaled.abs() < base {
            break;
        }
        scaled /= base;
        unit = next;
    }
    Ok(format!("{scaled:.1} {unit}"))
}

fn to_delta(value: &Value, filter: &str) -> Result<TimeDelta, Error> {
    if let Some(s) = value.as_str()
        && let Ok(t) = spur_core::time::parse_timestamp_str(s)
    {
        return Ok(Utc::now() - t);
    }
    let secs = number(value, filter)?;
    spur_core::time::seconds_to_delta(secs).map_err(invalid)
}

/// Python's `round` (half to even).
fn round_even(x: f64) -> i64 {
    x.round_ties_even() as i64
}

/// `90` (seconds) → `2 minutes`; `34560000` → `1 year, 1 month`.
fn delta_words(delta: TimeDelta) -> String {
    let total = delta.abs().num_milliseconds() as f64 / 1000.0;
    let days_total = (total / 86_400.0).floor();
    let years = (days_total / 365.0).floor() as i64;
    if years == 0 && days_total < 1.0 {
        if total < 1.0 {
            return "a moment".into();
        }
        if total < 2.0 {
            return "a second".into();
        }
        if total < 60.0 {
            return format!("{} seconds", total.floor() as i64);
        }
        let minutes = round_even(total / 60.0);
        if minutes == 1 {
            return "a minute".into();
        }
        if minutes < 60 {
            return format!("{minutes} minutes");
        }
        let hours = round_even(total / 3600.0);
        if hours == 1 {
            return "an hour".into();
        }
        if hours < 24 {
            return format!("{hours} hours");
        }
        return "a day".into();
    }
    let days = days_total as i64 % 365;
    let months = (days as f64 / 30.5).floor() as i64;
    match years {
        0 => match (days, months) {
            (1, _) => "a day".into(),
            (d, 0) => format!("{d} days"),
            (_, 1) => "a month".into(),
            (_, m) => format!("{m} months"),
        },
        1 => match (days, months) {
            (0, _) => "a year".into(),
            (d, 0) => format!("1 year, {d} days"),
            (_, 1) => "1 year, 1 month".into(),
            (_, m) => format!("1 year, {m} months"),
        },
        y => format!("{y} years"),
    }
}

/// A duration in words: seconds, or a timestamp (its distance from now).
pub fn naturaldelta(value: Value) -> Result<String, Error> {
    Ok(delta_words(to_delta(&value, "naturaldelta")?))
}

/// `3 hours ago`, `a minute from now`, `now`: a timestamp, or seconds in the past.
pub fn naturaltime(value: Value) -> Result<String, Error> {
    let delta = to_delta(&value, "naturaltime")?;
    let words = delta_words(delta);
    Ok(if words == "a moment" {
        "now".into()
    } else if delta < TimeDelta::zero() {
        format!("{words} from now")
    } else {
        format!("{words} ago")
    })
}

fn to_date(value: &Value, filter: &str) -> Result<NaiveDate, Error> {
    let s = value
        .as_str()
        .ok_or_else(|| invalid(format!("{filter}: expected a date or timestamp")))?;
    if let Ok(d) = NaiveDate::parse_from_str(s.trim(), "%Y-%m-%d") {
        return Ok(d);
    }
    spur_core::time::parse_timestamp_str(s)
        .map(|t: DateTime<Utc>| t.date_naive())
        .map_err(|e| invalid(format!("{filter}: {e}")))
}

/// `today`, `yesterday`, `tomorrow`, else `Mar 05`.
pub fn naturalday(value: Value) -> Result<String, Error> {
    let date = to_date(&value, "naturalday")?;
    let today = Utc::now().date_naive();
    Ok(match (date - today).num_days() {
        0 => "today".into(),
        -1 => "yesterday".into(),
        1 => "tomorrow".into(),
        _ => date.format("%b %d").to_string(),
    })
}

/// Like `naturalday`, with the year when the date is about five months away or more.
pub fn naturaldate(value: Value) -> Result<String, Error> {
    let date = to_date(&value, "naturaldate")?;
    let today = Utc::now().date_naive();
    if (date - today).num_days().abs() >= 5 * 30 {
        return Ok(date.format("%b %d %Y").to_string());
    }
    naturalday(value)
}

/// `3723` → `1 hour, 2 minutes and 3 seconds`.
pub fn precisedelta(value: Value) -> Result<String, Error> {
    let total = to_delta(&value, "precisedelta")?.abs().num_seconds();
    let days_total = total / 86_400;
    let years = days_total / 365;
    let rem_days = (days_total % 365) as f64;
    let months = (rem_days / 30.5).floor() as i64;
    let days = (rem_days - months as f64 * 30.5).floor() as i64;
    let secs = total % 86_400;
    let parts = [
        (years, "year"),
        (months, "month"),
        (days, "day"),
        (secs / 3600, "hour"),
        (secs % 3600 / 60, "minute"),
        (secs % 60, "second"),
    ];
    let words: Vec<String> = parts
        .iter()
        .filter(|(n, _)| *n > 0)
        .map(|(n, unit)| format!("{n} {unit}{}", if *n == 1 { "" } else { "s" }))
        .collect();
    Ok(match words.len() {
        0 => "0 seconds".into(),
        1 => words[0].clone(),
        n => format!("{} and {}", words[..n - 1].join(", "), words[n - 1]),
    })
}

/// `0.5` → `1/2`, `1.3` → `1 3/10` (denominators up to 1000).
pub fn fractional(value: Value) -> Result<String, Error> {
    let x = number(&value, "fractional")?;
    let whole = x.trunc();
    let frac = x - whole;
    if frac.abs() < 1e-9 {
        return Ok(format!("{}", whole as i64));
    }
    // Best rational approximation with a bounded denominator (continued fractions).
    let (mut p0, mut q0, mut p1, mut q1) = (0i64, 1i64, 1i64, 0i64);
    let mut r = frac.abs();
    for _ in 0..32 {
        let a = r.floor() as i64;
        let (p2, q2) = (a * p1 + p0, a * q1 + q0);
        if q2 > 1000 {
            break;
        }
        (p0, q0, p1, q1) = (p1, q1, p2, q2);
        let f = r - a as f64;
        if f < 1e-9 {
            break;
        }
        r = 1.0 / f;
    }
    let sign = if frac < 0.0 { "-" } else { "" };
    Ok(if whole == 0.0 {
        format!("{sign}{p1}/{q1}")
    } else {
        format!("{} {p1}/{q1}", whole as i64)
    })
}

fn superscript(n: i32) -> String {
    n.to_string()
        .chars()
        .map(|c| match c {
            '-' => '⁻',
            '0' => '⁰',
            '1' => '¹',
            '2' => '²',
            '3' => '³',
            '4' => '⁴',
            '5' => '⁵',
            '6' => '⁶',
            '7' => '⁷',
            '8' => '⁸',
            _ => '⁹',
        })
        .collect()
}

/// `500` → `5.00 x 10²`.
pub fn scientific(value: Value, precision: Option<usize>) -> Result<String, Error> {
    let x = number(&value, "scientific")?;
    let precision = precision.unwrap_or(2);
    let formatted = format!("{x:.precision$e}");
    let (mantissa, exponent) = formatted
        .split_once('e')
        .unwrap_or((formatted.as_str(), "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    Ok(format!("{mantissa} x 10{}", superscript(exponent)))
}

/// `1500` → `1.50 k`: three significant digits and an SI prefix.
pub fn metric(
    value: Value,
    unit: Option<String>,
    precision: Option<usize>,
) -> Result<String, Error> {
    let x = number(&value, "metric")?;
    let unit = unit.unwrap_or_default();
    let precision = precision.unwrap_or(3) as i32;
    if x == 0.0 {
        return Ok(
            format!("{:.*} {unit}", (precision - 1).max(0) as usize, 0.0)
                .trim_end()
                .to_owned(),
        );
    }
    let exponent = x.abs().log10().floor() as i32;
    let prefix_power = if (0..3).contains(&exponent) {
        0
    } else {
        exponent.div_euclid(3) * 3
    };
    const PREFIXES: &[(i32, &str)] = &[
        (-24, "y"),
        (-21, "z"),
        (-18, "a"),
        (-15, "f"),
        (-12, "p"),
        (-9, "n"),
        (-6, "μ"),
        (-3, "m"),
        (0, ""),
        (3, "k"),
        (6, "M"),
        (9, "G"),
        (12, "T"),
        (15, "P"),
        (18, "E"),
        (21, "Z"),
        (24, "Y"),
    ];
    let prefix = PREFIXES
        .iter()
        .find(|(p, _)| *p == prefix_power)
        .map_or("", |(_, s)| s);
    let scaled = x / 10f64.powi(prefix_power);
    let digits = (precision - 1 - (exponent - prefix_power)).max(0) as usize;
    let text = format!("{scaled:.digits$}");
    let suffix = format!("{prefix}{unit}");
    Ok(if suffix.is_empty() {
        text
    } else {
        format!("{text} {suffix}")
    })
}

/// `<floor` / `>ceil` outside the range, else the value.
pub fn clamp(value: Value, kwargs: Kwargs) -> Result<String, Error> {
    let x = number(&value, "clamp")?;
    let floor: Option<f64> = kwargs.get("floor")?;
    let ceil: Option<f64> = kwargs.get("ceil")?;
    kwargs.assert_all_used()?;
    let show = |v: f64| {
        if v.fract() == 0.0 {
            format!("{}", v as i64)
        } else {
            v.to_string()
        }
    };
    Ok(match (floor, ceil) {
        (Some(f), _) if x < f => format!("<{}", show(f)),
        (_, Some(c)) if x > c => format!(">{}", show(c)),
        _ => show(x),
    })
}

/// Prefect's `flow_run_id` filter: the UUID after `flow-run/` in a text (e.g. a UI URL).
pub fn flow_run_id(text: String) -> Value {
    text.split("flow-run/")
        .nth(1)
        .map(|rest| rest.chars().take(36).collect::<String>())
        .filter(|id| uuid::Uuid::parse_str(id).is_ok())
        .map_or(Value::from(()), Value::from)
}

/// Registers every filter under both names.
pub fn register(env: &mut Environment<'static>) {
    macro_rules! both {
        ($name:literal, $f:expr) => {
            env.add_filter($name, $f);
            env.add_filter(concat!("humanize_", $name), $f);
        };
    }
    both!("intcomma", intcomma);
    both!("intword", intword);
    both!("ordinal", ordinal);
    both!("apnumber", apnumber);
    both!("naturalsize", naturalsize);
    both!("naturaldelta", naturaldelta);
    both!("naturaltime", naturaltime);
    both!("naturalday", naturalday);
    both!("naturaldate", naturaldate);
    both!("precisedelta", precisedelta);
    both!("fractional", fractional);
    both!("scientific", scientific);
    both!("metric", metric);
    both!("clamp", clamp);
    env.add_filter("flow_run_id", flow_run_id);
    // Spur has no UI: Prefect's UI-link filters render nothing rather than a dead link.
    env.add_filter("ui_url", |_: Value| Value::from(()));
    env.add_filter("ui_resource_events_url", |_: Value| Value::from(()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(template: &str) -> String {
        let mut env = Environment::new();
        register(&mut env);
        env.render_str(template, ())
            .unwrap_or_else(|e| format!("ERROR {e}"))
    }

    /// Expected strings produced by Python humanize 4.17 (the version Prefect 3.8.8 installs).
    #[test]
    fn matches_python_humanize() {
        let cases = [
            ("{{ 1234567 | intcomma }}", "1,234,567"),
            ("{{ -1234567 | humanize_intcomma }}", "-1,234,567"),
            ("{{ 1234.5678 | intcomma }}", "1,234.5678"),
            ("{{ '1000000' | intcomma }}", "1,000,000"),
            ("{{ 100 | intword }}", "100"),
            ("{{ 12400 | intword }}", "12.4 thousand"),
            ("{{ 1200000 | intword }}", "1.2 million"),
            ("{{ 1234567891 | humanize_intword }}", "1.2 billion"),
            (
                "{{ 1 | ordinal }}{{ 2 | ordinal }}{{ 3 | ordinal }}{{ 11 | ordinal }}{{ 22 | ordinal }}{{ 111 | ordinal }}",
                "1st2nd3rd11th22nd111th",
            ),
            (
                "{{ 5 | apnumber }} {{ 10 | apnumber }} {{ '7' | apnumber }}",
                "five 10 seven",
            ),
            (
                "{{ 0 | naturalsize }}|{{ 1 | naturalsize }}|{{ 1500 | naturalsize }}|{{ 3000000000 | naturalsize }}",
                "0 Bytes|1 Byte|1.5 kB|3.0 GB",
            ),
            (
                "{{ 1536 | naturalsize(binary=true) }}|{{ 1000000000 | naturalsize(binary=true) }}",
                "1.5 KiB|953.7 MiB",
            ),
            (
                "{{ 0 | naturaldelta }}|{{ 1 | naturaldelta }}|{{ 30 | naturaldelta }}|{{ 60 | naturaldelta }}|{{ 90 | naturaldelta }}",
                "a moment|a second|30 seconds|a minute|2 minutes",
            ),
            (
                "{{ 3599 | naturaldelta }}|{{ 7199 | naturaldelta }}|{{ 86399 | naturaldelta }}|{{ 172800 | naturaldelta }}",
                "an hour|2 hours|a day|2 days",
            ),
            (
                "{{ 2678400 | naturaldelta }}|{{ 5356800 | naturaldelta }}|{{ 31536000 | naturaldelta }}|{{ 34560000 | naturaldelta }}|{{ 69120000 | naturaldelta }}",
                "a month|2 months|a year|1 year, 1 month|2 years",
            ),
            (
                "{{ 0 | naturaltime }}|{{ 30 | naturaltime }}|{{ 10800 | naturaltime }}|{{ -60 | naturaltime }}",
                "now|30 seconds ago|3 hours ago|a minute from now",
            ),
            (
                "{{ 0 | precisedelta }}|{{ 61 | precisedelta }}|{{ 3723 | precisedelta }}|{{ 90061 | precisedelta }}",
                "0 seconds|1 minute and 1 second|1 hour, 2 minutes and 3 seconds|1 day, 1 hour, 1 minute and 1 second",
            ),
            (
                "{{ 34560005 | precisedelta }}",
                "1 year, 1 month, 4 days and 5 seconds",
            ),
            (
                "{{ 0.5 | fractional }}|{{ 1.3 | fractional }}|{{ 2 | fractional }}|{{ 0.333333 | fractional }}",
                "1/2|1 3/10|2|1/3",
            ),
            (
                "{{ 500 | scientific }}|{{ 1234.5 | scientific }}|{{ 0.000123 | scientific }}|{{ -12 | scientific }}",
                "5.00 x 10²|1.23 x 10³|1.23 x 10⁻⁴|-1.20 x 10¹",
            ),
            (
                "{{ 1500 | metric }}|{{ 0.00123 | metric }}|{{ 1000000000 | metric }}|{{ 12 | metric }}",
                "1.50 k|1.23 m|1.00 G|12.0",
            ),
            (
                "{{ 0.0001 | clamp(floor=0.01) }}|{{ 1.5 | clamp(ceil=1) }}|{{ 0.5 | clamp(floor=0.01, ceil=1) }}",
                "<0.01|>1|0.5",
            ),
            (
                "{{ '2024-03-05' | naturalday }}|{{ '2024-03-05' | naturaldate }}",
                "Mar 05|Mar 05 2024",
            ),
            (
                "{{ 'see https://x/runs/flow-run/0a0a0a0a-0000-4000-8000-000000000001?tab=logs' | flow_run_id }}",
                "0a0a0a0a-0000-4000-8000-000000000001",
            ),
        ];
        for (template, want) in cases {
            assert_eq!(render(template), want, "{template}");
        }
        let today = Utc::now().date_naive().format("%Y-%m-%d").to_string();
        assert_eq!(
            render(&format!("{{{{ '{today}' | naturalday }}}}")),
            "today"
        );
    }
}
