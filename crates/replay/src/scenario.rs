//! `spur test`: trigger scenarios — automations, an event stream, and the firings expected.
//!
//! The format is `conformance/README.md`'s. Comparison is a multiset match: every expected
//! firing must be matched by a distinct actual firing with the same automation and state and,
//! where given, the same `at`, `event` and first run-deployment `parameters`; any actual firing
//! left over fails the scenario too. `resolved` firings are only compared when the scenario
//! expects at least one (Prefect never resolves, so Prefect-derived scenarios stay valid).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde_json::Value;
use spur_core::load::load_value;
use spur_core::time::parse_timestamp_str;
use spur_core::{Automation, FieldPath, Severity};
use spur_template::TemplateEngine;

use crate::replay::{FiringRecord, Replay, check_templates, line_of};

/// A firing a scenario expects.
#[derive(Clone, Debug, PartialEq)]
pub struct Expectation {
    /// Automation name.
    pub automation: String,
    /// `triggered` or `resolved`.
    pub state: String,
    /// Virtual time, when constrained.
    pub at: Option<DateTime<Utc>>,
    /// Triggering event id (`Some(None)`: must have none), when constrained.
    pub event: Option<Option<String>>,
    /// First run-deployment action's rendered parameters, when constrained.
    pub parameters: Option<Value>,
    /// Whether flow control skipped it (`"skipped": true`), when constrained.
    pub skipped: Option<bool>,
}

/// A parsed scenario file.
#[derive(Clone, Debug)]
pub struct Scenario {
    /// Its name (or the file name).
    pub name: String,
    /// Its file.
    pub file: PathBuf,
    /// The automations, validated.
    pub automations: Vec<Arc<Automation>>,
    /// Raw events with their line numbers.
    pub events: Vec<(usize, Value)>,
    /// Where the clock ends.
    pub until: Option<DateTime<Utc>>,
    /// The complete list of expected firings.
    pub expect: Vec<Expectation>,
}

/// The verdict on one scenario.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// Scenario name.
    pub name: String,
    /// Scenario file.
    pub file: PathBuf,
    /// Passed?
    pub passed: bool,
    /// Why not (one line each), and warnings.
    pub details: Vec<String>,
    /// Every firing the replay produced.
    pub actual: Vec<FiringRecord>,
}

#[derive(Deserialize)]
struct RawScenario<'a> {
    #[serde(borrow, default)]
    events: Vec<&'a serde_json::value::RawValue>,
}

/// Reads and validates a scenario file. The error lists every problem, one per line.
pub fn load_scenario(path: &Path, templates: &TemplateEngine) -> Result<Scenario, Vec<String>> {
    let at = |msg: String| vec![format!("{}: {msg}", path.display())];
    let text = std::fs::read_to_string(path).map_err(|e| at(format!("cannot read: {e}")))?;
    let value: Value = serde_json::from_str(&text).map_err(|e| {
        vec![format!(
            "{}:{}:{}: not valid JSON: {e}",
            path.display(),
            e.line(),
            e.column()
        )]
    })?;
    let Value::Object(map) = &value else {
        return Err(at("a scenario must be a JSON object".into()));
    };
    let name = map
        .get("name")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .unwrap_or_else(|| {
            path.file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default()
        });
    let mut errors = Vec::new();

    let automations_value = map
        .get("automations")
        .cloned()
        .unwrap_or(Value::Array(Vec::new()));
    let mut outcome = load_value(
        path,
        Some(&text),
        &automations_value,
        &FieldPath::root().key("automations"),
    );
    check_templates(&mut outcome, templates);
    for d in &outcome.diagnostics {
        if d.severity == Severity::Error {
            errors.push(d.to_string());
        }
    }
    let automations = outcome
        .automations
        .into_iter()
        .map(|l| l.automation)
        .collect();

    let raw: RawScenario<'_> =
        serde_json::from_str(&text).map_err(|e| at(format!("events: {e}")))?;
    let mut events = Vec::new();
    for r in raw.events {
        let (line, _) = line_of(&text, r.get());
        match serde_json::from_str::<Value>(r.get()) {
            Ok(v) => events.push((line, v)),
            Err(e) => errors.push(format!("{}:{line}: events: {e}", path.display())),
        }
    }

    let until = match map.get("until") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match parse_timestamp_str(s) {
            Ok(t) => Some(t),
            Err(e) => {
                errors.push(format!("{}: until: {e}", path.display()));
                None
            }
        },
        Some(other) => {
            errors.push(format!(
                "{}: until: must be a timestamp, got {other}",
                path.display()
            ));
            None
        }
    };

    let mut expect = Vec::new();
    match map.get("expect") {
        None => errors.push(format!(
            "{}: expect: is required (a list of firings; [] for none)",
            path.display()
        )),
        Some(Value::Array(items)) => {
            for (i, item) in items.iter().enumerate() {
                match parse_expectation(item) {
                    Ok(e) => expect.push(e),
                    Err(e) => errors.push(format!("{}: expect[{i}]: {e}", path.display())),
                }
            }
        }
        Some(_) => errors.push(format!("{}: expect: must be a list", path.display())),
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Scenario {
        name,
        file: path.to_owned(),
        automations,
        events,
        until,
        expect,
    })
}

fn parse_expectation(item: &Value) -> Result<Expectation, String> {
    let Value::Object(map) = item else {
        return Err("must be an object".into());
    };
    let automation = map
        .get("automation")
        .and_then(Value::as_str)
        .ok_or("automation: is required")?
        .to_owned();
    let state = map
        .get("state")
        .and_then(Value::as_str)
        .ok_or("state: is required")?
        .to_owned();
    if state != "triggered" && state != "resolved" {
        return Err(format!(
            "state: must be \"triggered\" or \"resolved\", got {state:?}"
        ));
    }
    let at = match map.get("at") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => Some(parse_timestamp_str(s).map_err(|e| format!("at: {e}"))?),
        Some(other) => return Err(format!("at: must be a timestamp, got {other}")),
    };
    let event = match map.get("event") {
        None => None,
        Some(Value::Null) => Some(None),
        Some(Value::String(s)) => Some(Some(s.to_lowercase())),
        Some(other) => return Err(format!("event: must be an event id or null, got {other}")),
    };
    Ok(Expectation {
        automation,
        state,
        at,
        event,
        parameters: map.get("parameters").cloned(),
        skipped: match map.get("skipped") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => return Err(format!("skipped: must be true or false, got {other}")),
        },
    })
}

/// Runs one scenario and judges it.
pub fn run_scenario(scenario: &Scenario) -> Outcome {
    let mut replay = Replay::new(scenario.automations.clone());
    let mut actual = Vec::new();
    let mut details = Vec::new();
    for (line, raw) in &scenario.events {
        match replay.feed(raw, &format!("{}:{line}", scenario.file.display())) {
            Ok(records) => actual.extend(records),
            Err(e) => details.push(e.to_string()),
        }
    }
    actual.extend(replay.finish(scenario.until));
    if !details.is_empty() {
        return Outcome {
            name: scenario.name.clone(),
            file: scenario.file.clone(),
            passed: false,
            details,
            actual,
        };
    }
    let compare_resolved = scenario.expect.iter().any(|e| e.state == "resolved");
    let considered: Vec<&FiringRecord> = actual
        .iter()
        .filter(|f| compare_resolved || f.state != "resolved")
        .collect();
    let assignment = match_firings(&scenario.expect, &considered);
    for (i, expected) in scenario.expect.iter().enumerate() {
        if assignment.iter().all(|&(e, _)| e != i) {
            details.push(format!("missing:    {}", describe_expectation(expected)));
            if let Some(near) = considered
                .iter()
                .find(|f| f.automation == expected.automation && f.state == expected.state)
            {
                details.push(format!("  closest:  {}", describe_firing(near)));
            }
        }
    }
    for (j, firing) in considered.iter().enumerate() {
        if assignment.iter().all(|&(_, a)| a != j) {
            details.push(format!("unexpected: {}", describe_firing(firing)));
        }
    }
    Outcome {
        name: scenario.name.clone(),
        file: scenario.file.clone(),
        passed: details.is_empty(),
        details,
        actual,
    }
}

fn describe_expectation(e: &Expectation) -> String {
    let mut s = format!("{} {}", e.automation, e.state);
    if let Some(at) = e.at {
        s.push_str(&format!(" at {}", spur_core::time::format_timestamp(at)));
    }
    match &e.event {
        Some(Some(id)) => s.push_str(&format!(" event {id}")),
        Some(None) => s.push_str(" with no event"),
        None => {}
    }
    if e.skipped == Some(true) {
        s.push_str(" skipped");
    }
    if let Some(p) = &e.parameters {
        s.push_str(&format!(" parameters {p}"));
    }
    s
}

fn describe_firing(f: &FiringRecord) -> String {
    let params = first_run_deployment(f)
        .map(|a| format!(" parameters {}", a))
        .unwrap_or_default();
    let skipped = f
        .flow
        .as_ref()
        .and_then(|flow| flow.skipped.as_deref())
        .map(|reason| format!(" skipped ({reason})"))
        .unwrap_or_default();
    format!(
        "{} {} at {} event {}{}{}",
        f.automation,
        f.state,
        f.at,
        f.event.as_deref().unwrap_or("none"),
        skipped,
        params
    )
}

fn first_run_deployment(f: &FiringRecord) -> Option<&Value> {
    f.actions
        .iter()
        .find(|a| a.action_type == "run-deployment")
        .map(|a| &a.parameters)
}

fn compatible(e: &Expectation, f: &FiringRecord) -> bool {
    if e.automation != f.automation || e.state != f.state {
        return false;
    }
    if let Some(at) = e.at
        && parse_timestamp_str(&f.at).ok() != Some(at)
    {
        return false;
    }
    if let Some(event) = &e.event
        && event.as_deref() != f.event.as_deref()
    {
        return false;
    }
    if let Some(p) = &e.parameters {
        match first_run_deployment(f) {
            Some(actual) if json_equal(p, actual) => {}
            _ => return false,
        }
    }
    if let Some(skipped) = e.skipped
        && skipped != f.flow.as_ref().is_some_and(|flow| flow.skipped.is_some())
    {
        return false;
    }
    true
}

/// JSON equality where numbers compare by value (`12` equals `12.0`).
pub fn json_equal(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => match (x.as_i64(), y.as_i64()) {
            (Some(i), Some(j)) => i == j,
            _ => x.as_f64() == y.as_f64(),
        },
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(p, q)| json_equal(p, q))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, v)| y.get(k).is_some_and(|w| json_equal(v, w)))
        }
        _ => a == b,
    }
}

/// Maximum bipartite matching (Kuhn's algorithm): expected index → actual index.
fn match_firings(expect: &[Expectation], actual: &[&FiringRecord]) -> Vec<(usize, usize)> {
    let edges: Vec<Vec<usize>> = expect
        .iter()
        .map(|e| {
            (0..actual.len())
                .filter(|&j| compatible(e, actual[j]))
                .collect()
        })
        .collect();
    let mut owner: Vec<Option<usize>> = vec![None; actual.len()];
    fn augment(
        i: usize,
        edges: &[Vec<usize>],
        owner: &mut [Option<usize>],
        seen: &mut [bool],
    ) -> bool {
        for &j in &edges[i] {
            if seen[j] {
                continue;
            }
            seen[j] = true;
            if owner[j].is_none_or(|k| augment(k, edges, owner, seen)) {
                owner[j] = Some(i);
                return true;
            }
        }
        false
    }
    for i in 0..expect.len() {
        let mut seen = vec![false; actual.len()];
        augment(i, &edges, &mut owner, &mut seen);
    }
    owner
        .iter()
        .enumerate()
        .filter_map(|(j, o)| o.map(|i| (i, j)))
        .collect()
}
