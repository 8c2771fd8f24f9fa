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

mod records;
mod runs;
mod tokens;

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use chrono::{DateTime, Utc};
use redb::{Database, ReadableDatabase, ReadableTable, ReadableTableMetadata, TableDefinition};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use spur_core::Event;
use spur_core::trigger::ResourceSpecification;
use spur_matcher::EngineSnapshot;
use thiserror::Error;
use uuid::Uuid;

use records::{LogRecord, RecordCache, encode_record};
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
    /// The engine state.
    pub snapshot: EngineSnapshot,
}

/// Which events a query returns: Prefect's `EventFilter`. Empty lists mean "any"; every
/// part given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EventQuery {
    /// `occurred` at or after.
    pub since: Option<DateTime<Utc>>,
    /// `occurred` at or before.
    pub until: Option<DateTime<Utc>>,
    /// Event names (exact) — any of them.
    pub names: Vec<String>,
    /// Event-name prefixes — any of them.
    pub name_prefixes: Vec<String>,
    /// Event names left out.
    pub excluded_names: Vec<String>,
    /// Event-name prefixes left out.
    pub excluded_prefixes: Vec<String>,
    /// Primary resource ids (exact) — any of them.
    pub resource_ids: Vec<String>,
    /// Primary resource id prefixes — any of them.
    pub resource_prefixes: Vec<String>,
    /// Labels the primary resource must match.
    pub resource_labels: ResourceSpecification,
    /// Related resource ids (exact) — some related resource is one of them.
    pub related_ids: Vec<String>,
    /// Each must be satisfied by some related resource.
    pub related: Vec<RelatedFilter>,
    /// Each must be satisfied by the primary or some related resource.
    pub any_resource: Vec<AnyResourceFilter>,
    /// Event ids — any of them.
    pub ids: Vec<Uuid>,
    /// Prefect's text search.
    pub text: Option<TextQuery>,
    /// The order results come in, by `occurred`.
    pub order: EventOrder,
    /// Only the first event (in `order`) of each primary resource: Prefect's
    /// `resource.distinct`.
    pub distinct_resources: bool,
}

/// The order of query results: by `occurred`, ties by arrival.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventOrder {
    /// Newest first (Prefect's default).
    #[default]
    Descending,
    /// Oldest first.
    Ascending,
}

/// Where a query page ended: the next page starts after this position. It names an index
/// entry, not an offset, so events arriving between page requests neither repeat nor skip
/// entries of the pages still to come.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PagePosition {
    /// The event's `occurred`, in µs since the epoch.
    pub occurred_micros: i64,
    /// Its log sequence.
    pub seq: u64,
    /// How many events matched up to and including it (so later pages report the same
    /// `total`).
    pub passed: usize,
}

/// One of Prefect's `EventRelatedFilter`s: some related resource satisfies every part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RelatedFilter {
    /// Its id is one of these.
    pub ids: Vec<String>,
    /// Its role is one of these.
    pub roles: Vec<String>,
    /// Its (id, role) is one of these.
    pub resources_in_roles: Vec<(String, String)>,
    /// It matches these labels.
    pub labels: ResourceSpecification,
}

/// One of Prefect's `EventAnyResourceFilter`s: the primary or some related resource
/// satisfies every part.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AnyResourceFilter {
    /// Its id is one of these.
    pub ids: Vec<String>,
    /// Its id starts with one of these.
    pub id_prefixes: Vec<String>,
    /// It matches these labels.
    pub labels: ResourceSpecification,
}

/// Prefect's text search (`EventTextFilter`): terms are matched, case-insensitively, as
/// substrings of the event name, the values of its resource and related resources, and its
/// payload. Plain terms: any of them (OR); `-term`/`!term`: none of them; `+term`: all of
/// them; `"quoted phrases"` are one term.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TextQuery {
    /// Any of these.
    pub include: Vec<String>,
    /// None of these.
    pub exclude: Vec<String>,
    /// All of these.
    pub required: Vec<String>,
}

impl TextQuery {
    /// Parses a query the way Prefect's `parse_text_search_query` does.
    pub fn parse(query: &str) -> TextQuery {
        let mut out = TextQuery::default();
        let chars: Vec<char> = query.chars().collect();
        let mut i = 0;
        while i < chars.len() {
            if chars[i].is_whitespace() {
                i += 1;
                continue;
            }
            let mut prefix = None;
            if matches!(chars[i], '-' | '!' | '+') {
                // A prefix only counts when a term follows at once.
                if i + 1 < chars.len() && !chars[i + 1].is_whitespace() {
                    prefix = Some(chars[i]);
                    i += 1;
                } else {
                    i += 1;
                    continue;
                }
            }
            let term = if chars[i] == '"' {
                i += 1;
                let mut phrase = String::new();
                while i < chars.len() && chars[i] != '"' {
                    if chars[i] == '\\' && i + 1 < chars.len() && matches!(chars[i + 1], '"' | '\\')
                    {
                        phrase.push(chars[i + 1]);
                        i += 2;
                    } else {
                        phrase.push(chars[i]);
                        i += 1;
                    }
                }
                i += 1; // the closing quote, if any
                if phrase.trim().is_empty() {
                    continue;
                }
                phrase
            } else {
                let start = i;
                while i < chars.len() && !chars[i].is_whitespace() && chars[i] != '"' {
                    i += 1;
                }
                chars[start..i].iter().collect()
            };
            if term.is_empty() {
                continue;
            }
            match prefix {
                Some('-' | '!') => out.exclude.push(term),
                Some('+') => out.required.push(term),
                _ => out.include.push(term),
            }
        }
        out
    }

    fn matches(&self, event: &Event) -> bool {
        let mut text = event.event.clone();
        for resource in std::iter::once(&event.resource).chain(&event.related) {
            for (_, value) in resource.labels() {
                text.push(' ');
                text.push_str(value);
            }
        }
        text.push(' ');
        text.push_str(&event.payload.to_string());
        let text = text.to_lowercase();
        let found = |term: &String| text.contains(&term.to_lowercase());
        (self.include.is_empty() || self.include.iter().any(found))
            && !self.exclude.iter().any(found)
            && self.required.iter().all(found)
    }
}

impl EventQuery {
    /// Does `event` pass the filter? (For many events, prepare the query once with
    /// [`EventQuery::matcher`]: this builds the matcher for each call.)
    pub fn matches(&self, event: &Event) -> bool {
        self.matcher().matches(event)
    }

    /// The query prepared for matching many events: its cost per event does not grow with
    /// the length of its lists (see [`QueryMatcher`]).
    pub fn matcher(&self) -> QueryMatcher<'_> {
        QueryMatcher {
            query: self,
            names: AnyOf::new(&self.names),
            name_prefixes: Prefixes::new(&self.name_prefixes),
            excluded_names: AnyOf::new(&self.excluded_names),
            excluded_prefixes: Prefixes::new(&self.excluded_prefixes),
            resource_ids: AnyOf::new(&self.resource_ids),
            resource_prefixes: Prefixes::new(&self.resource_prefixes),
            related_ids: AnyOf::new(&self.related_ids),
            ids: self.ids.iter().copied().collect(),
            related: self
                .related
                .iter()
                .map(|f| RelatedMatcher {
                    ids: AnyOf::new(&f.ids),
                    roles: AnyOf::new(&f.roles),
                    resources_in_roles: f
                        .resources_in_roles
                        .iter()
                        .map(|(id, role)| (id.as_str(), role.as_str()))
                        .collect(),
                    labels: &f.labels,
                })
                .collect(),
            any_resource: self
                .any_resource
                .iter()
                .map(|f| AnyResourceMatcher {
                    ids: AnyOf::new(&f.ids),
                    id_prefixes: Prefixes::new(&f.id_prefixes),
                    labels: &f.labels,
                })
                .collect(),
        }
    }
}

/// An [`EventQuery`] prepared for matching: exact-value lists become hash sets and prefix
/// lists sorted, prefix-free lists searched by bisection, so a filter with thousands of
/// names or prefixes costs about as much per event as one with a single entry. (Matching
/// each list item in turn made a 100 000-entry `event.prefix` filter take 32 s over 110 k
/// events.) Label patterns are globs and stay a list; the API bounds their number.
#[derive(Debug)]
pub struct QueryMatcher<'q> {
    query: &'q EventQuery,
    names: AnyOf<'q>,
    name_prefixes: Prefixes<'q>,
    excluded_names: AnyOf<'q>,
    excluded_prefixes: Prefixes<'q>,
    resource_ids: AnyOf<'q>,
    resource_prefixes: Prefixes<'q>,
    related_ids: AnyOf<'q>,
    ids: std::collections::HashSet<Uuid>,
    related: Vec<RelatedMatcher<'q>>,
    any_resource: Vec<AnyResourceMatcher<'q>>,
}

/// A set of exact values.
#[derive(Debug)]
struct AnyOf<'q>(std::collections::HashSet<&'q str>);

impl<'q> AnyOf<'q> {
    fn new(list: &'q [String]) -> Self {
        AnyOf(list.iter().map(String::as_str).collect())
    }

    /// Empty means "any value".
    fn admits(&self, value: &str) -> bool {
        self.0.is_empty() || self.0.contains(value)
    }
}

/// Prefixes, sorted, with every entry that another entry is a prefix of left out. Then the
/// only entry that can be a prefix of a value is the greatest one not above it: an entry `p`
/// that is a prefix of `v` sorts at or below `v`, and an entry between them would either
/// start with `p` (and have been left out) or differ from `p`, and so from `v`, upwards.
#[derive(Debug)]
struct Prefixes<'q>(Vec<&'q str>);

impl<'q> Prefixes<'q> {
    fn new(list: &'q [String]) -> Self {
        let mut sorted: Vec<&str> = list.iter().map(String::as_str).collect();
        sorted.sort_unstable();
        let mut kept: Vec<&str> = Vec::with_capacity(sorted.len());
        for prefix in sorted {
            if kept.last().is_none_or(|last| !prefix.starts_with(last)) {
                kept.push(prefix);
            }
        }
        Prefixes(kept)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Does some entry start `value`?
    fn any_starts(&self, value: &str) -> bool {
        let at = self.0.partition_point(|p| *p <= value);
        at > 0 && value.starts_with(self.0[at - 1])
    }

    /// Empty means "any value".
    fn admits(&self, value: &str) -> bool {
        self.is_empty() || self.any_starts(value)
    }
}

#[derive(Debug)]
struct RelatedMatcher<'q> {
    ids: AnyOf<'q>,
    roles: AnyOf<'q>,
    resources_in_roles: std::collections::HashSet<(&'q str, &'q str)>,
    labels: &'q ResourceSpecification,
}

impl RelatedMatcher<'_> {
    fn accepts(&self, resource: &spur_core::Resource) -> bool {
        self.ids.admits(resource.id())
            && (self.roles.0.is_empty() || resource.role().is_some_and(|r| self.roles.admits(r)))
            && (self.resources_in_roles.is_empty()
                || resource
                    .role()
                    .is_some_and(|role| self.resources_in_roles.contains(&(resource.id(), role))))
            && self.labels.matches(resource)
    }
}

#[derive(Debug)]
struct AnyResourceMatcher<'q> {
    ids: AnyOf<'q>,
    id_prefixes: Prefixes<'q>,
    labels: &'q ResourceSpecification,
}

impl AnyResourceMatcher<'_> {
    fn accepts(&self, resource: &spur_core::Resource) -> bool {
        self.ids.admits(resource.id())
            && self.id_prefixes.admits(resource.id())
            && self.labels.matches(resource)
    }
}

impl QueryMatcher<'_> {
    /// Does `event` pass the filter?
    pub fn matches(&self, event: &Event) -> bool {
        let q = self.query;
        let name = event.event.as_str();
        let id = event.resource.id();
        q.since.is_none_or(|s| event.occurred >= s)
            && q.until.is_none_or(|u| event.occurred <= u)
            && self.names.admits(name)
            && self.name_prefixes.admits(name)
            && !self.excluded_names.0.contains(name)
            && !self.excluded_prefixes.any_starts(name)
            && self.resource_ids.admits(id)
            && self.resource_prefixes.admits(id)
            && q.resource_labels.matches(&event.resource)
            && (self.related_ids.0.is_empty()
                || event
                    .related
                    .iter()
                    .any(|r| self.related_ids.0.contains(r.id())))
            && self
                .related
                .iter()
                .all(|f| event.related.iter().any(|r| f.accepts(r)))
            && self.any_resource.iter().all(|f| {
                std::iter::once(&event.resource)
                    .chain(&event.related)
                    .any(|r| f.accepts(r))
            })
            && (self.ids.is_empty() || self.ids.contains(&event.id))
            && q.text.as_ref().is_none_or(|t| t.matches(event))
    }
}

/// One page of query results, in the query's order.
#[derive(Debug)]
pub struct EventPage {
    /// Matching events with their sequence.
    pub events: Vec<(u64, Event)>,
    /// How many events matched in total, on every page (bounded by the scan; with
    /// `distinct_resources`, how many resources).
    pub total: usize,
    /// Pass as `after` to get the next page; `None` on the last one.
    pub next: Option<PagePosition>,
}

/// The embedded store. Cheap to share behind an `Arc`; redb serialises writers.
pub struct Store {
    db: Database,
    /// The memory tier of the id index (see the crate docs).
    recent: Arc<RwLock<RecentIds>>,
}

/// Event id → log sequence. Hashed with foldhash, not the standard SipHash: every appended
/// event is looked up, inserted and later removed here on the pipeline thread, and SipHash
/// took ~10 % of the store append bench's instructions. foldhash is seeded per map, so ids
/// chosen by a client still cannot be aimed at one bucket without knowing the seed.
type IdMap = HashMap<u128, u64, foldhash::fast::RandomState>;

/// Ids appended to the log but not yet merged into `event_ids`: id → sequence; and a filter
/// over the ids that are in `event_ids`.
#[derive(Debug, Default)]
struct RecentIds {
    ids: SlicedIds,
    /// Which ids `event_ids` may hold (see [`IdFilter`]).
    merged: IdFilter,
    /// The key slice [`StoreWriter::merge_recent_slice`] merges next.
    next_slice: u32,
    /// Ids committed since the last slice merge.
    since_step: usize,
}

/// The memory tier's ids, kept per key slice ([`slice_of`]): merging one slice then reads
/// only that slice's ids, and the oldest id outside it is known without a scan. (With one
/// map, every slice merge walked all the tier's ids: ~1.3 k instructions per appended event.)
#[derive(Debug)]
struct SlicedIds {
    slices: Vec<IdMap>,
    /// Per slice, a sequence at or below that of every id in it (removals may leave it
    /// lower than needed, which only makes a merge mark more cautious).
    oldest: Vec<Option<u64>>,
    len: usize,
}

impl Default for SlicedIds {
    fn default() -> SlicedIds {
        SlicedIds {
            slices: (0..ID_SLICES).map(|_| IdMap::default()).collect(),
            oldest: vec![None; ID_SLICES as usize],
            len: 0,
        }
    }
}

impl SlicedIds {
    fn get(&self, id: u128) -> Option<u64> {
        self.slices[slice_of(id) as usize].get(&id).copied()
    }

    fn contains(&self, id: u128) -> bool {
        self.slices[slice_of(id) as usize].contains_key(&id)
    }

    fn insert(&mut self, id: u128, seq: u64) {
        let slice = slice_of(id) as usize;
        if self.slices[slice].insert(id, seq).is_none() {
            self.len += 1;
        }
        self.oldest[slice] = Some(self.oldest[slice].map_or(seq, |o| o.min(seq)));
    }

    fn remove(&mut self, id: u128) {
        let slice = slice_of(id) as usize;
        if self.slices[slice].remove(&id).is_some() {
            self.len -= 1;
            if self.slices[slice].is_empty() {
                self.oldest[slice] = None;
            }
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    /// The ids of one slice (all of them for `None`), and a sequence at or below every id
    /// left outside it.
    fn pending(&self, slice: Option<u32>) -> (Vec<(u128, u64)>, Option<u64>) {
        match slice {
            Some(slice) => {
                let pending = self.slices[slice as usize]
                    .iter()
                    .map(|(id, seq)| (*id, *seq))
                    .collect();
                let oldest_left = (0..ID_SLICES as usize)
                    .filter(|s| *s != slice as usize)
                    .filter_map(|s| self.oldest[s])
                    .min();
                (pending, oldest_left)
            }
            None => {
                let pending = self
                    .slices
                    .iter()
                    .flat_map(|ids| ids.iter().map(|(id, seq)| (*id, *seq)))
                    .collect();
                (pending, None)
            }
        }
    }
}

/// A Bloom filter over the ids in `event_ids`. Nearly every appended event is new, and
/// proving it took a B-tree lookup through cold pages (ids are random): ~8 % of the
/// pipeline thread's time. A "no" from the filter is certain and skips the lookup; a "maybe"
/// (every id present, ~0.5 % of absent ones) still looks. Pruned ids are not removed; they
/// only make "maybe" a little likelier until the filter is rebuilt when it fills up.
#[derive(Debug, Default)]
struct IdFilter {
    /// The bit array; empty means "not built": every answer is "maybe".
    bits: Vec<u64>,
    /// Ids inserted since it was built.
    inserted: usize,
}

impl IdFilter {
    /// Bits per id at capacity: with three probes, ~0.5 % false positives.
    const BITS_PER_ID: usize = 16;
    /// The smallest capacity, in ids (2 MiB of bits).
    const MIN_IDS: usize = 1 << 20;

    /// An empty filter with room for twice `ids` (at least [`IdFilter::MIN_IDS`]).
    fn with_room_for(ids: usize) -> IdFilter {
        let bits =
            (ids.saturating_mul(2).max(Self::MIN_IDS) * Self::BITS_PER_ID).next_power_of_two();
        IdFilter {
            bits: vec![0; bits / 64],
            inserted: 0,
        }
    }

    /// Three bit positions for `id`, by double hashing a mix of its two halves.
    fn probes(&self, id: u128) -> [usize; 3] {
        fn mix(mut x: u64) -> u64 {
            // splitmix64's finalizer.
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        }
        let h1 = mix(id as u64 ^ mix((id >> 64) as u64));
        let h2 = mix(h1) | 1;
        let mask = (self.bits.len() * 64 - 1) as u64;
        [0u64, 1, 2].map(|i| (h1.wrapping_add(i.wrapping_mul(h2)) & mask) as usize)
    }

    fn insert(&mut self, id: u128) {
        if self.bits.is_empty() {
            return;
        }
        for bit in self.probes(id) {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
        self.inserted += 1;
    }

    /// False only if `id` was never inserted.
    fn may_contain(&self, id: u128) -> bool {
        self.bits.is_empty()
            || self
                .probes(id)
                .iter()
                .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Past capacity (or never built): time to rebuild from the table.
    fn needs_rebuild(&self) -> bool {
        self.bits.is_empty() || self.inserted * Self::BITS_PER_ID > self.bits.len() * 64
    }

    /// A filter over every id in `table`.
    fn build(table: &impl ReadableTable<u128, u64>) -> Result<IdFilter, StoreError> {
        let mut filter = IdFilter::with_room_for(table.len()? as usize);
        for entry in table.iter()? {
            filter.insert(id_of_key(entry?.0.value()));
        }
        Ok(filter)
    }
}

/// The id index's memory tier is merged in this many key ranges, one at a time (by the top
/// bits of the id, so each range is a contiguous run of the table's pages).
///
/// Ids are random, so a merge rewrites most pages of its range: the bytes written per new
/// id are about (ids in the table) / (ids in a full turn, [`ID_SLICES`] × [`ID_MERGE_STEP`]).
/// A turn of ~262 000 ids keeps that low (at 64 slices it was a quarter as long, and merges
/// took ~9 % of the store bench's instructions; now ~1.6 %) for ~13 MB of memory tier.
pub const ID_SLICES: u32 = 256;

/// Merge one key slice per this many new ids: a full turn over the [`ID_SLICES`] slices then
/// takes ~262 000 ids, which bounds the memory tier (~50 bytes per id, ~13 MB) and the
/// start-up rebuild after a crash (the ids of the events since, read from the log).
pub const ID_MERGE_STEP: usize = 1024;

/// The `event_ids` key of an id: the id rotated right by 8 bits, so that its last byte leads.
///
/// Why: the table is merged one key range (slice) at a time, by the key's top bits. Random
/// `uuid4`s spread over every slice whatever bits lead, but time-ordered ids (UUIDv7, which
/// Prefect's clients send, and Spur's own events about firings) share their top bits for
/// decades: keyed as they are, they all fell into one slice, which then moved a whole turn's
/// worth of them at once (75 000 ids, a ~50 ms stall, at 30 % of the load driver's traffic).
/// The last byte is random in every UUID version, and behind it a v7 id keeps its time
/// order, so each slice of them still grows at its end.
fn ids_key(id: u128) -> u128 {
    id.rotate_right(8)
}

/// The id stored under an `event_ids` key (see [`ids_key`]).
fn id_of_key(key: u128) -> u128 {
    key.rotate_left(8)
}

/// `meta[IDS_KEYED]` is set once `event_ids` is keyed by [`ids_key`] (a store written
/// before keyed it by the id itself, and is re-keyed when opened).
const IDS_KEYED: &str = "event_ids_keyed_by_last_byte";

/// The key slice of an id: the top bits of its key.
fn slice_of(id: u128) -> u32 {
    (ids_key(id) >> (128 - ID_SLICES.trailing_zeros())) as u32
}

impl RecentIds {
    fn get(lock: &RwLock<RecentIds>, id: u128) -> Option<u64> {
        lock.read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .ids
            .get(id)
    }

    fn write(lock: &RwLock<RecentIds>) -> std::sync::RwLockWriteGuard<'_, RecentIds> {
        lock.write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The `meta` key naming a sequence up to which every id is in `event_ids`.
const IDS_MERGED_THROUGH: &str = "ids_merged_through";

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

impl Store {
    /// Opens (or creates) the database file at `path`; creates the parent folder.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Corrupt(format!("cannot create {}: {e}", parent.display()))
            })?;
        }
        let db = Database::create(path)?;
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

    /// Rebuilds the memory tier of the id index from the log entries after the last merge.
    fn load_recent_ids(&self) -> Result<(), StoreError> {
        /// Only the id of a stored event is read.
        #[derive(Deserialize)]
        struct IdOnly {
            id: Uuid,
        }
        let txn = self.db.begin_read()?;
        let merged = merged_through(&txn.open_table(META)?)?;
        let log = txn.open_table(LOG)?;
        let filter = IdFilter::build(&txn.open_table(EVENT_IDS)?)?;
        let mut recent = RecentIds::write(&self.recent);
        recent.merged = filter;
        records::for_each_after(&log, merged, |seq, bytes| {
            let IdOnly { id } = serde_json::from_slice(bytes).map_err(corrupt)?;
            recent.ids.insert(id.as_u128(), seq);
            Ok(true)
        })
    }

    /// How many ids wait in the memory tier of the id index.
    pub fn recent_id_count(&self) -> usize {
        self.recent
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .ids
            .len()
    }

    /// Merges the whole memory tier of the id index into `event_ids` (at shutdown, so the
    /// next start has little to rebuild); returns how many ids moved. The transaction is not
    /// synced on its own: it becomes durable with the next durable commit; if a crash loses
    /// it, the merge mark is lost with it and opening the store rebuilds the tier from the log.
    pub fn merge_recent_ids(&self) -> Result<usize, StoreError> {
        let mut txn = self.db.begin_write()?;
        txn.set_durability(redb::Durability::None)
            .map_err(|e| corrupt(format!("id index merge: {e}")))?;
        let merged = merge_into(&txn, &self.recent, None)?;
        txn.commit()?;
        let count = merged.len();
        forget_merged(&self.recent, &merged);
        Ok(count)
    }

    /// Ids committed since the last slice merge ([`StoreWriter::merge_recent_slice`]).
    pub fn ids_since_merge_step(&self) -> usize {
        self.recent
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .since_step
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

    /// Events matching `query` in its order (by `occurred`, ties by arrival), `limit` per
    /// page, starting after `after` (a previous page's [`EventPage::next`]). At most
    /// `scan_limit` index entries are examined per call; a page cut short by that limit still
    /// links to the next one.
    ///
    /// A page reads from its start position to the end of the range, counting what matches:
    /// with the matches before it, carried in the position, that makes `total` the same on
    /// every page, as Prefect's is. With `distinct_resources` every page walks the range from
    /// its beginning instead, so that a resource shown on page one is left out of page two.
    pub fn query(
        &self,
        query: &EventQuery,
        limit: usize,
        after: Option<PagePosition>,
        scan_limit: usize,
    ) -> Result<EventPage, StoreError> {
        use std::ops::Bound::{Excluded, Included};
        let txn = self.db.begin_read()?;
        let log = txn.open_table(LOG)?;
        let mut cache = RecordCache::new();
        let index = txn.open_table(EVENTS_BY_OCCURRED)?;
        let since = query.since.map_or(i64::MIN, |t| t.timestamp_micros());
        let until = query.until.map_or(i64::MAX, |t| t.timestamp_micros());
        let empty = EventPage {
            events: Vec::new(),
            total: after.map_or(0, |p| p.passed),
            next: None,
        };
        if since > until {
            return Ok(empty);
        }
        let mut lower = Included(occurred_key(since, 0));
        let mut upper = Included(occurred_key(until, u64::MAX));
        // Distinct queries restart from the beginning, skipping entries up to `skip_through`.
        let mut skip_through = None;
        let mut total = 0;
        if let Some(p) = after {
            let key = occurred_key(p.occurred_micros, p.seq);
            if query.distinct_resources {
                skip_through = Some(key);
            } else {
                total = p.passed;
                match query.order {
                    EventOrder::Descending if key <= occurred_key(since, 0) => return Ok(empty),
                    EventOrder::Descending => upper = Excluded(key),
                    EventOrder::Ascending if key >= occurred_key(until, u64::MAX) => {
                        return Ok(empty);
                    }
                    EventOrder::Ascending => lower = Excluded(key),
                }
            }
        }
        let range = index.range::<u128>((lower, upper))?;
        let entries: Box<dyn Iterator<Item = _>> = match query.order {
            EventOrder::Descending => Box::new(range.rev()),
            EventOrder::Ascending => Box::new(range),
        };
        let matcher = query.matcher();
        let mut seen_resources = std::collections::HashSet::new();
        let mut events = Vec::new();
        let mut next = None;
        let mut last_key = None;
        let mut scanned = 0;
        for entry in entries {
            if scanned == scan_limit {
                // Cut short: the next page goes on from the last entry examined.
                if next.is_none()
                    && !query.distinct_resources
                    && let Some((occurred_micros, seq)) = last_key
                {
                    next = Some(PagePosition {
                        occurred_micros,
                        seq,
                        passed: total,
                    });
                }
                break;
            }
            scanned += 1;
            let (key, _) = entry?;
            let key = key.value();
            let (occurred, seq) = split_occurred_key(key);
            last_key = Some((occurred, seq));
            let Some(bytes) = cache.get(&log, seq)? else {
                return Err(StoreError::Corrupt(format!(
                    "the occurred index names sequence {seq}, which the log does not hold"
                )));
            };
            let event = decode_event(bytes)?;
            if !matcher.matches(&event)
                || (query.distinct_resources
                    && !seen_resources.insert(event.resource.id().to_owned()))
            {
                continue;
            }
            total += 1;
            if let Some(cursor) = skip_through {
                let shown = match query.order {
                    EventOrder::Descending => key >= cursor,
                    EventOrder::Ascending => key <= cursor,
                };
                if shown {
                    continue;
                }
            }
            if events.len() < limit {
                events.push((seq, event));
                if events.len() == limit {
                    // Where the next page starts, should another match follow.
                    next = Some(PagePosition {
                        occurred_micros: occurred,
                        seq,
                        passed: total,
                    });
                }
            }
        }
        // A full page is the last one if nothing matched after it.
        if let Some(p) = next
            && events.len() == limit
            && total == p.passed
            && scanned < scan_limit
        {
            next = None;
        }
        Ok(EventPage {
            events,
            total,
            next,
        })
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

/// Keys `event_ids` by [`ids_key`] if a store written before did not (once; see
/// [`IDS_KEYED`]). A new store's empty table just gets the mark.
fn rekey_event_ids(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
    let mut meta = txn.open_table(META)?;
    if meta.get(IDS_KEYED)?.is_some() {
        return Ok(());
    }
    let mut ids = txn.open_table(EVENT_IDS)?;
    let entries: Vec<(u128, u64)> = ids
        .iter()?
        .map(|entry| entry.map(|(id, seq)| (id.value(), seq.value())))
        .collect::<Result<_, _>>()?;
    ids.retain(|_, _| false)?;
    let mut rekeyed: Vec<(u128, u64)> = entries
        .into_iter()
        .map(|(id, seq)| (ids_key(id), seq))
        .collect();
    rekeyed.sort_unstable();
    for (key, seq) in rekeyed {
        ids.insert(key, seq)?;
    }
    meta.insert(IDS_KEYED, [1u8].as_slice())?;
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

    /// Stores why each candidate trigger did (not) react to an event already in the log.
    /// `None` records that no trigger considered it, which is stored as no record at all
    /// (most events in a busy log; an earlier record, e.g. "held", is removed).
    pub fn put_explanations(
        &self,
        explanations: &[(Uuid, Option<Value>)],
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
                Some(value) => {
                    let bytes = serde_json::to_vec(value).map_err(corrupt)?;
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

/// Inserts the memory-tier ids of one key slice (all of them for `None`) into `event_ids`
/// in id order, within `txn`, and moves the merge mark; returns the merged ids, which leave
/// the memory tier once `txn` commits ([`forget_merged`]).
fn merge_into(
    txn: &redb::WriteTransaction,
    recent: &RwLock<RecentIds>,
    slice: Option<u32>,
) -> Result<Vec<u128>, StoreError> {
    let (mut pending, oldest_left) = recent
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .ids
        .pending(slice);
    if pending.is_empty() {
        return Ok(Vec::new());
    }
    // In key order: each slice is a contiguous run of the table.
    pending.sort_unstable_by_key(|(id, _)| ids_key(*id));
    // Every id below the oldest one left in memory is in the table after this merge.
    let through = match oldest_left {
        Some(oldest) => oldest - 1,
        None => pending.iter().map(|(_, seq)| *seq).max().unwrap_or(0),
    };
    let mut ids = txn.open_table(EVENT_IDS)?;
    for (id, seq) in &pending {
        ids.insert(ids_key(*id), seq)?;
    }
    {
        // The filter may answer "maybe" for ids of a merge that then fails: harmless.
        let mut tiers = RecentIds::write(recent);
        for (id, _) in &pending {
            tiers.merged.insert(*id);
        }
        if tiers.merged.needs_rebuild() {
            tiers.merged = IdFilter::build(&ids)?;
        }
    }
    let mut meta = txn.open_table(META)?;
    let before = merged_through(&meta)?;
    meta.insert(
        IDS_MERGED_THROUGH,
        through.max(before).to_be_bytes().as_slice(),
    )?;
    Ok(pending.into_iter().map(|(id, _)| id).collect())
}

/// Drops committed merged ids from the memory tier. Readers look in memory first and take
/// their snapshot after ([`Store::find`]), so an id is never missing from both in between.
fn forget_merged(recent: &RwLock<RecentIds>, merged: &[u128]) {
    if merged.is_empty() {
        return;
    }
    let mut recent = RecentIds::write(recent);
    for id in merged {
        recent.ids.remove(*id);
    }
}

/// `meta["ids_merged_through"]`: a sequence up to which every id is in `event_ids`.
fn merged_through(
    meta: &impl ReadableTable<&'static str, &'static [u8]>,
) -> Result<u64, StoreError> {
    match meta.get(IDS_MERGED_THROUGH)? {
        Some(v) => {
            let bytes: [u8; 8] = v
                .value()
                .try_into()
                .map_err(|_| corrupt("ids_merged_through is not 8 bytes"))?;
            Ok(u64::from_be_bytes(bytes))
        }
        None => Ok(0),
    }
}

fn decode_event(bytes: &[u8]) -> Result<Event, StoreError> {
    let value: Value = serde_json::from_slice(bytes).map_err(corrupt)?;
    Event::from_stored_value(value).map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
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
                (held, Some(json!({"fate": {"kind": "held"}}))),
                (plain, None),
                // Not in the log: ignored rather than stored under no sequence.
                (
                    Uuid::from_u128(99),
                    Some(json!({"fate": {"kind": "evaluated"}})),
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
            .put_explanations(&[(plain, Some(json!({"decisions": []})))])
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
