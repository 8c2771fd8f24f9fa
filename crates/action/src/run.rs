//! Flow runs: their states, what a launch reports back, and the `prefect.flow-run.<State>`
//! events they emit.
//!
//! This module is the bottom of the crate: launchers ([`crate::launcher`], [`crate::remote`],
//! [`crate::worker`]) report an [`Outcome`] for a [`Run`], and deployments
//! ([`crate::deployment`]) create runs; nothing here depends on them.
//!
//! A run's record is the source of truth for its states. Every state it enters is one
//! [`StateRecord`] with the id of the event that announces it; [`Run::state_event`] rebuilds
//! that event from the record alone, so the daemon can emit any a crash cut off (the ids are
//! derived, the event log keeps each once).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spur_core::time::format_timestamp;
use spur_core::{Event, EventLimits};
use uuid::Uuid;

/// How a launched run ended, as its launcher saw it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// Completed, Failed, Crashed or Cancelled.
    pub state: RunState,
    /// The result, for Completed runs.
    pub result: Option<Value>,
    /// Why (exit status, timeout, the remote side's message…).
    pub message: Option<String>,
    /// The process's exit code, if a process ran and exited.
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The tail of what the run printed or answered (bounded, [`OUTPUT_TAIL`]).
    #[serde(default)]
    pub output: Option<String>,
}

impl Outcome {
    /// A Crashed outcome with a reason and nothing else.
    pub fn crashed(message: impl Into<String>) -> Outcome {
        Outcome {
            state: RunState::Crashed,
            message: Some(message.into()),
            ..Outcome::default()
        }
    }

    /// A Failed outcome with a reason and nothing else.
    pub fn failed(message: impl Into<String>) -> Outcome {
        Outcome {
            state: RunState::Failed,
            message: Some(message.into()),
            ..Outcome::default()
        }
    }
}

/// How much of a run's output is kept with it: the last 64 KiB.
pub const OUTPUT_TAIL: usize = 64 * 1024;

/// The last `max` bytes of `text` (cut at a character boundary, marked with `…`).
pub fn tail(text: &str, max: usize) -> String {
    let t = text.trim_end();
    if t.len() <= max {
        return t.to_owned();
    }
    let mut start = t.len() - max;
    while !t.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &t[start..])
}

/// The process a `command` run started: what a restarted daemon needs to find it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunProcess {
    /// Its pid, which is also its process group (every run gets a group of its own).
    pub pid: u32,
    /// Its start time in clock ticks after boot (`/proc/<pid>/stat`, field 22), so a pid
    /// reused by another process is not mistaken for it.
    pub start_ticks: Option<u64>,
}

/// Prefect's state names for a flow run.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RunState {
    /// Created, waiting to start.
    #[default]
    Scheduled,
    /// Being started.
    Pending,
    /// Running.
    Running,
    /// Finished successfully (with a result).
    Completed,
    /// Finished with an error of the flow's own.
    Failed,
    /// Could not run to an end: the launcher failed, timed out, or the daemon died under it.
    Crashed,
    /// Cancelled by a user or an automation.
    Cancelled,
}

impl RunState {
    /// The state name (`Completed`).
    pub fn name(self) -> &'static str {
        match self {
            RunState::Scheduled => "Scheduled",
            RunState::Pending => "Pending",
            RunState::Running => "Running",
            RunState::Completed => "Completed",
            RunState::Failed => "Failed",
            RunState::Crashed => "Crashed",
            RunState::Cancelled => "Cancelled",
        }
    }

    /// Prefect's state type (`COMPLETED`).
    pub fn state_type(self) -> &'static str {
        match self {
            RunState::Scheduled => "SCHEDULED",
            RunState::Pending => "PENDING",
            RunState::Running => "RUNNING",
            RunState::Completed => "COMPLETED",
            RunState::Failed => "FAILED",
            RunState::Crashed => "CRASHED",
            RunState::Cancelled => "CANCELLED",
        }
    }

    /// Reads a state name (`Completed`) or type (`COMPLETED`), in any case.
    pub fn parse(name: &str) -> Option<RunState> {
        const ALL: [RunState; 7] = [
            RunState::Scheduled,
            RunState::Pending,
            RunState::Running,
            RunState::Completed,
            RunState::Failed,
            RunState::Crashed,
            RunState::Cancelled,
        ];
        ALL.into_iter()
            .find(|s| s.name().eq_ignore_ascii_case(name))
    }

    /// True once the run can change no more.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RunState::Completed | RunState::Failed | RunState::Crashed | RunState::Cancelled
        )
    }
}

/// One state a run passed through.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StateRecord {
    /// The state.
    pub state: RunState,
    /// When it was entered.
    pub at: DateTime<Utc>,
    /// Why, if anything to say.
    pub message: Option<String>,
    /// The event emitted for it.
    pub event_id: Uuid,
}

/// A flow run of a deployment.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Run {
    /// Run id.
    pub id: Uuid,
    /// A readable name.
    pub name: String,
    /// The deployment.
    pub deployment_id: Uuid,
    /// Its name.
    pub deployment: String,
    /// The flow's id.
    pub flow_id: Uuid,
    /// The flow's name.
    pub flow: String,
    /// Parameters the run got.
    pub parameters: Value,
    /// `firing id:action index` for runs launched by automations (at most one run per key).
    pub idempotency_key: Option<String>,
    /// The automation that launched it, if any.
    pub automation: Option<String>,
    /// Current state.
    pub state: RunState,
    /// Every state so far, oldest first.
    pub history: Vec<StateRecord>,
    /// The result (Completed runs).
    pub result: Option<Value>,
    /// When it was created.
    pub created: DateTime<Utc>,
    /// The message of the state it is in (a failure's or crash's reason).
    #[serde(default)]
    pub message: Option<String>,
    /// The exit code of its process (`command` and `worker` runs).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The tail of its output: stdout and stderr of a process as they came (bounded,
    /// [`OUTPUT_TAIL`]), the answer of an `http` run, the final state of a Prefect flow run.
    #[serde(default)]
    pub output: Option<String>,
    /// The process of a `command` run, once started.
    #[serde(default)]
    pub process: Option<RunProcess>,
    /// The run this one reruns (`spur runs rerun`, or `on_crash: rerun`).
    #[serde(default)]
    pub rerun_of: Option<Uuid>,
    /// When the run is to start, if later than its creation (`run-deployment`'s
    /// `schedule_after`): it stays Scheduled until then, across restarts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_start: Option<DateTime<Utc>>,
    /// Settings for the infrastructure that runs it (`run-deployment`'s `job_variables`,
    /// never templated, as in Prefect). A `command` or `worker` run gets its `env` mapping
    /// as environment variables and the whole mapping as `SPUR_JOB_VARIABLES`; a `prefect`
    /// run hands it to Prefect's `create_flow_run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_variables: Option<Value>,
    /// The rendered `concurrency` key of the automation that launched it: while the run is
    /// in progress it holds one of that key's slots (kept on the record, so a restart that
    /// continues the run gives the slot back to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
}

/// What a run is a run of: its deployment and flow, by name and id.
#[derive(Clone, Debug, PartialEq)]
pub struct RunTarget {
    /// The deployment's id.
    pub deployment_id: Uuid,
    /// The deployment's name.
    pub deployment: String,
    /// The flow's id.
    pub flow_id: Uuid,
    /// The flow's name.
    pub flow: String,
}

impl Run {
    /// A new Scheduled run (no event emitted yet: see [`Run::transition`]).
    pub fn new(
        deployment: &RunTarget,
        parameters: Value,
        idempotency_key: Option<String>,
        automation: Option<String>,
        now: DateTime<Utc>,
    ) -> Run {
        let id = match &idempotency_key {
            // The same key always names the same run.
            Some(key) => Uuid::new_v5(&spur_core::SPUR_NAMESPACE, format!("run:{key}").as_bytes()),
            None => Uuid::now_v7(),
        };
        let short = id.simple().to_string();
        Run {
            id,
            name: format!("{}-{}", deployment.deployment, &short[short.len() - 8..]),
            deployment_id: deployment.deployment_id,
            deployment: deployment.deployment.clone(),
            flow_id: deployment.flow_id,
            flow: deployment.flow.clone(),
            parameters,
            idempotency_key,
            automation,
            state: RunState::Scheduled,
            history: Vec::new(),
            result: None,
            created: now,
            message: None,
            exit_code: None,
            output: None,
            process: None,
            rerun_of: None,
            scheduled_start: None,
            job_variables: None,
            concurrency_key: None,
        }
    }

    /// Moves to `state` and returns the `prefect.flow-run.<State>` event to emit. The event id
    /// is derived from the run and the transition number, so re-emitting is harmless.
    pub fn transition(
        &mut self,
        state: RunState,
        message: Option<String>,
        now: DateTime<Utc>,
    ) -> Event {
        let index = self.history.len();
        let event_id = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("flow-run-state:{}:{index}:{}", self.id, state.name()).as_bytes(),
        );
        self.state = state;
        self.message = message.clone();
        self.history.push(StateRecord {
            state,
            at: now,
            message,
            event_id,
        });
        self.state_event(index)
            .unwrap_or_else(|| unreachable_event(now))
    }

    /// The event that announced the `index`th state of the run's history, rebuilt from the
    /// record (same id, same content), or `None` past the end of the history.
    pub fn state_event(&self, index: usize) -> Option<Event> {
        let record = self.history.get(index)?;
        let previous = index.checked_sub(1).and_then(|i| self.history.get(i));
        let (state, now) = (record.state, record.at);
        let mut resource = json!({
            "prefect.resource.id": format!("prefect.flow-run.{}", self.id),
            "prefect.resource.name": self.name,
            "prefect.state-name": state.name(),
            "prefect.state-type": state.state_type(),
            "prefect.state-timestamp": format_timestamp(now),
        });
        if let Some(m) = &record.message {
            resource["prefect.state-message"] = json!(m);
        }
        let state_json = |s: RunState, m: &Option<String>| {
            let mut state = json!({"type": s.state_type(), "name": s.name(), "message": m});
            // Prefect's Scheduled states say when: `state_details.scheduled_time`.
            if let (RunState::Scheduled, Some(at)) = (s, self.scheduled_start) {
                state["state_details"] = json!({"scheduled_time": format_timestamp(at)});
            }
            state
        };
        let mut payload = json!({
            "intended": {"from": previous.map(|p| p.state.state_type()), "to": state.state_type()},
            "initial_state": previous.map(|p| state_json(p.state, &p.message)),
            "validated_state": state_json(state, &record.message),
        });
        if state == RunState::Completed {
            payload["result"] = self.result.clone().unwrap_or(Value::Null);
        }
        let raw = json!({
            "id": record.event_id,
            "occurred": format_timestamp(now),
            "event": format!("prefect.flow-run.{}", state.name()),
            "resource": resource,
            "related": [
                {"prefect.resource.id": format!("prefect.deployment.{}", self.deployment_id),
                 "prefect.resource.role": "deployment", "prefect.resource.name": self.deployment},
                {"prefect.resource.id": format!("prefect.flow.{}", self.flow_id),
                 "prefect.resource.role": "flow", "prefect.resource.name": self.flow},
            ],
            "payload": payload,
            "follows": previous.map(|p| p.event_id),
        });
        // Built from known-valid parts; the only failure would be a bug, so fall back loudly.
        Some(
            Event::from_json(&raw, now, &EventLimits::default()).unwrap_or_else(|e| {
                tracing::error!(error = %e, "could not build a flow-run event");
                unreachable_event(now)
            }),
        )
    }

    /// The environment a process of this run gets from its `job_variables`: each entry of
    /// their `env` mapping (strings as they are, other values as JSON text; nulls skipped),
    /// then the whole mapping as `SPUR_JOB_VARIABLES`. Empty without job variables.
    pub fn job_environment(&self) -> Vec<(String, String)> {
        let Some(variables) = &self.job_variables else {
            return Vec::new();
        };
        let mut env: Vec<(String, String)> = variables
            .get("env")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                let text = v.as_str().map_or_else(|| v.to_string(), str::to_owned);
                (k.clone(), text)
            })
            .collect();
        env.push(("SPUR_JOB_VARIABLES".to_owned(), variables.to_string()));
        env
    }

    /// Takes what a launch reported (result, exit code, output) and moves to its final state.
    pub fn finish(&mut self, outcome: Outcome, now: DateTime<Utc>) -> Event {
        self.result = outcome.result;
        if outcome.exit_code.is_some() {
            self.exit_code = outcome.exit_code;
        }
        if outcome.output.is_some() {
            self.output = outcome.output;
        }
        self.transition(outcome.state, outcome.message, now)
    }
}

fn unreachable_event(now: DateTime<Utc>) -> Event {
    Event {
        id: Uuid::now_v7(),
        occurred: now,
        event: "spur.internal-error".into(),
        resource: spur_core::Resource::with_id("spur"),
        related: Vec::new(),
        payload: json!({}),
        follows: None,
        received: now,
    }
}
