//! Automations: a trigger plus the actions to take when it fires.
//!
//! The schema is Prefect's `AutomationCore` (`name`, `description`, `enabled`, `tags`, `trigger`,
//! `actions`, `actions_on_trigger`, `actions_on_resolve`, `owner_resource`) plus Spur's optional
//! `id`. Like Prefect's create API, unknown top-level keys are refused. Actions keep their JSON
//! fields (the action crate interprets them); here they are checked against Prefect's action
//! table so mistakes surface when the file loads, not when the trigger fires.

use serde::Serialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::problem::json_type_name;
use crate::problem::{FieldPath, Problems};
use crate::time::parse_duration;
use crate::trigger::{Dialect, Trigger, is_flow_run_loop_risk, matches_every_flow_run};

/// An automation as loaded from a file.
#[derive(Clone, Debug, Serialize)]
pub struct Automation {
    /// Stable id: given, or a UUIDv5 of the name.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Disabled automations are loaded but never evaluated.
    pub enabled: bool,
    /// Free-form tags.
    pub tags: Vec<String>,
    /// What to watch for.
    pub trigger: Trigger,
    /// Run on every firing.
    pub actions: Vec<Action>,
    /// Run when the trigger fires (state `triggered`).
    pub actions_on_trigger: Vec<Action>,
    /// Run when a proactive trigger's condition clears (state `resolved`).
    pub actions_on_resolve: Vec<Action>,
    /// The resource that owns this automation (e.g. `prefect.deployment.<id>`).
    pub owner_resource: Option<String>,
    /// Spur's flow control (`debounce`, `throttle`, `batch`; see [`crate::flow`]), boxed: most
    /// automations have none, and each costs one pointer then.
    #[serde(skip_serializing_if = "Option::is_none", flatten)]
    pub flow: Option<Box<crate::flow::FlowControl>>,
}

/// The action types Prefect's server knows, plus Spur's `emit-event`.
pub const ACTION_TYPES: &[&str] = &[
    "do-nothing",
    "run-deployment",
    "pause-deployment",
    "resume-deployment",
    "cancel-flow-run",
    "suspend-flow-run",
    "resume-flow-run",
    "change-flow-run-state",
    "delete-flow-run",
    "pause-work-queue",
    "resume-work-queue",
    "pause-work-pool",
    "resume-work-pool",
    "pause-automation",
    "resume-automation",
    "send-notification",
    "call-webhook",
    "emit-event",
];

const FLOW_RUN_STATES: &[&str] = &[
    "SCHEDULED",
    "PENDING",
    "RUNNING",
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "CRASHED",
    "PAUSED",
    "CANCELLING",
];

/// One action: its Prefect `type` and its other fields, defaults filled in.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Action {
    /// Prefect's action type, e.g. `run-deployment`.
    #[serde(rename = "type")]
    pub action_type: String,
    /// Every other field, as JSON.
    #[serde(flatten)]
    pub fields: Map<String, Value>,
}

impl Action {
    /// A field by name.
    pub fn field(&self, name: &str) -> Option<&Value> {
        self.fields.get(name)
    }

    /// For `run-deployment`: the parameters to render (null → `{}`).
    pub fn parameters(&self) -> Option<&Value> {
        self.fields.get("parameters").filter(|v| !v.is_null())
    }

    fn parse(value: &Value, path: &FieldPath, problems: &mut Problems) -> Option<Action> {
        let Value::Object(map) = value else {
            problems.error(
                path,
                format!("an action must be a mapping, got {}", json_type_name(value)),
            );
            return None;
        };
        let action_type = match map.get("type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                problems.error(&path.key("type"), format!("must be a string, got {other}"));
                return None;
            }
            None => {
                problems.error(
                    &path.key("type"),
                    format!("is required; one of: {}", ACTION_TYPES.join(", ")),
                );
                return None;
            }
        };
        if action_type == "declare-incident" {
            problems.error(
                &path.key("type"),
                "declare-incident is a Prefect Cloud action and is not supported",
            );
            return None;
        }
        if !ACTION_TYPES.contains(&action_type.as_str()) {
            problems.error(
                &path.key("type"),
                format!(
                    "unknown action type {action_type:?}; one of: {}",
                    ACTION_TYPES.join(", ")
                ),
            );
            return None;
        }
        let mut fields: Map<String, Value> = map
            .iter()
            .filter(|(k, _)| k.as_str() != "type")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let errors_before = problems.error_count();
        match action_type.as_str() {
            "run-deployment" => {
                check_source(
                    &mut fields,
                    "deployment_id",
                    Some("deployment"),
                    path,
                    problems,
                );
                for key in ["parameters", "job_variables"] {
                    match fields.get(key) {
                        None => {
                            fields.insert(key.to_owned(), Value::Null);
                        }
                        Some(Value::Null | Value::Object(_)) => {}
                        Some(other) => problems.error(
                            &path.key(key),
                            format!("must be a mapping or null, got {}", json_type_name(other)),
                        ),
                    }
                }
                match fields.get("schedule_after") {
                    None => {
                        fields.insert("schedule_after".to_owned(), Value::from(0));
                    }
                    Some(v) => match parse_duration(v) {
                        Ok(d) if d < chrono::TimeDelta::zero() => problems.error(
                            &path.key("schedule_after"),
                            "must be greater than or equal to 0",
                        ),
                        Ok(_) => {}
                        Err(reason) => problems.error(&path.key("schedule_after"), reason),
                    },
                }
            }
            "pause-deployment" | "resume-deployment" => check_source(
                &mut fields,
                "deployment_id",
                Some("deployment"),
                path,
                problems,
            ),
            "pause-work-queue" | "resume-work-queue" => {
                check_source(&mut fields, "work_queue_id", None, path, problems)
            }
            "pause-work-pool" | "resume-work-pool" => {
                check_source(&mut fields, "work_pool_id", None, path, problems)
            }
            "pause-automation" | "resume-automation" => check_source(
                &mut fields,
                "automation_id",
                Some("automation"),
                path,
                problems,
            ),
            "change-flow-run-state" => match fields.get("state") {
                Some(Value::String(s)) if FLOW_RUN_STATES.contains(&s.as_str()) => {}
                Some(other) => problems.error(
                    &path.key("state"),
                    format!("must be one of {}, got {other}", FLOW_RUN_STATES.join(", ")),
                ),
                None => problems.error(
                    &path.key("state"),
                    format!("is required; one of {}", FLOW_RUN_STATES.join(", ")),
                ),
            },
            "send-notification" => {
                require_one_of(&fields, &["block_document_id", "url"], path, problems);
                if !fields.contains_key("body") {
                    problems.error(&path.key("body"), "is required");
                }
                fields
                    .entry("subject")
                    .or_insert_with(|| Value::from("Prefect automated notification"));
            }
            "call-webhook" => {
                require_one_of(&fields, &["block_document_id", "url"], path, problems);
                match fields.get("payload") {
                    None => {
                        fields.insert("payload".to_owned(), Value::from(""));
                    }
                    // Prefect turns an object payload into indented JSON text.
                    Some(v @ (Value::Object(_) | Value::Array(_))) => {
                        let text = serde_json::to_string_pretty(v).unwrap_or_default();
                        fields.insert("payload".to_owned(), Value::from(text));
                    }
                    Some(_) => {}
                }
            }
            "emit-event" => match fields.get("event") {
                Some(Value::Object(_)) => {}
                Some(other) => problems.error(
                    &path.key("event"),
                    format!(
                        "must be an event template mapping, got {}",
                        json_type_name(other)
                    ),
                ),
                None => problems.error(
                    &path.key("event"),
                    "is required: the event to emit (`event`, `resource`, …)",
                ),
            },
            _ => {}
        }
        (problems.error_count() == errors_before).then_some(Action {
            action_type,
            fields,
        })
    }
}

/// Prefect's `source` rule: `selected` requires the id, `inferred` forbids it.
/// `name_key` is Spur's alternative to the id: refer to a declared object by name.
fn check_source(
    fields: &mut Map<String, Value>,
    id_key: &str,
    name_key: Option<&str>,
    path: &FieldPath,
    problems: &mut Problems,
) {
    let source = match fields.get("source") {
        None => "selected".to_owned(),
        Some(Value::String(s)) if s == "selected" || s == "inferred" => s.clone(),
        Some(other) => {
            problems.error(
                &path.key("source"),
                format!("must be \"selected\" or \"inferred\", got {other}"),
            );
            return;
        }
    };
    fields.insert("source".to_owned(), Value::from(source.as_str()));
    let has_id = fields.get(id_key).is_some_and(|v| !v.is_null());
    let has_name = name_key.is_some_and(|k| fields.get(k).is_some_and(|v| !v.is_null()));
    if source == "selected" {
        if !has_id && !has_name {
            let alternative = name_key
                .map(|k| format!(" (or `{k}`: a name)"))
                .unwrap_or_default();
            problems.error(
                &path.key(id_key),
                format!("{id_key} is required when source is \"selected\"{alternative}"),
            );
        }
        if let Some(v) = fields.get(id_key).filter(|v| !v.is_null()) {
            let valid = v.as_str().is_some_and(|s| Uuid::parse_str(s).is_ok());
            if !valid {
                problems.error(&path.key(id_key), format!("must be a UUID, got {v}"));
            }
        }
    } else if has_id || has_name {
        problems.error(
            &path.key(id_key),
            format!("{id_key} is not allowed when source is \"inferred\""),
        );
    }
}

fn require_one_of(
    fields: &Map<String, Value>,
    keys: &[&str],
    path: &FieldPath,
    problems: &mut Problems,
) {
    if !keys.iter().any(|k| fields.contains_key(*k)) {
        problems.error(
            &path.key(keys[0]),
            format!("one of {} is required", keys.join(" or ")),
        );
    }
}

const AUTOMATION_KEYS: &[&str] = &[
    "id",
    "name",
    "description",
    "enabled",
    "tags",
    "trigger",
    "actions",
    "actions_on_trigger",
    "actions_on_resolve",
    "owner_resource",
    "debounce",
    "throttle",
    "batch",
    "concurrency",
];

impl Automation {
    /// Parses and validates one automation object. Problems are reported relative to it.
    pub fn parse(value: &Value, dialect: Dialect, problems: &mut Problems) -> Option<Automation> {
        let root = FieldPath::root();
        let Value::Object(map) = value else {
            problems.error(
                &root,
                format!(
                    "an automation must be a mapping, got {}",
                    json_type_name(value)
                ),
            );
            return None;
        };
        let errors_before = problems.error_count();
        for key in map.keys() {
            // Read models from Prefect's API carry these; they are not part of a definition.
            if matches!(key.as_str(), "created" | "updated") {
                problems.warn(&root.key(key), "ignored: server-managed field");
                continue;
            }
            if !AUTOMATION_KEYS.contains(&key.as_str()) {
                problems.error(
                    &root.key(key),
                    format!(
                        "unknown automation field; known fields: {}",
                        AUTOMATION_KEYS.join(", ")
                    ),
                );
            }
        }
        let name = match map.get("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(Value::String(_)) => {
                problems.error(&root.key("name"), "must not be empty");
                String::new()
            }
            Some(other) => {
                problems.error(&root.key("name"), format!("must be a string, got {other}"));
                String::new()
            }
            None => {
                problems.error(&root.key("name"), "is required");
                String::new()
            }
        };
        let id = match map.get("id") {
            None | Some(Value::Null) => Uuid::new_v5(
                &crate::SPUR_NAMESPACE,
                format!("automation:{name}").as_bytes(),
            ),
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
        let description = match map.get("description") {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                problems.error(
                    &root.key("description"),
                    format!("must be a string, got {other}"),
                );
                String::new()
            }
        };
        let enabled = match map.get("enabled") {
            None => true,
            Some(Value::Bool(b)) => *b,
            Some(other) => {
                problems.error(
                    &root.key("enabled"),
                    format!("must be true or false, got {other}"),
                );
                true
            }
        };
        let tags = match map.get("tags") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .filter_map(|(i, t)| match t {
                    Value::String(s) => Some(s.clone()),
                    other => {
                        problems.error(
                            &root.key("tags").index(i),
                            format!("must be a string, got {other}"),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                problems.error(
                    &root.key("tags"),
                    format!("must be a list of strings, got {other}"),
                );
                Vec::new()
            }
        };
        let owner_resource = match map.get("owner_resource") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                problems.error(
                    &root.key("owner_resource"),
                    format!("must be a string, got {other}"),
                );
                None
            }
        };
        let trigger = match map.get("trigger") {
            Some(v) => Trigger::parse(v, &root.key("trigger"), dialect, &id.to_string(), problems),
            None => {
                problems.error(&root.key("trigger"), "is required");
                None
            }
        };
        let mut parse_actions = |key: &str, required: bool| -> Vec<Action> {
            match map.get(key) {
                None if required => {
                    problems.error(&root.key(key), "is required (a list of actions)");
                    Vec::new()
                }
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(items)) => {
                    let mut actions: Vec<Action> = items
                        .iter()
                        .enumerate()
                        .filter_map(|(i, item)| {
                            Action::parse(item, &root.key(key).index(i), problems)
                        })
                        .collect();
                    actions.shrink_to_fit();
                    actions
                }
                Some(other) => {
                    problems.error(
                        &root.key(key),
                        format!("must be a list of actions, got {}", json_type_name(other)),
                    );
                    Vec::new()
                }
            }
        };
        // `filter_map(..).collect()` over-allocates (it cannot know how many survive); a large
        // automation set keeps these lists for its whole life, so trim them to size (the
        // action lists are trimmed in `parse_actions`).
        let mut tags = tags;
        tags.shrink_to_fit();
        let actions = parse_actions("actions", true);
        let actions_on_trigger = parse_actions("actions_on_trigger", false);
        let actions_on_resolve = parse_actions("actions_on_resolve", false);
        let flow = crate::flow::FlowControl::parse(map, &root, problems).map(Box::new);

        if problems.error_count() != errors_before {
            return None;
        }
        let trigger = trigger?;
        let automation = Automation {
            id,
            name,
            description,
            enabled,
            tags,
            trigger,
            actions,
            actions_on_trigger,
            actions_on_resolve,
            owner_resource,
            flow,
        };
        automation.check_loop_guard(problems);
        (problems.error_count() == errors_before).then_some(automation)
    }

    /// Prefect's `prevent_run_deployment_loops`.
    fn check_loop_guard(&self, problems: &mut Problems) {
        let Trigger::Event(trigger) = &self.trigger else {
            return;
        };
        if !self.enabled || !is_flow_run_loop_risk(trigger) {
            return;
        }
        let root = FieldPath::root();
        let lists = [
            ("actions", &self.actions),
            ("actions_on_trigger", &self.actions_on_trigger),
            ("actions_on_resolve", &self.actions_on_resolve),
        ];
        for (key, actions) in lists {
            for (i, action) in actions.iter().enumerate() {
                if action.action_type != "run-deployment" {
                    continue;
                }
                let inferred = action.field("source").and_then(Value::as_str) == Some("inferred");
                if inferred || matches_every_flow_run(trigger) {
                    problems.error(
                        &root.key(key).index(i),
                        "Running an inferred deployment from a flow run state trigger \
                         (or a selected one on every flow run) will lead to an infinite loop \
                         of flow runs; narrow `match`/`match_related`",
                    );
                }
            }
        }
    }

    /// All actions that run for a triggered firing, in Prefect's order.
    pub fn triggered_actions(&self) -> impl Iterator<Item = &Action> {
        self.actions.iter().chain(self.actions_on_trigger.iter())
    }

    /// A one-line human summary (used by `spur check`).
    pub fn summary(&self) -> String {
        let leaves = self.trigger.leaves();
        let names: Vec<&str> = leaves
            .iter()
            .flat_map(|l| l.expect.iter().map(String::as_str))
            .collect();
        let expect = if names.is_empty() {
            "any event".to_owned()
        } else {
            names.join(", ")
        };
        let actions: Vec<&str> = self
            .actions
            .iter()
            .chain(&self.actions_on_trigger)
            .chain(&self.actions_on_resolve)
            .map(|a| a.action_type.as_str())
            .collect();
        format!(
            "{}{}: {} trigger on [{}] → {}",
            self.name,
            if self.enabled { "" } else { " (disabled)" },
            self.trigger.type_name(),
            expect,
            if actions.is_empty() {
                "no actions".to_owned()
            } else {
                actions.join(", ")
            }
        )
    }
}
