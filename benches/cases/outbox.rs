//! Outbox relay cases.
//!
//! `outbox`: 50,000 rows pre-inserted; how fast the real `bosun` binary drains them onto a
//! RabbitMQ queue, against a bare loop doing the least the same work needs (claim 500 with
//! SKIP LOCKED, publish with confirms, one UPDATE, commit).
//!
//! `outbox-latency`: rows committed at 1,000/s by separate transactions, the relay woken by
//! NOTIFY (poll interval 60 s); latency from the inserting client's commit to arrival at a
//! consumer of the target queue.
//!
//! `outbox-one-key`: 10,000 rows of one `partition_key` pre-inserted, relayed with
//! `ordering = "per_key"`, so one row is in flight at a time; against a bare loop that does
//! the same: claim 500 rows of the key, publish each after the one before it was confirmed,
//! one UPDATE, commit.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use sqlx::postgres::{PgConnection, PgPool, PgPoolOptions};
use sqlx::{Connection as _, Row as _};

use super::util::{Bosun, peak_rss_mib, unique};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const ROWS: i64 = 50_000;
const ROUNDS: i64 = 2;
const BATCH: i64 = 500;
const LATENCY_RATE: u64 = 1_000;
const LATENCY_SECONDS: u64 = 10;
const ONE_KEY_ROWS: i64 = 10_000;

/// A benchmark table, dropped when the case ends.
struct Table {
    name: String,
    pool: PgPool,
}

impl Table {
    async fn new(pool: &PgPool, prefix: &str) -> anyhow::Result<Self> {
        let name = unique(prefix).to_lowercase();
        bosun::OutboxSchema::new(&name, &name)?
            .migrate(pool)
            .await?;
        Ok(Self {
            name,
            pool: pool.clone(),
        })
    }

    async fn fill(&self, queue: &str, rows: i64) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (destination, routing_key, payload, headers, content_type)
             SELECT '', $1, convert_to('{{\"order\": ' || g || ', \"status\": \"paid\"}}', 'UTF8'),
                    '{{\"tenant\": \"acme\"}}'::jsonb, 'application/json'
             FROM generate_series(1, $2) g",
            self.name
        ))
        .bind(queue)
        .bind(rows)
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!("ANALYZE {}", self.name))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// `rows` rows of one partition key, numbered in their payload.
    async fn fill_one_key(&self, queue: &str, rows: i64) -> anyhow::Result<()> {
        sqlx::query(&format!(
            "INSERT INTO {} (destination, routing_key, partition_key, payload)
             SELECT '', $1, 'the-key', convert_to(g::text, 'UTF8')
             FROM generate_series(1, $2) g",
            self.name
        ))
        .bind(queue)
        .bind(rows)
        .execute(&self.pool)
        .await?;
        sqlx::query(&format!("ANALYZE {}", self.name))
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn pending(&self) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {} WHERE published_at IS NULL",
            self.name
        ))
        .fetch_one(&self.pool)
        .await?)
    }

    async fn drop_table(self) {
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {} CASCADE", self.name))
            .execute(&self.pool)
            .await;
        let _ = sqlx::query(&format!("DROP FUNCTION IF EXISTS {}_notify()", self.name))
            .execute(&self.pool)
            .await;
        let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}_sending", self.name))
            .execute(&self.pool)
            .await;
    }
}

async fn amqp() -> anyhow::Result<(Connection, Channel)> {
    let connection = Connection::connect(RABBIT_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    Ok((connection, channel))
}

async fn declare(channel: &Channel, queue: &str) -> anyhow::Result<()> {
    channel
        .queue_declare(
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

fn config(table: &str, queue_exchange: &str, poll: &str) -> String {
    format!(
        "[service]\nname = \"bench-outbox\"\nlog_format = \"json\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\n\
         [outboxes.bench]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\n\
         destination = \"{queue_exchange}\"\nbatch = {BATCH}\npoll_interval = \"{poll}\"\n"
    )
}

pub async fn drain() -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(PG_URL)
        .await?;
    // Alternating rounds, so a burst of load from elsewhere on the machine does not land on
    // one side only; each side's rate is its rows over its total time.
    let mut bare_secs = 0.0;
    let mut bosun_secs = 0.0;
    let mut rounds = Vec::new();
    let mut rss: Option<f64> = None;
    for _ in 0..ROUNDS {
        let bare = bare_round(&pool).await?;
        let (bosun, round_rss) = bosun_round(&pool).await?;
        rss = match (rss, round_rss) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        bare_secs += bare;
        bosun_secs += bosun;
        rounds.push(format!(
            "{:.0}/{:.0}",
            ROWS as f64 / bosun,
            ROWS as f64 / bare
        ));
    }
    let total = (ROWS * ROUNDS) as f64;
    Ok(format!(
        "{}\n(rows {ROWS} per run, batch {BATCH}, {ROUNDS} alternating rounds, bosun/bare rows/s per round: {}; target ratio 0.8)",
        super::util::comparison("rows", total / bosun_secs, total / bare_secs, rss),
        rounds.join(", ")
    ))
}

/// Seconds the bare loop takes to drain a fresh table.
async fn bare_round(pool: &PgPool) -> anyhow::Result<f64> {
    let (_conn, channel) = amqp().await?;
    let table = Table::new(pool, "bench_outbox_bare").await?;
    let queue = unique("bench_outbox_bare");
    declare(&channel, &queue).await?;
    table.fill(&queue, ROWS).await?;
    let secs = bare_loop(&table.name).await;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    table.drop_table().await;
    secs
}

/// Seconds the `bosun` binary takes to drain a fresh table, and its peak RSS.
async fn bosun_round(pool: &PgPool) -> anyhow::Result<(f64, Option<f64>)> {
    let (_conn, channel) = amqp().await?;
    let table = Table::new(pool, "bench_outbox").await?;
    let queue = unique("bench_outbox");
    declare(&channel, &queue).await?;
    table.fill(&queue, ROWS).await?;
    let bosun = Bosun::start(&config(&table.name, "", "1s"))?;
    // Timed from the first row out to the last, so the binary's start is not counted.
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let pending = table.pending().await?;
        if started.is_none() && pending < ROWS {
            started = Some(Instant::now());
        }
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bosun did not drain the table ({pending} left)"
        );
        // The count scans the pending rows: asked 100 times a second it took a good part of
        // PostgreSQL's CPU from the relay it measures (2 cores). Every 100 ms costs little and
        // blurs the start and the end by at most 0.1 s each, over rounds of about 8 s.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or_default();
    let rss = bosun.peak_rss_mib();
    drop(bosun);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    table.drop_table().await;
    Ok((secs.max(1e-9), rss))
}

/// Claim, publish with confirms pipelined, one UPDATE, commit; until the table is empty.
/// Returns the seconds it took.
async fn bare_loop(table: &str) -> anyhow::Result<f64> {
    let mut db = PgConnection::connect(PG_URL).await?;
    let (_conn, channel) = amqp().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let claim = format!(
        "SELECT id, message_id, destination, routing_key, payload, content_type FROM {table}
         WHERE published_at IS NULL AND failed_at IS NULL AND next_attempt_at <= now()
         ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED"
    );
    let mark = format!("UPDATE {table} SET published_at = now() WHERE id = ANY($1)");
    let started = Instant::now();
    let mut total = 0usize;
    loop {
        let mut tx = db.begin().await?;
        let rows = sqlx::query(&claim).bind(BATCH).fetch_all(&mut *tx).await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        let mut confirms = Vec::with_capacity(rows.len());
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let id: i64 = row.try_get("id")?;
            let message_id: uuid::Uuid = row.try_get("message_id")?;
            let destination: Option<String> = row.try_get("destination")?;
            let routing_key: String = row.try_get("routing_key")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            let properties = BasicProperties::default()
                .with_message_id(message_id.to_string().into())
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    destination.unwrap_or_default().as_str().into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload,
                    properties,
                )
                .await?;
            confirms.push(confirm);
            ids.push(id);
        }
        for confirm in confirms {
            let confirmation = confirm.await?;
            anyhow::ensure!(confirmation.is_ack(), "bare loop: broker did not ack");
        }
        sqlx::query(&mark).bind(&ids).execute(&mut *tx).await?;
        tx.commit().await?;
        total += rows.len();
    }
    anyhow::ensure!(total as i64 == ROWS, "bare loop published {total} rows");
    Ok(started.elapsed().as_secs_f64().max(1e-9))
}

pub async fn latency() -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(8)
        .connect(PG_URL)
        .await?;
    let table = Table::new(&pool, "bench_outbox_latency").await?;
    let queue = unique("bench_outbox_latency");
    let (_conn, channel) = amqp().await?;
    declare(&channel, &queue).await?;
    let total = (LATENCY_RATE * LATENCY_SECONDS) as usize;

    // Arrival time per row, indexed by the sequence number in the payload.
    let (arrivals, consuming) =
        super::util::record_arrivals(&channel, &queue, total, Instant::now).await?;

    let bosun = Bosun::start(&config(&table.name, "", "60s"))?;
    // Wait for the relay to be up: one row through before measuring.
    sqlx::query(&format!(
        "INSERT INTO {} (routing_key, payload) VALUES ($1, 'warm-up')",
        table.name
    ))
    .bind(&queue)
    .execute(&pool)
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while table.pending().await? > 0 {
        anyhow::ensure!(Instant::now() < deadline, "bosun did not start relaying");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Writers each committing one row per transaction, together at LATENCY_RATE: one
    // connection alone cannot commit 1,000 times a second on this machine.
    const WRITERS: usize = 16;
    let commits: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; total]));
    let mut writers = Vec::new();
    for w in 0..WRITERS {
        let pool = pool.clone();
        let commits = commits.clone();
        let insert = format!(
            "INSERT INTO {} (routing_key, payload) VALUES ($1, $2)",
            table.name
        );
        let queue = queue.clone();
        writers.push(tokio::spawn(async move {
            let period = Duration::from_micros(1_000_000 * WRITERS as u64 / LATENCY_RATE);
            let mut tick = tokio::time::interval(period);
            let mut conn = pool.acquire().await?;
            for seq in (w..total).step_by(WRITERS) {
                tick.tick().await;
                sqlx::query(&insert)
                    .bind(&queue)
                    .bind(seq.to_string().into_bytes())
                    .execute(&mut *conn)
                    .await?;
                let committed = Instant::now();
                if let Ok(mut commits) = commits.lock()
                    && let Some(slot) = commits.get_mut(seq)
                {
                    *slot = Some(committed);
                }
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    let writing = Instant::now();
    for writer in writers {
        writer.await.context("writer task")??;
    }
    let write_secs = writing.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let arrived = arrivals
            .lock()
            .map(|a| a.iter().filter(|t| t.is_some()).count())
            .unwrap_or(0);
        if arrived == total {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {arrived} of {total} rows arrived"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss = bosun.child.id();
    let rss = peak_rss_mib(rss);
    drop(bosun);
    consuming.abort();

    let commits = commits.lock().map(|c| c.clone()).unwrap_or_default();
    let arrivals = arrivals.lock().map(|a| a.clone()).unwrap_or_default();
    let mut latencies: Vec<Duration> = commits
        .iter()
        .zip(arrivals.iter())
        .filter_map(|(c, a)| Some(a.as_ref()?.saturating_duration_since(*c.as_ref()?)))
        .collect();
    latencies.sort();
    let pick = |q: f64| -> Duration {
        let i = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies.get(i).copied().unwrap_or_default()
    };
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    table.drop_table().await;
    Ok(format!(
        "rows: {} at {:.0}/s offered ({} writers, one row per transaction), poll interval 60s\n\
         commit-to-consumer latency: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
         bosun peak RSS: {}",
        latencies.len(),
        total as f64 / write_secs,
        WRITERS,
        ms(pick(0.50)),
        ms(pick(0.99)),
        ms(pick(1.0)),
        rss.map(|r| format!("{r:.1} MiB"))
            .unwrap_or_else(|| "n/a".into()),
    ))
}

pub async fn one_key() -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(PG_URL)
        .await?;
    let bare = one_key_bare(&pool).await?;
    let (bosun, rss) = one_key_bosun(&pool).await?;
    Ok(format!(
        "{}\n(rows {ONE_KEY_ROWS} of one partition key, ordering per_key, poll_interval 1s; target 500 rows/s)",
        super::util::comparison(
            "rows",
            ONE_KEY_ROWS as f64 / bosun,
            ONE_KEY_ROWS as f64 / bare,
            rss
        )
    ))
}

/// Seconds the `bosun` binary takes to drain one key's backlog, and its peak RSS.
async fn one_key_bosun(pool: &PgPool) -> anyhow::Result<(f64, Option<f64>)> {
    let (_conn, channel) = amqp().await?;
    let table = Table::new(pool, "bench_outbox_key").await?;
    let queue = unique("bench_outbox_key");
    declare(&channel, &queue).await?;
    table.fill_one_key(&queue, ONE_KEY_ROWS).await?;
    let text = format!("{}ordering = \"per_key\"\n", config(&table.name, "", "1s"));
    let bosun = Bosun::start(&text)?;
    let mut started: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let pending = table.pending().await?;
        if started.is_none() && pending < ONE_KEY_ROWS {
            started = Some(Instant::now());
        }
        if pending == 0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bosun did not drain the key ({pending} left)"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let secs = started
        .map(|s| s.elapsed().as_secs_f64())
        .unwrap_or_default();
    let rss = bosun.peak_rss_mib();
    drop(bosun);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    table.drop_table().await;
    Ok((secs.max(1e-9), rss))
}

/// Seconds a bare loop takes to drain one key: up to `BATCH` rows of the key per
/// transaction, each published only after the one before it was confirmed.
async fn one_key_bare(pool: &PgPool) -> anyhow::Result<f64> {
    let (_conn, channel) = amqp().await?;
    let table = Table::new(pool, "bench_outbox_key_bare").await?;
    let queue = unique("bench_outbox_key_bare");
    declare(&channel, &queue).await?;
    table.fill_one_key(&queue, ONE_KEY_ROWS).await?;
    let mut db = PgConnection::connect(PG_URL).await?;
    let (_publishing, publisher) = amqp().await?;
    publisher
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let claim = format!(
        "SELECT id, routing_key, payload FROM {} WHERE published_at IS NULL
         ORDER BY id LIMIT {BATCH} FOR UPDATE SKIP LOCKED",
        table.name
    );
    let mark = format!(
        "UPDATE {} SET published_at = now() WHERE id = ANY($1)",
        table.name
    );
    let started = Instant::now();
    let mut total = 0i64;
    loop {
        let mut tx = db.begin().await?;
        let rows = sqlx::query(&claim).fetch_all(&mut *tx).await?;
        if rows.is_empty() {
            tx.commit().await?;
            break;
        }
        let mut ids = Vec::with_capacity(rows.len());
        for row in &rows {
            let routing_key: String = row.try_get("routing_key")?;
            let payload: Vec<u8> = row.try_get("payload")?;
            let confirmation = publisher
                .basic_publish(
                    "".into(),
                    routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?
                .await?;
            anyhow::ensure!(confirmation.is_ack(), "bare loop: broker did not ack");
            ids.push(row.try_get::<i64, _>("id")?);
        }
        sqlx::query(&mark).bind(&ids).execute(&mut *tx).await?;
        tx.commit().await?;
        total += i64::try_from(ids.len())?;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    anyhow::ensure!(total == ONE_KEY_ROWS, "bare loop published {total} rows");
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    table.drop_table().await;
    Ok(secs)
}
