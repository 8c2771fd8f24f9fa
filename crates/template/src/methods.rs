//! Python's methods on template values: `s.split(',')`, `d.items()`, `s.startswith('x')`, ….
//!
//! Prefect's templates call Python methods on payload values. minijinja answers methods
//! through an "unknown method" callback; `minijinja-contrib`'s `pycompat` one gives most of
//! `str`, `dict` and `list`. [`unknown_method`] answers the rest first (and `join`, so that
//! items print as Python's `str()`), then hands over to it. Methods that change a value
//! (`append`, `setdefault`, …) stay unknown: Prefect's sandbox is immutable too.

use minijinja::value::{ValueKind, from_args};
use minijinja::{Error, ErrorKind, State, Value};

use crate::jinja::center_text;
use crate::python::py_str;

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// One fill character, as Python's `center`/`ljust`/`rjust` want it.
fn fill_char(fill: Option<&str>) -> Result<char, Error> {
    let fill = fill.unwrap_or(" ");
    let mut chars = fill.chars();
    match (chars.next(), chars.next()) {
        (Some(c), None) => Ok(c),
        _ => Err(invalid(
            "The fill character must be exactly one character long",
        )),
    }
}

/// The character index of a byte offset in `s`.
fn char_index(s: &str, byte: usize) -> i64 {
    s[..byte].chars().count() as i64
}

/// The environment's unknown-method callback: Python methods on strings, lists and dicts.
pub(crate) fn unknown_method(
    state: &mut State,
    value: &Value,
    method: &str,
    args: &[Value],
) -> Result<Value, Error> {
    let extra = match value.kind() {
        ValueKind::String => string_method(value.as_str().unwrap_or_default(), method, args),
        ValueKind::Seq => seq_method(value, method, args),
        ValueKind::Map => map_method(value, method, args),
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    };
    match extra {
        Err(e) if e.kind() == ErrorKind::UnknownMethod => {
            minijinja_contrib::pycompat::unknown_method_callback(state, value, method, args)
        }
        other => other,
    }
}

fn string_method(s: &str, method: &str, args: &[Value]) -> Result<Value, Error> {
    let text = |t: String| Ok(Value::from(t));
    match method {
        "rsplit" => {
            let (sep, maxsplit): (Option<Value>, Option<i64>) = from_args(args)?;
            let maxsplit = maxsplit.filter(|n| *n >= 0).map(|n| n as usize);
            let sep = sep.filter(|s| !s.is_none());
            let mut parts: Vec<Value> = match sep {
                Some(sep) => {
                    let sep = sep
                        .as_str()
                        .ok_or_else(|| invalid("must be str or None"))?
                        .to_owned();
                    if sep.is_empty() {
                        return Err(invalid("empty separator"));
                    }
                    match maxsplit {
                        Some(n) => s.rsplitn(n + 1, sep.as_str()).map(Value::from).collect(),
                        None => s.rsplit(sep.as_str()).map(Value::from).collect(),
                    }
                }
                None => {
                    let mut rest = s.trim_end();
                    let mut out = Vec::new();
                    while !rest.is_empty() {
                        if maxsplit.is_some_and(|n| out.len() == n) {
                            out.push(Value::from(rest));
                            break;
                        }
                        match rest.rfind(char::is_whitespace) {
                            Some(i) => {
                                let ws = rest[i..].chars().next().map_or(1, char::len_utf8);
                                out.push(Value::from(&rest[i + ws..]));
                                rest = rest[..i].trim_end();
                            }
                            None => {
                                out.push(Value::from(rest));
                                rest = "";
                            }
                        }
                    }
                    out
                }
            };
            parts.reverse();
            Ok(Value::from(parts))
        }
        "swapcase" => {
            let () = from_args(args)?;
            text(
                s.chars()
                    .flat_map(|c| -> Box<dyn Iterator<Item = char>> {
                        if c.is_uppercase() {
                            Box::new(c.to_lowercase())
                        } else if c.is_lowercase() {
                            Box::new(c.to_uppercase())
                        } else {
                            Box::new(std::iter::once(c))
                        }
                    })
                    .collect(),
            )
        }
        "istitle" => {
            let () = from_args(args)?;
            let (mut cased, mut previous_cased) = (false, false);
            for c in s.chars() {
                if c.is_uppercase() {
                    if previous_cased {
                        return Ok(Value::from(false));
                    }
                    previous_cased = true;
                    cased = true;
                } else if c.is_lowercase() {
                    if !previous_cased {
                        return Ok(Value::from(false));
                    }
                    previous_cased = true;
                    cased = true;
                } else {
                    previous_cased = false;
                }
            }
            Ok(Value::from(cased))
        }
        "casefold" => {
            let () = from_args(args)?;
            text(s.to_lowercase().replace('ß', "ss"))
        }
        "center" | "ljust" | "rjust" => {
            let (size, fill): (usize, Option<&str>) = from_args(args)?;
            let fill = fill_char(fill)?;
            let len = s.chars().count();
            if method == "center" {
                return text(center_text(s, size, fill)?);
            }
            let pad = center_text("", size.saturating_sub(len), fill)?;
            text(if method == "ljust" {
                format!("{s}{pad}")
            } else {
                format!("{pad}{s}")
            })
        }
        "zfill" => {
            let (size,): (usize,) = from_args(args)?;
            let len = s.chars().count();
            let zeros = center_text("", size.saturating_sub(len), '0')?;
            let (sign, digits) = match s.chars().next() {
                Some(c @ ('+' | '-')) => (c.to_string(), &s[1..]),
                _ => (String::new(), s),
            };
            text(format!("{sign}{zeros}{digits}"))
        }
        "partition" | "rpartition" => {
            let (sep,): (&str,) = from_args(args)?;
            if sep.is_empty() {
                return Err(invalid("empty separator"));
            }
            let found = if method == "partition" {
                s.find(sep)
            } else {
                s.rfind(sep)
            };
            let parts = match found {
                Some(i) => [&s[..i], sep, &s[i + sep.len()..]],
                None if method == "partition" => [s, "", ""],
                None => ["", "", s],
            };
            Ok(Value::from(minijinja::value::Tuple::from(
                parts.map(Value::from),
            )))
        }
        "encode" => {
            let (_encoding, _errors): (Option<&str>, Option<&str>) = from_args(args)?;
            Ok(Value::from_bytes(s.as_bytes().to_vec()))
        }
        "removeprefix" => {
            let (prefix,): (&str,) = from_args(args)?;
            text(s.strip_prefix(prefix).unwrap_or(s).to_owned())
        }
        "removesuffix" => {
            let (suffix,): (&str,) = from_args(args)?;
            text(s.strip_suffix(suffix).unwrap_or(s).to_owned())
        }
        "expandtabs" => {
            let (tabsize,): (Option<usize>,) = from_args(args)?;
            let tabsize = tabsize.unwrap_or(8);
            let mut out = String::with_capacity(s.len());
            let mut column = 0;
            for c in s.chars() {
                match c {
                    '\t' if tabsize > 0 => {
                        let n = tabsize - column % tabsize;
                        out.push_str(&center_text("", n, ' ')?);
                        column += n;
                    }
                    '\t' => {}
                    '\n' | '\r' => {
                        out.push(c);
                        column = 0;
                    }
                    c => {
                        out.push(c);
                        column += 1;
                    }
                }
            }
            text(out)
        }
        "index" | "rindex" => {
            let (what,): (&str,) = from_args(args)?;
            let found = if method == "index" {
                s.find(what)
            } else {
                s.rfind(what)
            };
            found
                .map(|i| Value::from(char_index(s, i)))
                .ok_or_else(|| invalid("substring not found"))
        }
        "join" => {
            let (items,): (&Value,) = from_args(args)?;
            let mut out = String::new();
            for (i, item) in items.try_iter()?.enumerate() {
                if i > 0 {
                    out.push_str(s);
                }
                let Some(part) = item.as_str() else {
                    return Err(invalid(format!(
                        "sequence item {i}: expected str instance, {} found",
                        item.kind()
                    )));
                };
                out.push_str(part);
                if out.len() > crate::MAX_OUTPUT_BYTES {
                    return Err(invalid("join: the result is over the output limit"));
                }
            }
            text(out)
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn seq_method(value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match method {
        "index" => {
            let (what,): (&Value,) = from_args(args)?;
            for (i, item) in value.try_iter()?.enumerate() {
                if item == *what {
                    return Ok(Value::from(i));
                }
            }
            Err(invalid(format!("{} is not in list", py_str(what)?)))
        }
        "copy" => {
            let () = from_args(args)?;
            Ok(Value::from(value.try_iter()?.collect::<Vec<_>>()))
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}

fn map_method(value: &Value, method: &str, args: &[Value]) -> Result<Value, Error> {
    match method {
        "copy" => {
            let () = from_args(args)?;
            Ok(value.clone())
        }
        _ => Err(Error::from(ErrorKind::UnknownMethod)),
    }
}
