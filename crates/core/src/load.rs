//! Loading automation and deployment files from disk, with errors that point at a line.
//!
//! A file is YAML or JSON (JSON is read by the YAML 1.2 parser too, so both get line numbers).
//! A document may hold:
//!
//! * one automation (a mapping with `trigger`),
//! * a list of automations, or `automations: [...]`,
//! * `deployments: [...]` in `prefect.yaml` shape, whose `triggers:` each become an automation
//!   that runs that deployment (Prefect's `DeploymentTrigger.as_automation`),
//! * or both keys side by side. Multi-document YAML (`---`) is read document by document.
//!
//! While parsing, every node's position is recorded in a [`SourceMap`] keyed by its
//! [`FieldPath`], so a validation [`Problem`] deep in a trigger becomes
//! `file:line:column: field: reason`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar, YamlData};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::automation::Automation;
use crate::problem::{FieldPath, Problem, Problems, Severity};
use crate::trigger::Dialect;

/// A finding tied to a place in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field path, e.g. `trigger.within`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// Error or warning.
    pub severity: Severity,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(
            f,
            "{}:{}:{}: {tag}{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.reason
        )
    }
}

/// Positions (1-based line, column) of every node of one document, by path.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    positions: HashMap<FieldPath, (usize, usize)>,
}

impl SourceMap {
    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &FieldPath) -> (usize, usize) {
        let mut segments = path.0.clone();
        loop {
            if let Some(&pos) = self.positions.get(&FieldPath(segments.clone())) {
                return pos;
            }
            if segments.pop().is_none() {
                return (1, 1);
            }
        }
    }
}

/// Where an automation came from, to report problems found after loading (e.g. templates).
#[derive(Clone, Debug)]
pub struct Origin {
    /// The file.
    pub file: PathBuf,
    /// The automation's path inside the document.
    pub base: FieldPath,
    /// Which document of a multi-document file.
    pub document: usize,
}

/// An automation and where it was defined.
#[derive(Clone, Debug)]
pub struct LoadedAutomation {
    /// The validated automation.
    pub automation: Automation,
    /// Its source.
    pub origin: Origin,
}

/// A deployment declared in a file (the parts the core needs; launchers come with actions).
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentRef {
    /// Its name.
    pub name: String,
    /// Given id, or a UUIDv5 of the name.
    pub id: Uuid,
    /// The whole declaration, for the action layer.
    pub spec: Value,
}

/// Everything loaded from a set of files.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Valid automations, in file order.
    pub automations: Vec<LoadedAutomation>,
    /// Declared deployments.
    pub deployments: Vec<DeploymentRef>,
    /// Declared webhooks (validated by the daemon).
    pub webhooks: Vec<Value>,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// Source maps by (file, document), to place later findings.
    source_maps: HashMap<(PathBuf, usize), SourceMap>,
}

impl LoadOutcome {
    /// True if any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    /// Turns a problem found later (relative to an automation) into a diagnostic.
    pub fn diagnose(&self, origin: &Origin, problem: Problem) -> Diagnostic {
        let path = origin.base.join(&problem.path);
        let (line, column) = self
            .source_maps
            .get(&(origin.file.clone(), origin.document))
            .map_or((1, 1), |m| m.locate(&path));
        Diagnostic {
            file: origin.file.clone(),
            line,
            column,
            field: problem.path.to_string(),
            reason: problem.reason,
            severity: problem.severity,
        }
    }
}

/// The stable id of a deployment that declares none: UUIDv5 of its name in Spur's namespace.
pub fn deployment_id_for_name(name: &str) -> Uuid {
    Uuid::new_v5(
        &crate::SPUR_NAMESPACE,
        format!("deployment:{name}").as_bytes(),
    )
}

/// Loads a file, or every `.yaml`/`.yml`/`.json` file under a folder (recursively, sorted).
pub fn load_path(path: &Path) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let files = match collect_files(path) {
        Ok(files) => files,
        Err(reason) => {
            outcome.diagnostics.push(Diagnostic {
                file: path.to_owned(),
                line: 1,
                column: 1,
                field: "(file)".to_owned(),
                reason,
                severity: Severity::Error,
            });
            return outcome;
        }
    };
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => load_source(&mut outcome, &file, &text),
            Err(e) => outcome.diagnostics.push(Diagnostic {
                file: file.clone(),
                line: 1,
                column: 1,
                field: "(file)".to_owned(),
                reason: format!("cannot read: {e}"),
                severity: Severity::Error,
            }),
        }
    }
    check_unique_names(&mut outcome);
    check_deployment_references(&mut outcome);
    outcome
}

/// A `run-deployment`/`pause-deployment`/`resume-deployment` action may name a deployment
/// (`deployment: NAME`, Spur's alternative to `deployment_id`); the name must be declared in
/// the loaded files. Ids are not checked: they may refer to a real Prefect server's deployments.
fn check_deployment_references(outcome: &mut LoadOutcome) {
    let declared: Vec<&str> = outcome
        .deployments
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    let mut failures: Vec<(usize, Problem)> = Vec::new();
    for (i, loaded) in outcome.automations.iter().enumerate() {
        let a = &loaded.automation;
        let lists = [
            ("actions", &a.actions),
            ("actions_on_trigger", &a.actions_on_trigger),
            ("actions_on_resolve", &a.actions_on_resolve),
        ];
        for (key, actions) in lists {
            for (n, action) in actions.iter().enumerate() {
                if let Some(name) = action.field("deployment").and_then(Value::as_str)
                    && !declared.contains(&name)
                {
                    let mut p = Problems::new();
                    let known = if declared.is_empty() {
                        "none are declared".to_owned()
                    } else {
                        format!("declared: {}", declared.join(", "))
                    };
                    p.error(
                        &FieldPath::root().key(key).index(n).key("deployment"),
                        format!("unknown deployment {name:?} ({known})"),
                    );
                    failures.extend(p.into_vec().into_iter().map(|p| (i, p)));
                }
            }
        }
    }
    let mut remove: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
    for (i, problem) in failures {
        let d = outcome.diagnose(&outcome.automations[i].origin, problem);
        outcome.diagnostics.push(d);
    }
    remove.sort_unstable();
    remove.dedup();
    for i in remove.into_iter().rev() {
        outcome.automations.remove(i);
    }
}

/// Loads automations from in-memory text (used for scenario files and tests).
pub fn load_str(file: &Path, text: &str) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    load_source(&mut outcome, file, text);
    check_unique_names(&mut outcome);
    outcome
}

/// Loads automations from an already-parsed JSON value (e.g. a scenario's `automations`).
/// `base` is where the value sits in its document, for diagnostics.
pub fn load_value(file: &Path, text: Option<&str>, value: &Value, base: &FieldPath) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let map = text
        .and_then(|t| parse_documents(t).ok())
        .and_then(|mut docs| (!docs.is_empty()).then(|| docs.swap_remove(0).1))
        .unwrap_or_default();
    outcome.source_maps.insert((file.to_owned(), 0), map);
    load_document(&mut outcome, file, 0, value, base);
    check_unique_names(&mut outcome);
    outcome
}

fn collect_files(path: &Path) -> Result<Vec<PathBuf>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    if meta.is_file() {
        return Ok(vec![path.to_owned()]);
    }
    let mut files = Vec::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|e| format!("cannot list: {e}"))?;
        for entry in entries.flatten() {
            let p = entry.path();
            let name = entry.file_name();
            if name.to_string_lossy().starts_with('.') {
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
    Ok(files)
}

fn load_source(outcome: &mut LoadOutcome, file: &Path, text: &str) {
    let documents = match parse_documents(text) {
        Ok(docs) => docs,
        Err((line, column, reason)) => {
            outcome.diagnostics.push(Diagnostic {
                file: file.to_owned(),
                line,
                column,
                field: "(syntax)".to_owned(),
                reason,
                severity: Severity::Error,
            });
            return;
        }
    };
    for (index, (value, map)) in documents.into_iter().enumerate() {
        outcome.source_maps.insert((file.to_owned(), index), map);
        load_document(outcome, file, index, &value, &FieldPath::root());
    }
}

/// Dispatches on the document's shape.
fn load_document(
    outcome: &mut LoadOutcome,
    file: &Path,
    document: usize,
    value: &Value,
    base: &FieldPath,
) {
    let push = |outcome: &mut LoadOutcome, path: FieldPath, reason: String| {
        let (line, column) = outcome
            .source_maps
            .get(&(file.to_owned(), document))
            .map_or((1, 1), |m| m.locate(&path));
        outcome.diagnostics.push(Diagnostic {
            file: file.to_owned(),
            line,
            column,
            field: path.to_string(),
            reason,
            severity: Severity::Error,
        });
    };
    match value {
        Value::Null => {} // an empty file or document holds nothing
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                load_automation(
                    outcome,
                    file,
                    document,
                    item,
                    &base.index(i),
                    Dialect::Server,
                );
            }
        }
        Value::Object(map) if map.contains_key("trigger") => {
            load_automation(outcome, file, document, value, base, Dialect::Server);
        }
        Value::Object(map)
            if map.contains_key("automations")
                || map.contains_key("deployments")
                || map.contains_key("webhooks") =>
        {
            match map.get("webhooks") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => outcome.webhooks.extend(items.iter().cloned()),
                Some(_) => push(
                    outcome,
                    base.key("webhooks"),
                    "must be a list of webhooks".to_owned(),
                ),
            }
            match map.get("automations") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        let path = base.key("automations").index(i);
                        load_automation(outcome, file, document, item, &path, Dialect::Server);
                    }
                }
                Some(_) => push(
                    outcome,
                    base.key("automations"),
                    "must be a list of automations".to_owned(),
                ),
            }
            match map.get("deployments") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        load_deployment(
                            outcome,
                            file,
                            document,
                            item,
                            &base.key("deployments").index(i),
                        );
                    }
                }
                Some(_) => push(
                    outcome,
                    base.key("deployments"),
                    "must be a list of deployments".to_owned(),
                ),
            }
        }
        Value::Object(_) => push(
            outcome,
            base.clone(),
            "expected an automation (a mapping with `trigger`), a list of automations, \
             `automations: [...]`, `deployments: [...]` or `webhooks: [...]`"
                .to_owned(),
        ),
        _ => push(
            outcome,
            base.clone(),
            "expected a mapping or a list of automations".to_owned(),
        ),
    }
}

fn load_automation(
    outcome: &mut LoadOutcome,
    file: &Path,
    document: usize,
    value: &Value,
    base: &FieldPath,
    dialect: Dialect,
) {
    let mut problems = Problems::new();
    let automation = Automation::parse(value, dialect, &mut problems);
    let origin = Origin {
        file: file.to_owned(),
        base: base.clone(),
        document,
    };
    for problem in problems.into_vec() {
        let diagnostic = outcome.diagnose(&origin, problem);
        outcome.diagnostics.push(diagnostic);
    }
    if let Some(automation) = automation {
        outcome
            .automations
            .push(LoadedAutomation { automation, origin });
    }
}

/// A `prefect.yaml` deployment: record it, and turn each of its `triggers` into an automation.
fn load_deployment(
    outcome: &mut LoadOutcome,
    file: &Path,
    document: usize,
    value: &Value,
    base: &FieldPath,
) {
    let origin = Origin {
        file: file.to_owned(),
        base: base.clone(),
        document,
    };
    let mut problems = Problems::new();
    let root = FieldPath::root();
    let Value::Object(map) = value else {
        problems.error(&root, "a deployment must be a mapping");
        for p in problems.into_vec() {
            let d = outcome.diagnose(&origin, p);
            outcome.diagnostics.push(d);
        }
        return;
    };
    let name = match map.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            problems.error(&root.key("name"), "is required (a non-empty string)");
            String::new()
        }
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => deployment_id_for_name(&name),
        Some(Value::String(s)) => Uuid::parse_str(s).unwrap_or_else(|e| {
            problems.error(&root.key("id"), format!("is not a valid UUID ({e})"));
            Uuid::nil()
        }),
        Some(other) => {
            problems.error(
                &root.key("id"),
                format!("must be a UUID string, got {other}"),
            );
            Uuid::nil()
        }
    };
    let triggers = match map.get("triggers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => {
            problems.error(&root.key("triggers"), "must be a list of triggers");
            Vec::new()
        }
    };
    let failed = problems.has_errors();
    for p in problems.into_vec() {
        let d = outcome.diagnose(&origin, p);
        outcome.diagnostics.push(d);
    }
    if failed {
        return;
    }
    outcome.deployments.push(DeploymentRef {
        name: name.clone(),
        id,
        spec: value.clone(),
    });
    for (i, trigger) in triggers.iter().enumerate() {
        let path = base.key("triggers").index(i);
        let Some(automation) = deployment_trigger_as_automation(&name, id, i, trigger) else {
            let origin = Origin {
                file: file.to_owned(),
                base: path,
                document,
            };
            let mut p = Problems::new();
            p.error(&FieldPath::root(), "a deployment trigger must be a mapping");
            for p in p.into_vec() {
                let d = outcome.diagnose(&origin, p);
                outcome.diagnostics.push(d);
            }
            continue;
        };
        // Problems are located relative to the trigger entry: map the synthesized automation's
        // `trigger.x` and `actions[0].parameters` back to the entry's own keys.
        let mut problems = Problems::new();
        let parsed = Automation::parse(&automation, Dialect::Client, &mut problems);
        let entry_origin = Origin {
            file: file.to_owned(),
            base: path.clone(),
            document,
        };
        for mut problem in problems.into_vec() {
            problem.path = remap_deployment_trigger_path(&problem.path);
            let d = outcome.diagnose(&entry_origin, problem);
            outcome.diagnostics.push(d);
        }
        if let Some(automation) = parsed {
            outcome.automations.push(LoadedAutomation {
                automation,
                origin: Origin {
                    file: file.to_owned(),
                    base: path,
                    document,
                },
            });
        }
    }
}

/// Prefect's `DeploymentTrigger.as_automation`: the trigger's own fields plus one
/// `run-deployment` action on this deployment.
fn deployment_trigger_as_automation(
    deployment: &str,
    deployment_id: Uuid,
    index: usize,
    trigger: &Value,
) -> Option<Value> {
    let Value::Object(map) = trigger else {
        return None;
    };
    let mut trigger_fields = Map::new();
    let mut automation = Map::new();
    let mut action = Map::new();
    action.insert("type".into(), "run-deployment".into());
    action.insert("source".into(), "selected".into());
    action.insert("deployment_id".into(), deployment_id.to_string().into());
    for (key, value) in map {
        match key.as_str() {
            "name" | "description" | "enabled" => {
                automation.insert(key.clone(), value.clone());
            }
            "parameters" | "job_variables" | "schedule_after" => {
                action.insert(key.clone(), value.clone());
            }
            _ => {
                trigger_fields.insert(key.clone(), value.clone());
            }
        }
    }
    automation
        .entry("name")
        .or_insert_with(|| format!("{deployment}__automation_{}", index + 1).into());
    automation.insert("trigger".into(), Value::Object(trigger_fields));
    automation.insert("actions".into(), Value::Array(vec![Value::Object(action)]));
    automation.insert(
        "owner_resource".into(),
        format!("prefect.deployment.{deployment_id}").into(),
    );
    Some(Value::Object(automation))
}

/// Maps a path in the synthesized automation back to the deployment trigger entry.
fn remap_deployment_trigger_path(path: &FieldPath) -> FieldPath {
    use crate::problem::PathSegment::{Index, Key};
    match path.0.as_slice() {
        [Key(k), rest @ ..] if k == "trigger" => FieldPath(rest.to_vec()),
        [Key(k), Index(0), rest @ ..] if k == "actions" => FieldPath(rest.to_vec()),
        _ => path.clone(),
    }
}

fn check_unique_names(outcome: &mut LoadOutcome) {
    let mut seen: HashMap<String, (PathBuf, usize)> = HashMap::new();
    let mut duplicates = Vec::new();
    for (i, loaded) in outcome.automations.iter().enumerate() {
        let origin = &loaded.origin;
        let (line, _) = outcome
            .source_maps
            .get(&(origin.file.clone(), origin.document))
            .map_or((1, 1), |m| m.locate(&origin.base));
        if let Some((file, first_line)) = seen.get(&loaded.automation.name) {
            duplicates.push((
                i,
                format!(
                    "duplicate automation name {:?} (first defined at {}:{})",
                    loaded.automation.name,
                    file.display(),
                    first_line
                ),
            ));
        } else {
            seen.insert(loaded.automation.name.clone(), (origin.file.clone(), line));
        }
    }
    for (i, reason) in duplicates.iter().rev() {
        let loaded = outcome.automations.remove(*i);
        let mut problem = Problems::new();
        problem.error(&FieldPath::root().key("name"), reason.clone());
        for p in problem.into_vec() {
            let d = outcome.diagnose(&loaded.origin, p);
            outcome.diagnostics.push(d);
        }
    }
}

/// Parses a single-document YAML (or JSON) text into JSON, YAML 1.2 rules (`no` stays a
/// string). The error is `(line, column, reason)`. Used for Spur's own config file.
pub fn parse_yaml(text: &str) -> Result<Value, (usize, usize, String)> {
    let mut docs = parse_documents(text)?;
    Ok(if docs.is_empty() {
        Value::Null
    } else {
        docs.swap_remove(0).0
    })
}

/// Parses every YAML document of `text` into JSON plus a source map. The error is
/// `(line, column, reason)`.
fn parse_documents(text: &str) -> Result<Vec<(Value, SourceMap)>, (usize, usize, String)> {
    let docs = MarkedYaml::load_from_str(text).map_err(|e| {
        let m = e.marker();
        (m.line(), m.col() + 1, e.info().to_owned())
    })?;
    docs.iter()
        .map(|doc| {
            let mut map = SourceMap::default();
            let value = convert(doc, &FieldPath::root(), &mut map)?;
            Ok((value, map))
        })
        .collect()
}

/// Converts a YAML node to JSON (YAML 1.2 core schema: only `true`/`false` are booleans, so
/// `no` stays a string), recording each node's position.
fn convert(
    node: &MarkedYaml<'_>,
    path: &FieldPath,
    map: &mut SourceMap,
) -> Result<Value, (usize, usize, String)> {
    let position = (node.span.start.line(), node.span.start.col() + 1);
    map.positions.entry(path.clone()).or_insert(position);
    match &node.data {
        YamlData::Value(scalar) => Ok(match scalar {
            Scalar::Null => Value::Null,
            Scalar::Boolean(b) => Value::Bool(*b),
            Scalar::Integer(i) => Value::from(*i),
            Scalar::FloatingPoint(f) => {
                let f = f.into_inner();
                serde_json::Number::from_f64(f)
                    .map_or_else(|| Value::String(f.to_string()), Value::Number)
            }
            Scalar::String(s) => Value::String(s.to_string()),
        }),
        YamlData::Sequence(items) => items
            .iter()
            .enumerate()
            .map(|(i, item)| convert(item, &path.index(i), map))
            .collect::<Result<Vec<_>, _>>()
            .map(Value::Array),
        YamlData::Mapping(entries) => {
            let mut object = Map::new();
            for (key, value) in entries {
                let key_text = match &key.data {
                    YamlData::Value(Scalar::String(s)) => s.to_string(),
                    YamlData::Value(Scalar::Integer(i)) => i.to_string(),
                    YamlData::Value(Scalar::Boolean(b)) => b.to_string(),
                    YamlData::Value(Scalar::FloatingPoint(f)) => f.to_string(),
                    YamlData::Value(Scalar::Null) => "null".to_owned(),
                    _ => {
                        return Err((
                            key.span.start.line(),
                            key.span.start.col() + 1,
                            "mapping keys must be plain scalars".to_owned(),
                        ));
                    }
                };
                let child = path.key(&key_text);
                // Point a field at its key: that is the line a person reads.
                map.positions.insert(
                    child.clone(),
                    (key.span.start.line(), key.span.start.col() + 1),
                );
                let converted = convert(value, &child, map)?;
                object.insert(key_text, converted);
            }
            Ok(Value::Object(object))
        }
        YamlData::Tagged(_, inner) => convert(inner, path, map),
        YamlData::Representation(text, _, _) => Ok(Value::String(text.to_string())),
        YamlData::Alias(_) => Err((
            position.0,
            position.1,
            "YAML aliases are not supported here; repeat the value".to_owned(),
        )),
        YamlData::BadValue => Err((
            position.0,
            position.1,
            "a value that does not match its tag".to_owned(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_point_at_the_field() {
        let text = "name: a\ntrigger:\n  type: event\n  posture: Reactive\n  expect: [x]\n  within: -5\nactions: []\n";
        let outcome = load_str(Path::new("a.yaml"), text);
        assert!(outcome.automations.is_empty());
        let d = &outcome.diagnostics[0];
        assert_eq!((d.line, d.column), (6, 3), "{d}");
        assert_eq!(d.field, "trigger.within");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let outcome = load_str(Path::new("b.yaml"), "name: [unclosed\n");
        assert!(outcome.has_errors());
        assert_eq!(outcome.diagnostics[0].field, "(syntax)");
    }

    #[test]
    fn deployment_triggers_become_automations() {
        let text = r#"
deployments:
  - name: downstream
    entrypoint: flows.py:downstream
    triggers:
      - expect: ["prefect.flow-run.Completed"]
        match_related:
          prefect.resource.id: prefect.flow.abc
        parameters:
          prev_result: "<< event.payload.result >>"
"#;
        let outcome = load_str(Path::new("prefect.yaml"), text);
        assert!(!outcome.has_errors(), "{:?}", outcome.diagnostics);
        let a = &outcome.automations[0].automation;
        assert_eq!(a.name, "downstream__automation_1");
        assert_eq!(a.actions[0].action_type, "run-deployment");
        assert_eq!(
            a.actions[0].field("deployment_id").and_then(Value::as_str),
            Some(deployment_id_for_name("downstream").to_string().as_str())
        );
        assert_eq!(outcome.deployments[0].name, "downstream");
    }

    #[test]
    fn yaml_booleans_are_strict() {
        let text = "name: a\nenabled: no\ntrigger: {posture: Reactive, expect: [x]}\nactions: []\n";
        let outcome = load_str(Path::new("c.yaml"), text);
        let d = &outcome.diagnostics[0];
        assert_eq!(d.field, "enabled");
        assert_eq!(d.line, 2);
    }

    #[test]
    fn duplicate_names_are_refused() {
        let text = "- {name: a, trigger: {posture: Reactive, expect: [x]}, actions: []}\n- {name: a, trigger: {posture: Reactive, expect: [y]}, actions: []}\n";
        let outcome = load_str(Path::new("d.yaml"), text);
        assert_eq!(outcome.automations.len(), 1);
        assert!(outcome.diagnostics[0].reason.contains("duplicate"));
        assert_eq!(outcome.diagnostics[0].line, 2);
    }
}
