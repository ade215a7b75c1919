//! The Redis Streams consumer on a real Redis Cluster (3 primaries, 3 replicas on local
//! ports, started by the test support when it is not up): delivery, retries, dead letters,
//! claims, a dead-letter stream in another slot, and a primary killed mid-run.

use crate::support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::supervisor::ExitStatus;
use bosun::{Handler, Message, Outcome};
use redis::cluster_async::ClusterConnection;
use support::cluster::{self, DISPOSABLE, SHARED};
use support::{InProcess, unique};

const WAIT: Duration = Duration::from_secs(30);

/// Records the message ids it saw and answers with `decide`.
struct Recorder {
    ids: Mutex<Vec<String>>,
    calls: AtomicUsize,
    delay: Duration,
    decide: Box<dyn Fn(&Message) -> Outcome + Send + Sync>,
}

impl Recorder {
    fn new(
        delay: Duration,
        decide: impl Fn(&Message) -> Outcome + Send + Sync + 'static,
    ) -> Arc<Self> {
        Arc::new(Self {
            ids: Mutex::new(Vec::new()),
            calls: AtomicUsize::new(0),
            delay,
            decide: Box::new(decide),
        })
    }
    fn distinct(&self) -> HashSet<String> {
        self.ids.lock().expect("lock").iter().cloned().collect()
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        if let Some(id) = &message.message_id {
            self.ids.lock().expect("lock").push(id.clone());
        }
        self.calls.fetch_add(1, Ordering::SeqCst);
        if !self.delay.is_zero() {
            tokio::time::sleep(self.delay).await;
        }
        (self.decide)(message)
    }
}

/// A config with one redis consumer `name` on `stream`, on the cluster at `base`.
fn config(base: u16, broker: &str, name: &str, stream: &str, extra: &str) -> String {
    format!(
        r#"
[service]
name = "cluster-test"
shutdown_timeout = "15s"
log_level = "warn"

[http]
listen = "127.0.0.1:{port}"

[brokers.{broker}]
kind = "redis"
cluster = {nodes}

[handlers.h]
kind = "test"

[consumers.{name}]
source = "{broker}"
handler = "h"
stream = "{stream}"
group = "g"
consumer = "{name}"
block = "200ms"
claim_interval = "200ms"
{extra}
"#,
        port = support::free_port(),
        nodes = cluster::toml_nodes(base),
    )
}

async fn xadd_many(conn: &mut ClusterConnection, stream: &str, n: usize, prefix: &str) {
    let mut pipe = redis::pipe();
    for i in 0..n {
        pipe.cmd("XADD")
            .arg(stream)
            .arg("*")
            .arg("payload")
            .arg(format!("body-{i}"))
            .arg("message_id")
            .arg(format!("{prefix}-{i}"))
            .ignore();
    }
    let () = pipe.query_async(conn).await.expect("XADD batch");
}

async fn pending(conn: &mut ClusterConnection, stream: &str) -> i64 {
    let summary: redis::Value = redis::cmd("XPENDING")
        .arg(stream)
        .arg("g")
        .query_async(conn)
        .await
        .expect("XPENDING");
    match summary {
        redis::Value::Array(parts) => match parts.first() {
            Some(redis::Value::Int(n)) => *n,
            _ => -1,
        },
        _ => -1,
    }
}

async fn xlen(conn: &mut ClusterConnection, stream: &str) -> i64 {
    redis::cmd("XLEN")
        .arg(stream)
        .query_async(conn)
        .await
        .expect("XLEN")
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn cleanup(conn: &mut ClusterConnection, keys: &[String]) {
    for key in keys {
        let _: redis::RedisResult<i64> = redis::cmd("DEL").arg(key).query_async(conn).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_without_hash_tag_is_consumed_retried_and_dead_lettered_in_its_slot() {
    let stream = unique("cl_plain");
    let name = unique("c_cl");
    let mut conn = cluster::connect(SHARED).await;
    // Every tenth message fails for good: retried once, then dead-lettered.
    let handler = Recorder::new(Duration::ZERO, |m| {
        let n: usize = m
            .message_id
            .as_deref()
            .and_then(|id| id.rsplit('-').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        if n.is_multiple_of(10) {
            Outcome::retry("fails")
        } else {
            Outcome::Ack
        }
    });
    let retry =
        "retry = { max_attempts = 2, backoff = \"fixed\", initial = \"200ms\", jitter = 0.0 }";
    let running = InProcess::start_text(
        &config(SHARED, &unique("b"), &name, &stream, retry),
        handler.clone(),
    );
    xadd_many(&mut conn, &stream, 200, "m").await;
    let dlq = format!("{{{stream}}}:dlq");
    wait_until("every entry is settled", WAIT, async || {
        handler.distinct().len() == 200
            && xlen(&mut conn, &dlq).await == 20
            && pending(&mut conn, &stream).await == 0
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    // The retry set and the name locks were in the stream's hash tag: the scripts ran.
    let retry_set: i64 = redis::cmd("EXISTS")
        .arg(format!("{{{stream}}}:retry"))
        .query_async(&mut conn)
        .await
        .expect("EXISTS");
    assert_eq!(retry_set, 0, "every scheduled retry was moved back");
    assert_eq!(
        handler.calls.load(Ordering::SeqCst),
        220,
        "180 acked once, 20 tried twice"
    );
    let plain_dlq = xlen(&mut conn, &format!("{stream}:dlq")).await;
    assert_eq!(plain_dlq, 0, "nothing under the name without the tag");
    cleanup(&mut conn, &[stream.clone(), dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_stream_in_another_slot_is_written_by_a_command_of_its_own() {
    let stream = unique("cl_apart");
    let dlq = unique("cl_apart_dead");
    assert_ne!(
        bosun::config::redis_keys::hash_slot(stream.as_bytes()),
        bosun::config::redis_keys::hash_slot(dlq.as_bytes()),
        "the names must hash apart for this test"
    );
    let name = unique("c_cl");
    let mut conn = cluster::connect(SHARED).await;
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::dead_letter("no"));
    let running = InProcess::start_text(
        &config(
            SHARED,
            &unique("b"),
            &name,
            &stream,
            &format!("dead_letter = {{ stream = \"{dlq}\" }}"),
        ),
        handler.clone(),
    );
    xadd_many(&mut conn, &stream, 30, "d").await;
    wait_until("every entry is dead-lettered", WAIT, async || {
        xlen(&mut conn, &dlq).await >= 30 && pending(&mut conn, &stream).await == 0
    })
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert_eq!(xlen(&mut conn, &dlq).await, 30, "one copy each");
    cleanup(&mut conn, &[stream, dlq]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_a_dead_consumer_left_pending_are_claimed_on_the_cluster() {
    let stream = format!("{{{}}}.events", unique("cl_claim"));
    let name = unique("c_cl");
    let mut conn = cluster::connect(SHARED).await;
    let () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(&stream)
        .arg("g")
        .arg("0")
        .arg("MKSTREAM")
        .query_async(&mut conn)
        .await
        .expect("XGROUP");
    xadd_many(&mut conn, &stream, 25, "p").await;
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("g")
        .arg("dead")
        .arg("COUNT")
        .arg(25)
        .arg("STREAMS")
        .arg(&stream)
        .arg(">")
        .query_async(&mut conn)
        .await
        .expect("XREADGROUP");
    let handler = Recorder::new(Duration::ZERO, |_| Outcome::Ack);
    let running = InProcess::start_text(
        &config(
            SHARED,
            &unique("b"),
            &name,
            &stream,
            "claim_idle = \"500ms\"",
        ),
        handler.clone(),
    );
    wait_until(
        "the dead consumer's entries are handled",
        WAIT,
        async || handler.distinct().len() == 25 && pending(&mut conn, &stream).await == 0,
    )
    .await;
    assert_eq!(running.stop().await, ExitStatus::Clean);
    cleanup(&mut conn, &[stream]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_killed_mid_run_is_replaced_by_its_replica_and_nothing_is_lost() {
    const N: usize = 3000;
    let stream = unique("cl_failover");
    let name = unique("c_cl");
    let mut conn = cluster::connect(DISPOSABLE).await;
    xadd_many(&mut conn, &stream, N, "f").await;
    // Acknowledged by a replica before the kill: what Redis itself keeps through a failover.
    let replicas: i64 = redis::cmd("WAIT")
        .arg(1)
        .arg(5000)
        .query_async(&mut conn)
        .await
        .expect("WAIT");
    assert!(replicas >= 1, "the replica has the entries");
    let primary = cluster::primary_port_of(&mut conn, &stream).await;

    let handler = Recorder::new(Duration::from_millis(2), |_| Outcome::Ack);
    let running = InProcess::start_text(
        &config(
            DISPOSABLE,
            &unique("b"),
            &name,
            &stream,
            "batch = 50\nconcurrency = 20\nclaim_idle = \"5s\"",
        ),
        handler.clone(),
    );
    wait_until("a part of the stream is handled", WAIT, async || {
        handler.distinct().len() >= N / 5
    })
    .await;
    let before = handler.distinct().len();
    assert!(before < N, "killed mid-run");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(cluster::server_pid(DISPOSABLE, primary)),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("SIGKILL the primary");

    // The replica takes over after the node timeout; the consumer follows it.
    wait_until(
        "every entry is handled and acked after the failover",
        Duration::from_secs(90),
        async || handler.distinct().len() == N && pending(&mut conn, &stream).await == 0,
    )
    .await;
    let now_primary = cluster::primary_port_of(&mut conn, &stream).await;
    assert_ne!(now_primary, primary, "a replica was promoted");
    assert_eq!(running.stop().await, ExitStatus::Clean);
    let calls = handler.calls.load(Ordering::SeqCst);
    assert!(calls >= N, "{calls} handler calls");
    eprintln!(
        "failover: {N} entries, {} duplicate deliveries, 0 lost",
        calls - N
    );
    cleanup(&mut conn, &[stream]).await;
    // The killed node is started again and rejoins as a replica: the cluster is whole.
    cluster::ensure(DISPOSABLE);
}

/// `bosun check` on `text`, written with owner-only permissions: (exit code, stdout, stderr).
fn check(text: &str) -> (i32, String, String) {
    // The binary knows the built-in handler kinds only.
    let file = support::ConfigFile::new(&text.replace("kind = \"test\"", "kind = \"noop\""));
    let path = file.path.display().to_string();
    support::bosun_output(
        &["check", "--allow-insecure-config", "--config", &path],
        &[],
    )
}

#[test]
fn check_says_where_a_cluster_consumer_keeps_its_keys() {
    let (code, stdout, stderr) = check(&format!(
        "{}\n[consumers.tagged]\nsource = \"cl\"\nhandler = \"h\"\nstream = \"{{pay}}.events\"\ndead_letter = {{ stream = \"elsewhere\" }}\n",
        config(SHARED, "cl", "plain", "orders", "")
    ));
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("broker cl: redis redis://127.0.0.1:7000/ (cluster, 6 seed node(s))"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "retry set {orders}:retry and name locks {orders}:lock:g:* are put in the tag {orders}"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("dead letters to {orders}:dlq in the same slot"),
        "{stdout}"
    );
    assert!(stdout.contains("retry set {pay}.events:retry"), "{stdout}");
    assert!(
        stdout.contains("dead-letter stream elsewhere is in slot"),
        "a dead-letter stream in another slot is said to be written apart: {stdout}"
    );
}

#[test]
fn a_redis_broker_takes_exactly_one_of_url_cluster_and_sentinel() {
    let both = "[brokers.r]\nkind = \"redis\"\nurl = \"redis://127.0.0.1:6379/\"\ncluster = [\"redis://127.0.0.1:7000/\"]\n\n[handlers.h]\nkind = \"noop\"\n";
    let (code, _, stderr) = check(both);
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("give exactly one of `url`"), "{stderr}");
    let brace = config(SHARED, "cl", "c", "a}b", "");
    let (code, _, stderr) = check(&brace);
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("has no hash tag but holds a `}`"),
        "{stderr}"
    );
    let seed = "[brokers.r]\nkind = \"redis\"\nurl = \"redis+cluster://127.0.0.1:7000\"\n\n[handlers.h]\nkind = \"noop\"\n\n[consumers.c]\nsource = \"r\"\nhandler = \"h\"\nstream = \"s\"\n";
    let (code, stdout, stderr) = check(seed);
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("(cluster, 1 seed node(s))"), "{stdout}");
    assert!(stdout.contains("dead letters to {s}:dlq"), "{stdout}");
}
