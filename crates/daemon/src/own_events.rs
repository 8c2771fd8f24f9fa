//! Where Spur's own events go: the `prefect.automation.*` records of a firing, the
//! `prefect.flow-run.*` states of its runs, and what `emit-event` actions emit.
//!
//! Embedded (and with NATS but without `--nats-log`) they are submitted to the local intake
//! like any event, and from there reach the stream through the forwarder when one is on.
//! With the stream as the log (`--nats-log`) they are published to the JetStream stream
//! first, exactly as the doors' events are (`spur_ingest::nats::StreamPublisher`:
//! `Nats-Msg-Id` = the event id), and reach the store and the engine through Spur's own
//! consumer, so the stream holds every event, whatever made it (issue 13, item 1).
//!
//! Two rules hold either way:
//!
//! * **Order.** The events are handed on in the order they were given: one task publishes
//!   them (what queued up meanwhile goes as one batch, one round trip), so a firing's
//!   `triggered` precedes its actions' events in the stream as it does in the log.
//! * **Nothing lost to an outage.** A batch JetStream cannot take (nats-server gone, no
//!   acknowledgement in time) is submitted to the local intake instead, and logged: the
//!   events are then in the local log only, as without `--nats-log`. Their ids are derived
//!   from the firing's, so a repeat after a crash is kept once in either place.

use spur_core::Event;
use spur_ingest::{Intake, Receipt, SubmitError};
use std::sync::OnceLock;
use tokio::sync::{mpsc, oneshot};
use tracing::warn;

/// At most this many hand-overs are published as one batch.
const BATCH: usize = 256;

/// The route of Spur's own events (see the module docs). Cheap to share behind the
/// executor's `Arc`.
#[derive(Debug)]
pub struct OwnEvents {
    /// The local intake: the route without `--nats-log`, and the fallback with it.
    local: Intake,
    /// With `--nats-log`: the queue of the task that publishes to the stream in order.
    stream: OnceLock<mpsc::UnboundedSender<HandOver>>,
}

/// Events handed over at once, and who waits for them (none for [`OwnEvents::record`]).
struct HandOver {
    events: Vec<Event>,
    done: Option<oneshot::Sender<Result<Receipt, SubmitError>>>,
}

impl OwnEvents {
    /// Own events through the local intake.
    pub fn new(local: Intake) -> OwnEvents {
        OwnEvents {
            local,
            stream: OnceLock::new(),
        }
    }

    /// From now on, publish to the stream first through `stream` (an intake made with
    /// `Intake::publishing_to`). A batch the stream refuses is published again for up to
    /// `patience` before it is stored locally: in cluster mode the other members see only
    /// what is in the stream, so a nats-server node's restart (the client reconnecting to
    /// another) must not send events to one member's log alone. Called once, at start;
    /// needs a tokio runtime.
    pub fn publish_first(&self, stream: Intake, patience: std::time::Duration) {
        let (tx, rx) = mpsc::unbounded_channel();
        if self.stream.set(tx).is_ok() {
            tokio::spawn(publish_in_order(stream, self.local.clone(), rx, patience));
        }
    }

    /// True when the events go to the stream first.
    pub fn to_the_stream(&self) -> bool {
        self.stream.get().is_some()
    }

    /// Hands `events` on and waits until they are durable (in the stream, or in the local
    /// log).
    pub async fn submit(&self, events: Vec<Event>) -> Result<Receipt, SubmitError> {
        let Some(queue) = self.stream.get() else {
            return self.local.submit(events).await;
        };
        let (done, wait) = oneshot::channel();
        queue
            .send(HandOver {
                events,
                done: Some(done),
            })
            .map_err(|_| SubmitError::Closed)?;
        wait.await.map_err(|_| SubmitError::Closed)?
    }

    /// Hands `events` on without waiting for them to become durable; a failure is logged.
    /// They still land in order (see the module docs).
    pub async fn record(&self, events: Vec<Event>) {
        if let Some(queue) = self.stream.get() {
            if queue.send(HandOver { events, done: None }).is_err() {
                warn!("cannot record a firing's events: the daemon is stopping");
            }
            return;
        }
        match self.local.enqueue(events).await {
            Ok(durable) => {
                // Awaited elsewhere, so that failures are still logged.
                tokio::spawn(async move {
                    if let Err(e) = durable.await {
                        warn!(error = %e, "cannot record a firing's events");
                    }
                });
            }
            Err(e) => warn!(error = %e, "cannot record a firing's events"),
        }
    }
}

/// The publishing task: batches what is queued, publishes it, falls back to `local` for a
/// batch the stream does not take, and answers each waiting hand-over.
async fn publish_in_order(
    stream: Intake,
    local: Intake,
    mut queue: mpsc::UnboundedReceiver<HandOver>,
    patience: std::time::Duration,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let events: Vec<Event> = batch
            .iter()
            .flat_map(|h| h.events.iter().cloned())
            .collect();
        let count = events.len();
        let give_up = tokio::time::Instant::now() + patience;
        let mut pause = std::time::Duration::from_millis(250);
        let mut outcome = stream.submit(events.clone()).await;
        while matches!(outcome, Err(SubmitError::Unavailable(_)))
            && tokio::time::Instant::now() + pause < give_up
        {
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(std::time::Duration::from_secs(2));
            outcome = stream.submit(events.clone()).await;
        }
        let outcome = match outcome {
            Err(SubmitError::Unavailable(reason)) => {
                warn!(%reason, events = count, "the event stream did not take Spur's own events; storing them locally only");
                local.submit(events).await
            }
            other => other,
        };
        if let Err(e) = &outcome
            && batch.iter().all(|h| h.done.is_none())
        {
            warn!(error = %e, events = count, "cannot record a firing's events");
        }
        for hand_over in batch {
            if let Some(done) = hand_over.done {
                let answer = match &outcome {
                    Ok(_) => Ok(Receipt {
                        accepted: hand_over.events.len(),
                        ..Receipt::default()
                    }),
                    Err(e) => Err(e.clone()),
                };
                let _ = done.send(answer);
            }
        }
    }
}
