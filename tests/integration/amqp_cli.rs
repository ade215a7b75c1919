//! `bosun publish` and `bosun topology` against a real RabbitMQ.

use crate::support;

use std::io::Write as _;
use std::process::{Command, Stdio};

use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use support::{ConfigFile, RABBIT_URL, REDIS_URL, bosun_output, unique};

fn config(queue: &str) -> ConfigFile {
    ConfigFile::new(&format!(
        r#"
[brokers.rabbit]
kind = "amqp"
url = "{RABBIT_URL}"
[brokers.cache]
kind = "redis"
url = "{REDIS_URL}"
[handlers.noop]
kind = "noop"
[consumers.orders]
source = "rabbit"
handler = "noop"
queue = "{queue}"
queue_type = "quorum"
bindings = [{{ exchange = "{queue}_x", exchange_type = "topic", routing_key = "order.*" }}]
retry = {{ max_attempts = 3, tiers = ["1s", "1m"] }}
"#
    ))
}

async fn channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

async fn cleanup(ch: &lapin::Channel, queue: &str) {
    for q in [
        queue.to_owned(),
        format!("{queue}.dlq"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.1m"),
    ] {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    let _ = ch
        .exchange_delete(format!("{queue}_x").as_str().into(), Default::default())
        .await;
}

#[tokio::test]
async fn topology_prints_then_applies_and_publish_routes_through_it() {
    let queue = unique("cli_topo");
    let file = config(&queue);
    let path = file.path.to_str().expect("utf-8 path");

    let (code, out, err) = bosun_output(&["topology", "--config", path], &[]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains(&format!("queue {queue}.retry.1s (retry delay, durable, x-queue-type=\"quorum\", x-message-ttl=1000")), "{out}");
    assert!(
        out.contains(&format!("queue {queue}.dlq (dead letters")),
        "{out}"
    );
    assert!(out.contains("x-delivery-limit=13"), "{out}");
    assert!(
        out.contains(&format!(
            "binding {queue}_x -> {queue} routing key \"order.*\""
        )),
        "{out}"
    );
    let (_conn, ch) = channel().await;
    let passive = QueueDeclareOptions {
        passive: true,
        ..Default::default()
    };
    assert!(
        ch.queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await
            .is_err(),
        "printing declares nothing"
    );

    let (_conn, ch) = channel().await;
    let (code, out, err) = bosun_output(&["topology", "--config", path, "--apply"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("consumer orders: declared"), "{out}");
    for q in [
        queue.clone(),
        format!("{queue}.dlq"),
        format!("{queue}.retry.1s"),
        format!("{queue}.retry.1m"),
    ] {
        assert!(
            ch.queue_declare(q.as_str().into(), passive, FieldTable::default())
                .await
                .is_ok(),
            "{q} exists"
        );
    }

    let body_file = file.dir.path().join("body.bin");
    std::fs::write(&body_file, [0xffu8, 0x00, b'{']).expect("write body");
    let (code, out, err) = bosun_output(
        &[
            "publish",
            "--config",
            path,
            "--broker",
            "rabbit",
            "--exchange",
            &format!("{queue}_x"),
            "--routing-key",
            "order.created",
            "--header",
            "tenant=acme",
            "--content-type",
            "application/x-test",
            "--file",
            body_file.to_str().expect("path"),
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let id = out.trim().to_owned();
    assert_eq!(
        uuid::Uuid::parse_str(&id).map(|u| u.get_version_num()).ok(),
        Some(7),
        "{out}"
    );
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message arrived");
    assert_eq!(got.delivery.data, [0xff, 0x00, b'{']);
    let p = &got.delivery.properties;
    assert_eq!(p.message_id().as_ref().map(|s| s.to_string()), Some(id));
    assert_eq!(
        p.content_type().as_ref().map(|s| s.to_string()),
        Some("application/x-test".into())
    );
    let headers = support::amqp::from_table(p.headers().as_ref());
    assert_eq!(
        headers.get("tenant").and_then(|v| v.as_text()).as_deref(),
        Some("acme")
    );

    // The body from standard input.
    let mut child = Command::new(support::bosun_bin())
        .args([
            "publish",
            "--config",
            path,
            "--broker",
            "rabbit",
            "--exchange",
            "",
            "--routing-key",
            &queue,
            "--file",
            "-",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(b"from stdin")
        .expect("write");
    let output = child.wait_with_output().expect("wait");
    assert_eq!(
        output.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("the message arrived");
    assert_eq!(got.delivery.data, b"from stdin");
    cleanup(&ch, &queue).await;
}

#[test]
fn publish_reports_unroutable_unknown_brokers_and_flags_of_the_other_kind() {
    let queue = unique("cli_pub");
    let file = config(&queue);
    let path = file.path.to_str().expect("utf-8 path");

    let (code, _, err) = bosun_output(
        &[
            "publish",
            "--config",
            path,
            "--broker",
            "rabbit",
            "--exchange",
            "",
            "--routing-key",
            &unique("nowhere"),
        ],
        &[],
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("unroutable"), "{err}");

    let (code, _, err) = bosun_output(
        &[
            "publish",
            "--config",
            path,
            "--broker",
            "nope",
            "--exchange",
            "",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("broker `nope`") && err.contains("rabbit"),
        "{err}"
    );

    let (code, _, err) = bosun_output(
        &[
            "publish", "--config", path, "--broker", "rabbit", "--header", "novalue",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");

    let (code, _, err) = bosun_output(
        &[
            "publish",
            "--config",
            path,
            "--broker",
            "cache",
            "--exchange",
            "x",
            "--field",
            "a=b",
        ],
        &[],
    );
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("are for amqp brokers"), "{err}");

    let (code, _, err) = bosun_output(
        &[
            "publish",
            "--config",
            "/nonexistent/bosun.toml",
            "--broker",
            "rabbit",
        ],
        &[],
    );
    assert_eq!(code, 78, "{err}");
}
