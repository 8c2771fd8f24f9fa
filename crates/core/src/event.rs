//! The one event type that flows through Spur, in Prefect's wire shape.
//!
//! An [`Event`] is what every source produces and every stage consumes: `occurred`, `event`
//! (the name), `resource` (labels, with `prefect.resource.id` required), `related` resources
//! (each with a `prefect.resource.role`), a free-form `payload`, an `id` and an optional
//! `follows` link to a causally preceding event. `received` is stamped by Spur on arrival.
//!
//! [`Event::from_json`] is the single entry point for untrusted input: it applies Prefect's
//! client defaults to fields left out (a fresh UUIDv7 `id`, `occurred` = arrival time),
//! ignores unknown fields (as Prefect's server does), and enforces Prefect's limits, naming
//! the offending field in the error. It accepts and refuses what Prefect 3.8.8's pydantic
//! `Event` model does: an explicit `null` is not "left out" (`occurred`, `id`, `related` and
//! `payload` refuse it; `follows` takes it), and an empty event name is accepted. The verdicts,
//! checked side by side with Prefect, are in docs/event-validation.md.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::ser::{SerializeMap, SerializeStruct};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use thiserror::Error;
use uuid::Uuid;

use crate::time::{FormattedTimestamp, parse_timestamp};

mod direct;

/// The label every resource must carry.
pub const RESOURCE_ID: &str = "prefect.resource.id";
/// The label every related resource must carry.
pub const RESOURCE_ROLE: &str = "prefect.resource.role";
/// The human-readable name label.
pub const RESOURCE_NAME: &str = "prefect.resource.name";

/// Prefect's event limits (`PREFECT_SERVER_EVENTS_MAXIMUM_*`), with Prefect's defaults.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimits {
    /// Longest accepted event name, in characters.
    pub max_name_length: usize,
    /// Most labels one resource may carry.
    pub max_labels_per_resource: usize,
    /// Most related resources one event may carry.
    pub max_related_resources: usize,
    /// Largest serialized event, in bytes.
    pub max_size_bytes: usize,
}

impl Default for EventLimits {
    fn default() -> Self {
        EventLimits {
            max_name_length: 1024,
            max_labels_per_resource: 500,
            max_related_resources: 100,
            max_size_bytes: 1_500_000,
        }
    }
}

/// Why an event was refused. `field` is a dotted path into the submitted JSON.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
#[error("{field}: {reason}")]
pub struct EventError {
    /// Where the problem is, e.g. `related[2].prefect.resource.role`.
    pub field: String,
    /// What is wrong, in words a sender can act on.
    pub reason: String,
}

impl EventError {
    fn new(field: impl Into<String>, reason: impl Into<String>) -> EventError {
        EventError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// A set of string labels describing one resource, in the order they were given.
///
/// Prefect models this as a `dict[str, str]`; a small vector keeps insertion order, is compact,
/// and is faster than hashing for the handful of labels real resources carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Resource {
    labels: Vec<(String, String)>,
}

impl Resource {
    /// Builds a resource from label pairs; later duplicates replace earlier ones.
    pub fn from_pairs<K: Into<String>, V: Into<String>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Resource {
        let mut resource = Resource::default();
        for (k, v) in pairs {
            resource.insert(k.into(), v.into());
        }
        resource
    }

    /// A resource with just an id.
    pub fn with_id(id: impl Into<String>) -> Resource {
        Resource::from_pairs([(RESOURCE_ID.to_owned(), id.into())])
    }

    /// Sets a label, replacing any previous value.
    pub fn insert(&mut self, key: String, value: String) {
        match self.labels.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.labels.push((key, value)),
        }
    }

    /// The value of one label.
    pub fn get(&self, label: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| k == label)
            .map(|(_, v)| v.as_str())
    }

    /// `prefect.resource.id` (empty only for a resource that was never validated).
    pub fn id(&self) -> &str {
        self.get(RESOURCE_ID).unwrap_or("")
    }

    /// `prefect.resource.role`, for related resources.
    pub fn role(&self) -> Option<&str> {
        self.get(RESOURCE_ROLE)
    }

    /// `prefect.resource.name`, if given.
    pub fn name(&self) -> Option<&str> {
        self.get(RESOURCE_NAME)
    }

    /// All labels in order.
    pub fn labels(&self) -> impl ExactSizeIterator<Item = (&str, &str)> {
        self.labels.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Number of labels.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// True when there are no labels.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The labels as a JSON object.
    pub fn to_json(&self) -> Value {
        Value::Object(
            self.labels
                .iter()
                .map(|(k, v)| (k.clone(), Value::String(v.clone())))
                .collect(),
        )
    }

    /// Parses and validates a resource object. `field` names it in errors.
    fn from_value(
        value: Value,
        field: &str,
        require_role: bool,
        limits: &EventLimits,
    ) -> Result<Resource, EventError> {
        let map = match value {
            Value::Object(map) => map,
            other => {
                return Err(EventError::new(
                    field,
                    format!(
                        "must be an object of string labels, got {}",
                        json_type_name(&other)
                    ),
                ));
            }
        };
        if map.len() > limits.max_labels_per_resource {
            return Err(EventError::new(
                field,
                format!(
                    "has {} labels; at most {} are allowed",
                    map.len(),
                    limits.max_labels_per_resource
                ),
            ));
        }
        let mut labels = Vec::with_capacity(map.len());
        for (key, value) in map {
            match value {
                Value::String(s) => labels.push((key, s)),
                other => {
                    return Err(EventError::new(
                        format!("{field}.{key}"),
                        format!(
                            "label values must be strings, got {}",
                            json_type_name(&other)
                        ),
                    ));
                }
            }
        }
        Resource::checked(labels, field, require_role, limits)
    }

    /// Validates string labels (distinct keys) as a resource: the label limit, a non-empty
    /// `prefect.resource.id`, and for related resources a non-empty role.
    fn checked(
        labels: Vec<(String, String)>,
        field: &str,
        require_role: bool,
        limits: &EventLimits,
    ) -> Result<Resource, EventError> {
        if labels.len() > limits.max_labels_per_resource {
            return Err(EventError::new(
                field,
                format!(
                    "has {} labels; at most {} are allowed",
                    labels.len(),
                    limits.max_labels_per_resource
                ),
            ));
        }
        let resource = Resource { labels };
        match resource.get(RESOURCE_ID) {
            None => {
                return Err(EventError::new(
                    field,
                    "resources must include the prefect.resource.id label",
                ));
            }
            Some("") => {
                return Err(EventError::new(
                    format!("{field}.{RESOURCE_ID}"),
                    "the prefect.resource.id label must be non-empty",
                ));
            }
            Some(_) => {}
        }
        if require_role {
            match resource.get(RESOURCE_ROLE) {
                None => {
                    return Err(EventError::new(
                        field,
                        "related resources must include the prefect.resource.role label",
                    ));
                }
                Some("") => {
                    return Err(EventError::new(
                        format!("{field}.{RESOURCE_ROLE}"),
                        "the prefect.resource.role label must be non-empty",
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(resource)
    }
}

impl Serialize for Resource {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.labels.len()))?;
        for (k, v) in &self.labels {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

/// An event as Spur stores and evaluates it (Prefect's `ReceivedEvent`).
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    /// Unique id; duplicates are dropped.
    pub id: Uuid,
    /// When it happened, by the sender's clock.
    pub occurred: DateTime<Utc>,
    /// The event name, e.g. `prefect.flow-run.Completed`.
    pub event: String,
    /// The primary resource.
    pub resource: Resource,
    /// Related resources, each with a role.
    pub related: Vec<Resource>,
    /// Free-form JSON object.
    pub payload: Value,
    /// The id of an event that must be processed before this one.
    pub follows: Option<Uuid>,
    /// When Spur received it.
    pub received: DateTime<Utc>,
}

impl Event {
    /// Parses an untrusted JSON event, applying Prefect's defaults and limits.
    ///
    /// `received` is the arrival time: it becomes `received`, and `occurred` when the sender
    /// gave none. A `received` field in the input is ignored, as Prefect's server does.
    pub fn from_json(
        value: &Value,
        received: DateTime<Utc>,
        limits: &EventLimits,
    ) -> Result<Event, EventError> {
        Event::from_value(value.clone(), received, limits)
    }

    /// [`Event::from_json`], taking the parsed JSON by value: its strings and payload move
    /// into the event instead of being copied (what every ingest path has in hand).
    pub fn from_value(
        value: Value,
        received: DateTime<Utc>,
        limits: &EventLimits,
    ) -> Result<Event, EventError> {
        let mut map = match value {
            Value::Object(map) => map,
            other => {
                return Err(EventError::new(
                    "event",
                    format!(
                        "an event must be a JSON object, got {}",
                        json_type_name(&other)
                    ),
                ));
            }
        };
        let name = match map.remove("event") {
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(EventError::new(
                    "event",
                    format!("must be a string, got {}", json_type_name(&other)),
                ));
            }
            None => return Err(EventError::new("event", "is required")),
        };
        check_name(&name, limits)?;
        let resource = match map.remove("resource") {
            Some(v) => Resource::from_value(v, "resource", false, limits)?,
            None => return Err(EventError::new("resource", "is required")),
        };
        let related = match map.remove("related") {
            None => Vec::new(),
            Some(Value::Array(items)) => {
                check_related_count(items.len(), limits)?;
                items
                    .into_iter()
                    .enumerate()
                    .map(|(i, v)| Resource::from_value(v, &format!("related[{i}]"), true, limits))
                    .collect::<Result<_, _>>()?
            }
            Some(other) => {
                return Err(EventError::new(
                    "related",
                    format!(
                        "must be a list of resources, got {}",
                        json_type_name(&other)
                    ),
                ));
            }
        };
        let payload = payload_or_empty(map.remove("payload"))?;
        // Absent: Prefect's client default (a fresh UUIDv7). `null` is refused, as both of
        // Prefect's models refuse it (docs/event-validation.md).
        let id = match map.get("id") {
            None => Uuid::now_v7(),
            Some(v) => parse_uuid(v, "id")?,
        };
        let follows = match map.get("follows") {
            None | Some(Value::Null) => None,
            Some(v) => Some(parse_uuid(v, "follows")?),
        };
        let occurred = match map.get("occurred") {
            None => received,
            Some(Value::Null) => {
                return Err(EventError::new(
                    "occurred",
                    "must be a timestamp, got null (leave it out to mean now)",
                ));
            }
            Some(v) => parse_timestamp(v).map_err(|reason| EventError::new("occurred", reason))?,
        };
        Ok(Event {
            id,
            occurred,
            event: name,
            resource,
            related,
            payload,
            follows,
            received,
        })
    }

    /// Parses an event Spur stored itself (its own `received` is kept, not re-stamped).
    pub fn from_stored_json(value: &Value) -> Result<Event, EventError> {
        Event::from_stored_value(value.clone())
    }

    /// [`Event::from_stored_json`], taking the parsed JSON by value.
    pub fn from_stored_value(value: Value) -> Result<Event, EventError> {
        let received = value
            .get("received")
            .map(parse_timestamp)
            .transpose()
            .map_err(|reason| EventError::new("received", reason))?
            .ok_or_else(|| EventError::new("received", "is required in stored events"))?;
        let limits = EventLimits {
            max_name_length: usize::MAX,
            max_labels_per_resource: usize::MAX,
            max_related_resources: usize::MAX,
            max_size_bytes: usize::MAX,
        };
        Event::from_value(value, received, &limits)
    }

    /// Parses a JSON text event (see [`Event::from_json`]).
    pub fn from_json_str(
        text: &str,
        received: DateTime<Utc>,
        limits: &EventLimits,
    ) -> Result<Event, EventError> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| EventError::new("event", format!("not valid JSON: {e}")))?;
        Event::from_value(value, received, limits)
    }

    /// The event as JSON bytes (its wire and stored form), in a buffer sized up front.
    ///
    /// `serde_json::to_vec` starts at 128 bytes and doubles: a typical 250-byte event was
    /// copied twice on its way out, and every ingested event is encoded once.
    pub fn to_json_bytes(&self) -> Result<Vec<u8>, serde_json::Error> {
        let mut out = Vec::with_capacity(self.encoded_len_hint());
        serde_json::to_writer(&mut out, self)?;
        Ok(out)
    }

    /// Roughly the encoded length: the fixed part (field names, ids, timestamps), the name
    /// and labels as given, and a flat allowance for the payload. Only a capacity hint.
    fn encoded_len_hint(&self) -> usize {
        let labels = |r: &Resource| {
            r.labels()
                .map(|(k, v)| k.len() + v.len() + 6)
                .sum::<usize>()
        };
        let payload = match &self.payload {
            Value::Object(map) if map.is_empty() => 2,
            _ => 128,
        };
        256 + self.event.len()
            + labels(&self.resource)
            + self.related.iter().map(|r| labels(r) + 2).sum::<usize>()
            + payload
    }

    /// Checks the serialized size against `limits.max_size_bytes`.
    pub fn check_size(&self, limits: &EventLimits) -> Result<(), EventError> {
        // Most events are a few hundred bytes: when even the worst case of their encoding
        // fits, they are not serialized just to be measured (that was ~1 µs per event).
        if self.serialized_size_bound() <= limits.max_size_bytes {
            return Ok(());
        }
        /// Counts the serialized bytes without keeping them (no buffer to grow and copy).
        struct ByteCount(usize);
        impl std::io::Write for ByteCount {
            fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
                self.0 += bytes.len();
                Ok(bytes.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut count = ByteCount(0);
        let size = match serde_json::to_writer(&mut count, self) {
            Ok(()) => count.0,
            Err(_) => usize::MAX,
        };
        if size > limits.max_size_bytes {
            return Err(EventError::new(
                "event",
                format!(
                    "is {size} bytes serialized; at most {} are allowed",
                    limits.max_size_bytes
                ),
            ));
        }
        Ok(())
    }

    /// An upper bound of the serialized size: every string character escaped at the widest
    /// (`\u00XX`, 6 bytes), every number at its longest form, generous fixed overhead.
    fn serialized_size_bound(&self) -> usize {
        fn text(s: &str) -> usize {
            s.len().saturating_mul(6).saturating_add(2)
        }
        fn value(v: &Value) -> usize {
            match v {
                Value::Null | Value::Bool(_) => 5,
                Value::Number(_) => 32,
                Value::String(s) => text(s),
                Value::Array(items) => items.iter().fold(2usize, |n, item| {
                    n.saturating_add(value(item)).saturating_add(1)
                }),
                Value::Object(map) => map.iter().fold(2usize, |n, (k, item)| {
                    n.saturating_add(text(k))
                        .saturating_add(value(item))
                        .saturating_add(2)
                }),
            }
        }
        fn resource(r: &Resource) -> usize {
            r.labels().fold(2usize, |n, (k, v)| {
                n.saturating_add(text(k))
                    .saturating_add(text(v))
                    .saturating_add(2)
            })
        }
        // Field names, punctuation, two ids, two timestamps: well under 512 bytes.
        let mut bound = 512usize
            .saturating_add(text(&self.event))
            .saturating_add(resource(&self.resource))
            .saturating_add(value(&self.payload));
        for r in &self.related {
            bound = bound.saturating_add(resource(r)).saturating_add(1);
        }
        bound
    }

    /// The primary resource followed by the related ones (Prefect's `involved_resources`).
    pub fn involved_resources(&self) -> impl Iterator<Item = &Resource> {
        std::iter::once(&self.resource).chain(self.related.iter())
    }

    /// The first related resource with `role` (Prefect's `resource_in_role[role]`).
    pub fn resource_in_role(&self, role: &str) -> Option<&Resource> {
        self.related.iter().find(|r| r.role() == Some(role))
    }

    /// Prefect's `find_resource_label`: `related:<role>:<label>` looks into the first related
    /// resource with that role; anything else is a label of the primary resource.
    pub fn find_resource_label(&self, label: &str) -> Option<&str> {
        if let Some(rest) = label.strip_prefix("related:")
            && let Some((role, name)) = rest.split_once(':')
        {
            // Python splits the whole string at the last ':' then the first ':', so the label
            // name is what follows the last colon and the role may contain colons.
            let (role, name) = match rest.rsplit_once(':') {
                Some((r, n)) => (r, n),
                None => (role, name),
            };
            if let Some(resource) = self.resource_in_role(role) {
                return resource.get(name);
            }
        }
        self.resource.get(label)
    }

    /// The event as Prefect's JSON (`ReceivedEvent`, `received` included).
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }
}

impl Serialize for Event {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut s = serializer.serialize_struct("Event", 8)?;
        s.serialize_field("occurred", &FormattedTimestamp::new(self.occurred))?;
        s.serialize_field("event", &self.event)?;
        s.serialize_field("resource", &self.resource)?;
        s.serialize_field("related", &self.related)?;
        s.serialize_field("payload", &self.payload)?;
        s.serialize_field("id", &self.id)?;
        s.serialize_field("follows", &self.follows)?;
        s.serialize_field("received", &FormattedTimestamp::new(self.received))?;
        s.end()
    }
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({}) on {}", self.event, self.id, self.resource.id())
    }
}

/// Prefect's limit on an event name's length, in characters.
fn check_name(name: &str, limits: &EventLimits) -> Result<(), EventError> {
    let name_chars = name.chars().count();
    if name_chars > limits.max_name_length {
        return Err(EventError::new(
            "event",
            format!(
                "name is {name_chars} characters long; at most {} are allowed",
                limits.max_name_length
            ),
        ));
    }
    Ok(())
}

/// Prefect's limit on how many related resources an event carries.
fn check_related_count(count: usize, limits: &EventLimits) -> Result<(), EventError> {
    if count > limits.max_related_resources {
        return Err(EventError::new(
            "related",
            format!(
                "has {count} resources; at most {} are allowed",
                limits.max_related_resources
            ),
        ));
    }
    Ok(())
}

/// The payload as stored: absent becomes `{}`; anything but an object is refused (`null`
/// too: Prefect's `dict[str, Any]` field refuses it).
fn payload_or_empty(payload: Option<Value>) -> Result<Value, EventError> {
    match payload {
        None => Ok(Value::Object(Map::new())),
        Some(v @ Value::Object(_)) => Ok(v),
        Some(other) => Err(EventError::new(
            "payload",
            format!("must be an object, got {}", json_type_name(&other)),
        )),
    }
}

/// A UUID in text form; `field` names it in the error.
fn parse_uuid_str(text: &str, field: &str) -> Result<Uuid, EventError> {
    Uuid::parse_str(text).map_err(|e| EventError::new(field, format!("is not a valid UUID ({e})")))
}

fn parse_uuid(value: &Value, field: &str) -> Result<Uuid, EventError> {
    match value {
        Value::String(s) => parse_uuid_str(s, field),
        Value::Null => Err(EventError::new(
            field,
            "must be a UUID string, got null (leave it out to get a fresh id)",
        )),
        other => Err(EventError::new(
            field,
            format!("must be a UUID string, got {}", json_type_name(other)),
        )),
    }
}

/// A JSON type's name for error messages (it lives with the other problem-reporting helpers;
/// re-exported here for callers that know it from this module).
pub use crate::problem::json_type_name;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> DateTime<Utc> {
        "2024-01-01T00:00:00Z".parse().expect("valid timestamp")
    }

    #[test]
    fn json_bytes_are_serde_json_output_whatever_the_size() {
        let big: String = "x".repeat(5000);
        for value in [
            json!({"event": "a", "resource": {"prefect.resource.id": "r"}}),
            json!({"event": "a.b", "resource": {"prefect.resource.id": "r", "k": "é\"\n"},
                   "related": [{"prefect.resource.id": "q", "prefect.resource.role": "flow"}],
                   "payload": {"big": big, "list": [1, 2.5, null, {"n": true}]},
                   "follows": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11"}),
        ] {
            let event = Event::from_json(&value, now(), &EventLimits::default()).expect("valid");
            let bytes = event.to_json_bytes().expect("encodes");
            assert_eq!(bytes, serde_json::to_vec(&event).expect("encodes"));
        }
    }

    #[test]
    fn defaults_fill_id_and_occurred() {
        let ev = Event::from_json(
            &json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "received": "1999-01-01T00:00:00Z", "extra": 1}),
            now(),
            &EventLimits::default(),
        )
        .expect("valid");
        assert_eq!(ev.occurred, now());
        assert_eq!(ev.received, now());
        assert_eq!(ev.id.get_version_num(), 7);
        assert_eq!(ev.payload, json!({}));
    }

    #[test]
    fn the_size_bound_is_never_below_the_serialized_size() {
        let limits = EventLimits::default();
        let cases = [
            json!({"event": "x", "resource": {"prefect.resource.id": "r"}}),
            json!({"event": "ctl\u{1}\u{1f}\"\\", "resource": {"prefect.resource.id": "r\u{0}"},
                   "related": [{"prefect.resource.id": "a", "prefect.resource.role": "flow"}],
                   "payload": {"n": [1e15, -1.5e-300, 123456789012345678u64, true, null],
                               "s": "é\u{2}ü\t\n", "deep": {"x": [[], {}]}},
                   "follows": "7b9c5b3e-0b5f-4f5e-9c2a-2d9c2b1e0a11"}),
        ];
        for case in cases {
            let event = Event::from_json(&case, now(), &limits).expect("valid");
            let size = serde_json::to_vec(&event).expect("serializes").len();
            assert!(
                event.serialized_size_bound() >= size,
                "bound {} < size {size} for {case}",
                event.serialized_size_bound()
            );
        }
    }

    #[test]
    fn rejections_name_the_field() {
        let limits = EventLimits::default();
        let cases = [
            (json!({"resource": {"prefect.resource.id": "r"}}), "event"),
            (json!({"event": "x"}), "resource"),
            (json!({"event": "x", "resource": {}}), "resource"),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": ""}}),
                "resource.prefect.resource.id",
            ),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": "r", "n": 1}}),
                "resource.n",
            ),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "related": [{"prefect.resource.id": "a"}]}),
                "related[0]",
            ),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "id": "nope"}),
                "id",
            ),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "occurred": "yesterday"}),
                "occurred",
            ),
            (
                json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "payload": [1]}),
                "payload",
            ),
        ];
        for (value, field) in cases {
            let err = Event::from_json(&value, now(), &limits).expect_err("must be refused");
            assert_eq!(err.field, field, "{value}");
        }
    }

    /// Verdicts of Prefect 3.8.8's event models (pydantic 2, `model_validate_json`) on the same
    /// inputs, checked side by side with the pinned client venv (docs/event-validation.md).
    /// `true` = accepted. Where the server and client models differ (a missing `id` or
    /// `occurred`), Spur follows the client, which fills them in.
    #[test]
    fn accepts_and_refuses_what_prefects_event_model_does() {
        let base = json!({"occurred": "2024-01-01T00:00:00Z", "event": "x",
                          "resource": {"prefect.resource.id": "r"},
                          "id": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11"});
        let with = |key: &str, value: Option<Value>| {
            let mut event = base.clone();
            let map = event.as_object_mut().expect("an object");
            match value {
                Some(v) => map.insert(key.to_owned(), v),
                None => map.remove(key),
            };
            event
        };
        let cases = [
            ("occurred", Some(Value::Null), false),
            ("occurred", None, true), // client default: now
            ("occurred", Some(json!(1714564800)), true),
            ("occurred", Some(json!("2024-01-01T00:00:00")), true),
            ("id", Some(Value::Null), false),
            ("id", None, true), // client default: a fresh uuid7
            ("id", Some(json!(5)), false),
            ("id", Some(json!("0b6f1a4e6f2c4d1e9a576c1d2b0e8f11")), true),
            (
                "id",
                Some(json!("{0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11}")),
                true,
            ),
            (
                "id",
                Some(json!("urn:uuid:0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11")),
                true,
            ),
            ("event", Some(json!("")), true),
            ("event", Some(json!(" ")), true),
            ("event", Some(Value::Null), false),
            ("related", Some(Value::Null), false),
            ("payload", Some(Value::Null), false),
            ("payload", Some(json!([1])), false),
            ("follows", Some(Value::Null), true),
            ("resource", Some(Value::Null), false),
            (
                "resource",
                Some(json!({"prefect.resource.id": "r", "": "v"})),
                true,
            ),
            (
                "related",
                Some(json!([{"prefect.resource.id": "q", "prefect.resource.role": ""}])),
                false,
            ),
        ];
        let limits = EventLimits::default();
        for (key, value, accepted) in cases {
            let event = with(key, value);
            let general = Event::from_json(&event, now(), &limits);
            assert_eq!(general.is_ok(), accepted, "{event}: {general:?}");
            if let Err(e) = &general {
                assert!(e.field.starts_with(key), "{event}: {e}");
            }
            let bytes = serde_json::to_vec(&event).expect("encodes");
            let direct = Event::from_slice_direct(&bytes, now(), &limits);
            assert!(direct.is_none() || accepted, "direct lane took {event}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let limits = EventLimits::default();
        let long = "x".repeat(1025);
        let err = Event::from_json(
            &json!({"event": long, "resource": {"prefect.resource.id": "r"}}),
            now(),
            &limits,
        )
        .expect_err("too long");
        assert_eq!(err.field, "event");
        let related: Vec<Value> = (0..101)
            .map(|i| json!({"prefect.resource.id": format!("r{i}"), "prefect.resource.role": "x"}))
            .collect();
        let err = Event::from_json(
            &json!({"event": "x", "resource": {"prefect.resource.id": "r"}, "related": related}),
            now(),
            &limits,
        )
        .expect_err("too many related");
        assert_eq!(err.field, "related");
    }

    #[test]
    fn find_resource_label_follows_prefect() {
        let ev = Event::from_json(
            &json!({"event": "x", "resource": {"prefect.resource.id": "r", "a": "1"},
                    "related": [{"prefect.resource.id": "f1", "prefect.resource.role": "flow", "n": "first"},
                                {"prefect.resource.id": "f2", "prefect.resource.role": "flow", "n": "second"}]}),
            now(),
            &EventLimits::default(),
        )
        .expect("valid");
        assert_eq!(ev.find_resource_label("a"), Some("1"));
        assert_eq!(ev.find_resource_label("related:flow:n"), Some("first"));
        assert_eq!(ev.find_resource_label("related:tag:n"), None);
    }
}
