//! `spur replay`: run the matcher over a recorded event stream on a virtual clock.
//!
//! The contract (DESIGN.md, conformance/README.md): events are fed in file order; the clock is
//! `max(clock, event.occurred)` and never moves back; each event's `occurred` is also its
//! `received`; proactive deadlines fire at exactly their time, before any later event, and up
//! to `--until`. Each firing becomes a [`FiringRecord`], printed as one JSON line.

use std::path::Path;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use spur_core::load::{LoadOutcome, load_path};
use spur_core::time::format_timestamp;
use spur_core::{Automation, Event, EventLimits, Severity};
use spur_matcher::{Engine, EngineConfig, Firing, FiringState, FlowKeys, FlowKind};
use spur_template::{TemplateContext, TemplateEngine, render_parameters};
use thiserror::Error;

/// Why a replay could not run.
#[derive(Debug, Error)]
pub enum ReplayError {
    /// The automations did not load; each line is `file:line:column: field: reason`.
    #[error("automations failed to load:\n{}", .0.join("\n"))]
    Automations(Vec<String>),
    /// The event file is unreadable or malformed.
    #[error("{0}")]
    Events(String),
}

/// One action of a firing, as `spur replay` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ActionRecord {
    /// The action type.
    #[serde(rename = "type")]
    pub action_type: String,
    /// Rendered parameters (run-deployment), else null.
    pub parameters: Value,
    /// Set when rendering failed: the reason the action would fail.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One firing, as `spur replay` prints it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FiringRecord {
    /// Automation name.
    pub automation: String,
    /// `triggered` or `resolved`.
    pub state: &'static str,
    /// Virtual time of the firing (RFC 3339).
    pub at: String,
    /// The triggering event's id, if any.
    pub event: Option<String>,
    /// The actions that run for this firing, rendered.
    pub actions: Vec<ActionRecord>,
    /// What flow control did to it (collapsed, delayed, skipped); absent without it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flow: Option<spur_matcher::FlowSummary>,
}

/// Loads automations from a file or folder, including template checks. Diagnostics (errors
/// and warnings) are returned with the outcome.
pub fn load_automations(path: &Path, templates: &TemplateEngine) -> LoadOutcome {
    let mut outcome = load_path(path);
    check_templates(&mut outcome, templates);
    outcome
}

/// Runs template validation over loaded automations, moving failures into diagnostics.
pub fn check_templates(outcome: &mut LoadOutcome, templates: &TemplateEngine) {
    let mut keep = Vec::new();
    let loaded = std::mem::take(&mut outcome.automations);
    for item in loaded {
        let problems = spur_template::validate_automation(templates, &item.automation);
        let failed = problems.iter().any(|p| p.severity == Severity::Error);
        for p in problems {
            let d = outcome.diagnose(&item.origin, p);
            outcome.diagnostics.push(d);
        }
        if !failed {
            keep.push(item);
        }
    }
    outcome.automations = keep;
}

/// Reads an event file: JSON Lines, or one JSON array. Errors name the line.
pub fn read_events(path: &Path) -> Result<Vec<(usize, Value)>, ReplayError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ReplayError::Events(format!("{}: cannot read: {e}", path.display())))?;
    parse_events_text(&text).map_err(|e| ReplayError::Events(format!("{}:{e}", path.display())))
}

/// Parses event text (JSONL or a JSON array) into raw JSON values, each with the line it
/// starts on. The error starts with `line:column: `.
pub fn parse_events_text(text: &str) -> Result<Vec<(usize, Value)>, String> {
    let trimmed = text.trim_start();
    if trimmed.starts_with('[') {
        let raw: Vec<&serde_json::value::RawValue> = serde_json::from_str(text).map_err(|e| {
            format!(
                "{}:{}: not a JSON array of events: {e}",
                e.line(),
                e.column()
            )
        })?;
        return raw
            .into_iter()
            .map(|r| {
                let (line, column) = line_of(text, r.get());
                serde_json::from_str(r.get())
                    .map(|v| (line, v))
                    .map_err(|e| format!("{line}:{column}: {e}"))
            })
            .collect();
    }
    let mut events = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with("//") {
            continue;
        }
        let value: Value = serde_json::from_str(line)
            .map_err(|e| format!("{}:{}: not a JSON event: {e}", n + 1, e.column()))?;
        events.push((n + 1, value));
    }
    Ok(events)
}

/// The (line, column) where `part` (a slice of `text`) starts.
pub(crate) fn line_of(text: &str, part: &str) -> (usize, usize) {
    let offset = (part.as_ptr() as usize)
        .saturating_sub(text.as_ptr() as usize)
        .min(text.len());
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let column = offset - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// A replay session: automations loaded into a fresh engine on a virtual clock.
pub struct Replay {
    engine: Engine,
    templates: TemplateEngine,
    clock: Option<DateTime<Utc>>,
    limits: EventLimits,
}

impl Replay {
    /// A replay over `automations`. De-duplication remembers every id for the whole stream.
    pub fn new(automations: Vec<Arc<Automation>>) -> Replay {
        let config = EngineConfig {
            dedupe_window: None,
            dedupe_capacity: None,
            ..EngineConfig::default()
        };
        Replay::with_config(automations, config)
    }

    /// A replay with a custom engine configuration (tests compare indexed and brute force).
    pub fn with_config(automations: Vec<Arc<Automation>>, config: EngineConfig) -> Replay {
        let mut engine = Engine::new(config);
        engine.set_flow_keys(Arc::new(TemplateFlowKeys(TemplateEngine::new())));
        engine.load(automations);
        Replay {
            engine,
            templates: TemplateEngine::new(),
            clock: None,
            limits: EventLimits::default(),
        }
    }

    /// Feeds one raw event. `position` names it in errors (e.g. `line 4`).
    pub fn feed(&mut self, raw: &Value, position: &str) -> Result<Vec<FiringRecord>, ReplayError> {
        let placeholder = self.clock.unwrap_or(DateTime::<Utc>::MIN_UTC);
        let mut event = Event::from_json(raw, placeholder, &self.limits)
            .map_err(|e| ReplayError::Events(format!("{position}: {e}")))?;
        if raw.get("occurred").is_none_or(Value::is_null) && self.clock.is_none() {
            return Err(ReplayError::Events(format!(
                "{position}: occurred: the first event of a replay needs a time"
            )));
        }
        event.received = event.occurred;
        let now = self.clock.map_or(event.occurred, |c| c.max(event.occurred));
        self.clock = Some(now);
        let firings = self.engine.handle(Arc::new(event), now);
        Ok(self.records(&firings))
    }

    /// Advances the virtual clock to `until`, firing any deadlines on the way.
    pub fn finish(&mut self, until: Option<DateTime<Utc>>) -> Vec<FiringRecord> {
        let Some(until) = until else {
            return Vec::new();
        };
        if self.clock.is_some_and(|c| until < c) {
            return Vec::new();
        }
        self.clock = Some(until);
        let firings = self.engine.advance_to(until);
        self.records(&firings)
    }

    fn records(&self, firings: &[Firing]) -> Vec<FiringRecord> {
        firings
            .iter()
            .map(|f| render_firing(&self.templates, f))
            .collect()
    }
}

/// Renders a firing's actions the way the action layer will: `actions` then
/// `actions_on_trigger` for a triggered firing (the latter seeing the
/// `prefect.automation.triggered` event as `event`), `actions_on_resolve` for a resolved one.
pub fn render_firing(templates: &TemplateEngine, firing: &Firing) -> FiringRecord {
    let automation = &firing.automation;
    // Building the template context is the expensive part; build each one only if an action
    // actually renders something.
    let base = std::cell::OnceCell::new();
    let base_context = || {
        base.get_or_init(|| TemplateContext {
            automation: Some(automation.clone()),
            event: firing.event.clone(),
            labels: firing.labels.clone(),
            firing: firing.to_json(),
            firings: all_firings(firing),
            events: firing.events(),
            extra: flow_variables(firing),
        })
    };
    let base_value = std::cell::OnceCell::new();
    let state_value = std::cell::OnceCell::new();
    let mut actions = Vec::new();
    let (main, extra) = match firing.state {
        FiringState::Triggered => (&automation.actions, &automation.actions_on_trigger),
        FiringState::Resolved => (&automation.actions_on_resolve, &Vec::new()),
    };
    for (list, use_state_event) in [(main, firing.state == FiringState::Resolved), (extra, true)] {
        for action in list {
            if action.action_type != "run-deployment" {
                actions.push(ActionRecord {
                    action_type: action.action_type.clone(),
                    parameters: Value::Null,
                    error: None,
                });
                continue;
            }
            let ctx = if use_state_event {
                state_value.get_or_init(|| {
                    TemplateContext {
                        event: Some(Arc::new(firing.state_change_event())),
                        ..base_context().clone()
                    }
                    .to_value()
                })
            } else {
                base_value.get_or_init(|| base_context().to_value())
            };
            actions.push(render_action(templates, action, ctx));
        }
    }
    FiringRecord {
        automation: automation.name.clone(),
        state: firing.state.as_str(),
        at: format_timestamp(firing.at),
        event: firing.event.as_ref().map(|e| e.id.to_string()),
        actions,
        flow: firing.flow.as_deref().cloned(),
    }
}

fn render_action(
    templates: &TemplateEngine,
    action: &spur_core::Action,
    ctx: &minijinja::Value,
) -> ActionRecord {
    if action.action_type != "run-deployment" {
        return ActionRecord {
            action_type: action.action_type.clone(),
            parameters: Value::Null,
            error: None,
        };
    }
    match render_parameters(templates, action.parameters(), ctx) {
        Ok(parameters) => ActionRecord {
            action_type: action.action_type.clone(),
            parameters,
            error: None,
        },
        Err(e) => ActionRecord {
            action_type: action.action_type.clone(),
            parameters: Value::Null,
            error: Some(format!("Unable to create flow run from deployment: {e}")),
        },
    }
}

fn all_firings(firing: &Firing) -> Vec<Value> {
    let mut out = vec![firing.to_json()];
    for child in &firing.children {
        out.extend(all_firings(child));
    }
    out
}

/// Runs a whole replay: automations, events, optional `until`. Returns every firing in order.
pub fn replay(
    automations: Vec<Arc<Automation>>,
    events: &[(usize, Value)],
    until: Option<DateTime<Utc>>,
) -> Result<Vec<FiringRecord>, ReplayError> {
    let mut session = Replay::new(automations);
    let mut out = Vec::new();
    for (line, raw) in events {
        out.extend(session.feed(raw, &format!("line {line}"))?);
    }
    out.extend(session.finish(until));
    Ok(out)
}

/// The template context of a firing, as its actions see it: `event` is the triggering event,
/// or with `state_event` the firing's `prefect.automation.triggered`/`.resolved` event (what
/// Prefect gives `actions_on_trigger` and `actions_on_resolve`).
pub fn firing_context(firing: &Firing, state_event: bool) -> TemplateContext {
    TemplateContext {
        automation: Some(firing.automation.clone()),
        event: if state_event {
            Some(Arc::new(firing.state_change_event()))
        } else {
            firing.event.clone()
        },
        labels: firing.labels.clone(),
        firing: firing.to_json(),
        firings: all_firings(firing),
        events: firing.events(),
        extra: flow_variables(firing),
    }
}

/// What flow control did to `firing`, as template variables: `debounce` or `batch`
/// (`key`, `count`, `events`: the ids of the collapsed firings' events for a debounce, the
/// events themselves for a batch; `first`: when the first fired) and `throttle` when it was
/// held back (`delayed_from`) or skipped (`skipped`).
pub fn flow_variables(firing: &Firing) -> Vec<(&'static str, Value)> {
    let Some(flow) = firing.flow.as_deref() else {
        return Vec::new();
    };
    let mut variables = Vec::new();
    let summary = |events: Value| {
        json!({
            "key": flow.key,
            "count": flow.count,
            "events": events,
            "first": format_timestamp(flow.first_at),
        })
    };
    match flow.kind {
        FlowKind::Debounce => variables.push(("debounce", summary(json!(flow.events)))),
        FlowKind::Batch => {
            let events: Vec<Value> = firing.events().iter().map(|e| e.to_json()).collect();
            variables.push(("batch", summary(Value::Array(events))));
        }
        FlowKind::Throttle => {}
    }
    if flow.kind == FlowKind::Throttle || flow.delayed_from.is_some() || flow.skipped.is_some() {
        variables.push((
            "throttle",
            json!({
                "key": flow.key,
                "delayed_from": flow.delayed_from.map(format_timestamp),
                "skipped": flow.skipped,
            }),
        ));
    }
    variables
}

/// Flow-control keys rendered by the template engine, against the firing's context (as an
/// action's templates see it).
pub struct TemplateFlowKeys(pub TemplateEngine);

impl std::fmt::Debug for TemplateFlowKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TemplateFlowKeys")
    }
}

impl FlowKeys for TemplateFlowKeys {
    fn render(&self, template: &str, firing: &Firing) -> Result<String, String> {
        let context = firing_context(firing, false).to_value();
        self.0
            .render_text(template, &context)
            .map_err(|e| e.to_string())
    }
}
