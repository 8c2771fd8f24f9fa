//! End-to-end tests of runs: the chained quickstart, launcher outcomes, schema checks, and no
//! duplicate launches across a crash. The real binary, real processes, loopback HTTP.

mod support;

use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use support::{SpurDaemon, automations_folder, eventually, read_request, root, spur, write};

fn runs(daemon: &SpurDaemon) -> Vec<Value> {
    let (ok, out, err) = spur(&["runs", "ls", "--limit", "100", "--api", &daemon.url]);
    assert!(ok, "{err}");
    out.lines()
        .filter_map(|l| l.split_whitespace().next())
        .map(|id| {
            let (ok, out, err) = spur(&["runs", "get", id, "--api", &daemon.url]);
            assert!(ok, "{err}");
            serde_json::from_str(&out).expect("run JSON")
        })
        .collect()
}

fn finished(daemon: &SpurDaemon, deployment: &str) -> Vec<Value> {
    runs(daemon)
        .into_iter()
        .filter(|r| {
            r["deployment"] == deployment
                && r["state"] != "Scheduled"
                && r["state"] != "Pending"
                && r["state"] != "Running"
        })
        .collect()
}

#[test]
fn the_quickstart_chain_passes_the_upstream_result_downstream() {
    let dir = tempfile::tempdir().expect("temp dir");
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &root().join("config/examples/chain"),
        &[],
    );
    let (ok, out, err) = spur(&["runs", "start", "upstream", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let downstream = eventually(Duration::from_secs(15), "the downstream run", || {
        let done = finished(&daemon, "downstream");
        (!done.is_empty()).then_some(done)
    });
    assert_eq!(downstream.len(), 1);
    assert_eq!(downstream[0]["state"], "Completed");
    assert_eq!(downstream[0]["parameters"]["prev_result"], "foobar");
    assert_eq!(downstream[0]["automation"], "run-downstream");
    let upstream = finished(&daemon, "upstream");
    assert_eq!(upstream[0]["result"], "foobar");
    let states: Vec<&str> = upstream[0]["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["state"].as_str())
        .collect();
    assert_eq!(states, ["Scheduled", "Pending", "Running", "Completed"]);

    // The flow-run events carry the run, deployment and flow, and the result when Completed.
    let (ok, out, err) = spur(&[
        "events",
        "query",
        "--json",
        "--name",
        "prefect.flow-run.Completed",
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{err}");
    let completed: Vec<Value> = out
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON"))
        .collect();
    let upstream_event = completed
        .iter()
        .find(|e| e["payload"]["result"] == "foobar")
        .expect("upstream's Completed event");
    let related = upstream_event["related"].as_array().expect("related");
    assert!(
        related
            .iter()
            .any(|r| r["prefect.resource.role"] == "deployment")
    );
    assert!(
        related
            .iter()
            .any(|r| r["prefect.resource.role"] == "flow"
                && r["prefect.resource.name"] == "upstream")
    );

    // The custom-event variant: the flow emits its own result event.
    let (ok, out, err) = spur(&["runs", "start", "produce", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let by_event = eventually(
        Duration::from_secs(15),
        "the run from the result event",
        || {
            let done: Vec<Value> = finished(&daemon, "downstream")
                .into_iter()
                .filter(|r| r["automation"] == "downstream-from-result-event")
                .collect();
            (!done.is_empty()).then_some(done)
        },
    );
    assert_eq!(by_event[0]["parameters"]["prev_result"], "foobar");
}

#[test]
fn launcher_failures_end_runs_as_failed_or_crashed_and_bad_parameters_never_launch() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    // Found and executable, but its interpreter is not there: the exec itself fails.
    let broken = dir.path().join("broken-script");
    std::fs::write(&broken, "#!/nonexistent/interpreter\n").expect("script");
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755))
        .expect("mode");
    write(
        &automations,
        "deployments.yaml",
        &format!(
            r#"
deployments:
  - name: exits-2
    launcher: {{command: ["sh", "-c", "echo oops >&2; exit 2"]}}
  - name: missing
    launcher: {{command: ["/nonexistent/program"]}}
  - name: not-on-path
    launcher: {{command: ["no-such-program-anywhere"]}}
  - name: bad-interpreter
    launcher: {{command: ["{}"]}}
  - name: hangs
    launcher: {{command: ["sleep", "30"], timeout: 1}}
  - name: strict
    parameter_schema: {{type: object, required: [n], properties: {{n: {{type: integer}}}}}}
    launcher: {{command: ["sh", "-c", "cat"]}}
"#,
            broken.display()
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let failing = [
        "exits-2",
        "missing",
        "not-on-path",
        "bad-interpreter",
        "hangs",
    ];
    for name in failing {
        let (ok, out, err) = spur(&["runs", "start", name, "--api", &daemon.url]);
        assert!(ok, "{name}: {out}{err}");
    }
    let done = eventually(Duration::from_secs(15), "the failing runs finished", || {
        let all = runs(&daemon);
        (all.iter()
            .filter(|r| ["Failed", "Crashed"].contains(&r["state"].as_str().unwrap_or("")))
            .count()
            == failing.len())
        .then_some(all)
    });
    let by = |name: &str| {
        done.iter()
            .find(|r| r["deployment"] == name)
            .expect("run")
            .clone()
    };
    let last_message = |r: &Value| {
        r["history"]
            .as_array()
            .and_then(|h| h.last())
            .map(|h| h["message"].as_str().unwrap_or("").to_owned())
            .unwrap_or_default()
    };
    assert_eq!(by("exits-2")["state"], "Failed");
    assert!(last_message(&by("exits-2")).contains("exited with status 2: oops"));
    // A program that never ran Crashes, whether the launch or the exec found it wrong.
    for name in ["missing", "not-on-path", "bad-interpreter"] {
        assert_eq!(by(name)["state"], "Crashed", "{name}");
        let message = last_message(&by(name));
        assert!(message.contains("cannot start"), "{name}: {message}");
    }
    assert_eq!(by("hangs")["state"], "Crashed");
    assert!(last_message(&by("hangs")).contains("timed out"));

    let (ok, _, err) = spur(&[
        "runs",
        "start",
        "strict",
        "--param",
        "n=abc",
        "--api",
        &daemon.url,
    ]);
    assert!(!ok);
    assert!(err.contains("parameter \"n\": expected integer"), "{err}");
    assert!(
        runs(&daemon).iter().all(|r| r["deployment"] != "strict"),
        "an invalid run never launches"
    );
    let (ok, out, err) = spur(&[
        "runs",
        "start",
        "strict",
        "--param",
        "n=3",
        "--api",
        &daemon.url,
    ]);
    assert!(ok, "{out}{err}");
}

#[test]
fn a_restarted_daemon_never_launches_a_duplicate_run_and_crashes_orphans() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let chain = root().join("config/examples/chain");
    let daemon = SpurDaemon::start(&data, &chain, &[]);
    let (ok, out, err) = spur(&["runs", "start", "upstream", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    eventually(Duration::from_secs(15), "the downstream run", || {
        (!finished(&daemon, "downstream").is_empty()).then_some(())
    });
    daemon.kill();
    // The log is replayed on start: the firing is derived again, and must not launch again.
    let daemon = SpurDaemon::start(&data, &chain, &[]);
    std::thread::sleep(Duration::from_secs(2));
    let downstream: Vec<Value> = runs(&daemon)
        .into_iter()
        .filter(|r| r["deployment"] == "downstream")
        .collect();
    assert_eq!(downstream.len(), 1, "{downstream:?}");
    daemon.kill();

    // A run in progress when the daemon dies is Crashed on restart (its process is gone).
    let automations = dir.path().join("slow");
    std::fs::create_dir_all(&automations).expect("dir");
    write(
        &automations,
        "d.yaml",
        "deployments:\n  - name: slow\n    launcher: {command: [sleep, '30']}\n",
    );
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let (ok, out, err) = spur(&["runs", "start", "slow", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    eventually(Duration::from_secs(10), "the slow run running", || {
        runs(&daemon)
            .iter()
            .any(|r| r["deployment"] == "slow" && r["state"] == "Running")
            .then_some(())
    });
    daemon.kill();
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let slow = eventually(Duration::from_secs(10), "the orphan crashed", || {
        runs(&daemon)
            .into_iter()
            .find(|r| r["deployment"] == "slow" && r["state"] == "Crashed")
    });
    let message = slow["history"]
        .as_array()
        .expect("history")
        .last()
        .expect("state")["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("start marker"), "{message}");
    assert_eq!(slow["message"].as_str(), Some(message.as_str()));
    // Its process died with the daemon (PR_SET_PDEATHSIG): no `sleep 30` is left doing its work.
    let pid = slow["process"]["pid"].as_u64().expect("the run's pid");
    let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with("sleep"));
    assert!(!alive, "the crashed run's process {pid} is still running");
}

#[test]
fn the_chain_runs_on_a_worker_pool_over_nats() {
    let Some(bin) = support::require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = support::NatsServer::start(&bin, &dir.path().join("nats"));
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &root().join("config/examples/chain-worker"),
        &["--nats", &nats.url],
    );
    // No worker yet: the run crashes with a clear reason instead of hanging.
    let (ok, out, err) = spur(&["runs", "start", "upstream", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let orphan = eventually(Duration::from_secs(15), "the run without a worker", || {
        finished(&daemon, "upstream").into_iter().next()
    });
    assert_eq!(orphan["state"], "Crashed");
    let mut workers: Vec<std::process::Child> = (0..2)
        .map(|_| {
            Command::new(env!("CARGO_BIN_EXE_spur"))
                .args(["worker", "--pool", "default", "--nats", &nats.url])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("spur worker starts")
        })
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (ok, out, err) = spur(&["runs", "start", "upstream", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let downstream = eventually(
        Duration::from_secs(20),
        "the downstream run on a worker",
        || {
            let done = finished(&daemon, "downstream");
            (!done.is_empty()).then_some(done)
        },
    );
    for w in &mut workers {
        let _ = w.kill();
        let _ = w.wait();
    }
    assert_eq!(downstream.len(), 1);
    assert_eq!(downstream[0]["state"], "Completed");
    assert_eq!(downstream[0]["parameters"]["prev_result"], "foobar");
    let states: Vec<&str> = downstream[0]["history"]
        .as_array()
        .expect("history")
        .iter()
        .filter_map(|h| h["state"].as_str())
        .collect();
    assert_eq!(states, ["Scheduled", "Pending", "Running", "Completed"]);
}

/// A loopback stand-in for the two Prefect endpoints the `prefect` launcher uses:
/// `create_flow_run` answers a flow run named after the deployment, and each flow run reads
/// RUNNING until `release` is set, then its final state (with its message) from `finals`.
/// Returns the API URL and the count of flow-run polls.
type Bodies = std::sync::Arc<std::sync::Mutex<Vec<Value>>>;

fn fake_prefect(
    release: std::sync::Arc<std::sync::atomic::AtomicBool>,
    finals: &'static [(&'static str, &'static str, &'static str)],
) -> (
    String,
    std::sync::Arc<std::sync::atomic::AtomicUsize>,
    Bodies,
) {
    use std::io::Write;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind loopback");
    let url = format!("http://{}/api", listener.local_addr().expect("addr"));
    let polls = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = polls.clone();
    let bodies = Bodies::default();
    let created = bodies.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(500) {
            let Ok(mut stream) = stream else { continue };
            let (head, body) = read_request(&stream);
            let path = head.split_whitespace().nth(1).unwrap_or("").to_owned();
            // /api/deployments/<deployment>/create_flow_run or /api/flow_runs/<flow run>
            let answer = if let Some(rest) = path.strip_prefix("/api/deployments/") {
                let deployment = rest.split('/').next().unwrap_or("");
                if let (Ok(body), Ok(mut bodies)) =
                    (serde_json::from_slice::<Value>(&body), created.lock())
                {
                    bodies.push(body);
                }
                serde_json::json!({"id": format!("run-of-{deployment}"), "name": "fake-run",
                                   "state": {"type": "SCHEDULED", "name": "Scheduled"}})
            } else if let Some(run) = path.strip_prefix("/api/flow_runs/") {
                counted.fetch_add(1, Ordering::SeqCst);
                let deployment = run.trim_start_matches("run-of-");
                match finals.iter().find(|(d, _, _)| *d == deployment) {
                    Some((_, state, message)) if release.load(Ordering::SeqCst) => {
                        serde_json::json!(
                            {"id": run, "state": {"type": state, "name": state, "message": message}}
                        )
                    }
                    _ => {
                        serde_json::json!({"id": run, "state": {"type": "RUNNING", "name": "Running"}})
                    }
                }
            } else {
                serde_json::json!({"detail": "not found"})
            };
            let text = answer.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 201 Created\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
    (url, polls, bodies)
}

/// A `prefect` launcher follows the flow run it created: the Spur run stays Running while
/// Prefect reports RUNNING, and ends as the flow run ends (Completed, or Failed with
/// Prefect's message), so a chain waits for the work to be done.
#[test]
fn prefect_launcher_runs_end_when_the_prefect_flow_run_ends() {
    const OK: &str = "0c0c0c0c-0000-4000-8000-00000000000a";
    const BAD: &str = "0c0c0c0c-0000-4000-8000-00000000000b";
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (api, polls, _) = fake_prefect(
        release.clone(),
        &[(OK, "COMPLETED", ""), (BAD, "FAILED", "boom")],
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    write(
        &automations,
        "deployments.yaml",
        &format!(
            "deployments:\n  - {{name: on-prefect-ok, launcher: {{prefect: {{api_url: {api}, deployment_id: {OK}, poll_interval: 0.2}}}}}}\n  - {{name: on-prefect-bad, launcher: {{prefect: {{api_url: {api}, deployment_id: {BAD}, poll_interval: 0.2}}}}}}\n"
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    for name in ["on-prefect-ok", "on-prefect-bad"] {
        let (ok, out, err) = spur(&["runs", "start", name, "--api", &daemon.url]);
        assert!(ok, "{out}{err}");
    }
    // While Prefect says RUNNING (several polls of each run), so does Spur.
    eventually(Duration::from_secs(10), "polls of both flow runs", || {
        (polls.load(std::sync::atomic::Ordering::SeqCst) >= 4).then_some(())
    });
    let running = runs(&daemon);
    assert_eq!(running.len(), 2, "{running:?}");
    assert!(
        running.iter().all(|r| r["state"] == "Running"),
        "{running:?}"
    );
    release.store(true, std::sync::atomic::Ordering::SeqCst);
    let ended = eventually(Duration::from_secs(15), "both runs ended", || {
        let ok = finished(&daemon, "on-prefect-ok");
        let bad = finished(&daemon, "on-prefect-bad");
        (!ok.is_empty() && !bad.is_empty()).then(|| (ok[0].clone(), bad[0].clone()))
    });
    let (ok, bad) = ended;
    assert_eq!(ok["state"], "Completed", "{ok}");
    assert_eq!(ok["result"]["prefect_state"], "COMPLETED", "{ok}");
    assert_eq!(ok["result"]["prefect_flow_run_id"], format!("run-of-{OK}"));
    assert_eq!(bad["state"], "Failed", "{bad}");
    let last = bad["history"].as_array().and_then(|h| h.last()).cloned();
    assert_eq!(
        last.map(|h| h["message"].clone()),
        Some("boom".into()),
        "Prefect's message: {bad}"
    );
}

#[test]
fn schedule_after_delays_the_run_even_across_a_kill_and_job_variables_reach_its_process() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let automations = automations_folder(
        dir.path(),
        &[
            (
                "d.yaml",
                "deployments:\n  - name: later\n    launcher:\n      command: [sh, -c, 'echo \"greeting=$GREETING\"; echo \"$SPUR_JOB_VARIABLES\"']\n",
            ),
            (
                "a.yaml",
                "name: delayed\ntrigger: {type: event, posture: Reactive, expect: [test.go]}\nactions:\n  - type: run-deployment\n    deployment: later\n    schedule_after: 6\n    job_variables: {env: {GREETING: hello}, note: '{{ not templated }}'}\n",
            ),
        ],
    );
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let (ok, out, err) = spur(&["emit", "test.go", "--resource", "r", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let scheduled = eventually(Duration::from_secs(10), "the delayed run", || {
        runs(&daemon)
            .into_iter()
            .find(|r| r["deployment"] == "later")
    });
    assert_eq!(scheduled["state"], "Scheduled", "{scheduled}");
    let created =
        chrono::DateTime::parse_from_rfc3339(scheduled["created"].as_str().expect("created"))
            .expect("created time");
    let start = chrono::DateTime::parse_from_rfc3339(
        scheduled["scheduled_start"]
            .as_str()
            .expect("scheduled_start"),
    )
    .expect("start time");
    assert_eq!((start - created).num_seconds(), 6, "{scheduled}");
    // The Scheduled event says when, as Prefect's state details do.
    let (status, body) = support::http(
        "POST",
        &format!("{}/api/events/filter", daemon.url),
        Some(serde_json::json!({"filter": {"event": {"name": ["prefect.flow-run.Scheduled"]}}})),
    );
    assert_eq!(status, 200, "{body}");
    let page: Value = serde_json::from_str(&body).expect("events JSON");
    let event = &page["events"][0];
    let announced = event["payload"]["validated_state"]["state_details"]["scheduled_time"]
        .as_str()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("scheduled_time"))
        .unwrap_or_else(|| panic!("no scheduled_time in {event}"));
    assert!((announced - start).num_milliseconds().abs() < 1, "{event}");
    // Killed while it waits: the restart keeps it Scheduled until the same instant.
    daemon.kill();
    let daemon = SpurDaemon::start(&data, &automations, &[]);
    let early = runs(&daemon)
        .into_iter()
        .find(|r| r["deployment"] == "later")
        .expect("the run after the restart");
    if chrono::Utc::now() < start - chrono::TimeDelta::seconds(1) {
        assert_eq!(early["state"], "Scheduled", "{early}");
    }
    let done = eventually(Duration::from_secs(30), "the delayed run finished", || {
        let done = finished(&daemon, "later");
        (!done.is_empty()).then_some(done)
    });
    assert_eq!(done.len(), 1, "one run, not relaunched: {done:?}");
    let run = &done[0];
    assert_eq!(run["state"], "Completed", "{run}");
    let pending = run["history"]
        .as_array()
        .expect("history")
        .iter()
        .find(|h| h["state"] == "Pending")
        .expect("a Pending state");
    let pending_at =
        chrono::DateTime::parse_from_rfc3339(pending["at"].as_str().expect("at")).expect("at");
    assert!(
        pending_at >= start,
        "left Scheduled at {pending_at}, before {start}"
    );
    let output = run["output"].as_str().unwrap_or_default();
    assert!(output.contains("greeting=hello"), "{output}");
    assert!(output.contains("{{ not templated }}"), "{output}");
}

/// A `prefect` run is created at once, Scheduled at its start time, with its job variables:
/// Prefect's scheduler does the waiting, as with Prefect's own `run-deployment` action.
#[test]
fn prefect_runs_carry_schedule_after_and_job_variables_to_prefect() {
    const DEPLOYMENT: &str = "0c0c0c0c-0000-4000-8000-00000000000c";
    let release = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let (api, _, bodies) = fake_prefect(release, &[(DEPLOYMENT, "COMPLETED", "")]);
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(
        dir.path(),
        &[(
            "a.yaml",
            "name: later-on-prefect\ntrigger: {type: event, posture: Reactive, expect: [test.go]}\nactions:\n  - type: run-deployment\n    deployment: on-prefect\n    schedule_after: PT1H\n    job_variables: {image: 'flows:1', env: {A: b}}\n",
        )],
    );
    write(
        &automations,
        "deployments.yaml",
        &format!(
            "deployments:\n  - {{name: on-prefect, launcher: {{prefect: {{api_url: {api}, deployment_id: {DEPLOYMENT}, poll_interval: 0.2}}}}}}\n"
        ),
    );
    let daemon = SpurDaemon::start(&dir.path().join("data"), &automations, &[]);
    let before = chrono::Utc::now();
    let (ok, out, err) = spur(&["emit", "test.go", "--resource", "r", "--api", &daemon.url]);
    assert!(ok, "{out}{err}");
    let body = eventually(
        Duration::from_secs(15),
        "the create_flow_run request",
        || bodies.lock().ok().and_then(|b| b.first().cloned()),
    );
    assert_eq!(
        body["job_variables"],
        serde_json::json!({"image": "flows:1", "env": {"A": "b"}})
    );
    assert_eq!(body["state"]["type"], "SCHEDULED", "{body}");
    let at = body["state"]["state_details"]["scheduled_time"]
        .as_str()
        .map(|t| chrono::DateTime::parse_from_rfc3339(t).expect("scheduled_time"))
        .unwrap_or_else(|| panic!("no scheduled_time in {body}"));
    let ahead = at.with_timezone(&chrono::Utc) - before;
    assert!(
        ahead >= chrono::TimeDelta::seconds(3590) && ahead <= chrono::TimeDelta::seconds(3610),
        "scheduled {ahead} ahead: {body}"
    );
    // Created at once, not an hour later: the run is followed to Prefect's final state.
    let done = eventually(Duration::from_secs(15), "the prefect run finished", || {
        let done = finished(&daemon, "on-prefect");
        (!done.is_empty()).then_some(done)
    });
    assert_eq!(done[0]["state"], "Completed", "{}", done[0]);
}

#[test]
fn max_processes_bounds_the_command_runs_alive_at_once_and_every_run_still_ends() {
    let dir = tempfile::tempdir().expect("temp dir");
    let automations = automations_folder(dir.path(), &[]);
    let journal = dir.path().join("journal");
    // Each process notes its start and its end (one short append each, so lines never
    // interleave): the journal's running count is how many were alive at once.
    write(
        &automations,
        "deployments.yaml",
        &format!(
            r#"
deployments:
  - name: slow
    launcher:
      command: ["sh", "-c", "echo + >> \"$J\"; sleep 0.4; echo - >> \"$J\""]
      env: {{J: "{}"}}
"#,
            journal.display()
        ),
    );
    let daemon = SpurDaemon::start(
        &dir.path().join("data"),
        &automations,
        &["--max-processes", "2"],
    );
    const RUNS: usize = 6;
    for _ in 0..RUNS {
        let (ok, out, err) = spur(&["runs", "start", "slow", "--api", &daemon.url]);
        assert!(ok, "{out}{err}");
    }
    let done = eventually(Duration::from_secs(30), "every run finished", || {
        let done = finished(&daemon, "slow");
        (done.len() == RUNS).then_some(done)
    });
    assert!(done.iter().all(|r| r["state"] == "Completed"), "{done:?}");
    let text = std::fs::read_to_string(&journal).expect("journal");
    let (mut alive, mut most) = (0i32, 0i32);
    for line in text.lines() {
        alive += if line == "+" { 1 } else { -1 };
        most = most.max(alive);
    }
    assert_eq!(text.lines().count(), 2 * RUNS, "{text}");
    assert_eq!(
        most, 2,
        "at most two processes at once, and the bound is used: {text}"
    );
    let (status, metrics) = support::http("GET", &format!("{}/metrics", daemon.url), None);
    assert_eq!(status, 200);
    assert!(
        metrics.contains("spur_processes_alive 0"),
        "no process is left once every run ended: {metrics}"
    );
}
