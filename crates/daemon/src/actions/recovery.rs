//! After a restart: the runs a previous daemon left unsettled.
//!
//! A run's record and its state events are written apart (the record in the local store,
//! the events through the log), and a crash can fall between them, or while the run's
//! program was running. At start, before any firing is dispatched, the executor looks at
//! every unsettled run once: it completes the run's log (the state events the record has
//! and the log lacks), then decides what can be known of an unfinished run
//! ([`RecoveryVerdict`]): it continues when its work provably never started (a command run
//! without a start marker) or its launcher reconciles (Prefect, workers); otherwise it is
//! Crashed, saying how we know, and rerun if its deployment asks for that.

use chrono::Utc;
use serde_json::Value;
use spur_action::deployment::OnCrash;
use spur_action::launcher;
use spur_action::{Deployment, Launcher, Run, RunState};
use spur_core::Event;
use tracing::{info, warn};
use uuid::Uuid;

use super::Executor;

/// Runs recovered at once after a restart (see [`Executor::recover`]).
const RECOVERY_IN_FLIGHT: usize = 64;

impl Executor {
    /// After a restart: settles the runs a previous daemon left unsettled (see
    /// `spur_store::Store::unsettled_runs`). Each run's log is completed first (the events of
    /// states its record has but the log lacks, in order: a crash between the two writes cuts
    /// off at most the last). Then each unfinished run continues or becomes Crashed, by what
    /// can be known of it ([`RecoveryVerdict`]). Returns how many of each.
    pub async fn recover(&self) -> Recovered {
        let store = self.inner.store.clone();
        let read = tokio::task::spawn_blocking(move || store.unsettled_runs())
            .await
            .map_err(|e| e.to_string())
            .and_then(|runs| runs.map_err(|e| e.to_string()));
        let runs = match read {
            Ok(runs) => runs,
            Err(e) => {
                warn!(error = %e, "cannot read the runs to recover");
                return Recovered::default();
            }
        };
        // Each run's recovery waits for its events to be durable (through the stream, with
        // --nats-log): many at once, or a restart under load recovers hundreds of runs one
        // round trip at a time before it listens.
        use futures_util::StreamExt;
        let recovered = futures_util::stream::iter(runs)
            .map(|value| self.recover_one(value))
            .buffer_unordered(RECOVERY_IN_FLIGHT)
            .fold(Recovered::default(), |mut total, one| async move {
                total.continued += one.continued;
                total.crashed += one.crashed;
                total.rerun += one.rerun;
                total
            })
            .await;
        if recovered != Recovered::default() {
            info!(
                continued = recovered.continued,
                crashed = recovered.crashed,
                rerun = recovered.rerun,
                "runs recovered after a restart"
            );
        }
        recovered
    }

    /// Recovers one unsettled run (see [`Executor::recover`]).
    async fn recover_one(&self, value: Value) -> Recovered {
        let mut recovered = Recovered::default();
        let Ok(mut run) = serde_json::from_value::<Run>(value) else {
            return recovered;
        };
        self.complete_log(&run).await;
        if run.state.is_final() {
            self.settle(&run).await;
            return recovered;
        }
        let deployment = self.find(Some(run.deployment_id), Some(&run.deployment));
        match self.verdict(&run, deployment.as_ref()) {
            RecoveryVerdict::Continue => {
                recovered.continued += 1;
                info!(run = %run.id, deployment = %run.deployment, state = run.state.name(), "continuing a run the daemon's restart interrupted");
                let launcher = deployment.and_then(|d| d.launcher);
                self.spawn_drive(run, launcher, true);
            }
            RecoveryVerdict::Crashed(message) => {
                recovered.crashed += 1;
                warn!(run = %run.id, deployment = %run.deployment, %message, "run crashed by the daemon's restart");
                let event = run.transition(RunState::Crashed, Some(message), Utc::now());
                self.store_and_emit(&run, event).await;
                if deployment.is_some_and(|d| d.on_crash == OnCrash::Rerun) {
                    let key = format!("rerun:{}", run.id);
                    match self.rerun_with_key(run.id, Some(key)).await {
                        Ok(_) => recovered.rerun += 1,
                        Err(e) => warn!(run = %run.id, error = %e, "on_crash: rerun failed"),
                    }
                }
            }
        }
        recovered
    }

    /// Emits the state events of `run` that are not in the log (in history order).
    async fn complete_log(&self, run: &Run) {
        let store = self.inner.store.clone();
        let ids: Vec<Uuid> = run.history.iter().map(|h| h.event_id).collect();
        let missing = tokio::task::spawn_blocking(move || {
            ids.iter()
                .map(|id| store.get_event(*id).map(|e| e.is_none()).unwrap_or(true))
                .collect::<Vec<bool>>()
        })
        .await
        .unwrap_or_default();
        let events: Vec<Event> = missing
            .iter()
            .enumerate()
            .filter(|(_, missing)| **missing)
            .filter_map(|(i, _)| run.state_event(i))
            .collect();
        if events.is_empty() {
            return;
        }
        info!(run = %run.id, events = events.len(), "emitting run state events a crash cut off");
        if let Err(e) = self.inner.own_events.submit(events).await {
            warn!(run = %run.id, error = %e, "cannot emit a run's missing state events");
        }
    }

    /// What a restart does with an unfinished run: whether its work can have started.
    fn verdict(&self, run: &Run, deployment: Option<&Deployment>) -> RecoveryVerdict {
        use RecoveryVerdict::{Continue, Crashed};
        let Some(deployment) = deployment else {
            return Crashed(format!(
                "the daemon restarted, and deployment {:?} is no longer declared",
                run.deployment
            ));
        };
        let not_started = matches!(run.state, RunState::Scheduled | RunState::Pending);
        match &deployment.launcher {
            // Its run fails at once, saying so.
            None => Continue,
            Some(Launcher::Command(_)) => {
                let marker = self
                    .inner
                    .marker_dir
                    .get()
                    .map(|dir| launcher::read_marker(dir, run.id));
                match marker {
                    // The child writes its marker before it runs the program: none, no start.
                    Some(None) if not_started => Continue,
                    Some(Some(pid)) => {
                        let process = run.process.clone().or(pid.map(|pid| {
                            spur_action::run::RunProcess {
                                pid,
                                start_ticks: None,
                            }
                        }));
                        let stopped = process
                            .as_ref()
                            .map(launcher::stop_leftover_group)
                            .unwrap_or_else(|| "its pid is unknown".into());
                        if let Some(dir) = self.inner.marker_dir.get() {
                            let _ = std::fs::remove_file(launcher::marker_path(dir, run.id));
                        }
                        Crashed(format!(
                            "the daemon stopped while the run's process was running (its start marker shows the program had started{}); {stopped}",
                            process.map(|p| format!(", pid {}", p.pid)).unwrap_or_default()
                        ))
                    }
                    _ if not_started => Crashed(
                        "the daemon restarted before the run started, and without a marker folder it cannot tell whether its process ran"
                            .into(),
                    ),
                    _ => Crashed(
                        "the daemon stopped while the run was Running (recorded before start markers existed)".into(),
                    ),
                }
            }
            Some(Launcher::Http(_)) if not_started => Continue,
            Some(Launcher::Http(_)) => Crashed(
                "the daemon stopped while the run's HTTP request was in flight: it may have reached the receiver (it carried the run's Idempotency-Key)"
                    .into(),
            ),
            // Prefect answers a repeated create_flow_run with the flow run it already has for
            // the run's idempotency key; a worker that has the run is followed, not asked again.
            Some(Launcher::Prefect(_) | Launcher::Worker { .. }) => Continue,
        }
    }

    /// Marks a finished run as needing no look at the next start, and drops its marker.
    pub(super) async fn settle(&self, run: &Run) {
        if let Some(dir) = self.inner.marker_dir.get() {
            let _ = std::fs::remove_file(launcher::marker_path(dir, run.id));
        }
        let store = self.inner.store.clone();
        let id = run.id;
        if !matches!(
            tokio::task::spawn_blocking(move || store.settle_run(id)).await,
            Ok(Ok(()))
        ) {
            warn!(run = %run.id, "cannot settle a run");
        }
    }
}

/// What [`Executor::recover`] did with the runs a previous daemon left unfinished.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// Runs that continued (they had not started, or their launch is idempotent).
    pub continued: usize,
    /// Runs marked Crashed (their work may have started; nothing may repeat it).
    pub crashed: usize,
    /// New runs started for Crashed ones of `on_crash: rerun` deployments.
    pub rerun: usize,
}

/// What a restart does with one unfinished run.
#[derive(Clone, Debug, PartialEq, Eq)]
enum RecoveryVerdict {
    /// Its work provably never started, or its launcher reconciles: take it to its end.
    Continue,
    /// Its work may have started: Crashed, saying how we know.
    Crashed(String),
}
