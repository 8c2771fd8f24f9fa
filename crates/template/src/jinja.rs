//! Jinja's filters, tests and globals where minijinja has none or behaves otherwise.
//!
//! Prefect renders with Python's Jinja. minijinja covers most of its built-ins; this module
//! fills the rest so that a template brought from Prefect renders the same:
//!
//! * missing filters: `truncate`, `wordcount`, `wordwrap`, `center`, `filesizeformat`,
//!   `striptags`, `forceescape`, `xmlattr`, `urlize`, `random` (several come from
//!   `minijinja-contrib`, called with Jinja's positional arguments);
//! * missing globals: `cycler`, `joiner`, `lipsum`;
//! * filters whose result differs: `escape` (Jinja's entities `&#39;` `&#34;`, `/` kept),
//!   `int` and `float` (Python's `int()`/`float()` with Jinja's default on bad input),
//!   `default(default_value=…, boolean=…)`, `indent` with a string, `dictsort` and `items`
//!   (tuples), `join` and `format` (Python's `str()` and `%` formatting), `urlencode` on
//!   dicts and pairs (`a=x+y`), `pprint` (sorted keys), `attr` (attributes only);
//! * tests: `sequence` (strings and dicts are sequences), `callable`.
//!
//! Every width a template can choose (`center`, `indent`, `%5d`, …) is checked against
//! [`crate::MAX_OUTPUT_BYTES`] before any text is built.

use minijinja::value::{Kwargs, Rest, Tuple, ValueKind};
use minijinja::{Environment, Error, ErrorKind, State, Value};

use crate::MAX_OUTPUT_BYTES;
use crate::python::{is_float, py_repr, py_str};

fn invalid(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidOperation, msg.into())
}

/// A width or count chosen by a template, refused past the output cap.
fn width(n: usize) -> Result<usize, Error> {
    if n > MAX_OUTPUT_BYTES {
        return Err(invalid(format!(
            "a width of {n} is over the output limit of {MAX_OUTPUT_BYTES} bytes"
        )));
    }
    Ok(n)
}

/// Registers this module's filters, tests and globals.
pub(crate) fn register(env: &mut Environment<'static>) {
    env.add_filter("escape", escape);
    env.add_filter("e", escape);
    env.add_filter("forceescape", forceescape);
    env.add_filter("center", center);
    env.add_filter("truncate", truncate);
    env.add_filter("wordcount", wordcount);
    env.add_filter("wordwrap", wordwrap);
    env.add_filter("filesizeformat", filesizeformat);
    env.add_filter("striptags", striptags);
    env.add_filter("xmlattr", xmlattr);
    env.add_filter("urlize", urlize);
    env.add_filter("urlencode", urlencode);
    env.add_filter("random", minijinja_contrib::filters::random);
    env.add_filter("int", int);
    env.add_filter("float", float);
    env.add_filter("default", default);
    env.add_filter("d", default);
    env.add_filter("indent", indent);
    env.add_filter("dictsort", dictsort);
    env.add_filter("items", items);
    env.add_filter("join", join);
    env.add_filter("format", format);
    env.add_filter("pprint", pprint);
    env.add_filter("attr", attr);
    env.add_test("sequence", is_sequence);
    env.add_test("callable", is_callable);
    env.add_function("cycler", cycler);
    env.add_function("joiner", minijinja_contrib::globals::joiner);
    env.add_function("lipsum", lipsum);
}

/// Python's `markupsafe.escape` on a text: `& < > ' "` as `&amp; &lt; &gt; &#39; &#34;`.
pub(crate) fn html_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&#39;"),
            '"' => out.push_str("&#34;"),
            c => out.push(c),
        }
    }
    out
}

/// Jinja's `escape`/`e`: safe text stays as it is, anything else is `str()`-ed and escaped.
fn escape(value: &Value) -> Result<Value, Error> {
    if value.is_safe() {
        return Ok(value.clone());
    }
    forceescape(value)
}

/// Jinja's `forceescape`: escapes even text marked safe.
fn forceescape(value: &Value) -> Result<Value, Error> {
    Ok(Value::from_safe_string(html_escape(&py_str(value)?)))
}

/// Python's `str.center(width, fill)`: the extra space goes right, unless the padding and
/// the width are both odd.
pub(crate) fn center_text(text: &str, size: usize, fill: char) -> Result<String, Error> {
    let len = text.chars().count();
    if size <= len {
        return Ok(text.to_owned());
    }
    let pad = width(size)? - len;
    let left = pad / 2 + (pad & size & 1);
    let mut out = String::with_capacity(size * fill.len_utf8().max(1) + text.len());
    out.extend(std::iter::repeat_n(fill, left));
    out.push_str(text);
    out.extend(std::iter::repeat_n(fill, pad - left));
    Ok(out)
}

/// Jinja's `center(width=80)`.
fn center(value: &Value, size: Option<usize>) -> Result<String, Error> {
    center_text(&py_str(value)?, size.unwrap_or(80), ' ')
}

/// Reads Jinja's argument `name` at position `index` of `args`, or from `kwargs`.
fn arg<'a, T: minijinja::value::ArgType<'a, Output = T>>(
    args: &'a [Value],
    kwargs: &'a Kwargs,
    index: usize,
    name: &'a str,
) -> Result<Option<T>, Error> {
    match args.get(index) {
        Some(v) => {
            if kwargs.has(name) {
                return Err(Error::new(
                    ErrorKind::TooManyArguments,
                    format!("got multiple values for argument {name:?}"),
                ));
            }
            T::from_value(Some(v)).map(Some)
        }
        None => kwargs.get::<Option<T>>(name),
    }
}

/// Jinja's `truncate(length=255, killwords=False, end='...', leeway=5)`: text within
/// `length + leeway` characters is kept; otherwise it is cut to `length` characters with
/// `end`, at the last space unless `killwords`.
fn truncate(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let text = py_str(value)?;
    let length = arg::<usize>(&args, &kwargs, 0, "length")?.unwrap_or(255);
    let killwords = arg::<bool>(&args, &kwargs, 1, "killwords")?.unwrap_or(false);
    let end = arg::<String>(&args, &kwargs, 2, "end")?.unwrap_or_else(|| "...".into());
    let leeway = arg::<usize>(&args, &kwargs, 3, "leeway")?.unwrap_or(5);
    kwargs.assert_all_used()?;
    if args.len() > 4 {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    let end_len = end.chars().count();
    if length < end_len {
        return Err(invalid(format!(
            "expected length >= {end_len}, got {length}"
        )));
    }
    if text.chars().count() <= length.saturating_add(leeway) {
        return Ok(value.clone());
    }
    let kept: String = text.chars().take(length - end_len).collect();
    let kept = if killwords {
        kept.as_str()
    } else {
        kept.rsplit_once(' ')
            .map_or(kept.as_str(), |(head, _)| head)
    };
    Ok(Value::from(format!("{kept}{end}")))
}

/// Jinja's `wordcount`: the number of runs of word characters.
fn wordcount(value: &Value) -> Result<Value, Error> {
    minijinja_contrib::filters::wordcount(&Value::from(py_str(value)?))
}

/// Jinja's `wordwrap(width=79, break_long_words=True, wrapstring=None,
/// break_on_hyphens=True)`, positional or by name: each line of the text wrapped as
/// Python's `textwrap` does (greedy, first fit), joined with `wrapstring`.
fn wordwrap(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let size = width(arg::<usize>(&args, &kwargs, 0, "width")?.unwrap_or(79))?;
    let break_long = arg::<bool>(&args, &kwargs, 1, "break_long_words")?.unwrap_or(true);
    let wrapstring = arg::<Value>(&args, &kwargs, 2, "wrapstring")?
        .filter(|v| !v.is_none())
        .map(|v| py_str(&v))
        .transpose()?
        .unwrap_or_else(|| "\n".into());
    let hyphens = arg::<bool>(&args, &kwargs, 3, "break_on_hyphens")?.unwrap_or(true);
    kwargs.assert_all_used()?;
    if size == 0 {
        return Err(invalid(format!("invalid width {size} (must be > 0)")));
    }
    let text = py_str(value)?;
    let mut lines = Vec::new();
    for paragraph in text.lines() {
        lines.extend(wrap_line(paragraph, size, break_long, hyphens));
    }
    Ok(Value::from(lines.join(&wrapstring)))
}

/// A line split into words and runs of whitespace (and, with `hyphens`, after the hyphen
/// of a hyphenated word), as `textwrap` splits it.
fn chunks(line: &str, hyphens: bool) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    let chars: Vec<char> = line.chars().collect();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        let space = c.is_whitespace();
        let current_space = current.chars().next().is_some_and(char::is_whitespace);
        if !current.is_empty() && space != current_space {
            out.push(std::mem::take(&mut current));
        }
        current.push(c);
        let hyphen_break = hyphens
            && c == '-'
            && i > 0
            && chars[i - 1].is_alphanumeric()
            && chars.get(i + 1).is_some_and(|n| n.is_alphanumeric());
        if hyphen_break {
            out.push(std::mem::take(&mut current));
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// `textwrap.wrap` of one line: greedy filling, whitespace dropped at the ends of lines,
/// words longer than `size` cut when `break_long`.
fn wrap_line(line: &str, size: usize, break_long: bool, hyphens: bool) -> Vec<String> {
    let is_space = |c: &str| c.chars().all(char::is_whitespace);
    let mut chunks: Vec<String> = chunks(line, hyphens);
    chunks.reverse();
    let mut lines: Vec<String> = Vec::new();
    while !chunks.is_empty() {
        let mut current: Vec<String> = Vec::new();
        let mut len = 0;
        if !lines.is_empty() && chunks.last().is_some_and(|c| is_space(c)) {
            chunks.pop();
        }
        while let Some(chunk) = chunks.last() {
            let n = chunk.chars().count();
            if len + n <= size {
                len += n;
                current.push(chunks.pop().unwrap_or_default());
            } else {
                break;
            }
        }
        if let Some(chunk) = chunks.last()
            && chunk.chars().count() > size
        {
            if break_long {
                let room = size.saturating_sub(len).max(1);
                let head: String = chunk.chars().take(room).collect();
                let tail: String = chunk.chars().skip(room).collect();
                chunks.pop();
                chunks.push(tail);
                current.push(head);
            } else if current.is_empty() {
                current.push(chunks.pop().unwrap_or_default());
            }
        }
        if current.last().is_some_and(|c| is_space(c)) {
            current.pop();
        }
        if !current.is_empty() {
            lines.push(current.concat());
        }
    }
    lines
}

/// Jinja's `filesizeformat(binary=False)`: `1 Byte`, `999 Bytes`, then one decimal and the
/// unit (`kB`, `MB`, … or `KiB`, `MiB`, …).
fn filesizeformat(value: &Value, binary: Option<bool>) -> Result<String, Error> {
    let bytes = to_float(value).ok_or_else(|| invalid("filesizeformat needs a number"))?;
    let (base, units): (f64, [&str; 8]) = if binary.unwrap_or(false) {
        (
            1024.0,
            ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB", "ZiB", "YiB"],
        )
    } else {
        (1000.0, ["kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB"])
    };
    if bytes == 1.0 {
        return Ok("1 Byte".into());
    }
    if bytes < base {
        return Ok(format!("{} Bytes", bytes.trunc() as i128));
    }
    let mut unit = base;
    for (i, name) in units.iter().enumerate() {
        unit = base.powi(i as i32 + 2);
        if bytes < unit {
            return Ok(format!("{:.1} {name}", base * bytes / unit));
        }
    }
    Ok(format!("{:.1} {}", base * bytes / unit, units[7]))
}

/// Jinja's `striptags`: tags and comments removed, whitespace collapsed, entities decoded.
fn striptags(value: &Value) -> Result<String, Error> {
    Ok(minijinja_contrib::filters::striptags(py_str(value)?))
}

/// Jinja's `xmlattr(autospace=True)`: `key="value"` pairs, escaped, `None` and undefined
/// values left out; a key with a space, `/`, `>` or `=` is an error.
fn xmlattr(value: &Value, autospace: Option<bool>) -> Result<Value, Error> {
    let mut parts = Vec::new();
    for key in value.try_iter()? {
        let item = value.get_item(&key)?;
        if item.is_none() || item.is_undefined() {
            continue;
        }
        let key = py_str(&key)?;
        if key.is_empty()
            || key
                .chars()
                .any(|c| c.is_whitespace() || matches!(c, '/' | '>' | '='))
        {
            return Err(invalid(format!(
                "Invalid character in attribute name: {key:?}"
            )));
        }
        parts.push(format!(
            "{}=\"{}\"",
            html_escape(&key),
            html_escape(&py_str(&item)?)
        ));
    }
    let mut out = parts.join(" ");
    if autospace.unwrap_or(true) && !out.is_empty() {
        out.insert(0, ' ');
    }
    Ok(Value::from_safe_string(out))
}

/// A host name with a top-level domain of two or more letters (`example.com`), or
/// `localhost`, optionally with a port.
fn is_host(host: &str) -> bool {
    let host = match host.rsplit_once(':') {
        Some((h, port)) if !port.is_empty() && port.chars().all(|c| c.is_ascii_digit()) => h,
        _ => host,
    };
    if host == "localhost" {
        return true;
    }
    let mut labels: Vec<&str> = host.split('.').collect();
    let Some(tld) = labels.pop() else {
        return false;
    };
    !labels.is_empty()
        && (2..=63).contains(&tld.len())
        && tld.chars().all(|c| c.is_ascii_alphabetic())
        && labels.iter().all(|l| {
            !l.is_empty()
                && l.chars()
                    .all(|c| c.is_alphanumeric() || c == '-' || c == '%')
        })
}

/// Characters a URL's path or query may hold in `urlize` (no `&`, `<`, `>`, quotes).
fn is_url_tail(tail: &str) -> bool {
    tail.chars()
        .all(|c| c.is_alphanumeric() || "_.,:;=+%@!$'()*~[]-/?#".contains(c))
}

/// The link for one word of `urlize`, if it is a URL or an e-mail address.
fn link_for(word: &str) -> Option<(String, bool)> {
    let (scheme, rest) = if let Some(rest) = word.strip_prefix("https://") {
        ("https://", rest)
    } else if let Some(rest) = word.strip_prefix("http://") {
        ("http://", rest)
    } else {
        ("", word)
    };
    let (host, tail) = rest.find('/').map_or((rest, ""), |i| rest.split_at(i));
    if (!scheme.is_empty() || rest.starts_with("www.")) && is_host(host) && is_url_tail(tail) {
        let href = if scheme.is_empty() {
            format!("https://{word}")
        } else {
            word.to_owned()
        };
        return Some((href, false));
    }
    if let Some((user, domain)) = word.split_once('@')
        && !user.is_empty()
        && user
            .chars()
            .all(|c| c.is_alphanumeric() || "._+-".contains(c))
        && !domain.contains(':')
        && is_host(domain)
    {
        return Some((format!("mailto:{word}"), true));
    }
    let bare = ["com", "net", "org"]
        .iter()
        .any(|tld| host.ends_with(&format!(".{tld}")));
    if scheme.is_empty() && bare && !word.contains('@') && is_host(host) && is_url_tail(tail) {
        return Some((format!("https://{word}"), false));
    }
    None
}

/// Jinja's `urlize(trim_url_limit=None, nofollow=False, target=None, rel=None)`: the text,
/// escaped, with `http(s)://` and `www.` URLs, bare `.com`/`.net`/`.org` names and e-mail
/// addresses made links (`rel="noopener"`); punctuation around a word stays outside.
fn urlize(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let text = py_str(value)?;
    let limit = arg::<Value>(&args, &kwargs, 0, "trim_url_limit")?.and_then(|v| v.as_usize());
    let nofollow = arg::<bool>(&args, &kwargs, 1, "nofollow")?.unwrap_or(false);
    let target = arg::<Value>(&args, &kwargs, 2, "target")?.filter(|v| !v.is_none());
    let rel = arg::<Value>(&args, &kwargs, 3, "rel")?.filter(|v| !v.is_none());
    let _ = kwargs.get::<Option<Value>>("extra_schemes")?;
    kwargs.assert_all_used()?;
    let mut rel_words: Vec<String> = rel
        .map(|r| py_str(&r))
        .transpose()?
        .map(|r| r.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    if nofollow {
        rel_words.push("nofollow".into());
    }
    rel_words.push("noopener".into());
    rel_words.sort();
    rel_words.dedup();
    let rel_attr = format!(" rel=\"{}\"", html_escape(&rel_words.join(" ")));
    let target_attr = match target {
        Some(t) => format!(" target=\"{}\"", html_escape(&py_str(&t)?)),
        None => String::new(),
    };
    let mut out = String::with_capacity(text.len());
    let mut rest = text.as_str();
    while !rest.is_empty() {
        let space = rest.find(|c: char| c.is_whitespace()).unwrap_or(rest.len());
        let (word, after) = rest.split_at(space);
        let gap = after
            .find(|c: char| !c.is_whitespace())
            .unwrap_or(after.len());
        let lead_len = word.len() - word.trim_start_matches(['(', '<']).len();
        let core_end = word
            .trim_end_matches(['.', ',', ')', '>', '\n', '!', '?', ';', ':'])
            .len();
        let (lead, core, trail) = if lead_len <= core_end {
            (
                &word[..lead_len],
                &word[lead_len..core_end],
                &word[core_end..],
            )
        } else {
            ("", word, "")
        };
        match link_for(core) {
            Some((href, mail)) => {
                let shown = match limit {
                    Some(n) if core.chars().count() > n => {
                        format!("{}...", core.chars().take(n).collect::<String>())
                    }
                    _ => core.to_owned(),
                };
                out.push_str(&html_escape(lead));
                if mail {
                    out.push_str(&format!(
                        "<a href=\"{}\">{}</a>",
                        html_escape(&href),
                        html_escape(&shown)
                    ));
                } else {
                    out.push_str(&format!(
                        "<a href=\"{}\"{rel_attr}{target_attr}>{}</a>",
                        html_escape(&href),
                        html_escape(&shown)
                    ));
                }
                out.push_str(&html_escape(trail));
            }
            None => out.push_str(&html_escape(word)),
        }
        out.push_str(&after[..gap]);
        rest = &after[gap..];
    }
    Ok(Value::from_safe_string(out))
}

/// Python's `urllib.parse.quote`: letters, digits and `_.-~` kept (and `/` unless
/// `for_query`), the rest as `%XX` of its UTF-8 bytes; in a query, a space is `+`.
fn url_quote(text: &str, for_query: bool) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' | b'.' | b'-' | b'~' => {
                out.push(b as char)
            }
            b'/' if !for_query => out.push('/'),
            b' ' if for_query => out.push('+'),
            b => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Jinja's `urlencode`: a string is quoted as a path (`/` kept); a dict, or a list of
/// pairs, becomes a query string (`a=x+y&b=2`).
fn urlencode(value: &Value) -> Result<String, Error> {
    if value.kind() == ValueKind::String {
        return Ok(url_quote(value.as_str().unwrap_or_default(), false));
    }
    let pairs: Vec<(Value, Value)> = match value.kind() {
        ValueKind::Map => value
            .try_iter()?
            .map(|k| value.get_item(&k).map(|v| (k, v)))
            .collect::<Result<_, _>>()?,
        ValueKind::Seq | ValueKind::Iterable => value
            .try_iter()?
            .map(|pair| {
                let items: Vec<Value> = pair.try_iter()?.collect();
                match items.as_slice() {
                    [k, v] => Ok((k.clone(), v.clone())),
                    _ => Err(invalid("urlencode needs a dict or a list of pairs")),
                }
            })
            .collect::<Result<_, _>>()?,
        _ => return Ok(url_quote(&py_str(value)?, false)),
    };
    let mut parts = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        parts.push(format!(
            "{}={}",
            url_quote(&py_str(&k)?, true),
            url_quote(&py_str(&v)?, true)
        ));
    }
    Ok(parts.join("&"))
}

/// A number as a float (integers, booleans and floats; not strings).
fn to_float(value: &Value) -> Option<f64> {
    match value.kind() {
        ValueKind::Number | ValueKind::Bool => f64::try_from(value.clone()).ok(),
        _ => None,
    }
}

/// Python's rule for `_` in a number literal: only single ones, between two digits.
fn strip_underscores(text: &str, is_digit: impl Fn(char) -> bool) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    for (i, &c) in chars.iter().enumerate() {
        if c == '_' {
            let before = i.checked_sub(1).and_then(|j| chars.get(j)).copied();
            let after = chars.get(i + 1).copied();
            if !(before.is_some_and(&is_digit) && after.is_some_and(&is_digit)) {
                return None;
            }
        } else {
            out.push(c);
        }
    }
    Some(out)
}

/// Python's `int(text, base)`: surrounding whitespace, a sign, `_` between digits, and for
/// base 0 (or a matching base) a `0x`/`0o`/`0b` prefix.
pub(crate) fn parse_py_int(text: &str, base: u32) -> Option<i128> {
    let text = text.trim();
    let (negative, digits) = match text.as_bytes().first()? {
        b'-' => (true, &text[1..]),
        b'+' => (false, &text[1..]),
        _ => (false, text),
    };
    let lower = digits.to_ascii_lowercase();
    let prefixed = |p: &str| {
        lower
            .strip_prefix(p)
            .map(|rest| rest.trim_start_matches('_'))
    };
    let (base, body) = match (base, &lower) {
        (0 | 16, _) if lower.starts_with("0x") => (16, prefixed("0x")?.to_owned()),
        (0 | 8, _) if lower.starts_with("0o") => (8, prefixed("0o")?.to_owned()),
        (0 | 2, _) if lower.starts_with("0b") => (2, prefixed("0b")?.to_owned()),
        (0, _) => {
            // Base 0 without a prefix is decimal, and a non-zero number may not start with 0.
            let plain = lower.replace('_', "");
            if plain.len() > 1 && plain.starts_with('0') && plain.bytes().any(|b| b != b'0') {
                return None;
            }
            (10, lower.clone())
        }
        (2..=36, _) => (base, lower.clone()),
        _ => return None,
    };
    if body.is_empty() {
        return None;
    }
    let body = strip_underscores(&body, |c| c.is_digit(base))?;
    let n = i128::from_str_radix(&body, base).ok()?;
    Some(if negative { -n } else { n })
}

/// Python's `float(text)`: surrounding whitespace, `_` between digits, `inf`/`infinity`/`nan`
/// in any case with a sign.
pub(crate) fn parse_py_float(text: &str) -> Option<f64> {
    let text = text.trim();
    let unsigned = text.trim_start_matches(['+', '-']);
    if text.len() - unsigned.len() > 1 {
        return None;
    }
    let lower = unsigned.to_ascii_lowercase();
    if matches!(lower.as_str(), "inf" | "infinity" | "nan") {
        let n: f64 = if lower == "nan" {
            f64::NAN
        } else {
            f64::INFINITY
        };
        return Some(if text.starts_with('-') { -n } else { n });
    }
    if lower.is_empty()
        || !lower
            .chars()
            .all(|c| c.is_ascii_digit() || "._e+-".contains(c))
    {
        return None;
    }
    strip_underscores(text, |c| c.is_ascii_digit())?
        .parse()
        .ok()
}

/// A float as Python's `int()` gives it (towards zero); an error for inf and nan.
fn float_to_int(f: f64) -> Result<Value, Error> {
    if !f.is_finite() {
        return Err(invalid(format!("cannot convert float {f} to integer")));
    }
    Ok(Value::from(f.trunc() as i128))
}

/// Jinja's `int(default=0, base=10)`: Python's `int(value)` (a string in `base`), else
/// `int(float(value))`, else the default. An undefined value is an error, as in Prefect.
fn int(state: &State, value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let default = arg::<Value>(&args, &kwargs, 0, "default")?.unwrap_or(Value::from(0));
    let base = arg::<u32>(&args, &kwargs, 1, "base")?.unwrap_or(10);
    kwargs.assert_all_used()?;
    reject_undefined(state, value, "int")?;
    match value.kind() {
        ValueKind::Bool => Ok(Value::from(i64::from(value.is_true()))),
        ValueKind::Number if value.is_integer() => Ok(value.clone()),
        ValueKind::Number => float_to_int(f64::try_from(value.clone())?),
        ValueKind::String => {
            let text = value.as_str().unwrap_or_default();
            match parse_py_int(text, base) {
                Some(n) => Ok(Value::from(n)),
                None => match parse_py_float(text) {
                    Some(f) if f.is_finite() => float_to_int(f),
                    Some(f) => Err(invalid(format!("cannot convert float {f} to integer"))),
                    None => Ok(default),
                },
            }
        }
        _ => Ok(default),
    }
}

/// Jinja's `float(default=0.0)`: Python's `float(value)`, else the default. An undefined
/// value is an error, as in Prefect.
fn float(state: &State, value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let default = arg::<Value>(&args, &kwargs, 0, "default")?.unwrap_or(Value::from(0.0));
    kwargs.assert_all_used()?;
    reject_undefined(state, value, "float")?;
    Ok(match value.kind() {
        ValueKind::Bool | ValueKind::Number => {
            Value::from(f64::try_from(value.clone()).unwrap_or(0.0))
        }
        ValueKind::String => {
            parse_py_float(value.as_str().unwrap_or_default()).map_or(default, Value::from)
        }
        _ => default,
    })
}

/// Converting Jinja's undefined value to a number raises `UndefinedError` in Prefect.
fn reject_undefined(state: &State, value: &Value, filter: &str) -> Result<(), Error> {
    let _ = state;
    if value.is_undefined() {
        return Err(Error::new(
            ErrorKind::UndefinedError,
            format!("`{filter}` of an undefined value (Prefect fails here too)"),
        ));
    }
    Ok(())
}

/// Jinja's `default(default_value='', boolean=False)`, positional or by name.
fn default(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let fallback = arg::<Value>(&args, &kwargs, 0, "default_value")?.unwrap_or(Value::from(""));
    let boolean = arg::<Value>(&args, &kwargs, 1, "boolean")?.is_some_and(|b| b.is_true());
    kwargs.assert_all_used()?;
    if args.len() > 2 {
        return Err(Error::from(ErrorKind::TooManyArguments));
    }
    Ok(if value.is_undefined() || (boolean && !value.is_true()) {
        fallback
    } else {
        value.clone()
    })
}

/// Jinja's `indent(width=4, first=False, blank=False)`; `width` may be a string to put in
/// front of each line.
fn indent(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<String, Error> {
    let text = py_str(value)?;
    let prefix = match arg::<Value>(&args, &kwargs, 0, "width")? {
        None => "    ".to_owned(),
        Some(w) if w.kind() == ValueKind::String => w.as_str().unwrap_or_default().to_owned(),
        Some(w) => " "
            .repeat(width(w.as_usize().ok_or_else(|| {
                invalid("indent width must be a number or a string")
            })?)?),
    };
    let first = arg::<Value>(&args, &kwargs, 1, "first")?.is_some_and(|b| b.is_true());
    let blank = arg::<Value>(&args, &kwargs, 2, "blank")?.is_some_and(|b| b.is_true());
    kwargs.assert_all_used()?;
    let mut out = String::with_capacity(text.len());
    for (i, line) in text.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        if (i > 0 || first) && (blank || !line.is_empty()) {
            width(out.len() + prefix.len())?;
            out.push_str(&prefix);
        }
        out.push_str(line);
    }
    Ok(out)
}

/// Each `[key, value]` pair of a list made a Python tuple.
fn pairs_as_tuples(pairs: Value) -> Result<Value, Error> {
    let mut out = Vec::new();
    for pair in pairs.try_iter()? {
        out.push(Value::from(Tuple::from(
            pair.try_iter()?.collect::<Vec<_>>(),
        )));
    }
    Ok(Value::from(out))
}

/// Jinja's `dictsort`: `(key, value)` tuples.
fn dictsort(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    pairs_as_tuples(minijinja::filters::dictsort(value, kwargs)?)
}

/// Jinja's `items`: `(key, value)` tuples.
fn items(value: &Value) -> Result<Value, Error> {
    pairs_as_tuples(minijinja::filters::items(value)?)
}

/// `item.a.b` / `item.0` for Jinja's `attribute=` arguments.
fn path_of(item: &Value, path: &str) -> Result<Value, Error> {
    let mut current = item.clone();
    for part in path.split('.') {
        current = match part.parse::<i64>() {
            Ok(i) => current.get_item(&Value::from(i))?,
            Err(_) => current.get_attr(part)?,
        };
    }
    Ok(current)
}

/// Jinja's `join(d='', attribute=None)`, each item as Python's `str()` gives it.
fn join(
    value: &Value,
    separator: Option<Value>,
    attribute: Option<String>,
    kwargs: Kwargs,
) -> Result<Value, Error> {
    let separator = match separator {
        Some(s) => Some(s),
        None => kwargs.get::<Option<Value>>("d")?,
    };
    let attribute = match attribute {
        Some(a) => Some(a),
        None => kwargs.get::<Option<String>>("attribute")?,
    };
    kwargs.assert_all_used()?;
    let separator = separator
        .map(|s| py_str(&s))
        .transpose()?
        .unwrap_or_default();
    if value.is_undefined() || value.is_none() {
        return Ok(Value::from(""));
    }
    if let Some(s) = value.as_str() {
        let chars: Vec<String> = s.chars().map(String::from).collect();
        return Ok(Value::from(chars.join(&separator)));
    }
    let mut out = String::new();
    for (i, item) in value.try_iter()?.enumerate() {
        if i > 0 {
            out.push_str(&separator);
        }
        let item = match &attribute {
            Some(path) => path_of(&item, path)?,
            None => item,
        };
        out.push_str(&py_str(&item)?);
        width(out.len())?;
    }
    Ok(Value::from(out))
}

/// One `%` conversion of a format string: where it is, its mapping key, its type.
struct Spec {
    start: usize,
    end: usize,
    key: Option<String>,
    conversion: char,
}

/// The `%` conversions of a format string (`%%` left out), with any width or precision
/// larger than the output cap refused.
fn specs(format: &str) -> Result<Vec<Spec>, Error> {
    let bytes = format.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] != b'%' {
            i += 1;
            continue;
        }
        let start = i;
        i += 1;
        let mut key = None;
        if bytes.get(i) == Some(&b'(') {
            let close = format[i..]
                .find(')')
                .ok_or_else(|| invalid("incomplete format key"))?;
            key = Some(format[i + 1..i + close].to_owned());
            i += close + 1;
        }
        while i < bytes.len() && b"#0- +".contains(&bytes[i]) {
            i += 1;
        }
        let mut number = String::new();
        while i < bytes.len() && (bytes[i].is_ascii_digit() || bytes[i] == b'.') {
            if bytes[i] == b'.' {
                number.clear();
            } else {
                number.push(bytes[i] as char);
                width(number.parse().unwrap_or(usize::MAX))?;
            }
            i += 1;
        }
        while i < bytes.len() && b"hlL".contains(&bytes[i]) {
            i += 1;
        }
        let Some(&c) = bytes.get(i) else {
            return Err(invalid("incomplete format"));
        };
        i += 1;
        if c != b'%' {
            out.push(Spec {
                start,
                end: i,
                key,
                conversion: c as char,
            });
        }
    }
    Ok(out)
}

/// A value prepared for one conversion: `%s` and `%r` get Python's `str()`/`repr()` text,
/// `%d` of a float its integer part.
fn prepared(value: &Value, conversion: char) -> Result<Value, Error> {
    Ok(match conversion {
        's' if !value.is_safe() => Value::from(py_str(value)?),
        'r' | 'a' => Value::from(py_repr(value)?),
        'd' | 'i' | 'u' if is_float(value) => float_to_int(f64::try_from(value.clone())?)?,
        'd' | 'i' | 'u' if value.kind() == ValueKind::Bool => {
            Value::from(i64::from(value.is_true()))
        }
        _ => value.clone(),
    })
}

/// Jinja's `format`: Python's `%` formatting (`%s`, `%r`, `%d`, `%5.2f`, `%(name)s`, …),
/// with values converted as Python converts them.
fn format(value: &Value, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let text = py_str(value)?;
    let specs = specs(&text)?;
    let mut args = args.0;
    let names: Vec<String> = kwargs.args().map(str::to_owned).collect();
    if !names.is_empty() {
        if !args.is_empty() {
            return Err(invalid(
                "format: give either positional or keyword arguments, not both",
            ));
        }
        let mut pairs = Vec::with_capacity(names.len());
        for name in names {
            let item = kwargs.get::<Value>(&name)?;
            pairs.push((name, item));
        }
        args = vec![Value::from_pairs(pairs)];
    }
    let mut rewritten = String::with_capacity(text.len());
    let mut last = 0;
    let mut positional = Vec::new();
    let mapping = match args.as_slice() {
        [one] if one.kind() == ValueKind::Map => Some(one.clone()),
        _ => None,
    };
    let mut named: Vec<(String, Value)> = Vec::new();
    let mut next = 0;
    for spec in &specs {
        rewritten.push_str(&text[last..spec.start]);
        let conversion = if spec.conversion == 'r' || spec.conversion == 'a' {
            's'
        } else {
            spec.conversion
        };
        let code = &text[spec.start..spec.end - 1];
        match (&spec.key, &mapping) {
            (Some(key), Some(map)) => {
                let item = map.get_item(&Value::from(key.as_str()))?;
                if item.is_undefined() {
                    return Err(invalid(format!("format: no value for key {key:?}")));
                }
                // A key may be used with different conversions: each use gets its own name.
                let alias = format!("k{}", named.len());
                named.push((alias.clone(), prepared(&item, spec.conversion)?));
                let after_key = code.find(')').map_or(code.len(), |i| i + 1);
                rewritten.push_str(&format!("%({alias}){}", &code[after_key..]));
            }
            (Some(_), None) => return Err(invalid("format requires a mapping")),
            (None, _) => {
                let item = args
                    .get(next)
                    .ok_or_else(|| invalid("not enough arguments for format string"))?;
                next += 1;
                positional.push(prepared(item, spec.conversion)?);
                rewritten.push_str(code);
            }
        }
        rewritten.push(conversion);
        last = spec.end;
    }
    rewritten.push_str(&text[last..]);
    if mapping.is_none() && next < args.len() {
        return Err(invalid(
            "not all arguments converted during string formatting",
        ));
    }
    let values = if named.is_empty() {
        positional
    } else {
        vec![Value::from_pairs(named)]
    };
    let out = minijinja::formatting::format(
        minijinja::formatting::FormatStyle::Printf,
        &rewritten,
        &values,
    )?;
    width(out.len())?;
    Ok(Value::from(out))
}

/// Jinja's `pprint` (Python's `pprint.pformat`) for values that fit one line: the repr with
/// dict keys sorted.
fn pprint(value: &Value) -> Result<String, Error> {
    fn sorted(value: &Value) -> Result<Value, Error> {
        Ok(match value.kind() {
            ValueKind::Map if crate::python::is_plain_container(value) => {
                let mut pairs: Vec<(Value, Value)> = value
                    .try_iter()?
                    .map(|k| Ok((k.clone(), sorted(&value.get_item(&k)?)?)))
                    .collect::<Result<_, Error>>()?;
                pairs.sort_by(|a, b| a.0.cmp(&b.0));
                Value::from_pairs(pairs)
            }
            ValueKind::Seq if !value.is_tuple() && crate::python::is_plain_container(value) => {
                Value::from(
                    value
                        .try_iter()?
                        .map(|v| sorted(&v))
                        .collect::<Result<Vec<_>, _>>()?,
                )
            }
            _ => value.clone(),
        })
    }
    py_repr(&sorted(value)?)
}

/// Jinja's `attr(name)`: an attribute only, never an item, so a dict's key is undefined
/// (Python's dicts, lists and strings have methods, not data attributes).
fn attr(value: &Value, name: &str) -> Result<Value, Error> {
    if crate::python::is_plain_container(value) || value.kind() == ValueKind::String {
        return Ok(Value::UNDEFINED);
    }
    value.get_attr(name)
}

/// Jinja's `sequence` test: anything with a length and items, so strings and dicts too.
fn is_sequence(value: &Value) -> bool {
    value.is_undefined()
        || matches!(
            value.kind(),
            ValueKind::Seq | ValueKind::Map | ValueKind::String | ValueKind::Bytes
        )
}

/// Jinja's `callable` test: functions and macros; data is not callable.
fn is_callable(value: &Value) -> bool {
    value.kind() == ValueKind::Plain
        && value
            .downcast_object_ref::<crate::context::DateTimeView>()
            .is_none()
        && value
            .downcast_object_ref::<crate::context::LabelDiver>()
            .is_none()
}

/// Jinja's `cycler(*items)`.
fn cycler(items: Rest<Value>) -> Result<Value, Error> {
    minijinja_contrib::globals::cycler(items.0)
}

/// Jinja's `lipsum(n=5, html=True, min=20, max=100)`, positional or by name.
fn lipsum(state: &mut State, args: Rest<Value>, kwargs: Kwargs) -> Result<Value, Error> {
    let n = arg::<usize>(&args, &kwargs, 0, "n")?.unwrap_or(5);
    let html = arg::<bool>(&args, &kwargs, 1, "html")?.unwrap_or(true);
    let min = arg::<usize>(&args, &kwargs, 2, "min")?.unwrap_or(20);
    let max = arg::<usize>(&args, &kwargs, 3, "max")?.unwrap_or(100);
    kwargs.assert_all_used()?;
    if n.saturating_mul(max) > 10_000 {
        return Err(invalid("lipsum: at most 10000 words"));
    }
    minijinja_contrib::globals::lipsum(
        state,
        Some(n),
        Kwargs::from_iter([
            ("html", Value::from(html)),
            ("min", Value::from(min)),
            ("max", Value::from(max)),
        ]),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn python_number_parsing() {
        assert_eq!(parse_py_int(" 5 ", 10), Some(5));
        assert_eq!(parse_py_int("1_000", 10), Some(1000));
        assert_eq!(parse_py_int("1__0", 10), None);
        assert_eq!(parse_py_int("_1", 10), None);
        assert_eq!(parse_py_int("0x1A", 0), Some(26));
        assert_eq!(parse_py_int("0x1A", 16), Some(26));
        assert_eq!(parse_py_int("1A", 16), Some(26));
        assert_eq!(parse_py_int("0b101", 0), Some(5));
        assert_eq!(parse_py_int("010", 0), None);
        assert_eq!(parse_py_int("-12", 8), Some(-10));
        assert_eq!(parse_py_int("2.5", 10), None);
        assert_eq!(parse_py_float(" 2.5 "), Some(2.5));
        assert_eq!(parse_py_float("1_0.5"), Some(10.5));
        assert_eq!(parse_py_float("-Infinity"), Some(f64::NEG_INFINITY));
        assert!(parse_py_float("nan").is_some_and(f64::is_nan));
        assert_eq!(parse_py_float("hello"), None);
        assert_eq!(parse_py_float("--1"), None);
    }

    #[test]
    fn python_center_and_quote() {
        assert_eq!(center_text("ab", 7, ' ').ok().as_deref(), Some("   ab  "));
        assert_eq!(center_text("ab", 6, ' ').ok().as_deref(), Some("  ab  "));
        assert!(center_text("ab", MAX_OUTPUT_BYTES + 1, ' ').is_err());
        assert_eq!(url_quote("a b/c&é~", false), "a%20b/c%26%C3%A9~");
        assert_eq!(url_quote("x y/", true), "x+y%2F");
    }
}
