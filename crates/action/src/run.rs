//! Flow runs: their states, and the `prefect.flow-run.<State>` events they emit.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use spur_core::time::format_timestamp;
use spur_core::{Event, EventLimits};
use uuid::Uuid;

use crate::deployment::Deployment;

/// Prefect's state names for a flow run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunState {
    /// Created, waiting to start.
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
}

impl Run {
    /// A new Scheduled run (no event emitted yet: see [`Run::transition`]).
    pub fn new(
        deployment: &Deployment,
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
            name: format!("{}-{}", deployment.name, &short[short.len() - 8..]),
            deployment_id: deployment.id,
            deployment: deployment.name.clone(),
            flow_id: deployment.flow_id(),
            flow: deployment.flow.clone(),
            parameters,
            idempotency_key,
            automation,
            state: RunState::Scheduled,
            history: Vec::new(),
            result: None,
            created: now,
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
        let previous = self.history.last().cloned();
        let event_id = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!(
                "flow-run-state:{}:{}:{}",
                self.id,
                self.history.len(),
                state.name()
            )
            .as_bytes(),
        );
        self.state = state;
        self.history.push(StateRecord {
            state,
            at: now,
            message: message.clone(),
            event_id,
        });
        let mut resource = json!({
            "prefect.resource.id": format!("prefect.flow-run.{}", self.id),
            "prefect.resource.name": self.name,
            "prefect.state-name": state.name(),
            "prefect.state-type": state.state_type(),
            "prefect.state-timestamp": format_timestamp(now),
        });
        if let Some(m) = &message {
            resource["prefect.state-message"] = json!(m);
        }
        let state_json = |s: RunState, m: &Option<String>| json!({"type": s.state_type(), "name": s.name(), "message": m});
        let mut payload = json!({
            "intended": {"from": previous.as_ref().map(|p| p.state.state_type()), "to": state.state_type()},
            "initial_state": previous.as_ref().map(|p| state_json(p.state, &p.message)),
            "validated_state": state_json(state, &message),
        });
        if state == RunState::Completed {
            payload["result"] = self.result.clone().unwrap_or(Value::Null);
        }
        let raw = json!({
            "id": event_id,
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
        Event::from_json(&raw, now, &EventLimits::default()).unwrap_or_else(|e| {
            tracing::error!(error = %e, "could not build a flow-run event");
            Event::from_json(&json!({"event": "spur.internal-error", "resource": {"prefect.resource.id": "spur"}}), now, &EventLimits::default())
                .unwrap_or_else(|_| unreachable_event(now))
        })
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
