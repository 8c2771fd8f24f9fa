//! End-to-end load driver: NATS JetStream → Spur's pipeline → firings, against the raw
//! JetStream consume rate of the same nats-server in the same run.
//!
//! `NATS_SERVER_BIN=… cargo bench -p spur-daemon --bench nats_e2e`
//! (`scripts/provision.sh` installs nats-server; `SPUR_LOAD_EVENTS` sets the event count,
//! default 100 000.) Everything runs on loopback with a temp store, and stops by itself.
//!
//! 1. **Raw**: N events published to a scratch stream, then consumed by a durable pull
//!    consumer with one ack per message — the ceiling for any JetStream consumer here —
//!    before and again after Spur's run (the baseline is their mean), and once with one ack
//!    per batch (`AckPolicy::All`, as Spur acknowledges).
//! 2. **Spur throughput**: N events pre-published to Spur's stream; an in-process daemon with
//!    1 000 automations (10 % of events fire one) consumes them; timed until every event is
//!    durable in the log and evaluated.
//! 3. **Latency at half load**: the same mix published at half the measured Spur rate; for the
//!    events that fire, the latency from publish to the firing being recorded (committed).
//!    `SPUR_LATENCY_LOADS=0.1,0.25,0.5` measures one round per fraction of the rate instead;
//!    `SPUR_LATENCY_LOADS=none` none.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use serde_json::json;
use spur_daemon::{Daemon, DaemonConfig};
use spur_ingest::nats::NatsConfig;

// The same allocator as the `spur` binary, so the driver measures what users run.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct NatsServer(Child);

impl Drop for NatsServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_nats(bin: &Path, dir: &Path) -> (NatsServer, String) {
    let ports = dir.join("ports");
    std::fs::create_dir_all(&ports).expect("ports dir");
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", "-1", "-js", "-sd"])
        .arg(dir.join("js"))
        .arg("--ports_file_dir")
        .arg(&ports)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("nats-server starts");
    let file = ports.join(format!("nats-server_{}.ports", child.id()));
    let server = NatsServer(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(text) = std::fs::read_to_string(&file)
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            && let Some(url) = v["nats"][0].as_str()
        {
            return (server, url.to_owned());
        }
        assert!(Instant::now() < deadline, "nats-server did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Event `n`'s id: random-looking like Prefect's (`uuid4`), yet known to the driver.
/// Sequential ids would flatter the store, whose id index then only ever grows at one end.
fn event_id(n: usize) -> uuid::Uuid {
    let mixed = (n as u128 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
    uuid::Builder::from_random_bytes(mixed.to_le_bytes()).into_uuid()
}

fn event_json(n: usize, name: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": event_id(n).to_string(),
        "event": name,
        "resource": {"prefect.resource.id": format!("load.resource.{}", n % 100)},
        "payload": {"n": n},
    }))
    .expect("serializes")
}

fn name_for(n: usize) -> String {
    if n.is_multiple_of(10) {
        "load.hit".to_owned()
    } else {
        format!("load.noise.{}", n % 1000)
    }
}

/// Publishes with up to 4 096 acks in flight, waiting for every ack.
async fn publish_all(js: &jetstream::Context, messages: impl Iterator<Item = (String, Vec<u8>)>) {
    let mut in_flight = FuturesUnordered::new();
    for (subject, body) in messages {
        let ack = js.publish(subject, body.into()).await.expect("publish");
        in_flight.push(ack.into_future());
        if in_flight.len() >= 4096 {
            in_flight.next().await.expect("ack").expect("ack ok");
        }
    }
    while let Some(ack) = in_flight.next().await {
        ack.expect("ack ok");
    }
}

fn write_automations(dir: &Path) {
    std::fs::create_dir_all(dir).expect("automations dir");
    let mut text = String::from("automations:\n");
    for i in 0..1000 {
        text.push_str(&format!(
            "  - name: other-{i}\n    trigger: {{type: event, posture: Reactive, expect: [\"app{i}.job.done\"], match: {{prefect.resource.id: \"app{i}.*\"}}}}\n    actions: [{{type: do-nothing}}]\n"
        ));
    }
    text.push_str("  - name: hits\n    trigger: {type: event, posture: Reactive, expect: [load.hit]}\n    actions: [{type: do-nothing}]\n");
    text.push_str("  - name: latency\n    trigger: {type: event, posture: Reactive, expect: [load.latency]}\n    actions: [{type: do-nothing}]\n");
    std::fs::write(dir.join("load.yaml"), text).expect("write automations");
}

/// How a raw consumer acknowledges.
#[derive(Clone, Copy)]
enum RawAcks {
    /// `AckPolicy::Explicit`, one ack per message: the conventional at-least-once consumer.
    EachMessage,
    /// `AckPolicy::All`, one ack per ready batch (as Spur acknowledges).
    LastOfBatch,
}

/// A new durable pull consumer `name` of `stream`, as ready batches of up to 1 000 messages
/// (pulled 1 000 at a time, as Spur does).
async fn pull_batches(
    stream: &jetstream::stream::Stream,
    name: &str,
    ack_policy: jetstream::consumer::AckPolicy,
) -> futures_util::stream::BoxStream<
    'static,
    Vec<Result<jetstream::Message, jetstream::consumer::pull::MessagesError>>,
> {
    let consumer: jetstream::consumer::PullConsumer = stream
        .get_or_create_consumer(
            name,
            jetstream::consumer::pull::Config {
                durable_name: Some(name.into()),
                ack_policy,
                max_ack_pending: 200_000,
                ..Default::default()
            },
        )
        .await
        .expect("consumer");
    consumer
        .stream()
        .max_messages_per_batch(1000)
        .messages()
        .await
        .expect("messages")
        .ready_chunks(1000)
        .boxed()
}

/// The rate at which a new durable pull consumer `name` (pulling up to 1 000 messages at a
/// time, as Spur does) consumes and acknowledges the `n` messages of `stream`, doing nothing
/// else: the ceiling for any JetStream consumer on this server.
async fn raw_rate(stream: &jetstream::stream::Stream, name: &str, n: usize, acks: RawAcks) -> f64 {
    let ack_policy = match acks {
        RawAcks::EachMessage => jetstream::consumer::AckPolicy::Explicit,
        RawAcks::LastOfBatch => jetstream::consumer::AckPolicy::All,
    };
    let mut batches = pull_batches(stream, name, ack_policy).await;
    // Timed from here: setting up the consumer is not consuming (nor is it in Spur's time).
    let started = Instant::now();
    let mut seen = 0;
    while seen < n {
        let mut batch = batches.next().await.expect("batch");
        seen += batch.len();
        match acks {
            RawAcks::EachMessage => {
                for message in batch {
                    message.expect("message ok").ack().await.expect("ack");
                }
            }
            RawAcks::LastOfBatch => {
                let last = batch
                    .pop()
                    .expect("a batch has messages")
                    .expect("message ok");
                last.ack().await.expect("ack");
            }
        }
    }
    n as f64 / started.elapsed().as_secs_f64()
}

/// Publishes `total` messages (`message(i)` gives subject and body) at `rate` per second,
/// in 1 ms ticks, over core NATS; returns when every tenth message (`i % 10 == 0`, the
/// timed ones) was published, in order.
async fn publish_paced(
    client: &async_nats::Client,
    rate: f64,
    total: usize,
    message: impl Fn(usize) -> (String, Vec<u8>),
) -> Vec<(Instant, SystemTime)> {
    let mut sent = Vec::with_capacity(total / 10 + 1);
    let per_tick = (rate / 1000.0).max(1.0);
    let mut ticker = tokio::time::interval(Duration::from_millis(1));
    let mut budget = 0.0;
    let mut next = 0usize;
    while next < total {
        ticker.tick().await;
        budget += per_tick;
        while budget >= 1.0 && next < total {
            budget -= 1.0;
            let (subject, body) = message(next);
            if next.is_multiple_of(10) {
                sent.push((Instant::now(), SystemTime::now()));
            }
            client.publish(subject, body.into()).await.expect("publish");
            next += 1;
        }
    }
    client.flush().await.expect("flush");
    sent
}

/// The machine's own latency floor at `rate`: the same messages, paced the same way, into a
/// stream of their own, received by a durable pull consumer that does nothing but take them
/// (acknowledging the last of each ready batch, as Spur does). Returns the publish → receipt
/// times of every tenth message, sorted.
async fn raw_latency(
    js: &jetstream::Context,
    client: &async_nats::Client,
    round: usize,
    rate: f64,
    total: usize,
) -> Vec<Duration> {
    let prefix = format!("rawlat{round}");
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: prefix.clone(),
            subjects: vec![format!("{prefix}.>")],
            ..Default::default()
        })
        .await
        .expect("raw latency stream");
    let mut batches = pull_batches(&stream, "raw", jetstream::consumer::AckPolicy::All).await;
    let receiver = tokio::spawn(async move {
        // Receipt time of each timed message, by its index / 10.
        let mut received = vec![None; total / 10 + 1];
        let mut seen = 0;
        while seen < total {
            let Ok(Some(mut batch)) =
                tokio::time::timeout(Duration::from_secs(30), batches.next()).await
            else {
                break;
            };
            let now = Instant::now();
            seen += batch.len();
            for message in batch.iter().flatten() {
                let index = message
                    .subject
                    .rsplit('.')
                    .next()
                    .and_then(|i| i.parse::<usize>().ok());
                if let Some(index) = index.filter(|i| i.is_multiple_of(10)) {
                    received[index / 10] = Some(now);
                }
            }
            if let Some(Ok(last)) = batch.pop() {
                last.ack().await.expect("ack");
            }
        }
        received
    });
    let sent = publish_paced(client, rate, total, |i| {
        let name = if i.is_multiple_of(10) {
            "load.latency".to_owned()
        } else {
            format!("load.noise.{}", i % 1000)
        };
        (format!("{prefix}.{i}"), event_json(i, &name))
    })
    .await;
    let received = receiver.await.expect("raw receiver");
    let mut latencies: Vec<Duration> = sent
        .iter()
        .zip(&received)
        .filter_map(|((at, _), got)| got.map(|got| got.saturating_duration_since(*at)))
        .collect();
    latencies.sort();
    latencies
}

/// CPU seconds used so far, per thread name of this process plus `nats-server` (Linux
/// `/proc`; empty elsewhere). Differences between two readings attribute a phase's work.
fn cpu_seconds(nats_pid: u32) -> HashMap<String, f64> {
    // Clock ticks per second: 100 on every Linux this runs on (`getconf CLK_TCK`).
    const TICKS: f64 = 100.0;
    fn ticks(stat: &str) -> Option<(String, f64)> {
        let open = stat.find('(')?;
        let close = stat.rfind(')')?;
        let name = stat[open + 1..close].to_owned();
        let fields: Vec<&str> = stat[close + 2..].split(' ').collect();
        let user: f64 = fields.get(11)?.parse().ok()?;
        let system: f64 = fields.get(12)?.parse().ok()?;
        Some((name, (user + system) / TICKS))
    }
    let mut out = HashMap::new();
    if let Ok(tasks) = std::fs::read_dir("/proc/self/task") {
        for task in tasks.flatten() {
            if let Ok(stat) = std::fs::read_to_string(task.path().join("stat"))
                && let Some((name, seconds)) = ticks(&stat)
            {
                let name = if name.starts_with("tokio-rt") {
                    "tokio workers".to_owned()
                } else {
                    name
                };
                *out.entry(name).or_insert(0.0) += seconds;
            }
        }
    }
    if let Ok(stat) = std::fs::read_to_string(format!("/proc/{nats_pid}/stat"))
        && let Some((_, seconds)) = ticks(&stat)
    {
        out.insert("nats-server".to_owned(), seconds);
    }
    out
}

/// CPU seconds per thread between two readings, largest first (threads that used none left
/// out).
fn cpu_between(before: &HashMap<String, f64>, after: &HashMap<String, f64>) -> Vec<(String, f64)> {
    let mut rows: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0.0)))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    rows.sort_by(|a, b| b.1.total_cmp(&a.1));
    rows
}

/// Prints where CPU went between two readings, per event.
fn print_cpu(
    phase: &str,
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    events: usize,
) {
    let rows = cpu_between(before, after);
    let total: f64 = rows.iter().map(|(_, v)| v).sum();
    let parts: Vec<String> = rows
        .iter()
        .map(|(k, v)| format!("{k} {:.1} µs", v * 1e6 / events as f64))
        .collect();
    println!(
        "| CPU per event, {phase} | {:.1} µs: {} |",
        total * 1e6 / events as f64,
        parts.join(", ")
    );
}

/// Bytes this process has handed to `write` calls so far (`wchar` in `/proc/self/io`; 0
/// elsewhere). Nearly all of it is the store's pages: the driver and the daemon write
/// little else.
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|io| {
            io.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Cores kept busy between two readings over `wall`: in all, and the three largest users.
fn cores_busy(
    before: &HashMap<String, f64>,
    after: &HashMap<String, f64>,
    wall: Duration,
) -> String {
    let wall = wall.as_secs_f64().max(1e-9);
    let rows = cpu_between(before, after);
    let total: f64 = rows.iter().map(|(_, v)| v / wall).sum();
    let parts: Vec<String> = rows
        .iter()
        .take(3)
        .map(|(k, v)| format!("{k} {:.2}", v / wall))
        .collect();
    format!("{total:.2} cores busy ({})", parts.join(", "))
}

/// Where the time went, per timed event: publish → `received` (NATS, the consumer, parsing:
/// the intake stamps `received`) and `received` → firing committed (the pipeline's queue,
/// evaluation, the commit). Read from the stopped daemon's store; wall clocks, so
/// approximate to the clock's steps.
fn split_by_stage(store: &Path, walls: &[(String, SystemTime, SystemTime)]) -> String {
    let store = match spur_store::Store::open(store) {
        Ok(store) => store,
        Err(e) => return format!("no split: {e}"),
    };
    let mut intake = Vec::with_capacity(walls.len());
    let mut pipeline = Vec::with_capacity(walls.len());
    for (id, sent, fired) in walls {
        let Some(event) = id
            .parse()
            .ok()
            .and_then(|id| store.get_event(id).ok().flatten())
        else {
            continue;
        };
        let received = SystemTime::from(event.received);
        intake.push(received.duration_since(*sent).unwrap_or_default());
        pipeline.push(fired.duration_since(received).unwrap_or_default());
    }
    intake.sort();
    pipeline.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "publish → received p50 {:.2} / p99 {:.2} ms, received → firing p50 {:.2} / p99 {:.2} ms",
        ms(percentile(&intake, 0.5)),
        ms(percentile(&intake, 0.99)),
        ms(percentile(&pipeline, 0.5)),
        ms(percentile(&pipeline, 0.99))
    )
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn main() {
    let Ok(bin) = std::env::var("NATS_SERVER_BIN") else {
        eprintln!(
            "nats_e2e: set NATS_SERVER_BIN (scripts/provision.sh installs nats-server); nothing measured"
        );
        return;
    };
    let n: usize = std::env::var("SPUR_LOAD_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let (server, url) = start_nats(Path::new(&bin), &dir.path().join("nats"));
    let nats_pid = server.0.id();
    // As `spur serve` does; after nats-server is spawned, which keeps the system default.
    let _ = spur_daemon::process::disable_transparent_huge_pages();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let client = async_nats::connect(&url).await.expect("connects");
        let js = jetstream::new(client.clone());

        // 1. Raw JetStream consume rate.
        let raw = js
            .get_or_create_stream(jetstream::stream::Config {
                name: "RAW".into(),
                subjects: vec!["raw.>".into()],
                ..Default::default()
            })
            .await
            .expect("raw stream");
        publish_all(&js, (0..n).map(|i| (format!("raw.{}", name_for(i)), event_json(i, &name_for(i))))).await;
        let cpu_before_raw = cpu_seconds(nats_pid);
        let raw_before = raw_rate(&raw, "raw", n, RawAcks::EachMessage).await;
        let cpu_after_raw = cpu_seconds(nats_pid);
        // 1b. The same, acknowledging like Spur does.
        let raw_all_rate = raw_rate(&raw, "raw_all", n, RawAcks::LastOfBatch).await;

        // 2. Spur throughput over a pre-filled stream.
        let nats = NatsConfig::new(url.clone());
        js.get_or_create_stream(jetstream::stream::Config {
            name: nats.stream.clone(),
            subjects: nats.subjects.clone(),
            max_age: nats.max_age,
            duplicate_window: Duration::from_secs(120),
            ..Default::default()
        })
        .await
        .expect("spur stream");
        publish_all(&js, (0..n).map(|i| (format!("events.{}", name_for(i)), event_json(i, &name_for(i))))).await;
        let automations = dir.path().join("automations");
        write_automations(&automations);
        let config = DaemonConfig {
            http: "127.0.0.1:0".parse().expect("addr"),
            automations,
            data: dir.path().join("data"),
            nats: Some(nats),
            ..DaemonConfig::default()
        };
        let cpu_before_spur = cpu_seconds(nats_pid);
        let daemon = Daemon::start(config).await.expect("daemon starts");
        let deadline = Instant::now() + Duration::from_secs(600);
        // Count the stream's events only: the feedback events firings emit (automation and
        // action events, which also pass through the log) are extra work, not progress.
        let delivered = || daemon.metrics().nats.delivered.load(Ordering::Relaxed) as usize;
        // Timed from the first durable batch (start-up, loading 1 001 automations and
        // attaching the consumer, is not event throughput) to the last event.
        let (started, first) = loop {
            let now = delivered();
            if now > 0 {
                break (Instant::now(), now);
            }
            assert!(Instant::now() < deadline, "Spur did not start consuming in time");
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        while delivered() < n {
            assert!(Instant::now() < deadline, "Spur did not consume the stream in time");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let spur_rate = (n - first) as f64 / started.elapsed().as_secs_f64();
        let cpu_after_spur = cpu_seconds(nats_pid);
        let fired = daemon.metrics().triggered.load(Ordering::Relaxed);
        // The raw rate again, right after: this shared machine drifts between phases, so the
        // baseline is the mean of the two measurements around Spur's.
        let raw_after = raw_rate(&raw, "raw_again", n, RawAcks::EachMessage).await;
        let baseline = (raw_before + raw_after) / 2.0;

        // 3. Latency at a fraction of the measured rate: half by default (the target's load);
        // `SPUR_LATENCY_LOADS=0.1,0.25,0.5` runs one round per fraction, lightest first.
        // `SPUR_LATENCY_LOADS=none` skips them (e.g. to profile the throughput run alone).
        let loads: Vec<f64> = std::env::var("SPUR_LATENCY_LOADS")
            .ok()
            .filter(|v| v != "none")
            .map(|v| v.split(',').filter_map(|f| f.trim().parse().ok()).filter(|f: &f64| *f > 0.0 && *f <= 1.0).collect())
            .filter(|v: &Vec<f64>| !v.is_empty())
            .unwrap_or_else(|| {
                if std::env::var("SPUR_LATENCY_LOADS").is_ok_and(|v| v == "none") {
                    Vec::new()
                } else {
                    vec![0.5]
                }
            });
        let mut latency_rounds = Vec::new();
        for (round, load) in loads.iter().enumerate() {
            let rate = (spur_rate * load).max(100.0);
            // The same mix as the throughput run: one event in ten fires; latency is measured on those.
            // Five seconds of load. (Capped at 100 000 events until session 6, which cut the
            // half-load round to ~2 s: one ~100 ms stall then was the whole p99.)
            let total = ((rate * 5.0) as usize).clamp(1000, 500_000);
            // First the floor: a do-nothing consumer of the same load on this machine.
            let raw = raw_latency(&js, &client, round, rate, total).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            // CPU in use during the round (all threads of this process, plus nats-server),
            // to tell a saturated machine from a slow path.
            let cpu_before_round = cpu_seconds(nats_pid);
            let round_started = Instant::now();
            // CLOCK_MONOTONIC, as `perf record -k CLOCK_MONOTONIC` stamps samples: pass
            // `--time start,end` to `perf report` to see this round alone.
            eprintln!("latency round at {load}: starts at {round_started:?}");
            let batches_before = daemon.metrics().batches.load(Ordering::Relaxed);
            let slow_commits_before = daemon.metrics().commit.count_over(0.01).unwrap_or(0);
            let written_before = bytes_written();
            let batch_events_before = daemon.metrics().batch_events.load(Ordering::Relaxed);
            let firing_total = total / 10;
            let mut firings = daemon.subscribe_firings();
            let collector = tokio::spawn(async move {
                // (monotonic, wall clock): the wall clock is compared with `received` later.
                let mut arrived: HashMap<String, (Instant, SystemTime)> = HashMap::new();
                while arrived.len() < firing_total {
                    match tokio::time::timeout(Duration::from_secs(30), firings.recv()).await {
                        Ok(Ok(record)) => {
                            if record["automation"] == "latency"
                                && let Some(id) = record["event"].as_str()
                            {
                                arrived.insert(id.to_owned(), (Instant::now(), SystemTime::now()));
                            }
                        }
                        Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => continue,
                        _ => break,
                    }
                }
                arrived
            });
            let base = 10_000_000usize * (round + 1);
            let published = publish_paced(&client, rate, total, |next| {
                let name = if next.is_multiple_of(10) { "load.latency".to_owned() } else { format!("load.noise.{}", next % 1000) };
                (format!("events.{name}"), event_json(base + next, &name))
            })
            .await;
            let sent: HashMap<String, (Instant, SystemTime)> = published
                .into_iter()
                .enumerate()
                .map(|(k, at)| (event_id(base + 10 * k).to_string(), at))
                .collect();
            let arrived = collector.await.expect("collector");
            let mut latencies: Vec<Duration> = arrived
                .iter()
                .filter_map(|(id, at)| sent.get(id).map(|s| at.0.saturating_duration_since(s.0)))
                .collect();
            // For the split by stage, read after the daemon stops (each event's `received`).
            let walls: Vec<(String, SystemTime, SystemTime)> = arrived
                .iter()
                .filter_map(|(id, at)| sent.get(id).map(|s| (id.clone(), s.1, at.1)))
                .collect();
            latencies.sort();
            {
                // When the slowest firings were published (seconds into the round): one
                // stall, or spread out?
                let mut slowest: Vec<(Duration, Duration)> = arrived
                    .iter()
                    .filter_map(|(id, at)| {
                        sent.get(id).map(|s| (at.0.saturating_duration_since(s.0), s.0.saturating_duration_since(round_started)))
                    })
                    .collect();
                slowest.sort_by(|a, b| b.cmp(a));
                let list: Vec<String> = slowest
                    .iter()
                    .take(10)
                    .map(|(l, at)| format!("{:.1} ms at {:.3} s", l.as_secs_f64() * 1e3, at.as_secs_f64()))
                    .collect();
                eprintln!("latency round at {load}: slowest firings: {}", list.join(", "));
            }
            let batches = daemon.metrics().batches.load(Ordering::Relaxed) - batches_before;
            let batch_events = daemon.metrics().batch_events.load(Ordering::Relaxed) - batch_events_before;
            let written = bytes_written().saturating_sub(written_before);
            let slow_commits = daemon.metrics().commit.count_over(0.01).unwrap_or(0) - slow_commits_before;
            let busy = format!(
                "{}; {batches} commits of {:.1} events and {:.1} kB written on average, {slow_commits} of them over 10 ms",
                cores_busy(&cpu_before_round, &cpu_seconds(nats_pid), round_started.elapsed()),
                batch_events as f64 / batches.max(1) as f64,
                written as f64 / 1024.0 / batches.max(1) as f64
            );
            eprintln!("latency round at {load}: ends at {:?}", Instant::now());
            latency_rounds.push((*load, rate, total, latencies, busy, walls, raw));
            // Let the daemon settle (checkpoint, acknowledge) before the next round.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
        let metrics = daemon.metrics().render();
        daemon.shutdown().await;
        let splits: Vec<String> = latency_rounds
            .iter()
            .map(|round| split_by_stage(&dir.path().join("data").join("spur.redb"), &round.5))
            .collect();
        for line in metrics.lines().filter(|l| l.starts_with("spur_commit_seconds") || l.starts_with("spur_batch") || l.starts_with("spur_checkpoint_seconds")) {
            eprintln!("{line}");
        }
        let checkpoint_size = spur_store::Store::open(&dir.path().join("data").join("spur.redb"))
            .ok()
            .and_then(|store| store.load_checkpoint().ok().flatten())
            .and_then(|checkpoint| serde_json::to_vec(&checkpoint).ok())
            .map_or(0, |bytes| bytes.len());

        println!("\n| measurement | result |");
        println!("|---|---|");
        println!("| events | {n} |");
        println!(
            "| raw JetStream consume, one ack per message (baseline: the mean of before and after Spur's run) | {:.0} msg/s ({:.0} before, {:.0} after) |",
            baseline, raw_before, raw_after
        );
        println!("| raw JetStream consume, one ack per batch (`AckPolicy::All`, as Spur) | {:.0} msg/s |", raw_all_rate);
        println!(
            "| Spur: JetStream → log → engine → firings | {:.0} events/s ({:.0} % of the per-message baseline, {:.0} % of the per-batch one) |",
            spur_rate,
            100.0 * spur_rate / baseline,
            100.0 * spur_rate / raw_all_rate
        );
        println!("| firings during the throughput run | {fired} |");
        println!("| the last checkpoint (engine state, JSON) | {:.1} kB |", checkpoint_size as f64 / 1024.0);
        print_cpu("raw", &cpu_before_raw, &cpu_after_raw, n);
        print_cpu("Spur", &cpu_before_spur, &cpu_after_spur, n);
        for ((load, rate, total, latencies, busy, _, raw), split) in latency_rounds.iter().zip(&splits) {
            println!(
                "| latency run at {:.0} % of the Spur rate | {total} events at {:.0} events/s, {} firings timed: event → firing p50 {:.2} ms, p99 {:.2} ms ({split}); {busy}; raw JetStream at the same rate (do-nothing consumer, {} timed): publish → receipt p50 {:.2} ms, p99 {:.2} ms |",
                load * 100.0,
                rate,
                latencies.len(),
                percentile(latencies, 0.50).as_secs_f64() * 1e3,
                percentile(latencies, 0.99).as_secs_f64() * 1e3,
                raw.len(),
                percentile(raw, 0.50).as_secs_f64() * 1e3,
                percentile(raw, 0.99).as_secs_f64() * 1e3
            );
        }
    });
}
