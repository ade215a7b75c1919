//! Publish API cases.
//!
//! `publish-api`: the real `bosun` binary's `POST /v1/publish` (envelope form, each request a
//! new message id, immediate, confirmed before the answer) from 64 concurrent clients for a
//! few seconds: requests per second; beside it, `bosun publish` publishing one message
//! (process start, config load, connect, confirm), its wall time per call. Three rounds,
//! alternating the two, so a burst of load elsewhere does not land on one side only.
//!
//! `scheduled-burst`: 100,000 rows of a scheduled outbox all due in the same second (inserted
//! ahead of it, as `enqueue` and the API write them); the relay's lateness for each message,
//! from its due time to its arrival at a consumer of the target queue: p50, p99, max, and
//! when the last one arrived after the due second; with one relay (batch 500 and 2000) and
//! with two relays on the table.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use base64::Engine as _;
use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;

use super::util::{Bosun, bosun_bin, unique};

const PG_URL: &str = "postgres://postgres@127.0.0.1:5432/test";
const RABBIT_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";
const TOKEN: &str = "bench-publish-token-0123456789abcdef0123";
const CLIENTS: usize = 64;
const ROUND: Duration = Duration::from_secs(5);
const ROUNDS: usize = 3;
const CLI_CALLS: usize = 10;
const BURST: i64 = 100_000;

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

fn config(token_file: &str, admin_port: u16, table: &str, batch: i64) -> String {
    format!(
        "[service]\nname = \"bench-publish\"\nlog_format = \"json\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n\
         [http.admin]\nlisten = \"127.0.0.1:{admin_port}\"\ntoken_file = \"{token_file}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\nmax_connections = 80\n\
         [outboxes.later]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\n\
         destination = \"\"\nbatch = {batch}\nmigrate = true\npoll_interval = \"1h\"\n\
         [publish_api]\ndatabase = \"main\"\nscheduled = [\"later\"]\n\
         idempotency_table = \"{table}_requests\"\n"
    )
}

async fn declare(channel: &lapin::Channel, queue: &str) -> anyhow::Result<()> {
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

async fn drop_tables(pool: &sqlx::PgPool, table: &str) {
    for statement in [
        format!("DROP TABLE IF EXISTS {table} CASCADE"),
        format!("DROP TABLE IF EXISTS {table}_requests"),
        format!("DROP FUNCTION IF EXISTS {table}_notify()"),
        format!("DROP TABLE IF EXISTS {table}_sending"),
    ] {
        let _ = sqlx::query(&statement).execute(pool).await;
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let at = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[at.min(sorted.len() - 1)]
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(values, 0.5)
}

/// Requests answered 200 per second by `CLIENTS` clients for `ROUND`.
async fn api_round(base: &str, queue: &str) -> anyhow::Result<f64> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(CLIENTS)
        .build()?;
    let body = base64::engine::general_purpose::STANDARD.encode(br#"{"order": 42}"#);
    let stop = Instant::now() + ROUND;
    let started = Instant::now();
    let workers = (0..CLIENTS).map(|_| {
        let client = client.clone();
        let url = format!("{base}/v1/publish");
        let envelope = serde_json::json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
                                          "content_type": "application/json", "body": body});
        async move {
            let mut ok = 0u64;
            while Instant::now() < stop {
                let response = client
                    .post(&url)
                    .bearer_auth(TOKEN)
                    .json(&envelope)
                    .send()
                    .await?;
                anyhow::ensure!(
                    response.status().as_u16() == 200,
                    "publish API answered {}: {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
                ok += 1;
            }
            Ok::<u64, anyhow::Error>(ok)
        }
    });
    let mut total = 0;
    for result in futures::future::join_all(workers).await {
        total += result?;
    }
    Ok(total as f64 / started.elapsed().as_secs_f64())
}

/// Seconds per `bosun publish` of one message, `CLI_CALLS` calls.
fn cli_round(config: &std::path::Path, queue: &str) -> anyhow::Result<Vec<f64>> {
    let mut out = Vec::new();
    for _ in 0..CLI_CALLS {
        let started = Instant::now();
        let status = std::process::Command::new(bosun_bin())
            .args(["publish", "--allow-insecure-config", "--config"])
            .arg(config)
            .args([
                "--broker",
                "rabbit",
                "--exchange",
                "",
                "--routing-key",
                queue,
            ])
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "bosun publish failed");
        out.push(started.elapsed().as_secs_f64());
    }
    Ok(out)
}

pub async fn throughput() -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(PG_URL)
        .await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;
    let table = unique("bench_pubapi").to_lowercase();
    let port = free_port()?;
    let bosun = Bosun::start(&config(&token_file.to_string_lossy(), port, &table, 500))?;
    let base = format!("http://127.0.0.1:{port}");
    let connection = Connection::connect(RABBIT_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let queue = unique("bench_pubapi");
    declare(&channel, &queue).await?;
    // Ready when the API answers an authenticated request.
    let client = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = client
            .get(format!("{base}/v1/openapi.json"))
            .bearer_auth(TOKEN)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if ready {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the publish API did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    let mut rates = Vec::new();
    let mut calls = Vec::new();
    for _ in 0..ROUNDS {
        rates.push(api_round(&base, &queue).await?);
        let config = bosun.config_path().to_path_buf();
        let q = queue.clone();
        calls.extend(tokio::task::spawn_blocking(move || cli_round(&config, &q)).await??);
    }
    let rss = bosun.peak_rss_mib();
    drop(bosun);
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    drop_tables(&pool, &table).await;

    let rounds: Vec<String> = rates.iter().map(|r| format!("{r:.0}")).collect();
    let min_rate = rates.iter().copied().fold(f64::INFINITY, f64::min);
    let median_rate = median(&mut rates.clone());
    calls.sort_by(f64::total_cmp);
    Ok(format!(
        "publish API, {CLIENTS} clients, confirmed: median {median_rate:.0} requests/s, min {min_rate:.0} (rounds of {}s: {})\n\
         bosun publish, one message per process: p50 {:.0} ms, p95 {:.0} ms, min {:.0} ms ({} calls)\n\
         bosun peak RSS: {}",
        ROUND.as_secs(),
        rounds.join(", "),
        percentile(&calls, 0.5) * 1000.0,
        percentile(&calls, 0.95) * 1000.0,
        calls.first().copied().unwrap_or(f64::NAN) * 1000.0,
        calls.len(),
        rss.map(|r| format!("{r:.1} MiB"))
            .unwrap_or_else(|| "n/a".into()),
    ))
}

/// The `scheduled-burst` rounds: (batch, relays, concurrency of each). `BURST_ROUNDS` picks
/// others, e.g. `BURST_ROUNDS=2000x1x4,500x1x1` (batch x relays x concurrency).
fn burst_rounds() -> anyhow::Result<Vec<(i64, usize, usize)>> {
    let Ok(text) = std::env::var("BURST_ROUNDS") else {
        return Ok(vec![(500, 1, 1), (2000, 1, 1), (500, 2, 1), (2000, 1, 4)]);
    };
    text.split(',')
        .map(|round| {
            let parts: Vec<&str> = round.trim().split('x').collect();
            match parts.as_slice() {
                [batch, relays, concurrency] => {
                    Ok((batch.parse()?, relays.parse()?, concurrency.parse()?))
                }
                _ => anyhow::bail!("BURST_ROUNDS: {round:?} is not BATCHxRELAYSxCONCURRENCY"),
            }
        })
        .collect()
}

pub async fn scheduled_burst() -> anyhow::Result<String> {
    let mut out = Vec::new();
    for (batch, relays, concurrency) in burst_rounds()? {
        out.push(burst_round(batch, relays, concurrency).await?);
    }
    Ok(out.join("\n"))
}

async fn burst_round(batch: i64, relays: usize, concurrency: usize) -> anyhow::Result<String> {
    let pool = PgPoolOptions::new()
        .max_connections(4)
        .connect(PG_URL)
        .await?;
    let dir = tempfile::tempdir()?;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, TOKEN)?;
    let table = unique("bench_burst").to_lowercase();
    bosun::OutboxSchema::new(&table, &table)?
        .migrate(&pool)
        .await?;
    let connection = Connection::connect(RABBIT_URL, ConnectionProperties::default()).await?;
    let channel = connection.create_channel().await?;
    let queue = unique("bench_burst");
    declare(&channel, &queue).await?;

    let total = BURST as usize;
    let (arrivals, consuming) =
        super::util::record_arrivals(&channel, &queue, total, chrono::Utc::now).await?;

    let port = free_port()?;
    let mut text = config(&token_file.to_string_lossy(), port, &table, batch).replace(
        "batch = ",
        &format!("concurrency = {concurrency}\nbatch = "),
    );
    // More relays on the same table share its rows (SKIP LOCKED).
    for n in 1..relays {
        text.push_str(&format!(
            "[outboxes.later{n}]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\n\
             destination = \"\"\nconcurrency = {concurrency}\nbatch = {batch}\npoll_interval = \"1h\"\n"
        ));
    }
    let bosun = Bosun::start(&text)?;
    // Due at the start of a whole second far enough ahead for the insert and the start.
    let now = chrono::Utc::now();
    let due = chrono::DateTime::<chrono::Utc>::from_timestamp(now.timestamp() + 25, 0)
        .context("due time")?;
    let inserted = Instant::now();
    sqlx::query(&format!(
        "INSERT INTO {table} (destination, routing_key, payload, next_attempt_at)
         SELECT '', $1, convert_to((g - 1)::text, 'UTF8'), $2
         FROM generate_series(1, $3) g"
    ))
    .bind(&queue)
    .bind(due)
    .bind(BURST)
    .execute(&pool)
    .await?;
    sqlx::query(&format!("ANALYZE {table}"))
        .execute(&pool)
        .await?;
    let insert_secs = inserted.elapsed().as_secs_f64();
    anyhow::ensure!(
        chrono::Utc::now() < due,
        "the insert took past the due time"
    );
    let early_check = async {
        // Nothing may arrive before the due second.
        let until = (due - chrono::Utc::now()).to_std().unwrap_or_default();
        tokio::time::sleep(until.saturating_sub(Duration::from_millis(50))).await;
        arrivals
            .lock()
            .map(|a| a.iter().filter(|x| x.is_some()).count())
            .unwrap_or(0)
    };
    let early = early_check.await;
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let got = arrivals
            .lock()
            .map(|a| a.iter().filter(|x| x.is_some()).count())
            .unwrap_or(0);
        if got >= total || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rss = bosun.peak_rss_mib();
    drop(bosun);
    consuming.abort();
    let _ = channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    drop_tables(&pool, &table).await;

    let lateness: Vec<f64> = arrivals
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .iter()
        .flatten()
        .map(|at| (*at - due).num_microseconds().unwrap_or(i64::MAX) as f64 / 1e6)
        .collect();
    let mut sorted = lateness.clone();
    sorted.sort_by(f64::total_cmp);
    let before = sorted.iter().filter(|l| **l < 0.0).count();
    Ok(format!(
        "batch {batch}, {relays} relay(s), concurrency {concurrency}: {} of {total} arrived; before their due time: {before} (and {early} seen before it); \
         lateness min (first one) {:.0} ms, p50 {:.0} ms, p99 {:.0} ms, max (last one) {:.0} ms; insert took {insert_secs:.1} s; bosun peak RSS {}",
        sorted.len(),
        sorted.first().copied().unwrap_or(f64::NAN) * 1000.0,
        percentile(&sorted, 0.5) * 1000.0,
        percentile(&sorted, 0.99) * 1000.0,
        sorted.last().copied().unwrap_or(f64::NAN) * 1000.0,
        rss.map(|r| format!("{r:.1} MiB"))
            .unwrap_or_else(|| "n/a".into()),
    ))
}
