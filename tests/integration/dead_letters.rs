//! Dead-letter processors against real Redis, RabbitMQ and PostgreSQL: every matcher and
//! action, replays that reach the original queue or stream and are handled, the replay limit,
//! and the archive operations through both the `bosun dlq` binary and the admin HTTP API.

use crate::support;

use std::time::Duration;

use redis::AsyncCommands as _;
use sqlx::PgPool;
use support::*;

const TOKEN_VAR: &str = "BOSUN_TEST_DLQ_ADMIN_TOKEN";
const TOKEN: &str = "s3cret-admin-token-0123456789abcdef";
const WAIT: Duration = Duration::from_secs(30);

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
        &format!("{}{path}", admin_base(daemon)),
        &headers,
        body.as_bytes(),
    )
    .expect("admin API reachable");
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// The admin API's own listener, from the daemon's log; without one (no token), the
/// metrics listener, which must not serve the admin routes.
fn admin_base(daemon: &Daemon) -> String {
    let logs = daemon.logs();
    logs.lines()
        .filter(|l| l.contains("admin API listening"))
        .find_map(|l| {
            let value: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!("http://{}", value["listen"].as_str()?))
        })
        .unwrap_or_else(|| daemon.http.clone())
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
        format!("[http.admin]\ntoken_env = \"{TOKEN_VAR}\"\nlisten = \"127.0.0.1:0\"\n")
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
        r#"{"all":true,"processor":"dl","dry_run":true}"#,
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

fn amqp_publisher() -> support::amqp::Publisher {
    support::amqp::Publisher
}

fn outgoing(queue: &str, id: &str, headers: &[(&str, &str)]) -> support::amqp::OutgoingMessage {
    let mut m = support::amqp::OutgoingMessage::new("", queue, format!("body of {id}"));
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

// ---------------------------------------------------------------------------------------
// Replays carry what the original carried, go only where the processor's consumers read,
// and every dead letter ends somewhere, NUL bytes and deep nesting included.

/// A header value as the test publishes it.
fn header(value: &str) -> bosun::handler::HeaderValue {
    bosun::handler::HeaderValue::String(value.to_owned())
}

/// A bosun-style amqp dead letter of `queue` with `headers` added.
fn letter(
    dlq: &str,
    id: &str,
    queue: &str,
    error: &str,
    headers: &[(&str, bosun::handler::HeaderValue)],
) -> support::amqp::OutgoingMessage {
    let mut m = outgoing(
        dlq,
        id,
        &[
            ("bosun-error-kind", "permanent"),
            ("bosun-error", error),
            ("bosun-attempt", "1"),
            ("bosun-original-queue", queue),
        ],
    );
    for (k, v) in headers {
        m.headers.insert((*k).to_owned(), v.clone());
    }
    m
}

/// Every message in `queue`, taken off it: (message id, headers).
async fn drain(
    ch: &lapin::Channel,
    queue: &str,
) -> Vec<(
    String,
    std::collections::BTreeMap<String, lapin::types::AMQPValue>,
)> {
    let mut out = Vec::new();
    while let Some(m) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("basic.get")
    {
        let props = &m.delivery.properties;
        let id = props
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap_or_default();
        let headers = props
            .headers()
            .as_ref()
            .map(|t| {
                t.inner()
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.clone()))
                    .collect()
            })
            .unwrap_or_default();
        out.push((id, headers));
    }
    out
}

fn long_string(value: Option<&lapin::types::AMQPValue>) -> Option<Vec<u8>> {
    match value? {
        lapin::types::AMQPValue::LongString(s) => Some(s.as_bytes().to_vec()),
        _ => None,
    }
}

/// An archive filled by a processor that replays only to `queue` and otherwise archives.
struct AmqpArchive {
    config: ConfigFile,
    table: String,
    queue: String,
    pool: PgPool,
    ch: lapin::Channel,
    _conn: lapin::Connection,
}

impl AmqpArchive {
    async fn id(&self, message_id: &str) -> String {
        row_id(&self.pool, &self.table, message_id)
            .await
            .to_string()
    }
}

/// Runs a processor over `letters` (built for the returned queue and its `.dlq`) until all
/// are archived, then stops it.
async fn amqp_archive(
    letters: impl FnOnce(&str, &str) -> Vec<support::amqp::OutgoingMessage>,
) -> AmqpArchive {
    let queue = unique("dl_rq");
    let dlq = format!("{queue}.dlq");
    let table = unique("dl_archive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"
replay_to = ["{queue}"]
"#,
        amqp_base("dlq-archive-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let (conn, ch) = amqp_channel().await;
    declare(&ch, &dlq, lapin::types::FieldTable::default()).await;
    declare(&ch, &queue, lapin::types::FieldTable::default()).await;
    let letters = letters(&queue, &dlq);
    let publisher = amqp_publisher();
    let results = publisher.publish_batch(&letters).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    publisher.close().await;
    let mut daemon = Daemon::start(&config.path, port);
    let pool = pg().await;
    let n = letters.len();
    let archived = wait_for_async(WAIT, || {
        let pool = pool.clone();
        let table = table.clone();
        async move { (rows(&pool, &table).await.len() == n).then_some(()) }
    })
    .await;
    assert!(
        archived.is_some(),
        "not every dead letter was archived:\n{}",
        daemon.logs()
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0), "{}", daemon.logs());
    AmqpArchive {
        config,
        table,
        queue,
        pool,
        ch,
        _conn: conn,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_keeps_x_application_headers_and_drops_the_broker_s_death_record() {
    let a = amqp_archive(|queue, dlq| {
        vec![letter(
            dlq,
            "tenant",
            queue,
            "boom",
            &[
                ("x-tenant-id", header("t-42")),
                ("x-kind", header("refund")),
                (
                    "x-death",
                    bosun::handler::HeaderValue::Json(serde_json::json!([
                        {"queue": queue, "reason": "rejected", "count": 1}
                    ])),
                ),
            ],
        )]
    })
    .await;
    let id = a.id("tenant").await;
    let (code, out, err) = cli(&a.config, &["replay", &id]);
    assert_eq!(code, 0, "replay: {err}{out}");
    let replayed = drain(&a.ch, &a.queue).await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    let headers = &replayed[0].1;
    assert_eq!(
        long_string(headers.get("x-tenant-id")).as_deref(),
        Some(&b"t-42"[..])
    );
    assert_eq!(
        long_string(headers.get("x-kind")).as_deref(),
        Some(&b"refund"[..])
    );
    for gone in [
        "x-death",
        "bosun-error",
        "bosun-error-kind",
        "bosun-attempt",
    ] {
        assert!(!headers.contains_key(gone), "{gone} replayed: {headers:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_at_the_largest_replay_count_is_marked_replayed_and_never_sent_twice() {
    let a = amqp_archive(|queue, dlq| {
        vec![letter(
            dlq,
            "tired",
            queue,
            "boom",
            &[("bosun-replay-count", header("2147483647"))],
        )]
    })
    .await;
    let id = a.id("tired").await;
    let (code, out, err) = cli(&a.config, &["replay", &id]);
    assert_eq!(code, 0, "the replay is recorded: {err}{out}");
    assert_eq!(status_of(&a.pool, &a.table, "tired").await, "replayed");
    let (code, out, _) = cli(
        &a.config,
        &["replay", "--all", "--processor", "dl", "--confirm", "dl"],
    );
    assert_eq!(code, 0, "nothing left to replay: {out}");
    assert!(out.contains("replayed 0"), "{out}");
    let replayed = drain(&a.ch, &a.queue).await;
    assert_eq!(replayed.len(), 1, "sent exactly once: {replayed:?}");
    let count: i32 = sqlx::query_scalar(&format!(
        "SELECT replay_count FROM {} WHERE message_id = 'tired'",
        a.table
    ))
    .fetch_one(&a.pool)
    .await
    .expect("row");
    assert_eq!(count, i32::MAX, "the count saturates");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_with_nul_bytes_are_archived_and_replayed_exactly() {
    let a = amqp_archive(|queue, dlq| {
        (0..20)
            .map(|i| {
                letter(
                    dlq,
                    &format!("nul-{i}"),
                    queue,
                    "exec stderr:\0\0 tail \\ end",
                    &[("x-note", header("before\0after"))],
                )
            })
            .collect()
    })
    .await;
    let id = a.id("nul-3").await;
    let shown = cli_json(&a.config, &["show", &id, "--json"]);
    assert_eq!(
        shown["error"], "exec stderr:\\0\\0 tail \\\\ end",
        "{shown}"
    );
    assert_eq!(shown["escaped"], serde_json::json!(["error"]), "{shown}");
    let (code, out, err) = cli(
        &a.config,
        &["replay", "--all", "--processor", "dl", "--confirm", "dl"],
    );
    assert_eq!(code, 0, "replay: {err}{out}");
    assert!(out.contains("replayed 20"), "{out}");
    let replayed = drain(&a.ch, &a.queue).await;
    assert_eq!(replayed.len(), 20);
    for (id, headers) in &replayed {
        assert_eq!(
            long_string(headers.get("x-note")).as_deref(),
            Some(&b"before\0after"[..]),
            "{id}: {headers:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deeply_nested_archived_letter_holds_up_no_other_row_in_show_and_replay_all() {
    let mut deep = serde_json::json!("bottom");
    for _ in 0..150 {
        deep = serde_json::json!([deep]);
    }
    let a = amqp_archive(move |queue, dlq| {
        vec![
            letter(dlq, "before", queue, "boom", &[]),
            letter(
                dlq,
                "deep",
                queue,
                "boom",
                &[("nested", bosun::handler::HeaderValue::Json(deep))],
            ),
            letter(dlq, "after", queue, "boom", &[]),
        ]
    })
    .await;
    for id in ["before", "deep", "after"] {
        let row = a.id(id).await;
        let (code, out, err) = cli(&a.config, &["show", &row]);
        assert_eq!(code, 0, "show {id}: {err}{out}");
    }
    let (code, out, _) = cli(
        &a.config,
        &[
            "replay",
            "--all",
            "--processor",
            "dl",
            "--confirm",
            "dl",
            "--json",
        ],
    );
    // Header tables are bounded where they enter bosun: the levels past the bound became a
    // marker when the letter was read, so the deep row is stored and replayed with that marker
    // and no row holds the others up.
    assert_eq!(code, 0, "every row is replayed: {out}");
    let report: serde_json::Value = serde_json::from_str(&out).expect("json report");
    assert_eq!(
        report["replayed"].as_array().map(Vec::len),
        Some(3),
        "{report}"
    );
    let replayed = drain(&a.ch, &a.queue).await;
    let mut ids: Vec<String> = replayed.iter().map(|(id, _)| id.clone()).collect();
    ids.sort();
    assert_eq!(ids, ["after", "before", "deep"]);
    let (_, deep_headers) = replayed
        .iter()
        .find(|(id, _)| id == "deep")
        .expect("the deep row is replayed");
    let text = format!("{:?}", deep_headers.get("nested"));
    assert!(
        text.contains(&format!("{:?}", support::amqp::headers::REMOVED.as_bytes())),
        "the levels past the bound carry the marker: {text}"
    );
}

/// (status, note, last_error, replay_attempts) of the row of `message_id`.
async fn row_state(
    pool: &PgPool,
    table: &str,
    message_id: &str,
) -> (String, Option<String>, Option<String>, i32) {
    sqlx::query_as(&format!(
        "SELECT status, note, last_error, replay_attempts FROM {table} WHERE message_id = $1"
    ))
    .bind(message_id)
    .fetch_one(pool)
    .await
    .expect("archived row")
}

async fn queue_depth(ch: &lapin::Channel, queue: &str) -> u32 {
    ch.queue_declare(
        queue.into(),
        lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        lapin::types::FieldTable::default(),
    )
    .await
    .expect("passive declare")
    .message_count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amqp_dead_letter_naming_another_queue_is_archived_not_replayed() {
    let queue = unique("dl_home");
    let dlq = format!("{queue}.dlq");
    let other = unique("dl_victim");
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

[[dead_letters.dl.rules]]
when = {{ error = "^replay" }}
action = "replay"
"#,
        amqp_base("dlq-allow-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let (_conn, ch) = amqp_channel().await;
    declare(&ch, &other, lapin::types::FieldTable::default()).await;
    let daemon = Daemon::start(&config.path, port);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    // Published straight into the dead-letter queue by anyone who may publish there.
    let publisher = amqp_publisher();
    let results = publisher
        .publish_batch(&[
            letter(&dlq, "away", &other, "replay: to a queue of my choice", &[]),
            letter(&dlq, "home", &queue, "replay: back home", &[]),
        ])
        .await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    publisher.close().await;
    assert!(
        wait_for(WAIT, || logged_handled(&daemon, "seen", "home")
            .then_some(()))
        .is_some(),
        "the dead letter of the consumer's own queue is replayed:\n{}",
        daemon.logs()
    );
    let pool = pg().await;
    wait_rows(&pool, &table, 1).await;
    let (status, note, _, _) = row_state(&pool, &table, "away").await;
    assert_eq!(status, "archived");
    assert!(
        note.as_deref()
            .is_some_and(|n| n.contains(&other) && n.contains("replay_to")),
        "{note:?}"
    );
    assert_eq!(
        queue_depth(&ch, &other).await,
        0,
        "nothing replayed elsewhere"
    );
    let _ = ch
        .queue_delete(other.as_str().into(), Default::default())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_dead_letter_naming_another_stream_is_archived_not_replayed() {
    let s = redis_setup(false);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let hijacked = unique("dl_hijacked");
    let mut conn = redis().await;
    add(
        &mut conn,
        &s.dlq,
        &dead(
            "stream-field",
            &hijacked,
            "permanent",
            "replay: elsewhere",
            "1",
        ),
    )
    .await;
    // The amqp header name on a stream entry means nothing: the entry goes back to the
    // stream the redis consumer recorded.
    let mut queue_field = dead("queue-field", &s.stream, "permanent", "replay: home", "1");
    queue_field.push(("bosun-original-queue".into(), hijacked.clone()));
    add(&mut conn, &s.dlq, &queue_field).await;
    let daemon = Daemon::start(&s.config.path, s.port);
    let pool = pg().await;
    wait_rows(&pool, &s.table, 1).await;
    let (status, note, _, _) = row_state(&pool, &s.table, "stream-field").await;
    assert_eq!(status, "archived");
    assert!(
        note.as_deref().is_some_and(|n| n.contains(&hijacked)),
        "{note:?}"
    );
    assert!(
        wait_for(WAIT, || logged_handled(&daemon, "seen", "queue-field")
            .then_some(()))
        .is_some(),
        "{}",
        daemon.logs()
    );
    assert!(entries(&mut conn, &hijacked).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_scheduled_replays_back_off_and_do_not_block_later_ones() {
    let queue = unique("dl_sq");
    let dlq = format!("{queue}.dlq");
    // Allowed, but declared by nobody: every replay to it is returned unroutable.
    let missing = unique("dl_missing");
    let table = unique("dl_archive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"
replay_to = ["{queue}", "{missing}"]

[[dead_letters.dl.rules]]
when = {{ error = "^later" }}
action = "replay"
delay = "2s"
"#,
        amqp_base("dlq-scheduled-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let (_conn, ch) = amqp_channel().await;
    declare(&ch, &dlq, lapin::types::FieldTable::default()).await;
    declare(&ch, &queue, lapin::types::FieldTable::default()).await;
    let publisher = amqp_publisher();
    let doomed: Vec<_> = (0..100)
        .map(|i| letter(&dlq, &format!("doomed-{i}"), &missing, "later: never", &[]))
        .collect();
    let results = publisher.publish_batch(&doomed).await;
    assert!(results.iter().all(Result::is_ok));
    let daemon = Daemon::start(&config.path, port);
    let pool = pg().await;
    wait_rows(&pool, &table, 100).await;
    assert_eq!(
        publisher
            .publish(&letter(&dlq, "fine", &queue, "later: rate limited", &[]))
            .await,
        Ok(())
    );
    publisher.close().await;
    let replayed = wait_for_async(Duration::from_secs(60), || {
        let pool = pool.clone();
        let table = table.clone();
        async move {
            let rows = rows(&pool, &table).await;
            rows.iter()
                .any(|r| r.0.as_deref() == Some("fine") && r.1 == "replayed")
                .then_some(())
        }
    })
    .await;
    assert!(
        replayed.is_some(),
        "a due replay waits behind failing ones:\n{}",
        daemon.logs()
    );
    assert_eq!(queue_depth(&ch, &queue).await, 1);
    let (status, _, last_error, attempts) = row_state(&pool, &table, "doomed-7").await;
    assert_eq!(status, "failed", "an unroutable replay fails for good");
    assert_eq!(attempts, 1);
    assert!(
        last_error
            .as_deref()
            .is_some_and(|e| e.contains("unroutable")),
        "{last_error:?}"
    );
}

async fn exists(conn: &mut redis::aio::MultiplexedConnection, key: &str) -> bool {
    let n: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(conn)
        .await
        .expect("EXISTS");
    n == 1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_processor_input_is_archived_as_invalid_not_moved_on() {
    let s = redis_setup(false);
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let mut conn = redis().await;
    // A dead letter of an entry that had no body at all, as the redis consumer moves it.
    xadd(
        &mut conn,
        &s.dlq,
        &[
            ("message_id", "no-body"),
            ("bosun-orig-stream", &s.stream),
            ("bosun-error-kind", "invalid"),
            ("bosun-error", "entry has no `payload` field"),
        ],
    )
    .await;
    // A field name that is not UTF-8.
    let _: String = redis::cmd("XADD")
        .arg(&s.dlq)
        .arg("*")
        .arg("payload")
        .arg(&b"\xffraw\0body"[..])
        .arg("message_id")
        .arg("bad-name")
        .arg(&b"\xfe\xff"[..])
        .arg("v")
        .query_async(&mut conn)
        .await
        .expect("XADD");
    let daemon = Daemon::start(&s.config.path, s.port);
    let pool = pg().await;
    wait_rows(&pool, &s.table, 2).await;
    /// (message_id, status, error_kind, body, error)
    type Invalid = (
        Option<String>,
        String,
        String,
        Option<Vec<u8>>,
        Option<String>,
    );
    let rows: Vec<Invalid> = sqlx::query_as(&format!(
        "SELECT message_id, status, error_kind, body, error FROM {} ORDER BY message_id",
        s.table
    ))
    .fetch_all(&pool)
    .await
    .expect("rows");
    assert_eq!(rows[0].0.as_deref(), Some("bad-name"));
    assert_eq!(
        rows[0].3.as_deref(),
        Some(&b"\xffraw\0body"[..]),
        "body kept as bytes"
    );
    assert_eq!(rows[1].0.as_deref(), Some("no-body"));
    for row in &rows {
        assert_eq!(
            (row.1.as_str(), row.2.as_str()),
            ("archived", "invalid"),
            "{row:?}"
        );
        assert!(
            row.4.as_deref().is_some_and(|e| e.contains("unusable")),
            "{row:?}"
        );
    }
    assert!(
        !exists(&mut conn, &format!("{}:dlq", s.dlq)).await,
        "no second-level dead-letter stream"
    );
    assert_eq!(dlq_pending(&conn, &s.dlq).await, 0, "{}", daemon.logs());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undecodable_input_without_an_archive_stays_pending_and_is_counted() {
    let dlq = unique("dl_noarchive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"
[service]
name = "dlq-noarchive-test"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[dead_letters.na]
source = "cache"
stream = "{dlq}"
default_action = "drop"
"#
    ));
    let mut conn = redis().await;
    xadd(&mut conn, &dlq, &[("message_id", "no-body")]).await;
    xadd(&mut conn, &dlq, &[("payload", "x"), ("message_id", "fine")]).await;
    let daemon = Daemon::start(&config.path, port);
    let held = wait_for(WAIT, || {
        daemon
            .metric(
                "bosun_dead_letters_held_total",
                &["processor=\"na\"", "cause=\"undecodable\""],
            )
            .filter(|v| *v >= 1.0)
    });
    assert!(held.is_some(), "{}", daemon.logs());
    assert!(
        wait_for(WAIT, || daemon
            .metric(
                "bosun_dead_letters_total",
                &["processor=\"na\"", "action=\"drop\""]
            )
            .filter(|v| *v >= 1.0))
        .is_some(),
        "the readable one is handled"
    );
    assert_eq!(
        dlq_pending(&conn, &dlq).await,
        1,
        "the unreadable one stays pending"
    );
    assert!(!exists(&mut conn, &format!("{dlq}:dlq")).await);
    let _ = conn.del::<_, ()>(&dlq).await;
}

/// A fresh broker: the processors start with the consumers that declare their queues and
/// wait for them instead of racing them, so a clean first start logs no warning or error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_start_with_processors_and_their_consumers_logs_no_error() {
    let table = unique("dl_archive");
    let port = free_port();
    let queues: Vec<String> = (0..2).map(|_| unique("dl_fresh")).collect();
    // Many bindings: each consumer declares its exchanges before its queues, which gives a
    // processor that does not wait plenty of time to look for its queue too early.
    let exchanges: Vec<String> = (0..150).map(|_| unique("dl_fresh_x")).collect();
    let bindings = exchanges
        .iter()
        .map(|x| format!("{{ exchange = \"{x}\" }}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut text = format!(
        "{}\n[handlers.seen]\nkind = \"log\"\n",
        amqp_base("dlq-fresh-test", port)
    );
    for (i, queue) in queues.iter().enumerate() {
        text.push_str(&format!(
            "\n[consumers.c{i}]\nsource = \"rabbit\"\nhandler = \"seen\"\nqueue = \"{queue}\"\nbindings = [{bindings}]\n\n[dead_letters.d{i}]\nsource = \"rabbit\"\nqueue = \"{queue}.dlq\"\narchive = \"main\"\ntable = \"{table}\"\nmigrate = true\n"
        ));
    }
    let config = ConfigFile::new(&text);
    let mut daemon = Daemon::start(&config.path, port);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let publisher = amqp_publisher();
    for queue in &queues {
        let dlq = format!("{queue}.dlq");
        assert_eq!(publisher.publish(&outgoing(&dlq, queue, &[])).await, Ok(()));
    }
    publisher.close().await;
    let pool = pg().await;
    wait_rows(&pool, &table, 2).await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
    let logs = daemon.logs();
    let loud: Vec<&str> = logs
        .lines()
        .filter(|l| l.contains("\"level\":\"ERROR\"") || l.contains("\"level\":\"WARN\""))
        .collect();
    assert!(
        loud.is_empty(),
        "a clean start logs no warning or error:\n{logs}"
    );
    let (_conn, ch) = amqp_channel().await;
    for queue in &queues {
        for q in [queue.clone(), format!("{queue}.dlq")] {
            let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
        }
    }
    for x in &exchanges {
        let _ = ch
            .exchange_delete(x.as_str().into(), Default::default())
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_rule_leaves_bosun_dead_letters_of_retried_messages_alone() {
    let queue = unique("dl_retried");
    let dlq = format!("{queue}.dlq");
    let table = unique("dl_archive");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[handlers.failing]
kind = "exec"
command = ["/bin/false"]
exit_codes = {{ "1" = "retry" }}

[consumers.orig]
source = "rabbit"
handler = "failing"
queue = "{queue}"
retry = {{ max_attempts = 2, tiers = ["100ms"] }}

[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
archive = "main"
table = "{table}"

[[dead_letters.dl.rules]]
when = {{ source = "broker", reason = ["expired", "maxlen"] }}
action = "replay"
max_replays = 3
"#,
        amqp_base("dlq-source-test", port)
    ));
    let (code, _, err) = cli(&config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let daemon = Daemon::start(&config.path, port);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let publisher = amqp_publisher();
    assert_eq!(
        publisher.publish(&outgoing(&queue, "retried", &[])).await,
        Ok(())
    );
    publisher.close().await;
    let pool = pg().await;
    wait_rows(&pool, &table, 1).await;
    let (message_id, status, kind, replays, _) = rows(&pool, &table).await.remove(0);
    assert_eq!(message_id.as_deref(), Some("retried"));
    assert_eq!((status.as_str(), kind.as_str()), ("archived", "exhausted"));
    assert_eq!(
        replays, 0,
        "bosun's dead letter is not the broker's: no replay"
    );
    assert_eq!(
        daemon
            .metric("bosun_dead_letter_replays_total", &["processor=\"dl\""])
            .unwrap_or(0.0),
        0.0
    );
}

/// Without an archive, a forward that can never succeed (its exchange does not exist) goes
/// to the configured fallback instead of being retried for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unroutable_forward_without_an_archive_goes_to_the_fallback() {
    let dlq = unique("dl_fb");
    let parking = unique("dl_parking");
    let fallback = unique("dl_fallback");
    let port = free_port();
    let config = ConfigFile::new(&format!(
        r#"{}
[dead_letters.dl]
source = "rabbit"
queue = "{dlq}"
default_action = "drop"
fallback = "{fallback}"

[[dead_letters.dl.rules]]
action = "forward"
exchange = "{}"
"#,
        amqp_base("dlq-fallback-test", port),
        unique("dl_nowhere")
    ));
    let (_conn, ch) = amqp_channel().await;
    declare(&ch, &dlq, lapin::types::FieldTable::default()).await;
    declare(&ch, &parking, lapin::types::FieldTable::default()).await;
    ch.exchange_declare(
        fallback.as_str().into(),
        lapin::ExchangeKind::Fanout,
        Default::default(),
        Default::default(),
    )
    .await
    .expect("declare the fallback exchange");
    ch.queue_bind(
        parking.as_str().into(),
        fallback.as_str().into(),
        "".into(),
        Default::default(),
        Default::default(),
    )
    .await
    .expect("bind");
    let publisher = amqp_publisher();
    for i in 0..20 {
        assert_eq!(
            publisher
                .publish(&outgoing(&dlq, &format!("fb-{i}"), &[("bosun-error", "x")]))
                .await,
            Ok(())
        );
    }
    publisher.close().await;
    let daemon = Daemon::start(&config.path, port);
    let parked = wait_for_async(WAIT, || {
        let ch = ch.clone();
        let parking = parking.clone();
        async move { (queue_depth(&ch, &parking).await == 20).then_some(()) }
    })
    .await;
    assert!(parked.is_some(), "{}", daemon.logs());
    assert_eq!(queue_depth(&ch, &dlq).await, 0);
    let _ = ch
        .exchange_delete(fallback.as_str().into(), Default::default())
        .await;
    for q in [&dlq, &parking] {
        let _ = ch.queue_delete(q.as_str().into(), Default::default()).await;
    }
}

#[test]
fn rule_sources_and_fallbacks_are_checked_at_load() {
    let config = ConfigFile::new(&format!(
        r#"{}
[dead_letters.dl]
source = "rabbit"
queue = "q.dlq"
archive = "main"
fallback = "parking"

[[dead_letters.dl.rules]]
when = {{ source = "producer" }}
action = "archive"

[[dead_letters.dl.rules]]
when = {{ source = ["broker", "bosun"] }}
action = "archive"
"#,
        amqp_base("dlq-check-test", free_port())
    ));
    let path = config.path.to_string_lossy().into_owned();
    let (code, out, err) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 78, "{out}{err}");
    let text = format!("{out}{err}");
    assert!(text.contains("unknown source `producer`"), "{text}");
    assert!(
        text.contains("`fallback` is for processors without an archive"),
        "{text}"
    );
    assert!(
        !text.contains("rules.1"),
        "a list of sources is fine: {text}"
    );
}

/// Archives `dead_letter` (added to `<stream>:dlq`) through a processor that reads `format`
/// on a broker that writes bosun's own layout, replays it with `bosun dlq replay`, and
/// returns what the replay wrote to `stream`.
async fn replayed_through_cli(format: &str, stream: &str, dead_letter: &[(&str, &[u8])]) -> Fields {
    let s = redis_setup(false);
    let dlq = format!("{stream}:dlq");
    let table = unique("dl_format_archive");
    let text = std::fs::read_to_string(&s.config.path).expect("config");
    s.config.rewrite(&format!(
        "{text}\n[dead_letters.formatted]\nsource = \"cache\"\nstream = \"{dlq}\"\n{format}\narchive = \"main\"\ntable = \"{table}\"\nreplay_to = [\"{stream}\"]\n"
    ));
    let (code, _, err) = cli(&s.config, &["migrate"]);
    assert_eq!(code, 0, "migrate: {err}");
    let mut conn = redis().await;
    let mut cmd = redis::cmd("XADD");
    cmd.arg(&dlq).arg("*");
    for (name, value) in dead_letter {
        cmd.arg(*name).arg(*value);
    }
    let _: String = cmd.query_async(&mut conn).await.expect("XADD");
    let mut daemon = Daemon::start(&s.config.path, s.port);
    let pool = pg().await;
    wait_rows(&pool, &table, 1).await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
    let id: i64 = sqlx::query_scalar(&format!("SELECT id FROM {table}"))
        .fetch_one(&pool)
        .await
        .expect("archived row");
    let (code, out, err) = cli(
        &s.config,
        &["replay", &id.to_string(), "--processor", "formatted"],
    );
    assert_eq!(code, 0, "replay: {err}{out}");
    let mut replayed = entries(&mut conn, stream).await;
    let _ = conn.del::<_, ()>(&[stream, dlq.as_str()]).await;
    assert_eq!(replayed.len(), 1, "{replayed:?}");
    replayed.remove(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_replay_writes_in_the_format_of_the_processor_that_archived_the_row() {
    let stream = unique("dl_flat");
    // A dead-letter copy as a `fields` consumer writes it: the producer's fields, then
    // bosun's own.
    let replayed = replayed_through_cli(
        "entry_format = \"fields\"",
        &stream,
        &[
            ("event_type", b"user.created"),
            ("user_id", b"123"),
            ("message_id", b"flat-1"),
            ("bosun-attempt", b"3"),
            ("bosun-orig-stream", stream.as_bytes()),
            ("bosun-orig-id", b"1-0"),
            ("bosun-error", b"boom"),
            ("bosun-error-kind", b"exhausted"),
        ],
    )
    .await;
    let names: Vec<&str> = replayed.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        names,
        ["event_type", "user_id", "message_id", "bosun-replay-count"],
        "the producer's flat fields, not a `payload`: {replayed:?}"
    );
    assert_eq!(field(&replayed, "user_id").as_deref(), Some("123"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watermill_replay_keeps_the_correlation_id_and_content_type_in_metadata() {
    let stream = unique("dl_watermill");
    let metadata = br#"{"correlation_id":"c-77","content_type":"x","tenant":"t1"}"#;
    let replayed = replayed_through_cli(
        "entry_format = \"watermill\"",
        &stream,
        &[
            ("_watermill_message_uuid", b"uuid-7"),
            ("payload", b"{\"n\":7}"),
            ("metadata", metadata),
            ("bosun-orig-stream", stream.as_bytes()),
            ("bosun-error", b"boom"),
            ("bosun-error-kind", b"exhausted"),
        ],
    )
    .await;
    assert_eq!(
        field(&replayed, "_watermill_message_uuid").as_deref(),
        Some("uuid-7")
    );
    assert_eq!(field(&replayed, "payload").as_deref(), Some("{\"n\":7}"));
    let written = replayed
        .iter()
        .find(|(k, _)| k == "metadata")
        .map(|(_, v)| v.clone())
        .unwrap_or_default();
    let text = String::from_utf8_lossy(&written);
    for kept in ["correlation_id", "c-77", "content_type", "tenant", "t1"] {
        assert!(
            text.contains(kept),
            "`{kept}` lost from the metadata: {written:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreadable_dapr_dead_letter_is_archived_with_its_body_and_replayed_in_dapr() {
    let stream = unique("dl_dapr");
    // Not a dead letter bosun can read (the attempt is not a number): archived as it is.
    let replayed = replayed_through_cli(
        "entry_format = \"dapr\"",
        &stream,
        &[
            ("data", br#"{"n":1}"#),
            ("message_id", b"dapr-1"),
            ("bosun-attempt", b"zero"),
            ("bosun-orig-stream", stream.as_bytes()),
            ("tenant", b"t1"),
        ],
    )
    .await;
    assert_eq!(field(&replayed, "data").as_deref(), Some(r#"{"n":1}"#));
    assert_eq!(field(&replayed, "message_id").as_deref(), Some("dapr-1"));
    assert_eq!(field(&replayed, "tenant").as_deref(), Some("t1"));
}
