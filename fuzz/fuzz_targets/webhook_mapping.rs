//! The webhook request mapping (`/hooks/{slug}`): a request's method, content type and body
//! rendered through the webhook's template into an event. Input:
//! `template \0 content-type \0 body`; an empty template means Prefect's pass-through
//! (`{{ body | tojson }}`). The result, when there is one, must be a valid event carrying
//! the webhook as a related resource.
#![no_main]

use axum::http::{HeaderMap, HeaderValue, Method, header};
use libfuzzer_sys::fuzz_target;
use spur_core::EventLimits;
use spur_ingest::webhook::{Webhook, map_request, request_context};
use spur_template::TemplateEngine;

fuzz_target!(|data: &[u8]| {
    let [template, content_type, body] = spur_fuzz::split_parts::<3>(data);
    spur_fuzz::on_worker_stack(move || {
        let template = if template.trim().is_empty() {
            "{{ body | tojson }}".to_owned()
        } else {
            template
        };
        let hook = Webhook {
            id: uuid::Uuid::nil(),
            name: "fuzz".into(),
            description: String::new(),
            template,
            enabled: true,
            slug: "fuzz".into(),
            auth: None,
            rate_limit: 100,
            created: chrono::DateTime::UNIX_EPOCH,
        };
        let mut headers = HeaderMap::new();
        if let Ok(value) = HeaderValue::from_str(&content_type) {
            headers.insert(header::CONTENT_TYPE, value);
        }
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer secret"),
        );
        let context = request_context(&Method::POST, &headers, body.as_bytes());
        assert!(
            context["headers"].get("authorization").is_none(),
            "Authorization reached the template"
        );
        let engine = TemplateEngine::new();
        if let Ok(event) = map_request(&engine, &EventLimits::default(), &hook, &context) {
            assert!(
                event
                    .related
                    .iter()
                    .any(|r| r.id() == "prefect-cloud.webhook.00000000-0000-0000-0000-000000000000"),
                "the webhook is not a related resource"
            );
        }
    });
});
