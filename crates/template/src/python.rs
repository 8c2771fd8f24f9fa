//! Printing values the way Jinja does under Python.
//!
//! Prefect renders templates with Python's Jinja, where `{{ event.payload }}` prints the
//! dict's Python `repr`: `{'k': 'v', 'ok': True, 'none': None}`. minijinja on its own prints
//! containers as JSON-like text (`{"k": "v", ...}`), so a run parameter or a notification
//! body built from a dict would differ from what the same automation gives in Prefect.
//! [`formatter`] prints lists, dicts, tuples and floats as Python does (`{'k': 1}`, `('a', 2)`,
//! `1e+20`); [`py_str`] is Python's `str()` for filters that convert (`string`, `join`,
//! `format`); Spur's event views print as they are.

use std::fmt::Write as _;

use minijinja::value::ValueKind;
use minijinja::{Error, ErrorKind, Output, State, Value};

use crate::context::{EventView, LabelDiver, ResourceView};

/// How deep containers are printed before giving up (a guard, far beyond real payloads).
const MAX_DEPTH: usize = 64;

/// minijinja's output formatter with Python's printing of lists and dicts.
pub(crate) fn formatter(out: &mut Output, state: &mut State, value: &Value) -> Result<(), Error> {
    let text = if is_plain_container(value) {
        let mut text = String::new();
        repr(value, &mut text, 0)?;
        text
    } else if is_float(value) {
        float_repr(f64::try_from(value.clone()).unwrap_or(f64::NAN))
    } else {
        return minijinja::escape_formatter(out, state, value);
    };
    out.write_str(&text)
        .map_err(|_| Error::new(ErrorKind::WriteFailure, "cannot write the output"))
}

/// A number that is not an integer (Python's `float`).
pub(crate) fn is_float(value: &Value) -> bool {
    value.kind() == ValueKind::Number && !value.is_integer()
}

/// Python's `str(value)`: strings as they are, floats as [`float_repr`], containers as their
/// repr, `None`, `True`/`False`; an undefined value is `""` (Jinja's `Undefined`).
pub(crate) fn py_str(value: &Value) -> Result<String, Error> {
    if let Some(s) = value.as_str() {
        return Ok(s.to_owned());
    }
    if value.is_undefined() {
        return Ok(String::new());
    }
    if is_plain_container(value) || is_float(value) {
        let mut text = String::new();
        repr(value, &mut text, 0)?;
        return Ok(text);
    }
    Ok(value.to_string())
}

/// Python's `repr(value)`.
pub(crate) fn py_repr(value: &Value) -> Result<String, Error> {
    let mut text = String::new();
    if value.is_undefined() {
        // Jinja's `repr(Undefined)` is `Undefined`.
        text.push_str("Undefined");
    } else {
        repr(value, &mut text, 0)?;
    }
    Ok(text)
}

/// Is `value` a tuple for Python: a tuple literal, or one of `groupby`'s `(grouper, list)`
/// pairs (a two-item sequence that answers `.grouper`).
fn is_tuple(value: &Value) -> bool {
    value.is_tuple()
        || (value.kind() == ValueKind::Seq
            && value.len() == Some(2)
            && value.get_attr("grouper").is_ok_and(|g| !g.is_undefined()))
}

/// A list, tuple or dict of plain data (not one of Spur's event views, which print as they are).
pub(crate) fn is_plain_container(value: &Value) -> bool {
    matches!(
        value.kind(),
        ValueKind::Map | ValueKind::Seq | ValueKind::Iterable
    ) && value.downcast_object_ref::<EventView>().is_none()
        && value.downcast_object_ref::<ResourceView>().is_none()
        && value.downcast_object_ref::<LabelDiver>().is_none()
}

/// Python's `repr` of `value`, appended to `out`.
fn repr(value: &Value, out: &mut String, depth: usize) -> Result<(), Error> {
    if depth > MAX_DEPTH {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "a value nested more than 64 levels deep cannot be printed",
        ));
    }
    match value.kind() {
        ValueKind::Undefined | ValueKind::None => out.push_str("None"),
        ValueKind::Bool => out.push_str(if value.is_true() { "True" } else { "False" }),
        ValueKind::Number => number(value, out),
        ValueKind::String => string(value.as_str().unwrap_or_default(), out),
        ValueKind::Seq if is_tuple(value) => {
            out.push('(');
            let mut count = 0;
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr(&item, out, depth + 1)?;
                count += 1;
            }
            if count == 1 {
                out.push(',');
            }
            out.push(')');
        }
        ValueKind::Seq | ValueKind::Iterable => {
            out.push('[');
            for (i, item) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr(&item, out, depth + 1)?;
            }
            out.push(']');
        }
        ValueKind::Map if is_plain_container(value) => {
            out.push('{');
            for (i, key) in value.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                repr(&key, out, depth + 1)?;
                out.push_str(": ");
                repr(&value.get_item(&key)?, out, depth + 1)?;
            }
            out.push('}');
        }
        // Bytes, views, timestamps and other objects: as they print on their own.
        _ => {
            let _ = write!(out, "{value}");
        }
    }
    Ok(())
}

/// Python's number printing: integers as they are, floats as [`float_repr`].
fn number(value: &Value, out: &mut String) {
    let shown = value.to_string();
    if shown.parse::<i128>().is_ok() {
        out.push_str(&shown);
        return;
    }
    match f64::try_from(value.clone()) {
        Ok(float) => out.push_str(&float_repr(float)),
        Err(_) => out.push_str(&shown),
    }
}

/// Python's `repr` of a float: the shortest round-trip digits, always with a `.` or an
/// exponent, and an exponent (`1e+20`, `1e-05`) outside 1e-4 ≤ |x| < 1e16.
pub(crate) fn float_repr(float: f64) -> String {
    if float.is_nan() {
        return "nan".to_owned();
    }
    if float.is_infinite() {
        return if float > 0.0 { "inf" } else { "-inf" }.to_owned();
    }
    let scientific = format!("{float:e}");
    let (mantissa, exponent) = scientific.split_once('e').unwrap_or((&scientific, "0"));
    let exponent: i32 = exponent.parse().unwrap_or(0);
    if float != 0.0 && !(-4..16).contains(&exponent) {
        let sign = if exponent < 0 { '-' } else { '+' };
        format!("{mantissa}e{sign}{:02}", exponent.abs())
    } else {
        let mut plain = format!("{float}");
        if !plain.contains('.') {
            plain.push_str(".0");
        }
        plain
    }
}

/// Jinja's `string` filter under Python: `str(value)`, so lists and dicts give their repr.
pub(crate) fn string_filter(state: &State, value: &Value) -> Result<Value, Error> {
    if is_plain_container(value) || is_float(value) {
        Ok(Value::from(py_str(value)?))
    } else {
        minijinja::filters::string(state, value)
    }
}

/// Python's `repr` of a string: single quotes unless the text has a single quote and no
/// double quote; backslashes, that quote and control characters escaped.
fn string(text: &str, out: &mut String) {
    let quote = if text.contains('\'') && !text.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in text.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}
