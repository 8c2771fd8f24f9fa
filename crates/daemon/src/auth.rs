//! The auth layer: one middleware in front of every route (see docs/security.md).
//!
//! * **When it is on:** as soon as any credential exists — the auth string
//!   (`--auth-string`, Prefect's `PREFECT_SERVER_API_AUTH_STRING`), an API key (`--api-key`,
//!   what Prefect clients send from `PREFECT_API_KEY`), or a scoped token in the store.
//!   Without any, every route is open (and binding beyond loopback is warned about).
//! * **Credentials:** `Authorization: Basic base64(user:pass)` equal to the auth string
//!   (Prefect's clients send `PREFECT_API_AUTH_STRING` that way, and browsers after the
//!   Basic prompt); `Authorization: Bearer <secret>` with the API key, the auth string, or a
//!   token's secret (tokens are stored as SHA-256 hashes, like webhook API keys; a Basic
//!   password that is a token's secret counts too). The auth string and the API key are
//!   `admin`.
//! * **Scopes** ([`Scope`]): what each route needs is listed in [`crate::api::ROUTES`]; a
//!   route or method missing from the list needs `admin`.
//! * **Open routes:** `/healthz`, `/favicon.ico`, `/hooks/{slug}` (webhooks have their own
//!   authentication), `/metrics` when `metrics_open`.
//! * **Websockets:** an upgrade that offers Prefect's `prefect` subprotocol and carries no
//!   `Authorization` header is let through to the in-band `auth` message, which is checked
//!   against the same credentials ([`Auth::in_band`]); one whose header was accepted is
//!   marked [`PreAuthorized`] and its in-band token is not checked again.
//! * **Browser safety:** a state-changing request (any method but GET/HEAD/OPTIONS) or a
//!   websocket upgrade whose `Origin` is not the daemon's own (`Host`), or that says
//!   `Sec-Fetch-Site: cross-site`, is refused with 403, auth on or off. Requests without an
//!   `Origin` (non-browser clients) pass. `/hooks/*` is exempt. No CORS headers are sent.
//! * **Refusals:** 401 with `WWW-Authenticate: Basic realm="spur"` and `{"detail": …}`
//!   (missing or wrong credentials; one message for both), 403 for a scope that does not
//!   cover the route. Secrets are compared in constant time (tokens by their hashes). Each
//!   refusal is counted in `spur_api_auth_refused_total{reason}`.

use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{Path, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use base64::Engine as _;
use serde_json::{Value, json};
use spur_ingest::http::{InBandAuth, PreAuthorized, constant_time_eq, offers_prefect_protocol};
use spur_ingest::webhook::auth::hash_key;
use spur_store::{Store, TokenRecord};
use thiserror::Error;
use tracing::{debug, warn};

use crate::metrics::Metrics;

/// What a route needs, and what a credential grants.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// No credential needed, even with auth on.
    Open,
    /// Any valid credential (version and health probes a publisher's client makes).
    Any,
    /// Sending events: `POST /api/events`, the `/api/events/in` websocket.
    EventsWrite,
    /// Reading: events, automations, runs, firings, the UI, metrics.
    EventsRead,
    /// Everything, including webhooks, tokens, pausing, retries, starting runs.
    Admin,
}

impl Scope {
    /// The scope's name in tokens and the CLI (`events:write`, `events:read`, `admin`).
    pub fn name(self) -> &'static str {
        match self {
            Scope::Open => "open",
            Scope::Any => "any",
            Scope::EventsWrite => "events:write",
            Scope::EventsRead => "events:read",
            Scope::Admin => "admin",
        }
    }

    /// A token scope by name.
    pub fn parse_token_scope(name: &str) -> Option<Scope> {
        match name {
            "events:write" => Some(Scope::EventsWrite),
            "events:read" => Some(Scope::EventsRead),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// Does a credential granting `self` cover a route needing `needed`?
    pub fn covers(self, needed: Scope) -> bool {
        match needed {
            Scope::Open | Scope::Any => true,
            Scope::Admin => self == Scope::Admin,
            wanted => self == wanted || self == Scope::Admin,
        }
    }
}

/// Why a token could not be created or revoked.
#[derive(Debug, Error)]
pub enum TokenError {
    /// Bad name or scope.
    #[error("{0}")]
    Invalid(String),
    /// A token already has this name.
    #[error("a token named {0:?} exists already")]
    Exists(String),
    /// The store failed.
    #[error("{0}")]
    Store(#[from] spur_store::StoreError),
}

#[derive(Clone, Debug)]
struct KnownToken {
    scope: Scope,
    hash: String,
}

/// The daemon's credentials and the auth layer's settings.
#[derive(Debug)]
pub struct Auth {
    auth_string: Option<String>,
    api_key: Option<String>,
    metrics_open: bool,
    tokens: RwLock<Vec<KnownToken>>,
    /// A secret made at start and never stored, given to the runs the daemon launches
    /// (`SPUR_API_TOKEN`), scope `events:write`: their `spur emit` calls need a credential
    /// once auth is on, and no other credential should reach a run's environment.
    run_token: String,
    store: Arc<Store>,
    metrics: Arc<Metrics>,
}

/// A websocket route, whose upgrade may authenticate in-band.
const WEBSOCKETS: [&str; 2] = ["/api/events/in", "/api/events/out"];

impl Auth {
    /// Credentials from the settings plus the tokens in the store.
    pub fn new(
        auth_string: Option<String>,
        api_key: Option<String>,
        metrics_open: bool,
        store: Arc<Store>,
        metrics: Arc<Metrics>,
    ) -> Result<Auth, spur_store::StoreError> {
        let auth = Auth {
            auth_string: auth_string.filter(|s| !s.is_empty()),
            api_key: api_key.filter(|s| !s.is_empty()),
            metrics_open,
            tokens: RwLock::default(),
            run_token: format!(
                "spur_run_{}{}",
                uuid::Uuid::new_v4().simple(),
                uuid::Uuid::new_v4().simple()
            ),
            store,
            metrics,
        };
        auth.reload_tokens()?;
        Ok(auth)
    }

    fn reload_tokens(&self) -> Result<(), spur_store::StoreError> {
        let known = self
            .store
            .tokens()?
            .into_iter()
            .filter_map(|t| {
                Some(KnownToken {
                    scope: Scope::parse_token_scope(&t.scope)?,
                    hash: t.hash,
                })
            })
            .collect();
        if let Ok(mut tokens) = self.tokens.write() {
            *tokens = known;
        }
        Ok(())
    }

    /// The credential for the daemon's own runs (scope `events:write`, this process only).
    pub fn run_token(&self) -> &str {
        &self.run_token
    }

    /// Is any credential configured (then every route but the open ones needs one)?
    pub fn enabled(&self) -> bool {
        self.auth_string.is_some()
            || self.api_key.is_some()
            || self.tokens.read().map(|t| !t.is_empty()).unwrap_or(true)
    }

    /// The scope a secret grants, if it is one: the auth string or the API key (`admin`), or
    /// a token's secret. Every known secret is compared, in constant time.
    pub fn secret_scope(&self, secret: &str) -> Option<Scope> {
        let mut found = None;
        for s in [&self.auth_string, &self.api_key].into_iter().flatten() {
            if constant_time_eq(secret.as_bytes(), s.as_bytes()) {
                found = Some(Scope::Admin);
            }
        }
        if found.is_none() && constant_time_eq(secret.as_bytes(), self.run_token.as_bytes()) {
            found = Some(Scope::EventsWrite);
        }
        let hashed = hash_key(secret);
        if let Ok(tokens) = self.tokens.read() {
            for t in tokens.iter() {
                if constant_time_eq(t.hash.as_bytes(), hashed.as_bytes()) && found.is_none() {
                    found = Some(t.scope);
                }
            }
        }
        found
    }

    /// The scope an `Authorization` header grants; `None` for anything else (malformed,
    /// unknown scheme, wrong secret).
    pub fn header_scope(&self, value: &HeaderValue) -> Option<Scope> {
        let text = value.to_str().ok()?.trim();
        let (scheme, rest) = text.split_once(' ')?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("bearer") {
            return self.secret_scope(rest);
        }
        if !scheme.eq_ignore_ascii_case("basic") {
            return None;
        }
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        if let Some(expected) = &self.auth_string
            && constant_time_eq(decoded.as_bytes(), expected.as_bytes())
        {
            return Some(Scope::Admin);
        }
        // A token (or the API key) as the password; the user name is free.
        let password = decoded.split_once(':').map_or(decoded.as_str(), |(_, p)| p);
        self.secret_scope(password)
    }

    /// The check for a websocket's in-band `auth` token on a route needing `needed`: passes
    /// when auth is off, else when the token grants a scope covering `needed`.
    pub fn in_band(self: &Arc<Self>, needed: Scope) -> InBandAuth {
        let auth = self.clone();
        InBandAuth(Arc::new(move |token: Option<&str>| {
            if !auth.enabled() {
                return true;
            }
            let granted = token.and_then(|t| auth.secret_scope(t));
            if granted.is_none_or(|g| !g.covers(needed)) {
                auth.refused(if token.is_some() { 1 } else { 0 });
                return false;
            }
            true
        }))
    }

    fn refused(&self, reason: usize) {
        self.metrics.api_auth_refused[reason].fetch_add(1, Ordering::Relaxed);
    }

    /// Creates a token; returns its secret (shown once, never stored).
    pub fn create_token(&self, name: &str, scope: &str) -> Result<String, TokenError> {
        let valid_name = !name.is_empty()
            && name.len() <= 100
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
        if !valid_name {
            return Err(TokenError::Invalid(
                "a token name is 1 to 100 letters, digits, '-', '_' or '.'".into(),
            ));
        }
        let Some(parsed) = Scope::parse_token_scope(scope) else {
            return Err(TokenError::Invalid(format!(
                "unknown scope {scope:?} (events:write, events:read or admin)"
            )));
        };
        if !self.enabled() && parsed != Scope::Admin {
            return Err(TokenError::Invalid(
                "no admin credential exists yet: the first token turns auth on, so it must be an admin token (or start the daemon with --auth-string)".into(),
            ));
        }
        let mut bytes = Vec::with_capacity(32);
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        bytes.extend_from_slice(uuid::Uuid::new_v4().as_bytes());
        let secret = format!(
            "spur_{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
        );
        let record = TokenRecord {
            name: name.to_owned(),
            scope: parsed.name().to_owned(),
            hash: hash_key(&secret),
            created: spur_core::time::format_timestamp(chrono::Utc::now()),
        };
        if !self.store.create_token(&record)? {
            return Err(TokenError::Exists(name.to_owned()));
        }
        self.reload_tokens()?;
        Ok(secret)
    }

    /// Revokes a token by name; false if there was none.
    pub fn revoke_token(&self, name: &str) -> Result<bool, TokenError> {
        let existed = self.store.revoke_token(name)?;
        self.reload_tokens()?;
        Ok(existed)
    }

    /// What `/healthz` and the start-up log say about exposure: a warning when the daemon
    /// listens beyond loopback with no credential.
    pub fn exposure_warning(&self, addr: std::net::SocketAddr) -> Option<String> {
        (!addr.ip().is_loopback() && !self.enabled()).then(|| {
            format!(
                "listening on {addr} (beyond loopback) with no authentication: anyone who can reach it can send events, read everything and manage webhooks; set --auth-string or create an admin token (--require-auth refuses to start this way)"
            )
        })
    }
}

/// A refusal: status, `{"detail": …}`, and the Basic challenge on 401.
fn refuse(status: StatusCode, detail: &str) -> Response {
    let mut response = (status, axum::Json(json!({"detail": detail}))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"spur\""),
        );
    }
    response
}

/// Is a request from a browser page of another site? (`Origin` other than `Host`, or
/// `Sec-Fetch-Site: cross-site`.) Requests without either header are not browsers'.
fn cross_site(headers: &HeaderMap) -> bool {
    if headers
        .get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"cross-site"))
    {
        return true;
    }
    let Some(origin) = headers.get(header::ORIGIN) else {
        return false;
    };
    let Ok(origin) = origin.to_str() else {
        return true;
    };
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return true;
    };
    let authority = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"));
    authority.is_none_or(|a| !a.eq_ignore_ascii_case(host))
}

/// How many `{param}` segments `route` has when it matches `path` (segment by segment, a
/// parameter matching any one non-empty segment), or `None`.
fn route_match(route: &str, path: &str) -> Option<usize> {
    let mut params = 0;
    let mut r = route.split('/');
    let mut p = path.split('/');
    loop {
        match (r.next(), p.next()) {
            (None, None) => return Some(params),
            (Some(a), Some(b)) if a.starts_with('{') && a.ends_with('}') && !b.is_empty() => {
                params += 1
            }
            (Some(a), Some(b)) if a == b => {}
            _ => return None,
        }
    }
}

/// The route of [`crate::api::ROUTES`] a request path falls on (literal segments preferred
/// over parameters, as the router does), if any.
pub fn route_of(path: &str) -> Option<&'static str> {
    crate::api::ROUTES
        .iter()
        .filter_map(|(_, r, _)| route_match(r, path).map(|n| (n, *r)))
        .min_by_key(|(n, _)| *n)
        .map(|(_, r)| r)
}

/// What a request needs, from [`crate::api::ROUTES`]: a listed path with an unlisted method
/// needs `admin`; an unknown path (404 anyway) any credential.
pub fn needed_scope(method: &Method, path: &str) -> Scope {
    let Some(route) = route_of(path) else {
        return Scope::Any;
    };
    let method = if method == Method::HEAD && !route.starts_with("/hooks/") {
        "GET"
    } else {
        method.as_str()
    };
    crate::api::ROUTES
        .iter()
        .find(|(m, p, _)| *p == route && *m == method)
        .map_or(Scope::Admin, |(_, _, s)| *s)
}

/// The middleware (`axum::middleware::from_fn_with_state`), applied to the whole router.
pub async fn layer(State(auth): State<Arc<Auth>>, mut request: Request, next: Next) -> Response {
    let path = route_of(request.uri().path());
    let method = request.method().clone();
    let headers = request.headers();
    let is_hook = path.is_some_and(|p| p.starts_with("/hooks/"));
    let upgrade = headers.contains_key(header::UPGRADE);
    let changes_state = !matches!(method, Method::GET | Method::HEAD | Method::OPTIONS);
    if !is_hook && (changes_state || upgrade) && cross_site(headers) {
        auth.refused(3);
        debug!(?path, %method, "cross-site request refused");
        return refuse(
            StatusCode::FORBIDDEN,
            "cross-site requests are not accepted",
        );
    }
    let needed = needed_scope(&method, request.uri().path());
    let open = needed == Scope::Open || (path == Some("/metrics") && auth.metrics_open);
    if open || !auth.enabled() {
        return next.run(request).await;
    }
    match headers.get(header::AUTHORIZATION) {
        Some(value) => match auth.header_scope(value) {
            Some(granted) if granted.covers(needed) => {
                request.extensions_mut().insert(PreAuthorized);
                next.run(request).await
            }
            Some(granted) => {
                auth.refused(2);
                refuse(
                    StatusCode::FORBIDDEN,
                    &format!(
                        "this credential's scope ({}) does not allow this; it needs {}",
                        granted.name(),
                        needed.name()
                    ),
                )
            }
            None => {
                auth.refused(1);
                refuse(StatusCode::UNAUTHORIZED, "authentication required")
            }
        },
        None if path.is_some_and(|p| WEBSOCKETS.contains(&p))
            && offers_prefect_protocol(headers) =>
        {
            // Prefect's handshake: the `auth` message decides (see `Auth::in_band`).
            next.run(request).await
        }
        None => {
            auth.refused(0);
            refuse(StatusCode::UNAUTHORIZED, "authentication required")
        }
    }
}

/// The token management routes (all `admin`): `GET /api/tokens`, `POST /api/tokens`
/// (`{"name", "scope"}` → the secret, once), `DELETE /api/tokens/{name}`.
pub fn routes(auth: Arc<Auth>) -> Router {
    Router::new()
        .route("/api/tokens", get(list_tokens).post(create_token))
        .route("/api/tokens/{name}", delete(revoke_token))
        .with_state(auth)
}

async fn list_tokens(State(auth): State<Arc<Auth>>) -> Response {
    match auth.store.tokens() {
        Ok(tokens) => axum::Json(
            tokens
                .iter()
                .map(|t| json!({"name": t.name, "scope": t.scope, "created": t.created}))
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn create_token(State(auth): State<Arc<Auth>>, body: Option<axum::Json<Value>>) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    let name = body.get("name").and_then(Value::as_str).unwrap_or("");
    let scope = body.get("scope").and_then(Value::as_str).unwrap_or("");
    match auth.create_token(name, scope) {
        Ok(secret) => {
            warn!(token = name, scope, "API token created");
            (
                StatusCode::CREATED,
                axum::Json(json!({"name": name, "scope": scope, "token": secret})),
            )
                .into_response()
        }
        Err(e @ TokenError::Exists(_)) => refuse(StatusCode::CONFLICT, &e.to_string()),
        Err(e @ TokenError::Invalid(_)) => refuse(StatusCode::BAD_REQUEST, &e.to_string()),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

async fn revoke_token(State(auth): State<Arc<Auth>>, Path(name): Path<String>) -> Response {
    match auth.revoke_token(&name) {
        Ok(true) => {
            warn!(token = name, "API token revoked");
            StatusCode::NO_CONTENT.into_response()
        }
        Ok(false) => refuse(StatusCode::NOT_FOUND, &format!("no token named {name:?}")),
        Err(e) => refuse(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Durable webhook replay memory: the store's `webhook_replay` table.
#[derive(Debug)]
pub struct StoreReplay(pub Arc<Store>);

impl spur_ingest::webhook::ReplayMemory for StoreReplay {
    fn first_time(&self, key: &str, now: i64, expires: i64) -> bool {
        match self.0.remember_once(key, now, expires) {
            Ok(first) => first,
            Err(e) => {
                warn!(error = %e, "cannot record a webhook message id: refusing the request");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_fall_on_their_routes() {
        assert_eq!(
            route_of("/api/automations/filter"),
            Some("/api/automations/filter")
        );
        assert_eq!(
            route_of("/api/automations/abc"),
            Some("/api/automations/{id}")
        );
        assert_eq!(route_of("/api/automations/"), Some("/api/automations/"));
        assert_eq!(route_of("/hooks/xyz"), Some("/hooks/{slug}"));
        assert_eq!(route_of("/nope"), None);
        assert_eq!(
            needed_scope(&Method::POST, "/api/events"),
            Scope::EventsWrite
        );
        assert_eq!(needed_scope(&Method::HEAD, "/"), Scope::EventsRead);
        assert_eq!(
            needed_scope(&Method::PATCH, "/api/automations/x"),
            Scope::Admin
        );
        assert_eq!(needed_scope(&Method::POST, "/api/firings"), Scope::Admin);
        assert!(Scope::Admin.covers(Scope::EventsWrite));
        assert!(!Scope::EventsRead.covers(Scope::EventsWrite));
        assert!(!Scope::EventsWrite.covers(Scope::EventsRead));
        assert!(Scope::EventsWrite.covers(Scope::Any));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:4200"));
        assert!(!cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:4200"),
        );
        assert!(!cross_site(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(cross_site(&h));
        h.insert(header::ORIGIN, HeaderValue::from_static("null"));
        assert!(cross_site(&h));
        h.remove(header::ORIGIN);
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(cross_site(&h));
    }

    /// Every `.route(…)` the code declares, with its methods, is in `ROUTES`, and every entry
    /// of `ROUTES` is declared: a new route without a listed scope fails here.
    #[test]
    fn routes_list_matches_the_router() {
        let sources = [
            include_str!("api.rs"),
            include_str!("webhooks.rs"),
            include_str!("auth.rs"),
            include_str!("../../ingest/src/http.rs"),
            include_str!("../../ingest/src/webhook/mod.rs"),
        ];
        let marker = concat!(".rou", "te(");
        let mut declared = std::collections::BTreeSet::new();
        for source in sources {
            for (at, _) in source.match_indices(marker) {
                let rest = &source[at + marker.len()..];
                let Some(start) = rest.find('"') else {
                    continue;
                };
                let Some(len) = rest[start + 1..].find('"') else {
                    continue;
                };
                let path = &rest[start + 1..start + 1 + len];
                let tail = &rest[start + 1 + len..];
                let end = [marker, ".with_state", ".layer"]
                    .iter()
                    .filter_map(|m| tail.find(m))
                    .min()
                    .unwrap_or(tail.len());
                let handlers = &tail[..end];
                for (word, methods) in [
                    ("get(", &["GET"][..]),
                    ("post(", &["POST"]),
                    ("patch(", &["PATCH"]),
                    ("put(", &["PUT"]),
                    ("delete(", &["DELETE"]),
                    ("any(", &["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]),
                ] {
                    let found = handlers.match_indices(word).any(|(i, _)| {
                        !handlers[..i].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
                    });
                    if found {
                        for m in methods {
                            declared.insert((m.to_string(), path.to_owned()));
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<(String, String)> = crate::api::ROUTES
            .iter()
            .map(|(m, p, _)| (m.to_string(), p.to_string()))
            .collect();
        let unlisted: Vec<_> = declared.difference(&listed).collect();
        let undeclared: Vec<_> = listed.difference(&declared).collect();
        assert!(
            unlisted.is_empty(),
            "routes missing from api::ROUTES: {unlisted:?}"
        );
        assert!(
            undeclared.is_empty(),
            "api::ROUTES entries no route declares: {undeclared:?}"
        );
    }
}
