//! Property tests of the matcher on random automations and event streams.
//!
//! * The trigger index never changes what fires: indexed and brute-force evaluation (every
//!   trigger checked for every event) produce identical firings.
//! * Delivering every event twice fires exactly what delivering it once does (dedupe by id).
//! * Firing ids are deterministic: the same stream yields the same ids.

use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use proptest::prelude::*;
use serde_json::{Value, json};
use spur_core::trigger::Dialect;
use spur_core::{Automation, Event, EventLimits, Problems};
use spur_matcher::{Engine, EngineConfig, Firing};
use uuid::Uuid;

const NAMES: &[&str] = &[
    "a.x",
    "a.y",
    "b.x",
    "b.y.z",
    "c",
    "a.",
    "prefect.flow-run.Completed",
];
const PATTERNS: &[&str] = &[
    "a.x",
    "a.y",
    "b.x",
    "c",
    "a.*",
    "*.x",
    "b.*.z",
    "*",
    "a.?",
    "[ab].x",
    "prefect.flow-run.*",
    "b.*",
    "nothing",
];
const RESOURCES: &[&str] = &["r1", "r2", "svc.api", "svc.web"];
const MATCHES: &[&str] = &["r1", "r*", "svc.*", "!r1", "*.api", "?2"];

fn leaf_trigger() -> impl Strategy<Value = Value> {
    (
        prop::collection::vec(prop::sample::select(PATTERNS), 0..3),
        prop::collection::vec(prop::sample::select(PATTERNS), 0..2),
        prop::option::of(prop::sample::select(MATCHES)),
        prop::bool::ANY,
        prop::bool::ANY,
        -1i64..4,
        prop::sample::select(&[0i64, 10, 30, 60][..]),
        prop::bool::ANY,
    )
        .prop_map(
            |(expect, after, match_id, for_each, proactive, threshold, within, env)| {
                let mut t = json!({
                    "type": "event",
                    "expect": expect,
                    "after": after,
                    "posture": if proactive { "Proactive" } else { "Reactive" },
                    "threshold": threshold,
                    "within": if proactive { within.max(10) } else { within },
                });
                if let Some(m) = match_id {
                    t["match"] = json!({"prefect.resource.id": m});
                }
                if for_each {
                    t["for_each"] = json!(["prefect.resource.id"]);
                }
                if env {
                    t["match_related"] =
                        json!({"prefect.resource.role": "env", "prefect.resource.id": "env.prod"});
                }
                t
            },
        )
}

fn trigger() -> impl Strategy<Value = Value> {
    prop_oneof![
        3 => leaf_trigger(),
        1 => (prop::collection::vec(leaf_trigger(), 1..4), prop::bool::ANY, prop::option::of(prop::sample::select(&[5i64, 30, 120][..])))
            .prop_map(|(children, sequence, within)| {
                let n = children.len();
                if sequence {
                    json!({"type": "sequence", "triggers": children, "within": within})
                } else {
                    json!({"type": "compound", "require": if n > 1 { json!(2.min(n)) } else { json!("any") }, "triggers": children, "within": within})
                }
            }),
    ]
}

/// Flow-control settings (`debounce`, `batch`, `throttle`), so the properties hold for the
/// flow stage too. Without a key renderer a key is its template text: one key per automation.
fn flow() -> impl Strategy<Value = Value> {
    let debounce = (1i64..20, prop::option::of(20i64..40), prop::bool::ANY).prop_map(
        |(period, max_wait, last)| {
            json!({"debounce": {"period": period, "max_wait": max_wait, "keep": if last { "last" } else { "first" }}})
        },
    );
    let batch = (1u32..5, 1i64..30)
        .prop_map(|(n, wait)| json!({"batch": {"max_events": n, "max_wait": wait}}));
    let throttle = (1u32..4, 1i64..30, prop::bool::ANY).prop_map(|(limit, per, delay)| {
        json!({"throttle": {"limit": limit, "per": per, "over": if delay { "delay" } else { "drop" }}})
    });
    (
        prop::option::of(prop_oneof![debounce, batch]),
        prop::option::of(throttle),
    )
        .prop_map(|(collapse, throttle)| {
            let mut flow = serde_json::Map::new();
            for part in collapse.into_iter().chain(throttle) {
                if let Value::Object(part) = part {
                    flow.extend(part);
                }
            }
            Value::Object(flow)
        })
}

fn automations() -> impl Strategy<Value = Vec<Arc<Automation>>> {
    prop::collection::vec((trigger(), prop::option::weighted(0.3, flow())), 1..8).prop_map(|triggers| {
        triggers
            .into_iter()
            .enumerate()
            .filter_map(|(i, (trigger, flow))| {
                let mut value = json!({"name": format!("auto-{i}"), "trigger": trigger, "actions": [{"type": "do-nothing"}]});
                if let (Some(Value::Object(flow)), Value::Object(map)) = (flow, &mut value) {
                    map.extend(flow);
                }
                let mut problems = Problems::new();
                Automation::parse(&value, Dialect::Server, &mut problems).map(Arc::new)
            })
            .collect()
    })
}

#[derive(Clone, Debug)]
struct RawEvent {
    name: &'static str,
    resource: &'static str,
    offset: i64,
    env: bool,
    follows_previous: bool,
}

fn events() -> impl Strategy<Value = Vec<RawEvent>> {
    prop::collection::vec(
        (
            prop::sample::select(NAMES),
            prop::sample::select(RESOURCES),
            -5i64..25,
            prop::bool::ANY,
            prop::bool::weighted(0.1),
        )
            .prop_map(|(name, resource, offset, env, follows_previous)| RawEvent {
                name,
                resource,
                offset,
                env,
                follows_previous,
            }),
        1..40,
    )
}

fn build_events(raw: &[RawEvent]) -> Vec<Arc<Event>> {
    let start: DateTime<Utc> = "2024-01-01T00:00:00Z".parse().expect("valid time");
    let mut t = start;
    let mut out: Vec<Arc<Event>> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        t += TimeDelta::seconds(r.offset);
        let related = if r.env {
            json!([{"prefect.resource.id": "env.prod", "prefect.resource.role": "env"}])
        } else {
            json!([])
        };
        let follows = if r.follows_previous && i > 0 {
            // Follow the *next* event's id sometimes, to exercise parking.
            json!(Uuid::from_u128(i as u128 + 1).to_string())
        } else {
            Value::Null
        };
        let value = json!({
            "id": Uuid::from_u128(i as u128).to_string(),
            "occurred": spur_core::time::format_timestamp(t),
            "event": r.name,
            "resource": {"prefect.resource.id": r.resource},
            "related": related,
            "follows": follows,
        });
        let mut event = Event::from_json(&value, t, &EventLimits::default())
            .expect("generated events are valid");
        event.received = event.occurred;
        out.push(Arc::new(event));
    }
    out
}

/// Name, state, time, triggering event, firing id, and what flow control did (count, skipped).
type Observed = Vec<(
    String,
    &'static str,
    DateTime<Utc>,
    Option<Uuid>,
    Uuid,
    Option<(u64, bool)>,
)>;

fn observe(firings: &[Firing]) -> Observed {
    firings
        .iter()
        .map(|f| {
            (
                f.automation.name.clone(),
                f.state.as_str(),
                f.at,
                f.event.as_ref().map(|e| e.id),
                f.id,
                f.flow.as_ref().map(|s| (s.count, s.skipped.is_some())),
            )
        })
        .collect()
}

fn run(
    automations: &[Arc<Automation>],
    events: &[Arc<Event>],
    use_index: bool,
    twice: bool,
) -> Observed {
    let mut engine = Engine::new(EngineConfig {
        use_index,
        dedupe_window: None,
        dedupe_capacity: None,
        ..EngineConfig::default()
    });
    engine.load(automations.to_vec());
    let mut clock: Option<DateTime<Utc>> = None;
    let mut out = Vec::new();
    for event in events {
        let now = clock.map_or(event.occurred, |c| c.max(event.occurred));
        clock = Some(now);
        out.extend(engine.handle(event.clone(), now));
        if twice {
            out.extend(engine.handle(event.clone(), now));
        }
    }
    if let Some(c) = clock {
        out.extend(engine.advance_to(c + TimeDelta::minutes(20)));
    }
    observe(&out)
}

/// Runs the stream, but stops after `split` events, checkpoints through JSON text, restores
/// into a fresh engine and carries on: what a daemon restart does.
fn run_with_restart(
    automations: &[Arc<Automation>],
    events: &[Arc<Event>],
    split: usize,
) -> Observed {
    let config = EngineConfig {
        dedupe_window: None,
        dedupe_capacity: None,
        ..EngineConfig::default()
    };
    let mut engine = Engine::new(config.clone());
    engine.load(automations.to_vec());
    let mut clock: Option<DateTime<Utc>> = None;
    let mut out = Vec::new();
    for (i, event) in events.iter().enumerate() {
        if i == split {
            let text = serde_json::to_string(&engine.snapshot()).expect("snapshot serializes");
            let snapshot: spur_matcher::EngineSnapshot =
                serde_json::from_str(&text).expect("snapshot parses");
            engine = Engine::new(config.clone());
            engine.load(automations.to_vec());
            engine.restore(&snapshot);
        }
        let now = clock.map_or(event.occurred, |c| c.max(event.occurred));
        clock = Some(now);
        out.extend(engine.handle(event.clone(), now));
    }
    if let Some(c) = clock {
        out.extend(engine.advance_to(c + TimeDelta::minutes(20)));
    }
    observe(&out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn index_never_changes_what_fires(automations in automations(), raw in events()) {
        let events = build_events(&raw);
        let indexed = run(&automations, &events, true, false);
        let brute = run(&automations, &events, false, false);
        prop_assert_eq!(indexed, brute);
    }

    #[test]
    fn duplicate_delivery_fires_nothing_extra(automations in automations(), raw in events()) {
        let events = build_events(&raw);
        prop_assert_eq!(run(&automations, &events, true, false), run(&automations, &events, true, true));
    }

    #[test]
    fn a_checkpoint_and_restore_changes_nothing(automations in automations(), raw in events(), split in 0usize..40) {
        let events = build_events(&raw);
        let split = split.min(events.len());
        prop_assert_eq!(run(&automations, &events, true, false), run_with_restart(&automations, &events, split));
    }

    #[test]
    fn replaying_a_stream_is_deterministic(automations in automations(), raw in events()) {
        let events = build_events(&raw);
        prop_assert_eq!(run(&automations, &events, true, false), run(&automations, &events, true, false));
    }
}

/// Writing an automation's keys in another order is not a change: its trigger state survives.
#[test]
fn key_order_does_not_change_an_automations_fingerprint() {
    let parse = |text: &str| {
        let value: serde_json::Value = serde_json::from_str(text).expect("JSON");
        let mut problems = spur_core::Problems::default();
        Automation::parse(&value, Dialect::Server, &mut problems).expect("valid automation")
    };
    let one = parse(
        r#"{"name": "a", "trigger": {"type": "event", "posture": "Reactive", "expect": ["x"], "threshold": 2, "within": 60},
            "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": "5e1ec7ed-0000-4000-8000-000000000001", "parameters": {"b": 1, "a": 2}}]}"#,
    );
    let reordered = parse(
        r#"{"actions": [{"parameters": {"a": 2, "b": 1}, "deployment_id": "5e1ec7ed-0000-4000-8000-000000000001", "source": "selected", "type": "run-deployment"}],
            "trigger": {"within": 60, "threshold": 2, "expect": ["x"], "posture": "Reactive", "type": "event"}, "name": "a"}"#,
    );
    let changed = parse(
        r#"{"name": "a", "trigger": {"type": "event", "posture": "Reactive", "expect": ["x"], "threshold": 3, "within": 60},
            "actions": [{"type": "run-deployment", "source": "selected", "deployment_id": "5e1ec7ed-0000-4000-8000-000000000001", "parameters": {"b": 1, "a": 2}}]}"#,
    );
    assert_eq!(
        spur_matcher::fingerprint(&one),
        spur_matcher::fingerprint(&reordered)
    );
    assert_ne!(
        spur_matcher::fingerprint(&one),
        spur_matcher::fingerprint(&changed)
    );
}

#[test]
fn generated_flow_settings_parse() {
    use proptest::strategy::ValueTree;
    let mut runner = proptest::test_runner::TestRunner::deterministic();
    for _ in 0..200 {
        let flow = flow().new_tree(&mut runner).expect("tree").current();
        let mut value = json!({"name": "a", "trigger": {"type": "event", "expect": ["x"], "posture": "Reactive", "threshold": 1, "within": 0}, "actions": [{"type": "do-nothing"}]});
        if let (Value::Object(flow), Value::Object(map)) = (flow.clone(), &mut value) {
            map.extend(flow);
        }
        let mut problems = Problems::new();
        let parsed = Automation::parse(&value, Dialect::Server, &mut problems);
        assert!(parsed.is_some(), "{flow}: {:?}", problems.into_vec());
        let has_settings = flow.as_object().is_some_and(|m| !m.is_empty());
        assert_eq!(
            parsed.and_then(|a| a.flow.clone()).is_some(),
            has_settings,
            "{flow}"
        );
    }
}
