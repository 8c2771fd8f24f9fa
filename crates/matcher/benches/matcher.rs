//! Matcher throughput and bucket memory.
//!
//! `cargo bench -p spur-matcher --bench matcher`
//!
//! * `matcher/handle/{1,1000,10000}` — events per second through [`Engine::handle`] with that
//!   many automations: a realistic mix (literal names, trailing and middle wildcards, resource
//!   filters, `for_each` buckets with thresholds and windows), where most events match nothing
//!   and about one in ten matches something. Events are parsed before timing; each carries a
//!   fresh id so de-duplication never short-cuts the work.
//!
//! Bucket memory is measured separately (`--bench memory`), so the counting allocator it
//! needs does not slow these timings.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, TimeDelta, Utc};
use criterion::{BenchmarkId, Criterion, Throughput};
use serde_json::json;
use spur_core::trigger::Dialect;
use spur_core::{Automation, Event, Problems};
use spur_matcher::{Engine, EngineConfig};

fn parse(value: serde_json::Value) -> Arc<Automation> {
    let mut problems = Problems::new();
    Arc::new(
        Automation::parse(&value, Dialect::Server, &mut problems)
            .expect("bench automations are valid"),
    )
}

/// Automation `i` of the realistic mix.
fn automation(i: usize) -> Arc<Automation> {
    let trigger = match i % 20 {
        // 70%: a literal event name, often with a resource filter.
        0..=13 => {
            json!({"type": "event", "posture": "Reactive", "expect": [format!("app{i}.job.completed")],
                         "match": {"prefect.resource.id": format!("app{i}.*")}})
        }
        // 15%: a trailing wildcard.
        14..=16 => {
            json!({"type": "event", "posture": "Reactive", "expect": [format!("team{i}.*")]})
        }
        // 5%: a middle wildcard.
        17 => {
            json!({"type": "event", "posture": "Reactive", "expect": [format!("svc{i}.*.failed")]})
        }
        // 10%: per-resource buckets with a threshold and a window.
        _ => json!({"type": "event", "posture": "Reactive", "expect": [format!("login{i}.failed")],
                    "for_each": ["prefect.resource.id"], "threshold": 3, "within": 60}),
    };
    parse(
        json!({"name": format!("automation-{i}"), "trigger": trigger, "actions": [{"type": "do-nothing"}]}),
    )
}

/// Event `n` of the stream for `automations` automations: 90% noise, 10% hits spread over
/// the automation kinds.
fn event(n: usize, automations: usize, start: DateTime<Utc>) -> Arc<Event> {
    let target = (n / 10) % automations.max(1);
    let (name, resource) = if !n.is_multiple_of(10) {
        (
            format!("noise.{}.tick", n % 1000),
            format!("host.{}", n % 50),
        )
    } else {
        match target % 20 {
            0..=13 => (
                format!("app{target}.job.completed"),
                format!("app{target}.worker"),
            ),
            14..=16 => (format!("team{target}.deploy"), "ci".to_owned()),
            17 => (format!("svc{target}.api.failed"), "svc".to_owned()),
            _ => (format!("login{target}.failed"), format!("user.{}", n % 100)),
        }
    };
    let occurred = start + TimeDelta::milliseconds(n as i64);
    Arc::new(Event {
        id: uuid::Uuid::from_u128(n as u128 + 1),
        occurred,
        event: name,
        resource: spur_core::Resource::with_id(resource),
        related: Vec::new(),
        payload: json!({}),
        follows: None,
        received: occurred,
    })
}

fn engine_with(count: usize) -> Engine {
    let mut engine = Engine::new(EngineConfig::default());
    engine.load((0..count).map(automation).collect());
    engine
}

fn bench_handle(c: &mut Criterion) {
    let start: DateTime<Utc> = "2024-01-01T00:00:00Z".parse().expect("valid time");
    let mut group = c.benchmark_group("matcher/handle");
    group.throughput(Throughput::Elements(1));
    group.measurement_time(Duration::from_secs(5));
    for &count in &[1usize, 1_000, 10_000] {
        let mut engine = engine_with(count);
        let mut next = 0usize;
        group.bench_with_input(BenchmarkId::from_parameter(count), &count, |b, &count| {
            b.iter_custom(|iters| {
                let events: Vec<Arc<Event>> = (0..iters as usize)
                    .map(|k| event(next + k, count, start))
                    .collect();
                next += iters as usize;
                // Events stay alive until the timer stops: freeing them is not the engine's work.
                let began = Instant::now();
                for e in &events {
                    std::hint::black_box(engine.handle(e.clone(), e.occurred));
                }
                let elapsed = began.elapsed();
                drop(events);
                elapsed
            });
        });
    }
    group.finish();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench_handle(&mut criterion);
    criterion.final_summary();
}
