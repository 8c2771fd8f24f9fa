//! Event-log append cost: a load driver for the store alone, not a timed test.
//!
//! `cargo bench -p spur-store --bench append` (`SPUR_APPEND_EVENTS` sets the measured count,
//! default 200 000, after as many again × 2 to fill the log). It appends batches of 200 events
//! the way the pipeline does (one durable commit per batch; one id-index slice merged per
//! 1 024 new ids) into a fresh store, and reports the store's time per event, excluding event
//! parsing and encoding: wall time (with the fsync per batch) and the thread's CPU time (from
//! `/proc/thread-self/schedstat`; steadier, since the disk's wait drops out), and the bytes
//! handed to `write`/`pwrite` per event (`wchar` of `/proc/self/io`: nearly all of it redb's
//! page writes at commit). Two runs in one process:
//!
//! * **sequential ids**: the baseline; the id index only ever grows at its end;
//! * **random ids**, like the `uuid4`s of Prefect's clients: what the two-tier id index and
//!   its filter are for (see the crate docs).

use std::time::{Duration, Instant};

use spur_core::{Event, EventLimits};
use spur_store::{ID_MERGE_STEP, Store};

const BATCH: usize = 200;

fn event(id: uuid::Uuid, n: u64, now: chrono::DateTime<chrono::Utc>) -> Event {
    Event::from_json(
        &serde_json::json!({
            "id": id.to_string(),
            "event": format!("load.noise.{}", n % 1000),
            "resource": {"prefect.resource.id": format!("load.resource.{}", n % 100)},
            "payload": {"n": n},
        }),
        now,
        &EventLimits::default(),
    )
    .expect("valid event")
}

/// This thread's CPU time so far (Linux; zero elsewhere).
fn thread_cpu() -> Duration {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

/// Bytes this process has passed to write calls so far (Linux; zero elsewhere).
fn bytes_written() -> u64 {
    std::fs::read_to_string("/proc/self/io")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("wchar:"))
                .and_then(|v| v.trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Appends `fill` then `measured` events with ids from `id_of`; returns the store's wall and
/// CPU time, and the bytes written, per measured event.
fn run(
    id_of: impl Fn(u64) -> uuid::Uuid,
    fill: usize,
    measured: usize,
) -> (Duration, Duration, u64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(&dir.path().join("append.redb")).expect("opens");
    let now = chrono::Utc::now();
    let mut n = 0u64;
    let (mut wall, mut cpu, mut written) = (Duration::ZERO, Duration::ZERO, 0);
    for batch in 0..(fill + measured) / BATCH {
        let events: Vec<Event> = (0..BATCH)
            .map(|_| {
                n += 1;
                event(id_of(n), n, now)
            })
            .collect();
        let encoded: Vec<Vec<u8>> = events
            .iter()
            .map(|e| serde_json::to_vec(e).expect("encodes"))
            .collect();
        let (started, cpu_started, written_before) =
            (Instant::now(), thread_cpu(), bytes_written());
        let mut writer = store.writer().expect("writer");
        writer.append_encoded(&events, &encoded).expect("append");
        if store.ids_since_merge_step() >= ID_MERGE_STEP {
            writer.merge_recent_slice().expect("merge");
        }
        writer.commit().expect("commit");
        if batch * BATCH >= fill {
            wall += started.elapsed();
            cpu += thread_cpu().saturating_sub(cpu_started);
            written += bytes_written().saturating_sub(written_before);
        }
    }
    (
        wall / measured as u32,
        cpu / measured as u32,
        written / measured as u64,
    )
}

fn main() {
    let measured: usize = std::env::var("SPUR_APPEND_EVENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200_000);
    let fill = measured * 2;
    let sequential = run(|n| uuid::Uuid::from_u128(n as u128), fill, measured);
    let random = run(
        |n| {
            let mixed = (n as u128).wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
            uuid::Builder::from_random_bytes(mixed.to_le_bytes()).into_uuid()
        },
        fill,
        measured,
    );
    println!(
        "\n| ids ({measured} events after {fill}, batches of {BATCH}) | wall per event | CPU per event | written per event |"
    );
    println!("|---|---:|---:|---:|");
    let micros = |d: Duration| d.as_secs_f64() * 1e6;
    println!(
        "| sequential (baseline) | {:.2} µs | {:.2} µs | {} B |",
        micros(sequential.0),
        micros(sequential.1),
        sequential.2
    );
    println!(
        "| random (`uuid4`-like) | {:.2} µs ({:.2}×) | {:.2} µs ({:.2}×) | {} B ({:.2}×) |",
        micros(random.0),
        micros(random.0) / micros(sequential.0),
        micros(random.1),
        micros(random.1) / micros(sequential.1),
        random.2,
        random.2 as f64 / sequential.2.max(1) as f64
    );
}
