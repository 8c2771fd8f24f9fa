//! Prefect's `from_cloud_event(headers)` webhook template helper.

use minijinja::{Error, ErrorKind, Value};
use serde_json::Value as Json;
use uuid::Uuid;

/// Prefect's `from_cloud_event(headers)` template helper, as a filter over the body: a
/// structured-mode CloudEvent body, or binary mode from `ce-*` headers. The result is a
/// Prefect event: `subject` (else `source`) is the resource, `data` goes to `payload.data`,
/// the other attributes to `payload.cloudevents`.
pub fn from_cloud_event(body: Value, headers: Value) -> Result<Value, Error> {
    let as_json = |v: &Value| serde_json::to_value(v).unwrap_or(Json::Null);
    let body = as_json(&body);
    let headers = as_json(&headers);
    let header = |name: &str| {
        headers
            .as_object()
            .and_then(|m| m.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
            .and_then(|(_, v)| v.as_str())
            .map(str::to_owned)
    };
    let mut attributes = serde_json::Map::new();
    let data;
    if body.get("specversion").is_some() {
        for (k, v) in body.as_object().into_iter().flatten() {
            if k != "data" && k != "data_base64" {
                attributes.insert(k.clone(), v.clone());
            }
        }
        data = body.get("data").cloned().unwrap_or(Json::Null);
    } else if let Some(version) = header("ce-specversion") {
        attributes.insert("specversion".into(), Json::String(version));
        for (k, v) in headers.as_object().into_iter().flatten() {
            if let Some(attr) = k.to_ascii_lowercase().strip_prefix("ce-")
                && attr != "specversion"
            {
                attributes.insert(attr.to_owned(), v.clone());
            }
        }
        if let Some(ct) = header("content-type") {
            attributes.insert("datacontenttype".into(), Json::String(ct));
        }
        data = body;
    } else {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "from_cloud_event: neither a structured CloudEvent body nor ce-* headers",
        ));
    }
    let text = |k: &str| attributes.get(k).and_then(Json::as_str).map(str::to_owned);
    let (Some(ce_type), Some(source)) = (text("type"), text("source")) else {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            "from_cloud_event: `type` and `source` are required",
        ));
    };
    let mut event = serde_json::json!({
        "event": ce_type,
        "resource": {"prefect.resource.id": text("subject").unwrap_or_else(|| source.clone()), "cloudevents.source": source},
        "payload": {"data": data, "cloudevents": attributes},
    });
    if let Some(time) = text("time") {
        event["occurred"] = Json::String(time);
    }
    if let Some(id) = text("id") {
        event["id"] = Json::String(
            Uuid::parse_str(&id)
                .unwrap_or_else(|_| {
                    Uuid::new_v5(
                        &spur_core::SPUR_NAMESPACE,
                        format!("cloudevent:{source}:{id}").as_bytes(),
                    )
                })
                .to_string(),
        );
    }
    // A JSON string, like Prefect's helper, so `{{ body|from_cloud_event(headers) }}` renders JSON.
    Ok(Value::from_safe_string(event.to_string()))
}
