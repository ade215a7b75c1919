//! Dead-letter scenarios: what a processor takes in must end in its archive.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::scenarios::Plan;
use super::*;

/// Dead letters whose `bosun-error`, header values, header names and bodies carry NUL bytes
/// (an exec stderr tail or an HTTP body can): half on an amqp dead-letter queue, half on a
/// redis dead-letter stream, all archived by one table. Every one must end in the archive.
pub async fn nul_archive(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    use crate::support::amqp::OutgoingMessage;
    use bosun::handler::HeaderValue;

    let service = unique("rel_nul");
    let port = free_port();
    let queue = unique("rel_nul_q");
    let dlq = format!("{queue}.dlq");
    let stream = unique("rel_nul_s");
    let dlq_stream = format!("{stream}:dlq");
    let table = unique("rel_nul_archive");
    let config = format!(
        r#"[service]
name = "{service}"
shutdown_timeout = "20s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4

[dead_letters.amqp]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"
migrate = true

[dead_letters.redis]
source = "cache"
stream = "{dlq_stream}"
archive = "main"
table = "{table}"
migrate = true
"#
    );
    let (conn, ch) = {
        let conn =
            lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await?;
        let ch = conn.create_channel().await?;
        (conn, ch)
    };
    ch.queue_declare(
        dlq.as_str().into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await?;
    let mut daemon = Daemon::new(bin, &config, port)?;
    daemon.start()?;
    if !until(Duration::from_secs(30), || daemon.ready()).await {
        anyhow::bail!("bosun never became ready:\n{}", daemon.logs());
    }

    let ids = ids(plan.messages);
    let (to_amqp, to_redis) = ids.split_at(ids.len() / 2);
    let error = "exec exited 1; stderr: \0\0binary\0tail";
    let mut confirmed = HashSet::new();

    let publisher = crate::support::amqp::Publisher;
    let letters: Vec<OutgoingMessage> = to_amqp
        .iter()
        .map(|id| {
            let mut m = OutgoingMessage::new("", dlq.as_str(), format!("{id}\0body"));
            m.message_id = id.clone();
            for (k, v) in [
                ("bosun-error-kind", "permanent"),
                ("bosun-error", error),
                ("bosun-attempt", "3"),
                ("bosun-original-queue", queue.as_str()),
                ("x-note", "before\0after"),
            ] {
                m.headers
                    .insert(k.to_owned(), HeaderValue::String(v.to_owned()));
            }
            m
        })
        .collect();
    for (id, result) in to_amqp.iter().zip(publisher.publish_batch(&letters).await) {
        if result.is_ok() {
            confirmed.insert(id.clone());
        }
    }
    publisher.close().await;

    let client = redis::Client::open(REDIS_URL)?;
    let mut redis = client.get_multiplexed_async_connection().await?;
    for (i, id) in to_redis.iter().enumerate() {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(&dlq_stream)
            .arg("*")
            .arg("payload")
            .arg(format!("{id}\0body").as_bytes())
            .arg("message_id")
            .arg(id)
            .arg("bosun-orig-stream")
            .arg(&stream)
            .arg("bosun-error-kind")
            .arg("exhausted")
            .arg("bosun-error")
            .arg(error)
            .arg("bosun-attempt")
            .arg("5");
        if i % 10 == 0 {
            cmd.arg("name\0with nul").arg("v");
        }
        let added: redis::RedisResult<String> = cmd.query_async(&mut redis).await;
        if added.is_ok() {
            confirmed.insert(id.clone());
        }
    }

    let pool = sqlx::PgPool::connect(PG_URL).await?;
    let archived_ids = || async {
        sqlx::query_scalar::<_, Option<String>>(&format!("SELECT message_id FROM {table}"))
            .fetch_all(&pool)
            .await
            .map(|ids| ids.into_iter().flatten().collect::<Vec<String>>())
            .unwrap_or_default()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        if archived_ids().await.len() >= confirmed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let archived = archived_ids().await;
    let mut row = tally(
        plan.name,
        &ids,
        &confirmed,
        &HashMap::new(),
        &archived,
        Duration::ZERO,
    );
    // Archived rows whose error did not survive exactly (escaped and marked).
    let mangled: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {table} WHERE NOT (escaped @> ARRAY['error']) OR escaped IS NULL"
    ))
    .fetch_one(&pool)
    .await?;
    row.misplaced = usize::try_from(mangled).unwrap_or(usize::MAX);
    let pending = redis_pending(&dlq_stream, "bosun-dlq")
        .await
        .unwrap_or(u64::MAX);
    let left = amqp_depth(&dlq).await.unwrap_or(u32::MAX);
    row.note = format!(
        "every dead letter carries NUL bytes; archived {}, left pending {pending} (redis) and {left} (amqp); exit {code:?}",
        archived.len()
    );
    let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await;
    redis_delete(&[dlq_stream, stream]).await;
    amqp_delete(&[dlq]).await;
    drop(conn);
    Ok(row)
}
