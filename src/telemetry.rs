//! Logs and metrics.
//!
//! Logs go through `tracing` as JSON lines or pretty text, filtered by `RUST_LOG` when set,
//! else by `[service].log_level`. Metrics go to one process-wide Prometheus recorder that the
//! HTTP server renders on `/metrics`. Metric names are listed in README.md.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::LogFormat;

/// Buckets for handler and batch durations, in seconds: 1 ms to 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// Buckets for end-to-end latencies (outbox commit to confirm), in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0,
];

/// Installs the global tracing subscriber. Later calls (tests running several runtimes in
/// one process) keep the first one.
pub fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, journald or a pipe they are
    // noise. `NO_COLOR` turns them off everywhere.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .try_init(),
        LogFormat::Pretty => builder.try_init(),
    };
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), DURATION_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_latency_seconds".into()), LATENCY_BUCKETS));
            let handle = match builder.and_then(|b| b.install_recorder()) {
                Ok(handle) => handle,
                // Another recorder is installed (an embedding program's): render an empty
                // registry of our own rather than fail.
                Err(e) => {
                    tracing::warn!(error = %e, "cannot install the Prometheus recorder; /metrics will be empty");
                    PrometheusBuilder::new().build_recorder().handle()
                }
            };
            describe();
            metrics::gauge!("bosun_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            let upkeep = handle.clone();
            // Histograms' internal buffers are drained by upkeep; without it they grow.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move {
                    let mut interval = tokio::time::interval(Duration::from_secs(5));
                    loop {
                        interval.tick().await;
                        upkeep.run_upkeep();
                    }
                });
            }
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    crate::dead_letter::describe_metrics();
    describe_gauge!(
        "bosun_build_info",
        "Always 1; the version label names the running build."
    );
    describe_gauge!(
        "bosun_component_up",
        "1 while a component's task runs, 0 while it waits to restart."
    );
    describe_counter!(
        "bosun_task_restarts_total",
        "Components restarted after an error or a panic."
    );
    describe_counter!(
        "bosun_messages_received_total",
        "Messages delivered to a consumer."
    );
    describe_counter!(
        "bosun_messages_settled_total",
        "Messages settled at their source, by outcome."
    );
    describe_counter!(
        "bosun_messages_released_total",
        "Messages a handler handed back to their source unsettled (at shutdown)."
    );
    describe_gauge!(
        "bosun_messages_in_flight",
        "Messages whose handler is running."
    );
    describe_histogram!(
        "bosun_handler_duration_seconds",
        Unit::Seconds,
        "Time a handler took, by outcome."
    );
    describe_gauge!(
        "bosun_broker_connected",
        "1 while a component holds a connection to the broker."
    );
    describe_counter!(
        "bosun_broker_reconnects_total",
        "Connections re-established after a loss."
    );
    describe_counter!(
        "bosun_config_reloads_total",
        "Configuration reloads, by result."
    );
}

/// The metric handles every consumer kind records, resolved once per consumer so the
/// per-message path does no label lookups.
pub struct ConsumerMetrics {
    pub received: metrics::Counter,
    pub settled_ack: metrics::Counter,
    pub settled_retry: metrics::Counter,
    pub settled_dead_letter: metrics::Counter,
    pub settled_drop: metrics::Counter,
    /// Messages handed back to their source unsettled ([`Outcome::Release`]).
    pub released: metrics::Counter,
    pub in_flight: metrics::Gauge,
    pub connected: metrics::Gauge,
    pub reconnects: metrics::Counter,
    duration_ack: metrics::Histogram,
    duration_retry: metrics::Histogram,
    duration_dead_letter: metrics::Histogram,
    duration_drop: metrics::Histogram,
    duration_release: metrics::Histogram,
}

impl ConsumerMetrics {
    pub fn new(consumer: &str, broker: &str, handler: &str) -> Self {
        let settled = |outcome: &'static str| metrics::counter!("bosun_messages_settled_total", "consumer" => consumer.to_owned(), "outcome" => outcome);
        let duration = |outcome: &'static str| metrics::histogram!("bosun_handler_duration_seconds", "consumer" => consumer.to_owned(), "handler" => handler.to_owned(), "outcome" => outcome);
        Self {
            received: metrics::counter!("bosun_messages_received_total", "consumer" => consumer.to_owned()),
            settled_ack: settled("ack"),
            settled_retry: settled("retry"),
            settled_dead_letter: settled("dead_letter"),
            settled_drop: settled("drop"),
            released: metrics::counter!("bosun_messages_released_total", "consumer" => consumer.to_owned()),
            in_flight: metrics::gauge!("bosun_messages_in_flight", "consumer" => consumer.to_owned()),
            connected: metrics::gauge!("bosun_broker_connected", "broker" => broker.to_owned()),
            reconnects: metrics::counter!("bosun_broker_reconnects_total", "broker" => broker.to_owned()),
            duration_ack: duration("ack"),
            duration_retry: duration("retry"),
            duration_dead_letter: duration("dead_letter"),
            duration_drop: duration("drop"),
            duration_release: duration("release"),
        }
    }

    /// The handler-duration histogram for the outcome the handler gave.
    pub fn duration(&self, outcome: &crate::handler::Outcome) -> &metrics::Histogram {
        use crate::handler::Outcome;
        match outcome {
            Outcome::Ack => &self.duration_ack,
            Outcome::Retry { .. } => &self.duration_retry,
            Outcome::DeadLetter { .. } => &self.duration_dead_letter,
            Outcome::Drop { .. } => &self.duration_drop,
            Outcome::Release { .. } => &self.duration_release,
        }
    }
}
