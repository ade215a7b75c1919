//! The reliability checker: drive the real `bosun` binary under load, inject a fault, and
//! classify every message.
//!
//! Every message carries a unique id in its body. The producer records the ids the broker
//! confirmed (or the outbox rows that committed); an HTTP sink, which bosun's `http` handler
//! delivers to, records each id it accepted; after the run drains, the dead-letter
//! destination is read back. Then:
//! - lost = confirmed, never handled and not dead-lettered (must be 0);
//! - unexpected = handled or dead-lettered but never sent (must be 0);
//! - duplicated = extra acceptances of an id (reported; at-least-once allows them);
//! - misplaced = bad input that did not end in its documented place (must be 0): a body
//!   at the broker's limit not handled, one over it accepted, an outbox row failed that
//!   should have been published or published that should have failed.
//!
//! Used by `tests/integration/reliability.rs` (a reduced set in CI) and `benches/reliability.rs` (the
//! full set, which writes RELIABILITY.md; it includes `tests/integration/support.rs` too).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;

use crate::support;

pub use crate::support::{PG_URL, RABBIT_URL, REDIS_URL, free_port, unique};

// ---------------------------------------------------------------------------------------
// The sink: what bosun's http handler delivers to.

/// How the sink answers.
#[derive(Clone, Copy, Debug)]
pub struct SinkBehaviour {
    /// Fraction of requests answered 500 at random.
    pub fail_rate: f64,
    /// Time taken before answering.
    pub delay: Duration,
}

impl Default for SinkBehaviour {
    fn default() -> Self {
        Self {
            fail_rate: 0.0,
            delay: Duration::ZERO,
        }
    }
}

#[derive(Default)]
struct SinkState {
    /// Accepted (2xx) deliveries per body.
    accepted: Mutex<HashMap<String, u32>>,
    /// With an inbox: the pool and table whose `<table>_complete` each delivery calls in a
    /// transaction before it counts (a delivery whose claim is no longer held gets a 500).
    inbox: Mutex<Option<(sqlx::PgPool, String)>>,
    requests: AtomicU64,
    behaviour: Mutex<SinkBehaviour>,
    /// Ids answered 500 on their first delivery (then removed), to send them through a retry.
    fail_once: Mutex<HashSet<String>>,
}

pub struct Sink {
    pub url: String,
    state: Arc<SinkState>,
    server: tokio::task::JoinHandle<()>,
}

impl Sink {
    pub async fn start(behaviour: SinkBehaviour) -> anyhow::Result<Self> {
        Self::start_at(behaviour, 0).await
    }

    /// A sink on `port` (0: any free one): a scenario can point bosun at a port before
    /// anything listens there.
    pub async fn start_at(behaviour: SinkBehaviour, port: u16) -> anyhow::Result<Self> {
        let state = Arc::new(SinkState {
            behaviour: Mutex::new(behaviour),
            ..SinkState::default()
        });
        // Bodies up to the broker's maximum message size must reach the handler.
        let app = axum::Router::new()
            .route("/", post(accept))
            .layer(axum::extract::DefaultBodyLimit::disable())
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
        let url = format!("http://{}/", listener.local_addr()?);
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { url, state, server })
    }

    pub fn set_behaviour(&self, behaviour: SinkBehaviour) {
        if let Ok(mut b) = self.state.behaviour.lock() {
            *b = behaviour;
        }
    }

    /// Accepted deliveries per id.
    pub fn accepted(&self) -> HashMap<String, u32> {
        self.state
            .accepted
            .lock()
            .map(|m| m.clone())
            .unwrap_or_default()
    }

    /// Answers 500 to the first delivery of `id`.
    pub fn fail_once(&self, id: &str) {
        if let Ok(mut ids) = self.state.fail_once.lock() {
            ids.insert(id.to_owned());
        }
    }

    /// Completes each delivery's inbox record in `table` before counting it.
    pub async fn complete_in(&self, table: &str) -> anyhow::Result<()> {
        let pool = sqlx::PgPool::connect(PG_URL).await?;
        if let Ok(mut inbox) = self.state.inbox.lock() {
            *inbox = Some((pool, table.to_owned()));
        }
        Ok(())
    }

    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept(
    State(state): State<Arc<SinkState>>,
    headers: axum::http::HeaderMap,
    body: Bytes,
) -> StatusCode {
    state.requests.fetch_add(1, Ordering::Relaxed);
    let behaviour = state.behaviour.lock().map(|b| *b).unwrap_or_default();
    if !behaviour.delay.is_zero() {
        tokio::time::sleep(behaviour.delay).await;
    }
    if behaviour.fail_rate > 0.0 && rand::random::<f64>() < behaviour.fail_rate {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    // The id is the message id bosun's http handler sends; bodies may be arbitrary bytes.
    let id = headers
        .get("bosun-message-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
    if state
        .fail_once
        .lock()
        .map(|mut ids| ids.remove(&id))
        .unwrap_or(false)
    {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    let inbox = state.inbox.lock().ok().and_then(|i| i.clone());
    let Some((pool, table)) = inbox else {
        if let Ok(mut accepted) = state.accepted.lock() {
            *accepted.entry(id).or_default() += 1;
        }
        return StatusCode::OK;
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (consumer, key, token) = (
        header("bosun-consumer"),
        header("bosun-inbox-key"),
        header("bosun-inbox-token"),
    );
    // The effect (counting the delivery) goes with the commit: in a task of its own, so a
    // request dropped by a killed bosun cannot commit the record and skip the count.
    let effect = tokio::spawn(async move {
        let mut tx = pool.begin().await?;
        sqlx::query(&format!("SELECT {table}_complete($1, $2, $3)"))
            .bind(consumer)
            .bind(key)
            .bind(token)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        if let Ok(mut accepted) = state.accepted.lock() {
            *accepted.entry(id).or_default() += 1;
        }
        Ok::<(), sqlx::Error>(())
    });
    match effect.await {
        Ok(Ok(())) => StatusCode::OK,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

// ---------------------------------------------------------------------------------------
// The daemon.

/// A `bosun run` process on a config in a temporary directory that can be stopped and
/// started again: one [`support::Daemon`] per start, all writing to one log.
pub struct Daemon {
    bin: PathBuf,
    file: support::ConfigFile,
    running: Option<support::Daemon>,
    pub port: u16,
}

impl Daemon {
    pub fn new(bin: &Path, config_text: &str, port: u16) -> anyhow::Result<Self> {
        Ok(Self {
            bin: bin.to_path_buf(),
            file: support::ConfigFile::new(config_text),
            running: None,
            port,
        })
    }

    pub fn start(&mut self) -> anyhow::Result<()> {
        let daemon = support::Daemon::launch(
            &self.bin,
            &self.file.path,
            self.port,
            &[("RUST_LOG", "info,lapin=warn")],
            &[],
            &self.log_path(),
        )
        .context("spawn bosun")?;
        let listening = daemon.wait_http(Duration::from_secs(20));
        self.running = Some(daemon);
        if !listening {
            anyhow::bail!("bosun did not start listening:\n{}", self.logs())
        }
        Ok(())
    }

    pub fn log_path(&self) -> PathBuf {
        self.file.dir.path().join("bosun.log")
    }

    pub fn logs(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn rewrite_config(&self, text: &str) -> anyhow::Result<()> {
        self.file.rewrite(text);
        Ok(())
    }

    pub fn signal(&self, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        self.running.as_ref().context("not running")?.signal(signal);
        Ok(())
    }

    /// Sends `signal` and waits for the exit; returns the exit code (-1 when killed by a
    /// signal). Killed after `timeout`.
    pub fn stop_with(
        &mut self,
        signal: nix::sys::signal::Signal,
        timeout: Duration,
    ) -> anyhow::Result<Option<i32>> {
        self.signal(signal)?;
        let mut daemon = self.running.take().context("not running")?;
        match daemon.wait_exit(timeout) {
            Some(code) => Ok(Some(code)),
            None => anyhow::bail!("bosun did not exit within {timeout:?}"),
        }
    }

    pub fn ready(&self) -> bool {
        http_status(self.port, "/readyz") == Some(200)
    }
}

/// Status code of a GET on the daemon's listener.
pub fn http_status(port: u16, path: &str) -> Option<u16> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------------------------------
// Producers and dead-letter readers.

/// Publishes `ids` to `queue` through the default exchange with confirms, `rate` per second,
/// and returns the ids the broker confirmed. Reconnects after a connection loss; a message
/// whose confirm never came is not counted as sent (it may still arrive: then it is neither
/// lost nor unexpected, since it was sent).
pub async fn amqp_produce(
    queue: &str,
    ids: &[String],
    rate: u32,
) -> anyhow::Result<HashSet<String>> {
    amqp_produce_with(queue, ids, rate, false).await
}

/// [`amqp_produce`]; with `bad`, every body is random bytes and every tenth message carries a
/// header table of 1,000 entries with non-UTF-8 byte values.
pub async fn amqp_produce_with(
    queue: &str,
    ids: &[String],
    rate: u32,
    bad: bool,
) -> anyhow::Result<HashSet<String>> {
    use lapin::options::ConfirmSelectOptions;
    let mut confirmed = HashSet::new();
    let mut channel: Option<lapin::Channel> = None;
    let mut conn_keep: Option<lapin::Connection> = None;
    let chunk = (rate as usize / 20).max(1);
    let mut index = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    while index < ids.len() && Instant::now() < deadline {
        let ch = match &channel {
            Some(ch) if ch.status().connected() => ch.clone(),
            _ => {
                let conn = match lapin::Connection::connect(
                    RABBIT_URL,
                    lapin::ConnectionProperties::default(),
                )
                .await
                {
                    Ok(conn) => conn,
                    Err(_) => {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        continue;
                    }
                };
                let ch = conn.create_channel().await?;
                ch.confirm_select(ConfirmSelectOptions::default()).await?;
                conn_keep = Some(conn);
                channel = Some(ch.clone());
                ch
            }
        };
        let end = (index + chunk).min(ids.len());
        let mut pending = Vec::new();
        for id in &ids[index..end] {
            let mut props = lapin::BasicProperties::default()
                .with_delivery_mode(2)
                .with_message_id(id.as_str().into());
            let body: Vec<u8> = if bad {
                let len = rand::random::<u32>() as usize % 2048;
                (0..len).map(|_| rand::random::<u8>()).collect()
            } else {
                id.as_bytes().to_vec()
            };
            if bad && id.ends_with('0') {
                let mut table = lapin::types::FieldTable::default();
                for i in 0..1000 {
                    table.insert(
                        format!("h{i}").into(),
                        lapin::types::AMQPValue::ByteArray(vec![0xff, 0xfe, i as u8].into()),
                    );
                }
                props = props.with_headers(table);
            }
            match publish_to_queue(&ch, queue, &body, props).await {
                Ok(confirm) => pending.push((id.clone(), confirm)),
                Err(_) => break,
            }
        }
        let mut all_ok = true;
        for (id, confirm) in pending {
            match confirm.await {
                Ok(c) => {
                    let acked = c.is_ack();
                    if acked && c.take_message().is_none() {
                        confirmed.insert(id);
                    } else {
                        all_ok = false;
                    }
                }
                Err(_) => all_ok = false,
            }
        }
        if all_ok {
            index = end;
        } else {
            // Republish the chunk: ids confirmed twice are still one id.
            channel = None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(conn_keep);
    Ok(confirmed)
}

/// Publishes `body` to `queue` through the default exchange, `mandatory`.
async fn publish_to_queue(
    ch: &lapin::Channel,
    queue: &str,
    body: &[u8],
    props: lapin::BasicProperties,
) -> Result<lapin::PublisherConfirm, lapin::Error> {
    ch.basic_publish(
        "".into(),
        queue.into(),
        lapin::options::BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        body,
        props,
    )
    .await
}

/// RabbitMQ's `max_message_size`, read with `rabbitmqctl` (`{ok,134217728}`).
pub fn rabbit_max_message_size() -> anyhow::Result<u64> {
    support::rabbit_max_message_size().context("no max_message_size from rabbitmqctl")
}

/// Publishes one `size`-byte body with message id `id` to `queue` on a connection of its
/// own, and returns whether the broker confirmed it, or the broker's refusal.
pub async fn amqp_publish_sized(
    queue: &str,
    id: &str,
    size: usize,
) -> anyhow::Result<Result<(), String>> {
    use lapin::options::ConfirmSelectOptions;
    let conn =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let mut body = vec![b'x'; size];
    let prefix = id.as_bytes();
    let n = prefix.len().min(size);
    body[..n].copy_from_slice(&prefix[..n]);
    let props = lapin::BasicProperties::default()
        .with_delivery_mode(2)
        .with_message_id(id.into());
    let outcome = match publish_to_queue(&ch, queue, &body, props).await {
        Ok(confirm) => match confirm.await {
            Ok(c) => {
                if c.is_ack() && c.take_message().is_none() {
                    Ok(())
                } else {
                    Err("nacked or returned".to_owned())
                }
            }
            Err(e) => Err(e.to_string()),
        },
        Err(e) => Err(e.to_string()),
    };
    let _ = conn.close(200, "bye".into()).await;
    Ok(outcome)
}

/// Every body in `queue`, taken off it (basic.get until empty).
/// With `by_message_id`, a message's id is its `message_id` property (bodies may be any
/// bytes); otherwise its body.
pub async fn amqp_drain(queue: &str, by_message_id: bool) -> anyhow::Result<Vec<String>> {
    use lapin::options::{BasicAckOptions, BasicGetOptions};
    let conn =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let mut out = Vec::new();
    while let Some(message) = ch
        .basic_get(queue.into(), BasicGetOptions::default())
        .await?
    {
        let id = match message.delivery.properties.message_id() {
            Some(id) if by_message_id => id.to_string(),
            _ => String::from_utf8_lossy(&message.delivery.data).into_owned(),
        };
        out.push(id);
        message.delivery.ack(BasicAckOptions::default()).await?;
    }
    Ok(out)
}

/// Deletes queues left behind by a scenario.
pub async fn amqp_delete(queues: &[String]) {
    if let Ok(conn) =
        lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default()).await
        && let Ok(ch) = conn.create_channel().await
    {
        for q in queues {
            let _ = ch
                .queue_delete(
                    q.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
}

/// Messages ready in `queue` (passive declare), if it exists.
pub async fn amqp_depth(queue: &str) -> Option<u32> {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .ok()?;
    let ch = conn.create_channel().await.ok()?;
    let q = ch
        .queue_declare(
            queue.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await
        .ok()?;
    Some(q.message_count())
}

/// XADDs each id as `payload` (and `message_id`), `rate` per second, reconnecting after a
/// loss; returns the ids Redis acknowledged.
pub async fn redis_produce(
    stream: &str,
    ids: &[String],
    rate: u32,
) -> anyhow::Result<HashSet<String>> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut confirmed = HashSet::new();
    let chunk = (rate as usize / 20).max(1);
    let mut index = 0;
    let mut conn: Option<redis::aio::MultiplexedConnection> = None;
    let deadline = Instant::now() + Duration::from_secs(120);
    while index < ids.len() && Instant::now() < deadline {
        let c = match &conn {
            Some(c) => c.clone(),
            None => match client.get_multiplexed_async_connection().await {
                Ok(c) => {
                    conn = Some(c.clone());
                    c
                }
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
            },
        };
        let end = (index + chunk).min(ids.len());
        let mut pipe = redis::pipe();
        for id in &ids[index..end] {
            pipe.cmd("XADD")
                .arg(stream)
                .arg("*")
                .arg("payload")
                .arg(id.as_bytes())
                .arg("message_id")
                .arg(id.as_str());
        }
        let mut c = c;
        match pipe.query_async::<Vec<String>>(&mut c).await {
            Ok(_) => {
                confirmed.extend(ids[index..end].iter().cloned());
                index = end;
            }
            Err(_) => {
                conn = None;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(confirmed)
}

/// The `payload` of every entry in `stream`.
pub async fn redis_read_all(stream: &str) -> anyhow::Result<Vec<String>> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await?;
    Ok(entries
        .ids
        .iter()
        .filter_map(|e| match e.map.get("payload") {
            Some(redis::Value::BulkString(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        })
        .collect())
}

pub async fn redis_delete(keys: &[String]) {
    if let Ok(client) = redis::Client::open(REDIS_URL)
        && let Ok(mut conn) = client.get_multiplexed_async_connection().await
    {
        for key in keys {
            let _: Result<i64, _> = redis::cmd("DEL").arg(key).query_async(&mut conn).await;
        }
    }
}

/// Entries of `group` on `stream` not yet acknowledged.
pub async fn redis_pending(stream: &str, group: &str) -> Option<u64> {
    let client = redis::Client::open(REDIS_URL).ok()?;
    let mut conn = client.get_multiplexed_async_connection().await.ok()?;
    let reply: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg(group)
        .query_async(&mut conn)
        .await
        .ok()?;
    match reply {
        redis::Value::Array(items) => match items.first() {
            Some(redis::Value::Int(n)) => Some(*n as u64),
            _ => None,
        },
        _ => None,
    }
}

// ---------------------------------------------------------------------------------------
// Faults.

/// Runs a shell command, returning its stdout; failures are reported, not fatal.
pub fn sh(program: &str, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .with_context(|| format!("run {program}"))?;
    if !out.status.success() {
        anyhow::bail!(
            "{program} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Closes every RabbitMQ connection whose client-provided name contains `needle`.
pub fn rabbit_close_connections(needle: &str) -> anyhow::Result<usize> {
    let list = sh(
        "rabbitmqctl",
        &["-q", "list_connections", "pid", "client_properties"],
    )?;
    let mut closed = 0;
    for line in list.lines().filter(|l| l.contains(needle)) {
        if let Some(pid) = line.split_whitespace().next()
            && sh(
                "rabbitmqctl",
                &["-q", "close_connection", pid, "reliability fault"],
            )
            .is_ok()
        {
            closed += 1;
        }
    }
    Ok(closed)
}

/// Kills every Redis client whose name contains `needle`.
pub async fn redis_kill_clients(needle: &str) -> anyhow::Result<usize> {
    let client = redis::Client::open(REDIS_URL)?;
    let mut conn = client.get_multiplexed_async_connection().await?;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut conn)
        .await?;
    let mut killed = 0;
    for line in list.lines() {
        let field = |key: &str| {
            line.split(' ')
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")).map(str::to_owned))
        };
        if field("name").is_some_and(|n| n.contains(needle))
            && let Some(id) = field("id")
        {
            let n: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("ID")
                .arg(&id)
                .query_async(&mut conn)
                .await
                .unwrap_or(0);
            killed += n as usize;
        }
    }
    Ok(killed)
}

/// Stops and restarts the RabbitMQ application (queues and persistent messages survive).
pub fn rabbit_restart() -> anyhow::Result<()> {
    sh("rabbitmqctl", &["-q", "stop_app"])?;
    std::thread::sleep(Duration::from_millis(500));
    sh("rabbitmqctl", &["-q", "start_app"])?;
    let _ = sh("rabbitmqctl", &["-q", "await_startup"]);
    Ok(())
}

/// Restarts Redis with a snapshot taken at shutdown, so the streams survive as they would on
/// a server with persistence.
pub fn redis_restart() -> anyhow::Result<()> {
    let _ = sh("redis-cli", &["-p", "6379", "shutdown", "save"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect("127.0.0.1:6379").is_ok() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    sh(
        "redis-server",
        &[
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "-::1",
            "--port",
            "6379",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/var/lib/redis",
            "--logfile",
            "/var/log/redis/ci.log",
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect("127.0.0.1:6379").is_err() {
        if Instant::now() >= deadline {
            anyhow::bail!("redis did not come back");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The tally and the table.

/// One scenario's result.
#[derive(Debug, Clone)]
pub struct Row {
    pub scenario: String,
    pub messages: usize,
    pub handled: usize,
    pub dead_lettered: usize,
    pub lost: usize,
    pub duplicated: usize,
    pub unexpected: usize,
    /// Bad input that did not end in its documented place.
    pub misplaced: usize,
    pub duration: Duration,
    /// Why the scenario did not run, or what else was observed.
    pub note: String,
    /// False when the scenario could not run.
    pub ran: bool,
}

impl Row {
    pub fn skipped(scenario: &str, why: impl Into<String>) -> Self {
        Self {
            scenario: scenario.into(),
            messages: 0,
            handled: 0,
            dead_lettered: 0,
            lost: 0,
            duplicated: 0,
            unexpected: 0,
            misplaced: 0,
            duration: Duration::ZERO,
            note: why.into(),
            ran: false,
        }
    }

    /// The contract holds for this row.
    pub fn holds(&self) -> bool {
        !self.ran || (self.lost == 0 && self.unexpected == 0 && self.misplaced == 0)
    }
}

/// Classifies `sent` (every id the producer tried), `confirmed` (the ids the broker or the
/// database accepted), what the sink accepted and what was dead-lettered.
pub fn tally(
    scenario: &str,
    sent: &[String],
    confirmed: &HashSet<String>,
    accepted: &HashMap<String, u32>,
    dead: &[String],
    duration: Duration,
) -> Row {
    let sent_set: HashSet<&String> = sent.iter().collect();
    let dead_set: HashSet<&String> = dead.iter().collect();
    let lost = confirmed
        .iter()
        .filter(|id| !accepted.contains_key(*id) && !dead_set.contains(id))
        .count();
    let unexpected = accepted
        .keys()
        .chain(dead.iter())
        .filter(|id| !sent_set.contains(id))
        .collect::<HashSet<_>>()
        .len();
    let duplicated = accepted
        .values()
        .map(|n| (*n as usize).saturating_sub(1))
        .sum::<usize>()
        + dead.len().saturating_sub(dead_set.len())
        + accepted.keys().filter(|id| dead_set.contains(id)).count();
    Row {
        scenario: scenario.into(),
        messages: confirmed.len(),
        handled: accepted.len(),
        dead_lettered: dead_set.len(),
        lost,
        duplicated,
        unexpected,
        misplaced: 0,
        duration,
        note: String::new(),
        ran: true,
    }
}

/// The table as Markdown.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| scenario | messages | handled | dead-lettered | lost | duplicated | unexpected | misplaced | duration | note |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        if r.ran {
            out.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {:.1} s | {} |\n",
                r.scenario,
                r.messages,
                r.handled,
                r.dead_lettered,
                r.lost,
                r.duplicated,
                r.unexpected,
                r.misplaced,
                r.duration.as_secs_f64(),
                r.note
            ));
        } else {
            out.push_str(&format!(
                "| {} | - | - | - | - | - | - | - | - | not run: {} |\n",
                r.scenario, r.note
            ));
        }
    }
    out
}

/// Ids `prefix-0000..`, unique per run.
pub fn ids(count: usize) -> Vec<String> {
    let run = unique("m");
    (0..count).map(|i| format!("{run}-{i:06}")).collect()
}

/// Waits until `done` or `timeout`.
pub async fn until(timeout: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    done()
}

pub type Counts = BTreeMap<String, usize>;

pub mod dead_letters;
pub mod scenarios;

use scenarios::{Fault, Path_, Plan};

/// The scenarios, sized by `scale` (1 for CI, larger by hand). `full` adds the broker
/// restarts, which stop services every other test on the machine uses.
pub fn plans(scale: usize, full: bool) -> Vec<Plan> {
    let n = |base: usize| base * scale;
    let rate = (300 * scale.min(4)) as u32;
    let ok = SinkBehaviour::default();
    let flaky = SinkBehaviour {
        fail_rate: 0.3,
        delay: Duration::ZERO,
    };
    let slow = SinkBehaviour {
        fail_rate: 0.0,
        delay: Duration::from_millis(1500),
    };
    let mut plans = vec![
        Plan {
            name: "amqp: no fault",
            path: Path_::Amqp,
            messages: n(300),
            rate,
            sink: ok,
            fault: Fault::None,
            inbox: false,
        },
        Plan {
            name: "amqp: kill -9 mid-flight, restart",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: false,
        },
        Plan {
            name: "amqp: kill -9 mid-flight, restart, with inbox",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: true,
        },
        Plan {
            name: "amqp: connections closed 3x",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::CloseConnections,
            inbox: false,
        },
        Plan {
            name: "amqp: handler fails 30%",
            path: Path_::Amqp,
            messages: n(300),
            rate,
            sink: flaky,
            fault: Fault::None,
            inbox: false,
        },
        Plan {
            name: "amqp: SIGTERM mid-flight, restart",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Sigterm,
            inbox: false,
        },
        Plan {
            name: "amqp: SIGHUP with changed config",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Sighup,
            inbox: false,
        },
        Plan {
            name: "redis: no fault",
            path: Path_::Redis,
            messages: n(300),
            rate,
            sink: ok,
            fault: Fault::None,
            inbox: false,
        },
        Plan {
            name: "redis: kill -9 mid-flight, restart",
            path: Path_::Redis,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: false,
        },
        Plan {
            name: "redis: kill -9 mid-flight, restart, with inbox",
            path: Path_::Redis,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: true,
        },
        Plan {
            name: "redis: CLIENT KILL 3x",
            path: Path_::Redis,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::CloseConnections,
            inbox: false,
        },
        Plan {
            name: "redis: handler fails 30%",
            path: Path_::Redis,
            messages: n(300),
            rate,
            sink: flaky,
            fault: Fault::None,
            inbox: false,
        },
        Plan {
            name: "redis: handler slower than claim_idle",
            path: Path_::Redis,
            messages: n(40),
            rate: 100,
            sink: slow,
            fault: Fault::None,
            inbox: false,
        },
        Plan {
            name: "redis: SIGTERM mid-flight, restart",
            path: Path_::Redis,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::Sigterm,
            inbox: false,
        },
        Plan {
            name: "outbox: relay kill -9 mid-batch, restart",
            path: Path_::Outbox,
            messages: n(600),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: false,
        },
        Plan {
            name: "outbox: relay kill -9 mid-batch 3x, restart, consumer with inbox",
            path: Path_::Outbox,
            messages: n(600),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: true,
        },
        Plan {
            name: "outbox: pg_terminate_backend 3x",
            path: Path_::Outbox,
            messages: n(600),
            rate,
            sink: ok,
            fault: Fault::CloseConnections,
            inbox: false,
        },
        Plan {
            name: "amqp bad input: random-byte bodies, 1,000 non-UTF-8 headers, bodies at and over the broker's max size",
            path: Path_::Amqp,
            messages: n(200),
            rate,
            sink: ok,
            fault: Fault::BadInput,
            inbox: false,
        },
        Plan {
            name: "amqp: dead letters of TTL messages with the dead-letter processor stopped",
            path: Path_::Amqp,
            messages: n(200),
            rate,
            sink: SinkBehaviour {
                fail_rate: 0.5,
                delay: Duration::ZERO,
            },
            fault: Fault::TtlDeadLetters,
            inbox: false,
        },
        Plan {
            name: "outbox bad input: unknown and NULL destinations, payloads over the broker's max size, headers nested 200 deep, 1e400 and 200 KB",
            path: Path_::Outbox,
            messages: n(300),
            rate,
            sink: ok,
            fault: Fault::BadInput,
            inbox: false,
        },
        Plan {
            name: "redis bad input: 4,000-field entries amid failing handlers",
            path: Path_::Redis,
            messages: n(200),
            rate,
            sink: flaky,
            fault: Fault::BadInput,
            inbox: false,
        },
        Plan {
            name: "outbox per_key: 3 relays, 50 keys, commits out of id order, one relay kill -9",
            path: Path_::OutboxPerKey,
            messages: n(600),
            rate,
            sink: ok,
            fault: Fault::Kill,
            inbox: false,
        },
        Plan {
            name: "dead letters with NUL bytes into the archive (amqp and redis)",
            path: Path_::DeadLetters,
            messages: n(200),
            rate,
            sink: ok,
            fault: Fault::BadInput,
            inbox: false,
        },
    ];
    // Reduced for CI: 300 messages, 6 s down, with a breaker only.
    let down = if full { 30 } else { 6 };
    plans.push(Plan {
        name: if full {
            "amqp: downstream down for 30 s, circuit breaker"
        } else {
            "amqp: downstream down for 6 s, circuit breaker"
        },
        path: Path_::Amqp,
        messages: if full { 2000 } else { 300 },
        rate: 2000,
        sink: ok,
        fault: Fault::DownstreamDown {
            seconds: down,
            breaker: true,
        },
        inbox: false,
    });
    if full {
        plans.push(Plan {
            name: "amqp: downstream down for 30 s, no circuit breaker",
            path: Path_::Amqp,
            messages: 2000,
            rate: 2000,
            sink: ok,
            fault: Fault::DownstreamDown {
                seconds: down,
                breaker: false,
            },
            inbox: false,
        });
        // RabbitMQ retries an at-least-once dead-letter hop to a missing queue only after
        // minutes: too long for CI.
        plans.push(Plan {
            name: "amqp: quorum Q deleted and re-declared while retry TTLs fire",
            path: Path_::Amqp,
            messages: n(100),
            rate,
            sink: ok,
            fault: Fault::QuorumRedeclared,
            inbox: false,
        });
        plans.push(Plan {
            name: "amqp: RabbitMQ stop_app/start_app",
            path: Path_::Amqp,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::BrokerRestart,
            inbox: false,
        });
        plans.push(Plan {
            name: "redis: Redis restarted",
            path: Path_::Redis,
            messages: n(400),
            rate,
            sink: ok,
            fault: Fault::BrokerRestart,
            inbox: false,
        });
        plans.push(Plan {
            name: "outbox: RabbitMQ stop_app/start_app",
            path: Path_::Outbox,
            messages: n(600),
            rate,
            sink: ok,
            fault: Fault::BrokerRestart,
            inbox: false,
        });
    }
    plans
}
