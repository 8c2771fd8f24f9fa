//! The event-id index: de-duplication and lookups by id, in two tiers (see the crate docs).
//!
//! Ids appended since their last merge live in memory ([`RecentIds`], per key slice); the
//! `event_ids` table holds the rest, keyed so that time-ordered ids still spread over slices
//! ([`ids_key`]), behind a Bloom filter ([`IdFilter`]) that lets a new id skip the B-tree.
//! The writer merges one slice per [`ID_MERGE_STEP`] new ids; opening the store rebuilds the
//! memory tier from the log after the merge mark. Everything here is the store's own: the
//! rest of the crate reaches it through `Store` and `StoreWriter`.

use std::collections::HashMap;
use std::sync::RwLock;

use redb::{ReadableDatabase, ReadableTable};
use serde::Deserialize;
use uuid::Uuid;

use crate::{EVENT_IDS, LOG, META, Store, StoreError, corrupt, records};

/// Event id → log sequence. Hashed with foldhash, not the standard SipHash: every appended
/// event is looked up, inserted and later removed here on the pipeline thread, and SipHash
/// took ~10 % of the store append bench's instructions. foldhash is seeded per map, so ids
/// chosen by a client still cannot be aimed at one bucket without knowing the seed.
pub(crate) type IdMap = HashMap<u128, u64, foldhash::fast::RandomState>;

/// Ids appended to the log but not yet merged into `event_ids`: id → sequence; and a filter
/// over the ids that are in `event_ids`.
#[derive(Debug, Default)]
pub(crate) struct RecentIds {
    pub(crate) ids: SlicedIds,
    /// Which ids `event_ids` may hold (see [`IdFilter`]).
    pub(crate) merged: IdFilter,
    /// The key slice [`crate::StoreWriter::merge_recent_slice`] merges next.
    pub(crate) next_slice: u32,
    /// Ids committed since the last slice merge.
    pub(crate) since_step: usize,
}

/// The memory tier's ids, kept per key slice ([`slice_of`]): merging one slice then reads
/// only that slice's ids, and the oldest id outside it is known without a scan. (With one
/// map, every slice merge walked all the tier's ids: ~1.3 k instructions per appended event.)
#[derive(Debug)]
pub(crate) struct SlicedIds {
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
    pub(crate) fn get(&self, id: u128) -> Option<u64> {
        self.slices[slice_of(id) as usize].get(&id).copied()
    }

    pub(crate) fn contains(&self, id: u128) -> bool {
        self.slices[slice_of(id) as usize].contains_key(&id)
    }

    pub(crate) fn insert(&mut self, id: u128, seq: u64) {
        let slice = slice_of(id) as usize;
        if self.slices[slice].insert(id, seq).is_none() {
            self.len += 1;
        }
        self.oldest[slice] = Some(self.oldest[slice].map_or(seq, |o| o.min(seq)));
    }

    pub(crate) fn remove(&mut self, id: u128) {
        let slice = slice_of(id) as usize;
        if self.slices[slice].remove(&id).is_some() {
            self.len -= 1;
            if self.slices[slice].is_empty() {
                self.oldest[slice] = None;
            }
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The ids of one slice (all of them for `None`), and a sequence at or below every id
    /// left outside it.
    pub(crate) fn pending(&self, slice: Option<u32>) -> (Vec<(u128, u64)>, Option<u64>) {
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
pub(crate) struct IdFilter {
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
    pub(crate) fn with_room_for(ids: usize) -> IdFilter {
        let bits =
            (ids.saturating_mul(2).max(Self::MIN_IDS) * Self::BITS_PER_ID).next_power_of_two();
        IdFilter {
            bits: vec![0; bits / 64],
            inserted: 0,
        }
    }

    /// Three bit positions for `id`, by double hashing a mix of its two halves.
    pub(crate) fn probes(&self, id: u128) -> [usize; 3] {
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

    pub(crate) fn insert(&mut self, id: u128) {
        if self.bits.is_empty() {
            return;
        }
        for bit in self.probes(id) {
            self.bits[bit / 64] |= 1 << (bit % 64);
        }
        self.inserted += 1;
    }

    /// False only if `id` was never inserted.
    pub(crate) fn may_contain(&self, id: u128) -> bool {
        self.bits.is_empty()
            || self
                .probes(id)
                .iter()
                .all(|bit| self.bits[bit / 64] & (1 << (bit % 64)) != 0)
    }

    /// Past capacity (or never built): time to rebuild from the table.
    pub(crate) fn needs_rebuild(&self) -> bool {
        self.bits.is_empty() || self.inserted * Self::BITS_PER_ID > self.bits.len() * 64
    }

    /// A filter over every id in `table`.
    pub(crate) fn build(table: &impl ReadableTable<u128, u64>) -> Result<IdFilter, StoreError> {
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
pub(crate) fn ids_key(id: u128) -> u128 {
    id.rotate_right(8)
}

/// The id stored under an `event_ids` key (see [`ids_key`]).
pub(crate) fn id_of_key(key: u128) -> u128 {
    key.rotate_left(8)
}

/// `meta[IDS_KEYED]` is set once `event_ids` is keyed by [`ids_key`] (a store written
/// before keyed it by the id itself, and is re-keyed when opened).
pub(crate) const IDS_KEYED: &str = "event_ids_keyed_by_last_byte";

/// The key slice of an id: the top bits of its key.
pub(crate) fn slice_of(id: u128) -> u32 {
    (ids_key(id) >> (128 - ID_SLICES.trailing_zeros())) as u32
}

impl RecentIds {
    pub(crate) fn get(lock: &RwLock<RecentIds>, id: u128) -> Option<u64> {
        lock.read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .ids
            .get(id)
    }

    pub(crate) fn write(lock: &RwLock<RecentIds>) -> std::sync::RwLockWriteGuard<'_, RecentIds> {
        lock.write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The `meta` key naming a sequence up to which every id is in `event_ids`.
pub(crate) const IDS_MERGED_THROUGH: &str = "ids_merged_through";

/// Keys `event_ids` by [`ids_key`] if a store written before did not (once; see
/// [`IDS_KEYED`]). A new store's empty table just gets the mark.
pub(crate) fn rekey_event_ids(txn: &redb::WriteTransaction) -> Result<(), StoreError> {
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

/// Inserts the memory-tier ids of one key slice (all of them for `None`) into `event_ids`
/// in id order, within `txn`, and moves the merge mark; returns the merged ids, which leave
/// the memory tier once `txn` commits ([`forget_merged`]).
pub(crate) fn merge_into(
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
pub(crate) fn forget_merged(recent: &RwLock<RecentIds>, merged: &[u128]) {
    if merged.is_empty() {
        return;
    }
    let mut recent = RecentIds::write(recent);
    for id in merged {
        recent.ids.remove(*id);
    }
}

/// `meta["ids_merged_through"]`: a sequence up to which every id is in `event_ids`.
pub(crate) fn merged_through(
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

impl Store {
    /// Rebuilds the memory tier of the id index from the log entries after the last merge.
    pub(crate) fn load_recent_ids(&self) -> Result<(), StoreError> {
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

    /// Ids committed since the last slice merge ([`crate::StoreWriter::merge_recent_slice`]).
    pub fn ids_since_merge_step(&self) -> usize {
        self.recent
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .since_step
    }
}
