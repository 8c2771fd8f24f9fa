//! The action executor: turns firings into runs, and runs into `prefect.flow-run.*` events.
//!
//! The pipeline hands every new firing whose automation has a `run-deployment` action to the
//! executor. For each such action it resolves the deployment (selected by id or name, or
//! inferred from the event's resources), merges and checks the parameters, and creates the run
//! under the idempotency key `<firing id>:<action index>` — a key that can hold only one run,
//! so a firing re-derived after a crash never launches twice. The run is then driven through
//! Scheduled → Pending → Running → Completed/Failed/Crashed; every transition is stored and
//! emitted as an event through the normal intake, so downstream automations see it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use chrono::Utc;
use serde_json::Value;
use spur_action::{Deployment, Run, RunState, launcher};
use spur_core::load::DeploymentRef;
use spur_core::{Automation, Event};
use spur_ingest::Intake;
use spur_store::Store;
use tokio::sync::mpsc;
use tokio::task::AbortHandle;
use tracing::{info, warn};
use uuid::Uuid;

/// A new firing for the executor.
#[derive(Debug)]
pub struct Dispatch {
    /// The firing.
    pub firing_id: Uuid,
    /// Its automation.
    pub automation: Arc<Automation>,
    /// The stored record (rendered actions).
    pub record: Value,
    /// The triggering event, for inferred deployments.
    pub event: Option<Arc<Event>>,
}

/// Starts, tracks and cancels runs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    intake: Intake,
    deployments: RwLock<Vec<Deployment>>,
    running: Mutex<HashMap<Uuid, AbortHandle>>,
    api_url: RwLock<Option<String>>,
}

impl Executor {
    /// An executor emitting through `intake`.
    pub fn new(store: Arc<Store>, intake: Intake) -> Executor {
        Executor {
            inner: Arc::new(Inner {
                store,
                intake,
                deployments: RwLock::new(Vec::new()),
                running: Mutex::new(HashMap::new()),
                api_url: RwLock::new(None),
            }),
        }
    }

    /// The daemon URL given to launched processes as `SPUR_API_URL`.
    pub fn set_api_url(&self, url: String) {
        if let Ok(mut u) = self.inner.api_url.write() {
            *u = Some(url);
        }
    }

    /// Replaces the known deployments; returns one message per declaration that is invalid.
    pub fn set_deployments(&self, declared: &[DeploymentRef]) -> Vec<String> {
        let mut errors = Vec::new();
        let mut parsed = Vec::new();
        for d in declared {
            match Deployment::from_ref(d) {
                Ok(dep) => parsed.push(dep),
                Err(e) => errors.push(format!("deployment {:?}: {e}", d.name)),
            }
        }
        if let Ok(mut current) = self.inner.deployments.write() {
            *current = parsed;
        }
        errors
    }

    /// The known deployments.
    pub fn deployments(&self) -> Vec<Deployment> {
        self.inner
            .deployments
            .read()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    fn find(&self, id: Option<Uuid>, name: Option<&str>) -> Option<Deployment> {
        let deployments = self.inner.deployments.read().ok()?;
        deployments
            .iter()
            .find(|d| id.is_some_and(|id| d.id == id) || name.is_some_and(|n| d.name == n))
            .cloned()
    }

    /// Consumes dispatches until the channel closes.
    pub async fn run(self, mut dispatches: mpsc::UnboundedReceiver<Dispatch>) {
        while let Some(d) = dispatches.recv().await {
            let executor = self.clone();
            tokio::spawn(async move { executor.dispatch(d).await });
        }
    }

    /// Marks runs left unfinished by a previous daemon as Crashed (their processes are gone).
    pub async fn recover(&self) {
        let Ok(runs) = self.inner.store.list_runs(10_000) else {
            return;
        };
        for value in runs {
            let Ok(mut run) = serde_json::from_value::<Run>(value) else {
                continue;
            };
            if run.state.is_final() {
                continue;
            }
            let message = Some("the daemon restarted while the run was in progress".to_owned());
            let event = run.transition(RunState::Crashed, message, Utc::now());
            self.store_and_emit(&run, event).await;
        }
    }

    async fn dispatch(&self, d: Dispatch) {
        let actions = d
            .record
            .get("actions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let resolved = d.record.get("state").and_then(Value::as_str) == Some("resolved");
        let defined: Vec<&spur_core::Action> = if resolved {
            d.automation.actions_on_resolve.iter().collect()
        } else {
            d.automation.triggered_actions().collect()
        };
        for (index, rendered) in actions.iter().enumerate() {
            if rendered.get("type").and_then(Value::as_str) != Some("run-deployment") {
                continue;
            }
            let key = format!("{}:{index}", d.firing_id);
            let automation = &d.automation.name;
            if let Some(error) = rendered.get("error").and_then(Value::as_str) {
                warn!(%automation, action = index, reason = error, "action failed");
                continue;
            }
            let Some(action) = defined.get(index) else {
                continue;
            };
            let deployment = match self.resolve(action, d.event.as_deref()) {
                Ok(dep) => dep,
                Err(reason) => {
                    warn!(%automation, action = index, %reason, "action failed");
                    continue;
                }
            };
            let parameters = rendered.get("parameters").cloned().unwrap_or(Value::Null);
            if let Err(reason) = self
                .start(
                    &deployment,
                    &parameters,
                    Some(key),
                    Some(automation.clone()),
                )
                .await
            {
                warn!(%automation, action = index, %reason, "action failed");
            }
        }
    }

    /// Prefect's `source` rule: selected (`deployment_id` or Spur's `deployment` name), or
    /// inferred from the first involved `prefect.deployment.<uuid>` resource.
    fn resolve(
        &self,
        action: &spur_core::Action,
        event: Option<&Event>,
    ) -> Result<Deployment, String> {
        let inferred = action.field("source").and_then(Value::as_str) == Some("inferred");
        if inferred {
            let event = event.ok_or("No event to infer the deployment")?;
            let id = event
                .involved_resources()
                .filter_map(|r| r.id().strip_prefix("prefect.deployment."))
                .find_map(|s| Uuid::parse_str(s).ok())
                .ok_or("No deployment could be inferred")?;
            return self
                .find(Some(id), None)
                .ok_or_else(|| format!("deployment {id} is not declared"));
        }
        let id = action
            .field("deployment_id")
            .and_then(Value::as_str)
            .and_then(|s| Uuid::parse_str(s).ok());
        let name = action.field("deployment").and_then(Value::as_str);
        self.find(id, name).ok_or_else(|| {
            format!(
                "deployment {} is not declared",
                name.map(str::to_owned)
                    .or(id.map(|i| i.to_string()))
                    .unwrap_or_default()
            )
        })
    }

    /// Creates (once per key) and launches a run. Returns the stored run.
    pub async fn start(
        &self,
        deployment: &Deployment,
        rendered: &Value,
        key: Option<String>,
        automation: Option<String>,
    ) -> Result<Value, String> {
        let parameters = deployment.prepare_parameters(rendered)?;
        let mut run = Run::new(deployment, parameters, key.clone(), automation, Utc::now());
        let scheduled = run.transition(RunState::Scheduled, None, Utc::now());
        let value = serde_json::to_value(&run).map_err(|e| e.to_string())?;
        let store = self.inner.store.clone();
        let id = run.id;
        let (stored, created) =
            tokio::task::spawn_blocking(move || store.create_run(id, key.as_deref(), &value))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
        if !created {
            return Ok(stored);
        }
        self.emit(scheduled).await;
        info!(run = %run.id, deployment = %deployment.name, "run scheduled");
        let executor = self.clone();
        let launcher = deployment.launcher.clone();
        let handle = tokio::spawn(async move { executor.drive(run, launcher).await });
        if let Ok(mut running) = self.inner.running.lock() {
            running.insert(id, handle.abort_handle());
        }
        Ok(stored)
    }

    async fn drive(&self, mut run: Run, launcher: Option<spur_action::Launcher>) {
        let Some(launcher) = launcher else {
            let message = Some(format!("deployment {:?} has no launcher", run.deployment));
            let event = run.transition(RunState::Failed, message, Utc::now());
            self.store_and_emit(&run, event).await;
            self.forget(run.id);
            return;
        };
        let pending = run.transition(RunState::Pending, None, Utc::now());
        self.store_and_emit(&run, pending).await;
        let running = run.transition(RunState::Running, None, Utc::now());
        self.store_and_emit(&run, running).await;
        let api_url = self.inner.api_url.read().ok().and_then(|u| u.clone());
        let outcome = launcher::launch(&launcher, &run, api_url.as_deref()).await;
        run.result = outcome.result;
        let done = run.transition(outcome.state, outcome.message.clone(), Utc::now());
        self.store_and_emit(&run, done).await;
        info!(run = %run.id, state = run.state.name(), message = ?outcome.message, "run finished");
        self.forget(run.id);
    }

    fn forget(&self, id: Uuid) {
        if let Ok(mut running) = self.inner.running.lock() {
            running.remove(&id);
        }
    }

    /// Cancels a run that has not finished.
    pub async fn cancel(&self, id: Uuid) -> Result<Value, String> {
        let store = self.inner.store.clone();
        let value = tokio::task::spawn_blocking(move || store.get_run(id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("no run {id}"))?;
        let mut run: Run = serde_json::from_value(value).map_err(|e| e.to_string())?;
        if run.state.is_final() {
            return Err(format!("run {id} is already {}", run.state.name()));
        }
        if let Some(handle) = self
            .inner
            .running
            .lock()
            .ok()
            .and_then(|mut r| r.remove(&id))
        {
            handle.abort(); // kill_on_drop stops the process
        }
        let event = run.transition(
            RunState::Cancelled,
            Some("Cancelled by a user".into()),
            Utc::now(),
        );
        self.store_and_emit(&run, event).await;
        serde_json::to_value(&run).map_err(|e| e.to_string())
    }

    async fn store_and_emit(&self, run: &Run, event: Event) {
        if let Ok(value) = serde_json::to_value(run) {
            let store = self.inner.store.clone();
            let id = run.id;
            let saved = tokio::task::spawn_blocking(move || store.update_run(id, &value)).await;
            if !matches!(saved, Ok(Ok(()))) {
                warn!(run = %run.id, "cannot store a run state");
            }
        }
        self.emit(event).await;
    }

    async fn emit(&self, event: Event) {
        if let Err(e) = self.inner.intake.submit(vec![event]).await {
            warn!(error = %e, "cannot emit a flow-run event");
        }
    }
}
