//! `redis`: 200,000 entries pre-loaded in a stream; bosun (noop handler) drains them through
//! a consumer group, against a bare loop (XREADGROUP COUNT 1000 + one XACK per batch) on an
//! identical stream.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use redis::Value;
use redis::aio::MultiplexedConnection;

use super::CaseFuture;
use super::util::{Bosun, comparison, unique};

const URL: &str = "redis://127.0.0.1:6379/";
const ENTRIES: usize = 200_000;

/// The entries a run drains: `ENTRIES`, or `BOSUN_BENCH_REDIS_ENTRIES` (a multiple of 1,000)
/// for a shorter run on a slow build.
pub(super) fn entries() -> usize {
    std::env::var("BOSUN_BENCH_REDIS_ENTRIES")
        .ok()
        .and_then(|n| n.parse().ok())
        .filter(|n: &usize| *n >= BATCH)
        .unwrap_or(ENTRIES)
}
const BATCH: usize = 1000;

pub fn case() -> CaseFuture {
    Box::pin(run())
}

pub(super) async fn connect() -> anyhow::Result<MultiplexedConnection> {
    let client = redis::Client::open(URL)?;
    let config =
        redis::AsyncConnectionConfig::new().set_response_timeout(Some(Duration::from_secs(30)));
    Ok(client
        .get_multiplexed_async_connection_with_config(&config)
        .await?)
}

/// Adds [`entries`] entries (a 100-byte payload and a message id) and returns the last id.
pub(super) async fn preload(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<String> {
    let payload = vec![b'x'; 100];
    let mut last = String::new();
    for chunk in 0..entries() / BATCH {
        let mut pipe = redis::pipe();
        for i in 0..BATCH {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(&payload)
                .arg("message_id")
                .arg(format!("m-{}", chunk * BATCH + i));
        }
        let ids: Vec<String> = pipe.query_async(conn).await?;
        last = ids.last().cloned().unwrap_or_default();
    }
    Ok(last)
}

async fn create_group(
    conn: &mut MultiplexedConnection,
    stream: &str,
    start: &str,
) -> anyhow::Result<()> {
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg("g")
        .arg(start)
        .arg("MKSTREAM")
        .query_async(conn)
        .await?;
    Ok(())
}

/// The ceiling: read 1000, ack those 1000 with one XACK, repeat.
async fn bare(conn: &mut MultiplexedConnection, stream: &str) -> anyhow::Result<f64> {
    create_group(conn, stream, "0").await?;
    let started = Instant::now();
    let mut done = 0usize;
    loop {
        let reply: Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("bare")
            .arg("COUNT")
            .arg(BATCH)
            .arg("STREAMS")
            .arg(stream)
            .arg(">")
            .query_async(conn)
            .await?;
        let ids = entry_ids(reply);
        if ids.is_empty() {
            break;
        }
        done += ids.len();
        let _: i64 = redis::cmd("XACK")
            .arg(stream)
            .arg("g")
            .arg(&ids)
            .query_async(conn)
            .await?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        done == entries(),
        "bare loop read {done} entries, expected {}",
        entries()
    );
    Ok(done as f64 / elapsed)
}

fn entry_ids(reply: Value) -> Vec<Vec<u8>> {
    let Value::Array(streams) = reply else {
        return Vec::new();
    };
    let mut ids = Vec::new();
    for stream in streams {
        let Value::Array(mut pair) = stream else {
            continue;
        };
        let Some(Value::Array(entries)) = pair.pop() else {
            continue;
        };
        for entry in entries {
            if let Value::Array(mut parts) = entry
                && !parts.is_empty()
                && let Value::BulkString(id) = parts.swap_remove(0)
            {
                ids.push(id);
            }
        }
    }
    ids
}

/// (pending count, last-delivered-id) of group `g`.
async fn group_state(
    conn: &mut MultiplexedConnection,
    stream: &str,
) -> anyhow::Result<(i64, String)> {
    let groups: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(stream)
        .query_async(conn)
        .await?;
    let group = groups.into_iter().next().context("group g is missing")?;
    let pending = match group.get("pending") {
        Some(Value::Int(n)) => *n,
        _ => -1,
    };
    let last = match group.get("last-delivered-id") {
        Some(Value::BulkString(b)) => String::from_utf8_lossy(b).into_owned(),
        Some(Value::SimpleString(s)) => s.clone(),
        _ => String::new(),
    };
    Ok((pending, last))
}

/// bosun drains the stream: the group starts at the end (nothing to read) until bosun is
/// reading, then is moved back to the start; the clock runs from that move until every
/// entry is delivered and acknowledged.
pub(super) async fn bosun(
    conn: &mut MultiplexedConnection,
    stream: &str,
    last_id: &str,
    handler_extra: &str,
) -> anyhow::Result<(f64, Option<f64>)> {
    let drained = bosun_with(conn, stream, last_id, handler_extra, "").await?;
    Ok((drained.rate, drained.rss))
}

/// [`bosun`], with `tail` after the consumer's lines (more of its keys, then other tables:
/// an inbox).
pub(super) async fn bosun_with(
    conn: &mut MultiplexedConnection,
    stream: &str,
    last_id: &str,
    handler_extra: &str,
    tail: &str,
) -> anyhow::Result<super::amqp::Drained> {
    create_group(conn, stream, "$").await?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = format!(
        "[service]\nshutdown_timeout = \"10s\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [brokers.cache]\nkind = \"redis\"\nurl = \"{URL}\"\n\
         [handlers.noop]\nkind = \"noop\"\n{handler_extra}\n\
         [consumers.bench]\nsource = \"cache\"\nhandler = \"noop\"\nstream = \"{stream}\"\ngroup = \"g\"\nconsumer = \"bosun-bench\"\n\
         batch = {BATCH}\nblock = \"20ms\"\n{tail}\n"
    );
    let bosun = Bosun::start(&config)?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let consumers: Vec<std::collections::HashMap<String, Value>> = redis::cmd("XINFO")
            .arg("CONSUMERS")
            .arg(stream)
            .arg("g")
            .query_async(conn)
            .await?;
        if !consumers.is_empty() {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "bosun did not start reading");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let started = Instant::now();
    let () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(stream)
        .arg("g")
        .arg("0")
        .query_async(conn)
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (pending, last) = group_state(conn, stream).await?;
        if pending == 0 && last == last_id {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "bosun did not drain the stream (pending {pending}, last {last})"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    Ok(super::amqp::Drained {
        rate: entries() as f64 / elapsed,
        rss: bosun.peak_rss_mib(),
        metrics: super::amqp::metrics_text(port).unwrap_or_default(),
    })
}

async fn run() -> anyhow::Result<String> {
    let mut conn = connect().await?;
    let bare_stream = unique("bench_bare");
    let bosun_stream = unique("bench_bosun");
    preload(&mut conn, &bare_stream).await?;
    let bare_rate = bare(&mut conn, &bare_stream).await;
    let last_id = preload(&mut conn, &bosun_stream).await?;
    let bosun_rate = bosun(&mut conn, &bosun_stream, &last_id, "").await;
    let _: () = redis::cmd("DEL")
        .arg(&bare_stream)
        .arg(&bosun_stream)
        .arg(format!("{bosun_stream}:retry"))
        .arg(format!("{bosun_stream}:dlq"))
        .query_async(&mut conn)
        .await?;
    let bare_rate = bare_rate?;
    let (bosun_rate, rss) = bosun_rate?;
    Ok(format!(
        "{} entries, noop handler, batch {BATCH}\n{}",
        entries(),
        comparison("entries", bosun_rate, bare_rate, rss)
    ))
}
