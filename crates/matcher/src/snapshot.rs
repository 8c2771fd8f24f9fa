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
    /// Remembered event ids with the time they were processed, oldest first. Stored packed
    /// (see [`packed_seen`]): under load this list is most of a checkpoint.
    #[serde(with = "packed_seen")]
    pub seen: Vec<(DateTime<Utc>, Uuid)>,
    /// Events parked waiting for their leader (stored JSON, `received` included).
    pub held: Vec<Value>,
    /// When the next bucket sweep is due.
    pub next_sweep: Option<DateTime<Utc>>,
    /// Ordering counter for composite child firings.
    pub sequence: u64,
    /// Flow control's state: open debounces and batches, throttle windows and queues.
    #[serde(default)]
    pub flow: crate::flow::FlowSnapshot,
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
    /// What flow control did to it, if anything.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flow: Option<crate::flow::FlowSummary>,
}

/// The remembered ids as one base64 string of 28-byte records (seconds since the epoch as a
/// big-endian i64, nanoseconds as a u32, then the id's 16 bytes): about 40 % of the JSON
/// array's size and far cheaper to write than 10 000 formatted timestamps and UUIDs.
/// Reading also accepts the plain array of `[time, id]` pairs that older checkpoints hold.
pub mod packed_seen {
    use base64::Engine as _;
    use base64::engine::general_purpose::STANDARD;
    use chrono::{DateTime, Utc};
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};
    use uuid::Uuid;

    const RECORD: usize = 28;

    /// Writes the packed string.
    pub fn serialize<S: Serializer>(
        seen: &[(DateTime<Utc>, Uuid)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let mut bytes = Vec::with_capacity(seen.len() * RECORD);
        for (at, id) in seen {
            bytes.extend_from_slice(&at.timestamp().to_be_bytes());
            bytes.extend_from_slice(&at.timestamp_subsec_nanos().to_be_bytes());
            bytes.extend_from_slice(id.as_bytes());
        }
        serializer.serialize_str(&STANDARD.encode(bytes))
    }

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Stored {
        Packed(String),
        Pairs(Vec<(DateTime<Utc>, Uuid)>),
    }

    /// Reads the packed string (or the older plain array).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<(DateTime<Utc>, Uuid)>, D::Error> {
        let packed = match Stored::deserialize(deserializer)? {
            Stored::Pairs(pairs) => return Ok(pairs),
            Stored::Packed(text) => STANDARD.decode(text).map_err(D::Error::custom)?,
        };
        if packed.len() % RECORD != 0 {
            return Err(D::Error::custom(format!(
                "remembered ids: {} bytes is not a whole number of {RECORD}-byte records",
                packed.len()
            )));
        }
        packed
            .chunks_exact(RECORD)
            .map(|record| {
                let field = |range: std::ops::Range<usize>| &record[range];
                let seconds = i64::from_be_bytes(field(0..8).try_into().map_err(D::Error::custom)?);
                let nanos = u32::from_be_bytes(field(8..12).try_into().map_err(D::Error::custom)?);
                let id = Uuid::from_slice(field(12..RECORD)).map_err(D::Error::custom)?;
                let at = DateTime::from_timestamp(seconds, nanos).ok_or_else(|| {
                    D::Error::custom(format!("remembered ids: {seconds}.{nanos} is not a time"))
                })?;
                Ok((at, id))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembered_ids_round_trip_packed_and_old_checkpoints_still_load() {
        let at: DateTime<Utc> = "2026-11-23T10:00:00.123456789Z".parse().expect("time");
        let ancient: DateTime<Utc> = "1000-01-01T00:00:00Z".parse().expect("time");
        let snapshot = EngineSnapshot {
            seen: vec![
                (at, Uuid::from_u128(1)),
                (ancient, Uuid::from_u128(u128::MAX)),
            ],
            ..EngineSnapshot::default()
        };
        let json = serde_json::to_value(&snapshot).expect("serializes");
        assert!(json["seen"].is_string(), "packed: {json}");
        let back: EngineSnapshot = serde_json::from_value(json.clone()).expect("reads back");
        assert_eq!(back, snapshot);
        // A checkpoint written before packing.
        let mut old = json;
        old["seen"] = serde_json::json!([
            [at, Uuid::from_u128(1)],
            [ancient, Uuid::from_u128(u128::MAX)]
        ]);
        let back: EngineSnapshot = serde_json::from_value(old.clone()).expect("reads old form");
        assert_eq!(back, snapshot);
        // Damage is reported, not papered over.
        old["seen"] = serde_json::json!("AAAA");
        let error = serde_json::from_value::<EngineSnapshot>(old).expect_err("truncated");
        assert!(error.to_string().contains("28-byte records"), "{error}");
    }
}
