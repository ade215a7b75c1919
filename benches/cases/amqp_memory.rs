//! Case `amqp-memory`: peak RSS of bosun draining 300 persistent messages of 1 MiB at
//! prefetch 1000, with the default byte budget (`max_in_flight_bytes` 64 MiB,
//! `max_message_size` 1 MiB) and with the budget raised out of the way (4 GiB), which is how
//! bosun held deliveries before the budget existed. The handler is `exec` running
//! `sleep 0.1` (8 at once), so deliveries wait in memory as they do behind any real handler;
//! with `noop` they are settled as fast as they arrive and never pile up. Prints both peaks
//! and drain times; asserts nothing.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use super::amqp::metric;
use super::util::{Bosun, unique};

const URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const MESSAGES: u64 = 300;
const BODY: usize = 1 << 20;
const PREFETCH: u16 = 1000;
const TIMEOUT: Duration = Duration::from_secs(300);

pub async fn run() -> anyhow::Result<String> {
    let conn = Connection::connect(URL, ConnectionProperties::default())
        .await
        .context("connect to RabbitMQ")?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut report = format!(
        "{MESSAGES} persistent messages of {} MiB, prefetch {PREFETCH}, exec `sleep 0.1` x 8\n",
        BODY >> 20
    );
    for (label, budget) in [
        ("default budget (64 MiB)", ""),
        ("budget raised to 4 GiB", "max_in_flight_bytes = \"4GiB\""),
    ] {
        let queue = unique("bench_amqp_memory");
        fill(&ch, &queue).await?;
        let result = drain(&queue, budget).await;
        for q in [queue.clone(), format!("{queue}.dlq")] {
            let _ = ch
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        let (seconds, rss) = result?;
        let rss = rss
            .map(|r| format!("{r:.1} MiB"))
            .unwrap_or_else(|| "n/a".into());
        report.push_str(&format!(
            "{label}: peak RSS {rss}, drained in {seconds:.2} s\n"
        ));
    }
    Ok(report)
}

async fn fill(ch: &Channel, queue: &str) -> anyhow::Result<()> {
    for q in [queue.to_owned(), format!("{queue}.dlq")] {
        ch.queue_declare(
            q.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    }
    let body = vec![b'x'; BODY];
    for i in 0..MESSAGES {
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(format!("m-{i}").into());
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            &body,
            props,
        )
        .await?
        .await?;
    }
    Ok(())
}

/// Runs bosun on the filled queue until every message is settled: (seconds from start,
/// peak RSS in MiB).
async fn drain(queue: &str, budget: &str) -> anyhow::Result<(f64, Option<f64>)> {
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
[handlers.slow]
kind = "exec"
command = ["sleep", "0.1"]
[consumers.bench]
source = "rabbit"
handler = "slow"
queue = "{queue}"
prefetch = {PREFETCH}
declare = false
retry = {{ max_attempts = 1 }}
{budget}
"#
    );
    let started = Instant::now();
    let bosun = Bosun::start(&config)?;
    let deadline = started + TIMEOUT;
    loop {
        let settled = metric(port, "bosun_messages_settled_total", "consumer=\"bench\"");
        if settled.unwrap_or(0.0) >= MESSAGES as f64 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bosun did not drain the queue in time"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let rss = bosun.peak_rss_mib();
    drop(bosun);
    Ok((elapsed, rss))
}
