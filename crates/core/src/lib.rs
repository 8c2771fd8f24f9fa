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
pub mod flow;
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

/// A deterministic id laid out like a UUIDv7: the first 48 bits are `at_millis` (Unix
/// milliseconds), the remaining bits come from the UUIDv5 of `seed`. The same time and seed
/// always give the same id (replays and crash recovery re-derive it), and ids made close in
/// time sort together: stored under such keys, a busy log appends to the end of its B-trees
/// instead of touching a random page per insert. (Prefect's own clients make uuid7 event
/// ids for the same reason.) Used for firings and the events Spur emits about them.
pub fn time_ordered_id(at_millis: i64, seed: &str) -> uuid::Uuid {
    let hashed = uuid::Uuid::new_v5(&SPUR_NAMESPACE, seed.as_bytes());
    let mut rest = [0u8; 10];
    rest.copy_from_slice(&hashed.as_bytes()[6..16]);
    let millis = at_millis.clamp(0, (1 << 48) - 1) as u64;
    uuid::Builder::from_unix_timestamp_millis(millis, &rest).into_uuid()
}

/// An id for something derived from `parent` (an event about a firing): time-ordered at the
/// parent's time when the parent is (see [`time_ordered_id`]), else a plain UUIDv5 of `seed`.
pub fn derived_id(parent: uuid::Uuid, seed: &str) -> uuid::Uuid {
    match parent.get_timestamp() {
        Some(ts) if parent.get_version_num() == 7 => {
            let (seconds, nanos) = ts.to_unix();
            let millis = (seconds as i64) * 1000 + i64::from(nanos / 1_000_000);
            time_ordered_id(millis, seed)
        }
        _ => uuid::Uuid::new_v5(&SPUR_NAMESPACE, seed.as_bytes()),
    }
}

#[cfg(test)]
mod id_tests {
    use super::*;

    #[test]
    fn derived_ids_are_deterministic_time_ordered_and_follow_their_parent() {
        let a = time_ordered_id(1_700_000_000_000, "firing a");
        assert_eq!(a, time_ordered_id(1_700_000_000_000, "firing a"));
        assert_ne!(a, time_ordered_id(1_700_000_000_000, "firing b"));
        assert_eq!(a.get_version_num(), 7);
        // Later times sort after, whatever the seed.
        assert!(time_ordered_id(1_700_000_000_001, "0") > time_ordered_id(1_700_000_000_000, "z"));
        // Events about a firing share its time prefix; under a v5 parent they are v5.
        let event = derived_id(a, "state-change");
        assert_eq!(event.get_version_num(), 7);
        assert_eq!(event.as_bytes()[..6], a.as_bytes()[..6]);
        assert_eq!(event, derived_id(a, "state-change"));
        let v5 = uuid::Uuid::new_v5(&SPUR_NAMESPACE, b"parent");
        assert_eq!(
            derived_id(v5, "x"),
            uuid::Uuid::new_v5(&SPUR_NAMESPACE, b"x")
        );
        // Out-of-range times are clamped, not wrapped.
        assert_eq!(time_ordered_id(-5, "s"), time_ordered_id(0, "s"));
    }
}
