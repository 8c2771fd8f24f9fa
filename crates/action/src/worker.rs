//! Runs on remote workers over NATS: `spur worker --pool NAME`.
//!
//! Protocol (core NATS, JSON bodies):
//!
//! 1. The daemon subscribes to `spur.runs.<run id>.state`, then sends a request on
//!    `spur.workers.<pool>` with a [`RunRequest`]. Workers of a pool share the queue group
//!    `spur-worker-<pool>`, so exactly one takes each request; it replies `{"accepted": true}`
//!    at once. No responder means no worker: the run crashes with that reason.
//! 2. The worker publishes [`StateReport`]s to `spur.runs.<run id>.state`: `Running`, then the
//!    final state with the result, exactly as the command launcher would report it locally.
//!
//! A worker remembers recent runs by id (10 000 of them) with their last reported state, and
//! never runs the same run twice: a repeated request is answered by re-publishing that
//! state (the run is re-adopted by whoever asked).
//!
//! 3. **Reconciling after a daemon restart.** A restarted daemon cannot know whether a run it
//!    had handed over reached a worker. Before it asks again it sends an *inquiry* to every
//!    worker of the pool (`spur.workers.<pool>.inquire`, a plain subscription, not the queue
//!    group): the worker that knows the run answers with its last [`StateReport`] and keeps
//!    reporting; no answer means no worker of the pool has it.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};
use uuid::Uuid;

use crate::launcher::{CommandSpec, LaunchContext, spawn};
use crate::run::{Outcome, Run, RunState};

/// What a worker is asked to run.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RunRequest {
    /// The run (id, deployment, flow, parameters, key).
    pub run: Run,
    /// Program and arguments.
    pub argv: Vec<String>,
    /// Extra environment.
    pub env: Vec<(String, String)>,
    /// Working directory on the worker.
    pub cwd: Option<String>,
    /// Seconds before the run is killed and crashed.
    pub timeout_secs: f64,
    /// The daemon URL, for flows that emit events.
    pub api_url: Option<String>,
}

impl RunRequest {
    /// The request for `run` of a `worker` launcher's command.
    pub fn new(run: &Run, command: &CommandSpec, api_url: Option<String>) -> RunRequest {
        RunRequest {
            run: run.clone(),
            argv: command.argv.clone(),
            env: command
                .env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain(run.job_environment())
                .collect(),
            cwd: command.cwd.as_ref().map(|c| c.display().to_string()),
            timeout_secs: command.timeout.as_secs_f64(),
            api_url,
        }
    }

    fn command(&self) -> CommandSpec {
        CommandSpec {
            argv: self.argv.clone(),
            env: self.env.iter().cloned().collect(),
            cwd: self.cwd.as_ref().map(Into::into),
            timeout: Duration::from_secs_f64(self.timeout_secs),
        }
    }
}

/// A state change reported by a worker.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StateReport {
    /// The new state.
    pub state: RunState,
    /// The result (Completed).
    pub result: Option<Value>,
    /// Why.
    pub message: Option<String>,
    /// Which worker.
    pub worker: String,
    /// The process's exit code (final states).
    #[serde(default)]
    pub exit_code: Option<i32>,
    /// The tail of the process's output (final states).
    #[serde(default)]
    pub output: Option<String>,
}

/// The subject every worker of a pool answers inquiries on (not a queue group).
pub fn inquiry_subject(pool: &str) -> String {
    format!("spur.workers.{pool}.inquire")
}

/// After a restart: asks every worker of `pool` whether one of them has `run`. Returns its
/// last report, or `None` if no worker answers within `wait`.
pub async fn inquire(
    client: &async_nats::Client,
    pool: &str,
    run: Uuid,
    wait: Duration,
) -> Option<StateReport> {
    let asked = tokio::time::timeout(
        wait,
        client.request(inquiry_subject(pool), run.to_string().into()),
    )
    .await;
    let answer = asked.ok()?.ok()?;
    serde_json::from_slice(&answer.payload).ok()
}

/// The subject a pool listens on.
pub fn pool_subject(pool: &str) -> String {
    format!("spur.workers.{pool}")
}

/// The subject a run's states are reported on.
pub fn state_subject(run: Uuid) -> String {
    format!("spur.runs.{run}.state")
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How a daemon hands a run to a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Handover {
    /// A run no worker can have yet: ask the pool to run it.
    New,
    /// A run a previous daemon may already have handed over (found unfinished at start):
    /// follow the worker that has it; only if none has, ask the pool to run it.
    Reconcile,
    /// A run that was already Running on a worker: follow it if a worker still has it,
    /// never start it again.
    FollowOnly,
}

/// Daemon side: hands the run to a worker of `pool` (see [`Handover`]); `on_running` is
/// called when the worker reports Running; returns the final outcome (Crashed when no worker
/// answers or it goes silent past the timeout).
pub async fn launch_remote(
    client: &async_nats::Client,
    pool: &str,
    request: &RunRequest,
    handover: Handover,
    on_running: impl std::future::Future<Output = ()>,
) -> Outcome {
    let crashed = Outcome::crashed;
    let mut states = match client.subscribe(state_subject(request.run.id)).await {
        Ok(s) => s,
        Err(e) => return crashed(format!("cannot subscribe for run states: {e}")),
    };
    let mut on_running = Some(Box::pin(on_running));
    let known = match handover {
        Handover::New => None,
        Handover::Reconcile | Handover::FollowOnly => {
            inquire(client, pool, request.run.id, Duration::from_secs(2)).await
        }
    };
    match known {
        Some(report) if report.state.is_final() => {
            // The worker ran it while no daemon followed. A program that exited (Completed,
            // Failed, or any exit code) had started: its history shows Running before its end.
            let ran = matches!(report.state, RunState::Completed | RunState::Failed)
                || report.exit_code.is_some();
            if ran && let Some(f) = on_running.take() {
                f.await;
            }
            return final_outcome(report);
        }
        Some(report) => {
            info!(run = %request.run.id, worker = %report.worker, "a worker still has the run: following it");
            if report.state == RunState::Running
                && let Some(f) = on_running.take()
            {
                f.await;
            }
        }
        None if handover == Handover::FollowOnly => {
            return crashed(format!(
                "no worker of pool {pool:?} has the run any more (the worker that ran it is gone)"
            ));
        }
        None => {
            if let Err(refused) = hand_over(client, pool, request).await {
                return refused;
            }
        }
    }
    let deadline = Duration::from_secs_f64(request.timeout_secs + 30.0);
    let wait = async {
        while let Some(message) = states.next().await {
            let Ok(report) = serde_json::from_slice::<StateReport>(&message.payload) else {
                continue;
            };
            if report.state.is_final() {
                return final_outcome(report);
            }
            if report.state == RunState::Running
                && let Some(f) = on_running.take()
            {
                f.await;
            }
        }
        crashed("the connection to the worker pool closed".to_owned())
    };
    match tokio::time::timeout(deadline, wait).await {
        Ok(outcome) => outcome,
        Err(_) => crashed(format!(
            "the worker went silent for {}s",
            deadline.as_secs()
        )),
    }
}

fn final_outcome(report: StateReport) -> Outcome {
    Outcome {
        state: report.state,
        result: report.result,
        message: report
            .message
            .map(|m| format!("{m} (worker {})", report.worker)),
        exit_code: report.exit_code,
        output: report.output,
    }
}

/// Sends the run request to the pool's queue group; the error is the Crashed outcome.
async fn hand_over(
    client: &async_nats::Client,
    pool: &str,
    request: &RunRequest,
) -> Result<(), Outcome> {
    let body = serde_json::to_vec(request)
        .map_err(|e| Outcome::crashed(format!("cannot encode the run request: {e}")))?;
    match tokio::time::timeout(
        Duration::from_secs(10),
        client.request(pool_subject(pool), body.into()),
    )
    .await
    {
        Err(_) => Err(Outcome::crashed(format!(
            "no worker of pool {pool:?} accepted the run within 10s"
        ))),
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            Err(Outcome::crashed(format!(
                "no worker is serving pool {pool:?} (start one: spur worker --pool {pool})"
            )))
        }
        Ok(Err(e)) => Err(Outcome::crashed(format!("cannot reach pool {pool:?}: {e}"))),
        Ok(Ok(_accepted)) => Ok(()),
    }
}

/// The runs a worker has taken, with their last report, oldest first (bounded).
#[derive(Default)]
struct Taken {
    last: HashMap<Uuid, Option<StateReport>>,
    order: VecDeque<Uuid>,
}

impl Taken {
    const CAP: usize = 10_000;

    /// Takes `run`; false if it was taken before.
    fn take(&mut self, run: Uuid) -> bool {
        if self.last.contains_key(&run) {
            return false;
        }
        self.last.insert(run, None);
        self.order.push_back(run);
        if self.order.len() > Self::CAP
            && let Some(old) = self.order.pop_front()
        {
            self.last.remove(&old);
        }
        true
    }
}

type Shared = Arc<Mutex<Taken>>;

/// Publishes a report on the run's state subject and remembers it as the run's last.
async fn publish(client: &async_nats::Client, taken: &Shared, run: Uuid, report: StateReport) {
    if let Ok(mut t) = taken.lock()
        && let Some(slot) = t.last.get_mut(&run)
    {
        *slot = Some(report.clone());
    }
    if let Ok(body) = serde_json::to_vec(&report) {
        let _ = client.publish(state_subject(run), body.into()).await;
        let _ = client.flush().await;
    }
}

fn last_report(taken: &Shared, run: Uuid) -> Option<Option<StateReport>> {
    taken.lock().ok()?.last.get(&run).cloned()
}

/// Worker side: serves `pool` until the connection closes.
pub async fn serve_pool(
    client: async_nats::Client,
    pool: &str,
    name: &str,
) -> Result<(), BoxError> {
    let mut requests = client
        .queue_subscribe(pool_subject(pool), format!("spur-worker-{pool}"))
        .await?;
    let mut inquiries = client.subscribe(inquiry_subject(pool)).await?;
    info!(%pool, worker = %name, "worker ready");
    let taken: Shared = Arc::default();
    loop {
        let message = tokio::select! {
            m = requests.next() => match m { Some(m) => m, None => break },
            m = inquiries.next() => {
                let Some(m) = m else { break };
                answer_inquiry(&client, &taken, m).await;
                continue;
            }
        };
        let request: RunRequest = match serde_json::from_slice(&message.payload) {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "ignored a malformed run request");
                continue;
            }
        };
        if let Some(reply) = message.reply.clone() {
            client
                .publish(reply, br#"{"accepted": true}"#.to_vec().into())
                .await?;
        }
        let run_id = request.run.id;
        let first_time = taken.lock().map_err(|_| "lock poisoned")?.take(run_id);
        if !first_time {
            // Asked again (a daemon restarted): re-adopted, not re-run. Repeat where it is.
            warn!(run = %run_id, "a repeated run request: reporting its state instead");
            if let Some(Some(report)) = last_report(&taken, run_id) {
                publish(&client, &taken, run_id, report).await;
            }
            continue;
        }
        let client = client.clone();
        let worker = name.to_owned();
        let taken = taken.clone();
        tokio::spawn(async move {
            let report = |state, outcome: Outcome| StateReport {
                state,
                result: outcome.result,
                message: outcome.message,
                worker: worker.clone(),
                exit_code: outcome.exit_code,
                output: outcome.output,
            };
            let context = LaunchContext {
                api_url: request.api_url.clone(),
                ..LaunchContext::default()
            };
            info!(run = %run_id, deployment = %request.run.deployment, "running");
            let outcome = match spawn(&request.command(), &request.run, &context) {
                Ok(process) => {
                    let running = report(RunState::Running, Outcome::default());
                    publish(&client, &taken, run_id, running).await;
                    process.wait().await
                }
                Err(e) => e.into(),
            };
            info!(run = %run_id, state = outcome.state.name(), "finished");
            publish(&client, &taken, run_id, report(outcome.state, outcome)).await;
        });
    }
    Ok(())
}

/// Answers an inquiry for a run this worker has taken (others stay silent).
async fn answer_inquiry(client: &async_nats::Client, taken: &Shared, message: async_nats::Message) {
    let Some(reply) = message.reply else { return };
    let Ok(run) = std::str::from_utf8(&message.payload)
        .unwrap_or_default()
        .trim()
        .parse::<Uuid>()
    else {
        return;
    };
    let Some(last) = last_report(taken, run) else {
        return;
    };
    // Taken but not started yet: it is about to be Running.
    let report = last.unwrap_or(StateReport {
        state: RunState::Pending,
        result: None,
        message: None,
        worker: String::new(),
        exit_code: None,
        output: None,
    });
    if let Ok(body) = serde_json::to_vec(&report) {
        let _ = client.publish(reply, body.into()).await;
    }
}
