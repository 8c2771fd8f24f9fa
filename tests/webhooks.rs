//! End-to-end tests of webhooks against the real daemon over loopback: Prefect's guide
//! examples, pass-through, CloudEvents, every authentication preset, toggle and rotate,
//! failures in the feed, limits.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use spur_ingest::webhook::auth::sign;
use support::{SpurDaemon, automations_folder, eventually, root};

/// A raw request's status (see `support::request`).
fn request(method: &str, url: &str, headers: &[(&str, String)], body: Vec<u8>) -> u16 {
    support::request(method, url, headers, body).0
}

fn api(method: &str, url: &str, body: Option<Value>) -> (u16, Value) {
    let body = if method == "POST" {
        Some(body.unwrap_or(json!({})))
    } else {
        body
    };
    let (status, text) = support::http(method, url, body);
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn create(daemon: &SpurDaemon, spec: Value) -> Value {
    let (status, body) = api("POST", &format!("{}/api/webhooks", daemon.url), Some(spec));
    assert_eq!(status, 201, "{body}");
    body
}

fn events(daemon: &SpurDaemon, name: &str) -> Vec<Value> {
    let (_, body) = api(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"event": {"name": [name]}}, "limit": 50})),
    );
    body["events"].as_array().cloned().unwrap_or_default()
}

fn start() -> (tempfile::TempDir, SpurDaemon) {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    (dir, daemon)
}

#[test]
fn prefect_guide_examples_static_and_dynamic() {
    let (_dir, daemon) = start();
    let stat = create(
        &daemon,
        json!({"name": "static", "template": r#"{"event": "model-update", "resource": {"prefect.resource.id": "product.models.big-language-model", "prefect.resource.name": "Big Language Model"}}"#}),
    );
    let url = stat["url"].as_str().expect("url").to_owned();
    assert!(url.contains("/hooks/") && stat["slug"].as_str().is_some_and(|s| s.len() >= 40));
    assert_eq!(request("GET", &url, &[], Vec::new()), 204);
    let e = eventually(Duration::from_secs(5), "the static event", || {
        events(&daemon, "model-update").into_iter().next()
    });
    assert_eq!(
        e["resource"]["prefect.resource.id"],
        "product.models.big-language-model"
    );
    let webhook = &e["related"][0];
    assert_eq!(webhook["prefect.resource.role"], "webhook");
    assert_eq!(
        webhook["prefect.resource.id"],
        format!(
            "prefect-cloud.webhook.{}",
            stat["id"].as_str().unwrap_or("")
        )
    );
    assert_eq!(
        e["payload"]["method"], "GET",
        "no payload in the template: {{method, headers, body}}"
    );

    let dynamic = create(
        &daemon,
        json!({"name": "dynamic", "template": r#"{"event": "model-refreshed", "resource": {"prefect.resource.id": "product.models.{{ body.model }}", "prefect.resource.name": "{{ body['friendly_name'] | default(body.model) }}", "producing-team": "{{ headers['x-team'] | default('unknown') }}"}}"#}),
    );
    let url = dynamic["url"].as_str().expect("url").to_owned();
    let status = request(
        "POST",
        &url,
        &[
            ("content-type", "application/x-www-form-urlencoded".into()),
            ("X-Team", "ml".into()),
        ],
        b"model=recommendations&friendly_name=Recommendations+%5BAlpha%5D".to_vec(),
    );
    assert_eq!(status, 204);
    let status = request(
        "PUT",
        &url,
        &[("content-type", "application/json".into())],
        br#"{"model": "ranker"}"#.to_vec(),
    );
    assert_eq!(status, 204);
    let got = eventually(Duration::from_secs(5), "two dynamic events", || {
        let e = events(&daemon, "model-refreshed");
        (e.len() == 2).then_some(e)
    });
    let by = |id: &str| {
        got.iter()
            .find(|e| e["resource"]["prefect.resource.id"] == id)
            .cloned()
            .expect("event")
    };
    let rec = by("product.models.recommendations");
    assert_eq!(
        rec["resource"]["prefect.resource.name"],
        "Recommendations [Alpha]"
    );
    assert_eq!(rec["resource"]["producing-team"], "ml");
    assert_eq!(
        by("product.models.ranker")["resource"]["prefect.resource.name"],
        "ranker"
    );
}

#[test]
fn pass_through_cloudevents_failures_toggle_and_rotate() {
    let (_dir, daemon) = start();
    let pass = create(
        &daemon,
        json!({"name": "pass", "template": "{{ body | tojson }}"}),
    );
    let url = pass["url"].as_str().expect("url").to_owned();
    let partial = json!({"event": "ci.finished", "resource": {"prefect.resource.id": "ci.build.9"}, "payload": {"ok": true}});
    assert_eq!(
        request(
            "POST",
            &url,
            &[("content-type", "application/json".into())],
            partial.to_string().into_bytes()
        ),
        204
    );
    let ci = eventually(Duration::from_secs(5), "the pass-through event", || {
        events(&daemon, "ci.finished").into_iter().next()
    });
    assert_eq!(ci["payload"], json!({"ok": true}));

    let ce = create(
        &daemon,
        json!({"name": "ce", "template": "{{ body | from_cloud_event(headers) }}"}),
    );
    let ce_url = ce["url"].as_str().expect("url").to_owned();
    let structured = json!({"specversion": "1.0", "type": "order.paid", "source": "/shop", "subject": "order-1", "id": "a1", "data": {"amount": 5}});
    assert_eq!(
        request(
            "POST",
            &ce_url,
            &[("content-type", "application/cloudevents+json".into())],
            structured.to_string().into_bytes()
        ),
        204
    );
    let binary_headers = [
        ("ce-specversion", "1.0".to_owned()),
        ("ce-type", "order.paid".to_owned()),
        ("ce-source", "/shop".to_owned()),
        ("ce-id", "a2".to_owned()),
        ("content-type", "application/json".to_owned()),
    ];
    assert_eq!(
        request(
            "POST",
            &ce_url,
            &binary_headers,
            br#"{"amount": 7}"#.to_vec()
        ),
        204
    );
    let paid = eventually(Duration::from_secs(5), "both CloudEvents", || {
        let e = events(&daemon, "order.paid");
        (e.len() == 2).then_some(e)
    });
    let structured_event = paid
        .iter()
        .find(|e| e["resource"]["prefect.resource.id"] == "order-1")
        .expect("structured");
    assert_eq!(structured_event["payload"]["data"], json!({"amount": 5}));
    assert_eq!(
        structured_event["payload"]["cloudevents"]["source"],
        "/shop"
    );
    let binary_event = paid
        .iter()
        .find(|e| e["resource"]["prefect.resource.id"] == "/shop")
        .expect("binary");
    assert_eq!(binary_event["payload"]["data"], json!({"amount": 7}));

    // A template that renders invalid JSON: 400, and the feed says why (without Authorization).
    let bad = create(
        &daemon,
        json!({"name": "bad", "template": r#"{"event": "x", "resource": {{ body.r }} }"#}),
    );
    let bad_url = bad["url"].as_str().expect("url").to_owned();
    let status = request(
        "POST",
        &bad_url,
        &[
            ("Authorization", "Bearer secret-token".into()),
            ("content-type", "text/plain".into()),
        ],
        b"oops".to_vec(),
    );
    assert_eq!(status, 400);
    let failed = eventually(Duration::from_secs(5), "the failure event", || {
        events(&daemon, "prefect-cloud.webhook.failed")
            .into_iter()
            .next()
    });
    assert!(
        failed["payload"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("JSON"),
        "{failed}"
    );
    assert!(
        failed["payload"]["headers"].get("authorization").is_none(),
        "Authorization never reaches the feed"
    );
    assert!(!failed.to_string().contains("secret-token"));

    // Toggle: 404 while disabled. Rotate: the old URL stops working.
    let (_, off) = api(
        "POST",
        &format!("{}/api/webhooks/pass/toggle", daemon.url),
        None,
    );
    assert_eq!(off["enabled"], false);
    assert_eq!(
        request(
            "POST",
            &url,
            &[("content-type", "application/json".into())],
            partial.to_string().into_bytes()
        ),
        404
    );
    let (_, on) = api(
        "POST",
        &format!("{}/api/webhooks/pass/toggle", daemon.url),
        None,
    );
    assert_eq!(on["enabled"], true);
    let (_, rotated) = api(
        "POST",
        &format!("{}/api/webhooks/pass/rotate", daemon.url),
        None,
    );
    let new_url = rotated["url"].as_str().expect("url").to_owned();
    assert_ne!(new_url, url);
    assert_eq!(
        request(
            "POST",
            &url,
            &[("content-type", "application/json".into())],
            partial.to_string().into_bytes()
        ),
        404
    );
    assert_eq!(
        request(
            "POST",
            &new_url,
            &[("content-type", "application/json".into())],
            partial.to_string().into_bytes()
        ),
        204
    );

    // Limits: a per-webhook rate, an unknown slug, a body over 1 MiB.
    let limited = create(
        &daemon,
        json!({"name": "limited", "rate_limit": 2, "template": r#"{"event": "lim", "resource": {"prefect.resource.id": "r"}}"#}),
    );
    let limited_url = limited["url"].as_str().expect("url").to_owned();
    let codes: Vec<u16> = (0..8)
        .map(|_| request("GET", &limited_url, &[], Vec::new()))
        .collect();
    assert!(codes.contains(&429) && codes.contains(&204), "{codes:?}");
    assert_eq!(
        request(
            "POST",
            &format!("{}/hooks/not-a-slug", daemon.url),
            &[],
            Vec::new()
        ),
        404
    );
    assert_eq!(
        request("POST", &new_url, &[], vec![b'x'; 1024 * 1024 + 10]),
        413
    );

    // The CLI sees the same webhooks, without secrets.
    let out = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["webhook", "ls", "--api", &daemon.url])
        .current_dir(root())
        .output()
        .expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("name: pass") && text.contains("name: ce"),
        "{text}"
    );
}

#[test]
fn authentication_presets_accept_valid_and_refuse_wrong_stale_and_replayed() {
    let (_dir, daemon) = start();
    let template = r#"{"event": "signed", "resource": {"prefect.resource.id": "hook.{{ headers['x-n'] | default('0') }}"}}"#;
    let body = br#"{"hello": "world"}"#.to_vec();
    let now = chrono::Utc::now().timestamp();

    let key_hook = create(
        &daemon,
        json!({"name": "key", "template": template, "auth": {"type": "api_key"}}),
    );
    let key = key_hook["api_key"]
        .as_str()
        .expect("key shown once")
        .to_owned();
    let url = key_hook["url"].as_str().expect("url").to_owned();
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Authorization", format!("Bearer {key}"))],
            body.clone()
        ),
        204
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Authorization", "Bearer wrong".into())],
            body.clone()
        ),
        401
    );
    assert_eq!(request("POST", &url, &[], body.clone()), 401);
    let (_, listed) = api("GET", &format!("{}/api/webhooks/key", daemon.url), None);
    assert!(
        !listed.to_string().contains(&key),
        "the key is never shown again"
    );

    let gh = create(
        &daemon,
        json!({"name": "gh", "template": template, "auth": {"type": "hmac", "preset": "github", "secrets": ["old-secret", "new-secret"]}}),
    );
    let url = gh["url"].as_str().expect("url").to_owned();
    assert_eq!(
        request(
            "POST",
            &url,
            &[("X-Hub-Signature-256", sign::github("new-secret", &body))],
            body.clone()
        ),
        204
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[("X-Hub-Signature-256", sign::github("old-secret", &body))],
            body.clone()
        ),
        204
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[("X-Hub-Signature-256", sign::github("other", &body))],
            body.clone()
        ),
        401
    );

    let stripe = create(
        &daemon,
        json!({"name": "stripe", "template": template, "auth": {"type": "hmac", "preset": "stripe", "secrets": ["whsk"]}}),
    );
    let url = stripe["url"].as_str().expect("url").to_owned();
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Stripe-Signature", sign::stripe("whsk", now, &body))],
            body.clone()
        ),
        204
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Stripe-Signature", sign::stripe("whsk", now - 3600, &body))],
            body.clone()
        ),
        401,
        "stale"
    );
    assert_eq!(
        request(
            "POST",
            &url,
            &[("Stripe-Signature", sign::stripe("nope", now, &body))],
            body.clone()
        ),
        401
    );

    use base64::Engine as _;
    let secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"standard-key")
    );
    let standard = create(
        &daemon,
        json!({"name": "standard", "template": template, "auth": {"type": "hmac", "preset": "standard", "secrets": [secret.clone()]}}),
    );
    let url = standard["url"].as_str().expect("url").to_owned();
    let signed = |id: &str, ts: i64| {
        vec![
            ("webhook-id", id.to_owned()),
            ("webhook-timestamp", ts.to_string()),
            ("webhook-signature", sign::standard(&secret, id, ts, &body)),
        ]
    };
    assert_eq!(
        request("POST", &url, &signed("msg_1", now), body.clone()),
        204
    );
    assert_eq!(
        request("POST", &url, &signed("msg_1", now), body.clone()),
        401,
        "replayed"
    );
    assert_eq!(
        request("POST", &url, &signed("msg_2", now - 3600), body.clone()),
        401,
        "stale"
    );

    let generic = create(
        &daemon,
        json!({"name": "generic", "template": template, "auth": {"type": "hmac", "preset": "generic", "header": "X-Sig", "encoding": "base64", "secrets": ["g"]}}),
    );
    let url = generic["url"].as_str().expect("url").to_owned();
    let mac = {
        use hmac::{Hmac, Mac};
        let mut m = <Hmac<sha2::Sha256> as Mac>::new_from_slice(b"g").expect("key");
        m.update(&body);
        base64::engine::general_purpose::STANDARD.encode(m.finalize().into_bytes())
    };
    assert_eq!(request("POST", &url, &[("X-Sig", mac)], body.clone()), 204);
    assert_eq!(
        request("POST", &url, &[("X-Sig", "AAAA".into())], body.clone()),
        401
    );

    let accepted = eventually(Duration::from_secs(5), "the signed events", || {
        let e = events(&daemon, "signed");
        (e.len() == 6).then_some(e)
    });
    assert_eq!(
        accepted.len(),
        6,
        "1 API key + 2 GitHub (both secrets) + 1 Stripe + 1 Standard + 1 generic"
    );
}

#[test]
fn required_auth_disables_unauthenticated_webhooks() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let data = dir.path().join("data");
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let open = create(
        &daemon,
        json!({"name": "open", "template": r#"{"event": "e", "resource": {"prefect.resource.id": "r"}}"#}),
    );
    let slug = open["slug"].as_str().expect("slug").to_owned();
    assert_eq!(
        request(
            "GET",
            &format!("{}/hooks/{slug}", daemon.url),
            &[],
            Vec::new()
        ),
        204
    );
    daemon.terminate();
    let daemon = SpurDaemon::start(&data, &automations, &["--webhooks-require-auth"]);
    assert_eq!(
        request(
            "GET",
            &format!("{}/hooks/{slug}", daemon.url),
            &[],
            Vec::new()
        ),
        404,
        "served as disabled"
    );
    let (status, body) = api(
        "POST",
        &format!("{}/api/webhooks", daemon.url),
        Some(
            json!({"name": "open2", "template": r#"{"event": "e", "resource": {"prefect.resource.id": "r"}}"#}),
        ),
    );
    assert_eq!(status, 422, "{body}");
    // Declared in YAML: the slug is generated once and kept across restarts.
    std::fs::write(
        automations.join("hooks.yaml"),
        "webhooks:\n  - name: declared\n    template: '{\"event\": \"d\", \"resource\": {\"prefect.resource.id\": \"r\"}}'\n    auth: {type: hmac, preset: github, secrets: [s]}\n",
    )
    .expect("write");
    let first = eventually(Duration::from_secs(5), "the declared webhook", || {
        let (status, body) = api(
            "GET",
            &format!("{}/api/webhooks/declared", daemon.url),
            None,
        );
        (status == 200).then_some(body)
    });
    daemon.terminate();
    let daemon = SpurDaemon::start(&data, &automations, &["--webhooks-require-auth"]);
    let (_, again) = api(
        "GET",
        &format!("{}/api/webhooks/declared", daemon.url),
        None,
    );
    assert_eq!(first["slug"], again["slug"]);
}
