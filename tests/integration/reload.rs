//! Reload with messages flowing: a consumer added, one removed, one's handler changed, and
//! the unchanged one never reconnects and loses nothing.

use crate::support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use bosun::Runtime;
use bosun::handler::{Handler, Message, Outcome};
use bosun::supervisor::{ExitStatus, SignalKind};
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use support::{ConfigFile, RABBIT_URL, free_port, unique, wait_for_async};

/// Records (handler tag, queue, body) for every message.
type Log = Arc<Mutex<Vec<(&'static str, String, String)>>>;

struct Recorder {
    tag: &'static str,
    log: Log,
}

#[async_trait]
impl Handler for Recorder {
    async fn handle(&self, message: &Message) -> Outcome {
        let body = String::from_utf8_lossy(&message.body).into_owned();
        self.log.lock().unwrap_or_else(|p| p.into_inner()).push((
            self.tag,
            message.source.queue.clone(),
            body,
        ));
        Outcome::Ack
    }
}

fn config(service: &str, port: u16, consumers: &[(&str, &str, &str)]) -> String {
    let mut text = format!(
        "[service]\nname = \"{service}\"\nshutdown_timeout = \"10s\"\nlog_format = \"pretty\"\n[http]\nlisten = \"127.0.0.1:{port}\"\n\
         [brokers.rabbit]\nkind = \"amqp\"\nurl = \"{RABBIT_URL}\"\n[handlers.first]\nkind = \"rec_first\"\n[handlers.second]\nkind = \"rec_second\"\n"
    );
    for (name, queue, handler) in consumers {
        text.push_str(&format!("[consumers.{name}]\nsource = \"rabbit\"\nhandler = \"{handler}\"\nqueue = \"{queue}\"\nprefetch = 20\n"));
    }
    text
}

/// Connection names of this service's consumers, with the broker's connection pid of each.
fn connections(service: &str) -> HashMap<String, String> {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(service))
        .filter_map(|l| {
            let pid = l.split_whitespace().next()?.to_owned();
            let start = l.find(&format!("{service}/"))?;
            let name: String = l[start..]
                .chars()
                .take_while(|c| *c != '"' && *c != '}' && *c != ',')
                .collect();
            Some((name, pid))
        })
        .collect()
}

async fn publish(ch: &lapin::Channel, queue: &str, bodies: impl Iterator<Item = String>) {
    for body in bodies {
        let confirm = ch
            .basic_publish(
                "".into(),
                queue.into(),
                BasicPublishOptions {
                    mandatory: true,
                    immediate: false,
                },
                body.as_bytes(),
                lapin::BasicProperties::default().with_delivery_mode(2),
            )
            .await
            .expect("publish");
        let c = confirm.await.expect("confirm");
        assert!(
            c.is_ack() && c.take_message().is_none(),
            "unroutable to {queue}"
        );
    }
}

/// Waits until `{http}/readyz` answers 200.
async fn wait_ready(http: &str) -> Option<(u16, String)> {
    wait_for_async(Duration::from_secs(30), || {
        let url = format!("{http}/readyz");
        async move {
            tokio::task::spawn_blocking(move || support::http_get(&url))
                .await
                .ok()
                .flatten()
                .filter(|(s, _)| *s == 200)
        }
    })
    .await
}
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_changes_consumers_while_the_unchanged_one_keeps_running() {
    let service = unique("reload");
    let (keep, gone, change, added) = (
        unique("keep"),
        unique("gone"),
        unique("change"),
        unique("added"),
    );
    let port = free_port();
    let log: Log = Arc::default();
    let (first_log, second_log) = (log.clone(), log.clone());
    let runtime = Runtime::builder()
        .handler_fn("rec_first", move |_, _| {
            Ok(Arc::new(Recorder {
                tag: "first",
                log: first_log.clone(),
            }) as Arc<dyn Handler>)
        })
        .handler_fn("rec_second", move |_, _| {
            Ok(Arc::new(Recorder {
                tag: "second",
                log: second_log.clone(),
            }) as Arc<dyn Handler>)
        })
        .build();
    let before = config(
        &service,
        port,
        &[
            ("keep", &keep, "first"),
            ("gone", &gone, "first"),
            ("change", &change, "first"),
        ],
    );
    let after = config(
        &service,
        port,
        &[
            ("keep", &keep, "first"),
            ("change", &change, "second"),
            ("added", &added, "second"),
        ],
    );
    let file = ConfigFile::new(&before);
    let loaded = runtime.load(&file.path).expect("valid config");
    let (signals, rx) = tokio::sync::mpsc::unbounded_channel();
    let task = tokio::spawn(runtime.run(loaded, Some(file.path.clone()), tokio_stream_wrapper(rx)));

    let http = format!("http://127.0.0.1:{port}");
    let ready = wait_ready(&http).await;
    assert!(ready.is_some(), "never ready");
    let conns_before = connections(&service);
    let keep_conn = conns_before
        .iter()
        .find(|(n, _)| n.contains("consumer:keep"))
        .map(|(_, pid)| pid.clone())
        .expect("keep's connection");

    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");

    // Messages flow to `keep` before, during and after the reload.
    let publisher = {
        let ch = ch.clone();
        let keep = keep.clone();
        tokio::spawn(async move {
            for round in 0..30 {
                publish(&ch, &keep, (0..10).map(|i| format!("k-{round}-{i}"))).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    file.rewrite(&after);
    signals.send(SignalKind::Reload).expect("signal");
    publisher.await.expect("publisher");

    // The changed consumer now calls the second handler; the added one runs.
    let applied = wait_for_async(Duration::from_secs(30), || {
        let url = format!("{http}/metrics");
        async move {
            let (_, body) = tokio::task::spawn_blocking(move || support::http_get(&url))
                .await
                .ok()
                .flatten()?;
            // The series exists at 0 from the start: wait for the increment.
            support::metric_value(&body, "bosun_config_reloads_total", &["result=\"success\""])
                .filter(|v| *v >= 1.0)
        }
    })
    .await;
    assert_eq!(applied, Some(1.0));
    // The added consumer declares its queue when it starts; wait until every consumer is ready.
    let ready = wait_ready(&http).await;
    assert!(ready.is_some(), "not ready after the reload");
    publish(&ch, &change, ["c-after".to_owned()].into_iter()).await;
    publish(&ch, &added, ["a-after".to_owned()].into_iter()).await;
    let all = wait_for_async(Duration::from_secs(30), || {
        let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let (keep, change, added) = (keep.clone(), change.clone(), added.clone());
        async move {
            let keep_count = log.iter().filter(|(_, q, _)| *q == keep).count();
            let changed = log
                .iter()
                .any(|(tag, q, b)| *tag == "second" && *q == change && b == "c-after");
            let added_seen = log
                .iter()
                .any(|(tag, q, b)| *tag == "second" && *q == added && b == "a-after");
            (keep_count >= 300 && changed && added_seen).then_some(log)
        }
    })
    .await
    .unwrap_or_else(|| {
        let log = log.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let summary: Vec<(&str, bool, bool, bool)> = log
            .iter()
            .map(|(t, q, _)| (*t, *q == keep, *q == change, *q == added))
            .filter(|x| !x.1)
            .collect();
        panic!(
            "not every message handled: keep {} of 300; others {summary:?}",
            log.iter().filter(|(_, q, _)| *q == keep).count()
        )
    });

    // Nothing lost on the unchanged consumer, and nothing handled twice (no redelivery: it
    // never reconnected).
    let mut keep_bodies: Vec<&String> = all
        .iter()
        .filter(|(_, q, _)| *q == keep)
        .map(|(_, _, b)| b)
        .collect();
    keep_bodies.sort();
    let total = keep_bodies.len();
    keep_bodies.dedup();
    assert_eq!(keep_bodies.len(), 300);
    assert_eq!(total, 300, "the unchanged consumer handled messages twice");
    let conns_after = connections(&service);
    let keep_after = conns_after
        .iter()
        .find(|(n, _)| n.contains("consumer:keep"))
        .map(|(_, pid)| pid.clone());
    assert_eq!(
        keep_after.as_deref(),
        Some(keep_conn.as_str()),
        "the unchanged consumer reconnected"
    );
    assert!(
        !conns_after.keys().any(|n| n.contains("consumer:gone")),
        "the removed consumer still runs: {conns_after:?}"
    );

    // The removed consumer no longer takes messages.
    publish(&ch, &gone, ["g-after".to_owned()].into_iter()).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !log.lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .any(|(_, _, b)| b == "g-after")
    );

    signals.send(SignalKind::Terminate).expect("signal");
    let status = tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("stops")
        .expect("joins")
        .expect("runs");
    assert_eq!(status, ExitStatus::Clean);
    for q in [&keep, &gone, &change, &added] {
        for name in [
            q.clone(),
            format!("{q}.dlq"),
            format!("{q}.retry.1s"),
            format!("{q}.retry.2s"),
            format!("{q}.retry.4s"),
            format!("{q}.retry.8s"),
        ] {
            let _ = ch
                .queue_delete(
                    name.as_str().into(),
                    lapin::options::QueueDeleteOptions::default(),
                )
                .await;
        }
    }
}

/// The runtime takes any `Stream` of signals; adapt the tokio channel.
fn tokio_stream_wrapper(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<SignalKind>,
) -> impl futures::Stream<Item = SignalKind> + Unpin + Send {
    Box::pin(futures::stream::poll_fn(move |cx| rx.poll_recv(cx)))
}
