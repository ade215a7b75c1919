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
