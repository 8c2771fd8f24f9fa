//! Prefect's events API over HTTP and websocket, as the stock Prefect client uses it.
//!
//! * `POST /api/events` — a JSON list of events (a single object is accepted too). Valid events
//!   land even when others in the batch are refused: 204 when all landed, else 422 with one
//!   reason per refused event. 400 for a body that is not JSON, 413 over the body limit, 429
//!   when the pipeline is saturated (with `Retry-After`).
//! * `GET /api/events/in` — the websocket `emit_event` streams to: subprotocol `prefect`, an
//!   `auth` message answered with `auth_success`, then one event per text frame. Frames are
//!   read ahead and handed to the pipeline in batches (up to [`WS_BATCH_EVENTS`] of what has
//!   already arrived, several batches in flight), but a ping is answered only once every
//!   earlier event is durable, so by the time the client sees its pong every event before it
//!   is stored (that ping/pong is how the client confirms delivery). A malformed
//!   frame is logged and skipped instead of killing the socket (Prefect closes it, and the
//!   client then re-sends the bad event forever).
//!
//! Websocket limits: the `auth` message must come within the configured auth timeout (else
//! close 1008); a message over [`MAX_WS_MESSAGE_BYTES`] is answered with close code 1009
//! (Message Too Big) and logged, on this socket and on `/api/events/out` ([`too_big`]).
//! * `GET /api/admin/version` — the Prefect version string the client checks before connecting.

use axum::Router;
use axum::body::Bytes;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::Utc;
use futures_util::FutureExt;
use serde_json::{Value, json};
use tracing::{debug, warn};

use crate::intake::{
    DocumentError, Intake, SubmitError, normalize, normalize_document, normalize_slice,
};
use spur_core::{Event, EventError};

/// The Prefect server version Spur reports. The stock client requires major version 3 and
/// warns when the server is older than itself, so this is a 3.x newer than today's clients.
pub const PREFECT_COMPATIBLE_VERSION: &str = "3.99.0";

/// Largest accepted request body (a batch of events).
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// Largest websocket message (and frame) `/api/events/in` reads: one event.
pub const MAX_WS_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// Shared state of the ingest routes.
#[derive(Clone, Debug)]
pub struct HttpIngest {
    /// Where events go.
    pub intake: Intake,
    /// When set, websocket clients using Prefect's handshake must send a token it accepts
    /// (unless the daemon's auth layer already authenticated the upgrade request).
    pub auth: Option<InBandAuth>,
    /// How long a websocket client has to send its `auth` message.
    pub auth_timeout: std::time::Duration,
}

/// Decides whether the token of a websocket's in-band `auth` message is accepted (`None`:
/// no token; the answer is then whether auth is off).
#[derive(Clone)]
#[allow(clippy::type_complexity)]
pub struct InBandAuth(pub std::sync::Arc<dyn Fn(Option<&str>) -> bool + Send + Sync>);

impl InBandAuth {
    /// Does `token` pass?
    pub fn accepts(&self, token: Option<&str>) -> bool {
        (self.0)(token)
    }
}

impl std::fmt::Debug for InBandAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("InBandAuth")
    }
}

/// Request extension set by the daemon's auth layer when the request's own credentials
/// (an `Authorization` header) were accepted for its route: the websocket handlers then take
/// the in-band `auth` message's token as already checked.
#[derive(Clone, Copy, Debug)]
pub struct PreAuthorized;

/// The ingest routes, ready to merge into the daemon's router.
pub fn routes(state: HttpIngest) -> Router {
    Router::new()
        .route("/api/events", post(post_events))
        .route("/api/events/in", get(events_in))
        .route("/api/admin/version", get(version))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

async fn version() -> impl IntoResponse {
    axum::Json(PREFECT_COMPATIBLE_VERSION)
}

fn detail(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

async fn post_events(State(state): State<HttpIngest>, body: Bytes) -> Response {
    let now = Utc::now();
    let limits = state.intake.limits();
    // The usual body, a list of events: each read from its own bytes (`normalize_document`:
    // plain events skip the `Value` tree; anything else gets `normalize`'s exact answer).
    if let Ok(items) = serde_json::from_slice::<Vec<&serde_json::value::RawValue>>(&body) {
        let results = items
            .iter()
            .map(
                |raw| match normalize_document(raw.get().as_bytes(), now, limits) {
                    Ok(event) => Ok(event),
                    Err(DocumentError::Invalid(e)) => Err(e),
                    // Cannot happen (each item is JSON already), but is refused all the same.
                    Err(e @ DocumentError::NotJson(_)) => Err(EventError {
                        field: "event".into(),
                        reason: e.to_string(),
                    }),
                },
            )
            .collect();
        return submit_events(&state, results).await;
    }
    let value: Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            state.intake.count_rejected(1);
            return detail(
                StatusCode::BAD_REQUEST,
                json!({"detail": format!("the body is not valid JSON: {e}")}),
            );
        }
    };
    let items = match value {
        Value::Array(items) => items,
        v @ Value::Object(_) => vec![v],
        other => {
            state.intake.count_rejected(1);
            return detail(
                StatusCode::BAD_REQUEST,
                json!({"detail": format!("expected a JSON list of events, got {}", spur_core::event::json_type_name(&other))}),
            );
        }
    };
    let results = items
        .into_iter()
        .map(|item| normalize(item, now, limits))
        .collect();
    submit_events(&state, results).await
}

/// Stores the valid events of a `POST /api/events` and answers: 204, or 422 naming each
/// refused item (the others are stored all the same), or the intake's refusal.
async fn submit_events(state: &HttpIngest, results: Vec<Result<Event, EventError>>) -> Response {
    let total = results.len();
    let mut events = Vec::with_capacity(total);
    let mut rejected = Vec::new();
    for (index, result) in results.into_iter().enumerate() {
        match result {
            Ok(event) => events.push(event),
            Err(e) => rejected.push(json!({"index": index, "field": e.field, "reason": e.reason})),
        }
    }
    if !rejected.is_empty() {
        state.intake.count_rejected(rejected.len() as u64);
    }
    let accepted = events.len();
    match state.intake.try_submit(events).await {
        Ok(_) => {}
        Err(SubmitError::Busy) => {
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [(header::RETRY_AFTER, "1")],
                axum::Json(json!({"detail": SubmitError::Busy.to_string()})),
            )
                .into_response();
        }
        Err(e @ (SubmitError::Closed | SubmitError::Unavailable(_))) => {
            return detail(
                StatusCode::SERVICE_UNAVAILABLE,
                json!({"detail": e.to_string()}),
            );
        }
        Err(e) => {
            return detail(
                StatusCode::INTERNAL_SERVER_ERROR,
                json!({"detail": e.to_string()}),
            );
        }
    }
    if rejected.is_empty() {
        StatusCode::NO_CONTENT.into_response()
    } else {
        detail(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({
                "detail": format!("{} of {total} events were refused; the other {accepted} were accepted", rejected.len()),
                "accepted": accepted,
                "rejected": rejected,
            }),
        )
    }
}

/// True when the client offers the `prefect` websocket subprotocol (then the in-band auth
/// handshake is expected).
pub fn offers_prefect_protocol(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "prefect")
}

async fn events_in(
    State(mut state): State<HttpIngest>,
    pre: Option<axum::Extension<PreAuthorized>>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let handshake = offers_prefect_protocol(&headers);
    if pre.is_some() {
        state.auth = None;
    }
    ws.protocols(["prefect"])
        .max_message_size(MAX_WS_MESSAGE_BYTES)
        .max_frame_size(MAX_WS_MESSAGE_BYTES)
        .on_upgrade(move |socket| stream_events_in(socket, handshake, state))
}

/// Closes a websocket with a code and reason.
pub async fn close(mut socket: WebSocket, code: u16, reason: &str) {
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        })))
        .await;
}

/// Is this websocket read error a message (or frame) over the size limit? tungstenite
/// refuses it as soon as it reads the frame header, before buffering the payload.
pub fn is_too_big(error: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = source {
        if let Some(tungstenite::Error::Capacity(_)) = e.downcast_ref::<tungstenite::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Answers a message over the size limit: logs it and closes with 1009 (Message Too Big).
/// The rest of the oversized frame is not read; the socket is held for a moment after the
/// close frame so the client can read it before the connection goes away (dropping a
/// socket with unread input resets it).
pub async fn too_big(socket: &mut WebSocket, route: &str, limit: usize) {
    warn!(
        route,
        limit, "websocket message over the size limit: closing with 1009"
    );
    let _ = socket
        .send(Message::Close(Some(CloseFrame {
            code: 1009,
            reason: format!("message too big (the limit is {limit} bytes)").into(),
        })))
        .await;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
}

/// Waits for the next text message (pings skipped) for at most `limit`.
pub async fn next_text_within(
    socket: &mut WebSocket,
    limit: std::time::Duration,
) -> Result<Option<String>, ReadError> {
    let read = async {
        loop {
            match socket.recv().await {
                Some(Ok(Message::Text(t))) => return Ok(Some(t.to_string())),
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                Some(Err(e)) if is_too_big(&e) => return Err(ReadError::TooBig),
                _ => return Ok(None),
            }
        }
    };
    tokio::time::timeout(limit, read)
        .await
        .unwrap_or(Err(ReadError::TimedOut))
}

/// Why [`next_text_within`] got no message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadError {
    /// Nothing came in time.
    TimedOut,
    /// The message was over the size limit.
    TooBig,
}

/// Prefect's in-band auth: `{"type": "auth", "token": …}` → `{"type": "auth_success"}`.
async fn authenticate(
    socket: &mut WebSocket,
    auth: Option<&InBandAuth>,
    limit: std::time::Duration,
) -> Result<(), (u16, String)> {
    let first = match next_text_within(socket, limit).await {
        Ok(Some(text)) => text,
        Ok(None) => return Err((1008, "Expected 'auth' message".into())),
        Err(ReadError::TimedOut) => {
            return Err((
                1008,
                format!("no 'auth' message within {} s", limit.as_secs_f64()),
            ));
        }
        Err(ReadError::TooBig) => return Err((1009, "message too big".into())),
    };
    let message: Value =
        serde_json::from_str(&first).map_err(|_| (1008, "Expected 'auth' message".to_owned()))?;
    if message.get("type").and_then(Value::as_str) != Some("auth") {
        return Err((1008, "Expected 'auth' message".into()));
    }
    if let Some(auth) = auth {
        match message.get("token").and_then(Value::as_str) {
            None if !auth.accepts(None) => {
                return Err((1008, "Auth required but no token provided".into()));
            }
            Some(token) if !auth.accepts(Some(token)) => {
                return Err((1008, "Invalid token".into()));
            }
            _ => {}
        }
    }
    socket
        .send(Message::Text(
            json!({"type": "auth_success"}).to_string().into(),
        ))
        .await
        .map_err(|_| (1011, "send failed".to_owned()))
}

/// Constant-time equality (for tokens).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn stream_events_in(mut socket: WebSocket, handshake: bool, state: HttpIngest) {
    if handshake {
        if let Err((code, reason)) =
            authenticate(&mut socket, state.auth.as_ref(), state.auth_timeout).await
        {
            if code == 1009 {
                too_big(&mut socket, "/api/events/in", MAX_WS_MESSAGE_BYTES).await;
                return;
            }
            debug!(code, reason, "websocket auth refused");
            close(socket, code, &reason).await;
            return;
        }
    } else if state.auth.as_ref().is_some_and(|a| !a.accepts(None)) {
        close(socket, 1002, "Authentication required").await;
        return;
    }
    let mut unconfirmed = Unconfirmed::default();
    // Read ahead: frames that are already here join one batch, each batch is handed to the
    // pipeline at once (its durability awaited later, in order), and reading goes on while
    // earlier batches are made durable. Only a ping waits: tungstenite sends the pong on the
    // next read, and that pong is the client's proof that everything before it is stored.
    let mut open = true;
    while open {
        let Some(first) = socket.recv().await else {
            break;
        };
        let mut batch: Vec<Event> = Vec::new();
        let mut must_confirm = false;
        let mut next = Some(first);
        while let Some(message) = next.take() {
            match read_frame(message, &state) {
                Frame::Event(event) => batch.push(*event),
                Frame::Skip => {}
                Frame::Ping => must_confirm = true,
                Frame::TooBig => {
                    // What came before the oversized message is stored (best effort: the
                    // socket closes either way, and the client re-sends what it had not
                    // seen confirmed).
                    let _ = unconfirmed.push(&state, std::mem::take(&mut batch)).await;
                    let _ = unconfirmed.confirm_all().await;
                    too_big(&mut socket, "/api/events/in", MAX_WS_MESSAGE_BYTES).await;
                    return;
                }
                Frame::End => {
                    open = false;
                    must_confirm = true;
                }
            }
            if must_confirm || batch.len() >= WS_BATCH_EVENTS {
                break;
            }
            // Only what is already buffered: never wait here for the client's next frame.
            next = socket.recv().now_or_never().flatten();
        }
        let stored = match unconfirmed.push(&state, batch).await {
            Ok(()) if must_confirm => unconfirmed.confirm_all().await,
            Ok(()) => unconfirmed.confirm_ready(WS_BATCHES_IN_FLIGHT).await,
            Err(e) => Err(e),
        };
        if let Err(e) = stored {
            warn!(error = %e, "events/in: could not store an event; closing so the client re-sends");
            close(socket, 1011, "could not store event").await;
            return;
        }
    }
}

/// Most events read ahead into one batch on `/api/events/in`.
const WS_BATCH_EVENTS: usize = 512;
/// Most batches of one socket handed to the pipeline and not yet confirmed durable.
const WS_BATCHES_IN_FLIGHT: usize = 8;

/// What one websocket message on `/api/events/in` is to the reader.
enum Frame {
    /// A valid event.
    Event(Box<Event>),
    /// Nothing to store (a refused frame, already counted and logged; a pong).
    Skip,
    /// A ping: everything before it must be durable before the next read answers it.
    Ping,
    /// A message over the size limit.
    TooBig,
    /// The socket closed or failed.
    End,
}

fn read_frame(message: Result<Message, axum::Error>, state: &HttpIngest) -> Frame {
    let text = match message {
        Ok(Message::Text(t)) => t.to_string(),
        Ok(Message::Binary(b)) => match String::from_utf8(b.to_vec()) {
            Ok(t) => t,
            Err(_) => {
                state.intake.count_rejected(1);
                warn!("events/in: refused a binary frame that is not UTF-8");
                return Frame::Skip;
            }
        },
        Err(e) if is_too_big(&e) => {
            state.intake.count_rejected(1);
            return Frame::TooBig;
        }
        Ok(Message::Close(_)) | Err(_) => return Frame::End,
        Ok(Message::Ping(_)) => return Frame::Ping,
        Ok(_) => return Frame::Skip,
    };
    match normalize_slice(text.as_bytes(), Utc::now(), state.intake.limits()) {
        Ok(event) => Frame::Event(Box::new(event)),
        Err(reason) => {
            state.intake.count_rejected(1);
            warn!(%reason, "events/in: refused a malformed event");
            Frame::Skip
        }
    }
}

/// What resolves once a batch handed to the pipeline is durable.
type Durable = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<crate::Receipt, SubmitError>> + Send>,
>;

/// Batches of one socket handed to the pipeline, oldest first, each with what resolves once
/// it is durable.
#[derive(Default)]
struct Unconfirmed {
    batches: std::collections::VecDeque<Durable>,
}

impl Unconfirmed {
    /// Hands `batch` to the pipeline (waiting for room, as every door does).
    async fn push(&mut self, state: &HttpIngest, batch: Vec<Event>) -> Result<(), SubmitError> {
        if batch.is_empty() {
            return Ok(());
        }
        let durable = state.intake.enqueue(batch).await?;
        self.batches.push_back(Box::pin(durable));
        Ok(())
    }

    /// Collects the batches already durable, and waits for the oldest ones while more than
    /// `limit` are in flight. The first failure is returned.
    async fn confirm_ready(&mut self, limit: usize) -> Result<(), SubmitError> {
        loop {
            let over = self.batches.len() > limit;
            let Some(oldest) = self.batches.front_mut() else {
                break;
            };
            let outcome = if over {
                Some(oldest.await)
            } else {
                oldest.now_or_never()
            };
            match outcome {
                Some(result) => {
                    self.batches.pop_front();
                    result?;
                }
                None => break,
            }
        }
        Ok(())
    }

    /// Waits until every batch handed over is durable.
    async fn confirm_all(&mut self) -> Result<(), SubmitError> {
        self.confirm_ready(0).await
    }
}
