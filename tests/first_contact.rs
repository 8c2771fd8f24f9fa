//! First contact: what a new user does with the README, run as they would run it. The
//! shipped `config/automations/` and `config/examples/chain/` must check clean and run to
//! Completed runs; `spur check` warns about what loads but would not work.

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use support::{SpurDaemon, eventually, http, root, spur};

fn spur_code(args: &[&str]) -> (Option<i32>, String, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("spur runs");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The daemon's runs, newest first.
fn runs(daemon: &SpurDaemon) -> Vec<Value> {
    let (status, body) = http("GET", &format!("{}/api/runs?limit=100", daemon.url), None);
    assert_eq!(status, 200, "{body}");
    let body: Value = serde_json::from_str(&body).expect("runs are JSON");
    body["runs"].as_array().cloned().unwrap_or_default()
}

/// Waits for a finished run of `deployment` and returns it.
fn finished_run(daemon: &SpurDaemon, deployment: &str) -> Value {
    eventually(
        Duration::from_secs(20),
        &format!("a finished {deployment} run"),
        || {
            runs(daemon).into_iter().find(|r| {
                r["deployment"] == deployment
                    && ["Completed", "Failed", "Crashed", "Cancelled"]
                        .contains(&r["state"].as_str().unwrap_or(""))
            })
        },
    )
}

#[test]
fn the_shipped_config_and_the_chain_example_check_clean_even_with_strict() {
    for folder in [
        "config/automations",
        "config/examples/chain",
        "config/examples/chain-worker",
    ] {
        let (code, out, err) = spur_code(&["check", "--strict", folder]);
        assert_eq!(code, Some(0), "{folder}:\n{out}\n{err}");
        assert!(!err.contains("warning:"), "{folder}: {err}");
        assert!(out.trim_end().ends_with("automation(s) valid"), "{out}");
    }
}

#[test]
fn check_warns_with_file_and_line_and_strict_makes_warnings_fail() {
    let dir = tempfile::tempdir().expect("temp dir");
    let folder = dir.path();
    support::write(
        folder,
        "deployments.yaml",
        "deployments:\n  - name: has-one\n    launcher: {command: [\"sh\", \"-c\", \"cat\"]}\n  - name: bare\n    entrypoint: flows.py:bare\n  - name: triggered\n    launcher: {command: [\"sh\", \"-c\", \"cat\"]}\n    triggers:\n      - type: event\n        expect: [x.y]\n        parameters:\n          p: << evnt.id >>\n",
    );
    support::write(
        folder,
        "a.yaml",
        r#"name: uses-them
trigger: {type: event, posture: Reactive, expect: [job.failed]}
actions:
  - type: run-deployment
    deployment: bare
    parameters:
      ok: << event.payload.x >>
      typo: << evnt.payload.x >>
  - type: run-deployment
    deployment_id: 5e1ec7ed-0000-4000-8000-000000000001
  - type: send-notification
    url: http://127.0.0.1:9/
    subject: "{{ flow_name }} failed"
    body: "{{ event.resource.id }} at {{ event.occurred }}"
"#,
    );
    let path = folder.to_string_lossy().into_owned();
    let (code, out, err) = spur_code(&["check", &path]);
    assert_eq!(code, Some(0), "warnings alone pass:\n{out}\n{err}");
    assert!(out.contains("ok  uses-them"), "{out}");
    assert!(out.contains("2 automation(s) valid, 5 warning(s)"), "{out}");
    let deployments = folder.join("deployments.yaml").display().to_string();
    let automation = folder.join("a.yaml").display().to_string();
    let has = |prefix: &str, needle: &str| {
        err.lines()
            .any(|l| l.starts_with(prefix) && l.contains("warning:") && l.contains(needle))
    };
    assert!(
        has(&format!("{deployments}:4:"), "\"bare\" has no launcher"),
        "{err}"
    );
    assert!(!err.contains("\"has-one\" has no launcher"), "{err}");
    assert!(
        has(&format!("{deployments}:12:"), "reads \"evnt\""),
        "a deployment trigger's parameters are checked on their line: {err}"
    );
    assert!(
        has(&format!("{automation}:8:"), "reads \"evnt\""),
        "the typo is found on its line: {err}"
    );
    assert!(
        has(
            &format!("{automation}:10:"),
            "5e1ec7ed-0000-4000-8000-000000000001"
        ),
        "{err}"
    );
    assert!(
        has(&format!("{automation}:13:"), "reads \"flow_name\""),
        "{err}"
    );
    assert!(!err.contains("\"event\""), "known variables pass: {err}");

    let (code, _, err) = spur_code(&["check", "--strict", &path]);
    assert_eq!(code, Some(1), "--strict fails on warnings: {err}");

    // An unknown deployment *name* stays what it was: an error.
    support::write(
        folder,
        "b.yaml",
        "name: nowhere\ntrigger: {type: event, posture: Reactive, expect: [x]}\nactions: [{type: run-deployment, deployment: nowhere}]\n",
    );
    let (code, _, err) = spur_code(&["check", &path]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("unknown deployment \"nowhere\""), "{err}");
}

/// The README's "A first automation", against a daemon on the shipped `config/automations/`:
/// three failures of one flow fire `repeated-flow-failures`, whose `triage` run completes.
#[test]
fn the_readme_first_automation_leads_to_a_completed_triage_run() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    let related = r#"[{"prefect.resource.id":"prefect.flow.etl","prefect.resource.role":"flow"}]"#;
    assert!(
        readme.contains("spur emit prefect.flow-run.Failed --resource prefect.flow-run.1")
            && readme.contains(&format!("--related '{related}'")),
        "the README still shows the command this test runs"
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &root().join("config/automations"),
        &[],
    );
    for n in 1..=3 {
        let resource = format!("prefect.flow-run.{n}");
        let (ok, _, err) = spur(&[
            "emit",
            "prefect.flow-run.Failed",
            "--resource",
            &resource,
            "--related",
            related,
            "--payload",
            r#"{"message": "disk full"}"#,
            "--api",
            &daemon.url,
        ]);
        assert!(ok, "{err}");
    }
    let run = finished_run(&daemon, "triage");
    assert_eq!(run["state"], "Completed", "{run:#}");
    assert_eq!(run["automation"], "repeated-flow-failures", "{run:#}");
    assert_eq!(run["parameters"]["flow_id"], "prefect.flow.etl", "{run:#}");
    assert_eq!(run["parameters"]["last_message"], "disk full", "{run:#}");
    // The demo launcher's result is the parameters it got.
    assert_eq!(run["result"]["flow_id"], "prefect.flow.etl", "{run:#}");

    let (ok, firings, err) = spur(&["firings", "--api", &daemon.url]);
    assert!(ok, "{err}");
    assert!(firings.contains("repeated-flow-failures"), "{firings}");
    let (ok, listed, err) = spur(&["runs", "ls", "--api", &daemon.url]);
    assert!(ok, "{err}");
    assert!(
        listed.contains("triage") && listed.contains("Completed"),
        "{listed}"
    );
}

/// Starts `upstream` by hand and waits for the `downstream` run the chain launches.
fn chain_runs_to_downstream(automations: &Path) -> Value {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = SpurDaemon::start(&dir.path().join("data"), automations, &[]);
    let (ok, _, err) = spur(&["runs", "start", "upstream", "--api", &daemon.url]);
    assert!(ok, "{err}");
    let upstream = finished_run(&daemon, "upstream");
    assert_eq!(upstream["state"], "Completed", "{upstream:#}");
    assert_eq!(upstream["result"], "foobar", "{upstream:#}");
    let downstream = finished_run(&daemon, "downstream");
    let (ok, listed, err) = spur(&["runs", "ls", "--api", &daemon.url]);
    assert!(ok, "{err}");
    assert!(listed.contains("downstream"), "{listed}");
    downstream
}

/// The README's "Runs that chain": `spur serve --automations config/examples/chain`, then
/// `spur runs start upstream`: upstream completes with "foobar", downstream runs with it.
#[test]
fn the_readme_chain_example_runs_downstream_with_the_upstream_result() {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README");
    assert!(readme.contains("spur serve --automations config/examples/chain"));
    assert!(readme.contains("spur runs start upstream"));
    let downstream = chain_runs_to_downstream(&root().join("config/examples/chain"));
    assert_eq!(downstream["state"], "Completed", "{downstream:#}");
    assert_eq!(downstream["automation"], "run-downstream", "{downstream:#}");
    assert_eq!(downstream["parameters"]["prev_result"], "foobar");
    assert_eq!(downstream["result"]["prev_result"], "foobar");
}

/// The shipped config chains too: `downstream`'s own trigger (deployments.yaml).
#[test]
fn the_shipped_config_chains_upstream_to_downstream() {
    let downstream = chain_runs_to_downstream(&root().join("config/automations"));
    assert_eq!(downstream["state"], "Completed", "{downstream:#}");
    assert_eq!(downstream["parameters"]["prev_result"], "foobar");
}

/// The chain example's custom-event variant, as its comments describe it: `produce` emits
/// `prefect.result.produced` itself (with `$SPUR_BIN emit`, to `$SPUR_API_URL`), and
/// `downstream-from-result-event` runs `downstream` with the result it carries.
#[test]
fn the_chain_examples_custom_event_variant_runs_downstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &root().join("config/examples/chain"),
        &[],
    );
    let (ok, _, err) = spur(&["runs", "start", "produce", "--api", &daemon.url]);
    assert!(ok, "{err}");
    let produce = finished_run(&daemon, "produce");
    assert_eq!(produce["state"], "Completed", "{produce:#}");
    let downstream = finished_run(&daemon, "downstream");
    assert_eq!(downstream["state"], "Completed", "{downstream:#}");
    assert_eq!(downstream["automation"], "downstream-from-result-event");
    assert_eq!(downstream["parameters"]["prev_result"], "foobar");
}
