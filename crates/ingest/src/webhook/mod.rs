//! Webhooks: Prefect Cloud's templated webhooks, self-hosted.
//!
//! A [`Webhook`] turns any HTTP request to `/hooks/{slug}` into an event by rendering its
//! template with `method`, `headers` (case-insensitive, `Authorization` removed) and `body`
//! (JSON for `application/json`, a flat mapping for form posts, JSON-if-it-parses for other
//! types, else the raw text). The output must be a JSON event with at least `event` and
//! `resource["prefect.resource.id"]`; `id` and `occurred` get defaults, the webhook is added
//! as a related resource (`prefect-cloud.webhook.<id>`, role `webhook`), and a template that
//! sets no `payload` gets `{method, headers, body}`.
//!
//! Answers are deliberately quiet: 204 on success, 400 for anything wrong with interpreting the
//! request (and a `prefect-cloud.webhook.failed` event with the details lands in the feed),
//! 404 for an unknown or disabled slug, 401 when authentication fails, 413 over the body limit,
//! 429 over the rate limit.

pub mod auth;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::any;
use base64::Engine as _;
use chrono::Utc;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use spur_core::{Event, EventLimits};
use spur_template::TemplateEngine;
use tracing::warn;
use uuid::Uuid;

use crate::intake::{Intake, normalize};
pub use auth::{AuthFailure, HmacPreset, ReplayGuard, ReplayMemory, SecretBox, WebhookAuth};

/// Largest accepted webhook body.
pub const MAX_WEBHOOK_BODY: usize = 1024 * 1024;

/// A webhook definition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Webhook {
    /// Id.
    pub id: Uuid,
    /// Name (unique).
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The event template (Jinja, `<< >>` allowed).
    pub template: String,
    /// Disabled webhooks answer 404.
    pub enabled: bool,
    /// The random path segment: `/hooks/<slug>`.
    pub slug: String,
    /// Request authentication, if any.
    #[serde(default)]
    pub auth: Option<WebhookAuth>,
    /// Requests per second allowed (burst of the same size).
    #[serde(default = "default_rate")]
    pub rate_limit: u32,
    /// When it was created.
    pub created: chrono::DateTime<Utc>,
}

fn default_rate() -> u32 {
    100
}

/// A fresh opaque slug: 244 random bits, URL-safe, revealing nothing.
pub fn new_slug() -> String {
    let mut bytes = Vec::with_capacity(32);
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    bytes.extend_from_slice(Uuid::new_v4().as_bytes());
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// The live webhooks, by slug, shared between the API (which edits) and the handler.
#[derive(Clone, Debug, Default)]
pub struct Registry {
    by_slug: Arc<RwLock<HashMap<String, Webhook>>>,
    buckets: Arc<Mutex<HashMap<Uuid, (f64, Instant)>>>,
    failures: Arc<Mutex<HashMap<Uuid, LastFailure>>>,
}

/// A webhook's latest refused request since the daemon started (what `spur webhook get` and
/// the UI show): when, at which stage, why; never the body or the `Authorization` header.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct LastFailure {
    /// When it was refused.
    #[serde(serialize_with = "serialize_at")]
    pub at: chrono::DateTime<Utc>,
    /// `authentication` (answered 401) or `template` (answered 400).
    pub stage: &'static str,
    /// Why, in words (e.g. `bad signature`, `stale timestamp`).
    pub reason: String,
    /// The fixed label (the metric's `reason`: `bad_signature`, `replayed`, …; `template`).
    pub reason_code: &'static str,
    /// Refused requests of this webhook since the daemon started.
    pub count: u64,
}

fn serialize_at<S: serde::Serializer>(
    at: &chrono::DateTime<Utc>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&spur_core::time::format_timestamp(*at))
}

impl Registry {
    /// Replaces every webhook.
    pub fn replace_all(&self, hooks: impl IntoIterator<Item = Webhook>) {
        if let Ok(mut map) = self.by_slug.write() {
            *map = hooks.into_iter().map(|h| (h.slug.clone(), h)).collect();
        }
    }

    /// Adds or updates one (by id; a rotated slug replaces the old one).
    pub fn upsert(&self, hook: Webhook) {
        if let Ok(mut map) = self.by_slug.write() {
            map.retain(|_, h| h.id != hook.id);
            map.insert(hook.slug.clone(), hook);
        }
    }

    /// Removes one.
    pub fn remove(&self, id: Uuid) {
        if let Ok(mut map) = self.by_slug.write() {
            map.retain(|_, h| h.id != id);
        }
        if let Ok(mut failures) = self.failures.lock() {
            failures.remove(&id);
        }
    }

    /// Notes a refused request as the webhook's last failure (one entry per webhook).
    pub fn record_failure(
        &self,
        id: Uuid,
        stage: &'static str,
        reason: &str,
        reason_code: &'static str,
    ) {
        if let Ok(mut failures) = self.failures.lock() {
            let count = failures.get(&id).map_or(0, |f| f.count) + 1;
            failures.insert(
                id,
                LastFailure {
                    at: Utc::now(),
                    stage,
                    reason: reason.chars().take(200).collect(),
                    reason_code,
                    count,
                },
            );
        }
    }

    /// The webhook's last refused request since the daemon started, if any.
    pub fn last_failure(&self, id: Uuid) -> Option<LastFailure> {
        self.failures.lock().ok()?.get(&id).cloned()
    }

    fn get(&self, slug: &str) -> Option<Webhook> {
        self.by_slug.read().ok()?.get(slug).cloned()
    }

    /// Token bucket per webhook: `rate` per second, burst `rate`.
    fn allow(&self, hook: &Webhook) -> bool {
        let Ok(mut buckets) = self.buckets.lock() else {
            return true;
        };
        let rate = f64::from(hook.rate_limit.max(1));
        let now = Instant::now();
        let (tokens, last) = buckets.entry(hook.id).or_insert((rate, now));
        *tokens = (*tokens + now.duration_since(*last).as_secs_f64() * rate).min(rate);
        *last = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Shared state of the `/hooks/{slug}` route.
#[derive(Clone, Debug)]
pub struct WebhookIngest {
    /// Where events go.
    pub intake: Intake,
    /// The webhooks.
    pub registry: Registry,
    /// Decrypts HMAC secrets.
    pub secrets: SecretBox,
    /// Standard Webhooks replay protection.
    pub replay: Arc<ReplayGuard>,
    /// Templates.
    pub templates: Arc<TemplateEngine>,
    /// Refused requests, by reason (the daemon's metrics read them).
    pub failures: Arc<FailureCounts>,
}

/// Webhook requests refused by authentication, counted by [`AuthFailure::label`].
#[derive(Debug, Default)]
pub struct FailureCounts(Mutex<std::collections::BTreeMap<&'static str, u64>>);

impl FailureCounts {
    /// Counts one refusal.
    pub fn count(&self, label: &'static str) {
        if let Ok(mut map) = self.0.lock() {
            *map.entry(label).or_default() += 1;
        }
    }

    /// Every label with its count, sorted by label.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        self.0
            .lock()
            .map(|m| m.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }
}

/// The `/hooks/{slug}` route.
pub fn routes(state: WebhookIngest) -> Router {
    Router::new()
        .route("/hooks/{slug}", any(receive))
        .layer(DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
        .with_state(state)
}

/// Headers as (name, value) pairs, `Authorization` removed (never shown to templates or the
/// feed).
fn visible_headers(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for (k, v) in headers {
        let name = k.as_str().to_ascii_lowercase();
        if name == "authorization" {
            continue;
        }
        out.insert(
            name,
            Value::String(String::from_utf8_lossy(v.as_bytes()).into_owned()),
        );
    }
    out
}

/// Prefect's body rules.
pub fn parse_body(content_type: Option<&str>, body: &[u8]) -> Value {
    if body.is_empty() {
        return Value::Null;
    }
    let media = content_type
        .and_then(|c| c.split(';').next())
        .map(|c| c.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if media == "application/x-www-form-urlencoded" {
        let text = String::from_utf8_lossy(body);
        let mut map = Map::new();
        for pair in text.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            map.insert(form_decode(k), Value::String(form_decode(v)));
        }
        return Value::Object(map);
    }
    serde_json::from_slice(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into_owned()))
}

/// `application/x-www-form-urlencoded` decoding (`+` is a space, `%XX` a byte).
fn form_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let decoded = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match decoded {
                    Some(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn quiet(status: StatusCode) -> Response {
    status.into_response()
}

async fn receive(
    State(state): State<WebhookIngest>,
    Path(slug): Path<String>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let Some(hook) = state.registry.get(&slug).filter(|h| h.enabled) else {
        return quiet(StatusCode::NOT_FOUND);
    };
    let allowed_method = matches!(
        method,
        Method::GET | Method::HEAD | Method::DELETE | Method::POST | Method::PUT | Method::PATCH
    );
    if !allowed_method {
        return quiet(StatusCode::METHOD_NOT_ALLOWED);
    }
    if let Some(auth) = &hook.auth {
        let pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| {
                (
                    k.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect();
        if let Err(AuthFailure(reason)) = auth::verify(
            auth,
            &pairs,
            &body,
            &state.secrets,
            &state.replay,
            Utc::now().timestamp(),
        ) {
            let failure = AuthFailure(reason);
            warn!(webhook = %hook.name, reason = %failure.0, "webhook request refused");
            state.failures.count(failure.label());
            state
                .registry
                .record_failure(hook.id, "authentication", &failure.0, failure.label());
            // Recorded in the feed (method, headers without Authorization; never the body,
            // which an unauthenticated sender chose), within the webhook's rate limit.
            if state.registry.allow(&hook)
                && let Some(event) = auth_failure_event(&hook, &method, &headers, &failure)
            {
                let _ = state.intake.submit(vec![event]).await;
            }
            return quiet(StatusCode::UNAUTHORIZED);
        }
    }
    if !state.registry.allow(&hook) {
        return quiet(StatusCode::TOO_MANY_REQUESTS);
    }
    let context_json = request_context(&method, &headers, &body);
    let outcome = map_request(
        &state.templates,
        state.intake.limits(),
        &hook,
        &context_json,
    );
    match outcome {
        Ok(event) => match state.intake.submit(vec![event]).await {
            Ok(_) => quiet(StatusCode::NO_CONTENT),
            Err(_) => quiet(StatusCode::SERVICE_UNAVAILABLE),
        },
        Err((reason, rendered)) => {
            // The words may quote the request (the template's error); the event has them,
            // the webhook's summary does not.
            state.registry.record_failure(
                hook.id,
                "template",
                "the request did not make a valid event (see its prefect-cloud.webhook.failed event)",
                "template",
            );
            let failed = failure_event(&hook, &context_json, &reason, rendered.as_deref());
            if let Some(e) = failed {
                let _ = state.intake.submit(vec![e]).await;
            }
            quiet(StatusCode::BAD_REQUEST)
        }
    }
}

/// What a webhook template sees of a request: `{method, headers, body}` (headers lower-cased,
/// `Authorization` removed; the body read by [`parse_body`]).
pub fn request_context(method: &Method, headers: &HeaderMap, body: &[u8]) -> Value {
    let visible = visible_headers(headers);
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let parsed = parse_body(content_type, body);
    json!({"method": method.as_str(), "headers": visible, "body": parsed})
}

/// The webhook request mapping: renders `hook`'s template over a [`request_context`] and turns
/// the output into an event (webhook added as a related resource, default payload). Pure, so
/// the fuzz target exercises exactly what `/hooks/{slug}` does. The error is the reason and
/// the rendered text, if rendering got that far.
pub fn map_request(
    templates: &TemplateEngine,
    limits: &EventLimits,
    hook: &Webhook,
    context_json: &Value,
) -> Result<Event, (String, Option<String>)> {
    let context = spur_template::json_context(context_json);
    let rendered = templates
        .render(&hook.template, &context)
        .map_err(|e| (e.to_string(), None))?;
    let mut value: Value = serde_json::from_str(&rendered).map_err(|e| {
        (
            format!("the template did not render a JSON object: {e}"),
            Some(rendered.clone()),
        )
    })?;
    // A template may render a CloudEvent (`{{ body | tojson }}` of a CloudEvents sender):
    // it becomes a Prefect event document first, so the webhook is added to what is kept.
    if crate::cloudevents::is_cloud_event(&value) {
        value = crate::cloudevents::to_prefect_json(&value)
            .map_err(|e| (e.to_string(), Some(rendered.clone())))?;
    }
    let Value::Object(map) = &mut value else {
        return Err((
            "the template must render a JSON object".into(),
            Some(rendered),
        ));
    };
    if !map.contains_key("payload") {
        map.insert(
            "payload".into(),
            json!({"method": context_json["method"], "headers": context_json["headers"], "body": context_json["body"]}),
        );
    }
    let mut related = match map.remove("related") {
        Some(Value::Array(items)) => items,
        None | Some(Value::Null) => Vec::new(),
        Some(_) => return Err(("`related` must be a list".into(), Some(rendered))),
    };
    related.push(json!({
        "prefect.resource.id": format!("prefect-cloud.webhook.{}", hook.id),
        "prefect.resource.role": "webhook",
        "prefect.resource.name": hook.name,
    }));
    map.insert("related".into(), Value::Array(related));
    normalize(value, Utc::now(), limits).map_err(|e| (e.to_string(), Some(rendered)))
}

/// `prefect-cloud.webhook.failed` for a request refused by authentication: why, the method
/// and the headers (`Authorization` removed), not the body.
fn auth_failure_event(
    hook: &Webhook,
    method: &Method,
    headers: &HeaderMap,
    failure: &AuthFailure,
) -> Option<Event> {
    let raw = json!({
        "event": "prefect-cloud.webhook.failed",
        "resource": {
            "prefect.resource.id": format!("prefect-cloud.webhook.{}", hook.id),
            "prefect.resource.name": hook.name,
        },
        "payload": {
            "method": method.as_str(),
            "headers": visible_headers(headers),
            "reason": failure.0,
            "reason_code": failure.label(),
            "stage": "authentication",
        },
    });
    Event::from_json(&raw, Utc::now(), &EventLimits::default()).ok()
}

/// `prefect-cloud.webhook.failed`: what came in and what the template made of it.
fn failure_event(
    hook: &Webhook,
    context_json: &Value,
    reason: &str,
    rendered: Option<&str>,
) -> Option<Event> {
    let raw = json!({
        "event": "prefect-cloud.webhook.failed",
        "resource": {
            "prefect.resource.id": format!("prefect-cloud.webhook.{}", hook.id),
            "prefect.resource.name": hook.name,
        },
        "payload": {
            "method": context_json["method"],
            "headers": context_json["headers"],
            "body": context_json["body"],
            "reason": reason,
            "rendered": rendered,
        },
    });
    Event::from_json(&raw, Utc::now(), &EventLimits::default()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_follow_prefect_rules() {
        assert_eq!(
            parse_body(Some("application/json"), br#"{"a":1}"#),
            json!({"a": 1})
        );
        assert_eq!(
            parse_body(
                Some("application/x-www-form-urlencoded"),
                b"model=R2-D2&friendly_name=Artoo+Detoo&x=%41%zz"
            ),
            json!({"model": "R2-D2", "friendly_name": "Artoo Detoo", "x": "A%zz"})
        );
        assert_eq!(parse_body(Some("text/plain"), b"[1,2]"), json!([1, 2]));
        assert_eq!(parse_body(Some("text/plain"), b"hello"), json!("hello"));
        assert_eq!(parse_body(None, b""), Value::Null);
        assert_eq!(form_decode("%"), "%");
        assert_eq!(form_decode("%4"), "%4");
        assert_eq!(form_decode("a%20b"), "a b");
    }

    /// Found by the `webhook_mapping` fuzz target: a template that renders a CloudEvent
    /// (here Prefect's pass-through of a CloudEvents body) lost the webhook's related resource
    /// when the CloudEvent was mapped.
    #[test]
    fn a_rendered_cloud_event_keeps_the_webhook_as_a_related_resource() {
        let hook = Webhook {
            id: Uuid::nil(),
            name: "ce".into(),
            description: String::new(),
            template: "{{ body | tojson }}".into(),
            enabled: true,
            slug: "ce".into(),
            auth: None,
            rate_limit: 100,
            created: chrono::DateTime::UNIX_EPOCH,
        };
        let body =
            br#"{"specversion": "2.0", "type": "t", "source": "/s", "id": "1", "data": {"k": 1}}"#;
        let context = request_context(&Method::POST, &HeaderMap::new(), body);
        let event = map_request(
            &TemplateEngine::new(),
            &EventLimits::default(),
            &hook,
            &context,
        )
        .expect("a CloudEvent maps");
        assert_eq!(event.event, "t");
        assert_eq!(event.resource.id(), "/s");
        assert!(
            event.related.iter().any(|r| r.id()
                == format!("prefect-cloud.webhook.{}", Uuid::nil())
                && r.role() == Some("webhook")),
            "{:?}",
            event.related
        );
    }

    #[test]
    fn slugs_are_long_and_url_safe() {
        let s = new_slug();
        assert!(s.len() >= 40, "{s}");
        assert!(
            s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        );
        assert_ne!(s, new_slug());
    }
}
