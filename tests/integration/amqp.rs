//! The amqp consumer against a real RabbitMQ: every outcome, concurrency, connection loss,
//! shutdown and topology conflicts.
//!
//! Most tests run the runtime in this process with a scripted handler, so they can see what
//! the handler saw; the shutdown test runs the real binary.

use crate::support;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bosun::handler::HeaderValue;
use bosun::supervisor::{ExitStatus, SignalKind};
use bosun::{Handler, Message, Outcome, Runtime};
use lapin::BasicProperties;
use lapin::options::{
    BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions,
    QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use support::amqp::from_table;
use support::{ConfigFile, RABBIT_URL, free_port, http_get, metric_value, unique, wait_for_async};

const WAIT: Duration = Duration::from_secs(30);

/// A handler whose answer is scripted, and which records every message it saw.
struct Scripted {
    seen: Arc<Mutex<Vec<Message>>>,
    in_flight: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
    delay: Duration,
    answer: fn(&Message) -> Outcome,
}

#[async_trait]
impl Handler for Scripted {
    async fn handle(&self, message: &Message) -> Outcome {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        self.seen
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(message.clone());
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        (self.answer)(message)
    }
}

/// A runtime running in this process.
struct Running {
    signals: tokio::sync::mpsc::UnboundedSender<SignalKind>,
    task: tokio::task::JoinHandle<anyhow::Result<ExitStatus>>,
    http: String,
    seen: Arc<Mutex<Vec<Message>>>,
    peak: Arc<AtomicUsize>,
    _config: ConfigFile,
}

impl Running {
    fn seen(&self) -> Vec<Message> {
        self.seen.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn metric(&self, name: &str, labels: &[&str]) -> Option<f64> {
        let (_, body) = http_get(&format!("{}/metrics", self.http))?;
        metric_value(&body, name, labels)
    }

    fn readyz(&self) -> Option<(u16, String)> {
        http_get(&format!("{}/readyz", self.http))
    }

    async fn stop(self) -> ExitStatus {
        let _ = self.signals.send(SignalKind::Terminate);
        match tokio::time::timeout(WAIT, self.task).await {
            Ok(Ok(Ok(status))) => status,
            other => panic!("runtime did not stop cleanly: {other:?}"),
        }
    }
}

fn config(queue: &str, consumer: &str, extra: &str) -> (String, u16) {
    let port = free_port();
    let text = format!(
        r#"
[service]
name = "{consumer}"
shutdown_timeout = "10s"
log_format = "pretty"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[handlers.scripted]
kind = "scripted"

[consumers.{consumer}]
source = "rabbit"
handler = "scripted"
queue = "{queue}"
{extra}
"#
    );
    (text, port)
}

/// The attempts at which the handler saw message `id`, in order.
fn attempts(running: &Running, id: &str) -> Vec<u32> {
    running
        .seen()
        .iter()
        .filter(|m| m.message_id.as_deref() == Some(id))
        .map(|m| m.attempt)
        .collect()
}

/// Whether `consumer` counts at least `minimum` refused copies within `WAIT`.
async fn refusals_counted(running: &Running, consumer: &str, minimum: f64) -> bool {
    let label = format!("consumer=\"{consumer}\"");
    wait_for_async(WAIT, || async {
        running
            .metric(
                "bosun_amqp_copy_problems_total",
                &[&label, "problem=\"refused\""],
            )
            .filter(|v| *v >= minimum)
    })
    .await
    .is_some()
}

async fn start(text: &str, port: u16, delay: Duration, answer: fn(&Message) -> Outcome) -> Running {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let in_flight = Arc::new(AtomicUsize::new(0));
    let peak = Arc::new(AtomicUsize::new(0));
    let handler: Arc<dyn Handler> = Arc::new(Scripted {
        seen: seen.clone(),
        in_flight,
        peak: peak.clone(),
        delay,
        answer,
    });
    let runtime = Runtime::builder()
        .handler_fn("scripted", move |_, _| Ok(handler.clone()))
        .build();
    let file = ConfigFile::new(text);
    let config = runtime
        .load(&file.path)
        .unwrap_or_else(|e| panic!("config: {e}"));
    let (signals, rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = tokio_stream_from(rx);
    let task = tokio::spawn(runtime.run(config, None, stream));
    let http = format!("http://127.0.0.1:{port}");
    Running {
        signals,
        task,
        http,
        seen,
        peak,
        _config: file,
    }
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<SignalKind>,
) -> impl futures::Stream<Item = SignalKind> + Unpin + Send {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
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

/// Publishes `bodies` to `queue` (default exchange) with confirms; returns their message ids.
async fn publish(
    ch: &lapin::Channel,
    queue: &str,
    bodies: impl IntoIterator<Item = Vec<u8>>,
    headers: &[(&str, &str)],
) -> Vec<String> {
    let mut ids = Vec::new();
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(
            (*k).into(),
            AMQPValue::LongString(LongString::from(v.as_bytes().to_vec())),
        );
    }
    for body in bodies {
        let id = uuid::Uuid::now_v7().to_string();
        let props = BasicProperties::default()
            .with_message_id(id.as_str().into())
            .with_correlation_id("corr-1".into())
            .with_content_type("application/octet-stream".into())
            .with_timestamp(1_700_000_000)
            .with_delivery_mode(2)
            .with_headers(table.clone());
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                &body,
                props,
            )
            .await
            .expect("publish");
        ids.push((id, confirm));
    }
    let mut out = Vec::new();
    for (id, confirm) in ids {
        let c = confirm.await.expect("confirm");
        assert!(
            c.is_ack() && c.take_message().is_none(),
            "test message not routed"
        );
        out.push(id);
    }
    out
}

async fn depth(ch: &lapin::Channel, queue: &str) -> Option<u32> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .ok()
    .map(|q| q.message_count())
}

async fn wait_until(mut check: impl FnMut() -> bool) -> bool {
    wait_for_async(WAIT, || {
        let ok = check();
        async move { ok.then_some(()) }
    })
    .await
    .is_some()
}

async fn get_all(ch: &lapin::Channel, queue: &str) -> Vec<lapin::message::Delivery> {
    let mut out = Vec::new();
    while let Ok(Some(m)) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
    {
        out.push(m.delivery);
    }
    out
}

/// `queue` and the dead-letter and retry queues of the default retry tiers.
fn default_queues(queue: &str) -> Vec<String> {
    let mut queues = vec![queue.to_owned(), format!("{queue}.dlq")];
    queues.extend(["1s", "2s", "4s", "8s"].map(|tier| format!("{queue}.retry.{tier}")));
    queues
}

async fn cleanup(ch: &lapin::Channel, queues: &[String]) {
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
}

fn header(delivery: &lapin::message::Delivery, key: &str) -> Option<HeaderValue> {
    from_table(delivery.properties.headers().as_ref()).remove(key)
}

/// Waits until the consumer is consuming (its queue exists and `/readyz` is 200).
async fn ready(running: &Running) {
    assert!(
        wait_for_async(WAIT, || async {
            running.readyz().filter(|(s, _)| *s == 200)
        })
        .await
        .is_some(),
        "never ready: {:?}",
        running.readyz()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_leave_the_queue_and_are_counted() {
    let (queue, consumer) = (unique("ack"), unique("c_ack"));
    let (text, port) = config(&queue, &consumer, "prefetch = 10");
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let ids = publish(&ch, &queue, (0..50u8).map(|i| vec![i]), &[]).await;
    assert!(
        wait_until(|| running.seen().len() >= 50).await,
        "handled {}",
        running.seen().len()
    );
    let label = format!("consumer=\"{consumer}\"");
    assert!(
        wait_for_async(WAIT, || async {
            running
                .metric("bosun_messages_settled_total", &[&label, "outcome=\"ack\""])
                .filter(|v| *v >= 50.0)
        })
        .await
        .is_some()
    );
    assert_eq!(
        running.metric("bosun_messages_received_total", &[&label]),
        Some(50.0)
    );
    assert_eq!(
        running.metric(
            "bosun_handler_duration_seconds_count",
            &[&label, "handler=\"scripted\"", "outcome=\"ack\""]
        ),
        Some(50.0)
    );
    let seen: BTreeSet<String> = running
        .seen()
        .iter()
        .filter_map(|m| m.message_id.clone())
        .collect();
    assert_eq!(seen, ids.iter().cloned().collect::<BTreeSet<String>>());
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(depth(&ch, &queue).await, Some(0));
    cleanup(&ch, &default_queues(&queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_message_comes_back_through_its_tier_with_attempt_raised_and_same_id() {
    let (queue, consumer) = (unique("retry"), unique("c_retry"));
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 3, tiers = [\"200ms\", \"500ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |m| {
        if m.attempt == 1 {
            Outcome::retry("try later")
        } else {
            Outcome::Ack
        }
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let ids = publish(&ch, &queue, [b"again".to_vec()], &[("tenant", "acme")]).await;
    assert!(wait_until(|| running.seen().len() >= 2).await);
    let seen = running.seen();
    assert_eq!(seen[0].attempt, 1);
    assert_eq!(seen[1].attempt, 2);
    assert_eq!(seen[1].message_id.as_deref(), Some(ids[0].as_str()));
    assert_eq!(seen[1].correlation_id.as_deref(), Some("corr-1"));
    assert_eq!(
        seen[1].content_type.as_deref(),
        Some("application/octet-stream")
    );
    assert_eq!(seen[1].body.as_ref(), b"again");
    assert_eq!(
        seen[1].headers.get("tenant"),
        Some(&HeaderValue::String("acme".into()))
    );
    assert_eq!(
        seen[1].headers.get("bosun-error"),
        Some(&HeaderValue::String("try later".into()))
    );
    assert_eq!(
        seen[1].headers.get("bosun-error-kind"),
        Some(&HeaderValue::String("transient".into()))
    );
    // It came back to the consumed queue by way of the first tier's dead-lettering.
    assert_eq!(seen[1].source.routing_key.as_deref(), Some(queue.as_str()));
    let label = format!("consumer=\"{consumer}\"");
    assert_eq!(
        running.metric(
            "bosun_messages_settled_total",
            &[&label, "outcome=\"retry\""]
        ),
        Some(1.0)
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(depth(&ch, &format!("{queue}.retry.200ms")).await, Some(0));
    assert_eq!(depth(&ch, &format!("{queue}.dlq")).await, Some(0));
    cleanup(
        &ch,
        &[
            queue.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.retry.200ms"),
            format!("{queue}.retry.500ms"),
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_message_lands_in_the_dlq_with_every_header() {
    let (queue, consumer) = (unique("exhaust"), unique("c_exhaust"));
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 3, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |_| {
        Outcome::retry("still broken")
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let ids = publish(&ch, &queue, [b"doomed".to_vec()], &[("tenant", "acme")]).await;
    let dlq = format!("{queue}.dlq");
    assert!(
        wait_for_async(WAIT, || async {
            depth(&ch, &dlq).await.filter(|d| *d == 1)
        })
        .await
        .is_some()
    );
    let attempts: Vec<u32> = running.seen().iter().map(|m| m.attempt).collect();
    assert_eq!(attempts, [1, 2, 3]);
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.data, b"doomed");
    let p = &d.properties;
    assert_eq!(
        p.message_id().as_ref().map(|s| s.to_string()),
        Some(ids[0].clone())
    );
    assert_eq!(
        p.correlation_id().as_ref().map(|s| s.to_string()),
        Some("corr-1".into())
    );
    assert_eq!(
        p.content_type().as_ref().map(|s| s.to_string()),
        Some("application/octet-stream".into())
    );
    assert_eq!(*p.timestamp(), Some(1_700_000_000));
    assert_eq!(*p.delivery_mode(), Some(2));
    let text = |k: &str| header(d, k).and_then(|v| v.as_text());
    assert_eq!(text("tenant").as_deref(), Some("acme"));
    assert_eq!(header(d, "bosun-attempt"), Some(HeaderValue::Int(3)));
    assert_eq!(text("bosun-error-kind").as_deref(), Some("exhausted"));
    assert_eq!(text("bosun-error").as_deref(), Some("still broken"));
    assert_eq!(text("bosun-original-exchange").as_deref(), Some(""));
    assert_eq!(
        text("bosun-original-routing-key").as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(
        text("bosun-original-queue").as_deref(),
        Some(queue.as_str())
    );
    assert_eq!(text("bosun-consumer").as_deref(), Some(consumer.as_str()));
    assert!(text("bosun-host").is_some_and(|h| !h.is_empty()));
    let first = text("bosun-first-failure-at").expect("first failure time");
    let last = text("bosun-last-failure-at").expect("last failure time");
    assert!(
        chrono::DateTime::parse_from_rfc3339(&first).is_ok() && first < last,
        "{first} {last}"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &[queue.clone(), dlq, format!("{queue}.retry.200ms")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_skips_retries_and_drop_discards() {
    let (queue, consumer) = (unique("dead"), unique("c_dead"));
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 5, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |m| match m.body.as_ref() {
        b"bad" => Outcome::dead_letter("cannot parse"),
        _ => Outcome::Drop {
            reason: "not for us".into(),
        },
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    publish(
        &ch,
        &queue,
        [b"bad".to_vec(), b"skip".to_vec(), b"skip".to_vec()],
        &[],
    )
    .await;
    let label = format!("consumer=\"{consumer}\"");
    assert!(
        wait_for_async(WAIT, || async {
            running
                .metric(
                    "bosun_messages_settled_total",
                    &[&label, "outcome=\"drop\""],
                )
                .filter(|v| *v >= 2.0)
        })
        .await
        .is_some()
    );
    assert!(
        wait_for_async(WAIT, || async {
            running
                .metric(
                    "bosun_messages_settled_total",
                    &[&label, "outcome=\"dead_letter\""],
                )
                .filter(|v| *v >= 1.0)
        })
        .await
        .is_some()
    );
    let dlq = format!("{queue}.dlq");
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(
        dead.len(),
        1,
        "only the dead-lettered message is in the DLQ"
    );
    assert_eq!(dead[0].data, b"bad");
    assert_eq!(
        header(&dead[0], "bosun-error-kind")
            .and_then(|v| v.as_text())
            .as_deref(),
        Some("permanent")
    );
    assert_eq!(header(&dead[0], "bosun-attempt"), Some(HeaderValue::Int(1)));
    assert_eq!(running.seen().len(), 3, "no retry happened");
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(depth(&ch, &queue).await, Some(0));
    cleanup(&ch, &[queue.clone(), dlq, format!("{queue}.retry.200ms")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_limit_holds() {
    let (queue, consumer) = (unique("conc"), unique("c_conc"));
    let (text, port) = config(&queue, &consumer, "prefetch = 50\nconcurrency = 4");
    let running = start(&text, port, Duration::from_millis(30), |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    publish(&ch, &queue, (0..60u8).map(|i| vec![i]), &[]).await;
    assert!(wait_until(|| running.seen().len() >= 60).await);
    assert_eq!(
        running.peak.load(Ordering::SeqCst),
        4,
        "peak in flight must reach and never pass the limit"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &default_queues(&queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_utf8_body_reaches_the_handler_byte_for_byte() {
    let (queue, consumer) = (unique("bytes"), unique("c_bytes"));
    let (text, port) = config(&queue, &consumer, "");
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let body: Vec<u8> = vec![0xff, 0xfe, 0x00, 0x80, b'{', 0xc3, 0x28, 0x00, 0x7f];
    publish(&ch, &queue, [body.clone()], &[]).await;
    assert!(wait_until(|| !running.seen().is_empty()).await);
    assert_eq!(running.seen()[0].body.as_ref(), body.as_slice());
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &default_queues(&queue)).await;
}

/// The broker-side pid of the connection whose client-given name contains `name`.
fn connection_pid(name: &str) -> Option<String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["list_connections", "pid", "client_properties", "-q"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split('\t').next())
        .map(str::to_owned)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_connection_mid_flight_loses_nothing() {
    let (queue, consumer) = (unique("lost"), unique("c_lost"));
    let (text, port) = config(&queue, &consumer, "prefetch = 20\nconcurrency = 5");
    // Slow enough that the queue is still being worked through when rabbitmqctl gets to it.
    let running = start(&text, port, Duration::from_millis(15), |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let ids = publish(
        &ch,
        &queue,
        (0..2500u16).map(|i| i.to_be_bytes().to_vec()),
        &[],
    )
    .await;
    assert!(wait_until(|| running.seen().len() >= 20).await);
    // This consumer's own connection only: other tests' connections stay up.
    let pid = tokio::task::spawn_blocking({
        let name = consumer.clone();
        move || support::wait_for(WAIT, || connection_pid(&name))
    })
    .await
    .expect("lookup task")
    .expect("the consumer's connection is listed");
    let closed = std::process::Command::new("rabbitmqctl")
        .args(["close_connection", &pid, "test closes it mid-flight"])
        .output()
        .expect("rabbitmqctl");
    assert!(
        closed.status.success(),
        "{}",
        String::from_utf8_lossy(&closed.stderr)
    );
    assert!(
        wait_for_async(WAIT, || async {
            running
                .metric("bosun_broker_reconnects_total", &["broker=\"rabbit\""])
                .filter(|v| *v >= 1.0)
        })
        .await
        .is_some(),
        "no reconnect"
    );
    let all: BTreeSet<String> = ids.iter().cloned().collect();
    let handled = || {
        running
            .seen()
            .iter()
            .filter_map(|m| m.message_id.clone())
            .collect::<BTreeSet<String>>()
    };
    assert!(
        wait_until(|| handled().is_superset(&all)).await,
        "missing {:?}",
        all.difference(&handled()).count()
    );
    assert!(
        running.seen().iter().any(|m| m.redelivered),
        "some deliveries in flight at the close came back redelivered"
    );
    assert!(
        wait_for_async(WAIT, || async {
            depth(&ch, &queue).await.filter(|d| *d == 0)
        })
        .await
        .is_some()
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &default_queues(&queue)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn precondition_failed_is_named_and_isolated() {
    let (bad_queue, good_queue) = (unique("clash"), unique("fine"));
    let (bad, good) = (unique("c_clash"), unique("c_fine"));
    let (_c, ch) = rabbit().await;
    // Someone else declared the queue without bosun's dead-letter arguments.
    ch.queue_declare(
        bad_queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let (mut text, port) = config(&good_queue, &good, "");
    text.push_str(&format!("\n[consumers.{bad}]\nsource = \"rabbit\"\nhandler = \"scripted\"\nqueue = \"{bad_queue}\"\n"));
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    // Wait until the conflict is reported and the other consumer is ready (its queue declared).
    let good_component = format!("consumer:{good}");
    let reason = wait_for_async(WAIT, || async {
        let (status, body) = running.readyz()?;
        (status == 503 && body.contains("PRECONDITION_FAILED") && !body.contains(&good_component))
            .then_some(body)
    })
    .await
    .expect("readyz names the conflict");
    assert!(
        reason.contains(&bad_queue) && reason.contains("x-dead-letter-exchange"),
        "{reason}"
    );
    // The other consumer runs regardless.
    let ids = publish(&ch, &good_queue, [b"ok".to_vec()], &[]).await;
    assert!(
        wait_until(|| running
            .seen()
            .iter()
            .any(|m| m.message_id.as_deref() == Some(ids[0].as_str())))
        .await
    );
    let restarts = format!("component=\"consumer:{bad}\"");
    assert!(
        wait_for_async(WAIT, || async {
            running
                .metric("bosun_task_restarts_total", &[&restarts])
                .filter(|v| *v >= 1.0)
        })
        .await
        .is_some()
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(
        &ch,
        &[
            bad_queue.clone(),
            format!("{bad_queue}.dlq"),
            good_queue.clone(),
            format!("{good_queue}.dlq"),
        ],
    )
    .await;
    for q in [&bad_queue, &good_queue] {
        cleanup(
            &ch,
            &["1s", "2s", "4s", "8s"].map(|t| format!("{q}.retry.{t}")),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_broker_keeps_the_daemon_up_and_not_ready() {
    let consumer = unique("c_down");
    let (text, port) = config(&unique("down"), &consumer, "");
    let text = text.replace(RABBIT_URL, "amqp://guest:secret-pw@127.0.0.1:1/%2f");
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    let body = wait_for_async(WAIT, || async {
        let (status, body) = running.readyz()?;
        (status == 503 && body.contains("cannot connect")).then_some(body)
    })
    .await
    .expect("readyz says why");
    assert!(!body.contains("secret-pw"), "{body}");
    assert_eq!(running.stop().await, ExitStatus::Clean);
}

#[test]
fn sigterm_with_messages_in_flight_loses_none() {
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    let queue = unique("term");
    let (_c, ch) = rt.block_on(rabbit());
    rt.block_on(async {
        ch.queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .ok();
    });
    let port = free_port();
    let text = format!(
        r#"
[service]
name = "{queue}"
shutdown_timeout = "20s"
[http]
listen = "127.0.0.1:{port}"
[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"
[handlers.log]
kind = "log"
[consumers.term]
source = "rabbit"
handler = "log"
queue = "{queue}"
prefetch = 100
declare = false
retry = {{ max_attempts = 1 }}
[consumers.term.dead_letter]
queue = "{queue}"
"#
    );
    let ids = rt.block_on(publish(
        &ch,
        &queue,
        (0..10000u16).map(|i| i.to_be_bytes().to_vec()),
        &[],
    ));
    let file = ConfigFile::new(&text);
    let mut daemon = support::Daemon::start_with_env(&file.path, port, &[("RUST_LOG", "info")]);
    assert!(
        support::wait_for(WAIT, || daemon
            .metric("bosun_messages_received_total", &["consumer=\"term\""])
            .filter(|v| *v >= 100.0))
        .is_some(),
        "{}",
        daemon.logs()
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "{}", daemon.logs());
    let logs = daemon.logs();
    assert!(logs.contains("draining"), "{logs}");
    let handled: BTreeSet<String> = logs
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["message"] == "message received")
        .filter_map(|v| v["message_id"].as_str().map(str::to_owned))
        .collect();
    let left = rt.block_on(get_all(&ch, &queue));
    let remaining: BTreeSet<String> = left
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    let missing: Vec<&String> = ids
        .iter()
        .filter(|id| !handled.contains(*id) && !remaining.contains(*id))
        .collect();
    assert!(
        !handled.is_empty() && !remaining.is_empty(),
        "stopped mid-queue: handled {}, remaining {}",
        handled.len(),
        remaining.len()
    );
    assert!(
        missing.is_empty(),
        "{} messages lost, e.g. {:?}",
        missing.len(),
        missing.first()
    );
    rt.block_on(cleanup(&ch, &[queue]));
}

/// Declares a durable topic exchange `name` and binds `queue` (declared here with `args`,
/// durable) to it with `key`.
async fn exchange_to_queue(
    ch: &lapin::Channel,
    name: &str,
    queue: &str,
    key: &str,
    args: FieldTable,
) {
    ch.exchange_declare(
        name.into(),
        lapin::ExchangeKind::Topic,
        lapin::options::ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare exchange");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare queue");
    ch.queue_bind(
        queue.into(),
        name.into(),
        key.into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
}

/// Publishes one message to `exchange` with `routing_key` and `props`, confirmed and routed.
async fn publish_props(
    ch: &lapin::Channel,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
) {
    publish_foreign(
        ch,
        (exchange, routing_key),
        body,
        props.with_delivery_mode(2),
    )
    .await;
}

fn text_value(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_copy_does_not_inherit_expiration() {
    let (queue, consumer) = (unique("ttl"), unique("c_ttl"));
    let (text, port) = config(&queue, &consumer, "");
    let running = start(&text, port, Duration::ZERO, |_| {
        Outcome::dead_letter("refused")
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let props = BasicProperties::default()
        .with_message_id("ttl-1".into())
        .with_expiration("1500".into());
    publish_props(&ch, "", &queue, b"short-lived", props).await;
    let dlq = format!("{queue}.dlq");
    assert!(
        wait_for_async(WAIT, || async {
            depth(&ch, &dlq).await.filter(|d| *d == 1)
        })
        .await
        .is_some(),
        "never dead-lettered"
    );
    // Well past the original's TTL: a copy that kept `expiration` would be gone by now.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(
        dead.len(),
        1,
        "the dead letter expired in the dead-letter queue"
    );
    assert_eq!(dead[0].properties.expiration(), &None);
    assert_eq!(
        header(&dead[0], "bosun-orig-expiration").and_then(|v| v.as_text()),
        Some("1500".into())
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &default_queues(&queue)).await;
}

/// The service, http, broker and an exec handler `script` that appends what the shell
/// commands `print` write to `record`, and fails every first attempt (exit 75: retry).
fn exec_config(consumer: &str, port: u16, record: &std::path::Path, print: &str) -> String {
    let script = format!(
        "{{ {print}; }} >> '{}'; [ \"$BOSUN_ATTEMPT\" -ge 2 ] || exit 75",
        record.display()
    );
    format!(
        r#"
[service]
name = "{consumer}"
shutdown_timeout = "10s"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[handlers.script]
kind = "exec"
command = ["/bin/sh", "-c", {script:?}]
timeout = "10s"
"#
    )
}

/// The lines an [`exec_config`] handler recorded so far.
fn recorded(record: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(record)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_message_keeps_its_routing_key_through_a_route_and_an_exec_handler() {
    let (queue, consumer) = (unique("rk"), unique("c_rk"));
    let exchange = unique("jobs");
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("seen.txt");
    let port = free_port();
    let head = exec_config(
        &consumer,
        port,
        &record,
        "echo \"$BOSUN_ATTEMPT $BOSUN_EXCHANGE $BOSUN_ROUTING_KEY\"",
    );
    let text = format!(
        r#"{head}
[handlers.drain]
kind = "noop"

[handlers.router]
kind = "route"
routes = [{{ routing_key = "job.#", handler = "script" }}]
default = "drain"

[consumers.{consumer}]
source = "rabbit"
handler = "router"
queue = "{queue}"
retry = {{ max_attempts = 3, tiers = ["200ms"] }}
bindings = [{{ exchange = "{exchange}", exchange_type = "topic", routing_key = "job.#" }}]
"#
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    publish_props(
        &ch,
        &exchange,
        "job.created",
        b"{}",
        BasicProperties::default().with_message_id("rk-1".into()),
    )
    .await;
    let lines = || recorded(&record);
    assert!(
        wait_until(|| lines().len() >= 2).await,
        "the script ran only {:?}: the retry was routed elsewhere",
        lines()
    );
    assert_eq!(
        lines(),
        [
            format!("1 {exchange} job.created"),
            format!("2 {exchange} job.created")
        ]
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(depth(&ch, &queue).await, Some(0));
    cleanup(
        &ch,
        &[
            queue.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.retry.200ms"),
        ],
    )
    .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_copy_affects_only_its_own_message() {
    let (queue, consumer) = (unique("refuse"), unique("c_refuse"));
    let source = unique("src");
    let dlx = unique("dlx");
    let (dl_ok, dl_full) = (unique("dl_ok"), unique("dl_full"));
    let (_c, ch) = rabbit().await;
    // Dead letters keyed `ok.*` are kept; `bad.*` are nacked (a full queue refusing
    // publishes); `gone.*` match nothing and come back as returns.
    exchange_to_queue(&ch, &dlx, &dl_ok, "ok.#", FieldTable::default()).await;
    let mut full = FieldTable::default();
    full.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
    full.insert("x-overflow".into(), text_value("reject-publish"));
    exchange_to_queue(&ch, &dlx, &dl_full, "bad.#", full).await;
    let (text, port) = config(
        &queue,
        &consumer,
        &format!(
            "prefetch = 50\nconcurrency = 20\nretry = {{ max_attempts = 3, tiers = [\"200ms\"] }}\nbindings = [{{ exchange = \"{source}\", exchange_type = \"topic\", routing_key = \"#\" }}]\ndead_letter = {{ exchange = \"{dlx}\" }}"
        ),
    );
    let running = start(&text, port, Duration::from_millis(300), |m| {
        match m.body.as_ref() {
            b"bad" | b"gone" | b"dead" => Outcome::dead_letter("permanent"),
            _ if m.attempt == 1 => Outcome::retry("once more"),
            _ => Outcome::Ack,
        }
    })
    .await;
    ready(&running).await;
    publish_props(
        &ch,
        &source,
        "bad.1",
        b"bad",
        BasicProperties::default().with_message_id("bad-1".into()),
    )
    .await;
    publish_props(
        &ch,
        &source,
        "gone.1",
        b"gone",
        BasicProperties::default().with_message_id("gone-1".into()),
    )
    .await;
    publish_props(
        &ch,
        &source,
        "ok.dead",
        b"dead",
        BasicProperties::default().with_message_id("dead-1".into()),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = format!("good-{i}");
        publish_props(
            &ch,
            &source,
            &format!("ok.{i}"),
            b"good",
            BasicProperties::default().with_message_id(id.as_str().into()),
        )
        .await;
        ids.push(id);
    }
    let attempts_of = |id: &str| attempts(&running, id);
    assert!(
        wait_until(|| ids.iter().all(|id| attempts_of(id).len() >= 2)).await,
        "not every good message finished"
    );
    assert!(
        refusals_counted(&running, &consumer, 2.0).await,
        "the refusals were never counted"
    );
    // The session was never torn down: no good message was handled twice on one attempt.
    for id in &ids {
        assert_eq!(attempts_of(id), [1, 2], "{id}");
    }
    // A restarted session would have handed them out again, marked redelivered (the
    // refused ones are handed back on purpose).
    assert!(
        running
            .seen()
            .iter()
            .filter(|m| m.body.as_ref() == b"good")
            .all(|m| !m.redelivered),
        "the session was restarted"
    );
    assert_eq!(attempts_of("dead-1"), [1]);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    // The refused ones are kept in the queue, not lost; the accepted dead letter arrived.
    assert_eq!(depth(&ch, &queue).await, Some(2));
    let kept: BTreeSet<String> = get_all(&ch, &queue)
        .await
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    assert_eq!(
        kept,
        ["bad-1", "gone-1"].map(str::to_owned).into_iter().collect()
    );
    assert_eq!(depth(&ch, &dl_ok).await, Some(1));
    cleanup(
        &ch,
        &[
            queue.clone(),
            format!("{queue}.retry.200ms"),
            dl_ok.clone(),
            dl_full.clone(),
        ],
    )
    .await;
    for e in [&source, &dlx] {
        let _ = ch
            .exchange_delete(e.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_copy_over_frame_max_is_trimmed_or_dead_lettered_as_invalid_without_reconnecting() {
    let (queue, consumer) = (unique("frame"), unique("c_frame"));
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 3, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |m| {
        if m.attempt == 1 {
            // A long reason: bosun-error at its 2 KiB limit.
            Outcome::retry("x".repeat(4096))
        } else {
            Outcome::Ack
        }
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let with_header = |id: &str, size: usize| {
        let mut table = FieldTable::default();
        table.insert("big".into(), text_value(&"h".repeat(size)));
        table.insert("tenant".into(), text_value("acme"));
        BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(table)
    };
    // Fits once bosun-error is cut; cannot fit however bosun's headers are cut.
    publish_props(&ch, "", &queue, b"trim", with_header("trim-1", 129_500)).await;
    publish_props(&ch, "", &queue, b"huge", with_header("huge-1", 130_900)).await;
    publish_props(
        &ch,
        "",
        &queue,
        b"plain",
        BasicProperties::default().with_message_id("plain-1".into()),
    )
    .await;
    let dlq = format!("{queue}.dlq");
    let attempts_of = |id: &str| attempts(&running, id);
    assert!(
        wait_until(|| attempts_of("trim-1").len() >= 2 && attempts_of("plain-1").len() >= 2).await,
        "trim {:?} plain {:?}",
        attempts_of("trim-1"),
        attempts_of("plain-1")
    );
    assert!(
        wait_for_async(WAIT, || async {
            depth(&ch, &dlq).await.filter(|d| *d == 1)
        })
        .await
        .is_some(),
        "the oversized copy never reached the dead-letter queue"
    );
    let trimmed = running
        .seen()
        .into_iter()
        .find(|m| m.message_id.as_deref() == Some("trim-1") && m.attempt == 2)
        .expect("second attempt");
    let error = trimmed
        .headers
        .get("bosun-error")
        .and_then(HeaderValue::as_text)
        .unwrap_or_default();
    assert!(error.len() <= 256, "bosun-error kept {} bytes", error.len());
    assert!(trimmed.headers.contains_key("big"));
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        d.properties.message_id().as_ref().map(|s| s.to_string()),
        Some("huge-1".into())
    );
    let text = |k: &str| header(d, k).and_then(|v| v.as_text());
    assert_eq!(text("bosun-error-kind").as_deref(), Some("invalid"));
    assert_eq!(
        header(d, "bosun-headers-truncated"),
        Some(HeaderValue::Int(1))
    );
    assert_eq!(text("tenant").as_deref(), Some("acme"));
    assert!(header(d, "big").is_none());
    assert_eq!(attempts_of("huge-1"), [1]);
    // A restarted session would have handed them out again, marked redelivered.
    assert!(
        running.seen().iter().all(|m| !m.redelivered),
        "the session was restarted"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(depth(&ch, &queue).await, Some(0));
    cleanup(&ch, &[queue.clone(), dlq, format!("{queue}.retry.200ms")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quorum_retry_tiers_are_declared_at_least_once_and_still_retry() {
    let (queue, consumer) = (unique("qtier"), unique("c_qtier"));
    let (text, port) = config(
        &queue,
        &consumer,
        "queue_type = \"quorum\"\nretry = { max_attempts = 3, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |m| {
        if m.attempt == 1 {
            Outcome::retry("again")
        } else {
            Outcome::Ack
        }
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    publish(&ch, &queue, [b"q".to_vec()], &[]).await;
    assert!(wait_until(|| running.seen().len() >= 2).await);
    assert_eq!(running.seen()[1].attempt, 2);
    // Declaring the tier again with the at-least-once arguments is accepted (the same
    // queue); without them it is refused (a different one).
    let tier = format!("{queue}.retry.200ms");
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), text_value("quorum"));
    args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(200));
    args.insert("x-dead-letter-exchange".into(), text_value(""));
    args.insert("x-dead-letter-routing-key".into(), text_value(&queue));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let mut strict = args.clone();
    strict.insert("x-overflow".into(), text_value("reject-publish"));
    strict.insert("x-dead-letter-strategy".into(), text_value("at-least-once"));
    ch.queue_declare(tier.as_str().into(), durable, strict)
        .await
        .expect("the tier is declared at-least-once");
    let (_c2, other) = rabbit().await;
    assert!(
        other
            .queue_declare(tier.as_str().into(), durable, args)
            .await
            .is_err(),
        "the tier was declared without at-least-once dead-lettering"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &[queue.clone(), format!("{queue}.dlq"), tier]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copy_that_closes_the_channel_affects_only_its_own_message() {
    let (queue, consumer) = (unique("chclose"), unique("c_chclose"));
    let dlx = unique("dlx_gone");
    let dl_queue = unique("dl_gone");
    let (_c, ch) = rabbit().await;
    exchange_to_queue(&ch, &dlx, &dl_queue, "#", FieldTable::default()).await;
    let (text, port) = config(
        &queue,
        &consumer,
        &format!(
            "prefetch = 50\nconcurrency = 20\nretry = {{ max_attempts = 3, tiers = [\"200ms\"] }}\ndead_letter = {{ exchange = \"{dlx}\" }}"
        ),
    );
    let running = start(&text, port, Duration::from_millis(300), |m| {
        match m.body.as_ref() {
            b"dead" => Outcome::dead_letter("permanent"),
            _ if m.attempt == 1 => Outcome::retry("once more"),
            _ => Outcome::Ack,
        }
    })
    .await;
    ready(&running).await;
    // A publish to a missing exchange makes the broker close the whole copy channel, with
    // every retry copy still waiting for its confirm on it.
    ch.exchange_delete(dlx.as_str().into(), Default::default())
        .await
        .expect("delete the dead-letter exchange");
    publish_props(
        &ch,
        "",
        &queue,
        b"dead",
        BasicProperties::default().with_message_id("dead-1".into()),
    )
    .await;
    let mut ids = Vec::new();
    for i in 0..30 {
        let id = format!("good-{i}");
        publish_props(
            &ch,
            "",
            &queue,
            b"good",
            BasicProperties::default().with_message_id(id.as_str().into()),
        )
        .await;
        ids.push(id);
    }
    let attempts_of = |id: &str| attempts(&running, id);
    assert!(
        wait_until(|| ids.iter().all(|id| attempts_of(id).len() >= 2)).await,
        "not every good message finished"
    );
    assert!(
        refusals_counted(&running, &consumer, 1.0).await,
        "the refusal was never counted"
    );
    for id in &ids {
        assert_eq!(attempts_of(id), [1, 2], "{id}");
    }
    assert!(
        running
            .seen()
            .iter()
            .filter(|m| m.body.as_ref() == b"good")
            .all(|m| !m.redelivered),
        "the session was restarted"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    // The dead letter that could not be published is kept in the queue, not lost.
    let kept: Vec<String> = get_all(&ch, &queue)
        .await
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    assert_eq!(kept, ["dead-1"]);
    cleanup(
        &ch,
        &[
            queue.clone(),
            format!("{queue}.retry.200ms"),
            dl_queue.clone(),
        ],
    )
    .await;
}

/// An HTTP endpoint that answers 503 to its first request and 200 after, and records the
/// `bosun-routing-key` and `ce-type` headers of each request.
async fn flaky_endpoint() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/", listener.local_addr().expect("addr"));
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut socket, _)) = listener.accept().await {
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as much body as Content-Length says.
            let head_end = loop {
                let Ok(n) = socket.read(&mut buf).await else {
                    break None;
                };
                if n == 0 {
                    break None;
                }
                request.extend_from_slice(&buf[..n]);
                if let Some(i) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(head_end) = head_end else { continue };
            let head = String::from_utf8_lossy(&request[..head_end]).to_lowercase();
            let value = |name: &str| {
                head.lines()
                    .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                    .unwrap_or("")
                    .trim()
                    .to_owned()
            };
            let length: usize = value("content-length").parse().unwrap_or(0);
            while request.len() < head_end + length {
                match socket.read(&mut buf).await {
                    Ok(n) if n > 0 => request.extend_from_slice(&buf[..n]),
                    _ => break,
                }
            }
            let first = {
                let mut seen = record.lock().unwrap_or_else(|p| p.into_inner());
                seen.push((value("bosun-routing-key"), value("ce-type")));
                seen.len() == 1
            };
            let status = if first {
                "503 Service Unavailable"
            } else {
                "200 OK"
            };
            let _ = socket
                .write_all(
                    format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                        .as_bytes(),
                )
                .await;
        }
    });
    (url, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_handler_sees_the_same_routing_key_and_ce_type_on_a_retry() {
    let (queue, consumer) = (unique("rkhttp"), unique("c_rkhttp"));
    let exchange = unique("events");
    let (url, requests) = flaky_endpoint().await;
    let port = free_port();
    let text = format!(
        r#"
[service]
name = "{consumer}"
shutdown_timeout = "10s"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[handlers.hook]
kind = "http"
url = "{url}"
cloudevents = "binary"
timeout = "10s"

[handlers.drain]
kind = "noop"

[handlers.router]
kind = "route"
routes = [{{ routing_key = "job.#", handler = "hook" }}]
default = "drain"

[consumers.{consumer}]
source = "rabbit"
handler = "router"
queue = "{queue}"
retry = {{ max_attempts = 3, tiers = ["200ms"] }}
bindings = [{{ exchange = "{exchange}", exchange_type = "topic", routing_key = "job.#" }}]
"#
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    publish_props(
        &ch,
        &exchange,
        "job.done",
        b"{}",
        BasicProperties::default().with_message_id("rkh-1".into()),
    )
    .await;
    let seen = || requests.lock().unwrap_or_else(|p| p.into_inner()).clone();
    assert!(
        wait_until(|| seen().len() >= 2).await,
        "the endpoint got {:?}: the retry was routed elsewhere",
        seen()
    );
    let expected = ("job.done".to_owned(), "job.done".to_owned());
    assert_eq!(seen(), [expected.clone(), expected]);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(
        &ch,
        &[
            queue.clone(),
            format!("{queue}.dlq"),
            format!("{queue}.retry.200ms"),
        ],
    )
    .await;
    let _ = ch
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
}

/// A header of every AMQP field type, as another client may publish it, and what the handler
/// is shown for each.
fn every_field_type() -> Vec<(&'static str, AMQPValue, HeaderValue)> {
    use lapin::types::{ByteArray, DecimalValue, FieldArray};
    let mut inner = FieldTable::default();
    inner.insert("deep".into(), AMQPValue::Boolean(true));
    inner.insert("at".into(), AMQPValue::Timestamp(1_700_000_000));
    let mut outer = FieldTable::default();
    outer.insert("inner".into(), AMQPValue::FieldTable(inner));
    outer.insert("n".into(), AMQPValue::ShortUInt(7));
    vec![
        ("t-bool", AMQPValue::Boolean(true), HeaderValue::Bool(true)),
        ("t-i8", AMQPValue::ShortShortInt(-5), HeaderValue::Int(-5)),
        (
            "t-u8",
            AMQPValue::ShortShortUInt(200),
            HeaderValue::Int(200),
        ),
        ("t-i16", AMQPValue::ShortInt(-300), HeaderValue::Int(-300)),
        (
            "t-u16",
            AMQPValue::ShortUInt(60_000),
            HeaderValue::Int(60_000),
        ),
        (
            "t-i32",
            AMQPValue::LongInt(-70_000),
            HeaderValue::Int(-70_000),
        ),
        (
            "t-u32",
            AMQPValue::LongUInt(4_000_000_000),
            HeaderValue::Int(4_000_000_000),
        ),
        (
            "t-i64",
            AMQPValue::LongLongInt(-9_000_000_000),
            HeaderValue::Int(-9_000_000_000),
        ),
        ("t-f32", AMQPValue::Float(1.5), HeaderValue::Float(1.5)),
        ("t-f64", AMQPValue::Double(-2.25), HeaderValue::Float(-2.25)),
        (
            "t-decimal",
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 12_345,
            }),
            HeaderValue::Float(123.45),
        ),
        (
            "t-text",
            text_value("acme"),
            HeaderValue::String("acme".into()),
        ),
        (
            "t-text-not-utf8",
            AMQPValue::LongString(LongString::from(vec![0xff, 0xfe])),
            HeaderValue::Bytes(vec![0xff, 0xfe]),
        ),
        (
            "t-timestamp",
            AMQPValue::Timestamp(1_700_000_000),
            HeaderValue::Int(1_700_000_000),
        ),
        (
            "t-bytes",
            AMQPValue::ByteArray(ByteArray::from(vec![0u8, 1, 255])),
            HeaderValue::Bytes(vec![0, 1, 255]),
        ),
        (
            "t-void",
            AMQPValue::Void,
            HeaderValue::Json(serde_json::Value::Null),
        ),
        (
            "t-array",
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                text_value("a"),
                AMQPValue::Void,
                AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::Boolean(false)])),
            ])),
            HeaderValue::Json(serde_json::json!([1, "a", null, [false]])),
        ),
        (
            "t-table",
            AMQPValue::FieldTable(outer),
            HeaderValue::Json(serde_json::json!({
                "inner": { "deep": true, "at": 1_700_000_000 },
                "n": 7
            })),
        ),
    ]
}

/// Waits until `dlq` holds `count` messages; fails with what the handler saw.
async fn dead_letters(running: &Running, ch: &lapin::Channel, dlq: &str, count: u32) {
    assert!(
        wait_for_async(WAIT, || async {
            depth(ch, dlq).await.filter(|d| *d == count)
        })
        .await
        .is_some(),
        "never dead-lettered; the handler saw {:?}",
        running.seen()
    );
}

/// Publishes `body` through `ch` (another client than bosun's publisher) to `exchange` with
/// `routing_key` and exactly `props` (no message id or persistence added), confirmed and
/// routed.
async fn publish_foreign(
    ch: &lapin::Channel,
    (exchange, routing_key): (&str, &str),
    body: &[u8],
    props: BasicProperties,
) {
    let confirm = ch
        .basic_publish(
            exchange.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                immediate: false,
            },
            body,
            props,
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    assert!(
        confirm.is_ack() && confirm.take_message().is_none(),
        "test message not routed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_message_without_id_keeps_a_derived_id_and_every_header_type_through_retry_and_dead_letter()
 {
    let (queue, consumer) = (unique("foreign"), unique("c_foreign"));
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 2, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::retry("not yet")).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let types = every_field_type();
    let mut table = FieldTable::default();
    for (name, value, _) in &types {
        table.insert((*name).into(), value.clone());
    }
    // As a client that sets neither message_id nor persistence publishes it.
    let props = BasicProperties::default()
        .with_delivery_mode(1)
        .with_timestamp(1_700_000_123)
        .with_headers(table.clone());
    const BODY: &[u8] = b"{\"from\":\"elsewhere\"}";
    publish_foreign(&ch, ("", &queue), BODY, props.clone()).await;
    let dlq = format!("{queue}.dlq");
    dead_letters(&running, &ch, &dlq, 1).await;
    let seen = running.seen();
    assert_eq!(seen.iter().map(|m| m.attempt).collect::<Vec<_>>(), [1, 2]);
    let id = seen[0].message_id.clone().expect("a derived message id");
    assert_eq!(id, support::amqp::derived_id(&props, "", &queue, BODY));
    assert!(id.starts_with(support::amqp::DERIVED_ID_PREFIX), "{id}");
    assert_eq!(seen[1].message_id.as_deref(), Some(id.as_str()));
    for message in &seen {
        for (name, _, shown) in &types {
            assert_eq!(
                message.headers.get(*name),
                Some(shown),
                "header {name} on attempt {}",
                message.attempt
            );
        }
    }
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(dead.len(), 1);
    let p = &dead[0].properties;
    assert_eq!(
        p.message_id().as_ref().map(|m| m.as_str()),
        Some(id.as_str())
    );
    assert_eq!(*p.delivery_mode(), Some(2));
    assert_eq!(*p.timestamp(), Some(1_700_000_123));
    let copied = p.headers().clone().unwrap_or_default();
    for (name, value, _) in &types {
        assert_eq!(
            copied.inner().get(*name),
            Some(value),
            "header {name} changed on its way through a retry into the dead letter"
        );
    }
    assert_eq!(header(&dead[0], "bosun-attempt"), Some(HeaderValue::Int(2)));
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &[queue.clone(), dlq, format!("{queue}.retry.200ms")]).await;
}

/// The `x-death` entries of a delivery seen by the handler, as (queue, reason, count).
fn deaths(message: &Message) -> Vec<(String, String, i64)> {
    let Some(HeaderValue::Json(serde_json::Value::Array(entries))) = message.headers.get("x-death")
    else {
        return Vec::new();
    };
    entries
        .iter()
        .map(|e| {
            (
                e["queue"].as_str().unwrap_or_default().to_owned(),
                e["reason"].as_str().unwrap_or_default().to_owned(),
                e["count"].as_i64().unwrap_or_default(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_dead_lettered_elsewhere_starts_at_attempt_one_and_keeps_its_x_death() {
    let (queue, consumer) = (unique("xdeath"), unique("c_xdeath"));
    let foreign = unique("xdeath_foreign");
    let (text, port) = config(
        &queue,
        &consumer,
        "retry = { max_attempts = 3, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |m| {
        if m.attempt < 2 {
            Outcome::retry("again")
        } else {
            Outcome::dead_letter("enough")
        }
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    // Another application's queue whose dead letters go to bosun's queue: every message
    // expires there at once, and the broker dead-letters it with a real `x-death`.
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(0));
    args.insert("x-dead-letter-exchange".into(), text_value(""));
    args.insert("x-dead-letter-routing-key".into(), text_value(&queue));
    ch.queue_declare(
        foreign.as_str().into(),
        QueueDeclareOptions::default(),
        args,
    )
    .await
    .expect("declare the foreign queue");
    let expired = BasicProperties::default().with_timestamp(1_700_000_456);
    publish_foreign(&ch, ("", &foreign), b"expired elsewhere", expired.clone()).await;
    // And a message whose publisher wrote an `x-death` of its own, with a large count.
    let mut entry = FieldTable::default();
    entry.insert("count".into(), AMQPValue::LongLongInt(7));
    entry.insert("reason".into(), text_value("rejected"));
    entry.insert("queue".into(), text_value("legacy.q"));
    entry.insert("exchange".into(), text_value(""));
    entry.insert(
        "routing-keys".into(),
        AMQPValue::FieldArray(vec![text_value("legacy.q")].into()),
    );
    entry.insert("time".into(), AMQPValue::Timestamp(1_700_000_000));
    let mut table = FieldTable::default();
    table.insert(
        "x-death".into(),
        AMQPValue::FieldArray(vec![AMQPValue::FieldTable(entry)].into()),
    );
    publish_foreign(
        &ch,
        ("", &queue),
        b"died seven times",
        BasicProperties::default().with_headers(table),
    )
    .await;
    let dlq = format!("{queue}.dlq");
    dead_letters(&running, &ch, &dlq, 2).await;
    let seen = running.seen();
    for body in [&b"expired elsewhere"[..], b"died seven times"] {
        let mine: Vec<&Message> = seen.iter().filter(|m| m.body.as_ref() == body).collect();
        assert_eq!(
            mine.iter().map(|m| m.attempt).collect::<Vec<_>>(),
            [1, 2],
            "{}",
            String::from_utf8_lossy(body)
        );
        let id = mine[0].message_id.clone().expect("a derived id");
        assert!(id.starts_with(support::amqp::DERIVED_ID_PREFIX), "{id}");
        assert_eq!(mine[1].message_id.as_deref(), Some(id.as_str()));
    }
    // Derived from where it was first published, not from the dead-letter hop that brought
    // it here.
    let expired_id = seen
        .iter()
        .find(|m| m.body.as_ref() == b"expired elsewhere")
        .and_then(|m| m.message_id.clone());
    assert_eq!(
        expired_id,
        Some(support::amqp::derived_id(
            &expired,
            "",
            &foreign,
            b"expired elsewhere"
        ))
    );
    let first = |body: &[u8], attempt: u32| {
        seen.iter()
            .find(|m| m.body.as_ref() == body && m.attempt == attempt)
            .map(deaths)
            .unwrap_or_default()
    };
    // The other application's history reaches the handler on every attempt; the hop through
    // bosun's retry tier is added by the broker beside it.
    let elsewhere = (foreign.clone(), "expired".to_owned(), 1);
    assert_eq!(
        first(b"expired elsewhere", 1),
        std::slice::from_ref(&elsewhere)
    );
    assert!(first(b"expired elsewhere", 2).contains(&elsewhere));
    let legacy = ("legacy.q".to_owned(), "rejected".to_owned(), 7);
    assert_eq!(first(b"died seven times", 1), std::slice::from_ref(&legacy));
    assert!(first(b"died seven times", 2).contains(&legacy));
    for dead in get_all(&ch, &dlq).await {
        let kept = dead
            .properties
            .headers()
            .as_ref()
            .and_then(|t| t.inner().get("x-death").cloned());
        let Some(AMQPValue::FieldArray(entries)) = kept else {
            panic!("the dead letter lost x-death: {:?}", dead.properties);
        };
        let queues: Vec<String> = entries
            .as_slice()
            .iter()
            .filter_map(|e| match e {
                AMQPValue::FieldTable(t) => match t.inner().get("queue") {
                    Some(AMQPValue::LongString(q)) => {
                        Some(String::from_utf8_lossy(q.as_bytes()).into_owned())
                    }
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert!(
            queues.contains(&foreign) || queues.iter().any(|q| q == "legacy.q"),
            "{queues:?}"
        );
        assert_eq!(header(&dead, "bosun-attempt"), Some(HeaderValue::Int(2)));
        assert_eq!(
            header(&dead, "bosun-error-kind").and_then(|v| v.as_text()),
            Some("permanent".into())
        );
    }
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(
        &ch,
        &[queue.clone(), dlq, foreign, format!("{queue}.retry.200ms")],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_legacy_retry_count_header_sets_the_attempt_when_configured() {
    let (queue, consumer) = (unique("legacy"), unique("c_legacy"));
    let (text, port) = config(
        &queue,
        &consumer,
        "attempt_header = \"x-retry-count\"\nretry = { max_attempts = 4, tiers = [\"200ms\"] }",
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::retry("down")).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    // As the earlier consumer republished its retries: the count of retries made so far.
    for (id, count) in [("legacy-2", 2), ("legacy-0", 0)] {
        let mut table = FieldTable::default();
        table.insert("x-retry-count".into(), AMQPValue::LongLongInt(count));
        table.insert("x-original-routing-key".into(), text_value("order.created"));
        let props = BasicProperties::default()
            .with_message_id(id.into())
            .with_headers(table);
        publish_foreign(&ch, ("", &queue), b"retry me", props).await;
    }
    let dlq = format!("{queue}.dlq");
    dead_letters(&running, &ch, &dlq, 2).await;
    assert_eq!(attempts(&running, "legacy-2"), [3, 4]);
    assert_eq!(attempts(&running, "legacy-0"), [1, 2, 3, 4]);
    for dead in get_all(&ch, &dlq).await {
        assert_eq!(header(&dead, "bosun-attempt"), Some(HeaderValue::Int(4)));
        assert_eq!(
            header(&dead, "bosun-error-kind").and_then(|v| v.as_text()),
            Some("exhausted".into())
        );
        // bosun never rewrites the legacy header: it keeps what the earlier consumer wrote.
        let expected = match dead.properties.message_id().as_ref().map(|m| m.as_str()) {
            Some("legacy-2") => 2,
            _ => 0,
        };
        assert_eq!(
            dead.properties
                .headers()
                .as_ref()
                .and_then(|t| t.inner().get("x-retry-count").cloned()),
            Some(AMQPValue::LongLongInt(expected))
        );
    }
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &[queue.clone(), dlq, format!("{queue}.retry.200ms")]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exec_handler_sees_every_header_type_and_one_derived_id_on_each_attempt() {
    let (queue, consumer) = (unique("fexec"), unique("c_fexec"));
    let dir = tempfile::tempdir().expect("tempdir");
    let record = dir.path().join("seen.txt");
    let port = free_port();
    let head = exec_config(
        &consumer,
        port,
        &record,
        "echo \"id=$BOSUN_MESSAGE_ID attempt=$BOSUN_ATTEMPT\"; env | grep '^BOSUN_HEADER_T_' | LC_ALL=C sort",
    );
    let text = format!(
        r#"{head}
[consumers.{consumer}]
source = "rabbit"
handler = "script"
queue = "{queue}"
retry = {{ max_attempts = 3, tiers = ["200ms"] }}
"#
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Ack).await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let mut table = FieldTable::default();
    for (name, value, _) in every_field_type() {
        table.insert(name.into(), value);
    }
    let props = BasicProperties::default().with_headers(table);
    publish_foreign(&ch, ("", &queue), b"typed", props.clone()).await;
    let lines = || recorded(&record);
    assert!(
        wait_until(|| lines().iter().filter(|l| l.starts_with("id=")).count() >= 2).await,
        "the script ran only {:?}",
        lines()
    );
    let id = support::amqp::derived_id(&props, "", &queue, b"typed");
    let shown = [
        "BOSUN_HEADER_T_ARRAY=[1,\"a\",null,[false]]",
        "BOSUN_HEADER_T_BOOL=true",
        "BOSUN_HEADER_T_DECIMAL=123.45",
        "BOSUN_HEADER_T_F32=1.5",
        "BOSUN_HEADER_T_F64=-2.25",
        "BOSUN_HEADER_T_I16=-300",
        "BOSUN_HEADER_T_I32=-70000",
        "BOSUN_HEADER_T_I64=-9000000000",
        "BOSUN_HEADER_T_I8=-5",
        "BOSUN_HEADER_T_TABLE={\"inner\":{\"at\":1700000000,\"deep\":true},\"n\":7}",
        "BOSUN_HEADER_T_TEXT=acme",
        "BOSUN_HEADER_T_TIMESTAMP=1700000000",
        "BOSUN_HEADER_T_U16=60000",
        "BOSUN_HEADER_T_U32=4000000000",
        "BOSUN_HEADER_T_U8=200",
        "BOSUN_HEADER_T_VOID=null",
    ];
    // Bytes that are not UTF-8 (`t-bytes`, `t-text-not-utf8`) are left out of the environment.
    let mut expected = Vec::new();
    for attempt in 1..=2 {
        expected.push(format!("id={id} attempt={attempt}"));
        expected.extend(shown.iter().map(|s| (*s).to_owned()));
    }
    assert_eq!(lines(), expected);
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let settled = depth(&ch, &queue).await;
    let tier = format!("{queue}.retry.200ms");
    cleanup(&ch, &[queue.clone(), format!("{queue}.dlq"), tier]).await;
    assert_eq!(settled, Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_without_id_keeps_its_derived_id_on_every_redelivery_and_after_the_broker_dead_letters_it()
 {
    let (queue, consumer) = (unique("redeliver"), unique("c_redeliver"));
    // One attempt: the quorum queue's delivery limit (max_attempts + 10) is reached by
    // releases alone, and the broker itself moves the message into the dead-letter queue.
    let (text, port) = config(
        &queue,
        &consumer,
        "queue_type = \"quorum\"\nretry = { max_attempts = 1 }",
    );
    let running = start(&text, port, Duration::ZERO, |_| Outcome::Release {
        reason: "not mine yet".into(),
    })
    .await;
    ready(&running).await;
    let (_c, ch) = rabbit().await;
    let published = BasicProperties::default()
        .with_timestamp(1_700_000_789)
        .with_correlation_id("corr-r".into());
    publish_foreign(&ch, ("", &queue), b"again and again", published.clone()).await;
    let dlq = format!("{queue}.dlq");
    dead_letters(&running, &ch, &dlq, 1).await;
    let seen = running.seen();
    assert!(seen.len() >= 11, "delivered {} times", seen.len());
    let id = support::amqp::derived_id(&published, "", &queue, b"again and again");
    assert!(id.starts_with(support::amqp::DERIVED_ID_PREFIX), "{id}");
    for message in &seen {
        assert_eq!(message.message_id.as_deref(), Some(id.as_str()));
        assert_eq!(message.attempt, 1);
    }
    assert!(seen[1..].iter().all(|m| m.redelivered));
    // A dead-letter processor reading the broker's dead letter derives the same id.
    let dead = get_all(&ch, &dlq).await;
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(d.properties.message_id(), &None);
    assert_eq!(
        support::amqp::derived_id(
            &d.properties,
            d.exchange.as_str(),
            d.routing_key.as_str(),
            &d.data
        ),
        id
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&ch, &[queue.clone(), dlq]).await;
}
