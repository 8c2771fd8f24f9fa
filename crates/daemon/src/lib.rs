//! `spur-daemon`: a whole running Spur, as a library.
//!
//! [`Daemon::start`] wires the parts and returns a handle; the `spur serve` binary, the
//! end-to-end tests and load drivers all start it the same way.
//!
//! ```text
//!  HTTP /api/events ─┐                         ┌─ event log (redb) ─┐
//!  WS /api/events/in ├─► Intake ─► pipeline ───┤                    ├─► firings (recorded once)
//!  NATS JetStream  ──┘   (bounded)  thread      └─ trigger engine ───┘        │
//!                                     ▲  sleeps until the next deadline        ▼
//!        automations folder ─ reload ─┘                               log + /api/firings
//! ```
//!
//! * [`config`] — [`DaemonConfig`] and its defaults.
//! * [`pipeline`] — the single writer: log, engine, firings, checkpoints, recovery.
//! * [`reload`] — the automations folder watcher; the [`reload::Catalog`] that merges its
//!   automations with a Prefect server's.
//! * [`prefect_bridge`] — a Prefect server's automations kept in sync (`--prefect-api`); its
//!   events come through `spur_ingest::prefect`.
//! * [`api`] — read API, live feed, health and metrics; [`api::ROUTES`] lists every route
//!   with the scope it needs.
//! * [`auth`] — the auth layer in front of every route, scoped tokens (docs/security.md).
//! * [`metrics`] — Prometheus counters and histograms.
//! * [`process`] — process-wide memory settings the binary applies at start.
//! * [`server`] — the HTTP server: connection timeouts and limit, JSON error bodies.
//!
//! Shutdown order: stop accepting HTTP, stop the NATS source, drain the pipeline's queue,
//! checkpoint, return.
#![warn(missing_docs)]

pub mod actions;
pub mod api;
pub mod auth;
pub mod cluster;
pub mod config;
pub mod metrics;
pub mod own_events;
pub mod pipeline;
pub mod prefect_bridge;
pub mod process;
pub mod reload;
pub mod server;
pub mod shared_state;
pub mod webhooks;

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use spur_core::EventLimits;
use spur_ingest::Intake;
use spur_ingest::http::HttpIngest;
use spur_ingest::nats::NatsCounters;
use spur_store::Store;
use spur_template::TemplateEngine;
use thiserror::Error;
use tokio::sync::{broadcast, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::{error, info, warn};

pub use config::DaemonConfig;

/// Why the daemon could not start.
#[derive(Debug, Error)]
pub enum StartError {
    /// The store could not be opened or recovered.
    #[error("{0}")]
    Store(#[from] spur_store::StoreError),
    /// Listening beyond loopback with no credential while `require_auth` is set.
    #[error("{0}")]
    Unprotected(String),
    /// The TLS certificate or key cannot be served (the error names the file).
    #[error("{0}")]
    Tls(#[from] server::TlsError),
    /// Cluster mode cannot start: needs JetStream, or its bucket is unusable.
    #[error("{0}")]
    Cluster(String),
    /// The HTTP address could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running daemon.
#[derive(Debug)]
pub struct Daemon {
    /// The address the HTTP API actually listens on.
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    server: JoinHandle<()>,
    tasks: Vec<JoinHandle<()>>,
    executor_task: JoinHandle<()>,
    /// Stores checkpoints in JetStream; ends after the pipeline (its final checkpoint).
    mirror_task: Option<JoinHandle<()>>,
    pipeline: pipeline::PipelineHandle,
    fired: broadcast::Sender<Arc<serde_json::Value>>,
    metrics: Arc<metrics::Metrics>,
}

impl Daemon {
    /// Opens the store, recovers state, loads automations and starts every part.
    pub async fn start(mut config: DaemonConfig) -> Result<Daemon, StartError> {
        // One TLS crypto provider for the process (webhooks over https); ignore "already set".
        let _ = rustls::crypto::ring::default_provider().install_default();
        // Bad TLS files stop the start before anything else happens.
        let tls = config.tls.as_ref().map(server::tls_acceptor).transpose()?;
        let store = Arc::new(Store::open_with_cache(
            &config.data.join("spur.redb"),
            config.store_cache_bytes,
        )?);
        if let Some(cluster) = &config.cluster {
            // A member reads the whole stream through a consumer of its own (every member
            // evaluates every event) and every door publishes there first (see `cluster`).
            let instance = instance_id(&store)?;
            match config.nats.as_mut() {
                Some(nats) if nats.jetstream => {
                    nats.stream_log = true;
                    nats.consumer = format!("spur-{}-{instance}", cluster.name);
                }
                _ => {
                    return Err(StartError::Cluster(
                        "--cluster needs --nats with JetStream (the stream is what members share)"
                            .to_owned(),
                    ));
                }
            }
            cluster.validate().map_err(StartError::Cluster)?;
        }
        let templates = TemplateEngine::new();
        let mut file_cache = spur_core::load::FileCache::default();
        let mut initial = reload::load(&config.automations, &templates, &[], &mut file_cache);
        // The files' parse trees are gone: give their memory back (see the function).
        process::return_free_memory();
        for e in &initial.status.errors {
            error!(diagnostic = %e, "automation file refused");
        }
        for w in &initial.status.warnings {
            warn!(diagnostic = %w, "automation warning");
        }
        info!(
            automations = initial.automations.len(),
            folder = %config.automations.display(),
            "automations loaded"
        );
        let (submit_tx, submit_rx) = mpsc::channel(config.queue_capacity);
        let intake = Intake::new(submit_tx, EventLimits::default());
        let executor = actions::Executor::new(store.clone(), intake.clone());
        if let Some(prefect) = &config.prefect {
            // Deployments Spur does not declare are the Prefect server's to run.
            executor.set_prefect_server(
                &prefect.api_url,
                prefect.auth_string.as_deref(),
                prefect.api_key.as_deref(),
            );
        }
        executor.set_max_processes(config.max_processes);
        if let Err(e) = executor.set_marker_dir(config.data.join("run-markers")) {
            warn!(error = %e, "cannot create the run marker folder: runs a crash interrupts will be marked Crashed");
        }
        let deployment_errors = executor.set_deployments(&initial.deployments);
        for e in &deployment_errors {
            error!(diagnostic = %e, "deployment refused");
        }
        initial.status.errors.extend(deployment_errors);
        let webhook_service = webhooks::WebhookService {
            store: store.clone(),
            registry: spur_ingest::webhook::Registry::default(),
            secrets: spur_ingest::webhook::SecretBox::open(&config.data.join("webhook.key"))
                .map_err(|e| {
                    StartError::Store(spur_store::StoreError::Corrupt(format!("webhook key: {e}")))
                })?,
            templates: Arc::new(TemplateEngine::new()),
            require_auth: config.webhooks_require_auth,
            base_url: Arc::default(),
        };
        if let Err(e) = webhook_service.load() {
            error!(error = %e, "cannot load webhooks");
        }
        let webhook_errors = webhook_service.sync_declared(&initial.webhooks);
        for e in &webhook_errors {
            error!(diagnostic = %e, "webhook refused");
        }
        initial.status.errors.extend(webhook_errors);
        // With a Prefect server, its automations as last read run from the start (with their
        // checkpointed state), beside the folder's, until the first read replaces them.
        let prefect_cached = config
            .prefect
            .as_ref()
            .map(|p| prefect_bridge::cached(&store, &p.api_url).unwrap_or_default());
        let (initial_runnable, initial_status) = reload::merge(
            &reload::runnable(&initial.automations),
            &initial.status,
            prefect_cached.as_ref(),
        );
        let status = Arc::new(RwLock::new(initial_status));
        let (dispatch_tx, dispatch_rx) = mpsc::unbounded_channel();
        let nats_counters = Arc::new(NatsCounters::default());
        let prefect_health = config
            .prefect
            .as_ref()
            .map(|p| Arc::new(spur_ingest::prefect::PrefectHealth::new(&p.api_url)));
        let metrics = Arc::new(metrics::Metrics {
            prefect: prefect_health.clone(),
            ..metrics::Metrics::new(intake.counters().clone(), nats_counters.clone())
        });
        metrics.load_errors.store(
            initial.status.errors.len() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
        // A second NATS connection (the source opens its own) serves worker launchers (run
        // requests and state reports) and, with JetStream, the shared trigger state that lets
        // another instance take over (see `shared_state`).
        let mut shared = None;
        let mut restore_from = None;
        let mut nats_client = None;
        let mut cluster_client = None;
        let store_for_cluster = store.clone();
        if let Some(nats) = &config.nats {
            match spur_ingest::nats::connect_with(&nats.url, &nats.auth, nats_counters.clone())
                .await
            {
                Ok(client) => {
                    if nats.jetstream {
                        match shared_state::SharedState::connect(
                            &client,
                            nats.replicas,
                            config.cluster.as_ref().map(|c| c.name.as_str()),
                        )
                        .await
                        {
                            Ok(state) => {
                                // Only a store that has never logged an event starts from
                                // the shared checkpoint. One killed before its first local
                                // checkpoint still has its log (replayed from the start) and
                                // its consumer (which resumes at its own acknowledgements):
                                // another instance's checkpoint would mark events it never
                                // evaluated as seen, and it would never derive their firings.
                                if store.load_checkpoint()?.is_none() && store.last_seq()? == 0 {
                                    restore_from =
                                        state.load_checkpoint().await.and_then(|bytes| {
                                            serde_json::from_slice::<spur_store::Checkpoint>(&bytes)
                                                .ok()
                                        });
                                }
                                shared = Some(state);
                            }
                            Err(e) => {
                                warn!(error = %e, "no shared state: cannot open the JetStream buckets")
                            }
                        }
                    }
                    nats_client = Some(client.clone());
                    cluster_client = Some(client.clone());
                    executor.set_nats(client);
                }
                Err(e) => {
                    warn!(error = %e, "no worker launchers or shared state: cannot connect to NATS")
                }
            }
        }
        // A new member (a store that never logged an event) starts from the cluster's
        // checkpoint and reads the stream after the sequence it covers; its own consumer does
        // not exist yet.
        if let (Some(_), Some(nats), Some(checkpoint)) =
            (&config.cluster, config.nats.as_mut(), restore_from.as_ref())
        {
            nats.start_after = checkpoint.stream_seq;
        }
        if config.cluster.is_some() && shared.is_none() {
            return Err(StartError::Cluster(
                "cluster mode needs JetStream's claims bucket and checkpoint store, and they cannot be opened (is JetStream enabled and reachable?)"
                    .to_owned(),
            ));
        }
        let (mirror_tx, mirror_rx) = watch::channel(None);
        let (covered_tx, covered_rx) = watch::channel(0u64);
        // Firings a crash left undispatched, read before recovery can add new ones.
        let leftovers = store.undispatched_firings(1000)?;
        let (live, _) = broadcast::channel(4096);
        let (fired, _) = broadcast::channel(4096);
        let pipeline = pipeline::start(
            store.clone(),
            initial_runnable.clone(),
            submit_rx,
            metrics.clone(),
            pipeline::Outputs {
                live: live.clone(),
                fired: fired.clone(),
                dispatch: dispatch_tx,
                mirror: shared.as_ref().map(|_| mirror_tx),
            },
            pipeline::PipelineConfig {
                checkpoint_events: config.checkpoint_events,
                // With shared state, JetStream acknowledgements wait for a mirrored checkpoint:
                // under load, checkpoint as often as the mirror uploads.
                checkpoint_interval: if shared.is_some() {
                    config
                        .checkpoint_interval
                        .min(shared_state::MIRROR_INTERVAL)
                } else {
                    config.checkpoint_interval
                },
                retention: config.retention,
            },
            restore_from,
        )?;

        executor.set_control(pipeline.control.clone());
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let catalog = Arc::new(reload::Catalog::new(
            reload::runnable(&initial.automations),
            initial.status.clone(),
            prefect_cached.clone(),
            status.clone(),
            pipeline.control.clone(),
        ));
        tasks.push(tokio::spawn(reload::watch_folder(
            reload::Watcher {
                path: config.automations.clone(),
                interval: config.reload_interval,
                catalog: catalog.clone(),
                metrics: metrics.clone(),
                executor: executor.clone(),
                webhooks: webhook_service.clone(),
                cache: file_cache,
            },
            initial.automations.clone(),
            shutdown_rx.clone(),
        )));
        let mut covered = None;
        let mut mirror_task = None;
        // The doors other than NATS forward what they receive into the stream, when a
        // JetStream stream and the shared claims (which keep a forwarded event's firings
        // from running twice) are both there. See `spur_ingest::nats::Forwarder`.
        let instance = match shared {
            Some(_) => Some(instance_id(&store)?),
            None => None,
        };
        let mut external_intake = intake.clone();
        let stream_log = config
            .nats
            .as_ref()
            .is_some_and(|n| n.jetstream && n.stream_log);
        if let (true, Some(nats), Some(client)) = (stream_log, &config.nats, nats_client.clone()) {
            // The stream is the log: the doors publish there and nothing else (see
            // `spur_ingest::nats::StreamPublisher`).
            let name = instance_id(&store)?.to_string();
            match spur_ingest::nats::StreamPublisher::new(client, nats, name) {
                Some(publisher) => {
                    info!(stream = %nats.stream, "the stream is the log: events received over HTTP, the websocket and webhooks, and Spur's own, go to JetStream first");
                    external_intake = intake.publishing_to(std::sync::Arc::new(publisher));
                    // In a cluster the stream is the only log the other members read:
                    // wait out a nats-server node's restart rather than keep events local.
                    let patience = if config.cluster.is_some() {
                        std::time::Duration::from_secs(60)
                    } else {
                        std::time::Duration::ZERO
                    };
                    executor.publish_own_events_first(external_intake.clone(), patience);
                }
                None => warn!(
                    subjects = ?nats.subjects,
                    "--nats-log needs a consumed subject of the form `prefix.>`; events received over HTTP are stored locally"
                ),
            }
        } else if let (Some(nats), Some(client), Some(instance)) =
            (&config.nats, nats_client, instance)
        {
            match spur_ingest::nats::Forwarder::start(
                client,
                nats,
                instance.to_string(),
                nats_counters.clone(),
            ) {
                Some(forwarder) => {
                    external_intake = intake.forwarding_to(std::sync::Arc::new(forwarder));
                }
                None => warn!(
                    subjects = ?nats.subjects,
                    "events received over HTTP are not forwarded to JetStream: no consumed subject has the form `prefix.>`"
                ),
            }
        }
        if let (Some(state), Some(instance)) = (shared, instance) {
            executor.set_shared(state.clone(), instance, nats_counters.clone());
            mirror_task = Some(tokio::spawn(state.mirror(mirror_rx, covered_tx)));
            // Alone, an instance's consumer acknowledges what a stored checkpoint covers, so
            // a successor reading the same consumer gets the rest redelivered. A cluster
            // member has a consumer of its own and the stream keeps every message for the
            // others: it acknowledges once its own store has the batch.
            if config.cluster.is_none() {
                covered = Some(covered_rx);
            }
        }
        if let (Some(prefect), Some(health)) = (config.prefect.clone(), prefect_health) {
            info!(api = %prefect.api_url, "Prefect server bridge enabled: its events and automations");
            tasks.push(tokio::spawn(prefect_bridge::sync_automations(
                prefect_bridge::AutomationSync {
                    config: prefect.clone(),
                    catalog: catalog.clone(),
                    store: store.clone(),
                    health: health.clone(),
                },
                prefect_bridge::cached_raw(&store, &prefect.api_url),
                shutdown_rx.clone(),
            )));
            tasks.push(tokio::spawn(prefect_bridge::feed_back(
                prefect_bridge::Feed {
                    config: prefect.clone(),
                    store: store.clone(),
                    health: health.clone(),
                },
                shutdown_rx.clone(),
            )));
            let cursor = Arc::new(prefect_bridge::StoreCursor {
                store: store.clone(),
                api_url: prefect.api_url.clone(),
            });
            tasks.push(tokio::spawn(spur_ingest::prefect::run(
                prefect,
                external_intake.clone(),
                cursor,
                health,
                shutdown_rx.clone(),
            )));
        }
        if let Some(nats) = config.nats.clone() {
            info!(url = %nats.url, subjects = ?nats.subjects, jetstream = nats.jetstream, "NATS source enabled");
            tasks.push(tokio::spawn(spur_ingest::nats::run(
                nats,
                intake.clone(),
                nats_counters,
                covered,
                shutdown_rx.clone(),
            )));
        }

        let auth = Arc::new(auth::Auth::new(
            config.auth_string.clone(),
            config.api_key.clone(),
            config.metrics_open,
            store.clone(),
            metrics.clone(),
        )?);
        executor.set_api_token(auth.run_token().to_owned());
        if let Some(warning) = auth.exposure_warning(config.http) {
            if config.require_auth {
                return Err(StartError::Unprotected(format!(
                    "refusing to start (--require-auth): {warning}"
                )));
            }
            warn!("{warning}");
        }
        let listen = Arc::new(std::sync::OnceLock::new());
        let router = spur_ingest::http::routes(HttpIngest {
            intake: external_intake.clone(),
            auth: Some(auth.in_band(auth::Scope::EventsWrite)),
            auth_timeout: config.websocket_auth_timeout,
        })
        .merge(spur_ingest::webhook::routes(
            spur_ingest::webhook::WebhookIngest {
                intake: external_intake.clone(),
                registry: webhook_service.registry.clone(),
                secrets: webhook_service.secrets.clone(),
                replay: Arc::new(spur_ingest::webhook::ReplayGuard::durable(Arc::new(
                    auth::StoreReplay(store.clone()),
                ))),
                templates: webhook_service.templates.clone(),
                failures: metrics.webhook_auth_failures.clone(),
            },
        ))
        .merge(webhooks::routes(webhook_service.clone()))
        .merge(auth::routes(auth.clone()))
        .merge(api::routes(api::ApiState {
            store,
            control: pipeline.control.clone(),
            status,
            metrics: metrics.clone(),
            live,
            auth: auth.clone(),
            listen: listen.clone(),
            auth_timeout: config.websocket_auth_timeout,
            executor: executor.clone(),
        }))
        .layer(axum::middleware::from_fn_with_state(auth, auth::layer));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let listener = tokio::net::TcpListener::bind(config.http)
            .await
            .map_err(|source| StartError::Bind {
                addr: config.http,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartError::Bind {
            addr: config.http,
            source,
        })?;
        let _ = listen.set(addr);
        let server = tokio::spawn(server::serve(
            listener,
            router,
            config.server,
            tls,
            shutdown_rx.clone(),
        ));
        drop(intake);
        executor.set_api_url(format!("{scheme}://{addr}"));
        if let Ok(mut base) = webhook_service.base_url.write() {
            *base = format!("{scheme}://{addr}");
        }
        if let (Some(cluster), Some(client)) = (config.cluster.clone(), cluster_client) {
            let nats = config.nats.as_ref();
            let member = cluster::Cluster::join(
                &client,
                cluster,
                instance_id(&store_for_cluster)?,
                nats.map_or("SPUR_EVENTS", |n| n.stream.as_str()),
                nats.map_or(1, |n| n.replicas),
                format!("{scheme}://{addr}"),
                metrics.clone(),
            )
            .await
            .map_err(|e| StartError::Cluster(e.to_string()))?;
            executor.set_cluster(member.clone());
            // Pauses asked of any member hold on this one too (see `cluster`).
            tasks.push(tokio::spawn(
                member
                    .clone()
                    .follow_pauses(pipeline.control.clone(), shutdown_rx.clone()),
            ));
            tasks.push(tokio::spawn(member.run(shutdown_rx.clone())));
            tasks.push(tokio::spawn(
                executor.clone().review_parked(shutdown_rx.clone()),
            ));
        }
        // Runs a restart interrupted are recovered before any firing is dispatched (a firing
        // left undispatched must find its run, if it has one, already settled), but after
        // the listener is up: recovering thousands of runs takes a store write (and with the
        // stream as the log, a round trip) each, and meanwhile the API, health checks and
        // intake answer. New firings queue in the dispatch channel until recovery is done.
        let executor_task = {
            let shutdown = shutdown_rx.clone();
            tokio::spawn(async move {
                executor.recover().await;
                {
                    let executor = executor.clone();
                    let automations = initial_runnable;
                    tokio::spawn(async move { executor.redispatch(leftovers, &automations).await });
                }
                executor.run(dispatch_rx, shutdown).await
            })
        };
        info!(%addr, "spur listening on http://{addr}");
        Ok(Daemon {
            addr,
            shutdown,
            server,
            tasks,
            executor_task,
            mirror_task,
            pipeline,
            fired,
            metrics,
        })
    }

    /// Every new firing record (as stored), live. For load drivers and in-process tests.
    pub fn subscribe_firings(&self) -> broadcast::Receiver<Arc<serde_json::Value>> {
        self.fired.subscribe()
    }

    /// The daemon's metrics.
    pub fn metrics(&self) -> &Arc<metrics::Metrics> {
        &self.metrics
    }

    /// Stops intake, finishes in-flight work, checkpoints, and returns.
    ///
    /// The order matters: sources stop first; then the action executor drains (actions in
    /// flight finish, for up to [`actions::DRAIN_TIMEOUT`], and their marks are written)
    /// while the pipeline still takes the events they emit; then the pipeline drains and
    /// checkpoints. Runs still in progress are stopped with the process and marked Crashed on
    /// the next start.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        let _ = self.server.await;
        for task in self.tasks {
            let _ = task.await;
        }
        let drain = actions::DRAIN_TIMEOUT * 2 + std::time::Duration::from_secs(1);
        if tokio::time::timeout(drain, &mut self.executor_task)
            .await
            .is_err()
        {
            self.executor_task.abort();
        }
        self.pipeline.shutdown().await;
        if let Some(mirror) = self.mirror_task {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), mirror).await;
        }
        info!("spur stopped");
    }
}

/// This data folder's instance id (made on first start): whose claim a firing is.
fn instance_id(store: &Store) -> Result<uuid::Uuid, StartError> {
    if let Some(id) = store
        .get_setting("instance_id")?
        .and_then(|v| v.as_str().and_then(|s| uuid::Uuid::parse_str(s).ok()))
    {
        return Ok(id);
    }
    let id = uuid::Uuid::new_v4();
    store.put_setting("instance_id", &serde_json::Value::String(id.to_string()))?;
    Ok(id)
}
