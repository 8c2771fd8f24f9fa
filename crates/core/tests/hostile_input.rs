//! Hostile input never panics: random text through the YAML/JSON loader, random JSON through
//! event parsing, random patterns and names through the glob matchers.

use std::path::Path;

use chrono::Utc;
use proptest::prelude::*;
use serde_json::Value;
use spur_core::glob::{Glob, LabelPattern, PrefixRegex};
use spur_core::{Event, EventLimits};

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        prop::sample::select(vec![
            "event",
            "resource",
            "prefect.resource.id",
            "related",
            "payload",
            "occurred",
            "id",
            "follows"
        ])
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(
                prop::sample::select(vec![
                    "event",
                    "resource",
                    "prefect.resource.id",
                    "prefect.resource.role",
                    "related",
                    "payload",
                    "occurred",
                    "id",
                    "follows",
                    "x"
                ]),
                inner,
                0..6
            )
            .prop_map(|m| Value::Object(m.into_iter().map(|(k, v)| (k.to_owned(), v)).collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn event_parsing_never_panics(value in json()) {
        let _ = Event::from_json(&value, Utc::now(), &EventLimits::default());
    }

    #[test]
    fn loading_any_text_never_panics(text in "(?s).{0,300}") {
        let _ = spur_core::load::load_str(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn loading_yaml_shaped_text_never_panics(text in "(name|trigger|actions|type|posture|expect|within|- |: |\\{|\\}|\\[|\\]|\\n|  |event|Reactive|-1|PT5S|\"|')*") {
        let _ = spur_core::load::load_str(Path::new("fuzz.yaml"), &text);
    }

    #[test]
    fn glob_matching_never_panics(pattern in "[a-z*?\\[\\]!.é-]{0,12}", name in "[a-z.é\\[\\]-]{0,16}") {
        let _ = Glob::new(&pattern).matches(&name);
        let _ = LabelPattern::new(&pattern).matches(Some(&name));
        let _ = PrefixRegex::new([pattern.as_str()]).matches(&name);
    }
}
