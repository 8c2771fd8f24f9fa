//! The daemon's settings, with the defaults a laptop needs (no NATS, data in `.spur/`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use spur_ingest::nats::NatsConfig;

use crate::server::{ServerLimits, TlsFiles};

/// Everything `spur serve` can be told.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    /// Where the HTTP API listens (`127.0.0.1:0` picks a free port).
    pub http: SocketAddr,
    /// Folder (or file) of automation and deployment YAML/JSON, watched for changes.
    pub automations: PathBuf,
    /// Data folder: the embedded store lives here.
    pub data: PathBuf,
    /// NATS source, when configured.
    pub nats: Option<NatsConfig>,
    /// How long events are kept in the log.
    pub retention: Duration,
    /// Prefect's API auth string (`user:pass`): an admin credential. With it (or an API key,
    /// or any token) every route but the open ones needs a credential (docs/security.md).
    pub auth_string: Option<String>,
    /// An admin bearer key (what Prefect clients send from `PREFECT_API_KEY`).
    pub api_key: Option<String>,
    /// Serve `/metrics` without credentials even when auth is on.
    pub metrics_open: bool,
    /// Refuse to start when listening beyond loopback with no credential configured.
    pub require_auth: bool,
    /// Submissions that may wait for the pipeline before HTTP callers get 429.
    pub queue_capacity: usize,
    /// A checkpoint is written after this many events… (Each checkpoint is the whole trigger
    /// state, up to about a megabyte with Prefect's 10 000 remembered ids; a restart replays
    /// at most this many events from the log, which takes well under a second.)
    pub checkpoint_events: u64,
    /// …or this much time, whichever comes first (at most 500 ms with shared state in NATS).
    pub checkpoint_interval: Duration,
    /// How often the automations folder is checked for changes.
    pub reload_interval: Duration,
    /// Refuse webhooks without authentication, and serve existing ones as disabled.
    pub webhooks_require_auth: bool,
    /// Serve the HTTP API over TLS with these PEM files (`--tls-cert/--tls-key`).
    pub tls: Option<TlsFiles>,
    /// `command` runs whose processes may be alive at once (`--max-processes`; see
    /// [`crate::actions::MAX_PROCESSES`]).
    pub max_processes: usize,
    /// The store's page cache, in bytes (`--store-cache-mb`; see
    /// [`spur_store::DEFAULT_CACHE_BYTES`]).
    pub store_cache_bytes: usize,
    /// Connection timeouts and limit (see `server.rs` and docs/limits.md).
    pub server: ServerLimits,
    /// A websocket client using the `prefect` subprotocol must send its `auth` message (and
    /// an `/api/events/out` client its `filter`) within this time of connecting.
    pub websocket_auth_timeout: Duration,
    /// A Prefect server whose events and automations Spur takes (`--prefect-api`).
    pub prefect: Option<spur_ingest::prefect::PrefectConfig>,
    /// Cluster mode (`--cluster NAME`): share the automations with the other members
    /// (needs `nats` with JetStream; see `cluster.rs`).
    pub cluster: Option<crate::cluster::ClusterConfig>,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            http: SocketAddr::from(([127, 0, 0, 1], 4200)),
            automations: PathBuf::from("config/automations"),
            data: PathBuf::from(".spur"),
            nats: None,
            retention: Duration::from_secs(7 * 24 * 3600),
            auth_string: None,
            api_key: None,
            metrics_open: false,
            require_auth: false,
            queue_capacity: 1024,
            checkpoint_events: 50_000,
            checkpoint_interval: Duration::from_secs(5),
            reload_interval: Duration::from_millis(500),
            webhooks_require_auth: false,
            tls: None,
            server: ServerLimits::default(),
            max_processes: crate::actions::MAX_PROCESSES,
            store_cache_bytes: spur_store::DEFAULT_CACHE_BYTES,
            websocket_auth_timeout: Duration::from_secs(10),
            prefect: None,
            cluster: None,
        }
    }
}
