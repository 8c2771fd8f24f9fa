//! Prometheus metrics, hand-rolled: a few atomics and one histogram need no exporter crate.

use std::fmt::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use spur_ingest::IngestCounters;
use spur_ingest::nats::NatsCounters;

/// Upper bounds (seconds) of the latency histogram buckets.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_01, 0.000_05, 0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0,
];

/// A cumulative histogram with fixed buckets.
#[derive(Debug)]
pub struct Histogram {
    counts: Vec<AtomicU64>,
    sum_micros: AtomicU64,
    count: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram {
            counts: LATENCY_BUCKETS.iter().map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
            count: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation, in seconds.
    pub fn observe(&self, seconds: f64) {
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            if seconds <= *bound {
                count.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.sum_micros
            .fetch_add((seconds.max(0.0) * 1e6) as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    /// How many observations exceeded `bound` seconds, which must be one of the bucket
    /// bounds (`None` otherwise). For load drivers that compare rounds.
    pub fn count_over(&self, bound: f64) -> Option<u64> {
        let index = LATENCY_BUCKETS.iter().position(|b| *b == bound)?;
        let within = self.counts[index].load(Ordering::Relaxed);
        Some(self.count.load(Ordering::Relaxed).saturating_sub(within))
    }

    fn render(&self, name: &str, help: &str, out: &mut String) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        for (bound, count) in LATENCY_BUCKETS.iter().zip(&self.counts) {
            let _ = writeln!(
                out,
                "{name}_bucket{{le=\"{bound}\"}} {}",
                count.load(Ordering::Relaxed)
            );
        }
        let total = self.count.load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {total}");
        let _ = writeln!(
            out,
            "{name}_sum {}",
            self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
        );
        let _ = writeln!(out, "{name}_count {total}");
    }
}

/// The daemon's metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Ingest counters (shared with the sources).
    pub ingest: Arc<IngestCounters>,
    /// NATS counters.
    pub nats: Arc<NatsCounters>,
    /// Events the engine evaluated.
    pub evaluated: AtomicU64,
    /// With JetStream: the stream sequence of the last batch the pipeline applied (gauge;
    /// a cluster member's lag is the stream's last sequence minus this).
    pub stream_seq: AtomicU64,
    /// Triggered firings.
    pub triggered: AtomicU64,
    /// Resolved firings.
    pub resolved: AtomicU64,
    /// Firings whose actions this instance performed (set when rendered; in cluster mode
    /// the member's share of the firings every member derives).
    pub acted: AtomicU64,
    /// Cluster mode: firings of partitions this member does not hold, waiting for their
    /// holder's claim (gauge; set when rendered).
    pub parked: AtomicU64,
    /// Processes of `command` runs alive now (gauge; set when rendered).
    pub processes: AtomicU64,
    /// Live buckets (gauge).
    pub buckets: AtomicU64,
    /// Firings waiting in the flow stage: open debounces and batches, throttled ones queued
    /// (gauge).
    pub flow_waiting: AtomicU64,
    /// Firings a debounce or batch folded into another.
    pub flow_collapsed: AtomicU64,
    /// Firings a throttle handed on late.
    pub flow_delayed: AtomicU64,
    /// Firings flow control skipped (throttle `drop`, a key that did not render).
    pub flow_skipped: AtomicU64,
    /// Firings waiting for a concurrency slot (gauge; set when rendered).
    pub concurrency_waiting: AtomicU64,
    /// Runs holding a concurrency slot (gauge; set when rendered).
    pub concurrency_running: AtomicU64,
    /// Loaded automations (gauge).
    pub automations: AtomicU64,
    /// Automation files currently failing to load (gauge).
    pub load_errors: AtomicU64,
    /// Per-event evaluation time.
    pub evaluation: Histogram,
    /// How late proactive deadlines were processed.
    pub timer_lag: Histogram,
    /// Durable commit time of one batch (events + firings).
    pub commit: Histogram,
    /// Pipeline time per checkpoint of the trigger state: the snapshot, and the write when
    /// it is not part of a batch's commit (encoding runs on a worker).
    pub checkpoint: Histogram,
    /// Size of the last stored checkpoint in bytes (gauge): it follows the live trigger
    /// state, not the number of automations.
    pub checkpoint_bytes: AtomicU64,
    /// Events per committed batch.
    pub batch_events: AtomicU64,
    /// Committed batches.
    pub batches: AtomicU64,
    /// Webhook requests refused by their authentication, by reason (shared with `/hooks`).
    pub webhook_auth_failures: Arc<spur_ingest::webhook::FailureCounts>,
    /// API requests the auth layer refused, by reason (see [`API_AUTH_REASONS`]).
    pub api_auth_refused: [AtomicU64; API_AUTH_REASONS.len()],
    /// The Prefect server bridge (`--prefect-api`), when configured.
    pub prefect: Option<Arc<spur_ingest::prefect::PrefectHealth>>,
}

/// The `reason` labels of `spur_api_auth_refused_total`: no credentials, wrong credentials,
/// a credential whose scope does not cover the route, a cross-site state-changing request.
pub const API_AUTH_REASONS: [&str; 4] = ["missing", "invalid", "scope", "cross_origin"];

impl Metrics {
    /// Metrics sharing the given source counters.
    pub fn new(ingest: Arc<IngestCounters>, nats: Arc<NatsCounters>) -> Metrics {
        Metrics {
            ingest,
            nats,
            ..Metrics::default()
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        let counter = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        };
        let gauge = |out: &mut String, name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            &mut out,
            "spur_events_in_total",
            "Events accepted into the event log.",
            load(&self.ingest.accepted),
        );
        counter(
            &mut out,
            "spur_events_duplicate_total",
            "Redelivered events dropped by id.",
            load(&self.ingest.duplicates),
        );
        counter(
            &mut out,
            "spur_events_rejected_total",
            "Malformed events refused.",
            load(&self.ingest.rejected),
        );
        counter(
            &mut out,
            "spur_events_throttled_total",
            "Submissions refused for back-pressure (HTTP 429).",
            load(&self.ingest.throttled),
        );
        counter(
            &mut out,
            "spur_events_evaluated_total",
            "Events evaluated by the trigger engine.",
            load(&self.evaluated),
        );
        counter(
            &mut out,
            "spur_firings_triggered_total",
            "Automation firings (triggered).",
            load(&self.triggered),
        );
        counter(
            &mut out,
            "spur_firings_resolved_total",
            "Automation firings (resolved).",
            load(&self.resolved),
        );
        counter(
            &mut out,
            "spur_firings_acted_total",
            "Firings whose actions this instance performed (cluster mode: this member's share).",
            load(&self.acted),
        );
        gauge(
            &mut out,
            "spur_processes_alive",
            "Processes of command runs alive now (at most --max-processes; more runs wait in Pending).",
            load(&self.processes),
        );
        gauge(
            &mut out,
            "spur_cluster_parked",
            "Firings of partitions another member holds, waiting for its claim (cluster mode).",
            load(&self.parked),
        );
        counter(
            &mut out,
            "spur_nats_delivered_total",
            "Events from NATS made durable in the event log.",
            load(&self.nats.delivered),
        );
        counter(
            &mut out,
            "spur_nats_redelivered_total",
            "Messages JetStream delivered more than once (their firings are claimed in KV).",
            load(&self.nats.redelivered),
        );
        counter(
            &mut out,
            "spur_nats_terminated_total",
            "NATS messages terminated as malformed.",
            load(&self.nats.terminated),
        );
        counter(
            &mut out,
            "spur_nats_slow_consumer_total",
            "NATS slow-consumer notices.",
            load(&self.nats.slow_consumer),
        );
        counter(
            &mut out,
            "spur_nats_reattached_total",
            "Times the NATS consumer re-attached after an error.",
            load(&self.nats.reattached),
        );
        counter(
            &mut out,
            "spur_nats_forwarded_total",
            "Events received over HTTP, websockets or webhooks published to the JetStream stream.",
            load(&self.nats.forwarded),
        );
        counter(
            &mut out,
            "spur_nats_forward_failed_total",
            "Events that could not be forwarded to the JetStream stream (they are in the local log).",
            load(&self.nats.forward_failed),
        );
        gauge(
            &mut out,
            "spur_buckets",
            "Live trigger buckets.",
            load(&self.buckets),
        );
        gauge(
            &mut out,
            "spur_flow_waiting",
            "Firings waiting in the flow stage (open debounces and batches, queued throttled firings).",
            load(&self.flow_waiting),
        );
        counter(
            &mut out,
            "spur_flow_collapsed_total",
            "Firings a debounce or batch folded into another.",
            load(&self.flow_collapsed),
        );
        counter(
            &mut out,
            "spur_flow_delayed_total",
            "Firings a throttle handed on late.",
            load(&self.flow_delayed),
        );
        counter(
            &mut out,
            "spur_flow_skipped_total",
            "Firings flow control skipped (throttle over: drop, a key that did not render, concurrency on_full: skip is logged).",
            load(&self.flow_skipped),
        );
        gauge(
            &mut out,
            "spur_concurrency_waiting",
            "Firings waiting for a concurrency slot.",
            load(&self.concurrency_waiting),
        );
        gauge(
            &mut out,
            "spur_concurrency_running",
            "Runs holding a concurrency slot.",
            load(&self.concurrency_running),
        );
        gauge(
            &mut out,
            "spur_automations",
            "Loaded automations.",
            load(&self.automations),
        );
        gauge(
            &mut out,
            "spur_automation_load_errors",
            "Automation files failing to load.",
            load(&self.load_errors),
        );
        gauge(
            &mut out,
            "spur_checkpoint_bytes",
            "Size of the last stored checkpoint of the trigger state.",
            load(&self.checkpoint_bytes),
        );
        self.evaluation.render(
            "spur_evaluation_seconds",
            "Time to evaluate one event.",
            &mut out,
        );
        self.timer_lag.render(
            "spur_timer_lag_seconds",
            "Delay between a proactive deadline and its evaluation.",
            &mut out,
        );
        self.commit.render(
            "spur_commit_seconds",
            "Durable commit time of one batch.",
            &mut out,
        );
        self.checkpoint.render(
            "spur_checkpoint_seconds",
            "Pipeline time per checkpoint of the trigger state (snapshot, plus the write when not part of a batch commit).",
            &mut out,
        );
        counter(
            &mut out,
            "spur_batches_total",
            "Batches committed.",
            load(&self.batches),
        );
        counter(
            &mut out,
            "spur_batch_events_total",
            "Events in committed batches.",
            load(&self.batch_events),
        );
        let _ = writeln!(
            out,
            "# HELP spur_webhook_auth_failures_total Webhook requests refused by their authentication, by reason.\n# TYPE spur_webhook_auth_failures_total counter"
        );
        for (reason, n) in self.webhook_auth_failures.snapshot() {
            let _ = writeln!(
                out,
                "spur_webhook_auth_failures_total{{reason=\"{reason}\"}} {n}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP spur_api_auth_refused_total API requests refused by the auth layer, by reason.\n# TYPE spur_api_auth_refused_total counter"
        );
        for (reason, n) in API_AUTH_REASONS.iter().zip(&self.api_auth_refused) {
            let _ = writeln!(
                out,
                "spur_api_auth_refused_total{{reason=\"{reason}\"}} {}",
                load(n)
            );
        }
        if let Some(prefect) = &self.prefect {
            prefect.render_metrics(&mut out);
        }
        out
    }
}
