//! `spur-replay`: the matcher on a virtual clock, for `spur replay` and `spur test`.
//!
//! * [`replay`] — feed a recorded stream through the [`spur_matcher::Engine`] and render each
//!   firing's actions with [`spur_template`], exactly as the daemon would.
//! * [`scenario`] — load scenario files and judge the firings against their expectations.
#![warn(missing_docs)]

pub mod replay;
pub mod scenario;

pub use replay::{
    ActionRecord, FiringRecord, Replay, ReplayError, TemplateFlowKeys, check_templates,
    firing_context, flow_variables, load_automations, read_events, render_firing,
};
pub use scenario::{Outcome, Scenario, load_scenario, run_scenario};
