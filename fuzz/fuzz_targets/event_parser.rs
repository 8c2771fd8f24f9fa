//! The event parser: bytes as they arrive over HTTP, the websocket or NATS.
//!
//! Beyond "never panics", this checks the two lanes against each other: whenever the fast
//! direct lane (`Event::from_slice_direct`) accepts an event, the general rule book
//! (`Event::from_value`) must accept the same bytes with the same event (ids aside when the
//! sender gave none: each lane draws a fresh UUIDv7). And a parsed event must survive its
//! own encoding: stored events are read back with `from_stored_value`.
#![no_main]

use chrono::{DateTime, Utc};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spur_core::{Event, EventLimits};

fuzz_target!(|data: &[u8]| {
    let received: DateTime<Utc> =
        DateTime::from_timestamp(1_714_564_800, 123_456_000).expect("a valid fixed timestamp");
    let limits = EventLimits::default();
    let direct = Event::from_slice_direct(data, received, &limits);
    let general = serde_json::from_slice::<Value>(data)
        .ok()
        .map(|v| Event::from_value(v, received, &limits));
    if let Some(direct) = &direct {
        let general = match &general {
            Some(Ok(event)) => event,
            other => panic!("direct lane accepted what the general lane refused: {other:?}"),
        };
        let mut direct = direct.clone();
        if direct.id != general.id {
            direct.id = general.id; // both drew a fresh id
        }
        assert_eq!(&direct, general, "the two lanes disagree");
    }
    if let Some(Ok(event)) = general {
        let bytes = event.to_json_bytes().expect("an event always encodes");
        let stored: Value = serde_json::from_slice(&bytes).expect("encoded events are JSON");
        let back = Event::from_stored_value(stored).expect("stored events read back");
        assert_eq!(back.id, event.id);
        assert_eq!(back.event, event.event);
        assert_eq!(back.resource, event.resource);
    }
    // The ingest entry point, as every source calls it (CloudEvents included).
    let _ = spur_ingest::intake::normalize_document(data, received, &limits);
});
