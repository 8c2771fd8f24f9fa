//! `spur-action`: what firings set in motion.
//!
//! * [`deployment`] — deployments declared in YAML and their launchers.
//! * [`run`] — flow runs, Prefect's state names, and the `prefect.flow-run.<State>` events that
//!   let one run trigger the next.
//! * [`launcher`] — the command launcher (parameters on stdin and in `SPUR_PARAMETERS`).
//! * [`remote`] — the `http` and `prefect` launchers.
//! * [`schema`] — JSON Schema checks of parameters before launch.
//! * [`worker`] — runs on `spur worker` processes over NATS (a queue group per pool).
#![warn(missing_docs)]

pub mod deployment;
pub mod launcher;
pub mod remote;
pub mod run;
pub mod schema;
pub mod worker;

pub use deployment::{Deployment, Launcher};
pub use run::{Outcome, Run, RunState, RunTarget};
