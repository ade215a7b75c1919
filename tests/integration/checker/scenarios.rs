//! The scenarios: each drives bosun under load through one fault and returns its row.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::*;

pub mod amqp_contract;
pub mod downstream;
pub mod relay_inbox;

/// Which broker path a scenario exercises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path_ {
    Amqp,
    Redis,
    Outbox,
    /// Three relay processes on one `per_key` outbox table.
    OutboxPerKey,
    /// Dead letters straight into the processors' queue and stream.
    DeadLetters,
}

/// The fault injected while messages flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    None,
    /// kill -9 of bosun, then a restart.
    Kill,
    /// The daemon's broker (or database) connections closed, three times.
    CloseConnections,
    /// The broker restarted.
    BrokerRestart,
    /// SIGTERM, then a restart.
    Sigterm,
    /// SIGHUP with a changed configuration (another consumer added).
    Sighup,
    /// Bad input instead of a fault: amqp bodies of random bytes and huge non-UTF-8 header
    /// tables; outbox rows with unknown destinations and payloads over the broker's limit.
    BadInput,
    /// amqp: messages with a per-message TTL dead-lettered, nothing reading the dead-letter
    /// queue past their TTL.
    TtlDeadLetters,
    /// amqp: the quorum queue deleted and declared again while retry tiers' TTLs fire.
    QuorumRedeclared,
    /// amqp: the http handler's endpoint refuses connections for `seconds`, then recovers;
    /// `breaker`: the handler has a circuit breaker.
    DownstreamDown {
        seconds: u64,
        breaker: bool,
    },
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub name: &'static str,
    pub path: Path_,
    pub messages: usize,
    /// Messages per second the producer aims for.
    pub rate: u32,
    pub sink: SinkBehaviour,
    pub fault: Fault,
    /// The consumer claims each message id in a postgres inbox, and the sink completes the
    /// record in its own transaction before it counts a delivery (an exactly-once effect).
    pub inbox: bool,
}

/// The consumer lines and the `[inboxes.*]` table of a plan with an inbox (a short lease, so
/// a killed process's claims are taken over within the scenario), after pointing the sink at
/// the table; nothing without one.
async fn inbox_config(plan: &Plan, sink: &Sink) -> anyhow::Result<(String, String)> {
    if !plan.inbox {
        return Ok((String::new(), String::new()));
    }
    let table = unique("rel_inbox");
    sink.complete_in(&table).await?;
    Ok((
        "inbox = { store = \"ib\" }\n".to_owned(),
        format!(
            "\n[inboxes.ib]\nkind = \"postgres\"\ndatabase = \"main\"\ntable = \"{table}\"\nlease = \"3s\"\n"
        ),
    ))
}

/// Runs one plan against the `bosun` binary at `bin`.
pub async fn run(bin: &Path, plan: &Plan) -> Row {
    let started = Instant::now();
    let result = match plan.path {
        Path_::Amqp => match plan.fault {
            Fault::TtlDeadLetters => amqp_contract::ttl_dead_letters(bin, plan).await,
            Fault::QuorumRedeclared => amqp_contract::quorum_redeclared(bin, plan).await,
            Fault::DownstreamDown { seconds, breaker } => {
                downstream::downstream_down(bin, plan, Duration::from_secs(seconds), breaker).await
            }
            _ => amqp(bin, plan).await,
        },
        Path_::Redis => redis_stream(bin, plan).await,
        Path_::Outbox if plan.inbox => relay_inbox::relay_kill_with_inbox(bin, plan).await,
        Path_::Outbox => outbox(bin, plan).await,
        Path_::OutboxPerKey => outbox_per_key(bin, plan).await,
        Path_::DeadLetters => super::dead_letters::nul_archive(bin, plan).await,
    };
    match result {
        Ok(mut row) => {
            row.duration = started.elapsed();
            row
        }
        Err(e) => Row::skipped(plan.name, format!("{e:#}")),
    }
}

fn base_config(service: &str, port: u16, sink_url: &str, sink_timeout: &str) -> String {
    format!(
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

[handlers.sink]
kind = "http"
url = "{sink_url}"
timeout = "{sink_timeout}"
"#
    )
}

/// A `bosun run` on `config`, started and ready.
async fn ready_daemon(bin: &Path, config: &str, port: u16) -> anyhow::Result<Daemon> {
    let mut daemon = Daemon::new(bin, config, port)?;
    daemon.start()?;
    if !until(Duration::from_secs(20), || daemon.ready()).await {
        anyhow::bail!("bosun never became ready:\n{}", daemon.logs());
    }
    Ok(daemon)
}

/// Injects `fault` on `daemon`; `needle` finds its connections.
async fn inject(
    fault: Fault,
    path: Path_,
    daemon: &mut Daemon,
    needle: &str,
    reload_text: &str,
) -> anyhow::Result<String> {
    match fault {
        Fault::None
        | Fault::BadInput
        | Fault::TtlDeadLetters
        | Fault::QuorumRedeclared
        | Fault::DownstreamDown { .. } => Ok(String::new()),
        Fault::Kill => {
            daemon.stop_with(Signal::SIGKILL, Duration::from_secs(5))?;
            daemon.start()?;
            Ok("killed -9 and restarted".into())
        }
        Fault::Sigterm => {
            let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
            daemon.start()?;
            Ok(format!(
                "SIGTERM (exit {}) and restarted",
                code.unwrap_or(-1)
            ))
        }
        Fault::Sighup => {
            daemon.rewrite_config(reload_text)?;
            daemon.signal(Signal::SIGHUP)?;
            Ok("SIGHUP with a consumer added".into())
        }
        Fault::CloseConnections => {
            let mut closed = 0;
            for _ in 0..3 {
                closed += match path {
                    Path_::Amqp => {
                        let needle = needle.to_owned();
                        tokio::task::spawn_blocking(move || rabbit_close_connections(&needle))
                            .await??
                    }
                    Path_::Redis => redis_kill_clients(needle).await?,
                    Path_::Outbox | Path_::OutboxPerKey | Path_::DeadLetters => {
                        pg_terminate(needle).await?
                    }
                };
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            Ok(format!("{closed} connections closed"))
        }
        Fault::BrokerRestart => {
            match path {
                Path_::Redis => tokio::task::spawn_blocking(redis_restart).await??,
                _ => tokio::task::spawn_blocking(rabbit_restart).await??,
            }
            Ok("broker restarted".into())
        }
    }
}

async fn amqp(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let queue = unique("rel_q");
    let service = unique("rel");
    let port = free_port();
    let sink = Sink::start(plan.sink).await?;
    let (inbox, inboxes) = inbox_config(plan, &sink).await?;
    let consumer = format!(
        "\n[consumers.load]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{queue}\"\nprefetch = 50\nretry = {{ max_attempts = 3, tiers = [\"200ms\", \"500ms\"] }}\n\
         # the bad-input row sends a body at the broker's own limit, to be handled\n\
         max_message_size = \"128MiB\"\nmax_in_flight_bytes = \"8GiB\"\n{inbox}{inboxes}"
    );
    let config = format!("{}{consumer}", base_config(&service, port, &sink.url, "5s"));
    let extra_queue = unique("rel_extra");
    let reload_text = format!(
        "{config}\n[consumers.extra]\nsource = \"rabbit\"\nhandler = \"sink\"\nqueue = \"{extra_queue}\"\n"
    );
    let mut daemon = ready_daemon(bin, &config, port).await?;

    let ids = ids(plan.messages);
    let producer = {
        let (queue, ids, rate) = (queue.clone(), ids.clone(), plan.rate);
        let bad = plan.fault == Fault::BadInput;
        tokio::spawn(async move { amqp_produce_with(&queue, &ids, rate, bad).await })
    };
    tokio::time::sleep(fault_delay(plan)).await;
    let note = inject(plan.fault, plan.path, &mut daemon, &service, &reload_text).await?;
    let mut confirmed = producer.await??;
    let mut sent = ids.clone();
    let big = if plan.fault == Fault::BadInput {
        let big = BigBodies::send(&queue, &sink).await?;
        sent.extend([big.at_limit.clone(), big.over.clone()]);
        if big.at_limit_confirmed {
            confirmed.insert(big.at_limit.clone());
        }
        Some(big)
    } else {
        None
    };

    let dlq = format!("{queue}.dlq");
    let (code, dead) = settle_then_stop(
        &mut daemon,
        &sink,
        &dlq,
        confirmed.len(),
        Duration::from_secs(90),
    )
    .await?;
    let accepted = sink.accepted();
    let mut row = tally(
        plan.name,
        &sent,
        &confirmed,
        &accepted,
        &dead,
        Duration::ZERO,
    );
    let mut note = note;
    if let Some(big) = big {
        // Every bad body here belongs with the handler: none may be dead-lettered, the body
        // at the limit must be handled (after one retry), and the one over it refused.
        row.misplaced = dead.iter().collect::<HashSet<_>>().len()
            + usize::from(!accepted.contains_key(&big.at_limit))
            + usize::from(accepted.contains_key(&big.over) || big.over_refusal.is_none());
        let prefix = if note.is_empty() {
            String::new()
        } else {
            format!("{note}; ")
        };
        note = format!(
            "{}a {} B body (the broker's max) {}, handled after one retry; one of {} B refused at publish: {}",
            prefix,
            big.max,
            if big.at_limit_confirmed {
                "confirmed"
            } else {
                "NOT confirmed"
            },
            big.max + 1,
            big.over_refusal.as_deref().unwrap_or("accepted (!)")
        );
    }
    row.note = note_with_exit(note, code);
    amqp_delete(&[
        queue.clone(),
        dlq,
        format!("{queue}.retry.200ms"),
        format!("{queue}.retry.500ms"),
        extra_queue.clone(),
        format!("{extra_queue}.dlq"),
    ])
    .await;
    Ok(row)
}

/// Waits (up to `timeout`) until the sink accepted or `dlq` holds `expected` messages, stops
/// the daemon with SIGTERM and reads the dead-letter queue back: (exit code, dead letters).
async fn settle_then_stop(
    daemon: &mut Daemon,
    sink: &Sink,
    dlq: &str,
    expected: usize,
    timeout: Duration,
) -> anyhow::Result<(Option<i32>, Vec<String>)> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let dead = amqp_depth(dlq).await.unwrap_or(0) as usize;
        if sink.accepted().len() + dead >= expected {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    Ok((code, amqp_drain(dlq, true).await?))
}

/// The amqp bad-input row's two big bodies: one at the broker's `max_message_size`, which
/// must be handled (the sink fails its first delivery, so its retry copy is published too),
/// and one a byte over, which the broker must refuse at publish.
struct BigBodies {
    max: u64,
    at_limit: String,
    at_limit_confirmed: bool,
    over: String,
    /// The broker's error for the body over the limit; `None` if it was accepted.
    over_refusal: Option<String>,
}

impl BigBodies {
    async fn send(queue: &str, sink: &Sink) -> anyhow::Result<Self> {
        let max = tokio::task::spawn_blocking(rabbit_max_message_size).await??;
        let size = usize::try_from(max)?;
        let big = ids(2);
        sink.fail_once(&big[0]);
        let at_limit_confirmed = amqp_publish_sized(queue, &big[0], size).await?.is_ok();
        let over_refusal = amqp_publish_sized(queue, &big[1], size + 1).await?.err();
        Ok(Self {
            max,
            at_limit: big[0].clone(),
            at_limit_confirmed,
            over: big[1].clone(),
            over_refusal: over_refusal.map(|e| e.chars().take(160).collect()),
        })
    }
}

async fn redis_stream(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let stream = unique("rel_s");
    let service = unique("rel");
    let port = free_port();
    let sink = Sink::start(plan.sink).await?;
    let slow = !plan.sink.delay.is_zero();
    let (inbox, inboxes) = inbox_config(plan, &sink).await?;
    let consumer = format!(
        "\n[consumers.load]\nsource = \"cache\"\nhandler = \"sink\"\nstream = \"{stream}\"\ngroup = \"g\"\nconsumer = \"{service}\"\nbatch = 50\nblock = \"1s\"\nclaim_idle = \"{}\"\nclaim_interval = \"500ms\"\nretry = {{ max_attempts = 3, tiers = [\"200ms\", \"500ms\"] }}\n{inbox}{inboxes}",
        if slow { "1s" } else { "5s" }
    );
    let config = format!("{}{consumer}", base_config(&service, port, &sink.url, "5s"));
    let extra = unique("rel_extra");
    let reload_text = format!(
        "{config}\n[consumers.extra]\nsource = \"cache\"\nhandler = \"sink\"\nstream = \"{extra}\"\n"
    );
    let mut daemon = ready_daemon(bin, &config, port).await?;
    let mut ids = ids(plan.messages);
    let producer = {
        let (stream, ids, rate) = (stream.clone(), ids.clone(), plan.rate);
        tokio::spawn(async move { redis_produce(&stream, &ids, rate).await })
    };
    tokio::time::sleep(fault_delay(plan)).await;
    let note = inject(plan.fault, plan.path, &mut daemon, &service, &reload_text).await?;
    let mut confirmed = producer.await??;
    // Bad input: entries of 4,000 fields, over the consumer's default bound, amid the flow.
    let wide: Vec<String> = if plan.fault == Fault::BadInput {
        let wide: Vec<String> = (0..(plan.messages / 10).max(10))
            .map(|i| format!("wide-{stream}-{i:04}"))
            .collect();
        confirmed.extend(redis_produce_wide(&stream, &wide, 4000).await?);
        ids.extend(wide.iter().cloned());
        wide
    } else {
        Vec::new()
    };
    let dlq = format!("{stream}:dlq");
    let target = confirmed.len();
    let mut dead_now = 0usize;
    let deadline = Instant::now() + Duration::from_secs(90);
    while Instant::now() < deadline {
        dead_now = redis_read_all(&dlq).await.map(|d| d.len()).unwrap_or(0);
        let pending = redis_pending(&stream, "g").await.unwrap_or(u64::MAX);
        if sink.accepted().len() + dead_now >= target && pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let dead = redis_read_all(&dlq).await?;
    let mut row = tally(
        plan.name,
        &ids,
        &confirmed,
        &sink.accepted(),
        &dead,
        Duration::ZERO,
    );
    row.note = note_with_exit(note, code);
    if !wide.is_empty() {
        // Each wide entry ends in the dead-letter stream, never at the handler.
        let dead: HashSet<&String> = dead.iter().collect();
        let accepted = sink.accepted();
        row.misplaced = wide
            .iter()
            .filter(|id| !dead.contains(id) || accepted.contains_key(*id))
            .count();
        row.note = note_with_exit(
            format!(
                "{} entries of 4,000 fields must end in the dead-letter stream as invalid",
                wide.len()
            ),
            code,
        );
    }
    if slow {
        row.note.push_str(&format!(
            "; handler {} ms, claim_idle 1 s; {} requests",
            plan.sink.delay.as_millis(),
            sink.requests()
        ));
    }
    let _ = dead_now;
    redis_delete(&[
        stream.clone(),
        dlq,
        format!("{stream}:retry"),
        extra.clone(),
        format!("{extra}:dlq"),
        format!("{extra}:retry"),
    ])
    .await;
    Ok(row)
}

/// XADDs one entry per id with `fields` extra fields besides `payload` and `message_id`;
/// returns the ids Redis acknowledged.
async fn redis_produce_wide(
    stream: &str,
    ids: &[String],
    fields: usize,
) -> anyhow::Result<HashSet<String>> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let mut confirmed = HashSet::new();
    for id in ids {
        let mut cmd = redis::cmd("XADD");
        cmd.arg(stream)
            .arg("*")
            .arg("payload")
            .arg(id.as_str())
            .arg("message_id")
            .arg(id.as_str());
        for i in 0..fields {
            cmd.arg(format!("f{i}")).arg("v");
        }
        let _: String = cmd.query_async(&mut conn).await?;
        confirmed.insert(id.clone());
    }
    Ok(confirmed)
}

/// Terminates PostgreSQL backends whose application name contains `needle` or is bosun's.
async fn pg_terminate(_needle: &str) -> anyhow::Result<usize> {
    let pool = sqlx::PgPool::connect(PG_URL).await?;
    let n: i64 = sqlx::query_scalar("SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name LIKE 'bosun%' AND pid <> pg_backend_pid()")
        .fetch_one(&pool)
        .await?;
    Ok(n as usize)
}

async fn outbox(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let table = unique("rel_outbox");
    let queue = unique("rel_oq");
    let service = unique("rel");
    let port = free_port();
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(2)
        .connect(PG_URL)
        .await?;
    // The schema comes from bosun itself.
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
    amqp_declare(&queue).await?;

    let relay = format!(
        "\n[outboxes.load]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\ndestination = \"\"\nbatch = 100\npoll_interval = \"500ms\"\nmax_attempts = 2\nretry = {{ initial = \"100ms\", max = \"200ms\" }}\n"
    );
    let config = format!(
        "{}{relay}",
        base_config(&service, port, "http://127.0.0.1:9/", "1s")
    );
    let mut daemon = Daemon::new(bin, &config, port)?;
    daemon.start()?;

    let ids = ids(plan.messages);
    let producer = {
        let (pool, table, queue, ids, rate) = (
            pool.clone(),
            table.clone(),
            queue.clone(),
            ids.clone(),
            plan.rate,
        );
        let bad = if plan.fault == Fault::BadInput {
            Some(tokio::task::spawn_blocking(rabbit_max_message_size).await??)
        } else {
            None
        };
        tokio::spawn(async move { outbox_produce(&pool, &table, &queue, &ids, rate, bad).await })
    };
    tokio::time::sleep(fault_delay(plan)).await;
    let note = inject(plan.fault, plan.path, &mut daemon, &service, &config).await?;
    let (committed, must_fail) = producer.await??;
    let mut received: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        received.extend(amqp_drain(&queue, false).await?);
        let distinct: HashSet<&String> = received.iter().collect();
        let failed: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT {FAILED_ID} FROM {table} WHERE failed_at IS NOT NULL"
        ))
        .fetch_all(&pool)
        .await?;
        let settled: HashSet<&String> = distinct.iter().copied().chain(failed.iter()).collect();
        if settled.len() >= committed.len() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let code = daemon.stop_with(Signal::SIGTERM, Duration::from_secs(30))?;
    let mut accepted: HashMap<String, u32> = HashMap::new();
    for id in received {
        *accepted.entry(id).or_default() += 1;
    }
    let failed: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT {FAILED_ID} FROM {table} WHERE failed_at IS NOT NULL"
    ))
    .fetch_all(&pool)
    .await?;
    let mut row = tally(
        plan.name,
        &ids,
        &committed,
        &accepted,
        &failed,
        Duration::ZERO,
    );
    if plan.fault == Fault::BadInput {
        // Exactly the bad rows end failed; every other row is published.
        let failed: HashSet<&String> = failed.iter().collect();
        let expected: HashSet<&String> = must_fail.keys().collect();
        row.misplaced = failed.symmetric_difference(&expected).count();
        let reasons: Vec<String> = sqlx::query_scalar(&format!(
            "SELECT DISTINCT regexp_replace(last_error, '[0-9a-z_]*no_such_exchange[0-9a-z_]*', 'no_such_exchange_…') FROM {table} WHERE failed_at IS NOT NULL"
        ))
        .fetch_all(&pool)
        .await?;
        let unknown = must_fail
            .values()
            .filter(|k| **k == BadRow::UnknownExchange)
            .count();
        let headers = must_fail
            .values()
            .filter(|k| **k == BadRow::Headers)
            .count();
        let oversized = must_fail.len() - unknown - headers;
        let note_text = format!(
            "{unknown} rows to a missing exchange, {oversized} over the broker's max message size and {headers} with unusable headers (200 deep, 1e400, a 200 KB value) must end failed; last_error: {}",
            reasons.join(" / ").replace('|', "/")
        );
        row.note = note_with_exit(note_text, code);
    } else {
        row.note = note_with_exit(note, code);
    }
    let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table} CASCADE"))
        .execute(&pool)
        .await;
    amqp_delete(&[queue]).await;
    Ok(row)
}

async fn amqp_declare(queue: &str) -> anyhow::Result<()> {
    let conn =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The id of a failed outbox row: its payload up to the first space (oversized payloads are
/// the id, a space, then padding).
const FAILED_ID: &str =
    "split_part(convert_from(substring(payload from 1 for 200), 'UTF8'), ' ', 1)";

/// Why a bad outbox row must end failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BadRow {
    UnknownExchange,
    Oversized,
    /// `headers` nested 200 deep, holding `1e400`, or a 200 KB value.
    Headers,
}

/// Inserts one outbox row per id in small committed transactions, `rate` per second;
/// returns the ids whose transaction committed, and the bad rows that must end failed.
///
/// With `bad` (the broker's max message size), one row in a hundred names an exchange that
/// does not exist, one in three hundred has a payload a byte over the broker's limit, and one
/// in ten has a NULL destination (the relay's default, "", applies); three in three hundred
/// have headers the relay must refuse (nested 200 deep, `1e400`, a 200 KB value).
async fn outbox_produce(
    pool: &sqlx::PgPool,
    table: &str,
    queue: &str,
    ids: &[String],
    rate: u32,
    bad: Option<u64>,
) -> anyhow::Result<(HashSet<String>, HashMap<String, BadRow>)> {
    let mut committed = HashSet::new();
    let mut must_fail = HashMap::new();
    let chunk = (rate as usize / 20).max(1);
    let nowhere = unique("no_such_exchange");
    for (g, group) in ids.chunks(chunk).enumerate() {
        let mut tx = pool.begin().await?;
        let mut failing = Vec::new();
        for (i, id) in group.iter().enumerate() {
            let n = g * chunk + i;
            let mut payload = id.as_bytes().to_vec();
            let headers = match bad {
                Some(_) if n % 300 == 100 => {
                    format!("{{\"a\": {}1{}}}", "[".repeat(199), "]".repeat(199))
                }
                Some(_) if n % 300 == 200 => "{\"n\": 1e400}".to_owned(),
                Some(_) if n % 300 == 230 => format!("{{\"v\": \"{}\"}}", "x".repeat(200 * 1024)),
                _ => "{}".to_owned(),
            };
            if headers.len() > 2 {
                failing.push((id.clone(), BadRow::Headers));
            }
            let destination: Option<&str> = match bad {
                Some(max) if n % 300 == 150 => {
                    payload.push(b' ');
                    payload.resize(usize::try_from(max)? + 1, b'x');
                    failing.push((id.clone(), BadRow::Oversized));
                    Some("")
                }
                Some(_) if n % 100 == 50 => {
                    failing.push((id.clone(), BadRow::UnknownExchange));
                    Some(nowhere.as_str())
                }
                Some(_) if n % 10 == 5 => None,
                _ => Some(""),
            };
            sqlx::query(&format!("INSERT INTO {table} (destination, routing_key, payload, content_type, headers) VALUES ($3, $1, $2, 'text/plain', $4::jsonb)"))
                .bind(queue)
                .bind(payload)
                .bind(destination)
                .bind(headers)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        committed.extend(group.iter().cloned());
        must_fail.extend(failing);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((committed, must_fail))
}

fn fault_delay(plan: &Plan) -> Duration {
    Duration::from_secs_f64(plan.messages as f64 / plan.rate.max(1) as f64 * 0.4)
}

fn note_with_exit(note: String, code: Option<i32>) -> String {
    let exit = format!(
        "final SIGTERM exit {}",
        code.map(|c| c.to_string())
            .unwrap_or_else(|| "by signal".into())
    );
    if note.is_empty() {
        exit
    } else {
        format!("{note}; {exit}")
    }
}

/// Keys the per-key scenario spreads its rows over.
const PER_KEY_KEYS: usize = 50;
/// Concurrent writers of the per-key scenario.
const PER_KEY_WRITERS: usize = 8;

/// Three `bosun` processes relaying one `per_key` table while writers hold their
/// transactions open for random times (so rows of a key commit out of id order), and one
/// relay is killed with SIGKILL and not restarted. Beyond lost and unexpected, `misplaced`
/// counts deliveries that went back in their key's order: a row arriving after a later row of
/// its key (in `(insert_xid, id)` order, the order bosun promises) had arrived.
async fn outbox_per_key(bin: &Path, plan: &Plan) -> anyhow::Result<Row> {
    let table = unique("rel_perkey");
    let queue = unique("rel_pkq");
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(PER_KEY_WRITERS as u32 + 2)
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
    amqp_declare(&queue).await?;

    let mut relays = Vec::new();
    for _ in 0..3 {
        let port = free_port();
        let service = unique("rel_pk");
        let config = format!(
            "{}\n[outboxes.keyed]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\ndestination = \"\"\nordering = \"per_key\"\nbatch = 20\npoll_interval = \"200ms\"\n",
            base_config(&service, port, "http://127.0.0.1:9/", "1s")
        );
        relays.push(ready_daemon(bin, &config, port).await?);
    }

    let ids = ids(plan.messages);
    let mut writers = Vec::new();
    let per_writer = ids.len().div_ceil(PER_KEY_WRITERS);
    // Each writer's pause between transactions, so together they offer about `rate`.
    let pause_ms = (PER_KEY_WRITERS as u64 * 2 * 1000 / u64::from(plan.rate.max(1))).max(1);
    for chunk in ids.chunks(per_writer) {
        let (pool, table, queue, chunk) =
            (pool.clone(), table.clone(), queue.clone(), chunk.to_vec());
        writers.push(tokio::spawn(async move {
            per_key_write(&pool, &table, &queue, &chunk, pause_ms).await
        }));
    }
    tokio::time::sleep(fault_delay(plan)).await;
    relays[0].stop_with(Signal::SIGKILL, Duration::from_secs(5))?;
    let mut committed = HashSet::new();
    for writer in writers {
        committed.extend(writer.await??);
    }

    let mut received: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        received.extend(amqp_drain(&queue, false).await?);
        let distinct: HashSet<&String> = received.iter().collect();
        if committed.iter().all(|id| distinct.contains(id)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut codes = Vec::new();
    for relay in relays.iter_mut().skip(1) {
        codes.push(relay.stop_with(Signal::SIGTERM, Duration::from_secs(30))?);
    }

    // Each row's place in its key, in the order bosun promises.
    let order: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT convert_from(payload, 'UTF8'), partition_key FROM {table}
         ORDER BY partition_key, insert_xid, id"
    ))
    .fetch_all(&pool)
    .await?;
    let mut place: HashMap<String, (String, usize)> = HashMap::new();
    let mut next: HashMap<String, usize> = HashMap::new();
    for (id, key) in order {
        let n = next.entry(key.clone()).or_default();
        place.insert(id, (key, *n));
        *n += 1;
    }
    let mut furthest: HashMap<&str, usize> = HashMap::new();
    let mut went_back = 0;
    for id in &received {
        let Some((key, n)) = place.get(id) else {
            continue;
        };
        let seen = furthest.entry(key.as_str()).or_insert(*n);
        if *n < *seen {
            went_back += 1;
        }
        *seen = (*seen).max(*n);
    }
    let failed: Vec<String> = sqlx::query_scalar(&format!(
        "SELECT convert_from(payload, 'UTF8') FROM {table} WHERE failed_at IS NOT NULL"
    ))
    .fetch_all(&pool)
    .await?;
    let mut accepted: HashMap<String, u32> = HashMap::new();
    for id in received {
        *accepted.entry(id).or_default() += 1;
    }
    let mut row = tally(
        plan.name,
        &ids,
        &committed,
        &accepted,
        &failed,
        Duration::ZERO,
    );
    row.misplaced = went_back;
    let keys = next.len();
    row.note = format!(
        "{keys} keys, {PER_KEY_WRITERS} writers holding transactions open 0-60 ms, 3 relays, relay 1 killed -9 and not restarted; misplaced = deliveries behind a later row of their key ({went_back}); final SIGTERM exits {codes:?}"
    );
    let _ = sqlx::raw_sql(&format!("DROP TABLE IF EXISTS {table} CASCADE"))
        .execute(&pool)
        .await;
    amqp_delete(&[queue]).await;
    Ok(row)
}

/// Writes `ids` as keyed outbox rows, one to three per transaction, each transaction held
/// open 0 to 60 ms after its inserts; returns the ids whose transaction committed.
async fn per_key_write(
    pool: &sqlx::PgPool,
    table: &str,
    queue: &str,
    ids: &[String],
    pause_ms: u64,
) -> anyhow::Result<HashSet<String>> {
    let mut committed = HashSet::new();
    let mut rest = ids;
    while !rest.is_empty() {
        let take = rand::random_range(1..=3usize).min(rest.len());
        let (group, tail) = rest.split_at(take);
        rest = tail;
        let mut tx = pool.begin().await?;
        for id in group {
            let key = format!("key-{:02}", rand::random_range(0..PER_KEY_KEYS));
            sqlx::query(&format!(
                "INSERT INTO {table} (destination, routing_key, partition_key, payload) VALUES ('', $1, $2, $3)"
            ))
            .bind(queue)
            .bind(key)
            .bind(id.as_bytes())
            .execute(&mut *tx)
            .await?;
        }
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=60u64))).await;
        tx.commit().await?;
        committed.extend(group.iter().cloned());
        tokio::time::sleep(Duration::from_millis(rand::random_range(0..=pause_ms))).await;
    }
    Ok(committed)
}
