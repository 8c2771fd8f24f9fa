//! Bytes per live bucket: `cargo bench -p spur-matcher --bench memory`.
//!
//! A counting global allocator measures the heap growth while 100 000 events with distinct
//! `for_each` keys each open one bucket; the report prints bytes per bucket, and separately the
//! size of the events the buckets keep alive (shared with the rest of the system).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicIsize, Ordering};

use chrono::{DateTime, TimeDelta, Utc};
use serde_json::json;
use spur_core::trigger::Dialect;
use spur_core::{Automation, Event, EventLimits, Problems};
use spur_matcher::{Engine, EngineConfig};

/// Counts live heap bytes so the memory report can measure buckets.
struct CountingAllocator;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(
            new_size as isize - layout.size() as isize,
            Ordering::Relaxed,
        );
        // SAFETY: forwarded unchanged to the system allocator.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: CountingAllocator = CountingAllocator;

fn parse(value: serde_json::Value) -> Arc<Automation> {
    let mut problems = Problems::new();
    Arc::new(
        Automation::parse(&value, Dialect::Server, &mut problems)
            .expect("bench automations are valid"),
    )
}

/// Bytes per live bucket: 100 000 distinct `for_each` keys, one bucket each.
fn memory_report() {
    let start: DateTime<Utc> = "2024-01-01T00:00:00Z".parse().expect("valid time");
    let mut engine = Engine::new(EngineConfig {
        dedupe_window: Some(TimeDelta::zero()),
        dedupe_capacity: Some(0),
        ..EngineConfig::default()
    });
    engine.load(vec![parse(json!({
        "name": "buckets",
        "trigger": {"type": "event", "posture": "Reactive", "expect": ["login.failed"],
                    "for_each": ["prefect.resource.id"], "threshold": 1000, "within": 3600},
        "actions": [{"type": "do-nothing"}]
    }))]);
    const N: usize = 100_000;
    let limits = EventLimits::default();
    let before_events = LIVE_BYTES.load(Ordering::Relaxed);
    let events: Vec<Arc<Event>> = (0..N)
        .map(|n| {
            let occurred = start + TimeDelta::milliseconds(n as i64);
            let value = json!({"id": uuid::Uuid::from_u128(n as u128 + 1).to_string(), "event": "login.failed",
                               "occurred": spur_core::time::format_timestamp(occurred),
                               "resource": {"prefect.resource.id": format!("user.{n:08}")}});
            Arc::new(Event::from_json(&value, occurred, &limits).expect("valid event"))
        })
        .collect();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let per_event = (before - before_events) as f64 / N as f64;
    for e in &events {
        let now = e.occurred;
        engine.handle(e.clone(), now);
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let buckets = engine.stats().buckets;
    assert_eq!(buckets, N, "every key holds one bucket");
    let per_bucket = (after - before) as f64 / buckets as f64;
    println!(
        "memory: {buckets} live buckets: {per_bucket:.0} bytes per bucket (key, window, count, \
         hash-map slot, dedupe memory); each also keeps its last event alive ({per_event:.0} bytes \
         per event here, shared with the event log)"
    );
    drop(events);
    drop(engine);
}

/// Keys a firing by its event's resource id: what `key: "{{ event.resource.id }}"` renders
/// to, without the template engine (the matcher does not depend on it), so the figure is the
/// flow stage's own memory.
#[derive(Debug)]
struct ResourceKey;

impl spur_matcher::FlowKeys for ResourceKey {
    fn render(&self, _template: &str, firing: &spur_matcher::Firing) -> Result<String, String> {
        Ok(firing
            .event
            .as_ref()
            .map(|e| e.resource.id().to_owned())
            .unwrap_or_default())
    }
}

/// Bytes per live flow-control key: 100 000 firings with distinct keys, each opening one
/// debounce (or one throttle window), measured like the buckets above.
fn flow_memory_report(setting: &str, flow: serde_json::Value) {
    let start: DateTime<Utc> = "2024-01-01T00:00:00Z".parse().expect("valid time");
    let mut engine = Engine::new(EngineConfig {
        dedupe_window: Some(TimeDelta::zero()),
        dedupe_capacity: Some(0),
        ..EngineConfig::default()
    });
    engine.set_flow_keys(Arc::new(ResourceKey));
    let mut automation = json!({
        "name": "flow",
        "trigger": {"type": "event", "posture": "Reactive", "expect": ["job.failed"],
                    "threshold": 1, "within": 0},
        "actions": [{"type": "do-nothing"}]
    });
    if let (Some(map), Some(flow)) = (automation.as_object_mut(), flow.as_object()) {
        map.extend(flow.clone());
    }
    engine.load(vec![parse(automation)]);
    const N: usize = 100_000;
    let limits = EventLimits::default();
    let events: Vec<Arc<Event>> = (0..N)
        .map(|n| {
            let occurred = start + TimeDelta::milliseconds(n as i64);
            let value = json!({"id": uuid::Uuid::from_u128(n as u128 + 1).to_string(), "event": "job.failed",
                               "occurred": spur_core::time::format_timestamp(occurred),
                               "resource": {"prefect.resource.id": format!("job.{n:08}")}});
            Arc::new(Event::from_json(&value, occurred, &limits).expect("valid event"))
        })
        .collect();
    // One firing first, so the trigger's own (single) bucket is not counted per key.
    let mut handed_on = engine.handle(events[0].clone(), events[0].occurred).len();
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    for e in &events[1..] {
        handed_on += engine.handle(e.clone(), e.occurred).len();
    }
    let after = LIVE_BYTES.load(Ordering::Relaxed);
    let keys = N - 1;
    let waiting = engine.flow_waiting();
    let per_key = (after - before) as f64 / keys as f64;
    println!(
        "memory: {setting}: {per_key:.0} bytes per live key ({keys} keys, {waiting} firings \
         waiting, {handed_on} handed on; the events are shared with the event log and not counted)"
    );
    drop(events);
    drop(engine);
}

/// Bytes per loaded automation, for the shape issue #23 measures (reactive, one event name, a
/// resource filter, `do-nothing`): first the validated [`Automation`] itself, then what the
/// engine adds when it loads them (its name index, per-automation state).
/// Bytes per automation of issue 23's shape (reactive, one event name, one resource filter,
/// `do-nothing`), parsed and then loaded into the engine. `name` gives automation `n` its
/// event name: one name for all (their compiled names are shared) or one each.
fn automation_memory_report(label: &str, name: impl Fn(usize) -> String) {
    const N: usize = 100_000;
    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let values: Vec<serde_json::Value> = (0..N)
        .map(|n| {
            json!({"name": format!("tenant-{n}"),
                   "trigger": {"type": "event", "posture": "Reactive", "expect": [name(n)],
                               "match": {"prefect.resource.id": format!("tenant.{n}")},
                               "threshold": 1, "within": 0},
                   "actions": [{"type": "do-nothing"}]})
        })
        .collect();
    let as_json = LIVE_BYTES.load(Ordering::Relaxed) - before;
    let automations: Vec<Arc<Automation>> = values.into_iter().map(parse).collect();
    let parsed = LIVE_BYTES.load(Ordering::Relaxed);
    let mut engine = Engine::new(EngineConfig::default());
    engine.load(automations);
    let loaded = LIVE_BYTES.load(Ordering::Relaxed);
    // `parse` consumed the JSON values, so `parsed - before` is the automations alone.
    println!(
        "memory: {N} automations ({label}): {:.0} bytes per parsed automation ({:.0} as JSON), \
         {:.0} more per automation once loaded into the engine",
        (parsed - before) as f64 / N as f64,
        as_json as f64 / N as f64,
        (loaded - parsed) as f64 / N as f64,
    );
    drop(engine);
}

fn main() {
    automation_memory_report("one event name", |_| "order.failed".to_owned());
    automation_memory_report("an event name each", |n| format!("tenant.{n}.job.failed"));
    memory_report();
    flow_memory_report(
        "debounce",
        json!({"debounce": {"key": "k", "period": "1h"}}),
    );
    flow_memory_report(
        "throttle",
        json!({"throttle": {"key": "k", "limit": 10, "per": "1h"}}),
    );
}
