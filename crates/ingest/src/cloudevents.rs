//! CloudEvents (v1.0, structured JSON mode) as Spur events.
//!
//! Mapping: `type` → event name; `subject` (else `source`) → `prefect.resource.id`, with
//! `cloudevents.source` and `cloudevents.subject` kept as labels; `time` → `occurred`; `id`
//! → the event id when it is a UUID, else a UUIDv5 of `source` + `id` (CloudEvents ids are only
//! unique per source), so redeliveries still de-duplicate; `data` → `payload` (an object is
//! used as is, anything else goes under `payload.data`).

use chrono::{DateTime, Utc};
use serde_json::{Map, Value, json};
use spur_core::{Event, EventError, EventLimits};
use uuid::Uuid;

/// True for a JSON object that declares a CloudEvents `specversion`.
pub fn is_cloud_event(value: &Value) -> bool {
    value.get("specversion").is_some_and(Value::is_string)
}

/// Converts a structured-mode CloudEvent; errors name the CloudEvents field.
pub fn to_event(
    value: &Value,
    received: DateTime<Utc>,
    limits: &EventLimits,
) -> Result<Event, EventError> {
    let field = |name: &str| value.get(name).and_then(Value::as_str);
    let missing = |name: &str| EventError {
        field: name.to_owned(),
        reason: "is required in a CloudEvent".to_owned(),
    };
    let ce_type = field("type").ok_or_else(|| missing("type"))?;
    let source = field("source").ok_or_else(|| missing("source"))?;
    let ce_id = field("id").ok_or_else(|| missing("id"))?;
    let subject = field("subject");
    let id = Uuid::parse_str(ce_id).unwrap_or_else(|_| {
        Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("cloudevent:{source}:{ce_id}").as_bytes(),
        )
    });
    let mut resource = Map::new();
    resource.insert(
        "prefect.resource.id".into(),
        subject.unwrap_or(source).into(),
    );
    resource.insert("cloudevents.source".into(), source.into());
    if let Some(s) = subject {
        resource.insert("cloudevents.subject".into(), s.into());
    }
    let payload = match value.get("data") {
        Some(Value::Object(map)) => Value::Object(map.clone()),
        Some(Value::Null) | None => json!({}),
        Some(other) => json!({ "data": other }),
    };
    let prefect = json!({
        "id": id.to_string(),
        "event": ce_type,
        "occurred": value.get("time").cloned().unwrap_or(Value::Null),
        "resource": Value::Object(resource),
        "payload": payload,
    });
    Event::from_json(&prefect, received, limits).map_err(|e| {
        let field = match e.field.as_str() {
            "occurred" => "time".to_owned(),
            "event" => "type".to_owned(),
            other => other.to_owned(),
        };
        EventError { field, ..e }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_a_cloud_event() {
        let now = Utc::now();
        let ce = json!({"specversion": "1.0", "type": "com.example.order.paid", "source": "/shop",
                        "subject": "order-7", "id": "A234-1234", "time": "2024-01-01T00:00:00Z",
                        "data": {"amount": 12}});
        assert!(is_cloud_event(&ce));
        let e = to_event(&ce, now, &EventLimits::default()).expect("maps");
        assert_eq!(e.event, "com.example.order.paid");
        assert_eq!(e.resource.id(), "order-7");
        assert_eq!(e.resource.get("cloudevents.source"), Some("/shop"));
        assert_eq!(e.payload, json!({"amount": 12}));
        let again = to_event(&ce, now, &EventLimits::default()).expect("maps");
        assert_eq!(e.id, again.id, "same source+id → same event id");
        let err = to_event(
            &json!({"specversion": "1.0", "source": "/x", "id": "1"}),
            now,
            &EventLimits::default(),
        )
        .expect_err("type is required");
        assert_eq!(err.field, "type");
    }
}
