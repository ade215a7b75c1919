//! The confirming amqp publisher against a real RabbitMQ.

mod support;

use std::collections::BTreeMap;

use bosun::amqp::AmqpPublisher;
use bosun::config::{AmqpBrokerConfig, SecretUrl};
use bosun::handler::HeaderValue;
use bosun::publish::{OutgoingMessage, PublishError, Publisher};
use lapin::options::{BasicGetOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use support::{RABBIT_URL, unique};

fn broker() -> AmqpBrokerConfig {
    AmqpBrokerConfig {
        url: SecretUrl::new(RABBIT_URL.parse().expect("url")),
        connection_name: None,
        heartbeat: None,
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
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");

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
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
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
    ch.queue_declare(
        queue.as_str().into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .expect("declare");
    let ok = publisher
        .publish(&OutgoingMessage::new("", queue.clone(), "y"))
        .await;
    assert_eq!(ok, Ok(()));
    publisher.close().await;
    let _ = ch
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
}
