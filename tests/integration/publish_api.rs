//! The publish API of the real daemon: `POST /v1/publish` now and at a time, idempotency by
//! message id, scheduled sends across a restart, cancel, refusals, and token roles; and
//! `bosun publish --at` from the command line.

use std::time::Duration;

use base64::Engine as _;
use lapin::options::{BasicGetOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use serde_json::{Value, json};

use crate::support::outbox::{Queue, Table};
use crate::support::{ConfigFile, Daemon, PG_URL, RABBIT_URL, free_port, unique, wait_for};

const ADMIN_TOKEN: &str = "admin-token-0123456789abcdef0123456789";
const PUBLISHER_TOKEN: &str = "publisher-token-0123456789abcdef012345";
const VIEWER_TOKEN: &str = "viewer-token-0123456789abcdef0123456789";

/// A daemon with the publish API over rabbit, a broker nobody listens on (`down`, at
/// `down_port`), and a scheduled outbox on `table`.
struct Setup {
    config: ConfigFile,
    daemon: Daemon,
    table: Table,
    down_port: u16,
    http_port: u16,
}

fn config_text(dir: &std::path::Path, table: &str, http_port: u16, down_port: u16) -> String {
    for (file, token) in [
        ("admin.token", ADMIN_TOKEN),
        ("publisher.token", PUBLISHER_TOKEN),
        ("viewer.token", VIEWER_TOKEN),
    ] {
        std::fs::write(dir.join(file), token).expect("write token");
    }
    let d = dir.display();
    format!(
        r#"
[service]
name = "publish-api-test"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{http_port}"

[http.admin]
listen = "127.0.0.1:0"
token_file = "{d}/admin.token"

[http.admin.tokens.app]
token_file = "{d}/publisher.token"
roles = ["publisher"]

[http.admin.tokens.console]
token_file = "{d}/viewer.token"
roles = ["viewer"]

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.down]
kind = "amqp"
url = "amqp://guest:guest@127.0.0.1:{down_port}/%2f"

[databases.main]
url = "{PG_URL}"
max_connections = 8

[outboxes.later]
database = "main"
table = "{table}"
target = "rabbit"
destination = ""
# Scheduled rows go out because the relay wakes at their due time, not on a poll.
poll_interval = "1h"

[publish_api]
database = "main"
scheduled = ["later"]
max_body_size = "64KiB"
publish_timeout = "5s"
idempotency_table = "{table}_requests"
"#
    )
}

impl Setup {
    async fn start() -> Self {
        let table = Table::new("pub_api").await;
        let http_port = free_port();
        let down_port = free_port();
        // The token files live next to the config.
        let config = ConfigFile::new("");
        config.rewrite(&config_text(
            config.dir.path(),
            &table.name,
            http_port,
            down_port,
        ));
        let daemon = Daemon::start(&config.path, http_port);
        let setup = Self {
            config,
            daemon,
            table,
            down_port,
            http_port,
        };
        assert!(
            setup.daemon.wait_ready(Duration::from_secs(30)),
            "daemon not ready:\n{}",
            setup.daemon.logs()
        );
        setup
    }

    fn admin_base(&self) -> String {
        admin_base(&self.daemon)
    }

    async fn restart(&mut self) {
        self.daemon.signal(nix::sys::signal::Signal::SIGTERM);
        assert_eq!(self.daemon.wait_exit(Duration::from_secs(20)), Some(0));
        self.daemon = Daemon::start(&self.config.path, self.http_port);
        assert!(self.daemon.wait_ready(Duration::from_secs(30)));
    }
}

impl Drop for Setup {
    fn drop(&mut self) {
        let table = format!("{}_requests", self.table.name);
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async {
                if let Ok(pool) = sqlx::PgPool::connect(PG_URL).await {
                    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                        .execute(&pool)
                        .await;
                }
            });
        })
        .join();
    }
}

/// The admin API's own listener, from the daemon's log.
fn admin_base(daemon: &Daemon) -> String {
    wait_for(Duration::from_secs(10), || {
        daemon
            .logs()
            .lines()
            .filter(|l| l.contains("admin API listening"))
            .find_map(|l| {
                let value: Value = serde_json::from_str(l).ok()?;
                Some(format!("http://{}", value["listen"].as_str()?))
            })
    })
    .expect("admin API listening")
}

/// (status, headers, JSON body).
async fn call(
    method: reqwest::Method,
    url: &str,
    token: &str,
    build: impl FnOnce(reqwest::RequestBuilder) -> reqwest::RequestBuilder,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let client = reqwest::Client::new();
    let request = build(client.request(method, url).bearer_auth(token));
    let response = request.send().await.expect("admin API reachable");
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    let text = response.text().await.unwrap_or_default();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, headers, body)
}

async fn post(
    base: &str,
    token: &str,
    envelope: &Value,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let body = envelope.to_string();
    call(
        reqwest::Method::POST,
        &format!("{base}/v1/publish"),
        token,
        |r| r.header("content-type", "application/json").body(body),
    )
    .await
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

/// A durable queue nobody consumes, so that what arrives stays countable, and the
/// connection (of a helper queue) to look at it through.
async fn idle_queue(prefix: &str) -> (Queue, String) {
    let queue = Queue::new(prefix).await;
    let name = unique(prefix);
    queue
        .channel
        .queue_declare(
            name.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("declare");
    (queue, name)
}

async fn count(channel: &lapin::Channel, name: &str) -> u32 {
    channel
        .queue_declare(
            name.into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare")
        .message_count()
}

async fn get_one(channel: &lapin::Channel, name: &str) -> Option<lapin::message::BasicGetMessage> {
    channel
        .basic_get(name.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("basic.get")
}

/// The next message of `name`, waiting up to a minute for one.
async fn arrival(channel: &lapin::Channel, name: &str) -> Option<lapin::message::BasicGetMessage> {
    crate::support::wait_for_async(Duration::from_secs(60), || async {
        get_one(channel, name).await
    })
    .await
}

/// The scheduled message `id` once `GET /v1/scheduled/ID` shows it published.
async fn published(base: &str, id: &str) -> Option<Value> {
    let url = format!("{base}/v1/scheduled/{id}");
    crate::support::wait_for_async(Duration::from_secs(10), || async {
        let (_, _, shown) = call(reqwest::Method::GET, &url, PUBLISHER_TOKEN, |r| r).await;
        (shown["status"] == "published").then_some(shown)
    })
    .await
}

async fn delete_queue(channel: &lapin::Channel, name: &str) {
    let _ = channel
        .queue_delete(name.into(), lapin::options::QueueDeleteOptions::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_immediate_send_is_answered_200_only_once_the_broker_has_it() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_now").await;
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
                "headers": {"tenant": "acme"}, "content_type": "text/plain", "body": b64("hello")}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let id = body["message_id"]
        .as_str()
        .expect("a generated message id")
        .to_owned();
    // Confirmed before the answer: the queue holds it the moment 200 arrives.
    let got = get_one(&probe.channel, &queue)
        .await
        .expect("in the queue at 200");
    assert_eq!(got.delivery.data, b"hello");
    let props = &got.delivery.properties;
    assert_eq!(
        props.message_id().as_ref().map(|s| s.as_str()),
        Some(id.as_str())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.as_str()),
        Some("text/plain")
    );
    assert_eq!(props.delivery_mode(), &Some(2));

    // The raw form: the body as is, headers as `Header-*`.
    let url =
        format!("{base}/v1/publish?broker=rabbit&exchange=&routing_key={queue}&message_id=raw-1");
    let (status, _, body) = call(reqwest::Method::POST, &url, PUBLISHER_TOKEN, |r| {
        r.header("content-type", "application/octet-stream")
            .header("header-tenant", "acme")
            .body(vec![0u8, 1, 2])
    })
    .await;
    assert_eq!(status, 200, "{body}");
    let got = get_one(&probe.channel, &queue)
        .await
        .expect("raw message in the queue at 200");
    assert_eq!(got.delivery.data, vec![0u8, 1, 2]);
    let headers = crate::support::amqp::from_table(got.delivery.properties.headers().as_ref());
    assert_eq!(
        headers.get("tenant"),
        Some(&bosun::handler::HeaderValue::String("acme".into()))
    );
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_can_never_be_delivered_is_a_4xx() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    // amq.direct exists, but nothing is bound to this key: returned (mandatory).
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "amq.direct", "routing_key": unique("nobody")}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("unroutable"),
        "{body}"
    );
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": unique("missing_exchange")}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    // The refusal is not remembered: the same id can be sent once the cause is fixed.
    let (probe, queue) = idle_queue("pub_fixed").await;
    let (status, _, _) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "amq.direct", "routing_key": queue, "message_id": "fix-1"}),
    )
    .await;
    assert_eq!(status, 422);
    probe
        .channel
        .queue_bind(
            queue.as_str().into(),
            "amq.direct".into(),
            queue.as_str().into(),
            Default::default(),
            FieldTable::default(),
        )
        .await
        .expect("bind");
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "amq.direct", "routing_key": queue, "message_id": "fix-1"}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&probe.channel, &queue).await, 1);
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_nack_is_503_to_retry_not_a_4xx() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    // A full queue that refuses more: the broker nacks the publish.
    let probe = Queue::new("pub_full").await;
    let queue = unique("pub_full");
    let mut args = FieldTable::default();
    args.insert("x-max-length".into(), lapin::types::AMQPValue::LongInt(1));
    args.insert(
        "x-overflow".into(),
        lapin::types::AMQPValue::LongString("reject-publish".into()),
    );
    probe
        .channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare");
    let envelope = |id: &str| {
        json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
               "message_id": id, "body": b64("x")})
    };
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &envelope(&unique("first"))).await;
    assert_eq!(status, 200, "{body}");
    let id = unique("nacked");
    let (status, headers, body) = post(&base, PUBLISHER_TOKEN, &envelope(&id)).await;
    assert_eq!(status, 503, "a nack is worth retrying: {body}");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    assert_eq!(body["message_id"], id.as_str(), "{body}");
    // Once there is room, the client's retry with the same id goes through.
    get_one(&probe.channel, &queue)
        .await
        .expect("the first message");
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &envelope(&id)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(count(&probe.channel, &queue).await, 1);
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

/// Forwards connections on `listener` to RabbitMQ: the `down` broker coming back.
fn forward_to_rabbit(listener: tokio::net::TcpListener) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_broker_is_503_and_the_retry_sends_the_message_once() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_down").await;
    let envelope = json!({"broker": "down", "exchange": "", "routing_key": queue,
                          "message_id": unique("down"), "body": b64("kept")});
    let (status, headers, body) = post(&base, PUBLISHER_TOKEN, &envelope).await;
    assert_eq!(status, 503, "{body}");
    assert!(headers.get("retry-after").is_some(), "{headers:?}");
    // The broker comes back on the same address: the client's retry sends it, once.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", setup.down_port))
        .await
        .expect("bind the down broker's port");
    let proxy = forward_to_rabbit(listener);
    let (status, headers, body) = post(&base, PUBLISHER_TOKEN, &envelope).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        headers.get("idempotent-replayed").is_none(),
        "the 503 was not remembered"
    );
    assert_eq!(count(&probe.channel, &queue).await, 1);
    proxy.abort();
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_broker_leaves_database_connections_to_the_rest() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    // A broker that takes connections and never answers: every send waits `publish_timeout`.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", setup.down_port))
        .await
        .expect("bind the down broker's port");
    let blackhole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            held.push(stream);
        }
    });
    let sends: Vec<_> = (0..10)
        .map(|n| {
            let base = base.clone();
            tokio::spawn(async move {
                post(
                    &base,
                    PUBLISHER_TOKEN,
                    &json!({"broker": "down", "exchange": "", "message_id": format!("stall-{n}")}),
                )
                .await
            })
        })
        .collect();
    // The pool has 8 connections: the waiting sends hold at most 6 of them.
    let holding = format!(
        "SELECT count(*) FROM pg_stat_activity
         WHERE state = 'idle in transaction' AND query LIKE '%{}_requests%'",
        setup.table.name
    );
    let mut most = 0i64;
    for _ in 0..30 {
        let now: i64 = sqlx::query_scalar(&holding)
            .fetch_one(&setup.table.pool)
            .await
            .expect("pg_stat_activity");
        most = most.max(now);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(most >= 1, "no send was waiting on the broker");
    assert!(
        most <= 6,
        "{most} connections held by sends waiting on the broker"
    );
    for (n, send) in sends.into_iter().enumerate() {
        let (status, _, body) = send.await.expect("send task");
        assert_eq!(status, 503, "{body}");
        // The id to send again with.
        assert_eq!(body["message_id"], format!("stall-{n}"), "{body}");
    }
    blackhole.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_records_table_is_created_once_the_database_is_back() {
    let table = Table::new("pub_api_late").await;
    let pg_port = free_port();
    let config = ConfigFile::new("");
    // The database is unreachable at start: its address has no listener yet.
    let text = config_text(config.dir.path(), &table.name, free_port(), free_port()).replace(
        PG_URL,
        &format!("postgres://postgres@127.0.0.1:{pg_port}/test"),
    );
    config.rewrite(&text);
    let daemon = Daemon::start(&config.path, free_port());
    let base = admin_base(&daemon);
    let (probe, queue) = idle_queue("pub_late").await;
    let envelope = json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
                          "message_id": unique("late"), "body": b64("late")});
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &envelope).await;
    assert_eq!(status, 503, "{body}");
    // The database comes back at that address.
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", pg_port))
        .await
        .expect("bind the database's port");
    let proxy = tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect("127.0.0.1:5432").await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    let sent = crate::support::wait_for_async(Duration::from_secs(30), || async {
        let (status, _, _) = post(&base, PUBLISHER_TOKEN, &envelope).await;
        (status == 200).then_some(())
    })
    .await;
    assert!(sent.is_some(), "never published:\n{}", daemon.logs());
    assert_eq!(count(&probe.channel, &queue).await, 1);
    proxy.abort();
    drop(daemon);
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}_requests", table.name))
        .execute(&table.pool)
        .await;
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_message_id_is_sent_once_in_sequence_and_concurrently() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_idem").await;
    let envelope = json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
                          "message_id": unique("once"), "body": b64("one")});
    let (first, _, first_body) = post(&base, PUBLISHER_TOKEN, &envelope).await;
    let (second, headers, second_body) = post(&base, PUBLISHER_TOKEN, &envelope).await;
    assert_eq!((first, second), (200, 200), "{first_body} {second_body}");
    assert_eq!(first_body, second_body);
    assert_eq!(
        headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(count(&probe.channel, &queue).await, 1);

    // Concurrent repeats: one is sent, the others wait for its answer.
    let envelope = json!({"broker": "rabbit", "exchange": "", "routing_key": queue,
                          "message_id": unique("race"), "body": b64("two")});
    let answers =
        futures::future::join_all((0..16).map(|_| post(&base, PUBLISHER_TOKEN, &envelope))).await;
    for (status, _, body) in &answers {
        assert_eq!(*status, 200, "{body}");
    }
    let replayed = answers
        .iter()
        .filter(|(_, h, _)| h.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replayed, 15);
    assert_eq!(count(&probe.channel, &queue).await, 2);

    // The same id for another request is a conflict, not a replay.
    let mut other = envelope.clone();
    other["body"] = json!(b64("different"));
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &other).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(count(&probe.channel, &queue).await, 2);
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_message_waits_for_its_time_and_survives_a_restart() {
    let mut setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_later").await;
    let id = uuid::Uuid::now_v7().to_string();
    let deliver_at = chrono::Utc::now() + chrono::Duration::seconds(6);
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "routing_key": queue, "message_id": id,
                "deliver_at": deliver_at.to_rfc3339(), "body": b64("later")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "scheduled");
    // Durable when answered: the row is there.
    assert_eq!(
        setup
            .table
            .count(&format!("message_id = '{id}' AND published_at IS NULL"))
            .await,
        1
    );
    let (status, _, shown) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/scheduled/{id}"),
        PUBLISHER_TOKEN,
        |r| r,
    )
    .await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["status"], "scheduled");

    // Not before its time, and not lost across a restart in between.
    setup.restart().await;
    if chrono::Utc::now() < deliver_at {
        assert_eq!(count(&probe.channel, &queue).await, 0, "delivered early");
    }
    let arrived = arrival(&probe.channel, &queue)
        .await
        .expect("delivered after its time");
    assert!(
        chrono::Utc::now() >= deliver_at,
        "delivered before deliver_at"
    );
    assert_eq!(arrived.delivery.data, b"later");
    assert_eq!(
        arrived
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(id.clone())
    );
    let base = setup.admin_base();
    let shown = published(&base, &id).await;
    assert!(shown.is_some(), "shown as published");
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delay_is_counted_by_the_databases_clock() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let id = uuid::Uuid::now_v7().to_string();
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "routing_key": "nowhere", "message_id": id,
                "delay": "10m", "body": b64("in ten minutes")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // `created_at` is the storing transaction's now(): the due time is exactly 10 minutes
    // after it, to the microsecond. A due time from bosun's clock is taken at another moment
    // (and on a host whose clock may be off), never exactly this.
    let (created, due, exact): (
        chrono::DateTime<chrono::Utc>,
        chrono::DateTime<chrono::Utc>,
        bool,
    ) = sqlx::query_as(&format!(
        "SELECT created_at, next_attempt_at, next_attempt_at = created_at + interval '10 minutes'
         FROM {} WHERE message_id = $1",
        setup.table.name
    ))
    .bind(uuid::Uuid::parse_str(&id).expect("uuid"))
    .fetch_one(&setup.table.pool)
    .await
    .expect("the stored row");
    assert!(exact, "stored at {created}, due at {due}");
    let answered = chrono::DateTime::parse_from_rfc3339(body["deliver_at"].as_str().unwrap_or(""))
        .expect("deliver_at in the answer");
    assert!(
        (answered.with_timezone(&chrono::Utc) - due)
            .num_milliseconds()
            .abs()
            <= 1,
        "answered {answered}, stored {due}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_parked_at_infinity_does_not_stop_scheduled_sends() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_inf").await;
    // A row some tool parked for ever: never due, and never a reason to stop the relay.
    sqlx::query(&format!(
        "INSERT INTO {} (routing_key, payload, next_attempt_at) VALUES ($1, 'parked', 'infinity')",
        setup.table.name
    ))
    .bind(&queue)
    .execute(&setup.table.pool)
    .await
    .expect("insert the parked row");
    for n in 0..2 {
        let id = uuid::Uuid::now_v7().to_string();
        let (status, _, body) = post(
            &base,
            PUBLISHER_TOKEN,
            &json!({"broker": "rabbit", "exchange": "", "routing_key": queue, "message_id": id,
                    "delay": "1s", "body": b64(&format!("due {n}"))}),
        )
        .await;
        assert_eq!(status, 202, "{body}");
        // The relay polls hourly: only its wake at the due time sends this.
        assert!(
            published(&base, &id).await.is_some(),
            "scheduled message {n} not published:\n{}",
            setup.daemon.logs()
        );
    }
    assert!(setup.daemon.wait_ready(Duration::from_secs(5)));
    assert_eq!(count(&probe.channel, &queue).await, 2);
    assert_eq!(
        setup
            .table
            .count("payload = 'parked' AND published_at IS NULL AND failed_at IS NULL")
            .await,
        1
    );
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_id_in_any_spelling_is_one_message() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let id = uuid::Uuid::now_v7().to_string();
    let envelope = |spelling: String| {
        json!({"broker": "rabbit", "exchange": "", "routing_key": "nobody",
               "message_id": spelling, "delay": "1h", "body": b64("once")})
    };
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &envelope(format!("{{{}}}", id.to_uppercase())),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    assert_eq!(
        body["message_id"],
        id.as_str(),
        "answered in canonical form"
    );
    let (status, headers, body) = post(&base, PUBLISHER_TOKEN, &envelope(id.clone())).await;
    assert_eq!(status, 202, "{body}");
    assert!(
        headers.get("idempotent-replayed").is_some(),
        "the canonical spelling repeats the first request: {body}"
    );
    assert_eq!(setup.table.count(&format!("message_id = '{id}'")).await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_headers_are_measured_as_the_relay_will_read_them() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    // 2 KB as sent; as jsonb stores and prints it, each `1e300` is 301 digits: over 64 KiB.
    let wide: Vec<Value> = (0..300)
        .map(|_| serde_json::from_str("1e300").expect("a number"))
        .collect();
    let id = uuid::Uuid::now_v7().to_string();
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "routing_key": "nobody", "message_id": id,
                "delay": "1h", "headers": {"wide": wide}}),
    )
    .await;
    assert_eq!(
        status, 400,
        "a row the relay would fail is refused now: {body}"
    );
    assert!(
        body["error"].as_str().unwrap_or("").contains("headers"),
        "{body}"
    );
    assert_eq!(setup.table.count(&format!("message_id = '{id}'")).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_works_until_the_message_is_sent_and_fails_clearly_after() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let (probe, queue) = idle_queue("pub_cancel").await;
    let schedule = |id: &str, delay: &str| {
        json!({"broker": "rabbit", "exchange": "", "routing_key": queue, "message_id": id,
               "delay": delay, "body": b64("maybe")})
    };
    let cancelled = uuid::Uuid::now_v7().to_string();
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &schedule(&cancelled, "3s")).await;
    assert_eq!(status, 202, "{body}");
    let url = format!("{base}/v1/scheduled/{cancelled}");
    let (status, _, body) = call(reqwest::Method::DELETE, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["status"], "cancelled");
    let (status, _, _) = call(reqwest::Method::GET, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 404);

    let sent = uuid::Uuid::now_v7().to_string();
    let (status, _, body) = post(&base, PUBLISHER_TOKEN, &schedule(&sent, "1s")).await;
    assert_eq!(status, 202, "{body}");
    // The sent one arrives; the cancelled one, due earlier than... never.
    let arrived = arrival(&probe.channel, &queue)
        .await
        .expect("the scheduled message arrives");
    assert_eq!(
        arrived
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(sent.clone())
    );
    let url = format!("{base}/v1/scheduled/{sent}");
    let published = published(&base, &sent).await;
    assert!(published.is_some());
    let (status, _, body) = call(reqwest::Method::DELETE, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("published"),
        "{body}"
    );
    // Past the cancelled one's due time, nothing else came.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(count(&probe.channel, &queue).await, 0);
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

/// A TCP proxy to RabbitMQ on `listener` whose answers (broker to client) are held back
/// while `stalled` is set: publishes reach the broker, their confirms do not, until it is
/// cleared (nothing is dropped, so the connection stays sound).
fn stalling_proxy(
    listener: tokio::net::TcpListener,
    stalled: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    use std::sync::atomic::Ordering;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    tokio::spawn(async move {
        while let Ok((inbound, _)) = listener.accept().await {
            let stalled = stalled.clone();
            tokio::spawn(async move {
                let Ok(outbound) = tokio::net::TcpStream::connect("127.0.0.1:5672").await else {
                    return;
                };
                let (mut client_read, mut client_write) = inbound.into_split();
                let (mut broker_read, mut broker_write) = outbound.into_split();
                let up = tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_read, &mut broker_write).await;
                });
                let mut buffer = vec![0u8; 64 * 1024];
                loop {
                    let n = match broker_read.read(&mut buffer).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => n,
                    };
                    while stalled.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    if client_write.write_all(&buffer[..n]).await.is_err() {
                        break;
                    }
                }
                up.abort();
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_racing_a_publish_whose_confirm_is_lost_is_refused() {
    use std::sync::atomic::{AtomicBool, Ordering};
    let table = Table::new("pub_doubt").await;
    let http_port = free_port();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
        .await
        .expect("bind the proxy");
    let proxy_port = listener.local_addr().expect("proxy address").port();
    let stalled = std::sync::Arc::new(AtomicBool::new(false));
    let proxy = stalling_proxy(listener, stalled.clone());
    // The scheduled outbox publishes through the proxy, and gives up on a batch 3 s after
    // sending it.
    let config = ConfigFile::new("");
    let text = config_text(config.dir.path(), &table.name, http_port, free_port())
        .replace(
            "target = \"rabbit\"\ndestination = \"\"",
            "target = \"stall\"\ndestination = \"\"\npublish_timeout = \"3s\"",
        )
        .replace(
            "[databases.main]",
            &format!(
                "[brokers.stall]\nkind = \"amqp\"\nurl = \"amqp://guest:guest@127.0.0.1:{proxy_port}/%2f\"\n\n[databases.main]"
            ),
        );
    assert!(text.contains("target = \"stall\""), "{text}");
    config.rewrite(&text);
    let daemon = Daemon::start(&config.path, http_port);
    assert!(
        daemon.wait_ready(Duration::from_secs(30)),
        "daemon not ready:\n{}",
        daemon.logs()
    );
    let base = admin_base(&daemon);
    let (probe, queue) = idle_queue("pub_doubt").await;

    // From now on the broker takes messages but its confirms do not come back.
    stalled.store(true, Ordering::SeqCst);
    let id = uuid::Uuid::now_v7().to_string();
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "stall", "exchange": "", "routing_key": queue, "message_id": id,
                "delay": "1s", "body": b64("in doubt")}),
    )
    .await;
    assert_eq!(status, 202, "{body}");
    // Due, sent: the broker has it, while the relay still waits for the confirm with the
    // row locked.
    let arrived = crate::support::wait_for_async(Duration::from_secs(20), || async {
        (count(&probe.channel, &queue).await >= 1).then_some(())
    })
    .await;
    assert!(
        arrived.is_some(),
        "the relay never sent it:\n{}",
        daemon.logs()
    );
    // The cancel arrives during the publish; the relay's publish_timeout passes and it rolls
    // back, leaving the row pending as if never sent.
    let url = format!("{base}/v1/scheduled/{id}");
    let (status, _, body) = call(reqwest::Method::DELETE, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(
        status, 409,
        "a cancel of a message the broker has was answered {status}: {body}"
    );
    assert_eq!(body["status"], "sending", "{body}");
    assert_eq!(
        table.count(&format!("message_id = '{id}'")).await,
        1,
        "the row is kept, to be published again"
    );
    let (status, _, shown) = call(reqwest::Method::GET, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 200, "{shown}");
    assert_eq!(shown["status"], "sending", "{shown}");
    // A cancel that comes later is refused the same way.
    let (status, _, body) = call(reqwest::Method::DELETE, &url, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 409, "{body}");

    // The confirms flow again: the relay publishes it (again: at least once) and the record
    // of the batch goes once its rows are settled.
    stalled.store(false, Ordering::SeqCst);
    assert!(
        published(&base, &id).await.is_some()
            || crate::support::wait_for_async(Duration::from_secs(30), || async {
                let (_, _, shown) = call(reqwest::Method::GET, &url, PUBLISHER_TOKEN, |r| r).await;
                (shown["status"] == "published").then_some(())
            })
            .await
            .is_some(),
        "never published:\n{}",
        daemon.logs()
    );
    assert!(count(&probe.channel, &queue).await >= 1);
    drop(daemon);
    proxy.abort();
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}_requests", table.name))
        .execute(&table.pool)
        .await;
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

/// Sends the head of a raw publish declaring `length` body bytes and reads the answer
/// without sending the body: (status, body).
fn declared_length_answer(base: &str, length: usize) -> (u16, String) {
    use std::io::{Read as _, Write as _};
    let host = base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(host).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/publish?broker=rabbit&exchange= HTTP/1.1\r\nHost: {host}\r\n\
         Authorization: Bearer {PUBLISHER_TOKEN}\r\nContent-Length: {length}\r\n\
         Connection: close\r\n\r\n"
    )
    .expect("write head");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_a_clear_4xx() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let url = format!("{base}/v1/publish");
    let (status, _, body) = call(reqwest::Method::POST, &url, PUBLISHER_TOKEN, |r| {
        r.header("content-type", "application/json")
            .body("{\"broker\": ")
    })
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap_or("")
            .contains("invalid JSON"),
        "{body}"
    );

    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "nowhere", "exchange": ""}),
    )
    .await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("nowhere"),
        "{body}"
    );

    let past = (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339();
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "message_id": uuid::Uuid::now_v7().to_string(), "deliver_at": past}),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("in the past"),
        "{body}"
    );

    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "headers": {"bosun-error-kind": "permanent"}}),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // 10 MB against a 64 KiB limit: answered from the declared length, before the body is
    // read (a client still writing it sees the answer and a closed connection).
    let (status, body) = declared_length_answer(&base, 10 * 1024 * 1024);
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("over the limit"), "{body}");
    let big = vec![b'x'; 100 * 1024];
    let (status, _, body) = post(
        &base,
        PUBLISHER_TOKEN,
        &json!({"broker": "rabbit", "exchange": "", "body": base64::engine::general_purpose::STANDARD.encode(&big)}),
    )
    .await;
    assert_eq!(status, 413, "{body}");
    assert_eq!(
        setup.table.count("true").await,
        0,
        "nothing refused was scheduled"
    );
    // Each refusal is counted: malformed, unknown broker, past, bosun-*, two too large.
    assert_eq!(
        setup
            .daemon
            .metric("bosun_publish_api_requests_total", &["result=\"refused\""]),
        Some(6.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_tokens_with_the_publisher_role_may_publish() {
    let setup = Setup::start().await;
    let base = setup.admin_base();
    let envelope =
        json!({"broker": "rabbit", "exchange": "amq.direct", "routing_key": unique("k")});
    let (status, _, body) = post(&base, VIEWER_TOKEN, &envelope).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap_or("").contains("viewer"),
        "{body}"
    );
    let (status, _, _) = post(&base, "wrong-token-0123456789abcdef0123456789", &envelope).await;
    assert_eq!(status, 401);
    // The publisher may not touch dead letters; the viewer may read them, the admin do both.
    let letters = format!("{base}/admin/dead-letters/groups");
    let (status, _, _) = call(reqwest::Method::GET, &letters, PUBLISHER_TOKEN, |r| r).await;
    assert_eq!(status, 403);
    let purge = format!("{base}/admin/dead-letters/purge");
    let (status, _, _) = call(reqwest::Method::POST, &purge, VIEWER_TOKEN, |r| {
        r.body("{}")
    })
    .await;
    assert_eq!(status, 403);
    let (status, _, body) = post(&base, ADMIN_TOKEN, &envelope).await;
    assert_eq!(
        status, 422,
        "the admin token may publish (refused only as unroutable): {body}"
    );
    let (status, _, doc) = call(
        reqwest::Method::GET,
        &format!("{base}/v1/openapi.json"),
        VIEWER_TOKEN,
        |r| r,
    )
    .await;
    assert_eq!(status, 200);
    assert!(doc["paths"]["/v1/publish"]["post"].is_object());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bosun_publish_at_schedules_like_the_api() {
    let setup = Setup::start().await;
    let (probe, queue) = idle_queue("pub_cli").await;
    let at = (chrono::Utc::now() + chrono::Duration::seconds(2)).to_rfc3339();
    let path = setup.config.path.to_string_lossy().into_owned();
    let (code, out, err) = crate::support::bosun_output(
        &[
            "publish",
            "--config",
            &path,
            "--allow-insecure-config",
            "--broker",
            "rabbit",
            "--exchange",
            "",
            "--routing-key",
            &queue,
            "--header",
            "tenant=acme",
            "--at",
            &at,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("scheduled for"), "{err}");
    let id = out.trim().to_owned();
    assert_eq!(
        setup
            .table
            .count(&format!(
                "message_id = '{id}' AND next_attempt_at > created_at"
            ))
            .await,
        1
    );
    let arrived = arrival(&probe.channel, &queue)
        .await
        .expect("the CLI's scheduled message arrives");
    assert_eq!(
        arrived
            .delivery
            .properties
            .message_id()
            .as_ref()
            .map(|s| s.to_string()),
        Some(id)
    );
    // --in without a scheduled outbox for the broker: a clear refusal.
    let (code, _, err) = crate::support::bosun_output(
        &[
            "publish",
            "--config",
            &path,
            "--allow-insecure-config",
            "--broker",
            "down",
            "--exchange",
            "",
            "--in",
            "5m",
        ],
        &[],
    );
    assert_eq!(code, 1);
    assert!(err.contains("no scheduled outbox"), "{err}");
    delete_queue(&probe.channel, &queue).await;
    probe.delete().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_enqueue_writes_immediate_and_scheduled_rows_in_the_callers_transaction() {
    let table = Table::new("enqueue").await;
    let mut tx = table.pool.begin().await.expect("begin");
    let now = bosun::outbox::enqueue(
        &mut tx,
        &bosun::outbox::Message::new("k", b"now".to_vec())
            .table(table.name.clone())
            .destination("shop")
            .header("tenant", "acme"),
    )
    .await
    .expect("enqueue now");
    let at = chrono::Utc::now() + chrono::Duration::hours(1);
    let later = bosun::outbox::enqueue(
        &mut tx,
        &bosun::outbox::Message::new("k", b"later".to_vec())
            .table(table.name.clone())
            .deliver_at(at),
    )
    .await
    .expect("enqueue later");
    // Nothing is visible before the caller commits.
    assert_eq!(table.count("true").await, 0);
    tx.commit().await.expect("commit");
    assert_eq!(table.count("next_attempt_at <= now()").await, 1);
    assert_eq!(
        table
            .count(&format!(
                "message_id = '{}' AND next_attempt_at > now()",
                later.message_id
            ))
            .await,
        1
    );
    assert!(later.deliver_at > now.deliver_at);

    // A delay is added to the transaction's now() by PostgreSQL, not to this host's clock:
    // in a transaction that began a while ago, the due time is exactly its start + delay.
    let mut tx = table.pool.begin().await.expect("begin");
    let started: chrono::DateTime<chrono::Utc> = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await
        .expect("now()");
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let delayed = bosun::outbox::enqueue(
        &mut tx,
        &bosun::outbox::Message::new("k", b"delayed".to_vec())
            .table(table.name.clone())
            .deliver_in(Duration::from_secs(600)),
    )
    .await
    .expect("enqueue delayed");
    tx.commit().await.expect("commit");
    assert_eq!(
        delayed.deliver_at,
        started + chrono::Duration::seconds(600),
        "the delay counts from the database's now()"
    );

    let refused = bosun::outbox::enqueue(
        &mut table.pool.acquire().await.expect("conn"),
        &bosun::outbox::Message::new("k", b"x".to_vec()).table("x; drop table y"),
    )
    .await;
    assert!(matches!(
        refused,
        Err(bosun::OutboxError::InvalidIdentifier(_))
    ));
}

/// Each statement of docs/outbox-from-applications.md (the SQL block and every language's
/// copy), with its driver's placeholders made PostgreSQL's and string concatenation undone.
fn documented_statements() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/outbox-from-applications.md"),
    )
    .expect("read the doc");
    let fence = regex::Regex::new(r"(?s)```(\w+)\n(.*?)```").expect("regex");
    let joins = regex::Regex::new(r#"["']\s*\+?\s*\n\s*\+?\s*["']"#).expect("regex");
    let placeholder = regex::Regex::new(r"%s|\?").expect("regex");
    let mut out = Vec::new();
    for block in fence.captures_iter(&text) {
        let code = joins.replace_all(&block[2], "");
        let Some(start) = code.find("INSERT INTO bosun_outbox") else {
            continue;
        };
        let Some(end) = code[start..].find("RETURNING message_id") else {
            continue;
        };
        let statement = &code[start..start + end + "RETURNING message_id".len()];
        let mut n = 0;
        let statement = placeholder.replace_all(statement, |_: &regex::Captures| {
            n += 1;
            format!("${n}")
        });
        out.push((
            block[1].to_owned(),
            statement.split_whitespace().collect::<Vec<_>>().join(" "),
        ));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_documented_outbox_inserts_run_immediate_and_scheduled() {
    let statements = documented_statements();
    let languages: Vec<&str> = statements.iter().map(|(l, _)| l.as_str()).collect();
    for language in ["sql", "python", "go", "javascript", "java"] {
        assert!(
            languages.contains(&language),
            "no {language} example: {languages:?}"
        );
    }
    let table = Table::new("doc_sql").await;
    let at = chrono::Utc::now() + chrono::Duration::hours(2);
    for (language, statement) in &statements {
        assert_eq!(
            statement, &statements[0].1,
            "{language} differs from the SQL block"
        );
        let statement = statement.replace("bosun_outbox", &table.name);
        for deliver_at in [None, Some(at)] {
            let id: uuid::Uuid = sqlx::query_scalar(&statement)
                .bind("shop")
                .bind("order.paid")
                .bind(r#"{"tenant":"acme"}"#)
                .bind(b"{}".to_vec())
                .bind("application/json")
                .bind(deliver_at)
                .fetch_one(&table.pool)
                .await
                .unwrap_or_else(|e| panic!("{language}: {e}\n{statement}"));
            let scheduled = table
                .count(&format!(
                    "message_id = '{id}' AND next_attempt_at > now() + interval '1 hour'"
                ))
                .await;
            assert_eq!(scheduled, i64::from(deliver_at.is_some()), "{language}");
        }
    }
}

#[test]
fn the_configuration_refuses_weak_tokens_unknown_roles_and_unschedulable_outboxes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (short, long) = (dir.path().join("short"), dir.path().join("long"));
    std::fs::write(&short, "short").expect("write");
    std::fs::write(&long, ADMIN_TOKEN).expect("write");
    let (short, long) = (short.display(), long.display());
    let load = |text: &str| {
        bosun::config::load_str_with(
            text,
            "test",
            &bosun::handler::HandlerKinds::default(),
            &bosun::config::Env::default(),
            bosun::config::Secrets::Required,
        )
        .map(|_| ())
        .map_err(|e| e.to_string())
    };
    let base = format!(
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n\
         [databases.main]\nurl = \"{PG_URL}\"\n[databases.other]\nurl = \"{PG_URL}\"\n\
         [outboxes.elsewhere]\ndatabase = \"other\"\ntarget = \"rabbit\"\n"
    );
    let error = load(&format!(
        "{base}[http.admin.tokens.app]\ntoken_file = \"{short}\"\nroles = [\"publisher\"]\n"
    ))
    .expect_err("a short token");
    assert!(error.contains("at least 32"), "{error}");
    let error = load(&format!(
        "{base}[http.admin.tokens.app]\ntoken_file = \"{long}\"\nroles = [\"root\"]\n"
    ))
    .expect_err("an unknown role");
    assert!(error.contains("unknown role"), "{error}");
    let error = load(&format!(
        "{base}[http.admin.tokens.app]\ntoken_file = \"{long}\"\nroles = [\"publisher\"]\n\
         [publish_api]\ndatabase = \"main\"\nscheduled = [\"elsewhere\"]\n"
    ))
    .expect_err("a scheduled outbox in another database");
    assert!(error.contains("must be the same"), "{error}");
    let error = load(&format!("{base}[publish_api]\ndatabase = \"main\"\n"))
        .expect_err("no admin listener");
    assert!(error.contains("admin listener"), "{error}");
    load(&format!(
        "{base}[http.admin.tokens.app]\ntoken_file = \"{long}\"\nroles = [\"publisher\"]\n\
         [publish_api]\ndatabase = \"other\"\nscheduled = [\"elsewhere\"]\n"
    ))
    .expect("a publisher token alone and a scheduled outbox in the API's database");
}
