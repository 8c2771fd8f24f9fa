//! Hot reload of the automations folder.
//!
//! The folder is polled (default every 500 ms) for a change in its YAML/JSON files' names,
//! sizes and modification times — simple, portable, and well inside the one-second promise.
//! On a change only the files whose size or modification time changed are read and
//! validated again (`spur_core::load::FileCache`); the others contribute what they did. A
//! file that fails keeps contributing the automations it had before (so a typo never stops
//! what was running) and its errors are published for `/api/automations` and the log; files
//! that load replace their previous automations. Unchanged automations keep their trigger
//! state (the engine matches them by id and definition).
//!
//! What runs is never displaced by a newcomer: on a name clash the file that provides the
//! running automation keeps it and the other file is refused (`spur_core::load::Incumbents`).
//! The folder is walked by the loader's own walk (`automation_files`), so a dangling or
//! looping symbolic link is noticed and reported like any broken file. Loading reads files
//! and parses untrusted text, so it runs on a blocking thread, not on a tokio worker; its
//! recursion is bounded by the loader's nesting limit, not by a thread's stack.
//!
//! The engine's automations can come from more than the folder (a Prefect server's, see
//! `prefect_bridge`): [`Catalog`] puts the parts together, and every source publishes through
//! it, so one source's reload never drops another's automations.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use spur_core::Automation;
use spur_core::Severity;
use spur_core::load::{
    FileCache, Incumbents, LoadedAutomation, automation_files, load_path_cached,
};
use spur_replay::check_templates;
use spur_template::TemplateEngine;
use tokio::sync::{mpsc, watch};
use tracing::{error, info, warn};
use uuid::Uuid;

use crate::pipeline::Control;

/// The current load status, shared with the API.
#[derive(Debug, Default, Clone)]
pub struct LoadStatus {
    /// `file:line:column: field: reason` for every current error.
    pub errors: Vec<String>,
    /// Warnings, same form.
    pub warnings: Vec<String>,
    /// Where each loaded automation is defined, by automation id. Shared, not copied: the
    /// catalog, the API and every reload hold the same map until one of them changes it, and
    /// its entries are built from what the loader already knows (no string per automation),
    /// so a reload beside 100 000 automations does not format 100 000 places.
    pub sources: Arc<HashMap<Uuid, Source>>,
}

/// Where an automation is defined.
#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    /// A file of the automations folder, at this line.
    File {
        /// The file.
        file: Arc<Path>,
        /// The line the automation starts on.
        line: u32,
    },
    /// A Prefect server: the automation's URL there.
    Prefect(String),
}

impl Source {
    /// `prefect` or `file`: the origin `/api/automations` and the UI show.
    pub fn origin(&self) -> &'static str {
        match self {
            Source::File { .. } => "file",
            Source::Prefect(_) => "prefect",
        }
    }

    /// True for a file whose path is `file` or ends with `/file` (the whole path, or its last
    /// components).
    pub fn is_in_file(&self, file: &str) -> bool {
        match self {
            Source::File { file: path, .. } => {
                let path = path.to_string_lossy();
                path == file || path.ends_with(&format!("/{file}"))
            }
            Source::Prefect(_) => false,
        }
    }
}

impl std::fmt::Display for Source {
    /// `file:line`, or the URL.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File { file, line } => write!(f, "{}:{line}", file.display()),
            Source::Prefect(url) => f.write_str(url),
        }
    }
}

impl LoadStatus {
    /// `prefect` or `file`: where the automation `id` comes from.
    pub fn origin(&self, id: Uuid) -> &'static str {
        self.sources.get(&id).map_or("file", Source::origin)
    }

    /// Where the automation `id` is defined (`file:line` or a URL), if known.
    pub fn source(&self, id: Uuid) -> Option<String> {
        self.sources.get(&id).map(Source::to_string)
    }
}

/// The automations read from a Prefect server (see `prefect_bridge`).
#[derive(Debug, Default, Clone)]
pub struct PrefectPart {
    /// The ones Spur evaluates, in the server's order.
    pub automations: Vec<Arc<Automation>>,
    /// One line per automation Spur cannot evaluate, with the reason.
    pub errors: Vec<String>,
    /// Warnings, same form.
    pub warnings: Vec<String>,
    /// Each automation's URL on the server, by id.
    pub sources: HashMap<Uuid, String>,
}

/// The folder's automations and the Prefect server's, put together: what the engine runs and
/// what `/api/automations` reports. A name the folder defines stays the folder's; a Prefect
/// automation with the same name is reported and not evaluated.
pub fn merge(
    files: &[Arc<Automation>],
    file_status: &LoadStatus,
    prefect: Option<&PrefectPart>,
) -> (Vec<Arc<Automation>>, LoadStatus) {
    let mut automations = files.to_vec();
    let mut status = file_status.clone();
    let Some(prefect) = prefect else {
        return (automations, status);
    };
    status.errors.extend(prefect.errors.iter().cloned());
    status.warnings.extend(prefect.warnings.iter().cloned());
    let taken: std::collections::HashSet<&str> = files.iter().map(|a| a.name.as_str()).collect();
    let sources = Arc::make_mut(&mut status.sources);
    for a in &prefect.automations {
        let source = prefect.sources.get(&a.id).cloned().unwrap_or_default();
        if taken.contains(a.name.as_str()) {
            let defined = files
                .iter()
                .find(|f| f.name == a.name)
                .and_then(|f| file_status.source(f.id))
                .unwrap_or_else(|| "a file".to_owned());
            status.errors.push(format!(
                "{source}: name: {:?} is defined in {defined}; the Prefect automation is not evaluated",
                a.name,
            ));
            continue;
        }
        sources.insert(a.id, Source::Prefect(source));
        automations.push(a.clone());
    }
    (automations, status)
}

/// Where the engine's automations are put together from their sources (the folder watcher and
/// the Prefect bridge): each source replaces its own part, and the union goes to the
/// pipeline and to the status the API reads.
#[derive(Debug)]
pub struct Catalog {
    parts: tokio::sync::Mutex<Parts>,
    status: Arc<RwLock<LoadStatus>>,
    control: mpsc::Sender<Control>,
}

#[derive(Debug)]
struct Parts {
    files: Vec<Arc<Automation>>,
    file_status: LoadStatus,
    prefect: Option<PrefectPart>,
}

impl Catalog {
    /// A catalog starting from what the pipeline was started with.
    pub fn new(
        files: Vec<Arc<Automation>>,
        file_status: LoadStatus,
        prefect: Option<PrefectPart>,
        status: Arc<RwLock<LoadStatus>>,
        control: mpsc::Sender<Control>,
    ) -> Catalog {
        Catalog {
            parts: tokio::sync::Mutex::new(Parts {
                files,
                file_status,
                prefect,
            }),
            status,
            control,
        }
    }

    /// Replaces the folder's part; false once the pipeline is gone.
    pub async fn set_files(&self, files: Vec<Arc<Automation>>, status: LoadStatus) -> bool {
        let mut parts = self.parts.lock().await;
        parts.files = files;
        parts.file_status = status;
        self.publish(&parts).await
    }

    /// Replaces the Prefect server's part; false once the pipeline is gone.
    pub async fn set_prefect(&self, prefect: PrefectPart) -> bool {
        let mut parts = self.parts.lock().await;
        parts.prefect = Some(prefect);
        self.publish(&parts).await
    }

    /// Sends the union (under the lock, so two sources never publish out of order).
    async fn publish(&self, parts: &Parts) -> bool {
        let (automations, status) = merge(&parts.files, &parts.file_status, parts.prefect.as_ref());
        if let Ok(mut s) = self.status.write() {
            *s = status;
        }
        self.control
            .send(Control::Reload(automations))
            .await
            .is_ok()
    }
}

/// What a folder scan found: the automations to run and the diagnostics.
#[derive(Debug)]
pub struct Loaded {
    /// Automations with their origin.
    pub automations: Vec<LoadedAutomation>,
    /// Status for the API.
    pub status: LoadStatus,
    /// Declared deployments.
    pub deployments: Vec<spur_core::load::DeploymentRef>,
    /// Declared webhooks.
    pub webhooks: Vec<serde_json::Value>,
}

/// Each file's size and modification time (`None` for one that cannot be read, such as a
/// dangling link: its appearing or going away is a change too).
type Fingerprint = BTreeMap<PathBuf, Option<(u64, Option<SystemTime>)>>;

fn fingerprint(path: &Path) -> Fingerprint {
    automation_files(path)
        .unwrap_or_default()
        .into_iter()
        .map(|f| (f.path, f.stamp))
        .collect()
}

/// Loads the folder; for files with errors, keeps the automations `previous` had from them.
/// A name `previous` runs stays with the file it comes from: another file defining it is
/// refused.
///
/// Only files changed since `cache` last saw them are read and checked again.
pub fn load(
    path: &Path,
    templates: &TemplateEngine,
    previous: &[LoadedAutomation],
    cache: &mut FileCache,
) -> Loaded {
    let mut outcome = load_path_cached(path, &Incumbents::of(previous), cache, |part| {
        check_templates(part, templates)
    });
    let mut status = LoadStatus::default();
    let mut failed_files: std::collections::HashSet<PathBuf> = std::collections::HashSet::new();
    for d in &outcome.diagnostics {
        match d.severity {
            Severity::Error => {
                status.errors.push(d.to_string());
                failed_files.insert(d.file.clone());
            }
            Severity::Warning => status.warnings.push(d.to_string()),
        }
    }
    let mut automations: Vec<LoadedAutomation> = std::mem::take(&mut outcome.automations)
        .into_iter()
        .filter(|a| !failed_files.contains(&*a.origin.file))
        .collect();
    for kept in previous
        .iter()
        .filter(|a| failed_files.contains(&*a.origin.file))
    {
        if !automations
            .iter()
            .any(|a| a.automation.name == kept.automation.name)
        {
            automations.push(kept.clone());
        }
    }
    status.sources = Arc::new(
        automations
            .iter()
            .map(|a| {
                let source = Source::File {
                    file: a.origin.file.clone(),
                    line: a.origin.line,
                };
                (a.automation.id, source)
            })
            .collect(),
    );
    Loaded {
        automations,
        status,
        deployments: outcome.deployments,
        webhooks: outcome.webhooks,
    }
}

/// The automations to hand to the engine.
pub fn runnable(loaded: &[LoadedAutomation]) -> Vec<Arc<Automation>> {
    loaded.iter().map(|l| l.automation.clone()).collect()
}

/// What the folder watcher needs.
#[derive(Debug)]
pub struct Watcher {
    /// The folder (or file).
    pub path: PathBuf,
    /// How often to look.
    pub interval: Duration,
    /// Where reloads go (with the Prefect server's automations, when there are any).
    pub catalog: Arc<Catalog>,
    /// Gauges to update.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Receives the declared deployments.
    pub executor: crate::actions::Executor,
    /// Receives the declared webhooks.
    pub webhooks: crate::webhooks::WebhookService,
    /// What the first load read, so the first reload reads only what changed since.
    pub cache: FileCache,
}

/// Watches the folder until `shutdown`, sending reloads to the pipeline. `current` is what is
/// loaded now.
pub async fn watch_folder(
    watcher: Watcher,
    current: Vec<LoadedAutomation>,
    mut shutdown: watch::Receiver<bool>,
) {
    let Watcher {
        path,
        interval,
        catalog,
        metrics,
        executor,
        webhooks,
        cache,
    } = watcher;
    let mut cache = Some(cache);
    let mut current = Arc::new(current);
    let templates = Arc::new(TemplateEngine::new());
    let mut seen = fingerprint(&path);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.changed() => return,
        }
        let started = std::time::Instant::now();
        let (now, loaded) = {
            // `current` is shared with the scan, not copied: at 100 000 automations a copy
            // every poll would cost more than the scan.
            let (path, templates, previous) = (path.clone(), templates.clone(), current.clone());
            let seen = seen.clone();
            // The cache travels to the blocking thread and back; a scan that panics loses
            // it, and the next reload reads every file again.
            let mut taken = cache.take().unwrap_or_default();
            let scan = tokio::task::spawn_blocking(move || {
                let now = fingerprint(&path);
                let loaded = (now != seen).then(|| {
                    let loaded = load(&path, &templates, &previous, &mut taken);
                    crate::process::return_free_memory();
                    loaded
                });
                (now, loaded, taken)
            });
            match scan.await {
                Ok((now, loaded, taken)) => {
                    cache = Some(taken);
                    (now, loaded)
                }
                Err(e) => {
                    error!(error = %e, "automations folder scan failed; keeping what runs");
                    continue;
                }
            }
        };
        seen = now;
        let Some(mut loaded) = loaded else {
            continue;
        };
        loaded
            .status
            .errors
            .extend(executor.set_deployments(&loaded.deployments));
        loaded
            .status
            .errors
            .extend(webhooks.sync_declared(&loaded.webhooks));
        for e in &loaded.status.errors {
            error!(diagnostic = %e, "automation file refused; its previous automations keep running");
        }
        for w in &loaded.status.warnings {
            warn!(diagnostic = %w, "automation warning");
        }
        let error_files = loaded.status.errors.len() as u64;
        metrics
            .load_errors
            .store(error_files, std::sync::atomic::Ordering::Relaxed);
        info!(
            automations = loaded.automations.len(),
            errors = loaded.status.errors.len(),
            read_ms = started.elapsed().as_secs_f64() * 1000.0,
            "automations reloaded"
        );
        current = Arc::new(loaded.automations);
        if !catalog.set_files(runnable(&current), loaded.status).await {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn automation(name: &str) -> Arc<Automation> {
        let value = serde_json::json!({
            "name": name,
            "trigger": {"type": "event", "expect": ["x"], "posture": "Reactive"},
            "actions": [],
        });
        let mut problems = spur_core::Problems::new();
        let a = Automation::parse(&value, spur_core::trigger::Dialect::Server, &mut problems);
        Arc::new(a.expect("a valid automation"))
    }

    fn with_id(a: Arc<Automation>, n: u128) -> Arc<Automation> {
        let mut a = (*a).clone();
        a.id = Uuid::from_u128(n);
        Arc::new(a)
    }

    #[test]
    fn merge_keeps_the_folders_names_and_marks_the_servers_automations() {
        let files = vec![automation("shared"), automation("from-file")];
        // The server's automations have their own ids (as a server's do).
        let server_shared = with_id(automation("shared"), 1);
        let server_only = with_id(automation("from-server"), 2);
        let mut file_status = LoadStatus::default();
        let source = Source::File {
            file: Arc::from(Path::new("a.yaml")),
            line: 1,
        };
        file_status.sources = Arc::new([(files[0].id, source)].into());
        let prefect = PrefectPart {
            automations: vec![server_shared.clone(), server_only.clone()],
            errors: vec!["bad one".into()],
            warnings: Vec::new(),
            sources: [
                (server_shared.id, "http://p/api/automations/1".to_owned()),
                (server_only.id, "http://p/api/automations/2".to_owned()),
            ]
            .into(),
        };
        let (automations, status) = merge(&files, &file_status, Some(&prefect));
        let names: Vec<&str> = automations.iter().map(|a| a.name.as_str()).collect();
        assert_eq!(names, ["shared", "from-file", "from-server"]);
        assert_eq!(status.origin(server_only.id), "prefect");
        assert_eq!(status.origin(files[0].id), "file");
        assert_eq!(status.source(files[0].id).as_deref(), Some("a.yaml:1"));
        assert_eq!(
            status.source(server_only.id).as_deref(),
            Some("http://p/api/automations/2")
        );
        assert_eq!(status.source(server_shared.id), None, "not evaluated");
        assert_eq!(status.errors.len(), 2, "{:?}", status.errors);
        assert!(status.errors[1].contains("a.yaml:1"), "{:?}", status.errors);
        // Without a server, the folder's part as it is.
        let (alone, status) = merge(&files, &file_status, None);
        assert_eq!(alone.len(), 2);
        assert!(status.sources.values().all(|s| s.origin() == "file"));
    }
}
