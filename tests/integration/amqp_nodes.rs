//! An amqp broker with several addresses (`urls`): a dead address is skipped, and a consumer
//! whose node stops mid-run moves to the other node. The second node is a standalone
//! RabbitMQ started by `.ci/rabbitmq-node` on a spare port; the shared node is never stopped.

use crate::support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bosun::supervisor::ExitStatus;
use bosun::{Handler, Message, Outcome};
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use support::{InProcess, RABBIT_URL, free_port, unique};

/// The second node's AMQP port.
const NODE2_PORT: u16 = 5682;

fn node2_url() -> String {
    format!("amqp://guest:guest@127.0.0.1:{NODE2_PORT}/%2f")
}

/// Runs `.ci/rabbitmq-node <action>` for the second node.
fn node2(action: &str) {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/.ci/rabbitmq-node");
    let out = std::process::Command::new(script)
        .arg(action)
        .arg(NODE2_PORT.to_string())
        .output()
        .expect("run .ci/rabbitmq-node");
    assert!(
        out.status.success(),
        "rabbitmq-node {action}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Recorder {
    ids: Mutex<Vec<String>>,
    delay: Duration,
}

impl Recorder {
    fn distinct(&self) -> HashSet<String> {
        self.ids.lock().expect("lock").iter().cloned().collect()
    }
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        tokio::time::sleep(self.delay).await;
        if let Some(id) = &message.message_id {
            self.ids.lock().expect("lock").push(id.clone());
        }
        Outcome::Ack
    }
}

fn config(urls: &[String], queue: &str, consumer: &str, port: u16) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        r#"
[service]
name = "{consumer}"
shutdown_timeout = "10s"
log_level = "warn"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
urls = [{urls}]

[handlers.h]
kind = "test"

[consumers.{consumer}]
source = "rabbit"
handler = "h"
queue = "{queue}"
prefetch = 10
# The queue is a plain one the test declared on each node.
declare = false
retry = {{ max_attempts = 1 }}

[consumers.{consumer}.dead_letter]
queue = "{queue}"
"#,
        urls = urls.join(", ")
    )
}

/// Declares the durable `queue` on the node at `url` and publishes `ids` to it, confirmed.
async fn fill(url: &str, queue: &str, ids: &[String]) {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    for id in ids {
        ch.basic_publish(
            "".into(),
            queue.into(),
            BasicPublishOptions::default(),
            b"body",
            lapin::BasicProperties::default()
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2),
        )
        .await
        .expect("publish")
        .await
        .expect("confirm");
    }
    let _ = conn.close(0, "done".into()).await;
}

/// Ready messages of `queue` on the node at `url`, and their ids (taken off the queue).
async fn drain(url: &str, queue: &str) -> HashSet<String> {
    let conn = lapin::Connection::connect(url, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    let mut ids = HashSet::new();
    while let Some(got) = ch
        .basic_get(
            queue.into(),
            lapin::options::BasicGetOptions { no_ack: true },
        )
        .await
        .expect("get")
    {
        if let Some(id) = got.delivery.properties.message_id() {
            ids.insert(id.to_string());
        }
    }
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
    let _ = conn.close(0, "done".into()).await;
    ids
}

fn metric(port: u16, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = support::http_get(&format!("http://127.0.0.1:{port}/metrics"))?;
    support::metric_value(&body, name, labels)
}

async fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Forwards every connection to `127.0.0.1:to` from a listener bound now on `port`.
fn proxy(port: u16, to: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .expect("bind proxy");
        while let Ok((mut inbound, _)) = listener.accept().await {
            tokio::spawn(async move {
                if let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await {
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_address_is_skipped_and_the_node_in_use_is_exported() {
    let queue = unique("nodes_dead");
    let consumer = unique("c_nodes");
    let ids: Vec<String> = (0..40).map(|i| format!("d-{i}")).collect();
    fill(RABBIT_URL, &queue, &ids).await;
    let dead = free_port();
    let urls = vec![
        format!("amqp://guest:guest@127.0.0.1:{dead}/%2f"),
        RABBIT_URL.to_owned(),
    ];
    let port = free_port();
    let handler = Arc::new(Recorder {
        ids: Mutex::new(Vec::new()),
        delay: Duration::ZERO,
    });
    let running = InProcess::start_text(&config(&urls, &queue, &consumer, port), handler.clone());
    wait_until("every message is handled", Duration::from_secs(30), || {
        handler.distinct().len() == ids.len()
    })
    .await;
    assert_eq!(
        metric(
            port,
            "bosun_broker_node",
            &["broker=\"rabbit\"", "node=\"127.0.0.1:5672\""]
        ),
        Some(1.0)
    );
    let dead_label = format!("node=\"127.0.0.1:{dead}\"");
    assert_ne!(
        metric(
            port,
            "bosun_broker_node",
            &["broker=\"rabbit\"", &dead_label]
        ),
        Some(1.0),
        "the dead address is never the node in use"
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    assert!(drain(RABBIT_URL, &queue).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_whose_node_stops_mid_run_moves_to_the_other_node_and_nothing_is_lost() {
    node2("up");
    let queue = unique("nodes_move");
    let consumer = unique("c_nodes");
    let on_node2: Vec<String> = (0..150).map(|i| format!("n2-{i}")).collect();
    let on_shared: Vec<String> = (0..150).map(|i| format!("n1-{i}")).collect();
    fill(&node2_url(), &queue, &on_node2).await;
    fill(RABBIT_URL, &queue, &on_shared).await;
    // The shared node is reached through a proxy that is not listening yet, so the consumer
    // starts on the second node, the only one that answers.
    let via = free_port();
    let urls = vec![
        node2_url(),
        format!("amqp://guest:guest@127.0.0.1:{via}/%2f"),
    ];
    let port = free_port();
    let handler = Arc::new(Recorder {
        ids: Mutex::new(Vec::new()),
        delay: Duration::from_millis(20),
    });
    let running = InProcess::start_text(&config(&urls, &queue, &consumer, port), handler.clone());
    wait_until(
        "the consumer works on the second node",
        Duration::from_secs(30),
        || handler.distinct().len() >= 30,
    )
    .await;
    let node2_label = format!("node=\"127.0.0.1:{NODE2_PORT}\"");
    assert_eq!(
        metric(
            port,
            "bosun_broker_node",
            &["broker=\"rabbit\"", &node2_label]
        ),
        Some(1.0)
    );
    let _proxy = proxy(via, 5672);
    node2("stop_app");
    let via_label = format!("node=\"127.0.0.1:{via}\"");
    wait_until(
        "the consumer moved and handled every message of the other node",
        Duration::from_secs(60),
        || on_shared.iter().all(|id| handler.distinct().contains(id)),
    )
    .await;
    assert_eq!(
        metric(
            port,
            "bosun_broker_node",
            &["broker=\"rabbit\"", &via_label]
        ),
        Some(1.0)
    );
    assert_eq!(
        metric(
            port,
            "bosun_broker_node",
            &["broker=\"rabbit\"", &node2_label]
        ),
        Some(0.0)
    );
    assert_eq!(running.stop().await, ExitStatus::Clean);
    // The stopped node kept what was not acknowledged (a durable classic queue keeps its
    // persistent messages through a restart of its node): handled ∪ left there = all.
    node2("start_app");
    let left = drain(&node2_url(), &queue).await;
    let handled = handler.distinct();
    let lost: Vec<&String> = on_node2
        .iter()
        .chain(&on_shared)
        .filter(|id| !handled.contains(*id) && !left.contains(*id))
        .collect();
    assert!(lost.is_empty(), "lost: {lost:?}");
    assert!(drain(RABBIT_URL, &queue).await.is_empty());
}
