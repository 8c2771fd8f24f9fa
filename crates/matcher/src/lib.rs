//! `spur-matcher`: decides when automations fire. Pure and deterministic.
//!
//! * [`engine`] — the [`Engine`]: Prefect's bucket algorithm (reactive and proactive event
//!   triggers, `after`, `for_each`, thresholds and windows), compound and sequence triggers,
//!   causal ordering via `follows`, and de-duplication by event id.
//! * [`index`] — the [`TriggerIndex`] that keeps the cost of an event flat as automations grow.
//! * [`firing`] — the [`Firing`]s the engine produces.
//! * [`snapshot`] — checkpoints of the whole trigger state ([`EngineSnapshot`]).
//!
//! No I/O and no clock of its own: callers pass the time in, so the daemon, `spur replay` and
//! the tests all run this same code.
#![warn(missing_docs)]

pub mod engine;
pub mod explain;
pub mod firing;
pub mod flow;
pub mod index;
pub mod snapshot;

pub use engine::{Bucket, Engine, EngineConfig, EngineStats, fingerprint};
pub use explain::{Decision, EventFate, Outcome};
pub use firing::{Firing, FiringState};
pub use flow::{FlowKeyState, FlowKeys, FlowKind, FlowSummary};
pub use index::TriggerIndex;
pub use snapshot::EngineSnapshot;
