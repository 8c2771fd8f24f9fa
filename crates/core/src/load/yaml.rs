//! YAML (and JSON) text → JSON values plus a map of where each node sits in the text.
//!
//! This reads saphyr's event stream directly and builds `serde_json` values as the events
//! arrive, instead of building saphyr's own node tree first and converting it. Three things
//! follow from that, and they are why this module exists:
//!
//! * **One pass, no intermediate tree.** A 21 MB file of 100 000 automations used to be
//!   parsed twice (once to bound nesting, once into a tree), then converted; the tree alone
//!   took more memory than the automations it described.
//! * **Nesting is bounded as it is read.** The builder keeps an explicit stack, so no step
//!   recurses; a document nested deeper than [`MAX_NESTING_DEPTH`] is refused at the line
//!   where it crosses the limit, which keeps every later (recursive) step safe.
//! * **Positions cost 16 bytes a node.** A [`SourceMap`] keys each node by a 64-bit hash of
//!   its path, built from its parent's hash as the parser descends, instead of by an owned
//!   copy of the path. A lookup hashes the path it is asked about the same way.
//!
//! Rules are YAML 1.2's core schema, as saphyr resolves them (`no` stays a string, quoted
//! scalars are strings, a tag like `!!int` is honoured); aliases are refused (a file that
//! repeats a value should say so), and so is a key given twice in one mapping.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};

use saphyr::Scalar;
use saphyr_parser::{Event as YamlEvent, Marker, Parser as YamlParser};
use serde_json::{Map, Value};

use crate::problem::{FieldPath, PathSegment};

/// Deepest nesting of mappings and lists accepted in a YAML or JSON file (the document's own
/// top-level collection is level 1). Real automation files stay under 15; the limit is
/// serde_json's own recursion limit, so a file is refused exactly when the same structure
/// sent as JSON would be. It keeps every recursive step of loading (validation, dropping the
/// value) well inside a 2 MiB thread stack.
pub const MAX_NESTING_DEPTH: usize = 128;

/// A parse error: `(line, column, reason)`, 1-based.
pub type ParseError = (usize, usize, String);

/// Positions (1-based line, column) of the nodes of one document, by path: of every node, or
/// (see [`parse_documents_shallow`]) only of those at most `depth` segments deep.
#[derive(Clone, Debug, Default)]
pub struct SourceMap {
    positions: HashMap<u64, (u32, u32), BuildHasherDefault<PathHashHasher>>,
    /// `None`: every node is recorded.
    depth: Option<usize>,
}

/// The keys are already FNV hashes of their paths; hashing them again (SipHash, the default)
/// was a tenth of the time it takes to load 100 000 automations.
#[derive(Default)]
struct PathHashHasher(u64);

impl Hasher for PathHashHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        self.0 = fnv(self.0, bytes);
    }

    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
}

impl SourceMap {
    /// True when the map recorded every node `path` could need: it is complete, or `path` is
    /// no deeper than what it recorded.
    pub fn covers(&self, path: &FieldPath) -> bool {
        self.depth.is_none_or(|depth| path.0.len() <= depth)
    }

    /// The position of `path`, or of its nearest ancestor that has one.
    pub fn locate(&self, path: &FieldPath) -> (usize, usize) {
        let mut hashes = Vec::with_capacity(path.0.len() + 1);
        let mut hash = ROOT_HASH;
        hashes.push(hash);
        for segment in &path.0 {
            hash = match segment {
                PathSegment::Key(key) => key_hash(hash, key),
                PathSegment::Index(index) => index_hash(hash, *index),
            };
            hashes.push(hash);
        }
        hashes
            .iter()
            .rev()
            .find_map(|h| self.positions.get(h))
            .map_or((1, 1), |&(line, column)| (line as usize, column as usize))
    }

    fn record(&mut self, depth: usize, hash: u64, position: (u32, u32), overwrite: bool) {
        if self.depth.is_some_and(|limit| depth > limit) {
            return;
        }
        if overwrite {
            self.positions.insert(hash, position);
        } else {
            self.positions.entry(hash).or_insert(position);
        }
    }
}

// Path hashes: FNV-1a over a tag byte and the segment, seeded with the parent's hash. The
// tag keeps the key "0" apart from the index 0. A collision could only misplace a line
// number in a message, never change what loads.
const ROOT_HASH: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

fn key_hash(parent: u64, key: &str) -> u64 {
    fnv(fnv(parent, b"k"), key.as_bytes())
}

fn index_hash(parent: u64, index: usize) -> u64 {
    fnv(fnv(parent, b"i"), &(index as u64).to_le_bytes())
}

fn position(mark: &Marker) -> (u32, u32) {
    let clamp = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
    (clamp(mark.line()), clamp(mark.col() + 1))
}

fn error_at(mark: &Marker, reason: impl Into<String>) -> ParseError {
    (mark.line(), mark.col() + 1, reason.into())
}

/// A collection being filled, with the path hash of the node it will become.
enum Open {
    Sequence {
        items: Vec<Value>,
        hash: u64,
    },
    Mapping {
        object: Map<String, Value>,
        hash: u64,
        /// The key read last, waiting for its value, and the value's path hash.
        key: Option<(String, u64)>,
    },
}

/// Builds the documents of one text from parser events.
#[derive(Default)]
struct Builder {
    stack: Vec<Open>,
    root: Option<Value>,
    map: SourceMap,
}

/// Where the next node goes.
enum Slot {
    /// The document's root, or a sequence item or mapping value with this path hash.
    Value(u64),
    /// A mapping key of the mapping with this path hash.
    Key(u64),
}

impl Builder {
    /// Records the node with path hash `hash` at `mark`; its path is as deep as the stack.
    fn record(&mut self, hash: u64, mark: &Marker, overwrite: bool) {
        self.map
            .record(self.stack.len(), hash, position(mark), overwrite);
    }

    fn slot(&self) -> Slot {
        match self.stack.last() {
            None => Slot::Value(ROOT_HASH),
            Some(Open::Sequence { items, hash }) => Slot::Value(index_hash(*hash, items.len())),
            Some(Open::Mapping {
                key: Some((_, child)),
                ..
            }) => Slot::Value(*child),
            Some(Open::Mapping {
                hash, key: None, ..
            }) => Slot::Key(*hash),
        }
    }

    /// Places a finished value where it belongs.
    fn finish(&mut self, value: Value) {
        match self.stack.last_mut() {
            None => self.root = Some(value),
            Some(Open::Sequence { items, .. }) => items.push(value),
            Some(Open::Mapping { object, key, .. }) => {
                if let Some((name, _)) = key.take() {
                    object.insert(name, value);
                }
            }
        }
    }

    fn open(&mut self, mark: &Marker, sequence: bool) -> Result<(), ParseError> {
        let hash = match self.slot() {
            Slot::Value(hash) => hash,
            Slot::Key(_) => return Err(error_at(mark, "mapping keys must be plain scalars")),
        };
        if self.stack.len() >= MAX_NESTING_DEPTH {
            return Err(error_at(
                mark,
                format!(
                    "nested too deeply: more than {MAX_NESTING_DEPTH} levels of mappings and \
                     lists inside each other"
                ),
            ));
        }
        self.record(hash, mark, false);
        self.stack.push(if sequence {
            Open::Sequence {
                items: Vec::new(),
                hash,
            }
        } else {
            Open::Mapping {
                object: Map::new(),
                hash,
                key: None,
            }
        });
        Ok(())
    }

    fn close(&mut self) {
        let value = match self.stack.pop() {
            Some(Open::Sequence { items, .. }) => Value::Array(items),
            Some(Open::Mapping { object, .. }) => Value::Object(object),
            None => return,
        };
        self.finish(value);
    }

    fn scalar(&mut self, mark: &Marker, scalar: Scalar<'_>) -> Result<(), ParseError> {
        match self.slot() {
            Slot::Value(hash) => {
                self.record(hash, mark, false);
                self.finish(scalar_value(scalar));
            }
            Slot::Key(parent) => {
                let text = key_text(scalar);
                let child = key_hash(parent, &text);
                if let Some(Open::Mapping { object, key, .. }) = self.stack.last_mut() {
                    if object.contains_key(&text) {
                        return Err(error_at(mark, format!("duplicated key in mapping: {text}")));
                    }
                    *key = Some((text, child));
                }
                // Point a field at its key: that is the line a person reads.
                self.record(child, mark, true);
            }
        }
        Ok(())
    }
}

fn scalar_value(scalar: Scalar<'_>) -> Value {
    match scalar {
        Scalar::Null => Value::Null,
        Scalar::Boolean(b) => Value::Bool(b),
        Scalar::Integer(i) => Value::from(i),
        Scalar::FloatingPoint(f) => {
            let f = f.into_inner();
            serde_json::Number::from_f64(f)
                .map_or_else(|| Value::String(f.to_string()), Value::Number)
        }
        Scalar::String(s) => Value::String(s.into_owned()),
    }
}

fn key_text(scalar: Scalar<'_>) -> String {
    match scalar {
        Scalar::String(s) => s.into_owned(),
        Scalar::Integer(i) => i.to_string(),
        Scalar::Boolean(b) => b.to_string(),
        Scalar::FloatingPoint(f) => f.to_string(),
        Scalar::Null => "null".to_owned(),
    }
}

/// Parses every YAML document of `text` into JSON plus a complete source map.
pub fn parse_documents(text: &str) -> Result<Vec<(Value, SourceMap)>, ParseError> {
    parse_documents_to(text, None)
}

/// Like [`parse_documents`], but the source maps record only nodes at most `depth` path
/// segments deep. Loading needs deeper positions only for a problem, and most files have
/// none: a map of every node of 100 000 automations took a fifth of their load time. A
/// caller that meets a deeper path parses again with [`parse_documents`].
pub fn parse_documents_shallow(
    text: &str,
    depth: usize,
) -> Result<Vec<(Value, SourceMap)>, ParseError> {
    parse_documents_to(text, Some(depth))
}

fn parse_documents_to(
    text: &str,
    depth: Option<usize>,
) -> Result<Vec<(Value, SourceMap)>, ParseError> {
    let mut parser = YamlParser::new_from_str(text);
    let mut documents = Vec::new();
    let fresh = || Builder {
        map: SourceMap {
            depth,
            ..SourceMap::default()
        },
        ..Builder::default()
    };
    let mut builder = fresh();
    while let Some(next) = parser.next_event() {
        let (event, span) = next.map_err(|e| error_at(e.marker(), e.info()))?;
        let mark = span.start;
        match event {
            YamlEvent::StreamStart
            | YamlEvent::StreamEnd
            | YamlEvent::DocumentStart(_)
            | YamlEvent::Nothing => {}
            YamlEvent::DocumentEnd => {
                let done = std::mem::replace(&mut builder, fresh());
                // An empty document holds nothing: null, as the core schema reads it.
                documents.push((done.root.unwrap_or(Value::Null), done.map));
            }
            YamlEvent::SequenceStart(..) => builder.open(&mark, true)?,
            YamlEvent::MappingStart(..) => builder.open(&mark, false)?,
            YamlEvent::SequenceEnd | YamlEvent::MappingEnd => builder.close(),
            YamlEvent::Scalar(text, style, _anchor, tag) => {
                let scalar = Scalar::parse_from_cow_and_metadata(text, style, tag.as_ref())
                    .ok_or_else(|| error_at(&mark, "a value that does not match its tag"))?;
                builder.scalar(&mark, scalar)?;
            }
            YamlEvent::Alias(_) => {
                return Err(error_at(
                    &mark,
                    "YAML aliases are not supported here; repeat the value",
                ));
            }
        }
    }
    Ok(documents)
}

/// JSON writes a character outside the Basic Multilingual Plane as a pair of `\uD8xx\uDCxx`
/// escapes (Python's `json.dump` does by default); YAML, whose parser reads JSON files here
/// too, allows only whole code points in `\u` escapes. This joins each such pair inside a
/// JSON string into the character it encodes, leaving everything else (an escaped
/// backslash, a lone surrogate, text outside strings) as it was. Columns after a joined pair
/// on the same line shift left by the characters it saved.
pub fn join_json_surrogate_pairs(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.contains("\\u") {
        return std::borrow::Cow::Borrowed(text);
    }
    let bytes = text.as_bytes();
    let mut out = String::with_capacity(text.len());
    let mut copied = 0;
    let mut in_string = false;
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'"' => in_string = !in_string,
            b'\\' if in_string => {
                if let Some(c) = surrogate_pair_at(text, i) {
                    out.push_str(&text[copied..i]);
                    out.push(c);
                    i += 12;
                    copied = i;
                    continue;
                }
                i += 1; // the escaped character, whatever it is, is not a quote
            }
            _ => {}
        }
        i += 1;
    }
    out.push_str(&text[copied..]);
    std::borrow::Cow::Owned(out)
}

/// The character a `\uHHHH\uLLLL` surrogate pair at byte `at` of `text` encodes.
fn surrogate_pair_at(text: &str, at: usize) -> Option<char> {
    let hex = |from: usize| -> Option<u32> {
        let digits = text.get(from..from + 4)?;
        if !digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        u32::from_str_radix(digits, 16).ok()
    };
    let pair = text.get(at..at + 12)?.as_bytes();
    if pair[1] != b'u' || pair[6] != b'\\' || pair[7] != b'u' {
        return None;
    }
    let (high, low) = (hex(at + 2)?, hex(at + 8)?);
    if !(0xD800..0xDC00).contains(&high) || !(0xDC00..0xE000).contains(&low) {
        return None;
    }
    char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(text: &str) -> (Value, SourceMap) {
        let mut docs = parse_documents(text).expect("parses");
        assert_eq!(docs.len(), 1, "{docs:?}");
        docs.remove(0)
    }

    #[test]
    fn values_follow_the_core_schema() {
        let (value, _) = one(
            "a: no\nb: true\nc: 0x10\nd: 1.5\ne: ~\nf: '1'\ng: !!str 2\nh: []\ni: {}\n\
             j: [1, [2, {k: v}]]\n3: three\n",
        );
        assert_eq!(
            value,
            json!({"a": "no", "b": true, "c": 16, "d": 1.5, "e": null, "f": "1", "g": "2",
                   "h": [], "i": {}, "j": [1, [2, {"k": "v"}]], "3": "three"})
        );
    }

    #[test]
    fn json_text_reads_the_same() {
        let text =
            r#"{"name": "x", "list": [1, 2.5, "s", null, true], "nested": {"a": {"b": []}}}"#;
        let (value, _) = one(text);
        assert_eq!(value, serde_json::from_str::<Value>(text).expect("json"));
    }

    #[test]
    fn positions_point_at_keys_and_items() {
        let text = "name: a\ntrigger:\n  expect:\n    - x\n    - y\n  within: 5\n";
        let (_, map) = one(text);
        let root = FieldPath::root();
        assert_eq!(map.locate(&root.key("name")), (1, 1));
        assert_eq!(map.locate(&root.key("trigger")), (2, 1));
        assert_eq!(map.locate(&root.key("trigger").key("within")), (6, 3));
        assert_eq!(
            map.locate(&root.key("trigger").key("expect").index(1)),
            (5, 7)
        );
        // A path the document does not have falls back to its nearest ancestor.
        assert_eq!(
            map.locate(&root.key("trigger").key("within").key("nope")),
            (6, 3)
        );
        assert_eq!(map.locate(&root.key("elsewhere")), (1, 1));
    }

    #[test]
    fn several_documents_each_get_their_own_map() {
        let docs = parse_documents("a: 1\n---\nb: 2\n---\n").expect("parses");
        let values: Vec<_> = docs.iter().map(|(v, _)| v.clone()).collect();
        assert_eq!(values, vec![json!({"a": 1}), json!({"b": 2}), Value::Null]);
        assert_eq!(docs[1].1.locate(&FieldPath::root().key("b")), (3, 1));
    }

    #[test]
    fn refusals_name_the_place() {
        let cases = [
            ("a: &x 1\nb: *x\n", 2, "aliases"),
            ("a: 1\na: 2\n", 2, "duplicated key"),
            ("? [1, 2]\n: v\n", 1, "plain scalars"),
            ("a: !!int nope\n", 1, "does not match its tag"),
            ("a: [unclosed\n", 2, ""),
        ];
        for (text, line, words) in cases {
            let (l, _, reason) = parse_documents(text).expect_err(text);
            assert_eq!(l, line, "{text}: {reason}");
            assert!(reason.contains(words), "{text}: {reason}");
        }
    }

    #[test]
    fn nesting_is_bounded_without_recursion() {
        let deep = "[".repeat(MAX_NESTING_DEPTH + 1) + &"]".repeat(MAX_NESTING_DEPTH + 1);
        let (_, _, reason) = parse_documents(&deep).expect_err("too deep");
        assert!(reason.contains("nested too deeply"), "{reason}");
        let ok = "[".repeat(MAX_NESTING_DEPTH) + &"]".repeat(MAX_NESTING_DEPTH);
        assert!(parse_documents(&ok).is_ok());
        // Far deeper than any stack could recurse: refused, not crashed.
        let hostile = "[".repeat(1_000_000);
        assert!(parse_documents(&hostile).is_err());
    }

    #[test]
    fn json_surrogate_pairs_become_the_character() {
        let text = r#"{"a": "smile \ud83d\ude00!", "b": "\\ud83d\\ude00", "c": "\ud83d"}"#;
        let joined = join_json_surrogate_pairs(text);
        let (value, _) = one(&joined.replace(r#", "c": "\ud83d""#, ""));
        assert_eq!(value["a"], json!("smile \u{1F600}!"));
        // An escaped backslash is not the start of an escape.
        assert_eq!(value["b"], json!(r"\ud83d\ude00"));
        // A lone surrogate is left for the parser to refuse.
        assert!(joined.contains(r#""c": "\ud83d""#));
        assert!(matches!(
            join_json_surrogate_pairs("{}"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
