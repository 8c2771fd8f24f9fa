//! Event queries: Prefect's `EventFilter` ([`EventQuery`]), compiled once per query into a
//! [`QueryMatcher`], and [`Store::query`], which pages through the `occurred` index.

use chrono::{DateTime, Utc};
use redb::ReadableDatabase;
use serde::{Deserialize, Serialize};
use spur_core::Event;
use spur_core::trigger::ResourceSpecification;
use uuid::Uuid;

use crate::records::RecordCache;
use crate::{
    EVENTS_BY_OCCURRED, LOG, Store, StoreError, decode_event, occurred_key, split_occurred_key,
};

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

impl Store {
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
}
