//! amqp scenarios about what RabbitMQ itself may drop: dead letters of messages that carry a
//! per-message TTL, and retry tiers whose TTL fires while the consumed queue is missing.

use super::*;

/// Per-message TTL of the TTL scenario's messages.
const TTL_MS: u64 = 1500;

/// Publishes `ids` to `queue` through the default exchange with confirms, `rate` per second,
/// each with `expiration`; returns the ids the broker confirmed.
async fn produce_expiring(
    queue: &str,
    ids: &[String],
    rate: u32,
    expiration: Option<&str>,
) -> anyhow::Result<HashSet<String>> {
    use lapin::options::ConfirmSelectOptions;
    let conn =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let chunk = (rate as usize / 20).max(1);
    let mut confirmed = HashSet::new();
    for part in ids.chunks(chunk) {
        let mut pending = Vec::new();
        for id in part {
            let mut props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            if let Some(expiration) = expiration {
                props = props.with_expiration(expiration.into());
            }
            let confirm = ch
                .basic_publish(
                    "".into(),
                    queue.into(),
                    lapin::options::BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    id.as_bytes(),
                    props,
                )
                .await?;
            pending.push((id.clone(), confirm));
        }
        for (id, confirm) in pending {
            let c = confirm.await?;
            if c.is_ack() && c.take_message().is_none() {
                confirmed.insert(id);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let _ = conn.close(200, "bye".into()).await;
    Ok(confirmed)
}

/// Messages with a per-message TTL, half of them failing and dead-lettered at their first
/// attempt (a retry tier's hop would strip `expiration`: the broker removes it when it
/// dead-letters): nothing reads the dead-letter queue until well past their TTL. A dead
/// letter that kept the original's `expiration` would expire there, uncounted.
pub async fn ttl_dead_letters(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let queue = unique("rel_ttl");
    let service = unique("rel");
    let port = free_port();
    let sink = Sink::start(plan.sink).await?;
    let consumer = format!(
        "\n[consumers.load]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{queue}\"\nprefetch = 50\nretry = {{ max_attempts = 1 }}\n"
    );
    let config = format!("{}{consumer}", base_config(&service, port, &sink.url, "5s"));
    let mut daemon = ready_daemon(bin, &config, port).await?;
    let ids = ids(plan.messages);
    let confirmed = produce_expiring(&queue, &ids, plan.rate, Some(&TTL_MS.to_string())).await?;
    let dlq = format!("{queue}.dlq");
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        let dead = amqp_depth(&dlq).await.unwrap_or(0) as usize;
        if sink.accepted().len() + dead >= confirmed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Nothing reads the dead-letter queue for twice the TTL.
    tokio::time::sleep(Duration::from_millis(2 * TTL_MS + 500)).await;
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let dead = amqp_drain(&dlq, true).await?;
    let mut row = tally(
        plan.name,
        &ids,
        &confirmed,
        &sink.accepted(),
        &dead,
        Duration::ZERO,
    );
    row.note = note_with_exit(
        format!(
            "expiration {TTL_MS} ms on every message; dead-letter queue read {} ms after the last",
            2 * TTL_MS + 500
        ),
        code,
    );
    amqp_delete(&[queue.clone(), dlq]).await;
    Ok(row)
}

/// Every message fails once and waits in a quorum retry tier; bosun stops, the quorum queue
/// is deleted, the tier's TTL fires while it is missing, and bosun starts again (declaring
/// it). At-least-once dead-lettering keeps the messages in the tier until the queue takes
/// them; RabbitMQ retries that hop on its own schedule (minutes).
pub async fn quorum_redeclared(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let queue = unique("rel_qq");
    let service = unique("rel");
    let port = free_port();
    let sink = Sink::start(plan.sink).await?;
    let consumer = format!(
        "\n[consumers.load]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{queue}\"\nqueue_type = \"quorum\"\nprefetch = 50\nretry = {{ max_attempts = 3, tiers = [\"5s\"] }}\n"
    );
    let config = format!("{}{consumer}", base_config(&service, port, &sink.url, "5s"));
    let mut daemon = ready_daemon(bin, &config, port).await?;
    let ids = ids(plan.messages);
    for id in &ids {
        sink.fail_once(id);
    }
    let confirmed = produce_expiring(&queue, &ids, plan.rate, None).await?;
    // Every first delivery failed: all of them wait in the tier.
    until(Duration::from_secs(60), || {
        sink.requests() as usize >= confirmed.len()
    })
    .await;
    daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let left_in_queue = amqp_depth(&queue).await.unwrap_or(0);
    amqp_delete(std::slice::from_ref(&queue)).await;
    // The tier's TTL fires while the queue is missing.
    tokio::time::sleep(Duration::from_secs(8)).await;
    daemon.start()?;
    let dlq = format!("{queue}.dlq");
    let deadline = Instant::now() + Duration::from_secs(300);
    while Instant::now() < deadline {
        let dead = amqp_depth(&dlq).await.unwrap_or(0) as usize;
        if sink.accepted().len() + dead >= confirmed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let dead = amqp_drain(&dlq, true).await?;
    let mut row = tally(
        plan.name,
        &ids,
        &confirmed,
        &sink.accepted(),
        &dead,
        Duration::ZERO,
    );
    row.note = note_with_exit(
        format!(
            "quorum queue deleted with {left_in_queue} ready, 8 s while the 5 s tier fired, then declared again"
        ),
        code,
    );
    amqp_delete(&[queue.clone(), dlq, format!("{queue}.retry.5s")]).await;
    Ok(row)
}
