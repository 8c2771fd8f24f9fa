//! The client commands: `emit`, `events query`, `automations ls`, `firings`. They talk to a
//! running daemon over HTTP (or publish to NATS for `emit --nats`).

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use chrono::Utc;
use serde_json::{Value, json};
use spur_core::{Event, EventLimits};

/// The daemon's base URL from `--api`, `SPUR_API_URL`, or the default. A Prefect-style URL
/// ending in `/api` is accepted too.
pub fn base_url(api: Option<&str>) -> String {
    let url = api
        .map(str::to_owned)
        .unwrap_or_else(|| "http://127.0.0.1:4200".to_owned());
    let url = url.trim_end_matches('/');
    url.strip_suffix("/api").unwrap_or(url).to_owned()
}

/// The credential every request to the daemon carries, set once at start ([`set_credential`]).
static CREDENTIAL: std::sync::OnceLock<Option<Credential>> = std::sync::OnceLock::new();

/// What the CLI authenticates with.
#[derive(Clone, Debug)]
pub enum Credential {
    /// A token (`--token`, `SPUR_API_TOKEN`), or an API key: `Authorization: Bearer`.
    Bearer(String),
    /// Prefect's auth string (`SPUR_AUTH_STRING`): HTTP Basic.
    Basic(String),
}

impl Credential {
    fn header(&self) -> String {
        match self {
            Credential::Bearer(t) => format!("Bearer {t}"),
            Credential::Basic(s) => format!("Basic {}", base64(s.as_bytes())),
        }
    }

    /// What the websocket's in-band `auth` message carries.
    fn in_band(&self) -> &str {
        match self {
            Credential::Bearer(t) | Credential::Basic(t) => t,
        }
    }
}

/// Standard base64 with padding (HTTP Basic's encoding).
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Sets the credential for this process's requests: `--token`/`SPUR_API_TOKEN` first, else
/// `SPUR_AUTH_STRING`.
pub fn set_credential(token: Option<String>) {
    let credential = token
        .filter(|t| !t.is_empty())
        .map(Credential::Bearer)
        .or_else(|| {
            std::env::var("SPUR_AUTH_STRING")
                .ok()
                .filter(|s| !s.is_empty())
                .map(Credential::Basic)
        });
    let _ = CREDENTIAL.set(credential);
}

/// Extra CA certificates (`--ca`/`SPUR_CA_CERT`) every client trusts, set once at start.
static CA: std::sync::OnceLock<Vec<reqwest::Certificate>> = std::sync::OnceLock::new();

/// Reads the `--ca`/`SPUR_CA_CERT` file (PEM, one or more certificates); an unreadable or
/// empty file is an error naming it.
pub fn set_ca(path: Option<&std::path::Path>) -> Result<()> {
    let certs = match path {
        None => Vec::new(),
        Some(path) => {
            let pem = std::fs::read(path)
                .with_context(|| format!("--ca {}: cannot read it", path.display()))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .with_context(|| format!("--ca {}: not PEM certificates", path.display()))?;
            if certs.is_empty() {
                bail!("--ca {}: holds no PEM certificate", path.display());
            }
            certs
        }
    };
    let _ = CA.set(certs);
    Ok(())
}

fn credential() -> Option<&'static Credential> {
    CREDENTIAL.get().and_then(Option::as_ref)
}

/// The one HTTP client every command uses: it sends the credential on every request.
fn http() -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(value) =
        credential().and_then(|c| reqwest::header::HeaderValue::from_str(&c.header()).ok())
    {
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    let mut builder = reqwest::Client::builder().default_headers(headers);
    for cert in CA.get().into_iter().flatten() {
        builder = builder.add_root_certificate(cert.clone());
    }
    builder.build().unwrap_or_default()
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn parse_json_arg(text: Option<&str>, what: &str) -> Result<Option<Value>> {
    text.map(|t| serde_json::from_str(t).with_context(|| format!("{what} is not valid JSON")))
        .transpose()
}

/// Options of `spur emit`.
#[derive(Debug)]
pub struct EmitOptions<'a> {
    pub name: &'a str,
    pub resource: &'a str,
    pub related: Option<&'a str>,
    pub payload: Option<&'a str>,
    pub id: Option<&'a str>,
    pub occurred: Option<&'a str>,
    pub follows: Option<&'a str>,
    pub api: Option<&'a str>,
    pub nats: Option<&'a str>,
    /// Credentials and TLS for `nats`.
    pub nats_connection: &'a crate::serve::NatsConnectArgs,
    pub subject_prefix: &'a str,
}

/// `spur emit`: builds one event, validates it locally, sends it, prints its id.
pub fn emit(o: &EmitOptions<'_>) -> Result<()> {
    let resource: Value = if o.resource.trim_start().starts_with('{') {
        serde_json::from_str(o.resource).context("--resource is not valid JSON")?
    } else {
        json!({"prefect.resource.id": o.resource})
    };
    let related = parse_json_arg(o.related, "--related")?.unwrap_or(json!([]));
    let payload = parse_json_arg(o.payload, "--payload")?.unwrap_or(json!({}));
    let mut raw =
        json!({"event": o.name, "resource": resource, "related": related, "payload": payload});
    if let Some(id) = o.id {
        raw["id"] = json!(id);
    }
    if let Some(at) = o.occurred {
        raw["occurred"] = json!(at);
    }
    if let Some(f) = o.follows {
        raw["follows"] = json!(f);
    }
    let event = Event::from_json(&raw, Utc::now(), &EventLimits::default())
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let rt = runtime()?;
    rt.block_on(async {
        if let Some(url) = o.nats {
            let auth = o.nats_connection.auth(None)?;
            let client = spur_ingest::nats::connect_once(url, &auth, Arc::default())
                .await
                .with_context(|| format!("cannot connect to NATS at {url}"))?;
            let subject = spur_ingest::nats::subject_for(o.subject_prefix, &event.event);
            spur_ingest::nats::publish(&client, subject.clone(), &event)
                .await
                .map_err(|e| anyhow::anyhow!("publishing to {subject}: {e}"))?;
        } else {
            let url = format!("{}/api/events", base_url(o.api));
            let body = json!([{
                "id": event.id, "occurred": spur_core::time::format_timestamp(event.occurred),
                "event": event.event, "resource": event.resource, "related": event.related,
                "payload": event.payload, "follows": event.follows,
            }]);
            let response = http()
                .post(&url)
                .json(&body)
                .send()
                .await
                .with_context(|| {
                    format!("cannot reach the daemon at {url} (is `spur serve` running?)")
                })?;
            let status = response.status();
            if !status.is_success() {
                let text = response.text().await.unwrap_or_default();
                bail!("the daemon refused the event ({status}): {text}");
            }
        }
        Ok::<_, anyhow::Error>(())
    })?;
    println!("{}", event.id);
    Ok(())
}

/// The `/api/events/filter` filter for event names (a trailing `*` means a prefix) and a
/// resource id (likewise), shared by `events tail` and `events query`.
fn event_filter(names: &[String], resource: Option<&str>) -> Result<Value> {
    let mut filter = json!({});
    let (prefixes, exact): (Vec<&String>, Vec<&String>) =
        names.iter().partition(|n| n.ends_with('*'));
    if !prefixes.is_empty() && !exact.is_empty() {
        // Prefect's filter requires an event to match both lists when both are given.
        anyhow::bail!(
            "--name: give exact names or prefixes (ending in *), not both: {}",
            names.join(", ")
        );
    }
    if !names.is_empty() {
        filter["event"] = json!({
            "name": exact,
            "prefix": prefixes.iter().map(|p| p.trim_end_matches('*')).collect::<Vec<_>>(),
        });
    }
    if let Some(r) = resource {
        filter["resource"] = if let Some(p) = r.strip_suffix('*') {
            json!({"id_prefix": [p]})
        } else {
            json!({"id": [r]})
        };
    }
    Ok(filter)
}

fn print_event(e: &Value, as_json: bool) {
    if as_json {
        println!("{e}");
    } else {
        println!(
            "{}  {}  {}",
            e["occurred"].as_str().unwrap_or(""),
            e["event"].as_str().unwrap_or(""),
            e["resource"]["prefect.resource.id"].as_str().unwrap_or("")
        );
    }
}

/// `spur events tail`: the live feed from `/api/events/out` (Prefect's protocol), with the
/// last 15 minutes first unless `--no-backfill`. Runs until interrupted.
pub fn tail(
    api: Option<&str>,
    names: &[String],
    resource: Option<&str>,
    backfill: bool,
    as_json: bool,
) -> Result<()> {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let base = base_url(api);
    let url = format!("{}/api/events/out", base.replacen("http", "ws", 1));
    let filter = event_filter(names, resource)?;
    runtime()?.block_on(async {
        let mut request = url
            .as_str()
            .into_client_request()
            .context("bad --api URL")?;
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            "prefect".parse().context("header")?,
        );
        if let Some(c) = credential() {
            request.headers_mut().insert(
                "Authorization",
                c.header()
                    .parse()
                    .context("the credential is not a valid header")?,
            );
        }
        let (mut socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .with_context(|| format!("cannot reach the daemon at {url}"))?;
        let token = credential().map(Credential::in_band);
        socket
            .send(Message::Text(
                json!({"type": "auth", "token": token}).to_string().into(),
            ))
            .await?;
        socket
            .send(Message::Text(
                json!({"type": "filter", "filter": filter, "backfill": backfill})
                    .to_string()
                    .into(),
            ))
            .await?;
        while let Some(message) = socket.next().await {
            match message? {
                Message::Text(text) => {
                    let v: Value = serde_json::from_str(text.as_str()).unwrap_or(Value::Null);
                    match v["type"].as_str() {
                        Some("event") => print_event(&v["event"], as_json),
                        Some("auth_success") => {}
                        _ => eprintln!("{text}"),
                    }
                }
                Message::Close(frame) => {
                    if let Some(f) = frame {
                        bail!("the daemon closed the feed: {} {}", f.code, f.reason);
                    }
                    break;
                }
                _ => {}
            }
        }
        Ok(())
    })
}

/// `spur events query`.
pub fn query(
    api: Option<&str>,
    since: Option<&str>,
    until: Option<&str>,
    names: &[String],
    resource: Option<&str>,
    limit: usize,
    as_json: bool,
) -> Result<()> {
    let mut filter = event_filter(names, resource)?;
    if let Some(s) = since {
        let since = time_arg(s).context("--since")?;
        filter["occurred"]["since"] = json!(spur_core::time::format_timestamp(since));
    }
    if let Some(u) = until {
        let until = spur_core::time::parse_timestamp_str(u)
            .map_err(anyhow::Error::msg)
            .context("--until")?;
        filter["occurred"]["until"] = json!(spur_core::time::format_timestamp(until));
    }
    let base = base_url(api);
    let rt = runtime()?;
    rt.block_on(async {
        let client = http();
        let mut printed = 0usize;
        let mut response: Value = client
            .post(format!("{base}/api/events/filter"))
            .json(&json!({"filter": filter, "limit": limit.min(50)}))
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {base}"))?
            .error_for_status()?
            .json()
            .await?;
        loop {
            for e in response["events"].as_array().cloned().unwrap_or_default() {
                if printed >= limit {
                    return Ok(());
                }
                printed += 1;
                print_event(&e, as_json);
            }
            let Some(next) = response["next_page"].as_str().map(str::to_owned) else {
                break;
            };
            if printed >= limit {
                break;
            }
            response = client
                .get(page_url(&base, &next))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
        }
        eprintln!("{printed} event(s)");
        Ok::<_, anyhow::Error>(())
    })
}

fn get_json(api: Option<&str>, path: &str) -> Result<Value> {
    let base = base_url(api);
    runtime()?.block_on(async {
        let response = http()
            .get(format!("{base}{path}"))
            .send()
            .await
            .with_context(|| {
                format!("cannot reach the daemon at {base} (is `spur serve` running?)")
            })?
            .error_for_status()?;
        Ok(response.json().await?)
    })
}

/// `spur automations ls`: every loaded automation, a page at a time (the daemon pages
/// `/api/automations`; this follows `next_cursor` to the end).
pub fn automations(api: Option<&str>) -> Result<()> {
    let errors = each_automation_page(api, |page| {
        for a in page {
            let buckets = a["state"]["buckets"].as_array().map_or(0, Vec::len);
            println!(
                "{}  [{} open bucket(s)] ({})",
                a["summary"].as_str().unwrap_or(""),
                buckets,
                a["origin"].as_str().unwrap_or("file")
            );
        }
    })?;
    for e in errors {
        eprintln!("error: {}", e.as_str().unwrap_or(""));
    }
    Ok(())
}

/// The page size `spur` asks `/api/automations` for (the daemon's largest).
const AUTOMATIONS_PAGE: usize = 1_000;

/// Calls `each` with every page of `/api/automations`, following `next_cursor`; returns the
/// load errors of the first page. Stops if a cursor does not advance (a daemon bug must not
/// loop forever).
fn each_automation_page(api: Option<&str>, mut each: impl FnMut(&[Value])) -> Result<Vec<Value>> {
    let mut cursor: Option<String> = None;
    let mut errors = None;
    loop {
        let path = match &cursor {
            Some(c) => format!(
                "/api/automations?limit={AUTOMATIONS_PAGE}&cursor={}",
                percent_encode(c)
            ),
            None => format!("/api/automations?limit={AUTOMATIONS_PAGE}"),
        };
        let body = get_json(api, &path)?;
        each(
            body["automations"]
                .as_array()
                .map_or(&[][..], Vec::as_slice),
        );
        if errors.is_none() {
            errors = Some(body["errors"].as_array().cloned().unwrap_or_default());
        }
        match body["next_cursor"].as_str() {
            Some(next) if cursor.as_deref().is_none_or(|c| next > c) => {
                cursor = Some(next.to_owned())
            }
            _ => break,
        }
    }
    Ok(errors.unwrap_or_default())
}

/// `text` as a URL query value (RFC 3986 unreserved characters kept, the rest `%XX`).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `spur firings`.
pub fn firings(api: Option<&str>, limit: usize) -> Result<()> {
    let body = get_json(api, &format!("/api/firings?limit={limit}"))?;
    for f in body["firings"].as_array().cloned().unwrap_or_default() {
        println!("{f}");
    }
    Ok(())
}

fn send_json(api: Option<&str>, path: &str, body: Value) -> Result<Value> {
    let base = base_url(api);
    runtime()?.block_on(async {
        let response = http()
            .post(format!("{base}{path}"))
            .json(&body)
            .send()
            .await
            .with_context(|| {
                format!("cannot reach the daemon at {base} (is `spur serve` running?)")
            })?;
        let status = response.status();
        let value: Value = response.json().await.unwrap_or(Value::Null);
        if !status.is_success() {
            bail!("{}", value["detail"].as_str().unwrap_or(status.as_str()));
        }
        Ok(value)
    })
}

fn run_line(r: &Value) -> String {
    format!(
        "{}  {:<10} {}  {}{}",
        r["id"].as_str().unwrap_or(""),
        r["state"].as_str().unwrap_or(""),
        r["deployment"].as_str().unwrap_or(""),
        r["created"].as_str().unwrap_or(""),
        r["automation"]
            .as_str()
            .map(|a| format!("  (by {a})"))
            .unwrap_or_default()
    )
}

/// Which runs `spur runs ls` and `spur runs rerun` mean.
#[derive(clap::Args, Debug, Default)]
pub struct RunFilter {
    /// Only runs in this state (Scheduled, Pending, Running, Completed, Failed, Crashed,
    /// Cancelled). Repeatable.
    #[arg(long = "state")]
    pub states: Vec<String>,
    /// Only runs of this deployment.
    #[arg(long)]
    pub deployment: Option<String>,
    /// Only runs launched by this automation.
    #[arg(long)]
    pub automation: Option<String>,
    /// Only runs created since: a duration back from now (`1h`, `30m`) or a timestamp.
    #[arg(long)]
    pub since: Option<String>,
    /// Only runs created before: a duration back from now or a timestamp.
    #[arg(long)]
    pub until: Option<String>,
}

impl RunFilter {
    fn is_empty(&self) -> bool {
        self.states.is_empty()
            && self.deployment.is_none()
            && self.automation.is_none()
            && self.since.is_none()
            && self.until.is_none()
    }

    /// The query string for `/api/runs` (without limit and cursor).
    fn query(&self) -> Result<String> {
        let mut parts = Vec::new();
        let enc = |v: &str| url_encode(v);
        if !self.states.is_empty() {
            parts.push(format!("state={}", enc(&self.states.join(","))));
        }
        if let Some(d) = &self.deployment {
            parts.push(format!("deployment={}", enc(d)));
        }
        if let Some(a) = &self.automation {
            parts.push(format!("automation={}", enc(a)));
        }
        for (name, value) in [("since", &self.since), ("until", &self.until)] {
            if let Some(v) = value {
                let at = time_arg(v).with_context(|| format!("--{name}"))?;
                parts.push(format!(
                    "{name}={}",
                    enc(&spur_core::time::format_timestamp(at))
                ));
            }
        }
        Ok(parts.join("&"))
    }
}

/// A duration back from now (`1h`) or a timestamp.
fn time_arg(value: &str) -> Result<chrono::DateTime<Utc>> {
    match crate::serve::parse_duration(value) {
        Ok(d) => Ok(Utc::now() - chrono::TimeDelta::from_std(d).context("too large")?),
        Err(_) => spur_core::time::parse_timestamp_str(value).map_err(|e| {
            anyhow::anyhow!("{value:?}: neither a duration (1h) nor a timestamp: {e}")
        }),
    }
}

fn url_encode(value: &str) -> String {
    let mut out = String::new();
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Every run `filter` matches (up to `limit`), newest first, following the API's pages.
fn matching_runs(
    api: Option<&str>,
    limit: Option<usize>,
    filter: &RunFilter,
) -> Result<Vec<Value>> {
    let query = filter.query()?;
    let mut runs = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let want = limit.map_or(1000, |l| (l - runs.len()).min(1000));
        let mut path = format!("/api/runs?limit={want}");
        if !query.is_empty() {
            path.push('&');
            path.push_str(&query);
        }
        if let Some(c) = &cursor {
            path.push_str(&format!("&cursor={}", url_encode(c)));
        }
        let body = get_json(api, &path)?;
        runs.extend(body["runs"].as_array().cloned().unwrap_or_default());
        cursor = body["next"].as_str().map(str::to_owned);
        if cursor.is_none() || limit.is_some_and(|l| runs.len() >= l) {
            return Ok(runs);
        }
    }
}

/// `spur runs ls`.
pub fn runs_ls(api: Option<&str>, limit: Option<usize>, filter: &RunFilter) -> Result<()> {
    for r in matching_runs(api, limit, filter)? {
        println!("{}", run_line(&r));
    }
    Ok(())
}

/// `spur runs rerun`: by id, or every run the filter matches.
pub fn runs_rerun(api: Option<&str>, ids: &[String], filter: &RunFilter) -> Result<()> {
    let ids: Vec<String> = if ids.is_empty() {
        if filter.is_empty() {
            bail!("name the runs to rerun: ids, or a filter such as --state Crashed --since 1h");
        }
        matching_runs(api, None, filter)?
            .iter()
            .filter_map(|r| r["id"].as_str().map(str::to_owned))
            .collect()
    } else {
        ids.to_vec()
    };
    if ids.is_empty() {
        eprintln!("no run matches");
    }
    let mut failed = 0;
    for id in &ids {
        match send_json(api, &format!("/api/runs/{id}/rerun"), json!({})) {
            Ok(run) => println!("{}  (rerun of {id})", run_line(&run)),
            Err(e) => {
                failed += 1;
                eprintln!("{id}: {e:#}");
            }
        }
    }
    if failed > 0 {
        bail!("{failed} of {} run(s) could not be rerun", ids.len());
    }
    Ok(())
}

/// `spur runs get`.
pub fn runs_get(api: Option<&str>, id: &str) -> Result<()> {
    let run = get_json(api, &format!("/api/runs/{id}"))?;
    println!("{}", serde_json::to_string_pretty(&run)?);
    Ok(())
}

/// `spur runs start`.
pub fn runs_start(
    api: Option<&str>,
    deployment: &str,
    params: &[String],
    params_json: Option<&str>,
) -> Result<()> {
    let mut parameters = parse_json_arg(params_json, "--params-json")?.unwrap_or(json!({}));
    for p in params {
        let (k, v) = p
            .split_once('=')
            .with_context(|| format!("--param {p:?}: expected key=value"))?;
        parameters[k] = serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.to_owned()));
    }
    let run = send_json(
        api,
        "/api/runs",
        json!({"deployment": deployment, "parameters": parameters}),
    )?;
    println!("{}", run_line(&run));
    Ok(())
}

/// `spur runs cancel`.
pub fn runs_cancel(api: Option<&str>, id: &str) -> Result<()> {
    let run = send_json(api, &format!("/api/runs/{id}/cancel"), json!({}))?;
    println!("{}", run_line(&run));
    Ok(())
}

/// `spur cluster status`: one line per member (its share of partitions and automations,
/// its lag behind the stream), then the partitions nobody holds, if any.
pub fn cluster_status(api: Option<&str>, as_json: bool) -> Result<()> {
    let body = get_json(api, "/api/cluster")?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let name = body["name"].as_str().unwrap_or("?");
    let here = body["instance"].as_str().unwrap_or("");
    let members = body["members"].as_array().cloned().unwrap_or_default();
    println!(
        "cluster {name}: {} member(s), lease {}s, stream at {}",
        members.len(),
        body["lease_seconds"],
        body["stream_last_seq"]
    );
    println!(
        "{:<38} {:>10} {:>11} {:>8}  api",
        "member", "partitions", "automations", "lag"
    );
    for m in &members {
        let id = m["instance"].as_str().unwrap_or("?");
        let marker = if id == here { " *" } else { "" };
        println!(
            "{:<38} {:>10} {:>11} {:>8}  {}{marker}",
            id,
            m["partitions"].as_array().map_or(0, Vec::len),
            m["automations"],
            m["lag"],
            m["api"].as_str().unwrap_or(""),
        );
    }
    let unowned: Vec<usize> = body["partitions"]
        .as_array()
        .map(|p| {
            p.iter()
                .enumerate()
                .filter(|(_, o)| o.is_null())
                .map(|(i, _)| i)
                .collect()
        })
        .unwrap_or_default();
    if !unowned.is_empty() {
        println!("unowned partitions (a takeover in progress): {unowned:?}");
    }
    println!(
        "(* answered; {} firing(s) parked here for other members)",
        body["parked_here"]
    );
    Ok(())
}

/// `spur actions failed`.
pub fn actions_failed(api: Option<&str>) -> Result<()> {
    let body = get_json(api, "/api/actions/failed")?;
    for f in body["failed"].as_array().cloned().unwrap_or_default() {
        println!("{f}");
    }
    Ok(())
}

/// `spur actions retry`.
pub fn actions_retry(api: Option<&str>, id: &str) -> Result<()> {
    let body = send_json(api, &format!("/api/actions/failed/{id}/retry"), json!({}))?;
    println!("{body}");
    Ok(())
}

/// Every stored event between `since` (a duration back from now, or a timestamp) and `until`,
/// oldest first, paging through `/api/events/filter`.
pub fn fetch_events(api: Option<&str>, since: &str, until: Option<&str>) -> Result<Vec<Value>> {
    let since = time_arg(since).context("--since")?;
    let mut filter = json!({
        "occurred": {"since": spur_core::time::format_timestamp(since)},
        "order": "ASC",
    });
    if let Some(u) = until {
        let until = spur_core::time::parse_timestamp_str(u)
            .map_err(anyhow::Error::msg)
            .context("--until")?;
        filter["occurred"]["until"] = json!(spur_core::time::format_timestamp(until));
    }
    let base = base_url(api);
    runtime()?.block_on(async {
        let client = http();
        let mut out: Vec<Value> = Vec::new();
        let mut page: Value = client
            .post(format!("{base}/api/events/filter"))
            .json(&json!({"filter": filter, "limit": 50}))
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {base}"))?
            .error_for_status()?
            .json()
            .await?;
        loop {
            out.extend(page["events"].as_array().cloned().unwrap_or_default());
            let Some(next) = page["next_page"].as_str().map(str::to_owned) else {
                break;
            };
            page = client
                .get(page_url(&base, &next))
                .send()
                .await?
                .error_for_status()?
                .json()
                .await?;
        }
        // The daemon pages in `occurred` order; a replay runs in arrival order, as the
        // daemon evaluated them (a backdated event arrived after the ones it precedes).
        // The sort is stable: events received together keep their `occurred` order.
        out.sort_by_cached_key(|e| {
            e.get("received")
                .and_then(|r| spur_core::time::parse_timestamp(r).ok())
        });
        Ok(out)
    })
}

/// A `next_page` link as given (the daemon answers with absolute URLs, like Prefect), or
/// joined to `base` when it is a path.
fn page_url(base: &str, next: &str) -> String {
    if next.starts_with("http://") || next.starts_with("https://") {
        next.to_owned()
    } else {
        format!("{base}{next}")
    }
}

/// `spur explain`: one line per candidate automation, in words.
pub fn explain(api: Option<&str>, id: &str, as_json: bool) -> Result<()> {
    let body = get_json(api, &format!("/api/events/{id}/explain"))?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&body)?);
        return Ok(());
    }
    let e = &body["event"];
    let fate = match body["fate"]["kind"].as_str() {
        Some("evaluated") => "evaluated".to_owned(),
        Some("ignored_log_write") => {
            "ignored (prefect.log.write events are not evaluated)".to_owned()
        }
        Some("duplicate") => "ignored: an event with this id was already processed".to_owned(),
        Some("held") => format!(
            "held until the event it follows ({}) is processed",
            body["fate"]["leader"].as_str().unwrap_or("?")
        ),
        _ => "no decisions recorded".to_owned(),
    };
    println!(
        "{} {} on {} — {fate}",
        e["id"].as_str().unwrap_or(""),
        e["event"].as_str().unwrap_or(""),
        e["resource"]["prefect.resource.id"].as_str().unwrap_or("")
    );
    let decisions = body["decisions"].as_array().cloned().unwrap_or_default();
    if decisions.is_empty() && body["fate"]["kind"] == "evaluated" {
        println!("  no automation's expect/after names could match this event name");
    }
    let key = |d: &Value| {
        let k = d["key"].as_array().cloned().unwrap_or_default();
        if k.is_empty() {
            String::new()
        } else {
            format!(" for key {}", Value::Array(k))
        }
    };
    for d in decisions {
        let name = d["automation"].as_str().unwrap_or("");
        let line = match d["outcome"].as_str().unwrap_or("") {
            "name_mismatch" => format!(
                "event name {} does not match expect/after {}",
                d["name"], d["patterns"]
            ),
            "match_failed" => format!(
                "match: label {:?} is {} which does not match {}",
                d["label"].as_str().unwrap_or(""),
                if d["value"].is_null() {
                    "missing (a missing label never matches)".to_owned()
                } else {
                    d["value"].to_string()
                },
                d["patterns"]
            ),
            "match_related_failed" => format!(
                "match_related[{}]: no related resource matches {}",
                d["spec"], d["labels"]
            ),
            "own_event" => {
                "ignored: an automation does not react to its own prefect.automation.* events"
                    .to_owned()
            }
            "opened_window" => format!("an `after` event: opened the window{}", key(&d)),
            "no_open_window" => format!(
                "expected, but no window is open{} (waiting for an `after` event)",
                key(&d)
            ),
            "late" => format!(
                "late: older than the window start {}{}; not counted",
                d["window_start"].as_str().unwrap_or(""),
                key(&d)
            ),
            "counted" => format!(
                "counted {} of threshold {}{} in window {} – {}",
                d["count"],
                d["threshold"],
                key(&d),
                d["window_start"].as_str().unwrap_or(""),
                d["window_end"].as_str().unwrap_or("")
            ),
            "fired" => format!("fired {}", d["firings"]),
            "flow_waiting" => format!(
                "its firing waits in flow control: {} (key {}), {} waiting, until {}",
                match d["flow"].as_str() {
                    Some("debounce") => "collapsed into a debounce",
                    Some("batch") => "collected into a batch",
                    Some("throttle") => "delayed by a throttle",
                    _ => "held",
                },
                d["key"],
                d["waiting"],
                d["until"].as_str().unwrap_or("a slot frees up")
            ),
            "flow_skipped" => format!(
                "its firing was skipped by flow control: {}",
                d["reason"].as_str().unwrap_or("")
            ),
            other => other.to_owned(),
        };
        println!("  {name}: {line}");
    }
    if let Some(omitted) = body["mismatches_omitted"].as_u64().filter(|n| *n > 0) {
        println!(
            "  … and {omitted} more automation(s) whose names or filters ruled the event out (not recorded: only the first few per event are kept)"
        );
    }
    Ok(())
}

/// `spur automations pause|resume`.
pub fn set_paused(api: Option<&str>, automation: &str, paused: bool) -> Result<()> {
    let verb = if paused { "pause" } else { "resume" };
    let body = send_json(
        api,
        &format!("/api/automations/{automation}/{verb}"),
        json!({}),
    )?;
    println!(
        "{} {}",
        body["name"].as_str().unwrap_or(automation),
        if paused { "paused" } else { "resumed" }
    );
    Ok(())
}

/// The daemon's automations as `/api/automations` lists them.
pub fn loaded_automations(api: Option<&str>) -> Result<Vec<Value>> {
    let mut all = Vec::new();
    each_automation_page(api, |page| all.extend_from_slice(page))?;
    Ok(all)
}

fn print_webhook(v: &Value) {
    println!(
        "{}  {}",
        v["id"].as_str().unwrap_or(""),
        v["url"].as_str().unwrap_or("")
    );
    println!(
        "  name: {}  enabled: {}  auth: {}",
        v["name"].as_str().unwrap_or(""),
        v["effective_enabled"],
        if v["auth"].is_null() {
            "none".to_owned()
        } else {
            v["auth"].to_string()
        }
    );
    if let Some(key) = v["api_key"].as_str() {
        println!("  api key (shown once): {key}");
    }
    let failure = &v["last_failure"];
    if failure.is_object() {
        println!(
            "  last failure: {}  {} ({}, {})  {} since start",
            failure["at"].as_str().unwrap_or(""),
            failure["reason"].as_str().unwrap_or(""),
            failure["reason_code"].as_str().unwrap_or(""),
            failure["stage"].as_str().unwrap_or(""),
            failure["count"],
        );
    } else {
        println!("  last failure: none since start");
    }
}

/// `spur webhook create`.
pub fn webhook_create(
    api: Option<&str>,
    name: &str,
    template: &str,
    description: Option<&str>,
    auth: Option<&str>,
    secrets: &[String],
) -> Result<()> {
    let auth = match auth {
        None => Value::Null,
        Some("api-key" | "api_key") => json!({"type": "api_key"}),
        Some(preset @ ("github" | "stripe" | "standard" | "generic")) => {
            json!({"type": "hmac", "preset": preset, "secrets": secrets})
        }
        Some(other) => {
            bail!("--auth: api-key, github, stripe, standard or generic (got {other:?})")
        }
    };
    let body = json!({"name": name, "template": template, "description": description.unwrap_or(""), "auth": auth});
    print_webhook(&send_json(api, "/api/webhooks", body)?);
    Ok(())
}

/// `spur webhook get`.
pub fn webhook_show(api: Option<&str>, id: &str) -> Result<()> {
    let v = get_json(api, &format!("/api/webhooks/{id}"))?;
    print_webhook(&v);
    println!("  template: {}", v["template"].as_str().unwrap_or(""));
    Ok(())
}

/// `spur webhook ls`.
pub fn webhook_ls(api: Option<&str>) -> Result<()> {
    let body = get_json(api, "/api/webhooks")?;
    for v in body["webhooks"].as_array().cloned().unwrap_or_default() {
        print_webhook(&v);
    }
    Ok(())
}

/// `spur webhook toggle|rotate`.
pub fn webhook_post(api: Option<&str>, id: &str, verb: &str) -> Result<()> {
    print_webhook(&send_json(
        api,
        &format!("/api/webhooks/{id}/{verb}"),
        json!({}),
    )?);
    Ok(())
}

/// `spur webhook delete`.
pub fn webhook_delete(api: Option<&str>, id: &str) -> Result<()> {
    let base = base_url(api);
    runtime()?.block_on(async {
        let response = http()
            .delete(format!("{base}/api/webhooks/{id}"))
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {base}"))?;
        if !response.status().is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            bail!("{}", body["detail"].as_str().unwrap_or("delete failed"));
        }
        println!("deleted");
        Ok(())
    })
}

/// `spur tokens create`: prints the secret (shown once).
pub fn tokens_create(api: Option<&str>, name: &str, scope: &str) -> Result<()> {
    let v = send_json(api, "/api/tokens", json!({"name": name, "scope": scope}))?;
    println!("{}", v["token"].as_str().unwrap_or(""));
    eprintln!(
        "token {name:?} ({scope}) created; the secret above is shown only now. Use it as SPUR_API_TOKEN, --token, PREFECT_API_KEY or `Authorization: Bearer`."
    );
    Ok(())
}

/// `spur tokens ls`.
pub fn tokens_ls(api: Option<&str>) -> Result<()> {
    let v = get_json(api, "/api/tokens")?;
    for t in v.as_array().cloned().unwrap_or_default() {
        println!(
            "{}  {}  created {}",
            t["name"].as_str().unwrap_or(""),
            t["scope"].as_str().unwrap_or(""),
            t["created"].as_str().unwrap_or("")
        );
    }
    Ok(())
}

/// `spur tokens revoke`.
pub fn tokens_revoke(api: Option<&str>, name: &str) -> Result<()> {
    let base = base_url(api);
    runtime()?.block_on(async {
        let response = http()
            .delete(format!("{base}/api/tokens/{}", url_encode(name)))
            .send()
            .await
            .with_context(|| format!("cannot reach the daemon at {base}"))?;
        if !response.status().is_success() {
            let body: Value = response.json().await.unwrap_or(Value::Null);
            bail!("{}", body["detail"].as_str().unwrap_or("revoke failed"));
        }
        println!("revoked");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn basic_auth_encoding() {
        assert_eq!(super::base64(b"user:pass"), "dXNlcjpwYXNz");
        assert_eq!(super::base64(b"a"), "YQ==");
        assert_eq!(super::base64(b"ab"), "YWI=");
    }
}
