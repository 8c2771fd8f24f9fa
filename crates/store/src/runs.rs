//! Runs: one record per flow run, one run per idempotency key, pages in creation order, and
//! the set of runs a restart must look at.
//!
//! A run's record (JSON, the action crate's `Run`) is written before the event that
//! announces its new state, so after a crash the record may be one state ahead of the event
//! log, never behind. `runs_unsettled` holds every run for which that may be so: a run
//! enters it with every write of its record and leaves it only when the daemon reports that
//! its final state's event is durable ([`Store::settle_run`]). At start, the daemon reads
//! [`Store::unsettled_runs`] — not every run ever made — re-emits the events a crash cut off
//! (their ids are derived, so the log keeps each once) and continues the runs that had not
//! finished.
//!
//! **Flushes.** A run's record is written without a flush of its own while the run is on
//! its way (created, Pending, Running): the daemon emits the state's event at once and waits
//! for it, and the pipeline's durable commit of that event flushes the record with it (redb
//! persists every earlier commit with a durable one). A crash in between loses both, which
//! agree. A final state's record is flushed on its own, so a finished run is never taken
//! back to Running by a crash before its event lands. This saves three fsyncs a run (they
//! were most of a run's cost in the store, and each held the single writer the pipeline
//! needs).

use redb::{ReadableDatabase, ReadableTable, TableDefinition, TableError};
use serde_json::Value;
use uuid::Uuid;

use crate::{META, RUN_KEYS, RUN_ORDER, RUNS, Store, StoreError, corrupt};

/// Runs whose record may be ahead of the event log, or that have not finished.
const UNSETTLED: TableDefinition<u128, ()> = TableDefinition::new("runs_unsettled");

/// Set in `meta` once `runs_unsettled` was built from the runs of an older store.
const UNSETTLED_BUILT: &str = "runs_unsettled_built";

/// States in which a run can change no more (Prefect's final state types).
const FINAL_STATES: [&str; 4] = ["Completed", "Failed", "Crashed", "Cancelled"];

fn is_final(run: &Value) -> bool {
    run.get("state")
        .and_then(Value::as_str)
        .is_some_and(|s| FINAL_STATES.contains(&s))
}

/// Which runs a listing returns (every field optional: all runs, newest first).
#[derive(Clone, Debug, Default)]
pub struct RunQuery {
    /// Only runs in one of these states (`Crashed`); empty: any.
    pub states: Vec<String>,
    /// Only runs of this deployment (by name).
    pub deployment: Option<String>,
    /// Only runs launched by this automation (by name).
    pub automation: Option<String>,
    /// Only runs created at or after this time (RFC 3339, compared as stored: UTC).
    pub since: Option<chrono::DateTime<chrono::Utc>>,
    /// Only runs created before this time.
    pub until: Option<chrono::DateTime<chrono::Utc>>,
    /// At most this many runs in the page.
    pub limit: usize,
    /// Continue after this cursor (from the previous page's `next`).
    pub cursor: Option<u64>,
}

impl RunQuery {
    fn matches(&self, run: &Value) -> bool {
        let text = |field: &str| run.get(field).and_then(Value::as_str);
        if !self.states.is_empty()
            && !text("state").is_some_and(|s| self.states.iter().any(|w| w.eq_ignore_ascii_case(s)))
        {
            return false;
        }
        if self
            .deployment
            .as_deref()
            .is_some_and(|d| text("deployment") != Some(d))
        {
            return false;
        }
        if self
            .automation
            .as_deref()
            .is_some_and(|a| text("automation") != Some(a))
        {
            return false;
        }
        if self.since.is_some() || self.until.is_some() {
            let Some(created) = text("created")
                .and_then(|c| chrono::DateTime::parse_from_rfc3339(c).ok())
                .map(|c| c.with_timezone(&chrono::Utc))
            else {
                return false;
            };
            if self.since.is_some_and(|s| created < s) || self.until.is_some_and(|u| created >= u) {
                return false;
            }
        }
        true
    }
}

/// One page of runs, newest first.
#[derive(Clone, Debug, Default)]
pub struct RunPage {
    /// The runs.
    pub runs: Vec<Value>,
    /// The cursor of the next page, if there may be one.
    pub next: Option<u64>,
}

/// A missing table (a store that never held a run) reads as empty.
fn absent<T>(result: Result<T, TableError>) -> Result<Option<T>, StoreError> {
    match result {
        Ok(table) => Ok(Some(table)),
        Err(TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Store {
    /// Creates a run unless one already has its idempotency key. Returns the stored run: the
    /// new one, or the existing one for that key, and whether it was created.
    pub fn create_run(
        &self,
        id: Uuid,
        key: Option<&str>,
        run: &Value,
    ) -> Result<(Value, bool), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| corrupt(format!("creating a run: {e}")))?;
        let created;
        let stored;
        {
            let mut runs = txn.open_table(RUNS)?;
            let mut keys = txn.open_table(RUN_KEYS)?;
            let mut order = txn.open_table(RUN_ORDER)?;
            let mut unsettled = txn.open_table(UNSETTLED)?;
            let existing = match key {
                Some(k) => keys.get(k)?.map(|v| v.value()),
                None => None,
            };
            if let Some(existing) = existing {
                let bytes = runs.get(existing)?.map(|v| v.value().to_vec());
                stored = match bytes {
                    Some(b) => serde_json::from_slice(&b).map_err(corrupt)?,
                    None => run.clone(),
                };
                created = false;
            } else {
                let bytes = serde_json::to_vec(run).map_err(corrupt)?;
                runs.insert(id.as_u128(), bytes.as_slice())?;
                unsettled.insert(id.as_u128(), ())?;
                if let Some(k) = key {
                    keys.insert(k, id.as_u128())?;
                }
                let next = order.last()?.map_or(1, |(k, _)| k.value() + 1);
                order.insert(next, id.as_u128())?;
                stored = run.clone();
                created = true;
            }
        }
        txn.commit()?;
        Ok((stored, created))
    }

    /// Replaces a run's record (state changes). The run stays unsettled until
    /// [`Store::settle_run`]. Flushed only for a final state (see the module docs).
    pub fn update_run(&self, id: Uuid, run: &Value) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(run).map_err(corrupt)?;
        let mut txn = self.db.begin_write()?;
        if !is_final(run) {
            txn.set_durability(redb::Durability::None)
                .map_err(|e| corrupt(format!("updating a run: {e}")))?;
        }
        {
            let mut runs = txn.open_table(RUNS)?;
            runs.insert(id.as_u128(), bytes.as_slice())?;
            txn.open_table(UNSETTLED)?.insert(id.as_u128(), ())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Records that a finished run's last event is durable: a restart need not look at it.
    /// Not flushed on its own (like dispatched marks): a settle lost to a crash only means the
    /// next start looks at the run once more and finds nothing to do.
    pub fn settle_run(&self, id: Uuid) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| corrupt(format!("settling a run: {e}")))?;
        txn.open_table(UNSETTLED)?.remove(id.as_u128())?;
        txn.commit()?;
        Ok(())
    }

    /// Every run a restart must look at: unfinished, or finished without its last event
    /// known to be durable. Oldest first. A store written before this index existed gets it
    /// built once, from its unfinished runs.
    pub fn unsettled_runs(&self) -> Result<Vec<Value>, StoreError> {
        self.build_unsettled_once()?;
        let txn = self.db.begin_read()?;
        let (Some(unsettled), Some(runs)) = (
            absent(txn.open_table(UNSETTLED))?,
            absent(txn.open_table(RUNS))?,
        ) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for entry in unsettled.iter()? {
            let (id, _) = entry?;
            if let Some(v) = runs.get(id.value())? {
                out.push(serde_json::from_slice::<Value>(v.value()).map_err(corrupt)?);
            }
        }
        // Oldest first, so runs continue in the order they were made.
        out.sort_by(|a, b| {
            let created = |v: &Value| v.get("created").and_then(Value::as_str).map(str::to_owned);
            created(a).cmp(&created(b))
        });
        Ok(out)
    }

    fn build_unsettled_once(&self) -> Result<(), StoreError> {
        {
            let txn = self.db.begin_read()?;
            if let Some(meta) = absent(txn.open_table(META))?
                && meta.get(UNSETTLED_BUILT)?.is_some()
            {
                return Ok(());
            }
        }
        let txn = self.db.begin_write()?;
        {
            let runs = txn.open_table(RUNS)?;
            let mut unsettled = txn.open_table(UNSETTLED)?;
            for entry in runs.iter()? {
                let (id, bytes) = entry?;
                let run: Value = serde_json::from_slice(bytes.value()).map_err(corrupt)?;
                if !is_final(&run) {
                    unsettled.insert(id.value(), ())?;
                }
            }
            txn.open_table(META)?
                .insert(UNSETTLED_BUILT, b"1".as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// One run.
    pub fn get_run(&self, id: Uuid) -> Result<Option<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(runs) = absent(txn.open_table(RUNS))? else {
            return Ok(None);
        };
        match runs.get(id.as_u128())? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// True if a run exists for this idempotency key.
    pub fn has_run_key(&self, key: &str) -> Result<bool, StoreError> {
        let txn = self.db.begin_read()?;
        let Some(keys) = absent(txn.open_table(RUN_KEYS))? else {
            return Ok(false);
        };
        Ok(keys.get(key)?.is_some())
    }

    /// The newest runs first.
    pub fn list_runs(&self, limit: usize) -> Result<Vec<Value>, StoreError> {
        let query = RunQuery {
            limit,
            ..RunQuery::default()
        };
        Ok(self.query_runs(&query)?.runs)
    }

    /// A page of runs matching `query`, newest first. Pages continue where the last ended
    /// (the cursor is a position in creation order), so runs created meanwhile never shift
    /// a page: paging from the first page to the last returns every run once.
    pub fn query_runs(&self, query: &RunQuery) -> Result<RunPage, StoreError> {
        let txn = self.db.begin_read()?;
        let (Some(order), Some(runs)) = (
            absent(txn.open_table(RUN_ORDER))?,
            absent(txn.open_table(RUNS))?,
        ) else {
            return Ok(RunPage::default());
        };
        let limit = query.limit.max(1);
        let range = match query.cursor {
            Some(cursor) => order.range(..cursor)?,
            None => order.range::<u64>(..)?,
        };
        let mut page = RunPage::default();
        for entry in range.rev() {
            let (position, id) = entry?;
            let Some(bytes) = runs.get(id.value())? else {
                continue;
            };
            let run: Value = serde_json::from_slice(bytes.value()).map_err(corrupt)?;
            if !query.matches(&run) {
                continue;
            }
            if page.runs.len() == limit {
                page.next = Some(position.value() + 1);
                break;
            }
            page.runs.push(run);
        }
        Ok(page)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&dir.path().join("spur.redb")).expect("open");
        (dir, store)
    }

    fn run(n: u32, state: &str) -> (Uuid, Value) {
        let id = Uuid::from_u128(u128::from(n) + 1);
        let created = format!("2026-01-01T00:{:02}:{:02}Z", n / 60 % 60, n % 60);
        let deployment = if n.is_multiple_of(2) { "even" } else { "odd" };
        (
            id,
            json!({"id": id, "state": state, "deployment": deployment, "created": created}),
        )
    }

    #[test]
    fn a_fresh_store_has_no_runs_and_answers_every_read() {
        let (_dir, store) = store();
        assert!(store.list_runs(10).expect("list").is_empty());
        assert!(store.get_run(Uuid::nil()).expect("get").is_none());
        assert!(!store.has_run_key("k").expect("key"));
        assert!(store.unsettled_runs().expect("unsettled").is_empty());
    }

    #[test]
    fn paging_returns_every_run_once_even_while_runs_are_added() {
        let (_dir, store) = store();
        for n in 0..5_000 {
            let (id, value) = run(n, "Completed");
            store.create_run(id, None, &value).expect("create");
        }
        let mut seen = std::collections::HashSet::new();
        let mut query = RunQuery {
            limit: 333,
            ..RunQuery::default()
        };
        let mut pages = 0;
        loop {
            let page = store.query_runs(&query).expect("page");
            pages += 1;
            // A run created between pages is newer than every page: it never shifts one.
            let (id, value) = run(10_000 + pages, "Completed");
            store.create_run(id, None, &value).expect("create");
            for r in &page.runs {
                assert!(
                    seen.insert(r["id"].as_str().expect("id").to_owned()),
                    "twice: {r}"
                );
            }
            match page.next {
                Some(next) => query.cursor = Some(next),
                None => break,
            }
            assert!(pages < 100, "paging does not end");
        }
        assert_eq!(seen.len(), 5_000);
        assert_eq!(pages, 16);
    }

    #[test]
    fn filters_by_state_deployment_and_time() {
        let (_dir, store) = store();
        for n in 0..100 {
            let (id, value) = run(
                n,
                if n.is_multiple_of(10) {
                    "Crashed"
                } else {
                    "Completed"
                },
            );
            store.create_run(id, None, &value).expect("create");
        }
        let page = |query: RunQuery| {
            store
                .query_runs(&RunQuery {
                    limit: 1000,
                    ..query
                })
                .expect("page")
                .runs
        };
        assert_eq!(
            page(RunQuery {
                states: vec!["crashed".into()],
                ..RunQuery::default()
            })
            .len(),
            10
        );
        assert_eq!(
            page(RunQuery {
                deployment: Some("odd".into()),
                ..RunQuery::default()
            })
            .len(),
            50
        );
        let since = chrono::DateTime::parse_from_rfc3339("2026-01-01T00:01:00Z")
            .expect("time")
            .with_timezone(&chrono::Utc);
        assert_eq!(
            page(RunQuery {
                since: Some(since),
                ..RunQuery::default()
            })
            .len(),
            40
        );
    }

    #[test]
    fn runs_stay_unsettled_until_their_last_event_is_durable() {
        let (_dir, store) = store();
        let (a, value_a) = run(1, "Scheduled");
        let (b, value_b) = run(2, "Scheduled");
        store.create_run(a, Some("k:0"), &value_a).expect("create");
        store.create_run(b, None, &value_b).expect("create");
        let (_, created) = store
            .create_run(Uuid::from_u128(99), Some("k:0"), &value_b)
            .expect("create");
        assert!(!created, "one run per key");
        store
            .update_run(a, &json!({"id": a, "state": "Completed"}))
            .expect("update");
        assert_eq!(store.unsettled_runs().expect("unsettled").len(), 2);
        store.settle_run(a).expect("settle");
        let left = store.unsettled_runs().expect("unsettled");
        assert_eq!(left.len(), 1);
        assert_eq!(left[0]["id"], json!(b));
    }
}
