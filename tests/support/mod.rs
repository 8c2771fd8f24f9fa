//! Helpers for end-to-end tests: start the real `spur` binary (and a real `nats-server`) on
//! free loopback ports with temp folders, wait for readiness, and clean up on drop.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Runs the `spur` binary from the workspace root: (success, stdout, stderr).
pub fn spur(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("spur runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Reads one HTTP/1.1 request from `stream`, for the loopback servers tests stand up in
/// place of a webhook receiver or Prefect: (the request line and headers as sent, the body).
pub fn read_request(stream: &std::net::TcpStream) -> (String, Vec<u8>) {
    use std::io::Read;
    let mut reader = BufReader::new(stream);
    let mut head = String::new();
    let mut length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
            break;
        }
        if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
            length = v.trim().parse().unwrap_or(0);
        }
        head.push_str(&line);
    }
    let mut body = vec![0u8; length];
    let _ = reader.read_exact(&mut body);
    (head, body)
}

/// One HTTP request over loopback: (status, body text). `body` is sent as JSON.
pub fn http(method: &str, url: &str, body: Option<serde_json::Value>) -> (u16, String) {
    match body {
        Some(b) => request(
            method,
            url,
            &[("content-type", "application/json".to_owned())],
            b.to_string().into_bytes(),
        ),
        None => request(method, url, &[], Vec::new()),
    }
}

/// Every run a daemon holds, paging through `/api/runs`.
pub fn all_runs(base: &str) -> Vec<serde_json::Value> {
    let mut out = Vec::new();
    let mut cursor = String::new();
    for _ in 0..200 {
        let (status, text) = http("GET", &format!("{base}/api/runs?limit=1000{cursor}"), None);
        assert_eq!(status, 200, "/api/runs: {text}");
        let page: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        out.extend(page["runs"].as_array().cloned().unwrap_or_default());
        match page["next"].as_str() {
            Some(next) => cursor = format!("&cursor={next}"),
            None => return out,
        }
    }
    panic!("paging /api/runs does not end");
}

/// Writes into `folder` a deployment `record`, whose `command` run appends its parameters (one
/// JSON object per line) to `launches`, and an automation `every-tick` that launches it for
/// every `test.tick` event with `parameters` (a YAML flow mapping, rendered per event). The
/// launches file is the outside world's record of what ran, and how often.
pub fn every_tick_launches_a_run(folder: &Path, launches: &Path, parameters: &str) {
    std::fs::create_dir_all(folder).expect("automations folder");
    write(
        folder,
        "deployments.yaml",
        &format!(
            r#"deployments:
  - name: record
    launcher:
      command: ["sh", "-c", "printf '%s\n' \"$SPUR_PARAMETERS\" >> \"$OUT\""]
      env: {{OUT: "{}"}}
"#,
            launches.display()
        ),
    );
    write(
        folder,
        "every-tick.yaml",
        &format!(
            r#"name: every-tick
trigger:
  type: event
  posture: Reactive
  expect: ["test.tick"]
  threshold: 1
  within: 0
actions:
  - type: run-deployment
    deployment: record
    parameters: {parameters}
"#
        ),
    );
}

/// How many messages of `subject` a JetStream stream holds.
pub async fn subject_count(stream: &async_nats::jetstream::stream::Stream, subject: &str) -> u64 {
    use futures_util::TryStreamExt;
    let mut info = stream
        .info_with_subjects(subject)
        .await
        .expect("stream info");
    let mut count = 0;
    while let Some((_, n)) = info.try_next().await.expect("subjects") {
        count += n as u64;
    }
    count
}

/// One HTTP request over loopback with these headers and raw body: (status, body text).
pub fn request(
    method: &str,
    url: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> (u16, String) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async {
        let client = reqwest::Client::new();
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = client.request(method, url);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = request.body(body).send().await.expect("daemon answers");
        let status = response.status().as_u16();
        (status, response.text().await.unwrap_or_default())
    })
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The `spur` binary daemons are started from: `SPUR_TEST_BIN` when set (scripts/test.sh
/// points it at the release build it makes anyway, so load-heavy tests such as the cluster
/// chaos test measure Spur rather than unoptimised code), else this test build's own.
pub fn spur_bin() -> PathBuf {
    std::env::var_os("SPUR_TEST_BIN")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_spur")))
}

/// Is [`spur_bin`] an optimised build (`SPUR_TEST_BIN` set, or the tests themselves built
/// with `--release`, whose `spur` is then optimised too)?
pub fn optimised_spur() -> bool {
    !cfg!(debug_assertions) || spur_bin() != Path::new(env!("CARGO_BIN_EXE_spur"))
}

/// A running `spur serve`.
pub struct SpurDaemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Every log line so far (JSON).
    pub logs: Arc<Mutex<Vec<String>>>,
}

/// Whether a test should keep its temp folder and daemon logs (`SPUR_TEST_KEEP` set).
pub fn keep_test_dirs() -> bool {
    std::env::var_os("SPUR_TEST_KEEP").is_some()
}

/// A temp folder that is kept (and its path printed) when `SPUR_TEST_KEEP` is set.
pub fn test_dir(name: &str) -> tempfile::TempDir {
    let dir = tempfile::Builder::new()
        .prefix(name)
        .disable_cleanup(keep_test_dirs())
        .tempdir()
        .expect("temp dir");
    if keep_test_dirs() {
        println!("keeping {}", dir.path().display());
    }
    dir
}

impl SpurDaemon {
    /// Starts `spur serve` with `--data data --automations automations` plus `extra` flags.
    pub fn start(data: &Path, automations: &Path, extra: &[&str]) -> SpurDaemon {
        let mut command = Command::new(spur_bin());
        command
            .args(["serve", "--http", "127.0.0.1:0", "--log-format", "json"])
            .arg("--data")
            .arg(data)
            .arg("--automations")
            .arg(automations)
            .args(extra)
            .current_dir(root())
            .env("SPUR_LOG", "info")
            .env_remove("SPUR_CONFIG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = command.spawn().expect("spur serve starts");
        let stderr = child.stderr.take().expect("stderr is piped");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = logs.clone();
        // SPUR_TEST_KEEP=1: each daemon's log also goes to `<data>.<pid>.log`, beside its
        // data folder, for a look after a failure (tests that honour it keep their folder).
        let mut copy = keep_test_dirs()
            .then(|| std::fs::File::create(data.with_extension(format!("{}.log", child.id()))).ok())
            .flatten();
        std::thread::spawn(move || {
            use std::io::Write;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(file) = copy.as_mut() {
                    let _ = writeln!(file, "{line}");
                }
                sink.lock().expect("log lock").push(line);
            }
        });
        // Generous: a restart under load recovers its unfinished runs before it listens.
        let deadline = Instant::now() + Duration::from_secs(90);
        let url = loop {
            let found = logs.lock().expect("log lock").iter().find_map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).ok()?;
                let addr = v["fields"]["addr"].as_str()?;
                Some(format!("http://{addr}"))
            });
            if let Some(url) = found {
                break url;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "spur serve exited with {status}: {:?}",
                    logs.lock().expect("log lock")
                );
            }
            assert!(
                Instant::now() < deadline,
                "spur serve did not become ready: {:?}",
                logs.lock().expect("log lock")
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        SpurDaemon {
            child: Some(child),
            url,
            logs,
        }
    }

    /// Waits until the daemon's JetStream consumer is attached (its log says so).
    pub fn wait_for_jetstream(&self) {
        eventually(Duration::from_secs(10), "the JetStream consumer", || {
            (!self.log_lines("consuming NATS JetStream").is_empty()).then_some(())
        });
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// SIGKILL: a crash, no shutdown work.
    pub fn kill(mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit code.
    pub fn terminate(mut self) -> Option<i32> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return status.code();
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Log lines containing `needle`.
    pub fn log_lines(&self, needle: &str) -> Vec<String> {
        self.logs
            .lock()
            .expect("log lock")
            .iter()
            .filter(|l| l.contains(needle))
            .cloned()
            .collect()
    }
}

impl Drop for SpurDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Polls `check` every 50 ms until it returns `Some`, or panics after `timeout`.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Writes (or rewrites) the file `name` in `dir`.
pub fn write(dir: &Path, name: &str, text: &str) {
    std::fs::write(dir.join(name), text).expect("write");
}

/// `<dir>/automations`, created, with `files` (name, text) written into it.
pub fn automations_folder(dir: &Path, files: &[(&str, &str)]) -> PathBuf {
    let folder = dir.join("automations");
    std::fs::create_dir_all(&folder).expect("automations folder");
    for (name, text) in files {
        write(&folder, name, text);
    }
    folder
}

/// Reports a test as skipped for a missing tool — or fails it when the test command has
/// provisioned every tool (`SPUR_REQUIRE_TEST_TOOLS`, set by `scripts/test.sh`), so a
/// test can never pass there without having run.
pub fn skip_without(what: &str) {
    assert!(
        std::env::var_os("SPUR_REQUIRE_TEST_TOOLS").is_none(),
        "{what}, but SPUR_REQUIRE_TEST_TOOLS says every test tool was provisioned"
    );
    eprintln!("skipped: {what}");
}

/// The Python that has Prefect's client installed (`$SPUR_PREFECT_PYTHON`) for a test, or
/// `None` once the skip is reported (see [`skip_without`]).
pub fn require_prefect_python() -> Option<String> {
    let python = std::env::var("SPUR_PREFECT_PYTHON").ok();
    if python.is_none() {
        skip_without(
            "SPUR_PREFECT_PYTHON is not set (scripts/provision.sh installs the Prefect client)",
        );
    }
    python
}

/// The `nats-server` binary for a test, or `None` once the skip is reported (see
/// [`skip_without`]).
pub fn require_nats_server() -> Option<PathBuf> {
    let bin = nats_server_bin();
    if bin.is_none() {
        skip_without("no nats-server (set NATS_SERVER_BIN; scripts/provision.sh installs one)");
    }
    bin
}

/// The `nats-server` binary: `$NATS_SERVER_BIN`, else `nats-server` on PATH.
pub fn nats_server_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("NATS_SERVER_BIN") {
        let p = PathBuf::from(p);
        assert!(p.exists(), "NATS_SERVER_BIN={} does not exist", p.display());
        return Some(p);
    }
    let found = Command::new("sh")
        .args(["-c", "command -v nats-server"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()));
    found.filter(|p| !p.as_os_str().is_empty())
}

/// A `nats-server` with JetStream on a loopback port and a temp store.
pub struct NatsServer {
    child: Option<Child>,
    /// `nats://127.0.0.1:PORT`.
    pub url: String,
    /// The port (kept across restarts).
    pub port: u16,
    dir: PathBuf,
    bin: PathBuf,
    config: Option<PathBuf>,
}

impl NatsServer {
    /// Starts on a free port (`-p -1`) with its store under `dir`.
    pub fn start(bin: &Path, dir: &Path) -> NatsServer {
        let mut server = NatsServer {
            child: None,
            url: String::new(),
            port: 0,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            config: None,
        };
        server.spawn(None);
        server
    }

    /// Starts like [`NatsServer::start`], with `config` (nats-server's config format: TLS,
    /// authorization…) written to a file under `dir` and passed with `-c`.
    pub fn start_with_config(bin: &Path, dir: &Path, config: &str) -> NatsServer {
        std::fs::create_dir_all(dir).expect("nats dir");
        let file = dir.join("nats.conf");
        std::fs::write(&file, config).expect("write nats.conf");
        let mut server = NatsServer {
            child: None,
            url: String::new(),
            port: 0,
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            config: Some(file),
        };
        server.spawn(None);
        server
    }

    fn spawn(&mut self, port: Option<u16>) {
        let ports_dir = self.dir.join("ports");
        let _ = std::fs::remove_dir_all(&ports_dir);
        std::fs::create_dir_all(&ports_dir).expect("ports dir");
        let port_arg = port.map_or("-1".to_owned(), |p| p.to_string());
        let mut command = Command::new(&self.bin);
        if let Some(config) = &self.config {
            command.arg("-c").arg(config);
        }
        let child = command
            .args(["-a", "127.0.0.1", "-p", &port_arg, "-js", "-sd"])
            .arg(self.dir.join("js"))
            .arg("--ports_file_dir")
            .arg(&ports_dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        let pid = child.id();
        self.child = Some(child);
        let file = ports_dir.join(format!("nats-server_{pid}.ports"));
        let url = eventually(Duration::from_secs(10), "nats-server ports file", || {
            let text = std::fs::read_to_string(&file).ok()?;
            let v: serde_json::Value = serde_json::from_str(&text).ok()?;
            v["nats"][0].as_str().map(str::to_owned)
        });
        self.port = url
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("port in URL");
        self.url = url;
    }

    /// Stops the server (SIGKILL) and starts it again on the same port and store.
    pub fn restart(&mut self) {
        self.stop();
        std::thread::sleep(Duration::from_millis(300));
        let port = self.port;
        self.spawn(Some(port));
    }

    /// Stops the server.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
