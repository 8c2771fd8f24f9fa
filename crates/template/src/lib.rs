//! `spur-template`: the one Jinja environment every Spur component renders with.
//!
//! Prefect renders action fields with Jinja2 in a sandbox where missing names render as `""`
//! (`ChainableUndefined`). Spur does the same with minijinja, plus:
//!
//! * `<< expr >>` is accepted as a spelling of `{{ expr }}` (an unquoted `{{` in YAML starts a
//!   mapping). The rewrite is quote-aware and length-preserving, so error positions stay right,
//!   and it only applies when `<<` is followed by a space or `-` (so `cat <<EOF` is left alone).
//! * Prefect's limits: `range()` yields at most 100 items; at most 10 `for` loops per template,
//!   nested at most 2 deep (checked when a file loads); plus a fuel budget and an output cap
//!   that Prefect lacks, so a runaway template fails its action instead of the daemon.
//! * Prefect's filters: the humanize set (`humanize_naturaltime`, `humanize_intcomma`, …, also
//!   without the prefix), `flow_run_id`, `fromjson` beside Jinja's `tojson`.
//! * Prefect's run-deployment parameter rules ([`render_parameters`]): a string that is one lone
//!   `{{ expr }}` keeps the JSON type of its value; `__prefect_kind: json | jinja | none` objects
//!   are hydrated; everything else with `{{`/`{%` renders to a string.
#![warn(missing_docs)]

mod cloud_event;
mod compat;
mod context;
pub mod humanize;
mod jinja;
mod methods;
mod ordering;
mod python;

use std::borrow::Cow;
use std::sync::Arc;

use minijinja::value::Serde;
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};
use serde_json::{Map, Value as Json};
use spur_core::{Automation, Event, FieldPath, Problems};
use thiserror::Error as ThisError;

pub use compat::prefect_incompatibilities;
pub use context::{EventView, LabelDiver, ResourceView, resource_value};
/// The template engine's value type (a rendered context).
pub use minijinja::Value as TemplateValue;

/// A JSON value as a template context.
pub fn json_context(value: &Json) -> TemplateValue {
    Value::from(Serde(value))
}

/// Prefect's `MAX_TEMPLATE_RANGE`.
pub const MAX_RANGE: usize = 100;
/// Prefect's `MAX_LOOP_COUNT`.
pub const MAX_LOOPS: usize = 10;
/// Prefect's `MAX_NESTED_LOOP_DEPTH`.
pub const MAX_LOOP_DEPTH: usize = 2;
/// Spur's render budget (minijinja fuel); a typical parameter template uses under 100.
pub const FUEL: u64 = 1_000_000;
/// Spur's cap on one rendered template, in bytes.
pub const MAX_OUTPUT_BYTES: usize = 1_048_576;

/// Why a template could not be validated or rendered.
#[derive(Clone, Debug, ThisError, PartialEq, Eq)]
pub enum TemplateError {
    /// The template does not parse, or breaks a load-time limit.
    #[error("invalid template: {0}")]
    Invalid(String),
    /// Rendering failed (undefined filter, fuel exhausted, output too large, …).
    #[error("template rendering failed: {0}")]
    Render(String),
    /// A `__prefect_kind` object is malformed, or JSON output does not parse.
    #[error("{0}")]
    Hydration(String),
}

/// Rewrites `<< expr >>` to `{{ expr }}` (same length). Returns the input when there is none.
pub fn rewrite_angle_syntax(source: &str) -> Cow<'_, str> {
    if !source.contains("<<") {
        return Cow::Borrowed(source);
    }
    let bytes = source.as_bytes();
    let mut out = bytes.to_vec();
    let mut i = 0;
    let mut changed = false;
    while i + 2 < bytes.len() {
        if bytes[i] == b'<'
            && bytes[i + 1] == b'<'
            && matches!(bytes[i + 2], b' ' | b'-')
            && let Some(close) = find_closing(bytes, i + 2)
        {
            out[i] = b'{';
            out[i + 1] = b'{';
            out[close] = b'}';
            out[close + 1] = b'}';
            changed = true;
            i = close + 2;
            continue;
        }
        i += 1;
    }
    if !changed {
        return Cow::Borrowed(source);
    }
    // Only ASCII bytes were replaced by ASCII bytes, so this stays valid UTF-8.
    Cow::Owned(String::from_utf8(out).unwrap_or_else(|_| source.to_owned()))
}

/// Finds the `>>` closing an expression that starts at `from`, skipping quoted strings.
fn find_closing(bytes: &[u8], from: usize) -> Option<usize> {
    let mut i = from;
    let mut quote: Option<u8> = None;
    while i + 1 < bytes.len() {
        let b = bytes[i];
        match quote {
            Some(q) => {
                if b == b'\\' {
                    i += 1;
                } else if b == q {
                    quote = None;
                }
            }
            None => match b {
                b'\'' | b'"' => quote = Some(b),
                b'\n' => return None,
                b'>' if bytes[i + 1] == b'>' => return Some(i),
                _ => {}
            },
        }
        i += 1;
    }
    None
}

/// Prefect's `maybe_template`: only strings with `{{` or `{%` (after the `<< >>` rewrite) are
/// templates; anything else is used verbatim.
pub fn maybe_template(source: &str) -> bool {
    let s = rewrite_angle_syntax(source);
    s.contains("{{") || s.contains("{%")
}

/// Counts `for` loops and their nesting in a template (Prefect's validation-time limits).
fn check_loop_limits(source: &str) -> Result<(), TemplateError> {
    let mut loops = 0;
    let mut depth = 0usize;
    let mut rest = source;
    while let Some(open) = rest.find("{%") {
        let after = &rest[open + 2..];
        let Some(close) = after.find("%}") else { break };
        let tag = after[..close].trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let word = tag.split_whitespace().next().unwrap_or("");
        match word {
            "for" => {
                loops += 1;
                depth += 1;
                if loops > MAX_LOOPS {
                    return Err(TemplateError::Invalid(format!(
                        "contains more than {MAX_LOOPS} for loops"
                    )));
                }
                if depth > MAX_LOOP_DEPTH {
                    return Err(TemplateError::Invalid(format!(
                        "for loops are nested deeper than {MAX_LOOP_DEPTH}"
                    )));
                }
            }
            "endfor" => depth = depth.saturating_sub(1),
            _ => {}
        }
        rest = &after[close + 2..];
    }
    Ok(())
}

/// The sandboxed environment, configured like Prefect's.
pub struct TemplateEngine {
    env: Environment<'static>,
}

impl Default for TemplateEngine {
    fn default() -> Self {
        TemplateEngine::new()
    }
}

impl std::fmt::Debug for TemplateEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemplateEngine")
    }
}

fn capped_range(lower: i64, upper: Option<i64>, step: Option<i64>) -> Result<Value, Error> {
    let (start, end) = match upper {
        Some(u) => (lower, u),
        None => (0, lower),
    };
    let step = step.unwrap_or(1);
    if step == 0 {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "range() step must not be zero",
        ));
    }
    let mut items = Vec::new();
    let mut i = start;
    while (step > 0 && i < end) || (step < 0 && i > end) {
        if items.len() == MAX_RANGE {
            return Err(Error::new(
                ErrorKind::InvalidOperation,
                format!("range too big (the limit is {MAX_RANGE} items)"),
            ));
        }
        items.push(Value::from(i));
        i += step;
    }
    Ok(Value::from(items))
}

/// Converts a template value to JSON the way Prefect's `tojson` does: timestamps in ISO form,
/// and an undefined value is an error (Python's `ChainableUndefined` is not serializable).
fn to_json_value(value: &Value) -> Result<Json, Error> {
    if value.is_undefined() {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "Object of type ChainableUndefined is not JSON serializable (a value is missing)",
        ));
    }
    if let Some(t) = value.downcast_object_ref::<context::DateTimeView>() {
        return Ok(Json::String(t.iso()));
    }
    if let Some(d) = value.downcast_object_ref::<context::DateView>() {
        return Ok(Json::String(d.0.format("%Y-%m-%d").to_string()));
    }
    match value.kind() {
        minijinja::value::ValueKind::Map => {
            let mut map = Map::new();
            for key in value.try_iter()? {
                let item = value.get_item(&key)?;
                let key = key
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| key.to_string());
                map.insert(key, to_json_value(&item)?);
            }
            Ok(Json::Object(map))
        }
        minijinja::value::ValueKind::Seq | minijinja::value::ValueKind::Iterable => {
            Ok(Json::Array(
                value
                    .try_iter()?
                    .map(|v| to_json_value(&v))
                    .collect::<Result<_, _>>()?,
            ))
        }
        _ => serde_json::to_value(value)
            .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"))),
    }
}

/// Prefect's `tojson` (Jinja's `htmlsafe_json_dumps`): Python's `json.dumps` with sorted
/// keys, its `", "` and `": "` separators, `ensure_ascii` (every non-ASCII character as
/// `\uXXXX`), and `<`, `>`, `&`, `'` escaped (HTML-safe); `indent` optional.
fn tojson(value: &Value, indent: Option<usize>) -> Result<Value, Error> {
    let mut json = to_json_value(value)?;
    // Jinja's `tojson` dumps with `sort_keys=True` (Prefect keeps that policy), while
    // printing a dict keeps its order.
    sort_keys(&mut json);
    let mut out = Vec::new();
    let formatter = PythonJson {
        indent: indent.map(|n| vec![b' '; n]),
        depth: 0,
        has_value: false,
    };
    let written = serde::Serialize::serialize(
        &json,
        &mut serde_json::Serializer::with_formatter(&mut out, formatter),
    );
    written.map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}")))?;
    let text = String::from_utf8(out).unwrap_or_default();
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '<' | '>' | '&' | '\'' => escaped.push_str(&format!("\\u{:04x}", c as u32)),
            c if c.is_ascii() => escaped.push(c),
            c => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    escaped.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    Ok(Value::from_safe_string(escaped))
}

/// `json.dumps` as Python writes it: `", "` between items and `": "` after keys, or with
/// `indent`, one item a line (`","` then a newline) — and floats as Python's `repr`.
struct PythonJson {
    indent: Option<Vec<u8>>,
    depth: usize,
    has_value: bool,
}

impl PythonJson {
    fn new_line<W: ?Sized + std::io::Write>(&self, writer: &mut W) -> std::io::Result<()> {
        if let Some(indent) = &self.indent {
            writer.write_all(b"\n")?;
            for _ in 0..self.depth {
                writer.write_all(indent)?;
            }
        }
        Ok(())
    }

    fn separator<W: ?Sized + std::io::Write>(
        &self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        match (&self.indent, first) {
            (None, true) => Ok(()),
            (None, false) => writer.write_all(b", "),
            (Some(_), first) => {
                if !first {
                    writer.write_all(b",")?;
                }
                self.new_line(writer)
            }
        }
    }

    fn open<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth += 1;
        self.has_value = false;
        writer.write_all(bracket)
    }

    fn close<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        bracket: &[u8],
    ) -> std::io::Result<()> {
        self.depth -= 1;
        if self.has_value {
            self.new_line(writer)?;
        }
        self.has_value = true;
        writer.write_all(bracket)
    }
}

impl serde_json::ser::Formatter for PythonJson {
    fn write_f64<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        value: f64,
    ) -> std::io::Result<()> {
        writer.write_all(python::float_repr(value).as_bytes())
    }

    fn begin_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"[")
    }

    fn end_array<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn end_array_value<W: ?Sized + std::io::Write>(
        &mut self,
        _writer: &mut W,
    ) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }

    fn begin_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.open(writer, b"{")
    }

    fn end_object<W: ?Sized + std::io::Write>(&mut self, writer: &mut W) -> std::io::Result<()> {
        self.close(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> std::io::Result<()> {
        self.separator(writer, first)
    }

    fn begin_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
    ) -> std::io::Result<()> {
        writer.write_all(b": ")
    }

    fn end_object_value<W: ?Sized + std::io::Write>(
        &mut self,
        _writer: &mut W,
    ) -> std::io::Result<()> {
        self.has_value = true;
        Ok(())
    }
}

/// Sorts every object's keys, recursively.
fn sort_keys(value: &mut Json) {
    match value {
        Json::Object(map) => {
            map.sort_keys();
            map.values_mut().for_each(sort_keys);
        }
        Json::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

fn fromjson(text: &str) -> Result<Value, Error> {
    serde_json::from_str::<Json>(text)
        .map(|v| Value::from(Serde(v)))
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, format!("fromjson: {e}")))
}

impl TemplateEngine {
    /// A new environment with Prefect's behaviour and Spur's limits.
    pub fn new() -> TemplateEngine {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Chainable);
        env.set_fuel(Some(FUEL));
        env.set_recursion_limit(100);
        // Lists and dicts print as Python prints them (`{'k': 'v'}`), as in Prefect.
        env.set_formatter(python::formatter);
        env.add_filter("string", python::string_filter);
        // Jinja's filters, tests and globals that minijinja lacks or spells otherwise, and
        // Python's methods on strings, lists and dicts.
        jinja::register(&mut env);
        env.set_unknown_method_callback(methods::unknown_method);
        env.add_function("range", capped_range);
        env.add_filter("fromjson", fromjson);
        env.add_filter("tojson", tojson);
        env.add_filter(ordering::FILTER, ordering::ordered);
        humanize::register(&mut env);
        env.add_filter("from_cloud_event", cloud_event::from_cloud_event);
        TemplateEngine { env }
    }

    /// Checks syntax, loop limits and filter and test names without rendering. (minijinja
    /// looks filters up as it renders, so a template naming an unknown filter would otherwise
    /// parse and then fail every render.)
    pub fn validate(&self, source: &str) -> Result<(), TemplateError> {
        let source = rewrite_angle_syntax(source);
        check_loop_limits(&source)?;
        self.env
            .template_from_str(&source)
            .map_err(|e| TemplateError::Invalid(describe(&e)))?;
        for (kind, name) in filter_and_test_names(&source) {
            if !self.knows(kind, name) {
                return Err(TemplateError::Invalid(format!("unknown {kind} {name:?}")));
            }
        }
        Ok(())
    }

    /// Is `name` a filter (or test) of this environment? Asked by rendering it once on
    /// `none`: only an unknown name fails with `UnknownFilter` (`UnknownTest`).
    fn knows(&self, kind: &str, name: &str) -> bool {
        let (probe, unknown) = match kind {
            "filter" => (format!("{{{{ none | {name} }}}}"), ErrorKind::UnknownFilter),
            _ => (format!("{{{{ none is {name} }}}}"), ErrorKind::UnknownTest),
        };
        match self.env.render_str(&probe, ()) {
            Ok(_) => true,
            Err(e) => e.kind() != unknown,
        }
    }

    /// Renders `source` (a template, `<< >>` allowed) with `context`. Output is written into
    /// a buffer that refuses to grow past [`MAX_OUTPUT_BYTES`], so rendering stops there
    /// instead of building the whole output first.
    pub fn render(&self, source: &str, context: &Value) -> Result<String, TemplateError> {
        let source = rewrite_angle_syntax(source);
        check_loop_limits(&source)?;
        // `<`, `>` and the ordering tests fail on an undefined value, as in Prefect.
        let source = ordering::guard(&source);
        let template = self
            .env
            .template_from_str(&source)
            .map_err(|e| TemplateError::Invalid(describe(&e)))?;
        let mut out = CappedWriter::default();
        if let Err(e) = template.render_captured_to(context, &mut out) {
            if out.exceeded {
                return Err(TemplateError::Render(format!(
                    "output is over the limit of {MAX_OUTPUT_BYTES} bytes"
                )));
            }
            return Err(TemplateError::Render(describe(&e)));
        }
        String::from_utf8(out.bytes).map_err(|e| TemplateError::Render(e.to_string()))
    }

    /// Renders a string field the way Prefect renders action text: verbatim unless it looks
    /// like a template.
    pub fn render_text(&self, source: &str, context: &Value) -> Result<String, TemplateError> {
        if maybe_template(source) {
            self.render(source, context)
        } else {
            Ok(source.to_owned())
        }
    }
}

/// Collects rendered output up to [`MAX_OUTPUT_BYTES`]; a write past it fails, which
/// minijinja turns into a render error at once.
#[derive(Default)]
struct CappedWriter {
    bytes: Vec<u8>,
    exceeded: bool,
}

impl std::io::Write for CappedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.bytes.len() + buf.len() > MAX_OUTPUT_BYTES {
            self.exceeded = true;
            return Err(std::io::Error::other("template output limit reached"));
        }
        self.bytes.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The filters (`x | name`, `{% filter name %}`) and tests (`x is [not] name`) a template
/// names, read from its `{{ }}` and `{% %}` tags with string literals skipped (comments and
/// `{% raw %}` blocks are left out). A scan, not a parse: the template has parsed already.
fn filter_and_test_names(source: &str) -> Vec<(&'static str, &str)> {
    let mut names = Vec::new();
    let bytes = source.as_bytes();
    let mut i = 0;
    let ident_at = |at: usize| -> &str {
        let end = bytes[at..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |n| at + n);
        &source[at..end]
    };
    let skip_space = |mut at: usize| {
        while at < bytes.len() && bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        at
    };
    while i + 1 < bytes.len() {
        let opener = &bytes[i..i + 2];
        if opener == b"{#" {
            i = source[i..].find("#}").map_or(bytes.len(), |n| i + n + 2);
            continue;
        }
        if opener != b"{{" && opener != b"{%" {
            i += 1;
            continue;
        }
        let close: &[u8] = if opener == b"{{" { b"}}" } else { b"%}" };
        let mut j = skip_space(i + 2 + usize::from(matches!(bytes.get(i + 2), Some(b'-' | b'+'))));
        if opener == b"{%" {
            match ident_at(j) {
                "raw" => {
                    i = source[j..].find("endraw").map_or(bytes.len(), |n| j + n);
                    continue;
                }
                "filter" => {
                    let at = skip_space(j + "filter".len());
                    let name = ident_at(at);
                    if !name.is_empty() {
                        names.push(("filter", name));
                    }
                }
                _ => {}
            }
        }
        let mut previous_word = "";
        while j < bytes.len() && !bytes[j..].starts_with(close) {
            match bytes[j] {
                quote @ (b'"' | b'\'') => {
                    j += 1;
                    while j < bytes.len() && bytes[j] != quote {
                        j += if bytes[j] == b'\\' { 2 } else { 1 };
                    }
                    j += 1;
                    previous_word = "";
                }
                b'|' => {
                    let at = skip_space(j + 1);
                    let name = ident_at(at);
                    if !name.is_empty() {
                        names.push(("filter", name));
                    }
                    j = at + name.len().max(1);
                    previous_word = "";
                }
                b if b.is_ascii_alphabetic() || b == b'_' => {
                    let word = ident_at(j);
                    if previous_word == "is" && word != "not" {
                        names.push(("test", word));
                    }
                    previous_word = if word == "not" && previous_word == "is" {
                        "is"
                    } else {
                        word
                    };
                    j += word.len();
                }
                b if b.is_ascii_whitespace() => j += 1,
                _ => {
                    previous_word = "";
                    j += 1;
                }
            }
        }
        i = j + 2;
    }
    names
}

fn describe(error: &Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

/// What a template can see (Prefect's `_template_context`).
#[derive(Clone, Debug, Default)]
pub struct TemplateContext {
    /// The automation, as JSON.
    pub automation: Option<Arc<Automation>>,
    /// The triggering event (may be absent for proactive firings).
    pub event: Option<Arc<Event>>,
    /// The firing's `for_each` labels.
    pub labels: Vec<(String, String)>,
    /// The firing, as JSON (`id`, `trigger`, `triggered`, `triggering_labels`, …).
    pub firing: Json,
    /// Every firing in the tree, as JSON.
    pub firings: Vec<Json>,
    /// Every event of those firings.
    pub events: Vec<Arc<Event>>,
    /// More top-level variables: what flow control did (`debounce`, `batch`, `throttle`).
    pub extra: Vec<(&'static str, Json)>,
}

impl TemplateContext {
    /// The context as a minijinja value.
    pub fn to_value(&self) -> Value {
        let event = self.event.as_ref().map_or(Value::from(()), |e| {
            Value::from_object(EventView(e.clone()))
        });
        let automation = self
            .automation
            .as_ref()
            .map_or(Value::from(()), |a| Value::from(Serde(&**a)));
        let events: Vec<Value> = self
            .events
            .iter()
            .map(|e| Value::from_object(EventView(e.clone())))
            .collect();
        let base = minijinja::context! {
            automation => automation,
            event => event,
            labels => Value::from_object(LabelDiver::new(self.labels.clone(), String::new())),
            firing => Value::from(Serde(&self.firing)),
            firings => Value::from(Serde(&self.firings)),
            events => Value::from(events),
        };
        if self.extra.is_empty() {
            return base;
        }
        let extra: std::collections::BTreeMap<&str, Value> = self
            .extra
            .iter()
            .map(|(name, value)| (*name, Value::from(Serde(value))))
            .collect();
        let extra = Value::from(extra);
        minijinja::context! { ..base, ..extra }
    }
}

/// Renders run-deployment `parameters` with Prefect's rules (§6.4 of prefect-semantics.md).
pub fn render_parameters(
    engine: &TemplateEngine,
    parameters: Option<&Json>,
    context: &Value,
) -> Result<Json, TemplateError> {
    let mut upgraded = parameters
        .cloned()
        .unwrap_or_else(|| Json::Object(Map::new()));
    if let Json::Object(map) = &mut upgraded {
        upgrade_v1_templates(map);
    }
    Ok(hydrate(engine, &upgraded, Some(context))?.unwrap_or(Json::Null))
}

/// Checks run-deployment `parameters` without rendering: templates parse and obey the limits,
/// `__prefect_kind` objects are well formed. Problems are relative to `parameters`.
pub fn validate_parameters(engine: &TemplateEngine, parameters: &Json, problems: &mut Problems) {
    let mut upgraded = parameters.clone();
    if let Json::Object(map) = &mut upgraded {
        upgrade_v1_templates(map);
    }
    validate_hydration(engine, &upgraded, &FieldPath::root(), problems);
}

/// Prefect's `_upgrade_v1_templates`: plain strings with template syntax become
/// `__prefect_kind` objects (typed `json` for a lone expression, `jinja` otherwise).
fn upgrade_v1_templates(map: &mut Map<String, Json>) {
    for value in map.values_mut() {
        match value {
            Json::Object(inner) if !inner.contains_key("__prefect_kind") => {
                upgrade_v1_templates(inner);
            }
            Json::Array(items) => {
                for item in items.iter_mut() {
                    match item {
                        Json::Object(inner) => upgrade_v1_templates(inner),
                        Json::String(s) if maybe_template(s) => *item = wrap_v1_template(s),
                        _ => {}
                    }
                }
            }
            Json::String(s) if maybe_template(s) => *value = wrap_v1_template(s),
            _ => {}
        }
    }
}

fn wrap_v1_template(template: &str) -> Json {
    let rewritten = rewrite_angle_syntax(template);
    let stripped = rewritten.trim();
    if stripped.starts_with("{{") && stripped.ends_with("}}") && stripped.matches("{{").count() == 1
    {
        let inner = stripped[2..stripped.len() - 2].trim();
        let mut jinja = Map::new();
        jinja.insert("__prefect_kind".into(), "jinja".into());
        jinja.insert(
            "template".into(),
            format!("{{{{ {inner} | tojson }}}}").into(),
        );
        let mut json = Map::new();
        json.insert("__prefect_kind".into(), "json".into());
        json.insert("value".into(), Json::Object(jinja));
        return Json::Object(json);
    }
    let mut jinja = Map::new();
    jinja.insert("__prefect_kind".into(), "jinja".into());
    jinja.insert("template".into(), template.into());
    Json::Object(jinja)
}

/// Prefect's `hydrate`. `Ok(None)` means "remove this key" (a `json` kind without `value`).
/// With `context: None` templates are not rendered (validation only).
fn hydrate(
    engine: &TemplateEngine,
    value: &Json,
    context: Option<&Value>,
) -> Result<Option<Json>, TemplateError> {
    match value {
        Json::Object(map) => match map.get("__prefect_kind") {
            Some(kind) => hydrate_kind(engine, kind.as_str().unwrap_or(""), map, context),
            None => {
                let mut out = Map::new();
                for (k, v) in map {
                    if let Some(h) = hydrate(engine, v, context)? {
                        out.insert(k.clone(), h);
                    }
                }
                Ok(Some(Json::Object(out)))
            }
        },
        Json::Array(items) => {
            let mut out = Vec::with_capacity(items.len());
            for item in items {
                if let Some(h) = hydrate(engine, item, context)? {
                    out.push(h);
                }
            }
            Ok(Some(Json::Array(out)))
        }
        other => Ok(Some(other.clone())),
    }
}

fn hydrate_kind(
    engine: &TemplateEngine,
    kind: &str,
    map: &Map<String, Json>,
    context: Option<&Value>,
) -> Result<Option<Json>, TemplateError> {
    match kind {
        "jinja" => {
            let template = match map.get("template") {
                Some(t) => hydrate(engine, t, context)?,
                None => {
                    return Err(TemplateError::Hydration(
                        "Missing 'template' key in __prefect object".into(),
                    ));
                }
            };
            let Some(Json::String(template)) = template else {
                return Err(TemplateError::Hydration(
                    "the 'template' of a jinja __prefect object must be a string".into(),
                ));
            };
            engine.validate(&template)?;
            match context {
                Some(ctx) => engine.render(&template, ctx).map(|s| Some(Json::String(s))),
                None => Ok(Some(Json::String(template))),
            }
        }
        "json" => {
            let Some(value) = map.get("value") else {
                return Ok(None);
            };
            let value = match value {
                Json::Object(_) => match hydrate(engine, value, context)? {
                    Some(v) => v,
                    None => return Ok(None),
                },
                other => other.clone(),
            };
            match value {
                Json::String(text) if context.is_some() => serde_json::from_str(&text)
                    .map(Some)
                    .map_err(|e| TemplateError::Hydration(format!("Invalid JSON: {e}"))),
                other => Ok(Some(other)),
            }
        }
        "none" => match map.get("value") {
            Some(v) => hydrate(engine, v, context),
            None => Err(TemplateError::Hydration(
                "Missing 'value' key in __prefect object".into(),
            )),
        },
        "workspace_variable" => Err(TemplateError::Hydration(
            "workspace variables are not supported by Spur; put the value in the parameters".into(),
        )),
        _ => Ok(Some(map.get("value").cloned().unwrap_or(Json::Null))),
    }
}

fn validate_hydration(
    engine: &TemplateEngine,
    value: &Json,
    path: &FieldPath,
    problems: &mut Problems,
) {
    match value {
        Json::Object(map) if map.contains_key("__prefect_kind") => {
            if let Err(e) = hydrate(engine, value, None) {
                problems.error(path, format!("Invalid parameters: {e}"));
            }
        }
        Json::Object(map) => {
            for (k, v) in map {
                validate_hydration(engine, v, &path.key(k), problems);
            }
        }
        Json::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                validate_hydration(engine, v, &path.index(i), problems);
            }
        }
        _ => {}
    }
}

/// Load-time template checks for every templated field of an automation's actions. Problems
/// are relative to the automation.
pub fn validate_automation(
    engine: &TemplateEngine,
    automation: &Automation,
) -> Vec<spur_core::Problem> {
    let mut problems = Problems::new();
    let root = FieldPath::root();
    let lists = [
        ("actions", &automation.actions),
        ("actions_on_trigger", &automation.actions_on_trigger),
        ("actions_on_resolve", &automation.actions_on_resolve),
    ];
    for (key, actions) in lists {
        for (i, action) in actions.iter().enumerate() {
            let path = root.key(key).index(i);
            match action.action_type.as_str() {
                "run-deployment" => {
                    if let Some(p) = action.parameters() {
                        validate_parameters(
                            engine,
                            p,
                            &mut problems_at(&mut problems, &path.key("parameters")),
                        );
                    }
                }
                "send-notification" | "call-webhook" => {
                    for field in ["subject", "body", "payload"] {
                        if let Some(Json::String(s)) = action.field(field)
                            && let Err(e) = engine.validate(s)
                        {
                            problems.error(
                                &path.key(field),
                                format!("{field:?} is not a valid template: {e}"),
                            );
                        }
                    }
                }
                "emit-event" => {
                    if let Some(event) = action.field("event") {
                        validate_strings(engine, event, &path.key("event"), &mut problems);
                    }
                }
                _ => {}
            }
        }
    }
    problems.into_vec()
}

fn validate_strings(
    engine: &TemplateEngine,
    value: &Json,
    path: &FieldPath,
    problems: &mut Problems,
) {
    match value {
        Json::String(s) if maybe_template(s) => {
            if let Err(e) = engine.validate(s) {
                problems.error(path, e.to_string());
            }
        }
        Json::Object(map) => map
            .iter()
            .for_each(|(k, v)| validate_strings(engine, v, &path.key(k), problems)),
        Json::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| validate_strings(engine, v, &path.index(i), problems)),
        _ => {}
    }
}

/// A view of `problems` that prefixes paths with `base`.
struct ProblemsAt<'a> {
    inner: &'a mut Problems,
    base: FieldPath,
    local: Problems,
}

impl std::ops::Deref for ProblemsAt<'_> {
    type Target = Problems;
    fn deref(&self) -> &Problems {
        &self.local
    }
}

impl std::ops::DerefMut for ProblemsAt<'_> {
    fn deref_mut(&mut self) -> &mut Problems {
        &mut self.local
    }
}

impl Drop for ProblemsAt<'_> {
    fn drop(&mut self) {
        let local = std::mem::take(&mut self.local);
        self.inner.extend_under(&self.base, local.into_vec());
    }
}

fn problems_at<'a>(inner: &'a mut Problems, base: &FieldPath) -> ProblemsAt<'a> {
    ProblemsAt {
        inner,
        base: base.clone(),
        local: Problems::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use serde_json::json;
    use spur_core::EventLimits;

    fn event() -> Arc<Event> {
        Arc::new(
            Event::from_json(
                &json!({
                    "event": "prefect.flow-run.Completed",
                    "resource": {"prefect.resource.id": "prefect.flow-run.1", "prefect.resource.name": "run-1"},
                    "related": [{"prefect.resource.id": "prefect.flow.9", "prefect.resource.role": "flow", "prefect.resource.name": "etl"}],
                    "payload": {"result": "foobar", "n": 12, "ok": true, "items": [1, 2], "nested": {"a": 1.5}},
                }),
                Utc::now(),
                &EventLimits::default(),
            )
            .expect("valid event"),
        )
    }

    fn ctx() -> Value {
        TemplateContext {
            event: Some(event()),
            labels: vec![("prefect.resource.id".into(), "x.1".into())],
            ..TemplateContext::default()
        }
        .to_value()
    }

    /// Expected texts are what Python's Jinja (Prefect 3.8.8's venv) printed for the same
    /// templates and data.
    #[test]
    fn lists_and_dicts_print_as_python_prints_them() {
        let engine = TemplateEngine::new();
        let data = Value::from(Serde(json!({
            "d": {"k": "v", "n": 1, "b": true, "x": null, "nested": {"a": [1, "b"]}},
            "l": ["a", 2, false],
        })));
        let render = |source: &str| engine.render(source, &data).expect("renders");
        assert_eq!(
            render("{{ d }}"),
            "{'k': 'v', 'n': 1, 'b': True, 'x': None, 'nested': {'a': [1, 'b']}}"
        );
        assert_eq!(render("{{ l }}"), "['a', 2, False]");
        assert_eq!(
            render("{{ [1.0, 1e20, 1e-5, 0.1, 123456789012345678.0] }}"),
            "[1.0, 1e+20, 1e-05, 0.1, 1.2345678901234568e+17]"
        );
        assert_eq!(
            render(r#"{{ {'s': "it's", 't': 'a"b', 'u': 'é\n', 'both': 'it\'s "x"'} }}"#),
            r#"{'s': "it's", 't': 'a"b', 'u': 'é\n', 'both': 'it\'s "x"'}"#
        );
        // `tojson` sorts keys, as Jinja's does; printing keeps the document's order.
        assert_eq!(
            render("{{ {'k': 'v', 'b': true, 'a': {'z': 1, 'y': 2}} | tojson }}"),
            r#"{"a": {"y": 2, "z": 1}, "b": true, "k": "v"}"#
        );
        // Python's separators and ensure_ascii, HTML-safe, as Prefect prints them.
        assert_eq!(
            render(r#"{{ {"k": "é<'>&", "l": [1, 2.5, none], "e": {}} | tojson }}"#),
            r#"{"e": {}, "k": "\u00e9\u003c\u0027\u003e\u0026", "l": [1, 2.5, null]}"#
        );
        assert_eq!(
            render(r#"{{ {"k": "é", "l": [1, {"a": 1}]} | tojson(2) }}"#),
            "{\n  \"k\": \"\\u00e9\",\n  \"l\": [\n    1,\n    {\n      \"a\": 1\n    }\n  ]\n}"
        );
        assert_eq!(
            render("{{ [1.0, 1e20, 1e-5, 0.1] | tojson }} {{ d | string }}"),
            "[1.0, 1e+20, 1e-05, 0.1] {'k': 'v', 'n': 1, 'b': True, 'x': None, 'nested': {'a': [1, 'b']}}"
        );
        assert_eq!(render("{{ [[], {}] | tojson(1) }}"), "[\n [],\n {}\n]");
        // Scalars, and lone expressions in parameters (typed), are unchanged.
        assert_eq!(render("{{ d.k }} {{ d.n }} {{ d.b }}"), "v 1 True");
        assert_eq!(
            render_parameters(&engine, Some(&json!({"p": "{{ d }}"})), &data).expect("renders"),
            json!({"p": {"k": "v", "n": 1, "b": true, "x": null, "nested": {"a": [1, "b"]}}})
        );
    }

    #[test]
    fn angle_syntax_rewrites_only_expressions() {
        assert_eq!(rewrite_angle_syntax("<< a >>"), "{{ a }}");
        assert_eq!(
            rewrite_angle_syntax("x << 'q >> r' >> y"),
            "x {{ 'q >> r' }} y"
        );
        assert_eq!(rewrite_angle_syntax("cat <<EOF"), "cat <<EOF");
        assert_eq!(rewrite_angle_syntax("<<- a ->>"), "{{- a -}}");
        assert_eq!(rewrite_angle_syntax("<< a"), "<< a");
    }

    #[test]
    fn parameters_keep_types_for_lone_expressions() {
        let engine = TemplateEngine::new();
        let params = json!({
            "result": "<< event.payload.result >>",
            "n": "{{ event.payload.n }}",
            "ok": "{{ event.payload.ok }}",
            "items": "{{ event.payload.items }}",
            "nested": {"a": "{{ event.payload.nested.a }}"},
            "list": ["{{ event.payload.n }}", "x"],
            "mixed": "run {{ event.resource.name }} of {{ event.resource_in_role['flow'].name }}",
            "plain": "no template",
            "label": "{{ labels.prefect.resource.id }}",
            "label2": "{{ labels['prefect.resource.id'] }}",
            "rid": "{{ event.resource['prefect.resource.id'] }}",
            "explicit": {"__prefect_kind": "json", "value": "[1, 2]"},
            "jinja": {"__prefect_kind": "jinja", "template": "{{ event.payload.n }}"},
            "other": {"__prefect_kind": "whatever", "value": 7},
            "dropped": {"__prefect_kind": "json"},
        });
        let out = render_parameters(&engine, Some(&params), &ctx()).expect("renders");
        assert_eq!(
            out,
            json!({
                "result": "foobar", "n": 12, "ok": true, "items": [1, 2], "nested": {"a": 1.5},
                "list": [12, "x"], "mixed": "run run-1 of etl", "plain": "no template",
                "label": "x.1", "label2": "x.1", "rid": "prefect.flow-run.1",
                "explicit": [1, 2], "jinja": "12", "other": 7,
            })
        );
    }

    #[test]
    fn whole_event_serializes_as_wire_json() {
        let engine = TemplateEngine::new();
        let out = render_parameters(&engine, Some(&json!({"e": "{{ event }}"})), &ctx())
            .expect("renders");
        assert_eq!(out["e"]["event"], json!("prefect.flow-run.Completed"));
        assert_eq!(
            out["e"]["resource"]["prefect.resource.id"],
            json!("prefect.flow-run.1")
        );
        assert!(out["e"].get("resource_in_role").is_none());
    }

    #[test]
    fn timestamps_and_missing_values_behave_like_prefect() {
        let engine = TemplateEngine::new();
        let e = event();
        let ctx = TemplateContext {
            event: Some(e.clone()),
            ..TemplateContext::default()
        }
        .to_value();
        let occurred = spur_core::time::format_timestamp(e.occurred);
        let text = engine
            .render("at {{ event.occurred }}", &ctx)
            .expect("renders");
        assert!(
            text.starts_with("at ") && text.ends_with("+00:00") && text.contains(' '),
            "{text}"
        );
        let out = render_parameters(&engine, Some(&json!({"t": "{{ event.occurred }}"})), &ctx)
            .expect("renders");
        assert_eq!(out["t"], json!(occurred));
        let missing = render_parameters(
            &engine,
            Some(&json!({"m": "{{ event.payload.missing }}"})),
            &ctx,
        );
        assert!(
            matches!(missing, Err(TemplateError::Render(ref m)) if m.contains("not JSON serializable")),
            "{missing:?}"
        );
        assert_eq!(
            engine.render("{{ '<a>' | tojson }}", &ctx).as_deref(),
            Ok("\"\\u003ca\\u003e\"")
        );
    }

    #[test]
    fn limits() {
        let engine = TemplateEngine::new();
        let err = engine.render("{% for i in range(1000) %}{% endfor %}", &ctx());
        assert!(matches!(err, Err(TemplateError::Render(_))), "{err:?}");
        let nested = "{% for a in [1] %}{% for b in [1] %}{% for c in [1] %}{% endfor %}{% endfor %}{% endfor %}";
        assert!(matches!(
            engine.validate(nested),
            Err(TemplateError::Invalid(_))
        ));
        assert!(matches!(
            engine.validate("{{ oops("),
            Err(TemplateError::Invalid(_))
        ));
        assert_eq!(
            engine.render("{{ missing.deeper }}", &ctx()).as_deref(),
            Ok("")
        );
    }

    /// Rendering stops at the output cap: a 100 × 100 loop printing 10 KB each time (100 MB)
    /// fails after about a megabyte instead of building all of it, also inside parameters.
    #[test]
    fn rendering_stops_at_the_output_cap() {
        let engine = TemplateEngine::new();
        let bomb = "{% set s = 'x' * 10000 %}{% for a in range(100) %}{% for b in range(100) %}{{ s }}{% endfor %}{% endfor %}";
        let started = std::time::Instant::now();
        let err = engine.render(bomb, &ctx());
        assert!(
            matches!(&err, Err(TemplateError::Render(m)) if m.contains("limit of 1048576 bytes")),
            "{err:?}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        let err = render_parameters(&engine, Some(&json!({"p": bomb})), &ctx());
        assert!(matches!(err, Err(TemplateError::Render(_))), "{err:?}");
        // Exactly at the cap is still fine.
        let full = format!("{{{{ 'x' * {MAX_OUTPUT_BYTES} }}}}");
        assert_eq!(
            engine.render(&full, &ctx()).map(|s| s.len()),
            Ok(MAX_OUTPUT_BYTES)
        );
    }

    /// An unknown filter or test fails validation (it would fail every render), with its name;
    /// known ones, and `|` inside strings and comments, pass.
    #[test]
    fn validation_names_unknown_filters_and_tests() {
        let engine = TemplateEngine::new();
        for bad in [
            "{{ body | no_such_filter }}",
            "{{ body|upper|nope(1) }}",
            "{% if x is no_such_test %}{% endif %}",
            "{% if x is not nosuch %}{% endif %}",
            "{% filter shout %}x{% endfilter %}",
            "<< body | nope >>",
        ] {
            let err = engine.validate(bad);
            assert!(
                matches!(&err, Err(TemplateError::Invalid(m)) if m.contains("unknown")),
                "{bad}: {err:?}"
            );
        }
        for good in [
            "{{ body | default('|nope') | tojson }}",
            "{{ \"a | b\" }} {# x | nope #} {% raw %}{{ x | nope }}{% endraw %}",
            "{{ 1234 | humanize_intcomma }} {{ x | fromjson }} {{ s | string | upper }}",
            "{% if x is defined and y is not none %}{% endif %}{% filter upper %}x{% endfilter %}",
            "{{ x|length }}{{ x | join(', ') }}",
        ] {
            assert_eq!(engine.validate(good), Ok(()), "{good}");
        }
    }
}
