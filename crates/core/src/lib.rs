//! `spur-core`: the data model every other Spur crate shares.
//!
//! * [`event`] — the one [`Event`] type, in Prefect's wire schema, with its limits.
//! * [`glob`] — Prefect's three pattern dialects (label globs, index pre-filter, `covers`).
//! * [`trigger`] — event, compound and sequence triggers ([`Trigger`]).
//! * [`automation`] — [`Automation`]s and their [`Action`]s.
//! * [`load`] — reading automation and deployment files with `file:line:column` diagnostics.
//! * [`problem`], [`time`] — validation findings; timestamps and durations.
//!
//! Nothing here does I/O except [`load`], which only reads files.
#![warn(missing_docs)]

pub mod automation;
pub mod event;
pub mod glob;
pub mod load;
pub mod problem;
pub mod time;
pub mod trigger;

pub use automation::{Action, Automation};
pub use event::{Event, EventError, EventLimits, Resource};
pub use problem::{FieldPath, Problem, Problems, Severity};
pub use trigger::{CompositeKind, CompositeTrigger, EventTrigger, Posture, Require, Trigger};

/// The namespace for Spur's name-derived UUIDv5 ids (automations, triggers, deployments,
/// firings). Fixed forever: changing it would change every derived id.
pub const SPUR_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x5b0f_7c1e_94d2_4a57_8e21_3c6d_a9f0_1b42);
