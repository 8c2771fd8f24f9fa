//! The pipeline: the single owner of the trigger engine and the writer of the event log.
//!
//! It runs on its own thread (the engine is synchronous, and store commits block), fed by
//! two channels: event submissions from the sources, and control messages (reload, describe,
//! shutdown). Between messages it sleeps until the engine's next deadline, so proactive
//! triggers fire on the wall clock with millisecond precision.
//!
//! For each batch of submissions: append to the log in one durable transaction (dropping ids
//! already stored), evaluate each new event at its `received` time, record the firings
//! (each firing id at most once), then tell the sources the events are safe. Every 1 024 new
//! ids the same transaction also merges one key slice of the store's in-memory recent ids
//! into its id table (see `spur_store`).
//!
//! **Recovery.** On start the last checkpoint is restored and the log after it is replayed
//! through the engine. The engine is deterministic and every event carries its `received`
//! time, so this rebuilds the exact state — including buckets half-counted before a crash — and
//! re-derives the same firing ids, which the store refuses to record twice.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use spur_core::{Automation, Event};
use spur_ingest::{Receipt, Submission};
use spur_matcher::{Bucket, Engine, EngineConfig, EventFate, Firing, FiringState};

/// What `explain` reads back for an event: its fate and every candidate trigger's decision
/// (stored as JSON, see `StoreWriter::put_explanations`).
#[derive(serde::Serialize)]
struct Explanation<'a> {
    fate: &'a EventFate,
    decisions: &'a [spur_matcher::explain::Decision],
    /// Filter mismatches beyond `spur_matcher::explain::MISMATCHES_KEPT`, counted only.
    #[serde(skip_serializing_if = "is_zero")]
    mismatches_omitted: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

use spur_replay::render_firing;
use spur_store::{Appended, Checkpoint, Store, StoreError};
use spur_template::TemplateEngine;
use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::metrics::Metrics;

/// Messages other than events.
#[derive(Debug)]
pub enum Control {
    /// Swap in a new set of automations (unchanged ones keep their state).
    Reload(Vec<Arc<Automation>>),
    /// Report automations and their live state.
    Describe(oneshot::Sender<Description>),
    /// Run a read of the engine between batches (a listing page, one automation's state):
    /// the reader does only the work its answer needs, and sends that answer itself.
    Inspect(Inspect),
    /// Pause (true) or resume (false) an automation; persisted across restarts.
    SetPaused(Uuid, bool, oneshot::Sender<Result<(), String>>),
    /// Drain submissions, checkpoint, stop.
    Shutdown(oneshot::Sender<()>),
}

/// A read of the engine for [`Control::Inspect`].
pub struct Inspect(pub Box<dyn FnOnce(&Engine) + Send>);

impl std::fmt::Debug for Inspect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Inspect")
    }
}

/// One automation with its live trigger state.
#[derive(Debug, Clone)]
pub struct AutomationState {
    /// The automation.
    pub automation: Arc<Automation>,
    /// Open buckets: (trigger id, key, bucket).
    pub buckets: Vec<(Uuid, Vec<String>, Bucket)>,
    /// Its next proactive deadline.
    pub next_deadline: Option<DateTime<Utc>>,
}

/// What `Describe` returns.
#[derive(Debug, Clone)]
pub struct Description {
    /// Every loaded automation.
    pub automations: Vec<AutomationState>,
    /// The engine's next deadline.
    pub next_deadline: Option<DateTime<Utc>>,
    /// The engine clock.
    pub clock: Option<DateTime<Utc>>,
}

/// Pipeline tunables.
#[derive(Debug, Clone)]
pub struct PipelineConfig {
    /// Checkpoint after this many events…
    pub checkpoint_events: u64,
    /// …or this much time.
    pub checkpoint_interval: Duration,
    /// Event-log retention.
    pub retention: Duration,
}

/// A running pipeline.
#[derive(Debug)]
pub struct PipelineHandle {
    /// Control channel.
    pub control: mpsc::Sender<Control>,
    thread: Option<JoinHandle<()>>,
}

impl PipelineHandle {
    /// Asks the pipeline to drain and stop, and waits for its thread.
    pub async fn shutdown(mut self) {
        let (tx, rx) = oneshot::channel();
        if self.control.send(Control::Shutdown(tx)).await.is_ok() {
            let _ = rx.await;
        }
        if let Some(thread) = self.thread.take() {
            let _ = tokio::task::spawn_blocking(move || thread.join()).await;
        }
    }
}

struct Pipeline {
    store: Arc<Store>,
    engine: Engine,
    /// The automations as loaded from files (before pauses are applied).
    loaded: Vec<Arc<Automation>>,
    /// Automations paused by actions or the API.
    paused: std::collections::HashSet<Uuid>,
    templates: TemplateEngine,
    metrics: Arc<Metrics>,
    live: broadcast::Sender<Arc<Event>>,
    fired: broadcast::Sender<Arc<Value>>,
    dispatch: mpsc::UnboundedSender<Dispatch>,
    mirror: Option<watch::Sender<crate::shared_state::StoredCheckpoint>>,
    config: PipelineConfig,
    applied: u64,
    /// The greatest JetStream stream sequence among the batches applied (see
    /// [`Submission::stream_seq`]); carried by checkpoints.
    stream_seq: Option<u64>,
    since_checkpoint: u64,
    last_checkpoint: Instant,
    /// A checkpoint being encoded off this thread, to be written with the next commit.
    encoding: Option<EncodingCheckpoint>,
    last_prune: Option<Instant>,
}

/// How long an encoded checkpoint waits for a batch commit to join before it is written in
/// a commit of its own. Under any steady load a batch comes first.
const CHECKPOINT_IDLE_WAIT: Duration = Duration::from_millis(20);

/// A new firing the pipeline hands to the action executor (`actions.rs`), which depends on
/// the pipeline, never the other way round.
#[derive(Debug)]
pub struct Dispatch {
    /// The firing.
    pub firing: Firing,
    /// Its stored record (with run-deployment parameters already rendered), shared with the
    /// firing's broadcast rather than copied.
    pub record: Arc<Value>,
}

/// A checkpoint whose snapshot the pipeline took and a blocking worker is encoding.
///
/// Why: a checkpoint is mostly the engine's remembered ids (~370 kB of JSON at 10 000 ids).
/// Encoding it and committing it alone, with its own fsync, stalled the pipeline for ~4 ms
/// (up to 10) every second under load (with shared state, acknowledgements wait for
/// checkpoints), and every event arriving meanwhile waited too. Now the pipeline only takes
/// the snapshot; the JSON is written inside the next batch's commit, or alone after
/// [`CHECKPOINT_IDLE_WAIT`] without one.
struct EncodingCheckpoint {
    /// The log position the snapshot covers.
    seq: u64,
    /// Pipeline time spent on it so far (the snapshot).
    spent: Duration,
    /// The encoded checkpoint, or why encoding failed.
    encoded: oneshot::Receiver<Result<Vec<u8>, String>>,
}

/// Where the pipeline's results go.
#[derive(Debug)]
pub struct Outputs {
    /// Every new event (for `/api/events/out`).
    pub live: broadcast::Sender<Arc<Event>>,
    /// Every new firing record.
    pub fired: broadcast::Sender<Arc<Value>>,
    /// Firings with actions to execute.
    pub dispatch: mpsc::UnboundedSender<Dispatch>,
    /// When NATS is configured: every checkpoint, to be stored in JetStream too.
    pub mirror: Option<watch::Sender<crate::shared_state::StoredCheckpoint>>,
}

/// The automations with paused ones disabled.
fn apply_pauses(
    automations: &[Arc<Automation>],
    paused: &std::collections::HashSet<Uuid>,
) -> Vec<Arc<Automation>> {
    automations
        .iter()
        .map(|a| {
            if paused.contains(&a.id) && a.enabled {
                let mut copy = (**a).clone();
                copy.enabled = false;
                Arc::new(copy)
            } else {
                a.clone()
            }
        })
        .collect()
}

/// Recovers state and starts the pipeline thread.
pub fn start(
    store: Arc<Store>,
    automations: Vec<Arc<Automation>>,
    submissions: mpsc::Receiver<Submission>,
    metrics: Arc<Metrics>,
    outputs: Outputs,
    config: PipelineConfig,
    restore_from: Option<Checkpoint>,
) -> Result<PipelineHandle, StoreError> {
    let Outputs {
        live,
        fired,
        dispatch,
        mirror,
    } = outputs;
    let paused: std::collections::HashSet<Uuid> = store
        .get_setting("paused_automations")?
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default();
    let mut engine = Engine::new(EngineConfig::default());
    engine.set_explain(true);
    engine.set_flow_keys(Arc::new(spur_replay::TemplateFlowKeys(
        TemplateEngine::new(),
    )));
    metrics
        .automations
        .store(automations.len() as u64, Ordering::Relaxed);
    engine.load(apply_pauses(&automations, &paused));
    let mut pipeline = Pipeline {
        store,
        engine,
        loaded: automations,
        paused,
        templates: TemplateEngine::new(),
        metrics,
        live,
        fired,
        dispatch,
        mirror,
        config,
        applied: 0,
        stream_seq: None,
        since_checkpoint: 0,
        last_checkpoint: Instant::now(),
        encoding: None,
        last_prune: None,
    };
    if let Some(shared) = restore_from
        && pipeline.store.load_checkpoint()?.is_none()
    {
        // An empty data folder and a checkpoint in JetStream: take over from it. The events
        // after it were never acknowledged, so the stream redelivers them.
        info!("restoring trigger state from the JetStream checkpoint");
        pipeline.engine.restore(&shared.snapshot);
    }
    pipeline.recover()?;
    let (control_tx, control_rx) = mpsc::channel(64);
    let thread = std::thread::Builder::new()
        .name("spur-pipeline".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    error!(error = %e, "cannot start the pipeline runtime");
                    return;
                }
            };
            runtime.block_on(pipeline.run(submissions, control_rx));
        })
        .map_err(|e| StoreError::Corrupt(format!("cannot start the pipeline thread: {e}")))?;
    Ok(PipelineHandle {
        control: control_tx,
        thread: Some(thread),
    })
}

impl Pipeline {
    /// Restores the checkpoint and replays the log after it.
    fn recover(&mut self) -> Result<(), StoreError> {
        if let Some(checkpoint) = self.store.load_checkpoint()? {
            self.engine.restore(&checkpoint.snapshot);
            self.applied = checkpoint.seq;
            self.stream_seq = checkpoint.stream_seq;
        }
        let mut replayed = 0usize;
        loop {
            let chunk = self.store.events_after(self.applied, 4096)?;
            if chunk.is_empty() {
                break;
            }
            for (seq, event) in chunk {
                let received = event.received;
                let firings = self.engine.handle(Arc::new(event), received);
                self.on_firings(firings);
                self.applied = seq;
                replayed += 1;
            }
        }
        if replayed > 0 {
            info!(
                replayed,
                last_seq = self.applied,
                "replayed the event log after the last checkpoint"
            );
        }
        let now = Utc::now();
        let firings = self.engine.advance_to(now);
        self.on_firings(firings);
        self.checkpoint();
        Ok(())
    }

    async fn run(
        mut self,
        mut submissions: mpsc::Receiver<Submission>,
        mut control: mpsc::Receiver<Control>,
    ) {
        let mut intake_open = true;
        loop {
            let mut sleep = self
                .engine
                .next_deadline()
                .map(|d| (d - Utc::now()).to_std().unwrap_or(Duration::ZERO))
                .unwrap_or(Duration::from_secs(3600));
            if self.since_checkpoint > 0 {
                // Wake up to checkpoint even when no more events come.
                let due = self
                    .config
                    .checkpoint_interval
                    .saturating_sub(self.last_checkpoint.elapsed());
                sleep = sleep.min(due);
            }
            if self.encoding.is_some() {
                sleep = sleep.min(CHECKPOINT_IDLE_WAIT);
            }
            tokio::select! {
                biased;
                message = control.recv() => match message {
                    Some(Control::Shutdown(done)) => {
                        // Drain what the sources already handed over, then stop.
                        submissions.close();
                        while let Some(s) = submissions.recv().await {
                            self.process(vec![s]);
                        }
                        self.merge_recent_ids();
                        self.checkpoint();
                        info!(last_seq = self.applied, "pipeline stopped; state checkpointed");
                        let _ = done.send(());
                        return;
                    }
                    Some(Control::SetPaused(id, paused, reply)) => {
                        let _ = reply.send(self.set_paused(id, paused));
                    }
                    Some(Control::Reload(automations)) => {
                        let started = std::time::Instant::now();
                        self.metrics.automations.store(automations.len() as u64, Ordering::Relaxed);
                        let retired = self
                            .engine
                            .load_keeping_old(apply_pauses(&automations, &self.paused));
                        info!(
                            automations = automations.len(),
                            swap_ms = started.elapsed().as_secs_f64() * 1000.0,
                            "engine now runs the reloaded automations"
                        );
                        // Freeing the previous plan (100 000 automations' worth) is not the
                        // pipeline's job: events wait behind it.
                        let dropper = std::thread::Builder::new()
                            .name("spur-retired-plan".into())
                            .spawn(move || drop(retired));
                        if let Err(e) = dropper {
                            warn!(error = %e, "no thread to free the previous plan; freeing it here");
                        }
                        self.loaded = automations;
                        let firings = self.engine.advance_to(Utc::now());
                        self.on_firings(firings);
                        self.checkpoint();
                    }
                    Some(Control::Describe(reply)) => {
                        let _ = reply.send(self.describe());
                    }
                    Some(Control::Inspect(Inspect(read))) => read(&self.engine),
                    None => return,
                },
                first = submissions.recv(), if intake_open => match first {
                    Some(first) => {
                        let mut batch = vec![first];
                        let mut events = batch[0].events.len();
                        while events < 4096 {
                            match submissions.try_recv() {
                                Ok(more) => {
                                    events += more.events.len();
                                    batch.push(more);
                                }
                                Err(_) => break,
                            }
                        }
                        self.process(batch);
                    }
                    None => intake_open = false,
                },
                _ = tokio::time::sleep(sleep) => {
                    self.tick();
                    // Quiet for a while: no batch commit for an encoded checkpoint to join.
                    if let Some((job, bytes)) = self.take_encoded_checkpoint() {
                        self.write_checkpoint_alone(job.seq, bytes, job.spent);
                    }
                }
            }
            self.maybe_checkpoint();
        }
    }

    fn set_paused(&mut self, id: Uuid, paused: bool) -> Result<(), String> {
        if !self.loaded.iter().any(|a| a.id == id) {
            return Err(format!("Automation {id} not found"));
        }
        let changed = if paused {
            self.paused.insert(id)
        } else {
            self.paused.remove(&id)
        };
        if changed {
            let list: Vec<Uuid> = self.paused.iter().copied().collect();
            self.store
                .put_setting("paused_automations", &json!(list))
                .map_err(|e| e.to_string())?;
            self.engine.load(apply_pauses(&self.loaded, &self.paused));
            self.checkpoint();
            info!(automation = %id, paused, "automation {}", if paused { "paused" } else { "resumed" });
        }
        Ok(())
    }

    fn describe(&self) -> Description {
        Description {
            automations: self
                .engine
                .automations()
                .iter()
                .map(|a| AutomationState {
                    automation: a.clone(),
                    buckets: self.engine.buckets_of(a.id),
                    next_deadline: self.engine.next_deadline_of(a.id),
                })
                .collect(),
            next_deadline: self.engine.next_deadline(),
            clock: self.engine.clock(),
        }
    }

    /// Proactive deadlines and other timers due now.
    fn tick(&mut self) {
        let now = Utc::now();
        if let Some(due) = self.engine.next_deadline()
            && due > DateTime::<Utc>::MIN_UTC
        {
            let lag = (now - due).num_microseconds().unwrap_or(0).max(0) as f64 / 1e6;
            self.metrics.timer_lag.observe(lag);
        }
        let firings = self.engine.advance_to(now);
        self.on_firings(firings);
        self.metrics
            .flow_waiting
            .store(self.engine.flow_waiting() as u64, Ordering::Relaxed);
        self.prune_if_due();
    }

    fn process(&mut self, mut batch: Vec<Submission>) {
        // The events move out of their submissions (no copies); each submission keeps its
        // count, which maps the store's answers back to it.
        let counts: Vec<usize> = batch.iter().map(|s| s.events.len()).collect();
        let mut events: Vec<Event> = Vec::with_capacity(counts.iter().sum());
        let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(events.capacity());
        for s in &mut batch {
            events.append(&mut s.events);
            encoded.append(&mut s.encoded);
        }
        // One transaction per batch: the events, and the firings they cause, commit together.
        let result = self.store.writer().and_then(|mut writer| {
            let appended = writer.append_encoded(&events, &encoded)?;
            Ok((writer, appended))
        });
        let (mut writer, appended) = match result {
            Ok(r) => r,
            Err(e) => {
                error!(error = %e, "cannot append to the event log");
                for s in batch {
                    let _ = s.done.send(Err(e.to_string()));
                }
                return;
            }
        };
        let mut receipts = Vec::with_capacity(batch.len());
        let mut firings = Vec::new();
        let mut results = appended.into_iter();
        let mut events = events.into_iter();
        let applied_before = self.applied;
        for count in counts {
            let mut receipt = Receipt::default();
            for _ in 0..count {
                let (Some(event), Some(result)) = (events.next(), results.next()) else {
                    break;
                };
                match result {
                    Appended::Duplicate => receipt.duplicates += 1,
                    Appended::New(seq) => {
                        receipt.accepted += 1;
                        receipt.last_seq = receipt.last_seq.max(seq);
                        let event = Arc::new(event);
                        let started = Instant::now();
                        firings.extend(self.engine.handle(event.clone(), event.received));
                        self.metrics
                            .evaluation
                            .observe(started.elapsed().as_secs_f64());
                        self.metrics.evaluated.fetch_add(1, Ordering::Relaxed);
                        self.applied = seq;
                        receipt.stored.push(event);
                    }
                }
            }
            receipts.push(receipt);
        }
        let records = self.firing_records(&firings);
        // Most events are considered by no trigger at all; those are stored as no record.
        // Only an event from an earlier batch (a released follower) may have a record to clear.
        let stored = || receipts.iter().flat_map(|r: &Receipt| r.stored.iter());
        let stored_count = stored().count();
        let new_ids: std::collections::HashSet<Uuid> = stored().map(|e| e.id).collect();
        let explanations: Vec<(Uuid, Option<Vec<u8>>)> = self
            .engine
            .take_explanations()
            .into_iter()
            .filter_map(|(id, fate, decisions, mismatches_omitted)| {
                if !decisions.is_empty() || fate != EventFate::Evaluated {
                    // Straight to bytes: `{"fate": …, "decisions": […]}`.
                    let explanation = Explanation {
                        fate: &fate,
                        decisions: &decisions,
                        mismatches_omitted,
                    };
                    match serde_json::to_vec(&explanation) {
                        Ok(bytes) => Some((id, Some(bytes))),
                        Err(e) => {
                            warn!(event = %id, error = %e, "cannot encode an event's explanation; explain will not show it");
                            None
                        }
                    }
                } else if new_ids.contains(&id) {
                    None
                } else {
                    Some((id, None))
                }
            })
            .collect();
        let commit_started = Instant::now();
        // Every ID_MERGE_STEP new ids, one key slice of the store's recent-id tier joins its
        // id table, inside this commit (see `StoreWriter::merge_recent_slice`).
        let merge_due = self.store.ids_since_merge_step() >= spur_store::ID_MERGE_STEP;
        let checkpoint = self.take_encoded_checkpoint();
        let committed = writer
            .put_explanations(&explanations)
            .and_then(|()| match &checkpoint {
                Some((_, bytes)) => writer.put_checkpoint_json(bytes),
                None => Ok(()),
            })
            .and_then(|()| {
                if merge_due {
                    writer.merge_recent_slice()?;
                }
                Ok(())
            })
            .and_then(|()| writer.record_firings(&records))
            .and_then(|fresh| writer.commit().map(|()| fresh));
        self.metrics
            .commit
            .observe(commit_started.elapsed().as_secs_f64());
        self.metrics.batches.fetch_add(1, Ordering::Relaxed);
        self.metrics
            .batch_events
            .fetch_add(stored_count as u64, Ordering::Relaxed);
        let fresh = match committed {
            Ok(fresh) => fresh,
            Err(e) => {
                error!(error = %e, "cannot commit a batch; rebuilding trigger state from the log");
                self.applied = applied_before;
                self.rebuild();
                for s in batch {
                    let _ = s.done.send(Err(e.to_string()));
                }
                return;
            }
        };
        self.announce(&firings, &records, &fresh);
        self.since_checkpoint += stored_count as u64;
        if let Some(last) = batch.iter().filter_map(|s| s.stream_seq).max() {
            let seq = self.stream_seq.map_or(last, |seen| seen.max(last));
            self.stream_seq = Some(seq);
            self.metrics.stream_seq.store(seq, Ordering::Relaxed);
        }
        if let Some((job, bytes)) = checkpoint {
            // Its share of the commit is not told apart: count the snapshot.
            self.checkpoint_stored(job.seq, bytes, job.spent);
        }
        if self.live.receiver_count() > 0 {
            for event in stored() {
                let _ = self.live.send(event.clone());
            }
        }
        for (submission, receipt) in batch.into_iter().zip(receipts) {
            let _ = submission.done.send(Ok(receipt));
        }
        self.metrics
            .buckets
            .store(self.engine.stats().buckets as u64, Ordering::Relaxed);
        self.metrics
            .flow_waiting
            .store(self.engine.flow_waiting() as u64, Ordering::Relaxed);
    }

    /// Moves every id appended since it was last merged into the store's id table (at
    /// shutdown, so the next start has little to rebuild; see `spur_store`'s crate docs).
    fn merge_recent_ids(&self) {
        let started = Instant::now();
        let merged = self.store.merge_recent_ids();
        match merged {
            Ok(merged) => tracing::debug!(
                merged,
                ms = started.elapsed().as_secs_f64() * 1e3,
                "merged recent event ids into the id index"
            ),
            Err(e) => warn!(error = %e, "cannot merge recent event ids; they stay in memory"),
        }
    }

    /// After a failed commit the engine is ahead of the log: start over from the checkpoint.
    fn rebuild(&mut self) {
        self.engine = Engine::new(EngineConfig::default());
        self.engine.set_explain(true);
        self.engine
            .set_flow_keys(Arc::new(spur_replay::TemplateFlowKeys(
                TemplateEngine::new(),
            )));
        self.engine.load(apply_pauses(&self.loaded, &self.paused));
        self.applied = 0;
        if let Err(e) = self.recover() {
            error!(error = %e, "cannot rebuild trigger state from the store");
        }
    }

    /// Records firings outside a batch (timers, recovery): each id once, new ones announced.
    fn on_firings(&mut self, firings: Vec<Firing>) {
        // Decisions made outside a batch (recovery replays, timers) are not about new events.
        let _ = self.engine.take_explanations();
        if firings.is_empty() {
            return;
        }
        let records = self.firing_records(&firings);
        match self.store.record_firings(&records) {
            Ok(fresh) => self.announce(&firings, &records, &fresh),
            Err(e) => error!(error = %e, "cannot record firings"),
        }
    }

    /// The stored form of each firing: the rendered actions plus ids and labels. Shared: the
    /// store, the firing broadcast and the executor all read the same record.
    fn firing_records(&self, firings: &[Firing]) -> Vec<(Uuid, Arc<Value>)> {
        firings
            .iter()
            .map(|f| {
                let rendered = render_firing(&self.templates, f);
                let mut record = serde_json::to_value(&rendered).unwrap_or(Value::Null);
                if let Value::Object(map) = &mut record {
                    map.insert("id".into(), json!(f.id));
                    map.insert("automation_id".into(), json!(f.automation.id));
                    map.insert("trigger_id".into(), json!(f.trigger_id));
                    map.insert("labels".into(), f.labels_json());
                    if let Some(flow) = &f.flow {
                        map.insert("flow".into(), json!(&**flow));
                    }
                }
                (f.id, Arc::new(record))
            })
            .collect()
    }

    /// Logs, counts and broadcasts the firings that were new to the store.
    fn announce(&self, firings: &[Firing], records: &[(Uuid, Arc<Value>)], fresh: &[bool]) {
        for ((firing, (_, record)), is_new) in firings.iter().zip(records).zip(fresh) {
            if !is_new {
                continue;
            }
            match firing.state {
                FiringState::Triggered => self.metrics.triggered.fetch_add(1, Ordering::Relaxed),
                FiringState::Resolved => self.metrics.resolved.fetch_add(1, Ordering::Relaxed),
            };
            if let Some(flow) = &firing.flow {
                let m = &self.metrics;
                m.flow_collapsed
                    .fetch_add(flow.count.saturating_sub(1), Ordering::Relaxed);
                if flow.delayed_from.is_some() {
                    m.flow_delayed.fetch_add(1, Ordering::Relaxed);
                }
                if flow.skipped.is_some() {
                    m.flow_skipped.fetch_add(1, Ordering::Relaxed);
                }
            }
            info!(
                automation = %firing.automation.name,
                state = firing.state.as_str(),
                at = %spur_core::time::format_timestamp(firing.at),
                event = ?firing.event.as_ref().map(|e| e.id),
                firing = %firing.id,
                actions = %record.get("actions").unwrap_or(&serde_json::Value::Null),
                "automation fired"
            );
            let _ = self.fired.send(record.clone());
            let _ = self.dispatch.send(Dispatch {
                firing: firing.clone(),
                record: record.clone(),
            });
        }
    }

    /// Starts a checkpoint when one is due (see [`EncodingCheckpoint`]).
    fn maybe_checkpoint(&mut self) {
        let due = self.since_checkpoint >= self.config.checkpoint_events
            || (self.since_checkpoint > 0
                && self.last_checkpoint.elapsed() >= self.config.checkpoint_interval);
        if !due || self.encoding.is_some() {
            return;
        }
        let started = Instant::now();
        let checkpoint = self.snapshot();
        let seq = checkpoint.seq;
        let (done, encoded) = oneshot::channel();
        tokio::task::spawn_blocking(move || {
            let _ = done.send(serde_json::to_vec(&checkpoint).map_err(|e| e.to_string()));
        });
        self.encoding = Some(EncodingCheckpoint {
            seq,
            spent: started.elapsed(),
            encoded,
        });
        self.since_checkpoint = 0;
        self.last_checkpoint = Instant::now();
    }

    /// The encoded checkpoint, if the worker has finished it (else it stays pending).
    fn take_encoded_checkpoint(&mut self) -> Option<(EncodingCheckpoint, Vec<u8>)> {
        let job = self.encoding.as_mut()?;
        let encoded = match job.encoded.try_recv() {
            Err(oneshot::error::TryRecvError::Empty) => return None,
            Ok(encoded) => encoded,
            Err(oneshot::error::TryRecvError::Closed) => Err("the encoder stopped".into()),
        };
        let job = self.encoding.take()?;
        match encoded {
            Ok(bytes) => Some((job, bytes)),
            Err(e) => {
                warn!(error = %e, "cannot encode a checkpoint; the log still has every event");
                None
            }
        }
    }

    /// The engine's state after the last applied event.
    fn snapshot(&self) -> Checkpoint {
        Checkpoint {
            seq: self.applied,
            stream_seq: self.stream_seq,
            snapshot: self.engine.snapshot(),
        }
    }

    /// Writes an encoded checkpoint in a commit of its own (when no batch commit is there to
    /// carry it); `spent` is the pipeline time it took so far. False if it could not.
    fn write_checkpoint_alone(&mut self, seq: u64, bytes: Vec<u8>, spent: Duration) -> bool {
        let started = Instant::now();
        match self.store.save_checkpoint_json(&bytes) {
            Ok(()) => {
                self.checkpoint_stored(seq, bytes, spent + started.elapsed());
                true
            }
            Err(e) => {
                warn!(error = %e, "cannot write a checkpoint; the log still has every event");
                false
            }
        }
    }

    /// Takes and writes a checkpoint now, on this thread (start-up, reload, pause, shutdown:
    /// the state must be stored before going on). A checkpoint still being encoded is older:
    /// it is dropped, never written after this one.
    fn checkpoint(&mut self) {
        self.encoding = None;
        let started = Instant::now();
        let checkpoint = self.snapshot();
        let bytes = match serde_json::to_vec(&checkpoint) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot encode a checkpoint; the log still has every event");
                return;
            }
        };
        if self.write_checkpoint_alone(checkpoint.seq, bytes, started.elapsed()) {
            self.since_checkpoint = 0;
            self.last_checkpoint = Instant::now();
        }
    }

    /// A checkpoint is durable: tell the mirror (shared state), count the pipeline's time.
    fn checkpoint_stored(&mut self, seq: u64, bytes: Vec<u8>, spent: Duration) {
        self.metrics
            .checkpoint_bytes
            .store(bytes.len() as u64, Ordering::Relaxed);
        if let Some(mirror) = &self.mirror {
            let _ = mirror.send(Some((seq, Arc::new(bytes))));
        }
        self.metrics.checkpoint.observe(spent.as_secs_f64());
    }

    fn prune_if_due(&mut self) {
        if self
            .last_prune
            .is_some_and(|t| t.elapsed() < Duration::from_secs(600))
        {
            return;
        }
        self.last_prune = Some(Instant::now());
        let Ok(retention) = chrono::TimeDelta::from_std(self.config.retention) else {
            return;
        };
        let cutoff = Utc::now() - retention;
        match self.store.prune(cutoff, 10_000) {
            Ok(0) => {}
            Ok(n) => info!(removed = n, "pruned events older than the retention period"),
            Err(e) => warn!(error = %e, "cannot prune the event log"),
        }
    }
}
