//! `[tracing]`: the real `bosun` binary exports its spans to an OTLP/HTTP receiver in this
//! process, which decodes the protobuf; an http endpoint records the trace context each
//! request carries. One trace from an outbox row's `traceparent` through the relay,
//! RabbitMQ, a retry and the handler's request; the same through Redis Streams; a root span
//! for a message without context; nothing exported while tracing is off.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use bosun::handler::HeaderValue;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use prost::Message as _;

use crate::support::{self, ConfigFile, Daemon, RABBIT_URL, REDIS_URL, unique};

const WAIT: Duration = Duration::from_secs(60);
/// The application's span, as an outbox row or a producer writes it.
const APP_TRACE: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const APP_SPAN: &str = "00f067aa0ba902b7";

/// One exported span, ids in hex.
#[derive(Debug, Clone)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    kind: SpanKind,
    links: Vec<(String, String)>,
    attributes: BTreeMap<String, String>,
}

/// What the receiver and the endpoint saw.
#[derive(Default)]
struct Seen {
    spans: Mutex<Vec<Span>>,
    exports: Mutex<usize>,
    /// The `traceparent` of every request to `/hook`, in order.
    requests: Mutex<Vec<Option<String>>>,
    /// The `traceparent` of every request to `/once`, in order.
    once: Mutex<Vec<Option<String>>>,
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        _ => String::new(),
    }
}

async fn traces(State(seen): State<Arc<Seen>>, body: Bytes) -> StatusCode {
    let Ok(request) = ExportTraceServiceRequest::decode(body) else {
        return StatusCode::BAD_REQUEST;
    };
    *seen.exports.lock().unwrap() += 1;
    let mut spans = seen.spans.lock().unwrap();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                spans.push(Span {
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    name: span.name.clone(),
                    kind: SpanKind::try_from(span.kind).unwrap_or(SpanKind::Unspecified),
                    links: span
                        .links
                        .iter()
                        .map(|l| (hex::encode(&l.trace_id), hex::encode(&l.span_id)))
                        .collect(),
                    attributes: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
                        .collect(),
                });
            }
        }
    }
    StatusCode::OK
}

/// Fails the first request of each message (by `bosun-message-id`) with a 503, then
/// answers 204: every message takes exactly one retry.
async fn hook(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> StatusCode {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut requests = seen.requests.lock().unwrap();
    requests.push(traceparent);
    if requests.len() % 2 == 1 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::NO_CONTENT
    }
}

/// Refuses the first request for good (a 422: the message is dead-lettered at once), then
/// answers 204: a replayed message is handled.
async fn once(State(seen): State<Arc<Seen>>, headers: HeaderMap) -> StatusCode {
    let traceparent = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let mut requests = seen.once.lock().unwrap();
    requests.push(traceparent);
    if requests.len() == 1 {
        StatusCode::UNPROCESSABLE_ENTITY
    } else {
        StatusCode::NO_CONTENT
    }
}

/// The receiver (`/v1/traces`) and the endpoints (`/hook`, `/once`) on one port.
async fn serve() -> (SocketAddr, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let app = Router::new()
        .route("/v1/traces", post(traces))
        .route("/hook", post(hook))
        .route("/once", post(once))
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (addr, seen)
}

/// A config with `[tracing]` (on or off) sending to `addr`, the `hook` handler, and `rest`.
fn config(addr: SocketAddr, enabled: bool, rest: &str) -> (ConfigFile, u16) {
    let port = support::free_port();
    let text = format!(
        "[service]\nname = \"trace-test\"\nshutdown_timeout = \"10s\"\n\
         [http]\nlisten = \"127.0.0.1:{port}\"\n\
         [tracing]\nenabled = {enabled}\nendpoint = \"http://{addr}\"\nsample_ratio = 1.0\n\
         headers = {{ x-api-key = \"trace-secret\" }}\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n\
         [handlers.hook]\nkind = \"http\"\nurl = \"http://{addr}/hook\"\n{rest}"
    );
    (ConfigFile::new(&text), port)
}

/// Spans are exported every 100 ms rather than every 5 s.
const FAST_EXPORT: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "100")];

fn spans_of(seen: &Seen, trace: &str) -> Vec<Span> {
    seen.spans
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.trace_id == trace)
        .cloned()
        .collect()
}

/// Waits for the consumer spans of both attempts (`process <queue>`, outcomes `retry` then
/// `ack`) and returns every span of their trace.
async fn wait_two_attempts(seen: &Seen, queue: &str) -> Vec<Span> {
    let name = format!("process {queue}");
    let found = support::wait_for_async(WAIT, || async {
        let spans = seen.spans.lock().unwrap().clone();
        let acked = spans.iter().find(|s| {
            s.name == name && s.attributes.get("bosun.outcome").map(String::as_str) == Some("ack")
        })?;
        Some(spans_of(seen, &acked.trace_id))
    })
    .await;
    found.unwrap_or_else(|| {
        panic!(
            "no acked `{name}` span; spans: {:#?}",
            seen.spans.lock().unwrap()
        )
    })
}

fn attempt(spans: &[Span], name: &str, attempt: &str) -> Span {
    spans
        .iter()
        .find(|s| {
            s.name == name && s.attributes.get("bosun.attempt").map(String::as_str) == Some(attempt)
        })
        .cloned()
        .unwrap_or_else(|| panic!("no `{name}` span of attempt {attempt}: {spans:#?}"))
}

/// The trace id and parent span id of a `traceparent`.
fn ids(traceparent: &str) -> (String, String) {
    let parts: Vec<&str> = traceparent.split('-').collect();
    assert_eq!(parts.len(), 4, "{traceparent}");
    (parts[1].to_owned(), parts[2].to_owned())
}

/// Both handler requests carry the trace, each under the CLIENT span of its attempt, which is
/// a child of that attempt's CONSUMER span.
fn assert_requests_follow(seen: &Seen, spans: &[Span], consumers: [&Span; 2]) {
    let requests = seen.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    for (request, consumer) in requests.iter().zip(consumers) {
        let traceparent = request
            .as_deref()
            .expect("the request carries a traceparent");
        let (trace, parent) = ids(traceparent);
        assert_eq!(trace, consumer.trace_id);
        let client = spans
            .iter()
            .find(|s| s.span_id == parent)
            .unwrap_or_else(|| panic!("the request's parent {parent} is no exported span"));
        assert_eq!(client.kind, SpanKind::Client);
        assert_eq!(client.name, "POST");
        assert_eq!(client.parent, consumer.span_id);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outbox_row_with_a_traceparent_is_one_trace_through_rabbitmq_a_retry_and_the_handler() {
    let (addr, seen) = serve().await;
    let table = support::outbox::Table::new("trace_outbox").await;
    let queue = unique("trace_q");
    let exchange = unique("trace_x");
    let (file, port) = config(
        addr,
        true,
        &format!(
            "[databases.main]\nurl = \"{}\"\n\
             [outboxes.orders]\ndatabase = \"main\"\ntable = \"{}\"\ntarget = \"rabbit\"\ndestination = \"{exchange}\"\npoll_interval = \"100ms\"\n\
             [consumers.orders]\nsource = \"rabbit\"\nqueue = \"{queue}\"\nhandler = \"hook\"\n\
             bindings = [{{ exchange = \"{exchange}\", routing_key = \"{queue}\" }}]\n\
             retry = {{ max_attempts = 3, initial = \"1s\", max = \"1s\" }}\n",
            support::PG_URL,
            table.name
        ),
    );
    let mut daemon = Daemon::start_with_env(&file.path, port, FAST_EXPORT);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    // The application writes its span into the row's headers, in its own transaction.
    sqlx::query(&format!(
        "INSERT INTO {} (routing_key, payload, headers) VALUES ($1, 'order 123', \
         jsonb_build_object('traceparent', $2::text))",
        table.name
    ))
    .bind(&queue)
    .bind(format!("00-{APP_TRACE}-{APP_SPAN}-01"))
    .execute(&table.pool)
    .await
    .expect("insert the row");

    let spans = wait_two_attempts(&seen, &queue).await;
    assert!(spans.iter().all(|s| s.trace_id == APP_TRACE), "{spans:#?}");
    // The relay's PRODUCER span is the application's span's child ...
    let relay = spans
        .iter()
        .find(|s| s.kind == SpanKind::Producer && s.name == format!("send {exchange}"))
        .unwrap_or_else(|| panic!("no relay span: {spans:#?}"));
    assert_eq!(relay.parent, APP_SPAN);
    assert_eq!(
        relay.attributes.get("messaging.system").map(String::as_str),
        Some("rabbitmq")
    );
    // ... and both attempts are its children, linked to it: siblings in one trace.
    let process = format!("process {queue}");
    let first = attempt(&spans, &process, "1");
    let second = attempt(&spans, &process, "2");
    for (span, outcome) in [(&first, "retry"), (&second, "ack")] {
        assert_eq!(span.kind, SpanKind::Consumer);
        assert_eq!(span.parent, relay.span_id, "{span:#?}");
        assert_eq!(
            span.links,
            vec![(APP_TRACE.to_owned(), relay.span_id.clone())]
        );
        assert_eq!(
            span.attributes.get("bosun.outcome").map(String::as_str),
            Some(outcome)
        );
        assert_eq!(
            span.attributes.get("messaging.destination.name"),
            Some(&queue)
        );
        assert!(span.attributes.contains_key("messaging.message.id"));
    }
    // The retry copy has a PRODUCER span under the first attempt.
    assert!(
        spans.iter().any(|s| s.kind == SpanKind::Producer
            && s.parent == first.span_id
            && s.name.starts_with(&format!("send {queue}.retry"))),
        "{spans:#?}"
    );
    assert_requests_follow(&seen, &spans, [&first, &second]);
    // The export header is a secret: never in the log.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
    assert!(!daemon.logs().contains("trace-secret"));
    // Log lines about the message name its trace.
    assert!(
        daemon
            .logs()
            .lines()
            .any(|l| l.contains(&format!("\"trace_id\":\"{APP_TRACE}\""))
                && l.contains("\"span_id\":\"")),
        "{}",
        daemon.logs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_entry_with_a_traceparent_keeps_its_trace_through_a_retry_and_the_handler() {
    let (addr, seen) = serve().await;
    let stream = unique("trace_s");
    let (file, port) = config(
        addr,
        true,
        &format!(
            "[consumers.events]\nsource = \"cache\"\nstream = \"{stream}\"\ngroup = \"g\"\nhandler = \"hook\"\n\
             block = \"200ms\"\nretry = {{ max_attempts = 3, initial = \"500ms\", max = \"500ms\" }}\n"
        ),
    );
    let daemon = Daemon::start_with_env(&file.path, port, FAST_EXPORT);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let mut redis = support::streams::redis().await;
    let traceparent = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    support::streams::xadd(
        &mut redis,
        &stream,
        &[
            ("payload", b"event 1"),
            ("traceparent", traceparent.as_bytes()),
        ],
    )
    .await;

    let spans = wait_two_attempts(&seen, &stream).await;
    let process = format!("process {stream}");
    let first = attempt(&spans, &process, "1");
    let second = attempt(&spans, &process, "2");
    for span in [&first, &second] {
        assert_eq!(span.trace_id, APP_TRACE);
        assert_eq!(span.parent, APP_SPAN, "{span:#?}");
        assert_eq!(
            span.links,
            vec![(APP_TRACE.to_owned(), APP_SPAN.to_owned())]
        );
        assert_eq!(
            span.attributes.get("messaging.system").map(String::as_str),
            Some("redis")
        );
    }
    // The retry copy, written by the batched settler into the retry set, has a PRODUCER
    // span under the first attempt.
    let retry = spans
        .iter()
        .find(|s| s.kind == SpanKind::Producer && s.name == format!("send {stream}:retry"))
        .unwrap_or_else(|| panic!("no PRODUCER span of the retry copy: {spans:#?}"));
    assert_eq!(retry.parent, first.span_id);
    assert_eq!(
        retry.attributes.get("messaging.system").map(String::as_str),
        Some("redis")
    );
    assert!(retry.attributes.contains_key("messaging.message.id"));
    assert_requests_follow(&seen, &spans, [&first, &second]);
}

/// Waits for a span matching `found` and returns it.
async fn wait_span(seen: &Seen, what: &str, found: impl Fn(&Span) -> bool) -> Span {
    let span = support::wait_for_async(WAIT, || async {
        seen.spans
            .lock()
            .unwrap()
            .iter()
            .find(|s| found(s))
            .cloned()
    })
    .await;
    span.unwrap_or_else(|| panic!("no {what}; spans: {:#?}", seen.spans.lock().unwrap()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_copy_has_a_producer_span_and_its_replay_starts_a_new_trace_linked_to_it() {
    let (addr, seen) = serve().await;
    let stream = unique("trace_dl");
    let dlq = format!("{stream}:dlq");
    let table = unique("trace_archive");
    let (file, port) = config(
        addr,
        true,
        &format!(
            "[databases.main]\nurl = \"{}\"\nmax_connections = 4\n\
             [handlers.once]\nkind = \"http\"\nurl = \"http://{addr}/once\"\n\
             [consumers.events]\nsource = \"cache\"\nstream = \"{stream}\"\ngroup = \"g\"\nhandler = \"once\"\n\
             block = \"200ms\"\nretry = {{ max_attempts = 3, initial = \"500ms\", max = \"500ms\" }}\n\
             [dead_letters.dl]\nsource = \"cache\"\nstream = \"{dlq}\"\narchive = \"main\"\ntable = \"{table}\"\n",
            support::PG_URL
        ),
    );
    let path = file.path.to_string_lossy().into_owned();
    let (code, out, err) = support::bosun_output(&["dlq", "migrate", "--config", &path], &[]);
    assert_eq!(code, 0, "migrate: {err}{out}");
    let daemon = Daemon::start_with_env(&file.path, port, FAST_EXPORT);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let mut redis = support::streams::redis().await;
    let traceparent = format!("00-{APP_TRACE}-{APP_SPAN}-01");
    support::streams::xadd(
        &mut redis,
        &stream,
        &[
            ("payload", b"event 1"),
            ("traceparent", traceparent.as_bytes()),
        ],
    )
    .await;

    // Refused (422): dead-lettered by the settler, under a PRODUCER span of the attempt.
    let process = format!("process {stream}");
    let refused = wait_span(&seen, "dead-lettered attempt", |s| {
        s.name == process
            && s.attributes.get("bosun.outcome").map(String::as_str) == Some("dead_letter")
    })
    .await;
    assert_eq!(refused.trace_id, APP_TRACE);
    let copy = wait_span(&seen, "PRODUCER span of the dead-letter copy", |s| {
        s.kind == SpanKind::Producer && s.name == format!("send {dlq}")
    })
    .await;
    assert_eq!(copy.trace_id, APP_TRACE);
    assert_eq!(copy.parent, refused.span_id);
    assert_eq!(
        copy.attributes.get("messaging.system").map(String::as_str),
        Some("redis")
    );
    // The copy kept the producer's context: the processor's span is in the same trace.
    let archived = wait_span(&seen, "the processor's span", |s| {
        s.name == format!("process {dlq}")
    })
    .await;
    assert_eq!(archived.trace_id, APP_TRACE);
    assert_eq!(archived.parent, APP_SPAN);

    // Replayed from the command line: a PRODUCER span in a new trace, linked to the
    // archived message's context; the replayed message is handled in that new trace.
    let pool = sqlx::PgPool::connect(support::PG_URL)
        .await
        .expect("connect");
    let id: i64 = support::wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.clone();
        async move {
            sqlx::query_scalar(&format!("SELECT id FROM {table} LIMIT 1"))
                .fetch_optional(&pool)
                .await
                .ok()
                .flatten()
        }
    })
    .await
    .expect("the dead letter is archived");
    let (code, out, err) =
        support::bosun_output(&["dlq", "replay", "--config", &path, &id.to_string()], &[]);
    assert_eq!(code, 0, "replay: {err}{out}");
    let replay = wait_span(&seen, "PRODUCER span of the replay", |s| {
        s.kind == SpanKind::Producer && s.name == format!("send {stream}")
    })
    .await;
    assert_ne!(replay.trace_id, APP_TRACE, "a replay starts a new trace");
    assert_eq!(replay.parent, "", "{replay:#?}");
    assert_eq!(
        replay.links,
        vec![(APP_TRACE.to_owned(), APP_SPAN.to_owned())]
    );
    let handled = wait_span(&seen, "the replayed message's span", |s| {
        s.name == process && s.attributes.get("bosun.outcome").map(String::as_str) == Some("ack")
    })
    .await;
    assert_eq!(handled.trace_id, replay.trace_id);
    assert_eq!(handled.parent, replay.span_id);
    let requests = seen.once.lock().unwrap().clone();
    assert_eq!(requests.len(), 2, "{requests:?}");
    let (trace, _) = ids(requests[1].as_deref().expect("a traceparent"));
    assert_eq!(trace, replay.trace_id);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_context_gets_a_root_span_whose_trace_the_retry_and_handler_keep() {
    let (addr, seen) = serve().await;
    let queue = unique("trace_root");
    let (file, port) = config(
        addr,
        true,
        &format!(
            "[consumers.plain]\nsource = \"rabbit\"\nqueue = \"{queue}\"\nhandler = \"hook\"\n\
             retry = {{ max_attempts = 3, initial = \"1s\", max = \"1s\" }}\n"
        ),
    );
    let daemon = Daemon::start_with_env(&file.path, port, FAST_EXPORT);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let mut message =
        support::amqp::OutgoingMessage::new("", queue.clone(), b"no context".to_vec());
    message.message_id = unique("m");
    support::amqp::Publisher
        .publish(&message)
        .await
        .expect("publish");

    let spans = wait_two_attempts(&seen, &queue).await;
    let process = format!("process {queue}");
    let first = attempt(&spans, &process, "1");
    let second = attempt(&spans, &process, "2");
    assert_eq!(first.parent, "", "the first attempt is a root: {first:#?}");
    assert!(first.links.is_empty());
    // The retry copy carried the root's context: the second attempt is in the same trace.
    assert_eq!(second.trace_id, first.trace_id);
    assert_eq!(second.parent, first.span_id);
    assert_requests_follow(&seen, &spans, [&first, &second]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_tracing_off_nothing_is_exported_and_no_context_is_added() {
    let (addr, seen) = serve().await;
    let queue = unique("trace_off");
    let (file, port) = config(
        addr,
        false,
        &format!(
            "[consumers.plain]\nsource = \"rabbit\"\nqueue = \"{queue}\"\nhandler = \"hook\"\n\
             retry = {{ max_attempts = 3, initial = \"1s\", max = \"1s\" }}\n"
        ),
    );
    let mut daemon = Daemon::start_with_env(&file.path, port, FAST_EXPORT);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let mut message = support::amqp::OutgoingMessage::new("", queue.clone(), b"x".to_vec());
    message.message_id = unique("m");
    message.headers.insert(
        "traceparent".into(),
        HeaderValue::String(format!("00-{APP_TRACE}-{APP_SPAN}-01")),
    );
    support::amqp::Publisher
        .publish(&message)
        .await
        .expect("publish");
    let handled = support::wait_for_async(WAIT, || async {
        (seen.requests.lock().unwrap().len() == 2).then_some(())
    })
    .await;
    assert!(handled.is_some(), "{}", daemon.logs());
    // The shutdown drain is when spans would be flushed at the latest.
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
    assert_eq!(*seen.exports.lock().unwrap(), 0);
    assert_eq!(*seen.requests.lock().unwrap(), vec![None, None]);
    assert!(!daemon.logs().contains("\"trace_id\""));
}
