//! The flow stage: what happens to an automation's firings between its trigger and its
//! actions when it has flow control (`debounce`, `batch`, `throttle`; the settings and their
//! rules are in [`spur_core::flow`]).
//!
//! The stage lives inside the [`Engine`](crate::Engine) and runs on the engine's clock, so it
//! is as deterministic as the triggers are: the same events at the same times hand on the
//! same firings, with the same ids, at the same instants. That is what makes it durable: its
//! state is part of the engine's checkpoint, and a restart that replays the log after the
//! checkpoint re-derives every decision. `spur replay` and `spur test` run it on the virtual
//! clock.
//!
//! A firing handed on by the stage is an ordinary [`Firing`] with [`Firing::flow`] set to a
//! [`FlowSummary`] (what was collapsed, delayed or skipped). Its id is derived from the
//! firings it stands for, its `at` is the instant it was handed on.
//!
//! Keys are templates; the matcher does not render templates (it depends on the model only),
//! so its user gives it a [`FlowKeys`] renderer. Without one a key is its template text.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::Arc;

use chrono::{DateTime, TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use spur_core::Automation;
use spur_core::flow::{DEBOUNCE_EVENT_IDS, FlowControl, Keep, Overflow};
use uuid::Uuid;

use crate::firing::{Firing, FiringState};
use crate::snapshot::FiringSnapshot;

/// Renders a flow-control key template against a firing (the daemon and replay give the
/// engine one backed by the template engine).
pub trait FlowKeys: Send + Sync + std::fmt::Debug {
    /// The rendered key, or why it cannot be rendered.
    fn render(&self, template: &str, firing: &Firing) -> Result<String, String>;
}

/// Which setting produced a [`FlowSummary`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowKind {
    /// Collapsed by `debounce`.
    Debounce,
    /// Grouped by `batch`.
    Batch,
    /// Passed (maybe late) or skipped by `throttle`.
    Throttle,
}

/// What flow control did to a firing it handed on. Templates see it as `debounce`, `batch`
/// or `throttle` (by [`FlowSummary::kind`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FlowSummary {
    /// The setting that decided last.
    pub kind: FlowKind,
    /// The rendered key.
    pub key: String,
    /// How many firings this one stands for (1 unless collapsed).
    pub count: u64,
    /// The ids of their events, oldest first (at most
    /// [`DEBOUNCE_EVENT_IDS`](spur_core::flow::DEBOUNCE_EVENT_IDS)).
    pub events: Vec<Uuid>,
    /// When the first of them fired.
    pub first_at: DateTime<Utc>,
    /// When the throttle held it back, if it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delayed_from: Option<DateTime<Utc>>,
    /// Why its actions do not run (a throttle dropped it, or its key failed to render).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skipped: Option<String>,
}

/// A debounce or batch waiting to be handed on.
#[derive(Clone, Debug)]
struct Group {
    automation: Arc<Automation>,
    fingerprint: u64,
    kind: FlowKind,
    first_at: DateTime<Utc>,
    last_at: DateTime<Utc>,
    /// Debounce: the kept firing. Batch: the latest.
    kept: Firing,
    first_id: Uuid,
    count: u64,
    events: Vec<Uuid>,
    /// Batch: every firing, in order.
    members: Vec<Arc<Firing>>,
    /// Its entry in [`FlowStage::deadlines`].
    indexed: Option<DateTime<Utc>>,
}

/// One throttle key: when it last handed firings on, and what waits.
#[derive(Clone, Debug, Default)]
struct Window {
    automation: Option<Arc<Automation>>,
    fingerprint: u64,
    sent: VecDeque<DateTime<Utc>>,
    queue: VecDeque<(Firing, DateTime<Utc>)>,
    /// Its entry in [`FlowStage::deadlines`].
    indexed: Option<DateTime<Utc>>,
}

/// A [`FlowStage::deadlines`] entry: when, groups (0) before windows (1) at one instant, and
/// which.
type Due = (DateTime<Utc>, u8, (Uuid, String));
const GROUP: u8 = 0;
const WINDOW: u8 = 1;

/// The stage's state (see the module docs).
#[derive(Debug, Default)]
pub(crate) struct FlowStage {
    keys: Option<Arc<dyn FlowKeys>>,
    /// `(automation, key)` → open debounce/batch. A `BTreeMap`, so releases at the same
    /// instant come out in one order every time.
    groups: BTreeMap<(Uuid, String), Group>,
    windows: BTreeMap<(Uuid, String), Window>,
    /// Every group's and window's next deadline, so what is due is found by a lookup, not a
    /// scan (a scan per event would be quadratic in the number of live keys).
    deadlines: BTreeSet<Due>,
    /// Where the last offered firing waits, for `explain` (taken by the engine).
    last_wait: Option<FlowWait>,
}

/// One live key of an automation's flow control, for its page in the UI.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowKeyState {
    /// `debounce` or `batch` (an open group), or `throttle` (a window).
    pub kind: FlowKind,
    /// The rendered key.
    pub key: String,
    /// Debounce/batch: the firings collapsed so far. Throttle: the firings queued.
    pub waiting: u64,
    /// Throttle: firings handed on within the current window.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub in_window: Option<usize>,
    /// When the key is next handed on (or, for an idle throttle window, forgotten).
    pub until: Option<DateTime<Utc>>,
}

/// Where an offered firing waits (see [`FlowStage::take_wait`]).
#[derive(Clone, Debug)]
pub(crate) struct FlowWait {
    pub(crate) kind: FlowKind,
    pub(crate) key: String,
    pub(crate) waiting: u64,
    pub(crate) until: Option<DateTime<Utc>>,
}

fn flow_of(automation: &Automation) -> Option<&FlowControl> {
    automation.flow.as_deref().filter(|f| !f.is_empty())
}

impl FlowStage {
    pub(crate) fn set_keys(&mut self, keys: Arc<dyn FlowKeys>) {
        self.keys = Some(keys);
    }

    /// Where the firing last offered waits, if it waits (for `explain`).
    pub(crate) fn take_wait(&mut self) -> Option<FlowWait> {
        self.last_wait.take()
    }

    /// Brings the deadline index up to date for one group or window (present or gone).
    fn reindex(&mut self, kind: u8, slot: &(Uuid, String)) {
        let (old, new) = match kind {
            GROUP => match self.groups.get_mut(slot) {
                Some(g) => {
                    let new = g.deadline();
                    (std::mem::replace(&mut g.indexed, new), new)
                }
                None => (None, None),
            },
            _ => match self.windows.get_mut(slot) {
                Some(w) => {
                    let new = w.deadline();
                    (std::mem::replace(&mut w.indexed, new), new)
                }
                None => (None, None),
            },
        };
        if old == new {
            return;
        }
        if let Some(old) = old {
            self.deadlines.remove(&(old, kind, slot.clone()));
        }
        if let Some(new) = new {
            self.deadlines.insert((new, kind, slot.clone()));
        }
    }

    /// Removes a group with its index entry.
    fn take_group(&mut self, slot: &(Uuid, String)) -> Option<Group> {
        let group = self.groups.remove(slot)?;
        if let Some(at) = group.indexed {
            self.deadlines.remove(&(at, GROUP, slot.clone()));
        }
        Some(group)
    }

    /// Removes a window with its index entry.
    fn drop_window(&mut self, slot: &(Uuid, String)) {
        if let Some(w) = self.windows.remove(slot)
            && let Some(at) = w.indexed
        {
            self.deadlines.remove(&(at, WINDOW, slot.clone()));
        }
    }

    /// Rebuilds the deadline index from scratch (after a reload or a restore).
    fn rebuild_index(&mut self) {
        self.deadlines.clear();
        for (slot, g) in &mut self.groups {
            g.indexed = g.deadline();
            if let Some(at) = g.indexed {
                self.deadlines.insert((at, GROUP, slot.clone()));
            }
        }
        for (slot, w) in &mut self.windows {
            w.indexed = w.deadline();
            if let Some(at) = w.indexed {
                self.deadlines.insert((at, WINDOW, slot.clone()));
            }
        }
    }

    /// Takes a firing the triggers produced at `now`: hands it on into `out` (at once, or
    /// never), or keeps it for later.
    pub(crate) fn offer(
        &mut self,
        firing: Firing,
        fingerprint: u64,
        now: DateTime<Utc>,
        out: &mut Vec<Firing>,
    ) {
        let Some(flow) = flow_of(&firing.automation) else {
            out.push(firing);
            return;
        };
        // Resolutions end an alert; they are not work to collapse or limit.
        if firing.state == FiringState::Resolved {
            out.push(firing);
            return;
        }
        // Whatever was due before this instant goes first.
        self.advance(now, out);
        self.last_wait = None;
        let flow = flow.clone();
        if let Some(debounce) = &flow.debounce {
            let key = match self.key(debounce.key.as_deref(), &firing) {
                Ok(key) => key,
                Err(reason) => return out.push(skipped(firing, FlowKind::Debounce, reason)),
            };
            let slot = (firing.automation.id, key);
            match self.groups.get_mut(&slot) {
                Some(group) => {
                    group.count += 1;
                    group.last_at = now;
                    if let Some(e) = &firing.event
                        && group.events.len() < DEBOUNCE_EVENT_IDS
                    {
                        group.events.push(e.id);
                    }
                    if debounce.keep == Keep::Last {
                        group.kept = firing;
                    }
                }
                None => {
                    let group = Group::new(firing, fingerprint, FlowKind::Debounce, now);
                    self.groups.insert(slot.clone(), group);
                }
            }
            self.reindex(GROUP, &slot);
            self.note_group(&slot);
            return;
        }
        if let Some(batch) = &flow.batch {
            let key = match self.key(batch.key.as_deref(), &firing) {
                Ok(key) => key,
                Err(reason) => return out.push(skipped(firing, FlowKind::Batch, reason)),
            };
            let slot = (firing.automation.id, key);
            let group = match self.groups.get_mut(&slot) {
                Some(group) => {
                    group.count += 1;
                    group.last_at = now;
                    if let Some(e) = &firing.event {
                        group.events.push(e.id);
                    }
                    group.members.push(Arc::new(firing.clone()));
                    group.kept = firing;
                    group
                }
                None => {
                    let mut group = Group::new(firing, fingerprint, FlowKind::Batch, now);
                    group.members.push(Arc::new(group.kept.clone()));
                    self.groups.entry(slot.clone()).or_insert(group)
                }
            };
            if group.count >= u64::from(batch.max_events)
                && let Some(group) = self.take_group(&slot)
            {
                let released = group.release(&slot.1, now);
                self.throttle(released, fingerprint, now, out);
                return;
            }
            self.reindex(GROUP, &slot);
            self.note_group(&slot);
            return;
        }
        self.throttle(firing, fingerprint, now, out);
    }

    fn note_group(&mut self, slot: &(Uuid, String)) {
        self.last_wait = self.groups.get(slot).map(|g| FlowWait {
            kind: g.kind,
            key: slot.1.clone(),
            waiting: g.count,
            until: g.deadline(),
        });
    }

    /// Hands on everything due at or before `now`, each at its own instant, in time order.
    pub(crate) fn advance(&mut self, now: DateTime<Utc>, out: &mut Vec<Firing>) {
        while let Some(first) = self.deadlines.first().cloned() {
            let (at, kind, slot) = first;
            if at > now {
                return;
            }
            if kind == GROUP {
                match self.take_group(&slot) {
                    Some(group) => {
                        let fingerprint = group.fingerprint;
                        let released = group.release(&slot.1, at);
                        self.throttle(released, fingerprint, at, out);
                    }
                    None => {
                        self.deadlines.remove(&(at, kind, slot));
                    }
                }
            } else {
                self.drain_window(&slot, at, out);
                // Progress even if the window is gone or its deadline did not move.
                if self.deadlines.first() == Some(&(at, kind, slot.clone())) {
                    self.deadlines.remove(&(at, kind, slot.clone()));
                    if let Some(w) = self.windows.get_mut(&slot) {
                        w.indexed = None;
                    }
                }
            }
        }
    }

    /// When [`FlowStage::advance`] next has something to hand on.
    pub(crate) fn next_deadline(&self) -> Option<DateTime<Utc>> {
        self.deadlines.first().map(|(at, _, _)| *at)
    }

    /// The live keys of one automation: its open groups, then its throttle windows.
    pub(crate) fn keys_of(&self, automation: Uuid) -> Vec<FlowKeyState> {
        let from = (automation, String::new());
        let groups = self
            .groups
            .range(from.clone()..)
            .take_while(|((id, _), _)| *id == automation)
            .map(|((_, key), g)| FlowKeyState {
                kind: g.kind,
                key: key.clone(),
                waiting: g.count,
                in_window: None,
                until: g.deadline(),
            });
        let windows = self
            .windows
            .range(from..)
            .take_while(|((id, _), _)| *id == automation)
            .map(|((_, key), w)| FlowKeyState {
                kind: FlowKind::Throttle,
                key: key.clone(),
                waiting: w.queue.len() as u64,
                in_window: Some(w.sent.len()),
                until: w.deadline(),
            });
        groups.chain(windows).collect()
    }

    /// Firings waiting in the stage (debounces and batches open, throttled firings queued).
    pub(crate) fn waiting(&self) -> usize {
        self.groups.len() + self.windows.values().map(|w| w.queue.len()).sum::<usize>()
    }

    /// After a reload: state of automations that are gone or changed is dropped; the rest
    /// keeps going with the new `Arc` of its (unchanged) automation.
    pub(crate) fn retain(&mut self, current: &BTreeMap<Uuid, (Arc<Automation>, u64)>) {
        self.groups.retain(|(id, _), g| match current.get(id) {
            Some((automation, fp)) if *fp == g.fingerprint => {
                g.automation = automation.clone();
                g.kept.automation = automation.clone();
                true
            }
            _ => false,
        });
        self.windows.retain(|(id, _), w| match current.get(id) {
            Some((automation, fp)) if *fp == w.fingerprint => {
                w.automation = Some(automation.clone());
                for (f, _) in &mut w.queue {
                    f.automation = automation.clone();
                }
                true
            }
            _ => false,
        });
        self.rebuild_index();
    }

    fn key(&self, template: Option<&str>, firing: &Firing) -> Result<String, String> {
        let Some(template) = template else {
            return Ok(String::new());
        };
        match &self.keys {
            Some(keys) => keys
                .render(template, firing)
                .map_err(|e| format!("its flow-control key did not render: {e}")),
            None => Ok(template.to_owned()),
        }
    }

    /// The throttle step (the last one): hand on, queue or drop.
    fn throttle(
        &mut self,
        firing: Firing,
        fingerprint: u64,
        now: DateTime<Utc>,
        out: &mut Vec<Firing>,
    ) {
        let Some(throttle) = flow_of(&firing.automation).and_then(|f| f.throttle.clone()) else {
            out.push(firing);
            return;
        };
        let key = match self.key(throttle.key.as_deref(), &firing) {
            Ok(key) => key,
            Err(reason) => return out.push(skipped(firing, FlowKind::Throttle, reason)),
        };
        let slot = (firing.automation.id, key);
        let window = self.windows.entry(slot.clone()).or_default();
        window.automation = Some(firing.automation.clone());
        window.fingerprint = fingerprint;
        window.expire(now, throttle.per);
        let full = window.sent.len() >= throttle.limit as usize || !window.queue.is_empty();
        if !full {
            window.sent.push_back(now);
            out.push(firing);
            self.reindex(WINDOW, &slot);
            return;
        }
        match throttle.over {
            Overflow::Delay => {
                window.queue.push_back((firing, now));
                self.last_wait = Some(FlowWait {
                    kind: FlowKind::Throttle,
                    key: slot.1.clone(),
                    waiting: window.queue.len() as u64,
                    until: window.deadline(),
                });
                self.reindex(WINDOW, &slot);
            }
            Overflow::Drop => {
                let reason = format!(
                    "throttled: {} firings within {} s already (over: drop)",
                    throttle.limit,
                    throttle.per.as_seconds_f64()
                );
                let key = slot.1.clone();
                out.push(with_summary(
                    firing,
                    FlowKind::Throttle,
                    &key,
                    now,
                    None,
                    Some(reason),
                ));
            }
        }
    }

    /// Hands on queued firings of one throttle key while its window has room at `now`.
    fn drain_window(&mut self, slot: &(Uuid, String), now: DateTime<Utc>, out: &mut Vec<Firing>) {
        let Some(window) = self.windows.get_mut(slot) else {
            return;
        };
        let Some(throttle) = window
            .automation
            .as_deref()
            .and_then(flow_of)
            .and_then(|f| f.throttle.clone())
        else {
            self.drop_window(slot);
            return;
        };
        window.expire(now, throttle.per);
        while window.sent.len() < throttle.limit as usize {
            let Some((firing, queued_at)) = window.queue.pop_front() else {
                break;
            };
            window.sent.push_back(now);
            out.push(with_summary(
                firing,
                FlowKind::Throttle,
                &slot.1,
                now,
                Some(queued_at),
                None,
            ));
        }
        if window.queue.is_empty() && window.sent.is_empty() {
            self.drop_window(slot);
        } else {
            self.reindex(WINDOW, slot);
        }
    }
}

impl Group {
    fn new(firing: Firing, fingerprint: u64, kind: FlowKind, now: DateTime<Utc>) -> Group {
        Group {
            automation: firing.automation.clone(),
            fingerprint,
            kind,
            first_at: now,
            last_at: now,
            first_id: firing.id,
            count: 1,
            events: firing.event.iter().map(|e| e.id).collect(),
            members: Vec::new(),
            indexed: None,
            kept: firing,
        }
    }

    fn deadline(&self) -> Option<DateTime<Utc>> {
        let flow = flow_of(&self.automation)?;
        match self.kind {
            FlowKind::Debounce => {
                let d = flow.debounce.as_ref()?;
                let quiet = self.last_at + d.period;
                Some(match d.max_wait {
                    Some(max) => quiet.min(self.first_at + max),
                    None => quiet,
                })
            }
            FlowKind::Batch => Some(self.first_at + flow.batch.as_ref()?.max_wait),
            FlowKind::Throttle => None,
        }
    }

    /// The firing this group becomes at `at`.
    fn release(self, key: &str, at: DateTime<Utc>) -> Firing {
        let mut firing = self.kept;
        firing.id = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("flow:{:?}:{}", self.kind, self.first_id).as_bytes(),
        );
        firing.at = at;
        if self.kind == FlowKind::Batch {
            firing.children = self.members;
        }
        firing.flow = Some(Arc::new(FlowSummary {
            kind: self.kind,
            key: key.to_owned(),
            count: self.count,
            events: self.events,
            first_at: self.first_at,
            delayed_from: None,
            skipped: None,
        }));
        firing
    }
}

impl Window {
    fn expire(&mut self, now: DateTime<Utc>, per: TimeDelta) {
        while self.sent.front().is_some_and(|t| *t + per <= now) {
            self.sent.pop_front();
        }
    }

    /// When the head of the queue may go (when the oldest hand-on leaves the window), or,
    /// with nothing queued, when the window is empty and can be forgotten (so idle keys do
    /// not pile up).
    fn deadline(&self) -> Option<DateTime<Utc>> {
        let per = self
            .automation
            .as_deref()
            .and_then(flow_of)
            .and_then(|f| f.throttle.as_ref())
            .map(|t| t.per)?;
        if self.queue.is_empty() {
            return self.sent.back().map(|t| *t + per);
        }
        Some(
            self.sent
                .front()
                .map_or(DateTime::<Utc>::MIN_UTC, |t| *t + per),
        )
    }
}

fn skipped(firing: Firing, kind: FlowKind, reason: String) -> Firing {
    let at = firing.at;
    with_summary(firing, kind, "", at, None, Some(reason))
}

fn with_summary(
    mut firing: Firing,
    kind: FlowKind,
    key: &str,
    at: DateTime<Utc>,
    delayed_from: Option<DateTime<Utc>>,
    skipped: Option<String>,
) -> Firing {
    let previous = firing.flow.take();
    let (count, events, first_at) = match previous.as_deref() {
        Some(p) => (p.count, p.events.clone(), p.first_at),
        None => (1, firing.event.iter().map(|e| e.id).collect(), firing.at),
    };
    if delayed_from.is_some() {
        firing.id = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("flow:delayed:{}", firing.id).as_bytes(),
        );
        firing.at = at;
    }
    firing.flow = Some(Arc::new(FlowSummary {
        // A debounced or batched firing stays one (its `debounce`/`batch` context), however
        // the throttle treated it afterwards.
        kind: previous.as_deref().map_or(kind, |p| p.kind),
        key: previous
            .as_deref()
            .map_or_else(|| key.to_owned(), |p| p.key.clone()),
        count,
        events,
        first_at,
        delayed_from,
        skipped,
    }));
    firing
}

// ---- checkpoints ----

/// The flow stage's state in a checkpoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct FlowSnapshot {
    /// Open debounces and batches.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupSnapshot>,
    /// Throttle windows with their queues.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub windows: Vec<WindowSnapshot>,
}

/// One open debounce or batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSnapshot {
    /// The automation.
    pub automation: Uuid,
    /// Its fingerprint (state is dropped if it changed).
    pub fingerprint: u64,
    /// The rendered key.
    pub key: String,
    /// Debounce or batch.
    pub kind: FlowKind,
    /// First firing's time.
    pub first_at: DateTime<Utc>,
    /// Latest firing's time.
    pub last_at: DateTime<Utc>,
    /// The kept firing.
    pub kept: FiringSnapshot,
    /// The first firing's id (the handed-on firing's id derives from it).
    pub first_id: Uuid,
    /// Firings so far.
    pub count: u64,
    /// Their event ids.
    pub events: Vec<Uuid>,
    /// A batch's firings.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<FiringSnapshot>,
}

/// One throttle key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WindowSnapshot {
    /// The automation.
    pub automation: Uuid,
    /// Its fingerprint.
    pub fingerprint: u64,
    /// The rendered key.
    pub key: String,
    /// When firings were handed on within the window.
    pub sent: Vec<DateTime<Utc>>,
    /// Queued firings with the time each was queued.
    pub queue: Vec<(FiringSnapshot, DateTime<Utc>)>,
}

impl FlowStage {
    pub(crate) fn snapshot(&self, save: impl Fn(&Firing) -> FiringSnapshot) -> FlowSnapshot {
        FlowSnapshot {
            groups: self
                .groups
                .iter()
                .map(|((automation, key), g)| GroupSnapshot {
                    automation: *automation,
                    fingerprint: g.fingerprint,
                    key: key.clone(),
                    kind: g.kind,
                    first_at: g.first_at,
                    last_at: g.last_at,
                    kept: save(&g.kept),
                    first_id: g.first_id,
                    count: g.count,
                    events: g.events.clone(),
                    members: g.members.iter().map(|m| save(m)).collect(),
                })
                .collect(),
            windows: self
                .windows
                .iter()
                .filter(|(_, w)| !w.sent.is_empty() || !w.queue.is_empty())
                .map(|((automation, key), w)| WindowSnapshot {
                    automation: *automation,
                    fingerprint: w.fingerprint,
                    key: key.clone(),
                    sent: w.sent.iter().copied().collect(),
                    queue: w.queue.iter().map(|(f, at)| (save(f), *at)).collect(),
                })
                .collect(),
        }
    }

    pub(crate) fn restore(
        &mut self,
        snapshot: &FlowSnapshot,
        current: &BTreeMap<Uuid, (Arc<Automation>, u64)>,
        load: impl Fn(&FiringSnapshot, &Arc<Automation>) -> Firing,
    ) {
        self.groups.clear();
        self.windows.clear();
        for g in &snapshot.groups {
            let Some((automation, fp)) = current.get(&g.automation) else {
                continue;
            };
            if *fp != g.fingerprint {
                continue;
            }
            self.groups.insert(
                (g.automation, g.key.clone()),
                Group {
                    automation: automation.clone(),
                    fingerprint: g.fingerprint,
                    kind: g.kind,
                    first_at: g.first_at,
                    last_at: g.last_at,
                    kept: load(&g.kept, automation),
                    first_id: g.first_id,
                    count: g.count,
                    events: g.events.clone(),
                    members: g
                        .members
                        .iter()
                        .map(|m| Arc::new(load(m, automation)))
                        .collect(),
                    indexed: None,
                },
            );
        }
        for w in &snapshot.windows {
            let Some((automation, fp)) = current.get(&w.automation) else {
                continue;
            };
            if *fp != w.fingerprint {
                continue;
            }
            self.windows.insert(
                (w.automation, w.key.clone()),
                Window {
                    automation: Some(automation.clone()),
                    fingerprint: w.fingerprint,
                    sent: w.sent.iter().copied().collect(),
                    queue: w
                        .queue
                        .iter()
                        .map(|(f, at)| (load(f, automation), *at))
                        .collect(),
                    indexed: None,
                },
            );
        }
        self.rebuild_index();
    }
}
