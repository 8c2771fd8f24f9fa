//! End-to-end tests of actions: webhooks (with a real HTTP server on loopback), retries and the
//! dead-letter list, pausing automations, emitting events, and the events actions leave behind.

mod support;

use std::io::Write;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use support::{SpurDaemon, automations_folder, eventually, read_request, spur, write};

/// A loopback HTTP server that records requests and answers with `status` (changeable),
/// after `delay` (to keep an action in flight).
struct Receiver {
    url: String,
    requests: Arc<Mutex<Vec<(String, String)>>>,
    status: Arc<AtomicU16>,
}

impl Receiver {
    fn start(status: u16) -> Receiver {
        Receiver::start_slow(status, Duration::ZERO)
    }

    fn start_slow(status: u16, delay: Duration) -> Receiver {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let status = Arc::new(AtomicU16::new(status));
        let (log, code) = (requests.clone(), status.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().take(200) {
                let Ok(mut stream) = stream else { continue };
                let (head, body) = read_request(&stream);
                log.lock()
                    .expect("lock")
                    .push((head, String::from_utf8_lossy(&body).into_owned()));
                let code = code.load(Ordering::SeqCst);
                std::thread::sleep(delay);
                let _ = write!(
                    stream,
                    "HTTP/1.1 {code} X\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok"
                );
            }
        });
        Receiver {
            url,
            requests,
            status,
        }
    }

    fn requests(&self) -> Vec<(String, String)> {
        self.requests.lock().expect("lock").clone()
    }
}

fn emit(daemon: &SpurDaemon, name: &str, resource: &str, payload: &str) {
    let (ok, out, err) = spur(&[
        "emit",
        name,
        "--resource",
        resource,
        "--payload",
        payload,
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{out}{err}");
}

fn events(daemon: &SpurDaemon, name: &str) -> Vec<Value> {
    let (ok, out, err) = spur(&[
        "events",
        "query",
        "--json",
        "--name",
        name,
        "--limit",
        "200",
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect()
}

#[test]
fn a_webhook_is_called_with_the_rendered_payload_and_the_actions_are_recorded() {
    let receiver = Receiver::start(404);
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "hook.yaml",
        &format!(
            r#"
name: notify-ops
trigger: {{type: event, posture: Reactive, expect: [backup.failed]}}
actions:
  - type: call-webhook
    url: {url}/hooks/ops
    headers: {{X-Source: "<< event.resource.id >>"}}
    payload: '{{"text": "backup << event.resource.id >> failed: << event.payload.reason >>"}}'
"#,
            url = receiver.url
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    emit(
        &daemon,
        "backup.failed",
        "db.main",
        r#"{"reason": "disk full"}"#,
    );
    let requests = eventually(Duration::from_secs(10), "the webhook call", || {
        let r = receiver.requests();
        (!r.is_empty()).then_some(r)
    });
    let (head, body) = &requests[0];
    assert!(head.starts_with("POST /hooks/ops"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("x-source: db.main"),
        "{head}"
    );
    assert!(
        head.to_ascii_lowercase().contains("idempotency-key: "),
        "{head}"
    );
    assert_eq!(
        serde_json::from_str::<Value>(body).expect("JSON body"),
        json!({"text": "backup db.main failed: disk full"})
    );

    // Prefect's bookkeeping: automation.triggered, then action.triggered and action.executed
    // (a non-2xx answer still counts as executed for webhooks, as in Prefect).
    let executed = eventually(Duration::from_secs(10), "the action events", || {
        let e = events(&daemon, "prefect.automation.action.executed");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(executed[0]["payload"]["status_code"], 404);
    assert_eq!(executed[0]["payload"]["action_type"], "call-webhook");
    let triggered = events(&daemon, "prefect.automation.action.triggered");
    assert_eq!(
        executed[0]["follows"], triggered[0]["id"],
        "executed follows triggered"
    );
    let automation_triggered = events(&daemon, "prefect.automation.triggered");
    assert_eq!(automation_triggered.len(), 1);
    assert_eq!(
        automation_triggered[0]["resource"]["prefect.resource.name"],
        "notify-ops"
    );
    assert_eq!(
        automation_triggered[0]["related"][0]["prefect.resource.role"],
        "triggering-event"
    );
}

#[test]
fn a_failing_notification_is_retried_dead_lettered_and_retried_by_hand() {
    let receiver = Receiver::start(503);
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "notify.yaml",
        &format!(
            "name: page\ntrigger: {{type: event, posture: Reactive, expect: [disk.full]}}\nactions:\n  - {{type: send-notification, url: '{}/notify', subject: 'disk full on << event.resource.id >>', body: 'act now'}}\n",
            receiver.url
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    emit(&daemon, "disk.full", "host.7", "{}");
    let failed = eventually(Duration::from_secs(30), "the dead-lettered action", || {
        let (ok, out, _) = spur(&["actions", "failed", "--api", &daemon.url]);
        let list: Vec<Value> = out
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (ok && !list.is_empty()).then_some(list)
    });
    assert!(
        receiver.requests().len() >= 5,
        "retried with backoff before giving up"
    );
    assert!(
        failed[0]["reason"].as_str().unwrap_or("").contains("503"),
        "{}",
        failed[0]
    );
    let failed_event = events(&daemon, "prefect.automation.action.failed");
    assert!(
        failed_event[0]["payload"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("gave up")
    );
    let body: Value = serde_json::from_str(&receiver.requests()[0].1).expect("JSON");
    assert_eq!(
        body,
        json!({"subject": "disk full on host.7", "body": "act now"})
    );

    receiver.status.store(200, Ordering::SeqCst);
    let id = failed[0]["id"].as_str().expect("id").to_owned();
    let (ok, out, err) = spur(&["actions", "retry", &id, "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let (_, out, _) = spur(&["actions", "failed", "--api", &daemon.url]);
    assert!(
        out.trim().is_empty(),
        "the retried action left the list: {out}"
    );
}

#[test]
fn actions_pause_automations_and_emit_events() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "a.yaml",
        r#"
- name: chatty
  id: 0a0a0a0a-0000-4000-8000-000000000001
  trigger: {type: event, posture: Reactive, expect: [chat]}
  actions:
    - type: emit-event
      event:
        event: chat.seen
        resource: {prefect.resource.id: "<< event.resource.id >>"}
        payload: {words: "<< event.payload.words >>"}
- name: mute
  trigger: {type: event, posture: Reactive, expect: [mute]}
  actions:
    - {type: pause-automation, source: selected, automation_id: 0a0a0a0a-0000-4000-8000-000000000001}
"#,
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    emit(&daemon, "chat", "room.1", r#"{"words": 3}"#);
    let seen = eventually(Duration::from_secs(10), "the emitted event", || {
        let e = events(&daemon, "chat.seen");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(seen[0]["resource"]["prefect.resource.id"], "room.1");
    assert_eq!(seen[0]["payload"]["words"], "3");

    emit(&daemon, "mute", "ops", "{}");
    eventually(Duration::from_secs(10), "chatty paused", || {
        let (_, out, _) = spur(&["automations", "ls", "--api", &daemon.url]);
        out.contains("chatty (disabled)").then_some(())
    });
    emit(&daemon, "chat", "room.2", r#"{"words": 1}"#);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        events(&daemon, "chat.seen").len(),
        1,
        "a paused automation does not fire"
    );
}

#[test]
fn http_and_prefect_launchers_send_the_run_with_its_idempotency_key() {
    let receiver = Receiver::start(201);
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "deployments.yaml",
        &format!(
            r#"
deployments:
  - name: over-http
    launcher:
      http:
        url: "{url}/jobs/<< parameters.job >>"
        headers: {{X-Run: "<< run.id >>"}}
        body: '{{"size": << parameters.size >>}}'
  - name: on-prefect
    launcher:
      prefect:
        api_url: {url}/api
        deployment_id: 0c0c0c0c-0000-4000-8000-000000000003
        follow: false  # complete on acceptance (following is tested in tests/runs.rs)
"#,
            url = receiver.url
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let (ok, out, err) = spur(&[
        "runs",
        "start",
        "over-http",
        "-p",
        "job=resize",
        "-p",
        "size=3",
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{out}{err}");
    let (ok, out, err) = spur(&[
        "runs",
        "start",
        "on-prefect",
        "-p",
        "x=1",
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{out}{err}");
    let requests = eventually(Duration::from_secs(10), "both launches", || {
        let r = receiver.requests();
        (r.len() >= 2).then_some(r)
    });
    let http = requests
        .iter()
        .find(|(h, _)| h.starts_with("POST /jobs/resize"))
        .expect("the http launch");
    assert!(
        http.0.to_ascii_lowercase().contains("idempotency-key: "),
        "{}",
        http.0
    );
    assert!(
        http.0.to_ascii_lowercase().contains("x-run: "),
        "{}",
        http.0
    );
    assert_eq!(
        serde_json::from_str::<Value>(&http.1).expect("JSON"),
        json!({"size": 3})
    );
    let prefect = requests
        .iter()
        .find(|(h, _)| {
            h.starts_with(
                "POST /api/deployments/0c0c0c0c-0000-4000-8000-000000000003/create_flow_run",
            )
        })
        .expect("the Prefect launch");
    let body: Value = serde_json::from_str(&prefect.1).expect("JSON");
    assert_eq!(body["parameters"], json!({"x": 1}));
    assert!(body["idempotency_key"].is_string());
    let runs = eventually(Duration::from_secs(10), "both runs completed", || {
        let (_, out, _) = spur(&["runs", "ls", "--api", &daemon.url]);
        (out.matches("Completed").count() == 2).then_some(out)
    });
    assert!(
        runs.contains("over-http") && runs.contains("on-prefect"),
        "{runs}"
    );
}

/// SIGTERM while an action is in flight: the daemon lets it finish and records it, so the
/// next start does not perform it again (the webhook is called once) and its events are in
/// the log.
#[test]
fn an_action_in_flight_at_shutdown_finishes_and_is_not_repeated_after_restart() {
    let receiver = Receiver::start_slow(200, Duration::from_millis(1500));
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "hook.yaml",
        &format!(
            "name: slow-hook\ntrigger: {{type: event, posture: Reactive, expect: [job.done]}}\nactions:\n  - {{type: call-webhook, url: {url}/slow, payload: '{{\"job\": \"<< event.resource.id >>\"}}'}}\n",
            url = receiver.url
        ),
    );
    let data = dir.path().join("data");
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    emit(&daemon, "job.done", "job.1", "{}");
    // The webhook has the request; its answer is 1.5 s away.
    eventually(Duration::from_secs(10), "the webhook call", || {
        (!receiver.requests().is_empty()).then_some(())
    });
    assert_eq!(daemon.terminate(), Some(0), "a clean exit");

    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let executed = eventually(Duration::from_secs(10), "the action's events", || {
        let e = events(&daemon, "prefect.automation.action.executed");
        (!e.is_empty()).then_some(e)
    });
    assert_eq!(executed.len(), 1, "{executed:?}");
    assert_eq!(executed[0]["payload"]["status_code"], 200);
    // Long enough for a re-dispatch after start to have called it again.
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(receiver.requests().len(), 1, "the webhook was called once");
    assert_eq!(
        events(&daemon, "prefect.automation.action.executed").len(),
        1
    );
}
