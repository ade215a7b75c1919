//! The inbox through the `bosun` binary, on both brokers and both stores: a key's handler
//! runs once however often and wherever its message comes, a claim of a killed process is
//! taken over after its lease, a retry or a replay runs again, an out-of-process handler that
//! completed the record in its own transaction is not called again, and a message without
//! its key is dead-lettered as `invalid`.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::support::amqp::{OutgoingMessage, Publisher};
use crate::support::streams::{self, redis};
use crate::support::{
    ConfigFile, Daemon, PG_URL, RABBIT_URL, REDIS_URL, bosun_output, free_port, pg, unique,
    wait_for,
};
use bosun::handler::HeaderValue;

const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Amqp,
    Redis,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum StoreKind {
    Postgres,
    Redis,
}

/// One test's names, files and configuration.
struct Setup {
    broker: Broker,
    queue: String,
    table: String,
    dir: tempfile::TempDir,
    store: StoreKind,
}

impl Setup {
    fn new(broker: Broker, store: StoreKind) -> Self {
        Self {
            broker,
            queue: unique("inbox_q"),
            table: unique("inbox_t"),
            dir: tempfile::tempdir().expect("tempdir"),
            store,
        }
    }

    /// A message id unique to this test (records outlive a test in a redis store).
    fn id(&self, base: &str) -> String {
        format!("{base}-{}", self.queue)
    }

    fn runs_path(&self) -> PathBuf {
        self.dir.path().join("runs")
    }

    fn slow_path(&self) -> PathBuf {
        self.dir.path().join("slow")
    }

    /// The lines the handler wrote: one per run, `KEY ATTEMPT`.
    fn runs(&self) -> Vec<String> {
        std::fs::read_to_string(self.runs_path())
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// A daemon's configuration; `handler` is the `[handlers.h]` table's body, `consumer`
    /// extra lines of the consumer, `name` the redis consumer name.
    fn config(&self, port: u16, key: &str, lease: &str, handler: &str, name: &str) -> String {
        let store = match self.store {
            StoreKind::Postgres => format!(
                "kind = \"postgres\"\ndatabase = \"main\"\ntable = \"{}\"",
                self.table
            ),
            StoreKind::Redis => "kind = \"redis\"\nbroker = \"cache\"".to_owned(),
        };
        let source = match self.broker {
            Broker::Amqp => format!(
                "source = \"rabbit\"\nqueue = \"{}\"\nretry = {{ max_attempts = 3, tiers = [\"1s\"] }}",
                self.queue
            ),
            Broker::Redis => format!(
                "source = \"cache\"\nstream = \"{}\"\ngroup = \"g\"\nconsumer = \"{name}\"\nblock = \"200ms\"\nclaim_idle = \"1s\"\nretry = {{ max_attempts = 3, tiers = [\"1s\"] }}",
                self.queue
            ),
        };
        format!(
            r#"
[service]
shutdown_timeout = "5s"

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

[inboxes.main]
{store}
lease = "{lease}"
window = "1h"

[handlers.h]
{handler}

[consumers.c]
{source}
handler = "h"
inbox = {{ store = "main", key = "{key}" }}
"#
        )
    }

    /// An exec handler that writes `KEY ATTEMPT` to the runs file, then waits while the slow
    /// file exists, then runs `tail` (shell).
    fn exec(&self, tail: &str) -> String {
        let script = format!(
            "echo \"$BOSUN_INBOX_KEY $BOSUN_ATTEMPT\" >> {runs}; while [ -e {slow} ]; do sleep 0.1; done; {tail}",
            runs = self.runs_path().display(),
            slow = self.slow_path().display(),
        );
        format!(
            "kind = \"exec\"\ncommand = [\"sh\", \"-c\", {script:?}]\ntimeout = \"120s\"\ninherit_env = \"allowlist\""
        )
    }

    fn start(&self, text: &str, port: u16) -> (ConfigFile, Daemon) {
        let file = ConfigFile::new(text);
        let daemon = Daemon::start(&file.path, port);
        assert!(
            daemon.wait_ready(WAIT),
            "daemon not ready: {}",
            daemon.logs()
        );
        (file, daemon)
    }

    /// Sends one message with `id`, `headers` and `body`.
    async fn send(&self, id: &str, headers: &[(&str, &str)], body: &str) {
        match self.broker {
            Broker::Amqp => {
                let mut message = OutgoingMessage::new("", &self.queue, body.as_bytes());
                message.message_id = id.to_owned();
                for (k, v) in headers {
                    message
                        .headers
                        .insert((*k).to_owned(), HeaderValue::String((*v).to_owned()));
                }
                Publisher.publish(&message).await.expect("publish");
            }
            Broker::Redis => {
                let mut conn = redis().await;
                let mut fields: Vec<(&str, &[u8])> =
                    vec![("payload", body.as_bytes()), ("message_id", id.as_bytes())];
                fields.extend(headers.iter().map(|(k, v)| (*k, v.as_bytes())));
                streams::xadd(&mut conn, &self.queue, &fields).await;
            }
        }
    }

    /// The inbox record's status for `key`, as `bosun inbox show` prints it.
    fn status(&self, config: &Path, key: &str) -> Option<String> {
        let (code, out, _) = bosun_output(
            &[
                "inbox",
                "show",
                "--config",
                config.to_str().expect("utf-8 path"),
                "--allow-insecure-config",
                "c",
                key,
            ],
            &[],
        );
        (code == 0).then(|| {
            out.lines()
                .find_map(|l| l.strip_prefix("status:"))
                .unwrap_or_default()
                .trim()
                .to_owned()
        })
    }

    async fn cleanup(&self) {
        if self.store == StoreKind::Postgres {
            let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {}", self.table))
                .execute(&pg().await)
                .await;
        }
    }
}

fn duplicates(daemon: &Daemon) -> f64 {
    daemon
        .metric("bosun_inbox_duplicates_total", &["consumer=\"c\""])
        .unwrap_or(0.0)
}

/// Five copies of one id, one after the other into one process, then at once into two:
/// the handler runs once per id, and every other copy is counted as a duplicate.
async fn five_copies_run_once(broker: Broker, store: StoreKind) {
    let s = Setup::new(broker, store);
    let handler = s.exec("sleep 0.3");
    let (p1, p2) = (free_port(), free_port());
    let (_f1, d1) = s.start(&s.config(p1, "message_id", "1m", &handler, "one"), p1);
    let (seq, conc) = (s.id("seq"), s.id("conc"));
    for _ in 0..5 {
        s.send(&seq, &[], "x").await;
    }
    assert!(
        wait_for(WAIT, || (duplicates(&d1) >= 4.0).then_some(())).is_some(),
        "four duplicates expected: {:?}",
        s.runs()
    );
    let (_f2, d2) = s.start(&s.config(p2, "message_id", "1m", &handler, "two"), p2);
    let sends: Vec<_> = (0..5).map(|_| s.send(&conc, &[], "x")).collect();
    futures::future::join_all(sends).await;
    assert!(
        wait_for(WAIT, || (duplicates(&d1) + duplicates(&d2) >= 8.0)
            .then_some(()))
        .is_some(),
        "eight duplicates expected in all: {:?}\n{}\n{}",
        s.runs(),
        d1.logs(),
        d2.logs()
    );
    let runs = s.runs();
    assert_eq!(
        runs.iter()
            .filter(|r| r.starts_with(&format!("{seq} ")))
            .count(),
        1,
        "{runs:?}"
    );
    assert_eq!(
        runs.iter()
            .filter(|r| r.starts_with(&format!("{conc} ")))
            .count(),
        1,
        "{runs:?}"
    );
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_five_copies_run_the_handler_once() {
    five_copies_run_once(Broker::Amqp, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_postgres_five_copies_run_the_handler_once() {
    five_copies_run_once(Broker::Redis, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_redis_store_five_copies_run_the_handler_once() {
    five_copies_run_once(Broker::Amqp, StoreKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_redis_store_five_copies_run_the_handler_once() {
    five_copies_run_once(Broker::Redis, StoreKind::Redis).await;
}

/// A process killed with SIGKILL mid-handler leaves its claim; another process runs the
/// message only once the lease has expired, and counts the takeover (postgres).
async fn killed_claim_is_taken_over_after_the_lease(broker: Broker, store: StoreKind) {
    let s = Setup::new(broker, store);
    let handler = s.exec("true");
    std::fs::write(s.slow_path(), "").expect("slow marker");
    let (p1, p2) = (free_port(), free_port());
    let (_f1, d1) = s.start(&s.config(p1, "message_id", "3s", &handler, "one"), p1);
    let id = s.id("kill");
    s.send(&id, &[], "x").await;
    assert!(
        wait_for(WAIT, || (!s.runs().is_empty()).then_some(())).is_some(),
        "the handler never started"
    );
    d1.signal(nix::sys::signal::Signal::SIGKILL);
    std::fs::remove_file(s.slow_path()).expect("remove marker");
    let (f2, d2) = s.start(&s.config(p2, "message_id", "3s", &handler, "one"), p2);
    assert!(
        wait_for(WAIT, || (s.status(&f2.path, &id).as_deref()
            == Some("done"))
        .then_some(()))
        .is_some(),
        "never done after the takeover: {:?}\n{}",
        s.runs(),
        d2.logs()
    );
    assert_eq!(s.runs().len(), 2, "{:?}", s.runs());
    if store == StoreKind::Postgres {
        assert_eq!(
            d2.metric("bosun_inbox_takeovers_total", &["consumer=\"c\""]),
            Some(1.0)
        );
    }
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_killed_claim_is_taken_over_after_the_lease() {
    killed_claim_is_taken_over_after_the_lease(Broker::Amqp, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_postgres_killed_claim_is_taken_over_after_the_lease() {
    killed_claim_is_taken_over_after_the_lease(Broker::Redis, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_redis_store_killed_claim_is_taken_over_after_the_lease() {
    killed_claim_is_taken_over_after_the_lease(Broker::Amqp, StoreKind::Redis).await;
}

/// A failed first attempt releases its claim: the retry runs (it is not taken for a
/// duplicate of itself) and only then is the key done.
async fn a_retry_runs_and_leaves_no_done_record_behind(broker: Broker, store: StoreKind) {
    let s = Setup::new(broker, store);
    let handler = s.exec("[ \"$BOSUN_ATTEMPT\" = 1 ] && exit 1; exit 0");
    let port = free_port();
    let (file, d) = s.start(&s.config(port, "message_id", "10m", &handler, "one"), port);
    let id = s.id("retry");
    s.send(&id, &[], "x").await;
    assert!(
        wait_for(WAIT, || (s.status(&file.path, &id).as_deref()
            == Some("done"))
        .then_some(()))
        .is_some(),
        "never done: {:?}\n{}",
        s.runs(),
        d.logs()
    );
    assert_eq!(s.runs(), vec![format!("{id} 1"), format!("{id} 2")]);
    assert_eq!(duplicates(&d), 0.0);
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_a_retry_runs_and_leaves_no_done_record_behind() {
    a_retry_runs_and_leaves_no_done_record_behind(Broker::Amqp, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_redis_store_a_retry_runs_and_leaves_no_done_record_behind() {
    a_retry_runs_and_leaves_no_done_record_behind(Broker::Redis, StoreKind::Redis).await;
}

/// Keys from a header and from a JSON path: copies with another id but the same key are
/// duplicates; a message without the key field is dead-lettered as `invalid` without
/// running the handler.
async fn keys_from_a_header_and_a_json_path(broker: Broker) {
    for (key, same, missing_headers, missing_body) in [
        (
            "header:x-idem",
            (vec![("x-idem", "k-1")], "{}"),
            vec![],
            "{}",
        ),
        (
            "json:/order/id",
            (vec![], r#"{"order":{"id":"o-7"}}"#),
            vec![],
            r#"{"order":{}}"#,
        ),
    ] {
        let s = Setup::new(broker, StoreKind::Postgres);
        let handler = s.exec("true");
        let port = free_port();
        let (file, d) = s.start(&s.config(port, key, "1m", &handler, "one"), port);
        let (headers, body) = same;
        s.send("id-a", &headers, body).await;
        s.send("id-b", &headers, body).await;
        s.send("id-c", &missing_headers, missing_body).await;
        let dead = || {
            d.metric(
                "bosun_messages_settled_total",
                &["consumer=\"c\"", "outcome=\"dead_letter\""],
            )
            .unwrap_or(0.0)
        };
        assert!(
            wait_for(WAIT, || (duplicates(&d) >= 1.0 && dead() >= 1.0)
                .then_some(()))
            .is_some(),
            "{key}: {:?}\n{}",
            s.runs(),
            d.logs()
        );
        assert_eq!(s.runs().len(), 1, "{key}: {:?}", s.runs());
        let expected = if key.starts_with("header") {
            "k-1"
        } else {
            "o-7"
        };
        assert_eq!(s.status(&file.path, expected).as_deref(), Some("done"));
        assert!(
            d.logs().contains("message has no inbox key"),
            "{key}: {}",
            d.logs()
        );
        s.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_keys_from_a_header_and_a_json_path() {
    keys_from_a_header_and_a_json_path(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_keys_from_a_header_and_a_json_path() {
    keys_from_a_header_and_a_json_path(Broker::Redis).await;
}

#[test]
fn config_names_an_unknown_store_and_a_bad_key() {
    let s = Setup::new(Broker::Amqp, StoreKind::Postgres);
    let text = s
        .config(free_port(), "json:order", "1m", "kind = \"noop\"", "one")
        .replace("store = \"main\"", "store = \"other\"");
    let file = ConfigFile::new(&text);
    let (code, out, err) = bosun_output(
        &[
            "check",
            "--config",
            file.path.to_str().expect("utf-8 path"),
            "--allow-insecure-config",
        ],
        &[],
    );
    assert_eq!(code, 78, "{out}{err}");
    assert!(
        err.contains("names inbox `other`, which is not defined"),
        "{err}"
    );
    assert!(err.contains("a JSON pointer starts with `/`"), "{err}");
}

#[test]
fn schema_prints_the_table_and_the_completing_function() {
    let s = Setup::new(Broker::Amqp, StoreKind::Postgres);
    let file =
        ConfigFile::new(&s.config(free_port(), "message_id", "1m", "kind = \"noop\"", "one"));
    let (code, out, err) = bosun_output(
        &[
            "inbox",
            "schema",
            "--config",
            file.path.to_str().expect("utf-8 path"),
            "--allow-insecure-config",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("CREATE TABLE IF NOT EXISTS {} (", s.table)));
    assert!(out.contains(&format!(
        "CREATE OR REPLACE FUNCTION {}_complete(p_consumer text, p_key text, p_token text)",
        s.table
    )));
}

/// A message dead-lettered by its handler is done; its replay (a delayed `replay` rule of the
/// dead-letter processor) forgets the record first, so the replayed message runs again.
async fn a_replayed_dead_letter_runs_again(broker: Broker) {
    let s = Setup::new(broker, StoreKind::Postgres);
    let fixed = s.dir.path().join("fixed");
    let handler = format!(
        "{}\nexit_codes = {{ \"3\" = \"dead_letter\" }}",
        s.exec(&format!("[ -e {} ] || exit 3", fixed.display()))
    );
    let archive = unique("inbox_dl");
    let port = free_port();
    let text = format!(
        r#"{}
[dead_letters.dl]
{}
archive = "main"
table = "{archive}"
migrate = true

[[dead_letters.dl.rules]]
when = {{}}
action = "replay"
delay = "3s"
max_replays = 1
"#,
        s.config(port, "message_id", "1m", &handler, "one"),
        match broker {
            Broker::Amqp => format!("source = \"rabbit\"\nqueue = \"{}.dlq\"", s.queue),
            Broker::Redis => format!("source = \"cache\"\nstream = \"{}:dlq\"", s.queue),
        }
    );
    let (file, d) = s.start(&text, port);
    let id = s.id("replay");
    s.send(&id, &[], "x").await;
    assert!(
        wait_for(WAIT, || (!s.runs().is_empty()).then_some(())).is_some(),
        "the handler never ran: {}",
        d.logs()
    );
    std::fs::write(&fixed, "").expect("fixed marker");
    assert!(
        wait_for(WAIT, || (s.runs().len() == 2).then_some(())).is_some(),
        "the replay never ran: {:?}\n{}",
        s.runs(),
        d.logs()
    );
    assert_eq!(s.status(&file.path, &id).as_deref(), Some("done"));
    assert_eq!(duplicates(&d), 0.0);
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {archive}"))
        .execute(&pg().await)
        .await;
    s.cleanup().await;
}

/// An http handler that completes the record with `<table>_complete` in its own transaction
/// and is cut off before it answers is not called again: the retry finds the key done.
async fn an_http_handler_completing_in_its_own_transaction_is_not_called_again(broker: Broker) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let s = Setup::new(broker, StoreKind::Postgres);
    let effects = unique("inbox_effects");
    let pool = pg().await;
    sqlx::query(&format!("CREATE TABLE {effects} (key text NOT NULL)"))
        .execute(&pool)
        .await
        .expect("effects table");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let app = listener.local_addr().expect("addr").port();
    let calls = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let server = {
        let (pool, table, effects, calls) = (
            pool.clone(),
            s.table.clone(),
            effects.clone(),
            calls.clone(),
        );
        tokio::spawn(async move {
            loop {
                let Ok((mut socket, _)) = listener.accept().await else {
                    return;
                };
                calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let mut request = Vec::new();
                let mut buf = [0u8; 4096];
                while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                    match socket.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => request.extend_from_slice(&buf[..n]),
                    }
                }
                let text = String::from_utf8_lossy(&request).to_lowercase();
                let header = |name: &str| {
                    text.lines()
                        .find_map(|l| l.strip_prefix(&format!("{name}: ")))
                        .map(|v| v.trim().to_owned())
                        .unwrap_or_default()
                };
                let (consumer, key, token) = (
                    header("bosun-consumer"),
                    header("bosun-inbox-key"),
                    header("bosun-inbox-token"),
                );
                let mut tx = pool.begin().await.expect("begin");
                sqlx::query(&format!("SELECT {table}_complete($1, $2, $3)"))
                    .bind(&consumer)
                    .bind(&key)
                    .bind(&token)
                    .execute(&mut *tx)
                    .await
                    .expect("complete");
                sqlx::query(&format!("INSERT INTO {effects} (key) VALUES ($1)"))
                    .bind(&key)
                    .execute(&mut *tx)
                    .await
                    .expect("effect");
                tx.commit().await.expect("commit");
                // Cut off before answering.
                let _ = socket.shutdown().await;
            }
        })
    };
    let handler = format!("kind = \"http\"\nurl = \"http://127.0.0.1:{app}/\"\ntimeout = \"5s\"");
    let port = free_port();
    let (_file, d) = s.start(&s.config(port, "message_id", "1m", &handler, "one"), port);
    // Lower-case: the test's header parsing lowers the request.
    let id = s.id("effect").to_lowercase();
    s.send(&id, &[], "x").await;
    assert!(
        wait_for(WAIT, || (duplicates(&d) >= 1.0).then_some(())).is_some(),
        "the retry was never found done: {}",
        d.logs()
    );
    assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM {effects}"))
        .fetch_one(&pool)
        .await
        .expect("count");
    assert_eq!(n, 1);
    server.abort();
    let _ = sqlx::query(&format!("DROP TABLE IF EXISTS {effects}"))
        .execute(&pool)
        .await;
    s.cleanup().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_a_replayed_dead_letter_runs_again() {
    a_replayed_dead_letter_runs_again(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_postgres_a_replayed_dead_letter_runs_again() {
    a_replayed_dead_letter_runs_again(Broker::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_an_http_handler_completing_in_its_own_transaction_is_not_called_again() {
    an_http_handler_completing_in_its_own_transaction_is_not_called_again(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_postgres_an_http_handler_completing_in_its_own_transaction_is_not_called_again() {
    an_http_handler_completing_in_its_own_transaction_is_not_called_again(Broker::Redis).await;
}

/// Sends one message with raw bytes: `headers` (amqp: byte-array values unless UTF-8;
/// redis: fields) and `body`.
async fn send_raw(s: &Setup, id: &str, headers: &[(&str, Vec<u8>)], body: &[u8]) {
    match s.broker {
        Broker::Amqp => {
            let mut message = OutgoingMessage::new("", &s.queue, body.to_vec());
            message.message_id = id.to_owned();
            for (k, v) in headers {
                let value = match String::from_utf8(v.clone()) {
                    Ok(text) => HeaderValue::String(text),
                    Err(_) => HeaderValue::Bytes(v.clone()),
                };
                message.headers.insert((*k).to_owned(), value);
            }
            Publisher.publish(&message).await.expect("publish");
        }
        Broker::Redis => {
            let mut conn = redis().await;
            let mut fields: Vec<(&str, &[u8])> =
                vec![("payload", body), ("message_id", id.as_bytes())];
            fields.extend(headers.iter().map(|(k, v)| (*k, v.as_slice())));
            streams::xadd(&mut conn, &s.queue, &fields).await;
        }
    }
}

/// The key a value is stored under when it cannot be stored as it is.
fn hashed(value: &[u8]) -> String {
    use sha2::Digest as _;
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(value)))
}

/// Hostile key values, from a header and from a JSON pointer: a NUL byte, bytes that are not
/// UTF-8, a lone UTF-16 surrogate, JSON nested past the parser's depth, and values of 60 KB
/// and 500 KB. A value that cannot be a key dead-letters its message alone as `invalid`, with
/// the reason; one with a NUL or of any length runs once under `sha256:<hex>` of itself (a
/// copy is a duplicate). A plain message sent last still runs: nothing stalls the consumer.
async fn hostile_keys_fail_alone_or_run_under_a_sane_key(broker: Broker, store: StoreKind) {
    let long = |n: usize, tag: &str| format!("{tag}-{}", "L".repeat(n)).into_bytes();
    for key in ["header:x-idem", "json:/k"] {
        let s = Setup::new(broker, store);
        let port = free_port();
        let (file, d) = s.start(&s.config(port, key, "1m", &s.exec("true"), "one"), port);
        let tag = s.queue.clone();
        let nul = format!("a\0b-{tag}").into_bytes();
        let fine = format!("fine-{tag}").into_bytes();
        // (message, header or JSON value, what happens): true = runs once per value.
        let (runs, bad): (Vec<Vec<u8>>, usize) = if key.starts_with("header") {
            let big = long(60_000, &tag);
            let plan: Vec<(Vec<u8>, bool)> = vec![
                (nul.clone(), true),
                (nul.clone(), true),
                (vec![0xff, 0xfe, 0x00, b'x'], false),
                (big.clone(), true),
                (big.clone(), true),
            ];
            for (i, (value, _)) in plan.iter().enumerate() {
                send_raw(&s, &format!("h-{i}"), &[("x-idem", value.clone())], b"{}").await;
            }
            (vec![nul, big], 1)
        } else {
            let big = long(500_000, &tag);
            let text = |v: &[u8]| String::from_utf8_lossy(v).into_owned();
            let bodies: Vec<Vec<u8>> = vec![
                serde_json::json!({ "k": text(&nul) })
                    .to_string()
                    .into_bytes(),
                serde_json::json!({ "k": text(&nul) })
                    .to_string()
                    .into_bytes(),
                b"\xff\xfe{\"k\":\"x\"}".to_vec(),
                br#"{"k":"\ud800"}"#.to_vec(),
                format!(r#"{{"k":{}1{}}}"#, "[".repeat(300), "]".repeat(300)).into_bytes(),
                serde_json::json!({ "k": text(&big) })
                    .to_string()
                    .into_bytes(),
                serde_json::json!({ "k": text(&big) })
                    .to_string()
                    .into_bytes(),
            ];
            for (i, body) in bodies.iter().enumerate() {
                send_raw(&s, &format!("j-{i}"), &[], body).await;
            }
            (vec![nul, big], 3)
        };
        if key.starts_with("header") {
            send_raw(&s, "last", &[("x-idem", fine.clone())], b"{}").await;
        } else {
            let body = serde_json::json!({ "k": String::from_utf8_lossy(&fine) }).to_string();
            send_raw(&s, "last", &[], body.as_bytes()).await;
        }
        let dead = || {
            d.metric(
                "bosun_messages_settled_total",
                &["consumer=\"c\"", "outcome=\"dead_letter\""],
            )
            .unwrap_or(0.0)
        };
        let expected: Vec<String> = runs
            .iter()
            .map(|v| hashed(v))
            .chain([String::from_utf8_lossy(&fine).into_owned()])
            .collect();
        let ran = |k: &str| {
            s.runs()
                .iter()
                .filter(|r| r.starts_with(&format!("{k} ")))
                .count()
        };
        assert!(
            wait_for(WAIT, || (expected.iter().all(|k| ran(k) == 1)
                && duplicates(&d) >= 2.0
                && dead() >= bad as f64)
                .then_some(()))
            .is_some(),
            "{key}: runs {:?}, duplicates {}, dead letters {}\n{}",
            s.runs(),
            duplicates(&d),
            dead(),
            d.logs()
        );
        assert_eq!(s.runs().len(), expected.len(), "{key}: {:?}", s.runs());
        assert_eq!(dead(), bad as f64, "{key}");
        for k in &expected {
            assert_eq!(
                s.status(&file.path, k).as_deref(),
                Some("done"),
                "{key}: {k}"
            );
        }
        let logs = d.logs();
        let reason = if key.starts_with("header") {
            "header `x-idem` is empty or not text"
        } else {
            "the body is not JSON"
        };
        assert!(logs.contains("message has no inbox key"), "{key}: {logs}");
        assert!(logs.contains(reason), "{key}: {logs}");
        s.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_postgres_hostile_keys_fail_alone_or_run_under_a_sane_key() {
    hostile_keys_fail_alone_or_run_under_a_sane_key(Broker::Amqp, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_redis_store_hostile_keys_fail_alone_or_run_under_a_sane_key() {
    hostile_keys_fail_alone_or_run_under_a_sane_key(Broker::Amqp, StoreKind::Redis).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_postgres_hostile_keys_fail_alone_or_run_under_a_sane_key() {
    hostile_keys_fail_alone_or_run_under_a_sane_key(Broker::Redis, StoreKind::Postgres).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_redis_store_hostile_keys_fail_alone_or_run_under_a_sane_key() {
    hostile_keys_fail_alone_or_run_under_a_sane_key(Broker::Redis, StoreKind::Redis).await;
}
