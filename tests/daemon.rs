//! End-to-end tests of `spur serve`: the real binary on a free loopback port with a temp data
//! folder, real HTTP and websockets, and (when `nats-server` is available) a real NATS server.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{
    NatsServer, SpurDaemon, automations_folder, eventually, http, require_nats_server, write,
};

fn post_events(daemon: &SpurDaemon, events: Value) -> (u16, String) {
    http("POST", &format!("{}/api/events", daemon.url), Some(events))
}

fn firings(daemon: &SpurDaemon) -> Vec<Value> {
    let (status, text) = http(
        "GET",
        &format!("{}/api/firings?limit=100", daemon.url),
        None,
    );
    assert_eq!(status, 200, "{text}");
    serde_json::from_str::<Value>(&text).expect("JSON")["firings"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn event(name: &str, resource: &str, id: u128) -> Value {
    json!({"id": uuid::Uuid::from_u128(id).to_string(), "event": name, "resource": {"prefect.resource.id": resource}})
}

/// Runs a Python script with the real Prefect client pointed at `daemon`; its stdout, after
/// asserting it succeeded.
fn run_prefect_client(python: &str, script: &str, daemon: &SpurDaemon, dir: &Path) -> String {
    let output = std::process::Command::new(python)
        .args(["-c", script])
        .env("PREFECT_API_URL", format!("{}/api", daemon.url))
        .env("PREFECT_HOME", dir.join("prefect-home"))
        .env("DO_NOT_TRACK", "1")
        .env("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
        .output()
        .expect("python runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

/// `spur emit job.failed --resource … --id … --nats url`: publishes through JetStream.
fn emit_failure_via_nats(nats_url: &str, resource: &str, id: u128) {
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "emit",
            "job.failed",
            "--resource",
            resource,
            "--id",
            &uuid::Uuid::from_u128(id).to_string(),
            "--nats",
            nats_url,
        ])
        .stdout(std::process::Stdio::null())
        .status()
        .expect("spur emit runs");
    assert!(status.success(), "spur emit --nats failed");
}

const THRESHOLD: &str = r#"
name: two-failures
trigger:
  type: event
  posture: Reactive
  expect: ["job.failed"]
  for_each: ["prefect.resource.id"]
  threshold: 2
  within: 3600
actions:
  - type: run-deployment
    deployment_id: 5e1ec7ed-0000-4000-8000-000000000001
    parameters:
      job: << event.resource.id >>
"#;

#[test]
fn http_ingest_fires_triggers_and_refuses_bad_input() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);

    let (status, text) = post_events(
        &daemon,
        json!([
            event("job.failed", "job.a", 1),
            event("job.failed", "job.a", 2)
        ]),
    );
    assert_eq!(status, 204, "{text}");
    let fired = eventually(Duration::from_secs(5), "a firing", || {
        let f = firings(&daemon);
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["automation"], "two-failures");
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(2).to_string());
    assert_eq!(
        fired[0]["actions"][0]["parameters"],
        json!({"job": "job.a"})
    );

    // A redelivered id is dropped; a bad event is refused with a reason while the rest lands.
    let (status, text) = post_events(
        &daemon,
        json!([event("job.failed", "job.a", 2), {"event": "job.failed"}, event("job.failed", "job.b", 3)]),
    );
    assert_eq!(status, 422, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(body["accepted"], 2);
    assert_eq!(body["rejected"][0]["index"], 1);
    assert_eq!(body["rejected"][0]["field"], "resource");
    let (status, _) = http("POST", &format!("{}/api/events", daemon.url), None);
    assert_eq!(status, 400, "an empty body is not JSON");
    let (status, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"resource": {"id": ["job.b"]}}})),
    );
    assert_eq!(status, 200, "{text}");
    let page: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        page["total"], 1,
        "job.b's event landed despite the bad one: {text}"
    );
    assert_eq!(
        firings(&daemon).len(),
        1,
        "the duplicate did not count again"
    );

    // 3 posted events, plus the firing's prefect.automation.triggered and its action's
    // prefect.automation.action.triggered and .failed (the deployment is not declared).
    let metrics = eventually(Duration::from_secs(5), "the action events", || {
        let (_, metrics) = http("GET", &format!("{}/metrics", daemon.url), None);
        metrics
            .contains("spur_events_in_total 6")
            .then_some(metrics)
    });
    assert!(
        metrics.contains("spur_events_duplicate_total 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("spur_firings_triggered_total 1"),
        "{metrics}"
    );
    let (status, version) = http("GET", &format!("{}/api/admin/version", daemon.url), None);
    assert_eq!((status, version.as_str()), (200, "\"3.99.0\""));
    assert_eq!(daemon.terminate(), Some(0), "SIGTERM shuts down cleanly");
}

#[test]
fn a_threshold_half_counted_before_a_crash_completes_after_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let data = dir.path().join("data");

    let daemon = SpurDaemon::start(&data, &automations, &[]);
    assert_eq!(
        post_events(&daemon, json!([event("job.failed", "job.x", 10)])).0,
        204
    );
    daemon.kill(); // no shutdown, no final checkpoint

    let daemon = SpurDaemon::start(&data, &automations, &[]);
    // The first event is replayed from the log, not counted twice: a redelivery is dropped…
    assert_eq!(
        post_events(&daemon, json!([event("job.failed", "job.x", 10)])).0,
        204
    );
    assert!(
        firings(&daemon).is_empty(),
        "one event must not fire a threshold of two"
    );
    // …and the second event completes the threshold.
    assert_eq!(
        post_events(&daemon, json!([event("job.failed", "job.x", 11)])).0,
        204
    );
    let fired = eventually(Duration::from_secs(5), "the firing", || {
        let f = firings(&daemon);
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(11).to_string());
    daemon.kill();

    // Restarting again replays the whole log: the same firing is derived, and not recorded twice.
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(firings(&daemon).len(), 1);
}

#[test]
fn hot_reload_applies_changes_and_keeps_running_automations_on_a_broken_file() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);

    let rule = |name: &str| {
        format!(
            "name: {name}\ntrigger: {{type: event, posture: Reactive, expect: [ping]}}\nactions: [{{type: do-nothing}}]\n"
        )
    };
    write(&automations, "ping.yaml", &rule("ping-v1"));
    let automations_named = |daemon: &SpurDaemon| -> (Vec<String>, Vec<String>) {
        let (_, text) = http("GET", &format!("{}/api/automations", daemon.url), None);
        let v: Value = serde_json::from_str(&text).expect("JSON");
        let names = v["automations"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|a| a["name"].as_str().unwrap_or("").to_owned())
            .collect();
        let errors = v["errors"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|e| e.as_str().unwrap_or("").to_owned())
            .collect();
        (names, errors)
    };
    eventually(Duration::from_secs(3), "ping-v1 loaded", || {
        (automations_named(&daemon).0 == ["ping-v1"]).then_some(())
    });

    // A broken edit is reported with file, line and field; ping-v1 keeps running.
    write(
        &automations,
        "ping.yaml",
        "name: ping-v2\ntrigger: {type: event, posture: Sometimes, expect: [ping]}\nactions: []\n",
    );
    let errors = eventually(Duration::from_secs(3), "the error reported", || {
        let (names, errors) = automations_named(&daemon);
        (!errors.is_empty()).then_some((names, errors))
    });
    assert_eq!(errors.0, ["ping-v1"]);
    assert!(
        errors.1[0].contains("ping.yaml:2:") && errors.1[0].contains("trigger.posture"),
        "{:?}",
        errors.1
    );
    assert_eq!(post_events(&daemon, json!([event("ping", "r", 1)])).0, 204);
    eventually(Duration::from_secs(3), "ping-v1 fired", || {
        firings(&daemon)
            .iter()
            .any(|f| f["automation"] == "ping-v1")
            .then_some(())
    });

    // Fixing the file swaps in the new automation; removing it unloads it.
    write(&automations, "ping.yaml", &rule("ping-v2"));
    eventually(Duration::from_secs(3), "ping-v2 loaded", || {
        let (names, errors) = automations_named(&daemon);
        (names == ["ping-v2"] && errors.is_empty()).then_some(())
    });
    std::fs::remove_file(automations.join("ping.yaml")).expect("remove");
    eventually(Duration::from_secs(3), "unloaded", || {
        automations_named(&daemon).0.is_empty().then_some(())
    });
}

#[test]
fn proactive_triggers_fire_on_the_wall_clock() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "sla.yaml",
        "name: sla\ntrigger: {type: event, posture: Proactive, after: [job.started], expect: [job.finished], for_each: [prefect.resource.id], within: 10}\nactions: [{type: do-nothing}]\n",
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    assert_eq!(
        post_events(
            &daemon,
            json!([
                event("job.started", "job.1", 1),
                event("job.started", "job.2", 2)
            ])
        )
        .0,
        204
    );
    assert_eq!(
        post_events(&daemon, json!([event("job.finished", "job.2", 3)])).0,
        204
    );
    let fired = eventually(Duration::from_secs(15), "the SLA firing", || {
        let f = firings(&daemon);
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["labels"], json!({"prefect.resource.id": "job.1"}));
}

#[test]
fn prefect_websocket_protocol_delivers_events() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let ws_url = format!("{}/api/events/in", daemon.url.replacen("http", "ws", 1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let mut request = ws_url.into_client_request().expect("request");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "prefect".parse().expect("header"));
        let (mut socket, response) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connects");
        assert_eq!(
            response
                .headers()
                .get("sec-websocket-protocol")
                .map(|v| v.to_str().unwrap_or("")),
            Some("prefect")
        );
        socket
            .send(Message::Text(
                json!({"type": "auth", "token": null}).to_string().into(),
            ))
            .await
            .expect("send auth");
        let reply = socket.next().await.expect("reply").expect("frame");
        assert_eq!(
            reply.into_text().expect("text").as_str(),
            r#"{"type":"auth_success"}"#
        );
        socket
            .send(Message::Text(
                event("job.failed", "job.w", 20).to_string().into(),
            ))
            .await
            .expect("send");
        socket
            .send(Message::Text("{not json".into()))
            .await
            .expect("send bad frame");
        socket
            .send(Message::Text(
                event("job.failed", "job.w", 21).to_string().into(),
            ))
            .await
            .expect("send");
        // Delivery is confirmed by ping/pong, as the stock client does.
        socket
            .send(Message::Ping(b"checkpoint".to_vec().into()))
            .await
            .expect("ping");
        loop {
            match socket.next().await.expect("pong").expect("frame") {
                Message::Pong(_) => break,
                _ => continue,
            }
        }
    });
    let fired = firings(&daemon);
    assert_eq!(
        fired.len(),
        1,
        "both events were stored before the pong: {fired:?}"
    );
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(21).to_string());
}

/// The websocket reads ahead and stores in batches, but a pong still means "everything before
/// the ping is durable": a burst sent without waiting, then one ping, and the moment the pong
/// arrives every event of the burst can be read back (no waiting, no retry).
#[test]
fn a_websocket_burst_is_all_stored_when_its_ping_is_answered() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};

    const BURST: u128 = 3000;
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let ws_url = format!("{}/api/events/in", daemon.url.replacen("http", "ws", 1));
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let count_stored = || {
        let (_, text) = http(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            Some(json!({"filter": {"resource": {"id": ["job.burst"]}}, "limit": 1})),
        );
        serde_json::from_str::<Value>(&text).expect("JSON")["total"].clone()
    };
    let still_open = runtime.block_on(async {
        let mut request = ws_url.into_client_request().expect("request");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", "prefect".parse().expect("header"));
        let (socket, _) = tokio_tungstenite::connect_async(request)
            .await
            .expect("connects");
        let (mut sink, mut stream) = socket.split();
        sink.send(Message::Text(
            json!({"type": "auth", "token": null}).to_string().into(),
        ))
        .await
        .expect("send auth");
        let reply = stream.next().await.expect("reply").expect("frame");
        assert!(reply.into_text().expect("text").contains("auth_success"));
        for id in 0..BURST {
            // Buffered, not flushed one by one: the server sees frames arrive together.
            sink.feed(Message::Text(
                event("job.burst.seen", "job.burst", 100_000 + id)
                    .to_string()
                    .into(),
            ))
            .await
            .expect("feed");
            if id == BURST / 2 {
                sink.feed(Message::Text("{not json".into()))
                    .await
                    .expect("feed bad frame");
            }
        }
        sink.send(Message::Ping(b"all".to_vec().into()))
            .await
            .expect("ping");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            assert!(std::time::Instant::now() < deadline, "no pong within 60 s");
            match tokio::time::timeout(Duration::from_secs(60), stream.next()).await {
                Ok(Some(Ok(Message::Pong(_)))) => break,
                Ok(Some(Ok(_))) => continue,
                other => panic!("no pong: {other:?}"),
            }
        }
        (sink, stream)
    });
    // Read while the socket is still open: the pong alone must be enough.
    assert_eq!(
        count_stored(),
        json!(BURST as u64),
        "every event before the ping was durable when the pong came"
    );
    drop(still_open);
}

/// `config/nats-server.conf` (JetStream with every write synced before it is acknowledged)
/// is a configuration nats-server accepts, and Spur runs on it: an event published to NATS
/// fires. The test's own port overrides the file's, as the flag does.
#[test]
fn spur_runs_on_the_shipped_nats_server_config() {
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let shipped = std::fs::read_to_string(support::root().join("config/nats-server.conf"))
        .expect("config/nats-server.conf");
    assert!(shipped.contains("sync_interval: always"), "{shipped}");
    // The harness gives every server its own store with `-sd`, which nats-server refuses
    // beside a `store_dir` in the file: that one line goes, everything else is as shipped.
    let without_store: String = shipped
        .lines()
        .filter(|l| !l.trim_start().starts_with("store_dir"))
        .map(|l| format!("{l}\n"))
        .collect();
    let nats = NatsServer::start_with_config(&bin, &dir.path().join("nats"), &without_store);
    assert!(
        dir.path().join("nats/js").is_dir(),
        "the store lives where the flag says, not in the file's /var/lib/nats"
    );
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--nats", &nats.url],
    );
    daemon.wait_for_jetstream();
    emit_failure_via_nats(&nats.url, "job.s", 40);
    emit_failure_via_nats(&nats.url, "job.s", 41);
    let fired = eventually(Duration::from_secs(20), "a firing over NATS", || {
        let f = firings(&daemon);
        (!f.is_empty()).then_some(f)
    });
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(41).to_string());
}

/// `--nats-replicas 3` against one nats-server: the server refuses a replicated stream, and
/// Spur says why in its log instead of silently running with one copy.
#[test]
fn more_replicas_than_one_server_can_hold_is_reported_with_the_servers_reason() {
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--nats", &nats.url, "--nats-replicas", "3"],
    );
    let line = eventually(Duration::from_secs(20), "the refusal in the log", || {
        daemon
            .log_lines("replicas")
            .into_iter()
            .find(|l| l.contains("non-clustered") || l.contains("not supported"))
    });
    assert!(line.to_lowercase().contains("replica"), "{line}");
    // What cannot be set is refused at the command line.
    let (ok, _, stderr) = support::spur(&["serve", "--nats", &nats.url, "--nats-replicas", "9"]);
    assert!(!ok && stderr.contains("--nats-replicas"), "{stderr}");
}

#[test]
fn nats_jetstream_ingest_survives_a_server_restart() {
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--nats", &nats.url],
    );
    daemon.wait_for_jetstream();
    emit_failure_via_nats(&nats.url, "job.n", 30);
    eventually(Duration::from_secs(10), "the first event stored", || {
        let (_, text) = http(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            Some(json!({"filter": {"resource": {"id": ["job.n"]}}})),
        );
        (serde_json::from_str::<Value>(&text).ok()?["total"] == 1).then_some(())
    });
    nats.restart();
    // Published while Spur is still reconnecting: JetStream keeps it for the durable consumer.
    emit_failure_via_nats(&nats.url, "job.n", 31);
    emit_failure_via_nats(&nats.url, "job.n", 31); // a duplicate publish, dropped by Nats-Msg-Id and by id
    let fired = eventually(
        Duration::from_secs(20),
        "the firing after the NATS restart",
        || {
            let f = firings(&daemon);
            (!f.is_empty()).then_some(f)
        },
    );
    assert_eq!(fired.len(), 1);
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(31).to_string());
    let (_, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"resource": {"id": ["job.n"]}}})),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["total"],
        2,
        "nothing lost, nothing doubled"
    );
}

#[test]
fn the_stock_prefect_client_emit_event_fires_an_automation() {
    let Some(python) = support::require_prefect_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let script = r#"
from prefect.events import emit_event
from prefect.events.worker import EventsWorker
ids = [str(emit_event(event="job.failed", resource={"prefect.resource.id": "job.py"}, payload={"n": n}).id) for n in range(2)]
EventsWorker.drain_all()
print(" ".join(ids))
"#;
    let stdout = run_prefect_client(&python, script, &daemon, dir.path());
    let ids: Vec<&str> = stdout.split_whitespace().collect();
    assert_eq!(ids.len(), 2, "{stdout}");
    let fired = eventually(
        Duration::from_secs(10),
        "a firing from Prefect's client",
        || {
            let f = firings(&daemon);
            (!f.is_empty()).then_some(f)
        },
    );
    assert_eq!(fired[0]["automation"], "two-failures");
    assert_eq!(fired[0]["event"], ids[1]);
}

/// Prefect's own event subscriber (`get_events_subscriber`, the `/api/events/out` websocket
/// with the full `EventFilter` its client sends, `text` included) receives the events its
/// filter selects, live; and the same filters work on `POST /api/events/filter`.
#[test]
fn the_stock_prefect_subscriber_receives_filtered_events() {
    let Some(python) = support::require_prefect_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let script = r#"
import asyncio
from prefect.events import emit_event
from prefect.events.clients import get_events_subscriber
from prefect.client.orchestration import get_client
from prefect.events.filters import (
    EventFilter, EventNameFilter, EventOrder, EventResourceFilter, EventTextFilter,
)
from prefect.events.worker import EventsWorker

async def main():
    wanted = EventFilter(
        event=EventNameFilter(prefix=["sub."], exclude_name=["sub.skipped"]),
        text=EventTextFilter(query="kiln -cold"),
    )
    async with get_events_subscriber(filter=wanted) as subscriber:
        for name, resource in [("sub.skipped", "kiln.1"), ("other.event", "kiln.1"),
                               ("sub.reading", "kiln.cold"), ("sub.reading", "kiln.2")]:
            emit_event(event=name, resource={"prefect.resource.id": resource})
        await asyncio.to_thread(EventsWorker.drain_all)
        event = await asyncio.wait_for(subscriber.__anext__(), 20)
        print(event.event, event.resource.id)
    # The stock client's history query, a page at a time, oldest first, one per resource.
    async with get_client() as client:
        query = EventFilter(
            event=EventNameFilter(prefix=["sub."]),
            resource=EventResourceFilter(distinct=True),
            order=EventOrder.ASC,
        )
        page = await client.read_events(filter=query, limit=1)
        seen = []
        while page is not None and len(seen) < 10:
            seen += [(e.resource.id, page.total) for e in page.events]
            page = await page.get_next_page(client)
        print(seen)

asyncio.run(main())
"#;
    let stdout = run_prefect_client(&python, script, &daemon, dir.path());
    let mut lines = stdout.lines();
    assert_eq!(
        lines.next(),
        Some("sub.reading kiln.2"),
        "only the event the filter selects: {stdout}"
    );
    // sub.skipped and sub.reading on kiln.1 make one resource; its first event is the skip.
    assert_eq!(
        lines.next(),
        Some("[('kiln.1', 3), ('kiln.cold', 3), ('kiln.2', 3)]"),
        "read_events and get_next_page walk the distinct resources: {stdout}"
    );
    // The same filter over HTTP, as Prefect's client would send it.
    let (status, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {
            "event": {"prefix": ["sub."], "exclude_prefix": null, "name": null, "exclude_name": ["sub.skipped"]},
            "any_resource": [{"id_prefix": ["kiln."]}],
            "id": {"id": []},
            "text": {"query": "kiln -cold"},
            "order": "DESC",
        }})),
    );
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let names: Vec<(&str, &str)> = body["events"]
        .as_array()
        .expect("events")
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap_or_default(),
                e["resource"]["prefect.resource.id"]
                    .as_str()
                    .unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(names, [("sub.reading", "kiln.2")]);
}

/// `POST /api/events/filter` as Prefect serves it: ordered by `occurred` (not arrival),
/// `ASC` or `DESC`, `resource.distinct`, `occurred` defaulting to "until now", and pages
/// (followed through `next_page`) that each report the same total.
#[test]
fn event_queries_follow_prefect_order_distinct_and_paging() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let now = chrono::Utc::now();
    let at = |minutes: i64| (now + chrono::TimeDelta::minutes(minutes)).to_rfc3339();
    // Posted in this order; `occurred` puts them in another.
    let posted = [
        (1, "q.a", -10),
        (2, "q.b", -30),
        (3, "q.a", -20),
        (4, "q.c", -5),
        (5, "q.b", 60), // reported as occurring in an hour
    ];
    let events: Vec<Value> = posted
        .iter()
        .map(|(id, resource, minutes)| {
            let mut e = event("query.test", resource, *id);
            e["occurred"] = json!(at(*minutes));
            e
        })
        .collect();
    let (status, text) = post_events(&daemon, Value::Array(events));
    assert_eq!(status, 204, "{text}");
    let query = |filter: Value, limit: u64| {
        let (status, text) = http(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            Some(json!({"filter": filter, "limit": limit})),
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).expect("JSON")
    };
    let resources = |page: &Value| -> Vec<String> {
        page["events"]
            .as_array()
            .expect("events")
            .iter()
            .map(|e| {
                e["resource"]["prefect.resource.id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let name = json!({"name": ["query.test"]});

    // Newest `occurred` first; the future event waits for its time (until defaults to now).
    let newest = query(json!({"event": name}), 50);
    assert_eq!(resources(&newest), ["q.c", "q.a", "q.a", "q.b"]);
    assert_eq!(newest["total"], 4);
    let later = query(json!({"event": name, "occurred": {"until": at(120)}}), 50);
    assert_eq!(
        later["total"], 5,
        "an explicit until reaches the future event"
    );

    let oldest = query(json!({"event": name, "order": "ASC"}), 50);
    assert_eq!(resources(&oldest), ["q.b", "q.a", "q.a", "q.c"]);

    // One event per resource: its newest (or, ascending, its oldest).
    let distinct = query(json!({"event": name, "resource": {"distinct": true}}), 50);
    assert_eq!(resources(&distinct), ["q.c", "q.a", "q.b"]);
    assert_eq!(distinct["total"], 3);
    let distinct_ids: Vec<&str> = distinct["events"]
        .as_array()
        .expect("events")
        .iter()
        .filter_map(|e| e["id"].as_str())
        .collect();
    assert_eq!(
        distinct_ids,
        [4u128, 1, 2].map(|n| uuid::Uuid::from_u128(n).to_string())
    );

    // Pages of one, followed through `next_page`: each resource once, the same total.
    let mut page = query(
        json!({"event": name, "resource": {"distinct": true}, "order": "ASC"}),
        1,
    );
    let mut walked = Vec::new();
    for _ in 0..10 {
        assert_eq!(page["total"], 3, "{page}");
        walked.extend(resources(&page));
        let Some(next) = page["next_page"].as_str() else {
            break;
        };
        assert!(
            next.starts_with(&format!(
                "{}/api/events/filter/next?page-token=",
                daemon.url
            )),
            "an absolute link, as Prefect's client requires: {next}"
        );
        let (status, text) = http("GET", next, None);
        assert_eq!(status, 200, "{text}");
        page = serde_json::from_str(&text).expect("JSON");
    }
    assert_eq!(walked, ["q.b", "q.a", "q.c"]);

    for (filter, field) in [
        (json!({"order": "UP"}), "order"),
        (
            json!({"resource": {"distinct": "yes"}}),
            "resource.distinct",
        ),
    ] {
        let (status, text) = http(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            Some(json!({"filter": filter})),
        );
        assert_eq!(status, 422, "{text}");
        assert!(text.contains(field), "the error names {field}: {text}");
    }
}

/// Prefect's client reads Spur's automations (`read_automations`, by id, by name), Spur's
/// action shorthands included, in Prefect's schema.
#[test]
fn the_stock_prefect_client_reads_automations() {
    let Some(python) = support::require_prefect_python() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[
            ("threshold.yaml", THRESHOLD),
            (
                "deployments.yaml",
                "deployments:\n  - {name: triage, launcher: {command: [\"true\"]}}\n",
            ),
            (
                "notify.yaml",
                r#"
name: late-export
owner_resource: team.data
trigger: {type: event, posture: Proactive, after: ["export.started"], expect: ["export.finished"], within: 60}
actions:
  - {type: send-notification, url: "http://127.0.0.1:9/hook", subject: late, body: "{{ event.id }}"}
  - {type: run-deployment, deployment: triage}
"#,
            ),
        ],
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let script = r#"
import asyncio
from prefect.client.orchestration import get_client

async def main():
    async with get_client() as client:
        listed = await client.read_automations()
        print(" ".join(sorted(a.name for a in listed)))
        one = await client.read_automation(listed[0].id)
        print(one.name, type(one.trigger).__name__)
        named = await client.read_automations_by_name("late-export")
        print(len(named), [type(a).__name__ for a in named[0].actions])
        # Related resources, as Prefect's UI asks for a deployment's automations.
        deployment = f"prefect.deployment.{named[0].actions[1].deployment_id}"
        for resource in [deployment, "team.data", "team.other"]:
            related = await client.read_resource_related_automations(resource)
            print([a.name for a in related], [a.owner_resource for a in related])
        # Pausing and resuming go through PATCH, as `prefect automation pause` does.
        target = named[0].id
        await client.pause_automation(target)
        print("paused, enabled:", (await client.read_automation(target)).enabled)
        await client.resume_automation(target)
        print("resumed, enabled:", (await client.read_automation(target)).enabled)
        # Files define automations: deleting through the API is refused, not ignored.
        try:
            await client.delete_automation(target)
            print("deleted")
        except Exception as e:
            print("delete refused:", e.response.status_code)

asyncio.run(main())
"#;
    let stdout = run_prefect_client(&python, script, &daemon, dir.path());
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "late-export two-failures");
    assert_eq!(lines[1], "late-export EventTrigger");
    assert_eq!(lines[2], "1 ['SendNotification', 'RunDeployment']");
    assert_eq!(lines[3], "['late-export'] ['team.data']", "{stdout}");
    assert_eq!(lines[4], "['late-export'] ['team.data']", "{stdout}");
    assert_eq!(lines[5], "[] []", "{stdout}");
    assert_eq!(lines[6], "paused, enabled: False", "{stdout}");
    assert_eq!(lines[7], "resumed, enabled: True", "{stdout}");
    assert_eq!(lines[8], "delete refused: 409", "{stdout}");
    // An update with more than `enabled` names the field it refuses.
    let id = serde_json::from_str::<Value>(
        &http("GET", &format!("{}/api/automations", daemon.url), None).1,
    )
    .expect("JSON")["automations"]
        .as_array()
        .and_then(|list| list.iter().find(|a| a["name"] == "late-export"))
        .and_then(|a| a["id"].as_str().map(str::to_owned))
        .expect("late-export is listed");
    let (status, text) = http(
        "PATCH",
        &format!("{}/api/automations/{id}", daemon.url),
        Some(json!({"enabled": false, "name": "renamed"})),
    );
    assert_eq!(status, 422, "{text}");
    let detail = serde_json::from_str::<Value>(&text).expect("JSON")["detail"].clone();
    assert!(
        detail.as_str().is_some_and(|d| d.starts_with("\"name\"")),
        "{text}"
    );
}

#[test]
fn events_tail_shows_the_backfill_then_live_events() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    assert_eq!(
        post_events(
            &daemon,
            json!([
                event("build.done", "repo.a", 1),
                event("other", "repo.a", 2)
            ])
        )
        .0,
        204
    );
    let mut tail = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "events",
            "tail",
            "--json",
            "--name",
            "build.*",
            "--api",
            &daemon.url,
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spur events tail starts");
    let stdout = tail.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first: Value = serde_json::from_str(
        &rx.recv_timeout(Duration::from_secs(10))
            .expect("backfilled event"),
    )
    .expect("JSON");
    assert_eq!(first["id"], uuid::Uuid::from_u128(1).to_string());
    assert_eq!(
        post_events(
            &daemon,
            json!([
                event("other", "repo.a", 3),
                event("build.started", "repo.b", 4)
            ])
        )
        .0,
        204
    );
    let second: Value = serde_json::from_str(
        &rx.recv_timeout(Duration::from_secs(10))
            .expect("live event"),
    )
    .expect("JSON");
    assert_eq!(
        second["id"],
        uuid::Uuid::from_u128(4).to_string(),
        "the filter skipped `other`"
    );
    let _ = tail.kill();
    let _ = tail.wait();
}

#[test]
fn nats_messages_become_events_by_subject_template_or_cloudevents_binary_mode() {
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(dir.path(), &[]);
    let config = dir.path().join("spur.yaml");
    std::fs::write(
        &config,
        format!(
            r#"nats:
  url: {url}
  subjects: ["events.>", "sensors.>"]
  templates:
    - subject: "sensors.*.temperature"
      template: '{{"event": "sensor.temperature", "resource": {{"prefect.resource.id": "{{{{ subject }}}}"}}, "payload": {{"celsius": {{{{ body.value }}}}}}}}'
"#,
            url = nats.url
        ),
    )
    .expect("config");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--config", &config.to_string_lossy()],
    );
    daemon.wait_for_jetstream();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = async_nats::connect(&nats.url).await.expect("connects");
        client
            .publish(
                "sensors.kiln1.temperature",
                br#"{"value": 812.5}"#.to_vec().into(),
            )
            .await
            .expect("publish");
        let mut headers = async_nats::HeaderMap::new();
        for (k, v) in [
            ("ce-specversion", "1.0"),
            ("ce-type", "order.paid"),
            ("ce-source", "/shop"),
            ("ce-id", "A-1"),
            ("ce-subject", "order-9"),
        ] {
            headers.insert(k, v);
        }
        client
            .publish_with_headers(
                "events.cloud",
                headers,
                br#"{"amount": 12}"#.to_vec().into(),
            )
            .await
            .expect("publish");
        client.flush().await.expect("flush");
    });
    let query = |resource: &str| {
        let (_, text) = http(
            "POST",
            &format!("{}/api/events/filter", daemon.url),
            Some(json!({"filter": {"resource": {"id": [resource]}}})),
        );
        serde_json::from_str::<Value>(&text).ok()?["events"]
            .as_array()?
            .first()
            .cloned()
    };
    let sensor = eventually(Duration::from_secs(10), "the templated event", || {
        query("sensors.kiln1.temperature")
    });
    assert_eq!(sensor["event"], "sensor.temperature");
    assert_eq!(sensor["payload"]["celsius"], 812.5);
    let order = eventually(Duration::from_secs(10), "the binary CloudEvent", || {
        query("order-9")
    });
    assert_eq!(order["event"], "order.paid");
    assert_eq!(order["payload"], json!({"amount": 12}));
    assert_eq!(order["resource"]["cloudevents.source"], "/shop");
}

#[test]
fn what_if_replay_over_the_daemon_history_matches_what_it_fired() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    assert_eq!(
        post_events(
            &daemon,
            json!([
                event("job.failed", "job.a", 1),
                event("job.failed", "job.b", 2),
                event("job.failed", "job.a", 3)
            ])
        )
        .0,
        204
    );
    let fired = eventually(Duration::from_secs(5), "the firing", || {
        let f = firings(&daemon);
        (!f.is_empty()).then_some(f)
    });
    let replay = |path: &Path| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(["replay", "--automations"])
            .arg(path)
            .args(["--from-daemon", "--since", "1h", "--api", &daemon.url])
            .output()
            .expect("spur replay runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("JSON line"))
            .collect::<Vec<_>>()
    };
    let same = replay(&automations);
    assert_eq!(same.len(), 1, "{same:?}");
    assert_eq!(same[0]["event"], fired[0]["event"]);
    assert_eq!(same[0]["automation"], "two-failures");
    // A proposed change: what would a threshold of 3 have done? Nothing is launched.
    let proposed = dir.path().join("proposed");
    std::fs::create_dir_all(&proposed).expect("dir");
    write(
        &proposed,
        "threshold.yaml",
        &THRESHOLD.replace("threshold: 2", "threshold: 3"),
    );
    assert!(replay(&proposed).is_empty());
    assert_eq!(
        firings(&daemon).len(),
        1,
        "the what-if did not touch the daemon"
    );
}

#[test]
fn explain_says_why_each_automation_did_or_did_not_react() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "a.yaml",
        r#"
- name: prod-failures
  trigger: {type: event, posture: Reactive, expect: ["job.failed"], match: {env: prod}, threshold: 2, within: 60}
  actions: [{type: do-nothing}]
- name: any-failure
  trigger: {type: event, posture: Reactive, expect: ["job.*"]}
  actions: [{type: do-nothing}]
"#,
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let dev = json!({"id": uuid::Uuid::from_u128(1).to_string(), "event": "job.failed",
                     "resource": {"prefect.resource.id": "job.1", "env": "dev"}});
    let prod = json!({"id": uuid::Uuid::from_u128(2).to_string(), "event": "job.failed",
                      "resource": {"prefect.resource.id": "job.1", "env": "prod"}});
    assert_eq!(post_events(&daemon, json!([dev, prod])).0, 204);
    let explain = |id: u128| {
        let (status, text) = http(
            "GET",
            &format!(
                "{}/api/events/{}/explain",
                daemon.url,
                uuid::Uuid::from_u128(id)
            ),
            None,
        );
        assert_eq!(status, 200, "{text}");
        serde_json::from_str::<Value>(&text).expect("JSON")
    };
    let first = explain(1);
    assert_eq!(first["fate"]["kind"], "evaluated");
    let by = |v: &Value, name: &str| {
        v["decisions"]
            .as_array()
            .expect("decisions")
            .iter()
            .find(|d| d["automation"] == name)
            .cloned()
            .expect("decision")
    };
    let failed = by(&first, "prod-failures");
    assert_eq!(failed["outcome"], "match_failed");
    assert_eq!(failed["label"], "env");
    assert_eq!(failed["value"], "dev");
    assert_eq!(by(&first, "any-failure")["outcome"], "fired");
    let second = explain(2);
    let counted = by(&second, "prod-failures");
    assert_eq!(counted["outcome"], "counted");
    assert_eq!(
        (counted["count"].as_i64(), counted["threshold"].as_i64()),
        (Some(1), Some(2))
    );

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args([
            "explain",
            &uuid::Uuid::from_u128(1).to_string(),
            "--api",
            &daemon.url,
        ])
        .output()
        .expect("spur explain runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(
            "prod-failures: match: label \"env\" is \"dev\" which does not match [\"prod\"]"
        ),
        "{text}"
    );
    let (status, text) = http(
        "GET",
        &format!(
            "{}/api/events/{}/explain",
            daemon.url,
            uuid::Uuid::from_u128(99)
        ),
        None,
    );
    assert_eq!(status, 404, "{text}");
    assert!(text.contains("no event"), "{text}");
}

/// An event that many automations expect by name but whose filters rule it out keeps the
/// first 32 such mismatches and counts the rest; what fired or counted is always kept.
#[test]
fn explain_keeps_the_first_filter_mismatches_and_counts_the_rest() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let mut many = String::from("automations:\n");
    for i in 0..40 {
        many.push_str(&format!(
            "  - name: tenant-{i}\n    trigger: {{type: event, posture: Reactive, expect: [\"job.failed\"], match: {{\"prefect.resource.id\": \"tenant.{i}\"}}}}\n    actions: [{{type: do-nothing}}]\n"
        ));
    }
    many.push_str("  - name: any-failure\n    trigger: {type: event, posture: Reactive, expect: [\"job.*\"]}\n    actions: [{type: do-nothing}]\n");
    write(&automations, "many.yaml", &many);
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let id = uuid::Uuid::from_u128(7).to_string();
    let event =
        json!({"id": id, "event": "job.failed", "resource": {"prefect.resource.id": "job.1"}});
    assert_eq!(post_events(&daemon, json!([event])).0, 204);
    let (status, text) = http(
        "GET",
        &format!("{}/api/events/{id}/explain", daemon.url),
        None,
    );
    assert_eq!(status, 200, "{text}");
    let body: Value = serde_json::from_str(&text).expect("JSON");
    let decisions = body["decisions"].as_array().expect("decisions");
    let mismatches = decisions
        .iter()
        .filter(|d| d["outcome"] == "match_failed")
        .count();
    assert_eq!(mismatches, 32, "{text}");
    assert_eq!(body["mismatches_omitted"], 8, "{text}");
    assert!(
        decisions
            .iter()
            .any(|d| d["automation"] == "any-failure" && d["outcome"] == "fired"),
        "{text}"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(["explain", &id, "--api", &daemon.url])
        .output()
        .expect("spur explain runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("… and 8 more automation(s)"), "{text}");
}

#[test]
fn a_second_instance_takes_over_trigger_state_kept_in_jetstream() {
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(dir.path(), &[("threshold.yaml", THRESHOLD)]);

    // Instance A counts the first of two failures, stores its state in JetStream, and dies.
    let first = SpurDaemon::start(
        &dir.path().join("data-a"),
        &automations,
        &["--nats", &nats.url],
    );
    first.wait_for_jetstream();
    emit_failure_via_nats(&nats.url, "job.t", 40);
    eventually(
        Duration::from_secs(20),
        "a checkpoint stored in JetStream",
        || (!first.log_lines("checkpoint stored in JetStream").is_empty()).then_some(()),
        // (logged once, for the first checkpoint that covers an event)
    );
    assert!(
        firings(&first).is_empty(),
        "one failure of two fires nothing"
    );
    first.kill();

    // Instance B starts with an empty data folder on the same NATS: it restores A's count,
    // so the second failure completes the threshold there, once.
    let second = SpurDaemon::start(
        &dir.path().join("data-b"),
        &automations,
        &["--nats", &nats.url],
    );
    assert!(
        !second
            .log_lines("restoring trigger state from the JetStream checkpoint")
            .is_empty(),
        "B restores from JetStream"
    );
    second.wait_for_jetstream();
    emit_failure_via_nats(&nats.url, "job.t", 41);
    let fired = eventually(Duration::from_secs(20), "the firing on B", || {
        let f = firings(&second);
        (!f.is_empty()).then_some(f)
    });
    std::thread::sleep(Duration::from_millis(500));
    let fired_later = firings(&second);
    assert_eq!(fired_later.len(), 1, "fired once: {fired_later:?}");
    assert_eq!(fired[0]["event"], uuid::Uuid::from_u128(41).to_string());
    assert_eq!(second.terminate(), Some(0), "SIGTERM shuts down cleanly");
}

/// JetStream: each durable batch is acknowledged with one ack (`AckPolicy::All`); a consumer
/// an older Spur created with `Explicit` acks keeps working. With either policy a malformed
/// message in the middle of the stream is dropped with a reason and acknowledged, and nothing
/// stays pending once the events are durable.
#[test]
fn jetstream_acks_leave_nothing_pending_with_either_ack_policy() {
    use async_nats::jetstream::{self, consumer::AckPolicy};
    let Some(bin) = require_nats_server() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for (policy, created_by_spur) in [(AckPolicy::All, true), (AckPolicy::Explicit, false)] {
        let dir = tempfile::tempdir().expect("temp dir");
        let nats = NatsServer::start(&bin, &dir.path().join("nats"));
        let js = runtime.block_on(async {
            jetstream::new(async_nats::connect(&nats.url).await.expect("connects"))
        });
        if !created_by_spur {
            runtime.block_on(async {
                let stream = js
                    .get_or_create_stream(jetstream::stream::Config {
                        name: "SPUR_EVENTS".into(),
                        subjects: vec!["events.>".into()],
                        duplicate_window: Duration::from_secs(120),
                        ..Default::default()
                    })
                    .await
                    .expect("stream");
                stream
                    .create_consumer(jetstream::consumer::pull::Config {
                        durable_name: Some("spur".into()),
                        ack_policy: AckPolicy::Explicit,
                        ..Default::default()
                    })
                    .await
                    .expect("an older Spur's consumer");
            });
        }
        let automations = automations_folder(dir.path(), &[]);
        let daemon = SpurDaemon::start(
            &dir.path().join("data"),
            &automations,
            &["--nats", &nats.url],
        );
        daemon.wait_for_jetstream();
        runtime.block_on(async {
            for n in 0..11u128 {
                let body = if n == 5 {
                    b"not an event".to_vec()
                } else {
                    serde_json::to_vec(&json!({
                        "id": uuid::Uuid::from_u128(500 + n).to_string(),
                        "event": "acks.checked",
                        "resource": {"prefect.resource.id": "acks.test"},
                    }))
                    .expect("JSON")
                };
                js.publish("events.acks", body.into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        });
        eventually(Duration::from_secs(10), "the ten events stored", || {
            let (_, text) = http(
                "POST",
                &format!("{}/api/events/filter", daemon.url),
                Some(json!({"filter": {"resource": {"id": ["acks.test"]}}})),
            );
            (serde_json::from_str::<Value>(&text).ok()?["total"] == 10).then_some(())
        });
        // Acknowledgements wait for a stored checkpoint (shared state): about a second.
        let info = eventually(
            Duration::from_secs(15),
            "every message acknowledged",
            || {
                let info = runtime.block_on(async {
                    js.get_stream("SPUR_EVENTS")
                        .await
                        .ok()?
                        .get_consumer::<jetstream::consumer::pull::Config>("spur")
                        .await
                        .ok()?
                        .info()
                        .await
                        .ok()
                        .cloned()
                })?;
                (info.num_ack_pending == 0
                    && info.num_pending == 0
                    && info.ack_floor.stream_sequence == 11)
                    .then_some(info)
            },
        );
        assert_eq!(
            info.config.ack_policy, policy,
            "the consumer's policy is kept"
        );
        let style = if created_by_spur {
            "LastOfBatch"
        } else {
            "EachMessage"
        };
        assert!(
            !daemon.log_lines(style).is_empty(),
            "acknowledges in the consumer's style ({style})"
        );
        let (_, metrics) = http("GET", &format!("{}/metrics", daemon.url), None);
        assert!(
            metrics.contains("spur_nats_terminated_total 1\n"),
            "the malformed message is counted once: {metrics}"
        );
        assert_eq!(
            daemon
                .log_lines("NATS: terminated a message that is not an event")
                .len(),
            1,
            "and logged with its reason once"
        );
    }
}

/// `--nats-log`: the stream is the log. An event posted over HTTP is in JetStream by the time
/// the 204 comes (read back at once, no retry), it is stored locally once, when Spur's
/// consumer reads it (no duplicate from a second write), and it fires from there; the
/// firing's own events (`prefect.automation.triggered`, the action's pair) go through the
/// stream too, once each, in order. With nats-server gone the door answers 503 with a
/// reason, and accepts again once it is back.
#[test]
fn with_the_stream_as_the_log_http_events_are_in_jetstream_when_answered() {
    use async_nats::jetstream;
    let Some(bin) = require_nats_server() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let mut nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(
        dir.path(),
        &[(
            "logged.yaml",
            "name: on-logged\ntrigger: {type: event, posture: Reactive, expect: [http.logged]}\nactions: [{type: do-nothing}]\n",
        )],
    );
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--nats", &nats.url, "--nats-log"],
    );
    daemon.wait_for_jetstream();
    let (status, text) = post_events(
        &daemon,
        json!([
            event("http.logged", "door.log", 800),
            event("http.logged", "door.log", 801)
        ]),
    );
    assert_eq!(status, 204, "{text}");
    let in_stream = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
        let stream = js.get_stream("SPUR_EVENTS").await.expect("stream");
        let count = support::subject_count(&stream, "events.http.logged").await;
        let last = stream
            .get_last_raw_message_by_subject("events.http.logged")
            .await
            .expect("the event is in the stream as soon as the door answered");
        (count, last)
    });
    assert_eq!(in_stream.0, 2, "both events, once each");
    let body: Value = serde_json::from_slice(&in_stream.1.payload).expect("JSON");
    assert_eq!(body["id"], uuid::Uuid::from_u128(801).to_string());
    assert!(
        in_stream
            .1
            .headers
            .get(spur_ingest::nats::PUBLISHED_HEADER)
            .is_some()
            && in_stream
                .1
                .headers
                .get(spur_ingest::nats::FORWARDED_HEADER)
                .is_none(),
        "{:?}",
        in_stream.1.headers
    );
    // Read back by the consumer: stored once, fired.
    let fired = eventually(Duration::from_secs(10), "both firings", || {
        let f = firings(&daemon);
        (f.len() == 2).then_some(f)
    });
    assert_eq!(fired.len(), 2);
    // The firings' own events are in the stream (published by Spur, once each), and in the
    // local store through the consumer, in the order they were made.
    let own = [
        "prefect.automation.triggered",
        "prefect.automation.action.triggered",
        "prefect.automation.action.executed",
    ];
    eventually(
        Duration::from_secs(10),
        "the firings' own events in the stream",
        || {
            let counts = runtime.block_on(async {
                let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
                let stream = js.get_stream("SPUR_EVENTS").await.expect("stream");
                let mut counts = Vec::new();
                for name in own {
                    counts.push(support::subject_count(&stream, &format!("events.{name}")).await);
                }
                counts
            });
            (counts == [2, 2, 2]).then_some(())
        },
    );
    let (_, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"event": {"prefix": ["prefect.automation."]}}, "limit": 50})),
    );
    let page: Value = serde_json::from_str(&text).expect("JSON");
    assert_eq!(
        page["total"], 6,
        "the own events stored once each: {page:#}"
    );
    // In the stream in the order they were made: a firing's `triggered` before its action's.
    let subjects = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
        let mut stream = js.get_stream("SPUR_EVENTS").await.expect("stream");
        let last = stream.info().await.expect("info").state.last_sequence;
        let mut subjects = Vec::new();
        for seq in 1..=last {
            if let Ok(message) = stream.get_raw_message(seq).await {
                subjects.push(message.subject.to_string());
            }
        }
        subjects
    });
    let first = |name: &str| subjects.iter().position(|s| s == name);
    assert!(
        first("events.prefect.automation.triggered")
            < first("events.prefect.automation.action.triggered")
            && first("events.prefect.automation.action.triggered")
                < first("events.prefect.automation.action.executed"),
        "{subjects:?}"
    );
    let (_, metrics) = http("GET", &format!("{}/metrics", daemon.url), None);
    assert!(
        metrics.contains("spur_events_duplicate_total 0")
            && metrics.contains("spur_nats_forwarded_total 0"),
        "one write each, no echo: {metrics}"
    );
    let (_, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"resource": {"id": ["door.log"]}}})),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["total"],
        2
    );

    // No stream, no acceptance.
    nats.stop();
    let (status, text) = post_events(&daemon, json!([event("http.logged", "door.log", 802)]));
    assert_eq!(status, 503, "{text}");
    assert!(text.contains("stream"), "{text}");
    nats.restart();
    eventually(Duration::from_secs(20), "the door accepting again", || {
        let (status, _) = post_events(&daemon, json!([event("http.logged", "door.log", 802)]));
        (status == 204).then_some(())
    });
    eventually(Duration::from_secs(20), "the third firing", || {
        (firings(&daemon).len() == 3).then_some(())
    });
}

/// How many messages `stream` holds on `subject`.
/// With JetStream, an event posted over HTTP is forwarded into the stream (so the stream
/// holds every event Spur received), comes back to Spur's own consumer and is kept once; its
/// firing is claimed in the shared KV bucket, since another instance could meet it there.
#[test]
fn http_events_are_forwarded_into_the_jetstream_stream_and_kept_once() {
    use async_nats::jetstream;
    let Some(bin) = require_nats_server() else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    let automations = automations_folder(
        dir.path(),
        &[(
            "forwarded.yaml",
            "name: on-forwarded\ntrigger: {type: event, posture: Reactive, expect: [http.forwarded]}\nactions: [{type: do-nothing}]\n",
        )],
    );
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--nats", &nats.url],
    );
    daemon.wait_for_jetstream();
    let (status, text) = post_events(&daemon, json!([event("http.forwarded", "door.http", 700)]));
    assert_eq!(status, 204, "{text}");
    let id = uuid::Uuid::from_u128(700).to_string();

    // In the stream, marked as Spur's own publish.
    let stored = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
        let stream = js.get_stream("SPUR_EVENTS").await.expect("stream");
        let mut found = None;
        for _ in 0..100 {
            if let Ok(message) = stream
                .get_last_raw_message_by_subject("events.http.forwarded")
                .await
            {
                found = Some(message);
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        found.expect("the forwarded event is in the stream")
    });
    let body: Value = serde_json::from_slice(&stored.payload).expect("JSON");
    assert_eq!(body["id"], id.as_str());
    assert!(
        stored
            .headers
            .get(spur_ingest::nats::FORWARDED_HEADER)
            .is_some(),
        "{:?}",
        stored.headers
    );

    // Spur's consumer got it back and kept it once.
    let metrics = eventually(Duration::from_secs(10), "the echo consumed", || {
        let (_, metrics) = http("GET", &format!("{}/metrics", daemon.url), None);
        (metrics.contains("spur_nats_forwarded_total 1")
            && metrics.contains("spur_nats_delivered_total 1"))
        .then_some(metrics)
    });
    assert!(
        metrics.contains("spur_events_duplicate_total 1"),
        "{metrics}"
    );
    let (_, text) = http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(json!({"filter": {"resource": {"id": ["door.http"]}}})),
    );
    assert_eq!(
        serde_json::from_str::<Value>(&text).expect("JSON")["total"],
        1
    );
    let fired = firings(&daemon);
    assert_eq!(fired.len(), 1, "{fired:?}");

    // Its firing was claimed before its action ran.
    let firing = fired[0]["id"].as_str().expect("firing id").to_owned();
    let claimed = runtime.block_on(async {
        let js = jetstream::new(async_nats::connect(&nats.url).await.expect("connects"));
        let claims = js
            .get_key_value("SPUR_FIRINGS")
            .await
            .expect("claims bucket");
        claims.get(&firing).await.expect("read").is_some()
    });
    assert!(claimed, "firing {firing} is claimed");
}
