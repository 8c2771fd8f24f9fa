//! Spur beside a real Prefect server (`spur serve --prefect-api`, issue 14).
//!
//! A real `prefect server start` (3.8.8 from `scripts/provision.sh`) with its triggers service
//! off, as the README tells users to run it, and the real `spur serve` beside it, loopback
//! only, each with its own temporary folders:
//!
//! * an automation created through Prefect's API appears in Spur (origin `prefect`) and fires
//!   there on events emitted to the server;
//! * every event emitted to the server reaches Spur — also the ones emitted while Spur was
//!   stopped (filled from the server's events API on restart), each exactly once;
//! * Spur's `prefect.automation.triggered` events are posted back to the server, once each;
//! * pausing and deleting the automation on the server is followed;
//! * a restart of the server under a running Spur: it reconnects and fills in what was
//!   emitted before it was subscribed again;
//! * `/healthz` and `/metrics` describe the bridge, and a server that goes away is reported
//!   while Spur keeps running.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use chrono::Utc;
use serde_json::{Value, json};
use support::{SpurDaemon, eventually, http, skip_without};

/// A real Prefect server on a free loopback port with its own home and SQLite database, its
/// triggers service off; its whole process group is killed on drop.
struct PrefectServer {
    child: Child,
    api: String,
    log: PathBuf,
    cli: PathBuf,
    dir: PathBuf,
    port: u16,
    /// `PREFECT_SERVER_API_AUTH_STRING`, when the server requires it.
    auth: Option<String>,
}

impl PrefectServer {
    fn start(prefect: &Path, dir: &Path) -> PrefectServer {
        Self::start_with(prefect, dir, None)
    }

    fn start_with(prefect: &Path, dir: &Path, auth: Option<&str>) -> PrefectServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let auth = auth.map(str::to_owned);
        let (child, log) = Self::spawn(prefect, dir, port, "prefect-server.log", &auth);
        let mut server = PrefectServer {
            child,
            api: format!("http://127.0.0.1:{port}/api"),
            log,
            cli: prefect.to_owned(),
            dir: dir.to_owned(),
            port,
            auth,
        };
        server.wait_healthy();
        server
    }

    /// Kills the server and starts it again on the same port and database.
    fn restart(&mut self) {
        self.kill();
        let (child, log) = Self::spawn(
            &self.cli,
            &self.dir,
            self.port,
            "prefect-server-2.log",
            &self.auth,
        );
        self.child = child;
        self.log = log;
        self.wait_healthy();
    }

    fn spawn(
        prefect: &Path,
        dir: &Path,
        port: u16,
        log_name: &str,
        auth: &Option<String>,
    ) -> (Child, PathBuf) {
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("prefect home");
        let log = dir.join(log_name);
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(prefect);
        command
            .args(["server", "start", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            .arg("--no-ui")
            .current_dir(dir)
            .env("PREFECT_HOME", &home)
            .env(
                "PREFECT_SERVER_DATABASE_CONNECTION_URL",
                format!("sqlite+aiosqlite:///{}", dir.join("prefect.db").display()),
            )
            // The setting the README asks for: Spur evaluates the automations.
            .env("PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED", "false")
            // Services this test does not need, off to keep SQLite quiet.
            .env("PREFECT_SERVER_SERVICES_SCHEDULER_ENABLED", "false")
            .env("PREFECT_SERVER_SERVICES_LATE_RUNS_ENABLED", "false")
            .env("PREFECT_SERVER_SERVICES_FOREMAN_ENABLED", "false")
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env("DO_NOT_TRACK", "1")
            .env_remove("PREFECT_API_URL")
            .env_remove("PREFECT_PROFILE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        match auth {
            Some(auth) => command.env("PREFECT_SERVER_API_AUTH_STRING", auth),
            None => command.env_remove("PREFECT_SERVER_API_AUTH_STRING"),
        };
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("prefect server starts");
        (child, log)
    }

    fn wait_healthy(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if matches!(
                try_http("GET", &format!("{}/health", self.api), None, None),
                Some((200, _))
            ) {
                return;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("prefect server exited with {status}:\n{}", self.log_tail());
            }
            assert!(
                Instant::now() < deadline,
                "prefect server not healthy within 90 s:\n{}",
                self.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn kill(&mut self) {
        // Its own process group: the server and whatever it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A call, retried while the server still answers 503 (or not at all) after `/health`
    /// turned green; panics on any other failure.
    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.api);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match try_http(method, &url, body.clone(), self.auth.as_deref()) {
                Some((status, answer)) if (200..300).contains(&status) => return answer,
                Some((503, _)) | None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => panic!("{method} {url} answered {other:?}:\n{}", self.log_tail()),
            }
        }
    }

    /// Emits `n` events named `name` (ids returned), in batches, through `POST /events`.
    fn emit(&self, name: &str, n: usize) -> Vec<String> {
        let (ids, events) = tick_events(name, n);
        for chunk in events.chunks(100) {
            self.call("POST", "/events", Some(Value::Array(chunk.to_vec())));
        }
        ids
    }

    /// Emits `n` events named `name` as one burst over the server's `/api/events/in`
    /// websocket (as Prefect's client does: subprotocol `prefect`, an `auth` message, one
    /// text frame per event, a ping answered once the server has read them all); their ids.
    fn emit_burst(&self, name: &str, n: usize) -> Vec<String> {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
        let url = format!("{}/events/in", self.api.replacen("http://", "ws://", 1));
        let (ids, events) = tick_events(name, n);
        let frames: Vec<String> = events.iter().map(Value::to_string).collect();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async {
            let mut request = url.as_str().into_client_request().expect("ws request");
            request
                .headers_mut()
                .insert("Sec-WebSocket-Protocol", "prefect".parse().expect("header"));
            let (mut socket, _) = tokio_tungstenite::connect_async(request)
                .await
                .expect("the server's events websocket");
            let auth = json!({"type": "auth", "token": null}).to_string();
            socket.send(Message::text(auth)).await.expect("auth sent");
            let reply = socket
                .next()
                .await
                .expect("an auth answer")
                .expect("a frame");
            assert!(
                reply.to_text().unwrap_or_default().contains("auth_success"),
                "{reply:?}"
            );
            for frame in frames {
                socket.feed(Message::text(frame)).await.expect("event sent");
            }
            socket.flush().await.expect("flushed");
            socket
                .send(Message::Ping(Default::default()))
                .await
                .expect("ping sent");
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let frame = tokio::time::timeout_at(deadline, socket.next())
                    .await
                    .expect("a pong within 60 s")
                    .expect("the socket open")
                    .expect("a frame");
                if matches!(frame, Message::Pong(_)) {
                    break;
                }
            }
            let _ = socket.close(None).await;
        });
        ids
    }

    /// The ids of the events named `name` the server has stored, once that number has
    /// stopped changing for 6 s (its persister writes in batches), read page by page.
    fn stored_ids(&self, name: &str) -> HashSet<String> {
        let total = |s: &Self| {
            let filter = json!({"filter": {"event": {"name": [name]}}, "limit": 1});
            s.call("POST", "/events/filter", Some(filter))["total"]
                .as_u64()
                .unwrap_or(0)
        };
        let (mut last, mut since) = (total(self), Instant::now());
        let deadline = Instant::now() + Duration::from_secs(120);
        while since.elapsed() < Duration::from_secs(6) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = total(self);
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        let mut ids = HashSet::new();
        let mut page = self.call(
            "POST",
            "/events/filter",
            Some(json!({"filter": {"event": {"name": [name]}}, "limit": 50})),
        );
        for _ in 0..10_000 {
            for event in page["events"].as_array().into_iter().flatten() {
                ids.insert(event["id"].as_str().unwrap_or_default().to_owned());
            }
            let Some(next) = page["next_page"].as_str().map(str::to_owned) else {
                break;
            };
            let path = next.strip_prefix(&self.api).unwrap_or(&next).to_owned();
            page = self.call("GET", &path, None);
        }
        ids
    }

    /// How many events named `name` about `resource` the server has stored.
    fn count(&self, name: &str, resource: &str) -> u64 {
        let filter = json!({"filter": {"event": {"name": [name]}, "resource": {"id": [resource]}},
                            "limit": 1});
        self.call("POST", "/events/filter", Some(filter))["total"]
            .as_u64()
            .unwrap_or(0)
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `n` events named `name` about five resources, with fresh ids (returned first).
fn tick_events(name: &str, n: usize) -> (Vec<String>, Vec<Value>) {
    let ids: Vec<String> = (0..n).map(|_| uuid::Uuid::new_v4().to_string()).collect();
    let events = ids
        .iter()
        .enumerate()
        .map(|(i, id)| {
            json!({
                "id": id,
                "occurred": spur_core::time::format_timestamp(Utc::now()),
                "event": name,
                "resource": {"prefect.resource.id": format!("bridge.res.{}", i % 5)},
                "payload": {"n": i},
            })
        })
        .collect();
    (ids, events)
}

/// One HTTP request: (status, JSON body), or `None` when nothing answers.
fn try_http(
    method: &str,
    url: &str,
    body: Option<Value>,
    auth: Option<&str>,
) -> Option<(u16, Value)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, url).timeout(Duration::from_secs(10));
        if let Some(auth) = auth {
            use base64::Engine as _;
            let encoded = base64::engine::general_purpose::STANDARD.encode(auth);
            request = request.header("Authorization", format!("Basic {encoded}"));
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.ok()?;
        let status = response.status().as_u16();
        let text = response.text().await.unwrap_or_default();
        Some((
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    })
}

/// The `prefect` CLI beside `$SPUR_PREFECT_PYTHON`, or `None` once the skip is reported.
fn require_prefect_cli() -> Option<PathBuf> {
    let python = support::require_prefect_python()?;
    let cli = Path::new(&python).with_file_name("prefect");
    if !cli.exists() {
        skip_without(&format!(
            "no prefect CLI beside {python} (scripts/provision.sh installs it)"
        ));
        return None;
    }
    Some(cli)
}

/// The ids of every event named `name` Spur has, in the order its pages list them (all
/// pages of `/api/events/filter`).
fn spur_event_ids(spur: &SpurDaemon, name: &str) -> Vec<String> {
    let body = json!({"filter": {"event": {"name": [name]}, "order": "ASC"}, "limit": 50});
    let (status, text) = http(
        "POST",
        &format!("{}/api/events/filter", spur.url),
        Some(body),
    );
    assert_eq!(status, 200, "{text}");
    let mut page: Value = serde_json::from_str(&text).expect("an event page");
    let mut ids = Vec::new();
    for _ in 0..1000 {
        for e in page["events"].as_array().into_iter().flatten() {
            ids.push(e["id"].as_str().unwrap_or_default().to_owned());
        }
        let Some(next) = page["next_page"].as_str() else {
            return ids;
        };
        let (status, text) = http("GET", next, None);
        assert_eq!(status, 200, "{text}");
        page = serde_json::from_str(&text).expect("an event page");
    }
    panic!("more than 1000 pages");
}

/// Spur's view of the automation `id`, if it has it.
fn spur_automation(spur: &SpurDaemon, id: &str) -> Option<Value> {
    let (status, text) = http("GET", &format!("{}/api/automations", spur.url), None);
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    body["automations"]
        .as_array()?
        .iter()
        .find(|a| a["id"] == id)
        .cloned()
}

/// The firings Spur recorded for the automation `name`.
fn firings_of(spur: &SpurDaemon, name: &str) -> usize {
    let (status, text) = http("GET", &format!("{}/api/firings?limit=1000", spur.url), None);
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let list = body
        .as_array()
        .or_else(|| body["firings"].as_array())
        .cloned()
        .unwrap_or_default();
    list.iter().filter(|f| f["automation"] == name).count()
}

/// Waits until Spur holds exactly the events `expected` of `name`, each once.
fn wait_for_events(spur: &SpurDaemon, name: &str, expected: &HashSet<String>, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let ids = spur_event_ids(spur, name);
        let unique: HashSet<String> = ids.iter().cloned().collect();
        assert_eq!(
            unique.len(),
            ids.len(),
            "an event is in Spur more than once"
        );
        assert!(
            unique.is_subset(expected),
            "Spur has {name} events nobody emitted"
        );
        if unique.len() == expected.len() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Spur has {} of the {} {name} events after {within:?}; log: {:?}",
            unique.len(),
            expected.len(),
            spur.log_lines("prefect")
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn spur_takes_a_real_prefect_servers_events_and_automations() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let mut server = PrefectServer::start(&cli, &prefect_dir);

    // An automation created on the server, before Spur ever saw it.
    let created = server.call(
        "POST",
        "/automations/",
        Some(json!({
            "name": "bridge-ticks",
            "trigger": {"type": "event", "expect": ["bridge.tick"], "posture": "Reactive",
                        "threshold": 1, "within": 0},
            "actions": [{"type": "do-nothing"}],
        })),
    );
    let automation = created["id"].as_str().expect("an automation id").to_owned();

    let data = dir.path().join("data");
    let folder = support::automations_folder(dir.path(), &[]);
    let flags = ["--prefect-api", server.api.as_str()];
    let spur = SpurDaemon::start(&data, &folder, &flags);

    let seen = eventually(
        Duration::from_secs(20),
        "the Prefect automation in Spur",
        || spur_automation(&spur, &automation),
    );
    assert_eq!(seen["origin"], "prefect", "{seen:#}");
    assert_eq!(seen["name"], "bridge-ticks");
    assert_eq!(seen["enabled"], true);
    assert_eq!(
        seen["source"],
        format!("{}/automations/{automation}", server.api),
        "{seen:#}"
    );
    let (ok, listed, err) = support::spur(&["automations", "ls", "--api", &spur.url]);
    assert!(ok, "{err}");
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("bridge-ticks") && l.ends_with("(prefect)")),
        "{listed}"
    );
    eventually(Duration::from_secs(20), "the stream live", || {
        (!spur.log_lines("Prefect event stream live").is_empty()).then_some(())
    });

    // Live: events emitted to the server reach Spur, and the automation fires there.
    let mut expected: HashSet<String> = server.emit("bridge.tick", 20).into_iter().collect();
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(30));
    eventually(
        Duration::from_secs(10),
        "20 firings of bridge-ticks",
        || (firings_of(&spur, "bridge-ticks") == 20).then_some(()),
    );
    let (_, health) = http("GET", &format!("{}/healthz", spur.url), None);
    assert!(health.contains("events: live since"), "{health}");
    assert!(health.contains("automations: 1 "), "{health}");

    // Spur stopped while 500 events are emitted; after the restart every one of them is in
    // Spur exactly once (filled from the server's events API), and each fired once.
    assert_eq!(spur.terminate(), Some(0), "a clean stop");
    expected.extend(server.emit("bridge.tick", 500));
    let spur = SpurDaemon::start(&data, &folder, &flags);
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(60));
    eventually(
        Duration::from_secs(10),
        "520 firings of bridge-ticks",
        || (firings_of(&spur, "bridge-ticks") == 520).then_some(()),
    );
    // The feed goes back: the server has Spur's prefect.automation.triggered event of each
    // firing, once (the first run's and the restarted one's).
    let resource = format!("prefect.automation.{automation}");
    eventually(
        Duration::from_secs(30),
        "520 triggered events on the Prefect server",
        || {
            let n = server.count("prefect.automation.triggered", &resource);
            assert!(n <= 520, "{n} triggered events on the server");
            (n == 520).then_some(())
        },
    );
    // And live again after the fill.
    expected.extend(server.emit("bridge.tick", 5));
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(30));
    // A burst while live: the server's stream gives a subscriber a queue of 256 events and
    // drops what does not fit, so some of these never come live; the reconcile passes read
    // them from its events API, and each is stored once. (The server's own websocket ingest
    // may drop some of a burst too: what counts is every event the server stored.)
    let burst = server.emit_burst("bridge.tick", 1000);
    let stored = server.stored_ids("bridge.tick");
    let kept: Vec<String> = burst.into_iter().filter(|id| stored.contains(id)).collect();
    assert!(
        kept.len() > 300,
        "the server kept only {} of the burst",
        kept.len()
    );
    expected.extend(kept);
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(90));
    let (_, metrics) = http("GET", &format!("{}/metrics", spur.url), None);
    assert!(
        metrics.contains("spur_prefect_connected{part=\"events\"} 1"),
        "{metrics}"
    );

    // Paused on the server: paused in Spur, and it stops firing; deleted: gone.
    server.call(
        "PATCH",
        &format!("/automations/{automation}"),
        Some(json!({"enabled": false})),
    );
    eventually(Duration::from_secs(15), "the pause followed", || {
        spur_automation(&spur, &automation).filter(|a| a["enabled"] == false)
    });
    let fired = firings_of(&spur, "bridge-ticks");
    expected.extend(server.emit("bridge.tick", 3));
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(30));
    assert_eq!(
        firings_of(&spur, "bridge-ticks"),
        fired,
        "a paused automation fired"
    );
    server.call("DELETE", &format!("/automations/{automation}"), None);
    eventually(Duration::from_secs(15), "the delete followed", || {
        spur_automation(&spur, &automation).is_none().then_some(())
    });

    // The server restarts under a running Spur: Spur reconnects, and what was emitted before
    // it was subscribed again is filled in, once.
    server.restart();
    expected.extend(server.emit("bridge.tick", 50));
    wait_for_events(&spur, "bridge.tick", &expected, Duration::from_secs(60));
    let (_, metrics) = http("GET", &format!("{}/metrics", spur.url), None);
    assert!(
        !metrics.contains("spur_prefect_stream_failures_total 0"),
        "the restart was noticed: {metrics}"
    );

    // The server goes away: Spur keeps serving and says so.
    drop(server);
    eventually(Duration::from_secs(30), "the outage reported", || {
        let (status, health) = http("GET", &format!("{}/healthz", spur.url), None);
        (status == 200 && health.contains("events: down since")).then_some(())
    });
    assert_eq!(spur_event_ids(&spur, "bridge.tick").len(), expected.len());
    assert_eq!(spur.terminate(), Some(0), "a clean stop after the outage");
}

/// A server that requires an auth string: Spur without it is refused (and says so, and
/// keeps running); with `--prefect-auth-string` it gets the stream, the fill and the
/// automations, fires a proactive one created meanwhile and posts its firing back.
#[test]
fn spur_authenticates_to_a_prefect_server_with_an_auth_string() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let auth = "admin:s3cret";
    let server = PrefectServer::start_with(&cli, &prefect_dir, Some(auth));
    let created = server.call(
        "POST",
        "/automations/",
        Some(json!({
            "name": "guarded",
            "trigger": {"type": "event", "expect": ["guarded.tick"], "posture": "Reactive",
                        "threshold": 1, "within": 0},
            "actions": [{"type": "do-nothing"}],
        })),
    );
    let automation = created["id"].as_str().expect("an automation id").to_owned();
    let folder = support::automations_folder(dir.path(), &[]);

    // Without the credentials: refused, reported, and Spur keeps serving.
    let refused = SpurDaemon::start(
        &dir.path().join("data-refused"),
        &folder,
        &["--prefect-api", server.api.as_str()],
    );
    eventually(Duration::from_secs(20), "the refusal reported", || {
        let (status, health) = http("GET", &format!("{}/healthz", refused.url), None);
        (status == 200
            && health.contains("automations: failing since")
            && health.contains("401")
            && health.contains("events: down since"))
        .then_some(())
    });
    assert!(spur_automation(&refused, &automation).is_none());
    assert_eq!(refused.terminate(), Some(0));

    // With them: the automation, events emitted before the stream was up (the fill), and
    // live ones.
    let data = dir.path().join("data");
    let flags = [
        "--prefect-api",
        server.api.as_str(),
        "--prefect-auth-string",
        auth,
    ];
    let spur = SpurDaemon::start(&data, &folder, &flags);
    let mut expected: HashSet<String> = server.emit("guarded.tick", 10).into_iter().collect();
    let seen = eventually(Duration::from_secs(20), "the automation in Spur", || {
        spur_automation(&spur, &automation)
    });
    assert_eq!(seen["origin"], "prefect");
    wait_for_events(&spur, "guarded.tick", &expected, Duration::from_secs(30));
    expected.extend(server.emit("guarded.tick", 10));
    wait_for_events(&spur, "guarded.tick", &expected, Duration::from_secs(30));
    let (_, health) = http("GET", &format!("{}/healthz", spur.url), None);
    assert!(health.contains("events: live since"), "{health}");

    // A proactive automation created on the server while Spur runs: nothing arrives within
    // its window, so Spur fires it, and the server hears of it.
    let quiet = server.call(
        "POST",
        "/automations/",
        Some(json!({
            "name": "guarded-silence",
            "trigger": {"type": "event", "expect": ["guarded.heartbeat"], "posture": "Proactive",
                        "threshold": 1, "within": 10},
            "actions": [{"type": "do-nothing"}],
        })),
    );
    let quiet = quiet["id"].as_str().expect("an automation id").to_owned();
    eventually(
        Duration::from_secs(15),
        "the proactive automation in Spur",
        || spur_automation(&spur, &quiet),
    );
    eventually(
        Duration::from_secs(30),
        "the proactive automation fired",
        || (firings_of(&spur, "guarded-silence") >= 1).then_some(()),
    );
    eventually(
        Duration::from_secs(30),
        "its triggered event on the server",
        || {
            (server.count(
                "prefect.automation.triggered",
                &format!("prefect.automation.{quiet}"),
            ) >= 1)
                .then_some(())
        },
    );
    assert_eq!(spur.terminate(), Some(0));
}

/// Prefect's chain pattern, served by Spur: an automation on the server whose
/// `run-deployment` names a deployment of the server (`source: selected`, and `inferred` from
/// the event's related deployment). Spur evaluates it and creates the flow run on the server
/// with the rendered parameters, under Prefect's idempotency-key shape, so a restart that
/// dispatches the firing again finds the same flow run; Spur keeps no run of its own.
#[test]
fn a_prefect_automation_runs_the_servers_deployment_on_the_server() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let server = PrefectServer::start(&cli, &prefect_dir);
    let flow = server.call("POST", "/flows/", Some(json!({"name": "downstream"})));
    let deployment = server.call(
        "POST",
        "/deployments/",
        Some(json!({"name": "on-result", "flow_id": flow["id"],
                    "parameter_openapi_schema": {"type": "object", "properties": {}}})),
    );
    let deployment = deployment["id"]
        .as_str()
        .expect("a deployment id")
        .to_owned();
    for (name, source) in [
        ("chain-selected", "selected"),
        ("chain-inferred", "inferred"),
    ] {
        let mut action = json!({"type": "run-deployment", "source": source,
                                "parameters": {"prev_result": "{{ event.payload.result }}",
                                               "via": name}});
        if source == "selected" {
            action["deployment_id"] = json!(deployment);
        }
        server.call(
            "POST",
            "/automations/",
            Some(json!({
                "name": name,
                "trigger": {"type": "event", "expect": ["prefect.result.produced"],
                            "posture": "Reactive", "threshold": 1, "within": 0},
                "actions": [action],
            })),
        );
    }
    let data = dir.path().join("data");
    let folder = support::automations_folder(dir.path(), &[]);
    let flags = ["--prefect-api", server.api.as_str()];
    let spur = SpurDaemon::start(&data, &folder, &flags);
    eventually(
        Duration::from_secs(20),
        "both automations and the live stream",
        || {
            let live = !spur.log_lines("Prefect event stream live").is_empty();
            let loaded = ["chain-selected", "chain-inferred"]
                .iter()
                .all(|n| spur_automation_named(&spur, n));
            (live && loaded).then_some(())
        },
    );
    server.call(
        "POST",
        "/events",
        Some(json!([{
            "id": uuid::Uuid::new_v4(),
            "occurred": spur_core::time::format_timestamp(Utc::now()),
            "event": "prefect.result.produced",
            "resource": {"prefect.resource.id": "prefect.result.upstream.1"},
            "related": [{"prefect.resource.id": format!("prefect.deployment.{deployment}"),
                         "prefect.resource.role": "deployment"}],
            "payload": {"result": "foobar"},
        }])),
    );
    let runs_on_server = || -> Vec<Value> {
        server
            .call(
                "POST",
                "/flow_runs/filter",
                Some(json!({"flow_runs": {"deployment_id": {"any_": [deployment]}}})),
            )
            .as_array()
            .cloned()
            .unwrap_or_default()
    };
    let runs = eventually(
        Duration::from_secs(30),
        "two flow runs on the server",
        || {
            let runs = runs_on_server();
            (runs.len() >= 2).then_some(runs)
        },
    );
    let mut via: Vec<&str> = runs
        .iter()
        .map(|r| {
            assert_eq!(r["parameters"]["prev_result"], "foobar", "{r:#}");
            assert_eq!(r["state_type"], "SCHEDULED", "{r:#}");
            r["parameters"]["via"].as_str().unwrap_or_default()
        })
        .collect();
    via.sort_unstable();
    assert_eq!(via, ["chain-inferred", "chain-selected"]);
    // Spur kept no run of its own (the server's workers run it, the server reports it).
    let (_, body) = http("GET", &format!("{}/api/runs", spur.url), None);
    let own: Value = serde_json::from_str(&body).expect("runs JSON");
    assert_eq!(own["runs"].as_array().map(Vec::len), Some(0), "{own}");
    // A restart (which re-dispatches anything not marked done) creates no second run.
    assert_eq!(spur.terminate(), Some(0));
    let spur = SpurDaemon::start(&data, &folder, &flags);
    eventually(Duration::from_secs(20), "the stream live again", || {
        (!spur.log_lines("Prefect event stream live").is_empty()).then_some(())
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(runs_on_server().len(), 2, "no second run after the restart");
}

fn spur_automation_named(spur: &SpurDaemon, name: &str) -> bool {
    let (_, body) = http(
        "GET",
        &format!("{}/api/automations?name={name}", spur.url),
        None,
    );
    serde_json::from_str::<Value>(&body)
        .ok()
        .and_then(|v| v["automations"].as_array().cloned())
        .is_some_and(|a| a.iter().any(|x| x["name"] == name))
}

/// The other actions on the server: an automation on the server pauses the server's
/// deployment (inferred from the event), pauses a work pool and a work queue (selected),
/// and cancels the server's flow run the event is about.
#[test]
fn prefect_automations_pause_and_cancel_on_the_server() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let server = PrefectServer::start(&cli, &prefect_dir);
    let flow = server.call("POST", "/flows/", Some(json!({"name": "ops"})));
    let deployment = server.call(
        "POST",
        "/deployments/",
        Some(json!({"name": "nightly", "flow_id": flow["id"]})),
    )["id"]
        .as_str()
        .expect("deployment id")
        .to_owned();
    let pool = server.call(
        "POST",
        "/work_pools/",
        Some(json!({"name": "ops-pool", "type": "process"})),
    )["id"]
        .as_str()
        .expect("pool id")
        .to_owned();
    let queue = server.call(
        "POST",
        "/work_pools/ops-pool/queues",
        Some(json!({"name": "ops-queue"})),
    )["id"]
        .as_str()
        .expect("queue id")
        .to_owned();
    let run = server.call(
        "POST",
        &format!("/deployments/{deployment}/create_flow_run"),
        Some(json!({})),
    )["id"]
        .as_str()
        .expect("flow run id")
        .to_owned();
    server.call(
        "POST",
        "/automations/",
        Some(json!({
            "name": "stop-everything",
            "trigger": {"type": "event", "expect": ["ops.stop"], "posture": "Reactive",
                        "threshold": 1, "within": 0},
            "actions": [
                {"type": "pause-deployment", "source": "inferred"},
                {"type": "pause-work-pool", "source": "selected", "work_pool_id": pool},
                {"type": "pause-work-queue", "source": "selected", "work_queue_id": queue},
                {"type": "cancel-flow-run"},
            ],
        })),
    );
    let data = dir.path().join("data");
    let folder = support::automations_folder(dir.path(), &[]);
    let flags = ["--prefect-api", server.api.as_str()];
    let spur = SpurDaemon::start(&data, &folder, &flags);
    eventually(
        Duration::from_secs(20),
        "the automation and the live stream",
        || {
            let live = !spur.log_lines("Prefect event stream live").is_empty();
            (live && spur_automation_named(&spur, "stop-everything")).then_some(())
        },
    );
    server.call(
        "POST",
        "/events",
        Some(json!([{
            "id": uuid::Uuid::new_v4(),
            "occurred": spur_core::time::format_timestamp(Utc::now()),
            "event": "ops.stop",
            "resource": {"prefect.resource.id": format!("prefect.flow-run.{run}")},
            "related": [{"prefect.resource.id": format!("prefect.deployment.{deployment}"),
                         "prefect.resource.role": "deployment"}],
        }])),
    );
    eventually(
        Duration::from_secs(30),
        "everything paused and the run cancelled",
        || {
            let d = server.call("GET", &format!("/deployments/{deployment}"), None);
            let p = server.call("GET", "/work_pools/ops-pool", None);
            let q = server.call("GET", &format!("/work_queues/{queue}"), None);
            let r = server.call("GET", &format!("/flow_runs/{run}"), None);
            let cancelled = matches!(r["state_type"].as_str(), Some("CANCELLING" | "CANCELLED"));
            (d["paused"] == true && p["is_paused"] == true && q["is_paused"] == true && cancelled)
                .then_some(())
        },
    );
    // The pauses succeeded. The cancel of a Scheduled run: the server cancels it at once and
    // answers "no infrastructure to terminate" instead of accepting, which Prefect's own
    // action reports as failed too ("Failed to set state: …"); Spur says the same.
    let failures = spur.log_lines("action failed");
    assert!(
        failures
            .iter()
            .all(|l| l.contains("cancel-flow-run") && l.contains("Failed to set state: ")),
        "{failures:?}"
    );
}

/// Prefect's own quickstart chain, as users write it, with Spur as the automations engine:
/// an upstream flow whose `on_completion` hook emits `prefect.result.produced`; a downstream
/// deployment made with `.deploy(triggers=[DeploymentEventTrigger(...)])`; a real `prefect
/// worker` on a `process` pool. Running the upstream flow makes the worker run the
/// downstream deployment with `prev_result == "foobar"`, read back from Prefect's API.
#[test]
fn prefects_quickstart_chain_runs_on_a_real_worker_with_spur_evaluating() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let python = cli.with_file_name("python");
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let server = PrefectServer::start(&cli, &prefect_dir);
    let code = dir.path().join("code");
    std::fs::create_dir_all(&code).expect("code dir");
    support::write(
        &code,
        "flows.py",
        r#"from prefect import flow
from prefect.events import emit_event


def emit_result(flow, flow_run, state):
    r = state.result()
    emit_event(
        event="prefect.result.produced",
        resource={"prefect.resource.id": f"prefect.result.{flow.name}.{flow_run.id}"},
        related=[{"prefect.resource.id": f"prefect.flow.{flow_run.flow_id}",
                  "prefect.resource.role": "flow", "prefect.resource.name": flow.name}],
        payload={"result": r},
    )


@flow(on_completion=[emit_result])
def upstream():
    return "foobar"


@flow
def downstream(prev_result: str):
    print(f"downstream got {prev_result}")
    return prev_result
"#,
    );
    support::write(
        &code,
        "deploy.py",
        r#"import os
from prefect import flow
from prefect.events import DeploymentEventTrigger

# `.to_deployment(...).apply()` creates the deployment and its trigger; `.deploy()` does the
# same and then looks for online workers, a lookup the pinned server (3.8.8 on FastAPI
# 0.154.0) answers with 422, so the test takes the step that does the work.
flow.from_source(
    source=os.path.dirname(os.path.abspath(__file__)), entrypoint="flows.py:downstream"
).to_deployment(
    name="downstream",
    work_pool_name="chain-pool",
    triggers=[DeploymentEventTrigger(
        expect={"prefect.result.produced"},
        match_related={"prefect.resource.role": "flow", "prefect.resource.name": "upstream"},
        parameters={"prev_result": "{{ event.payload.result }}"},
    )],
).apply()
"#,
    );
    let home = dir.path().join("client-home");
    std::fs::create_dir_all(&home).expect("client home");
    let env = |command: &mut Command| {
        command
            .current_dir(&code)
            .env("PREFECT_API_URL", &server.api)
            .env("PREFECT_HOME", &home)
            .env("PREFECT_LOGGING_LEVEL", "WARNING")
            .env("PREFECT_WORKER_QUERY_SECONDS", "1")
            .env("PREFECT_WORKER_PREFETCH_SECONDS", "1")
            .env("DO_NOT_TRACK", "1")
            .env_remove("PREFECT_PROFILE");
    };
    let run = |program: &Path, args: &[&str]| {
        let mut command = Command::new(program);
        command.args(args);
        env(&mut command);
        let out = command.output().expect("runs");
        assert!(
            out.status.success(),
            "{program:?} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(
        &cli,
        &["work-pool", "create", "chain-pool", "--type", "process"],
    );
    run(&python, &["deploy.py"]);

    let data = dir.path().join("data");
    let folder = support::automations_folder(dir.path(), &[]);
    let flags = ["--prefect-api", server.api.as_str()];
    let spur = SpurDaemon::start(&data, &folder, &flags);
    eventually(
        Duration::from_secs(30),
        "the deployment's trigger in Spur, live",
        || {
            let live = !spur.log_lines("Prefect event stream live").is_empty();
            let (_, body) = http("GET", &format!("{}/api/automations", spur.url), None);
            let loaded = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["automations"].as_array().cloned())
                .is_some_and(|a| a.iter().any(|x| x["origin"] == "prefect"));
            (live && loaded).then_some(())
        },
    );
    let mut worker = Command::new(&cli);
    worker.args(["worker", "start", "--pool", "chain-pool"]);
    env(&mut worker);
    let worker_log = std::fs::File::create(dir.path().join("worker.log")).expect("log");
    worker
        .stdout(worker_log.try_clone().expect("log"))
        .stderr(worker_log);
    std::os::unix::process::CommandExt::process_group(&mut worker, 0);
    let mut worker = WorkerGuard(worker.spawn().expect("the worker starts"));

    run(&python, &["-c", "from flows import upstream; upstream()"]);
    let done = eventually(
        Duration::from_secs(120),
        "the downstream run completed",
        || {
            let runs = server.call(
                "POST",
                "/flow_runs/filter",
                Some(json!({"deployments": {"name": {"any_": ["downstream"]}}})),
            );
            runs.as_array()
                .and_then(|r| r.iter().find(|r| r["state_type"] == "COMPLETED").cloned())
        },
    );
    assert_eq!(done["parameters"]["prev_result"], "foobar", "{done:#}");
    let _ = &mut worker;
}

/// Kills the worker's process group when the test ends.
struct WorkerGuard(Child);

impl Drop for WorkerGuard {
    fn drop(&mut self) {
        let group = format!("-{}", self.0.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The requests a [`loopback_receiver`] got: each one's head and body.
type ReceivedRequests = std::sync::Arc<std::sync::Mutex<Vec<(String, String)>>>;

/// A loopback HTTP receiver that answers 200 to everything; its URL and the requests it got.
fn loopback_receiver() -> (String, ReceivedRequests) {
    use std::io::Write as _;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let requests = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = requests.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(100) {
            let Ok(mut stream) = stream else { continue };
            let (head, body) = support::read_request(&stream);
            log.lock()
                .expect("lock")
                .push((head, String::from_utf8_lossy(&body).into_owned()));
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
            );
        }
    });
    (url, requests)
}

/// The flow-run actions and the block actions of server automations act on the server as
/// Prefect's actions service does: `call-webhook` and `send-notification` read their block
/// document (webhook, Slack, custom webhook) from the server and send to its URL, with
/// templates that name `flow_run`, `deployment`, `flow` and `work_pool` read from the server;
/// a block that cannot notify fails with Prefect's reason; `suspend-flow-run` suspends the
/// running flow run, `resume-flow-run` resumes it, `delete-flow-run` deletes it.
#[test]
fn prefect_flow_run_and_block_actions_act_on_the_server_with_its_objects_in_templates() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let python = cli.with_file_name("python");
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let server = PrefectServer::start(&cli, &prefect_dir);
    let id_of = |v: Value| v["id"].as_str().expect("an id").to_owned();
    let flow = id_of(server.call("POST", "/flows/", Some(json!({"name": "ops"}))));
    server.call(
        "POST",
        "/work_pools/",
        Some(json!({"name": "ops-pool", "type": "process"})),
    );
    let deployment = id_of(server.call(
        "POST",
        "/deployments/",
        Some(json!({"name": "nightly", "flow_id": flow, "work_pool_name": "ops-pool"})),
    ));
    let run = server.call(
        "POST",
        &format!("/deployments/{deployment}/create_flow_run"),
        Some(json!({})),
    );
    let (run, run_name) = (
        id_of(run.clone()),
        run["name"].as_str().unwrap_or("?").to_owned(),
    );
    let pool = server.call("GET", "/work_pools/ops-pool", None);
    let running = json!({"state": {"type": "RUNNING", "name": "Running"}, "force": true});
    server.call(
        "POST",
        &format!("/flow_runs/{run}/set_state"),
        Some(running),
    );

    // Blocks as users save them, through Prefect's own client.
    let (receiver, requests) = loopback_receiver();
    let home = dir.path().join("client-home");
    std::fs::create_dir_all(&home).expect("client home");
    let script = format!(
        r#"
from prefect.blocks.webhook import Webhook
from prefect.blocks.notifications import SlackWebhook, CustomWebhookNotificationBlock
from prefect.blocks.system import Secret
print(Webhook(url="{receiver}/hook", method="PUT", headers={{"X-Spur": "yes"}}).save("wh"))
print(SlackWebhook(url="{receiver}/slack").save("sl"))
print(CustomWebhookNotificationBlock(name="cw", url="{receiver}/custom/{{{{token}}}}",
      json_data={{"text": "{{{{subject}}}}|{{{{body}}}}"}}, secrets={{"token": "t0k"}}).save("cw"))
print(Secret(value="x").save("not-a-notifier"))
"#
    );
    let out = Command::new(&python)
        .args(["-c", &script])
        .env("PREFECT_API_URL", &server.api)
        .env("PREFECT_HOME", &home)
        .env("DO_NOT_TRACK", "1")
        .env_remove("PREFECT_PROFILE")
        .output()
        .expect("python runs");
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let blocks: Vec<&str> = printed.lines().map(str::trim).collect();
    let [webhook, slack, custom, secret] = blocks[..] else {
        panic!("four block ids: {printed}");
    };

    let automation = |name: &str, expect: &str, actions: Value| {
        server.call(
            "POST",
            "/automations/",
            Some(json!({
                "name": name,
                "trigger": {"type": "event", "expect": [expect], "posture": "Reactive",
                            "threshold": 1, "within": 0},
                "actions": actions,
            })),
        );
    };
    automation(
        "tell",
        "ops.tell",
        json!([
            {"type": "call-webhook", "block_document_id": webhook,
             "payload": "{{ flow_run.name }}|{{ deployment.name }}|{{ flow.name }}|{{ work_pool.name }}|{{ event.event }}"},
            {"type": "send-notification", "block_document_id": slack,
             "subject": "run {{ flow_run.name }}", "body": "in {{ flow_run.state.name }}"},
            {"type": "send-notification", "block_document_id": custom,
             "subject": "S", "body": "{{ deployment.name }}"},
            {"type": "send-notification", "block_document_id": secret, "body": "never"},
        ]),
    );
    automation(
        "suspend-it",
        "ops.suspend",
        json!([{"type": "suspend-flow-run"}]),
    );
    automation(
        "resume-it",
        "ops.resume",
        json!([{"type": "resume-flow-run"}]),
    );
    automation(
        "delete-it",
        "ops.delete",
        json!([{"type": "delete-flow-run"}]),
    );

    let data = dir.path().join("data");
    let folder = support::automations_folder(dir.path(), &[]);
    let flags = ["--prefect-api", server.api.as_str()];
    let spur = SpurDaemon::start(&data, &folder, &flags);
    eventually(
        Duration::from_secs(20),
        "the automations and the live stream",
        || {
            let live = !spur.log_lines("Prefect event stream live").is_empty();
            let loaded = ["tell", "suspend-it", "resume-it", "delete-it"]
                .iter()
                .all(|n| spur_automation_named(&spur, n));
            (live && loaded).then_some(())
        },
    );
    let emit = |name: &str| {
        server.call(
            "POST",
            "/events",
            Some(json!([{
                "id": uuid::Uuid::new_v4(),
                "occurred": spur_core::time::format_timestamp(Utc::now()),
                "event": name,
                "resource": {"prefect.resource.id": format!("prefect.flow-run.{run}")},
                "related": [
                    {"prefect.resource.id": format!("prefect.deployment.{deployment}"),
                     "prefect.resource.role": "deployment"},
                    {"prefect.resource.id": format!("prefect.flow.{flow}"),
                     "prefect.resource.role": "flow"},
                    {"prefect.resource.id": format!("prefect.work-pool.{}", pool["id"].as_str().unwrap_or_default()),
                     "prefect.resource.role": "work-pool"},
                ],
            }])),
        );
    };

    emit("ops.tell");
    let got = eventually(Duration::from_secs(30), "three requests", || {
        let got = requests.lock().expect("lock").clone();
        (got.len() >= 3).then_some(got)
    });
    let find = |path: &str| {
        got.iter()
            .find(|(head, _)| head.contains(path))
            .cloned()
            .unwrap_or_else(|| panic!("no request to {path}: {got:#?}"))
    };
    let (head, body) = find(" /hook ");
    assert!(head.starts_with("PUT "), "{head}");
    assert!(head.to_ascii_lowercase().contains("x-spur: yes"), "{head}");
    assert_eq!(body, format!("{run_name}|nightly|ops|ops-pool|ops.tell"));
    let (_, body) = find(" /slack ");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body, json!({"text": format!("run {run_name}\nin Running")}));
    let (_, body) = find(" /custom/t0k ");
    let body: Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(body, json!({"text": "S|nightly"}));
    let failed = eventually(
        Duration::from_secs(10),
        "the secret block's failure",
        || {
            let lines = spur.log_lines("action failed");
            (!lines.is_empty()).then_some(lines)
        },
    );
    assert!(
        failed.len() == 1
            && failed[0].contains("The referenced block was not a notification block"),
        "{failed:?}"
    );

    let state = || {
        let r = server.call("GET", &format!("/flow_runs/{run}"), None);
        (
            r["state_type"].as_str().unwrap_or_default().to_owned(),
            r["state_name"].as_str().unwrap_or_default().to_owned(),
        )
    };
    emit("ops.suspend");
    eventually(Duration::from_secs(30), "the run suspended", || {
        (state() == ("PAUSED".to_owned(), "Suspended".to_owned())).then_some(())
    });
    let r = server.call("GET", &format!("/flow_runs/{run}"), None);
    assert_eq!(
        r["state"]["state_details"]["pause_reschedule"], true,
        "{r:#}"
    );
    assert!(
        r["state"]["state_details"]["pause_timeout"].is_string(),
        "{r:#}"
    );
    emit("ops.resume");
    eventually(Duration::from_secs(30), "the run resumed", || {
        (state().0 == "SCHEDULED").then_some(())
    });
    emit("ops.delete");
    eventually(Duration::from_secs(30), "the run deleted", || {
        let url = format!("{}/flow_runs/{run}", server.api);
        matches!(try_http("GET", &url, None, None), Some((404, _))).then_some(())
    });
    assert_eq!(
        spur.log_lines("action failed").len(),
        1,
        "only the secret block failed"
    );
}
