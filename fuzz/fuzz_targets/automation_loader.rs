//! The automation loader: any text dropped into the watched folder (YAML or JSON).
//!
//! Runs on a worker-sized stack (see `spur_fuzz::on_worker_stack`), where the hot reload
//! runs. Every diagnostic must carry a 1-based position.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data).into_owned();
    spur_fuzz::on_worker_stack(move || {
        let outcome = spur_core::load::load_str(Path::new("fuzz.yaml"), &text);
        for d in &outcome.diagnostics {
            assert!(
                d.line >= 1 && d.column >= 1,
                "a diagnostic without a position: {d}"
            );
        }
    });
});
