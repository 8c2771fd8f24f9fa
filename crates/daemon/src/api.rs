//! The daemon's read API and operations endpoints.
//!
//! * `POST /api/events/filter` (+ `GET /api/events/filter/next?page-token=`) — Prefect's
//!   event query shape, by `occurred` (newest first unless `order` is `ASC`), pages of at most 50.
//! * `GET /api/events/out` — websocket live feed: send `{"type": "filter", "filter": …,
//!   "backfill": true}`, receive the last 15 minutes that match, then every new match.
//! * `GET /api/automations` — loaded automations with their live trigger state and any
//!   load errors; `POST /api/automations/filter` and `GET /api/automations/{id}` — the same
//!   automations in Prefect's schema, for Prefect's client; `PATCH /api/automations/{id}`
//!   (`{"enabled": …}`, how Prefect's client pauses and resumes; also `POST …/pause` and
//!   `…/resume`); creating, replacing or deleting one is refused (409: files define them);
//!   `GET /api/automations/related-to/{resource}` — those owned by it or launching it (a
//!   deployment); `GET /api/firings` — recent firings.
//! * For the web UI's pages (read-only): `GET /api/automations/{id or name}/detail` (live
//!   state, source file and line, recent firings and runs), `GET /api/runs/{id}/lineage`
//!   (the firing and event that launched a run, the runs it set off), `POST
//!   /api/events/histogram` (event volume per time slice of a filter's range, by name).
//! * `GET /healthz`, `GET /api/health`, `GET /metrics` (Prometheus text).
//! * `GET /` — the web UI (event feed, event detail with explanations, automations, runs).

use std::collections::HashSet;
use std::sync::{Arc, RwLock};

use crate::actions::Executor;
use axum::Router;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use chrono::{TimeDelta, Utc};
use serde::Deserialize;
use serde_json::{Value, json};
use spur_action::RunState;
use spur_core::Event;
use spur_core::glob::LabelPattern;
use spur_core::time::{format_timestamp, parse_timestamp};
use spur_core::trigger::ResourceSpecification;
use spur_store::{
    AnyResourceFilter, EventOrder, EventQuery, PagePosition, RelatedFilter, Store, TextQuery,
};
use tokio::sync::{broadcast, mpsc, oneshot};

use spur_ingest::http::{ReadError, close, next_text_within, offers_prefect_protocol, too_big};

use crate::auth::Scope;
use crate::metrics::Metrics;
use crate::pipeline::Control;
use crate::reload::LoadStatus;

/// Shared state of the read API.
#[derive(Clone, Debug)]
pub struct ApiState {
    /// The store (MVCC reads run beside the pipeline's writes).
    pub store: Arc<Store>,
    /// To ask the pipeline for live state.
    pub control: mpsc::Sender<Control>,
    /// Current automation load errors.
    pub status: Arc<RwLock<LoadStatus>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Live events, for `/api/events/out`.
    pub live: broadcast::Sender<Arc<Event>>,
    /// The daemon's credentials (the auth layer, `/api/events/out`'s in-band check, the
    /// exposure warning of `/healthz`).
    pub auth: Arc<crate::auth::Auth>,
    /// The address the daemon listens on, once bound.
    pub listen: Arc<std::sync::OnceLock<std::net::SocketAddr>>,
    /// How long an `/api/events/out` client has to send its `auth` and `filter` messages.
    pub auth_timeout: std::time::Duration,
    /// Starts and cancels runs.
    pub executor: crate::actions::Executor,
}

/// Every route of the daemon's router (this module's, the ingest routes, webhooks and
/// their management, tokens) with the [`Scope`] the auth layer requires: `(method, route,
/// scope)`. A route or method missing here needs `admin` (and fails the test that compares
/// this list with the routes the code declares).
pub const ROUTES: &[(&str, &str, Scope)] = &[
    ("GET", "/", Scope::EventsRead),
    ("GET", "/favicon.ico", Scope::Open),
    ("GET", "/healthz", Scope::Open),
    ("GET", "/api/health", Scope::Any),
    ("GET", "/api/ready", Scope::Any),
    ("GET", "/api/admin/version", Scope::Any),
    ("GET", "/metrics", Scope::EventsRead),
    ("POST", "/api/events", Scope::EventsWrite),
    ("GET", "/api/events/in", Scope::EventsWrite),
    ("GET", "/api/events/out", Scope::EventsRead),
    ("POST", "/api/events/filter", Scope::EventsRead),
    ("GET", "/api/events/filter/next", Scope::EventsRead),
    ("POST", "/api/events/histogram", Scope::EventsRead),
    ("GET", "/api/events/{id}/explain", Scope::EventsRead),
    ("GET", "/api/automations", Scope::EventsRead),
    ("POST", "/api/automations", Scope::Admin),
    ("POST", "/api/automations/", Scope::Admin),
    ("POST", "/api/automations/filter", Scope::EventsRead),
    (
        "GET",
        "/api/automations/related-to/{resource_id}",
        Scope::EventsRead,
    ),
    (
        "DELETE",
        "/api/automations/owned-by/{resource_id}",
        Scope::Admin,
    ),
    ("GET", "/api/automations/{id}", Scope::EventsRead),
    ("PATCH", "/api/automations/{id}", Scope::Admin),
    ("PUT", "/api/automations/{id}", Scope::Admin),
    ("DELETE", "/api/automations/{id}", Scope::Admin),
    ("POST", "/api/automations/{id}/pause", Scope::Admin),
    ("POST", "/api/automations/{id}/resume", Scope::Admin),
    ("GET", "/api/automations/{id}/detail", Scope::EventsRead),
    ("GET", "/api/firings", Scope::EventsRead),
    ("GET", "/api/runs", Scope::EventsRead),
    ("POST", "/api/runs", Scope::Admin),
    ("GET", "/api/runs/{id}", Scope::EventsRead),
    ("GET", "/api/runs/{id}/lineage", Scope::EventsRead),
    ("POST", "/api/runs/{id}/cancel", Scope::Admin),
    ("POST", "/api/runs/{id}/rerun", Scope::Admin),
    ("GET", "/api/deployments", Scope::EventsRead),
    ("GET", "/api/cluster", Scope::EventsRead),
    ("GET", "/api/actions/failed", Scope::EventsRead),
    ("POST", "/api/actions/failed/{id}/retry", Scope::Admin),
    ("GET", "/api/webhooks", Scope::Admin),
    ("POST", "/api/webhooks", Scope::Admin),
    ("GET", "/api/webhooks/{id}", Scope::Admin),
    ("DELETE", "/api/webhooks/{id}", Scope::Admin),
    ("POST", "/api/webhooks/{id}/toggle", Scope::Admin),
    ("POST", "/api/webhooks/{id}/rotate", Scope::Admin),
    ("GET", "/api/tokens", Scope::Admin),
    ("POST", "/api/tokens", Scope::Admin),
    ("DELETE", "/api/tokens/{name}", Scope::Admin),
    ("GET", "/hooks/{slug}", Scope::Open),
    ("HEAD", "/hooks/{slug}", Scope::Open),
    ("POST", "/hooks/{slug}", Scope::Open),
    ("PUT", "/hooks/{slug}", Scope::Open),
    ("PATCH", "/hooks/{slug}", Scope::Open),
    ("DELETE", "/hooks/{slug}", Scope::Open),
];

/// `/healthz`: `ok`, plus a warning line when the daemon is reachable beyond loopback
/// without authentication.
async fn healthz(State(state): State<ApiState>) -> Response {
    if let Some(prefect) = &state.metrics.prefect {
        let mut text = String::from("ok\n");
        if let Some(warning) = state
            .listen
            .get()
            .and_then(|addr| state.auth.exposure_warning(*addr))
        {
            text.push_str(&format!("warning: {warning}\n"));
        }
        text.push_str(&prefect.detail());
        return text.into_response();
    }
    match state
        .listen
        .get()
        .and_then(|addr| state.auth.exposure_warning(*addr))
    {
        Some(warning) => format!("ok\nwarning: {warning}\n").into_response(),
        None => "ok".into_response(),
    }
}

/// The read and operations routes.
pub fn routes(state: ApiState) -> Router {
    Router::new()
        .route("/", get(ui))
        .route("/favicon.ico", get(favicon))
        .route("/healthz", get(healthz))
        .route("/api/health", get(|| async { axum::Json(true) }))
        .route("/api/ready", get(|| async { axum::Json(true) }))
        .route("/metrics", get(metrics))
        .route("/api/automations", get(automations).post(defined_in_files))
        .route("/api/automations/", post(defined_in_files))
        .route("/api/automations/filter", post(filter_automations))
        .route(
            "/api/automations/related-to/{resource_id}",
            get(related_automations),
        )
        .route(
            "/api/automations/owned-by/{resource_id}",
            axum::routing::delete(defined_in_files),
        )
        .route(
            "/api/automations/{id}",
            get(read_automation)
                .patch(patch_automation)
                .put(defined_in_files)
                .delete(defined_in_files),
        )
        .route("/api/automations/{id}/pause", post(pause_automation))
        .route("/api/automations/{id}/resume", post(resume_automation))
        .route("/api/automations/{id}/detail", get(automation_detail))
        .route("/api/firings", get(firings))
        .route("/api/events/filter", post(filter_events))
        .route("/api/events/filter/next", get(filter_next))
        .route("/api/events/histogram", post(event_histogram))
        .route("/api/events/out", get(events_out))
        .route("/api/events/{id}/explain", get(explain_event))
        .route("/api/runs", get(list_runs).post(start_run))
        .route("/api/runs/{id}", get(get_run))
        .route("/api/runs/{id}/lineage", get(run_lineage))
        .route("/api/runs/{id}/cancel", post(cancel_run))
        .route("/api/runs/{id}/rerun", post(rerun_run))
        .route("/api/deployments", get(list_deployments))
        .route("/api/cluster", get(cluster_status))
        .route("/api/actions/failed", get(failed_actions))
        .route("/api/actions/failed/{id}/retry", post(retry_failed_action))
        .with_state(state)
}

/// `/api/cluster`: the members, who holds which partition, how many automations each
/// member acts on and how far each is behind the stream (`cluster::ClusterStatus`), plus
/// how many firings this member holds parked for others. 404 when not in cluster mode.
async fn cluster_status(State(state): State<ApiState>) -> Response {
    let Some(cluster) = state.executor.cluster().cloned() else {
        return error(
            StatusCode::NOT_FOUND,
            "not in cluster mode (start with --cluster NAME and --nats)",
        );
    };
    let automations = match inspect(&state, |engine| {
        engine
            .automations()
            .iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    })
    .await
    {
        Ok(ids) => ids,
        Err(response) => return response,
    };
    match cluster.status(&automations).await {
        Ok(status) => {
            let mut body = serde_json::to_value(&status).unwrap_or_default();
            body["parked_here"] = json!(state.executor.parked_count());
            axum::Json(body).into_response()
        }
        Err(reason) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot read the cluster bucket: {reason}"),
        ),
    }
}

/// The web UI: one page, compiled into the binary (no CDN, works offline).
async fn ui() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self' ws: wss:",
            ),
        ],
        include_str!("ui/index.html"),
    )
        .into_response()
}

/// Runs a store call on a blocking thread; a store error or a lost task answers 500 with its
/// reason.
async fn from_store<T, E>(
    call: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Response>
where
    T: Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(e)) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

fn error(status: StatusCode, detail: impl Into<String>) -> Response {
    (status, axum::Json(json!({"detail": detail.into()}))).into_response()
}

async fn metrics(State(state): State<ApiState>) -> Response {
    let (waiting, running) = state.executor.concurrency_counts();
    let m = &state.metrics;
    m.concurrency_waiting
        .store(waiting as u64, std::sync::atomic::Ordering::Relaxed);
    m.concurrency_running
        .store(running as u64, std::sync::atomic::Ordering::Relaxed);
    m.acted.store(
        state.executor.acted_count(),
        std::sync::atomic::Ordering::Relaxed,
    );
    m.processes.store(
        state.executor.processes_alive() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    m.parked.store(
        state.executor.parked_count() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

/// Runs `read` on the pipeline's engine (between batches) and returns its answer, or the
/// 503 to answer when the pipeline is not running. `read` does only the work its answer
/// needs: no listing copies every automation's state.
async fn inspect<T: Send + 'static>(
    state: &ApiState,
    read: impl FnOnce(&spur_matcher::Engine) -> T + Send + 'static,
) -> Result<T, Response> {
    let (tx, rx) = oneshot::channel();
    let job = crate::pipeline::Inspect(Box::new(move |engine| {
        let _ = tx.send(read(engine));
    }));
    let answer = match state.control.send(Control::Inspect(job)).await {
        Ok(()) => rx.await.ok(),
        Err(_) => None,
    };
    answer.ok_or_else(|| {
        error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the pipeline is not running",
        )
    })
}

/// One loaded automation, found by id or name, with its live state.
async fn find_automation(
    state: &ApiState,
    wanted: &str,
) -> Result<Option<crate::pipeline::AutomationState>, Response> {
    let wanted = wanted.to_owned();
    inspect(state, move |engine| {
        let id = uuid::Uuid::parse_str(&wanted).ok();
        let found = id
            .and_then(|id| engine.automation(id))
            .or_else(|| engine.automations().iter().find(|a| a.name == wanted))?;
        Some(crate::pipeline::AutomationState {
            automation: found.clone(),
            buckets: engine.buckets_of(found.id),
            next_deadline: engine.next_deadline_of(found.id),
        })
    })
    .await
}

/// The `limit` smallest of `items` by `key`, in order, and whether more were left off.
fn smallest<T, K: Ord>(mut items: Vec<T>, limit: usize, key: impl Fn(&T) -> K) -> (Vec<T>, bool) {
    let more = items.len() > limit;
    if more {
        if limit == 0 {
            return (Vec::new(), true);
        }
        items.select_nth_unstable_by(limit - 1, |a, b| key(a).cmp(&key(b)));
        items.truncate(limit);
    }
    // Not `sort_unstable_by_key`: the keys borrow from the items (names), which a key
    // function cannot return.
    #[allow(clippy::unnecessary_sort_by)]
    items.sort_unstable_by(|a, b| key(a).cmp(&key(b)));
    (items, more)
}

/// An automation as Prefect's API returns it (`prefect.events.schemas.automations.Automation`),
/// so Prefect's client (`read_automations`, `prefect automation ls`) can read Spur's.
/// Spur's own action shorthands get the fields Prefect's schema requires: a `run-deployment`
/// naming its deployment gets that deployment's `deployment_id`; a `send-notification` to a
/// `url` (Spur has no blocks) gets a `block_document_id` derived from the URL, stable but
/// not a block Prefect knows.
fn prefect_automation(automation: &spur_core::Automation, executor: &Executor) -> Value {
    let actions = |list: &[spur_core::Action]| -> Vec<Value> {
        list.iter()
            .map(|action| {
                let mut value = serde_json::to_value(action).unwrap_or(Value::Null);
                let field = |name: &str| action.field(name).filter(|v| !v.is_null());
                match action.action_type.as_str() {
                    "run-deployment"
                        if field("deployment_id").is_none()
                            && field("source").and_then(Value::as_str) != Some("inferred") =>
                    {
                        if let Some(name) = field("deployment").and_then(Value::as_str) {
                            let id = executor
                                .deployments()
                                .iter()
                                .find(|d| d.name == name)
                                .map_or_else(
                                    || spur_core::load::deployment_id_for_name(name),
                                    |d| d.id,
                                );
                            value["deployment_id"] = json!(id);
                        }
                    }
                    "send-notification" if field("block_document_id").is_none() => {
                        if let Some(url) = field("url").and_then(Value::as_str) {
                            value["block_document_id"] = json!(uuid::Uuid::new_v5(
                                &spur_core::SPUR_NAMESPACE,
                                format!("notification-url:{url}").as_bytes()
                            ));
                        }
                    }
                    _ => {}
                }
                value
            })
            .collect()
    };
    json!({
        "id": automation.id,
        "name": automation.name,
        "description": automation.description,
        "enabled": automation.enabled,
        "tags": automation.tags,
        "trigger": automation.trigger,
        "actions": actions(&automation.actions),
        "actions_on_trigger": actions(&automation.actions_on_trigger),
        "actions_on_resolve": actions(&automation.actions_on_resolve),
        "owner_resource": automation.owner_resource,
    })
}

/// Does this automation (in Prefect's schema, see [`prefect_automation`]) relate to
/// `resource`? As Prefect's server records it: its owner, and every deployment a
/// `run-deployment` action names (`prefect.deployment.<id>`).
fn relates_to(automation: &Value, resource: &str) -> bool {
    if automation["owner_resource"].as_str() == Some(resource) {
        return true;
    }
    ["actions", "actions_on_trigger", "actions_on_resolve"]
        .iter()
        .filter_map(|list| automation[*list].as_array())
        .flatten()
        .filter(|action| action["type"] == "run-deployment" && action["source"] != "inferred")
        .filter_map(|action| action["deployment_id"].as_str())
        .any(|id| resource.strip_prefix("prefect.deployment.") == Some(id))
}

/// Prefect's `GET /automations/related-to/{resource_id}` (its client's
/// `read_resource_related_automations`; the UI's deployment page).
async fn related_automations(
    State(state): State<ApiState>,
    axum::extract::Path(resource): axum::extract::Path<String>,
) -> Response {
    // Only the automations that can relate (owned by the resource, or with a
    // `run-deployment` action) are rendered in Prefect's shape.
    let candidates = match inspect(&state, {
        let resource = resource.clone();
        move |engine| {
            engine
                .automations()
                .iter()
                .filter(|a| {
                    a.owner_resource.as_deref() == Some(resource.as_str())
                        || [&a.actions, &a.actions_on_trigger, &a.actions_on_resolve]
                            .iter()
                            .any(|list| list.iter().any(|x| x.action_type == "run-deployment"))
                })
                .cloned()
                .collect::<Vec<_>>()
        }
    })
    .await
    {
        Ok(candidates) => candidates,
        Err(unavailable) => return unavailable,
    };
    let related: Vec<Value> = candidates
        .iter()
        .map(|a| prefect_automation(a, &state.executor))
        .filter(|a| relates_to(a, &resource))
        .collect();
    axum::Json(Value::Array(related)).into_response()
}

/// Prefect's default and largest page (`PREFECT_SERVER_API_DEFAULT_LIMIT`).
const PREFECT_LIMIT: u64 = 200;

/// Prefect's `AutomationFilter` (3.8.8): `id.any_`, `name.any_`, `tags.all_` / `any_` /
/// `is_null_`, each combined by its `operator` (`and_`, the default, or `or_`). `created`
/// is accepted and ignored (Spur's automations have no creation time).
struct PrefectFilter {
    ids: Option<Vec<uuid::Uuid>>,
    names: Option<Vec<String>>,
    tags: Option<TagFilter>,
    or: bool,
}

/// Prefect's `AutomationFilterTags`: every one of `all`, any of `any`, or (`is_null`) none
/// at all, combined by `or` (`or_`) or all together (`and_`).
struct TagFilter {
    or: bool,
    all: Option<Vec<String>>,
    any: Option<Vec<String>>,
    is_null: Option<bool>,
}

impl PrefectFilter {
    fn parse(filter: &Value) -> Result<PrefectFilter, String> {
        let strings = |v: Option<&Value>, field: &str| -> Result<Option<Vec<String>>, String> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Array(items)) => items
                    .iter()
                    .map(|i| {
                        i.as_str()
                            .map(str::to_owned)
                            .ok_or_else(|| format!("{field}: expected a list of strings"))
                    })
                    .collect::<Result<Vec<_>, _>>()
                    .map(Some),
                Some(_) => Err(format!("{field}: expected a list of strings")),
            }
        };
        let operator = |v: &Value, field: &str| -> Result<bool, String> {
            match v.get("operator") {
                None | Some(Value::Null) => Ok(false),
                Some(o) if o == "and_" => Ok(false),
                Some(o) if o == "or_" => Ok(true),
                Some(_) => Err(format!("{field}operator: must be \"and_\" or \"or_\"")),
            }
        };
        let ids = strings(filter.pointer("/id/any_"), "automations.id.any_")?
            .map(|ids| {
                ids.iter()
                    .map(|i| uuid::Uuid::parse_str(i).map_err(|_| format!("{i:?} is not a UUID")))
                    .collect::<Result<Vec<_>, _>>()
            })
            .transpose()?;
        let tags = match filter.get("tags") {
            None | Some(Value::Null) => None,
            Some(t) => Some(TagFilter {
                or: operator(t, "automations.tags.")?,
                all: strings(t.get("all_"), "automations.tags.all_")?,
                any: strings(t.get("any_"), "automations.tags.any_")?,
                is_null: t.get("is_null_").and_then(Value::as_bool),
            }),
        };
        Ok(PrefectFilter {
            ids,
            names: strings(filter.pointer("/name/any_"), "automations.name.any_")?,
            tags,
            or: operator(filter, "automations.")?,
        })
    }

    fn matches(&self, a: &spur_core::Automation) -> bool {
        let mut checks: Vec<bool> = Vec::new();
        if let Some(ids) = &self.ids {
            checks.push(ids.contains(&a.id));
        }
        if let Some(names) = &self.names {
            checks.push(names.contains(&a.name));
        }
        if let Some(TagFilter {
            or,
            all,
            any,
            is_null,
        }) = &self.tags
        {
            let mut tag_checks: Vec<bool> = Vec::new();
            if let Some(all) = all {
                tag_checks.push(all.iter().all(|t| a.tags.contains(t)));
            }
            if let Some(any) = any {
                tag_checks.push(any.iter().any(|t| a.tags.contains(t)));
            }
            if let Some(is_null) = is_null {
                tag_checks.push(a.tags.is_empty() == *is_null);
            }
            if !tag_checks.is_empty() {
                checks.push(if *or {
                    tag_checks.iter().any(|c| *c)
                } else {
                    tag_checks.iter().all(|c| *c)
                });
            }
        }
        if checks.is_empty() {
            return true;
        }
        if self.or {
            checks.iter().any(|c| *c)
        } else {
            checks.iter().all(|c| *c)
        }
    }
}

/// `POST /api/automations/filter`, Prefect's shape: `{"automations": AutomationFilter,
/// "sort", "limit", "offset"}`. As Prefect's server: `limit` defaults to 200 and may not
/// exceed it (422), `sort` is `NAME_ASC` (default) or `NAME_DESC` (`CREATED_DESC` and
/// `UPDATED_DESC` sort by name too: Spur keeps no such times). Only the page is rendered;
/// the selection keeps the `offset + limit` first matches, not all of them.
async fn filter_automations(
    State(state): State<ApiState>,
    body: Option<axum::Json<Value>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    let filter = match PrefectFilter::parse(body.get("automations").unwrap_or(&Value::Null)) {
        Ok(filter) => filter,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let descending = match body.get("sort") {
        None | Some(Value::Null) => false,
        Some(s) if s == "NAME_DESC" => true,
        Some(s) if s == "NAME_ASC" || s == "CREATED_DESC" || s == "UPDATED_DESC" => false,
        Some(s) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("sort: {s} is not one of NAME_ASC, NAME_DESC, CREATED_DESC, UPDATED_DESC"),
            );
        }
    };
    let whole = |field: &str, default: u64| -> Result<u64, String> {
        match body.get(field) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v
                .as_u64()
                .ok_or_else(|| format!("{field}: must be a whole number ≥ 0")),
        }
    };
    let (offset, limit) = match (whole("offset", 0), whole("limit", PREFECT_LIMIT)) {
        (Ok(o), Ok(l)) => (o as usize, l),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    if limit > PREFECT_LIMIT {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("Invalid limit: must be less than or equal to {PREFECT_LIMIT}."),
        );
    }
    let page = match inspect(&state, move |engine| {
        let selected: Vec<&Arc<spur_core::Automation>> = engine
            .automations()
            .iter()
            .filter(|a| filter.matches(a))
            .collect();
        let wanted = offset.saturating_add(limit as usize);
        let (first, _) = if descending {
            smallest(selected, wanted, |a| {
                (std::cmp::Reverse(a.name.as_str()), std::cmp::Reverse(a.id))
            })
        } else {
            smallest(selected, wanted, |a| (a.name.as_str(), a.id))
        };
        first.into_iter().skip(offset).cloned().collect::<Vec<_>>()
    })
    .await
    {
        Ok(page) => page,
        Err(unavailable) => return unavailable,
    };
    let page: Vec<Value> = page
        .iter()
        .map(|a| prefect_automation(a, &state.executor))
        .collect();
    axum::Json(Value::Array(page)).into_response()
}

/// `GET /api/automations/{id}`: one automation in Prefect's shape.
async fn read_automation(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an automation id"),
        );
    };
    match inspect(&state, move |engine| engine.automation(id).cloned()).await {
        Ok(Some(a)) => axum::Json(prefect_automation(&a, &state.executor)).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, format!("no automation {id}")),
        Err(unavailable) => unavailable,
    }
}

/// The default and the largest page of `GET /api/automations`.
const AUTOMATIONS_PAGE: usize = 100;
const AUTOMATIONS_PAGE_MAX: usize = 1_000;

/// `GET /api/automations`'s query: a page (`limit`, and `cursor`: the `next_cursor` of the
/// page before) of the automations matching every filter given, sorted by name.
#[derive(Debug, Default, Deserialize)]
struct AutomationsQuery {
    limit: Option<usize>,
    cursor: Option<String>,
    /// Names starting with this.
    name: Option<String>,
    /// Carrying this tag.
    tag: Option<String>,
    /// `enabled` or `paused` (paused through the API, or disabled in its file).
    state: Option<String>,
    /// Defined in this file (the path as `source` shows it, or its last components).
    file: Option<String>,
}

/// `GET /api/automations`: one page of the loaded automations with their live trigger state,
/// plus the load errors and warnings. The filters run over the engine's list of
/// automations; only the page's automations are rendered with their state.
async fn automations(State(state): State<ApiState>, Query(q): Query<AutomationsQuery>) -> Response {
    let limit = q.limit.unwrap_or(AUTOMATIONS_PAGE);
    if limit == 0 || limit > AUTOMATIONS_PAGE_MAX {
        return error(
            StatusCode::BAD_REQUEST,
            format!("limit: from 1 to {AUTOMATIONS_PAGE_MAX}"),
        );
    }
    let enabled = match q.state.as_deref() {
        None | Some("") => None,
        Some("enabled") => Some(true),
        Some("paused") | Some("disabled") => Some(false),
        Some(other) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("state: {other:?} is not \"enabled\" or \"paused\""),
            );
        }
    };
    let (errors, warnings, in_file) = match state.status.read() {
        Ok(status) => {
            let in_file: Option<HashSet<uuid::Uuid>> =
                q.file.as_deref().filter(|f| !f.is_empty()).map(|file| {
                    status
                        .sources
                        .iter()
                        .filter(|(_, source)| source.is_in_file(file))
                        .map(|(id, _)| *id)
                        .collect()
                });
            (status.errors.clone(), status.warnings.clone(), in_file)
        }
        Err(_) => (Vec::new(), Vec::new(), None),
    };
    let answer = inspect(&state, move |engine| {
        let selected: Vec<&Arc<spur_core::Automation>> = engine
            .automations()
            .iter()
            .filter(|a| q.cursor.as_deref().is_none_or(|c| a.name.as_str() > c))
            .filter(|a| q.name.as_deref().is_none_or(|p| a.name.starts_with(p)))
            .filter(|a| {
                q.tag
                    .as_deref()
                    .is_none_or(|t| a.tags.iter().any(|own| own == t))
            })
            .filter(|a| enabled.is_none_or(|e| a.enabled == e))
            .filter(|a| in_file.as_ref().is_none_or(|ids| ids.contains(&a.id)))
            .collect();
        let (page, more) = smallest(selected, limit, |a| a.name.as_str());
        let page: Vec<crate::pipeline::AutomationState> = page
            .into_iter()
            .map(|a| crate::pipeline::AutomationState {
                automation: a.clone(),
                buckets: engine.buckets_of(a.id),
                next_deadline: engine.next_deadline_of(a.id),
            })
            .collect();
        let next = more
            .then(|| page.last().map(|a| a.automation.name.clone()))
            .flatten();
        (
            page,
            next,
            engine.automations().len(),
            engine.next_deadline(),
            engine.clock(),
        )
    })
    .await;
    let (page, next_cursor, loaded, next_deadline, clock) = match answer {
        Ok(answer) => answer,
        Err(unavailable) => return unavailable,
    };
    let origins = state.status.read().ok().map(|s| {
        page.iter()
            .map(|a| (s.origin(a.automation.id), s.source(a.automation.id)))
            .collect::<Vec<_>>()
    });
    let automations: Vec<Value> = page
        .iter()
        .enumerate()
        .map(|(i, a)| {
            let (origin, source) = origins
                .as_ref()
                .and_then(|o| o.get(i).cloned())
                .unwrap_or(("file", None));
            json!({
                "id": a.automation.id,
                "name": a.automation.name,
                "origin": origin,
                "source": source,
                "enabled": a.automation.enabled,
                "description": a.automation.description,
                "tags": a.automation.tags,
                "summary": a.automation.summary(),
                "trigger": a.automation.trigger,
                "actions": a.automation.actions,
                "actions_on_trigger": a.automation.actions_on_trigger,
                "actions_on_resolve": a.automation.actions_on_resolve,
                "next_deadline": a.next_deadline.map(format_timestamp),
                "state": {
                    "buckets": a.buckets.iter().map(|(trigger, key, b)| json!({
                        "trigger_id": trigger,
                        "key": key,
                        "start": format_timestamp(b.start),
                        "end": format_timestamp(b.end),
                        "count": b.count,
                        "last_event": b.last_event.as_ref().map(|e| e.id),
                    })).collect::<Vec<_>>(),
                },
            })
        })
        .collect();
    axum::Json(json!({
        "automations": automations,
        "next_cursor": next_cursor,
        "loaded": loaded,
        "errors": errors,
        "warnings": warnings,
        "next_deadline": next_deadline.map(format_timestamp),
        "clock": clock.map(format_timestamp),
    }))
    .into_response()
}

async fn set_paused(state: &ApiState, wanted: &str, paused: bool) -> Response {
    let found = match find_automation(state, wanted).await {
        Ok(Some(found)) => found,
        Ok(None) => return error(StatusCode::NOT_FOUND, "Automation not found"),
        Err(unavailable) => return unavailable,
    };
    use crate::actions::PauseError;
    match state
        .executor
        .set_automation_paused(found.automation.id, paused)
        .await
    {
        Ok(()) => axum::Json(
            json!({"id": found.automation.id, "name": found.automation.name, "paused": paused}),
        )
        .into_response(),
        Err(PauseError::Refused(e)) => error(StatusCode::CONFLICT, e),
        Err(PauseError::NotShared { done, reason }) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{done} on this member, but {reason}; ask again"),
        ),
        Err(e @ PauseError::Stopped) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// Prefect's `PATCH /automations/{id}` (`AutomationPartialUpdate`: only `enabled`), which
/// its client's `pause_automation` and `resume_automation` send: `false` pauses, `true` lifts
/// a pause (an automation its file disables stays disabled). 204, like Prefect.
async fn patch_automation(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
    body: Option<axum::Json<Value>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    let Value::Object(fields) = &body else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "the body must be an object: {\"enabled\": true|false}",
        );
    };
    if let Some(other) = fields.keys().find(|k| k.as_str() != "enabled") {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "{other:?}: only \"enabled\" can be changed here; the rest of an automation is defined in its YAML file"
            ),
        );
    }
    let Some(enabled) = fields.get("enabled").and_then(Value::as_bool) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "\"enabled\": must be true or false",
        );
    };
    let response = set_paused(&state, &id, !enabled).await;
    if response.status() == StatusCode::OK {
        StatusCode::NO_CONTENT.into_response()
    } else {
        response
    }
}

/// Creating, replacing and deleting automations through the API (Prefect's `POST
/// /automations/`, `PUT` and `DELETE /automations/{id}`): refused with the reason. Spur's
/// automations live in YAML files, which hot reload picks up. Not a 404, which Prefect's
/// client would take for "already deleted".
async fn defined_in_files() -> Response {
    error(
        StatusCode::CONFLICT,
        "Spur's automations are defined in YAML files: add, edit or remove the file in the \
         daemon's automations folder (changes load within a second). Only pausing and \
         resuming (PATCH {\"enabled\": false|true}) is done through the API.",
    )
}

async fn pause_automation(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    set_paused(&state, &id, true).await
}

async fn resume_automation(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    set_paused(&state, &id, false).await
}

async fn explain_event(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an event id"),
        );
    };
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let event = store.get_event(id)?;
        let explanation = store.get_explanation(id)?;
        Ok::<_, spur_store::StoreError>((event, explanation))
    })
    .await;
    match found {
        Ok(Ok((Some(event), explanation))) => {
            // Every logged event was evaluated; no record means no trigger considered it.
            let explanation =
                explanation.unwrap_or(json!({"fate": {"kind": "evaluated"}, "decisions": []}));
            axum::Json(json!({
                "event": event.to_json(),
                "fate": explanation["fate"],
                "decisions": explanation["decisions"],
                "mismatches_omitted": explanation["mismatches_omitted"].as_u64().unwrap_or(0),
            }))
            .into_response()
        }
        Ok(Ok((None, _))) => error(
            StatusCode::NOT_FOUND,
            format!("no event {id} in the event log"),
        ),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `GET /api/runs` query: a page of runs, newest first, and what to filter by.
#[derive(Debug, Deserialize)]
struct RunsQuery {
    /// Page size (default 50, at most 1 000).
    limit: Option<usize>,
    /// The previous page's `next`.
    cursor: Option<String>,
    /// States, comma-separated (`Crashed,Failed`).
    state: Option<String>,
    /// Deployment name.
    deployment: Option<String>,
    /// Automation name.
    automation: Option<String>,
    /// Created at or after (RFC 3339).
    since: Option<String>,
    /// Created before (RFC 3339).
    until: Option<String>,
}

fn parse_time(
    field: &str,
    value: Option<&str>,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, String> {
    value
        .map(|v| {
            chrono::DateTime::parse_from_rfc3339(v)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|e| format!("{field}: not an RFC 3339 time ({e})"))
        })
        .transpose()
}

/// `GET /api/runs?limit=&cursor=&state=&deployment=&automation=&since=&until=`: runs,
/// newest first, one page at a time (`next` is the cursor of the page after, absent on the
/// last); pages never shift as runs are added.
async fn list_runs(State(state): State<ApiState>, Query(q): Query<RunsQuery>) -> Response {
    let states: Vec<String> = q
        .state
        .as_deref()
        .unwrap_or_default()
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if let Some(bad) = states.iter().find(|s| RunState::parse(s).is_none()) {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "state: {bad:?} is not a run state (Scheduled, Pending, Running, Completed, Failed, Crashed, Cancelled)"
            ),
        );
    }
    let cursor = match q.cursor.as_deref().map(str::parse::<u64>).transpose() {
        Ok(c) => c,
        Err(_) => {
            return error(
                StatusCode::UNPROCESSABLE_ENTITY,
                "cursor: not a cursor from a previous page",
            );
        }
    };
    let (since, until) = match (
        parse_time("since", q.since.as_deref()),
        parse_time("until", q.until.as_deref()),
    ) {
        (Ok(s), Ok(u)) => (s, u),
        (Err(e), _) | (_, Err(e)) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    let query = spur_store::RunQuery {
        states,
        deployment: q.deployment,
        automation: q.automation,
        since,
        until,
        limit: q.limit.unwrap_or(50).clamp(1, 1000),
        cursor,
    };
    let store = state.store.clone();
    match from_store(move || store.query_runs(&query)).await {
        Ok(page) => {
            let mut body = json!({"runs": page.runs});
            if let Some(next) = page.next {
                body["next"] = json!(next.to_string());
            }
            axum::Json(body).into_response()
        }
        Err(failed) => failed,
    }
}

/// `POST /api/runs/{id}/rerun`: a new run with the same parameters, linked by `rerun_of`.
async fn rerun_run(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a run id");
    };
    match state.executor.rerun(id).await {
        Ok(run) => (StatusCode::CREATED, axum::Json(run)).into_response(),
        Err(e) if e.starts_with("no run") => error(StatusCode::NOT_FOUND, e),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn get_run(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a run id");
    };
    let store = state.store.clone();
    match from_store(move || store.get_run(id)).await {
        Ok(Some(run)) => axum::Json(run).into_response(),
        Ok(None) => error(StatusCode::NOT_FOUND, "Run not found"),
        Err(failed) => failed,
    }
}

async fn cancel_run(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a run id");
    };
    match state.executor.cancel(id).await {
        Ok(run) => axum::Json(run).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

/// `POST /api/runs {"deployment": NAME or id, "parameters": {…}}`: start a run by hand.
async fn start_run(State(state): State<ApiState>, body: Option<axum::Json<Value>>) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    let Some(wanted) = body.get("deployment").and_then(Value::as_str) else {
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "deployment: is required (a name or id)",
        );
    };
    let id = uuid::Uuid::parse_str(wanted).ok();
    let Some(deployment) = state
        .executor
        .deployments()
        .into_iter()
        .find(|d| d.name == wanted || Some(d.id) == id)
    else {
        return error(StatusCode::NOT_FOUND, format!("no deployment {wanted:?}"));
    };
    let parameters = body.get("parameters").cloned().unwrap_or(json!({}));
    match state
        .executor
        .start(
            &deployment,
            &parameters,
            None,
            None,
            crate::actions::RunOptions::default(),
        )
        .await
    {
        Ok(run) => (StatusCode::CREATED, axum::Json(run)).into_response(),
        Err(e) => error(StatusCode::UNPROCESSABLE_ENTITY, e),
    }
}

async fn failed_actions(State(state): State<ApiState>) -> Response {
    let store = state.store.clone();
    match from_store(move || store.failed_actions()).await {
        Ok(list) => axum::Json(json!({"failed": list})).into_response(),
        Err(failed) => failed,
    }
}

async fn retry_failed_action(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not an action id");
    };
    match state.executor.retry_failed(id).await {
        Ok(()) => axum::Json(json!({"retried": id, "status": "executed"})).into_response(),
        Err(e) => error(StatusCode::CONFLICT, e),
    }
}

async fn list_deployments(State(state): State<ApiState>) -> Response {
    let deployments: Vec<Value> = state
        .executor
        .deployments()
        .iter()
        .map(|d| {
            json!({"name": d.name, "id": d.id, "flow": d.flow, "flow_id": d.flow_id(),
                   "parameters": d.parameters, "has_launcher": d.launcher.is_some()})
        })
        .collect();
    axum::Json(json!({"deployments": deployments})).into_response()
}

#[derive(Deserialize)]
struct Limit {
    limit: Option<usize>,
}

async fn firings(State(state): State<ApiState>, Query(q): Query<Limit>) -> Response {
    let limit = q.limit.unwrap_or(50).min(1000);
    let store = state.store.clone();
    match from_store(move || store.recent_firings(limit)).await {
        Ok(firings) => axum::Json(json!({"firings": firings})).into_response(),
        Err(failed) => failed,
    }
}

/// Most values one list of an event filter may hold (names, prefixes, ids, roles, …): longer
/// lists are refused with 422. Matching uses sets and sorted prefixes, so a list at the limit
/// costs about as much as a short one (`spur_store::QueryMatcher`).
pub const MAX_FILTER_VALUES: usize = 1_000;

/// Most label patterns one event filter may hold, over all its `labels` (globs, each tried
/// on every event scanned).
pub const MAX_LABEL_PATTERNS: usize = 100;

/// Most `related` and `any_resource` filters one event filter may hold (each).
pub const MAX_SUBFILTERS: usize = 20;

/// Largest websocket message `/api/events/out` reads (its `auth` and `filter` messages).
pub const MAX_OUT_MESSAGE_BYTES: usize = 2 * 1024 * 1024;

/// Parses Prefect's `EventFilter` (the shape its client and UI send): `occurred`, `event`
/// (`name`, `prefix`, `exclude_name`, `exclude_prefix`), `resource` (`id`, `id_prefix`,
/// `labels`, `distinct`), `related` and `any_resource` (one filter or a list, each must
/// hold), `id`, `text` and `order` (`DESC`, newest first, by default; or `ASC`). Unknown
/// fields are refused with their name; lists are lists (as in Prefect's schema, a lone
/// string is refused, except as a label's value), bounded by [`MAX_FILTER_VALUES`],
/// [`MAX_LABEL_PATTERNS`] and [`MAX_SUBFILTERS`].
///
/// As in Prefect, `occurred` has defaults: since the start of today (UTC) 180 days ago,
/// until now, so an event reported with a future `occurred` shows once that time comes.
pub fn parse_filter(filter: &Value) -> Result<EventQuery, String> {
    let now = Utc::now();
    let mut q = EventQuery {
        since: Some(
            now.date_naive().and_time(chrono::NaiveTime::MIN).and_utc() - TimeDelta::days(180),
        ),
        until: Some(now),
        ..EventQuery::default()
    };
    let Value::Object(map) = filter else {
        return if filter.is_null() {
            Ok(q)
        } else {
            Err("filter must be an object".into())
        };
    };
    for key in map.keys() {
        if ![
            "occurred",
            "event",
            "resource",
            "order",
            "any_resource",
            "related",
            "id",
            "text",
        ]
        .contains(&key.as_str())
        {
            return Err(format!("unknown filter field {key:?}"));
        }
    }
    if let Some(occurred) = map.get("occurred") {
        if let Some(since) = occurred.get("since").filter(|v| !v.is_null()) {
            q.since = Some(parse_timestamp(since).map_err(|e| format!("occurred.since: {e}"))?);
        }
        if let Some(until) = occurred.get("until").filter(|v| !v.is_null()) {
            q.until = Some(parse_timestamp(until).map_err(|e| format!("occurred.until: {e}"))?);
        }
    }
    if let Some(event) = map.get("event").filter(|v| !v.is_null()) {
        q.names = strings(event.get("name"), "event.name")?;
        q.name_prefixes = strings(event.get("prefix"), "event.prefix")?;
        q.excluded_names = strings(event.get("exclude_name"), "event.exclude_name")?;
        q.excluded_prefixes = strings(event.get("exclude_prefix"), "event.exclude_prefix")?;
    }
    if let Some(resource) = map.get("resource").filter(|v| !v.is_null()) {
        q.resource_ids = strings(resource.get("id"), "resource.id")?;
        q.resource_prefixes = strings(resource.get("id_prefix"), "resource.id_prefix")?;
        q.resource_labels = labels(resource.get("labels"), "resource.labels")?;
        q.distinct_resources = match resource.get("distinct") {
            None | Some(Value::Null) => false,
            Some(Value::Bool(distinct)) => *distinct,
            Some(_) => return Err("resource.distinct: must be true or false".into()),
        };
    }
    for name in ["related", "any_resource"] {
        if one_or_many(map.get(name)).count() > MAX_SUBFILTERS {
            return Err(format!(
                "{name}: at most {MAX_SUBFILTERS} filters (MAX_SUBFILTERS)"
            ));
        }
    }
    for (i, related) in one_or_many(map.get("related")).enumerate() {
        let field = |name: &str| format!("related[{i}].{name}");
        let pairs = match related.get("resources_in_roles") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) if items.len() > MAX_FILTER_VALUES => {
                return Err(format!(
                    "{}: at most {MAX_FILTER_VALUES} values (MAX_FILTER_VALUES)",
                    field("resources_in_roles")
                ));
            }
            Some(Value::Array(items)) => items
                .iter()
                .map(|pair| match pair.as_array().map(Vec::as_slice) {
                    Some([Value::String(id), Value::String(role)]) => {
                        Ok((id.clone(), role.clone()))
                    }
                    _ => Err(format!(
                        "{}: must be a list of [id, role] pairs",
                        field("resources_in_roles")
                    )),
                })
                .collect::<Result<_, _>>()?,
            Some(_) => {
                return Err(format!(
                    "{}: must be a list of [id, role] pairs",
                    field("resources_in_roles")
                ));
            }
        };
        q.related.push(RelatedFilter {
            ids: strings(related.get("id"), &field("id"))?,
            roles: strings(related.get("role"), &field("role"))?,
            resources_in_roles: pairs,
            labels: labels(related.get("labels"), &field("labels"))?,
        });
    }
    for (i, any) in one_or_many(map.get("any_resource")).enumerate() {
        let field = |name: &str| format!("any_resource[{i}].{name}");
        q.any_resource.push(AnyResourceFilter {
            ids: strings(any.get("id"), &field("id"))?,
            id_prefixes: strings(any.get("id_prefix"), &field("id_prefix"))?,
            labels: labels(any.get("labels"), &field("labels"))?,
        });
    }
    if let Some(ids) = map.get("id").filter(|v| !v.is_null()) {
        q.ids = strings(ids.get("id"), "id.id")?
            .iter()
            .map(|id| uuid::Uuid::parse_str(id).map_err(|e| format!("id.id: {id:?}: {e}")))
            .collect::<Result<_, _>>()?;
    }
    if let Some(text) = map.get("text").filter(|v| !v.is_null()) {
        let query = text
            .get("query")
            .and_then(Value::as_str)
            .ok_or("text.query: must be a string")?;
        if query.chars().count() > 200 {
            return Err("text.query: at most 200 characters".into());
        }
        q.text = Some(TextQuery::parse(query));
    }
    let patterns = std::iter::once(&q.resource_labels)
        .chain(q.related.iter().map(|r| &r.labels))
        .chain(q.any_resource.iter().map(|a| &a.labels))
        .flat_map(|spec| spec.labels.iter().map(|(_, values)| values.len()))
        .sum::<usize>();
    if patterns > MAX_LABEL_PATTERNS {
        return Err(format!(
            "labels: at most {MAX_LABEL_PATTERNS} label patterns in one filter, got {patterns} (MAX_LABEL_PATTERNS)"
        ));
    }
    q.order = match map.get("order") {
        None | Some(Value::Null) => EventOrder::Descending,
        Some(Value::String(order)) if order == "DESC" => EventOrder::Descending,
        Some(Value::String(order)) if order == "ASC" => EventOrder::Ascending,
        Some(other) => return Err(format!("order: must be \"ASC\" or \"DESC\", not {other}")),
    };
    Ok(q)
}

/// A list of strings (null as none), at most [`MAX_FILTER_VALUES`] of them. A lone string
/// is refused, as Prefect's `List[str]` fields refuse it (`{"prefix": "flow"}` is a 422
/// there, not a filter that quietly matches nothing).
fn strings(v: Option<&Value>, field: &str) -> Result<Vec<String>, String> {
    match v {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::Array(items)) if items.len() > MAX_FILTER_VALUES => Err(format!(
            "{field}: at most {MAX_FILTER_VALUES} values, got {} (MAX_FILTER_VALUES)",
            items.len()
        )),
        Some(Value::Array(items)) => items
            .iter()
            .map(|i| {
                i.as_str()
                    .map(str::to_owned)
                    .ok_or_else(|| format!("{field}: must be a list of strings"))
            })
            .collect(),
        Some(_) => Err(format!("{field}: must be a list of strings")),
    }
}

/// A `ResourceSpecification` (label → value or values, Prefect's patterns).
fn labels(v: Option<&Value>, field: &str) -> Result<ResourceSpecification, String> {
    let mut spec = ResourceSpecification::default();
    match v {
        None | Some(Value::Null) => {}
        Some(Value::Object(map)) => {
            for (label, values) in map {
                // Prefect's `ResourceSpecification`: a value or a list of values.
                let field = format!("{field}.{label}");
                let values = match values {
                    Value::String(one) => vec![one.clone()],
                    other => strings(Some(other), &field)?,
                };
                spec.labels.push((
                    label.clone(),
                    values.iter().map(|v| LabelPattern::new(v)).collect(),
                ));
            }
        }
        Some(_) => return Err(format!("{field}: must be an object of label patterns")),
    }
    Ok(spec)
}

/// A filter that may be given once or as a list.
fn one_or_many(v: Option<&Value>) -> Box<dyn Iterator<Item = &Value> + '_> {
    match v {
        None | Some(Value::Null) => Box::new(std::iter::empty()),
        Some(Value::Array(items)) => Box::new(items.iter()),
        Some(one) => Box::new(std::iter::once(one)),
    }
}

/// The address the caller reached us at, as Prefect's `request.base_url` gives it: page
/// links must be absolute, because Prefect's client validates `next_page` as a URL
/// (`AnyHttpUrl`) and fetches it as given. A proxy's `X-Forwarded-Proto`/`-Host` win.
fn base_url(headers: &HeaderMap) -> String {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .map(str::trim)
            .filter(|v| !v.is_empty())
    };
    let scheme = header("x-forwarded-proto").unwrap_or("http");
    let host = header("x-forwarded-host")
        .or_else(|| header("host"))
        .unwrap_or("127.0.0.1");
    format!("{scheme}://{host}")
}

async fn run_query(
    state: &ApiState,
    headers: &HeaderMap,
    filter: &Value,
    query: EventQuery,
    limit: usize,
    after: Option<PagePosition>,
) -> Response {
    let store = state.store.clone();
    let q = query.clone();
    let page =
        match tokio::task::spawn_blocking(move || store.query(&q, limit, after, 200_000)).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    let next_page = page.next.map(|after| {
        let token = json!({"filter": filter, "after": after, "limit": limit});
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(token.to_string());
        format!(
            "{}/api/events/filter/next?page-token={token}",
            base_url(headers)
        )
    });
    axum::Json(json!({
        "events": page.events.iter().map(|(_, e)| e.to_json()).collect::<Vec<_>>(),
        "total": page.total,
        "next_page": next_page,
    }))
    .into_response()
}

/// `POST /api/events/filter`: the body is JSON whatever its content type (as Prefect reads
/// it); an empty body is no filter, anything else that is not JSON a 400.
async fn filter_events(
    State(state): State<ApiState>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let body = if body.iter().all(u8::is_ascii_whitespace) {
        Value::Null
    } else {
        match serde_json::from_slice::<Value>(&body) {
            Ok(body @ (Value::Object(_) | Value::Null)) => body,
            Ok(_) => {
                return error(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "the body must be an object: {\"filter\": …, \"limit\": …}",
                );
            }
            Err(e) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!("the body is not valid JSON: {e}"),
                );
            }
        }
    };
    let limit = body
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(50)
        .clamp(1, 50) as usize;
    let filter = body.get("filter").unwrap_or(&Value::Null);
    let query = match parse_filter(filter) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    run_query(&state, &headers, filter, query, limit, None).await
}

#[derive(Deserialize)]
struct PageToken {
    #[serde(rename = "page-token")]
    page_token: String,
}

async fn filter_next(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(token): Query<PageToken>,
) -> Response {
    let decoded = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(token.page_token.as_bytes())
        .ok()
        .and_then(|b| serde_json::from_slice::<Value>(&b).ok());
    let Some(token) = decoded else {
        return error(StatusCode::FORBIDDEN, "invalid page token");
    };
    let filter = token.get("filter").unwrap_or(&Value::Null);
    let after = token
        .get("after")
        .and_then(|after| serde_json::from_value::<PagePosition>(after.clone()).ok());
    let (Ok(query), Some(after)) = (parse_filter(filter), after) else {
        return error(StatusCode::FORBIDDEN, "invalid page token");
    };
    let limit = token
        .get("limit")
        .and_then(Value::as_u64)
        .unwrap_or(50)
        .clamp(1, 50) as usize;
    run_query(&state, &headers, filter, query, limit, Some(after)).await
}

async fn events_out(
    State(state): State<ApiState>,
    pre: Option<axum::Extension<spur_ingest::http::PreAuthorized>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let handshake = offers_prefect_protocol(&headers);
    // With the upgrade's own credentials accepted, the in-band token is not checked again.
    let check = pre.is_none().then(|| state.auth.in_band(Scope::EventsRead));
    ws.protocols(["prefect"])
        .max_message_size(MAX_OUT_MESSAGE_BYTES)
        .max_frame_size(MAX_OUT_MESSAGE_BYTES)
        .on_upgrade(move |socket| stream_out(socket, handshake, check, state))
}

/// The next text message of an `/api/events/out` client, within the auth timeout; on a
/// timeout or an oversized message the socket is closed (1008 or 1009) and `None` returned.
async fn next_text(
    socket: &mut WebSocket,
    state: &ApiState,
    expected: &str,
) -> Option<Option<String>> {
    match next_text_within(socket, state.auth_timeout).await {
        Ok(text) => Some(text),
        Err(ReadError::TimedOut) => {
            let reason = format!(
                "no '{expected}' message within {} s",
                state.auth_timeout.as_secs_f64()
            );
            let _ = socket
                .send(Message::Close(Some(axum::extract::ws::CloseFrame {
                    code: 1008,
                    reason: reason.into(),
                })))
                .await;
            None
        }
        Err(ReadError::TooBig) => {
            too_big(socket, "/api/events/out", MAX_OUT_MESSAGE_BYTES).await;
            None
        }
    }
}

async fn stream_out(
    mut socket: WebSocket,
    handshake: bool,
    check: Option<spur_ingest::http::InBandAuth>,
    state: ApiState,
) {
    if handshake {
        let Some(auth) = next_text(&mut socket, &state, "auth").await else {
            return;
        };
        let auth = auth.and_then(|t| serde_json::from_str::<Value>(&t).ok());
        let ok_type = auth
            .as_ref()
            .and_then(|a| a.get("type"))
            .and_then(Value::as_str)
            == Some("auth");
        let token_ok = match &check {
            None => true,
            Some(check) => check.accepts(
                auth.as_ref()
                    .and_then(|a| a.get("token"))
                    .and_then(Value::as_str),
            ),
        };
        if !ok_type || !token_ok {
            close(
                socket,
                1008,
                if ok_type {
                    "Invalid token"
                } else {
                    "Expected 'auth' message"
                },
            )
            .await;
            return;
        }
        if socket
            .send(Message::Text(
                json!({"type": "auth_success"}).to_string().into(),
            ))
            .await
            .is_err()
        {
            return;
        }
    }
    // Subscribe before the backfill so nothing falls between the two.
    let mut live = state.live.subscribe();
    let Some(first) = next_text(&mut socket, &state, "filter").await else {
        return;
    };
    let Some(first) = first else {
        return;
    };
    let message: Value = serde_json::from_str(&first).unwrap_or(Value::Null);
    if message.get("type").and_then(Value::as_str) != Some("filter") {
        close(socket, 1002, "Expected 'filter' message").await;
        return;
    }
    let mut query = match parse_filter(message.get("filter").unwrap_or(&Value::Null)) {
        Ok(q) => q,
        Err(e) => {
            close(socket, 1002, &format!("Invalid filter: {e}")).await;
            return;
        }
    };
    let mut sent: HashSet<uuid::Uuid> = HashSet::new();
    if message
        .get("backfill")
        .and_then(Value::as_bool)
        .unwrap_or(true)
    {
        let horizon = Utc::now() - TimeDelta::minutes(15);
        let mut backfill_query = query.clone();
        backfill_query.since = Some(query.since.map_or(horizon, |s| s.max(horizon)));
        // The newest 10 000, sent oldest first (Prefect streams in `occurred` order).
        backfill_query.order = EventOrder::Descending;
        let store = state.store.clone();
        let page = tokio::task::spawn_blocking(move || {
            store.query(&backfill_query, 10_000, None, 200_000)
        })
        .await;
        if let Ok(Ok(page)) = page {
            for (_, event) in page.events.into_iter().rev() {
                sent.insert(event.id);
                let frame = json!({"type": "event", "event": event.to_json()}).to_string();
                if socket.send(Message::Text(frame.into())).await.is_err() {
                    return;
                }
            }
        }
    }
    query.until = None;
    let matcher = query.matcher();
    loop {
        tokio::select! {
            incoming = socket.recv() => match incoming {
                Some(Err(e)) if spur_ingest::http::is_too_big(&e) => {
                    return too_big(&mut socket, "/api/events/out", MAX_OUT_MESSAGE_BYTES).await;
                }
                Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                _ => {}
            },
            event = live.recv() => match event {
                Ok(event) => {
                    if !matcher.matches(&event) || sent.remove(&event.id) {
                        continue;
                    }
                    let frame = json!({"type": "event", "event": event.to_json()}).to_string();
                    if socket.send(Message::Text(frame.into())).await.is_err() {
                        return;
                    }
                }
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(skipped = n, "events/out: a slow subscriber missed events");
                }
                Err(broadcast::error::RecvError::Closed) => return,
            },
        }
    }
}

// ---- Read-only views for the web UI's automation, run and feed pages. ----

/// How many recent firings and runs the UI views scan for one automation or run.
const UI_SCAN: usize = 5_000;

/// `GET /api/automations/{id or name}/detail`: the automation with its live state, the file
/// and line it is defined at, its recent firings (newest first, at most 50) and the runs it
/// launched (at most 50), from the newest 5 000 of each.
async fn automation_detail(
    State(state): State<ApiState>,
    axum::extract::Path(wanted): axum::extract::Path<String>,
) -> Response {
    let a = match find_automation(&state, &wanted).await {
        Ok(Some(found)) => found,
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no automation {wanted:?}")),
        Err(unavailable) => return unavailable,
    };
    let source = state
        .status
        .read()
        .ok()
        .and_then(|s| s.source(a.automation.id));
    let origin = state
        .status
        .read()
        .ok()
        .map_or("file", |s| s.origin(a.automation.id));
    let name = a.automation.name.clone();
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let mut firings: Vec<Value> = store
            .recent_firings(UI_SCAN)?
            .into_iter()
            .filter(|f| f["automation"] == name.as_str())
            .take(50)
            .collect();
        // Each firing's triggering event, by name and resource (the record holds its id).
        for firing in &mut firings {
            let id = firing["event"]
                .as_str()
                .and_then(|e| uuid::Uuid::parse_str(e).ok());
            if let Some(event) = id.map(|id| store.get_event(id)).transpose()?.flatten() {
                let json = event.to_json();
                firing["triggering_event"] =
                    json!({"id": event.id, "event": event.event, "resource": json["resource"]});
            }
        }
        let runs: Vec<Value> = store
            .list_runs(UI_SCAN)?
            .into_iter()
            .filter(|r| r["automation"] == name.as_str())
            .take(50)
            .collect();
        Ok::<_, spur_store::StoreError>((firings, runs))
    })
    .await;
    let (firings, runs) = match found {
        Ok(Ok(found)) => found,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let automation = &a.automation;
    let id = automation.id;
    let flow_keys = inspect(&state, move |engine| engine.flow_keys_of(id))
        .await
        .unwrap_or_default();
    let concurrency: Vec<Value> = state
        .executor
        .concurrency_of(&automation.name)
        .into_iter()
        .map(|(key, running, waiting)| json!({"key": key, "in_progress": running, "waiting": waiting}))
        .collect();
    axum::Json(json!({
        "id": automation.id,
        "name": automation.name,
        "flow_control": automation.flow,
        "flow_keys": flow_keys,
        "concurrency": concurrency,
        "enabled": automation.enabled,
        "description": automation.description,
        "tags": automation.tags,
        "summary": automation.summary(),
        "trigger": automation.trigger,
        "actions": automation.actions,
        "actions_on_trigger": automation.actions_on_trigger,
        "actions_on_resolve": automation.actions_on_resolve,
        "owner_resource": automation.owner_resource,
        "source": source,
        "origin": origin,
        "next_deadline": a.next_deadline.map(format_timestamp),
        "buckets": a.buckets.iter().map(|(trigger, key, b)| json!({
            "trigger_id": trigger,
            "key": key,
            "start": format_timestamp(b.start),
            "end": format_timestamp(b.end),
            "count": b.count,
            "last_event": b.last_event.as_ref().map(|e| e.id),
        })).collect::<Vec<_>>(),
        "firings": firings,
        "runs": runs,
    }))
    .into_response()
}

/// `GET /api/runs/{id}/lineage`: where a run came from and what it set off — the firing that
/// launched it (from its idempotency key `<firing id>:<action index>`), that firing's
/// triggering event, and the runs launched by firings its own flow-run events triggered.
/// Searched among the newest 5 000 firings and runs.
async fn run_lineage(
    State(state): State<ApiState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Response {
    let Ok(id) = uuid::Uuid::parse_str(&id) else {
        return error(StatusCode::BAD_REQUEST, "not a run id");
    };
    let store = state.store.clone();
    let found = tokio::task::spawn_blocking(move || {
        let Some(run) = store.get_run(id)? else {
            return Ok(None);
        };
        let firings = store.recent_firings(UI_SCAN)?;
        let firing_of = |run: &Value| -> Option<Value> {
            let key = run["idempotency_key"].as_str()?;
            let firing = key.split(':').next()?;
            firings.iter().find(|f| f["id"] == firing).cloned()
        };
        let firing = firing_of(&run);
        let event = match firing
            .as_ref()
            .and_then(|f| f["event"].as_str())
            .and_then(|e| uuid::Uuid::parse_str(e).ok())
        {
            Some(event) => store.get_event(event)?.map(|e| e.to_json()),
            None => None,
        };
        let emitted: HashSet<&str> = run["history"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|h| h["event_id"].as_str())
            .collect();
        let children: Vec<Value> = store
            .list_runs(UI_SCAN)?
            .into_iter()
            .filter(|r| {
                firing_of(r)
                    .and_then(|f| f["event"].as_str().map(|e| emitted.contains(e)))
                    .unwrap_or(false)
            })
            .collect();
        Ok::<_, spur_store::StoreError>(Some(
            json!({"run": run, "firing": firing, "event": event, "children": children}),
        ))
    })
    .await;
    match found {
        Ok(Ok(Some(lineage))) => axum::Json(lineage).into_response(),
        Ok(Ok(None)) => error(StatusCode::NOT_FOUND, "Run not found"),
        Ok(Err(e)) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// `POST /api/events/histogram {"filter": EventFilter, "buckets": N}`: how many events match
/// per time slice (N slices, default 60, at most 200) of the filter's `occurred` range —
/// from the oldest match when `since` is not given, until now when `until` is not — with
/// counts by event name. Counts at most the newest 50 000 matches (`counted` < `total`
/// says when the chart leaves older ones out).
async fn event_histogram(
    State(state): State<ApiState>,
    body: Option<axum::Json<Value>>,
) -> Response {
    let body = body.map(|b| b.0).unwrap_or(Value::Null);
    let filter = body.get("filter").unwrap_or(&Value::Null);
    let mut query = match parse_filter(filter) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::UNPROCESSABLE_ENTITY, e),
    };
    query.order = EventOrder::Descending;
    let slices = body
        .get("buckets")
        .and_then(Value::as_u64)
        .unwrap_or(60)
        .clamp(1, 200) as i64;
    let given_since = filter
        .pointer("/occurred/since")
        .is_some_and(|s| !s.is_null());
    let store = state.store.clone();
    let q = query.clone();
    let page =
        match tokio::task::spawn_blocking(move || store.query(&q, 50_000, None, 200_000)).await {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        };
    let until = query.until.unwrap_or_else(Utc::now);
    let oldest = page.events.last().map(|(_, e)| e.occurred);
    let since = match (given_since, query.since, oldest) {
        (true, Some(since), _) => since,
        (_, _, Some(oldest)) => oldest.min(until - TimeDelta::minutes(1)),
        _ => until - TimeDelta::hours(1),
    };
    let span = (until - since).num_milliseconds().max(1);
    let width = (span + slices - 1) / slices;
    let mut buckets: Vec<(usize, serde_json::Map<String, Value>)> =
        vec![(0, serde_json::Map::new()); slices as usize];
    for (_, event) in &page.events {
        let offset = (event.occurred - since).num_milliseconds();
        if offset < 0 || offset > span {
            continue;
        }
        let slot = ((offset / width) as usize).min(buckets.len() - 1);
        let (count, names) = &mut buckets[slot];
        *count += 1;
        let n = names.get(&event.event).and_then(Value::as_u64).unwrap_or(0);
        names.insert(event.event.clone(), json!(n + 1));
    }
    axum::Json(json!({
        "since": format_timestamp(since),
        "until": format_timestamp(until),
        "bucket_ms": width,
        "total": page.total,
        "counted": page.events.len(),
        "buckets": buckets.into_iter().enumerate().map(|(i, (count, names))| json!({
            "start": format_timestamp(since + TimeDelta::milliseconds(width * i as i64)),
            "count": count,
            "names": names,
        })).collect::<Vec<_>>(),
    }))
    .into_response()
}

/// The UI's icon (so a browser's automatic `/favicon.ico` request is not a 404).
async fn favicon() -> Response {
    (
        [
            (header::CONTENT_TYPE, "image/svg+xml"),
            (header::CACHE_CONTROL, "max-age=86400"),
        ],
        r##"<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16"><rect width="16" height="16" rx="3" fill="#2f5bd3"/><path d="M4 11l4-6 4 6" stroke="#fff" stroke-width="2" fill="none"/></svg>"##,
    )
        .into_response()
}
