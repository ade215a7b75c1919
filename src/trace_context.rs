//! W3C trace context on messages: one place that reads `traceparent`/`tracestate` from what a
//! broker delivered and writes them on what bosun sends, and that opens the spans every
//! consumer, handler and publisher records, so both brokers, the handlers, the outbox relay
//! and the dead-letter processors propagate context the same way.
//!
//! A leaf: it works on header getters and setters, not on any broker's or handler's types.
//! While tracing is off (the default) every function here returns at once: spans are
//! [`Span::none`], nothing is read or written, and messages pass through untouched.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator as _};
use opentelemetry::trace::{SpanContext, TraceContextExt as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// The W3C header that carries the trace id, the parent span id and the sampling flag.
pub const TRACEPARENT: &str = "traceparent";
/// The W3C header that carries vendor trace state beside `traceparent`.
pub const TRACESTATE: &str = "tracestate";
/// CloudEvents' distributed-tracing extension (HTTP binary mode), read when `traceparent`
/// is absent and written by the http handler in CloudEvents mode.
pub const CE_TRACEPARENT: &str = "ce-traceparent";
pub const CE_TRACESTATE: &str = "ce-tracestate";
/// The same extension as AMQP and Kafka bindings name it.
const CE_TRACEPARENT_UNDERSCORE: &str = "ce_traceparent";
const CE_TRACESTATE_UNDERSCORE: &str = "ce_tracestate";

/// The target every bosun span is recorded under: the span exporter listens to it alone, so
/// `log_level` never decides what is traced.
pub const TARGET: &str = "bosun::trace";

static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns span recording and propagation on for this process (telemetry does, once the
/// exporter is installed).
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// Whether tracing is on in this process.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// What a consumer does with the trace context a message arrived with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TraceMode {
    /// The producer's span is the parent (and a link): the message's trace goes on.
    #[default]
    Continue,
    /// A new trace per message, linked to the producer's span.
    Link,
    /// A new trace per message, no link: the producer's context is ignored.
    New,
}

impl TraceMode {
    pub fn as_str(self) -> &'static str {
        match self {
            TraceMode::Continue => "continue",
            TraceMode::Link => "link",
            TraceMode::New => "new",
        }
    }
}

/// The messaging system a span names (`messaging.system`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum System {
    RabbitMq,
    Redis,
}

impl System {
    fn as_str(self) -> &'static str {
        match self {
            System::RabbitMq => "rabbitmq",
            System::Redis => "redis",
        }
    }
}

/// Headers from owned values, so a getter that renders values (AMQP long strings, stream
/// bytes) can serve the propagator's borrowed interface.
struct Owned {
    traceparent: String,
    tracestate: Option<String>,
}

impl Extractor for Owned {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            TRACEPARENT => Some(&self.traceparent),
            TRACESTATE => self.tracestate.as_deref(),
            _ => None,
        }
    }
    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT, TRACESTATE]
    }
}

/// The remote span a message's headers name (`traceparent`, else CloudEvents'
/// `ce-traceparent` / `ce_traceparent`), with its `tracestate`; `None` when tracing is off or
/// the headers hold no valid context. A malformed `traceparent` is ignored (the message
/// starts a trace of its own): it is a producer's mistake, never a reason to fail a message.
pub fn extract(get: impl Fn(&str) -> Option<String>) -> Option<SpanContext> {
    if !enabled() {
        return None;
    }
    let (traceparent, tracestate) = [
        (TRACEPARENT, TRACESTATE),
        (CE_TRACEPARENT, CE_TRACESTATE),
        (CE_TRACEPARENT_UNDERSCORE, CE_TRACESTATE_UNDERSCORE),
    ]
    .into_iter()
    .find_map(|(parent, state)| get(parent).map(|p| (p, get(state))))?;
    // A traceparent is 55 characters; anything much longer is not one, and is not parsed.
    if traceparent.len() > 128 || tracestate.as_ref().is_some_and(|s| s.len() > 512) {
        return None;
    }
    let cx = TraceContextPropagator::new().extract(&Owned {
        traceparent,
        tracestate,
    });
    let span = cx.span();
    let context = span.span_context();
    context.is_valid().then(|| context.clone())
}

/// Collects what the propagator writes.
struct Collect(Vec<(&'static str, String)>);

impl Injector for Collect {
    fn set(&mut self, key: &str, value: String) {
        match key {
            TRACEPARENT => self.0.push((TRACEPARENT, value)),
            TRACESTATE if !value.is_empty() => self.0.push((TRACESTATE, value)),
            _ => {}
        }
    }
}

/// The `traceparent` (and `tracestate`, when there is one) naming `span`, to send downstream;
/// empty when tracing is off or the span records nothing.
pub fn headers_of(span: &Span) -> Vec<(&'static str, String)> {
    if !enabled() || span.is_none() {
        return Vec::new();
    }
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut out = Collect(Vec::with_capacity(2));
    TraceContextPropagator::new().inject_context(&cx, &mut out);
    out.0
}

/// [`headers_of`] the current span: what a handler sends on to the system it calls.
pub fn current_headers() -> Vec<(&'static str, String)> {
    if !enabled() {
        return Vec::new();
    }
    headers_of(&Span::current())
}

/// What a CONSUMER span describes: one handled message.
pub struct Consumed<'a> {
    pub system: System,
    /// The queue or stream read (`messaging.destination.name`).
    pub destination: &'a str,
    pub consumer: &'a str,
    pub message_id: Option<&'a str>,
    pub attempt: u32,
    /// The producer's span, from the message's headers ([`extract`]).
    pub parent: Option<SpanContext>,
    pub mode: TraceMode,
}

/// The CONSUMER span of one handled message (`process <queue>`), placed by `mode`: under the
/// producer's span and linked to it (`continue`), in a new trace linked to it (`link`), or in a
/// new trace (`new`). Without a producer's span it is a root, and its context is what the
/// handler and any retry copy carry on. `bosun.outcome` is left for [`record_outcome`].
pub fn consumer_span(consumed: Consumed<'_>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "process",
        otel.name = format!("process {}", consumed.destination),
        otel.kind = "consumer",
        messaging.system = consumed.system.as_str(),
        messaging.operation.type = "process",
        messaging.destination.name = consumed.destination,
        messaging.consumer.group.name = consumed.consumer,
        messaging.message.id = consumed.message_id,
        bosun.attempt = consumed.attempt,
        bosun.outcome = tracing::field::Empty,
    );
    // A span always gets a parent: the empty context makes it a root rather than a child of
    // whatever span the consumer's task happens to be in.
    let parent = match (&consumed.parent, consumed.mode) {
        (Some(remote), TraceMode::Continue) => {
            opentelemetry::Context::new().with_remote_span_context(remote.clone())
        }
        _ => opentelemetry::Context::new(),
    };
    let _ = span.set_parent(parent);
    if let Some(remote) = consumed.parent
        && consumed.mode != TraceMode::New
    {
        span.add_link(remote);
    }
    span
}

/// Records what became of a consumed message on its span (`ack`, `retry`, `dead_letter`,
/// `drop`, `release`).
pub fn record_outcome(span: &Span, outcome: &'static str) {
    if !span.is_none() {
        span.record("bosun.outcome", outcome);
    }
}

/// What a PRODUCER span describes: one message sent.
pub struct Produced<'a> {
    pub system: System,
    /// The exchange, queue or stream written to (`messaging.destination.name`).
    pub destination: &'a str,
    pub message_id: Option<&'a str>,
    /// The span the message was made under (an outbox row's `traceparent`), when it is not
    /// the current span.
    pub parent: Option<SpanContext>,
    /// A span the message relates to without continuing it (the archived dead letter a
    /// replay copies).
    pub link: Option<SpanContext>,
    /// A new trace, whatever the current span: a replay is work of its own.
    pub root: bool,
}

/// The PRODUCER span of one message sent (`send <destination>`): a child of `parent`, else of
/// the current span, else (or with `root`) a new trace. Its [`headers_of`] go on the message.
pub fn producer_span(produced: Produced<'_>) -> Span {
    if !enabled() {
        return Span::none();
    }
    let span = tracing::info_span!(
        target: TARGET,
        "send",
        otel.name = format!("send {}", produced.destination),
        otel.kind = "producer",
        messaging.system = produced.system.as_str(),
        messaging.operation.type = "send",
        messaging.destination.name = produced.destination,
        messaging.message.id = produced.message_id,
    );
    if let Some(parent) = produced.parent {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent));
    } else if produced.root {
        let _ = span.set_parent(opentelemetry::Context::new());
    }
    if let Some(link) = produced.link {
        span.add_link(link);
    }
    span
}

/// The CLIENT span of an http handler's request (named for its method, as the HTTP
/// conventions say), a child of the current (consumer) span. `server` is the endpoint's
/// scheme, host and port only: its path may be a secret.
pub fn http_client_span(method: &str, handler: &str, server: &str) -> Span {
    if !enabled() {
        return Span::none();
    }
    tracing::info_span!(
        target: TARGET,
        "call",
        otel.name = method,
        otel.kind = "client",
        http.request.method = method,
        server.address = server,
        bosun.handler = handler,
        http.response.status_code = tracing::field::Empty,
    )
}

/// Records the response status on an [`http_client_span`].
pub fn record_status(span: &Span, status: u16) {
    if !span.is_none() {
        span.record("http.response.status_code", status);
    }
}

/// Whether `name` is one of the trace-context headers this module reads or writes.
pub fn is_trace_header(name: &str) -> bool {
    [
        TRACEPARENT,
        TRACESTATE,
        CE_TRACEPARENT,
        CE_TRACESTATE,
        CE_TRACEPARENT_UNDERSCORE,
        CE_TRACESTATE_UNDERSCORE,
    ]
    .iter()
    .any(|h| h.eq_ignore_ascii_case(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trace_headers_are_recognised_in_any_case() {
        assert!(is_trace_header("Traceparent"));
        assert!(is_trace_header("ce_tracestate"));
        assert!(!is_trace_header("x-trace"));
    }

    #[test]
    fn extract_reads_traceparent_then_the_cloudevents_names_and_skips_malformed_ones() {
        enable();
        let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let found = extract(|k| (k == "ce_traceparent").then(|| parent.to_owned()));
        let found = found.map(|c| (c.trace_id().to_string(), c.span_id().to_string()));
        assert_eq!(
            found,
            Some((
                "4bf92f3577b34da6a3ce929d0e0e4736".to_owned(),
                "00f067aa0ba902b7".to_owned()
            ))
        );
        assert!(extract(|k| (k == TRACEPARENT).then(|| "00-zz-11-01".to_owned())).is_none());
        assert!(extract(|_| None).is_none());
    }
}
