//! Hostile messages on a RabbitMQ queue, through the real binary: headers nested thousands of
//! levels deep, properties and header names that are not UTF-8, bodies over
//! `max_message_size`. Each must end in the dead-letter queue as `invalid`, alone, while the
//! process keeps running on the same connection and every other message is handled.
//!
//! lapin cannot write such frames (its strings are UTF-8, its encoder recurses), so they are
//! published by a minimal client below that writes AMQP 0-9-1 frames to a TCP socket.

use crate::support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use bosun::handler::HeaderValue;
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use support::amqp::{from_table, headers};
use support::{ConfigFile, Daemon, RABBIT_URL, free_port, unique, wait_for};

const WAIT: Duration = Duration::from_secs(60);

/// A publisher that writes frames by hand, with publisher confirms.
struct RawAmqp {
    stream: TcpStream,
    frame_max: usize,
}

fn short(out: &mut Vec<u8>, s: &[u8]) {
    out.push(s.len() as u8);
    out.extend(s);
}

fn method(class: u16, method: u16) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend(method.to_be_bytes());
    out
}

impl RawAmqp {
    fn connect() -> Self {
        let stream = TcpStream::connect("127.0.0.1:5672").expect("connect to RabbitMQ");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut amqp = Self {
            stream,
            frame_max: 4096,
        };
        amqp.stream
            .write_all(b"AMQP\x00\x00\x09\x01")
            .expect("protocol header");
        amqp.expect_method(10, 10); // connection.start
        let mut start_ok = method(10, 11);
        start_ok.extend(0u32.to_be_bytes()); // no client properties
        short(&mut start_ok, b"PLAIN");
        let response = b"\0guest\0guest";
        start_ok.extend((response.len() as u32).to_be_bytes());
        start_ok.extend(response);
        short(&mut start_ok, b"en_US");
        amqp.send(1, 0, &start_ok);
        let tune = amqp.expect_method(10, 30);
        let channel_max = [tune[0], tune[1]];
        let frame_max = u32::from_be_bytes([tune[2], tune[3], tune[4], tune[5]]);
        amqp.frame_max = frame_max as usize;
        let mut tune_ok = method(10, 31);
        tune_ok.extend(channel_max);
        tune_ok.extend(frame_max.to_be_bytes());
        tune_ok.extend(0u16.to_be_bytes()); // no heartbeats
        amqp.send(1, 0, &tune_ok);
        let mut open = method(10, 40);
        short(&mut open, b"/");
        short(&mut open, b"");
        open.push(0);
        amqp.send(1, 0, &open);
        amqp.expect_method(10, 41);
        let mut channel_open = method(20, 10);
        short(&mut channel_open, b"");
        amqp.send(1, 1, &channel_open);
        amqp.expect_method(20, 11);
        let mut select = method(85, 10);
        select.push(0);
        amqp.send(1, 1, &select);
        amqp.expect_method(85, 11);
        amqp
    }

    fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend(channel.to_be_bytes());
        frame.extend((payload.len() as u32).to_be_bytes());
        frame.extend(payload);
        frame.push(0xCE);
        self.stream.write_all(&frame).expect("write a frame");
    }

    /// Reads frames until the method `class.method`; the payload after its ids.
    fn expect_method(&mut self, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            self.stream.read_exact(&mut head).expect("read a frame");
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.stream.read_exact(&mut payload).expect("read a frame");
            payload.pop();
            if head[0] != 1 || payload.len() < 4 {
                continue;
            }
            let got = (
                u16::from_be_bytes([payload[0], payload[1]]),
                u16::from_be_bytes([payload[2], payload[3]]),
            );
            match got {
                (10, 50) | (20, 40) => panic!(
                    "the broker closed: {}",
                    String::from_utf8_lossy(&payload[4..])
                ),
                (60, 50) => panic!("unroutable test message"),
                (60, 120) => panic!("the broker refused a test message"),
                _ if got == (class, id) => return payload[4..].to_vec(),
                _ => {}
            }
        }
    }

    /// Publishes `body` to `queue` with the encoded property `flags` and `list`, and waits for
    /// the broker's confirm.
    fn publish(&mut self, queue: &str, (flags, list): (u16, Vec<u8>), body: &[u8]) {
        let mut publish = method(60, 40);
        publish.extend(0u16.to_be_bytes());
        short(&mut publish, b"");
        short(&mut publish, queue.as_bytes());
        publish.push(1); // mandatory
        self.send(1, 1, &publish);
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend(0u16.to_be_bytes());
        header.extend((body.len() as u64).to_be_bytes());
        header.extend(flags.to_be_bytes());
        header.extend(list);
        self.send(2, 1, &header);
        for chunk in body.chunks(self.frame_max - 8) {
            self.send(3, 1, chunk);
        }
        self.expect_method(60, 80);
    }
}

/// Basic properties as bytes: `message_id`, `content_type` and a header table already
/// encoded (its length prefix included), each any bytes at all.
#[derive(Default)]
struct Props {
    content_type: Option<Vec<u8>>,
    headers: Option<Vec<u8>>,
    message_id: Option<Vec<u8>>,
}

impl Props {
    fn id(id: &str) -> Self {
        Self {
            message_id: Some(id.as_bytes().to_vec()),
            ..Self::default()
        }
    }

    fn encode(&self) -> (u16, Vec<u8>) {
        let mut flags = 0u16;
        let mut list = Vec::new();
        if let Some(ct) = &self.content_type {
            flags |= 1 << 15;
            short(&mut list, ct);
        }
        if let Some(table) = &self.headers {
            flags |= 1 << 13;
            list.extend(table);
        }
        flags |= 1 << 12; // delivery_mode
        list.push(2);
        if let Some(id) = &self.message_id {
            flags |= 1 << 7;
            short(&mut list, id);
        }
        (flags, list)
    }
}

/// A header table `levels` deep: `{"nest": {"a": {"a": ...}}}` (the table itself is level 1),
/// built level by level.
fn nested_headers(levels: usize) -> Vec<u8> {
    let mut table = vec![0, 0, 0, 0];
    for level in 1..levels {
        let name: &[u8] = if level + 1 == levels { b"nest" } else { b"a" };
        let mut outer = ((table.len() + 2 + name.len()) as u32)
            .to_be_bytes()
            .to_vec();
        outer.push(name.len() as u8);
        outer.extend(name);
        outer.push(b'F');
        outer.extend(table);
        table = outer;
    }
    table
}

/// A header table with one entry: `name` (any bytes) set to the long string "v".
fn header_named(name: &[u8]) -> Vec<u8> {
    let mut inner = Vec::new();
    short(&mut inner, name);
    inner.push(b'S');
    inner.extend(1u32.to_be_bytes());
    inner.push(b'v');
    let mut table = (inner.len() as u32).to_be_bytes().to_vec();
    table.extend(inner);
    table
}

fn config(consumer: &str, queue: &str, extra: &str) -> (ConfigFile, u16) {
    let port = free_port();
    let text = format!(
        r#"
[service]
name = "{consumer}"
shutdown_timeout = "10s"
log_format = "json"

[http]
listen = "127.0.0.1:{port}"

[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"

[handlers.ok]
kind = "noop"

[consumers.{consumer}]
source = "rabbit"
handler = "ok"
queue = "{queue}"
retry = {{ max_attempts = 1 }}
{extra}
"#
    );
    (ConfigFile::new(&text), port)
}

struct Rabbit {
    rt: tokio::runtime::Runtime,
    _conn: lapin::Connection,
    ch: lapin::Channel,
}

impl Rabbit {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let (conn, ch) = rt.block_on(async {
            let conn =
                lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
                    .await
                    .expect("connect to RabbitMQ");
            let ch = conn.create_channel().await.expect("channel");
            (conn, ch)
        });
        Self {
            rt,
            _conn: conn,
            ch,
        }
    }

    fn depth(&self, queue: &str) -> Option<u32> {
        let options = QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.rt
            .block_on(
                self.ch
                    .queue_declare(queue.into(), options, FieldTable::default()),
            )
            .ok()
            .map(|q| q.message_count())
    }

    fn get_all(&self, queue: &str) -> Vec<lapin::message::Delivery> {
        let mut out = Vec::new();
        while let Ok(Some(m)) = self.rt.block_on(
            self.ch
                .basic_get(queue.into(), BasicGetOptions { no_ack: true }),
        ) {
            out.push(m.delivery);
        }
        out
    }

    fn cleanup(&self, queue: &str) {
        let mut queues = vec![queue.to_owned(), format!("{queue}.dlq")];
        queues.extend(["1s", "2s", "4s", "8s"].map(|tier| format!("{queue}.retry.{tier}")));
        for q in queues {
            let _ = self.rt.block_on(
                self.ch
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default()),
            );
        }
    }
}

fn header(delivery: &lapin::message::Delivery, key: &str) -> Option<HeaderValue> {
    from_table(delivery.properties.headers().as_ref()).remove(key)
}

fn text(delivery: &lapin::message::Delivery, key: &str) -> String {
    match header(delivery, key) {
        Some(HeaderValue::String(s)) => s,
        other => format!("{other:?}"),
    }
}

/// A finished hostile run: the dead letters, and the daemon, still running.
struct Run {
    dead: Vec<lapin::message::Delivery>,
    daemon: Daemon,
    rabbit: Rabbit,
    queue: String,
    _config: ConfigFile,
}

/// Runs the daemon on a fresh queue, publishes three ordinary messages around each hostile
/// one, and waits until every message is settled, the queue is empty and the dead-letter
/// queue holds one message per hostile input.
fn run_hostile(prefix: &str, extra: &str, hostile: Vec<(Props, Vec<u8>)>) -> Run {
    let name = unique(prefix);
    let queue = format!("{name}_q");
    let (file, port) = config(&name, &queue, extra);
    let daemon = Daemon::start(&file.path, port);
    assert!(daemon.wait_ready(WAIT), "never ready: {}", daemon.logs());
    let rabbit = Rabbit::new();

    let mut raw = RawAmqp::connect();
    let count = hostile.len();
    let mut good = 0;
    for (props, body) in hostile {
        for _ in 0..3 {
            raw.publish(&queue, Props::id(&format!("good-{good}")).encode(), b"{}");
            good += 1;
        }
        raw.publish(&queue, props.encode(), &body);
    }
    for _ in 0..3 {
        raw.publish(&queue, Props::id(&format!("good-{good}")).encode(), b"{}");
        good += 1;
    }

    let consumer = format!("consumer=\"{name}\"");
    let settled = wait_for(WAIT, || {
        let acked = daemon.metric(
            "bosun_messages_settled_total",
            &[&consumer, "outcome=\"ack\""],
        )?;
        let dead = daemon.metric(
            "bosun_messages_settled_total",
            &[&consumer, "outcome=\"dead_letter\""],
        )?;
        (acked == good as f64 && dead == count as f64).then_some(())
    });
    assert!(
        settled.is_some(),
        "not every message was settled: {}",
        daemon.logs()
    );
    assert!(
        wait_for(WAIT, || (rabbit.depth(&queue) == Some(0)).then_some(())).is_some(),
        "the queue did not drain"
    );
    assert!(
        wait_for(WAIT, || (rabbit.depth(&format!("{queue}.dlq"))
            == Some(count as u32))
        .then_some(()))
        .is_some(),
        "dead letters: {:?}",
        rabbit.depth(&format!("{queue}.dlq"))
    );
    let dead = rabbit.get_all(&format!("{queue}.dlq"));
    Run {
        dead,
        daemon,
        rabbit,
        queue,
        _config: file,
    }
}

/// The daemon is alive, ready, and never lost its connection.
fn assert_unharmed(daemon: &mut Daemon) {
    assert_eq!(
        daemon.child.try_wait().ok().flatten(),
        None,
        "the daemon exited: {}",
        daemon.logs()
    );
    assert!(daemon.wait_ready(WAIT), "not ready: {}", daemon.logs());
    assert_eq!(
        daemon
            .metric("bosun_broker_reconnects_total", &[])
            .unwrap_or(0.0),
        0.0,
        "the connection was dropped: {}",
        daemon.logs()
    );
}

#[test]
fn headers_nested_thousands_of_levels_deep_are_dead_lettered_as_invalid_without_a_crash() {
    let hostile = [40, 1_500, 15_000]
        .into_iter()
        .map(|levels| {
            let props = Props {
                headers: Some(nested_headers(levels)),
                message_id: Some(format!("deep-{levels}").into_bytes()),
                ..Props::default()
            };
            (props, format!("body-{levels}").into_bytes())
        })
        .collect();
    let Run {
        dead,
        mut daemon,
        rabbit,
        queue,
        _config,
    } = run_hostile("deep", "", hostile);
    assert_unharmed(&mut daemon);
    for d in &dead {
        let id = d.properties.message_id().as_ref().map(|s| s.to_string());
        let levels = id
            .as_deref()
            .and_then(|i| i.strip_prefix("deep-"))
            .unwrap_or("?");
        assert_eq!(text(d, headers::ERROR_KIND), "invalid", "{id:?}");
        assert!(
            text(d, headers::ERROR).contains("nested deeper than 32"),
            "{id:?}"
        );
        assert_eq!(text(d, headers::TRUNCATED), "headers", "{id:?}");
        assert_eq!(d.data, format!("body-{levels}").into_bytes(), "body kept");
        // What could be kept: the outer levels, down to the marker.
        let Some(HeaderValue::Json(nest)) = header(d, "nest") else {
            panic!("the nested header was not kept: {id:?}");
        };
        assert!(
            nest.to_string().contains("removed: nested deeper"),
            "{id:?}"
        );
    }
    let mut ids: Vec<_> = dead
        .iter()
        .filter_map(|d| d.properties.message_id().as_ref().map(|s| s.to_string()))
        .collect();
    ids.sort();
    assert_eq!(ids, ["deep-1500", "deep-15000", "deep-40"]);
    rabbit.cleanup(&queue);
}

#[test]
fn non_utf8_message_id_content_type_and_header_name_are_dead_lettered_as_invalid_without_a_reconnect()
 {
    let hostile = vec![
        (
            Props {
                message_id: Some(b"id-\xff\xfe".to_vec()),
                ..Props::default()
            },
            b"bad id".to_vec(),
        ),
        (
            Props {
                message_id: Some(b"bad-content-type".to_vec()),
                content_type: Some(b"text/\xc3\x28plain".to_vec()),
                ..Props::default()
            },
            b"bad content type".to_vec(),
        ),
        (
            Props {
                message_id: Some(b"bad-header-name".to_vec()),
                headers: Some(header_named(b"x-\xff")),
                ..Props::default()
            },
            b"bad header name".to_vec(),
        ),
    ];
    let Run {
        dead,
        mut daemon,
        rabbit,
        queue,
        _config,
    } = run_hostile("utf8", "", hostile);
    assert_unharmed(&mut daemon);
    let mut reasons: Vec<(String, String)> = dead
        .iter()
        .map(|d| {
            assert_eq!(text(d, headers::ERROR_KIND), "invalid");
            (
                String::from_utf8_lossy(&d.data).into_owned(),
                text(d, headers::ERROR),
            )
        })
        .collect();
    reasons.sort();
    assert_eq!(
        reasons,
        [
            (
                "bad content type".to_owned(),
                "property `content_type` is not valid UTF-8".to_owned()
            ),
            (
                "bad header name".to_owned(),
                "a header name is not valid UTF-8".to_owned()
            ),
            (
                "bad id".to_owned(),
                "property `message_id` is not valid UTF-8".to_owned()
            ),
        ]
    );
    // What could be kept: the id with U+FFFD where its bytes were not UTF-8.
    assert!(dead.iter().any(|d| {
        d.properties
            .message_id()
            .as_ref()
            .is_some_and(|id| id.as_str() == "id-\u{fffd}\u{fffd}")
    }));
    rabbit.cleanup(&queue);
}

#[test]
fn body_over_max_message_size_is_dead_lettered_as_invalid_with_its_body() {
    let body = vec![b'x'; 4096];
    let hostile = vec![(Props::id("big"), body.clone())];
    let Run {
        dead,
        mut daemon,
        rabbit,
        queue,
        _config,
    } = run_hostile("big", "max_message_size = \"1KiB\"", hostile);
    assert_unharmed(&mut daemon);
    assert_eq!(dead.len(), 1);
    assert_eq!(text(&dead[0], headers::ERROR_KIND), "invalid");
    assert!(
        text(&dead[0], headers::ERROR).contains("over max_message_size (1024 bytes)"),
        "{}",
        text(&dead[0], headers::ERROR)
    );
    assert_eq!(dead[0].data, body, "the body fits the broker: kept whole");
    assert_eq!(header(&dead[0], headers::TRUNCATED), None);
    rabbit.cleanup(&queue);
}
