//! The confirming amqp publisher against a real RabbitMQ.

use crate::testing::support;

use std::collections::BTreeMap;

use bosun::amqp::AmqpPublisher;
use bosun::config::{AmqpBrokerConfig, SecretUrl};
use bosun::handler::HeaderValue;
use bosun::publish::{OutgoingMessage, PublishError, Publisher};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use support::{RABBIT_URL, unique};

fn broker() -> AmqpBrokerConfig {
    let url = SecretUrl::new(RABBIT_URL.parse().expect("url"));
    AmqpBrokerConfig {
        urls: vec![url.clone()],
        url,
        connection_name: None,
        heartbeat: None,
        max_message_size: None,
        tls: None,
    }
}

async fn channel() -> (lapin::Connection, lapin::Channel) {
    let conn = lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
        .await
        .expect("connect");
    let ch = conn.create_channel().await.expect("channel");
    (conn, ch)
}

#[tokio::test]
async fn batch_is_confirmed_and_keeps_properties() {
    let queue = unique("pub_batch");
    let (_conn, ch) = channel().await;
    declare(&ch, &queue).await;

    let publisher =
        AmqpPublisher::new("rabbit", broker(), unique("test-publisher")).with_window(16);
    let mut messages = Vec::new();
    for i in 0..100u32 {
        let mut m = OutgoingMessage::new("", queue.clone(), format!("body {i}"));
        m.correlation_id = Some(format!("corr-{i}"));
        m.content_type = Some("text/plain".into());
        m.headers = BTreeMap::from([("tenant".to_owned(), HeaderValue::String("acme".into()))]);
        messages.push(m);
    }
    let results = publisher.publish_batch(&messages).await;
    assert_eq!(results.len(), 100);
    assert!(results.iter().all(Result::is_ok), "{results:?}");

    let got = ch
        .basic_get(queue.as_str().into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
        .expect("a message");
    let props = &got.delivery.properties;
    assert_eq!(got.delivery.data, b"body 0");
    assert_eq!(
        props.message_id().as_ref().map(|s| s.to_string()),
        Some(messages[0].message_id.clone())
    );
    assert_eq!(
        props.correlation_id().as_ref().map(|s| s.to_string()),
        Some("corr-0".to_owned())
    );
    assert_eq!(
        props.content_type().as_ref().map(|s| s.to_string()),
        Some("text/plain".to_owned())
    );
    assert_eq!(*props.delivery_mode(), Some(2));
    assert!(props.timestamp().is_some());
    let headers = bosun::amqp::headers::from_table(props.headers().as_ref());
    assert_eq!(
        headers.get("tenant"),
        Some(&HeaderValue::String("acme".into()))
    );
    assert_eq!(
        uuid::Uuid::parse_str(&messages[0].message_id)
            .map(|u| u.get_version_num())
            .ok(),
        Some(7)
    );
    publisher.close().await;
    delete(&ch, &queue).await;
}

#[tokio::test]
async fn unroutable_message_is_an_error_and_the_publisher_recovers() {
    let publisher = AmqpPublisher::new("rabbit", broker(), unique("test-publisher"));
    let nowhere = OutgoingMessage::new("", unique("no_such_queue"), "x");
    let result = publisher.publish(&nowhere).await;
    assert!(
        matches!(result, Err(PublishError::Unroutable(_))),
        "{result:?}"
    );

    let missing_exchange = OutgoingMessage::new(unique("no_such_exchange"), "k", "x");
    let result = publisher.publish(&missing_exchange).await;
    assert!(
        matches!(result, Err(PublishError::Unroutable(_))),
        "{result:?}"
    );

    // The broker closed the channel over the missing exchange; the next publish still works.
    let queue = unique("pub_recover");
    let (_conn, ch) = channel().await;
    declare(&ch, &queue).await;
    let ok = publisher
        .publish(&OutgoingMessage::new("", queue.clone(), "y"))
        .await;
    assert_eq!(ok, Ok(()));
    publisher.close().await;
    delete(&ch, &queue).await;
}

async fn declare(ch: &lapin::Channel, queue: &str) {
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
}

async fn delete(ch: &lapin::Channel, queue: &str) {
    let _ = ch
        .queue_delete(queue.into(), QueueDeleteOptions::default())
        .await;
}

/// Messages in `queue`, taken off it.
async fn drain(ch: &lapin::Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut bodies = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .expect("get")
    {
        bodies.push(m.delivery.data);
    }
    bodies
}

/// A missing exchange in the middle of a batch is found before publishing, so the broker never
/// closes the channel under the rest: every other message is confirmed, and arrives once.
#[tokio::test]
async fn a_missing_exchange_fails_only_its_own_message_and_duplicates_nothing() {
    let queue = unique("pub_mixed");
    let (_conn, ch) = channel().await;
    declare(&ch, &queue).await;
    let nowhere = unique("no_such_exchange");
    let publisher = AmqpPublisher::new("rabbit", broker(), unique("test-publisher"));
    let messages: Vec<OutgoingMessage> = (0..60)
        .map(|i| {
            let exchange = if i % 20 == 10 { nowhere.as_str() } else { "" };
            OutgoingMessage::new(exchange, queue.clone(), format!("m{i}"))
        })
        .collect();
    let results = publisher.publish_batch(&messages).await;
    for (i, result) in results.iter().enumerate() {
        if i % 20 == 10 {
            assert!(
                matches!(result, Err(PublishError::Unroutable(e)) if e.contains("does not exist")),
                "{i}: {result:?}"
            );
        } else {
            assert_eq!(result, &Ok(()), "{i}");
        }
    }
    let mut bodies = drain(&ch, &queue).await;
    bodies.sort();
    let mut expected: Vec<Vec<u8>> = (0..60)
        .filter(|i| i % 20 != 10)
        .map(|i| format!("m{i}").into_bytes())
        .collect();
    expected.sort();
    assert_eq!(bodies, expected, "each good message exactly once");

    // The exchange appears: the next batch checks again rather than trusting the miss.
    ch.exchange_declare(
        nowhere.as_str().into(),
        lapin::ExchangeKind::Fanout,
        lapin::options::ExchangeDeclareOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("exchange");
    ch.queue_bind(
        queue.as_str().into(),
        nowhere.as_str().into(),
        "".into(),
        lapin::options::QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
    .expect("bind");
    let late = publisher
        .publish(&OutgoingMessage::new(nowhere.clone(), "k", "late"))
        .await;
    assert_eq!(late, Ok(()));
    assert_eq!(drain(&ch, &queue).await, vec![b"late".to_vec()]);
    publisher.close().await;
    let _ = ch
        .exchange_delete(nowhere.as_str().into(), Default::default())
        .await;
    delete(&ch, &queue).await;
}

/// With `max_message_size` set, a larger body is refused without being sent.
#[tokio::test]
async fn a_body_over_the_configured_max_is_refused_before_sending() {
    let queue = unique("pub_max");
    let (_conn, ch) = channel().await;
    declare(&ch, &queue).await;
    let config = AmqpBrokerConfig {
        max_message_size: Some(1024),
        ..broker()
    };
    let publisher = AmqpPublisher::new("rabbit", config, unique("test-publisher"));
    let messages = vec![
        OutgoingMessage::new("", queue.clone(), vec![b'a'; 1024]),
        OutgoingMessage::new("", queue.clone(), vec![b'b'; 1025]),
        OutgoingMessage::new("", queue.clone(), vec![b'c'; 10]),
    ];
    let results = publisher.publish_batch(&messages).await;
    assert_eq!(results[0], Ok(()));
    assert_eq!(
        results[1],
        Err(PublishError::TooLarge {
            size: 1025,
            max: 1024
        })
    );
    assert_eq!(results[2], Ok(()));
    assert_eq!(drain(&ch, &queue).await.len(), 2);
    publisher.close().await;
    delete(&ch, &queue).await;
}

/// The broker's own limit (`max_message_size`, 128 MiB by default) closes the channel; the
/// error is charged to the message of that size, and the publisher goes on.
#[tokio::test]
async fn the_brokers_size_limit_is_charged_to_the_oversized_message() {
    let Some(max) = support::rabbit_max_message_size() else {
        panic!("cannot read RabbitMQ's max_message_size with rabbitmqctl");
    };
    let queue = unique("pub_oversize");
    let (_conn, ch) = channel().await;
    declare(&ch, &queue).await;
    let publisher = AmqpPublisher::new("rabbit", broker(), unique("test-publisher"));
    let messages = vec![
        OutgoingMessage::new("", queue.clone(), "before"),
        OutgoingMessage::new("", queue.clone(), vec![0u8; max as usize + 1]),
        OutgoingMessage::new("", queue.clone(), "after"),
    ];
    let results = publisher.publish_batch(&messages).await;
    assert_eq!(
        results[1],
        Err(PublishError::TooLarge { size: max + 1, max })
    );
    for i in [0, 2] {
        assert!(
            matches!(&results[i], Ok(()) | Err(PublishError::Connection(_))),
            "{i}: {:?}",
            results[i]
        );
    }
    let ok = publisher
        .publish(&OutgoingMessage::new("", queue.clone(), "next"))
        .await;
    assert_eq!(ok, Ok(()));
    assert!(drain(&ch, &queue).await.contains(&b"next".to_vec()));
    publisher.close().await;
    delete(&ch, &queue).await;
}
