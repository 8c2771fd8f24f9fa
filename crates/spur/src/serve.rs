//! `spur serve`: settings from flags, `SPUR_*` environment variables, the config file and
//! defaults (in that order of precedence), logging, signals.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::Value;
use spur_daemon::{Daemon, DaemonConfig};
use spur_ingest::nats::NatsConfig;

/// Flags of `spur serve`. Each one can also be set with its `SPUR_*` variable or in the
/// config file (same name, `-` → `_`).
#[derive(Args, Debug, Default)]
pub struct ServeArgs {
    /// Config file (YAML). Default: config/spur.yaml when it exists.
    #[arg(long, env = "SPUR_CONFIG")]
    pub config: Option<PathBuf>,
    /// Folder (or file) of automations and deployments, watched for changes.
    #[arg(long, env = "SPUR_AUTOMATIONS")]
    pub automations: Option<PathBuf>,
    /// Address for the HTTP API [default: 127.0.0.1:4200].
    #[arg(long, env = "SPUR_HTTP")]
    pub http: Option<SocketAddr>,
    /// Data folder for the embedded store [default: .spur].
    #[arg(long, env = "SPUR_DATA")]
    pub data: Option<PathBuf>,
    /// NATS server URL; enables the NATS source (off by default).
    #[arg(long, env = "SPUR_NATS")]
    pub nats: Option<String>,
    /// NATS subjects to consume, comma separated [default: events.>].
    #[arg(long, env = "SPUR_NATS_SUBJECTS", value_delimiter = ',')]
    pub nats_subjects: Option<Vec<String>>,
    /// Use core NATS subscriptions instead of a JetStream durable consumer (lossy).
    #[arg(long, env = "SPUR_NATS_CORE")]
    pub nats_core: bool,
    /// Copies JetStream keeps of Spur's stream and buckets when Spur creates them: 1 on one
    /// nats-server, 3 on a cluster [default: 1].
    #[arg(long, env = "SPUR_NATS_REPLICAS", value_parser = clap::value_parser!(u8).range(1..=5))]
    pub nats_replicas: Option<u8>,
    /// The JetStream stream is the log: events received over HTTP, the websocket and
    /// webhooks are published there and answered once JetStream has them (docs/nats.md).
    #[arg(long, env = "SPUR_NATS_LOG")]
    pub nats_log: bool,
    /// Join the cluster NAME: instances with the same name (and the same NATS JetStream)
    /// divide the automations and take over each other's when one stops (implies
    /// --nats-log; docs/cluster.md).
    #[arg(long, env = "SPUR_CLUSTER")]
    pub cluster: Option<String>,
    /// How long a cluster lease lasts unrenewed: a dead member's automations move within
    /// about this much [default: 3s].
    #[arg(long, env = "SPUR_CLUSTER_LEASE")]
    pub cluster_lease: Option<String>,
    /// How Spur authenticates to NATS and which TLS it trusts.
    #[command(flatten)]
    pub nats_connection: NatsConnectArgs,
    /// How long events are kept: seconds, or 30m / 12h / 7d, or ISO-8601 [default: 7d].
    #[arg(long, env = "SPUR_RETENTION")]
    pub retention: Option<String>,
    /// Prefect API auth string (`user:pass`, an admin credential). With it, an API key or any
    /// token, every route but /healthz, /hooks/* (and /metrics with --metrics-open) needs a
    /// credential (docs/security.md).
    #[arg(long, env = "SPUR_AUTH_STRING")]
    pub auth_string: Option<String>,
    /// An admin API key clients send as `Authorization: Bearer` (Prefect's PREFECT_API_KEY).
    #[arg(long, env = "SPUR_API_KEY")]
    pub api_key: Option<String>,
    /// Serve /metrics without credentials even when auth is on.
    #[arg(long, env = "SPUR_METRICS_OPEN")]
    pub metrics_open: bool,
    /// Refuse to start when listening beyond loopback without any credential.
    #[arg(long, env = "SPUR_REQUIRE_AUTH")]
    pub require_auth: bool,
    /// Serve the HTTP API over TLS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, env = "SPUR_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --tls-cert.
    #[arg(long, env = "SPUR_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Log format.
    #[arg(long, env = "SPUR_LOG_FORMAT", value_parser = ["pretty", "json"])]
    pub log_format: Option<String>,
    /// Refuse webhooks without authentication (existing ones answer 404 until given some).
    #[arg(long, env = "SPUR_WEBHOOKS_REQUIRE_AUTH")]
    pub webhooks_require_auth: bool,
    /// A request head must arrive within this time of its first byte [default: 10s].
    #[arg(long, env = "SPUR_HEADER_READ_TIMEOUT")]
    pub header_read_timeout: Option<String>,
    /// A request body must arrive within this time of its head, else 408 [default: 60s].
    #[arg(long, env = "SPUR_BODY_READ_TIMEOUT")]
    pub body_read_timeout: Option<String>,
    /// A connection with no request in progress is closed after this time [default: 60s].
    #[arg(long, env = "SPUR_IDLE_TIMEOUT")]
    pub idle_timeout: Option<String>,
    /// A websocket client must send its auth (and feed filter) message within this time
    /// [default: 10s].
    #[arg(long, env = "SPUR_WEBSOCKET_AUTH_TIMEOUT")]
    pub websocket_auth_timeout: Option<String>,
    /// Open connections (websockets included) beyond which new ones get 503 [default: 1024].
    #[arg(long, env = "SPUR_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// `command` runs whose processes may be alive at once; more wait in Pending for a slot
    /// [default: 256].
    #[arg(long, env = "SPUR_MAX_PROCESSES")]
    pub max_processes: Option<usize>,
    /// The store's page cache in MiB: memory the daemon may keep for pages of its database
    /// [default: 256].
    #[arg(long, env = "SPUR_STORE_CACHE_MB")]
    pub store_cache_mb: Option<usize>,
    /// A Prefect server's API URL (`http://127.0.0.1:4200/api`): Spur takes its events and
    /// its automations (turn the server's own triggers service off; see the README).
    #[arg(long, env = "SPUR_PREFECT_API")]
    pub prefect_api: Option<String>,
    /// That server's auth string (`user:pass`, its `PREFECT_SERVER_API_AUTH_STRING`).
    #[arg(long, env = "SPUR_PREFECT_AUTH_STRING")]
    pub prefect_auth_string: Option<String>,
    /// An API key for that server, sent as a bearer token (like `PREFECT_API_KEY`).
    #[arg(long, env = "SPUR_PREFECT_API_KEY")]
    pub prefect_api_key: Option<String>,
}

/// Parses `45`, `45s`, `30m`, `12h`, `7d`, or an ISO-8601 duration.
pub fn parse_duration(text: &str) -> Result<Duration> {
    let t = text.trim();
    let (number, unit) = t.split_at(
        t.find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(t.len()),
    );
    let factor = match unit {
        "" | "s" => Some(1.0),
        "m" => Some(60.0),
        "h" => Some(3600.0),
        "d" => Some(86_400.0),
        _ => None,
    };
    if let (Some(f), Ok(n)) = (factor, number.parse::<f64>()) {
        return Ok(Duration::from_secs_f64(n * f));
    }
    let delta = spur_core::time::parse_duration(&Value::String(t.to_owned()))
        .map_err(anyhow::Error::msg)?;
    delta.to_std().context("a duration must not be negative")
}

fn file_settings(path: &Path) -> Result<serde_json::Map<String, Value>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    match spur_core::load::parse_yaml(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(Value::Null) => Ok(Default::default()),
        Ok(_) => bail!("{}: expected a mapping of settings", path.display()),
        Err((line, column, reason)) => bail!("{}:{line}:{column}: {reason}", path.display()),
    }
}

/// The NATS connection's credentials and TLS, the flags every command that connects to NATS
/// takes (`serve`, `worker`, `emit --nats`), each also a `SPUR_NATS_*` variable. User and
/// password go in the URL instead: `nats://user:pass@host:4222`.
#[derive(Args, Clone, Debug, Default)]
pub struct NatsConnectArgs {
    /// A NATS credentials file (`.creds`: a user JWT and its nkey seed, what `nsc` writes).
    #[arg(long, env = "SPUR_NATS_CREDS")]
    pub nats_creds: Option<PathBuf>,
    /// A file holding the nkey seed (`SU…`) NATS knows this client by.
    #[arg(long, env = "SPUR_NATS_NKEY")]
    pub nats_nkey: Option<PathBuf>,
    /// CA certificate(s) (PEM) that signed the NATS server's certificate; turns TLS on.
    #[arg(long, env = "SPUR_NATS_TLS_CA")]
    pub nats_tls_ca: Option<PathBuf>,
    /// A client certificate (PEM) for a NATS server that verifies clients; needs --nats-tls-key.
    #[arg(long, env = "SPUR_NATS_TLS_CERT", requires = "nats_tls_key")]
    pub nats_tls_cert: Option<PathBuf>,
    /// The private key (PEM) for --nats-tls-cert.
    #[arg(long, env = "SPUR_NATS_TLS_KEY", requires = "nats_tls_cert")]
    pub nats_tls_key: Option<PathBuf>,
}

impl NatsConnectArgs {
    /// The credentials and TLS settings: flags (and their variables) win over `nats_file`, the
    /// config file's `nats:` object (`creds`, `nkey`, `tls_ca`, `tls_cert`, `tls_key`; only
    /// `spur serve` reads one). A file that cannot be read is an error naming its flag and path.
    pub fn auth(&self, nats_file: Option<&Value>) -> Result<spur_ingest::nats::NatsAuth> {
        let from_file = |key: &str| {
            nats_file
                .and_then(|n| n.get(key))
                .and_then(Value::as_str)
                .map(PathBuf::from)
        };
        let pick = |flag: &Option<PathBuf>, key: &str| flag.clone().or_else(|| from_file(key));
        let tls_client = match (
            pick(&self.nats_tls_cert, "tls_cert"),
            pick(&self.nats_tls_key, "tls_key"),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            (Some(_), None) => {
                bail!("nats.tls_cert is set but nats.tls_key is not (both are needed)")
            }
            (None, Some(_)) => {
                bail!("nats.tls_key is set but nats.tls_cert is not (both are needed)")
            }
        };
        let auth = spur_ingest::nats::NatsAuth {
            creds: pick(&self.nats_creds, "creds"),
            nkey: pick(&self.nats_nkey, "nkey"),
            tls_ca: pick(&self.nats_tls_ca, "tls_ca"),
            tls_client,
        };
        let files = [
            ("--nats-creds", auth.creds.as_ref()),
            ("--nats-nkey", auth.nkey.as_ref()),
            ("--nats-tls-ca", auth.tls_ca.as_ref()),
            ("--nats-tls-cert", auth.tls_client.as_ref().map(|(c, _)| c)),
            ("--nats-tls-key", auth.tls_client.as_ref().map(|(_, k)| k)),
        ];
        for (setting, path) in files {
            if let Some(path) = path {
                std::fs::File::open(path)
                    .with_context(|| format!("{setting} {}: cannot be read", path.display()))?;
            }
        }
        Ok(auth)
    }
}

/// Merges flags, environment, file and defaults into the daemon config.
pub fn resolve(args: &ServeArgs) -> Result<(DaemonConfig, String)> {
    let config_path = args.config.clone().or_else(|| {
        let default = PathBuf::from("config/spur.yaml");
        default.exists().then_some(default)
    });
    let file = match &config_path {
        Some(p) => file_settings(p)?,
        None => Default::default(),
    };
    const KNOWN: &[&str] = &[
        "automations",
        "http",
        "data",
        "nats",
        "retention",
        "auth_string",
        "api_key",
        "metrics_open",
        "require_auth",
        "log_format",
        "webhooks_require_auth",
        "header_read_timeout",
        "body_read_timeout",
        "idle_timeout",
        "websocket_auth_timeout",
        "max_connections",
        "max_processes",
        "store_cache_mb",
        "tls_cert",
        "tls_key",
        "prefect",
    ];
    for key in file.keys() {
        if !KNOWN.contains(&key.as_str()) {
            bail!(
                "{}: unknown setting {key:?} (known: {})",
                config_path
                    .as_deref()
                    .unwrap_or(Path::new("config"))
                    .display(),
                KNOWN.join(", ")
            );
        }
    }
    let text = |key: &str| file.get(key).and_then(Value::as_str).map(str::to_owned);
    let mut config = DaemonConfig::default();
    if let Some(a) = args
        .automations
        .clone()
        .or_else(|| text("automations").map(PathBuf::from))
    {
        config.automations = a;
    }
    if let Some(h) = args.http {
        config.http = h;
    } else if let Some(h) = text("http") {
        config.http = h
            .parse()
            .with_context(|| format!("http: {h:?} is not an address like 127.0.0.1:4200"))?;
    }
    if let Some(d) = args
        .data
        .clone()
        .or_else(|| text("data").map(PathBuf::from))
    {
        config.data = d;
    }
    if let Some(r) = args.retention.clone().or_else(|| {
        file.get("retention").map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    }) {
        config.retention = parse_duration(&r).with_context(|| format!("retention: {r:?}"))?;
    }
    // Connection limits: a duration flag or setting (`10`, `10s`, `2m`, ISO-8601), more than 0.
    let duration = |flag: &Option<String>, key: &str| -> Result<Option<Duration>> {
        let Some(t) = flag.clone().or_else(|| {
            file.get(key).map(|v| match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        }) else {
            return Ok(None);
        };
        let d = parse_duration(&t).with_context(|| format!("{key}: {t:?}"))?;
        if d.is_zero() {
            bail!("{key}: must be more than 0");
        }
        Ok(Some(d))
    };
    if let Some(d) = duration(&args.header_read_timeout, "header_read_timeout")? {
        config.server.header_read_timeout = d;
    }
    if let Some(d) = duration(&args.body_read_timeout, "body_read_timeout")? {
        config.server.body_read_timeout = d;
    }
    if let Some(d) = duration(&args.idle_timeout, "idle_timeout")? {
        config.server.idle_timeout = d;
    }
    if let Some(d) = duration(&args.websocket_auth_timeout, "websocket_auth_timeout")? {
        config.websocket_auth_timeout = d;
    }
    // A count flag or setting, at least 1.
    let count = |flag: Option<usize>, key: &str| -> Result<Option<usize>> {
        let Some(n) = flag.or_else(|| file.get(key).and_then(Value::as_u64).map(|n| n as usize))
        else {
            return Ok(None);
        };
        if n == 0 {
            bail!("{key}: must be at least 1");
        }
        Ok(Some(n))
    };
    if let Some(n) = count(args.max_connections, "max_connections")? {
        config.server.max_connections = n;
    }
    if let Some(n) = count(args.max_processes, "max_processes")? {
        config.max_processes = n;
    }
    if let Some(mb) = count(args.store_cache_mb, "store_cache_mb")? {
        config.store_cache_bytes = mb.saturating_mul(1 << 20);
    }
    config.auth_string = args.auth_string.clone().or_else(|| text("auth_string"));
    config.api_key = args.api_key.clone().or_else(|| text("api_key"));
    let flag =
        |set: bool, name: &str| set || file.get(name).and_then(Value::as_bool).unwrap_or(false);
    config.metrics_open = flag(args.metrics_open, "metrics_open");
    config.require_auth = flag(args.require_auth, "require_auth");
    config.webhooks_require_auth = args.webhooks_require_auth
        || file
            .get("webhooks_require_auth")
            .and_then(Value::as_bool)
            .unwrap_or(false);
    // Each from its flag/env, else the file; one without the other is an error.
    let tls_cert = args
        .tls_cert
        .clone()
        .or_else(|| text("tls_cert").map(PathBuf::from));
    let tls_key = args
        .tls_key
        .clone()
        .or_else(|| text("tls_key").map(PathBuf::from));
    config.tls = match (tls_cert, tls_key) {
        (Some(cert), Some(key)) => Some(spur_daemon::server::TlsFiles { cert, key }),
        (None, None) => None,
        (Some(_), None) => bail!("tls_cert is set but tls_key is not (both are needed)"),
        (None, Some(_)) => bail!("tls_key is set but tls_cert is not (both are needed)"),
    };
    let nats_file = file.get("nats");
    let nats_url = args.nats.clone().or_else(|| match nats_file {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(m)) => m.get("url").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    });
    if let Some(url) = nats_url {
        let mut nats = NatsConfig::new(url);
        if let Some(subjects) = args.nats_subjects.clone() {
            nats.subjects = subjects;
        } else if let Some(Value::Array(list)) = nats_file.and_then(|n| n.get("subjects")) {
            nats.subjects = list
                .iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect();
        }
        let core_in_file = nats_file
            .and_then(|n| n.get("jetstream"))
            .and_then(Value::as_bool)
            .map(|js| !js)
            .unwrap_or(false);
        nats.jetstream = !(args.nats_core || core_in_file);
        nats.stream_log = args.nats_log
            || nats_file
                .and_then(|n| n.get("log"))
                .and_then(Value::as_bool)
                .unwrap_or(false);
        if nats.stream_log && !nats.jetstream {
            bail!("--nats-log needs JetStream (it cannot be combined with --nats-core)");
        }
        nats.replicas = match (
            args.nats_replicas,
            nats_file.and_then(|n| n.get("replicas")),
        ) {
            (Some(n), _) => usize::from(n),
            (None, None) => 1,
            (None, Some(v)) => match v.as_u64() {
                Some(n @ 1..=5) => n as usize,
                _ => bail!("nats.replicas: a number from 1 to 5 (JetStream's limit), got {v}"),
            },
        };
        nats.auth = args.nats_connection.auth(nats_file)?;
        if let Some(list) = nats_file.and_then(|n| n.get("templates")) {
            let Value::Array(items) = list else {
                bail!("nats.templates: a list of {{subject, template}}");
            };
            let engine = spur_template::TemplateEngine::new();
            for (i, item) in items.iter().enumerate() {
                let (Some(subject), Some(template)) = (
                    item.get("subject").and_then(Value::as_str),
                    item.get("template").and_then(Value::as_str),
                ) else {
                    bail!("nats.templates[{i}]: needs `subject` and `template` (strings)");
                };
                engine
                    .validate(template)
                    .map_err(|e| anyhow::anyhow!("nats.templates[{i}].template: {e}"))?;
                nats.templates.push(spur_ingest::nats::SubjectTemplate {
                    subject: subject.to_owned(),
                    template: template.to_owned(),
                });
            }
        }
        config.nats = Some(nats);
    }
    // `cluster: NAME` or `cluster: {name, lease}`; flags win.
    let cluster_file = file.get("cluster");
    let cluster_name = args.cluster.clone().or_else(|| match cluster_file {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(m)) => m.get("name").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    });
    if let Some(name) = cluster_name {
        let mut cluster = spur_daemon::cluster::ClusterConfig::new(name);
        let lease = args.cluster_lease.clone().or_else(|| {
            cluster_file
                .and_then(|c| c.get("lease"))
                .and_then(Value::as_str)
                .map(str::to_owned)
        });
        if let Some(lease) = lease {
            cluster.lease =
                parse_duration(&lease).with_context(|| format!("cluster lease: {lease:?}"))?;
        }
        cluster.validate().map_err(anyhow::Error::msg)?;
        match &config.nats {
            Some(nats) if nats.jetstream => {}
            _ => bail!("--cluster needs --nats with JetStream: the stream is what members share"),
        }
        config.cluster = Some(cluster);
    }
    // `prefect: URL` or `prefect: {api, auth_string, api_key}`; flags win.
    let prefect_file = file.get("prefect");
    let prefect_text = |key: &str| {
        prefect_file
            .and_then(|p| p.get(key))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let prefect_api = args.prefect_api.clone().or_else(|| match prefect_file {
        Some(Value::String(s)) => Some(s.clone()),
        _ => prefect_text("api"),
    });
    if let Some(api) = prefect_api {
        if !(api.starts_with("http://") || api.starts_with("https://")) {
            bail!("prefect api: {api:?} is not an http(s):// URL like http://127.0.0.1:4200/api");
        }
        let mut prefect = spur_ingest::prefect::PrefectConfig::new(api);
        prefect.auth_string = args
            .prefect_auth_string
            .clone()
            .or_else(|| prefect_text("auth_string"));
        prefect.api_key = args
            .prefect_api_key
            .clone()
            .or_else(|| prefect_text("api_key"));
        config.prefect = Some(prefect);
    }
    let log_format = args
        .log_format
        .clone()
        .or_else(|| text("log_format"))
        .unwrap_or_else(|| "pretty".to_owned());
    Ok((config, log_format))
}

fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("SPUR_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    if format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// Runs the daemon until SIGINT/SIGTERM, then shuts down gracefully.
pub fn serve(args: &ServeArgs) -> Result<()> {
    let (config, log_format) = resolve(args)?;
    init_logging(&log_format);
    // Before the runtime and the daemon allocate anything (see the function's docs).
    if let Err(e) = spur_daemon::process::disable_transparent_huge_pages() {
        tracing::debug!(error = %e, "transparent huge pages stay on");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let daemon = Daemon::start(config).await?;
        wait_for_signal().await;
        tracing::info!("shutting down: stopping intake, draining, checkpointing");
        daemon.shutdown().await;
        Ok(())
    })
}

/// `spur worker`: serves a pool until SIGINT/SIGTERM or the connection closes. Refused
/// credentials or a failed TLS handshake stop it at once; a server not reachable yet is
/// waited for (reconnects are retried, as before the credentials existed).
pub fn worker(
    pool: &str,
    nats: &str,
    name: Option<String>,
    connection: &NatsConnectArgs,
) -> Result<()> {
    init_logging("pretty");
    let auth = connection.auth(None)?;
    let name = name.unwrap_or_else(|| {
        let host = std::fs::read_to_string("/etc/hostname").unwrap_or_else(|_| "worker".into());
        format!("{}-{}", host.trim(), std::process::id())
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(async move {
        let client = match spur_ingest::nats::connect_once(nats, &auth, Default::default()).await
        {
            Ok(client) => client,
            Err(e) if e.is_unreachable() => {
                tracing::warn!(error = %e, "NATS at {nats} is not reachable yet: waiting for it");
                spur_ingest::nats::connect_with(nats, &auth, Default::default()).await
            }
            .with_context(|| format!("cannot connect to NATS at {nats}"))?,
            Err(e) => return Err(e).with_context(|| format!("cannot connect to NATS at {nats}")),
        };
        tokio::select! {
            result = spur_action::worker::serve_pool(client, pool, &name) => result.map_err(|e| anyhow::anyhow!("{e}")),
            _ = wait_for_signal() => {
                tracing::info!("worker stopping");
                Ok(())
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_limits_come_from_flags_or_the_config_file() {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("spur.yaml");
        std::fs::write(
            &file,
            "idle_timeout: 30s\nmax_connections: 200\nbody_read_timeout: 5\nmax_processes: 8\nstore_cache_mb: 64\n",
        )
        .expect("config file");
        let args = ServeArgs {
            config: Some(file.clone()),
            header_read_timeout: Some("2s".into()),
            websocket_auth_timeout: Some("PT3S".into()),
            ..ServeArgs::default()
        };
        let (config, _) = resolve(&args).expect("resolves");
        assert_eq!(config.server.header_read_timeout, Duration::from_secs(2));
        assert_eq!(config.server.idle_timeout, Duration::from_secs(30));
        assert_eq!(config.server.body_read_timeout, Duration::from_secs(5));
        assert_eq!(config.server.max_connections, 200);
        assert_eq!(config.max_processes, 8);
        assert_eq!(config.store_cache_bytes, 64 << 20);
        assert_eq!(config.websocket_auth_timeout, Duration::from_secs(3));
        let defaults = resolve(&ServeArgs {
            config: Some(dir.path().join("missing-is-not-read.yaml")),
            ..ServeArgs::default()
        });
        assert!(defaults.is_err(), "a named config file must exist");
        let zero = ServeArgs {
            config: Some(file),
            max_connections: Some(0),
            ..ServeArgs::default()
        };
        assert!(resolve(&zero).is_err());
    }
}
