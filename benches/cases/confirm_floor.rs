//! `confirm-floor`: how fast RabbitMQ itself takes 100,000 persistent messages with publisher
//! confirms on this machine, from a bare lapin loop with no database: the floor under any
//! outbox relay's drain rate (and so under the `scheduled-burst` lateness).
//!
//! Each round publishes `BURST` small persistent messages (`mandatory`, the default exchange)
//! to one durable queue while a consumer of that queue records each arrival, as in
//! `scheduled-burst`; it reports the publish rate (first publish to last confirm) and when the
//! last message arrived. Rounds: one connection awaiting each publish before the next and
//! every confirm in a window of 1,024 (what the relay's publisher did before it queued its
//! sends together), one connection with its sends queued 256 at a time, and two connections
//! sharing the messages, sends queued together.

use std::time::{Duration, Instant};

use futures::stream::{FuturesOrdered, StreamExt};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::util::unique;

const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const BURST: usize = 100_000;
const WINDOW: usize = 1024;
const CHUNK: usize = 256;

pub async fn run() -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (label, connections, queued) in [
        ("1 connection, each send awaited", 1, false),
        ("1 connection, sends queued 256 at a time", 1, true),
        ("2 connections, sends queued 256 at a time", 2, true),
    ] {
        out.push(format!("{label}: {}", round(connections, queued).await?));
    }
    Ok(out.join("\n"))
}

async fn confirm_channel(connection: &Connection) -> anyhow::Result<Channel> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    Ok(channel)
}

async fn round(connections: usize, queued: bool) -> anyhow::Result<String> {
    let consumer_connection =
        Connection::connect(RABBIT_URL, ConnectionProperties::default()).await?;
    let channel = consumer_connection.create_channel().await?;
    let queue = unique("bench_floor");
    channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let (arrivals, consuming) =
        super::util::record_arrivals(&channel, &queue, BURST, Instant::now).await?;

    let mut publishers = Vec::new();
    for _ in 0..connections {
        let connection = Connection::connect(RABBIT_URL, ConnectionProperties::default()).await?;
        let channel = confirm_channel(&connection).await?;
        publishers.push((connection, channel));
    }
    let started = Instant::now();
    let per = BURST.div_ceil(connections);
    let loops = publishers.iter().enumerate().map(|(n, (_, channel))| {
        let queue = queue.clone();
        let range = (n * per)..((n + 1) * per).min(BURST);
        async move { publish(channel, &queue, range, queued).await }
    });
    for result in futures::future::join_all(loops).await {
        result?;
    }
    let confirmed = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    let last = loop {
        let (got, last) = arrivals
            .lock()
            .map(|a| {
                (
                    a.iter().filter(|x| x.is_some()).count(),
                    a.iter().flatten().max().copied(),
                )
            })
            .unwrap_or((0, None));
        if got >= BURST || Instant::now() > deadline {
            break last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    consuming.abort();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    for (connection, _) in publishers {
        let _ = connection.close(200, "done".into()).await;
    }
    let last = last.map(|at| at.duration_since(started).as_secs_f64());
    Ok(format!(
        "{BURST} confirmed in {confirmed:.2} s ({:.0} msg/s); last arrival at {}",
        BURST as f64 / confirmed,
        last.map(|s| format!("{s:.2} s"))
            .unwrap_or_else(|| "never".into())
    ))
}

/// Publishes messages `range` (the body is the message's number) with confirms, at most
/// `WINDOW` outstanding.
async fn publish(
    channel: &Channel,
    queue: &str,
    range: std::ops::Range<usize>,
    queued: bool,
) -> anyhow::Result<()> {
    let options = BasicPublishOptions {
        mandatory: true,
        immediate: false,
    };
    let properties = || {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(uuid::Uuid::now_v7().to_string().into())
    };
    let bodies: Vec<Vec<u8>> = range.map(|n| n.to_string().into_bytes()).collect();
    let mut pending = FuturesOrdered::new();
    let step = if queued { CHUNK } else { 1 };
    for chunk in bodies.chunks(step) {
        while !pending.is_empty() && pending.len() + chunk.len() > WINDOW {
            if let Some(confirm) = pending.next().await {
                confirm?;
            }
        }
        let sends = chunk.iter().map(|body| {
            channel.basic_publish("".into(), queue.into(), options, body, properties())
        });
        for confirm in futures::future::join_all(sends).await {
            let confirm = confirm?;
            pending.push_back(confirm);
        }
    }
    while let Some(confirm) = pending.next().await {
        anyhow::ensure!(
            matches!(confirm?, lapin::Confirmation::Ack(None)),
            "a message was not confirmed"
        );
    }
    Ok(())
}
