//! End-to-end tests of the `spur` binary: `check`, `replay` and `test`, run as a user would,
//! on real files (temp dirs per test, so tests run in parallel safely).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn spur(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_spur"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("the spur binary runs")
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("temp file written");
    path
}

#[test]
fn scenario_suite_and_public_examples_pass() {
    let mut args = vec!["test", "tests/scenarios"];
    let examples = root().join("../shared/conformance/examples");
    let examples = examples.to_string_lossy().into_owned();
    if Path::new(&examples).is_dir() {
        args.push(&examples);
    }
    let out = spur(&args);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}");
    let last = text.lines().last().unwrap_or_default();
    assert!(last.ends_with(" passed, 0 failed"), "{last}");
    let passed: usize = last
        .split(' ')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    assert!(passed >= 60, "only {passed} scenarios ran");
}

#[test]
fn a_failing_scenario_is_reported_and_exits_1() {
    let dir = tempfile::tempdir().expect("temp dir");
    let scenario = r#"{
      "name": "wrong expectation",
      "automations": [{"name": "a", "trigger": {"type": "event", "posture": "Reactive", "expect": ["x"]},
                       "actions": [{"type": "run-deployment", "deployment_id": "5e1ec7ed-0000-4000-8000-000000000001",
                                    "parameters": {"n": "{{ event.payload.n }}"}}]}],
      "events": [{"id": "00000000-0000-4000-8000-000000000001", "occurred": "2024-01-01T00:00:00Z",
                  "event": "x", "resource": {"prefect.resource.id": "r"}, "payload": {"n": 1}}],
      "expect": [{"automation": "a", "state": "triggered", "parameters": {"n": 2}}]
    }"#;
    let path = write(dir.path(), "wrong.json", scenario);
    let out = spur(&["test", &path.to_string_lossy()]);
    let text = stdout(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL"), "{text}");
    assert!(
        text.contains("missing:    a triggered parameters {\"n\":2}"),
        "{text}"
    );
    assert!(
        text.contains("unexpected: a triggered at 2024-01-01T00:00:00Z"),
        "{text}"
    );
    assert!(text.trim_end().ends_with("0 passed, 1 failed"), "{text}");
}

#[test]
fn check_summarises_the_shipped_config() {
    let out = spur(&["check", "config/automations"]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("ok  repeated-flow-failures: event trigger on [prefect.flow-run.Failed] → run-deployment"), "{text}");
    assert!(text.contains("ok  downstream__automation_1"), "{text}");
    assert!(text.contains("automation(s) valid"), "{text}");
}

#[test]
fn check_reports_file_line_column_field_and_reason() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "broken.yaml",
        "name: broken\ntrigger:\n  type: event\n  posture: Proactive\n  expect: [a]\n  within: 5\nactions:\n  - type: run-deployment\n    source: inferred\n    deployment_id: 5e1ec7ed-0000-4000-8000-000000000001\n",
    );
    let out = spur(&["check", &path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let file = path.display();
    assert!(
        err.contains(&format!("{file}:6:3: trigger.within: `within` for Proactive triggers must be greater than or equal to 10 seconds")),
        "{err}"
    );
    assert!(
        err.contains(&format!("{file}:10:5: actions[0].deployment_id: deployment_id is not allowed when source is \"inferred\"")),
        "{err}"
    );
}

#[test]
fn check_refuses_missing_posture_unknown_type_and_bad_templates() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "many.yaml",
        r#"- name: no-posture
  trigger: {type: event, expect: [a]}
  actions: []
- name: bad-type
  trigger: {type: metricish}
  actions: []
- name: bad-template
  trigger: {type: event, posture: Reactive, expect: [a]}
  actions:
    - type: run-deployment
      deployment_id: 5e1ec7ed-0000-4000-8000-000000000001
      parameters: {x: "{{ event.payload.x "}
- name: negative
  trigger: {type: event, posture: Reactive, expect: [a], within: -1}
  actions: []
"#,
    );
    let out = spur(&["check", &path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(":2:3: trigger.posture: is required"), "{err}");
    assert!(
        err.contains(":5:13: trigger.type: unknown trigger type \"metricish\""),
        "{err}"
    );
    assert!(
        err.contains(":12:20: actions[0].parameters.x: Invalid parameters: invalid template"),
        "{err}"
    );
    assert!(
        err.contains(":14:58: trigger.within: must be greater than or equal to 0"),
        "{err}"
    );
    assert!(err.contains("0 automation(s) valid, 4 error(s)"), "{err}");
}

#[test]
fn check_warns_about_triggers_that_never_fire() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "odd.yaml",
        "name: odd\ntrigger:\n  type: event\n  posture: Reactive\n  expect: [\"job.?\"]\nactions: [{type: do-nothing}]\n",
    );
    let out = spur(&["check", &path.to_string_lossy()]);
    let err = stderr(&out);
    assert!(out.status.success(), "warnings do not fail a check: {err}");
    assert!(
        err.contains(":5:12: warning: trigger.expect[0]: \"job.?\": only `*` works in event names"),
        "{err}"
    );
}

#[test]
fn check_refuses_the_flow_run_loop() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(
        dir.path(),
        "loop.yaml",
        "name: loop\ntrigger: {type: event, posture: Reactive, expect: [prefect.flow-run.Running]}\nactions:\n  - {type: run-deployment, source: inferred}\n",
    );
    let out = spur(&["check", &path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(":4:5: actions[0]: Running an inferred deployment"),
        "{err}"
    );
}

#[test]
fn yaml_syntax_errors_name_the_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = write(dir.path(), "syntax.yaml", "name: x\ntrigger: [unclosed\n");
    let out = spur(&["check", &path.to_string_lossy()]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains(&format!("{}:", path.display())), "{err}");
    assert!(err.contains("(syntax)"), "{err}");
}

#[test]
fn replay_prints_one_json_line_per_firing() {
    let out = spur(&[
        "replay",
        "--automations",
        "config/automations",
        "--events",
        "config/examples/events/flow-failures.jsonl",
        "--until",
        "2024-06-01T03:00:00Z",
    ]);
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert_eq!(lines[0]["automation"], "repeated-flow-failures");
    assert_eq!(lines[0]["state"], "triggered");
    assert_eq!(lines[0]["at"], "2024-06-01T02:06:00Z");
    assert_eq!(lines[0]["event"], "0190a000-0000-7000-8000-000000000004");
    assert_eq!(
        lines[0]["actions"][0]["parameters"],
        serde_json::json!({"failures": 3, "flow_id": "prefect.flow.etl", "last_message": "disk still full"})
    );
    assert_eq!(lines[1]["automation"], "nightly-export-sla");
    assert_eq!(lines[1]["at"], "2024-06-01T02:40:00Z");
    assert_eq!(lines[2]["state"], "resolved");
    assert_eq!(lines[2]["at"], "2024-06-01T02:55:00Z");
}

#[test]
fn replay_names_the_line_of_a_malformed_event() {
    let dir = tempfile::tempdir().expect("temp dir");
    let events = write(
        dir.path(),
        "events.jsonl",
        "{\"event\": \"x\", \"occurred\": \"2024-01-01T00:00:00Z\", \"resource\": {\"prefect.resource.id\": \"r\"}}\n\n{\"event\": \"x\", \"occurred\": \"2024-01-01T00:00:01Z\", \"resource\": {}}\n",
    );
    let out = spur(&[
        "replay",
        "--automations",
        "config/automations",
        "--events",
        &events.to_string_lossy(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("line 3: resource: resources must include the prefect.resource.id label"),
        "{err}"
    );

    let broken = write(dir.path(), "broken.jsonl", "{\"event\": \"x\"\n");
    let out = spur(&[
        "replay",
        "--automations",
        "config/automations",
        "--events",
        &broken.to_string_lossy(),
    ]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("broken.jsonl:1:"), "{err}");
}

#[test]
fn replay_reads_a_json_array_and_honours_until() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automation = write(
        dir.path(),
        "silence.json",
        r#"{"name": "silence", "trigger": {"type": "event", "posture": "Proactive", "expect": ["beat"], "within": 60},
            "actions": [{"type": "do-nothing"}]}"#,
    );
    let events = write(
        dir.path(),
        "events.json",
        r#"[{"event": "boot", "occurred": "2024-01-01T00:00:00Z", "resource": {"prefect.resource.id": "host"}}]"#,
    );
    let run = |until: &str| {
        let out = spur(&[
            "replay",
            "--automations",
            &automation.to_string_lossy(),
            "--events",
            &events.to_string_lossy(),
            "--until",
            until,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run("2024-01-01T00:00:59Z").lines().count(), 0);
    let text = run("2024-01-01T00:02:30Z");
    let ats: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).expect("JSON")["at"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(ats, ["2024-01-01T00:01:00Z", "2024-01-01T00:02:00Z"]);
}
