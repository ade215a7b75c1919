//! AMQP header tables: conversion to and from [`HeaderValue`], the attempt counter and the
//! `bosun-*` failure headers ([`crate::failure_headers`]) added to retry and dead-letter
//! copies.

use std::collections::BTreeMap;

use lapin::types::{AMQPValue, ByteArray, FieldArray, FieldTable, LongString};

use super::{AmqpError, short};
use crate::handler::{FailureKind, HeaderValue};

use crate::failure_headers::error_text;
/// The `bosun-*` failure headers, defined in [`crate::failure_headers`].
pub use crate::failure_headers::{
    ATTEMPT, BODY_SIZE, CONSUMER, ERROR, ERROR_KIND, FIRST_FAILURE_AT, HEADERS_TRUNCATED, HOST,
    LAST_FAILURE_AT, ORIG_EXPIRATION, ORIGINAL_EXCHANGE, ORIGINAL_QUEUE, ORIGINAL_ROUTING_KEY,
    TRUNCATED,
};

/// Header tables and arrays nested deeper than this (the header table itself is level 1) make
/// a delivery `invalid`; its dead-letter copy keeps the levels above and a marker instead.
pub const MAX_HEADER_DEPTH: usize = 32;

/// What replaces a value nested deeper than [`MAX_HEADER_DEPTH`] in a dead-letter copy.
pub const REMOVED: &str = "(removed: nested deeper than 32 levels)";

/// The headers of a delivery as handlers see them.
pub fn from_table(table: Option<&FieldTable>) -> BTreeMap<String, HeaderValue> {
    let Some(table) = table else {
        return BTreeMap::new();
    };
    table
        .inner()
        .iter()
        .map(|(k, v)| (k.as_str().to_owned(), from_amqp(v)))
        .collect()
}

fn from_amqp(value: &AMQPValue) -> HeaderValue {
    match value {
        AMQPValue::Boolean(b) => HeaderValue::Bool(*b),
        AMQPValue::ShortShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::ShortUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongUInt(i) => HeaderValue::Int(i64::from(*i)),
        AMQPValue::LongLongInt(i) => HeaderValue::Int(*i),
        AMQPValue::Timestamp(t) => HeaderValue::Int(i64::try_from(*t).unwrap_or(i64::MAX)),
        AMQPValue::Float(f) => HeaderValue::Float(f64::from(*f)),
        AMQPValue::Double(f) => HeaderValue::Float(*f),
        AMQPValue::DecimalValue(d) => {
            HeaderValue::Float(f64::from(d.value) / 10f64.powi(i32::from(d.scale)))
        }
        AMQPValue::ShortString(s) => HeaderValue::String(s.as_str().to_owned()),
        AMQPValue::LongString(s) => match std::str::from_utf8(s.as_bytes()) {
            Ok(text) => HeaderValue::String(text.to_owned()),
            Err(_) => HeaderValue::Bytes(s.as_bytes().to_vec()),
        },
        AMQPValue::ByteArray(b) => HeaderValue::Bytes(b.as_slice().to_vec()),
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) => HeaderValue::Json(to_json(value, 2)),
        AMQPValue::Void => HeaderValue::Json(serde_json::Value::Null),
    }
}

/// `value`, a table or array at nesting `level` (the header table is 1), as JSON; levels past
/// [`MAX_HEADER_DEPTH`] become a marker string, so the recursion is bounded whatever
/// the table holds.
fn to_json(value: &AMQPValue, level: usize) -> serde_json::Value {
    use serde_json::Value;
    match value {
        AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_) if level > MAX_HEADER_DEPTH => {
            Value::String(REMOVED.to_owned())
        }
        AMQPValue::FieldArray(items) => Value::Array(
            items
                .as_slice()
                .iter()
                .map(|v| to_json(v, level + 1))
                .collect(),
        ),
        AMQPValue::FieldTable(table) => Value::Object(
            table
                .inner()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), to_json(v, level + 1)))
                .collect(),
        ),
        other => match from_amqp(other) {
            HeaderValue::String(s) => Value::String(s),
            HeaderValue::Bytes(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
            HeaderValue::Int(i) => Value::from(i),
            HeaderValue::Float(f) => Value::from(f),
            HeaderValue::Bool(b) => Value::Bool(b),
            HeaderValue::Json(v) => v,
        },
    }
}

/// An AMQP value for a header given by bosun's callers (outbox rows, the CLI).
pub fn to_amqp(value: &HeaderValue) -> Result<AMQPValue, AmqpError> {
    Ok(match value {
        HeaderValue::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        HeaderValue::Bytes(b) => AMQPValue::ByteArray(ByteArray::from(b.clone())),
        HeaderValue::Int(i) => AMQPValue::LongLongInt(*i),
        HeaderValue::Float(f) => AMQPValue::Double(*f),
        HeaderValue::Bool(b) => AMQPValue::Boolean(*b),
        HeaderValue::Json(v) => json_to_amqp(v)?,
    })
}

fn json_to_amqp(value: &serde_json::Value) -> Result<AMQPValue, AmqpError> {
    use serde_json::Value;
    Ok(match value {
        Value::Null => AMQPValue::Void,
        Value::Bool(b) => AMQPValue::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => AMQPValue::LongLongInt(i),
            None => AMQPValue::Double(n.as_f64().unwrap_or(0.0)),
        },
        Value::String(s) => AMQPValue::LongString(LongString::from(s.as_bytes().to_vec())),
        Value::Array(items) => AMQPValue::FieldArray(FieldArray::from(
            items
                .iter()
                .map(json_to_amqp)
                .collect::<Result<Vec<_>, _>>()?,
        )),
        Value::Object(map) => {
            let mut table = FieldTable::default();
            for (k, v) in map {
                table.insert(short("header name", k)?, json_to_amqp(v)?);
            }
            AMQPValue::FieldTable(table)
        }
    })
}

/// A header table from bosun's own header map.
pub fn to_table(headers: &BTreeMap<String, HeaderValue>) -> Result<FieldTable, AmqpError> {
    let mut table = FieldTable::default();
    for (k, v) in headers {
        table.insert(short("header name", k)?, to_amqp(v)?);
    }
    Ok(table)
}

/// The attempt a delivery is on: `bosun-attempt` when it holds a whole number of at least 1;
/// else, when a consumer names a `legacy` header (`attempt_header`, e.g. `x-retry-count`
/// written by an earlier consumer) holding a whole number `n >= 0` of retries already made,
/// `n + 1`; else 1. Never `x-death`, which the broker writes on every dead-lettering hop, bosun's
/// own retry tiers included.
pub fn attempt(table: Option<&FieldTable>, legacy: Option<&str>) -> u32 {
    let read = |key: &str| table.and_then(|t| t.inner().get(key)).and_then(integer);
    if let Some(n) = read(ATTEMPT)
        .and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
    {
        return n;
    }
    legacy
        .and_then(read)
        .filter(|n| *n >= 0)
        .map(|n| u32::try_from(n.saturating_add(1)).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// A header value as a whole number: an integer of any width, or text holding one.
fn integer(value: &AMQPValue) -> Option<i64> {
    match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        AMQPValue::Timestamp(_) => None,
        other => match from_amqp(other) {
            HeaderValue::Int(i) => Some(i),
            _ => None,
        },
    }
}

/// Prefix of a message id bosun derives for a delivery that has none ([`message_id`]).
pub const DERIVED_ID_PREFIX: &str = "derived-";

/// The id of a delivery: its `message_id` property when it has a non-empty one, else one
/// derived from what the publisher sent and the broker keeps on a redelivery and on its own
/// dead-lettering, so the same message gets the same id every time it is delivered:
/// `derived-` and the first 32 hex digits (128 bits) of the SHA-256 of the exchange and
/// routing key it was published with ([`published_with`]), its `timestamp` property, its
/// `correlation_id` property and its body (each length-prefixed, absent properties marked as
/// such). Copies bosun makes carry it as their `message_id`, so every later attempt and the
/// dead letter keep it.
pub fn message_id(
    properties: &lapin::BasicProperties,
    exchange: &str,
    routing_key: &str,
    body: &[u8],
) -> String {
    use sha2::{Digest, Sha256};
    if let Some(id) = properties
        .message_id()
        .as_ref()
        .filter(|id| !id.as_str().is_empty())
    {
        return id.as_str().to_owned();
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
    let (exchange, routing_key) =
        published_with(properties.headers().as_ref(), exchange, routing_key);
    field(Some(b"bosun-message-id-v1"));
    field(Some(exchange.as_bytes()));
    field(Some(routing_key.as_bytes()));
    let timestamp = properties.timestamp().map(u64::to_be_bytes);
    field(timestamp.as_ref().map(|t| t.as_slice()));
    field(
        properties
            .correlation_id()
            .as_ref()
            .map(|c| c.as_str().as_bytes()),
    );
    field(Some(body));
    let digest = hasher.finalize();
    format!("{DERIVED_ID_PREFIX}{}", hex::encode(&digest[..16]))
}

/// The exchange and routing key a message was first published with. A message the broker
/// dead-lettered arrives with the dead-letter exchange and routing key; its `x-death` record
/// keeps the original ones: `x-first-death-exchange`, and the first routing key of the
/// `x-death` entry of `x-first-death-queue`. Without a complete record, as delivered.
fn published_with<'a>(
    table: Option<&'a FieldTable>,
    exchange: &'a str,
    routing_key: &'a str,
) -> (&'a str, &'a str) {
    let as_text = |value: Option<&'a AMQPValue>| match value {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    };
    let Some(table) = table else {
        return (exchange, routing_key);
    };
    let get = |key: &str| table.inner().get(key);
    let (Some(first_exchange), Some(first_queue), Some(AMQPValue::FieldArray(deaths))) = (
        as_text(get("x-first-death-exchange")),
        as_text(get("x-first-death-queue")),
        get("x-death"),
    ) else {
        return (exchange, routing_key);
    };
    let first_key = deaths.as_slice().iter().rev().find_map(|death| {
        let AMQPValue::FieldTable(death) = death else {
            return None;
        };
        if as_text(death.inner().get("queue")) != Some(first_queue) {
            return None;
        }
        match death.inner().get("routing-keys") {
            Some(AMQPValue::FieldArray(keys)) => as_text(keys.as_slice().first()),
            _ => None,
        }
    });
    match first_key {
        Some(key) => (first_exchange, key),
        None => (exchange, routing_key),
    }
}

/// What a retry or dead-letter copy records about the failure.
pub struct Failure<'a> {
    /// The attempt number written into `bosun-attempt` of the copy.
    pub attempt: u32,
    pub kind: FailureKind,
    pub error: &'a str,
    /// Exchange and routing key the failed delivery arrived with.
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub queue: &'a str,
    pub consumer: &'a str,
    pub host: &'a str,
    /// RFC 3339 "now".
    pub now: &'a str,
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// The exchange and routing key a delivery presents to handlers and routes.
///
/// A retry comes back to the queue through the default exchange with the queue's name as its
/// routing key, and so does a replay; through the default exchange the routing key names only
/// the queue. The first delivery's exchange and routing key, which bosun wrote into
/// `bosun-original-*` when the message first failed, are what it was really published with.
/// Any other delivery presents what it arrived with.
pub fn presented<'a>(
    table: Option<&'a FieldTable>,
    exchange: &'a str,
    routing_key: &'a str,
) -> (&'a str, &'a str) {
    if !exchange.is_empty() {
        return (exchange, routing_key);
    }
    let original = |key: &str| match table.and_then(|t| t.inner().get(key)) {
        Some(AMQPValue::LongString(s)) => std::str::from_utf8(s.as_bytes()).ok(),
        Some(AMQPValue::ShortString(s)) => Some(s.as_str()),
        _ => None,
    };
    match (original(ORIGINAL_EXCHANGE), original(ORIGINAL_ROUTING_KEY)) {
        (Some(e), Some(k)) => (e, k),
        _ => (exchange, routing_key),
    }
}

/// Adds the failure headers to a copy's table, keeping every header already there. The first
/// failure time and the original exchange and routing key survive from earlier failures.
pub fn add_failure(table: &mut FieldTable, failure: &Failure<'_>) {
    let keep_first = |table: &FieldTable, key: &str| table.contains_key(key);
    if !keep_first(table, FIRST_FAILURE_AT) {
        table.insert(FIRST_FAILURE_AT.into(), text(failure.now));
    }
    if !keep_first(table, ORIGINAL_EXCHANGE) {
        table.insert(ORIGINAL_EXCHANGE.into(), text(failure.exchange));
    }
    if !keep_first(table, ORIGINAL_ROUTING_KEY) {
        table.insert(ORIGINAL_ROUTING_KEY.into(), text(failure.routing_key));
    }
    table.insert(
        ATTEMPT.into(),
        AMQPValue::LongLongInt(i64::from(failure.attempt)),
    );
    table.insert(LAST_FAILURE_AT.into(), text(failure.now));
    table.insert(ERROR.into(), text(error_text(failure.error)));
    table.insert(ERROR_KIND.into(), text(failure.kind.as_str()));
    table.insert(ORIGINAL_QUEUE.into(), text(failure.queue));
    table.insert(CONSUMER.into(), text(failure.consumer));
    table.insert(HOST.into(), text(failure.host));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(error: &str) -> Failure<'_> {
        Failure {
            attempt: 2,
            kind: FailureKind::Transient,
            error,
            exchange: "orders",
            routing_key: "order.created",
            queue: "q",
            consumer: "c",
            host: "h",
            now: "2026-01-01T00:00:00Z",
        }
    }

    #[test]
    fn attempt_defaults_to_one_and_reads_our_header() {
        assert_eq!(attempt(None, None), 1);
        let mut table = FieldTable::default();
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(3));
        assert_eq!(attempt(Some(&table), None), 3);
        table.insert(ATTEMPT.into(), text("4"));
        assert_eq!(attempt(Some(&table), None), 4);
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(-1));
        assert_eq!(attempt(Some(&table), None), 1);
    }

    #[test]
    fn a_legacy_retry_count_is_read_after_bosun_attempt() {
        let legacy = Some("x-retry-count");
        let mut table = FieldTable::default();
        // Not named by the consumer: ignored.
        table.insert("x-retry-count".into(), AMQPValue::ShortShortUInt(2));
        assert_eq!(attempt(Some(&table), None), 1);
        // Retries already made, so the attempt is one more.
        assert_eq!(attempt(Some(&table), legacy), 3);
        table.insert("x-retry-count".into(), AMQPValue::LongInt(0));
        assert_eq!(attempt(Some(&table), legacy), 1);
        table.insert("x-retry-count".into(), text(" 4 "));
        assert_eq!(attempt(Some(&table), legacy), 5);
        table.insert("x-retry-count".into(), AMQPValue::LongLongInt(i64::MAX));
        assert_eq!(attempt(Some(&table), legacy), u32::MAX);
        for unreadable in [
            AMQPValue::LongLongInt(-1),
            text("three"),
            AMQPValue::Double(2.0),
            AMQPValue::Timestamp(2),
        ] {
            table.insert("x-retry-count".into(), unreadable);
            assert_eq!(attempt(Some(&table), legacy), 1);
        }
        // bosun's own count wins once bosun has written it.
        table.insert("x-retry-count".into(), AMQPValue::LongInt(7));
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(2));
        assert_eq!(attempt(Some(&table), legacy), 2);
        table.insert(ATTEMPT.into(), text("nonsense"));
        assert_eq!(attempt(Some(&table), legacy), 8);
    }

    #[test]
    fn a_delivery_without_an_id_gets_one_derived_from_what_a_redelivery_repeats() {
        let plain = lapin::BasicProperties::default().with_timestamp(1_700_000_000);
        let id = message_id(&plain, "orders", "order.created", b"{}");
        assert!(id.starts_with(DERIVED_ID_PREFIX) && id.len() == DERIVED_ID_PREFIX.len() + 32);
        // Headers and delivery mode are not part of it; everything else is.
        let mut table = FieldTable::default();
        table.insert("x-death".into(), AMQPValue::Void);
        let same = plain.clone().with_headers(table).with_delivery_mode(1);
        assert_eq!(message_id(&same, "orders", "order.created", b"{}"), id);
        for other in [
            message_id(&plain, "orders", "order.created", b"{ }"),
            message_id(&plain, "order", "sorder.created", b"{}"),
            message_id(&plain, "", "order.created", b"{}"),
            message_id(
                &plain.clone().with_timestamp(1),
                "orders",
                "order.created",
                b"{}",
            ),
            message_id(
                &plain.clone().with_correlation_id("c".into()),
                "orders",
                "order.created",
                b"{}",
            ),
        ] {
            assert_ne!(other, id);
        }
        // Dead-lettered by the broker on its way: the record names where it was published.
        let mut death = FieldTable::default();
        death.insert("queue".into(), text("elsewhere"));
        death.insert("reason".into(), text("expired"));
        death.insert(
            "routing-keys".into(),
            AMQPValue::FieldArray(vec![text("order.created"), text("cc.key")].into()),
        );
        let mut other = FieldTable::default();
        other.insert("queue".into(), text("orders.retry.1s"));
        let mut record = FieldTable::default();
        record.insert(
            "x-death".into(),
            AMQPValue::FieldArray(
                vec![AMQPValue::FieldTable(other), AMQPValue::FieldTable(death)].into(),
            ),
        );
        record.insert("x-first-death-exchange".into(), text("orders"));
        record.insert("x-first-death-queue".into(), text("elsewhere"));
        let dead = plain.clone().with_headers(record.clone());
        assert_eq!(message_id(&dead, "dlx", "q", b"{}"), id);
        // An incomplete record: as delivered.
        record.insert("x-first-death-queue".into(), text("unknown"));
        let dead = plain.clone().with_headers(record);
        assert_eq!(
            message_id(&dead, "dlx", "q", b"{}"),
            message_id(&plain, "dlx", "q", b"{}")
        );
        // A message id of its own, when not empty, is used as it is.
        let named = plain.clone().with_message_id("m-1".into());
        assert_eq!(message_id(&named, "orders", "order.created", b"{}"), "m-1");
        let empty = plain.with_message_id("".into());
        assert_eq!(message_id(&empty, "orders", "order.created", b"{}"), id);
    }

    #[test]
    fn failure_headers_keep_existing_ones_and_the_first_failure() {
        let mut table = FieldTable::default();
        table.insert("app".into(), text("x"));
        table.insert(FIRST_FAILURE_AT.into(), text("earlier"));
        table.insert(ORIGINAL_EXCHANGE.into(), text("first"));
        add_failure(&mut table, &failure("boom"));
        let headers = from_table(Some(&table));
        assert_eq!(headers.get("app"), Some(&HeaderValue::String("x".into())));
        assert_eq!(
            headers.get(FIRST_FAILURE_AT),
            Some(&HeaderValue::String("earlier".into()))
        );
        assert_eq!(
            headers.get(ORIGINAL_EXCHANGE),
            Some(&HeaderValue::String("first".into()))
        );
        assert_eq!(
            headers.get(ORIGINAL_ROUTING_KEY),
            Some(&HeaderValue::String("order.created".into()))
        );
        assert_eq!(headers.get(ATTEMPT), Some(&HeaderValue::Int(2)));
        assert_eq!(
            headers.get(ERROR_KIND),
            Some(&HeaderValue::String("transient".into()))
        );
    }

    #[test]
    fn retries_and_replays_present_the_original_exchange_and_routing_key() {
        let mut table = FieldTable::default();
        table.insert(ORIGINAL_EXCHANGE.into(), text("jobs"));
        table.insert(ORIGINAL_ROUTING_KEY.into(), text("job.created"));
        // Back through the default exchange: the original is presented.
        assert_eq!(presented(Some(&table), "", "q"), ("jobs", "job.created"));
        // Published to a real exchange: what it arrived with, whatever its headers say.
        assert_eq!(presented(Some(&table), "other", "x.y"), ("other", "x.y"));
        // No bosun header: as delivered.
        assert_eq!(presented(None, "", "q"), ("", "q"));
        table.insert(ORIGINAL_ROUTING_KEY.into(), AMQPValue::LongLongInt(3));
        assert_eq!(presented(Some(&table), "", "q"), ("", "q"));
    }

    #[test]
    fn long_errors_are_cut_on_a_char_boundary() {
        let long = "é".repeat(crate::failure_headers::MAX_ERROR_BYTES);
        let mut table = FieldTable::default();
        add_failure(&mut table, &failure(&long));
        let Some(HeaderValue::String(error)) = from_table(Some(&table)).remove(ERROR) else {
            panic!("no error header")
        };
        assert!(
            error.len() <= crate::failure_headers::MAX_ERROR_BYTES
                && error.len() >= crate::failure_headers::MAX_ERROR_BYTES - 1
        );
    }

    #[test]
    fn header_values_round_trip() {
        let mut headers = BTreeMap::new();
        headers.insert("s".to_owned(), HeaderValue::String("v".into()));
        headers.insert("i".to_owned(), HeaderValue::Int(-7));
        headers.insert("b".to_owned(), HeaderValue::Bool(true));
        headers.insert("raw".to_owned(), HeaderValue::Bytes(vec![0xff, 0x00]));
        headers.insert(
            "j".to_owned(),
            HeaderValue::Json(serde_json::json!({"a": [1, "x"]})),
        );
        let table = to_table(&headers).expect("fits");
        assert_eq!(from_table(Some(&table)), headers);
        let too_long = BTreeMap::from([("k".repeat(300), HeaderValue::Int(1))]);
        assert!(matches!(
            to_table(&too_long),
            Err(AmqpError::TooLong { .. })
        ));
    }
}
