//! Logs and metrics.
//!
//! Logs go through `tracing` as JSON lines or pretty text, filtered by `RUST_LOG` when set,
//! else by `[service].log_level`. Metrics go to one process-wide Prometheus recorder that the
//! HTTP server renders on `/metrics`. Metric names are listed in docs/metrics.md. With
//! `[tracing]` on, bosun's spans go to the OTLP exporter (`otlp`) and JSON log lines carry
//! the `trace_id` and `span_id` of the message they are about.

use std::collections::BTreeSet;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::config::{LogFormat, TracingConfig};

/// Buckets for handler and batch durations, in seconds: 1 ms to 60 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
];

/// The inbox claim's buckets: one statement or script on a nearby store, usually well under
/// a millisecond, which the duration buckets cannot tell apart.
pub const CLAIM_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0, 5.0,
];

/// Buckets for end-to-end latencies (outbox commit to confirm), in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 15.0, 60.0,
];

/// Installs the global tracing subscriber: log lines on stderr and, when `[tracing]` is on,
/// spans to the OTLP exporter. bosun's own spans pass whatever `log_level` says (one filter
/// for both layers: per-layer filters lost spans under load). Later calls (tests running
/// several runtimes in one process) keep the first one.
pub fn init_logging(
    format: LogFormat,
    level: &str,
    traces: &TracingConfig,
    service: &str,
) -> Result<(), crate::otlp::OtlpError> {
    use tracing_subscriber::Layer as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;

    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour codes only for a person at a terminal: in a file, journald or a pipe they are
    // noise. `NO_COLOR` turns them off everywhere.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none();
    let logs = tracing_subscriber::fmt::layer()
        .with_writer(crate::redact::Stderr)
        .with_ansi(ansi);
    let logs = match format {
        LogFormat::Json => logs
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(false)
            .map_event_format(TraceIds)
            .boxed(),
        LogFormat::Pretty => logs.boxed(),
    };
    let spans = if traces.enabled {
        let tracer = crate::otlp::install(traces, service)?;
        crate::trace_context::enable();
        // bosun's spans pass whatever the log level; the log layer never prints spans.
        if let Ok(directive) = format!("{}=info", crate::trace_context::TARGET).parse() {
            filter = filter.add_directive(directive);
        }
        Some(
            tracing_opentelemetry::layer()
                .with_tracer(tracer)
                .with_location(false)
                .with_threads(false),
        )
    } else {
        None
    };
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(spans)
        .try_init();
    Ok(())
}

/// JSON log lines with the `trace_id` and `span_id` of the span they were written in (the
/// message being handled), so a log line leads to its trace and back.
struct TraceIds<F>(F);

impl<S, N, F> tracing_subscriber::fmt::FormatEvent<S, N> for TraceIds<F>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
    F: tracing_subscriber::fmt::FormatEvent<S, N>,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        use opentelemetry::trace::TraceContextExt as _;
        use tracing_opentelemetry::OpenTelemetrySpanExt as _;

        if !crate::trace_context::enabled() || ctx.lookup_current().is_none() {
            return self.0.format_event(ctx, writer, event);
        }
        let mut line = String::new();
        self.0.format_event(
            ctx,
            tracing_subscriber::fmt::format::Writer::new(&mut line),
            event,
        )?;
        // Read after the line is formatted: the formatter holds span data while it runs.
        let cx = tracing::Span::current().context();
        let span = cx.span();
        let ids = span.span_context();
        match line.strip_prefix('{') {
            Some(rest) if ids.is_valid() => write!(
                writer,
                "{{\"trace_id\":\"{}\",\"span_id\":\"{}\",{rest}",
                ids.trace_id(),
                ids.span_id()
            ),
            _ => writer.write_str(&line),
        }
    }
}

static RECORDER: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process-wide Prometheus handle, installing the recorder on first use.
pub fn metrics_handle() -> PrometheusHandle {
    RECORDER
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_duration_seconds".into()), DURATION_BUCKETS)
                .and_then(|b| b.set_buckets_for_metric(Matcher::Suffix("_latency_seconds".into()), LATENCY_BUCKETS))
                // A full match wins over the suffix.
                .and_then(|b| b.set_buckets_for_metric(Matcher::Full(inbox_metric::CLAIM_DURATION.into()), CLAIM_BUCKETS));
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
            for result in ["success", "error"] {
                metrics::counter!("bosun_config_reloads_total", "result" => result).increment(0);
            }
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

/// `bosun_consumer_backlog{consumer}`: the messages a consumer still has to handle, sampled
/// from its broker (amqp: ready and retry-tier messages plus the deliveries this process
/// holds; redis: group lag, pending entries and scheduled retries). What autoscalers scale on.
pub fn backlog_gauge(consumer: &str) -> metrics::Gauge {
    metrics::gauge!("bosun_consumer_backlog", "consumer" => consumer.to_owned())
}

/// Inbox metric names, listed in docs/metrics.md.
pub mod inbox_metric {
    /// Counter `{consumer}`: messages found done and settled per `on_duplicate`.
    pub const DUPLICATES: &str = "bosun_inbox_duplicates_total";
    /// Counter `{consumer}`: claims taken over after their lease expired.
    pub const TAKEOVERS: &str = "bosun_inbox_takeovers_total";
    /// Histogram `{consumer}`: time one claim took.
    pub const CLAIM_DURATION: &str = "bosun_inbox_claim_duration_seconds";
    /// Gauge `{inbox}`: records in a postgres inbox table, sampled by its sweeper.
    pub const RECORDS: &str = "bosun_inbox_records";
}

fn describe_inbox_metrics() {
    metrics::describe_counter!(
        inbox_metric::DUPLICATES,
        "Messages whose inbox key was already done, settled per on_duplicate without running the handler."
    );
    metrics::describe_counter!(
        inbox_metric::TAKEOVERS,
        "Inbox claims taken over after their lease expired (their holder died or hung)."
    );
    metrics::describe_histogram!(
        inbox_metric::CLAIM_DURATION,
        metrics::Unit::Seconds,
        "Time one inbox claim took before the handler ran."
    );
    metrics::describe_gauge!(
        inbox_metric::RECORDS,
        "Records in a postgres inbox table (claims and done keys), sampled by its sweeper."
    );
}

/// Dead-letter processor metric names, listed in docs/metrics.md.
pub mod dead_letter_metric {
    /// Counter `{processor, action}`: dead letters settled, by the action that settled them.
    pub const TOTAL: &str = "bosun_dead_letters_total";
    /// Gauge `{processor}`: rows with status `archived`, sampled from the table.
    pub const ARCHIVED: &str = "bosun_dead_letters_archived";
    /// Counter `{processor}`: replay copies confirmed by the broker.
    pub const REPLAYS: &str = "bosun_dead_letter_replays_total";
    /// Counter `{processor, cause}`: dead letters a processor without an archive (or
    /// fallback) had nowhere to put and left pending at their source.
    pub const HELD: &str = "bosun_dead_letters_held_total";
}

fn describe_dead_letter_metrics() {
    use dead_letter_metric as metric;
    metrics::describe_counter!(
        metric::TOTAL,
        "Dead letters settled by a dead-letter processor, by action."
    );
    metrics::describe_gauge!(
        metric::ARCHIVED,
        "Archived dead letters waiting in the archive table (sampled)."
    );
    metrics::describe_counter!(
        metric::HELD,
        "Dead letters left pending at their source because they had nowhere to go, by cause."
    );
    metrics::describe_counter!(
        metric::REPLAYS,
        "Dead letters replayed to their original queue or stream (confirmed)."
    );
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_dead_letter_metrics();
    crate::flow_control::describe_metrics();
    describe_inbox_metrics();
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
        "Consumer connections open to the broker: one per connected consumer, 0 while none is."
    );
    describe_gauge!(
        "bosun_consumer_active",
        "1 while the consumer reads, 0 while it is disconnected or stands by (`single_active`: another process reads)."
    );
    describe_gauge!(
        "bosun_broker_node",
        "The broker node the last amqp connection was opened to: 1 for that node, 0 for the broker's other `urls`."
    );
    describe_counter!(
        "bosun_broker_reconnects_total",
        "Connections re-established after a loss."
    );
    describe_counter!(
        "bosun_config_reloads_total",
        "Configuration reloads, by result."
    );
    describe_gauge!(
        "bosun_config_last_reload_success_timestamp_seconds",
        Unit::Seconds,
        "Unix time the running configuration was applied: at start, then by each successful reload."
    );
    describe_gauge!(
        "bosun_component_ready",
        "1 while a component reports ready (as /readyz does), 0 while it connects, retries or restarts."
    );
    describe_counter!(
        "bosun_reload_stops_aborted_total",
        "Components a reload stopped that did not drain within shutdown_timeout and were aborted."
    );
    describe_gauge!(
        "bosun_consumer_backlog",
        "Messages a consumer still has to handle, sampled from the broker: amqp ready messages of the queue and its retry tiers plus deliveries this process holds unacknowledged; redis group lag plus pending entries plus scheduled retries."
    );
    describe_gauge!(
        "bosun_redis_pending_messages",
        "Entries pending in a consumer's group (delivered, not acknowledged); the same for every replica of the group."
    );
    describe_counter!(
        "bosun_redis_claimed_total",
        "Entries a Redis consumer took over from another consumer with XAUTOCLAIM."
    );
    describe_counter!(
        "bosun_redis_deleted_entries_total",
        "Pending entries found deleted from the stream, dropped from the pending list."
    );
    describe_counter!(
        "bosun_amqp_copy_problems_total",
        "amqp retry/dead-letter copies that needed care, by problem: refused by the broker on every try, bosun-error trimmed to fit frame_max, or headers over frame_max."
    );
    describe_counter!(
        "bosun_amqp_stuck_deliveries_total",
        "amqp sessions restarted over a delivery left unsettled far past its handler's timeout."
    );
    describe_counter!(
        "bosun_redis_invalid_retries_total",
        "Scheduled retries that could not be moved back to their stream (undecodable, oversized or malformed), dead-lettered as invalid."
    );
    describe_counter!(
        "bosun_handler_responses_total",
        "Deliveries of an http handler, by response class (2xx..5xx, timeout, connect)."
    );
    describe_counter!(
        "bosun_handler_exec_total",
        "Runs of an exec handler, by result."
    );
    describe_counter!(
        "bosun_route_total",
        "Messages a route handler handed to each target, or to none (unmatched)."
    );
}

/// Components removed by a reload: their series are left out of `/metrics`, so an alert on
/// `bosun_component_up == 0` does not fire for a component that no longer exists. The
/// Prometheus registry cannot delete a series, so rendering filters them.
static REMOVED_COMPONENTS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

fn removed_components() -> std::sync::MutexGuard<'static, BTreeSet<String>> {
    // Every write is one insert or remove: a poisoned set is still whole.
    REMOVED_COMPONENTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Leaves the series of component `name` (every series with `component="name"`) out of
/// `/metrics` until it is started again.
pub fn forget_component(name: &str) {
    removed_components().insert(name.to_owned());
}

/// Shows the series of component `name` again (it was started).
pub fn remember_component(name: &str) {
    removed_components().remove(name);
}

/// The Prometheus text of every series, less those of removed components.
pub fn render(handle: &PrometheusHandle) -> String {
    let text = handle.render();
    let removed = removed_components();
    if removed.is_empty() {
        return text;
    }
    let labels: Vec<String> = removed
        .iter()
        .map(|name| format!("component=\"{}\"", escape_label_value(name)))
        .collect();
    drop(removed);
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        let hidden = !line.starts_with('#')
            && line.split_once('{').is_some_and(|(_, rest)| {
                let set = rest.rsplit_once('}').map(|(set, _)| set).unwrap_or(rest);
                labels.iter().any(|l| label_set_contains(set, l))
            });
        if !hidden {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// A label value as the Prometheus text format writes it.
fn escape_label_value(value: &str) -> String {
    value
        .replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Whether the rendered label set `set` (`a="1",b="2"`) holds the pair `pair` (`b="2"`).
fn label_set_contains(set: &str, pair: &str) -> bool {
    set.match_indices(pair).any(|(at, _)| {
        (at == 0 || set[..at].ends_with(','))
            && matches!(set[at + pair.len()..].chars().next(), None | Some(','))
    })
}

/// Registers every series of a started component at 0, so that the first failure is an
/// increase from 0 (`increase(...) > 0` fires on it) rather than a series appearing at 1.
pub fn register_component(name: &str) {
    remember_component(name);
    metrics::counter!("bosun_task_restarts_total", "component" => name.to_owned()).increment(0);
    metrics::counter!("bosun_reload_stops_aborted_total", "component" => name.to_owned())
        .increment(0);
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
            Outcome::Retry { .. } | Outcome::Defer { .. } => &self.duration_retry,
            Outcome::DeadLetter { .. } => &self.duration_dead_letter,
            Outcome::Drop { .. } => &self.duration_drop,
            Outcome::Release { .. } => &self.duration_release,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_set_contains_matches_whole_pairs_only() {
        let set = r#"component="consumer:a",result="ok""#;
        assert!(label_set_contains(set, r#"component="consumer:a""#));
        assert!(label_set_contains(set, r#"result="ok""#));
        assert!(!label_set_contains(set, r#"component="consumer:""#));
        assert!(!label_set_contains(
            r#"other_component="consumer:a""#,
            r#"component="consumer:a""#
        ));
    }
}
