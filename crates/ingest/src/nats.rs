//! NATS as an event source, durable by default.
//!
//! With JetStream (the default) Spur keeps a stream (`SPUR_EVENTS`) over the configured
//! subjects (default `events.>`) and reads it through a durable pull consumer. Messages are
//! taken in ready batches, made durable by the pipeline (event log + trigger state), and only
//! then acknowledged; a message that cannot be an event is terminated with a logged reason, so
//! it is never redelivered. Redeliveries after a crash are de-duplicated by event id; publishers
//! should set `Nats-Msg-Id` to the event id so JetStream drops duplicates on its side too.
//!
//! Without JetStream (`jetstream: false`) Spur subscribes with core NATS: fast but lossy if
//! Spur is down. Slow-consumer notices are logged and counted, never silently dropped.
//!
//! Lost connections and server restarts are survived: the client reconnects on its own, and
//! the consume loop re-attaches to the stream and consumer with a bounded backoff.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use chrono::Utc;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::intake::{Intake, normalize, normalize_slice};

/// NATS source settings.
#[derive(Clone, Debug)]
pub struct NatsConfig {
    /// Server URL, e.g. `nats://127.0.0.1:4222`.
    pub url: String,
    /// Subjects to consume.
    pub subjects: Vec<String>,
    /// Use a JetStream stream and durable consumer (at-least-once) instead of core NATS.
    pub jetstream: bool,
    /// JetStream stream name.
    pub stream: String,
    /// Durable consumer name.
    pub consumer: String,
    /// How long the stream keeps messages.
    pub max_age: Duration,
    /// Templates that turn arbitrary messages on matching subjects into events.
    pub templates: Vec<SubjectTemplate>,
    /// How the daemon authenticates to NATS and which TLS it trusts.
    pub auth: NatsAuth,
    /// Copies JetStream keeps of Spur's stream, checkpoint store and claims bucket: 1 on a
    /// single nats-server, 3 on a cluster (so a node's loss loses nothing acknowledged).
    /// Applies when Spur creates them; an existing stream keeps its own (a difference is
    /// logged).
    pub replicas: usize,
    /// The stream is the log (`--nats-log`): the other doors publish their events to the
    /// stream and answer once JetStream has them, instead of storing them here first and
    /// forwarding them (see [`StreamPublisher`]). JetStream only.
    pub stream_log: bool,
    /// When the durable consumer does not exist yet: begin after this stream sequence (a
    /// new cluster member that restored a checkpoint covering it) rather than at the start.
    pub start_after: Option<u64>,
}

/// NATS credentials and TLS, the way every NATS client takes them (user and password go in
/// the URL: `nats://user:pass@host:4222`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// A `.creds` file (JWT and nkey seed, what `nsc` makes).
    pub creds: Option<std::path::PathBuf>,
    /// A file holding an nkey seed (`SU…`).
    pub nkey: Option<std::path::PathBuf>,
    /// CA certificate(s) (PEM) that sign the server's certificate; turns TLS on.
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate and key (PEM) for servers that verify clients.
    pub tls_client: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Why the NATS connection could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum NatsConnectError {
    /// A credentials, nkey or TLS file is unusable (the message names it).
    #[error("{what} {}: {reason}", path.display())]
    File {
        /// Which setting.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        reason: String,
    },
    /// The client refused to connect.
    #[error(transparent)]
    Connect(#[from] async_nats::ConnectError),
}

impl NatsConnectError {
    /// Is the server just not reachable (yet): no answer, a refused or timed-out TCP
    /// connection, a name that does not resolve? Refused credentials and TLS failures are not.
    pub fn is_unreachable(&self) -> bool {
        use async_nats::ConnectErrorKind as Kind;
        matches!(self, NatsConnectError::Connect(e)
            if matches!(e.kind(), Kind::Io | Kind::TimedOut | Kind::Dns))
    }
}

/// A template for messages that are not events: for subjects matching `subject` (NATS
/// wildcards: `*` one token, `>` the rest), the template renders the event JSON from
/// `subject`, `headers` and `body` (parsed JSON when it parses, else the text) — the same
/// way webhook templates do. The first matching template wins.
#[derive(Clone, Debug)]
pub struct SubjectTemplate {
    /// Subject pattern.
    pub subject: String,
    /// Jinja template producing an event (JSON).
    pub template: String,
}

/// NATS subject matching: `*` matches one token, `>` one or more trailing tokens.
pub fn subject_matches(pattern: &str, subject: &str) -> bool {
    let mut p = pattern.split('.');
    let mut s = subject.split('.');
    loop {
        match (p.next(), s.next()) {
            (Some(">"), Some(_)) => return true,
            (Some("*"), Some(_)) => {}
            (Some(a), Some(b)) if a == b => {}
            (None, None) => return true,
            _ => return false,
        }
    }
}

impl NatsConfig {
    /// Defaults for `url`: subjects `events.>`, JetStream on, stream `SPUR_EVENTS`.
    pub fn new(url: impl Into<String>) -> NatsConfig {
        NatsConfig {
            url: url.into(),
            subjects: vec!["events.>".to_owned()],
            jetstream: true,
            stream: "SPUR_EVENTS".to_owned(),
            consumer: "spur".to_owned(),
            max_age: Duration::from_secs(7 * 24 * 3600),
            templates: Vec::new(),
            auth: NatsAuth::default(),
            replicas: 1,
            stream_log: false,
            start_after: None,
        }
    }
}

/// What the NATS source shares with the rest of the daemon: counters for `/metrics`, and
/// which events JetStream redelivered.
#[derive(Debug, Default)]
pub struct NatsCounters {
    /// Events from NATS made durable (new or duplicate), before acknowledgement.
    pub delivered: AtomicU64,
    /// Messages JetStream delivered more than once.
    pub redelivered: AtomicU64,
    /// The ids of recently redelivered events (see [`Redeliveries`]).
    pub redeliveries: Redeliveries,
    /// Messages terminated as malformed.
    pub terminated: AtomicU64,
    /// Slow-consumer notices from the client.
    pub slow_consumer: AtomicU64,
    /// Times the consume loop re-attached after an error.
    pub reattached: AtomicU64,
    /// Events received by other doors (HTTP, websocket, webhooks) published to the stream.
    pub forwarded: AtomicU64,
    /// Events that could not be forwarded (publish failed, or the queue was full).
    pub forward_failed: AtomicU64,
}

/// The header on messages Spur publishes itself for events it received by another door (see
/// [`Forwarder`]); its value is the publishing instance's name.
pub const FORWARDED_HEADER: &str = "Spur-Forwarded";

/// True if a message carries [`FORWARDED_HEADER`].
fn is_forwarded(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(FORWARDED_HEADER).is_some())
}

/// The header on messages a Spur door published with the stream as the log (see
/// [`StreamPublisher`]); its value is the door's instance name. Such a message is a Prefect
/// event as Spur accepted it: no subject template applies, and no instance has seen it.
pub const PUBLISHED_HEADER: &str = "Spur-Published";

/// True if a message carries [`PUBLISHED_HEADER`].
fn is_published_by_spur(headers: Option<&async_nats::HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(PUBLISHED_HEADER).is_some())
}

/// The doors' events into the stream, first (`--nats-log`): the stream is the log.
///
/// An event that arrives over HTTP, the websocket or a webhook is published to
/// `<prefix>.<event name>` with `Nats-Msg-Id` = its id and the caller is answered once
/// JetStream has acknowledged it; nothing is written locally on the way in. Spur's own
/// consumer then reads it like any NATS event, stores it and evaluates it in stream order,
/// so every event costs one write to JetStream and one to the local store (an index, as
/// the stream holds them all), and the "stored here, forwarded later" gap of
/// [`Forwarder`] is gone. A publish JetStream refuses or cannot take is an error to the
/// caller ([`crate::SubmitError::Unavailable`]: HTTP 503), never an event accepted and lost.
#[derive(Clone, Debug)]
pub struct StreamPublisher {
    js: jetstream::Context,
    prefix: String,
    instance: String,
}

impl StreamPublisher {
    /// A publisher through `client`, or `None` when no consumed subject has the form
    /// `prefix.>` (a published event would land on no subject the stream stores).
    pub fn new(
        client: async_nats::Client,
        config: &NatsConfig,
        instance: String,
    ) -> Option<StreamPublisher> {
        let prefix = config.subjects.iter().find_map(|s| {
            s.strip_suffix(".>")
                .filter(|p| !p.is_empty() && !p.contains(['*', '>']))
        })?;
        Some(StreamPublisher {
            js: jetstream::new(client),
            prefix: prefix.to_owned(),
            instance,
        })
    }
}

impl crate::intake::Publish for StreamPublisher {
    fn publish(&self, events: Vec<spur_core::Event>) -> crate::intake::Published {
        let this = self.clone();
        Box::pin(async move {
            use crate::SubmitError::Unavailable;
            let unavailable = |e: &dyn std::fmt::Display| Unavailable(e.to_string());
            // Every publish is sent before any acknowledgement is awaited: one round trip
            // for the batch, not one per event.
            let mut acks = Vec::with_capacity(events.len());
            for event in &events {
                let mut headers = async_nats::HeaderMap::new();
                headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
                headers.insert(PUBLISHED_HEADER, this.instance.as_str());
                let body = event.to_json_bytes().map_err(|e| unavailable(&e))?;
                let subject = subject_for(&this.prefix, &event.event);
                let ack = this
                    .js
                    .publish_with_headers(subject, headers, body.into())
                    .await
                    .map_err(|e| unavailable(&e))?;
                acks.push(ack);
            }
            let mut receipt = crate::Receipt::default();
            for ack in acks {
                let ack = ack.await.map_err(|e| unavailable(&e))?;
                if ack.duplicate {
                    receipt.duplicates += 1;
                } else {
                    receipt.accepted += 1;
                }
            }
            Ok(receipt)
        })
    }
}

/// Puts events that arrived over HTTP, the Prefect websocket or webhooks into the JetStream
/// stream as well, so the stream holds every event Spur received: for other consumers of
/// the stream, and for an instance that takes over from this one.
///
/// An event is forwarded after it is durable in the local log, on `<prefix>.<event name>`
/// (the prefix of the first consumed subject of the form `prefix.>`), with `Nats-Msg-Id` =
/// its id and [`FORWARDED_HEADER`]. This instance's own consumer gets it back and keeps it
/// once (by id). Another instance may see it first there, so a forwarded event counts as
/// "possibly processed elsewhere", like a redelivered one: its firings are claimed in the
/// shared KV bucket before their actions run ([`Forwarder::note`] does that here, the
/// consumer on the other side). Forwarding never holds up the caller: a full queue or a
/// failed publish is counted (`spur_nats_forward_failed_total`) and logged, and the event
/// stays in the local log.
#[derive(Clone, Debug)]
pub struct Forwarder {
    tx: tokio::sync::mpsc::Sender<Vec<spur_core::Event>>,
    counters: Arc<NatsCounters>,
}

impl Forwarder {
    /// How many submissions may wait to be published.
    const QUEUE: usize = 1024;
    /// Publishes awaiting JetStream's acknowledgement at once.
    const IN_FLIGHT: usize = 256;

    /// Starts forwarding through `client`, or `None` when no consumed subject has the form
    /// `prefix.>` (a forwarded event would land on no subject the stream stores).
    pub fn start(
        client: async_nats::Client,
        config: &NatsConfig,
        instance: String,
        counters: Arc<NatsCounters>,
    ) -> Option<Forwarder> {
        let prefix = config.subjects.iter().find_map(|s| {
            s.strip_suffix(".>")
                .filter(|p| !p.is_empty() && !p.contains(['*', '>']))
        })?;
        let (tx, rx) = tokio::sync::mpsc::channel(Self::QUEUE);
        tokio::spawn(forward(
            jetstream::new(client),
            prefix.to_owned(),
            instance,
            rx,
            counters.clone(),
        ));
        Some(Forwarder { tx, counters })
    }
}

impl crate::intake::Forward for Forwarder {
    /// Before `events` are submitted: they may be processed by another instance too, so
    /// their firings are claimed (see [`Redeliveries`]).
    fn note(&self, events: &[spur_core::Event]) {
        self.counters.redeliveries.note(events.iter().map(|e| e.id));
    }

    /// Once `events` are durable: queue them for the stream.
    fn forward(&self, events: Vec<spur_core::Event>) {
        let count = events.len() as u64;
        if self.tx.try_send(events).is_err() {
            self.counters
                .forward_failed
                .fetch_add(count, Ordering::Relaxed);
            warn!(
                events = count,
                "cannot forward events to JetStream: the queue is full (they are in the local log)"
            );
        }
    }
}

/// The forwarding task: publishes what [`Forwarder::forward`] queues, a window of
/// publishes at a time, until every [`Forwarder`] is gone.
async fn forward(
    js: jetstream::Context,
    prefix: String,
    instance: String,
    mut rx: tokio::sync::mpsc::Receiver<Vec<spur_core::Event>>,
    counters: Arc<NatsCounters>,
) {
    while let Some(first) = rx.recv().await {
        let mut events = first;
        while events.len() < Forwarder::IN_FLIGHT
            && let Ok(more) = rx.try_recv()
        {
            events.extend(more);
        }
        let mut acks = Vec::with_capacity(events.len());
        for event in &events {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
            headers.insert(FORWARDED_HEADER, instance.as_str());
            let published = match event.to_json_bytes() {
                Ok(body) => js
                    .publish_with_headers(subject_for(&prefix, &event.event), headers, body.into())
                    .await
                    .map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            acks.push((event.id, published));
        }
        for (id, published) in acks {
            let acked = match published {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(e) => Err(e),
            };
            match acked {
                Ok(()) => counters.forwarded.fetch_add(1, Ordering::Relaxed),
                Err(e) => {
                    warn!(event = %id, error = %e, "cannot forward an event to JetStream (it is in the local log)");
                    counters.forward_failed.fetch_add(1, Ordering::Relaxed)
                }
            };
        }
    }
}

/// Event ids that JetStream delivered more than once in the last [`Redeliveries::KEEP`].
///
/// Only a redelivered event can have been processed by another instance (one that stopped
/// before acknowledging it), or a forwarded one (see [`Forwarder`]): an event JetStream
/// hands over for the first time was seen by no one else, so neither were the firings it
/// causes. Forwarded events are noted here too. The executor claims firings in the shared
/// KV bucket only for redelivered events (and for firings no event caused, like proactive
/// ones), which keeps the claims exact at a fraction of the cost of claiming every firing.
#[derive(Debug, Default)]
pub struct Redeliveries {
    ids: std::sync::Mutex<RedeliveredIds>,
}

#[derive(Debug, Default)]
struct RedeliveredIds {
    seen: std::collections::HashMap<uuid::Uuid, std::time::Instant>,
    /// Size at which old entries are dropped next (doubles while all entries are recent).
    prune_at: usize,
}

impl Redeliveries {
    /// How long a redelivered id is remembered: far longer than a firing takes to dispatch.
    pub const KEEP: Duration = Duration::from_secs(15 * 60);

    /// Remembers redelivered event ids.
    pub fn note(&self, ids: impl IntoIterator<Item = uuid::Uuid>) {
        let Ok(mut state) = self.ids.lock() else {
            return;
        };
        let now = std::time::Instant::now();
        for id in ids {
            state.seen.insert(id, now);
        }
        if state.seen.len() > state.prune_at.max(10_000) {
            state
                .seen
                .retain(|_, at| now.duration_since(*at) < Self::KEEP);
            state.prune_at = state.seen.len() * 2;
        }
    }

    /// True if `id` was redelivered recently. (If the lock is poisoned: true, so firings
    /// are claimed rather than possibly repeated.)
    pub fn contains(&self, id: &uuid::Uuid) -> bool {
        self.ids
            .lock()
            .map_or(true, |state| state.seen.contains_key(id))
    }
}

/// Connects with reconnects enabled and events logged.
pub async fn connect(
    url: &str,
    counters: Arc<NatsCounters>,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    base_options(counters)
        .retry_on_initial_connect()
        .connect(servers(url))
        .await
}

/// The servers of a URL setting: one URL, or several separated by commas
/// (`nats://n1:4222,nats://n2:4222,nats://n3:4222`: the client picks one and fails over).
pub fn servers(url: &str) -> Vec<&str> {
    url.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect()
}

/// Checks the files of `auth` (readable, an nkey seed where one is expected) and turns them
/// into connect options.
pub async fn auth_options(
    auth: &NatsAuth,
    mut options: async_nats::ConnectOptions,
) -> Result<async_nats::ConnectOptions, NatsConnectError> {
    let file = |what: &'static str, path: &std::path::Path| NatsConnectError::File {
        what,
        path: path.to_owned(),
        reason: String::new(),
    };
    let with = |e: NatsConnectError, reason: String| match e {
        NatsConnectError::File { what, path, .. } => NatsConnectError::File { what, path, reason },
        other => other,
    };
    if let Some(path) = &auth.creds {
        options = options
            .credentials_file(path)
            .await
            .map_err(|e| with(file("NATS credentials file", path), e.to_string()))?;
    }
    if let Some(path) = &auth.nkey {
        let seed = std::fs::read_to_string(path)
            .map_err(|e| with(file("NATS nkey seed file", path), e.to_string()))?;
        let seed = seed
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with('S'))
            .ok_or_else(|| {
                with(
                    file("NATS nkey seed file", path),
                    "holds no nkey seed (a line starting with S)".to_owned(),
                )
            })?
            .to_owned();
        options = options.nkey(seed);
    }
    for (what, path) in
        auth.tls_ca
            .iter()
            .map(|p| ("NATS TLS CA", p))
            .chain(auth.tls_client.iter().flat_map(|(c, k)| {
                [
                    ("NATS TLS client certificate", c),
                    ("NATS TLS client key", k),
                ]
            }))
    {
        std::fs::metadata(path).map_err(|e| with(file(what, path), e.to_string()))?;
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &auth.tls_client {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    Ok(options)
}

/// Connects with `auth`'s credentials and TLS, reconnects enabled and events logged.
pub async fn connect_with(
    url: &str,
    auth: &NatsAuth,
    counters: Arc<NatsCounters>,
) -> Result<async_nats::Client, NatsConnectError> {
    let options = auth_options(auth, base_options(counters)).await?;
    Ok(options
        .retry_on_initial_connect()
        .connect(servers(url))
        .await?)
}

/// Connects with `auth`'s credentials and TLS for a command line: the first connection is
/// tried once (within the client's connect timeout), so refused credentials, a failed TLS
/// handshake or an unreachable server are an error at once rather than retries in the
/// background; later disconnects reconnect as usual.
pub async fn connect_once(
    url: &str,
    auth: &NatsAuth,
    counters: Arc<NatsCounters>,
) -> Result<async_nats::Client, NatsConnectError> {
    let options = auth_options(auth, base_options(counters)).await?;
    Ok(options.connect(servers(url)).await?)
}

fn base_options(counters: Arc<NatsCounters>) -> async_nats::ConnectOptions {
    async_nats::ConnectOptions::new()
        .name("spur")
        .event_callback(move |event| {
            let counters = counters.clone();
            async move {
                match event {
                    async_nats::Event::SlowConsumer(sid) => {
                        counters.slow_consumer.fetch_add(1, Ordering::Relaxed);
                        warn!(
                            subscription = sid,
                            "NATS slow consumer: the server is dropping messages for Spur"
                        );
                    }
                    async_nats::Event::Connected => info!("NATS connected"),
                    other => warn!(event = %other, "NATS connection event"),
                }
            }
        })
}

/// Runs the source until `shutdown` turns true.
///
/// With `covered` (shared state in JetStream), a message is acknowledged only once the
/// checkpoint stored in JetStream covers the log position its event was written at.
pub async fn run(
    config: NatsConfig,
    intake: Intake,
    counters: Arc<NatsCounters>,
    covered: Option<watch::Receiver<u64>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let client = match connect_with(&config.url, &config.auth, counters.clone()).await {
        Ok(c) => c,
        Err(e) => {
            warn!(error = %e, url = %config.url, "cannot connect to NATS");
            return;
        }
    };
    let mut backoff = Duration::from_millis(100);
    loop {
        // The consume loop watches `shutdown` itself: it stops pulling, then acknowledges
        // what the pipeline already made durable before returning.
        let result = consume(
            &client,
            &config,
            &intake,
            &counters,
            covered.clone(),
            shutdown.clone(),
        )
        .await;
        if *shutdown.borrow() {
            return;
        }
        if let Err(e) = result {
            counters.reattached.fetch_add(1, Ordering::Relaxed);
            warn!(error = %e, retry_in_ms = backoff.as_millis() as u64, "NATS consume loop interrupted; re-attaching");
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = shutdown.changed() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Batches that may await durability at once per consumer.
const MAX_BATCHES_IN_FLIGHT: usize = 32;

async fn consume(
    client: &async_nats::Client,
    config: &NatsConfig,
    intake: &Intake,
    counters: &NatsCounters,
    mut covered: Option<watch::Receiver<u64>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BoxError> {
    if *shutdown.borrow() {
        return Ok(());
    }
    let engine = spur_template::TemplateEngine::new();
    if !config.jetstream {
        let mut subscriptions = futures_util::stream::SelectAll::new();
        for subject in &config.subjects {
            subscriptions.push(client.subscribe(subject.clone()).await?);
        }
        let mut batches = subscriptions.ready_chunks(512);
        loop {
            let batch = tokio::select! {
                batch = batches.next() => batch,
                _ = shutdown.changed() => return Ok(()),
            };
            let Some(batch) = batch else { break };
            let events = batch
                .iter()
                .filter_map(|m| parse(&m.subject, m.headers.as_ref(), &m.payload, intake, &config.templates, &engine).map_err(|reason| {
                    counters.terminated.fetch_add(1, Ordering::Relaxed);
                    warn!(subject = %m.subject, %reason, "NATS: dropped a message that is not an event");
                }).ok())
                .collect::<Vec<_>>();
            let count = events.len() as u64;
            intake.submit(events).await?;
            counters.delivered.fetch_add(count, Ordering::Relaxed);
        }
        return Err("NATS subscription ended".into());
    }
    let js = jetstream::new(client.clone());
    let mut stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: config.stream.clone(),
            subjects: config.subjects.clone(),
            max_age: config.max_age,
            duplicate_window: Duration::from_secs(120),
            num_replicas: config.replicas,
            ..Default::default()
        })
        .await?;
    let kept = stream.info().await?.config.num_replicas;
    if kept != config.replicas {
        warn!(
            stream = %config.stream,
            replicas = kept,
            wanted = config.replicas,
            "the JetStream stream exists with another replica count; it keeps its own (change it with `nats stream edit`)"
        );
    }
    let mut consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            &config.consumer,
            jetstream::consumer::pull::Config {
                durable_name: Some(config.consumer.clone()),
                // One acknowledgement per durable batch acknowledges every message before it
                // (the batches become durable in stream order, see below).
                ack_policy: jetstream::consumer::AckPolicy::All,
                ack_wait: Duration::from_secs(30),
                // Acknowledgements wait for durability (and, with shared state, for a stored
                // checkpoint, up to about a second under load): room for ~100 k events/s.
                max_ack_pending: 200_000,
                deliver_policy: match config.start_after {
                    Some(seq) => jetstream::consumer::DeliverPolicy::ByStartSequence {
                        start_sequence: seq + 1,
                    },
                    None => jetstream::consumer::DeliverPolicy::All,
                },
                ..Default::default()
            },
        )
        .await?;
    // A consumer created by an older Spur keeps its policy: then every message is acknowledged.
    let acks = match consumer.info().await?.config.ack_policy {
        jetstream::consumer::AckPolicy::All => Acks::LastOfBatch,
        _ => Acks::EachMessage,
    };
    info!(stream = %config.stream, consumer = %config.consumer, subjects = ?config.subjects, ?acks, "consuming NATS JetStream");
    let messages = consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await?;
    let mut batches = messages.ready_chunks(1000);
    // Several batches may wait for durability at once: the pipeline commits everything queued
    // in one transaction (group commit). Batches are handed over in stream order and the
    // pipeline keeps that order, so they become durable, and are acknowledged, in order.
    let mut in_flight = futures_util::stream::FuturesOrdered::new();
    let mut held: std::collections::VecDeque<HeldBatch> = Default::default();
    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let done: Result<HeldBatch, BoxError> = done;
                held.push_back(done?);
                ack_covered(&mut held, covered.as_ref().map(|c| *c.borrow()), acks).await?;
            }
            changed = async {
                match covered.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            }, if !held.is_empty() => {
                if changed {
                    ack_covered(&mut held, covered.as_ref().map(|c| *c.borrow()), acks).await?;
                }
            }
            batch = batches.next(), if in_flight.len() < MAX_BATCHES_IN_FLIGHT => {
                let Some(batch) = batch else { break };
                let count = batch.len();
                // With `Acks::LastOfBatch` only the batch's last message is acknowledged: the
                // others are dropped here, while still in cache, instead of being held until
                // a checkpoint covers them.
                let mut handled = Vec::with_capacity(match acks {
                    Acks::EachMessage => batch.len(),
                    Acks::LastOfBatch => 1,
                });
                let keep = |handled: &mut Vec<jetstream::Message>, message| {
                    if let Acks::LastOfBatch = acks {
                        handled.clear();
                    }
                    handled.push(message);
                };
                let mut events = Vec::with_capacity(batch.len());
                let mut redelivered = Vec::new();
                let mut elsewhere = Vec::new();
                let mut last_stream_seq = None;
                for message in batch {
                    let message = message?;
                    let info = message.info().ok();
                    if let Some(info) = &info {
                        last_stream_seq = Some(info.stream_sequence);
                    }
                    match parse(&message.subject, message.headers.as_ref(), &message.payload, intake, &config.templates, &engine) {
                        Ok(mut event) => {
                            // Evaluated at the stream's timestamp, not at when this instance
                            // read it: every instance (and a replay elsewhere) reading the
                            // stream evaluates the same event at the same time.
                            if let Some(at) = info.as_ref().map(|i| stream_time(i.published)) {
                                event.received = at;
                            }
                            if info.as_ref().is_some_and(|info| info.delivered > 1) {
                                redelivered.push(event.id);
                            } else if is_forwarded(message.headers.as_ref()) {
                                // Another instance received it first (see `Forwarder`).
                                elsewhere.push(event.id);
                            }
                            events.push(event);
                            keep(&mut handled, message);
                        }
                        Err(reason) => {
                            counters.terminated.fetch_add(1, Ordering::Relaxed);
                            warn!(subject = %message.subject, %reason, "NATS: terminated a message that is not an event");
                            match acks {
                                // Never redelivered: it is done with, like the events beside it.
                                Acks::EachMessage => message.ack_with(AckKind::Term).await?,
                                // A `+TERM` would acknowledge the messages before it, which may
                                // not be durable yet: the batch's own acknowledgement covers it.
                                Acks::LastOfBatch => keep(&mut handled, message),
                            }
                        }
                    }
                }
                let good = events.len() as u64;
                if !redelivered.is_empty() {
                    counters.redelivered.fetch_add(redelivered.len() as u64, Ordering::Relaxed);
                }
                if !redelivered.is_empty() || !elsewhere.is_empty() {
                    // Noted before the pipeline sees them, so before any firing they cause.
                    counters.redeliveries.note(redelivered.into_iter().chain(elsewhere));
                }
                // Handed over now, in stream order; durable when `durable` resolves.
                let durable = intake.enqueue_at(events, last_stream_seq).await?;
                let delivered = &counters.delivered;
                in_flight.push_back(async move {
                    // Durable first (log + trigger state), then acknowledge (see ack_covered).
                    let receipt = durable.await?;
                    delivered.fetch_add(good, Ordering::Relaxed);
                    Ok(HeldBatch { seq: receipt.last_seq, count, messages: handled })
                });
            }
        }
    }
    // Stopping (or the stream ended): finish the batches already submitted, then acknowledge
    // them once a stored checkpoint covers them (bounded: the pipeline checkpoints within its
    // interval; what stays unacknowledged is redelivered, never lost).
    while let Some(done) = in_flight.next().await {
        let done: Result<HeldBatch, BoxError> = done;
        held.push_back(done?);
    }
    let deadline = tokio::time::Instant::now() + ACK_DRAIN_LIMIT;
    while let Some(covered) = covered.as_mut() {
        let position = *covered.borrow();
        ack_covered(&mut held, Some(position), acks).await?;
        if held.is_empty() {
            break;
        }
        match tokio::time::timeout_at(deadline, covered.changed()).await {
            Ok(Ok(())) => {}
            _ => {
                warn!(
                    unacknowledged = held.iter().map(|batch| batch.count).sum::<usize>(),
                    "no stored checkpoint covers the last events yet; JetStream will redeliver them"
                );
                return Ok(());
            }
        }
    }
    ack_covered(&mut held, None, acks).await?;
    if *shutdown.borrow() {
        return Ok(());
    }
    Err("JetStream consumer stream ended".into())
}

/// A JetStream message's stream timestamp as the engine's time, to the microsecond (like
/// every other timestamp Spur stores).
fn stream_time(published: chrono::DateTime<Utc>) -> chrono::DateTime<Utc> {
    chrono::SubsecRound::trunc_subsecs(published, 6)
}

/// A durable batch waiting for its acknowledgement.
struct HeldBatch {
    /// The log sequence of its last event.
    seq: u64,
    /// How many messages it stands for.
    count: usize,
    /// What to acknowledge: every message, or only the last (see [`Acks`]).
    messages: Vec<jetstream::Message>,
}

/// How a durable batch is acknowledged.
#[derive(Clone, Copy, Debug)]
enum Acks {
    /// `AckPolicy::All`: acknowledging a batch's last message acknowledges everything up to
    /// it — one acknowledgement per batch instead of one per message.
    LastOfBatch,
    /// `AckPolicy::Explicit` (a consumer made by an older Spur): every message.
    EachMessage,
}

/// How long a stopping consumer waits for a checkpoint to cover what it still holds.
const ACK_DRAIN_LIMIT: Duration = Duration::from_secs(15);

/// Acknowledges held batches, oldest first, whose log position the stored checkpoint covers
/// (all of them when there is no shared checkpoint: the local log and checkpoint make them
/// durable). Stops at the first batch not covered, so nothing after it is acknowledged.
async fn ack_covered(
    held: &mut std::collections::VecDeque<HeldBatch>,
    covered: Option<u64>,
    acks: Acks,
) -> Result<(), BoxError> {
    let mut last = None;
    while let Some(batch) = held.front() {
        if covered.is_some_and(|c| batch.seq > c) {
            break;
        }
        if let Some(HeldBatch { mut messages, .. }) = held.pop_front() {
            match acks {
                Acks::EachMessage => {
                    for message in messages {
                        message.ack().await?;
                    }
                }
                Acks::LastOfBatch => last = messages.pop().or(last),
            }
        }
    }
    if let Some(message) = last {
        message.ack().await?;
    }
    Ok(())
}

/// One NATS message as an event: a subject template if one matches, else a binary-mode
/// CloudEvent (`ce-*` headers), else a JSON Prefect event or structured CloudEvent.
fn parse(
    subject: &str,
    headers: Option<&async_nats::HeaderMap>,
    payload: &[u8],
    intake: &Intake,
    templates: &[SubjectTemplate],
    engine: &spur_template::TemplateEngine,
) -> Result<spur_core::Event, String> {
    let now = Utc::now();
    let header_pairs: Vec<(String, String)> = headers
        .map(|h| {
            h.iter()
                .flat_map(|(k, values)| values.iter().map(move |v| (k.to_string(), v.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let result = if is_forwarded(headers) || is_published_by_spur(headers) {
        // Spur's own publish of a Prefect event (see `Forwarder`, `StreamPublisher`): no
        // template applies.
        normalize_slice(payload, now, intake.limits())
    } else if let Some(t) = templates
        .iter()
        .find(|t| subject_matches(&t.subject, subject))
    {
        render_template(t, subject, &header_pairs, payload, engine)
            .and_then(|value| normalize(value, now, intake.limits()).map_err(|e| e.to_string()))
    } else if let Some(ce) =
        crate::cloudevents::from_binary(&header_pairs, payload, now, intake.limits())
    {
        ce.map_err(|e| e.to_string())
    } else {
        normalize_slice(payload, now, intake.limits())
    };
    result.inspect_err(|_| intake.count_rejected(1))
}

fn render_template(
    t: &SubjectTemplate,
    subject: &str,
    headers: &[(String, String)],
    payload: &[u8],
    engine: &spur_template::TemplateEngine,
) -> Result<Value, String> {
    let body = serde_json::from_slice::<Value>(payload)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(payload).into_owned()));
    let headers: serde_json::Map<String, Value> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), Value::String(v.clone())))
        .collect();
    let context = spur_template::json_context(&serde_json::json!({
        "subject": subject,
        "headers": headers,
        "body": body,
    }));
    let text = engine
        .render(&t.template, &context)
        .map_err(|e| format!("subject template for {:?}: {e}", t.subject))?;
    serde_json::from_str(&text).map_err(|e| {
        format!(
            "subject template for {:?} did not render JSON: {e}",
            t.subject
        )
    })
}

/// The subject an event is published on: `<prefix>.<event name>` with characters NATS
/// reserves (space, `*`, `>`) replaced by `_`.
pub fn subject_for(prefix: &str, event_name: &str) -> String {
    let clean: String = event_name
        .chars()
        .map(|c| {
            if c.is_whitespace() || c == '*' || c == '>' {
                '_'
            } else {
                c
            }
        })
        .collect();
    let clean = clean.trim_matches('.');
    if clean.is_empty() {
        format!("{prefix}.unnamed")
    } else {
        format!("{prefix}.{clean}")
    }
}

/// Publishes one event with `Nats-Msg-Id` = its id, waiting for JetStream's ack when a
/// stream captures the subject (else a plain publish, flushed).
pub async fn publish(
    client: &async_nats::Client,
    subject: String,
    event: &spur_core::Event,
) -> Result<(), BoxError> {
    let body = event.to_json_bytes()?;
    let js = jetstream::new(client.clone());
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
    match js
        .publish_with_headers(subject.clone(), headers.clone(), body.clone().into())
        .await
    {
        Ok(ack) => match ack.await {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                client
                    .publish_with_headers(subject, headers, body.into())
                    .await?;
                client.flush().await?;
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_setting_may_name_several_servers() {
        assert_eq!(servers("nats://a:4222"), vec!["nats://a:4222"]);
        assert_eq!(
            servers("nats://a:4222, nats://b:4222,"),
            vec!["nats://a:4222", "nats://b:4222"]
        );
    }

    #[test]
    fn nats_wildcards() {
        assert!(subject_matches("events.>", "events.a.b"));
        assert!(!subject_matches("events.>", "events"));
        assert!(subject_matches("sensors.*.temp", "sensors.k1.temp"));
        assert!(!subject_matches("sensors.*.temp", "sensors.k1.x.temp"));
        assert!(subject_matches("a.b", "a.b"));
        assert!(!subject_matches("a.b", "a.b.c"));
    }
}

#[cfg(test)]
mod redelivery_tests {
    use super::Redeliveries;
    use uuid::Uuid;

    #[test]
    fn remembers_redelivered_ids_and_keeps_recent_ones_past_the_prune_size() {
        let redeliveries = Redeliveries::default();
        assert!(!redeliveries.contains(&Uuid::from_u128(1)));
        redeliveries.note([Uuid::from_u128(1), Uuid::from_u128(2)]);
        assert!(redeliveries.contains(&Uuid::from_u128(1)));
        assert!(redeliveries.contains(&Uuid::from_u128(2)));
        assert!(!redeliveries.contains(&Uuid::from_u128(3)));
        // A takeover can redeliver far more than the prune size at once: recent ids stay.
        redeliveries.note((10..30_010).map(Uuid::from_u128));
        assert!(redeliveries.contains(&Uuid::from_u128(1)));
        assert!(redeliveries.contains(&Uuid::from_u128(30_009)));
    }
}
