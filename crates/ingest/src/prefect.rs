//! A Prefect server as an event source: its live stream, with the gaps filled.
//!
//! Spur subscribes to the server's `/events/out` websocket the way Prefect's own subscriber
//! does (subprotocol `prefect`, an `auth` message answered with `auth_success`, one `filter`
//! message, then `{"type":"event","event":{…}}` frames) and submits every event to the
//! [`Intake`] like any other source. The stream has no acknowledgements and the server drops
//! what a slow or absent subscriber misses, so each time the stream (re)connects — at start,
//! after a disconnect, after either side restarted — Spur first subscribes (buffering what
//! arrives live), then reads `POST /events/filter` (oldest first, following `next_page`) from
//! the last event it saw minus [`PrefectConfig::overlap`], then hands over the buffered live
//! events. Events are stored once by id (the store drops redeliveries), so the overlap costs
//! nothing but a few duplicates. A second fill pass runs [`PrefectConfig::settle`] after
//! going live: the server's persister makes events visible to `/events/filter` only in batches
//! (up to ~5 s late), so an event emitted just before the subscription started may be neither
//! in the first pass nor in the live stream.
//!
//! The live stream also drops events while connected: the server gives each subscriber a
//! queue of 256 events and discards what does not fit (`prefect.server.events.stream`,
//! `QueueFull`), so a burst of a few hundred events loses some without a word (measured:
//! about half of a 500-event burst, `scripts/bench_prefect_bridge.py`). So while live, every
//! [`PrefectConfig::reconcile_interval`] Spur reads `/events/filter` again, from
//! [`PrefectConfig::reconcile_lag`] before the previous pass began up to now, and submits what
//! it finds; the id index keeps each event once, so what the stream did deliver costs a
//! duplicate, and what it dropped arrives a few seconds late instead of never.
//!
//! "The last event seen" is the newest `occurred` (never later than the wall clock) among the
//! events made durable, kept through a [`Cursor`] (the daemon keeps it in its store), so a
//! restart of Spur resumes where it stopped. The first start ever reads from now minus the
//! overlap (and remembers the moment it subscribed, so a restart before any event arrives
//! still fills from there): history before Spur was pointed at the server is not replayed
//! into its triggers.
//! An event emitted with an `occurred` more than the overlap before the newest seen, while
//! Spur was not subscribed, is not recovered (Prefect's own subscriber has the same window).
//!
//! Failures (server down, refused auth, a broken stream) are logged, counted
//! ([`PrefectHealth`]: `/metrics` and the `/healthz` detail) and retried with a backoff from 1 s
//! up to [`PrefectConfig::backoff_max`]; Spur keeps running meanwhile.

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use futures_util::{FutureExt, SinkExt, StreamExt};
use serde_json::{Value, json};
use spur_core::Event;
use thiserror::Error;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tracing::{info, warn};

use crate::intake::{Intake, SubmitError, normalize};

/// How Spur reaches a Prefect server.
#[derive(Clone, Debug)]
pub struct PrefectConfig {
    /// The server's API URL, as Prefect clients take it: `http://127.0.0.1:4200/api`.
    pub api_url: String,
    /// The server's `PREFECT_SERVER_API_AUTH_STRING` (`user:pass`), sent as basic auth and as
    /// the websocket's `auth` token.
    pub auth_string: Option<String>,
    /// An API key (what Prefect clients send from `PREFECT_API_KEY`), sent as a bearer token.
    pub api_key: Option<String>,
    /// How far before the last event seen a gap fill starts.
    pub overlap: Duration,
    /// When the second fill pass runs after going live (see the module docs).
    pub settle: Duration,
    /// How often, while live, the server's events API is read again for what the live
    /// stream dropped (see the module docs).
    pub reconcile_interval: Duration,
    /// How far before the previous reconcile pass's start the next one reads: covers the
    /// server's persister being that late under load.
    pub reconcile_lag: Duration,
    /// How often the server's automations are read in full (a safety net: changes are
    /// noticed sooner by the probe).
    pub automations_interval: Duration,
    /// How often the server is asked, cheaply, whether its automations changed (their count
    /// and the most recently updated one); a change triggers a full read at once.
    pub automations_probe_interval: Duration,
    /// The longest wait between two attempts after failures.
    pub backoff_max: Duration,
    /// Timeout of one HTTP request and of the websocket handshake.
    pub request_timeout: Duration,
}

impl PrefectConfig {
    /// Defaults for `api_url`: 60 s overlap, settle pass after 6 s, a reconcile pass every
    /// 10 s reading from 20 s before the previous one began, automations probed every
    /// 500 ms and read in full every 15 s, backoff up to 30 s.
    pub fn new(api_url: impl Into<String>) -> PrefectConfig {
        PrefectConfig {
            api_url: api_url.into().trim_end_matches('/').to_owned(),
            auth_string: None,
            api_key: None,
            overlap: Duration::from_secs(60),
            settle: Duration::from_secs(6),
            reconcile_interval: Duration::from_secs(10),
            reconcile_lag: Duration::from_secs(20),
            automations_interval: Duration::from_secs(15),
            automations_probe_interval: Duration::from_millis(500),
            backoff_max: Duration::from_secs(30),
            request_timeout: Duration::from_secs(30),
        }
    }

    /// An HTTP client for this server.
    pub fn http_client(&self) -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(self.request_timeout)
            .build()
            .unwrap_or_default()
    }

    /// `request` with this server's credentials.
    pub fn authorize(&self, request: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        match self.authorization() {
            Some(value) => request.header("Authorization", value),
            None => request,
        }
    }

    /// The `Authorization` header value, if any. The auth string is encoded whole, as
    /// Prefect's client does and its server compares it (`reqwest`'s `basic_auth` would add
    /// a `:` to one without a password).
    fn authorization(&self) -> Option<String> {
        use base64::Engine as _;
        match (&self.auth_string, &self.api_key) {
            (Some(auth), _) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(auth)
            )),
            (None, Some(key)) => Some(format!("Bearer {key}")),
            (None, None) => None,
        }
    }

    /// The websocket URL of `path` (e.g. `/events/out`).
    fn ws_url(&self, path: &str) -> Result<String, BridgeError> {
        let url = format!("{}{path}", self.api_url);
        if let Some(rest) = url.strip_prefix("http://") {
            Ok(format!("ws://{rest}"))
        } else if url.starts_with("https://") {
            Err(BridgeError::Unsupported(
                "the event stream of an https:// Prefect API is not supported yet (use http:// on a trusted network, or a local proxy)".to_owned(),
            ))
        } else {
            Err(BridgeError::Unsupported(format!(
                "{} is not an http:// URL",
                self.api_url
            )))
        }
    }
}

/// Why talking to the Prefect server failed.
#[derive(Debug, Error)]
pub enum BridgeError {
    /// An HTTP request failed (no answer, or an error status).
    #[error("{0}")]
    Http(String),
    /// The websocket failed or closed.
    #[error("event stream: {0}")]
    Stream(String),
    /// The server refused the credentials.
    #[error("the server refused the credentials: {0}")]
    Auth(String),
    /// The server answered something this client does not understand.
    #[error("unexpected answer: {0}")]
    Protocol(String),
    /// The events could not be stored.
    #[error("{0}")]
    Submit(#[from] SubmitError),
    /// A setting this client cannot work with.
    #[error("{0}")]
    Unsupported(String),
}

impl From<reqwest::Error> for BridgeError {
    fn from(e: reqwest::Error) -> BridgeError {
        let mut text = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        BridgeError::Http(text)
    }
}

/// Where the last event seen is remembered between runs (the daemon keeps it in its store).
/// Called off the async threads.
pub trait Cursor: Send + Sync + std::fmt::Debug + 'static {
    /// The remembered position, if any.
    fn load(&self) -> Option<DateTime<Utc>>;
    /// Remembers `at` (durably, or the next start re-reads a little more).
    fn save(&self, at: DateTime<Utc>);
}

/// A [`Cursor`] that remembers nothing across runs (tests, or no store).
#[derive(Debug, Default)]
pub struct MemoryCursor(Mutex<Option<DateTime<Utc>>>);

impl Cursor for MemoryCursor {
    fn load(&self) -> Option<DateTime<Utc>> {
        self.0.lock().ok().and_then(|c| *c)
    }
    fn save(&self, at: DateTime<Utc>) {
        if let Ok(mut c) = self.0.lock() {
            *c = Some(at);
        }
    }
}

/// The bridge's state for `/healthz`, `/metrics` and the log: shared by the event source and
/// the automations sync.
#[derive(Debug, Default)]
pub struct PrefectHealth {
    /// The server's API URL (empty when no server is configured).
    pub api_url: Mutex<String>,
    /// Events received live from the stream.
    pub events_live: AtomicU64,
    /// Events read by gap fills (duplicates included).
    pub events_filled: AtomicU64,
    /// Events that were already stored (overlap, redelivery).
    pub duplicates: AtomicU64,
    /// Failed attempts of the event stream.
    pub stream_failures: AtomicU64,
    /// Failed reads of the server's automations.
    pub automation_failures: AtomicU64,
    /// The event stream is subscribed and live.
    pub live: AtomicBool,
    /// The last automations read succeeded.
    pub automations_ok: AtomicBool,
    /// Spur's own automation events posted to the server.
    pub events_posted: AtomicU64,
    /// Failed posts of them.
    pub post_failures: AtomicU64,
    detail: Mutex<(String, String, String)>,
}

impl PrefectHealth {
    /// Health for a bridge to `api_url`.
    pub fn new(api_url: &str) -> PrefectHealth {
        let health = PrefectHealth::default();
        if let Ok(mut url) = health.api_url.lock() {
            *url = api_url.to_owned();
        }
        health.set_stream("connecting");
        health.set_automations("not read yet");
        health.set_feed("nothing posted yet");
        health
    }

    /// Describes the feed of Spur's automation events to the server.
    pub fn set_feed(&self, text: impl Into<String>) {
        if let Ok(mut d) = self.detail.lock() {
            d.2 = text.into();
        }
    }

    /// Describes the event stream's state.
    pub fn set_stream(&self, text: impl Into<String>) {
        if let Ok(mut d) = self.detail.lock() {
            d.0 = text.into();
        }
    }

    /// Describes the automations sync's state.
    pub fn set_automations(&self, text: impl Into<String>) {
        if let Ok(mut d) = self.detail.lock() {
            d.1 = text.into();
        }
    }

    /// Lines for `/healthz`: `prefect URL events: …`, `… automations: …`, `… feed: …`.
    pub fn detail(&self) -> String {
        let url = self.api_url.lock().map(|u| u.clone()).unwrap_or_default();
        let (stream, automations, feed) = self.detail.lock().map(|d| d.clone()).unwrap_or_default();
        format!(
            "prefect {url} events: {stream}\nprefect {url} automations: {automations}\nprefect {url} feed: {feed}\n"
        )
    }

    /// The Prometheus lines.
    pub fn render_metrics(&self, out: &mut String) {
        use std::fmt::Write as _;
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mut counter = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        counter(
            "spur_prefect_events_live_total",
            "Events received from the Prefect server's live stream.",
            load(&self.events_live),
        );
        counter(
            "spur_prefect_events_filled_total",
            "Events read from the Prefect server by gap fills (duplicates included).",
            load(&self.events_filled),
        );
        counter(
            "spur_prefect_events_duplicate_total",
            "Events from the Prefect server that were already stored.",
            load(&self.duplicates),
        );
        counter(
            "spur_prefect_stream_failures_total",
            "Failed attempts of the Prefect server's event stream.",
            load(&self.stream_failures),
        );
        counter(
            "spur_prefect_automation_failures_total",
            "Failed reads of the Prefect server's automations.",
            load(&self.automation_failures),
        );
        counter(
            "spur_prefect_events_posted_total",
            "Spur's prefect.automation.* events posted to the Prefect server.",
            load(&self.events_posted),
        );
        counter(
            "spur_prefect_post_failures_total",
            "Failed posts of Spur's automation events to the Prefect server.",
            load(&self.post_failures),
        );
        let _ = writeln!(
            out,
            "# HELP spur_prefect_connected Whether the Prefect server's event stream is live (1) and its automations were read (1).\n# TYPE spur_prefect_connected gauge\nspur_prefect_connected{{part=\"events\"}} {}\nspur_prefect_connected{{part=\"automations\"}} {}",
            u8::from(self.live.load(Ordering::Relaxed)),
            u8::from(self.automations_ok.load(Ordering::Relaxed)),
        );
    }
}

/// Exponential backoff: 1 s, 2 s, 4 s, … up to a maximum.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    max: Duration,
}

impl Backoff {
    /// Starting at 1 s, capped at `max`.
    pub fn new(max: Duration) -> Backoff {
        Backoff {
            next: Duration::from_secs(1).min(max),
            max,
        }
    }

    /// The next wait (and doubles the one after).
    pub fn next_wait(&mut self) -> Duration {
        let wait = self.next;
        self.next = (self.next * 2).min(self.max);
        wait
    }

    /// Back to 1 s after a success.
    pub fn reset(&mut self) {
        self.next = Duration::from_secs(1).min(self.max);
    }
}

/// What ends the source.
enum Ended {
    Shutdown,
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Runs the source until `shutdown`: subscribe, fill the gap, stream; on failure, back off and
/// start over.
pub async fn run(
    config: PrefectConfig,
    intake: Intake,
    cursor: Arc<dyn Cursor>,
    health: Arc<PrefectHealth>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = config.http_client();
    let mut source = Source {
        last: {
            let cursor = cursor.clone();
            tokio::task::spawn_blocking(move || cursor.load())
                .await
                .ok()
                .flatten()
        },
        saved_at: Instant::now(),
        config,
        client,
        intake,
        cursor,
        health,
    };
    let mut backoff = Backoff::new(source.config.backoff_max);
    loop {
        if *shutdown.borrow() {
            break;
        }
        match source.session(&mut shutdown, &mut backoff).await {
            Ok(Ended::Shutdown) => break,
            Err(BridgeError::Submit(SubmitError::Closed)) => break,
            Err(e) => {
                source.health.live.store(false, Ordering::Relaxed);
                source
                    .health
                    .stream_failures
                    .fetch_add(1, Ordering::Relaxed);
                let wait = backoff.next_wait();
                warn!(api = %source.config.api_url, error = %e, retry_in_s = wait.as_secs_f64(), "Prefect event stream failed; retrying");
                source.health.set_stream(format!(
                    "down since {}: {e}; retrying every ≤{} s",
                    spur_core::time::format_timestamp(Utc::now()),
                    wait.as_secs()
                ));
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = shutdown.changed() => break,
                }
            }
        }
    }
    source.health.live.store(false, Ordering::Relaxed);
    source.save_cursor(true).await;
}

struct Source {
    config: PrefectConfig,
    client: reqwest::Client,
    intake: Intake,
    cursor: Arc<dyn Cursor>,
    health: Arc<PrefectHealth>,
    /// The newest `occurred` made durable (clamped to the wall clock).
    last: Option<DateTime<Utc>>,
    saved_at: Instant,
}

/// How long the stream may be silent (no frame, no pong) before it counts as broken.
const SILENCE: Duration = Duration::from_secs(45);
/// How often Spur pings a quiet stream.
const PING_EVERY: Duration = Duration::from_secs(15);

impl Source {
    async fn session(
        &mut self,
        shutdown: &mut watch::Receiver<bool>,
        backoff: &mut Backoff,
    ) -> Result<Ended, BridgeError> {
        let subscribed = Utc::now();
        let mut socket = self.subscribe().await?;
        let since = self.fill_start();
        let mut buffered: Vec<Value> = Vec::new();
        let mut last_frame = Instant::now();
        // First pass, reading the stream meanwhile so its backlog never fills.
        let filled = self
            .fill_while_streaming(&mut socket, since, &mut buffered, &mut last_frame)
            .await?;
        self.submit_live(std::mem::take(&mut buffered)).await?;
        if self.last.is_none() {
            // Nothing seen yet (the first start ever, a quiet server): the stream covers
            // everything from the subscription on, so a later restart fills from here.
            self.last = Some(subscribed);
            self.save_cursor(true).await;
        }
        info!(api = %self.config.api_url, since = %spur_core::time::format_timestamp(since), filled, "Prefect event stream live");
        self.health.live.store(true, Ordering::Relaxed);
        self.health.set_stream(format!(
            "live since {}",
            spur_core::time::format_timestamp(Utc::now())
        ));
        backoff.reset();
        let settle = tokio::time::sleep(self.config.settle);
        tokio::pin!(settle);
        let mut settled = false;
        let lag = TimeDelta::from_std(self.config.reconcile_lag).unwrap_or(TimeDelta::seconds(20));
        let mut reconciled_from = subscribed - lag;
        let mut reconcile = tokio::time::interval_at(
            tokio::time::Instant::now() + self.config.reconcile_interval,
            self.config.reconcile_interval,
        );
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ping = tokio::time::interval(PING_EVERY);
        ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                frame = socket.next() => {
                    last_frame = Instant::now();
                    let mut batch = Vec::new();
                    take_frame(frame, &mut batch)?;
                    // Whatever else is already here goes in the same submission.
                    while batch.len() < 512 {
                        match socket.next().now_or_never() {
                            Some(frame) => take_frame(frame, &mut batch)?,
                            None => break,
                        }
                    }
                    self.submit_live(batch).await?;
                }
                _ = &mut settle, if !settled => {
                    settled = true;
                    self.fill_while_streaming(&mut socket, since, &mut buffered, &mut last_frame).await?;
                    self.submit_live(std::mem::take(&mut buffered)).await?;
                }
                _ = reconcile.tick() => {
                    let started = Utc::now();
                    self.fill_while_streaming(&mut socket, reconciled_from.min(started - lag), &mut buffered, &mut last_frame).await?;
                    self.submit_live(std::mem::take(&mut buffered)).await?;
                    reconciled_from = started - lag;
                }
                _ = ping.tick() => {
                    if last_frame.elapsed() > SILENCE {
                        return Err(BridgeError::Stream(format!("silent for {} s", SILENCE.as_secs())));
                    }
                    socket.send(Message::Ping(Default::default())).await
                        .map_err(|e| BridgeError::Stream(e.to_string()))?;
                }
                _ = shutdown.changed() => {
                    let _ = socket.close(None).await;
                    return Ok(Ended::Shutdown);
                }
            }
        }
    }

    /// Where a fill starts: the last event seen minus the overlap, or now minus the overlap.
    fn fill_start(&self) -> DateTime<Utc> {
        let overlap = TimeDelta::from_std(self.config.overlap).unwrap_or(TimeDelta::seconds(60));
        self.last.unwrap_or_else(Utc::now) - overlap
    }

    /// Connects, authenticates and sends the filter (every event, no server backfill).
    async fn subscribe(&self) -> Result<Socket, BridgeError> {
        let url = self.config.ws_url("/events/out")?;
        let mut request = url
            .as_str()
            .into_client_request()
            .map_err(|e| BridgeError::Stream(e.to_string()))?;
        let headers = request.headers_mut();
        headers.insert(
            "Sec-WebSocket-Protocol",
            HeaderValue::from_static("prefect"),
        );
        if let Some(auth) = self.config.authorization() {
            let value = HeaderValue::from_str(&auth)
                .map_err(|_| BridgeError::Unsupported("credentials are not a header".into()))?;
            headers.insert("Authorization", value);
        }
        let timeout = self.config.request_timeout;
        let (mut socket, _) =
            tokio::time::timeout(timeout, tokio_tungstenite::connect_async(request))
                .await
                .map_err(|_| BridgeError::Stream(format!("no handshake within {timeout:?}")))?
                .map_err(|e| BridgeError::Stream(format!("cannot connect to {url}: {e}")))?;
        let token = self
            .config
            .auth_string
            .as_deref()
            .or(self.config.api_key.as_deref());
        send_json(&mut socket, &json!({"type": "auth", "token": token})).await?;
        let answer = tokio::time::timeout(timeout, next_json(&mut socket))
            .await
            .map_err(|_| BridgeError::Auth(format!("no answer to auth within {timeout:?}")))??;
        if answer["type"] != "auth_success" {
            return Err(BridgeError::Auth(
                answer["reason"].as_str().unwrap_or("refused").to_owned(),
            ));
        }
        let now = Utc::now();
        // Live events are matched against `occurred` too: a window wide enough for backdated
        // and future-dated events alike (the server's default `until` is now: nothing live).
        let filter = json!({
            "type": "filter",
            "filter": {"occurred": {
                "since": spur_core::time::format_timestamp(now - TimeDelta::days(365)),
                "until": spur_core::time::format_timestamp(now + TimeDelta::days(365)),
            }},
            "backfill": false,
        });
        send_json(&mut socket, &filter).await?;
        Ok(socket)
    }

    /// Reads `/events/filter` from `since` (oldest first, every page) and submits each page,
    /// while buffering what the stream delivers meanwhile. Returns the events read.
    async fn fill_while_streaming(
        &mut self,
        socket: &mut Socket,
        since: DateTime<Utc>,
        buffered: &mut Vec<Value>,
        last_frame: &mut Instant,
    ) -> Result<usize, BridgeError> {
        let (client, config) = (self.client.clone(), self.config.clone());
        let until = Utc::now() + TimeDelta::minutes(1);
        let (pages_tx, mut pages_rx) = tokio::sync::mpsc::channel::<Vec<Value>>(4);
        let reader = read_pages(client, config, since, until, pages_tx);
        tokio::pin!(reader);
        let mut read_done = false;
        let mut total = 0;
        loop {
            tokio::select! {
                result = &mut reader, if !read_done => {
                    result?;
                    read_done = true;
                }
                page = pages_rx.recv() => match page {
                    Some(page) => {
                        total += page.len();
                        self.health.events_filled.fetch_add(page.len() as u64, Ordering::Relaxed);
                        self.submit(page).await?;
                    }
                    None => return Ok(total),
                },
                frame = socket.next() => {
                    *last_frame = Instant::now();
                    take_frame(frame, buffered)?;
                }
            }
        }
    }

    /// Submits events from the live stream.
    async fn submit_live(&mut self, events: Vec<Value>) -> Result<(), BridgeError> {
        self.health
            .events_live
            .fetch_add(events.len() as u64, Ordering::Relaxed);
        self.submit(events).await
    }

    /// Normalizes, submits, waits for durability, then moves the cursor.
    async fn submit(&mut self, raw: Vec<Value>) -> Result<(), BridgeError> {
        if raw.is_empty() {
            return Ok(());
        }
        let now = Utc::now();
        let mut events: Vec<Event> = Vec::with_capacity(raw.len());
        for value in raw {
            match normalize(value, now, self.intake.limits()) {
                Ok(e) => events.push(e),
                Err(e) => {
                    self.intake.count_rejected(1);
                    warn!(api = %self.config.api_url, error = %e, "an event from the Prefect server was refused");
                }
            }
        }
        let newest = events.iter().map(|e| e.occurred.min(now)).max();
        let receipt = self.intake.submit(events).await?;
        self.health
            .duplicates
            .fetch_add(receipt.duplicates as u64, Ordering::Relaxed);
        if let Some(newest) = newest
            && self.last.is_none_or(|l| newest > l)
        {
            self.last = Some(newest);
        }
        self.save_cursor(false).await;
        Ok(())
    }

    /// Saves the cursor, at most once a second unless `now`.
    async fn save_cursor(&mut self, now: bool) {
        let Some(last) = self.last else { return };
        if !now && self.saved_at.elapsed() < Duration::from_secs(1) {
            return;
        }
        self.saved_at = Instant::now();
        let cursor = self.cursor.clone();
        let _ = tokio::task::spawn_blocking(move || cursor.save(last)).await;
    }
}

/// Every event the server has with `since <= occurred <= until`, oldest first, page by page.
async fn read_pages(
    client: reqwest::Client,
    config: PrefectConfig,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    pages: tokio::sync::mpsc::Sender<Vec<Value>>,
) -> Result<(), BridgeError> {
    let body = json!({
        "filter": {
            "occurred": {
                "since": spur_core::time::format_timestamp(since),
                "until": spur_core::time::format_timestamp(until),
            },
            "order": "ASC",
        },
        "limit": 50,
    });
    let first = config.authorize(
        client
            .post(format!("{}/events/filter", config.api_url))
            .json(&body),
    );
    let mut page = answer(first).await?;
    loop {
        let events = match page.get_mut("events").map(Value::take) {
            Some(Value::Array(events)) => events,
            _ => {
                return Err(BridgeError::Protocol(
                    "an event page without `events`".into(),
                ));
            }
        };
        if pages.send(events).await.is_err() {
            return Ok(());
        }
        let Some(next) = page["next_page"].as_str() else {
            return Ok(());
        };
        page = answer(config.authorize(client.get(next))).await?;
    }
}

/// Sends `request`; the JSON of a 2xx answer, else an error naming the status.
pub async fn answer(request: reqwest::RequestBuilder) -> Result<Value, BridgeError> {
    let response = request.send().await?;
    let status = response.status();
    let text = response.text().await?;
    if !status.is_success() {
        let mut text = text;
        text.truncate(300);
        return Err(BridgeError::Http(format!("HTTP {status}: {text}")));
    }
    serde_json::from_str(&text).map_err(|e| BridgeError::Protocol(e.to_string()))
}

/// Adds the event of one stream frame to `batch`; an error for a closed or broken stream.
fn take_frame(
    frame: Option<Result<Message, tokio_tungstenite::tungstenite::Error>>,
    batch: &mut Vec<Value>,
) -> Result<(), BridgeError> {
    match frame {
        Some(Ok(Message::Text(text))) => {
            match serde_json::from_str::<Value>(text.as_str()) {
                Ok(mut message) if message["type"] == "event" => {
                    batch.push(message["event"].take());
                }
                Ok(message) => {
                    warn!(kind = %message["type"], "unexpected message on the Prefect event stream")
                }
                Err(e) => warn!(error = %e, "a Prefect event stream message is not JSON"),
            }
            Ok(())
        }
        Some(Ok(Message::Close(frame))) => Err(BridgeError::Stream(match frame {
            Some(f) => format!("closed by the server ({}: {})", u16::from(f.code), f.reason),
            None => "closed by the server".to_owned(),
        })),
        Some(Ok(_)) => Ok(()),
        Some(Err(e)) => Err(BridgeError::Stream(e.to_string())),
        None => Err(BridgeError::Stream("ended".to_owned())),
    }
}

async fn send_json(socket: &mut Socket, value: &Value) -> Result<(), BridgeError> {
    socket
        .send(Message::text(value.to_string()))
        .await
        .map_err(|e| BridgeError::Stream(e.to_string()))
}

async fn next_json(socket: &mut Socket) -> Result<Value, BridgeError> {
    loop {
        match socket.next().await {
            Some(Ok(Message::Text(text))) => {
                return serde_json::from_str(text.as_str())
                    .map_err(|e| BridgeError::Protocol(e.to_string()));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(BridgeError::Auth(
                    frame.map_or_else(|| "closed".to_owned(), |f| f.reason.to_string()),
                ));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(BridgeError::Stream(e.to_string())),
            None => return Err(BridgeError::Stream("ended".to_owned())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_and_resets() {
        let mut b = Backoff::new(Duration::from_secs(5));
        let waits: Vec<u64> = (0..5).map(|_| b.next_wait().as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 5, 5]);
        b.reset();
        assert_eq!(b.next_wait().as_secs(), 1);
    }

    #[test]
    fn the_auth_string_is_sent_whole_and_a_key_as_a_bearer() {
        let mut c = PrefectConfig::new("http://x/api");
        assert_eq!(c.authorization(), None);
        c.api_key = Some("k".into());
        assert_eq!(c.authorization().as_deref(), Some("Bearer k"));
        c.auth_string = Some("admin".into());
        // base64("admin"): no trailing colon.
        assert_eq!(c.authorization().as_deref(), Some("Basic YWRtaW4="));
    }

    #[test]
    fn websocket_url_follows_the_api_url() {
        let c = PrefectConfig::new("http://127.0.0.1:4200/api/");
        assert_eq!(
            c.ws_url("/events/out").ok().as_deref(),
            Some("ws://127.0.0.1:4200/api/events/out")
        );
        assert!(PrefectConfig::new("https://x/api").ws_url("/e").is_err());
        assert!(PrefectConfig::new("ftp://x/api").ws_url("/e").is_err());
    }

    #[test]
    fn frames_become_events_or_errors() {
        let mut batch = Vec::new();
        let text = r#"{"type":"event","event":{"event":"a"}}"#;
        take_frame(Some(Ok(Message::text(text))), &mut batch).expect("an event frame");
        take_frame(Some(Ok(Message::text("not json"))), &mut batch).expect("skipped");
        assert_eq!(batch, vec![json!({"event": "a"})]);
        assert!(take_frame(None, &mut batch).is_err());
        assert!(take_frame(Some(Ok(Message::Close(None))), &mut batch).is_err());
    }
}
