//! The plan: the loaded automations with their triggers flattened into leaves and
//! composites, and the index over the leaves. Rebuilt by [`Engine::load`] on every reload,
//! carrying each unchanged automation's state over (matched by id and [`fingerprint`]).

// The engine's own types and imports: this is the engine, split by job.
use super::*;

/// A leaf event trigger in the loaded plan.
#[derive(Debug)]
pub(super) struct Leaf {
    pub(super) trigger: Arc<EventTrigger>,
    pub(super) automation: usize,
    pub(super) parent: Option<(usize, usize)>,
}

/// A composite trigger in the loaded plan.
#[derive(Debug)]
pub(super) struct Composite {
    pub(super) id: Uuid,
    pub(super) kind: CompositeKind,
    pub(super) within: Option<TimeDelta>,
    pub(super) expected: usize,
    pub(super) children: usize,
    pub(super) automation: usize,
    pub(super) parent: Option<(usize, usize)>,
}

/// The immutable part: automations, their triggers flattened, and the index.
#[derive(Debug, Default)]
pub(super) struct Plan {
    pub(super) automations: Vec<Arc<Automation>>,
    /// Each automation's [`fingerprint`], computed the first time it is needed: only state
    /// that is kept across a reload or saved in a checkpoint needs one, so loading 100 000
    /// stateless automations never serializes them.
    pub(super) fingerprints: Vec<OnceLock<u64>>,
    pub(super) leaves: Vec<Leaf>,
    pub(super) composites: Vec<Composite>,
    pub(super) index: TriggerIndex,
    pub(super) proactive: Vec<usize>,
    /// Each automation's first leaf (leaves are contiguous per automation), plus one past
    /// the last: automation `i` owns leaves `first_leaf[i]..first_leaf[i + 1]`. Lets the
    /// per-automation reads (`buckets_of`, `next_deadline_of`) touch only its own leaves.
    pub(super) first_leaf: Vec<u32>,
    /// Automation id → its position in `automations`.
    pub(super) by_id: FxHashMap<Uuid, u32>,
}

/// The plan an [`Engine::load_keeping_old`] replaced, to be dropped where it costs nothing.
#[derive(Debug)]
pub struct RetiredPlan {
    pub(super) _plan: Plan,
}

impl Plan {
    /// The fingerprint of the automation at `index`.
    pub(super) fn fingerprint_of(&self, index: usize) -> u64 {
        *self.fingerprints[index].get_or_init(|| fingerprint(&self.automations[index]))
    }

    /// The leaves of the automation `id`, if it is loaded.
    pub(super) fn leaves_of(&self, id: Uuid) -> std::ops::Range<usize> {
        match self.by_id.get(&id) {
            Some(&i) => {
                let i = i as usize;
                self.first_leaf[i] as usize..self.first_leaf[i + 1] as usize
            }
            None => 0..0,
        }
    }
}

impl Engine {
    /// Replaces the loaded automations. Disabled automations are kept but never evaluated.
    ///
    /// An automation that is unchanged (same id and same definition) keeps its trigger state;
    /// a changed or new one starts fresh (as Prefect resets state on every update).
    pub fn load(&mut self, automations: Vec<Arc<Automation>>) {
        drop(self.load_keeping_old(automations));
    }

    /// [`Engine::load`], handing back what the engine no longer needs instead of dropping it
    /// here. Freeing the previous plan of 100 000 automations is a good part of a reload's
    /// time; a caller with events waiting (the daemon's pipeline) drops it elsewhere.
    #[must_use = "dropping the retired plan here is what `load` does"]
    pub fn load_keeping_old(&mut self, automations: Vec<Arc<Automation>>) -> RetiredPlan {
        let old_plan = std::mem::take(&mut self.plan);
        let mut old_leaf_states: HashMap<(Uuid, Uuid), LeafState> = HashMap::new();
        let mut old_composite_states: HashMap<(Uuid, Uuid), CompositeState> = HashMap::new();
        let mut plan = Plan::default();
        // Sized once: one leaf per automation is the common shape.
        let count = automations.len();
        plan.automations.reserve_exact(count);
        plan.fingerprints.reserve_exact(count);
        plan.first_leaf.reserve_exact(count + 1);
        plan.leaves.reserve(count);
        plan.by_id.reserve(count);
        for automation in automations {
            let index = plan.automations.len();
            plan.first_leaf.push(plan.leaves.len() as u32);
            plan.by_id.insert(automation.id, index as u32);
            if automation.enabled {
                flatten(&mut plan, index, &automation.trigger, None);
            }
            plan.fingerprints.push(OnceLock::new());
            plan.automations.push(automation);
        }
        plan.first_leaf.push(plan.leaves.len() as u32);
        // Carry state over for unchanged automations. Only state that exists is looked at
        // (a fresh state is what a changed automation gets anyway), so a reload costs
        // fingerprints in proportion to the live state, not to the automations loaded.
        let leaf_states = std::mem::take(&mut self.leaf_states);
        for (leaf, state) in old_plan.leaves.iter().zip(leaf_states) {
            if !state.is_fresh() {
                let automation = &old_plan.automations[leaf.automation];
                old_leaf_states.insert((automation.id, leaf.trigger.id), state);
            }
        }
        let composite_states = std::mem::take(&mut self.composite_states);
        for (composite, state) in old_plan.composites.iter().zip(composite_states) {
            if !state.is_fresh() {
                let automation = &old_plan.automations[composite.automation];
                old_composite_states.insert((automation.id, composite.id), state);
            }
        }
        // The same automation (the same `Arc`, or an equal definition) as before?
        let unchanged = |plan: &Plan, automation: usize| {
            let a = &plan.automations[automation];
            old_plan.by_id.get(&a.id).is_some_and(|&old| {
                let old = old as usize;
                Arc::ptr_eq(&old_plan.automations[old], a)
                    || old_plan.fingerprint_of(old) == plan.fingerprint_of(automation)
            })
        };
        self.leaf_states = plan
            .leaves
            .iter()
            .map(|leaf| {
                if old_leaf_states.is_empty() {
                    // Nothing (left) to carry over: no lookup per leaf.
                    return LeafState::default();
                }
                let id = plan.automations[leaf.automation].id;
                match old_leaf_states.remove(&(id, leaf.trigger.id)) {
                    Some(state) if unchanged(&plan, leaf.automation) => state,
                    _ => LeafState::default(),
                }
            })
            .collect();
        self.composite_states = plan
            .composites
            .iter()
            .map(|c| {
                let id = plan.automations[c.automation].id;
                let kept = old_composite_states
                    .remove(&(id, c.id))
                    .filter(|_| unchanged(&plan, c.automation));
                kept.unwrap_or_else(|| CompositeState {
                    children: (0..c.children).map(|_| None).collect(),
                })
            })
            .collect();
        plan.index = TriggerIndex::build(plan.leaves.iter().map(|l| &*l.trigger));
        plan.proactive = (0..plan.leaves.len())
            .filter(|&i| plan.leaves[i].trigger.posture == Posture::Proactive)
            .collect();
        // Rebuild the proactive schedule: kept leaves keep their next run, new ones run at once.
        self.timers.clear();
        self.first_pass_pending.clear();
        for &leaf in &plan.proactive {
            match self.leaf_states[leaf].next_run {
                Some(at) => self.timers.push(Reverse((at, leaf))),
                None => self.first_pass_pending.push(leaf),
            }
        }
        self.plan = plan;
        let current = self.flow_automations();
        self.flow.retain(&current);
        RetiredPlan { _plan: old_plan }
    }
}

/// A stable hash of an automation's definition (its canonical JSON).
pub fn fingerprint(automation: &Automation) -> u64 {
    use std::hash::Hasher;
    /// Keys in sorted order everywhere: writing a file's keys in another order is not a
    /// change (JSON objects keep their document order in memory).
    fn canonical(value: &mut serde_json::Value) {
        match value {
            serde_json::Value::Object(map) => {
                map.sort_keys();
                map.values_mut().for_each(canonical);
            }
            serde_json::Value::Array(items) => items.iter_mut().for_each(canonical),
            _ => {}
        }
    }
    let mut value = serde_json::to_value(automation).unwrap_or_default();
    canonical(&mut value);
    let mut hasher = crate::index::FxHasher::default();
    hasher.write(value.to_string().as_bytes());
    hasher.finish()
}

/// Flattens an automation's trigger tree into leaves and composites.
pub(super) fn flatten(
    plan: &mut Plan,
    automation: usize,
    trigger: &Trigger,
    parent: Option<(usize, usize)>,
) {
    match trigger {
        Trigger::Event(t) => plan.leaves.push(Leaf {
            trigger: t.clone(),
            automation,
            parent,
        }),
        Trigger::Composite(c) => {
            let index = plan.composites.len();
            plan.composites.push(composite_info(c, automation, parent));
            for (position, child) in c.triggers.iter().enumerate() {
                flatten(plan, automation, child, Some((index, position)));
            }
        }
    }
}

pub(super) fn composite_info(
    c: &CompositeTrigger,
    automation: usize,
    parent: Option<(usize, usize)>,
) -> Composite {
    Composite {
        id: c.id,
        kind: c.kind,
        within: c.within,
        expected: c.expected_firings(),
        children: c.triggers.len(),
        automation,
        parent,
    }
}
