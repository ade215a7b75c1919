//! RabbitMQ from the tests' side: messages published with confirms, and header tables read
//! back as the typed values handlers see (`bosun::handler::HeaderValue`).

use std::collections::BTreeMap;

use bosun::handler::HeaderValue;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString, ShortString};
use serde_json::Value;

use super::RABBIT_URL;

/// The `bosun-*` header names the tests look for (docs/delivery-guarantees.md).
pub mod headers {
    pub const ERROR: &str = "bosun-error";
    pub const ERROR_KIND: &str = "bosun-error-kind";
    pub const TRUNCATED: &str = "bosun-truncated";
    /// What stands in for a header level nested deeper than bosun keeps.
    pub const REMOVED: &str = "(removed: nested deeper than 32 levels)";
}

/// The headers of a delivery as typed values: integers, floats, booleans, UTF-8 text, bytes
/// (a long string that is not UTF-8, or a byte array), and JSON for tables and arrays.
pub fn from_table(table: Option<&FieldTable>) -> BTreeMap<String, HeaderValue> {
    table
        .map(|t| {
            t.inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), typed(v)))
                .collect()
        })
        .unwrap_or_default()
}

fn typed(value: &AMQPValue) -> HeaderValue {
    use AMQPValue as A;
    let int = |i: i64| HeaderValue::Int(i);
    match value {
        A::Boolean(b) => HeaderValue::Bool(*b),
        A::ShortShortInt(i) => int((*i).into()),
        A::ShortShortUInt(i) => int((*i).into()),
        A::ShortInt(i) => int((*i).into()),
        A::ShortUInt(i) => int((*i).into()),
        A::LongInt(i) => int((*i).into()),
        A::LongUInt(i) => int((*i).into()),
        A::LongLongInt(i) => int(*i),
        A::Timestamp(t) => int(i64::try_from(*t).unwrap_or(i64::MAX)),
        A::Float(f) => HeaderValue::Float((*f).into()),
        A::Double(f) => HeaderValue::Float(*f),
        A::DecimalValue(d) => HeaderValue::Float(f64::from(d.value) / 10f64.powi(d.scale.into())),
        A::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        A::LongString(s) => String::from_utf8(s.as_bytes().to_vec())
            .map(HeaderValue::String)
            .unwrap_or_else(|e| HeaderValue::Bytes(e.into_bytes())),
        A::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        A::FieldArray(_) | A::FieldTable(_) | A::Void => HeaderValue::Json(json(value)),
    }
}

fn json(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::Void => Value::Null,
        AMQPValue::FieldArray(items) => items.as_slice().iter().map(json).collect(),
        AMQPValue::FieldTable(t) => t
            .inner()
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), json(v)))
            .collect(),
        leaf => match typed(leaf) {
            HeaderValue::String(s) => s.into(),
            HeaderValue::Bytes(b) => String::from_utf8_lossy(&b).into(),
            HeaderValue::Int(i) => i.into(),
            HeaderValue::Float(f) => f.into(),
            HeaderValue::Bool(b) => b.into(),
            HeaderValue::Json(v) => v,
        },
    }
}

fn field(value: &HeaderValue) -> AMQPValue {
    match value {
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Json(v) => json_field(v),
    }
}

fn json_field(value: &Value) -> AMQPValue {
    match value {
        Value::Null => AMQPValue::Void,
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items.iter().map(json_field).collect::<Vec<_>>(),
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(ShortString::from(k.as_str()), json_field(v));
            }
            AMQPValue::FieldTable(table)
        }
        Value::Bool(b) => field(&HeaderValue::Bool(*b)),
        Value::Number(n) => match n.as_i64() {
            Some(i) => field(&HeaderValue::Int(i)),
            None => field(&HeaderValue::Float(n.as_f64().unwrap_or_default())),
        },
        Value::String(s) => field(&HeaderValue::String(s.clone())),
    }
}

/// A message the tests publish: a body to `exchange` with `routing_key`, its message id
/// and headers.
#[derive(Debug, Clone)]
pub struct OutgoingMessage {
    pub exchange: String,
    pub routing_key: String,
    pub body: Vec<u8>,
    pub message_id: String,
    pub headers: BTreeMap<String, HeaderValue>,
}

impl OutgoingMessage {
    pub fn new(
        exchange: impl Into<String>,
        routing_key: impl Into<String>,
        body: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            exchange: exchange.into(),
            routing_key: routing_key.into(),
            body: body.into(),
            message_id: String::new(),
            headers: BTreeMap::new(),
        }
    }
}

/// Publishes with publisher confirms, each call on a connection of its own.
pub struct Publisher;

impl Publisher {
    /// One result per message: `Ok` once the broker confirmed it.
    pub async fn publish_batch(&self, messages: &[OutgoingMessage]) -> Vec<Result<(), String>> {
        let connection =
            match lapin::Connection::connect(RABBIT_URL, lapin::ConnectionProperties::default())
                .await
            {
                Ok(c) => c,
                Err(e) => return messages.iter().map(|_| Err(e.to_string())).collect(),
            };
        let mut results = Vec::with_capacity(messages.len());
        for message in messages {
            results.push(publish_one(&connection, message).await);
        }
        let _ = connection.close(0, "done".into()).await;
        results
    }

    pub async fn publish(&self, message: &OutgoingMessage) -> Result<(), String> {
        self.publish_batch(std::slice::from_ref(message))
            .await
            .pop()
            .unwrap_or_else(|| Err("no result".into()))
    }

    pub async fn close(self) {}
}

async fn publish_one(
    connection: &lapin::Connection,
    message: &OutgoingMessage,
) -> Result<(), String> {
    let channel = connection
        .create_channel()
        .await
        .map_err(|e| e.to_string())?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(|e| e.to_string())?;
    let mut table = FieldTable::default();
    for (k, v) in &message.headers {
        table.insert(ShortString::from(k.as_str()), field(v));
    }
    let properties = lapin::BasicProperties::default()
        .with_message_id(message.message_id.as_str().into())
        .with_headers(table);
    let confirm = channel
        .basic_publish(
            message.exchange.as_str().into(),
            message.routing_key.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            &message.body,
            properties,
        )
        .await
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let _ = channel.close(0, "done".into()).await;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => Err(format!("not confirmed: {other:?}")),
    }
}

/// Prefix of the id bosun derives for a message published without one.
pub const DERIVED_ID_PREFIX: &str = "derived-";

/// The id bosun derives for a delivery without a `message_id`, computed here from the recipe
/// in docs/configuration/consumers.md ("Messages from other clients"), independently of
/// bosun's own code.
pub fn derived_id(
    properties: &lapin::BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> String {
    use sha2::{Digest, Sha256};
    let text = |value: Option<&AMQPValue>| -> Option<String> {
        match value {
            Some(AMQPValue::LongString(s)) => Some(String::from_utf8_lossy(s.as_bytes()).into()),
            Some(AMQPValue::ShortString(s)) => Some(s.as_str().to_owned()),
            _ => None,
        }
    };
    // Where it was really published: the broker's dead-letter record, when complete.
    let mut published = (exchange.to_owned(), routing_key.to_owned());
    if let Some(table) = properties.headers().as_ref() {
        let get = |key: &str| table.inner().get(key);
        if let (Some(first_exchange), Some(first_queue), Some(AMQPValue::FieldArray(deaths))) = (
            text(get("x-first-death-exchange")),
            text(get("x-first-death-queue")),
            get("x-death"),
        ) {
            let key = deaths
                .as_slice()
                .iter()
                .rev()
                .find_map(|death| match death {
                    AMQPValue::FieldTable(death)
                        if text(death.inner().get("queue")).as_deref() == Some(&first_queue) =>
                    {
                        match death.inner().get("routing-keys") {
                            Some(AMQPValue::FieldArray(keys)) => text(keys.as_slice().first()),
                            _ => None,
                        }
                    }
                    _ => None,
                });
            if let Some(key) = key {
                published = (first_exchange, key);
            }
        }
    }
    let mut hasher = Sha256::new();
    let mut field = |bytes: Option<&[u8]>| match bytes {
        Some(bytes) => {
            hasher.update([1]);
            hasher.update((bytes.len() as u64).to_be_bytes());
            hasher.update(bytes);
        }
        None => hasher.update([0]),
    };
    field(Some(b"bosun-message-id-v1"));
    field(Some(published.0.as_bytes()));
    field(Some(published.1.as_bytes()));
    let timestamp = properties.timestamp().map(u64::to_be_bytes);
    field(timestamp.as_ref().map(|t| t.as_slice()));
    field(
        properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().as_bytes()),
    );
    field(Some(body));
    format!(
        "{DERIVED_ID_PREFIX}{}",
        hex::encode(&hasher.finalize()[..16])
    )
}
