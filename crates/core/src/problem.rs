//! Validation findings that point at a field.
//!
//! Validation never stops at the first mistake: parsers push every [`Problem`] they find, each
//! with a [`FieldPath`] into the document. The file loader later turns paths into
//! `file:line:column` using the source map it built while parsing.

use std::fmt;

/// One step in a path into a JSON/YAML document.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PathSegment {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// A path into a document, printed as `trigger.triggers[0].within`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct FieldPath(pub Vec<PathSegment>);

impl FieldPath {
    /// The document root.
    pub fn root() -> FieldPath {
        FieldPath(Vec::new())
    }

    /// This path extended by a key.
    pub fn key(&self, key: &str) -> FieldPath {
        let mut next = self.0.clone();
        next.push(PathSegment::Key(key.to_owned()));
        FieldPath(next)
    }

    /// This path extended by an index.
    pub fn index(&self, index: usize) -> FieldPath {
        let mut next = self.0.clone();
        next.push(PathSegment::Index(index));
        FieldPath(next)
    }

    /// `self` followed by `other`.
    pub fn join(&self, other: &FieldPath) -> FieldPath {
        let mut next = self.0.clone();
        next.extend(other.0.iter().cloned());
        FieldPath(next)
    }

    /// True at the document root.
    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Display for FieldPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(document)");
        }
        for (i, segment) in self.0.iter().enumerate() {
            match segment {
                PathSegment::Key(k) if i == 0 => write!(f, "{k}")?,
                PathSegment::Key(k) => write!(f, ".{k}")?,
                PathSegment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// How bad a finding is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Severity {
    /// Valid, but probably not what the author meant (e.g. a trigger that can never fire).
    Warning,
    /// Refused: the automation is not loaded.
    Error,
}

/// A finding about one field.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Where, relative to the object being validated.
    pub path: FieldPath,
    /// What is wrong.
    pub reason: String,
    /// Error or warning.
    pub severity: Severity,
}

/// Collects problems while a document is validated.
#[derive(Debug, Default)]
pub struct Problems {
    items: Vec<Problem>,
}

impl Problems {
    /// An empty collector.
    pub fn new() -> Problems {
        Problems::default()
    }

    /// Records an error.
    pub fn error(&mut self, path: &FieldPath, reason: impl Into<String>) {
        self.items.push(Problem {
            path: path.clone(),
            reason: reason.into(),
            severity: Severity::Error,
        });
    }

    /// Records a warning.
    pub fn warn(&mut self, path: &FieldPath, reason: impl Into<String>) {
        self.items.push(Problem {
            path: path.clone(),
            reason: reason.into(),
            severity: Severity::Warning,
        });
    }

    /// True if any error (not warning) was recorded.
    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|p| p.severity == Severity::Error)
    }

    /// Number of errors recorded so far.
    pub fn error_count(&self) -> usize {
        self.items
            .iter()
            .filter(|p| p.severity == Severity::Error)
            .count()
    }

    /// All findings, in the order found.
    pub fn into_vec(self) -> Vec<Problem> {
        self.items
    }

    /// Appends findings made relative to `base`.
    pub fn extend_under(&mut self, base: &FieldPath, problems: impl IntoIterator<Item = Problem>) {
        for p in problems {
            self.items.push(Problem {
                path: base.join(&p.path),
                ..p
            });
        }
    }
}

/// A JSON type's name for error messages: "a string", "a list", "null".
pub fn json_type_name(value: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}
