//! The template conformance table: every template in `prefect_table.json` was rendered as a
//! run-deployment parameter by Prefect's own `RunDeployment.render_parameters` (the version
//! is recorded in the file; `scripts/template_table.py` regenerates it). Spur renders each
//! against the same event and labels and must give the same JSON value, or fail where Prefect
//! fails. A case may differ only if `prefect_table_known.json` names it with a kind that
//! docs/prefect-differences.md explains ("Templates"); a listed case that agrees again is
//! reported too, so the list cannot go stale.

use std::collections::BTreeMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde_json::{Value as Json, json};
use spur_core::{Event, EventLimits};
use spur_template::{TemplateContext, TemplateEngine, render_parameters};

const TABLE: &str = include_str!("prefect_table.json");
const KNOWN: &str = include_str!("prefect_table_known.json");
/// Kinds a known difference may have: each is a row of docs/prefect-differences.md.
const KINDS: &[&str] = &["spur-better", "spur-lenient", "open"];

#[derive(Debug, PartialEq)]
enum Outcome {
    Value(Json),
    Absent,
    Fails(String),
}

fn spur(engine: &TemplateEngine, ctx: &spur_template::TemplateValue, template: &Json) -> Outcome {
    let params = json!({ "p": template });
    let mut problems = spur_core::Problems::new();
    spur_template::validate_parameters(engine, &params, &mut problems);
    let problems = problems.into_vec();
    if !problems.is_empty() {
        return Outcome::Fails(format!("{problems:?}"));
    }
    match render_parameters(engine, Some(&params), ctx) {
        Ok(out) => match out.get("p") {
            Some(v) => Outcome::Value(v.clone()),
            None => Outcome::Absent,
        },
        Err(e) => Outcome::Fails(e.to_string()),
    }
}

fn prefect(case: &Json) -> Outcome {
    let p = &case["prefect"];
    if let Some(v) = p.get("ok") {
        Outcome::Value(v.clone())
    } else if p.get("absent").is_some() {
        Outcome::Absent
    } else {
        let why = p.get("error").or_else(|| p.get("invalid")).cloned();
        Outcome::Fails(why.map(|w| w.to_string()).unwrap_or_default())
    }
}

fn agrees(spur: &Outcome, prefect: &Outcome) -> bool {
    match (spur, prefect) {
        (Outcome::Fails(_), Outcome::Fails(_)) => true,
        (a, b) => a == b,
    }
}

#[test]
fn templates_render_as_prefect_renders_them() {
    let table: Json = serde_json::from_str(TABLE).expect("the table is JSON");
    let known: BTreeMap<String, String> = serde_json::from_str(KNOWN).expect("known is JSON");
    for (id, kind) in &known {
        assert!(
            KINDS.contains(&kind.as_str()),
            "{id}: unknown kind {kind:?}"
        );
    }
    let received: DateTime<Utc> = table["event"]["received"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .expect("received");
    let event = Event::from_json(&table["event"], received, &EventLimits::default())
        .expect("the table's event is valid");
    let labels = table["labels"]
        .as_object()
        .expect("labels")
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
        .collect();
    let mut problems = spur_core::Problems::new();
    let automation = spur_core::Automation::parse(
        &json!({
            "name": "table",
            "trigger": {"type": "event", "expect": ["x"], "posture": "Reactive"},
            "actions": [{"type": "do-nothing"}],
        }),
        spur_core::trigger::Dialect::Server,
        &mut problems,
    )
    .expect("automation");
    let ctx = TemplateContext {
        automation: Some(Arc::new(automation)),
        event: Some(Arc::new(event)),
        labels,
        ..TemplateContext::default()
    }
    .to_value();
    let engine = TemplateEngine::new();
    let cases = table["cases"].as_array().expect("cases");
    let (mut same, mut documented, mut stale) = (0, 0, Vec::new());
    let mut differ = Vec::new();
    let mut by_kind: BTreeMap<&str, usize> = BTreeMap::new();
    for case in cases {
        let id = case["id"].as_str().expect("id");
        let ours = spur(&engine, &ctx, &case["template"]);
        let theirs = prefect(case);
        let ok = agrees(&ours, &theirs);
        match (ok, known.get(id)) {
            (true, None) => same += 1,
            (true, Some(kind)) => {
                stale.push(format!("{id} ({kind}) agrees now: {}", case["template"]))
            }
            (false, Some(kind)) => {
                documented += 1;
                *by_kind.entry(kind.as_str()).or_default() += 1;
            }
            (false, None) => differ.push(format!(
                "{id}: {}\n    prefect: {theirs:?}\n    spur:    {ours:?}",
                case["template"]
            )),
        }
    }
    eprintln!(
        "{} templates (Prefect {}): {same} agree, {documented} documented differences {by_kind:?}, {} differ",
        cases.len(),
        table["prefect_version"],
        differ.len()
    );
    assert!(
        differ.is_empty() && stale.is_empty(),
        "{} undocumented differences:\n{}\n{} listed differences that agree now:\n{}",
        differ.len(),
        differ.join("\n"),
        stale.len(),
        stale.join("\n")
    );
}
