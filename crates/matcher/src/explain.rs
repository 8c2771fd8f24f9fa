//! Why an automation did or did not react to an event: decisions recorded as the engine
//! evaluates (when asked to), so `spur explain` reports what really happened, not a
//! re-computation against today's state.

use chrono::{DateTime, Utc};
use serde::Serialize;
use spur_core::trigger::ResourceSpecification;
use spur_core::{Event, EventTrigger};
use uuid::Uuid;

/// What happened to an event before any trigger looked at it.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EventFate {
    /// Evaluated by the candidate triggers below.
    Evaluated,
    /// `prefect.log.write` events are ignored, as in Prefect.
    IgnoredLogWrite,
    /// Its id was already processed.
    Duplicate,
    /// Parked until the event it `follows` is processed.
    Held {
        /// The leader it waits for.
        leader: Uuid,
    },
}

/// One candidate trigger's decision about one event.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Decision {
    /// The automation.
    pub automation: String,
    /// Its id.
    pub automation_id: Uuid,
    /// The leaf trigger.
    pub trigger_id: Uuid,
    /// What was decided.
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// The decision itself.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    /// The event name is not one the trigger expects (`expect ∪ after`, with Prefect's rules:
    /// `*` needs at least one character; `?`, `[…]` and `!` never match).
    NameMismatch {
        /// The trigger's `expect` and `after` names.
        patterns: Vec<String>,
        /// The event's name.
        name: String,
    },
    /// A `match` label failed on the event's resource.
    MatchFailed {
        /// The label.
        label: String,
        /// Its patterns.
        patterns: Vec<String>,
        /// The event's value (`null` when the label is missing — which never matches).
        value: Option<String>,
    },
    /// No related resource satisfied one `match_related` spec.
    MatchRelatedFailed {
        /// Which spec (its position).
        spec: usize,
        /// The spec.
        labels: Vec<(String, Vec<String>)>,
    },
    /// Spur's loop guard: an automation ignores its own `prefect.automation.*` events.
    OwnEvent,
    /// An `after` event: opened (or kept) the window for this key.
    OpenedWindow {
        /// The bucket key.
        key: Vec<String>,
    },
    /// An expected event, but no window is open (the trigger waits for an `after` event).
    NoOpenWindow {
        /// The bucket key.
        key: Vec<String>,
    },
    /// Older than the current window's start: a late event, counted nowhere.
    Late {
        /// The bucket key.
        key: Vec<String>,
        /// The window start.
        window_start: DateTime<Utc>,
    },
    /// Counted; not enough (reactive) or not yet decidable (proactive) to fire.
    Counted {
        /// The bucket key.
        key: Vec<String>,
        /// The count after this event.
        count: i64,
        /// The threshold.
        threshold: i64,
        /// The window.
        window_start: DateTime<Utc>,
        /// The window end.
        window_end: DateTime<Utc>,
    },
    /// This event made the trigger fire.
    Fired {
        /// The firing id(s) (a composite parent's firing follows from the leaf's).
        firings: Vec<Uuid>,
    },
    /// The firing it caused waits in the automation's flow control: collapsed into a
    /// debounce or batch, or queued by a throttle, until `until` at the latest.
    FlowWaiting {
        /// The firing that waits.
        firing: Uuid,
        /// `debounce`, `batch` or `throttle`.
        flow: crate::flow::FlowKind,
        /// The rendered key.
        key: String,
        /// Firings waiting under that key now (this one included).
        waiting: u64,
        /// When they are handed on, if no other firing moves it (a debounce's next firing
        /// pushes it back, up to `max_wait`).
        until: Option<DateTime<Utc>>,
    },
    /// The firing it caused was skipped by flow control; its actions never run.
    FlowSkipped {
        /// The firing.
        firing: Uuid,
        /// Why.
        reason: String,
    },
}

/// Filter mismatches ([`Outcome::is_filter_mismatch`]) the engine keeps per event; the rest
/// are only counted. An event that 640 automations expect by name but whose resource only one
/// matches meets 639 of them: recording and storing each (~200 bytes) cost more than
/// everything else the daemon did with the event.
pub const MISMATCHES_KEPT: usize = 32;

impl Outcome {
    /// Whether this is a filter mismatch: the trigger's names, `match`, `match_related` or
    /// loop guard ruled the event out before any state was looked at. Such a decision
    /// follows from the event and the trigger alone, and an event can meet one per loaded
    /// automation, so the engine keeps only the first [`MISMATCHES_KEPT`] per event.
    pub fn is_filter_mismatch(&self) -> bool {
        matches!(
            self,
            Outcome::NameMismatch { .. }
                | Outcome::MatchFailed { .. }
                | Outcome::MatchRelatedFailed { .. }
                | Outcome::OwnEvent
        )
    }
}

/// Which clause of `covers` failed, for the explanation.
pub(crate) fn mismatch(trigger: &EventTrigger, event: &Event) -> Outcome {
    let name = event.event.as_str();
    if !trigger.prefilter(name) || !trigger.covers_name(name) {
        return Outcome::NameMismatch {
            patterns: trigger
                .expect
                .iter()
                .chain(trigger.after.iter())
                .cloned()
                .collect(),
            name: name.to_owned(),
        };
    }
    for (label, patterns) in &trigger.match_resource.labels {
        let value = event.resource.get(label);
        if !patterns.iter().any(|p| p.matches(value)) {
            return Outcome::MatchFailed {
                label: label.clone(),
                patterns: patterns.iter().map(|p| p.as_str().to_owned()).collect(),
                value: value.map(str::to_owned),
            };
        }
    }
    for (i, spec) in trigger.match_related.iter().enumerate() {
        if !spec.includes(event.related.iter()) {
            return Outcome::MatchRelatedFailed {
                spec: i,
                labels: spec_labels(spec),
            };
        }
    }
    Outcome::NameMismatch {
        patterns: Vec::new(),
        name: name.to_owned(),
    }
}

fn spec_labels(spec: &ResourceSpecification) -> Vec<(String, Vec<String>)> {
    spec.labels
        .iter()
        .map(|(l, ps)| {
            (
                l.clone(),
                ps.iter().map(|p| p.as_str().to_owned()).collect(),
            )
        })
        .collect()
}
