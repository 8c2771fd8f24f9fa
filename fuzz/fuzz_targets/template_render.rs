//! The template renderer: an automation's or webhook's Jinja template over an event-like
//! context. Input: `template \0 context-JSON`. Fuel, loop and output limits must stop every
//! template; rendering runs on a worker-sized stack.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use spur_template::{MAX_OUTPUT_BYTES, TemplateEngine, json_context};

fuzz_target!(|data: &[u8]| {
    let [template, context] = spur_fuzz::split_parts::<2>(data);
    spur_fuzz::on_worker_stack(move || {
        let engine = TemplateEngine::new();
        let context: Value = serde_json::from_str(&context).unwrap_or(Value::Null);
        let context = json_context(&context);
        if let Ok(out) = engine.render(&template, &context) {
            assert!(
                out.len() <= MAX_OUTPUT_BYTES,
                "output of {} bytes passed the cap",
                out.len()
            );
        }
        let _ = engine.validate(&template);
    });
});
