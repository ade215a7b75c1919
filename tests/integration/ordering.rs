//! Ordering lanes (`ordering = { key, lanes }`) on both brokers, with a Rust handler in this
//! process: many keys run at once while each key's messages run one at a time in the order
//! they were sent, a retry holds its lane, and a message without a usable key fails alone
//! while hostile keys (NUL bytes, 60 KB) order like any other.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering as AtomicOrdering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bosun::handler::{HeaderValue, Message, Outcome};
use bosun::{Handler, metrics_handle};

use crate::support::amqp::{OutgoingMessage, Publisher};
use crate::support::streams::{self, redis};
use crate::support::{
    InProcess, RABBIT_URL, REDIS_URL, bosun_output, free_port, http_get, metric_value, unique,
    wait_for,
};

const WAIT: Duration = Duration::from_secs(90);
const KEYS: usize = 40;
const PER_KEY: usize = 25;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Broker {
    Amqp,
    Redis,
}

/// Records every run: the key's header, the sequence number in the body, the attempt; checks
/// that one key never runs twice at once and counts how many runs overlap.
#[derive(Default)]
struct Recorder {
    runs: Mutex<Vec<(String, usize, u32)>>,
    running: Mutex<HashMap<String, usize>>,
    overlapping_key: AtomicUsize,
    in_flight: AtomicUsize,
    peak: AtomicUsize,
}

fn seq_of(message: &Message) -> usize {
    serde_json::from_slice::<serde_json::Value>(&message.body)
        .ok()
        .and_then(|v| v.get("seq").and_then(serde_json::Value::as_u64))
        .unwrap_or(usize::MAX as u64) as usize
}

fn key_of(message: &Message) -> String {
    message
        .headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("x-order-key"))
        .and_then(|(_, v)| v.as_text())
        .unwrap_or_default()
}

#[async_trait::async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        let key = key_of(message);
        let seq = seq_of(message);
        {
            let mut running = self.running.lock().unwrap();
            let n = running.entry(key.clone()).or_default();
            *n += 1;
            if *n > 1 {
                self.overlapping_key.fetch_add(1, AtomicOrdering::SeqCst);
            }
        }
        let now = self.in_flight.fetch_add(1, AtomicOrdering::SeqCst) + 1;
        self.peak.fetch_max(now, AtomicOrdering::SeqCst);
        self.runs
            .lock()
            .unwrap()
            .push((key.clone(), seq, message.attempt));
        // A little work, uneven across messages, so lanes finish out of step.
        tokio::time::sleep(Duration::from_millis((seq % 4) as u64 * 2 + 1)).await;
        self.in_flight.fetch_sub(1, AtomicOrdering::SeqCst);
        *self.running.lock().unwrap().entry(key).or_default() -= 1;
        // Every seventh message fails its first attempt: its retry must hold its lane.
        if seq % 7 == 3 && message.attempt == 1 {
            Outcome::retry("first attempt fails")
        } else {
            Outcome::Ack
        }
    }
}

fn config(broker: Broker, name: &str, port: u16) -> String {
    let source = match broker {
        Broker::Amqp => format!("source = \"rabbit\"\nqueue = \"{name}\"\nprefetch = 200"),
        Broker::Redis => format!(
            "source = \"cache\"\nstream = \"{name}\"\ngroup = \"g\"\nconsumer = \"one\"\nblock = \"200ms\"\nbatch = 200"
        ),
    };
    format!(
        r#"
[service]
shutdown_timeout = "10s"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.h]
kind = "test"

[consumers.{name}]
{source}
handler = "h"
concurrency = 200
retry = {{ max_attempts = 3, tiers = ["200ms"] }}
ordering = {{ key = "header:x-order-key", lanes = 16 }}
"#
    )
}

/// Sends `(key header, body)` pairs in order.
async fn send(broker: Broker, name: &str, messages: &[(Vec<u8>, String)]) {
    match broker {
        Broker::Amqp => {
            let batch: Vec<OutgoingMessage> = messages
                .iter()
                .enumerate()
                .map(|(i, (key, body))| {
                    let mut m = OutgoingMessage::new("", name, body.as_bytes());
                    m.message_id = format!("m-{i}");
                    let value = match String::from_utf8(key.clone()) {
                        Ok(text) => HeaderValue::String(text),
                        Err(e) => HeaderValue::Bytes(e.into_bytes()),
                    };
                    if !key.is_empty() {
                        m.headers.insert("x-order-key".into(), value);
                    }
                    m
                })
                .collect();
            for result in Publisher.publish_batch(&batch).await {
                result.expect("publish");
            }
        }
        Broker::Redis => {
            let mut conn = redis().await;
            for (i, (key, body)) in messages.iter().enumerate() {
                let id = format!("m-{i}");
                let mut fields: Vec<(&str, &[u8])> =
                    vec![("payload", body.as_bytes()), ("message_id", id.as_bytes())];
                if !key.is_empty() {
                    fields.push(("x-order-key", key));
                }
                streams::xadd(&mut conn, name, &fields).await;
            }
        }
    }
}

fn settled(consumer: &str, outcome: &str) -> f64 {
    metric_value(
        &metrics_handle().render(),
        "bosun_messages_settled_total",
        &[
            &format!("consumer=\"{consumer}\""),
            &format!("outcome=\"{outcome}\""),
        ],
    )
    .unwrap_or(0.0)
}

async fn per_key_order_holds_with_many_keys_in_flight(broker: Broker) {
    let name = unique("lanes");
    let recorder = Arc::new(Recorder::default());
    let port = free_port();
    let running = InProcess::start_text(
        &config(broker, &name, port),
        recorder.clone() as Arc<dyn Handler>,
    );
    // Ready means the queue (or the group) is declared: publishing sooner is unroutable.
    let ready = format!("http://127.0.0.1:{port}/readyz");
    let ready = tokio::task::spawn_blocking(move || {
        wait_for(WAIT, || {
            http_get(&ready).filter(|(status, _)| *status == 200)
        })
    })
    .await
    .expect("readiness poll");
    assert!(ready.is_some(), "the consumer becomes ready");
    let huge = "h".repeat(60_000);
    let mut keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|k| format!("customer-{k}").into_bytes())
        .collect();
    keys.push(b"nul\0in\0key".to_vec());
    keys.push(huge.clone().into_bytes());
    let mut messages = Vec::new();
    for seq in 0..PER_KEY {
        for key in &keys {
            messages.push((key.clone(), format!(r#"{{"seq":{seq}}}"#)));
        }
        // Messages whose key cannot be used: no header at all, not UTF-8.
        if seq % 5 == 0 {
            messages.push((Vec::new(), format!(r#"{{"seq":{seq}}}"#)));
            messages.push((vec![0xff, 0xfe, b'k'], format!(r#"{{"seq":{seq}}}"#)));
        }
    }
    let bad = 2 * PER_KEY.div_ceil(5);
    let good = keys.len() * PER_KEY;
    send(broker, &name, &messages).await;

    let done = wait_for(WAIT, || {
        (settled(&name, "ack") >= good as f64 && settled(&name, "dead_letter") >= bad as f64)
            .then_some(())
    });
    let runs = recorder.runs.lock().unwrap().clone();
    assert!(
        done.is_some(),
        "acked {} of {good}, dead-lettered {} of {bad}; {} runs",
        settled(&name, "ack"),
        settled(&name, "dead_letter"),
        runs.len()
    );
    assert_eq!(
        recorder.overlapping_key.load(AtomicOrdering::SeqCst),
        0,
        "a key ran twice at once"
    );
    assert!(
        recorder.peak.load(AtomicOrdering::SeqCst) > 4,
        "keys ran at once: peak {}",
        recorder.peak.load(AtomicOrdering::SeqCst)
    );
    // Per key, the runs are the sequence in order, a failed first attempt followed at once
    // by its retry (held in the lane, nothing of its key in between).
    let mut by_key: BTreeMap<String, Vec<(usize, u32)>> = BTreeMap::new();
    for (key, seq, attempt) in &runs {
        by_key
            .entry(key.clone())
            .or_default()
            .push((*seq, *attempt));
    }
    assert!(!by_key.contains_key(""), "a message without a key ran");
    assert_eq!(by_key.len(), keys.len(), "keys seen: {}", by_key.len());
    for (key, seen) in &by_key {
        let expected: Vec<(usize, u32)> = (0..PER_KEY)
            .flat_map(|seq| {
                if seq % 7 == 3 {
                    vec![(seq, 1), (seq, 2)]
                } else {
                    vec![(seq, 1)]
                }
            })
            .collect();
        assert_eq!(
            seen,
            &expected,
            "order of key {:?}",
            &key[..key.len().min(20)]
        );
    }
    assert!(by_key.contains_key(&huge) && by_key.contains_key("nul\0in\0key"));
    assert_eq!(settled(&name, "dead_letter"), bad as f64);
    running.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn amqp_per_key_order_holds_with_many_keys_in_flight() {
    per_key_order_holds_with_many_keys_in_flight(Broker::Amqp).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn redis_per_key_order_holds_with_many_keys_in_flight() {
    per_key_order_holds_with_many_keys_in_flight(Broker::Redis).await;
}

#[test]
fn a_bad_ordering_is_reported_with_its_place() {
    let text = format!(
        r#"
[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"

[handlers.h]
kind = "exec"
command = ["true"]

[consumers.a]
source = "rabbit"
queue = "{q}"
handler = "h"
ordering = {{ key = "cookie:x", lanes = 0, retry = "later" }}

[consumers.b]
source = "cache"
stream = "{q}"
handler = "h"
ordering = {{ key = "routing_key" }}
"#,
        q = unique("lanes_check")
    );
    let file = crate::support::ConfigFile::new(&text);
    let (code, out, err) = bosun_output(
        &[
            "check",
            "--config",
            file.path.to_str().unwrap(),
            "--allow-insecure-config",
        ],
        &[],
    );
    let all = format!("{out}{err}");
    assert_eq!(code, 78, "{all}");
    for expected in [
        "consumers.a.ordering.key",
        "or `routing_key`",
        "consumers.a.ordering.lanes",
        "consumers.a.ordering.retry",
        "consumers.b.ordering.key",
        "a stream entry has no routing key",
    ] {
        assert!(all.contains(expected), "missing {expected:?} in {all}");
    }
}
