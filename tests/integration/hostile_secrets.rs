//! Secrets through the real binary: a configuration holding a database password, an admin
//! token, webhook tokens, an API key and a Slack-style webhook path, with every output forced
//! (`bosun check`, a configuration error, failing webhooks whose reasons reach the dead-letter
//! stream and the archive, `/readyz`, `/metrics`, the logs, the admin API, `bosun dlq show`),
//! and not one secret in any of them. Also the admin API's limits, the refusal of a config
//! file others may write, the pid-file lock, and the environment `exec` commands get.

use crate::support;

use std::io::{Read as _, Write as _};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt as _;
use std::time::{Duration, Instant};

use redis::AsyncCommands as _;
use sqlx::PgPool;
use support::*;

const WAIT: Duration = Duration::from_secs(40);

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("redis client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to Redis")
}

async fn pg() -> PgPool {
    PgPool::connect(PG_URL)
        .await
        .expect("connect to PostgreSQL")
}

/// A port nothing listens on (bound, then released).
fn closed_port() -> u16 {
    free_port()
}

/// An endpoint that answers every request 400 with the request itself (line and headers)
/// as the body: the worst echo an operator's endpoint could do.
fn start_echo() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request);
            let head = head.split("\r\n\r\n").next().unwrap_or("").to_owned();
            let response = format!(
                "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
                head.len()
            );
            let _ = stream.write_all(response.as_bytes());
        }
    });
    port
}

/// Every secret of the hostile configuration, and the environment that carries them.
struct Secrets {
    db_pass: String,
    ssl_pass: String,
    admin_token: String,
    webhook_token: String,
    slack_path: String,
    query_token: String,
    api_key: String,
    redis_pass: String,
}

impl Secrets {
    fn new() -> Self {
        let tag = unique("s").replace('_', "");
        Self {
            db_pass: format!("dbpw{tag}"),
            ssl_pass: format!("sslpw{tag}"),
            admin_token: format!("admintoken{tag}0123456789abcdef0123456789"),
            webhook_token: format!("whtoken{tag}"),
            slack_path: format!("slackpath{tag}"),
            query_token: format!("qtoken{tag}"),
            api_key: format!("apikey{tag}"),
            redis_pass: format!("redispw{tag}"),
        }
    }

    fn all(&self) -> Vec<&str> {
        vec![
            &self.db_pass,
            &self.ssl_pass,
            &self.admin_token,
            &self.webhook_token,
            &self.slack_path,
            &self.query_token,
            &self.api_key,
            &self.redis_pass,
        ]
    }

    fn env(&self, echo_port: u16) -> Vec<(String, String)> {
        vec![
            (
                "HS_DATABASE_URL".into(),
                format!(
                    "postgres://postgres:{}@127.0.0.1:5432/test?sslmode=disable&sslpassword={}",
                    self.db_pass, self.ssl_pass
                ),
            ),
            ("HS_ADMIN_TOKEN".into(), self.admin_token.clone()),
            ("HS_WEBHOOK_TOKEN".into(), self.webhook_token.clone()),
            (
                "HS_SLACK_URL".into(),
                format!(
                    "http://127.0.0.1:{}/services/T0001/B0002/{}",
                    closed_port(),
                    self.slack_path
                ),
            ),
            (
                "HS_ECHO_URL".into(),
                format!(
                    "http://127.0.0.1:{echo_port}/echo?token={}",
                    self.query_token
                ),
            ),
            ("HS_API_KEY".into(), self.api_key.clone()),
            (
                "HS_DOWN_REDIS_URL".into(),
                format!("redis://:{}@127.0.0.1:{}/", self.redis_pass, closed_port()),
            ),
        ]
    }

    /// Fails naming the secret and the output that showed it.
    fn assert_absent(&self, what: &str, text: &str) {
        for secret in self.all() {
            assert!(
                !text.contains(secret),
                "{what} shows secret {secret:?}:\n{text}"
            );
        }
    }
}

fn env_refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

fn hostile_config(port: u16, s1: &str, s2: &str, table: &str) -> String {
    format!(
        r#"
[service]
name = "hostile-secrets"
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[http.admin]
token_env = "HS_ADMIN_TOKEN"
listen = "127.0.0.1:0"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[brokers.down]
kind = "redis"
url = "${{HS_DOWN_REDIS_URL}}"

[databases.main]
url = "${{HS_DATABASE_URL}}"
max_connections = 4

[handlers.slack]
kind = "http"
url = "${{HS_SLACK_URL}}"
token_env = "HS_WEBHOOK_TOKEN"
timeout = "5s"

[handlers.echo]
kind = "http"
url = "${{HS_ECHO_URL}}"
token_env = "HS_WEBHOOK_TOKEN"
headers = {{ "x-api-key" = "${{HS_API_KEY}}" }}
timeout = "5s"

[consumers.to_slack]
source = "cache"
handler = "slack"
stream = "{s1}"
retry = {{ max_attempts = 1 }}

[consumers.to_echo]
source = "cache"
handler = "echo"
stream = "{s2}"
retry = {{ max_attempts = 1 }}

[consumers.unreachable]
source = "down"
handler = "slack"
stream = "{s1}_unreachable"

[dead_letters.dl_slack]
source = "cache"
stream = "{s1}:dlq"
archive = "main"
table = "{table}"
migrate = true

[dead_letters.dl_echo]
source = "cache"
stream = "{s2}:dlq"
archive = "main"
table = "{table}"
migrate = true
"#
    )
}

/// The admin API's own listener, from the daemon's log.
fn admin_base(daemon: &Daemon) -> Option<String> {
    daemon
        .logs()
        .lines()
        .filter(|l| l.contains("admin API listening"))
        .find_map(|l| {
            let value: serde_json::Value = serde_json::from_str(l).ok()?;
            Some(format!("http://{}", value["listen"].as_str()?))
        })
}

fn admin_request(base: &str, method: &str, path: &str, token: &str, body: &str) -> (u16, String) {
    let auth = format!("Bearer {token}");
    http_request(
        method,
        &format!("{base}{path}"),
        &[
            ("Content-Type", "application/json"),
            ("Authorization", auth.as_str()),
        ],
        body.as_bytes(),
    )
    .expect("admin API reachable")
}

async fn stream_text(conn: &mut redis::aio::MultiplexedConnection, stream: &str) -> String {
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(stream).await.expect("XRANGE");
    let mut text = String::new();
    for entry in entries.ids {
        for (field, value) in entry.map {
            let value: String = redis::from_redis_value(value).unwrap_or_default();
            text.push_str(&format!("{field}={value}\n"));
        }
    }
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_reaches_any_output() {
    let secrets = Secrets::new();
    let echo_port = start_echo();
    let env = secrets.env(echo_port);
    let env = env_refs(&env);
    let port = free_port();
    let s1 = unique("hs_slack");
    let s2 = unique("hs_echo");
    let table = unique("hs_archive");
    let config = ConfigFile::new(&hostile_config(port, &s1, &s2, &table));
    let path = config.path.to_string_lossy().into_owned();

    // bosun check.
    let (code, out, err) = bosun_output(&["check", "--config", &path], &env);
    assert_eq!(code, 0, "check: {err}{out}");
    secrets.assert_absent("bosun check", &format!("{out}{err}"));
    assert!(out.contains("database main"), "{out}");

    // A configuration error about a value that came from the environment.
    let misplaced = ConfigFile::new(
        "[http]\nlisten = \"${HS_DATABASE_URL}\"\n[http.admin]\ntoken_env = \"HS_ADMIN_TOKEN\"\n",
    );
    let misplaced_path = misplaced.path.to_string_lossy().into_owned();
    let (code, out, err) = bosun_output(&["check", "--config", &misplaced_path], &env);
    assert_eq!(code, 78, "{err}");
    secrets.assert_absent("a configuration error", &format!("{out}{err}"));
    assert!(err.contains("${HS_DATABASE_URL}"), "{err}");

    // The daemon, with two failing webhooks and an unreachable broker.
    let daemon = Daemon::start_with_env(&config.path, port, &env);
    assert!(daemon.wait_http(WAIT), "{}", daemon.logs());
    let mut conn = redis().await;
    let _: String = conn
        .xadd(
            &s1,
            "*",
            &[
                ("payload", "{\"to\":\"slack\"}"),
                ("message_id", "to-slack"),
            ],
        )
        .await
        .expect("XADD");
    let _: String = conn
        .xadd(
            &s2,
            "*",
            &[("payload", "{\"to\":\"echo\"}"), ("message_id", "to-echo")],
        )
        .await
        .expect("XADD");

    let pool = pg().await;
    let archived = wait_for_async(WAIT, || async {
        let rows: Vec<(String,)> =
            sqlx::query_as(&format!("SELECT row_to_json(t)::text FROM {table} t"))
                .fetch_all(&pool)
                .await
                .ok()?;
        (rows.len() == 2).then_some(rows)
    })
    .await
    .unwrap_or_else(|| panic!("both dead letters archived:\n{}", daemon.logs()));
    let archive_text: String = archived.into_iter().map(|(r,)| r + "\n").collect();
    secrets.assert_absent("the archive", &archive_text);
    assert!(
        archive_text.contains("handler `slack`") && archive_text.contains("127.0.0.1"),
        "the transport error names the handler and host: {archive_text}"
    );
    assert!(
        archive_text.contains("HTTP 400"),
        "the echo's reason is kept, redacted: {archive_text}"
    );

    let dlq_text = format!(
        "{}{}",
        stream_text(&mut conn, &format!("{s1}:dlq")).await,
        stream_text(&mut conn, &format!("{s2}:dlq")).await
    );
    assert!(dlq_text.contains("bosun-error="), "{dlq_text}");
    secrets.assert_absent("the dead-letter streams", &dlq_text);

    // /readyz once the unreachable consumer has said why.
    let readyz = wait_for(WAIT, || {
        let (_, body) = daemon.get("/readyz")?;
        (body.contains("consumer:unreachable") && !body.contains("\"starting\"")).then_some(body)
    })
    .unwrap_or_else(|| daemon.get("/readyz").map(|r| r.1).unwrap_or_default());
    secrets.assert_absent("/readyz", &readyz);
    let (_, metrics) = daemon.get("/metrics").expect("/metrics");
    secrets.assert_absent("/metrics", &metrics);

    // The admin API and the CLI's view of the archive.
    let base = admin_base(&daemon).expect("the admin API listens");
    let (status, list) = admin_request(
        &base,
        "GET",
        "/admin/dead-letters?processor=dl_echo",
        &secrets.admin_token,
        "",
    );
    assert_eq!(status, 200, "{list}");
    secrets.assert_absent("the admin list", &list);
    let rows: serde_json::Value = serde_json::from_str(&list).expect("JSON");
    for processor in ["dl_echo", "dl_slack"] {
        let (_, list) = admin_request(
            &base,
            "GET",
            &format!("/admin/dead-letters?processor={processor}"),
            &secrets.admin_token,
            "",
        );
        let rows: serde_json::Value = serde_json::from_str(&list).expect("JSON");
        for row in rows.as_array().into_iter().flatten() {
            let id = row["id"].as_i64().expect("id");
            let (status, shown) = admin_request(
                &base,
                "GET",
                &format!("/admin/dead-letters/{id}?processor={processor}"),
                &secrets.admin_token,
                "",
            );
            assert_eq!(status, 200, "{shown}");
            secrets.assert_absent("the admin show", &shown);
            let (code, out, err) = bosun_output(
                &[
                    "dlq",
                    "show",
                    "--config",
                    &path,
                    "--processor",
                    processor,
                    &id.to_string(),
                ],
                &env,
            );
            assert_eq!(code, 0, "{err}");
            secrets.assert_absent("bosun dlq show", &format!("{out}{err}"));
        }
    }
    assert!(rows.as_array().is_some_and(|r| r.len() == 1), "{rows}");

    // A refused request is logged without its token.
    let (status, _) = admin_request(&base, "GET", "/admin/dead-letters", "x", "");
    assert_eq!(status, 401);

    let mut daemon = daemon;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait_exit(WAIT);
    let logs = daemon.logs();
    assert!(
        logs.contains("to-slack"),
        "the logs tell the failure: {logs}"
    );
    secrets.assert_absent("the logs", &logs);
    for line in logs.lines().filter(|l| l.starts_with('{')) {
        assert!(
            serde_json::from_str::<serde_json::Value>(line).is_ok(),
            "redaction kept each log line valid JSON: {line}"
        );
    }
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
        .execute(&pool)
        .await;
    let _: Result<(), _> = conn
        .del(&[
            s1.clone(),
            s2.clone(),
            format!("{s1}:dlq"),
            format!("{s2}:dlq"),
        ])
        .await;
}

fn admin_config(port: u16, stream: &str, table: &str, token_var: &str) -> String {
    format!(
        r#"
[service]
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[http.admin]
token_env = "{token_var}"
listen = "127.0.0.1:0"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[databases.main]
url = "{PG_URL}"
max_connections = 4

[dead_letters.dl]
source = "cache"
stream = "{stream}"
archive = "main"
table = "{table}"
migrate = true

[dead_letters.other]
source = "cache"
stream = "{stream}_other"
archive = "main"
table = "{table}"
"#
    )
}

#[test]
fn admin_api_limits_ids_requires_confirmed_all_and_rate_limits_failures() {
    const TOKEN: &str = "admin-limits-token-0123456789abcdef0123";
    let port = free_port();
    let stream = unique("hs_admin");
    let table = unique("hs_admin_archive");
    let config = ConfigFile::new(&admin_config(port, &stream, &table, "HS_LIMITS_TOKEN"));
    let path = config.path.to_string_lossy().into_owned();
    let env = [("HS_LIMITS_TOKEN", TOKEN)];
    let daemon = Daemon::start_with_env(&config.path, port, &env);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let base = admin_base(&daemon).expect("the admin API listens");

    // Not on the metrics listener.
    let (status, _) = daemon.get("/admin/dead-letters").expect("metrics listener");
    assert_eq!(status, 404, "the metrics listener serves no admin route");

    // Id lists: over the cap refused, at the cap answered in linear time.
    let ids = |n: usize| -> String {
        let list: Vec<String> = (1..=n)
            .map(|i| (i as i64 + 9_000_000_000).to_string())
            .collect();
        format!(r#"{{"processor":"dl","ids":[{}]}}"#, list.join(","))
    };
    let (status, body) = admin_request(
        &base,
        "POST",
        "/admin/dead-letters/replay",
        TOKEN,
        &ids(10_001),
    );
    assert_eq!(status, 413, "{body}");
    assert!(body.contains("10000"), "{body}");
    let (status, body) = admin_request(
        &base,
        "POST",
        "/admin/dead-letters/purge",
        TOKEN,
        &ids(10_001),
    );
    assert_eq!(status, 413, "{body}");
    let started = Instant::now();
    let (status, body) = admin_request(
        &base,
        "POST",
        "/admin/dead-letters/replay",
        TOKEN,
        &ids(10_000),
    );
    let took = started.elapsed();
    assert_eq!(status, 200, "{body}");
    let report: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(report["failed"].as_array().map(Vec::len), Some(10_000));
    assert!(took < Duration::from_secs(8), "10,000 ids took {took:?}");
    assert!(daemon.get("/healthz").is_some_and(|(s, _)| s == 200));

    // `all` needs a processor and its confirmation.
    for (body, expected) in [
        (r#"{"all":true}"#, 400),
        (r#"{"all":true,"processor":"dl"}"#, 400),
        (r#"{"all":true,"processor":"dl","confirm":"other"}"#, 400),
        (r#"{"all":true,"processor":"dl","dry_run":true}"#, 200),
        (r#"{"all":true,"processor":"dl","confirm":"dl"}"#, 200),
    ] {
        for route in ["replay", "purge"] {
            let (status, answer) = admin_request(
                &base,
                "POST",
                &format!("/admin/dead-letters/{route}"),
                TOKEN,
                body,
            );
            assert_eq!(status, expected, "{route} {body}: {answer}");
        }
    }
    for (args, expected) in [
        (&["--all"][..], 64),
        (&["--all", "--processor", "dl"], 64),
        (&["--all", "--processor", "dl", "--confirm", "other"], 64),
        (&["--all", "--processor", "dl", "--confirm", "dl"], 0),
    ] {
        let mut full = vec!["dlq", "purge", "--config", &path];
        full.extend_from_slice(args);
        let (code, out, err) = bosun_output(&full, &env);
        assert_eq!(code, expected, "{args:?}: {out}{err}");
        if expected == 64 {
            assert!(
                err.contains("processor") || err.contains("confirm"),
                "{err}"
            );
        }
    }

    // A flood of wrong tokens: refused, rate-limited, logged in aggregate.
    let mut answers = Vec::new();
    for i in 0..40 {
        let (status, _) = admin_request(
            &base,
            "GET",
            "/admin/dead-letters",
            &format!("wrong-{i}"),
            "",
        );
        answers.push(status);
    }
    assert!(
        answers.iter().all(|s| *s == 401 || *s == 429),
        "{answers:?}"
    );
    assert!(
        answers.contains(&429),
        "failures are rate-limited: {answers:?}"
    );
    let (status, _) = admin_request(&base, "GET", "/admin/dead-letters?processor=dl", TOKEN, "");
    assert_eq!(status, 200, "the right token still works during a flood");
    let failures = daemon
        .metric("bosun_admin_auth_failures_total", &["limited=\"false\""])
        .unwrap_or(0.0)
        + daemon
            .metric("bosun_admin_auth_failures_total", &["limited=\"true\""])
            .unwrap_or(0.0);
    assert!(failures >= 40.0, "every failure is counted: {failures}");
    let logs = daemon.logs();
    let lines = logs
        .lines()
        .filter(|l| l.contains("admin requests refused"))
        .count();
    assert!(
        (1..=5).contains(&lines),
        "40 refusals logged as {lines} lines:\n{logs}"
    );
    drop(daemon);
    tokio::runtime::Runtime::new()
        .expect("runtime")
        .block_on(async {
            let pool = pg().await;
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {table}"))
                .execute(&pool)
                .await;
        });
}

#[test]
fn short_admin_tokens_are_refused_at_load() {
    let short = "only-31-bytes-long-0123456789ab";
    assert_eq!(short.len(), 31);
    let config = ConfigFile::new("[http.admin]\ntoken_env = \"HS_SHORT_TOKEN\"\n");
    let path = config.path.to_string_lossy().into_owned();
    let (code, out, err) =
        bosun_output(&["check", "--config", &path], &[("HS_SHORT_TOKEN", short)]);
    assert_eq!(code, 78, "{out}{err}");
    assert!(err.contains("at least 32"), "{err}");
    assert!(!err.contains(short), "the token is not shown: {err}");
    let long = format!("{short}x");
    let (code, out, err) =
        bosun_output(&["check", "--config", &path], &[("HS_SHORT_TOKEN", &long)]);
    assert_eq!(code, 0, "{out}{err}");
}

#[test]
fn a_config_file_others_may_write_is_refused() {
    let config = ConfigFile::new("[handlers.drain]\nkind = \"noop\"\n");
    let path = config.path.to_string_lossy().into_owned();
    for (mode, who) in [
        (0o664, "its group"),
        (0o646, "every other user"),
        (0o666, "its group and every other user"),
    ] {
        std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(mode))
            .expect("chmod");
        for command in ["check", "run"] {
            let (code, _, err) = bosun_output(&[command, "--config", &path], &[]);
            assert_eq!(code, 78, "{command} with mode {mode:o}: {err}");
            assert!(
                err.contains(&format!("writable by {who}"))
                    && err.contains("--allow-insecure-config"),
                "{err}"
            );
        }
        let (code, _, err) = bosun_output(
            &["check", "--config", &path, "--allow-insecure-config"],
            &[],
        );
        assert_eq!(code, 0, "{err}");
    }
    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let (code, _, err) = bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{err}");
}

fn pid_config(port: u16, pid_file: &std::path::Path) -> String {
    format!(
        "[service]\nshutdown_timeout = \"5s\"\nlog_format = \"json\"\npid_file = \"{}\"\n\n[http]\nlisten = \"127.0.0.1:{port}\"\n\n[handlers.drain]\nkind = \"noop\"\n",
        pid_file.display()
    )
}

#[test]
fn a_second_daemon_on_the_same_pid_file_refuses_and_leaves_it_alone() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pid_file = dir.path().join("bosun.pid");
    let port = free_port();
    let config = ConfigFile::new(&pid_config(port, &pid_file));
    let path = config.path.to_string_lossy().into_owned();
    let mut first = Daemon::start(&config.path, port);
    assert!(first.wait_http(WAIT), "{}", first.logs());
    let expected = format!("{}\n", first.pid());
    assert_eq!(
        std::fs::read_to_string(&pid_file).ok().as_deref(),
        Some(expected.as_str())
    );

    // The second one stops at once, with the holder named, before touching the file.
    let (code, _, err) = bosun_output(&["run", "--config", &path], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("already running") && err.contains(&first.pid().to_string()),
        "{err}"
    );
    assert_eq!(
        std::fs::read_to_string(&pid_file).ok().as_deref(),
        Some(expected.as_str()),
        "the running daemon's pid file is untouched"
    );
    assert!(
        matches!(first.child.try_wait(), Ok(None)),
        "the first daemon still runs"
    );

    // `bosun reload --config` finds the daemon through the file's `pid_file`.
    let (code, out, err) = bosun_output(&["reload", "--config", &path], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        wait_for(WAIT, || {
            first
                .metric("bosun_config_reloads_total", &["result=\"success\""])
                .filter(|v| *v >= 1.0)
        })
        .is_some(),
        "the reload happened: {}",
        first.logs()
    );

    first.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(first.wait_exit(WAIT), Some(0));
    assert!(!pid_file.exists(), "the holder removes its pid file");
}

#[test]
fn the_pid_file_is_never_written_through_a_symlink() {
    let dir = tempfile::tempdir().expect("tempdir");
    let victim = dir.path().join("victim");
    std::fs::write(&victim, "precious\n").expect("write");
    let pid_file = dir.path().join("bosun.pid");
    std::os::unix::fs::symlink(&victim, &pid_file).expect("symlink");
    let port = free_port();
    let config = ConfigFile::new(&pid_config(port, &pid_file));
    let path = config.path.to_string_lossy().into_owned();
    let (code, _, err) = bosun_output(&["run", "--config", &path], &[]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(
        std::fs::read_to_string(&victim).ok().as_deref(),
        Some("precious\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exec_children_inherit_only_the_allowlist_and_never_what_the_config_reads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().display().to_string();
    let port = free_port();
    let stream = unique("hs_exec");
    let config = ConfigFile::new(&format!(
        r#"
[service]
shutdown_timeout = "5s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.unused]
kind = "http"
url = "http://127.0.0.1:1/"
headers = {{ "x-api-key" = "${{HS_EXEC_SECRET}}" }}

[handlers.minimal]
kind = "exec"
command = ["/bin/sh", "-c", "env > {out}/minimal.env"]
env = {{ CHOSEN = "yes" }}

[handlers.everything]
kind = "exec"
command = ["/bin/sh", "-c", "env > {out}/all.env"]
inherit_env = "all"

[handlers.both]
kind = "route"
routes = [{{ header = {{ name = "to", value = "minimal" }}, handler = "minimal" }}]
default = "everything"

[consumers.exec]
source = "cache"
handler = "both"
stream = "{stream}"
"#
    ));
    let env = [
        ("HS_EXEC_SECRET", "exec-secret-value-123"),
        ("HS_UNRELATED", "unrelated-value"),
        ("LANG", "C.UTF-8"),
        ("BOSUN__SERVICE__SHUTDOWN_TIMEOUT", "5s"),
    ];
    let daemon = Daemon::start_with_env(&config.path, port, &env);
    assert!(daemon.wait_ready(WAIT), "{}", daemon.logs());
    let mut conn = redis().await;
    let _: String = conn
        .xadd(&stream, "*", &[("payload", "a"), ("to", "minimal")])
        .await
        .expect("XADD");
    let _: String = conn
        .xadd(&stream, "*", &[("payload", "b"), ("to", "all")])
        .await
        .expect("XADD");
    let read = |name: &str| {
        let file = dir.path().join(name);
        wait_for(WAIT, || {
            std::fs::read_to_string(&file)
                .ok()
                .filter(|t| t.contains("BOSUN_HANDLER"))
        })
        .unwrap_or_else(|| panic!("{name} never written:\n{}", daemon.logs()))
    };
    let names = |text: &str| -> Vec<String> {
        text.lines()
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.to_owned()))
            .collect()
    };
    let minimal = read("minimal.env");
    let minimal_names = names(&minimal);
    for wanted in [
        "PATH",
        "LANG",
        "CHOSEN",
        "BOSUN_HANDLER",
        "BOSUN_MESSAGE_ID",
    ] {
        assert!(
            minimal_names.iter().any(|n| n == wanted),
            "{wanted} missing:\n{minimal}"
        );
    }
    for unwanted in [
        "HS_EXEC_SECRET",
        "HS_UNRELATED",
        "BOSUN__SERVICE__SHUTDOWN_TIMEOUT",
        "RUST_LOG",
    ] {
        assert!(
            !minimal_names.iter().any(|n| n == unwanted),
            "{unwanted} inherited:\n{minimal}"
        );
    }
    assert!(!minimal.contains("exec-secret-value-123"), "{minimal}");

    let all = read("all.env");
    let all_names = names(&all);
    assert!(all_names.iter().any(|n| n == "HS_UNRELATED"), "{all}");
    for unwanted in ["HS_EXEC_SECRET", "BOSUN__SERVICE__SHUTDOWN_TIMEOUT"] {
        assert!(
            !all_names.iter().any(|n| n == unwanted),
            "{unwanted} inherited:\n{all}"
        );
    }
    assert!(!all.contains("exec-secret-value-123"), "{all}");
    let _: Result<(), _> = conn.del(&stream).await;
}

/// A server that answers `/start...` with a 307 to `location` and records the head of every
/// other request (answering 204).
fn start_redirector(location: String) -> (u16, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let recorded = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let head = String::from_utf8_lossy(&request).to_lowercase();
            let response = if head.starts_with("post /start") {
                format!(
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: {location}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )
            } else {
                if let Ok(mut seen) = recorded.lock() {
                    seen.push(head);
                }
                "HTTP/1.1 204 No Content\r\nConnection: close\r\n\r\n".to_owned()
            };
            let _ = stream.write_all(response.as_bytes());
        }
    });
    (port, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secret_headers_are_dropped_on_a_redirect_to_another_origin() {
    let (other_port, other_seen) = start_redirector(String::new());
    let (home_port, home_seen) = start_redirector(format!("http://127.0.0.1:{other_port}/landing"));
    let (same_port, same_seen) = start_redirector("/landing".into());
    let text = format!(
        r#"
[handlers.away]
kind = "http"
url = "http://127.0.0.1:{home_port}/start"
follow_redirects = true
headers = {{ authorization = "Bearer redirect-token-1", "x-api-key" = "redirect-key-2", "x-custom" = "redirect-custom-3", "x-plain" = "visible" }}
secret_headers = ["x-custom"]

[handlers.home]
kind = "http"
url = "http://127.0.0.1:{same_port}/start"
follow_redirects = true
headers = {{ authorization = "Bearer redirect-token-1", "x-api-key" = "redirect-key-2", "x-custom" = "redirect-custom-3", "x-plain" = "visible" }}
secret_headers = ["x-custom"]
"#
    );
    bosun::metrics_handle();
    let kinds = bosun::handler::HandlerKinds::builtin();
    let config = bosun::config::load_str(
        &text,
        "redirect.toml",
        &kinds,
        &bosun::config::Env::default(),
    )
    .expect("config");
    let handlers = bosun::handler::build_all(&config.handlers).expect("handlers");
    let message = bosun::Message {
        message_id: Some(unique("redirect")),
        correlation_id: None,
        headers: Default::default(),
        content_type: Some("application/json".into()),
        body: bytes::Bytes::from_static(b"{}"),
        attempt: 1,
        redelivered: false,
        inbox: None,
        source: bosun::handler::Source {
            broker: "cache".into(),
            consumer: "c".into(),
            queue: "q".into(),
            exchange: None,
            routing_key: None,
            entry_id: None,
        },
    };
    for name in ["away", "home"] {
        let outcome = handlers[name].handle(&message).await;
        assert_eq!(outcome, bosun::Outcome::Ack, "{name}");
    }
    assert!(home_seen.lock().expect("lock").is_empty());
    let other = other_seen.lock().expect("lock").join("\n");
    assert!(
        other.contains("x-plain: visible"),
        "the redirect was followed: {other}"
    );
    for secret in ["redirect-token-1", "redirect-key-2", "redirect-custom-3"] {
        assert!(
            !other.contains(secret),
            "{secret} went to another origin:\n{other}"
        );
    }
    let same = same_seen.lock().expect("lock").join("\n");
    for kept in [
        "redirect-token-1",
        "redirect-key-2",
        "redirect-custom-3",
        "visible",
    ] {
        assert!(
            same.contains(kept),
            "{kept} kept on the same origin:\n{same}"
        );
    }
}

#[test]
fn configuration_errors_show_interpolated_values_as_their_variable() {
    let url = "postgres://app:interp-secret-pw@db.internal:5432/orders?sslpassword=interp-ssl-pw";
    let env = bosun::config::Env::from_pairs([("DATABASE_URL", url)]);
    let kinds = bosun::handler::HandlerKinds::builtin();
    for text in [
        "[http]\nlisten = \"${DATABASE_URL}\"\n",
        "[service]\nshutdown_timeout = \"${DATABASE_URL}\"\n",
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"${DATABASE_URL}\"\n",
        "[brokers.rabbit]\nkind = \"amqp\"\nurl = \"amqp://127.0.0.1/\"\n[handlers.h]\nkind = \"noop\"\n[consumers.c]\nsource = \"rabbit\"\nhandler = \"h\"\nqueue = \"q\"\nqueue_type = \"${DATABASE_URL}\"\n",
        "[handlers.h]\nkind = \"http\"\nurl = \"http://x/\"\nmethod = \"${DATABASE_URL}\"\n",
        "[handlers.h]\nkind = \"exec\"\ncommand = [\"/bin/true\"]\ninherit_env = \"${DATABASE_URL}\"\n",
    ] {
        let error = bosun::config::load_str(text, "secret.toml", &kinds, &env)
            .expect_err("the value does not belong there")
            .to_string();
        for secret in ["interp-secret-pw", "interp-ssl-pw", "db.internal"] {
            assert!(!error.contains(secret), "{text}\n-> {error}");
        }
    }
    let error = bosun::config::load_str(
        "[http]\nlisten = \"${DATABASE_URL}\"\n",
        "secret.toml",
        &kinds,
        &env,
    )
    .expect_err("not an address")
    .to_string();
    assert!(error.contains("${DATABASE_URL}"), "{error}");
}

#[test]
fn a_reload_refuses_a_config_file_others_may_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let port = free_port();
    let config = ConfigFile::new(&pid_config(port, &dir.path().join("bosun.pid")));
    let mut daemon = Daemon::start(&config.path, port);
    assert!(daemon.wait_http(WAIT), "{}", daemon.logs());
    let text = std::fs::read_to_string(&config.path).expect("config");
    std::fs::write(
        &config.path,
        format!("{text}\n[handlers.added]\nkind = \"log\"\n"),
    )
    .expect("edit");
    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o666)).expect("chmod");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(WAIT, || {
            daemon
                .metric("bosun_config_reloads_total", &["result=\"error\""])
                .filter(|v| *v >= 1.0)
        })
        .is_some(),
        "the reload was refused: {}",
        daemon.logs()
    );
    assert!(daemon.logs().contains("writable by"), "{}", daemon.logs());

    std::fs::set_permissions(&config.path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    assert!(
        wait_for(WAIT, || {
            daemon
                .metric("bosun_config_reloads_total", &["result=\"success\""])
                .filter(|v| *v >= 1.0)
        })
        .is_some(),
        "a safe file reloads: {}",
        daemon.logs()
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(daemon.wait_exit(WAIT), Some(0));
}
