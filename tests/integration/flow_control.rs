//! Circuit breakers, rate limits and pauses against a real RabbitMQ, Redis and a real HTTP
//! endpoint: an open breaker stops its consumers fetching and hands back what they hold
//! without using attempts, a 4xx storm never opens it, half-open sends one probe, a route
//! pauses only its sick branch, `Retry-After` pauses the limiter, and an operator's pause
//! survives a reload.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::FieldTable;
use support::amqp::from_table;
use support::{
    ConfigFile, Daemon, InProcess, RABBIT_URL, REDIS_URL, free_port, http_get, metric_value,
    unique, wait_for_async,
};

const WAIT: Duration = Duration::from_secs(40);

/// Requests per path, and what each path answers.
#[derive(Default)]
struct Endpoint {
    /// `down`: 503; `gone`: 404; `ok`: 204; `throttle`: 429 with `Retry-After: 3` to the
    /// first request, then 204.
    counts: std::sync::Mutex<std::collections::BTreeMap<String, usize>>,
    throttled: AtomicUsize,
}

impl Endpoint {
    fn count(&self, path: &str) -> usize {
        self.counts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(path)
            .copied()
            .unwrap_or(0)
    }
}

async fn answer(State(endpoint): State<Arc<Endpoint>>, Path(path): Path<String>) -> Response {
    *endpoint
        .counts
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .entry(path.clone())
        .or_default() += 1;
    match path.as_str() {
        "down" => StatusCode::SERVICE_UNAVAILABLE.into_response(),
        "gone" => StatusCode::NOT_FOUND.into_response(),
        "throttle" if endpoint.throttled.fetch_add(1, Ordering::SeqCst) == 0 => (
            StatusCode::TOO_MANY_REQUESTS,
            [(axum::http::header::RETRY_AFTER, "3")],
        )
            .into_response(),
        _ => StatusCode::NO_CONTENT.into_response(),
    }
}

/// An endpoint on a free port: its base URL (`http://127.0.0.1:P/`) and its counts.
async fn endpoint() -> (String, Arc<Endpoint>) {
    let endpoint = Arc::new(Endpoint::default());
    let app = Router::new()
        .route("/{path}", post(answer))
        .with_state(endpoint.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, endpoint)
}

async fn rabbit() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    (conn, ch)
}

/// Publishes `n` messages to `queue` with `routing_key` through the default exchange, or
/// through `exchange` when given.
async fn publish(ch: &lapin::Channel, exchange: &str, routing_key: &str, n: usize) {
    for i in 0..n {
        let id = format!("{routing_key}-{i}-{}", uuid::Uuid::now_v7());
        ch.basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            b"{}",
            BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
}

/// (ready messages, consumers) of `queue`, on a channel of its own (a passive declare of a
/// queue not there yet closes its channel).
async fn queue_state(queue: &str) -> Option<(u32, u32)> {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .ok()?;
    let ch = conn.create_channel().await.ok()?;
    let state = ch
        .queue_declare(
            queue.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok()
        .map(|q| (q.message_count(), q.consumer_count()));
    let _ = conn.close(0, "done".into()).await;
    state
}

async fn cleanup(ch: &lapin::Channel, queue: &str) {
    let mut queues = vec![queue.to_owned(), format!("{queue}.dlq")];
    queues.extend(["1s", "2s", "4s", "5s", "8s", "10s"].map(|t| format!("{queue}.retry.{t}")));
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

fn metric(port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = http_get(&format!("http://127.0.0.1:{port}/metrics"))?;
    metric_value(&body, name, labels)
}

async fn until<T>(check: impl FnMut() -> Option<T>) -> Option<T> {
    let mut check = check;
    wait_for_async(WAIT, || {
        let v = check();
        async move { v }
    })
    .await
}

/// Waits until `queue`'s (ready, consumers) satisfy `ok`.
async fn until_queue(queue: &str, ok: impl Fn(u32, u32) -> bool) -> Option<(u32, u32)> {
    wait_for_async(WAIT, || async {
        queue_state(queue).await.filter(|(r, c)| ok(*r, *c))
    })
    .await
}

/// A daemon config: one amqp consumer `consumer` of `queue` calling handler `handler`, with
/// `handlers` (TOML) defining it.
fn amqp_config(
    port: u16,
    queue: &str,
    consumer: &str,
    handler: &str,
    handlers: &str,
    extra: &str,
) -> String {
    format!(
        r#"
[service]
shutdown_timeout = "5s"
log_format = "pretty"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

{handlers}

[consumers.{consumer}]
source = "rabbit"
queue = "{queue}"
handler = "{handler}"
{extra}
"#
    )
}

/// Runs an amqp consumer `queue` of `queue` calling `handler` (defined in `handlers`) in
/// this process, until its consumer is on the queue; returns its metrics port.
async fn consuming(queue: &str, handler: &str, handlers: &str, extra: &str) -> (u16, InProcess) {
    let port = free_port();
    let running = run(&amqp_config(port, queue, queue, handler, handlers, extra));
    assert!(
        until_queue(queue, |_, c| c == 1).await.is_some(),
        "the consumer never started"
    );
    (port, running)
}

/// Starts the runtime in this process (no handler kind of its own is used).
fn run(text: &str) -> InProcess {
    struct Unused;
    #[async_trait::async_trait]
    impl bosun::Handler for Unused {
        async fn handle(&self, _: &bosun::Message) -> bosun::Outcome {
            bosun::Outcome::Ack
        }
    }
    InProcess::start_text(text, Arc::new(Unused))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_stops_the_consumer_and_releases_what_it_holds_without_using_attempts() {
    let (url, endpoint) = endpoint().await;
    let (queue, handler) = (unique("flow_open"), unique("hook"));
    let (port, running) = consuming(&queue, &handler, &format!(
            "[handlers.{handler}]\nkind = \"http\"\nurl = \"{url}down\"\ncircuit_breaker = {{ consecutive_failures = 2, open_for = \"10m\" }}\n"
        ), "prefetch = 50\nconcurrency = 1\nretry = { max_attempts = 5, initial = \"1s\", max = \"1s\" }").await;
    let (_conn, ch) = rabbit().await;
    publish(&ch, "", &queue, 30).await;

    // Two failures open the breaker: the consumer is cancelled, and what it had prefetched
    // goes back to the queue unstarted (the two retried ones come back from their tier).
    let state = until_queue(&queue, |ready, consumers| consumers == 0 && ready == 30).await;
    assert!(
        state.is_some(),
        "the queue never held all 30 messages with no consumer: {:?} (requests {})",
        queue_state(&queue).await,
        endpoint.count("down")
    );
    assert_eq!(
        metric(
            port,
            "bosun_breaker_state",
            &[&format!("handler=\"{handler}\"")]
        ),
        Some(2.0)
    );
    // Only the calls that opened it reached the endpoint; nothing more while it is open.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(endpoint.count("down"), 2);
    running.stop().await;

    // Every message not tried is still on its first attempt: no bosun-attempt raised.
    let mut untried = 0;
    while let Ok(Some(m)) = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
    {
        let headers = from_table(m.delivery.properties.headers().as_ref());
        if !headers.contains_key("bosun-attempt") {
            untried += 1;
        }
    }
    assert_eq!(
        untried, 28,
        "the released deliveries must not use an attempt"
    );
    cleanup(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_4xx_answers_never_opens_the_breaker() {
    let (url, endpoint) = endpoint().await;
    let (queue, handler) = (unique("flow_4xx"), unique("hook"));
    let (port, running) = consuming(&queue, &handler, &format!(
            "[handlers.{handler}]\nkind = \"http\"\nurl = \"{url}gone\"\ncircuit_breaker = {{ consecutive_failures = 3, min_calls = 5, failure_ratio = 0.1 }}\n"
        ), "concurrency = 4").await;
    let (_conn, ch) = rabbit().await;
    publish(&ch, "", &queue, 40).await;
    let dlq = format!("{queue}.dlq");
    assert!(
        until_queue(&dlq, |ready, _| ready == 40).await.is_some(),
        "every 404 is dead-lettered: {:?}",
        queue_state(&dlq).await
    );
    assert_eq!(endpoint.count("gone"), 40);
    let labels = [format!("handler=\"{handler}\""), "to=\"open\"".to_owned()];
    let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
    assert_eq!(
        metric(port, "bosun_breaker_transitions_total", &labels),
        Some(0.0)
    );
    assert_eq!(
        metric(
            port,
            "bosun_breaker_state",
            &[&format!("handler=\"{handler}\"")]
        ),
        Some(0.0)
    );
    running.stop().await;
    cleanup(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn half_open_sends_one_probe_at_a_time() {
    let (url, endpoint) = endpoint().await;
    let (queue, handler) = (unique("flow_probe"), unique("hook"));
    // Concurrency 8: without a single probe, each half-open spell would send up to 8.
    let (port, running) = consuming(&queue, &handler, &format!(
            "[handlers.{handler}]\nkind = \"http\"\nurl = \"{url}down\"\ncircuit_breaker = {{ consecutive_failures = 3, open_for = \"1s\", max_open_for = \"1s\" }}\n"
        ), "prefetch = 50\nconcurrency = 8\nretry = { max_attempts = 50, initial = \"1s\", max = \"1s\" }").await;
    let (_conn, ch) = rabbit().await;
    publish(&ch, "", &queue, 50).await;
    let half_open = |port| {
        let labels = [
            format!("handler=\"{handler}\""),
            "to=\"half_open\"".to_owned(),
        ];
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        metric(port, "bosun_breaker_transitions_total", &labels)
    };
    // Wait for several half-open spells, each ended by its failed probe.
    assert!(
        until(|| half_open(port).filter(|n| *n >= 4.0))
            .await
            .is_some(),
        "the breaker never went half-open four times"
    );
    let before = half_open(port).unwrap_or(0.0) as usize;
    let requests = endpoint.count("down");
    let after = half_open(port).unwrap_or(0.0) as usize;
    // Up to 8 calls were in flight when it first opened; after that one request per spell
    // (the current spell's probe may be on its way).
    assert!(
        requests <= 8 + after + 1,
        "{requests} requests for {before}..{after} half-open spells"
    );
    running.stop().await;
    cleanup(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_pauses_only_its_sick_branch() {
    let (url, endpoint) = endpoint().await;
    let queue = unique("flow_route");
    let (route, sick, well) = (unique("split"), unique("sick"), unique("well"));
    let handlers = format!(
        r#"
[handlers.{sick}]
kind = "http"
url = "{url}down"
circuit_breaker = {{ consecutive_failures = 3, open_for = "10m" }}

[handlers.{well}]
kind = "http"
url = "{url}ok"

[handlers.{route}]
kind = "route"
routes = [{{ routing_key = "*.sick", handler = "{sick}" }}]
default = "{well}"
"#
    );
    let extra = format!(
        "concurrency = 2\nretry = {{ max_attempts = 3, initial = \"1s\", max = \"1s\" }}\nbindings = [{{ exchange = \"amq.topic\", routing_key = \"{queue}.#\" }}]"
    );
    let (port, running) = consuming(&queue, &route, &handlers, &extra).await;
    let (_conn, ch) = rabbit().await;
    for _ in 0..5 {
        publish(&ch, "amq.topic", &format!("{queue}.sick"), 4).await;
        publish(&ch, "amq.topic", &format!("{queue}.well"), 4).await;
    }
    assert!(
        until(|| (endpoint.count("ok") == 20).then_some(()))
            .await
            .is_some(),
        "the healthy branch got {} of 20",
        endpoint.count("ok")
    );
    // The sick branch: its breaker opened after three failures; its messages wait in the
    // retry path without using attempts, so none is dead-lettered, and the consumer goes on.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert!(
        endpoint.count("down") <= 3 + 2,
        "the sick endpoint got {} requests while its breaker was open",
        endpoint.count("down")
    );
    assert_eq!(
        queue_state(&format!("{queue}.dlq")).await.map(|s| s.0),
        Some(0),
        "a deferred message was dead-lettered"
    );
    assert_eq!(queue_state(&queue).await.map(|s| s.1), Some(1));
    assert_eq!(
        metric(
            port,
            "bosun_breaker_state",
            &[&format!("handler=\"{sick}\"")]
        ),
        Some(2.0)
    );
    running.stop().await;
    cleanup(&ch, &queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_after_pauses_the_limiter_instead_of_using_an_attempt() {
    let (url, endpoint) = endpoint().await;
    let (queue, handler) = (unique("flow_429"), unique("hook"));
    // One attempt only: a 429 retried like a failure would be dead-lettered at once. The
    // pause is 3 s so that a loaded machine still asks the limiter before it ends.
    let (port, running) = consuming(&queue, &handler, &format!(
            "[handlers.{handler}]\nkind = \"http\"\nurl = \"{url}throttle\"\nrate_limit = {{ per_second = 1000 }}\n"
        ), "concurrency = 1\nretry = { max_attempts = 1, initial = \"1s\", max = \"2s\" }").await;
    let (_conn, ch) = rabbit().await;
    publish(&ch, "", &queue, 10).await;
    assert!(
        until(|| (endpoint.count("throttle") == 11).then_some(()))
            .await
            .is_some(),
        "expected 10 messages and one throttled try, saw {} requests",
        endpoint.count("throttle")
    );
    assert_eq!(
        queue_state(&format!("{queue}.dlq")).await.map(|s| s.0),
        Some(0),
        "the throttled message was dead-lettered"
    );
    let waited = metric(
        port,
        "bosun_rate_limit_wait_seconds_total",
        &[&format!("handler=\"{handler}\"")],
    );
    assert!(
        waited.is_some_and(|w| w > 0.0),
        "the consumer never waited on the paused limiter: {waited:?}"
    );
    running.stop().await;
    cleanup(&ch, &queue).await;
}

#[test]
fn a_paused_consumer_stays_paused_across_a_reload_until_resumed() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let stream = unique("flow_pause");
    let (port, admin_port) = (free_port(), free_port());
    let token = "0123456789abcdef0123456789abcdef0123456789abcdef";
    let text = |concurrency: u32| {
        format!(
            r#"
[service]
shutdown_timeout = "5s"

[http]
listen = "127.0.0.1:{port}"

[http.admin]
token_env = "BOSUN_FLOW_TEST_TOKEN"
listen = "127.0.0.1:{admin_port}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.quiet]
kind = "noop"

[consumers.{stream}]
source = "cache"
stream = "{stream}"
group = "g"
handler = "quiet"
concurrency = {concurrency}
block = "200ms"
"#
        )
    };
    let file = ConfigFile::new(&text(4));
    let env = [("BOSUN_FLOW_TEST_TOKEN", token)];
    let daemon = Daemon::start_with_env(&file.path, port, &env);
    assert!(
        daemon.wait_ready(WAIT),
        "not ready: {:?}",
        daemon.get("/readyz")
    );
    let config = file.path.to_string_lossy().into_owned();
    let (code, out, err) = support::bosun_output(
        &[
            "pause",
            "--config",
            &config,
            &stream,
            "--reason",
            "downstream maintenance",
        ],
        &env,
    );
    assert_eq!(code, 0, "bosun pause: {out}{err}");

    // A reload that restarts the consumer (its concurrency changed) keeps it paused.
    file.rewrite(&text(2));
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    let reloaded = support::wait_for(WAIT, || {
        daemon
            .metric("bosun_config_reloads_total", &["result=\"success\""])
            .filter(|n| *n >= 1.0)
    });
    assert!(
        reloaded.is_some(),
        "the reload was not applied:\n{}",
        daemon.logs()
    );

    let received = |daemon: &Daemon| {
        daemon.metric(
            "bosun_messages_received_total",
            &[&format!("consumer=\"{stream}\"")],
        )
    };
    rt.block_on(async {
        let mut redis = support::streams::redis().await;
        support::streams::xadd_many(&mut redis, &stream, 5).await;
    });
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        received(&daemon).unwrap_or(0.0),
        0.0,
        "a paused consumer read"
    );
    assert_eq!(
        daemon.metric(
            "bosun_consumer_paused",
            &[&format!("consumer=\"{stream}\"")]
        ),
        Some(1.0)
    );
    // Paused is healthy and ready; `?verbose` says why.
    assert_eq!(daemon.get("/readyz").map(|r| r.0), Some(200));
    let (status, body) = daemon.get("/healthz?verbose").expect("healthz");
    assert_eq!(status, 200);
    assert!(body.contains("downstream maintenance"), "{body}");
    let (code, out, err) = support::bosun_output(&["status", "--config", &config], &env);
    assert_eq!(code, 0, "bosun status: {err}");
    assert!(
        out.lines()
            .any(|l| l.contains(&stream) && l.contains("paused")),
        "{out}"
    );

    let (code, out, err) = support::bosun_output(&["resume", "--config", &config, &stream], &env);
    assert_eq!(code, 0, "bosun resume: {out}{err}");
    assert!(
        support::wait_for(WAIT, || received(&daemon).filter(|n| *n >= 5.0)).is_some(),
        "the resumed consumer did not read"
    );
    assert_eq!(
        daemon.metric(
            "bosun_consumer_paused",
            &[&format!("consumer=\"{stream}\"")]
        ),
        Some(0.0)
    );
}

/// The group's last delivered id.
async fn last_delivered(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> String {
    let groups: Vec<std::collections::HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XINFO GROUPS");
    match groups.first().and_then(|g| g.get("last-delivered-id")) {
        Some(redis::Value::BulkString(id)) => String::from_utf8_lossy(id).into_owned(),
        Some(redis::Value::SimpleString(id)) => id.clone(),
        other => panic!("no last-delivered-id: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_breaker_stops_a_redis_consumer_reading_and_releases_its_entries_uncounted() {
    let (url, endpoint) = endpoint().await;
    let (stream, handler) = (unique("flow_redis"), unique("hook"));
    let port = free_port();
    let text = format!(
        r#"
[service]
shutdown_timeout = "5s"

[http]
listen = "127.0.0.1:{port}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.{handler}]
kind = "http"
url = "{url}down"
circuit_breaker = {{ consecutive_failures = 2, open_for = "10m" }}

[consumers.{stream}]
source = "cache"
stream = "{stream}"
group = "g"
handler = "{handler}"
concurrency = 1
batch = 10
block = "100ms"
claim_interval = "200ms"
claim_idle = "1s"
retry = {{ max_attempts = 5, initial = "1s", max = "1s" }}
"#
    );
    let mut redis = support::streams::redis().await;
    let running = run(&text);
    let state = |port| {
        metric(
            port,
            "bosun_breaker_state",
            &[&format!("handler=\"{handler}\"")],
        )
    };
    assert!(
        until(|| state(port)).await.is_some(),
        "the daemon never served its metrics"
    );
    support::streams::xadd_many(&mut redis, &stream, 20).await;
    assert!(
        until(|| state(port).filter(|s| *s == 2.0)).await.is_some(),
        "the breaker never opened"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = last_delivered(&mut redis, &stream).await;
    support::streams::xadd_many(&mut redis, &stream, 10).await;
    // Several read blocks and claim rounds: none may take the new entries, nor claim the
    // released ones.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        last_delivered(&mut redis, &stream).await,
        before,
        "a consumer whose breaker is open read on"
    );
    assert_eq!(endpoint.count("down"), 2, "calls went out while open");
    // What it had read and not started is pending with its delivery given back.
    let pending: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(&stream)
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(100)
        .query_async(&mut redis)
        .await
        .expect("XPENDING");
    assert!(!pending.is_empty(), "nothing was held when it opened");
    for (id, _, _, deliveries) in &pending {
        assert!(
            *deliveries <= 1,
            "entry {id} was counted {deliveries} times"
        );
    }
    running.stop().await;
    let _: () = redis::cmd("DEL")
        .arg(&stream)
        .arg(format!("{stream}:retry"))
        .arg(format!("{stream}:dlq"))
        .query_async(&mut redis)
        .await
        .expect("DEL");
}

#[test]
fn flow_control_settings_are_checked_where_they_are_written() {
    let base = format!(
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.hook]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/\"\n"
    );
    let error = |extra: &str| {
        let text = format!("{base}{extra}\n");
        match bosun::config::load_str(
            &text,
            "flow.toml",
            &bosun::handler::HandlerKinds::builtin(),
            &bosun::config::Env::default(),
        ) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    assert_eq!(
        error("circuit_breaker = {}\nrate_limit = { per_second = 5 }"),
        ""
    );
    assert_eq!(
        error("rate_limit = { per_second = 5, scope = \"global\", broker = \"cache\" }"),
        ""
    );
    for (extra, expected) in [
        (
            "circuit_breaker = { failure_ratio = 1.5 }",
            "handlers.hook.circuit_breaker.failure_ratio",
        ),
        (
            "circuit_breaker = { open_for = \"1m\", max_open_for = \"10s\" }",
            "handlers.hook.circuit_breaker.max_open_for",
        ),
        ("circuit_breaker = { bogus = 1 }", "bogus"),
        (
            "rate_limit = { per_second = 0 }",
            "handlers.hook.rate_limit.per_second",
        ),
        (
            "rate_limit = { per_second = 5, scope = \"global\", broker = \"rabbit\" }",
            "a global rate limit is shared through a redis broker",
        ),
        (
            "rate_limit = { per_second = 5, scope = \"global\" }",
            "handlers.hook.rate_limit.broker",
        ),
        (
            "rate_limit = { per_second = 5, scope = \"global\", broker = \"nowhere\" }",
            "broker `nowhere` is not defined",
        ),
    ] {
        let message = error(extra);
        assert!(message.contains(expected), "{extra}: {message}");
    }
}

/// When each request reached the endpoint, by path.
type Arrivals = Arc<std::sync::Mutex<Vec<(String, std::time::Instant)>>>;

async fn arrive(State(arrivals): State<Arrivals>, Path(path): Path<String>) -> StatusCode {
    arrivals
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push((path, std::time::Instant::now()));
    StatusCode::NO_CONTENT
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_share_one_global_rate_limit_through_redis() {
    const PER_SECOND: usize = 20;
    const BURST: usize = 1;
    const MESSAGES: usize = 120;
    let arrivals = Arrivals::default();
    let app = Router::new()
        .route("/{path}", post(arrive))
        .with_state(arrivals.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let base = format!("http://{}/", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });

    // One handler name in both processes (the budget is the handler's), each calling its
    // own path so the endpoint tells them apart.
    let queue = unique("flow_global");
    let handler = unique("global_hook");
    let process = |n: usize| {
        let port = free_port();
        let config = ConfigFile::new(&format!(
            r#"
[service]
name = "global-{n}"
shutdown_timeout = "5s"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.{handler}]
kind = "http"
url = "{base}p{n}"
rate_limit = {{ per_second = {PER_SECOND}, burst = {BURST}, scope = "global", broker = "cache" }}

[consumers.work]
source = "rabbit"
queue = "{queue}"
handler = "{handler}"
prefetch = 10
"#
        ));
        let daemon = Daemon::start(&config.path, port);
        (config, daemon)
    };
    let (_first_config, first) = process(1);
    assert!(first.wait_ready(WAIT), "{}", first.logs());
    let (_second_config, second) = process(2);
    assert!(second.wait_ready(WAIT), "{}", second.logs());
    assert!(
        until_queue(&queue, |_, c| c == 2).await.is_some(),
        "both consumers on the queue"
    );
    let (_conn, ch) = rabbit().await;
    publish(&ch, "", &queue, MESSAGES).await;

    let all = wait_for_async(Duration::from_secs(60), || async {
        let seen = arrivals.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (seen.len() >= MESSAGES).then_some(seen)
    })
    .await
    .unwrap_or_else(|| {
        panic!(
            "not every message reached the endpoint: {} of {MESSAGES}\n{}\n{}",
            arrivals.lock().unwrap_or_else(|p| p.into_inner()).len(),
            first.logs(),
            second.logs()
        )
    });
    let from = |path: &str| all.iter().filter(|(p, _)| p == path).count();
    assert!(
        from("p1") >= 10 && from("p2") >= 10,
        "both processes got work: {} and {}",
        from("p1"),
        from("p2")
    );
    // In every window of one second the two together stayed within the limit plus the
    // burst; one request more is allowed for the time between a token's instant and its
    // request reaching the endpoint, which varies from request to request.
    let times: Vec<std::time::Instant> = all.iter().map(|(_, at)| *at).collect();
    let window = Duration::from_secs(1);
    let busiest = times
        .iter()
        .map(|start| {
            times
                .iter()
                .filter(|t| **t >= *start && **t < *start + window)
                .count()
        })
        .max()
        .unwrap_or(0);
    assert!(
        busiest <= PER_SECOND + BURST + 1,
        "{busiest} requests in one second, limit {PER_SECOND}/s with burst {BURST}"
    );
    drop(first);
    drop(second);
    cleanup(&ch, &queue).await;
}
