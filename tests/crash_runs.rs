//! Kill -9 under load, then restart: every firing's run is launched exactly once, except
//! the runs whose process was already running at the kill (those are Crashed, with their
//! processes gone); the event log and the run store agree. The real binary, real processes,
//! loopback HTTP, bounded in count and time.

mod support;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{SpurDaemon, all_runs, eventually};

/// Events per round, posted in batches of [`BATCH`]; one kill per round.
const EVENTS: usize = 500;
const BATCH: usize = 50;
const ROUNDS: usize = 3;

fn event_id(round: usize, n: usize) -> String {
    format!("00000000-0000-4000-8000-{:012x}", round * 1_000_000 + n)
}

fn batch(round: usize, b: usize) -> Value {
    let now = chrono::Utc::now().to_rfc3339();
    Value::Array(
        (b * BATCH..(b + 1) * BATCH)
            .map(|n| {
                json!({"id": event_id(round, n), "occurred": now, "event": "test.tick",
                       "resource": {"prefect.resource.id": "test.ticker"}})
            })
            .collect(),
    )
}

/// A fraction in [0.2, 0.6) that differs from run to run (printed, to reproduce by eye).
fn kill_point(round: usize) -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    let mixed = (nanos ^ (round as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15))
        .wrapping_mul(0x2545_f491_4f6c_dd1d);
    0.2 + 0.4 * ((mixed >> 11) % 1000) as f64 / 1000.0
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// Posts a batch until some daemon (the URL may change across a restart) acknowledges it.
fn post_until_acknowledged(url: &Mutex<String>, body: &Value) {
    let rt = runtime();
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let base = url.lock().expect("url").clone();
        let answered = rt.block_on(async {
            client
                .post(format!("{base}/api/events"))
                .timeout(Duration::from_secs(20))
                .json(body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        });
        if let Ok(status) = answered
            && (200..300).contains(&status)
        {
            return;
        }
        assert!(Instant::now() < deadline, "a batch was never acknowledged");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The ids of every stored event whose name starts with `prefix`.
fn event_ids(base: &str, prefix: &str) -> HashSet<String> {
    let rt = runtime();
    let client = reqwest::Client::new();
    rt.block_on(async {
        let mut ids = HashSet::new();
        let filter =
            json!({"filter": {"event": {"prefix": [prefix]}, "order": "ASC"}, "limit": 50});
        let mut page: Value = client
            .post(format!("{base}/api/events/filter"))
            .json(&filter)
            .send()
            .await
            .expect("daemon answers")
            .json()
            .await
            .expect("JSON");
        for _ in 0..10_000 {
            for e in page["events"].as_array().cloned().unwrap_or_default() {
                ids.insert(e["id"].as_str().unwrap_or_default().to_owned());
            }
            let Some(next) = page["next_page"].as_str() else {
                return ids;
            };
            let next = if next.starts_with("http") {
                next.to_owned()
            } else {
                format!("{base}{next}")
            };
            page = client
                .get(next)
                .send()
                .await
                .expect("daemon answers")
                .json()
                .await
                .expect("JSON");
        }
        panic!("paging events does not end");
    })
}

fn setup(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let automations = dir.join("automations");
    let launches = dir.join("launches.txt");
    support::every_tick_launches_a_run(&automations, &launches, r#"{event: "{{ event.id }}"}"#);
    (automations, launches)
}

#[test]
fn kill_9_under_load_launches_every_run_that_had_not_started_exactly_once() {
    let dir = tempfile::tempdir().expect("temp dir");
    let data = dir.path().join("data");
    let (automations, launches) = setup(dir.path());
    let mut daemon = SpurDaemon::start(&data, &automations, &[]);
    let url = Arc::new(Mutex::new(daemon.url.clone()));
    let batches = EVENTS / BATCH;
    for round in 0..ROUNDS {
        let acked = Arc::new(Mutex::new(0usize));
        let poster = {
            let (url, acked) = (url.clone(), acked.clone());
            std::thread::spawn(move || {
                for b in 0..batches {
                    post_until_acknowledged(&url, &batch(round, b));
                    *acked.lock().expect("acked") += 1;
                }
            })
        };
        let point = kill_point(round);
        let kill_after = ((batches as f64) * point).ceil() as usize;
        eventually(Duration::from_secs(60), "batches before the kill", || {
            (*acked.lock().expect("acked") >= kill_after).then_some(())
        });
        daemon.kill();
        println!("round {round}: killed after {kill_after} of {batches} batches ({point:.2})");
        daemon = SpurDaemon::start(&data, &automations, &[]);
        *url.lock().expect("url") = daemon.url.clone();
        poster.join().expect("poster");
    }
    let total = EVENTS * ROUNDS;
    let base = daemon.url.clone();
    let mut last_report = Instant::now();
    let runs = eventually(Duration::from_secs(600), "every run finished", || {
        let runs = all_runs(&base);
        let unfinished = runs
            .iter()
            .filter(|r| {
                matches!(
                    r["state"].as_str(),
                    Some("Scheduled" | "Pending" | "Running")
                )
            })
            .count();
        if last_report.elapsed() > Duration::from_secs(15) {
            last_report = Instant::now();
            println!(
                "waiting: {} of {total} runs, {unfinished} unfinished",
                runs.len()
            );
        }
        (runs.len() >= total && unfinished == 0).then_some(runs)
    });

    // N firings, N runs: one per firing, each with its own key.
    assert_eq!(runs.len(), total, "one run per firing");
    let keys: HashSet<&str> = runs
        .iter()
        .filter_map(|r| r["idempotency_key"].as_str())
        .collect();
    assert_eq!(keys.len(), total, "every run has its own firing");
    let triggered = event_ids(&base, "prefect.automation.triggered");
    assert_eq!(triggered.len(), total, "one firing per event");

    // No launch repeated; every run launched once, except those already running at a kill.
    let text = std::fs::read_to_string(&launches).expect("launches");
    let mut launched: HashMap<String, usize> = HashMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let parameters: Value = serde_json::from_str(line).expect("a launch's parameters");
        *launched
            .entry(parameters["event"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let repeated: Vec<_> = launched.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "launched more than once: {repeated:?}");
    let mut by_state: HashMap<String, usize> = HashMap::new();
    for run in &runs {
        let state = run["state"].as_str().unwrap_or_default().to_owned();
        *by_state.entry(state.clone()).or_default() += 1;
        let event = run["parameters"]["event"].as_str().unwrap_or_default();
        match state.as_str() {
            "Completed" => assert_eq!(launched.get(event), Some(&1), "run {} ran once", run["id"]),
            "Crashed" => {
                let message = run["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("start marker"),
                    "a crash says how we know: {message}"
                );
                // Its process is gone: the pid names no process, or another one.
                if let Some(pid) = run["process"]["pid"].as_u64() {
                    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"));
                    let ticks = stat.ok().and_then(|s| {
                        s[s.rfind(')')? + 1..]
                            .split_whitespace()
                            .nth(19)
                            .map(str::to_owned)
                    });
                    let recorded = run["process"]["start_ticks"]
                        .as_u64()
                        .map(|t| t.to_string());
                    assert!(
                        ticks.is_none() || ticks != recorded,
                        "run {} left process {pid}",
                        run["id"]
                    );
                }
            }
            other => panic!("run {} ended {other}: {}", run["id"], run["message"]),
        }
    }
    let crashed = by_state.get("Crashed").copied().unwrap_or(0);
    println!(
        "{total} events, {} firings, {} runs, {} launches, by state {by_state:?}",
        triggered.len(),
        runs.len(),
        launched.len()
    );
    assert!(
        crashed <= total / 2,
        "only runs running at a kill are Crashed: {crashed}"
    );

    // The event log and the run store agree: every state a run passed through has its event,
    // and every run began Scheduled.
    let logged = event_ids(&base, "prefect.flow-run.");
    for run in &runs {
        let history = run["history"].as_array().expect("history");
        assert_eq!(history[0]["state"], "Scheduled", "run {}", run["id"]);
        for state in history {
            let id = state["event_id"].as_str().unwrap_or_default();
            assert!(
                logged.contains(id),
                "run {}: its {} event is not in the log",
                run["id"],
                state["state"]
            );
        }
    }
}
