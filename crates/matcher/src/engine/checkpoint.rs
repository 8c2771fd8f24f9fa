//! Checkpoints: the engine's whole trigger state as an [`EngineSnapshot`], and back.

// The engine's own types and imports: this is the engine, split by job.
use super::*;

impl Engine {
    /// The complete trigger state, for a checkpoint.
    pub fn snapshot(&self) -> EngineSnapshot {
        let leaves = self
            .plan
            .leaves
            .iter()
            .zip(&self.leaf_states)
            // A leaf with no state is restored as fresh anyway: leaving it out keeps the
            // checkpoint proportional to live state, not to the number of automations.
            .filter(|(_, state)| !state.is_fresh())
            .map(|(leaf, state)| LeafSnapshot {
                automation: self.plan.automations[leaf.automation].id,
                fingerprint: self.plan.fingerprint_of(leaf.automation),
                trigger: leaf.trigger.id,
                buckets: state
                    .buckets
                    .iter()
                    .map(|(key, b)| BucketSnapshot {
                        key: key.iter().map(|k| k.to_string()).collect(),
                        start: b.start,
                        end: b.end,
                        count: b.count,
                        last_event: b.last_event.as_ref().map(|e| e.to_json()),
                    })
                    .collect(),
                next_run: state.next_run,
                unresolved: state
                    .unresolved
                    .iter()
                    .map(|(key, id)| (key.iter().map(|k| k.to_string()).collect(), *id))
                    .collect(),
            })
            .collect();
        let composites = self
            .plan
            .composites
            .iter()
            .zip(&self.composite_states)
            .filter(|(_, state)| !state.is_fresh())
            .map(|(c, state)| CompositeSnapshot {
                automation: self.plan.automations[c.automation].id,
                fingerprint: self.plan.fingerprint_of(c.automation),
                trigger: c.id,
                children: state
                    .children
                    .iter()
                    .map(|slot| {
                        slot.as_ref().map(|child| ChildSnapshot {
                            firing: firing_snapshot(&child.firing),
                            at: child.at,
                            sequence: child.sequence,
                        })
                    })
                    .collect(),
            })
            .collect();
        let seen = if self.seen_order.is_empty() && !self.seen.is_empty() {
            let at = self.now();
            self.seen.iter().map(|id| (at, *id)).collect()
        } else {
            self.seen_order.iter().copied().collect()
        };
        EngineSnapshot {
            clock: self.clock,
            leaves,
            composites,
            seen,
            held: {
                let mut held: Vec<&HeldEvent> = self.held.values().collect();
                held.sort_by_key(|h| h.event.id);
                held.iter().map(|h| h.event.to_json()).collect()
            },
            next_sweep: self.next_sweep,
            sequence: self.sequence,
            flow: self.flow.snapshot(firing_snapshot),
        }
    }

    /// Restores a checkpoint into the currently loaded automations of a fresh engine (triggers
    /// the snapshot leaves out had no state). State of automations that changed (or no longer
    /// exist) is dropped; everything else resumes where it was.
    pub fn restore(&mut self, snapshot: &EngineSnapshot) {
        self.clock = snapshot.clock;
        self.next_sweep = snapshot.next_sweep;
        self.sequence = snapshot.sequence;
        let current = self.flow_automations();
        self.flow.restore(&snapshot.flow, &current, restore_firing);
        // Saved states by (automation, trigger): restoring is proportional to what was saved.
        let saved_leaves: HashMap<(Uuid, Uuid), &LeafSnapshot> = snapshot
            .leaves
            .iter()
            .map(|s| ((s.automation, s.trigger), s))
            .collect();
        let saved_composites: HashMap<(Uuid, Uuid), &CompositeSnapshot> = snapshot
            .composites
            .iter()
            .map(|s| ((s.automation, s.trigger), s))
            .collect();
        for (leaf, state) in self.plan.leaves.iter().zip(self.leaf_states.iter_mut()) {
            let automation = &self.plan.automations[leaf.automation];
            let Some(saved) = saved_leaves
                .get(&(automation.id, leaf.trigger.id))
                .filter(|s| s.fingerprint == self.plan.fingerprint_of(leaf.automation))
            else {
                continue;
            };
            state.buckets = saved
                .buckets
                .iter()
                .map(|b| {
                    let key: BucketKey = b.key.iter().map(|k| k.clone().into_boxed_str()).collect();
                    let bucket = Bucket {
                        start: b.start,
                        end: b.end,
                        count: b.count,
                        last_event: b
                            .last_event
                            .as_ref()
                            .and_then(|v| Event::from_stored_json(v).ok())
                            .map(Arc::new),
                    };
                    (key, bucket)
                })
                .collect();
            state.next_run = saved.next_run;
            state.unresolved = saved
                .unresolved
                .iter()
                .map(|(key, id)| {
                    (
                        key.iter().map(|k| k.clone().into_boxed_str()).collect(),
                        *id,
                    )
                })
                .collect();
        }
        for (c, state) in self
            .plan
            .composites
            .iter()
            .zip(self.composite_states.iter_mut())
        {
            let automation = &self.plan.automations[c.automation];
            let Some(saved) = saved_composites
                .get(&(automation.id, c.id))
                .filter(|s| s.fingerprint == self.plan.fingerprint_of(c.automation))
            else {
                continue;
            };
            if saved.children.len() != state.children.len() {
                continue;
            }
            state.children = saved
                .children
                .iter()
                .map(|slot| {
                    slot.as_ref().map(|child| ChildFiring {
                        firing: Arc::new(restore_firing(&child.firing, automation)),
                        at: child.at,
                        sequence: child.sequence,
                    })
                })
                .collect();
        }
        self.seen.clear();
        self.seen_order.clear();
        for (at, id) in &snapshot.seen {
            if self.seen.insert(*id) {
                self.seen_order.push_back((*at, *id));
            }
        }
        self.held.clear();
        self.waiting.clear();
        self.release_timers.clear();
        // Each parked event waits under its own leader again (an id that also waited under a
        // leader named by an earlier copy no longer does: only bare replays have such copies,
        // the daemon's log keeps an id once).
        for value in &snapshot.held {
            let Ok(event) = Event::from_stored_json(value) else {
                continue;
            };
            let Some(leader) = event.follows else {
                continue;
            };
            self.record_follower(Arc::new(event), leader);
        }
        self.timers.clear();
        self.first_pass_pending.clear();
        for &leaf in &self.plan.proactive {
            match self.leaf_states[leaf].next_run {
                Some(at) => self.timers.push(Reverse((at, leaf))),
                None => self.first_pass_pending.push(leaf),
            }
        }
    }
}

pub(super) fn firing_snapshot(f: &Firing) -> FiringSnapshot {
    FiringSnapshot {
        id: f.id,
        trigger_id: f.trigger_id,
        state: f.state.as_str().to_owned(),
        at: f.at,
        event: f.event.as_ref().map(|e| e.to_json()),
        labels: f.labels.clone(),
        children: f.children.iter().map(|c| firing_snapshot(c)).collect(),
        flow: f.flow.as_deref().cloned(),
    }
}

pub(super) fn restore_firing(f: &FiringSnapshot, automation: &Arc<Automation>) -> Firing {
    Firing {
        id: f.id,
        automation: automation.clone(),
        trigger_id: f.trigger_id,
        state: if f.state == "resolved" {
            FiringState::Resolved
        } else {
            FiringState::Triggered
        },
        at: f.at,
        event: f
            .event
            .as_ref()
            .and_then(|v| Event::from_stored_json(v).ok())
            .map(Arc::new),
        labels: f.labels.clone(),
        children: f
            .children
            .iter()
            .map(|c| Arc::new(restore_firing(c, automation)))
            .collect(),
        flow: f.flow.clone().map(Arc::new),
    }
}
