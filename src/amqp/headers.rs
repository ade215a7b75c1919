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
    LAST_FAILURE_AT, MAX_ERROR_BYTES, ORIG_EXPIRATION, ORIGINAL_EXCHANGE, ORIGINAL_QUEUE,
    ORIGINAL_ROUTING_KEY, REPLAY_COUNT, TRUNCATED,
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

/// The attempt a delivery is on, from `bosun-attempt`; 1 when absent or unreadable.
pub fn attempt(table: Option<&FieldTable>) -> u32 {
    let Some(value) = table.and_then(|t| t.inner().get(ATTEMPT)) else {
        return 1;
    };
    let n: Option<i64> = match value {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes())
            .ok()
            .and_then(|t| t.trim().parse().ok()),
        AMQPValue::ShortString(s) => s.as_str().trim().parse().ok(),
        other => match from_amqp(other) {
            HeaderValue::Int(i) => Some(i),
            _ => None,
        },
    };
    n.and_then(|n| u32::try_from(n).ok())
        .filter(|n| *n >= 1)
        .unwrap_or(1)
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
        assert_eq!(attempt(None), 1);
        let mut table = FieldTable::default();
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(3));
        assert_eq!(attempt(Some(&table)), 3);
        table.insert(ATTEMPT.into(), text("4"));
        assert_eq!(attempt(Some(&table)), 4);
        table.insert(ATTEMPT.into(), AMQPValue::LongLongInt(-1));
        assert_eq!(attempt(Some(&table)), 1);
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
        let long = "é".repeat(MAX_ERROR_BYTES);
        let mut table = FieldTable::default();
        add_failure(&mut table, &failure(&long));
        let Some(HeaderValue::String(error)) = from_table(Some(&table)).remove(ERROR) else {
            panic!("no error header")
        };
        assert!(error.len() <= MAX_ERROR_BYTES && error.len() >= MAX_ERROR_BYTES - 1);
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
