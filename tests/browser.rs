//! The web UI in a real headless Chromium, driven over WebDriver (chromedriver): the feed
//! shows an event sent by `spur emit` live, filters it, opens its detail and reads why a
//! trigger did not fire; every page (automations, an automation, runs, a run, webhooks)
//! renders its data, links from a firing to its run and back, shows why a run failed, stays
//! live, fits a phone-width screen and logs no console errors. Screenshots of each page are
//! kept under `target/screenshots/` as CI artifacts.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{SpurDaemon, automations_folder, eventually, root};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// Polls `check` every 100 ms until it returns `Some` or `timeout` passes.
fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = check() {
            return Some(v);
        }
        if std::time::Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn which(program: &str) -> Option<PathBuf> {
    let out = Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .ok()?;
    let path = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    (out.status.success() && !path.is_empty()).then(|| PathBuf::from(path))
}

/// A chromedriver process and one browser session.
struct Browser {
    driver: Child,
    base: String,
    session: String,
    runtime: tokio::runtime::Runtime,
    client: reqwest::Client,
}

impl Browser {
    fn start(
        chromium: &std::path::Path,
        chromedriver: &std::path::Path,
        profile: &std::path::Path,
    ) -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let driver = Command::new(chromedriver)
            .args([
                format!("--port={port}"),
                "--allowed-ips=127.0.0.1".to_owned(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let _ = rustls::crypto::ring::default_provider().install_default();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let client = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let mut browser = Browser {
            driver,
            base,
            session: String::new(),
            runtime,
            client,
        };
        let capabilities = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:loggingPrefs": {"browser": "ALL"},
            "goog:chromeOptions": {
                "binary": chromium.to_string_lossy(),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1280,800",
                         format!("--user-data-dir={}", profile.display())],
            }
        }}});
        let session = eventually(Duration::from_secs(30), "a WebDriver session", || {
            let v = browser
                .call("POST", "/session", Some(capabilities.clone()))
                .ok()?;
            v["value"]["sessionId"].as_str().map(str::to_owned)
        });
        browser.session = session;
        browser
    }

    fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        self.runtime.block_on(async {
            let request = match method {
                "POST" => self.client.post(&url).json(&body.unwrap_or(json!({}))),
                "DELETE" => self.client.delete(&url),
                _ => self.client.get(&url),
            };
            let response = request.send().await.map_err(|e| e.to_string())?;
            let status = response.status();
            let value: Value = response.json().await.map_err(|e| e.to_string())?;
            if status.is_success() {
                Ok(value)
            } else {
                Err(value.to_string())
            }
        })
    }

    fn session(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body)
    }

    fn goto(&self, url: &str) {
        self.session("POST", "/url", Some(json!({"url": url})))
            .expect("navigate");
    }

    fn find(&self, css: &str) -> Option<String> {
        let v = self
            .session(
                "POST",
                "/element",
                Some(json!({"using": "css selector", "value": css})),
            )
            .ok()?;
        v["value"][ELEMENT].as_str().map(str::to_owned)
    }

    fn text(&self, css: &str) -> Option<String> {
        let id = self.find(css)?;
        let v = self
            .session("GET", &format!("/element/{id}/text"), None)
            .ok()?;
        v["value"].as_str().map(str::to_owned)
    }

    fn type_into(&self, css: &str, text: &str) {
        let id = self.find(css).expect("input exists");
        self.session(
            "POST",
            &format!("/element/{id}/value"),
            Some(json!({"text": text})),
        )
        .expect("type");
    }

    fn click(&self, css: &str) {
        let id = self.find(css).expect("element exists");
        self.session("POST", &format!("/element/{id}/click"), Some(json!({})))
            .expect("click");
    }

    /// Runs `script` (a function body) in the page and returns its value.
    fn script(&self, script: &str) -> Value {
        self.session(
            "POST",
            "/execute/sync",
            Some(json!({"script": script, "args": []})),
        )
        .map(|v| v["value"].clone())
        .unwrap_or(Value::Null)
    }

    /// Waits until `css` exists and its text satisfies `ok`; returns the text.
    fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        let found = poll(Duration::from_secs(15), || {
            let text = self.text(css)?;
            let accepted = ok(&text);
            last = text.clone();
            accepted.then_some(text)
        });
        found.unwrap_or_else(|| panic!("timed out waiting for {what} ({css}); last text: {last}"))
    }

    /// Console messages at level SEVERE since the last call.
    fn console_errors(&self) -> Vec<String> {
        let logs = self
            .session("POST", "/se/log", Some(json!({"type": "browser"})))
            .map(|v| v["value"].clone())
            .expect("chromedriver hands over the browser's console log");
        logs.as_array()
            .into_iter()
            .flatten()
            .filter(|l| l["level"] == "SEVERE")
            .map(|l| l["message"].as_str().unwrap_or_default().to_owned())
            .collect()
    }

    fn resize(&self, width: u32, height: u32) {
        self.session(
            "POST",
            "/window/rect",
            Some(json!({"width": width, "height": height})),
        )
        .expect("resize");
    }

    /// A screenshot of the top of the page.
    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
        self.script(
            "window.scrollTo(0, 0); document.activeElement && document.activeElement.blur()",
        );
        if let Ok(v) = self.session("GET", "/screenshot", None)
            && let Some(data) = v["value"].as_str()
            && let Ok(bytes) = base64::engine::general_purpose::STANDARD.decode(data)
        {
            let _ = std::fs::create_dir_all(path.parent().unwrap_or(std::path::Path::new(".")));
            let _ = std::fs::write(path, bytes);
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.session("DELETE", "", None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

#[test]
fn the_feed_shows_live_events_filters_them_and_explains_a_trigger_that_did_not_fire() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        support::skip_without(
            "chromium and chromedriver are not installed (scripts/provision.sh installs them)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    std::fs::write(
        automations.join("prod.yaml"),
        "name: prod-failures\ntrigger: {type: event, posture: Reactive, expect: [job.failed], match: {env: prod}}\nactions: [{type: do-nothing}]\n",
    )
    .expect("write");
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let browser = Browser::start(&chromium, &chromedriver, &dir.path().join("profile"));
    browser.goto(&format!("{}/#/events", daemon.url));
    eventually(Duration::from_secs(10), "the feed connected", || {
        (browser.text("#status")? == "live").then_some(())
    });

    let emit = |name: &str, resource: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_spur"))
            .args(["emit", name, "--resource", resource, "--api", &daemon.url])
            .current_dir(root())
            .output()
            .expect("spur emit runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    let id = {
        // Markup through every field: name, labels, related resources, payload.
        let out = Command::new(env!("CARGO_BIN_EXE_spur"))
            .args([
                "emit",
                "job.failed",
                "--resource",
                r#"{"prefect.resource.id": "job.<b>7</b>", "env": "dev", "<i>label</i>": "<script>alert(3)</script>"}"#,
                "--related",
                r#"[{"prefect.resource.id": "<b>rel</b>", "prefect.resource.role": "<script>alert(4)</script>"}]"#,
                "--payload",
                r#"{"html": "<img src=x onerror=alert(5)>"}"#,
                "--api",
                &daemon.url,
            ])
            .current_dir(root())
            .output()
            .expect("spur emit runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    emit("other.thing", "svc.api");
    emit("<script>alert(1)</script>", "<img src=x onerror=alert(2)>");
    let feed = eventually(Duration::from_secs(10), "the event appears live", || {
        let text = browser.text("#feed")?;
        (text.contains("job.failed") && text.contains("other.thing") && text.contains("<script>"))
            .then_some(text)
    });
    assert!(
        feed.contains("job.<b>7</b>"),
        "HTML in labels is shown as text: {feed}"
    );
    assert!(
        feed.contains("<script>alert(1)</script>") && feed.contains("<img src=x onerror=alert(2)>"),
        "{feed}"
    );
    let injected = browser
        .session("POST", "/execute/sync", Some(json!({"script": "return document.querySelectorAll('#feed script, #feed img, #feed b').length", "args": []})))
        .expect("script runs");
    assert_eq!(
        injected["value"], 0,
        "no markup from event data reached the DOM"
    );

    browser.type_into("#f-name", "job.");
    browser.click("#apply");
    eventually(Duration::from_secs(10), "the filtered feed", || {
        let text = browser.text("#feed")?;
        (text.contains("job.failed") && !text.contains("other.thing")).then_some(())
    });

    browser.click(&format!("tr[data-id='{id}'] td:nth-child(2) a"));
    let decisions = eventually(Duration::from_secs(10), "the explanation", || {
        browser.text("#decisions")
    });
    assert!(decisions.contains("prod-failures"), "{decisions}");
    assert!(
        decisions.contains("label \"env\" is \"dev\""),
        "{decisions}"
    );
    let raw = browser.text("#raw").expect("raw JSON");
    assert!(raw.contains(&id));
    assert!(raw.contains("<img src=x onerror=alert(5)>"), "{raw}");
    let injected = browser
        .session("POST", "/execute/sync", Some(json!({"script": "return document.querySelectorAll('main script, main img, main b, main i').length", "args": []})))
        .expect("script runs");
    assert_eq!(
        injected["value"], 0,
        "no markup from event data reached the detail page"
    );
    browser.screenshot(&root().join("target/screenshots/event-markup.png"));

    // The other pages render too, with their data.
    browser.goto(&format!("{}/#/automations", daemon.url));
    eventually(Duration::from_secs(10), "the automations page", || {
        browser
            .text("main")
            .filter(|t| t.contains("prod-failures") && t.contains("Pause"))
    });
    browser.goto(&format!("{}/#/webhooks", daemon.url));
    eventually(Duration::from_secs(10), "the webhooks page", || {
        browser
            .text("main")
            .filter(|t| t.to_lowercase().contains("last failure"))
    });

    browser.goto(&format!("{}/#/events", daemon.url));
    eventually(Duration::from_secs(10), "the feed again", || {
        browser.text("#feed").filter(|t| t.contains("job.failed"))
    });
    browser.screenshot(&root().join("target/screenshots/feed-markup.png"));
}

/// Beside the shipped `config/automations/`: a deployment that fails, for its page.
const BROKEN: &str = r#"deployments:
  - name: broken
    launcher: {command: ["sh", "-c", "echo about to fail; echo 'disk is full' >&2; exit 3"], timeout: 30}
---
name: break-things
trigger: {type: event, posture: Reactive, expect: ["job.broken"]}
actions:
  - type: run-deployment
    deployment: broken
"#;

fn api_get(url: &str) -> Value {
    let (status, body) = support::http("GET", url, None);
    assert_eq!(status, 200, "{url}: {body}");
    serde_json::from_str(&body).expect("JSON")
}

/// The shipped config, as the README's first automation and chain use it, seen page by page.
#[test]
fn every_page_shows_its_data_links_a_firing_to_its_run_and_back_and_says_why_a_run_failed() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        support::skip_without(
            "chromium and chromedriver are not installed (scripts/provision.sh installs them)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[("broken.yaml", BROKEN)]);
    for file in ["deployments.yaml", "flow-failures.yaml", "nightly-sla.yaml"] {
        std::fs::copy(
            root().join("config/automations").join(file),
            automations.join(file),
        )
        .expect("copy the shipped config");
    }
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let spur_ok = |args: &[&str]| {
        let mut all = args.to_vec();
        all.extend(["--api", daemon.url.as_str()]);
        let (ok, out, err) = support::spur(&all);
        assert!(ok, "spur {args:?}: {err}");
        out.trim().to_owned()
    };
    let flow_failed = |run: &str, flow: &str, message: &str| {
        spur_ok(&[
            "emit",
            "prefect.flow-run.Failed",
            "--resource",
            &format!(
                r#"{{"prefect.resource.id": "prefect.flow-run.{run}", "prefect.resource.name": "{flow}-run-{run}"}}"#
            ),
            "--related",
            &format!(
                r#"[{{"prefect.resource.id": "prefect.flow.{flow}", "prefect.resource.role": "flow", "prefect.resource.name": "{flow}"}}]"#
            ),
            "--payload",
            &format!(r#"{{"message": "{message}"}}"#),
        ])
    };
    let shots = root().join("target/screenshots");
    // The README's first automation: three failures of one flow launch `triage`.
    flow_failed("1", "etl", "disk full");
    flow_failed("2", "etl", "disk full");
    let third = flow_failed("3", "etl", "disk still full");
    // The chain: upstream, then downstream by its deployment trigger.
    spur_ok(&["runs", "start", "upstream"]);
    // A proactive SLA with an open bucket, and a run that fails.
    spur_ok(&["emit", "export.started", "--resource", "export.sales"]);
    spur_ok(&["emit", "job.broken", "--resource", "job.disk"]);
    let finished = |runs: &[Value], d: &str| {
        runs.iter()
            .find(|r| {
                r["deployment"] == d
                    && ["Completed", "Failed", "Crashed"]
                        .contains(&r["state"].as_str().unwrap_or(""))
            })
            .cloned()
    };
    let (triage, upstream, downstream, broken) =
        eventually(Duration::from_secs(20), "four finished runs", || {
            let runs = api_get(&format!("{}/api/runs", daemon.url))["runs"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            Some((
                finished(&runs, "triage")?,
                finished(&runs, "upstream")?,
                finished(&runs, "downstream")?,
                finished(&runs, "broken")?,
            ))
        });
    assert_eq!(triage["state"], "Completed", "{triage:#}");
    assert_eq!(downstream["state"], "Completed", "{downstream:#}");
    assert_eq!(broken["state"], "Failed", "{broken:#}");
    let id = |run: &Value| run["id"].as_str().expect("run id").to_owned();
    let (triage_id, upstream_id, broken_id) = (id(&triage), id(&upstream), id(&broken));

    let browser = Browser::start(&chromium, &chromedriver, &dir.path().join("profile"));
    let live = |page: &str| {
        browser.wait_text("#status", &format!("the live indicator on {page}"), |t| {
            t == "live"
        });
    };

    // The feed: a chart of the volume, names instead of ids, relative times.
    browser.goto(&format!("{}/#/events", daemon.url));
    live("the feed");
    browser.wait_text("#feed", "the feed", |t| {
        t.contains("job.broken") && t.contains("prefect.flow-run.Completed")
    });
    let bars = poll(Duration::from_secs(10), || {
        let n = browser.script("return document.querySelectorAll('#chart svg rect.bar').length");
        (n.as_u64().unwrap_or(0) > 0).then_some(n)
    });
    assert!(bars.is_some(), "the chart draws bars");
    let tooltip =
        browser.script("return document.querySelector('#chart svg rect.bar title').textContent");
    assert!(
        tooltip
            .as_str()
            .is_some_and(|t| t.contains("prefect.flow-run.")),
        "the bar's tooltip counts by event name: {tooltip}"
    );
    let feed = browser.text("#feed").expect("feed");
    assert!(
        feed.contains("ago") || feed.contains("just now"),
        "relative times: {feed}"
    );
    assert!(
        feed.contains("etl-run-3") && feed.contains("flow: etl"),
        "names: {feed}"
    );
    assert!(feed.contains("triage-"), "a run shows by its name: {feed}");
    let exact = browser.script("return document.querySelector('#feed time').getAttribute('title')");
    assert!(
        exact.as_str().is_some_and(|t| t.contains('T')),
        "the exact time on hover: {exact}"
    );
    browser.screenshot(&shots.join("feed.png"));

    // The automations list links each automation to its page.
    browser.goto(&format!("{}/#/automations", daemon.url));
    live("the automations page");
    browser.wait_text("main", "the automations list", |t| {
        t.contains("repeated-flow-failures") && t.contains("nightly-export-sla")
    });
    browser.screenshot(&shots.join("automations.png"));
    browser.click("tr[data-name='repeated-flow-failures'] td:first-child a");

    // An automation's page: trigger as YAML, where it is defined, firings with their
    // triggering event and rendered parameters, its runs, explain.
    browser.wait_text("#automation-title", "the automation page", |t| {
        t == "repeated-flow-failures"
    });
    live("an automation's page");
    let trigger = browser.text("#trigger-yaml").expect("trigger");
    assert!(
        trigger.contains("expect: [prefect.flow-run.Failed]") && trigger.contains("threshold: 3"),
        "{trigger}"
    );
    let source = browser.text("#source").expect("source");
    assert!(source.contains("flow-failures.yaml:3"), "{source}");
    let firings = browser.wait_text("#firings", "its firing", |t| t.contains("triage-"));
    assert!(
        firings.contains("prefect.flow-run.Failed on etl-run-3"),
        "the triggering event by name: {firings}"
    );
    assert!(
        firings.contains("disk still full"),
        "rendered parameters: {firings}"
    );
    let linked = browser.script(&format!(
        "return document.querySelector('#firings a[href=\"#/events/{third}\"]') !== null"
    ));
    assert_eq!(
        linked,
        json!(true),
        "the triggering event links to its page"
    );
    browser.type_into("#explain-id", &third);
    browser.click("#explain-form button[type=submit]");
    let explained = browser.wait_text("#explain", "the explanation", |t| t.contains("fired"));
    assert!(explained.contains("repeated-flow-failures"), "{explained}");
    browser.screenshot(&shots.join("automation.png"));

    // The triggering event's page: why each automation did or did not react.
    browser.click(&format!("#firings a[href='#/events/{third}']"));
    let decisions = browser.wait_text("#decisions", "the event's decisions", |t| {
        t.contains("fired")
    });
    assert!(decisions.contains("repeated-flow-failures"), "{decisions}");
    browser.screenshot(&shots.join("event.png"));
    browser.script("history.back()");
    browser.wait_text("#firings", "back on the automation", |t| {
        t.contains("triage-")
    });

    // Click-through: the firing's run, then back to the automation from the run's page.
    browser.click("#firings td.launched a");
    browser.wait_text("#run-title", "the run page", |t| t.starts_with("triage-"));
    live("a run's page");
    assert_eq!(
        browser.script("return location.hash"),
        json!(format!("#/runs/{triage_id}"))
    );
    assert_eq!(browser.text("#run-state").as_deref(), Some("Completed"));
    let launched = browser.text("#launched-by").expect("launched by");
    assert!(
        launched.contains("repeated-flow-failures") && launched.contains("prefect.flow-run.Failed"),
        "{launched}"
    );
    assert!(
        browser
            .text("#run-parameters")
            .is_some_and(|p| p.contains("prefect.flow.etl"))
    );
    assert!(
        browser
            .text("#run-result")
            .is_some_and(|p| p.contains("flow_id"))
    );
    if triage.get("output").is_some_and(|o| !o.is_null()) {
        let output = browser.text("#run-output").expect("output");
        assert!(output.contains("triage:"), "{output}");
    }
    let stray = browser.script(
        "return [...document.querySelectorAll('main > *')].filter(n => ['null', 'undefined'].includes(n.textContent.trim())).length",
    );
    assert_eq!(stray, json!(0), "no absent value is shown as text");
    browser.screenshot(&shots.join("run.png"));
    browser.click("#launched-by a[href^='#/automations/']");
    browser.wait_text("#automation-title", "back on the automation", |t| {
        t == "repeated-flow-failures"
    });

    // The chain: upstream's page lists the run it started; that run names its launcher.
    browser.goto(&format!("{}/#/runs/{upstream_id}", daemon.url));
    let children = browser.wait_text("#children", "the run it started", |t| {
        t.contains("downstream-")
    });
    assert!(children.contains("downstream__automation_1"), "{children}");
    assert!(
        browser
            .text("#launched-by")
            .is_some_and(|t| t.contains("by hand"))
    );
    browser.screenshot(&shots.join("run-chain.png"));
    browser.click("#children td:first-child a");
    let launched = browser.wait_text("#launched-by", "the chained run", |t| {
        t.contains("downstream__automation_1")
    });
    assert!(
        launched.contains("prefect.flow-run.Completed on upstream-"),
        "{launched}"
    );
    assert!(
        browser
            .text("#run-parameters")
            .is_some_and(|p| p.contains("foobar"))
    );

    // A failed run says why: the reason, exit code and output tail on its page.
    browser.goto(&format!("{}/#/runs/{broken_id}", daemon.url));
    let reason = browser.wait_text("#run-reason", "the failure reason", |t| {
        t.contains("Failed")
    });
    assert!(
        reason.contains('3'),
        "the exit status is in the reason: {reason}"
    );
    if broken.get("exit_code").is_some_and(|c| !c.is_null()) {
        assert_eq!(browser.text("#exit-code").as_deref(), Some("3"));
    }
    if broken.get("output").is_some_and(|o| !o.is_null()) {
        let output = browser.text("#run-output").expect("output");
        assert!(
            output.contains("disk is full") && output.contains("about to fail"),
            "{output}"
        );
    }
    browser.screenshot(&shots.join("run-failed.png"));

    // The runs list filters by state and updates live.
    browser.goto(&format!("{}/#/runs?state=Failed", daemon.url));
    live("the runs page");
    let listed = browser.wait_text("#runs", "failed runs", |t| t.contains("broken-"));
    assert!(!listed.contains("triage-"), "{listed}");
    browser.goto(&format!("{}/#/runs", daemon.url));
    browser.wait_text("#runs", "all runs", |t| t.contains("triage-"));
    for run in ["4", "5", "6"] {
        flow_failed(run, "report", "timeout");
    }
    browser.wait_text("#runs", "a new run, live", |t| {
        t.matches("triage-").count() >= 2
    });
    browser.screenshot(&shots.join("runs.png"));

    // A proactive automation shows its open bucket and deadline, and pauses from its page.
    browser.goto(&format!("{}/#/automations/nightly-export-sla", daemon.url));
    let buckets = browser.wait_text("#buckets", "the open bucket", |t| {
        t.contains("export.sales")
    });
    assert!(
        buckets.contains("in 30 min"),
        "the deadline is relative: {buckets}"
    );
    browser.click("#toggle");
    browser.wait_text("#state-pill", "paused", |t| t == "paused");
    browser.click("#toggle");
    browser.wait_text("#state-pill", "resumed", |t| t == "enabled");
    browser.screenshot(&shots.join("automation-proactive.png"));

    browser.goto(&format!("{}/#/webhooks", daemon.url));
    live("the webhooks page");
    browser.wait_text("main", "the webhooks page", |t| {
        t.to_lowercase().contains("last failure")
    });

    // Keyboard: links are reachable and Enter follows them.
    browser.goto(&format!("{}/#/runs", daemon.url));
    browser.wait_text("#runs", "runs", |t| t.contains("broken-"));
    let first = browser
        .find("#runs tr td:first-child a")
        .expect("a run link");
    browser
        .session(
            "POST",
            &format!("/element/{first}/value"),
            Some(json!({"text": "\u{E007}"})),
        )
        .expect("Enter on a link");
    browser.wait_text("#run-title", "the run opened from the keyboard", |t| {
        !t.is_empty()
    });

    // Phone width: pages fit, without sideways scrolling of the page itself.
    browser.resize(390, 844);
    for (page, ready, shot) in [
        (
            format!("#/runs/{broken_id}"),
            "#run-reason",
            "run-phone.png",
        ),
        ("#/events".to_owned(), "#feed", "feed-phone.png"),
        (
            "#/automations/repeated-flow-failures".to_owned(),
            "#firings",
            "automation-phone.png",
        ),
    ] {
        browser.goto(&format!("{}/{page}", daemon.url));
        browser.wait_text(ready, page.as_str(), |t| !t.is_empty());
        let overflow =
            browser.script("return document.documentElement.scrollWidth - window.innerWidth");
        assert!(
            overflow.as_i64().unwrap_or(1) <= 0,
            "{page} scrolls sideways by {overflow}px"
        );
        browser.screenshot(&shots.join(shot));
    }

    // The console log is read for real: a probe shows up, and nothing else is an error.
    browser.script("console.error('spur-console-probe')");
    let mut errors = browser.console_errors();
    let probes = errors.len();
    errors.retain(|e| !e.contains("spur-console-probe"));
    assert_eq!(
        probes,
        errors.len() + 1,
        "the probe was logged: {errors:#?}"
    );
    assert!(errors.is_empty(), "console errors: {errors:#?}");
}

/// The automations page pages (100 a page, Previous/Next following the API's cursor) and
/// searches by name prefix, so it stays usable with a large automation set.
#[test]
fn the_automations_page_pages_and_searches() {
    let (Some(chromium), Some(chromedriver)) = (which("chromium"), which("chromedriver")) else {
        support::skip_without(
            "chromium and chromedriver are not installed (scripts/provision.sh installs them)",
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let file: String = (0..250)
        .map(|i| {
            let group = if i < 30 { "billing" } else { "tenant" };
            format!(
                "- name: {group}-{i:03}\n  trigger: {{type: event, posture: Reactive, expect: [job.failed], match: {{tenant: t{i}}}}}\n  actions: [{{type: do-nothing}}]\n"
            )
        })
        .collect();
    std::fs::write(automations.join("many.yaml"), file).expect("write");
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let browser = Browser::start(&chromium, &chromedriver, &dir.path().join("profile"));
    browser.goto(&format!("{}/#/automations", daemon.url));
    let count = |what: &str, expected: &str| {
        browser.wait_text("#automations-count", what, |t| t.starts_with(expected))
    };
    count("the first page", "100 shown of 250 loaded");
    let first = browser.text("main").expect("main");
    assert!(
        first.contains("billing-000") && !first.contains("tenant-130"),
        "{first}"
    );
    browser.click("#automations-next");
    count("the second page", "100 shown of 250 loaded");
    browser.wait_text("main", "the second page's rows", |t| {
        t.contains("tenant-100") && !t.contains("billing-000")
    });
    browser.click("#automations-next");
    count("the last page", "50 shown of 250 loaded");
    let disabled = browser.script("return document.querySelector('#automations-next').disabled");
    assert_eq!(disabled, json!(true), "no page after the last");
    browser.click("#automations-previous");
    browser.wait_text("main", "back on the second page", |t| {
        t.contains("tenant-100")
    });

    browser.type_into("#automations-search", "billing");
    browser.click("#automations-search-form button");
    count(
        "the search",
        "30 shown of 250 loaded (names starting with \"billing\")",
    );
    let found = browser.text("main").expect("main");
    assert!(
        found.contains("billing-029") && !found.contains("tenant-"),
        "{found}"
    );
    assert!(
        browser.console_errors().is_empty(),
        "{:?}",
        browser.console_errors()
    );
    browser.screenshot(&root().join("target/screenshots/automations-paged.png"));
}
