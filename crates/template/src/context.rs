//! Template-facing views of Spur's model, shaped like Prefect's pydantic objects.
//!
//! Prefect templates reach into events with attribute syntax: `event.resource.id`,
//! `event.resource['prefect.resource.name']`, `event.resource_in_role['flow'].name`,
//! `labels.prefect.resource.id`. These [`Object`] impls answer exactly those lookups while
//! serializing (for `tojson`) to the plain JSON an event has on the wire.

use std::sync::Arc;

use minijinja::value::{Enumerator, Object, ObjectRepr, Serde, Tuple};
use minijinja::{Error, ErrorKind, State, Value};
use spur_core::time::format_timestamp;
use spur_core::{Event, Resource};

/// An event: enumerates its wire fields; also answers Prefect's helper properties.
#[derive(Debug)]
pub struct EventView(pub Arc<Event>);

const EVENT_FIELDS: &[&str] = &[
    "occurred", "event", "resource", "related", "payload", "id", "follows", "received",
];

impl Object for EventView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let event = &self.0;
        Some(match key.as_str()? {
            "occurred" => Value::from_object(DateTimeView(event.occurred)),
            "received" => Value::from_object(DateTimeView(event.received)),
            "event" => Value::from(event.event.as_str()),
            "id" => Value::from(event.id.to_string()),
            "follows" => event
                .follows
                .map_or(Value::from(()), |f| Value::from(f.to_string())),
            "payload" => Value::from(Serde(&event.payload)),
            "resource" => resource_value(&event.resource),
            "related" => Value::from(event.related.iter().map(resource_value).collect::<Vec<_>>()),
            "involved_resources" => Value::from(
                event
                    .involved_resources()
                    .map(resource_value)
                    .collect::<Vec<_>>(),
            ),
            "resource_in_role" => Value::from_object(RoleLookup {
                event: event.clone(),
                all: false,
            }),
            "resources_in_role" => Value::from_object(RoleLookup {
                event: event.clone(),
                all: true,
            }),
            // Spur has no UI link for events yet; Prefect's `url` is None without a UI too.
            "url" => Value::from(()),
            _ => return None,
        })
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        Enumerator::Str(EVENT_FIELDS)
    }
}

/// A resource value for templates.
pub fn resource_value(resource: &Resource) -> Value {
    Value::from_object(ResourceView(resource.clone()))
}

/// A resource: a mapping of labels, plus `.id`, `.name`, `.role`, `.labels` and the methods
/// `get`, `items`, `keys`, `values`.
#[derive(Debug)]
pub struct ResourceView(pub Resource);

impl Object for ResourceView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Map
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let key = key.as_str()?;
        match key {
            "id" => Some(Value::from(self.0.id())),
            "name" => Some(self.0.name().map_or(Value::from(()), Value::from)),
            // Undefined when absent, as in Prefect (the triggering resource has no role).
            "role" => self.0.role().map(Value::from),
            "labels" => Some(Value::from_object(LabelDiver::new(
                self.0
                    .labels()
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect(),
                String::new(),
            ))),
            label => self.0.get(label).map(Value::from),
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let keys: Vec<Value> = self.0.labels().map(|(k, _)| Value::from(k)).collect();
        Enumerator::Values(keys)
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &mut State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        match method {
            "get" => {
                let label = args.first().and_then(Value::as_str).unwrap_or("");
                let fallback = args.get(1).cloned().unwrap_or(Value::from(()));
                Ok(self.0.get(label).map_or(fallback, Value::from))
            }
            "items" => Ok(Value::from(
                self.0
                    .labels()
                    .map(|(k, v)| Value::from(Tuple::from([Value::from(k), Value::from(v)])))
                    .collect::<Vec<_>>(),
            )),
            "keys" => Ok(Value::from(
                self.0
                    .labels()
                    .map(|(k, _)| Value::from(k))
                    .collect::<Vec<_>>(),
            )),
            "values" => Ok(Value::from(
                self.0
                    .labels()
                    .map(|(_, v)| Value::from(v))
                    .collect::<Vec<_>>(),
            )),
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        }
    }
}

/// `event.resource_in_role[role]` (first match) and `event.resources_in_role[role]` (all).
#[derive(Debug)]
struct RoleLookup {
    event: Arc<Event>,
    all: bool,
}

impl Object for RoleLookup {
    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let role = key.as_str()?;
        let mut matching = self.event.related.iter().filter(|r| r.role() == Some(role));
        if self.all {
            Some(Value::from(
                matching.map(resource_value).collect::<Vec<_>>(),
            ))
        } else {
            matching.next().map(resource_value)
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        let mut roles: Vec<Value> = Vec::new();
        for r in &self.event.related {
            if let Some(role) = r.role()
                && !roles.iter().any(|v| v.as_str() == Some(role))
            {
                roles.push(Value::from(role));
            }
        }
        Enumerator::Values(roles)
    }
}

/// Prefect's `LabelDiver`: dotted attribute access over flat dotted label names, so that
/// `labels.prefect.resource.id` finds the label `prefect.resource.id`.
#[derive(Debug)]
pub struct LabelDiver {
    labels: Arc<Vec<(String, String)>>,
    prefix: String,
}

impl LabelDiver {
    /// A diver over `labels`, positioned at `prefix` (empty = the root).
    pub fn new(labels: Vec<(String, String)>, prefix: String) -> LabelDiver {
        LabelDiver {
            labels: Arc::new(labels),
            prefix,
        }
    }

    fn exact(&self) -> Option<&str> {
        self.labels
            .iter()
            .find(|(k, _)| *k == self.prefix)
            .map(|(_, v)| v.as_str())
    }
}

impl Object for LabelDiver {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        if self.prefix.is_empty() {
            ObjectRepr::Map
        } else {
            ObjectRepr::Plain
        }
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        let part = key.as_str()?;
        // A full label name asked by index (`labels['prefect.resource.id']`) at the root.
        if self.prefix.is_empty()
            && let Some((_, v)) = self.labels.iter().find(|(k, _)| k == part)
            && !self.labels.iter().any(|(k, _)| {
                k.len() > part.len() && k.starts_with(part) && k.as_bytes()[part.len()] == b'.'
            })
        {
            return Some(Value::from(v.as_str()));
        }
        let path = if self.prefix.is_empty() {
            part.to_owned()
        } else {
            format!("{}.{part}", self.prefix)
        };
        let deeper = self.labels.iter().any(|(k, _)| {
            k.len() > path.len() && k.starts_with(&path) && k.as_bytes()[path.len()] == b'.'
        });
        let exact = self.labels.iter().find(|(k, _)| *k == path);
        match (exact, deeper) {
            (Some((_, v)), false) => Some(Value::from(v.as_str())),
            (None, false) => None,
            _ => Some(Value::from_object(LabelDiver {
                labels: self.labels.clone(),
                prefix: path,
            })),
        }
    }

    fn enumerate(self: &Arc<Self>) -> Enumerator {
        if self.prefix.is_empty() {
            let keys: Vec<Value> = self
                .labels
                .iter()
                .map(|(k, _)| Value::from(k.as_str()))
                .collect();
            Enumerator::Values(keys)
        } else {
            Enumerator::NonEnumerable
        }
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.prefix.is_empty() {
            // The labels as a Python dict (Prefect's own LabelDiver prints as nothing).
            let map = Value::from_pairs(
                self.labels
                    .iter()
                    .map(|(k, v)| (k.as_str(), Value::from(v.as_str()))),
            );
            let text = crate::python::py_repr(&map).map_err(|_| std::fmt::Error)?;
            f.write_str(&text)
        } else {
            f.write_str(self.exact().unwrap_or(""))
        }
    }
}

/// A timestamp: renders like Python's `str(datetime)` (`2024-05-01 12:00:00+00:00`), which is
/// what Prefect's templates print; `tojson` gives the ISO form pydantic writes
/// (`2024-05-01T12:00:00Z`).
#[derive(Debug)]
pub struct DateTimeView(pub chrono::DateTime<chrono::Utc>);

impl DateTimeView {
    /// The JSON (pydantic) form.
    pub fn iso(&self) -> String {
        format_timestamp(self.0)
    }
}

impl Object for DateTimeView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        use chrono::{Datelike, Timelike};
        let t = self.0;
        Some(Value::from(match key.as_str()? {
            "year" => t.year() as i64,
            "month" => t.month() as i64,
            "day" => t.day() as i64,
            "hour" => t.hour() as i64,
            "minute" => t.minute() as i64,
            "second" => t.second() as i64,
            "microsecond" => (t.nanosecond() / 1000) as i64,
            // Event times are UTC; Python prints their zone as `UTC`.
            "tzinfo" => return Some(Value::from("UTC")),
            _ => return None,
        }))
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &mut State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        match method {
            "isoformat" => Ok(Value::from(
                self.0
                    .format("%Y-%m-%dT%H:%M:%S%.f+00:00")
                    .to_string()
                    .replace(".+", "+"),
            )),
            "timestamp" => Ok(Value::from(self.0.timestamp_micros() as f64 / 1e6)),
            "date" => Ok(Value::from_object(DateView(self.0.date_naive()))),
            "strftime" => {
                let format = args
                    .first()
                    .and_then(Value::as_str)
                    .unwrap_or("%Y-%m-%d %H:%M:%S");
                let mut out = String::new();
                use std::fmt::Write;
                write!(out, "{}", self.0.format(format))
                    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime: bad format"))?;
                Ok(Value::from(out))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        }
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let micros = self.0.timestamp_subsec_micros();
        if micros == 0 {
            write!(f, "{}+00:00", self.0.format("%Y-%m-%d %H:%M:%S"))
        } else {
            write!(
                f,
                "{}.{micros:06}+00:00",
                self.0.format("%Y-%m-%d %H:%M:%S")
            )
        }
    }
}

/// A calendar date (`event.occurred.date()`): prints as Python's `str(date)` (`2024-05-01`),
/// with `year`, `month`, `day`, `isoformat()` and `strftime()`.
#[derive(Debug)]
pub struct DateView(pub chrono::NaiveDate);

impl Object for DateView {
    fn repr(self: &Arc<Self>) -> ObjectRepr {
        ObjectRepr::Plain
    }

    fn get_value(self: &Arc<Self>, key: &Value) -> Option<Value> {
        use chrono::Datelike;
        Some(Value::from(match key.as_str()? {
            "year" => self.0.year() as i64,
            "month" => self.0.month() as i64,
            "day" => self.0.day() as i64,
            _ => return None,
        }))
    }

    fn call_method(
        self: &Arc<Self>,
        _state: &mut State<'_, '_>,
        method: &str,
        args: &[Value],
    ) -> Result<Value, Error> {
        match method {
            "isoformat" => Ok(Value::from(self.0.format("%Y-%m-%d").to_string())),
            "strftime" => {
                let format = args.first().and_then(Value::as_str).unwrap_or("%Y-%m-%d");
                let mut out = String::new();
                use std::fmt::Write;
                write!(out, "{}", self.0.format(format))
                    .map_err(|_| Error::new(ErrorKind::InvalidOperation, "strftime: bad format"))?;
                Ok(Value::from(out))
            }
            _ => Err(Error::from(ErrorKind::UnknownMethod)),
        }
    }

    fn render(self: &Arc<Self>, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0.format("%Y-%m-%d"))
    }
}
