//! The trigger engine: Prefect's evaluation algorithm, deterministic and I/O-free.
//!
//! The engine owns all trigger state — buckets, composite child firings, the de-duplication
//! memory, parked followers and proactive schedules — and changes it only in response to two
//! calls, both given the time explicitly:
//!
//! * [`Engine::handle`] — one event has arrived at `now`;
//! * [`Engine::advance_to`] — time has passed (proactive deadlines, lost followers, sweeps).
//!
//! The daemon passes the wall clock; `spur replay` passes each event's `occurred`. Everything
//! else follows Prefect's server (`triggers.py`), step for step; the comments cite the steps of
//! prefect-semantics.md §4. Where Prefect polls every 5 s, the engine keeps exact deadlines
//! (a min-heap), so a proactive window ending at `D` is evaluated at exactly `D`.
//!
//! Split by job: `plan.rs` builds what is loaded (triggers flattened, the index, state
//! carried over on reload), `checkpoint.rs` turns the state into an [`EngineSnapshot`] and
//! back; this file evaluates events and time.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use chrono::{DateTime, TimeDelta, Utc};
use spur_core::{
    Automation, CompositeKind, CompositeTrigger, Event, EventTrigger, Posture, Trigger,
};
use uuid::Uuid;

mod checkpoint;
mod plan;

use plan::Plan;
pub use plan::{RetiredPlan, fingerprint};

use crate::explain::{Decision, EventFate, Outcome};
use crate::firing::{Firing, FiringState};
use crate::flow::{FlowKeys, FlowStage};
use crate::index::{CandidateScratch, FxHashMap, TriggerIndex};
use crate::snapshot::{
    BucketSnapshot, ChildSnapshot, CompositeSnapshot, EngineSnapshot, FiringSnapshot, LeafSnapshot,
};

/// Events Prefect's trigger service ignores entirely.
const IGNORED_EVENT: &str = "prefect.log.write";

/// Tunables, with Prefect's defaults.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    /// How long processed event ids are remembered for de-duplication (`None`: forever).
    pub dedupe_window: Option<TimeDelta>,
    /// At most this many ids are remembered; the oldest are forgotten first (`None`: no cap).
    /// Prefect's trigger service remembers 10 000; durable, longer-range de-duplication
    /// belongs to the event log, in front of the engine.
    pub dedupe_capacity: Option<usize>,
    /// How long a follower waits for its leader (Prefect: 15 min).
    pub follower_lookback: TimeDelta,
    /// How deep a chain of parked followers is processed at once (Prefect: 20).
    pub max_follower_depth: usize,
    /// Buckets whose window ended this long ago are dropped (Prefect: 60 s).
    pub expired_bucket_buffer: TimeDelta,
    /// How often that sweep runs, in engine time (Prefect: 5 s).
    pub sweep_interval: TimeDelta,
    /// Use the trigger index (true) or check every trigger (false; for tests).
    pub use_index: bool,
    /// Emit `resolved` firings when a fired proactive trigger's silence ends.
    pub resolve: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            dedupe_window: Some(TimeDelta::minutes(30)),
            dedupe_capacity: Some(10_000),
            follower_lookback: TimeDelta::minutes(15),
            max_follower_depth: 20,
            expired_bucket_buffer: TimeDelta::seconds(60),
            sweep_interval: TimeDelta::seconds(5),
            use_index: true,
            resolve: true,
        }
    }
}

/// A bucket key: the values of the trigger's sorted `for_each` labels.
pub type BucketKey = Box<[Box<str>]>;

/// One counting window (Prefect's `AutomationBucket`).
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    /// Window start (inclusive).
    pub start: DateTime<Utc>,
    /// Window end (exclusive).
    pub end: DateTime<Utc>,
    /// Events counted (may start at −1, see §4.3 step 2).
    pub count: i64,
    /// The most recent event that touched the bucket.
    pub last_event: Option<Arc<Event>>,
}

#[derive(Debug, Default)]
struct LeafState {
    buckets: FxHashMap<BucketKey, Bucket>,
    next_run: Option<DateTime<Utc>>,
    /// Keys whose proactive firing has not been resolved yet → that firing's id.
    unresolved: FxHashMap<BucketKey, Uuid>,
}

impl LeafState {
    /// True when nothing has happened to this leaf yet: the state a new leaf starts with.
    fn is_fresh(&self) -> bool {
        self.buckets.is_empty() && self.next_run.is_none() && self.unresolved.is_empty()
    }
}

#[derive(Debug)]
struct ChildFiring {
    firing: Arc<Firing>,
    at: DateTime<Utc>,
    sequence: u64,
}

#[derive(Debug, Default)]
struct CompositeState {
    children: Vec<Option<ChildFiring>>,
}

impl CompositeState {
    /// True when no child has fired yet: the state a new composite starts with.
    fn is_fresh(&self) -> bool {
        self.children.iter().all(Option::is_none)
    }
}

/// Summary counts for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Automations loaded (enabled or not).
    pub automations: usize,
    /// Leaf event triggers indexed.
    pub leaves: usize,
    /// Open buckets.
    pub buckets: usize,
    /// Events parked waiting for their leader.
    pub held_events: usize,
    /// Event ids remembered for de-duplication.
    pub remembered_ids: usize,
}

/// The trigger engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    config: EngineConfig,
    plan: Plan,
    leaf_states: Vec<LeafState>,
    composite_states: Vec<CompositeState>,
    clock: Option<DateTime<Utc>>,
    timers: BinaryHeap<Reverse<(DateTime<Utc>, usize)>>,
    first_pass_pending: Vec<usize>,
    seen: HashSet<Uuid>,
    seen_order: VecDeque<(DateTime<Utc>, Uuid)>,
    /// Prefect's causal-ordering bookkeeping (`ordering/memory.py`): the latest parked copy
    /// of each event id (`_events`), and per leader the ids waiting for it (`_followers`; an
    /// id waits under several leaders when its copies name different ones). An id is *seen*
    /// only once it has been processed, so a parked id is not seen: a copy of it is evaluated
    /// on its own terms, and a copy that must wait too replaces the parked one.
    held: HashMap<Uuid, HeldEvent>,
    waiting: HashMap<Uuid, Vec<Uuid>>,
    /// `(received + follower_lookback, id)` of every parking (`_waitlist`); an entry whose id
    /// was parked again later, or processed, is stale and skipped.
    release_timers: BinaryHeap<Reverse<(DateTime<Utc>, Uuid)>>,
    next_sweep: Option<DateTime<Utc>>,
    sequence: u64,
    scratch: CandidateScratch,
    /// When set, decisions about each handled event are recorded here (see `explain`).
    explain: Option<Explanations>,
    /// Debounce, batch and throttle between triggers and actions (`flow.rs`).
    flow: FlowStage,
}

/// A parked event: the latest copy of its id that had to wait, and every leader a parked
/// copy of it named (it is listed under each in `Engine::waiting`).
#[derive(Debug)]
struct HeldEvent {
    event: Arc<Event>,
    leaders: Vec<Uuid>,
}

/// Why [`Engine::process`] stopped short (Prefect's `EventArrivedEarly`, `MaxDepthExceeded`).
#[derive(Debug)]
enum Halt {
    Early,
    TooDeep,
}

/// Recorded decisions, per event, until taken.
#[derive(Debug, Default)]
struct Explanations {
    by_event: Vec<(Uuid, EventFate, Vec<Decision>)>,
    /// Per event: filter mismatches kept, and those beyond [`crate::explain::MISMATCHES_KEPT`]
    /// only counted (not even worked out).
    mismatches: HashMap<Uuid, (usize, usize)>,
}

impl Explanations {
    /// Whether another filter mismatch of `event` is kept; counts it either way.
    fn keeps_mismatch(&mut self, event: Uuid) -> bool {
        let (kept, omitted) = self.mismatches.entry(event).or_default();
        if *kept < crate::explain::MISMATCHES_KEPT {
            *kept += 1;
            true
        } else {
            *omitted += 1;
            false
        }
    }
}

impl Engine {
    /// An engine with no automations.
    pub fn new(config: EngineConfig) -> Engine {
        Engine {
            config,
            plan: Plan::default(),
            leaf_states: Vec::new(),
            composite_states: Vec::new(),
            clock: None,
            timers: BinaryHeap::new(),
            first_pass_pending: Vec::new(),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            held: HashMap::new(),
            waiting: HashMap::new(),
            release_timers: BinaryHeap::new(),
            next_sweep: None,
            sequence: 0,
            scratch: CandidateScratch::default(),
            explain: None,
            flow: FlowStage::default(),
        }
    }

    /// Gives the flow stage its key renderer (see [`crate::flow::FlowKeys`]).
    pub fn set_flow_keys(&mut self, keys: Arc<dyn FlowKeys>) {
        self.flow.set_keys(keys);
    }

    /// Firings waiting in the flow stage (open debounces and batches, queued throttled ones).
    pub fn flow_waiting(&self) -> usize {
        self.flow.waiting()
    }

    /// One automation's live flow-control keys (for its page in the UI).
    pub fn flow_keys_of(&self, automation: Uuid) -> Vec<crate::flow::FlowKeyState> {
        self.flow.keys_of(automation)
    }

    /// The loaded automations with flow control, with their fingerprints.
    fn flow_automations(&self) -> BTreeMap<Uuid, (Arc<Automation>, u64)> {
        self.plan
            .automations
            .iter()
            .enumerate()
            .filter(|(_, a)| a.flow.is_some())
            .map(|(i, a)| (a.id, (a.clone(), self.plan.fingerprint_of(i))))
            .collect()
    }

    /// Records why each handled event did or did not affect each candidate trigger, for
    /// [`Engine::take_explanations`]. Off by default (it costs allocations per event).
    pub fn set_explain(&mut self, on: bool) {
        self.explain = on.then(Explanations::default);
    }

    /// The decisions recorded since the last call: `(event id, fate, decisions, filter
    /// mismatches omitted)`. Of the filter mismatches (`Outcome::is_filter_mismatch`) only
    /// the first [`crate::explain::MISMATCHES_KEPT`] per event are kept; every decision that
    /// involved state is.
    pub fn take_explanations(&mut self) -> Vec<(Uuid, EventFate, Vec<Decision>, usize)> {
        let Some(e) = self.explain.as_mut() else {
            return Vec::new();
        };
        let mut mismatches = std::mem::take(&mut e.mismatches);
        std::mem::take(&mut e.by_event)
            .into_iter()
            .map(|(id, fate, decisions)| {
                let omitted = mismatches.remove(&id).map_or(0, |(_, omitted)| omitted);
                (id, fate, decisions, omitted)
            })
            .collect()
    }

    fn note_fate(&mut self, event: Uuid, fate: EventFate) {
        if let Some(e) = self.explain.as_mut() {
            e.by_event.push((event, fate, Vec::new()));
        }
    }

    /// Records a decision about `event` that is the automation's, not one leaf's (flow
    /// control).
    fn note_automation(
        &mut self,
        event: Uuid,
        automation: &Automation,
        trigger_id: Uuid,
        outcome: Outcome,
    ) {
        let Some(e) = self.explain.as_mut() else {
            return;
        };
        let decision = Decision {
            automation: automation.name.clone(),
            automation_id: automation.id,
            trigger_id,
            outcome,
        };
        match e.by_event.iter_mut().rev().find(|(id, _, _)| *id == event) {
            Some((_, _, decisions)) => decisions.push(decision),
            None => e
                .by_event
                .push((event, EventFate::Evaluated, vec![decision])),
        }
    }

    /// Records a decision of one leaf about `event` ([`Engine::note`] minus the mismatch
    /// cap: for a filter mismatch already counted as kept).
    fn note_kept(&mut self, event: Uuid, leaf: usize, outcome: Outcome) {
        let Some(e) = self.explain.as_mut() else {
            return;
        };
        let info = &self.plan.leaves[leaf];
        let automation = &self.plan.automations[info.automation];
        let decision = Decision {
            automation: automation.name.clone(),
            automation_id: automation.id,
            trigger_id: info.trigger.id,
            outcome,
        };
        match e.by_event.iter_mut().rev().find(|(id, _, _)| *id == event) {
            Some((_, _, decisions)) => decisions.push(decision),
            None => e
                .by_event
                .push((event, EventFate::Evaluated, vec![decision])),
        }
    }

    fn note(&mut self, event: Uuid, leaf: usize, outcome: Outcome) {
        let Some(e) = self.explain.as_mut() else {
            return;
        };
        if outcome.is_filter_mismatch() && !e.keeps_mismatch(event) {
            return;
        }
        self.note_kept(event, leaf, outcome);
    }

    /// The loaded automations, in load order.
    pub fn automations(&self) -> &[Arc<Automation>] {
        &self.plan.automations
    }

    /// One loaded automation by id.
    pub fn automation(&self, id: Uuid) -> Option<&Arc<Automation>> {
        let &i = self.plan.by_id.get(&id)?;
        self.plan.automations.get(i as usize)
    }

    /// The engine clock: the latest time it has been given.
    pub fn clock(&self) -> Option<DateTime<Utc>> {
        self.clock
    }

    /// When the engine next needs [`Engine::advance_to`] to be called, if ever.
    pub fn next_deadline(&self) -> Option<DateTime<Utc>> {
        if !self.first_pass_pending.is_empty() {
            return self.clock.or(Some(DateTime::<Utc>::MIN_UTC));
        }
        let timer = self.peek_timer();
        let release = self.release_timers.peek().map(|Reverse((t, _))| *t);
        [timer, release, self.flow.next_deadline()]
            .into_iter()
            .flatten()
            .min()
    }

    /// Counts of live state.
    pub fn stats(&self) -> EngineStats {
        EngineStats {
            automations: self.plan.automations.len(),
            leaves: self.plan.leaves.len(),
            buckets: self.leaf_states.iter().map(|s| s.buckets.len()).sum(),
            held_events: self.held.len(),
            remembered_ids: self.seen.len(),
        }
    }

    /// The next proactive evaluation of one automation's triggers, if it has proactive ones.
    pub fn next_deadline_of(&self, automation: Uuid) -> Option<DateTime<Utc>> {
        self.plan
            .leaves_of(automation)
            .filter(|&leaf| self.plan.leaves[leaf].trigger.posture == Posture::Proactive)
            .filter_map(|leaf| self.leaf_states[leaf].next_run)
            .min()
    }

    /// The open buckets of one automation's leaf triggers: `(trigger id, key, bucket)`.
    pub fn buckets_of(&self, automation: Uuid) -> Vec<(Uuid, Vec<String>, Bucket)> {
        let mut out = Vec::new();
        for i in self.plan.leaves_of(automation) {
            let (leaf, state) = (&self.plan.leaves[i], &self.leaf_states[i]);
            for (key, bucket) in &state.buckets {
                out.push((
                    leaf.trigger.id,
                    key.iter().map(|s| s.to_string()).collect(),
                    bucket.clone(),
                ));
            }
        }
        out.sort_by(|a, b| (a.2.start, &a.1).cmp(&(b.2.start, &b.1)));
        out
    }

    /// Processes everything due up to `now`: proactive deadlines (each at its exact time),
    /// followers whose leader never came, and the bucket sweep. Returns the firings in order.
    pub fn advance_to(&mut self, now: DateTime<Utc>) -> Vec<Firing> {
        let mut out = Vec::new();
        self.advance(now, &mut out);
        out
    }

    /// Handles one event arriving at `now` (after first advancing time to `now`).
    ///
    /// Events named `prefect.log.write` and already-seen (processed) ids are ignored; an
    /// event whose `follows` leader has not been processed is parked (Prefect's causal
    /// ordering). A parked id is not seen yet, so a copy of it is evaluated on its own terms.
    pub fn handle(&mut self, event: Arc<Event>, now: DateTime<Utc>) -> Vec<Firing> {
        let mut out = Vec::new();
        self.advance(now, &mut out);
        if event.event == IGNORED_EVENT {
            self.note_fate(event.id, EventFate::IgnoredLogWrite);
            return out;
        }
        if self.seen.contains(&event.id) {
            self.note_fate(event.id, EventFate::Duplicate);
            return out;
        }
        // Parked (`EventArrivedEarly`) is not an error here: the event waits for its leader.
        let _ = self.process(event, 0, &mut out);
        out
    }

    fn now(&self) -> DateTime<Utc> {
        self.clock.unwrap_or(DateTime::<Utc>::MIN_UTC)
    }

    fn set_clock(&mut self, t: DateTime<Utc>) {
        if self.clock.is_none_or(|c| t > c) {
            self.clock = Some(t);
        }
    }

    fn peek_timer(&self) -> Option<DateTime<Utc>> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    fn advance(&mut self, now: DateTime<Utc>, out: &mut Vec<Firing>) {
        // Proactive triggers not evaluated yet run their first pass at `now` (Prefect runs
        // every proactive trigger once on start; the replay starts at the first event).
        if !self.first_pass_pending.is_empty() {
            let start = self.clock.map_or(now, |c| c.max(now));
            self.set_clock(start);
            let mut pending = std::mem::take(&mut self.first_pass_pending);
            pending.sort_unstable();
            for leaf in pending {
                self.proactive_pass(leaf, start, out);
            }
        }
        loop {
            let timer = self.peek_timer().filter(|t| *t <= now);
            let release = self
                .release_timers
                .peek()
                .map(|Reverse((t, _))| *t)
                .filter(|t| *t <= now);
            // The flow stage's deadlines interleave with the triggers' own, so a firing a
            // proactive pass makes at `t` meets the flow state as it is at `t`. On a tie the
            // flow stage goes first: a debounce quiet for exactly its period is over.
            if let Some(due) = self.flow.next_deadline().filter(|d| *d <= now)
                && timer.is_none_or(|t| due <= t)
                && release.is_none_or(|r| due <= r)
            {
                self.set_clock(due);
                self.flow.advance(due, out);
                continue;
            }
            match (timer, release) {
                (None, None) => break,
                (Some(t), r) if r.is_none_or(|r| t <= r) => {
                    let Some(Reverse((at, leaf))) = self.timers.pop() else {
                        break;
                    };
                    if self.leaf_states[leaf].next_run != Some(at) {
                        continue; // superseded
                    }
                    self.set_clock(at);
                    self.maybe_sweep(at);
                    self.proactive_pass(leaf, at, out);
                }
                (_, Some(t)) => {
                    self.set_clock(t);
                    self.maybe_sweep(t);
                    self.release_lost_followers(t, out);
                }
                _ => break,
            }
        }
        self.flow.advance(now, out);
        self.set_clock(now);
        self.maybe_sweep(self.now());
        self.forget_old_ids();
    }

    /// Releases every parked follower due at `t`, in `occurred` order (§1.5).
    fn release_lost_followers(&mut self, t: DateTime<Utc>, out: &mut Vec<Firing>) {
        let mut released: Vec<Arc<Event>> = Vec::new();
        while let Some(Reverse((at, id))) = self.release_timers.peek().copied() {
            if at > t {
                break;
            }
            self.release_timers.pop();
            // Stale unless the copy parked now is the one this timer was set for.
            let current = self
                .held
                .get(&id)
                .is_some_and(|h| h.event.received + self.config.follower_lookback == at);
            if current && let Some(event) = self.forget_follower(id) {
                released.push(event);
            }
        }
        // The id breaks ties, so the release order never depends on the hash map's order.
        released.sort_by_key(|e| (e.occurred, e.received, e.id));
        for event in released {
            // Prefect evaluates a released follower even if a copy of it was processed
            // meanwhile (`get_lost_followers` does not consult the seen ids). A follower of it
            // parked again behind another leader stops Prefect's release loop (and loses the
            // followers not yet released); Spur releases the rest (docs/prefect-differences.md).
            let _ = self.process(event, 0, out);
        }
    }

    /// Parks `event` behind `leader` (Prefect's `record_follower`): it replaces any parked
    /// copy of its id, which keeps waiting under the leaders it named too.
    fn record_follower(&mut self, event: Arc<Event>, leader: Uuid) {
        let id = event.id;
        let release_at = event.received + self.config.follower_lookback;
        let entry = self.held.entry(id).or_insert_with(|| HeldEvent {
            event: event.clone(),
            leaders: Vec::new(),
        });
        entry.event = event;
        if !entry.leaders.contains(&leader) {
            entry.leaders.push(leader);
            self.waiting.entry(leader).or_default().push(id);
        }
        self.release_timers.push(Reverse((release_at, id)));
    }

    /// Stops tracking parked id `id` (Prefect's `forget_follower`, and the clean-up of
    /// `get_lost_followers`), returning the copy that was parked.
    fn forget_follower(&mut self, id: Uuid) -> Option<Arc<Event>> {
        let held = self.held.remove(&id)?;
        for leader in held.leaders {
            if let Some(ids) = self.waiting.get_mut(&leader) {
                ids.retain(|x| *x != id);
                if ids.is_empty() {
                    self.waiting.remove(&leader);
                }
            }
        }
        Some(held.event)
    }

    fn remember(&mut self, event: &Event) {
        let bounded = self.config.dedupe_window.is_some() || self.config.dedupe_capacity.is_some();
        if self.seen.insert(event.id) && bounded {
            self.seen_order.push_back((self.now(), event.id));
            if let Some(capacity) = self.config.dedupe_capacity {
                while self.seen_order.len() > capacity {
                    if let Some((_, old)) = self.seen_order.pop_front() {
                        self.seen.remove(&old);
                    }
                }
            }
        }
    }

    fn forget_old_ids(&mut self) {
        let Some(window) = self.config.dedupe_window else {
            return;
        };
        let horizon = self.now() - window;
        while let Some(&(at, id)) = self.seen_order.front() {
            if at > horizon {
                break;
            }
            self.seen_order.pop_front();
            self.seen.remove(&id);
        }
    }

    /// Drops buckets whose window ended `expired_bucket_buffer` ago (Prefect's sweep).
    fn maybe_sweep(&mut self, now: DateTime<Utc>) {
        if self.next_sweep.is_some_and(|next| now < next) {
            return;
        }
        self.next_sweep = Some(now + self.config.sweep_interval);
        let horizon = now - self.config.expired_bucket_buffer;
        for state in &mut self.leaf_states {
            if !state.buckets.is_empty() {
                state.buckets.retain(|_, b| b.end > horizon);
            }
        }
    }

    /// Prefect's `reactive_evaluation` with `preceding_event_confirmed`: parks the event if
    /// its leader has not been processed (`Err(Halt::Early)`), else evaluates it, records it
    /// as seen, and processes the followers parked behind it in `occurred` order.
    fn process(
        &mut self,
        event: Arc<Event>,
        depth: usize,
        out: &mut Vec<Firing>,
    ) -> Result<(), Halt> {
        if depth > self.config.max_follower_depth {
            // Left parked (its leader is seen now): the lost-follower release takes it.
            return Err(Halt::TooDeep);
        }
        if let Some(leader) = event.follows
            && leader != event.id
            && self.now() - event.received < self.config.follower_lookback
            && !self.seen.contains(&leader)
        {
            self.note_fate(event.id, EventFate::Held { leader });
            self.record_follower(event, leader);
            return Err(Halt::Early);
        }
        self.remember(&event);
        self.note_fate(event.id, EventFate::Evaluated);
        self.reactive_evaluation(&event, out);
        // (Nothing parked is the usual case: no hashing then.)
        if !self.waiting.is_empty()
            && let Some(ids) = self.waiting.get(&event.id)
        {
            let mut followers: Vec<Arc<Event>> = ids
                .iter()
                .filter_map(|id| self.held.get(id).map(|h| h.event.clone()))
                .collect();
            // The id breaks ties, so the order never depends on the hash map's order.
            followers.sort_by_key(|e| (e.occurred, e.received, e.id));
            for follower in followers {
                match self.process(follower, depth + 1, out) {
                    Ok(()) => {}
                    // Prefect processes only the first followers up to the depth limit.
                    Err(Halt::TooDeep) => break,
                    // A follower whose parked copy names another leader that has not been
                    // processed is parked again, and Prefect's `EventArrivedEarly` leaves
                    // this loop and every enclosing one: the remaining followers stay parked.
                    Err(Halt::Early) => return Err(Halt::Early),
                }
            }
        }
        if !self.held.is_empty() && event.follows.is_some_and(|leader| leader != event.id) {
            // Prefect forgets the parked copy of this id, whichever it was.
            self.forget_follower(event.id);
        }
        Ok(())
    }

    /// §4.3: for each interested trigger, open or find the bucket and evaluate.
    fn reactive_evaluation(&mut self, event: &Arc<Event>, out: &mut Vec<Firing>) {
        let mut scratch = std::mem::take(&mut self.scratch);
        if self.config.use_index {
            self.plan.index.candidates(event, &mut scratch);
        } else {
            scratch.leaves.clear();
            scratch.leaves.extend(0..self.plan.leaves.len() as u32);
        }
        let name = event.event.as_str();
        // Spur's loop guard: an automation never reacts to the `prefect.automation.*` events it
        // caused itself (Prefect would loop forever on an empty `expect`, issue #11470).
        let own_automation = name
            .starts_with("prefect.automation.")
            .then(|| event.resource.id().strip_prefix("prefect.automation."))
            .flatten()
            .and_then(|id| Uuid::parse_str(id).ok());
        for &leaf in &scratch.leaves {
            let leaf = leaf as usize;
            let trigger = &self.plan.leaves[leaf].trigger;
            if !trigger.prefilter(name) || !trigger.covers(event) {
                if let Some(e) = self.explain.as_mut()
                    && e.keeps_mismatch(event.id)
                {
                    let outcome = crate::explain::mismatch(trigger, event);
                    self.note_kept(event.id, leaf, outcome);
                }
                continue;
            }
            if own_automation
                .is_some_and(|id| self.plan.automations[self.plan.leaves[leaf].automation].id == id)
            {
                self.note(event.id, leaf, Outcome::OwnEvent);
                continue;
            }
            let key: BucketKey = trigger
                .bucketing_key(event)
                .into_iter()
                .map(String::into_boxed_str)
                .collect();
            let starts_after = !trigger.after.is_empty() && trigger.starts_after(name);
            let expects = trigger.expects(name);
            let within = trigger.within;
            let has_after = !trigger.after.is_empty();
            if expects {
                self.maybe_resolve(leaf, &key, event, out);
            }
            let state = &mut self.leaf_states[leaf];
            let mut have_bucket = false;
            if starts_after {
                // Step 2: ensure a window starting at this event.
                let initial = if expects { -1 } else { 0 };
                ensure_bucket(
                    state,
                    &key,
                    event.occurred,
                    event.occurred + within,
                    Some(event),
                    initial,
                );
                have_bucket = true;
            }
            if !have_bucket && !has_after && expects {
                // Step 3: first expected event opens a window reaching 15 min back.
                let start = event.occurred - self.config.follower_lookback;
                ensure_bucket(state, &key, start, event.occurred + within, Some(event), 0);
                have_bucket = true;
            }
            let key_strings = || key.iter().map(|k| k.to_string()).collect::<Vec<_>>();
            if !expects {
                let outcome = Outcome::OpenedWindow { key: key_strings() };
                self.note(event.id, leaf, outcome);
                continue;
            }
            if !have_bucket && !state.buckets.contains_key(&key) {
                // Step 4: an expected event with no open window is ignored.
                let outcome = Outcome::NoOpenWindow { key: key_strings() };
                self.note(event.id, leaf, outcome);
                continue;
            }
            let late_start = state
                .buckets
                .get(&key)
                .filter(|b| event.occurred < b.start)
                .map(|b| b.start);
            let fired_before = out.len();
            self.evaluate(leaf, &key, event.occurred, Some(event), out);
            if self.explain.is_some() {
                let outcome = if let Some(window_start) = late_start {
                    Outcome::Late {
                        key: key_strings(),
                        window_start,
                    }
                } else if out.len() > fired_before {
                    Outcome::Fired {
                        firings: out[fired_before..].iter().map(|f| f.id).collect(),
                    }
                } else {
                    let threshold = self.plan.leaves[leaf].trigger.threshold;
                    match self.leaf_states[leaf].buckets.get(&key) {
                        Some(b) => Outcome::Counted {
                            key: key_strings(),
                            count: b.count,
                            threshold,
                            window_start: b.start,
                            window_end: b.end,
                        },
                        // Fired into a composite parent that is not complete yet.
                        None => Outcome::Fired {
                            firings: Vec::new(),
                        },
                    }
                };
                self.note(event.id, leaf, outcome);
            }
        }
        self.scratch = scratch;
    }

    /// §4.6: one proactive pass over a trigger at `as_of`; schedules the next one.
    fn proactive_pass(&mut self, leaf: usize, as_of: DateTime<Utc>, out: &mut Vec<Firing>) {
        let trigger = &self.plan.leaves[leaf].trigger;
        let within = trigger.within;
        let threshold = trigger.threshold;
        let mut run_again_at = as_of + within;
        let state = &mut self.leaf_states[leaf];
        if trigger.for_each.is_empty() {
            ensure_bucket(state, &BucketKey::default(), as_of, as_of + within, None, 0);
        }
        state.buckets.retain(|_, b| b.count < threshold);
        let mut keys: Vec<(DateTime<Utc>, BucketKey)> = state
            .buckets
            .iter()
            .map(|(k, b)| (b.start, k.clone()))
            .collect();
        keys.sort();
        for (_, key) in keys {
            if let Some(next_end) = self.evaluate(leaf, &key, as_of, None, out)
                && as_of < next_end
                && next_end < run_again_at
            {
                run_again_at = next_end;
            }
        }
        self.leaf_states[leaf].next_run = Some(run_again_at);
        self.timers.push(Reverse((run_again_at, leaf)));
    }

    /// §4.4 `evaluate`. Returns the end of the bucket left behind, if any.
    fn evaluate(
        &mut self,
        leaf: usize,
        key: &BucketKey,
        now: DateTime<Utc>,
        event: Option<&Arc<Event>>,
        out: &mut Vec<Firing>,
    ) -> Option<DateTime<Utc>> {
        let trigger = &self.plan.leaves[leaf].trigger;
        let state = &mut self.leaf_states[leaf];
        let bucket = state.buckets.get_mut(key)?;
        let mut count: i64 = i64::from(event.is_some());
        // Step 2: late or redundant event.
        if now < bucket.start {
            return Some(bucket.end);
        }
        // Step 3: count it in this window.
        if count > 0 && (trigger.immediate() || (bucket.start <= now && now < bucket.end)) {
            bucket.count += count;
            bucket.last_event = event.cloned();
            count = 0;
        }
        let ready = trigger.posture == Posture::Reactive || bucket.end <= now;
        let meets = trigger.meets_threshold(bucket.count);
        let (old_start, old_end) = (bucket.start, bucket.end);
        if ready && meets {
            // Step 5: fire, and drop the bucket.
            let triggering = event.cloned().or_else(|| bucket.last_event.clone());
            state.buckets.remove(key);
            let firing_id = leaf_firing_id(
                &self.plan.automations[self.plan.leaves[leaf].automation],
                trigger,
                key,
                old_start,
                old_end,
                triggering.as_deref(),
            );
            let labels = trigger
                .for_each
                .iter()
                .cloned()
                .zip(key.iter().map(|v| v.to_string()))
                .collect();
            if trigger.posture == Posture::Proactive {
                state.unresolved.insert(key.clone(), firing_id);
            }
            let firing = Firing {
                id: firing_id,
                automation: self.plan.automations[self.plan.leaves[leaf].automation].clone(),
                trigger_id: trigger.id,
                state: FiringState::Triggered,
                at: self.now(),
                event: triggering,
                labels,
                children: Vec::new(),
                flow: None,
            };
            let parent = self.plan.leaves[leaf].parent;
            self.fire(parent, firing, out);
        } else if now < old_end {
            // Step 6: not yet; the heartbeat special case restarts the window at this event.
            if let Some(ev) = event
                && trigger.posture == Posture::Proactive
                && !meets
                && trigger.starts_after(&ev.event)
                && trigger.expects(&ev.event)
            {
                let end = ev.occurred + trigger.within;
                state.buckets.insert(
                    key.clone(),
                    Bucket {
                        start: ev.occurred,
                        end,
                        count: 0,
                        last_event: Some(ev.clone()),
                    },
                );
                return Some(end);
            }
            return Some(old_end);
        }
        // Steps 7–9: the window is over (or fired): what comes next?
        let trigger = &self.plan.leaves[leaf].trigger;
        let state = &mut self.leaf_states[leaf];
        if !trigger.after.is_empty() {
            state.buckets.remove(key);
            return None;
        }
        if trigger.within.is_zero() {
            return None;
        }
        let start = old_end.max(now);
        let end = start + trigger.within;
        if trigger.posture == Posture::Reactive && count > 0 {
            state.buckets.insert(
                key.clone(),
                Bucket {
                    start,
                    end,
                    count: 0,
                    last_event: None,
                },
            );
            return self.evaluate(leaf, key, now, event, out);
        }
        state.buckets.insert(
            key.clone(),
            Bucket {
                start,
                end,
                count,
                last_event: None,
            },
        );
        Some(end)
    }

    /// Spur's resolve rule: a top-level proactive trigger that fired for a key resolves when
    /// the next expected event for that key arrives.
    fn maybe_resolve(
        &mut self,
        leaf: usize,
        key: &BucketKey,
        event: &Arc<Event>,
        out: &mut Vec<Firing>,
    ) {
        if !self.config.resolve {
            return;
        }
        let info = &self.plan.leaves[leaf];
        if info.parent.is_some() || info.trigger.posture != Posture::Proactive {
            return;
        }
        let Some(fired) = self.leaf_states[leaf].unresolved.remove(key) else {
            return;
        };
        let automation = self.plan.automations[info.automation].clone();
        let id = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("resolved:{fired}").as_bytes(),
        );
        out.push(Firing {
            id,
            automation,
            trigger_id: info.trigger.id,
            state: FiringState::Resolved,
            at: self.now(),
            event: Some(event.clone()),
            labels: info
                .trigger
                .for_each
                .iter()
                .cloned()
                .zip(key.iter().map(|v| v.to_string()))
                .collect(),
            children: Vec::new(),
            flow: None,
        });
    }

    /// §4.7: a firing goes to the automation, or up into its composite parent.
    fn fire(&mut self, parent: Option<(usize, usize)>, firing: Firing, out: &mut Vec<Firing>) {
        let Some((composite, position)) = parent else {
            let now = self.now();
            let fingerprint = self
                .plan
                .by_id
                .get(&firing.automation.id)
                .map(|&i| self.plan.fingerprint_of(i as usize))
                .unwrap_or_default();
            let explained = self.explain.is_some() && firing.automation.flow.is_some();
            let (id, event, automation, trigger) = (
                firing.id,
                firing.event.as_ref().map(|e| e.id),
                firing.automation.clone(),
                firing.trigger_id,
            );
            let before = out.len();
            self.flow.offer(firing, fingerprint, now, out);
            if explained && let Some(event) = event {
                let outcome = match self.flow.take_wait() {
                    Some(w) => Some(Outcome::FlowWaiting {
                        firing: id,
                        flow: w.kind,
                        key: w.key,
                        waiting: w.waiting,
                        until: w.until,
                    }),
                    None => out[before..].iter().find_map(|f| {
                        let reason = f.flow.as_ref()?.skipped.clone()?;
                        (f.id == id).then_some(Outcome::FlowSkipped { firing: id, reason })
                    }),
                };
                if let Some(outcome) = outcome {
                    self.note_automation(event, &automation, trigger, outcome);
                }
            }
            return;
        };
        let info = &self.plan.composites[composite];
        let (id, kind, within, expected, grandparent) =
            (info.id, info.kind, info.within, info.expected, info.parent);
        let automation = self.plan.automations[info.automation].clone();
        let now = self.now();
        let firing = Arc::new(firing);
        if expected == 1 {
            let parent_firing = Firing {
                id: Uuid::new_v5(
                    &spur_core::SPUR_NAMESPACE,
                    format!("{id}:{}", firing.id).as_bytes(),
                ),
                automation,
                trigger_id: id,
                state: FiringState::Triggered,
                at: now,
                event: firing.event.clone(),
                labels: Vec::new(),
                children: vec![firing],
                flow: None,
            };
            self.fire(grandparent, parent_firing, out);
            return;
        }
        let state = &mut self.composite_states[composite];
        if let Some(within) = within {
            let horizon = now - within;
            for slot in &mut state.children {
                if slot.as_ref().is_some_and(|c| c.at < horizon) {
                    *slot = None;
                }
            }
        }
        self.sequence += 1;
        state.children[position] = Some(ChildFiring {
            firing: firing.clone(),
            at: now,
            sequence: self.sequence,
        });
        let present: Vec<(usize, &ChildFiring)> = state
            .children
            .iter()
            .enumerate()
            .filter_map(|(i, c)| c.as_ref().map(|c| (i, c)))
            .collect();
        let ready = match kind {
            CompositeKind::Compound(_) => present.len() >= expected,
            CompositeKind::Sequence => {
                let mut order = present.clone();
                order.sort_by_key(|(_, c)| (c.at, c.sequence));
                order.len() == state.children.len()
                    && order
                        .iter()
                        .enumerate()
                        .all(|(want, (got, _))| want == *got)
            }
        };
        if !ready {
            return;
        }
        let mut children: Vec<(DateTime<Utc>, u64, Arc<Firing>)> = present
            .iter()
            .map(|(_, c)| (c.at, c.sequence, c.firing.clone()))
            .collect();
        children.sort_by_key(|(at, seq, _)| (*at, *seq));
        let seed: Vec<String> = children.iter().map(|(_, _, f)| f.id.to_string()).collect();
        for slot in &mut state.children {
            *slot = None;
        }
        let parent_firing = Firing {
            id: Uuid::new_v5(
                &spur_core::SPUR_NAMESPACE,
                format!("{id}:{}", seed.join(",")).as_bytes(),
            ),
            automation,
            trigger_id: id,
            state: FiringState::Triggered,
            at: now,
            event: firing.event.clone(),
            labels: Vec::new(),
            children: children.into_iter().map(|(_, _, f)| f).collect(),
            flow: None,
        };
        self.fire(grandparent, parent_firing, out);
    }
}

/// `ensure_bucket`: insert if absent; if present only refresh `last_event` (when given).
fn ensure_bucket(
    state: &mut LeafState,
    key: &BucketKey,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    last_event: Option<&Arc<Event>>,
    initial_count: i64,
) {
    match state.buckets.get_mut(key) {
        Some(bucket) => {
            if let Some(event) = last_event {
                bucket.last_event = Some(event.clone());
            }
        }
        None => {
            state.buckets.insert(
                key.clone(),
                Bucket {
                    start,
                    end,
                    count: initial_count,
                    last_event: last_event.cloned(),
                },
            );
        }
    }
}

/// A leaf firing's id: stable for the same automation, trigger, bucket, window and event.
fn leaf_firing_id(
    automation: &Automation,
    trigger: &EventTrigger,
    key: &BucketKey,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
    event: Option<&Event>,
) -> Uuid {
    let seed = format!(
        "{}:{}:{}:{}:{}:{}",
        automation.id,
        trigger.id,
        key.join("\u{1f}"),
        start.timestamp_micros(),
        end.timestamp_micros(),
        event.map(|e| e.id.to_string()).unwrap_or_default()
    );
    // Time-ordered at the window start, which is part of the seed (so a replay derives the
    // same id even if it fires at a slightly different moment).
    spur_core::time_ordered_id(start.timestamp_millis(), &seed)
}
