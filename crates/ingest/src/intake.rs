//! The one door into the pipeline.
//!
//! Every source turns what it receives into [`Event`]s with [`normalize`] and hands them to an
//! [`Intake`]. `submit` resolves only when the pipeline has made the events durable (written
//! to the event log and applied to the trigger engine), so a source can acknowledge its sender
//! — an HTTP 204, a websocket pong, a JetStream ack — knowing nothing will be lost.
//! The channel is bounded: when the pipeline falls behind, `try_submit` says so at once
//! (HTTP answers 429) and `submit` waits (NATS and websockets slow down instead).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde_json::Value;
use spur_core::{Event, EventError, EventLimits};
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};

use crate::cloudevents;

/// What the pipeline reports back for a submission.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Receipt {
    /// Events newly stored.
    pub accepted: usize,
    /// Events whose id was already in the log.
    pub duplicates: usize,
    /// The highest event-log position written for this submission (0 if none).
    pub last_seq: u64,
    /// The events newly stored, handed back once the pipeline is done with them. Most are
    /// freed when the receipt is dropped, on the submitting task's thread: the pipeline is
    /// the one serial stage of ingest, and freeing an event there (memory another thread
    /// allocated) took ~10 % of its time under load.
    pub stored: Vec<std::sync::Arc<Event>>,
}

/// A batch on its way to the pipeline, with the channel to report back on.
#[derive(Debug)]
pub struct Submission {
    /// The events, already normalized and validated.
    pub events: Vec<Event>,
    /// Each event's stored JSON, in the same order. Encoded by the submitting task, so the
    /// single pipeline thread only writes bytes (serializing was its largest per-event cost).
    pub encoded: Vec<Vec<u8>>,
    /// Resolved once the events are durable.
    pub done: oneshot::Sender<Result<Receipt, String>>,
    /// When the batch was read from a JetStream stream: the stream sequence of its last
    /// message. A checkpoint names the greatest one it covers, so an instance that starts
    /// from the checkpoint knows where in the stream to begin.
    pub stream_seq: Option<u64>,
}

impl Submission {
    /// Encodes `events` for the log and pairs them with `done`.
    pub fn new(
        events: Vec<Event>,
        done: oneshot::Sender<Result<Receipt, String>>,
    ) -> Result<Submission, SubmitError> {
        let encoded = events
            .iter()
            .map(Event::to_json_bytes)
            .collect::<Result<_, _>>()
            .map_err(|e| SubmitError::Failed(format!("cannot encode an event: {e}")))?;
        Ok(Submission {
            events,
            encoded,
            done,
            stream_seq: None,
        })
    }
}

/// Why a submission failed.
#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum SubmitError {
    /// The pipeline is at capacity (back-pressure): retry later.
    #[error("the event pipeline is busy; retry shortly")]
    Busy,
    /// The daemon is shutting down.
    #[error("the daemon is shutting down")]
    Closed,
    /// The pipeline could not store the events.
    #[error("the events could not be stored: {0}")]
    Failed(String),
    /// The store the events go to first (the JetStream stream, with `--nats-log`) did not
    /// take them: nothing was accepted, the caller may retry.
    #[error("the event stream is unavailable: {0}")]
    Unavailable(String),
}

/// Counters every source updates (exported on `/metrics`).
#[derive(Debug, Default)]
pub struct IngestCounters {
    /// Events accepted into the log.
    pub accepted: AtomicU64,
    /// Redeliveries dropped by id.
    pub duplicates: AtomicU64,
    /// Events refused as malformed.
    pub rejected: AtomicU64,
    /// Submissions refused for back-pressure.
    pub throttled: AtomicU64,
}

/// A cloneable handle to the pipeline's intake.
#[derive(Clone, Debug)]
pub struct Intake {
    tx: mpsc::Sender<Submission>,
    limits: EventLimits,
    counters: Arc<IngestCounters>,
    /// For the doors other than NATS: also put what becomes durable into the stream.
    forwarder: Option<Arc<dyn Forward>>,
    /// For the doors other than NATS, with the stream as the log: publish there instead of
    /// submitting here (the events reach the pipeline through the stream's consumer).
    publisher: Option<Arc<dyn Publish>>,
}

/// What resolves once a [`Publish`] holds the events durably.
pub type Published =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<Receipt, SubmitError>> + Send>>;

/// Where a door's events go *instead of* the pipeline when a log outside Spur comes first (the
/// JetStream stream, `crate::nats::StreamPublisher`): the caller is answered once that log
/// has them, and Spur stores and evaluates them when it reads them back, in the log's order.
pub trait Publish: std::fmt::Debug + Send + Sync {
    /// Publishes `events` (in order); the future resolves once every one is acknowledged.
    fn publish(&self, events: Vec<Event>) -> Published;
}

/// Where a door's events also go once they are durable: the JetStream forwarder
/// (the NATS source's `Forwarder`). A trait, so the intake, which every source depends on,
/// depends on none of them.
pub trait Forward: std::fmt::Debug + Send + Sync {
    /// Before `events` are submitted (the forwarder notes they may be processed elsewhere).
    fn note(&self, events: &[Event]);
    /// Once `events` are durable: send them on. Never waits.
    fn forward(&self, events: Vec<Event>);
}

impl Intake {
    /// An intake feeding `tx`.
    pub fn new(tx: mpsc::Sender<Submission>, limits: EventLimits) -> Intake {
        Intake {
            tx,
            limits,
            counters: Arc::new(IngestCounters::default()),
            forwarder: None,
            publisher: None,
        }
    }

    /// This intake, publishing every event to `publisher` instead of submitting it (see
    /// [`Publish`]). For the HTTP, websocket and webhook doors with the stream as the log.
    pub fn publishing_to(&self, publisher: Arc<dyn Publish>) -> Intake {
        Intake {
            forwarder: None,
            publisher: Some(publisher),
            ..self.clone()
        }
    }

    /// This intake, also forwarding every event it makes durable to the JetStream stream
    /// (the NATS source's `Forwarder`). For the HTTP, websocket and webhook doors; the NATS
    /// source and Spur's own events use the plain intake.
    pub fn forwarding_to(&self, forwarder: Arc<dyn Forward>) -> Intake {
        Intake {
            forwarder: Some(forwarder),
            ..self.clone()
        }
    }

    /// The limits events are validated against.
    pub fn limits(&self) -> &EventLimits {
        &self.limits
    }

    /// The shared counters.
    pub fn counters(&self) -> &Arc<IngestCounters> {
        &self.counters
    }

    /// Records a malformed event (for metrics).
    pub fn count_rejected(&self, n: u64) {
        self.counters.rejected.fetch_add(n, Ordering::Relaxed);
    }

    /// Submits and waits for durability; waits for room if the pipeline is busy.
    pub async fn submit(&self, events: Vec<Event>) -> Result<Receipt, SubmitError> {
        self.enqueue(events).await?.await
    }

    /// Hands events to the pipeline now (waiting for room if it is busy) and returns what
    /// resolves once they are durable. Submissions are processed in the order they are
    /// enqueued, so a source that enqueues in its own order sees them become durable in it.
    pub async fn enqueue(
        &self,
        events: Vec<Event>,
    ) -> Result<
        impl std::future::Future<Output = Result<Receipt, SubmitError>> + Send + 'static,
        SubmitError,
    > {
        self.enqueue_at(events, None).await
    }

    /// [`Intake::enqueue`] for a batch read from a JetStream stream, whose last message has
    /// the stream sequence `stream_seq` (see [`Submission::stream_seq`]).
    pub async fn enqueue_at(
        &self,
        mut events: Vec<Event>,
        stream_seq: Option<u64>,
    ) -> Result<
        impl std::future::Future<Output = Result<Receipt, SubmitError>> + Send + 'static,
        SubmitError,
    > {
        let intake = self.clone();
        if events.is_empty() {
            return Ok(futures_util::future::Either::Left(std::future::ready(Ok(
                Receipt::default(),
            ))));
        }
        for e in &mut events {
            // Microsecond timestamps everywhere, like Prefect's (events Spur makes itself
            // come through here too).
            e.occurred = chrono::SubsecRound::trunc_subsecs(e.occurred, 6);
            e.received = chrono::SubsecRound::trunc_subsecs(e.received, 6);
        }
        if let Some(publisher) = &self.publisher {
            return Ok(futures_util::future::Either::Right(
                futures_util::future::Either::Left(self.published(publisher.publish(events))),
            ));
        }
        let forwarded = self.forwarding(&events);
        let (done, wait) = oneshot::channel();
        let mut submission = Submission::new(events, done)?;
        submission.stream_seq = stream_seq;
        self.tx
            .send(submission)
            .await
            .map_err(|_| SubmitError::Closed)?;
        Ok(futures_util::future::Either::Right(
            futures_util::future::Either::Right(
                async move { intake.finish(wait, forwarded).await },
            ),
        ))
    }

    /// Counts what a [`Publish`] acknowledged.
    fn published(
        &self,
        published: Published,
    ) -> impl std::future::Future<Output = Result<Receipt, SubmitError>> + Send + 'static {
        let counters = self.counters.clone();
        async move {
            let receipt = published.await?;
            counters
                .accepted
                .fetch_add(receipt.accepted as u64, Ordering::Relaxed);
            counters
                .duplicates
                .fetch_add(receipt.duplicates as u64, Ordering::Relaxed);
            Ok(receipt)
        }
    }

    /// With a forwarder: notes `events` and keeps a copy to forward once they are durable.
    fn forwarding(&self, events: &[Event]) -> Option<(Arc<dyn Forward>, Vec<Event>)> {
        let forwarder = self.forwarder.as_ref()?;
        forwarder.note(events);
        Some((forwarder.clone(), events.to_vec()))
    }

    /// Submits and waits for durability, or fails at once with [`SubmitError::Busy`].
    pub async fn try_submit(&self, events: Vec<Event>) -> Result<Receipt, SubmitError> {
        if events.is_empty() {
            return Ok(Receipt::default());
        }
        if let Some(publisher) = &self.publisher {
            // The stream applies its own back-pressure: a publish it cannot take fails.
            return self.published(publisher.publish(events)).await;
        }
        let forwarded = self.forwarding(&events);
        let (done, wait) = oneshot::channel();
        match self.tx.try_send(Submission::new(events, done)?) {
            Ok(()) => self.finish(wait, forwarded).await,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.counters.throttled.fetch_add(1, Ordering::Relaxed);
                Err(SubmitError::Busy)
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Err(SubmitError::Closed),
        }
    }

    async fn finish(
        &self,
        wait: oneshot::Receiver<Result<Receipt, String>>,
        forwarded: Option<(Arc<dyn Forward>, Vec<Event>)>,
    ) -> Result<Receipt, SubmitError> {
        match wait.await {
            Ok(Ok(receipt)) => {
                if let Some((forwarder, events)) = forwarded {
                    forwarder.forward(events);
                }
                self.counters
                    .accepted
                    .fetch_add(receipt.accepted as u64, Ordering::Relaxed);
                self.counters
                    .duplicates
                    .fetch_add(receipt.duplicates as u64, Ordering::Relaxed);
                Ok(receipt)
            }
            Ok(Err(reason)) => Err(SubmitError::Failed(reason)),
            Err(_) => Err(SubmitError::Closed),
        }
    }
}

/// Why a received JSON document did not become an event.
#[derive(Debug, Error)]
pub enum DocumentError {
    /// The bytes are not JSON.
    #[error("not valid JSON: {0}")]
    NotJson(#[from] serde_json::Error),
    /// JSON, but not an acceptable event (the field and the reason).
    #[error(transparent)]
    Invalid(#[from] EventError),
}

/// Turns one received JSON document, as bytes, into an event: [`normalize`]'s answer, and the
/// fast way for the common case.
///
/// A plain Prefect event is read straight into an [`Event`] (`Event::from_slice_direct`),
/// skipping the `Value` tree (about a quarter of an ingest worker's time under load). Anything
/// else (a CloudEvent, an invalid event, an unusual but valid shape) is parsed into a `Value`
/// and goes through [`normalize`], so errors and edge cases are exactly its own.
pub fn normalize_document(
    bytes: &[u8],
    received: DateTime<Utc>,
    limits: &EventLimits,
) -> Result<Event, DocumentError> {
    let received = chrono::SubsecRound::trunc_subsecs(received, 6);
    if let Some(event) = Event::from_slice_direct(bytes, received, limits)
        && let Ok(event) = finish(event, limits)
    {
        return Ok(event);
    }
    let value: Value = serde_json::from_slice(bytes)?;
    Ok(normalize(value, received, limits)?)
}

/// [`normalize_document`] with the error as its reason, ready to log or send back.
pub fn normalize_slice(
    bytes: &[u8],
    received: DateTime<Utc>,
    limits: &EventLimits,
) -> Result<Event, String> {
    normalize_document(bytes, received, limits).map_err(|e| e.to_string())
}

/// Turns one received JSON document into an event: a Prefect event (partial allowed) or a
/// structured-mode CloudEvent. `received` is now.
pub fn normalize(
    value: Value,
    received: DateTime<Utc>,
    limits: &EventLimits,
) -> Result<Event, EventError> {
    // Microseconds, like Prefect's timestamps (and so they survive every JSON round trip).
    let received = chrono::SubsecRound::trunc_subsecs(received, 6);
    let event = if cloudevents::is_cloud_event(&value) {
        cloudevents::to_event(&value, received, limits)?
    } else {
        Event::from_value(value, received, limits)?
    };
    finish(event, limits)
}

/// What every parsed event goes through last, whichever way it was parsed: `occurred` to
/// microseconds, and the size limit.
fn finish(mut event: Event, limits: &EventLimits) -> Result<Event, EventError> {
    event.occurred = chrono::SubsecRound::trunc_subsecs(event.occurred, 6);
    event.check_size(limits)?;
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn received() -> DateTime<Utc> {
        "2024-05-01T12:00:00.123456789Z"
            .parse()
            .expect("valid timestamp")
    }

    /// `normalize_slice` answers exactly as `normalize` on the parsed value, whichever lane
    /// it takes: a plain event (direct), a CloudEvent, a numeric timestamp (general).
    #[test]
    fn bytes_and_values_give_the_same_events() {
        let limits = EventLimits::default();
        for text in [
            r#"{"event": "a.b", "resource": {"prefect.resource.id": "r"}, "occurred": "2024-05-01T11:00:00.1234567Z", "id": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11"}"#,
            r#"{"event": "a.b", "resource": {"prefect.resource.id": "r"}, "occurred": 1714561200.5, "id": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11"}"#,
            r#"{"specversion": "1.0", "type": "com.example.paid", "source": "/shop", "id": "0b6f1a4e-6f2c-4d1e-9a57-6c1d2b0e8f11", "time": "2024-05-01T11:00:00Z", "data": {"n": 1}}"#,
        ] {
            let value: Value = serde_json::from_str(text).expect("JSON");
            let expected = normalize(value, received(), &limits).expect("valid");
            let got = normalize_slice(text.as_bytes(), received(), &limits).expect("valid");
            assert_eq!(got, expected, "{text}");
            assert_eq!(
                got.received.timestamp_subsec_nanos() % 1000,
                0,
                "µs precision"
            );
        }
    }

    #[test]
    fn refusals_name_the_reason() {
        let limits = EventLimits::default();
        let not_json = normalize_slice(b"{\"event\": ", received(), &limits).unwrap_err();
        assert!(not_json.starts_with("not valid JSON: "), "{not_json}");
        let text = r#"{"event": "a.b", "resource": {"prefect.resource.id": "r"}, "related": [{"prefect.resource.id": "q"}]}"#;
        let refused = normalize_slice(text.as_bytes(), received(), &limits).unwrap_err();
        let value: Value = serde_json::from_str(text).expect("JSON");
        let expected = normalize(value, received(), &limits).unwrap_err();
        assert_eq!(refused, expected.to_string());
        assert!(refused.contains("prefect.resource.role"), "{refused}");
    }
}
