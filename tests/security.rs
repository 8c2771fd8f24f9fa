//! Security, end to end on the real binary (loopback, free ports, temp folders): every route of
//! the router behind the auth layer with the scope `spur_daemon::api::ROUTES` lists, scoped
//! tokens made with `spur tokens` and sent by the CLI, malformed credentials and 10 000 wrong
//! guesses, `--metrics-open`, cross-site refusals, the stock Prefect client and CLI with
//! `PREFECT_API_AUTH_STRING` / `PREFECT_API_KEY`, webhook replay across a restart, the
//! start-up checks for binding beyond loopback, TLS for the API, and NATS credentials and TLS
//! for `spur serve`, `spur emit --nats` and `spur worker`.

mod support;

use std::time::Duration;

use serde_json::{Value, json};
use spur_daemon::auth::Scope;
use spur_ingest::webhook::auth::sign;
use support::{SpurDaemon, automations_folder, eventually, request};

const ADMIN: &str = "admin:s3cret-pass";

fn basic(credentials: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// `spur tokens …` against `daemon`, with `SPUR_AUTH_STRING` (or none): (success, stdout, stderr).
fn tokens_cli(
    daemon: &SpurDaemon,
    auth_string: Option<&str>,
    args: &[&str],
) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spur"));
    command
        .arg("tokens")
        .args(args)
        .args(["--api", &daemon.url])
        .env_remove("SPUR_API_TOKEN")
        .env_remove("SPUR_AUTH_STRING");
    if let Some(a) = auth_string {
        command.env("SPUR_AUTH_STRING", a);
    }
    let out = command.output().expect("spur runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn create_token(daemon: &SpurDaemon, name: &str, scope: &str) -> String {
    let (ok, stdout, stderr) = tokens_cli(daemon, Some(ADMIN), &["create", name, "--scope", scope]);
    assert!(ok, "{stdout}{stderr}");
    let secret = stdout.trim().to_owned();
    assert!(secret.starts_with("spur_"), "{stdout}");
    secret
}

fn with_auth(value: &str) -> Vec<(&'static str, String)> {
    vec![
        ("authorization", value.to_owned()),
        ("content-type", "application/json".to_owned()),
    ]
}

fn start_with_auth(dir: &std::path::Path) -> SpurDaemon {
    let automations = automations_folder(dir, &[]);
    SpurDaemon::start(&dir.join("data"), &automations, &["--auth-string", ADMIN])
}

/// Every `(method, route)` of the router: refused without credentials (401 with the Basic
/// challenge), accepted with a credential whose scope covers it, refused (403) with one whose
/// scope does not. The list is the router's own (`ROUTES`, which a unit test compares with
/// the routes the code declares), so a new route is covered here as soon as it exists.
#[test]
fn every_route_needs_its_scope() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_with_auth(dir.path());
    let write = create_token(&daemon, "publisher", "events:write");
    let read = create_token(&daemon, "dashboard", "events:read");
    let admin = create_token(&daemon, "operator", "admin");
    let (ok, listed, _) = tokens_cli(&daemon, Some(ADMIN), &["ls"]);
    assert!(ok);
    assert!(listed.contains("publisher  events:write"), "{listed}");
    assert!(!listed.contains(&write), "secrets are never listed");

    let credentials = [
        (
            "events:write",
            format!("Bearer {write}"),
            Scope::EventsWrite,
        ),
        ("events:read", format!("Bearer {read}"), Scope::EventsRead),
        ("admin token", format!("Bearer {admin}"), Scope::Admin),
        ("auth string", basic(ADMIN), Scope::Admin),
    ];
    let mut checked = 0;
    for (method, route, needed) in spur_daemon::api::ROUTES {
        let path = route
            .split('/')
            .map(|s| if s.starts_with('{') { "x" } else { s })
            .collect::<Vec<_>>()
            .join("/");
        let url = format!("{}{path}", daemon.url);
        let body = if *method == "GET" || *method == "HEAD" || *method == "DELETE" {
            Vec::new()
        } else {
            b"{}".to_vec()
        };
        let (status, text) = request(
            method,
            &url,
            &[("content-type", "application/json".to_owned())],
            body.clone(),
        );
        if *needed == Scope::Open {
            assert_ne!(status, 401, "{method} {route} is open: {text}");
        } else {
            assert_eq!(status, 401, "{method} {route} without credentials: {text}");
            if *method != "HEAD" {
                let v: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                assert!(v["detail"].is_string(), "{method} {route}: {text}");
            }
        }
        for (who, header, granted) in &credentials {
            let (status, text) = request(method, &url, &with_auth(header), body.clone());
            if granted.covers(*needed) {
                assert!(
                    status != 401 && status != 403,
                    "{method} {route} with {who}: {status} {text}"
                );
            } else {
                assert_eq!(status, 403, "{method} {route} with {who}: {text}");
            }
        }
        checked += 1;
    }
    assert!(checked > 40, "{checked} routes");

    // The challenge browsers answer with the Basic prompt.
    let response = support_runtime().block_on(async {
        reqwest::Client::new()
            .get(format!("{}/", daemon.url))
            .send()
            .await
            .expect("answers")
    });
    assert_eq!(response.status(), 401);
    assert_eq!(
        response.headers()["www-authenticate"],
        "Basic realm=\"spur\""
    );

    // The CLI sends a token from `--token` or `SPUR_API_TOKEN`, and its scope applies.
    let cli = |args: &[&str], flag: Option<&str>, env: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spur"));
        command
            .args(args)
            .args(["--api", &daemon.url])
            .env_remove("SPUR_API_TOKEN")
            .env_remove("SPUR_AUTH_STRING");
        if let Some(t) = flag {
            command.args(["--token", t]);
        }
        if let Some(t) = env {
            command.env("SPUR_API_TOKEN", t);
        }
        let out = command.output().expect("spur runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = cli(&["automations", "ls"], Some(&read), None);
    assert!(ok, "--token with events:read lists automations: {stderr}");
    let (ok, stderr) = cli(&["automations", "ls"], None, Some(&read));
    assert!(
        ok,
        "SPUR_API_TOKEN with events:read lists automations: {stderr}"
    );
    let (ok, stderr) = cli(&["tokens", "ls"], Some(&read), None);
    assert!(
        !ok && stderr.contains("403"),
        "events:read cannot manage tokens: {stderr}"
    );
    let (ok, stderr) = cli(&["tokens", "ls"], None, Some(&admin));
    assert!(
        ok,
        "an admin token in SPUR_API_TOKEN manages tokens: {stderr}"
    );
    let (ok, _) = cli(&["automations", "ls"], None, None);
    assert!(!ok, "no credential, no listing");

    // A revoked token is refused at once.
    let (ok, _, stderr) = tokens_cli(&daemon, Some(ADMIN), &["revoke", "dashboard"]);
    assert!(ok, "{stderr}");
    let (status, _) = request(
        "GET",
        &format!("{}/api/firings", daemon.url),
        &with_auth(&format!("Bearer {read}")),
        Vec::new(),
    );
    assert_eq!(status, 401);
    // Token management needs admin.
    let (ok, _, stderr) = tokens_cli(&daemon, None, &["ls"]);
    assert!(!ok, "{stderr}");
}

/// `--metrics-open`: `/metrics` answers without credentials while every other protected
/// route still needs one; without the flag `/metrics` needs `events:read`.
#[test]
fn metrics_can_be_left_open_while_auth_is_on() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let open = SpurDaemon::start(
        &dir.path().join("open"),
        &automations,
        &["--auth-string", ADMIN, "--metrics-open"],
    );
    let (status, text) = request("GET", &format!("{}/metrics", open.url), &[], Vec::new());
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("spur_api_auth_refused_total"), "{text}");
    let (status, _) = request("GET", &format!("{}/api/firings", open.url), &[], Vec::new());
    assert_eq!(status, 401);
    let (status, _) = request("GET", &format!("{}/", open.url), &[], Vec::new());
    assert_eq!(status, 401);
    drop(open);
    let closed = start_with_auth(dir.path());
    let (status, _) = request("GET", &format!("{}/metrics", closed.url), &[], Vec::new());
    assert_eq!(status, 401);
}

/// A runtime for the test's own async clients, with the process's TLS crypto provider
/// installed (reqwest needs one; without it the first client of a test would panic).
fn support_runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Raw request with arbitrary header bytes: the status code.
fn raw_status(url: &str, authorization: &[u8]) -> u16 {
    support_runtime().block_on(async {
        let value = reqwest::header::HeaderValue::from_bytes(authorization).expect("header");
        reqwest::Client::new()
            .post(format!("{url}/api/events/filter"))
            .header("authorization", value)
            .header("content-type", "application/json")
            .body("{}")
            .send()
            .await
            .expect("answers")
            .status()
            .as_u16()
    })
}

/// Malformed `Authorization` headers (huge, not UTF-8, wrong scheme, empty, bad base64) and
/// 10 000 wrong guesses in a row: 401 each, the daemon stays up, the traffic with the right
/// credential alongside is unaffected, and the refusals are counted.
#[test]
fn malformed_credentials_are_refused_and_the_daemon_stays_up() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_with_auth(dir.path());
    let huge = format!("Bearer {}", "A".repeat(32 * 1024));
    let cases: Vec<Vec<u8>> = vec![
        huge.into_bytes(),
        b"Bearer \xff\xfe\xfd".to_vec(),
        b"Basic \xc3\x28".to_vec(),
        b"Digest username=admin".to_vec(),
        b"".to_vec(),
        b"Bearer".to_vec(),
        b"Bearer ".to_vec(),
        b"Basic !!!not-base64".to_vec(),
        basic("admin:wrong").into_bytes(),
        basic("nobody:s3cret-pass").into_bytes(),
        format!("Basic {}", "QQ==".repeat(2000)).into_bytes(),
    ];
    for case in &cases {
        assert_eq!(
            raw_status(&daemon.url, case),
            401,
            "{:?}",
            String::from_utf8_lossy(&case[..case.len().min(40)])
        );
    }
    // 10 000 wrong guesses in a row (four clients at once, kept-alive connections), while a
    // publisher with the right credential goes on sending events: every guess is a 401,
    // every event is accepted, and the events are all stored.
    const GUESSES: usize = 10_000;
    let (refused, published) = support_runtime().block_on(async {
        let client = reqwest::Client::new();
        let guessers = (0..4).map(|worker| {
            let client = client.clone();
            let url = format!("{}/api/events/filter", daemon.url);
            async move {
                let mut refused = 0;
                for n in (worker..GUESSES).step_by(4) {
                    let guess = if n % 2 == 0 {
                        format!("Bearer spur_guess-{n}")
                    } else {
                        basic(&format!("admin:guess-{n}"))
                    };
                    let status = client
                        .post(&url)
                        .header("authorization", guess)
                        .header("content-type", "application/json")
                        .body("{}")
                        .send()
                        .await
                        .expect("answers")
                        .status();
                    assert_eq!(status, 401, "guess {n}");
                    refused += 1;
                }
                refused
            }
        });
        let guessing = futures_util::future::join_all(guessers);
        let publisher = async {
            let mut sent = 0;
            for n in 0..50 {
                let status = client
                    .post(format!("{}/api/events", daemon.url))
                    .header("authorization", basic(ADMIN))
                    .json(&json!([{"event": "during.guesses", "resource": {"prefect.resource.id": format!("r.{n}")}}]))
                    .send()
                    .await
                    .expect("answers")
                    .status();
                assert_eq!(status, 204, "a good request among the guesses");
                sent += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sent
        };
        let (refused, sent) = tokio::join!(guessing, publisher);
        (refused.into_iter().sum::<usize>(), sent)
    });
    assert_eq!(refused, GUESSES);
    let (status, body) = request(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        &with_auth(&basic(ADMIN)),
        json!({"filter": {"event": {"name": ["during.guesses"]}}})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let total = serde_json::from_str::<Value>(&body).expect("json")["total"].clone();
    assert_eq!(total, published, "{body}");
    let (status, _) = request("GET", &format!("{}/healthz", daemon.url), &[], Vec::new());
    assert_eq!(status, 200);
    assert_eq!(raw_status(&daemon.url, basic(ADMIN).as_bytes()), 200);
    let (status, metrics) = request(
        "GET",
        &format!("{}/metrics", daemon.url),
        &with_auth(&basic(ADMIN)),
        Vec::new(),
    );
    assert_eq!(status, 200);
    let invalid = metrics
        .lines()
        .find(|l| l.starts_with("spur_api_auth_refused_total{reason=\"invalid\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(invalid >= GUESSES as u64, "{metrics}");
}

/// State-changing requests from another site are refused even with good credentials (a
/// browser would attach the cached Basic credentials); same-origin and non-browser ones pass.
#[test]
fn cross_site_requests_are_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_with_auth(dir.path());
    let url = format!("{}/api/events", daemon.url);
    let event = json!([{"event": "x.y", "resource": {"prefect.resource.id": "r"}}])
        .to_string()
        .into_bytes();
    let mut headers = with_auth(&basic(ADMIN));
    headers.push(("origin", "http://evil.example".to_owned()));
    assert_eq!(request("POST", &url, &headers, event.clone()).0, 403);
    let mut headers = with_auth(&basic(ADMIN));
    headers.push(("sec-fetch-site", "cross-site".to_owned()));
    assert_eq!(request("POST", &url, &headers, event.clone()).0, 403);
    let mut headers = with_auth(&basic(ADMIN));
    headers.push(("origin", daemon.url.clone()));
    assert_eq!(request("POST", &url, &headers, event.clone()).0, 204);
    assert_eq!(
        request("POST", &url, &with_auth(&basic(ADMIN)), event).0,
        204
    );
    // No permissive CORS.
    let response = support_runtime().block_on(async {
        reqwest::Client::new()
            .get(format!("{}/api/firings", daemon.url))
            .header("authorization", basic(ADMIN))
            .header("origin", "http://evil.example")
            .send()
            .await
            .expect("answers")
    });
    assert!(
        response
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
}

/// The websockets' in-band `auth` message: a token whose scope covers the socket passes, a
/// read-only token cannot publish.
#[test]
fn websocket_in_band_auth_follows_scopes() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;

    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_with_auth(dir.path());
    let write = create_token(&daemon, "publisher", "events:write");
    let read = create_token(&daemon, "dashboard", "events:read");
    let ws = daemon.url.replacen("http", "ws", 1);
    let first_answer = |path: &str, token: Option<&str>| {
        let url = format!("{ws}{path}");
        let token = token.map(str::to_owned);
        support_runtime().block_on(async move {
            let mut request = url.as_str().into_client_request().expect("request");
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "prefect".parse().expect("header"));
            let (mut socket, _) = tokio_tungstenite::connect_async(request)
                .await
                .expect("upgrade");
            socket
                .send(Message::Text(
                    json!({"type": "auth", "token": token}).to_string().into(),
                ))
                .await
                .expect("send");
            match tokio::time::timeout(Duration::from_secs(5), socket.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => t.to_string(),
                Ok(Some(Ok(Message::Close(Some(f))))) => format!("close {}", u16::from(f.code)),
                other => format!("{other:?}"),
            }
        })
    };
    assert!(first_answer("/api/events/in", Some(&write)).contains("auth_success"));
    assert!(first_answer("/api/events/in", Some(ADMIN)).contains("auth_success"));
    assert_eq!(first_answer("/api/events/in", Some(&read)), "close 1008");
    assert_eq!(first_answer("/api/events/in", None), "close 1008");
    assert!(first_answer("/api/events/out", Some(&read)).contains("auth_success"));
    assert_eq!(first_answer("/api/events/out", Some(&write)), "close 1008");
    assert_eq!(first_answer("/api/events/out", Some("wrong")), "close 1008");
}

/// An API key for `--api-key` (Prefect's `PREFECT_API_KEY`, sent as a bearer).
const API_KEY: &str = "pnu_spur-test-api-key";

/// How a Prefect client process authenticates: its `PREFECT_API_AUTH_STRING` or
/// `PREFECT_API_KEY`, or neither.
#[derive(Clone, Copy)]
enum PrefectAuth<'a> {
    AuthString(&'a str),
    ApiKey(&'a str),
    None,
}

/// A Prefect client process (the provisioned `python`, or `prefect` beside it) pointed at
/// `daemon` with `auth`, in a `PREFECT_HOME` of its own under `dir`.
fn prefect_command(
    program: &std::path::Path,
    daemon: &SpurDaemon,
    dir: &std::path::Path,
    auth: PrefectAuth<'_>,
) -> std::process::Command {
    let mut command = std::process::Command::new(program);
    command
        .env("PREFECT_API_URL", format!("{}/api", daemon.url))
        .env("PREFECT_HOME", dir.join("prefect-home"))
        .env("DO_NOT_TRACK", "1")
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        .env("PREFECT_CLI_WRAP_LINES", "false")
        .env("COLUMNS", "200")
        .env_remove("PREFECT_API_AUTH_STRING")
        .env_remove("PREFECT_API_KEY")
        .env_remove("PREFECT_PROFILE");
    match auth {
        PrefectAuth::AuthString(a) => {
            command.env("PREFECT_API_AUTH_STRING", a);
        }
        PrefectAuth::ApiKey(k) => {
            command.env("PREFECT_API_KEY", k);
        }
        PrefectAuth::None => {}
    }
    command
}

/// The `prefect` command of the provisioned virtualenv (beside its `python`).
fn prefect_cli(python: &str) -> std::path::PathBuf {
    let cli = std::path::Path::new(python).with_file_name("prefect");
    assert!(cli.exists(), "no prefect CLI beside {python}");
    cli
}

/// The stock Prefect client with auth on. `emit_event` (the `/api/events/in` websocket) and
/// `read_events` (REST) work with `PREFECT_API_AUTH_STRING` — the auth string, or a scoped
/// token in its place (a publisher's `events:write` token emits, a dashboard's
/// `events:read` token reads). `PREFECT_API_KEY` (the daemon's `--api-key`, or a token) works
/// for REST: Prefect's clients send it as a bearer there, and never on the websockets of a
/// server that is not Prefect Cloud. Without credentials, or with the wrong scope, reading
/// is refused.
#[test]
fn the_stock_prefect_client_works_with_the_auth_string() {
    let Some(python) = support::require_prefect_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations_folder(dir.path(), &[]),
        &["--auth-string", ADMIN, "--api-key", API_KEY],
    );
    let write = create_token(&daemon, "publisher", "events:write");
    let read = create_token(&daemon, "dashboard", "events:read");
    // `emit TAG`: two events on resource TAG, their ids printed; `read TAG`: the ids of the
    // events stored on TAG and the total.
    let script = r#"
import asyncio, sys
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

mode, tag = sys.argv[1], sys.argv[2]
if mode == "emit":
    ids = [str(emit_event(event="secure.ping", resource={"prefect.resource.id": tag}).id) for _ in range(2)]
    EventsWorker.drain_all()
    print(" ".join(sorted(ids)))
else:
    async def main():
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(event=EventNameFilter(name=["secure.ping"]), resource=EventResourceFilter(id=[tag])), limit=10)
            print(" ".join(sorted(str(e.id) for e in page.events)), page.total)
    asyncio.run(main())
"#;
    let run = |auth: PrefectAuth<'_>, mode: &str, tag: &str| {
        let output = prefect_command(python.as_ref(), &daemon, dir.path(), auth)
            .args(["-c", script, mode, tag])
            .output()
            .expect("python runs");
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).trim().to_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    let emit = |auth: PrefectAuth<'_>, tag: &str| {
        let (ok, ids, stderr) = run(auth, "emit", tag);
        assert!(ok && ids.len() > 70, "emit {tag}: {ids}{stderr}");
        ids
    };
    let read_back = |auth: PrefectAuth<'_>, tag: &str, ids: &str| {
        let (ok, stdout, stderr) = run(auth, "read", tag);
        assert!(ok, "read {tag}: {stdout}{stderr}");
        assert_eq!(stdout, format!("{ids} 2"), "read {tag}: {stderr}");
    };

    let ids = emit(PrefectAuth::AuthString(ADMIN), "by-auth-string");
    read_back(PrefectAuth::AuthString(ADMIN), "by-auth-string", &ids);

    let ids = emit(PrefectAuth::AuthString(&write), "by-publisher-token");
    read_back(PrefectAuth::AuthString(&read), "by-publisher-token", &ids);
    read_back(PrefectAuth::ApiKey(API_KEY), "by-publisher-token", &ids);
    read_back(PrefectAuth::ApiKey(&read), "by-publisher-token", &ids);

    // A read-only token cannot publish: nothing it emitted is stored.
    let _ = run(PrefectAuth::AuthString(&read), "emit", "by-dashboard-token");
    let (ok, stdout, _) = run(PrefectAuth::AuthString(ADMIN), "read", "by-dashboard-token");
    assert!(ok && stdout == "0", "{stdout}");

    for (who, auth) in [
        ("no credentials", PrefectAuth::None),
        ("a wrong API key", PrefectAuth::ApiKey("pnu_wrong")),
        ("a write-only token", PrefectAuth::ApiKey(&write)),
        (
            "a wrong auth string",
            PrefectAuth::AuthString("admin:wrong"),
        ),
    ] {
        let (ok, stdout, _) = run(auth, "read", "by-auth-string");
        assert!(!ok, "read with {who}: {stdout}");
    }
}

/// The stock `prefect` CLI with auth on: `prefect automation ls` lists the daemon's
/// automations and `prefect events stream` (the `/api/events/out` websocket) prints events
/// as they arrive, with `PREFECT_API_AUTH_STRING` set to the auth string or to a read-only
/// token (`automation ls` also with the token as `PREFECT_API_KEY`); without credentials
/// both fail with 401.
#[test]
fn the_prefect_cli_lists_automations_and_streams_events_with_auth() {
    use std::io::BufRead;
    let Some(python) = support::require_prefect_python() else {
        return;
    };
    let prefect = prefect_cli(&python);
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[(
            "watch.yaml",
            "name: watch-secure-pings\ntrigger:\n  type: event\n  posture: Reactive\n  expect: [\"secure.streamed\"]\nactions:\n  - type: do-nothing\n",
        )],
    );
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--auth-string", ADMIN],
    );
    let read = create_token(&daemon, "dashboard", "events:read");
    let cases = [
        ("auth string", PrefectAuth::AuthString(ADMIN)),
        ("events:read token", PrefectAuth::AuthString(&read)),
    ];
    let bounded = |mut command: std::process::Command| {
        let mut child = command
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("prefect runs");
        let status = eventually(Duration::from_secs(60), "prefect to exit", || {
            child.try_wait().expect("wait")
        });
        let mut stdout = String::new();
        let mut stderr = String::new();
        if let Some(mut out) = child.stdout.take() {
            let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
        }
        if let Some(mut err) = child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
        }
        (status.success(), stdout, stderr)
    };

    for (who, auth) in cases {
        let mut command = prefect_command(&prefect, &daemon, dir.path(), auth);
        command.args(["automation", "ls"]);
        let (ok, stdout, stderr) = bounded(command);
        assert!(ok, "automation ls with the {who}: {stdout}{stderr}");
        assert!(
            stdout.contains("watch-secure-pings"),
            "automation ls with the {who}: {stdout}"
        );
    }
    // `PREFECT_API_KEY` is sent on REST (not on the websockets, see above).
    let mut command = prefect_command(&prefect, &daemon, dir.path(), PrefectAuth::ApiKey(&read));
    command.args(["automation", "ls"]);
    let (ok, stdout, stderr) = bounded(command);
    assert!(
        ok && stdout.contains("watch-secure-pings"),
        "automation ls with a token as PREFECT_API_KEY: {stdout}{stderr}"
    );
    let mut command = prefect_command(&prefect, &daemon, dir.path(), PrefectAuth::None);
    command.args(["automation", "ls"]);
    let (ok, stdout, stderr) = bounded(command);
    assert!(!ok, "automation ls without credentials: {stdout}");
    assert!(
        stderr.contains("401") || stdout.contains("401"),
        "{stdout}{stderr}"
    );

    for (who, auth) in cases {
        // A long-running command: its lines are read on a thread, it is killed at the end.
        let mut child = prefect_command(&prefect, &daemon, dir.path(), auth)
            .args(["events", "stream", "--format", "json"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("prefect events stream starts");
        let (lines, received) = std::sync::mpsc::channel::<String>();
        let stdout = child.stdout.take().expect("stdout");
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
        let resource = format!("secure.stream.{}", who.replace(' ', "-"));
        let started = std::time::Instant::now();
        let mut streamed = None;
        let mut seen = Vec::new();
        // The subscription opens some time after the process starts: send an event every
        // half second until one comes out of the stream (bounded).
        while streamed.is_none() && started.elapsed() < Duration::from_secs(45) {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("prefect events stream with the {who} exited with {status}: {seen:?}");
            }
            let (status, text) = request(
                "POST",
                &format!("{}/api/events", daemon.url),
                &with_auth(&basic(ADMIN)),
                json!([{"event": "secure.streamed", "resource": {"prefect.resource.id": resource}}])
                    .to_string()
                    .into_bytes(),
            );
            assert_eq!(status, 204, "{text}");
            let until = std::time::Instant::now() + Duration::from_millis(500);
            while let Some(left) = until.checked_duration_since(std::time::Instant::now()) {
                let Ok(line) = received.recv_timeout(left) else {
                    break;
                };
                let event: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
                if event["event"] == "secure.streamed"
                    && event["resource"]["prefect.resource.id"] == resource.as_str()
                {
                    streamed = Some(event);
                    break;
                }
                seen.push(line);
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        let event = streamed.unwrap_or_else(|| {
            panic!("prefect events stream with the {who} printed no event: {seen:?}")
        });
        assert!(event["id"].is_string(), "{event}");
    }
    let mut command = prefect_command(&prefect, &daemon, dir.path(), PrefectAuth::None);
    command.args(["events", "stream"]);
    let (ok, stdout, stderr) = bounded(command);
    assert!(!ok, "events stream without credentials: {stdout}");
    assert!(
        stderr.contains("401") || stdout.contains("401"),
        "{stdout}{stderr}"
    );
}

/// Signed Standard Webhooks, GitHub and Stripe requests replayed after a restart are refused
/// (the message id, GitHub's delivery id, a digest of Stripe's signature header are kept in
/// the store), and each refusal is visible but not to the sender: a bare 401, a
/// `prefect-cloud.webhook.failed` event with the reason (no Authorization header), a metric
/// by reason, and the webhook's last failure in its API view and `spur webhook get`.
#[test]
fn webhook_replay_is_refused_across_a_restart() {
    use base64::Engine as _;
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = start_with_auth(dir.path());
    let admin = with_auth(&basic(ADMIN));
    let standard_secret = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(b"standard-key")
    );
    let template = r#"{"event": "hook.got", "resource": {"prefect.resource.id": "hook"}}"#;
    let body = br#"{"a": 1}"#.to_vec();
    let now = chrono::Utc::now().timestamp();
    let leak = ("authorization", "Bearer must-not-leak".to_owned());
    // (preset, secret, headers) for each signed-webhook preset.
    type Signed = (&'static str, String, Vec<(&'static str, String)>);
    let presets: Vec<Signed> = vec![
        (
            "standard",
            standard_secret.clone(),
            vec![
                ("webhook-id", "msg_restart".to_owned()),
                ("webhook-timestamp", now.to_string()),
                (
                    "webhook-signature",
                    sign::standard(&standard_secret, "msg_restart", now, &body),
                ),
                leak.clone(),
            ],
        ),
        (
            "github",
            "github-secret".to_owned(),
            vec![
                (
                    "x-github-delivery",
                    "72d3162e-cc78-11e3-81ab-4c9367dc0958".to_owned(),
                ),
                ("x-github-event", "push".to_owned()),
                ("x-hub-signature-256", sign::github("github-secret", &body)),
                leak.clone(),
            ],
        ),
        (
            "stripe",
            "whsec_stripe-secret".to_owned(),
            vec![
                (
                    "stripe-signature",
                    sign::stripe("whsec_stripe-secret", now, &body),
                ),
                leak.clone(),
            ],
        ),
    ];
    let mut hooks = Vec::new();
    for (preset, secret, headers) in &presets {
        let spec = json!({"name": preset, "template": template, "auth": {"type": "hmac", "preset": preset, "secrets": [secret]}});
        let (status, created) = request(
            "POST",
            &format!("{}/api/webhooks", daemon.url),
            &admin,
            spec.to_string().into_bytes(),
        );
        assert_eq!(status, 201, "{created}");
        let created: Value = serde_json::from_str(&created).expect("json");
        let slug_path = created["url"]
            .as_str()
            .and_then(|u| u.find("/hooks/").map(|i| u[i..].to_owned()))
            .expect("url");
        hooks.push((*preset, slug_path, headers.clone()));
    }
    let post = |daemon: &SpurDaemon, path: &str, headers: &[(&str, String)]| {
        request(
            "POST",
            &format!("{}{path}", daemon.url),
            headers,
            body.clone(),
        )
    };
    for (preset, path, headers) in &hooks {
        assert_eq!(
            post(&daemon, path, headers).0,
            204,
            "{preset}: first delivery"
        );
    }
    assert_eq!(daemon.terminate(), Some(0));
    let daemon = start_with_auth(dir.path());
    for (preset, path, headers) in &hooks {
        let (status, answer) = post(&daemon, path, headers);
        assert_eq!(status, 401, "{preset}: replayed after a restart");
        assert!(!answer.contains("replay"), "the 401 stays quiet: {answer}");
    }

    let (_, metrics) = request(
        "GET",
        &format!("{}/metrics", daemon.url),
        &admin,
        Vec::new(),
    );
    assert!(
        metrics.contains("spur_webhook_auth_failures_total{reason=\"replayed\"} 3"),
        "{metrics}"
    );
    let failed = eventually(Duration::from_secs(10), "the failure events", || {
        let (_, text) = request(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            &admin,
            json!({"filter": {"event": {"name": ["prefect-cloud.webhook.failed"]}}})
                .to_string()
                .into_bytes(),
        );
        let v: Value = serde_json::from_str(&text).ok()?;
        let events = v["events"].as_array()?.clone();
        (events.len() >= 3).then_some(events)
    });
    for event in &failed {
        assert_eq!(event["payload"]["reason_code"], "replayed", "{event}");
        assert!(!event.to_string().contains("must-not-leak"), "{event}");
    }

    // The webhook's last failure: in its API view and `spur webhook get`; a later bad
    // signature replaces it and the count goes on.
    let (_, path, headers) = &hooks[2];
    let mut forged = headers.clone();
    forged[0].1 = sign::stripe("whsec_not-the-secret", now, &body);
    assert_eq!(post(&daemon, path, &forged).0, 401);
    let (status, view) = request(
        "GET",
        &format!("{}/api/webhooks/stripe", daemon.url),
        &admin,
        Vec::new(),
    );
    assert_eq!(status, 200, "{view}");
    let view: Value = serde_json::from_str(&view).expect("json");
    let last = &view["last_failure"];
    assert_eq!(last["reason_code"], "bad_signature", "{view}");
    assert_eq!(last["stage"], "authentication", "{view}");
    assert_eq!(last["count"], 2, "{view}");
    assert!(!view.to_string().contains("must-not-leak"), "{view}");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["webhook", "get", "github", "--api", &daemon.url])
        .env("SPUR_AUTH_STRING", ADMIN)
        .env_remove("SPUR_API_TOKEN")
        .output()
        .expect("spur runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("last failure: ") && stdout.contains("(replayed, authentication)"),
        "{stdout}"
    );
    assert!(!stdout.contains("must-not-leak"), "{stdout}");
}

/// Beyond loopback without credentials: a warning at start and in `/healthz`; with
/// `--require-auth`, no start at all.
#[test]
fn binding_beyond_loopback_without_auth_is_warned_or_refused() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["serve", "--http", "0.0.0.0:0", "--require-auth", "--data"])
        .arg(dir.path().join("refused"))
        .arg("--automations")
        .arg(&automations)
        .env_remove("SPUR_CONFIG")
        .env_remove("SPUR_AUTH_STRING")
        .output()
        .expect("spur runs");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--require-auth"), "{stderr}");

    // (`SpurDaemon` binds loopback; this one is started by hand.)
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "serve",
            "--http",
            "0.0.0.0:0",
            "--log-format",
            "json",
            "--data",
        ])
        .arg(dir.path().join("data"))
        .arg("--automations")
        .arg(&automations)
        .env_remove("SPUR_CONFIG")
        .env_remove("SPUR_AUTH_STRING")
        .env("SPUR_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spur serve starts");
    let stderr = child.stderr.take().expect("stderr");
    let mut warned = false;
    let mut port = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok) {
        warned |= line.contains("no authentication");
        let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
        if let Some(addr) = v["fields"]["addr"].as_str() {
            port = addr.rsplit(':').next().map(str::to_owned);
            break;
        }
    }
    let port = port.expect("the daemon listens");
    assert!(warned, "a warning at start");
    let (status, text) = request(
        "GET",
        &format!("http://127.0.0.1:{port}/healthz"),
        &[],
        Vec::new(),
    );
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(status, 200);
    assert!(text.contains("warning"), "{text}");
    // The same daemon on loopback says plain ok.
    let loopback = SpurDaemon::start(&dir.path().join("data2"), &automations, &[]);
    let (_, text) = request("GET", &format!("{}/healthz", loopback.url), &[], Vec::new());
    assert_eq!(text, "ok");
}

/// With auth on, a run the daemon launches can still send events back (`"$SPUR_BIN" emit`):
/// it gets a credential of its own (`SPUR_API_TOKEN`, scope `events:write`, never stored),
/// and that credential cannot manage the daemon.
#[test]
fn runs_emit_with_their_own_write_only_credential() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[(
            "d.yaml",
            r#"deployments:
  - name: emitter
    launcher:
      command: ["sh", "-c", "\"$SPUR_BIN\" emit test.from-run --resource test.run && curl -s -o /dev/null -w '%{http_code}' -X POST -H \"Authorization: Bearer $SPUR_API_TOKEN\" \"$SPUR_API_URL/api/tokens\" -d '{}' || true"]
"#,
        )],
    );
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--auth-string", ADMIN],
    );
    let (status, body) = request(
        "POST",
        &format!("{}/api/runs", daemon.url),
        &with_auth(&basic(ADMIN)),
        json!({"deployment": "emitter"}).to_string().into_bytes(),
    );
    assert!((200..300).contains(&status), "{status} {body}");
    let run: Value = serde_json::from_str(&body).expect("run");
    let id = run["id"].as_str().expect("id").to_owned();
    let finished = eventually(Duration::from_secs(20), "the run to finish", || {
        let (_, body) = request(
            "GET",
            &format!("{}/api/runs/{id}", daemon.url),
            &with_auth(&basic(ADMIN)),
            Vec::new(),
        );
        let run: Value = serde_json::from_str(&body).ok()?;
        matches!(
            run["state"].as_str(),
            Some("Completed" | "Failed" | "Crashed")
        )
        .then_some(run)
    });
    assert_eq!(finished["state"], "Completed", "{finished}");
    let (status, body) = request(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        &with_auth(&basic(ADMIN)),
        json!({"filter": {"event": {"name": ["test.from-run"]}}})
            .to_string()
            .into_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("page");
    assert_eq!(page["events"].as_array().map(Vec::len), Some(1), "{page}");
    // The run's credential writes events only: creating a token (admin) is refused, if curl ran.
    let output = finished["output"].as_str().unwrap_or_default();
    assert!(
        !output.contains("201"),
        "a run's credential created a token: {output}"
    );
}

/// Runs `openssl` with `args` in `dir`; panics with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA (`ca.pem`) and a server certificate for 127.0.0.1 it signed (`server.pem`,
/// `server.key`), plus a second key that belongs to nothing (`other.key`).
fn test_certificates(dir: &std::path::Path) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut ca = vec!["req", "-x509"];
    ca.extend(ec);
    ca.extend([
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=spur test CA",
    ]);
    openssl(dir, &ca);
    let mut csr = vec!["req"];
    csr.extend(ec);
    csr.extend([
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    ]);
    openssl(dir, &csr);
    std::fs::write(
        dir.join("server.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n\
         subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    .expect("write ext");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
    openssl(
        dir,
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-out",
            "other.key",
        ],
    );
}

/// `spur serve` with `extra` flags that must refuse to start: its stderr (bounded wait).
fn serve_refuses(dir: &std::path::Path, extra: &[&str]) -> String {
    let automations = automations_folder(dir, &[]);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["serve", "--http", "127.0.0.1:0"])
        .arg("--data")
        .arg(dir.join("refused-data"))
        .arg("--automations")
        .arg(&automations)
        .args(extra)
        .env_remove("SPUR_CONFIG")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spur serve runs");
    let status = eventually(Duration::from_secs(20), "spur serve to exit", || {
        child.try_wait().expect("wait")
    });
    assert!(!status.success(), "started with {extra:?}");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
        .expect("stderr");
    stderr
}

/// `--tls-cert/--tls-key`: curl and `spur` with the CA work over https; plain HTTP to the
/// TLS port gets one plain 400 and a closed connection, a silent socket is closed after the
/// header timeout, neither disturbs the daemon; unusable files stop the start naming the file.
#[test]
fn the_api_serves_tls_and_refuses_plain_http_cleanly() {
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().expect("temp dir");
    test_certificates(dir.path());
    let path = |name: &str| dir.path().join(name).to_string_lossy().into_owned();
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &[
            "--auth-string",
            ADMIN,
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.key"),
            "--header-read-timeout",
            "1",
        ],
    );
    let https = daemon.url.replacen("http://", "https://", 1);
    let curl = |extra: &[&str], url: &str| {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args(extra)
            .arg(url)
            .output()
            .expect("curl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let ca = path("ca.pem");
    assert_eq!(
        curl(
            &["--cacert", &ca, "-u", ADMIN],
            &format!("{https}/api/health")
        ),
        (true, "200".to_owned())
    );
    assert_eq!(
        curl(&["--cacert", &ca], &format!("{https}/api/health")),
        (true, "401".to_owned()),
        "auth still applies over TLS"
    );
    assert!(
        !curl(&[], &format!("{https}/healthz")).0,
        "a client that does not trust the CA refuses the certificate"
    );

    // Plain HTTP to the TLS port: one plain 400 naming https, then the connection closes.
    let addr = daemon.url.trim_start_matches("http://").to_owned();
    let mut plain = std::net::TcpStream::connect(&addr).expect("connects");
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    plain
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n")
        .expect("writes");
    let mut answer = String::new();
    plain
        .read_to_string(&mut answer)
        .expect("the daemon answers and closes");
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("https://"), "{answer}");

    // A socket that sends nothing is closed after the header read timeout (1 s here).
    let mut silent = std::net::TcpStream::connect(&addr).expect("connects");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let started = std::time::Instant::now();
    let mut buf = [0u8; 16];
    let n = silent.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );

    // The CLI trusts the CA given with --ca (or SPUR_CA_CERT) and not without it.
    let cli = |ca: Option<&str>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spur"));
        command
            .args(["automations", "ls", "--api", &https])
            .env("SPUR_AUTH_STRING", ADMIN)
            .env_remove("SPUR_API_TOKEN")
            .env_remove("SPUR_CA_CERT");
        if let Some(ca) = ca {
            command.env("SPUR_CA_CERT", ca);
        }
        let out = command.output().expect("spur runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, stderr) = cli(Some(&ca));
    assert!(ok, "{stderr}");
    let (ok, _) = cli(None);
    assert!(!ok, "an untrusted certificate is refused");
    let (ok, stderr) = cli(Some(&path("missing.pem")));
    assert!(!ok && stderr.contains("missing.pem"), "{stderr}");
    assert_eq!(
        curl(
            &["--cacert", &ca, "-u", ADMIN],
            &format!("{https}/api/health")
        ),
        (true, "200".to_owned()),
        "still serving"
    );
    drop(daemon);

    // Unusable files stop the start and the message names the file.
    let stderr = serve_refuses(
        dir.path(),
        &[
            "--tls-cert",
            &path("nothing.pem"),
            "--tls-key",
            &path("server.key"),
        ],
    );
    assert!(stderr.contains("nothing.pem"), "{stderr}");
    let stderr = serve_refuses(
        dir.path(),
        &[
            "--tls-cert",
            &path("server.ext"),
            "--tls-key",
            &path("server.key"),
        ],
    );
    assert!(
        stderr.contains("server.ext") && stderr.contains("certificate"),
        "{stderr}"
    );
    let stderr = serve_refuses(
        dir.path(),
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("server.csr"),
        ],
    );
    assert!(stderr.contains("server.csr"), "{stderr}");
    let stderr = serve_refuses(
        dir.path(),
        &[
            "--tls-cert",
            &path("server.pem"),
            "--tls-key",
            &path("other.key"),
        ],
    );
    assert!(stderr.contains("other.key"), "{stderr}");
}

/// A `nats-server` on loopback that serves TLS only (a certificate of [`test_certificates`])
/// and knows its one client by nkey.
struct SecuredNats {
    server: support::NatsServer,
    /// The CA that signed the server's certificate.
    ca: std::path::PathBuf,
    /// A file holding the client's nkey seed.
    seed_file: std::path::PathBuf,
    /// The seed itself.
    seed: String,
}

impl SecuredNats {
    fn start(bin: &std::path::Path, dir: &std::path::Path) -> SecuredNats {
        let certs = dir.join("certs");
        std::fs::create_dir_all(&certs).expect("certs dir");
        test_certificates(&certs);
        let user = nkeys::KeyPair::new_user();
        let seed = user.seed().expect("seed");
        let seed_file = dir.join("spur.nk");
        std::fs::write(&seed_file, format!("{seed}\n")).expect("write seed");
        let config = format!(
            "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n}}\nauthorization {{\n  users: [ {{ nkey: \"{}\" }} ]\n}}\n",
            certs.join("server.pem").display(),
            certs.join("server.key").display(),
            user.public_key()
        );
        let server = support::NatsServer::start_with_config(bin, &dir.join("nats"), &config);
        SecuredNats {
            server,
            ca: certs.join("ca.pem"),
            seed_file,
            seed,
        }
    }

    fn url(&self) -> &str {
        &self.server.url
    }

    /// `--nats URL --nats-tls-ca CA --nats-nkey SEED_FILE`.
    fn flags(&self) -> Vec<String> {
        vec![
            "--nats".to_owned(),
            self.server.url.clone(),
            "--nats-tls-ca".to_owned(),
            self.ca.display().to_string(),
            "--nats-nkey".to_owned(),
            self.seed_file.display().to_string(),
        ]
    }
}

/// `POST /api/events/filter` for one id on an open daemon: the total.
fn stored(daemon: &SpurDaemon, id: &str) -> Option<u64> {
    let (status, body) = request(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        &[("content-type", "application/json".to_owned())],
        json!({"filter": {"id": {"id": [id]}}})
            .to_string()
            .into_bytes(),
    );
    (status == 200)
        .then(|| serde_json::from_str::<Value>(&body).ok()?["total"].as_u64())
        .flatten()
}

/// `--nats-tls-ca` and `--nats-nkey`: against a nats-server that serves TLS only and knows
/// its clients by nkey, the daemon connects, consumes JetStream and stores what a publisher
/// with the same credentials sends; a credential file that cannot be read stops the start
/// naming the flag and the path.
#[test]
fn the_daemon_reaches_nats_over_tls_with_an_nkey() {
    let Some(bin) = support::require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = SecuredNats::start(&bin, dir.path());
    let flags = nats.flags();
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations_folder(dir.path(), &[]),
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    daemon.wait_for_jetstream();

    let runtime = support_runtime();
    let id = uuid::Uuid::new_v4().to_string();
    runtime.block_on(async {
        // Without credentials the server refuses the publisher: the flags are what let Spur in.
        let refused = async_nats::ConnectOptions::new()
            .add_root_certificates(nats.ca.clone())
            .require_tls(true)
            .connect(nats.url())
            .await;
        assert!(refused.is_err(), "the test server must require an nkey");
        let client = async_nats::ConnectOptions::new()
            .add_root_certificates(nats.ca.clone())
            .require_tls(true)
            .nkey(nats.seed.clone())
            .connect(nats.url())
            .await
            .expect("the publisher connects with TLS and the nkey");
        let event = json!({
            "id": id, "event": "job.failed", "occurred": chrono::Utc::now().to_rfc3339(),
            "resource": {"prefect.resource.id": "job.tls"},
        });
        client
            .publish("events.job.failed", event.to_string().into())
            .await
            .expect("publish");
        client.flush().await.expect("flush");
    });
    eventually(Duration::from_secs(15), "the event over TLS stored", || {
        (stored(&daemon, &id) == Some(1)).then_some(())
    });

    let missing = dir.path().join("no-such.creds");
    let stderr = serve_refuses(
        dir.path(),
        &[
            "--nats",
            nats.url(),
            "--nats-creds",
            missing.to_str().expect("utf-8 path"),
        ],
    );
    assert!(
        stderr.contains("--nats-creds") && stderr.contains("no-such.creds"),
        "{stderr}"
    );
}

/// Runs `spur ARGS` with `env` (the `SPUR_NATS_*` variables removed first) and waits at most
/// `timeout` for it to exit: (exited successfully, stdout, stderr); killed (and failed) if
/// it does not exit in time.
fn spur_bounded(
    args: &[&str],
    env: &[(&str, &std::path::Path)],
    timeout: Duration,
) -> (bool, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_spur"));
    command.args(args);
    for var in [
        "SPUR_NATS",
        "SPUR_NATS_CREDS",
        "SPUR_NATS_NKEY",
        "SPUR_NATS_TLS_CA",
        "SPUR_NATS_TLS_CERT",
        "SPUR_NATS_TLS_KEY",
    ] {
        command.env_remove(var);
    }
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spur runs");
    let started = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break Some(status);
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = std::io::Read::read_to_string(&mut out, &mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = std::io::Read::read_to_string(&mut err, &mut stderr);
    }
    assert!(
        status.is_some(),
        "spur {args:?} did not exit within {timeout:?}: {stdout}{stderr}"
    );
    (status.is_some_and(|s| s.success()), stdout, stderr)
}

/// The other commands that connect to NATS take the same credentials and TLS as the daemon
/// (one set of flags, `SPUR_NATS_*` variables too): `spur emit --nats` publishes through a
/// TLS-only, nkey-only nats-server to the daemon, and `spur worker` (configured by the
/// variables) runs the quickstart chain's runs. Without the credentials both stop at once,
/// saying the server refused them, and an unreadable credential file is named.
#[test]
fn spur_emit_and_spur_worker_reach_nats_with_credentials() {
    let Some(bin) = support::require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = SecuredNats::start(&bin, dir.path());
    let flags = nats.flags();
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &support::root().join("config/examples/chain-worker"),
        &flags.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    daemon.wait_for_jetstream();
    let bound = Duration::from_secs(20);

    // `spur emit --nats` with the flags: JetStream acknowledges it, the daemon stores it.
    let mut emit = vec!["emit", "cli.over-nats", "--resource", "cli.tls"];
    emit.extend(flags.iter().map(String::as_str));
    let (ok, stdout, stderr) = spur_bounded(&emit, &[], bound);
    assert!(ok, "{stdout}{stderr}");
    let id = stdout.trim().to_owned();
    eventually(Duration::from_secs(15), "the emitted event stored", || {
        (stored(&daemon, &id) == Some(1)).then_some(())
    });
    // The same through the variables.
    let (ok, stdout, stderr) = spur_bounded(
        &[
            "emit",
            "cli.over-nats",
            "--resource",
            "cli.env",
            "--nats",
            nats.url(),
        ],
        &[
            ("SPUR_NATS_TLS_CA", &nats.ca),
            ("SPUR_NATS_NKEY", &nats.seed_file),
        ],
        bound,
    );
    assert!(ok, "{stdout}{stderr}");
    let by_env = stdout.trim().to_owned();
    eventually(
        Duration::from_secs(15),
        "the event sent by env stored",
        || (stored(&daemon, &by_env) == Some(1)).then_some(()),
    );
    // Without the nkey the server refuses, and the command says so instead of retrying.
    let (ok, stdout, stderr) = spur_bounded(
        &[
            "emit",
            "cli.over-nats",
            "--resource",
            "cli.refused",
            "--nats",
            nats.url(),
        ],
        &[("SPUR_NATS_TLS_CA", &nats.ca)],
        bound,
    );
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains("cannot connect to NATS") && stderr.contains("authorization"),
        "{stderr}"
    );
    // Without the CA the server's certificate is not trusted.
    let (ok, _, stderr) = spur_bounded(
        &[
            "emit",
            "cli.over-nats",
            "--resource",
            "cli.refused",
            "--nats",
            nats.url(),
        ],
        &[("SPUR_NATS_NKEY", &nats.seed_file)],
        bound,
    );
    assert!(!ok && stderr.contains("cannot connect to NATS"), "{stderr}");
    // An unreadable file is named with its flag.
    let missing = dir.path().join("no-such.nk");
    let (ok, _, stderr) = spur_bounded(
        &[
            "emit",
            "x",
            "--resource",
            "r",
            "--nats",
            nats.url(),
            "--nats-nkey",
            missing.to_str().expect("utf-8 path"),
        ],
        &[],
        bound,
    );
    assert!(
        !ok && stderr.contains("--nats-nkey") && stderr.contains("no-such.nk"),
        "{stderr}"
    );

    // `spur worker` without the nkey stops at once (no silent retrying).
    let (ok, _, stderr) = spur_bounded(
        &["worker", "--pool", "default", "--nats", nats.url()],
        &[("SPUR_NATS_TLS_CA", &nats.ca)],
        bound,
    );
    assert!(
        !ok && stderr.contains("cannot connect to NATS") && stderr.contains("authorization"),
        "{stderr}"
    );
    // With it (by the variables), it serves the pool: the chain runs on it.
    let mut worker = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["worker", "--pool", "default", "--nats", nats.url()])
        .env("SPUR_NATS_TLS_CA", &nats.ca)
        .env("SPUR_NATS_NKEY", &nats.seed_file)
        .env_remove("SPUR_NATS_CREDS")
        .env("SPUR_LOG", "info")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spur worker starts");
    let worker_log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    {
        let sink = worker_log.clone();
        let stderr = worker.stderr.take().expect("stderr");
        std::thread::spawn(move || {
            for line in
                std::io::BufRead::lines(std::io::BufReader::new(stderr)).map_while(Result::ok)
            {
                if let Ok(mut log) = sink.lock() {
                    log.push_str(&line);
                    log.push('\n');
                }
            }
        });
    }
    eventually(Duration::from_secs(15), "the worker ready", || {
        worker_log
            .lock()
            .ok()?
            .contains("worker ready")
            .then_some(())
    });
    let (ok, out, err) = spur_bounded(
        &["runs", "start", "upstream", "--api", &daemon.url],
        &[],
        bound,
    );
    assert!(ok, "{out}{err}");
    let downstream = eventually(
        Duration::from_secs(30),
        "the downstream run on the worker",
        || {
            let (_, body) = request("GET", &format!("{}/api/runs", daemon.url), &[], Vec::new());
            let v: Value = serde_json::from_str(&body).ok()?;
            let runs = v["runs"].as_array()?.clone();
            runs.into_iter().find(|r| {
                r["deployment"] == "downstream"
                    && matches!(
                        r["state"].as_str(),
                        Some("Completed" | "Failed" | "Crashed")
                    )
            })
        },
    );
    let _ = worker.kill();
    let _ = worker.wait();
    assert_eq!(downstream["state"], "Completed", "{downstream}");
    assert_eq!(
        downstream["parameters"]["prev_result"], "foobar",
        "{downstream}"
    );
}

/// A NATS JWT (`header.claims.signature`, base64url without padding, ed25519 by `issuer`)
/// for `subject` with the `nats` claims given: what `nsc` writes for operators, accounts and
/// users.
fn nats_jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: Value) -> String {
    use base64::Engine as _;
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let header = b64(br#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let claims = json!({
        "jti": uuid::Uuid::new_v4().simple().to_string().to_uppercase(),
        "iat": chrono::Utc::now().timestamp(),
        "iss": issuer.public_key(),
        "sub": subject,
        "name": name,
        "nats": nats,
    });
    let signed = format!("{header}.{}", b64(claims.to_string().as_bytes()));
    let signature = issuer.sign(signed.as_bytes()).expect("sign");
    format!("{signed}.{}", b64(&signature))
}

/// `--nats-creds`: against a nats-server in operator (JWT) mode, where a client gets in only
/// with a user JWT its account signed and that user's seed (a `.creds` file, as `nsc`
/// writes them), the daemon consumes JetStream and `spur emit --nats` publishes to it; without
/// the file the server refuses the client.
#[test]
fn the_daemon_and_spur_emit_reach_nats_with_a_creds_file() {
    let Some(bin) = support::require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let operator = nkeys::KeyPair::new_operator();
    let account = nkeys::KeyPair::new_account();
    let user = nkeys::KeyPair::new_user();
    let operator_jwt = nats_jwt(
        &operator,
        &operator.public_key(),
        "spur-test",
        json!({"type": "operator", "version": 2}),
    );
    let account_jwt = nats_jwt(
        &operator,
        &account.public_key(),
        "events",
        json!({"type": "account", "version": 2, "limits": {
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        }}),
    );
    let user_jwt = nats_jwt(
        &account,
        &user.public_key(),
        "spur",
        json!({"type": "user", "version": 2, "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1}),
    );
    // JetStream needs a system account.
    let system = nkeys::KeyPair::new_account();
    let system_jwt = nats_jwt(
        &operator,
        &system.public_key(),
        "SYS",
        json!({"type": "account", "version": 2}),
    );
    let config = format!(
        "operator: {operator_jwt}\nsystem_account: {system}\nresolver: MEMORY\n\
         resolver_preload: {{\n  {system}: {system_jwt}\n  {account}: {account_jwt}\n}}\n",
        system = system.public_key(),
        account = account.public_key(),
    );
    let nats = support::NatsServer::start_with_config(&bin, &dir.path().join("nats"), &config);
    let creds = dir.path().join("spur.creds");
    std::fs::write(
        &creds,
        format!(
            "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
             -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        ),
    )
    .expect("write creds");
    let creds_arg = creds.to_str().expect("utf-8 path");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations_folder(dir.path(), &[]),
        &["--nats", &nats.url, "--nats-creds", creds_arg],
    );
    daemon.wait_for_jetstream();
    let bound = Duration::from_secs(20);
    let (ok, stdout, stderr) = spur_bounded(
        &[
            "emit",
            "cli.with-creds",
            "--resource",
            "cli.creds",
            "--nats",
            &nats.url,
            "--nats-creds",
            creds_arg,
        ],
        &[],
        bound,
    );
    assert!(ok, "{stdout}{stderr}");
    let id = stdout.trim().to_owned();
    eventually(
        Duration::from_secs(15),
        "the event sent with creds stored",
        || (stored(&daemon, &id) == Some(1)).then_some(()),
    );
    let (ok, _, stderr) = spur_bounded(
        &[
            "emit",
            "cli.without-creds",
            "--resource",
            "r",
            "--nats",
            &nats.url,
        ],
        &[],
        bound,
    );
    assert!(
        !ok && stderr.contains("cannot connect to NATS"),
        "the server must refuse a client without the creds file: {stderr}"
    );
}
