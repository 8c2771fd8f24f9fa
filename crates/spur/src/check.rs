//! `spur check`'s warnings: files that load, but would not do what they say once running.
//!
//! * a deployment without a `launcher` (its runs fail at once: "has no launcher");
//! * a `run-deployment` whose `deployment_id` names no deployment declared in the files
//!   (a `deployment: NAME` that names none is already a load error);
//! * a template (in `run-deployment` parameters, a notification's or webhook call's
//!   `subject`/`body`/`payload`, an `emit-event`'s event) that reads a top-level variable
//!   templates do not have: it would render as empty (Prefect's chainable undefined).
//!
//! Each is a [`Diagnostic`] with [`Severity::Warning`], printed as `file:line:column:
//! warning: field: reason`.

use std::path::{Path, PathBuf};

use serde_json::Value;
use spur_core::load::{Diagnostic, LoadOutcome, load_str};
use spur_core::problem::PathSegment;
use spur_core::{Action, FieldPath, Problem, Severity};

/// The variables a template's context has (`spur_template::TemplateContext::to_value`), and
/// the global functions of its environment (minijinja's builtins and Prefect's `range`).
const KNOWN_VARIABLES: &[&str] = &[
    "automation",
    "event",
    "labels",
    "firing",
    "firings",
    "events",
    "range",
    "dict",
    "namespace",
    "debug",
    // What flow control adds (docs/flow-control.md); undefined without it.
    "debounce",
    "batch",
    "throttle",
];

/// Every warning for `path` (a file or folder), given what loading it produced.
pub fn warnings(path: &Path, outcome: &LoadOutcome) -> Vec<Diagnostic> {
    let mut found = deployments_without_launcher(path);
    found.extend(action_warnings(outcome));
    found
}

/// The files `spur_core::load::load_path` reads: `.yaml`, `.yml` and `.json`, recursively,
/// sorted, hidden entries skipped.
fn files_under(path: &Path) -> Vec<PathBuf> {
    if path.is_file() {
        return vec![path.to_owned()];
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            if p.is_dir() {
                stack.push(p);
            } else if matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            ) {
                files.push(p);
            }
        }
    }
    files.sort();
    files
}

fn deployments_without_launcher(path: &Path) -> Vec<Diagnostic> {
    let mut found = Vec::new();
    for file in files_under(path) {
        let Ok(text) = std::fs::read_to_string(&file) else {
            continue; // the loader has reported it
        };
        let outcome = load_str(&file, &text);
        let mut from_line = 0;
        for deployment in &outcome.deployments {
            let line = name_line(&text, &deployment.name, from_line);
            if let Some(l) = line {
                from_line = l;
            }
            let launcher = deployment.spec.get("launcher").filter(|l| !l.is_null());
            if launcher.is_none() {
                found.push(Diagnostic {
                    file: file.clone(),
                    line: line.unwrap_or(1),
                    column: 1,
                    field: format!("deployments[{:?}].launcher", deployment.name),
                    reason: format!(
                        "deployment {:?} has no launcher, so its runs fail at once; add one, \
                         e.g. `launcher: {{command: [\"sh\", \"-c\", \"cat\"]}}`",
                        deployment.name
                    ),
                    severity: Severity::Warning,
                });
            }
        }
    }
    found
}

/// The 1-based line after `after` that declares `name: NAME` (YAML, quoted or not, or a
/// JSON `"name": "NAME"`), where a deployment of that name is declared.
fn name_line(text: &str, name: &str, after: usize) -> Option<usize> {
    let wanted = [
        format!("name: {name}"),
        format!("name: \"{name}\""),
        format!("name: '{name}'"),
        format!("\"name\": \"{name}\""),
    ];
    text.lines()
        .enumerate()
        .skip(after)
        .find(|(_, line)| {
            let line = line.trim().trim_start_matches("- ").trim_start_matches('{');
            let line = line.trim().trim_end_matches(',');
            wanted.iter().any(|w| {
                line == w
                    || line.starts_with(&format!("{w} #"))
                    || line.starts_with(&format!("{w},"))
            })
        })
        .map(|(i, _)| i + 1)
}

fn action_warnings(outcome: &LoadOutcome) -> Vec<Diagnostic> {
    let declared: Vec<String> = outcome
        .deployments
        .iter()
        .map(|d| d.id.to_string())
        .collect();
    let mut found = Vec::new();
    for loaded in &outcome.automations {
        let a = &loaded.automation;
        // An automation a deployment's `triggers` entry made: its paths are the entry's.
        let from_deployment_trigger = matches!(
            loaded.origin.base().0.as_slice(),
            [.., PathSegment::Key(k), PathSegment::Index(_)] if k == "triggers"
        );
        let mut problems: Vec<Problem> = Vec::new();
        let lists = [
            ("actions", &a.actions),
            ("actions_on_trigger", &a.actions_on_trigger),
            ("actions_on_resolve", &a.actions_on_resolve),
        ];
        for (key, actions) in lists {
            for (n, action) in actions.iter().enumerate() {
                let path = FieldPath::root().key(key).index(n);
                check_action(action, &path, &declared, &mut problems);
            }
        }
        for mut problem in problems {
            if from_deployment_trigger {
                problem.path = match problem.path.0.as_slice() {
                    [PathSegment::Key(k), PathSegment::Index(0), rest @ ..] if k == "actions" => {
                        FieldPath(rest.to_vec())
                    }
                    _ => problem.path,
                };
            }
            let mut d = outcome.diagnose(&loaded.origin, problem);
            d.field = format!("{}: {}", a.name, d.field);
            found.push(d);
        }
    }
    found
}

fn warning(path: &FieldPath, reason: String) -> Problem {
    Problem {
        path: path.clone(),
        reason,
        severity: Severity::Warning,
    }
}

fn check_action(action: &Action, path: &FieldPath, declared: &[String], out: &mut Vec<Problem>) {
    let templated: &[&str] = match action.action_type.as_str() {
        "run-deployment" => {
            let by_id = action.field("deployment_id").and_then(Value::as_str);
            let inferred = action.field("source").and_then(Value::as_str) == Some("inferred");
            let by_name = action.field("deployment").is_some_and(|d| !d.is_null());
            if let Some(id) = by_id
                && !inferred
                && !by_name
                && !declared.iter().any(|d| d.eq_ignore_ascii_case(id))
            {
                out.push(warning(
                    &path.key("deployment_id"),
                    format!(
                        "no deployment with id {id} is declared in these files; \
                         the action fails unless a deployment with that id is loaded"
                    ),
                ));
            }
            &["parameters"]
        }
        "send-notification" | "call-webhook" => &["subject", "body", "payload"],
        "emit-event" => &["event"],
        _ => &[],
    };
    for field in templated {
        if let Some(value) = action.field(field) {
            check_templates(value, &path.key(field), *field == "parameters", out);
        }
    }
}

/// Every template string inside `value` that reads an unknown top-level variable, or that
/// renders in Spur but would fail in Prefect (`parameters`: run-deployment parameters).
fn check_templates(value: &Value, path: &FieldPath, parameters: bool, out: &mut Vec<Problem>) {
    match value {
        Value::String(s) if spur_template::maybe_template(s) => {
            for name in unknown_variables(s) {
                out.push(warning(
                    path,
                    format!(
                        "the template reads {name:?}, which templates do not have (they see {}); \
                         it renders as empty",
                        KNOWN_VARIABLES[..6].join(", ")
                    ),
                ));
            }
            for why in spur_template::prefect_incompatibilities(s, parameters) {
                out.push(warning(
                    path,
                    format!("Prefect would not render this as Spur does: {why}"),
                ));
            }
        }
        Value::Object(map) => map
            .iter()
            .for_each(|(k, v)| check_templates(v, &path.key(k), parameters, out)),
        Value::Array(items) => items
            .iter()
            .enumerate()
            .for_each(|(i, v)| check_templates(v, &path.index(i), parameters, out)),
        _ => {}
    }
}

/// The top-level variables a template reads that its context does not define, sorted.
/// A template that does not parse yields none (loading reports it as an error).
pub fn unknown_variables(source: &str) -> Vec<String> {
    let source = spur_template::rewrite_angle_syntax(source);
    let env = minijinja::Environment::new();
    let Ok(template) = env.template_from_str(&source) else {
        return Vec::new();
    };
    let mut names: Vec<String> = template
        .undeclared_variables(false)
        .into_iter()
        .filter(|n| !KNOWN_VARIABLES.contains(&n.as_str()))
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_variables_are_the_undeclared_top_level_names() {
        assert!(unknown_variables("<< event.payload.x >>").is_empty());
        assert!(
            unknown_variables(
                "{{ labels['a'] }} {{ firing.id }} {% for i in range(2) %}{{ i }}{% endfor %}"
            )
            .is_empty()
        );
        assert!(unknown_variables("{% set x = 1 %}{{ x }}").is_empty());
        assert_eq!(
            unknown_variables("{{ evnt.id }} {{ flow }}"),
            ["evnt", "flow"]
        );
        assert!(unknown_variables("{{ broken").is_empty());
    }

    #[test]
    fn name_lines_are_found_quoted_or_not() {
        let text = "deployments:\n  - name: a\n  - name: \"b\"\n  - {name: c, x: 1}\n";
        assert_eq!(name_line(text, "a", 0), Some(2));
        assert_eq!(name_line(text, "b", 2), Some(3));
        assert_eq!(name_line(text, "c", 0), Some(4));
        assert_eq!(name_line(text, "d", 0), None);
    }
}
