//! The event log's on-disk layout: batch records.
//!
//! Each appended batch of events is stored as one record (at most [`MAX_EVENTS_PER_RECORD`]
//! events; a larger batch makes several), keyed by the sequence of its first event. The
//! events of a record have consecutive sequences, so event `seq` lives in the record with the
//! greatest key `<= seq`, at index `seq - key`.
//!
//! **Why records, not one entry per event.** redb pays a B-tree insert per entry (3–7 k
//! instructions: a descent, a leaf rebuilt, checksums), and the pipeline appends every event
//! it ingests. One insert per batch turns that into a `memcpy` of the encoded events. Readers
//! pay instead: a lookup by sequence decodes a record's header to find one event, which is
//! why records are capped in size — reading one event by id should not load megabytes.
//!
//! Layout of a record (all integers little-endian `u32`):
//!
//! ```text
//! count | end[0] | end[1] | … | end[count-1] | event 0 JSON | event 1 JSON | …
//! ```
//!
//! where `end[i]` is the offset, within the JSON part, just past event `i`.

use redb::{AccessGuard, ReadableTable};

use crate::StoreError;

/// The most events one record holds: a 4 096-event batch is 16 inserts, not 4 096, and a
/// lookup by sequence reads at most this many events' bytes (~100 kB of typical events).
pub(crate) const MAX_EVENTS_PER_RECORD: usize = 256;

/// A record's bytes, decoded just enough to find each event's JSON.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogRecord<'a> {
    ends: &'a [u8],
    body: &'a [u8],
}

impl<'a> LogRecord<'a> {
    /// Checks a record's header; the events themselves are decoded on demand.
    pub(crate) fn parse(bytes: &'a [u8]) -> Result<LogRecord<'a>, StoreError> {
        let corrupt = |why: &str| StoreError::Corrupt(format!("event log record: {why}"));
        let count = bytes
            .get(..4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize)
            .ok_or_else(|| corrupt("shorter than its header"))?;
        let header = 4 + 4 * count;
        if bytes.len() < header {
            return Err(corrupt("shorter than its offsets"));
        }
        let record = LogRecord {
            ends: &bytes[4..header],
            body: &bytes[header..],
        };
        if count > 0 && record.end(count - 1) != record.body.len() {
            return Err(corrupt("offsets do not match its length"));
        }
        Ok(record)
    }

    /// How many events the record holds.
    pub(crate) fn len(&self) -> usize {
        self.ends.len() / 4
    }

    fn end(&self, index: usize) -> usize {
        let b = &self.ends[index * 4..index * 4 + 4];
        u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize
    }

    /// The stored JSON of event `index` (0-based within the record).
    pub(crate) fn get(&self, index: usize) -> Result<Option<&'a [u8]>, StoreError> {
        if index >= self.len() {
            return Ok(None);
        }
        let start = if index == 0 { 0 } else { self.end(index - 1) };
        let end = self.end(index);
        self.body
            .get(start..end)
            .map(Some)
            .ok_or_else(|| StoreError::Corrupt("event log record: offsets out of order".into()))
    }

    /// Each event's stored JSON, in order.
    pub(crate) fn events(self) -> impl Iterator<Item = Result<&'a [u8], StoreError>> {
        (0..self.len()).map(move |i| {
            self.get(i).and_then(|e| {
                e.ok_or_else(|| StoreError::Corrupt("event log record: too short".into()))
            })
        })
    }
}

/// Encodes events (their stored JSON) as one record.
pub(crate) fn encode_record<'e>(
    events: impl ExactSizeIterator<Item = &'e [u8]> + Clone,
) -> Vec<u8> {
    let count = events.len();
    let body: usize = events.clone().map(<[u8]>::len).sum();
    let mut out = Vec::with_capacity(4 + 4 * count + body);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    let mut end = 0usize;
    for event in events.clone() {
        end += event.len();
        out.extend_from_slice(&(end as u32).to_le_bytes());
    }
    for event in events {
        out.extend_from_slice(event);
    }
    out
}

/// Writes events with consecutive sequences from `first` as records of at most
/// [`MAX_EVENTS_PER_RECORD`] events.
pub(crate) fn insert_run(
    log: &mut redb::Table<u64, &'static [u8]>,
    first: u64,
    events: &[&[u8]],
) -> Result<(), StoreError> {
    for (index, chunk) in events.chunks(MAX_EVENTS_PER_RECORD).enumerate() {
        let record = encode_record(chunk.iter().copied());
        log.insert(
            first + (index * MAX_EVENTS_PER_RECORD) as u64,
            record.as_slice(),
        )?;
    }
    Ok(())
}

/// The sequence after the last event in the log (1 for an empty log).
pub(crate) fn next_seq(log: &impl ReadableTable<u64, &'static [u8]>) -> Result<u64, StoreError> {
    match log.last()? {
        Some((first, bytes)) => Ok(first.value() + LogRecord::parse(bytes.value())?.len() as u64),
        None => Ok(1),
    }
}

/// The key of the record holding `seq`: the greatest key `<= seq` (`None` before the log's
/// first record). The record may end before `seq`, when `seq` is past the log's end.
fn record_key_for(
    log: &impl ReadableTable<u64, &'static [u8]>,
    seq: u64,
) -> Result<Option<u64>, StoreError> {
    match log.range(..=seq)?.next_back() {
        Some(entry) => Ok(Some(entry?.0.value())),
        None => Ok(None),
    }
}

/// Remembers the last record read, so that lookups of nearby sequences (a query walking the
/// occurred index mostly moves within one record) skip the B-tree.
pub(crate) struct RecordCache<'t> {
    held: Option<(u64, AccessGuard<'t, &'static [u8]>)>,
}

impl<'t> RecordCache<'t> {
    /// An empty cache.
    pub(crate) fn new() -> RecordCache<'t> {
        RecordCache { held: None }
    }

    /// The stored JSON of event `seq`, if the log holds it.
    pub(crate) fn get<'c>(
        &'c mut self,
        log: &'t impl ReadableTable<u64, &'static [u8]>,
        seq: u64,
    ) -> Result<Option<&'c [u8]>, StoreError> {
        let hit = match &self.held {
            Some((first, bytes)) => {
                *first <= seq && seq - first < LogRecord::parse(bytes.value())?.len() as u64
            }
            None => false,
        };
        if !hit {
            self.held = None;
            let Some(key) = record_key_for(log, seq)? else {
                return Ok(None);
            };
            let Some(bytes) = log.get(key)? else {
                return Ok(None);
            };
            self.held = Some((key, bytes));
        }
        let Some((first, bytes)) = &self.held else {
            return Ok(None);
        };
        LogRecord::parse(bytes.value())?.get((seq - first) as usize)
    }
}

/// Calls `each(seq, stored JSON)` for the events after sequence `after`, in order, until it
/// returns `false` or the log ends.
pub(crate) fn for_each_after(
    log: &impl ReadableTable<u64, &'static [u8]>,
    after: u64,
    mut each: impl FnMut(u64, &[u8]) -> Result<bool, StoreError>,
) -> Result<(), StoreError> {
    let start = record_key_for(log, after + 1)?.unwrap_or(after + 1);
    for entry in log.range(start..)? {
        let (first, bytes) = entry?;
        let first = first.value();
        for (index, event) in LogRecord::parse(bytes.value())?.events().enumerate() {
            let seq = first + index as u64;
            if seq > after && !each(seq, event?)? {
                return Ok(());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_their_events_and_refuse_bad_headers() {
        let events: [&[u8]; 3] = [b"{\"a\":1}", b"", b"{\"b\":22}"];
        let bytes = encode_record(events.iter().copied());
        let record = LogRecord::parse(&bytes).expect("parses");
        assert_eq!(record.len(), 3);
        for (i, event) in events.iter().enumerate() {
            assert_eq!(record.get(i).expect("in range"), Some(*event));
        }
        assert_eq!(record.get(3).expect("past the end"), None);
        let all: Vec<&[u8]> = record.events().collect::<Result<_, _>>().expect("all");
        assert_eq!(all, events);

        assert!(LogRecord::parse(&bytes[..2]).is_err());
        assert!(LogRecord::parse(&bytes[..bytes.len() - 1]).is_err());
        let empty = encode_record(std::iter::empty());
        assert_eq!(LogRecord::parse(&empty).expect("parses").len(), 0);
    }
}
