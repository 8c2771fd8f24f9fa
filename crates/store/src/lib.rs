//! `spur-store`: the daemon's durable state in one embedded database file (redb).
//!
//! Tables:
//!
//! | table        | key                  | value                                   |
//! |--------------|----------------------|-----------------------------------------|
//! | `event_log`  | first ingest sequence, u64 | a batch record: up to 256 events as stored JSON (`received` in), see `records.rs` |
//! | `event_ids`  | event id, u128       | its sequence (de-duplication; merged in bulk, see below) |
//! | `events_by_occurred` | (`occurred` µs, sequence) | nothing: the order queries are served in |
//! | `firings`    | firing id, u128      | the firing record (JSON)                |
//! | `firing_seq` | u64                  | firing id, in the order recorded        |
//! | `meta`       | name                 | the checkpoint: `{seq, snapshot}`       |
//! | `runs`       | run id, u128         | the run (JSON)                          |
//! | `run_keys`   | idempotency key      | run id (one run per key)                |
//! | `run_order`  | u64                  | run id, in creation order               |
//! | `runs_unsettled` | run id, u128     | runs not final, or whose last state's event may not be in the log yet (see `runs.rs`) |
//! | `failed_actions` | invocation id, u128 | dead-lettered action (JSON)          |
//! | `dispatched` | firing id, u128      | its actions were all performed          |
//! | `event_explanations` | ingest sequence, u64 | what each candidate trigger decided (only events some trigger considered) |
//! | `webhooks`   | webhook id, u128     | the webhook (secrets sealed, keys hashed) |
//!
//! Modules, one job each: `ids.rs` (the event-id index below), `query.rs` (Prefect's event
//! filter and paging over the `occurred` index), `records.rs` (the log's batch records),
//! `runs.rs` (runs and their lifecycle), `tokens.rs` (API tokens); this file opens the
//! database and holds the writer, firings, checkpoints, webhooks and settings.
//!
//! **The id index has two tiers.** Event ids are unordered across senders (random `uuid4`s
//! from many; Prefect's clients send time-ordered `uuid7`s, but many clients interleave), so
//! inserting each event's id into the `event_ids` B-tree as it arrived dirtied one random
//! page per event, and every commit rewrote hundreds of pages. Ids appended since they were
//! last merged are instead held in memory (`RecentIds`) and merged into `event_ids` in sorted
//! passes, one key range per batch ([`StoreWriter::merge_recent_slice`]): each touched page
//! is rewritten once per pass, not once per event, and no pass stalls the writer for long.
//! The memory tier needs no persistence of its own: the log is the source of truth, and
//! `meta["ids_merged_through"]` names a sequence up to which every id is in `event_ids`, so
//! opening the store rebuilds the tier from the log entries after it. Every id lookup
//! (de-duplication, [`Store::get_event`], explanations) consults both tiers; a Bloom filter
//! over the table's ids (`IdFilter`) lets de-duplication skip the B-tree for new ids.
//!
//! **Why redb** (see ARCHITECTURE.md): pure Rust (three crates), ACID transactions across
//! tables, so an event batch and its de-duplication entries commit together; MVCC readers
//! serve queries while the pipeline writes; every commit is durable (fsync) by default.
//!
//! **Invariants.** An event id appears at most once in the log. Sequences only grow. A
//! checkpoint names the last sequence whose effects it contains; everything after it is
//! replayed on start. A firing id is recorded at most once, which is what makes re-fired
//! firings after a crash harmless.
#![warn(missing_docs)]

mod ids;
mod query;
mod records;
mod runs;
mod tokens;

use std::path::Path;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spur_core::Event;
use spur_matcher::EngineSnapshot;
use thiserror::Error;
use uuid::Uuid;

use records::{LogRecord, RecordCache, encode_record};

pub use ids::{ID_MERGE_STEP, ID_SLICES};
use ids::{
    IDS_MERGED_THROUGH, IdMap, RecentIds, forget_merged, ids_key, merge_into, rekey_event_ids,
};
pub use query::{
    AnyResourceFilter, EventOrder, EventPage, EventQuery, PagePosition, QueryMatcher,
    RelatedFilter, TextQuery,
};
pub use runs::{RunPage, RunQuery};
pub use tokens::TokenRecord;

/// The event log: batch records keyed by the sequence of their first event (see
/// [`LogRecord`]).
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("event_log");
/// The log as stores before batch records kept it: one entry per event, keyed by its
/// sequence. Opening such a store moves it into [`LOG`] ([`migrate_legacy_log`]).
const LEGACY_EVENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("events");
const EVENT_IDS: TableDefinition<u128, u64> = TableDefinition::new("event_ids");
/// Prefect serves event queries in `occurred` order, which is not arrival order: a client
/// may report an event late or backdate it. Keys are [`occurred_key`]s; most events occur
/// "now", so inserts land at the right edge of the tree.
const EVENTS_BY_OCCURRED: TableDefinition<u128, ()> = TableDefinition::new("events_by_occurred");
const FIRINGS: TableDefinition<u128, &[u8]> = TableDefinition::new("firings");
const FIRING_SEQ: TableDefinition<u64, u128> = TableDefinition::new("firing_seq");
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
const RUNS: TableDefinition<u128, &[u8]> = TableDefinition::new("runs");
const RUN_KEYS: TableDefinition<&str, u128> = TableDefinition::new("run_keys");
const RUN_ORDER: TableDefinition<u64, u128> = TableDefinition::new("run_order");
const FAILED_ACTIONS: TableDefinition<u128, &[u8]> = TableDefinition::new("failed_actions");
const DISPATCHED: TableDefinition<u128, ()> = TableDefinition::new("dispatched");
/// Keyed by log sequence, not event id: sequences only grow, so a batch's explanations are
/// appended to the end of the tree instead of dirtying a random page per event.
const EXPLANATIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("event_explanations");
const WEBHOOKS: TableDefinition<u128, &[u8]> = TableDefinition::new("webhooks");

/// A storage failure.
#[derive(Debug, Error)]
pub enum StoreError {
    /// The database reported an error.
    #[error("store: {0}")]
    Database(#[from] redb::Error),
    /// Stored data did not decode.
    #[error("store: corrupt record: {0}")]
    Corrupt(String),
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StoreError {
            fn from(e: $t) -> Self {
                StoreError::Database(e.into())
            }
        }
    )*};
}
from_redb!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError
);

/// What happened to one appended event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this sequence.
    New(u64),
    /// Its id was already in the log (a redelivery); nothing stored.
    Duplicate,
}

/// A checkpoint of the trigger engine.
#[derive(Debug, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The last log sequence whose effects the snapshot contains.
    pub seq: u64,
    /// With NATS JetStream: a stream sequence no greater than the last one whose events the
    /// snapshot contains (conservative after a restart; the engine drops an event it has
    /// already seen). An instance that starts from this checkpoint reads the stream after it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_seq: Option<u64>,
    /// The engine state.
    pub snapshot: EngineSnapshot,
}

/// The embedded store. Cheap to share behind an `Arc`; redb serialises writers.
pub struct Store {
    db: Database,
    /// The memory tier of the id index (see the crate docs).
    recent: Arc<RwLock<RecentIds>>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// The page cache a store keeps in memory unless told otherwise ([`Store::open_with_cache`]):
/// 256 MiB. redb's own default is 1 GiB, which a busy daemon fills (its log is appended to
/// all the time), so three cluster members on one machine held over a gigabyte each. The
/// hot pages are few: the log's last leaves, the id index's newest slice, the runs being
/// written.
pub const DEFAULT_CACHE_BYTES: usize = 256 << 20;

impl Store {
    /// Opens (or creates) the database file at `path` with the [`DEFAULT_CACHE_BYTES`]
    /// page cache; creates the parent folder.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        Store::open_with_cache(path, DEFAULT_CACHE_BYTES)
    }

    /// Like [`Store::open`], with a page cache of at most `cache_bytes`.
    pub fn open_with_cache(path: &Path, cache_bytes: usize) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Corrupt(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let db = Database::builder()
            .set_cache_size(cache_bytes)
            .create(path)?;
        let txn = db.begin_write()?;
        {
            // Every table exists from the first open on, so every read path finds its table
            // (a missing one was an error: a fresh store answered the event query with 500).
            txn.open_table(LOG)?;
            txn.open_table(EVENTS_BY_OCCURRED)?;
            txn.open_table(EVENT_IDS)?;
            txn.open_table(FIRINGS)?;
            txn.open_table(FIRING_SEQ)?;
            txn.open_table(META)?;
            txn.open_table(RUNS)?;
            txn.open_table(RUN_KEYS)?;
            txn.open_table(RUN_ORDER)?;
            txn.open_table(FAILED_ACTIONS)?;
            txn.open_table(DISPATCHED)?;
            txn.open_table(EXPLANATIONS)?;
            txn.open_table(WEBHOOKS)?;
            migrate_legacy_log(&txn)?;
            rekey_event_ids(&txn)?;
            // A store written before the id index had two tiers indexed every id at once.
            let last = records::next_seq(&txn.open_table(LOG)?)? - 1;
            let mut meta = txn.open_table(META)?;
            if meta.get(IDS_MERGED_THROUGH)?.is_none() {
                meta.insert(IDS_MERGED_THROUGH, last.to_be_bytes().as_slice())?;
            }
        }
        txn.commit()?;
        let store = Store {
            db,
            recent: Arc::default(),
        };
        store.load_recent_ids()?;
        Ok(store)
    }

    /// Starts a write transaction: append events and record the firings they caused, then
    /// commit both durably at once (one commit per batch is what makes ingest fast).
    pub fn writer(&self) -> Result<StoreWriter, StoreError> {
        Ok(StoreWriter {
            txn: self.db.begin_write()?,
            recent: self.recent.clone(),
            staged: IdMap::default(),
            merged: Vec::new(),
        })
    }

    /// Appends events in one durable transaction, skipping ids already in the log.
    pub fn append(&self, events: &[Event]) -> Result<Vec<Appended>, StoreError> {
        let mut writer = self.writer()?;
        let out = writer.append(events)?;
        writer.commit()?;
        Ok(out)
    }

    /// The highest sequence in the log (0 when empty).
    pub fn last_seq(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(records::next_seq(&txn.open_table(LOG)?)? - 1)
    }

    /// Up to `limit` events with sequence greater than `after`, in order.
    pub fn events_after(&self, after: u64, limit: usize) -> Result<Vec<(u64, Event)>, StoreError> {
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        records::for_each_after(&log, after, |seq, bytes| {
            out.push((seq, decode_event(bytes)?));
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }

    /// Records firings; returns, per firing, whether it was new. A firing seen before (e.g.
    /// re-fired while replaying the log after a crash) is not recorded again.
    pub fn record_firings(
        &self,
        firings: &[(Uuid, impl std::borrow::Borrow<Value>)],
    ) -> Result<Vec<bool>, StoreError> {
        let writer = self.writer()?;
        let out = writer.record_firings(firings)?;
        writer.commit()?;
        Ok(out)
    }

    /// The most recent firings, newest first.
    pub fn recent_firings(&self, limit: usize) -> Result<Vec<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let order = txn.open_table(FIRING_SEQ)?;
        let table = txn.open_table(FIRINGS)?;
        let mut out = Vec::new();
        for entry in order.iter()?.rev().take(limit) {
            let (_, id) = entry?;
            if let Some(v) = table.get(id.value())? {
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
        }
        Ok(out)
    }

    /// Marks firings whose actions were all performed (one transaction for the lot).
    ///
    /// The commit is not flushed on its own (`Durability::None`): the pipeline's next durable
    /// commit, milliseconds later under load, persists it. An fsync here would hold the
    /// store's single write lock for milliseconds and stall the pipeline; a mark lost to a
    /// crash only means the firing is dispatched again on restart, where every step is
    /// idempotent.
    pub fn mark_dispatched(&self, firings: &[Uuid]) -> Result<(), StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| corrupt(format!("dispatched marks: {e}")))?;
        {
            let mut table = txn.open_table(DISPATCHED)?;
            for firing in firings {
                table.insert(firing.as_u128(), ())?;
            }
        }
        txn.commit()?;
        Ok(())
    }

    /// Firings whose actions were never all performed: what a crash interrupted. Oldest
    /// first. Firings are dispatched in the order they were recorded, so the undispatched
    /// ones are the newest: the scan walks back from the newest firing and stops once it has
    /// passed `settled` dispatched firings in a row. (It used to stop after the newest
    /// `settled` firings, whatever they were: a backlog longer than that, under load at a
    /// kill -9, was never dispatched and its runs never made.)
    pub fn undispatched_firings(&self, settled: usize) -> Result<Vec<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let order = txn.open_table(FIRING_SEQ)?;
        let firings = txn.open_table(FIRINGS)?;
        let done = txn.open_table(DISPATCHED)?;
        let mut out = Vec::new();
        let mut dispatched_in_a_row = 0;
        for entry in order.iter()?.rev() {
            let (_, id) = entry?;
            let id = id.value();
            if done.get(id)?.is_some() {
                dispatched_in_a_row += 1;
                if dispatched_in_a_row >= settled {
                    break;
                }
                continue;
            }
            dispatched_in_a_row = 0;
            if let Some(v) = firings.get(id)? {
                out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
            }
        }
        out.reverse();
        Ok(out)
    }

    /// The recorded explanation of an event, if any. Events that no trigger considered have
    /// none (see [`StoreWriter::put_explanations`]).
    pub fn get_explanation(&self, id: Uuid) -> Result<Option<Value>, StoreError> {
        let (txn, seq) = self.find(id)?;
        let Some(seq) = seq else {
            return Ok(None);
        };
        match txn.open_table(EXPLANATIONS)?.get(seq)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// One stored event by id.
    pub fn get_event(&self, id: Uuid) -> Result<Option<Event>, StoreError> {
        let (txn, seq) = self.find(id)?;
        let Some(seq) = seq else {
            return Ok(None);
        };
        let log = txn.open_table(LOG)?;
        let mut cache = RecordCache::new();
        cache.get(&log, seq)?.map(decode_event).transpose()
    }

    /// A read snapshot, and the log sequence of event `id` in it if stored. The memory tier
    /// is consulted *before* the snapshot is taken: a merge moves ids to the table first and
    /// out of memory after, so an id missing from memory then is in the snapshot's table.
    fn find(&self, id: Uuid) -> Result<(redb::ReadTransaction, Option<u64>), StoreError> {
        let remembered = RecentIds::get(&self.recent, id.as_u128());
        let txn = self.db.begin_read()?;
        let seq = match remembered {
            Some(seq) => Some(seq),
            None => txn
                .open_table(EVENT_IDS)?
                .get(ids_key(id.as_u128()))?
                .map(|v| v.value()),
        };
        Ok((txn, seq))
    }

    /// Saves a webhook (insert or replace).
    pub fn put_webhook(&self, id: Uuid, hook: &Value) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(hook).map_err(corrupt)?;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(WEBHOOKS)?;
            table.insert(id.as_u128(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Every webhook.
    pub fn webhooks(&self) -> Result<Vec<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(WEBHOOKS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Deletes a webhook; true if it existed.
    pub fn delete_webhook(&self, id: Uuid) -> Result<bool, StoreError> {
        let txn = self.db.begin_write()?;
        let existed = {
            let mut table = txn.open_table(WEBHOOKS)?;
            table.remove(id.as_u128())?.is_some()
        };
        txn.commit()?;
        Ok(existed)
    }

    /// A small named setting (e.g. the paused automations), as JSON.
    pub fn get_setting(&self, name: &str) -> Result<Option<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        let key = format!("setting:{name}");
        match meta.get(key.as_str())? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Saves a named setting durably.
    pub fn put_setting(&self, name: &str, value: &Value) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(value).map_err(corrupt)?;
        let txn = self.db.begin_write()?;
        {
            let mut meta = txn.open_table(META)?;
            let key = format!("setting:{name}");
            meta.insert(key.as_str(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Dead-letters an action that failed for good (replacing an earlier entry for it).
    pub fn put_failed_action(&self, id: Uuid, record: &Value) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(record).map_err(corrupt)?;
        let txn = self.db.begin_write()?;
        {
            let mut table = txn.open_table(FAILED_ACTIONS)?;
            table.insert(id.as_u128(), bytes.as_slice())?;
        }
        txn.commit()?;
        Ok(())
    }

    /// Dead-lettered actions.
    pub fn failed_actions(&self) -> Result<Vec<Value>, StoreError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(FAILED_ACTIONS)?;
        let mut out = Vec::new();
        for entry in table.iter()? {
            let (_, v) = entry?;
            out.push(serde_json::from_slice(v.value()).map_err(corrupt)?);
        }
        Ok(out)
    }

    /// Removes a dead-lettered action (after a successful retry); returns it.
    pub fn take_failed_action(&self, id: Uuid) -> Result<Option<Value>, StoreError> {
        let txn = self.db.begin_write()?;
        let taken = {
            let mut table = txn.open_table(FAILED_ACTIONS)?;
            let removed = table.remove(id.as_u128())?;
            match removed {
                Some(v) => Some(serde_json::from_slice(v.value()).map_err(corrupt)?),
                None => None,
            }
        };
        txn.commit()?;
        Ok(taken)
    }

    /// Saves the engine checkpoint (durably, replacing the previous one).
    pub fn save_checkpoint(&self, checkpoint: &Checkpoint) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(checkpoint).map_err(corrupt)?;
        self.save_checkpoint_json(&bytes)
    }

    /// Stores a checkpoint already serialized as JSON (callers that also ship the bytes
    /// elsewhere serialize once).
    pub fn save_checkpoint_json(&self, bytes: &[u8]) -> Result<(), StoreError> {
        let txn = self.db.begin_write()?;
        put_checkpoint(&txn, bytes)?;
        txn.commit()?;
        Ok(())
    }

    /// The last checkpoint, if any.
    pub fn load_checkpoint(&self) -> Result<Option<Checkpoint>, StoreError> {
        let txn = self.db.begin_read()?;
        let meta = txn.open_table(META)?;
        match meta.get(CHECKPOINT)? {
            Some(v) => Ok(Some(serde_json::from_slice(v.value()).map_err(corrupt)?)),
            None => Ok(None),
        }
    }

    /// Deletes events received before `cutoff` (retention), oldest first, at most `max` per
    /// call so a large backlog is pruned in bounded steps. Returns how many were removed.
    pub fn prune(&self, cutoff: DateTime<Utc>, max: usize) -> Result<usize, StoreError> {
        let txn = self.db.begin_write()?;
        let mut pruned = Vec::new();
        {
            let mut log = txn.open_table(LOG)?;
            let mut by_occurred = txn.open_table(EVENTS_BY_OCCURRED)?;
            let mut ids = txn.open_table(EVENT_IDS)?;
            let mut explanations = txn.open_table(EXPLANATIONS)?;
            while pruned.len() < max {
                let Some((first, bytes)) =
                    log.first()?.map(|(k, v)| (k.value(), v.value().to_vec()))
                else {
                    break;
                };
                let record = LogRecord::parse(&bytes)?;
                // The record's events up to `kept_from` go; a record is received in one go, so
                // it is nearly always all or nothing.
                let mut kept_from = record.len();
                for (index, stored) in record.events().enumerate() {
                    let event = decode_event(stored?)?;
                    if event.received >= cutoff || pruned.len() >= max {
                        kept_from = index;
                        break;
                    }
                    let seq = first + index as u64;
                    by_occurred.remove(occurred_key(occurred_micros(&event), seq))?;
                    ids.remove(ids_key(event.id.as_u128()))?;
                    explanations.remove(seq)?;
                    pruned.push(event.id.as_u128());
                }
                if kept_from == 0 {
                    break;
                }
                log.remove(first)?;
                if kept_from < record.len() {
                    let rest: Vec<&[u8]> =
                        record.events().skip(kept_from).collect::<Result<_, _>>()?;
                    let rest = encode_record(rest.iter().copied());
                    log.insert(first + kept_from as u64, rest.as_slice())?;
                    break;
                }
            }
        }
        txn.commit()?;
        let removed = pruned.len();
        let mut recent = RecentIds::write(&self.recent);
        for id in pruned {
            recent.ids.remove(id);
        }
        Ok(removed)
    }

    /// Number of events in the log (the occurred index has one entry per event).
    pub fn event_count(&self) -> Result<u64, StoreError> {
        let txn = self.db.begin_read()?;
        Ok(txn.open_table(EVENTS_BY_OCCURRED)?.len()?)
    }
}

/// The `occurred` µs of an event.
fn occurred_micros(event: &Event) -> i64 {
    event.occurred.timestamp_micros()
}

/// An `events_by_occurred` key: `occurred` µs (sign bit flipped, so that unsigned order is
/// time order) in the high half, the log sequence in the low half. One fixed-width integer
/// compares and encodes faster than a tuple key; the append bench showed the difference.
fn occurred_key(occurred_micros: i64, seq: u64) -> u128 {
    let time = (occurred_micros as u64) ^ (1 << 63);
    (u128::from(time) << 64) | u128::from(seq)
}

/// The (`occurred` µs, sequence) an [`occurred_key`] was made of.
fn split_occurred_key(key: u128) -> (i64, u64) {
    let time = ((key >> 64) as u64) ^ (1 << 63);
    (time as i64, key as u64)
}

/// Moves a log written before batch records (one `events` entry per event) into batch
/// records, and builds `events_by_occurred` from it (stores that old may predate the index
/// too). Runs once, in the transaction that opens such a store.
/// `meta[CHECKPOINT]`: the last checkpoint's JSON.
const CHECKPOINT: &str = "checkpoint";

/// Writes a checkpoint's JSON within `txn`, replacing the previous one.
fn put_checkpoint(txn: &redb::WriteTransaction, bytes: &[u8]) -> Result<(), StoreError> {
    txn.open_table(META)?.insert(CHECKPOINT, bytes)?;
    Ok(())
}

fn migrate_legacy_log(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    use redb::TableHandle;
    if !txn.list_tables()?.any(|t| t.name() == LEGACY_EVENTS.name()) {
        return Ok(());
    }
    {
        let legacy = txn.open_table(LEGACY_EVENTS)?;
        let mut log = txn.open_table(LOG)?;
        let mut index = txn.open_table(EVENTS_BY_OCCURRED)?;
        index.retain(|_, ()| false)?;
        // Each run of consecutive sequences is written like an appended batch (pruning only
        // ever removed the oldest events, but a gap is handled all the same).
        let mut run: Vec<Vec<u8>> = Vec::new();
        let mut run_first = 0;
        for entry in legacy.iter()? {
            let (seq, bytes) = entry?;
            let seq = seq.value();
            let event = decode_event(bytes.value())?;
            index.insert(occurred_key(occurred_micros(&event), seq), ())?;
            if run_first + run.len() as u64 != seq {
                let slices: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
                records::insert_run(&mut log, run_first, &slices)?;
                run.clear();
                run_first = seq;
            }
            run.push(bytes.value().to_vec());
        }
        let slices: Vec<&[u8]> = run.iter().map(Vec::as_slice).collect();
        records::insert_run(&mut log, run_first, &slices)?;
        tracing::info!(
            events = legacy.len()?,
            "moved the event log into batch records and indexed it by occurred time"
        );
    }
    txn.delete_table(LEGACY_EVENTS)?;
    Ok(())
}

/// An open write transaction (see [`Store::writer`]). Nothing is visible or durable until
/// [`StoreWriter::commit`]; dropping it aborts.
pub struct StoreWriter {
    txn: redb::WriteTransaction,
    /// The store's memory tier of the id index; the staged ids join it on commit.
    recent: Arc<RwLock<RecentIds>>,
    /// Ids appended in this transaction: id → sequence.
    staged: IdMap,
    /// Memory-tier ids merged into `event_ids` in this transaction.
    merged: Vec<u128>,
}

impl StoreWriter {
    /// Appends events, skipping ids already in the log.
    pub fn append(&mut self, events: &[Event]) -> Result<Vec<Appended>, StoreError> {
        let encoded = events
            .iter()
            .map(Event::to_json_bytes)
            .collect::<Result<Vec<_>, _>>()
            .map_err(corrupt)?;
        self.append_encoded(events, &encoded)
    }

    /// Appends events whose stored JSON (`serde_json::to_vec(event)`) the caller already
    /// made, `encoded[i]` for `events[i]`; skips ids already in the log.
    pub fn append_encoded(
        &mut self,
        events: &[Event],
        encoded: &[Vec<u8>],
    ) -> Result<Vec<Appended>, StoreError> {
        if events.len() != encoded.len() {
            return Err(StoreError::Corrupt(format!(
                "{} events but {} encodings",
                events.len(),
                encoded.len()
            )));
        }
        let mut out = Vec::with_capacity(events.len());
        {
            let mut log = self.txn.open_table(LOG)?;
            let mut by_occurred = self.txn.open_table(EVENTS_BY_OCCURRED)?;
            let ids = self.txn.open_table(EVENT_IDS)?;
            let mut next = records::next_seq(&log)?;
            // The new events' stored JSON, written as records of consecutive sequences.
            let mut fresh: Vec<&[u8]> = Vec::with_capacity(events.len());
            let first = next;
            // Read-locked once for the whole batch: the tier's only writer is this thread,
            // after this loop (commit, merges).
            let tiers = self.recent.read().unwrap_or_else(|p| p.into_inner());
            for (event, bytes) in events.iter().zip(encoded) {
                let id = event.id.as_u128();
                let (recent, maybe_merged) = (tiers.ids.contains(id), tiers.merged.may_contain(id));
                if self.staged.contains_key(&id)
                    || recent
                    || (maybe_merged && ids.get(ids_key(id))?.is_some())
                {
                    out.push(Appended::Duplicate);
                    continue;
                }
                fresh.push(bytes.as_slice());
                by_occurred.insert(occurred_key(occurred_micros(event), next), ())?;
                self.staged.insert(id, next);
                out.push(Appended::New(next));
                next += 1;
            }
            records::insert_run(&mut log, first, &fresh)?;
        }
        Ok(out)
    }

    /// Records firings; returns, per firing, whether it was new.
    pub fn record_firings(
        &self,
        firings: &[(Uuid, impl std::borrow::Borrow<Value>)],
    ) -> Result<Vec<bool>, StoreError> {
        let mut out = Vec::with_capacity(firings.len());
        {
            let mut table = self.txn.open_table(FIRINGS)?;
            let mut order = self.txn.open_table(FIRING_SEQ)?;
            let mut next = order.last()?.map_or(1, |(k, _)| k.value() + 1);
            for (id, record) in firings {
                if table.get(id.as_u128())?.is_some() {
                    out.push(false);
                    continue;
                }
                let bytes = serde_json::to_vec(record.borrow()).map_err(corrupt)?;
                table.insert(id.as_u128(), bytes.as_slice())?;
                order.insert(next, id.as_u128())?;
                next += 1;
                out.push(true);
            }
        }
        Ok(out)
    }

    /// Stores a checkpoint (its JSON, see [`Checkpoint`]) as part of this transaction: the
    /// pipeline writes one inside a batch's commit instead of paying a commit of its own.
    pub fn put_checkpoint_json(&self, bytes: &[u8]) -> Result<(), StoreError> {
        put_checkpoint(&self.txn, bytes)
    }

    /// Stores why each candidate trigger did (not) react to an event already in the log, as
    /// the explanation's JSON bytes (the pipeline encodes its decisions straight to bytes:
    /// an event that hundreds of triggers consider has hundreds of decisions, and a
    /// `Value` in between cost more than the rest of the batch). `None` records that no
    /// trigger considered it, which is stored as no record at all (most events in a busy
    /// log; an earlier record, e.g. "held", is removed).
    pub fn put_explanations(
        &self,
        explanations: &[(Uuid, Option<Vec<u8>>)],
    ) -> Result<(), StoreError> {
        let ids = self.txn.open_table(EVENT_IDS)?;
        let mut table = self.txn.open_table(EXPLANATIONS)?;
        for (id, value) in explanations {
            let id = id.as_u128();
            // No merge can run beside this write transaction, so the order of the looks is free.
            let seq = match self.staged.get(&id) {
                Some(seq) => Some(*seq),
                None => match RecentIds::get(&self.recent, id) {
                    Some(seq) => Some(seq),
                    None => ids.get(ids_key(id))?.map(|v| v.value()),
                },
            };
            let Some(seq) = seq else {
                continue;
            };
            match value {
                Some(bytes) => {
                    table.insert(seq, bytes.as_slice())?;
                }
                None => {
                    if table.get(seq)?.is_some() {
                        table.remove(seq)?;
                    }
                }
            }
        }
        Ok(())
    }

    /// Merges the next of the [`ID_SLICES`] key ranges of the id index's memory tier into
    /// `event_ids`, as part of this transaction; returns how many ids it moves. Call it once
    /// per [`ID_MERGE_STEP`] new ids ([`Store::ids_since_merge_step`]).
    ///
    /// Why slices, and why here: merging every recent id at once rewrote most of the id
    /// table's pages in one go (~35 ms for 65 000 ids into 200 000), a stall every event in
    /// flight waited for; a merge in its own transaction paid a commit per step. One key range
    /// per batch rewrites only that range's pages, inside a commit that happens anyway, and a
    /// full turn over the ranges merges as many ids per page as one big merge would.
    pub fn merge_recent_slice(&mut self) -> Result<usize, StoreError> {
        let slice = {
            let mut recent = RecentIds::write(&self.recent);
            let slice = recent.next_slice;
            recent.next_slice = (slice + 1) % ID_SLICES;
            recent.since_step = 0;
            slice
        };
        let merged = merge_into(&self.txn, &self.recent, Some(slice))?;
        let count = merged.len();
        self.merged.extend(merged);
        Ok(count)
    }

    /// Commits durably; the appended ids join the memory tier of the id index, and the ids
    /// merged into `event_ids` leave it.
    pub fn commit(self) -> Result<(), StoreError> {
        self.txn.commit()?;
        forget_merged(&self.recent, &self.merged);
        if !self.staged.is_empty() {
            let mut recent = RecentIds::write(&self.recent);
            recent.since_step += self.staged.len();
            for (id, seq) in self.staged {
                recent.ids.insert(id, seq);
            }
        }
        Ok(())
    }
}

fn decode_event(bytes: &[u8]) -> Result<Event, StoreError> {
    let value: Value = serde_json::from_slice(bytes).map_err(corrupt)?;
    Event::from_stored_value(value).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::*;
    use crate::records::MAX_EVENTS_PER_RECORD;
    use serde_json::json;
    use spur_core::EventLimits;

    /// Event `id` named `name`, of `resource`, occurred and received at `at`.
    fn event_with(id: u128, name: &str, resource: &str, at: &str) -> Event {
        let at: DateTime<Utc> = at.parse().expect("valid time");
        Event::from_json(
            &json!({"id": Uuid::from_u128(id).to_string(), "event": name, "occurred": at.to_rfc3339(),
                    "resource": {"prefect.resource.id": resource}}),
            at,
            &EventLimits::default(),
        )
        .expect("valid event")
    }

    fn event(id: u128, name: &str, at: &str) -> Event {
        event_with(id, name, &format!("r.{id}"), at)
    }

    #[test]
    fn append_dedupes_and_survives_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spur.redb");
        {
            let store = Store::open(&path).expect("opens");
            let a = event(1, "a", "2024-01-01T00:00:00Z");
            let b = event(2, "b", "2024-01-01T00:00:01Z");
            assert_eq!(
                store.append(&[a.clone(), b]).expect("append"),
                [Appended::New(1), Appended::New(2)]
            );
            assert_eq!(store.append(&[a]).expect("append"), [Appended::Duplicate]);
        }
        let store = Store::open(&path).expect("reopens");
        assert_eq!(store.last_seq().expect("seq"), 2);
        let after = store.events_after(1, 10).expect("read");
        assert_eq!(after.len(), 1);
        assert_eq!(after[0].1.event, "b");
    }

    #[test]
    fn ids_are_found_in_either_tier_of_the_index_across_merges_and_reopens() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spur.redb");
        let a = event(
            0xa1b2_0000_0000_0000_0000_0000_0000_0001,
            "a",
            "2024-01-01T00:00:00Z",
        );
        let b = event(
            0x0000_0000_0000_0000_0000_0000_0000_0002,
            "b",
            "2024-01-01T00:00:01Z",
        );
        let c = event(
            0x7fff_0000_0000_0000_0000_0000_0000_0003,
            "c",
            "2024-01-01T00:00:02Z",
        );
        {
            let store = Store::open(&path).expect("opens");
            // The same id twice in one batch is stored once.
            assert_eq!(
                store
                    .append(&[a.clone(), b.clone(), a.clone()])
                    .expect("append"),
                [Appended::New(1), Appended::New(2), Appended::Duplicate]
            );
            assert_eq!(store.recent_id_count(), 2);
            assert_eq!(
                store.get_event(b.id).expect("read").map(|e| e.id),
                Some(b.id)
            );
        }
        {
            // Reopened before any merge: the memory tier is rebuilt from the log.
            let store = Store::open(&path).expect("reopens");
            assert_eq!(store.recent_id_count(), 2);
            assert_eq!(
                store.append(std::slice::from_ref(&b)).expect("append"),
                [Appended::Duplicate]
            );
            assert_eq!(store.merge_recent_ids().expect("merge"), 2);
            assert_eq!(store.recent_id_count(), 0);
            // Merged ids are still refused and still found.
            assert_eq!(
                store.append(&[a.clone(), c.clone()]).expect("append"),
                [Appended::Duplicate, Appended::New(3)]
            );
            assert_eq!(
                store.get_event(a.id).expect("read").map(|e| e.event),
                Some("a".into())
            );
            assert_eq!(
                store.get_event(c.id).expect("read").map(|e| e.event),
                Some("c".into())
            );
            // A durable commit after the (unsynced) merge makes the merge durable too.
            store.append(&[]).expect("append");
        }
        // Reopened after the merge: only the id appended since is in memory.
        let store = Store::open(&path).expect("reopens");
        assert_eq!(store.recent_id_count(), 1);
        for e in [&a, &b, &c] {
            assert_eq!(
                store.append(std::slice::from_ref(e)).expect("append"),
                [Appended::Duplicate]
            );
        }
        // Pruning removes ids from both tiers, so a later copy is new again.
        assert_eq!(
            store
                .prune("2030-01-01T00:00:00Z".parse().expect("time"), 10)
                .expect("prune"),
            3
        );
        assert_eq!(store.recent_id_count(), 0);
        assert!(store.get_event(a.id).expect("read").is_none());
    }

    #[test]
    fn slice_merges_move_one_key_range_and_reopening_reloads_what_is_left() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("spur.redb");
        // The last byte picks the slice (see `ids_key`): `low` is in slice 0, `high` in the
        // last one.
        let high = event(0x42ff, "high", "2024-01-01T00:00:00Z");
        let low = event(0xff00, "low", "2024-01-01T00:00:01Z");
        assert_eq!((slice_of(0xff00), slice_of(0x42ff)), (0, ID_SLICES - 1));
        {
            let store = Store::open(&path).expect("opens");
            store.append(&[high.clone(), low.clone()]).expect("append");
            assert_eq!(store.ids_since_merge_step(), 2);
            let mut writer = store.writer().expect("writer");
            let merged = writer.merge_recent_slice().expect("merge");
            assert_eq!(merged, 1, "slice 0: `low` only");
            // Until the merge commits, `low` stays in memory.
            assert_eq!(store.recent_id_count(), 2);
            writer.commit().expect("commit");
            assert_eq!(store.ids_since_merge_step(), 0);
            assert_eq!(store.recent_id_count(), 1);
            let mut writer = store.writer().expect("writer");
            let merged = writer.merge_recent_slice().expect("merge");
            assert_eq!(merged, 0, "slice 1 is empty");
            writer.commit().expect("commit");
        }
        // `high` (sequence 1) was never merged, so the tier is rebuilt from sequence 1 on:
        // `low` is loaded again too, which is harmless.
        let store = Store::open(&path).expect("reopens");
        assert_eq!(store.recent_id_count(), 2);
        for e in [&high, &low] {
            assert_eq!(
                store.append(std::slice::from_ref(e)).expect("append"),
                [Appended::Duplicate]
            );
        }
        assert_eq!(store.merge_recent_ids().expect("merge all"), 2);
        assert_eq!(
            store.get_event(high.id).expect("read").map(|e| e.event),
            Some("high".into())
        );
    }

    #[test]
    fn time_ordered_ids_spread_over_every_slice() {
        // Ten thousand UUIDv7s of one millisecond (a burst from Prefect's clients, or Spur's
        // events about firings): keyed by their leading bits they would share one slice.
        let mut per_slice = vec![0usize; ID_SLICES as usize];
        for n in 0..10_000 {
            let id = spur_core::time_ordered_id(1_700_000_000_000, &format!("event {n}"));
            per_slice[slice_of(id.as_u128()) as usize] += 1;
        }
        let mean = 10_000 / ID_SLICES as usize;
        assert!(per_slice.iter().all(|&n| n > 0), "{per_slice:?}");
        assert!(per_slice.iter().all(|&n| n < mean * 3), "{per_slice:?}");
        // Within a slice, keys keep the ids' time order (merges append at the slice's end).
        let (a, b) = (
            0x0190_0000_0000_7000_8000_0000_0000_0012u128,
            0x0190_0000_0001_7000_8000_0000_0000_0012u128,
        );
        assert_eq!(slice_of(a), slice_of(b));
        assert!(ids_key(a) < ids_key(b));
        assert_eq!(id_of_key(ids_key(a)), a);
    }

    #[test]
    fn the_id_filter_never_forgets_an_id_and_rarely_claims_one() {
        let mut filter = IdFilter::with_room_for(10_000);
        let id = |n: u128| n.wrapping_mul(0x9e37_79b9_7f4a_7c15_f39c_c060_5ced_c835);
        for n in 0..10_000 {
            filter.insert(id(n));
        }
        assert!((0..10_000).all(|n| filter.may_contain(id(n))));
        let false_positives = (10_000..110_000)
            .filter(|n| filter.may_contain(id(*n)))
            .count();
        assert!(
            false_positives < 1_000,
            "{false_positives} of 100 000 absent ids"
        );
        assert!(!filter.needs_rebuild());
        // Time-ordered ids (Spur's own, UUIDv7 layout) differ mostly in their high half.
        let mut filter = IdFilter::with_room_for(0);
        filter.insert(7 << 80);
        assert!(filter.may_contain(7 << 80));
        assert!(!(8..1_000u128).all(|n| filter.may_contain(n << 80)));
        // An unbuilt filter answers "maybe" to everything.
        assert!(IdFilter::default().may_contain(42));
        assert!(IdFilter::default().needs_rebuild());
    }

    #[test]
    fn query_filters_newest_first_with_paging() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let events: Vec<Event> = (1..=5)
            .map(|i| {
                event(
                    i,
                    if i % 2 == 0 { "flow.done" } else { "other" },
                    &format!("2024-01-01T00:00:0{i}Z"),
                )
            })
            .collect();
        store.append(&events).expect("append");
        let q = EventQuery {
            name_prefixes: vec!["flow.".into()],
            ..EventQuery::default()
        };
        let page = store.query(&q, 1, None, 1000).expect("query");
        assert_eq!(page.total, 2);
        assert_eq!(page.events[0].1.id, Uuid::from_u128(4));
        let next = store.query(&q, 1, page.next, 1000).expect("query");
        assert_eq!(next.events[0].1.id, Uuid::from_u128(2));
        assert_eq!(next.total, 2, "every page reports the whole count");
        assert!(next.next.is_none());
    }

    /// An event of resource `resource` that occurred at `at`.
    fn event_of(id: u128, resource: &str, at: &str) -> Event {
        event_with(id, "e", resource, at)
    }

    fn ids(page: &EventPage) -> Vec<u128> {
        page.events.iter().map(|(_, e)| e.id.as_u128()).collect()
    }

    #[test]
    fn occurred_keys_sort_in_time_order_and_split_back() {
        let points = [
            (i64::MIN, 0),
            (-5, u64::MAX),
            (-5, 0),
            (0, 3),
            (1, 0),
            (i64::MAX, 9),
        ];
        let mut keys: Vec<u128> = points.iter().map(|(t, s)| occurred_key(*t, *s)).collect();
        keys.sort_unstable();
        let mut expected = points.to_vec();
        expected.sort_unstable();
        let split: Vec<(i64, u64)> = keys.into_iter().map(split_occurred_key).collect();
        assert_eq!(split, expected);
    }

    #[test]
    fn query_orders_by_occurred_not_arrival() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        // Arrival order 1, 2, 3; event 3 is backdated before both.
        store
            .append(&[
                event_of(1, "r", "2024-01-01T00:00:02Z"),
                event_of(2, "r", "2024-01-01T00:00:03Z"),
                event_of(3, "r", "2024-01-01T00:00:01Z"),
            ])
            .expect("append");
        let newest_first = store
            .query(&EventQuery::default(), 10, None, 1000)
            .expect("query");
        assert_eq!(ids(&newest_first), [2, 1, 3]);
        let oldest_first = EventQuery {
            order: EventOrder::Ascending,
            ..EventQuery::default()
        };
        let page = store.query(&oldest_first, 2, None, 1000).expect("query");
        assert_eq!(ids(&page), [3, 1]);
        assert_eq!(page.total, 3);
        let rest = store
            .query(&oldest_first, 2, page.next, 1000)
            .expect("query");
        assert_eq!(ids(&rest), [2]);
        assert!(rest.next.is_none());
        // `since`/`until` bound `occurred`, inclusively.
        let window = EventQuery {
            since: Some("2024-01-01T00:00:01Z".parse().expect("time")),
            until: Some("2024-01-01T00:00:02Z".parse().expect("time")),
            ..EventQuery::default()
        };
        assert_eq!(
            ids(&store.query(&window, 10, None, 1000).expect("query")),
            [1, 3]
        );
    }

    #[test]
    fn paging_visits_every_match_once_even_when_the_scan_is_cut_short() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let events: Vec<Event> = (1..=10)
            .map(|i| {
                event_of(
                    i,
                    if i % 3 == 0 { "skip" } else { "keep" },
                    &format!("2024-01-01T00:00:{i:02}Z"),
                )
            })
            .collect();
        store.append(&events).expect("append");
        let q = EventQuery {
            resource_ids: vec!["keep".into()],
            ..EventQuery::default()
        };
        for (limit, scan_limit) in [(2, 1000), (2, 3), (5, 1), (7, 1000)] {
            let mut seen = Vec::new();
            let mut after = None;
            for _ in 0..50 {
                let page = store.query(&q, limit, after, scan_limit).expect("query");
                seen.extend(ids(&page));
                match page.next {
                    Some(next) => after = Some(next),
                    None => break,
                }
            }
            assert_eq!(
                seen,
                [10, 8, 7, 5, 4, 2, 1],
                "limit {limit}, scan limit {scan_limit}"
            );
        }
        // With the whole range in reach, every page reports the same total.
        let first = store.query(&q, 3, None, 1000).expect("query");
        let second = store.query(&q, 3, first.next, 1000).expect("query");
        assert_eq!((first.total, second.total), (7, 7));
    }

    #[test]
    fn distinct_resources_keep_each_resources_first_event_across_pages() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        store
            .append(&[
                event_of(1, "a", "2024-01-01T00:00:01Z"),
                event_of(2, "b", "2024-01-01T00:00:02Z"),
                event_of(3, "a", "2024-01-01T00:00:03Z"),
                event_of(4, "c", "2024-01-01T00:00:04Z"),
                event_of(5, "b", "2024-01-01T00:00:05Z"),
            ])
            .expect("append");
        let newest = EventQuery {
            distinct_resources: true,
            ..EventQuery::default()
        };
        let page = store.query(&newest, 2, None, 1000).expect("query");
        assert_eq!(ids(&page), [5, 4]);
        assert_eq!(page.total, 3, "three resources");
        let rest = store.query(&newest, 2, page.next, 1000).expect("query");
        assert_eq!(ids(&rest), [3], "b's older event is not repeated");
        let oldest = EventQuery {
            order: EventOrder::Ascending,
            ..newest
        };
        assert_eq!(
            ids(&store.query(&oldest, 10, None, 1000).expect("query")),
            [1, 2, 4]
        );
    }

    #[test]
    fn a_log_of_one_entry_per_event_is_moved_into_records_and_indexed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("s.redb");
        let old = [
            event_of(1, "r", "2024-01-01T00:00:02Z"),
            event_of(2, "r", "2024-01-01T00:00:01Z"),
            event_of(3, "q", "2024-01-01T00:00:03Z"),
        ];
        {
            // The layout before batch records (and before the occurred index): one `events`
            // entry per sequence, every id in `event_ids`, keyed by the id itself (before
            // `ids_key`): opening re-keys it, which the lookups and duplicates below need.
            let db = Database::create(&path).expect("creates");
            let txn = db.begin_write().expect("txn");
            {
                let mut legacy = txn.open_table(LEGACY_EVENTS).expect("table");
                let mut ids = txn.open_table(EVENT_IDS).expect("table");
                for (seq, event) in (1u64..).zip(&old) {
                    let bytes = serde_json::to_vec(event).expect("encodes");
                    legacy.insert(seq, bytes.as_slice()).expect("insert");
                    ids.insert(event.id.as_u128(), seq).expect("insert");
                }
            }
            txn.commit().expect("commit");
        }
        let store = Store::open(&path).expect("reopens");
        assert_eq!(store.last_seq().expect("last"), 3);
        assert_eq!(store.event_count().expect("count"), 3);
        let page = store
            .query(&EventQuery::default(), 10, None, 1000)
            .expect("query");
        assert_eq!(ids(&page), [3, 1, 2]);
        let got = store.get_event(Uuid::from_u128(2)).expect("get");
        assert_eq!(got.map(|e| e.id), Some(Uuid::from_u128(2)));
        // A redelivery of an old id is still a duplicate; a new event goes on from sequence 4.
        let appended = store
            .append(&[
                event_of(2, "r", "2024-01-01T00:00:01Z"),
                event_of(4, "r", "2024-01-01T00:00:04Z"),
            ])
            .expect("append");
        assert_eq!(appended, [Appended::Duplicate, Appended::New(4)]);
        drop(store);
        // Reopening does not migrate again.
        let store = Store::open(&path).expect("reopens");
        let after: Vec<u64> = store
            .events_after(0, 10)
            .expect("read")
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(after, [1, 2, 3, 4]);
        // Every event was received in 2024: pruning removes their index entries too.
        assert_eq!(store.prune(Utc::now(), 10).expect("prune"), 4);
        assert_eq!(store.event_count().expect("count"), 0);
        assert!(store.get_event(Uuid::from_u128(4)).expect("get").is_none());
    }

    #[test]
    fn batches_span_several_records_and_pruning_can_split_one() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let count = MAX_EVENTS_PER_RECORD as u128 * 2 + 10;
        let mut events: Vec<Event> = (1..=count)
            .map(|i| event_of(i, "r", "2024-01-01T00:00:00Z"))
            .collect();
        // The first 300 were received long ago, the rest now: retention keeps the rest.
        for (i, event) in events.iter_mut().enumerate() {
            if i >= 300 {
                event.received = Utc::now();
            }
        }
        let appended = store.append(&events).expect("append");
        assert!(
            appended
                .iter()
                .enumerate()
                .all(|(i, a)| *a == Appended::New(i as u64 + 1))
        );
        for i in [1, 256, 257, 512, 513, count] {
            let got = store.get_event(Uuid::from_u128(i)).expect("get");
            assert_eq!(got.map(|e| e.id.as_u128()), Some(i), "event {i}");
        }
        let after: Vec<u64> = store
            .events_after(255, 3)
            .expect("read")
            .into_iter()
            .map(|(seq, _)| seq)
            .collect();
        assert_eq!(after, [256, 257, 258]);
        // A bounded prune stops inside the first record; the next one goes on from there.
        let cutoff = Utc::now() - chrono::TimeDelta::days(1);
        assert_eq!(store.prune(cutoff, 100).expect("prune"), 100);
        assert_eq!(store.prune(cutoff, 1000).expect("prune"), 200);
        assert_eq!(store.event_count().expect("count"), count as u64 - 300);
        assert!(
            store
                .get_event(Uuid::from_u128(300))
                .expect("get")
                .is_none()
        );
        let first_left = store.events_after(0, 1).expect("read");
        assert_eq!(first_left[0].0, 301);
        assert_eq!(first_left[0].1.id.as_u128(), 301);
        // Appending goes on after the last record.
        let more = store
            .append(&[event_of(count + 1, "r", "2024-01-01T00:00:00Z")])
            .expect("append");
        assert_eq!(more, [Appended::New(count as u64 + 1)]);
    }

    #[test]
    fn a_backlog_longer_than_the_scan_is_found_whole() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let firings: Vec<(Uuid, Value)> = (1..=500u128)
            .map(|n| (Uuid::from_u128(n), json!({"id": Uuid::from_u128(n)})))
            .collect();
        store.record_firings(&firings).expect("record");
        // The oldest 100 were dispatched, then the daemon died with 400 in its backlog.
        let done: Vec<Uuid> = firings[..100].iter().map(|(id, _)| *id).collect();
        store.mark_dispatched(&done).expect("mark");
        let left = store.undispatched_firings(50).expect("scan");
        assert_eq!(
            left.len(),
            400,
            "every undispatched firing, not just the newest 50"
        );
        assert_eq!(left[0], json!({"id": Uuid::from_u128(101)}), "oldest first");
    }

    #[test]
    fn undispatched_firings_are_found_until_marked() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let (a, b) = (Uuid::from_u128(1), Uuid::from_u128(2));
        store
            .record_firings(&[(a, json!({"id": a})), (b, json!({"id": b}))])
            .expect("record");
        assert_eq!(store.undispatched_firings(10).expect("scan").len(), 2);
        store.mark_dispatched(&[a]).expect("mark");
        let left = store.undispatched_firings(10).expect("scan");
        assert_eq!(left, vec![json!({"id": b})]);
        let e = event(9, "x", "2024-01-01T00:00:00Z");
        store.append(std::slice::from_ref(&e)).expect("append");
        assert_eq!(
            store.get_event(e.id).expect("read").map(|x| x.id),
            Some(e.id)
        );
        assert!(
            store
                .get_event(Uuid::from_u128(77))
                .expect("read")
                .is_none()
        );
    }

    #[test]
    fn firings_are_recorded_once_and_prune_respects_retention() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let id = Uuid::from_u128(7);
        assert_eq!(
            store
                .record_firings(&[(id, json!({"n": 1}))])
                .expect("record"),
            [true]
        );
        assert_eq!(
            store
                .record_firings(&[(id, json!({"n": 1}))])
                .expect("record"),
            [false]
        );
        assert_eq!(store.recent_firings(10).expect("read").len(), 1);
        store
            .append(&[
                event(1, "a", "2024-01-01T00:00:00Z"),
                event(2, "a", "2024-01-02T00:00:00Z"),
            ])
            .expect("append");
        let cutoff: DateTime<Utc> = "2024-01-01T12:00:00Z".parse().expect("valid");
        assert_eq!(store.prune(cutoff, 100).expect("prune"), 1);
        assert_eq!(store.event_count().expect("count"), 1);
        // A pruned id may be appended again (it is outside the retention window).
        assert_eq!(
            store
                .append(&[event(1, "a", "2024-01-03T00:00:00Z")])
                .expect("append"),
            [Appended::New(3)]
        );
    }

    #[test]
    fn explanations_follow_their_event_and_none_clears_an_earlier_record() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("s.redb")).expect("opens");
        let (held, plain) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let mut writer = store.writer().expect("writer");
        writer
            .append(&[
                event(1, "a", "2024-01-01T00:00:00Z"),
                event(2, "a", "2024-01-01T00:00:01Z"),
            ])
            .expect("append");
        writer
            .put_explanations(&[
                (held, Some(br#"{"fate":{"kind":"held"}}"#.to_vec())),
                (plain, None),
                // Not in the log: ignored rather than stored under no sequence.
                (
                    Uuid::from_u128(99),
                    Some(br#"{"fate":{"kind":"evaluated"}}"#.to_vec()),
                ),
            ])
            .expect("explain");
        writer.commit().expect("commit");
        assert_eq!(
            store.get_explanation(held).expect("read"),
            Some(json!({"fate": {"kind": "held"}}))
        );
        assert_eq!(store.get_explanation(plain).expect("read"), None);
        assert_eq!(
            store.get_explanation(Uuid::from_u128(99)).expect("read"),
            None
        );
        // Released later and considered by no trigger: the "held" record goes away.
        let writer = store.writer().expect("writer");
        writer.put_explanations(&[(held, None)]).expect("explain");
        writer.commit().expect("commit");
        assert_eq!(store.get_explanation(held).expect("read"), None);
        // Pruning removes an event's explanation with it.
        let writer = store.writer().expect("writer");
        writer
            .put_explanations(&[(plain, Some(br#"{"decisions":[]}"#.to_vec()))])
            .expect("explain");
        writer.commit().expect("commit");
        let cutoff: DateTime<Utc> = "2025-01-01T00:00:00Z".parse().expect("valid");
        assert_eq!(store.prune(cutoff, 100).expect("prune"), 2);
        assert_eq!(store.get_explanation(plain).expect("read"), None);
    }

    /// Expected parts are what Prefect 3.8.8's `parse_text_search_query` returned.
    #[test]
    fn text_queries_parse_like_prefect() {
        let parts = |q: &str| {
            let t = TextQuery::parse(q);
            (t.include, t.exclude, t.required)
        };
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            parts("error -debug"),
            (v(&["error"]), v(&["debug"]), v(&[]))
        );
        assert_eq!(
            parts(r#""connection timeout""#),
            (v(&["connection timeout"]), v(&[]), v(&[]))
        );
        assert_eq!(
            parts("+required -excluded"),
            (v(&[]), v(&["excluded"]), v(&["required"]))
        );
        assert_eq!(parts("- x"), (v(&["x"]), v(&[]), v(&[])));
        assert_eq!(
            parts(r#"!a "b \"c\"""#),
            (v(&[r#"b "c""#]), v(&["a"]), v(&[]))
        );
        assert_eq!(parts(r#"a"b c""#), (v(&["a", "b c"]), v(&[]), v(&[])));
        assert_eq!(parts("  "), (v(&[]), v(&[]), v(&[])));
        assert_eq!(
            parts(r#""unclosed phrase"#),
            (v(&["unclosed phrase"]), v(&[]), v(&[]))
        );
    }

    /// Every read path of a fresh store, and of a file holding none of the store's tables,
    /// answers "nothing" instead of failing on a missing table.
    #[test]
    fn a_fresh_store_reads_as_empty_on_every_path() {
        let dir = tempfile::tempdir().expect("temp dir");
        let bare = dir.path().join("bare.redb");
        // A database file without any of the tables (as a crash before the first commit
        // would leave it).
        drop(Database::create(&bare).expect("bare database"));
        for path in [dir.path().join("fresh.redb"), bare] {
            let store = Store::open(&path).expect("opens");
            let page = store
                .query(&EventQuery::default(), 50, None, 1000)
                .expect("query");
            assert!(page.events.is_empty() && page.total == 0 && page.next.is_none());
            assert_eq!(store.event_count().expect("count"), 0);
            assert_eq!(store.last_seq().expect("seq"), 0);
            assert!(store.events_after(0, 10).expect("events").is_empty());
            assert!(store.recent_firings(10).expect("firings").is_empty());
            assert!(
                store
                    .undispatched_firings(10)
                    .expect("leftovers")
                    .is_empty()
            );
            assert!(store.list_runs(10).expect("runs").is_empty());
            assert!(store.get_run(Uuid::nil()).expect("run").is_none());
            assert!(store.webhooks().expect("webhooks").is_empty());
            assert!(store.failed_actions().expect("failed").is_empty());
            assert!(store.get_event(Uuid::nil()).expect("event").is_none());
            assert!(
                store
                    .get_explanation(Uuid::nil())
                    .expect("explain")
                    .is_none()
            );
            assert!(store.load_checkpoint().expect("checkpoint").is_none());
            assert!(store.get_setting("x").expect("setting").is_none());
            assert_eq!(store.prune(Utc::now(), 10).expect("prune"), 0);
        }
    }

    /// The prepared matcher answers exactly what matching each list item in turn answers.
    #[test]
    fn prepared_matching_agrees_with_item_by_item_matching() {
        let names = [
            "flow-run.completed",
            "flow-run.failed",
            "task-run.x",
            "",
            "f",
        ];
        let prefix_lists: [&[&str]; 6] = [
            &["flow"],
            &["flow-run.", "flow-run.c", "task"],
            &["", "zzz"],
            &["flow-run.d", "flow-run.f"],
            &["a", "b", "c"],
            &["flow-run.completed", "flow-run.completedx"],
        ];
        let v = |items: &[&str]| items.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        for (i, name) in names.iter().enumerate() {
            let e = event_with(i as u128 + 1, name, "r.x", "2024-01-01T00:00:00Z");
            for prefixes in prefix_lists {
                let naive = prefixes.iter().any(|p| name.starts_with(p));
                let included = EventQuery {
                    name_prefixes: v(prefixes),
                    ..EventQuery::default()
                };
                assert_eq!(included.matches(&e), naive, "{name:?} {prefixes:?}");
                let excluded = EventQuery {
                    excluded_prefixes: v(prefixes),
                    ..EventQuery::default()
                };
                assert_eq!(excluded.matches(&e), !naive, "{name:?} not {prefixes:?}");
                let exact = EventQuery {
                    names: v(prefixes),
                    resource_prefixes: v(&["r."]),
                    ..EventQuery::default()
                };
                assert_eq!(exact.matches(&e), prefixes.contains(name));
            }
        }
    }

    /// A query with 100 000 prefixes and ids over many events takes about as long as one
    /// with a few (it took 32 s over 110 k events when each prefix was tried in turn).
    #[test]
    fn long_filter_lists_stay_cheap() {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(&dir.path().join("spur.redb")).expect("opens");
        let events: Vec<Event> = (1..=5_000u128)
            .map(|i| event(i, &format!("app.event.{}", i % 97), "2024-01-01T00:00:00Z"))
            .collect();
        store.append(&events).expect("append");
        let q = EventQuery {
            name_prefixes: (0..100_000).map(|i| format!("other.{i}.")).collect(),
            resource_ids: (0..100_000).map(|i| format!("r.{i}")).collect(),
            ..EventQuery::default()
        };
        let started = std::time::Instant::now();
        let page = store.query(&q, 50, None, 200_000).expect("query");
        assert_eq!(page.total, 0);
        let mut q = q;
        q.name_prefixes.push("app.event.1".into());
        let page = store.query(&q, 50, None, 200_000).expect("query");
        assert_eq!(
            page.total,
            events
                .iter()
                .filter(|e| e.event.starts_with("app.event.1"))
                .count()
        );
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );
    }
}
