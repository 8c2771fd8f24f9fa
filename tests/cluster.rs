//! Cluster mode: several `spur serve --cluster` instances on one NATS JetStream share the
//! automations, take over from each other, and act on every firing exactly once.
//!
//! Real parts only: nats-server (one node, or a three-node cluster of its own), the real
//! binary, loopback. Bounded in count and time; each test prints its counts.
//!
//! * `three_members_divide_the_partitions_and_take_over_from_a_killed_one`: the share, and
//!   the takeover time (lease expiry → first firing the new holder acts on).
//! * `the_same_stream_gives_the_same_firings_through_one_instance_or_three`: equivalence.
//! * `chaos_…`: kill -9 a random member again and again (and stop one nats-server node)
//!   while events stream in; every event is stored once, every firing has exactly one run,
//!   none is launched twice.

mod support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{NatsServer, SpurDaemon, all_runs, eventually, require_nats_server, write};

/// The tests here start several daemons and nats-servers each: one at a time, so the chaos
/// test's load does not slow the others past their bounds (or they it).
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

fn runtime() -> tokio::runtime::Runtime {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// `/api/cluster` of a member, or `None` while it cannot answer.
fn cluster_status(base: &str) -> Option<Value> {
    runtime().block_on(async {
        let response = reqwest::get(format!("{base}/api/cluster")).await.ok()?;
        if !response.status().is_success() {
            return None;
        }
        response.json::<Value>().await.ok()
    })
}

/// A deployment that appends its parameters to `launches`, and automations using it: one
/// that fires on every `test.tick`, and (with `windowed`) one that fires on every third
/// tick of a resource within a second, so state and windows take part too.
fn automations(dir: &Path, launches: &Path, windowed: bool) -> PathBuf {
    let folder = dir.join("automations");
    support::every_tick_launches_a_run(
        &folder,
        launches,
        r#"{event: "{{ event.id }}", kind: every}"#,
    );
    if windowed {
        write(
            &folder,
            "third-tick.yaml",
            r#"name: third-tick
trigger:
  type: event
  posture: Reactive
  expect: ["test.tick"]
  for_each: ["prefect.resource.id"]
  threshold: 3
  within: 1
actions:
  - type: run-deployment
    deployment: record
    parameters: {event: "{{ event.id }}", kind: third, resource: "{{ event.resource.id }}"}
"#,
        );
    }
    folder
}

fn tick(n: usize, resources: usize) -> Value {
    json!({
        "id": format!("00000000-0000-4000-8000-{n:012x}"),
        "occurred": chrono::Utc::now().to_rfc3339(),
        "event": "test.tick",
        "resource": {"prefect.resource.id": format!("test.ticker.{}", n % resources)},
    })
}

/// Publishes events `range` to the stream, each with `Nats-Msg-Id` = its id, every one
/// acknowledged by JetStream (a refused one is published again, bounded in time). `pace`:
/// the least time between two batches of 50.
async fn publish(urls: &str, range: std::ops::Range<usize>, resources: usize, pace: Duration) {
    let client = connect(urls).await;
    let js = async_nats::jetstream::new(client);
    let started = Instant::now();
    let mut start = range.start;
    while start < range.end {
        let end = (start + 50).min(range.end);
        let mut acks = Vec::new();
        for n in start..end {
            let event = tick(n, resources);
            acks.push((n, send(&js, &event).await));
        }
        for (n, ack) in acks {
            let mut ack = ack;
            let deadline = Instant::now() + Duration::from_secs(120);
            loop {
                let acked = match ack {
                    Some(future) => future.await.is_ok(),
                    None => false,
                };
                if acked {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "event {n} was never acknowledged"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
                ack = send(&js, &tick(n, resources)).await;
            }
        }
        start = end;
        let due = pace * ((start - range.start) / 50) as u32;
        if let Some(wait) = due.checked_sub(started.elapsed()) {
            tokio::time::sleep(wait).await;
        }
    }
}

type Ack = async_nats::jetstream::context::PublishAckFuture;

async fn send(js: &async_nats::jetstream::Context, event: &Value) -> Option<Ack> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", event["id"].as_str().unwrap_or_default());
    js.publish_with_headers(
        "events.test.tick",
        headers,
        serde_json::to_vec(event).unwrap_or_default().into(),
    )
    .await
    .ok()
}

async fn connect(urls: &str) -> async_nats::Client {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let options = async_nats::ConnectOptions::new().retry_on_initial_connect();
        if let Ok(Ok(client)) = tokio::time::timeout(
            Duration::from_secs(5),
            options.connect(urls.split(',').collect::<Vec<_>>()),
        )
        .await
        {
            return client;
        }
        assert!(
            Instant::now() < deadline,
            "cannot connect to NATS at {urls}"
        );
    }
}

/// The stream Spur uses, made by the test (with `replicas`) once JetStream answers (a new
/// cluster elects its meta leader first).
async fn make_stream(urls: &str, replicas: usize) {
    let js = async_nats::jetstream::new(connect(urls).await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let made = js
            .get_or_create_stream(async_nats::jetstream::stream::Config {
                name: "SPUR_EVENTS".to_owned(),
                subjects: vec!["events.>".to_owned()],
                max_age: Duration::from_secs(7 * 24 * 3600),
                duplicate_window: Duration::from_secs(120),
                num_replicas: replicas,
                ..Default::default()
            })
            .await;
        if made.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "JetStream never became ready: {made:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn subject_count(urls: &str, subject: &str) -> u64 {
    let js = async_nats::jetstream::new(connect(urls).await);
    let stream = js.get_stream("SPUR_EVENTS").await.expect("stream");
    support::subject_count(&stream, subject).await
}

fn member(data: &Path, folder: &Path, urls: &str, cluster: &str, replicas: &str) -> SpurDaemon {
    SpurDaemon::start(
        data,
        folder,
        &[
            "--nats",
            urls,
            "--nats-replicas",
            replicas,
            "--cluster",
            cluster,
            "--cluster-lease",
            "2s",
        ],
    )
}

/// Waits until `base` reports `members` members, every partition held and every member
/// holding some (the rebalance after a join is done).
fn settled(base: &str, members: usize) -> Value {
    eventually(Duration::from_secs(60), "the cluster to settle", || {
        let status = cluster_status(base)?;
        let live = status["members"].as_array()?;
        let owners = status["partitions"].as_array()?;
        let held = owners.iter().filter(|p| !p.is_null()).count();
        let everyone = live
            .iter()
            .all(|m| owners.iter().any(|o| *o == m["instance"]));
        (live.len() == members && held == 64 && everyone).then_some(status)
    })
}

/// Lines of `launches`, as parameter objects.
fn launches(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("a launch's parameters"))
        .collect()
}

/// Waits until the members' runs together number `total`, all finished; returns them.
fn finished_runs(bases: &[String], total: usize, limit: Duration) -> Vec<(usize, Value)> {
    let mut last_report = Instant::now();
    let deadline = Instant::now() + limit;
    // Polled every two seconds: paging tens of thousands of runs is work for the members.
    let mut check = || {
        let runs: Vec<(usize, Value)> = bases
            .iter()
            .enumerate()
            .flat_map(|(i, base)| all_runs(base).into_iter().map(move |r| (i, r)))
            .collect();
        let unfinished = runs
            .iter()
            .filter(|(_, r)| {
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
    };
    loop {
        if let Some(runs) = check() {
            return runs;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for every run to finish"
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn three_members_divide_the_partitions_and_take_over_from_a_killed_one() {
    let _serial = one_at_a_time();
    let Some(bin) = require_nats_server() else {
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    runtime().block_on(make_stream(&nats.url, 1));
    let out = dir.path().join("launches.txt");
    let folder = automations(dir.path(), &out, false);
    let data: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("data{i}")))
        .collect();
    let mut members: Vec<Option<SpurDaemon>> = data
        .iter()
        .map(|d| Some(member(d, &folder, &nats.url, "share", "1")))
        .collect();
    let base0 = members[0].as_ref().expect("member").url.clone();
    let status = settled(&base0, 3);
    let shares: Vec<u64> = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .map(|m| {
            status["partitions"].as_array().map_or(0, |p| {
                p.iter().filter(|o| **o == m["instance"]).count() as u64
            })
        })
        .collect();
    println!("partitions per member: {shares:?}");
    assert_eq!(shares.iter().sum::<u64>(), 64);
    assert!(
        shares.iter().all(|n| *n >= 10),
        "a fair share each: {shares:?}"
    );
    // `spur cluster status` prints the same.
    let (ok, stdout, stderr) = support::spur(&["cluster", "status", "--api", &base0]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("3 member(s)"), "{stdout}");

    // Kill -9 the member holding the automation's partition: another takes it over and acts
    // on the next firing; the time from the gain to that firing is printed.
    let automation_owner = |status: &Value| -> Option<String> {
        // Every automation is in one partition; the loaded ones are the only non-zero counts.
        let counts = status["automations_per_partition"].as_array()?;
        let partition = counts.iter().position(|c| c.as_u64() == Some(1))?;
        status["partitions"][partition].as_str().map(str::to_owned)
    };
    let owner = automation_owner(&status).expect("the automation's partition is held");
    let victim = status["members"]
        .as_array()
        .expect("members")
        .iter()
        .position(|m| m["instance"].as_str() == Some(owner.as_str()))
        .expect("the owner is a member");
    let victim_api = status["members"][victim]["api"]
        .as_str()
        .expect("api")
        .to_owned();
    let index = members
        .iter()
        .position(|m| m.as_ref().is_some_and(|m| m.url == victim_api))
        .expect("the owner is one of ours");
    runtime().block_on(publish(&nats.url, 0..10, 1, Duration::ZERO));
    eventually(Duration::from_secs(30), "the first ten launches", || {
        (launches(&out).len() == 10).then_some(())
    });
    let killed_at = Instant::now();
    members[index].take().expect("member").kill();
    let survivor = members
        .iter()
        .flatten()
        .next()
        .expect("a survivor")
        .url
        .clone();
    // The dead member's own lease entries age out a moment after its member record: wait
    // until the automation's partition is held by a live member.
    settled(&survivor, 2);
    eventually(
        Duration::from_secs(30),
        "the automation's partition taken over by a live member",
        || {
            let status = cluster_status(&survivor)?;
            let new_owner = automation_owner(&status)?;
            let live = status["members"]
                .as_array()?
                .iter()
                .any(|m| m["instance"].as_str() == Some(new_owner.as_str()));
            (new_owner != owner && live).then_some(())
        },
    );
    let moved = killed_at.elapsed();
    runtime().block_on(publish(&nats.url, 10..20, 1, Duration::ZERO));
    eventually(Duration::from_secs(30), "the next ten launches", || {
        (launches(&out).len() == 20).then_some(())
    });
    let took_over_in = members
        .iter()
        .flatten()
        .flat_map(|m| m.log_lines("first firing acted on since taking the partition"))
        .filter_map(|l| serde_json::from_str::<Value>(&l).ok())
        .filter_map(|v| v["fields"]["after_ms"].as_u64())
        .max();
    println!(
        "takeover: partitions held again {:.2}s after the kill -9 (lease 2s); first firing by the new holder {took_over_in:?} ms after it took the partition",
        moved.as_secs_f64()
    );
    let events: BTreeSet<String> = launches(&out)
        .iter()
        .map(|p| p["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(events.len(), 20, "each event launched once");

    // A pause asked of one member holds on every member (they follow the cluster's pauses
    // bucket), so no holder acts on it; a resume asked of another member ends it everywhere.
    let live: Vec<String> = members.iter().flatten().map(|m| m.url.clone()).collect();
    let paused_on = |base: &str| -> Option<bool> {
        let (code, body) = support::http("GET", &format!("{base}/api/automations"), None);
        let list: Value = serde_json::from_str(&body).ok().filter(|_| code == 200)?;
        let every = list["automations"]
            .as_array()?
            .iter()
            .find(|a| a["name"] == "every-tick")?
            .clone();
        every["enabled"].as_bool().map(|enabled| !enabled)
    };
    // Asks `base` to pause or resume, then waits until every member shows it.
    let ask = |base: &str, verb: &str, paused: bool| {
        let (code, body) = support::http(
            "POST",
            &format!("{base}/api/automations/every-tick/{verb}"),
            None,
        );
        assert_eq!(code, 200, "{body}");
        for member in &live {
            eventually(
                Duration::from_secs(10),
                &format!("{verb} on every member"),
                || (paused_on(member) == Some(paused)).then_some(()),
            );
        }
    };
    ask(&live[0], "pause", true);
    runtime().block_on(publish(&nats.url, 20..25, 1, Duration::ZERO));
    // Every member has evaluated the paused events (they are in its log) before the resume.
    for base in &live {
        eventually(
            Duration::from_secs(30),
            "the paused events evaluated",
            || {
                let (code, _) = support::http(
                    "GET",
                    &format!("{base}/api/events/00000000-0000-4000-8000-000000000018/explain"),
                    None,
                );
                (code == 200).then_some(())
            },
        );
    }
    ask(&live[1], "resume", false);
    runtime().block_on(publish(&nats.url, 25..30, 1, Duration::ZERO));
    eventually(
        Duration::from_secs(30),
        "the launches after the resume",
        || (launches(&out).len() == 25).then_some(()),
    );
    let events: BTreeSet<String> = launches(&out)
        .iter()
        .map(|p| p["event"].as_str().unwrap_or_default().to_owned())
        .collect();
    for n in 20..25 {
        let id = format!("00000000-0000-4000-8000-{n:012x}");
        assert!(
            !events.contains(&id),
            "event {n} came while paused: {events:?}"
        );
    }
    assert_eq!(
        events.len(),
        25,
        "each event after the resume launched once"
    );
}

#[test]
fn the_same_stream_gives_the_same_firings_through_one_instance_or_three() {
    let _serial = one_at_a_time();
    let Some(bin) = require_nats_server() else {
        return;
    };
    const EVENTS: usize = 600;
    let dir = tempfile::tempdir().expect("temp dir");
    let nats = NatsServer::start(&bin, &dir.path().join("nats"));
    runtime().block_on(make_stream(&nats.url, 1));
    // The stream is recorded first; both clusters read the same one.
    // Over about five seconds, so third-tick's one-second windows open and close.
    runtime().block_on(publish(&nats.url, 0..EVENTS, 7, Duration::from_millis(400)));
    let mut results: Vec<BTreeMap<String, Value>> = Vec::new();
    for (cluster, size) in [("one", 1usize), ("three", 3)] {
        let here = dir.path().join(cluster);
        let out = here.join("launches.txt");
        let folder = automations(&here, &out, true);
        let members: Vec<SpurDaemon> = (0..size)
            .map(|i| {
                member(
                    &here.join(format!("data{i}")),
                    &folder,
                    &nats.url,
                    cluster,
                    "1",
                )
            })
            .collect();
        let bases: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
        // every-tick: one per event; third-tick: as many as the stream's timestamps make
        // (found by the single instance, whose count then stops changing), which the three
        // must match.
        let runs = match results.first() {
            None => {
                let mut runs = finished_runs(&bases, EVENTS, Duration::from_secs(300));
                loop {
                    std::thread::sleep(Duration::from_secs(3));
                    let again = finished_runs(&bases, runs.len(), Duration::from_secs(60));
                    if again.len() == runs.len() {
                        break runs;
                    }
                    runs = again;
                }
            }
            Some(one) => finished_runs(&bases, one.len(), Duration::from_secs(300)),
        };
        let expected = runs.len();
        assert!(expected > EVENTS, "third-tick fired too");
        let firings: BTreeMap<String, Value> = runs
            .iter()
            .map(|(_, r)| {
                (
                    r["idempotency_key"].as_str().unwrap_or_default().to_owned(),
                    r["parameters"].clone(),
                )
            })
            .collect();
        let mut per_member = vec![0usize; size];
        for (i, _) in &runs {
            per_member[*i] += 1;
        }
        println!("{cluster}: {} runs, per member {per_member:?}", runs.len());
        assert_eq!(firings.len(), expected, "{cluster}: one run per firing");
        assert_eq!(
            launches(&out).len(),
            expected,
            "{cluster}: each launched once"
        );
        results.push(firings);
        for m in members {
            m.terminate();
        }
    }
    assert_eq!(
        results[0], results[1],
        "the same firing ids and parameters through one instance and through three"
    );
}

/// A nats-server cluster of three nodes on free loopback ports, each with its own store.
struct NatsCluster {
    nodes: Vec<Node>,
}

struct Node {
    child: Option<Child>,
    config: PathBuf,
    client_port: u16,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

impl NatsCluster {
    fn start(bin: &Path, dir: &Path) -> NatsCluster {
        let clients: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let nodes = (0..3)
            .map(|i| {
                let store = dir.join(format!("n{i}"));
                std::fs::create_dir_all(&store).expect("node dir");
                let others: Vec<String> = (0..3)
                    .filter(|j| *j != i)
                    .map(|j| format!("nats-route://127.0.0.1:{}", routes[j]))
                    .collect();
                let config = store.join("nats.conf");
                std::fs::write(
                    &config,
                    format!(
                        "server_name: n{i}\nlisten: 127.0.0.1:{}\njetstream {{ store_dir: \"{}\" }}\ncluster {{ name: spur-test, listen: 127.0.0.1:{}, routes: [{}] }}\n",
                        clients[i],
                        store.join("js").display(),
                        routes[i],
                        others.join(", ")
                    ),
                )
                .expect("node config");
                let mut node = Node {
                    child: None,
                    config,
                    client_port: clients[i],
                };
                node.spawn(bin);
                node
            })
            .collect();
        NatsCluster { nodes }
    }

    fn urls(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("nats://127.0.0.1:{}", n.client_port))
            .collect::<Vec<_>>()
            .join(",")
    }
}

impl Node {
    fn spawn(&mut self, bin: &Path) {
        let child = Command::new(bin)
            .arg("-c")
            .arg(&self.config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server starts");
        self.child = Some(child);
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.stop();
        }
    }
}

/// A pseudo-random number from the clock (printed decisions make a run reproducible by eye).
fn pick(n: usize, salt: u64) -> usize {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0) as u64;
    ((nanos ^ salt.wrapping_mul(0x9e37_79b9_7f4a_7c15)).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 33)
        as usize
        % n
}

/// Whether `run` (in member `member`'s store) had started on that member when it was killed:
/// a kill -9 takes a run's process with it, so such runs, and only those, end Crashed. The
/// kill falls between the state the run was in (Pending, or Running if that was recorded
/// before the kill) and the Crashed state the restarted member recorded.
fn running_at_a_kill(
    run: &Value,
    member: usize,
    kills: &[(usize, chrono::DateTime<chrono::Utc>)],
) -> bool {
    let at = |record: &Value| {
        record["at"]
            .as_str()
            .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok())
    };
    let history = run["history"].as_array().cloned().unwrap_or_default();
    let [.., before, last] = history.as_slice() else {
        return false;
    };
    // A run whose first launch a kill cut off before its record was on disk is created again
    // by the restarted member and refused a second start: its start marker's time is when
    // it started.
    let marker_written = run["message"]
        .as_str()
        .and_then(|m| m.split_once("was written at "))
        .and_then(|(_, rest)| rest.split(')').next())
        .and_then(|at| chrono::DateTime::parse_from_rfc3339(at).ok());
    let (Some(started), Some(crashed)) = (marker_written.or_else(|| at(before)), at(last)) else {
        return false;
    };
    last["state"] == "Crashed"
        && kills
            .iter()
            .any(|(m, at)| *m == member && started <= *at && *at <= crashed)
}

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn chaos_kill_9_members_and_stop_a_nats_node_while_events_stream_in() {
    let _serial = one_at_a_time();
    let Some(bin) = require_nats_server() else {
        return;
    };
    // The issue's 30 000 events with a kill every few seconds for 60 s (SPUR_CHAOS_EVENTS and
    // SPUR_CHAOS_SECONDS change them) with an optimised binary (scripts/test.sh sets
    // SPUR_TEST_BIN). Every event launches a process: on this two-core machine, shared by
    // three members and three nats-server nodes, 30 000 take three to seven minutes since
    // runs are spawned instead of forked. An unoptimised binary spends ~20 ms of CPU per
    // run: a tenth of the events.
    let (default_events, default_seconds) = if support::optimised_spur() {
        (30_000, 60)
    } else {
        println!("unoptimised spur binary: 3 000 events over 30 s (set SPUR_TEST_BIN for 30 000)");
        (3_000, 30)
    };
    let events = env_number("SPUR_CHAOS_EVENTS", default_events);
    let seconds = env_number("SPUR_CHAOS_SECONDS", default_seconds) as u64;
    let dir = support::test_dir("spur-chaos");
    let mut nats = NatsCluster::start(&bin, &dir.path().join("nats"));
    let urls = nats.urls();
    runtime().block_on(make_stream(&urls, 3));
    let out = dir.path().join("launches.txt");
    let folder = automations(dir.path(), &out, false);
    let data: Vec<PathBuf> = (0..3)
        .map(|i| dir.path().join(format!("data{i}")))
        .collect();
    let mut members: Vec<SpurDaemon> = data
        .iter()
        .map(|d| member(d, &folder, &urls, "chaos", "3"))
        .collect();
    settled(&members[0].url, 3);

    let started = Instant::now();
    let pace = Duration::from_secs(seconds) * 50 / events.max(1) as u32;
    let publisher = {
        let urls = urls.clone();
        std::thread::spawn(move || runtime().block_on(publish(&urls, 0..events, 100, pace)))
    };
    let takeovers = Arc::new(Mutex::new(Vec::new()));
    let keep_logs = |m: &SpurDaemon| {
        takeovers.lock().expect("lock").extend(
            m.log_lines("first firing acted on since taking the partition")
                .iter()
                .filter_map(|l| serde_json::from_str::<Value>(l).ok())
                .filter_map(|v| v["fields"]["after_ms"].as_u64()),
        );
    };
    // When each member was killed: a Crashed run must have been Running on its member then.
    let mut kill_times: Vec<(usize, chrono::DateTime<chrono::Utc>)> = Vec::new();
    let mut node_stopped = false;
    let mut round = 0u64;
    while started.elapsed() < Duration::from_secs(seconds) {
        round += 1;
        std::thread::sleep(Duration::from_millis(2500 + pick(2500, round) as u64));
        if !node_stopped && started.elapsed() > Duration::from_secs(seconds / 2) {
            // One nats-server node away for a few seconds: the other two keep a quorum.
            let node = pick(3, round);
            println!(
                "{:>5.1}s: stopping nats node n{node}",
                started.elapsed().as_secs_f64()
            );
            nats.nodes[node].stop();
            std::thread::sleep(Duration::from_secs(3));
            nats.nodes[node].spawn(&bin);
            node_stopped = true;
            continue;
        }
        let victim = pick(3, round);
        println!(
            "{:>5.1}s: kill -9 member {victim}",
            started.elapsed().as_secs_f64()
        );
        let killed = members.remove(victim);
        keep_logs(&killed);
        kill_times.push((victim, chrono::Utc::now()));
        killed.kill();
        std::thread::sleep(Duration::from_millis(500));
        members.insert(victim, member(&data[victim], &folder, &urls, "chaos", "3"));
    }
    publisher.join().expect("publisher");
    println!(
        "published {events} events in {:.1}s with {} kills",
        started.elapsed().as_secs_f64(),
        kill_times.len()
    );

    let bases: Vec<String> = members.iter().map(|m| m.url.clone()).collect();
    let runs = finished_runs(&bases, events, Duration::from_secs(600));
    for m in &members {
        keep_logs(m);
    }
    // Exactly one run per firing, across the members (each run is in the store of the member
    // that acted on its firing).
    let mut keys: HashMap<String, usize> = HashMap::new();
    for (_, run) in &runs {
        *keys
            .entry(
                run["idempotency_key"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
            .or_default() += 1;
    }
    let doubled: Vec<_> = keys.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "firings with two runs: {doubled:?}");
    assert_eq!(runs.len(), events, "one run per firing");
    // None launched twice; every Completed run launched once; the others Crashed with
    // their process gone (a kill -9 took the process with the member).
    let mut launched: HashMap<String, usize> = HashMap::new();
    for p in launches(&out) {
        *launched
            .entry(p["event"].as_str().unwrap_or_default().to_owned())
            .or_default() += 1;
    }
    let repeated: Vec<_> = launched.iter().filter(|(_, n)| **n > 1).collect();
    assert!(repeated.is_empty(), "launched more than once: {repeated:?}");
    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut per_member = [0usize; 3];
    for (i, run) in &runs {
        per_member[*i] += 1;
        let state = run["state"].as_str().unwrap_or_default().to_owned();
        *by_state.entry(state.clone()).or_default() += 1;
        let event = run["parameters"]["event"].as_str().unwrap_or_default();
        match state.as_str() {
            "Completed" => assert_eq!(launched.get(event), Some(&1), "run {} ran once", run["id"]),
            "Crashed" => {
                assert!(
                    run["message"]
                        .as_str()
                        .unwrap_or_default()
                        .contains("start marker"),
                    "a crash says how we know: {}",
                    run["message"]
                );
                assert!(
                    running_at_a_kill(run, *i, &kill_times),
                    "run {} crashed but was not Running on member {i} when it was killed ({kill_times:?}): {}",
                    run["id"],
                    run["history"]
                );
            }
            other => panic!("run {} ended {other}: {}", run["id"], run["message"]),
        }
    }
    let (ticks, triggered) = runtime().block_on(async {
        (
            subject_count(&urls, "events.test.tick").await,
            subject_count(&urls, "events.prefect.automation.triggered").await,
        )
    });
    let mut takeovers = takeovers.lock().expect("lock").clone();
    takeovers.sort_unstable();
    println!(
        "{events} events: {ticks} in the stream, {triggered} automation.triggered, {} runs (per member {per_member:?}), {} launched, by state {by_state:?}; first firing after a takeover: median {:?} ms, max {:?} ms over {} takeovers",
        runs.len(),
        launched.len(),
        takeovers.get(takeovers.len() / 2),
        takeovers.last(),
        takeovers.len()
    );
    assert_eq!(
        ticks, events as u64,
        "every event stored once in the stream"
    );
    assert_eq!(
        triggered, events as u64,
        "one automation.triggered per firing"
    );
}
