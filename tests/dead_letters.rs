//! Dead-letter processors against real Redis, RabbitMQ and PostgreSQL: every matcher and
//! action, replays that reach the original queue or stream and are handled, the replay limit,
//! and the archive operations through both the `bosun dlq` binary and the admin HTTP API.

mod support;

use std::time::Duration;

use redis::AsyncCommands as _;
use sqlx::PgPool;
use support::*;

const TOKEN_VAR: &str = "BOSUN_TEST_DLQ_ADMIN_TOKEN";
const TOKEN: &str = "s3cret-admin-token";
const WAIT: Duration = Duration::from_secs(30);

async fn pg() -> PgPool {
    PgPool::connect(PG_URL)
        .await
        .expect("connect to PostgreSQL")
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn xadd(conn: &mut redis::aio::MultiplexedConnection, stream: &str, fields: &[(&str, &str)]) {
    let _: String = conn.xadd(stream, "*", fields).await.expect("XADD");
}

type Fields = Vec<(String, Vec<u8>)>;

async fn entries(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> Vec<Fields> {
    let reply: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    reply.into_iter().map(|(_, f)| f).collect()
}

fn field(fields: &Fields, name: &str) -> Option<String> {
    fields
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

/// (message_id, status, error_kind, replay_count, note) of every row, by id.
async fn rows(
    pool: &PgPool,
    table: &str,
) -> Vec<(Option<String>, String, String, i32, Option<String>)> {
    sqlx::query_as(&format!(
        "SELECT message_id, status, error_kind, replay_count, note FROM {table} ORDER BY id"
    ))
    .fetch_all(pool)
    .await
    .expect("query archive")
}

async fn row_id(pool: &PgPool, table: &str, message_id: &str) -> i64 {
    sqlx::query_scalar(&format!("SELECT id FROM {table} WHERE message_id = $1"))
        .bind(message_id)
        .fetch_one(pool)
        .await
        .expect("archived row")
}

async fn status_of(pool: &PgPool, table: &str, message_id: &str) -> String {
    sqlx::query_scalar(&format!("SELECT status FROM {table} WHERE message_id = $1"))
        .bind(message_id)
        .fetch_one(pool)
        .await
        .expect("archived row")
}

fn cli(config: &ConfigFile, args: &[&str]) -> (i32, String, String) {
    let path = config.path.to_string_lossy().into_owned();
    let mut full: Vec<&str> = vec!["dlq"];
    full.extend_from_slice(&args[..1]);
    full.extend_from_slice(&["--config", &path]);
    full.extend_from_slice(&args[1..]);
    bosun_output(&full, &[(TOKEN_VAR, TOKEN)])
}

fn cli_json(config: &ConfigFile, args: &[&str]) -> serde_json::Value {
    let (code, out, err) = cli(config, args);
    assert_eq!(code, 0, "bosun dlq {args:?} failed: {err}{out}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("bosun dlq {args:?}: {e}: {out}"))
}

fn admin(
    daemon: &Daemon,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, serde_json::Value) {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(auth) = &auth {
        headers.push(("Authorization", auth.as_str()));
    }
    let (status, text) = http_request(
        method,
        &format!("{}{path}", daemon.http),
        &headers,
        body.as_bytes(),
    )
    .expect("admin API reachable");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

fn logged_handled(daemon: &Daemon, handler: &str, message_id: &str) -> bool {
    daemon.logs().lines().any(|l| {
        l.contains(&format!("\"handler\":\"{handler}\""))
            && l.contains(&format!("\"message_id\":\"{message_id}\""))
    })
}

struct RedisSetup {
    config: ConfigFile,
    port: u16,
    table: String,
    stream: String,
    dlq: String,
    forward: String,
}

fn redis_setup(admin_token: bool) -> RedisSetup {
    let stream = unique("dl_orig");
    let dlq = format!("{stream}:dlq");
    let forward = unique("dl_parked");
    let table = unique("dl_archive");
    let port = free_port();
    let admin = if admin_token {
        format!("[http.admin]\ntoken_env = \"{TOKEN_VAR}\"\n")
    } else {
        String::new()
    };
    let config = ConfigFile::new(&format!(
        r#"
[service]
name = "dlq-test"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"
{admin}
[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4

[handlers.seen]
kind = "log"

[consumers.orig]
source = "cache"
handler = "seen"
stream = "{stream}"
group = "orig"

[dead_letters.dl]
source = "cache"
stream = "{dlq}"
archive = "main"
table = "{table}"

[[dead_letters.dl.rules]]
when = {{ error_kind = ["invalid"] }}
action = "drop"

[[dead_letters.dl.rules]]
when = {{ original = ["some-other-stream"] }}
action = "drop"

[[dead_letters.dl.rules]]
when = {{ error = "^replay", attempts_below = 3 }}
action = "replay"
max_replays = 2

[[dead_letters.dl.rules]]
when = {{ attempts_at_least = 4 }}
action = "drop"

[[dead_letters.dl.rules]]
when = {{ error = "^forward" }}
action = "forward"
stream = "{forward}"

[[dead_letters.dl.rules]]
when = {{ error = "^later" }}
action = "replay"
delay = "1s"
"#
    ));
    RedisSetup {
        config,
        port,
        table,
        stream,
        dlq,
        forward,
    }
}

/// A dead-letter entry as the redis consumer writes it.
fn dead(id: &str, stream: &str, kind: &str, error: &str, attempt: &str) -> Vec<(String, String)> {
    [
        ("payload", format!("{{\"id\":\"{id}\"}}")),
        ("message_id", id.to_owned()),
        ("content_type", "application/json".to_owned()),
        ("bosun-attempt", attempt.to_owned()),
        ("bosun-orig-stream", stream.to_owned()),
        ("bosun-orig-id", "1-0".to_owned()),
        ("bosun-group", "orig".to_owned()),
        ("bosun-consumer", "c1".to_owned()),
        ("bosun-deliveries", attempt.to_owned()),
        ("bosun-error", error.to_owned()),
        ("bosun-error-kind", kind.to_owned()),
        ("bosun-failed-at", "2026-01-02T03:04:05.000Z".to_owned()),
        ("tenant", "acme".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

async fn add(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
    fields: &[(String, String)],
) {
    let pairs: Vec<(&str, &str)> = fields
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    xadd(conn, stream, &pairs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_rules_apply_every_action_and_replays_are_handled() {
    let s = redis_setup(false);
    let (code, out, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}{out}");
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate runs twice: {err}");

    let mut conn = redis().await;
    let st = s.stream.as_str();
    let other = "some-other-stream";
    add(
        &mut conn,
        &s.dlq,
        &dead(
            "replay-now",
            st,
            "permanent",
            "replay: upstream was down",
            "1",
        ),
    )
    .await;
    let mut limit = dead(
        "replay-limit",
        st,
        "permanent",
        "replay: upstream was down",
        "1",
    );
    limit.push(("bosun-replay-count".into(), "2".into()));
    add(&mut conn, &s.dlq, &limit).await;
    for (id, stream, kind, error, attempt) in [
        ("invalid", st, "invalid", "not json", "1"),
        ("elsewhere", other, "permanent", "whatever", "1"),
        ("replay-tired", st, "exhausted", "replay: still down", "4"),
        ("forward-me", st, "permanent", "forward: for a person", "1"),
        ("later", st, "transient", "later: rate limited", "1"),
        ("slow-1", st, "exhausted", "timeout after 3012 ms", "2"),
        ("slow-2", st, "exhausted", "timeout after 87 ms", "2"),
    ] {
        add(&mut conn, &s.dlq, &dead(id, stream, kind, error, attempt)).await;
    }
    xadd(
        &mut conn,
        &s.dlq,
        &[
            ("payload", "no failure fields at all"),
            ("message_id", "bare"),
        ],
    )
    .await;

    let mut daemon = Daemon::start(&s.config.path, s.port);
    let pool = pg().await;
    let table = s.table.clone();

    // Archived: the replay past its limit, the two timeouts, the bare one; the delayed replay
    // waits in the archive and is then replayed from it.
    let archived = wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.clone();
        async move {
            let rows = rows(&pool, &table).await;
            let replayed = rows
                .iter()
                .any(|r| r.0.as_deref() == Some("later") && r.1 == "replayed");
            (rows.len() == 5 && replayed).then_some(rows)
        }
    })
    .await
    .unwrap_or_else(|| panic!("archive never reached 5 rows with `later` replayed"));
    let by_id = |id: &str| {
        archived
            .iter()
            .find(|r| r.0.as_deref() == Some(id))
            .cloned()
    };
    let limit = by_id("replay-limit").expect("replay past the limit is archived");
    assert_eq!(limit.1, "archived");
    assert_eq!(limit.3, 2);
    assert_eq!(limit.4.as_deref(), Some("replay limit reached"));
    let bare = by_id("bare").expect("a dead letter without failure fields is archived");
    assert_eq!(bare.2, "unknown");
    assert!(by_id("slow-1").is_some() && by_id("slow-2").is_some());
    for dropped in [
        "invalid",
        "elsewhere",
        "replay-tired",
        "replay-now",
        "forward-me",
    ] {
        assert!(by_id(dropped).is_none(), "{dropped} must not be archived");
    }

    // Replays reach the original stream with the count raised and the id kept, and the
    // original consumer handles them.
    let replays = wait_for_async(WAIT, || {
        let mut conn = conn.clone();
        let stream = s.stream.clone();
        async move {
            let e = entries(&mut conn, &stream).await;
            (e.len() == 2).then_some(e)
        }
    })
    .await
    .expect("two replays on the original stream");
    let now = replays
        .iter()
        .find(|f| field(f, "message_id").as_deref() == Some("replay-now"))
        .expect("immediate replay");
    assert_eq!(field(now, "bosun-replay-count").as_deref(), Some("1"));
    assert_eq!(
        field(now, "payload").as_deref(),
        Some("{\"id\":\"replay-now\"}")
    );
    assert_eq!(field(now, "tenant").as_deref(), Some("acme"));
    assert_eq!(
        field(now, "bosun-error"),
        None,
        "failure fields are not replayed"
    );
    assert!(
        replays
            .iter()
            .any(|f| field(f, "message_id").as_deref() == Some("later"))
    );
    for id in ["replay-now", "later"] {
        assert!(
            wait_for(WAIT, || logged_handled(&daemon, "seen", id).then_some(())).is_some(),
            "replayed {id} was not handled"
        );
    }

    // Forwarded with its failure fields.
    let parked = entries(&mut conn, &s.forward).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(
        field(&parked[0], "message_id").as_deref(),
        Some("forward-me")
    );
    assert_eq!(
        field(&parked[0], "bosun-error").as_deref(),
        Some("forward: for a person")
    );

    // Every dead letter was settled at its source.
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(&s.dlq)
        .arg("bosun-dlq")
        .query_async(&mut conn)
        .await
        .expect("XPENDING");
    assert_eq!(
        pending.first(),
        Some(&redis::Value::Int(0)),
        "dead letters left unsettled"
    );

    let drops = wait_for(WAIT, || {
        daemon
            .metric(
                "bosun_dead_letters_total",
                &["processor=\"dl\"", "action=\"drop\""],
            )
            .filter(|v| *v >= 3.0)
    });
    assert_eq!(drops, Some(3.0));
    assert_eq!(
        daemon.metric("bosun_dead_letter_replays_total", &["processor=\"dl\""]),
        Some(2.0)
    );
    assert!(
        wait_for(WAIT, || daemon
            .metric("bosun_dead_letters_archived", &["processor=\"dl\""])
            .filter(|v| *v == 4.0))
        .is_some(),
        "archived gauge"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
}

/// Waits until the archive of `s` holds `n` rows.
async fn wait_rows(pool: &PgPool, table: &str, n: usize) {
    let found = wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.to_owned();
        async move { (rows(&pool, &table).await.len() == n).then_some(()) }
    })
    .await;
    assert!(found.is_some(), "archive {table} never held {n} rows");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_is_listed_grouped_shown_replayed_and_purged_from_cli_and_http() {
    let s = redis_setup(true);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let mut conn = redis().await;
    let st = s.stream.as_str();
    for (id, kind, error) in [
        ("slow-1", "exhausted", "timeout after 3012 ms"),
        ("slow-2", "exhausted", "timeout after 87 ms"),
        ("ann", "permanent", "customer 'Ann' rejected"),
        ("bob", "permanent", "customer 'Bob Smith' rejected"),
    ] {
        add(&mut conn, &s.dlq, &dead(id, st, kind, error, "2")).await;
    }
    xadd(
        &mut conn,
        &s.dlq,
        &[("payload", "\u{1}raw"), ("message_id", "bare")],
    )
    .await;
    let daemon = Daemon::start_with_env(&s.config.path, s.port, &[(TOKEN_VAR, TOKEN)]);
    let pool = pg().await;
    wait_rows(&pool, &s.table, 5).await;

    // CLI: list, groups, show.
    let listed = cli_json(&s.config, &["list", "--json"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(5), "{listed}");
    let groups = cli_json(&s.config, &["groups", "--json"]);
    let groups = groups.as_array().expect("groups array").clone();
    assert_eq!(groups.len(), 3, "timeouts, customers, unknown: {groups:?}");
    let timeouts = groups
        .iter()
        .find(|g| {
            g["sample_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("timeout after"))
        })
        .expect("the timeout group");
    assert_eq!(timeouts["count"], 2);
    assert!(timeouts["first_seen"].is_string() && timeouts["last_seen"].is_string());
    let timeout_key = timeouts["group_key"]
        .as_str()
        .expect("group key")
        .to_owned();
    let customers = groups
        .iter()
        .find(|g| {
            g["sample_error"]
                .as_str()
                .is_some_and(|e| e.starts_with("customer"))
        })
        .expect("the customer group");
    assert_eq!(customers["count"], 2, "quoted values are masked");
    let in_group = cli_json(&s.config, &["list", "--group", &timeout_key, "--json"]);
    assert_eq!(in_group.as_array().map(Vec::len), Some(2));
    let (code, table_out, _) = cli(&s.config, &["groups"]);
    assert_eq!(code, 0);
    assert!(table_out.contains(&timeout_key) && table_out.contains("SAMPLE ERROR"));

    let slow1 = row_id(&pool, &s.table, "slow-1").await;
    let shown = cli_json(&s.config, &["show", &slow1.to_string(), "--json"]);
    assert_eq!(shown["body"], "{\"id\":\"slow-1\"}");
    assert_eq!(shown["headers"]["tenant"], "acme");
    assert_eq!(shown["error_kind"], "exhausted");
    assert_eq!(shown["attempts"], 2);
    let (code, _, err) = cli(&s.config, &["show", "999999999"]);
    assert_ne!(code, 0, "a missing id fails");
    assert!(err.contains("999999999"), "{err}");

    // CLI: replay (dry run first), then the replay reaches the stream and is handled.
    let dry = cli_json(
        &s.config,
        &["replay", &slow1.to_string(), "--dry-run", "--json"],
    );
    assert_eq!(dry["would_replay"].as_array().map(Vec::len), Some(1));
    assert_eq!(status_of(&pool, &s.table, "slow-1").await, "archived");
    let replayed = cli_json(&s.config, &["replay", &slow1.to_string(), "--json"]);
    assert_eq!(replayed["replayed"], serde_json::json!([slow1]));
    assert_eq!(status_of(&pool, &s.table, "slow-1").await, "replayed");
    assert!(
        wait_for(WAIT, || logged_handled(&daemon, "seen", "slow-1")
            .then_some(()))
        .is_some(),
        "the replay was not handled"
    );
    let on_stream = entries(&mut conn, &s.stream).await;
    assert_eq!(
        field(&on_stream[0], "bosun-replay-count").as_deref(),
        Some("1")
    );
    let again = cli(&s.config, &["replay", &slow1.to_string()]);
    assert_ne!(
        again.0, 0,
        "a replayed row is not replayed twice: {}",
        again.1
    );

    // CLI: purge the unknown one.
    let bare = row_id(&pool, &s.table, "bare").await;
    let shown = cli_json(&s.config, &["show", &bare.to_string(), "--json"]);
    assert_eq!(shown["error_kind"], "unknown");
    let purged = cli_json(&s.config, &["purge", &bare.to_string(), "--json"]);
    assert_eq!(purged["purged"], serde_json::json!([bare]));
    assert_eq!(status_of(&pool, &s.table, "bare").await, "purged");

    // HTTP: no token, a wrong token: refused.
    for token in [None, Some("wrong"), Some("")] {
        let (status, _) = admin(&daemon, "GET", "/admin/dead-letters", token, "");
        assert_eq!(status, 401, "token {token:?}");
        let (status, _) = admin(
            &daemon,
            "POST",
            "/admin/dead-letters/purge",
            token,
            r#"{"all":true}"#,
        );
        assert_eq!(status, 401, "token {token:?}");
    }
    assert_eq!(status_of(&pool, &s.table, "ann").await, "archived");

    // HTTP: list, groups, show, replay, purge.
    let (status, list) = admin(
        &daemon,
        "GET",
        "/admin/dead-letters?limit=10",
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200, "{list}");
    assert_eq!(
        list.as_array().map(Vec::len),
        Some(4),
        "purged rows are not listed: {list}"
    );
    let (status, list) = admin(
        &daemon,
        "GET",
        "/admin/dead-letters?status=purged",
        Some(TOKEN),
        "",
    );
    assert_eq!((status, list.as_array().map(Vec::len)), (200, Some(1)));
    let (status, groups) = admin(
        &daemon,
        "GET",
        "/admin/dead-letters/groups",
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert!(groups.as_array().is_some_and(|g| {
        g.iter()
            .any(|g| g["group_key"] == timeout_key.as_str() && g["count"] == 1)
    }));
    let slow2 = row_id(&pool, &s.table, "slow-2").await;
    let (status, shown) = admin(
        &daemon,
        "GET",
        &format!("/admin/dead-letters/{slow2}"),
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 200);
    assert_eq!(shown["message_id"], "slow-2");
    assert_eq!(shown["error"], "timeout after 87 ms");
    let (status, _) = admin(
        &daemon,
        "GET",
        "/admin/dead-letters/999999999",
        Some(TOKEN),
        "",
    );
    assert_eq!(status, 404);
    let (status, report) = admin(
        &daemon,
        "POST",
        "/admin/dead-letters/replay",
        Some(TOKEN),
        &format!(r#"{{"group":"{timeout_key}"}}"#),
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["replayed"], serde_json::json!([slow2]));
    assert!(
        wait_for(WAIT, || logged_handled(&daemon, "seen", "slow-2")
            .then_some(()))
        .is_some(),
        "the HTTP replay was not handled"
    );
    let (status, report) = admin(
        &daemon,
        "POST",
        "/admin/dead-letters/purge",
        Some(TOKEN),
        r#"{"all":true,"dry_run":true}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        report["would_purge"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    assert_eq!(status_of(&pool, &s.table, "ann").await, "archived");
    let (status, _) = admin(
        &daemon,
        "POST",
        "/admin/dead-letters/purge",
        Some(TOKEN),
        r#"{"ids":[1],"all":true}"#,
    );
    assert_eq!(status, 400, "two selectors at once are refused");
    let (status, report) = admin(
        &daemon,
        "POST",
        "/admin/dead-letters/purge",
        Some(TOKEN),
        r#"{"before":"2999-01-01T00:00:00Z"}"#,
    );
    assert_eq!(status, 200);
    assert_eq!(
        report["purged"].as_array().map(Vec::len),
        Some(4),
        "{report}"
    );
    assert_eq!(status_of(&pool, &s.table, "ann").await, "purged");
    assert!(
        daemon.logs().lines().all(|l| !l.contains(TOKEN)),
        "the token is never logged"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_is_absent_without_a_token() {
    let s = redis_setup(false);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let daemon = Daemon::start(&s.config.path, s.port);
    assert!(daemon.wait_http(WAIT));
    let (status, _) = admin(&daemon, "GET", "/admin/dead-letters", Some(TOKEN), "");
    assert_eq!(status, 404);
    let (status, _) = admin(
        &daemon,
        "POST",
        "/admin/dead-letters/replay",
        Some(TOKEN),
        r#"{"all":true}"#,
    );
    assert_eq!(status, 404);
}

#[test]
fn schema_prints_idempotent_ddl_for_a_valid_table_only() {
    let (code, out, _) = bosun_output(&["dlq", "schema", "--table", "ops.parked_letters"], &[]);
    assert_eq!(code, 0);
    assert!(out.contains("CREATE TABLE IF NOT EXISTS ops.parked_letters"));
    assert!(out.contains("group_key"));
    let (code, _, err) = bosun_output(
        &["dlq", "schema", "--table", "Robert'); DROP TABLE x;--"],
        &[],
    );
    assert_eq!(code, 64, "{err}");
}

/// `[service]`, `[http]` on `port`, the `rabbit` broker and the `main` database.
fn amqp_base(service: &str, port: u16) -> String {
    format!(
        r#"
[service]
name = "{service}"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4
"#
    )
}

async fn amqp_channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect to RabbitMQ");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn declare(ch: &lapin::Channel, queue: &str, args: lapin::types::FieldTable) {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        args,
    )
    .await
    .expect("declare queue");
}

fn amqp_publisher() -> bosun::amqp::AmqpPublisher {
    let url = url::Url::parse(RABBIT_URL).expect("url");
    bosun::amqp::AmqpPublisher::new(
        "rabbit",
        bosun::config::AmqpBrokerConfig {
            url: bosun::config::SecretUrl::new(url),
            connection_name: None,
            heartbeat: None,
            max_message_size: None,
            tls: None,
        },
        unique("dlq-test"),
    )
}

fn outgoing(queue: &str, id: &str, headers: &[(&str, &str)]) -> bosun::publish::OutgoingMessage {
    let mut m = bosun::publish::OutgoingMessage::new("", queue, format!("body of {id}"));
    m.message_id = id.to_owned();
    m.headers = headers
        .iter()
        .map(|(k, v)| {
            (
                (*k).to_owned(),
                bosun::handler::HeaderValue::String((*v).to_owned()),
            )
        })
        .collect();
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_broker_dead_letters_replay_until_the_limit_and_bosun_ones_reach_their_queue() {
    use bosun::publish::Publisher as _;
    use lapin::types::{AMQPValue, FieldTable, LongString};

    let queue = unique("dl_q");
    let dlq = format!("{queue}.dlq");
    let expiring = unique("dl_ttl");
    let table = unique("dl_archive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[handlers.seen]
kind = "log"

[consumers.orig]
source = "rabbit"
handler = "seen"
queue = "{queue}"

[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"
# The expiring queue dead-letters here too, but no consumer of this configuration reads it.
replay_to = ["{queue}", "{expiring}"]

[[dead_letters.dl.rules]]
when = {{ reason = ["expired", "maxlen"] }}
action = "replay"
max_replays = 2

[[dead_letters.dl.rules]]
when = {{ error_kind = ["permanent"], original = ["{queue}"], attempts_below = 5 }}
action = "replay"
"#,
        amqp_base("dlq-amqp-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");

    // A queue whose messages expire into the dead-letter queue: RabbitMQ adds x-death.
    let (_conn, ch) = amqp_channel().await;
    declare(&ch, &dlq, FieldTable::default()).await;
    let mut args = FieldTable::default();
    args.insert("x-message-ttl".into(), AMQPValue::LongInt(20));
    args.insert(
        "x-dead-letter-exchange".into(),
        AMQPValue::LongString(LongString::from("")),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        AMQPValue::LongString(LongString::from(dlq.as_str())),
    );
    declare(&ch, &expiring, args).await;

    let publisher = amqp_publisher();
    let results = publisher
        .publish_batch(&[
            outgoing(&expiring, "expires", &[("tenant", "acme")]),
            outgoing(&dlq, "bare-amqp", &[]),
        ])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let daemon = Daemon::start(&config.path, port);
    // The consumer declares its queue; the bosun-style dead letter names it.
    assert!(
        daemon.wait_ready(WAIT),
        "daemon not ready: {:?}",
        daemon.get("/readyz")
    );
    let result = publisher
        .publish(&outgoing(
            &dlq,
            "perm-amqp",
            &[
                ("bosun-error-kind", "permanent"),
                ("bosun-error", "downstream said no"),
                ("bosun-attempt", "1"),
                ("bosun-original-queue", &queue),
                ("bosun-original-exchange", "shop"),
                ("bosun-original-routing-key", "order.created"),
            ],
        ))
        .await;
    assert!(result.is_ok(), "{result:?}");

    let pool = pg().await;
    wait_rows(&pool, &table, 2).await;
    let archived = rows(&pool, &table).await;
    let expired = archived
        .iter()
        .find(|r| r.0.as_deref() == Some("expires"))
        .expect("expired message archived after its replays");
    assert_eq!(expired.3, 2, "replayed twice before being archived");
    assert_eq!(expired.4.as_deref(), Some("replay limit reached"));
    let (reason, original): (Option<String>, Option<String>) = sqlx::query_as(&format!(
        "SELECT reason, original FROM {table} WHERE message_id = 'expires'"
    ))
    .fetch_one(&pool)
    .await
    .expect("row");
    assert_eq!(reason.as_deref(), Some("expired"));
    assert_eq!(original.as_deref(), Some(expiring.as_str()));
    let bare = archived
        .iter()
        .find(|r| r.0.as_deref() == Some("bare-amqp"))
        .expect("a dead letter without bosun headers or x-death is archived");
    assert_eq!(bare.2, "unknown");

    assert!(
        wait_for(WAIT, || logged_handled(&daemon, "seen", "perm-amqp")
            .then_some(()))
        .is_some(),
        "the replayed dead letter was not handled by the original queue's consumer"
    );
    assert!(
        wait_for(WAIT, || daemon
            .metric("bosun_dead_letter_replays_total", &["processor=\"dl\""])
            .filter(|v| *v == 3.0))
        .is_some(),
        "two replays of the expired message and one of the bosun dead letter"
    );
    assert_eq!(rows(&pool, &table).await.len(), 2, "nothing else archived");
}

/// A running daemon whose processor holds the dead letter `id`: its archive table was
/// dropped under it, and it reports not ready.
struct Outage {
    s: RedisSetup,
    daemon: Daemon,
    pool: PgPool,
    conn: redis::aio::MultiplexedConnection,
}

async fn archive_outage(id: &str) -> Outage {
    let s = redis_setup(false);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let daemon = Daemon::start(&s.config.path, s.port);
    assert!(
        daemon.wait_ready(WAIT),
        "ready: {:?}",
        daemon.get("/readyz")
    );
    let pool = pg().await;
    sqlx::raw_sql(&format!("DROP TABLE {}", s.table))
        .execute(&pool)
        .await
        .expect("drop archive");
    let mut conn = redis().await;
    add(
        &mut conn,
        &s.dlq,
        &dead(id, &s.stream, "permanent", "boom", "1"),
    )
    .await;
    let not_ready = wait_for(WAIT, || {
        daemon
            .get("/readyz")
            .filter(|(status, body)| *status == 503 && body.contains("dead_letter:dl"))
    });
    assert!(not_ready.is_some(), "the processor must report not ready");
    Outage {
        s,
        daemon,
        pool,
        conn,
    }
}

/// Entries pending in the processors' group on `dlq`.
async fn dlq_pending(conn: &redis::aio::MultiplexedConnection, dlq: &str) -> i64 {
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg(dlq)
        .arg("bosun-dlq")
        .query_async(&mut conn.clone())
        .await
        .expect("XPENDING");
    match pending.first() {
        Some(redis::Value::Int(n)) => *n,
        other => panic!("XPENDING: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archive_failure_keeps_the_dead_letter_unsettled_and_not_ready_until_it_recovers() {
    let Outage {
        s,
        daemon,
        pool,
        conn,
    } = archive_outage("kept").await;
    assert_eq!(
        dlq_pending(&conn, &s.dlq).await,
        1,
        "the dead letter stays unsettled"
    );

    // The archive is back: the held dead letter lands in it and is settled.
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    wait_rows(&pool, &s.table, 1).await;
    assert_eq!(status_of(&pool, &s.table, "kept").await, "archived");
    let settled = wait_for_async(WAIT, || {
        let mut conn = conn.clone();
        let dlq = s.dlq.clone();
        async move {
            let pending: Vec<redis::Value> = redis::cmd("XPENDING")
                .arg(&dlq)
                .arg("bosun-dlq")
                .query_async(&mut conn)
                .await
                .ok()?;
            (pending.first() == Some(&redis::Value::Int(0))).then_some(())
        }
    })
    .await;
    assert!(settled.is_some(), "settled once archived");
    assert!(
        daemon.wait_ready(WAIT),
        "ready again: {:?}",
        daemon.get("/readyz")
    );
}

/// A processor added by a reload is served by the admin API without a restart: the API
/// follows the running configuration, not the one the process started with.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_follows_a_reload_that_adds_a_processor() {
    let s = redis_setup(true);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let daemon = Daemon::start_with_env(&s.config.path, s.port, &[(TOKEN_VAR, TOKEN)]);
    assert!(daemon.wait_http(WAIT));
    let path = "/admin/dead-letters?processor=added";
    let (status, before) = admin(&daemon, "GET", path, Some(TOKEN), "");
    assert_eq!(
        status, 400,
        "an unknown processor before the reload: {before}"
    );

    let table = unique("dl_added");
    let dlq = unique("dl_added_dlq");
    let text = std::fs::read_to_string(&s.config.path).expect("config");
    s.config.rewrite(&format!(
        "{text}\n[dead_letters.added]\nsource = \"cache\"\nstream = \"{dlq}\"\narchive = \"main\"\ntable = \"{table}\"\n"
    ));
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);

    let mut conn = redis().await;
    add(
        &mut conn,
        &dlq,
        &dead("after-reload", "orders", "permanent", "boom", "1"),
    )
    .await;
    let listed = wait_for(WAIT, || {
        let (status, list) = admin(&daemon, "GET", path, Some(TOKEN), "");
        (status == 200 && list.as_array().is_some_and(|rows| rows.len() == 1)).then_some(list)
    })
    .unwrap_or_else(|| {
        panic!(
            "the admin API never listed the added processor's archive:\n{}",
            daemon.logs()
        )
    });
    assert_eq!(listed[0]["message_id"], "after-reload", "{listed}");
    let _ = conn.del::<_, ()>(&dlq).await;
}

/// SIGTERM while the archive is down: the held dead letter is released (handed back
/// unsettled) instead of holding up the drain, so the daemon exits cleanly within the
/// shutdown timeout, and the dead letter is still there for the next start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_an_archive_outage_releases_the_dead_letter() {
    // redis: the entry stays pending.
    let Outage {
        s,
        mut daemon,
        conn,
        ..
    } = archive_outage("held").await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    // Exit 0 is a drain that finished; the 5 s shutdown timeout would exit 1.
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("released unsettled"),
        "{}",
        daemon.logs()
    );
    assert_eq!(
        dlq_pending(&conn, &s.dlq).await,
        1,
        "still pending: read again by a consumer of the same name, or claimed after claim_idle"
    );
}

/// The same on amqp: the dead letter is nacked back to its queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_shutdown_during_an_archive_outage_requeues_the_dead_letter() {
    use bosun::publish::Publisher as _;
    use lapin::types::FieldTable;

    let dlq = unique("dl_release");
    let table = unique("dl_release_archive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"
"#,
        amqp_base("dlq-release-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let (_conn, ch) = amqp_channel().await;
    declare(&ch, &dlq, FieldTable::default()).await;
    let mut daemon = Daemon::start(&config.path, port);
    assert!(
        daemon.wait_ready(WAIT),
        "ready: {:?}",
        daemon.get("/readyz")
    );
    let pool = pg().await;
    sqlx::raw_sql(&format!("DROP TABLE {table}"))
        .execute(&pool)
        .await
        .expect("drop archive");
    let publisher = amqp_publisher();
    assert_eq!(
        publisher.publish(&outgoing(&dlq, "held", &[])).await,
        Ok(())
    );
    assert!(
        wait_for(WAIT, || daemon.get("/readyz").filter(
            |(status, body)| *status == 503 && body.contains("dead_letter:dl")
        ))
        .is_some(),
        "the processor must report not ready"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("released unsettled"),
        "{}",
        daemon.logs()
    );
    let back = ch
        .queue_declare(
            dlq.as_str().into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .expect("passive declare");
    assert_eq!(
        back.message_count(),
        1,
        "the dead letter is back in its queue"
    );
    publisher.close().await;
    let _ = ch
        .queue_delete(dlq.as_str().into(), Default::default())
        .await;
}
