//! The Redis producer against a real Redis: XADD layout, MAXLEN trimming, per-message results.

use crate::testing::support;

use std::collections::BTreeMap;

use bosun::config::{EntryFormat, EntryLayout, RedisBrokerConfig, SecretUrl};
use bosun::handler::HeaderValue;
use bosun::publish::{OutgoingMessage, PublishError, Publisher};
use bosun::redis_streams::RedisPublisher;
use bosun::redis_streams::producer::publish_fields;
use redis::AsyncCommands;
use support::{REDIS_URL, unique};

fn broker() -> RedisBrokerConfig {
    RedisBrokerConfig {
        url: SecretUrl::new(url::Url::parse(REDIS_URL).expect("url")),
        topology: Default::default(),
        tls: None,
        format: EntryFormat::default(),
    }
}

async fn redis() -> redis::aio::MultiplexedConnection {
    redis::Client::open(REDIS_URL)
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis")
}

type Fields = Vec<(Vec<u8>, Vec<u8>)>;

async fn entries(
    conn: &mut redis::aio::MultiplexedConnection,
    stream: &str,
) -> Vec<(String, Fields)> {
    let reply: Vec<(String, Fields)> = redis::cmd("XRANGE")
        .arg(stream)
        .arg("-")
        .arg("+")
        .query_async(conn)
        .await
        .expect("XRANGE");
    reply
}

fn field<'a>(fields: &'a Fields, name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| k == name.as_bytes())
        .map(|(_, v)| v.as_slice())
}

#[tokio::test]
async fn batch_lands_as_entries_with_body_id_and_headers() {
    let stream = unique("prod");
    let publisher = RedisPublisher::connect(&broker(), "test", None)
        .await
        .expect("connect");
    let mut headers = BTreeMap::new();
    headers.insert("tenant".to_owned(), HeaderValue::String("acme".into()));
    headers.insert("raw".to_owned(), HeaderValue::Bytes(vec![0xff, 0x00, 0xfe]));
    let mut first = OutgoingMessage::new(&stream, "", &b"\x00\xffbinary body"[..]);
    first.headers = headers;
    first.correlation_id = Some("corr-1".into());
    first.content_type = Some("application/octet-stream".into());
    let second = OutgoingMessage::new(&stream, "", &b"two"[..]);
    let results = publisher
        .publish_batch(&[first.clone(), second.clone()])
        .await;
    assert_eq!(results, vec![Ok(()), Ok(())]);

    let mut conn = redis().await;
    let got = entries(&mut conn, &stream).await;
    assert_eq!(got.len(), 2);
    let f = &got[0].1;
    assert_eq!(field(f, "payload"), Some(&b"\x00\xffbinary body"[..]));
    assert_eq!(field(f, "message_id"), Some(first.message_id.as_bytes()));
    assert_eq!(field(f, "correlation_id"), Some(&b"corr-1"[..]));
    assert_eq!(
        field(f, "content_type"),
        Some(&b"application/octet-stream"[..])
    );
    assert_eq!(field(f, "tenant"), Some(&b"acme"[..]));
    assert_eq!(field(f, "raw"), Some(&[0xff, 0x00, 0xfe][..]));
    assert!(field(f, "timestamp_ms").is_some());
    assert_eq!(
        field(&got[1].1, "message_id"),
        Some(second.message_id.as_bytes())
    );
    let _: () = conn.del(&stream).await.expect("cleanup");
}

fn broker_writing(layout: EntryLayout) -> RedisBrokerConfig {
    RedisBrokerConfig {
        format: EntryFormat::of(layout),
        ..broker()
    }
}

fn pairs(fields: &[(&str, &[u8])]) -> Fields {
    fields
        .iter()
        .map(|(k, v)| (k.as_bytes().to_vec(), v.to_vec()))
        .collect()
}

#[tokio::test]
async fn fields_format_writes_one_field_per_key_and_refuses_other_bodies_alone() {
    let stream = unique("prod_flat");
    let publisher = RedisPublisher::connect(&broker_writing(EntryLayout::Fields), "test", None)
        .await
        .expect("connect");
    let object = OutgoingMessage::new(
        &stream,
        "",
        &br#"{"event_type":"user.created","user_id":"123","n":5,"tags":["a"],"avatar":{"$base64":"/9j/4A=="}}"#[..],
    );
    let mut with_header = OutgoingMessage::new(&stream, "", &br#"{"k":"v"}"#[..]);
    with_header.correlation_id = Some("corr-1".into());
    with_header
        .headers
        .insert("tenant".into(), HeaderValue::String("acme".into()));
    let batch = [
        object.clone(),
        OutgoingMessage::new(&stream, "", &b"[1,2]"[..]),
        OutgoingMessage::new(&stream, "", &b"not json"[..]),
        with_header.clone(),
    ];
    let results = publisher.publish_batch(&batch).await;
    assert_eq!(results[0], Ok(()));
    for refused in &results[1..3] {
        assert!(
            matches!(refused, Err(PublishError::Invalid(e)) if e.contains("needs a JSON object body")),
            "{results:?}"
        );
    }
    assert_eq!(results[3], Ok(()));

    let mut conn = redis().await;
    let got = entries(&mut conn, &stream).await;
    assert_eq!(got.len(), 2, "only the object bodies are written");
    assert_eq!(
        got[0].1,
        pairs(&[
            ("event_type", b"user.created"),
            ("user_id", b"123"),
            ("n", b"5"),
            ("tags", br#"["a"]"#),
            ("avatar", &[0xff, 0xd8, 0xff, 0xe0]),
            ("message_id", object.message_id.as_bytes()),
        ])
    );
    assert_eq!(
        got[1].1,
        pairs(&[
            ("k", b"v"),
            ("message_id", with_header.message_id.as_bytes()),
            ("correlation_id", b"corr-1"),
            ("tenant", b"acme"),
        ])
    );
    let _: () = conn.del(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn fields_format_refuses_body_keys_that_would_override_the_messages_own() {
    let stream = unique("prod_flat_own");
    let format = EntryFormat {
        id_field: "event_id".into(),
        ..EntryFormat::of(EntryLayout::Fields)
    };
    let broker = RedisBrokerConfig { format, ..broker() };
    let publisher = RedisPublisher::connect(&broker, "test", None)
        .await
        .expect("connect");
    let message = |body: String, correlation_id: Option<&str>| {
        let mut m = OutgoingMessage::new(&stream, "", body);
        m.message_id = "outbox-row-1".into();
        m.correlation_id = correlation_id.map(str::to_owned);
        m
    };
    let refused = [
        (
            message(
                r#"{"message_id":"chat-7","bosun-attempt":"1000","correlation_id":"x"}"#.into(),
                None,
            ),
            "`message_id` would override the message's id",
        ),
        (
            message(r#"{"k":"v","bosun-attempt":"1000"}"#.into(), None),
            "`bosun-attempt` would override one of bosun's own fields",
        ),
        (
            message(r#"{"event_id":"chat-7"}"#.into(), None),
            "`event_id` would override the message's id",
        ),
        (
            message(r#"{"correlation_id":"x"}"#.into(), Some("y")),
            "`correlation_id` would override the message's correlation id",
        ),
    ];
    // Keys that say what the message says are written once.
    let agreeing = message(
        r#"{"event_id":"outbox-row-1","message_id":"outbox-row-1","correlation_id":"c"}"#.into(),
        Some("c"),
    );
    let mut batch: Vec<OutgoingMessage> = refused.iter().map(|(m, _)| m.clone()).collect();
    batch.push(agreeing);
    let results = publisher.publish_batch(&batch).await;
    for (result, (_, why)) in results.iter().zip(&refused) {
        assert!(
            matches!(result, Err(PublishError::Invalid(e)) if e.contains(why)),
            "{why}: {result:?}"
        );
    }
    assert_eq!(results[refused.len()], Ok(()));

    let mut conn = redis().await;
    let got = entries(&mut conn, &stream).await;
    assert_eq!(got.len(), 1, "only the agreeing message is written");
    assert_eq!(
        got[0].1,
        pairs(&[
            ("event_id", b"outbox-row-1"),
            ("message_id", b"outbox-row-1"),
            ("correlation_id", b"c"),
        ])
    );
    let _: () = conn.del(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn dapr_format_refuses_a_body_that_is_not_json_alone() {
    let stream = unique("prod_dapr_json");
    let publisher = RedisPublisher::connect(&broker_writing(EntryLayout::Dapr), "test", None)
        .await
        .expect("connect");
    let results = publisher
        .publish_batch(&[
            OutgoingMessage::new(&stream, "", &b"not json"[..]),
            OutgoingMessage::new(&stream, "", &br#"{"id":7}"#[..]),
        ])
        .await;
    assert!(
        matches!(&results[0], Err(PublishError::Invalid(e)) if e.contains("entry_format \"dapr\" needs a JSON body")),
        "{results:?}"
    );
    assert_eq!(results[1], Ok(()));
    let mut conn = redis().await;
    let got = entries(&mut conn, &stream).await;
    assert_eq!(got.len(), 1);
    assert_eq!(field(&got[0].1, "data"), Some(&br#"{"id":7}"#[..]));
    let _: () = conn.del(&stream).await.expect("cleanup");
}

#[tokio::test]
async fn other_tool_formats_are_written_in_their_shape() {
    let mut conn = redis().await;
    let mut message = OutgoingMessage::new("", "", &br#"{"id":7}"#[..]);
    message
        .headers
        .insert("trace".into(), HeaderValue::String("t1".into()));
    for (layout, body_field, id_field) in [
        (EntryLayout::Dapr, "data", "message_id"),
        (EntryLayout::Redpanda, "body", "message_id"),
        (EntryLayout::Watermill, "payload", "_watermill_message_uuid"),
    ] {
        let stream = unique("prod_shape");
        let publisher = RedisPublisher::connect(&broker_writing(layout), "test", None)
            .await
            .expect("connect");
        message.destination = stream.clone();
        assert_eq!(
            publisher.publish_batch(&[message.clone()]).await,
            vec![Ok(())]
        );
        let got = entries(&mut conn, &stream).await.remove(0).1;
        assert_eq!(
            field(&got, body_field),
            Some(&br#"{"id":7}"#[..]),
            "{layout:?}"
        );
        assert_eq!(
            field(&got, id_field),
            Some(message.message_id.as_bytes()),
            "{layout:?}"
        );
        if layout == EntryLayout::Watermill {
            // A MessagePack map of one string to one string, as Watermill's marshaller writes.
            assert_eq!(field(&got, "metadata"), Some(&b"\x81\xa5trace\xa2t1"[..]));
            assert_eq!(field(&got, "trace"), None);
        } else {
            assert_eq!(field(&got, "trace"), Some(&b"t1"[..]), "{layout:?}");
        }
        let _: () = conn.del(&stream).await.expect("cleanup");
    }
}

#[tokio::test]
async fn maxlen_trims_approximately_and_bad_messages_fail_alone() {
    let stream = unique("prod_trim");
    let wrong_type = unique("prod_string");
    let mut conn = redis().await;
    let _: () = conn.set(&wrong_type, "not a stream").await.expect("SET");
    let publisher = RedisPublisher::connect(&broker(), "test", Some(10))
        .await
        .expect("connect");
    let batch: Vec<OutgoingMessage> = (0..500)
        .map(|i| OutgoingMessage::new(&stream, "", format!("m{i}").into_bytes()))
        .collect();
    assert!(
        publisher
            .publish_batch(&batch)
            .await
            .iter()
            .all(Result::is_ok)
    );
    let len: usize = conn.xlen(&stream).await.expect("XLEN");
    assert!(len < 500, "MAXLEN ~ 10 trims the stream (len {len})");

    let mut reserved = OutgoingMessage::new(&stream, "", &b"x"[..]);
    reserved
        .headers
        .insert("payload".into(), HeaderValue::String("shadow".into()));
    let mixed = [
        OutgoingMessage::new(&wrong_type, "", &b"x"[..]),
        reserved,
        OutgoingMessage::new(&stream, "", &b"ok"[..]),
    ];
    let results = publisher.publish_batch(&mixed).await;
    assert!(
        matches!(results[0], Err(PublishError::Rejected(ref e)) if e.contains("WRONGTYPE")),
        "{results:?}"
    );
    assert!(
        matches!(results[1], Err(PublishError::Rejected(_))),
        "{results:?}"
    );
    assert_eq!(results[2], Ok(()));
    let _: () = conn.del(&[&stream, &wrong_type]).await.expect("cleanup");
}

#[tokio::test]
async fn publish_fields_adds_one_entry_and_returns_its_id() {
    let stream = unique("prod_cli");
    let fields = vec![
        ("payload".to_owned(), b"{\"a\":1}".to_vec()),
        ("kind".to_owned(), b"created".to_vec()),
    ];
    let id = publish_fields(&broker(), &stream, &fields, Some(1000))
        .await
        .expect("publish");
    let mut conn = redis().await;
    let got = entries(&mut conn, &stream).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, id);
    assert_eq!(field(&got[0].1, "kind"), Some(&b"created"[..]));
    assert!(
        field(&got[0].1, "message_id").is_some(),
        "a message_id is added"
    );
    assert!(
        publish_fields(&broker(), &stream, &[], None).await.is_err(),
        "an entry needs fields"
    );
    let _: () = conn.del(&stream).await.expect("cleanup");
}

/// A private `redis-server` on a free port, for server states the shared one must never be
/// put in (out of memory, read-only); stopped when dropped.
struct PrivateRedis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl PrivateRedis {
    fn start(args: &[&str]) -> Self {
        let port = support::free_port();
        let dir = tempfile::tempdir().expect("temp dir");
        let child = std::process::Command::new("redis-server")
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        let url = format!("redis://127.0.0.1:{port}/");
        let up = support::wait_for(std::time::Duration::from_secs(10), || {
            redis::Client::open(url.as_str())
                .ok()?
                .get_connection()
                .ok()
                .map(|_| ())
        });
        assert!(up.is_some(), "private redis-server answers");
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    fn broker(&self) -> RedisBrokerConfig {
        RedisBrokerConfig {
            url: SecretUrl::new(url::Url::parse(&self.url).expect("url")),
            topology: Default::default(),
            tls: None,
            format: EntryFormat::default(),
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
async fn out_of_memory_and_read_only_servers_are_transient_publish_failures() {
    for (state, args) in [
        (
            "OOM",
            &["--maxmemory", "1", "--maxmemory-policy", "noeviction"][..],
        ),
        ("READONLY", &["--replicaof", "127.0.0.1", "1"][..]),
    ] {
        let server = PrivateRedis::start(args);
        let publisher = RedisPublisher::connect(&server.broker(), "test", None)
            .await
            .expect("connect");
        let message = OutgoingMessage::new("s", "", &b"body"[..]);
        let results = publisher.publish_batch(&[message]).await;
        match &results[..] {
            [Err(e @ PublishError::Connection(text))] => {
                assert!(text.to_ascii_uppercase().contains(state), "{state}: {text}");
                assert!(e.is_transient(), "{state} must not use up an attempt");
            }
            other => panic!("{state}: expected a transient failure, got {other:?}"),
        }
    }
}
