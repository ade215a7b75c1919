//! `single_active = true` with two `bosun` processes on one queue or stream: one reads, the
//! other stands by (`/healthz?verbose`, `bosun_consumer_active`), and takes over when the
//! first stops (SIGTERM) or dies (SIGKILL). A queue that exists without
//! `x-single-active-consumer` is a clear error.

use std::path::PathBuf;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::support::amqp::{OutgoingMessage, Publisher};
use crate::support::streams::{self, redis};
use crate::support::{ConfigFile, Daemon, RABBIT_URL, REDIS_URL, free_port, unique, wait_for};

const WAIT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Amqp,
    Redis,
}

struct Replica {
    _file: ConfigFile,
    daemon: Daemon,
    runs: PathBuf,
}

impl Replica {
    fn runs(&self) -> usize {
        std::fs::read_to_string(&self.runs)
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn active(&self, consumer: &str) -> Option<f64> {
        self.daemon.metric(
            "bosun_consumer_active",
            &[&format!("consumer=\"{consumer}\"")],
        )
    }

    fn standing_by(&self, consumer: &str) -> bool {
        self.daemon
            .get("/healthz?verbose")
            .and_then(|(_, body)| serde_json::from_str::<serde_json::Value>(&body).ok())
            .is_some_and(|v| v["standby_consumers"].get(consumer).is_some())
    }
}

fn replica(broker: Broker, name: &str, tag: &str, dir: &tempfile::TempDir) -> Replica {
    let port = free_port();
    let runs = dir.path().join(format!("runs-{tag}"));
    let script = format!("echo run >> {}", runs.display());
    let source = match broker {
        Broker::Amqp => format!("source = \"rabbit\"\nqueue = \"{name}\""),
        Broker::Redis => format!(
            "source = \"cache\"\nstream = \"{name}\"\ngroup = \"g\"\nconsumer = \"{tag}\"\nblock = \"200ms\"\nclaim_idle = \"2s\""
        ),
    };
    let text = format!(
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

[handlers.h]
kind = "exec"
command = ["sh", "-c", {script:?}]
inherit_env = "allowlist"

[consumers.{name}]
{source}
handler = "h"
single_active = true
"#
    );
    let file = ConfigFile::new(&text);
    let daemon = Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(WAIT), "not ready: {}", daemon.logs());
    Replica {
        _file: file,
        daemon,
        runs,
    }
}

async fn send(broker: Broker, name: &str, n: usize, from: usize) {
    match broker {
        Broker::Amqp => {
            let batch: Vec<OutgoingMessage> = (from..from + n)
                .map(|i| {
                    let mut m = OutgoingMessage::new("", name, format!("m-{i}").into_bytes());
                    m.message_id = format!("m-{i}");
                    m
                })
                .collect();
            for r in Publisher.publish_batch(&batch).await {
                r.expect("publish");
            }
        }
        Broker::Redis => {
            let mut conn = redis().await;
            for i in from..from + n {
                let body = format!("m-{i}");
                streams::xadd(
                    &mut conn,
                    name,
                    &[
                        ("payload", body.as_bytes()),
                        ("message_id", body.as_bytes()),
                    ],
                )
                .await;
            }
        }
    }
}

/// Two replicas: only one reads; the other stands by and takes over when the first stops.
async fn one_reads_and_the_other_takes_over(broker: Broker, stop: Signal) {
    let name = unique("single");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut first = replica(broker, &name, "one", &dir);
    // The first one reads before the second starts.
    send(broker, &name, 10, 0).await;
    assert!(
        wait_for(WAIT, || (first.runs() >= 10).then_some(())).is_some(),
        "first replica ran {}: {}",
        first.runs(),
        first.daemon.logs()
    );
    let second = replica(broker, &name, "two", &dir);
    assert!(
        wait_for(WAIT, || second.standing_by(&name).then_some(())).is_some(),
        "the second replica is not standing by: {:?}\n{}",
        second.daemon.get("/healthz?verbose"),
        second.daemon.logs()
    );
    assert_eq!(second.active(&name), Some(0.0));
    assert_eq!(first.active(&name), Some(1.0));
    assert!(!first.standing_by(&name));

    send(broker, &name, 20, 10).await;
    assert!(
        wait_for(WAIT, || (first.runs() >= 30).then_some(())).is_some(),
        "first replica ran {}",
        first.runs()
    );
    assert_eq!(second.runs(), 0, "the standby ran messages");

    first.daemon.signal(stop);
    first.daemon.wait_exit(WAIT);
    send(broker, &name, 10, 30).await;
    assert!(
        wait_for(WAIT, || (second.runs() >= 10).then_some(())).is_some(),
        "the standby did not take over: ran {}\n{}",
        second.runs(),
        second.daemon.logs()
    );
    assert!(
        wait_for(WAIT, || (second.active(&name) == Some(1.0)
            && !second.standing_by(&name))
        .then_some(()))
        .is_some()
    );
    assert_eq!(first.runs() + second.runs(), 40);
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_one_replica_reads_and_the_other_takes_over_on_sigterm() {
    one_reads_and_the_other_takes_over(Broker::Amqp, Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_one_replica_reads_and_the_other_takes_over_on_sigterm() {
    one_reads_and_the_other_takes_over(Broker::Redis, Signal::SIGTERM).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_one_replica_reads_and_the_other_takes_over_on_sigkill() {
    one_reads_and_the_other_takes_over(Broker::Redis, Signal::SIGKILL).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_a_queue_without_single_active_is_a_clear_error() {
    let name = unique("single_plain");
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let channel = conn.create_channel().await.expect("channel");
    // Every argument bosun declares but x-single-active-consumer, so that is the one the
    // broker finds different.
    let mut args = lapin::types::FieldTable::default();
    args.insert(
        "x-dead-letter-exchange".into(),
        lapin::types::AMQPValue::LongString("".into()),
    );
    args.insert(
        "x-dead-letter-routing-key".into(),
        lapin::types::AMQPValue::LongString(format!("{name}.dlq").as_str().into()),
    );
    channel
        .queue_declare(
            name.as_str().into(),
            lapin::options::QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            args,
        )
        .await
        .expect("declare");
    let port = free_port();
    let text = format!(
        r#"
[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[handlers.h]
kind = "exec"
command = ["true"]

[consumers.c]
source = "rabbit"
queue = "{name}"
handler = "h"
single_active = true
"#
    );
    let file = ConfigFile::new(&text);
    let daemon = Daemon::start(&file.path, port);
    let found = wait_for(WAIT, || {
        let logs = daemon.logs();
        (logs.contains("x-single-active-consumer") && logs.contains("delete the queue"))
            .then_some(())
    });
    assert!(found.is_some(), "{}", daemon.logs());
    let _ = channel
        .queue_delete(name.as_str().into(), Default::default())
        .await;
}
