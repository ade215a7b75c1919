//! The Redis Streams consumer against a real Redis, run in-process through `bosun::Runtime`
//! (and through the real binary for SIGTERM).

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::handler::HeaderValue;
use bosun::supervisor::ExitStatus;
use bosun::{Handler, Message, Outcome};
use redis::AsyncCommands;
use support::{InProcess, REDIS_URL, unique};

type Fields = Vec<(Vec<u8>, Vec<u8>)>;
const WAIT: Duration = Duration::from_secs(20);

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

async fn xadd(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(&str, &[u8])],
) -> String {
    let mut cmd = redis::cmd("XADD");
    cmd.arg(stream).arg("*");
    for (k, v) in fields {
        cmd.arg(*k).arg(*v);
    }
    cmd.query_async(conn).await.expect("XADD")
}

/// Group `g` on `stream`, from the start, creating the stream.
async fn create_group(conn: &mut redis::aio::MultiplexedConnection, stream: &str) {
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await
        .expect("XGROUP");
}

async fn xadd_many(conn: &mut redis::aio::MultiplexedConnection, stream: &str, n: usize) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(format!("body-{i}"))
            .arg("message_id")
            .arg(format!("m-{i}"))
            .ignore();
    }
    let () = pipe.query_async(conn).await.expect("XADD batch");
}

async fn range(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, Fields)> {
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE")
}

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
    support::metric_value(&bosun::telemetry::metrics_handle().render(), name, labels).unwrap_or(0.0)
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

async fn xlen(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> u64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}

async fn trim_ops() -> bosun::redis_streams::Ops {
    let text = format!("[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n");
    let config = bosun::config::load_str(
        &text,
        "trim.toml",
        &bosun::handler::HandlerKinds::builtin(),
        &bosun::config::Env::default(),
    )
    .expect("valid config");
    let Some(bosun::config::BrokerConfig::Redis(broker)) = config.brokers.get("cache") else {
        panic!("a redis broker");
    };
    bosun::redis_streams::Ops::connect(broker, "trim-test")
        .await
        .expect("connect to redis")
}

#[tokio::test]
async fn trim_removes_only_entries_every_group_has_acknowledged() {
    use bosun::config::TrimLimit;
    use bosun::redis_streams::trim::trim_once;
    let mut conn = redis().await;
    let ops = trim_ops().await;
    let stream = unique("trim_groups");
    xadd_many(&mut conn, &stream, 10).await;
    create_group(&mut conn, &stream).await;
    let read: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("c")
        .arg("COUNT")
        .arg(6)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let ids: Vec<String> = read.keys[0].ids.iter().map(|e| e.id.clone()).collect();
    assert_eq!(ids.len(), 6);
    let acked: i64 = conn.xack(&stream, "g", &ids[..3]).await.expect("XACK");
    assert_eq!(acked, 3);

    // maxlen 1 asks for 9 to go, but 3 pending and 4 never delivered must stay.
    let trimmed = trim_once(&ops, &stream, TrimLimit::MaxLen(1), None)
        .await
        .expect("trim");
    assert_eq!(trimmed, 3);
    assert_eq!(xlen(&mut conn, &stream).await, 7);
    let first = range(&mut conn, &stream).await;
    assert_eq!(first[0].0, ids[3], "the oldest pending entry is kept");

    // A group that has read nothing keeps everything.
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("late")
        .arg("0")
        .query_async(&mut conn)
        .await
        .expect("XGROUP");
    let acked: i64 = conn.xack(&stream, "g", &ids[3..]).await.expect("XACK");
    assert_eq!(acked, 3);
    assert_eq!(
        trim_once(&ops, &stream, TrimLimit::MaxLen(1), None)
            .await
            .expect("trim"),
        0
    );
    assert_eq!(xlen(&mut conn, &stream).await, 7);

    // Without groups (a dead-letter stream nobody reads) the limit alone decides.
    let bare = unique("trim_bare");
    xadd_many(&mut conn, &bare, 10).await;
    assert_eq!(
        trim_once(&ops, &bare, TrimLimit::MaxLen(4), None)
            .await
            .expect("trim"),
        6
    );
    assert_eq!(xlen(&mut conn, &bare).await, 4);

    // max_age goes by the time in the entry id.
    let aged = unique("trim_aged");
    for id in ["1000-1", "1000-2"] {
        let _: String = redis::cmd("XADD")
            .arg(&aged)
            .arg(id)
            .arg("payload")
            .arg("old")
            .query_async(&mut conn)
            .await
            .expect("XADD");
    }
    xadd_many(&mut conn, &aged, 3).await;
    assert_eq!(
        trim_once(
            &ops,
            &aged,
            TrimLimit::MaxAge(Duration::from_secs(3600)),
            None
        )
        .await
        .expect("trim"),
        2
    );
    assert_eq!(xlen(&mut conn, &aged).await, 3);
    // A consumer's stream is left alone while its group does not exist.
    let ungrouped = unique("trim_ungrouped");
    xadd_many(&mut conn, &ungrouped, 5).await;
    assert_eq!(
        trim_once(&ops, &ungrouped, TrimLimit::MaxLen(1), Some("g"))
            .await
            .expect("trim"),
        0
    );
    assert_eq!(xlen(&mut conn, &ungrouped).await, 5);
    let _: () = conn.del(&ungrouped).await.expect("DEL");
    // An empty or missing stream is nothing to do.
    assert_eq!(
        trim_once(&ops, &unique("trim_none"), TrimLimit::MaxLen(1), None)
            .await
            .expect("trim"),
        0
    );
    let _: () = conn.del(&[&stream, &bare, &aged]).await.expect("DEL");
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
