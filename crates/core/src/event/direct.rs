//! Reading an event straight from JSON bytes, without a `serde_json::Value` tree in between.
//!
//! [`Event::from_value`] is the rule book: it takes any JSON value and either builds an event
//! or names what is wrong. Building that value first costs a map, a `String` per key and a
//! move of every field into the event; under load that was about a quarter of the ingest
//! workers' time. This module is the fast lane beside it: a serde visitor that reads a
//! *well-formed* Prefect event directly into an [`Event`].
//!
//! It never decides anything the rule book would not. It accepts only the plain shape
//! (string labels, string ids and timestamps, an object or null payload, no duplicate keys,
//! no `specversion`, which marks a CloudEvent for the ingest layer) and checks the same
//! limits with the same code; anything else makes it give up (`None`), and the caller takes
//! the general path, which then produces the exact error or the exotic-but-valid event.
//! A property test holds the two lanes to the same answers.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer};
use serde_json::Value;
use uuid::Uuid;

use super::{
    Event, EventLimits, Resource, check_name, check_related_count, parse_uuid_str, payload_or_empty,
};
use crate::time::parse_timestamp_str;

impl Event {
    /// Parses a well-formed untrusted event from JSON bytes, like [`Event::from_value`] on the
    /// parsed bytes would, but without building the intermediate `Value`.
    ///
    /// `None` means "not the plain shape": invalid JSON, a wrong type or a limit exceeded,
    /// duplicate keys, a numeric timestamp, a string with escapes where an id is expected, or
    /// a `specversion` key. The caller then parses the bytes the general way, which gives the
    /// precise error (or accepts what this lane does not handle).
    pub fn from_slice_direct(
        bytes: &[u8],
        received: DateTime<Utc>,
        limits: &EventLimits,
    ) -> Option<Event> {
        // UTF-8 first: serde_json skips ignored values (unknown keys) without checking their
        // bytes, so invalid UTF-8 there would pass here while the general lane refuses the
        // document (found by the `event_parser` fuzz target). One validation pass, then the
        // `str` reader, which does not check again.
        let text = std::str::from_utf8(bytes).ok()?;
        let wire: WireEvent = serde_json::from_str(text).ok()?;
        // The same rules as the general path, in the same helpers; any refusal gives up.
        let name = wire.event?;
        check_name(&name, limits).ok()?;
        let resource = Resource::checked(wire.resource?, "resource", false, limits).ok()?;
        let related = match wire.related {
            None => Vec::new(),
            Some(list) => {
                check_related_count(list.len(), limits).ok()?;
                list.into_iter()
                    .map(|labels| Resource::checked(labels, "related", true, limits).ok())
                    .collect::<Option<Vec<_>>>()?
            }
        };
        let payload = payload_or_empty(wire.payload).ok()?;
        let id = match wire.id {
            None => Uuid::now_v7(),
            Some(text) => parse_uuid_str(text, "id").ok()?,
        };
        let follows = match wire.follows {
            None => None,
            Some(text) => Some(parse_uuid_str(text, "follows").ok()?),
        };
        let occurred = match wire.occurred {
            None => received,
            Some(text) => parse_timestamp_str(text).ok()?,
        };
        Some(Event {
            id,
            occurred,
            event: name,
            resource,
            related,
            payload,
            follows,
            received,
        })
    }
}

/// The fields of an event as they arrive; `None` for absent (and, for `event`, `resource`
/// and `follows`, for `null`).
struct WireEvent<'a> {
    event: Option<String>,
    resource: Option<Vec<(String, String)>>,
    related: Option<Vec<Vec<(String, String)>>>,
    payload: Option<Value>,
    id: Option<&'a str>,
    follows: Option<&'a str>,
    occurred: Option<&'a str>,
}

/// The top-level keys this lane reads; every other key is skipped (Prefect ignores them).
#[derive(Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(field_identifier, rename_all = "lowercase")]
enum Key {
    Event,
    Resource,
    Related,
    Payload,
    Id,
    Follows,
    Occurred,
    /// A CloudEvent: not this lane's business.
    Specversion,
    #[serde(other)]
    Other,
}

impl<'de: 'a, 'a> Deserialize<'de> for WireEvent<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_map(WireEventVisitor(std::marker::PhantomData))
    }
}

struct WireEventVisitor<'a>(std::marker::PhantomData<&'a ()>);

impl<'de: 'a, 'a> Visitor<'de> for WireEventVisitor<'a> {
    type Value = WireEvent<'a>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Prefect event object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<WireEvent<'a>, A::Error> {
        let mut wire = WireEvent {
            event: None,
            resource: None,
            related: None,
            payload: None,
            id: None,
            follows: None,
            occurred: None,
        };
        // Keys seen so far: a repeated key gives up (the general path keeps the last value).
        let mut seen = [false; 7];
        let mut first = |key: Key| -> Result<(), A::Error> {
            let slot = &mut seen[key as usize];
            if *slot {
                return Err(de::Error::custom("a repeated key"));
            }
            *slot = true;
            Ok(())
        };
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::Other => {
                    map.next_value::<Checked>()?;
                    continue;
                }
                Key::Specversion => return Err(de::Error::custom("a CloudEvent")),
                _ => first(key)?,
            }
            match key {
                Key::Event => wire.event = map.next_value()?,
                Key::Resource => wire.resource = map.next_value_seed(Optional(Labels))?,
                // `null` is refused for these (Prefect's models refuse it): reading them as
                // non-optional makes a `null` give up, and the general lane says why.
                Key::Related => wire.related = Some(map.next_value_seed(ResourceList)?),
                Key::Payload => wire.payload = Some(map.next_value()?),
                Key::Id => wire.id = Some(map.next_value()?),
                Key::Follows => wire.follows = map.next_value()?,
                Key::Occurred => wire.occurred = Some(map.next_value()?),
                Key::Specversion | Key::Other => unreachable!("handled above"),
            }
        }
        Ok(wire)
    }
}

/// An ignored member's value, read in full and dropped.
///
/// Not serde's `IgnoredAny`: serde_json skips those without checking them, so a lone
/// surrogate escape (`"\uDB8f"`) or an out-of-range number in an unknown member passed here
/// while the general lane, which parses every member into a `Value`, refuses the document
/// (found by the `event_parser` fuzz target). Reading through `deserialize_any` runs the same
/// string, escape and number checks as `Value`, without allocating for plain strings.
struct Checked;

impl<'de> Deserialize<'de> for Checked {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(Checked)
    }
}

impl<'de> Visitor<'de> for Checked {
    type Value = Checked;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Checked, E> {
        Ok(Checked)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Checked, A::Error> {
        while seq.next_element::<Checked>()?.is_some() {}
        Ok(Checked)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Checked, A::Error> {
        while map.next_entry::<Checked, Checked>()?.is_some() {}
        Ok(Checked)
    }
}

/// `null` as `None`, anything else read by the seed `S` (a resource's labels, `related`).
struct Optional<S>(S);

impl<'de, S: DeserializeSeed<'de>> DeserializeSeed<'de> for Optional<S> {
    type Value = Option<S::Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_option(self)
    }
}

impl<'de, S: DeserializeSeed<'de>> Visitor<'de> for Optional<S> {
    type Value = Option<S::Value>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("null or a value")
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(None)
    }

    fn visit_some<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        self.0.deserialize(deserializer).map(Some)
    }
}

/// A resource's labels: a JSON object of string values, in order, no key twice.
struct Labels;

impl<'de> DeserializeSeed<'de> for Labels {
    type Value = Vec<(String, String)>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for Labels {
    type Value = Vec<(String, String)>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an object of string labels")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut labels: Vec<(String, String)> = Vec::with_capacity(map.size_hint().unwrap_or(4));
        while let Some((key, value)) = map.next_entry::<String, String>()? {
            if labels.iter().any(|(k, _)| *k == key) {
                return Err(de::Error::custom("a repeated label"));
            }
            labels.push((key, value));
        }
        Ok(labels)
    }
}

/// `related`: a list of label objects.
struct ResourceList;

impl<'de> DeserializeSeed<'de> for ResourceList {
    type Value = Vec<Vec<(String, String)>>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_seq(self)
    }
}

impl<'de> Visitor<'de> for ResourceList {
    type Value = Vec<Vec<(String, String)>>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of resources")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut list = Vec::with_capacity(seq.size_hint().unwrap_or(2));
        while let Some(labels) = seq.next_element_seed(Labels)? {
            list.push(labels);
        }
        Ok(list)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use serde_json::Map;

    fn received() -> DateTime<Utc> {
        "2024-05-01T12:00:00.123456Z"
            .parse()
            .expect("valid timestamp")
    }

    /// Both lanes on the same bytes: the general one's answer, and the direct one's.
    fn both(text: &str, limits: &EventLimits) -> (Option<Result<Event, String>>, Option<Event>) {
        let general = serde_json::from_slice::<Value>(text.as_bytes())
            .ok()
            .map(|v| Event::from_value(v, received(), limits).map_err(|e| e.to_string()));
        (
            general,
            Event::from_slice_direct(text.as_bytes(), received(), limits),
        )
    }

    #[test]
    fn a_plain_prefect_event_takes_the_direct_lane_with_the_same_result() {
        let text = r#"{
            "occurred": "2024-05-01T11:59:59.5+02:00",
            "event": "prefect.flow-run.Completed",
            "resource": {"prefect.resource.id": "prefect.flow-run.1", "prefect.resource.name": "nice-fox"},
            "related": [{"prefect.resource.id": "prefect.flow.2", "prefect.resource.role": "flow"}],
            "payload": {"intended": {"from": "RUNNING", "to": "COMPLETED"}, "n": [1, 2.5, null]},
            "id": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11",
            "follows": "1c7f2b5f-7a3d-4e2f-8b68-7d2e3c1f9a22",
            "received": "1999-01-01T00:00:00Z",
            "extra": {"ignored": true}
        }"#;
        let (general, direct) = both(text, &EventLimits::default());
        let direct = direct.expect("a plain event takes the direct lane");
        assert_eq!(Some(Ok(direct.clone())), general);
        assert_eq!(direct.received, received(), "a sent `received` is ignored");
        assert_eq!(direct.related[0].role(), Some("flow"));
    }

    #[test]
    fn defaults_match_the_general_lane() {
        let text = r#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "follows": null}"#;
        let (general, direct) = both(text, &EventLimits::default());
        let mut direct = direct.expect("direct lane");
        let general = general.expect("JSON").expect("valid");
        assert_eq!(direct.occurred, received());
        assert_eq!(direct.payload, Value::Object(Map::new()));
        direct.id = general.id; // both fresh UUIDv7s
        assert_eq!(direct, general);
    }

    #[test]
    fn what_the_direct_lane_leaves_to_the_general_one() {
        let limits = EventLimits::default();
        for text in [
            r#"{"specversion": "1.0", "type": "t", "source": "s", "id": "1"}"#,
            r#"{"event": "x", "event": "y", "resource": {"prefect.resource.id": "r"}}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r", "prefect.resource.id": "s"}}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "occurred": 1714564800}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "id": "not-a-uuid"}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": 7}}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": ""}}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "related": [{"prefect.resource.id": "q"}]}"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "payload": []}"#,
            r#"{"event": "x"}"#,
            r#"[1, 2]"#,
            r#"{"event": "x", "resource": {"prefect.resource.id": "r"}} trailing"#,
        ] {
            assert!(
                Event::from_slice_direct(text.as_bytes(), received(), &limits).is_none(),
                "{text}"
            );
        }
    }

    /// Regressions (fuzzing): invalid UTF-8 or a lone surrogate escape inside an ignored
    /// member made the direct lane accept a document the general lane refuses as not JSON.
    #[test]
    fn an_invalid_ignored_member_is_left_to_the_general_lane() {
        let limits = EventLimits::default();
        for bytes in [
            &b"{\"event\": \"x\", \"resource\": {\"prefect.resource.id\": \"r\"}, \"other\": \"\x90\x96\"}"[..],
            &b"{\"event\": \"x\", \"resource\": {\"prefect.resource.id\": \"r\"}, \"o\": [{\"k\xff\": 1}]}"[..],
        ] {
            assert!(serde_json::from_slice::<Value>(bytes).is_err());
            assert!(Event::from_slice_direct(bytes, received(), &limits).is_none());
        }
        // Round 2: a lone surrogate escape in an unknown member.
        let surrogate = br#"{"event": "x", "resource": {"prefect.resource.id": "r"}, "iAd": "0b67-6c1d2b0e\uDB8f11"}"#;
        assert!(serde_json::from_slice::<Value>(surrogate).is_err());
        assert!(Event::from_slice_direct(surrogate, received(), &limits).is_none());
        for member in [
            r#""\u00e9\n""#,
            "[1, -2, 2.5e3, {\"k\": [null, true]}]",
            "1e400",
        ] {
            let text = format!(
                r#"{{"event": "x", "resource": {{"prefect.resource.id": "r"}}, "other": {member}}}"#
            );
            let (general, direct) = both(&text, &limits);
            assert_eq!(
                general.is_some_and(|g| g.is_ok()),
                direct.is_some(),
                "{text}"
            );
        }
        let fuzzed = b"{\"occurred\": \"2024-05-01T11:59:59.5+02:00\", \"event\": \"prCfect.flow-run.Completed\", \"resource\": {\"prefect.resource.id\": \"prefect.flow-run.0\", \"prefect.resource.name\": \"nice-fox\"}, \"payloid\": [{\"prefect.resource.id\": \"prefect.flow.2\", \"prefect.resource\xd2\x8d\x90\x96e\": \"flow\"}], \"payload\": {\"n\": [1, 2.5, null]}, \"id\": \"0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11\"}";
        assert!(Event::from_slice_direct(fuzzed, received(), &limits).is_none());
    }

    /// One JSON member for a field: mostly a plain valid value, sometimes an odd or invalid
    /// one, sometimes absent (weights in that order).
    fn member(
        key: &'static str,
        plain: Vec<&'static str>,
        odd: Vec<&'static str>,
        weights: [u32; 3],
    ) -> impl Strategy<Value = String> {
        let [plain_w, odd_w, absent_w] = weights;
        prop_oneof![
            plain_w => prop::sample::select(plain).prop_map(Some),
            odd_w => prop::sample::select(odd).prop_map(Some),
            absent_w => Just(None),
        ]
        .prop_map(move |v: Option<&str>| match v {
            Some(v) => format!("\"{key}\": {v}"),
            None => String::new(),
        })
    }

    fn event_text() -> impl Strategy<Value = String> {
        let plain_labels = vec![
            r#"{"prefect.resource.id": "r1"}"#,
            r#"{"prefect.resource.id": "r1", "a": "b", "c": "d"}"#,
            r#"{"prefect.resource.id": "r1", "prefect.resource.role": "flow"}"#,
            r#"{"prefect.resource.id": "r\u00e9", "prefect.resource.role": "t\"ag"}"#,
        ];
        let odd_labels = vec![
            r#"{"prefect.resource.id": "", "prefect.resource.role": "flow"}"#,
            r#"{"prefect.resource.id": "r1", "prefect.resource.role": ""}"#,
            r#"{"a": "b"}"#,
            r#"{"prefect.resource.id": "r1", "n": 3}"#,
            r#"{"prefect.resource.id": "r1", "prefect.resource.id": "r2"}"#,
            r#"{}"#,
            r#"null"#,
            r#""r1""#,
        ];
        let plain_related = vec![
            "[]",
            r#"[{"prefect.resource.id": "q", "prefect.resource.role": "flow"}]"#,
            r#"[{"prefect.resource.id": "q", "prefect.resource.role": "flow"}, {"prefect.resource.id": "p", "prefect.resource.role": "tag", "x": "y"}]"#,
        ];
        let odd_related = vec![
            "null",
            r#"[{"prefect.resource.id": "q"}]"#,
            r#"[null]"#,
            r#"{"prefect.resource.id": "q"}"#,
            "7",
        ];
        let plain_ids = vec![
            r#""0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11""#,
            r#""{0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11}""#,
        ];
        // `null` is a valid `follows` but not a valid `id` (Prefect refuses it).
        let mut plain_follows = plain_ids.clone();
        plain_follows.push("null");
        let odd_ids = vec![
            "null",
            r#""0b6f1a4e\u002d6f2c-4d1e-9a57-6c1d2b0e8f11""#,
            r#""nope""#,
            "42",
        ];
        let plain_times = vec![
            r#""2024-05-01T11:00:00Z""#,
            r#""2024-05-01 11:00:00.5""#,
            r#""2024-05-01T11:00""#,
        ];
        let odd_times = vec![r#""yesterday""#, "1714564800.25", "[]", "null"];
        (
            member(
                "event",
                vec![
                    r#""a.b""#,
                    r#""prefect.flow-run.Completed""#,
                    r#""\u00e9v\u00e9nement""#,
                    r#""""#,
                ],
                vec!["null", "5", r#""a-very-long-event-name""#],
                [12, 2, 1],
            ),
            member("resource", plain_labels, odd_labels, [12, 2, 1]),
            member("related", plain_related, odd_related, [6, 1, 4]),
            member(
                "payload",
                vec!["{}", r#"{"k": [1, {"x": null}], "s": "t\n", "f": 1e400}"#],
                vec!["[]", r#""text""#, "null"],
                [6, 1, 4],
            ),
            member("id", plain_ids.clone(), odd_ids.clone(), [6, 1, 4]),
            member("follows", plain_follows, odd_ids, [3, 1, 8]),
            member("occurred", plain_times, odd_times, [6, 1, 4]),
            member(
                "received",
                vec![r#""2020-01-01T00:00:00Z""#],
                vec!["3"],
                [1, 1, 6],
            ),
            member(
                "other",
                vec!["{}", r#"{"deep": [1, 2, 3]}"#],
                vec!["null"],
                [1, 1, 6],
            ),
            member("specversion", vec![r#""1.0""#], vec!["2"], [1, 1, 20]),
            member("event", vec![r#""again""#], vec!["null"], [1, 1, 20]),
            any::<bool>(),
        )
            .prop_map(|(a, b, c, d, e, f, g, h, i, j, k, shuffle)| {
                let mut members: Vec<String> = [a, b, c, d, e, f, g, h, i, j, k]
                    .into_iter()
                    .filter(|m| !m.is_empty())
                    .collect();
                if shuffle {
                    members.reverse();
                }
                format!("{{{}}}", members.join(", "))
            })
    }

    /// The property below only means something if the direct lane answers often enough.
    #[test]
    fn the_generated_events_often_take_the_direct_lane() {
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let strategy = event_text();
        let (mut direct, mut valid) = (0, 0);
        for _ in 0..2000 {
            let text = strategy.new_tree(&mut runner).expect("a sample").current();
            let (general, answer) = both(&text, &EventLimits::default());
            valid += usize::from(matches!(general, Some(Ok(_))));
            direct += usize::from(answer.is_some());
        }
        assert!(
            direct >= 400,
            "{direct} of 2000 took the direct lane ({valid} valid)"
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4000))]

        /// Whenever the direct lane answers, the general lane accepts the same bytes and
        /// builds the same event (a fresh id aside, when none was sent).
        #[test]
        fn the_direct_lane_agrees_with_the_general_one(
            text in event_text(),
            tight in any::<bool>(),
        ) {
            let limits = if tight {
                EventLimits { max_name_length: 5, max_labels_per_resource: 2, max_related_resources: 1, ..EventLimits::default() }
            } else {
                EventLimits::default()
            };
            let (general, direct) = both(&text, &limits);
            if let Some(mut direct) = direct {
                let general = general.expect("the general lane parses the JSON");
                let general = general.expect("the general lane accepts the event");
                // No id sent: each lane made a fresh UUIDv7. The ids sent are v4s.
                if direct.id.get_version_num() == 7 && general.id.get_version_num() == 7 {
                    direct.id = general.id;
                }
                prop_assert_eq!(direct, general);
            }
        }
    }
}
