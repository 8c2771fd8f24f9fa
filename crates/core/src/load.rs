//! Loading automation and deployment files from disk, with errors that point at a line.
//!
//! A file is YAML or JSON (JSON is read by the YAML 1.2 parser too, so both get line numbers).
//! A document may hold:
//!
//! * one automation (a mapping with `trigger`),
//! * a list of automations, or `automations: [...]`,
//! * `deployments: [...]` in `prefect.yaml` shape, whose `triggers:` each become an automation
//!   that runs that deployment (Prefect's `DeploymentTrigger.as_automation`),
//! * or both keys side by side. Multi-document YAML (`---`) is read document by document.
//!
//! The text is read by [`yaml`] straight from saphyr's event stream into JSON values, and
//! node positions go into a [`SourceMap`] keyed by (a hash of) their [`FieldPath`], so a
//! validation [`Problem`] deep in a trigger becomes `file:line:column: field: reason`. While
//! loading only automation-level positions are kept; the first finding deeper in a file
//! parses it again for every node's position. [`load_path_cached`] re-reads only the files
//! whose size or modification time changed.
//!
//! Files are untrusted input (anyone who can write to the watched folder), so loading is
//! bounded and never gives up silently:
//!
//! * **Nesting depth.** Later steps (validation, dropping a value) recurse: 2 000 nested
//!   mappings once overflowed a 2 MiB tokio worker stack and aborted the daemon. The reader
//!   keeps its own stack and refuses a document nested deeper than [`MAX_NESTING_DEPTH`] at
//!   the line where it crosses the limit.
//! * **Files that cannot be read** (a dangling symbolic link, a link loop, no permission)
//!   each get an error naming the file; a directory linked into itself is walked once.
//! * **Name clashes.** Automation names are unique. When the daemon reloads, the file that
//!   already provides a running automation keeps it and the *newcomer* is refused (its own
//!   `file:line`), whatever the sort order ([`Incumbents`]). With nothing running yet (start,
//!   `spur check`) the file modified longest ago counts as the incumbent, then sort order.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use serde_json::{Map, Value};
use uuid::Uuid;

use crate::automation::Automation;
use crate::problem::{FieldPath, PathSegment, Problem, Problems, Severity};
use crate::trigger::Dialect;

mod yaml;

pub use yaml::{MAX_NESTING_DEPTH, SourceMap};
use yaml::{parse_documents, parse_documents_shallow};

/// A finding tied to a place in a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The field path, e.g. `trigger.within`.
    pub field: String,
    /// What is wrong.
    pub reason: String,
    /// Error or warning.
    pub severity: Severity,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let tag = match self.severity {
            Severity::Error => "",
            Severity::Warning => "warning: ",
        };
        write!(
            f,
            "{}:{}:{}: {tag}{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.field,
            self.reason
        )
    }
}

/// Where an automation came from, to report problems found after loading (e.g. templates).
#[derive(Clone, Debug)]
pub struct Origin {
    /// The file (shared by every automation from it: a reload copies origins around).
    pub file: Arc<Path>,
    /// The list the automation is an item of (`automations`, a deployment's `triggers`), or
    /// the automation's own path when it is not in a list. Shared by every item of the list:
    /// one path for 100 000 automations instead of one each.
    parent: Arc<FieldPath>,
    /// The automation's position in `parent`, when it is an item of a list.
    index: Option<u32>,
    /// Which document of a multi-document file.
    pub document: usize,
    /// The line the automation starts on, found once when the file is read (a reload beside
    /// 100 000 unchanged automations reports their places without looking them up again).
    pub line: u32,
}

impl Origin {
    /// The automation's path inside the document (`automations[3]`).
    pub fn base(&self) -> FieldPath {
        match self.index {
            Some(i) => self.parent.index(i as usize),
            None => (*self.parent).clone(),
        }
    }
}

/// An automation and where it was defined.
#[derive(Clone, Debug)]
pub struct LoadedAutomation {
    /// The validated automation.
    pub automation: Arc<Automation>,
    /// Its source.
    pub origin: Origin,
}

/// A deployment declared in a file (the parts the core needs; launchers come with actions).
#[derive(Clone, Debug, PartialEq)]
pub struct DeploymentRef {
    /// Its name.
    pub name: String,
    /// Given id, or a UUIDv5 of the name.
    pub id: Uuid,
    /// The whole declaration, for the action layer.
    pub spec: Value,
}

/// Everything loaded from a set of files.
#[derive(Debug, Default)]
pub struct LoadOutcome {
    /// Valid automations, in file order.
    pub automations: Vec<LoadedAutomation>,
    /// Declared deployments.
    pub deployments: Vec<DeploymentRef>,
    /// Declared webhooks (validated by the daemon).
    pub webhooks: Vec<Value>,
    /// Errors and warnings, in file order.
    pub diagnostics: Vec<Diagnostic>,
    /// Where things are in each file read, to place findings (shared with the file cache).
    sources: HashMap<PathBuf, Arc<FileSource>>,
    /// Modification times of the files read, to tell an old file from a newcomer.
    modified: HashMap<PathBuf, SystemTime>,
    /// The list path of the last origin made, for the next item of the same list to share.
    last_parent: Option<Arc<FieldPath>>,
}

/// The positions of one file's nodes. Only shallow ones are recorded as the file loads (an
/// automation's own line); the first finding deeper inside it parses the text again for a
/// complete map, which a file without problems never pays for.
#[derive(Debug, Default)]
struct FileSource {
    /// Where the text to build the complete maps from is.
    text: TextSource,
    /// Per document, nodes at most [`SHALLOW_DEPTH`] segments deep.
    shallow: Vec<SourceMap>,
    /// Per document, every node; built on first need.
    complete: std::sync::OnceLock<Vec<SourceMap>>,
}

/// Path segments recorded while loading: enough for an automation in a list or under
/// `automations:` (`automations[3]`); a deployment trigger (`deployments[0].triggers[1]`) and
/// anything inside an automation use the complete map.
const SHALLOW_DEPTH: usize = 2;

/// The text a [`FileSource`] was parsed from, for the complete maps it may need later.
#[derive(Debug, Default)]
enum TextSource {
    /// Text that exists only in memory (a scenario's automations, a test's string).
    InMemory(Arc<str>),
    /// A file on disk, as it was when read. Not kept in memory: the file cache holds every
    /// file's outcome for the daemon's whole life, and the text of 100 000 automations is
    /// 21 MB that almost never serves. A later finding reads the file again, and uses it
    /// only if its size and modification time are still the ones parsed; otherwise the
    /// finding gets the nearest place the shallow map knows (the automation's own line),
    /// and the next reload, which sees the change, places everything afresh.
    OnDisk {
        path: PathBuf,
        stamp: (u64, SystemTime),
    },
    /// No text (the complete map is empty).
    #[default]
    Gone,
}

impl TextSource {
    /// The text as parsed, if it can still be had.
    fn text(&self) -> Option<std::borrow::Cow<'_, str>> {
        match self {
            TextSource::InMemory(text) => Some(std::borrow::Cow::Borrowed(text)),
            TextSource::OnDisk { path, stamp } => {
                let meta = std::fs::metadata(path).ok()?;
                if (meta.len(), meta.modified().ok()?) != *stamp {
                    return None;
                }
                let text = std::fs::read_to_string(path).ok()?;
                if (text.len() as u64) != stamp.0 {
                    return None;
                }
                Some(std::borrow::Cow::Owned(
                    parsed_text(path, &text).into_owned(),
                ))
            }
            TextSource::Gone => None,
        }
    }
}

impl FileSource {
    fn locate(&self, document: usize, path: &FieldPath) -> (usize, usize) {
        let shallow = self.shallow.get(document);
        if let Some(map) = shallow.filter(|m| m.covers(path)) {
            return map.locate(path);
        }
        let complete = self.complete.get_or_init(|| {
            self.text
                .text()
                .and_then(|text| parse_documents(&text).ok())
                .map(|docs| docs.into_iter().map(|(_, map)| map).collect())
                .unwrap_or_default()
        });
        match complete.get(document) {
            Some(map) => map.locate(path),
            // The text is gone or changed: the nearest shallow ancestor's place.
            None => shallow.map_or((1, 1), |m| m.locate(path)),
        }
    }
}

/// The text the parser reads for `file`: JSON's escaped surrogate pairs are joined first.
fn parsed_text<'a>(file: &Path, text: &'a str) -> std::borrow::Cow<'a, str> {
    let is_json = file
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    if is_json {
        yaml::join_json_surrogate_pairs(text)
    } else {
        std::borrow::Cow::Borrowed(text)
    }
}

impl LoadOutcome {
    /// Adds one file's outcome to this one (the automations are shared, not copied).
    fn absorb(&mut self, part: &LoadOutcome) {
        self.automations.extend(part.automations.iter().cloned());
        self.deployments.extend(part.deployments.iter().cloned());
        self.webhooks.extend(part.webhooks.iter().cloned());
        self.diagnostics.extend(part.diagnostics.iter().cloned());
        self.sources.extend(
            part.sources
                .iter()
                .map(|(file, source)| (file.clone(), source.clone())),
        );
        self.modified
            .extend(part.modified.iter().map(|(file, at)| (file.clone(), *at)));
    }

    /// The position of `path` in `document` of `file`, or (1, 1) when unknown.
    fn locate(&self, file: &Path, document: usize, path: &FieldPath) -> (usize, usize) {
        self.sources
            .get(file)
            .map_or((1, 1), |source| source.locate(document, path))
    }
}

/// The automations already running and the file each comes from. On a name clash the file
/// that already provides the name keeps it; the other file (the newcomer) is refused.
///
/// Borrowed from what runs, and indexed only when a clash asks: a reload beside 100 000
/// running automations with unique names never builds the index.
#[derive(Debug, Default)]
pub struct Incumbents<'a> {
    running: &'a [LoadedAutomation],
    by_name: std::sync::OnceLock<HashMap<&'a str, &'a Path>>,
}

impl<'a> Incumbents<'a> {
    /// The names and files of what is loaded now.
    pub fn of(running: &'a [LoadedAutomation]) -> Incumbents<'a> {
        Incumbents {
            running,
            by_name: std::sync::OnceLock::new(),
        }
    }

    /// The file that provides the running automation `name`, if one runs.
    pub fn file_of(&self, name: &str) -> Option<&Path> {
        let by_name = self.by_name.get_or_init(|| {
            self.running
                .iter()
                .map(|a| (a.automation.name.as_str(), &*a.origin.file))
                .collect()
        });
        by_name.get(name).copied()
    }
}

/// One automation file found under the loaded path, or why it cannot be used.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FoundFile {
    /// The path as found (a symbolic link keeps its own name).
    pub path: PathBuf,
    /// Size and modification time of what it points at, when it can be read.
    pub stamp: Option<(u64, Option<SystemTime>)>,
    /// Why it cannot be read (a dangling link, a link loop, …), naming what went wrong.
    pub problem: Option<String>,
}

/// Every `.yaml`/`.yml`/`.json` file under `path` (or `path` itself if it is a file), sorted,
/// skipping names that start with `.`. Symbolic links are followed; a link whose target is
/// missing or that loops comes back with its `problem` instead of vanishing, and a directory
/// reached twice (a link to a parent) is walked once. The daemon's folder watcher and the
/// loader share this walk, so what is watched is exactly what is loaded.
///
/// The error is for `path` itself (missing, unreadable).
pub fn automation_files(path: &Path) -> Result<Vec<FoundFile>, String> {
    let meta = std::fs::metadata(path).map_err(|e| format!("cannot open: {e}"))?;
    if !meta.is_dir() {
        return Ok(vec![FoundFile {
            path: path.to_owned(),
            stamp: Some((meta.len(), meta.modified().ok())),
            problem: None,
        }]);
    }
    let mut files = Vec::new();
    let mut visited: HashSet<PathBuf> = HashSet::new();
    let mut stack = vec![path.to_owned()];
    while let Some(dir) = stack.pop() {
        // A directory linked into itself (or reached by two links) is listed once.
        if let Ok(real) = std::fs::canonicalize(&dir)
            && !visited.insert(real)
        {
            continue;
        }
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if dir == path => return Err(format!("cannot list: {e}")),
            Err(_) => continue,
        };
        for entry in entries.flatten() {
            let p = entry.path();
            if entry.file_name().to_string_lossy().starts_with('.') {
                continue;
            }
            let wanted = matches!(
                p.extension().and_then(|e| e.to_str()),
                Some("yaml" | "yml" | "json")
            );
            match std::fs::metadata(&p) {
                Ok(meta) if meta.is_dir() => stack.push(p),
                Ok(meta) if wanted => files.push(FoundFile {
                    path: p,
                    stamp: Some((meta.len(), meta.modified().ok())),
                    problem: None,
                }),
                Ok(_) => {}
                Err(e) if wanted => {
                    let problem = unreadable_reason(&p, &e);
                    files.push(FoundFile {
                        path: p,
                        stamp: None,
                        problem: Some(problem),
                    });
                }
                Err(_) => {}
            }
        }
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Why `path` cannot be opened, in words: a symbolic link says where it points.
fn unreadable_reason(path: &Path, error: &std::io::Error) -> String {
    let is_link = std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink());
    if !is_link {
        return format!("cannot read: {error}");
    }
    let target = std::fs::read_link(path)
        .map(|t| t.display().to_string())
        .unwrap_or_else(|_| "?".to_owned());
    if error.kind() == std::io::ErrorKind::NotFound {
        format!("is a symbolic link to {target}, which does not exist")
    } else if error.raw_os_error() == Some(40) {
        // ELOOP (Linux): the chain of links never reaches a file.
        format!("is a symbolic link to {target} that loops back on itself ({error})")
    } else {
        format!("is a symbolic link to {target}, which cannot be read ({error})")
    }
}

impl LoadOutcome {
    /// True if any diagnostic is an error.
    pub fn has_errors(&self) -> bool {
        self.diagnostics
            .iter()
            .any(|d| d.severity == Severity::Error)
    }

    /// The line an automation starts on in its file.
    pub fn line_of(&self, origin: &Origin) -> usize {
        origin.line as usize
    }

    /// The origin of the thing at `base` in `document` of `file` (already read). Items of
    /// the list the previous origin was in share its path.
    fn origin(&mut self, file: &Arc<Path>, document: usize, base: FieldPath) -> Origin {
        let line = self.locate(file, document, &base).0;
        let mut parent = base;
        let index = match parent.0.last() {
            Some(PathSegment::Index(i)) => u32::try_from(*i).ok(),
            _ => None,
        };
        if index.is_some() {
            parent.0.pop();
        }
        let parent = match &self.last_parent {
            Some(shared) if **shared == parent => shared.clone(),
            _ => {
                let shared = Arc::new(parent);
                self.last_parent = Some(shared.clone());
                shared
            }
        };
        Origin {
            file: file.clone(),
            parent,
            index,
            document,
            line: u32::try_from(line).unwrap_or(u32::MAX),
        }
    }

    /// Turns a problem found later (relative to an automation) into a diagnostic.
    pub fn diagnose(&self, origin: &Origin, problem: Problem) -> Diagnostic {
        let path = origin.base().join(&problem.path);
        let (line, column) = self.locate(&origin.file, origin.document, &path);
        Diagnostic {
            file: origin.file.to_path_buf(),
            line,
            column,
            field: problem.path.to_string(),
            reason: problem.reason,
            severity: problem.severity,
        }
    }
}

/// The stable id of a deployment that declares none: UUIDv5 of its name in Spur's namespace.
pub fn deployment_id_for_name(name: &str) -> Uuid {
    Uuid::new_v5(
        &crate::SPUR_NAMESPACE,
        format!("deployment:{name}").as_bytes(),
    )
}

/// Loads a file, or every `.yaml`/`.yml`/`.json` file under a folder (recursively, sorted).
pub fn load_path(path: &Path) -> LoadOutcome {
    load_path_with(path, &Incumbents::default())
}

/// [`load_path`] for a reload: on a name clash, the file in `incumbents` that already
/// provides the name keeps it and the other file is refused.
pub fn load_path_with(path: &Path, incumbents: &Incumbents) -> LoadOutcome {
    load_path_cached(path, incumbents, &mut FileCache::default(), |_| {})
}

/// What each file contributed when it was last read, by path, with the size and modification
/// time it had then. [`load_path_cached`] re-reads only the files whose stamp changed, so a
/// reload beside 100 000 unchanged automations costs what the changed file costs.
#[derive(Debug, Default)]
pub struct FileCache {
    files: HashMap<PathBuf, ((u64, SystemTime), LoadOutcome)>,
}

/// [`load_path_with`], reading only files that changed since `cache` saw them. `prepare` runs
/// on each file's own outcome right after it is read (the daemon checks templates there), and
/// its result is remembered with the file. The checks across files (unique names, deployment
/// references) run on the whole set every time.
pub fn load_path_cached(
    path: &Path,
    incumbents: &Incumbents,
    cache: &mut FileCache,
    prepare: impl Fn(&mut LoadOutcome),
) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let files = match automation_files(path) {
        Ok(files) => files,
        Err(reason) => {
            outcome.diagnostics.push(Diagnostic {
                file: path.to_owned(),
                line: 1,
                column: 1,
                field: "(file)".to_owned(),
                reason,
                severity: Severity::Error,
            });
            return outcome;
        }
    };
    let mut previous = std::mem::take(&mut cache.files);
    for found in files {
        // Only a file with a known modification time can be recognised as unchanged.
        let stamp = match (found.stamp, &found.problem) {
            (Some((len, Some(modified))), None) => Some((len, modified)),
            _ => None,
        };
        let part = match (stamp, previous.remove(&found.path)) {
            (Some(stamp), Some((seen, part))) if seen == stamp => part,
            _ => {
                let mut part = load_file(found.path.clone(), found.stamp, found.problem);
                prepare(&mut part);
                part
            }
        };
        outcome.absorb(&part);
        if let Some(stamp) = stamp {
            cache.files.insert(found.path, (stamp, part));
        }
    }
    check_unique_names(&mut outcome, incumbents);
    check_deployment_references(&mut outcome);
    outcome
}

/// Reads and loads one file on its own.
fn load_file(
    file: PathBuf,
    stamp: Option<(u64, Option<SystemTime>)>,
    problem: Option<String>,
) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    let text = match problem {
        Some(problem) => Err(problem),
        None => std::fs::read_to_string(&file).map_err(|e| unreadable_reason(&file, &e)),
    };
    match text {
        Ok(text) => {
            let on_disk = match stamp {
                Some((len, Some(modified))) => {
                    outcome.modified.insert(file.clone(), modified);
                    Some((len, modified))
                }
                _ => None,
            };
            load_source(&mut outcome, &file, &text, on_disk);
        }
        Err(reason) => outcome.diagnostics.push(Diagnostic {
            file,
            line: 1,
            column: 1,
            field: "(file)".to_owned(),
            reason,
            severity: Severity::Error,
        }),
    }
    outcome
}

/// A `run-deployment`/`pause-deployment`/`resume-deployment` action may name a deployment
/// (`deployment: NAME`, Spur's alternative to `deployment_id`); the name must be declared in
/// the loaded files. Ids are not checked: they may refer to a real Prefect server's deployments.
fn check_deployment_references(outcome: &mut LoadOutcome) {
    let declared: Vec<&str> = outcome
        .deployments
        .iter()
        .map(|d| d.name.as_str())
        .collect();
    let mut failures: Vec<(usize, Problem)> = Vec::new();
    for (i, loaded) in outcome.automations.iter().enumerate() {
        let a = &loaded.automation;
        let lists = [
            ("actions", &a.actions),
            ("actions_on_trigger", &a.actions_on_trigger),
            ("actions_on_resolve", &a.actions_on_resolve),
        ];
        for (key, actions) in lists {
            for (n, action) in actions.iter().enumerate() {
                if let Some(name) = action.field("deployment").and_then(Value::as_str)
                    && !declared.contains(&name)
                {
                    let mut p = Problems::new();
                    let known = if declared.is_empty() {
                        "none are declared".to_owned()
                    } else {
                        format!("declared: {}", declared.join(", "))
                    };
                    p.error(
                        &FieldPath::root().key(key).index(n).key("deployment"),
                        format!("unknown deployment {name:?} ({known})"),
                    );
                    failures.extend(p.into_vec().into_iter().map(|p| (i, p)));
                }
            }
        }
    }
    let mut remove: Vec<usize> = failures.iter().map(|(i, _)| *i).collect();
    for (i, problem) in failures {
        let d = outcome.diagnose(&outcome.automations[i].origin, problem);
        outcome.diagnostics.push(d);
    }
    remove.sort_unstable();
    remove.dedup();
    for i in remove.into_iter().rev() {
        outcome.automations.remove(i);
    }
}

/// Loads automations from in-memory text (used for scenario files and tests).
pub fn load_str(file: &Path, text: &str) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    load_source(&mut outcome, file, text, None);
    check_unique_names(&mut outcome, &Incumbents::default());
    outcome
}

/// Loads automations from an already-parsed JSON value (e.g. a scenario's `automations`).
/// `base` is where the value sits in its document, for diagnostics.
pub fn load_value(file: &Path, text: Option<&str>, value: &Value, base: &FieldPath) -> LoadOutcome {
    let mut outcome = LoadOutcome::default();
    // No shallow map: the first finding parses `text` for the complete one.
    outcome.sources.insert(
        file.to_owned(),
        Arc::new(FileSource {
            text: text.map_or(TextSource::Gone, |t| TextSource::InMemory(Arc::from(t))),
            ..FileSource::default()
        }),
    );
    load_document(&mut outcome, &Arc::from(file), 0, value, base);
    check_unique_names(&mut outcome, &Incumbents::default());
    outcome
}

/// Parses `text` (of `file`) and loads its documents. `on_disk`: the file's size and
/// modification time when it was read, so the text need not be kept (see [`TextSource`]).
fn load_source(
    outcome: &mut LoadOutcome,
    file: &Path,
    text: &str,
    on_disk: Option<(u64, SystemTime)>,
) {
    let read_len = text.len() as u64;
    let text = parsed_text(file, text);
    let documents = match parse_documents_shallow(&text, SHALLOW_DEPTH) {
        Ok(docs) => docs,
        Err((line, column, reason)) => {
            outcome.diagnostics.push(Diagnostic {
                file: file.to_owned(),
                line,
                column,
                field: "(syntax)".to_owned(),
                reason,
                severity: Severity::Error,
            });
            return;
        }
    };
    let (values, shallow): (Vec<Value>, Vec<SourceMap>) = documents.into_iter().unzip();
    let shared_file: Arc<Path> = Arc::from(file);
    outcome.sources.insert(
        file.to_owned(),
        Arc::new(FileSource {
            text: match on_disk {
                // Read whole (the size read is the size stamped): it can be read again.
                Some(stamp) if stamp.0 == read_len => TextSource::OnDisk {
                    path: file.to_owned(),
                    stamp,
                },
                _ => TextSource::InMemory(Arc::from(text)),
            },
            shallow,
            complete: std::sync::OnceLock::new(),
        }),
    );
    for (index, value) in values.iter().enumerate() {
        load_document(outcome, &shared_file, index, value, &FieldPath::root());
    }
}

/// Dispatches on the document's shape.
fn load_document(
    outcome: &mut LoadOutcome,
    file: &Arc<Path>,
    document: usize,
    value: &Value,
    base: &FieldPath,
) {
    let push = |outcome: &mut LoadOutcome, path: FieldPath, reason: String| {
        let (line, column) = outcome.locate(file, document, &path);
        outcome.diagnostics.push(Diagnostic {
            file: file.to_path_buf(),
            line,
            column,
            field: path.to_string(),
            reason,
            severity: Severity::Error,
        });
    };
    match value {
        Value::Null => {} // an empty file or document holds nothing
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                load_automation(
                    outcome,
                    file,
                    document,
                    item,
                    &base.index(i),
                    Dialect::Server,
                );
            }
        }
        Value::Object(map) if map.contains_key("trigger") => {
            load_automation(outcome, file, document, value, base, Dialect::Server);
        }
        Value::Object(map)
            if map.contains_key("automations")
                || map.contains_key("deployments")
                || map.contains_key("webhooks") =>
        {
            match map.get("webhooks") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => outcome.webhooks.extend(items.iter().cloned()),
                Some(_) => push(
                    outcome,
                    base.key("webhooks"),
                    "must be a list of webhooks".to_owned(),
                ),
            }
            match map.get("automations") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        let path = base.key("automations").index(i);
                        load_automation(outcome, file, document, item, &path, Dialect::Server);
                    }
                }
                Some(_) => push(
                    outcome,
                    base.key("automations"),
                    "must be a list of automations".to_owned(),
                ),
            }
            match map.get("deployments") {
                None | Some(Value::Null) => {}
                Some(Value::Array(items)) => {
                    for (i, item) in items.iter().enumerate() {
                        load_deployment(
                            outcome,
                            file,
                            document,
                            item,
                            &base.key("deployments").index(i),
                        );
                    }
                }
                Some(_) => push(
                    outcome,
                    base.key("deployments"),
                    "must be a list of deployments".to_owned(),
                ),
            }
        }
        Value::Object(_) => push(
            outcome,
            base.clone(),
            "expected an automation (a mapping with `trigger`), a list of automations, \
             `automations: [...]`, `deployments: [...]` or `webhooks: [...]`"
                .to_owned(),
        ),
        _ => push(
            outcome,
            base.clone(),
            "expected a mapping or a list of automations".to_owned(),
        ),
    }
}

fn load_automation(
    outcome: &mut LoadOutcome,
    file: &Arc<Path>,
    document: usize,
    value: &Value,
    base: &FieldPath,
    dialect: Dialect,
) {
    let mut problems = Problems::new();
    let automation = Automation::parse(value, dialect, &mut problems);
    let origin = outcome.origin(file, document, base.clone());
    for problem in problems.into_vec() {
        let diagnostic = outcome.diagnose(&origin, problem);
        outcome.diagnostics.push(diagnostic);
    }
    if let Some(automation) = automation {
        outcome.automations.push(LoadedAutomation {
            automation: Arc::new(automation),
            origin,
        });
    }
}

/// A `prefect.yaml` deployment: record it, and turn each of its `triggers` into an automation.
fn load_deployment(
    outcome: &mut LoadOutcome,
    file: &Arc<Path>,
    document: usize,
    value: &Value,
    base: &FieldPath,
) {
    let origin = outcome.origin(file, document, base.clone());
    let mut problems = Problems::new();
    let root = FieldPath::root();
    let Value::Object(map) = value else {
        problems.error(&root, "a deployment must be a mapping");
        for p in problems.into_vec() {
            let d = outcome.diagnose(&origin, p);
            outcome.diagnostics.push(d);
        }
        return;
    };
    let name = match map.get("name") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => {
            problems.error(&root.key("name"), "is required (a non-empty string)");
            String::new()
        }
    };
    let id = match map.get("id") {
        None | Some(Value::Null) => deployment_id_for_name(&name),
        Some(Value::String(s)) => Uuid::parse_str(s).unwrap_or_else(|e| {
            problems.error(&root.key("id"), format!("is not a valid UUID ({e})"));
            Uuid::nil()
        }),
        Some(other) => {
            problems.error(
                &root.key("id"),
                format!("must be a UUID string, got {other}"),
            );
            Uuid::nil()
        }
    };
    let triggers = match map.get("triggers") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.clone(),
        Some(_) => {
            problems.error(&root.key("triggers"), "must be a list of triggers");
            Vec::new()
        }
    };
    let failed = problems.has_errors();
    for p in problems.into_vec() {
        let d = outcome.diagnose(&origin, p);
        outcome.diagnostics.push(d);
    }
    if failed {
        return;
    }
    outcome.deployments.push(DeploymentRef {
        name: name.clone(),
        id,
        spec: value.clone(),
    });
    for (i, trigger) in triggers.iter().enumerate() {
        let path = base.key("triggers").index(i);
        let Some(automation) = deployment_trigger_as_automation(&name, id, i, trigger) else {
            let origin = outcome.origin(file, document, path);
            let mut p = Problems::new();
            p.error(&FieldPath::root(), "a deployment trigger must be a mapping");
            for p in p.into_vec() {
                let d = outcome.diagnose(&origin, p);
                outcome.diagnostics.push(d);
            }
            continue;
        };
        // Problems are located relative to the trigger entry: map the synthesized automation's
        // `trigger.x` and `actions[0].parameters` back to the entry's own keys.
        let mut problems = Problems::new();
        let parsed = Automation::parse(&automation, Dialect::Client, &mut problems);
        let entry_origin = outcome.origin(file, document, path.clone());
        for mut problem in problems.into_vec() {
            problem.path = remap_deployment_trigger_path(&problem.path);
            let d = outcome.diagnose(&entry_origin, problem);
            outcome.diagnostics.push(d);
        }
        if let Some(automation) = parsed {
            outcome.automations.push(LoadedAutomation {
                automation: Arc::new(automation),
                origin: entry_origin,
            });
        }
    }
}

/// Prefect's `DeploymentTrigger.as_automation`: the trigger's own fields plus one
/// `run-deployment` action on this deployment.
fn deployment_trigger_as_automation(
    deployment: &str,
    deployment_id: Uuid,
    index: usize,
    trigger: &Value,
) -> Option<Value> {
    let Value::Object(map) = trigger else {
        return None;
    };
    let mut trigger_fields = Map::new();
    let mut automation = Map::new();
    let mut action = Map::new();
    action.insert("type".into(), "run-deployment".into());
    action.insert("source".into(), "selected".into());
    action.insert("deployment_id".into(), deployment_id.to_string().into());
    for (key, value) in map {
        match key.as_str() {
            "name" | "description" | "enabled" => {
                automation.insert(key.clone(), value.clone());
            }
            "parameters" | "job_variables" | "schedule_after" => {
                action.insert(key.clone(), value.clone());
            }
            _ => {
                trigger_fields.insert(key.clone(), value.clone());
            }
        }
    }
    automation
        .entry("name")
        .or_insert_with(|| format!("{deployment}__automation_{}", index + 1).into());
    automation.insert("trigger".into(), Value::Object(trigger_fields));
    automation.insert("actions".into(), Value::Array(vec![Value::Object(action)]));
    automation.insert(
        "owner_resource".into(),
        format!("prefect.deployment.{deployment_id}").into(),
    );
    Some(Value::Object(automation))
}

/// Maps a path in the synthesized automation back to the deployment trigger entry.
fn remap_deployment_trigger_path(path: &FieldPath) -> FieldPath {
    use crate::problem::PathSegment::{Index, Key};
    match path.0.as_slice() {
        [Key(k), rest @ ..] if k == "trigger" => FieldPath(rest.to_vec()),
        [Key(k), Index(0), rest @ ..] if k == "actions" => FieldPath(rest.to_vec()),
        _ => path.clone(),
    }
}

/// Automation names are unique. For each name defined more than once, one definition is kept
/// and every other one is refused with an error at its own `file:line`:
///
/// 1. the one from the file that provides the running automation of that name
///    (`incumbents`), so a new file never displaces what runs;
/// 2. else the one from the file modified longest ago (the newer file is the newcomer, so a
///    restart keeps what ran before it);
/// 3. else the first in file order.
fn check_unique_names(outcome: &mut LoadOutcome, incumbents: &Incumbents) {
    // Each name's first definition; only names defined again get a list of their places.
    let mut first: HashMap<&str, usize> = HashMap::with_capacity(outcome.automations.len());
    let mut clashes: HashMap<&str, Vec<usize>> = HashMap::new();
    for (i, loaded) in outcome.automations.iter().enumerate() {
        let name = loaded.automation.name.as_str();
        match first.entry(name) {
            std::collections::hash_map::Entry::Occupied(seen) => clashes
                .entry(name)
                .or_insert_with(|| vec![*seen.get()])
                .push(i),
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(i);
            }
        }
    }
    let mut refused: Vec<(usize, String)> = Vec::new();
    for (name, indexes) in clashes {
        let file = |i: usize| &outcome.automations[i].origin.file;
        let running = incumbents.file_of(name);
        let keep = indexes
            .iter()
            .copied()
            .find(|&i| Some(&**file(i)) == running)
            .or_else(|| {
                // Oldest file first; without a time (in-memory text), order decides.
                indexes.iter().copied().min_by_key(|&i| {
                    (
                        outcome
                            .modified
                            .get(&**file(i))
                            .copied()
                            .unwrap_or(SystemTime::UNIX_EPOCH),
                        i,
                    )
                })
            })
            .unwrap_or(indexes[0]);
        let kept = &outcome.automations[keep].origin;
        let what = if running == Some(&*kept.file) {
            "already running from"
        } else {
            "first defined at"
        };
        let at = format!("{}:{}", kept.file.display(), kept.line);
        for &i in indexes.iter().filter(|&&i| i != keep) {
            refused.push((
                i,
                format!("duplicate automation name {name:?} ({what} {at})"),
            ));
        }
    }
    refused.sort_unstable_by_key(|(i, _)| *i);
    for (i, reason) in refused.into_iter().rev() {
        let loaded = outcome.automations.remove(i);
        let mut problem = Problems::new();
        problem.error(&FieldPath::root().key("name"), reason);
        for p in problem.into_vec() {
            let d = outcome.diagnose(&loaded.origin, p);
            outcome.diagnostics.push(d);
        }
    }
}

/// Parses a single-document YAML (or JSON) text into JSON, YAML 1.2 rules (`no` stays a
/// string). The error is `(line, column, reason)`. Used for Spur's own config file.
pub fn parse_yaml(text: &str) -> Result<Value, (usize, usize, String)> {
    let mut docs = parse_documents(text)?;
    Ok(if docs.is_empty() {
        Value::Null
    } else {
        docs.swap_remove(0).0
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The file cache keeps no file text: a finding deep inside an unchanged file on a later
    /// load (here: the deployment it names was removed from another file) reads the file
    /// again for its place, and falls back to the automation's own line if the file changed.
    #[test]
    fn a_later_finding_in_an_unchanged_file_is_placed_from_the_file_on_disk() {
        let dir = tempfile::tempdir().expect("temp dir");
        let uses = dir.path().join("uses.yaml");
        let declares = dir.path().join("declares.yaml");
        std::fs::write(
            &uses,
            "automations:\n  - name: a\n    trigger: {posture: Reactive, expect: [x]}\n    actions:\n      - type: run-deployment\n        deployment: etl\n",
        )
        .expect("write");
        std::fs::write(&declares, "deployments:\n  - name: etl\n").expect("write");
        let mut cache = FileCache::default();
        let first = load_path_cached(dir.path(), &Incumbents::default(), &mut cache, |_| {});
        assert!(!first.has_errors(), "{:?}", first.diagnostics);
        std::fs::write(&declares, "deployments: []\n").expect("write");
        let second = load_path_cached(dir.path(), &Incumbents::default(), &mut cache, |_| {});
        let d = second
            .diagnostics
            .iter()
            .find(|d| d.file == uses)
            .expect("the reference is refused");
        assert_eq!((d.line, d.column), (6, 9), "{d}");
        assert_eq!(d.field, "actions[0].deployment");
        // The same finding once the file changed on disk since it was read: the cached
        // outcome cannot be placed from the new text, so it gets the automation's line.
        let source = &second.sources[&uses];
        std::fs::write(&uses, "# a comment that shifts every line\n").expect("write");
        let fresh = FileSource {
            text: TextSource::OnDisk {
                path: uses.clone(),
                stamp: match &source.text {
                    TextSource::OnDisk { stamp, .. } => *stamp,
                    other => panic!("kept in memory: {other:?}"),
                },
            },
            shallow: source.shallow.clone(),
            complete: std::sync::OnceLock::new(),
        };
        let path = FieldPath::root().key("automations").index(0).key("actions");
        assert_eq!(fresh.locate(0, &path), (2, 5));
    }

    #[test]
    fn yaml_errors_point_at_the_field() {
        let text = "name: a\ntrigger:\n  type: event\n  posture: Reactive\n  expect: [x]\n  within: -5\nactions: []\n";
        let outcome = load_str(Path::new("a.yaml"), text);
        assert!(outcome.automations.is_empty());
        let d = &outcome.diagnostics[0];
        assert_eq!((d.line, d.column), (6, 3), "{d}");
        assert_eq!(d.field, "trigger.within");
    }

    #[test]
    fn a_json_file_may_write_emoji_as_surrogate_pairs_as_python_does() {
        let text = r#"{"name": "alert \ud83d\ude80", "trigger": {"type": "event", "posture": "Reactive", "expect": ["x"]}, "actions": [{"type": "do-nothing"}]}"#;
        let outcome = load_str(Path::new("a.json"), text);
        assert!(!outcome.has_errors(), "{:?}", outcome.diagnostics);
        assert_eq!(outcome.automations[0].automation.name, "alert \u{1F680}");
    }

    #[test]
    fn syntax_errors_have_positions() {
        let outcome = load_str(Path::new("b.yaml"), "name: [unclosed\n");
        assert!(outcome.has_errors());
        assert_eq!(outcome.diagnostics[0].field, "(syntax)");
    }

    #[test]
    fn deployment_triggers_become_automations() {
        let text = r#"
deployments:
  - name: downstream
    entrypoint: flows.py:downstream
    triggers:
      - expect: ["prefect.flow-run.Completed"]
        match_related:
          prefect.resource.id: prefect.flow.abc
        parameters:
          prev_result: "<< event.payload.result >>"
"#;
        let outcome = load_str(Path::new("prefect.yaml"), text);
        assert!(!outcome.has_errors(), "{:?}", outcome.diagnostics);
        let a = &outcome.automations[0].automation;
        assert_eq!(a.name, "downstream__automation_1");
        assert_eq!(a.actions[0].action_type, "run-deployment");
        assert_eq!(
            a.actions[0].field("deployment_id").and_then(Value::as_str),
            Some(deployment_id_for_name("downstream").to_string().as_str())
        );
        assert_eq!(outcome.deployments[0].name, "downstream");
    }

    #[test]
    fn yaml_booleans_are_strict() {
        let text = "name: a\nenabled: no\ntrigger: {posture: Reactive, expect: [x]}\nactions: []\n";
        let outcome = load_str(Path::new("c.yaml"), text);
        let d = &outcome.diagnostics[0];
        assert_eq!(d.field, "enabled");
        assert_eq!(d.line, 2);
    }

    /// `levels` block mappings nested inside each other under `trigger`.
    fn nested_mappings(levels: usize) -> String {
        let mut text = String::from("name: deep\ntrigger:\n");
        for i in 0..levels {
            text.push_str(&" ".repeat(2 * (i + 1)));
            text.push_str(&format!("k{i}:\n"));
        }
        text
    }

    /// Runs `f` on a thread with a small stack: loading must not need more.
    fn on_small_stack<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
        std::thread::Builder::new()
            .stack_size(512 * 1024)
            .spawn(f)
            .expect("spawn")
            .join()
            .expect("loading overflowed or panicked")
    }

    #[test]
    fn deep_nesting_is_refused_at_the_line_that_crosses_the_limit() {
        let outcome = on_small_stack(|| load_str(Path::new("deep.yaml"), &nested_mappings(2000)));
        assert!(outcome.automations.is_empty());
        let d = &outcome.diagnostics[0];
        assert_eq!(d.field, "(syntax)");
        assert!(d.reason.contains("nested too deeply"), "{d}");
        // Level 1 is the document, level 2 `trigger`'s value (line 3): level 129 is line 130.
        assert_eq!((d.line, d.column), (130, 257), "{d}");
        assert!(d.to_string().starts_with("deep.yaml:130:257: "), "{d}");
    }

    #[test]
    fn compact_and_flow_nesting_is_bounded_too() {
        let dashes = "- ".repeat(100_000) + "x\n";
        let brackets = "[".repeat(100_000);
        let mixed = "a: ".repeat(50_000) + "b\n";
        for text in [dashes, brackets, mixed] {
            let outcome = on_small_stack(move || load_str(Path::new("c.yaml"), &text));
            assert!(outcome.has_errors());
            assert_eq!(outcome.diagnostics[0].line, 1);
        }
    }

    #[test]
    fn nesting_up_to_the_limit_loads() {
        // The document is level 1, `actions` 2, the action 3, `parameters` 4, then 124 more.
        let mut deep = String::from("1");
        for _ in 0..(MAX_NESTING_DEPTH - 4) {
            deep = format!("[{deep}]");
        }
        let text = format!(
            "name: a\ntrigger: {{posture: Reactive, expect: [x]}}\nactions:\n  - type: do-nothing\n    parameters: {{v: {deep}}}\n"
        );
        let outcome = on_small_stack(move || load_str(Path::new("ok.yaml"), &text));
        assert!(!outcome.has_errors(), "{:?}", outcome.diagnostics);
        let text = format!(
            "name: a\ntrigger: {{posture: Reactive, expect: [x]}}\nactions:\n  - type: do-nothing\n    parameters: {{v: [{deep}]}}\n"
        );
        let outcome = on_small_stack(move || load_str(Path::new("no.yaml"), &text));
        assert!(outcome.diagnostics[0].reason.contains("nested too deeply"));
    }

    #[test]
    fn a_dangling_link_and_a_link_loop_each_get_an_error_naming_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = "name: ok\ntrigger: {posture: Reactive, expect: [x]}\nactions: []\n";
        std::fs::write(dir.path().join("ok.yaml"), ok).expect("write");
        std::os::unix::fs::symlink("missing.yaml", dir.path().join("dangling.yaml")).expect("link");
        std::os::unix::fs::symlink("b.yaml", dir.path().join("a.yaml")).expect("link");
        std::os::unix::fs::symlink("a.yaml", dir.path().join("b.yaml")).expect("link");
        // A directory linked into itself is walked once (no repeated files, no endless walk).
        std::os::unix::fs::symlink(".", dir.path().join("again")).expect("link");
        let outcome = load_path(dir.path());
        assert_eq!(outcome.automations.len(), 1, "{:?}", outcome.diagnostics);
        let errors: Vec<String> = outcome.diagnostics.iter().map(|d| d.to_string()).collect();
        assert_eq!(errors.len(), 3, "{errors:?}");
        for (file, says) in [
            ("a.yaml", "loops back on itself"),
            ("b.yaml", "loops back on itself"),
            ("dangling.yaml", "missing.yaml, which does not exist"),
        ] {
            let path = dir.path().join(file);
            assert!(
                errors.iter().any(
                    |e| e.starts_with(&format!("{}:1:1: (file): ", path.display()))
                        && e.contains(says)
                ),
                "{file}: {errors:?}"
            );
        }
        let found = automation_files(dir.path()).expect("walk");
        assert_eq!(found.len(), 4, "{found:?}");
    }

    fn write_with_age(path: &Path, text: &str, age_secs: u64) {
        std::fs::write(path, text).expect("write");
        let when = SystemTime::now() - std::time::Duration::from_secs(age_secs);
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(when))
            .expect("set mtime");
    }

    #[test]
    fn on_a_name_clash_the_newcomer_is_refused_whatever_the_sort_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ok = dir.path().join("ok.yaml");
        let dup = dir.path().join("dup.yaml"); // sorts first
        let tick = |expect: &str| {
            format!(
                "name: ok-tick\ntrigger: {{posture: Reactive, expect: [{expect}]}}\nactions: []\n"
            )
        };
        write_with_age(&ok, &tick("a"), 3600);
        write_with_age(&dup, &format!("# a newcomer\n{}", tick("b")), 0);

        // Nothing running (start, `spur check`): the older file keeps the name.
        let outcome = load_path(dir.path());
        assert_eq!(outcome.automations.len(), 1);
        assert_eq!(outcome.automations[0].origin.file.as_ref(), ok.as_path());
        let d = &outcome.diagnostics[0];
        assert_eq!((d.file.as_path(), d.line), (dup.as_path(), 2), "{d}");
        assert!(
            d.reason
                .contains(&format!("first defined at {}:1", ok.display())),
            "{d}"
        );

        // Reload: the file running the name keeps it, even when it is the newer one.
        write_with_age(&ok, &tick("a"), 0);
        write_with_age(&dup, &format!("# a newcomer\n{}", tick("b")), 3600);
        let running = load_path(dir.path()); // what runs: ok.yaml's, by the incumbents below
        let running_ok = load_path(&ok).automations;
        let incumbents = Incumbents::of(&running_ok);
        let outcome = load_path_with(dir.path(), &incumbents);
        assert_eq!(outcome.automations.len(), 1);
        assert_eq!(outcome.automations[0].origin.file.as_ref(), ok.as_path());
        let d = &outcome.diagnostics[0];
        assert_eq!((d.file.as_path(), d.line), (dup.as_path(), 2), "{d}");
        assert!(
            d.reason
                .contains(&format!("already running from {}:1", ok.display())),
            "{d}"
        );
        // Without incumbents the older file (now dup.yaml) would have won.
        assert_eq!(running.automations[0].origin.file.as_ref(), dup.as_path());
    }

    #[test]
    fn duplicate_names_are_refused() {
        let text = "- {name: a, trigger: {posture: Reactive, expect: [x]}, actions: []}\n- {name: a, trigger: {posture: Reactive, expect: [y]}, actions: []}\n";
        let outcome = load_str(Path::new("d.yaml"), text);
        assert_eq!(outcome.automations.len(), 1);
        assert!(outcome.diagnostics[0].reason.contains("duplicate"));
        assert_eq!(outcome.diagnostics[0].line, 2);
    }
}
