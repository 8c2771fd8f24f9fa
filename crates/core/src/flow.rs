//! Flow control: Spur's optional settings between an automation's trigger and its actions.
//!
//! Prefect has none of these (its docs describe debouncing as a pattern); event platforms
//! such as Inngest build them in. They sit at the top level of an automation, beside
//! `trigger` and `actions`, and apply to its firings before any action runs:
//!
//! ```yaml
//! debounce: {key: "{{ event.resource.id }}", period: 30s, max_wait: 10m, keep: last}
//! throttle: {key: "{{ event.resource.id }}", limit: 10, per: 1m, over: delay}
//! batch:    {key: "{{ event.resource.id }}", max_events: 100, max_wait: 10s}
//! ```
//!
//! * **debounce**: firings with the same key inside `period` of each other collapse into one,
//!   handed on once the key has been quiet for `period` (or `max_wait` after the first);
//! * **batch**: up to `max_events` firings with the same key become one, handed on when full
//!   or `max_wait` after the first;
//! * **throttle**: at most `limit` firings per key per `per` are handed on; the rest wait
//!   their turn in order (`over: delay`) or are skipped with a reason (`over: drop`).
//!
//! `debounce` and `batch` are exclusive (both collapse); `throttle` applies after either. This
//! module is the model and its validation; the matcher's `flow` stage does the work, on the
//! engine's clock, so replay, tests and the daemon agree and the state is checkpointed with
//! the trigger state. An automation without these settings behaves exactly as in Prefect.

use chrono::TimeDelta;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};

use crate::problem::{FieldPath, Problems};
use crate::time::parse_duration;

/// The flow-control settings of one automation (each optional).
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct FlowControl {
    /// Collapse bursts into one firing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub debounce: Option<Debounce>,
    /// Limit firings per key and period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<Throttle>,
    /// Group firings into one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub batch: Option<Batch>,
    /// Limit the runs in progress per key (applied by the action executor, which knows
    /// when runs end; the other three run in the matcher on the engine clock).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub concurrency: Option<Concurrency>,
}

/// `concurrency: {key, limit, on_full}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Concurrency {
    /// A template rendered against each firing; each key has its own slots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How many firings per key may have runs in progress at once.
    pub limit: u32,
    /// What happens to a firing when its key's slots are all taken.
    pub on_full: OnFull,
}

/// What `concurrency` does with a firing whose key is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnFull {
    /// It waits, in order, until a run of its key ends (durably: a waiting firing is not
    /// dispatched yet, and a restart dispatches it again).
    Queue,
    /// The runs in progress of its key are cancelled and it starts (Hatchet's
    /// cancel-in-progress).
    CancelRunning,
    /// It is skipped, recorded with the reason; its actions never run.
    Skip,
}

/// `debounce: {key, period, max_wait, keep}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Debounce {
    /// A template rendered against each firing; firings with the same key collapse
    /// together. Without one, all of the automation's firings share one key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How long a key must be quiet before its firing is handed on.
    #[serde(serialize_with = "as_seconds")]
    pub period: TimeDelta,
    /// The longest a firing waits after the first of its burst, however busy the key stays.
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "as_optional_seconds"
    )]
    pub max_wait: Option<TimeDelta>,
    /// Which firing of the burst is handed on (its event is the template's `event`).
    pub keep: Keep,
}

/// Which firing of a debounced burst is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Keep {
    /// The first of the burst.
    First,
    /// The last of the burst (the default, as Inngest's debounce).
    Last,
}

/// `throttle: {key, limit, per, over}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Throttle {
    /// A template rendered against each firing; each key has its own limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// How many firings per key are handed on within `per`.
    pub limit: u32,
    /// The sliding window the limit counts over.
    #[serde(serialize_with = "as_seconds")]
    pub per: TimeDelta,
    /// What happens to a firing over the limit.
    pub over: Overflow,
}

/// What a throttle does with a firing over its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Overflow {
    /// It waits, in order, until the window has room (durably: it survives restarts).
    Delay,
    /// It is skipped, recorded with the reason; its actions never run.
    Drop,
}

/// `batch: {key, max_events, max_wait}`.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Batch {
    /// A template rendered against each firing; each key has its own batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// A batch is handed on as soon as it holds this many firings.
    pub max_events: u32,
    /// … or this long after its first firing.
    #[serde(serialize_with = "as_seconds")]
    pub max_wait: TimeDelta,
}

/// The most firings' event ids a debounce remembers (its count goes on counting).
pub const DEBOUNCE_EVENT_IDS: usize = 1_000;
/// The largest `batch.max_events` (a batch holds its events in memory until handed on).
pub const MAX_BATCH_EVENTS: u32 = 10_000;

fn as_seconds<S: Serializer>(d: &TimeDelta, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_seconds_f64())
}

fn as_optional_seconds<S: Serializer>(d: &Option<TimeDelta>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_f64(d.as_seconds_f64()),
        None => s.serialize_none(),
    }
}

/// The top-level automation keys this module reads.
pub const FLOW_KEYS: &[&str] = &["debounce", "throttle", "batch", "concurrency"];

impl FlowControl {
    /// Reads the flow-control keys of an automation mapping; `None` when it has none.
    /// Problems are reported at the automation's root (`root`).
    pub fn parse(
        map: &Map<String, Value>,
        root: &FieldPath,
        problems: &mut Problems,
    ) -> Option<FlowControl> {
        if !FLOW_KEYS
            .iter()
            .any(|k| map.get(*k).is_some_and(|v| !v.is_null()))
        {
            return None;
        }
        let mut flow = FlowControl::default();
        if let Some(v) = map.get("debounce").filter(|v| !v.is_null()) {
            let path = root.key("debounce");
            if let Some(fields) =
                settings(v, &path, &["key", "period", "max_wait", "keep"], problems)
            {
                let period = required_duration(fields, &path, "period", problems);
                let max_wait = optional_duration(fields, &path, "max_wait", problems);
                let keep = match fields.get("keep") {
                    None | Some(Value::Null) => Keep::Last,
                    Some(Value::String(s)) if s == "last" => Keep::Last,
                    Some(Value::String(s)) if s == "first" => Keep::First,
                    Some(other) => {
                        problems.error(
                            &path.key("keep"),
                            format!("must be \"first\" or \"last\", got {other}"),
                        );
                        Keep::Last
                    }
                };
                if let (Some(p), Some(m)) = (period, max_wait)
                    && m < p
                {
                    problems.error(
                        &path.key("max_wait"),
                        "must be at least `period` (it bounds how long a busy key waits)",
                    );
                }
                if let Some(period) = period {
                    flow.debounce = Some(Debounce {
                        key: key_template(fields, &path, problems),
                        period,
                        max_wait,
                        keep,
                    });
                }
            }
        }
        if let Some(v) = map.get("throttle").filter(|v| !v.is_null()) {
            let path = root.key("throttle");
            if let Some(fields) = settings(v, &path, &["key", "limit", "per", "over"], problems) {
                let limit = count(fields, &path, "limit", u32::MAX, problems);
                let per = required_duration(fields, &path, "per", problems);
                let over = match fields.get("over") {
                    None | Some(Value::Null) => Overflow::Delay,
                    Some(Value::String(s)) if s == "delay" => Overflow::Delay,
                    Some(Value::String(s)) if s == "drop" => Overflow::Drop,
                    Some(other) => {
                        problems.error(
                            &path.key("over"),
                            format!("must be \"delay\" or \"drop\", got {other}"),
                        );
                        Overflow::Delay
                    }
                };
                if let (Some(limit), Some(per)) = (limit, per) {
                    flow.throttle = Some(Throttle {
                        key: key_template(fields, &path, problems),
                        limit,
                        per,
                        over,
                    });
                }
            }
        }
        if let Some(v) = map.get("batch").filter(|v| !v.is_null()) {
            let path = root.key("batch");
            if let Some(fields) = settings(v, &path, &["key", "max_events", "max_wait"], problems) {
                let max_events = count(fields, &path, "max_events", MAX_BATCH_EVENTS, problems);
                let max_wait = required_duration(fields, &path, "max_wait", problems);
                if let (Some(max_events), Some(max_wait)) = (max_events, max_wait) {
                    flow.batch = Some(Batch {
                        key: key_template(fields, &path, problems),
                        max_events,
                        max_wait,
                    });
                }
            }
        }
        if let Some(v) = map.get("concurrency").filter(|v| !v.is_null()) {
            let path = root.key("concurrency");
            if let Some(fields) = settings(v, &path, &["key", "limit", "on_full"], problems) {
                let limit = count(fields, &path, "limit", u32::MAX, problems);
                let on_full = match fields.get("on_full") {
                    None | Some(Value::Null) => OnFull::Queue,
                    Some(Value::String(s)) if s == "queue" => OnFull::Queue,
                    Some(Value::String(s)) if s == "cancel-running" => OnFull::CancelRunning,
                    Some(Value::String(s)) if s == "skip" => OnFull::Skip,
                    Some(other) => {
                        problems.error(
                            &path.key("on_full"),
                            format!(
                                "must be \"queue\", \"cancel-running\" or \"skip\", got {other}"
                            ),
                        );
                        OnFull::Queue
                    }
                };
                if let Some(limit) = limit {
                    flow.concurrency = Some(Concurrency {
                        key: key_template(fields, &path, problems),
                        limit,
                        on_full,
                    });
                }
            }
        }
        if flow.debounce.is_some() && flow.batch.is_some() {
            problems.error(
                &root.key("batch"),
                "cannot be combined with `debounce` (both collapse firings; pick one)",
            );
        }
        Some(flow)
    }

    /// True when none of the matcher's settings (`debounce`, `throttle`, `batch`) is set.
    pub fn is_empty(&self) -> bool {
        self.debounce.is_none() && self.throttle.is_none() && self.batch.is_none()
    }
}

fn settings<'a>(
    value: &'a Value,
    path: &FieldPath,
    known: &[&str],
    problems: &mut Problems,
) -> Option<&'a Map<String, Value>> {
    let Value::Object(fields) = value else {
        problems.error(
            path,
            format!(
                "must be a mapping ({}), got {}",
                known.join(", "),
                crate::problem::json_type_name(value)
            ),
        );
        return None;
    };
    for key in fields.keys() {
        if !known.contains(&key.as_str()) {
            problems.error(
                &path.key(key),
                format!("unknown field; known fields: {}", known.join(", ")),
            );
        }
    }
    Some(fields)
}

fn key_template(
    fields: &Map<String, Value>,
    path: &FieldPath,
    problems: &mut Problems,
) -> Option<String> {
    match fields.get("key") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.trim().is_empty() => Some(s.clone()),
        Some(Value::String(_)) => {
            problems.error(
                &path.key("key"),
                "must not be empty (leave it out for one key)",
            );
            None
        }
        Some(other) => {
            problems.error(
                &path.key("key"),
                format!("must be a template string, got {other}"),
            );
            None
        }
    }
}

fn count(
    fields: &Map<String, Value>,
    path: &FieldPath,
    name: &str,
    max: u32,
    problems: &mut Problems,
) -> Option<u32> {
    match fields.get(name) {
        None | Some(Value::Null) => {
            problems.error(&path.key(name), "is required (a whole number ≥ 1)");
            None
        }
        Some(v) => match v.as_u64() {
            Some(0) => {
                problems.error(&path.key(name), "must be at least 1");
                None
            }
            Some(n) if n <= u64::from(max) => u32::try_from(n).ok(),
            Some(_) => {
                problems.error(&path.key(name), format!("must be at most {max}"));
                None
            }
            None => {
                problems.error(
                    &path.key(name),
                    format!("must be a whole number ≥ 1, got {v}"),
                );
                None
            }
        },
    }
}

fn required_duration(
    fields: &Map<String, Value>,
    path: &FieldPath,
    name: &str,
    problems: &mut Problems,
) -> Option<TimeDelta> {
    if fields.get(name).is_none_or(Value::is_null) {
        problems.error(
            &path.key(name),
            "is required (a duration: 30s, 10m, PT1H or seconds)",
        );
        return None;
    }
    optional_duration(fields, path, name, problems)
}

fn optional_duration(
    fields: &Map<String, Value>,
    path: &FieldPath,
    name: &str,
    problems: &mut Problems,
) -> Option<TimeDelta> {
    let value = fields.get(name).filter(|v| !v.is_null())?;
    match parse_flow_duration(value) {
        Ok(d) if d <= TimeDelta::zero() => {
            problems.error(&path.key(name), "must be longer than 0");
            None
        }
        Ok(d) => Some(d),
        Err(reason) => {
            problems.error(&path.key(name), reason);
            None
        }
    }
}

/// A duration as seconds, ISO-8601, `HH:MM:SS`, or a number with a unit: `250ms`, `30s`,
/// `10m`, `2h`, `1d`.
pub fn parse_flow_duration(value: &Value) -> Result<TimeDelta, String> {
    if let Value::String(s) = value {
        let t = s.trim();
        let units: [(&str, f64); 5] = [
            ("ms", 0.001),
            ("s", 1.0),
            ("m", 60.0),
            ("h", 3_600.0),
            ("d", 86_400.0),
        ];
        for (unit, scale) in units {
            if let Some(number) = t.strip_suffix(unit)
                && let Ok(n) = number.trim().parse::<f64>()
            {
                return crate::time::seconds_to_delta(n * scale);
            }
        }
    }
    parse_duration(value).map_err(|e| format!("{e} (or 250ms, 30s, 10m, 2h, 1d)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> (Option<FlowControl>, Vec<String>) {
        let mut problems = Problems::default();
        let map = v.as_object().cloned().unwrap_or_default();
        let flow = FlowControl::parse(&map, &FieldPath::root(), &mut problems);
        let errors = problems
            .into_vec()
            .into_iter()
            .map(|p| format!("{}: {}", p.path, p.reason))
            .collect();
        (flow, errors)
    }

    #[test]
    fn reads_concurrency_and_refuses_a_zero_limit_or_unknown_on_full() {
        let (flow, errors) =
            parse(json!({"concurrency": {"key": "{{ event.resource.id }}", "limit": 2}}));
        assert!(errors.is_empty(), "{errors:?}");
        let c = flow
            .expect("flow control")
            .concurrency
            .expect("concurrency");
        assert_eq!((c.limit, c.on_full), (2, OnFull::Queue));
        let (_, errors) = parse(json!({"concurrency": {"limit": 0, "on_full": "cancel-running"}}));
        assert_eq!(errors, vec!["concurrency.limit: must be at least 1"]);
        let (_, errors) = parse(json!({"concurrency": {"limit": 1, "on_full": "later"}}));
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].starts_with("concurrency.on_full:"), "{errors:?}");
    }

    #[test]
    fn reads_each_setting_with_its_defaults() {
        let (flow, errors) = parse(json!({
            "debounce": {"key": "{{ event.resource.id }}", "period": "30s", "max_wait": "10m"},
            "throttle": {"limit": 10, "per": "1m"},
        }));
        assert!(errors.is_empty(), "{errors:?}");
        let flow = flow.expect("flow control");
        let debounce = flow.debounce.expect("debounce");
        assert_eq!(debounce.period, TimeDelta::seconds(30));
        assert_eq!(debounce.max_wait, Some(TimeDelta::minutes(10)));
        assert_eq!(debounce.keep, Keep::Last);
        let throttle = flow.throttle.expect("throttle");
        assert_eq!((throttle.limit, throttle.over), (10, Overflow::Delay));
        assert_eq!(throttle.key, None);
    }

    #[test]
    fn none_without_any_setting() {
        assert_eq!(parse(json!({"name": "x"})).0, None);
    }

    #[test]
    fn bad_values_name_their_field() {
        let (_, errors) = parse(json!({
            "debounce": {"period": "soon", "keep": "middle"},
            "throttle": {"limit": 0, "per": 60, "over": "explode"},
            "batch": {"max_events": 5, "max_wait": "-3s", "size": 1},
        }));
        let all = errors.join("\n");
        for needle in [
            "debounce.period",
            "debounce.keep",
            "throttle.limit",
            "throttle.over",
            "batch.max_wait",
            "batch.size",
        ] {
            assert!(all.contains(needle), "{needle} missing from:\n{all}");
        }
    }

    #[test]
    fn debounce_and_batch_exclude_each_other() {
        let (_, errors) = parse(json!({
            "debounce": {"period": 5},
            "batch": {"max_events": 5, "max_wait": 5},
        }));
        assert!(
            errors.iter().any(|e| e.contains("cannot be combined")),
            "{errors:?}"
        );
    }

    #[test]
    fn durations_take_units() {
        for (text, secs) in [
            ("250ms", 0.25),
            ("30s", 30.0),
            ("10m", 600.0),
            ("2h", 7200.0),
            ("PT1M", 60.0),
        ] {
            let d = parse_flow_duration(&json!(text)).expect(text);
            assert!((d.as_seconds_f64() - secs).abs() < 1e-9, "{text}");
        }
    }
}
