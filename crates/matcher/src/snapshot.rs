//! Engine checkpoints: the complete trigger state as plain serde data.
//!
//! The daemon stores a snapshot next to the event-log position it reflects. After a restart it
//! loads the automations, restores the snapshot, and replays the log suffix; because the engine
//! is deterministic, that rebuilds exactly the state (and the same firing ids) it had.
//! State belongs to an automation only while the automation is unchanged: each entry carries
//! the automation's fingerprint, and entries whose automation changed are dropped on restore.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

/// Everything the engine knows, as of `clock`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EngineSnapshot {
    /// The engine clock.
    pub clock: Option<DateTime<Utc>>,
    /// Per leaf trigger state.
    pub leaves: Vec<LeafSnapshot>,
    /// Per composite trigger state.
    pub composites: Vec<CompositeSnapshot>,
    /// Remembered event ids with the time they were processed, oldest first.
    pub seen: Vec<(DateTime<Utc>, Uuid)>,
    /// Events parked waiting for their leader (stored JSON, `received` included).
    pub held: Vec<Value>,
    /// When the next bucket sweep is due.
    pub next_sweep: Option<DateTime<Utc>>,
    /// Ordering counter for composite child firings.
    pub sequence: u64,
}

/// State of one leaf event trigger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LeafSnapshot {
    /// Owning automation.
    pub automation: Uuid,
    /// The automation's definition hash; state is dropped if it changed.
    pub fingerprint: u64,
    /// The trigger.
    pub trigger: Uuid,
    /// Open buckets.
    pub buckets: Vec<BucketSnapshot>,
    /// Next proactive pass.
    pub next_run: Option<DateTime<Utc>>,
    /// Fired, not yet resolved proactive keys.
    pub unresolved: Vec<(Vec<String>, Uuid)>,
}

/// One bucket.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BucketSnapshot {
    /// The `for_each` values.
    pub key: Vec<String>,
    /// Window start.
    pub start: DateTime<Utc>,
    /// Window end.
    pub end: DateTime<Utc>,
    /// Count so far.
    pub count: i64,
    /// Last event (stored JSON).
    pub last_event: Option<Value>,
}

/// State of one composite trigger.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CompositeSnapshot {
    /// Owning automation.
    pub automation: Uuid,
    /// The automation's definition hash.
    pub fingerprint: u64,
    /// The composite trigger.
    pub trigger: Uuid,
    /// Latest firing per child position.
    pub children: Vec<Option<ChildSnapshot>>,
}

/// A stored child firing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ChildSnapshot {
    /// The firing.
    pub firing: FiringSnapshot,
    /// When it was stored.
    pub at: DateTime<Utc>,
    /// Tie-breaker for equal times.
    pub sequence: u64,
}

/// A firing without its automation (which is known from context).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FiringSnapshot {
    /// Firing id.
    pub id: Uuid,
    /// Trigger that fired.
    pub trigger_id: Uuid,
    /// `triggered` / `resolved`.
    pub state: String,
    /// When.
    pub at: DateTime<Utc>,
    /// Triggering event (stored JSON).
    pub event: Option<Value>,
    /// `for_each` labels.
    pub labels: Vec<(String, String)>,
    /// Child firings.
    pub children: Vec<FiringSnapshot>,
}
