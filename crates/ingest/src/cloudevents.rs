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
    let prefect = to_prefect_json(value)?;
    Event::from_json(&prefect, received, limits).map_err(|e| {
        let field = match e.field.as_str() {
            "occurred" => "time".to_owned(),
            "event" => "type".to_owned(),
            other => other.to_owned(),
        };
        EventError { field, ..e }
    })
}

/// The CloudEvent rewritten as a (partial) Prefect event document, not yet validated: for
/// callers that add to it before it becomes an [`Event`] (a webhook adds itself as a related
/// resource). Errors name the missing CloudEvents attribute.
pub fn to_prefect_json(value: &Value) -> Result<Value, EventError> {
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
    let mut prefect = json!({
        "id": id.to_string(),
        "event": ce_type,
        "resource": Value::Object(resource),
        "payload": payload,
    });
    // `time` is optional in a CloudEvent; without it `occurred` is left out (= received), as
    // an explicit `null` is refused.
    if let (Some(time), Some(map)) = (value.get("time"), prefect.as_object_mut()) {
        map.insert("occurred".into(), time.clone());
    }
    Ok(prefect)
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

/// Binary mode: attributes in `ce-*` headers (case-insensitive), the body is the data.
/// Returns `None` when the headers carry no `ce-specversion`.
pub fn from_binary(
    headers: &[(String, String)],
    body: &[u8],
    received: DateTime<Utc>,
    limits: &EventLimits,
) -> Option<Result<Event, EventError>> {
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.clone())
    };
    let specversion = get("ce-specversion")?;
    let mut structured = serde_json::Map::new();
    structured.insert("specversion".into(), Value::String(specversion));
    for (k, v) in headers {
        let lower = k.to_ascii_lowercase();
        if let Some(attr) = lower.strip_prefix("ce-")
            && attr != "specversion"
        {
            structured.insert(attr.to_owned(), Value::String(v.clone()));
        }
    }
    let data = serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()));
    if !body.is_empty() {
        structured.insert("data".into(), data);
    }
    Some(to_event(&Value::Object(structured), received, limits))
}

#[cfg(test)]
mod binary_tests {
    use super::*;

    #[test]
    fn maps_binary_mode_headers() {
        let headers = vec![
            ("Ce-Specversion".to_owned(), "1.0".to_owned()),
            ("ce-type".to_owned(), "sensor.read".to_owned()),
            ("ce-source".to_owned(), "/plant/7".to_owned()),
            ("ce-id".to_owned(), "42".to_owned()),
        ];
        let e = from_binary(
            &headers,
            br#"{"c": 21.5}"#,
            Utc::now(),
            &EventLimits::default(),
        )
        .expect("is a CloudEvent")
        .expect("maps");
        assert_eq!(e.event, "sensor.read");
        assert_eq!(e.resource.id(), "/plant/7");
        assert_eq!(e.payload, json!({"c": 21.5}));
        assert!(from_binary(&[], b"{}", Utc::now(), &EventLimits::default()).is_none());
    }
}
