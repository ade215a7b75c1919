//! Case `amqp`: drain 50,000 persistent messages with bosun (noop handler, prefetch 1000)
//! and with a bare lapin loop (prefetch 1000, one `multiple` ack every 100 messages, no
//! handler) as the ceiling. Both are timed from their first delivery to their last
//! settlement.

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::util::{Bosun, comparison, unique};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MESSAGES: u64 = 50_000;
const PREFETCH: u16 = 1000;
const BARE_ACK_EVERY: u64 = 100;
const TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run() -> anyhow::Result<String> {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;

    let bosun_queue = unique("bench_amqp_bosun");
    fill(&ch, &bosun_queue).await?;
    let dlq = format!("{bosun_queue}.dlq");
    declare(&ch, &dlq).await?;
    let (bosun_rate, rss) = drain_with_bosun(&bosun_queue, "").await?;

    let bare_queue = unique("bench_amqp_bare");
    fill(&ch, &bare_queue).await?;
    let bare_rate = drain_bare(&bare_queue).await?;

    for q in [&bosun_queue, &dlq, &bare_queue] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    Ok(format!(
        "{MESSAGES} persistent messages, prefetch {PREFETCH}, noop handler\n{}",
        comparison("msg", bosun_rate, bare_rate, rss)
    ))
}

async fn declare(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// Publishes MESSAGES persistent messages of 200 bytes, confirmed.
async fn fill(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    declare(ch, queue).await?;
    let body = vec![b'x'; 200];
    for chunk in 0..MESSAGES / 1000 {
        for i in 0..1000 {
            let props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(format!("{chunk}-{i}").into());
            ch.basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions::default(),
                &body,
                props,
            )
            .await?;
        }
        ch.wait_for_confirms().await?;
    }
    Ok(())
}

/// Publishes MESSAGES persistent messages to a new queue (and declares its dead-letter
/// queue): returns the queue's name.
pub(super) async fn filled(prefix: &str) -> anyhow::Result<String> {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let queue = unique(prefix);
    fill(&ch, &queue).await?;
    declare(&ch, &format!("{queue}.dlq")).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(queue)
}

/// Deletes `queue` and its dead-letter queue.
pub(super) async fn delete(queue: &str) {
    if let Ok(conn) = Connection::connect(URL, ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in [queue.to_owned(), format!("{queue}.dlq")] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let _ = conn.close(200, "done".into()).await;
    }
}

/// bosun drains `queue` with the noop handler, whose table gets `handler_extra` (flow
/// control); returns messages per second and the peak RSS.
pub(super) async fn drain_with_bosun(
    queue: &str,
    handler_extra: &str,
) -> anyhow::Result<(f64, Option<f64>)> {
    let drained = drain_with(queue, handler_extra, "").await?;
    Ok((drained.rate, drained.rss))
}

/// What one drain by bosun measured.
pub(super) struct Drained {
    /// Messages per second.
    pub rate: f64,
    /// Peak RSS in MiB.
    pub rss: Option<f64>,
    /// bosun's /metrics once the queue was drained.
    pub metrics: String,
}

/// [`drain_with_bosun`], with `tail` after the consumer's lines (more of its keys, then other
/// tables: an inbox).
pub(super) async fn drain_with(
    queue: &str,
    handler_extra: &str,
    tail: &str,
) -> anyhow::Result<Drained> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = format!(
        r#"
[service]
name = "bench"
[http]
listen = "127.0.0.1:{port}"
[brokers.rabbit]
kind = "amqp"
url = "{URL}"
[handlers.noop]
kind = "noop"
{handler_extra}
[consumers.bench]
source = "rabbit"
handler = "noop"
queue = "{queue}"
prefetch = {PREFETCH}
declare = false
retry = {{ max_attempts = 1 }}
{tail}
"#
    );
    let bosun = Bosun::start(&config)?;
    let deadline = Instant::now() + TIMEOUT;
    let counter = |name: &str| metric(port, name, "consumer=\"bench\"");
    let started = loop {
        if counter("bosun_messages_received_total").unwrap_or(0.0) >= 1.0 {
            break Instant::now();
        }
        anyhow::ensure!(Instant::now() < deadline, "bosun never received a message");
        tokio::time::sleep(Duration::from_millis(2)).await;
    };
    loop {
        if counter("bosun_messages_settled_total").unwrap_or(0.0) >= MESSAGES as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bosun did not drain the queue in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss = bosun.peak_rss_mib();
    let metrics = metrics_text(port).unwrap_or_default();
    drop(bosun);
    Ok(Drained {
        rate: MESSAGES as f64 / elapsed,
        rss,
        metrics,
    })
}

async fn drain_bare(queue: &str) -> anyhow::Result<f64> {
    let conn = Connection::connect(URL, ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.basic_qos(PREFETCH, BasicQosOptions::default()).await?;
    let mut consumer = ch
        .basic_consume(
            queue.into(),
            "bare".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let mut started = None;
    let mut count = 0u64;
    while let Some(delivery) = tokio::time::timeout(TIMEOUT, consumer.next()).await? {
        let delivery = delivery?;
        started.get_or_insert_with(Instant::now);
        count += 1;
        if count.is_multiple_of(BARE_ACK_EVERY) || count == MESSAGES {
            ch.basic_ack(delivery.delivery_tag, BasicAckOptions { multiple: true })
                .await?;
        }
        if count == MESSAGES {
            break;
        }
    }
    let elapsed = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or(f64::INFINITY);
    let _ = conn.close(200, "done".into()).await;
    Ok(MESSAGES as f64 / elapsed)
}

/// bosun's /metrics page.
pub(super) fn metrics_text(port: u16) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// Sum of the samples of `name` carrying `label` on bosun's /metrics.
pub(super) fn metric(port: u16, name: &str, label: &str) -> Option<f64> {
    let text = metrics_text(port)?;
    let samples: Vec<f64> = text
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(label))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!samples.is_empty()).then(|| samples.iter().sum())
}
