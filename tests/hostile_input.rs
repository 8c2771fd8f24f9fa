//! Hostile input, end to end: the real `spur serve` binary with a real `nats-server`, both on
//! loopback, fed a bounded, mixed stream of bad and good input over HTTP, the websocket,
//! webhooks and NATS. The daemon must stay up, its memory (VmRSS of the child process) must
//! stay bounded, every bad request must get a clear, bounded answer (JSON errors, timeouts,
//! 1009 close frames, 503 beyond the connection limit), and every good event must be stored
//! and fire its automation.
//!
//! The daemon runs with short limits (1–2 s timeouts, 48 connections) so the slow-client
//! cases finish quickly; the whole file runs in well under a minute.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use support::{automations_folder, eventually, require_nats_server, root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

const MAX_CONNECTIONS: usize = 48;

/// One automation that fires once per good event (whatever door it came in by).
const EVERY_GOOD_EVENT: &str = r#"
name: every-good-event
trigger:
  type: event
  posture: Reactive
  expect: ["good.*"]
  for_each: ["prefect.resource.id"]
  threshold: 1
  within: 0
actions:
  - type: do-nothing
"#;

/// `spur serve` as a child process, so its memory can be read from /proc.
struct Daemon {
    child: Child,
    url: String,
    addr: String,
    logs: Arc<Mutex<Vec<String>>>,
}

impl Daemon {
    fn start(data: &Path, automations: &Path, nats: &str) -> Daemon {
        let mut child = Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(["serve", "--http", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data")
            .arg(data)
            .arg("--automations")
            .arg(automations)
            .args(["--nats", nats])
            .args(["--header-read-timeout", "1s", "--body-read-timeout", "1s"])
            .args(["--idle-timeout", "2s", "--websocket-auth-timeout", "1s"])
            .args(["--max-connections", &MAX_CONNECTIONS.to_string()])
            .current_dir(root())
            .env("SPUR_LOG", "info")
            .env_remove("SPUR_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spur serve starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                sink.lock().expect("log lock").push(line);
            }
        });
        let addr = eventually(Duration::from_secs(30), "spur serve listening", || {
            logs.lock().expect("log lock").iter().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                v["fields"]["addr"].as_str().map(str::to_owned)
            })
        });
        eventually(Duration::from_secs(10), "the JetStream consumer", || {
            logs.lock()
                .expect("log lock")
                .iter()
                .any(|l| l.contains("consuming NATS JetStream"))
                .then_some(())
        });
        Daemon {
            child,
            url: format!("http://{addr}"),
            addr,
            logs,
        }
    }

    /// Resident memory of the daemon process, in kB.
    fn rss_kb(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))
            .expect("the daemon's /proc status");
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS")
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    fn logged(&self, needle: &str) -> bool {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .any(|l| l.contains(needle))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn good_event(channel: &str, n: u64) -> Value {
    json!({
        "id": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, format!("{channel}.{n}").as_bytes()).to_string(),
        "event": format!("good.{channel}"),
        "resource": {"prefect.resource.id": format!("hostile.{channel}.{n}")},
        "payload": {"n": n},
    })
}

/// An HTTP answer: status, content type, body.
async fn send(
    client: &reqwest::Client,
    method: &str,
    url: &str,
    content_type: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, String, Value) {
    let mut request = client.request(
        reqwest::Method::from_bytes(method.as_bytes()).expect("method"),
        url,
    );
    if let Some(ct) = content_type {
        request = request.header("content-type", ct);
    }
    let response = request.body(body).send().await.expect("the daemon answers");
    let status = response.status().as_u16();
    let ct = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = response.text().await.unwrap_or_default();
    (
        status,
        ct,
        serde_json::from_str(&text).unwrap_or(Value::Null),
    )
}

/// A request and the error it must get: method, path, content type, body, status, a part of
/// the detail.
type Check = (
    &'static str,
    String,
    Option<&'static str>,
    Vec<u8>,
    u16,
    &'static str,
);

/// Asserts an error answer in the one shape: `{"detail": "…"}` as JSON.
fn assert_json_error(answer: &(u16, String, Value), status: u16, needle: &str, what: &str) {
    assert_eq!(answer.0, status, "{what}: {answer:?}");
    assert!(
        answer.1.starts_with("application/json"),
        "{what}: {answer:?}"
    );
    let detail = answer.2["detail"].as_str().unwrap_or_default();
    assert!(
        !detail.is_empty() && detail.contains(needle),
        "{what}: {answer:?}"
    );
}

/// Reads from `stream` until it closes (`true`) or `within` passes (`false`); what was read.
async fn read_until_closed(stream: &mut TcpStream, within: Duration) -> (bool, Vec<u8>) {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (true, got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return (false, got),
        }
    }
}

/// A websocket upgrade done by hand (so frames can be forged); the stream after the 101.
async fn raw_websocket(addr: &str, path: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).await.expect("connects");
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).await.expect("writes");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream.read_exact(&mut byte).await.expect("upgrade answer");
        head.push(byte[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    stream
}

/// Sends the header of a masked text frame claiming `claimed` payload bytes and a little of
/// that payload; returns the close code of the close frame the daemon answers with.
async fn oversized_frame_close_code(addr: &str, path: &str, claimed: u64) -> Option<u16> {
    let mut ws = raw_websocket(addr, path).await;
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&claimed.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[b'x'; 4096]);
    ws.write_all(&frame).await.expect("frame header sent");
    let (_, got) = read_until_closed(&mut ws, Duration::from_secs(5)).await;
    // A server frame is unmasked: 0x88, length, then the code.
    (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_bounded_answers_and_good_events_all_land() {
    let Some(nats_bin) = require_nats_server() else {
        return;
    };
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = support::NatsServer::start(&nats_bin, dir.path());
    let automations = automations_folder(dir.path(), &[("good.yaml", EVERY_GOOD_EVENT)]);
    let mut daemon = Daemon::start(&dir.path().join("data"), &automations, &nats.url);
    let url = daemon.url.clone();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(4)
        // Below the daemon's idle timeout, so a pooled connection is never one it is closing.
        .pool_idle_timeout(Duration::from_millis(1000))
        .build()
        .expect("client");

    // A fresh store answers every read with "nothing", not 500.
    let empty = send(
        &client,
        "POST",
        &format!("{url}/api/events/filter"),
        Some("application/json"),
        "{}",
    )
    .await;
    assert_eq!((empty.0, &empty.2["total"]), (200, &json!(0)), "{empty:?}");
    for path in [
        "/api/firings",
        "/api/runs",
        "/api/webhooks",
        "/api/actions/failed",
    ] {
        let answer = send(&client, "GET", &format!("{url}{path}"), None, "").await;
        assert_eq!(answer.0, 200, "{path}: {answer:?}");
    }
    let rss_start = daemon.rss_kb();

    // One error shape on every route.
    let checks: Vec<Check> = vec![
        (
            "GET",
            "/no/such/route".into(),
            None,
            vec![],
            404,
            "Not Found",
        ),
        (
            "DELETE",
            "/api/firings".into(),
            None,
            vec![],
            405,
            "Method Not Allowed",
        ),
        (
            "GET",
            "/api/runs?limit=abc".into(),
            None,
            vec![],
            400,
            "limit",
        ),
        (
            "GET",
            "/api/firings?limit=-1".into(),
            None,
            vec![],
            400,
            "limit",
        ),
        (
            "POST",
            "/api/events/filter".into(),
            Some("application/json"),
            b"{not json".to_vec(),
            400,
            "JSON",
        ),
        (
            "POST",
            "/api/events/filter".into(),
            Some("text/plain"),
            b"garbage".to_vec(),
            400,
            "JSON",
        ),
        (
            "POST",
            "/api/events/filter".into(),
            Some("application/json"),
            br#"{"filter":{"event":{"prefix":"notalist"}}}"#.to_vec(),
            422,
            "event.prefix",
        ),
        (
            "POST",
            "/api/webhooks".into(),
            Some("application/json"),
            br#"{"name": "bad", "template": "{{ body | no_such_filter }}"}"#.to_vec(),
            422,
            "unknown filter",
        ),
        (
            "POST",
            "/api/webhooks".into(),
            Some("application/json"),
            b"[".to_vec(),
            400,
            "",
        ),
        (
            "GET",
            "/hooks/no-such-slug".into(),
            None,
            vec![],
            404,
            "Not Found",
        ),
    ];
    for (method, path, ct, body, status, needle) in checks {
        let answer = send(&client, method, &format!("{url}{path}"), ct, body).await;
        assert_json_error(&answer, status, needle, &format!("{method} {path}"));
    }

    // Filter lists: over the limit is a 422 naming it; at the limit it is cheap.
    let many = |n: usize| (0..n).map(|i| format!("nothing.{i}.")).collect::<Vec<_>>();
    let over = json!({"filter": {"event": {"prefix": many(1001)}}}).to_string();
    let answer = send(
        &client,
        "POST",
        &format!("{url}/api/events/filter"),
        Some("application/json"),
        over,
    )
    .await;
    assert_json_error(&answer, 422, "MAX_FILTER_VALUES", "1001 prefixes");
    let at_limit = json!({"filter": {"event": {"prefix": many(1000), "exclude_prefix": many(1000)}, "resource": {"id": many(1000)}}});
    let timer = Instant::now();
    let answer = send(
        &client,
        "POST",
        &format!("{url}/api/events/filter"),
        Some("application/json"),
        at_limit.to_string(),
    )
    .await;
    assert_eq!(answer.0, 200, "{answer:?}");
    assert!(
        timer.elapsed() < Duration::from_secs(2),
        "{:?}",
        timer.elapsed()
    );

    // Webhooks: a good one, and one whose template would print 100 MB.
    let hook = |name: &str, template: &str| {
        json!({"name": name, "template": template, "rate_limit": 10000}).to_string()
    };
    let good_hook = send(&client, "POST", &format!("{url}/api/webhooks"), Some("application/json"),
        hook("good", r#"{"id": "{{ body.id }}", "event": "good.webhook", "resource": {"prefect.resource.id": "{{ body.resource }}"}}"#)).await;
    assert_eq!(good_hook.0, 201, "{good_hook:?}");
    let good_hook = good_hook.2["url"].as_str().expect("url").to_owned();
    let bomb_hook = send(&client, "POST", &format!("{url}/api/webhooks"), Some("application/json"),
        hook("bomb", "{% set s = 'x' * 10000 %}{% for a in range(100) %}{% for b in range(100) %}{{ s }}{% endfor %}{% endfor %}")).await;
    assert_eq!(bomb_hook.0, 201, "{bomb_hook:?}");
    let bomb_hook = bomb_hook.2["url"].as_str().expect("url").to_owned();
    let answer = send(&client, "TRACE", &good_hook, None, "").await;
    assert_json_error(&answer, 405, "Method Not Allowed", "TRACE on a webhook");
    let answer = send(
        &client,
        "POST",
        &good_hook,
        None,
        vec![b'x'; 1024 * 1024 + 10],
    )
    .await;
    assert_json_error(
        &answer,
        413,
        "limit of 1048576 bytes",
        "an oversized webhook body",
    );

    // Slow and idle clients are cut off.
    let addr = daemon.addr.clone();
    let silent = async {
        let mut s = TcpStream::connect(&addr).await.expect("connects");
        let t = Instant::now();
        let closed = read_until_closed(&mut s, Duration::from_secs(6)).await.0;
        (closed, t.elapsed())
    };
    // Idle after a first request: closed after the idle timeout (2 s), not before.
    let idle = async {
        let mut s = TcpStream::connect(&addr).await.expect("connects");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .expect("writes");
        let t = Instant::now();
        let (closed, answer) = read_until_closed(&mut s, Duration::from_secs(8)).await;
        (closed && answer.starts_with(b"HTTP/1.1 200"), t.elapsed())
    };
    let ws_out_no_filter = async {
        let mut ws = raw_websocket(&addr, "/api/events/out").await;
        let t = Instant::now();
        let (closed, got) = read_until_closed(&mut ws, Duration::from_secs(6)).await;
        let code = (got.len() >= 4 && got[0] == 0x88).then(|| u16::from_be_bytes([got[2], got[3]]));
        (closed, code, t.elapsed())
    };
    let half_header = async {
        let mut s = TcpStream::connect(&addr).await.expect("connects");
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            .await
            .expect("writes");
        let t = Instant::now();
        let closed = read_until_closed(&mut s, Duration::from_secs(6)).await.0;
        (closed, t.elapsed())
    };
    let half_body = async {
        let mut s = TcpStream::connect(&addr).await.expect("connects");
        s.write_all(b"POST /api/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n[{\"ev")
            .await
            .expect("writes");
        read_until_closed(&mut s, Duration::from_secs(6)).await
    };
    let ws_no_auth = async {
        let request =
            tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(
                format!("ws://{addr}/api/events/in"),
            )
            .map(|mut r| {
                r.headers_mut()
                    .insert("sec-websocket-protocol", "prefect".parse().expect("header"));
                r
            })
            .expect("request");
        let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("ws");
        let t = Instant::now();
        let message = tokio::time::timeout(Duration::from_secs(6), ws.next()).await;
        (message, t.elapsed())
    };
    let (
        (silent, silent_time),
        (idle, idle_time),
        (half_header, header_time),
        (body_closed, body_answer),
        (no_auth, auth_time),
        (out_closed, out_code, out_time),
    ) = tokio::join!(
        silent,
        idle,
        half_header,
        half_body,
        ws_no_auth,
        ws_out_no_filter
    );
    assert!(
        silent && silent_time < Duration::from_secs(4),
        "a connection that sends nothing is closed after the header timeout: {silent_time:?}"
    );
    assert!(
        idle && idle_time >= Duration::from_millis(1900) && idle_time < Duration::from_secs(5),
        "an idle keep-alive connection is closed after the idle timeout: {idle_time:?}"
    );
    assert!(
        out_closed && out_code == Some(1008) && out_time < Duration::from_secs(4),
        "a feed socket that sends no filter: {out_closed} {out_code:?} {out_time:?}"
    );
    assert!(
        half_header && header_time < Duration::from_secs(4),
        "half a header: {header_time:?}"
    );
    let body_answer = String::from_utf8_lossy(&body_answer);
    assert!(
        body_closed
            && body_answer.starts_with("HTTP/1.1 408")
            && body_answer.contains("\"detail\""),
        "half a body: {body_answer}"
    );
    match no_auth {
        Ok(Some(Ok(Message::Close(Some(frame))))) => {
            assert_eq!(u16::from(frame.code), 1008, "{frame:?}");
            assert!(auth_time < Duration::from_secs(4), "{auth_time:?}");
        }
        other => panic!("a websocket without its auth message: {other:?}"),
    }

    // Too many headers: hyper's own 431 (before any route, so without a body).
    let mut s = TcpStream::connect(&addr).await.expect("connects");
    let mut head = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
    for i in 0..120 {
        head.push_str(&format!("x-h{i}: v\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).await.expect("writes");
    let (_, got) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(
        got.starts_with(b"HTTP/1.1 431"),
        "{}",
        String::from_utf8_lossy(&got)
    );

    // Oversized websocket frames get a 1009 close frame, on both sockets, and a log line.
    assert_eq!(
        oversized_frame_close_code(&addr, "/api/events/in", 17 * 1024 * 1024).await,
        Some(1009)
    );
    assert_eq!(
        oversized_frame_close_code(&addr, "/api/events/out", 3 * 1024 * 1024).await,
        Some(1009)
    );
    assert!(daemon.logged("closing with 1009"));

    // Beyond the connection limit: 503 in JSON; room again once idle connections time out.
    let mut held = Vec::new();
    for _ in 0..MAX_CONNECTIONS {
        held.push(TcpStream::connect(&addr).await.expect("connects"));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut extra = TcpStream::connect(&addr).await.expect("connects");
    extra
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("writes");
    let (_, refused) = read_until_closed(&mut extra, Duration::from_secs(3)).await;
    let refused = String::from_utf8_lossy(&refused);
    assert!(
        refused.starts_with("HTTP/1.1 503") && refused.contains("too many connections"),
        "{refused}"
    );
    drop(held);
    // Room again once the daemon has seen them go.
    let deadline = Instant::now() + Duration::from_secs(5);
    while send(&client, "GET", &format!("{url}/healthz"), None, "")
        .await
        .0
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "no room after the connections closed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The mixed stream: per round, good events over every door between bad input.
    let nats_client = async_nats::connect(&nats.url).await.expect("NATS");
    let js = async_nats::jetstream::new(nats_client);
    let ws_url = format!("ws://{addr}/api/events/in");
    let (mut ws, _) = tokio_tungstenite::connect_async(&ws_url).await.expect("ws");
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    const ROUNDS: u64 = 40;
    let mut good = 0u64;
    for n in 0..ROUNDS {
        // HTTP: a good event in a batch beside bad ones; bodies that are not events at all.
        let batch = json!([good_event("http", n), {"event": "no-resource"}, {"resource": {}}, 42]);
        let answer = send(
            &client,
            "POST",
            &format!("{url}/api/events"),
            Some("application/json"),
            batch.to_string(),
        )
        .await;
        assert_eq!(answer.0, 422, "{answer:?}");
        assert_eq!(answer.2["accepted"], 1, "{answer:?}");
        good += 1;
        for bad in [
            deep.clone(),
            "{\"event\":".into(),
            "\u{0}\u{1}".into(),
            "null".into(),
        ] {
            let answer = send(
                &client,
                "POST",
                &format!("{url}/api/events"),
                Some("application/json"),
                bad,
            )
            .await;
            assert!(answer.0 == 400 || answer.0 == 422, "{answer:?}");
            assert!(answer.2["detail"].is_string(), "{answer:?}");
        }
        // Websocket: garbage frames are skipped, the good event lands.
        ws.send(Message::text("not json")).await.expect("ws send");
        ws.send(Message::binary(vec![0xff, 0xfe]))
            .await
            .expect("ws send");
        ws.send(Message::text(deep.clone())).await.expect("ws send");
        ws.send(Message::text(good_event("ws", n).to_string()))
            .await
            .expect("ws send");
        good += 1;
        // Webhooks: the output bomb is refused (400) without building 100 MB.
        if n % 8 == 0 {
            let answer = send(&client, "POST", &bomb_hook, Some("application/json"), "{}").await;
            assert_json_error(&answer, 400, "Bad Request", "the output bomb");
        }
        let body = json!({"id": good_event("webhook", n)["id"], "resource": format!("hostile.webhook.{n}")});
        let answer = send(
            &client,
            "POST",
            &good_hook,
            Some("application/json"),
            body.to_string(),
        )
        .await;
        assert_eq!(answer.0, 204, "{answer:?}");
        good += 1;
        // NATS: garbage and a good event on the consumed subjects.
        for bad in [
            b"not json".to_vec(),
            deep.clone().into_bytes(),
            b"{\"event\": 1}".to_vec(),
        ] {
            js.publish("events.bad", bad.into())
                .await
                .expect("publish")
                .await
                .expect("stored in the stream");
        }
        js.publish("events.good", good_event("nats", n).to_string().into())
            .await
            .expect("publish")
            .await
            .expect("stored in the stream");
        good += 1;
    }
    // The client's delivery check: a ping is answered once every earlier frame is stored.
    ws.send(Message::Ping(vec![1].into())).await.expect("ping");
    loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Pong(_)))) => break,
            Ok(Some(Ok(_))) => continue,
            other => panic!("no pong: {other:?}"),
        }
    }

    // Every good event is stored once and fired its automation.
    let deadline = Instant::now() + Duration::from_secs(20);
    let (stored, fired) = loop {
        let filter = json!({"filter": {"event": {"prefix": ["good."]}}, "limit": 1});
        let events = send(
            &client,
            "POST",
            &format!("{url}/api/events/filter"),
            Some("application/json"),
            filter.to_string(),
        )
        .await;
        let stored = events.2["total"].as_u64().unwrap_or(0);
        let firings = send(
            &client,
            "GET",
            &format!("{url}/api/firings?limit=1000"),
            None,
            "",
        )
        .await;
        let fired = firings.2["firings"].as_array().map_or(0, |all| {
            all.iter()
                .filter(|f| f.to_string().contains("every-good-event"))
                .count() as u64
        });
        if (stored >= good && fired >= good) || Instant::now() > deadline {
            break (stored, fired);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!((stored, fired), (good, good), "good events stored, firings");

    // Still up, still answering, memory bounded.
    assert!(daemon.is_running(), "the daemon died");
    let health = send(&client, "GET", &format!("{url}/healthz"), None, "").await;
    assert_eq!(health.0, 200);
    let rss_end = daemon.rss_kb();
    assert!(
        rss_end < rss_start + 100 * 1024,
        "RSS grew from {rss_start} kB to {rss_end} kB"
    );
    eprintln!(
        "hostile input: {good} good events over 4 doors, RSS {rss_start} → {rss_end} kB, {:?}",
        started.elapsed()
    );
    assert!(started.elapsed() < Duration::from_secs(60));
}
