//! Templates that render in Spur but would fail (or differ) in Prefect.
//!
//! Spur renders more than Prefect does (docs/prefect-differences.md, "Templates"). Users who
//! share automations with a Prefect server want to know before it matters, so `spur check`
//! warns with [`prefect_incompatibilities`]. It reads the template's text (no rendering):
//! Spur-only filters, tests and tags, dict method names read as payload keys, and, for a
//! run-deployment parameter that is one lone expression, values Prefect's `tojson` cannot
//! serialize. The `<< >>` spelling is not reported: it is Spur's documented syntax.

use crate::{filter_and_test_names, rewrite_angle_syntax};

/// The filters of Prefect 3.8.8's template environment (Jinja's, the humanize extension's,
/// `flow_run_id`, and `from_cloud_event` of webhook templates). Any other filter is Spur's.
#[rustfmt::skip]
const PREFECT_FILTERS: &[&str] = &[
    "abs", "attr", "batch", "capitalize", "center", "count", "d", "default", "dictsort", "e",
    "escape", "filesizeformat", "first", "float", "forceescape", "format", "groupby",
    "humanize_abs_timedelta", "humanize_apnumber", "humanize_clamp", "humanize_date_and_delta",
    "humanize_fractional", "humanize_intcomma", "humanize_intword", "humanize_metric",
    "humanize_naturaldate", "humanize_naturalday", "humanize_naturaldelta",
    "humanize_naturalsize", "humanize_naturaltime", "humanize_ordinal", "humanize_precisedelta",
    "humanize_scientific", "indent", "int", "items", "join", "last", "length", "list", "lower",
    "map", "max", "min", "pprint", "random", "reject", "rejectattr", "replace", "reverse",
    "round", "safe", "select", "selectattr", "slice", "sort", "string", "striptags", "sum",
    "title", "tojson", "trim", "truncate", "unique", "upper", "urlencode", "urlize",
    "wordcount", "wordwrap", "xmlattr", "flow_run_id", "from_cloud_event",
];

/// The tests of Prefect 3.8.8's template environment (Jinja's). Any other test is Spur's.
#[rustfmt::skip]
const PREFECT_TESTS: &[&str] = &[
    "boolean", "callable", "defined", "divisibleby", "eq", "equalto", "escaped", "even",
    "false", "filter", "float", "ge", "greaterthan", "gt", "in", "integer", "iterable", "le",
    "lessthan", "lower", "lt", "mapping", "ne", "none", "number", "odd", "sameas", "sequence",
    "string", "test", "true", "undefined", "upper",
];

/// Tags Spur has and Prefect's Jinja does not (no loop-controls extension there).
const SPUR_ONLY_TAGS: &[&str] = &["break", "continue"];

/// Python's dict methods: `x.items` is the method in Prefect, not the key `items`.
const DICT_METHODS: &[&str] = &[
    "items",
    "keys",
    "values",
    "get",
    "copy",
    "pop",
    "popitem",
    "update",
    "setdefault",
    "clear",
    "fromkeys",
];

/// Filters whose result is a lazy generator in Jinja (not JSON serializable in Prefect).
const GENERATOR_FILTERS: &[&str] = &[
    "map",
    "select",
    "reject",
    "selectattr",
    "rejectattr",
    "batch",
    "slice",
];

/// The code of each `{{ }}` and `{% %}` tag, with string literals blanked out (comments
/// and `{% raw %}` blocks skipped).
fn code_of_tags(source: &str) -> Vec<String> {
    let mut tags = Vec::new();
    let mut rest = source;
    while let Some(open) = rest.find(['{']) {
        let after = &rest[open..];
        let close = match after.get(..2) {
            Some("{{") => "}}",
            Some("{%") => "%}",
            Some("{#") => {
                rest = after.find("#}").map_or("", |i| &after[i + 2..]);
                continue;
            }
            _ => {
                rest = &after[1..];
                continue;
            }
        };
        let body = &after[2..];
        let mut code = String::new();
        let mut quote: Option<char> = None;
        let mut escaped = false;
        let mut end = body.len();
        for (i, c) in body.char_indices() {
            match quote {
                Some(q) => {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == q {
                        quote = None;
                        code.push(c);
                        continue;
                    }
                    code.push(' ');
                }
                None => {
                    if body[i..].starts_with(close) {
                        end = i;
                        break;
                    }
                    if c == '\'' || c == '"' {
                        quote = Some(c);
                    }
                    code.push(c);
                }
            }
        }
        let code = code.trim_matches(|c: char| c == '-' || c == '+' || c.is_whitespace());
        let first_word = code.split_whitespace().next().unwrap_or("");
        let raw = close == "%}" && first_word == "raw";
        tags.push(code.to_owned());
        rest = body.get(end + 2..).unwrap_or("");
        if raw {
            rest = rest.find("endraw").map_or("", |i| &rest[i..]);
        }
    }
    tags
}

/// `.name` attribute reads (not calls) of a dict method name in `code`.
fn dict_method_reads(code: &str) -> Vec<&str> {
    let mut found = Vec::new();
    let bytes = code.as_bytes();
    for (i, _) in code.match_indices('.') {
        let start = i + 1;
        let end = bytes[start..]
            .iter()
            .position(|b| !(b.is_ascii_alphanumeric() || *b == b'_'))
            .map_or(bytes.len(), |n| start + n);
        let name = &code[start..end];
        let called = code[end..].trim_start().starts_with('(');
        let previous_is_name = i > 0
            && (bytes[i - 1].is_ascii_alphanumeric()
                || bytes[i - 1] == b'_'
                || bytes[i - 1] == b']');
        if !called && previous_is_name && DICT_METHODS.contains(&name) && !found.contains(&name) {
            found.push(name);
        }
    }
    found
}

/// Why a lone parameter expression (`{{ expr }}`, rendered through `tojson` to keep its
/// type) would fail in Prefect, if it would.
fn unserializable(expr: &str) -> Option<&'static str> {
    let compact: String = expr.chars().filter(|c| !c.is_whitespace()).collect();
    let last_filter = compact
        .rsplit_once('|')
        .map(|(_, f)| f.split('(').next().unwrap_or(f));
    match compact.as_str() {
        "event.id" | "event.follows" => Some("a UUID"),
        "event.occurred" | "event.received" => Some("a datetime"),
        // `labels['name']` gives the label's value in Prefect too; `labels` itself and its
        // attribute chains (`labels.team`) give Prefect's LabelDiver object.
        _ if compact == "labels"
            || compact.starts_with("labels.")
            || compact == "event.resource.labels"
            || compact.starts_with("event.resource.labels.") =>
        {
            Some("a label lookup (LabelDiver)")
        }
        _ if compact.starts_with("range(") && !compact.contains('|') => Some("a range"),
        _ if compact.ends_with(".keys()")
            || compact.ends_with(".values()")
            || compact.ends_with(".items()") =>
        {
            Some("a dict view")
        }
        _ if last_filter.is_some_and(|f| GENERATOR_FILTERS.contains(&f)) => {
            Some("a generator (add `| list`)")
        }
        _ => None,
    }
}

/// Warnings for a template that renders in Spur but would fail or render differently in
/// Prefect 3.8.8. `lone_parameter`: the template is a run-deployment parameter, where a
/// lone `{{ expr }}` keeps its JSON type (and Prefect needs it JSON-serializable).
pub fn prefect_incompatibilities(source: &str, lone_parameter: bool) -> Vec<String> {
    let source = rewrite_angle_syntax(source);
    let mut warnings = Vec::new();
    for (kind, name) in filter_and_test_names(&source) {
        let spur_only = match kind {
            "filter" => !PREFECT_FILTERS.contains(&name),
            _ => !PREFECT_TESTS.contains(&name),
        };
        if spur_only {
            warnings.push(format!(
                "the {kind} {name:?} is Spur's; Prefect's Jinja does not have it"
            ));
        }
    }
    for code in code_of_tags(&source) {
        let word = code.split_whitespace().next().unwrap_or("");
        if SPUR_ONLY_TAGS.contains(&word) {
            warnings.push(format!(
                "{{% {word} %}} is Spur's; Prefect's Jinja does not have it"
            ));
        }
        for name in dict_method_reads(&code) {
            warnings.push(format!(
                "`.{name}` reads the key {name:?} in Spur, but in Prefect it is the dict method; \
                 write ['{name}'] to read the key in both"
            ));
        }
    }
    if lone_parameter {
        let trimmed = source.trim();
        if trimmed.starts_with("{{")
            && trimmed.ends_with("}}")
            && trimmed.matches("{{").count() == 1
        {
            let expr =
                trimmed[2..trimmed.len() - 2].trim_matches(|c: char| c == '-' || c.is_whitespace());
            if let Some(what) = unserializable(expr) {
                warnings.push(format!(
                    "a parameter that is only `{{{{ {expr} }}}}` is {what} in Prefect, which cannot \
                     serialize it to JSON: the run would not start there"
                ));
            }
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_for_what_prefect_cannot_render() {
        let warns = |s: &str, p: bool| prefect_incompatibilities(s, p);
        assert!(warns("{{ x | fromjson }}", false)[0].contains("fromjson"));
        assert!(warns("{% for i in x %}{% break %}{% endfor %}", false)[0].contains("break"));
        assert!(warns("{{ event.payload.items | length }}", false)[0].contains("['items']"));
        assert!(warns("{{ event.id }}", true)[0].contains("UUID"));
        assert!(warns("{{ x | map('string') }}", true)[0].contains("generator"));
        assert!(warns("{{ labels.prefect.resource.id }}", true)[0].contains("LabelDiver"));
        for fine in [
            "{{ event.payload.get('a') }} {{ d.items() | list }}",
            "{{ event.id }} in text",
            "{{ 'x.items' }} {# a.keys #}",
            "<< event.payload.n >>",
            "{{ x | map('string') | list }}",
            "{{ labels['related:flow:prefect.resource.id'] }}",
        ] {
            assert_eq!(warns(fine, true), Vec::<String>::new(), "{fine}");
        }
        assert_eq!(warns("{{ event.id }}", false), Vec::<String>::new());
    }
}
