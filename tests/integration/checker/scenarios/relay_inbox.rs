//! The relay-kill scenario seen from a consumer with an inbox: the relay's duplicates (a
//! batch published and confirmed, its rows not yet marked when the relay dies) reach a bosun
//! consumer whose inbox finds them done, so the handler's effect happens once per row.
//!
//! One `bosun` process relays an outbox table to a queue; another consumes that queue through
//! the http handler, with a postgres inbox keyed on `message_id` (the row's), and the sink
//! completes the inbox record in the same transaction as its effect (counting the delivery).
//! The rows are committed before the relay starts, so it is busy publishing batches when it
//! is killed: three times, at 20, 50 and 80 % of the rows published, each time restarted.
//! The row's `duplicated` counts effects beyond one per row (must be 0); the note gives the
//! relay's duplicates the inbox settled without running the handler.

use super::*;

/// The first sample of `name` with `labels` on the daemon's `/metrics` (0 when absent).
fn metric(port: u16, name: &str, labels: &[&str]) -> f64 {
    support::http_get(&format!("http://127.0.0.1:{port}/metrics"))
        .and_then(|(_, body)| support::metric_value(&body, name, labels))
        .unwrap_or(0.0)
}

/// Rows published so far.
async fn published(pool: &sqlx::PgPool, table: &str) -> anyhow::Result<i64> {
    Ok(sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE published_at IS NOT NULL"
    ))
    .fetch_one(pool)
    .await?)
}

pub async fn relay_kill_with_inbox(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let table = unique("rel_outbox");
    let queue = unique("rel_oq");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(PG_URL)
        .await?;
    let out = Command::new(bin)
        .args(["outbox", "schema", "--table", &table])
        .output()?;
    if !out.status.success() {
        anyhow::bail!(
            "bosun outbox schema failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    sqlx::raw_sql(&String::from_utf8_lossy(&out.stdout))
        .execute(&pool)
        .await?;

    // The consumer first: it declares the queue the relay publishes to.
    let sink = Sink::start(plan.sink).await?;
    let (inbox, inboxes) = inbox_config(plan, &sink).await?;
    let consumer_port = free_port();
    let consumer_config = format!(
        "{}\n[consumers.load]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{queue}\"\nprefetch = 50\nretry = {{ max_attempts = 3, tiers = [\"200ms\", \"500ms\"] }}\n{inbox}{inboxes}",
        base_config(&unique("rel_c"), consumer_port, &sink.url, "5s")
    );
    let mut consumer = ready_daemon(bin, &consumer_config, consumer_port).await?;

    // Every row committed before the relay starts, each with its id as message id and body.
    let ids: Vec<String> = (0..plan.messages)
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let mut committed = HashSet::new();
    for chunk in ids.chunks(500) {
        let mut tx = pool.begin().await?;
        for id in chunk {
            sqlx::query(&format!(
                "INSERT INTO {table} (message_id, destination, routing_key, payload, content_type) VALUES ($1::uuid, '', $2, $3, 'text/plain')"
            ))
            .bind(id)
            .bind(&queue)
            .bind(id.as_bytes())
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        committed.extend(chunk.iter().cloned());
    }

    let relay_port = free_port();
    let relay_config = format!(
        "{}\n[outboxes.load]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\ndestination = \"\"\nbatch = 20\npoll_interval = \"500ms\"\n",
        base_config(&unique("rel_r"), relay_port, "http://127.0.0.1:9/", "1s")
    );
    let mut relay = Daemon::new(bin, &relay_config, relay_port)?;
    relay.start()?;
    let total = ids.len() as f64;
    let mut kills = Vec::new();
    for share in [0.2, 0.5, 0.8] {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut at = published(&pool, &table).await?;
        while (at as f64) < share * total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
            at = published(&pool, &table).await?;
        }
        relay.stop_with(Signal::SIGKILL, Duration::from_secs(5))?;
        kills.push(at);
        relay.start()?;
    }

    let dlq = format!("{queue}.dlq");
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        let dead = amqp_depth(&dlq).await.unwrap_or(0) as usize;
        let left = published(&pool, &table).await? < committed.len() as i64;
        let queued = amqp_depth(&queue).await.unwrap_or(0);
        if !left && queued == 0 && sink.accepted().len() + dead >= committed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Redeliveries still in flight settle before the count is read.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let settled_duplicates = metric(
        consumer_port,
        "bosun_inbox_duplicates_total",
        &["consumer=\"load\""],
    );
    let relay_code = relay.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let code = consumer.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let dead = amqp_drain(&dlq, true).await?;
    let mut row = tally(
        plan.name,
        &ids,
        &committed,
        &sink.accepted(),
        &dead,
        Duration::ZERO,
    );
    row.note = note_with_exit(
        format!(
            "relay killed -9 at {kills:?} of {} rows published, restarted each time; {settled_duplicates:.0} relay duplicates reached the consumer and were settled by the inbox without the handler; relay's final SIGTERM exit {}",
            ids.len(),
            relay_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "by signal".into())
        ),
        code,
    );
    let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table} CASCADE"))
        .execute(&pool)
        .await;
    amqp_delete(&[
        queue.clone(),
        dlq,
        format!("{queue}.retry.200ms"),
        format!("{queue}.retry.500ms"),
    ])
    .await;
    Ok(row)
}
