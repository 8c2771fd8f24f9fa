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
//! A worker remembers recent idempotency keys and never runs the same key twice.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::{info, warn};
use uuid::Uuid;

use crate::deployment::Launcher;
use crate::launcher::{Outcome, launch};
use crate::run::{Run, RunState};

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

/// Daemon side: hands the run to a worker of `pool`; `on_running` is called when the worker
/// reports Running; returns the final outcome (Crashed when no worker answers or it goes
/// silent past the timeout).
pub async fn launch_remote(
    client: &async_nats::Client,
    pool: &str,
    request: &RunRequest,
    on_running: impl std::future::Future<Output = ()>,
) -> Outcome {
    let crashed = |message: String| Outcome {
        state: RunState::Crashed,
        result: None,
        message: Some(message),
    };
    let mut states = match client.subscribe(state_subject(request.run.id)).await {
        Ok(s) => s,
        Err(e) => return crashed(format!("cannot subscribe for run states: {e}")),
    };
    let body = match serde_json::to_vec(request) {
        Ok(b) => b,
        Err(e) => return crashed(format!("cannot encode the run request: {e}")),
    };
    match tokio::time::timeout(
        Duration::from_secs(10),
        client.request(pool_subject(pool), body.into()),
    )
    .await
    {
        Err(_) => {
            return crashed(format!(
                "no worker of pool {pool:?} accepted the run within 10s"
            ));
        }
        Ok(Err(e)) if e.kind() == async_nats::client::RequestErrorKind::NoResponders => {
            return crashed(format!(
                "no worker is serving pool {pool:?} (start one: spur worker --pool {pool})"
            ));
        }
        Ok(Err(e)) => return crashed(format!("cannot reach pool {pool:?}: {e}")),
        Ok(Ok(_accepted)) => {}
    }
    let deadline = Duration::from_secs_f64(request.timeout_secs + 30.0);
    let mut on_running = Some(Box::pin(on_running));
    let wait = async {
        while let Some(message) = states.next().await {
            let Ok(report) = serde_json::from_slice::<StateReport>(&message.payload) else {
                continue;
            };
            if report.state.is_final() {
                return Outcome {
                    state: report.state,
                    result: report.result,
                    message: report
                        .message
                        .map(|m| format!("{m} (worker {})", report.worker)),
                };
            }
            if report.state == RunState::Running
                && let Some(f) = on_running.take()
            {
                f.await;
            }
        }
        crashed("the connection to the worker pool closed".into())
    };
    match tokio::time::timeout(deadline, wait).await {
        Ok(outcome) => outcome,
        Err(_) => crashed(format!(
            "the worker went silent for {}s",
            deadline.as_secs()
        )),
    }
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
    info!(%pool, worker = %name, "worker ready");
    let seen: Arc<Mutex<(HashSet<String>, VecDeque<String>)>> = Arc::default();
    while let Some(message) = requests.next().await {
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
        if let Some(key) = &request.run.idempotency_key {
            let mut guard = seen.lock().map_err(|_| "lock poisoned")?;
            let (set, order) = &mut *guard;
            if !set.insert(key.clone()) {
                warn!(%key, "ignored a repeated run request");
                continue;
            }
            order.push_back(key.clone());
            if order.len() > 10_000
                && let Some(old) = order.pop_front()
            {
                set.remove(&old);
            }
        }
        let client = client.clone();
        let worker = name.to_owned();
        tokio::spawn(async move {
            let subject = state_subject(request.run.id);
            let report = |state, result, message| StateReport {
                state,
                result,
                message,
                worker: worker.clone(),
            };
            let publish = |r: StateReport| {
                let client = client.clone();
                let subject = subject.clone();
                async move {
                    if let Ok(body) = serde_json::to_vec(&r) {
                        let _ = client.publish(subject, body.into()).await;
                        let _ = client.flush().await;
                    }
                }
            };
            publish(report(RunState::Running, None, None)).await;
            let launcher = Launcher::Command {
                argv: request.argv.clone(),
                env: request.env.iter().cloned().collect(),
                cwd: request.cwd.as_ref().map(Into::into),
                timeout: Duration::from_secs_f64(request.timeout_secs),
            };
            info!(run = %request.run.id, deployment = %request.run.deployment, "running");
            let outcome = launch(&launcher, &request.run, request.api_url.as_deref()).await;
            info!(run = %request.run.id, state = outcome.state.name(), "finished");
            publish(report(outcome.state, outcome.result, outcome.message)).await;
        });
    }
    Ok(())
}
