//! Prefect's trigger schema: event triggers, compound and sequence triggers.
//!
//! Parsing follows Prefect's server models (`SA` in prefect-semantics.md) with their defaults
//! and validation messages, in one of two [`Dialect`]s: automation files are read like the
//! server reads its API (`posture` required on event triggers, the `within` key required on
//! composites), deployment `triggers:` like Prefect's client does (both default). Unknown keys
//! inside a trigger are ignored, as Prefect does, but reported as warnings.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex, Weak};

use chrono::TimeDelta;
use serde::Serialize;
use serde::ser::{SerializeMap, Serializer};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::event::{Event, Resource};
use crate::glob::{Glob, LabelPattern, PrefixRegex};
use crate::problem::json_type_name;
use crate::problem::{FieldPath, Problems};
use crate::time::{delta_seconds, parse_duration};

/// Which of Prefect's two model copies a document follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Dialect {
    /// Automation objects as Prefect's server API accepts them.
    Server,
    /// Deployment triggers as Prefect's client (`prefect.yaml`) accepts them.
    Client,
}

/// A label → patterns map (Prefect's `ResourceSpecification`). Every label must match (AND);
/// within a label any pattern may match (OR).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceSpecification {
    /// `(label, patterns)` in the order written.
    pub labels: Vec<(String, Vec<LabelPattern>)>,
}

impl ResourceSpecification {
    /// True when the spec has no labels (it matches every resource).
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Does one resource satisfy every label of the spec?
    pub fn matches(&self, resource: &Resource) -> bool {
        self.labels.iter().all(|(label, patterns)| {
            let value = resource.get(label);
            patterns.iter().any(|p| p.matches(value))
        })
    }

    /// Empty spec → true; else some one resource satisfies the whole spec.
    pub fn includes<'a>(&self, mut resources: impl Iterator<Item = &'a Resource>) -> bool {
        self.is_empty() || resources.any(|r| self.matches(r))
    }

    /// The literal values this spec requires for `label`, if it pins the label to plain strings
    /// (no globs, no negation). Used by the matcher's resource index.
    pub fn literal_values(&self, label: &str) -> Option<Vec<&str>> {
        let (_, patterns) = self.labels.iter().find(|(l, _)| l == label)?;
        patterns
            .iter()
            .map(|p| (!p.is_negated() && p.glob().is_literal()).then(|| p.glob().as_str()))
            .collect()
    }

    /// True for Prefect's "matches every flow run" spec used by the loop guard: empty, or
    /// exactly `{"prefect.resource.id": "prefect.flow-run.*"}`.
    fn is_unconstrained_flow_run_spec(&self) -> bool {
        match self.labels.as_slice() {
            [] => true,
            [(label, patterns)] => {
                label == crate::event::RESOURCE_ID
                    && patterns.len() == 1
                    && patterns[0].as_str() == "prefect.flow-run.*"
            }
            _ => false,
        }
    }

    fn parse(value: &Value, path: &FieldPath, problems: &mut Problems) -> ResourceSpecification {
        let mut spec = ResourceSpecification::default();
        let Value::Object(map) = value else {
            problems.error(
                path,
                format!(
                    "must be a mapping of label to pattern(s), got {}",
                    json_type_name(value)
                ),
            );
            return spec;
        };
        for (label, patterns) in map {
            let label_path = path.key(label);
            let list = match patterns {
                Value::String(s) => vec![LabelPattern::new(s)],
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .filter_map(|(i, item)| match item {
                        Value::String(s) => Some(LabelPattern::new(s)),
                        other => {
                            problems.error(
                                &label_path.index(i),
                                format!("patterns must be strings, got {}", json_type_name(other)),
                            );
                            None
                        }
                    })
                    .collect(),
                other => {
                    problems.error(
                        &label_path,
                        format!(
                            "must be a string or a list of strings, got {}",
                            json_type_name(other)
                        ),
                    );
                    continue;
                }
            };
            if list.is_empty() {
                problems.warn(
                    &label_path,
                    "an empty pattern list never matches: this trigger can never fire",
                );
            }
            let mut list = list;
            list.shrink_to_fit();
            spec.labels.push((label.clone(), list));
        }
        spec.labels.shrink_to_fit();
        spec
    }
}

impl Serialize for ResourceSpecification {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(self.labels.len()))?;
        for (label, patterns) in &self.labels {
            let values: Vec<&str> = patterns.iter().map(LabelPattern::as_str).collect();
            if values.len() == 1 {
                map.serialize_entry(label, values[0])?;
            } else {
                map.serialize_entry(label, &values)?;
            }
        }
        map.end()
    }
}

/// Reactive triggers fire when enough events arrive; proactive ones when too few do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Posture {
    /// Fire on the presence of events.
    Reactive,
    /// Fire on the absence of events by the end of a window.
    Proactive,
}

/// A trigger over single events (Prefect's `EventTrigger`).
#[derive(Clone, Debug)]
pub struct EventTrigger {
    /// Trigger id (Prefect regenerates it on every save; Spur derives it from the automation).
    pub id: Uuid,
    /// Labels the primary resource must match.
    pub match_resource: ResourceSpecification,
    /// Specs each of which some related resource must match.
    pub match_related: Vec<ResourceSpecification>,
    /// Event names that open a window (a set, sorted).
    pub after: Vec<String>,
    /// Event names that count (a set, sorted; empty = every event).
    pub expect: Vec<String>,
    /// Labels whose values split events into separate buckets (a set, sorted).
    pub for_each: Vec<String>,
    /// Reactive or proactive.
    pub posture: Posture,
    /// How many events (reactive: at least; proactive: fewer than).
    pub threshold: i64,
    /// The window length; zero means "immediate" for reactive triggers.
    pub within: TimeDelta,
    /// Shared by every trigger with the same `expect` and `after` (see [`CompiledNames::shared`]).
    compiled: Arc<CompiledNames>,
}

/// The event-name patterns of a trigger, compiled for the three checks Prefect makes.
#[derive(Debug)]
struct CompiledNames {
    /// `fnmatchcase` globs over `expect ∪ after` (the index pre-filter).
    prefilter: Vec<Glob>,
    /// The anchored-at-start regex of `covers`.
    covers: PrefixRegex,
    /// `matches()` patterns for `expects()`.
    expect: Vec<LabelPattern>,
    /// `matches()` patterns for `starts_after()`.
    after: Vec<LabelPattern>,
}

/// The [`CompiledNames`] alive in this process, by a hash of `(expect, after)`. Generated
/// automation sets repeat a handful of event names across tens of thousands of triggers;
/// compiling each set once and sharing it keeps a trigger's memory to its own fields. The key
/// is a hash, not a copy of the names: a set of 100 000 *distinct* names would otherwise keep
/// each name twice more (a hit is confirmed against the names the compiled set holds).
type NameCache = HashMap<u64, Weak<CompiledNames>>;

/// The cache and its size after the last sweep.
static COMPILED_NAMES: LazyLock<Mutex<(NameCache, usize)>> =
    LazyLock::new(|| Mutex::new((HashMap::new(), 0)));

impl CompiledNames {
    /// The compiled patterns for `expect`/`after`, shared with every live trigger that has the
    /// same sets. Entries whose triggers are all gone are swept whenever the cache has doubled
    /// since the last sweep, so it stays proportional to the distinct sets in use.
    fn shared(expect: &[String], after: &[String]) -> Arc<CompiledNames> {
        let key = {
            use std::hash::{Hash, Hasher};
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            (expect, after).hash(&mut hasher);
            hasher.finish()
        };
        // A poisoned lock only means another thread panicked mid-insert; the map is still a
        // valid cache.
        let mut guard = COMPILED_NAMES.lock().unwrap_or_else(|e| e.into_inner());
        let (cache, swept_at) = &mut *guard;
        let cached = cache.get(&key).and_then(Weak::upgrade);
        if let Some(live) = &cached
            && live.is_for(expect, after)
        {
            return live.clone();
        }
        let compiled = Arc::new(CompiledNames::new(expect, after));
        if cached.is_some() {
            // Another live set with the same hash keeps the slot; this one is not shared.
            return compiled;
        }
        cache.insert(key, Arc::downgrade(&compiled));
        if cache.len() > 2 * (*swept_at).max(512) {
            cache.retain(|_, weak| weak.strong_count() > 0);
            *swept_at = cache.len();
        }
        compiled
    }

    /// True when this was compiled from exactly `expect` and `after`.
    fn is_for(&self, expect: &[String], after: &[String]) -> bool {
        let same = |patterns: &[LabelPattern], names: &[String]| {
            patterns.len() == names.len()
                && patterns.iter().zip(names).all(|(p, n)| p.as_str() == n)
        };
        same(&self.expect, expect) && same(&self.after, after)
    }

    fn new(expect: &[String], after: &[String]) -> CompiledNames {
        let both: Vec<&str> = expect
            .iter()
            .chain(after.iter())
            .map(String::as_str)
            .collect();
        CompiledNames {
            prefilter: both.iter().map(|p| Glob::new(p)).collect(),
            covers: if expect.is_empty() {
                PrefixRegex::any()
            } else {
                PrefixRegex::new(both.iter().copied())
            },
            expect: expect.iter().map(|p| LabelPattern::new(p)).collect(),
            after: after.iter().map(|p| LabelPattern::new(p)).collect(),
        }
    }
}

impl EventTrigger {
    /// Builds a trigger from its parts (defaults for the rest), compiling its patterns.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: Uuid,
        match_resource: ResourceSpecification,
        match_related: Vec<ResourceSpecification>,
        after: Vec<String>,
        expect: Vec<String>,
        for_each: Vec<String>,
        posture: Posture,
        threshold: i64,
        within: TimeDelta,
    ) -> EventTrigger {
        let after = sorted_set(after);
        let expect = sorted_set(expect);
        let compiled = CompiledNames::shared(&expect, &after);
        EventTrigger {
            id,
            match_resource,
            match_related,
            after,
            expect,
            for_each: sorted_set(for_each),
            posture,
            threshold,
            within,
            compiled,
        }
    }

    /// Prefect's index pre-filter: `fnmatchcase(name, p)` for some `p` in `expect ∪ after`, or
    /// any name when `expect` is empty.
    pub fn prefilter(&self, name: &str) -> bool {
        self.expect.is_empty() || self.compiled.prefilter.iter().any(|g| g.matches(name))
    }

    /// The globs the index pre-filter uses (empty when `expect` is empty: every event).
    pub fn index_patterns(&self) -> &[Glob] {
        if self.expect.is_empty() {
            &[]
        } else {
            &self.compiled.prefilter
        }
    }

    /// The name half of `covers`: the start-anchored regex over `expect ∪ after`.
    pub fn covers_name(&self, name: &str) -> bool {
        self.compiled.covers.matches(name)
    }

    /// Prefect's `covers(event)`: the name regex and the resource specs.
    pub fn covers(&self, event: &Event) -> bool {
        self.compiled.covers.matches(&event.event) && self.covers_resources(event)
    }

    /// `match` against the primary resource, each `match_related` spec against some related one.
    pub fn covers_resources(&self, event: &Event) -> bool {
        self.match_resource.matches(&event.resource)
            && self
                .match_related
                .iter()
                .all(|spec| spec.includes(event.related.iter()))
    }

    /// Prefect's `expects(name)`: empty `expect` expects everything.
    pub fn expects(&self, name: &str) -> bool {
        self.expect.is_empty() || self.compiled.expect.iter().any(|p| p.matches(Some(name)))
    }

    /// Prefect's `starts_after(name)`: empty `after` starts after nothing.
    pub fn starts_after(&self, name: &str) -> bool {
        self.compiled.after.iter().any(|p| p.matches(Some(name)))
    }

    /// Reactive with a zero window: every event counts at once.
    pub fn immediate(&self) -> bool {
        self.posture == Posture::Reactive && self.within.is_zero()
    }

    /// Reactive: `count ≥ threshold`; proactive: `count < threshold`.
    pub fn meets_threshold(&self, count: i64) -> bool {
        match self.posture {
            Posture::Reactive => count >= self.threshold,
            Posture::Proactive => count < self.threshold,
        }
    }

    /// The bucketing key: the `for_each` labels' values, in sorted label order, `""` if absent.
    pub fn bucketing_key(&self, event: &Event) -> Vec<String> {
        self.for_each
            .iter()
            .map(|label| event.find_resource_label(label).unwrap_or("").to_owned())
            .collect()
    }

    fn parse(
        map: &Map<String, Value>,
        path: &FieldPath,
        dialect: Dialect,
        id: Uuid,
        problems: &mut Problems,
    ) -> Option<EventTrigger> {
        let errors_before = problems.error_count();
        let match_resource = match map.get("match") {
            None | Some(Value::Null) => ResourceSpecification::default(),
            Some(v) => ResourceSpecification::parse(v, &path.key("match"), problems),
        };
        let match_related = match map.get("match_related") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(items)) => items
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    ResourceSpecification::parse(v, &path.key("match_related").index(i), problems)
                })
                .collect(),
            Some(v) => vec![ResourceSpecification::parse(
                v,
                &path.key("match_related"),
                problems,
            )],
        };
        let after = parse_name_set(map, "after", path, problems);
        let expect = parse_name_set(map, "expect", path, problems);
        let for_each = parse_name_set(map, "for_each", path, problems);
        let posture = match map.get("posture") {
            Some(Value::String(s)) if s == "Reactive" => Posture::Reactive,
            Some(Value::String(s)) if s == "Proactive" => Posture::Proactive,
            Some(Value::String(s)) if s == "Metric" => {
                problems.error(
                    &path.key("posture"),
                    "Metric triggers are a Prefect Cloud feature and are not supported",
                );
                Posture::Reactive
            }
            Some(other) => {
                problems.error(
                    &path.key("posture"),
                    format!("must be \"Reactive\" or \"Proactive\", got {other}"),
                );
                Posture::Reactive
            }
            None => {
                if dialect == Dialect::Server {
                    problems.error(
                        &path.key("posture"),
                        "is required on event triggers (\"Reactive\" or \"Proactive\")",
                    );
                }
                Posture::Reactive
            }
        };
        let threshold = match map.get("threshold") {
            None => 1,
            Some(v) => match as_integer(v) {
                Some(n) => n,
                None => {
                    problems.error(
                        &path.key("threshold"),
                        format!("must be an integer, got {v}"),
                    );
                    1
                }
            },
        };
        let within_path = path.key("within");
        let mut within = match map.get("within") {
            None => TimeDelta::zero(),
            Some(v) => match parse_duration(v) {
                Ok(d) if d < TimeDelta::zero() => {
                    problems.error(&within_path, "must be greater than or equal to 0");
                    TimeDelta::zero()
                }
                Ok(d) => d,
                Err(reason) => {
                    problems.error(&within_path, format!("`within` {reason}"));
                    TimeDelta::zero()
                }
            },
        };
        if posture == Posture::Proactive {
            if within.is_zero() {
                within = TimeDelta::seconds(10);
            } else if within < TimeDelta::seconds(10) {
                problems.error(
                    &within_path,
                    "`within` for Proactive triggers must be greater than or equal to 10 seconds",
                );
            }
        }
        for key in map.keys() {
            if !EVENT_TRIGGER_KEYS.contains(&key.as_str()) {
                problems.warn(
                    &path.key(key),
                    format!(
                        "unknown event trigger field (ignored); known fields: {}",
                        EVENT_TRIGGER_KEYS.join(", ")
                    ),
                );
            }
        }
        let trigger = EventTrigger::new(
            id,
            match_resource,
            match_related,
            after,
            expect,
            for_each,
            posture,
            threshold,
            within,
        );
        trigger.lint(path, problems);
        (problems.error_count() == errors_before).then_some(trigger)
    }

    /// Warnings for triggers that are valid but can never fire, or fire on everything.
    fn lint(&self, path: &FieldPath, problems: &mut Problems) {
        for (field, names) in [("expect", &self.expect), ("after", &self.after)] {
            for (i, name) in names.iter().enumerate() {
                if name.starts_with('!') || name.contains('?') || name.contains('[') {
                    problems.warn(
                        &path.key(field).index(i),
                        format!(
                            "{name:?}: only `*` works in event names; `?`, `[...]` and a leading `!` \
                             never match (Prefect escapes them), so this name matches nothing but itself"
                        ),
                    );
                }
            }
        }
        if self.expect.is_empty() && self.after.is_empty() {
            problems.warn(
                &path.key("expect"),
                "empty `expect` matches every event, including the events Spur emits itself \
                 (this can loop); list the event names you mean",
            );
        }
        if self.posture == Posture::Proactive {
            if self.threshold <= 0 {
                problems.warn(
                    &path.key("threshold"),
                    "a Proactive trigger with threshold <= 0 can never fire (count < threshold is impossible)",
                );
            } else if self.after.is_empty() && !self.for_each.is_empty() && self.threshold == 1 {
                problems.warn(
                    &path.key("for_each"),
                    "a Proactive trigger with for_each, no `after` and threshold 1 never fires: \
                     each key's window only exists once an expected event has been counted",
                );
            }
        } else if self.threshold <= 0 {
            // Accepted, as Prefect 3.8.8 accepts it: both its server and client models declare
            // `threshold: int` with no bound, and `count >= threshold` then holds for every
            // event. Refusing it would reject automations Prefect runs.
            problems.warn(
                &path.key("threshold"),
                format!(
                    "a Reactive trigger with threshold {} fires on every matching event, like \
                     threshold 1 (Prefect accepts it too); did you mean a positive count?",
                    self.threshold
                ),
            );
        }
    }
}

const EVENT_TRIGGER_KEYS: &[&str] = &[
    "type",
    "id",
    "match",
    "match_related",
    "after",
    "expect",
    "for_each",
    "posture",
    "threshold",
    "within",
];

impl Serialize for EventTrigger {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(Some(10))?;
        map.serialize_entry("type", "event")?;
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("match", &self.match_resource)?;
        if self.match_related.len() == 1 {
            map.serialize_entry("match_related", &self.match_related[0])?;
        } else {
            map.serialize_entry("match_related", &self.match_related)?;
        }
        map.serialize_entry("after", &self.after)?;
        map.serialize_entry("expect", &self.expect)?;
        map.serialize_entry("for_each", &self.for_each)?;
        map.serialize_entry("posture", &self.posture)?;
        map.serialize_entry("threshold", &self.threshold)?;
        map.serialize_entry("within", &delta_seconds(self.within))?;
        map.end()
    }
}

/// How many child firings a compound trigger needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Require {
    /// One child.
    Any,
    /// Every child.
    All,
    /// This many children (1 ≤ n ≤ children).
    Count(usize),
}

/// The two composite shapes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CompositeKind {
    /// Children fire in any order; `require` of them.
    Compound(Require),
    /// Every child fires, in list order.
    Sequence,
}

/// A compound or sequence trigger (Prefect's `CompositeTrigger`).
#[derive(Clone, Debug)]
pub struct CompositeTrigger {
    /// Trigger id.
    pub id: Uuid,
    /// Compound or sequence.
    pub kind: CompositeKind,
    /// The children, in order.
    pub triggers: Vec<Trigger>,
    /// Child firings older than this (relative to the newest) are forgotten; `None` = forever.
    pub within: Option<TimeDelta>,
}

impl CompositeTrigger {
    /// How many child firings complete this composite (Prefect's `num_expected_firings`).
    pub fn expected_firings(&self) -> usize {
        match self.kind {
            CompositeKind::Compound(Require::Any) => 1,
            CompositeKind::Compound(Require::All) | CompositeKind::Sequence => self.triggers.len(),
            CompositeKind::Compound(Require::Count(n)) => n,
        }
    }
}

impl Serialize for CompositeTrigger {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        match self.kind {
            CompositeKind::Compound(require) => {
                map.serialize_entry("type", "compound")?;
                match require {
                    Require::Any => map.serialize_entry("require", "any")?,
                    Require::All => map.serialize_entry("require", "all")?,
                    Require::Count(n) => map.serialize_entry("require", &n)?,
                }
            }
            CompositeKind::Sequence => map.serialize_entry("type", "sequence")?,
        }
        map.serialize_entry("id", &self.id)?;
        map.serialize_entry("triggers", &self.triggers)?;
        map.serialize_entry("within", &self.within.map(delta_seconds))?;
        map.end()
    }
}

/// Any trigger.
#[derive(Clone, Debug)]
pub enum Trigger {
    /// A leaf over events, shared with the matcher's flattened plan rather than copied.
    Event(Arc<EventTrigger>),
    /// A compound or sequence over child triggers.
    Composite(CompositeTrigger),
}

impl Serialize for Trigger {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Trigger::Event(t) => t.serialize(serializer),
            Trigger::Composite(t) => t.serialize(serializer),
        }
    }
}

impl Trigger {
    /// The trigger's type name as Prefect writes it.
    pub fn type_name(&self) -> &'static str {
        match self {
            Trigger::Event(_) => "event",
            Trigger::Composite(CompositeTrigger {
                kind: CompositeKind::Compound(_),
                ..
            }) => "compound",
            Trigger::Composite(_) => "sequence",
        }
    }

    /// Every leaf event trigger, depth first, in list order.
    pub fn leaves(&self) -> Vec<&EventTrigger> {
        let mut out = Vec::new();
        fn walk<'a>(t: &'a Trigger, out: &mut Vec<&'a EventTrigger>) {
            match t {
                Trigger::Event(e) => out.push(e),
                Trigger::Composite(c) => c.triggers.iter().for_each(|child| walk(child, out)),
            }
        }
        walk(self, &mut out);
        out
    }

    /// Parses a trigger. `id_seed` makes trigger ids stable: the same automation and position
    /// always get the same id, so state survives a reload of an unchanged file.
    pub fn parse(
        value: &Value,
        path: &FieldPath,
        dialect: Dialect,
        id_seed: &str,
        problems: &mut Problems,
    ) -> Option<Trigger> {
        let Value::Object(map) = value else {
            problems.error(
                path,
                format!("a trigger must be a mapping, got {}", json_type_name(value)),
            );
            return None;
        };
        let id = match map.get("id") {
            Some(Value::String(s)) => match Uuid::parse_str(s) {
                Ok(id) => id,
                Err(e) => {
                    problems.error(&path.key("id"), format!("is not a valid UUID ({e})"));
                    return None;
                }
            },
            _ => Uuid::new_v5(&crate::SPUR_NAMESPACE, id_seed.as_bytes()),
        };
        let type_name = match map.get("type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                problems.error(
                    &path.key("type"),
                    format!("must be a string, got {}", json_type_name(other)),
                );
                return None;
            }
            // Prefect's client discriminator: triggers+require → compound, triggers → sequence.
            None if map.contains_key("triggers") && map.contains_key("require") => {
                "compound".to_owned()
            }
            None if map.contains_key("triggers") => "sequence".to_owned(),
            None if map.get("posture").and_then(Value::as_str) == Some("Metric") => {
                "metric".to_owned()
            }
            None => "event".to_owned(),
        };
        match type_name.as_str() {
            "event" => EventTrigger::parse(map, path, dialect, id, problems)
                .map(|t| Trigger::Event(Arc::new(t))),
            "compound" | "sequence" => {
                parse_composite(map, path, dialect, id, id_seed, &type_name, problems)
                    .map(Trigger::Composite)
            }
            "metric" => {
                problems.error(
                    &path.key("type"),
                    "metric triggers are a Prefect Cloud feature and are not supported",
                );
                None
            }
            other => {
                problems.error(
                    &path.key("type"),
                    format!(
                        "unknown trigger type {other:?}; expected \"event\", \"compound\" or \"sequence\""
                    ),
                );
                None
            }
        }
    }
}

fn parse_composite(
    map: &Map<String, Value>,
    path: &FieldPath,
    dialect: Dialect,
    id: Uuid,
    id_seed: &str,
    type_name: &str,
    problems: &mut Problems,
) -> Option<CompositeTrigger> {
    let errors_before = problems.error_count();
    let triggers_path = path.key("triggers");
    let triggers: Vec<Trigger> = match map.get("triggers") {
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                Trigger::parse(
                    item,
                    &triggers_path.index(i),
                    dialect,
                    &format!("{id_seed}/{i}"),
                    problems,
                )
            })
            .collect(),
        Some(other) => {
            problems.error(
                &triggers_path,
                format!("must be a list of triggers, got {}", json_type_name(other)),
            );
            Vec::new()
        }
        None => {
            problems.error(&triggers_path, "is required");
            Vec::new()
        }
    };
    let within = match map.get("within") {
        None => {
            if dialect == Dialect::Server {
                problems.error(
                    &path.key("within"),
                    "is required on compound and sequence triggers (seconds, or null for no limit)",
                );
            }
            None
        }
        Some(Value::Null) => None,
        Some(v) => match parse_duration(v) {
            Ok(d) if d < TimeDelta::zero() => {
                problems.error(&path.key("within"), "must be greater than or equal to 0");
                None
            }
            Ok(d) => Some(d),
            Err(reason) => {
                problems.error(&path.key("within"), format!("`within` {reason}"));
                None
            }
        },
    };
    let count = map
        .get("triggers")
        .and_then(Value::as_array)
        .map_or(0, Vec::len);
    let kind = if type_name == "compound" {
        let require_path = path.key("require");
        let require = match map.get("require") {
            Some(Value::String(s)) if s == "any" => Require::Any,
            Some(Value::String(s)) if s == "all" => Require::All,
            Some(v) if as_integer(v).is_some() => {
                let n = as_integer(v).unwrap_or(0);
                if n < 1 {
                    problems.error(&require_path, "require must be at least 1");
                } else if n as usize > count {
                    problems.error(
                        &require_path,
                        "require must be less than or equal to the number of triggers",
                    );
                }
                Require::Count(n.max(0) as usize)
            }
            Some(other) => {
                problems.error(
                    &require_path,
                    format!("must be \"any\", \"all\" or an integer, got {other}"),
                );
                Require::All
            }
            None => {
                problems.error(&require_path, "is required on compound triggers");
                Require::All
            }
        };
        CompositeKind::Compound(require)
    } else {
        CompositeKind::Sequence
    };
    if count == 0 && map.get("triggers").is_some_and(Value::is_array) {
        problems.warn(
            &triggers_path,
            "no child triggers: this trigger can never fire",
        );
    }
    (problems.error_count() == errors_before).then_some(CompositeTrigger {
        id,
        kind,
        triggers,
        within,
    })
}

/// Reads `expect`/`after`/`for_each`: a list of strings (a set), or one string.
fn parse_name_set(
    map: &Map<String, Value>,
    key: &str,
    path: &FieldPath,
    problems: &mut Problems,
) -> Vec<String> {
    match map.get(key) {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| match item {
                Value::String(s) => Some(s.clone()),
                other => {
                    problems.error(
                        &path.key(key).index(i),
                        format!("must be a string, got {}", json_type_name(other)),
                    );
                    None
                }
            })
            .collect(),
        Some(other) => {
            problems.error(
                &path.key(key),
                format!("must be a list of strings, got {}", json_type_name(other)),
            );
            Vec::new()
        }
    }
}

/// An integer as pydantic's lax mode reads one: ints, and floats with no fractional part.
pub(crate) fn as_integer(value: &Value) -> Option<i64> {
    match value {
        Value::Number(n) => n.as_i64().or_else(|| {
            n.as_f64()
                .filter(|f| f.fract() == 0.0 && f.abs() < 9e15)
                .map(|f| f as i64)
        }),
        _ => None,
    }
}

fn sorted_set(mut items: Vec<String>) -> Vec<String> {
    items.sort();
    items.dedup();
    items.shrink_to_fit();
    items
}

/// Prefect's loop guard (`prevent_run_deployment_loops`): true when a reactive trigger on
/// early flow-run states could launch runs that trigger it again.
pub(crate) fn is_flow_run_loop_risk(trigger: &EventTrigger) -> bool {
    trigger.posture == Posture::Reactive
        && trigger
            .expect
            .iter()
            .any(|e| e.starts_with("prefect.flow-run."))
        && trigger.expect.iter().any(|e| {
            matches!(
                e.as_str(),
                "prefect.flow-run.Scheduled"
                    | "prefect.flow-run.Pending"
                    | "prefect.flow-run.Running"
                    | "prefect.flow-run.*"
            )
        })
}

/// The loop guard's "matches every flow run" check on `match` and `match_related`.
pub(crate) fn matches_every_flow_run(trigger: &EventTrigger) -> bool {
    trigger.match_resource.is_unconstrained_flow_run_spec()
        && (trigger.match_related.is_empty()
            || trigger
                .match_related
                .iter()
                .any(ResourceSpecification::is_unconstrained_flow_run_spec))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn triggers_with_the_same_names_share_one_compiled_set() {
        let names = |expect: &[&str], after: &[&str]| {
            let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
            CompiledNames::shared(&own(expect), &own(after))
        };
        let a = names(&["shared.x.*", "shared.y"], &[]);
        let b = names(&["shared.x.*", "shared.y"], &[]);
        assert!(Arc::ptr_eq(&a, &b), "the same sets share");
        // Same names on the other side, or one more: a set of its own.
        let moved = names(&["shared.x.*"], &["shared.y"]);
        assert!(!Arc::ptr_eq(&a, &moved));
        assert!(moved.is_for(&["shared.x.*".into()], &["shared.y".into()]));
        assert!(!moved.is_for(&["shared.x.*".into(), "shared.y".into()], &[]));
        // Once every holder is gone the next one compiles afresh (and still matches).
        drop((a, b));
        let again = names(&["shared.x.*", "shared.y"], &[]);
        assert!(again.covers.matches("shared.x.1") && !again.covers.matches("other"));
    }

    fn parse(value: Value, dialect: Dialect) -> (Option<Trigger>, Vec<crate::Problem>) {
        let mut problems = Problems::new();
        let t = Trigger::parse(&value, &FieldPath::root(), dialect, "t", &mut problems);
        (t, problems.into_vec())
    }

    /// Prefect 3.8.8 declares `threshold: int` without a bound in both its server and client
    /// trigger models, so a negative threshold loads (with a warning), in both dialects.
    #[test]
    fn a_negative_threshold_loads_with_a_warning_as_prefect_accepts_it() {
        for dialect in [Dialect::Server, Dialect::Client] {
            let (t, problems) = parse(
                json!({"posture": "Reactive", "expect": ["a"], "threshold": -3}),
                dialect,
            );
            let Some(Trigger::Event(t)) = t else {
                panic!("a negative threshold must load: {problems:?}");
            };
            assert_eq!(t.threshold, -3);
            assert!(t.meets_threshold(1), "fires like threshold 1");
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert_eq!(problems[0].severity, crate::Severity::Warning);
            assert_eq!(problems[0].path.to_string(), "threshold");
            assert!(
                problems[0]
                    .reason
                    .contains("threshold -3 fires on every matching event")
            );
        }
        let (_, problems) = parse(
            json!({"posture": "Reactive", "expect": ["a"], "threshold": 1.5}),
            Dialect::Server,
        );
        assert_eq!(problems[0].severity, crate::Severity::Error, "{problems:?}");
    }

    #[test]
    fn server_requires_posture_and_composite_within() {
        let (t, problems) = parse(json!({"type": "event", "expect": ["a"]}), Dialect::Server);
        assert!(t.is_none());
        assert_eq!(problems[0].path.to_string(), "posture");
        let (t, _) = parse(json!({"expect": ["a"]}), Dialect::Client);
        assert!(t.is_some());
        let (t, problems) = parse(
            json!({"type": "sequence", "triggers": [{"posture": "Reactive", "expect": ["a"]}]}),
            Dialect::Server,
        );
        assert!(t.is_none());
        assert_eq!(problems[0].path.to_string(), "within");
    }

    #[test]
    fn proactive_within_rules() {
        let (t, _) = parse(
            json!({"posture": "Proactive", "expect": ["a"]}),
            Dialect::Server,
        );
        let Some(Trigger::Event(t)) = t else {
            panic!("expected an event trigger")
        };
        assert_eq!(t.within, TimeDelta::seconds(10));
        let (t, problems) = parse(
            json!({"posture": "Proactive", "expect": ["a"], "within": 5}),
            Dialect::Server,
        );
        assert!(t.is_none());
        assert!(problems[0].reason.contains("10 seconds"));
        let (t, problems) = parse(
            json!({"posture": "Reactive", "expect": ["a"], "within": -1}),
            Dialect::Server,
        );
        assert!(t.is_none());
        assert_eq!(problems[0].path.to_string(), "within");
    }

    #[test]
    fn composite_type_inference_and_require() {
        let (t, _) = parse(
            json!({"require": "any", "within": null, "triggers": [{"posture": "Reactive", "expect": ["a"]}]}),
            Dialect::Server,
        );
        assert_eq!(t.map(|t| t.type_name()), Some("compound"));
        let (t, problems) = parse(
            json!({"type": "compound", "require": 3, "within": 0, "triggers": [{"posture": "Reactive", "expect": ["a"]}]}),
            Dialect::Server,
        );
        assert!(t.is_none());
        assert!(problems[0].reason.contains("less than or equal"));
        let (t, problems) = parse(json!({"type": "bogus"}), Dialect::Server);
        assert!(t.is_none());
        assert!(problems[0].reason.contains("unknown trigger type"));
    }

    #[test]
    fn name_checks() {
        let (t, problems) = parse(
            json!({"posture": "Reactive", "expect": ["prefect.x.?", "deploy.*"], "after": ["a"]}),
            Dialect::Server,
        );
        let Some(Trigger::Event(t)) = t else {
            panic!("expected an event trigger")
        };
        assert!(problems.iter().any(|p| p.reason.contains("only `*` works")));
        assert!(t.prefilter("deploy.x"));
        assert!(t.prefilter("a"));
        assert!(!t.prefilter("b"));
        assert!(t.expects("deploy.x"));
        assert!(!t.expects("a"));
        assert!(t.starts_after("a"));
    }
}
