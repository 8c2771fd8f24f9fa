//! The web UI in a real headless Chromium, driven over WebDriver (chromedriver): the feed
//! shows an event sent by `spur emit` live, filters it, opens its detail and reads why a
//! trigger did not fire. A screenshot is kept under `target/browser/` as a CI artifact.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{Value, json};
use support::{SpurDaemon, automations_folder, eventually, root};

const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

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

    fn screenshot(&self, path: &std::path::Path) {
        use base64::Engine as _;
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

    browser.click(&format!("tr[data-id='{id}']"));
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
    browser.screenshot(&root().join("target/browser/event-detail.png"));

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
    browser.screenshot(&root().join("target/browser/feed.png"));
}
