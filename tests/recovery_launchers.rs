//! Run recovery per launcher kind (issue 18): a run a crash left before its launch is
//! launched exactly once after the restart, and a run the remote side already has is
//! reconciled by its idempotency key, never created twice.
//!
//! Each test writes into a data folder what a daemon killed between recording a run and
//! launching it leaves behind: the run's record (Scheduled, then Pending, maybe Running), and
//! none of its events (a crash may cut them off; recovery must add them to the log). Then the
//! real `spur serve` starts on that folder. Real processes, loopback only: a local receiver
//! for `http`, a real nats-server and `spur worker` for `worker`, a real Prefect 3.8.8 server
//! for `prefect`.

mod support;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use serde_json::{Value, json};
use spur_action::{Deployment, Launcher, Run, RunState};
use support::{SpurDaemon, automations_folder, eventually, http, read_request, skip_without};

/// The deployment `name` as the daemon will read it from `automations`.
fn deployment(automations: &Path, name: &str) -> Deployment {
    let loaded = spur_core::load::load_path(automations);
    let declared = loaded
        .deployments
        .iter()
        .find(|d| d.name == name)
        .unwrap_or_else(|| panic!("deployment {name} is declared: {:?}", loaded.diagnostics));
    Deployment::from_ref(declared).expect("a valid deployment")
}

/// Writes into `data` the runs a crash left: for each (deployment, idempotency key, state),
/// the run created Scheduled and recorded up to that state, as the executor records them, but
/// without emitting a single event. The store is closed again before returning.
fn seed(data: &Path, automations: &Path, seeds: &[(&str, &str, RunState)]) -> Vec<Run> {
    let store = spur_store::Store::open(&data.join("spur.redb")).expect("the store opens");
    // Distinct, increasing times, so the log's order by `occurred` is the history's order.
    let base = Utc::now() - TimeDelta::seconds(60);
    let runs = seeds
        .iter()
        .map(|&(name, key, left_in)| {
            let deployment = deployment(automations, name);
            let parameters = deployment
                .prepare_parameters(&json!({"key": key}))
                .expect("parameters");
            let mut run = Run::new(
                &deployment.target(),
                parameters,
                Some(key.to_owned()),
                None,
                base,
            );
            let _scheduled = run.transition(RunState::Scheduled, None, base);
            let value = serde_json::to_value(&run).expect("run JSON");
            let (_, created) = store
                .create_run(run.id, Some(key), &value)
                .expect("create_run");
            assert!(created, "run {key} is new");
            let later: &[RunState] = match left_in {
                RunState::Scheduled => &[],
                RunState::Pending => &[RunState::Pending],
                RunState::Running => &[RunState::Pending, RunState::Running],
                other => panic!("a crash leaves runs unfinished, not {other:?}"),
            };
            for (i, state) in later.iter().enumerate() {
                let at = base + TimeDelta::seconds(i as i64 + 1);
                let _event = run.transition(*state, None, at);
                let value = serde_json::to_value(&run).expect("run JSON");
                store.update_run(run.id, &value).expect("update_run");
            }
            run
        })
        .collect();
    drop(store);
    runs
}

/// The run `id` as the daemon has it.
fn get_run(daemon: &SpurDaemon, id: uuid::Uuid) -> Value {
    let (status, body) = http("GET", &format!("{}/api/runs/{id}", daemon.url), None);
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("run JSON")
}

/// Waits until run `id` is in a final state and returns it.
fn finished(daemon: &SpurDaemon, id: uuid::Uuid, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let last = get_run(daemon, id);
        let state = last["state"].as_str().unwrap_or_default().to_owned();
        if !["Scheduled", "Pending", "Running"].contains(&state.as_str()) {
            return last;
        }
        assert!(
            Instant::now() < deadline,
            "run {id} did not finish: {last:#}\n{}",
            daemon.logs.lock().expect("log lock").join("\n")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn states(run: &Value) -> Vec<String> {
    run["history"]
        .as_array()
        .expect("history")
        .iter()
        .map(|h| h["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

fn last_message(run: &Value) -> String {
    run["history"]
        .as_array()
        .and_then(|h| h.last())
        .and_then(|h| h["message"].as_str())
        .unwrap_or_default()
        .to_owned()
}

/// The run's flow-run events in the log, oldest first.
fn events_of(daemon: &SpurDaemon, id: &str) -> Vec<Value> {
    let filter = json!({
        "filter": {"resource": {"id": [format!("prefect.flow-run.{id}")]}, "order": "ASC"},
        "limit": 50,
    });
    let (status, body) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(filter),
    );
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("JSON");
    page["events"].as_array().cloned().unwrap_or_default()
}

/// Every state of the (finished) run has its event in the log, once, in history order,
/// including the states the crash recorded without their events.
fn assert_log_matches_history(daemon: &SpurDaemon, run: &Value) {
    let id = run["id"].as_str().expect("run id");
    let history = run["history"].as_array().expect("history").clone();
    let events = eventually(
        Duration::from_secs(10),
        "every state's event in the log",
        || {
            let events = events_of(daemon, id);
            (events.len() >= history.len()).then_some(events)
        },
    );
    let names: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    let expected: Vec<String> = history
        .iter()
        .map(|h| format!("prefect.flow-run.{}", h["state"].as_str().unwrap_or("")))
        .collect();
    assert_eq!(
        names, expected,
        "run {id}: the log's events follow its history"
    );
    for (event, state) in events.iter().zip(&history) {
        assert_eq!(event["id"], state["event_id"], "run {id}: event ids");
    }
}

/// Lines of `file` (missing: none).
fn lines(file: &Path) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// `command`: runs left Scheduled and Pending are launched once each, end Completed, and
/// the log gains the Scheduled and Pending events their records had, in order.
#[test]
fn command_runs_left_pending_by_a_crash_are_launched_once_after_the_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let launches = dir.path().join("launches.txt");
    let automations = automations_folder(
        dir.path(),
        &[(
            "deployments.yaml",
            &format!(
                "deployments:\n  - name: appends\n    launcher:\n      command: [sh, -c, 'echo \"$SPUR_RUN_ID\" >> {}; echo \"\\\"done\\\"\"']\n",
                launches.display()
            ),
        )],
    );
    let data = dir.path().join("data");
    let runs = seed(
        &data,
        &automations,
        &[
            ("appends", "left-pending", RunState::Pending),
            ("appends", "left-scheduled", RunState::Scheduled),
        ],
    );
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    for run in &runs {
        let done = finished(&daemon, run.id, Duration::from_secs(15));
        assert_eq!(done["state"], "Completed", "{done:#}");
        assert_eq!(done["result"], "done", "{done:#}");
        assert_eq!(
            states(&done),
            ["Scheduled", "Pending", "Running", "Completed"],
            "{done:#}"
        );
        assert_log_matches_history(&daemon, &done);
    }
    // Give a repeated launch the time to show before counting.
    std::thread::sleep(Duration::from_millis(500));
    let launched = lines(&launches);
    for run in &runs {
        let times = launched
            .iter()
            .filter(|l| **l == run.id.to_string())
            .count();
        assert_eq!(
            times, 1,
            "run {} launched {times} times: {launched:?}",
            run.id
        );
    }
    assert_eq!(launched.len(), runs.len(), "{launched:?}");
}

/// A loopback receiver for the `http` launcher: answers 200 with a JSON body and records
/// each request's head.
fn receiver() -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let (head, _body) = read_request(&stream);
            seen.lock().expect("lock").push(head);
            let text = r#"{"received": true}"#;
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, heads)
}

fn idempotency_key(head: &str) -> Option<String> {
    head.lines().find_map(|l| {
        let (name, value) = l.split_once(':')?;
        name.eq_ignore_ascii_case("idempotency-key")
            .then(|| value.trim().to_owned())
    })
}

/// `http`: a run left Pending sends its one request (with its Idempotency-Key) after the
/// restart; a run left Running may already have reached the receiver, so it is Crashed,
/// saying so, and sends nothing.
#[test]
fn http_runs_left_pending_are_sent_once_and_runs_left_running_crash_without_a_request() {
    let (url, heads) = receiver();
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[(
            "deployments.yaml",
            &format!("deployments:\n  - name: posts\n    launcher: {{http: {{url: '{url}'}}}}\n"),
        )],
    );
    let data = dir.path().join("data");
    let runs = seed(
        &data,
        &automations,
        &[
            ("posts", "http-left-pending", RunState::Pending),
            ("posts", "http-left-running", RunState::Running),
        ],
    );
    let (pending, running) = (&runs[0], &runs[1]);
    let daemon = SpurDaemon::start(&data, &automations, &[]);

    let sent = finished(&daemon, pending.id, Duration::from_secs(15));
    assert_eq!(sent["state"], "Completed", "{sent:#}");
    assert_eq!(sent["result"]["received"], true, "{sent:#}");
    assert_eq!(
        states(&sent),
        ["Scheduled", "Pending", "Running", "Completed"]
    );
    assert_log_matches_history(&daemon, &sent);

    let crashed = finished(&daemon, running.id, Duration::from_secs(15));
    assert_eq!(crashed["state"], "Crashed", "{crashed:#}");
    let message = last_message(&crashed);
    assert!(
        message.contains("may have reached the receiver"),
        "the Crashed run says why: {message}"
    );
    assert_eq!(
        states(&crashed),
        ["Scheduled", "Pending", "Running", "Crashed"]
    );
    assert_log_matches_history(&daemon, &crashed);

    std::thread::sleep(Duration::from_millis(500));
    let keys: Vec<Option<String>> = heads
        .lock()
        .expect("lock")
        .iter()
        .map(|h| idempotency_key(h))
        .collect();
    assert_eq!(
        keys,
        [Some("http-left-pending".to_owned())],
        "exactly one request, the Pending run's"
    );
}

/// A `spur worker` process whose output is kept; killed on drop.
struct Worker {
    child: Child,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Worker {
    fn start(pool: &str, nats: &str) -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(["worker", "--pool", pool, "--nats", nats])
            .env("SPUR_LOG", "info")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spur worker starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        let worker = Worker { child, logs };
        eventually(Duration::from_secs(10), "the worker ready", || {
            worker
                .logs
                .lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains("worker ready"))
                .then_some(())
        });
        worker
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `worker`: a run left Pending that no worker has is handed to the pool once; one a worker
/// already took (the request went out, then the daemon died before recording Running) is
/// found by inquiry and followed to its end, not run a second time; one a worker already
/// finished takes that end, with the Running it passed through in its history and log.
#[test]
fn worker_runs_left_pending_are_handed_over_once_or_followed_if_a_worker_has_them() {
    let Some(bin) = support::require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = support::NatsServer::start(&bin, &dir.path().join("nats"));
    let launches = dir.path().join("launches.txt");
    // Long enough that the restarted daemon finds the pre-sent run still Running.
    let automations = automations_folder(
        dir.path(),
        &[(
            "deployments.yaml",
            &format!(
                "deployments:\n  - name: on-worker\n    launcher:\n      worker:\n        pool: recovery\n        command: [sh, -c, 'echo \"$SPUR_RUN_ID\" >> {0}; sleep 3; echo \"\\\"done\\\"\"']\n        timeout: 60\n  - name: on-worker-fast\n    launcher:\n      worker:\n        pool: recovery\n        command: [sh, -c, 'echo \"$SPUR_RUN_ID\" >> {0}; echo \"\\\"done\\\"\"']\n        timeout: 60\n",
                launches.display()
            ),
        )],
    );
    let data = dir.path().join("data");
    let runs = seed(
        &data,
        &automations,
        &[
            ("on-worker", "worker-left-pending", RunState::Pending),
            ("on-worker", "worker-has-it", RunState::Pending),
            ("on-worker-fast", "worker-finished-it", RunState::Pending),
        ],
    );
    // runs[0] is left Pending and no worker has it: handed over after the restart.
    let (taken, finished_there) = (&runs[1], &runs[2]);
    let worker = Worker::start("recovery", &nats.url);

    // What the dead daemon had done for `taken` and `finished_there`: handed them to the
    // pool (the first is still running when the daemon comes back, the second is done).
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let client = runtime
        .block_on(async_nats::connect(&nats.url))
        .expect("NATS connects");
    for (run, name) in [(taken, "on-worker"), (finished_there, "on-worker-fast")] {
        let Some(Launcher::Worker { pool, command }) = deployment(&automations, name).launcher
        else {
            panic!("{name} has a worker launcher");
        };
        let request = spur_action::worker::RunRequest::new(run, &command, None);
        let body = serde_json::to_vec(&request).expect("request JSON");
        runtime.block_on(async {
            tokio::time::timeout(
                Duration::from_secs(10),
                client.request(spur_action::worker::pool_subject(&pool), body.into()),
            )
            .await
            .expect("the worker answers in time")
            .expect("the worker accepts the run");
        });
    }
    eventually(Duration::from_secs(10), "the worker running both", || {
        let launched = lines(&launches);
        (launched.contains(&taken.id.to_string())
            && launched.contains(&finished_there.id.to_string()))
        .then_some(())
    });
    eventually(
        Duration::from_secs(10),
        "the fast run finished there",
        || {
            worker
                .logs
                .lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains("finished") && l.contains(&finished_there.id.to_string()))
                .then_some(())
        },
    );

    let daemon = SpurDaemon::start(&data, &automations, &["--nats", &nats.url]);
    for run in &runs {
        let done = finished(&daemon, run.id, Duration::from_secs(30));
        assert_eq!(done["state"], "Completed", "{done:#}");
        assert_eq!(done["result"], "done", "{done:#}");
        assert_eq!(
            states(&done),
            ["Scheduled", "Pending", "Running", "Completed"],
            "{done:#}"
        );
        assert_log_matches_history(&daemon, &done);
    }
    assert!(
        !daemon
            .log_lines("a worker still has the run: following it")
            .is_empty(),
        "the taken run was followed"
    );
    std::thread::sleep(Duration::from_millis(500));
    let launched = lines(&launches);
    for run in &runs {
        let times = launched
            .iter()
            .filter(|l| **l == run.id.to_string())
            .count();
        assert_eq!(
            times, 1,
            "run {} launched {times} times: {launched:?}",
            run.id
        );
    }
    let repeated = worker
        .logs
        .lock()
        .expect("log lock")
        .iter()
        .filter(|l| l.contains("a repeated run request"))
        .count();
    assert_eq!(repeated, 0, "the daemon never asked the worker twice");
}

/// A real `prefect server start` on a free loopback port with its own home and database;
/// its whole process group is killed on drop.
struct PrefectServer {
    child: Child,
    api: String,
    log: PathBuf,
}

impl PrefectServer {
    fn start(prefect: &Path, dir: &Path) -> PrefectServer {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let home = dir.join("home");
        std::fs::create_dir_all(&home).expect("prefect home");
        let log = dir.join("prefect-server.log");
        let out = std::fs::File::create(&log).expect("log file");
        let err = out.try_clone().expect("log file");
        let mut command = Command::new(prefect);
        command
            .args(["server", "start", "--host", "127.0.0.1", "--port"])
            .arg(port.to_string())
            // The API alone: no scheduler or other services writing to its SQLite.
            .args(["--no-ui", "--no-services"])
            .current_dir(dir)
            .env("PREFECT_HOME", &home)
            .env(
                "PREFECT_API_DATABASE_CONNECTION_URL",
                format!("sqlite+aiosqlite:///{}", dir.join("prefect.db").display()),
            )
            .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
            .env_remove("PREFECT_API_URL")
            .env_remove("PREFECT_PROFILE")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        std::os::unix::process::CommandExt::process_group(&mut command, 0);
        let child = command.spawn().expect("prefect server starts");
        let mut server = PrefectServer {
            child,
            api: format!("http://127.0.0.1:{port}/api"),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            if matches!(
                try_http("GET", &format!("{}/health", server.api), None),
                Some((200, _))
            ) {
                return server;
            }
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!(
                    "prefect server exited with {status}:\n{}",
                    server.log_tail()
                );
            }
            assert!(
                Instant::now() < deadline,
                "prefect server not healthy within 90 s:\n{}",
                server.log_tail()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// A setup call, retried while the server still answers 503 (or not at all) after
    /// `/health` turned green; panics on any other failure.
    fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let url = format!("{}{path}", self.api);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match try_http(method, &url, Some(body.clone())) {
                Some((status, answer)) if (200..300).contains(&status) => return answer,
                Some((503, _)) | None if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(250));
                }
                other => panic!("{method} {url} answered {other:?}:\n{}", self.log_tail()),
            }
        }
    }

    /// Every flow run of Prefect deployment `deployment`.
    fn flow_runs(&self, deployment: &str) -> Vec<Value> {
        let filter = json!({"deployments": {"id": {"any_": [deployment]}}});
        self.call("POST", "/flow_runs/filter", filter)
            .as_array()
            .cloned()
            .expect("a list of flow runs")
    }
}

impl Drop for PrefectServer {
    fn drop(&mut self) {
        // Its own process group: the server and whatever it started.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One HTTP request over loopback: (status, JSON body), or `None` when nothing answers.
fn try_http(method: &str, url: &str, body: Option<Value>) -> Option<(u16, Value)> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, url).timeout(Duration::from_secs(10));
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

/// The `prefect` CLI of the provisioned Prefect (beside `$SPUR_PREFECT_PYTHON`), or `None`
/// once the skip is reported.
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

/// `prefect`, on a real Prefect 3.8.8 server: a run left Pending creates its flow run once
/// after the restart; a run left Running whose flow run Prefect already has (the daemon died
/// while following it) creates no second one — the repeated create_flow_run, carrying the
/// run's idempotency key, gets the same flow run — and is followed until Prefect says it
/// is COMPLETED.
#[test]
fn prefect_runs_are_created_once_on_a_real_prefect_server_across_a_restart() {
    let Some(cli) = require_prefect_cli() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let prefect_dir = dir.path().join("prefect");
    std::fs::create_dir_all(&prefect_dir).expect("prefect dir");
    let server = PrefectServer::start(&cli, &prefect_dir);
    let flow = server.call("POST", "/flows/", json!({"name": "spur-recovery"}));
    let flow_id = flow["id"].as_str().expect("flow id").to_owned();
    let deployment_id = |name: &str| {
        let created = server.call(
            "POST",
            "/deployments/",
            json!({"name": name, "flow_id": flow_id}),
        );
        created["id"].as_str().expect("deployment id").to_owned()
    };
    let (followed_deployment, pending_deployment) =
        (deployment_id("followed"), deployment_id("pending"));
    let api = &server.api;
    let automations = automations_folder(
        dir.path(),
        &[(
            "deployments.yaml",
            &format!(
                "deployments:\n  - {{name: followed, launcher: {{prefect: {{api_url: '{api}', deployment_id: '{followed_deployment}', follow: true, poll_interval: 0.2}}}}}}\n  - {{name: accepted, launcher: {{prefect: {{api_url: '{api}', deployment_id: '{pending_deployment}', follow: false}}}}}}\n"
            ),
        )],
    );
    let data = dir.path().join("data");
    let runs = seed(
        &data,
        &automations,
        &[
            ("followed", "prefect-left-running", RunState::Running),
            ("accepted", "prefect-left-pending", RunState::Pending),
        ],
    );
    let (followed, pending) = (&runs[0], &runs[1]);

    // The flow run the dead daemon had created for the Running run, by its key.
    let key = followed.idempotency_key.clone().expect("a key");
    let before = server.call(
        "POST",
        &format!("/deployments/{followed_deployment}/create_flow_run"),
        json!({"parameters": followed.parameters, "idempotency_key": key,
               "state": {"type": "SCHEDULED", "name": "Scheduled"}, "tags": ["spur"]}),
    );
    let flow_run = before["id"].as_str().expect("flow run id").to_owned();

    let daemon = SpurDaemon::start(&data, &automations, &[]);

    // Pending, follow: false: created on Prefect after the restart, once.
    let accepted = finished(&daemon, pending.id, Duration::from_secs(30));
    assert_eq!(accepted["state"], "Completed", "{accepted:#}");
    assert_log_matches_history(&daemon, &accepted);
    let created = server.flow_runs(&pending_deployment);
    assert_eq!(
        created.len(),
        1,
        "one flow run for the Pending run: {created:#?}"
    );
    assert_eq!(created[0]["idempotency_key"], "prefect-left-pending");
    assert_eq!(accepted["result"]["prefect_flow_run_id"], created[0]["id"]);

    // Running, followed: the daemon follows the flow run Prefect already had. While Prefect
    // has not finished it, neither has Spur.
    std::thread::sleep(Duration::from_secs(1));
    let still = get_run(&daemon, followed.id);
    assert_eq!(still["state"], "Running", "{still:#}");
    server.call(
        "POST",
        &format!("/flow_runs/{flow_run}/set_state"),
        json!({"state": {"type": "COMPLETED", "name": "Completed"}, "force": true}),
    );
    let done = finished(&daemon, followed.id, Duration::from_secs(30));
    assert_eq!(done["state"], "Completed", "{done:#}");
    assert_eq!(done["result"]["prefect_flow_run_id"], flow_run.as_str());
    assert_eq!(done["result"]["prefect_state"], "COMPLETED", "{done:#}");
    assert_eq!(
        states(&done),
        ["Scheduled", "Pending", "Running", "Completed"],
        "{done:#}"
    );
    assert_log_matches_history(&daemon, &done);
    let all = server.flow_runs(&followed_deployment);
    assert_eq!(
        all.len(),
        1,
        "Prefect holds one flow run for the followed run: {all:#?}"
    );
    assert_eq!(all[0]["id"], flow_run.as_str());
}
