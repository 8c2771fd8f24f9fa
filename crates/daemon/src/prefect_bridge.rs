//! Spur beside a Prefect server (`--prefect-api`): the server's automations, kept in sync.
//!
//! Every [`PrefectConfig::automations_probe_interval`] (500 ms) the server is asked cheaply
//! whether its automations changed: their count and the most recently updated one
//! (`/automations/count`, `/automations/filter` sorted `UPDATED_DESC`, limit 1). A create,
//! change, pause or delete moves one of the two, and then, or every
//! [`PrefectConfig::automations_interval`] regardless, they are read in full
//! (`POST /automations/filter`, paged by 200, checked against `POST /automations/count` so a
//! change while paging is read again instead of taken for a deletion), parsed with Spur's
//! Prefect parser (`Dialect::Server`) and, when anything changed, handed to the
//! [`Catalog`](crate::reload::Catalog), which puts them beside the folder's automations and
//! reloads the engine. Unchanged automations keep their trigger state (the engine matches
//! them by id and definition); paused ones on the server (`enabled: false`) are loaded but not
//! evaluated; deleted ones go. An automation Spur cannot evaluate (say Prefect Cloud's
//! `metric` trigger) is reported with its reason in `/api/automations`' errors and the log, and
//! the others run.
//!
//! The last list read is kept in the store, so a restart evaluates the server's automations
//! from the first event on, with their checkpointed state, even while the server is down.
//! The event stream itself is `spur_ingest::prefect`; its position is kept in the store by
//! [`StoreCursor`].

use std::sync::Arc;
use std::sync::atomic::Ordering;

use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use spur_core::trigger::Dialect;
use spur_core::{Automation, Problems, Severity};
use spur_ingest::prefect::{Backoff, BridgeError, Cursor, PrefectConfig, PrefectHealth, answer};
use spur_store::Store;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::reload::{Catalog, PrefectPart};

/// The store setting holding the event stream's position.
const CURSOR_SETTING: &str = "prefect_events_cursor";
/// The store setting holding the last automations read.
const AUTOMATIONS_SETTING: &str = "prefect_automations";
/// Page size of `/automations/filter` (the server's largest).
const PAGE: usize = 200;

/// The event stream's position, in the store, per server URL.
#[derive(Debug)]
pub struct StoreCursor {
    /// The store.
    pub store: Arc<Store>,
    /// The server it is the position on.
    pub api_url: String,
}

impl Cursor for StoreCursor {
    fn load(&self) -> Option<DateTime<Utc>> {
        let value = self.store.get_setting(CURSOR_SETTING).ok().flatten()?;
        if value["api_url"] != self.api_url.as_str() {
            return None;
        }
        spur_core::time::parse_timestamp(&value["occurred"]).ok()
    }

    fn save(&self, at: DateTime<Utc>) {
        let value = json!({
            "api_url": self.api_url,
            "occurred": spur_core::time::format_timestamp(at),
        });
        if let Err(e) = self.store.put_setting(CURSOR_SETTING, &value) {
            warn!(error = %e, "cannot remember the Prefect event stream's position");
        }
    }
}

/// The automations last read from `api_url`, as kept in the store.
pub fn cached(store: &Store, api_url: &str) -> Option<PrefectPart> {
    let value = store.get_setting(AUTOMATIONS_SETTING).ok().flatten()?;
    if value["api_url"] != api_url {
        return None;
    }
    Some(parse(value["automations"].as_array()?, api_url))
}

/// Parses the server's automation objects; the ones that fail are reported, not loaded.
pub fn parse(raw: &[Value], api_url: &str) -> PrefectPart {
    let mut part = PrefectPart::default();
    let mut names: std::collections::HashMap<String, String> = Default::default();
    for value in raw {
        let id = value["id"].as_str().unwrap_or("?").to_owned();
        let name = value["name"].as_str().unwrap_or("?").to_owned();
        let source = format!("{api_url}/automations/{id}");
        let mut definition = value.clone();
        if let Some(map) = definition.as_object_mut() {
            // The read model's server-managed fields are not part of a definition.
            map.remove("created");
            map.remove("updated");
        }
        let mut problems = Problems::new();
        let parsed = Automation::parse(&definition, Dialect::Server, &mut problems);
        let describe = |p: &spur_core::Problem| {
            format!("{source}: automation {name:?}: {}: {}", p.path, p.reason)
        };
        let problems = problems.into_vec();
        for p in problems.iter().filter(|p| p.severity == Severity::Warning) {
            part.warnings.push(describe(p));
        }
        let errors: Vec<String> = problems
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .map(describe)
            .collect();
        match parsed {
            Some(automation) if errors.is_empty() => {
                for (list, actions) in [
                    ("actions", &automation.actions),
                    ("actions_on_trigger", &automation.actions_on_trigger),
                    ("actions_on_resolve", &automation.actions_on_resolve),
                ] {
                    for (i, action) in actions.iter().enumerate() {
                        if let Some(why) = not_on_the_server(action) {
                            part.warnings
                                .push(format!("{source}: automation {name:?}: {list}[{i}]: {why}"));
                        }
                    }
                }
                if let Some(other) = names.get(&automation.name) {
                    part.errors.push(format!(
                        "{source}: automation {name:?}: the name is taken by {other}; not evaluated (Spur needs unique names)"
                    ));
                    continue;
                }
                names.insert(automation.name.clone(), source.clone());
                part.sources.insert(automation.id, source);
                part.automations.push(Arc::new(automation));
            }
            _ if errors.is_empty() => part.errors.push(format!(
                "{source}: automation {name:?}: cannot be evaluated"
            )),
            _ => part.errors.extend(errors),
        }
    }
    part
}

/// Why an action of a server automation will not act on that server as Prefect's would, if
/// it will not. Every action type acts on the server (actions.rs): `run-deployment` of a
/// deployment Spur does not declare creates the flow run there, the pause/resume actions,
/// `cancel-`, `suspend-`, `resume-`, `delete-flow-run` and `change-flow-run-state` act on
/// its objects, and `call-webhook` / `send-notification` read their block from it.
fn not_on_the_server(action: &spur_core::Action) -> Option<String> {
    let kind = action.action_type.as_str();
    match kind {
        // Spur's flow runs have no Paused state, and the server's are set unforced.
        "change-flow-run-state"
            if action.field("state").and_then(Value::as_str) == Some("PAUSED")
                || action.field("force").and_then(Value::as_bool) == Some(true) =>
        {
            Some(format!(
                "{kind} to PAUSED or with force: true is not performed by Spur (the state is set unforced, and PAUSED fails)"
            ))
        }
        _ => None,
    }
}

/// Every automation on the server, oldest first.
pub async fn read_all(
    client: &reqwest::Client,
    config: &PrefectConfig,
) -> Result<Vec<Value>, BridgeError> {
    let url = format!("{}/automations/filter", config.api_url);
    let count_url = format!("{}/automations/count", config.api_url);
    for _ in 0..3 {
        let mut all: Vec<Value> = Vec::new();
        loop {
            let body = json!({"sort": "CREATED_DESC", "limit": PAGE, "offset": all.len()});
            let page = answer(config.authorize(client.post(&url).json(&body))).await?;
            let Value::Array(page) = page else {
                return Err(BridgeError::Protocol(
                    "/automations/filter did not answer a list".into(),
                ));
            };
            let n = page.len();
            all.extend(page);
            if n < PAGE {
                break;
            }
        }
        // Paging by offset over a list that changes can skip one; the count says so.
        let count = answer(config.authorize(client.post(&count_url).json(&json!({})))).await?;
        let mut seen = std::collections::HashSet::new();
        all.retain(|a| seen.insert(a["id"].as_str().unwrap_or_default().to_owned()));
        if count.as_u64() == Some(all.len() as u64) {
            all.reverse();
            return Ok(all);
        }
    }
    Err(BridgeError::Protocol(
        "the automations kept changing while being read".into(),
    ))
}

/// What the cheap probe sees of the server's automations: how many, and the id and `updated`
/// of the most recently updated one. Equal probes mean nothing was created, changed, paused
/// or deleted in between (a deletion lowers the count; anything else moves the newest).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Probe {
    count: u64,
    newest: Option<(String, String)>,
}

async fn probe(client: &reqwest::Client, config: &PrefectConfig) -> Result<Probe, BridgeError> {
    let count_url = format!("{}/automations/count", config.api_url);
    let count = answer(config.authorize(client.post(&count_url).json(&json!({})))).await?;
    let url = format!("{}/automations/filter", config.api_url);
    let body = json!({"sort": "UPDATED_DESC", "limit": 1});
    let newest = answer(config.authorize(client.post(&url).json(&body))).await?;
    let newest = newest.get(0).map(|a| {
        let text = |k: &str| a[k].as_str().unwrap_or_default().to_owned();
        (text("id"), text("updated"))
    });
    Ok(Probe {
        count: count.as_u64().unwrap_or_default(),
        newest,
    })
}

/// Waits until the probe sees a change from `last`, `full_after` has passed, or `shutdown`;
/// `false` on shutdown. A failing probe ends the wait (the full read reports the failure).
async fn wait_for_change(
    client: &reqwest::Client,
    config: &PrefectConfig,
    last: Option<&Probe>,
    full_after: std::time::Duration,
    shutdown: &mut watch::Receiver<bool>,
) -> bool {
    let deadline = tokio::time::Instant::now() + full_after;
    loop {
        let step = config
            .automations_probe_interval
            .min(deadline.saturating_duration_since(tokio::time::Instant::now()));
        tokio::select! {
            _ = tokio::time::sleep(step) => {}
            _ = shutdown.changed() => return false,
        }
        if tokio::time::Instant::now() >= deadline {
            return true;
        }
        match (last, probe(client, config).await) {
            (Some(last), Ok(now)) if &now == last => {}
            _ => return true,
        }
    }
}

/// What the automations sync needs.
#[derive(Debug)]
pub struct AutomationSync {
    /// The server.
    pub config: PrefectConfig,
    /// Where the automations go.
    pub catalog: Arc<Catalog>,
    /// Where the last list read is kept.
    pub store: Arc<Store>,
    /// Health and metrics.
    pub health: Arc<PrefectHealth>,
}

/// Reads the server's automations every interval until `shutdown`; publishes them when they
/// changed. `current` is the list the engine has (from the store's cache), if any.
pub async fn sync_automations(
    sync: AutomationSync,
    mut current: Option<Vec<Value>>,
    mut shutdown: watch::Receiver<bool>,
) {
    let AutomationSync {
        config,
        catalog,
        store,
        health,
    } = sync;
    let client = config.http_client();
    let mut backoff = Backoff::new(config.backoff_max);
    let mut wait = std::time::Duration::ZERO;
    // The probe taken just before the last full read that succeeded.
    let mut last_probe: Option<Probe> = None;
    loop {
        if last_probe.is_some() {
            if !wait_for_change(&client, &config, last_probe.as_ref(), wait, &mut shutdown).await {
                return;
            }
        } else {
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
        }
        // Probed before the read: a change during the read shows in the next probe.
        let before = probe(&client, &config).await.ok();
        match read_all(&client, &config).await {
            Ok(raw) => {
                backoff.reset();
                last_probe = before;
                wait = config.automations_interval;
                health.automations_ok.store(true, Ordering::Relaxed);
                if current.as_ref() == Some(&raw) {
                    health.set_automations(format!(
                        "{} in sync, checked {}",
                        raw.len(),
                        spur_core::time::format_timestamp(Utc::now())
                    ));
                    continue;
                }
                let part = parse(&raw, &config.api_url);
                for e in &part.errors {
                    error!(diagnostic = %e, "Prefect automation not evaluated");
                }
                info!(
                    api = %config.api_url,
                    automations = part.automations.len(),
                    refused = part.errors.len(),
                    "Prefect automations loaded"
                );
                health.set_automations(format!(
                    "{} read ({} evaluated, {} refused) at {}",
                    raw.len(),
                    part.automations.len(),
                    raw.len() - part.automations.len(),
                    spur_core::time::format_timestamp(Utc::now())
                ));
                if !catalog.set_prefect(part).await {
                    return;
                }
                let keep = json!({"api_url": config.api_url, "automations": raw});
                let store = store.clone();
                match tokio::task::spawn_blocking(move || {
                    store.put_setting(AUTOMATIONS_SETTING, &keep)
                })
                .await
                {
                    Ok(Ok(())) => {}
                    Ok(Err(e)) => warn!(error = %e, "cannot keep the Prefect automations"),
                    Err(e) => warn!(error = %e, "cannot keep the Prefect automations"),
                }
                current = Some(raw);
            }
            Err(e) => {
                wait = backoff.next_wait();
                last_probe = None;
                health.automations_ok.store(false, Ordering::Relaxed);
                health.automation_failures.fetch_add(1, Ordering::Relaxed);
                warn!(api = %config.api_url, error = %e, retry_in_s = wait.as_secs_f64(), "cannot read the Prefect automations; the loaded ones keep running");
                health.set_automations(format!(
                    "failing since {}: {e}; the loaded ones keep running",
                    spur_core::time::format_timestamp(Utc::now())
                ));
            }
        }
    }
}

/// The store setting holding how far the feed back to the server has got (a log sequence).
const FEED_SETTING: &str = "prefect_feed";

/// What the feed back to the server needs.
#[derive(Debug)]
pub struct Feed {
    /// The server.
    pub config: PrefectConfig,
    /// The event log it reads.
    pub store: Arc<Store>,
    /// Health and metrics.
    pub health: Arc<PrefectHealth>,
}

/// True for the events Spur posts back: its `prefect.automation.triggered` / `resolved` and
/// `prefect.automation.action.*` events (the ones Prefect's own automations services emit).
pub fn fed_back(event: &spur_core::Event) -> bool {
    event.event.starts_with("prefect.automation.")
}

/// The events a feed batch reads from the log at once.
const FEED_BATCH: usize = 2000;

/// Posts Spur's automation events to the server (`POST /events`) until `shutdown`, so
/// Prefect's UI shows what fired. Reads the event log in order from a position kept in the
/// store (per server URL; a first start begins at the log's end): an outage delays the
/// posts, it loses none within the log's retention. A repeat is harmless, the server stores
/// an event id once; the events come back on the stream and Spur keeps them once too.
pub async fn feed_back(feed: Feed, mut shutdown: watch::Receiver<bool>) {
    let Feed {
        config,
        store,
        health,
    } = feed;
    let client = config.http_client();
    let url = format!("{}/events", config.api_url);
    let mut backoff = Backoff::new(config.backoff_max);
    let start = {
        let (store, api) = (store.clone(), config.api_url.clone());
        tokio::task::spawn_blocking(move || {
            let kept = store.get_setting(FEED_SETTING).ok().flatten();
            match kept {
                Some(v) if v["api_url"] == api.as_str() => v["seq"].as_u64(),
                _ => {
                    // Kept at once: a crash before the first post must not skip what
                    // follows.
                    let seq = store.last_seq().ok()?;
                    let keep = json!({"api_url": api, "seq": seq});
                    store.put_setting(FEED_SETTING, &keep).ok()?;
                    Some(seq)
                }
            }
        })
        .await
        .ok()
        .flatten()
    };
    let Some(mut seq) = start else {
        error!(
            "cannot read the event log's position; Spur's automation events are not posted to the Prefect server"
        );
        return;
    };
    let idle = std::time::Duration::from_millis(500);
    let mut wait = std::time::Duration::ZERO;
    let mut saved = std::time::Instant::now();
    loop {
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.changed() => return,
        }
        let read = {
            let store = store.clone();
            tokio::task::spawn_blocking(move || store.events_after(seq, FEED_BATCH)).await
        };
        let batch = match read {
            Ok(Ok(batch)) => batch,
            Ok(Err(e)) => {
                warn!(error = %e, "cannot read the event log to feed the Prefect server");
                wait = backoff.next_wait();
                continue;
            }
            Err(_) => return,
        };
        let Some(last) = batch.last().map(|(s, _)| *s) else {
            wait = idle;
            continue;
        };
        let events: Vec<Value> = batch
            .iter()
            .filter(|(_, e)| fed_back(e))
            .map(|(_, e)| e.to_json())
            .collect();
        let posting = !events.is_empty();
        if posting {
            let n = events.len();
            let posted = answer_empty(config.authorize(client.post(&url).json(&events))).await;
            if let Err(e) = posted {
                wait = backoff.next_wait();
                health.post_failures.fetch_add(1, Ordering::Relaxed);
                warn!(api = %config.api_url, error = %e, retry_in_s = wait.as_secs_f64(), "cannot post Spur's automation events to the Prefect server; retrying");
                health.set_feed(format!(
                    "failing since {}: {e}; {n} event(s) waiting",
                    spur_core::time::format_timestamp(Utc::now())
                ));
                continue;
            }
            health.events_posted.fetch_add(n as u64, Ordering::Relaxed);
            health.set_feed(format!(
                "posted up to {}",
                spur_core::time::format_timestamp(Utc::now())
            ));
        }
        backoff.reset();
        seq = last;
        // Kept after every post; past other events only every few seconds (each keep is a
        // store commit, and re-reading a few seconds of the log after a crash costs little).
        if posting || saved.elapsed() > std::time::Duration::from_secs(5) {
            saved = std::time::Instant::now();
            let keep = json!({"api_url": config.api_url, "seq": seq});
            let store = store.clone();
            let _ =
                tokio::task::spawn_blocking(move || store.put_setting(FEED_SETTING, &keep)).await;
        }
        wait = if batch.len() >= FEED_BATCH {
            std::time::Duration::ZERO
        } else {
            idle
        };
    }
}

/// Sends `request`; Ok for any 2xx (Prefect's `POST /events` answers 204, no body).
async fn answer_empty(request: reqwest::RequestBuilder) -> Result<(), BridgeError> {
    let response = request.send().await?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let mut text = response.text().await.unwrap_or_default();
    text.truncate(300);
    Err(BridgeError::Http(format!("HTTP {status}: {text}")))
}

/// The raw list `cached` parsed (for [`sync_automations`]'s `current`).
pub fn cached_raw(store: &Store, api_url: &str) -> Option<Vec<Value>> {
    let value = store.get_setting(AUTOMATIONS_SETTING).ok().flatten()?;
    if value["api_url"] != api_url {
        return None;
    }
    value["automations"].as_array().cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_automations_parse_and_bad_ones_are_reported_with_their_reason() {
        let raw = vec![
            json!({"id": "36676e14-ea45-40fd-ab63-ceb3b07e391f", "name": "a1", "description": "",
                   "enabled": true, "tags": [],
                   "trigger": {"type": "event", "id": "53b0a3b9-a5dd-4089-90c2-8e37fbde199e",
                               "match": {}, "match_related": {}, "after": [], "expect": ["x.*"],
                               "for_each": [], "posture": "Reactive", "threshold": 2, "within": 30.0},
                   "actions": [{"type": "do-nothing"}], "actions_on_trigger": [],
                   "actions_on_resolve": [], "created": "2026-12-05T12:53:52.071595Z",
                   "updated": "2026-12-05T12:53:52.071608Z"}),
            json!({"id": "46676e14-ea45-40fd-ab63-ceb3b07e391f", "name": "cloud",
                   "trigger": {"type": "metric", "metric": {}}, "actions": []}),
            json!({"id": "56676e14-ea45-40fd-ab63-ceb3b07e391f", "name": "a1",
                   "trigger": {"type": "event", "expect": ["y"], "posture": "Reactive"}, "actions": []}),
        ];
        let part = parse(&raw, "http://p/api");
        assert_eq!(part.automations.len(), 1, "{part:#?}");
        assert_eq!(part.automations[0].name, "a1");
        assert!(part.warnings.is_empty(), "{:?}", part.warnings);
        let runs = parse(
            &[
                json!({"id": "66676e14-ea45-40fd-ab63-ceb3b07e391f", "name": "chain",
                     "trigger": {"type": "event", "expect": ["y"], "posture": "Reactive"},
                     "actions": [{"type": "run-deployment", "source": "selected",
                                  "deployment_id": "853499d2-ab38-4332-981e-2022e382fcdc",
                                  "parameters": {}, "job_variables": null},
                                 {"type": "suspend-flow-run"},
                                 {"type": "send-notification", "block_document_id":
                                  "953499d2-ab38-4332-981e-2022e382fcdc", "body": "x"},
                                 {"type": "change-flow-run-state", "state": "PAUSED"}]}),
            ],
            "http://p/api",
        );
        assert_eq!(runs.automations.len(), 1, "{runs:#?}");
        // Every action acts on the server; what Spur does otherwise is named.
        assert!(
            runs.warnings.len() == 1
                && runs.warnings[0].contains("actions[3]: change-flow-run-state"),
            "{:?}",
            runs.warnings
        );
        assert_eq!(
            part.sources[&uuid::Uuid::from_u128(0x36676e14_ea45_40fd_ab63_ceb3b07e391f)],
            "http://p/api/automations/36676e14-ea45-40fd-ab63-ceb3b07e391f"
        );
        assert!(
            part.errors
                .iter()
                .any(|e| e.contains("\"cloud\"") && e.contains("metric")),
            "{:?}",
            part.errors
        );
        assert!(
            part.errors.iter().any(|e| e.contains("name is taken")),
            "{:?}",
            part.errors
        );
    }
}
