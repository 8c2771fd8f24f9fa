//! `spur-ingest`: the sources that bring events into Spur.
//!
//! * [`intake`] — the [`Intake`] every source submits to, and [`normalize`], the one way raw
//!   JSON becomes an event (Prefect event or CloudEvent, validated, size-checked).
//! * [`http`] — Prefect's events API: `POST /api/events`, the `/api/events/in` websocket the
//!   stock `emit_event` uses, `/api/admin/version`.
//! * [`nats`] — NATS subjects through a JetStream durable consumer (or core NATS).
//! * [`prefect`] — a Prefect server's `/events/out` stream, gaps filled from its events API.
//! * [`cloudevents`] — CloudEvents structured and binary mode mapping.
//! * [`webhook`] — templated webhooks at `/hooks/{slug}` with request authentication.
#![warn(missing_docs)]

pub mod cloudevents;
pub mod http;
pub mod intake;
pub mod nats;
pub mod prefect;
pub mod webhook;

pub use intake::{IngestCounters, Intake, Receipt, Submission, SubmitError, normalize};
