//! Hostile automation files against a real `spur serve` (issue #20, part A): whoever can
//! write to the watched folder must not be able to stop the daemon or displace what runs.
//!
//! Each test starts the binary on a free loopback port with temp folders, lets an ordinary
//! automation (`ok-tick`) run, then drops something hostile into the folder while the daemon
//! runs and checks three things: the daemon still answers, the hostile file is reported as
//! `file:line:column: field: reason` naming that file, and `ok-tick` still runs exactly as
//! before (its trigger, and it still fires).

mod support;

use std::path::Path;
use std::time::Duration;

use serde_json::{Value, json};
use support::{SpurDaemon, automations_folder, eventually, http, spur, write};

const OK: &str = "name: ok-tick\ntrigger: {type: event, posture: Reactive, expect: [tick]}\nactions: [{type: do-nothing}]\n";

/// (automation names, load errors) as `/api/automations` reports them.
fn status(daemon: &SpurDaemon) -> (Vec<Value>, Vec<String>) {
    let (code, text) = http("GET", &format!("{}/api/automations", daemon.url), None);
    assert_eq!(code, 200, "{text}");
    let v: Value = serde_json::from_str(&text).expect("JSON");
    let automations = v["automations"].as_array().cloned().unwrap_or_default();
    let errors = v["errors"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .map(|e| e.as_str().unwrap_or("").to_owned())
        .collect();
    (automations, errors)
}

/// Waits for a load error that contains every one of `needles`; returns all errors.
fn wait_for_error(daemon: &SpurDaemon, needles: &[&str]) -> Vec<String> {
    eventually(
        Duration::from_secs(5),
        &format!("an error with {needles:?}"),
        || {
            let (_, errors) = status(daemon);
            errors
                .iter()
                .any(|e| needles.iter().all(|n| e.contains(n)))
                .then_some(errors)
        },
    )
}

/// `ok-tick` runs with `ok.yaml`'s trigger, and an event still fires it.
fn assert_ok_tick_runs_unchanged(daemon: &SpurDaemon, id: u128) {
    let (automations, _) = status(daemon);
    let names: Vec<&str> = automations
        .iter()
        .filter_map(|a| a["name"].as_str())
        .collect();
    assert_eq!(names, ["ok-tick"], "{automations:?}");
    assert_eq!(
        automations[0]["trigger"]["expect"],
        json!(["tick"]),
        "ok-tick's trigger changed: {automations:?}"
    );
    let event = json!([{"id": uuid::Uuid::from_u128(id).to_string(), "event": "tick",
                        "resource": {"prefect.resource.id": "r"}}]);
    let (code, text) = http("POST", &format!("{}/api/events", daemon.url), Some(event));
    assert_eq!(code, 204, "{text}");
    let event_id = uuid::Uuid::from_u128(id).to_string();
    eventually(Duration::from_secs(5), "ok-tick fired", || {
        let (_, text) = http(
            "GET",
            &format!("{}/api/firings?limit=100", daemon.url),
            None,
        );
        let v: Value = serde_json::from_str(&text).ok()?;
        v["firings"]
            .as_array()?
            .iter()
            .any(|f| f["automation"] == "ok-tick" && text.contains(&event_id))
            .then_some(())
    });
}

fn start(dir: &Path) -> (SpurDaemon, std::path::PathBuf) {
    let automations = automations_folder(dir, &[("ok.yaml", OK)]);
    let daemon = SpurDaemon::start(&dir.join("data"), &automations, &[]);
    eventually(Duration::from_secs(5), "ok-tick loaded", || {
        (status(&daemon).0.len() == 1).then_some(())
    });
    (daemon, automations)
}

/// `levels` block mappings nested inside each other under `trigger`.
fn nested_mappings(levels: usize) -> String {
    let mut text = String::from("name: deep\ntrigger:\n");
    for i in 0..levels {
        text.push_str(&" ".repeat(2 * (i + 1)));
        text.push_str(&format!("k{i}:\n"));
    }
    text
}

#[test]
fn a_deeply_nested_file_is_refused_on_hot_reload_at_start_and_by_check() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon, automations) = start(dir.path());

    // Hot reload: this aborted the daemon (tokio worker stack overflow) before the limit.
    write(&automations, "deep.yaml", &nested_mappings(2000));
    let errors = wait_for_error(&daemon, &["deep.yaml:130:257: (syntax): nested too deeply"]);
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_ok_tick_runs_unchanged(&daemon, 1);

    // Start with the file present: same refusal, ok-tick runs.
    daemon.kill();
    let daemon = SpurDaemon::start(&dir.path().join("data2"), &automations, &[]);
    wait_for_error(&daemon, &["deep.yaml:130:257:", "nested too deeply"]);
    assert_ok_tick_runs_unchanged(&daemon, 2);

    // `spur check`: an error (exit status 1), no crash.
    let deep = automations.join("deep.yaml");
    let (ok, stdout, stderr) = spur(&["check", deep.to_str().expect("utf-8 path")]);
    assert!(!ok, "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("deep.yaml:130:257: (syntax): nested too deeply"),
        "{stdout}{stderr}"
    );
}

#[test]
fn a_new_file_reusing_a_running_name_is_refused_whatever_the_sort_order() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon, automations) = start(dir.path());

    // `dup.yaml` sorts before `ok.yaml`; it used to take `ok-tick` over.
    write(
        &automations,
        "dup.yaml",
        "# a newcomer\nname: ok-tick\ntrigger: {type: event, posture: Reactive, expect: [other]}\nactions: []\n",
    );
    let errors = wait_for_error(
        &daemon,
        &[
            "dup.yaml:2:1: name: duplicate automation name \"ok-tick\"",
            "already running from",
            "ok.yaml:1",
        ],
    );
    assert_eq!(
        errors.len(),
        1,
        "the error is the newcomer's only: {errors:?}"
    );
    assert!(!errors[0].contains("ok.yaml:1:1"), "{errors:?}");
    assert_ok_tick_runs_unchanged(&daemon, 3);

    // Touching the running file keeps it the incumbent.
    write(&automations, "ok.yaml", OK);
    std::thread::sleep(Duration::from_millis(1200));
    let (_, errors) = status(&daemon);
    assert!(errors[0].starts_with(&format!("{}", automations.join("dup.yaml").display())));
    assert_ok_tick_runs_unchanged(&daemon, 4);
}

#[test]
fn symlinked_files_that_cannot_be_read_each_get_an_error_naming_them() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (daemon, automations) = start(dir.path());

    std::os::unix::fs::symlink("b.yaml", automations.join("a.yaml")).expect("link");
    std::os::unix::fs::symlink("a.yaml", automations.join("b.yaml")).expect("link");
    // Points outside the folder, at a file not there yet.
    let target = dir.path().join("gone.yaml");
    std::os::unix::fs::symlink(&target, automations.join("dangling.yaml")).expect("link");
    std::os::unix::fs::symlink(".", automations.join("loop")).expect("link");

    let errors = wait_for_error(&daemon, &["dangling.yaml:1:1: (file):", "gone.yaml"]);
    let errors = if errors.len() < 3 {
        wait_for_error(&daemon, &["b.yaml:1:1: (file):", "loops back on itself"])
    } else {
        errors
    };
    assert_eq!(errors.len(), 3, "one error per link: {errors:?}");
    for file in ["a.yaml", "b.yaml"] {
        let path = automations.join(file);
        assert!(
            errors.iter().any(
                |e| e.starts_with(&format!("{}:1:1: (file): ", path.display()))
                    && e.contains("loops back on itself")
            ),
            "{file}: {errors:?}"
        );
    }
    assert!(
        errors
            .iter()
            .any(|e| e.contains("does not exist") && e.contains("dangling.yaml")),
        "{errors:?}"
    );
    assert_ok_tick_runs_unchanged(&daemon, 5);

    // Fixing the dangling link loads what it points at.
    write(
        dir.path(),
        "gone.yaml",
        "name: gone\ntrigger: {type: event, posture: Reactive, expect: [gone]}\nactions: []\n",
    );
    eventually(Duration::from_secs(5), "the fixed link loaded", || {
        let (automations, errors) = status(&daemon);
        (errors.len() == 2 && automations.len() == 2).then_some(())
    });
}
