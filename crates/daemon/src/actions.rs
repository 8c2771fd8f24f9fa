//! The action executor: what firings set in motion, and the events that record it.
//!
//! For every new firing the pipeline hands over, the executor
//!
//! 1. emits the firing's `prefect.automation.triggered` (or `.resolved`) event;
//! 2. runs each action of the firing in order (`actions` then `actions_on_trigger` for a
//!    triggered firing, `actions_on_resolve` for a resolved one), each as two steps:
//!    **prepare** (render templates, resolve the target: deployment, run, automation, URL) and
//!    **perform** (launch, cancel, call, emit). Transient failures of `perform` are retried with
//!    exponential backoff and jitter, a bounded number of times;
//! 3. emits `prefect.automation.action.triggered` then `.executed` or `.failed` (with the
//!    reason), like Prefect, and dead-letters a prepared action that failed for good, so it can
//!    be retried from `/api/actions/failed`.
//!
//! Runs are created under the idempotency key `<firing id>:<action index>`, a key that holds
//! one run only: a firing re-derived after a crash never launches twice. Runs are driven
//! through Scheduled → Pending → Running → Completed/Failed/Crashed; each transition is stored
//! and emitted as a `prefect.flow-run.<State>` event through the normal intake, so downstream
//! automations see it and work chains.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use spur_action::launcher::{self, LaunchContext};
use spur_action::worker::{Handover, RunRequest};
use spur_action::{Deployment, Launcher, Run, RunState};
use spur_core::flow::OnFull;
use spur_core::load::DeploymentRef;
use spur_core::{Action, Event, EventLimits, Resource};
use spur_ingest::Intake;
use spur_ingest::nats::NatsCounters;
use spur_matcher::{Firing, FiringState, FlowKeys};
use spur_replay::firing_context;
use spur_store::Store;
use spur_template::TemplateEngine;
use tokio::sync::{mpsc, oneshot};
use tokio::task::AbortHandle;
use tracing::{debug, info, warn};
use uuid::Uuid;

use crate::pipeline::{Control, Dispatch};

mod parked;
mod recovery;
use parked::Parked;
pub use recovery::Recovered;

/// How a run is to be started, beyond its deployment and parameters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RunOptions {
    /// How long after its creation it starts (`run-deployment`'s `schedule_after`).
    pub schedule_after: TimeDelta,
    /// Settings for its infrastructure (`job_variables`), passed on as they are.
    pub job_variables: Option<Value>,
    /// The concurrency key whose slot the run holds while in progress (`concurrency:`).
    pub concurrency_key: Option<String>,
}

/// An action with its templates rendered and its target resolved: what a retry re-performs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Prepared {
    /// Log only.
    DoNothing,
    /// Start a run (once per key).
    RunDeployment {
        /// Deployment name.
        deployment: String,
        /// Rendered parameters.
        parameters: Value,
        /// `<firing id>:<action index>`.
        key: String,
        /// The automation's name.
        automation: String,
        /// How long after the firing the run starts (`schedule_after`), in microseconds.
        #[serde(default)]
        schedule_after_us: i64,
        /// The action's `job_variables`, as given (Prefect never templates them).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_variables: Option<Value>,
        /// The firing's rendered `concurrency` key, when its automation limits concurrency.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        concurrency_key: Option<String>,
    },
    /// Create a flow run on the Prefect server (`--prefect-api`) from a deployment Spur does
    /// not declare: the server's workers run it, and the server emits its flow-run events
    /// (which come back through the bridge), so Spur keeps no run record of its own.
    PrefectFlowRun {
        /// The server's deployment.
        deployment_id: Uuid,
        /// Rendered parameters.
        parameters: Value,
        /// Prefect's actions service's key shape (`automation <id>, action <index>,
        /// invocation <id>`), with Spur's deterministic invocation id: a repeat after a
        /// crash finds the same flow run instead of creating a second.
        idempotency_key: String,
        /// The automation (its id and name go in Prefect's `Prefect-Automation-*` headers).
        automation_id: Uuid,
        /// Its name.
        automation: String,
        /// `schedule_after`, in microseconds.
        #[serde(default)]
        schedule_after_us: i64,
        /// `job_variables`, as given.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        job_variables: Option<Value>,
    },
    /// One call to the Prefect server's API (`--prefect-api`): pausing its deployments and
    /// work queues, or (when the flow run is not Spur's) changing a flow run's state.
    PrefectCall {
        /// `POST` or `PATCH`.
        method: String,
        /// Below the API URL: `/deployments/{id}/pause_deployment`.
        path: String,
        /// The JSON body.
        body: Value,
        /// The action's type, for the failure reason.
        action: String,
    },
    /// Pause or resume a work pool on the Prefect server (its API names pools by name, so the
    /// id is looked up first).
    PrefectWorkPoolPaused {
        /// The pool's id.
        work_pool: Uuid,
        /// Pause (true) or resume.
        paused: bool,
    },
    /// Pause or resume an automation.
    SetAutomationPaused {
        /// Its id.
        automation: Uuid,
        /// Pause (true) or resume.
        paused: bool,
    },
    /// Pause or resume a deployment.
    SetDeploymentPaused {
        /// Its name.
        deployment: String,
        /// Pause (true) or resume.
        paused: bool,
    },
    /// Cancel a run.
    CancelRun {
        /// The run.
        run: Uuid,
        /// Why.
        message: String,
    },
    /// Force a run into a state.
    ChangeRunState {
        /// The run.
        run: Uuid,
        /// The new state.
        state: RunState,
        /// Why.
        message: String,
    },
    /// Suspend a Prefect server's flow run (Prefect's `Suspended` state: `PAUSED` that
    /// reschedules, timing out after an hour).
    SuspendRun {
        /// The flow run.
        run: Uuid,
        /// Why.
        message: String,
    },
    /// Resume a Prefect server's paused or suspended flow run.
    ResumeRun {
        /// The flow run.
        run: Uuid,
    },
    /// Delete a Prefect server's flow run.
    DeleteRun {
        /// The flow run.
        run: Uuid,
    },
    /// `call-webhook` / `send-notification` through a block document of the Prefect server:
    /// the block is read when the action is performed (so a retry sees a changed block).
    PrefectBlock {
        /// The block document.
        block_document_id: Uuid,
        /// `call-webhook` or `send-notification`.
        action: String,
        /// call-webhook's rendered `payload`.
        #[serde(default)]
        payload: String,
        /// send-notification's rendered `subject`.
        #[serde(default)]
        subject: String,
        /// send-notification's rendered `body`.
        #[serde(default)]
        body: String,
        /// Sent as `Idempotency-Key`.
        key: String,
    },
    /// An HTTP request (call-webhook, send-notification).
    Http {
        /// Method.
        method: String,
        /// URL.
        url: String,
        /// Headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: String,
        /// Whether a non-2xx answer fails the action (Prefect: not for webhooks).
        require_success: bool,
        /// Sent as `Idempotency-Key`.
        key: String,
    },
    /// Emit an event.
    EmitEvent {
        /// The rendered event.
        event: Value,
    },
}

/// How performing went.
#[derive(Debug)]
enum Failure {
    /// Worth retrying (connection errors, 5xx).
    Transient(String),
    /// Not worth retrying.
    Permanent(String),
}

/// What a performed action produced, for the `.executed` event.
#[derive(Debug, Default)]
struct Outcome {
    related: Vec<Resource>,
    details: Map<String, Value>,
}

/// Starts, tracks and cancels runs; performs actions. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Executor {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<Store>,
    /// Where the executor's own events go (the local intake, or the stream first).
    own_events: crate::own_events::OwnEvents,
    templates: TemplateEngine,
    http: reqwest::Client,
    deployments: RwLock<Vec<Deployment>>,
    paused_deployments: RwLock<HashSet<String>>,
    running: Mutex<HashMap<Uuid, AbortHandle>>,
    api_url: RwLock<Option<String>>,
    control: OnceLock<mpsc::Sender<Control>>,
    nats: OnceLock<async_nats::Client>,
    /// With NATS: the claims that keep two instances from running a firing's actions twice,
    /// this instance's id, and the events JetStream redelivered or that were forwarded
    /// (only their firings, and firings no event caused, can have been dispatched by another
    /// instance).
    shared: OnceLock<(crate::shared_state::SharedState, Uuid, Arc<NatsCounters>)>,
    /// Cluster mode: this member's leases (it acts only on firings of partitions it holds).
    cluster: OnceLock<crate::cluster::Cluster>,
    /// Cluster mode: firings of partitions this member does not hold, waiting until someone
    /// claims them (or this member takes the partition); see [`Executor::review_parked`].
    parked: Mutex<HashMap<Uuid, Parked>>,
    /// Firings whose actions this instance performed (in cluster mode: its share).
    acted: std::sync::atomic::AtomicU64,
    /// The batching writer of dispatched marks (see `mark_dispatched`).
    marks: OnceLock<mpsc::UnboundedSender<Uuid>>,
    /// Where run processes leave their start markers (`launcher` module docs).
    marker_dir: OnceLock<std::path::PathBuf>,
    /// The credential run processes get for the daemon's API (`SPUR_API_TOKEN`).
    api_token: OnceLock<String>,
    retry_base: Duration,
    max_attempts: u32,
    /// The Prefect server that runs deployments Spur does not declare (`--prefect-api`):
    /// its API URL and the `Authorization` header value, if any.
    prefect: OnceLock<(String, Option<String>)>,
    /// Bounds the requests in flight to that server (see [`PREFECT_IN_FLIGHT`]).
    prefect_in_flight: tokio::sync::Semaphore,
    /// Bounds the `command` runs' processes alive at once (see [`MAX_PROCESSES`]): the
    /// limit and its permits.
    process_slots: OnceLock<(usize, tokio::sync::Semaphore)>,
    /// Renders `concurrency` keys (as the matcher's flow stage renders its own).
    flow_keys: spur_replay::TemplateFlowKeys,
    /// Concurrency slots (see [`Slots`]).
    slots: Mutex<Slots>,
}

/// A concurrency slot's identity: the automation's name and the rendered key.
type SlotKey = (String, String);

/// `concurrency:` bookkeeping. A firing of an automation with `concurrency` takes a slot of
/// its key before its actions run (a *reservation*), and each run those actions start holds
/// it until the run reaches a final state. The runs are known from their records, so a
/// restart that continues a run gives the slot back to it; a firing waiting for a slot is
/// not marked dispatched, so a restart dispatches it again and it queues again, in order.
#[derive(Debug, Default)]
struct Slots {
    by_key: HashMap<SlotKey, Slot>,
    /// Run → the slot it holds.
    runs: HashMap<Uuid, SlotKey>,
}

#[derive(Debug, Default)]
struct Slot {
    limit: usize,
    running: HashSet<Uuid>,
    reserved: usize,
    queue: VecDeque<Dispatch>,
}

impl Slot {
    fn in_progress(&self) -> usize {
        self.running.len() + self.reserved
    }
}

/// What the concurrency gate decided for a firing.
enum Gate {
    /// No concurrency setting: go.
    Free,
    /// A slot is reserved: go, and give it back when done.
    Open(SlotKey),
    /// Cancel these runs first, then go with the reserved slot (`cancel-running`).
    CancelFirst(SlotKey, Vec<Uuid>),
    /// Full: it waits in the slot's queue.
    Queued,
    /// Skipped, with the reason.
    Skip(String),
}

/// Bound on Prefect's `response_body` detail.
const RESPONSE_BODY_LIMIT: usize = 1000;

/// Requests the actions send to the Prefect server at once. A burst of firings must queue
/// here, not at the server: Prefect's server (one process, SQLite by default) answers 503
/// when too many writes contend for its database, and 500 `create_flow_run`s at once made
/// most of them fail until their retries ran out (measured with
/// `scripts/bench_prefect_bridge.py`). Prefect's own actions service sends them one
/// consumer at a time; a few in flight keep the server busy without overrunning it.
const PREFECT_IN_FLIGHT: usize = 4;

/// `command` runs whose processes may be alive at once, unless `--max-processes` says
/// otherwise. More runs wait in Pending for a slot, in the order they got there. Without a
/// bound a burst of firings started a process for each at once: 13 000 in flight per
/// member in the 30 000-event chaos run, each fork copying the page tables of a daemon that
/// had grown to a gigabyte holding them, until the machine spent 92 % of its time in the
/// kernel and the runs finished slower than they arrived. A waiting run has no start
/// marker, so a restart launches it (once), as it does any run that had not started.
pub const MAX_PROCESSES: usize = 256;

impl Executor {
    /// An executor emitting through `intake`.
    pub fn new(store: Arc<Store>, intake: Intake) -> Executor {
        let paused: HashSet<String> = store
            .get_setting("paused_deployments")
            .ok()
            .flatten()
            .and_then(|v| serde_json::from_value(v).ok())
            .unwrap_or_default();
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .user_agent(concat!("spur/", env!("CARGO_PKG_VERSION")))
            .build()
            .unwrap_or_default();
        Executor {
            inner: Arc::new(Inner {
                store,
                own_events: crate::own_events::OwnEvents::new(intake),
                templates: TemplateEngine::new(),
                http,
                deployments: RwLock::new(Vec::new()),
                paused_deployments: RwLock::new(paused),
                running: Mutex::new(HashMap::new()),
                api_url: RwLock::new(None),
                control: OnceLock::new(),
                nats: OnceLock::new(),
                shared: OnceLock::new(),
                cluster: OnceLock::new(),
                parked: Mutex::new(HashMap::new()),
                acted: std::sync::atomic::AtomicU64::new(0),
                marks: OnceLock::new(),
                marker_dir: OnceLock::new(),
                api_token: OnceLock::new(),
                retry_base: Duration::from_millis(500),
                max_attempts: 5,
                prefect: OnceLock::new(),
                prefect_in_flight: tokio::sync::Semaphore::new(PREFECT_IN_FLIGHT),
                process_slots: OnceLock::new(),
                flow_keys: spur_replay::TemplateFlowKeys(TemplateEngine::new()),
                slots: Mutex::new(Slots::default()),
            }),
        }
    }

    /// Sends `run-deployment` actions whose deployment Spur does not declare to this Prefect
    /// server (`--prefect-api`): `api_url` like `http://127.0.0.1:4200/api`, with its auth
    /// string (basic, as Prefect's client sends it) or API key (bearer).
    pub fn set_prefect_server(
        &self,
        api_url: &str,
        auth_string: Option<&str>,
        api_key: Option<&str>,
    ) {
        use base64::Engine as _;
        let authorization = match (auth_string, api_key) {
            (Some(auth), _) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(auth)
            )),
            (None, Some(key)) => Some(format!("Bearer {key}")),
            (None, None) => None,
        };
        let _ = self
            .inner
            .prefect
            .set((api_url.trim_end_matches('/').to_owned(), authorization));
    }

    /// A flow run that is not Spur's, with a Prefect server beside Spur: the server's.
    async fn is_server_flow_run(&self, run: Uuid) -> bool {
        self.inner.prefect.get().is_some() && self.load_run(run).await.is_none()
    }

    /// Sets a server flow run's state, as Prefect's flow-run actions do (not forced); a
    /// state the server does not accept fails the action with its reason.
    async fn set_server_state(
        &self,
        run: Uuid,
        state_type: &str,
        message: &str,
        action: &str,
    ) -> Result<Outcome, Failure> {
        let state = json!({"type": state_type, "message": message});
        self.set_server_state_to(run, state, action).await
    }

    /// Sets a server flow run to `state` (a `StateCreate` body), not forced.
    async fn set_server_state_to(
        &self,
        run: Uuid,
        state: Value,
        action: &str,
    ) -> Result<Outcome, Failure> {
        let body = json!({"state": state, "force": false});
        let answer = self
            .prefect_call(
                "POST",
                &format!("/flow_runs/{run}/set_state"),
                &body,
                action,
            )
            .await?;
        if answer["status"] != "ACCEPT" {
            return Err(Failure::Permanent(format!(
                "Failed to set state: {}",
                answer["details"]["reason"]
                    .as_str()
                    .unwrap_or("not accepted")
            )));
        }
        Ok(target_run(run))
    }

    /// Fails an action Spur performs only on a Prefect server's flow runs when `run` is one
    /// of Spur's own (or there is no server).
    async fn server_run_only(&self, run: Uuid, action: &str) -> Result<(), Failure> {
        if self.is_server_flow_run(run).await {
            return Ok(());
        }
        Err(Failure::Permanent(if self.inner.prefect.get().is_none() {
            format!(
                "{action} acts on a Prefect server's flow runs, and none is configured (--prefect-api)"
            )
        } else {
            format!("{action}: flow run {run} is Spur's own, and Spur's launchers cannot do that")
        }))
    }

    /// Sends one request to the Prefect server, at most [`PREFECT_IN_FLIGHT`] at once; its
    /// status and body. Like Prefect's own client, a busy server (429, 502, 503, or a
    /// connection that failed) is asked again after about 1, 2, 4, 8 and 16 s (with jitter),
    /// so a burst that overruns the server's database waits
    /// instead of failing; what then still fails is transient (the action's own retries).
    /// Every request Spur sends there is safe to repeat (`create_flow_run` carries its
    /// idempotency key).
    async fn send_to_prefect(
        &self,
        request: reqwest::RequestBuilder,
        api: &str,
    ) -> Result<(reqwest::StatusCode, String), Failure> {
        const ATTEMPTS: u32 = 6;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let this_try = match request.try_clone() {
                Some(r) if attempt < ATTEMPTS => r,
                // A body that cannot be cloned (none here) or the last try: send as is.
                _ => {
                    let _slot = self.prefect_slot().await?;
                    return Self::read_answer(request.send().await, api).await;
                }
            };
            let answer = {
                let _slot = self.prefect_slot().await?;
                Self::read_answer(this_try.send().await, api).await
            };
            let busy = match &answer {
                Ok((status, _)) => matches!(status.as_u16(), 429 | 502 | 503),
                Err(_) => true,
            };
            if !busy {
                return answer;
            }
            let base = Duration::from_secs(1 << (attempt - 1).min(4));
            let jitter = (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
            let wait = base.mul_f64(0.75 + jitter / 2.0);
            debug!(
                attempt,
                wait_ms = wait.as_millis() as u64,
                "the Prefect server is busy; asking again"
            );
            tokio::time::sleep(wait).await;
        }
    }

    /// A slot among the [`PREFECT_IN_FLIGHT`] requests to the Prefect server.
    async fn prefect_slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, Failure> {
        self.inner
            .prefect_in_flight
            .acquire()
            .await
            .map_err(|_| Failure::Transient("the executor is stopping".to_owned()))
    }

    /// The status and body of an answer from the Prefect server.
    async fn read_answer(
        sent: Result<reqwest::Response, reqwest::Error>,
        api: &str,
    ) -> Result<(reqwest::StatusCode, String), Failure> {
        let response =
            sent.map_err(|e| Failure::Transient(format!("Prefect server {api} unreachable: {e}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        Ok((status, text))
    }

    /// One call to the Prefect server's API; its JSON answer. 5xx and connection failures
    /// are transient (retried), other failures permanent with Prefect's reason wording.
    async fn prefect_call(
        &self,
        method: &str,
        path: &str,
        body: &Value,
        action: &str,
    ) -> Result<Value, Failure> {
        let Some((api, authorization)) = self.inner.prefect.get() else {
            return Err(Failure::Permanent(
                "no Prefect server is configured (--prefect-api)".to_owned(),
            ));
        };
        let method = reqwest::Method::from_bytes(method.as_bytes())
            .map_err(|_| Failure::Permanent(format!("bad HTTP method {method:?}")))?;
        let mut request = self.inner.http.request(method, format!("{api}{path}"));
        if !body.is_null() {
            request = request.json(body);
        }
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let (status, text) = self.send_to_prefect(request, api).await?;
        if status.is_server_error() {
            return Err(Failure::Transient(format!(
                "Unexpected status from '{action}' action: {}",
                status.as_u16()
            )));
        }
        if !status.is_success() {
            let detail: String = text.chars().take(RESPONSE_BODY_LIMIT).collect();
            return Err(Failure::Permanent(
                if matches!(status.as_u16(), 409 | 422) {
                    format!("Validation error occurred for '{action}' - {detail}")
                } else {
                    format!(
                        "Unexpected status from '{action}' action: {}",
                        status.as_u16()
                    )
                },
            ));
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// The objects of the Prefect server that `action`'s templates name, as Prefect's actions
    /// service puts them in the template context: `flow_run`, `deployment`, `flow`,
    /// `task_run`, `work_pool`, `work_queue`, `concurrency_limit` (each the first resource
    /// of its kind the event involves, read from the server) and `variables` (the server's
    /// variables by name). Like Prefect, only with an event, and an object that cannot be
    /// read is `None`; without a Prefect server there are none.
    async fn server_objects(
        &self,
        action: &Action,
        event: Option<&Event>,
    ) -> Vec<(&'static str, Value)> {
        let (Some(event), Some(_)) = (event, self.inner.prefect.get()) else {
            return Vec::new();
        };
        let mut wanted = Vec::new();
        for value in action.fields.values() {
            names_in_templates(value, &mut wanted);
        }
        let mut objects = Vec::new();
        for name in wanted {
            let object = if name == "variables" {
                self.server_variables().await
            } else {
                self.server_object(name, event).await
            };
            objects.push((name, object.unwrap_or(Value::Null)));
        }
        objects
    }

    /// The first resource of the kind of context object `name` that `event` involves, read
    /// from the server.
    async fn server_object(&self, name: &'static str, event: &Event) -> Option<Value> {
        let kind = SERVER_OBJECTS.iter().find(|(n, _)| *n == name)?.1;
        let resource = event
            .involved_resources()
            .find(|r| r.id().rsplit_once('.').is_some_and(|(k, _)| k == kind))?;
        let id = Uuid::parse_str(resource.id().rsplit_once('.')?.1).ok()?;
        let read = |path: String| async move {
            let answer = self.prefect_call("GET", &path, &Value::Null, name).await;
            match answer {
                Ok(value) => Some(value),
                Err(Failure::Transient(why) | Failure::Permanent(why)) => {
                    warn!(object = name, %id, reason = %why, "cannot read a template context object from the Prefect server");
                    None
                }
            }
        };
        let mut object = match name {
            "deployment" => read(format!("/deployments/{id}")).await?,
            "flow" => read(format!("/flows/{id}")).await?,
            "flow_run" => read(format!("/flow_runs/{id}")).await?,
            "task_run" => read(format!("/task_runs/{id}")).await?,
            "concurrency_limit" => read(format!("/v2/concurrency_limits/{id}")).await?,
            "work_queue" => {
                let mut queue = read(format!("/work_queues/{id}")).await?;
                let status = read(format!("/work_queues/{id}/status")).await?;
                if let (Some(queue), Value::Object(status)) = (queue.as_object_mut(), status) {
                    queue.extend(status);
                }
                queue
            }
            "work_pool" => {
                let body = json!({"work_pools": {"id": {"any_": [id]}}});
                let found = self
                    .prefect_call("POST", "/work_pools/filter", &body, name)
                    .await
                    .ok()?;
                found.get(0)?.clone()
            }
            _ => return None,
        };
        // As Prefect does: the state the event reports, not the one the run has moved on to
        // since.
        if matches!(name, "flow_run" | "task_run") {
            let label = |k: &str| resource.get(k).map(str::to_owned);
            if let (Some(message), Some(state_name), Some(timestamp), Some(state_type)) = (
                label("prefect.state-message"),
                label("prefect.state-name"),
                label("prefect.state-timestamp"),
                label("prefect.state-type"),
            ) && let Some(map) = object.as_object_mut()
            {
                let state = map.entry("state").or_insert_with(|| json!({}));
                if let Some(state) = state.as_object_mut() {
                    state.insert("message".into(), json!(message));
                    state.insert("name".into(), json!(state_name));
                    state.insert("timestamp".into(), json!(timestamp));
                    state.insert("type".into(), json!(state_type));
                }
            }
        }
        Some(object)
    }

    /// The server's variables, name → value (at most 1 000, as Prefect reads them).
    async fn server_variables(&self) -> Option<Value> {
        let mut all = Map::new();
        while all.len() < 1000 {
            let body = json!({"limit": 200, "offset": all.len()});
            let page = self
                .prefect_call("POST", "/variables/filter", &body, "variables")
                .await
                .ok()?;
            let page = page.as_array()?.clone();
            for variable in &page {
                if let Some(name) = variable["name"].as_str() {
                    all.insert(name.to_owned(), variable["value"].clone());
                }
            }
            if page.len() < 200 {
                break;
            }
        }
        Some(Value::Object(all))
    }

    /// Performs `call-webhook` or `send-notification` through the server's block document
    /// (read with its secrets, as Prefect's actions service reads it).
    async fn perform_block(
        &self,
        block_document_id: Uuid,
        action: &str,
        texts: (&str, &str, &str),
        key: &str,
    ) -> Result<Outcome, Failure> {
        let (payload, subject, body) = texts;
        let document = self
            .prefect_call(
                "GET",
                &format!("/block_documents/{block_document_id}?include_secrets=true"),
                &Value::Null,
                action,
            )
            .await?;
        let slug = document["block_type"]["slug"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let data = &document["data"];
        let related = [
            Resource::from_pairs([
                (
                    "prefect.resource.id",
                    format!("prefect.block-document.{block_document_id}"),
                ),
                ("prefect.resource.role", "block".to_owned()),
                (
                    "prefect.resource.name",
                    document["name"].as_str().unwrap_or_default().to_owned(),
                ),
            ]),
            Resource::from_pairs([
                ("prefect.resource.id", format!("prefect.block-type.{slug}")),
                ("prefect.resource.role", "block-type".to_owned()),
            ]),
        ];
        let request = if action == "call-webhook" {
            if slug != "webhook" {
                return Err(Failure::Permanent(
                    "The referenced block was not a webhook block".to_owned(),
                ));
            }
            webhook_block_request(data, payload)
        } else {
            let capabilities = &document["block_schema"]["capabilities"];
            let notifies = capabilities
                .as_array()
                .is_some_and(|c| c.iter().any(|c| c == "notify"));
            if !notifies {
                return Err(Failure::Permanent(
                    "The referenced block was not a notification block".to_owned(),
                ));
            }
            notification_block_request(&slug, data, subject, body)
        }
        .map_err(Failure::Permanent)?;
        let mut outcome = self
            .send_http(&request, action == "send-notification", key)
            .await?;
        outcome.related.extend(related);
        Ok(outcome)
    }

    /// Sends one prepared HTTP request; `require_success` fails the action on a non-2xx
    /// answer (5xx retried).
    async fn send_http(
        &self,
        request: &HttpRequest,
        require_success: bool,
        key: &str,
    ) -> Result<Outcome, Failure> {
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| Failure::Permanent(format!("bad HTTP method {:?}", request.method)))?;
        let url = &request.url;
        let mut builder = self
            .inner
            .http
            .request(method, url)
            .header("Idempotency-Key", key);
        for (k, v) in &request.headers {
            builder = builder.header(k, v);
        }
        let response = builder
            .body(request.body.clone())
            .send()
            .await
            .map_err(|e| Failure::Transient(format!("request to {url} failed: {e}")))?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let mut outcome = Outcome::default();
        outcome
            .details
            .insert("status_code".into(), json!(status.as_u16()));
        outcome.details.insert(
            "response_body".into(),
            json!(text.chars().take(RESPONSE_BODY_LIMIT).collect::<String>()),
        );
        if require_success && status.is_server_error() {
            return Err(Failure::Transient(format!(
                "Unexpected status from notification: {}",
                status.as_u16()
            )));
        }
        if require_success && !status.is_success() {
            return Err(Failure::Permanent(format!(
                "Unexpected status from notification: {}",
                status.as_u16()
            )));
        }
        Ok(outcome)
    }

    /// The daemon URL given to launched processes as `SPUR_API_URL`.
    pub fn set_api_url(&self, url: String) {
        if let Ok(mut u) = self.inner.api_url.write() {
            *u = Some(url);
        }
    }

    /// The folder where run processes leave their start markers (created if missing). Without
    /// one, a restart cannot tell a `command` run that never started from one that did, and
    /// crashes both.
    pub fn set_marker_dir(&self, dir: std::path::PathBuf) -> std::io::Result<()> {
        std::fs::create_dir_all(&dir)?;
        let _ = self.inner.marker_dir.set(dir);
        Ok(())
    }

    /// At most `limit` `command` runs' processes alive at once (at least 1; default
    /// [`MAX_PROCESSES`]). Set before the first run starts; later calls change nothing.
    pub fn set_max_processes(&self, limit: usize) {
        let limit = limit.max(1);
        let _ = self
            .inner
            .process_slots
            .set((limit, tokio::sync::Semaphore::new(limit)));
    }

    fn process_slots(&self) -> &(usize, tokio::sync::Semaphore) {
        self.inner
            .process_slots
            .get_or_init(|| (MAX_PROCESSES, tokio::sync::Semaphore::new(MAX_PROCESSES)))
    }

    /// `command` runs whose processes are alive now (more may wait in Pending for a slot).
    pub fn processes_alive(&self) -> usize {
        let (limit, slots) = self.process_slots();
        limit.saturating_sub(slots.available_permits())
    }

    /// The credential run processes get for the daemon's API (`SPUR_API_TOKEN`): with auth
    /// on, a run's `"$SPUR_BIN" emit` needs one.
    pub fn set_api_token(&self, token: String) {
        let _ = self.inner.api_token.set(token);
    }

    fn launch_context(&self) -> LaunchContext {
        LaunchContext {
            api_url: self.inner.api_url.read().ok().and_then(|u| u.clone()),
            api_token: self.inner.api_token.get().cloned(),
            marker_dir: self.inner.marker_dir.get().cloned(),
        }
    }

    /// The NATS connection worker launchers use.
    pub fn set_nats(&self, client: async_nats::Client) {
        let _ = self.inner.nats.set(client);
    }

    /// Shared state in JetStream: claim firings (as instance `owner`) before acting, those
    /// another instance may also have derived (see [`spur_ingest::nats::Redeliveries`]).
    pub fn set_shared(
        &self,
        shared: crate::shared_state::SharedState,
        owner: Uuid,
        nats: Arc<NatsCounters>,
    ) {
        let _ = self.inner.shared.set((shared, owner, nats));
    }

    /// With the stream as the log (`--nats-log`): publish the executor's own events to the
    /// stream first through `stream` (see `own_events`).
    /// `patience`: how long a batch the stream refuses is published again before it is
    /// stored locally (see `OwnEvents::publish_first`).
    pub fn publish_own_events_first(&self, stream: Intake, patience: Duration) {
        self.inner.own_events.publish_first(stream, patience);
    }

    /// The pipeline's control channel (for pausing automations).
    pub fn set_control(&self, control: mpsc::Sender<Control>) {
        let _ = self.inner.control.set(control);
    }

    /// Replaces the known deployments; returns one message per invalid declaration.
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

    /// True if the deployment is paused.
    pub fn is_paused(&self, deployment: &str) -> bool {
        self.inner
            .paused_deployments
            .read()
            .is_ok_and(|p| p.contains(deployment))
    }

    fn find(&self, id: Option<Uuid>, name: Option<&str>) -> Option<Deployment> {
        let deployments = self.inner.deployments.read().ok()?;
        deployments
            .iter()
            .find(|d| id.is_some_and(|id| d.id == id) || name.is_some_and(|n| d.name == n))
            .cloned()
    }

    /// Consumes dispatches until the channel closes or `shutdown` turns true. Then it
    /// drains: dispatches still queued are left alone (their firings stay undispatched in
    /// the store, so the next start performs them), the ones in flight get up to
    /// [`DRAIN_TIMEOUT`] to finish, and the marks of those that did are written before it
    /// returns. The daemon stops the pipeline only after that, so the events the last
    /// actions emit still reach the log. Without the drain, an action cut off mid-flight (a
    /// webhook already called) had no mark and ran again on the next start.
    pub async fn run(
        self,
        mut dispatches: mpsc::UnboundedReceiver<Dispatch>,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        let (marks, mut pending) = mpsc::unbounded_channel::<Uuid>();
        let mut writer = None;
        if self.inner.marks.set(marks).is_ok() {
            let store = self.inner.store.clone();
            writer = Some(tokio::spawn(async move {
                while let Some(first) = pending.recv().await {
                    // Gather for a moment: each write takes the store's single writer lock,
                    // which the pipeline then waits for, and commits. Under load this made
                    // hundreds of small transactions a second (~8 % of the tokio workers'
                    // time in a throughput profile); a mark written later only widens the
                    // window in which a crash repeats an (idempotent) dispatch.
                    if !first.is_nil() {
                        tokio::time::sleep(MARKS_GATHER).await;
                    }
                    let mut batch = vec![first];
                    while batch.len() < 16_384
                        && let Ok(next) = pending.try_recv()
                    {
                        batch.push(next);
                    }
                    // The nil id asks for a last write, then the end (see below).
                    let last = batch.contains(&Uuid::nil());
                    batch.retain(|id| !id.is_nil());
                    let store = store.clone();
                    let _ =
                        tokio::task::spawn_blocking(move || store.mark_dispatched(&batch)).await;
                    if last {
                        return;
                    }
                }
            }));
        }
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            tokio::select! {
                dispatch = dispatches.recv() => match dispatch {
                    Some(d) => {
                        let executor = self.clone();
                        in_flight.spawn(async move { executor.dispatch(d).await });
                    }
                    None => break,
                },
                // Reap finished dispatches as they end.
                Some(_) = in_flight.join_next(), if !in_flight.is_empty() => {}
                changed = shutdown.changed() => {
                    if changed.is_err() || *shutdown.borrow() {
                        break;
                    }
                }
            }
        }
        let unfinished = in_flight.len();
        let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            warn!(
                cut_off = in_flight.len(),
                "actions still running at shutdown were stopped; their firings are performed again on the next start"
            );
            in_flight.abort_all();
        } else if unfinished > 0 {
            info!(
                finished = unfinished,
                "actions in flight finished before shutdown"
            );
        }
        if let Some(writer) = writer {
            let flushed = self
                .inner
                .marks
                .get()
                .is_some_and(|marks| marks.send(Uuid::nil()).is_ok());
            if flushed {
                let _ = tokio::time::timeout(DRAIN_TIMEOUT, writer).await;
            }
        }
    }

    /// Pauses (or resumes) an automation here and, in cluster mode, on every member (see
    /// `crate::cluster`). The API's pause and resume and the `pause-automation` and
    /// `resume-automation` actions all come here.
    pub async fn set_automation_paused(
        &self,
        automation: Uuid,
        paused: bool,
    ) -> Result<(), PauseError> {
        let control = self.inner.control.get().ok_or(PauseError::Stopped)?;
        let (tx, rx) = oneshot::channel();
        control
            .send(Control::SetPaused(automation, paused, tx))
            .await
            .map_err(|_| PauseError::Stopped)?;
        rx.await
            .map_err(|_| PauseError::Stopped)?
            .map_err(PauseError::Refused)?;
        if let Some(cluster) = self.inner.cluster.get() {
            cluster
                .share_pause(automation, paused)
                .await
                .map_err(|reason| PauseError::NotShared {
                    done: if paused { "paused" } else { "resumed" },
                    reason,
                })?;
        }
        Ok(())
    }

    /// Starts a new run with the parameters of run `id`, linked to it by `rerun_of`.
    pub async fn rerun(&self, id: Uuid) -> Result<Value, String> {
        self.rerun_with_key(id, None).await
    }

    async fn rerun_with_key(&self, id: Uuid, key: Option<String>) -> Result<Value, String> {
        let old = self
            .load_run(id)
            .await
            .ok_or_else(|| format!("no run {id}"))?;
        let deployment = self
            .find(Some(old.deployment_id), Some(&old.deployment))
            .ok_or_else(|| format!("deployment {:?} is no longer declared", old.deployment))?;
        // A rerun starts now, on the same infrastructure settings, in the same concurrency
        // slot (it takes the old run's place).
        let options = RunOptions {
            schedule_after: TimeDelta::zero(),
            job_variables: old.job_variables.clone(),
            concurrency_key: old.concurrency_key.clone(),
        };
        self.start_run(
            &deployment,
            &old.parameters,
            key,
            old.automation.clone(),
            Some(id),
            options,
        )
        .await
    }

    async fn dispatch(&self, d: Dispatch) {
        self.dispatch_claiming(d, false).await
    }

    /// Claims the firing if another instance may have derived it too (always when
    /// `always_claim`), then performs its actions.
    async fn dispatch_claiming(&self, d: Dispatch, always_claim: bool) {
        let firing = &d.firing;
        // Flow control skipped it (a throttle over its limit with `over: drop`, or a key that
        // did not render): the firing is recorded with the reason, and no action runs.
        if let Some(reason) = firing.flow.as_ref().and_then(|f| f.skipped.as_deref()) {
            info!(firing = %firing.id, automation = %firing.automation.name, %reason, "firing skipped by flow control; no action runs");
            self.mark_dispatched(firing.id);
            return;
        }
        if let Some(cluster) = self.inner.cluster.get() {
            // Cluster mode: only the partition's holder acts, and only after its claim.
            if !cluster.owns(firing.automation.id) {
                self.park(d);
                return;
            }
            if let Some((shared, owner, _)) = self.inner.shared.get() {
                match shared.try_claim(firing.id, *owner).await {
                    crate::shared_state::Claim::Ours => {}
                    crate::shared_state::Claim::Theirs => {
                        debug!(firing = %firing.id, automation = %firing.automation.name, "another member already acted on this firing");
                        self.mark_dispatched(firing.id);
                        return;
                    }
                    // Never act without the claim (another member may hold it): parked,
                    // the firing is claimed again on the next round.
                    crate::shared_state::Claim::Unknown => {
                        warn!(firing = %firing.id, "cluster: cannot claim a firing now; trying again shortly");
                        self.park(d);
                        return;
                    }
                }
            }
            cluster.note_acted(firing.automation.id);
        } else if let Some((shared, owner, nats)) = self.inner.shared.get()
            && (always_claim
                || firing
                    .event
                    .as_ref()
                    .is_none_or(|event| nats.redeliveries.contains(&event.id)))
            && !shared.claim(firing.id, *owner).await
        {
            info!(firing = %firing.id, automation = %firing.automation.name, "another instance already dispatched this firing");
            self.mark_dispatched(firing.id);
            return;
        }
        self.act_on(d).await;
    }

    /// Performs a firing's actions (through its concurrency gate), once it is this
    /// instance's to act on.
    async fn act_on(&self, d: Dispatch) {
        self.inner
            .acted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let slot = match self.enter_gate(d) {
            Ok((d, slot)) => (d, slot),
            Err(()) => return,
        };
        self.run_actions(slot.0, slot.1).await;
    }

    /// How many firings this instance has acted on since it started (in cluster mode, its
    /// share of the cluster's firings).
    pub fn acted_count(&self) -> u64 {
        self.inner.acted.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The concurrency gate: `Err` when the firing waits (queued) or was skipped; otherwise
    /// the dispatch back, with the slot it reserved. `cancel-running` cancels here.
    fn enter_gate(&self, d: Dispatch) -> Result<(Dispatch, Option<SlotKey>), ()> {
        let firing = &d.firing;
        let concurrency = firing
            .automation
            .flow
            .as_deref()
            .and_then(|f| f.concurrency.as_ref());
        let gate = match concurrency {
            Some(c) if firing.state == FiringState::Triggered => {
                let key = match &c.key {
                    None => Ok(String::new()),
                    Some(template) => self
                        .inner
                        .flow_keys
                        .render(template, firing)
                        .map_err(|e| format!("its concurrency key did not render: {e}")),
                };
                match key {
                    Err(reason) => Gate::Skip(reason),
                    Ok(key) => self.take_slot((firing.automation.name.clone(), key), c),
                }
            }
            _ => Gate::Free,
        };
        match gate {
            Gate::Free => Ok((d, None)),
            Gate::Open(slot) => Ok((d, Some(slot))),
            Gate::CancelFirst(slot, runs) => {
                let executor = self.clone();
                let reason = format!(
                    "cancelled: a newer firing of automation {:?} took its concurrency slot (key {:?}, on_full: cancel-running)",
                    slot.0, slot.1
                );
                tokio::spawn(async move {
                    for run in runs {
                        let _ = executor.cancel_with(run, &reason).await;
                    }
                    executor.run_actions(d, Some(slot)).await;
                });
                Err(())
            }
            Gate::Queued => {
                info!(firing = %firing.id, automation = %firing.automation.name, "firing waits for a concurrency slot");
                let limit = concurrency.map_or(1, |c| c.limit as usize);
                if let Some(key) = self.slot_of_queued(&d) {
                    if let Ok(mut slots) = self.inner.slots.lock() {
                        let slot = slots.by_key.entry(key.clone()).or_default();
                        slot.limit = limit;
                        slot.queue.push_back(d);
                    }
                    // A run may have ended between the decision and the queueing.
                    self.wake(&key);
                }
                Err(())
            }
            Gate::Skip(reason) => {
                info!(firing = %firing.id, automation = %firing.automation.name, %reason, "firing skipped by its concurrency limit; no action runs");
                self.mark_dispatched(firing.id);
                Err(())
            }
        }
    }

    /// Where a queued firing waits (its key was rendered once already by `take_slot`; a
    /// template renders the same for the same firing).
    fn slot_of_queued(&self, d: &Dispatch) -> Option<SlotKey> {
        let c = d.firing.automation.flow.as_deref()?.concurrency.as_ref()?;
        let key = match &c.key {
            None => String::new(),
            Some(template) => self.inner.flow_keys.render(template, &d.firing).ok()?,
        };
        Some((d.firing.automation.name.clone(), key))
    }

    /// Reserves a slot of `key` if one is free; otherwise decides by `on_full`.
    fn take_slot(&self, key: SlotKey, c: &spur_core::flow::Concurrency) -> Gate {
        let Ok(mut slots) = self.inner.slots.lock() else {
            return Gate::Free;
        };
        let slot = slots.by_key.entry(key.clone()).or_default();
        slot.limit = c.limit as usize;
        if slot.in_progress() < slot.limit && slot.queue.is_empty() {
            slot.reserved += 1;
            return Gate::Open(key);
        }
        match c.on_full {
            OnFull::Queue => Gate::Queued,
            OnFull::Skip => Gate::Skip(format!(
                "concurrency: {} firing(s) of key {:?} in progress (on_full: skip)",
                slot.in_progress(),
                key.1
            )),
            OnFull::CancelRunning => {
                slot.reserved += 1;
                let runs = slot.running.iter().copied().collect();
                Gate::CancelFirst(key, runs)
            }
        }
    }

    /// A run of a concurrency key started (or a restart found it in progress).
    fn hold_slot(&self, run: &Run) {
        let (Some(key), Some(automation)) = (&run.concurrency_key, &run.automation) else {
            return;
        };
        if run.state.is_final() {
            return;
        }
        if let Ok(mut slots) = self.inner.slots.lock() {
            let slot_key = (automation.clone(), key.clone());
            slots.runs.insert(run.id, slot_key.clone());
            slots
                .by_key
                .entry(slot_key)
                .or_default()
                .running
                .insert(run.id);
        }
    }

    /// A run ended: its slot is free again.
    fn release_run(&self, run: Uuid) {
        let key = match self.inner.slots.lock() {
            Ok(mut slots) => {
                let Some(key) = slots.runs.remove(&run) else {
                    return;
                };
                if let Some(slot) = slots.by_key.get_mut(&key) {
                    slot.running.remove(&run);
                }
                key
            }
            Err(_) => return,
        };
        self.wake(&key);
    }

    /// Hands queued firings of `key` the slots that are free, in order.
    fn wake(&self, key: &SlotKey) {
        let ready: Vec<Dispatch> = match self.inner.slots.lock() {
            Ok(mut slots) => {
                let Some(slot) = slots.by_key.get_mut(key) else {
                    return;
                };
                let mut ready = Vec::new();
                while slot.in_progress() < slot.limit {
                    let Some(d) = slot.queue.pop_front() else {
                        break;
                    };
                    slot.reserved += 1;
                    ready.push(d);
                }
                if slot.in_progress() == 0 && slot.queue.is_empty() {
                    slots.by_key.remove(key);
                }
                ready
            }
            Err(_) => return,
        };
        for d in ready {
            let executor = self.clone();
            let key = key.clone();
            tokio::spawn(async move { executor.run_actions(d, Some(key)).await });
        }
    }

    /// One automation's concurrency keys: `(key, runs in progress, firings waiting)`.
    pub fn concurrency_of(&self, automation: &str) -> Vec<(String, usize, usize)> {
        let Ok(slots) = self.inner.slots.lock() else {
            return Vec::new();
        };
        let mut keys: Vec<(String, usize, usize)> = slots
            .by_key
            .iter()
            .filter(|((name, _), _)| name == automation)
            .map(|((_, key), slot)| (key.clone(), slot.in_progress(), slot.queue.len()))
            .collect();
        keys.sort();
        keys
    }

    /// Firings waiting for a concurrency slot, and runs holding one.
    pub fn concurrency_counts(&self) -> (usize, usize) {
        self.inner.slots.lock().map_or((0, 0), |slots| {
            (
                slots.by_key.values().map(|s| s.queue.len()).sum(),
                slots.runs.len(),
            )
        })
    }

    /// Emits the firing's state event and performs its actions; `slot` is the concurrency
    /// slot it reserved, given back at the end (its runs hold it on their own).
    async fn run_actions(&self, d: Dispatch, slot: Option<SlotKey>) {
        let firing = &d.firing;
        let state_event = firing.state_change_event();
        let state_event_id = state_event.id;
        self.record(vec![state_event]).await;
        let automation = &firing.automation;
        let (list, uses_state_event): (Vec<&Action>, Vec<bool>) = match firing.state {
            FiringState::Triggered => {
                let main = automation.actions.iter().map(|a| (a, false));
                let extra = automation.actions_on_trigger.iter().map(|a| (a, true));
                main.chain(extra).unzip()
            }
            FiringState::Resolved => automation
                .actions_on_resolve
                .iter()
                .map(|a| (a, true))
                .unzip(),
        };
        let rendered = d
            .record
            .get("actions")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (index, action) in list.iter().enumerate() {
            let state_event = uses_state_event[index];
            let objects = if state_event {
                let event = firing.state_change_event();
                self.server_objects(action, Some(&event)).await
            } else {
                self.server_objects(action, firing.event.as_deref()).await
            };
            let mut prepared = self.prepare(
                firing,
                action,
                index,
                state_event,
                rendered.get(index),
                &objects,
            );
            if let (
                Some((_, key)),
                Ok(Prepared::RunDeployment {
                    concurrency_key, ..
                }),
            ) = (&slot, &mut prepared)
            {
                *concurrency_key = Some(key.clone());
            }
            self.execute(firing, action, index, state_event_id, prepared)
                .await;
        }
        self.mark_dispatched(firing.id);
        if let Some(key) = slot {
            if let Ok(mut slots) = self.inner.slots.lock()
                && let Some(s) = slots.by_key.get_mut(&key)
            {
                s.reserved = s.reserved.saturating_sub(1);
            }
            self.wake(&key);
        }
    }

    /// Records that a firing's actions all ran. The marks go to one writer task that commits
    /// them in batches: a write transaction (and fsync) per firing would compete with the
    /// pipeline for the store's single writer under load. A mark lost to a crash only means
    /// the firing is dispatched again on restart, where every step is idempotent.
    fn mark_dispatched(&self, firing: Uuid) {
        let sent = self
            .inner
            .marks
            .get()
            .is_some_and(|marks| marks.send(firing).is_ok());
        if !sent {
            let store = self.inner.store.clone();
            tokio::task::spawn_blocking(move || store.mark_dispatched(&[firing]));
        }
    }

    /// After a crash: performs the actions of recorded firings that were never dispatched.
    /// Every step is idempotent (deterministic event ids, one run per key), so an action that
    /// had already happened is not repeated.
    /// `records` must be read before the pipeline starts (see `Store::undispatched_firings`),
    /// so firings the pipeline dispatches itself are not picked up twice.
    pub async fn redispatch(
        &self,
        records: Vec<Value>,
        automations: &[Arc<spur_core::Automation>],
    ) {
        for record in records {
            let Some(firing) = self.rebuild_firing(&record, automations) else {
                continue;
            };
            info!(firing = %firing.id, automation = %firing.automation.name, "dispatching a firing a crash interrupted");
            let record = Arc::new(record);
            self.dispatch_claiming(Dispatch { firing, record }, true)
                .await;
        }
    }

    fn rebuild_firing(
        &self,
        record: &Value,
        automations: &[Arc<spur_core::Automation>],
    ) -> Option<Firing> {
        let uuid = |key: &str| {
            record
                .get(key)
                .and_then(Value::as_str)
                .and_then(|s| Uuid::parse_str(s).ok())
        };
        let id = uuid("id")?;
        let automation_id = uuid("automation_id")?;
        let automation = automations.iter().find(|a| a.id == automation_id)?.clone();
        let event = uuid("event")
            .and_then(|e| self.inner.store.get_event(e).ok().flatten())
            .map(Arc::new);
        let labels = record
            .get("labels")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        Some(Firing {
            id,
            automation,
            trigger_id: uuid("trigger_id").unwrap_or_default(),
            state: if record.get("state").and_then(Value::as_str) == Some("resolved") {
                FiringState::Resolved
            } else {
                FiringState::Triggered
            },
            at: record
                .get("at")
                .and_then(Value::as_str)
                .and_then(|s| spur_core::time::parse_timestamp_str(s).ok())
                .unwrap_or_else(Utc::now),
            event,
            labels,
            children: Vec::new(),
            flow: record
                .get("flow")
                .and_then(|f| serde_json::from_value(f.clone()).ok())
                .map(Arc::new),
        })
    }

    /// Renders and resolves one action.
    fn prepare(
        &self,
        firing: &Firing,
        action: &Action,
        index: usize,
        state_event: bool,
        rendered: Option<&Value>,
        objects: &[(&'static str, Value)],
    ) -> Result<Prepared, String> {
        let key = format!("{}:{index}", firing.id);
        let context = || {
            let mut context = firing_context(firing, state_event);
            context.extra.extend(objects.iter().cloned());
            context.to_value()
        };
        let text = |field: &str, default: &str| -> Result<String, String> {
            let source = action
                .field(field)
                .and_then(Value::as_str)
                .unwrap_or(default);
            self.inner
                .templates
                .render_text(source, &context())
                .map_err(|e| format!("Template rendering failed: {e}"))
        };
        let event = if state_event {
            Some(Arc::new(firing.state_change_event()))
        } else {
            firing.event.clone()
        };
        match action.action_type.as_str() {
            "do-nothing" => Ok(Prepared::DoNothing),
            "run-deployment" => {
                if let Some(error) = rendered
                    .and_then(|r| r.get("error"))
                    .and_then(Value::as_str)
                {
                    return Err(error.to_owned());
                }
                let parameters = if objects.is_empty() {
                    rendered
                        .and_then(|r| r.get("parameters"))
                        .cloned()
                        .unwrap_or(json!({}))
                } else {
                    // The pipeline rendered them without the server's objects; these
                    // templates name some, read now.
                    spur_template::render_parameters(
                        &self.inner.templates,
                        action.parameters(),
                        &context(),
                    )
                    .map_err(|e| format!("Unable to create flow run from deployment: {e}"))?
                };
                // The loader checked it (a duration ≥ 0); an older dead letter may lack it.
                let schedule_after = action
                    .field("schedule_after")
                    .map(spur_core::time::parse_duration)
                    .transpose()
                    .map_err(|e| format!("schedule_after: {e}"))?
                    .unwrap_or_default();
                let deployment = match self.resolve_deployment(action, event.as_deref()) {
                    Ok(deployment) => deployment,
                    // Not declared here: a Prefect server beside Spur runs it, if there is one.
                    Err(reason) => {
                        let on_server = self
                            .inner
                            .prefect
                            .get()
                            .and(server_deployment_id(action, event.as_deref()));
                        let Some(deployment_id) = on_server else {
                            return Err(reason);
                        };
                        let invocation = Uuid::new_v5(
                            &spur_core::SPUR_NAMESPACE,
                            format!("action:{}:{index}", firing.id).as_bytes(),
                        );
                        return Ok(Prepared::PrefectFlowRun {
                            deployment_id,
                            parameters,
                            idempotency_key: format!(
                                "automation {}, action {index}, invocation {invocation}",
                                firing.automation.id
                            ),
                            automation_id: firing.automation.id,
                            automation: firing.automation.name.clone(),
                            schedule_after_us: schedule_after
                                .num_microseconds()
                                .unwrap_or(0)
                                .max(0),
                            job_variables: action
                                .field("job_variables")
                                .filter(|v| v.is_object())
                                .cloned(),
                        });
                    }
                };
                Ok(Prepared::RunDeployment {
                    deployment: deployment.name,
                    parameters,
                    key,
                    automation: firing.automation.name.clone(),
                    schedule_after_us: schedule_after.num_microseconds().unwrap_or(0).max(0),
                    job_variables: action
                        .field("job_variables")
                        .filter(|v| v.is_object())
                        .cloned(),
                    concurrency_key: None,
                })
            }
            "pause-deployment" | "resume-deployment" => {
                let pause = action.action_type == "pause-deployment";
                match self.resolve_deployment(action, event.as_deref()) {
                    Ok(deployment) => Ok(Prepared::SetDeploymentPaused {
                        deployment: deployment.name,
                        paused: pause,
                    }),
                    Err(reason) => {
                        let id = self
                            .inner
                            .prefect
                            .get()
                            .and(server_deployment_id(action, event.as_deref()))
                            .ok_or(reason)?;
                        let verb = if pause { "pause" } else { "resume" };
                        Ok(Prepared::PrefectCall {
                            method: "POST".to_owned(),
                            path: format!("/deployments/{id}/{verb}_deployment"),
                            body: json!({}),
                            action: action.action_type.clone(),
                        })
                    }
                }
            }
            "pause-work-queue" | "resume-work-queue" | "pause-work-pool" | "resume-work-pool"
                if self.inner.prefect.get().is_some() =>
            {
                let pool = action.action_type.ends_with("work-pool");
                let (field, prefix, what) = if pool {
                    ("work_pool_id", "prefect.work-pool.", "work pool")
                } else {
                    ("work_queue_id", "prefect.work-queue.", "work queue")
                };
                let id = match action.field("source").and_then(Value::as_str) {
                    Some("inferred") => infer_id(event.as_deref(), prefix, what)?,
                    _ => action
                        .field(field)
                        .and_then(Value::as_str)
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .ok_or_else(|| format!("{field} is required"))?,
                };
                let paused = action.action_type.starts_with("pause");
                Ok(if pool {
                    Prepared::PrefectWorkPoolPaused {
                        work_pool: id,
                        paused,
                    }
                } else {
                    Prepared::PrefectCall {
                        method: "PATCH".to_owned(),
                        path: format!("/work_queues/{id}"),
                        body: json!({"is_paused": paused}),
                        action: action.action_type.clone(),
                    }
                })
            }
            "pause-automation" | "resume-automation" => {
                let id = match action.field("source").and_then(Value::as_str) {
                    Some("inferred") => {
                        infer_id(event.as_deref(), "prefect.automation.", "automation")?
                    }
                    _ => action
                        .field("automation_id")
                        .and_then(Value::as_str)
                        .and_then(|s| Uuid::parse_str(s).ok())
                        .ok_or("automation_id is required")?,
                };
                Ok(Prepared::SetAutomationPaused {
                    automation: id,
                    paused: action.action_type == "pause-automation",
                })
            }
            "cancel-flow-run" => Ok(Prepared::CancelRun {
                run: infer_flow_run(firing, event.as_deref())?,
                message: format!("Cancelled by Automation {}", firing.automation.id),
            }),
            "change-flow-run-state" => {
                let state = match action.field("state").and_then(Value::as_str) {
                    Some("SCHEDULED") => RunState::Scheduled,
                    Some("PENDING") => RunState::Pending,
                    Some("RUNNING") => RunState::Running,
                    Some("COMPLETED") => RunState::Completed,
                    Some("FAILED") => RunState::Failed,
                    Some("CANCELLED" | "CANCELLING") => RunState::Cancelled,
                    Some("CRASHED") => RunState::Crashed,
                    other => return Err(format!("Spur cannot set a run to state {other:?}")),
                };
                let message = action
                    .field("message")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .unwrap_or_else(|| {
                        format!("State changed by Automation {}", firing.automation.id)
                    });
                Ok(Prepared::ChangeRunState {
                    run: infer_flow_run(firing, event.as_deref())?,
                    state,
                    message,
                })
            }
            "suspend-flow-run" => Ok(Prepared::SuspendRun {
                run: infer_flow_run(firing, event.as_deref())?,
                message: format!("Suspended by Automation {}", firing.automation.id),
            }),
            "resume-flow-run" => Ok(Prepared::ResumeRun {
                run: infer_flow_run(firing, event.as_deref())?,
            }),
            "delete-flow-run" => Ok(Prepared::DeleteRun {
                run: infer_flow_run(firing, event.as_deref())?,
            }),
            "call-webhook" | "send-notification"
                if action.field("url").is_none() && action.field("block_document_id").is_some() =>
            {
                let kind = action.action_type.as_str();
                let block_document_id = action
                    .field("block_document_id")
                    .and_then(Value::as_str)
                    .and_then(|s| Uuid::parse_str(s).ok())
                    .ok_or("block_document_id is not a UUID")?;
                if self.inner.prefect.get().is_none() {
                    return Err(format!(
                        "{kind} sends through Prefect block {block_document_id}, and no Prefect server is configured (--prefect-api) to read it from"
                    ));
                }
                let (payload, subject, body) = if kind == "call-webhook" {
                    (text("payload", "")?, String::new(), String::new())
                } else {
                    (
                        String::new(),
                        text("subject", "Prefect automated notification")?,
                        text("body", "")?,
                    )
                };
                Ok(Prepared::PrefectBlock {
                    block_document_id,
                    action: kind.to_owned(),
                    payload,
                    subject,
                    body,
                    key,
                })
            }
            "call-webhook" | "send-notification" => {
                let url = action.field("url").and_then(Value::as_str).ok_or(
                    "Spur calls webhooks by `url`, or through a Prefect server's block (`block_document_id` with --prefect-api)",
                )?;
                let url = text("url", url)?;
                let (body, require_success, content_type) = if action.action_type == "call-webhook"
                {
                    (text("payload", "")?, false, "application/json")
                } else {
                    let subject = text("subject", "Prefect automated notification")?;
                    let body = text("body", "")?;
                    (
                        json!({"subject": subject, "body": body}).to_string(),
                        true,
                        "application/json",
                    )
                };
                let mut headers = vec![("content-type".to_owned(), content_type.to_owned())];
                if let Some(Value::Object(h)) = action.field("headers") {
                    for (k, v) in h {
                        let v = v
                            .as_str()
                            .map(str::to_owned)
                            .unwrap_or_else(|| v.to_string());
                        let v = self
                            .inner
                            .templates
                            .render_text(&v, &context())
                            .map_err(|e| format!("Template rendering failed: {e}"))?;
                        headers.push((k.clone(), v));
                    }
                }
                let method = action
                    .field("method")
                    .and_then(Value::as_str)
                    .unwrap_or("POST")
                    .to_uppercase();
                Ok(Prepared::Http {
                    method,
                    url,
                    headers,
                    body,
                    require_success,
                    key,
                })
            }
            "emit-event" => {
                let template = action.field("event").cloned().unwrap_or(Value::Null);
                let ctx = context();
                let rendered = render_strings(&self.inner.templates, &template, &ctx)?;
                Ok(Prepared::EmitEvent { event: rendered })
            }
            other => Err(format!(
                "{other} is a Prefect server action that Spur does not perform"
            )),
        }
    }

    /// Prefect's `source` rule for deployments: selected by `deployment_id` (or Spur's
    /// `deployment` name), or inferred from the first involved `prefect.deployment.<uuid>`.
    fn resolve_deployment(
        &self,
        action: &Action,
        event: Option<&Event>,
    ) -> Result<Deployment, String> {
        if action.field("source").and_then(Value::as_str) == Some("inferred") {
            let id = infer_id(event, "prefect.deployment.", "deployment")?;
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

    /// Performs with retries, emits the action events, dead-letters a final failure.
    async fn execute(
        &self,
        firing: &Firing,
        action: &Action,
        index: usize,
        state_event_id: Uuid,
        prepared: Result<Prepared, String>,
    ) {
        let invocation = Uuid::new_v5(
            &spur_core::SPUR_NAMESPACE,
            format!("action:{}:{index}", firing.id).as_bytes(),
        );
        let result = match &prepared {
            Ok(p) => self.perform_with_retries(p).await,
            Err(reason) => Err(reason.clone()),
        };
        let triggered = self.action_event(
            firing,
            action,
            index,
            invocation,
            state_event_id,
            "triggered",
            &Ok(Outcome::default()),
            None,
        );
        let triggered_id = triggered.id;
        let done = self.action_event(
            firing,
            action,
            index,
            invocation,
            state_event_id,
            if result.is_ok() { "executed" } else { "failed" },
            &result,
            Some(triggered_id),
        );
        self.record(vec![triggered, done]).await;
        match result {
            Ok(_) => {
                info!(automation = %firing.automation.name, action = index, kind = %action.action_type, "action executed")
            }
            Err(reason) => {
                warn!(automation = %firing.automation.name, action = index, kind = %action.action_type, %reason, "action failed");
                let record = json!({
                    "id": invocation,
                    "automation": firing.automation.name,
                    "automation_id": firing.automation.id,
                    "firing_id": firing.id,
                    "action_index": index,
                    "action_type": action.action_type,
                    "reason": reason,
                    "failed_at": spur_core::time::format_timestamp(Utc::now()),
                    "prepared": prepared.ok(),
                });
                let store = self.inner.store.clone();
                let _ = tokio::task::spawn_blocking(move || {
                    store.put_failed_action(invocation, &record)
                })
                .await;
            }
        }
    }

    async fn perform_with_retries(&self, prepared: &Prepared) -> Result<Outcome, String> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.perform(prepared).await {
                Ok(outcome) => return Ok(outcome),
                Err(Failure::Permanent(reason)) => return Err(reason),
                Err(Failure::Transient(reason)) if attempt >= self.inner.max_attempts => {
                    return Err(format!("{reason} (gave up after {attempt} attempts)"));
                }
                Err(Failure::Transient(reason)) => {
                    // Exponential backoff with full jitter, from 0.5 s, capped at 30 s.
                    let cap = self
                        .inner
                        .retry_base
                        .saturating_mul(1 << (attempt - 1).min(6))
                        .min(Duration::from_secs(30));
                    let jitter = (Uuid::new_v4().as_u128() % 1000) as f64 / 1000.0;
                    let wait = cap.mul_f64(0.5 + jitter / 2.0);
                    warn!(%reason, attempt, retry_in_ms = wait.as_millis() as u64, "action failed; retrying");
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }

    async fn perform(&self, prepared: &Prepared) -> Result<Outcome, Failure> {
        match prepared {
            Prepared::DoNothing => Ok(Outcome::default()),
            Prepared::PrefectFlowRun {
                deployment_id,
                parameters,
                idempotency_key,
                automation_id,
                automation,
                schedule_after_us,
                job_variables,
            } => {
                use base64::Engine as _;
                let Some((api, authorization)) = self.inner.prefect.get() else {
                    return Err(Failure::Permanent(format!(
                        "deployment {deployment_id} is not declared, and no Prefect server is configured (--prefect-api)"
                    )));
                };
                let start = Utc::now() + TimeDelta::microseconds(*schedule_after_us);
                let mut body = json!({
                    "parameters": parameters,
                    "idempotency_key": idempotency_key,
                    "state": {"type": "SCHEDULED", "name": "Scheduled",
                              "state_details": {"scheduled_time": spur_core::time::format_timestamp(start)}},
                });
                if let Some(variables) = job_variables {
                    body["job_variables"] = variables.clone();
                }
                let mut request = self
                    .inner
                    .http
                    .post(format!("{api}/deployments/{deployment_id}/create_flow_run"))
                    .header("Prefect-Automation-ID", automation_id.to_string())
                    .header(
                        "Prefect-Automation-Name",
                        base64::engine::general_purpose::STANDARD.encode(automation),
                    )
                    .json(&body);
                if let Some(value) = authorization {
                    request = request.header(reqwest::header::AUTHORIZATION, value);
                }
                let (status, text) = self.send_to_prefect(request, api).await?;
                if status.is_server_error() {
                    return Err(Failure::Transient(format!(
                        "Unexpected status from 'run-deployment' action: {}",
                        status.as_u16()
                    )));
                }
                if !status.is_success() {
                    let detail: String = text.chars().take(RESPONSE_BODY_LIMIT).collect();
                    return Err(Failure::Permanent(
                        if matches!(status.as_u16(), 409 | 422) {
                            format!("Validation error occurred for 'run-deployment' - {detail}")
                        } else if status.as_u16() == 404 {
                            format!("Deployment {deployment_id} not found on the Prefect server")
                        } else {
                            format!(
                                "Unexpected status from 'run-deployment' action: {}",
                                status.as_u16()
                            )
                        },
                    ));
                }
                let run: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
                let mut outcome = Outcome::default();
                outcome.related.push(Resource::from_pairs([
                    (
                        "prefect.resource.id",
                        format!(
                            "prefect.flow-run.{}",
                            run["id"].as_str().unwrap_or_default()
                        ),
                    ),
                    ("prefect.resource.role", "flow-run".to_owned()),
                    (
                        "prefect.resource.name",
                        run["name"].as_str().unwrap_or_default().to_owned(),
                    ),
                ]));
                outcome
                    .details
                    .insert("status_code".into(), json!(status.as_u16()));
                Ok(outcome)
            }
            Prepared::RunDeployment {
                deployment,
                parameters,
                key,
                automation,
                schedule_after_us,
                job_variables,
                concurrency_key,
            } => {
                let dep = self.find(None, Some(deployment)).ok_or_else(|| {
                    Failure::Permanent(format!("deployment {deployment:?} is not declared"))
                })?;
                let options = RunOptions {
                    schedule_after: TimeDelta::microseconds(*schedule_after_us),
                    job_variables: job_variables.clone(),
                    concurrency_key: concurrency_key.clone(),
                };
                let run = self
                    .start(
                        &dep,
                        parameters,
                        Some(key.clone()),
                        Some(automation.clone()),
                        options,
                    )
                    .await
                    .map_err(|e| {
                        Failure::Permanent(format!(
                            "Unable to create flow run from deployment: {e}"
                        ))
                    })?;
                let id = run.get("id").and_then(Value::as_str).unwrap_or_default();
                let mut outcome = Outcome::default();
                outcome.related.push(Resource::from_pairs([
                    ("prefect.resource.id", format!("prefect.flow-run.{id}")),
                    ("prefect.resource.role", "flow-run".to_owned()),
                    (
                        "prefect.resource.name",
                        run.get("name")
                            .and_then(Value::as_str)
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                ]));
                outcome.related.push(Resource::from_pairs([
                    (
                        "prefect.resource.id",
                        format!("prefect.deployment.{}", dep.id),
                    ),
                    ("prefect.resource.role", "target".to_owned()),
                    ("prefect.resource.name", dep.name.clone()),
                ]));
                Ok(outcome)
            }
            Prepared::SetAutomationPaused { automation, paused } => {
                self.set_automation_paused(*automation, *paused)
                    .await
                    .map_err(|e| Failure::Permanent(e.to_string()))?;
                let mut outcome = Outcome::default();
                outcome.related.push(Resource::from_pairs([
                    (
                        "prefect.resource.id",
                        format!("prefect.automation.{automation}"),
                    ),
                    ("prefect.resource.role", "target".to_owned()),
                ]));
                Ok(outcome)
            }
            Prepared::SetDeploymentPaused { deployment, paused } => {
                self.set_deployment_paused(deployment, *paused)
                    .map_err(Failure::Permanent)?;
                Ok(Outcome::default())
            }
            Prepared::CancelRun { run, message } => {
                if self.is_server_flow_run(*run).await {
                    return self
                        .set_server_state(*run, "CANCELLING", message, "cancel-flow-run")
                        .await;
                }
                self.cancel_with(*run, message)
                    .await
                    .map_err(Failure::Permanent)?;
                Ok(Outcome::default())
            }
            Prepared::ChangeRunState {
                run,
                state,
                message,
            } => {
                if self.is_server_flow_run(*run).await {
                    return self
                        .set_server_state(
                            *run,
                            state.state_type(),
                            message,
                            "change-flow-run-state",
                        )
                        .await;
                }
                self.force_state(*run, *state, message)
                    .await
                    .map_err(Failure::Permanent)?;
                Ok(Outcome::default())
            }
            Prepared::PrefectCall {
                method,
                path,
                body,
                action,
            } => {
                self.prefect_call(method, path, body, action).await?;
                Ok(Outcome::default())
            }
            Prepared::PrefectWorkPoolPaused { work_pool, paused } => {
                let what = if *paused {
                    "pause-work-pool"
                } else {
                    "resume-work-pool"
                };
                let found = self
                    .prefect_call(
                        "POST",
                        "/work_pools/filter",
                        &json!({"work_pools": {"id": {"any_": [work_pool]}}}),
                        what,
                    )
                    .await?;
                let name = found
                    .get(0)
                    .and_then(|p| p["name"].as_str())
                    .ok_or_else(|| Failure::Permanent(format!("Work pool {work_pool} not found")))?
                    .to_owned();
                self.prefect_call(
                    "PATCH",
                    &format!("/work_pools/{name}"),
                    &json!({"is_paused": paused}),
                    what,
                )
                .await?;
                Ok(Outcome::default())
            }
            Prepared::Http {
                method,
                url,
                headers,
                body,
                require_success,
                key,
            } => {
                let request = HttpRequest {
                    method: method.clone(),
                    url: url.clone(),
                    headers: headers.clone(),
                    body: body.clone(),
                };
                self.send_http(&request, *require_success, key).await
            }
            Prepared::PrefectBlock {
                block_document_id,
                action,
                payload,
                subject,
                body,
                key,
            } => {
                self.perform_block(*block_document_id, action, (payload, subject, body), key)
                    .await
            }
            Prepared::SuspendRun { run, message } => {
                self.server_run_only(*run, "suspend-flow-run").await?;
                // Prefect's `Suspended(timeout_seconds=3600)`: the hour counts from now.
                let timeout = Utc::now() + TimeDelta::seconds(3600);
                let state = json!({
                    "type": "PAUSED",
                    "name": "Suspended",
                    "message": message,
                    "state_details": {
                        "pause_timeout": spur_core::time::format_timestamp(timeout),
                        "pause_reschedule": true,
                        "pause_key": null,
                    },
                });
                self.set_server_state_to(*run, state, "suspend-flow-run")
                    .await
            }
            Prepared::ResumeRun { run } => {
                self.server_run_only(*run, "resume-flow-run").await?;
                let answer = self
                    .prefect_call(
                        "POST",
                        &format!("/flow_runs/{run}/resume"),
                        &Value::Null,
                        "resume-flow-run",
                    )
                    .await?;
                if answer["status"] != "ACCEPT" {
                    return Err(Failure::Permanent(format!(
                        "Failed to resume flow run: {}",
                        answer["details"]["reason"]
                            .as_str()
                            .unwrap_or("not accepted")
                    )));
                }
                Ok(target_run(*run))
            }
            Prepared::DeleteRun { run } => {
                self.server_run_only(*run, "delete-flow-run").await?;
                self.prefect_call(
                    "DELETE",
                    &format!("/flow_runs/{run}"),
                    &Value::Null,
                    "delete-flow-run",
                )
                .await?;
                let mut outcome = target_run(*run);
                outcome.details.insert("status_code".into(), json!(204));
                Ok(outcome)
            }
            Prepared::EmitEvent { event } => {
                let event =
                    Event::from_json(event, Utc::now(), &EventLimits::default()).map_err(|e| {
                        Failure::Permanent(format!("the emitted event is invalid: {e}"))
                    })?;
                let mut outcome = Outcome::default();
                outcome
                    .details
                    .insert("emitted_event".into(), json!(event.id));
                let mut resource = event.resource.clone();
                resource.insert("prefect.resource.role".into(), "target".into());
                outcome.related.push(resource);
                self.inner
                    .own_events
                    .submit(vec![event])
                    .await
                    .map_err(|e| Failure::Transient(e.to_string()))?;
                Ok(outcome)
            }
        }
    }

    /// Prefect's `prefect.automation.action.<kind>` event for one action.
    #[allow(clippy::too_many_arguments)]
    fn action_event(
        &self,
        firing: &Firing,
        action: &Action,
        index: usize,
        invocation: Uuid,
        state_event_id: Uuid,
        kind: &str,
        result: &Result<Outcome, String>,
        follows: Option<Uuid>,
    ) -> Event {
        let automation = &firing.automation;
        let mut resource = Resource::from_pairs([
            (
                "prefect.resource.id",
                format!("prefect.automation.{}", automation.id),
            ),
            ("prefect.resource.name", automation.name.clone()),
            (
                "prefect.trigger-type",
                automation.trigger.type_name().to_owned(),
            ),
        ]);
        if let spur_core::Trigger::Event(t) = &automation.trigger {
            let posture = match t.posture {
                spur_core::Posture::Reactive => "Reactive",
                spur_core::Posture::Proactive => "Proactive",
            };
            resource.insert("prefect.posture".into(), posture.into());
        }
        let mut related: Vec<Resource> = match result {
            Ok(outcome) if kind != "triggered" => outcome.related.clone(),
            _ => Vec::new(),
        };
        related.push(Resource::from_pairs([
            (
                "prefect.resource.id",
                format!("prefect.event.{state_event_id}"),
            ),
            (
                "prefect.resource.role",
                "automation-triggered-event".to_owned(),
            ),
        ]));
        if let Some(e) = &firing.event {
            related.push(Resource::from_pairs([
                ("prefect.resource.id", format!("prefect.event.{}", e.id)),
                ("prefect.resource.role", "triggering-event".to_owned()),
            ]));
        }
        let mut payload = json!({
            "action_index": index,
            "action_type": action.action_type,
            "invocation": invocation,
        });
        match result {
            Ok(outcome) if kind != "triggered" => {
                for (k, v) in &outcome.details {
                    payload[k] = v.clone();
                }
            }
            Err(reason) if kind == "failed" => payload["reason"] = json!(reason),
            _ => {}
        }
        let now = Utc::now();
        let (occurred, follows) = match (kind, follows) {
            ("triggered", _) => {
                let near = firing
                    .event
                    .as_ref()
                    .filter(|e| (firing.at - e.occurred).abs() < TimeDelta::minutes(5))
                    .map(|e| e.id);
                (firing.at, near)
            }
            (_, f) => (now, f),
        };
        Event {
            id: spur_core::derived_id(firing.id, &format!("action-{kind}:{invocation}")),
            occurred,
            event: format!("prefect.automation.action.{kind}"),
            resource,
            related,
            payload,
            follows,
            received: now,
        }
    }

    fn set_deployment_paused(&self, deployment: &str, paused: bool) -> Result<(), String> {
        let list = {
            let mut set = self
                .inner
                .paused_deployments
                .write()
                .map_err(|_| "lock poisoned".to_owned())?;
            if paused {
                set.insert(deployment.to_owned());
            } else {
                set.remove(deployment);
            }
            set.iter().cloned().collect::<Vec<_>>()
        };
        self.inner
            .store
            .put_setting("paused_deployments", &json!(list))
            .map_err(|e| e.to_string())
    }

    /// Retries a dead-lettered action; on success it leaves the dead-letter list.
    pub async fn retry_failed(&self, id: Uuid) -> Result<(), String> {
        let records = self
            .inner
            .store
            .failed_actions()
            .map_err(|e| e.to_string())?;
        let record = records
            .into_iter()
            .find(|r| r.get("id").and_then(Value::as_str) == Some(id.to_string().as_str()))
            .ok_or_else(|| format!("no failed action {id}"))?;
        let prepared: Prepared = record
            .get("prepared")
            .cloned()
            .and_then(|p| serde_json::from_value(p).ok())
            .ok_or("this action failed before it could be prepared; fix the automation instead")?;
        self.perform_with_retries(&prepared).await?;
        self.inner
            .store
            .take_failed_action(id)
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// Creates (once per key) and launches a run. Returns the stored run.
    pub async fn start(
        &self,
        deployment: &Deployment,
        rendered: &Value,
        key: Option<String>,
        automation: Option<String>,
        options: RunOptions,
    ) -> Result<Value, String> {
        self.start_run(deployment, rendered, key, automation, None, options)
            .await
    }

    async fn start_run(
        &self,
        deployment: &Deployment,
        rendered: &Value,
        key: Option<String>,
        automation: Option<String>,
        rerun_of: Option<Uuid>,
        options: RunOptions,
    ) -> Result<Value, String> {
        if self.is_paused(&deployment.name) {
            return Err(format!("deployment {:?} is paused", deployment.name));
        }
        let parameters = deployment.prepare_parameters(rendered)?;
        let mut run = Run::new(
            &deployment.target(),
            parameters,
            key.clone(),
            automation,
            Utc::now(),
        );
        run.rerun_of = rerun_of;
        run.job_variables = options.job_variables;
        run.concurrency_key = options.concurrency_key;
        if options.schedule_after > TimeDelta::zero() {
            run.scheduled_start = Some(run.created + options.schedule_after);
        }
        let message = rerun_of.map(|old| format!("a rerun of run {old}"));
        let scheduled = run.transition(RunState::Scheduled, message, Utc::now());
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
        self.spawn_drive(run, deployment.launcher.clone(), false);
        Ok(stored)
    }

    fn spawn_drive(&self, run: Run, launcher: Option<Launcher>, after_restart: bool) {
        self.hold_slot(&run);
        let id = run.id;
        let executor = self.clone();
        let handle =
            tokio::spawn(async move { executor.drive(run, launcher, after_restart).await });
        if let Ok(mut running) = self.inner.running.lock() {
            running.insert(id, handle.abort_handle());
        }
    }

    /// Takes a run from where it is (Scheduled, or where a restart found it) to its end.
    ///
    /// A state is recorded only once it is true: a `command` run is Running once its
    /// process exists (with its pid and start time on the record), a remote one once the
    /// request is about to leave.
    async fn drive(&self, mut run: Run, launcher: Option<Launcher>, after_restart: bool) {
        let Some(launcher) = launcher else {
            let message = Some(format!(
                "deployment {:?} has no launcher: give it one (`launcher: {{command: …}}`) in its YAML",
                run.deployment
            ));
            let event = run.transition(RunState::Failed, message, Utc::now());
            self.store_and_emit(&run, event).await;
            self.forget(run.id);
            return;
        };
        let context = self.launch_context();
        // A run with a later start (`schedule_after`) waits for it, Scheduled. A restart
        // finds it Scheduled and not started, and continues it here: the wait goes on to the
        // same instant. A cancel aborts this task. Prefect's scheduler does the waiting for a
        // `prefect` run, which is created at once with its scheduled time.
        if run.state == RunState::Scheduled
            && !matches!(launcher, Launcher::Prefect(_))
            && let Some(start) = run.scheduled_start
            && let Ok(wait) = (start - Utc::now()).to_std()
        {
            info!(run = %run.id, %start, "run waits for its scheduled start");
            tokio::time::sleep(wait).await;
        }
        if run.state == RunState::Scheduled {
            let message = after_restart.then(|| "continued after the daemon restarted".to_owned());
            let pending = run.transition(RunState::Pending, message, Utc::now());
            self.store_and_emit(&run, pending).await;
        }
        let outcome = match &launcher {
            Launcher::Command(spec) => {
                // Held until the process has ended (a cancel aborts this task, which frees
                // it); the semaphore is never closed, so `acquire` cannot fail.
                let _slot = self.process_slots().1.acquire().await;
                match launcher::spawn(spec, &run, &context) {
                    Err(e) => e.into(),
                    Ok(process) => {
                        run.process = Some(process.process.clone());
                        let running = run.transition(RunState::Running, None, Utc::now());
                        // Reaped while its Running event is on its way: under load that event
                        // waits for a commit (or the stream's round trip), and a process that
                        // ended meanwhile sat as a zombie — thousands of them made every
                        // SIGCHLD cost a scan of all (most of the CPU, in the kernel).
                        let ((), outcome) =
                            tokio::join!(self.store_and_emit(&run, running), process.wait());
                        outcome
                    }
                }
            }
            Launcher::Http(http) => {
                self.enter_running(&mut run).await;
                spur_action::remote::launch_http(
                    &self.inner.http,
                    &self.inner.templates,
                    http,
                    &run,
                )
                .await
            }
            Launcher::Prefect(prefect) => {
                self.enter_running(&mut run).await;
                spur_action::remote::launch_prefect(&self.inner.http, prefect, &run).await
            }
            Launcher::Worker { pool, command } => {
                let Some(client) = self.inner.nats.get().cloned() else {
                    let message = Some(
                        "worker launchers need NATS: start the daemon with --nats URL".to_owned(),
                    );
                    let event = run.transition(RunState::Crashed, message, Utc::now());
                    self.store_and_emit(&run, event).await;
                    self.forget(run.id);
                    return;
                };
                let handover = match (after_restart, run.state) {
                    (false, _) => Handover::New,
                    (true, RunState::Running) => Handover::FollowOnly,
                    (true, _) => Handover::Reconcile,
                };
                let request = RunRequest::new(&run, command, context.api_url.clone());
                let was_running = run.state == RunState::Running;
                let mut running_run = run.clone();
                let running = (!was_running)
                    .then(|| running_run.transition(RunState::Running, None, Utc::now()));
                let executor = self.clone();
                let reported = running_run.clone();
                let on_running = async move {
                    if let Some(running) = running {
                        executor.store_and_emit(&reported, running).await;
                    }
                };
                let outcome = spur_action::worker::launch_remote(
                    &client, pool, &request, handover, on_running,
                )
                .await;
                if self
                    .load_run(run.id)
                    .await
                    .is_some_and(|r| r.state == RunState::Running)
                {
                    run = running_run;
                }
                outcome
            }
        };
        // A state forced meanwhile (cancel, change-flow-run-state) wins over the process's end.
        if let Some(current) = self.load_run(run.id).await
            && current.state.is_final()
        {
            self.forget(run.id);
            return;
        }
        let done = run.finish(outcome, Utc::now());
        self.store_and_emit(&run, done).await;
        info!(run = %run.id, state = run.state.name(), message = ?run.message, "run finished");
        self.forget(run.id);
    }

    /// Records Running before a remote launch (unless a restart found the run Running).
    async fn enter_running(&self, run: &mut Run) {
        if run.state != RunState::Running {
            let running = run.transition(RunState::Running, None, Utc::now());
            self.store_and_emit(run, running).await;
        }
    }

    fn forget(&self, id: Uuid) {
        if let Ok(mut running) = self.inner.running.lock() {
            running.remove(&id);
        }
    }

    async fn load_run(&self, id: Uuid) -> Option<Run> {
        let store = self.inner.store.clone();
        let value = tokio::task::spawn_blocking(move || store.get_run(id))
            .await
            .ok()?
            .ok()??;
        serde_json::from_value(value).ok()
    }

    /// Cancels a run that has not finished.
    pub async fn cancel(&self, id: Uuid) -> Result<Value, String> {
        self.cancel_with(id, "Cancelled by a user").await
    }

    async fn cancel_with(&self, id: Uuid, message: &str) -> Result<Value, String> {
        let mut run = self
            .load_run(id)
            .await
            .ok_or_else(|| format!("no run {id}"))?;
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
        let event = run.transition(RunState::Cancelled, Some(message.to_owned()), Utc::now());
        self.store_and_emit(&run, event).await;
        serde_json::to_value(&run).map_err(|e| e.to_string())
    }

    async fn force_state(&self, id: Uuid, state: RunState, message: &str) -> Result<(), String> {
        let mut run = self
            .load_run(id)
            .await
            .ok_or_else(|| format!("no run {id}"))?;
        if state.is_final()
            && let Some(handle) = self
                .inner
                .running
                .lock()
                .ok()
                .and_then(|mut r| r.remove(&id))
        {
            handle.abort();
        }
        let event = run.transition(state, Some(message.to_owned()), Utc::now());
        self.store_and_emit(&run, event).await;
        Ok(())
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
        // The record leads and its event follows (see `spur_store::Store::settle_run`): once
        // a final state's event is durable, a restart has nothing left to do for the run.
        if self.emit(event).await && run.state.is_final() {
            self.settle(run).await;
        }
        if run.state.is_final() {
            self.release_run(run.id);
        }
    }

    /// Emits one event and waits until it is durable; false if it could not be.
    async fn emit(&self, event: Event) -> bool {
        match self.inner.own_events.submit(vec![event]).await {
            Ok(_) => true,
            Err(e) => {
                warn!(error = %e, "cannot emit an event");
                false
            }
        }
    }

    /// Emits a firing's own records (its `automation.triggered`/`.resolved` event, an
    /// action's `triggered` and `executed`/`failed` pair) without waiting for them to become
    /// durable: the intake keeps submission order, so they still land in the log in order,
    /// and they share commits with whatever else is arriving. Waiting for each made every
    /// firing cost three durable commits of one event each; at light load those commits
    /// (their fsync's write-back above all) were most of the pipeline's CPU. Nothing here
    /// needs them durable first: their ids are derived from the firing's, so a firing
    /// dispatched again after a crash emits the same ids, which the log keeps once.
    async fn record(&self, events: Vec<Event>) {
        // A firing dispatched again after a crash (its dispatched mark was not durable yet)
        // emits the same events again, with the same ids. With the stream as the log, those
        // already in the log are not handed on: a repeat published after JetStream's
        // duplicate window would be a second copy in the stream. (The local intake drops a
        // known id itself, so without the stream there is nothing to look up.)
        if !self.inner.own_events.to_the_stream() {
            self.inner.own_events.record(events).await;
            return;
        }
        let store = self.inner.store.clone();
        let events = tokio::task::spawn_blocking(move || {
            events
                .into_iter()
                .filter(|e| !matches!(store.get_event(e.id), Ok(Some(_))))
                .collect::<Vec<Event>>()
        })
        .await
        .unwrap_or_default();
        if events.is_empty() {
            return;
        }
        self.inner.own_events.record(events).await;
    }
}

/// Why [`Executor::set_automation_paused`] did not finish.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    /// The pipeline has stopped (the daemon is shutting down).
    #[error("the pipeline is not running")]
    Stopped,
    /// The pipeline refused it (no such automation).
    #[error("{0}")]
    Refused(String),
    /// Done on this member (`done`: "paused" or "resumed"), but the other cluster members
    /// could not be told.
    #[error("{done} here, but {reason}")]
    NotShared {
        /// "paused" or "resumed".
        done: &'static str,
        /// Why the pauses bucket did not take it.
        reason: String,
    },
}

/// How long a stopping daemon waits for actions in flight (and then for their marks).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the writer of dispatched marks gathers marks before it writes them.
const MARKS_GATHER: Duration = Duration::from_millis(50);

/// The first involved resource `<prefix><uuid>` (Prefect's inference rule).
/// The deployment a `run-deployment` action names on a Prefect server: its `deployment_id`
/// (`source: selected`), or the one inferred from the triggering event (`source: inferred`).
fn server_deployment_id(action: &Action, event: Option<&Event>) -> Option<Uuid> {
    if action.field("source").and_then(Value::as_str) == Some("inferred") {
        return infer_id(event, "prefect.deployment.", "deployment").ok();
    }
    action
        .field("deployment_id")
        .and_then(Value::as_str)
        .and_then(|s| Uuid::parse_str(s).ok())
}

fn infer_id(event: Option<&Event>, prefix: &str, what: &str) -> Result<Uuid, String> {
    let event = event.ok_or_else(|| format!("No event to infer the {what}"))?;
    event
        .involved_resources()
        .filter_map(|r| r.id().strip_prefix(prefix))
        .find_map(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| format!("No {what} could be inferred"))
}

/// Prefect's `FlowRunAction.flow_run`: the triggering labels first, then the event.
fn infer_flow_run(firing: &Firing, event: Option<&Event>) -> Result<Uuid, String> {
    if let Some((_, id)) = firing
        .labels
        .iter()
        .find(|(k, _)| k == "prefect.resource.id")
        && let Some(uuid) = id
            .strip_prefix("prefect.flow-run.")
            .and_then(|s| Uuid::parse_str(s).ok())
    {
        return Ok(uuid);
    }
    infer_id(event, "prefect.flow-run.", "flow run")
        .map_err(|_| "No flow run could be inferred".to_owned())
}

/// Renders every string inside a JSON template (Prefect's rules: only strings that look like
/// templates are rendered).
fn render_strings(
    templates: &TemplateEngine,
    value: &Value,
    ctx: &spur_template::TemplateValue,
) -> Result<Value, String> {
    Ok(match value {
        Value::String(s) => Value::String(
            templates
                .render_text(s, ctx)
                .map_err(|e| format!("Template rendering failed: {e}"))?,
        ),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| render_strings(templates, v, ctx))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| Ok((k.clone(), render_strings(templates, v, ctx)?)))
                .collect::<Result<_, String>>()?,
        ),
        other => other.clone(),
    })
}

/// Prefect's template context objects read from its server: the variable and the resource
/// kind it is the first involved resource of.
const SERVER_OBJECTS: &[(&str, &str)] = &[
    ("deployment", "prefect.deployment"),
    ("flow", "prefect.flow"),
    ("flow_run", "prefect.flow-run"),
    ("task_run", "prefect.task-run"),
    ("work_pool", "prefect.work-pool"),
    ("work_queue", "prefect.work-queue"),
    ("concurrency_limit", "prefect.concurrency-limit"),
];

/// The server context objects (and `variables`) the templates in `value` name as variables
/// (an identifier not after a `.`, as Prefect finds the names a template loads); each once.
fn names_in_templates(value: &Value, found: &mut Vec<&'static str>) {
    match value {
        Value::String(s) if spur_template::maybe_template(s) => {
            let bytes = s.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                let is_ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
                if !is_ident(bytes[i]) {
                    i += 1;
                    continue;
                }
                let start = i;
                while i < bytes.len() && is_ident(bytes[i]) {
                    i += 1;
                }
                let before = s[..start].trim_end().as_bytes().last().copied();
                if before == Some(b'.') {
                    continue;
                }
                let word = &s[start..i];
                let name = SERVER_OBJECTS
                    .iter()
                    .map(|(n, _)| *n)
                    .chain(["variables"])
                    .find(|n| *n == word);
                if let Some(name) = name
                    && !found.contains(&name)
                {
                    found.push(name);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| names_in_templates(v, found)),
        Value::Object(map) => map.values().for_each(|v| names_in_templates(v, found)),
        _ => {}
    }
}

/// An HTTP request built from a block document.
#[derive(Debug, PartialEq)]
struct HttpRequest {
    method: String,
    url: String,
    headers: Vec<(String, String)>,
    body: String,
}

/// A string field of a block's data (secrets arrive in clear with `include_secrets`).
fn block_string(data: &Value, field: &str) -> Option<String> {
    data.get(field)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
}

/// The headers of a block's data (a mapping of strings).
fn block_headers(data: &Value, field: &str) -> Vec<(String, String)> {
    data.get(field)
        .and_then(Value::as_object)
        .map(|m| {
            m.iter()
                .map(|(k, v)| {
                    let v = v
                        .as_str()
                        .map(str::to_owned)
                        .unwrap_or_else(|| v.to_string());
                    (k.clone(), v)
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Prefect's `Webhook` block: its method, URL and headers, the rendered payload as the body.
fn webhook_block_request(data: &Value, payload: &str) -> Result<HttpRequest, String> {
    let url = block_string(data, "url").ok_or("The webhook block was invalid: it has no url")?;
    Ok(HttpRequest {
        method: block_string(data, "method")
            .unwrap_or_else(|| "POST".to_owned())
            .to_uppercase(),
        url,
        headers: block_headers(data, "headers"),
        body: payload.to_owned(),
    })
}

/// A notification block as a request to its URL: `custom-webhook` as Prefect builds it (its
/// `{{subject}}`, `{{body}}`, `{{name}}` and secrets put into URL, query, JSON or form data,
/// headers and cookies); Slack and Mattermost webhooks as `{"text": …}`; any other block
/// with a `url` gets `{"subject": …, "body": …}` as JSON. A block without a URL (e-mail,
/// SMS, Apprise services named by keys) cannot be sent by Spur, and says so.
fn notification_block_request(
    slug: &str,
    data: &Value,
    subject: &str,
    body: &str,
) -> Result<HttpRequest, String> {
    let json_request = |url: String, value: Value| HttpRequest {
        method: "POST".to_owned(),
        url,
        headers: vec![("content-type".to_owned(), "application/json".to_owned())],
        body: value.to_string(),
    };
    match slug {
        "custom-webhook" => {
            let mut values = data
                .get("secrets")
                .and_then(Value::as_object)
                .cloned()
                .unwrap_or_default();
            values.insert("subject".into(), json!(subject));
            values.insert("body".into(), json!(body));
            values.insert("name".into(), data.get("name").cloned().unwrap_or_default());
            let get = |field: &str| apply_values(data.get(field).unwrap_or(&Value::Null), &values);
            let mut url = match get("url") {
                Value::String(url) if !url.is_empty() => url,
                _ => return Err("The notification block was invalid: it has no url".to_owned()),
            };
            if let Value::Object(params) = get("params") {
                let query: Vec<(String, String)> = params
                    .iter()
                    .map(|(k, v)| {
                        (
                            k.clone(),
                            v.as_str()
                                .map(str::to_owned)
                                .unwrap_or_else(|| v.to_string()),
                        )
                    })
                    .collect();
                if let Ok(mut parsed) = reqwest::Url::parse(&url) {
                    parsed.query_pairs_mut().extend_pairs(query);
                    url = parsed.to_string();
                }
            }
            let mut headers = block_headers(&json!({"h": get("headers")}), "h");
            if let Value::Object(cookies) = get("cookies") {
                let cookie: Vec<String> = cookies
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
                    .collect();
                headers.push(("cookie".to_owned(), cookie.join("; ")));
            }
            let body = match (get("json_data"), get("form_data")) {
                (json @ (Value::Object(_) | Value::Array(_)), _) => {
                    headers.push(("content-type".to_owned(), "application/json".to_owned()));
                    json.to_string()
                }
                (_, Value::String(raw)) => raw,
                (_, Value::Object(form)) => {
                    headers.push((
                        "content-type".to_owned(),
                        "application/x-www-form-urlencoded".to_owned(),
                    ));
                    let mut encoded =
                        reqwest::Url::parse("http://x/").map_err(|e| e.to_string())?;
                    encoded
                        .query_pairs_mut()
                        .extend_pairs(form.iter().map(|(k, v)| {
                            (
                                k.clone(),
                                v.as_str()
                                    .map(str::to_owned)
                                    .unwrap_or_else(|| v.to_string()),
                            )
                        }));
                    encoded.query().unwrap_or_default().to_owned()
                }
                _ => String::new(),
            };
            Ok(HttpRequest {
                method: block_string(data, "method")
                    .unwrap_or_else(|| "POST".to_owned())
                    .to_uppercase(),
                url,
                headers,
                body,
            })
        }
        "slack-webhook" | "mattermost-webhook" => {
            let url = block_string(data, "url")
                .ok_or("The notification block was invalid: it has no url")?;
            let text = if subject.is_empty() {
                body.to_owned()
            } else {
                format!("{subject}\n{body}")
            };
            Ok(json_request(url, json!({"text": text})))
        }
        _ => match block_string(data, "url") {
            Some(url) if url.starts_with("http://") || url.starts_with("https://") => {
                Ok(json_request(url, json!({"subject": subject, "body": body})))
            }
            _ => Err(format!(
                "Spur sends notifications to a block's URL, and the {slug} block has none"
            )),
        },
    }
}

/// Prefect's `apply_values` for custom-webhook blocks: a string that is one `{{ key }}`
/// becomes that value; other strings get each known `{{ key }}` replaced by its text.
fn apply_values(template: &Value, values: &Map<String, Value>) -> Value {
    match template {
        Value::String(s) => {
            let trimmed = s.trim();
            if let Some(inner) = trimmed
                .strip_prefix("{{")
                .and_then(|t| t.strip_suffix("}}"))
                && !inner.contains("{{")
                && let Some(value) = values.get(inner.trim())
            {
                return value.clone();
            }
            let mut out = s.clone();
            for (key, value) in values {
                let text = value
                    .as_str()
                    .map(str::to_owned)
                    .unwrap_or_else(|| value.to_string());
                for placeholder in [format!("{{{{{key}}}}}"), format!("{{{{ {key} }}}}")] {
                    out = out.replace(&placeholder, &text);
                }
            }
            Value::String(out)
        }
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| apply_values(v, values)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), apply_values(v, values)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// An outcome whose related resource is the flow run acted on (role `target`).
fn target_run(run: Uuid) -> Outcome {
    let mut outcome = Outcome::default();
    outcome.related.push(Resource::from_pairs([
        ("prefect.resource.id", format!("prefect.flow-run.{run}")),
        ("prefect.resource.role", "target".to_owned()),
    ]));
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Prefect server that answers 503 to the first two requests (its database busy),
    /// then 201, and counts how many it holds at once: every request still succeeds, and no
    /// more than [`PREFECT_IN_FLIGHT`] are ever sent together.
    #[tokio::test]
    async fn a_busy_prefect_server_is_asked_again_with_a_few_requests_in_flight() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        #[derive(Default)]
        struct Seen {
            requests: AtomicUsize,
            in_flight: AtomicUsize,
            most: AtomicUsize,
        }
        let seen = Arc::new(Seen::default());
        let state = seen.clone();
        let app = axum::Router::new().route(
            "/api/deployments/{id}/create_flow_run",
            axum::routing::post(move || {
                let seen = state.clone();
                async move {
                    let n = seen.requests.fetch_add(1, SeqCst);
                    let now = seen.in_flight.fetch_add(1, SeqCst) + 1;
                    seen.most.fetch_max(now, SeqCst);
                    tokio::time::sleep(Duration::from_millis(30)).await;
                    seen.in_flight.fetch_sub(1, SeqCst);
                    if n < 2 {
                        (
                            axum::http::StatusCode::SERVICE_UNAVAILABLE,
                            "busy".to_owned(),
                        )
                    } else {
                        (axum::http::StatusCode::CREATED, format!("{{\"n\": {n}}}"))
                    }
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });

        // As the daemon does at start: reqwest's rustls needs a crypto provider.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(Store::open(&dir.path().join("spur.redb")).unwrap());
        let (tx, _rx) = mpsc::channel(8);
        let executor = Executor::new(store, Intake::new(tx, Default::default()));
        executor.set_prefect_server(&format!("http://{address}/api"), None, None);
        let calls = (0..12).map(|_| {
            let executor = executor.clone();
            tokio::spawn(async move {
                executor
                    .prefect_call(
                        "POST",
                        "/deployments/d/create_flow_run",
                        &json!({}),
                        "run-deployment",
                    )
                    .await
            })
        });
        for call in calls.collect::<Vec<_>>() {
            let answer = call.await.unwrap();
            assert!(answer.is_ok(), "{:?}", answer.err());
        }
        assert_eq!(
            seen.requests.load(SeqCst),
            14,
            "12 calls, two of them asked twice"
        );
        let most = seen.most.load(SeqCst);
        assert!(
            (1..=PREFECT_IN_FLIGHT).contains(&most),
            "{most} requests at once"
        );
    }

    #[test]
    fn the_server_objects_a_template_names_are_found_as_prefect_finds_them() {
        let mut found = Vec::new();
        names_in_templates(
            &json!({"a": "{{ flow_run.name }} of {{ deployment['name'] }}",
                    "b": ["{% if event.flow %}{{ variables.x }}{% endif %}"],
                    "c": "flow_run is plain text", "d": "{{ flow_run.id }}"}),
            &mut found,
        );
        // `event.flow` is an attribute, not the variable `flow`; text outside templates and
        // repeats do not count.
        assert_eq!(found, ["flow_run", "deployment", "variables"]);
    }

    #[test]
    fn notification_blocks_become_requests_to_their_url() {
        let custom = json!({"name": "cw", "url": "http://h/{{token}}", "method": "put",
                            "params": {"q": "{{subject}}"}, "json_data": {"t": "{{subject}}: {{body}}", "n": "{{ name }}"},
                            "headers": {"X-Key": "{{token}}"}, "secrets": {"token": "s3"}});
        let request = notification_block_request("custom-webhook", &custom, "Hi", "there").unwrap();
        assert_eq!(request.method, "PUT");
        assert_eq!(request.url, "http://h/s3?q=Hi");
        assert!(
            request
                .headers
                .contains(&("X-Key".to_owned(), "s3".to_owned()))
        );
        let body: Value = serde_json::from_str(&request.body).unwrap();
        assert_eq!(body, json!({"t": "Hi: there", "n": "cw"}));
        let slack =
            notification_block_request("slack-webhook", &json!({"url": "http://s/"}), "S", "B")
                .unwrap();
        assert_eq!(slack.body, json!({"text": "S\nB"}).to_string());
        let other =
            notification_block_request("ms-teams-webhook", &json!({"url": "https://t/"}), "S", "B")
                .unwrap();
        assert_eq!(other.body, json!({"subject": "S", "body": "B"}).to_string());
        let email =
            notification_block_request("sendgrid-email", &json!({"api_key": "k"}), "S", "B");
        assert!(
            email
                .unwrap_err()
                .contains("the sendgrid-email block has none")
        );
        let hook = webhook_block_request(
            &json!({"url": "http://w/", "method": "PATCH",
                                                 "headers": {"A": "b"}}),
            "{}",
        )
        .unwrap();
        assert_eq!(
            hook,
            HttpRequest {
                method: "PATCH".into(),
                url: "http://w/".into(),
                headers: vec![("A".into(), "b".into())],
                body: "{}".into()
            }
        );
    }
}
