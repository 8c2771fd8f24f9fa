//! Hostile requests at `/hooks/{slug}` (thousands of generated cases per run): random bytes,
//! deep JSON, huge and odd headers, bad encodings, every method. The handler must answer with
//! one of its documented statuses, never panic, and never leak the Authorization header.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use proptest::prelude::*;
use spur_core::EventLimits;
use spur_ingest::webhook::{Registry, ReplayGuard, SecretBox, Webhook, WebhookIngest, routes};
use spur_ingest::{Intake, Submission};
use spur_template::TemplateEngine;
use tokio::sync::mpsc;
use tower::ServiceExt;

fn setup(runtime: &tokio::runtime::Runtime) -> (axum::Router, Arc<std::sync::Mutex<Vec<String>>>) {
    let (tx, mut rx) = mpsc::channel::<Submission>(1024);
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = seen.clone();
    runtime.spawn(async move {
        while let Some(s) = rx.recv().await {
            for e in &s.events {
                sink.lock()
                    .expect("lock")
                    .push(serde_json::to_string(e).unwrap_or_default());
            }
            let _ = s.done.send(Ok(spur_ingest::Receipt {
                accepted: s.events.len(),
                ..Default::default()
            }));
        }
    });
    let registry = Registry::default();
    let templates = [
        ("tojson", "{{ body | tojson }}"),
        (
            "fields",
            r#"{"event": "h.{{ body.kind | default('x') }}", "resource": {"prefect.resource.id": "r.{{ headers['x-id'] | default('0') }}"}, "payload": {"m": "{{ method }}"}}"#,
        ),
        ("ce", "{{ body | from_cloud_event(headers) }}"),
    ];
    registry.replace_all(templates.iter().map(|(slug, t)| Webhook {
        id: uuid::Uuid::new_v4(),
        name: slug.to_string(),
        description: String::new(),
        template: t.to_string(),
        enabled: true,
        slug: slug.to_string(),
        auth: None,
        rate_limit: 1_000_000,
        created: chrono::Utc::now(),
    }));
    let router = routes(WebhookIngest {
        intake: Intake::new(tx, EventLimits::default()),
        registry,
        secrets: SecretBox::new(&[1u8; 32]),
        replay: Arc::new(ReplayGuard::default()),
        templates: Arc::new(TemplateEngine::new()),
        failures: Arc::default(),
    });
    (router, seen)
}

fn deep_json(depth: usize) -> String {
    format!("{}1{}", "[".repeat(depth), "]".repeat(depth))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn hostile_requests_get_documented_answers(
        slug in prop::sample::select(vec!["tojson", "fields", "ce", "missing"]),
        method in prop::sample::select(vec!["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]),
        content_type in prop::sample::select(vec!["application/json", "application/x-www-form-urlencoded", "text/plain", "", "application/json; charset=latin1"]),
        body in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..512),
            "[a-z=&%+]{0,64}".prop_map(String::into_bytes),
            (0usize..200).prop_map(|d| deep_json(d).into_bytes()),
            Just(br#"{"specversion": "1.0", "type": "t", "source": "s", "id": "1"}"#.to_vec()),
            Just(br#"{"event": "e", "resource": {"prefect.resource.id": "r"}}"#.to_vec()),
        ],
        header_value in "[ -~]{0,2048}",
    ) {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let (router, seen) = setup(&runtime);
        let request = Request::builder()
            .method(method)
            .uri(format!("/hooks/{slug}"))
            .header("content-type", content_type)
            .header("x-id", header_value.clone())
            .header("ce-specversion", "1.0")
            .header("authorization", "Bearer top-secret-value")
            .body(Body::from(body))
            .expect("request");
        let response = runtime.block_on(router.oneshot(request)).expect("infallible");
        let allowed = [StatusCode::NO_CONTENT, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND,
                       StatusCode::METHOD_NOT_ALLOWED, StatusCode::PAYLOAD_TOO_LARGE];
        prop_assert!(allowed.contains(&response.status()), "{}", response.status());
        for e in seen.lock().expect("lock").iter() {
            prop_assert!(!e.contains("top-secret-value"), "Authorization leaked: {e}");
        }
    }
}
