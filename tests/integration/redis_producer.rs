//! `bosun publish` to a Redis stream. The producer itself is tested in
//! `src/redis_streams/live_tests/producer.rs`.

use crate::support;

use redis::AsyncCommands;
use support::{REDIS_URL, unique};

#[tokio::test]
async fn publish_command_adds_fields_body_and_message_id_to_a_stream() {
    let stream = unique("cli_publish");
    let config = support::ConfigFile::new(&format!(
        "[brokers.cache]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\n"
    ));
    let body = config.dir.path().join("body.bin");
    std::fs::write(&body, b"\xff\x00raw").expect("write body");
    let path = config.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = support::bosun_output(
        &[
            "publish",
            "--config",
            &path,
            "--broker",
            "cache",
            "--stream",
            &stream,
            "--field",
            "kind=order",
            "--file",
            &body.to_string_lossy(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{stderr}");
    let message_id = stdout.trim().to_owned();
    assert!(uuid::Uuid::parse_str(&message_id).is_ok(), "{stdout}");

    let client = redis::Client::open(REDIS_URL).expect("client");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let entries: redis::streams::StreamRangeReply = conn.xrange_all(&stream).await.expect("xrange");
    assert_eq!(entries.ids.len(), 1);
    let fields = &entries.ids[0].map;
    assert_eq!(
        fields.get("kind"),
        Some(&redis::Value::BulkString(b"order".to_vec()))
    );
    assert_eq!(
        fields.get("payload"),
        Some(&redis::Value::BulkString(b"\xff\x00raw".to_vec()))
    );
    assert_eq!(
        fields.get("message_id"),
        Some(&redis::Value::BulkString(message_id.into_bytes()))
    );
    let _: () = conn.del(&stream).await.expect("cleanup");

    let (code, _, stderr) = support::bosun_output(
        &[
            "publish",
            "--config",
            &path,
            "--broker",
            "cache",
            "--exchange",
            "x",
        ],
        &[],
    );
    assert_eq!(code, 64, "{stderr}");
}

#[tokio::test]
async fn publish_command_writes_a_flat_entry_from_a_json_object() {
    let stream = unique("cli_flat");
    let config = support::ConfigFile::new(&format!(
        "[brokers.legacy]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\nentry_format = \"fields\"\n"
    ));
    let object = config.dir.path().join("event.json");
    std::fs::write(&object, br#"{"event_type":"user.created","user_id":"123"}"#)
        .expect("write body");
    let list = config.dir.path().join("list.json");
    std::fs::write(&list, b"[1, 2]").expect("write body");
    let path = config.path.to_string_lossy().into_owned();
    let publish = |file: &std::path::Path| {
        support::bosun_output(
            &[
                "publish",
                "--config",
                &path,
                "--broker",
                "legacy",
                "--stream",
                &stream,
                "--file",
                &file.to_string_lossy(),
            ],
            &[],
        )
    };
    let (code, stdout, stderr) = publish(&object);
    assert_eq!(code, 0, "{stderr}");
    let message_id = stdout.trim().to_owned();
    let (code, _, stderr) = publish(&list);
    assert_eq!(code, 64, "{stderr}");
    assert!(stderr.contains("needs a JSON object body"), "{stderr}");

    let mut conn = support::streams::redis().await;
    let got = support::streams::range(&mut conn, &stream).await;
    assert_eq!(got.len(), 1, "only the object is written");
    assert_eq!(
        got[0].1,
        pairs(&[
            ("event_type", b"user.created"),
            ("user_id", b"123"),
            ("message_id", message_id.as_bytes()),
        ])
    );
    let _: () = conn.del(&stream).await.expect("cleanup");
}

#[test]
fn check_shows_the_entry_format_a_consumer_takes_from_its_broker() {
    let config = support::ConfigFile::new(&format!(
        "[brokers.legacy]\nkind = \"redis\"\nurl = \"{REDIS_URL}\"\nentry_format = \"fields\"\n\
         [handlers.n]\nkind = \"noop\"\n\
         [consumers.flat]\nsource = \"legacy\"\nhandler = \"n\"\nstream = \"events\"\n\
         [consumers.dapr]\nsource = \"legacy\"\nhandler = \"n\"\nstream = \"orders\"\nentry_format = \"dapr\"\n"
    ));
    let path = config.path.to_string_lossy().into_owned();
    let (code, stdout, stderr) = support::bosun_output(&["check", "--config", &path], &[]);
    assert_eq!(code, 0, "{stderr}");
    let line = |consumer: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("consumer {consumer}:")))
            .unwrap_or_default()
            .to_owned()
    };
    assert!(
        line("flat").ends_with("entry format fields, id in message_id)"),
        "{stdout}"
    );
    assert!(
        line("dapr").ends_with("entry format dapr, body in data, id in message_id)"),
        "{stdout}"
    );
}

/// Field/value pairs as XRANGE returns them.
fn pairs(fields: &[(&str, &[u8])]) -> support::streams::Fields {
    fields
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}
