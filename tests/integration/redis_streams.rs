//! The Redis Streams consumer against a real Redis, run in-process through `bosun::Runtime`
//! (and through the real binary for SIGTERM).

use crate::support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::handler::HeaderValue;
use bosun::supervisor::ExitStatus;
use bosun::{Handler, Message, Outcome};
use redis::AsyncCommands;
use support::streams::{Fields, create_group, range, redis, xadd, xadd_many, xlen};
use support::{InProcess, PG_URL, REDIS_URL, unique};
const WAIT: Duration = Duration::from_secs(20);

async fn pending_count(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    group: &str,
) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(conn)
        .await
        .expect("XPENDING");
    match summary {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

fn text(fields: &Fields, name: &str) -> String {
    field(fields, name)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

async fn cleanup(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    let _: () = conn
        .del(&[
            stream.to_owned(),
            format!("{stream}:dlq"),
            format!("{stream}:retry"),
        ])
        .await
        .expect("cleanup");
}

/// What a test handler saw.
#[derive(Debug, Clone)]
struct Seen {
    message: Message,
    at: Instant,
}

/// A handler that records every message and answers with `decide`.
struct Recorder {
    seen: Mutex<Vec<Seen>>,
    finished: AtomicUsize,
    delay: Duration,
    decide: Box<dyn Fn(&Message) -> Outcome + Send + Sync>,
}

impl Recorder {
    fn new(
        delay: Duration,
        decide: impl Fn(&Message) -> Outcome + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            seen: Mutex::new(Vec::new()),
            finished: AtomicUsize::new(0),
            delay,
            decide: Box::new(decide),
        })
    }
    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }
    fn ids(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter_map(|s| s.message.message_id)
            .collect()
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        self.seen.lock().expect("lock").push(Seen {
            message: message.clone(),
            at: Instant::now(),
        });
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.finished.fetch_add(1, Ordering::SeqCst);
        (self.decide)(message)
    }
}

/// Consumer settings of one test; `consumers` are `[consumers.*]` tables without the header.
fn config(broker: &str, consumers: &[(&str, String)]) -> String {
    let mut text = format!(
        r#"
[service]
name = "redis-test"
shutdown_timeout = "15s"
log_level = "warn"

[http]
listen = "127.0.0.1:{port}"

[brokers.{broker}]
kind = "redis"
url = "{REDIS_URL}"

[handlers.h]
kind = "test"
"#,
        port = support::free_port()
    );
    for (name, body) in consumers {
        text.push_str(&format!(
            "\n[consumers.{name}]\nsource = \"{broker}\"\nhandler = \"h\"\n{body}\n"
        ));
    }
    text
}

async fn start(text: &str, handler: Arc<dyn Handler>) -> InProcess {
    InProcess::start_text(text, handler)
}

fn metric(name: &str, labels: &[&str]) -> f64 {
    support::metric_value(&bosun::metrics_handle().render(), name, labels).unwrap_or(0.0)
}

async fn wait_until(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn consumer(stream: &str, redis_consumer: &str, extra: &str) -> String {
    format!(
        "stream = \"{stream}\"\ngroup = \"g\"\nconsumer = \"{redis_consumer}\"\nblock = \"200ms\"\nclaim_idle = \"30s\"\nclaim_interval = \"200ms\"\n{extra}"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_every_entry_once_handled() {
    let stream = unique("rs_ack");
    let name = unique("c_ack");
    let mut conn = redis().await;
    xadd_many(&mut conn, &stream, 50).await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(
            &unique("b"),
            &[(
                &name,
                consumer(&stream, &name, "batch = 7\nconcurrency = 3"),
            )],
        ),
        handler.clone(),
    )
    .await;

    wait_until("every entry is handled and acked", async || {
        handler.ids().len() >= 50
            && pending_count(&mut conn, &stream, "g").await == 0
            && metric("bosun_messages_settled_total", &[&name, "outcome=\"ack\""]) >= 50.0
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let ids: HashSet<String> = handler.ids().into_iter().collect();
    assert_eq!(ids.len(), 50, "each entry handled, by its message_id");
    let first = handler
        .seen()
        .into_iter()
        .find(|s| s.message.message_id.as_deref() == Some("m-0"))
        .expect("m-0 handled");
    assert_eq!(first.message.body.as_ref(), b"body-0");
    assert_eq!(first.message.attempt, 1);
    assert_eq!(first.message.source.queue, stream);
    assert_eq!(metric("bosun_messages_received_total", &[&name]), 50.0);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_entry_is_retried_after_its_backoff_then_dead_lettered() {
    let stream = unique("rs_retry");
    let name = unique("c_retry");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::retry("boom"));
    let retry =
        "retry = { max_attempts = 3, backoff = \"fixed\", initial = \"300ms\", jitter = 0.0 }";
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, retry))]),
        handler.clone(),
    )
    .await;
    let orig = xadd(
        &mut conn,
        &stream,
        &[
            ("payload", b"p"),
            ("message_id", b"stable-1"),
            ("tenant", b"acme"),
        ],
    )
    .await;

    let dlq = format!("{stream}:dlq");
    wait_until("the entry reaches the dead-letter stream", async || {
        range(&mut conn, &dlq).await.len() == 1
    })
    .await;
    let seen = handler.seen();
    assert_eq!(
        seen.iter().map(|s| s.message.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3]
    );
    assert!(
        seen.iter()
            .all(|s| s.message.message_id.as_deref() == Some("stable-1")),
        "message_id is stable across retries"
    );
    for pair in seen.windows(2) {
        assert!(
            pair[1].at - pair[0].at >= Duration::from_millis(300),
            "retried only after the backoff"
        );
    }
    let dead = range(&mut conn, &dlq).await.remove(0).1;
    assert_eq!(field(&dead, "payload"), Some(&b"p"[..]));
    assert_eq!(text(&dead, "tenant"), "acme");
    assert_eq!(text(&dead, "message_id"), "stable-1");
    assert_eq!(text(&dead, "bosun-orig-stream"), stream);
    assert!(
        !text(&dead, "bosun-orig-id").is_empty() && text(&dead, "bosun-orig-id") != orig,
        "the last retry copy's id"
    );
    assert_eq!(text(&dead, "bosun-group"), "g");
    assert_eq!(text(&dead, "bosun-consumer"), name);
    assert_eq!(text(&dead, "bosun-deliveries"), "1");
    assert_eq!(text(&dead, "bosun-attempt"), "3");
    assert_eq!(text(&dead, "bosun-error"), "boom");
    assert_eq!(text(&dead, "bosun-error-kind"), "exhausted");
    assert!(chrono::DateTime::parse_from_rfc3339(&text(&dead, "bosun-failed-at")).is_ok());
    wait_until("nothing is left pending", async || {
        pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    let scheduled: i64 = conn.zcard(format!("{stream}:retry")).await.expect("ZCARD");
    assert_eq!(scheduled, 0);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(
        metric(
            "bosun_messages_settled_total",
            &[&name, "outcome=\"retry\""]
        ),
        2.0
    );
    assert_eq!(
        metric(
            "bosun_messages_settled_total",
            &[&name, "outcome=\"dead_letter\""]
        ),
        1.0
    );
    cleanup(&mut conn, &stream).await;
}

/// A consumer `name` of `stream` that tries each entry twice, 100 ms apart.
async fn start_trying_twice(stream: &str, name: &str, handler: Arc<dyn Handler>) -> InProcess {
    let retry =
        "retry = { max_attempts = 2, backoff = \"fixed\", initial = \"100ms\", jitter = 0.0 }";
    start(
        &config(&unique("b"), &[(name, consumer(stream, name, retry))]),
        handler,
    )
    .await
}

/// The fields of the first entry of `stream`'s dead-letter stream, once there is one.
async fn first_dead_letter(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Fields {
    let dlq = format!("{stream}:dlq");
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some((_, fields)) = range(conn, &dlq).await.into_iter().next() {
            return fields;
        }
        assert!(Instant::now() < deadline, "nothing reached {dlq}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Panics on every message, with the message id in the panic text.
struct Panicking;

#[async_trait]
impl Handler for Panicking {
    async fn handle(&self, message: &Message) -> Outcome {
        panic!(
            "cannot parse order {}",
            message.message_id.as_deref().unwrap_or("?")
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_handler_is_retried_and_dead_lettered_with_the_panic_text() {
    let stream = unique("rs_panic");
    let name = unique("c_panic");
    let mut conn = redis().await;
    let running = start_trying_twice(&stream, &name, Arc::new(Panicking)).await;
    xadd(
        &mut conn,
        &stream,
        &[("message_id", b"order-7"), ("payload", b"p")],
    )
    .await;
    let dead = first_dead_letter(&mut conn, &stream).await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(text(&dead, "bosun-attempt"), "2");
    assert_eq!(text(&dead, "bosun-error-kind"), "exhausted");
    assert_eq!(
        text(&dead, "bosun-error"),
        "handler panicked: cannot parse order order-7"
    );
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_delivered_more_than_max_deliveries_is_dead_lettered_unhandled() {
    let stream = unique("rs_maxdel");
    let name = unique("c_maxdel");
    let mut conn = redis().await;
    create_group(&mut conn, &stream).await;
    xadd(&mut conn, &stream, &[("payload", b"poison")]).await;
    // Three deliveries to this consumer name that never settled (a crash loop).
    for cursor in [">", "0", "0"] {
        let _: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg(&name)
            .arg("STREAMS")
            .arg(&stream)
            .arg(cursor)
            .query_async(&mut conn)
            .await
            .expect("XREADGROUP");
    }
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(
            &unique("b"),
            &[(&name, consumer(&stream, &name, "max_deliveries = 3"))],
        ),
        handler.clone(),
    )
    .await;
    let dlq = format!("{stream}:dlq");
    wait_until("the entry is dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 1
    })
    .await;
    let dead = range(&mut conn, &dlq).await.remove(0).1;
    assert_eq!(text(&dead, "bosun-deliveries"), "4");
    assert_eq!(text(&dead, "bosun-error-kind"), "exhausted");
    assert!(text(&dead, "bosun-error").contains("max_deliveries 3"));
    assert_eq!(field(&dead, "payload"), Some(&b"poison"[..]));
    assert!(handler.seen().is_empty(), "the handler never saw it");
    assert_eq!(pending_count(&mut conn, &stream, "g").await, 0);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_of_a_dead_consumer_are_claimed_after_claim_idle() {
    let stream = unique("rs_claim");
    let name = unique("c_claim");
    let mut conn = redis().await;
    create_group(&mut conn, &stream).await;
    xadd_many(&mut conn, &stream, 20).await;
    // A consumer that read a batch and died before XACK.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("COUNT")
        .arg(20)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let gone = xadd(
        &mut conn,
        &stream,
        &[("payload", b"deleted before anyone handled it")],
    )
    .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let _: i64 = conn.xdel(&stream, &[&gone]).await.expect("XDEL");

    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let extra = "claim_idle = \"500ms\"";
    let body = consumer(&stream, &name, "").replace("claim_idle = \"30s\"\n", "") + extra;
    let running = start(&config(&unique("b"), &[(&name, body)]), handler.clone()).await;
    wait_until(
        "the dead consumer's entries are handled and acked",
        async || handler.ids().len() >= 20 && pending_count(&mut conn, &stream, "g").await == 0,
    )
    .await;
    let seen = handler.seen();
    assert_eq!(
        seen.iter()
            .filter_map(|s| s.message.message_id.clone())
            .collect::<HashSet<_>>()
            .len(),
        20
    );
    assert!(
        seen.iter().all(|s| s.message.redelivered),
        "claimed entries are marked redelivered"
    );
    assert!(metric("bosun_redis_claimed_total", &[&name]) >= 20.0);
    assert_eq!(
        metric("bosun_redis_deleted_entries_total", &[&name]),
        1.0,
        "the deleted pending entry is counted"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_consumers_share_the_work_without_loss_or_repeats() {
    let stream = unique("rs_share");
    let (a, b) = (unique("c_a"), unique("c_b"));
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::from_millis(1), |_| Outcome::Ack);
    let text = config(
        &unique("b"),
        &[
            (&a, consumer(&stream, &a, "batch = 20\nconcurrency = 4")),
            (&b, consumer(&stream, &b, "batch = 20\nconcurrency = 4")),
        ],
    );
    let running = start(&text, handler.clone()).await;
    wait_until("both consumers joined the group", async || {
        let info: redis::Value = match redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("g")
            .query_async(&mut conn)
            .await
        {
            Ok(v) => v,
            Err(_) => return false,
        };
        matches!(info, redis::Value::Array(ref c) if c.len() == 2)
    })
    .await;
    xadd_many(&mut conn, &stream, 1000).await;
    wait_until("every entry is handled", async || {
        handler.ids().len() >= 1000 && pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let seen = handler.seen();
    let mut per_id: HashMap<String, usize> = HashMap::new();
    let mut per_consumer: BTreeMap<String, usize> = BTreeMap::new();
    for s in &seen {
        *per_id
            .entry(s.message.message_id.clone().unwrap_or_default())
            .or_default() += 1;
        *per_consumer
            .entry(s.message.source.consumer.clone())
            .or_default() += 1;
    }
    assert_eq!(per_id.len(), 1000, "nothing lost");
    assert!(per_id.values().all(|n| *n == 1), "nothing handled twice");
    assert_eq!(
        per_consumer.len(),
        2,
        "both consumers took a share: {per_consumer:?}"
    );
    cleanup(&mut conn, &stream).await;
}

/// Kills this test's own connections (found by the client names bosun sets), never others'.
async fn kill_own_clients(
    conn: &mut redis::aio::MultiplexedConnection,
    redis_consumer: &str,
) -> usize {
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(conn)
        .await
        .expect("CLIENT LIST");
    let mut killed = 0;
    for line in list.lines() {
        let name = line
            .split(' ')
            .find_map(|kv| kv.strip_prefix("name="))
            .unwrap_or_default();
        if name == format!("bosun:{redis_consumer}:read")
            || name == format!("bosun:{redis_consumer}:ops")
        {
            let id = line
                .split(' ')
                .find_map(|kv| kv.strip_prefix("id="))
                .expect("client id");
            let _: redis::Value = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(id)
                .query_async(conn)
                .await
                .expect("CLIENT KILL");
            killed += 1;
        }
    }
    killed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_mid_flight_then_resume_without_loss() {
    let stream = unique("rs_kill");
    let name = unique("c_kill");
    let broker = unique("b");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::from_millis(10), |_| Outcome::Ack);
    let running = start(
        &config(
            &broker,
            &[(
                &name,
                consumer(&stream, &name, "batch = 10\nconcurrency = 5"),
            )],
        ),
        handler.clone(),
    )
    .await;
    xadd_many(&mut conn, &stream, 300).await;
    wait_until("some entries are handled", async || {
        handler.ids().len() >= 30
    })
    .await;
    assert_eq!(
        kill_own_clients(&mut conn, &name).await,
        2,
        "the read and the managed connection"
    );
    wait_until(
        "every entry is handled and acked after the reconnect",
        async || {
            handler.ids().into_iter().collect::<HashSet<_>>().len() >= 300
                && pending_count(&mut conn, &stream, "g").await == 0
        },
    )
    .await;
    assert!(metric("bosun_broker_reconnects_total", &[&broker]) >= 1.0);
    assert_eq!(metric("bosun_broker_connected", &[&broker]), 1.0);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminate_finishes_started_handlers_and_acks_them() {
    let stream = unique("rs_drain");
    let name = unique("c_drain");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::from_millis(300), |_| Outcome::Ack);
    let running = start(
        &config(
            &unique("b"),
            &[(
                &name,
                consumer(&stream, &name, "batch = 5\nconcurrency = 5"),
            )],
        ),
        handler.clone(),
    )
    .await;
    xadd_many(&mut conn, &stream, 40).await;
    wait_until("handlers are running", async || !handler.seen().is_empty()).await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let started = handler.seen().len();
    assert!(started < 40, "shutdown stopped reading ({started} started)");
    assert_eq!(
        handler.finished.load(Ordering::SeqCst),
        started,
        "every started handler finished"
    );
    assert_eq!(
        pending_count(&mut conn, &stream, "g").await,
        0,
        "and its entry was acked"
    );
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_the_real_binary() {
    let stream = unique("rs_sigterm");
    let name = unique("c_sigterm");
    let mut conn = redis().await;
    xadd_many(&mut conn, &stream, 20_000).await;
    let port = support::free_port();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n[consumers.{name}]\nsource = \"cache\"\nhandler = \"n\"\n{}",
        consumer(&stream, &name, "batch = 50")
    );
    let file = support::ConfigFile::new(&text);
    let mut daemon = support::Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(WAIT), "ready");
    let received = support::wait_for(WAIT, || {
        daemon
            .metric("bosun_messages_received_total", &[&name])
            .filter(|n| *n > 0.0)
    });
    assert!(received.is_some(), "entries are flowing");
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "clean exit");
    assert!(daemon.logs().contains("redis consumer stopped"));
    assert_eq!(
        pending_count(&mut conn, &stream, "g").await,
        0,
        "everything it read was acked"
    );
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_the_handler_cannot_use_are_dead_lettered_as_invalid() {
    let stream = unique("rs_invalid");
    let name = unique("c_invalid");
    let mut conn = redis().await;
    // A handler that needs a JSON body: anything else is permanent, not worth a retry.
    let handler = Recorder::new(Duration::ZERO, |m| {
        match serde_json::from_slice::<serde_json::Value>(&m.body) {
            Ok(_) => Outcome::Ack,
            Err(e) => Outcome::invalid(format!("body is not JSON: {e}")),
        }
    });
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, ""))]),
        handler.clone(),
    )
    .await;
    xadd(&mut conn, &stream, &[("body", b"{}")]).await;
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"{}"), ("bosun-attempt", b"many")],
    )
    .await;
    xadd(&mut conn, &stream, &[("payload", b"not json")]).await;
    xadd(&mut conn, &stream, &[("payload", b"{\"ok\":true}")]).await;
    let dlq = format!("{stream}:dlq");
    wait_until("three entries are dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 3
    })
    .await;
    wait_until("nothing is left pending", async || {
        pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    let dead = range(&mut conn, &dlq).await;
    assert!(
        dead.iter()
            .all(|(_, f)| text(f, "bosun-error-kind") == "invalid")
    );
    let errors: Vec<String> = dead.iter().map(|(_, f)| text(f, "bosun-error")).collect();
    for reason in [
        "no `payload` field",
        "`bosun-attempt` is not a positive integer",
        "body is not JSON",
    ] {
        assert!(
            errors.iter().any(|e| e.contains(reason)),
            "{reason:?} in {errors:?}"
        );
    }
    assert_eq!(
        handler.seen().len(),
        2,
        "only entries with a usable layout reach the handler, each once"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_field_values_pass_through_untouched() {
    let stream = unique("rs_binary");
    let name = unique("c_binary");
    let mut conn = redis().await;
    let body: Vec<u8> = (0..=255u8).collect();
    let raw: &[u8] = &[0xff, 0x00, 0xc3, 0x28];
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::dead_letter("keep a copy"));
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, ""))]),
        handler.clone(),
    )
    .await;
    xadd(
        &mut conn,
        &stream,
        &[
            ("payload", &body),
            ("raw", raw),
            ("text", "héllo".as_bytes()),
        ],
    )
    .await;
    let dlq = format!("{stream}:dlq");
    wait_until("the copy is dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 1
    })
    .await;
    let seen = handler.seen().remove(0).message;
    assert_eq!(seen.body.as_ref(), &body[..]);
    assert_eq!(
        seen.headers.get("raw"),
        Some(&HeaderValue::Bytes(raw.to_vec()))
    );
    assert_eq!(
        seen.headers.get("text"),
        Some(&HeaderValue::String("héllo".into()))
    );
    let dead = range(&mut conn, &dlq).await.remove(0).1;
    assert_eq!(field(&dead, "payload"), Some(&body[..]));
    assert_eq!(field(&dead, "raw"), Some(raw));
    assert_eq!(text(&dead, "bosun-error-kind"), "permanent");
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vanished_stream_and_group_are_recreated() {
    let stream = unique("rs_vanish");
    let name = unique("c_vanish");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, ""))]),
        handler.clone(),
    )
    .await;
    xadd(&mut conn, &stream, &[("payload", b"before")]).await;
    wait_until("the first entry is handled", async || {
        handler.seen().len() == 1
    })
    .await;
    let _: () = conn.del(&stream).await.expect("DEL");
    // XADD alone re-creates the stream, without the group.
    xadd(&mut conn, &stream, &[("payload", b"after")]).await;
    wait_until("the entry added after the loss is handled", async || {
        handler
            .seen()
            .iter()
            .any(|s| s.message.body.as_ref() == b"after")
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

/// `items` as a MessagePack array of strings, the way the retry script packs a copy.
fn msgpack_strings(items: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    let n = items.len();
    if n < 16 {
        out.push(0x90 | n as u8);
    } else {
        out.push(0xdc);
        out.extend_from_slice(&(n as u16).to_be_bytes());
    }
    for item in items {
        let len = item.len();
        if len < 32 {
            out.push(0xa0 | len as u8);
        } else {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        out.extend_from_slice(item);
    }
    out
}

/// An XADD of `payload`, `message_id` and `extra` fields named `f0`, `f1`...
async fn xadd_wide(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    message_id: &str,
    extra: usize,
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream)
        .arg("*")
        .arg("payload")
        .arg(format!("body of {message_id}"))
        .arg("message_id")
        .arg(message_id);
    for i in 0..extra {
        cmd.arg(format!("f{i}")).arg("v");
    }
    cmd.query_async(conn).await.expect("XADD")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_thousand_field_entry_that_fails_is_dead_lettered_whole_as_invalid() {
    let stream = unique("rs_wide");
    let name = unique("c_wide");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::retry("boom"));
    let running = start_trying_twice(&stream, &name, handler.clone()).await;
    xadd_wide(&mut conn, &stream, "wide-1", 4000).await;
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"narrow-1")],
    )
    .await;

    let dlq = format!("{stream}:dlq");
    wait_until("both entries are dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 2
    })
    .await;
    let dead = range(&mut conn, &dlq).await;
    let wide = dead
        .iter()
        .map(|(_, f)| f)
        .find(|f| text(f, "message_id") == "wide-1")
        .expect("the wide entry's copy");
    assert_eq!(text(wide, "bosun-error-kind"), "invalid");
    assert!(
        text(wide, "bosun-error").contains("4002 fields"),
        "{}",
        text(wide, "bosun-error")
    );
    assert_eq!(text(wide, "payload"), "body of wide-1");
    let packed = field(wide, "bosun-orig-fields").expect("the original fields, packed");
    assert!(
        packed.ends_with(b"5:f3999,1:v,"),
        "every original field is kept"
    );
    assert!(wide.len() < 20, "the copy has a fixed number of fields");
    assert!(
        !handler.ids().contains(&"wide-1".to_owned()),
        "an entry over the bounds never reaches the handler"
    );
    assert_eq!(handler.ids(), vec!["narrow-1", "narrow-1"]);
    wait_until("nothing is left pending or scheduled", async || {
        let scheduled: i64 = conn.zcard(format!("{stream}:retry")).await.expect("ZCARD");
        pending_count(&mut conn, &stream, "g").await == 0 && scheduled == 0
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entry_at_the_field_limit_is_retried_and_dead_lettered_with_every_field() {
    let stream = unique("rs_limit");
    let name = unique("c_limit");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::retry("boom"));
    let extra = "max_fields = 3800\nretry = { max_attempts = 2, backoff = \"fixed\", initial = \"100ms\", jitter = 0.0 }";
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, extra))]),
        handler.clone(),
    )
    .await;
    // 3,800 fields with `payload` and `message_id`: the most this consumer accepts.
    xadd_wide(&mut conn, &stream, "limit-1", 3798).await;
    let dlq = format!("{stream}:dlq");
    wait_until("the entry is dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 1
    })
    .await;
    let dead = range(&mut conn, &dlq).await.remove(0).1;
    assert_eq!(text(&dead, "bosun-error-kind"), "exhausted");
    assert_eq!(text(&dead, "f3797"), "v");
    assert_eq!(
        handler
            .seen()
            .iter()
            .map(|s| s.message.attempt)
            .collect::<Vec<_>>(),
        vec![1, 2],
        "retried through the retry set, then dead-lettered"
    );
    assert_eq!(pending_count(&mut conn, &stream, "g").await, 0);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_fails_leaves_the_entry_pending_until_it_can_be_made() {
    let (dl_stream, retry_stream) = (unique("rs_dlfail"), unique("rs_rtfail"));
    let (dl_name, retry_name) = (unique("c_dlfail"), unique("c_rtfail"));
    let mut conn = redis().await;
    // Keys of the wrong type: the dead-letter XADD and the retry ZADD fail.
    let _: () = conn
        .set(format!("{dl_stream}:dlq"), "not a stream")
        .await
        .expect("SET");
    let _: () = conn
        .set(format!("{retry_stream}:retry"), "not a sorted set")
        .await
        .expect("SET");
    let dl_for = dl_stream.clone();
    let handler = Recorder::new(Duration::ZERO, move |m| {
        if m.source.queue == dl_for {
            Outcome::DeadLetter {
                reason: "refused".into(),
                kind: bosun::handler::FailureKind::Permanent,
            }
        } else if m.attempt == 1 {
            Outcome::retry("later")
        } else {
            Outcome::Ack
        }
    });
    let body = |stream: &str, name: &str| {
        consumer(
            stream,
            name,
            "retry = { max_attempts = 3, backoff = \"fixed\", initial = \"100ms\", jitter = 0.0 }",
        )
        .replace("claim_idle = \"30s\"", "claim_idle = \"1s\"")
    };
    let running = start(
        &config(
            &unique("b"),
            &[
                (&dl_name, body(&dl_stream, &dl_name)),
                (&retry_name, body(&retry_stream, &retry_name)),
            ],
        ),
        handler.clone(),
    )
    .await;
    xadd(
        &mut conn,
        &dl_stream,
        &[("payload", b"d"), ("message_id", b"dl-1")],
    )
    .await;
    xadd(
        &mut conn,
        &retry_stream,
        &[("payload", b"r"), ("message_id", b"rt-1")],
    )
    .await;
    wait_until("both entries reached the handler", async || {
        let ids = handler.ids();
        ids.contains(&"dl-1".to_owned()) && ids.contains(&"rt-1".to_owned())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(
        pending_count(&mut conn, &dl_stream, "g").await,
        1,
        "a failed dead-letter copy leaves the entry pending"
    );
    assert_eq!(
        pending_count(&mut conn, &retry_stream, "g").await,
        1,
        "a failed retry copy leaves the entry pending"
    );
    // Once the copies can be made, the claim loop takes the entries again.
    let _: () = conn
        .del(&[format!("{dl_stream}:dlq"), format!("{retry_stream}:retry")])
        .await
        .expect("DEL");
    wait_until(
        "the dead letter is copied and the retry handled",
        async || {
            range(&mut conn, &format!("{dl_stream}:dlq")).await.len() == 1
                && handler.seen().iter().any(|s| {
                    s.message.message_id.as_deref() == Some("rt-1") && s.message.attempt == 2
                })
                && pending_count(&mut conn, &dl_stream, "g").await == 0
                && pending_count(&mut conn, &retry_stream, "g").await == 0
        },
    )
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &dl_stream).await;
    cleanup(&mut conn, &retry_stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poisoned_retry_members_are_dead_lettered_and_the_rest_move_on() {
    let stream = unique("rs_poison");
    let name = unique("c_poison");
    let mut conn = redis().await;
    create_group(&mut conn, &stream).await;
    let retry_key = format!("{stream}:retry");
    let good = msgpack_strings(&[b"1-0", b"payload", b"fine", b"message_id", b"good-1"]);
    let mut wide: Vec<Vec<u8>> = vec![b"2-0".to_vec(), b"payload".to_vec(), b"w".to_vec()];
    for i in 0..4000 {
        wide.push(format!("f{i}").into_bytes());
        wide.push(b"v".to_vec());
    }
    let wide = msgpack_strings(&wide.iter().map(Vec::as_slice).collect::<Vec<_>>());
    // Ahead of the good one: undecodable, and too many fields to re-add in one call.
    let _: i64 = conn
        .zadd(&retry_key, &b"\xc1 not msgpack"[..], 1)
        .await
        .expect("ZADD");
    let _: i64 = conn
        .zadd(&retry_key, wide.as_slice(), 2)
        .await
        .expect("ZADD");
    let _: i64 = conn
        .zadd(&retry_key, good.as_slice(), 3)
        .await
        .expect("ZADD");

    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, ""))]),
        handler.clone(),
    )
    .await;
    wait_until("the good member is handled", async || {
        handler.ids() == vec!["good-1".to_owned()]
    })
    .await;
    let dlq = format!("{stream}:dlq");
    wait_until("both poisoned members are dead-lettered", async || {
        range(&mut conn, &dlq).await.len() == 2
    })
    .await;
    for (_, dead) in range(&mut conn, &dlq).await {
        assert_eq!(text(&dead, "bosun-error-kind"), "invalid");
        assert_eq!(text(&dead, "bosun-orig-stream"), stream);
        assert!(
            field(&dead, "payload")
                .is_some_and(|p| p == b"\xc1 not msgpack" || p == wide.as_slice())
        );
    }
    let scheduled: i64 = conn.zcard(&retry_key).await.expect("ZCARD");
    assert_eq!(scheduled, 0);
    assert_eq!(metric("bosun_redis_invalid_retries_total", &[&name]), 2.0);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_after_beyond_the_longest_delay_is_capped_to_it() {
    let stream = unique("rs_cap");
    let name = unique("c_cap");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |m| {
        if m.attempt == 1 {
            // What a `Retry-After: 99999999999` asks for: over 3,000 years.
            Outcome::Retry {
                after: Some(Duration::from_secs(99_999_999_999)),
                reason: "come back much later".into(),
            }
        } else {
            Outcome::Ack
        }
    });
    let retry = "retry = { max_attempts = 3, backoff = \"exponential\", initial = \"100ms\", max = \"500ms\", jitter = 0.0 }";
    let running = start(
        &config(&unique("b"), &[(&name, consumer(&stream, &name, retry))]),
        handler.clone(),
    )
    .await;
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"cap-1")],
    )
    .await;
    wait_until("the second attempt runs after at most `max`", async || {
        handler.seen().len() == 2
    })
    .await;
    let seen = handler.seen();
    let waited = seen[1].at - seen[0].at;
    assert!(
        waited >= Duration::from_millis(500) && waited < Duration::from_secs(10),
        "waited {waited:?}"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

/// This consumer's delivery count of `id`, from XPENDING.
async fn delivery_count(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    id: &str,
) -> Option<u64> {
    let rows: Vec<(String, String, u64, u64)> = redis::cmd("XPENDING")
        .arg(stream)
        .arg("g")
        .arg(id)
        .arg(id)
        .arg(1)
        .query_async(conn)
        .await
        .expect("XPENDING");
    rows.first().map(|r| r.3)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_reconnects_do_not_count_deliveries_of_entries_in_flight() {
    let stream = unique("rs_count");
    let name = unique("c_count");
    let mut conn = redis().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let counter = calls.clone();
    // The first run outlasts many claim rounds and a reconnect, then hands the entry back.
    let handler = Recorder::new(Duration::from_secs(4), move |_| {
        if counter.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Release {
                reason: "not now".into(),
            }
        } else {
            Outcome::Ack
        }
    });
    let body = consumer(&stream, &name, "max_deliveries = 2")
        .replace("claim_idle = \"30s\"", "claim_idle = \"300ms\"");
    let running = start(&config(&unique("b"), &[(&name, body)]), handler.clone()).await;
    let id = xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"count-1")],
    )
    .await;
    wait_until("the handler started", async || handler.seen().len() == 1).await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(kill_own_clients(&mut conn, &name).await > 0);
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        delivery_count(&mut conn, &stream, &id).await,
        Some(1),
        "claims and the re-read after a reconnect did not count the entry in flight"
    );
    wait_until(
        "the released entry is handled again and acked",
        async || {
            handler.finished.load(Ordering::SeqCst) == 2
                && pending_count(&mut conn, &stream, "g").await == 0
        },
    )
    .await;
    assert!(
        range(&mut conn, &format!("{stream}:dlq")).await.is_empty(),
        "never dead-lettered as exhausted"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_live_process_with_the_same_consumer_name_does_not_read_until_the_first_stops() {
    let stream = unique("rs_dup");
    let shared = unique("c_dup");
    let mut conn = redis().await;
    let first = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let second = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let text = |consumer_name: &str| {
        config(
            &unique("b"),
            &[(consumer_name, consumer(&stream, &shared, ""))],
        )
    };
    let running_first = start(&text(&unique("one")), first.clone()).await;
    wait_until("the first process holds the name", async || {
        let held: Option<String> = conn
            .get(format!("{stream}:lock:g:{shared}"))
            .await
            .expect("GET");
        held.is_some()
    })
    .await;
    let running_second = start(&text(&unique("two")), second.clone()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    xadd_many(&mut conn, &stream, 30).await;
    wait_until("the first process handled everything", async || {
        first.ids().len() == 30 && pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    assert!(second.ids().is_empty(), "the duplicate name never read");
    assert_eq!(running_first.stop().await, ExitStatus::Clean);
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"after")],
    )
    .await;
    wait_until("the second process takes the name over", async || {
        second.ids() == vec!["after".to_owned()]
    })
    .await;
    assert_eq!(running_second.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_consumer_name_is_bosun_consumer_name_or_the_hostname() {
    let stream = unique("rs_name");
    let chosen = unique("pod");
    let mut conn = redis().await;
    let port = support::free_port();
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:{port}\"\n[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n[consumers.c]\nsource = \"cache\"\nhandler = \"n\"\nstream = \"{stream}\"\ngroup = \"g\"\nblock = \"200ms\"\n"
    );
    let file = support::ConfigFile::new(&text);
    let mut daemon =
        support::Daemon::start_with_env(&file.path, port, &[("BOSUN_CONSUMER_NAME", &chosen)]);
    assert!(daemon.wait_ready(WAIT), "ready");
    let names = async |conn: &mut redis::aio::MultiplexedConnection| -> Vec<String> {
        let info: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("g")
            .query_async(conn)
            .await
            .expect("XINFO");
        info.iter()
            .filter_map(|c| match c.get("name") {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                _ => None,
            })
            .collect()
    };
    assert_eq!(names(&mut conn).await, vec![chosen.clone()]);
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "clean exit");
    // Without the variable, the hostname: the same name at every restart.
    let _: () = redis::cmd("XGROUP")
        .arg("DELCONSUMER")
        .arg(&stream)
        .arg("g")
        .arg(&chosen)
        .query_async(&mut conn)
        .await
        .expect("DELCONSUMER");
    let host = nix::unistd::gethostname()
        .expect("hostname")
        .into_string()
        .expect("UTF-8 hostname");
    for _ in 0..2 {
        let mut daemon = support::Daemon::start(&file.path, port);
        assert!(daemon.wait_ready(WAIT), "ready");
        assert_eq!(names(&mut conn).await, vec![host.clone()]);
        daemon.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(daemon.wait_exit(WAIT), Some(0), "clean exit");
    }
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumers_idle_past_forget_idle_with_nothing_pending_are_removed() {
    let stream = unique("rs_forget");
    let name = unique("c_forget");
    let mut conn = redis().await;
    create_group(&mut conn, &stream).await;
    for ghost in ["ghost-1", "ghost-2"] {
        let _: i64 = redis::cmd("XGROUP")
            .arg("CREATECONSUMER")
            .arg(&stream)
            .arg("g")
            .arg(ghost)
            .query_async(&mut conn)
            .await
            .expect("CREATECONSUMER");
    }
    // A third one still holds an entry: kept until the entry is claimed and handled.
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"held")],
    )
    .await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("holder")
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let body = consumer(&stream, &name, "forget_idle = \"2s\"")
        .replace("claim_idle = \"30s\"", "claim_idle = \"1s\"");
    let running = start(&config(&unique("b"), &[(&name, body)]), handler.clone()).await;
    let names = async |conn: &mut redis::aio::MultiplexedConnection| -> HashSet<String> {
        let info: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(&stream)
            .arg("g")
            .query_async(conn)
            .await
            .expect("XINFO");
        info.iter()
            .filter_map(|c| match c.get("name") {
                Some(redis::Value::BulkString(b)) => String::from_utf8(b.clone()).ok(),
                _ => None,
            })
            .collect()
    };
    wait_until("only the running consumer is left", async || {
        names(&mut conn).await == HashSet::from([name.clone()])
    })
    .await;
    assert_eq!(
        handler.ids(),
        vec!["held".to_owned()],
        "the held entry was claimed first"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

/// A private `redis-server` on a free port, for server states the shared one must never be
/// put in (out of memory); stopped when dropped.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    async fn start() -> Self {
        let port = support::free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = std::process::Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let url = format!("redis://127.0.0.1:{port}/");
        let server = Self {
            child,
            url,
            _dir: dir,
        };
        wait_until("the private redis-server answers", async || {
            server.connect().await.is_some()
        })
        .await;
        server
    }

    async fn connect(&self) -> Option<redis::aio::MultiplexedConnection> {
        redis::Client::open(self.url.as_str())
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_settlement_refused_for_lack_of_memory_is_sent_again_not_left_pending() {
    let server = PrivateRedis::start().await;
    let mut conn = server.connect().await.expect("connect");
    let stream = unique("rs_oom");
    let name = unique("c_oom");
    let handler = Recorder::new(Duration::from_millis(500), |_| Outcome::DeadLetter {
        reason: "refused".into(),
        kind: bosun::handler::FailureKind::Permanent,
    });
    let body = consumer(&stream, &name, "").replace("claim_idle = \"30s\"", "claim_idle = \"1s\"");
    let text = config(&unique("b"), &[(&name, body)]).replace(REDIS_URL, &server.url);
    let running = start(&text, handler.clone()).await;
    xadd(
        &mut conn,
        &stream,
        &[("payload", b"p"), ("message_id", b"oom-1")],
    )
    .await;
    wait_until("the handler started", async || handler.seen().len() == 1).await;
    // Out of memory while the handler runs: its dead-letter copy is refused with OOM.
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("1")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    tokio::time::sleep(Duration::from_millis(3000)).await;
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg("maxmemory")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("CONFIG SET");
    wait_until("the copy is made once memory is back", async || {
        range(&mut conn, &format!("{stream}:dlq")).await.len() == 1
            && pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        handler.seen().len(),
        1,
        "settled by sending the copy again, not by claiming and handling the entry again"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
}

#[test]
fn entry_bounds_and_forget_idle_are_validated() {
    let load = |extra: &str| {
        let text = format!(
            "[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n[consumers.c]\nsource = \"cache\"\nhandler = \"n\"\nstream = \"s\"\n{extra}"
        );
        bosun::config::load_str(
            &text,
            "test.toml",
            &bosun::handler::HandlerKinds::builtin(),
            &bosun::config::Env::from_pairs(std::iter::empty::<(&str, &str)>()),
        )
    };
    let redis_of = |config: bosun::config::Config| match config.consumers.get("c").map(|c| &c.kind)
    {
        Some(bosun::config::ConsumerKind::Redis(r)) => r.clone(),
        other => panic!("not a redis consumer: {other:?}"),
    };
    let defaults = redis_of(load("").expect("valid"));
    assert_eq!(defaults.limits.max_fields, 1000);
    assert_eq!(defaults.limits.max_bytes, 16 << 20);
    assert_eq!(defaults.forget_idle, Duration::from_secs(86_400));
    let set = redis_of(
        load("max_fields = 3800\nmax_entry_size = \"1MiB\"\nforget_idle = \"2h\"").expect("valid"),
    );
    assert_eq!(set.limits.max_fields, 3800);
    assert_eq!(set.limits.max_bytes, 1 << 20);
    assert_eq!(set.forget_idle, Duration::from_secs(7200));
    for bad in [
        "max_fields = 0",
        "max_fields = 3801",
        "max_entry_size = \"0\"",
        "forget_idle = \"1s\"",
    ] {
        assert!(load(bad).is_err(), "{bad} must be refused");
    }
}

#[test]
fn entry_formats_are_validated_and_taken_from_the_broker_unless_set() {
    use bosun::config::{BrokerConfig, ConsumerKind, EntryFormat, EntryLayout};
    let load = |broker: &str, consumer: &str| {
        let text = format!(
            "[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n{broker}\n[handlers.n]\nkind = \"noop\"\n[consumers.c]\nsource = \"cache\"\nhandler = \"n\"\nstream = \"s\"\n{consumer}"
        );
        bosun::config::load_str(
            &text,
            "test.toml",
            &bosun::handler::HandlerKinds::builtin(),
            &bosun::config::Env::from_pairs(std::iter::empty::<(&str, &str)>()),
        )
    };
    let formats = |broker: &str, consumer: &str| {
        let config = load(broker, consumer).expect("valid");
        let written = match config.brokers.get("cache") {
            Some(BrokerConfig::Redis(b)) => b.format.clone(),
            other => panic!("not a redis broker: {other:?}"),
        };
        let read = match config.consumers.get("c").map(|c| &c.kind) {
            Some(ConsumerKind::Redis(r)) => (*r.format).clone(),
            other => panic!("not a redis consumer: {other:?}"),
        };
        (written, read)
    };
    assert_eq!(
        formats("", ""),
        (EntryFormat::default(), EntryFormat::default())
    );
    let flat = EntryFormat::of(EntryLayout::Fields);
    assert_eq!(
        formats("entry_format = \"fields\"", ""),
        (flat.clone(), flat.clone()),
        "a consumer reads its broker's format"
    );
    let (_, read) = formats("entry_format = \"fields\"", "entry_format = \"dapr\"");
    assert_eq!(read.payload_field, "data");
    let (_, read) = formats(
        "",
        "entry_format = \"redpanda\"\npayload_field = \"content\"",
    );
    assert_eq!(read.payload_field, "content");
    let (_, read) = formats("", "entry_format = \"watermill\"");
    assert_eq!(read.id_field, "_watermill_message_uuid");
    let (_, read) = formats("", "id_field = \"event_id\"");
    assert_eq!(
        (read.layout, read.id_field.as_str()),
        (EntryLayout::Payload, "event_id")
    );
    for (broker, consumer) in [
        ("entry_format = \"flat\"", ""),
        ("", "entry_format = \"json\""),
        ("", "entry_format = \"fields\"\npayload_field = \"body\""),
        ("", "payload_field = \"bosun-body\""),
        ("", "id_field = \"\""),
        ("", "payload_field = \"x\"\nid_field = \"x\""),
    ] {
        assert!(
            load(broker, consumer).is_err(),
            "{broker:?} / {consumer:?} must be refused"
        );
    }
    // Names of the fields that carry the message itself, refused with the key named.
    for (consumer, key) in [
        ("payload_field = \"message_id\"", "payload_field"),
        ("payload_field = \"correlation_id\"", "payload_field"),
        ("id_field = \"correlation_id\"", "id_field"),
        ("payload_field = \"content_type\"", "payload_field"),
        ("id_field = \"content_type\"", "id_field"),
        ("payload_field = \"timestamp_ms\"", "payload_field"),
        ("id_field = \"timestamp_ms\"", "id_field"),
        (
            "entry_format = \"fields\"\nid_field = \"correlation_id\"",
            "id_field",
        ),
        (
            "entry_format = \"watermill\"\npayload_field = \"metadata\"",
            "payload_field",
        ),
        (
            "entry_format = \"watermill\"\nid_field = \"metadata\"",
            "id_field",
        ),
        ("entry_format = \"dapr\"\nid_field = \"data\"", "id_field"),
    ] {
        let error = format!("{:#}", load("", consumer).expect_err(consumer));
        assert!(
            error.contains(&format!("consumers.c.{key}")),
            "{consumer:?}: {error}"
        );
    }
    let (_, read) = formats(
        "",
        "entry_format = \"redpanda\"\npayload_field = \"metadata\"",
    );
    assert_eq!(
        read.payload_field, "metadata",
        "only Watermill reads `metadata`"
    );
}

#[test]
fn a_dead_letter_processor_reads_the_format_of_the_consumers_writing_its_stream() {
    use bosun::config::{DeadLetterSource, EntryFormat, EntryLayout};
    let read = |consumer: &str, processor: &str| {
        let text = format!(
            "[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n[handlers.n]\nkind = \"noop\"\n[consumers.c]\nsource = \"cache\"\nhandler = \"n\"\nstream = \"s\"\n{consumer}\n[dead_letters.dl]\nsource = \"cache\"\nstream = \"s:dlq\"\ndefault_action = \"drop\"\n{processor}"
        );
        let config = bosun::config::load_str(
            &text,
            "test.toml",
            &bosun::handler::HandlerKinds::builtin(),
            &bosun::config::Env::from_pairs(std::iter::empty::<(&str, &str)>()),
        )
        .expect("valid");
        match config.dead_letters.get("dl").map(|dl| &dl.from) {
            Some(DeadLetterSource::Stream { format, .. }) => format.clone(),
            other => panic!("not a redis processor: {other:?}"),
        }
    };
    assert_eq!(
        read("entry_format = \"fields\"", ""),
        EntryFormat::of(EntryLayout::Fields),
        "the processor reads dead-letter copies in the format they were written in"
    );
    assert_eq!(
        read("entry_format = \"fields\"", "entry_format = \"dapr\""),
        EntryFormat::of(EntryLayout::Dapr),
        "a format of its own wins"
    );
    assert_eq!(read("", ""), EntryFormat::default());
}

#[tokio::test(flavor = "multi_thread")]
async fn consumer_trims_its_stream_and_dead_letter_stream_when_asked() {
    let mut conn = redis().await;
    let stream = unique("trim_consumer");
    let dlq = format!("{stream}:dlq");
    let handler = Recorder::new(Duration::ZERO, |m| {
        if m.message_id
            .as_deref()
            .is_some_and(|id| id.ends_with('7') || id.ends_with('8') || id.ends_with('9'))
        {
            Outcome::DeadLetter {
                reason: "unwanted".into(),
                kind: bosun::handler::FailureKind::Permanent,
            }
        } else {
            Outcome::Ack
        }
    });
    let text = config(
        "cache",
        &[(
            "trimmed",
            format!(
                "stream = \"{stream}\"\ngroup = \"g\"\nblock = \"200ms\"\ntrim = {{ maxlen = 3, interval = \"100ms\" }}\ndead_letter = {{ trim = {{ maxlen = 1, interval = \"100ms\" }} }}\n"
            ),
        )],
    );
    let running = start(&text, handler.clone()).await;
    xadd_many(&mut conn, &stream, 10).await;
    let trimmed = support::wait_for_async(WAIT, || {
        let mut conn = conn.clone();
        let (stream, dlq) = (stream.clone(), dlq.clone());
        async move {
            let lengths = (xlen(&mut conn, &stream).await, xlen(&mut conn, &dlq).await);
            (lengths == (3, 1)).then_some(lengths)
        }
    })
    .await;
    let lengths = (xlen(&mut conn, &stream).await, xlen(&mut conn, &dlq).await);
    assert!(
        trimmed.is_some(),
        "stream and dead-letter stream lengths: {lengths:?}"
    );
    // Every entry was handled before it was trimmed.
    let mut ids = handler.ids();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 10, "{ids:?}");
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let _: () = conn
        .del(&[&stream, &dlq, &format!("{stream}:retry")])
        .await
        .expect("DEL");
}

/// `fields` as a list of owned pairs, to compare with what XRANGE returns.
fn owned(fields: &[(&str, &[u8])]) -> Fields {
    fields
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_entries_of_a_plain_xadd_reach_the_handler_as_their_dict() {
    let stream = unique("rs_flat");
    let name = unique("c_flat");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(
            &unique("b"),
            &[(&name, consumer(&stream, &name, "entry_format = \"fields\""))],
        ),
        handler.clone(),
    )
    .await;
    // What redis-py's `xadd(stream, dict, maxlen=10000, approximate=True)` sends: flat
    // fields, no `payload`, no id.
    let mut sent = BTreeMap::new();
    for i in 0..20 {
        let user_id = (123 + i).to_string();
        let timestamp = format!("2026-11-29T13:{i:02}:00.123456+00:00");
        let id: String = redis::cmd("XADD")
            .arg(&stream)
            .arg("MAXLEN")
            .arg("~")
            .arg(10_000)
            .arg("*")
            .arg("event_type")
            .arg("user.created")
            .arg("user_id")
            .arg(&user_id)
            .arg("timestamp")
            .arg(&timestamp)
            .query_async(&mut conn)
            .await
            .expect("XADD");
        sent.insert(id, (user_id, timestamp));
    }
    wait_until("all 20 entries are handled and acknowledged", async || {
        handler.seen().len() >= 20 && pending_count(&mut conn, &stream, "g").await == 0
    })
    .await;
    let seen = handler.seen();
    assert_eq!(seen.len(), 20, "each entry handled once");
    for Seen { message, .. } in &seen {
        let id = message.message_id.clone().expect("an id");
        let (user_id, timestamp) = sent.get(&id).expect("the entry id stands in for the id");
        assert_eq!(
            std::str::from_utf8(&message.body).expect("UTF-8"),
            format!(
                r#"{{"event_type":"user.created","user_id":"{user_id}","timestamp":"{timestamp}"}}"#
            ),
            "the body is the entry's dict, keys in their order"
        );
        assert_eq!(message.content_type.as_deref(), Some("application/json"));
    }
    assert!(range(&mut conn, &format!("{stream}:dlq")).await.is_empty());
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flat_entry_copies_and_replays_keep_the_producers_fields_byte_for_byte() {
    let stream = unique("rs_flatcopy");
    let name = unique("c_flatcopy");
    let dlq = format!("{stream}:dlq");
    let mut conn = redis().await;
    // Fails until a replay comes back, then succeeds.
    let handler = Recorder::new(Duration::ZERO, |m| {
        if m.headers.contains_key("bosun-replay-count") {
            Outcome::Ack
        } else {
            Outcome::retry("boom")
        }
    });
    let retry = "entry_format = \"fields\"\nretry = { max_attempts = 2, backoff = \"fixed\", initial = \"200ms\", jitter = 0.0 }";
    let broker = unique("b");
    let mut file = config(&broker, &[(&name, consumer(&stream, &name, retry))]);
    // Replays need an archive (for replays past `max_replays`); this one stays empty.
    file.push_str(&format!(
        r#"
[databases.main]
url = "{PG_URL}"
max_connections = 2

[dead_letters.dl]
source = "{broker}"
stream = "{dlq}"
entry_format = "fields"
archive = "main"
table = "{table}"
migrate = true

[[dead_letters.dl.rules]]
when = {{ error = "^boom" }}
action = "replay"
"#,
        table = unique("rs_flat_archive"),
    ));
    let running = start(&file, handler.clone()).await;
    let original: &[(&str, &[u8])] = &[
        ("event_type", b"user.created"),
        ("user_id", b"123"),
        ("avatar", &[0xff, 0xd8, 0xff, 0xe0]),
        ("timestamp", b"2026-11-29T13:00:00+00:00"),
    ];
    let id = xadd(&mut conn, &stream, original).await;
    wait_until("the replay is handled", async || {
        handler
            .seen()
            .iter()
            .any(|s| s.message.headers.contains_key("bosun-replay-count"))
    })
    .await;

    // The handler saw the same dict, the non-UTF-8 value under the base64 marker, and the
    // same id on every attempt and on the replay.
    let seen = handler.seen();
    assert_eq!(seen.len(), 3, "attempt 1, attempt 2, the replay");
    for s in &seen {
        assert_eq!(
            std::str::from_utf8(&s.message.body).expect("UTF-8"),
            r#"{"event_type":"user.created","user_id":"123","avatar":{"$base64":"/9j/4A=="},"timestamp":"2026-11-29T13:00:00+00:00"}"#
        );
        assert_eq!(s.message.message_id.as_deref(), Some(id.as_str()));
    }
    assert_eq!(
        seen.iter().map(|s| s.message.attempt).collect::<Vec<_>>(),
        vec![1, 2, 1]
    );

    // The stream holds the original, the retry copy and the replay; the dead-letter stream
    // the dead-letter copy. Each starts with the producer's fields, byte for byte, and adds
    // only bosun's own.
    let expected = owned(original);
    let entries = range(&mut conn, &stream).await;
    assert_eq!(entries.len(), 3);
    let dead = range(&mut conn, &dlq).await;
    assert_eq!(dead.len(), 1);
    for (_, fields) in entries.iter().chain(&dead) {
        assert_eq!(fields[..expected.len()], expected[..]);
        assert!(
            fields[expected.len()..]
                .iter()
                .all(|(k, _)| k == b"message_id" || k.starts_with(b"bosun-")),
            "{fields:?}"
        );
    }
    assert_eq!(text(&dead[0].1, "bosun-error-kind"), "exhausted");
    let replay = &entries[2].1;
    assert_eq!(
        replay[expected.len()..],
        owned(&[("message_id", id.as_bytes()), ("bosun-replay-count", b"1")])[..],
        "a replay is the producer's entry plus its id and the replay count"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dapr_redpanda_and_watermill_entries_are_read_in_their_shape() {
    let streams = [
        unique("rs_dapr"),
        unique("rs_redpanda"),
        unique("rs_watermill"),
    ];
    let [dapr, redpanda, watermill] = &streams;
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let consumers: Vec<(String, String)> = [
        (dapr, "dapr"),
        (redpanda, "redpanda"),
        (watermill, "watermill"),
    ]
    .into_iter()
    .map(|(stream, format)| {
        let name = unique(&format!("c_{format}"));
        let body = consumer(stream, &name, &format!("entry_format = \"{format}\""));
        (name, body)
    })
    .collect();
    let consumers: Vec<(&str, String)> = consumers
        .iter()
        .map(|(n, b)| (n.as_str(), b.clone()))
        .collect();
    let running = start(&config(&unique("b"), &consumers), handler.clone()).await;

    // Dapr: the body is `data`, JSON (a CloudEvent); one that is not JSON is invalid.
    let cloud_event = br#"{"specversion":"1.0","id":"e1","type":"order.created","data":{"id":7}}"#;
    let dapr_id = xadd(&mut conn, dapr, &[("data", cloud_event)]).await;
    xadd(&mut conn, dapr, &[("data", b"not json")]).await;
    // Redpanda Connect: the body is `body`, metadata fields are headers.
    xadd(
        &mut conn,
        redpanda,
        &[("body", b"hello"), ("kafka_key", b"k1")],
    )
    .await;
    // Watermill: id, payload and metadata as its marshaller writes them (MessagePack), and
    // metadata as a JSON object.
    let mut metadata = vec![0x82];
    for s in ["name", "order", "trace", "t1"] {
        metadata.push(0xa0 | s.len() as u8);
        metadata.extend_from_slice(s.as_bytes());
    }
    xadd(
        &mut conn,
        watermill,
        &[
            ("_watermill_message_uuid", b"uuid-1"),
            ("metadata", &metadata),
            ("payload", b"{\"n\":1}"),
        ],
    )
    .await;
    xadd(
        &mut conn,
        watermill,
        &[
            ("_watermill_message_uuid", b"uuid-2"),
            ("metadata", br#"{"name":"refund"}"#),
            ("payload", b"{\"n\":2}"),
        ],
    )
    .await;
    let dapr_dlq = format!("{dapr}:dlq");
    wait_until(
        "four entries are handled and one dead-lettered",
        async || handler.seen().len() >= 4 && range(&mut conn, &dapr_dlq).await.len() == 1,
    )
    .await;
    let seen: Vec<Message> = handler.seen().into_iter().map(|s| s.message).collect();
    assert_eq!(seen.len(), 4);
    let on = |stream: &str| -> Vec<&Message> {
        seen.iter().filter(|m| m.source.queue == stream).collect()
    };
    let d = on(dapr);
    assert_eq!(d.len(), 1);
    assert_eq!(d[0].body.as_ref(), &cloud_event[..]);
    assert_eq!(d[0].message_id.as_deref(), Some(dapr_id.as_str()));
    assert_eq!(d[0].content_type.as_deref(), Some("application/json"));
    let r = on(redpanda);
    assert_eq!(r[0].body.as_ref(), b"hello");
    assert_eq!(
        r[0].headers.get("kafka_key"),
        Some(&HeaderValue::String("k1".into()))
    );
    let mut w = on(watermill);
    w.sort_by_key(|m| m.message_id.clone());
    assert_eq!(w.len(), 2);
    assert_eq!(w[0].message_id.as_deref(), Some("uuid-1"));
    assert_eq!(w[0].body.as_ref(), b"{\"n\":1}");
    assert_eq!(
        w[0].headers.get("name"),
        Some(&HeaderValue::String("order".into()))
    );
    assert_eq!(
        w[0].headers.get("trace"),
        Some(&HeaderValue::String("t1".into()))
    );
    assert!(!w[0].headers.contains_key("metadata"));
    assert_eq!(w[1].message_id.as_deref(), Some("uuid-2"));
    assert_eq!(
        w[1].headers.get("name"),
        Some(&HeaderValue::String("refund".into()))
    );

    let dead = range(&mut conn, &dapr_dlq).await.remove(0).1;
    assert_eq!(text(&dead, "bosun-error-kind"), "invalid");
    assert!(
        text(&dead, "bosun-error").contains("field `data` is not JSON"),
        "{}",
        text(&dead, "bosun-error")
    );
    assert_eq!(field(&dead, "data"), Some(&b"not json"[..]));
    assert_eq!(running.stop().await, ExitStatus::Clean);
    for stream in &streams {
        cleanup(&mut conn, stream).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watermill_metadata_over_max_fields_is_dead_lettered_alone_as_invalid() {
    let stream = unique("rs_wm_bound");
    let name = unique("c_wm_bound");
    let dlq = format!("{stream}:dlq");
    let mut conn = redis().await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = start(
        &config(
            &unique("b"),
            &[(
                &name,
                consumer(
                    &stream,
                    &name,
                    "entry_format = \"watermill\"\nmax_fields = 4",
                ),
            )],
        ),
        handler.clone(),
    )
    .await;
    // Real maps of empty strings: one over the limit of 4, one at it.
    let map = |n: u8| {
        let mut raw = vec![0x80 | n];
        raw.extend(std::iter::repeat_n([0xa0, 0xa0], usize::from(n)).flatten());
        raw
    };
    let mut four = vec![0x84];
    for key in [b'a', b'b', b'c', b'd'] {
        four.extend_from_slice(&[0xa1, key, 0xa0]);
    }
    let entries: [(&str, Vec<u8>); 4] = [
        // A MessagePack map that declares 2^31 - 1 pairs in a small entry.
        ("declared", vec![0xdf, 0x7f, 0xff, 0xff, 0xff]),
        ("five", map(5)),
        (
            "json-five",
            br#"{"a":"","b":"","c":"","d":"","e":""}"#.to_vec(),
        ),
        ("four", four),
    ];
    for (id, metadata) in &entries {
        xadd(
            &mut conn,
            &stream,
            &[
                ("_watermill_message_uuid", id.as_bytes()),
                ("metadata", metadata),
                ("payload", b"{}"),
            ],
        )
        .await;
    }
    wait_until("one entry handled and three dead-lettered", async || {
        !handler.seen().is_empty() && range(&mut conn, &dlq).await.len() == 3
    })
    .await;
    let seen = handler.seen();
    assert_eq!(seen.len(), 1, "only the entry within the bound is handled");
    assert_eq!(seen[0].message.message_id.as_deref(), Some("four"));
    assert_eq!(seen[0].message.headers.len(), 4);
    let dead = range(&mut conn, &dlq).await;
    let mut ids: Vec<String> = dead
        .iter()
        .map(|(_, f)| text(f, "_watermill_message_uuid"))
        .collect();
    ids.sort();
    assert_eq!(ids, ["declared", "five", "json-five"]);
    for (_, fields) in &dead {
        assert_eq!(text(fields, "bosun-error-kind"), "invalid");
        let error = text(fields, "bosun-error");
        assert!(
            error.contains("field `metadata` holds")
                && error.contains("over the limit of 4 (max_fields)"),
            "{error}"
        );
    }
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &stream).await;
}
