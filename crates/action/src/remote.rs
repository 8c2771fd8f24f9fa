//! Launchers that start runs elsewhere over HTTP: a templated request to any URL, or a flow
//! run on a real Prefect server's deployment.
//!
//! * `http`: `{url, method (POST), headers, body, timeout}`. `url`, header values and `body`
//!   are templates over `parameters` and `run` (`{{ parameters.x }}`, `{{ run.id }}`); the
//!   default body is the parameters as JSON. A 2xx answer completes the run with the response
//!   (JSON when it parses) as its result; any other status fails it; no answer crashes it.
//! * `prefect`: `{api_url, deployment_id | deployment: "flow/deployment", auth_string?,
//!   follow (true), poll_interval (2 s)}` — `POST {api_url}/deployments/{id}/create_flow_run`
//!   with the parameters and Prefect's `idempotency_key`, then (with `follow`) the flow run
//!   is polled (`GET {api_url}/flow_runs/{id}`) until its state is final, and the Spur run
//!   ends the same way: `COMPLETED` → Completed, `FAILED` → Failed, `CRASHED` → Crashed,
//!   `CANCELLED` → Cancelled. So an automation waiting for the Spur run's Completed event
//!   fires when the work is done, not when Prefect accepted it. With `follow: false` the run
//!   completes on acceptance. The result names the Prefect flow run and its last state.
//!
//! Both send the run's idempotency key (`Idempotency-Key` header / `idempotency_key`), so a
//! launch repeated after a crash is recognisable by the receiver.

use std::time::Duration;

use serde_json::{Value, json};
use spur_template::TemplateEngine;

use crate::run::{OUTPUT_TAIL, Outcome, Run, RunState, tail};

/// An `http` launcher's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpLauncher {
    /// URL template.
    pub url: String,
    /// Method.
    pub method: String,
    /// Header templates.
    pub headers: Vec<(String, String)>,
    /// Body template (default: the parameters as JSON).
    pub body: Option<String>,
    /// Request timeout.
    pub timeout: Duration,
}

/// A `prefect` launcher's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PrefectLauncher {
    /// Prefect API URL, e.g. `http://127.0.0.1:4200/api`.
    pub api_url: String,
    /// The Prefect deployment id…
    pub deployment_id: Option<String>,
    /// …or its `flow/deployment` name.
    pub deployment_name: Option<String>,
    /// `PREFECT_API_AUTH_STRING`, sent as HTTP basic auth.
    pub auth_string: Option<String>,
    /// Request timeout.
    pub timeout: Duration,
    /// Wait for the flow run to end (the Spur run ends the same way), or complete on
    /// acceptance.
    pub follow: bool,
    /// How often a followed flow run's state is read.
    pub poll_interval: Duration,
}

/// Polls in a row that may fail (Prefect unreachable, a bad answer) before a followed run
/// is given up as Crashed.
const POLL_FAILURES_TOLERATED: u32 = 30;

/// How often create_flow_run is retried while Prefect answers busy (0.5 s, 1 s, … 8 s).
const CREATE_RETRIES: u32 = 5;

fn key_of(run: &Run) -> String {
    run.idempotency_key
        .clone()
        .unwrap_or_else(|| run.id.to_string())
}

fn crashed(message: String) -> Outcome {
    Outcome::crashed(message)
}

/// Performs an `http` launch.
pub async fn launch_http(
    client: &reqwest::Client,
    templates: &TemplateEngine,
    launcher: &HttpLauncher,
    run: &Run,
) -> Outcome {
    let run_json = serde_json::to_value(run).unwrap_or(Value::Null);
    let context =
        spur_template::json_context(&json!({"parameters": run.parameters, "run": run_json}));
    let render = |source: &str| {
        templates
            .render_text(source, &context)
            .map_err(|e| e.to_string())
    };
    let url = match render(&launcher.url) {
        Ok(u) => u,
        Err(e) => return crashed(format!("url: {e}")),
    };
    let body = match &launcher.body {
        Some(b) => match render(b) {
            Ok(b) => b,
            Err(e) => return crashed(format!("body: {e}")),
        },
        None => run.parameters.to_string(),
    };
    let Ok(method) = reqwest::Method::from_bytes(launcher.method.to_uppercase().as_bytes()) else {
        return crashed(format!("bad HTTP method {:?}", launcher.method));
    };
    let mut request = client
        .request(method, &url)
        .timeout(launcher.timeout)
        .header("Idempotency-Key", key_of(run))
        .header("content-type", "application/json")
        .header("Spur-Run-Id", run.id.to_string());
    for (k, v) in &launcher.headers {
        match render(v) {
            Ok(v) => request = request.header(k, v),
            Err(e) => return crashed(format!("header {k}: {e}")),
        }
    }
    let response = match request.body(body).send().await {
        Ok(r) => r,
        Err(e) => return crashed(format!("request to {url} failed: {e}")),
    };
    let status = response.status();
    let text = response.text().await.unwrap_or_default();
    let result = serde_json::from_str::<Value>(&text).unwrap_or(Value::String(text.clone()));
    if status.is_success() {
        Outcome {
            state: RunState::Completed,
            result: Some(result),
            output: Some(tail(&text, OUTPUT_TAIL)),
            ..Outcome::default()
        }
    } else {
        Outcome {
            state: RunState::Failed,
            message: Some(format!(
                "{url} answered {}: {}",
                status.as_u16(),
                text.chars().take(500).collect::<String>()
            )),
            output: Some(tail(&text, OUTPUT_TAIL)),
            ..Outcome::default()
        }
    }
}

/// The `Authorization` value Prefect's client sends for `PREFECT_API_AUTH_STRING`: the whole
/// string, base64-encoded. (`reqwest`'s `basic_auth` would append a `:` to a string without
/// one, which a Prefect server refuses.)
fn basic_authorization(auth_string: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(auth_string)
    )
}

/// Performs a `prefect` launch.
pub async fn launch_prefect(
    client: &reqwest::Client,
    launcher: &PrefectLauncher,
    run: &Run,
) -> Outcome {
    let api = launcher.api_url.trim_end_matches('/');
    let with_auth = |r: reqwest::RequestBuilder| match &launcher.auth_string {
        Some(auth) => r.header(reqwest::header::AUTHORIZATION, basic_authorization(auth)),
        None => r,
    };
    let id = match (&launcher.deployment_id, &launcher.deployment_name) {
        (Some(id), _) => id.clone(),
        (None, Some(name)) => {
            let url = format!("{api}/deployments/name/{name}");
            let response = match with_auth(client.get(&url).timeout(launcher.timeout))
                .send()
                .await
            {
                Ok(r) => r,
                Err(e) => return crashed(format!("cannot reach Prefect at {api}: {e}")),
            };
            if !response.status().is_success() {
                return Outcome::failed(format!(
                    "Prefect has no deployment {name:?} ({})",
                    response.status().as_u16()
                ));
            }
            match response
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["id"].as_str().map(str::to_owned))
            {
                Some(id) => id,
                None => return crashed("Prefect's deployment answer has no id".into()),
            }
        }
        (None, None) => {
            return crashed("the prefect launcher needs deployment_id or deployment".into());
        }
    };
    let url = format!("{api}/deployments/{id}/create_flow_run");
    // As Prefect's own `run-deployment` action: a Scheduled state at the run's start time
    // (`schedule_after`; Prefect's scheduler starts it then), and the job variables as given.
    let mut state = json!({"type": "SCHEDULED", "name": "Scheduled"});
    if let Some(at) = run.scheduled_start {
        state["state_details"] = json!({"scheduled_time": at.to_rfc3339()});
    }
    let mut body = json!({
        "parameters": run.parameters,
        "idempotency_key": key_of(run),
        "state": state,
        "tags": ["spur"],
    });
    if let Some(variables) = &run.job_variables {
        body["job_variables"] = variables.clone();
    }
    // A busy Prefect answers 503 (its database timed out) or 429/502/504: retried, as
    // Prefect's own client does. Safe: the run's idempotency key makes a repeated create
    // answer the flow run a first attempt may have made.
    let mut attempt = 0;
    let response = loop {
        let sent = with_auth(client.post(&url).timeout(launcher.timeout).json(&body))
            .send()
            .await;
        match sent {
            Ok(r)
                if matches!(r.status().as_u16(), 429 | 502 | 503 | 504)
                    && attempt < CREATE_RETRIES =>
            {
                attempt += 1;
                tokio::time::sleep(Duration::from_millis(250 << attempt)).await;
            }
            Ok(r) => break r,
            Err(e) => return crashed(format!("cannot reach Prefect at {api}: {e}")),
        }
    };
    let status = response.status();
    let answer: Value = response.json().await.unwrap_or(Value::Null);
    if status.is_success() {
        let result = |state: &Value| {
            json!({
                "prefect_flow_run_id": answer["id"],
                "prefect_flow_run_name": answer["name"],
                "prefect_state": state["type"],
                "prefect_state_name": state["name"],
            })
        };
        if !launcher.follow {
            return Outcome {
                state: RunState::Completed,
                result: Some(result(&answer["state"])),
                message: Some("flow run created on Prefect".into()),
                ..Outcome::default()
            };
        }
        let Some(flow_run) = answer["id"].as_str() else {
            return crashed(format!(
                "Prefect accepted the flow run but named no id: {answer}"
            ));
        };
        let url = format!("{api}/flow_runs/{flow_run}");
        let mut failures = 0;
        loop {
            tokio::time::sleep(launcher.poll_interval).await;
            let polled = match with_auth(client.get(&url).timeout(launcher.timeout))
                .send()
                .await
            {
                Ok(r) if r.status().is_success() => {
                    r.json::<Value>().await.map_err(|e| e.to_string())
                }
                Ok(r) => Err(format!("{url} answered {}", r.status().as_u16())),
                Err(e) => Err(e.to_string()),
            };
            let state = match polled {
                Ok(run) => {
                    failures = 0;
                    run["state"].clone()
                }
                Err(e) => {
                    failures += 1;
                    if failures >= POLL_FAILURES_TOLERATED {
                        return crashed(format!("lost track of Prefect flow run {flow_run}: {e}"));
                    }
                    continue;
                }
            };
            let ended = match state["type"].as_str() {
                Some("COMPLETED") => RunState::Completed,
                Some("FAILED") => RunState::Failed,
                Some("CRASHED") => RunState::Crashed,
                Some("CANCELLED") => RunState::Cancelled,
                _ => continue,
            };
            return Outcome {
                state: ended,
                result: Some(result(&state)),
                message: state["message"]
                    .as_str()
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .or_else(|| Some(format!("Prefect flow run {flow_run} ended"))),
                output: Some(tail(&state.to_string(), OUTPUT_TAIL)),
                ..Outcome::default()
            };
        }
    } else {
        Outcome {
            state: RunState::Failed,
            result: None,
            message: Some(format!(
                "Prefect refused the flow run ({}): {}",
                status.as_u16(),
                answer.get("detail").cloned().unwrap_or(answer.clone())
            )),
            ..Outcome::default()
        }
    }
}

#[cfg(test)]
mod auth_tests {
    use super::basic_authorization;

    #[test]
    fn the_auth_string_is_encoded_whole_as_prefects_client_does() {
        // base64("admin:secret") and base64("token-without-colon"), as Python's
        // base64.b64encode(auth_string.encode()) gives them.
        assert_eq!(
            basic_authorization("admin:secret"),
            "Basic YWRtaW46c2VjcmV0"
        );
        assert_eq!(
            basic_authorization("token-without-colon"),
            "Basic dG9rZW4td2l0aG91dC1jb2xvbg=="
        );
    }
}
