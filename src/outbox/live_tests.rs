//! Outbox relays against real PostgreSQL, RabbitMQ and Redis, run in-process as the
//! supervisor runs them (some with their publisher wrapped to pause or record).
//!
//! Every test works on its own table (dropped at the end) and its own queue or stream, so
//! they run concurrently with each other and with the other tests.

use crate::testing::support;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bosun::config::Config;
use bosun::health::Health;
use bosun::outbox::{OutboxComponent, PublisherSource, Schema};
use bosun::publish::{OutgoingMessage, PublishError, Publisher};
use bosun::resources::Resources;
use bosun::supervisor::{Component, ComponentContext};
use lapin::options::{ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions};
use lapin::types::FieldTable;
use support::outbox::{
    PYTHON_OUTBOX_DDL, PYTHON_OUTBOX_MAPPING, Queue, Table, WAIT, config, config_full,
    config_with_db, existing_table, insert_as_python, numbered,
};
use support::pg;
use support::{ConfigFile, RABBIT_URL};
use support::{PG_URL, REDIS_URL, unique};
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;

/// One XRANGE entry: its id and its field/value pairs.
type StreamEntry = (String, Vec<(String, Vec<u8>)>);

/// A relay running in this process, as the supervisor would run it.
struct Running {
    name: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
    health: Health,
}

impl Running {
    fn start(name: &str, component: Arc<dyn Component>) -> Self {
        let health = Health::default();
        let shutdown = CancellationToken::new();
        let component_name = bosun::resources::outbox_component_name(name);
        let ctx = ComponentContext {
            name: component_name.clone(),
            shutdown: shutdown.clone(),
            health: health.register(&component_name),
        };
        let task = tokio::spawn(async move { component.run(ctx).await });
        Self {
            name: component_name,
            shutdown,
            task,
            health,
        }
    }

    fn ready(&self) -> (bool, String) {
        self.health
            .snapshot()
            .get(&self.name)
            .map(|c| (c.ready, c.reason.clone()))
            .unwrap_or((false, "gone".into()))
    }

    async fn wait_ready(&self) {
        let ready = support::wait_for_async(WAIT, || async { self.ready().0.then_some(()) }).await;
        assert!(
            ready.is_some(),
            "relay never became ready: {:?}",
            self.ready()
        );
    }

    async fn stop(self) {
        self.shutdown.cancel();
        let result = tokio::time::timeout(WAIT, self.task)
            .await
            .expect("relay stops in time")
            .expect("relay task");
        result.expect("relay returns cleanly");
    }
}

/// Starts every configured outbox, as `bosun run` would.
fn start_all(config: Config) -> Vec<Running> {
    let resources = Resources::new(Arc::new(config)).expect("resources");
    bosun::components::components_for(&resources)
        .expect("components")
        .into_iter()
        .map(|(name, component)| {
            let outbox = name
                .strip_prefix("outbox:")
                .expect("an outbox component")
                .to_owned();
            Running::start(&outbox, component)
        })
        .collect()
}

/// Builds one outbox's relay with its real publishers passed through `wrap`.
fn start_wrapped(
    config: Config,
    name: &str,
    wrap: impl FnOnce(Arc<dyn PublisherSource>) -> Arc<dyn PublisherSource>,
) -> Running {
    let resources = Resources::new(Arc::new(config)).expect("resources");
    let outbox = resources
        .config
        .outboxes
        .get(name)
        .expect("outbox in config")
        .clone();
    let pool = resources.database(&outbox.database).expect("pool");
    let source = bosun::outbox::publisher_source(name, &resources.config, &outbox)
        .expect("publisher source");
    let component = OutboxComponent::new(name, outbox, pool, wrap(source)).expect("component");
    Running::start(name, Arc::new(component))
}

/// Per-key ordering, polling often: rows held back by their key go out soon after.
const PER_KEY: &str = "ordering = \"per_key\"\npoll_interval = \"50ms\"";
/// Per-key ordering that never polls in a test's time: only looping at once moves rows.
const PER_KEY_NO_POLL: &str = "ordering = \"per_key\"\npoll_interval = \"1h\"";

/// A test's own outbox table and queue, both named after `prefix`, and a configuration of
/// `outboxes` on the table that relay to RabbitMQ's default exchange, each with `settings`.
async fn to_rabbit(
    prefix: &str,
    outboxes: &[&str],
    settings: &str,
) -> (Table, Queue, ConfigFile, Config) {
    let table = Table::new(prefix).await;
    let queue = Queue::new(prefix).await;
    let settings = format!("target = \"rabbit\"\ndestination = \"\"\n{settings}");
    let (file, config) = config(outboxes, &table.name, &settings);
    (table, queue, file, config)
}

async fn stop_all(relays: Vec<Running>) {
    for relay in relays {
        relay.stop().await;
    }
}

/// Stops the relays, then deletes the test's queue.
async fn finish(relays: Vec<Running>, queue: Queue) {
    stop_all(relays).await;
    queue.delete().await;
}

fn metrics_text() -> String {
    bosun::telemetry::metrics_handle().render()
}

/// The value of the counter `metric` of outbox `outbox`.
fn outbox_metric(metric: &str, outbox: &str) -> Option<f64> {
    support::metric_value(&metrics_text(), metric, &[&format!("outbox=\"{outbox}\"")])
}

/// The bodies of `received` messages, in order.
fn bodies_of(received: &[(String, String)]) -> Vec<&str> {
    received.iter().map(|(_, body)| body.as_str()).collect()
}

/// The bodies of `received` messages read as numbers, in order.
fn numbers(received: &[(String, String)]) -> Vec<usize> {
    received
        .iter()
        .map(|(_, b)| b.parse().expect("n"))
        .collect()
}

/// `n` rows of key `K` whose payloads are their numbers.
fn keyed(n: usize) -> Vec<(Option<&'static str>, String)> {
    (0..n).map(|i| (Some("K"), format!("{i}"))).collect()
}

/// The rows `before` and `after` a refused one arrive, and the relay stays ready.
async fn before_and_after_arrive(queue: &Queue, relays: &[Running]) {
    let got = queue.wait_len(2).await;
    let bodies: BTreeSet<&str> = got.iter().map(|(_, b)| b.as_str()).collect();
    assert_eq!(bodies, BTreeSet::from(["before", "after"]));
    relays[0].wait_ready().await;
}

/// The `last_error` of the first row matching `condition`.
async fn last_error(table: &Table, condition: &str) -> String {
    sqlx::query_scalar(&format!(
        "SELECT last_error FROM {} WHERE {condition} LIMIT 1",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("last_error")
}

/// Inserts rows given as (destination, partition key, payload, headers as JSON text), each
/// routed to `routing_key`, in one transaction.
async fn insert_rows(table: &Table, routing_key: &str, rows: &[(&str, Option<&str>, &str, &str)]) {
    let mut tx = table.pool.begin().await.expect("begin");
    for (destination, key, payload, headers) in rows {
        sqlx::query(&format!(
            "INSERT INTO {} (destination, routing_key, partition_key, payload, headers)
             VALUES ($1, $2, $3, $4, $5::jsonb)",
            table.name
        ))
        .bind(destination)
        .bind(routing_key)
        .bind(key)
        .bind(payload.as_bytes())
        .bind(headers)
        .execute(&mut *tx)
        .await
        .expect("insert");
    }
    tx.commit().await.expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn committed_rows_are_published_once_with_their_message_ids() {
    let _metrics = bosun::telemetry::metrics_handle();
    let (table, queue, _file, config) = to_rabbit("ob_once", &["once"], "batch = 100").await;
    table.insert(None, &queue.name, &numbered(1000, None)).await;
    let relays = start_all(config);

    let got = queue.wait_len(1000).await;
    assert!(table.wait_count("published_at IS NOT NULL", 1000).await);
    // Give a duplicate, if any, the time to show up.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got_after = queue.received();
    assert_eq!(got_after.len(), 1000, "every row exactly once");
    let ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(
        ids,
        table.message_ids().await,
        "each message carries its row's message_id"
    );
    let bodies = bodies_of(&got);
    assert_eq!(bodies.first().copied(), Some("row 0"));
    assert_eq!(
        table.count("attempts = 1 AND last_error IS NULL").await,
        1000
    );
    let published = outbox_metric("bosun_outbox_published_total", "once");
    assert_eq!(published, Some(1000.0));
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_of_a_rolled_back_transaction_never_appear() {
    let (table, queue, _file, config) =
        to_rabbit("ob_rollback", &["rollback"], "poll_interval = \"100ms\"").await;
    let relays = start_all(config);
    relays[0].wait_ready().await;

    let mut tx = table.pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "INSERT INTO {} (routing_key, payload) VALUES ($1, 'rolled back')",
        table.name
    ))
    .bind(&queue.name)
    .execute(&mut *tx)
    .await
    .expect("insert");
    // The relay polls while the row is uncommitted; then it is rolled back.
    tokio::time::sleep(Duration::from_millis(500)).await;
    tx.rollback().await.expect("rollback");
    table
        .insert(None, &queue.name, &[(None, "committed".into())])
        .await;

    let got = queue.wait_len(1).await;
    assert!(table.wait_count("published_at IS NOT NULL", 1).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let bodies: Vec<String> = queue.received().into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies, vec!["committed".to_owned()], "first seen: {got:?}");
    assert_eq!(table.count("true").await, 1);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_share_a_table_without_duplicates() {
    let (table, queue, _file, config) =
        to_rabbit("ob_two", &["two_a", "two_b"], "batch = 50").await;
    table.insert(None, &queue.name, &numbered(3000, None)).await;
    let relays = start_all(config);
    assert_eq!(relays.len(), 2);

    queue.wait_len(3000).await;
    assert!(table.wait_count("published_at IS NOT NULL", 3000).await);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = queue.received();
    let ids: BTreeSet<String> = got.iter().map(|(id, _)| id.clone()).collect();
    assert_eq!(got.len(), 3000, "no duplicates");
    assert_eq!(ids.len(), 3000);
    let a = outbox_metric("bosun_outbox_published_total", "two_a").unwrap_or(0.0);
    let b = outbox_metric("bosun_outbox_published_total", "two_b").unwrap_or(0.0);
    assert_eq!(a + b, 3000.0);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_order_holds_under_two_relays() {
    let (table, queue, _file, config) = to_rabbit(
        "ob_perkey",
        &["key_a", "key_b"],
        &format!("batch = 7\n{PER_KEY}"),
    )
    .await;
    const KEYS: [&str; 5] = ["k0", "k1", "k2", "k3", "k4"];
    let relays = start_all(config);
    // Rows arrive interleaved across keys, in several transactions, while both relays run.
    for round in 0..8 {
        let rows: Vec<(Option<&str>, String)> = (0..50)
            .map(|i| {
                (
                    Some(KEYS[i % KEYS.len()]),
                    format!("{}:{}", KEYS[i % KEYS.len()], round * 10 + i / KEYS.len()),
                )
            })
            .collect();
        table.insert(None, &queue.name, &rows).await;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let got = queue.wait_len(400).await;
    assert!(table.wait_count("published_at IS NOT NULL", 400).await);
    let mut last: BTreeMap<String, i64> = BTreeMap::new();
    for (_, body) in &got {
        let (key, seq) = body.split_once(':').expect("key:seq");
        let seq: i64 = seq.parse().expect("seq");
        let previous = last.insert(key.to_owned(), seq).unwrap_or(-1);
        assert_eq!(
            seq,
            previous + 1,
            "key {key}: {seq} arrived after {previous}"
        );
    }
    assert_eq!(last.len(), KEYS.len());
    assert!(last.values().all(|&seq| seq == 79));
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notify_wakes_the_relay_long_before_the_poll_interval() {
    let (table, queue, _file, config) = to_rabbit(
        "ob_notify",
        &["notify"],
        "poll_interval = \"60s\"\nretain_published = \"0\"",
    )
    .await;
    let relays = start_all(config);
    relays[0].wait_ready().await;
    // Let the relay settle into its wait (the listener's first wake-up has passed).
    tokio::time::sleep(Duration::from_secs(1)).await;

    let started = std::time::Instant::now();
    table
        .insert(None, &queue.name, &[(None, "wake up".into())])
        .await;
    let got = support::wait_for_async(Duration::from_secs(30), || async {
        let r = queue.received();
        (!r.is_empty()).then_some(r)
    })
    .await;
    assert!(
        got.is_some(),
        "row not published before the 60s poll interval"
    );
    assert!(started.elapsed() < Duration::from_secs(60));
    // retain_published = "0": published rows are deleted at once.
    assert!(table.wait_count("true", 0).await);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_rows_fail_with_a_clear_last_error() {
    let _metrics = bosun::telemetry::metrics_handle();
    let table = Table::new("ob_unroutable").await;
    let (_file, config) = config(
        &["unroutable"],
        &table.name,
        "target = \"rabbit\"\ndestination = \"\"\nmax_attempts = 1",
    );
    let nowhere = unique("ob_no_such_queue");
    table.insert(None, &nowhere, &numbered(3, None)).await;
    let relays = start_all(config);

    assert!(table.wait_count("failed_at IS NOT NULL", 3).await);
    assert_eq!(table.count("published_at IS NOT NULL").await, 0);
    let error = last_error(&table, "true").await;
    assert!(
        error.contains("unroutable") && error.contains(&nowhere),
        "{error}"
    );
    let failed = outbox_metric("bosun_outbox_failed_total", "unroutable");
    assert_eq!(failed, Some(3.0));
    stop_all(relays).await;
}

/// A payload over the broker's `max_message_size` can never be published: its row fails at
/// the first attempt, and the rows around it are published once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_payload_fails_at_once_and_spares_its_batch() {
    let table = Table::new("ob_oversized").await;
    let queue = Queue::new("ob_oversized").await;
    let (_file, config) = config_full(
        &["oversized"],
        &table.name,
        "target = \"rabbit\"\ndestination = \"\"\nmax_attempts = 5",
        PG_URL,
        "max_message_size = \"1KiB\"",
    );
    let mut rows = numbered(10, None);
    rows[4].1 = "x".repeat(1025);
    table.insert(None, &queue.name, &rows).await;
    let relays = start_all(config);

    assert!(table.wait_count("failed_at IS NOT NULL", 1).await);
    assert!(table.wait_count("published_at IS NOT NULL", 9).await);
    assert_eq!(
        table
            .count("failed_at IS NOT NULL AND attempts = 1 AND length(payload) = 1025")
            .await,
        1,
        "given up at the first attempt"
    );
    let error = table.failed_error().await;
    assert!(
        error.contains("1025 bytes") && error.contains("max message size of 1024"),
        "{error}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(queue.received().len(), 9, "each other row exactly once");
    stop_all(relays).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_fail_after_max_attempts_and_are_kept() {
    let table = Table::new("ob_attempts").await;
    // No default destination and none on the row: a configuration problem, retried.
    let (_file, config) = config(
        &["attempts"],
        &table.name,
        "target = \"rabbit\"\nmax_attempts = 3\nretry = { backoff = \"fixed\", initial = \"100ms\", jitter = 0.0 }\nretain_published = \"0\"",
    );
    table.insert(None, "anything", &numbered(2, None)).await;
    let relays = start_all(config);

    assert!(table.wait_count("failed_at IS NOT NULL", 2).await);
    assert_eq!(
        table.count("attempts = 3").await,
        2,
        "failed after exactly max_attempts"
    );
    let error = last_error(&table, "true").await;
    assert!(error.contains("no destination"), "{error}");
    // Failed rows are kept (retain_published = "0" deletes only published rows).
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(table.count("true").await, 2);
    stop_all(relays).await;
}

/// Every entry of `stream`.
async fn stream_entries(stream: &str) -> Vec<StreamEntry> {
    let mut conn = redis_connection().await;
    redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("xrange")
}

async fn redis_connection() -> redis::aio::MultiplexedConnection {
    let client = redis::Client::open(REDIS_URL).expect("redis url");
    client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

/// Stops the relays, then deletes the test's stream.
async fn finish_stream(relays: Vec<Running>, stream: &str) {
    stop_all(relays).await;
    let _: () = redis::cmd("DEL")
        .arg(stream)
        .query_async(&mut redis_connection().await)
        .await
        .expect("del");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_go_to_a_redis_stream_with_payload_and_headers_as_fields() {
    let table = Table::new("ob_redis").await;
    let stream = unique("ob_redis_stream");
    let (_file, config) = config(
        &["to_redis"],
        &table.name,
        &format!("target = \"cache\"\ndestination = \"{stream}\"\nmaxlen = 10000"),
    );
    table.insert(None, "", &numbered(20, None)).await;
    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 20).await);

    let entries = stream_entries(&stream).await;
    assert_eq!(entries.len(), 20);
    let fields: BTreeMap<String, Vec<u8>> = entries[0].1.iter().cloned().collect();
    assert_eq!(
        fields.get("payload").map(Vec::as_slice),
        Some(&b"row 0"[..])
    );
    assert_eq!(fields.get("source").map(Vec::as_slice), Some(&b"test"[..]));
    assert_eq!(fields.get("n").map(Vec::as_slice), Some(&b"7"[..]));
    let ids = table.message_ids().await;
    let first_id =
        String::from_utf8(fields.get("message_id").cloned().unwrap_or_default()).expect("utf-8");
    assert!(ids.contains(&first_id));
    finish_stream(relays, &stream).await;
}

/// Passes batches to the real publisher, then, once, holds the batch after its confirms
/// until released, reporting the pause: a relay stopped between confirm and commit.
struct PauseAfterConfirm {
    inner: Arc<dyn Publisher>,
    state: Arc<Pause>,
}

struct Pause {
    /// Set once the first batch is confirmed and being held.
    paused: Notify,
    release: Semaphore,
    armed: std::sync::atomic::AtomicBool,
    /// How many messages the held batch had.
    held: std::sync::atomic::AtomicUsize,
}

impl Default for Pause {
    fn default() -> Self {
        Self {
            paused: Notify::new(),
            release: Semaphore::new(0),
            armed: std::sync::atomic::AtomicBool::new(false),
            held: std::sync::atomic::AtomicUsize::new(0),
        }
    }
}

#[async_trait]
impl Publisher for PauseAfterConfirm {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
        let results = self.inner.publish_batch(messages).await;
        if self
            .state
            .armed
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            self.state
                .held
                .store(messages.len(), std::sync::atomic::Ordering::SeqCst);
            self.state.paused.notify_one();
            if let Ok(permit) = self.state.release.acquire().await {
                permit.forget();
            }
        }
        results
    }
}

struct PauseSource {
    inner: Arc<dyn PublisherSource>,
    state: Arc<Pause>,
}

#[async_trait]
impl PublisherSource for PauseSource {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(Arc::new(PauseAfterConfirm {
            inner: self.inner.connect().await?,
            state: self.state.clone(),
        }))
    }
}

fn pause_wrapper(
    state: &Arc<Pause>,
) -> impl FnOnce(Arc<dyn PublisherSource>) -> Arc<dyn PublisherSource> {
    let state = state.clone();
    state.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    move |inner| Arc::new(PauseSource { inner, state })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_go_to_a_flat_entry_stream_one_field_per_key_and_other_payloads_fail_alone() {
    let table = Table::new("ob_flat").await;
    let stream = unique("ob_flat_stream");
    let legacy = format!(
        "\n[brokers.legacy]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\nentry_format = \"fields\"\n"
    );
    let (_file, config) = config_full(
        &["to_legacy"],
        &table.name,
        &format!("target = \"legacy\"\ndestination = \"{stream}\""),
        PG_URL,
        &legacy,
    );
    let rows = [
        r#"{"event_type":"user.created","user_id":"123"}"#,
        "not an object",
        r#"{"event_type":"user.deleted","user_id":"124"}"#,
    ];
    let rows: Vec<(Option<&str>, String)> = rows.iter().map(|p| (None, (*p).to_owned())).collect();
    table.insert(None, "", &rows).await;
    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 2).await);
    assert!(
        table
            .wait_count("failed_at IS NOT NULL AND attempts = 1", 1)
            .await,
        "a payload that is not a JSON object fails at its first attempt"
    );
    let error = table.failed_error().await;
    assert!(error.contains("needs a JSON object body"), "{error}");

    let entries = stream_entries(&stream).await;
    assert_eq!(entries.len(), 2);
    let names: Vec<&str> = entries[0].1.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["event_type", "user_id", "message_id", "n", "source"],
        "the object's keys, the id, then the row's headers; no payload field"
    );
    assert_eq!(entries[0].1[1].1, b"123");
    assert_eq!(entries[1].1[0].1, b"user.deleted");
    finish_stream(relays, &stream).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_confirmed_but_not_committed_are_sent_again_after_a_crash() {
    let (table, queue, _file, config) = to_rabbit("ob_crash", &["crash"], "batch = 40").await;
    table.insert(None, &queue.name, &numbered(100, None)).await;
    let pause = Arc::new(Pause::default());
    let relay = start_wrapped(config.clone(), "crash", pause_wrapper(&pause));

    tokio::time::timeout(WAIT, pause.paused.notified())
        .await
        .expect("first batch confirmed");
    let held = pause.held.load(std::sync::atomic::Ordering::SeqCst);
    assert_eq!(held, 40);
    queue.wait_len(40).await;
    // The process dies between the broker's confirms and COMMIT.
    relay.task.abort();
    let _ = relay.task.await;

    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 100).await);
    let got = queue.wait_len(140).await;
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for (id, _) in &got {
        *per_id.entry(id.clone()).or_default() += 1;
    }
    assert_eq!(per_id.len(), 100, "every row arrived");
    assert_eq!(
        per_id.values().filter(|&&n| n == 2).count(),
        40,
        "the uncommitted batch arrived twice, with the same message ids"
    );
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_publish_timeout_rolls_back_and_the_rows_are_claimed_again() {
    let (table, queue, _file, config) = to_rabbit(
        "ob_timeout",
        &["slow"],
        "batch = 30\npublish_timeout = \"1s\"",
    )
    .await;
    table.insert(None, &queue.name, &numbered(30, None)).await;
    let pause = Arc::new(Pause::default());
    let relay = start_wrapped(config, "slow", pause_wrapper(&pause));

    // The first batch is held past publish_timeout and never released.
    tokio::time::timeout(WAIT, pause.paused.notified())
        .await
        .expect("first batch confirmed");
    assert!(table.wait_count("published_at IS NOT NULL", 30).await);
    let got = queue.wait_len(60).await;
    assert_eq!(
        got.iter().map(|(id, _)| id).collect::<BTreeSet<_>>().len(),
        30
    );
    assert_eq!(
        table.count("attempts = 1").await,
        30,
        "a timed-out batch uses no attempt"
    );
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminating_the_relays_connection_mid_batch_loses_nothing() {
    let table = Table::new("ob_terminate").await;
    let queue = Queue::new("ob_terminate").await;
    let name = unique("term");
    let (_file, config) = config(
        &[&name],
        &table.name,
        "target = \"rabbit\"\nbatch = 25\ndestination = \"\"",
    );
    table.insert(None, &queue.name, &numbered(100, None)).await;
    let pause = Arc::new(Pause::default());
    let relay = start_wrapped(config, &name, pause_wrapper(&pause));

    tokio::time::timeout(WAIT, pause.paused.notified())
        .await
        .expect("first batch confirmed");
    // Only the backend this relay opened carries this application_name.
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND state = 'idle in transaction'",
    )
    .bind(bosun::outbox::application_name(&name))
    .fetch_all(&table.pool)
    .await
    .expect("terminate");
    assert_eq!(
        terminated,
        vec![true],
        "the relay's connection, holding the batch's locks"
    );
    pause.release.add_permits(1);

    assert!(table.wait_count("published_at IS NOT NULL", 100).await);
    let got = queue.wait_len(125).await;
    let ids: BTreeSet<&String> = got.iter().map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 100, "every row arrived");
    assert_eq!(got.len(), 125, "only the interrupted batch was sent twice");
    relay.wait_ready().await;
    relay.stop().await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_makes_the_relay_not_ready() {
    let (_file, config) = config_with_db(
        &["nodb"],
        "bosun_outbox",
        "target = \"rabbit\"\ndestination = \"\"",
        "postgres://postgres@127.0.0.1:1/test",
    );
    let relays = start_all(config);
    let reason = support::wait_for_async(WAIT, || async {
        let (ready, reason) = relays[0].ready();
        (!ready && reason.contains("database")).then_some(reason)
    })
    .await;
    assert!(reason.is_some(), "{:?}", relays[0].ready());
    stop_all(relays).await;
}

/// Inserts one keyed row on `conn` (inside whatever transaction it is in) and returns its id.
async fn insert_keyed(
    conn: &mut sqlx::PgConnection,
    table: &str,
    queue: &str,
    key: &str,
    payload: &str,
) -> i64 {
    sqlx::query_scalar(&format!(
        "INSERT INTO {table} (destination, routing_key, partition_key, payload)
         VALUES ('', $1, $2, $3) RETURNING id"
    ))
    .bind(queue)
    .bind(key)
    .bind(payload.as_bytes())
    .fetch_one(conn)
    .await
    .expect("insert keyed row")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_rows_committed_out_of_id_order_go_out_in_id_order() {
    let (table, queue, _file, config) = to_rabbit("ob_late", &["late"], PER_KEY).await;
    let relays = start_all(config);
    relays[0].wait_ready().await;

    // T1 takes id 1 of key K and stays open; T2 takes id 2 of K and commits first.
    let mut t1 = table.pool.begin().await.expect("begin T1");
    let first = insert_keyed(&mut t1, &table.name, &queue.name, "K", "first").await;
    let mut t2 = table.pool.begin().await.expect("begin T2");
    let second = insert_keyed(&mut t2, &table.name, &queue.name, "K", "second").await;
    assert!(first < second);
    t2.commit().await.expect("commit T2");

    // Time for many claims: id 2 must not go out while id 1 may still appear.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        queue.received().is_empty(),
        "published before the lower id of its key committed: {:?}",
        queue.received()
    );
    assert_eq!(table.count("published_at IS NOT NULL").await, 0);

    t1.commit().await.expect("commit T1");
    let got = queue.wait_len(2).await;
    let bodies = bodies_of(&got);
    assert_eq!(bodies, ["first", "second"]);
    assert!(table.wait_count("published_at IS NOT NULL", 2).await);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolled_back_lower_id_does_not_hold_its_key_back() {
    let (table, queue, _file, config) = to_rabbit("ob_lateroll", &["lateroll"], PER_KEY).await;
    let relays = start_all(config);
    relays[0].wait_ready().await;
    let mut t1 = table.pool.begin().await.expect("begin T1");
    insert_keyed(&mut t1, &table.name, &queue.name, "K", "gone").await;
    let mut conn = table.pool.acquire().await.expect("connection");
    insert_keyed(&mut conn, &table.name, &queue.name, "K", "kept").await;
    t1.rollback().await.expect("roll back T1");
    let got = queue.wait_len(1).await;
    assert_eq!(got[0].1, "kept");
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_upgrades_a_table_from_the_previous_ddl() {
    let name = unique("ob_upgrade").to_lowercase();
    let pool = pg().await;
    let table = Table {
        name: name.clone(),
        pool: pool.clone(),
    };
    // The table as the previous DDL made it, with rows already pending.
    for statement in [
        format!(
            "CREATE TABLE {name} (
                id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                message_id uuid NOT NULL DEFAULT gen_random_uuid(),
                destination text, routing_key text NOT NULL DEFAULT '',
                headers jsonb NOT NULL DEFAULT '{{}}'::jsonb, payload bytea NOT NULL,
                content_type text, partition_key text,
                created_at timestamptz NOT NULL DEFAULT now(),
                attempts integer NOT NULL DEFAULT 0, last_error text,
                next_attempt_at timestamptz NOT NULL DEFAULT now(),
                published_at timestamptz, failed_at timestamptz)"
        ),
        format!(
            "CREATE INDEX {name}_key_idx ON {name} (partition_key, id)
             WHERE published_at IS NULL AND failed_at IS NULL AND partition_key IS NOT NULL"
        ),
    ] {
        sqlx::query(&statement)
            .execute(&pool)
            .await
            .expect("old DDL");
    }
    let queue = Queue::new("ob_upgrade").await;
    table
        .insert(None, &queue.name, &[(Some("K"), "old".to_owned())])
        .await;
    sqlx::query(&format!(
        "INSERT INTO {name} (destination, payload, published_at) VALUES ('', 'done', now())"
    ))
    .execute(&pool)
    .await
    .expect("published row");

    let schema = Schema::new(&name, &name).expect("names");
    for _ in 0..2 {
        schema.migrate(&pool).await.expect("migrate");
    }
    assert_eq!(
        table.count("insert_xid = '0'::xid8").await,
        1,
        "the pending row ranks before every later one"
    );
    assert_eq!(table.count("insert_xid IS NULL").await, 1);
    let old_index: Option<String> =
        sqlx::query_scalar("SELECT indexname::text FROM pg_indexes WHERE indexname = $1")
            .bind(format!("{name}_key_idx"))
            .fetch_optional(&pool)
            .await
            .expect("pg_indexes");
    assert_eq!(old_index, None);
    let message_id_index: Option<String> =
        sqlx::query_scalar("SELECT indexdef::text FROM pg_indexes WHERE indexname = $1")
            .bind(format!("{name}_message_id_idx"))
            .fetch_optional(&pool)
            .await
            .expect("pg_indexes");
    assert!(
        message_id_index
            .as_deref()
            .is_some_and(|d| d.contains("(message_id)")),
        "the upgraded table has no message_id index: {message_id_index:?}"
    );
    let refused = sqlx::query(&format!(
        "INSERT INTO {name} (payload, insert_xid) VALUES ('x', NULL)"
    ))
    .execute(&pool)
    .await;
    assert!(refused.is_err(), "a row without insert_xid is refused");

    table
        .insert(None, &queue.name, &[(Some("K"), "new".to_owned())])
        .await;
    assert_eq!(table.count("insert_xid > '0'::xid8").await, 1);
    let (_file, config) = config(
        &["upgraded"],
        &name,
        "target = \"rabbit\"\ndestination = \"\"\nordering = \"per_key\"\npoll_interval = \"50ms\"",
    );
    let relays = start_all(config);
    let got = queue.wait_len(2).await;
    let bodies = bodies_of(&got);
    assert_eq!(bodies, ["old", "new"]);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_unusable_headers_fail_alone_at_their_first_attempt() {
    let table = Table::new("ob_badheaders").await;
    let queue = Queue::new("ob_badheaders").await;
    let deep = format!("{{\"a\": {}1{}}}", "[".repeat(199), "]".repeat(199));
    let huge_number = "{\"n\": 1e400}".to_owned();
    let huge_value = format!("{{\"v\": \"{}\"}}", "x".repeat(200 * 1024));
    let rows = [
        ("{\"ok\": 1}".to_owned(), "before"),
        (deep, "deep"),
        (huge_number, "number"),
        (huge_value, "large"),
        ("{\"ok\": 2}".to_owned(), "after"),
    ];
    let rows: Vec<_> = rows
        .iter()
        .map(|(h, p)| ("", None, *p, h.as_str()))
        .collect();
    insert_rows(&table, &queue.name, &rows).await;
    let (_file, config) = config(
        &["badheaders"],
        &table.name,
        "target = \"rabbit\"\ndestination = \"\"\nmax_attempts = 5",
    );
    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 2).await);
    assert!(
        table
            .wait_count("failed_at IS NOT NULL AND attempts = 1", 3)
            .await
    );
    let errors: Vec<(String, String)> = sqlx::query_as(&format!(
        "SELECT convert_from(payload, 'UTF8'), last_error FROM {} WHERE failed_at IS NOT NULL ORDER BY id",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("errors");
    assert!(errors[0].1.contains("200 levels deep"), "{errors:?}");
    assert!(errors[1].1.contains("number out of range"), "{errors:?}");
    assert!(
        errors[2].1.contains("over the limit of 65536"),
        "{errors:?}"
    );
    before_and_after_arrive(&queue, &relays).await;
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_whose_headers_exceed_the_frame_fails_at_its_first_attempt() {
    let table = Table::new("ob_frame").await;
    let queue = Queue::new("ob_frame").await;
    // 10 KB of headers: within the outbox's own bounds, over a 8 KiB frame.
    let rows = [
        ("{}".to_owned(), "before"),
        (format!("{{\"v\": \"{}\"}}", "x".repeat(10_000)), "large"),
        ("{}".to_owned(), "after"),
    ];
    let rows: Vec<_> = rows
        .iter()
        .map(|(h, p)| ("", None, *p, h.as_str()))
        .collect();
    insert_rows(&table, &queue.name, &rows).await;
    let text = format!(
        "[service]\nname = \"outbox-frame\"\nshutdown_timeout = \"10s\"\n\
         [http]\nlisten = \"127.0.0.1:{}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}?frame_max=8192\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\n\
         [outboxes.frame]\ndatabase = \"main\"\ntable = \"{}\"\ntarget = \"rabbit\"\n\
         destination = \"\"\nmax_attempts = 5\n",
        support::free_port(),
        table.name
    );
    let file = ConfigFile::new(&text);
    let config = bosun::Runtime::builder()
        .build()
        .load(&file.path)
        .unwrap_or_else(|e| panic!("config:\n{e}\n{text}"));
    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 2).await);
    assert!(
        table
            .wait_count("failed_at IS NOT NULL AND attempts = 1", 1)
            .await
    );
    let error = table.failed_error().await;
    assert!(error.contains("frame_max of 8192"), "{error}");
    before_and_after_arrive(&queue, &relays).await;
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_key_backlog_drains_without_waiting_for_polls() {
    // A poll interval far longer than the test: only looping at once can drain the key.
    let (table, queue, _file, config) = to_rabbit("ob_onekey", &["onekey"], PER_KEY_NO_POLL).await;
    let rows = keyed(200);
    table.insert(None, &queue.name, &rows).await;
    let relays = start_all(config);
    let got = queue.wait_len(200).await;
    let order = numbers(&got);
    assert_eq!(order, (0..200).collect::<Vec<_>>());
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keyed_rows_held_by_an_unrelated_transaction_go_out_soon_after_it_ends() {
    let table = Table::new("ob_held").await;
    let other = Table::new("ob_held_other").await;
    let queue = Queue::new("ob_held").await;
    let (_file, config) = config(
        &["held"],
        &table.name,
        "target = \"rabbit\"\ndestination = \"\"\nordering = \"per_key\"\npoll_interval = \"1h\"",
    );
    let relays = start_all(config);
    relays[0].wait_ready().await;
    // A transaction that writes elsewhere and stays open holds back keyed rows written
    // after it began; its end sends no NOTIFY to this outbox.
    let mut unrelated = other.pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "INSERT INTO {} (destination, payload) VALUES ('nowhere', 'x')",
        other.name
    ))
    .execute(&mut *unrelated)
    .await
    .expect("unrelated write");
    table
        .insert(None, &queue.name, &[(Some("K"), "held".to_owned())])
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        queue.received().is_empty(),
        "published past an older writer"
    );
    unrelated
        .rollback()
        .await
        .expect("end the unrelated transaction");
    let ended = std::time::Instant::now();
    let got = queue.wait_len(1).await;
    assert_eq!(got[0].1, "held");
    assert!(
        ended.elapsed() < Duration::from_secs(10),
        "waited {:?}",
        ended.elapsed()
    );
    finish(relays, queue).await;
}

/// Records the bodies of every `publish_batch` call, in call order.
struct Recording {
    inner: Arc<dyn Publisher>,
    calls: Arc<Mutex<Vec<Vec<String>>>>,
}

#[async_trait]
impl Publisher for Recording {
    async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), PublishError>> {
        let bodies = messages
            .iter()
            .map(|m| String::from_utf8_lossy(&m.body).into_owned())
            .collect();
        self.calls.lock().expect("lock").push(bodies);
        self.inner.publish_batch(messages).await
    }
}

struct RecordingSource {
    inner: Arc<dyn PublisherSource>,
    calls: Arc<Mutex<Vec<Vec<String>>>>,
}

#[async_trait]
impl PublisherSource for RecordingSource {
    async fn connect(&self) -> anyhow::Result<Arc<dyn Publisher>> {
        Ok(Arc::new(Recording {
            inner: self.inner.connect().await?,
            calls: self.calls.clone(),
        }))
    }
}

/// The distinct `published_at` values of the rows matching `condition`: rows marked in one
/// transaction share one (`now()` is the transaction's start).
async fn commits(table: &Table, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(DISTINCT published_at) FROM {} WHERE {condition}",
        table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("distinct published_at")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_batch_sends_several_rows_of_a_key_one_after_another() {
    let (table, queue, _file, config) = to_rabbit(
        "ob_keyrun",
        &["keyrun"],
        &format!("batch = 100\n{PER_KEY_NO_POLL}"),
    )
    .await;
    let rows = keyed(30);
    table.insert(None, &queue.name, &rows).await;
    let calls = Arc::new(Mutex::new(Vec::new()));
    let recorded = calls.clone();
    let relay = start_wrapped(config, "keyrun", move |inner| {
        Arc::new(RecordingSource {
            inner,
            calls: recorded,
        })
    });

    let got = queue.wait_len(30).await;
    let order = numbers(&got);
    assert_eq!(order, (0..30).collect::<Vec<_>>());
    assert!(table.wait_count("published_at IS NOT NULL", 30).await);
    assert_eq!(
        commits(&table, "true").await,
        1,
        "the whole key went out in one batch"
    );
    let calls = calls.lock().expect("lock").clone();
    let expected: Vec<Vec<String>> = (0..30).map(|i| vec![i.to_string()]).collect();
    assert_eq!(
        calls, expected,
        "each row of the key was sent alone, after the one before it was confirmed"
    );
    relay.stop().await;
    queue.delete().await;
}

/// A row refused by the broker stops its key for the batch: the key's later rows are not
/// sent, use no attempt, and wait behind it while it waits for its retry. Other keys go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn later_rows_of_a_key_wait_while_an_earlier_row_fails() {
    let retry = "retry = { backoff = \"fixed\", initial = \"1h\", jitter = 0.0 }";
    let settings = format!("{PER_KEY}\nmax_attempts = 5\n{retry}");
    let (table, queue, _file, config) = to_rabbit("ob_keystop", &["keystop"], &settings).await;
    // One transaction: K's first row goes to an exchange that does not exist; its last row
    // could never be sent (headers not an object), but is not reached either.
    let missing = unique("ob_no_such_exchange");
    insert_rows(
        &table,
        &queue.name,
        &[
            (missing.as_str(), Some("K"), "K0", "{}"),
            ("", Some("K"), "K1", "{}"),
            ("", Some("K"), "K2", "[1]"),
            ("", Some("L"), "L0", "{}"),
            ("", Some("L"), "L1", "{}"),
            ("", None, "free", "{}"),
        ],
    )
    .await;
    let relays = start_all(config);

    let got = queue.wait_len(3).await;
    assert!(
        table
            .wait_count(
                "payload = 'K0' AND attempts = 1 AND last_error IS NOT NULL",
                1
            )
            .await
    );
    let error = last_error(&table, "payload = 'K0'").await;
    assert!(error.contains(&missing), "{error}");
    // Time for many more batches: K's later rows must stay behind K0 until its retry.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        table
            .count(
                "partition_key = 'K' AND payload <> 'K0' AND attempts = 0 AND published_at IS NULL \
                 AND failed_at IS NULL AND last_error IS NULL"
            )
            .await,
        2,
        "K's later rows are pending and untouched"
    );
    let got_now = queue.received();
    assert_eq!(got_now.len(), 3, "{got_now:?}");
    let bodies = bodies_of(&got);
    let l_rows: Vec<&str> = bodies
        .iter()
        .copied()
        .filter(|b| b.starts_with('L'))
        .collect();
    assert_eq!(l_rows, ["L0", "L1"]);
    assert!(bodies.contains(&"free"), "{bodies:?}");
    finish(relays, queue).await;
}

/// A row that can never be sent is given up at its first attempt; its key's later rows are
/// not sent in that batch but in the next one, after the failure is committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_moves_on_once_its_earlier_row_is_given_up() {
    let (table, queue, _file, config) =
        to_rabbit("ob_keygiveup", &["keygiveup"], PER_KEY_NO_POLL).await;
    // Headers that are not a JSON object: the row cannot become a message.
    let rows = [("[1, 2]", "K0"), ("{}", "K1"), ("{}", "K2")];
    let rows: Vec<_> = rows.iter().map(|(h, p)| ("", Some("K"), *p, *h)).collect();
    insert_rows(&table, &queue.name, &rows).await;
    let relays = start_all(config);

    let got = queue.wait_len(2).await;
    let bodies = bodies_of(&got);
    assert_eq!(bodies, ["K1", "K2"]);
    assert!(
        table
            .wait_count(
                "payload = 'K0' AND failed_at IS NOT NULL AND attempts = 1",
                1
            )
            .await
    );
    assert!(
        table
            .wait_count("published_at IS NOT NULL AND attempts = 1", 2)
            .await
    );
    let later: i64 = sqlx::query_scalar(&format!(
        "SELECT count(*) FROM {t} p, {t} f
         WHERE f.payload = 'K0' AND p.published_at > f.failed_at",
        t = table.name
    ))
    .fetch_one(&table.pool)
    .await
    .expect("compare");
    assert_eq!(
        later, 2,
        "K1 and K2 went out in a later batch than K0's failure"
    );
    finish(relays, queue).await;
}

/// A key longer than one `publish_timeout` of confirms still drains: a batch stops starting
/// rounds halfway through the timeout and commits what was confirmed, instead of timing out
/// and rolling back every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_longer_than_the_publish_timeout_still_drains() {
    let (table, queue, _file, config) = to_rabbit(
        "ob_keylong",
        &["keylong"],
        &format!("batch = 1000\n{PER_KEY_NO_POLL}\npublish_timeout = \"1s\""),
    )
    .await;
    // Each row waits for the confirm of the one before (a few ms for a persistent message):
    // 1,000 of them take longer than 1 s.
    let rows = keyed(1000);
    table.insert(None, &queue.name, &rows).await;
    let relays = start_all(config);
    assert!(table.wait_count("published_at IS NOT NULL", 1000).await);
    let got = queue.wait_len(1000).await;
    // A batch rolled back by a confirm slower than the timeout would send rows again: a
    // duplicate, never a row ahead of one before it.
    let mut seen = BTreeSet::new();
    let firsts: Vec<usize> = got
        .iter()
        .map(|(_, b)| b.parse().expect("n"))
        .filter(|n| seen.insert(*n))
        .collect();
    assert_eq!(firsts, (0..1000).collect::<Vec<_>>());
    assert!(commits(&table, "true").await > 1);
    finish(relays, queue).await;
}

/// Rows behind a key's head are taken only as an unbroken run: a row of the key that some
/// other session holds locked stops the key there, and the rows behind it wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_stops_at_a_row_locked_elsewhere() {
    let (table, queue, _file, config) = to_rabbit("ob_keygap", &["keygap"], PER_KEY).await;
    let rows = keyed(3);
    table.insert(None, &queue.name, &rows).await;
    let mut holder = table.pool.begin().await.expect("begin");
    sqlx::query(&format!(
        "SELECT id FROM {} WHERE payload = '1' FOR UPDATE",
        table.name
    ))
    .fetch_one(&mut *holder)
    .await
    .expect("lock row 1");
    let relays = start_all(config);

    let got = queue.wait_len(1).await;
    assert_eq!(got[0].1, "0");
    // Time for many claims: row 2 must not overtake the held row 1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let bodies: Vec<String> = queue.received().into_iter().map(|(_, b)| b).collect();
    assert_eq!(bodies, ["0"]);
    assert_eq!(
        table
            .count("payload <> '0' AND published_at IS NULL AND attempts = 0")
            .await,
        2
    );

    holder.commit().await.expect("release");
    let got = queue.wait_len(3).await;
    let bodies = bodies_of(&got);
    assert_eq!(bodies, ["0", "1", "2"]);
    finish(relays, queue).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_python_designs_outbox_table_is_relayed_unchanged() {
    let table = existing_table("ob_python", PYTHON_OUTBOX_DDL).await;
    let queue = Queue::new("ob_python").await;
    let exchange = unique("ob_python_events");
    queue
        .channel
        .exchange_declare(
            exchange.as_str().into(),
            lapin::ExchangeKind::Topic,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare exchange");
    queue
        .channel
        .queue_bind(
            queue.name.as_str().into(),
            exchange.as_str().into(),
            "order.*".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let payloads: Vec<String> = (0..30)
        .map(|i| format!("{{\"order_id\": {i}, \"status\": \"created\"}}"))
        .collect();
    insert_as_python(&table, &exchange, "order.created", &payloads).await;

    let (_file, config) = config(&["python"], &table.name, PYTHON_OUTBOX_MAPPING);
    let relays = start_all(config);
    assert!(table.wait_count("status = 'published'", 30).await);
    let received = queue.wait_len(30).await;
    let bodies = bodies_of(&received);
    let expected: Vec<&str> = payloads.iter().map(String::as_str).collect();
    assert_eq!(bodies, expected, "bodies unchanged, in id order");
    let ids: BTreeSet<&str> = received.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(ids.len(), 30, "every message has its own message_id");
    assert!(ids.iter().all(|id| uuid::Uuid::parse_str(id).is_ok()));
    assert_eq!(table.count("status <> 'published'").await, 0);
    assert_eq!(table.count("error IS NOT NULL").await, 0);
    stop_all(relays).await;
    let _ = queue
        .channel
        .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    queue.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn null_mapped_columns_mark_the_row_failed_with_the_reason() {
    let _metrics = bosun::telemetry::metrics_handle();
    let table = existing_table(
        "ob_nulls",
        "CREATE TABLE {table} (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            topic text,
            body jsonb,
            state text NOT NULL DEFAULT 'new',
            failure text,
            tries integer NOT NULL DEFAULT 0)",
    )
    .await;
    let queue = Queue::new("ob_nulls").await;
    sqlx::query(&format!(
        "INSERT INTO {} (topic, body) VALUES ($1, '{{\"n\": 1}}'), (NULL, '{{\"n\": 2}}'), ($1, NULL), ($1, '{{\"n\": 4}}')",
        table.name
    ))
    .bind(&queue.name)
    .execute(&table.pool)
    .await
    .expect("insert");
    let (_file, config) = config(
        &["nulls"],
        &table.name,
        "target = \"rabbit\"\ndestination = \"\"\n\
         columns = { id = \"id\", routing_key = \"topic\", payload = \"body\", last_error = \"failure\", attempts = \"tries\" }\n\
         state = { column = \"state\", pending = \"new\", published = \"sent\", failed = \"dead\" }",
    );
    let relays = start_all(config);
    assert!(table.wait_count("state = 'sent'", 2).await);
    assert!(table.wait_count("state = 'dead'", 2).await);
    let received = queue.wait_len(2).await;
    let bodies = bodies_of(&received);
    assert_eq!(bodies, ["{\"n\": 1}", "{\"n\": 4}"]);
    let failures: Vec<(Option<String>, i32)> = sqlx::query_as(&format!(
        "SELECT failure, tries FROM {} WHERE state = 'dead' ORDER BY id",
        table.name
    ))
    .fetch_all(&table.pool)
    .await
    .expect("failures");
    assert_eq!(
        failures,
        [
            (
                Some("the row's routing key (column `topic`) is NULL".to_owned()),
                1
            ),
            (
                Some("the row's payload (column `body`) is NULL".to_owned()),
                1
            ),
        ]
    );
    let failed = outbox_metric("bosun_outbox_failed_total", "nulls");
    assert_eq!(failed, Some(2.0));
    finish(relays, queue).await;
}

#[test]
fn a_column_mapping_is_validated_when_the_config_loads() {
    let table = unique("ob_badmap").to_lowercase();
    for (extra, expected) in [
        (
            "columns = { id = \"id\", routing_key = \"rk\", payload = \"p; drop table x\" }\nstate = { column = \"status\" }",
            "payload column `p; drop table x` is not a plain lowercase SQL identifier",
        ),
        (
            "columns = { id = \"id\", routing_key = \"rk\", payload = \"p\" }",
            "`columns` needs `state`",
        ),
        (
            "columns = { id = \"id\", routing_key = \"id\", payload = \"p\" }\nstate = { column = \"status\" }",
            "column `id` is mapped twice (id and routing_key)",
        ),
        (
            "columns = { id = \"id\", routing_key = \"rk\", payload = \"p\" }\nstate = { column = \"status\", pending = \"x\", failed = \"x\" }",
            "state values pending and failed are both \"x\"",
        ),
        (
            "columns = { id = \"id\", routing_key = \"rk\", payload = \"p\" }\nstate = { column = \"status\", published = \"a\\\\b\" }",
            "without control characters or `\\`",
        ),
    ] {
        let text = format!(
            "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
             [databases.main]\nurl = \"{PG_URL}\"\n\
             [outboxes.bad]\ndatabase = \"main\"\ntable = \"{table}\"\ntarget = \"rabbit\"\n{extra}\n"
        );
        let file = ConfigFile::new(&text);
        let error = bosun::Runtime::builder()
            .build()
            .load(&file.path)
            .expect_err("an invalid mapping is refused");
        assert!(error.to_string().contains(expected), "{expected}\n{error}");
    }
}
