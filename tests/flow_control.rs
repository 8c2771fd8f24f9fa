//! End-to-end tests of flow control (`debounce`, `throttle`, `batch`) against the real
//! daemon: events over loopback HTTP, runs launched by the process launcher, a kill -9 in
//! the middle of a throttle's queue. The rules themselves are pinned on the virtual clock by
//! `tests/scenarios/2xx-flow-*.json`; these check that the daemon's wall clock, its store
//! and its restart path give the same.

mod support;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SpurDaemon, automations_folder, eventually, http};

/// Every run the daemon knows, oldest first.
fn runs(daemon: &SpurDaemon) -> Vec<Value> {
    let (status, body) = http("GET", &format!("{}/api/runs?limit=1000", daemon.url), None);
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("runs JSON");
    let mut runs = page["runs"].as_array().cloned().unwrap_or_default();
    runs.reverse();
    runs
}

/// `/api/automations/{name}/detail`.
fn automation_detail(daemon: &SpurDaemon, name: &str) -> Value {
    let (status, body) = http(
        "GET",
        &format!("{}/api/automations/{name}/detail", daemon.url),
        None,
    );
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).expect("detail JSON")
}

/// `count` Prefect events `job.failed` on `resource`, payload `{"i": first + n}`.
fn failures(resource: &str, first: usize, count: usize) -> Vec<Value> {
    let now = chrono::Utc::now();
    (first..first + count)
        .map(|i| {
            json!({
                "id": uuid::Uuid::new_v4(),
                "occurred": spur_core::time::format_timestamp(now),
                "event": "job.failed",
                "resource": {"prefect.resource.id": resource},
                "payload": {"i": i},
            })
        })
        .collect()
}

fn post_events(daemon: &SpurDaemon, events: Vec<Value>) {
    let (status, body) = http(
        "POST",
        &format!("{}/api/events", daemon.url),
        Some(Value::Array(events)),
    );
    assert!(status < 300, "{status} {body}");
}

const SINK: &str = "deployments:\n  - name: sink\n    launcher:\n      command: [sh, -c, 'true']\n";

/// 500 failures in well under the period collapse into exactly one run, whose parameters
/// name the last event of the burst and the count.
#[test]
fn a_burst_of_500_failures_becomes_one_run_with_the_last_event_and_the_count() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[
            ("d.yaml", SINK),
            (
                "a.yaml",
                "name: collapse\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 debounce: {key: '{{ event.resource.id }}', period: 3s, max_wait: 1m}\n\
                 actions:\n  - type: run-deployment\n    deployment: sink\n    parameters:\n      \
                 count: '{{ debounce.count }}'\n      last: '{{ event.payload.i }}'\n      \
                 key: '{{ debounce.key }}'\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let started = Instant::now();
    let mut seventh = None;
    for chunk in 0..5 {
        let events = failures("svc.db", chunk * 100, 100);
        seventh = seventh.or_else(|| events[7]["id"].as_str().map(str::to_owned));
        post_events(&daemon, events);
    }
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the burst took {:?}, longer than the debounce period",
        started.elapsed()
    );
    let run = eventually(Duration::from_secs(20), "the debounced run", || {
        runs(&daemon).into_iter().next()
    });
    assert_eq!(run["parameters"]["count"], 500, "{run}");
    assert_eq!(run["parameters"]["last"], 499, "{run}");
    assert_eq!(run["parameters"]["key"], "svc.db", "{run}");
    // `spur explain` says where an event of the burst went.
    let seventh = seventh.expect("an event id");
    let (ok, out, err) = support::spur(&["explain", &seventh, "--api", &daemon.url]);
    assert!(ok, "{err}");
    assert!(
        out.contains("collapsed into a debounce") && out.contains("8 waiting"),
        "{out}"
    );
    // Quiet for another period: still one run.
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(runs(&daemon).len(), 1, "{:?}", runs(&daemon));
    // /metrics counts what the debounce folded, and nothing waits any more.
    let (status, text) = http("GET", &format!("{}/metrics", daemon.url), None);
    assert_eq!(status, 200, "{text}");
    assert!(text.contains("\nspur_flow_collapsed_total 499\n"), "{text}");
    assert!(text.contains("\nspur_flow_waiting 0\n"), "{text}");
}

/// `throttle {limit: 10, per: 4s, over: delay}` and 50 firings: 10 runs in the first
/// window, the rest later and in order; a kill -9 while 40 wait loses none and repeats none.
/// (The 10 per minute, scaled to 4 s so the suite stays fast; the arithmetic is the
/// same on the engine clock.)
#[test]
fn a_throttle_delays_the_rest_in_order_and_loses_none_across_a_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let automations = automations_folder(
        dir.path(),
        &[
            ("d.yaml", SINK),
            (
                "a.yaml",
                "name: limited\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 throttle: {limit: 10, per: 4s, over: delay}\n\
                 actions:\n  - type: run-deployment\n    deployment: sink\n    parameters:\n      \
                 i: '{{ event.payload.i }}'\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    post_events(&daemon, failures("svc.api", 0, 50));
    let first = eventually(Duration::from_secs(10), "the first ten runs", || {
        let runs = runs(&daemon);
        (runs.len() >= 10).then_some(runs)
    });
    assert_eq!(first.len(), 10, "only ten in the first window: {first:?}");
    let detail = automation_detail(&daemon, "limited");
    let key = &detail["flow_keys"][0];
    assert_eq!(key["kind"], "throttle", "{detail}");
    assert_eq!(key["in_window"], 10, "{detail}");
    assert!(
        key["waiting"].as_u64().is_some_and(|w| w > 0 && w <= 40),
        "{detail}"
    );
    daemon.kill();
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let all = eventually(Duration::from_secs(60), "all fifty runs", || {
        let runs = runs(&daemon);
        (runs.len() >= 50).then_some(runs)
    });
    std::thread::sleep(Duration::from_millis(500));
    let all_now = runs(&daemon);
    assert_eq!(all_now.len(), 50, "none repeated: {}", all_now.len());
    let order: Vec<i64> = all
        .iter()
        .map(|r| r["parameters"]["i"].as_i64().expect("i"))
        .collect();
    let distinct: BTreeSet<i64> = order.iter().copied().collect();
    assert_eq!(distinct, (0..50).collect::<BTreeSet<_>>(), "{order:?}");
    // In order window by window (the runs of one window launch together, so their
    // creation order within the window is the launcher's, not the queue's).
    for (window, runs) in order.chunks(10).enumerate() {
        let got: BTreeSet<i64> = runs.iter().copied().collect();
        let start = 10 * window as i64;
        assert_eq!(
            got,
            (start..start + 10).collect(),
            "window {window}: {order:?}"
        );
    }
    // No window of 4 s (by creation time) holds more than ten runs.
    let created: Vec<chrono::DateTime<chrono::FixedOffset>> = all
        .iter()
        .map(|r| {
            chrono::DateTime::parse_from_rfc3339(r["created"].as_str().expect("created"))
                .expect("created time")
        })
        .collect();
    for (n, start) in created.iter().enumerate() {
        let within = created[n..]
            .iter()
            .take_while(|t| (**t - *start) < chrono::TimeDelta::milliseconds(3_900))
            .count();
        assert!(within <= 10, "{within} runs within 4 s of run {n}");
    }
}

/// `batch {max_events: 25, max_wait: 2s}`: 60 firings become runs of 25, 25 and (after
/// max_wait) 10, each with all of its events.
#[test]
fn a_batch_hands_on_full_batches_at_once_and_the_rest_at_max_wait() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[
            ("d.yaml", SINK),
            (
                "a.yaml",
                "name: grouped\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 batch: {max_events: 25, max_wait: 2s}\n\
                 actions:\n  - type: run-deployment\n    deployment: sink\n    parameters:\n      \
                 count: '{{ batch.count }}'\n      \
                 items: \"{{ batch.events | map(attribute='payload') | map(attribute='i') | list }}\"\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    post_events(&daemon, failures("svc.q", 0, 60));
    let mut all = eventually(Duration::from_secs(20), "three batch runs", || {
        let runs = runs(&daemon);
        (runs.len() >= 3).then_some(runs)
    });
    // The two full batches go at one instant and launch together: order them by content.
    all.sort_by_key(|r| r["parameters"]["items"][0].as_i64());
    let counts: Vec<i64> = all
        .iter()
        .map(|r| r["parameters"]["count"].as_i64().expect("count"))
        .collect();
    assert_eq!(counts, vec![25, 25, 10], "{all:?}");
    let items: Vec<i64> = all
        .iter()
        .flat_map(|r| {
            r["parameters"]["items"]
                .as_array()
                .cloned()
                .unwrap_or_default()
        })
        .map(|i| i.as_i64().expect("item"))
        .collect();
    assert_eq!(items, (0..60).collect::<Vec<_>>());
}

/// The `Running` → final interval of a run, from its history.
fn running_interval(
    run: &Value,
) -> (
    chrono::DateTime<chrono::FixedOffset>,
    chrono::DateTime<chrono::FixedOffset>,
) {
    let history = run["history"].as_array().expect("history");
    let at = |wanted: &dyn Fn(&str) -> bool| {
        history
            .iter()
            .find(|h| wanted(h["state"].as_str().unwrap_or_default()))
            .and_then(|h| h["at"].as_str())
            .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
            .unwrap_or_else(|| panic!("no such state in {run}"))
    };
    (
        at(&|s| s == "Running"),
        at(&|s| matches!(s, "Completed" | "Failed" | "Crashed" | "Cancelled")),
    )
}

fn is_final(run: &Value) -> bool {
    matches!(
        run["state"].as_str(),
        Some("Completed" | "Failed" | "Crashed" | "Cancelled")
    )
}

/// `concurrency {key, limit: 1, on_full: queue}`: runs of one key never overlap, another
/// key runs beside them, and firings waiting for a slot survive a kill -9.
#[test]
fn concurrency_queues_per_key_and_the_queue_survives_a_kill() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let automations = automations_folder(
        dir.path(),
        &[
            (
                "d.yaml",
                "deployments:\n  - name: slow\n    launcher:\n      command: [sh, -c, 'sleep 1']\n",
            ),
            (
                "a.yaml",
                "name: one-at-a-time\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 concurrency: {key: '{{ event.resource.id }}', limit: 1, on_full: queue}\n\
                 actions:\n  - type: run-deployment\n    deployment: slow\n    parameters:\n      \
                 who: '{{ event.resource.id }}'\n      i: '{{ event.payload.i }}'\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let mut events = failures("svc.a", 0, 4);
    events.extend(failures("svc.b", 10, 1));
    post_events(&daemon, events);
    // The first of svc.a and the one of svc.b run together; the other three of svc.a wait.
    eventually(Duration::from_secs(10), "two runs in progress", || {
        let runs = runs(&daemon);
        (runs.len() >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let early = runs(&daemon);
    assert_eq!(early.len(), 2, "one per key: {early:?}");
    // The automation's page shows the queue per key.
    let detail = automation_detail(&daemon, "one-at-a-time");
    let slots = detail["concurrency"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let a = slots
        .iter()
        .find(|s| s["key"] == "svc.a")
        .expect("svc.a's slot");
    assert_eq!(
        (a["in_progress"].as_u64(), a["waiting"].as_u64()),
        (Some(1), Some(3)),
        "{detail}"
    );
    daemon.kill();
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let all = eventually(Duration::from_secs(60), "five runs, all ended", || {
        let runs = runs(&daemon);
        (runs.len() >= 5 && runs.iter().all(is_final)).then_some(runs)
    });
    assert_eq!(all.len(), 5, "none lost, none repeated: {all:?}");
    let of = |who: &str| -> Vec<&Value> {
        all.iter()
            .filter(|r| r["parameters"]["who"] == who)
            .collect()
    };
    let a = of("svc.a");
    assert_eq!(a.len(), 4, "{a:?}");
    let ids: BTreeSet<i64> = a
        .iter()
        .map(|r| r["parameters"]["i"].as_i64().expect("i"))
        .collect();
    assert_eq!(ids, (0..4).collect(), "{a:?}");
    // Runs that ran (the one a kill interrupted may have crashed) never overlap.
    let mut intervals: Vec<_> = a
        .iter()
        .filter(|r| r["state"] == "Completed")
        .map(|r| running_interval(r))
        .collect();
    intervals.sort();
    assert!(intervals.len() >= 3, "{a:?}");
    for pair in intervals.windows(2) {
        assert!(
            pair[0].1 <= pair[1].0,
            "runs of one key overlapped: {pair:?}"
        );
    }
}

/// `on_full: cancel-running` cancels the older run; `on_full: skip` records the newer
/// firing as skipped and starts nothing.
#[test]
fn concurrency_cancels_the_running_one_or_skips_the_new_one() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[
            (
                "d.yaml",
                "deployments:\n  - name: long\n    launcher:\n      command: [sh, -c, 'sleep 20']\n",
            ),
            (
                "a.yaml",
                "name: newest-wins\ntrigger: {type: event, posture: Reactive, expect: [deploy.requested]}\n\
                 concurrency: {limit: 1, on_full: cancel-running}\n\
                 actions:\n  - type: run-deployment\n    deployment: long\n    parameters: {i: '{{ event.payload.i }}'}\n\
                 ---\n\
                 name: first-wins\ntrigger: {type: event, posture: Reactive, expect: [report.requested]}\n\
                 concurrency: {limit: 1, on_full: skip}\n\
                 actions:\n  - type: run-deployment\n    deployment: long\n    parameters: {i: '{{ event.payload.i }}'}\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let named = |name: &str, i: usize| {
        let mut e = failures("svc.x", i, 1);
        e[0]["event"] = json!(name);
        e
    };
    post_events(&daemon, named("deploy.requested", 1));
    post_events(&daemon, named("report.requested", 1));
    eventually(Duration::from_secs(10), "both first runs running", || {
        let runs = runs(&daemon);
        (runs.len() == 2 && runs.iter().all(|r| r["state"] == "Running")).then_some(())
    });
    post_events(&daemon, named("deploy.requested", 2));
    post_events(&daemon, named("report.requested", 2));
    // The skip is decided (and logged with its reason) before anything is counted.
    eventually(Duration::from_secs(10), "the second report skipped", || {
        (!daemon
            .log_lines("skipped by its concurrency limit")
            .is_empty())
        .then_some(())
    });
    let settled = eventually(
        Duration::from_secs(10),
        "the older deploy cancelled",
        || {
            let runs = runs(&daemon);
            (runs.len() == 3 && runs.iter().any(|r| r["state"] == "Cancelled")).then_some(runs)
        },
    );
    let by = |automation: &str| -> Vec<&Value> {
        settled
            .iter()
            .filter(|r| r["automation"] == automation)
            .collect()
    };
    let deploys = by("newest-wins");
    assert_eq!(deploys.len(), 2, "{settled:?}");
    let old = deploys
        .iter()
        .find(|r| r["parameters"]["i"] == 1)
        .expect("the first deploy");
    let new = deploys
        .iter()
        .find(|r| r["parameters"]["i"] == 2)
        .expect("the second deploy");
    assert_eq!(old["state"], "Cancelled", "{old}");
    assert_ne!(new["state"], "Cancelled", "{new}");
    let reports = by("first-wins");
    assert_eq!(
        reports.len(),
        1,
        "the second report was skipped: {settled:?}"
    );
    assert_eq!(reports[0]["parameters"]["i"], 1);
}

/// Bad flow-control settings are load errors naming file, line, column and field; the
/// automation beside them in the same daemon keeps running.
#[test]
fn bad_settings_are_named_with_their_place_and_the_others_keep_running() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[
            ("d.yaml", SINK),
            (
                "good.yaml",
                "name: good\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 actions:\n  - type: run-deployment\n    deployment: sink\n",
            ),
            (
                "bad.yaml",
                "name: bad\ntrigger: {type: event, posture: Reactive, expect: [job.failed]}\n\
                 throttle: {limit: 0, per: 1m}\ndebounce:\n  period: soon\n\
                 concurrency: {limit: 1, on_full: later}\nactions: [{type: do-nothing}]\n",
            ),
        ],
    );
    let bad = automations.join("bad.yaml");
    let (ok, out, err) = support::spur(&["check", bad.to_str().expect("utf-8 path")]);
    assert!(!ok, "{out}{err}");
    let text = format!("{out}{err}");
    for expected in [
        "bad.yaml:3:12: throttle.limit: must be at least 1",
        "bad.yaml:5:3: debounce.period: \"soon\" is not a duration",
        "bad.yaml:6:",
        "concurrency.on_full:",
    ] {
        assert!(text.contains(expected), "{expected:?} in {text}");
    }
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    post_events(&daemon, failures("svc.a", 0, 1));
    let run = eventually(Duration::from_secs(10), "the good automation's run", || {
        runs(&daemon).into_iter().next()
    });
    assert_eq!(run["automation"], "good", "{run}");
}
