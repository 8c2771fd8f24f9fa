//! Managing webhooks: `/api/webhooks` (create, list, get, toggle, rotate, delete), the ones
//! declared in YAML, and the persistence behind the live [`Registry`].
//!
//! Secrets never leave in clear: API keys are stored as SHA-256 hashes and shown once, when
//! created or rotated; HMAC secrets are sealed with the data folder's key; listings show only
//! the kind of authentication.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use serde_json::{Value, json};
use spur_ingest::webhook::auth::hash_key;
use spur_ingest::webhook::{HmacPreset, Registry, SecretBox, Webhook, WebhookAuth, new_slug};
use spur_store::Store;
use spur_template::TemplateEngine;
use uuid::Uuid;

/// Shared state of the webhook API.
#[derive(Clone, Debug)]
pub struct WebhookService {
    /// Persistence.
    pub store: Arc<Store>,
    /// What `/hooks/{slug}` serves.
    pub registry: Registry,
    /// Seals HMAC secrets.
    pub secrets: SecretBox,
    /// Template validation.
    pub templates: Arc<TemplateEngine>,
    /// Refuse webhooks without authentication (and disable existing ones).
    pub require_auth: bool,
    /// The daemon's base URL, for the `url` of each webhook.
    pub base_url: Arc<std::sync::RwLock<String>>,
}

impl WebhookService {
    /// Loads stored webhooks into the registry.
    pub fn load(&self) -> Result<(), String> {
        let hooks: Vec<Webhook> = self
            .store
            .webhooks()
            .map_err(|e| e.to_string())?
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect();
        self.registry
            .replace_all(hooks.into_iter().map(|h| self.effective(h)));
        Ok(())
    }

    /// With `require_auth`, a webhook without authentication is served as disabled.
    fn effective(&self, mut hook: Webhook) -> Webhook {
        if self.require_auth && hook.auth.is_none() {
            hook.enabled = false;
        }
        hook
    }

    fn all(&self) -> Vec<Webhook> {
        self.store
            .webhooks()
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| serde_json::from_value(v).ok())
            .collect()
    }

    fn find(&self, key: &str) -> Option<Webhook> {
        let id = Uuid::parse_str(key).ok();
        self.all()
            .into_iter()
            .find(|h| Some(h.id) == id || h.name == key)
    }

    fn save(&self, hook: &Webhook) -> Result<(), String> {
        let value = serde_json::to_value(hook).map_err(|e| e.to_string())?;
        self.store
            .put_webhook(hook.id, &value)
            .map_err(|e| e.to_string())?;
        self.registry.upsert(self.effective(hook.clone()));
        Ok(())
    }

    /// The public view: URL, no secrets.
    pub fn view(&self, hook: &Webhook) -> Value {
        let base = self.base_url.read().map(|b| b.clone()).unwrap_or_default();
        let auth = match &hook.auth {
            None => json!(null),
            Some(WebhookAuth::ApiKey { key_hashes }) => {
                json!({"type": "api_key", "keys": key_hashes.len()})
            }
            Some(WebhookAuth::Hmac {
                preset, secrets, ..
            }) => json!({"type": "hmac", "preset": preset, "secrets": secrets.len()}),
        };
        json!({
            "id": hook.id,
            "name": hook.name,
            "description": hook.description,
            "template": hook.template,
            "enabled": hook.enabled,
            "effective_enabled": self.effective(hook.clone()).enabled,
            "slug": hook.slug,
            "url": format!("{base}/hooks/{}", hook.slug),
            "auth": auth,
            "rate_limit": hook.rate_limit,
            "created": spur_core::time::format_timestamp(hook.created),
            "last_failure": self.registry.last_failure(hook.id),
        })
    }

    /// Builds the auth of a create/update request; returns it and an API key to show once.
    fn auth_from(
        &self,
        spec: Option<&Value>,
    ) -> Result<(Option<WebhookAuth>, Option<String>), String> {
        let Some(spec) = spec.filter(|s| !s.is_null()) else {
            if self.require_auth {
                return Err("webhooks must authenticate requests here (auth is required)".into());
            }
            return Ok((None, None));
        };
        let kind = spec.get("type").and_then(Value::as_str).unwrap_or("");
        match kind {
            "api_key" => {
                let key = match spec.get("key").and_then(Value::as_str) {
                    Some(k) if k.len() >= 16 => k.to_owned(),
                    Some(_) => return Err("auth.key: at least 16 characters".into()),
                    None => format!("spur_{}", new_slug()),
                };
                Ok((
                    Some(WebhookAuth::ApiKey {
                        key_hashes: vec![hash_key(&key)],
                    }),
                    Some(key),
                ))
            }
            "hmac" => {
                let preset: HmacPreset =
                    serde_json::from_value(spec.get("preset").cloned().unwrap_or(Value::Null))
                        .map_err(|_| {
                            "auth.preset: github, stripe, standard or generic".to_owned()
                        })?;
                let mut plain: Vec<String> = spec
                    .get("secrets")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|s| s.as_str().map(str::to_owned))
                            .collect()
                    })
                    .unwrap_or_default();
                if let Some(Value::Array(vars)) = spec.get("secrets_env") {
                    for var in vars.iter().filter_map(Value::as_str) {
                        plain.push(
                            std::env::var(var)
                                .map_err(|_| format!("auth.secrets_env: {var} is not set"))?,
                        );
                    }
                }
                if plain.is_empty() || plain.len() > 2 {
                    return Err("auth.secrets: one or two secrets (two while rotating)".into());
                }
                // The generic preset's optional text settings.
                let text = |field: &str| spec.get(field).and_then(Value::as_str).map(str::to_owned);
                Ok((
                    Some(WebhookAuth::Hmac {
                        preset,
                        secrets: plain.iter().map(|s| self.secrets.seal(s)).collect(),
                        tolerance_secs: spec
                            .get("tolerance_secs")
                            .and_then(Value::as_i64)
                            .unwrap_or(300),
                        header: text("header"),
                        algorithm: text("algorithm"),
                        encoding: text("encoding"),
                        prefix: text("prefix"),
                    }),
                    None,
                ))
            }
            other => Err(format!("auth.type: api_key or hmac, got {other:?}")),
        }
    }

    /// Creates a webhook from an API/YAML spec. Returns the view (plus an API key, once).
    pub fn create(&self, spec: &Value) -> Result<Value, String> {
        let name = spec
            .get("name")
            .and_then(Value::as_str)
            .filter(|n| !n.trim().is_empty())
            .ok_or("name: is required")?;
        if self.find(name).is_some() {
            return Err(format!("a webhook named {name:?} exists"));
        }
        let template = spec
            .get("template")
            .and_then(Value::as_str)
            .ok_or("template: is required")?;
        self.templates
            .validate(template)
            .map_err(|e| format!("template: {e}"))?;
        let (auth, key) = self.auth_from(spec.get("auth"))?;
        let hook = Webhook {
            id: Uuid::now_v7(),
            name: name.to_owned(),
            description: spec
                .get("description")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned(),
            template: template.to_owned(),
            enabled: true,
            slug: new_slug(),
            auth,
            rate_limit: spec
                .get("rate_limit")
                .and_then(Value::as_u64)
                .map_or(100, |r| r.clamp(1, 100_000) as u32),
            created: Utc::now(),
        };
        self.save(&hook)?;
        let mut view = self.view(&hook);
        if let Some(k) = key {
            view["api_key"] = json!(k);
        }
        Ok(view)
    }

    /// Applies YAML-declared webhooks: new names are created (slug generated once), existing
    /// ones get the declared template/description/auth and keep their slug.
    pub fn sync_declared(&self, declared: &[Value]) -> Vec<String> {
        let mut errors = Vec::new();
        for spec in declared {
            let name = spec.get("name").and_then(Value::as_str).unwrap_or("");
            let result = match self.find(name) {
                None => self.create(spec).map(|_| ()),
                Some(mut hook) => (|| {
                    let template = spec
                        .get("template")
                        .and_then(Value::as_str)
                        .ok_or("template: is required")?;
                    self.templates
                        .validate(template)
                        .map_err(|e| format!("template: {e}"))?;
                    hook.template = template.to_owned();
                    hook.description = spec
                        .get("description")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_owned();
                    if spec.get("auth").is_some()
                        && spec
                            .get("auth")
                            .and_then(|a| a.get("type"))
                            .and_then(Value::as_str)
                            == Some("hmac")
                    {
                        hook.auth = self.auth_from(spec.get("auth"))?.0;
                    }
                    self.save(&hook)
                })(),
            };
            if let Err(e) = result {
                errors.push(format!("webhook {name:?}: {e}"));
            }
        }
        errors
    }
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, axum::Json(json!({"detail": detail.into()}))).into_response()
}

/// The webhook management routes.
pub fn routes(service: WebhookService) -> Router {
    Router::new()
        .route("/api/webhooks", get(list).post(create))
        .route("/api/webhooks/{id}", get(one).delete(delete))
        .route("/api/webhooks/{id}/toggle", post(toggle))
        .route("/api/webhooks/{id}/rotate", post(rotate))
        .with_state(service)
}

async fn list(State(s): State<WebhookService>) -> Response {
    let hooks: Vec<Value> = s.all().iter().map(|h| s.view(h)).collect();
    axum::Json(json!({"webhooks": hooks})).into_response()
}

async fn create(State(s): State<WebhookService>, body: Option<axum::Json<Value>>) -> Response {
    let spec = body.map(|b| b.0).unwrap_or(Value::Null);
    match s.create(&spec) {
        Ok(view) => (StatusCode::CREATED, axum::Json(view)).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

async fn one(State(s): State<WebhookService>, Path(id): Path<String>) -> Response {
    match s.find(&id) {
        Some(h) => axum::Json(s.view(&h)).into_response(),
        None => error(StatusCode::NOT_FOUND, "Webhook not found"),
    }
}

async fn toggle(State(s): State<WebhookService>, Path(id): Path<String>) -> Response {
    let Some(mut hook) = s.find(&id) else {
        return error(StatusCode::NOT_FOUND, "Webhook not found");
    };
    hook.enabled = !hook.enabled;
    match s.save(&hook) {
        Ok(()) => axum::Json(s.view(&hook)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

/// A new slug (the old URL stops working); an API key webhook also gets a new key, the old
/// one staying valid as the second key until the next rotation.
async fn rotate(State(s): State<WebhookService>, Path(id): Path<String>) -> Response {
    let Some(mut hook) = s.find(&id) else {
        return error(StatusCode::NOT_FOUND, "Webhook not found");
    };
    hook.slug = new_slug();
    let mut new_key = None;
    if let Some(WebhookAuth::ApiKey { key_hashes }) = &mut hook.auth {
        let key = format!("spur_{}", new_slug());
        key_hashes.insert(0, hash_key(&key));
        key_hashes.truncate(2);
        new_key = Some(key);
    }
    match s.save(&hook) {
        Ok(()) => {
            let mut view = s.view(&hook);
            if let Some(k) = new_key {
                view["api_key"] = json!(k);
            }
            axum::Json(view).into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e),
    }
}

async fn delete(State(s): State<WebhookService>, Path(id): Path<String>) -> Response {
    let Some(hook) = s.find(&id) else {
        return error(StatusCode::NOT_FOUND, "Webhook not found");
    };
    match s.store.delete_webhook(hook.id) {
        Ok(_) => {
            s.registry.remove(hook.id);
            StatusCode::NO_CONTENT.into_response()
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}
