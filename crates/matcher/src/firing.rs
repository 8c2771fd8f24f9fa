//! What the matcher produces: a [`Firing`] of an automation.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use spur_core::{Automation, Event};
use uuid::Uuid;

/// Whether a firing starts or ends an alert.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FiringState {
    /// The trigger's condition was met (Prefect's `Triggered`).
    Triggered,
    /// A proactive trigger's condition cleared after it had fired (Spur; Prefect OSS never
    /// resolves).
    Resolved,
}

impl FiringState {
    /// `"triggered"` / `"resolved"`, as printed by `spur replay`.
    pub fn as_str(self) -> &'static str {
        match self {
            FiringState::Triggered => "triggered",
            FiringState::Resolved => "resolved",
        }
    }
}

/// One firing of one trigger. Top-level firings are what the engine returns; child firings of
/// composite triggers appear inside their parent's `children`.
#[derive(Clone, Debug)]
pub struct Firing {
    /// Stable id derived from (automation, trigger, bucket, window, event): replaying the same
    /// stream yields the same ids, which makes launching idempotent.
    pub id: Uuid,
    /// The automation this firing belongs to.
    pub automation: Arc<Automation>,
    /// The trigger that fired (the top-level one for composite firings).
    pub trigger_id: Uuid,
    /// Triggered or resolved.
    pub state: FiringState,
    /// The engine clock when it fired.
    pub at: DateTime<Utc>,
    /// The event that completed it (reactive), the last event of the window (proactive), or
    /// the completing child's event (composite). `None` for a proactive window that saw none.
    pub event: Option<Arc<Event>>,
    /// `for_each` label → value of the bucket that fired (empty for composites, as in Prefect).
    pub labels: Vec<(String, String)>,
    /// The child firings that completed a composite trigger (for a `batch`: the firings it
    /// groups).
    pub children: Vec<Arc<Firing>>,
    /// What flow control did to it (collapsed, delayed, skipped); `None` without flow control.
    pub flow: Option<Arc<crate::flow::FlowSummary>>,
}

impl Firing {
    /// Every event of this firing and its children, each once, in firing order.
    pub fn events(&self) -> Vec<Arc<Event>> {
        let mut out: Vec<Arc<Event>> = Vec::new();
        fn walk(f: &Firing, out: &mut Vec<Arc<Event>>) {
            for child in &f.children {
                walk(child, out);
            }
            if let Some(e) = &f.event
                && !out.iter().any(|x| x.id == e.id)
            {
                out.push(e.clone());
            }
        }
        walk(self, &mut out);
        out
    }
}

impl Firing {
    /// The firing as Prefect's template context sees it (`firing`): id, trigger, states, time,
    /// labels, triggering event and child firings.
    pub fn to_json(&self) -> serde_json::Value {
        let trigger = find_trigger_json(&self.automation, self.trigger_id);
        serde_json::json!({
            "id": self.id,
            "trigger": trigger,
            "trigger_states": [match self.state {
                FiringState::Triggered => "Triggered",
                FiringState::Resolved => "Resolved",
            }],
            "triggered": spur_core::time::format_timestamp(self.at),
            "triggering_labels": self.labels_json(),
            "triggering_event": self.event.as_ref().map(|e| e.to_json()),
            "triggering_firings": self.children.iter().map(|c| c.to_json()).collect::<Vec<_>>(),
        })
    }

    /// Prefect's `prefect.automation.triggered` / `.resolved` event for this firing (§4.8):
    /// resource = the automation; related = the triggering event; payload = labels and event.
    /// Its id is derived from the firing id, so it is the same every time.
    pub fn state_change_event(&self) -> Event {
        let automation = &self.automation;
        let mut resource = spur_core::Resource::from_pairs([
            (
                spur_core::event::RESOURCE_ID.to_owned(),
                format!("prefect.automation.{}", automation.id),
            ),
            (
                spur_core::event::RESOURCE_NAME.to_owned(),
                automation.name.clone(),
            ),
        ]);
        if let spur_core::Trigger::Event(t) = &automation.trigger
            && t.id == self.trigger_id
        {
            let posture = match t.posture {
                spur_core::Posture::Reactive => "Reactive",
                spur_core::Posture::Proactive => "Proactive",
            };
            resource.insert("prefect.posture".to_owned(), posture.to_owned());
        }
        let related = self
            .event
            .iter()
            .map(|e| {
                spur_core::Resource::from_pairs([
                    (
                        spur_core::event::RESOURCE_ID.to_owned(),
                        format!("prefect.event.{}", e.id),
                    ),
                    (
                        spur_core::event::RESOURCE_ROLE.to_owned(),
                        "triggering-event".to_owned(),
                    ),
                ])
            })
            .collect();
        let id = spur_core::derived_id(self.id, &format!("state-change:{}", self.id));
        Event {
            id,
            occurred: self.at,
            event: format!("prefect.automation.{}", self.state.as_str()),
            resource,
            related,
            payload: serde_json::json!({
                "triggering_labels": self.labels_json(),
                "triggering_event": self.event.as_ref().map(|e| e.to_json()),
            }),
            follows: None,
            received: self.at,
        }
    }
}

fn find_trigger_json(automation: &Automation, id: Uuid) -> serde_json::Value {
    fn walk(t: &spur_core::Trigger, id: Uuid) -> Option<serde_json::Value> {
        match t {
            spur_core::Trigger::Event(e) if e.id == id => serde_json::to_value(&**e).ok(),
            spur_core::Trigger::Composite(c) if c.id == id => serde_json::to_value(c).ok(),
            spur_core::Trigger::Composite(c) => c.triggers.iter().find_map(|child| walk(child, id)),
            spur_core::Trigger::Event(_) => None,
        }
    }
    walk(&automation.trigger, id).unwrap_or(serde_json::Value::Null)
}

impl Firing {
    /// The `for_each` labels as a JSON object.
    pub fn labels_json(&self) -> serde_json::Value {
        serde_json::Value::Object(
            self.labels
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::from(v.as_str())))
                .collect(),
        )
    }
}
