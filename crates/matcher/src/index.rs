//! The trigger index: which leaf triggers could possibly care about an event?
//!
//! Evaluating every trigger for every event would make cost grow with the number of
//! automations. Instead each leaf [`EventTrigger`] is filed under the event-name patterns of
//! its `expect ∪ after` (Prefect's own index keys), split by shape so lookup stays cheap:
//!
//! | pattern shape              | structure                       | lookup per event              |
//! |----------------------------|---------------------------------|-------------------------------|
//! | literal `a.b.c`            | hash map name → leaves          | one hash probe                |
//! | `prefix…` (any pattern that starts with literal text: `a.*`, `a.*.b`, `a.?`) | byte trie of literal prefixes | one step per agreeing byte |
//! | `*…` star-only patterns    | one `globset::GlobSet`          | one automaton pass            |
//! | other leading `?`/`[`      | always-checked list             | linear (rare, and lint-warned)|
//! | empty `expect` (any event) | by literal `prefect.resource.id` in `match`, else always |
//!
//! **Invariant:** the index only ever returns a *superset* of the leaves whose exact
//! pre-filter accepts the event; the engine re-checks every candidate with the exact rules.
//! So the index can change speed, never results — a property test checks exactly that.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use globset::{GlobBuilder, GlobSet, GlobSetBuilder};
use spur_core::event::RESOURCE_ID;
use spur_core::{Event, EventTrigger};

/// A small, fast, non-cryptographic hasher (FxHash) for keys Spur controls the shape of.
/// Event names and resource ids come from senders, but a slow path here only costs time,
/// never correctness, and per-process randomisation is not needed for bounded maps.
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    hash: u64,
}

const FX_SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for chunk in &mut chunks {
            let mut word = [0u8; 8];
            word.copy_from_slice(chunk);
            self.add(u64::from_le_bytes(word));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut word = [0u8; 8];
            word[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(word) ^ (rest.len() as u64) << 56);
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.hash
    }
}

impl FxHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.hash = (self.hash.rotate_left(5) ^ word).wrapping_mul(FX_SEED);
    }
}

/// `HashMap` with [`FxHasher`].
pub type FxHashMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// Leaf triggers filed by the event names (and resource ids) they can match.
#[derive(Debug, Default)]
pub struct TriggerIndex {
    literal: FxHashMap<Box<str>, Leaves>,
    prefixes: PrefixTrie,
    globs: Option<GlobSet>,
    glob_owners: Vec<u32>,
    always: Vec<u32>,
    any_name_by_resource: FxHashMap<Box<str>, Leaves>,
    leaf_count: usize,
}

/// Reusable buffers for [`TriggerIndex::candidates`], so lookups do not allocate.
#[derive(Debug, Default)]
pub struct CandidateScratch {
    stamps: Vec<u32>,
    generation: u32,
    glob_hits: Vec<usize>,
    /// The candidates of the last lookup, sorted by leaf number.
    pub leaves: Vec<u32>,
}

impl TriggerIndex {
    /// Builds the index over `leaves` (leaf number = position).
    pub fn build<'a>(leaves: impl IntoIterator<Item = &'a EventTrigger>) -> TriggerIndex {
        let mut index = TriggerIndex::default();
        // Not sized up front: 100 000 leaves may share one name (one entry) or have one each,
        // and a map reserved for the second wastes ~45 bytes per leaf in the first.
        let mut glob_builder = GlobSetBuilder::new();
        let mut glob_count = 0usize;
        for (n, trigger) in leaves.into_iter().enumerate() {
            let leaf = n as u32;
            index.leaf_count = n + 1;
            let patterns = trigger.index_patterns();
            if patterns.is_empty() {
                // Any event name: narrow by a literal resource id when the trigger pins one.
                match trigger.match_resource.literal_values(RESOURCE_ID) {
                    Some(ids) if !ids.is_empty() => {
                        for id in ids {
                            Leaves::add(index.any_name_by_resource.entry(id.into()), leaf);
                        }
                    }
                    _ => index.always.push(leaf),
                }
                continue;
            }
            for glob in patterns {
                if glob.is_literal() {
                    Leaves::add(index.literal.entry(glob.as_str().into()), leaf);
                } else if !glob.literal_prefix().is_empty() || glob.trailing_star_prefix().is_some()
                {
                    // Every match starts with the literal prefix (for `prefix*` that is the
                    // whole test; for `a*b` or `a?` the engine's exact check does the rest).
                    index
                        .prefixes
                        .insert(glob.literal_prefix().as_bytes(), leaf);
                } else if let Some(compiled) = glob
                    .only_stars()
                    .then(|| to_globset(glob.as_str()))
                    .flatten()
                {
                    glob_builder.add(compiled);
                    index.glob_owners.push(leaf);
                    glob_count += 1;
                } else {
                    push_unique(&mut index.always, leaf);
                }
            }
        }
        if glob_count > 0 {
            match glob_builder.build() {
                Ok(set) => index.globs = Some(set),
                Err(_) => {
                    // Cannot happen for escaped star-only patterns; stay correct regardless.
                    index.always.append(&mut index.glob_owners);
                }
            }
        }
        index.always.sort_unstable();
        index.always.dedup();
        index
    }

    /// Number of leaves indexed.
    pub fn len(&self) -> usize {
        self.leaf_count
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.leaf_count == 0
    }

    /// Fills `scratch.leaves` with every leaf that might match `event`, sorted, no duplicates.
    pub fn candidates(&self, event: &Event, scratch: &mut CandidateScratch) {
        scratch.leaves.clear();
        if scratch.stamps.len() < self.leaf_count {
            scratch.stamps.resize(self.leaf_count, 0);
        }
        scratch.generation = scratch.generation.wrapping_add(1);
        if scratch.generation == 0 {
            scratch.stamps.iter_mut().for_each(|s| *s = 0);
            scratch.generation = 1;
        }
        let generation = scratch.generation;
        let CandidateScratch {
            stamps,
            leaves,
            glob_hits,
            ..
        } = scratch;
        let mut add = |list: &[u32]| {
            for &leaf in list {
                let slot = &mut stamps[leaf as usize];
                if *slot != generation {
                    *slot = generation;
                    leaves.push(leaf);
                }
            }
        };
        let name = event.event.as_str();
        if let Some(list) = self.literal.get(name) {
            add(list.as_slice());
        }
        self.prefixes
            .for_each_prefix_of(name.as_bytes(), |list| add(list));
        if let Some(globs) = &self.globs {
            glob_hits.clear();
            globs.matches_into(name, glob_hits);
            for &hit in glob_hits.iter() {
                add(std::slice::from_ref(&self.glob_owners[hit]));
            }
        }
        if let Some(list) = self.any_name_by_resource.get(event.resource.id()) {
            add(list.as_slice());
        }
        add(&self.always);
        leaves.sort_unstable();
    }
}

/// A byte trie of literal prefixes. Walking it costs one step per byte of the event name that
/// still agrees with some prefix, so a name unlike every pattern stops at its first byte.
#[derive(Debug)]
struct PrefixTrie {
    nodes: Vec<TrieNode>,
}

#[derive(Debug, Default)]
struct TrieNode {
    /// Children sorted by byte.
    children: Vec<(u8, u32)>,
    /// Leaves whose prefix ends here.
    leaves: Vec<u32>,
}

impl Default for PrefixTrie {
    fn default() -> Self {
        PrefixTrie {
            nodes: vec![TrieNode::default()],
        }
    }
}

impl PrefixTrie {
    fn insert(&mut self, prefix: &[u8], leaf: u32) {
        let mut node = 0usize;
        for &byte in prefix {
            node = match self.nodes[node]
                .children
                .binary_search_by_key(&byte, |&(b, _)| b)
            {
                Ok(i) => self.nodes[node].children[i].1 as usize,
                Err(i) => {
                    let next = self.nodes.len();
                    self.nodes.push(TrieNode::default());
                    self.nodes[node].children.insert(i, (byte, next as u32));
                    next
                }
            };
        }
        push_unique(&mut self.nodes[node].leaves, leaf);
    }

    /// Calls `visit` with the leaves of every stored prefix of `name` (shortest first).
    #[inline]
    fn for_each_prefix_of(&self, name: &[u8], mut visit: impl FnMut(&[u32])) {
        let mut node = &self.nodes[0];
        for &byte in name {
            if !node.leaves.is_empty() {
                visit(&node.leaves);
            }
            match node.children.binary_search_by_key(&byte, |&(b, _)| b) {
                Ok(i) => node = &self.nodes[node.children[i].1 as usize],
                Err(_) => return,
            }
        }
        if !node.leaves.is_empty() {
            visit(&node.leaves);
        }
    }
}

/// The leaves under one key of a map, in leaf order. Most keys have exactly one (one
/// automation per event name or resource): those hold it inline, so 100 000 such automations
/// cost no allocation per key to build, keep or drop.
#[derive(Debug)]
enum Leaves {
    One(u32),
    Many(Vec<u32>),
}

impl Leaves {
    /// Adds `leaf` under the key of `entry` (leaves arrive in order; a repeat is skipped).
    fn add(entry: std::collections::hash_map::Entry<'_, Box<str>, Leaves>, leaf: u32) {
        use std::collections::hash_map::Entry;
        match entry {
            Entry::Vacant(slot) => {
                slot.insert(Leaves::One(leaf));
            }
            Entry::Occupied(mut slot) => match slot.get_mut() {
                Leaves::One(first) if *first == leaf => {}
                Leaves::One(first) => {
                    let first = *first;
                    slot.insert(Leaves::Many(vec![first, leaf]));
                }
                Leaves::Many(list) => push_unique(list, leaf),
            },
        }
    }

    fn as_slice(&self) -> &[u32] {
        match self {
            Leaves::One(leaf) => std::slice::from_ref(leaf),
            Leaves::Many(list) => list,
        }
    }
}

fn push_unique(list: &mut Vec<u32>, leaf: u32) {
    if list.last() != Some(&leaf) {
        list.push(leaf);
    }
}

/// A star-only fnmatch pattern as a `globset` glob: escape everything globset treats as
/// special except `*`, and let `*` cross every character (no path separators here).
fn to_globset(pattern: &str) -> Option<globset::Glob> {
    let mut escaped = String::with_capacity(pattern.len() + 8);
    let mut previous = None;
    for c in pattern.chars() {
        if c == '*' && previous == Some('*') {
            continue; // `**` means something else to globset; one star is the same match
        }
        previous = Some(c);
        match c {
            '?' | '[' | ']' | '{' | '}' | '\\' | '!' | ',' => {
                escaped.push('\\');
                escaped.push(c);
            }
            _ => escaped.push(c),
        }
    }
    GlobBuilder::new(&escaped)
        .literal_separator(false)
        .backslash_escape(true)
        .empty_alternates(false)
        .build()
        .ok()
}
